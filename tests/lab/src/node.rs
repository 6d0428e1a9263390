//! A real node for the lab's control plane: containerd + runc run pods as containers, the
//! kubelet and kube-proxy manage them, kube-scheduler places them, and the real Azure workload
//! identity webhook mutates them as on AKS.
//!
//! Containment (the host is left as it was found):
//! - Network: the node only starts inside a network namespace the lab made (`scripts/test.sh` and
//!   `mrep-lab up` run in `unshare --net` with loopback up). The bridge, its address, iptables
//!   chains, `net.*` sysctls and every pod address live there; pods have no route out and no
//!   masquerading.
//! - Mounts, processes: containerd, the kubelet and kube-proxy run in one private mount namespace
//!   and one PID namespace (`unshare --mount --pid --fork --kill-child --mount-proc`), as children
//!   of the test process: when it dies for any reason the namespace's init dies, and the kernel
//!   kills every process of the node (shims and containers included). Small files are bound over
//!   the three `/proc/sys` entries the kubelet rewrites, and lab directories over `/run`,
//!   `/var/lib` and `/var/log`; all of that vanishes with the mount namespace.
//! - Cgroups (v1, global): pods live under a lab-specific `cgroupRoot` (`mrep-lab-<pid>-<n>` in
//!   every hierarchy), removed when the node stops; roots of dead runs are removed at start.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::OnceCell;

use crate::image::{self, PAUSE_IMAGE, REPLICATOR_IMAGE};
use crate::kube::{KubeLab, KubeOptions, args, kubeconfig_yaml};
use crate::pki::CertFiles;
use crate::process::{LabProcess, free_port};
use crate::{RunDir, cached_tool};

/// The bridge pods are attached to; its address is the node's InternalIP.
pub const BRIDGE: &str = "mrep0";
/// The node's address on the bridge: pods reach the apiserver, SecantusDB and the doubles here.
pub const NODE_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
const POD_SUBNET: &str = "10.244.0.0/24";
const SERVICE_RANGE: &str = "10.96.0.0/16";
/// The node's name.
pub const NODE_NAME: &str = "lab-node";
/// The workload identity webhook's port (controller-runtime's fixed default).
pub const WEBHOOK_PORT: u16 = 9443;
/// The three host sysctls the kubelet rewrites at start; the node sees lab files in their place.
const SHADOWED_SYSCTLS: [&str; 3] = ["vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"];
const CGROUP_PREFIX: &str = "mrep-lab-";

/// A running node with its own control plane.
pub struct NodeLab {
    // Declared in stop order.
    node: Mutex<Option<LabProcess>>,
    // Held so that they stop with the lab.
    _webhook: LabProcess,
    _scheduler: LabProcess,
    kube: KubeLab,
    cgroup_root: String,
    bins: PathBuf,
    socket: PathBuf,
    timings: NodeTimings,
    dir: RunDir,
}

/// How long the node took to come up.
#[derive(Clone, Debug)]
pub struct NodeTimings {
    /// From the node's processes starting to the node Ready and untainted.
    pub ready: Duration,
    /// Building the images and importing them into containerd (after Ready).
    pub images: Duration,
    /// The whole start, control plane included.
    pub total: Duration,
}

impl NodeLab {
    /// The node shared by every test of this process (one node per network namespace: the
    /// kubelet's and kube-proxy's iptables chains and the bridge are per namespace). Each test
    /// works in namespaces of its own. Stopped when the process exits.
    pub async fn shared(replicator: &Path) -> Result<&'static NodeLab> {
        static SHARED: OnceCell<std::result::Result<NodeLab, String>> = OnceCell::const_new();
        let replicator = replicator.to_path_buf();
        SHARED
            .get_or_init(|| async move {
                let lab = NodeLab::start(&replicator).await.map_err(|err| format!("{err:#}"))?;
                // Statics are never dropped: stop the node (and remove its cgroups) at exit.
                extern "C" fn stop_shared() {
                    if let Some(Ok(lab)) = SHARED.get() {
                        lab.stop_node();
                        // Its run directories (containerd's content store is most of it).
                        let _ = std::fs::remove_dir_all(lab.dir.path());
                    }
                }
                // SAFETY: registering a plain function with no captured state.
                unsafe { libc::atexit(stop_shared) };
                Ok(lab)
            })
            .await
            .as_ref()
            .map_err(|err| anyhow::anyhow!("the lab's node did not start: {err}"))
    }

    /// Starts a control plane, a node and the webhook; `replicator` is the `mongo-replicator`
    /// binary the lab's image is built from.
    pub async fn start(replicator: &Path) -> Result<NodeLab> {
        Self::start_with(replicator, &[]).await
    }

    /// Like [`NodeLab::start`], with extra kube-apiserver flags (`--flag=value`).
    pub async fn start_with(replicator: &Path, apiserver_args: &[String]) -> Result<NodeLab> {
        let started = Instant::now();
        ensure_lab_network_namespace()?;
        clean_stale_cgroups();
        let bins = cached_tool("build-node.sh", "node binaries")?;
        let dir = RunDir::new("node")?;
        let d = dir.path().to_path_buf();
        for sub in [
            "run",
            "var-lib",
            "var-log",
            "sysctl",
            "kubelet",
            "kubelet-plugins",
            "containerd",
            "cni/net.d",
            "cni/ipam",
            "pki",
            "images",
            "webhook-certs",
        ] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        reset_network()?;
        create_bridge()?;

        let kube = KubeLab::start_with(KubeOptions { node_address: Some(IpAddr::V4(NODE_ADDRESS)), apiserver_args: apiserver_args.to_vec() }).await?;
        let ca = kube.ca();
        let url = kube.url().to_string();
        let kubeconfig_for = |stem: &str, cert: &CertFiles| -> Result<PathBuf> {
            let path = d.join(format!("{stem}.kubeconfig"));
            std::fs::write(&path, kubeconfig_yaml(&url, ca.ca_file(), &cert.cert, &cert.key))?;
            Ok(path)
        };

        // kube-scheduler, as system:kube-scheduler (bound by the default RBAC policy).
        let scheduler_cert = ca.issue_client("scheduler", "system:kube-scheduler", None)?;
        let scheduler_kubeconfig = kubeconfig_for("scheduler", &scheduler_cert)?.display().to_string();
        let scheduler = LabProcess::spawn(
            "kube-scheduler",
            &bins.join("kube-scheduler"),
            &args(&[
                ("--kubeconfig", &scheduler_kubeconfig),
                ("--authentication-kubeconfig", &scheduler_kubeconfig),
                ("--authorization-kubeconfig", &scheduler_kubeconfig),
                ("--bind-address", "127.0.0.1"),
                ("--secure-port", &free_port()?.to_string()),
                ("--leader-elect", "false"),
                ("--v", "1"),
            ]),
            &d.join("kube-scheduler.log"),
        )?;

        // The workload identity webhook, registered by URL on loopback.
        let webhook = start_webhook(&kube, &d, &bins).await?;

        // The node.
        // `<pid>-node-<n>`, like the run directory: stale roots are found by their pid.
        let cgroup_root = format!("{CGROUP_PREFIX}{}", d.file_name().and_then(|n| n.to_str()).context("run directory without a name")?);
        create_cgroup_root(&cgroup_root)?;
        let kubelet_cert = ca.issue_client("kubelet", &format!("system:node:{NODE_NAME}"), Some("system:nodes"))?;
        let kubelet_serving = ca.issue_server_with_ips("kubelet-serving", &[NODE_NAME], &[IpAddr::V4(NODE_ADDRESS)])?;
        let kubelet_kubeconfig = kubeconfig_for("kubelet", &kubelet_cert)?;
        let proxy_cert = ca.issue_client("kube-proxy", "system:kube-proxy", None)?;
        let proxy_kubeconfig = kubeconfig_for("kube-proxy", &proxy_cert)?;
        let socket = d.join("containerd/containerd.sock");
        ensure!(socket.as_os_str().len() < 100, "containerd's socket path is too long for a Unix socket: {}", socket.display());
        write_node_config(&NodeFiles {
            dir: &d,
            bins: &bins,
            socket: &socket,
            cgroup_root: &cgroup_root,
            ca_file: ca.ca_file(),
            kubelet_serving: &kubelet_serving,
            kubelet_kubeconfig: &kubelet_kubeconfig,
            proxy_kubeconfig: &proxy_kubeconfig,
        })?;
        let node_started = Instant::now();
        let node = LabProcess::spawn(
            "node",
            Path::new("unshare"),
            &[
                "--mount".into(),
                "--propagation".into(),
                "private".into(),
                "--pid".into(),
                "--fork".into(),
                "--kill-child".into(),
                "--mount-proc".into(),
                "--".into(),
                "bash".into(),
                d.join("node-init.sh").display().to_string(),
            ],
            &d.join("node-init.log"),
        )?;
        let mut lab = NodeLab {
            node: Mutex::new(Some(node)),
            _webhook: webhook,
            _scheduler: scheduler,
            kube,
            cgroup_root,
            bins,
            socket,
            timings: NodeTimings { ready: Duration::ZERO, images: Duration::ZERO, total: Duration::ZERO },
            dir,
        };
        lab.wait_containerd(Duration::from_secs(60)).await?;
        lab.wait_node_ready(Duration::from_secs(120)).await?;
        lab.timings.ready = node_started.elapsed();
        // No pod can be scheduled before this returns, so the images may come after Ready.
        let images_started = Instant::now();
        lab.import(&image::pause_image(&lab.bins.join("pause"))?, PAUSE_IMAGE)?;
        lab.import(&image::replicator_image(replicator)?, REPLICATOR_IMAGE)?;
        lab.timings.images = images_started.elapsed();
        lab.timings.total = started.elapsed();
        tracing::info!(timings = ?lab.timings, "lab node ready");
        Ok(lab)
    }

    fn check_node_running(&self) -> Result<()> {
        let mut node = self.node.lock().map_err(|_| anyhow::anyhow!("node lock poisoned"))?;
        match node.as_mut() {
            Some(process) => process.check_running().map_err(|err| anyhow::anyhow!("{err:#}\n{}", self.logs_tail(30))),
            None => bail!("the node was stopped"),
        }
    }

    /// The last lines of containerd's, the kubelet's and kube-proxy's logs.
    pub fn logs_tail(&self, lines: usize) -> String {
        ["containerd", "kubelet", "kube-proxy"]
            .iter()
            .map(|name| format!("--- {name}:\n{}", crate::process::log_tail(&self.dir.path().join(format!("{name}.log")), lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn wait_containerd(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_node_running()?;
            if self.socket.exists() && self.ctr(&["version"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("containerd did not answer within {timeout:?}\n{}", self.logs_tail(30));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `ctr` against the node's containerd in the `k8s.io` namespace (the kubelet's).
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(self.bins.join("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .context("cannot run ctr")?;
        if !out.status.success() {
            bail!("ctr {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Builds `image` as an OCI archive and imports it into the node's containerd as `name`.
    pub fn import(&self, image: &image::ImageSpec, name: &str) -> Result<()> {
        let file = self.dir.path().join("images").join(format!("{}.tar", name.replace(['/', ':'], "_")));
        image.write_oci_archive(name, &file)?;
        self.ctr(&["images", "import", "--platform", "linux/amd64", &file.display().to_string()])?;
        let _ = std::fs::remove_file(&file);
        let listed = self.ctr(&["images", "ls", "-q"])?;
        ensure!(listed.lines().any(|l| l.trim() == name), "containerd did not keep {name} after import (it has: {listed})");
        Ok(())
    }

    async fn wait_node_ready(&self, timeout: Duration) -> Result<()> {
        let api: Api<Node> = Api::all(self.kube.client().await?);
        let deadline = Instant::now() + timeout;
        let mut last = String::from("not registered");
        loop {
            self.check_node_running()?;
            if let Some(node) = api.get_opt(NODE_NAME).await? {
                let ready = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                    .map(|c| (c.status.clone(), c.message.clone().unwrap_or_default()));
                let taints: Vec<String> =
                    node.spec.as_ref().and_then(|s| s.taints.as_ref()).map(|t| t.iter().map(|t| t.key.clone()).collect()).unwrap_or_default();
                match ready {
                    Some((status, _)) if status == "True" && taints.is_empty() => return Ok(()),
                    Some((status, message)) => last = format!("Ready={status} ({message}), taints {taints:?}"),
                    None => last = "no Ready condition".into(),
                }
            }
            if Instant::now() > deadline {
                bail!("node {NODE_NAME} not Ready within {timeout:?}: {last}\n{}", self.logs_tail(30));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops containerd, the kubelet, kube-proxy and every pod (the PID namespace dies), then
    /// removes the node's cgroups and its iptables chains. Idempotent.
    pub fn stop_node(&self) {
        let Ok(mut node) = self.node.lock() else {
            return;
        };
        let Some(mut process) = node.take() else {
            return;
        };
        process.kill();
        // The namespace's processes die asynchronously after its init: wait for the cgroups to empty.
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && !remove_cgroup_root(&self.cgroup_root) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new(self.bins.join("kube-proxy")).arg("--cleanup").output();
        let _ = reset_network();
    }

    /// The control plane the node belongs to.
    pub fn kube(&self) -> &KubeLab {
        &self.kube
    }

    /// The lab-specific cgroup root (a directory name in every hierarchy).
    pub fn cgroup_root(&self) -> &str {
        &self.cgroup_root
    }

    /// The node's start-up figures.
    pub fn timings(&self) -> &NodeTimings {
        &self.timings
    }

    /// The node's run directory (configs and logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Resident memory (kB) of containerd, the kubelet, kube-proxy and the shims, by command.
    pub fn memory_kb(&self) -> Vec<(String, u64)> {
        let dir = self.dir.path().display().to_string();
        let mut out = Vec::new();
        for (pid, cmdline) in processes() {
            if !cmdline.contains(&dir) {
                continue;
            }
            let name = cmdline.split('\0').next().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_string();
            let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
                .unwrap_or(0);
            out.push((name, rss));
        }
        out
    }

    /// Creates a namespace named `<prefix>-<random>` and waits for its `default` ServiceAccount.
    pub async fn namespace(&self, prefix: &str) -> Result<String> {
        let client = self.kube.client().await?;
        let api: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace { metadata: ObjectMeta { generate_name: Some(format!("{prefix}-")), ..Default::default() }, ..Default::default() };
        let name = api.create(&PostParams::default(), &ns).await?.metadata.name.context("namespace without a name")?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, &name);
        let deadline = Instant::now() + Duration::from_secs(30);
        while accounts.get_opt("default").await?.is_none() {
            ensure!(Instant::now() < deadline, "no default ServiceAccount in {name} after 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(name)
    }

    /// Whether the node's processes still run.
    pub fn is_running(&self) -> bool {
        self.check_node_running().is_ok()
    }

    /// `unshare`'s process id (the node's processes are its descendants).
    pub fn pid(&self) -> Option<u32> {
        self.node.lock().ok()?.as_ref().map(LabProcess::pid)
    }
}

impl Drop for NodeLab {
    fn drop(&mut self) {
        self.stop_node();
    }
}

/// Refuses to start outside a network namespace of the lab's own: the node adds a bridge,
/// iptables chains and addresses that must never land on the host. A lab namespace has no
/// interface but loopback and the lab's own (the bridge, pods' veths): so no route out either.
/// (The host's namespace cannot be named here: /proc/1/ns is not readable on these machines.)
pub fn ensure_lab_network_namespace() -> Result<()> {
    let foreign: Vec<String> = interfaces()?.into_iter().filter(|name| !(name == "lo" || name == BRIDGE || name.starts_with("veth"))).collect();
    if !foreign.is_empty() {
        bail!(
            "the lab's node runs only inside a network namespace of its own, and this one has {foreign:?}; run the tests with \
             `bash scripts/test.sh` (or `bash scripts/in-lab-netns.sh COMMAND`), or the node with `mrep-lab up`"
        );
    }
    Ok(())
}

/// The interfaces of this process's network namespace (`/sys/class/net` shows the namespace of
/// whoever mounted sysfs; `/proc/self/net/dev` is the reader's).
fn interfaces() -> Result<Vec<String>> {
    let dev = std::fs::read_to_string("/proc/self/net/dev").context("cannot read /proc/self/net/dev")?;
    Ok(dev.lines().skip(2).filter_map(|l| Some(l.split_once(':')?.0.trim().to_string())).collect())
}

/// The environment variable naming a process in the host's network namespace (set by
/// `scripts/in-lab-netns.sh`), through which tests read the host's network state.
pub const HOST_NET_PID_ENV: &str = "MREP_HOST_NET_PID";

/// Whether this process is in the host's network namespace.
pub fn in_host_network_namespace() -> bool {
    ensure_lab_network_namespace().is_err()
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes what an earlier node left in this (lab) network namespace: the bridge and the
/// kubelet's and kube-proxy's chains.
fn reset_network() -> Result<()> {
    if interfaces()?.iter().any(|i| i == BRIDGE) {
        run("ip", &["link", "del", BRIDGE])?;
    }
    for table in ["iptables", "ip6tables"] {
        let Ok(rules) = run(&format!("{table}-save"), &[]) else {
            continue;
        };
        if rules.contains("KUBE-") || rules.contains("CNI-") {
            let cleaned: String = rules.lines().filter(|l| !(l.contains("KUBE-") || l.contains("CNI-"))).map(|l| format!("{l}\n")).collect();
            let mut child = Command::new(format!("{table}-restore")).stdin(std::process::Stdio::piped()).spawn()?;
            use std::io::Write;
            child.stdin.take().context("no stdin")?.write_all(cleaned.as_bytes())?;
            child.wait()?;
        }
    }
    Ok(())
}

fn create_bridge() -> Result<()> {
    run("ip", &["link", "set", "lo", "up"])?;
    run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    run("ip", &["addr", "add", &format!("{NODE_ADDRESS}/24"), "dev", BRIDGE])?;
    run("ip", &["link", "set", BRIDGE, "up"])?;
    // A pod calling a Service whose endpoint is another pod: kube-proxy DNATs the packet on the
    // bridge's address and it must be routed back out the bridge. Forwarding is switched on in
    // the lab's own network namespace only (its only other interface is loopback: no route
    // out); bridged replies pass iptables (bridge-nf-call-iptables, per namespace) to be un-NATed.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("cannot enable IP forwarding in the lab's network namespace")?;
    let bridge_nf = Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables");
    if bridge_nf.exists() {
        std::fs::write(bridge_nf, "1")?;
    }
    Ok(())
}

/// The cgroup v1 hierarchies (and the v2 one of a hybrid setup) under /sys/fs/cgroup.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let point = left.split_whitespace().nth(4)?;
            (matches!(fstype, "cgroup" | "cgroup2") && point.starts_with("/sys/fs/cgroup")).then(|| PathBuf::from(point))
        })
        .collect()
}

fn create_cgroup_root(name: &str) -> Result<()> {
    for hierarchy in cgroup_hierarchies() {
        let dir = hierarchy.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // A new cpuset cgroup has no CPUs or memory nodes until given its parent's.
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = std::fs::read_to_string(hierarchy.join(file)) {
                std::fs::write(dir.join(file), value.trim()).with_context(|| format!("cannot set {}/{file}", dir.display()))?;
            }
        }
    }
    Ok(())
}

/// Removes a cgroup root in every hierarchy, deepest first; false while some cgroup still has tasks.
fn remove_cgroup_root(name: &str) -> bool {
    let mut done = true;
    for hierarchy in cgroup_hierarchies() {
        let root = hierarchy.join(name);
        if root.exists() && !remove_tree(&root) {
            done = false;
        }
    }
    done
}

fn remove_tree(dir: &Path) -> bool {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    std::fs::remove_dir(dir).is_ok() || !dir.exists()
}

/// Removes cgroup roots of lab runs whose process is gone (a killed earlier run), killing
/// anything still in them first.
pub fn clean_stale_cgroups() {
    for hierarchy in cgroup_hierarchies() {
        let Ok(entries) = std::fs::read_dir(&hierarchy) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(CGROUP_PREFIX).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            if process_alive(pid) {
                continue;
            }
            kill_tasks(&entry.path());
            let deadline = Instant::now() + Duration::from_secs(10);
            while !remove_tree(&entry.path()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn process_alive(pid: i32) -> bool {
    // A recycled pid of another program does not count: PIDs wrap at 32768 here.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

fn kill_tasks(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                kill_tasks(&entry.path());
            }
        }
    }
    if let Ok(tasks) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in tasks.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: SIGKILL to a process that is in a cgroup of a dead lab run.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// (pid, NUL-separated command line) of every process.
pub fn processes() -> Vec<(i32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmdline).into_owned()))
        })
        .collect()
}

async fn start_webhook(kube: &KubeLab, d: &Path, bins: &Path) -> Result<LabProcess> {
    let ca = kube.ca();
    let serving = ca.issue_server("webhook", &[])?;
    std::fs::copy(&serving.cert, d.join("webhook-certs/tls.crt"))?;
    std::fs::copy(&serving.key, d.join("webhook-certs/tls.key"))?;
    // Upstream's ClusterRole for the webhook, minus what cert rotation needs (it is off).
    let client = ca.issue_client("webhook-client", "azure-wi-webhook", None)?;
    grant_webhook_rbac(kube).await?;
    let kubeconfig = d.join("webhook.kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(kube.url(), ca.ca_file(), &client.cert, &client.key))?;
    let health = free_port()?;
    let mut cmd_args = args(&[
        ("--kubeconfig", &kubeconfig.display().to_string()),
        ("--webhook-cert-dir", &d.join("webhook-certs").display().to_string()),
        ("--health-addr", &format!("127.0.0.1:{health}")),
        ("--metrics-addr", &format!("127.0.0.1:{}", free_port()?)),
        ("--log-level", "info"),
    ]);
    cmd_args.push("--disable-cert-rotation".into());
    // The webhook reads its settings from the environment; LabProcess passes ours through, so
    // the tenant is given by a small wrapper.
    let wrapper = d.join("webhook.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexport AZURE_TENANT_ID=00000000-0000-4000-8000-00000000cafe\nexport AZURE_ENVIRONMENT=AzurePublicCloud\nexec {} \"$@\"\n",
            bins.join("azure-wi-webhook").display()
        ),
    )?;
    let mut webhook =
        LabProcess::spawn("azure-wi-webhook", Path::new("sh"), &[&[wrapper.display().to_string()][..], &cmd_args].concat(), &d.join("webhook.log"))?;

    // Registered as upstream's chart registers it, by URL (the webhook runs beside the apiserver).
    let configuration = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "azure-wi-webhook-mutating-webhook-configuration"},
        "webhooks": [{
            "name": "mutation.azure-workload-identity.io",
            "admissionReviewVersions": ["v1", "v1beta1"],
            "clientConfig": {
                "url": format!("https://127.0.0.1:{WEBHOOK_PORT}/mutate-v1-pod"),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca.ca_pem()),
            },
            "failurePolicy": "Fail",
            "matchPolicy": "Equivalent",
            "objectSelector": {"matchLabels": {"azure.workload.identity/use": "true"}},
            "reinvocationPolicy": "IfNeeded",
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
            "sideEffects": "None",
        }],
    });
    let api: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> = Api::all(kube.client().await?);
    api.patch("azure-wi-webhook-mutating-webhook-configuration", &PatchParams::apply("mongo-replicator-lab").force(), &Patch::Apply(&configuration))
        .await
        .context("cannot register the workload identity webhook")?;

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        webhook.check_running()?;
        if let Ok(answer) = crate::process::http_get(health, "/readyz").await
            && answer.starts_with("HTTP/1.1 200")
            && tokio::net::TcpStream::connect(("127.0.0.1", WEBHOOK_PORT)).await.is_ok()
        {
            return Ok(webhook);
        }
        if Instant::now() > deadline {
            bail!("the workload identity webhook was not ready within 60 s; its log ends with:\n{}", webhook.log_tail(30));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn grant_webhook_rbac(kube: &KubeLab) -> Result<()> {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let client = kube.client().await?;
    let apply = PatchParams::apply("mongo-replicator-lab").force();
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "azure-wi-webhook"},
        "rules": [
            {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"], "verbs": ["get", "list", "watch"]},
        ],
    });
    Api::<ClusterRole>::all(client.clone()).patch("azure-wi-webhook", &apply, &Patch::Apply(&role)).await?;
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "azure-wi-webhook"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "azure-wi-webhook"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "azure-wi-webhook"}],
    });
    Api::<ClusterRoleBinding>::all(client).patch("azure-wi-webhook", &apply, &Patch::Apply(&binding)).await?;
    Ok(())
}

struct NodeFiles<'a> {
    dir: &'a Path,
    bins: &'a Path,
    socket: &'a Path,
    cgroup_root: &'a str,
    ca_file: &'a Path,
    kubelet_serving: &'a CertFiles,
    kubelet_kubeconfig: &'a Path,
    proxy_kubeconfig: &'a Path,
}

fn write_node_config(f: &NodeFiles) -> Result<()> {
    let d = f.dir;
    let runc = which("runc").context("runc is missing (apt-get install runc; scripts/setup.sh installs it)")?;
    which("iptables").context("iptables is missing (apt-get install iptables; scripts/setup.sh installs it)")?;

    std::fs::write(
        d.join("containerd.toml"),
        format!(
            r#"version = 3
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{pause}"

[plugins.'io.containerd.cri.v1.runtime']
  # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails to start.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{cni_conf}"

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
            root = d.join("containerd/root").display(),
            state = d.join("containerd/state").display(),
            socket = f.socket.display(),
            pause = PAUSE_IMAGE,
            runc = runc.display(),
            cni_bin = std::fs::canonicalize(f.bins.join("bridge"))?.parent().context("no CNI dir")?.display(),
            cni_conf = d.join("cni/net.d").display(),
        ),
    )?;

    // The bridge exists already (with its address); the plugin only attaches pods to it.
    std::fs::write(
        d.join("cni/net.d/10-mrep-lab.conflist"),
        serde_json::to_string_pretty(&json!({
            "cniVersion": "1.0.0",
            "name": "mrep-lab",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    // isGateway would switch on IP forwarding; ipMasq would add a masquerade rule.
                    "isGateway": false,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": d.join("cni/ipam").display().to_string(),
                        "ranges": [[{"subnet": POD_SUBNET, "rangeStart": "10.244.0.10", "gateway": NODE_ADDRESS.to_string()}]],
                        // Pods reach the node's address (on link) and the service range, nothing else.
                        "routes": [{"dst": SERVICE_RANGE, "gw": NODE_ADDRESS.to_string()}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        }))?,
    )?;

    std::fs::write(d.join("resolv.conf"), "nameserver 127.0.0.1\noptions ndots:1\n")?;
    let kubelet_port = free_port()?;
    let healthz_port = free_port()?;
    std::fs::write(
        d.join("kubelet.yaml"),
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup_root}
address: {node_address}
port: {kubelet_port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz_port}
tlsCertFile: {tls_cert}
tlsPrivateKeyFile: {tls_key}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization:
  mode: AlwaysAllow
containerRuntimeEndpoint: unix://{socket}
volumePluginDir: {plugins}
resolvConf: {resolv}
failSwapOn: false
evictionHard:
  memory.available: 1Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
registerNode: true
nodeStatusUpdateFrequency: 2s
syncFrequency: 5s
fileCheckFrequency: 5s
staticPodPath: ""
maxPods: 60
"#,
            cgroup_root = f.cgroup_root,
            node_address = NODE_ADDRESS,
            tls_cert = f.kubelet_serving.cert.display(),
            tls_key = f.kubelet_serving.key.display(),
            ca = f.ca_file.display(),
            socket = f.socket.display(),
            plugins = d.join("kubelet-plugins").display(),
            resolv = d.join("resolv.conf").display(),
        ),
    )?;

    std::fs::write(
        d.join("kube-proxy.yaml"),
        format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {NODE_NAME}
mode: iptables
clusterCIDR: {POD_SUBNET}
healthzBindAddress: 127.0.0.1:{healthz}
metricsBindAddress: 127.0.0.1:{metrics}
nodePortAddresses: ["{POD_SUBNET}"]
iptables:
  localhostNodePorts: false
  masqueradeAll: false
# Zero leaves the (global) conntrack sysctls alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
"#,
            kubeconfig = f.proxy_kubeconfig.display(),
            healthz = free_port()?,
            metrics = free_port()?,
        ),
    )?;

    let mut binds = String::new();
    for key in SHADOWED_SYSCTLS {
        binds.push_str(&format!(
            "cat /proc/sys/{key} > \"$dir/sysctl/{file}\"\nmount -n --bind \"$dir/sysctl/{file}\" /proc/sys/{key}\n",
            file = key.replace('/', ".")
        ));
    }
    std::fs::write(
        d.join("node-init.sh"),
        format!(
            r#"#!/bin/bash
# PID 1 of the node's PID namespace, in its private mount namespace: when it dies, every process
# of the node dies (containerd, its shims, the containers, the kubelet, kube-proxy).
set -euo pipefail
dir="{dir}"
# The kubelet rewrites these host sysctls at start: let it write lab files instead.
{binds}# Hard-coded paths of containerd, runc, the CNI plugins and the kubelet.
mount -n --bind "$dir/run" /run
mount -n --bind "$dir/var-lib" /var/lib
mount -n --bind "$dir/var-log" /var/log
export PATH="{bins}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"{bins}/containerd" --config "$dir/containerd.toml" > "$dir/containerd.log" 2>&1 &
pids=$!
for _ in $(seq 1 600); do [[ -S "{socket}" ]] && break; sleep 0.05; done
"{bins}/kubelet" --config "$dir/kubelet.yaml" --kubeconfig "{kubelet_kubeconfig}" --root-dir "$dir/kubelet" \
  --node-ip {node_address} --hostname-override {NODE_NAME} --cert-dir "$dir/pki" --v 1 > "$dir/kubelet.log" 2>&1 &
pids="$pids $!"
"{bins}/kube-proxy" --config "$dir/kube-proxy.yaml" --v 1 > "$dir/kube-proxy.log" 2>&1 &
pids="$pids $!"
echo "node-init: containerd, kubelet, kube-proxy: $pids"
while :; do
  wait -n || true
  for p in $pids; do
    kill -0 "$p" 2>/dev/null || {{ echo "node-init: process $p exited"; exit 1; }}
  done
done
"#,
            dir = d.display(),
            bins = f.bins.display(),
            socket = f.socket.display(),
            kubelet_kubeconfig = f.kubelet_kubeconfig.display(),
            node_address = NODE_ADDRESS,
        ),
    )?;
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).chain(["/usr/sbin", "/sbin"].map(PathBuf::from)).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// A TCP relay from the node's bridge address to a loopback port: pods reach a lab server
/// (SecantusDB, an Azure double, a login gateway) that listens on 127.0.0.1 only. It runs on
/// the tokio runtime of the test that made it and stops when dropped.
pub struct Relay {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listens on `NODE_ADDRESS:port` (same port number) and forwards to `127.0.0.1:port`.
    pub async fn start(port: u16) -> Result<Relay> {
        let listener =
            tokio::net::TcpListener::bind((NODE_ADDRESS, port)).await.with_context(|| format!("cannot listen on {NODE_ADDRESS}:{port}"))?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(Relay { port, task })
    }

    /// The port (the same on loopback and on the bridge address).
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the host looks like where the lab must leave no trace: sysctls, IP forwarding, iptables
/// rules and links of the host's network namespace, its mounts, the cgroup directories.
#[derive(Debug, PartialEq, Eq)]
pub struct HostState {
    pub sysctls: Vec<(String, String)>,
    pub iptables: String,
    pub ip6tables: String,
    pub links: String,
    pub addresses: String,
    pub mounts: Vec<String>,
    pub cgroups: Vec<String>,
}

impl HostState {
    /// Reads the host's state; its network namespace through `host_net_pid`, a process in it
    /// (this process is in a lab namespace). Cgroup directories whose name contains one of
    /// `ignore` (a node of this process still running) are left out.
    pub fn capture(host_net_pid: u32, ignore: &[&str]) -> Result<HostState> {
        let netns = format!("--net=/proc/{host_net_pid}/ns/net");
        let host_net = |program: &str, args: &[&str]| -> Result<String> {
            let mut all = vec![netns.as_str(), "--", program];
            all.extend_from_slice(args);
            run("nsenter", &all)
        };
        let mut sysctls = Vec::new();
        for key in [
            "vm/overcommit_memory",
            "vm/panic_on_oom",
            "kernel/panic",
            "kernel/panic_on_oops",
            "kernel/keys/root_maxkeys",
            "kernel/keys/root_maxbytes",
        ] {
            sysctls.push((key.to_string(), std::fs::read_to_string(format!("/proc/sys/{key}"))?.trim().to_string()));
        }
        for key in ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding", "net/ipv4/conf/all/route_localnet", "net/bridge/bridge-nf-call-iptables"] {
            let value = host_net("cat", &[&format!("/proc/sys/{key}")]).unwrap_or_else(|_| "(absent)".into());
            sysctls.push((key.to_string(), value.trim().to_string()));
        }
        let strip_counters = |rules: String| -> String {
            rules.lines().filter(|l| !l.starts_with('#')).map(|l| l.split(" [").next().unwrap_or(l).to_string() + "\n").collect()
        };
        let iptables = strip_counters(host_net("iptables-save", &[])?);
        let ip6tables = strip_counters(host_net("ip6tables-save", &[])?);
        let links = host_net("ip", &["-o", "link", "show"])?
            .lines()
            // Counters and the qdisc state change on their own; names, kinds and flags must not.
            .map(|l| l.split(" qlen").next().unwrap_or(l).to_string() + "\n")
            .collect();
        let addresses =
            host_net("ip", &["-o", "addr", "show"])?.lines().map(|l| l.split(" valid_lft").next().unwrap_or(l).to_string() + "\n").collect();
        // The lab's network namespace shares the host's mount namespace.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?
            .lines()
            .map(|l| l.split_whitespace().skip(3).take(2).collect::<Vec<_>>().join(" "))
            .collect();
        let mut cgroups = Vec::new();
        for hierarchy in cgroup_hierarchies() {
            collect_dirs(&hierarchy, 3, &mut cgroups);
        }
        cgroups.retain(|c| !ignore.iter().any(|i| c.contains(i)));
        cgroups.sort();
        Ok(HostState { sysctls, iptables, ip6tables, links, addresses, mounts, cgroups })
    }
}

fn collect_dirs(dir: &Path, depth: usize, out: &mut Vec<String>) {
    if depth == 0 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let path = entry.path();
            out.push(path.strip_prefix("/sys/fs/cgroup").unwrap_or(&path).display().to_string());
            collect_dirs(&path, depth - 1, out);
        }
    }
}
