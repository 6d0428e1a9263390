//! The snapshot: copies the included collections, recording progress after every batch so a
//! restart continues where it stopped.
//!
//! Each collection is read with one cursor in `_id` order, the cheapest read a source serves (a
//! range query costs the source about twice a plain scan of the same documents, and finding range
//! bounds by skipping costs a scan again; README, benchmark), while up to `workers` batches are
//! written at once: the writes, not the read, bound a copy. Collections larger than
//! `partitionDocuments` (off by default) are split into `_id` ranges read in parallel, for
//! sources where one cursor cannot keep the writers busy.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{Bson, Document, RawDocumentBuf, doc};
use mongodb::options::FindOptions;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::checkpoint::{RangeId, RangeProgress};
use super::classify::{describe, is_transient};
use super::context::Context;
use super::namespace::Namespace;
use super::sink::{Sink, SinkError};
use crate::reason::Reason;
use crate::retry::{Decision, Failure, Policy, retry};

/// A range whose read or write failed transiently is resumed from its saved progress.
const RANGE_RETRY: Policy = Policy::unbounded(Duration::from_millis(100), Duration::from_secs(10));

/// Why the snapshot stopped.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read {ns} from the source: {}", describe(source))]
    Read {
        ns: String,
        #[source]
        source: mongodb::error::Error,
    },
    #[error("cannot list the source's {what}: {}", describe(source))]
    List {
        what: String,
        #[source]
        source: mongodb::error::Error,
    },
    #[error("cannot record snapshot progress in the target: {}", describe(.0))]
    Progress(#[source] mongodb::error::Error),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("snapshot stopped by shutdown")]
    Cancelled,
}

impl SnapshotError {
    pub fn reason(&self) -> Reason {
        match self {
            SnapshotError::Read { .. } => Reason::SourceReadFailed,
            SnapshotError::List { .. } => Reason::SourceListFailed,
            SnapshotError::Progress(_) => Reason::CheckpointWriteFailed,
            SnapshotError::Sink(e) => e.reason(),
            SnapshotError::Cancelled => Reason::Cancelled,
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            SnapshotError::Read { source, .. } | SnapshotError::List { source, .. } | SnapshotError::Progress(source) => is_transient(source),
            SnapshotError::Sink(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// Copies collections from the source into the target.
#[derive(Clone)]
pub struct Copier {
    ctx: Arc<Context>,
    /// Documents copied by this process, for the progress line.
    copied: Arc<AtomicU64>,
    /// One permit per worker: the batches being written at once, over every cursor.
    writers: Arc<Semaphore>,
}

/// An included source collection and its creation options.
#[derive(Clone, Debug)]
pub struct SourceCollection {
    pub ns: Namespace,
    pub options: Document,
}

impl Copier {
    pub fn new(ctx: Arc<Context>) -> Self {
        let writers = Arc::new(Semaphore::new(ctx.settings.workers.max(1)));
        Self { ctx, copied: Arc::default(), writers }
    }

    /// The included collections of the source (views and system collections are left out).
    pub async fn included_collections(&self) -> Result<Vec<SourceCollection>, SnapshotError> {
        let list_err = |what: &str| {
            let what = what.to_string();
            move |source| SnapshotError::List { what: what.clone(), source }
        };
        let mut out = Vec::new();
        let dbs = self.ctx.source.list_database_names().await.map_err(list_err("databases"))?;
        for db in dbs.into_iter().filter(|db| self.ctx.map.may_include_database(db)) {
            let specs: Vec<Document> = self
                .ctx
                .source
                .database(&db)
                .run_cursor_command(doc! {"listCollections": 1, "filter": {"type": "collection"}})
                .await
                .map_err(list_err(&format!("collections of {db}")))?
                .try_collect()
                .await
                .map_err(list_err(&format!("collections of {db}")))?;
            for spec in specs {
                let Ok(name) = spec.get_str("name") else { continue };
                let ns = Namespace::new(db.clone(), name);
                if self.ctx.map.includes(&ns) {
                    let options = spec.get_document("options").cloned().unwrap_or_default();
                    out.push(SourceCollection { ns, options });
                }
            }
        }
        out.sort_by(|a, b| a.ns.cmp(&b.ns));
        Ok(out)
    }

    /// Copies every included collection; finished ranges are skipped. Returns the documents copied.
    pub async fn copy_all(&self) -> Result<u64, SnapshotError> {
        let collections = self.included_collections().await?;
        let workers = self.ctx.settings.workers.max(1);
        // Collections are prepared, copied and indexed `workers` at a time: with many small
        // collections the round trips of each, not its documents, take the time.
        let mut saved = self.ctx.store.all_ranges().await.map_err(SnapshotError::Progress)?;
        let with_saved: Vec<_> = collections.iter().map(|c| (c, saved.remove(&c.ns.to_string()).unwrap_or_default())).collect();
        let planned: Vec<Result<Vec<RangeProgress>, SnapshotError>> = futures::stream::iter(with_saved)
            .map(|(collection, saved)| async move {
                self.create_collection(&self.ctx.map.target(&collection.ns), &collection.options).await?;
                self.plan(&collection.ns, saved).await
            })
            .buffered(workers)
            .collect()
            .await;
        let mut ranges = Vec::new();
        for (collection, plan) in collections.iter().zip(planned) {
            let target = self.ctx.map.target(&collection.ns);
            ranges.extend(plan?.into_iter().filter(|range| !range.done).map(|range| (collection.ns.clone(), target.clone(), range)));
        }
        tracing::info!(collections = collections.len(), ranges = ranges.len(), "snapshot: copying");
        let progress = self.progress_line(collections.len());
        let results: Vec<Result<u64, SnapshotError>> = futures::stream::iter(ranges)
            .map(|(source, target, range)| self.copy_range(source, target, range))
            .buffer_unordered(workers)
            .collect()
            .await;
        progress.cancel();
        let mut total = 0;
        for result in results {
            total += result?;
        }
        // Indexes after the data: building them once is faster than maintaining them per insert.
        futures::stream::iter(&collections)
            .map(|collection| self.copy_indexes(&collection.ns, self.ctx.map.target(&collection.ns)))
            .buffer_unordered(workers)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(total)
    }

    /// Copies one collection afresh (a collection renamed into the replicated set mid-stream).
    pub async fn copy_collection(&self, source: &Namespace, target: &Namespace) -> Result<u64, SnapshotError> {
        self.ctx.store.forget_ranges(&[source.to_string()]).await.map_err(SnapshotError::Progress)?;
        self.create_collection(target, &Document::new()).await?;
        let mut total = 0;
        for range in self.plan(source, Vec::new()).await? {
            total += self.copy_range(source.clone(), target.clone(), range).await?;
        }
        self.copy_indexes(source, target.clone()).await?;
        Ok(total)
    }

    async fn create_collection(&self, target: &Namespace, options: &Document) -> Result<(), SnapshotError> {
        let ddl = super::event::Ddl::CreateCollection { ns: target.clone(), options: options.clone() };
        Ok(self.ctx.sink.apply_ddl(&ddl).await?)
    }

    async fn copy_indexes(&self, source: &Namespace, target: Namespace) -> Result<(), SnapshotError> {
        let indexes = Sink::list_indexes(&self.ctx.source, source)
            .await
            .map_err(|e| SnapshotError::List { what: format!("indexes of {source}"), source: e })?;
        Ok(self.ctx.sink.create_indexes(&target, indexes).await?)
    }

    /// The ranges of a collection: the `saved` plan when it is complete, else a new one. With
    /// `partitionDocuments` set, large collections whose `_id`s are all of one kind are split at
    /// `_id`s found by skipping. A plan of one range is not saved until it has progress: planned
    /// again, it is the same.
    async fn plan(&self, ns: &Namespace, saved: Vec<RangeProgress>) -> Result<Vec<RangeProgress>, SnapshotError> {
        let key = ns.to_string();
        if is_complete_plan(&saved) {
            return Ok(saved);
        }
        let mut bounds: Vec<Bson> = Vec::new();
        let partition = self.ctx.settings.partition_documents;
        let count = if partition > 0 { self.estimated_count(ns).await? } else { 0 };
        if partition > 0 && count > partition {
            let parts = count.div_ceil(partition).min(self.ctx.settings.workers as u64 * 4);
            let step = count / parts;
            let first = self.id_at(ns, 0).await?;
            let last = self.id_at_end(ns).await?;
            if let (Some(first), Some(last)) = (&first, &last)
                && type_rank(first) == type_rank(last)
            {
                for i in 1..parts {
                    if let Some(id) = self.id_at(ns, i * step).await?
                        && bounds.last().is_none_or(|b| b != &id)
                    {
                        bounds.push(id);
                    }
                }
            }
        }
        let mut ranges = Vec::new();
        let mut lower = None;
        for (i, upper) in bounds.into_iter().map(Some).chain(std::iter::once(None)).enumerate() {
            let range = RangeProgress {
                id: RangeId { replication: self.ctx.store.name().to_string(), ns: key.clone(), range: i as u32 },
                lower: lower.clone(),
                upper: upper.clone(),
                last_id: None,
                copied: 0,
                done: false,
            };
            ranges.push(range);
            lower = upper;
        }
        if ranges.len() > 1 {
            for range in &ranges {
                self.ctx.store.save_range(range).await.map_err(SnapshotError::Progress)?;
            }
        }
        Ok(ranges)
    }

    async fn estimated_count(&self, ns: &Namespace) -> Result<u64, SnapshotError> {
        let coll = self.ctx.source.database(&ns.db).collection::<Document>(&ns.coll);
        coll.estimated_document_count().await.map_err(|source| SnapshotError::Read { ns: ns.to_string(), source })
    }

    async fn id_at(&self, ns: &Namespace, skip: u64) -> Result<Option<Bson>, SnapshotError> {
        self.edge_id(ns, doc! {"_id": 1}, skip).await
    }

    async fn id_at_end(&self, ns: &Namespace) -> Result<Option<Bson>, SnapshotError> {
        self.edge_id(ns, doc! {"_id": -1}, 0).await
    }

    async fn edge_id(&self, ns: &Namespace, sort: Document, skip: u64) -> Result<Option<Bson>, SnapshotError> {
        let coll = self.ctx.source.database(&ns.db).collection::<Document>(&ns.coll);
        let doc = coll
            .find_one(doc! {})
            .sort(sort)
            .skip(skip)
            .projection(doc! {"_id": 1})
            .await
            .map_err(|source| SnapshotError::Read { ns: ns.to_string(), source })?;
        Ok(doc.and_then(|d| d.get("_id").cloned()))
    }

    /// Copies one range, resuming after its last copied `_id`; transient read or write failures
    /// restart the range from its saved progress.
    async fn copy_range(&self, source: Namespace, target: Namespace, range: RangeProgress) -> Result<u64, SnapshotError> {
        let range = &tokio::sync::Mutex::new(range);
        let total = &AtomicU64::new(0);
        let (source, target) = (&source, &target);
        let attempt = || async move {
            let mut range = range.lock().await;
            let (copied, result) = match self.copy_range_once(source, target, &mut range).await {
                Ok(n) => (n, Ok(())),
                Err((n, err)) => (n, Err(err)),
            };
            total.fetch_add(copied, Ordering::Relaxed);
            result
        };
        let on_retry = |err: &SnapshotError, wait: Duration, _| {
            self.ctx.metrics.retry("read");
            tracing::warn!(ns = %source, error = %err, retry_in = ?wait, "snapshot: transient failure; resuming the range");
        };
        let decide = |err: &SnapshotError| Decision::retry_if(err.is_transient());
        match retry(&RANGE_RETRY, &self.ctx.cancel, attempt, decide, on_retry).await {
            Ok(()) => Ok(total.load(Ordering::Relaxed)),
            Err(Failure::Cancelled { .. }) => Err(SnapshotError::Cancelled),
            Err(failure) => Err(failure.into_error()),
        }
    }

    async fn copy_range_once(&self, source: &Namespace, target: &Namespace, range: &mut RangeProgress) -> Result<u64, (u64, SnapshotError)> {
        let coll = self.ctx.source.database(&source.db).collection::<RawDocumentBuf>(&source.coll);
        let filter = range_filter(range.lower.as_ref(), range.upper.as_ref(), range.last_id.as_ref());
        let read_err = |source_err| SnapshotError::Read { ns: source.to_string(), source: source_err };
        let options = FindOptions::builder().sort(doc! {"_id": 1}).batch_size(self.ctx.settings.batch_size as u32).build();
        let mut cursor = coll.find(filter).with_options(options).await.map_err(|e| (0, read_err(e)))?;
        let mut copied = 0;
        let mut batch = Vec::with_capacity(self.ctx.settings.batch_size);
        // Batches are written while the next ones are read, as many at once as there are
        // workers; progress advances over the written prefix, so it never passes an unwritten batch.
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        loop {
            if self.ctx.cancel.is_cancelled() {
                return Err((copied, SnapshotError::Cancelled));
            }
            let next = cursor.try_next().await.map_err(|e| (copied, read_err(e)))?;
            let end = next.is_none();
            if let Some(doc) = next {
                batch.push(doc);
            }
            if batch.len() >= self.ctx.settings.batch_size || (end && !batch.is_empty()) {
                while in_flight.len() >= self.ctx.settings.workers.max(1)
                    && let Some(oldest) = in_flight.pop_front()
                {
                    copied += self.finish(oldest, range, true).await.map_err(|e| (copied, e))?;
                }
                let docs = std::mem::take(&mut batch);
                let (sink, target) = (self.ctx.sink.clone(), target.clone());
                let permit = self.writers.clone().acquire_owned().await.map_err(|_| (copied, SnapshotError::Cancelled))?;
                in_flight.push_back(InFlight {
                    last_id: docs.last().and_then(raw_id),
                    count: docs.len() as u64,
                    write: tokio::spawn(async move {
                        let _permit = permit;
                        sink.insert_copied(&target, docs).await
                    }),
                });
            }
            if end {
                // The range's end is recorded once, with everything: a small collection costs
                // the target one progress write.
                while let Some(oldest) = in_flight.pop_front() {
                    copied += self.finish(oldest, range, false).await.map_err(|e| (copied, e))?;
                }
                range.done = true;
                self.ctx.store.save_range(range).await.map_err(|e| (copied, SnapshotError::Progress(e)))?;
                return Ok(copied);
            }
        }
    }

    /// Waits for a batch's write, then records it in the range's progress (saved when `save`).
    async fn finish(&self, batch: InFlight, range: &mut RangeProgress, save: bool) -> Result<u64, SnapshotError> {
        match batch.write.await {
            Ok(result) => result?,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
        range.last_id = batch.last_id;
        range.copied += batch.count as i64;
        if save {
            self.ctx.store.save_range(range).await.map_err(SnapshotError::Progress)?;
        }
        self.ctx.metrics.documents_copied(batch.count);
        self.copied.fetch_add(batch.count, Ordering::Relaxed);
        Ok(batch.count)
    }

    /// On a terminal, a live line with the documents copied and the rate.
    fn progress_line(&self, collections: usize) -> CancellationToken {
        let stop = CancellationToken::new();
        if !std::io::stderr().is_terminal() {
            return stop;
        }
        let copied = self.copied.clone();
        let token = stop.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = token.cancelled() => { eprintln!(); return; }
                }
                let n = copied.load(Ordering::Relaxed);
                let rate = n as f64 / started.elapsed().as_secs_f64().max(0.001);
                eprint!("\rsnapshot: {n} documents copied from {collections} collections ({rate:.0}/s)   ");
            }
        });
        stop
    }
}

/// The `_id` of a raw document.
fn raw_id(doc: &RawDocumentBuf) -> Option<Bson> {
    doc.get("_id").ok().flatten().and_then(|id| Bson::try_from(id).ok())
}

/// A batch of copied documents being written.
struct InFlight {
    last_id: Option<Bson>,
    count: u64,
    write: tokio::task::JoinHandle<Result<(), SinkError>>,
}

/// A saved plan is usable when its ranges cover all `_id`s: the first starts at the beginning,
/// each starts where the previous ends, and the last runs to the end.
fn is_complete_plan(ranges: &[RangeProgress]) -> bool {
    let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else {
        return false;
    };
    first.lower.is_none()
        && last.upper.is_none()
        && ranges.windows(2).all(|w| w[0].upper.is_some() && w[0].upper == w[1].lower)
        && ranges.iter().enumerate().all(|(i, r)| r.id.range as usize == i)
}

/// MongoDB's order of BSON types (numbers compare with each other, as do strings and symbols).
pub fn type_rank(value: &Bson) -> u8 {
    match value {
        Bson::MinKey => 0,
        Bson::Null | Bson::Undefined => 1,
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => 2,
        Bson::String(_) | Bson::Symbol(_) => 3,
        Bson::Document(_) => 4,
        Bson::Array(_) => 5,
        Bson::Binary(_) => 6,
        Bson::ObjectId(_) => 7,
        Bson::Boolean(_) => 8,
        Bson::DateTime(_) => 9,
        Bson::Timestamp(_) => 10,
        Bson::RegularExpression(_) => 11,
        Bson::MaxKey => 13,
        _ => 12,
    }
}

/// `$type` names of the types that sort after the given rank.
fn types_after(rank: u8) -> Vec<&'static str> {
    const BY_RANK: &[(u8, &[&str])] = &[
        (1, &["null", "undefined"]),
        (2, &["int", "long", "double", "decimal"]),
        (3, &["string", "symbol"]),
        (4, &["object"]),
        (6, &["binData"]),
        (7, &["objectId"]),
        (8, &["bool"]),
        (9, &["date"]),
        (10, &["timestamp"]),
        (11, &["regex"]),
        (12, &["dbPointer", "javascript", "javascriptWithScope"]),
        (13, &["maxKey"]),
    ];
    BY_RANK.iter().filter(|(r, _)| *r > rank).flat_map(|(_, names)| names.iter().copied()).collect()
}

/// The filter of a range `[lower, upper)` resumed after `last`. Range queries only match values
/// of the bound's own type, so a resumed whole-collection range also asks for every later type.
pub fn range_filter(lower: Option<&Bson>, upper: Option<&Bson>, last: Option<&Bson>) -> Document {
    let mut id = Document::new();
    match (last, lower) {
        (Some(last), _) => {
            id.insert("$gt", last.clone());
        }
        (None, Some(lower)) => {
            id.insert("$gte", lower.clone());
        }
        (None, None) => {}
    }
    if let Some(upper) = upper {
        id.insert("$lt", upper.clone());
    }
    // An open-ended range also takes every type that sorts after its anchor's.
    match (last.or(lower), upper) {
        (None, None) => doc! {},
        (Some(anchor), None) => doc! {"$or": [{"_id": id}, {"_id": {"$type": types_after(type_rank(anchor))}}]},
        (_, Some(_)) => doc! {"_id": id},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_whole_range_reads_everything() {
        assert_eq!(range_filter(None, None, None), doc! {});
    }

    #[test]
    fn a_resumed_whole_range_continues_after_the_last_id_and_into_later_types() {
        let filter = range_filter(None, None, Some(&Bson::Int64(41)));
        assert_eq!(
            filter,
            doc! {"$or": [{"_id": {"$gt": 41_i64}}, {"_id": {"$type": [
            "string", "symbol", "object", "binData", "objectId", "bool", "date", "timestamp", "regex",
            "dbPointer", "javascript", "javascriptWithScope", "maxKey"]}}]}
        );
    }

    #[test]
    fn split_ranges_use_their_bounds() {
        let (lo, hi) = (Bson::Int64(100), Bson::Int64(200));
        assert_eq!(range_filter(Some(&lo), Some(&hi), None), doc! {"_id": {"$gte": 100_i64, "$lt": 200_i64}});
        assert_eq!(range_filter(Some(&lo), Some(&hi), Some(&Bson::Int64(150))), doc! {"_id": {"$gt": 150_i64, "$lt": 200_i64}});
        assert_eq!(range_filter(None, Some(&lo), None), doc! {"_id": {"$lt": 100_i64}});
        let last = range_filter(Some(&hi), None, None);
        assert_eq!(last.get_array("$or").unwrap().len(), 2);
    }

    #[test]
    fn plans_must_cover_every_id() {
        let range = |i: u32, lower: Option<i64>, upper: Option<i64>| RangeProgress {
            id: RangeId { replication: "r".into(), ns: "db.c".into(), range: i },
            lower: lower.map(Bson::Int64),
            upper: upper.map(Bson::Int64),
            last_id: None,
            copied: 0,
            done: false,
        };
        assert!(is_complete_plan(&[range(0, None, None)]));
        assert!(is_complete_plan(&[range(0, None, Some(5)), range(1, Some(5), None)]));
        assert!(!is_complete_plan(&[range(0, None, Some(5))]));
        assert!(!is_complete_plan(&[range(0, None, Some(5)), range(1, Some(6), None)]));
        assert!(!is_complete_plan(&[]));
    }

    #[test]
    fn type_ranks_follow_mongodb_order() {
        let ordered = [
            Bson::MinKey,
            Bson::Null,
            Bson::Int32(1),
            Bson::String("a".into()),
            Bson::Document(doc! {}),
            Bson::ObjectId(mongodb::bson::oid::ObjectId::new()),
            Bson::Boolean(true),
            Bson::DateTime(mongodb::bson::DateTime::now()),
            Bson::MaxKey,
        ];
        assert!(ordered.windows(2).all(|w| type_rank(&w[0]) < type_rank(&w[1])));
    }
}
