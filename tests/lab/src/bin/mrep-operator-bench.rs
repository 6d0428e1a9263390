//! `mrep-operator-bench`: the operator at scale on the lab's real node. N MongoReplications (R of
//! them running a replicator pod, the rest `suspend: true`: validated, then scaled to zero) are
//! applied at once; it prints apply→Ready latencies, then, at steady state, every API write made
//! during three resync periods, by client (from the apiserver's audit log), by verb and resource
//! (`apiserver_request_total`), and the objects that actually changed (resourceVersion), with the
//! operator's reconciles, reconcile latency, CPU and memory, and the node's memory.
//!
//! Not a test: it prints figures and asserts nothing about them. Run it with
//! `scripts/bench-operator.sh` (builds first, then runs inside the lab's network namespace).
//!
//! Usage: mrep-operator-bench [--replications N] [--running R] [--namespaces K] [--resync-seconds S]
//! [--concurrency C] [--ready-timeout-seconds T]  (MONGO_REPLICATOR_BIN overrides the binary)

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use mongo_replicator_lab::image::REPLICATOR_IMAGE;
use mongo_replicator_lab::kube::kubeconfig_yaml;
use mongo_replicator_lab::node::{NODE_ADDRESS, NodeLab, Relay};
use mongo_replicator_lab::{RunDir, SecantusOptions, SecantusServer};
use mongodb::bson::doc;
use serde_json::{Value, json};

/// The operator's own client-certificate user, so the audit log tells its requests apart from
/// kube-controller-manager's (which uses the lab's admin kubeconfig). Both carry no useful
/// user agent: kube-rs sends none by default.
const OPERATOR_USER: &str = "mongo-replicator-operator";
const BENCH_MANAGER: &str = "mrep-operator-bench";
const BENCH_LABEL: &str = "mongo-replicator.io/bench";
const WRITE_VERBS: [&str; 6] = ["POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"];
const DOCS_PER_RUNNING_REPLICATION: usize = 100;

struct Args {
    replications: usize,
    running: usize,
    namespaces: usize,
    resync_seconds: u64,
    concurrency: u16,
    ready_timeout: Duration,
}

fn parse_args() -> Result<Args> {
    let mut args =
        Args { replications: 200, running: 20, namespaces: 4, resync_seconds: 20, concurrency: 8, ready_timeout: Duration::from_secs(900) };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--replications" => args.replications = value.parse()?,
            "--running" => args.running = value.parse()?,
            "--namespaces" => args.namespaces = value.parse()?,
            "--resync-seconds" => args.resync_seconds = value.parse()?,
            "--concurrency" => args.concurrency = value.parse()?,
            "--ready-timeout-seconds" => args.ready_timeout = Duration::from_secs(value.parse()?),
            _ => bail!("unknown flag {flag}"),
        }
    }
    args.running = args.running.min(args.replications);
    ensure!(args.namespaces >= 1 && args.replications >= 1, "--replications and --namespaces must be at least 1");
    Ok(args)
}

fn replicator_bin() -> PathBuf {
    std::env::var_os("MONGO_REPLICATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/debug/mongo-replicator")))
}

fn mrep_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("mongo-replicator.io", "v1alpha1", "MongoReplication"), "mongoreplications")
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let bin = replicator_bin();
    ensure!(bin.exists(), "{} not found: run `cargo build --workspace --bins` first", bin.display());
    let run = RunDir::new("operator-bench")?;
    let audit_log = run.path().join("audit.log");
    let policy = run.path().join("audit-policy.yaml");
    // Writes only, at Metadata level: who, verb, object, code.
    std::fs::write(
        &policy,
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
         - level: Metadata\n  verbs: [create, update, patch, delete, deletecollection]\n- level: None\n",
    )?;
    let apiserver_args = vec![
        format!("--audit-policy-file={}", policy.display()),
        format!("--audit-log-path={}", audit_log.display()),
        "--audit-log-format=json".to_string(),
        "--audit-log-mode=blocking".to_string(),
    ];

    let started = Instant::now();
    let node = NodeLab::start_with(&bin, &apiserver_args).await?;
    let kube = node.kube();
    let client = kube.client().await?;
    println!(
        "mrep-operator-bench: {} MongoReplications ({} running, {} suspended) in {} namespaces, resync {} s, operator concurrency {}; node up in {:.1?}; {} cores shared by control plane, node, pods, SecantusDB and operator",
        args.replications,
        args.running,
        args.replications - args.running,
        args.namespaces,
        args.resync_seconds,
        args.concurrency,
        started.elapsed(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );

    // CRD, as a user installs it.
    let crd = tokio::process::Command::new(&bin).arg("crd").output().await?;
    ensure!(crd.status.success(), "mongo-replicator crd failed: {}", String::from_utf8_lossy(&crd.stderr));
    let kubectl = kube.bin_dir().join("kubectl");
    kubectl_run(&kubectl, kube.kubeconfig(), &["apply", "--server-side", &format!("--field-manager={BENCH_MANAGER}"), "-f", "-"], &crd.stdout)
        .await?;
    kubectl_run(
        &kubectl,
        kube.kubeconfig(),
        &["wait", "--for=condition=Established", "crd/mongoreplications.mongo-replicator.io", "--timeout=60s"],
        &[],
    )
    .await?;

    // One source and one target, shared by every replication; each replicates its own database.
    let source = SecantusServer::start(SecantusOptions::default()).await?;
    let target = SecantusServer::start(SecantusOptions::default()).await?;
    let _relays = (Relay::start(source.port()).await?, Relay::start(target.port()).await?);
    let src = source.admin_client().await?;
    for i in 0..args.running {
        let docs = (0..DOCS_PER_RUNNING_REPLICATION).map(|d| doc! {"_id": d as i64, "n": format!("doc-{i}-{d}")});
        src.database(&format!("bench_{i:03}")).collection("items").insert_many(docs).await?;
    }

    let mut namespaces = Vec::new();
    for _ in 0..args.namespaces {
        let ns = node.namespace("bench").await?;
        for (name, server) in [("source-conn", &source), ("target-conn", &target)] {
            let uri = server.uri().replace("127.0.0.1", &NODE_ADDRESS.to_string());
            let secret: Secret =
                serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {"uri": uri}}))?;
            Api::<Secret>::namespaced(client.clone(), &ns).patch(name, &PatchParams::apply(BENCH_MANAGER).force(), &Patch::Apply(&secret)).await?;
        }
        namespaces.push(ns);
    }

    // The operator, as a process with an identity of its own.
    let cert = kube.ca().issue_client("bench-operator", OPERATOR_USER, Some("system:masters"))?;
    let operator_kubeconfig = run.path().join("operator.kubeconfig");
    std::fs::write(&operator_kubeconfig, kubeconfig_yaml(kube.url(), kube.ca().ca_file(), &cert.cert, &cert.key))?;
    let operator_log = run.path().join("operator.log");
    let metrics_port = mongo_replicator_lab::process::free_port()?;
    let out = std::fs::File::create(&operator_log)?;
    let mut operator = tokio::process::Command::new(&bin)
        .arg("operator")
        .env("KUBECONFIG", &operator_kubeconfig)
        .env("MREP_WATCH_NAMESPACES", namespaces.join(","))
        .env("MREP_REPLICATOR_IMAGE", REPLICATOR_IMAGE)
        .env("MREP_REPLICATOR_IMAGE_PULL_POLICY", "Never")
        .env("MREP_LEADER_ELECTION", "false")
        .env("MREP_METRICS_ADDRESS", format!("127.0.0.1:{metrics_port}"))
        .env("MREP_RESYNC_SECONDS", args.resync_seconds.to_string())
        .env("MREP_CONCURRENCY", args.concurrency.to_string())
        .env("MREP_LOG_LEVEL", "info")
        .env("MREP_LOG_FORMAT", "json")
        .env_remove("RUST_LOG")
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start mongo-replicator operator")?;
    let operator_pid = operator.id().context("the operator has no pid")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while operator_metrics(metrics_port).await.is_err() {
        if let Some(status) = operator.try_wait()? {
            bail!("the operator exited with {status}:\n{}", mongo_replicator_lab::process::log_tail(&operator_log, 20));
        }
        ensure!(Instant::now() < deadline, "the operator's /metrics did not answer within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Ready times, as a watch sees them.
    let ready: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let all_mreps: Api<DynamicObject> = Api::all_with(client.clone(), &mrep_resource());
    let watch = tokio::spawn({
        let (ready, api) = (ready.clone(), all_mreps.clone());
        async move {
            let stream = watcher(api, watcher::Config::default().labels(&format!("{BENCH_LABEL}=true"))).default_backoff().applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(object)) = stream.next().await {
                if is_ready(&object) {
                    let key =
                        format!("{}/{}", object.metadata.namespace.clone().unwrap_or_default(), object.metadata.name.clone().unwrap_or_default());
                    ready.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_insert_with(Instant::now);
                }
            }
        }
    });

    // Apply every replication at once, as `kubectl apply -f dir/` would.
    let mut applied: BTreeMap<String, (Instant, bool)> = BTreeMap::new();
    let apply_started = Instant::now();
    for i in 0..args.replications {
        let ns = &namespaces[i % namespaces.len()];
        let name = format!("rep-{i:03}");
        let running = i < args.running;
        let object = json!({
            "apiVersion": "mongo-replicator.io/v1alpha1", "kind": "MongoReplication",
            "metadata": {"name": name, "labels": {BENCH_LABEL: "true"}},
            "spec": {
                "source": {"auth": "connectionString", "connectionStringSecretRef": {"name": "source-conn", "key": "uri"}},
                "target": {"auth": "connectionString", "connectionStringSecretRef": {"name": "target-conn", "key": "uri"}},
                "namespaces": {"include": [format!("bench_{i:03}.*")]},
                "suspend": !running,
                "replicator": {"workers": 1, "batchSize": 500},
            },
        });
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &mrep_resource());
        applied.insert(format!("{ns}/{name}"), (Instant::now(), running));
        api.patch(&name, &PatchParams::apply(BENCH_MANAGER).force(), &Patch::Apply(&object)).await?;
    }
    println!("applied {} MongoReplications in {:.1?}", args.replications, apply_started.elapsed());

    let deadline = Instant::now() + args.ready_timeout;
    let mut last_print = Instant::now();
    loop {
        let count = ready.lock().unwrap_or_else(|p| p.into_inner()).len();
        if count >= args.replications {
            break;
        }
        if let Some(status) = operator.try_wait()? {
            bail!("the operator exited with {status}:\n{}", mongo_replicator_lab::process::log_tail(&operator_log, 20));
        }
        if last_print.elapsed() > Duration::from_secs(30) {
            last_print = Instant::now();
            println!("  {:>5.0} s: {count}/{} Ready; phases {}", apply_started.elapsed().as_secs_f64(), args.replications, phases(&all_mreps).await?);
        }
        if Instant::now() > deadline {
            bail!(
                "{count} of {} Ready after {:?}; phases {}; operator log:\n{}",
                args.replications,
                args.ready_timeout,
                phases(&all_mreps).await?,
                mongo_replicator_lab::process::log_tail(&operator_log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let all_ready = apply_started.elapsed();
    watch.abort();
    let ready = ready.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let latencies = |running: bool| -> Vec<f64> {
        let mut v: Vec<f64> = applied
            .iter()
            .filter(|(_, (_, r))| *r == running)
            .filter_map(|(key, (at, _))| Some(ready.get(key)?.duration_since(*at).as_secs_f64()))
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    println!("all {} Ready {:.1} s after the first apply", args.replications, all_ready.as_secs_f64());
    println!("{:<28} {:>6} {:>8} {:>8} {:>8}", "apply -> Ready (s)", "n", "p50", "p95", "max");
    for (label, running) in [("running (replicator pod)", true), ("suspended (validated, 0 pods)", false)] {
        let v = latencies(running);
        if !v.is_empty() {
            println!("{label:<28} {:>6} {:>8.1} {:>8.1} {:>8.1}", v.len(), pct(&v, 0.50), pct(&v, 0.95), v[v.len() - 1]);
        }
    }

    // Steady state: one resync period for what Ready set off (a last requeue, Deployment
    // status), then three periods measured.
    let resync = Duration::from_secs(args.resync_seconds);
    tokio::time::sleep(resync).await;
    let rss_before = proc_status_kb(operator_pid, "VmRSS")?;
    let cpu_before = cpu_seconds(operator_pid)?;
    let api_before = apiserver_writes(&client).await?;
    let op_before = operator_metrics(metrics_port).await?;
    let objects_before = resource_versions(&client, &namespaces).await?;
    let audit_from = std::fs::metadata(&audit_log)?.len();
    let window_started = Instant::now();
    tokio::time::sleep(resync * 3).await;
    let audit_to = std::fs::metadata(&audit_log)?.len();
    let window = window_started.elapsed();
    let objects_after = resource_versions(&client, &namespaces).await?;
    let op_after = operator_metrics(metrics_port).await?;
    let api_after = apiserver_writes(&client).await?;
    let cpu = cpu_seconds(operator_pid)? - cpu_before;
    let rss_after = proc_status_kb(operator_pid, "VmRSS")?;
    let hwm = proc_status_kb(operator_pid, "VmHWM")?;

    println!(
        "\nsteady state: window of {:.1} s (3 x resync {} s), starting one resync period after all Ready",
        window.as_secs_f64(),
        args.resync_seconds
    );
    report_audit(&audit_log, audit_from, audit_to, &namespaces)?;
    report_request_metrics(&api_before, &api_after);
    report_changes(&objects_before, &objects_after);

    let reconciles = |m: &Metrics, result: &str| m.value("mongo_replicator_operator_reconciles_total", &[("result", result)]);
    let (ok, errors) = (reconciles(&op_after, "ok") - reconciles(&op_before, "ok"), reconciles(&op_after, "error") - reconciles(&op_before, "error"));
    let buckets = histogram_delta(&op_before, &op_after, "mongo_replicator_operator_reconcile_duration_seconds");
    println!(
        "\noperator: {ok:.0} reconciles ({errors:.0} failed) in the window, {:.1}/s; reconcile latency p50 {} p99 {} (histogram buckets, interpolated); CPU {:.2} s ({:.1}% of one core)",
        ok / window.as_secs_f64(),
        fmt_ms(quantile(&buckets, 0.50)),
        fmt_ms(quantile(&buckets, 0.99)),
        cpu,
        cpu / window.as_secs_f64() * 100.0
    );
    println!("operator memory: VmRSS {} MB at window start, {} MB at its end, peak (VmHWM) {} MB", mb(rss_before), mb(rss_after), mb(hwm));
    report_memory(&node);
    println!("\nlogs: operator {}, audit {} (removed at exit)", operator_log.display(), audit_log.display());
    let _ = operator.start_kill();
    let _ = operator.wait().await;
    Ok(())
}

async fn kubectl_run(kubectl: &Path, kubeconfig: &Path, args: &[&str], input: &[u8]) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {}", kubectl.display()))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    stdin.write_all(input).await?;
    drop(stdin);
    let status = child.wait().await?;
    ensure!(status.success(), "kubectl {} failed ({status})", args.join(" "));
    Ok(())
}

fn is_ready(object: &DynamicObject) -> bool {
    let generation = object.metadata.generation;
    object.data["status"]["conditions"].as_array().is_some_and(|conditions| {
        conditions.iter().any(|c| c["type"] == "Ready" && c["status"] == "True" && c["observedGeneration"].as_i64() == generation)
    })
}

async fn phases(api: &Api<DynamicObject>) -> Result<String> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for object in api.list(&ListParams::default().labels(&format!("{BENCH_LABEL}=true"))).await?.items {
        *counts.entry(object.data["status"]["phase"].as_str().unwrap_or("(none)").to_string()).or_default() += 1;
    }
    Ok(counts.iter().map(|(p, n)| format!("{p}={n}")).collect::<Vec<_>>().join(" "))
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Samples of a Prometheus text exposition: (name, labels, value).
struct Metrics(Vec<(String, BTreeMap<String, String>, f64)>);

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (series, value) = match line.rsplit_once(' ') {
                Some(split) => split,
                None => continue,
            };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            // Label values here never contain `",`.
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                if let Some((k, v)) = pair.split_once("=\"") {
                    map.insert(k.trim_start_matches(',').to_string(), v.trim_end_matches('"').to_string());
                }
            }
            out.push((name.to_string(), map, value));
        }
        Metrics(out)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0.iter().filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))).map(|(_, _, v)| v).sum()
    }
}

async fn operator_metrics(port: u16) -> Result<Metrics> {
    let answer = mongo_replicator_lab::process::http_get(port, "/metrics").await?;
    ensure!(answer.starts_with("HTTP/1.1 200"), "operator /metrics: {}", answer.lines().next().unwrap_or_default());
    Ok(Metrics::parse(answer.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default()))
}

/// `apiserver_request_total` of write verbs, summed by (verb, resource/subresource).
async fn apiserver_writes(client: &kube::Client) -> Result<BTreeMap<(String, String), f64>> {
    let text = client.request_text(http::Request::get("/metrics").body(Vec::new())?).await?;
    let mut out = BTreeMap::new();
    for (name, labels, value) in Metrics::parse(&text).0 {
        if name != "apiserver_request_total" {
            continue;
        }
        let verb = labels.get("verb").cloned().unwrap_or_default();
        if !WRITE_VERBS.contains(&verb.as_str()) {
            continue;
        }
        let mut resource = labels.get("resource").cloned().unwrap_or_default();
        if let Some(sub) = labels.get("subresource").filter(|s| !s.is_empty()) {
            resource = format!("{resource}/{sub}");
        }
        *out.entry((verb, resource)).or_insert(0.0) += value;
    }
    Ok(out)
}

fn report_request_metrics(before: &BTreeMap<(String, String), f64>, after: &BTreeMap<(String, String), f64>) {
    let mut rows: Vec<(&(String, String), f64)> =
        after.iter().map(|(k, v)| (k, v - before.get(k).copied().unwrap_or(0.0))).filter(|(_, d)| *d > 0.0).collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = rows.iter().map(|(_, d)| d).sum();
    println!("\napiserver_request_total, write verbs, whole cluster ({total:.0}; APPLY = server-side apply PATCH):");
    for ((verb, resource), d) in rows {
        println!("  {d:>7.0}  {verb:<7} {resource}");
    }
}

/// Who wrote what, from the audit log between two offsets.
fn report_audit(path: &Path, from: u64, to: u64, namespaces: &[String]) -> Result<()> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut text = String::new();
    file.take(to - from).read_to_string(&mut text)?;
    let mut by_client: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_client_verb: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    let mut operator_objects: BTreeMap<String, usize> = BTreeMap::new();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<Value>(line) else { continue };
        if event["stage"] != "ResponseComplete" {
            continue;
        }
        let user = event["user"]["username"].as_str().unwrap_or_default();
        let agent = event["userAgent"].as_str().unwrap_or_default();
        let client = client_of(user, agent);
        let object = &event["objectRef"];
        let mut resource = object["resource"].as_str().unwrap_or_default().to_string();
        if let Some(sub) = object["subresource"].as_str() {
            resource = format!("{resource}/{sub}");
        }
        let namespace = object["namespace"].as_str().unwrap_or_default();
        let scope = if namespaces.iter().any(|n| n == namespace) {
            "bench ns"
        } else if namespace.is_empty() {
            "cluster"
        } else {
            namespace
        };
        *by_client.entry(client.clone()).or_default() += 1;
        let verb = format!("{} {}", event["verb"].as_str().unwrap_or_default(), event["responseStatus"]["code"].as_i64().unwrap_or_default());
        *by_client_verb.entry((client.clone(), verb.clone(), format!("{resource} ({scope})"))).or_default() += 1;
        if client == "operator" {
            let name = format!("{verb} {resource} {namespace}/{}", object["name"].as_str().unwrap_or_default());
            *operator_objects.entry(name).or_default() += 1;
        }
    }
    let total: usize = by_client.values().sum();
    println!("API write requests in the window, by client (audit log: create/update/patch/delete; {total} in all):");
    for (client, n) in &by_client {
        println!("  {n:>7}  {client}");
    }
    println!("by client, verb + HTTP code, resource:");
    let mut rows: Vec<_> = by_client_verb.into_iter().collect();
    rows.sort_by(|a, b| a.0.0.cmp(&b.0.0).then(b.1.cmp(&a.1)));
    for ((client, verb, resource), n) in rows {
        println!("  {n:>7}  {client:<24} {verb:<10} {resource}");
    }
    if !operator_objects.is_empty() {
        let distinct = operator_objects.len();
        let mut top: Vec<_> = operator_objects.into_iter().collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        println!("operator writes hit {distinct} distinct (verb, object) pairs; the most written:");
        for (object, n) in top.iter().take(8) {
            println!("  {n:>7}  {object}");
        }
    }
    Ok(())
}

fn client_of(user: &str, agent: &str) -> String {
    if user == OPERATOR_USER {
        "operator".into()
    } else if user.starts_with("system:serviceaccount:") && user.ends_with("-replicator") {
        "replicator (progress)".into()
    } else if user.starts_with("system:node:") {
        "kubelet".into()
    } else if agent.starts_with("kube-controller-manager") {
        format!("kube-controller-manager/{}", agent.rsplit('/').next().unwrap_or_default())
    } else {
        let program = agent.split('/').next().filter(|a| !a.is_empty()).unwrap_or("(no user agent)");
        format!("{program} as {user}")
    }
}

type Versions = BTreeMap<(String, String), (String, String)>;

/// resourceVersion and last writer (the managedFields entry with the newest time) of every
/// object of the kinds the operator and its pods touch, in the benchmark's namespaces.
async fn resource_versions(client: &kube::Client, namespaces: &[String]) -> Result<Versions> {
    let kinds = [
        ("MongoReplication", mrep_resource()),
        ("ServiceAccount", ApiResource::erase::<ServiceAccount>(&())),
        ("ConfigMap", ApiResource::erase::<ConfigMap>(&())),
        ("Role", ApiResource::erase::<Role>(&())),
        ("RoleBinding", ApiResource::erase::<RoleBinding>(&())),
        ("Job", ApiResource::erase::<Job>(&())),
        ("Deployment", ApiResource::erase::<Deployment>(&())),
        ("ReplicaSet", ApiResource::erase::<ReplicaSet>(&())),
        ("Pod", ApiResource::erase::<Pod>(&())),
        ("Secret", ApiResource::erase::<Secret>(&())),
    ];
    let mut out = BTreeMap::new();
    for ns in namespaces {
        for (kind, resource) in &kinds {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, resource);
            for object in api.list(&ListParams::default()).await?.items {
                let writer = object
                    .metadata
                    .managed_fields
                    .iter()
                    .flatten()
                    .max_by_key(|m| m.time.as_ref().map(|t| t.0))
                    .map(|m| {
                        let sub = m.subresource.as_deref().map(|s| format!("/{s}")).unwrap_or_default();
                        format!("{}{sub} ({})", m.manager.as_deref().unwrap_or("?"), m.operation.as_deref().unwrap_or("?"))
                    })
                    .unwrap_or_default();
                let key = (kind.to_string(), format!("{ns}/{}", object.metadata.name.unwrap_or_default()));
                out.insert(key, (object.metadata.resource_version.unwrap_or_default(), writer));
            }
        }
    }
    Ok(out)
}

fn report_changes(before: &Versions, after: &Versions) {
    let mut changed: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (key, (rv, writer)) in after {
        match before.get(key) {
            Some((old, _)) if old == rv => {}
            Some(_) => *changed.entry((key.0.clone(), format!("modified, last by {writer}"))).or_default() += 1,
            None => *changed.entry((key.0.clone(), format!("created, last by {writer}"))).or_default() += 1,
        }
    }
    for key in before.keys().filter(|k| !after.contains_key(*k)) {
        *changed.entry((key.0.clone(), "deleted".into())).or_default() += 1;
    }
    let total: usize = changed.values().sum();
    println!("objects whose resourceVersion changed in the window, bench namespaces ({total}; a no-op apply leaves it unchanged):");
    for ((kind, what), n) in &changed {
        println!("  {n:>7}  {kind:<16} {what}");
    }
}

/// Per-bucket counts (upper bound, count in window) of a histogram, from cumulative samples.
fn histogram_delta(before: &Metrics, after: &Metrics, name: &str) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut cumulative: Vec<(f64, f64)> = after
        .0
        .iter()
        .filter(|(n, _, _)| *n == bucket)
        .filter_map(|(_, labels, v)| {
            let le = labels.get("le")?;
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((bound, v - before.value(&bucket, &[("le", le)])))
        })
        .collect();
    cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
    cumulative
}

/// Prometheus' histogram_quantile: linear within the bucket holding the rank.
fn quantile(cumulative: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = cumulative.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(bound, count) in cumulative {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            return Some(if inside > 0.0 { lower + (bound - lower) * (rank - below) / inside } else { bound });
        }
        (lower, below) = (bound, count);
    }
    Some(lower)
}

fn fmt_ms(seconds: Option<f64>) -> String {
    seconds.map(|s| format!("{:.0} ms", s * 1000.0)).unwrap_or_else(|| "-".into())
}

fn proc_status_kb(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("odd /proc stat")?.1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

fn mb(kb: u64) -> String {
    format!("{:.0}", kb as f64 / 1024.0)
}

/// The node's daemons, the control plane, the replicator processes and the pods' cgroup.
fn report_memory(node: &NodeLab) {
    let mut by_name: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for (name, kb) in node.memory_kb() {
        let entry = by_name.entry(name).or_default();
        entry.0 += 1;
        entry.1 += kb;
    }
    let kube_dir = node.kube().dir().display().to_string();
    let (mut replicators, mut replicator_kb) = (0usize, 0u64);
    for (pid, cmdline) in mongo_replicator_lab::node::processes() {
        let rss = || proc_status_kb(pid as u32, "VmRSS").unwrap_or(0);
        if cmdline.contains(&kube_dir) {
            let name = cmdline.split('\0').next().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_string();
            let entry = by_name.entry(name).or_default();
            entry.0 += 1;
            entry.1 += rss();
        } else if cmdline.contains("replicate\0--config") {
            replicators += 1;
            replicator_kb += rss();
        }
    }
    let parts: Vec<String> =
        by_name.iter().map(|(name, (n, kb))| if *n > 1 { format!("{name} x{n} {} MB", mb(*kb)) } else { format!("{name} {} MB", mb(*kb)) }).collect();
    println!("node and control plane RSS: {}", parts.join(", "));
    if replicators > 0 {
        println!(
            "replicator processes: {replicators}, {} MB RSS in all, {:.1} MB each",
            mb(replicator_kb),
            replicator_kb as f64 / 1024.0 / replicators as f64
        );
    }
    let pods = std::fs::read_to_string(format!("/sys/fs/cgroup/memory/{}/memory.stat", node.cgroup_root()))
        .ok()
        .and_then(|stat| stat.lines().find(|l| l.starts_with("total_rss ")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()));
    if let Some(bytes) = pods {
        println!("pods' cgroup ({}): total_rss {} MB", node.cgroup_root(), mb(bytes / 1024));
    }
    if let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") {
        let field = |f: &str| meminfo.lines().find(|l| l.starts_with(f)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()).unwrap_or(0);
        println!("machine: MemTotal {} MB, MemAvailable {} MB (shared with other users)", mb(field("MemTotal:")), mb(field("MemAvailable:")));
    }
}
