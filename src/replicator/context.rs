//! What one replication shares between its snapshot and its stream: the endpoints, the
//! namespace map, the checkpoint store, the sink, metrics, cancellation and settings.

use std::sync::Arc;
use std::time::Duration;

use mongodb::Client;
use tokio_util::sync::CancellationToken;

use super::checkpoint::CheckpointStore;
use super::config::ReplicatorConfig;
use super::namespace::NamespaceMap;
use super::sink::Sink;
use crate::telemetry::Metrics;

/// The settings of the data path, taken from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Batches written at once, and collections (or ranges) copied at once.
    pub workers: usize,
    /// Most documents per write command and per read batch.
    pub batch_size: usize,
    /// Collections larger than this are read as parallel `_id` ranges (0: never).
    pub partition_documents: u64,
    /// Longest a change waits before it is written.
    pub flush_interval: Duration,
    /// Most lag that counts as caught up.
    pub caught_up_lag_seconds: u64,
}

impl Settings {
    pub fn of(config: &ReplicatorConfig) -> Self {
        Self {
            workers: config.workers,
            batch_size: config.batch_size,
            partition_documents: config.partition_documents,
            flush_interval: config.flush_interval(),
            caught_up_lag_seconds: config.caught_up_lag_seconds,
        }
    }

    /// Change events read into one window before it is applied.
    pub fn window_events(&self) -> usize {
        self.batch_size * self.workers
    }
}

/// One replication's shared state. Built once by [`super::run`], shared by reference count.
pub struct Context {
    /// The source deployment (reads, change stream).
    pub source: Client,
    /// Writes to the target.
    pub sink: Sink,
    /// Checkpoint and snapshot progress, in the target.
    pub store: CheckpointStore,
    /// Which namespaces, under which names.
    pub map: Arc<NamespaceMap>,
    pub metrics: Arc<Metrics>,
    /// Fires on shutdown: reads stop, waits end, what was read is applied and checkpointed.
    pub cancel: CancellationToken,
    pub settings: Settings,
}
