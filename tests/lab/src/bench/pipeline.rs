//! The pipelines a run compares, and a pipeline while it runs.
//!
//! A pipeline copies the source's `bench` database into the target (snapshot) and then follows
//! the source's changes from a given cluster time (stream), in processes of its own whose CPU
//! and peak RSS are measured. The ceiling is no pipeline: the target alone bulk-inserting the
//! workload's documents. MongoDB's Kafka connector pipeline runs in a broker and a Connect
//! worker started before the snapshot (their start-up is not timed); its figures are the two JVMs'.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mongodb::bson::Timestamp;

use super::meter::{self, MeteredChild};
use super::pipe::PipeArgs;
use super::workload::DATABASE;
use crate::{KafkaPipeline, SecantusServer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pipeline {
    /// `mongo-replicator replicate`: a snapshot-only run, then a stream-only run.
    Ours,
    /// The driver pipe (`mrep-bench pipe-copy`, `mrep-bench pipe-follow`).
    Pipe,
    /// The target alone bulk-inserting the workload's documents (insert-only workloads).
    Ceiling,
    /// MongoDB's Kafka connector: source connector (copying existing data first) → KRaft
    /// broker → sink connector with the `ChangeStreamHandler`, raw BSON on both.
    Kafka,
}

impl Pipeline {
    pub const ALL: [Pipeline; 4] = [Pipeline::Ours, Pipeline::Pipe, Pipeline::Ceiling, Pipeline::Kafka];

    pub fn name(self) -> &'static str {
        match self {
            Pipeline::Ours => "ours",
            Pipeline::Pipe => "pipe",
            Pipeline::Ceiling => "ceiling",
            Pipeline::Kafka => "kafka",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match Self::ALL.into_iter().find(|p| p.name() == name) {
            Some(p) => Ok(p),
            None => bail!("unknown pipeline {name} (ours, pipe, ceiling, kafka)"),
        }
    }

    /// Starts copying the source's database into the target.
    pub async fn start_snapshot(self, run: &Endpoints<'_>) -> Result<Running> {
        match self {
            Pipeline::Ours => run.replicator(&["--mode", "snapshot-only", "--name", "bench-snapshot"]),
            Pipeline::Pipe => run.pipe("pipe-copy", None),
            Pipeline::Ceiling => bail!("the ceiling does not copy"),
            Pipeline::Kafka => run.kafka(true).await,
        }
    }

    /// Starts following the source's changes from cluster time `from` (inclusive). The Kafka
    /// connector cannot be given a time: it starts from its connection, before the writer does.
    pub async fn start_stream(self, run: &Endpoints<'_>, from: Timestamp) -> Result<Running> {
        match self {
            Pipeline::Ours => {
                let from = format!("{}.{}", from.time, from.increment);
                run.replicator(&["--mode", "stream-only", "--name", "bench-stream", "--start-at-cluster-time", &from])
            }
            Pipeline::Pipe => run.pipe("pipe-follow", Some(from)),
            Pipeline::Ceiling => bail!("the ceiling does not stream"),
            Pipeline::Kafka => run.kafka(false).await,
        }
    }
}

/// How long a pipeline may take to exit once its work is done (a snapshot) or it is told to stop.
const EXIT_GRACE: Duration = Duration::from_secs(60);

/// A pipeline's processes while it runs.
pub enum Running {
    Process(MeteredChild),
    /// A connection of the Kafka pipeline (its JVMs outlive it).
    Kafka(Arc<KafkaPipeline>),
}

impl Running {
    /// CPU-seconds its processes have used so far.
    pub fn cpu_seconds(&mut self) -> Result<f64> {
        match self {
            Running::Process(child) => child.cpu_seconds(),
            Running::Kafka(kafka) => kafka_cpu_seconds(kafka),
        }
    }

    /// Fails when the pipeline has failed; whether it has ended. `may_end`: a snapshot's
    /// process ending by itself (with success) is no failure.
    pub async fn check(&mut self, may_end: bool) -> Result<bool> {
        match self {
            Running::Kafka(kafka) => match kafka.failure().await? {
                Some(failed) => bail!("the Kafka pipeline failed: {failed}"),
                None => Ok(false),
            },
            Running::Process(child) => match child.exit_status() {
                None => Ok(false),
                Some(status) if may_end && status.success() => Ok(true),
                Some(status) if status.success() => Err(child.ended_with(status, "while it should be running")),
                Some(status) => Err(child.ended_with(status, "with a failure")),
            },
        }
    }

    /// Ends a snapshot whose copy is complete: the process exits by itself. Peak RSS in MB.
    pub async fn finish_snapshot(&mut self) -> Result<Option<f64>> {
        match self {
            Running::Process(child) => {
                child.wait_success(EXIT_GRACE).await?;
                Ok(child.peak_rss_mb())
            }
            Running::Kafka(kafka) => Self::disconnect(kafka).await,
        }
    }

    /// Stops a stream whose target is complete. Peak RSS in MB.
    pub async fn finish_stream(&mut self) -> Result<Option<f64>> {
        match self {
            Running::Process(child) => {
                child.terminate(EXIT_GRACE).await?;
                Ok(child.peak_rss_mb())
            }
            Running::Kafka(kafka) => Self::disconnect(kafka).await,
        }
    }

    /// Ends a Kafka connection; the JVMs' peak RSS (summed) in MB.
    async fn disconnect(kafka: &KafkaPipeline) -> Result<Option<f64>> {
        let peak = kafka.pids().into_iter().map(meter::peak_rss_mb).sum::<Result<f64>>()?;
        kafka.disconnect().await?;
        Ok(Some(peak))
    }

    /// Where to look when it failed.
    pub fn describe(&self) -> String {
        match self {
            Running::Process(child) => format!("log {}", child.log_path().display()),
            Running::Kafka(kafka) => format!("logs in {}", kafka.dir().display()),
        }
    }
}

/// What a pipeline connects, with what settings, and where its processes log.
pub struct Endpoints<'a> {
    pub source: &'a SecantusServer,
    pub target: &'a SecantusServer,
    pub workers: usize,
    pub batch: usize,
    pub logs: &'a Path,
    /// The Kafka pipeline's broker and Connect worker, when it is the pipeline measured.
    pub kafka: Option<Arc<KafkaPipeline>>,
}

impl Endpoints<'_> {
    /// `mongo-replicator replicate` with the benchmark's settings and `run`'s mode and name.
    fn replicator(&self, run: &[&str]) -> Result<Running> {
        // The replicator's own snapshot plan (one cursor per collection unless told otherwise).
        let (workers, batch, include) = (self.workers.to_string(), self.batch.to_string(), format!("{DATABASE}.*"));
        let mut args = vec!["replicate", "--include", &include, "--metrics-address", "none", "--log-level", "warn"];
        args.extend(["--workers", &workers, "--batch-size", &batch]);
        args.extend(run);
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        let envs = [("MREP_SOURCE_URI", self.source.uri()), ("MREP_TARGET_URI", self.target.uri())];
        Ok(Running::Process(MeteredChild::spawn("mongo-replicator", &replicator_bin(), &args, &envs, &self.log(run[1]))?))
    }

    fn pipe(&self, command: &str, start_at: Option<Timestamp>) -> Result<Running> {
        let pipe = PipeArgs {
            source_uri: self.source.uri(),
            target_uri: self.target.uri(),
            database: DATABASE.to_string(),
            batch: self.batch,
            workers: self.workers,
            start_at,
        };
        let args = [vec![command.to_string()], pipe.to_args()].concat();
        Ok(Running::Process(MeteredChild::spawn(command, &std::env::current_exe()?, &args, &[], &self.log(command))?))
    }

    async fn kafka(&self, copy_existing: bool) -> Result<Running> {
        let kafka = self.kafka.clone().context("the Kafka pipeline was not started")?;
        kafka.connect(&self.source.uri(), &self.target.uri(), DATABASE, copy_existing).await?;
        Ok(Running::Kafka(kafka))
    }

    fn log(&self, what: &str) -> PathBuf {
        self.logs.join(format!("{what}.log"))
    }
}

/// CPU-seconds the Kafka pipeline's JVMs (broker and Connect worker) have used so far.
pub fn kafka_cpu_seconds(kafka: &KafkaPipeline) -> Result<f64> {
    kafka.pids().into_iter().map(meter::cpu_seconds).sum()
}

/// The replicator binary: `MONGO_REPLICATOR_BIN`, or the workspace's release build.
pub fn replicator_bin() -> PathBuf {
    std::env::var_os("MONGO_REPLICATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release/mongo-replicator")))
}

/// Two `_id` ranges per worker, so verifying compares with as many readers as the ceiling writes.
pub fn partition_documents(docs: usize, workers: usize) -> usize {
    (docs / (workers * 2)).max(1)
}
