//! MongoDB's Kafka connector as a CDC pipeline: a single-node KRaft broker and a standalone
//! Connect worker, both JVMs on loopback ports, with a `MongoSourceConnector` on a source database
//! feeding a `MongoSinkConnector` (the `ChangeStreamHandler` CDC handler) that writes the same
//! namespaces on a target. The benchmark runs it as a peer of the replicator.
//!
//! The jars come from Maven through `scripts/install-kafka.sh` (versions in `versions.env`); the
//! JVM is `$JAVA_HOME/bin/java`, or `java` on the `PATH` (Kafka 4 needs Java 17 or newer).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::process::{LabProcess, free_port, wait_for_port};
use crate::{RunDir, cached_tool};

/// Partitions of a pipeline's topic, and so the sink's tasks: the source's record key is the
/// document key, so each document's events stay in order within one partition.
const PARTITIONS: u32 = 2;

/// The converter of keys and values on both connectors: the source emits raw BSON and the sink
/// reads it, so nothing is translated to JSON or a Connect schema on the way.
const BYTES: &str = "org.apache.kafka.connect.converters.ByteArrayConverter";

/// A running broker and Connect worker; dropped, both JVMs are killed and the run directory removed.
pub struct KafkaPipeline {
    /// Broker first, then the Connect worker.
    processes: Mutex<Vec<LabProcess>>,
    pids: Vec<u32>,
    rest_port: u16,
    /// The connectors of the current connection (source, sink), for `failure` and `disconnect`.
    connectors: Mutex<Vec<String>>,
    connections: AtomicU32,
    dir: RunDir,
}

impl KafkaPipeline {
    /// Starts a single-node KRaft broker (combined broker and controller, storage formatted by
    /// Kafka's `StorageTool`) and a standalone Connect worker, both `java -cp lib/*` from the
    /// cache on free loopback ports; returns once Connect's REST API answers.
    pub async fn start() -> Result<Self> {
        let lib = cached_tool("install-kafka.sh", "Kafka broker and MongoDB connector jars")?;
        let java = java();
        let dir = RunDir::new("kafka")?;
        let (broker_port, controller_port, rest_port) = (free_port()?, free_port()?, free_port()?);
        let log4j = dir.path().join("log4j2.properties");
        std::fs::write(&log4j, LOG4J_CONFIG)?;
        let broker_config = dir.path().join("server.properties");
        std::fs::write(&broker_config, broker_properties(dir.path(), broker_port, controller_port))?;
        let connect_config = dir.path().join("connect.properties");
        std::fs::write(&connect_config, connect_properties(dir.path(), broker_port, rest_port))?;

        format_storage(&java, &lib, &log4j, &broker_config, dir.path()).await?;
        let mut broker =
            LabProcess::spawn("kafka broker", &java, &jvm_args(&lib, &log4j, "kafka.Kafka", &broker_config), &dir.path().join("broker.log"))?;
        wait_for_port(&mut broker, broker_port, Duration::from_secs(90)).await?;
        let connect = LabProcess::spawn(
            "kafka connect",
            &java,
            &jvm_args(&lib, &log4j, "org.apache.kafka.connect.cli.ConnectStandalone", &connect_config),
            &dir.path().join("connect.log"),
        )?;
        let pids = vec![broker.pid(), connect.pid()];
        let pipeline = Self {
            processes: Mutex::new(vec![broker, connect]),
            pids,
            rest_port,
            connectors: Mutex::new(Vec::new()),
            connections: AtomicU32::new(0),
            dir,
        };
        pipeline.wait_for_rest(Duration::from_secs(120)).await?;
        Ok(pipeline)
    }

    /// The JVMs' process ids (broker, Connect worker), for reading their CPU time and peak RSS.
    pub fn pids(&self) -> Vec<u32> {
        self.pids.clone()
    }

    /// The run directory: configurations and each JVM's log (`broker.log`, `connect.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates a source connector on `database` of `source_uri` (copying the existing documents
    /// first when `copy_existing`, else streaming from now) and a sink connector that applies its
    /// change events to the same database and collections on `target_uri`; returns once both
    /// connectors and all their tasks run. Each connection has its own connector names and topic,
    /// so no offset or event of an earlier connection is picked up.
    pub async fn connect(&self, source_uri: &str, target_uri: &str, database: &str, copy_existing: bool) -> Result<()> {
        if !self.connectors.lock().map_err(|_| anyhow!("poisoned"))?.is_empty() {
            bail!("the pipeline is already connected; disconnect first");
        }
        let n = self.connections.fetch_add(1, Ordering::Relaxed);
        let (source, sink) = (format!("mongo-source-{n}"), format!("mongo-sink-{n}"));
        let prefix = format!("cdc{n}");
        // `topic.namespace.map`'s wildcard sends every collection's events to one topic per connection.
        let topic = format!("{prefix}.{database}");
        *self.connectors.lock().map_err(|_| anyhow!("poisoned"))? = vec![source.clone(), sink.clone()];
        let (source_uri, target_uri) = (with_slow_heartbeat(source_uri), with_slow_heartbeat(target_uri));
        self.create(&source, &source_config(&source_uri, database, copy_existing, &prefix)).await?;
        self.wait_running(&source, Duration::from_secs(60)).await?;
        self.create(&sink, &sink_config(&target_uri, database, &topic)).await?;
        self.wait_running(&sink, Duration::from_secs(60)).await
    }

    /// The first FAILED connector or task of the current connection, with its trace.
    pub async fn failure(&self) -> Result<Option<String>> {
        self.check_running()?;
        let names = self.connectors.lock().map_err(|_| anyhow!("poisoned"))?.clone();
        for name in names {
            if let Some(failed) = failed(&name, &self.status(&name).await?) {
                return Ok(Some(failed));
            }
        }
        Ok(None)
    }

    /// Deletes the current connection's connectors (their tasks stop; a connector already gone
    /// is fine), so that the next `connect` starts clean.
    pub async fn disconnect(&self) -> Result<()> {
        let names = std::mem::take(&mut *self.connectors.lock().map_err(|_| anyhow!("poisoned"))?);
        for name in names.iter().rev() {
            let (status, body) = self.rest("DELETE", &format!("/connectors/{name}"), None).await?;
            if status != 204 && status != 200 && status != 404 {
                bail!("cannot delete connector {name}: HTTP {status} {body}");
            }
        }
        Ok(())
    }

    async fn create(&self, name: &str, config: &Value) -> Result<()> {
        let (status, body) = self.rest("POST", "/connectors", Some(&json!({"name": name, "config": config}))).await?;
        if status != 201 && status != 200 {
            bail!("cannot create connector {name}: HTTP {status} {body}");
        }
        Ok(())
    }

    async fn status(&self, name: &str) -> Result<Value> {
        let (status, body) = self.rest("GET", &format!("/connectors/{name}/status"), None).await?;
        match status {
            200 => Ok(body),
            // A connector is briefly unknown between its creation and its start.
            404 => Ok(Value::Null),
            _ => bail!("cannot read the status of connector {name}: HTTP {status} {body}"),
        }
    }

    async fn wait_running(&self, name: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            let status = self.status(name).await?;
            if let Some(failed) = failed(name, &status) {
                bail!("{failed}");
            }
            let state = |v: &Value| v["state"].as_str().map(str::to_owned);
            let tasks = status["tasks"].as_array().cloned().unwrap_or_default();
            if state(&status["connector"]).as_deref() == Some("RUNNING")
                && !tasks.is_empty()
                && tasks.iter().all(|t| state(t).as_deref() == Some("RUNNING"))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("connector {name} is not running after {timeout:?}: {status}; Connect's log ends with:\n{}", self.log_tail(1, 40));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_for_rest(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            // Jetty listens before the REST resources are registered; /connectors answers 200 only then.
            if let Ok((200, _)) = self.rest("GET", "/connectors", None).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("Kafka Connect's REST API did not answer within {timeout:?}; its log ends with:\n{}", self.log_tail(1, 40));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fails with a JVM's log tail when it has exited.
    fn check_running(&self) -> Result<()> {
        let mut processes = self.processes.lock().map_err(|_| anyhow!("poisoned"))?;
        processes.iter_mut().try_for_each(LabProcess::check_running)
    }

    fn log_tail(&self, index: usize, lines: usize) -> String {
        self.processes.lock().ok().and_then(|p| p.get(index).map(|p| p.log_tail(lines))).unwrap_or_default()
    }

    /// One request to Connect's REST API on a new connection: status and JSON body (`Null` when empty).
    async fn rest(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.rest_port)).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("127.0.0.1:{}", self.rest_port))
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(Full::new(body))?;
        let response = sender.send_request(request).await.with_context(|| format!("{method} {path} on Kafka Connect"))?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok((status, value))
    }
}

/// A connector's or task's failure in a `/connectors/NAME/status` reply.
fn failed(name: &str, status: &Value) -> Option<String> {
    let is_failed = |v: &Value| v["state"].as_str() == Some("FAILED");
    if is_failed(&status["connector"]) {
        return Some(format!("connector {name} FAILED: {}", status["connector"]["trace"].as_str().unwrap_or("(no trace)")));
    }
    let tasks = status["tasks"].as_array()?;
    tasks.iter().find(|t| is_failed(t)).map(|t| format!("connector {name} task {} FAILED: {}", t["id"], t["trace"].as_str().unwrap_or("(no trace)")))
}

/// `uri` with a server-monitor heartbeat of an hour. The connector's Java driver (4.7) monitors a
/// server through a streamed `hello` (exhaust, one reply per heartbeat), and SecantusDB answers
/// each streamed reply with `responseTo` set to the original request instead of the previous
/// reply: the driver rejects the second streamed reply, marks the server unknown and clears its
/// pool, which fails whatever operation is in flight (a copy's `getMore` cannot resume, so the
/// source task FAILS: "connection pool ... paused because another operation failed"). With an
/// hour between heartbeats the second streamed reply comes after two hours, beyond any run.
fn with_slow_heartbeat(uri: &str) -> String {
    if uri.contains("heartbeatFrequencyMS=") {
        return uri.to_string();
    }
    let separator = if uri.contains('?') {
        "&"
    } else if uri.trim_start_matches("mongodb://").trim_start_matches("mongodb+srv://").contains('/') {
        "?"
    } else {
        "/?"
    };
    format!("{uri}{separator}heartbeatFrequencyMS=3600000")
}

/// The source connector, per MongoDB's documentation: a change stream on the whole database with
/// `updateLookup`, raw BSON out, every collection into one topic.
fn source_config(uri: &str, database: &str, copy_existing: bool, prefix: &str) -> Value {
    json!({
        "connector.class": "com.mongodb.kafka.connect.MongoSourceConnector",
        "connection.uri": uri,
        "database": database,
        "startup.mode": if copy_existing { "copy_existing" } else { "latest" },
        "change.stream.full.document": "updateLookup",
        "output.format.key": "bson",
        "output.format.value": "bson",
        "key.converter": BYTES,
        "value.converter": BYTES,
        "topic.prefix": prefix,
        "topic.namespace.map": json!({"*": database}).to_string(),
        // The source connector runs one task whatever tasks.max says.
        "tasks.max": "1",
        "poll.max.batch.size": "2000",
        "poll.await.time.ms": "1000",
        "batch.size": "1000",
        "topic.creation.default.partitions": PARTITIONS.to_string(),
        "topic.creation.default.replication.factor": "1",
    })
}

/// The sink connector: MongoDB change events through the `ChangeStreamHandler`, each into the
/// collection its `ns.coll` names.
fn sink_config(uri: &str, database: &str, topic: &str) -> Value {
    json!({
        "connector.class": "com.mongodb.kafka.connect.MongoSinkConnector",
        "connection.uri": uri,
        "topics": topic,
        "database": database,
        "change.data.capture.handler": "com.mongodb.kafka.connect.sink.cdc.mongodb.ChangeStreamHandler",
        "namespace.mapper": "com.mongodb.kafka.connect.sink.namespace.mapping.FieldPathNamespaceMapper",
        "namespace.mapper.value.database.field": "ns.db",
        "namespace.mapper.value.collection.field": "ns.coll",
        "namespace.mapper.error.if.invalid": "true",
        "key.converter": BYTES,
        "value.converter": BYTES,
        "tasks.max": PARTITIONS.to_string(),
        // Ordered bulk writes keep each document's events in order within a batch.
        "bulk.write.ordered": "true",
    })
}

fn broker_properties(dir: &Path, broker_port: u16, controller_port: u16) -> String {
    format!(
        "process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{broker_port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={logs}
num.partitions={PARTITIONS}
default.replication.factor=1
# One node: every internal topic has one replica, and few partitions start faster.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
",
        logs = dir.join("kafka-logs").display()
    )
}

fn connect_properties(dir: &Path, broker_port: u16, rest_port: u16) -> String {
    format!(
        "bootstrap.servers=127.0.0.1:{broker_port}
key.converter={BYTES}
value.converter={BYTES}
offset.storage.file.filename={offsets}
offset.flush.interval.ms=10000
listeners=http://127.0.0.1:{rest_port}
rest.advertised.host.name=127.0.0.1
rest.advertised.port={rest_port}
# The connector's jars are on the class path, which has no ServiceLoader manifests to read.
plugin.discovery=only_scan
# Throughput: the source's producer fills larger batches, the sink's consumer hands over more per poll.
producer.linger.ms=10
producer.batch.size=262144
consumer.max.poll.records=2000
",
        offsets = dir.join("connect.offsets").display()
    )
}

/// Every JVM's log goes to its stdout, which the lab keeps in the process's log file.
const LOG4J_CONFIG: &str = "status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
# Every client's full configuration, dumped at INFO when it starts, drowns the log.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
# SecantusDB's resume tokens are hex BSON, not MongoDB's KeyString: the source task's latency metric
# cannot decode them and its command listener throws on every getMore; the driver logs and ignores it.
logger.listener.name = org.mongodb.driver.protocol.event
logger.listener.level = ERROR
";

fn jvm_args(lib: &Path, log4j: &Path, main: &str, config: &Path) -> Vec<String> {
    vec![
        // Modest heaps: the lab shares a small machine with the servers under test.
        "-Xms256m".into(),
        "-Xmx1g".into(),
        "-XX:+UseG1GC".into(),
        "-XX:MaxGCPauseMillis=20".into(),
        "-Djava.awt.headless=true".into(),
        format!("-Dlog4j2.configurationFile={}", log4j.display()),
        "-cp".into(),
        format!("{}/*", lib.display()),
        main.into(),
        config.display().to_string(),
    ]
}

fn java() -> PathBuf {
    match std::env::var_os("JAVA_HOME") {
        Some(home) => PathBuf::from(home).join("bin/java"),
        None => PathBuf::from("java"),
    }
}

/// Formats the broker's storage with a new cluster id (a KRaft node does not start on empty storage).
async fn format_storage(java: &Path, lib: &Path, log4j: &Path, config: &Path, dir: &Path) -> Result<()> {
    let cluster_id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
    let mut args = jvm_args(lib, log4j, "kafka.tools.StorageTool", config);
    let config_arg = args.pop().expect("jvm_args ends with the config");
    args.extend(["format".into(), "--cluster-id".into(), cluster_id, "--config".into(), config_arg]);
    let log = dir.join("format.log");
    let out = tokio::process::Command::new(java)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(dir.join("format.err"))?)
        .kill_on_drop(true)
        .status()
        .await
        .with_context(|| format!("cannot run {}", java.display()))?;
    if !out.success() {
        let err = std::fs::read_to_string(dir.join("format.err")).unwrap_or_default();
        bail!("kafka's StorageTool failed ({out}): {err}{}", crate::process::log_tail(&log, 20));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::with_slow_heartbeat;

    #[test]
    fn heartbeat_option_joins_any_connection_string() {
        let option = "heartbeatFrequencyMS=3600000";
        assert_eq!(with_slow_heartbeat("mongodb://h:1/?directConnection=true"), format!("mongodb://h:1/?directConnection=true&{option}"));
        assert_eq!(with_slow_heartbeat("mongodb://h:1/db"), format!("mongodb://h:1/db?{option}"));
        assert_eq!(with_slow_heartbeat("mongodb://h:1"), format!("mongodb://h:1/?{option}"));
        assert_eq!(with_slow_heartbeat("mongodb://h:1/?heartbeatFrequencyMS=5"), "mongodb://h:1/?heartbeatFrequencyMS=5");
    }
}
