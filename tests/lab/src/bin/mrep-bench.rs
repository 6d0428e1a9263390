//! `mrep-bench`: the replicator's throughput against the lab's SecantusDB servers, measured in one
//! run beside the target's raw bulk-insert ceiling at the same batch size and writer count.
//!
//! For each worker count it prints: the ceiling (a Rust client inserting batches with that many
//! concurrent writers), snapshot documents/s, sustained streaming events/s while another process
//! writes the source as fast as it can, the replicator's CPU-seconds per 100k events, and the
//! ratios snapshot/ceiling and stream/ceiling, and beside them a *driver pipe*: the same driver
//! doing the least any replicator must do (a natural-order scan into `insert_many`; a change
//! stream whose inserts go out as `insert_many` batches), with as many batches in flight as the
//! replicator has workers — the ceiling of what driver and servers allow. A second table: `mongo-replicator verify` of the
//! snapshot's data (documents verified/s, its ratio to the snapshot's rate) and CPU-seconds per
//! 100k documents of the copying or verifying process, the source server and the target server,
//! for the snapshot and the verification of the same documents.
//!
//! The source's oplog is capped for what a run writes, and each run ends by checking that the
//! source still holds the run's whole history (its oldest retained change is not after the run's
//! start): SecantusDB's open change streams skip pruned entries silently (LAB-NOTES), so a figure
//! from a run that outran the oplog measures a replication that lost data. Such a figure is
//! discarded, loudly, and the benchmark exits non-zero.
//!
//! Usage: mrep-bench [--docs N] [--events N] [--batch-size N] [--workers 1,2,4,8] [--oplog-max-entries N]
//! (`--oplog-max-entries` overrides the cap, e.g. to see a lossy run discarded)
//! (build the replicator first: `cargo build --release`; MONGO_REPLICATOR_BIN overrides its path)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::future::try_join_all;
use mongo_replicator_lab::{SecantusOptions, SecantusServer};
use mongodb::Client;
use mongodb::bson::{Document, doc};

struct Args {
    docs: usize,
    events: usize,
    batch_size: usize,
    workers: Vec<usize>,
    oplog_max_entries: Option<u64>,
}

impl Args {
    /// The source's oplog cap: every entry of a run (the snapshot's documents, the stream's
    /// events) plus a margin for DDL and the server's own entries, so no figure depends on how
    /// far the replicator lags.
    fn oplog_cap(&self) -> u64 {
        // The driver pipe's stream writes the events a second time.
        self.oplog_max_entries.unwrap_or((self.docs + 2 * self.events) as u64 + 10_000)
    }
}

fn parse_args() -> Result<Args> {
    let mut args = Args { docs: 200_000, events: 200_000, batch_size: 1000, workers: vec![1, 2, 4, 8], oplog_max_entries: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--docs" => args.docs = value.parse()?,
            "--events" => args.events = value.parse()?,
            "--batch-size" => args.batch_size = value.parse()?,
            "--workers" => args.workers = value.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--oplog-max-entries" => args.oplog_max_entries = Some(value.parse()?),
            _ => bail!("unknown flag {flag}"),
        }
    }
    Ok(args)
}

fn replicator_bin() -> PathBuf {
    std::env::var_os("MONGO_REPLICATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release/mongo-replicator")))
}

/// A document of about 100 bytes, like the lab's measurements.
fn doc_of(i: usize) -> Document {
    doc! {"_id": i as i64, "name": format!("customer-{i:08}"), "balance": (i % 10_000) as f64 * 1.25, "tags": ["a", "b"], "active": i.is_multiple_of(3)}
}

/// `writers` tasks inserting `total` documents in batches; returns documents/s.
async fn bulk_insert(client: &Client, db: &str, total: usize, batch: usize, writers: usize, offset: usize) -> Result<f64> {
    let coll = client.database(db).collection::<Document>("bench");
    let started = Instant::now();
    let per_writer = total.div_ceil(writers);
    try_join_all((0..writers).map(|w| {
        let coll = coll.clone();
        async move {
            let start = offset + w * per_writer;
            let end = (start + per_writer).min(offset + total);
            let mut i = start;
            while i < end {
                let n = batch.min(end - i);
                coll.insert_many((i..i + n).map(doc_of)).ordered(false).await?;
                i += n;
            }
            anyhow::Ok(())
        }
    }))
    .await?;
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// User and system CPU seconds a process has used.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("odd /proc stat")?.1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

async fn count(client: &Client, db: &str) -> Result<u64> {
    Ok(client.database(db).collection::<Document>("bench").count_documents(doc! {}).await?)
}

struct Replicator(tokio::process::Child);

impl Replicator {
    fn start(source: &SecantusServer, target: &SecantusServer, mode: &str, workers: usize, batch: usize, name: &str, docs: usize) -> Result<Self> {
        let partition = partition_documents(docs, workers);
        let child = tokio::process::Command::new(replicator_bin())
            .args(["replicate", "--name", name, "--include", "bench.*", "--mode", mode, "--metrics-address", "none"])
            .args(["--partition-documents", &partition.to_string()])
            .args(["--workers", &workers.to_string(), "--batch-size", &batch.to_string(), "--log-level", "warn"])
            .env("MREP_SOURCE_URI", source.uri())
            .env("MREP_TARGET_URI", target.uri())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", replicator_bin().display()))?;
        Ok(Self(child))
    }

    fn pid(&self) -> u32 {
        self.0.id().unwrap_or_default()
    }
}

/// Waits until the target holds `expected` documents; fails early when the replicator exits
/// (e.g. with 5, history lost).
async fn wait_for_count(client: &Client, db: &str, expected: u64, timeout: Duration, replicator: Option<&mut Replicator>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut replicator = replicator;
    while count(client, db).await? < expected {
        if Instant::now() > deadline {
            bail!("target has {} of {expected} documents after {timeout:?}", count(client, db).await?);
        }
        if let Some(status) = replicator.as_mut().map(|r| r.0.try_wait()).transpose()?.flatten() {
            bail!("the replicator exited with {status} while the target has {} of {expected} documents", count(client, db).await?);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    if !replicator_bin().exists() {
        bail!("{} not found: run `cargo build --release` first", replicator_bin().display());
    }
    println!(
        "mrep-bench: {} snapshot docs, {} stream events, batch {} (~100 B documents); source, target, load and replicator share this machine's {} cores",
        args.docs,
        args.events,
        args.batch_size,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("source oplog capped at {} entries; a run whose source pruned its own history is discarded", args.oplog_cap());
    println!(
        "{:>7} {:>12} {:>12} {:>12} {:>14} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10}",
        "workers",
        "ceiling/s",
        "snapshot/s",
        "stream/s",
        "cpu-s/100k",
        "snap/ceil",
        "strm/ceil",
        "pipe snap/s",
        "pipe strm/s",
        "snap/pipe",
        "strm/pipe"
    );
    let mut discarded = Vec::new();
    let mut verifications = Vec::new();
    for &workers in &args.workers {
        let source = SecantusServer::start(SecantusOptions { oplog_max_entries: Some(args.oplog_cap()), ..Default::default() }).await?;
        let target = SecantusServer::start(SecantusOptions::default()).await?;
        let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
        let run_start = source.cluster_time().await?;

        // Ceiling: the target's raw bulk insert at the replicator's batch size and concurrency.
        let ceiling = bulk_insert(&dst, "ceiling", args.docs, args.batch_size, workers, 0).await?;
        dst.database("ceiling").drop().await?;

        // Snapshot.
        bulk_insert(&src, "bench", args.docs, args.batch_size, 4, 0).await?;
        let servers = Servers::of(&source, &target)?;
        let (children_before, servers_before) = (children_cpu_seconds(), servers.cpu()?);
        let started = Instant::now();
        let mut snap = Replicator::start(&source, &target, "snapshot-only", workers, args.batch_size, "bench-snapshot", args.docs)?;
        let status = snap.0.wait().await?;
        if !status.success() {
            bail!("snapshot replicator exited with {status}");
        }
        let snapshot_rate = args.docs as f64 / started.elapsed().as_secs_f64();
        let snapshot_cpu = Cpu::since(children_before, servers_before, &servers)?;
        wait_for_count(&dst, "bench", args.docs as u64, Duration::from_secs(5), None).await?;

        // Verification of the same documents, equal on both sides.
        let (children_before, servers_before) = (children_cpu_seconds(), servers.cpu()?);
        let started = Instant::now();
        let verified = verify(&source, &target, workers, args.batch_size, args.docs).await?;
        let verify_rate = args.docs as f64 / started.elapsed().as_secs_f64();
        let verify_cpu = Cpu::since(children_before, servers_before, &servers)?;
        if verified != args.docs as u64 {
            bail!("verify compared {verified} documents, not {}", args.docs);
        }
        verifications.push((workers, snapshot_rate, snapshot_cpu, verify_rate, verify_cpu));

        // Stream: a caught-up replicator follows a source written as fast as another process can.
        dst.database("bench").drop().await?;
        dst.database("mongo_replicator").drop().await?;
        src.database("bench").drop().await?;
        let mut stream = Replicator::start(&source, &target, "stream-only", workers, args.batch_size, "bench-stream", args.docs)?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu_before = cpu_seconds(stream.pid())?;
        let started = Instant::now();
        let load = tokio::spawn({
            let src = src.clone();
            let (events, batch) = (args.events, args.batch_size);
            async move { bulk_insert(&src, "bench", events, batch, 2, 10_000_000).await }
        });
        let streamed = wait_for_count(&dst, "bench", args.events as u64, Duration::from_secs(600), Some(&mut stream)).await;
        let stream_rate = args.events as f64 / started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(stream.pid()).unwrap_or(f64::NAN) - cpu_before;
        load.await??;
        drop(stream);

        // The whole run's history must still be on the source, or the figures are a lossy run's.
        let oldest = source.oldest_retained().await?;
        if oldest.is_none_or(|oldest| oldest > run_start) {
            let shown = |ts: Option<mongodb::bson::Timestamp>| ts.map_or("none".to_string(), |t| format!("{}.{}", t.time, t.increment));
            eprintln!(
                "\n!!! DISCARDED ({workers} workers): the source pruned history written during the run (oldest retained change {}, run started at {}.{}, oplog cap {}); its figures measure a replication that lost changes. Raise --oplog-max-entries.\n",
                shown(oldest),
                run_start.time,
                run_start.increment,
                args.oplog_cap()
            );
            println!("{workers:>7} {:>12} (discarded: the source's oplog did not hold the whole run)", "-");
            discarded.push(workers);
            continue;
        }
        streamed?;

        // The driver pipe, on the same servers: a copy of what the stream phase wrote, then a stream.
        dst.database("bench").drop().await?;
        let pipe_snapshot = pipe_copy(&src, &dst, args.batch_size, workers).await?;
        dst.database("bench").drop().await?;
        src.database("bench").drop().await?;
        let pipe_stream = pipe_follow(&src, &dst, args.events, args.batch_size, workers).await?;

        println!(
            "{:>7} {:>12.0} {:>12.0} {:>12.0} {:>14.2} {:>10.2} {:>10.2} {:>12.0} {:>12.0} {:>10.2} {:>10.2}",
            workers,
            ceiling,
            snapshot_rate,
            stream_rate,
            cpu / args.events as f64 * 100_000.0,
            snapshot_rate / ceiling,
            stream_rate / ceiling,
            pipe_snapshot,
            pipe_stream,
            snapshot_rate / pipe_snapshot,
            stream_rate / pipe_stream
        );
    }
    println!(
        "\nverify of the snapshot's {} documents (equal data), CPU-seconds per 100k documents of the copying/verifying process, source and target servers:",
        args.docs
    );
    println!("{:>7} {:>12} {:>12} {:>10} {:>22} {:>22}", "workers", "snapshot/s", "verify/s", "vrfy/snap", "snapshot cpu p/s/t", "verify cpu p/s/t");
    for (workers, snapshot_rate, snapshot_cpu, verify_rate, verify_cpu) in verifications {
        let per = |c: &Cpu| {
            format!("{:.2}/{:.2}/{:.2}", c.process * 1e5 / args.docs as f64, c.source * 1e5 / args.docs as f64, c.target * 1e5 / args.docs as f64)
        };
        println!(
            "{:>7} {:>12.0} {:>12.0} {:>10.2} {:>22} {:>22}",
            workers,
            snapshot_rate,
            verify_rate,
            verify_rate / snapshot_rate,
            per(&snapshot_cpu),
            per(&verify_cpu)
        );
    }
    if !discarded.is_empty() {
        bail!("figures discarded for {discarded:?} workers: the source's oplog did not hold the whole run");
    }
    Ok(())
}

/// Driver pipe, copy: `bench.bench` scanned in natural order, `writers` `insert_many` batches in
/// flight; documents/s.
async fn pipe_copy(src: &Client, dst: &Client, batch: usize, writers: usize) -> Result<f64> {
    use futures::{StreamExt, TryStreamExt};
    let source = src.database("bench").collection::<mongodb::bson::RawDocumentBuf>("bench");
    let target = dst.database("bench").collection::<mongodb::bson::RawDocumentBuf>("bench");
    let started = Instant::now();
    let cursor = source.find(doc! {}).batch_size(batch as u32).await?;
    let copied: usize = cursor
        .chunks(batch)
        .map(|chunk| {
            let target = target.clone();
            async move {
                let docs = chunk.into_iter().collect::<Result<Vec<_>, _>>()?;
                let n = docs.len();
                target.insert_many(docs).ordered(false).await?;
                anyhow::Ok(n)
            }
        })
        .buffer_unordered(writers)
        .try_fold(0, |total, n| async move { Ok(total + n) })
        .await?;
    Ok(copied as f64 / started.elapsed().as_secs_f64())
}

/// Driver pipe, stream: a change stream on `bench` while another task inserts `events`
/// documents as fast as it can; each run of inserts the stream has ready goes out as one
/// `insert_many` (at most `batch`, `writers` in flight). Events/s until the target holds them all.
async fn pipe_follow(src: &Client, dst: &Client, events: usize, batch: usize, writers: usize) -> Result<f64> {
    use mongodb::change_stream::event::OperationType;
    let target = dst.database("bench").collection::<Document>("bench");
    let mut stream = src.database("bench").watch().max_await_time(Duration::from_millis(100)).await?;
    let started = Instant::now();
    let load = tokio::spawn({
        let src = src.clone();
        async move { bulk_insert(&src, "bench", events, batch, 2, 20_000_000).await }
    });
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(writers));
    let mut writes = Vec::new();
    let (mut seen, mut pending) = (0, Vec::with_capacity(batch));
    while seen < events {
        match stream.next_if_any().await? {
            Some(event) if event.operation_type == OperationType::Insert => {
                pending.extend(event.full_document);
                seen += 1;
                if pending.len() < batch {
                    continue;
                }
            }
            Some(_) => continue,
            None if pending.is_empty() => continue,
            None => {}
        }
        let docs = std::mem::replace(&mut pending, Vec::with_capacity(batch));
        let (target, permit) = (target.clone(), in_flight.clone().acquire_owned().await?);
        writes.push(tokio::spawn(async move {
            let _permit = permit;
            target.insert_many(docs).ordered(false).await.map(drop)
        }));
    }
    if !pending.is_empty() {
        target.insert_many(pending).ordered(false).await?;
    }
    for write in writes {
        write.await??;
    }
    let rate = events as f64 / started.elapsed().as_secs_f64();
    load.await??;
    Ok(rate)
}

/// CPU-seconds of the SecantusDB servers of a run.
struct Servers {
    source: u32,
    target: u32,
}

impl Servers {
    fn of(source: &SecantusServer, target: &SecantusServer) -> Result<Self> {
        Ok(Self { source: source.pid().context("the source is not running")?, target: target.pid().context("the target is not running")? })
    }

    fn cpu(&self) -> Result<(f64, f64)> {
        Ok((cpu_seconds(self.source)?, cpu_seconds(self.target)?))
    }
}

/// CPU-seconds one phase cost: the process that ran it (a waited-for child), the source, the target.
struct Cpu {
    process: f64,
    source: f64,
    target: f64,
}

impl Cpu {
    fn since(children_before: f64, servers_before: (f64, f64), servers: &Servers) -> Result<Self> {
        let (source, target) = servers.cpu()?;
        Ok(Self { process: children_cpu_seconds() - children_before, source: source - servers_before.0, target: target - servers_before.1 })
    }
}

/// Two `_id` ranges per worker, so copying and verifying use as many writers as the ceiling.
fn partition_documents(docs: usize, workers: usize) -> usize {
    (docs / (workers * 2)).max(1)
}

/// User and system CPU seconds of every child this process has waited for.
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// `mongo-replicator verify` of `bench.*` with the replicator's settings; the documents it compared.
async fn verify(source: &SecantusServer, target: &SecantusServer, workers: usize, batch: usize, docs: usize) -> Result<u64> {
    let dir = std::env::temp_dir().join(format!("mrep-bench-verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("replicator.yaml");
    std::fs::write(
        &config,
        "name: bench-verify\nsource: {auth: connectionString, uriEnv: MREP_SOURCE_URI}\ntarget: {auth: connectionString, uriEnv: MREP_TARGET_URI}\nnamespaces: {include: ['bench.*']}\nmetricsAddress: null\n",
    )?;
    let partition = partition_documents(docs, workers);
    let out = verify_command(&config)
        .args(["--workers", &workers.to_string(), "--batch-size", &batch.to_string(), "--partition-documents", &partition.to_string()])
        .env("MREP_SOURCE_URI", source.uri())
        .env("MREP_TARGET_URI", target.uri())
        .output()
        .await?;
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verdict: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).with_context(|| format!("verify printed no verdict: {stdout}"))?;
    if !out.status.success() {
        bail!("verify found the snapshot's copy different ({}): {verdict}", out.status);
    }
    verdict["documentsCompared"].as_u64().context("no documentsCompared in the verdict")
}

fn verify_command(config: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(replicator_bin());
    cmd.args(["verify", "--config"]).arg(config).args(["--output", "json", "--lag-allowance-seconds", "0", "--log-level", "warn"]).kill_on_drop(true);
    cmd
}
