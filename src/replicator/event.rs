//! Change events to writes: pure code, no I/O.
//!
//! Updates are applied as a replacement with the looked-up full document
//! (`fullDocument: updateLookup`) rather than by replaying `updateDescription`: a replacement by
//! `_id` is idempotent, so a replay after a crash converges; and `updateDescription` cannot say
//! whether `"a.b"` is a field named `a.b` or `b` inside `a` (the workload has both), while the
//! full document can. When the document is gone by lookup time (deleted later, or its collection
//! renamed or dropped since) the update's description is applied as operators, in order, unless
//! a path is ambiguous; a later delete, rename or drop then does the rest.

use mongodb::bson::{Bson, Document, Timestamp, doc};

use super::namespace::{Namespace, NamespaceMap};

/// A document write, keyed by the document key, in the target's namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct DocWrite {
    pub ns: Namespace,
    /// The `documentKey` of the event (`{_id: ...}`, plus the shard key on sharded sources).
    pub key: Document,
    pub kind: DocWriteKind,
}

/// What happens to one document.
#[derive(Clone, Debug, PartialEq)]
pub enum DocWriteKind {
    /// A new document. Written with a plain insert (the fast path); when the target already has
    /// it (a replay after a crash, or a copy that saw it) it is replaced instead.
    Insert(Document),
    /// Replace (or insert) the whole document.
    Upsert(Document),
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

/// The operation label used in metrics.
pub fn operation_label(event: &Document) -> &'static str {
    match event.get_str("operationType").unwrap_or("unknown") {
        "insert" => "insert",
        "update" => "update",
        "replace" => "replace",
        "delete" => "delete",
        _ => "ddl",
    }
}

/// The source cluster time of an event, if it carries one.
pub fn cluster_time(event: &Document) -> Option<Timestamp> {
    match event.get("clusterTime") {
        Some(Bson::Timestamp(ts)) => Some(*ts),
        _ => None,
    }
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

/// Maps one raw change event to what the target must do. Takes the event by value so the full
/// document moves into the write instead of being copied.
pub fn map_event(mut event: Document, map: &NamespaceMap) -> Result<Action, MalformedEvent> {
    let operation = event.get_str("operationType").unwrap_or("unknown").to_string();
    let malformed = |field| MalformedEvent { operation: operation.clone(), field };
    match operation.as_str() {
        "insert" | "replace" | "update" => {
            let ns = ns_of(&event, "ns", &operation)?;
            if !map.includes(&ns) {
                return Ok(Action::Skip);
            }
            let key = event.get_document("documentKey").map_err(|_| malformed("documentKey"))?.clone();
            match event.remove("fullDocument") {
                Some(Bson::Document(doc)) => Ok(Action::Write(DocWrite {
                    ns: map.target(&ns),
                    key,
                    kind: if operation == "insert" { DocWriteKind::Insert(doc) } else { DocWriteKind::Upsert(doc) },
                })),
                // Gone by lookup time: deleted (its delete follows) or its collection renamed or
                // dropped since. The update's own description still says what changed.
                Some(Bson::Null) | None if operation == "update" => Ok(match patch(&event) {
                    Some(updates) => Action::Write(DocWrite { ns: map.target(&ns), key, kind: DocWriteKind::Patch(updates) }),
                    None => Action::Skip,
                }),
                _ => Err(malformed("fullDocument")),
            }
        }
        _ => map_other_event(&event, &operation, map),
    }
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

/// Everything but the document-writing events, which only borrow the event.
fn map_other_event(event: &Document, operation: &str, map: &NamespaceMap) -> Result<Action, MalformedEvent> {
    let malformed = |field| MalformedEvent { operation: operation.to_string(), field };
    match operation {
        "delete" => {
            let ns = ns_of(event, "ns", operation)?;
            if !map.includes(&ns) {
                return Ok(Action::Skip);
            }
            let key = event.get_document("documentKey").map_err(|_| malformed("documentKey"))?.clone();
            Ok(Action::Write(DocWrite { ns: map.target(&ns), key, kind: DocWriteKind::Delete }))
        }
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

    #[test]
    fn inserts_replaces_and_updates_write_the_full_document_in_the_renamed_namespace() {
        for op in ["insert", "replace", "update"] {
            let event = doc! {"operationType": op, "ns": ns("shop", "items"), "documentKey": {"_id": 1}, "fullDocument": {"_id": 1, "a.b": 2}};
            let full = doc! {"_id": 1, "a.b": 2};
            let kind = if op == "insert" { DocWriteKind::Insert(full) } else { DocWriteKind::Upsert(full) };
            assert_eq!(
                map_event(event.clone(), &map()).unwrap(),
                Action::Write(DocWrite { ns: Namespace::new("shop_dr", "items"), key: doc! {"_id": 1}, kind }),
                "{op}"
            );
        }
    }

    #[test]
    fn an_update_whose_document_is_gone_applies_its_description_but_an_insert_without_document_is_malformed() {
        let update = doc! {"operationType": "update", "ns": ns("shop", "items"), "documentKey": {"_id": 1}, "fullDocument": Bson::Null,
        "updateDescription": {"updatedFields": {"n": 2, "nested.x": 1}, "removedFields": ["old"], "truncatedArrays": [{"field": "tags", "newSize": 2}], "disambiguatedPaths": {}}};
        assert_eq!(
            map_event(update.clone(), &map()).unwrap(),
            Action::Write(DocWrite {
                ns: Namespace::new("shop_dr", "items"),
                key: doc! {"_id": 1},
                kind: DocWriteKind::Patch(vec![
                    doc! {"$push": {"tags": {"$each": [], "$slice": 2}}},
                    doc! {"$set": {"n": 2, "nested.x": 1}, "$unset": {"old": ""}}
                ])
            })
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
        assert_eq!(
            map_event(event.clone(), &map()).unwrap(),
            Action::Write(DocWrite { ns: Namespace::new("crm", "customers"), key: doc! {"_id": "c1"}, kind: DocWriteKind::Delete })
        );
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
        assert_eq!(operation_label(&doc! {"operationType": "rename"}), "ddl");
        assert_eq!(operation_label(&doc! {"operationType": "delete"}), "delete");
    }
}
