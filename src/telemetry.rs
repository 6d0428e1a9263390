//! Logging, Prometheus metrics and the health endpoints (`/metrics`, `/healthz`, `/readyz`).
//!
//! [`Metrics`] and [`Health`] are plain shared state, usable without a server; [`serve`] is the
//! only I/O and exposes them over HTTP/1 for Prometheus and the kubelet probes.

use std::convert::Infallible;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Content type of `/metrics`: the OpenMetrics text format that [`Metrics::encode`] writes.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";
/// Phases reported by `mongo_replicator_phase`; each is always exported (0 or 1) so a dashboard
/// can show "which phase" without `absent()`.
pub const PHASES: [&str; 5] = ["starting", "snapshot", "stream", "stopped", "failed"];
const DOCUMENT_BUCKETS: [f64; 16] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5];
/// Slow or idle clients must not hold a connection (and a task) forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Accept fails on e.g. file-descriptor exhaustion; retrying at once would spin a core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Errors of logging set-up and the telemetry server.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {directives:?} (from RUST_LOG or the log level): {source}")]
    InvalidLogFilter {
        directives: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("logging is already initialised in this process")]
    LoggingAlreadyInitialized,
    #[error("cannot initialise logging: {source}")]
    LoggingInitFailed {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot listen on {addr}: {source}")]
    MetricsListenFailed {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl TelemetryError {
    /// Stable reason for conditions, Events and metric labels.
    pub fn reason(&self) -> crate::reason::Reason {
        match self {
            TelemetryError::InvalidLogFilter { .. } => crate::reason::Reason::InvalidLogFilter,
            TelemetryError::LoggingAlreadyInitialized => crate::reason::Reason::LoggingAlreadyInitialized,
            TelemetryError::LoggingInitFailed { .. } => crate::reason::Reason::LoggingInitFailed,
            TelemetryError::MetricsListenFailed { .. } => crate::reason::Reason::MetricsListenFailed,
        }
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object a line: `timestamp`, `level`, `target`, the event's fields flattened.
    Json,
    /// Human-readable lines, coloured when stderr is a terminal.
    Text,
}

/// Text on a terminal (someone is reading), JSON otherwise (a log collector is reading).
pub fn default_log_format() -> LogFormat {
    if std::io::stderr().is_terminal() { LogFormat::Text } else { LogFormat::Json }
}

/// Installs the global tracing subscriber, writing to stderr.
///
/// `level` is an `EnvFilter` directive (`info`, `mongo_replicator=debug,info`); a non-empty
/// `RUST_LOG` replaces it. A second call returns [`TelemetryError::LoggingAlreadyInitialized`]
/// and leaves the first subscriber in place.
pub fn init_logging(level: &str, format: LogFormat) -> Result<(), TelemetryError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let directives = log_directives(level, rust_log.as_deref());
    let filter = EnvFilter::try_new(directives).map_err(|source| TelemetryError::InvalidLogFilter { directives: directives.to_owned(), source })?;
    // try_init cannot tell "already set" from other failures, so ask first.
    if tracing::dispatcher::has_been_set() {
        return Err(TelemetryError::LoggingAlreadyInitialized);
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
    result.map_err(|source| TelemetryError::LoggingInitFailed { source })
}

/// The filter directives in effect: `RUST_LOG` when set and non-empty, else `level`.
fn log_directives<'a>(level: &'a str, rust_log: Option<&'a str>) -> &'a str {
    match rust_log {
        Some(env) if !env.trim().is_empty() => env,
        _ => level,
    }
}

/// A `{key="value"}` label set with one label.
type Label = [(&'static str, String); 1];

fn label(key: &'static str, value: &str) -> Label {
    [(key, value.to_owned())]
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values stay consistent even if a holder panicked; keep serving metrics.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A registry in the OpenMetrics text format.
pub fn encode_registry(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(err) = prometheus_client::encoding::text::encode(&mut out, registry) {
        // Only a collector can fail; the truncated text (no `# EOF`) fails the scrape visibly.
        tracing::error!(error = %err, "cannot encode metrics");
    }
    out
}

/// What `/metrics` serves: the replicator's metrics, or the operator's.
pub trait Scrape: Send + Sync + 'static {
    /// Every metric in the OpenMetrics text format, ending with `# EOF`.
    fn encode(&self) -> String;
}

impl Scrape for Metrics {
    fn encode(&self) -> String {
        Metrics::encode(self)
    }
}

/// The replicator's Prometheus metrics, all named `mongo_replicator_*`.
///
/// Create one at start-up, register any extra metrics through [`Metrics::registry_mut`], then
/// share it as `Arc<Metrics>`; every recording method takes `&self`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    events_applied: Family<Label, Counter>,
    documents_copied: Counter,
    apply_batch_duration: Histogram,
    apply_batch_documents: Histogram,
    lag: Gauge<f64, AtomicU64>,
    retries: Family<Label, Counter>,
    phase: Family<Label, Gauge>,
    /// Serialises phase changes so concurrent callers cannot leave two phases at 1.
    current_phase: Mutex<String>,
    last_checkpoint: Arc<Mutex<Option<Instant>>>,
    /// Absent until the history guard first compares (and where the source's oplog is unreadable).
    history_headroom: Arc<Mutex<Option<f64>>>,
    /// Since when writes to the target have failed and been retried; `None` once one succeeds.
    failing_since: Mutex<Option<std::time::SystemTime>>,
    /// Since when the stream has been caught up (cutover readiness); `None` while it is not.
    caught_up_since: Arc<Mutex<Option<std::time::SystemTime>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric, with phase `starting`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mongo_replicator");
        let metrics = Metrics {
            events_applied: Family::default(),
            documents_copied: Counter::default(),
            // 0.5 ms doubling to 16.4 s: a healthy batch sits in the low buckets, a throttled
            // target shows up in the top ones.
            apply_batch_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            apply_batch_documents: Histogram::new(DOCUMENT_BUCKETS),
            lag: Gauge::default(),
            retries: Family::default(),
            phase: Family::default(),
            current_phase: Mutex::new(String::new()),
            last_checkpoint: Arc::new(Mutex::new(None)),
            history_headroom: Arc::new(Mutex::new(None)),
            failing_since: Mutex::new(None),
            caught_up_since: Arc::new(Mutex::new(None)),
            // Filled in below: the metrics are registered as clones sharing their values.
            registry: Registry::default(),
        };
        registry.register(
            "events_applied",
            "Change events written to the target, by operation (insert, update, replace, delete, ddl). \
             Flat while lag_seconds grows means the stream is stuck; check the logs for retries",
            metrics.events_applied.clone(),
        );
        registry.register(
            "documents_copied",
            "Documents copied to the target by the initial snapshot. Stops growing when the \
             snapshot finishes (phase moves to stream) or stalls",
            metrics.documents_copied.clone(),
        );
        registry.register_with_unit(
            "apply_batch_duration",
            "Time to write one batch to the target. Rising values with retries_total{operation=\"write\"} \
             mean the target is throttling: raise its capacity or lower the batch size",
            Unit::Seconds,
            metrics.apply_batch_duration.clone(),
        );
        registry.register(
            "apply_batch_documents",
            "Documents per batch written to the target. Mostly 1 means events arrive slower than \
             they are applied, which is healthy; batches at the batch size mean the replicator is \
             catching up",
            metrics.apply_batch_documents.clone(),
        );
        registry.register_with_unit(
            "lag",
            "Seconds between the source cluster time of the last applied event and now. Growing \
             lag means the target cannot keep up or the change stream is stalled; if it nears the \
             source oplog window, the replication must restart from a snapshot",
            Unit::Seconds,
            metrics.lag.clone(),
        );
        registry.register(
            "retries",
            "Transient failures retried, by operation (write, read, stream). A steady rate points \
             at throttling or an unreliable network between the replicator and the databases",
            metrics.retries.clone(),
        );
        registry.register(
            "phase",
            "1 for the current phase (starting, snapshot, stream, stopped, failed), 0 for the others. \
             On failed, see the MongoReplication status and the logs for the reason",
            metrics.phase.clone(),
        );
        registry.register_collector(Box::new(CheckpointAge(metrics.last_checkpoint.clone())));
        registry.register_collector(Box::new(HistoryHeadroom(metrics.history_headroom.clone())));
        registry.register_collector(Box::new(CaughtUp(metrics.caught_up_since.clone())));
        // Zero series from the start, so rate() and alerts work before the first event or retry.
        for operation in ["insert", "update", "replace", "delete", "ddl"] {
            metrics.events_applied(operation, 0);
        }
        for operation in ["write", "read", "stream"] {
            metrics.retries.get_or_create(&label("operation", operation)).inc_by(0);
        }
        let metrics = Metrics { registry, ..metrics };
        metrics.set_phase("starting");
        metrics
    }

    /// Adds `n` applied change events of `operation` (insert, update, replace, delete or ddl).
    pub fn events_applied(&self, operation: &str, n: u64) {
        self.events_applied.get_or_create(&label("operation", operation)).inc_by(n);
    }

    /// Adds `n` documents copied by the snapshot.
    pub fn documents_copied(&self, n: u64) {
        self.documents_copied.inc_by(n);
    }

    /// Records one batch written to the target: how long it took and how many documents it held.
    pub fn observe_apply_batch(&self, seconds: f64, documents: u64) {
        self.apply_batch_duration.observe(seconds);
        self.apply_batch_documents.observe(documents as f64);
    }

    /// Sets the replication lag. Negative values (clock skew between source and replicator)
    /// are reported as 0.
    pub fn set_lag_seconds(&self, s: f64) {
        self.lag.set(s.max(0.0));
    }

    /// Sets how much change history the source keeps behind the last change read: the last read
    /// cluster time minus the oldest one the source retains.
    pub fn set_source_history_headroom_seconds(&self, s: f64) {
        *lock(&self.history_headroom) = Some(s);
    }

    /// The lag last set, in seconds.
    /// Whether the stream is caught up now (lag within the threshold, writes succeeding); the
    /// time it became so is kept until it no longer is.
    pub fn set_caught_up(&self, caught_up: bool) {
        let mut since = lock(&self.caught_up_since);
        match (caught_up, *since) {
            (true, None) => *since = Some(std::time::SystemTime::now()),
            (false, _) => *since = None,
            (true, Some(_)) => {}
        }
    }

    /// Since when the stream has been caught up, if it is.
    pub fn caught_up_since(&self) -> Option<std::time::SystemTime> {
        *lock(&self.caught_up_since)
    }

    pub fn lag_seconds(&self) -> f64 {
        self.lag.get()
    }

    /// Documents the snapshot copied in this process.
    pub fn documents_copied_total(&self) -> u64 {
        self.documents_copied.get()
    }

    /// Notes that a checkpoint (resume token) was saved just now; `checkpoint_age_seconds` is
    /// measured from this instant at every scrape.
    /// Notes that a write to the target failed and is retried (the first failure is kept).
    pub fn write_failing(&self) {
        lock(&self.failing_since).get_or_insert_with(std::time::SystemTime::now);
    }

    /// Notes that a write to the target succeeded.
    pub fn write_succeeded(&self) {
        *lock(&self.failing_since) = None;
    }

    /// Since when writes to the target have been failing, if they are.
    pub fn failing_since(&self) -> Option<std::time::SystemTime> {
        *lock(&self.failing_since)
    }

    pub fn checkpoint_saved(&self) {
        *lock(&self.last_checkpoint) = Some(Instant::now());
    }

    /// Counts one retried `operation` (write, read, stream).
    pub fn retry(&self, operation: &str) {
        self.retries.get_or_create(&label("operation", operation)).inc();
    }

    /// Makes `phase` the current phase: 1 for it, 0 for every other phase.
    pub fn set_phase(&self, phase: &str) {
        let mut current = lock(&self.current_phase);
        // The previous phase may be one outside PHASES; zero it too.
        for other in PHASES.iter().copied().chain([current.as_str()]).filter(|p| !p.is_empty()) {
            self.phase.get_or_create(&label("phase", other)).set(0);
        }
        self.phase.get_or_create(&label("phase", phase)).set(1);
        phase.clone_into(&mut current);
    }

    /// Every metric in the OpenMetrics text format, ending with `# EOF`.
    pub fn encode(&self) -> String {
        encode_registry(&self.registry)
    }

    /// The registry behind [`Metrics::encode`], for other modules to add their own metrics at
    /// start-up (e.g. the Entra client's token refreshes), before the `Metrics` is put in an
    /// `Arc`. Names get the `mongo_replicator_` prefix; use
    /// `registry_mut().sub_registry_with_prefix("auth")` to group a module's metrics.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }
}

/// `checkpoint_age_seconds`, computed at scrape time so it keeps growing when saves stop.
/// Omitted before the first save: a NaN would make `> threshold` alerts silently false, whereas
/// omission is explicit and `absent()` can alert on it.
#[derive(Debug)]
struct CheckpointAge(Arc<Mutex<Option<Instant>>>);

impl Collector for CheckpointAge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(saved) = *lock(&self.0) else { return Ok(()) };
        let age = ConstGauge::new(saved.elapsed().as_secs_f64());
        let metric = encoder.encode_descriptor(
            "checkpoint_age",
            "Seconds since the resume token was last saved. A restart resumes from that token, so \
             this bounds the events replayed after a crash; if it keeps growing, check the target's \
             health and the logs.",
            Some(&Unit::Seconds),
            age.metric_type(),
        )?;
        age.encode(metric)
    }
}

/// `caught_up_seconds`: how long the stream has been caught up, 0 while it is not.
#[derive(Debug)]
struct CaughtUp(Arc<Mutex<Option<std::time::SystemTime>>>);

impl Collector for CaughtUp {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let seconds = lock(&self.0).and_then(|since| since.elapsed().ok()).map_or(0.0, |d| d.as_secs_f64());
        let gauge = ConstGauge::new(seconds);
        let metric = encoder.encode_descriptor(
            "caught_up",
            "Seconds the stream has been caught up: lag at most caughtUpLagSeconds and writes succeeding; 0 \
             while it is not. Cut over once it has held long enough: stop writes to the source, wait for the \
             last applied cluster time to pass that moment, then switch clients to the target",
            Some(&Unit::Seconds),
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// `source_history_headroom_seconds`, omitted until known: a 0 would fire a "falling off the
/// history" alert where the source's oplog cannot be read at all.
#[derive(Debug)]
struct HistoryHeadroom(Arc<Mutex<Option<f64>>>);

impl Collector for HistoryHeadroom {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(seconds) = *lock(&self.0) else { return Ok(()) };
        let headroom = ConstGauge::new(seconds);
        let metric = encoder.encode_descriptor(
            "source_history_headroom",
            "Seconds of change history the source still keeps behind the last change the stream read \
             (that change's cluster time minus the oldest entry of the source's oplog). At 0 the next \
             stall loses history and the replication stops or copies again (onHistoryLost): alert well \
             before, and grow the source's oplog or speed up the target. Absent where the oplog cannot be read",
            Some(&Unit::Seconds),
            headroom.metric_type(),
        )?;
        headroom.encode(metric)
    }
}

/// What the kubelet probes see: liveness (restart the pod when false) and readiness (the reason
/// is shown in the `/readyz` body).
#[derive(Debug)]
pub struct Health {
    live: AtomicBool,
    /// `None` when ready, else why not.
    not_ready: Mutex<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Live, not ready (reason "starting").
    pub fn new() -> Self {
        Health { live: AtomicBool::new(true), not_ready: Mutex::new(Some("starting".to_owned())) }
    }

    /// Ready, or not ready without a specific reason (see [`Health::set_not_ready`]).
    pub fn set_ready(&self, ready: bool) {
        let mut not_ready = lock(&self.not_ready);
        match (ready, not_ready.is_some()) {
            (true, _) => *not_ready = None,
            (false, false) => *not_ready = Some("not ready".to_owned()),
            (false, true) => {} // keep the more specific reason already set
        }
    }

    /// Not ready because of `reason` (shown in the `/readyz` body).
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *lock(&self.not_ready) = Some(reason.into());
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        lock(&self.not_ready).is_none()
    }

    /// Why the process is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<String> {
        lock(&self.not_ready).clone()
    }

    /// Live or not; the kubelet restarts the container when `/healthz` fails.
    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Relaxed);
    }

    /// Whether `/healthz` answers 200.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }
}

/// Binds the telemetry listener; returns it with the bound address (the real port for port 0).
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), TelemetryError> {
    let listen_failed = |source| TelemetryError::MetricsListenFailed { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(listen_failed)?;
    let local = listener.local_addr().map_err(listen_failed)?;
    Ok((listener, local))
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown` is cancelled.
pub async fn serve<M: Scrape>(addr: SocketAddr, metrics: Arc<M>, health: Arc<Health>, shutdown: CancellationToken) -> Result<(), TelemetryError> {
    let (listener, local) = bind(addr).await?;
    tracing::info!(addr = %local, "serving /metrics, /healthz and /readyz");
    serve_listener(listener, metrics, health, shutdown).await;
    Ok(())
}

/// As [`serve`], on a listener bound by the caller (see [`bind`]). Returns once `shutdown` is
/// cancelled and the listener is closed; open connections finish their in-flight request.
pub async fn serve_listener<M: Scrape>(listener: TcpListener, metrics: Arc<M>, health: Arc<Health>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "telemetry server cannot accept a connection; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(stream, metrics.clone(), health.clone(), shutdown.clone()));
    }
}

async fn serve_connection<M: Scrape>(stream: TcpStream, metrics: Arc<M>, health: Arc<Health>, shutdown: CancellationToken) {
    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let response = respond(request.method(), request.uri().path(), &*metrics, &health);
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            // Finish the request in flight, then close instead of keeping the connection alive.
            connection.as_mut().graceful_shutdown();
            connection.as_mut().await
        }
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "telemetry connection ended with an error");
    }
}

/// The response to one request; reads the current metrics and health, no I/O.
fn respond<M: Scrape>(method: &Method, path: &str, metrics: &M, health: &Health) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" | "/healthz" | "/readyz" if method != Method::GET => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, TEXT_CONTENT_TYPE, format!("{method} not allowed; use GET"));
            response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET"));
            return response;
        }
        "/metrics" => (StatusCode::OK, OPENMETRICS_CONTENT_TYPE, metrics.encode()),
        "/healthz" if health.is_live() => (StatusCode::OK, TEXT_CONTENT_TYPE, "ok".to_owned()),
        "/healthz" => (StatusCode::SERVICE_UNAVAILABLE, TEXT_CONTENT_TYPE, "not live".to_owned()),
        "/readyz" => match health.not_ready_reason() {
            None => (StatusCode::OK, TEXT_CONTENT_TYPE, "ok".to_owned()),
            Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, TEXT_CONTENT_TYPE, format!("not ready: {reason}")),
        },
        _ => (StatusCode::NOT_FOUND, TEXT_CONTENT_TYPE, format!("no {path} here; try /metrics, /healthz or /readyz")),
    };
    text(status, content_type, body)
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn value_of(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn recorded_values_appear_under_their_names_and_labels() {
        let metrics = Metrics::new();
        metrics.events_applied("insert", 3);
        metrics.events_applied("delete", 1);
        metrics.events_applied("insert", 2);
        metrics.documents_copied(5);
        metrics.observe_apply_batch(0.002, 7);
        metrics.set_lag_seconds(2.5);
        metrics.retry("write");
        metrics.retry("write");
        metrics.set_phase("snapshot");
        metrics.set_phase("stream");
        let text = metrics.encode();

        assert_eq!(value_of(&text, r#"mongo_replicator_events_applied_total{operation="insert"}"#), Some(5.0));
        assert_eq!(value_of(&text, r#"mongo_replicator_events_applied_total{operation="delete"}"#), Some(1.0));
        // Known operations are exported at 0 before they first happen.
        assert_eq!(value_of(&text, r#"mongo_replicator_events_applied_total{operation="update"}"#), Some(0.0));
        assert_eq!(value_of(&text, r#"mongo_replicator_retries_total{operation="read"}"#), Some(0.0));
        assert_eq!(value_of(&text, "mongo_replicator_documents_copied_total"), Some(5.0));
        assert_eq!(value_of(&text, "mongo_replicator_apply_batch_duration_seconds_count"), Some(1.0));
        assert_eq!(value_of(&text, r#"mongo_replicator_apply_batch_duration_seconds_bucket{le="0.001"}"#), Some(0.0));
        assert_eq!(value_of(&text, r#"mongo_replicator_apply_batch_duration_seconds_bucket{le="0.002"}"#), Some(1.0));
        assert_eq!(value_of(&text, r#"mongo_replicator_apply_batch_documents_bucket{le="5.0"}"#), Some(0.0));
        assert_eq!(value_of(&text, r#"mongo_replicator_apply_batch_documents_bucket{le="10.0"}"#), Some(1.0));
        assert!(text.contains(r#"mongo_replicator_apply_batch_documents_bucket{le="100000.0"}"#), "{text}");
        assert_eq!(value_of(&text, "mongo_replicator_apply_batch_documents_sum"), Some(7.0));
        assert_eq!(value_of(&text, "mongo_replicator_lag_seconds"), Some(2.5));
        assert_eq!(value_of(&text, r#"mongo_replicator_retries_total{operation="write"}"#), Some(2.0));
        for phase in PHASES {
            let expected = if phase == "stream" { 1.0 } else { 0.0 };
            assert_eq!(value_of(&text, &format!(r#"mongo_replicator_phase{{phase="{phase}"}}"#)), Some(expected), "{phase}");
        }
        assert!(text.contains("# HELP mongo_replicator_lag_seconds Seconds "), "{text}");
        assert!(!text.contains("..\n"), "the registry adds the final full stop itself: {text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_phase_outside_the_known_list_is_reset_by_the_next_change() {
        let metrics = Metrics::new();
        metrics.set_phase("paused");
        metrics.set_phase("stream");
        let text = metrics.encode();
        assert_eq!(value_of(&text, r#"mongo_replicator_phase{phase="paused"}"#), Some(0.0));
        assert_eq!(value_of(&text, r#"mongo_replicator_phase{phase="starting"}"#), Some(0.0));
        assert_eq!(value_of(&text, r#"mongo_replicator_phase{phase="stream"}"#), Some(1.0));
    }

    #[test]
    fn history_headroom_is_absent_until_the_guard_compares() {
        let metrics = Metrics::new();
        assert!(!metrics.encode().contains("source_history_headroom"));
        metrics.set_source_history_headroom_seconds(420.0);
        let text = metrics.encode();
        assert_eq!(value_of(&text, "mongo_replicator_source_history_headroom_seconds"), Some(420.0));
        assert!(text.contains("# TYPE mongo_replicator_source_history_headroom_seconds gauge"), "{text}");
    }

    #[tokio::test]
    async fn checkpoint_age_is_absent_before_the_first_save_then_grows() {
        let metrics = Metrics::new();
        assert!(!metrics.encode().contains("checkpoint_age"));
        metrics.checkpoint_saved();
        let first = value_of(&metrics.encode(), "mongo_replicator_checkpoint_age_seconds").expect("age after a save");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let second = value_of(&metrics.encode(), "mongo_replicator_checkpoint_age_seconds").expect("age after a save");
        assert!(second >= first && second >= 1.0, "first {first}, second {second}");
    }

    #[test]
    fn other_modules_can_register_metrics_before_sharing() {
        let mut metrics = Metrics::new();
        let refreshes = Counter::<u64>::default();
        metrics.registry_mut().sub_registry_with_prefix("auth").register("token_refreshes", "help", refreshes.clone());
        refreshes.inc();
        let metrics = Arc::new(metrics);
        assert_eq!(value_of(&metrics.encode(), "mongo_replicator_auth_token_refreshes_total"), Some(1.0));
    }

    #[test]
    fn rust_log_overrides_the_level_only_when_set() {
        assert_eq!(log_directives("info", None), "info");
        assert_eq!(log_directives("info", Some("  ")), "info");
        assert_eq!(log_directives("info", Some("mongo_replicator=debug")), "mongo_replicator=debug");
    }

    #[test]
    fn logging_twice_does_not_panic() {
        // The first call may win or lose against other tests; the second one must fail cleanly.
        let _ = init_logging("off", LogFormat::Json);
        let second = init_logging("off", LogFormat::Text).expect_err("already initialised");
        assert!(matches!(second.reason().as_str(), "LoggingAlreadyInitialized" | "LoggingInitFailed"), "{second}");
    }

    #[test]
    fn health_defaults_to_live_and_not_ready_with_a_reason() {
        let health = Health::new();
        assert!(health.is_live() && !health.is_ready());
        health.set_not_ready("source unreachable");
        health.set_ready(false);
        assert_eq!(health.not_ready_reason().as_deref(), Some("source unreachable"));
        health.set_ready(true);
        assert!(health.is_ready() && health.not_ready_reason().is_none());
    }

    async fn get(addr: SocketAddr, method: &str, path: &str) -> (String, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let (head, body) = response.split_once("\r\n\r\n").expect("a header block");
        (head.to_owned(), body.to_owned())
    }

    #[tokio::test]
    async fn server_answers_probes_and_scrapes_then_stops_on_cancel() {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new());
        let shutdown = CancellationToken::new();
        let (listener, addr) = bind("127.0.0.1:0".parse().unwrap()).await.expect("bind");
        let server = tokio::spawn(serve_listener(listener, metrics.clone(), health.clone(), shutdown.clone()));
        metrics.retry("stream");

        let (head, body) = get(addr, "GET", "/metrics").await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert!(head.to_ascii_lowercase().contains(&format!("content-type: {OPENMETRICS_CONTENT_TYPE}")), "{head}");
        assert!(body.contains(r#"mongo_replicator_retries_total{operation="stream"} 1"#), "{body}");

        let (head, body) = get(addr, "GET", "/healthz").await;
        assert!(head.starts_with("HTTP/1.1 200 ") && body == "ok", "{head}\n{body}");
        health.set_live(false);
        assert!(get(addr, "GET", "/healthz").await.0.starts_with("HTTP/1.1 503 "));

        let (head, body) = get(addr, "GET", "/readyz").await;
        assert!(head.starts_with("HTTP/1.1 503 ") && body == "not ready: starting", "{head}\n{body}");
        health.set_ready(true);
        let (head, body) = get(addr, "GET", "/readyz").await;
        assert!(head.starts_with("HTTP/1.1 200 ") && body == "ok", "{head}\n{body}");

        assert!(get(addr, "GET", "/nope").await.0.starts_with("HTTP/1.1 404 "));
        let (head, _) = get(addr, "POST", "/metrics").await;
        assert!(head.starts_with("HTTP/1.1 405 ") && head.to_ascii_lowercase().contains("allow: get"), "{head}");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("server stops").expect("no panic");
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed after cancel");
    }

    #[tokio::test]
    async fn bind_error_names_the_address() {
        let (_held, addr) = bind("127.0.0.1:0".parse().unwrap()).await.expect("bind");
        let err = bind(addr).await.expect_err("port in use");
        assert_eq!(err.reason(), "MetricsListenFailed");
        assert!(err.to_string().starts_with(&format!("cannot listen on {addr}: ")), "{err}");
    }

    #[test]
    fn metrics_and_health_can_be_shared_across_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Metrics>();
        shared::<Health>();
    }
}
