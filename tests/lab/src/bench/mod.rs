//! `mrep-bench`: workloads × pipelines against the lab's SecantusDB servers, one table.
//!
//! Each (workload, workers, pipeline) runs on a fresh pair of servers: the source is seeded with
//! the workload's documents, the pipeline copies them (snapshot), then follows the writer's
//! changes from the source's cluster time after the copy (stream). Every pipeline sees the same
//! documents, the same writer (same random orders, two client tasks as fast as they go) and the
//! same completion poll: the target's counts must equal the writer's exact final state
//! ([`workload`]), polled every `--poll-ms`. See the binary's doc comment for the table's columns.

pub mod meter;
pub mod pipe;
pub mod pipeline;
mod table;
pub mod workload;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mongodb::Client;
use mongodb::bson::Timestamp;

use crate::{KafkaPipeline, SecantusOptions, SecantusServer};
use meter::{MeteredChild, Servers};
use pipeline::{Endpoints, Pipeline, Running, kafka_cpu_seconds, partition_documents, replicator_bin};
use table::{Cost, Figures, Row};
use workload::{Completion, DATABASE, LARGE_BYTES, LARGE_DIVISOR, MANY_COLLECTIONS, Phase, Plan, Poll, STREAM_WRITERS, Workload};

/// What a benchmark run does.
pub struct Settings {
    pub docs: usize,
    pub events: usize,
    pub batch: usize,
    pub workers: Vec<usize>,
    pub workloads: Vec<Workload>,
    pub pipelines: Vec<Pipeline>,
    /// Overrides the source's oplog cap (e.g. to see a lossy run discarded).
    pub oplog_max_entries: Option<u64>,
    /// How often the target is polled for completion, the same for every pipeline.
    pub poll: Duration,
    /// How long one phase may take before the run fails.
    pub timeout: Duration,
}

/// How long a stream pipeline gets to start before the writer does (its start-up is not timed;
/// it starts at a cluster time, so it misses nothing either way).
const SETTLE: Duration = Duration::from_secs(2);

/// Runs every workload × workers × pipeline and prints the table, then the verify table.
pub async fn run(settings: &Settings) -> Result<()> {
    if !replicator_bin().exists() {
        bail!("{} not found: run `cargo build --release --locked --bin mongo-replicator` first", replicator_bin().display());
    }
    let names = |v: Vec<&str>| v.join(",");
    println!(
        "mrep-bench: workloads {} × pipelines {}; {} snapshot documents and {} stream events per workload (~100 B documents; large: {} and {} documents of {} KB; many: over {MANY_COLLECTIONS} collections), batch {}, workers {:?}, {STREAM_WRITERS} writers, completion polled every {:?}; servers, writer and pipeline share {} cores",
        names(settings.workloads.iter().map(|w| w.name()).collect()),
        names(settings.pipelines.iter().map(|p| p.name()).collect()),
        settings.docs,
        settings.events,
        settings.docs / LARGE_DIVISOR,
        settings.events / LARGE_DIVISOR,
        LARGE_BYTES / 1024,
        settings.batch,
        settings.workers,
        settings.poll,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let logs = logs_dir();
    let mut table = table::Table::new();
    let mut verifications = Vec::new();
    let mut discarded = Vec::new();
    for &workload in &settings.workloads {
        let plan = workload.plan(settings.docs, settings.events, settings.batch)?;
        let mut rows = Vec::new();
        for &workers in &settings.workers {
            for &pipeline in &settings.pipelines {
                let what = format!("{}/{}/{workers} workers", workload.name(), pipeline.name());
                let logs = logs.join(what.replace(['/', ' '], "-"));
                std::fs::create_dir_all(&logs)?;
                let measured = match pipeline {
                    Pipeline::Ceiling if !workload.inserts_only() => continue,
                    Pipeline::Ceiling => ceiling(&plan, workers).await,
                    _ => replicate(settings, &plan, pipeline, workers, &logs).await,
                };
                let row = |phase, figures| Row { workload, phase, pipeline, workers, figures };
                match measured.with_context(|| format!("{what} failed (logs in {})", logs.display()))? {
                    Outcome::Measured { snapshot, stream, verified } => {
                        rows.push(row(Phase::Snapshot, Some(snapshot)));
                        rows.push(row(Phase::Stream, Some(stream)));
                        verifications.extend(verified.map(|v| (workers, *v)));
                    }
                    Outcome::Discarded(why) => {
                        eprintln!(
                            "\n!!! DISCARDED ({what}): {why}; its figures measure a replication that lost changes. Raise --oplog-max-entries.\n"
                        );
                        rows.push(row(Phase::Snapshot, None));
                        rows.push(row(Phase::Stream, None));
                        discarded.push(what);
                    }
                }
            }
        }
        table.print(rows);
    }
    table::print_verifications(settings.docs, &verifications);
    if !discarded.is_empty() {
        bail!("figures discarded for {discarded:?}: the source's oplog did not hold the whole run (logs in {})", logs.display());
    }
    let _ = std::fs::remove_dir_all(&logs);
    Ok(())
}

/// The figures of one (workload, workers, pipeline).
enum Outcome {
    Measured {
        snapshot: Figures,
        stream: Figures,
        verified: Option<Box<Verification>>,
    },
    /// The source pruned history written during the run: why.
    Discarded(String),
}

/// The target alone bulk-inserting the workload's documents with `workers` writers, on a fresh
/// server: the snapshot's documents, then the stream's on top.
async fn ceiling(plan: &Plan, workers: usize) -> Result<Outcome> {
    let target = SecantusServer::start(SecantusOptions::default()).await?;
    let client = target.admin_client().await?;
    let started = Instant::now();
    plan.seed(&client, Some(workers)).await?;
    let snapshot = Figures::rate_only(plan.docs as f64 / started.elapsed().as_secs_f64());
    let started = Instant::now();
    plan.stream_inserts(&client, workers).await?;
    let stream = Figures::rate_only(plan.events as f64 / started.elapsed().as_secs_f64());
    Ok(Outcome::Measured { snapshot, stream, verified: None })
}

/// A pipeline's snapshot and stream on a fresh pair of servers.
async fn replicate(settings: &Settings, plan: &Plan, pipeline: Pipeline, workers: usize, logs: &Path) -> Result<Outcome> {
    // Every entry of the run (the seed, the stream, collection creations) plus a margin for the
    // server's own, so no figure depends on how far the pipeline lags.
    let cap = settings.oplog_max_entries.unwrap_or((plan.docs + plan.events + plan.collections() + 10_000) as u64);
    let source = SecantusServer::start(SecantusOptions { oplog_max_entries: Some(cap), ..Default::default() }).await?;
    let target = SecantusServer::start(SecantusOptions::default()).await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    let run_start = source.cluster_time().await?;
    plan.seed(&src, None).await?;
    let servers = Servers::of(Some(&source), &target)?;
    // The Kafka pipeline's JVMs start before the snapshot's clock does.
    let kafka = match pipeline {
        Pipeline::Kafka => Some(std::sync::Arc::new(KafkaPipeline::start().await.context("cannot start the Kafka pipeline")?)),
        _ => None,
    };
    let endpoints = Endpoints { source: &source, target: &target, workers, batch: settings.batch, logs, kafka };

    // Snapshot: from the pipeline's start until the target holds the source's documents.
    // The JVMs' start-up is not the copy's: their CPU counts from here (a new process's from 0).
    let cpu_before = endpoints.kafka.as_deref().map_or(Ok(0.0), kafka_cpu_seconds)?;
    let (servers_before, started) = (servers.cpu()?, Instant::now());
    let mut running = pipeline.start_snapshot(&endpoints).await?;
    let done = complete(&mut plan.completion(Phase::Snapshot), &dst, &mut running, true, settings).await.context("snapshot")?;
    let cost = Cost::since(&mut running, cpu_before, servers_before, &servers, plan.docs)?;
    let snapshot = Figures { rate: plan.docs as f64 / (done - started).as_secs_f64(), lag: None, cost: Some(cost) };
    let peak = running.finish_snapshot().await.context("snapshot")?;
    let snapshot = snapshot.with_peak(peak);
    let verified = match (plan.workload, pipeline) {
        (Workload::Insert, Pipeline::Ours) => {
            Some(Box::new(verify(&source, &target, workers, settings.batch, plan.docs, snapshot.clone(), logs).await?))
        }
        _ => None,
    };

    // Stream: from the writer's start until the target holds the writer's final state.
    let from = next(source.cluster_time().await?);
    let mut running = pipeline.start_stream(&endpoints, from).await?;
    tokio::time::sleep(SETTLE).await;
    running.check(false).await.context("stream")?;
    let (cpu_before, servers_before, started) = (running.cpu_seconds()?, servers.cpu()?, Instant::now());
    let streamed = async {
        let last_write = write_while_running(plan, &src, &mut running, settings).await?;
        let done = complete(&mut plan.completion(Phase::Stream), &dst, &mut running, false, settings).await?;
        let cost = Cost::since(&mut running, cpu_before, servers_before, &servers, plan.events)?;
        anyhow::Ok(Figures {
            rate: plan.events as f64 / (done - started).as_secs_f64(),
            lag: Some((done - last_write).as_secs_f64()),
            cost: Some(cost),
        })
    }
    .await;

    // The whole run's history must still be on the source, or the figures are a lossy run's
    // (checked before a stream failure is reported: a lossy run never completes).
    if let Some(why) = history_lost(&source, run_start, cap).await? {
        return Ok(Outcome::Discarded(why));
    }
    let stream = streamed.context("stream")?;
    let peak = running.finish_stream().await.context("stream")?;
    Ok(Outcome::Measured { snapshot, stream: stream.with_peak(peak), verified })
}

/// The cluster time just after `ts`: a stream starting there misses nothing written later and
/// repeats nothing written before.
fn next(ts: Timestamp) -> Timestamp {
    Timestamp { time: ts.time, increment: ts.increment + 1 }
}

/// Runs the writer while checking that the pipeline keeps running; the instant of the last acknowledged write.
async fn write_while_running(plan: &Plan, source: &Client, running: &mut Running, settings: &Settings) -> Result<Instant> {
    let deadline = tokio::time::Instant::now() + settings.timeout;
    let writer = plan.stream(source);
    tokio::pin!(writer);
    loop {
        tokio::select! {
            last = &mut writer => return last.context("the writer failed"),
            _ = tokio::time::sleep(settings.poll) => {
                running.check(false).await?;
                if tokio::time::Instant::now() > deadline {
                    bail!("the writer did not finish within {:?}", settings.timeout);
                }
            }
        }
    }
}

/// Polls the target every `settings.poll` until it holds the expected state; the instant it did.
/// Fails when the pipeline fails (or, `may_end`, ends with the target short) or on timeout.
async fn complete(completion: &mut Completion<'_>, target: &Client, running: &mut Running, may_end: bool, settings: &Settings) -> Result<Instant> {
    let deadline = Instant::now() + settings.timeout;
    loop {
        // Checked before the poll: a pipeline that had ended writes no more.
        let ended = running.check(may_end).await?;
        let why = match completion.poll(target).await? {
            Poll::Reached(at) => return Ok(at),
            Poll::Short(why) if ended => bail!("the pipeline ended with the target incomplete: {why} ({})", running.describe()),
            Poll::Short(why) => why,
            Poll::Writing => "the target is still being written".to_string(),
        };
        if Instant::now() > deadline {
            bail!("timed out after {:?}: {why} ({})", settings.timeout, running.describe());
        }
        tokio::time::sleep(settings.poll).await;
    }
}

/// Why the source no longer holds the run's whole history, if it does not.
async fn history_lost(source: &SecantusServer, run_start: Timestamp, cap: u64) -> Result<Option<String>> {
    let oldest = source.oldest_retained().await?;
    if oldest.is_some_and(|oldest| oldest <= run_start) {
        return Ok(None);
    }
    let shown = |ts: Option<Timestamp>| ts.map_or("none".to_string(), |t| format!("{}.{}", t.time, t.increment));
    Ok(Some(format!(
        "the source pruned history written during the run (oldest retained change {}, run started at {}, oplog cap {cap})",
        shown(oldest),
        shown(Some(run_start))
    )))
}

/// `mongo-replicator verify` of the snapshot's copy, beside the snapshot's figures.
pub struct Verification {
    pub snapshot: Figures,
    pub verify: Figures,
}

/// Verifies `bench.*` with the replicator's settings (equal data expected).
async fn verify(
    source: &SecantusServer,
    target: &SecantusServer,
    workers: usize,
    batch: usize,
    docs: usize,
    snapshot: Figures,
    logs: &Path,
) -> Result<Verification> {
    let config = logs.join("verify.yaml");
    std::fs::write(
        &config,
        format!(
            "name: bench-verify\nsource: {{auth: connectionString, uriEnv: MREP_SOURCE_URI}}\ntarget: {{auth: connectionString, uriEnv: MREP_TARGET_URI}}\nnamespaces: {{include: ['{DATABASE}.*']}}\nmetricsAddress: null\n"
        ),
    )?;
    let mut args: Vec<String> = vec!["verify".into(), "--config".into(), config.display().to_string()];
    args.extend(["--output", "json", "--lag-allowance-seconds", "0", "--log-level", "warn"].map(String::from));
    args.extend(["--workers".into(), workers.to_string(), "--batch-size".into(), batch.to_string()]);
    args.extend(["--partition-documents".into(), partition_documents(docs, workers).to_string()]);
    let envs = [("MREP_SOURCE_URI", source.uri()), ("MREP_TARGET_URI", target.uri())];
    let servers = Servers::of(Some(source), target)?;
    let (servers_before, started) = (servers.cpu()?, Instant::now());
    let mut child = MeteredChild::spawn("mongo-replicator verify", &replicator_bin(), &args, &envs, &logs.join("verify.log"))?;
    let status = loop {
        match child.exit_status() {
            Some(status) => break status,
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let rate = docs as f64 / started.elapsed().as_secs_f64();
    let (source_after, target_after) = servers.cpu()?;
    let cost = Cost {
        units: docs,
        pipeline_cpu: child.cpu_seconds()?,
        source_cpu: source_after - servers_before.0,
        target_cpu: target_after - servers_before.1,
        peak_rss_mb: child.peak_rss_mb(),
    };
    let output = std::fs::read_to_string(child.log_path())?;
    let verdict: serde_json::Value = output
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok().filter(|v: &serde_json::Value| v.get("documentsCompared").is_some()))
        .with_context(|| format!("verify printed no verdict: {}", child.log_tail()))?;
    if !status.success() {
        bail!("verify found the snapshot's copy different ({status}): {verdict}");
    }
    let compared = verdict["documentsCompared"].as_u64().context("no documentsCompared in the verdict")?;
    if compared != docs as u64 {
        bail!("verify compared {compared} documents, not {docs}");
    }
    Ok(Verification { snapshot, verify: Figures { rate, lag: None, cost: Some(cost) } })
}

/// The directory a run's logs go to (removed after a run that succeeded).
fn logs_dir() -> PathBuf {
    std::env::temp_dir().join(format!("mrep-bench-{}", std::process::id()))
}
