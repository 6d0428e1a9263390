//! Helpers shared by the lab tests.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

/// Field manager of everything the tests write.
pub const TEST_MANAGER: &str = "mongo-replicator-tests";

/// Installs the MongoReplication CRD with server-side apply and waits until it is Established.
pub async fn install_crd(client: &Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = mongo_replicator::crd::crd();
    let name = crd.metadata.name.clone().context("CRD without a name")?;
    api.patch(&name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(&crd)).await.context("the apiserver refused the CRD")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let current = api.get(&name).await?;
        let established = current
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True"));
        if established {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("CRD {name} not Established after 60 s: {:?}", current.status);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The YAML documents of a file as JSON values (empty documents skipped).
pub fn yaml_documents(text: &str) -> Result<Vec<serde_json::Value>> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text)?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// A `mongo-replicator replicate` process, with its output captured in a file.
pub struct ReplicatorProcess {
    child: tokio::process::Child,
    log: std::path::PathBuf,
    _dir: std::sync::Arc<tempdir::Dir>,
}

pub mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(prefix: &str) -> std::io::Result<Self> {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("mrep-test-{}-{prefix}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path)?;
            Ok(Self(path))
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl ReplicatorProcess {
    /// Starts the replicator with `args` after `replicate`; `env` carries connection strings.
    pub fn start(args: &[String], env: &[(&str, String)]) -> Result<Self> {
        let dir = std::sync::Arc::new(tempdir::Dir::new("replicator")?);
        Self::start_in(dir, args, env)
    }

    fn start_in(dir: std::sync::Arc<tempdir::Dir>, args: &[String], env: &[(&str, String)]) -> Result<Self> {
        static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = dir.0.join(format!("replicator-{n}.log"));
        let out = std::fs::File::create(&log)?;
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mongo-replicator"));
        cmd.arg("replicate").args(args).arg("--log-format").arg("json").arg("--log-level").arg("debug");
        cmd.env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdout(out.try_clone()?).stderr(out).kill_on_drop(true);
        let child = cmd.spawn().context("cannot start mongo-replicator")?;
        Ok(Self { child, log, _dir: dir })
    }

    /// Starts the same replicator again (same arguments are the caller's to pass).
    pub fn restart(&self, args: &[String], env: &[(&str, String)]) -> Result<Self> {
        Self::start_in(self._dir.clone(), args, env)
    }

    /// SIGKILL: no drain, no final checkpoint.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGTERM, then the exit code (None when killed by a signal).
    pub async fn terminate(&mut self, timeout: Duration) -> Result<Option<i32>> {
        if let Some(pid) = self.child.id() {
            let status = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status()?;
            anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        }
        self.wait(timeout).await
    }

    /// SIGSTOP: the process is frozen (as by a long GC pause or a starved node) until [`Self::resume`].
    pub fn pause(&self) -> Result<()> {
        self.signal("-STOP")
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.child.id().context("mongo-replicator has exited")?;
        let status = std::process::Command::new("kill").arg(signal).arg(pid.to_string()).status()?;
        anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
        Ok(())
    }

    /// Waits for the process to exit by itself.
    pub async fn wait(&mut self, timeout: Duration) -> Result<Option<i32>> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(status?.code()),
            Err(_) => bail!("mongo-replicator did not exit within {timeout:?}; log ends with:\n{}", self.log_tail(30)),
        }
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Polls `check` until it succeeds or `timeout` passes; the last error explains a failure.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(()) => return Ok(()),
            Err(err) if tokio::time::Instant::now() > deadline => return Err(err.context(format!("still failing after {timeout:?}"))),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Runs `mongo-replicator validate --config FILE` with `env`: its exit code, JSON verdict and
/// termination message (at most 4096 bytes, JSON).
pub async fn validate_with_env(config: &std::path::Path, env: &[(&str, String)]) -> Result<(Option<i32>, serde_json::Value, serde_json::Value)> {
    let termination_log = config.with_extension("termination-log");
    std::fs::write(&termination_log, "")?;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mongo-replicator"))
        .args(["validate", "--config"])
        .arg(config)
        .args(["--output", "json", "--termination-log"])
        .arg(&termination_log)
        .env_remove("RUST_LOG")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verdict: serde_json::Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("validate printed no JSON verdict: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr)))?;
    let message = std::fs::read_to_string(&termination_log)?;
    anyhow::ensure!(message.len() <= 4096, "termination message of {} bytes", message.len());
    let termination: serde_json::Value = serde_json::from_str(&message).with_context(|| format!("termination message is not JSON: {message}"))?;
    Ok((out.status.code(), verdict, termination))
}
