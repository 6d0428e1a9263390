//! The workloads: what the source holds before the snapshot, what the writer does to it while a
//! pipeline streams, and the exact state the target must reach after each phase.
//!
//! Every stream writes distinct documents or keeps each document's writes on one writer, so the
//! writer's final state is known without reading the source, and [`Expect`] counts pin it down:
//! a pipeline only applies writes the writer made, so the counts match only when every write that
//! shapes the final state has been applied, in order.

use std::time::Instant;

use anyhow::{Result, bail};
use futures::future::try_join_all;
use mongodb::Client;
use mongodb::bson::{Document, doc};
use rand::SeedableRng;
use rand::seq::SliceRandom;

/// The database every workload writes.
pub const DATABASE: &str = "bench";
/// Collections of the `many` workload.
pub const MANY_COLLECTIONS: usize = 1000;
/// The `large` workload's documents are this big and this many times fewer.
pub const LARGE_BYTES: usize = 16 * 1024;
pub const LARGE_DIVISOR: usize = 10;
/// Writers of the snapshot's documents (not measured) and of the stream (measured).
const SEED_WRITERS: usize = 4;
pub const STREAM_WRITERS: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// ~100 B documents; the stream inserts new ones.
    Insert,
    /// The stream `$set`s a round marker on every document once per round, in a random order.
    Update,
    /// The stream: 50 % inserts of new documents, 30 % updates and 20 % deletes of distinct existing ones.
    Mixed,
    /// 16 KB documents, a tenth as many; the stream inserts new ones.
    Large,
    /// ~100 B documents spread evenly over 1,000 collections; the stream inserts new ones.
    Many,
}

impl Workload {
    pub const ALL: [Workload; 5] = [Workload::Insert, Workload::Update, Workload::Mixed, Workload::Large, Workload::Many];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Insert => "insert",
            Workload::Update => "update",
            Workload::Mixed => "mixed",
            Workload::Large => "large",
            Workload::Many => "many",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match Self::ALL.into_iter().find(|w| w.name() == name) {
            Some(w) => Ok(w),
            None => bail!("unknown workload {name} (insert, update, mixed, large, many)"),
        }
    }

    /// Whether the stream only inserts, so a target-alone bulk insert is its ceiling.
    pub fn inserts_only(self) -> bool {
        matches!(self, Workload::Insert | Workload::Large | Workload::Many)
    }

    fn collections(self) -> usize {
        if self == Workload::Many { MANY_COLLECTIONS } else { 1 }
    }

    /// The collection document `id` lives in.
    pub fn collection(self, id: i64) -> String {
        match self {
            Workload::Many => format!("c{:04}", id as usize % MANY_COLLECTIONS),
            _ => "bench".to_string(),
        }
    }

    /// Document `id` as the writer first inserts it.
    pub fn document(self, id: i64) -> Document {
        let mut doc = doc_of(id);
        match self {
            Workload::Update | Workload::Mixed => {
                doc.insert("round", 0);
            }
            Workload::Large => {
                doc.insert("payload", payload(id, LARGE_BYTES));
            }
            Workload::Insert | Workload::Many => {}
        }
        doc
    }

    /// `(snapshot documents, stream events)` for the benchmark's `--docs` and `--events`.
    pub fn sizes(self, docs: usize, events: usize) -> (usize, usize) {
        match self {
            Workload::Large => (docs / LARGE_DIVISOR, events / LARGE_DIVISOR),
            _ => (docs, events),
        }
    }

    /// The workload's writes and expected states at this size; the same seed gives every
    /// pipeline the same random orders.
    pub fn plan(self, docs: usize, events: usize, batch: usize) -> Result<Plan> {
        let (docs, events) = self.sizes(docs, events);
        let mut rng = rand::rngs::StdRng::seed_from_u64(20_261_201);
        let (stream, after_stream) = match self {
            Workload::Insert | Workload::Large | Workload::Many => {
                let writes = self.inserts(docs as i64..(docs + events) as i64, batch, STREAM_WRITERS);
                (writes, self.counts(docs + events))
            }
            Workload::Update => {
                if docs == 0 {
                    bail!("the update workload needs --docs > 0");
                }
                // Rounds 1..=last; the last one may cover only part of the documents.
                let last = events.div_ceil(docs).max(1) as i32;
                let in_last = events - (last as usize - 1) * docs;
                let mut writers = vec![Vec::new(); STREAM_WRITERS];
                for round in 1..=last {
                    let mut ids: Vec<i64> = (0..docs as i64).collect();
                    ids.shuffle(&mut rng);
                    ids.truncate(if round == last { in_last } else { docs });
                    // A document always goes to the same writer, so its rounds arrive in order.
                    for (w, writes) in writers.iter_mut().enumerate() {
                        let mine: Vec<i64> = ids.iter().copied().filter(|id| *id as usize % STREAM_WRITERS == w).collect();
                        writes.extend(mine.chunks(batch).map(|chunk| Write::Set { collection: self.collection(0), ids: chunk.to_vec(), round }));
                    }
                }
                let coll = self.collection(0);
                let expect = vec![
                    Expect::new(&coll, doc! {}, docs),
                    Expect::new(&coll, doc! {"round": last}, in_last),
                    Expect::new(&coll, doc! {"round": last - 1}, docs - in_last),
                ];
                (writers, expect)
            }
            Workload::Mixed => {
                let (inserts, updates) = (events / 2, events * 3 / 10);
                let deletes = events - inserts - updates;
                if updates + deletes > docs {
                    bail!("the mixed workload updates and deletes {} distinct documents of {docs}: raise --docs", updates + deletes);
                }
                let mut existing: Vec<i64> = (0..docs as i64).collect();
                existing.shuffle(&mut rng);
                let (mut to_update, mut to_delete) = (existing[..updates].iter().copied(), existing[updates..updates + deletes].iter().copied());
                let mut new_ids = docs as i64..;
                let mut kinds: Vec<u8> =
                    [(0u8, inserts), (1, updates), (2, deletes)].into_iter().flat_map(|(k, n)| std::iter::repeat_n(k, n)).collect();
                kinds.shuffle(&mut rng);
                let mut writers = vec![Vec::new(); STREAM_WRITERS];
                let coll = self.collection(0);
                for (n, chunk) in kinds.chunks(batch).enumerate() {
                    let mut ids = [Vec::new(), Vec::new(), Vec::new()];
                    for &kind in chunk {
                        let next = match kind {
                            0 => new_ids.next(),
                            1 => to_update.next(),
                            _ => to_delete.next(),
                        };
                        ids[kind as usize].extend(next);
                    }
                    let [ins, upd, del] = ids;
                    let writes = &mut writers[n % STREAM_WRITERS];
                    for write in [
                        Write::Insert { collection: coll.clone(), ids: ins },
                        Write::Set { collection: coll.clone(), ids: upd, round: 1 },
                        Write::Delete { collection: coll.clone(), ids: del },
                    ] {
                        if !write.ids().is_empty() {
                            writes.push(write);
                        }
                    }
                }
                let expect = vec![
                    Expect::new(&coll, doc! {}, docs + inserts - deletes),
                    Expect::new(&coll, doc! {"_id": {"$gte": docs as i64}}, inserts),
                    Expect::new(&coll, doc! {"round": 1}, updates),
                ];
                (writers, expect)
            }
        };
        Ok(Plan { workload: self, docs, events, batch, stream, after_snapshot: self.counts(docs), after_stream })
    }

    /// Inserts of `ids` in batches of at most `batch` (one collection each), dealt to `writers`.
    fn inserts(self, ids: std::ops::Range<i64>, batch: usize, writers: usize) -> Vec<Vec<Write>> {
        let mut by_collection = vec![Vec::new(); self.collections()];
        for id in ids {
            by_collection[id as usize % self.collections()].push(id);
        }
        let mut dealt = vec![Vec::new(); writers];
        let batches = by_collection.iter().enumerate().flat_map(|(c, ids)| ids.chunks(batch).map(move |chunk| (c, chunk)));
        for (n, (c, chunk)) in batches.enumerate() {
            dealt[n % writers].push(Write::Insert { collection: self.collection(c as i64), ids: chunk.to_vec() });
        }
        dealt
    }

    /// Each collection holds its share of documents `0..total`.
    fn counts(self, total: usize) -> Vec<Expect> {
        let n = self.collections();
        (0..n).map(|c| Expect::new(&self.collection(c as i64), doc! {}, total / n + usize::from(c < total % n)).settling()).collect()
    }
}

/// A document of about 100 bytes, like the lab's measurements.
pub fn doc_of(i: i64) -> Document {
    doc! {"_id": i, "name": format!("customer-{i:08}"), "balance": (i % 10_000) as f64 * 1.25, "tags": ["a", "b"], "active": i % 3 == 0}
}

/// `len` pseudo-random letters (so compression does not shrink the document).
fn payload(seed: i64, len: usize) -> String {
    let mut x = seed as u64 ^ 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        })
        .collect()
}

/// One write command of the writer.
#[derive(Clone, Debug)]
pub enum Write {
    /// `insert_many` of new documents.
    Insert { collection: String, ids: Vec<i64> },
    /// `update_many({_id: {$in: ids}}, {$set: {round}})`.
    Set { collection: String, ids: Vec<i64>, round: i32 },
    /// `delete_many({_id: {$in: ids}})`.
    Delete { collection: String, ids: Vec<i64> },
}

impl Write {
    fn ids(&self) -> &[i64] {
        match self {
            Write::Insert { ids, .. } | Write::Set { ids, .. } | Write::Delete { ids, .. } => ids,
        }
    }
}

/// A count the target must show: documents of `collection` matching `filter`.
#[derive(Clone, Debug)]
pub struct Expect {
    collection: String,
    filter: Document,
    count: u64,
    /// Once matched it stays matched (a count only inserts raise, and not beyond the writer's).
    settles: bool,
}

impl Expect {
    fn new(collection: &str, filter: Document, count: usize) -> Self {
        Self { collection: collection.to_string(), filter, count: count as u64, settles: false }
    }

    fn settling(self) -> Self {
        Self { settles: true, ..self }
    }
}

/// The phases a pipeline is measured in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Snapshot,
    Stream,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Snapshot => "snapshot",
            Phase::Stream => "stream",
        }
    }
}

/// Polls the target for a phase's expected state.
///
/// Counting documents costs the server a scan (~0.1 CPU-s per 100k documents on SecantusDB), so
/// each poll asks only for `top`'s write counters of the benchmark's namespaces (a fraction of a
/// millisecond); the counts run once the writes have stopped for a poll interval and not again
/// until they change. When the counts match, the target has held that state since the poll that
/// first saw the counters at their final value: that poll's instant is the completion, at most
/// one interval late and never early.
pub struct Completion<'a> {
    expected: &'a [Expect],
    /// Counts that settled: not asked again.
    met: Vec<bool>,
    /// The write counter and the instant it was first seen at that value.
    writes: Option<(i64, Instant)>,
    /// Why the target fell short at the write counter last counted.
    short: Option<(i64, String)>,
}

/// What a poll found.
pub enum Poll {
    /// The target holds the expected state, and has since this instant.
    Reached(Instant),
    /// Writes to the target are under way.
    Writing,
    /// The writes stopped short of the expected state: the first count that differs.
    Short(String),
}

impl Completion<'_> {
    pub async fn poll(&mut self, target: &Client) -> Result<Poll> {
        let (now, writes) = (Instant::now(), write_counter(target).await?);
        let since = match self.writes {
            Some((seen, since)) if seen == writes => since,
            _ => {
                self.writes = Some((writes, now));
                return Ok(Poll::Writing);
            }
        };
        if let Some((counted, why)) = &self.short
            && *counted == writes
        {
            return Ok(Poll::Short(why.clone()));
        }
        match self.shortfall(target).await? {
            None => Ok(Poll::Reached(since)),
            Some(why) => {
                self.short = Some((writes, why.clone()));
                Ok(Poll::Short(why))
            }
        }
    }

    /// The first count that does not match, in order (cheap while far off).
    async fn shortfall(&mut self, target: &Client) -> Result<Option<String>> {
        for (e, met) in self.expected.iter().zip(self.met.iter_mut()) {
            if *met {
                continue;
            }
            let has = target.database(DATABASE).collection::<Document>(&e.collection).count_documents(e.filter.clone()).await?;
            if has != e.count {
                return Ok(Some(format!("{DATABASE}.{} has {has} documents matching {}, not {}", e.collection, e.filter, e.count)));
            }
            *met = e.settles;
        }
        Ok(None)
    }
}

/// The server's count of write operations on the benchmark's namespaces (`top`).
async fn write_counter(client: &Client) -> Result<i64> {
    let top = client.database("admin").run_command(doc! {"top": 1}).await?;
    let number = |b: &mongodb::bson::Bson| b.as_i64().or_else(|| b.as_i32().map(i64::from)).unwrap_or_default();
    let mut writes = 0;
    for (ns, stats) in top.get_document("totals")? {
        let Some(stats) = stats.as_document().filter(|_| ns.starts_with(&format!("{DATABASE}."))) else { continue };
        for op in ["insert", "update", "remove", "writeLock"] {
            writes += stats.get_document(op).ok().and_then(|s| s.get("count")).map(number).unwrap_or_default();
        }
    }
    Ok(writes)
}

/// A workload at one size.
pub struct Plan {
    pub workload: Workload,
    /// Documents on the source before the snapshot.
    pub docs: usize,
    /// Writes of the stream phase (one oplog entry each).
    pub events: usize,
    batch: usize,
    /// The stream's writes, per writer.
    stream: Vec<Vec<Write>>,
    after_snapshot: Vec<Expect>,
    after_stream: Vec<Expect>,
}

impl Plan {
    /// Inserts the snapshot's documents with `writers` writers.
    pub async fn seed(&self, client: &Client, writers: Option<usize>) -> Result<()> {
        let writes = self.workload.inserts(0..self.docs as i64, self.batch, writers.unwrap_or(SEED_WRITERS));
        write(client, self.workload, &writes).await.map(drop)
    }

    /// Writes the stream's changes as fast as the writers can; returns when the last was acknowledged.
    pub async fn stream(&self, client: &Client) -> Result<Instant> {
        write(client, self.workload, &self.stream).await
    }

    /// Inserts the stream's documents with `writers` writers (insert-only workloads).
    pub async fn stream_inserts(&self, client: &Client, writers: usize) -> Result<()> {
        debug_assert!(self.workload.inserts_only());
        let writes = self.workload.inserts(self.docs as i64..(self.docs + self.events) as i64, self.batch, writers);
        write(client, self.workload, &writes).await.map(drop)
    }

    /// Collections written beside the documents (oplog entries of their creation).
    pub fn collections(&self) -> usize {
        self.workload.collections()
    }

    /// The poll for `phase`'s expected state: exactly the snapshot's documents, or exactly the
    /// writer's final state.
    pub fn completion(&self, phase: Phase) -> Completion<'_> {
        let expected = match phase {
            Phase::Snapshot => &self.after_snapshot,
            Phase::Stream => &self.after_stream,
        };
        Completion { expected, met: vec![false; expected.len()], writes: None, short: None }
    }
}

/// Runs each writer's writes in order, the writers concurrently; the instant of the last acknowledgement.
async fn write(client: &Client, workload: Workload, writers: &[Vec<Write>]) -> Result<Instant> {
    let db = client.database(DATABASE);
    let acks = try_join_all(writers.iter().map(|writes| {
        let db = db.clone();
        async move {
            let mut last = Instant::now();
            for w in writes {
                match w {
                    Write::Insert { collection, ids } => {
                        let coll = db.collection::<Document>(collection);
                        coll.insert_many(ids.iter().map(|&id| workload.document(id))).ordered(false).await?;
                    }
                    Write::Set { collection, ids, round } => {
                        let done =
                            db.collection::<Document>(collection).update_many(doc! {"_id": {"$in": ids}}, doc! {"$set": {"round": round}}).await?;
                        if done.modified_count != ids.len() as u64 {
                            bail!("the writer's update changed {} of {} documents in {collection}", done.modified_count, ids.len());
                        }
                    }
                    Write::Delete { collection, ids } => {
                        let done = db.collection::<Document>(collection).delete_many(doc! {"_id": {"$in": ids}}).await?;
                        if done.deleted_count != ids.len() as u64 {
                            bail!("the writer's delete removed {} of {} documents in {collection}", done.deleted_count, ids.len());
                        }
                    }
                }
                last = Instant::now();
            }
            anyhow::Ok(last)
        }
    }))
    .await?;
    Ok(acks.into_iter().max().unwrap_or_else(Instant::now))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(writes: &[Vec<Write>]) -> usize {
        writes.iter().flatten().map(|w| w.ids().len()).sum()
    }

    #[test]
    fn every_workload_writes_its_events() {
        for w in Workload::ALL {
            let plan = w.plan(10_000, 12_345, 100).unwrap();
            assert_eq!(total(&plan.stream), plan.events, "{}", w.name());
        }
    }

    #[test]
    fn update_rounds_keep_each_document_on_one_writer() {
        let plan = Workload::Update.plan(1000, 2500, 100).unwrap();
        for (w, writes) in plan.stream.iter().enumerate() {
            assert!(writes.iter().flat_map(|w| w.ids()).all(|id| *id as usize % STREAM_WRITERS == w));
        }
        let last: Vec<_> = plan.after_stream.iter().map(|e| e.count).collect();
        assert_eq!(last, [1000, 500, 500]);
    }

    #[test]
    fn mixed_touches_distinct_documents() {
        let plan = Workload::Mixed.plan(1000, 1000, 64).unwrap();
        let mut ids: Vec<i64> = plan.stream.iter().flatten().flat_map(|w| w.ids().to_vec()).collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n);
        assert_eq!(plan.after_stream[0].count, 1000 + 500 - 200);
    }

    #[test]
    fn many_spreads_documents_evenly() {
        let plan = Workload::Many.plan(2500, 0, 1000).unwrap();
        assert_eq!(plan.after_snapshot.len(), MANY_COLLECTIONS);
        assert_eq!(plan.after_snapshot.iter().map(|e| e.count).sum::<u64>(), 2500);
        assert!(plan.after_snapshot.iter().all(|e| e.count == 2 || e.count == 3));
    }
}
