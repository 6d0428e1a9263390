//! The operator's Prometheus metrics, all named `mongo_replicator_operator_*`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::crd::Phase;

type Label = [(&'static str, String); 1];

/// Reconciles, their durations, errors by reason, and replications by phase.
#[derive(Clone)]
pub struct OperatorMetrics {
    registry: Arc<Registry>,
    reconciles: Family<Label, Counter>,
    errors: Family<Label, Counter>,
    duration: Histogram,
    by_phase: Family<Label, Gauge>,
    phases: Arc<Mutex<BTreeMap<(String, String), String>>>,
}

const PHASES: [&str; 7] = ["Pending", "Binding", "Validating", "Snapshotting", "Streaming", "Suspended", "Failed"];

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl OperatorMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mongo_replicator_operator");
        let reconciles = Family::<Label, Counter>::default();
        let errors = Family::<Label, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let by_phase = Family::<Label, Gauge>::default();
        registry.register("reconciles", "Reconciles of MongoReplications, by result (ok, error)", reconciles.clone());
        registry.register("reconcile_errors", "Failed reconciles, by reason", errors.clone());
        registry.register_with_unit("reconcile_duration", "Time one reconcile took", Unit::Seconds, duration.clone());
        registry.register("replications", "MongoReplications by phase", by_phase.clone());
        for result in ["ok", "error"] {
            reconciles.get_or_create(&[("result", result.to_string())]).inc_by(0);
        }
        for phase in PHASES {
            by_phase.get_or_create(&[("phase", phase.to_string())]).set(0);
        }
        Self { registry: Arc::new(registry), reconciles, errors, duration, by_phase, phases: Arc::default() }
    }

    /// Records one reconcile: its duration and, when it failed, the reason.
    pub fn reconciled(&self, took: Duration, error: Option<&'static str>) {
        self.duration.observe(took.as_secs_f64());
        self.reconciles.get_or_create(&[("result", if error.is_some() { "error" } else { "ok" }.to_string())]).inc();
        if let Some(reason) = error {
            self.errors.get_or_create(&[("reason", reason.to_string())]).inc();
        }
    }

    /// Notes the phase of one replication (`None`: it is gone).
    pub fn set_phase(&self, namespace: &str, name: &str, phase: Option<Phase>) {
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        let key = (namespace.to_string(), name.to_string());
        match phase {
            Some(phase) => {
                phases.insert(key, format!("{phase:?}"));
            }
            None => {
                phases.remove(&key);
            }
        }
        for p in PHASES {
            let count = phases.values().filter(|v| v.as_str() == p).count() as i64;
            self.by_phase.get_or_create(&[("phase", p.to_string())]).set(count);
        }
    }
}

impl crate::telemetry::Scrape for OperatorMetrics {
    fn encode(&self) -> String {
        crate::telemetry::encode_registry(&self.registry)
    }
}
