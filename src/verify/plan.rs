//! Splitting a collection into `_id` ranges compared in parallel.

use std::cmp::Ordering;

use mongodb::bson::{Bson, Document};

use super::compare::compare_values;
use crate::replicator::snapshot::{range_filter, type_rank};

/// One `_id` range `[lower, upper)` of a source namespace; open ends are `None`.
#[derive(Clone, Debug, PartialEq)]
pub struct Partition {
    pub ns: String,
    pub index: u32,
    pub lower: Option<Bson>,
    pub upper: Option<Bson>,
}

impl Partition {
    /// The `find` filter of the range, for both sides.
    pub fn filter(&self) -> Document {
        range_filter(self.lower.as_ref(), self.upper.as_ref(), None)
    }
}

/// How many partitions a collection of `count` documents gets.
pub fn partition_count(count: u64, partition_documents: u64, max_partitions: u64) -> u64 {
    if partition_documents == 0 {
        return 1;
    }
    count.div_ceil(partition_documents).clamp(1, max_partitions.max(1))
}

/// The partitions of a namespace from the `_id`s found at even steps of the `_id` order
/// (`first` and `last` are the smallest and largest). Range queries match only values of the
/// bound's own type bracket, so a collection whose `_id`s span several brackets is one range.
pub fn partitions(ns: &str, first: Option<&Bson>, last: Option<&Bson>, mut samples: Vec<Bson>) -> Vec<Partition> {
    let one = vec![Partition { ns: ns.to_string(), index: 0, lower: None, upper: None }];
    let (Some(first), Some(last)) = (first, last) else { return one };
    if type_rank(first) != type_rank(last) {
        return one;
    }
    samples.retain(|s| type_rank(s) == type_rank(first) && compare_values(s, first) == Ordering::Greater);
    samples.sort_by(compare_values);
    samples.dedup_by(|a, b| compare_values(a, b) == Ordering::Equal);
    let mut out = Vec::new();
    let mut lower = None;
    for (i, upper) in samples.into_iter().map(Some).chain(std::iter::once(None)).enumerate() {
        out.push(Partition { ns: ns.to_string(), index: i as u32, lower: lower.clone(), upper: upper.clone() });
        lower = upper;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_bounded() {
        assert_eq!(partition_count(0, 1000, 8), 1);
        assert_eq!(partition_count(2500, 1000, 8), 3);
        assert_eq!(partition_count(1_000_000, 1000, 8), 8);
        assert_eq!(partition_count(1_000_000, 0, 8), 1);
    }

    #[test]
    fn samples_become_contiguous_ranges() {
        let parts = partitions("d.c", Some(&Bson::Int64(0)), Some(&Bson::Int64(99)), vec![Bson::Int64(50), Bson::Int32(25), Bson::Int64(50)]);
        let bounds: Vec<(Option<Bson>, Option<Bson>)> = parts.iter().map(|p| (p.lower.clone(), p.upper.clone())).collect();
        assert_eq!(bounds, vec![(None, Some(Bson::Int32(25))), (Some(Bson::Int32(25)), Some(Bson::Int64(50))), (Some(Bson::Int64(50)), None)]);
        assert_eq!(parts.iter().map(|p| p.index).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn mixed_type_ids_make_one_range() {
        let parts = partitions("d.c", Some(&Bson::Int64(0)), Some(&Bson::String("z".into())), vec![Bson::Int64(5)]);
        assert_eq!(parts, vec![Partition { ns: "d.c".into(), index: 0, lower: None, upper: None }]);
        assert_eq!(parts[0].filter(), Document::new());
        assert_eq!(partitions("d.c", None, None, vec![]).len(), 1);
    }
}
