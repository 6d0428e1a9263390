//! Change events to writes: pure code, no I/O.
//!
//! Updates are applied as a replacement with the looked-up full document
//! (`fullDocument: updateLookup`) rather than by replaying `updateDescription`: a replacement by
//! `_id` is idempotent, so a replay after a crash converges; and `updateDescription` cannot say
//! whether `"a.b"` is a field named `a.b` or `b` inside `a` (the workload has both), while the
//! full document can. When the document is gone by lookup time (deleted later, or its collection
//! renamed or dropped since) the update's description is applied as operators, in order, unless
//! a path is ambiguous; a later delete, rename or drop then does the rest.
//!
//! Document events stay raw BSON from the change stream to the target: the full document and
//! its key are byte slices of the event, copied once and never parsed, so streaming a document
//! costs the replicator a copy, not a decode and an encode. Other events are rare and decoded.

use std::collections::HashMap;
use std::sync::Arc;

use mongodb::bson::{Bson, Document, RawBsonRef, RawDocument, RawDocumentBuf, Timestamp, doc};

use super::namespace::{Namespace, NamespaceMap};

/// A document write, keyed by the document key, in the target's namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct DocWrite {
    pub ns: Arc<Namespace>,
    /// The `documentKey` of the event (`{_id: ...}`, plus the shard key on sharded sources).
    pub key: RawDocumentBuf,
    pub kind: DocWriteKind,
}

/// What happens to one document.
#[derive(Clone, Debug, PartialEq)]
pub enum DocWriteKind {
    /// A new document. Written with a plain insert (the fast path); when the target already has
    /// it (a replay after a crash, or a copy that saw it) it is replaced instead.
    Insert(RawDocumentBuf),
    /// Replace (or insert) the whole document.
    Upsert(RawDocumentBuf),
    /// Update operators from an event's `updateDescription`, applied in order, for an update
    /// whose document could no longer be looked up.
    Patch(Vec<Document>),
    Delete,
}

/// A change to a collection or database as a whole, applied between document writes with every
/// earlier write flushed first.
#[derive(Clone, Debug, PartialEq)]
pub enum Ddl {
    /// Create a collection with options (capped, validators, ...).
    CreateCollection {
        ns: Namespace,
        options: Document,
    },
    DropCollection(Namespace),
    /// Rename inside the target; the source namespace was renamed and both names are replicated.
    RenameCollection {
        from: Namespace,
        to: Namespace,
    },
    /// A collection was renamed into the replicated set from outside it: copy it afresh.
    CopyCollection {
        source: Namespace,
        target: Namespace,
    },
    /// Drop the replicated collections of a target database (`source_db` names the source side).
    DropDatabase {
        source_db: String,
        target_db: String,
    },
    CreateIndexes {
        ns: Namespace,
        indexes: Vec<Document>,
    },
    DropIndexes {
        ns: Namespace,
        names: Vec<String>,
    },
}

/// What one change event asks of the target.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Write(DocWrite),
    Ddl(Ddl),
    /// Not replicated (filtered out, or an event type without effect on the data).
    Skip,
    /// The stream ended (collection or database scope after a drop or rename); reopen it with
    /// `startAfter` this event's token.
    Invalidate,
}

/// The operations counted in `mongo_replicator_events_applied_total`, by label.
pub const OPERATIONS: [&str; 5] = ["insert", "update", "replace", "delete", "ddl"];

/// The operation label used in metrics, as an index into [`OPERATIONS`].
pub fn operation_label(event: &RawDocument) -> usize {
    match event.get_str("operationType").unwrap_or("unknown") {
        "insert" => 0,
        "update" => 1,
        "replace" => 2,
        "delete" => 3,
        _ => 4,
    }
}

/// The source cluster time of an event, if it carries one.
pub fn cluster_time(event: &RawDocument) -> Option<Timestamp> {
    event.get_timestamp("clusterTime").ok()
}

/// An event the replicator cannot interpret.
#[derive(Debug, thiserror::Error)]
#[error("change event {operation} lacks {field}")]
pub struct MalformedEvent {
    pub operation: String,
    pub field: &'static str,
}

fn ns_of(event: &Document, field: &'static str, operation: &str) -> Result<Namespace, MalformedEvent> {
    let missing = || MalformedEvent { operation: operation.to_string(), field };
    let ns = event.get_document(field).map_err(|_| missing())?;
    let db = ns.get_str("db").map_err(|_| missing())?;
    let coll = ns.get_str("coll").map_err(|_| missing())?;
    Ok(Namespace::new(db, coll))
}

/// The target of each source namespace seen, so a document event costs a lookup instead of
/// pattern matching and new strings. Bounded: a source churning through collection names
/// starts it afresh.
pub struct Targets {
    map: Arc<NamespaceMap>,
    known: HashMap<String, Option<Arc<Namespace>>>,
    key: String,
}

impl Targets {
    const MOST: usize = 10_000;

    pub fn new(map: Arc<NamespaceMap>) -> Self {
        Self { map, known: HashMap::new(), key: String::new() }
    }

    pub fn map(&self) -> &NamespaceMap {
        &self.map
    }

    /// Where `db.coll` is replicated to; None when it is not included.
    fn of(&mut self, db: &str, coll: &str) -> Option<Arc<Namespace>> {
        self.key.clear();
        self.key.extend([db, "\0", coll]);
        if let Some(known) = self.known.get(self.key.as_str()) {
            return known.clone();
        }
        if self.known.len() >= Self::MOST {
            self.known.clear();
        }
        let ns = Namespace::new(db, coll);
        let target = self.map.includes(&ns).then(|| Arc::new(self.map.target(&ns)));
        self.known.insert(self.key.clone(), target.clone());
        target
    }
}

/// Maps one raw change event to what the target must do.
pub fn map_event(event: &RawDocument, targets: &mut Targets) -> Result<Action, MalformedEvent> {
    let operation = event.get_str("operationType").unwrap_or("unknown");
    let malformed = |field| MalformedEvent { operation: operation.to_string(), field };
    if !matches!(operation, "insert" | "replace" | "update" | "delete") {
        let event = Document::try_from(event).map_err(|_| malformed("a valid BSON body"))?;
        return map_other_event(&event, operation, targets.map());
    }
    let ns = event.get_document("ns").map_err(|_| malformed("ns"))?;
    let (db, coll) = match (ns.get_str("db"), ns.get_str("coll")) {
        (Ok(db), Ok(coll)) => (db, coll),
        _ => return Err(malformed("ns")),
    };
    let Some(target) = targets.of(db, coll) else { return Ok(Action::Skip) };
    let key = event.get_document("documentKey").map_err(|_| malformed("documentKey"))?.to_raw_document_buf();
    let kind = match (operation, event.get("fullDocument").ok().flatten()) {
        ("delete", _) => DocWriteKind::Delete,
        ("insert", Some(RawBsonRef::Document(doc))) => DocWriteKind::Insert(doc.to_raw_document_buf()),
        (_, Some(RawBsonRef::Document(doc))) => DocWriteKind::Upsert(doc.to_raw_document_buf()),
        // Gone by lookup time: deleted (its delete follows) or its collection renamed or
        // dropped since. The update's own description still says what changed.
        ("update", Some(RawBsonRef::Null) | None) => {
            let event = Document::try_from(event).map_err(|_| malformed("a valid BSON body"))?;
            match patch(&event) {
                Some(updates) => DocWriteKind::Patch(updates),
                None => return Ok(Action::Skip),
            }
        }
        _ => return Err(malformed("fullDocument")),
    };
    Ok(Action::Write(DocWrite { ns: target, key, kind }))
}

/// The update operators of an event's `updateDescription`: array truncations first, then
/// `$set`/`$unset`. None when there is nothing to do, or when a path is ambiguous (a field name
/// containing a dot, reported in `disambiguatedPaths`), which operators cannot express.
fn patch(event: &Document) -> Option<Vec<Document>> {
    let description = event.get_document("updateDescription").ok()?;
    if description.get_document("disambiguatedPaths").is_ok_and(|d| !d.is_empty()) {
        return None;
    }
    let mut updates = Vec::new();
    let mut truncate = Document::new();
    for array in description.get_array("truncatedArrays").map(|a| a.as_slice()).unwrap_or_default() {
        if let Some(array) = array.as_document()
            && let (Ok(field), Some(size)) = (array.get_str("field"), array.get("newSize"))
        {
            truncate.insert(field, doc! {"$each": [], "$slice": size.clone()});
        }
    }
    if !truncate.is_empty() {
        updates.push(doc! {"$push": truncate});
    }
    let mut operators = Document::new();
    if let Ok(set) = description.get_document("updatedFields")
        && !set.is_empty()
    {
        operators.insert("$set", set.clone());
    }
    let unset: Document = description
        .get_array("removedFields")
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|f| f.as_str().map(|f| (f.to_string(), Bson::String(String::new()))))
        .collect();
    if !unset.is_empty() {
        operators.insert("$unset", unset);
    }
    if !operators.is_empty() {
        updates.push(operators);
    }
    (!updates.is_empty()).then_some(updates)
}

/// Everything but the document-writing events: collection and database changes, decoded.
fn map_other_event(event: &Document, operation: &str, map: &NamespaceMap) -> Result<Action, MalformedEvent> {
    let malformed = |field| MalformedEvent { operation: operation.to_string(), field };
    match operation {
        "drop" => {
            let ns = ns_of(event, "ns", operation)?;
            Ok(if map.includes(&ns) { Action::Ddl(Ddl::DropCollection(map.target(&ns))) } else { Action::Skip })
        }
        "rename" => {
            let from = ns_of(event, "ns", operation)?;
            let to = ns_of(event, "to", operation)?;
            Ok(match (map.includes(&from), map.includes(&to)) {
                (true, true) => Action::Ddl(Ddl::RenameCollection { from: map.target(&from), to: map.target(&to) }),
                (true, false) => Action::Ddl(Ddl::DropCollection(map.target(&from))),
                (false, true) => Action::Ddl(Ddl::CopyCollection { target: map.target(&to), source: to }),
                (false, false) => Action::Skip,
            })
        }
        "dropDatabase" => {
            let db = event.get_document("ns").and_then(|ns| ns.get_str("db")).map_err(|_| malformed("ns.db"))?;
            Ok(match map.target_database(db) {
                Some(target_db) if map.may_include_database(db) => Action::Ddl(Ddl::DropDatabase { source_db: db.to_string(), target_db }),
                _ => Action::Skip,
            })
        }
        "create" => {
            let ns = ns_of(event, "ns", operation)?;
            if !map.includes(&ns) {
                return Ok(Action::Skip);
            }
            let mut options = event.get_document("operationDescription").cloned().unwrap_or_default();
            // The _id index comes with every collection.
            options.remove("idIndex");
            Ok(Action::Ddl(Ddl::CreateCollection { ns: map.target(&ns), options }))
        }
        "createIndexes" => {
            let ns = ns_of(event, "ns", operation)?;
            if !map.includes(&ns) {
                return Ok(Action::Skip);
            }
            let indexes = index_specs(event).ok_or_else(|| malformed("operationDescription.indexes"))?;
            Ok(Action::Ddl(Ddl::CreateIndexes { ns: map.target(&ns), indexes }))
        }
        "dropIndexes" => {
            let ns = ns_of(event, "ns", operation)?;
            if !map.includes(&ns) {
                return Ok(Action::Skip);
            }
            let indexes = index_specs(event).ok_or_else(|| malformed("operationDescription.indexes"))?;
            let names = indexes.iter().filter_map(|i| i.get_str("name").ok().map(str::to_string)).collect();
            Ok(Action::Ddl(Ddl::DropIndexes { ns: map.target(&ns), names }))
        }
        "invalidate" => Ok(Action::Invalidate),
        // modify, shardCollection, refineCollectionShardKey, reshardCollection, ...: no data to move.
        _ => Ok(Action::Skip),
    }
}

fn index_specs(event: &Document) -> Option<Vec<Document>> {
    let indexes = event.get_document("operationDescription").ok()?.get_array("indexes").ok()?;
    Some(
        indexes
            .iter()
            .filter_map(|i| i.as_document().cloned())
            .map(|mut spec| {
                // `v` and `ns` describe the source's storage, not the index.
                spec.remove("v");
                spec.remove("ns");
                spec
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicator::config::{NamespaceRules as NamespaceFilter, Rename as RenameRule};
    use mongodb::bson::doc;

    fn map() -> NamespaceMap {
        let filter = NamespaceFilter {
            include: vec!["shop.*".into(), "crm.customers".into()],
            exclude: vec!["shop.tmp".into()],
            rename: vec![RenameRule { from: "shop.*".into(), to: "shop_dr.*".into() }],
        };
        NamespaceMap::new(Some(&filter), "mongo_replicator").expect("valid filter")
    }

    fn ns(db: &str, coll: &str) -> Document {
        doc! {"db": db, "coll": coll}
    }

    /// The event as the change stream hands it over: raw BSON.
    fn map_event(event: Document, map: &NamespaceMap) -> Result<Action, MalformedEvent> {
        super::map_event(&RawDocumentBuf::from_document(&event).unwrap(), &mut Targets::new(Arc::new(map.clone())))
    }

    fn raw(doc: Document) -> RawDocumentBuf {
        RawDocumentBuf::from_document(&doc).unwrap()
    }

    fn write(db: &str, coll: &str, key: Document, kind: DocWriteKind) -> Action {
        Action::Write(DocWrite { ns: Arc::new(Namespace::new(db, coll)), key: raw(key), kind })
    }

    #[test]
    fn inserts_replaces_and_updates_write_the_full_document_in_the_renamed_namespace() {
        for op in ["insert", "replace", "update"] {
            let event = doc! {"operationType": op, "ns": ns("shop", "items"), "documentKey": {"_id": 1}, "fullDocument": {"_id": 1, "a.b": 2}};
            let full = raw(doc! {"_id": 1, "a.b": 2});
            let kind = if op == "insert" { DocWriteKind::Insert(full) } else { DocWriteKind::Upsert(full) };
            assert_eq!(map_event(event.clone(), &map()).unwrap(), write("shop_dr", "items", doc! {"_id": 1}, kind), "{op}");
        }
    }

    #[test]
    fn an_update_whose_document_is_gone_applies_its_description_but_an_insert_without_document_is_malformed() {
        let update = doc! {"operationType": "update", "ns": ns("shop", "items"), "documentKey": {"_id": 1}, "fullDocument": Bson::Null,
        "updateDescription": {"updatedFields": {"n": 2, "nested.x": 1}, "removedFields": ["old"], "truncatedArrays": [{"field": "tags", "newSize": 2}], "disambiguatedPaths": {}}};
        assert_eq!(
            map_event(update.clone(), &map()).unwrap(),
            write(
                "shop_dr",
                "items",
                doc! {"_id": 1},
                DocWriteKind::Patch(vec![
                    doc! {"$push": {"tags": {"$each": [], "$slice": 2}}},
                    doc! {"$set": {"n": 2, "nested.x": 1}, "$unset": {"old": ""}}
                ])
            )
        );
        let ambiguous = doc! {"operationType": "update", "ns": ns("shop", "items"), "documentKey": {"_id": 1}, "fullDocument": Bson::Null,
        "updateDescription": {"updatedFields": {"a.b": 2}, "removedFields": [], "disambiguatedPaths": {"a.b": ["a.b"]}}};
        assert_eq!(map_event(ambiguous, &map()).unwrap(), Action::Skip);
        let without_description = doc! {"operationType": "update", "ns": ns("shop", "items"), "documentKey": {"_id": 1}, "fullDocument": Bson::Null};
        assert_eq!(map_event(without_description, &map()).unwrap(), Action::Skip);
        let insert = doc! {"operationType": "insert", "ns": ns("shop", "items"), "documentKey": {"_id": 1}};
        assert!(map_event(insert.clone(), &map()).is_err());
    }

    #[test]
    fn deletes_key_by_document_key() {
        let event = doc! {"operationType": "delete", "ns": ns("crm", "customers"), "documentKey": {"_id": "c1"}};
        assert_eq!(map_event(event.clone(), &map()).unwrap(), write("crm", "customers", doc! {"_id": "c1"}, DocWriteKind::Delete));
    }

    #[test]
    fn a_document_event_without_its_namespace_or_key_is_malformed() {
        let no_ns = doc! {"operationType": "insert", "documentKey": {"_id": 1}, "fullDocument": {"_id": 1}};
        assert_eq!(map_event(no_ns, &map()).unwrap_err().field, "ns");
        let no_key = doc! {"operationType": "delete", "ns": ns("shop", "items")};
        assert_eq!(map_event(no_key, &map()).unwrap_err().field, "documentKey");
    }

    #[test]
    fn the_target_cache_answers_like_the_map_for_every_namespace() {
        let mut targets = Targets::new(Arc::new(map()));
        for _ in 0..2 {
            assert_eq!(targets.of("shop", "items").as_deref(), Some(&Namespace::new("shop_dr", "items")));
            assert_eq!(targets.of("shop", "tmp"), None);
            // No confusion between "a" + "b.c" and "a.b" + "c".
            assert_eq!(targets.of("crm", "customers").as_deref(), Some(&Namespace::new("crm", "customers")));
            assert_eq!(targets.of("crm.customers", ""), None);
        }
    }

    #[test]
    fn filtered_namespaces_are_skipped() {
        for (db, coll) in [("shop", "tmp"), ("crm", "leads"), ("other", "x")] {
            let event = doc! {"operationType": "insert", "ns": ns(db, coll), "documentKey": {"_id": 1}, "fullDocument": {"_id": 1}};
            assert_eq!(map_event(event.clone(), &map()).unwrap(), Action::Skip, "{db}.{coll}");
        }
    }

    #[test]
    fn renames_follow_the_filter_on_both_sides() {
        let rename = |from: (&str, &str), to: (&str, &str)| {
            map_event(doc! {"operationType": "rename", "ns": ns(from.0, from.1), "to": ns(to.0, to.1)}, &map()).unwrap()
        };
        assert_eq!(
            rename(("shop", "a"), ("shop", "b")),
            Action::Ddl(Ddl::RenameCollection { from: Namespace::new("shop_dr", "a"), to: Namespace::new("shop_dr", "b") })
        );
        assert_eq!(rename(("shop", "a"), ("shop", "tmp")), Action::Ddl(Ddl::DropCollection(Namespace::new("shop_dr", "a"))));
        assert_eq!(
            rename(("shop", "tmp"), ("shop", "b")),
            Action::Ddl(Ddl::CopyCollection { source: Namespace::new("shop", "b"), target: Namespace::new("shop_dr", "b") })
        );
        assert_eq!(rename(("x", "a"), ("x", "b")), Action::Skip);
    }

    #[test]
    fn drops_and_index_ddl_map_to_the_target() {
        let drop = doc! {"operationType": "drop", "ns": ns("shop", "items")};
        assert_eq!(map_event(drop.clone(), &map()).unwrap(), Action::Ddl(Ddl::DropCollection(Namespace::new("shop_dr", "items"))));
        let create = doc! {"operationType": "createIndexes", "ns": ns("shop", "items"),
        "operationDescription": {"indexes": [{"v": 2, "key": {"sku": 1}, "name": "sku_1", "unique": true}]}};
        assert_eq!(
            map_event(create.clone(), &map()).unwrap(),
            Action::Ddl(Ddl::CreateIndexes {
                ns: Namespace::new("shop_dr", "items"),
                indexes: vec![doc! {"key": {"sku": 1}, "name": "sku_1", "unique": true}]
            })
        );
        let dropped = doc! {"operationType": "dropIndexes", "ns": ns("shop", "items"),
        "operationDescription": {"indexes": [{"v": 2, "key": {"sku": 1}, "name": "sku_1"}]}};
        assert_eq!(
            map_event(dropped.clone(), &map()).unwrap(),
            Action::Ddl(Ddl::DropIndexes { ns: Namespace::new("shop_dr", "items"), names: vec!["sku_1".into()] })
        );
        let created = doc! {"operationType": "create", "ns": ns("shop", "log"),
        "operationDescription": {"capped": true, "size": 4096, "idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"}}};
        assert_eq!(
            map_event(created.clone(), &map()).unwrap(),
            Action::Ddl(Ddl::CreateCollection { ns: Namespace::new("shop_dr", "log"), options: doc! {"capped": true, "size": 4096} })
        );
    }

    #[test]
    fn drop_database_maps_whole_database_renames_only() {
        let drop_db = |db: &str| map_event(doc! {"operationType": "dropDatabase", "ns": {"db": db}}, &map()).unwrap();
        assert_eq!(drop_db("shop"), Action::Ddl(Ddl::DropDatabase { source_db: "shop".into(), target_db: "shop_dr".into() }));
        assert_eq!(drop_db("other"), Action::Skip);
    }

    #[test]
    fn invalidate_and_unknown_events() {
        assert_eq!(map_event(doc! {"operationType": "invalidate"}, &map()).unwrap(), Action::Invalidate);
        assert_eq!(map_event(doc! {"operationType": "modify", "ns": ns("shop", "x")}, &map()).unwrap(), Action::Skip);
        assert_eq!(OPERATIONS[operation_label(&raw(doc! {"operationType": "rename"}))], "ddl");
        assert_eq!(OPERATIONS[operation_label(&raw(doc! {"operationType": "delete"}))], "delete");
    }
}
