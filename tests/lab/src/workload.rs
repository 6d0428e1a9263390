//! A workload generator and an exact source/target comparer for replication tests.
//!
//! The generator writes a random mix of inserts, updates, replaces and deletes over several
//! databases and collections, with varied BSON (Decimal128, dates, binary, ObjectId, nested
//! arrays and documents, unicode, dotted-looking keys, documents of several MB).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use mongodb::bson::{Binary, Bson, DateTime, Decimal128, Document, doc, oid::ObjectId, spec::BinarySubtype};
use mongodb::{Client, Collection};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the workload writes.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    pub databases: Vec<String>,
    /// Collection names, in every database.
    pub collections: Vec<String>,
    pub seed: u64,
    pub initial_docs_per_collection: usize,
    /// Every Nth insert is a document of several MB.
    pub large_doc_every: Option<usize>,
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

/// Counts of what a workload did.
#[derive(Clone, Debug, Default)]
pub struct WorkloadStats {
    pub inserts: usize,
    pub updates: usize,
    pub replaces: usize,
    pub deletes: usize,
    pub errors: usize,
    pub total: usize,
}

const UNICODE: &[&str] = &["naïve café", "日本語のテキスト", "emoji 🚀🔥👩‍💻", "e\u{301}\u{301} combining", "עברית RTL", "Ωμέγα", "plain"];

/// A random document with varied BSON; `large` ones are 2–6 MB.
pub fn random_document(rng: &mut impl Rng, id: &Bson, large: bool) -> Document {
    let nested = |rng: &mut dyn rand::RngCore| doc! {"level1": {"level2": {"level3": rng.next_u32() as i64, "tag": "deep"}}};
    let mut d = doc! {
        "_id": id.clone(),
        "n": rng.random_range(0..1000_i32),
        "big": rng.random::<i64>(),
        "ratio": rng.random::<f64>(),
        "price": format!("{}.{:04}", rng.random_range(0..1_000_000), rng.random_range(0..10_000)).parse::<Decimal128>().expect("a valid decimal"),
        "when": DateTime::from_millis(rng.random_range(0..4_102_444_800_000_i64)),
        "blob": Binary { subtype: BinarySubtype::Generic, bytes: (0..rng.random_range(0..64)).map(|_| rng.random()).collect() },
        "uuid": Binary { subtype: BinarySubtype::Uuid, bytes: rng.random::<[u8; 16]>().to_vec() },
        "ref": ObjectId::new(),
        "flag": rng.random::<bool>(),
        "nothing": Bson::Null,
        "text": UNICODE[rng.random_range(0..UNICODE.len())],
        "a.b": "a field whose name has a dot",
        "price.usd": rng.random_range(0..100_000) as i64,
        "tags": ["x", "y", {"k": "v"}, [1, [2, [3]]]],
        "lines": (0..rng.random_range(0..5)).map(|i| Bson::Document(doc! {"sku": format!("sku-{i}"), "qty": i})).collect::<Vec<_>>(),
    };
    d.insert("nested", nested(rng));
    if large {
        let mb = rng.random_range(2..6usize);
        d.insert("payload", Binary { subtype: BinarySubtype::Generic, bytes: vec![rng.random::<u8>(); mb * 1024 * 1024] });
        d.insert("essay", "lorem ipsum ".repeat(80_000));
    }
    d
}

fn collections(client: &Client, spec: &WorkloadSpec) -> Vec<Collection<Document>> {
    spec.databases
        .iter()
        .flat_map(|db| spec.collections.iter().map(move |c| client.database(db).collection::<Document>(c)))
        .collect()
}

/// The `_id` of the i-th document of a collection: mostly integers, and in the third collection
/// a mix of integers, strings and ObjectIds (ids of several BSON types).
fn id_for(collection: usize, i: u64) -> Bson {
    match (collection % 3, i % 3) {
        (2, 1) => Bson::String(format!("id-{i:06}")),
        (2, 2) => Bson::ObjectId(ObjectId::from_bytes({
            let mut b = [0u8; 12];
            b[4..].copy_from_slice(&i.to_be_bytes());
            b
        })),
        _ => Bson::Int64(i as i64),
    }
}

/// Inserts the initial documents; returns how many.
pub async fn seed(client: &Client, spec: &WorkloadSpec) -> Result<usize> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut total = 0;
    for (c, coll) in collections(client, spec).into_iter().enumerate() {
        let docs: Vec<Document> = (0..spec.initial_docs_per_collection as u64)
            .map(|i| random_document(&mut rng, &id_for(c, i), false))
            .collect();
        if !docs.is_empty() {
            total += docs.len();
            coll.insert_many(docs).await.with_context(|| format!("seeding {}", coll.namespace()))?;
        }
    }
    Ok(total)
}

/// A running workload.
pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<WorkloadStats>>,
}

impl Workload {
    /// Starts `spec.writers` writers.
    pub fn start(client: Client, spec: WorkloadSpec) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..spec.writers.max(1))
            .map(|w| {
                let (client, spec, stop) = (client.clone(), spec.clone(), stop.clone());
                tokio::spawn(async move { write(client, spec, w as u64, None, stop).await })
            })
            .collect();
        Workload { stop, tasks }
    }

    /// Stops the writers and returns what they did.
    pub async fn stop(self) -> Result<WorkloadStats> {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = WorkloadStats::default();
        for task in self.tasks {
            let s = task.await?;
            total.inserts += s.inserts;
            total.updates += s.updates;
            total.replaces += s.replaces;
            total.deletes += s.deletes;
            total.errors += s.errors;
            total.total += s.total;
        }
        Ok(total)
    }
}

/// Performs exactly `ops` operations with one writer (deterministic for a given seed).
pub async fn run_for(client: Client, spec: WorkloadSpec, ops: usize) -> Result<WorkloadStats> {
    Ok(write(client, spec, 0, Some(ops), Arc::new(AtomicBool::new(false))).await)
}

async fn write(client: Client, spec: WorkloadSpec, writer: u64, ops: Option<usize>, stop: Arc<AtomicBool>) -> WorkloadStats {
    let mut rng = StdRng::seed_from_u64(spec.seed.wrapping_mul(31).wrapping_add(writer + 1));
    let colls = collections(&client, &spec);
    let mut stats = WorkloadStats::default();
    // New ids never collide with seeded ones or another writer's.
    let mut next_id = 1_000_000 * (writer + 1);
    while !stop.load(Ordering::Relaxed) && ops.is_none_or(|n| stats.total < n) {
        let c = rng.random_range(0..colls.len());
        let coll = &colls[c];
        let existing = id_for(c, rng.random_range(0..spec.initial_docs_per_collection.max(1) as u64));
        let roll = rng.random_range(0..100);
        let result = if roll < 40 {
            next_id += 1;
            let large = spec.large_doc_every.is_some_and(|n| stats.inserts % n == n - 1);
            let doc = random_document(&mut rng, &id_for(c, next_id), large);
            stats.inserts += 1;
            coll.insert_one(doc).await.map(drop)
        } else if roll < 70 {
            stats.updates += 1;
            let update = match rng.random_range(0..4) {
                0 => doc! {"$set": {"n": rng.random_range(0..1000_i32), "nested.level1.level2.tag": "updated"}},
                1 => doc! {"$inc": {"n": 1}},
                2 => doc! {"$unset": {"ratio": ""}},
                _ => doc! {"$push": {"tags": UNICODE[rng.random_range(0..UNICODE.len())]}},
            };
            coll.update_one(doc! {"_id": existing}, update).await.map(drop)
        } else if roll < 85 {
            stats.replaces += 1;
            let doc = random_document(&mut rng, &existing, false);
            coll.replace_one(doc! {"_id": existing.clone()}, doc).upsert(true).await.map(drop)
        } else {
            stats.deletes += 1;
            coll.delete_one(doc! {"_id": existing}).await.map(drop)
        };
        stats.total += 1;
        if let Err(err) = result {
            // The server may be restarted under the workload; keep going.
            stats.errors += 1;
            tracing::debug!(error = %err, "workload write failed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    stats
}

/// Every user namespace (`db.coll`) of a deployment, sorted; the replicator's own database and
/// system collections are left out.
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

async fn all_docs(client: &Client, ns: &str) -> Result<Vec<Document>> {
    let (db, coll) = ns.split_once('.').context("namespace without a dot")?;
    Ok(client.database(db).collection::<Document>(coll).find(doc! {}).sort(doc! {"_id": 1}).await?.try_collect().await?)
}

fn short(value: Option<&Bson>) -> String {
    let text = value.map(|v| v.to_string()).unwrap_or_else(|| "(missing)".into());
    if text.len() > 120 { format!("{}… ({} bytes)", &text[..text.char_indices().nth(100).map_or(text.len(), |(i, _)| i)], text.len()) } else { text }
}

fn first_difference(a: &Document, b: &Document) -> String {
    for (k, v) in a {
        if b.get(k) != Some(v) {
            return format!("field {k:?}: source {} / target {}", short(Some(v)), short(b.get(k)));
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            return format!("field {k:?} only in the target");
        }
    }
    "same fields in a different order".into()
}

/// Fails unless each source namespace holds exactly the documents of its target namespace
/// (compared as BSON, field order included).
pub async fn assert_same(source: &Client, target: &Client, pairs: &[(String, String)]) -> Result<()> {
    for (s, t) in pairs {
        let (a, b) = (all_docs(source, s).await?, all_docs(target, t).await?);
        let mut problems = Vec::new();
        let (mut i, mut j) = (0, 0);
        while (i < a.len() || j < b.len()) && problems.len() < 5 {
            let (x, y) = (a.get(i), b.get(j));
            match (x, y) {
                (Some(x), Some(y)) if x.get("_id") == y.get("_id") => {
                    if x != y {
                        problems.push(format!("_id {}: {}", short(x.get("_id")), first_difference(x, y)));
                    }
                    i += 1;
                    j += 1;
                }
                (Some(x), Some(y)) if b[j..].iter().any(|d| d.get("_id") == x.get("_id")) => {
                    problems.push(format!("_id {} only in the target", short(y.get("_id"))));
                    j += 1;
                }
                (Some(x), _) => {
                    problems.push(format!("_id {} missing in the target", short(x.get("_id"))));
                    i += 1;
                }
                (None, Some(y)) => {
                    problems.push(format!("_id {} only in the target", short(y.get("_id"))));
                    j += 1;
                }
                (None, None) => break,
            }
        }
        if !problems.is_empty() {
            bail!("{s} -> {t}: source has {} documents, target {}; {}", a.len(), b.len(), problems.join("; "));
        }
    }
    Ok(())
}

/// Both sides hold the same user namespaces with the same documents.
pub async fn assert_same_all(source: &Client, target: &Client) -> Result<()> {
    let (a, b) = (user_namespaces(source).await?, user_namespaces(target).await?);
    if a != b {
        bail!("namespaces differ: source {a:?}, target {b:?}");
    }
    let pairs: Vec<(String, String)> = a.iter().map(|ns| (ns.clone(), ns.clone())).collect();
    assert_same(source, target, &pairs).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SecantusOptions, SecantusServer};

    #[test]
    fn documents_hold_every_kind_of_value() {
        let mut rng = StdRng::seed_from_u64(3);
        let d = random_document(&mut rng, &Bson::Int64(1), false);
        for key in ["price", "when", "blob", "uuid", "ref", "flag", "nothing", "a.b", "tags", "nested"] {
            assert!(d.contains_key(key), "{key}");
        }
        assert!(matches!(d.get("price"), Some(Bson::Decimal128(_))));
        let large = random_document(&mut rng, &Bson::Int64(2), true);
        let size = mongodb::bson::to_vec(&large).unwrap().len();
        assert!((2 * 1024 * 1024..16 * 1024 * 1024).contains(&size), "{size}");
    }

    #[tokio::test]
    async fn comparison_finds_a_changed_document() -> Result<()> {
        let (a, b) = (SecantusServer::start(SecantusOptions::default()).await?, SecantusServer::start(SecantusOptions::default()).await?);
        let (a, b) = (a.admin_client().await?, b.admin_client().await?);
        let spec = WorkloadSpec { initial_docs_per_collection: 20, databases: vec!["w".into()], ..Default::default() };
        seed(&a, &spec).await?;
        run_for(a.clone(), spec.clone(), 50).await?;
        for ns in user_namespaces(&a).await? {
            let docs = all_docs(&a, &ns).await?;
            let (db, coll) = ns.split_once('.').unwrap();
            if !docs.is_empty() {
                b.database(db).collection::<Document>(coll).insert_many(docs).await?;
            } else {
                b.database(db).create_collection(coll).await?;
            }
        }
        assert_same_all(&a, &b).await?;
        b.database("w").collection::<Document>("orders").update_one(doc! {"_id": 3_i64}, doc! {"$set": {"n": -1}}).await?;
        let err = assert_same_all(&a, &b).await.unwrap_err().to_string();
        assert!(err.contains("w.orders") && err.contains("_id 3") && err.contains("\"n\""), "{err}");
        Ok(())
    }
}
