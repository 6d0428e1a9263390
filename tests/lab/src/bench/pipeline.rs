//! The pipelines a run compares, and a pipeline while it runs.
//!
//! A pipeline copies the source's `bench` database into the target (snapshot) and then follows
//! the source's changes from a given cluster time (stream), in processes of its own whose CPU
//! and peak RSS are measured. The ceiling is no pipeline: the target alone bulk-inserting the
//! workload's documents. (Kafka's connector goes here as one more variant of [`Pipeline`] and
//! [`Running`]: `connect(.., copy_existing)` to start, its JVMs' `pids()` for CPU and VmHWM,
//! `failure()` for [`Running::check`], `disconnect()` to finish.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use mongodb::bson::Timestamp;

use super::meter::MeteredChild;
use super::pipe::PipeArgs;
use super::workload::DATABASE;
use crate::SecantusServer;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pipeline {
    /// `mongo-replicator replicate`: a snapshot-only run, then a stream-only run.
    Ours,
    /// The driver pipe (`mrep-bench pipe-copy`, `mrep-bench pipe-follow`).
    Pipe,
    /// The target alone bulk-inserting the workload's documents (insert-only workloads).
    Ceiling,
}

impl Pipeline {
    pub const ALL: [Pipeline; 3] = [Pipeline::Ours, Pipeline::Pipe, Pipeline::Ceiling];

    pub fn name(self) -> &'static str {
        match self {
            Pipeline::Ours => "ours",
            Pipeline::Pipe => "pipe",
            Pipeline::Ceiling => "ceiling",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match Self::ALL.into_iter().find(|p| p.name() == name) {
            Some(p) => Ok(p),
            None => bail!("unknown pipeline {name} (ours, pipe, ceiling)"),
        }
    }

    /// Starts copying the source's database into the target.
    pub fn start_snapshot(self, run: &Endpoints<'_>) -> Result<Running> {
        match self {
            Pipeline::Ours => run.replicator(&["--mode", "snapshot-only", "--name", "bench-snapshot"]),
            Pipeline::Pipe => run.pipe("pipe-copy", None),
            Pipeline::Ceiling => bail!("the ceiling does not copy"),
        }
    }

    /// Starts following the source's changes from cluster time `from` (inclusive).
    pub fn start_stream(self, run: &Endpoints<'_>, from: Timestamp) -> Result<Running> {
        match self {
            Pipeline::Ours => {
                let from = format!("{}.{}", from.time, from.increment);
                run.replicator(&["--mode", "stream-only", "--name", "bench-stream", "--start-at-cluster-time", &from])
            }
            Pipeline::Pipe => run.pipe("pipe-follow", Some(from)),
            Pipeline::Ceiling => bail!("the ceiling does not stream"),
        }
    }
}

/// How long a pipeline may take to exit once its work is done (a snapshot) or it is told to stop.
const EXIT_GRACE: Duration = Duration::from_secs(60);

/// A pipeline's processes while it runs.
pub enum Running {
    Process(MeteredChild),
}

impl Running {
    /// CPU-seconds its processes have used so far.
    pub fn cpu_seconds(&mut self) -> Result<f64> {
        match self {
            Running::Process(child) => child.cpu_seconds(),
        }
    }

    /// Fails when the pipeline has failed; whether it has ended. `may_end`: a snapshot's
    /// process ending by itself (with success) is no failure.
    pub fn check(&mut self, may_end: bool) -> Result<bool> {
        match self {
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
        }
    }

    /// Stops a stream whose target is complete. Peak RSS in MB.
    pub async fn finish_stream(&mut self) -> Result<Option<f64>> {
        match self {
            Running::Process(child) => {
                child.terminate(EXIT_GRACE).await?;
                Ok(child.peak_rss_mb())
            }
        }
    }

    /// Where to look when it failed.
    pub fn describe(&self) -> String {
        match self {
            Running::Process(child) => format!("log {}", child.log_path().display()),
        }
    }
}

/// What a pipeline connects, with what settings, and where its processes log.
pub struct Endpoints<'a> {
    pub source: &'a SecantusServer,
    pub target: &'a SecantusServer,
    pub workers: usize,
    pub batch: usize,
    /// Documents the snapshot copies (the replicator's partition size is derived from it).
    pub docs: usize,
    pub logs: &'a Path,
}

impl Endpoints<'_> {
    /// `mongo-replicator replicate` with the benchmark's settings and `run`'s mode and name.
    fn replicator(&self, run: &[&str]) -> Result<Running> {
        let partition = partition_documents(self.docs, self.workers).to_string();
        let (workers, batch, include) = (self.workers.to_string(), self.batch.to_string(), format!("{DATABASE}.*"));
        let mut args = vec!["replicate", "--include", &include, "--metrics-address", "none", "--log-level", "warn"];
        args.extend(["--partition-documents", &partition, "--workers", &workers, "--batch-size", &batch]);
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

    fn log(&self, what: &str) -> PathBuf {
        self.logs.join(format!("{what}.log"))
    }
}

/// The replicator binary: `MONGO_REPLICATOR_BIN`, or the workspace's release build.
pub fn replicator_bin() -> PathBuf {
    std::env::var_os("MONGO_REPLICATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release/mongo-replicator")))
}

/// Two `_id` ranges per worker, so copying and verifying use as many writers as the ceiling.
pub fn partition_documents(docs: usize, workers: usize) -> usize {
    (docs / (workers * 2)).max(1)
}
