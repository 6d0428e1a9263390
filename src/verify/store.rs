//! The pass's progress in the target's checkpoint database (collection `verification`), so a
//! killed verification resumes: one `pass` document (change-stream start tokens, scan end,
//! generation), one `partition` document per `_id` range (done marker, counts) and one
//! `mismatch` document per mismatch (never the document's contents).

use futures::TryStreamExt;
use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::change_stream::event::ResumeToken;
use mongodb::options::ReplaceOptions;
use mongodb::{Collection, Database};

use super::compare::MismatchKind;
use super::live::{Entry, Millis};
use super::plan::Partition;

/// Collection in the checkpoint database.
pub const COLLECTION: &str = "verification";

/// What a pass saved about itself.
#[derive(Clone, Debug, PartialEq)]
pub struct PassRecord {
    pub started_at: Millis,
    pub source_token: Option<ResumeToken>,
    pub target_token: Option<ResumeToken>,
    /// Set once every partition was compared.
    pub scan_end: Option<Millis>,
    pub generation: u32,
    pub finished: bool,
    /// The comparison settings the pass runs with; a rerun with others starts over.
    pub settings: Document,
}

/// A partition's saved state.
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionRecord {
    pub partition: Partition,
    pub done: bool,
    pub source_docs: u64,
    pub target_docs: u64,
}

#[derive(Clone)]
pub struct VerificationStore {
    coll: Collection<Document>,
    name: String,
}

fn token_doc(token: &Option<ResumeToken>) -> Bson {
    token.as_ref().and_then(|t| mongodb::bson::to_bson(t).ok()).unwrap_or(Bson::Null)
}

fn token_of(doc: &Document, key: &str) -> Option<ResumeToken> {
    doc.get_document(key).ok().and_then(|d| mongodb::bson::from_document(d.clone()).ok())
}

fn millis(doc: &Document, key: &str) -> Option<Millis> {
    doc.get_datetime(key).ok().map(|d| d.timestamp_millis())
}

impl VerificationStore {
    pub fn new(db: &Database, name: &str) -> Self {
        Self { coll: db.collection(COLLECTION), name: name.to_string() }
    }

    fn pass_id(&self) -> Document {
        doc! {"replication": &self.name, "type": "pass"}
    }

    pub async fn load_pass(&self) -> mongodb::error::Result<Option<PassRecord>> {
        let Some(d) = self.coll.find_one(doc! {"_id": self.pass_id()}).await? else { return Ok(None) };
        Ok(Some(PassRecord {
            started_at: millis(&d, "startedAt").unwrap_or_default(),
            source_token: token_of(&d, "sourceToken"),
            target_token: token_of(&d, "targetToken"),
            scan_end: millis(&d, "scanEnd"),
            generation: d.get_i64("generation").unwrap_or_default() as u32,
            finished: d.get_bool("finished").unwrap_or(false),
            settings: d.get_document("settings").cloned().unwrap_or_default(),
        }))
    }

    pub async fn save_pass(&self, pass: &PassRecord) -> mongodb::error::Result<()> {
        let mut d = doc! {
            "_id": self.pass_id(),
            "replication": &self.name,
            "type": "pass",
            "startedAt": DateTime::from_millis(pass.started_at),
            "sourceToken": token_doc(&pass.source_token),
            "targetToken": token_doc(&pass.target_token),
            "generation": i64::from(pass.generation),
            "finished": pass.finished,
            "settings": pass.settings.clone(),
            "savedAt": DateTime::now(),
        };
        if let Some(end) = pass.scan_end {
            d.insert("scanEnd", DateTime::from_millis(end));
        }
        self.coll.replace_one(doc! {"_id": self.pass_id()}, d).with_options(ReplaceOptions::builder().upsert(true).build()).await.map(drop)
    }

    /// Forgets everything of this replication's verification: a new pass starts.
    pub async fn reset(&self) -> mongodb::error::Result<()> {
        self.coll.delete_many(doc! {"replication": &self.name}).await.map(drop)
    }

    fn partition_id(&self, p: &Partition) -> Document {
        doc! {"replication": &self.name, "type": "partition", "ns": &p.ns, "index": i64::from(p.index)}
    }

    pub async fn save_partition(&self, record: &PartitionRecord) -> mongodb::error::Result<()> {
        let p = &record.partition;
        let d = doc! {
            "_id": self.partition_id(p),
            "replication": &self.name,
            "type": "partition",
            "ns": &p.ns,
            "index": i64::from(p.index),
            "lower": p.lower.clone().unwrap_or(Bson::Null),
            "hasLower": p.lower.is_some(),
            "upper": p.upper.clone().unwrap_or(Bson::Null),
            "hasUpper": p.upper.is_some(),
            "done": record.done,
            "sourceDocs": record.source_docs as i64,
            "targetDocs": record.target_docs as i64,
        };
        self.coll.replace_one(doc! {"_id": self.partition_id(p)}, d).with_options(ReplaceOptions::builder().upsert(true).build()).await.map(drop)
    }

    pub async fn partitions(&self) -> mongodb::error::Result<Vec<PartitionRecord>> {
        let docs: Vec<Document> = self.coll.find(doc! {"replication": &self.name, "type": "partition"}).await?.try_collect().await?;
        let mut out: Vec<PartitionRecord> = docs
            .into_iter()
            .map(|d| {
                let bound = |key: &str, has: &str| d.get_bool(has).unwrap_or(false).then(|| d.get(key).cloned()).flatten();
                PartitionRecord {
                    partition: Partition {
                        ns: d.get_str("ns").unwrap_or_default().to_string(),
                        index: d.get_i64("index").unwrap_or_default() as u32,
                        lower: bound("lower", "hasLower"),
                        upper: bound("upper", "hasUpper"),
                    },
                    done: d.get_bool("done").unwrap_or(false),
                    source_docs: d.get_i64("sourceDocs").unwrap_or_default() as u64,
                    target_docs: d.get_i64("targetDocs").unwrap_or_default() as u64,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.partition.ns, a.partition.index).cmp(&(&b.partition.ns, b.partition.index)));
        Ok(out)
    }

    fn mismatch_id(&self, ns: &str, id: &Bson) -> Document {
        doc! {"replication": &self.name, "type": "mismatch", "ns": ns, "id": id.clone()}
    }

    pub async fn save_mismatch(&self, entry: &Entry) -> mongodb::error::Result<()> {
        let id = self.mismatch_id(&entry.ns, &entry.id);
        let mut d = doc! {
            "_id": id.clone(),
            "replication": &self.name,
            "type": "mismatch",
            "ns": &entry.ns,
            "kind": entry.kind.as_str(),
            "firstSeen": DateTime::from_millis(entry.first_seen),
            "settled": entry.settled,
        };
        if let Some(at) = entry.last_change {
            d.insert("lastChange", DateTime::from_millis(at));
        }
        self.coll.replace_one(doc! {"_id": id}, d).with_options(ReplaceOptions::builder().upsert(true).build()).await.map(drop)
    }

    pub async fn forget_mismatch(&self, ns: &str, id: &Bson) -> mongodb::error::Result<()> {
        self.coll.delete_one(doc! {"_id": self.mismatch_id(ns, id)}).await.map(drop)
    }

    pub async fn mismatches(&self) -> mongodb::error::Result<Vec<Entry>> {
        let docs: Vec<Document> = self.coll.find(doc! {"replication": &self.name, "type": "mismatch"}).await?.try_collect().await?;
        Ok(docs
            .into_iter()
            .filter_map(|d| {
                let key = d.get_document("_id").ok()?;
                Some(Entry {
                    ns: d.get_str("ns").ok()?.to_string(),
                    id: key.get("id")?.clone(),
                    kind: MismatchKind::parse(d.get_str("kind").ok()?)?,
                    first_seen: millis(&d, "firstSeen")?,
                    last_change: millis(&d, "lastChange"),
                    settled: d.get_bool("settled").unwrap_or(false),
                })
            })
            .collect())
    }
}
