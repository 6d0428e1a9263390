//! The verifier's Prometheus metrics (`mongo_replicator_verify_*`) and the progress figures
//! the command line prints.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

use super::compare::MismatchKind;
use crate::telemetry::{Scrape, encode_registry};

/// Metrics of one verification.
#[derive(Debug)]
pub struct VerifyMetrics {
    registry: Registry,
    documents_compared: Counter,
    mismatches: Family<[(&'static str, String); 1], Gauge>,
    generation: Gauge,
    partitions_done: Gauge,
}

impl Default for VerifyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl VerifyMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mongo_replicator_verify");
        let metrics = Self {
            documents_compared: Counter::default(),
            mismatches: Family::default(),
            generation: Gauge::default(),
            partitions_done: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("documents_compared", "Source documents read and compared with the target", metrics.documents_compared.clone());
        registry.register("mismatches", "Mismatches the pass holds now, by kind", metrics.mismatches.clone());
        registry.register("generation", "The pass's generation: 0 while scanning, then one per recheck", metrics.generation.clone());
        registry.register("partitions_done", "_id ranges compared, this run and earlier runs", metrics.partitions_done.clone());
        for kind in MismatchKind::ALL {
            metrics.mismatches.get_or_create(&[("kind", kind.as_str().to_string())]).set(0);
        }
        Self { registry, ..metrics }
    }

    pub fn compared(&self, n: u64) {
        self.documents_compared.inc_by(n);
    }

    pub fn set_mismatches(&self, kind: MismatchKind, n: usize) {
        self.mismatches.get_or_create(&[("kind", kind.as_str().to_string())]).set(n as i64);
    }

    pub fn set_generation(&self, generation: u32) {
        self.generation.set(i64::from(generation));
    }

    pub fn set_partitions_done(&self, n: usize) {
        self.partitions_done.set(n as i64);
    }
}

impl Scrape for VerifyMetrics {
    fn encode(&self) -> String {
        encode_registry(&self.registry)
    }
}

/// Live figures of a pass, for a progress line.
#[derive(Debug, Default)]
pub struct Progress {
    pub partitions: AtomicU64,
    pub partitions_done: AtomicU64,
    pub compared: AtomicU64,
    pub mismatches: AtomicU64,
    pub generation: AtomicU32,
    pub waiting_changes: AtomicU64,
}

/// A snapshot of [`Progress`].
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressLine {
    pub partitions: u64,
    pub partitions_done: u64,
    pub documents_compared: u64,
    pub mismatches: u64,
    pub generation: u32,
    /// Changed documents waiting for their recheck.
    pub waiting_changes: u64,
}

impl Progress {
    pub fn line(&self) -> ProgressLine {
        ProgressLine {
            partitions: self.partitions.load(Ordering::Relaxed),
            partitions_done: self.partitions_done.load(Ordering::Relaxed),
            documents_compared: self.compared.load(Ordering::Relaxed),
            mismatches: self.mismatches.load(Ordering::Relaxed),
            generation: self.generation.load(Ordering::Relaxed),
            waiting_changes: self.waiting_changes.load(Ordering::Relaxed),
        }
    }
}
