//! `mongo-replicator validate`: proves, before any data moves, that each endpoint can be reached
//! and logged in to with the configured credentials and has the privileges replication needs.
//!
//! Per endpoint: obtain a Microsoft Entra token (`auth: entra`), connect and authenticate, ping;
//! on the source list collections and open a change stream at the replication's scope (which
//! also shows that change streams are supported); on the target write and delete a probe in the
//! checkpoint database. The verdict is a readable report or JSON, and — because the operator
//! runs this in a Job and reads the Job's termination message — also goes, at most 4096 bytes,
//! to the termination-log file when it exists.

use std::time::{Duration, Instant};

use mongodb::bson::{Document, doc};
use mongodb::options::ChangeStreamOptions;
use mongodb::{Client, Database};
use serde::Serialize;

use crate::auth::oidc::{self, TokenError, TokenSources};
use crate::auth::{AuthError, AuthMethod, ConnectionString, EndpointConfig, EndpointRole, Login, entra_identity};
use crate::reason::Reason;
use crate::replicator::config::ReplicatorConfig;
use crate::replicator::namespace::{NamespaceMap, SYSTEM_DATABASES, StreamScope};
use crate::replicator::{classify, history};

/// Where Kubernetes reads a container's termination message from, by default.
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// Kubernetes reads at most this much of a termination message.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;
/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);
/// Collection in the checkpoint database the target probe writes to.
const PROBE_COLLECTION: &str = "validate_probe";

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub millis: u64,
    /// Stable reason when it failed, e.g. `FederatedCredentialSubjectMismatch`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// What was found, or what went wrong and what to do about it. Never holds a secret.
    pub message: String,
    /// Passed, but with something the user should know (e.g. the history guard is off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warning: bool,
}

/// The checks of one endpoint.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointReport {
    pub role: String,
    pub auth: AuthMethod,
    pub checks: Vec<Check>,
}

impl EndpointReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }
}

/// The whole verdict.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    pub passed: bool,
    /// Reason of the first failed check, for a condition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Message of the first failed check, prefixed with its endpoint, or a summary.
    pub message: String,
    pub endpoints: Vec<EndpointReport>,
}

impl Verdict {
    pub fn new(endpoints: Vec<EndpointReport>) -> Self {
        let failed = endpoints.iter().find_map(|e| e.checks.iter().find(|c| !c.passed).map(|c| (e.role.clone(), c.clone())));
        match failed {
            Some((role, check)) => {
                Verdict { passed: false, reason: check.reason, message: format!("{role}: {}: {}", check.name, check.message), endpoints }
            }
            None => Verdict { passed: true, reason: None, message: "every check passed".into(), endpoints },
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| r#"{"passed":false,"message":"cannot encode the verdict"}"#.into())
    }

    /// The verdict as JSON in at most `limit` bytes: passing checks lose their messages first,
    /// then every message is shortened, then only the summary is left.
    pub fn termination_message(&self, limit: usize) -> String {
        let full = self.to_json();
        if full.len() <= limit {
            return full;
        }
        let mut slim = self.clone();
        for endpoint in &mut slim.endpoints {
            for check in endpoint.checks.iter_mut().filter(|c| c.passed) {
                check.message.clear();
            }
        }
        for max in [400, 200, 80] {
            slim.message = truncate(&self.message, max * 2);
            for check in slim.endpoints.iter_mut().flat_map(|e| e.checks.iter_mut()) {
                check.message = truncate(&check.message, max);
            }
            let json = slim.to_json();
            if json.len() <= limit {
                return json;
            }
        }
        let summary = serde_json::json!({"passed": self.passed, "reason": self.reason, "message": truncate(&self.message, limit / 2)});
        summary.to_string()
    }

    /// A report for a person at a terminal.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for endpoint in &self.endpoints {
            out.push_str(&format!("{} ({}):\n", endpoint.role, endpoint.auth));
            for check in &endpoint.checks {
                let mark = match (check.passed, check.warning) {
                    (false, _) => "FAIL",
                    (true, true) => "warn",
                    (true, false) => "ok  ",
                };
                let reason = check.reason.map(|r| format!(" [{r}]")).unwrap_or_default();
                out.push_str(&format!("  {mark} {:<16} {:>6} ms  {}{reason}\n", check.name, check.millis, check.message));
            }
        }
        out.push_str(if self.passed { "\nvalidation passed\n" } else { "\nvalidation FAILED: " });
        if !self.passed {
            out.push_str(&self.message);
            out.push('\n');
        }
        out
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Why a check failed; the reasons are the replicator's for the same answer.
#[derive(Debug, thiserror::Error)]
pub enum CheckFailure {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("cannot create a client: {0}")]
    Client(String),
    /// A server's answer, classified by [`classify`] and scrubbed of the connection string.
    #[error("{message}")]
    Server { reason: Reason, message: String },
    #[error("no answer within {} s", .0.as_secs())]
    Timeout(Duration),
}

impl CheckFailure {
    pub fn reason(&self) -> Reason {
        match self {
            CheckFailure::Auth(e) => e.reason(),
            CheckFailure::Token(e) => e.reason(),
            CheckFailure::Client(_) => Reason::ClientOptionsInvalid,
            CheckFailure::Server { reason, .. } => *reason,
            CheckFailure::Timeout(_) => Reason::Timeout,
        }
    }

    /// A driver error, as the replicator would report it.
    fn server(err: &mongodb::error::Error, scrub: &impl Fn(String) -> String) -> Self {
        match oidc::token_error(err) {
            Some(token) => CheckFailure::Token(token.clone()),
            None => CheckFailure::Server { reason: classify::reason(err), message: scrub(classify::explain(err)) },
        }
    }
}

/// Times a check and turns its result into a [`Check`].
async fn timed<F>(name: &'static str, check: F) -> Check
where
    F: Future<Output = Result<String, CheckFailure>>,
{
    let started = Instant::now();
    let result = tokio::time::timeout(CHECK_TIMEOUT, check).await.unwrap_or(Err(CheckFailure::Timeout(CHECK_TIMEOUT)));
    let millis = started.elapsed().as_millis() as u64;
    match result {
        Ok(message) => Check { name, passed: true, millis, reason: None, message, warning: false },
        Err(failure) => Check { name, passed: false, millis, reason: Some(failure.reason()), message: failure.to_string(), warning: false },
    }
}

/// Runs every check of both endpoints, with Microsoft Entra tokens from `tokens`.
pub async fn validate(config: &ReplicatorConfig, tokens: &TokenSources) -> Verdict {
    let map = NamespaceMap::new(config.namespaces.as_ref(), &config.checkpoint_database).ok();
    let scope = map.as_ref().map(|m| m.stream_scope()).unwrap_or(StreamScope::Cluster);
    let source = validate_endpoint(&config.source, EndpointRole::Source, config, &scope, tokens).await;
    let target = validate_endpoint(&config.target, EndpointRole::Target, config, &scope, tokens).await;
    Verdict::new(vec![source, target])
}

async fn validate_endpoint(
    endpoint: &EndpointConfig,
    role: EndpointRole,
    config: &ReplicatorConfig,
    scope: &StreamScope,
    tokens: &TokenSources,
) -> EndpointReport {
    let mut report = EndpointReport { role: role.to_string(), auth: endpoint.login.method(), checks: Vec::new() };
    // What to scrub from driver messages: the connection string and its password.
    let secret = endpoint.secret(role);
    let scrub = |text: String| secret.as_ref().map_or(text.clone(), |s: &ConnectionString| s.scrub(&text));

    if let Login::Entra { identity, .. } = &endpoint.login {
        let check = timed("token", async {
            let identity = entra_identity(identity, role)?;
            let token = tokens.get(&identity)?.token(None, None).await?;
            Ok(format!(
                "Microsoft Entra token for client {} (scope {}), valid for {} s",
                identity.client_id,
                identity.scope,
                token.expires_at.saturating_duration_since(Instant::now()).as_secs()
            ))
        })
        .await;
        let failed = !check.passed;
        report.checks.push(check);
        if failed {
            return report;
        }
    }

    let mut client = None;
    let check = timed("login", async {
        let mut options = endpoint.client_options(role, tokens).await?;
        options.server_selection_timeout = Some(Duration::from_secs(10));
        options.connect_timeout = Some(Duration::from_secs(10));
        let c = Client::with_options(options).map_err(|e| CheckFailure::Client(scrub(e.to_string())))?;
        let server = |e: mongodb::error::Error| CheckFailure::server(&e, &scrub);
        let hello = c.database("admin").run_command(doc! {"hello": 1}).await.map_err(server)?;
        // `hello` needs no login; `ping` runs on an authenticated connection.
        c.database("admin").run_command(doc! {"ping": 1}).await.map_err(server)?;
        let version = match c.database("admin").run_command(doc! {"buildInfo": 1}).await {
            Ok(info) => info.get_str("version").unwrap_or("unknown").to_string(),
            Err(_) => "unknown".into(),
        };
        client = Some(c);
        let kind = if hello.contains_key("setName") {
            "replica set"
        } else if hello.get_str("msg") == Ok("isdbgrid") {
            "sharded cluster"
        } else {
            "server"
        };
        Ok(format!("logged in and pinged a {kind}, version {version}"))
    })
    .await;
    report.checks.push(check);
    let Some(client) = client else { return report };

    match role {
        EndpointRole::Source => {
            report.checks.push(timed("listCollections", list_collections(&client, scope, &scrub)).await);
            report.checks.push(timed("changeStream", open_change_stream(&client, scope, &scrub)).await);
            report.checks.push(history_guard(&client, &scrub).await);
        }
        EndpointRole::Target => {
            report.checks.push(timed("write", write_probe(&client.database(&config.checkpoint_database), &config.name, &scrub)).await);
        }
    }
    report
}

async fn list_collections(client: &Client, scope: &StreamScope, scrub: &impl Fn(String) -> String) -> Result<String, CheckFailure> {
    let server = |e: mongodb::error::Error| CheckFailure::server(&e, scrub);
    let databases: Vec<String> = match scope {
        StreamScope::Collection(ns) => vec![ns.db.clone()],
        StreamScope::Database(db) => vec![db.clone()],
        // As the replicator, which never reads them (a readWriteAnyDatabase user may not list `local`).
        StreamScope::Cluster => {
            client.list_database_names().await.map_err(server)?.into_iter().filter(|db| !SYSTEM_DATABASES.contains(&db.as_str())).collect()
        }
    };
    let mut count = 0;
    for db in &databases {
        count += client.database(db).list_collection_names().await.map_err(server)?.len();
    }
    Ok(format!("{count} collections in {} database(s)", databases.len()))
}

async fn open_change_stream(client: &Client, scope: &StreamScope, scrub: &impl Fn(String) -> String) -> Result<String, CheckFailure> {
    let options = ChangeStreamOptions::builder().max_await_time(Some(Duration::from_millis(100))).build();
    let (result, at) = match scope {
        StreamScope::Collection(ns) => (client.database(&ns.db).collection::<Document>(&ns.coll).watch().with_options(options).await, ns.to_string()),
        StreamScope::Database(db) => (client.database(db).watch().with_options(options).await, format!("database {db}")),
        StreamScope::Cluster => (client.watch().with_options(options).await, "the whole cluster".to_string()),
    };
    let stream = result.map_err(|e| match CheckFailure::server(&e, scrub) {
        CheckFailure::Server { reason: Reason::ChangeStreamsUnsupported, message } => CheckFailure::Server {
            reason: Reason::ChangeStreamsUnsupported,
            message: format!("the source does not support change streams at {at}: {message}"),
        },
        other => other,
    })?;
    let resumable = stream.resume_token().is_some();
    Ok(format!("opened a change stream on {at}{}", if resumable { " with a resume token" } else { "" }))
}

/// Whether the replicator can prove its stream skips no pruned history: it reads the source's
/// oldest retained change. Where it cannot, replication still works, guarded by the server alone:
/// a warning, not a failure.
async fn history_guard(client: &Client, scrub: &impl Fn(String) -> String) -> Check {
    let mut off = false;
    let mut check = timed("historyGuard", async {
        Ok(match history::read_floor(client).await {
            Ok(history::Floor { oldest: Some(oldest), read_at }) => {
                let window = read_at.map(|now| format!(", {} s of history", history::headroom_seconds(now, oldest))).unwrap_or_default();
                format!(
                    "read the oldest retained change in local.oplog.rs{window}: the replicator checks that its change stream skips nothing pruned"
                )
            }
            other => {
                off = true;
                let why = other.err().map_or_else(|| "it holds no entry".to_string(), |e| scrub(classify::describe(&e)));
                format!(
                    "cannot read local.oplog.rs ({why}): the history guard is off, and the replicator relies on the source to fail a \
                     change stream that falls off its history"
                )
            }
        })
    })
    .await;
    check.warning = off;
    check
}

async fn write_probe(db: &Database, name: &str, scrub: &impl Fn(String) -> String) -> Result<String, CheckFailure> {
    let server = |e: mongodb::error::Error| CheckFailure::server(&e, scrub);
    let probes = db.collection::<Document>(PROBE_COLLECTION);
    let id = format!("{name}:{}", rand::random::<u64>());
    probes.insert_one(doc! {"_id": &id, "at": mongodb::bson::DateTime::now()}).await.map_err(server)?;
    probes.delete_one(doc! {"_id": &id}).await.map_err(server)?;
    Ok(format!("wrote and deleted a document in {}.{PROBE_COLLECTION}", db.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &'static str, passed: bool, message: &str) -> Check {
        Check { name, passed, millis: 3, reason: (!passed).then_some(Reason::LoginFailed), message: message.into(), warning: false }
    }

    #[test]
    fn the_first_failure_names_the_verdict() {
        let verdict = Verdict::new(vec![
            EndpointReport {
                role: "source".into(),
                auth: AuthMethod::Entra,
                checks: vec![check("token", true, "ok"), check("login", false, "refused")],
            },
            EndpointReport { role: "target".into(), auth: AuthMethod::ConnectionString, checks: vec![check("login", false, "also refused")] },
        ]);
        assert!(!verdict.passed);
        assert_eq!(verdict.reason, Some(Reason::LoginFailed));
        assert_eq!(verdict.message, "source: login: refused");
        let text = verdict.to_text();
        assert!(text.contains("FAIL login") && text.contains("validation FAILED: source: login: refused"), "{text}");
    }

    #[test]
    fn the_termination_message_fits_in_4096_bytes_and_stays_json() {
        let long = "x".repeat(3000);
        let endpoints = (0..2)
            .map(|i| EndpointReport {
                role: format!("e{i}"),
                auth: AuthMethod::Entra,
                checks: vec![check("token", true, &long), check("login", false, &format!("é{long}"))],
            })
            .collect();
        let verdict = Verdict::new(endpoints);
        let message = verdict.termination_message(TERMINATION_MESSAGE_LIMIT);
        assert!(message.len() <= TERMINATION_MESSAGE_LIMIT, "{}", message.len());
        let parsed: serde_json::Value = serde_json::from_str(&message).unwrap();
        assert_eq!(parsed["passed"], false);
        assert_eq!(parsed["reason"], "LoginFailed");
        let tiny = verdict.termination_message(300);
        assert!(tiny.len() <= 300 && serde_json::from_str::<serde_json::Value>(&tiny).is_ok(), "{tiny}");
    }
}
