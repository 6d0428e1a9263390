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
            let Ok(Some(checkpoint)) = ctx.store.load().await else { continue };
            let lag = (checkpoint.phase == CheckpointPhase::Stream).then(|| ctx.metrics.lag_seconds().round() as i64);
            let mut progress = super::progress(&checkpoint, lag, config_hash.as_deref());
            if checkpoint.phase == CheckpointPhase::Snapshot {
                // The checkpoint counts copied documents when the snapshot ends; until then, this run's count.
                progress.docs_copied = Some(checkpoint.docs_copied + ctx.metrics.documents_copied_total() as i64);
            }
            if last.as_ref() == Some(&progress) {
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
