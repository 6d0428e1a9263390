//! Pods on the lab's real node (kubelet + containerd + runc, CNI bridge, kube-proxy,
//! kube-scheduler, the real workload identity webhook), from the lab's `mongo-replicator` image.
//!
//! These tests need the lab's network namespace: `bash scripts/test.sh` runs the test binaries
//! inside one. One node serves the whole process (`NodeLab::shared`); each test works in
//! namespaces of its own.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use mongo_replicator_lab::azure::AzureLab;
use mongo_replicator_lab::entra::{EntraOptions, TOKEN_EXCHANGE_AUDIENCE};
use mongo_replicator_lab::image::{self, REPLICATOR_IMAGE};
use mongo_replicator_lab::node::{HOST_NET_PID_ENV, HostState, NODE_ADDRESS, NodeLab, Relay, processes};
use mongo_replicator_lab::workload::{self, WorkloadSpec};
use mongo_replicator_lab::{ScramUser, SecantusOptions, SecantusServer};
use serde_json::{Value, json};

use crate::support::eventually;

const REPLICATOR_BIN: &str = env!("CARGO_BIN_EXE_mongo-replicator");

async fn node() -> Result<&'static NodeLab> {
    let node = NodeLab::shared(Path::new(REPLICATOR_BIN)).await?;
    let t = node.timings();
    eprintln!("node: Ready {:.1?} after its processes started; images {:.1?}; whole lab {:.1?}", t.ready, t.images, t.total);
    Ok(node)
}

fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T> {
    serde_json::from_value(value).context("a manifest of the test does not parse")
}

/// The container security context the operator will give every pod it makes.
fn hardened() -> Value {
    json!({
        "runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": true,
        "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// The lab image's container running `mongo-replicator <args>`, config and secrets mounted.
fn replicator_container(args: &[&str]) -> Value {
    json!({
        "name": "mongo-replicator",
        "image": REPLICATOR_IMAGE,
        "imagePullPolicy": "Never",
        "args": args,
        "securityContext": hardened(),
        "env": [{"name": "RUST_LOG", "value": "info"}],
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/mongo-replicator", "readOnly": true},
            {"name": "uris", "mountPath": "/var/run/secrets/mongo-replicator", "readOnly": true},
        ],
        "resources": {"limits": {"memory": "512Mi"}, "requests": {"cpu": "50m", "memory": "64Mi"}},
    })
}

fn volumes(config_map: &str, secret: &str) -> Value {
    json!([
        {"name": "config", "configMap": {"name": config_map}},
        {"name": "uris", "secret": {"secretName": secret}},
    ])
}

async fn create_config(client: &kube::Client, ns: &str, name: &str, data: Value) -> Result<()> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &typed(json!({"metadata": {"name": name}, "data": data}))?)
        .await?;
    Ok(())
}

async fn create_secret(client: &kube::Client, ns: &str, name: &str, data: Value) -> Result<()> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &typed(json!({"metadata": {"name": name}, "stringData": data}))?)
        .await?;
    Ok(())
}

/// Runs a Job to completion (or failure); its pod once the container has terminated.
async fn run_job(client: &kube::Client, ns: &str, job: Value, timeout: Duration) -> Result<Pod> {
    let name = job["metadata"]["name"].as_str().context("job without a name")?.to_string();
    Api::<Job>::namespaced(client.clone(), ns).create(&PostParams::default(), &typed(job)?).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + timeout;
    loop {
        let list = pods.list(&ListParams::default().labels(&format!("job-name={name}"))).await?;
        if let Some(pod) = list.items.into_iter().next() {
            let terminated = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.state.as_ref())
                .and_then(|s| s.terminated.as_ref())
                .is_some();
            if terminated {
                return Ok(pod);
            }
            if Instant::now() > deadline {
                bail!("job {name}'s pod did not finish within {timeout:?}: {:?}", pod.status);
            }
        } else if Instant::now() > deadline {
            bail!("job {name} made no pod within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// (exit code, termination message) of a pod's first container.
fn termination(pod: &Pod) -> Result<(i32, String)> {
    let state = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .context("the container has not terminated")?;
    Ok((state.exit_code, state.message.clone().unwrap_or_default()))
}

fn validate_job(name: &str, secret: &str) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": false,
                    "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [replicator_container(&["validate", "--config", "/etc/mongo-replicator/config.yaml"])],
                    "volumes": volumes("validate-config", secret),
                },
            },
        },
    })
}

#[tokio::test]
async fn the_lab_image_matches_the_dockerfile_runtime_stage() -> Result<()> {
    let dockerfile = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))?;
    let expected = image::dockerfile_runtime_stage(&dockerfile)?;
    let lab = image::replicator_image(Path::new(REPLICATOR_BIN))?;
    assert_eq!(image::lab_runtime_stage(&lab), expected, "the lab image drifted from the Dockerfile's runtime stage");
    let paths = lab.paths();
    for needed in ["etc/passwd", "etc/ssl/certs/ca-certificates.crt", "tmp", "lib64/ld-linux-x86-64.so.2"] {
        ensure!(paths.contains(&needed), "the lab image lacks /{needed}");
    }
    Ok(())
}

#[tokio::test]
async fn a_hardened_validation_job_reports_its_verdict_in_the_termination_message() -> Result<()> {
    let node = node().await?;
    let client = node.kube().client().await?;
    let ns = node.namespace("node-validate").await?;
    let user = ScramUser::new("replicator", "right-password", &[("admin", "root")]);
    let server = SecantusServer::start(SecantusOptions { users: vec![user.clone()], ..Default::default() }).await?;
    let _relay = Relay::start(server.port()).await?;
    let wrong = ScramUser::new("replicator", "wr0ng-passw0rd", &[]);
    let in_pod = |u: &ScramUser| server.uri_for(u).replace("127.0.0.1", &NODE_ADDRESS.to_string());
    create_secret(&client, &ns, "good", json!({"uri": in_pod(&user)})).await?;
    create_secret(&client, &ns, "bad", json!({"uri": in_pod(&wrong)})).await?;
    let endpoint = "\n  auth: connectionString\n  uriFile: /var/run/secrets/mongo-replicator/uri";
    let config = format!("name: {ns}/validate\nsource:{endpoint}\ntarget:{endpoint}\nmetricsAddress: null\n");
    create_config(&client, &ns, "validate-config", json!({"config.yaml": config})).await?;

    let created = Instant::now();
    let pod = run_job(&client, &ns, validate_job("validate-good", "good"), Duration::from_secs(120)).await?;
    eprintln!("validation job: pod finished {:.1?} after the Job was created", created.elapsed());
    let (code, message) = termination(&pod)?;
    let verdict: Value = serde_json::from_str(&message).with_context(|| format!("termination message is not JSON: {message:?}"))?;
    ensure!(code == 0 && verdict["passed"] == true, "exit {code}: {verdict:#}");
    // The kubelet ran it as the image's non-root user with the hardened context.
    let spec = pod.spec.as_ref().context("pod without spec")?;
    let context = spec.containers[0].security_context.as_ref().context("no security context")?;
    ensure!(context.run_as_user == Some(65532) && context.read_only_root_filesystem == Some(true), "{context:?}");

    let pod = run_job(&client, &ns, validate_job("validate-bad", "bad"), Duration::from_secs(120)).await?;
    let (code, message) = termination(&pod)?;
    let verdict: Value = serde_json::from_str(&message).with_context(|| format!("termination message is not JSON: {message:?}"))?;
    ensure!(code == 1 && verdict["passed"] == false && verdict["reason"] == "LoginFailed", "exit {code}: {verdict:#}");
    ensure!(!message.contains("wr0ng-passw0rd"), "the password reached the termination message");
    // The Job controller marks the Job failed soon after (backoffLimit 0).
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    eventually(Duration::from_secs(30), || async {
        let job = jobs.get("validate-bad").await?;
        let conditions = job.status.and_then(|s| s.conditions).unwrap_or_default();
        let failed = conditions.iter().any(|c| c.type_ == "Failed" && c.status == "True");
        ensure!(failed, "Job validate-bad is not Failed yet");
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_replicator_deployment_resumes_from_its_checkpoint_in_a_new_pod() -> Result<()> {
    let node = node().await?;
    let client = node.kube().client().await?;
    let ns = node.namespace("node-replicate").await?;
    let source = SecantusServer::start(SecantusOptions::default()).await?;
    let target = SecantusServer::start(SecantusOptions::default()).await?;
    let (_source_relay, _target_relay) = (Relay::start(source.port()).await?, Relay::start(target.port()).await?);
    let in_pod = |s: &SecantusServer| s.uri().replace("127.0.0.1", &NODE_ADDRESS.to_string());
    create_secret(&client, &ns, "uris", json!({"source": in_pod(&source), "target": in_pod(&target)})).await?;
    let config = format!(
        "name: {ns}/orders\nsource:\n  auth: connectionString\n  uriFile: /var/run/secrets/mongo-replicator/source\n\
         target:\n  auth: connectionString\n  uriFile: /var/run/secrets/mongo-replicator/target\nworkers: 2\nmetricsAddress: null\n"
    );
    create_config(&client, &ns, "replicator-config", json!({"config.yaml": config})).await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    let spec = WorkloadSpec { seed: 29, initial_docs_per_collection: 200, large_doc_every: Some(97), ..Default::default() };
    workload::seed(&src, &spec).await?;

    let labels = json!({"app.kubernetes.io/name": "mongo-replicator", "app.kubernetes.io/instance": "orders"});
    let deployment = json!({
        "metadata": {"name": "orders-replicator"},
        "spec": {
            "replicas": 1,
            // Never two writers.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [replicator_container(&["replicate", "--config", "/etc/mongo-replicator/config.yaml", "--log-format", "json"])],
                    "volumes": volumes("replicator-config", "uris"),
                },
            },
        },
    });
    let created = Instant::now();
    Api::<Deployment>::namespaced(client.clone(), &ns).create(&PostParams::default(), &typed(deployment)?).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let selector = "app.kubernetes.io/instance=orders";
    let first = running_pod(&pods, selector, None, Duration::from_secs(60)).await?;
    eprintln!("replicator deployment: pod Running {:.1?} after the Deployment was created", created.elapsed());

    let load = workload::Workload::start(src.clone(), spec.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Once the first pod has checkpointed changes it streamed, it goes away.
    let checkpoints = dst.database("mongo_replicator").collection::<mongodb::bson::Document>("checkpoints");
    let key = format!("{ns}/orders");
    eventually(Duration::from_secs(60), || async {
        let saved = checkpoints.find_one(mongodb::bson::doc! {"_id": &key, "eventsApplied": {"$gt": 0}}).await?;
        ensure!(saved.is_some(), "no checkpoint with streamed events yet");
        Ok(())
    })
    .await?;
    // The pod goes away mid-stream, without a chance to drain (as when its node is lost).
    pods.delete(&first, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await?;
    let second = running_pod(&pods, selector, Some(&first), Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = load.stop().await?;
    ensure!(stats.total > 100, "the workload did too little: {stats:?}");

    if let Err(err) = eventually(Duration::from_secs(120), || workload::assert_same_all(&src, &dst)).await {
        let log = pods.logs(&second, &LogParams::default()).await.unwrap_or_default();
        return Err(err.context(format!("the new pod's log ends with:\n{}", tail(&log, 20))));
    }
    let log = pods.logs(&second, &LogParams::default()).await?;
    ensure!(log.contains("resuming from checkpoint"), "the new pod did not resume from the checkpoint:\n{}", tail(&log, 20));
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The name of a Running, ready pod matching `selector` other than `not`.
async fn running_pod(pods: &Api<Pod>, selector: &str, not: Option<&str>, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        for pod in pods.list(&ListParams::default().labels(selector)).await?.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            if running && Some(name.as_str()) != not && pod.metadata.deletion_timestamp.is_none() {
                return Ok(name);
            }
        }
        if Instant::now() > deadline {
            bail!("no Running pod for {selector} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_real_webhook_gives_a_pod_its_identity_and_it_logs_in_to_documentdb() -> Result<()> {
    let node = node().await?;
    let kube = node.kube();
    let client = kube.client().await?;
    let ns = node.namespace("node-entra").await?;
    let azure = AzureLab::start_with_ips(kube, EntraOptions::default(), &[NODE_ADDRESS.into()]).await?;
    let identity = azure.create_identity(&format!("replicator-{}", rand::random::<u32>()));
    let subject = format!("system:serviceaccount:{ns}:replicator");
    azure.add_federated_credential(&identity, "lab-node", kube.issuer(), &subject, TOKEN_EXCHANGE_AUDIENCE).await?;
    let server = SecantusServer::start(SecantusOptions::default()).await?;
    let cluster = azure.create_cluster(&format!("node-{}", rand::random::<u16>()));
    azure.register_cluster_user(&cluster, &identity.principal_id).await?;
    let gateway = azure.gateway(&server, &cluster).await?;
    let (_entra_relay, _gateway_relay) = (Relay::start(azure.entra.port()).await?, Relay::start(gateway.port()).await?);

    // What the operator will create: the annotated ServiceAccount; the identity comes from the webhook.
    let sa = json!({"metadata": {"name": "replicator", "annotations": {
        "azure.workload.identity/client-id": identity.client_id,
        "azure.workload.identity/tenant-id": azure.tenant_id(),
    }}});
    Api::<ServiceAccount>::namespaced(client.clone(), &ns).create(&PostParams::default(), &typed(sa)?).await?;
    let uri = format!(
        "mongodb://{NODE_ADDRESS}:{}/?directConnection=true&tls=true&tlsCAFile=/etc/mongo-replicator/azure-ca.crt&authMechanism=MONGODB-OIDC",
        gateway.port()
    );
    // clientId, tenantId and the token file are left to the webhook's AZURE_* variables.
    let endpoint = format!(
        "\n  auth: entra\n  uri: \"{uri}\"\n  entra:\n    authorityHost: https://{NODE_ADDRESS}:{}/\n    caFile: /etc/mongo-replicator/azure-ca.crt",
        azure.entra.port()
    );
    let config = format!("name: {ns}/entra\nsource:{endpoint}\ntarget:{endpoint}\nmetricsAddress: null\n");
    create_config(&client, &ns, "validate-config", json!({"config.yaml": config, "azure-ca.crt": std::fs::read_to_string(azure.ca_file())?})).await?;
    create_secret(&client, &ns, "unused", json!({"none": ""})).await?;

    let mut job = validate_job("validate-entra", "unused");
    job["spec"]["template"]["metadata"] = json!({"labels": {"azure.workload.identity/use": "true"}});
    job["spec"]["template"]["spec"]["serviceAccountName"] = json!("replicator");
    job["spec"]["template"]["spec"]["automountServiceAccountToken"] = json!(true);
    let pod = run_job(&client, &ns, job, Duration::from_secs(120)).await?;

    // The webhook mutated the pod as on AKS.
    let container = &pod.spec.as_ref().context("pod without spec")?.containers[0];
    let env: Vec<(String, String)> = container.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect();
    let var = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    ensure!(var("AZURE_CLIENT_ID").as_deref() == Some(identity.client_id.as_str()), "AZURE_CLIENT_ID: {env:?}");
    ensure!(var("AZURE_TENANT_ID").as_deref() == Some(azure.tenant_id()), "AZURE_TENANT_ID: {env:?}");
    ensure!(var("AZURE_AUTHORITY_HOST").is_some_and(|h| h.starts_with("https://login.microsoftonline.com")), "AZURE_AUTHORITY_HOST: {env:?}");
    let token_file = var("AZURE_FEDERATED_TOKEN_FILE").context("no AZURE_FEDERATED_TOKEN_FILE")?;
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default();
    let projected = volumes
        .iter()
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|s| s.service_account_token.as_ref())
        .find(|t| t.audience.as_deref() == Some(TOKEN_EXCHANGE_AUDIENCE))
        .context("no projected token with audience api://AzureADTokenExchange")?;
    ensure!(token_file.ends_with(&projected.path), "{token_file} is not the projected token's path {}", projected.path);

    // And the pod exchanged that token at Entra and logged in through the gateway.
    let (code, message) = termination(&pod)?;
    let verdict: Value = serde_json::from_str(&message).with_context(|| format!("termination message is not JSON: {message:?}"))?;
    ensure!(code == 0 && verdict["passed"] == true, "exit {code}: {verdict:#}");
    ensure!(azure.entra.tokens_issued() >= 1, "the Entra double issued no token");
    let stats = gateway.stats();
    ensure!(stats.sasl_start_accepted + stats.speculative_accepted > 0 && stats.sasl_start_refused == 0, "{stats:?}");
    ensure!(!message.contains("eyJ"), "a token reached the termination message");
    Ok(())
}

/// The lab binary next to this test binary (`target/debug/mrep-lab`).
fn mrep_lab() -> Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().and_then(Path::parent).context("no target dir")?.join("mrep-lab");
    ensure!(bin.exists(), "{} is missing: build it with `cargo build --workspace --bins` (scripts/test.sh does)", bin.display());
    Ok(bin)
}

/// `mrep-lab up --pod` in a network namespace of its own; `ready` appears once its node runs a
/// pod; with `exit`, it then stops by itself.
fn start_lab_process(ready: &Path, exit: bool) -> Result<std::process::Child> {
    let child = std::process::Command::new("unshare")
        .args(["--net", "--", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
        .arg(mrep_lab()?)
        .args(["up", "--pod", "--ready-file"])
        .arg(ready)
        .args(exit.then_some("--exit-when-ready"))
        .env("MONGO_REPLICATOR_BIN", REPLICATOR_BIN)
        .stdin(std::process::Stdio::null())
        .spawn()?;
    Ok(child)
}

fn wait_file(path: &Path, child: &mut std::process::Child, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("mrep-lab up exited ({status}) before its node was ready");
        }
        ensure!(Instant::now() < deadline, "mrep-lab up's node not ready within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Processes of a lab run with pid `pid`: by their command line (the run's directories) or by
/// their cgroup (pods under the run's cgroup root).
fn lab_processes_of(pid: u32) -> Vec<String> {
    let marker = format!("mongo-replicator-lab/{pid}-");
    let cgroup = format!("mrep-lab-{pid}-");
    processes()
        .into_iter()
        .filter(|(p, cmdline)| cmdline.contains(&marker) || std::fs::read_to_string(format!("/proc/{p}/cgroup")).is_ok_and(|c| c.contains(&cgroup)))
        .map(|(p, cmdline)| format!("{p}: {}", cmdline.replace('\0', " ")))
        .collect()
}

#[test]
fn the_host_is_as_before_after_the_node_stops_even_when_it_was_killed() -> Result<()> {
    mongo_replicator_lab::node::ensure_lab_network_namespace()?;
    let host: u32 = std::env::var(HOST_NET_PID_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{HOST_NET_PID_ENV} names no process of the host's network namespace: run through scripts/test.sh"))?;
    // Other lab nodes may come and go meanwhile (this process's shared node, other test runs):
    // their cgroup roots are left out of the comparison; the two runs' own are checked by name.
    let before = HostState::capture(host, &["mrep-lab-"])?;
    let dir = crate::support::tempdir::Dir::new("node-host")?;

    // A run killed outright, with a pod running: its whole PID namespace dies with it.
    let ready = dir.0.join("killed.ready");
    let mut killed = start_lab_process(&ready, false)?;
    let killed_pid = killed.id();
    let result = wait_file(&ready, &mut killed, Duration::from_secs(240));
    killed.kill()?; // SIGKILL
    killed.wait()?;
    result?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = lab_processes_of(killed_pid);
        if left.is_empty() {
            break;
        }
        ensure!(Instant::now() < deadline, "processes of the killed lab still run:\n{}", left.join("\n"));
        std::thread::sleep(Duration::from_millis(200));
    }

    let stale = format!("mrep-lab-{killed_pid}-");
    let stale_left = std::fs::read_dir("/sys/fs/cgroup/memory")?.flatten().any(|e| e.file_name().to_string_lossy().starts_with(&stale));
    eprintln!("the killed run left its cgroups for the next run to remove: {stale_left}");

    // The next run cleans what the killed one left (its cgroups, its directories), runs a pod
    // and stops cleanly.
    let ready = dir.0.join("clean.ready");
    let mut clean = start_lab_process(&ready, true)?;
    let clean_pid = clean.id();
    wait_file(&ready, &mut clean, Duration::from_secs(240))?;
    let status = clean.wait()?;
    ensure!(status.success(), "mrep-lab up --exit-when-ready failed: {status}");
    let left = lab_processes_of(clean_pid);
    ensure!(left.is_empty(), "processes of the stopped lab still run:\n{}", left.join("\n"));
    let leftovers: Vec<String> = std::fs::read_dir(std::env::temp_dir().join("mongo-replicator-lab"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{killed_pid}-")) || n.starts_with(&format!("{clean_pid}-")))
        .collect();
    ensure!(leftovers.is_empty(), "run directories left behind: {leftovers:?}");

    let after = HostState::capture(host, &["mrep-lab-"])?;
    let runs = [format!("mrep-lab-{killed_pid}-"), format!("mrep-lab-{clean_pid}-")];
    let all_cgroups = HostState::capture(host, &[])?.cgroups;
    let left: Vec<&String> = all_cgroups.iter().filter(|c| runs.iter().any(|r| c.contains(r.as_str()))).collect();
    ensure!(left.is_empty(), "cgroups of the two runs left behind: {left:?}");
    assert_eq!(before.sysctls, after.sysctls, "host sysctls changed");
    assert_eq!(before.iptables, after.iptables, "host iptables rules changed");
    assert_eq!(before.ip6tables, after.ip6tables, "host ip6tables rules changed");
    assert_eq!(before.links, after.links, "host links changed");
    assert_eq!(before.addresses, after.addresses, "host addresses changed");
    assert_eq!(before.mounts, after.mounts, "host mounts changed");
    assert_eq!(before.cgroups, after.cgroups, "host cgroups changed");
    eprintln!(
        "host state before and after: {} sysctls, {} mounts, {} cgroups compared",
        before.sysctls.len(),
        before.mounts.len(),
        before.cgroups.len()
    );
    Ok(())
}

#[tokio::test]
async fn a_pod_reaches_the_apiserver_through_the_kubernetes_service_with_the_ca_verified() -> Result<()> {
    let node = node().await?;
    let client = node.kube().client().await?;
    let tools = mrep_lab()?;
    node.import(&image::lab_tools_image(&tools)?, image::LAB_TOOLS_IMAGE)?;
    let ns = node.namespace("node-in-cluster").await?;
    let pod = json!({
        "metadata": {"name": "in-cluster"},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "probe",
                "image": image::LAB_TOOLS_IMAGE,
                "imagePullPolicy": "Never",
                "args": ["in-cluster"],
                "securityContext": hardened(),
            }],
        },
    });
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(&PostParams::default(), &typed(pod)?).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let pod = loop {
        let pod = pods.get("in-cluster").await?;
        if termination(&pod).is_ok() {
            break pod;
        }
        ensure!(Instant::now() < deadline, "the pod did not finish: {:?}", pod.status);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (code, message) = termination(&pod)?;
    let logs = pods.logs("in-cluster", &LogParams::default()).await.unwrap_or_default();
    ensure!(code == 0, "exit {code}: {message}\n{logs}");
    let answer: Value = serde_json::from_str(&message)?;
    // The Service's cluster IP, not the node's address: kube-proxy's rules carried the call.
    ensure!(answer["server"].as_str().is_some_and(|s| s.starts_with("https://10.96.0.1")), "{answer}");
    ensure!(answer["user"] == format!("system:serviceaccount:{ns}:default"), "{answer}");
    Ok(())
}

#[tokio::test]
async fn a_secantusdb_pod_behind_a_service_passes_validation_from_another_pod() -> Result<()> {
    use k8s_openapi::api::core::v1::Service;
    let node = node().await?;
    let client = node.kube().client().await?;
    node.import(&image::secantus_image()?, image::SECANTUS_IMAGE)?;
    let ns = node.namespace("node-service").await?;
    let labels = json!({"app.kubernetes.io/name": "secantusdb"});
    let server = json!({
        "metadata": {"name": "secantusdb", "labels": labels},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "secantusd",
                "image": image::SECANTUS_IMAGE,
                "imagePullPolicy": "Never",
                "args": ["--host", "0.0.0.0", "--port", "27017", "--storage-path", "/data", "--cache-size", "128M", "--log-level", "WARNING"],
                "securityContext": hardened(),
                "ports": [{"containerPort": 27017, "name": "mongodb"}],
                "readinessProbe": {"tcpSocket": {"port": 27017}, "periodSeconds": 1},
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    });
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(&PostParams::default(), &typed(server)?).await?;
    let service = json!({
        "metadata": {"name": "mongodb"},
        "spec": {"selector": labels, "ports": [{"port": 27017, "targetPort": "mongodb"}]},
    });
    let service: Service = Api::namespaced(client.clone(), &ns).create(&PostParams::default(), &typed(service)?).await?;
    let cluster_ip = service.spec.and_then(|s| s.cluster_ip).context("no cluster IP")?;
    eventually(Duration::from_secs(60), || async {
        let pod = pods.get("secantusdb").await?;
        let ready = pod.status.and_then(|s| s.conditions).unwrap_or_default().iter().any(|c| c.type_ == "Ready" && c.status == "True");
        ensure!(ready, "the SecantusDB pod is not Ready");
        Ok(())
    })
    .await?;

    // Another pod reaches it through the Service's cluster IP (kube-proxy's rules).
    let uri = format!("mongodb://{cluster_ip}:27017/?directConnection=true");
    create_secret(&client, &ns, "service", json!({"uri": uri})).await?;
    let endpoint = "\n  auth: connectionString\n  uriFile: /var/run/secrets/mongo-replicator/uri";
    let config = format!("name: {ns}/service\nsource:{endpoint}\ntarget:{endpoint}\nmetricsAddress: null\n");
    create_config(&client, &ns, "validate-config", json!({"config.yaml": config})).await?;
    let pod = run_job(&client, &ns, validate_job("validate-service", "service"), Duration::from_secs(120)).await?;
    let (code, message) = termination(&pod)?;
    ensure!(code == 0, "exit {code}: {message}");
    let verdict: Value = serde_json::from_str(&message)?;
    ensure!(verdict["passed"] == true, "{verdict:#}");
    Ok(())
}
