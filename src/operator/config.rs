//! From a `MongoReplication` to the replicator's configuration file (the ConfigMap child): pure,
//! no I/O. Secrets never enter it: connection strings and CA certificates are mounted from the
//! referenced Secrets and named here by path; Entra identities by client and tenant id, with
//! the token file left to the workload identity webhook's `AZURE_FEDERATED_TOKEN_FILE`.

use std::path::PathBuf;

use crate::auth::{EndpointConfig, EndpointRole, EntraSettings, Login, UriSource};
use crate::crd::{self, AuthMethod, Endpoint, MongoReplication};
use crate::replicator::config::{Mode, NamespaceRules, OnHistoryLost, Rename, ReplicatorConfig, StartAt, StatusReport};

/// Where the replicator pod mounts the Secrets of an endpoint.
pub const SECRETS_DIR: &str = "/var/run/secrets/mongo-replicator";
/// Where the replicator pod mounts its configuration file (from the ConfigMap).
pub const CONFIG_DIR: &str = "/etc/mongo-replicator";
/// The key of the configuration file in the ConfigMap.
pub const CONFIG_KEY: &str = "replicator.yaml";
/// The key, in the same ConfigMap, of extra CA certificates for the Microsoft Entra authority.
pub const ENTRA_CA_KEY: &str = "entra-ca.crt";

/// How the operator is set up for Microsoft Entra, for every `auth: entra` endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntraDefaults {
    /// The authority (sovereign clouds); unset: the webhook's `AZURE_AUTHORITY_HOST`, else the public cloud.
    pub authority_host: Option<String>,
    /// Extra CA certificates (PEM) to trust for the authority (private endpoints, private clouds).
    pub ca_bundle: Option<String>,
}

/// Mount directory of an endpoint's connection-string Secret (`<dir>/<role>`), and of its CA
/// Secret (`<dir>/<role>-ca`).
pub fn secret_dir(role: EndpointRole, ca: bool) -> PathBuf {
    PathBuf::from(SECRETS_DIR).join(if ca { format!("{role}-ca") } else { role.to_string() })
}

/// The configuration the replicator of `replication` runs with. Its checkpoint name is
/// `<namespace>/<name>`, unique in a target shared by several replications.
pub fn replicator_config(replication: &MongoReplication, entra: &EntraDefaults) -> ReplicatorConfig {
    let namespace = replication.metadata.namespace.as_deref().unwrap_or("default");
    let name = replication.metadata.name.as_deref().unwrap_or_default();
    let spec = &replication.spec;
    let mut config = ReplicatorConfig::new(
        &format!("{namespace}/{name}"),
        endpoint(&spec.source, EndpointRole::Source, entra),
        endpoint(&spec.target, EndpointRole::Target, entra),
    );
    config.status_report = Some(StatusReport { namespace: namespace.to_string(), name: name.to_string() });
    config.namespaces = spec.namespaces.as_ref().map(namespace_rules);
    config.mode = mode(spec.mode);
    config.start_at = spec.start_at.as_ref().and_then(start_at);
    if let Some(settings) = &spec.replicator {
        if let Some(workers) = settings.workers {
            config.workers = workers.max(1) as usize;
        }
        if let Some(batch_size) = settings.batch_size {
            config.batch_size = batch_size.max(1) as usize;
        }
        if let Some(database) = &settings.checkpoint_database {
            config.checkpoint_database = database.clone();
        }
        if let Some(policy) = settings.on_history_lost {
            config.on_history_lost = match policy {
                crd::HistoryLostPolicy::Fail => OnHistoryLost::Fail,
                crd::HistoryLostPolicy::Resync => OnHistoryLost::Resync,
            };
        }
    }
    if let Some(max_lag) = spec.cutover.as_ref().and_then(|c| c.max_lag_seconds) {
        config.caught_up_lag_seconds = max_lag.max(0) as u64;
    }
    config
}

fn namespace_rules(filter: &crd::NamespaceFilter) -> NamespaceRules {
    NamespaceRules {
        include: filter.include.clone(),
        exclude: filter.exclude.clone(),
        rename: filter.rename.iter().map(|r| Rename { from: r.from.clone(), to: r.to.clone() }).collect(),
    }
}

fn mode(mode: crd::ReplicationMode) -> Mode {
    match mode {
        crd::ReplicationMode::SnapshotAndStream => Mode::SnapshotAndStream,
        crd::ReplicationMode::StreamOnly => Mode::StreamOnly,
        crd::ReplicationMode::SnapshotOnly => Mode::SnapshotOnly,
    }
}

/// The API's rules make exactly one of the two fields set.
fn start_at(start: &crd::StreamStart) -> Option<StartAt> {
    StartAt::from_parts(start.cluster_time.as_ref(), start.resume_token.as_ref())
}

fn endpoint(endpoint: &Endpoint, role: EndpointRole, entra: &EntraDefaults) -> EndpointConfig {
    let ca_file = endpoint.ca_secret_ref.as_ref().map(|r| secret_dir(role, true).join(&r.key));
    let login = match endpoint.auth {
        AuthMethod::ConnectionString => {
            let key = endpoint.connection_string_secret_ref.as_ref().map_or("uri", |r| r.key.as_str());
            Login::ConnectionString(UriSource::File(secret_dir(role, false).join(key)))
        }
        AuthMethod::Entra => Login::Entra {
            uri: endpoint.uri.clone().unwrap_or_default(),
            // Source and target may use different identities: name each one; the pod's single
            // projected token (AZURE_FEDERATED_TOKEN_FILE) serves both.
            identity: endpoint
                .entra
                .as_ref()
                .map(|identity| EntraSettings {
                    client_id: Some(identity.client_id.clone()),
                    tenant_id: Some(identity.tenant_id.clone()),
                    scope: identity.scope.clone(),
                    authority_host: entra.authority_host.clone(),
                    ca_file: entra.ca_bundle.as_ref().map(|_| PathBuf::from(CONFIG_DIR).join(ENTRA_CA_KEY)),
                    ..Default::default()
                })
                .unwrap_or_default(),
        },
    };
    EndpointConfig { login, ca_file }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ReplicationMode;

    fn examples() -> Vec<MongoReplication> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
            for document in documents.into_iter().filter(|d| d["kind"] == "MongoReplication") {
                let mut replication: MongoReplication = serde_json::from_value(document).unwrap();
                replication.metadata.namespace.get_or_insert_with(|| "data".into());
                found.push(replication);
            }
        }
        assert!(found.len() >= 3, "examples: {}", found.len());
        found
    }

    #[test]
    fn every_example_becomes_a_valid_replicator_config_without_secrets() {
        for replication in examples() {
            let config = replicator_config(&replication, &EntraDefaults::default());
            config.validate().unwrap_or_else(|e| panic!("{:?}: {e}", replication.metadata.name));
            let yaml = serde_saphyr::to_string(&config).unwrap();
            let back: ReplicatorConfig = serde_saphyr::from_str(&yaml).unwrap();
            assert!(yaml.starts_with("version: 1\n"), "{yaml}");
            assert_eq!(back, config, "the file reads back as written");
            assert!(!yaml.contains("password") && !yaml.contains('@'), "{yaml}");
            assert!(config.name.contains('/'));
        }
    }

    #[test]
    fn endpoints_name_mounted_secrets_and_entra_identities() {
        let replication = examples().into_iter().find(|r| r.spec.source.auth == AuthMethod::Entra).expect("an Entra example");
        let config = replicator_config(&replication, &EntraDefaults::default());
        let Login::Entra { identity: entra, .. } = &config.source.login else { panic!("an entra source") };
        assert_eq!(entra.client_id.as_deref(), replication.spec.source.entra.as_ref().map(|e| e.client_id.as_str()));
        assert!(entra.token_file.is_none(), "the webhook's AZURE_FEDERATED_TOKEN_FILE is used");
        if let Some(secret) = &replication.spec.target.connection_string_secret_ref {
            let expected = PathBuf::from(format!("{SECRETS_DIR}/target/{}", secret.key));
            assert_eq!(config.target.login, Login::ConnectionString(UriSource::File(expected)));
        }
        if replication.spec.mode == ReplicationMode::StreamOnly {
            assert_eq!(config.start_at, replication.spec.start_at.as_ref().and_then(start_at));
        }
    }
}
