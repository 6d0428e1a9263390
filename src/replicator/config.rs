//! The replicator's configuration: the file the operator writes into a ConfigMap (YAML or JSON),
//! or the same settings from command-line flags. Secrets are never in it: connection strings
//! come from files (mounted Secrets) or environment variables.
//!
//! The file is a versioned contract between operator and replicator: `spec.replicator.image`
//! lets a user run an older replicator than the operator, so a file carries the [`CONFIG_VERSION`]
//! it was written for, and a replicator refuses a newer one with a message naming both. Its
//! types are owned here, apart from the CRD's (the operator converts), so the API can change
//! without changing the file. Every default lives here, read by serde, clap and the CRD's docs.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

pub use crate::auth::endpoint::{EndpointConfig, EndpointRole, EntraSettings};
use crate::reason::Reason;

/// The configuration file version this replicator writes and reads.
pub const CONFIG_VERSION: u32 = 1;

// Defaults as literal macros, so the CRD's documentation can quote them with `concat!`.
#[doc(hidden)]
#[macro_export]
macro_rules! default_workers {
    () => {
        8
    };
}
#[doc(hidden)]
#[macro_export]
macro_rules! default_batch_size {
    () => {
        1000
    };
}
#[doc(hidden)]
#[macro_export]
macro_rules! default_caught_up_lag_seconds {
    () => {
        5
    };
}
#[doc(hidden)]
#[macro_export]
macro_rules! default_caught_up_sustain_seconds {
    () => {
        60
    };
}
#[doc(hidden)]
#[macro_export]
macro_rules! default_verification_interval_minutes {
    () => {
        360
    };
}
#[doc(hidden)]
#[macro_export]
macro_rules! default_checkpoint_database {
    () => {
        "mongo_replicator"
    };
}

/// Parallel writers (and parallel range copies).
pub const DEFAULT_WORKERS: usize = default_workers!();
/// Most documents in one write command.
pub const DEFAULT_BATCH_SIZE: usize = default_batch_size!();
/// Longest a change waits in the replicator before it is written.
pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 100;
/// Database in the target holding checkpoints.
pub const DEFAULT_CHECKPOINT_DATABASE: &str = default_checkpoint_database!();
/// Off: one `_id`-ordered cursor per collection costs the source least and copies fastest on
/// every source measured (README, benchmark).
pub const DEFAULT_PARTITION_DOCUMENTS: u64 = 0;
/// Port of `/metrics`, `/healthz` and `/readyz`.
pub const DEFAULT_METRICS_PORT: u16 = 9090;
/// How long SIGTERM may take to drain, checkpoint and exit.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECONDS: u64 = 30;
/// Most seconds of lag that count as caught up (cutover readiness).
pub const DEFAULT_CAUGHT_UP_LAG_SECONDS: u64 = default_caught_up_lag_seconds!();

/// Which namespaces to replicate, and under which names.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceRules {
    /// `database.collection` patterns with `*` wildcards; empty: every user namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Patterns to leave out; exclusion wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Renames in the target, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rename: Vec<Rename>,
}

/// Namespaces matching `from` are written to `to` (each `*` carries what it matched).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rename {
    pub from: String,
    pub to: String,
}

/// What the replication does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Copy, then follow the change stream from a point taken before the copy began.
    #[default]
    SnapshotAndStream,
    /// Follow the change stream only.
    StreamOnly,
    /// Copy once, then stop.
    SnapshotOnly,
}

/// Where a `StreamOnly` replication starts when it has no checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StartAt {
    /// A source cluster time, `<seconds>.<increment>`.
    ClusterTime(String),
    /// A resume token's hex `_data`; the stream starts after it.
    ResumeToken(String),
}

impl StartAt {
    /// From the two ways a start point is given (flags, the API's fields): a cluster time wins;
    /// neither is no start point.
    pub fn from_parts(cluster_time: Option<&String>, resume_token: Option<&String>) -> Option<Self> {
        match (cluster_time, resume_token) {
            (Some(time), _) => Some(StartAt::ClusterTime(time.clone())),
            (None, Some(token)) => Some(StartAt::ResumeToken(token.clone())),
            (None, None) => None,
        }
    }
}

/// What to do when the source's change history no longer reaches the checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnHistoryLost {
    /// Stop (exit 5) for a person to decide.
    #[default]
    Fail,
    /// Drop the replicated target collections and copy again.
    Resync,
}

/// Everything `mongo-replicator replicate` needs to know.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicatorConfig {
    /// The file format's version; a file without one is read as version 1.
    #[serde(default = "current_version")]
    pub version: u32,
    /// Identifies the replication; its checkpoint is stored under this name in the target.
    /// The operator uses `<namespace>/<name>` of the MongoReplication.
    pub name: String,
    #[serde(deserialize_with = "source_endpoint")]
    pub source: EndpointConfig,
    #[serde(deserialize_with = "target_endpoint")]
    pub target: EndpointConfig,
    /// Which namespaces, under which names. Omitted: every user namespace, unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<NamespaceRules>,
    #[serde(default)]
    pub mode: Mode,
    /// Where a `StreamOnly` replication starts when it has no checkpoint. Default: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<StartAt>,
    /// Parallel writers (and parallel collection copies during the snapshot).
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Most documents in one write command.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longest time a change waits in the replicator before it is written, in milliseconds.
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Database in the target that holds checkpoints; never replicated.
    #[serde(default = "default_checkpoint_database")]
    pub checkpoint_database: String,
    #[serde(default)]
    pub on_history_lost: OnHistoryLost,
    /// Collections with more documents than this are read as several `_id` ranges in parallel;
    /// 0 (the default) reads each collection with one cursor, which costs the source least. Set
    /// it only where one cursor cannot keep the writers busy (a source far away, or slow to read).
    #[serde(default = "default_partition_documents")]
    pub partition_documents: u64,
    /// Address of `/metrics`, `/healthz` and `/readyz`; `null` turns the endpoint off.
    #[serde(default = "default_metrics_address")]
    pub metrics_address: Option<SocketAddr>,
    /// How long SIGTERM may take to drain, checkpoint and exit.
    #[serde(default = "default_shutdown_timeout_seconds")]
    pub shutdown_timeout_seconds: u64,
    /// The stream counts as caught up (`caughtUpSince`, `mongo_replicator_caught_up_seconds`)
    /// while its lag is at most this many seconds and writes succeed.
    #[serde(default = "default_caught_up_lag_seconds")]
    pub caught_up_lag_seconds: u64,
    /// The MongoReplication whose `status.progress` the replicator keeps up to date (the
    /// operator sets it); omitted: no status is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_report: Option<StatusReport>,
}

/// The object a replicator reports its progress to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StatusReport {
    pub namespace: String,
    pub name: String,
}

fn current_version() -> u32 {
    CONFIG_VERSION
}
fn default_workers() -> usize {
    DEFAULT_WORKERS
}
fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}
fn default_flush_interval_ms() -> u64 {
    DEFAULT_FLUSH_INTERVAL_MS
}
fn default_checkpoint_database() -> String {
    DEFAULT_CHECKPOINT_DATABASE.to_string()
}
fn default_partition_documents() -> u64 {
    DEFAULT_PARTITION_DOCUMENTS
}
fn default_metrics_address() -> Option<SocketAddr> {
    Some(SocketAddr::from(([0, 0, 0, 0], DEFAULT_METRICS_PORT)))
}
fn default_shutdown_timeout_seconds() -> u64 {
    DEFAULT_SHUTDOWN_TIMEOUT_SECONDS
}
fn default_caught_up_lag_seconds() -> u64 {
    DEFAULT_CAUGHT_UP_LAG_SECONDS
}
fn source_endpoint<'de, D: Deserializer<'de>>(deserializer: D) -> Result<EndpointConfig, D::Error> {
    EndpointConfig::deserialize_as(deserializer, EndpointRole::Source)
}
fn target_endpoint<'de, D: Deserializer<'de>>(deserializer: D) -> Result<EndpointConfig, D::Error> {
    EndpointConfig::deserialize_as(deserializer, EndpointRole::Target)
}

/// The one field every version of the file has, read before the rest.
#[derive(Deserialize)]
struct VersionProbe {
    #[serde(default = "current_version")]
    version: u32,
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("config file {path} is not valid: {reason}")]
    Malformed { path: String, reason: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error(
        "config file {path} is version {found}, written by a newer operator; this replicator ({replicator}) reads version {supported}: \
         run the operator's own replicator image (remove spec.replicator.image) or upgrade it"
    )]
    VersionUnsupported { path: String, found: u32, supported: u32, replicator: &'static str },
}

impl ConfigError {
    /// Stable reason for conditions, Events and metric labels.
    pub fn reason(&self) -> Reason {
        match self {
            ConfigError::Unreadable { .. } => Reason::ConfigUnreadable,
            ConfigError::Malformed { .. } => Reason::ConfigMalformed,
            ConfigError::Invalid(_) => Reason::ConfigInvalid,
            ConfigError::VersionUnsupported { .. } => Reason::ConfigVersionUnsupported,
        }
    }
}

impl ReplicatorConfig {
    /// A configuration with every optional setting at its default.
    pub fn new(name: &str, source: EndpointConfig, target: EndpointConfig) -> Self {
        Self {
            version: CONFIG_VERSION,
            name: name.to_string(),
            source,
            target,
            namespaces: None,
            mode: Mode::default(),
            start_at: None,
            workers: default_workers(),
            batch_size: default_batch_size(),
            flush_interval_ms: default_flush_interval_ms(),
            checkpoint_database: default_checkpoint_database(),
            on_history_lost: OnHistoryLost::default(),
            partition_documents: default_partition_documents(),
            metrics_address: default_metrics_address(),
            shutdown_timeout_seconds: default_shutdown_timeout_seconds(),
            caught_up_lag_seconds: default_caught_up_lag_seconds(),
            status_report: None,
        }
    }
    /// Reads a YAML (or JSON) configuration file and checks it. A file of a newer version is
    /// refused before its fields are read: they may be ones this replicator does not know.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Unreadable { path: shown.clone(), reason: err.to_string() })?;
        // The parser's message quotes the offending lines after its first; a connection string
        // pasted into the file by mistake must not reach a log from there.
        let malformed = |err: serde_saphyr::Error| ConfigError::Malformed {
            path: shown.clone(),
            reason: err.to_string().lines().next().unwrap_or_default().trim_start_matches("error: ").to_string(),
        };
        let probe: VersionProbe = serde_saphyr::from_str(&text).map_err(malformed)?;
        if probe.version > CONFIG_VERSION {
            return Err(ConfigError::VersionUnsupported {
                path: shown,
                found: probe.version,
                supported: CONFIG_VERSION,
                replicator: env!("CARGO_PKG_VERSION"),
            });
        }
        let config: ReplicatorConfig = serde_saphyr::from_str(&text).map_err(malformed)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.name.trim().is_empty() {
            return invalid("name must not be empty".into());
        }
        if !(1..=64).contains(&self.workers) {
            return invalid(format!("workers must be between 1 and 64, not {}", self.workers));
        }
        if !(1..=100_000).contains(&self.batch_size) {
            return invalid(format!("batchSize must be between 1 and 100000, not {}", self.batch_size));
        }
        if self.flush_interval_ms == 0 || self.flush_interval_ms > 60_000 {
            return invalid(format!("flushIntervalMs must be between 1 and 60000, not {}", self.flush_interval_ms));
        }
        if self.version == 0 {
            return invalid("version must be 1 or more".into());
        }
        if self.start_at.is_some() && self.mode != Mode::StreamOnly {
            return invalid("startAt applies only to mode: StreamOnly".into());
        }
        Ok(())
    }

    /// The source's or the target's endpoint.
    pub fn endpoint(&self, role: EndpointRole) -> &EndpointConfig {
        match role {
            EndpointRole::Source => &self.source,
            EndpointRole::Target => &self.target,
        }
    }

    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> &'static str {
        "name: data/orders
source: {auth: connectionString, uriFile: /secrets/source/uri}
target: {auth: connectionString, uriEnv: TARGET_URI}
"
    }

    fn file(text: &str) -> (tempdir::Dir, std::path::PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("replicator.yaml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let path = std::env::temp_dir().join(format!("mrep-config-{}-{}", std::process::id(), rand::random::<u64>()));
                std::fs::create_dir_all(&path).unwrap();
                Self(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn a_minimal_file_takes_the_defaults() {
        let config: ReplicatorConfig = serde_saphyr::from_str(minimal()).unwrap();
        config.validate().unwrap();
        assert_eq!(config.version, CONFIG_VERSION);
        assert_eq!(config.mode, Mode::SnapshotAndStream);
        assert_eq!((config.workers, config.batch_size), (8, 1000));
        assert_eq!(config.checkpoint_database, "mongo_replicator");
        assert_eq!(config.metrics_address, Some("0.0.0.0:9090".parse().unwrap()));
    }

    #[test]
    fn unknown_fields_and_inline_secrets_are_refused() {
        let typo = format!("{}workerz: 3\n", minimal());
        assert!(serde_saphyr::from_str::<ReplicatorConfig>(&typo).is_err());
        let (_dir, path) = file(&minimal().replace("uriEnv: TARGET_URI", "uri: 'mongodb://u:p@h'"));
        let err = ReplicatorConfig::from_file(&path).unwrap_err();
        assert_eq!(err.reason(), Reason::ConfigMalformed);
        let err = err.to_string();
        assert!(err.contains("target") && err.contains("remove uri"), "{err}");
        assert!(!err.contains("u:p@h"), "the message must not quote the file: {err}");
    }

    #[test]
    fn bounds_are_checked() {
        let mut config: ReplicatorConfig = serde_saphyr::from_str(minimal()).unwrap();
        config.workers = 0;
        assert!(config.validate().unwrap_err().to_string().contains("workers"));
        config.workers = 4;
        config.start_at = Some(StartAt::ClusterTime("1.1".into()));
        assert!(config.validate().unwrap_err().to_string().contains("StreamOnly"));
        let both = format!("{}mode: StreamOnly\nstartAt: {{clusterTime: '1.1', resumeToken: ab}}\n", minimal());
        assert!(serde_saphyr::from_str::<ReplicatorConfig>(&both).is_err(), "startAt takes exactly one");
    }

    #[test]
    fn a_file_from_a_newer_operator_is_refused_naming_both_versions() {
        let newer = format!("version: 2\n{}someFieldOfVersion2: {{x: 1}}\n", minimal());
        let (_dir, path) = file(&newer);
        let err = ReplicatorConfig::from_file(&path).unwrap_err();
        assert_eq!(err.reason(), Reason::ConfigVersionUnsupported);
        let message = err.to_string();
        assert!(message.contains("version 2") && message.contains("reads version 1"), "{message}");

        let (_dir, path) = file(&format!("version: 1\n{}", minimal()));
        assert_eq!(ReplicatorConfig::from_file(&path).unwrap().version, 1);
        let (_dir, path) = file(minimal());
        assert_eq!(ReplicatorConfig::from_file(&path).unwrap().version, 1, "a hand-written file without a version is version 1");
        let (_dir, path) = file(&format!("version: 0\n{}", minimal()));
        assert_eq!(ReplicatorConfig::from_file(&path).unwrap_err().reason(), Reason::ConfigInvalid);
    }

    #[test]
    fn a_written_config_carries_its_version_and_reads_back() {
        let config: ReplicatorConfig = serde_saphyr::from_str(minimal()).unwrap();
        let yaml = serde_saphyr::to_string(&config).unwrap();
        assert!(yaml.starts_with("version: 1\n"), "{yaml}");
        assert_eq!(serde_saphyr::from_str::<ReplicatorConfig>(&yaml).unwrap(), config);
    }
}
