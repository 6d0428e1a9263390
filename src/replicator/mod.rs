//! The data path: snapshot + change-stream replication of one MongoReplication.
//!
//! `run` connects both endpoints, loads the checkpoint from the target and carries on from it:
//! take the change-stream start point *before* copying, copy (resumable per `_id` range), then
//! follow the stream from that start point, checkpointing as it goes.

pub mod checkpoint;
pub mod classify;
pub mod config;
pub mod context;
pub mod event;
pub mod history;
pub mod namespace;
pub mod report;
pub mod sink;
pub mod snapshot;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use mongodb::Client;
use mongodb::bson::{DateTime, doc};
use tokio_util::sync::CancellationToken;

use self::checkpoint::{Checkpoint, CheckpointPhase, CheckpointStore, token_from_data};
use self::classify::{describe, is_refusal, is_transient};
use self::config::{EndpointRole, Mode, OnHistoryLost, ReplicatorConfig, StartAt};
use self::context::{Context, Settings};
use self::namespace::{NamespaceError, NamespaceMap};
use self::sink::Sink;
use self::snapshot::{Copier, SnapshotError};
use self::stream::{StartPoint, StreamError, Streamer};
use crate::auth::AuthError;
use crate::auth::oidc::{self, TokenSources};
use crate::crd::Progress;
use crate::error_chain::causes;
use crate::reason::Reason;
use crate::retry::{Decision, Failure, Policy, retry};
use crate::telemetry::{Health, Metrics};

/// Waiting for an endpoint to answer at start.
const CONNECT_RETRY: Policy = Policy::unbounded(Duration::from_millis(500), Duration::from_secs(30));
/// getMores to wait for a start point's resume token (100 ms each at most).
const START_TOKEN_POLLS: usize = 50;
/// Starting over from the checkpoint after a transient failure of the snapshot or the stream.
const RUN_RETRY: Policy = Policy::unbounded(Duration::from_millis(500), Duration::from_secs(30));

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
    #[error("{role}: {} refused: {detail}", if *.reason == Reason::NotAuthorized { "command" } else { "login" })]
    Refused { role: EndpointRole, reason: Reason, detail: String },
    #[error("{role}: {detail}")]
    Unreachable { role: EndpointRole, reason: Reason, detail: String },
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
    #[error("stopped by a shutdown")]
    Cancelled,
}

impl ReplicatorError {
    /// The failed Microsoft Entra token exchange behind this error, if that is what it is.
    pub fn token_failure(&self) -> Option<&oidc::TokenError> {
        causes(self).find_map(|err| err.downcast_ref::<mongodb::error::Error>().and_then(oidc::token_error))
    }

    /// The server's refusal behind this error (a login, or a command for lack of privileges),
    /// wherever it happened: at start, in the snapshot or in the stream.
    fn server_refusal(&self) -> Option<&mongodb::error::Error> {
        causes(self).filter_map(|err| err.downcast_ref::<mongodb::error::Error>()).find(|err| is_refusal(err))
    }

    /// Stable reason for conditions, Events and metric labels.
    pub fn reason(&self) -> Reason {
        if let Some(token) = self.token_failure() {
            return token.reason();
        }
        if let Some(refusal) = self.server_refusal() {
            return classify::reason(refusal);
        }
        match self {
            ReplicatorError::Namespace(e) => e.reason(),
            ReplicatorError::Auth(e) => e.reason(),
            ReplicatorError::Client { .. } => Reason::ClientOptionsInvalid,
            ReplicatorError::Refused { reason, .. } | ReplicatorError::Unreachable { reason, .. } => *reason,
            ReplicatorError::Checkpoint(_) => Reason::CheckpointUnusable,
            ReplicatorError::InvalidStartToken => Reason::InvalidStartToken,
            ReplicatorError::NoStartPoint => Reason::NoStartPoint,
            ReplicatorError::Snapshot(e) => e.reason(),
            ReplicatorError::Stream(e) => e.reason(),
            ReplicatorError::Cancelled => Reason::Cancelled,
        }
    }

    /// The process exit code: 3 for configuration, 4 for permanent endpoint errors (a login or a
    /// Microsoft Entra token refused for good among them), 5 when the
    /// source's history no longer reaches the checkpoint, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        // Entra refused for good (identity gone, token file missing): nothing will change by itself.
        if self.token_failure().is_some_and(|t| !t.is_transient()) || self.server_refusal().is_some() {
            return 4;
        }
        match self {
            ReplicatorError::Namespace(_) | ReplicatorError::Auth(_) | ReplicatorError::Client { .. } | ReplicatorError::InvalidStartToken => 3,
            ReplicatorError::Stream(StreamError::HistoryLost(_)) => 5,
            ReplicatorError::Refused { .. }
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

    /// A shutdown, wherever it stopped the work.
    fn is_cancelled(&self) -> bool {
        self.reason() == Reason::Cancelled
    }
}

/// The figures users see in `status.progress`, from the checkpoint, the live lag and the
/// hash of the configuration the replicator runs with.
pub fn progress(checkpoint: &Checkpoint, lag_seconds: Option<i64>, config_hash: Option<&str>) -> Progress {
    Progress {
        docs_copied: Some(checkpoint.docs_copied),
        events_applied: Some(checkpoint.events_applied),
        lag_seconds,
        last_applied_cluster_time: checkpoint
            .last_applied_cluster_time
            .map(|ts| DateTime::from_millis(i64::from(ts.time) * 1000).try_to_rfc3339_string().unwrap_or_default()),
        checkpoint_saved_at: checkpoint.saved_at.try_to_rfc3339_string().ok(),
        phase: Some(
            match checkpoint.phase {
                CheckpointPhase::Snapshot => "Snapshot",
                CheckpointPhase::Stream => "Stream",
                CheckpointPhase::Done => "Done",
            }
            .to_string(),
        ),
        config_hash: config_hash.map(str::to_string),
        writes_failing_since: None,
        caught_up_since: None,
    }
}

async fn connect(config: &ReplicatorConfig, role: EndpointRole, tokens: &TokenSources) -> Result<Client, ReplicatorError> {
    let options = config.endpoint(role).client_options(role, tokens).await?;
    Client::with_options(options).map_err(|e| ReplicatorError::Client { role, detail: e.to_string() })
}

/// Pings an endpoint until it answers; a refused login is final, an unreachable server is retried.
async fn wait_reachable(client: &Client, role: EndpointRole, metrics: &Metrics, cancel: &CancellationToken) -> Result<(), ReplicatorError> {
    let ping = || async { client.database("admin").run_command(doc! {"ping": 1}).await.map(drop) };
    let decide = |err: &mongodb::error::Error| Decision::retry_if(!is_refusal(err) && is_transient(err));
    let on_retry = |err: &mongodb::error::Error, wait: Duration, _| {
        metrics.retry("connect");
        tracing::warn!(%role, error = %describe(err), retry_in = ?wait, "endpoint not reachable yet");
    };
    retry(&CONNECT_RETRY, cancel, ping, decide, on_retry).await.map_err(|failure| match failure {
        Failure::Cancelled { .. } => ReplicatorError::Cancelled,
        other => {
            let err = other.into_error();
            let (reason, detail) = (classify::reason(&err), describe(&err));
            if is_refusal(&err) { ReplicatorError::Refused { role, reason, detail } } else { ReplicatorError::Unreachable { role, reason, detail } }
        }
    })
}

/// Runs one replication until it is cancelled, finishes (`SnapshotOnly`) or fails for good.
/// Transient failures are retried with backoff from the last checkpoint. Microsoft Entra
/// tokens come from `tokens`, shared with whatever else the process signs in to.
pub async fn run(
    config: ReplicatorConfig,
    tokens: Arc<TokenSources>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> Result<Outcome, ReplicatorError> {
    metrics.set_phase("starting");
    let result = Replication::start(&config, &tokens, metrics.clone(), &health, cancel).await;
    let result = match result {
        Ok(replication) => replication.run(&config).await,
        Err(err) => Err(err),
    };
    match result {
        Err(err) if err.is_cancelled() => {
            metrics.set_phase("stopped");
            Ok(Outcome::Stopped)
        }
        Err(err) => {
            metrics.set_phase("failed");
            health.set_ready(false);
            Err(err)
        }
        Ok(outcome) => {
            metrics.set_phase("stopped");
            Ok(outcome)
        }
    }
}

/// A started replication: connected endpoints, its context, copier and streamer.
struct Replication {
    ctx: Arc<Context>,
    copier: Copier,
    streamer: Streamer,
    mode: Mode,
    start_at: Option<StartAt>,
    on_history_lost: OnHistoryLost,
}

impl Replication {
    async fn start(
        config: &ReplicatorConfig,
        tokens: &TokenSources,
        metrics: Arc<Metrics>,
        health: &Health,
        cancel: CancellationToken,
    ) -> Result<Self, ReplicatorError> {
        let map = Arc::new(NamespaceMap::new(config.namespaces.as_ref(), &config.checkpoint_database)?);
        let source = connect(config, EndpointRole::Source, tokens).await?;
        let target = connect(config, EndpointRole::Target, tokens).await?;
        wait_reachable(&source, EndpointRole::Source, &metrics, &cancel).await?;
        wait_reachable(&target, EndpointRole::Target, &metrics, &cancel).await?;
        let settings = Settings::of(config);
        let ctx = Arc::new(Context {
            store: CheckpointStore::new(&target.database(&config.checkpoint_database), &config.name),
            sink: Sink::new(target, map.clone(), metrics.clone(), settings.batch_size, cancel.clone()),
            source,
            map,
            metrics,
            cancel,
            settings,
        });
        let copier = Copier::new(ctx.clone());
        let streamer = Streamer::new(ctx.clone(), copier.clone());
        if let Some(target) = &config.status_report {
            report::spawn(target.clone(), ctx.clone());
        }
        health.set_ready(true);
        Ok(Self { ctx, copier, streamer, mode: config.mode, start_at: config.start_at.clone(), on_history_lost: config.on_history_lost })
    }

    /// Carries the replication on from its checkpoint, starting over from the checkpoint after
    /// transient failures, and from a new copy after lost history when the policy says so.
    async fn run(&self, config: &ReplicatorConfig) -> Result<Outcome, ReplicatorError> {
        let ctx = &self.ctx;
        let checkpoint = match ctx.store.load().await.map_err(ReplicatorError::Checkpoint)? {
            Some(saved) => {
                tracing::info!(phase = ?saved.phase, events_applied = saved.events_applied, docs_copied = saved.docs_copied, "resuming from checkpoint");
                saved
            }
            None => Checkpoint {
                name: config.name.clone(),
                phase: if config.mode == Mode::StreamOnly { CheckpointPhase::Stream } else { CheckpointPhase::Snapshot },
                start_token: None,
                token: None,
                last_applied_cluster_time: None,
                history_read_to: None,
                docs_copied: 0,
                events_applied: 0,
                saved_at: DateTime::now(),
            },
        };
        let checkpoint = &tokio::sync::Mutex::new(checkpoint);
        let attempt = || async move {
            let mut checkpoint = checkpoint.lock().await;
            loop {
                match self.advance(&mut checkpoint).await {
                    Err(ReplicatorError::Stream(StreamError::HistoryLost(err))) if self.on_history_lost == OnHistoryLost::Resync => {
                        tracing::warn!(error = %err, "the source's change history no longer reaches the checkpoint; copying the data again (onHistoryLost: Resync)");
                        self.resync(&mut checkpoint).await?;
                    }
                    other => return other,
                }
            }
        };
        let on_retry = |err: &ReplicatorError, wait: Duration, _| {
            tracing::warn!(error = %err, reason = %err.reason(), retry_in = ?wait, "transient failure; continuing from the checkpoint");
        };
        match retry(&RUN_RETRY, &ctx.cancel, attempt, |err: &ReplicatorError| Decision::retry_if(err.is_transient()), on_retry).await {
            Ok(outcome) => Ok(outcome),
            Err(Failure::Cancelled { .. }) => Err(ReplicatorError::Cancelled),
            Err(failure) => Err(failure.into_error()),
        }
    }

    /// Carries the replication forward from its checkpoint: start point, snapshot, stream.
    async fn advance(&self, checkpoint: &mut Checkpoint) -> Result<Outcome, ReplicatorError> {
        let ctx = &self.ctx;
        let save = |c: &Checkpoint| {
            let mut c = c.clone();
            c.saved_at = DateTime::now();
            async move {
                ctx.store.save(&c).await.map_err(ReplicatorError::Checkpoint)?;
                ctx.metrics.checkpoint_saved();
                Ok::<(), ReplicatorError>(())
            }
        };
        if checkpoint.phase == CheckpointPhase::Snapshot {
            ctx.metrics.set_phase("snapshot");
            if checkpoint.start_token.is_none() {
                // The stream's start point is taken before anything is copied, so every change made
                // during the copy is replayed afterwards.
                checkpoint.history_read_to = self.source_time().await;
                checkpoint.start_token = Some(self.start_token(&StartPoint::Now).await?);
                save(checkpoint).await?;
            }
            let copied = self.copier.copy_all().await?;
            checkpoint.docs_copied += copied as i64;
            tracing::info!(documents = copied, "snapshot finished");
            if self.mode == Mode::SnapshotOnly {
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
        let start = match (&checkpoint.token, &self.start_at) {
            (Some(token), _) => StartPoint::ResumeAfter(token.clone()),
            (None, Some(StartAt::ClusterTime(time))) => {
                StartPoint::AtClusterTime(parse_cluster_time(time).ok_or(ReplicatorError::InvalidStartToken)?)
            }
            (None, Some(StartAt::ResumeToken(data))) => StartPoint::ResumeAfter(token_from_data(data).ok_or(ReplicatorError::InvalidStartToken)?),
            (None, None) => {
                // Saved first, so a crash before the first change does not move the start to "later".
                checkpoint.history_read_to = self.source_time().await;
                let token = self.start_token(&StartPoint::Now).await?;
                checkpoint.token = Some(token.clone());
                save(checkpoint).await?;
                StartPoint::ResumeAfter(token)
            }
        };
        self.streamer.run(start, checkpoint).await?;
        if ctx.cancel.is_cancelled() {
            tracing::info!(events_applied = checkpoint.events_applied, "stopped; checkpoint saved");
        }
        Ok(Outcome::Stopped)
    }

    /// Opens the stream at `start` and returns the token it starts from.
    /// The source's cluster time now (a ping's `operationTime`), read before a start point is
    /// taken: every change after that start point is later, so the history guard may start there.
    async fn source_time(&self) -> Option<mongodb::bson::Timestamp> {
        let reply = self.ctx.source.database("admin").run_command(doc! {"ping": 1}).await.ok()?;
        reply.get_timestamp("operationTime").ok()
    }

    async fn start_token(&self, start: &StartPoint) -> Result<mongodb::change_stream::event::ResumeToken, ReplicatorError> {
        let ctx = &self.ctx;
        let mut stream =
            stream::open(&ctx.source, &ctx.map.stream_scope(), start, Duration::from_millis(100), ctx.settings.batch_size as u32).await?;
        // A first batch may come without a post-batch resume token (servers differ; seen once in
        // the lab, through the DocumentDB gateway on a loaded machine); a later getMore (100 ms
        // at most each) brings one. A change read meanwhile happened before the start point,
        // which the copy then includes.
        for _ in 0..START_TOKEN_POLLS {
            if let Some(token) = stream.resume_token() {
                return Ok(token);
            }
            stream.next_if_any().await.map_err(StreamError::from_source)?;
        }
        stream.resume_token().ok_or(ReplicatorError::NoStartPoint)
    }

    /// Starts over after the source lost the history the checkpoint needs: the replicated target
    /// collections are dropped (deletes in the lost history must not survive) and copied again.
    async fn resync(&self, checkpoint: &mut Checkpoint) -> Result<(), ReplicatorError> {
        let ctx = &self.ctx;
        for collection in self.copier.included_collections().await? {
            let target = ctx.map.target(&collection.ns);
            ctx.sink.apply_ddl(&event::Ddl::DropCollection(target)).await.map_err(SnapshotError::from)?;
        }
        ctx.store.forget_all_ranges().await.map_err(ReplicatorError::Checkpoint)?;
        checkpoint.phase = CheckpointPhase::Snapshot;
        checkpoint.start_token = None;
        checkpoint.token = None;
        checkpoint.history_read_to = None;
        checkpoint.saved_at = DateTime::now();
        ctx.store.save(checkpoint).await.map_err(ReplicatorError::Checkpoint)
    }
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
            history_read_to: None,
            docs_copied: 1200,
            events_applied: 45,
            saved_at: DateTime::from_millis(1767225601000),
        };
        let p = progress(&checkpoint, Some(2), Some("abc"));
        assert_eq!((p.phase.as_deref(), p.config_hash.as_deref()), (Some("Stream"), Some("abc")));
        assert_eq!((p.docs_copied, p.events_applied, p.lag_seconds), (Some(1200), Some(45), Some(2)));
        assert_eq!(p.last_applied_cluster_time.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(p.checkpoint_saved_at.as_deref(), Some("2026-01-01T00:00:01Z"));
    }
}
