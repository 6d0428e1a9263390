//! `mongo-replicator verify` as a real process between real SecantusDB servers: equal data
//! verifies equal, each injected divergence is found with its kind and `_id`, a live pass with a
//! workload and the replicator running has no false positive but still reports a divergence
//! made during it, and a SIGKILLed pass resumes to the same verdict.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mongo_replicator::verify::compare::id_text;
use mongo_replicator_lab::workload::{self, WorkloadSpec};
use mongo_replicator_lab::{SecantusOptions, SecantusServer};
use mongodb::IndexModel;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::IndexOptions;
use serde_json::Value;

use crate::support::{ReplicatorProcess, eventually, tempdir};

fn env(source: &SecantusServer, target: &SecantusServer) -> Vec<(&'static str, String)> {
    vec![("MREP_SOURCE_URI", source.uri()), ("MREP_TARGET_URI", target.uri())]
}

/// The replication's config file: `wl_crm.*` is renamed to `wl_crm_copy.*`.
fn config_file(dir: &tempdir::Dir) -> Result<std::path::PathBuf> {
    let path = dir.0.join("replicator.yaml");
    std::fs::write(
        &path,
        "version: 1\nname: it\nsource: {auth: connectionString, uriEnv: MREP_SOURCE_URI}\n\
         target: {auth: connectionString, uriEnv: MREP_TARGET_URI}\n\
         namespaces:\n  rename:\n    - {from: 'wl_crm.*', to: 'wl_crm_copy.*'}\n",
    )?;
    Ok(path)
}

fn replicate_args(mode: &str) -> Vec<String> {
    ["--name", "it", "--metrics-address", "none", "--rename", "wl_crm.*=wl_crm_copy.*", "--mode", mode].iter().map(|s| s.to_string()).collect()
}

fn verify_command(config: &std::path::Path, env: &[(&str, String)], extra: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mongo-replicator"));
    cmd.args(["verify", "--config"]).arg(config).args(["--output", "json", "--log-level", "debug"]).args(extra);
    cmd.env_remove("RUST_LOG").envs(env.iter().map(|(k, v)| (*k, v.as_str()))).kill_on_drop(true);
    cmd
}

/// Runs `verify` to its end: exit code and the JSON verdict (its last stdout line).
async fn verify(config: &std::path::Path, env: &[(&str, String)], extra: &[&str]) -> Result<(Option<i32>, Value)> {
    let (out_path, err_path) = (config.with_extension("stdout"), config.with_extension("stderr"));
    let mut child = verify_command(config, env, extra).stdout(std::fs::File::create(&out_path)?).stderr(std::fs::File::create(&err_path)?).spawn()?;
    let status = tokio::time::timeout(Duration::from_secs(240), child.wait()).await;
    let stdout = std::fs::read_to_string(&out_path)?;
    let stderr = std::fs::read_to_string(&err_path)?;
    let status = status.with_context(|| format!("verify ran for 240 s; stdout:\n{stdout}\nstderr:\n{stderr}"))??;
    let out = std::process::Output { status, stdout: Vec::new(), stderr: Vec::new() };
    let last = stdout.lines().last().unwrap_or_default();
    let verdict: Value = serde_json::from_str(last).with_context(|| format!("no JSON verdict: {stdout}\nstderr: {stderr}"))?;
    ensure!(!stdout.contains("mongodb://") && !stderr.contains("mongodb://"), "a connection string in the output");
    Ok((out.status.code(), verdict))
}

/// `(kind, ns, id or index)` of every mismatch of a verdict, sorted.
fn mismatches(verdict: &Value) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = verdict["mismatches"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|m| {
                    let what = m["id"].as_str().or(m["index"].as_str()).unwrap_or_default();
                    (m["kind"].as_str().unwrap_or_default().to_string(), m["ns"].as_str().unwrap_or_default().to_string(), what.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn m(kind: &str, ns: &str, what: &str) -> (String, String, String) {
    (kind.to_string(), ns.to_string(), what.to_string())
}

async fn servers() -> Result<(SecantusServer, SecantusServer)> {
    Ok((SecantusServer::start(SecantusOptions::default()).await?, SecantusServer::start(SecantusOptions::default()).await?))
}

/// Copies the source once (SnapshotOnly) and waits for the copy to finish.
async fn copy_once(source: &SecantusServer, target: &SecantusServer) -> Result<()> {
    let mut once = ReplicatorProcess::start(&replicate_args("snapshot-only"), &env(source, target))?;
    let code = once.wait(Duration::from_secs(180)).await?;
    ensure!(code == Some(0), "the snapshot exited {code:?}: {}", once.log_tail(20));
    Ok(())
}

#[tokio::test]
async fn equal_data_verifies_equal_and_every_injected_divergence_is_found() -> Result<()> {
    let (source, target) = servers().await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    // Varied BSON, mixed `_id`s in `events`, a few 2–6 MB documents.
    let spec = WorkloadSpec { seed: 21, initial_docs_per_collection: 300, large_doc_every: Some(400), ..Default::default() };
    workload::seed(&src, &spec).await?;
    let orders = src.database("wl_shop").collection::<Document>("orders");
    orders.create_index(IndexModel::builder().keys(doc! {"n": 1}).build()).await?;
    orders.create_index(IndexModel::builder().keys(doc! {"ref": 1}).build()).await?;
    src.database("wl_crm").collection::<Document>("orders").update_one(doc! {"_id": 9_i64}, doc! {"$set": {"big": 42_i64}}).await?;
    copy_once(&source, &target).await?;
    let dir = tempdir::Dir::new("verify")?;
    let config = config_file(&dir)?;
    let env = env(&source, &target);

    let (code, verdict) = verify(&config, &env, &["--partition-documents", "100", "--lag-allowance-seconds", "0"]).await?;
    ensure!(code == Some(0), "equal data did not verify equal: {verdict:#}");
    assert_eq!(verdict["outcome"], "Equal");
    assert_eq!(verdict["namespaces"], 6);
    ensure!(verdict["partitions"].as_u64().unwrap_or_default() > 6, "int _id collections were not split: {verdict}");
    ensure!(verdict["documentsCompared"].as_u64().unwrap_or_default() >= 1800, "{verdict}");

    // The divergences, in the target (the renamed namespace for crm).
    let shop = dst.database("wl_shop").collection::<Document>("orders");
    let crm = dst.database("wl_crm_copy").collection::<Document>("orders");
    let events = dst.database("wl_shop").collection::<Document>("events");
    shop.delete_one(doc! {"_id": 5_i64}).await?;
    shop.insert_one(doc! {"_id": 100_000_i64, "extra": true}).await?;
    crm.update_one(doc! {"_id": 7_i64}, doc! {"$set": {"n": -1}}).await?;
    // The same fields and values, in reverse order.
    let original = crm.find_one(doc! {"_id": 8_i64}).await?.context("no crm order 8")?;
    let reversed: Document =
        original.iter().collect::<Vec<_>>().into_iter().rev().filter(|(k, _)| *k != "_id").map(|(k, v)| (k.clone(), v.clone())).collect();
    crm.replace_one(doc! {"_id": 8_i64}, reversed).await?;
    // The same value as an Int32 where the source has an Int64.
    crm.update_one(doc! {"_id": 9_i64}, doc! {"$set": {"big": 42_i32}}).await?;
    // A mixed-type `_id`: a string `_id` deleted.
    let string_id = events.find_one(doc! {"_id": {"$type": "string"}}).await?.context("no string _id")?.get("_id").cloned().context("_id")?;
    events.delete_one(doc! {"_id": string_id.clone()}).await?;
    shop.drop_index("n_1").await?;
    shop.drop_index("ref_1").await?;
    shop.create_index(IndexModel::builder().keys(doc! {"ref": 1}).options(IndexOptions::builder().sparse(true).build()).build()).await?;

    let expected = vec![
        m("CountDifferent", "wl_shop.events", ""),
        m("Different", "wl_crm.orders", &id_text(&Bson::Int64(7))),
        m("Different", "wl_crm.orders", &id_text(&Bson::Int64(8))),
        m("Different", "wl_crm.orders", &id_text(&Bson::Int64(9))),
        m("ExtraInTarget", "wl_shop.orders", &id_text(&Bson::Int64(100_000))),
        m("IndexDifferent", "wl_shop.orders", "ref_1"),
        m("IndexMissing", "wl_shop.orders", "n_1"),
        m("MissingInTarget", "wl_shop.events", &id_text(&string_id)),
        m("MissingInTarget", "wl_shop.orders", &id_text(&Bson::Int64(5))),
    ];
    let (code, verdict) = verify(&config, &env, &["--partition-documents", "100", "--lag-allowance-seconds", "0"]).await?;
    assert_eq!(code, Some(1), "{verdict:#}");
    assert_eq!(verdict["outcome"], "Mismatched");
    assert_eq!(verdict["reason"], "TargetDiffers");
    // wl_shop.orders nets to 300 documents again (one missing, one extra): no count mismatch there.
    assert_eq!(mismatches(&verdict), expected, "{verdict:#}");
    for report in verdict["mismatches"].as_array().context("mismatches")? {
        ensure!(report["firstSeen"].as_str().is_some_and(|t| t.starts_with("20")), "no time first seen: {report}");
        ensure!(report.get("n").is_none() && !report.to_string().contains("\"big\""), "contents in a report: {report}");
    }
    let crm_report = verdict["mismatches"].as_array().and_then(|l| l.iter().find(|r| r["ns"] == "wl_crm.orders")).context("no crm mismatch")?;
    assert_eq!(crm_report["targetNs"], "wl_crm_copy.orders");

    // Field order does not count with --ignore-field-order; types still do.
    let (code, relaxed) = verify(&config, &env, &["--ignore-field-order", "--lag-allowance-seconds", "0"]).await?;
    assert_eq!(code, Some(1));
    let without_order: Vec<_> = expected.iter().filter(|e| e.2 != id_text(&Bson::Int64(8))).cloned().collect();
    assert_eq!(mismatches(&relaxed), without_order, "{relaxed:#}");
    Ok(())
}

/// A collection the workload never writes, for a divergence made during a live pass.
async fn seed_static(src: &mongodb::Client) -> Result<()> {
    let docs: Vec<Document> = (0..500_i64).map(|i| doc! {"_id": i, "v": i * 2}).collect();
    src.database("wl_shop").collection::<Document>("static").insert_many(docs).await?;
    Ok(())
}

#[tokio::test]
async fn a_live_pass_has_no_false_positive_and_still_reports_a_divergence_made_during_it() -> Result<()> {
    let (source, target) = servers().await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    let spec = WorkloadSpec { seed: 33, initial_docs_per_collection: 1000, large_doc_every: None, writers: 1, ..Default::default() };
    workload::seed(&src, &spec).await?;
    seed_static(&src).await?;
    let env = env(&source, &target);
    let replicator = ReplicatorProcess::start(&replicate_args("snapshot-and-stream"), &env)?;
    let pairs: Vec<(String, String)> = ["orders", "items", "events", "static"]
        .iter()
        .flat_map(|c| [(format!("wl_shop.{c}"), format!("wl_shop.{c}")), (format!("wl_crm.{c}"), format!("wl_crm_copy.{c}"))])
        .filter(|(s, _)| s != "wl_crm.static")
        .collect();
    eventually(Duration::from_secs(120), || workload::assert_same(&src, &dst, &pairs)).await.with_context(|| replicator.log_tail(15))?;
    let dir = tempdir::Dir::new("verify-live")?;
    let config = config_file(&dir)?;
    let args = ["--partition-documents", "200", "--lag-allowance-seconds", "5", "--max-live-seconds", "120"];

    // The source is written all through the pass; the replicator keeps up.
    let load = workload::Workload::start(src.clone(), spec.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (code, verdict) = verify(&config, &env, &args).await?;
    let stats = load.stop().await?;
    ensure!(stats.total > 200, "the workload did too little: {stats:?}");
    ensure!(code == Some(0), "a false positive while the workload ran ({stats:?}): {verdict:#}\n{}", replicator.log_tail(10));
    assert_eq!(verdict["outcome"], "Equal");
    ensure!(verdict["generation"].as_u64().unwrap_or_default() >= 1, "no recheck generation ran: {verdict}");

    // Again, and a document of the static collection is deleted in the target during the pass.
    let load = workload::Workload::start(src.clone(), spec.clone());
    let pass = verify_command(&config, &env, &args).stdout(std::process::Stdio::piped()).spawn()?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    dst.database("wl_shop").collection::<Document>("static").delete_one(doc! {"_id": 250_i64}).await?;
    let out = tokio::time::timeout(Duration::from_secs(300), pass.wait_with_output()).await??;
    load.stop().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verdict: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).with_context(|| stdout.to_string())?;
    assert_eq!(out.status.code(), Some(1), "{verdict:#}");
    let found = mismatches(&verdict);
    ensure!(found.contains(&m("MissingInTarget", "wl_shop.static", &id_text(&Bson::Int64(250)))), "{verdict:#}");
    ensure!(found.iter().all(|f| f.1 == "wl_shop.static"), "a false positive beside the real divergence: {verdict:#}");
    drop(replicator);
    Ok(())
}

#[tokio::test]
async fn a_sigkilled_pass_resumes_skipping_finished_partitions_to_the_same_verdict() -> Result<()> {
    let (source, target) = servers().await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    let spec = WorkloadSpec { seed: 44, initial_docs_per_collection: 2000, large_doc_every: None, ..Default::default() };
    workload::seed(&src, &spec).await?;
    copy_once(&source, &target).await?;
    dst.database("wl_shop").collection::<Document>("items").delete_one(doc! {"_id": 1500_i64}).await?;
    let dir = tempdir::Dir::new("verify-kill")?;
    let config = config_file(&dir)?;
    let env = env(&source, &target);
    // Slow enough (2,000 documents/s) to be killed half way.
    let args = ["--partition-documents", "250", "--workers", "1", "--max-docs-per-second", "2000", "--lag-allowance-seconds", "0"];

    let mut first = verify_command(&config, &env, &args).stdout(std::process::Stdio::null()).spawn()?;
    let progress = dst.database("mongo_replicator").collection::<Document>("verification");
    eventually(Duration::from_secs(60), || async {
        let done = progress.count_documents(doc! {"type": "partition", "done": true}).await?;
        ensure!(done >= 8, "{done} partitions done");
        Ok(())
    })
    .await?;
    first.kill().await?;
    let total = progress.count_documents(doc! {"type": "partition"}).await?;
    let done = progress.count_documents(doc! {"type": "partition", "done": true}).await?;
    ensure!(done < total, "the pass finished before the kill ({done}/{total})");

    let (code, resumed) = verify(&config, &env, &["--partition-documents", "250", "--lag-allowance-seconds", "0"]).await?;
    assert_eq!(code, Some(1), "{resumed:#}");
    let skipped = resumed["partitionsSkipped"].as_u64().unwrap_or_default();
    ensure!(skipped >= done && skipped < total, "skipped {skipped} of {total} partitions, {done} were done at the kill");
    let (code, fresh) = verify(&config, &env, &["--restart", "--lag-allowance-seconds", "0"]).await?;
    assert_eq!(code, Some(1));
    assert_eq!(fresh["partitionsSkipped"], 0);
    assert_eq!(mismatches(&resumed), mismatches(&fresh));
    assert_eq!(
        mismatches(&fresh),
        vec![m("CountDifferent", "wl_shop.items", ""), m("MissingInTarget", "wl_shop.items", &id_text(&Bson::Int64(1500)))],
        "{fresh:#}"
    );
    Ok(())
}
