//! The children of a `MongoReplication`, built by pure functions: a ServiceAccount (with the
//! workload identity annotations when an endpoint uses Entra), a ConfigMap holding the
//! replicator's configuration file, a Role and RoleBinding that let the replicator patch only its
//! own object's status, the validation Job, and the replicator Deployment. Every child is owned
//! by the MongoReplication, so deleting it deletes them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretVolumeSource, SecurityContext, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use super::config::{CONFIG_DIR, CONFIG_KEY, ENTRA_CA_KEY, EntraDefaults, secret_dir};
use crate::auth::EndpointRole;
use crate::crd::{AuthMethod, Endpoint, GROUP, MongoReplication};
use crate::replicator::config::{DEFAULT_METRICS_PORT, DEFAULT_SHUTDOWN_TIMEOUT_SECONDS};

/// The field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "mongo-replicator-operator";
/// Pod-template annotation: a hash of the configuration, the referenced Secrets and the image.
pub const CONFIG_HASH_ANNOTATION: &str = "mongo-replicator.io/config-hash";
/// Label naming the MongoReplication a child belongs to.
pub const REPLICATION_LABEL: &str = "mongo-replicator.io/replication";
/// The workload identity webhook mutates pods carrying this label (FACTS §4).
const WORKLOAD_IDENTITY_LABEL: &str = "azure.workload.identity/use";
/// The uid of the image's non-root user (the Dockerfile's and the lab image's).
const NONROOT: i64 = 65532;
/// How long one validation may run before the Job fails.
const VALIDATION_DEADLINE_SECONDS: i64 = 300;

/// What the operator is configured with, that shapes its children.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildSettings {
    /// Image of replicator and validation pods when the spec names none.
    pub replicator_image: String,
    pub image_pull_policy: String,
    /// Microsoft Entra settings for every `auth: entra` endpoint.
    pub entra: EntraDefaults,
}

/// Names of the children of the MongoReplication `name`. The API keeps names at most 50
/// characters, so each fits the 63 characters of a label value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// ServiceAccount, ConfigMap, Deployment, Role and RoleBinding.
    pub replicator: String,
    /// The validation Job of one configuration hash.
    pub job: String,
}

impl Names {
    pub fn of(name: &str, hash: &str) -> Self {
        Self { replicator: format!("{name}-replicator"), job: format!("{name}-check-{}", &hash[..hash.len().min(6)]) }
    }
}

/// Everything the operator applies for one MongoReplication.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    pub service_account: ServiceAccount,
    pub config_map: ConfigMap,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub job: Job,
    pub deployment: Deployment,
    /// `mongo-replicator verify` under the replication's ServiceAccount, when a run is wanted.
    pub verification: Option<Job>,
}

/// What the children are built from.
pub struct Inputs<'a> {
    pub replication: &'a MongoReplication,
    /// The replicator's configuration file, as YAML.
    pub config_yaml: &'a str,
    /// [`config_hash`] of this configuration.
    pub hash: &'a str,
    pub settings: &'a ChildSettings,
    /// Whether the replicator runs: validated for this hash and not suspended.
    pub run_replicator: bool,
    /// The verification Job to build, when a run is wanted: its name.
    pub verification_job: Option<&'a str>,
}

/// A short hex hash of the configuration file, the data of the referenced Secrets and the
/// image: any change to one of them re-validates and rolls the replicator.
pub fn config_hash(config_yaml: &str, secrets: &[(&str, &BTreeMap<String, Vec<u8>>)], image: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut feed = |bytes: &[u8]| {
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    };
    feed(config_yaml.as_bytes());
    feed(image.as_bytes());
    for (name, data) in secrets {
        feed(name.as_bytes());
        for (key, value) in *data {
            feed(key.as_bytes());
            feed(value);
        }
    }
    ctx.finish().as_ref().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The labels of every child of `name`.
pub fn labels(name: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "mongo-replicator".to_string()),
        ("app.kubernetes.io/instance".to_string(), name.to_string()),
        ("app.kubernetes.io/component".to_string(), component.to_string()),
        ("app.kubernetes.io/managed-by".to_string(), FIELD_MANAGER.to_string()),
        (REPLICATION_LABEL.to_string(), name.to_string()),
    ])
}

/// Whether an endpoint logs in with Microsoft Entra.
fn uses_entra(replication: &MongoReplication) -> bool {
    [&replication.spec.source, &replication.spec.target].iter().any(|e| e.auth == AuthMethod::Entra)
}

/// The image replicator and validation pods run.
pub fn image(replication: &MongoReplication, settings: &ChildSettings) -> String {
    replication.spec.replicator.as_ref().and_then(|r| r.image.clone()).unwrap_or_else(|| settings.replicator_image.clone())
}

pub fn build(inputs: &Inputs<'_>) -> Children {
    let replication = inputs.replication;
    let name = replication.metadata.name.clone().unwrap_or_default();
    let names = Names::of(&name, inputs.hash);
    let meta = |child: &str, component: &str| ObjectMeta {
        name: Some(child.to_string()),
        namespace: replication.metadata.namespace.clone(),
        labels: Some(labels(&name, component)),
        owner_references: owner(replication).map(|o| vec![o]),
        ..Default::default()
    };

    let service_account = ServiceAccount {
        metadata: ObjectMeta { annotations: workload_identity_annotations(replication), ..meta(&names.replicator, "replicator") },
        // The validation Job needs no API access; the replicator mounts a token itself.
        automount_service_account_token: Some(false),
        ..Default::default()
    };
    let config_map = ConfigMap {
        metadata: meta(&names.replicator, "replicator"),
        data: Some(
            [(CONFIG_KEY, Some(inputs.config_yaml)), (ENTRA_CA_KEY, inputs.settings.entra.ca_bundle.as_deref())]
                .into_iter()
                .filter_map(|(k, v)| Some((k.to_string(), v?.to_string())))
                .collect(),
        ),
        ..Default::default()
    };
    let role = Role {
        metadata: meta(&names.replicator, "replicator"),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![GROUP.to_string()]),
            resources: Some(vec!["mongoreplications/status".to_string()]),
            resource_names: Some(vec![name.clone()]),
            verbs: vec!["get".to_string(), "patch".to_string()],
            ..Default::default()
        }]),
    };
    let role_binding = RoleBinding {
        metadata: meta(&names.replicator, "replicator"),
        role_ref: RoleRef { api_group: Some("rbac.authorization.k8s.io".into()), kind: "Role".into(), name: names.replicator.clone() },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: names.replicator.clone(),
            namespace: replication.metadata.namespace.clone(),
            ..Default::default()
        }]),
    };

    let image = image(replication, inputs.settings);
    let log_level = replication
        .spec
        .replicator
        .as_ref()
        .and_then(|r| r.log_level)
        .map(|l| serde_json::to_value(l).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default())
        .unwrap_or_else(|| "info".into());
    let pod = |component: &str, args: Vec<String>, extra: PodExtras| {
        let mut labels = labels(&name, component);
        if uses_entra(replication) {
            labels.insert(WORKLOAD_IDENTITY_LABEL.to_string(), "true".to_string());
        }
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(labels),
                annotations: Some(BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_string(), inputs.hash.to_string())])),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                service_account_name: Some(names.replicator.clone()),
                automount_service_account_token: Some(extra.api_access),
                restart_policy: Some(extra.restart_policy.to_string()),
                termination_grace_period_seconds: extra.grace_seconds,
                security_context: Some(PodSecurityContext {
                    run_as_non_root: Some(true),
                    run_as_user: Some(NONROOT),
                    run_as_group: Some(NONROOT),
                    fs_group: Some(NONROOT),
                    seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
                    ..Default::default()
                }),
                containers: vec![Container {
                    name: component.to_string(),
                    image: Some(image.clone()),
                    image_pull_policy: Some(inputs.settings.image_pull_policy.clone()),
                    args: Some(args),
                    env: Some(extra.env),
                    ports: extra.ports,
                    readiness_probe: extra.readiness,
                    liveness_probe: extra.liveness,
                    resources: replication.spec.replicator.as_ref().and_then(|r| r.resources.clone()),
                    security_context: Some(SecurityContext {
                        allow_privilege_escalation: Some(false),
                        read_only_root_filesystem: Some(true),
                        run_as_non_root: Some(true),
                        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
                        ..Default::default()
                    }),
                    volume_mounts: Some(volume_mounts(replication)),
                    termination_message_policy: Some("FallbackToLogsOnError".into()),
                    ..Default::default()
                }],
                volumes: Some(volumes(replication, &names.replicator)),
                ..Default::default()
            }),
        }
    };

    let config_path = format!("{CONFIG_DIR}/{CONFIG_KEY}");
    let job = Job {
        metadata: meta(&names.job, "validation"),
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(VALIDATION_DEADLINE_SECONDS),
            template: pod(
                "validation",
                vec!["validate".into(), "--config".into(), config_path.clone(), "--output".into(), "json".into()],
                PodExtras { restart_policy: "Never", api_access: false, env: Vec::new(), ..PodExtras::default() },
            ),
            ..Default::default()
        }),
        status: None,
    };

    let verification = inputs.verification_job.map(|job_name| {
        let mut args = vec!["verify".to_string(), "--config".into(), config_path.clone(), "--output".into(), "json".into()];
        let rate = replication.spec.verification.as_ref().and_then(|v| v.max_docs_per_second);
        if let Some(rate) = rate {
            args.extend(["--max-docs-per-second".to_string(), rate.to_string()]);
        }
        Job {
            metadata: meta(job_name, "verification"),
            spec: Some(JobSpec {
                backoff_limit: Some(0),
                active_deadline_seconds: Some(super::verification::DEADLINE_SECONDS),
                template: pod(
                    "verification",
                    args,
                    PodExtras { restart_policy: "Never", api_access: false, env: Vec::new(), ..PodExtras::default() },
                ),
                ..Default::default()
            }),
            status: None,
        }
    });

    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction { path: Some(path.into()), port: IntOrString::String("metrics".into()), ..Default::default() }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let selector =
        BTreeMap::from([(REPLICATION_LABEL.to_string(), name.clone()), ("app.kubernetes.io/component".to_string(), "replicator".to_string())]);
    let deployment = Deployment {
        metadata: meta(&names.replicator, "replicator"),
        spec: DeploymentSpec {
            replicas: Some(i32::from(inputs.run_replicator)),
            // Never two writers: the old pod is gone before the new one starts.
            strategy: Some(DeploymentStrategy { type_: Some("Recreate".into()), rolling_update: None }),
            selector: LabelSelector { match_labels: Some(selector), ..Default::default() },
            template: pod(
                "replicator",
                vec!["replicate".into(), "--config".into(), config_path, "--log-level".into(), log_level],
                PodExtras {
                    restart_policy: "Always",
                    api_access: true,
                    env: vec![EnvVar {
                        name: "MREP_CONFIG_HASH".into(),
                        value_from: Some(EnvVarSource {
                            field_ref: Some(ObjectFieldSelector {
                                field_path: format!("metadata.annotations['{CONFIG_HASH_ANNOTATION}']"),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ports: Some(vec![ContainerPort {
                        name: Some("metrics".into()),
                        container_port: i32::from(DEFAULT_METRICS_PORT),
                        ..Default::default()
                    }]),
                    readiness: Some(probe("/readyz", 5, 3)),
                    liveness: Some(probe("/healthz", 10, 6)),
                    grace_seconds: Some(DEFAULT_SHUTDOWN_TIMEOUT_SECONDS as i64 + 10),
                },
            ),
            ..Default::default()
        },
        status: None,
    };
    Children { service_account, config_map, role, role_binding, job, deployment, verification }
}

/// What differs between the validation pod and the replicator pod.
#[derive(Default)]
struct PodExtras {
    restart_policy: &'static str,
    api_access: bool,
    env: Vec<EnvVar>,
    ports: Option<Vec<ContainerPort>>,
    readiness: Option<Probe>,
    liveness: Option<Probe>,
    grace_seconds: Option<i64>,
}

fn owner(replication: &MongoReplication) -> Option<OwnerReference> {
    replication.controller_owner_ref(&())
}

/// The workload identity webhook's ServiceAccount annotations (FACTS §4). With two identities
/// the source's is the default; each endpoint names its own client id in the config file.
fn workload_identity_annotations(replication: &MongoReplication) -> Option<BTreeMap<String, String>> {
    let identity = [&replication.spec.source, &replication.spec.target].into_iter().find_map(|e| e.entra.as_ref())?;
    Some(BTreeMap::from([
        ("azure.workload.identity/client-id".to_string(), identity.client_id.clone()),
        ("azure.workload.identity/tenant-id".to_string(), identity.tenant_id.clone()),
    ]))
}

/// The Secrets an endpoint mounts: `(volume, secret, key, directory)`.
fn endpoint_secrets(endpoint: &Endpoint, role: EndpointRole) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    if let Some(secret) = &endpoint.connection_string_secret_ref {
        out.push((format!("{role}-uri"), secret.name.clone(), secret.key.clone(), secret_dir(role, false).display().to_string()));
    }
    if let Some(secret) = &endpoint.ca_secret_ref {
        out.push((format!("{role}-ca"), secret.name.clone(), secret.key.clone(), secret_dir(role, true).display().to_string()));
    }
    out
}

fn all_secrets(replication: &MongoReplication) -> Vec<(String, String, String, String)> {
    let mut out = endpoint_secrets(&replication.spec.source, EndpointRole::Source);
    out.extend(endpoint_secrets(&replication.spec.target, EndpointRole::Target));
    out
}

/// The names of the Secrets a replication reads, each once.
pub fn referenced_secrets(replication: &MongoReplication) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = all_secrets(replication).into_iter().map(|(_, secret, key, _)| (secret, key)).collect();
    out.sort();
    out.dedup();
    out
}

fn volumes(replication: &MongoReplication, config_map: &str) -> Vec<Volume> {
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource { name: config_map.to_string(), ..Default::default() }),
        ..Default::default()
    }];
    for (volume, secret, key, _) in all_secrets(replication) {
        volumes.push(Volume {
            name: volume,
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret),
                items: Some(vec![KeyToPath { key: key.clone(), path: key, ..Default::default() }]),
                // Readable by the pod's group (fsGroup), nobody else.
                default_mode: Some(0o440),
                optional: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    volumes
}

fn volume_mounts(replication: &MongoReplication) -> Vec<VolumeMount> {
    let mut mounts = vec![VolumeMount { name: "config".into(), mount_path: CONFIG_DIR.into(), read_only: Some(true), ..Default::default() }];
    for (volume, _, _, dir) in all_secrets(replication) {
        mounts.push(VolumeMount { name: volume, mount_path: dir, read_only: Some(true), ..Default::default() });
    }
    mounts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replication(yaml: &str) -> MongoReplication {
        let mut r: MongoReplication = serde_saphyr::from_str(yaml).unwrap();
        r.metadata.uid = Some("0000-1111".into());
        r
    }

    const ENTRA_TO_SECRET: &str = "apiVersion: mongo-replicator.io/v1alpha1
kind: MongoReplication
metadata: {name: orders-dr, namespace: data}
spec:
  source:
    auth: entra
    uri: mongodb+srv://src.example/?tls=true
    entra: {clientId: 11111111-1111-1111-1111-111111111111, tenantId: 22222222-2222-2222-2222-222222222222}
  target:
    auth: connectionString
    connectionStringSecretRef: {name: target-conn, key: uri}
    caSecretRef: {name: target-ca, key: ca.crt}
";

    fn settings() -> ChildSettings {
        ChildSettings { replicator_image: "mongo-replicator:lab".into(), image_pull_policy: "IfNotPresent".into(), entra: EntraDefaults::default() }
    }

    fn children(r: &MongoReplication, run: bool) -> Children {
        build(&Inputs {
            replication: r,
            config_yaml: "version: 1\n",
            hash: "abcdef0123456789",
            settings: &settings(),
            run_replicator: run,
            verification_job: Some("orders-dr-verify-abc123"),
        })
    }

    #[test]
    fn children_are_owned_labelled_and_named_from_the_replication() {
        let r = replication(ENTRA_TO_SECRET);
        let c = children(&r, true);
        assert_eq!(c.deployment.metadata.name.as_deref(), Some("orders-dr-replicator"));
        assert_eq!(c.job.metadata.name.as_deref(), Some("orders-dr-check-abcdef"));
        for meta in [&c.service_account.metadata, &c.config_map.metadata, &c.role.metadata, &c.job.metadata, &c.deployment.metadata] {
            let owner = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("MongoReplication", "orders-dr", Some(true)));
            assert_eq!(meta.labels.as_ref().unwrap()[REPLICATION_LABEL], "orders-dr");
            assert_eq!(meta.namespace.as_deref(), Some("data"));
        }
        let long = "x".repeat(50);
        assert!(Names::of(&long, "abcdef0123").job.len() <= 63);
    }

    #[test]
    fn entra_endpoints_get_the_workload_identity_annotations_and_pod_label() {
        let r = replication(ENTRA_TO_SECRET);
        let c = children(&r, true);
        let annotations = c.service_account.metadata.annotations.unwrap();
        assert_eq!(annotations["azure.workload.identity/client-id"], "11111111-1111-1111-1111-111111111111");
        let template = c.deployment.spec.template;
        assert_eq!(template.metadata.unwrap().labels.unwrap()[WORKLOAD_IDENTITY_LABEL], "true");

        let plain = replication(&ENTRA_TO_SECRET.replace(
            "    auth: entra\n    uri: mongodb+srv://src.example/?tls=true\n    entra: {clientId: 11111111-1111-1111-1111-111111111111, tenantId: 22222222-2222-2222-2222-222222222222}\n",
            "    auth: connectionString\n    connectionStringSecretRef: {name: source-conn}\n",
        ));
        let c = children(&plain, true);
        assert!(c.service_account.metadata.annotations.is_none());
        assert!(!c.deployment.spec.template.metadata.unwrap().labels.unwrap().contains_key(WORKLOAD_IDENTITY_LABEL));
    }

    #[test]
    fn pods_run_locked_down_with_the_secrets_mounted_where_the_config_names_them() {
        let r = replication(ENTRA_TO_SECRET);
        let c = children(&r, true);
        let deployment = c.deployment.spec;
        assert_eq!(deployment.replicas, Some(1));
        assert_eq!(deployment.strategy.unwrap().type_.as_deref(), Some("Recreate"));
        let pod = deployment.template.spec.unwrap();
        let container = &pod.containers[0];
        let security = container.security_context.as_ref().unwrap();
        assert_eq!((security.read_only_root_filesystem, security.allow_privilege_escalation), (Some(true), Some(false)));
        assert_eq!(security.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(pod.security_context.as_ref().unwrap().run_as_user, Some(NONROOT));
        let mounts: Vec<_> = container.volume_mounts.as_ref().unwrap().iter().map(|m| m.mount_path.as_str()).collect();
        assert_eq!(mounts, ["/etc/mongo-replicator", "/var/run/secrets/mongo-replicator/target", "/var/run/secrets/mongo-replicator/target-ca"]);
        assert_eq!(referenced_secrets(&r), [("target-ca".to_string(), "ca.crt".to_string()), ("target-conn".to_string(), "uri".to_string())]);
        let job = c.job.spec.unwrap();
        assert_eq!(job.backoff_limit, Some(0));
        let job_pod = job.template.spec.unwrap();
        assert_eq!(job_pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(job_pod.containers[0].args.as_ref().unwrap()[0], "validate");
        assert_eq!(children(&r, false).deployment.spec.replicas, Some(0), "not validated or suspended: scaled to zero");
    }

    #[test]
    fn the_hash_changes_with_the_config_a_secret_or_the_image() {
        let secret = BTreeMap::from([("uri".to_string(), b"mongodb://a".to_vec())]);
        let rotated = BTreeMap::from([("uri".to_string(), b"mongodb://b".to_vec())]);
        let base = config_hash("version: 1\n", &[("conn", &secret)], "img:1");
        assert_eq!(base.len(), 16);
        assert_eq!(base, config_hash("version: 1\n", &[("conn", &secret)], "img:1"));
        assert_ne!(base, config_hash("version: 1\nworkers: 2\n", &[("conn", &secret)], "img:1"));
        assert_ne!(base, config_hash("version: 1\n", &[("conn", &rotated)], "img:1"));
        assert_ne!(base, config_hash("version: 1\n", &[("conn", &secret)], "img:2"));
    }
}
