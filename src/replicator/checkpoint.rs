//! Checkpoints: where a replication stands, stored in the target so that no crash costs a resync.
//!
//! One document per replication in `<checkpointDatabase>.checkpoints` holds the phase, the
//! change-stream point the snapshot started from and the resume token below which every change is
//! applied; one document per copied `_id` range in `<checkpointDatabase>.snapshot` holds the copy's
//! progress, so a restart resumes a half-copied collection and skips finished ones.

use std::collections::HashMap;

use mongodb::bson::{Bson, DateTime, Document, Timestamp, doc};
use mongodb::change_stream::event::ResumeToken;
use mongodb::options::ReplaceOptions;
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

/// Where a replication is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CheckpointPhase {
    /// Copying existing data; the stream will start at `start_token`.
    Snapshot,
    /// Following the change stream from `token`.
    Stream,
    /// A `SnapshotOnly` replication that finished.
    Done,
}

/// The saved state of one replication.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    #[serde(rename = "_id")]
    pub name: String,
    pub phase: CheckpointPhase,
    /// The change-stream point taken before the snapshot began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_token: Option<ResumeToken>,
    /// Every change up to this token is applied in the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<ResumeToken>,
    /// Source cluster time of the newest applied change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_cluster_time: Option<Timestamp>,
    /// Source cluster time up to which the stream provably read all history (the history
    /// guard's position when `token` was saved; for a start point, the source's time just before
    /// it was taken): where a resumed stream's guard starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_read_to: Option<Timestamp>,
    #[serde(default)]
    pub docs_copied: i64,
    #[serde(default)]
    pub events_applied: i64,
    pub saved_at: DateTime,
}

/// Progress of copying one `_id` range of one collection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RangeProgress {
    #[serde(rename = "_id")]
    pub id: RangeId,
    /// Inclusive lower bound (`None`: from the first document).
    pub lower: Option<Bson>,
    /// Exclusive upper bound (`None`: to the last document).
    pub upper: Option<Bson>,
    /// The greatest `_id` copied so far.
    pub last_id: Option<Bson>,
    pub copied: i64,
    pub done: bool,
}

/// Identifies one range of one collection of one replication.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RangeId {
    pub replication: String,
    pub ns: String,
    pub range: u32,
}

/// The checkpoint collections of one replication in the target.
#[derive(Clone)]
pub struct CheckpointStore {
    name: String,
    checkpoints: Collection<Checkpoint>,
    ranges: Collection<RangeProgress>,
}

impl CheckpointStore {
    pub fn new(db: &Database, name: &str) -> Self {
        Self { name: name.to_string(), checkpoints: db.collection("checkpoints"), ranges: db.collection("snapshot") }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn load(&self) -> mongodb::error::Result<Option<Checkpoint>> {
        self.checkpoints.find_one(doc! {"_id": &self.name}).await
    }

    pub async fn save(&self, checkpoint: &Checkpoint) -> mongodb::error::Result<()> {
        self.checkpoints.replace_one(doc! {"_id": &self.name}, checkpoint).with_options(ReplaceOptions::builder().upsert(true).build()).await?;
        Ok(())
    }

    /// Every saved range of this replication by collection, each collection's in range order:
    /// read once per snapshot, as a query by collection is a scan of every replication's ranges.
    pub async fn all_ranges(&self) -> mongodb::error::Result<HashMap<String, Vec<RangeProgress>>> {
        use futures::TryStreamExt;
        let ranges: Vec<RangeProgress> = self.ranges.find(doc! {"_id.replication": &self.name}).await?.try_collect().await?;
        let mut by_ns: HashMap<String, Vec<RangeProgress>> = HashMap::new();
        for range in ranges {
            by_ns.entry(range.id.ns.clone()).or_default().push(range);
        }
        for ranges in by_ns.values_mut() {
            ranges.sort_by_key(|r| r.id.range);
        }
        Ok(by_ns)
    }

    pub async fn save_range(&self, range: &RangeProgress) -> mongodb::error::Result<()> {
        let id = mongodb::bson::to_bson(&range.id).map_err(mongodb::error::Error::custom)?;
        self.ranges.replace_one(doc! {"_id": id}, range).with_options(ReplaceOptions::builder().upsert(true).build()).await?;
        Ok(())
    }

    /// Forgets the snapshot progress of the given collections (before copying them afresh).
    pub async fn forget_ranges(&self, namespaces: &[String]) -> mongodb::error::Result<()> {
        self.ranges.delete_many(doc! {"_id.replication": &self.name, "_id.ns": {"$in": namespaces}}).await?;
        Ok(())
    }

    /// Forgets the whole snapshot progress (a resync starts over).
    pub async fn forget_all_ranges(&self) -> mongodb::error::Result<()> {
        self.ranges.delete_many(doc! {"_id.replication": &self.name}).await?;
        Ok(())
    }
}

/// A resume token as the hex `_data` string users see in logs and `startAt.resumeToken`.
pub fn token_data(token: &ResumeToken) -> Option<String> {
    let doc: Document = mongodb::bson::from_bson(mongodb::bson::to_bson(token).ok()?).ok()?;
    doc.get_str("_data").ok().map(str::to_string)
}

/// A resume token from its hex `_data` string.
pub fn token_from_data(data: &str) -> Option<ResumeToken> {
    mongodb::bson::from_bson(Bson::Document(doc! {"_data": data})).ok()
}
