//! Command-line interface of the `mongo-replicator` binary.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::auth::oidc::{EntraMetrics, TokenSources};
use crate::auth::{ConnectionString, EndpointConfig, EntraSettings, Login, UriSource};
use crate::replicator::config::{self as config_file, ConfigError, Mode, NamespaceRules, OnHistoryLost, Rename, ReplicatorConfig, StartAt};
use crate::replicator::{self, Outcome};
use crate::telemetry::{self, Health, LogFormat, Metrics};

/// Kubernetes operator for MongoDB-to-MongoDB replication, with Microsoft Entra workload identity
/// for Azure DocumentDB (Azure Cosmos DB for MongoDB vCore).
#[derive(Parser, Debug)]
#[command(name = "mongo-replicator", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What to run.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the MongoReplication CustomResourceDefinition as YAML
    /// (apply it with `mongo-replicator crd | kubectl apply --server-side -f -`).
    Crd,
    /// Replicate: copy the source's data into the target, then follow the source's change
    /// stream. Resumes from the checkpoint kept in the target after any crash.
    ///
    /// Exit codes: 0 stopped by SIGTERM/SIGINT after draining (or a SnapshotOnly copy finished),
    /// 1 unexpected failure, 2 bad command line, 3 invalid configuration, 4 an endpoint refused
    /// for good (login, Microsoft Entra token, unsupported server, rejected write), 5 the
    /// source's change history no longer reaches the checkpoint, 6 the shutdown deadline passed
    /// before the drain finished.
    Replicate(Box<ReplicateArgs>),
    /// Prove that replication can start: per endpoint, obtain a Microsoft Entra token (auth:
    /// entra), log in and ping; on the source list collections and open a change stream at the
    /// replication's scope; on the target write and delete a probe in the checkpoint database.
    ///
    /// Prints a report on a terminal and a JSON verdict otherwise; the verdict (no secrets, at
    /// most 4096 bytes) also goes to the termination-log file when it exists, for the operator's
    /// validation Job. Exit codes: 0 every check passed, 1 a check failed, 3 invalid configuration.
    Validate(ValidateArgs),
    /// Prove the target equals the source: every included namespace against its (renamed)
    /// target namespace, document by document as raw BSON bytes (field order, numeric types
    /// and -0.0 matter; --ignore-field-order sorts keys first), plus indexes, collection
    /// options and counts. Runs while replication runs: documents changed during the pass are
    /// rechecked until each difference is older than --lag-allowance-seconds. Progress and
    /// mismatches are kept in the target's checkpoint database (collection `verification`), so
    /// a rerun resumes.
    ///
    /// Exit codes: 0 equal, 1 mismatches, 3 invalid configuration, 4 an endpoint failed
    /// (unreachable, login refused, a read or the progress save failed), 5 no verdict (documents
    /// kept changing past the live phase's limits), 6 stopped by SIGTERM/SIGINT (a rerun resumes).
    Verify(Box<VerifyArgs>),
    /// Run the operator: reconcile MongoReplications into Azure identity bindings (federated
    /// credentials, DocumentDB cluster users), validation Jobs and replicator Deployments, and
    /// keep their status true. Runs in a cluster (in-cluster configuration) or
    /// with KUBECONFIG. Exit codes: 0 stopped by SIGTERM/SIGINT, 1 lost the leader lease or
    /// failed, 3 invalid settings.
    Operator(Box<OperatorArgs>),
}

/// Arguments of `operator`; each also reads an environment variable (the Helm chart sets them).
#[derive(Args, Debug)]
pub struct OperatorArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "MREP_METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    pub metrics_address: SocketAddr,
    /// Namespaces to watch, comma-separated; empty: every namespace.
    #[arg(long, env = "MREP_WATCH_NAMESPACES", value_delimiter = ',', default_value = "")]
    pub watch_namespaces: Vec<String>,
    /// Image of replicator and validation pods, unless a MongoReplication names its own.
    #[arg(long, env = "MREP_REPLICATOR_IMAGE")]
    pub replicator_image: String,
    /// Pull policy of replicator and validation pods.
    #[arg(long, env = "MREP_REPLICATOR_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    pub replicator_image_pull_policy: String,
    /// Reconcile only while holding a coordination.k8s.io Lease (run two replicas for failover).
    #[arg(long, env = "MREP_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the Lease.
    #[arg(long, env = "MREP_LEASE_NAME", default_value = "mongo-replicator-operator")]
    pub lease_name: String,
    /// Namespace of the Lease: the operator's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease: its pod name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Reconciles running at once.
    #[arg(long, env = "MREP_CONCURRENCY", default_value_t = 8)]
    pub concurrency: u16,
    /// Seconds between two looks at a replication when nothing changes (watch events trigger
    /// reconciles at once).
    #[arg(long, env = "MREP_RESYNC_SECONDS", default_value_t = 300)]
    pub resync_seconds: u64,
    /// Seconds the replicator's writes to the target may keep failing before the replication
    /// is Stalled (CheckpointNotAdvancing).
    #[arg(long, env = "MREP_STALL_AFTER_SECONDS", default_value_t = 600)]
    pub stall_after_seconds: u64,
    /// Microsoft Entra authority for the operator and its replicator pods (sovereign clouds);
    /// default: the workload identity webhook's AZURE_AUTHORITY_HOST, else the public cloud.
    #[arg(long, env = "MREP_ENTRA_AUTHORITY_HOST")]
    pub entra_authority_host: Option<String>,
    /// Extra CA certificates (PEM file) trusted for Microsoft Entra and Azure Resource Manager
    /// (private endpoints, private clouds), by the operator and by replicator pods (copied into
    /// each replication's ConfigMap).
    #[arg(long, env = "MREP_ENTRA_CA_FILE", value_name = "FILE")]
    pub entra_ca_file: Option<PathBuf>,
    /// Azure Resource Manager endpoint, for identity bindings (federated credentials, cluster
    /// users). The operator signs in to it with its own workload identity (AZURE_CLIENT_ID,
    /// AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE, as the webhook injects them).
    #[arg(long, env = "MREP_ARM_ENDPOINT", default_value = crate::azure::arm::PUBLIC_ENDPOINT)]
    pub arm_endpoint: String,
    /// The cluster's service-account issuer, as federated credentials must name it (AKS:
    /// `az aks show --query oidcIssuerProfile.issuerUrl`); default: read from the apiserver's
    /// OIDC discovery document.
    #[arg(long, env = "MREP_CLUSTER_OIDC_ISSUER")]
    pub cluster_oidc_issuer: Option<String>,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, env = "MREP_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format; default: text on a terminal, JSON otherwise.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormatFlag>,
}

/// Arguments of `validate`.
#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// The replicator's configuration file (YAML or JSON), as for `replicate --config`.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Output format; default: text on a terminal, JSON otherwise.
    #[arg(long, value_enum)]
    pub output: Option<LogFormatFlag>,
    #[command(flatten)]
    pub verdict: VerdictArgs,
}

/// Where a one-shot check (`validate`, `verify`) leaves its verdict and diagnostics.
#[derive(Args, Debug)]
pub struct VerdictArgs {
    /// Where Kubernetes reads a container's termination message; written only when it exists.
    #[arg(long, value_name = "FILE", default_value = crate::validate::TERMINATION_LOG)]
    pub termination_log: PathBuf,
    /// Log level for the diagnostics written to stderr.
    #[arg(long, default_value = "warn")]
    pub log_level: String,
}

/// Arguments of `verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The replicator's configuration file (YAML or JSON), as for `replicate --config`.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// `_id` ranges compared at once.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Documents per read batch of each side.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// A collection gets one `_id` range per this many documents (at most 4 per worker).
    #[arg(long, default_value_t = 50_000)]
    pub partition_documents: u64,
    /// Most source documents read per second (scan and rechecks); default: no limit.
    #[arg(long, value_name = "N")]
    pub max_docs_per_second: Option<u64>,
    /// Compare documents with their keys sorted at every depth (for targets that reorder
    /// fields); numeric types and -0.0 still matter.
    #[arg(long)]
    pub ignore_field_order: bool,
    /// How far the target may trail the source: a difference is reported once it is still
    /// there this long after the document last changed (0 for a target nobody writes).
    #[arg(long, default_value_t = 30)]
    pub lag_allowance_seconds: u64,
    /// Give up (exit 5) after this many recheck generations...
    #[arg(long, default_value_t = 1000)]
    pub max_generations: u32,
    /// ...or this many seconds of rechecks after the scan.
    #[arg(long, default_value_t = 600)]
    pub max_live_seconds: u64,
    /// Start a new pass even when an unfinished one is saved.
    #[arg(long)]
    pub restart: bool,
    /// Address of /metrics (mongo_replicator_verify_*); default: none.
    #[arg(long, value_name = "ADDR")]
    pub metrics_address: Option<SocketAddr>,
    /// Output: a progress line and a report on a terminal, JSON lines otherwise.
    #[arg(long, value_enum)]
    pub output: Option<LogFormatFlag>,
    #[command(flatten)]
    pub verdict: VerdictArgs,
}

impl VerifyArgs {
    pub fn options(&self) -> crate::verify::VerifyOptions {
        crate::verify::VerifyOptions {
            workers: self.workers.max(1),
            batch_size: self.batch_size.max(1),
            partition_documents: self.partition_documents,
            max_docs_per_second: self.max_docs_per_second.filter(|n| *n > 0),
            comparison: crate::verify::compare::Comparison { ignore_field_order: self.ignore_field_order },
            lag_allowance: std::time::Duration::from_secs(self.lag_allowance_seconds),
            max_generations: self.max_generations,
            max_live: std::time::Duration::from_secs(self.max_live_seconds),
            restart: self.restart,
        }
    }
}

/// Arguments of `replicate`: a config file, or flags for a quick run.
#[derive(Args, Debug)]
#[command(after_help = "Connection strings never belong in a config file: give them with --source-uri/--target-uri \
(or MREP_SOURCE_URI/MREP_TARGET_URI), or as files with --source-uri-file/--target-uri-file (a mounted Secret).\n\n\
Example:\n  MREP_SOURCE_URI='mongodb://src:27017/?replicaSet=rs0' MREP_TARGET_URI='mongodb://dst:27017' \\\n    \
mongo-replicator replicate --name orders --include 'orders.*' --rename 'orders.*=orders_dr.*'")]
pub struct ReplicateArgs {
    /// Configuration file (YAML or JSON), as the operator writes it; see the README for its schema.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["name", "source_uri", "source_uri_file", "include"])]
    pub config: Option<PathBuf>,

    /// Name of the replication: its checkpoint is stored under this name in the target.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Source connection string (credentials included).
    #[arg(long, env = "MREP_SOURCE_URI", hide_env_values = true)]
    pub source_uri: Option<String>,
    /// File holding the source connection string.
    #[arg(long, value_name = "FILE")]
    pub source_uri_file: Option<PathBuf>,
    /// How to log in to the source.
    #[arg(long, value_enum, default_value = "connection-string")]
    pub source_auth: AuthFlag,
    /// Extra CA certificates (PEM) for the source's TLS.
    #[arg(long, value_name = "FILE")]
    pub source_ca_file: Option<PathBuf>,
    /// Target connection string (credentials included).
    #[arg(long, env = "MREP_TARGET_URI", hide_env_values = true)]
    pub target_uri: Option<String>,
    /// File holding the target connection string.
    #[arg(long, value_name = "FILE")]
    pub target_uri_file: Option<PathBuf>,
    /// How to log in to the target.
    #[arg(long, value_enum, default_value = "connection-string")]
    pub target_auth: AuthFlag,
    /// Extra CA certificates (PEM) for the target's TLS.
    #[arg(long, value_name = "FILE")]
    pub target_ca_file: Option<PathBuf>,
    /// Namespace pattern to replicate (`db.coll`, `*` wildcards); repeat for more. Default: all.
    #[arg(long, value_name = "PATTERN")]
    pub include: Vec<String>,
    /// Namespace pattern to leave out; repeat for more.
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// Rename rule `FROM=TO`, e.g. `orders.*=orders_dr.*`; repeat for more (first match wins).
    #[arg(long, value_name = "FROM=TO", value_parser = parse_rename)]
    pub rename: Vec<Rename>,
    /// What to replicate.
    #[arg(long, value_enum, default_value = "snapshot-and-stream")]
    pub mode: ModeFlag,
    /// StreamOnly: start at this source cluster time (`<seconds>.<increment>`) when there is no checkpoint.
    #[arg(long, value_name = "TIME", conflicts_with = "start_after_token")]
    pub start_at_cluster_time: Option<String>,
    /// StreamOnly: start after this resume token (hex `_data`) when there is no checkpoint.
    #[arg(long, value_name = "HEX")]
    pub start_after_token: Option<String>,
    /// Parallel writers.
    #[arg(long, default_value_t = config_file::DEFAULT_WORKERS)]
    pub workers: usize,
    /// Most documents per write command.
    #[arg(long, default_value_t = config_file::DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Collections with more documents than this are read as parallel `_id` ranges; 0 (the
    /// default): one cursor per collection, the cheapest read for the source.
    #[arg(long, default_value_t = config_file::DEFAULT_PARTITION_DOCUMENTS)]
    pub partition_documents: u64,
    /// Database in the target holding checkpoints.
    #[arg(long, default_value = config_file::DEFAULT_CHECKPOINT_DATABASE)]
    pub checkpoint_database: String,
    /// When the source's history no longer reaches the checkpoint: fail, or copy again.
    #[arg(long, value_enum, default_value = "fail")]
    pub on_history_lost: HistoryFlag,
    /// The stream counts as caught up (mongo_replicator_caught_up_seconds, ready for a cutover)
    /// while its lag is at most this many seconds and writes succeed.
    #[arg(long, default_value_t = config_file::DEFAULT_CAUGHT_UP_LAG_SECONDS)]
    pub caught_up_lag_seconds: u64,

    /// Address of /metrics, /healthz and /readyz (overrides the config file); `none` turns it off.
    #[arg(long, value_name = "ADDR")]
    pub metrics_address: Option<String>,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Log format; default: text on a terminal, JSON otherwise.
    #[arg(long, env = "MREP_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormatFlag>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AuthFlag {
    ConnectionString,
    Entra,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeFlag {
    SnapshotAndStream,
    StreamOnly,
    SnapshotOnly,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum HistoryFlag {
    Fail,
    Resync,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormatFlag {
    Json,
    Text,
}

fn parse_rename(text: &str) -> Result<Rename, String> {
    let (from, to) = text.split_once('=').ok_or_else(|| format!("expected FROM=TO, got {text:?}"))?;
    Ok(Rename { from: from.to_string(), to: to.to_string() })
}

impl ReplicateArgs {
    /// The configuration these arguments describe.
    pub fn config(&self) -> Result<ReplicatorConfig, ConfigError> {
        let mut config = match &self.config {
            Some(path) => ReplicatorConfig::from_file(path)?,
            None => {
                let endpoint = |role: &str, auth: AuthFlag, uri: &Option<String>, file: &Option<PathBuf>, ca: &Option<PathBuf>| {
                    let login = match (auth, uri, file) {
                        // An Entra URI carries no secret; flags take the identity from the
                        // workload identity webhook's variables.
                        (AuthFlag::Entra, Some(uri), None) => Login::Entra { uri: uri.clone(), identity: EntraSettings::default() },
                        (AuthFlag::Entra, _, _) => {
                            return Err(ConfigError::Invalid(format!(
                                "{role}: --{role}-auth entra takes the URI (without credentials) in --{role}-uri"
                            )));
                        }
                        (AuthFlag::ConnectionString, Some(uri), None) => {
                            Login::ConnectionString(UriSource::Given(ConnectionString::new(uri.as_str())))
                        }
                        (AuthFlag::ConnectionString, None, Some(file)) => Login::ConnectionString(UriSource::File(file.clone())),
                        (AuthFlag::ConnectionString, _, _) => {
                            return Err(ConfigError::Invalid(format!(
                                "{role}: give the connection string exactly one way: --{role}-uri (or MREP_{}_URI) or --{role}-uri-file",
                                role.to_uppercase()
                            )));
                        }
                    };
                    Ok(EndpointConfig { login, ca_file: ca.clone() })
                };
                let filter = NamespaceRules { include: self.include.clone(), exclude: self.exclude.clone(), rename: self.rename.clone() };
                let start_at = StartAt::from_parts(self.start_at_cluster_time.as_ref(), self.start_after_token.as_ref());
                let mut config = ReplicatorConfig::new(
                    &self.name,
                    endpoint("source", self.source_auth, &self.source_uri, &self.source_uri_file, &self.source_ca_file)?,
                    endpoint("target", self.target_auth, &self.target_uri, &self.target_uri_file, &self.target_ca_file)?,
                );
                config.namespaces = (filter != NamespaceRules::default()).then_some(filter);
                config.mode = match self.mode {
                    ModeFlag::SnapshotAndStream => Mode::SnapshotAndStream,
                    ModeFlag::StreamOnly => Mode::StreamOnly,
                    ModeFlag::SnapshotOnly => Mode::SnapshotOnly,
                };
                config.start_at = start_at;
                config.workers = self.workers;
                config.batch_size = self.batch_size;
                config.partition_documents = self.partition_documents;
                config.checkpoint_database = self.checkpoint_database.clone();
                config.caught_up_lag_seconds = self.caught_up_lag_seconds;
                config.on_history_lost = match self.on_history_lost {
                    HistoryFlag::Fail => OnHistoryLost::Fail,
                    HistoryFlag::Resync => OnHistoryLost::Resync,
                };
                config.validate()?;
                config
            }
        };
        match self.metrics_address.as_deref() {
            None => {}
            Some("none") => config.metrics_address = None,
            Some(addr) => {
                config.metrics_address = Some(addr.parse::<SocketAddr>().map_err(|e| ConfigError::Invalid(format!("--metrics-address {addr}: {e}")))?)
            }
        }
        Ok(config)
    }
}

/// Runs a parsed command line; the process exit code is the result.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Crd => {
            let mut out = std::io::stdout().lock();
            match out.write_all(crate::crd::crd_yaml().as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("mongo-replicator crd: cannot write to stdout: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Replicate(args) => replicate(*args),
        Command::Validate(args) => validate(args),
        Command::Verify(args) => verify(*args),
        Command::Operator(args) => operator(*args),
    }
}

/// A report for a person (text) or for a program (JSON): as asked, else text on a terminal.
fn text_output(output: Option<LogFormatFlag>) -> bool {
    use std::io::IsTerminal;
    match output {
        Some(LogFormatFlag::Text) => true,
        Some(LogFormatFlag::Json) => false,
        None => std::io::stdout().is_terminal(),
    }
}

fn validate(args: ValidateArgs) -> ExitCode {
    let text = text_output(args.output);
    if let Err(code) = start_logging(&args.verdict.log_level, None) {
        return code;
    }
    let config = match ReplicatorConfig::from_file(&args.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("mongo-replicator validate: {err}");
            let verdict = serde_json::json!({"passed": false, "reason": err.reason(), "message": err.to_string()}).to_string();
            let shown = if text { format!("validation FAILED: {err} [{}]\n", err.reason()) } else { format!("{verdict}\n") };
            let _ = std::io::stdout().lock().write_all(shown.as_bytes());
            write_termination_log(&args.verdict.termination_log, &verdict);
            return ExitCode::from(3);
        }
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let tokens = TokenSources::new(EntraMetrics::new());
    let verdict = runtime.block_on(crate::validate::validate(&config, &tokens));
    let shown = if text { verdict.to_text() } else { format!("{}\n", verdict.to_json()) };
    let _ = std::io::stdout().lock().write_all(shown.as_bytes());
    write_termination_log(&args.verdict.termination_log, &verdict.termination_message(crate::validate::TERMINATION_MESSAGE_LIMIT));
    if verdict.passed { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn verify(args: VerifyArgs) -> ExitCode {
    let text = text_output(args.output);
    if let Err(code) = start_logging(&args.verdict.log_level, None) {
        return code;
    }
    let fail = |reason: crate::reason::Reason, message: String, code: u8| {
        let verdict = serde_json::json!({"outcome": "Failed", "equal": false, "reason": reason, "message": message}).to_string();
        let shown = if text { format!("verification FAILED: {message} [{reason}]\n") } else { format!("{verdict}\n") };
        let _ = std::io::stdout().lock().write_all(shown.as_bytes());
        write_termination_log(&args.verdict.termination_log, &verdict);
        ExitCode::from(code)
    };
    let config = match ReplicatorConfig::from_file(&args.config) {
        Ok(config) => config,
        Err(err) => return fail(err.reason(), err.to_string(), 3),
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let metrics = Arc::new(crate::verify::metrics::VerifyMetrics::new());
        let cancel = CancellationToken::new();
        if let Some(addr) = args.metrics_address {
            match telemetry::bind(addr).await {
                Ok((listener, _)) => {
                    let health = Arc::new(Health::new());
                    health.set_ready(true);
                    tokio::spawn(telemetry::serve_listener(listener, metrics.clone(), health, cancel.child_token()));
                }
                Err(err) => return fail(err.reason(), err.to_string(), 3),
            }
        }
        let progress = Arc::new(crate::verify::metrics::Progress::default());
        let printer = tokio::spawn(crate::verify::print_progress(progress.clone(), text, cancel.child_token()));
        let tokens = TokenSources::new(EntraMetrics::new());
        let options = args.options();
        let run = crate::verify::run(&config, &options, &tokens, metrics, progress, cancel.clone());
        let result = tokio::select! {
            result = run => result,
            signal = shutdown_signal() => {
                tracing::warn!(signal, "stopping; a rerun resumes this pass");
                Err(crate::verify::VerifyError::Cancelled)
            }
        };
        cancel.cancel();
        let _ = printer.await;
        match result {
            Ok(verdict) => {
                let shown = if text { verdict.to_text() } else { format!("{}\n", verdict.to_json()) };
                let _ = std::io::stdout().lock().write_all(shown.as_bytes());
                write_termination_log(&args.verdict.termination_log, &verdict.termination_message(crate::validate::TERMINATION_MESSAGE_LIMIT));
                ExitCode::from(verdict.outcome.exit_code())
            }
            Err(err) => fail(err.reason(), err.to_string(), err.exit_code()),
        }
    })
}

/// Writes the verdict where Kubernetes reads the termination message, when that file exists
/// (it does in a container; elsewhere there is nothing to write to).
/// Logging to stderr in the format asked for (default: text on a terminal, JSON otherwise);
/// exit code 3 when the level does not parse.
fn start_logging(level: &str, format: Option<LogFormatFlag>) -> Result<(), ExitCode> {
    let format = match format {
        Some(LogFormatFlag::Json) => LogFormat::Json,
        Some(LogFormatFlag::Text) => LogFormat::Text,
        None => telemetry::default_log_format(),
    };
    telemetry::init_logging(level, format).map_err(|err| {
        eprintln!("mongo-replicator: {err}");
        ExitCode::from(3)
    })
}

/// The async runtime every subcommand but `crd` runs on.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|err| {
        eprintln!("mongo-replicator: cannot start the async runtime: {err}");
        ExitCode::FAILURE
    })
}

fn write_termination_log(path: &std::path::Path, verdict: &str) {
    if path.exists()
        && let Err(err) = std::fs::write(path, verdict)
    {
        tracing::warn!(path = %path.display(), error = %err, "cannot write the termination message");
    }
}

fn replicate(args: ReplicateArgs) -> ExitCode {
    if let Err(code) = start_logging(&args.log_level, args.log_format) {
        return code;
    }
    let config = match args.config() {
        Ok(config) => config,
        Err(err) => {
            tracing::error!(reason = %err.reason(), "{err}");
            return ExitCode::from(3);
        }
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(replicate_async(config))
}

async fn replicate_async(config: ReplicatorConfig) -> ExitCode {
    let mut metrics = Metrics::new();
    let tokens = Arc::new(TokenSources::new(EntraMetrics::new()));
    tokens.metrics().register(metrics.registry_mut());
    let metrics = Arc::new(metrics);
    let health = Arc::new(Health::new());
    let cancel = CancellationToken::new();
    if let Some(addr) = config.metrics_address {
        let (metrics, health, cancel) = (metrics.clone(), health.clone(), cancel.child_token());
        let listener = match telemetry::bind(addr).await {
            Ok((listener, bound)) => {
                tracing::info!(address = %bound, "serving /metrics, /healthz and /readyz");
                listener
            }
            Err(err) => {
                tracing::error!(reason = %err.reason(), "{err}");
                return ExitCode::from(3);
            }
        };
        tokio::spawn(telemetry::serve_listener(listener, metrics, health, cancel));
    }
    let deadline = config.shutdown_timeout();
    tracing::info!(name = %config.name, mode = ?config.mode, workers = config.workers, batch_size = config.batch_size, "mongo-replicator replicate starting");
    let run = replicator::run(config, tokens, metrics, health, cancel.clone());
    tokio::pin!(run);
    let result = tokio::select! {
        result = &mut run => result,
        signal = shutdown_signal() => {
            tracing::info!(signal, "draining: applying what was read, saving the checkpoint");
            cancel.cancel();
            match tokio::time::timeout(deadline, &mut run).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::error!(deadline = ?deadline, "the drain did not finish before the shutdown deadline; the next run resumes from the last saved checkpoint");
                    return ExitCode::from(6);
                }
            }
        }
    };
    cancel.cancel();
    match result {
        Ok(Outcome::Stopped) => ExitCode::SUCCESS,
        Ok(Outcome::SnapshotDone) => {
            tracing::info!("snapshot finished (mode: SnapshotOnly)");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(reason = %err.reason(), "{err}");
            // In a pod, the reason reaches the operator (and `kubectl describe pod`) this way.
            let message = serde_json::json!({"reason": err.reason(), "message": err.to_string(), "exitCode": err.exit_code()});
            write_termination_log(std::path::Path::new(crate::validate::TERMINATION_LOG), &message.to_string());
            ExitCode::from(err.exit_code())
        }
    }
}

fn operator(args: OperatorArgs) -> ExitCode {
    if let Err(code) = start_logging(&args.log_level, args.log_format) {
        return code;
    }
    let identity = args.identity.clone().unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let ca_bundle = match &args.entra_ca_file {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => Some(pem),
            Ok(_) => {
                tracing::error!(path = %path.display(), "--entra-ca-file holds no PEM certificate");
                return ExitCode::from(3);
            }
            Err(err) => {
                tracing::error!(path = %path.display(), error = %err, "cannot read --entra-ca-file");
                return ExitCode::from(3);
            }
        },
    };
    let settings = crate::operator::Settings {
        namespaces: args.watch_namespaces.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect(),
        children: crate::operator::children::ChildSettings {
            replicator_image: args.replicator_image.clone(),
            image_pull_policy: args.replicator_image_pull_policy.clone(),
            entra: crate::operator::config::EntraDefaults { authority_host: args.entra_authority_host.clone(), ca_bundle },
        },
        metrics_address: args.metrics_address,
        leader_election: args.leader_election,
        lease_name: args.lease_name.clone(),
        lease_namespace: args.lease_namespace.clone(),
        identity,
        concurrency: args.concurrency.max(1),
        resync: std::time::Duration::from_secs(args.resync_seconds.max(1)),
        stall_after: std::time::Duration::from_secs(args.stall_after_seconds.max(1)),
        azure: crate::operator::AzureSettings {
            arm_endpoint: args.arm_endpoint.clone(),
            identity: operator_identity(args.entra_authority_host.clone(), args.entra_ca_file.clone()),
            cluster_issuer: args.cluster_oidc_issuer.clone(),
            ca_file: args.entra_ca_file.clone(),
        },
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            let signal = shutdown_signal().await;
            tracing::info!(signal, "stopping: finishing the reconciles in flight");
            trigger.cancel();
        });
        match crate::operator::run(settings, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!("{err}");
                ExitCode::FAILURE
            }
        }
    })
}

/// The operator's own Azure identity, for ARM: what the workload identity webhook injects, or
/// `None` when the pod has none (bindings then report `OperatorIdentityMissing`).
fn operator_identity(authority_host: Option<String>, ca_file: Option<PathBuf>) -> Option<crate::auth::oidc::Identity> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    Some(crate::auth::oidc::Identity {
        client_id: env("AZURE_CLIENT_ID")?,
        tenant_id: env("AZURE_TENANT_ID")?,
        token_file: env("AZURE_FEDERATED_TOKEN_FILE")?.into(),
        scope: crate::azure::arm::MANAGEMENT_SCOPE.to_string(),
        authority_host: authority_host
            .or_else(|| env("AZURE_AUTHORITY_HOST"))
            .unwrap_or_else(|| crate::auth::oidc::PUBLIC_AUTHORITY_HOST.to_string()),
        ca_file,
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "mongo-replicator".into())
}

/// Resolves on SIGTERM or SIGINT with the signal's name.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the process still stops on the default action.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
