//! `mrep-lab`: the lab from a terminal.
//!
//! - `mrep-lab demo` (the README's main job) starts the control plane with a real node, installs
//!   the CRD and the operator with the Helm chart (the lab's image), applies a MongoReplication
//!   between two SecantusDB servers and shows it the way a user sees it: Ready, progress, Events,
//!   data in the target; then the operator binding Azure identities itself for the Entra → Entra
//!   example (its own workload identity from `helm upgrade`, federated credentials and cluster
//!   users created and removed through the ARM double); then the same replication by hand with
//!   `mongo-replicator replicate`, and a Microsoft Entra login to a DocumentDB double (`validate`,
//!   then `replicate`).
//! - `mrep-lab up` starts the control plane with a real node (kubelet, containerd, runc, CNI
//!   bridge, kube-proxy, kube-scheduler, the workload identity webhook) and a SecantusDB server,
//!   prints how to reach them and waits for Ctrl-C. The node needs a network namespace of its
//!   own: when started in the host's, `mrep-lab` re-runs itself in a new one (`unshare --net`).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use mongo_replicator_lab::node::{self, NODE_ADDRESS, NodeLab, Relay};
use mongo_replicator_lab::{KubeLab, SecantusOptions, SecantusServer};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const USAGE: &str = "usage: mrep-lab demo [--keep] | mrep-lab up [--pod] [--ready-file F] [--exit-when-ready] | mrep-lab clean
  demo   start the lab with a real node, helm install the operator, kubectl apply a MongoReplication,
         watch it become Ready with data in the target; --keep waits for Ctrl-C before stopping it
  up     start the lab's control plane with a real node, and a SecantusDB server; print how to
         reach them, wait for Ctrl-C. --pod runs a pod first; --ready-file F is created once the
         node (and the pod) runs; --exit-when-ready then stops the lab, before SecantusDB
  clean  remove what killed lab runs left (cgroups, run directories)
  in-cluster  (in a pod) reach the apiserver with the in-cluster config, CA verified; print who we are";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let wants_node = matches!(args.first().map(String::as_str), Some("up" | "demo"));
    if wants_node && node::in_host_network_namespace() {
        // Bridge, iptables chains and pod addresses must never land on the host: run again in a
        // network namespace of our own, loopback up. Ctrl-C reaches both; the child decides.
        // SAFETY: ignoring SIGINT in this waiting parent only.
        unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
        let status = std::process::Command::new("unshare")
            .args(["--net", "--", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
            .arg(std::env::current_exe()?)
            .args(&args)
            .status()
            .context("cannot run unshare --net")?;
        std::process::exit(status.code().unwrap_or(1));
    }
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(run(args))
}

async fn run(args: Vec<String>) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("demo") => demo(&args[1..]).await,
        Some("up") => up(&args[1..]).await,
        Some("in-cluster") => in_cluster().await,
        Some("clean") => {
            node::clean_stale_cgroups();
            let _ = mongo_replicator_lab::RunDir::new("clean")?;
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

async fn demo(args: &[String]) -> Result<()> {
    use mongodb::bson::{Document, doc};
    let mut keep = false;
    for arg in args {
        match arg.as_str() {
            "--keep" => keep = true,
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let operator = replicator_binary();
    if !operator.exists() {
        bail!("{} not found: build it with `cargo build` or set MONGO_REPLICATOR_BIN", operator.display());
    }

    let started = std::time::Instant::now();
    step(
        "starting etcd, kube-apiserver, kube-controller-manager and a real node (kubelet, containerd, runc, kube-proxy, kube-scheduler, workload identity webhook)",
    );
    let node = NodeLab::start(&operator).await?;
    let lab = node.kube();
    println!("   {} at {} in {:.1?}", lab.versions(), lab.url(), started.elapsed());
    let kubectl = Kubectl { bin: lab.bin_dir().join("kubectl"), kubeconfig: lab.kubeconfig().to_path_buf() };
    kubectl.run(&["get", "nodes"]).await?;

    step("mongo-replicator crd | kubectl apply --server-side -f -");
    let crd = Command::new(&operator).arg("crd").output().await?;
    if !crd.status.success() {
        bail!("mongo-replicator crd failed: {}", String::from_utf8_lossy(&crd.stderr));
    }
    kubectl.run_with_input(&["apply", "--server-side", "--field-manager=mongo-replicator-demo", "-f", "-"], &crd.stdout).await?;
    kubectl.run(&["wait", "--for=condition=Established", "crd/mongoreplications.mongo-replicator.io", "--timeout=60s"]).await?;

    let (repository, tag) = mongo_replicator_lab::image::REPLICATOR_IMAGE.rsplit_once(':').context("image without a tag")?;
    let chart = repo_root().join("charts/mongo-replicator");
    step(&format!(
        "helm install mrep charts/mongo-replicator -n mrep-system --create-namespace --set image.repository={repository},image.tag={tag},image.pullPolicy=Never --wait"
    ));
    let helm = mongo_replicator_lab::helm()?;
    let chart_path = chart.display().to_string();
    let image = format!("image.repository={repository},image.tag={tag},image.pullPolicy=Never");
    run_helm(&node, &helm, &["install", "mrep", &chart_path, "-n", "mrep-system", "--create-namespace", "--set", &image]).await?;
    kubectl.run(&["get", "pods", "-n", "mrep-system", "-o", "wide"]).await?;

    step("starting two SecantusDB servers (source with 20000 documents in orders.items, target empty)");
    let source = SecantusServer::start(SecantusOptions::default()).await?;
    let target = SecantusServer::start(SecantusOptions::default()).await?;
    let _relays = (Relay::start(source.port()).await?, Relay::start(target.port()).await?);
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    let orders = src.database("orders").collection::<Document>("items");
    orders.insert_many((0..20_000).map(|i| doc! {"_id": i, "sku": format!("sku-{i}"), "qty": i % 7})).await?;
    let in_pod = |uri: String| uri.replace("127.0.0.1", &NODE_ADDRESS.to_string());

    let manifest = format!(
        "apiVersion: v1
kind: Secret
metadata: {{name: source-conn}}
stringData: {{uri: '{}'}}
---
apiVersion: v1
kind: Secret
metadata: {{name: target-conn}}
stringData: {{uri: '{}'}}
---
apiVersion: mongo-replicator.io/v1alpha1
kind: MongoReplication
metadata: {{name: orders}}
spec:
  source: {{auth: connectionString, connectionStringSecretRef: {{name: source-conn, key: uri}}}}
  target: {{auth: connectionString, connectionStringSecretRef: {{name: target-conn, key: uri}}}}
  namespaces:
    include: [\"orders.*\"]
    rename: [{{from: \"orders.*\", to: \"orders_dr.*\"}}]
  replicator: {{workers: 2}}
",
        in_pod(source.uri()),
        in_pod(target.uri())
    );
    step("kubectl create namespace demo && kubectl apply -n demo -f - (two Secrets and this MongoReplication)");
    println!("{}", manifest.split("---").last().unwrap_or_default().trim());
    kubectl.run(&["create", "namespace", "demo"]).await?;
    let applied = std::time::Instant::now();
    kubectl.run_with_input(&["apply", "-n", "demo", "-f", "-"], manifest.as_bytes()).await?;
    kubectl.run(&["get", "mongoreplications", "-n", "demo"]).await?;

    step("kubectl wait --for=condition=Ready mrep/orders -n demo");
    kubectl.run(&["wait", "--for=condition=Ready", "mrep/orders", "-n", "demo", "--timeout=180s"]).await?;
    println!("   Ready {:.1?} after kubectl apply", applied.elapsed());
    let copied = dst.database("orders_dr").collection::<Document>("items");
    wait_for(&copied, 20_000, doc! {"_id": 19_999}).await?;
    orders.insert_one(doc! {"_id": 20_000, "sku": "new"}).await?;
    orders.update_one(doc! {"_id": 1}, doc! {"$set": {"qty": 99}}).await?;
    orders.delete_one(doc! {"_id": 2}).await?;
    wait_for(&copied, 20_000, doc! {"_id": 1, "qty": 99}).await?;
    println!("   target orders_dr.items: {} documents, _id 1 updated, _id 2 deleted", copied.count_documents(doc! {}).await?);
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    kubectl.run(&["get", "mongoreplications", "-n", "demo"]).await?;
    kubectl.run(&["get", "pods,jobs,deployments", "-n", "demo"]).await?;
    step("kubectl describe mrep orders -n demo (conditions, progress, Events)");
    kubectl.run(&["describe", "mrep", "orders", "-n", "demo"]).await?;

    step("a bad object is refused with a message: auth: entra without its entra block");
    let bad = "apiVersion: mongo-replicator.io/v1alpha1
kind: MongoReplication
metadata: {name: broken}
spec:
  source: {auth: entra, uri: 'mongodb+srv://src.example/?tls=true'}
  target: {auth: connectionString, connectionStringSecretRef: {name: target-conn}}
";
    if kubectl.run_with_input(&["apply", "-n", "demo", "-f", "-"], bad.as_bytes()).await.is_ok() {
        bail!("the apiserver accepted an invalid MongoReplication");
    }
    step("a MongoReplication whose Secret does not exist: Stalled, with the reason");
    let missing = "apiVersion: mongo-replicator.io/v1alpha1
kind: MongoReplication
metadata: {name: missing-secret}
spec:
  source: {auth: connectionString, connectionStringSecretRef: {name: source-conn}}
  target: {auth: connectionString, connectionStringSecretRef: {name: no-such-secret}}
";
    kubectl.run_with_input(&["apply", "-n", "demo", "-f", "-"], missing.as_bytes()).await?;
    kubectl.run(&["wait", "--for=condition=Stalled", "mrep/missing-secret", "-n", "demo", "--timeout=60s"]).await?;
    kubectl
        .run(&["get", "mrep", "missing-secret", "-n", "demo", "-o", "jsonpath={.status.conditions[?(@.type==\"Stalled\")].message}{\"\\n\"}"])
        .await?;

    identity_demo(&node, &kubectl, &helm, &chart).await?;
    replicate_demo(&operator).await?;
    entra_demo(lab, &operator).await?;

    if keep {
        step("the lab keeps running, with its node and the operator");
        show_node(&node, false).await?;
        println!("Ctrl-C stops everything.");
        tokio::signal::ctrl_c().await?;
    }
    step("stopping the lab");
    Ok(())
}

/// The operator binds Azure identities itself: `helm upgrade` gives it its own workload identity
/// (the webhook mutates its pod), and `examples/orders-dr.yaml`, pointed at the lab's Entra and
/// ARM doubles and two DocumentDB login gateways, gets its federated credentials and cluster users
/// from the operator, with nothing registered beforehand. Deleting it removes them.
async fn identity_demo(node: &NodeLab, kubectl: &Kubectl, helm: &Path, chart: &Path) -> Result<()> {
    use mongo_replicator_lab::azure::AzureLab;
    use mongo_replicator_lab::entra::{EntraOptions, TOKEN_EXCHANGE_AUDIENCE};
    use mongodb::bson::{Document, doc};
    let lab = node.kube();
    step("Azure: Entra and ARM doubles, two DocumentDB clusters (login gateways), three managed identities, nothing registered");
    let azure = AzureLab::start_with_ips(lab, EntraOptions::default(), &[NODE_ADDRESS.into()]).await?;
    let arm_port: u16 = azure.arm.url().rsplit(':').next().and_then(|p| p.parse().ok()).context("ARM double without a port")?;
    let _relays = (Relay::start(azure.entra.port()).await?, Relay::start(arm_port).await?);
    let own = azure.create_identity("mongo-replicator-operator");
    let operator_sa = "system:serviceaccount:mrep-system:mrep-mongo-replicator";
    azure.add_federated_credential(&own, "operator", lab.issuer(), operator_sa, TOKEN_EXCHANGE_AUDIENCE).await?;
    println!("   the operator's own identity {} trusts {operator_sa} (a one-time setup)", own.name);
    let (reader, writer) = (azure.create_identity("orders-reader"), azure.create_identity("orders-dr-writer"));
    let (primary, dr) = (SecantusServer::start(SecantusOptions::default()).await?, SecantusServer::start(SecantusOptions::default()).await?);
    let (primary_id, dr_id) = (azure.create_cluster("orders"), azure.create_cluster("orders-dr"));
    let (primary_gw, dr_gw) = (azure.gateway(&primary, &primary_id).await?, azure.gateway(&dr, &dr_id).await?);
    let _gateway_relays = (Relay::start(primary_gw.port()).await?, Relay::start(dr_gw.port()).await?);
    let orders = primary.admin_client().await?.database("orders").collection::<Document>("items");
    orders.insert_many((0..5_000).map(|i| doc! {"_id": i, "sku": format!("sku-{i}")})).await?;

    let ca = azure.ca_file().display().to_string();
    kubectl.run(&["create", "configmap", "azure-ca", "-n", "mrep-system", &format!("--from-file=ca.crt={ca}")]).await?;
    let settings = format!(
        "azureWorkloadIdentity.enabled=true,azureWorkloadIdentity.clientId={},azureWorkloadIdentity.tenantId={},arm.endpoint=https://{NODE_ADDRESS}:{arm_port}/,entra.authorityHost=https://{NODE_ADDRESS}:{}/,replicatorExtraCa.configMapName=azure-ca",
        own.client_id,
        azure.tenant_id(),
        azure.entra.port()
    );
    step(&format!("helm upgrade mrep charts/mongo-replicator -n mrep-system --reuse-values --set {settings} --wait"));
    run_helm(node, helm, &["upgrade", "mrep", &chart.display().to_string(), "-n", "mrep-system", "--reuse-values", "--set", &settings]).await?;

    // The example as written, its endpoints pointed at the lab.
    let gateway_uri =
        |port: u16| format!("mongodb://{NODE_ADDRESS}:{port}/?directConnection=true&tls=true&tlsCAFile=/etc/mongo-replicator/entra-ca.crt");
    let example = std::fs::read_to_string(repo_root().join("examples/orders-dr.yaml"))?;
    let manifest = [
        ("mongodb+srv://orders.global.mongocluster.cosmos.azure.com/?tls=true", gateway_uri(primary_gw.port())),
        ("mongodb+srv://orders-dr.global.mongocluster.cosmos.azure.com/?tls=true", gateway_uri(dr_gw.port())),
        ("11111111-1111-1111-1111-111111111111", reader.client_id.clone()),
        ("66666666-6666-6666-6666-666666666666", writer.client_id.clone()),
        ("33333333-3333-3333-3333-333333333333", reader.principal_id.clone()),
        ("77777777-7777-7777-7777-777777777777", writer.principal_id.clone()),
        ("22222222-2222-2222-2222-222222222222", azure.tenant_id().to_string()),
        ("/subscriptions/44444444-4444-4444-4444-444444444444/resourceGroups/data-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/orders-replicator", reader.resource_id.clone()),
        ("/subscriptions/44444444-4444-4444-4444-444444444444/resourceGroups/dr-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/orders-dr-writer", writer.resource_id.clone()),
        ("/subscriptions/44444444-4444-4444-4444-444444444444/resourceGroups/data-rg/providers/Microsoft.DocumentDB/mongoClusters/orders", primary_id.clone()),
        ("/subscriptions/44444444-4444-4444-4444-444444444444/resourceGroups/dr-rg/providers/Microsoft.DocumentDB/mongoClusters/orders-dr", dr_id.clone()),
        ("workers: 8", "workers: 2".to_string()),
    ]
    .iter()
    .fold(example, |text, (from, to)| text.replace(from, to));
    step("kubectl apply -n demo -f examples/orders-dr.yaml (Entra -> Entra; endpoints pointed at the lab)");
    let applied = std::time::Instant::now();
    kubectl.run_with_input(&["apply", "-n", "demo", "-f", "-"], manifest.as_bytes()).await?;
    kubectl.run(&["wait", "--for=condition=IdentityBound", "mrep/orders-dr", "-n", "demo", "--timeout=120s"]).await?;
    println!("   IdentityBound {:.1?} after kubectl apply", applied.elapsed());
    kubectl.run(&["wait", "--for=condition=Ready", "mrep/orders-dr", "-n", "demo", "--timeout=240s"]).await?;
    println!("   Ready {:.1?} after kubectl apply", applied.elapsed());
    wait_for(&dr.admin_client().await?.database("orders").collection::<Document>("items"), 5_000, doc! {"_id": 4_999}).await?;
    println!("   target orders.items: 5000 documents, copied by pods logging in to both clusters with Entra tokens");
    step("what the operator created in Azure: kubectl get mrep orders-dr -o jsonpath='{.status.azure.created}'");
    kubectl.run(&["get", "mrep", "orders-dr", "-n", "demo", "-o", "jsonpath={range .status.azure.created[*]}{.kind}  {.id}{\"\\n\"}{end}"]).await?;
    for identity in [&reader, &writer] {
        let held = azure.arm.identity(&identity.resource_id).map(|i| i.credentials.len()).unwrap_or_default();
        println!("   ARM: {} holds {held} federated credential(s)", identity.name);
    }
    step("kubectl delete mrep orders-dr -n demo: the operator removes what it created, then lets it go");
    kubectl.run(&["delete", "mrep", "orders-dr", "-n", "demo", "--timeout=120s"]).await?;
    for identity in [&reader, &writer] {
        let held = azure.arm.identity(&identity.resource_id).map(|i| i.credentials.len()).unwrap_or_default();
        println!("   ARM: {} holds {held} federated credential(s)", identity.name);
        if held != 0 {
            bail!("the operator left a federated credential on {}", identity.name);
        }
    }
    println!("   cluster users left: {}", azure.arm.cluster_users(&primary_id).len() + azure.arm.cluster_users(&dr_id).len());
    Ok(())
}

/// Replicates between two SecantusDB servers with `mongo-replicator replicate`, as a person would
/// outside Kubernetes: a snapshot, then changes followed from the stream, then a clean stop.
async fn replicate_demo(operator: &Path) -> Result<()> {
    use mongodb::bson::{Document, doc};
    step("starting two SecantusDB servers (source and target)");
    let source = SecantusServer::start(SecantusOptions::default()).await?;
    let target = SecantusServer::start(SecantusOptions::default()).await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    let orders = src.database("orders").collection::<Document>("items");
    orders.insert_many((0..10_000).map(|i| doc! {"_id": i, "sku": format!("sku-{i}"), "qty": i % 7})).await?;
    println!("   source: {}  target: {}  (10000 documents in orders.items)", source.uri(), target.uri());

    step("mongo-replicator replicate --include 'orders.*' --rename 'orders.*=orders_dr.*'");
    let port = mongo_replicator_lab::process::free_port()?;
    let replicator = Command::new(operator)
        .args(["replicate", "--name", "demo", "--include", "orders.*", "--rename", "orders.*=orders_dr.*", "--log-format", "text"])
        .args(["--metrics-address", &format!("127.0.0.1:{port}")])
        .env("MREP_SOURCE_URI", source.uri())
        .env("MREP_TARGET_URI", target.uri())
        .kill_on_drop(true)
        .spawn()?;
    let copied = dst.database("orders_dr").collection::<Document>("items");
    wait_for(&copied, 10_000, doc! {"_id": 9_999}).await?;
    orders.insert_one(doc! {"_id": 10_000, "sku": "new"}).await?;
    orders.update_one(doc! {"_id": 1}, doc! {"$set": {"qty": 99}}).await?;
    orders.delete_one(doc! {"_id": 2}).await?;
    wait_for(&copied, 10_000, doc! {"_id": 10_000}).await?;
    wait_for(&copied, 10_000, doc! {"_id": 1, "qty": 99}).await?;
    let updated = copied.find_one(doc! {"_id": 1}).await?.context("document 1 missing in the target")?;
    println!(
        "   target orders_dr.items: {} documents; _id 1 has qty {}",
        copied.count_documents(doc! {}).await?,
        updated.get_i32("qty").unwrap_or(-1)
    );
    step(&format!("curl http://127.0.0.1:{port}/metrics (excerpt)"));
    let body = mongo_replicator_lab::process::http_get(port, "/metrics").await.unwrap_or_default();
    for line in body.lines().filter(|l| {
        l.starts_with("mongo_replicator_documents_copied_total")
            || l.starts_with("mongo_replicator_events_applied_total")
            || l.starts_with("mongo_replicator_lag_seconds")
    }) {
        println!("   {line}");
    }
    step("SIGTERM: drain, save the checkpoint, exit 0");
    stop(replicator).await
}

/// Logs in to a DocumentDB double with Microsoft Entra workload identity: a pod's projected
/// service-account token (TokenRequest) is exchanged at the Entra double, and the access token
/// logs in through the MONGODB-OIDC gateway. `validate` shows each check; a second identity
/// without a federated credential shows what a user reads when that is missing.
async fn entra_demo(lab: &KubeLab, operator: &Path) -> Result<()> {
    use mongo_replicator_lab::azure::{AzureLab, PodIdentity};
    use mongo_replicator_lab::entra::{EntraOptions, TOKEN_EXCHANGE_AUDIENCE};
    use mongodb::bson::{Document, doc};
    step("Microsoft Entra workload identity: Entra and ARM doubles, a DocumentDB login gateway");
    let azure = AzureLab::start(lab, EntraOptions::default()).await?;
    let pod = PodIdentity::mint(lab, azure.dir(), "demo", "orders-dr-replicator").await?;
    let identity = azure.create_identity("orders-replicator");
    azure.add_federated_credential(&identity, "lab-cluster", lab.issuer(), &pod.subject(), TOKEN_EXCHANGE_AUDIENCE).await?;
    let source = SecantusServer::start(SecantusOptions::default()).await?;
    let target = SecantusServer::start(SecantusOptions::default()).await?;
    let cluster = azure.create_cluster("orders-dr");
    azure.register_cluster_user(&cluster, &identity.principal_id).await?;
    let gateway = azure.gateway(&target, &cluster).await?;
    println!("   federated credential: issuer {} subject {}", lab.issuer(), pod.subject());
    println!("   cluster user {} (the identity's principal id); target {}", identity.principal_id, azure.gateway_uri(&gateway));
    let src = source.admin_client().await?;
    src.database("orders").collection::<Document>("items").insert_many((0..1000).map(|i| doc! {"_id": i})).await?;

    let config = |client_id: &str| {
        format!(
            "name: demo/orders-entra\nsource: {{auth: connectionString, uriEnv: SOURCE_URI}}\ntarget:\n  auth: entra\n  uri: \"{}\"\n  entra: {{clientId: {client_id}, tenantId: {}, authorityHost: \"{}\", tokenFile: {}, caFile: {}}}\nmetricsAddress: null\n",
            azure.gateway_uri(&gateway),
            azure.tenant_id(),
            azure.entra.authority_host(),
            pod.token_file.display(),
            azure.ca_file().display()
        )
    };
    let good = azure.dir().join("entra.yaml");
    std::fs::write(&good, config(&identity.client_id))?;
    step("mongo-replicator validate --config entra.yaml");
    let status =
        Command::new(operator).args(["validate", "--output", "text", "--config"]).arg(&good).env("SOURCE_URI", source.uri()).status().await?;
    if !status.success() {
        bail!("validate failed ({status})");
    }
    step("the same with an identity that has no federated credential");
    let stranger = azure.create_identity("no-credential");
    let bad = azure.dir().join("entra-bad.yaml");
    std::fs::write(&bad, config(&stranger.client_id))?;
    let status = Command::new(operator).args(["validate", "--output", "text", "--config"]).arg(&bad).env("SOURCE_URI", source.uri()).status().await?;
    println!("   {status}");
    if status.success() {
        bail!("validate passed without a federated credential");
    }

    step("mongo-replicator replicate --config entra.yaml (target logs in with Entra tokens)");
    let replicator = Command::new(operator)
        .args(["replicate", "--log-format", "text", "--config"])
        .arg(&good)
        .env("SOURCE_URI", source.uri())
        .kill_on_drop(true)
        .spawn()?;
    let copied = target.admin_client().await?.database("orders").collection::<Document>("items");
    wait_for(&copied, 1000, doc! {"_id": 999}).await?;
    println!("   target orders.items: {} documents; gateway: {:?}", copied.count_documents(doc! {}).await?, gateway.stats());
    stop(replicator).await
}

/// SIGTERM: the replicator drains, saves its checkpoint and must exit 0.
async fn stop(mut replicator: tokio::process::Child) -> Result<()> {
    if let Some(pid) = replicator.id() {
        std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    }
    let status = replicator.wait().await?;
    println!("   {status}");
    if !status.success() {
        bail!("the replicator did not stop cleanly");
    }
    Ok(())
}

/// Waits until the target collection holds `count` documents and `check` holds.
async fn wait_for(coll: &mongodb::Collection<mongodb::bson::Document>, count: u64, check: mongodb::bson::Document) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let n = coll.count_documents(mongodb::bson::doc! {}).await?;
        if n == count && coll.count_documents(check.clone()).await? > 0 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the target has {n} documents, expected {count} and one matching {check}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// In a pod of the lab's `mrep-lab` image: the in-cluster config (the `kubernetes` Service's
/// address from the environment, the service-account token, the cluster CA) reaches the
/// apiserver; the answer (who the apiserver says we are, its version) goes to stdout and to the
/// termination message.
async fn in_cluster() -> Result<()> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let config = kube::Config::incluster().context("no in-cluster config")?;
    let server = config.cluster_url.to_string();
    let client = kube::Client::try_from(config)?;
    let version = client.apiserver_version().await.with_context(|| format!("cannot reach the apiserver at {server}"))?;
    let review = kube::Api::<SelfSubjectReview>::all(client).create(&Default::default(), &SelfSubjectReview::default()).await?;
    let user = review.status.and_then(|s| s.user_info).and_then(|u| u.username).unwrap_or_default();
    let answer = serde_json::json!({"server": server, "version": version.git_version, "user": user}).to_string();
    println!("{answer}");
    if Path::new("/dev/termination-log").exists() {
        std::fs::write("/dev/termination-log", &answer)?;
    }
    Ok(())
}

fn replicator_binary() -> PathBuf {
    std::env::var_os("MONGO_REPLICATOR_BIN").map(PathBuf::from).unwrap_or_else(|| {
        let beside = std::env::current_exe().ok().and_then(|e| Some(e.parent()?.join("mongo-replicator")));
        beside.filter(|p| p.exists()).unwrap_or_else(|| repo_root().join("target/debug/mongo-replicator"))
    })
}

async fn up(args: &[String]) -> Result<()> {
    let (mut pod, mut ready_file, mut exit_when_ready) = (false, None, false);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--pod" => pod = true,
            "--ready-file" => ready_file = Some(PathBuf::from(it.next().context("--ready-file needs a path")?)),
            "--exit-when-ready" => exit_when_ready = true,
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let replicator = replicator_binary();
    if !replicator.exists() {
        bail!("{} not found: build it with `cargo build` or set MONGO_REPLICATOR_BIN", replicator.display());
    }
    let node = NodeLab::start(&replicator).await?;
    show_node(&node, pod).await?;
    let pid = std::process::id();
    if let Some(file) = &ready_file {
        std::fs::write(file, format!("{pid}\n"))?;
    }
    if exit_when_ready {
        return Ok(());
    }
    let mongo = SecantusServer::start(SecantusOptions::default()).await?;
    let _relay = Relay::start(mongo.port()).await?;
    println!("  SecantusDB: {} (from pods: {})", mongo.uri(), mongo.uri().replace("127.0.0.1", &NODE_ADDRESS.to_string()));
    println!("Ctrl-C stops everything.");
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// Prints the node's figures and how to reach it; with `pod`, runs a pod first.
async fn show_node(node: &NodeLab, pod: bool) -> Result<()> {
    let lab = node.kube();
    let t = node.timings();
    println!(
        "lab ready: {} at {}; node Ready {:.1?} after its processes started (images {:.1?}, whole lab {:.1?})",
        lab.versions(),
        lab.url(),
        t.ready,
        t.images,
        t.total
    );
    let kubectl = Kubectl { bin: lab.bin_dir().join("kubectl"), kubeconfig: lab.kubeconfig().to_path_buf() };
    kubectl.run(&["get", "nodes", "-o", "wide"]).await?;
    if pod {
        let started = std::time::Instant::now();
        kubectl
            .run(&["run", "lab-pause", "--image", mongo_replicator_lab::image::PAUSE_IMAGE, "--image-pull-policy", "Never", "--restart", "Never"])
            .await?;
        kubectl.run(&["wait", "--for=condition=Ready", "pod/lab-pause", "--timeout=120s"]).await?;
        println!("a pod Ready {:.1?} after kubectl run", started.elapsed());
    }
    let memory: Vec<String> = node.memory_kb().iter().map(|(name, kb)| format!("{name} {} MB", kb / 1024)).collect();
    println!("node memory (RSS): {}", memory.join(", "));
    let pid = std::process::id();
    println!("The lab runs in its own network namespace; from another shell:");
    println!(
        "  nsenter --net=/proc/{pid}/ns/net -- env KUBECONFIG={} {} get nodes",
        lab.kubeconfig().display(),
        lab.bin_dir().join("kubectl").display()
    );
    println!("  image for pods: {} (imagePullPolicy: Never)", mongo_replicator_lab::image::REPLICATOR_IMAGE);
    Ok(())
}

/// helm against the lab, with its settings in the lab's directory; CRDs stay the demo's own,
/// and it waits for the release to be ready.
async fn run_helm(node: &NodeLab, helm: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new(helm)
        .args(args)
        .args(["--skip-crds", "--wait", "--timeout", "120s"])
        .env("KUBECONFIG", node.kube().kubeconfig())
        .env("HELM_CACHE_HOME", node.dir().join("helm-cache"))
        .env("HELM_CONFIG_HOME", node.dir().join("helm-config"))
        .env("HELM_DATA_HOME", node.dir().join("helm-data"))
        .status()
        .await?;
    if !status.success() {
        bail!("helm {} failed ({status})", args.first().unwrap_or(&""));
    }
    Ok(())
}

fn step(what: &str) {
    println!("\n==> {what}");
}

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    async fn run(&self, args: &[&str]) -> Result<()> {
        self.run_with_input(args, &[]).await
    }

    async fn run_with_input(&self, args: &[&str], input: &[u8]) -> Result<()> {
        let mut child = Command::new(&self.bin)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        let mut stdin = child.stdin.take().context("no stdin")?;
        stdin.write_all(input).await?;
        drop(stdin);
        let status = child.wait().await?;
        if !status.success() {
            bail!("kubectl {} failed ({status})", args.join(" "));
        }
        Ok(())
    }
}
