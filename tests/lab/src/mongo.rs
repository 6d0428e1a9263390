//! SecantusDB servers (`secantusd-rs`): MongoDB wire protocol over WiredTiger, a one-member
//! replica set with change streams; optionally with TLS from a lab CA and SCRAM users.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mongodb::bson::{Bson, Document, Timestamp, doc};
use mongodb::options::ClientOptions;

use crate::pki::LabCa;
use crate::process::{LabProcess, free_port, wait_for_port};
use crate::{RunDir, cached_tool};

/// A SCRAM user created in `admin` before the server is restarted with `--auth`.
#[derive(Clone)]
pub struct ScramUser {
    pub name: String,
    pub password: String,
    /// `(database, role)` pairs, e.g. `("admin", "root")`.
    pub roles: Vec<(String, String)>,
}

impl ScramUser {
    pub fn new(name: &str, password: &str, roles: &[(&str, &str)]) -> Self {
        Self { name: name.into(), password: password.into(), roles: roles.iter().map(|(db, role)| (db.to_string(), role.to_string())).collect() }
    }
}

impl fmt::Debug for ScramUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramUser").field("name", &self.name).field("password", &"<redacted>").finish()
    }
}

/// How a server is started.
#[derive(Clone, Debug, Default)]
pub struct SecantusOptions {
    /// Serve TLS only, with a certificate for 127.0.0.1 from the server's own lab CA.
    pub tls: bool,
    /// More addresses the TLS certificate names (the node's, for pods reaching it through a relay).
    pub tls_ips: Vec<std::net::IpAddr>,
    /// Users to create; when not empty the server runs with `--auth`.
    pub users: Vec<ScramUser>,
    /// `--oplog-max-entries`: a small cap makes change-stream history loss easy to provoke.
    pub oplog_max_entries: Option<u64>,
    /// `--noop-heartbeat-seconds`: lets the post-batch resume token advance on an idle server.
    pub noop_heartbeat_seconds: Option<u32>,
    /// `--standalone`: no replica-set advertisement, so no change streams (like a standalone mongod).
    pub standalone: bool,
}

/// A running (or stopped, restartable) SecantusDB server with its own storage directory.
pub struct SecantusServer {
    process: Option<LabProcess>,
    port: u16,
    bin: PathBuf,
    options: SecantusOptions,
    ca: Option<LabCa>,
    tls_files: Option<(PathBuf, PathBuf)>,
    auth: bool,
    starts: u32,
    dir: RunDir,
}

impl SecantusServer {
    /// Starts a server on a free port; users, if any, are created and the server restarted with `--auth`.
    pub async fn start(options: SecantusOptions) -> Result<Self> {
        let bin = cached_tool("install-secantus.sh", "SecantusDB server")?;
        let dir = RunDir::new("secantus")?;
        std::fs::create_dir_all(dir.path().join("data"))?;
        std::fs::write(dir.path().join("secantusd.toml"), "")?;
        let (ca, tls_files) = if options.tls {
            let ca = LabCa::create(&dir.path().join("pki"))?;
            let cert = ca.issue_server_with_ips("server", &[], &options.tls_ips)?;
            (Some(ca), Some((cert.cert, cert.key)))
        } else {
            (None, None)
        };
        let mut server = Self { process: None, port: free_port()?, bin, options, ca, tls_files, auth: false, starts: 0, dir };
        server.launch().await?;
        if !server.options.users.is_empty() {
            server.create_users().await?;
            server.stop();
            server.auth = true;
            server.launch().await?;
        }
        Ok(server)
    }

    async fn launch(&mut self) -> Result<()> {
        let mut args = vec![
            "--host".to_string(),
            "127.0.0.1".into(),
            "--port".into(),
            self.port.to_string(),
            "--storage-path".into(),
            self.dir.path().join("data").display().to_string(),
            "--log-level".into(),
            "WARNING".into(),
            // An empty config file turns off discovery of ./secantusd.toml and ~/.secantus/.
            "--config".into(),
            self.dir.path().join("secantusd.toml").display().to_string(),
            // The default 4G cache is sized for a dedicated host; tests run many servers at once.
            "--cache-size".into(),
            "256M".into(),
        ];
        if let Some((cert, key)) = &self.tls_files {
            args.extend(["--tls-cert-file".into(), cert.display().to_string()]);
            args.extend(["--tls-key-file".into(), key.display().to_string()]);
        }
        if self.auth {
            args.push("--auth".into());
        }
        if let Some(n) = self.options.oplog_max_entries {
            args.extend(["--oplog-max-entries".into(), n.to_string()]);
        }
        if let Some(s) = self.options.noop_heartbeat_seconds {
            args.extend(["--noop-heartbeat-seconds".into(), s.to_string()]);
        }
        if self.options.standalone {
            args.push("--standalone".into());
        }
        self.starts += 1;
        let log = self.dir.path().join(format!("secantusd-{}.log", self.starts));
        let mut process = LabProcess::spawn("secantusd-rs", &self.bin, &args, &log)?;
        wait_for_port(&mut process, self.port, Duration::from_secs(60)).await?;
        self.process = Some(process);
        self.wait_ready(Duration::from_secs(60)).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let process = self.process.as_mut().context("server is stopped")?;
            process.check_running()?;
            let attempt = async {
                let client = self.admin_client().await?;
                client.database("admin").run_command(doc! {"ping": 1}).await?;
                anyhow::Ok(())
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(err) if Instant::now() > deadline => {
                    let tail = self.process.as_ref().map(|p| p.log_tail(30)).unwrap_or_default();
                    bail!("secantusd-rs on port {} did not answer ping within {timeout:?}: {err:#}; log:\n{tail}", self.port)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn create_users(&self) -> Result<()> {
        let client = self.admin_client().await?;
        for user in &self.options.users {
            let roles: Vec<_> = user.roles.iter().map(|(db, role)| doc! {"role": role, "db": db}).collect();
            client
                .database("admin")
                .run_command(doc! {"createUser": &user.name, "pwd": &user.password, "roles": roles})
                .await
                .with_context(|| format!("cannot create user {}", user.name))?;
        }
        Ok(())
    }

    /// Stops the server gracefully (SIGTERM, then SIGKILL after 10 s); storage is kept.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.terminate(Duration::from_secs(10));
        }
    }

    /// Kills the server (SIGKILL); storage is kept.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts the server again on the same port and storage.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch().await
    }

    /// The port the server listens on.
    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(LabProcess::pid)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection string without credentials.
    pub fn uri(&self) -> String {
        let mut uri = format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port);
        if let Some(ca) = &self.ca {
            uri.push_str(&format!("&tls=true&tlsCAFile={}", ca.ca_file().display()));
        }
        uri
    }

    /// The connection string with a user's credentials (authSource `admin`).
    pub fn uri_for(&self, user: &ScramUser) -> String {
        let rest = self.uri().trim_start_matches("mongodb://").to_string();
        format!("mongodb://{}:{}@{rest}&authSource=admin", encode(&user.name), encode(&user.password))
    }

    /// The CA file clients must trust, when the server serves TLS.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca.as_ref().map(|ca| ca.ca_file())
    }

    /// A client with the first user's credentials (or none when the server has no users).
    pub async fn admin_client(&self) -> Result<mongodb::Client> {
        let uri = match (self.auth, self.options.users.first()) {
            (true, Some(user)) => self.uri_for(user),
            _ => self.uri(),
        };
        let mut options = ClientOptions::parse(&uri).await?;
        options.server_selection_timeout = Some(Duration::from_secs(2));
        options.connect_timeout = Some(Duration::from_secs(2));
        Ok(mongodb::Client::with_options(options)?)
    }

    /// The oldest change the server still holds: the first entry of `local.oplog.rs` in natural
    /// order (`None` when the oplog is empty).
    pub async fn oldest_retained(&self) -> Result<Option<Timestamp>> {
        let client = self.admin_client().await?;
        let first = client.database("local").collection::<Document>("oplog.rs").find_one(doc! {}).await?;
        Ok(first.and_then(|entry| match entry.get("ts") {
            Some(Bson::Timestamp(ts)) => Some(*ts),
            _ => None,
        }))
    }

    /// The server's cluster time now (the `operationTime` of a ping).
    pub async fn cluster_time(&self) -> Result<Timestamp> {
        let reply = self.admin_client().await?.database("admin").run_command(doc! {"ping": 1}).await?;
        reply.get_timestamp("operationTime").with_context(|| format!("a ping without operationTime: {reply}"))
    }

    /// The log file of the current (or last) run.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("secantusd-{}.log", self.starts))
    }
}

impl Drop for SecantusServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Percent-encodes a connection-string user name or password.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
