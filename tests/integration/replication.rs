//! `mongo-replicator replicate` as a real process between real SecantusDB servers: the target
//! converges to the source, document for document, through crashes, restarts and DDL.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mongo_replicator_lab::workload::{self, WorkloadSpec};
use mongo_replicator_lab::{ScramUser, SecantusOptions, SecantusServer};
use mongodb::bson::{Document, doc};
use rand::Rng;

use crate::support::{ReplicatorProcess, eventually};

const CONVERGE: Duration = Duration::from_secs(120);

fn env(source: &SecantusServer, target: &SecantusServer) -> Vec<(&'static str, String)> {
    vec![("MREP_SOURCE_URI", source.uri()), ("MREP_TARGET_URI", target.uri())]
}

fn args(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--name", "it"].iter().map(|s| s.to_string()).collect();
    if !extra.contains(&"--metrics-address") {
        args.extend(["--metrics-address".to_string(), "none".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

async fn servers() -> Result<(SecantusServer, SecantusServer)> {
    Ok((SecantusServer::start(SecantusOptions::default()).await?, SecantusServer::start(SecantusOptions::default()).await?))
}

/// Waits until the target equals the source; a failure carries the replicator's log tail.
async fn converge(src: &mongodb::Client, dst: &mongodb::Client, replicator: &ReplicatorProcess) -> Result<()> {
    eventually(CONVERGE, || workload::assert_same_all(src, dst))
        .await
        .with_context(|| format!("replicator log ends with:\n{}", replicator.log_tail(15)))
}

/// GETs a path of the replicator's metrics endpoint, which must answer 200.
async fn http_get(port: u16, path: &str) -> Result<String> {
    let response = mongo_replicator_lab::process::http_get(port, path).await?;
    ensure!(response.starts_with("HTTP/1.1 200"), "GET {path}: {response}");
    Ok(response)
}

fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// The replicator's checkpoint document in the target.
async fn checkpoint(target: &mongodb::Client) -> Result<Option<Document>> {
    Ok(target.database("mongo_replicator").collection::<Document>("checkpoints").find_one(doc! {"_id": "it"}).await?)
}

#[tokio::test]
async fn snapshot_then_stream_converges_with_varied_bson() -> Result<()> {
    let (source, target) = servers().await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    let spec = WorkloadSpec { seed: 7, ..Default::default() };
    workload::seed(&src, &spec).await?;

    let port = mongo_replicator_lab::process::free_port()?;
    let metrics_address = format!("127.0.0.1:{port}");
    let mut replicator = ReplicatorProcess::start(&args(&["--workers", "4", "--metrics-address", &metrics_address]), &env(&source, &target))?;
    let load = workload::Workload::start(src.clone(), spec.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stats = load.stop().await?;
    ensure!(stats.total > 100, "the workload did too little: {stats:?}");

    converge(&src, &dst, &replicator).await?;
    // What Prometheus scrapes says the same.
    let metrics = http_get(port, "/metrics").await?;
    for expected in [
        "mongo_replicator_documents_copied_total",
        "mongo_replicator_events_applied_total{operation=\"insert\"}",
        "mongo_replicator_checkpoint_age_seconds",
        "mongo_replicator_phase{phase=\"stream\"} 1",
    ] {
        ensure!(metrics.contains(expected), "/metrics lacks {expected}:\n{metrics}");
    }
    let copied = metric_value(&metrics, "mongo_replicator_documents_copied_total").unwrap_or_default();
    ensure!(copied >= 1200.0, "documents_copied_total = {copied}");
    let inserts = metric_value(&metrics, "mongo_replicator_events_applied_total{operation=\"insert\"}").unwrap_or_default();
    ensure!(inserts > 0.0, "no insert events counted");
    ensure!(http_get(port, "/readyz").await?.contains("ok"), "not ready while streaming");
    let code = replicator.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, Some(0), "SIGTERM should drain and exit 0; log:\n{}", replicator.log_tail(20));
    let saved = checkpoint(&dst).await?.context("no checkpoint saved")?;
    assert_eq!(saved.get_str("phase")?, "stream");
    assert!(saved.get_document("token").is_ok(), "the checkpoint has no resume token: {saved}");
    Ok(())
}

#[tokio::test]
async fn sigkill_in_snapshot_and_stream_never_loses_a_write_or_recopies_a_finished_range() -> Result<()> {
    let (source, target) = servers().await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    let spec = WorkloadSpec { seed: 11, initial_docs_per_collection: 3000, large_doc_every: None, ..Default::default() };
    let seeded = workload::seed(&src, &spec).await?;
    // Small batches and ranges make the snapshot long enough to be killed in the middle of it.
    let batch = 20;
    let run_args = args(&["--workers", "2", "--batch-size", &batch.to_string(), "--partition-documents", "1000"]);
    let env = env(&source, &target);
    let mut replicator = ReplicatorProcess::start(&run_args, &env)?;
    let load = workload::Workload::start(src.clone(), spec.clone());
    let mut rng = rand::rng();
    let (mut kills, mut kills_in_snapshot, mut kills_in_stream) = (0, 0, 0);
    // At least five kills, and at least one while copying and one while streaming.
    while kills < 5 || kills_in_snapshot == 0 || kills_in_stream == 0 {
        ensure!(kills < 20, "20 kills and still not one in each phase ({kills_in_snapshot} in the snapshot); log:\n{}", replicator.log_tail(20));
        eprintln!("kill {kills}: {kills_in_snapshot} in the snapshot, {kills_in_stream} in the stream so far");
        // Short waits while copying, so the copy cannot finish before the first kills.
        let wait = if kills_in_snapshot == 0 { 150..600 } else { 300..1500 };
        tokio::time::sleep(Duration::from_millis(rng.random_range(wait))).await;
        match checkpoint(&dst).await?.and_then(|c| c.get_str("phase").ok().map(str::to_string)).as_deref() {
            Some("snapshot") => kills_in_snapshot += 1,
            Some("stream") => kills_in_stream += 1,
            _ => {}
        }
        replicator.kill().await?;
        kills += 1;
        replicator = replicator.restart(&run_args, &env)?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = load.stop().await?;
    converge(&src, &dst, &replicator).await?;
    assert_eq!(replicator.terminate(Duration::from_secs(30)).await?, Some(0));

    // Each kill may repeat what was written but not yet recorded: at most one batch per worker in
    // each range being copied (2 ranges at once); a finished range is never copied again.
    let ranges: Vec<Document> =
        futures::TryStreamExt::try_collect(dst.database("mongo_replicator").collection::<Document>("snapshot").find(doc! {}).await?).await?;
    let copied: i64 = ranges.iter().map(|r| r.get_i64("copied").unwrap_or_default()).sum();
    ensure!(ranges.iter().all(|r| r.get_bool("done").unwrap_or(false)), "unfinished ranges: {ranges:?}");
    ensure!(
        copied as usize <= seeded + stats.inserts + kills * 2 * 2 * batch,
        "copied {copied} documents for {seeded} seeded + {} inserted: something was copied twice",
        stats.inserts
    );
    Ok(())
}

#[tokio::test]
async fn source_and_target_restarts_and_ddl_mid_stream_converge() -> Result<()> {
    let (mut source, mut target) = servers().await?;
    let src = source.admin_client().await?;
    let spec = WorkloadSpec { seed: 23, initial_docs_per_collection: 300, large_doc_every: None, ..Default::default() };
    workload::seed(&src, &spec).await?;
    let mut replicator = ReplicatorProcess::start(&args(&[]), &env(&source, &target))?;
    workload::run_for(src.clone(), spec.clone(), 300).await?;

    // The source goes away and comes back on the same storage; the replicator reconnects and resumes.
    source.restart().await?;
    let src = source.admin_client().await?;
    workload::run_for(src.clone(), spec.clone(), 300).await?;
    // The target drops every connection too; writes in flight are retried, nothing is lost.
    target.restart().await?;
    let dst = target.admin_client().await?;
    workload::run_for(src.clone(), spec.clone(), 300).await?;

    // DDL: index, rename within the set, drop, a whole database, and a collection created afresh.
    let db = &spec.databases[0];
    let colls = &spec.collections;
    src.database(db).collection::<Document>(&colls[0]).create_index(mongodb::IndexModel::builder().keys(doc! {"n": 1}).build()).await?;
    src.database("admin").run_command(doc! {"renameCollection": format!("{db}.{}", colls[1]), "to": format!("{db}.renamed")}).await?;
    src.database(db).collection::<Document>(&colls[2]).drop().await?;
    src.database(&spec.databases[1]).drop().await?;
    src.database(db).collection::<Document>("fresh").insert_one(doc! {"_id": 1, "after": "ddl"}).await?;

    eventually(CONVERGE, || async {
        workload::assert_same_all(&src, &dst).await?;
        let indexes = dst.database(db).collection::<Document>(&colls[0]).list_index_names().await?;
        ensure!(indexes.contains(&"n_1".to_string()), "index not replicated: {indexes:?}");
        Ok(())
    })
    .await?;
    assert_eq!(replicator.terminate(Duration::from_secs(30)).await?, Some(0), "{}", replicator.log_tail(20));
    Ok(())
}

#[tokio::test]
async fn filters_and_renames_apply_to_data_and_ddl() -> Result<()> {
    let (source, target) = servers().await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    for (db, coll) in [("shop", "items"), ("shop", "tmp_cache"), ("crm", "customers"), ("crm", "leads")] {
        src.database(db).collection::<Document>(coll).insert_many((0..50).map(|i| doc! {"_id": i, "v": i})).await?;
    }
    let filter = ["--include", "shop.*", "--include", "crm.customers", "--exclude", "shop.tmp_*", "--rename", "shop.*=shop_dr.*"];
    let mut replicator = ReplicatorProcess::start(&args(&filter), &env(&source, &target))?;
    src.database("shop").collection::<Document>("items").insert_one(doc! {"_id": 100}).await?;
    src.database("crm").collection::<Document>("leads").insert_one(doc! {"_id": 100}).await?;
    src.database("admin").run_command(doc! {"renameCollection": "shop.items", "to": "shop.archive"}).await?;

    let expected = [("shop.archive", "shop_dr.archive"), ("crm.customers", "crm.customers")];
    eventually(CONVERGE, || async {
        let pairs: Vec<(String, String)> = expected.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        workload::assert_same(&src, &dst, &pairs).await?;
        let mut names = workload::user_namespaces(&dst).await?;
        names.sort();
        ensure!(names == ["crm.customers", "shop_dr.archive"], "unexpected target namespaces {names:?}");
        Ok(())
    })
    .await?;
    assert_eq!(replicator.terminate(Duration::from_secs(30)).await?, Some(0));
    Ok(())
}

#[tokio::test]
async fn tls_and_scram_through_connection_strings_and_no_secret_in_the_logs() -> Result<()> {
    let password = "Pa55-w0rd/with:odd@chars";
    let admin = ScramUser::new("replicator", password, &[("admin", "root")]);
    let options = SecantusOptions { tls: true, users: vec![admin.clone()], ..Default::default() };
    let source = SecantusServer::start(options.clone()).await?;
    let target = SecantusServer::start(options).await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    src.database("app").collection::<Document>("events").insert_many((0..200).map(|i| doc! {"_id": i})).await?;
    let env = vec![("MREP_SOURCE_URI", source.uri_for(&admin)), ("MREP_TARGET_URI", target.uri_for(&admin))];
    let mut replicator = ReplicatorProcess::start(&args(&[]), &env)?;
    src.database("app").collection::<Document>("events").insert_one(doc! {"_id": "streamed"}).await?;
    converge(&src, &dst, &replicator).await?;
    assert_eq!(replicator.terminate(Duration::from_secs(30)).await?, Some(0));
    let log = replicator.log();
    assert!(!log.contains(password) && !log.contains("Pa55"), "the password reached the log");

    // A wrong password is a clear, final error with its own exit code, and still no secret.
    let wrong = ScramUser::new("replicator", "not-the-password", &[]);
    let env = vec![("MREP_SOURCE_URI", source.uri_for(&wrong)), ("MREP_TARGET_URI", target.uri_for(&admin))];
    let mut refused = ReplicatorProcess::start(&args(&[]), &env)?;
    assert_eq!(refused.wait(Duration::from_secs(60)).await?, Some(4), "{}", refused.log_tail(10));
    let log = refused.log();
    assert!(log.contains("source: login refused"), "{}", refused.log_tail(10));
    assert!(!log.contains("not-the-password") && !log.contains(password));
    Ok(())
}

#[tokio::test]
async fn lost_change_history_is_reported_plainly_and_resync_recovers() -> Result<()> {
    let source = SecantusServer::start(SecantusOptions { oplog_max_entries: Some(200), ..Default::default() }).await?;
    let target = SecantusServer::start(SecantusOptions::default()).await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    let coll = src.database("app").collection::<Document>("events");
    coll.insert_many((0..50).map(|i| doc! {"_id": i})).await?;
    let env = env(&source, &target);
    let mut first = ReplicatorProcess::start(&args(&[]), &env)?;
    converge(&src, &dst, &first).await?;
    assert_eq!(first.terminate(Duration::from_secs(30)).await?, Some(0));

    // While the replicator is away the source writes far more than its oplog keeps.
    for i in 0..1000 {
        coll.update_one(doc! {"_id": i % 50}, doc! {"$set": {"v": i}}).await?;
    }
    coll.delete_one(doc! {"_id": 0}).await?;
    let mut lost = ReplicatorProcess::start(&args(&[]), &env)?;
    assert_eq!(lost.wait(Duration::from_secs(60)).await?, Some(5), "{}", lost.log_tail(10));
    assert!(lost.log().contains("no longer has the change history"), "{}", lost.log_tail(10));

    let mut resync = ReplicatorProcess::start(&args(&["--on-history-lost", "resync"]), &env)?;
    converge(&src, &dst, &resync).await?;
    assert_eq!(resync.terminate(Duration::from_secs(30)).await?, Some(0));
    Ok(())
}

#[tokio::test]
async fn stream_only_follows_changes_without_copying_and_snapshot_only_stops() -> Result<()> {
    let (source, target) = servers().await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    let coll = src.database("app").collection::<Document>("events");
    coll.insert_many((0..20).map(|i| doc! {"_id": i, "old": true})).await?;

    let mut streaming = ReplicatorProcess::start(&args(&["--mode", "stream-only"]), &env(&source, &target))?;
    // The start point is saved before the first change arrives.
    eventually(CONVERGE, || async { checkpoint(&dst).await?.map(drop).context("no checkpoint yet") }).await?;
    coll.insert_one(doc! {"_id": 100, "new": true}).await?;
    coll.update_one(doc! {"_id": 1}, doc! {"$set": {"touched": true}}).await?;
    // A top-level `$`-prefixed field name (legal since MongoDB 5) cannot travel in a plain replacement.
    coll.insert_one(doc! {"_id": 101, "$price": 1}).await?;
    let target_events = dst.database("app").collection::<Document>("events");
    // Applied before the replacement arrives, so the replacement meets an existing document.
    eventually(CONVERGE, || async { target_events.find_one(doc! {"_id": 101}).await?.map(drop).context("101 not replicated yet") }).await?;
    coll.update_one(doc! {"_id": 101}, vec![doc! {"$replaceWith": {"$literal": {"_id": 101, "$price": 2}}}]).await?;
    eventually(CONVERGE, || async {
        let ids: Vec<Document> = futures::TryStreamExt::try_collect(target_events.find(doc! {}).sort(doc! {"_id": 1}).await?).await?;
        let expected = vec![doc! {"_id": 1, "old": true, "touched": true}, doc! {"_id": 100, "new": true}, doc! {"_id": 101, "$price": 2}];
        ensure!(ids == expected, "target holds {ids:?}");
        Ok(())
    })
    .await?;
    assert_eq!(streaming.terminate(Duration::from_secs(30)).await?, Some(0));

    // SnapshotOnly copies and exits 0 by itself; a second run has nothing to do.
    let (source, target) = servers().await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    src.database("app").collection::<Document>("events").insert_many((0..20).map(|i| doc! {"_id": i})).await?;
    for _ in 0..2 {
        let mut once = ReplicatorProcess::start(&args(&["--mode", "snapshot-only"]), &env(&source, &target))?;
        assert_eq!(once.wait(Duration::from_secs(60)).await?, Some(0), "{}", once.log_tail(10));
    }
    workload::assert_same_all(&src, &dst).await?;
    assert_eq!(checkpoint(&dst).await?.context("no checkpoint")?.get_str("phase")?, "done");
    Ok(())
}

#[tokio::test]
async fn config_file_with_mounted_secret_env_secret_and_extra_ca_files() -> Result<()> {
    let admin = ScramUser::new("replicator", "c0nfig-secret", &[("admin", "root")]);
    let options = SecantusOptions { tls: true, users: vec![admin.clone()], ..Default::default() };
    let (source, target) = (SecantusServer::start(options.clone()).await?, SecantusServer::start(options).await?);
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    src.database("app").collection::<Document>("events").insert_many((0..100).map(|i| doc! {"_id": i})).await?;
    src.database("other").collection::<Document>("skipped").insert_one(doc! {"_id": 1}).await?;

    // The connection strings carry no CA: it comes from caFile, as from a mounted Secret.
    let without_ca = |uri: String| -> String {
        let (head, rest) = uri.split_once("&tlsCAFile=").expect("a TLS connection string");
        let tail = rest.split_once('&').map(|(_, t)| format!("&{t}")).unwrap_or_default();
        format!("{head}{tail}")
    };
    let dir = crate::support::tempdir::Dir::new("config")?;
    let source_secret = dir.0.join("source-uri");
    std::fs::write(&source_secret, without_ca(source.uri_for(&admin)))?;
    let config = dir.0.join("replicator.yaml");
    std::fs::write(
        &config,
        format!(
            "name: data/config-file
source:
  auth: connectionString
  uriFile: {}
  caFile: {}
target:
  auth: connectionString
  uriEnv: TARGET_URI
  caFile: {}
namespaces:
  include: [\"app.*\"]
workers: 2
metricsAddress: null
",
            source_secret.display(),
            source.ca_file().context("no CA")?.display(),
            target.ca_file().context("no CA")?.display()
        ),
    )?;
    let args: Vec<String> = vec!["--config".into(), config.display().to_string()];
    let mut replicator = ReplicatorProcess::start(&args, &[("TARGET_URI", without_ca(target.uri_for(&admin)))])?;
    src.database("app").collection::<Document>("events").insert_one(doc! {"_id": "streamed"}).await?;
    let pairs = [("app.events".to_string(), "app.events".to_string())];
    eventually(CONVERGE, || workload::assert_same(&src, &dst, &pairs)).await.with_context(|| replicator.log_tail(15))?;
    ensure!(workload::user_namespaces(&dst).await? == ["app.events"], "only app.* is included");
    assert_eq!(replicator.terminate(Duration::from_secs(30)).await?, Some(0));
    assert!(!replicator.log().contains("c0nfig-secret"), "the password reached the log");
    let saved = dst.database("mongo_replicator").collection::<Document>("checkpoints").find_one(doc! {"_id": "data/config-file"}).await?;
    ensure!(saved.is_some(), "the checkpoint is not under the configured name");
    Ok(())
}

#[tokio::test]
async fn sigterm_during_a_long_retry_wait_exits_within_the_shutdown_timeout() -> Result<()> {
    let (source, mut target) = servers().await?;
    let src = source.admin_client().await?;
    let docs: Vec<Document> = (0..20_000).map(|i| doc! {"_id": i, "pad": "x".repeat(64)}).collect();
    src.database("app").collection::<Document>("events").insert_many(docs).await?;
    // Server selection gives up fast, so the replicator spends its time in retry waits.
    let env = vec![("SRC_URI", source.uri()), ("DST_URI", format!("{}&serverSelectionTimeoutMS=200", target.uri()))];
    let port = mongo_replicator_lab::process::free_port()?;
    let address = format!("127.0.0.1:{port}");
    let dir = crate::support::tempdir::Dir::new("sigterm-retry")?;
    let config = dir.0.join("replicator.yaml");
    std::fs::write(
        &config,
        format!(
            "name: it\nsource: {{auth: connectionString, uriEnv: SRC_URI}}\ntarget: {{auth: connectionString, uriEnv: DST_URI}}\n\
             workers: 1\nbatchSize: 50\nmetricsAddress: '{address}'\nshutdownTimeoutSeconds: 3\n"
        ),
    )?;
    let mut replicator = ReplicatorProcess::start(&["--config".to_string(), config.display().to_string()], &env)?;
    eventually(Duration::from_secs(60), || async {
        let metrics = http_get(port, "/metrics").await?;
        ensure!(metric_value(&metrics, "mongo_replicator_documents_copied_total").unwrap_or(0.0) > 0.0, "nothing copied yet");
        Ok(())
    })
    .await?;
    target.kill();
    // Backoff doubles from 100 ms: the eighth write retry waits 6.4-12.8 s, longer than the shutdown timeout.
    eventually(Duration::from_secs(90), || async {
        let metrics = http_get(port, "/metrics").await?;
        let retries = metric_value(&metrics, "mongo_replicator_retries_total{operation=\"write\"}").unwrap_or(0.0);
        ensure!(retries >= 8.0, "{retries} write retries so far");
        Ok(())
    })
    .await
    .with_context(|| replicator.log_tail(10))?;
    let started = std::time::Instant::now();
    let code = replicator.terminate(Duration::from_secs(30)).await?;
    let took = started.elapsed();
    ensure!(took < Duration::from_secs(3), "SIGTERM took {took:?}, more than shutdownTimeoutSeconds (3 s); log:\n{}", replicator.log_tail(10));
    ensure!(code == Some(0), "exit {code:?} after SIGTERM; log:\n{}", replicator.log_tail(10));
    Ok(())
}
