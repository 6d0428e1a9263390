//! The change stream: read in windows, route each window's writes to parallel writers by
//! namespace and document key (so each document's changes apply in order), apply DDL between
//! flushes, and checkpoint the resume token below which everything is applied.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mongodb::Client;
use mongodb::bson::{DateTime, Document, RawDocumentBuf, Timestamp};
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::ResumeToken;
use mongodb::options::{ChangeStreamOptions, FullDocumentType};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::checkpoint::Checkpoint;
use super::classify::{ErrorClass, classify, describe, is_transient};
use super::context::Context;
use super::event::{Action, Ddl, DocWrite, DocWriteKind, MalformedEvent, OPERATIONS, Targets, cluster_time, map_event, operation_label};
use super::history::{self, HistoryGuard, Pruned, WindowTimes};
use super::namespace::StreamScope;
use super::sink::SinkError;
use super::snapshot::{Copier, SnapshotError};
use crate::reason::Reason;

/// Where a change stream starts.
#[derive(Clone, Debug)]
pub enum StartPoint {
    /// After the change this token names (the usual restart from a checkpoint).
    ResumeAfter(ResumeToken),
    /// After an invalidate event.
    StartAfter(ResumeToken),
    /// At a source cluster time.
    AtClusterTime(Timestamp),
    /// From now.
    Now,
}

impl std::fmt::Display for StartPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let data = |t: &ResumeToken| super::checkpoint::token_data(t).unwrap_or_else(|| "?".into());
        match self {
            StartPoint::ResumeAfter(t) => write!(f, "after token {}", data(t)),
            StartPoint::StartAfter(t) => write!(f, "after invalidate {}", data(t)),
            StartPoint::AtClusterTime(ts) => write!(f, "at cluster time {}.{}", ts.time, ts.increment),
            StartPoint::Now => f.write_str("now"),
        }
    }
}

/// How the source's change history was found lost.
#[derive(Debug, thiserror::Error)]
pub enum HistoryLoss {
    /// The server refused to go on (286 ChangeStreamHistoryLost).
    #[error(transparent)]
    Server(mongodb::error::Error),
    /// The history guard found the oldest retained change after the last one read.
    #[error(transparent)]
    Pruned(#[from] Pruned),
}

/// Why streaming stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the source's change stream failed: {}", describe(.0))]
    Source(#[source] mongodb::error::Error),
    #[error(
        "the source no longer has the change history the checkpoint needs (its oplog was truncated past the saved resume token); \
         set onHistoryLost: Resync to copy the data again, or grow the source's oplog"
    )]
    HistoryLost(#[source] HistoryLoss),
    #[error("the source does not support change streams here: {}", describe(.0))]
    Unsupported(#[source] mongodb::error::Error),
    #[error(transparent)]
    Malformed(#[from] MalformedEvent),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Copy(#[from] SnapshotError),
    #[error("cannot save the checkpoint in the target: {}", describe(.0))]
    Checkpoint(#[source] mongodb::error::Error),
}

impl StreamError {
    pub fn reason(&self) -> Reason {
        match self {
            StreamError::Source(_) => Reason::SourceStreamFailed,
            StreamError::HistoryLost(_) => Reason::ChangeStreamHistoryLost,
            StreamError::Unsupported(_) => Reason::ChangeStreamsUnsupported,
            StreamError::Malformed(_) => Reason::MalformedChangeEvent,
            StreamError::Sink(e) => e.reason(),
            StreamError::Copy(e) => e.reason(),
            StreamError::Checkpoint(_) => Reason::CheckpointWriteFailed,
        }
    }

    /// Whether reopening the stream from the checkpoint may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StreamError::Source(e) | StreamError::Checkpoint(e) => is_transient(e),
            StreamError::Sink(e) => e.is_transient(),
            StreamError::Copy(e) => e.is_transient(),
            _ => false,
        }
    }

    pub(super) fn from_source(err: mongodb::error::Error) -> Self {
        match classify(&err) {
            ErrorClass::HistoryLost => StreamError::HistoryLost(HistoryLoss::Server(err)),
            ErrorClass::ChangeStreamsUnsupported => StreamError::Unsupported(err),
            _ => StreamError::Source(err),
        }
    }
}

/// Opens a change stream of the given scope.
pub async fn open(
    source: &Client,
    scope: &StreamScope,
    start: &StartPoint,
    max_await: Duration,
    batch_size: u32,
) -> Result<ChangeStream<RawDocumentBuf>, StreamError> {
    let mut options = ChangeStreamOptions::builder()
        .full_document(Some(FullDocumentType::UpdateLookup))
        .show_expanded_events(Some(true))
        .max_await_time(Some(max_await))
        .batch_size(Some(batch_size))
        .build();
    match start {
        StartPoint::ResumeAfter(token) => options.resume_after = Some(token.clone()),
        StartPoint::StartAfter(token) => options.start_after = Some(token.clone()),
        StartPoint::AtClusterTime(ts) => options.start_at_operation_time = Some(*ts),
        StartPoint::Now => {}
    }
    let stream = match scope {
        StreamScope::Cluster => source.watch().with_options(options).await,
        StreamScope::Database(db) => source.database(db).watch().with_options(options).await,
        StreamScope::Collection(ns) => source.database(&ns.db).collection::<Document>(&ns.coll).watch().with_options(options).await,
    };
    // Raw: events are read field by field, and documents move to the target as bytes.
    Ok(stream.map_err(StreamError::from_source)?.with_type::<RawDocumentBuf>())
}

/// A run of change events read together, and the token after the last of them.
struct Window {
    /// What each event asks, with its operation (an index into `OPERATIONS`).
    actions: Vec<(Action, usize)>,
    token: Option<ResumeToken>,
    times: WindowTimes,
    /// The guard's position once this window is proven; saved with `token`.
    read_to: Option<Timestamp>,
}

/// Follows the change stream until cancelled or a permanent error. It uses the copier for
/// collections renamed into the replicated set.
pub struct Streamer {
    ctx: Arc<Context>,
    copier: Copier,
    /// The source's oplog could not be read: the guard is off for this process (said once).
    guard_off: AtomicBool,
}

impl Streamer {
    pub fn new(ctx: Arc<Context>, copier: Copier) -> Self {
        Self { ctx, copier, guard_off: AtomicBool::new(false) }
    }

    /// A history guard for a stream from `start`, or `None` where the source's oplog cannot be
    /// read (permissions, Azure DocumentDB): then the server alone must fail a stream that falls
    /// off its history, which is said once per process.
    async fn history_guard(&self, start: &StartPoint, checkpoint: &Checkpoint) -> Result<Option<HistoryGuard>, StreamError> {
        if self.guard_off.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let probe = match history::read_floor(&self.ctx.source).await {
            Ok(floor) if floor.oldest.is_some() => floor,
            Err(err) if is_transient(&err) => return Err(StreamError::Source(err)),
            other => {
                self.guard_off.store(true, Ordering::Relaxed);
                let (error, reason) = match other {
                    Err(err) => (describe(&err), super::classify::reason(&err)),
                    Ok(_) => ("it holds no entry".to_string(), Reason::EndpointError),
                };
                tracing::warn!(
                    error = %error,
                    reason = %reason,
                    "cannot read the source's oplog (local.oplog.rs): the history guard is off, and the replicator relies on the \
                     source to fail a change stream that falls off its history"
                );
                return Ok(None);
            }
        };
        // Where the checkpoint's own token stands, the checkpoint says; a token from elsewhere
        // (`startAt.resumeToken`) names its time only in mongod's format.
        let start_time = match start {
            StartPoint::ResumeAfter(token) | StartPoint::StartAfter(token) => {
                checkpoint.history_read_to.filter(|_| checkpoint.token.as_ref() == Some(token)).or_else(|| history::token_cluster_time(token))
            }
            StartPoint::AtClusterTime(ts) => Some(*ts),
            StartPoint::Now => None,
        };
        if let (Some(last_read), Some(oldest)) = (start_time, probe.oldest)
            && !history::history_kept(last_read, oldest)
        {
            return Err(StreamError::HistoryLost(Pruned { last_read, oldest }.into()));
        }
        Ok(Some(HistoryGuard::new(start_time, &probe)))
    }

    /// Streams from `start`, saving progress into `checkpoint` (at least once a second under
    /// load, on idle batches and on shutdown). Returns Ok when cancelled and drained.
    pub async fn run(&self, start: StartPoint, checkpoint: &mut Checkpoint) -> Result<(), StreamError> {
        let ctx = &self.ctx;
        let scope = ctx.map.stream_scope();
        let max_await = ctx.settings.flush_interval.max(Duration::from_millis(100));
        // Read before the stream opens, so every getMore comes after it.
        let guard = self.history_guard(&start, checkpoint).await?;
        let stream = open(&ctx.source, &scope, &start, max_await, ctx.settings.batch_size as u32).await?;
        tracing::info!(scope = ?scope, start = %start, history_guard = guard.is_some(), "streaming");
        self.ctx.metrics.set_phase("stream");

        // The reader fills windows while the writers apply the previous one.
        let (tx, mut rx) = mpsc::channel::<Result<Window, StreamError>>(2);
        let reader = Reader { ctx: ctx.clone(), targets: Targets::new(ctx.map.clone()), scope, max_await, guard };
        let reader_task = tokio::spawn(reader.run(stream, tx));

        let mut last_save = Instant::now();
        let mut saved_token = checkpoint.token.clone();
        let result = loop {
            let Some(window) = rx.recv().await else { break Ok(()) };
            let mut window = match window {
                Ok(w) => w,
                Err(err) => break Err(err),
            };
            let count = window.actions.len() as i64;
            if let Err(err) = self.apply(std::mem::take(&mut window.actions)).await {
                break Err(err);
            }
            checkpoint.events_applied += count;
            let lag = match window.times.newest {
                Some(ts) => {
                    checkpoint.last_applied_cluster_time = Some(ts);
                    (DateTime::now().timestamp_millis() / 1000 - i64::from(ts.time)).max(0)
                }
                // An empty window means the stream is caught up with the source.
                None => 0,
            };
            self.ctx.metrics.set_lag_seconds(lag as f64);
            let caught_up = lag as u64 <= self.ctx.settings.caught_up_lag_seconds && self.ctx.metrics.failing_since().is_none();
            self.ctx.metrics.set_caught_up(caught_up);
            if window.token.is_some() {
                checkpoint.token = window.token.clone();
                checkpoint.history_read_to = window.read_to.or(checkpoint.history_read_to);
            }
            if checkpoint.token != saved_token && last_save.elapsed() >= Duration::from_secs(1) {
                self.save(checkpoint).await?;
                saved_token = checkpoint.token.clone();
                last_save = Instant::now();
            }
        };
        reader_task.abort();
        // Whatever happened, what was applied is kept.
        if checkpoint.token != saved_token {
            self.save(checkpoint).await?;
        }
        result
    }

    async fn save(&self, checkpoint: &mut Checkpoint) -> Result<(), StreamError> {
        checkpoint.saved_at = DateTime::now();
        self.ctx.store.save(checkpoint).await.map_err(StreamError::Checkpoint)?;
        self.ctx.metrics.checkpoint_saved();
        Ok(())
    }

    /// Applies one window: document writes in parallel by key, DDL in order between flushes.
    async fn apply(&self, actions: Vec<(Action, usize)>) -> Result<(), StreamError> {
        let mut buckets: Vec<Vec<DocWrite>> = vec![Vec::new(); self.ctx.settings.workers];
        let mut applied = [0u64; OPERATIONS.len()];
        for (action, operation) in actions {
            match action {
                Action::Write(write @ DocWrite { kind: DocWriteKind::Patch(_), .. }) => {
                    // Patches do not commute with other writes of the document: apply in order.
                    self.flush(&mut buckets).await?;
                    self.ctx.sink.apply(vec![write]).await?;
                    applied[operation] += 1;
                }
                Action::Write(write) => {
                    buckets[bucket_of(&write, self.ctx.settings.workers)].push(write);
                    applied[operation] += 1;
                }
                Action::Ddl(ddl) => {
                    self.flush(&mut buckets).await?;
                    tracing::info!(ddl = ?ddl, "applying DDL");
                    if let Ddl::CopyCollection { source, target } = &ddl {
                        self.copier.copy_collection(source, target).await?;
                    } else {
                        self.ctx.sink.apply_ddl(&ddl).await?;
                    }
                    applied[operation] += 1;
                }
                Action::Skip | Action::Invalidate => {}
            }
        }
        let flushed = self.flush(&mut buckets).await;
        // Counted once per window, not per event; a failed window is replayed and counted then.
        if flushed.is_ok() {
            for (operation, n) in OPERATIONS.iter().zip(applied).filter(|(_, n)| *n > 0) {
                self.ctx.metrics.events_applied(operation, n);
            }
        }
        flushed
    }

    async fn flush(&self, buckets: &mut [Vec<DocWrite>]) -> Result<(), StreamError> {
        let mut tasks = JoinSet::new();
        for bucket in buckets.iter_mut().filter(|b| !b.is_empty()) {
            let sink = self.ctx.sink.clone();
            let writes = std::mem::take(bucket);
            tasks.spawn(async move { sink.apply(writes).await });
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    first_error.get_or_insert(StreamError::Sink(err));
                }
                Err(join) => std::panic::resume_unwind(join.into_panic()),
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The writer a document goes to: the same namespace and key always go to the same one.
fn bucket_of(write: &DocWrite, workers: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    write.ns.hash(&mut hasher);
    write.key.as_bytes().hash(&mut hasher);
    (hasher.finish() % workers as u64) as usize
}

struct Reader {
    ctx: Arc<Context>,
    targets: Targets,
    scope: StreamScope,
    max_await: Duration,
    guard: Option<HistoryGuard>,
}

impl Reader {
    async fn run(mut self, mut stream: ChangeStream<RawDocumentBuf>, tx: mpsc::Sender<Result<Window, StreamError>>) {
        loop {
            if self.ctx.cancel.is_cancelled() {
                return;
            }
            let window = match self.read_window(&mut stream).await {
                // Proven in batches (history::CHECK_EVERY); the checkpoint keeps the proven position only.
                Ok((mut window, reopen)) => self.prove(&window.times).await.map(|()| {
                    window.read_to = self.guard.as_ref().and_then(HistoryGuard::read_to);
                    (window, reopen)
                }),
                Err(err) => Err(err),
            };
            let reopen = match &window {
                Ok((_, Some(token))) => Some(token.clone()),
                _ => None,
            };
            let failed = window.is_err();
            if tx.send(window.map(|(w, _)| w)).await.is_err() || failed {
                return;
            }
            if let Some(token) = reopen {
                match open(&self.ctx.source, &self.scope, &StartPoint::StartAfter(token), self.max_await, self.ctx.settings.batch_size as u32).await {
                    Ok(s) => stream = s,
                    Err(err) => {
                        let _ = tx.send(Err(err)).await;
                        return;
                    }
                }
            }
        }
    }

    /// Checks with the source's oldest retained change that nothing between the last window and
    /// this one was pruned; sets the headroom gauge and warns (rate limited) when it is low.
    async fn prove(&mut self, times: &WindowTimes) -> Result<(), StreamError> {
        let Some(guard) = self.guard.as_mut() else { return Ok(()) };
        let now = Instant::now();
        if !guard.wants_check(now) {
            guard.note(times);
            return Ok(());
        }
        let floor = history::read_floor(&self.ctx.source).await.map_err(StreamError::from_source)?;
        guard.floor_read_took(now.elapsed());
        match guard.check(times, &floor, now) {
            Err(pruned) => {
                tracing::warn!(
                    last_read = %format_args!("{}.{}", pruned.last_read.time, pruned.last_read.increment),
                    oldest_retained = %format_args!("{}.{}", pruned.oldest.time, pruned.oldest.increment),
                    "the source pruned change history the stream had not read"
                );
                Err(StreamError::HistoryLost(pruned.into()))
            }
            Ok(Some(headroom)) => {
                self.ctx.metrics.set_source_history_headroom_seconds(headroom as f64);
                if guard.should_warn(headroom, now) {
                    tracing::warn!(
                        headroom_seconds = headroom,
                        "the source keeps only {headroom} s of change history behind the replicator: grow its oplog, or the next \
                         stall may lose history"
                    );
                }
                Ok(())
            }
            Ok(None) => Ok(()),
        }
    }

    /// Reads until the window is full, the flush interval passes or the server's batch runs
    /// dry. Returns the window and, after an invalidate, the token to reopen after.
    async fn read_window(&mut self, stream: &mut ChangeStream<RawDocumentBuf>) -> Result<(Window, Option<ResumeToken>), StreamError> {
        let deadline = Instant::now() + self.ctx.settings.flush_interval;
        let mut actions = Vec::new();
        let mut times = WindowTimes::default();
        loop {
            // Not raced against cancellation: a cancelled getMore leaves the driver's cursor
            // unusable (LAB-NOTES); it returns within max_await anyway.
            let Some(event) = stream.next_if_any().await.map_err(StreamError::from_source)? else {
                times.caught_up = true;
                break;
            };
            if let Some(ts) = cluster_time(&event) {
                times.first.get_or_insert(ts);
                times.newest = Some(ts);
            }
            let operation = operation_label(&event);
            let action = map_event(&event, &mut self.targets)?;
            if action == Action::Invalidate {
                let token = stream.resume_token();
                return Ok((Window { actions, token: token.clone(), times, read_to: None }, token));
            }
            if action != Action::Skip {
                actions.push((action, operation));
            }
            if actions.len() >= self.ctx.settings.window_events() || Instant::now() >= deadline || self.ctx.cancel.is_cancelled() {
                break;
            }
        }
        Ok((Window { actions, token: stream.resume_token(), times, read_to: None }, None))
    }
}
