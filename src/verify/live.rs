//! The decisions of live verification, without I/O: which documents a generation rechecks,
//! when a mismatch is old enough to report, and when the pass has a verdict.
//!
//! A document that changed (on either side, seen by a change stream) or mismatched is *due* for
//! a recheck once the lag allowance has passed since its last change (or since its mismatch was
//! first seen, when no change was seen): by then a replicator that keeps up has applied it. A recheck of a due
//! document is decisive: equal clears it, different makes a mismatch to report (until a later
//! change makes it due again). The pass ends when every mismatch is decisive and every change
//! made before the scan ended has been checked; changes after that are beyond the pass's
//! "verified to" time.

use std::collections::HashMap;

use mongodb::bson::Bson;

use super::compare::MismatchKind;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// A document the pass knows something about, by namespace and `_id`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocKey {
    /// The source namespace.
    pub ns: String,
    /// The `_id` as raw BSON bytes of `{_id: …}` (values of different types differ).
    pub id: Vec<u8>,
}

impl DocKey {
    pub fn new(ns: &str, id: &Bson) -> Self {
        let mut doc = mongodb::bson::Document::new();
        doc.insert("_id", id.clone());
        let mut bytes = Vec::new();
        let _ = doc.to_writer(&mut bytes);
        Self { ns: ns.to_string(), id: bytes }
    }
}

/// A document mismatch the pass holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub ns: String,
    pub id: Bson,
    pub kind: MismatchKind,
    /// When this pass first saw the document differ.
    pub first_seen: Millis,
    /// The last change seen to the document, on either side.
    pub last_change: Option<Millis>,
    /// Whether a recheck found it still different after the allowance: it is reported.
    pub settled: bool,
}

impl Entry {
    /// When a recheck of it becomes decisive: the allowance after its last change, or after
    /// it was first seen when no change was seen (it may have changed before the pass).
    pub fn due(&self, allowance: Millis) -> Millis {
        self.last_change.unwrap_or(self.first_seen) + allowance
    }
}

/// A changed document not yet rechecked.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub ns: String,
    pub id: Bson,
    pub at: Millis,
}

/// The documents the pass tracks: its mismatches and the changes not yet rechecked.
#[derive(Debug, Default)]
pub struct Ledger {
    pub entries: HashMap<DocKey, Entry>,
    pub changes: HashMap<DocKey, Change>,
    /// Whether any change was seen during the pass, per source namespace.
    pub changed_namespaces: std::collections::HashSet<String>,
}

/// What to recheck now: the documents due at `now`.
#[derive(Debug, Default, PartialEq)]
pub struct Recheck {
    /// `(namespace, _id)` pairs, sorted by namespace.
    pub docs: Vec<(String, Bson)>,
}

impl Ledger {
    /// A document changed at `at` (seen on either side).
    pub fn changed(&mut self, ns: &str, id: &Bson, at: Millis) {
        let key = DocKey::new(ns, id);
        self.changed_namespaces.insert(ns.to_string());
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.last_change = Some(entry.last_change.map_or(at, |t| t.max(at)));
            entry.settled = false;
        }
        let change = self.changes.entry(key).or_insert_with(|| Change { ns: ns.to_string(), id: id.clone(), at });
        change.at = change.at.max(at);
    }

    /// A mismatch found by the scan at `now`.
    pub fn found(&mut self, ns: &str, id: &Bson, kind: MismatchKind, now: Millis) {
        let key = DocKey::new(ns, id);
        let last_change = self.changes.get(&key).map(|c| c.at);
        self.entries.entry(key).and_modify(|e| e.kind = kind).or_insert(Entry {
            ns: ns.to_string(),
            id: id.clone(),
            kind,
            first_seen: now,
            last_change,
            settled: false,
        });
    }

    /// The documents due for a recheck at `now`: unsettled mismatches and changes whose
    /// allowance has passed.
    pub fn due(&self, now: Millis, allowance: Millis) -> Recheck {
        let mut docs: Vec<(String, Bson)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (key, entry) in &self.entries {
            if !entry.settled && entry.due(allowance) <= now && seen.insert(key) {
                docs.push((entry.ns.clone(), entry.id.clone()));
            }
        }
        for (key, change) in &self.changes {
            if change.at + allowance <= now && seen.insert(key) {
                docs.push((change.ns.clone(), change.id.clone()));
            }
        }
        docs.sort_by(|a, b| a.0.cmp(&b.0));
        Recheck { docs }
    }

    /// Records a recheck made at `now` of `checked` (due at `now`), which found `mismatched`.
    /// Changes newer than the allowance stay for a later recheck.
    pub fn rechecked(&mut self, checked: &[(String, Bson)], mismatched: &[(String, Bson, MismatchKind)], now: Millis, allowance: Millis) {
        let found: HashMap<DocKey, (&Bson, MismatchKind)> = mismatched.iter().map(|(ns, id, kind)| (DocKey::new(ns, id), (id, *kind))).collect();
        for (ns, id) in checked {
            let key = DocKey::new(ns, id);
            let change = self.changes.get(&key).map(|c| c.at);
            // A change after the check was planned is not covered by it.
            if change.is_some_and(|at| at + allowance <= now) {
                self.changes.remove(&key);
            }
            let still_changing = change.is_some_and(|at| at + allowance > now);
            match found.get(&key) {
                None => {
                    self.entries.remove(&key);
                }
                Some((id, kind)) => {
                    let entry = self.entries.entry(key).or_insert(Entry {
                        ns: ns.clone(),
                        id: (*id).clone(),
                        kind: *kind,
                        first_seen: now,
                        last_change: change,
                        settled: false,
                    });
                    entry.kind = *kind;
                    entry.last_change = change.or(entry.last_change);
                    entry.settled = !still_changing && entry.due(allowance) <= now;
                }
            }
        }
    }

    /// Mismatches whose recheck is not decisive yet.
    pub fn unsettled(&self) -> usize {
        self.entries.values().filter(|e| !e.settled).count()
    }

    /// The earliest time something becomes due, if anything waits.
    pub fn next_due(&self, allowance: Millis) -> Option<Millis> {
        let entries = self.entries.values().filter(|e| !e.settled).map(|e| e.due(allowance));
        let changes = self.changes.values().map(|c| c.at + allowance);
        entries.chain(changes).min()
    }
}

/// What the pass does after a generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The verdict is in; everything changed up to `verified_to` was checked.
    Finish { verified_to: Millis },
    /// Recheck again at this time.
    RecheckAt(Millis),
    /// The limits are reached with mismatches still undecided (documents keep changing).
    GiveUp,
}

/// The limits of the live phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub allowance: Millis,
    pub max_generations: u32,
    /// Latest time the live phase may run to.
    pub deadline: Millis,
}

/// The step after generation `generation` ran at `ran_at` (the scan is generation 0, ending at
/// `scan_end`): finish when no mismatch is undecided and the checks reach back past the scan's
/// end (or nothing changed at all), else recheck when the next document is due.
pub fn next_step(ledger: &Ledger, generation: u32, ran_at: Millis, scan_end: Millis, limits: Limits) -> Step {
    let checked_to = ran_at - limits.allowance;
    let nothing_changed = ledger.changed_namespaces.is_empty();
    if ledger.unsettled() == 0 && (nothing_changed || checked_to >= scan_end) {
        return Step::Finish { verified_to: if nothing_changed { ran_at } else { checked_to } };
    }
    if generation >= limits.max_generations || ran_at >= limits.deadline {
        return Step::GiveUp;
    }
    // Recheck when the next document is due, but no later than the time the checks pass the scan's end.
    let reach_scan_end = scan_end + limits.allowance;
    let next = match ledger.next_due(limits.allowance) {
        Some(due) if ledger.unsettled() > 0 || checked_to < scan_end => due.min(reach_scan_end.max(ran_at)),
        _ => reach_scan_end,
    };
    // At most once per 200 ms, and never past the deadline.
    Step::RecheckAt(next.max(ran_at + 200).min(limits.deadline.max(ran_at + 200)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOW: Millis = 30_000;
    const LIMITS: Limits = Limits { allowance: ALLOW, max_generations: 50, deadline: 10_000_000 };
    const NS: &str = "db.c";

    fn id(i: i64) -> Bson {
        Bson::Int64(i)
    }

    #[test]
    fn a_static_equal_pass_finishes_right_after_the_scan() {
        let ledger = Ledger::default();
        assert_eq!(next_step(&ledger, 0, 1_000, 1_000, LIMITS), Step::Finish { verified_to: 1_000 });
    }

    #[test]
    fn a_scan_mismatch_is_reported_only_after_a_recheck_past_the_allowance() {
        let mut ledger = Ledger::default();
        ledger.found(NS, &id(1), MismatchKind::MissingInTarget, 1_000);
        assert_eq!(next_step(&ledger, 0, 1_000, 1_000, LIMITS), Step::RecheckAt(31_000));
        assert!(ledger.due(30_999, ALLOW).docs.is_empty());
        let due = ledger.due(31_000, ALLOW);
        assert_eq!(due.docs, vec![(NS.to_string(), id(1))]);
        ledger.rechecked(&due.docs, &[(NS.to_string(), id(1), MismatchKind::MissingInTarget)], 31_000, ALLOW);
        assert_eq!(ledger.unsettled(), 0);
        assert!(ledger.entries.values().all(|e| e.settled && e.first_seen == 1_000));
        assert_eq!(next_step(&ledger, 1, 31_000, 1_000, LIMITS), Step::Finish { verified_to: 31_000 });
    }

    #[test]
    fn a_lagging_write_that_lands_clears_its_mismatch() {
        let mut ledger = Ledger::default();
        ledger.found(NS, &id(1), MismatchKind::Different, 1_000);
        // The replicator applies it: the target's stream sees the change.
        ledger.changed(NS, &id(1), 2_000);
        let due = ledger.due(32_000, ALLOW);
        assert_eq!(due.docs.len(), 1, "one recheck for the mismatch and its change");
        ledger.rechecked(&due.docs, &[], 32_000, ALLOW);
        assert!(ledger.entries.is_empty() && ledger.changes.is_empty());
        assert_eq!(next_step(&ledger, 1, 32_000, 1_000, LIMITS), Step::Finish { verified_to: 2_000 });
    }

    #[test]
    fn changes_during_the_pass_are_checked_only_after_the_allowance_and_a_persisting_difference_is_reported() {
        let mut ledger = Ledger::default();
        ledger.changed(NS, &id(7), 5_000);
        // Scan ended at 6 s; the pass must check back to it.
        assert_eq!(next_step(&ledger, 0, 6_000, 6_000, LIMITS), Step::RecheckAt(35_000));
        let due = ledger.due(35_000, ALLOW);
        assert_eq!(due.docs, vec![(NS.to_string(), id(7))]);
        ledger.rechecked(&due.docs, &[(NS.to_string(), id(7), MismatchKind::Different)], 35_000, ALLOW);
        let entry = ledger.entries.values().next().unwrap();
        assert!(entry.settled, "a due recheck is decisive");
        assert_eq!(next_step(&ledger, 1, 36_000, 6_000, LIMITS), Step::Finish { verified_to: 6_000 });
    }

    #[test]
    fn a_document_that_keeps_changing_is_not_reported_and_ends_in_give_up() {
        let mut ledger = Ledger::default();
        ledger.found(NS, &id(3), MismatchKind::Different, 1_000);
        let limits = Limits { max_generations: 3, ..LIMITS };
        for generation in 1..=3 {
            let now = generation as Millis * 40_000;
            ledger.changed(NS, &id(3), now - 1_000);
            let due = ledger.due(now, ALLOW);
            assert!(due.docs.is_empty(), "changed a second ago: not due");
            let step = next_step(&ledger, generation, now, 1_000, limits);
            if generation < 3 {
                assert!(matches!(step, Step::RecheckAt(_)), "{step:?}");
            } else {
                assert_eq!(step, Step::GiveUp);
            }
        }
        assert_eq!(ledger.unsettled(), 1);
    }

    #[test]
    fn a_change_after_a_recheck_reopens_a_reported_mismatch() {
        let mut ledger = Ledger::default();
        ledger.found(NS, &id(1), MismatchKind::Different, 0);
        ledger.rechecked(&[(NS.to_string(), id(1))], &[(NS.to_string(), id(1), MismatchKind::Different)], 30_000, ALLOW);
        assert_eq!(ledger.unsettled(), 0);
        ledger.changed(NS, &id(1), 31_000);
        assert_eq!(ledger.unsettled(), 1);
        assert_eq!(ledger.next_due(ALLOW), Some(61_000));
    }

    #[test]
    fn changes_younger_than_the_allowance_wait_for_a_later_generation() {
        let mut ledger = Ledger::default();
        ledger.changed(NS, &id(1), 1_000);
        ledger.changed(NS, &id(2), 20_000);
        let due = ledger.due(31_000, ALLOW);
        assert_eq!(due.docs, vec![(NS.to_string(), id(1))]);
        ledger.rechecked(&due.docs, &[], 31_000, ALLOW);
        assert_eq!(ledger.changes.len(), 1);
        // Checks reach 1 s; the scan ended at 500 ms: finished although id 2 is younger.
        assert_eq!(next_step(&ledger, 1, 31_000, 500, LIMITS), Step::Finish { verified_to: 1_000 });
    }
}
