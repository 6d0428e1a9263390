//! The replicator reports its progress into `status.progress` of its own MongoReplication,
//! with a field manager of its own (server-side apply), so the operator's conditions and these
//! figures never overwrite each other. It writes at most every few seconds and only when a
//! figure changed; a failed write is logged and never stops replication.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};

use super::checkpoint::CheckpointPhase;
use super::config::StatusReport;
use super::context::Context;
use crate::crd::{MongoReplication, Progress};

/// The field manager of `status.progress`.
pub const PROGRESS_FIELD_MANAGER: &str = "mongo-replicator-progress";
/// The shortest time between two writes.
const INTERVAL: Duration = Duration::from_secs(5);

/// How stale `checkpointSavedAt` may get in the status before it alone is worth a write: an
/// idle stream saves its checkpoint every few seconds, and each write is one for the apiserver.
const CHECKPOINT_TIME_REFRESH: Duration = Duration::from_secs(60);

/// Whether `new` says something `last` does not: any figure but the checkpoint time, or the
/// checkpoint time once it is a minute newer.
fn worth_writing(last: &Progress, new: &Progress) -> bool {
    let without_time = |p: &Progress| Progress { checkpoint_saved_at: None, ..p.clone() };
    if without_time(last) != without_time(new) {
        return true;
    }
    let parse = |p: &Progress| p.checkpoint_saved_at.as_deref().and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
    match (parse(last), parse(new)) {
        (Some(last), Some(new)) => new.duration_since(last).as_secs() >= CHECKPOINT_TIME_REFRESH.as_secs() as i64,
        (last, new) => last != new,
    }
}

/// Starts reporting in the background until the replication's cancellation fires. Without a
/// Kubernetes client (not in a cluster, no kubeconfig) it logs why and reports nothing.
pub fn spawn(target: StatusReport, ctx: Arc<Context>) {
    let config_hash = std::env::var("MREP_CONFIG_HASH").ok().filter(|h| !h.is_empty());
    tokio::spawn(async move {
        let client = match kube::Client::try_default().await {
            Ok(client) => client,
            Err(err) => {
                tracing::warn!(error = %err, "no Kubernetes client: status.progress will not be reported");
                return;
            }
        };
        let api: Api<MongoReplication> = Api::namespaced(client, &target.namespace);
        let mut last: Option<Progress> = None;
        let mut tick = tokio::time::interval(INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = ctx.cancel.cancelled() => return,
            }
            // The checkpoint lives in the target: when the target cannot be read, the last figures
            // stand, and that writes are failing is reported all the same.
            let mut progress = match ctx.store.load().await {
                Ok(Some(checkpoint)) => {
                    let lag = (checkpoint.phase == CheckpointPhase::Stream).then(|| ctx.metrics.lag_seconds().round() as i64);
                    let mut progress = super::progress(&checkpoint, lag, config_hash.as_deref());
                    if checkpoint.phase == CheckpointPhase::Snapshot {
                        // The checkpoint counts copied documents when the snapshot ends; until then, this run's count.
                        progress.docs_copied = Some(checkpoint.docs_copied + ctx.metrics.documents_copied_total() as i64);
                    }
                    progress
                }
                _ => match &last {
                    Some(last) => last.clone(),
                    None => continue,
                },
            };
            let rfc3339 = |t: std::time::SystemTime| k8s_openapi::jiff::Timestamp::try_from(t).map(|t| t.to_string()).unwrap_or_default();
            progress.writes_failing_since = ctx.metrics.failing_since().map(rfc3339);
            if progress.phase.as_deref() == Some("Stream") {
                progress.caught_up_since = ctx.metrics.caught_up_since().map(rfc3339);
            }
            if last.as_ref().is_some_and(|last| !worth_writing(last, &progress)) {
                continue;
            }
            let patch = serde_json::json!({
                "apiVersion": "mongo-replicator.io/v1alpha1",
                "kind": "MongoReplication",
                "status": {"progress": progress},
            });
            match api.patch_status(&target.name, &PatchParams::apply(PROGRESS_FIELD_MANAGER).force(), &Patch::Apply(&patch)).await {
                Ok(_) => last = Some(progress),
                Err(err) => {
                    tracing::warn!(namespace = %target.namespace, name = %target.name, error = %err, "cannot report progress to the MongoReplication")
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_checkpoint_time_alone_is_written_once_a_minute() {
        let at = |t: &str| Progress { events_applied: Some(5), checkpoint_saved_at: Some(t.into()), ..Default::default() };
        assert!(!worth_writing(&at("2026-01-01T00:00:00Z"), &at("2026-01-01T00:00:05Z")));
        assert!(worth_writing(&at("2026-01-01T00:00:00Z"), &at("2026-01-01T00:01:00Z")));
        let more = Progress { events_applied: Some(6), ..at("2026-01-01T00:00:01Z") };
        assert!(worth_writing(&at("2026-01-01T00:00:00Z"), &more), "a new figure is written at once");
    }
}
