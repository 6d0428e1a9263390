//! The operator end to end on the lab's real node: `kubectl apply` of a MongoReplication becomes
//! a validation Job, a replicator Deployment and data in the target, with conditions a user (or
//! Argo CD, Flux) can trust; edits, rotated Secrets and `suspend` roll or stop the replicator with
//! nothing lost; broken inputs get their own reason; deleting the object removes every child.
//!
//! The operator runs as a process with the lab's admin kubeconfig; its pods run on the node.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use mongo_replicator::crd::MongoReplication;
use mongo_replicator_lab::image::REPLICATOR_IMAGE;
use mongo_replicator_lab::node::{NODE_ADDRESS, NodeLab, Relay};
use mongo_replicator_lab::workload::{self, WorkloadSpec};
use mongo_replicator_lab::{KubeLab, ScramUser, SecantusOptions, SecantusServer};
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};

use crate::support::{TEST_MANAGER, eventually, install_crd};

const REPLICATOR_BIN: &str = env!("CARGO_BIN_EXE_mongo-replicator");

/// A `mongo-replicator operator` process watching one namespace, killed on drop.
pub(crate) struct Operator {
    child: tokio::process::Child,
    log: std::path::PathBuf,
}

impl Operator {
    pub(crate) async fn start(node: &NodeLab, namespace: &str) -> Result<Self> {
        Self::start_on(node.kube(), node.dir(), namespace, &[]).await
    }

    /// Like [`Operator::start`], with more settings (`MREP_*` variables).
    pub(crate) async fn start_with_env(node: &NodeLab, namespace: &str, env: &[(&str, &str)]) -> Result<Self> {
        Self::start_on(node.kube(), node.dir(), namespace, env).await
    }

    async fn start_on(kube: &KubeLab, dir: &Path, namespace: &str, env: &[(&str, &str)]) -> Result<Self> {
        let log = dir.join(format!("operator-{namespace}.log"));
        // Appended: an operator restarted in the same namespace keeps its predecessor's log.
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let port = mongo_replicator_lab::process::free_port()?;
        let child = tokio::process::Command::new(REPLICATOR_BIN)
            .arg("operator")
            .env("KUBECONFIG", kube.kubeconfig())
            .env("MREP_WATCH_NAMESPACES", namespace)
            .env("MREP_REPLICATOR_IMAGE", REPLICATOR_IMAGE)
            .env("MREP_REPLICATOR_IMAGE_PULL_POLICY", "Never")
            .env("MREP_LEADER_ELECTION", "false")
            .env("MREP_METRICS_ADDRESS", format!("127.0.0.1:{port}"))
            .env("MREP_LOG_LEVEL", "info,mongo_replicator=debug")
            .env("MREP_LOG_FORMAT", "json")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start mongo-replicator operator")?;
        Ok(Self { child, log })
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no drain, no last write.
    pub(crate) async fn kill(mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    pub(crate) async fn stop(mut self) -> Result<Option<i32>> {
        if let Some(pid) = self.child.id() {
            std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status()?;
        }
        Ok(tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??.code())
    }
}

/// Two SecantusDB servers that pods reach on the node's address.
pub(crate) struct Servers {
    pub(crate) source: SecantusServer,
    pub(crate) target: SecantusServer,
    _relays: (Relay, Relay),
}

impl Servers {
    pub(crate) async fn start(options: SecantusOptions) -> Result<Self> {
        let source = SecantusServer::start(options.clone()).await?;
        let target = SecantusServer::start(options).await?;
        let relays = (Relay::start(source.port()).await?, Relay::start(target.port()).await?);
        Ok(Self { source, target, _relays: relays })
    }
}

/// A connection string as a pod sees it.
pub(crate) fn in_pod(uri: &str) -> String {
    uri.replace("127.0.0.1", &NODE_ADDRESS.to_string())
}

pub(crate) async fn put_secret(client: &kube::Client, ns: &str, name: &str, data: Value) -> Result<()> {
    let secret: Secret = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data}))?;
    Api::<Secret>::namespaced(client.clone(), ns).patch(name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(&secret)).await?;
    Ok(())
}

fn replication(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "mongo-replicator.io/v1alpha1", "kind": "MongoReplication", "metadata": {"name": name}, "spec": spec})
}

fn connection_string_spec() -> Value {
    json!({
        "source": {"auth": "connectionString", "connectionStringSecretRef": {"name": "source-conn", "key": "uri"}},
        "target": {"auth": "connectionString", "connectionStringSecretRef": {"name": "target-conn", "key": "uri"}},
        "replicator": {"workers": 2, "batchSize": 500},
    })
}

/// `kubectl apply --server-side` of a MongoReplication, as a user or a GitOps tool would.
pub(crate) async fn apply(api: &Api<MongoReplication>, object: &Value) -> Result<()> {
    let name = object["metadata"]["name"].as_str().context("no name")?;
    api.patch(name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(object)).await?;
    Ok(())
}

pub(crate) fn condition<'a>(r: &'a MongoReplication, type_: &str) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    r.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

/// Waits until a condition has `status` (and `reason`, when given) for the current generation.
pub(crate) async fn wait_condition(
    api: &Api<MongoReplication>,
    name: &str,
    type_: &str,
    status: &str,
    reason: Option<&str>,
    operator: Option<&Operator>,
) -> Result<MongoReplication> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let r = api.get(name).await?;
        let generation = r.metadata.generation;
        if let Some(c) = condition(&r, type_)
            && c.status == status
            && reason.is_none_or(|reason| c.reason == reason)
            && c.observed_generation == generation
        {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!(
                "{name}: {type_} is not {status}{} after 180 s; status: {:#?}\noperator log:\n{}",
                reason.map(|r| format!(" ({r})")).unwrap_or_default(),
                r.status,
                operator.map(|o| o.log_tail(20)).unwrap_or_else(|| "(in pods)".into())
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn converge(src: &mongodb::Client, dst: &mongodb::Client) -> Result<()> {
    eventually(Duration::from_secs(120), || workload::assert_same_all(src, dst)).await
}

/// The pod-template hash the replicator Deployment runs with.
async fn deployment_hash(deployments: &Api<Deployment>, name: &str) -> Result<String> {
    let deployment = deployments.get(&format!("{name}-replicator")).await?;
    let annotations = deployment.spec.template.metadata.and_then(|m| m.annotations).unwrap_or_default();
    annotations.get("mongo-replicator.io/config-hash").cloned().context("no config hash on the pod template")
}

#[tokio::test]
async fn a_mongo_replication_becomes_validated_running_replication_with_honest_status() -> Result<()> {
    let node = NodeLab::shared(Path::new(REPLICATOR_BIN)).await?;
    let client = node.kube().client().await?;
    install_crd(&client).await?;
    let ns = node.namespace("operator").await?;
    let servers = Servers::start(SecantusOptions::default()).await?;
    let (src, dst) = (servers.source.admin_client().await?, servers.target.admin_client().await?);
    let spec = WorkloadSpec { seed: 41, initial_docs_per_collection: 300, ..Default::default() };
    workload::seed(&src, &spec).await?;
    put_secret(&client, &ns, "source-conn", json!({"uri": in_pod(&servers.source.uri())})).await?;
    put_secret(&client, &ns, "target-conn", json!({"uri": in_pod(&servers.target.uri())})).await?;

    let operator = Operator::start(node, &ns).await?;
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    let applied = Instant::now();
    let mut spec_with_cutover = connection_string_spec();
    spec_with_cutover["cutover"] = json!({"sustainSeconds": 5});
    let object = replication("orders", spec_with_cutover);
    apply(&api, &object).await?;

    // Ready only once validated and the replicator reported progress for this configuration.
    let ready = wait_condition(&api, "orders", "Ready", "True", None, Some(&operator)).await?;
    eprintln!("apply to Ready: {:.1?}", applied.elapsed());
    let validated = condition(&ready, "ConnectivityValidated").context("no ConnectivityValidated")?;
    ensure!(validated.status == "True", "{validated:?}");
    ensure!(condition(&ready, "Stalled").is_some_and(|c| c.status == "False"));
    let status = ready.status.as_ref().context("no status")?;
    ensure!(status.observed_generation == ready.metadata.generation);
    converge(&src, &dst).await.with_context(|| operator.log_tail(20))?;
    let running = workload::Workload::start(src.clone(), WorkloadSpec { seed: 42, ..spec.clone() });
    tokio::time::sleep(Duration::from_secs(3)).await;
    running.stop().await?;
    converge(&src, &dst).await?;
    eventually(Duration::from_secs(60), || async {
        let r = api.get("orders").await?;
        let progress = r.status.and_then(|s| s.progress).context("no progress")?;
        ensure!(progress.events_applied.unwrap_or(0) > 0 && progress.phase.as_deref() == Some("Stream"), "{progress:?}");
        Ok(())
    })
    .await
    .context("the replicator did not report streamed events in status.progress")?;
    // Idle and applied: caught up, and after sustainSeconds the condition says how to cut over.
    let caught_up = wait_condition(&api, "orders", "CaughtUp", "True", Some("CaughtUp"), Some(&operator)).await?;
    let message = &condition(&caught_up, "CaughtUp").context("no CaughtUp")?.message;
    ensure!(message.contains("stop writes to the source"), "{message}");
    ensure!(caught_up.status.as_ref().and_then(|s| s.progress.as_ref()).and_then(|p| p.caught_up_since.as_ref()).is_some());

    // Killing the replicator pod mid-stream loses nothing: its successor resumes from the checkpoint.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    let replicator_pods = ListParams::default().labels("mongo-replicator.io/replication=orders,app.kubernetes.io/component=replicator");
    let running = workload::Workload::start(src.clone(), WorkloadSpec { seed: 45, ..spec.clone() });
    tokio::time::sleep(Duration::from_secs(2)).await;
    for pod in pods.list(&replicator_pods).await?.items {
        pods.delete(&pod.metadata.name.unwrap_or_default(), &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.stop().await?;
    converge(&src, &dst).await.context("writes were lost when the replicator pod was killed")?;

    // Re-applying the same manifest changes nothing: no new generation, no new status write.
    // (after the killed pod's successor is back)
    wait_condition(&api, "orders", "Ready", "True", None, Some(&operator)).await?;
    let before = api.get("orders").await?;
    apply(&api, &object).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = api.get("orders").await?;
    ensure!(before.metadata.generation == after.metadata.generation, "re-applying the manifest changed the generation");
    ensure!(
        condition(&before, "Ready").map(|c| &c.last_transition_time) == condition(&after, "Ready").map(|c| &c.last_transition_time),
        "Ready moved without a change: before {:?}, after {:?}\noperator log:\n{}",
        before.status,
        after.status,
        operator.log_tail(30)
    );

    // The same with client-side `kubectl apply`, as Argo CD and Flux may do.
    let manifest = node.dir().join(format!("{ns}-orders.json"));
    std::fs::write(&manifest, serde_json::to_vec(&object)?)?;
    let kubectl = |args: &[&str]| {
        std::process::Command::new(node.kube().bin_dir().join("kubectl")).arg("--kubeconfig").arg(node.kube().kubeconfig()).args(args).output()
    };
    for _ in 0..2 {
        let out = kubectl(&["apply", "-n", &ns, "-f", &manifest.display().to_string()])?;
        ensure!(out.status.success(), "kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = api.get("orders").await?;
    ensure!(again.metadata.generation == after.metadata.generation, "client-side apply changed the generation");
    let diff = kubectl(&["diff", "-n", &ns, "-f", &manifest.display().to_string()])?;
    ensure!(diff.status.success(), "kubectl diff shows drift: {}", String::from_utf8_lossy(&diff.stdout));

    // A rotated Secret re-validates and rolls the replicator; nothing is lost.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let old_hash = deployment_hash(&deployments, "orders").await?;
    put_secret(&client, &ns, "target-conn", json!({"uri": format!("{}&appName=rotated", in_pod(&servers.target.uri()))})).await?;
    eventually(Duration::from_secs(60), || async {
        ensure!(deployment_hash(&deployments, "orders").await? != old_hash, "the Deployment still runs the old configuration");
        Ok(())
    })
    .await
    .with_context(|| operator.log_tail(20))?;
    src.database("shop").collection::<Document>("after_rotation").insert_one(doc! {"_id": 1}).await?;
    wait_condition(&api, "orders", "Ready", "True", None, Some(&operator)).await?;
    converge(&src, &dst).await?;

    // Suspend scales the replicator to zero; resuming continues from the checkpoint.
    let mut suspended = object.clone();
    suspended["spec"]["suspend"] = json!(true);
    apply(&api, &suspended).await?;
    wait_condition(&api, "orders", "Replicating", "False", Some("Suspended"), Some(&operator)).await?;
    eventually(Duration::from_secs(60), || async {
        let d = deployments.get("orders-replicator").await?;
        ensure!(d.spec.replicas == Some(0) && d.status.and_then(|s| s.replicas).unwrap_or(0) == 0, "still running");
        Ok(())
    })
    .await?;
    src.database("shop").collection::<Document>("while_suspended").insert_many((0..50).map(|i| doc! {"_id": i})).await?;
    apply(&api, &object).await?;
    wait_condition(&api, "orders", "Ready", "True", None, Some(&operator)).await?;
    converge(&src, &dst).await?;

    // Deleting the object removes every child (owner references, garbage collector).
    api.delete("orders", &DeleteParams::default()).await?;
    eventually(Duration::from_secs(90), || async {
        let lp = ListParams::default().labels("mongo-replicator.io/replication=orders");
        let left = Api::<Deployment>::namespaced(client.clone(), &ns).list(&lp).await?.items.len()
            + Api::<Job>::namespaced(client.clone(), &ns).list(&lp).await?.items.len()
            + Api::<ConfigMap>::namespaced(client.clone(), &ns).list(&lp).await?.items.len()
            + Api::<ServiceAccount>::namespaced(client.clone(), &ns).list(&lp).await?.items.len();
        ensure!(left == 0, "{left} children of orders are left");
        Ok(())
    })
    .await?;
    let log = operator.log();
    ensure!(!log.contains("panicked"), "the operator panicked:\n{}", operator.log_tail(20));
    ensure!(operator.stop().await? == Some(0), "the operator did not stop cleanly on SIGTERM");
    Ok(())
}

#[tokio::test]
async fn each_broken_input_gets_its_own_reason_and_never_a_crash_loop() -> Result<()> {
    let node = NodeLab::shared(Path::new(REPLICATOR_BIN)).await?;
    let client = node.kube().client().await?;
    install_crd(&client).await?;
    let ns = node.namespace("operator-broken").await?;
    let user = ScramUser::new("replicator", "right-password", &[("admin", "root")]);
    let servers = Servers::start(SecantusOptions { users: vec![user.clone()], ..Default::default() }).await?;
    let wrong = ScramUser::new("replicator", "wr0ng-passw0rd", &[]);
    put_secret(&client, &ns, "source-conn", json!({"uri": in_pod(&servers.source.uri_for(&user))})).await?;
    put_secret(&client, &ns, "target-conn", json!({"uri": in_pod(&servers.target.uri_for(&user))})).await?;
    put_secret(&client, &ns, "wrong-password", json!({"uri": in_pod(&servers.target.uri_for(&wrong))})).await?;
    put_secret(
        &client,
        &ns,
        "unreachable",
        json!({"uri": format!("mongodb://{NODE_ADDRESS}:1/?directConnection=true&serverSelectionTimeoutMS=2000")}),
    )
    .await?;
    // A source without change streams (a standalone server, as a standalone mongod).
    let standalone = SecantusServer::start(SecantusOptions { standalone: true, ..Default::default() }).await?;
    let _standalone_relay = Relay::start(standalone.port()).await?;
    put_secret(&client, &ns, "standalone-conn", json!({"uri": in_pod(&standalone.uri())})).await?;
    let operator = Operator::start(node, &ns).await?;
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    let mut no_streams = connection_string_spec();
    no_streams["source"]["connectionStringSecretRef"] = json!({"name": "standalone-conn", "key": "uri"});
    no_streams["target"]["connectionStringSecretRef"] = json!({"name": "target-conn", "key": "uri"});
    apply(&api, &replication("no-change-streams", no_streams)).await?;

    let with_target = |secret: &str, key: &str| {
        let mut spec = connection_string_spec();
        spec["target"]["connectionStringSecretRef"] = json!({"name": secret, "key": key});
        spec
    };
    apply(&api, &replication("missing-secret", with_target("does-not-exist", "uri"))).await?;
    apply(&api, &replication("missing-key", with_target("target-conn", "nope"))).await?;
    apply(&api, &replication("wrong-password", with_target("wrong-password", "uri"))).await?;
    apply(&api, &replication("unreachable", with_target("unreachable", "uri"))).await?;
    wait_condition(&api, "missing-secret", "Stalled", "True", Some("SecretNotFound"), Some(&operator)).await?;
    let unsupported = wait_condition(&api, "no-change-streams", "Stalled", "True", Some("ChangeStreamsUnsupported"), Some(&operator)).await?;
    let message = &condition(&unsupported, "Stalled").context("no Stalled")?.message;
    ensure!(message.contains("change streams"), "{message}");
    wait_condition(&api, "missing-key", "Stalled", "True", Some("SecretKeyMissing"), Some(&operator)).await?;
    let refused = wait_condition(&api, "wrong-password", "Stalled", "True", Some("LoginFailed"), Some(&operator)).await?;
    let message = &condition(&refused, "ConnectivityValidated").context("no ConnectivityValidated")?.message;
    ensure!(!message.contains("wr0ng-passw0rd") && !message.contains("right-password"), "a password reached the status: {message}");
    let unreachable = wait_condition(&api, "unreachable", "ConnectivityValidated", "False", Some("EndpointUnreachable"), Some(&operator)).await?;
    let message = &condition(&unreachable, "ConnectivityValidated").context("no condition")?.message;
    ensure!(message.contains(&format!("{NODE_ADDRESS}:1")) && !message.contains("Topology"), "not a sentence a user can act on: {message}");
    for name in ["missing-secret", "missing-key", "wrong-password", "no-change-streams"] {
        let r = api.get(name).await?;
        ensure!(condition(&r, "Ready").is_some_and(|c| c.status == "False"), "{name} is Ready while broken");
        ensure!(r.status.as_ref().and_then(|s| s.phase) == Some(mongo_replicator::crd::Phase::Failed), "{name}: {:?}", r.status);
        // Never a crash loop: the replicator is not started until the validation passes.
        let d = Api::<Deployment>::namespaced(client.clone(), &ns).get_opt(&format!("{name}-replicator")).await?;
        ensure!(d.is_none_or(|d| d.spec.replicas == Some(0)), "{name}: a replicator runs although the validation failed");
    }
    // A fixed Secret heals the stalled replication without touching it.
    put_secret(&client, &ns, "does-not-exist", json!({"uri": in_pod(&servers.target.uri_for(&user))})).await?;
    wait_condition(&api, "missing-secret", "Ready", "True", None, Some(&operator)).await?;
    let log = operator.log();
    ensure!(!log.contains("wr0ng-passw0rd") && !log.contains("right-password"), "a password reached the operator's log");
    ensure!(!log.contains("panicked"), "the operator panicked:\n{}", operator.log_tail(20));
    Ok(())
}

#[tokio::test]
async fn an_object_written_around_the_schema_is_stalled_and_never_stalls_the_others() -> Result<()> {
    // An older, looser CRD lets through what today's types cannot read: its own control plane,
    // as it changes the CRD.
    let kube = KubeLab::start().await?;
    let client = kube.client().await?;
    install_crd(&client).await?;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> = Api::all(client.clone());
    let mut crd = serde_json::to_value(mongo_replicator::crd::crd())?;
    let schema = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    schema["properties"]["spec"] = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    schema.as_object_mut().context("schema")?.remove("x-kubernetes-validations");
    crds.patch("mongoreplications.mongo-replicator.io", &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(&crd)).await?;
    let ns = kube.namespace("operator-malformed").await?;
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    let raw: Api<kube::core::DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &kube::discovery::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("mongo-replicator.io", "v1alpha1", "MongoReplication"),
            "mongoreplications",
        ),
    );
    eventually(Duration::from_secs(30), || async {
        let malformed = json!({"apiVersion": "mongo-replicator.io/v1alpha1", "kind": "MongoReplication", "metadata": {"name": "malformed"}, "spec": {"source": {"auth": "ldap"}, "target": 42}});
        raw.patch("malformed", &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(&malformed)).await?;
        Ok(())
    })
    .await?;
    let mut valid = connection_string_spec();
    valid["target"]["connectionStringSecretRef"]["name"] = json!("not-there");
    apply(&api, &replication("valid", valid)).await?;
    let dir = crate::support::tempdir::Dir::new("operator-malformed")?;
    let operator = Operator::start_on(&kube, &dir.0, &ns, &[]).await?;

    eventually(Duration::from_secs(60), || async {
        let object = raw.get("malformed").await?;
        let stalled = object.data["status"]["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "Stalled")).cloned();
        let stalled = stalled.context("no Stalled condition yet")?;
        ensure!(stalled["status"] == "True" && stalled["reason"] == "InvalidSpec", "{stalled}");
        ensure!(stalled["message"].as_str().is_some_and(|m| m.contains("ldap")), "the message does not say what is wrong: {stalled}");
        Ok(())
    })
    .await
    .with_context(|| operator.log_tail(10))?;
    wait_condition(&api, "valid", "Stalled", "True", Some("SecretNotFound"), Some(&operator)).await?;
    ensure!(!operator.log().contains("panicked"));
    Ok(())
}

/// `helm install` of the chart from the lab image, as a user installs it.
async fn helm_install(node: &NodeLab, release_namespace: &str, watch: &str) -> Result<()> {
    let (repository, tag) = REPLICATOR_IMAGE.rsplit_once(':').context("image without a tag")?;
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/mongo-replicator");
    let values =
        format!("image: {{repository: {repository}, tag: {tag}, pullPolicy: Never}}\nwatchNamespaces: [{watch}]\nreplicaCount: 2\nlogLevel: debug\n");
    let values_file = node.dir().join(format!("values-{release_namespace}.yaml"));
    std::fs::write(&values_file, values)?;
    let out = tokio::process::Command::new(mongo_replicator_lab::helm()?)
        .args(["install", "mrep", &chart.display().to_string(), "--namespace", release_namespace, "--skip-crds", "--wait", "--timeout", "120s"])
        .arg("-f")
        .arg(&values_file)
        .env("KUBECONFIG", node.kube().kubeconfig())
        .env("HELM_CACHE_HOME", node.dir().join("helm-cache"))
        .env("HELM_CONFIG_HOME", node.dir().join("helm-config"))
        .env("HELM_DATA_HOME", node.dir().join("helm-data"))
        .output()
        .await?;
    ensure!(out.status.success(), "helm install failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The holder of the operator's Lease.
async fn lease_holder(client: &kube::Client, namespace: &str) -> Result<String> {
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), namespace).get("mongo-replicator-operator").await?;
    lease.spec.and_then(|s| s.holder_identity).context("the Lease has no holder")
}

#[tokio::test]
async fn the_chart_installs_two_operator_replicas_and_the_standby_takes_over_from_a_killed_leader() -> Result<()> {
    let node = NodeLab::shared(Path::new(REPLICATOR_BIN)).await?;
    let client = node.kube().client().await?;
    install_crd(&client).await?;
    let system = node.namespace("mrep-system").await?;
    let ns = node.namespace("operator-chart").await?;
    helm_install(node, &system, &ns).await?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &system);
    let operator_pods = ListParams::default().labels("app.kubernetes.io/name=mongo-replicator");
    let running = pods.list(&operator_pods).await?.items;
    ensure!(running.len() == 2, "{} operator pods", running.len());
    let leader = eventually_value(Duration::from_secs(60), || lease_holder(&client, &system)).await?;
    ensure!(running.iter().any(|p| p.metadata.name.as_deref() == Some(leader.as_str())), "the Lease holder {leader} is not an operator pod");

    let servers = Servers::start(SecantusOptions::default()).await?;
    let (src, dst) = (servers.source.admin_client().await?, servers.target.admin_client().await?);
    let spec = WorkloadSpec { seed: 43, initial_docs_per_collection: 200, ..Default::default() };
    workload::seed(&src, &spec).await?;
    put_secret(&client, &ns, "source-conn", json!({"uri": in_pod(&servers.source.uri())})).await?;
    put_secret(&client, &ns, "target-conn", json!({"uri": in_pod(&servers.target.uri())})).await?;
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    apply(&api, &replication("orders", connection_string_spec())).await?;
    wait_condition(&api, "orders", "Ready", "True", None, None).await?;
    converge(&src, &dst).await?;

    // Kill the leader mid-flight: the standby takes the Lease and carries on.
    apply(&api, &replication("second", connection_string_spec())).await?;
    pods.delete(&leader, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await?;
    let successor = eventually_value(Duration::from_secs(90), || async {
        let holder = lease_holder(&client, &system).await?;
        ensure!(holder != leader, "still held by the killed leader");
        Ok(holder)
    })
    .await?;
    wait_condition(&api, "second", "Ready", "True", None, None).await.context("the new leader did not converge")?;
    let running = workload::Workload::start(src.clone(), WorkloadSpec { seed: 44, ..spec.clone() });
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.stop().await?;
    converge(&src, &dst).await?;
    // No duplicates: one Deployment and one current validation Job per replication.
    for name in ["orders", "second"] {
        let lp = ListParams::default().labels(&format!("mongo-replicator.io/replication={name}"));
        let deployments = Api::<Deployment>::namespaced(client.clone(), &ns).list(&lp).await?.items.len();
        ensure!(deployments == 1, "{name}: {deployments} Deployments");
    }
    eprintln!("leader {leader} killed; {successor} took over");
    Ok(())
}

/// Polls `f` until it returns a value or `timeout` passes.
async fn eventually_value<T, F, Fut>(timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(value) => return Ok(value),
            Err(err) if Instant::now() > deadline => return Err(err.context(format!("still failing after {timeout:?}"))),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

#[tokio::test]
async fn writes_failing_longer_than_the_threshold_are_stalled_and_recover_when_the_target_returns() -> Result<()> {
    let node = NodeLab::shared(Path::new(REPLICATOR_BIN)).await?;
    let client = node.kube().client().await?;
    install_crd(&client).await?;
    let ns = node.namespace("operator-stall").await?;
    let mut servers = Servers::start(SecantusOptions::default()).await?;
    let (src, dst) = (servers.source.admin_client().await?, servers.target.admin_client().await?);
    put_secret(&client, &ns, "source-conn", json!({"uri": in_pod(&servers.source.uri())})).await?;
    put_secret(&client, &ns, "target-conn", json!({"uri": format!("{}&serverSelectionTimeoutMS=1000", in_pod(&servers.target.uri()))})).await?;
    let operator = Operator::start_on(node.kube(), node.dir(), &ns, &[("MREP_STALL_AFTER_SECONDS", "10")]).await?;
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    apply(&api, &replication("stall", connection_string_spec())).await?;
    wait_condition(&api, "stall", "Ready", "True", None, Some(&operator)).await?;

    // The target goes away while the source keeps changing: after the threshold, Stalled.
    servers.target.stop();
    let events = src.database("shop").collection::<Document>("during_outage");
    events.insert_many((0..100).map(|i| doc! {"_id": i})).await?;
    let stalled = wait_condition(&api, "stall", "Stalled", "True", Some("CheckpointNotAdvancing"), Some(&operator)).await?;
    ensure!(condition(&stalled, "Ready").is_some_and(|c| c.status == "False"), "Ready while writes fail");
    let message = &condition(&stalled, "Stalled").context("no Stalled")?.message;
    ensure!(message.contains("target"), "{message}");

    // The target comes back: the replicator catches up and the replication is Ready again.
    servers.target.restart().await?;
    wait_condition(&api, "stall", "Ready", "True", None, Some(&operator)).await?;
    ensure!(condition(&api.get("stall").await?, "Stalled").is_some_and(|c| c.status == "False"));
    let dst = servers.target.admin_client().await.unwrap_or(dst);
    converge(&src, &dst).await?;
    Ok(())
}

/// Verification through the operator, as a user asks for it before a cutover: an annotation
/// starts a Job under the replication's ServiceAccount; `Verified` tells the verdict, and a
/// document the target lost is named (kind, namespace, `_id`), with a Warning Event.
#[tokio::test]
async fn an_on_demand_verification_finds_the_target_equal_then_names_a_document_it_lost() -> Result<()> {
    let node = NodeLab::shared(Path::new(REPLICATOR_BIN)).await?;
    let client = node.kube().client().await?;
    install_crd(&client).await?;
    let ns = node.namespace("op-verify").await?;
    let servers = Servers::start(SecantusOptions::default()).await?;
    let (src, dst) = (servers.source.admin_client().await?, servers.target.admin_client().await?);
    let spec = WorkloadSpec { seed: 51, initial_docs_per_collection: 200, large_doc_every: None, ..Default::default() };
    workload::seed(&src, &spec).await?;
    put_secret(&client, &ns, "source-conn", json!({"uri": in_pod(&servers.source.uri())})).await?;
    put_secret(&client, &ns, "target-conn", json!({"uri": in_pod(&servers.target.uri())})).await?;
    let operator = Operator::start(node, &ns).await?;
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    let mut with_verification = connection_string_spec();
    with_verification["verification"] = json!({"mode": "OnDemand"});
    apply(&api, &replication("orders", with_verification)).await?;
    wait_condition(&api, "orders", "Ready", "True", None, Some(&operator)).await?;
    converge(&src, &dst).await?;
    ensure!(condition(&api.get("orders").await?, "Verified").is_none(), "a verification ran before anyone asked");

    let request = |value: &str| {
        let patch = json!({"metadata": {"annotations": {"mongo-replicator.io/verify": value}}});
        let api = api.clone();
        async move { api.patch("orders", &PatchParams::default(), &Patch::Merge(&patch)).await.map(drop) }
    };
    let started = Instant::now();
    request("1").await?;
    let equal = wait_condition(&api, "orders", "Verified", "True", Some("Equal"), Some(&operator)).await?;
    let message = &condition(&equal, "Verified").context("no Verified")?.message;
    ensure!(message.contains("documents in") && message.contains("compared"), "{message}");
    eprintln!("on-demand verification, equal: {:.1?} from the request", started.elapsed());

    // The target loses a document behind the replicator's back: the next run names it.
    let (db, coll) = ("wl_shop", "orders");
    let lost = dst.database(db).collection::<Document>(coll).find_one(doc! {}).await?.context("no document in the target")?;
    let id = lost.get("_id").context("no _id")?.clone();
    dst.database(db).collection::<Document>(coll).delete_one(doc! {"_id": id}).await?;
    let started = Instant::now();
    request("2").await?;
    let differs = wait_condition(&api, "orders", "Verified", "False", Some("TargetDiffers"), Some(&operator)).await?;
    let message = &condition(&differs, "Verified").context("no Verified")?.message;
    ensure!(message.contains("MissingInTarget 1") && message.contains(&format!("{db}.{coll}")), "{message}");
    eprintln!("on-demand verification, one document lost: {:.1?} from the request", started.elapsed());
    ensure!(condition(&differs, "Ready").is_some_and(|c| c.status == "True"), "a verdict must not stop replication");
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), &ns).list(&ListParams::default()).await?.items;
    ensure!(
        events.iter().any(|e| e.reason.as_deref() == Some("TargetDiffers") && e.type_.as_deref() == Some("Warning")),
        "no Warning Event for the mismatch"
    );
    let jobs = Api::<Job>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels("mongo-replicator.io/replication=orders,app.kubernetes.io/component=verification"))
        .await?;
    ensure!(
        jobs.items.len() == 1,
        "the first request's Job was not removed: {:?}",
        jobs.items.iter().map(|j| j.metadata.name.clone()).collect::<Vec<_>>()
    );
    Ok(())
}
