//! The `MongoReplication` API (`mongo-replicator.io/v1alpha1`).
//!
//! The CRD schema is generated from these types: doc comments become `kubectl explain`, and the
//! CEL rules attached with `#[x_kube(validation = ...)]` say what the types alone cannot.
//! `crds/mongoreplication.yaml` holds the generated YAML; a test fails when it drifts.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{CustomResourceDefinition, JSONSchemaProps};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::core::{Rule, crd::CustomResourceExt};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every mongo-replicator resource.
pub const GROUP: &str = "mongo-replicator.io";

/// Token scope of Azure DocumentDB (Cosmos DB for MongoDB vCore) in the public cloud.
pub const DOCUMENTDB_SCOPE: &str = "https://ossrdbms-aad.database.windows.net/.default";

/// Replication of MongoDB data from a source endpoint to a target endpoint: a snapshot copy
/// followed by the source's change stream, resumable after any crash.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mongo-replicator.io",
    version = "v1alpha1",
    kind = "MongoReplication",
    plural = "mongoreplications",
    singular = "mongoreplication",
    shortname = "mrep",
    category = "all",
    doc = "A MongoReplication copies the data of a MongoDB source into a MongoDB target and then keeps the target up to date from the source's change stream. Endpoints log in with a connection string from a Secret or with Microsoft Entra workload identity (Azure DocumentDB).",
    namespaced,
    status = "MongoReplicationStatus",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Where the replication is in its life"),
    printcolumn(name = "Source Auth", type_ = "string", json_path = ".spec.source.auth", description = "How the replicator logs in to the source"),
    printcolumn(name = "Target Auth", type_ = "string", json_path = ".spec.target.auth", description = "How the replicator logs in to the target"),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.progress.lagSeconds", description = "Seconds between the newest source change and the newest applied one"),
    printcolumn(name = "Caught Up", type_ = "string", json_path = ".status.conditions[?(@.type==\"CaughtUp\")].status", description = "Whether the lag has stayed low long enough for a cutover"),
    printcolumn(name = "Verified", type_ = "string", json_path = ".status.conditions[?(@.type==\"Verified\")].reason", description = "The last verification's verdict (Equal, TargetDiffers, ...)"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 50")
        .message("metadata.name must be at most 50 characters: the operator derives names of child objects (ServiceAccount, Job, Deployment) from it"),
    validation = Rule::new("!has(self.spec.startAt) || self.spec.mode == 'StreamOnly'")
        .message("spec.startAt applies only to mode: StreamOnly"),
)]
#[serde(rename_all = "camelCase")]
pub struct MongoReplicationSpec {
    /// The MongoDB deployment data is read from (snapshot and change stream).
    pub source: Endpoint,

    /// The MongoDB deployment data is written to. Checkpoints (resume tokens) are stored here too.
    pub target: Endpoint,

    /// Which namespaces (`database.collection`) to replicate and under which names.
    /// When omitted, every user database is replicated under its own name
    /// (`admin`, `config`, `local` and the checkpoint database are never replicated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<NamespaceFilter>,

    /// What to replicate: `SnapshotAndStream` copies existing data and then follows the change
    /// stream; `StreamOnly` follows the change stream only (from now, or from `startAt`);
    /// `SnapshotOnly` copies existing data once and stops.
    #[serde(default)]
    pub mode: ReplicationMode,

    /// Where a `StreamOnly` replication starts when no checkpoint exists yet. Defaults to now.
    /// A saved checkpoint always wins over this, so a restart never goes back in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<StreamStart>,

    /// Stops the replicator (scales it to zero) without losing the checkpoint; setting it back to
    /// false resumes from the checkpoint.
    #[serde(default)]
    pub suspend: bool,

    /// How the replicator pods run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicator: Option<ReplicatorSettings>,

    /// When the replication counts as caught up, ready for a cutover: the `CaughtUp` condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover: Option<Cutover>,

    /// Whether and when the operator proves that the target equals the source
    /// (`mongo-replicator verify` in a Job, while replication runs): the `Verified` condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<VerificationSettings>,
}

/// Verification runs: a Job under the replication's ServiceAccount compares every replicated
/// namespace document by document (and indexes, options), rechecking what changes meanwhile.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VerificationSettings {
    /// `Off` (default); `OnDemand`: a run each time the annotation `mongo-replicator.io/verify`
    /// takes a new value (`kubectl annotate mrep NAME mongo-replicator.io/verify="$(date +%s)"
    /// --overwrite`); `Continuous`: a run every `intervalMinutes`.
    #[serde(default)]
    pub mode: VerificationMode,

    #[doc = concat!("Minutes between two runs in `Continuous` mode. Default ", crate::default_verification_interval_minutes!(), ".")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 10080))]
    pub interval_minutes: Option<i32>,

    /// Most source documents a run reads per second, so the source's load stays what you allow.
    /// Default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000000))]
    pub max_docs_per_second: Option<i32>,
}

/// When verification runs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VerificationMode {
    /// Never.
    #[default]
    Off,
    /// When the annotation `mongo-replicator.io/verify` takes a new value.
    OnDemand,
    /// Every `intervalMinutes`.
    Continuous,
}

/// Cutover readiness: `CaughtUp` is True once the lag has stayed at most `maxLagSeconds` (with
/// writes succeeding) for `sustainSeconds`. Then stop writes to the source, wait until
/// `status.progress.lastAppliedClusterTime` passes the moment they stopped, and switch clients.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Cutover {
    #[doc = concat!("Most seconds of lag that count as caught up. Default ", crate::default_caught_up_lag_seconds!(), ".")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub max_lag_seconds: Option<i32>,

    #[doc = concat!("How long the lag must stay at most `maxLagSeconds` before `CaughtUp` is True. Default ", crate::default_caught_up_sustain_seconds!(), ".")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub sustain_seconds: Option<i32>,
}

impl Cutover {
    /// `sustainSeconds` with its default.
    pub fn sustain(cutover: Option<&Cutover>) -> std::time::Duration {
        let seconds = cutover.and_then(|c| c.sustain_seconds).map_or(crate::default_caught_up_sustain_seconds!(), |s| s.max(0) as u64);
        std::time::Duration::from_secs(seconds)
    }

    /// `maxLagSeconds` with its default.
    pub fn max_lag(cutover: Option<&Cutover>) -> u64 {
        cutover.and_then(|c| c.max_lag_seconds).map_or(crate::default_caught_up_lag_seconds!(), |s| s.max(0) as u64)
    }
}

/// One side of a replication: where it is and how to log in to it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.auth != 'entra' || has(self.entra)")
        .message("auth: entra requires the entra block (clientId and tenantId of the managed identity)"),
    validation = Rule::new("self.auth != 'entra' || has(self.uri)")
        .message("auth: entra requires uri, the cluster's connection string without credentials"),
    validation = Rule::new("self.auth != 'entra' || !has(self.connectionStringSecretRef)")
        .message("auth: entra must not set connectionStringSecretRef: the credentials come from Microsoft Entra"),
    validation = Rule::new("self.auth != 'connectionString' || has(self.connectionStringSecretRef)")
        .message("auth: connectionString requires connectionStringSecretRef, the Secret key that holds the connection string"),
    validation = Rule::new("self.auth != 'connectionString' || !has(self.entra)")
        .message("auth: connectionString must not set entra"),
    validation = Rule::new("self.auth != 'connectionString' || !has(self.uri)")
        .message("auth: connectionString reads the whole connection string from connectionStringSecretRef: remove uri"),
)]
pub struct Endpoint {
    /// How the replicator logs in: `entra` (Microsoft Entra workload identity, MONGODB-OIDC; for
    /// Azure DocumentDB) or `connectionString` (a connection string kept in a Secret, e.g. SCRAM).
    pub auth: AuthMethod,

    /// Connection string without credentials, for `auth: entra`, e.g.
    /// `mongodb+srv://orders.global.mongocluster.cosmos.azure.com/?tls=true`. The replicator adds
    /// `authMechanism=MONGODB-OIDC` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(
        validation = Rule::new(r"self.matches('^mongodb(\\+srv)?://[^/?#]+')")
            .message("uri must be a MongoDB connection string: mongodb://host[:port][,...] or mongodb+srv://host"),
        validation = Rule::new(r"!self.matches('^mongodb(\\+srv)?://[^/?#@]*:[^/?#@]*@')")
            .message("uri must not contain a password: an entra endpoint logs in with Microsoft Entra tokens"),
    )]
    pub uri: Option<String>,

    /// The Microsoft Entra identity the replicator logs in as (`auth: entra`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entra: Option<EntraIdentity>,

    /// The Secret key holding the full connection string, credentials included
    /// (`auth: connectionString`). The Secret must be in the MongoReplication's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_string_secret_ref: Option<SecretKeyRef>,

    /// Extra CA certificates (PEM) trusted for this endpoint's TLS, for servers whose certificate
    /// is not signed by a public CA. The Secret must be in the MongoReplication's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// How an endpoint is logged in to.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// Microsoft Entra workload identity: the pod's service-account token is exchanged for an
    /// Entra access token, which logs in through MONGODB-OIDC.
    #[serde(rename = "entra")]
    Entra,
    /// A connection string (with its credentials) read from a Secret.
    #[serde(rename = "connectionString")]
    ConnectionString,
}

const GUID_PATTERN: &str = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

/// A CEL rule that the string is a GUID; `field` names it in the message.
fn guid_rule(field: &str) -> Rule {
    Rule::new(format!("self.matches('{GUID_PATTERN}')"))
        .message(kube::core::Message::Message(format!("{field} must be a GUID such as 11111111-2222-3333-4444-555555555555")))
}

/// A user-assigned managed identity in Microsoft Entra ID, used through workload identity federation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EntraIdentity {
    /// Client id (application id) of the user-assigned managed identity.
    #[schemars(length(max = 36))]
    #[x_kube(validation = guid_rule("clientId"))]
    pub client_id: String,

    /// Directory (tenant) id of the Microsoft Entra tenant.
    #[schemars(length(max = 36))]
    #[x_kube(validation = guid_rule("tenantId"))]
    pub tenant_id: String,

    /// ARM resource id of the managed identity. When set, the operator creates the federated
    /// identity credential that lets this MongoReplication's service account use it, and removes
    /// it when the MongoReplication is deleted. When omitted, create the credential yourself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new(
        "self.matches('^/subscriptions/[0-9a-fA-F-]{36}/resource[gG]roups/[-\\\\w._()]{1,90}/providers/Microsoft\\\\.ManagedIdentity/userAssignedIdentities/[a-zA-Z0-9][a-zA-Z0-9_-]{2,127}$')"
    ).message("managedIdentityResourceId must look like /subscriptions/<subscription-id>/resourceGroups/<group>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>"))]
    pub managed_identity_resource_id: Option<String>,

    /// When set, the operator registers the identity as a user of this Azure DocumentDB cluster
    /// with the given roles, and removes it when the MongoReplication is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_user: Option<ClusterUser>,

    /// Token scope requested from Microsoft Entra. Defaults to Azure DocumentDB's scope in the
    /// public cloud, `https://ossrdbms-aad.database.windows.net/.default`; set it for other clouds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') && self.endsWith('/.default')")
        .message("scope must be an https resource ending in /.default, e.g. https://ossrdbms-aad.database.windows.net/.default"))]
    pub scope: Option<String>,
}

impl EntraIdentity {
    /// The token scope to request, with the public-cloud default.
    pub fn scope(&self) -> &str {
        self.scope.as_deref().unwrap_or(DOCUMENTDB_SCOPE)
    }
}

/// A Microsoft Entra principal registered as a user of an Azure DocumentDB cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterUser {
    /// ARM resource id of the Azure DocumentDB cluster.
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new(
        "self.matches('^/subscriptions/[0-9a-fA-F-]{36}/resource[gG]roups/[-\\\\w._()]{1,90}/providers/Microsoft\\\\.DocumentDB/mongoClusters/[a-z0-9][a-z0-9-]{1,38}[a-z0-9]$')"
    ).message("clusterResourceId must look like /subscriptions/<subscription-id>/resourceGroups/<group>/providers/Microsoft.DocumentDB/mongoClusters/<name>"))]
    pub cluster_resource_id: String,

    /// Object id of the identity's service principal in Microsoft Entra ID (not its client id):
    /// the cluster user is named after it and tokens carry it as `oid`.
    #[schemars(length(max = 36))]
    #[x_kube(validation = guid_rule("principalId"))]
    pub principal_id: String,

    /// Database roles granted to the user.
    #[schemars(length(min = 1, max = 16))]
    pub roles: Vec<DatabaseRole>,
}

/// A role in a database.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DatabaseRole {
    /// Database the role applies to, e.g. `admin`.
    #[schemars(length(min = 1, max = 63))]
    pub db: String,
    /// Role name, e.g. `root` or `readWriteAnyDatabase`.
    #[schemars(length(min = 1, max = 128))]
    pub role: String,
}

/// A key of a Secret in the MongoReplication's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_secret_key() -> String {
    "uri".to_string()
}

// Database: no `/\. "$<>:|?` (plus `*` as wildcard); collection: anything but `$`, may hold dots.
const NAMESPACE_PATTERN: &str = r#"^[^/\\\\. \"$<>:|?]{1,64}[.][^$]{1,255}$"#;

/// Which namespaces to replicate, and under which names.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceFilter {
    /// Namespaces to replicate, as `database.collection` patterns where `*` matches any run of
    /// characters (`orders.*`, `crm.customers`, `*.events`). Empty means every user namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(validation = namespace_patterns_rule("include"))]
    #[schemars(inner(length(min = 3, max = 320)))]
    pub include: Vec<NamespacePattern>,

    /// Namespaces to leave out, with the same syntax as `include`; exclusion wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(validation = namespace_patterns_rule("exclude"))]
    #[schemars(inner(length(min = 3, max = 320)))]
    pub exclude: Vec<NamespacePattern>,

    /// Renames applied in the target, first match wins. Each `*` in `from` captures what it
    /// matched, and the same-numbered `*` in `to` puts it back (`orders.* → orders_dr.*`).
    /// Applies to data, DDL and indexes alike.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub rename: Vec<RenameRule>,
}

/// A `database.collection` pattern; `*` matches any run of characters.
pub type NamespacePattern = String;

fn namespace_patterns_rule(field: &str) -> Rule {
    Rule::new(format!("self.all(p, p.matches('{NAMESPACE_PATTERN}'))")).message(kube::core::Message::Message(format!(
        "each {field} pattern must be 'database.collection' (a database name without /\\. \"$<>:|? and a collection name without $), with * as wildcard, e.g. orders.* or crm.customers"
    )))
}

/// One rename: namespaces matching `from` are written to `to`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.to.split('*').size() == self.from.split('*').size()")
    .message("rename: to must have as many * wildcards as from"))]
pub struct RenameRule {
    /// Source namespace pattern (`database.collection`, `*` wildcards).
    #[schemars(length(max = 320))]
    #[x_kube(validation = Rule::new(format!("self.matches('{NAMESPACE_PATTERN}')"))
        .message("rename: from must be a 'database.collection' pattern, e.g. orders.*"))]
    pub from: String,

    /// Target namespace (`database.collection`), with a `*` for each `*` of `from`.
    #[schemars(length(max = 320))]
    #[x_kube(validation = Rule::new(format!("self.matches('{NAMESPACE_PATTERN}') && !self.startsWith('admin.') && !self.startsWith('local.') && !self.startsWith('config.')"))
        .message("rename: to must be a valid 'database.collection' namespace outside admin, local and config, e.g. orders_dr.*"))]
    pub to: String,
}

/// What a replication does.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplicationMode {
    /// Copy existing data, then follow the change stream from a point taken before the copy began.
    #[default]
    SnapshotAndStream,
    /// Follow the change stream only.
    StreamOnly,
    /// Copy existing data once, then stop.
    SnapshotOnly,
}

/// Where a `StreamOnly` replication starts. Set exactly one field.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.clusterTime) != has(self.resumeToken)")
    .message("startAt takes exactly one of clusterTime or resumeToken"))]
pub struct StreamStart {
    /// A source cluster time as `<seconds>.<increment>` (e.g. `1767225600.1`); the stream starts at it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{1,10}[.][0-9]{1,10}$')")
        .message("clusterTime must be <seconds>.<increment>, e.g. 1767225600.1"))]
    pub cluster_time: Option<String>,

    /// A resume token's `_data` value (hex) from the source's change stream; the stream starts after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9A-Fa-f]+$')")
        .message("resumeToken must be the hex _data of a change stream resume token"))]
    pub resume_token: Option<String>,
}

/// What to do when the source no longer has the change-stream history a checkpoint needs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HistoryLostPolicy {
    /// Stop with a `Stalled` condition and wait for a person to decide.
    #[default]
    Fail,
    /// Copy the affected namespaces again, then follow the stream from a new start point.
    Resync,
}

/// How the replicator pods run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatorSettings {
    /// Container image of the replicator. Defaults to the operator's own image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Compute resources of the replicator container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    #[doc = concat!("Parallel writers applying changes to the target (per-document order is kept). Default ", crate::default_workers!(), ".")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub workers: Option<i32>,

    #[doc = concat!("Most documents in one write batch. Default ", crate::default_batch_size!(), ".")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub batch_size: Option<i32>,

    /// Log level of the replicator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,

    /// Database in the target where checkpoints (resume tokens, copy progress) are kept.
    #[doc = concat!("Default `", crate::default_checkpoint_database!(), "`. It is never replicated.")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new(r#"self.matches('^[^/\\\\. "$*<>:|?]+$')"#)
        .message("checkpointDatabase must be a database name without /\\. \"$*<>:|?"))]
    pub checkpoint_database: Option<String>,

    /// What to do when the source's change-stream history no longer reaches back to the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_history_lost: Option<HistoryLostPolicy>,
}

/// Log verbosity.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// Normal operation.
    #[default]
    Info,
    /// Details for troubleshooting.
    Debug,
    /// Everything.
    Trace,
}

/// The observed state of a MongoReplication.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MongoReplicationStatus {
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// A one-word summary; the conditions say why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// The latest observations, one per type: `IdentityBound`, `ConnectivityValidated`,
    /// `Replicating`, `Stalled` and `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Figures reported by the replicator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,

    /// The Azure objects the operator created for this replication (and removes when it is
    /// deleted or stops naming them), and when it last found every binding in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureBindings>,
}

/// What the operator did in Azure for one replication: an audit a person can read with
/// `kubectl describe`, and the list cleanup works from.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AzureBindings {
    /// Federated identity credentials and cluster users the operator created. Each is listed
    /// before it is created, so an operator stopped in between leaves a record, never an orphan.
    /// Objects that existed before (adopted) are not listed and are never removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub created: Vec<AzureObject>,
    /// A hash of the bindings last found in place (identities, subject, issuer, clusters, roles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_hash: Option<String>,
    /// When the bindings were last checked in Azure (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<String>,
}

/// One object the operator created in Azure.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AzureObject {
    /// `FederatedIdentityCredential` or `ClusterUser`.
    pub kind: AzureObjectKind,
    /// Its ARM resource id.
    pub id: String,
    /// When the operator set out to create it (RFC 3339).
    pub since: String,
}

/// The kinds of Azure objects the operator creates.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AzureObjectKind {
    /// A federated identity credential of a user-assigned managed identity.
    FederatedIdentityCredential,
    /// A Microsoft Entra user of an Azure DocumentDB cluster.
    ClusterUser,
}

/// A one-word summary of where a replication is.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, nothing done yet.
    Pending,
    /// Binding Azure identities (federated credentials, cluster users).
    Binding,
    /// Proving that both endpoints can be reached and logged in to.
    Validating,
    /// Copying existing data.
    Snapshotting,
    /// Following the change stream.
    Streaming,
    /// Stopped by `spec.suspend`.
    Suspended,
    /// Stopped by an error that needs a person; see the conditions.
    Failed,
}

/// Figures reported by the replicator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Documents copied by the snapshot so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docs_copied: Option<i64>,
    /// Change events applied to the target so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_applied: Option<i64>,
    /// Seconds between the source's newest change and the newest change applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<i64>,
    /// Source cluster time of the newest applied change (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied_cluster_time: Option<String>,
    /// When the checkpoint was last saved in the target (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_saved_at: Option<String>,
    /// What the replicator is doing: `Snapshot` (copying), `Stream` (following the change
    /// stream) or `Done` (a `SnapshotOnly` copy finished).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The hash of the configuration the reporting replicator runs with; `Ready` needs it to be
    /// the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Since when writes to the target have been failing and retried (RFC 3339); absent while
    /// they succeed. Long enough, and the replication is `Stalled` (`CheckpointNotAdvancing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writes_failing_since: Option<String>,
    /// Since when the stream has been caught up (lag at most `spec.cutover.maxLagSeconds`,
    /// writes succeeding; RFC 3339); absent while it is not. Long enough, and `CaughtUp` is True.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caught_up_since: Option<String>,
}

/// The CRD, with descriptions reflowed for `kubectl explain`.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = MongoReplication::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) {
            reflow_descriptions(schema);
        }
    }
    crd
}

/// Doc comments are wrapped for source code; `kubectl explain` wraps again. Joining the lines of
/// each paragraph keeps its output readable.
fn reflow_descriptions(schema: &mut JSONSchemaProps) {
    if let Some(text) = schema.description.as_mut() {
        *text =
            text.split("\n\n").map(|paragraph| paragraph.split('\n').map(str::trim).collect::<Vec<_>>().join(" ")).collect::<Vec<_>>().join("\n\n");
    }
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        reflow_descriptions(child);
    }
    if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
        reflow_descriptions(items);
    }
}

/// The CRD as YAML, exactly as `crds/mongoreplication.yaml` holds it.
pub fn crd_yaml() -> String {
    let crd = crd();
    // Serializing a typed CRD cannot fail: it holds only strings, numbers, maps and lists.
    // Long CEL rules and messages stay on one line: folding them would hide what the apiserver reads.
    let options = serde_saphyr::ser_options! { folded_wrap_chars: 100_000 };
    let yaml = serde_saphyr::to_string_with_options(&crd, options).expect("the CRD serializes to YAML");
    format!("# Generated by `mongo-replicator crd`; do not edit.\n---\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CEL rules, evaluated locally as the apiserver would (kube's `cel` feature), so a rule
    /// mistake shows without the lab.
    #[test]
    fn cel_rules_accept_the_examples_and_refuse_what_cannot_work() {
        // A connection-string source and an Entra target: every rule about either kind has a side to break.
        let (_, base) = examples()
            .into_iter()
            .find(|(_, r)| r.spec.source.auth == AuthMethod::ConnectionString && r.spec.target.auth == AuthMethod::Entra)
            .expect("an example migrating into an entra target");
        for (name, example) in examples() {
            kube::core::cel::validate_cel(&example).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let mut value = serde_json::to_value(&base).unwrap();
        value["metadata"]["name"] = "shop-migration".into();
        type Breakage = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Breakage)> = vec![
            ("must be at most 50 characters", Box::new(|v| v["metadata"]["name"] = "x".repeat(51).into())),
            ("auth: entra requires the entra block", Box::new(|v| drop(v["spec"]["target"].as_object_mut().unwrap().remove("entra")))),
            ("auth: entra requires uri", Box::new(|v| drop(v["spec"]["target"].as_object_mut().unwrap().remove("uri")))),
            ("must not contain a password", Box::new(|v| v["spec"]["target"]["uri"] = "mongodb://u:p@h/?tls=true".into())),
            (
                "requires connectionStringSecretRef",
                Box::new(|v| drop(v["spec"]["source"].as_object_mut().unwrap().remove("connectionStringSecretRef"))),
            ),
            ("must not set entra", Box::new(|v| v["spec"]["source"]["entra"] = v["spec"]["target"]["entra"].clone())),
            ("must be a GUID", Box::new(|v| v["spec"]["target"]["entra"]["clientId"] = "not-a-guid".into())),
            ("spec.startAt applies only to mode: StreamOnly", Box::new(|v| v["spec"]["startAt"] = serde_json::json!({"clusterTime": "1.1"}))),
            ("as many * wildcards", Box::new(|v| v["spec"]["namespaces"]["rename"] = serde_json::json!([{"from": "a.*", "to": "b.c"}]))),
            (
                "outside admin, local and config",
                Box::new(|v| v["spec"]["namespaces"]["rename"] = serde_json::json!([{"from": "a.*", "to": "admin.*"}])),
            ),
            ("database.collection", Box::new(|v| v["spec"]["namespaces"]["include"] = serde_json::json!(["nodot"]))),
        ];
        for (expected, break_it) in cases {
            let mut broken = value.clone();
            break_it(&mut broken);
            let replication: MongoReplication = serde_json::from_value(broken).unwrap();
            let err = kube::core::cel::validate_cel(&replication).expect_err(expected).to_string();
            assert!(err.contains(expected), "expected {expected:?}, got {err}");
        }
    }

    fn examples() -> Vec<(String, MongoReplication)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).expect("examples/ exists").flatten() {
            let text = std::fs::read_to_string(entry.path()).expect("readable example");
            let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).expect("valid YAML");
            for doc in docs.into_iter().filter(|d| d["kind"] == "MongoReplication") {
                let name = entry.file_name().to_string_lossy().into_owned();
                out.push((name, serde_json::from_value(doc).expect("example matches the types")));
            }
        }
        out
    }

    #[test]
    fn examples_deserialize_into_the_types() {
        let examples = examples();
        assert!(examples.len() >= 3);
        let orders = &examples.iter().find(|(f, _)| f == "orders-dr.yaml").expect("orders-dr example").1;
        assert_eq!(orders.spec.source.auth, AuthMethod::Entra);
        assert_eq!(orders.spec.target.auth, AuthMethod::Entra);
        assert_eq!(orders.spec.mode, ReplicationMode::SnapshotAndStream);
        let entra = orders.spec.source.entra.as_ref().expect("entra block");
        assert_eq!(entra.scope(), DOCUMENTDB_SCOPE);
        assert!(entra.cluster_user.is_some() && entra.managed_identity_resource_id.is_some());
        let target = orders.spec.target.entra.as_ref().expect("target entra block");
        assert_ne!(target.client_id, entra.client_id, "source and target log in as different identities");
        let migration = &examples.iter().find(|(f, _)| f == "atlas-to-documentdb.yaml").expect("migration example").1;
        assert_eq!((migration.spec.source.auth, migration.spec.target.auth), (AuthMethod::ConnectionString, AuthMethod::Entra));
        let copy = &examples.iter().find(|(f, _)| f == "shop-staging-copy.yaml").expect("filtered and renamed example").1;
        let namespaces = copy.spec.namespaces.as_ref().expect("namespaces");
        assert!(!namespaces.include.is_empty() && !namespaces.exclude.is_empty() && !namespaces.rename.is_empty());
    }

    #[test]
    fn omitted_fields_take_their_defaults() {
        let spec: MongoReplicationSpec = serde_json::from_value(serde_json::json!({
            "source": {"auth": "connectionString", "connectionStringSecretRef": {"name": "s"}},
            "target": {"auth": "connectionString", "connectionStringSecretRef": {"name": "t", "key": "target"}}
        }))
        .expect("minimal spec");
        assert_eq!(spec.mode, ReplicationMode::SnapshotAndStream);
        assert!(!spec.suspend);
        assert_eq!(spec.source.connection_string_secret_ref.expect("ref").key, "uri");
        assert_eq!(spec.target.connection_string_secret_ref.expect("ref").key, "target");
    }

    #[test]
    fn crd_yaml_has_the_api_users_expect() {
        let yaml = crd_yaml();
        let crd: serde_json::Value =
            serde_saphyr::from_multiple::<serde_json::Value>(&yaml).expect("valid YAML").into_iter().find(|d| !d.is_null()).expect("one document");
        assert_eq!(crd["metadata"]["name"], "mongoreplications.mongo-replicator.io");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "mrep");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert!(version["subresources"]["status"].is_object());
        let conditions = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(conditions["x-kubernetes-list-map-keys"][0], "type");
    }
}
