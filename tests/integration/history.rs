//! The history guard: a replicator that falls behind a source's oplog while its change stream is
//! open stops with the history-lost reason (or copies again), and never runs on with documents
//! missing. SecantusDB's open streams skip pruned entries without an error (LAB-NOTES), so only
//! the replicator's own check stands between this test and a silent loss.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mongo_replicator_lab::workload;
use mongo_replicator_lab::{ScramUser, SecantusOptions, SecantusServer};
use mongodb::bson::{Document, doc};

use crate::support::{ReplicatorProcess, eventually, tempdir, validate_with_env};

/// The source's oplog keeps this many entries; the test writes five times as many while the
/// replicator is frozen.
const OPLOG_CAP: u64 = 1000;
const WRITTEN_WHILE_FROZEN: i64 = 5000;

/// A replicator streaming from a small-oplog source, caught up with a few documents, then frozen
/// while the source writes far more than its oplog keeps, then thawed.
async fn fall_behind(extra: &[&str]) -> Result<(SecantusServer, SecantusServer, ReplicatorProcess, u16)> {
    let source = SecantusServer::start(SecantusOptions { oplog_max_entries: Some(OPLOG_CAP), ..Default::default() }).await?;
    let target = SecantusServer::start(SecantusOptions::default()).await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    let coll = src.database("app").collection::<Document>("events");
    coll.insert_many((0..20).map(|i| doc! {"_id": i, "phase": "before"})).await?;

    let port = mongo_replicator_lab::process::free_port()?;
    let mut args: Vec<String> = ["--name", "history", "--metrics-address", &format!("127.0.0.1:{port}")].iter().map(|s| s.to_string()).collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let env = [("MREP_SOURCE_URI", source.uri()), ("MREP_TARGET_URI", target.uri())];
    let replicator = ReplicatorProcess::start(&args, &env)?;
    eventually(Duration::from_secs(60), || async {
        let metrics = mongo_replicator_lab::process::http_get(port, "/metrics").await?;
        ensure!(metrics.contains("mongo_replicator_phase{phase=\"stream\"} 1"), "not streaming yet");
        Ok(())
    })
    .await
    .with_context(|| replicator.log_tail(15))?;
    // Streaming and caught up: these documents arrive through the change stream.
    coll.insert_many((20..40).map(|i| doc! {"_id": i, "phase": "streamed"})).await?;
    eventually(Duration::from_secs(60), || workload::assert_same_all(&src, &dst)).await.with_context(|| replicator.log_tail(15))?;
    eventually(Duration::from_secs(10), || async {
        let metrics = mongo_replicator_lab::process::http_get(port, "/metrics").await?;
        let headroom = metrics.lines().find_map(|l| l.strip_prefix("mongo_replicator_source_history_headroom_seconds ")?.trim().parse::<f64>().ok());
        ensure!(headroom.is_some_and(|h| h >= 0.0), "no headroom gauge yet:\n{metrics}");
        Ok(())
    })
    .await?;

    replicator.pause()?;
    for start in (40..40 + WRITTEN_WHILE_FROZEN).step_by(100) {
        coll.insert_many((start..start + 100).map(|i| doc! {"_id": i, "phase": "while frozen"})).await?;
    }
    eprintln!("oldest retained oplog entry after the writes: {:?}", source.oldest_retained().await?);
    replicator.resume()?;
    Ok((source, target, replicator, port))
}

#[tokio::test]
async fn a_replicator_frozen_past_the_oplog_stops_with_history_lost() -> Result<()> {
    let (_source, target, mut replicator, _) = fall_behind(&[]).await?;
    let code = replicator.wait(Duration::from_secs(60)).await?;
    let log = replicator.log();
    ensure!(code == Some(5), "exit {code:?}, expected 5 (history lost); log ends with:\n{}", replicator.log_tail(15));
    ensure!(log.contains("the source no longer has the change history"), "no plain message; log ends with:\n{}", replicator.log_tail(15));
    ensure!(log.contains(r#""reason":"ChangeStreamHistoryLost""#), "no reason; log ends with:\n{}", replicator.log_tail(15));
    // No window after the gap was applied: the freeze outlasted history::CHECK_EVERY, so the first
    // window after it is proven before it is applied; the target holds what was streamed before.
    let dst = target.admin_client().await?;
    let held = dst.database("app").collection::<Document>("events").count_documents(doc! {}).await?;
    ensure!(held == 40, "the target holds {held} documents, expected the 40 streamed before the freeze");
    Ok(())
}

#[tokio::test]
async fn a_replicator_frozen_past_the_oplog_resyncs_and_converges() -> Result<()> {
    let (source, target, mut replicator, _) = fall_behind(&["--on-history-lost", "resync"]).await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    eventually(Duration::from_secs(120), || workload::assert_same_all(&src, &dst)).await.with_context(|| replicator.log_tail(15))?;
    let count = dst.database("app").collection::<Document>("events").count_documents(doc! {}).await?;
    ensure!(count == 40 + WRITTEN_WHILE_FROZEN as u64, "target holds {count} documents");
    ensure!(replicator.log().contains("copying the data again"), "converged without a resync; log ends with:\n{}", replicator.log_tail(15));
    assert_eq!(replicator.terminate(Duration::from_secs(30)).await?, Some(0), "{}", replicator.log_tail(10));
    Ok(())
}

/// A source whose oplog the replicator's user may not read (`readWriteAnyDatabase` may watch
/// the cluster but not read `local`, as on mongod and Azure DocumentDB), holding 20 documents in
/// `app.events`; an empty target; a replicator config naming both through `env`.
struct Unguarded {
    /// Kept for as long as the run: the servers stop when dropped.
    _source: SecantusServer,
    _target: SecantusServer,
    src: mongodb::Client,
    dst: mongodb::Client,
    coll: mongodb::Collection<Document>,
    env: [(&'static str, String); 2],
    config: std::path::PathBuf,
    _dir: tempdir::Dir,
}

impl Unguarded {
    async fn start(dir: &str, oplog_max_entries: Option<u64>) -> Result<Self> {
        let admin = ScramUser::new("admin", "adm1n-pw", &[("admin", "root")]);
        let reader = ScramUser::new("reader", "r3ader-pw", &[("admin", "readWriteAnyDatabase")]);
        let source = SecantusServer::start(SecantusOptions { users: vec![admin, reader.clone()], oplog_max_entries, ..Default::default() }).await?;
        let target = SecantusServer::start(SecantusOptions::default()).await?;
        let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
        let coll = src.database("app").collection::<Document>("events");
        coll.insert_many((0..20).map(|i| doc! {"_id": i})).await?;
        let env = [("SRC_URI", source.uri_for(&reader)), ("DST_URI", target.uri())];
        let dir = tempdir::Dir::new(dir)?;
        let config = dir.0.join("replicator.yaml");
        std::fs::write(
            &config,
            "name: unguarded\nsource: {auth: connectionString, uriEnv: SRC_URI}\ntarget: {auth: connectionString, uriEnv: DST_URI}\nmetricsAddress: null\n",
        )?;
        Ok(Self { _source: source, _target: target, src, dst, coll, env, config, _dir: dir })
    }

    /// Starts the replicator and waits until it has copied the 20 documents and streamed 20 more.
    async fn replicate(&self) -> Result<ReplicatorProcess> {
        let replicator = ReplicatorProcess::start(&["--config".to_string(), self.config.display().to_string()], &self.env)?;
        let (src, dst) = (&self.src, &self.dst);
        eventually(Duration::from_secs(60), || workload::assert_same_all(src, dst)).await.with_context(|| replicator.log_tail(15))?;
        self.coll.insert_many((20..40).map(|i| doc! {"_id": i})).await?;
        eventually(Duration::from_secs(60), || workload::assert_same_all(src, dst)).await.with_context(|| replicator.log_tail(15))?;
        Ok(replicator)
    }
}

#[tokio::test]
async fn a_source_whose_oplog_cannot_be_read_replicates_unguarded_and_says_so_once() -> Result<()> {
    let run = Unguarded::start("history-unguarded", None).await?;
    let (config, env) = (&run.config, &run.env);
    let (code, verdict, _) = validate_with_env(config, env).await?;
    ensure!(code == Some(0) && verdict["passed"] == true, "validate failed: {verdict:#}");
    let guard = verdict["endpoints"][0]["checks"].as_array().context("no checks")?.iter().find(|c| c["name"] == "historyGuard").cloned();
    let guard = guard.with_context(|| format!("no historyGuard check: {verdict:#}"))?;
    ensure!(guard["passed"] == true && guard["warning"] == true, "{guard:#}");
    ensure!(guard["message"].as_str().is_some_and(|m| m.contains("the history guard is off")), "{guard:#}");

    let mut replicator = run.replicate().await?;
    assert_eq!(replicator.terminate(Duration::from_secs(30)).await?, Some(0), "{}", replicator.log_tail(10));
    let log = replicator.log();
    let said: Vec<&str> = log.lines().filter(|l| l.contains("the history guard is off")).collect();
    ensure!(said.len() == 1 && said[0].contains(r#""level":"WARN""#), "expected one warning that the guard is off, got {said:#?}");
    ensure!(!log.contains("r3ader-pw"), "the password reached the log");
    Ok(())
}

/// The loss the guard prevents, where it cannot run: the replicator may not read the source's
/// oplog (as on Azure DocumentDB), the source prunes history while the replicator is frozen, and
/// SecantusDB's stream skips the gap without an error, so the replicator runs on with documents
/// missing. `verify` is what catches it: every missing document, by `_id`.
#[tokio::test]
async fn verification_finds_what_an_unguarded_replicator_lost_past_the_oplog() -> Result<()> {
    let run = Unguarded::start("history-verify", Some(OPLOG_CAP)).await?;
    let (coll, dst, config, env) = (&run.coll, &run.dst, &run.config, &run.env);
    let mut replicator = run.replicate().await?;

    replicator.pause()?;
    for start in (40..40 + WRITTEN_WHILE_FROZEN).step_by(100) {
        coll.insert_many((start..start + 100).map(|i| doc! {"_id": i})).await?;
    }
    replicator.resume()?;
    // A last write after the gap arrives: the replicator runs on, with no error.
    let marker = 40 + WRITTEN_WHILE_FROZEN;
    coll.insert_one(doc! {"_id": marker}).await?;
    let copied = dst.database("app").collection::<Document>("events");
    eventually(Duration::from_secs(60), || async {
        ensure!(copied.find_one(doc! {"_id": marker}).await?.is_some(), "the marker written after the gap has not arrived");
        Ok(())
    })
    .await
    .with_context(|| replicator.log_tail(15))?;
    let held = copied.count_documents(doc! {}).await?;
    let missing = (marker + 1) as u64 - held;
    ensure!(missing > 0, "nothing was lost: the server did not skip pruned history, so this test shows nothing");

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mongo-replicator"))
        .args(["verify", "--config"])
        .arg(config)
        .args(["--output", "json", "--lag-allowance-seconds", "2"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env_remove("RUST_LOG")
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verdict: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).with_context(|| format!("no verdict: {stdout}"))?;
    ensure!(out.status.code() == Some(1), "verify exited {:?}: {verdict:#}", out.status.code());
    ensure!(verdict["counts"]["MissingInTarget"].as_u64() == Some(missing), "{missing} documents are missing; the verdict says {verdict:#}");
    ensure!(!stdout.contains("r3ader-pw"), "the password reached verify's output");
    eprintln!("unguarded replicator lost {missing} of {} documents past the oplog, with no error; verify found all {missing}", marker + 1);
    assert_eq!(replicator.terminate(Duration::from_secs(30)).await?, Some(0), "{}", replicator.log_tail(10));
    Ok(())
}
