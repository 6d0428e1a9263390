//! A workload generator and an exact source/target comparer for replication tests.
//!
//! [`seed`] fills databases with varied BSON, [`Workload`] and [`run_for`] keep writing a mix of
//! inserts, updates, replaces and deletes, and [`assert_same`] / [`assert_same_all`] check a
//! target against its source document for document, byte for byte (field order included).
//!
//! SecantusDB, like mongod 5+, accepts dotted field names and `$`-prefixed field names in
//! inserts, but refuses a top-level `$`-prefixed field in a replacement document (code 52). So
//! generated documents carry `$`-prefixed names below the top level only: every one of them can
//! then be written again by a replace, the workload's or a replicator's upsert
//! (`tests::server_keeps_dotted_and_dollar_names_and_large_documents` records what the server does).

use std::collections::{BTreeSet, HashMap};
use std::ops::AddAssign;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use mongodb::bson::{Binary, Bson, DateTime, Decimal128, Document, RawDocument, RawDocumentBuf, doc, oid::ObjectId, spec::BinarySubtype};
use mongodb::{Client, Collection};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What a workload writes, and where.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    pub databases: Vec<String>,
    /// Collection names, the same in every database. The last one of each database gets `_id`s
    /// of mixed types (integers, strings, ObjectIds); the others get 64-bit integers.
    pub collections: Vec<String>,
    /// Seeds every random choice: with one writer the same spec on the same data writes the same.
    pub seed: u64,
    pub initial_docs_per_collection: usize,
    /// Every Nth insert (seeding included) is a document of 2–6 MB.
    pub large_doc_every: Option<usize>,
    /// Concurrent writers of [`Workload::start`] and [`run_for`] (at least one).
    pub writers: usize,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self {
            databases: vec!["wl_shop".into(), "wl_crm".into()],
            collections: vec!["orders".into(), "items".into(), "events".into()],
            seed: 1,
            initial_docs_per_collection: 200,
            large_doc_every: Some(500),
            writers: 2,
        }
    }
}

/// What a workload did. Operations are counted when the server acknowledged them (an update or
/// delete of an `_id` another writer deleted still counts); `total` counts every attempt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadStats {
    pub inserts: usize,
    pub updates: usize,
    pub replaces: usize,
    pub deletes: usize,
    /// Failed operations and failed start-up reads, each followed by a 200 ms pause.
    pub errors: usize,
    pub total: usize,
}

impl AddAssign for WorkloadStats {
    fn add_assign(&mut self, o: Self) {
        self.inserts += o.inserts;
        self.updates += o.updates;
        self.replaces += o.replaces;
        self.deletes += o.deletes;
        self.errors += o.errors;
        self.total += o.total;
    }
}

const CJK: &[&str] = &["日本語のテキスト", "中文字符测试", "한국어 문장", "漢字かな交じり文"];
const EMOJI: &[&str] = &["🚀🔥", "👩‍💻 at work", "🇫🇷🇯🇵 flags", "👍🏽 skin tone"];
const COMBINING: &[&str] = &["e\u{301}\u{301}", "Z\u{324}\u{354}\u{367}", "n\u{303}o\u{308}", "a\u{30a} ring"];
const RTL: &[&str] = &["עברית מימין לשמאל", "مرحبا بالعالم", "\u{202b}שלום embedded\u{202c}", "فارسی"];
const DECIMALS: &[&str] = &["12345.6789", "-0.00", "1E+3", "0.000000001", "9999999999999999999999999999999999", "-1.5E-30", "Infinity", "NaN"];

fn pick<'a, R: Rng + ?Sized>(rng: &mut R, pool: &[&'a str]) -> &'a str {
    pool[rng.random_range(0..pool.len())]
}

fn decimal<R: Rng + ?Sized>(rng: &mut R) -> Decimal128 {
    let text = if rng.random_bool(0.5) {
        format!("{}.{:04}", rng.random_range(-1_000_000..1_000_000), rng.random_range(0..10_000))
    } else {
        pick(rng, DECIMALS).to_string()
    };
    text.parse().expect("a valid decimal")
}

fn date<R: Rng + ?Sized>(rng: &mut R) -> DateTime {
    // 1900..2100: dates before the epoch are negative and easy to get wrong.
    DateTime::from_millis(rng.random_range(-2_208_988_800_000..4_102_444_800_000_i64))
}

/// A random document with the given `_id`: every BSON type a replicator must carry unchanged
/// (Decimal128, dates, binary, UUIDs, ObjectIds, numbers of each width, nested arrays and
/// documents, unicode, dotted and nested `$` names). `large` ones are 2–6 MB.
pub fn random_document(rng: &mut impl Rng, id: &Bson, large: bool) -> Document {
    let mut d = doc! {
        "_id": id.clone(),
        "n": rng.random_range(0..1000_i32),
        "big": rng.random::<i64>(),
        "ratio": rng.random::<f64>(),
        "price": decimal(rng),
        "when": date(rng),
        "blob": Binary { subtype: BinarySubtype::Generic, bytes: (0..rng.random_range(0..64)).map(|_| rng.random()).collect() },
        "uuid": Binary { subtype: BinarySubtype::Uuid, bytes: rng.random::<[u8; 16]>().to_vec() },
        "ref": ObjectId::from_bytes(rng.random()),
        "flag": rng.random::<bool>(),
        "nothing": Bson::Null,
        "i18n": {"cjk": pick(rng, CJK), "emoji": pick(rng, EMOJI), "combining": pick(rng, COMBINING), "rtl": pick(rng, RTL)},
        "a.b": "a field whose name has a dot",
        "price.usd": decimal(rng),
        "meta": {"$note": "a nested $-prefixed name", "x.y": {"$inner": rng.random_range(0..10_i64)}},
        "tags": [pick(rng, CJK), pick(rng, EMOJI)],
        "lines": (0..rng.random_range(1..5_i32))
            .map(|i| Bson::Document(doc! {"sku": format!("sku-{i}"), "qty": i, "price": decimal(rng), "at": date(rng)}))
            .collect::<Vec<_>>(),
        "matrix": [[rng.random_range(0..9_i32), 1_i64], [2.5, [rng.random_range(0..9_i64), [Bson::Null]]], []],
        "nested": {"level1": {"level2": {"tag": "deep", "level3": {"level4": rng.random::<u32>() as i64, "list": [{"deep": true}]}}}},
        "edges": {"neg_zero": -0.0_f64, "tiny": 5e-324_f64, "i32_min": i32::MIN, "i64_max": i64::MAX, "empty_doc": {}, "empty_array": []},
    };
    // Optional fields, so that replaces change a document's shape.
    if rng.random_bool(0.5) {
        d.insert("note", format!("{} {}", pick(rng, RTL), pick(rng, COMBINING)));
    }
    if large {
        let mut payload = vec![0u8; rng.random_range(1_900_000..4_500_000)];
        rng.fill(&mut payload[..]);
        let unit = "Lorem ipsum dolor sit amet — 日本語 🚀 עברית e\u{301}. ";
        d.insert("payload", Binary { subtype: BinarySubtype::Generic, bytes: payload });
        d.insert("essay", unit.repeat(rng.random_range(200_000..1_400_000) / unit.len()));
    }
    d
}

/// ObjectId `_id`s carry their counter in the last 8 bytes after this marker.
const OID_MARK: [u8; 4] = *b"wl\0\0";

/// The `_id` of the i-th document of a collection.
fn id_for(mixed: bool, i: u64) -> Bson {
    match (mixed, i % 3) {
        (true, 1) => Bson::String(format!("id-{i:012}")),
        (true, 2) => {
            let mut bytes = [0u8; 12];
            bytes[..4].copy_from_slice(&OID_MARK);
            bytes[4..].copy_from_slice(&i.to_be_bytes());
            Bson::ObjectId(ObjectId::from_bytes(bytes))
        }
        _ => Bson::Int64(i as i64),
    }
}

/// The counter an `_id` of [`id_for`] was made from.
fn counter_of(id: &Bson) -> Option<u64> {
    match id {
        Bson::Int64(i) => u64::try_from(*i).ok(),
        Bson::String(s) => s.strip_prefix("id-")?.parse().ok(),
        Bson::ObjectId(oid) => {
            let bytes = oid.bytes();
            (bytes[..4] == OID_MARK).then(|| u64::from_be_bytes(bytes[4..].try_into().expect("8 bytes")))
        }
        _ => None,
    }
}

fn large_at(every: Option<usize>, nth: usize) -> bool {
    every.is_some_and(|n| n > 0 && nth.is_multiple_of(n))
}

/// Every collection of the spec, with whether its `_id`s are of mixed types.
fn collections(client: &Client, spec: &WorkloadSpec) -> Vec<(Collection<Document>, bool)> {
    spec.databases
        .iter()
        .flat_map(|db| {
            let last = spec.collections.len().saturating_sub(1);
            spec.collections.iter().enumerate().map(move |(i, c)| (client.database(db).collection(c), i == last))
        })
        .collect()
}

/// Inserts `initial_docs_per_collection` documents in every collection; returns how many.
pub async fn seed(client: &Client, spec: &WorkloadSpec) -> Result<usize> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut inserted = 0;
    let n = spec.initial_docs_per_collection as u64;
    for (coll, mixed) in collections(client, spec) {
        // Batches bound the memory that large documents take.
        for start in (0..n).step_by(500) {
            let docs: Vec<Document> = (start..(start + 500).min(n))
                .map(|i| {
                    inserted += 1;
                    random_document(&mut rng, &id_for(mixed, i), large_at(spec.large_doc_every, inserted))
                })
                .collect();
            coll.insert_many(docs).await.with_context(|| format!("cannot seed {}", coll.namespace()))?;
        }
    }
    Ok(inserted)
}

/// One writer: its random source, the `_id`s it believes exist, and its own range of new `_id`s.
struct Writer {
    rng: StdRng,
    colls: Vec<(Collection<Document>, bool)>,
    ids: Vec<Vec<Bson>>,
    next: u64,
    inserted: usize,
    large_doc_every: Option<usize>,
}

impl Writer {
    /// Reads the `_id`s present, so that a writer started again on the same data (a second
    /// `run_for`) neither collides with earlier inserts nor touches only seeded documents.
    async fn new(client: &Client, spec: &WorkloadSpec, writer: u64) -> Result<Self> {
        let colls = collections(client, spec);
        if colls.is_empty() {
            bail!("the workload spec names no database or no collection");
        }
        let first = (writer + 1) << 32;
        let mut next = first;
        let mut ids = Vec::with_capacity(colls.len());
        for (coll, _) in &colls {
            let docs: Vec<Document> = coll.find(doc! {}).projection(doc! {"_id": 1}).sort(doc! {"_id": 1}).await?.try_collect().await?;
            let found: Vec<Bson> = docs.into_iter().filter_map(|mut d| d.remove("_id")).collect();
            for c in found.iter().filter_map(counter_of).filter(|c| (first..first + (1 << 32)).contains(c)) {
                next = next.max(c + 1);
            }
            ids.push(found);
        }
        let rng = StdRng::seed_from_u64(spec.seed ^ (writer + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Ok(Self { rng, colls, ids, next, inserted: 0, large_doc_every: spec.large_doc_every })
    }

    /// One operation on a random collection; a failure is counted, logged and waited out.
    async fn step(&mut self, stats: &mut WorkloadStats) {
        let c = self.rng.random_range(0..self.colls.len());
        let (coll, mixed) = self.colls[c].clone();
        let roll = self.rng.random_range(0..100);
        let existing = (!self.ids[c].is_empty()).then(|| self.rng.random_range(0..self.ids[c].len()));
        let (op, result) = match (roll, existing) {
            (0..40, _) | (_, None) => {
                let id = id_for(mixed, self.next);
                self.next += 1;
                self.inserted += 1;
                let doc = random_document(&mut self.rng, &id, large_at(self.large_doc_every, self.inserted));
                self.ids[c].push(id);
                ("insert", coll.insert_one(doc).await.map(drop))
            }
            (40..70, Some(k)) => {
                let update = random_update(&mut self.rng);
                ("update", coll.update_one(doc! {"_id": self.ids[c][k].clone()}, update).await.map(drop))
            }
            (70..85, Some(k)) => {
                let doc = random_document(&mut self.rng, &self.ids[c][k], false);
                ("replace", coll.replace_one(doc! {"_id": self.ids[c][k].clone()}, doc).await.map(drop))
            }
            (_, Some(k)) => {
                let id = self.ids[c].swap_remove(k);
                ("delete", coll.delete_one(doc! {"_id": id}).await.map(drop))
            }
        };
        stats.total += 1;
        match result {
            Ok(()) => match op {
                "insert" => stats.inserts += 1,
                "update" => stats.updates += 1,
                "replace" => stats.replaces += 1,
                _ => stats.deletes += 1,
            },
            Err(err) => {
                // The server may be restarting under the workload: wait a little and go on.
                stats.errors += 1;
                tracing::warn!(namespace = %coll.namespace(), op, error = %err, "workload write failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Operators on fields every generated document has (plus the optional `note`).
fn random_update(rng: &mut StdRng) -> Document {
    match rng.random_range(0..5) {
        0 => doc! {"$set": {"n": rng.random_range(0..1000_i32), "nested.level1.level2.tag": pick(rng, CJK)}},
        1 => doc! {"$inc": {"n": rng.random_range(1..10_i32)}},
        2 => doc! {"$unset": {"note": "", "ratio": ""}},
        3 => doc! {"$push": {"tags": pick(rng, EMOJI)}},
        _ => doc! {"$set": {"when": date(rng), "price": decimal(rng), "flag": rng.random::<bool>()}, "$inc": {"big": -1_i64}},
    }
}

/// A running workload: `writers` tasks writing until [`Workload::stop`] (or drop).
pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<WorkloadStats>>,
}

impl Workload {
    /// Starts the writers; they survive the server going away and coming back.
    pub fn start(client: Client, spec: WorkloadSpec) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..spec.writers.max(1) as u64)
            .map(|w| {
                let (client, spec, stop) = (client.clone(), spec.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut stats = WorkloadStats::default();
                    let mut writer = loop {
                        if stop.load(Ordering::Relaxed) || spec.databases.is_empty() || spec.collections.is_empty() {
                            return stats;
                        }
                        match Writer::new(&client, &spec, w).await {
                            Ok(writer) => break writer,
                            Err(err) => {
                                stats.errors += 1;
                                tracing::warn!(error = %format!("{err:#}"), "workload writer cannot start yet");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    };
                    while !stop.load(Ordering::Relaxed) {
                        writer.step(&mut stats).await;
                    }
                    stats
                })
            })
            .collect();
        Workload { stop, tasks }
    }

    /// Stops the writers after their current operation; what they did, summed.
    pub async fn stop(mut self) -> Result<WorkloadStats> {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = WorkloadStats::default();
        for task in std::mem::take(&mut self.tasks) {
            total += task.await.context("a workload writer panicked")?;
        }
        Ok(total)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        // A test that fails before `stop` must not leave writers running.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Performs exactly `ops` operations, shared among `spec.writers` writers, and returns; with one
/// writer the operations depend only on the seed and the data present.
pub async fn run_for(client: Client, spec: WorkloadSpec, ops: usize) -> Result<WorkloadStats> {
    let writers = spec.writers.max(1);
    let mut runs = Vec::with_capacity(writers);
    for w in 0..writers {
        let share = ops / writers + usize::from(w < ops % writers);
        let mut writer = Writer::new(&client, &spec, w as u64).await?;
        runs.push(async move {
            let mut stats = WorkloadStats::default();
            for _ in 0..share {
                writer.step(&mut stats).await;
            }
            stats
        });
    }
    let mut total = WorkloadStats::default();
    for stats in futures::future::join_all(runs).await {
        total += stats;
    }
    Ok(total)
}

/// Every user namespace (`db.coll`), sorted: no `admin`, `local`, `config` or `mongo_replicator`
/// database, no `system.*` collection.
pub async fn user_namespaces(client: &Client) -> Result<Vec<String>> {
    let mut out = BTreeSet::new();
    for db in client.list_database_names().await? {
        if ["admin", "local", "config", "mongo_replicator"].contains(&db.as_str()) {
            continue;
        }
        for coll in client.database(&db).list_collection_names().await? {
            if !coll.starts_with("system.") {
                out.insert(format!("{db}.{coll}"));
            }
        }
    }
    Ok(out.into_iter().collect())
}

async fn read_sorted(client: &Client, ns: &str) -> Result<Vec<RawDocumentBuf>> {
    let (db, coll) = ns.split_once('.').filter(|(d, c)| !d.is_empty() && !c.is_empty()).with_context(|| format!("{ns:?} is not db.collection"))?;
    let cursor = client.database(db).collection::<RawDocumentBuf>(coll).find(doc! {}).sort(doc! {"_id": 1}).await;
    cursor.with_context(|| format!("cannot read {ns}"))?.try_collect().await.with_context(|| format!("cannot read {ns}"))
}

/// The bytes of `{_id: …}`: equal exactly when the `_id`s have the same type and value.
fn id_key(doc: &RawDocument) -> Result<Vec<u8>> {
    let id = doc.get("_id")?.context("a document without _id")?;
    let mut key = RawDocumentBuf::new();
    key.append_ref("_id", id);
    Ok(key.into_bytes())
}

fn show_id(doc: &RawDocument) -> String {
    match doc.get("_id") {
        Ok(Some(id)) => Bson::try_from(id).map(|id| brief(&id)).unwrap_or_else(|e| format!("(unreadable: {e})")),
        _ => "(none)".into(),
    }
}

/// How many differences a report describes per namespace.
const SHOWN: usize = 5;

/// What differs between the two sides of a namespace (documents sorted by `_id`), or `None`.
fn compare_documents(source: &[RawDocumentBuf], target: &[RawDocumentBuf]) -> Result<Option<String>> {
    let mut by_id = HashMap::with_capacity(target.len());
    for (j, d) in target.iter().enumerate() {
        by_id.insert(id_key(d)?, j);
    }
    let (mut missing, mut extra, mut different) = (0, 0, 0);
    let mut shown = Vec::new();
    for d in source {
        match by_id.remove(&id_key(d)?) {
            None => {
                missing += 1;
                if shown.len() < SHOWN {
                    shown.push(format!("_id {} missing in the target", show_id(d)));
                }
            }
            Some(j) if target[j].as_bytes() != d.as_bytes() => {
                different += 1;
                // Only the documents reported are decoded and walked.
                if shown.len() < SHOWN {
                    shown.push(format!("_id {} different: {}", show_id(d), describe(d, &target[j])));
                }
            }
            Some(_) => {}
        }
    }
    for d in target {
        if by_id.contains_key(&id_key(d)?) {
            extra += 1;
            if shown.len() < SHOWN {
                shown.push(format!("_id {} extra in the target", show_id(d)));
            }
        }
    }
    if missing + extra + different == 0 {
        return Ok(None);
    }
    Ok(Some(format!(
        "source has {} documents, target {}: {missing} missing in the target, {extra} extra, {different} different; {}",
        source.len(),
        target.len(),
        shown.join("; ")
    )))
}

/// The first difference between two documents, in the source's field order.
fn describe(a: &RawDocument, b: &RawDocument) -> String {
    match (Document::try_from(a), Document::try_from(b)) {
        (Ok(a), Ok(b)) => diff_docs("", &a, &b).unwrap_or_else(|| "same values, different bytes".into()),
        (a, b) => format!("unreadable document (source {:?}, target {:?})", a.err(), b.err()),
    }
}

fn join(path: &str, key: &str) -> String {
    let key = if key.is_empty() || key.contains('.') { format!("{key:?}") } else { key.to_string() };
    if path.is_empty() { key } else { format!("{path}.{key}") }
}

fn diff_docs(path: &str, a: &Document, b: &Document) -> Option<String> {
    let (mut x, mut y) = (a.iter(), b.iter());
    loop {
        match (x.next(), y.next()) {
            (None, None) => return None,
            (Some((k, _)), None) => return Some(format!("{} missing in the target", join(path, k))),
            (None, Some((k, _))) => return Some(format!("{} only in the target", join(path, k))),
            (Some((ka, _)), Some((kb, _))) if ka != kb => {
                return Some(if !b.contains_key(ka) {
                    format!("{} missing in the target", join(path, ka))
                } else if !a.contains_key(kb) {
                    format!("{} only in the target", join(path, kb))
                } else {
                    format!("field order: the target has {} where the source has {}", join(path, kb), join(path, ka))
                });
            }
            (Some((k, va)), Some((_, vb))) => {
                if let Some(d) = diff_values(&join(path, k), va, vb) {
                    return Some(d);
                }
            }
        }
    }
}

fn diff_values(path: &str, a: &Bson, b: &Bson) -> Option<String> {
    match (a, b) {
        (Bson::Document(x), Bson::Document(y)) => diff_docs(path, x, y),
        (Bson::Array(x), Bson::Array(y)) => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (u, v))| diff_values(&format!("{path}.{i}"), u, v))
            .or_else(|| (x.len() != y.len()).then(|| format!("{path}: {} elements in the source, {} in the target", x.len(), y.len()))),
        // -0.0 == 0.0 and NaN != NaN as floats; replication must keep the bits.
        (Bson::Double(x), Bson::Double(y)) if x.to_bits() == y.to_bits() => None,
        (Bson::Double(_), Bson::Double(_)) => Some(format!("{path}: source {} / target {}", brief(a), brief(b))),
        _ if a == b => None,
        _ => Some(format!("{path}: source {} / target {}", brief(a), brief(b))),
    }
}

/// Roughly how many bytes a value takes, without formatting it.
fn weight(v: &Bson) -> usize {
    match v {
        Bson::String(s) => s.len(),
        Bson::Binary(b) => b.bytes.len(),
        Bson::Document(d) => d.iter().map(|(k, v)| k.len() + weight(v)).sum(),
        Bson::Array(a) => a.iter().map(weight).sum(),
        _ => 16,
    }
}

/// A value shown in at most about 100 characters: multi-MB values are summarised, not printed.
fn brief(v: &Bson) -> String {
    const MAX: usize = 100;
    let text = match v {
        Bson::String(s) if s.len() > MAX => return format!("String({:?}… {} bytes)", s.chars().take(40).collect::<String>(), s.len()),
        Bson::Binary(b) if b.bytes.len() > 32 => return format!("Binary({:?}, {} bytes)", b.subtype, b.bytes.len()),
        Bson::Document(d) if weight(v) > 1024 => return format!("{{a document of {} fields, ~{} bytes}}", d.len(), weight(v)),
        Bson::Array(a) if weight(v) > 1024 => return format!("[an array of {} elements, ~{} bytes]", a.len(), weight(v)),
        Bson::Decimal128(d) => format!("Decimal128({d})"),
        Bson::Document(_) | Bson::Array(_) => v.to_string(),
        _ => format!("{v:?}"),
    };
    if text.chars().count() > MAX { format!("{}…", text.chars().take(MAX).collect::<String>()) } else { text }
}

/// Fails unless each `(source, target)` pair of `db.coll` namespaces holds the same documents,
/// byte for byte; the error names each namespace, its counts and its first differences.
pub async fn assert_same(source: &Client, target: &Client, pairs: &[(String, String)]) -> Result<()> {
    let mut failures = Vec::new();
    for (s, t) in pairs {
        let (a, b) = tokio::try_join!(read_sorted(source, s), read_sorted(target, t))?;
        if let Some(report) = compare_documents(&a, &b)? {
            let label = if s == t { s.clone() } else { format!("{s} -> {t}") };
            failures.push(format!("{label}: {report}"));
        }
    }
    if !failures.is_empty() {
        bail!("{} of {} namespaces differ:\n{}", failures.len(), pairs.len(), failures.join("\n"));
    }
    Ok(())
}

/// Fails unless both sides have the same user namespaces (see [`user_namespaces`]; the target's
/// `mongo_replicator` database is left out) holding the same documents.
pub async fn assert_same_all(source: &Client, target: &Client) -> Result<()> {
    let (a, b) = tokio::try_join!(user_namespaces(source), user_namespaces(target))?;
    if a != b {
        let only = |x: &[String], y: &[String]| x.iter().filter(|n| !y.contains(n)).cloned().collect::<Vec<_>>();
        bail!("namespaces differ: only in the source {:?}, only in the target {:?}", only(&a, &b), only(&b, &a));
    }
    let pairs: Vec<(String, String)> = a.into_iter().map(|ns| (ns.clone(), ns)).collect();
    assert_same(source, target, &pairs).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecantusServer;
    use mongodb::error::{ErrorKind, WriteFailure};

    /// Adds to `seen` a tag for every kind of value below `v`; returns the nesting depth.
    fn walk(v: &Bson, seen: &mut BTreeSet<&'static str>) -> usize {
        let has = |a: &[Bson], f: fn(&Bson) -> bool| a.iter().any(f);
        let tag = match v {
            Bson::Double(_) => "double",
            Bson::Int32(_) => "int32",
            Bson::Int64(_) => "int64",
            Bson::Boolean(_) => "bool",
            Bson::Null => "null",
            Bson::DateTime(_) => "datetime",
            Bson::ObjectId(_) => "objectid",
            Bson::Decimal128(_) => "decimal128",
            Bson::Binary(b) if b.subtype == BinarySubtype::Uuid => "uuid",
            Bson::Binary(b) if b.subtype == BinarySubtype::Generic => "binary",
            Bson::String(s) => {
                let scripts = [
                    ("cjk", '\u{3040}'..='\u{D7AF}'),
                    ("emoji", '\u{1F300}'..='\u{1FAFF}'),
                    ("combining", '\u{300}'..='\u{36F}'),
                    ("rtl", '\u{590}'..='\u{6FF}'),
                ];
                seen.extend(scripts.into_iter().filter(|(_, r)| s.chars().any(|c| r.contains(&c))).map(|(name, _)| name));
                "string"
            }
            Bson::Document(d) => {
                seen.extend(d.keys().filter(|k| k.contains('.')).map(|_| "dotted_name"));
                seen.extend(d.keys().filter(|k| k.starts_with('$')).map(|_| "dollar_name"));
                seen.insert("document");
                return 1 + d.values().map(|v| walk(v, seen)).max().unwrap_or(0);
            }
            Bson::Array(a) => {
                seen.extend(has(a, |e| matches!(e, Bson::Document(_))).then_some("array_of_documents"));
                seen.extend(has(a, |e| matches!(e, Bson::Array(_))).then_some("array_of_arrays"));
                seen.insert("array");
                return 1 + a.iter().map(|v| walk(v, seen)).max().unwrap_or(0);
            }
            _ => "other",
        };
        seen.insert(tag);
        0
    }

    #[test]
    fn random_documents_hold_every_listed_type_and_depend_only_on_the_seed() {
        let expected = "double int32 int64 bool null datetime objectid decimal128 uuid binary string cjk emoji combining rtl document array \
                        dotted_name dollar_name array_of_documents array_of_arrays";
        for seed in 0..20 {
            let d = random_document(&mut StdRng::seed_from_u64(seed), &Bson::Int64(1), false);
            let mut seen = BTreeSet::new();
            let depth = walk(&Bson::Document(d.clone()), &mut seen);
            let lacking: Vec<_> = expected.split_whitespace().filter(|t| !seen.contains(t)).collect();
            assert!(lacking.is_empty(), "seed {seed} lacks {lacking:?}: {d}");
            assert!(depth >= 5, "nesting depth {depth}");
            assert!(d.keys().all(|k| !k.starts_with('$')), "a top-level $ name cannot be replaced");
            let again = random_document(&mut StdRng::seed_from_u64(seed), &Bson::Int64(1), false);
            assert_eq!(RawDocumentBuf::from_document(&d).unwrap().as_bytes(), RawDocumentBuf::from_document(&again).unwrap().as_bytes());
        }
        for seed in 0..4 {
            let large = random_document(&mut StdRng::seed_from_u64(seed), &Bson::Int64(2), true);
            let size = RawDocumentBuf::from_document(&large).unwrap().as_bytes().len();
            assert!((2_000_000..=6_000_000).contains(&size), "a large document of {size} bytes");
        }
    }

    #[test]
    fn differences_are_located_and_kept_short() {
        let raw = |d: &Document| RawDocumentBuf::from_document(d).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let a = random_document(&mut rng, &Bson::Int64(7), true);
        // A changed multi-MB value is summarised.
        let mut c = a.clone();
        c.insert("essay", "short");
        let report = compare_documents(&[raw(&a)], &[raw(&c)]).unwrap().unwrap();
        assert!(report.contains("essay: source String(") && report.len() < 400, "{report}");
        // Same fields in another order are a difference (bson's Document equality ignores order).
        let mut fields: Vec<(String, Bson)> = a.clone().into_iter().collect();
        fields.reverse();
        let reordered: Document = fields.into_iter().collect();
        assert!(a == reordered);
        let report = compare_documents(&[raw(&a)], &[raw(&reordered)]).unwrap().unwrap();
        assert!(report.contains("field order"), "{report}");
        // -0.0 is not 0.0 for a replica; a dotted name is quoted.
        let (x, y) = (doc! {"_id": 1, "a.b": {"v": -0.0}}, doc! {"_id": 1, "a.b": {"v": 0.0}});
        let report = compare_documents(&[raw(&x)], &[raw(&y)]).unwrap().unwrap();
        assert!(report.contains("\"a.b\".v: source Double(-0.0) / target Double(0.0)"), "{report}");
        // Int32 1 and Int64 1 are different _ids.
        let report = compare_documents(&[raw(&doc! {"_id": 1})], &[raw(&doc! {"_id": 1_i64})]).unwrap().unwrap();
        assert!(report.contains("_id Int32(1) missing in the target; _id Int64(1) extra in the target"), "{report}");
        assert_eq!(compare_documents(&[raw(&a)], &[raw(&a)]).unwrap(), None);
    }

    #[tokio::test]
    async fn server_keeps_dotted_and_dollar_names_and_large_documents() -> Result<()> {
        let server = SecantusServer::start(Default::default()).await?;
        let client = server.admin_client().await?;
        let coll = client.database("probe").collection::<Document>("names");
        let accepted = [
            doc! {"_id": 1, "a.b": 1, "price.usd": 2},
            doc! {"_id": 2, "sub": {"$x": 1, "c.d": 2}, "arr": [{"$y": 1}]},
            doc! {"_id": 3, "y": 1, "$top": 1},
            random_document(&mut StdRng::seed_from_u64(9), &Bson::Int64(4), true),
        ];
        for d in &accepted {
            coll.insert_one(d).await.with_context(|| format!("insert {}", brief(&d.get("_id").cloned().unwrap_or_default())))?;
            let back = client.database("probe").collection::<RawDocumentBuf>("names").find_one(doc! {"_id": d.get("_id")}).await?;
            assert!(back.context("gone")?.as_bytes() == RawDocumentBuf::from_document(d)?.as_bytes(), "{} came back changed", d.get("_id").unwrap());
        }
        // As on mongod: a nested $ name can be replaced, a top-level one cannot (not even after
        // the first field, which the driver checks), and `_id` may not hold $ names.
        coll.replace_one(doc! {"_id": 2}, doc! {"_id": 2, "sub": {"$x": 2}}).await?;
        let code = |r: mongodb::error::Result<()>| match r.map_err(|e| *e.kind) {
            Err(ErrorKind::Write(WriteFailure::WriteError(e))) => Some(e.code),
            _ => None,
        };
        assert_eq!(code(coll.replace_one(doc! {"_id": 3}, doc! {"_id": 3, "$top": 2}).await.map(drop)), Some(52));
        assert_eq!(code(coll.insert_one(doc! {"_id": {"$x": 1}}).await.map(drop)), Some(52));
        // The way around: a pipeline update with $replaceWith and $literal.
        let literal = doc! {"_id": 3, "$top": 2};
        coll.update_one(doc! {"_id": 3}, vec![doc! {"$replaceWith": {"$literal": &literal}}]).await?;
        assert_eq!(coll.find_one(doc! {"_id": 3}).await?, Some(literal));
        Ok(())
    }

    #[tokio::test]
    async fn seeded_runs_are_deterministic_and_compare_equal() -> Result<()> {
        let (a, b) = tokio::try_join!(SecantusServer::start(Default::default()), SecantusServer::start(Default::default()))?;
        let (a, b) = (a.admin_client().await?, b.admin_client().await?);
        let spec = WorkloadSpec { seed: 5, initial_docs_per_collection: 40, large_doc_every: None, writers: 1, ..Default::default() };
        for client in [&a, &b] {
            assert_eq!(seed(client, &spec).await?, 240);
            // A second run on the same data must not collide with the first one's inserts.
            for _ in 0..2 {
                let stats = run_for(client.clone(), spec.clone(), 150).await?;
                assert_eq!((stats.total, stats.errors), (150, 0), "{stats:?}");
                assert_eq!(stats.inserts + stats.updates + stats.replaces + stats.deletes, 150, "{stats:?}");
                assert!(stats.inserts > 0 && stats.updates > 0 && stats.replaces > 0 && stats.deletes > 0, "{stats:?}");
            }
        }
        let namespaces = user_namespaces(&a).await?;
        assert_eq!(namespaces.len(), 6, "{namespaces:?}");
        let pairs: Vec<(String, String)> = namespaces.iter().map(|n| (n.clone(), n.clone())).collect();
        assert_same(&a, &a, &pairs).await?;
        // Same seed, one writer, same starting data: the same documents on both servers.
        assert_same_all(&a, &b).await
    }

    #[tokio::test]
    async fn a_hand_copy_compares_equal_until_it_is_changed() -> Result<()> {
        let (a, b) = tokio::try_join!(SecantusServer::start(Default::default()), SecantusServer::start(Default::default()))?;
        let (src, dst) = (a.admin_client().await?, b.admin_client().await?);
        let spec = WorkloadSpec {
            databases: vec!["shop".into()],
            collections: vec!["orders".into(), "events".into()],
            initial_docs_per_collection: 30,
            writers: 1,
            ..Default::default()
        };
        seed(&src, &spec).await?;
        run_for(src.clone(), spec.clone(), 60).await?;
        let docs = read_sorted(&src, "shop.events").await?;
        let copy = dst.database("backup").collection::<RawDocumentBuf>("events_copy");
        copy.insert_many(&docs).await?;
        let pairs = [("shop.events".to_string(), "backup.events_copy".to_string())];
        assert_same(&src, &dst, &pairs).await?;

        // One _id of each type: a field changed deep down, fields reordered, a document deleted.
        let ids = docs.iter().map(|d| Ok(Bson::try_from(d.get("_id")?.context("no _id")?)?)).collect::<Result<Vec<Bson>>>()?;
        let id_of = |want: fn(&Bson) -> bool| ids.iter().find(|id| want(id)).cloned().context("no such _id");
        let (text_id, int_id, oid_id) =
            (id_of(|b| matches!(b, Bson::String(_)))?, id_of(|b| matches!(b, Bson::Int64(_)))?, id_of(|b| matches!(b, Bson::ObjectId(_)))?);
        let copy = copy.clone_with_type::<Document>();
        copy.update_one(doc! {"_id": &text_id}, doc! {"$set": {"nested.level1.level2.tag": "tampered"}}).await?;
        let err = assert_same(&src, &dst, &pairs).await.unwrap_err().to_string();
        let expected = format!(
            "shop.events -> backup.events_copy: source has {0} documents, target {0}: 0 missing in the target, 0 extra, 1 different; _id {1} different: nested.level1.level2.tag: source String(",
            docs.len(),
            brief(&text_id)
        );
        assert!(err.contains(&expected), "{err}");

        let original = copy.find_one(doc! {"_id": &int_id}).await?.context("gone")?;
        let mut reordered = doc! {"_id": &int_id};
        let mut rest: Vec<(String, Bson)> = original.into_iter().filter(|(k, _)| k != "_id").collect();
        rest.reverse();
        reordered.extend(rest);
        copy.replace_one(doc! {"_id": &int_id}, reordered).await?;
        copy.delete_one(doc! {"_id": &oid_id}).await?;
        copy.insert_one(doc! {"_id": "stray"}).await?;
        let err = assert_same(&src, &dst, &pairs).await.unwrap_err().to_string();
        for part in [
            format!("_id {} different: field order", brief(&int_id)),
            format!("_id {} missing in the target", brief(&oid_id)),
            "_id String(\"stray\") extra".into(),
        ] {
            assert!(err.contains(&part), "{part:?} not in {err}");
        }
        let err = assert_same_all(&src, &dst).await.unwrap_err().to_string();
        assert!(err.contains("only in the source [\"shop.events\", \"shop.orders\"], only in the target [\"backup.events_copy\"]"), "{err}");
        Ok(())
    }

    #[tokio::test]
    async fn the_workload_outlives_a_server_restart() -> Result<()> {
        let mut server = SecantusServer::start(Default::default()).await?;
        let client = server.admin_client().await?;
        let spec = WorkloadSpec { initial_docs_per_collection: 20, large_doc_every: Some(50), ..Default::default() };
        seed(&client, &spec).await?;
        // The highest `_id` the writers have inserted into the integer-keyed collections.
        let newest = async |client: &Client| -> Result<i64> {
            let mut newest = 0;
            for (coll, mixed) in collections(client, &spec) {
                let filter = doc! {"_id": {"$gte": 1_i64 << 32}};
                if let (false, Some(d)) = (mixed, coll.find_one(filter).sort(doc! {"_id": -1}).await?) {
                    newest = newest.max(d.get_i64("_id")?);
                }
            }
            Ok(newest)
        };
        let load = Workload::start(client.clone(), spec.clone());
        tokio::time::sleep(Duration::from_millis(700)).await;
        server.restart().await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = newest(&client).await?;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let after = newest(&client).await?;
        let stats = tokio::time::timeout(Duration::from_secs(30), load.stop()).await??;
        let done = stats.inserts + stats.updates + stats.replaces + stats.deletes;
        assert!(done > 20 && done + stats.errors == stats.total, "{stats:?}");
        assert!(after > before, "no insert after the restart ({before} -> {after}): {stats:?}");
        Ok(())
    }
}
