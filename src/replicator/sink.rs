//! The target side: idempotent batched writes and DDL, retried while errors are transient.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, RawArrayBuf, RawDocument, RawDocumentBuf, doc, rawdoc};
use mongodb::error::{ErrorKind, InsertManyError};
use mongodb::{Client, Database};
use tokio_util::sync::CancellationToken;

use super::classify::{code, describe, error_code, is_transient};
use super::event::{Ddl, DocWrite, DocWriteKind};
use super::namespace::{Namespace, NamespaceMap};
use crate::reason::Reason;
use crate::retry::{Decision, Failure, Policy, retry};
use crate::telemetry::Metrics;

/// Writes are retried without limit while the target may come back, until a shutdown.
const WRITE_RETRY: Policy = Policy::unbounded(Duration::from_millis(100), Duration::from_secs(10));

/// Most bytes of documents in one write command; the server refuses commands over 16 MB and one
/// large document must still fit beside the command's own fields.
const MAX_COMMAND_BYTES: usize = 8 * 1024 * 1024;

/// A write the target refused for good.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("target refused a write to {ns} (code {code}): {message}")]
    WriteRefused { ns: String, code: i32, message: String },
    #[error("target command {command} on {ns} failed: {}", describe(source))]
    Command {
        command: &'static str,
        ns: String,
        #[source]
        source: mongodb::error::Error,
    },
    #[error("stopped while retrying a write to {ns}")]
    Cancelled { ns: String },
}

impl SinkError {
    pub fn reason(&self) -> Reason {
        match self {
            SinkError::WriteRefused { .. } => Reason::TargetWriteRefused,
            SinkError::Command { .. } => Reason::TargetCommandFailed,
            SinkError::Cancelled { .. } => Reason::Cancelled,
        }
    }

    /// Whether the same write may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Command { source, .. } if is_transient(source))
    }
}

/// Writes to the target.
#[derive(Clone)]
pub struct Sink {
    client: Client,
    map: Arc<NamespaceMap>,
    metrics: Arc<Metrics>,
    batch_size: usize,
    /// Retries stop when this is cancelled (a forced shutdown); writes in flight are idempotent.
    cancel: CancellationToken,
}

impl Sink {
    pub fn new(client: Client, map: Arc<NamespaceMap>, metrics: Arc<Metrics>, batch_size: usize, cancel: CancellationToken) -> Self {
        Self { client, map, metrics, batch_size, cancel }
    }

    fn db(&self, ns: &Namespace) -> Database {
        self.client.database(&ns.db)
    }

    /// Retries `op` while it fails transiently, until the sink is cancelled (a shutdown: writes
    /// in flight are idempotent and replayed from the checkpoint).
    async fn retrying<T, Fut>(&self, ns: &Namespace, what: &'static str, op: impl FnMut() -> Fut) -> Result<T, SinkError>
    where
        Fut: Future<Output = Result<T, SinkError>>,
    {
        let on_retry = |err: &SinkError, wait: Duration, _| {
            self.metrics.retry("write");
            self.metrics.write_failing();
            tracing::warn!(ns = %ns, command = what, error = %err, retry_in = ?wait, "transient write failure; retrying");
        };
        let result = retry(&WRITE_RETRY, &self.cancel, op, |e: &SinkError| Decision::retry_if(e.is_transient()), on_retry).await;
        if result.is_ok() {
            self.metrics.write_succeeded();
        }
        result.map_err(|failure| match failure {
            Failure::Cancelled { .. } => SinkError::Cancelled { ns: ns.to_string() },
            other => other.into_error(),
        })
    }

    /// Runs a command, retrying transient failures.
    async fn command(&self, ns: &Namespace, name: &'static str, command: &Document) -> Result<Document, SinkError> {
        // The driver takes the command by value; keeping ours lets a retry resend it.
        self.retrying(ns, name, || async {
            self.db(ns).run_command(command.clone()).await.map_err(|source| SinkError::Command { command: name, ns: ns.to_string(), source })
        })
        .await
    }

    /// Applies document writes in order per document: for each document only its last write
    /// counts (every write is a whole-document replacement or a delete), so a batch shrinks to one
    /// upsert or delete per key, sent as unordered `update` and `delete` commands per collection.
    /// Documents stay raw BSON: they are copied into the commands, never decoded.
    pub async fn apply(&self, writes: Vec<DocWrite>) -> Result<(), SinkError> {
        if writes.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let count = writes.len() as u64;
        for (ns, writes) in coalesce(writes) {
            let mut inserts = Vec::new();
            let mut upserts = Vec::new();
            let mut deletes = Vec::new();
            for write in writes {
                match write.kind {
                    DocWriteKind::Insert(doc) => inserts.push((write.key, doc)),
                    DocWriteKind::Upsert(doc) => upserts.push(upsert_statement(write.key, doc)),
                    DocWriteKind::Patch(updates) => self.patch(&ns, &write.key, updates).await?,
                    DocWriteKind::Delete => deletes.push(rawdoc! {"q": write.key, "limit": 1}),
                }
            }
            // Inserts first: the documents the target already has come back as upserts.
            upserts.extend(self.insert_new(&ns, inserts).await?);
            for chunk in chunks(upserts, self.batch_size) {
                self.write(&ns, "update", chunk).await?;
            }
            for chunk in chunks(deletes, self.batch_size) {
                self.write(&ns, "delete", chunk).await?;
            }
        }
        self.metrics.observe_apply_batch(started.elapsed().as_secs_f64(), count);
        Ok(())
    }

    /// One unordered `update` or `delete` command of raw statements (at most a batch), retried
    /// while it fails transiently.
    async fn write(&self, ns: &Namespace, command: &'static str, statements: Vec<RawDocumentBuf>) -> Result<(), SinkError> {
        let field = if command == "update" { "updates" } else { "deletes" };
        let mut array = RawArrayBuf::new();
        for statement in statements {
            array.push(statement);
        }
        let mut body = RawDocumentBuf::new();
        body.append(command, ns.coll.as_str());
        body.append(field, array);
        body.append("ordered", false);
        let reply = self
            .retrying(ns, command, || async {
                self.db(ns).run_raw_command(body.clone()).await.map_err(|source| SinkError::Command { command, ns: ns.to_string(), source })
            })
            .await?;
        check_write_errors(ns, &reply)
    }

    /// Applies update operators to one document, in order. The caller sends a patch alone, after
    /// every earlier write: unlike whole-document writes, patches do not commute.
    async fn patch(&self, ns: &Namespace, key: &RawDocument, updates: Vec<Document>) -> Result<(), SinkError> {
        let key = Document::try_from(key).map_err(|e| SinkError::WriteRefused {
            ns: ns.to_string(),
            code: 0,
            message: format!("the document key is not valid BSON: {e}"),
        })?;
        let statements: Vec<Document> = updates.into_iter().map(|u| doc! {"q": key.clone(), "u": u}).collect();
        let reply = self.command(ns, "update", &doc! {"update": &ns.coll, "updates": statements, "ordered": true}).await?;
        check_write_errors(ns, &reply)
    }

    /// Inserts new documents with plain inserts, the cheapest write; returns replacement
    /// statements for the ones whose `_id` the target already holds.
    async fn insert_new(&self, ns: &Namespace, inserts: Vec<(RawDocumentBuf, RawDocumentBuf)>) -> Result<Vec<RawDocumentBuf>, SinkError> {
        let (keys, docs): (Vec<RawDocumentBuf>, Vec<RawDocumentBuf>) = inserts.into_iter().unzip();
        let mut keys = keys.into_iter();
        let mut existing = Vec::new();
        for chunk in chunks(docs, self.batch_size) {
            let duplicates = self.insert(ns, &chunk).await?;
            let mut duplicates = duplicates.into_iter().peekable();
            for (index, (doc, key)) in chunk.into_iter().zip(keys.by_ref()).enumerate() {
                if duplicates.next_if_eq(&index).is_some() {
                    existing.push(upsert_statement(key, doc));
                }
            }
        }
        Ok(existing)
    }

    /// Inserts copied documents, as read from the source (raw BSON: no parsing or re-encoding);
    /// documents already in the target (a range copied again after a crash) are left as they
    /// are: the change stream brings them up to date.
    pub async fn insert_copied(&self, ns: &Namespace, docs: Vec<RawDocumentBuf>) -> Result<(), SinkError> {
        for chunk in chunks(docs, self.batch_size) {
            self.insert(ns, &chunk).await?;
        }
        Ok(())
    }

    /// One unordered insert of raw documents, retried while it fails transiently. Sent as a
    /// document sequence (`insert_many`), which the server reads as it is, where the same
    /// documents inside the command's body cost it noticeably more (benchmark, target CPU).
    /// Returns the positions, in order, of documents whose key the target already holds; the
    /// reply does not say which index refused them, so a unique secondary index conflict
    /// surfaces on the replacement that follows.
    async fn insert(&self, ns: &Namespace, docs: &[RawDocumentBuf]) -> Result<Vec<usize>, SinkError> {
        let coll = self.client.database(&ns.db).collection::<RawDocumentBuf>(&ns.coll);
        self.retrying(ns, "insert", || async {
            let err = match coll.insert_many(docs).ordered(false).await {
                Ok(_) => return Ok(Vec::new()),
                Err(err) => err,
            };
            if let ErrorKind::InsertMany(InsertManyError { write_errors: Some(errors), write_concern_error: None, .. }) = err.kind.as_ref() {
                if let Some(e) = errors.iter().find(|e| e.code != code::DUPLICATE_KEY) {
                    return Err(SinkError::WriteRefused { ns: ns.to_string(), code: e.code, message: e.message.chars().take(500).collect() });
                }
                let mut duplicates: Vec<usize> = errors.iter().map(|e| e.index).collect();
                duplicates.sort_unstable();
                return Ok(duplicates);
            }
            Err(SinkError::Command { command: "insert", ns: ns.to_string(), source: err })
        })
        .await
    }

    /// Applies a DDL change. Replaying one after a crash is harmless: "already done" answers
    /// (namespace not found, exists, index not found) count as success.
    pub async fn apply_ddl(&self, ddl: &Ddl) -> Result<(), SinkError> {
        let result = match ddl {
            Ddl::CreateCollection { ns, options } => {
                let mut command = doc! {"create": &ns.coll};
                command.extend(options.clone());
                self.command(ns, "create", &command).await.map(drop)
            }
            Ddl::DropCollection(ns) => self.command(ns, "drop", &doc! {"drop": &ns.coll}).await.map(drop),
            Ddl::RenameCollection { from, to } => {
                let admin = Namespace::new("admin", "$cmd");
                let command = doc! {"renameCollection": from.to_string(), "to": to.to_string(), "dropTarget": true};
                self.command(&admin, "renameCollection", &command).await.map(drop)
            }
            Ddl::DropDatabase { source_db, target_db } => self.drop_database(source_db, target_db).await,
            Ddl::CreateIndexes { ns, indexes } => self.create_indexes(ns, indexes.clone()).await,
            Ddl::DropIndexes { ns, names } => {
                self.command(ns, "dropIndexes", &doc! {"dropIndexes": &ns.coll, "index": names.clone()}).await.map(drop)
            }
            // Copied by the snapshot copier, which owns the source side, before this is called.
            Ddl::CopyCollection { .. } => Ok(()),
        };
        match result {
            Err(SinkError::Command { source, .. })
                if matches!(error_code(&source), Some(code::NAMESPACE_NOT_FOUND | code::INDEX_NOT_FOUND | code::NAMESPACE_EXISTS)) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    pub async fn create_indexes(&self, ns: &Namespace, indexes: Vec<Document>) -> Result<(), SinkError> {
        if indexes.is_empty() {
            return Ok(());
        }
        self.command(ns, "createIndexes", &doc! {"createIndexes": &ns.coll, "indexes": indexes}).await.map(drop)
    }

    /// Drops the target collections that came from `source_db`; other collections a person keeps
    /// in the same target database stay.
    async fn drop_database(&self, source_db: &str, target_db: &str) -> Result<(), SinkError> {
        let target = Namespace::new(target_db, "$cmd");
        let names: Vec<String> = self.client.database(target_db).list_collection_names().await.map_err(|source| SinkError::Command {
            command: "listCollections",
            ns: target.to_string(),
            source,
        })?;
        for coll in names {
            let source = Namespace::new(source_db, coll.clone());
            let mapped = Namespace::new(target_db, coll);
            if self.map.includes(&source) && self.map.target(&source) == mapped {
                match self.command(&mapped, "drop", &doc! {"drop": &mapped.coll}).await {
                    Err(SinkError::Command { source, .. }) if error_code(&source) == Some(code::NAMESPACE_NOT_FOUND) => {}
                    other => other.map(drop)?,
                }
            }
        }
        Ok(())
    }

    /// The secondary indexes of a collection (for copying them), without their storage details.
    pub async fn list_indexes(client: &Client, ns: &Namespace) -> mongodb::error::Result<Vec<Document>> {
        let cursor = client.database(&ns.db).collection::<Document>(&ns.coll).list_indexes().await?;
        let models: Vec<mongodb::IndexModel> = cursor.try_collect().await?;
        let mut specs = Vec::new();
        for model in models {
            let mut spec = match mongodb::bson::to_document(&model.options) {
                Ok(options) => options,
                Err(_) => Document::new(),
            };
            if spec.get_str("name").ok() == Some("_id_") {
                continue;
            }
            spec.insert("key", model.keys);
            spec.remove("v");
            spec.remove("ns");
            specs.push(spec);
        }
        Ok(specs)
    }
}

/// Groups writes by namespace, keeping only the last write of each document key, in the order
/// of the keys' last writes.
fn coalesce(writes: Vec<DocWrite>) -> Vec<(Arc<Namespace>, Vec<DocWrite>)> {
    let mut groups: Vec<(Arc<Namespace>, Vec<DocWrite>)> = Vec::new();
    let mut group_of: HashMap<Arc<Namespace>, usize> = HashMap::new();
    for write in writes {
        let next = groups.len();
        let i = *group_of.entry(write.ns.clone()).or_insert(next);
        if i == next {
            groups.push((write.ns.clone(), Vec::new()));
        }
        groups[i].1.push(write);
    }
    for (_, group) in &mut groups {
        let mut last: HashMap<&[u8], usize> = HashMap::with_capacity(group.len());
        for (i, write) in group.iter().enumerate() {
            last.insert(write.key.as_bytes(), i);
        }
        if last.len() < group.len() {
            let keep: Vec<bool> = (0..group.len()).map(|i| last.get(group[i].key.as_bytes()) == Some(&i)).collect();
            let mut keep = keep.into_iter();
            group.retain(|_| keep.next().unwrap_or(true));
        }
    }
    groups
}

/// Splits raw documents into commands of at most `max` and about `MAX_COMMAND_BYTES`.
fn chunks(docs: Vec<RawDocumentBuf>, max: usize) -> Vec<Vec<RawDocumentBuf>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for doc in docs {
        let size = doc.as_bytes().len();
        if !current.is_empty() && (current.len() >= max || bytes + size > MAX_COMMAND_BYTES) {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(doc);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// A replacement by key. A document with a top-level `$`-prefixed field name (legal since
/// MongoDB 5) cannot be a replacement document, so it goes through `$replaceWith` of a literal.
fn upsert_statement(key: RawDocumentBuf, doc: RawDocumentBuf) -> RawDocumentBuf {
    if doc.iter().any(|field| field.is_ok_and(|(name, _)| name.starts_with('$'))) {
        rawdoc! {"q": key, "u": [{"$replaceWith": {"$literal": doc}}], "upsert": true}
    } else {
        rawdoc! {"q": key, "u": doc, "upsert": true}
    }
}

/// Turns the first of a write command's `writeErrors` into an error.
fn check_write_errors(ns: &Namespace, reply: &Document) -> Result<(), SinkError> {
    let Some(error) = reply.get_array("writeErrors").ok().and_then(|errors| errors.iter().find_map(Bson::as_document)) else {
        return Ok(());
    };
    let code = error.get_i32("code").unwrap_or_default();
    let message = error.get_str("errmsg").unwrap_or("(no message)").chars().take(500).collect();
    Err(SinkError::WriteRefused { ns: ns.to_string(), code, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(doc: Document) -> RawDocumentBuf {
        RawDocumentBuf::from_document(&doc).unwrap()
    }

    fn write(coll: &str, id: i32, kind: DocWriteKind) -> DocWrite {
        DocWrite { ns: Arc::new(Namespace::new("db", coll)), key: raw(doc! {"_id": id}), kind }
    }

    #[test]
    fn coalescing_keeps_the_last_write_per_document() {
        let writes = vec![
            write("a", 1, DocWriteKind::Upsert(raw(doc! {"_id": 1, "v": 1}))),
            write("b", 1, DocWriteKind::Delete),
            write("a", 2, DocWriteKind::Upsert(raw(doc! {"_id": 2}))),
            write("a", 1, DocWriteKind::Delete),
            write("a", 1, DocWriteKind::Upsert(raw(doc! {"_id": 1, "v": 3}))),
        ];
        let grouped = coalesce(writes);
        assert_eq!(grouped.len(), 2);
        assert_eq!(*grouped[0].0, Namespace::new("db", "a"));
        assert_eq!(
            grouped[0].1,
            vec![write("a", 2, DocWriteKind::Upsert(raw(doc! {"_id": 2}))), write("a", 1, DocWriteKind::Upsert(raw(doc! {"_id": 1, "v": 3})))]
        );
        assert_eq!(grouped[1].1, vec![write("b", 1, DocWriteKind::Delete)]);
    }

    #[test]
    fn equal_keys_of_other_types_are_other_documents() {
        let int32 = DocWrite { key: raw(doc! {"_id": 1_i32}), ..write("a", 0, DocWriteKind::Delete) };
        let int64 = DocWrite { key: raw(doc! {"_id": 1_i64}), ..write("a", 0, DocWriteKind::Delete) };
        assert_eq!(coalesce(vec![int32, int64])[0].1.len(), 2, "1 and 1L are both kept: the target decides whether they match");
    }

    #[test]
    fn dollar_prefixed_fields_replace_through_a_literal_pipeline() {
        assert_eq!(
            upsert_statement(raw(doc! {"_id": 1}), raw(doc! {"_id": 1, "a.b": 2})),
            raw(doc! {"q": {"_id": 1}, "u": {"_id": 1, "a.b": 2}, "upsert": true})
        );
        assert_eq!(
            upsert_statement(raw(doc! {"_id": 1}), raw(doc! {"_id": 1, "$price": 2})),
            raw(doc! {"q": {"_id": 1}, "u": [{"$replaceWith": {"$literal": {"_id": 1, "$price": 2}}}], "upsert": true})
        );
    }

    #[test]
    fn chunks_respect_count_and_size() {
        let small: Vec<_> = (0..25).map(|i| raw(doc! {"_id": i})).collect();
        assert_eq!(chunks(small, 10).iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
        let big = || raw(doc! {"_id": 1, "blob": "x".repeat(3 * 1024 * 1024)});
        let sizes: Vec<_> = chunks(vec![big(), big(), big(), big()], 1000).iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 2]);
    }

    #[test]
    fn write_errors_name_the_collection_and_code() {
        let ns = Namespace::new("db", "c");
        let reply = doc! {"ok": 1, "writeErrors": [{"index": 2, "code": 11000, "errmsg": "E11000 duplicate key", "keyPattern": {"sku": 1}}]};
        let err = check_write_errors(&ns, &reply).unwrap_err();
        assert!(err.to_string().contains("db.c") && err.to_string().contains("11000"));
        assert!(check_write_errors(&ns, &doc! {"ok": 1, "n": 3}).is_ok());
    }
}
