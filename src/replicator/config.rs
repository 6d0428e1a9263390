//! The replicator's configuration: the file the operator writes into a ConfigMap (YAML or JSON),
//! or the same settings from command-line flags. Secrets are never in it: connection strings
//! come from files (mounted Secrets) or environment variables.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::ConnectionString;
use crate::crd::{AuthMethod, HistoryLostPolicy, NamespaceFilter, ReplicationMode, StreamStart};

/// Which side of the replication an endpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointRole {
    Source,
    Target,
}

impl fmt::Display for EndpointRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EndpointRole::Source => "source",
            EndpointRole::Target => "target",
        })
    }
}

/// How to reach and log in to one endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointConfig {
    /// `connectionString` (the whole URI, credentials included, from `uriFile` or `uriEnv`) or `entra`.
    pub auth: AuthMethod,
    /// For `auth: entra`: the connection string without credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// File holding the connection string (a mounted Secret key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_file: Option<PathBuf>,
    /// Environment variable holding the connection string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_env: Option<String>,
    /// Extra CA certificates (PEM file) to trust for this endpoint's TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// For `auth: entra`: the Microsoft Entra identity to log in as. Omitted values come from the
    /// variables the workload identity webhook injects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entra: Option<EntraSettings>,
    /// A connection string given on the command line (never read from or written to a file).
    #[serde(skip)]
    pub connection_string: Option<ConnectionString>,
}

/// Microsoft Entra workload identity for one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntraSettings {
    /// Client id of the user-assigned managed identity. Default: `AZURE_CLIENT_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Tenant id. Default: `AZURE_TENANT_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Token scope. Default: Azure DocumentDB's, `https://ossrdbms-aad.database.windows.net/.default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Microsoft Entra authority. Default: `AZURE_AUTHORITY_HOST`, else `https://login.microsoftonline.com/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority_host: Option<String>,
    /// The projected service-account token. Default: `AZURE_FEDERATED_TOKEN_FILE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for the authority (private endpoints, private clouds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// Everything `mongo-replicator replicate` needs to know.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicatorConfig {
    /// Identifies the replication; its checkpoint is stored under this name in the target.
    /// The operator uses `<namespace>/<name>` of the MongoReplication.
    pub name: String,
    pub source: EndpointConfig,
    pub target: EndpointConfig,
    /// Which namespaces, under which names. Omitted: every user namespace, unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<NamespaceFilter>,
    #[serde(default)]
    pub mode: ReplicationMode,
    /// Where a `StreamOnly` replication starts when it has no checkpoint. Default: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<StreamStart>,
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
    pub on_history_lost: HistoryLostPolicy,
    /// Collections with more documents than this are copied as several `_id` ranges in parallel.
    #[serde(default = "default_partition_documents")]
    pub partition_documents: u64,
    /// Address of `/metrics`, `/healthz` and `/readyz`; `null` turns the endpoint off.
    #[serde(default = "default_metrics_address")]
    pub metrics_address: Option<SocketAddr>,
    /// How long SIGTERM may take to drain, checkpoint and exit.
    #[serde(default = "default_shutdown_timeout_seconds")]
    pub shutdown_timeout_seconds: u64,
}

fn default_workers() -> usize {
    8
}
fn default_batch_size() -> usize {
    1000
}
fn default_flush_interval_ms() -> u64 {
    100
}
fn default_checkpoint_database() -> String {
    "mongo_replicator".to_string()
}
fn default_partition_documents() -> u64 {
    200_000
}
fn default_metrics_address() -> Option<SocketAddr> {
    Some(SocketAddr::from(([0, 0, 0, 0], 9090)))
}
fn default_shutdown_timeout_seconds() -> u64 {
    30
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
}

impl ConfigError {
    /// Stable reason for conditions, Events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            ConfigError::Unreadable { .. } => "ConfigUnreadable",
            ConfigError::Malformed { .. } => "ConfigMalformed",
            ConfigError::Invalid(_) => "ConfigInvalid",
        }
    }
}

impl ReplicatorConfig {
    /// A configuration with every optional setting at its default.
    pub fn new(name: &str, source: EndpointConfig, target: EndpointConfig) -> Self {
        Self {
            name: name.to_string(),
            source,
            target,
            namespaces: None,
            mode: ReplicationMode::default(),
            start_at: None,
            workers: default_workers(),
            batch_size: default_batch_size(),
            flush_interval_ms: default_flush_interval_ms(),
            checkpoint_database: default_checkpoint_database(),
            on_history_lost: HistoryLostPolicy::default(),
            partition_documents: default_partition_documents(),
            metrics_address: default_metrics_address(),
            shutdown_timeout_seconds: default_shutdown_timeout_seconds(),
        }
    }

    /// Reads a YAML (or JSON) configuration file and checks it.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|err| ConfigError::Unreadable { path: path.display().to_string(), reason: err.to_string() })?;
        let config: ReplicatorConfig =
            serde_saphyr::from_str(&text).map_err(|err| ConfigError::Malformed { path: path.display().to_string(), reason: err.to_string() })?;
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
        if self.start_at.is_some() && self.mode != ReplicationMode::StreamOnly {
            return invalid("startAt applies only to mode: StreamOnly".into());
        }
        if let Some(start) = &self.start_at
            && start.cluster_time.is_some() == start.resume_token.is_some()
        {
            return invalid("startAt takes exactly one of clusterTime or resumeToken".into());
        }
        for (role, endpoint) in [(EndpointRole::Source, &self.source), (EndpointRole::Target, &self.target)] {
            match endpoint.auth {
                AuthMethod::ConnectionString => {
                    if endpoint.uri.is_some() {
                        return invalid(format!(
                            "{role}: auth: connectionString reads the URI from uriFile or uriEnv, so that it never sits in a config file; remove uri"
                        ));
                    }
                    let sources = [endpoint.uri_file.is_some(), endpoint.uri_env.is_some(), endpoint.connection_string.is_some()];
                    if endpoint.entra.is_some() {
                        return invalid(format!("{role}: auth: connectionString must not set entra"));
                    }
                    if sources.iter().filter(|s| **s).count() != 1 {
                        return invalid(format!("{role}: give the connection string exactly one way: uriFile, uriEnv or --{role}-uri"));
                    }
                }
                AuthMethod::Entra => {
                    if endpoint.uri.is_none() {
                        return invalid(format!("{role}: auth: entra needs uri"));
                    }
                }
            }
        }
        Ok(())
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

    #[test]
    fn a_minimal_file_takes_the_defaults() {
        let config: ReplicatorConfig = serde_saphyr::from_str(minimal()).unwrap();
        config.validate().unwrap();
        assert_eq!(config.mode, ReplicationMode::SnapshotAndStream);
        assert_eq!((config.workers, config.batch_size), (8, 1000));
        assert_eq!(config.checkpoint_database, "mongo_replicator");
        assert_eq!(config.metrics_address, Some("0.0.0.0:9090".parse().unwrap()));
    }

    #[test]
    fn unknown_fields_and_inline_secrets_are_refused() {
        let typo = format!("{}workerz: 3\n", minimal());
        assert!(serde_saphyr::from_str::<ReplicatorConfig>(&typo).is_err());
        let inline = minimal().replace("uriEnv: TARGET_URI", "uri: 'mongodb://u:p@h'");
        let config: ReplicatorConfig = serde_saphyr::from_str(&inline).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("target") && err.contains("remove uri"), "{err}");
    }

    #[test]
    fn bounds_are_checked() {
        let mut config: ReplicatorConfig = serde_saphyr::from_str(minimal()).unwrap();
        config.workers = 0;
        assert!(config.validate().unwrap_err().to_string().contains("workers"));
        config.workers = 4;
        config.start_at = Some(StreamStart { cluster_time: Some("1.1".into()), resume_token: None });
        assert!(config.validate().unwrap_err().to_string().contains("StreamOnly"));
    }

    #[test]
    fn entra_endpoints_take_their_identity_and_connection_strings_must_not() {
        let text = minimal().replace(
            "target: {auth: connectionString, uriEnv: TARGET_URI}",
            "target:\n  auth: entra\n  uri: mongodb+srv://c.global.mongocluster.cosmos.azure.com/?tls=true\n  entra: {clientId: c1, tenantId: t1, authorityHost: 'https://login.example/', tokenFile: /t}",
        );
        let config: ReplicatorConfig = serde_saphyr::from_str(&text).unwrap();
        config.validate().unwrap();
        let identity = crate::auth::entra_identity(&config.target, EndpointRole::Target).unwrap();
        assert_eq!((identity.client_id.as_str(), identity.tenant_id.as_str()), ("c1", "t1"));
        assert_eq!(identity.authority_host, "https://login.example/");
        assert_eq!(identity.scope, crate::crd::DOCUMENTDB_SCOPE);
        assert_eq!(identity.token_file, PathBuf::from("/t"));

        let mixed = minimal().replace("uriEnv: TARGET_URI}", "uriEnv: TARGET_URI, entra: {clientId: c1}}");
        let config: ReplicatorConfig = serde_saphyr::from_str(&mixed).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("must not set entra"));

        let no_uri = text.replace("  uri: mongodb+srv://c.global.mongocluster.cosmos.azure.com/?tls=true\n", "");
        let config: ReplicatorConfig = serde_saphyr::from_str(&no_uri).unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("entra needs uri"));
    }
}
