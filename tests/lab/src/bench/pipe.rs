//! The driver pipe: the least any replicator must do with the same driver, run as its own process
//! (`mrep-bench pipe-copy|pipe-follow`) so its CPU and memory are measured like the replicator's.
//!
//! - copy: each collection scanned in natural order into `insert_many` batches, `workers` in flight;
//! - follow: a database change stream (`fullDocument: updateLookup`) into batched writes by `_id`
//!   per collection, with one lane per worker (a document always goes to the same lane, so its
//!   changes land in order) and each lane's batch reduced to the last change per document:
//!   `insert_many` for new documents, `update` commands of upserted replacements, `delete` commands.
//!   Raw BSON throughout; until SIGTERM.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{Document, RawArrayBuf, RawDocumentBuf, Timestamp, doc, rawdoc};
use mongodb::options::FullDocumentType;
use mongodb::{Client, Database};
use serde::Deserialize;

/// What the pipe connects and how hard it pushes.
pub struct PipeArgs {
    pub source_uri: String,
    pub target_uri: String,
    pub database: String,
    pub batch: usize,
    pub workers: usize,
    /// follow: the source cluster time the change stream starts at.
    pub start_at: Option<Timestamp>,
}

impl PipeArgs {
    /// The command-line form the child parses back with [`PipeArgs::parse`].
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--source-uri".into(),
            self.source_uri.clone(),
            "--target-uri".into(),
            self.target_uri.clone(),
            "--database".into(),
            self.database.clone(),
            "--batch-size".into(),
            self.batch.to_string(),
            "--workers".into(),
            self.workers.to_string(),
        ];
        if let Some(ts) = self.start_at {
            args.extend(["--start-at-cluster-time".into(), format!("{}.{}", ts.time, ts.increment)]);
        }
        args
    }

    pub fn parse(mut it: impl Iterator<Item = String>) -> Result<Self> {
        let mut args =
            PipeArgs { source_uri: String::new(), target_uri: String::new(), database: String::new(), batch: 1000, workers: 4, start_at: None };
        while let Some(flag) = it.next() {
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--source-uri" => args.source_uri = value,
                "--target-uri" => args.target_uri = value,
                "--database" => args.database = value,
                "--batch-size" => args.batch = value.parse()?,
                "--workers" => args.workers = value.parse()?,
                "--start-at-cluster-time" => {
                    let (time, increment) = value.split_once('.').context("--start-at-cluster-time takes <seconds>.<increment>")?;
                    args.start_at = Some(Timestamp { time: time.parse()?, increment: increment.parse()? });
                }
                _ => bail!("unknown pipe flag {flag}"),
            }
        }
        if args.source_uri.is_empty() || args.target_uri.is_empty() || args.database.is_empty() || args.workers == 0 || args.batch == 0 {
            bail!("the pipe needs --source-uri, --target-uri, --database and non-zero --workers and --batch-size");
        }
        Ok(args)
    }

    async fn databases(&self) -> Result<(Database, Database)> {
        let source = Client::with_uri_str(&self.source_uri).await?.database(&self.database);
        let target = Client::with_uri_str(&self.target_uri).await?.database(&self.database);
        Ok((source, target))
    }
}

/// Copies every collection of the database; the documents copied.
pub async fn copy(args: &PipeArgs) -> Result<u64> {
    let (source, target) = args.databases().await?;
    let mut names = source.list_collection_names().await?;
    names.sort();
    let batch = args.batch;
    let chunks = futures::stream::iter(names)
        .then(|name| {
            let source = source.clone();
            async move {
                let cursor = source.collection::<RawDocumentBuf>(&name).find(doc! {}).batch_size(batch as u32).await?;
                anyhow::Ok(cursor.chunks(batch).map(move |chunk| anyhow::Ok((name.clone(), chunk))))
            }
        })
        .try_flatten();
    chunks
        .map_ok(|(name, chunk)| {
            let target = target.clone();
            async move {
                let docs = chunk.into_iter().collect::<Result<Vec<_>, _>>()?;
                let n = docs.len() as u64;
                target.collection::<RawDocumentBuf>(&name).insert_many(docs).ordered(false).await?;
                anyhow::Ok(n)
            }
        })
        .try_buffer_unordered(args.workers)
        .try_fold(0, |total, n| async move { Ok(total + n) })
        .await
}

/// The fields of a change event the pipe uses.
#[derive(Deserialize)]
struct Event {
    #[serde(rename = "operationType")]
    operation: String,
    ns: Option<Namespace>,
    #[serde(rename = "documentKey")]
    key: Option<RawDocumentBuf>,
    #[serde(rename = "fullDocument")]
    document: Option<RawDocumentBuf>,
}

#[derive(Deserialize)]
struct Namespace {
    coll: Option<String>,
}

/// One document's change, as the target must apply it.
enum Change {
    Insert(RawDocumentBuf),
    Replace(RawDocumentBuf),
    Delete,
}

/// Changes for one lane: `(collection, documentKey, change)` in stream order.
type Batch = Vec<(String, RawDocumentBuf, Change)>;

/// Follows the database's change stream into the target until SIGTERM.
pub async fn follow(args: &PipeArgs) -> Result<()> {
    let (source, target) = args.databases().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn({
        let stop = stop.clone();
        async move {
            sigterm.recv().await;
            stop.store(true, Ordering::Relaxed);
        }
    });
    let mut stream = source
        .watch()
        .full_document(FullDocumentType::UpdateLookup)
        .start_at_operation_time(args.start_at.context("pipe-follow needs --start-at-cluster-time")?)
        .batch_size(args.batch as u32)
        .max_await_time(Duration::from_millis(100))
        .await?
        .with_type::<Event>();

    let (mut lanes, mut writers) = (Vec::new(), Vec::new());
    for _ in 0..args.workers {
        // One batch written and one waiting per lane: the reader stalls when the target cannot keep up.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(1);
        let target = target.clone();
        lanes.push(tx);
        writers.push(tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                apply(&target, batch).await?;
            }
            anyhow::Ok(())
        }));
    }
    let mut pending: Vec<Batch> = (0..args.workers).map(|_| Vec::new()).collect();
    let lane_failed = || anyhow::anyhow!("a writer lane stopped");
    while !stop.load(Ordering::Relaxed) {
        let Some(event) = stream.next_if_any().await? else {
            // Nothing more ready: write what has gathered.
            for (lane, batch) in lanes.iter().zip(pending.iter_mut()) {
                if !batch.is_empty() {
                    lane.send(std::mem::take(batch)).await.map_err(|_| lane_failed())?;
                }
            }
            continue;
        };
        let change = match (event.operation.as_str(), event.document) {
            ("insert", Some(doc)) => Change::Insert(doc),
            // A null lookup: the document is gone by now and its delete follows.
            ("update" | "replace", Some(doc)) => Change::Replace(doc),
            ("update" | "replace", None) => continue,
            ("delete", _) => Change::Delete,
            _ => continue,
        };
        let (Some(coll), Some(key)) = (event.ns.and_then(|ns| ns.coll), event.key) else {
            bail!("a {} event without a namespace or documentKey", event.operation);
        };
        let mut hasher = DefaultHasher::new();
        (coll.as_str(), key.as_bytes()).hash(&mut hasher);
        let lane = (hasher.finish() % args.workers as u64) as usize;
        pending[lane].push((coll, key, change));
        if pending[lane].len() >= args.batch {
            lanes[lane].send(std::mem::take(&mut pending[lane])).await.map_err(|_| lane_failed())?;
        }
    }
    drop(lanes);
    for writer in writers {
        writer.await??;
    }
    Ok(())
}

/// The last change of one document in a batch, and how many it had.
struct LastChange {
    changes: usize,
    key: RawDocumentBuf,
    change: Change,
}

/// Writes one lane's batch: the last change of each document, per collection.
async fn apply(target: &Database, batch: Batch) -> Result<()> {
    let mut by_collection: HashMap<String, HashMap<Vec<u8>, LastChange>> = HashMap::new();
    for (coll, key, change) in batch {
        let by_document = by_collection.entry(coll).or_default();
        let last = by_document.entry(key.as_bytes().to_vec()).or_insert(LastChange { changes: 0, key, change: Change::Delete });
        last.changes += 1;
        last.change = change;
    }
    for (coll, changes) in by_collection {
        let (mut inserts, mut upserts, mut deletes) = (Vec::new(), Vec::new(), Vec::new());
        for LastChange { changes, key, change } in changes.into_values() {
            match change {
                // A document inserted and nothing else in this batch is new to the target.
                Change::Insert(doc) if changes == 1 => inserts.push(doc),
                Change::Insert(doc) | Change::Replace(doc) => upserts.push(rawdoc! {"q": key, "u": doc, "upsert": true}),
                Change::Delete => deletes.push(rawdoc! {"q": key, "limit": 1}),
            }
        }
        if !inserts.is_empty() {
            target.collection::<RawDocumentBuf>(&coll).insert_many(inserts).ordered(false).await?;
        }
        for statements in by_size(upserts) {
            command(target, rawdoc! {"update": coll.as_str(), "updates": statements, "ordered": false}).await?;
        }
        for statements in by_size(deletes) {
            command(target, rawdoc! {"delete": coll.as_str(), "deletes": statements, "ordered": false}).await?;
        }
    }
    Ok(())
}

/// Statements in arrays that keep a command under the server's 16 MB document limit.
fn by_size(statements: Vec<RawDocumentBuf>) -> Vec<RawArrayBuf> {
    const LIMIT: usize = 8 * 1024 * 1024;
    let (mut arrays, mut array, mut bytes) = (Vec::new(), RawArrayBuf::new(), 0);
    for statement in statements {
        if bytes > 0 && bytes + statement.as_bytes().len() > LIMIT {
            arrays.push(std::mem::take(&mut array));
            bytes = 0;
        }
        bytes += statement.as_bytes().len();
        array.push(statement);
    }
    if bytes > 0 {
        arrays.push(array);
    }
    arrays
}

/// Runs a write command; its write errors are failures.
async fn command(target: &Database, command: RawDocumentBuf) -> Result<()> {
    let reply: Document = target.run_raw_command(command).await?;
    if let Ok(errors) = reply.get_array("writeErrors")
        && !errors.is_empty()
    {
        bail!("{} write errors, the first: {}", errors.len(), errors[0]);
    }
    Ok(())
}
