//! `mongo-replicator verify`: proves the target equals the source, while replication runs.
//!
//! A pass opens change streams on both sides first, then compares every included source
//! namespace with its target namespace in `_id` ranges (a merge join of both sides sorted by
//! `_id`, raw BSON bytes compared), in parallel and at a bounded rate. Documents that changed
//! during the pass, and mismatches, are rechecked in generations until each recheck is
//! decisive (see [`live`]); then indexes, collection options and counts are compared. Progress
//! and mismatches live in the target's checkpoint database ([`store`]), so a killed pass
//! resumes. The verdict names each mismatch by namespace, `_id` and kind, never by contents.

pub mod compare;
pub mod live;
pub mod metrics;
pub mod plan;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{Bson, DateTime, Document, RawDocumentBuf, doc};
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use mongodb::options::{ChangeStreamOptions, FindOptions};
use mongodb::{Client, Collection};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use self::compare::{Comparison, MismatchKind, compare_values, id_text, merge, raw_id};
use self::live::{Ledger, Limits, Millis, Step, next_step};
use self::metrics::{Progress, VerifyMetrics};
use self::plan::{Partition, partition_count, partitions};
use self::store::{PartitionRecord, PassRecord, VerificationStore};
use crate::auth::AuthError;
use crate::auth::oidc::{self, TokenSources};
use crate::reason::Reason;
use crate::replicator::classify::{self, ErrorClass, describe, is_refusal, is_transient};
use crate::replicator::config::{EndpointRole, ReplicatorConfig};
use crate::replicator::namespace::{Namespace, NamespaceError, NamespaceMap, StreamScope};
use crate::replicator::sink::Sink;
use crate::retry::{Decision, Failure, Policy, retry};

/// Waiting for an endpoint to answer at start.
const CONNECT_RETRY: Policy =
    Policy { first_delay: Duration::from_millis(500), max_delay: Duration::from_secs(10), max_attempts: None, budget: Some(Duration::from_secs(60)) };
/// Retrying one partition or one recheck after a transient failure.
const READ_RETRY: Policy =
    Policy { first_delay: Duration::from_millis(200), max_delay: Duration::from_secs(10), max_attempts: Some(8), budget: None };
/// Ids per `$in` lookup of a recheck.
const RECHECK_CHUNK: usize = 256;
/// A side's buffer of the merge holds at most this many bytes (documents reach 16 MB).
const BUFFER_BYTES: usize = 32 * 1024 * 1024;
/// Mismatches listed in a verdict; the counts cover all of them.
pub const LISTED_MISMATCHES: usize = 1000;

/// How a pass runs.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyOptions {
    /// Partitions compared at once.
    pub workers: usize,
    /// Documents per read batch of each side.
    pub batch_size: usize,
    /// A collection gets one `_id` range per this many documents (at most `workers × 4`).
    pub partition_documents: u64,
    /// Most source documents read per second, scan and rechecks together; `None`: no limit.
    pub max_docs_per_second: Option<u64>,
    pub comparison: Comparison,
    /// How far the target may trail the source: a difference is reported once a recheck still
    /// finds it this long after the document's last change.
    pub lag_allowance: Duration,
    /// The live phase gives up (no verdict) after this many generations...
    pub max_generations: u32,
    /// ...or this long after the scan.
    pub max_live: Duration,
    /// Forget a saved, unfinished pass and start a new one.
    pub restart: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            workers: 4,
            batch_size: 1000,
            partition_documents: 50_000,
            max_docs_per_second: None,
            comparison: Comparison::default(),
            lag_allowance: Duration::from_secs(30),
            max_generations: 1000,
            max_live: Duration::from_secs(600),
            restart: false,
        }
    }
}

impl VerifyOptions {
    /// What a saved pass must have been run with to be resumed.
    fn settings(&self, config: &ReplicatorConfig) -> Document {
        let rules = config.namespaces.as_ref().and_then(|r| mongodb::bson::to_bson(r).ok()).unwrap_or(Bson::Null);
        doc! {"ignoreFieldOrder": self.comparison.ignore_field_order, "namespaces": rules}
    }
}

/// Why a pass stopped without a verdict.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("{role}: cannot create a client: {detail}")]
    Client { role: EndpointRole, detail: String },
    #[error("{role}: {detail}")]
    Endpoint { role: EndpointRole, reason: Reason, detail: String },
    #[error("cannot read {what} from the {role}: {}", describe(source))]
    Read {
        role: EndpointRole,
        what: String,
        #[source]
        source: mongodb::error::Error,
    },
    #[error("the {role}'s change stream failed: {}", describe(source))]
    Stream {
        role: EndpointRole,
        #[source]
        source: mongodb::error::Error,
    },
    #[error("cannot read or save the verification's progress in the target: {}", describe(.0))]
    State(#[source] mongodb::error::Error),
    #[error("stopped by a shutdown; a rerun resumes")]
    Cancelled,
}

impl VerifyError {
    /// Stable reason for the verdict, a condition, an Event.
    pub fn reason(&self) -> Reason {
        let server = |e: &mongodb::error::Error, fallback: Reason| {
            if let Some(token) = oidc::token_error(e) {
                token.reason()
            } else if is_refusal(e) || classify::classify(e) == ErrorClass::Unreachable {
                classify::reason(e)
            } else {
                fallback
            }
        };
        match self {
            VerifyError::Namespace(e) => e.reason(),
            VerifyError::Auth(e) => e.reason(),
            VerifyError::Client { .. } => Reason::ClientOptionsInvalid,
            VerifyError::Endpoint { reason, .. } => *reason,
            VerifyError::Read { role: EndpointRole::Source, source, .. } => server(source, Reason::SourceReadFailed),
            VerifyError::Read { role: EndpointRole::Target, source, .. } => server(source, Reason::TargetCommandFailed),
            VerifyError::Stream { source, .. } if classify::classify(source) == ErrorClass::ChangeStreamsUnsupported => {
                Reason::ChangeStreamsUnsupported
            }
            VerifyError::Stream { source, .. } => server(source, Reason::SourceStreamFailed),
            VerifyError::State(e) => server(e, Reason::VerificationStateUnusable),
            VerifyError::Cancelled => Reason::Cancelled,
        }
    }

    /// The process exit code: 3 invalid configuration, 6 stopped by a signal, 4 otherwise (an
    /// endpoint refused, cannot be reached, or failed a read).
    pub fn exit_code(&self) -> u8 {
        match self {
            VerifyError::Namespace(_) | VerifyError::Auth(_) | VerifyError::Client { .. } => 3,
            VerifyError::Cancelled => 6,
            _ => 4,
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            VerifyError::Read { source, .. } | VerifyError::State(source) => is_transient(source),
            _ => false,
        }
    }
}

/// How a pass ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// The target equals the source (up to `verifiedTo`).
    Equal,
    /// Mismatches persisted past the lag allowance.
    Mismatched,
    /// Documents kept changing: the live phase's limits passed with mismatches undecided.
    NotConverged,
}

impl Outcome {
    /// 0 equal, 1 mismatches, 5 no verdict.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Equal => 0,
            Outcome::Mismatched => 1,
            Outcome::NotConverged => 5,
        }
    }
}

/// One reported mismatch: where and what, never the document's contents.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MismatchReport {
    pub ns: String,
    pub target_ns: String,
    pub kind: MismatchKind,
    /// The document's `_id` as canonical extended JSON (cut when huge), for document kinds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The index name, for index kinds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<String>,
    /// RFC 3339.
    pub first_seen: String,
}

/// The verdict of a pass.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    pub outcome: Outcome,
    pub equal: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    pub message: String,
    pub namespaces: usize,
    pub partitions: usize,
    /// Partitions compared by an earlier, interrupted run of this pass.
    pub partitions_skipped: usize,
    pub documents_compared: u64,
    pub generation: u32,
    /// Every change made before this time (RFC 3339) was verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified_to: Option<String>,
    /// Mismatches by kind.
    pub counts: BTreeMap<MismatchKind, usize>,
    /// Mismatches undecided when the limits passed (documents still changing).
    pub unsettled: usize,
    /// The first [`LISTED_MISMATCHES`] mismatches.
    pub mismatches: Vec<MismatchReport>,
}

impl Verdict {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| r#"{"equal":false,"message":"cannot encode the verdict"}"#.into())
    }

    /// The verdict as JSON in at most `limit` bytes (a termination message): mismatches are
    /// dropped from the list until it fits; the counts stay.
    pub fn termination_message(&self, limit: usize) -> String {
        let mut slim = self.clone();
        loop {
            let json = slim.to_json();
            if json.len() <= limit || slim.mismatches.is_empty() {
                return json;
            }
            let keep = slim.mismatches.len() / 2;
            slim.mismatches.truncate(keep);
        }
    }

    /// A report for a person at a terminal.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{} namespaces, {} partitions ({} from an earlier run), {} documents compared, {} generations\n",
            self.namespaces, self.partitions, self.partitions_skipped, self.documents_compared, self.generation
        );
        for m in &self.mismatches {
            let what = m.id.as_deref().or(m.index.as_deref()).unwrap_or("-");
            out.push_str(&format!("  {:<16} {} -> {}  {}  (first seen {})\n", m.kind.as_str(), m.ns, m.target_ns, what, m.first_seen));
        }
        out.push_str(&match self.outcome {
            Outcome::Equal => format!("verification passed: {}\n", self.message),
            _ => format!("verification FAILED: {}\n", self.message),
        });
        out
    }
}

/// Prints progress until `stop`: a live line on stderr when `terminal`, else a JSON line on
/// stdout every 5 s.
pub async fn print_progress(progress: Arc<Progress>, terminal: bool, stop: CancellationToken) {
    use std::io::Write;
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(if terminal { 1 } else { 5 }));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => {
                if terminal { eprintln!(); }
                return;
            }
        }
        let line = progress.line();
        let rate = line.documents_compared as f64 / started.elapsed().as_secs_f64().max(0.001);
        if terminal {
            eprint!(
                "\rverify: generation {}, {}/{} partitions, {} documents compared ({rate:.0}/s), {} mismatches, {} changes waiting   ",
                line.generation, line.partitions_done, line.partitions, line.documents_compared, line.mismatches, line.waiting_changes
            );
        } else {
            let json = serde_json::json!({"progress": line, "documentsPerSecond": rate.round()});
            let _ = writeln!(std::io::stdout().lock(), "{json}");
        }
    }
}

fn now_millis() -> Millis {
    DateTime::now().timestamp_millis()
}

fn rfc3339(at: Millis) -> String {
    DateTime::from_millis(at).try_to_rfc3339_string().unwrap_or_default()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Most source documents read per second, shared by every reader.
struct RateLimit {
    per_second: u64,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl RateLimit {
    /// Waits until `n` more documents may be read.
    async fn take(&self, n: u64) {
        if n == 0 || self.per_second == 0 {
            return;
        }
        let start = {
            let mut next = self.next.lock().await;
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + Duration::from_secs_f64(n as f64 / self.per_second as f64);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// An included source namespace, its target and their creation options.
#[derive(Clone, Debug)]
struct Pair {
    source: Namespace,
    target: Namespace,
    options: Document,
}

/// Everything a running pass shares.
struct Pass {
    source: Client,
    target: Client,
    map: NamespaceMap,
    options: VerifyOptions,
    store: VerificationStore,
    ledger: Mutex<Ledger>,
    rate: Option<RateLimit>,
    metrics: Arc<VerifyMetrics>,
    progress: Arc<Progress>,
    cancel: CancellationToken,
    /// The first failure of a change stream, which ends the pass.
    stream_failure: Mutex<Option<VerifyError>>,
}

/// Runs a verification pass (resuming a saved, unfinished one) to its verdict. Microsoft Entra
/// tokens come from `tokens`.
pub async fn run(
    config: &ReplicatorConfig,
    options: &VerifyOptions,
    tokens: &TokenSources,
    metrics: Arc<VerifyMetrics>,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<Verdict, VerifyError> {
    let map = NamespaceMap::new(config.namespaces.as_ref(), &config.checkpoint_database)?;
    let source = connect(config, EndpointRole::Source, tokens).await?;
    let target = connect(config, EndpointRole::Target, tokens).await?;
    wait_reachable(&source, EndpointRole::Source, &cancel).await?;
    wait_reachable(&target, EndpointRole::Target, &cancel).await?;
    let store = VerificationStore::new(&target.database(&config.checkpoint_database), &config.name);
    let rate = options.max_docs_per_second.map(|per_second| RateLimit { per_second, next: tokio::sync::Mutex::new(tokio::time::Instant::now()) });
    let pass = Arc::new(Pass {
        source,
        target,
        map,
        options: options.clone(),
        store,
        ledger: Mutex::new(Ledger::default()),
        rate,
        metrics,
        progress,
        cancel: cancel.child_token(),
        stream_failure: Mutex::new(None),
    });
    let result = pass.clone().run(config).await;
    pass.cancel.cancel();
    result
}

async fn connect(config: &ReplicatorConfig, role: EndpointRole, tokens: &TokenSources) -> Result<Client, VerifyError> {
    let options = config.endpoint(role).client_options(role, tokens).await?;
    Client::with_options(options).map_err(|e| VerifyError::Client { role, detail: e.to_string() })
}

async fn wait_reachable(client: &Client, role: EndpointRole, cancel: &CancellationToken) -> Result<(), VerifyError> {
    let ping = || async { client.database("admin").run_command(doc! {"ping": 1}).await.map(drop) };
    let decide = |err: &mongodb::error::Error| Decision::retry_if(!is_refusal(err) && is_transient(err));
    let on_retry = |err: &mongodb::error::Error, wait: Duration, _| tracing::warn!(%role, error = %describe(err), retry_in = ?wait, "endpoint not reachable yet");
    retry(&CONNECT_RETRY, cancel, ping, decide, on_retry).await.map_err(|failure| match failure {
        Failure::Cancelled { .. } => VerifyError::Cancelled,
        other => {
            let err = other.into_error();
            let reason = oidc::token_error(&err).map(|t| t.reason()).unwrap_or_else(|| classify::reason(&err));
            VerifyError::Endpoint { role, reason, detail: describe(&err) }
        }
    })
}

/// Retries a read while its failure is transient.
async fn with_retry<T, F, Fut>(cancel: &CancellationToken, what: &str, op: F) -> Result<T, VerifyError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, VerifyError>>,
{
    let on_retry = |err: &VerifyError, wait: Duration, _| tracing::warn!(error = %err, retry_in = ?wait, "{what}: transient failure; retrying");
    match retry(&READ_RETRY, cancel, op, |e: &VerifyError| Decision::retry_if(e.is_transient()), on_retry).await {
        Ok(v) => Ok(v),
        Err(Failure::Cancelled { .. }) => Err(VerifyError::Cancelled),
        Err(failure) => Err(failure.into_error()),
    }
}

impl Pass {
    async fn run(self: Arc<Self>, config: &ReplicatorConfig) -> Result<Verdict, VerifyError> {
        let pairs = self.included().await?;
        let settings = self.options.settings(config);
        let saved = self.store.load_pass().await.map_err(VerifyError::State)?;
        let resumable = saved.filter(|p| !p.finished && !self.options.restart && p.settings == settings);
        let (mut record, streams) = match resumable {
            Some(record) => match self.open_streams(&pairs, record.source_token.clone(), record.target_token.clone()).await {
                Ok(streams) => {
                    tracing::info!(generation = record.generation, "resuming the saved verification pass");
                    (record, streams)
                }
                Err(VerifyError::Stream { source, .. }) if classify::classify(&source) == ErrorClass::HistoryLost => {
                    tracing::warn!("the saved pass's change history is gone; starting a new pass");
                    self.new_pass(&pairs, settings).await?
                }
                Err(e) => return Err(e),
            },
            None => self.new_pass(&pairs, settings).await?,
        };
        let saved_mismatches = self.store.mismatches().await.map_err(VerifyError::State)?;
        {
            let mut ledger = lock(&self.ledger);
            for entry in saved_mismatches {
                ledger.entries.insert(live::DocKey::new(&entry.ns, &entry.id), entry);
            }
        }
        self.spawn_watchers(streams, &pairs);
        tracing::info!(namespaces = pairs.len(), "verify: change streams open");

        let (planned, skipped) = self.scan(&pairs, &mut record).await?;
        let scan_end = record.scan_end.unwrap_or_else(now_millis);
        let allowance = self.options.lag_allowance.as_millis() as Millis;
        let limits = Limits {
            allowance,
            max_generations: self.options.max_generations,
            deadline: scan_end.max(now_millis()) + self.options.max_live.as_millis() as Millis,
        };
        tracing::info!("verify: scan finished");
        let mut generation = record.generation;
        let mut ran_at = now_millis();
        let step = loop {
            self.check_streams()?;
            self.publish();
            // The guard must not live through the match: a generation locks the ledger.
            let step = next_step(&lock(&self.ledger), generation, ran_at, scan_end, limits);
            match step {
                Step::RecheckAt(at) => {
                    let wait = Duration::from_millis((at - now_millis()).max(0) as u64);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.cancel.cancelled() => return Err(VerifyError::Cancelled),
                    }
                    generation += 1;
                    self.progress.generation.store(generation, Ordering::Relaxed);
                    self.metrics.set_generation(generation);
                    ran_at = now_millis();
                    self.generation(ran_at, allowance).await?;
                    record.generation = generation;
                    self.store.save_pass(&record).await.map_err(VerifyError::State)?;
                }
                other => {
                    tracing::info!(generation, step = ?other, "verify: live phase finished");
                    break other;
                }
            }
        };
        self.metrics.set_generation(generation);
        self.progress.generation.store(generation, Ordering::Relaxed);
        let verdict = self.verdict(&pairs, step, generation, planned, skipped).await?;
        record.finished = true;
        self.store.save_pass(&record).await.map_err(VerifyError::State)?;
        Ok(verdict)
    }

    /// The included source collections and their targets (views and system collections left out).
    async fn included(&self) -> Result<Vec<Pair>, VerifyError> {
        let read = |what: String| move |source| VerifyError::Read { role: EndpointRole::Source, what: what.clone(), source };
        let mut out = Vec::new();
        let dbs = self.source.list_database_names().await.map_err(read("the list of databases".into()))?;
        for db in dbs.into_iter().filter(|db| self.map.may_include_database(db)) {
            let what = format!("the collections of {db}");
            let specs: Vec<Document> = self
                .source
                .database(&db)
                .run_cursor_command(doc! {"listCollections": 1, "filter": {"type": "collection"}})
                .await
                .map_err(read(what.clone()))?
                .try_collect()
                .await
                .map_err(read(what))?;
            for spec in specs {
                let Ok(name) = spec.get_str("name") else { continue };
                let ns = Namespace::new(db.clone(), name);
                if self.map.includes(&ns) {
                    let target = self.map.target(&ns);
                    out.push(Pair { source: ns, target, options: spec.get_document("options").cloned().unwrap_or_default() });
                }
            }
        }
        out.sort_by(|a, b| a.source.cmp(&b.source));
        Ok(out)
    }

    /// Starts a new pass: change streams first (so no change made during the scan is missed),
    /// then the saved record.
    async fn new_pass(&self, pairs: &[Pair], settings: Document) -> Result<(PassRecord, Streams), VerifyError> {
        self.store.reset().await.map_err(VerifyError::State)?;
        let streams = self.open_streams(pairs, None, None).await?;
        let record = PassRecord {
            started_at: now_millis(),
            source_token: streams.source_token.clone(),
            target_token: streams.target_token.clone(),
            scan_end: None,
            generation: 0,
            finished: false,
            settings,
        };
        self.store.save_pass(&record).await.map_err(VerifyError::State)?;
        Ok((record, streams))
    }

    async fn open_streams(
        &self,
        pairs: &[Pair],
        source_token: Option<ResumeToken>,
        target_token: Option<ResumeToken>,
    ) -> Result<Streams, VerifyError> {
        let target_dbs: std::collections::BTreeSet<&str> = pairs.iter().map(|p| p.target.db.as_str()).collect();
        let target_scope = match target_dbs.iter().next() {
            Some(db) if target_dbs.len() == 1 => StreamScope::Database(db.to_string()),
            _ => StreamScope::Cluster,
        };
        let (source, source_token, source_early) = open_stream(&self.source, EndpointRole::Source, &self.map.stream_scope(), source_token).await?;
        let (target, target_token, target_early) = open_stream(&self.target, EndpointRole::Target, &target_scope, target_token).await?;
        let streams = Streams { source, target, source_token, target_token };
        let reverse = reverse_map(pairs);
        let now = now_millis();
        let mut ledger = lock(&self.ledger);
        for event in source_early {
            record_event(&mut ledger, &self.map, None, &event, now);
        }
        for event in target_early {
            record_event(&mut ledger, &self.map, Some(&reverse), &event, now);
        }
        drop(ledger);
        Ok(streams)
    }

    fn spawn_watchers(self: &Arc<Self>, streams: Streams, pairs: &[Pair]) {
        let reverse = Arc::new(reverse_map(pairs));
        for (role, stream) in [(EndpointRole::Source, streams.source), (EndpointRole::Target, streams.target)] {
            let pass = self.clone();
            let reverse = (role == EndpointRole::Target).then(|| reverse.clone());
            tokio::spawn(async move { pass.watch(role, stream, reverse).await });
        }
    }

    /// Records every change a stream reports until the pass ends.
    async fn watch(
        &self,
        role: EndpointRole,
        mut stream: ChangeStream<ChangeStreamEvent<Document>>,
        reverse: Option<Arc<HashMap<Namespace, Namespace>>>,
    ) {
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            match stream.next_if_any().await {
                Ok(Some(event)) => record_event(&mut lock(&self.ledger), &self.map, reverse.as_deref(), &event, now_millis()),
                Ok(None) => {
                    if !stream.is_alive() {
                        *lock(&self.stream_failure) = Some(VerifyError::Endpoint {
                            role,
                            reason: Reason::SourceStreamFailed,
                            detail: "the change stream was closed (a watched namespace was dropped or renamed?)".into(),
                        });
                        return;
                    }
                }
                Err(source) => {
                    lock(&self.stream_failure).get_or_insert(VerifyError::Stream { role, source });
                    return;
                }
            }
        }
    }

    fn check_streams(&self) -> Result<(), VerifyError> {
        match lock(&self.stream_failure).take() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Generation 0: compares every partition not yet done. Returns (partitions, skipped).
    async fn scan(self: &Arc<Self>, pairs: &[Pair], record: &mut PassRecord) -> Result<(usize, usize), VerifyError> {
        let mut saved = self.store.partitions().await.map_err(VerifyError::State)?;
        let planned_namespaces: std::collections::HashSet<String> = saved.iter().map(|p| p.partition.ns.clone()).collect();
        for pair in pairs.iter().filter(|p| !planned_namespaces.contains(&p.source.to_string())) {
            for partition in self.plan(pair).await? {
                let record = PartitionRecord { partition, done: false, source_docs: 0, target_docs: 0 };
                self.store.save_partition(&record).await.map_err(VerifyError::State)?;
                saved.push(record);
            }
        }
        let known: HashMap<String, &Pair> = pairs.iter().map(|p| (p.source.to_string(), p)).collect();
        saved.retain(|p| known.contains_key(&p.partition.ns));
        let skipped = saved.iter().filter(|p| p.done).count();
        let total = saved.len();
        self.progress.partitions.store(total as u64, Ordering::Relaxed);
        self.progress.partitions_done.store(skipped as u64, Ordering::Relaxed);
        self.metrics.set_partitions_done(skipped);
        if record.scan_end.is_some() {
            return Ok((total, skipped));
        }
        tracing::info!(partitions = total, skipped, "verify: comparing");
        let todo: Vec<(Pair, PartitionRecord)> = saved.into_iter().filter(|p| !p.done).map(|p| ((*known[&p.partition.ns]).clone(), p)).collect();
        let mut results = futures::stream::iter(todo)
            .map(|(pair, partition)| {
                let pass = self.clone();
                async move { pass.compare_partition(&pair, partition).await }
            })
            .buffer_unordered(self.options.workers.max(1));
        while let Some(result) = results.next().await {
            result?;
            self.check_streams()?;
            let done = self.progress.partitions_done.fetch_add(1, Ordering::Relaxed) + 1;
            self.metrics.set_partitions_done(done as usize);
        }
        record.scan_end = Some(now_millis());
        self.store.save_pass(record).await.map_err(VerifyError::State)?;
        Ok((total, skipped))
    }

    /// Splits a collection at `_id`s found at even steps of its `_id` order.
    async fn plan(&self, pair: &Pair) -> Result<Vec<Partition>, VerifyError> {
        let ns = pair.source.to_string();
        let coll = self.source.database(&pair.source.db).collection::<Document>(&pair.source.coll);
        let read = |source| VerifyError::Read { role: EndpointRole::Source, what: ns.clone(), source };
        let count = coll.estimated_document_count().await.map_err(read)?;
        let parts = partition_count(count, self.options.partition_documents, self.options.workers as u64 * 4);
        if parts <= 1 {
            return Ok(partitions(&ns, None, None, Vec::new()));
        }
        let edge = |sort: Document, skip: u64| {
            let coll = coll.clone();
            async move {
                let found = coll.find_one(doc! {}).sort(sort).skip(skip).projection(doc! {"_id": 1}).await?;
                Ok::<_, mongodb::error::Error>(found.and_then(|d| d.get("_id").cloned()))
            }
        };
        let first = edge(doc! {"_id": 1}, 0).await.map_err(read)?;
        let last = edge(doc! {"_id": -1}, 0).await.map_err(read)?;
        let mut samples = Vec::new();
        let step = count / parts;
        for i in 1..parts {
            if let Some(id) = edge(doc! {"_id": 1}, i * step).await.map_err(read)? {
                samples.push(id);
            }
        }
        Ok(partitions(&ns, first.as_ref(), last.as_ref(), samples))
    }

    async fn compare_partition(&self, pair: &Pair, mut record: PartitionRecord) -> Result<(), VerifyError> {
        let attempt = || async { self.compare_partition_once(pair, &record.partition).await };
        let (source_docs, target_docs) =
            with_retry(&self.cancel, &format!("partition {} of {}", record.partition.index, pair.source), attempt).await?;
        record.done = true;
        record.source_docs = source_docs;
        record.target_docs = target_docs;
        self.store.save_partition(&record).await.map_err(VerifyError::State)
    }

    /// The merge join of one range; mismatches go to the ledger and the store as found.
    async fn compare_partition_once(&self, pair: &Pair, partition: &Partition) -> Result<(u64, u64), VerifyError> {
        let batch = self.options.batch_size.max(1);
        let find = FindOptions::builder().sort(doc! {"_id": 1}).batch_size(batch as u32).build();
        let source_coll: Collection<RawDocumentBuf> = self.source.database(&pair.source.db).collection(&pair.source.coll);
        let target_coll: Collection<RawDocumentBuf> = self.target.database(&pair.target.db).collection(&pair.target.coll);
        let src_err = |source| VerifyError::Read { role: EndpointRole::Source, what: pair.source.to_string(), source };
        let dst_err = |source| VerifyError::Read { role: EndpointRole::Target, what: pair.target.to_string(), source };
        let mut source = source_coll.find(partition.filter()).with_options(find.clone()).await.map_err(src_err)?;
        let mut target = target_coll.find(partition.filter()).with_options(find).await.map_err(dst_err)?;
        let (mut s_buf, mut t_buf) = (Vec::new(), Vec::new());
        let (mut s_more, mut t_more) = (true, true);
        let (mut s_count, mut t_count) = (0u64, 0u64);
        let ns = pair.source.to_string();
        loop {
            if self.cancel.is_cancelled() {
                return Err(VerifyError::Cancelled);
            }
            let mut read = 0u64;
            let mut bytes: usize = s_buf.iter().map(|d: &RawDocumentBuf| d.as_bytes().len()).sum();
            while s_more && s_buf.len() < batch && bytes < BUFFER_BYTES {
                match source.try_next().await.map_err(src_err)? {
                    Some(doc) => {
                        bytes += doc.as_bytes().len();
                        s_buf.push(doc);
                        read += 1;
                    }
                    None => s_more = false,
                }
            }
            let mut bytes: usize = t_buf.iter().map(|d: &RawDocumentBuf| d.as_bytes().len()).sum();
            while t_more && t_buf.len() < batch && bytes < BUFFER_BYTES {
                match target.try_next().await.map_err(dst_err)? {
                    Some(doc) => {
                        bytes += doc.as_bytes().len();
                        t_buf.push(doc);
                        t_count += 1;
                    }
                    None => t_more = false,
                }
            }
            s_count += read;
            if let Some(rate) = &self.rate {
                rate.take(read).await;
            }
            self.metrics.compared(read);
            self.progress.compared.fetch_add(read, Ordering::Relaxed);
            let merged = merge(&mut s_buf, &mut t_buf, s_more, t_more, self.options.comparison);
            if !merged.mismatches.is_empty() {
                let now = now_millis();
                for m in &merged.mismatches {
                    tracing::debug!(%ns, id = %id_text(&m.id), kind = m.kind.as_str(), "verify: scan mismatch");
                }
                let entries: Vec<live::Entry> = {
                    let mut ledger = lock(&self.ledger);
                    merged
                        .mismatches
                        .iter()
                        .filter_map(|m| {
                            ledger.found(&ns, &m.id, m.kind, now);
                            ledger.entries.get(&live::DocKey::new(&ns, &m.id)).cloned()
                        })
                        .collect()
                };
                for entry in &entries {
                    self.store.save_mismatch(entry).await.map_err(VerifyError::State)?;
                }
            }
            if !s_more && !t_more && s_buf.is_empty() && t_buf.is_empty() {
                return Ok((s_count, t_count));
            }
        }
    }

    /// One recheck generation: every document due now is looked up on both sides.
    async fn generation(&self, now: Millis, allowance: Millis) -> Result<(), VerifyError> {
        let due = lock(&self.ledger).due(now, allowance);
        if due.docs.is_empty() {
            return Ok(());
        }
        tracing::debug!(documents = due.docs.len(), "verify: rechecking");
        let mut mismatched = Vec::new();
        let mut by_ns: BTreeMap<&str, Vec<&Bson>> = BTreeMap::new();
        for (ns, id) in &due.docs {
            by_ns.entry(ns.as_str()).or_default().push(id);
        }
        for (ns, ids) in by_ns {
            let source = Namespace::parse(ns)?;
            let target = self.map.target(&source);
            for chunk in ids.chunks(RECHECK_CHUNK) {
                let attempt = || async { self.recheck(&source, &target, chunk).await };
                for (id, kind) in with_retry(&self.cancel, &format!("recheck of {ns}"), attempt).await? {
                    mismatched.push((ns.to_string(), id, kind));
                }
            }
        }
        // Only mismatches that appeared, changed or went away are written to the store.
        let writes: Vec<(usize, Option<live::Entry>)> = {
            let mut ledger = lock(&self.ledger);
            let keys: Vec<live::DocKey> = due.docs.iter().map(|(ns, id)| live::DocKey::new(ns, id)).collect();
            let before: Vec<Option<live::Entry>> = keys.iter().map(|k| ledger.entries.get(k).cloned()).collect();
            ledger.rechecked(&due.docs, &mismatched, now, allowance);
            keys.iter()
                .zip(before)
                .enumerate()
                .filter_map(|(i, (key, before))| {
                    let after = ledger.entries.get(key).cloned();
                    (after != before).then_some((i, after))
                })
                .collect()
        };
        for (i, entry) in writes {
            match entry {
                Some(entry) => self.store.save_mismatch(&entry).await.map_err(VerifyError::State)?,
                None => self.store.forget_mismatch(&due.docs[i].0, &due.docs[i].1).await.map_err(VerifyError::State)?,
            }
        }
        Ok(())
    }

    /// Looks `ids` up on both sides; returns the checked `_id`s that differ, with their kind.
    async fn recheck(&self, source: &Namespace, target: &Namespace, ids: &[&Bson]) -> Result<Vec<(Bson, MismatchKind)>, VerifyError> {
        let filter = doc! {"_id": {"$in": ids.iter().map(|id| (*id).clone()).collect::<Vec<Bson>>()}};
        let src: Collection<RawDocumentBuf> = self.source.database(&source.db).collection(&source.coll);
        let dst: Collection<RawDocumentBuf> = self.target.database(&target.db).collection(&target.coll);
        let src_err = |e| VerifyError::Read { role: EndpointRole::Source, what: source.to_string(), source: e };
        let dst_err = |e| VerifyError::Read { role: EndpointRole::Target, what: target.to_string(), source: e };
        let mut s: Vec<RawDocumentBuf> = src.find(filter.clone()).await.map_err(src_err)?.try_collect().await.map_err(src_err)?;
        let mut t: Vec<RawDocumentBuf> = dst.find(filter).await.map_err(dst_err)?.try_collect().await.map_err(dst_err)?;
        if let Some(rate) = &self.rate {
            rate.take(s.len() as u64).await;
        }
        self.metrics.compared(s.len() as u64);
        self.progress.compared.fetch_add(s.len() as u64, Ordering::Relaxed);
        s.sort_by(|a, b| compare_values(&raw_id(a), &raw_id(b)));
        t.sort_by(|a, b| compare_values(&raw_id(a), &raw_id(b)));
        let merged = merge(&mut s, &mut t, false, false, self.options.comparison);
        // A mismatch is reported under the `_id` that was asked for (a target's Int32 `_id`
        // pairs with the source's Int64 one).
        let mut out = Vec::new();
        for id in ids {
            if let Some(m) = merged.mismatches.iter().find(|m| compare_values(&m.id, id) == std::cmp::Ordering::Equal) {
                out.push(((*id).clone(), m.kind));
            }
        }
        Ok(out)
    }

    fn publish(&self) {
        let ledger = lock(&self.ledger);
        let mut counts: BTreeMap<MismatchKind, usize> = BTreeMap::new();
        for entry in ledger.entries.values() {
            *counts.entry(entry.kind).or_default() += 1;
        }
        for kind in [MismatchKind::MissingInTarget, MismatchKind::ExtraInTarget, MismatchKind::Different] {
            self.metrics.set_mismatches(kind, counts.get(&kind).copied().unwrap_or_default());
        }
        self.progress.mismatches.store(ledger.entries.len() as u64, Ordering::Relaxed);
        self.progress.waiting_changes.store(ledger.changes.len() as u64, Ordering::Relaxed);
    }

    /// Indexes, options and counts, then the verdict.
    async fn verdict(&self, pairs: &[Pair], step: Step, generation: u32, partitions: usize, skipped: usize) -> Result<Verdict, VerifyError> {
        let now = now_millis();
        let targets: HashMap<String, String> = pairs.iter().map(|p| (p.source.to_string(), p.target.to_string())).collect();
        let mut reports: Vec<MismatchReport> = Vec::new();
        let (unsettled, changed_namespaces) = {
            let ledger = lock(&self.ledger);
            let mut entries: Vec<&live::Entry> = ledger.entries.values().collect();
            entries.sort_by(|a, b| (&a.ns, a.first_seen).cmp(&(&b.ns, b.first_seen)).then_with(|| compare_values(&a.id, &b.id)));
            for entry in entries.into_iter().filter(|e| e.settled) {
                reports.push(MismatchReport {
                    ns: entry.ns.clone(),
                    target_ns: targets.get(&entry.ns).cloned().unwrap_or_default(),
                    kind: entry.kind,
                    id: Some(id_text(&entry.id)),
                    index: None,
                    first_seen: rfc3339(entry.first_seen),
                });
            }
            (ledger.unsettled(), ledger.changed_namespaces.clone())
        };
        for pair in pairs {
            let (ns, target_ns) = (pair.source.to_string(), pair.target.to_string());
            let report = |kind, index: Option<String>| MismatchReport {
                ns: ns.clone(),
                target_ns: target_ns.clone(),
                kind,
                id: None,
                index,
                first_seen: rfc3339(now),
            };
            let src_err = |e| VerifyError::Read { role: EndpointRole::Source, what: format!("the indexes of {ns}"), source: e };
            let dst_err = |e| VerifyError::Read { role: EndpointRole::Target, what: format!("the indexes of {target_ns}"), source: e };
            let source_indexes = Sink::list_indexes(&self.source, &pair.source).await.map_err(src_err)?;
            let target_options = self.target_options(&pair.target).await?;
            let target_indexes = match target_options {
                Some(_) => Sink::list_indexes(&self.target, &pair.target).await.map_err(dst_err)?,
                None => Vec::new(),
            };
            for (name, kind) in compare::compare_indexes(&source_indexes, &target_indexes) {
                reports.push(report(kind, Some(name)));
            }
            match &target_options {
                Some(options) if compare::same_options(&pair.options, options) => {}
                _ => reports.push(report(MismatchKind::OptionsDifferent, None)),
            }
            // Counts are only comparable for a namespace nobody wrote during the pass.
            if !changed_namespaces.contains(&ns) {
                let src: Collection<Document> = self.source.database(&pair.source.db).collection(&pair.source.coll);
                let dst: Collection<Document> = self.target.database(&pair.target.db).collection(&pair.target.coll);
                let s =
                    src.count_documents(doc! {}).await.map_err(|e| VerifyError::Read { role: EndpointRole::Source, what: ns.clone(), source: e })?;
                let t = dst.count_documents(doc! {}).await.map_err(|e| VerifyError::Read {
                    role: EndpointRole::Target,
                    what: target_ns.clone(),
                    source: e,
                })?;
                if s != t {
                    reports.push(report(MismatchKind::CountDifferent, None));
                }
            }
        }
        let mut counts: BTreeMap<MismatchKind, usize> = BTreeMap::new();
        for r in &reports {
            *counts.entry(r.kind).or_default() += 1;
        }
        for kind in MismatchKind::ALL {
            self.metrics.set_mismatches(kind, counts.get(&kind).copied().unwrap_or_default());
        }
        let total: usize = reports.len();
        let (outcome, verified_to) = match step {
            Step::GiveUp => (Outcome::NotConverged, None),
            Step::Finish { verified_to } if total == 0 => (Outcome::Equal, Some(verified_to)),
            Step::Finish { verified_to } => (Outcome::Mismatched, Some(verified_to)),
            Step::RecheckAt(_) => unreachable!("the loop only ends on Finish or GiveUp"),
        };
        let outcome = if outcome == Outcome::NotConverged && total > 0 { Outcome::Mismatched } else { outcome };
        let summary: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {}", k.as_str())).collect();
        let message = match outcome {
            Outcome::Equal => format!("the target equals the source ({} documents compared)", self.progress.compared.load(Ordering::Relaxed)),
            Outcome::Mismatched => format!("{total} mismatches: {}", summary.join(", ")),
            Outcome::NotConverged => format!("{unsettled} documents kept changing until the live phase's limits; no verdict for them"),
        };
        reports.truncate(LISTED_MISMATCHES);
        Ok(Verdict {
            outcome,
            equal: outcome == Outcome::Equal,
            reason: match outcome {
                Outcome::Equal => None,
                Outcome::Mismatched => Some(Reason::TargetDiffers),
                Outcome::NotConverged => Some(Reason::VerificationNotConverged),
            },
            message,
            namespaces: pairs.len(),
            partitions,
            partitions_skipped: skipped,
            documents_compared: self.progress.compared.load(Ordering::Relaxed),
            generation,
            verified_to: verified_to.map(rfc3339),
            counts,
            unsettled,
            mismatches: reports,
        })
    }

    /// A target collection's creation options; `None` when it does not exist.
    async fn target_options(&self, ns: &Namespace) -> Result<Option<Document>, VerifyError> {
        let err = |e| VerifyError::Read { role: EndpointRole::Target, what: format!("the collections of {}", ns.db), source: e };
        let specs: Vec<Document> = self
            .target
            .database(&ns.db)
            .run_cursor_command(doc! {"listCollections": 1, "filter": {"name": &ns.coll}})
            .await
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)?;
        Ok(specs.first().map(|s| s.get_document("options").cloned().unwrap_or_default()))
    }
}

/// The two change streams of a pass and the tokens they start from.
struct Streams {
    source: ChangeStream<ChangeStreamEvent<Document>>,
    target: ChangeStream<ChangeStreamEvent<Document>>,
    source_token: Option<ResumeToken>,
    target_token: Option<ResumeToken>,
}

/// getMores (100 ms each at most) to wait for a new stream's first resume token.
const START_TOKEN_POLLS: usize = 50;

/// Opens a change stream (after `token` when resuming) and returns it with its start token and
/// the events read while waiting for that token.
async fn open_stream(
    client: &Client,
    role: EndpointRole,
    scope: &StreamScope,
    token: Option<ResumeToken>,
) -> Result<(ChangeStream<ChangeStreamEvent<Document>>, Option<ResumeToken>, Vec<ChangeStreamEvent<Document>>), VerifyError> {
    let options = ChangeStreamOptions::builder().max_await_time(Some(Duration::from_millis(100))).resume_after(token.clone()).build();
    let opened = match scope {
        StreamScope::Cluster => client.watch().with_options(options).await,
        StreamScope::Database(db) => client.database(db).watch().with_options(options).await,
        StreamScope::Collection(ns) => client.database(&ns.db).collection::<Document>(&ns.coll).watch().with_options(options).await,
    };
    let mut stream = opened.map_err(|source| VerifyError::Stream { role, source })?;
    let mut early = Vec::new();
    if token.is_some() {
        return Ok((stream, token, early));
    }
    for _ in 0..START_TOKEN_POLLS {
        if let Some(token) = stream.resume_token() {
            return Ok((stream, Some(token), early));
        }
        if let Some(event) = stream.next_if_any().await.map_err(|source| VerifyError::Stream { role, source })? {
            early.push(event);
        }
    }
    let token = stream.resume_token();
    Ok((stream, token, early))
}

fn reverse_map(pairs: &[Pair]) -> HashMap<Namespace, Namespace> {
    pairs.iter().map(|p| (p.target.clone(), p.source.clone())).collect()
}

/// Notes a change event in the ledger under its source namespace; `reverse` maps a target
/// event's namespace back (events outside the verified namespaces are ignored).
fn record_event(
    ledger: &mut Ledger,
    map: &NamespaceMap,
    reverse: Option<&HashMap<Namespace, Namespace>>,
    event: &ChangeStreamEvent<Document>,
    at: Millis,
) {
    let Some(ns) = &event.ns else { return };
    let Some(coll) = &ns.coll else { return };
    let seen = Namespace::new(ns.db.clone(), coll.clone());
    let source = match reverse {
        Some(reverse) => match reverse.get(&seen) {
            Some(source) => source.clone(),
            None => return,
        },
        None if map.includes(&seen) => seen,
        None => return,
    };
    let source = source.to_string();
    match (&event.operation_type, event.document_key.as_ref().and_then(|k| k.get("_id"))) {
        (OperationType::Insert | OperationType::Update | OperationType::Replace | OperationType::Delete, Some(id)) => ledger.changed(&source, id, at),
        // DDL: counts of this namespace are no longer comparable.
        _ => {
            ledger.changed_namespaces.insert(source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(n: usize) -> Verdict {
        let m = MismatchReport {
            ns: "db.c".into(),
            target_ns: "db2.c".into(),
            kind: MismatchKind::Different,
            id: Some(id_text(&Bson::Int64(1))),
            index: None,
            first_seen: rfc3339(0),
        };
        Verdict {
            outcome: Outcome::Mismatched,
            equal: false,
            reason: Some(Reason::TargetDiffers),
            message: format!("{n} mismatches"),
            namespaces: 1,
            partitions: 1,
            partitions_skipped: 0,
            documents_compared: 10,
            generation: 2,
            verified_to: Some(rfc3339(0)),
            counts: BTreeMap::from([(MismatchKind::Different, n)]),
            unsettled: 0,
            mismatches: vec![m; n],
        }
    }

    #[test]
    fn the_termination_message_fits_and_keeps_the_counts() {
        let v = verdict(500);
        let message = v.termination_message(4096);
        assert!(message.len() <= 4096, "{}", message.len());
        let parsed: serde_json::Value = serde_json::from_str(&message).unwrap();
        assert_eq!(parsed["counts"]["Different"], 500);
        assert_eq!(parsed["outcome"], "Mismatched");
        assert!(!parsed["mismatches"].as_array().unwrap().is_empty());
    }

    #[test]
    fn outcomes_have_distinct_exit_codes() {
        assert_eq!((Outcome::Equal.exit_code(), Outcome::Mismatched.exit_code(), Outcome::NotConverged.exit_code()), (0, 1, 5));
        assert_eq!(VerifyError::Cancelled.exit_code(), 6);
    }

    #[test]
    fn the_text_report_names_kind_namespace_and_id() {
        let text = verdict(1).to_text();
        assert!(text.contains("Different") && text.contains("db.c -> db2.c") && text.contains("$numberLong"), "{text}");
        assert!(text.contains("verification FAILED"), "{text}");
    }
}
