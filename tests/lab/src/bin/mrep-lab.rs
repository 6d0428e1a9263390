//! `mrep-lab`: the lab from a terminal.
//!
//! - `mrep-lab demo` starts the control plane, installs the CRD with `mongo-replicator crd`,
//!   applies an example and shows it the way a user would see it.
//! - `mrep-lab up` starts the control plane and a SecantusDB server and waits for Ctrl-C,
//!   printing a KUBECONFIG and a connection string to use meanwhile.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use mongo_replicator_lab::{KubeLab, SecantusOptions, SecantusServer};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const USAGE: &str = "usage: mrep-lab demo [--example FILE] [--keep] | mrep-lab up
  demo   start the lab, install the CRD, apply an example (default examples/orders-dr.yaml), show it;
         --keep waits for Ctrl-C before stopping the lab
  up     start the lab's control plane and a SecantusDB server, print how to reach them, wait for Ctrl-C";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") => demo(&args[1..]).await,
        Some("up") => up().await,
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
    let mut example = repo_root().join("examples/orders-dr.yaml");
    let mut keep = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--example" => example = PathBuf::from(it.next().context("--example needs a file")?),
            "--keep" => keep = true,
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let operator = std::env::var_os("MONGO_REPLICATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug/mongo-replicator"));
    if !operator.exists() {
        bail!("{} not found: build it with `cargo build` or set MONGO_REPLICATOR_BIN", operator.display());
    }

    step("starting etcd, kube-apiserver and kube-controller-manager");
    let started = std::time::Instant::now();
    let lab = KubeLab::start().await?;
    println!("   {} at {} in {:.1?}", lab.versions(), lab.url(), started.elapsed());
    let kubectl = Kubectl { bin: lab.bin_dir().join("kubectl"), kubeconfig: lab.kubeconfig().to_path_buf() };

    step("mongo-replicator crd | kubectl apply --server-side -f -");
    let crd = Command::new(&operator).arg("crd").output().await?;
    if !crd.status.success() {
        bail!("mongo-replicator crd failed: {}", String::from_utf8_lossy(&crd.stderr));
    }
    kubectl.run_with_input(&["apply", "--server-side", "--field-manager=mongo-replicator-demo", "-f", "-"], &crd.stdout).await?;
    kubectl.run(&["wait", "--for=condition=Established", "crd/mongoreplications.mongo-replicator.io", "--timeout=60s"]).await?;

    step(&format!("kubectl create namespace demo && kubectl apply -n demo -f {}", example.display()));
    kubectl.run(&["create", "namespace", "demo"]).await?;
    kubectl.run(&["apply", "-n", "demo", "-f", &example.display().to_string()]).await?;

    step("kubectl get mongoreplications -n demo");
    kubectl.run(&["get", "mongoreplications", "-n", "demo"]).await?;
    step("kubectl get mrep -n demo -o yaml (defaults filled in by the apiserver)");
    kubectl.run(&["get", "mrep", "-n", "demo", "-o", "yaml"]).await?;
    step("kubectl explain mongoreplication.spec.source");
    kubectl.run(&["explain", "mongoreplication.spec.source"]).await?;

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

    if keep {
        println!("\nThe lab keeps running; in another shell:\n  export KUBECONFIG={}\n  export PATH={}:$PATH\nCtrl-C stops it.", lab.kubeconfig().display(), lab.bin_dir().display());
        tokio::signal::ctrl_c().await?;
    }
    step("stopping the lab");
    Ok(())
}

async fn up() -> Result<()> {
    let lab = KubeLab::start().await?;
    let mongo = SecantusServer::start(SecantusOptions::default()).await?;
    println!("lab ready: {} at {}", lab.versions(), lab.url());
    println!("  export KUBECONFIG={}", lab.kubeconfig().display());
    println!("  export PATH={}:$PATH", lab.bin_dir().display());
    println!("  SecantusDB: {}", mongo.uri());
    println!("Ctrl-C stops everything.");
    tokio::signal::ctrl_c().await?;
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
