//! The data path: snapshot + change-stream replication of one MongoReplication.
//!
//! `run` connects both endpoints, loads the checkpoint from the target and carries on from it:
//! take the change-stream start point *before* copying, copy (resumable per `_id` range), then
//! follow the stream from that start point, checkpointing as it goes.

pub mod checkpoint;
pub mod config;
pub mod event;
pub mod namespace;
pub mod retry;
pub mod sink;
pub mod snapshot;
pub mod stream;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use mongodb::Client;
use mongodb::bson::{DateTime, doc};
use mongodb::error::ErrorKind;
use tokio_util::sync::CancellationToken;

use self::checkpoint::{Checkpoint, CheckpointPhase, CheckpointStore, token_from_data};
use self::config::{EndpointRole, ReplicatorConfig};
use self::namespace::{NamespaceError, NamespaceMap};
use self::retry::{Backoff, describe, error_code, is_transient};
use self::sink::Sink;
use self::snapshot::{Copier, SnapshotError};
use self::stream::{StartPoint, StreamError, Streamer};
use crate::auth::transport::causes;
use crate::auth::{self, AuthError, oidc};
use crate::crd::{HistoryLostPolicy, Progress, ReplicationMode};
use crate::telemetry::{Health, Metrics};

/// How a run ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped by a signal after draining and saving the checkpoint.
    Stopped,
    /// A `SnapshotOnly` replication finished (now or in an earlier run).
    SnapshotDone,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicatorError {
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("{role}: cannot create a client: {detail}")]
    Client { role: EndpointRole, detail: String },
    #[error("{role}: login refused: {detail}")]
    Unauthorized { role: EndpointRole, detail: String },
    #[error("{role}: {detail}")]
    Unreachable { role: EndpointRole, detail: String },
    #[error("cannot use the checkpoint in the target: {}", describe(.0))]
    Checkpoint(#[source] mongodb::error::Error),
    #[error("startAt.resumeToken is not a resume token's hex _data")]
    InvalidStartToken,
    #[error("the source returned no resume token to start the stream from")]
    NoStartPoint,
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Stream(#[from] StreamError),
}

impl ReplicatorError {
    /// The failed Microsoft Entra token exchange behind this error, if that is what it is.
    pub fn token_failure(&self) -> Option<&oidc::TokenError> {
        causes(self).find_map(|err| err.downcast_ref::<mongodb::error::Error>().and_then(oidc::token_error))
    }

    /// Stable reason for conditions, Events and metric labels.
    pub fn reason(&self) -> &'static str {
        if let Some(token) = self.token_failure() {
            return token.reason();
        }
        match self {
            ReplicatorError::Namespace(e) => e.reason(),
            ReplicatorError::Auth(e) => e.reason(),
            ReplicatorError::Client { .. } => "ClientOptionsInvalid",
            ReplicatorError::Unauthorized { .. } => "LoginFailed",
            ReplicatorError::Unreachable { .. } => "EndpointUnreachable",
            ReplicatorError::Checkpoint(_) => "CheckpointUnusable",
            ReplicatorError::InvalidStartToken => "InvalidStartToken",
            ReplicatorError::NoStartPoint => "NoStartPoint",
            ReplicatorError::Snapshot(e) => e.reason(),
            ReplicatorError::Stream(e) => e.reason(),
        }
    }

    /// The process exit code: 3 for configuration, 4 for permanent endpoint errors (a login or a
    /// Microsoft Entra token refused for good among them), 5 when the
    /// source's history no longer reaches the checkpoint, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        // Entra refused for good (identity gone, token file missing): nothing will change by itself.
        if self.token_failure().is_some_and(|t| !t.is_transient()) {
            return 4;
        }
        match self {
            ReplicatorError::Namespace(_) | ReplicatorError::Auth(_) | ReplicatorError::Client { .. } | ReplicatorError::InvalidStartToken => 3,
            ReplicatorError::Stream(StreamError::HistoryLost(_)) => 5,
            ReplicatorError::Unauthorized { .. }
            | ReplicatorError::Stream(StreamError::Unsupported(_) | StreamError::Malformed(_) | StreamError::Sink(_))
            | ReplicatorError::Snapshot(SnapshotError::Sink(_)) => 4,
            _ => 1,
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            ReplicatorError::Snapshot(e) => e.is_transient(),
            ReplicatorError::Stream(e) => e.is_transient(),
            ReplicatorError::Checkpoint(e) => is_transient(e),
            _ => false,
        }
    }
}

/// The figures users see in `status.progress`, from the checkpoint and the live lag.
pub fn progress(checkpoint: &Checkpoint, lag_seconds: Option<i64>) -> Progress {
    Progress {
        docs_copied: Some(checkpoint.docs_copied),
        events_applied: Some(checkpoint.events_applied),
        lag_seconds,
        last_applied_cluster_time: checkpoint
            .last_applied_cluster_time
            .map(|ts| DateTime::from_millis(i64::from(ts.time) * 1000).try_to_rfc3339_string().unwrap_or_default()),
        checkpoint_saved_at: checkpoint.saved_at.try_to_rfc3339_string().ok(),
    }
}

async fn connect(config: &ReplicatorConfig, role: EndpointRole) -> Result<Client, ReplicatorError> {
    let endpoint = match role {
        EndpointRole::Source => &config.source,
        EndpointRole::Target => &config.target,
    };
    let options = auth::client_options(endpoint, role).await?;
    Client::with_options(options).map_err(|e| ReplicatorError::Client { role, detail: e.to_string() })
}

/// Pings an endpoint until it answers; a refused login is final, an unreachable server is retried.
async fn wait_reachable(client: &Client, role: EndpointRole, metrics: &Metrics, cancel: &CancellationToken) -> Result<(), ReplicatorError> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match client.database("admin").run_command(doc! {"ping": 1}).await {
            Ok(_) => return Ok(()),
            Err(err) if oidc::token_error(&err).is_some_and(|e| !e.is_transient()) => {
                let detail = oidc::token_error(&err).map(ToString::to_string).unwrap_or_default();
                return Err(ReplicatorError::Unauthorized { role, detail });
            }
            Err(err) if matches!(err.kind.as_ref(), ErrorKind::Authentication { .. }) || matches!(error_code(&err), Some(18 | 13)) => {
                return Err(ReplicatorError::Unauthorized { role, detail: err.to_string() });
            }
            Err(err) if is_transient(&err) => {
                metrics.retry("connect");
                let delay = backoff.next_delay();
                tracing::warn!(%role, error = %describe(&err), retry_in = ?delay, "endpoint not reachable yet");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Err(ReplicatorError::Unreachable { role, detail: "stopped before it answered".into() }),
                }
            }
            Err(err) => return Err(ReplicatorError::Unreachable { role, detail: describe(&err) }),
        }
    }
}

/// Runs one replication until it is cancelled, finishes (`SnapshotOnly`) or fails for good.
/// Transient failures are retried with backoff from the last checkpoint.
pub async fn run(
    config: ReplicatorConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> Result<Outcome, ReplicatorError> {
    metrics.set_phase("starting");
    let map = Arc::new(NamespaceMap::new(config.namespaces.as_ref(), &config.checkpoint_database)?);
    let source = connect(&config, EndpointRole::Source).await?;
    let target = connect(&config, EndpointRole::Target).await?;
    wait_reachable(&source, EndpointRole::Source, &metrics, &cancel).await?;
    wait_reachable(&target, EndpointRole::Target, &metrics, &cancel).await?;

    let store = CheckpointStore::new(&target.database(&config.checkpoint_database), &config.name);
    let sink = Sink::new(target.clone(), map.clone(), metrics.clone(), config.batch_size, cancel.clone());
    let copier = Copier {
        source: source.clone(),
        sink: sink.clone(),
        store: store.clone(),
        map: map.clone(),
        metrics: metrics.clone(),
        workers: config.workers,
        batch_size: config.batch_size,
        partition_documents: config.partition_documents,
        cancel: cancel.clone(),
        copied: Arc::new(AtomicU64::new(0)),
    };
    let streamer = Streamer { copier: copier.clone(), flush_interval: config.flush_interval() };
    health.set_ready(true);

    let mut checkpoint = match store.load().await.map_err(ReplicatorError::Checkpoint)? {
        Some(saved) => {
            tracing::info!(phase = ?saved.phase, events_applied = saved.events_applied, docs_copied = saved.docs_copied, "resuming from checkpoint");
            saved
        }
        None => Checkpoint {
            name: config.name.clone(),
            phase: if config.mode == ReplicationMode::StreamOnly { CheckpointPhase::Stream } else { CheckpointPhase::Snapshot },
            start_token: None,
            token: None,
            last_applied_cluster_time: None,
            docs_copied: 0,
            events_applied: 0,
            saved_at: DateTime::now(),
        },
    };

    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let step = advance(&config, &map, &source, &store, &copier, &streamer, &mut checkpoint, &cancel).await;
        match step {
            Ok(outcome) => {
                metrics.set_phase("stopped");
                return Ok(outcome);
            }
            Err(ReplicatorError::Snapshot(SnapshotError::Cancelled)) => {
                metrics.set_phase("stopped");
                return Ok(Outcome::Stopped);
            }
            Err(ReplicatorError::Stream(StreamError::HistoryLost(err))) if config.on_history_lost == HistoryLostPolicy::Resync => {
                tracing::warn!(error = %err, "the source's change history no longer reaches the checkpoint; copying the data again (onHistoryLost: Resync)");
                resync(&copier, &store, &mut checkpoint).await?;
            }
            Err(err) if err.is_transient() && !cancel.is_cancelled() => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %err, reason = err.reason(), retry_in = ?delay, "transient failure; continuing from the checkpoint");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Ok(Outcome::Stopped),
                }
            }
            Err(err) => {
                metrics.set_phase("failed");
                health.set_ready(false);
                return Err(err);
            }
        }
    }
}

/// Carries the replication forward from its checkpoint: start point, snapshot, stream.
#[allow(clippy::too_many_arguments)]
async fn advance(
    config: &ReplicatorConfig,
    map: &NamespaceMap,
    source: &Client,
    store: &CheckpointStore,
    copier: &Copier,
    streamer: &Streamer,
    checkpoint: &mut Checkpoint,
    cancel: &CancellationToken,
) -> Result<Outcome, ReplicatorError> {
    let save = |c: &Checkpoint| {
        let mut c = c.clone();
        c.saved_at = DateTime::now();
        async move { store.save(&c).await.map_err(ReplicatorError::Checkpoint) }
    };
    if checkpoint.phase == CheckpointPhase::Snapshot {
        copier.metrics.set_phase("snapshot");
        if checkpoint.start_token.is_none() {
            // The stream's start point is taken before anything is copied, so every change made
            // during the copy is replayed afterwards.
            checkpoint.start_token = Some(start_token(source, map, streamer, &StartPoint::Now).await?);
            save(checkpoint).await?;
        }
        let copied = copier.copy_all().await?;
        checkpoint.docs_copied += copied as i64;
        tracing::info!(documents = copied, "snapshot finished");
        if config.mode == ReplicationMode::SnapshotOnly {
            checkpoint.phase = CheckpointPhase::Done;
            save(checkpoint).await?;
            return Ok(Outcome::SnapshotDone);
        }
        checkpoint.phase = CheckpointPhase::Stream;
        checkpoint.token = checkpoint.start_token.clone();
        save(checkpoint).await?;
    }
    if checkpoint.phase == CheckpointPhase::Done {
        tracing::info!("the snapshot was finished in an earlier run; nothing to do (mode: SnapshotOnly)");
        return Ok(Outcome::SnapshotDone);
    }
    let start = match (&checkpoint.token, &config.start_at) {
        (Some(token), _) => StartPoint::ResumeAfter(token.clone()),
        (None, Some(start)) => match (&start.cluster_time, &start.resume_token) {
            (Some(time), _) => StartPoint::AtClusterTime(parse_cluster_time(time).ok_or(ReplicatorError::InvalidStartToken)?),
            (None, Some(data)) => StartPoint::ResumeAfter(token_from_data(data).ok_or(ReplicatorError::InvalidStartToken)?),
            (None, None) => StartPoint::Now,
        },
        (None, None) => {
            // Saved first, so a crash before the first change does not move the start to "later".
            let token = start_token(source, map, streamer, &StartPoint::Now).await?;
            checkpoint.token = Some(token.clone());
            save(checkpoint).await?;
            StartPoint::ResumeAfter(token)
        }
    };
    streamer.run(start, checkpoint).await?;
    if cancel.is_cancelled() {
        tracing::info!(events_applied = checkpoint.events_applied, "stopped; checkpoint saved");
    }
    Ok(Outcome::Stopped)
}

/// Opens the stream at `start` and returns the token it starts from.
async fn start_token(
    source: &Client,
    map: &NamespaceMap,
    streamer: &Streamer,
    start: &StartPoint,
) -> Result<mongodb::change_stream::event::ResumeToken, ReplicatorError> {
    let stream = stream::open(source, &map.stream_scope(), start, Duration::from_millis(100), streamer.copier.batch_size as u32).await?;
    stream.resume_token().ok_or(ReplicatorError::NoStartPoint)
}

/// Starts over after the source lost the history the checkpoint needs: the replicated target
/// collections are dropped (deletes in the lost history must not survive) and copied again.
async fn resync(copier: &Copier, store: &CheckpointStore, checkpoint: &mut Checkpoint) -> Result<(), ReplicatorError> {
    for collection in copier.included_collections().await? {
        let target = copier.map.target(&collection.ns);
        copier.sink.apply_ddl(&event::Ddl::DropCollection(target)).await.map_err(SnapshotError::from)?;
    }
    store.forget_all_ranges().await.map_err(ReplicatorError::Checkpoint)?;
    checkpoint.phase = CheckpointPhase::Snapshot;
    checkpoint.start_token = None;
    checkpoint.token = None;
    checkpoint.saved_at = DateTime::now();
    store.save(checkpoint).await.map_err(ReplicatorError::Checkpoint)
}

/// Parses `<seconds>.<increment>`.
fn parse_cluster_time(text: &str) -> Option<mongodb::bson::Timestamp> {
    let (time, increment) = text.split_once('.')?;
    Some(mongodb::bson::Timestamp { time: time.parse().ok()?, increment: increment.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_times_parse_as_seconds_and_increment() {
        assert_eq!(parse_cluster_time("1767225600.7"), Some(mongodb::bson::Timestamp { time: 1767225600, increment: 7 }));
        assert_eq!(parse_cluster_time("1767225600"), None);
        assert_eq!(parse_cluster_time("x.1"), None);
    }

    #[test]
    fn progress_reports_what_the_checkpoint_knows() {
        let checkpoint = Checkpoint {
            name: "data/orders".into(),
            phase: CheckpointPhase::Stream,
            start_token: None,
            token: None,
            last_applied_cluster_time: Some(mongodb::bson::Timestamp { time: 1767225600, increment: 3 }),
            docs_copied: 1200,
            events_applied: 45,
            saved_at: DateTime::from_millis(1767225601000),
        };
        let p = progress(&checkpoint, Some(2));
        assert_eq!((p.docs_copied, p.events_applied, p.lag_seconds), (Some(1200), Some(45), Some(2)));
        assert_eq!(p.last_applied_cluster_time.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(p.checkpoint_saved_at.as_deref(), Some("2026-01-01T00:00:01Z"));
    }
}
