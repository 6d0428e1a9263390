//! `mrep-bench`: one table of workloads × pipelines against the lab's SecantusDB servers, each
//! measured in one run on fresh servers of the same kind with the same documents, writer and
//! completion poll (`mongo_replicator_lab::bench`).
//!
//! Workloads (`--workloads`, all by default): `insert` (~100 B documents; the stream inserts new
//! ones), `update` (the stream `$set`s a round marker on every document once per round, in a
//! random order; `fullDocument: updateLookup` reads the source per event), `mixed` (50 % inserts,
//! 30 % updates, 20 % deletes of distinct documents), `large` (16 KB documents, `--docs/10` and
//! `--events/10` of them), `many` (1,000 collections). Each seeds the source with `--docs`
//! documents (snapshot), then two writer tasks write `--events` changes as fast as they can (stream).
//!
//! Pipelines (`--pipelines`, default all four), one row per phase:
//! - `ours`: `mongo-replicator replicate`, a snapshot-only run, then a stream-only run from the
//!   source's cluster time after the copy;
//! - `pipe`: the driver pipe, the least any replicator must do with the same driver, in a child
//!   process (`mrep-bench pipe-copy`, `mrep-bench pipe-follow`): a natural-order scan into
//!   `insert_many`; a change stream into batched writes by `_id` (`insert_many`, `update` with
//!   upserted replacements, `delete`), `--workers` batches in flight;
//! - `ceiling`: the target alone bulk-inserting the workload's documents with `--workers` writers
//!   (insert-only workloads; rate only);
//! - `kafka`: MongoDB's Kafka connector CDC pipeline (`mongo-kafka-connect` source copying the
//!   existing data, then streaming → a KRaft broker → sink with the `ChangeStreamHandler`, raw
//!   BSON through the `ByteArrayConverter`), jars from Maven (`tests/lab/scripts/install-kafka.sh`);
//!   CPU and peak RSS are the broker's and the Connect worker's JVMs together.
//!
//! Columns: rate (documents or events per second, from the pipeline's start — the writer's for a
//! stream — until the target holds exactly the expected state), lag (stream: seconds from the
//! writer's last acknowledged write to that moment), CPU-seconds per 100k documents or events of
//! the pipeline's process, the source server and the target server, the pipeline's peak RSS
//! (`ru_maxrss` of the reaped child; VmHWM of the JVMs), and `ours÷this`, ours' rate over the row's. Then a verify
//! table: `mongo-replicator verify` of the insert workload's snapshot copy.
//!
//! The source's oplog is capped for what a run writes, and each run ends by checking that the
//! source still holds the run's whole history: SecantusDB's open change streams skip pruned
//! entries silently (LAB-NOTES), so a figure from a run that outran the oplog measures a
//! replication that lost data. Such a run is discarded, loudly, and the benchmark exits non-zero.
//! A pipeline that fails or a phase that times out fails the benchmark.
//!
//! Usage: mrep-bench [--docs N] [--events N] [--batch-size N] [--workers 4[,8..]]
//!   [--workloads insert,update,mixed,large,many] [--pipelines ours,pipe,ceiling,kafka]
//!   [--poll-ms N] [--timeout-seconds N] [--oplog-max-entries N]
//! (`--oplog-max-entries` overrides the cap, e.g. to see a lossy run discarded; build the
//! replicator first: `cargo build --release`; MONGO_REPLICATOR_BIN overrides its path)

use std::time::Duration;

use anyhow::{Context, Result, bail};
use mongo_replicator_lab::bench::pipe::{self, PipeArgs};
use mongo_replicator_lab::bench::pipeline::Pipeline;
use mongo_replicator_lab::bench::workload::Workload;
use mongo_replicator_lab::bench::{self, Settings};

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Settings> {
    let mut settings = Settings {
        docs: 100_000,
        events: 100_000,
        batch: 1000,
        workers: vec![4],
        workloads: Workload::ALL.to_vec(),
        pipelines: Pipeline::ALL.to_vec(),
        oplog_max_entries: None,
        poll: Duration::from_millis(50),
        timeout: Duration::from_secs(600),
    };
    let list = |value: &str| value.split(',').map(str::to_string).collect::<Vec<_>>();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--docs" => settings.docs = value.parse()?,
            "--events" => settings.events = value.parse()?,
            "--batch-size" => settings.batch = value.parse()?,
            "--workers" => settings.workers = list(&value).iter().map(|w| w.parse()).collect::<Result<_, _>>()?,
            "--workloads" => settings.workloads = list(&value).iter().map(|w| Workload::parse(w)).collect::<Result<_>>()?,
            "--pipelines" => settings.pipelines = list(&value).iter().map(|p| Pipeline::parse(p)).collect::<Result<_>>()?,
            "--poll-ms" => settings.poll = Duration::from_millis(value.parse()?),
            "--timeout-seconds" => settings.timeout = Duration::from_secs(value.parse()?),
            "--oplog-max-entries" => settings.oplog_max_entries = Some(value.parse()?),
            _ => bail!("unknown flag {flag}"),
        }
    }
    if settings.batch == 0 || settings.workers.contains(&0) {
        bail!("--batch-size and --workers must be positive");
    }
    // Ours first: the other rows are compared with it.
    settings.pipelines.sort_by_key(|p| *p != Pipeline::Ours);
    settings.pipelines.dedup();
    Ok(settings)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    match args.peek().map(String::as_str) {
        Some("pipe-copy") => pipe::copy(&PipeArgs::parse(args.skip(1))?).await.map(drop),
        Some("pipe-follow") => pipe::follow(&PipeArgs::parse(args.skip(1))?).await,
        _ => bench::run(&parse_args(args)?).await,
    }
}
