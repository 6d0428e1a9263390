//! One vocabulary: `validate` and the replicator report the same reason for the same server
//! answer, and a configuration file they cannot read is refused the same way, with exit 3.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mongo_replicator_lab::{ScramUser, SecantusOptions, SecantusServer};

use crate::support::{ReplicatorProcess, tempdir, validate_with_env};

fn write_config(dir: &Path, text: &str) -> Result<PathBuf> {
    let path = dir.join("replicator.yaml");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn config(name: &str) -> String {
    format!(
        "name: {name}\nsource: {{auth: connectionString, uriEnv: SOURCE_URI}}\ntarget: {{auth: connectionString, uriEnv: TARGET_URI}}\nmetricsAddress: null\n"
    )
}

/// The `reason` of the replicator's last log line that has one.
fn last_reason(log: &str) -> Option<String> {
    log.lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find_map(|line| line["reason"].as_str().map(str::to_string))
}

/// Runs validate and the replicator on one configuration; both must fail with `reason`, the
/// replicator with exit code `exit`.
async fn same_reason(dir: &Path, env: &[(&str, String)], reason: &str, exit: i32) -> Result<()> {
    let path = write_config(dir, &config("data/reasons"))?;
    let (code, verdict, termination) = validate_with_env(&path, env).await?;
    ensure!(code == Some(1), "validate exit {code:?}: {verdict:#}");
    ensure!(verdict["reason"] == reason, "validate said {}, expected {reason}: {verdict:#}", verdict["reason"]);
    ensure!(termination["reason"] == reason, "{termination:#}");

    let args = ["--config".to_string(), path.display().to_string()];
    let mut replicator = ReplicatorProcess::start(&args, env)?;
    let code = replicator.wait(Duration::from_secs(90)).await?;
    let log = replicator.log();
    ensure!(code == Some(exit), "replicator exit {code:?}, expected {exit}; log ends with:\n{}", replicator.log_tail(10));
    let said = last_reason(&log).context("the replicator logged no reason")?;
    ensure!(said == reason, "the replicator said {said}, validate said {reason}; log ends with:\n{}", replicator.log_tail(10));
    Ok(())
}

#[tokio::test]
async fn a_command_refused_for_lack_of_a_login_is_not_authorized_in_validate_and_the_replicator() -> Result<()> {
    let user = ScramUser::new("replicator", "s3cret-password", &[("admin", "root")]);
    let guarded = SecantusServer::start(SecantusOptions { users: vec![user.clone()], ..Default::default() }).await?;
    let open = SecantusServer::start(SecantusOptions::default()).await?;
    let dir = tempdir::Dir::new("reasons-13")?;
    // No credentials in the source's connection string: the server answers code 13.
    let env = [("SOURCE_URI", guarded.uri()), ("TARGET_URI", open.uri())];
    same_reason(&dir.0, &env, "NotAuthorized", 4).await
}

#[tokio::test]
async fn a_source_without_change_streams_is_change_streams_unsupported_in_validate_and_the_replicator() -> Result<()> {
    let standalone = SecantusServer::start(SecantusOptions { standalone: true, ..Default::default() }).await?;
    let target = SecantusServer::start(SecantusOptions::default()).await?;
    let dir = tempdir::Dir::new("reasons-cs")?;
    let env = [("SOURCE_URI", standalone.uri()), ("TARGET_URI", target.uri())];
    same_reason(&dir.0, &env, "ChangeStreamsUnsupported", 4).await
}

#[tokio::test]
async fn a_config_file_from_a_newer_operator_is_refused_naming_both_versions() -> Result<()> {
    let dir = tempdir::Dir::new("reasons-version")?;
    // A newer file may hold fields this replicator has never heard of: the version is read first.
    let path = write_config(&dir.0, &format!("version: 2\n{}throttle: {{writesPerSecond: 100}}\n", config("data/newer")))?;
    let env = [("SOURCE_URI", "mongodb://127.0.0.1:1".to_string()), ("TARGET_URI", "mongodb://127.0.0.1:1".to_string())];

    let (code, verdict, termination) = validate_with_env(&path, &env).await?;
    ensure!(code == Some(3), "validate exit {code:?}: {verdict:#}");
    ensure!(termination["reason"] == "ConfigVersionUnsupported", "{termination:#}");
    let message = termination["message"].as_str().unwrap_or_default();
    ensure!(message.contains("version 2") && message.contains("reads version 1"), "{message}");

    let args = ["--config".to_string(), path.display().to_string()];
    let mut replicator = ReplicatorProcess::start(&args, &env)?;
    ensure!(replicator.wait(Duration::from_secs(30)).await? == Some(3), "{}", replicator.log_tail(5));
    let log = replicator.log();
    ensure!(last_reason(&log).as_deref() == Some("ConfigVersionUnsupported"), "{log}");
    ensure!(log.contains("version 2") && log.contains("reads version 1") && !log.contains("unknown field"), "{log}");
    Ok(())
}
