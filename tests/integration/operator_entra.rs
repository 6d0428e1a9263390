//! The examples of `examples/` through the operator on the lab's real node, Microsoft Entra
//! included: each example is applied as written, with only its endpoints (URIs, client and
//! tenant ids, ARM ids, connection strings) pointed at the lab, and reaches `Ready=True` with the
//! data in the target checked by the workload comparer. The pods get their identity from the
//! real workload identity webhook and exchange the projected token at the Entra double; DocumentDB
//! clusters are SecantusDB servers behind the lab's MONGODB-OIDC gateway. The operator has its
//! own workload identity (as the chart gives it) and binds what an example names
//! (`managedIdentityResourceId`, `clusterUser`) through the ARM double; for the examples that
//! leave them out, the tests register the federated credentials and cluster users as a user
//! would, for the subject `system:serviceaccount:<namespace>:<name>-replicator`.
//!
//! Then each Entra failure the validator knows, through the operator: its own condition reason,
//! a message a person can act on, never a token or a trace id.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, ServiceAccount};
use kube::api::{Api, ListParams, LogParams};
use mongo_replicator::crd::{MongoReplication, Phase};
use mongo_replicator::operator::config::{CONFIG_DIR, ENTRA_CA_KEY};
use mongo_replicator_lab::azure::{AzureLab, LabIdentity, PodIdentity};
use mongo_replicator_lab::entra::{EntraOptions, TOKEN_EXCHANGE_AUDIENCE};
use mongo_replicator_lab::gateway::OidcGateway;
use mongo_replicator_lab::node::{NODE_ADDRESS, NodeLab, Relay};
use mongo_replicator_lab::workload::{self, WorkloadSpec};
use mongo_replicator_lab::{ScramUser, SecantusOptions, SecantusServer};
use serde_json::{Value, json};

use crate::operator::{Operator, apply, condition, in_pod, put_secret, wait_condition};
use crate::support::{eventually, install_crd, yaml_documents};

const REPLICATOR_BIN: &str = env!("CARGO_BIN_EXE_mongo-replicator");

/// The Entra and ARM doubles, reachable from pods on the node's address.
pub(crate) struct EntraLab {
    pub(crate) azure: AzureLab,
    _relay: Relay,
}

/// An Azure DocumentDB cluster of the lab: SecantusDB behind a login gateway that pods reach.
pub(crate) struct Cluster {
    pub(crate) server: SecantusServer,
    pub(crate) gateway: OidcGateway,
    pub(crate) id: String,
    _relay: Relay,
}

impl Cluster {
    /// The cluster's connection string as a pod uses it: no credentials; the gateway's certificate
    /// comes from the lab's Azure CA, which the operator hands every Entra pod (`MREP_ENTRA_CA_FILE`).
    fn uri_in_pod(&self) -> String {
        format!("mongodb://{NODE_ADDRESS}:{}/?directConnection=true&tls=true&tlsCAFile={CONFIG_DIR}/{ENTRA_CA_KEY}", self.gateway.port())
    }
}

/// The ServiceAccount the operator runs as (the chart's default name).
pub(crate) const OPERATOR_SERVICE_ACCOUNT: &str = "mongo-replicator-operator";

impl EntraLab {
    pub(crate) async fn start(node: &NodeLab) -> Result<Self> {
        let azure = AzureLab::start_with_ips(node.kube(), EntraOptions::default(), &[NODE_ADDRESS.into()]).await?;
        let relay = Relay::start(azure.entra.port()).await?;
        Ok(Self { azure, _relay: relay })
    }

    /// The operator, set up as on a cluster whose pods reach Entra through a private authority
    /// (the webhook's `AZURE_AUTHORITY_HOST` names the public cloud).
    async fn operator(&self, node: &NodeLab, ns: &str) -> Result<Operator> {
        Ok(self.operator_with_identity(node, ns, &[]).await?.0)
    }

    /// The operator with its own Azure identity, as `azureWorkloadIdentity` of the chart gives
    /// it (see [`EntraLab::operator_env`]), and `env` on top.
    pub(crate) async fn operator_with_identity(&self, node: &NodeLab, ns: &str, env: &[(&str, &str)]) -> Result<(Operator, LabIdentity)> {
        let (mut all, identity) = self.operator_env(node, ns).await?;
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let refs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Ok((Operator::start_with_env(node, ns, &refs).await?, identity))
    }

    /// What an operator process needs to act as its own Azure identity: a managed identity
    /// trusting the operator's ServiceAccount (created once by an administrator, long before),
    /// the projected token the webhook would mount, and where ARM and Entra are.
    pub(crate) async fn operator_env(&self, node: &NodeLab, ns: &str) -> Result<(Vec<(String, String)>, LabIdentity)> {
        let kube = node.kube();
        let client = kube.client().await?;
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": OPERATOR_SERVICE_ACCOUNT}}))?;
        let sas = Api::<ServiceAccount>::namespaced(client, ns);
        if sas.get_opt(OPERATOR_SERVICE_ACCOUNT).await?.is_none() {
            sas.create(&Default::default(), &sa).await?;
        }
        let identity = self.identity("mongo-replicator-operator");
        let subject = format!("system:serviceaccount:{ns}:{OPERATOR_SERVICE_ACCOUNT}");
        self.azure.add_federated_credential(&identity, "operator", kube.issuer(), &subject, TOKEN_EXCHANGE_AUDIENCE).await?;
        self.azure.arm.backdate_credentials(&identity.resource_id, Duration::from_secs(3600));
        let token = PodIdentity::mint(kube, self.azure.dir(), ns, OPERATOR_SERVICE_ACCOUNT).await?;
        let env = vec![
            ("MREP_ENTRA_AUTHORITY_HOST".to_string(), format!("https://{NODE_ADDRESS}:{}/", self.azure.entra.port())),
            ("MREP_ENTRA_CA_FILE".to_string(), self.azure.ca_file().display().to_string()),
            ("MREP_ARM_ENDPOINT".to_string(), self.azure.arm.url()),
            ("AZURE_CLIENT_ID".to_string(), identity.client_id.clone()),
            ("AZURE_TENANT_ID".to_string(), self.azure.tenant_id().to_string()),
            ("AZURE_FEDERATED_TOKEN_FILE".to_string(), token.token_file.display().to_string()),
        ];
        Ok((env, identity))
    }

    /// A cluster (name: `<prefix>-<random>`) with `users` registered as cluster users.
    pub(crate) async fn cluster(&self, prefix: &str, users: &[&LabIdentity]) -> Result<Cluster> {
        let server = SecantusServer::start(SecantusOptions::default()).await?;
        let id = self.azure.create_cluster(&format!("{prefix}-{}", rand::random::<u16>()));
        for identity in users {
            self.azure.register_cluster_user(&id, &identity.principal_id).await?;
        }
        let gateway = self.azure.gateway(&server, &id).await?;
        let relay = Relay::start(gateway.port()).await?;
        Ok(Cluster { server, gateway, id, _relay: relay })
    }

    pub(crate) fn identity(&self, prefix: &str) -> LabIdentity {
        self.azure.create_identity(&format!("{prefix}-{}", rand::random::<u32>()))
    }

    /// A federated credential for the service account the operator makes for `replication`.
    async fn trust(&self, identity: &LabIdentity, kube_issuer: &str, ns: &str, replication: &str) -> Result<()> {
        let subject = format!("system:serviceaccount:{ns}:{replication}-replicator");
        self.azure.add_federated_credential(identity, "lab-node", kube_issuer, &subject, TOKEN_EXCHANGE_AUDIENCE).await
    }
}

/// The Secrets and the MongoReplication of `examples/<file>`.
pub(crate) fn example(file: &str) -> Result<(Vec<Value>, Value)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(file);
    let docs = yaml_documents(&std::fs::read_to_string(&path)?).with_context(|| path.display().to_string())?;
    let secrets = docs.iter().filter(|d| d["kind"] == "Secret").cloned().collect();
    let replication = docs.into_iter().find(|d| d["kind"] == "MongoReplication").context("no MongoReplication in the example")?;
    Ok((secrets, replication))
}

/// Points an `auth: entra` endpoint of an example at a lab cluster and identity, keeping
/// everything else (roles, scope, which fields are set).
pub(crate) fn point_entra(endpoint: &mut Value, cluster: &Cluster, identity: &LabIdentity, tenant: &str) {
    endpoint["uri"] = json!(cluster.uri_in_pod());
    let entra = &mut endpoint["entra"];
    entra["clientId"] = json!(identity.client_id);
    entra["tenantId"] = json!(tenant);
    if entra.get("managedIdentityResourceId").is_some() {
        entra["managedIdentityResourceId"] = json!(identity.resource_id);
    }
    if let Some(user) = entra.get_mut("clusterUser") {
        user["clusterResourceId"] = json!(cluster.id);
        user["principalId"] = json!(identity.principal_id);
    }
}

/// The lab node is small: the example's resource requests are scaled down, its shape kept.
pub(crate) fn fit_to_lab(replication: &mut Value) {
    if let Some(settings) = replication["spec"].get_mut("replicator").and_then(Value::as_object_mut) {
        settings.remove("resources");
    }
}

/// What must never show a token: the operator's log, the object's status, Events, ConfigMaps,
/// and the logs of every pod in the namespace (validation and replicator).
pub(crate) async fn assert_no_token_shown(client: &kube::Client, ns: &str, name: &str, operator: &Operator) -> Result<()> {
    let mut shown = vec![("operator log".to_string(), operator.log())];
    let r = Api::<MongoReplication>::namespaced(client.clone(), ns).get(name).await?;
    shown.push(("status".into(), serde_json::to_string(&r.status)?));
    for event in Api::<Event>::namespaced(client.clone(), ns).list(&ListParams::default()).await?.items {
        shown.push((format!("Event {:?}", event.reason), event.message.unwrap_or_default()));
    }
    for cm in Api::<ConfigMap>::namespaced(client.clone(), ns).list(&ListParams::default()).await?.items {
        shown.push((format!("ConfigMap {:?}", cm.metadata.name), serde_json::to_string(&cm.data)?));
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    for pod in pods.list(&ListParams::default()).await?.items {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        if let Ok(log) = pods.logs(&pod_name, &LogParams::default()).await {
            shown.push((format!("log of pod {pod_name}"), log));
        }
        let messages: Vec<String> = pod
            .status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten())
            .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
            .collect();
        shown.push((format!("termination message of {pod_name}"), messages.join("\n")));
    }
    for (what, text) in &shown {
        // Every JWT (service-account token, Entra access token) starts with base64 of `{"`.
        ensure!(!text.contains("eyJ"), "a token reached the {what}");
    }
    Ok(())
}

/// The condition's message is a sentence a person can act on: no trace ids, no JSON, no token,
/// no driver's debug dump.
fn assert_plain_sentence(message: &str, what: &str) -> Result<()> {
    ensure!(message.len() > 20 && message.len() < 1024, "{what}: message of {} characters: {message}", message.len());
    let dumps = ["Trace ID", "Correlation ID", "trace_id", "correlation_id", "Timestamp:", "eyJ", "{\"", "error_description"];
    let debug = ["Kind: ", "labels: {", "Some(", "Error {", "None,"];
    for dump in dumps.iter().chain(&debug) {
        ensure!(!message.contains(dump), "{what}: the message shows {dump:?}: {message}");
    }
    Ok(())
}

async fn converge_all(src: &mongodb::Client, dst: &mongodb::Client, operator: &Operator) -> Result<()> {
    eventually(Duration::from_secs(120), || workload::assert_same_all(src, dst)).await.with_context(|| operator.log_tail(15))
}

/// Propagation delay of new federated credentials in the Entra double: the first validation of
/// a just-bound replication fails with 70021, as on Azure, and passes when it is rerun.
const PROPAGATION: Duration = Duration::from_secs(10);

#[tokio::test]
async fn the_documentdb_disaster_recovery_example_binds_its_identities_and_replicates_entra_to_entra() -> Result<()> {
    let node = NodeLab::shared(Path::new(REPLICATOR_BIN)).await?;
    let kube = node.kube();
    let client = kube.client().await?;
    install_crd(&client).await?;
    let ns = node.namespace("op-entra-dr").await?;
    let lab = EntraLab::start(node).await?;
    let tenant = lab.azure.tenant_id().to_string();
    let (_, mut object) = example("orders-dr.yaml")?;
    let name = object["metadata"]["name"].as_str().context("no name")?.to_string();

    // Two identities, one reads the primary, the other writes the DR cluster; nothing is
    // registered for them: no federated credential, no cluster user.
    let (reader, writer) = (lab.identity("orders-reader"), lab.identity("orders-dr-writer"));
    let primary = lab.cluster("orders", &[]).await?;
    let dr = lab.cluster("orders-dr", &[]).await?;
    point_entra(&mut object["spec"]["source"], &primary, &reader, &tenant);
    point_entra(&mut object["spec"]["target"], &dr, &writer, &tenant);
    fit_to_lab(&mut object);

    let (src, dst) = (primary.server.admin_client().await?, dr.server.admin_client().await?);
    let spec = WorkloadSpec { seed: 71, initial_docs_per_collection: 200, ..Default::default() };
    workload::seed(&src, &spec).await?;

    let (operator, _) = lab.operator_with_identity(node, &ns, &[]).await?;
    lab.azure.entra.set_propagation_delay(PROPAGATION);
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    let applied = Instant::now();
    apply(&api, &object).await?;
    let bound = wait_condition(&api, &name, "IdentityBound", "True", None, Some(&operator)).await?;
    let to_bound = applied.elapsed();
    let validated = wait_condition(&api, &name, "ConnectivityValidated", "True", None, Some(&operator)).await?;
    let to_validated = applied.elapsed();
    let ready = wait_condition(&api, &name, "Ready", "True", None, Some(&operator)).await?;
    eprintln!(
        "orders-dr (Entra -> Entra, nothing pre-registered, {PROPAGATION:?} propagation): apply to IdentityBound {to_bound:.1?}, to ConnectivityValidated {to_validated:.1?}, to Ready {:.1?}",
        applied.elapsed()
    );
    ensure!(condition(&ready, "Stalled").is_some_and(|c| c.status == "False"), "{:?}", ready.status);
    ensure!(validated.status.as_ref().is_some_and(|s| s.observed_generation == validated.metadata.generation));
    let phase = ready.status.as_ref().and_then(|s| s.phase);
    ensure!(matches!(phase, Some(Phase::Streaming | Phase::Snapshotting)), "phase {phase:?}");

    // What the operator created: one credential per identity, exactly as Entra compares it, and
    // both cluster users with the example's roles; all of it listed in the status.
    let subject = format!("system:serviceaccount:{ns}:{name}-replicator");
    for identity in [&reader, &writer] {
        let credentials = lab.azure.arm.identity(&identity.resource_id).context("identity gone")?.credentials;
        ensure!(credentials.len() == 1, "{} holds {credentials:?}", identity.name);
        let c = &credentials[0];
        ensure!(c.issuer == kube.issuer() && c.subject == subject && c.audiences == [TOKEN_EXCHANGE_AUDIENCE], "{c:?}");
        ensure!(c.name.starts_with(&format!("mrep-{ns}-{name}-")), "not named as ours: {}", c.name);
    }
    ensure!(lab.azure.arm.is_cluster_user(&primary.id, &reader.principal_id) && lab.azure.arm.is_cluster_user(&dr.id, &writer.principal_id));
    let created = bound.status.as_ref().and_then(|s| s.azure.as_ref()).map(|a| a.created.clone()).unwrap_or_default();
    ensure!(created.len() == 4, "status.azure.created: {created:?}");
    ensure!(bound.metadata.finalizers.iter().flatten().any(|f| f == "mongo-replicator.io/azure-cleanup"), "no finalizer");
    // The first validation ran into the propagation delay and said so.
    let events = Api::<Event>::namespaced(client.clone(), &ns).list(&ListParams::default()).await?.items;
    let propagation =
        events.iter().filter_map(|e| e.message.as_deref()).find(|m| m.contains("NoFederatedCredential") || m.contains("can take a few minutes"));
    ensure!(
        propagation.is_some_and(|m| m.contains("the operator created the federated identity credential") && m.contains("retrying")),
        "no Event explained the propagation delay: {:?}",
        events.iter().map(|e| (e.reason.clone(), e.message.clone())).collect::<Vec<_>>()
    );

    // The children carry the identity the webhook needs; each endpoint names its own client id.
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), &ns).get(&format!("{name}-replicator")).await?;
    let annotations = sa.metadata.annotations.unwrap_or_default();
    ensure!(annotations.get("azure.workload.identity/client-id") == Some(&reader.client_id), "{annotations:?}");
    ensure!(annotations.get("azure.workload.identity/tenant-id") == Some(&tenant), "{annotations:?}");
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns).get(&format!("{name}-replicator")).await?;
    let data = cm.data.unwrap_or_default();
    let config = data.get(mongo_replicator::operator::config::CONFIG_KEY).context("no replicator config in the ConfigMap")?;
    ensure!(config.contains(&reader.client_id) && config.contains(&writer.client_id), "both identities are named:\n{config}");
    ensure!(data.contains_key(ENTRA_CA_KEY), "the Entra CA bundle is not in the ConfigMap");

    converge_all(&src, &dst, &operator).await?;
    let running = workload::Workload::start(src.clone(), WorkloadSpec { seed: 72, ..spec.clone() });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = running.stop().await?;
    ensure!(stats.total > 50, "the workload did too little: {stats:?}");
    converge_all(&src, &dst, &operator).await?;

    // Both logins went through Entra and the gateways; no token was refused.
    let (s, t) = (primary.gateway.stats(), dr.gateway.stats());
    ensure!(s.sasl_start_accepted + s.speculative_accepted > 0 && t.sasl_start_accepted + t.speculative_accepted > 0, "{s:?} {t:?}");
    ensure!(s.sasl_start_refused == 0 && t.sasl_start_refused == 0, "refused logins: {s:?} {t:?}");
    ensure!(lab.azure.entra.tokens_issued() >= 2, "one token per identity at least: {}", lab.azure.entra.tokens_issued());
    assert_no_token_shown(&client, &ns, &name, &operator).await?;

    // A second replication under the same identities and cluster users (suspended: it only binds).
    let copy = format!("{name}-copy");
    let mut second = object.clone();
    second["metadata"]["name"] = json!(copy);
    second["spec"]["suspend"] = json!(true);
    apply(&api, &second).await?;
    wait_condition(&api, &copy, "IdentityBound", "True", None, Some(&operator)).await?;
    for identity in [&reader, &writer] {
        let n = lab.azure.arm.identity(&identity.resource_id).context("identity gone")?.credentials.len();
        ensure!(n == 2, "{} holds {n} credentials, not one per replication", identity.name);
    }

    // Deleting the first removes its credentials, and only those; the cluster users stay while
    // the copy needs them.
    api.delete(&name, &Default::default()).await?;
    eventually(Duration::from_secs(90), || async {
        ensure!(api.get_opt(&name).await?.is_none(), "{name} is still there");
        Ok(())
    })
    .await
    .with_context(|| operator.log_tail(20))?;
    let copy_subject = format!("system:serviceaccount:{ns}:{copy}-replicator");
    for identity in [&reader, &writer] {
        let credentials = lab.azure.arm.identity(&identity.resource_id).context("identity gone")?.credentials;
        ensure!(credentials.len() == 1 && credentials[0].subject == copy_subject, "{} holds {credentials:?}", identity.name);
    }
    ensure!(lab.azure.arm.is_cluster_user(&primary.id, &reader.principal_id) && lab.azure.arm.is_cluster_user(&dr.id, &writer.principal_id));

    // The last one out removes the rest.
    api.delete(&copy, &Default::default()).await?;
    eventually(Duration::from_secs(90), || async {
        ensure!(api.get_opt(&copy).await?.is_none(), "{copy} is still there");
        Ok(())
    })
    .await
    .with_context(|| operator.log_tail(20))?;
    for identity in [&reader, &writer] {
        let n = lab.azure.arm.identity(&identity.resource_id).context("identity gone")?.credentials.len();
        ensure!(n == 0, "{} still holds {n} credentials", identity.name);
    }
    ensure!(lab.azure.arm.cluster_users(&primary.id).is_empty() && lab.azure.arm.cluster_users(&dr.id).is_empty(), "cluster users left behind");
    ensure!(!operator.log().contains("panicked"), "the operator panicked:\n{}", operator.log_tail(20));
    Ok(())
}

#[tokio::test]
async fn the_migration_example_replicates_a_connection_string_source_into_documentdb() -> Result<()> {
    let node = NodeLab::shared(Path::new(REPLICATOR_BIN)).await?;
    let kube = node.kube();
    let client = kube.client().await?;
    install_crd(&client).await?;
    let ns = node.namespace("op-entra-migration").await?;
    let lab = EntraLab::start(node).await?;
    let tenant = lab.azure.tenant_id().to_string();
    let (secrets, mut object) = example("atlas-to-documentdb.yaml")?;
    let name = object["metadata"]["name"].as_str().context("no name")?.to_string();

    // The on-prem source as the example has it: SCRAM, TLS with a private CA kept in the Secret.
    let migrator = ScramUser::new("migrator", "s3cret-migrat0r", &[("admin", "root")]);
    let source =
        SecantusServer::start(SecantusOptions { tls: true, tls_ips: vec![NODE_ADDRESS.into()], users: vec![migrator.clone()], ..Default::default() })
            .await?;
    let _source_relay = Relay::start(source.port()).await?;
    let identity = lab.identity("shop-migrator");
    lab.trust(&identity, kube.issuer(), &ns, &name).await?;
    let target = lab.cluster("shop", &[&identity]).await?;
    point_entra(&mut object["spec"]["target"], &target, &identity, &tenant);
    fit_to_lab(&mut object);

    let secret = secrets.first().context("the example has no Secret")?;
    let secret_name = secret["metadata"]["name"].as_str().context("Secret without a name")?;
    let uri = format!("mongodb://migrator:s3cret-migrat0r@{NODE_ADDRESS}:{}/?directConnection=true&tls=true&authSource=admin", source.port());
    let ca = std::fs::read_to_string(source.ca_file().context("the source serves no TLS")?)?;
    ensure!(secret["stringData"].get("uri").is_some() && secret["stringData"].get("ca.crt").is_some(), "the example's Secret changed: {secret}");
    put_secret(&client, &ns, secret_name, json!({"uri": uri, "ca.crt": ca})).await?;

    let (src, dst) = (source.admin_client().await?, target.server.admin_client().await?);
    let spec = WorkloadSpec {
        seed: 81,
        databases: vec!["shop".into(), "billing".into()],
        collections: vec!["orders".into(), "sessions".into(), "customers".into()],
        initial_docs_per_collection: 200,
        ..Default::default()
    };
    workload::seed(&src, &spec).await?;

    let operator = lab.operator(node, &ns).await?;
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    let applied = Instant::now();
    apply(&api, &object).await?;
    wait_condition(&api, &name, "Ready", "True", None, Some(&operator)).await?;
    eprintln!("shop-migration (connection string -> Entra): apply to Ready {:.1?}", applied.elapsed());

    // include shop.*, exclude shop.sessions: the rest stays behind.
    let copied: Vec<(String, String)> = ["shop.orders", "shop.customers"].iter().map(|n| (n.to_string(), n.to_string())).collect();
    let check = || async {
        workload::assert_same(&src, &dst, &copied).await?;
        let present = workload::user_namespaces(&dst).await?;
        ensure!(present == ["shop.customers", "shop.orders"], "the target holds {present:?}");
        Ok(())
    };
    eventually(Duration::from_secs(120), check).await.with_context(|| operator.log_tail(15))?;
    let running = workload::Workload::start(src.clone(), WorkloadSpec { seed: 82, ..spec.clone() });
    tokio::time::sleep(Duration::from_secs(3)).await;
    running.stop().await?;
    eventually(Duration::from_secs(120), check).await.with_context(|| operator.log_tail(15))?;

    let stats = target.gateway.stats();
    ensure!(stats.sasl_start_accepted + stats.speculative_accepted > 0 && stats.sasl_start_refused == 0, "{stats:?}");
    assert_no_token_shown(&client, &ns, &name, &operator).await?;
    ensure!(!operator.log().contains("s3cret-migrat0r"), "the source's password reached the operator's log");
    Ok(())
}

#[tokio::test]
async fn the_filtered_and_renamed_example_lands_under_the_new_names_only() -> Result<()> {
    let node = NodeLab::shared(Path::new(REPLICATOR_BIN)).await?;
    let client = node.kube().client().await?;
    install_crd(&client).await?;
    let ns = node.namespace("op-renamed").await?;
    let (secrets, mut object) = example("shop-staging-copy.yaml")?;
    let name = object["metadata"]["name"].as_str().context("no name")?.to_string();
    fit_to_lab(&mut object);
    let servers = crate::operator::Servers::start(SecantusOptions::default()).await?;
    let secret = secrets.first().context("the example has no Secret")?;
    let secret_name = secret["metadata"]["name"].as_str().context("Secret without a name")?;
    put_secret(&client, &ns, secret_name, json!({"source": in_pod(&servers.source.uri()), "target": in_pod(&servers.target.uri())})).await?;

    let (src, dst) = (servers.source.admin_client().await?, servers.target.admin_client().await?);
    let spec = WorkloadSpec {
        seed: 91,
        databases: vec!["shop".into(), "crm".into()],
        collections: vec!["orders".into(), "customers".into(), "sessions".into()],
        initial_docs_per_collection: 200,
        ..Default::default()
    };
    workload::seed(&src, &spec).await?;

    let operator = Operator::start(node, &ns).await?;
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    let applied = Instant::now();
    apply(&api, &object).await?;
    wait_condition(&api, &name, "Ready", "True", None, Some(&operator)).await?;
    eprintln!("shop-staging-copy (filtered, renamed): apply to Ready {:.1?}", applied.elapsed());

    let pairs: Vec<(String, String)> =
        [("shop.orders", "shop_staging.orders"), ("shop.customers", "shop_staging.customers"), ("crm.customers", "crm_staging.customers")]
            .iter()
            .map(|(s, t)| (s.to_string(), t.to_string()))
            .collect();
    let check = || async {
        workload::assert_same(&src, &dst, &pairs).await?;
        // Nothing under the old names, nothing excluded (shop.sessions) or not included (crm.orders);
        // the checkpoint lives in the example's checkpointDatabase.
        let present: Vec<String> = workload::user_namespaces(&dst).await?.into_iter().filter(|n| !n.starts_with("staging_replicator.")).collect();
        ensure!(present == ["crm_staging.customers", "shop_staging.customers", "shop_staging.orders"], "the target holds {present:?}");
        Ok(())
    };
    eventually(Duration::from_secs(120), check).await.with_context(|| operator.log_tail(15))?;
    let running = workload::Workload::start(src.clone(), WorkloadSpec { seed: 92, ..spec.clone() });
    tokio::time::sleep(Duration::from_secs(3)).await;
    running.stop().await?;
    eventually(Duration::from_secs(120), check).await.with_context(|| operator.log_tail(15))?;
    Ok(())
}

#[tokio::test]
async fn each_entra_failure_gets_its_own_reason_through_the_operator() -> Result<()> {
    let node = NodeLab::shared(Path::new(REPLICATOR_BIN)).await?;
    let kube = node.kube();
    let client = kube.client().await?;
    install_crd(&client).await?;
    let ns = node.namespace("op-entra-broken").await?;
    let lab = EntraLab::start(node).await?;
    let tenant = lab.azure.tenant_id().to_string();
    let issuer = kube.issuer().to_string();

    // The migration example, with a plain source, and a target that fails in one way per object.
    let (_, base) = example("atlas-to-documentdb.yaml")?;
    let source = SecantusServer::start(SecantusOptions::default()).await?;
    let _source_relay = Relay::start(source.port()).await?;
    put_secret(&client, &ns, "plain-source", json!({"uri": in_pod(&source.uri())})).await?;

    struct Case {
        name: &'static str,
        reason: &'static str,
        identity: LabIdentity,
        tenant: String,
    }
    let subject = |name: &str| format!("system:serviceaccount:{ns}:{name}-replicator");
    let mut cases = Vec::new();
    let no_credential = lab.identity("no-credential");
    cases.push(Case { name: "no-credential", reason: "NoFederatedCredential", identity: no_credential.clone(), tenant: tenant.clone() });
    let wrong_subject = lab.identity("wrong-subject");
    lab.azure
        .add_federated_credential(&wrong_subject, "elsewhere", &issuer, "system:serviceaccount:elsewhere:other", TOKEN_EXCHANGE_AUDIENCE)
        .await?;
    cases.push(Case { name: "wrong-subject", reason: "FederatedCredentialSubjectMismatch", identity: wrong_subject, tenant: tenant.clone() });
    let wrong_issuer = lab.identity("wrong-issuer");
    lab.azure
        .add_federated_credential(&wrong_issuer, "other-cluster", "https://oidc.example.invalid/", &subject("wrong-issuer"), TOKEN_EXCHANGE_AUDIENCE)
        .await?;
    cases.push(Case { name: "wrong-issuer", reason: "FederatedCredentialIssuerMismatch", identity: wrong_issuer, tenant: tenant.clone() });
    let wrong_audience = lab.identity("wrong-audience");
    lab.azure.add_federated_credential(&wrong_audience, "odd-audience", &issuer, &subject("wrong-audience"), "api://not-token-exchange").await?;
    cases.push(Case { name: "wrong-audience", reason: "FederatedCredentialAudienceMismatch", identity: wrong_audience, tenant: tenant.clone() });
    let not_a_user = lab.identity("not-a-user");
    lab.trust(&not_a_user, &issuer, &ns, "not-a-user").await?;
    cases.push(Case { name: "not-a-user", reason: "LoginFailed", identity: not_a_user.clone(), tenant: tenant.clone() });
    let mut unknown = lab.identity("unknown-client");
    unknown.client_id = "0b5f6a43-1111-4222-8333-944455556666".into();
    cases.push(Case { name: "unknown-client", reason: "ManagedIdentityNotFound", identity: unknown, tenant: tenant.clone() });
    let known = lab.identity("unknown-tenant");
    lab.trust(&known, &issuer, &ns, "unknown-tenant").await?;
    cases.push(Case { name: "unknown-tenant", reason: "TenantNotFound", identity: known, tenant: "7d1c9e20-aaaa-4bbb-8ccc-0123456789ab".into() });

    // One target cluster; every identity but `not-a-user` is one of its users, so only the
    // failure under test shows.
    let users: Vec<&LabIdentity> = cases.iter().filter(|c| c.name != "not-a-user").map(|c| &c.identity).collect();
    let target = lab.cluster("broken", &users).await?;

    let operator = lab.operator(node, &ns).await?;
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    for case in &cases {
        let mut object = base.clone();
        object["metadata"]["name"] = json!(case.name);
        object["spec"]["source"] = json!({"auth": "connectionString", "connectionStringSecretRef": {"name": "plain-source", "key": "uri"}});
        point_entra(&mut object["spec"]["target"], &target, &case.identity, &case.tenant);
        fit_to_lab(&mut object);
        apply(&api, &object).await?;
    }

    let mut messages = std::collections::HashSet::new();
    for case in &cases {
        let retrying = case.reason == "NoFederatedCredential";
        // A credential that may still be propagating is waited out (Reconciling); the others need a person (Stalled).
        let waiting = if retrying { "Reconciling" } else { "Stalled" };
        let r = wait_condition(&api, case.name, waiting, "True", Some(case.reason), Some(&operator)).await?;
        let validated = condition(&r, "ConnectivityValidated").context("no ConnectivityValidated")?;
        ensure!(validated.status == "False" && validated.reason == case.reason, "{}: {validated:?}", case.name);
        ensure!(condition(&r, "Ready").is_some_and(|c| c.status == "False"), "{} is Ready while broken", case.name);
        let stalled = condition(&r, "Stalled").is_some_and(|c| c.status == "True");
        ensure!(stalled != retrying, "{}: Stalled is {stalled}", case.name);
        let message = &validated.message;
        assert_plain_sentence(message, case.name)?;
        ensure!(message.starts_with("target: "), "{}: the message does not say which endpoint: {message}", case.name);
        if retrying {
            ensure!(message.contains("can pass with time"), "{}: the message does not say it may pass with time: {message}", case.name);
        }
        if case.reason.starts_with("FederatedCredential") || retrying {
            // The subject a credential must name, as the operator knows it, not a placeholder.
            ensure!(message.contains(&subject(case.name)), "{}: the message does not name the pods' subject: {message}", case.name);
        }
        eprintln!("{}: {} {}: {message}", case.name, waiting, case.reason);
        messages.insert(message.clone());
    }
    ensure!(messages.len() == cases.len(), "two failures read the same");
    // `kubectl describe` shows each reason as an Event of its object.
    eventually(Duration::from_secs(30), || async {
        let events = Api::<Event>::namespaced(client.clone(), &ns).list(&ListParams::default()).await?.items;
        for case in &cases {
            let found = events.iter().any(|e| e.involved_object.name.as_deref() == Some(case.name) && e.reason.as_deref() == Some(case.reason));
            ensure!(found, "no {} Event for {}", case.reason, case.name);
        }
        Ok(())
    })
    .await?;

    // The missing credential is created: the operator's next try passes, with nothing touched.
    let fixed = Instant::now();
    lab.trust(&no_credential, &issuer, &ns, "no-credential").await?;
    wait_condition(&api, "no-credential", "Ready", "True", None, Some(&operator)).await?;
    eprintln!("no-credential: Ready {:.1?} after the federated credential was created", fixed.elapsed());
    // And a stalled one stays stalled: no crash loop, no replicator running.
    let stalled = api.get("wrong-subject").await?;
    ensure!(condition(&stalled, "Stalled").is_some_and(|c| c.status == "True"), "{:?}", stalled.status);
    let deployment = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), &ns).get_opt("wrong-subject-replicator").await?;
    ensure!(deployment.is_none_or(|d| d.spec.replicas == Some(0)), "a replicator runs although the validation failed");
    for case in &cases {
        assert_no_token_shown(&client, &ns, case.name, &operator).await?;
    }
    ensure!(!operator.log().contains("panicked"), "the operator panicked:\n{}", operator.log_tail(20));
    Ok(())
}
