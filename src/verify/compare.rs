//! Pure comparison: `_id`s in MongoDB's sort order, documents byte for byte (or with keys
//! sorted), the merge join of two `_id`-sorted runs, and indexes and collection options.

use std::cmp::Ordering;

use mongodb::bson::{Bson, Document, RawDocumentBuf};
use serde::Serialize;

use crate::replicator::snapshot::type_rank;

/// What differs. Document kinds carry the `_id`; index kinds the index name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum MismatchKind {
    /// The source has a document the target lacks.
    MissingInTarget,
    /// The target has a document the source lacks.
    ExtraInTarget,
    /// Both have the document, with different bytes.
    Different,
    /// The source has an index the target lacks.
    IndexMissing,
    /// An index differs in keys or options, or only the target has it.
    IndexDifferent,
    /// The collection's creation options differ, or the target collection does not exist.
    OptionsDifferent,
    /// The collections hold different numbers of documents.
    CountDifferent,
}

impl MismatchKind {
    pub const ALL: [MismatchKind; 7] = [
        MismatchKind::MissingInTarget,
        MismatchKind::ExtraInTarget,
        MismatchKind::Different,
        MismatchKind::IndexMissing,
        MismatchKind::IndexDifferent,
        MismatchKind::OptionsDifferent,
        MismatchKind::CountDifferent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MismatchKind::MissingInTarget => "MissingInTarget",
            MismatchKind::ExtraInTarget => "ExtraInTarget",
            MismatchKind::Different => "Different",
            MismatchKind::IndexMissing => "IndexMissing",
            MismatchKind::IndexDifferent => "IndexDifferent",
            MismatchKind::OptionsDifferent => "OptionsDifferent",
            MismatchKind::CountDifferent => "CountDifferent",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// Whether the kind is about one document (and so is rechecked by `_id`).
    pub fn is_document(self) -> bool {
        matches!(self, MismatchKind::MissingInTarget | MismatchKind::ExtraInTarget | MismatchKind::Different)
    }
}

/// Longest `_id` text in a report; longer ones are cut (an `_id` may be a large document).
pub const ID_TEXT_LIMIT: usize = 200;

/// An `_id` as canonical extended JSON (so `Int32` 1 and `Int64` 1 read differently), cut to
/// [`ID_TEXT_LIMIT`] bytes.
pub fn id_text(id: &Bson) -> String {
    let text = id.clone().into_canonical_extjson().to_string();
    if text.len() <= ID_TEXT_LIMIT {
        return text;
    }
    let mut end = ID_TEXT_LIMIT - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// MongoDB's order of two values (the default, binary collation): type rank first, numbers by
/// value across their types, documents field by field, binaries by length, subtype, bytes.
pub fn compare_values(a: &Bson, b: &Bson) -> Ordering {
    let rank = type_rank(a).cmp(&type_rank(b));
    if rank != Ordering::Equal {
        return rank;
    }
    match (a, b) {
        (Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_), _) => compare_numbers(a, b),
        (Bson::String(x) | Bson::Symbol(x), Bson::String(y) | Bson::Symbol(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Bson::Document(x), Bson::Document(y)) => compare_documents(x, y),
        (Bson::Array(x), Bson::Array(y)) => {
            for (u, v) in x.iter().zip(y) {
                let o = compare_values(u, v);
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        (Bson::Binary(x), Bson::Binary(y)) => {
            x.bytes.len().cmp(&y.bytes.len()).then(u8::from(x.subtype).cmp(&u8::from(y.subtype))).then_with(|| x.bytes.cmp(&y.bytes))
        }
        (Bson::ObjectId(x), Bson::ObjectId(y)) => x.bytes().cmp(&y.bytes()),
        (Bson::Boolean(x), Bson::Boolean(y)) => x.cmp(y),
        (Bson::DateTime(x), Bson::DateTime(y)) => x.timestamp_millis().cmp(&y.timestamp_millis()),
        (Bson::Timestamp(x), Bson::Timestamp(y)) => (x.time, x.increment).cmp(&(y.time, y.increment)),
        (Bson::RegularExpression(x), Bson::RegularExpression(y)) => x.pattern.cmp(&y.pattern).then_with(|| x.options.cmp(&y.options)),
        // Rare `_id` types (code, DBPointer): a stable order; a disagreement with the server's
        // only costs a recheck by `_id`, never a wrong verdict.
        _ => format!("{a:?}").cmp(&format!("{b:?}")),
    }
}

fn compare_numbers(a: &Bson, b: &Bson) -> Ordering {
    match (a, b) {
        (Bson::Int32(_) | Bson::Int64(_), Bson::Int32(_) | Bson::Int64(_)) => as_i64(a).cmp(&as_i64(b)),
        _ => {
            let (x, y) = (as_f64(a), as_f64(b));
            // NaN sorts before every other number in MongoDB.
            match (x.is_nan(), y.is_nan()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Less,
                (false, true) => Ordering::Greater,
                _ => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
            }
        }
    }
}

fn as_i64(v: &Bson) -> i64 {
    match v {
        Bson::Int32(i) => i64::from(*i),
        Bson::Int64(i) => *i,
        _ => 0,
    }
}

fn as_f64(v: &Bson) -> f64 {
    match v {
        Bson::Int32(i) => f64::from(*i),
        Bson::Int64(i) => *i as f64,
        Bson::Double(d) => *d,
        // Decimal128 has no arithmetic here; its text parses closely enough to order `_id`s.
        Bson::Decimal128(d) => d.to_string().parse().unwrap_or(f64::NAN),
        _ => f64::NAN,
    }
}

fn compare_documents(x: &Document, y: &Document) -> Ordering {
    for ((ka, va), (kb, vb)) in x.iter().zip(y.iter()) {
        let o = type_rank(va).cmp(&type_rank(vb)).then_with(|| ka.as_bytes().cmp(kb.as_bytes())).then_with(|| compare_values(va, vb));
        if o != Ordering::Equal {
            return o;
        }
    }
    x.len().cmp(&y.len())
}

/// A document with its keys sorted at every depth (arrays keep their order).
pub fn canonical(doc: &Document) -> Document {
    let mut keys: Vec<&String> = doc.keys().collect();
    keys.sort();
    keys.into_iter().map(|k| (k.clone(), canonical_value(&doc[k]))).collect()
}

fn canonical_value(v: &Bson) -> Bson {
    match v {
        Bson::Document(d) => Bson::Document(canonical(d)),
        Bson::Array(a) => Bson::Array(a.iter().map(canonical_value).collect()),
        other => other.clone(),
    }
}

/// How documents are compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Comparison {
    /// Sort keys at every depth before comparing (for targets that reorder fields).
    pub ignore_field_order: bool,
}

impl Comparison {
    /// Whether two documents are the same: their raw BSON bytes (field order, numeric types
    /// and `-0.0` matter), or the bytes of their key-sorted forms.
    pub fn same(&self, a: &RawDocumentBuf, b: &RawDocumentBuf) -> bool {
        if a.as_bytes() == b.as_bytes() {
            return true;
        }
        if !self.ignore_field_order {
            return false;
        }
        match (a.to_document(), b.to_document()) {
            (Ok(x), Ok(y)) => bytes_of(&canonical(&x)) == bytes_of(&canonical(&y)),
            _ => false,
        }
    }
}

fn bytes_of(doc: &Document) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing a document into a Vec fails only for a key with a NUL byte, which parsed BSON lacks.
    let _ = doc.to_writer(&mut out);
    out
}

/// The `_id` of a raw document (`Null` when it has none, which MongoDB does not allow).
pub fn raw_id(doc: &RawDocumentBuf) -> Bson {
    doc.get("_id").ok().flatten().and_then(|id| Bson::try_from(id).ok()).unwrap_or(Bson::Null)
}

/// A document mismatch found by a merge join.
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentMismatch {
    pub id: Bson,
    pub kind: MismatchKind,
}

/// The outcome of merging two `_id`-sorted runs.
#[derive(Debug, Default, PartialEq)]
pub struct Merge {
    pub mismatches: Vec<DocumentMismatch>,
    /// Pairs compared (present on both sides).
    pub compared: u64,
}

/// Merge-joins two runs sorted by `_id` in [`compare_values`] order. Documents left over in
/// `source` or `target` past the other's last `_id` stay there when `more_source`/`more_target`
/// say the other side has more to read; otherwise they are missing or extra. Returns what was
/// decided; the undecided tails remain in the vectors for the next batch.
pub fn merge(
    source: &mut Vec<RawDocumentBuf>,
    target: &mut Vec<RawDocumentBuf>,
    more_source: bool,
    more_target: bool,
    comparison: Comparison,
) -> Merge {
    let mut out = Merge::default();
    let (mut i, mut j) = (0, 0);
    let (src_ids, dst_ids): (Vec<Bson>, Vec<Bson>) = (source.iter().map(raw_id).collect(), target.iter().map(raw_id).collect());
    while i < source.len() && j < target.len() {
        match compare_values(&src_ids[i], &dst_ids[j]) {
            Ordering::Equal => {
                out.compared += 1;
                if !comparison.same(&source[i], &target[j]) {
                    out.mismatches.push(DocumentMismatch { id: src_ids[i].clone(), kind: MismatchKind::Different });
                }
                i += 1;
                j += 1;
            }
            Ordering::Less => {
                out.mismatches.push(DocumentMismatch { id: src_ids[i].clone(), kind: MismatchKind::MissingInTarget });
                i += 1;
            }
            Ordering::Greater => {
                out.mismatches.push(DocumentMismatch { id: dst_ids[j].clone(), kind: MismatchKind::ExtraInTarget });
                j += 1;
            }
        }
    }
    // One side is used up: the other's rest is decided only when the used-up side has no more.
    if i == source.len() && !more_source {
        for id in &dst_ids[j..] {
            out.mismatches.push(DocumentMismatch { id: id.clone(), kind: MismatchKind::ExtraInTarget });
        }
        j = target.len();
    }
    if j == target.len() && !more_target {
        for id in &src_ids[i..] {
            out.mismatches.push(DocumentMismatch { id: id.clone(), kind: MismatchKind::MissingInTarget });
        }
        i = source.len();
    }
    source.drain(..i);
    target.drain(..j);
    out
}

/// An index as compared: what the server reports minus the fields that differ between equal
/// indexes (`v`, `ns`, `background`), option keys sorted; the key pattern keeps its order.
pub fn normalized_index(spec: &Document) -> Document {
    let mut options = spec.clone();
    for noise in ["v", "ns", "background"] {
        options.remove(noise);
    }
    let key = options.remove("key");
    let mut out = canonical(&options);
    if let Some(key) = key {
        out.insert("key", key);
    }
    out
}

/// Index differences of a collection, by index name.
pub fn compare_indexes(source: &[Document], target: &[Document]) -> Vec<(String, MismatchKind)> {
    let name = |d: &Document| d.get_str("name").unwrap_or_default().to_string();
    let mut out = Vec::new();
    for s in source {
        match target.iter().find(|t| name(t) == name(s)) {
            None => out.push((name(s), MismatchKind::IndexMissing)),
            // Bytes, not `Document ==`, which ignores key order (a key pattern's order matters).
            Some(t) if bytes_of(&normalized_index(s)) != bytes_of(&normalized_index(t)) => out.push((name(s), MismatchKind::IndexDifferent)),
            Some(_) => {}
        }
    }
    for t in target.iter().filter(|t| !source.iter().any(|s| name(s) == name(t))) {
        out.push((name(t), MismatchKind::IndexDifferent));
    }
    out.sort();
    out
}

/// Whether two collections' creation options are the same, in any key order.
pub fn same_options(source: &Document, target: &Document) -> bool {
    bytes_of(&canonical(source)) == bytes_of(&canonical(target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::oid::ObjectId;
    use mongodb::bson::{Binary, doc, rawdoc, spec::BinarySubtype};

    #[test]
    fn ids_sort_in_mongodb_order_across_types() {
        let ordered = vec![
            Bson::MinKey,
            Bson::Null,
            Bson::Double(f64::NAN),
            Bson::Int32(-5),
            Bson::Double(1.5),
            Bson::Int64(2),
            Bson::Int32(3),
            Bson::String("A".into()),
            Bson::String("a".into()),
            Bson::String("ab".into()),
            Bson::Document(doc! {"a": 1}),
            Bson::Document(doc! {"a": 1, "b": 1}),
            Bson::Document(doc! {"b": 0}),
            Bson::Binary(Binary { subtype: BinarySubtype::Uuid, bytes: vec![0] }),
            Bson::Binary(Binary { subtype: BinarySubtype::Generic, bytes: vec![0, 0] }),
            Bson::ObjectId(ObjectId::from_bytes([0; 12])),
            Bson::ObjectId(ObjectId::from_bytes([1; 12])),
            Bson::Boolean(false),
            Bson::Boolean(true),
            Bson::DateTime(mongodb::bson::DateTime::from_millis(-1)),
            Bson::DateTime(mongodb::bson::DateTime::from_millis(5)),
            Bson::MaxKey,
        ];
        for w in ordered.windows(2) {
            assert_eq!(compare_values(&w[0], &w[1]), Ordering::Less, "{:?} < {:?}", w[0], w[1]);
            assert_eq!(compare_values(&w[1], &w[0]), Ordering::Greater);
        }
        assert_eq!(compare_values(&Bson::Int32(7), &Bson::Int64(7)), Ordering::Equal, "numbers compare by value");
        assert_eq!(compare_values(&Bson::Int64(i64::MAX), &Bson::Int64(i64::MAX - 1)), Ordering::Greater, "no float rounding");
    }

    #[test]
    fn bytes_decide_unless_field_order_is_ignored() {
        let strict = Comparison::default();
        let relaxed = Comparison { ignore_field_order: true };
        let a = rawdoc! {"_id": 1, "x": 1, "y": {"p": 1, "q": 2}};
        let reordered = rawdoc! {"_id": 1, "y": {"q": 2, "p": 1}, "x": 1};
        assert!(strict.same(&a, &a.clone()));
        assert!(!strict.same(&a, &reordered));
        assert!(relaxed.same(&a, &reordered));
        // Types and -0.0 matter in both modes.
        assert!(!relaxed.same(&rawdoc! {"_id": 1, "n": 5_i64}, &rawdoc! {"_id": 1, "n": 5_i32}));
        assert!(!relaxed.same(&rawdoc! {"_id": 1, "z": 0.0}, &rawdoc! {"_id": 1, "z": -0.0}));
        // Arrays keep their order.
        assert!(!relaxed.same(&rawdoc! {"_id": 1, "a": [1, 2]}, &rawdoc! {"_id": 1, "a": [2, 1]}));
    }

    fn docs(ids: &[i64]) -> Vec<RawDocumentBuf> {
        ids.iter().map(|i| rawdoc! {"_id": *i, "v": *i}).collect()
    }

    #[test]
    fn the_merge_finds_missing_extra_and_different_and_keeps_undecided_tails() {
        let mut source = docs(&[1, 2, 4, 6]);
        let mut target = docs(&[1, 3, 4]);
        target[2] = rawdoc! {"_id": 4_i64, "v": 99};
        let merged = merge(&mut source, &mut target, true, true, Comparison::default());
        let kinds: Vec<(Bson, MismatchKind)> = merged.mismatches.iter().map(|m| (m.id.clone(), m.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (Bson::Int64(2), MismatchKind::MissingInTarget),
                (Bson::Int64(3), MismatchKind::ExtraInTarget),
                (Bson::Int64(4), MismatchKind::Different)
            ]
        );
        assert_eq!(merged.compared, 2);
        // 6 waits: the target may still hold it in its next batch.
        assert_eq!(source.len(), 1);
        assert!(target.is_empty());
        let end = merge(&mut source, &mut target, false, false, Comparison::default());
        assert_eq!(end.mismatches, vec![DocumentMismatch { id: Bson::Int64(6), kind: MismatchKind::MissingInTarget }]);
        assert!(source.is_empty());
    }

    #[test]
    fn the_merge_decides_the_rest_when_one_side_ends() {
        let mut source = docs(&[]);
        let mut target = docs(&[8, 9]);
        let merged = merge(&mut source, &mut target, false, true, Comparison::default());
        assert_eq!(merged.mismatches.len(), 2);
        assert!(merged.mismatches.iter().all(|m| m.kind == MismatchKind::ExtraInTarget));
        assert!(target.is_empty());
    }

    #[test]
    fn an_int32_id_pairs_with_an_int64_id_and_differs() {
        let mut source = vec![rawdoc! {"_id": 5_i64}];
        let mut target = vec![rawdoc! {"_id": 5_i32}];
        let merged = merge(&mut source, &mut target, false, false, Comparison { ignore_field_order: true });
        assert_eq!(merged.mismatches, vec![DocumentMismatch { id: Bson::Int64(5), kind: MismatchKind::Different }]);
    }

    #[test]
    fn indexes_compare_by_name_keys_and_options() {
        let source = vec![doc! {"v": 2, "key": {"a": 1, "b": -1}, "name": "a_b", "unique": true}, doc! {"key": {"c": 1}, "name": "c_1"}];
        let same = vec![doc! {"name": "a_b", "unique": true, "key": {"a": 1, "b": -1}, "v": 1, "ns": "x.y"}, doc! {"key": {"c": 1}, "name": "c_1"}];
        assert!(compare_indexes(&source, &same).is_empty());
        let differs = vec![doc! {"key": {"b": -1, "a": 1}, "name": "a_b", "unique": true}, doc! {"key": {"d": 1}, "name": "d_1"}];
        assert_eq!(
            compare_indexes(&source, &differs),
            vec![
                ("a_b".to_string(), MismatchKind::IndexDifferent),
                ("c_1".to_string(), MismatchKind::IndexMissing),
                ("d_1".to_string(), MismatchKind::IndexDifferent)
            ]
        );
        let options = vec![doc! {"key": {"a": 1, "b": -1}, "name": "a_b"}, doc! {"key": {"c": 1}, "name": "c_1"}];
        assert_eq!(compare_indexes(&source, &options), vec![("a_b".to_string(), MismatchKind::IndexDifferent)]);
    }

    #[test]
    fn ids_read_as_canonical_extended_json_cut_when_huge() {
        assert_eq!(id_text(&Bson::Int64(5)), r#"{"$numberLong":"5"}"#);
        assert_eq!(id_text(&Bson::Int32(5)), r#"{"$numberInt":"5"}"#);
        let huge = id_text(&Bson::String("x".repeat(10_000)));
        assert!(huge.len() <= ID_TEXT_LIMIT && huge.ends_with("..."));
    }

    #[test]
    fn options_compare_in_any_key_order() {
        assert!(same_options(&doc! {"capped": true, "size": 4096}, &doc! {"size": 4096, "capped": true}));
        assert!(!same_options(&doc! {"capped": true, "size": 4096}, &doc! {}));
    }
}
