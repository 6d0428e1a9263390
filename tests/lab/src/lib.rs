//! The mongo-replicator test lab: real processes started and stopped from Rust.
//!
//! - [`KubeLab`]: etcd + kube-apiserver + kube-controller-manager built from Go modules.
//! - [`SecantusServer`]: SecantusDB (`secantusd-rs`), a MongoDB-compatible server over WiredTiger.
//! - [`KafkaPipeline`]: MongoDB's Kafka connector (source → KRaft broker → sink), the benchmark's CDC peer.
//! - [`bench`]: the replicator's benchmark (`mrep-bench`): workloads × pipelines on SecantusDB.
//! - [`helm()`], [`lua_health()`]: the helm CLI and an Argo CD health-check runner, for the chart's tests.
//!
//! Binaries are built once per version into `~/.cache/mongo-replicator` (or `$MREP_CACHE`) by
//! the scripts in `tests/lab/scripts`; the lab runs them on first use when they are missing.
//! Every process runs on free loopback ports in its own directory and dies with the test process.

pub mod arm;
pub mod azure;
pub mod bench;
pub mod entra;
pub mod gateway;
pub mod https;
pub mod image;
pub mod jwt;
pub mod kafka;
pub mod kube;
pub mod mongo;
pub mod node;
pub mod pki;
pub mod process;
pub mod workload;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

pub use crate::kafka::KafkaPipeline;
pub use crate::kube::KubeLab;
pub use crate::mongo::{ScramUser, SecantusOptions, SecantusServer};
pub use crate::node::NodeLab;

/// Versions of the lab's parts, from `tests/lab/versions.env` (the scripts read the same file).
pub struct Versions {
    pub kube: String,
    pub secantus: String,
}

impl Versions {
    pub fn get() -> &'static Versions {
        static VERSIONS: OnceLock<Versions> = OnceLock::new();
        VERSIONS.get_or_init(|| {
            let text = include_str!("../versions.env");
            let value = |key: &str| {
                text.lines()
                    .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                    .unwrap_or_else(|| panic!("versions.env has no {key}"))
                    .trim()
                    .to_string()
            };
            Versions { kube: value("KUBE_VERSION"), secantus: value("SECANTUS_VERSION") }
        })
    }
}

/// Runs one of the lab's build scripts (a no-op when its output is cached) and returns the path
/// it prints.
pub(crate) fn cached_tool(script: &str, what: &str) -> Result<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(script);
    let out =
        Command::new("bash").arg(&path).stderr(std::process::Stdio::inherit()).output().with_context(|| format!("cannot run {}", path.display()))?;
    if !out.status.success() {
        bail!("{} failed ({}): cannot provide the {what}", path.display(), out.status);
    }
    let printed = String::from_utf8(out.stdout).context("script printed a non-UTF-8 path")?;
    let printed = printed.lines().last().unwrap_or_default().trim();
    if printed.is_empty() {
        bail!("{} printed no path for the {what}", path.display());
    }
    Ok(PathBuf::from(printed))
}

/// The helm CLI, built from the Go module proxy by `scripts/build-helm.sh` on first use
/// (`HELM_VERSION` in `versions.env`).
pub fn helm() -> Result<PathBuf> {
    Ok(cached_tool("build-helm.sh", "helm CLI")?.join("helm"))
}

/// lua-health: runs an Argo CD health check (Lua) with the interpreter Argo CD embeds, built
/// from `tests/lab/go/lua-health` by `scripts/build-lua-health.sh` on first use.
pub fn lua_health() -> Result<PathBuf> {
    Ok(cached_tool("build-lua-health.sh", "Argo CD Lua runner")?.join("lua-health"))
}

/// A directory of one lab part's data and logs, under `$TMPDIR/mongo-replicator-lab`. Removed
/// on drop; directories left behind by processes that no longer run are removed on the next start.
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    pub fn new(kind: &str) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join("mongo-replicator-lab");
        std::fs::create_dir_all(&root)?;
        remove_abandoned(&root);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("{}-{kind}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn remove_abandoned(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.split('-').next()).and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
