//! The operator: turns each `MongoReplication` into its children (ServiceAccount, ConfigMap,
//! Role, validation Job, replicator Deployment) and keeps its status true.
//!
//! One controller watches MongoReplications through `DeserializeGuard` (a malformed object gets
//! a `Stalled` condition and an Event, and never stalls the others), the children it owns, and
//! the Secrets the replications reference (a rotated Secret re-validates and rolls the
//! replicator). Only the holder of a `coordination.k8s.io` Lease reconciles; a replica that
//! loses the lease exits, and its successor takes over.

pub mod api;
pub mod binding;
pub mod children;
pub mod config;
pub mod identity;
pub mod metrics;
pub mod reconcile;
pub mod status;
pub mod verification;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

use self::binding::AzureAccess;
use self::children::{ChildSettings, FIELD_MANAGER};
use self::metrics::OperatorMetrics;
use self::reconcile::{Context, ReconcileError};
use crate::auth::oidc::{EntraMetrics, Identity, TokenSource};
use crate::azure::arm::{ArmClient, RetryPolicy};
use crate::crd::MongoReplication;
use crate::https::HttpsTransport;
use crate::telemetry::{self, Health};

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    pub children: ChildSettings,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics_address: SocketAddr,
    /// Reconcile only while holding the Lease `lease_name` in `lease_namespace`.
    pub leader_election: bool,
    pub lease_name: String,
    pub lease_namespace: String,
    /// This replica's name in the Lease.
    pub identity: String,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// How often each replication is looked at when nothing changes.
    pub resync: Duration,
    /// How long the replicator's writes may fail before the replication is `Stalled`.
    pub stall_after: Duration,
    pub azure: AzureSettings,
}

/// How the operator reaches Azure for identity bindings.
#[derive(Clone, Debug)]
pub struct AzureSettings {
    pub arm_endpoint: String,
    /// The operator's own workload identity (scope: ARM); `None` when its pod has none.
    pub identity: Option<Identity>,
    /// The cluster's service-account issuer; `None`: OIDC discovery.
    pub cluster_issuer: Option<String>,
    /// Extra CA certificates for ARM.
    pub ca_file: Option<PathBuf>,
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("no Kubernetes client (in-cluster configuration or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error("leader election failed: {0}")]
    Lease(String),
    #[error("lost the leader lease {0}; exiting so that another replica takes over")]
    LostLease(String),
    #[error("cannot set up the Azure Resource Manager client: {0}")]
    Azure(String),
}

/// Runs the operator until `shutdown` fires (SIGTERM), or it loses the lease.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), OperatorError> {
    let client = Client::try_default().await.map_err(OperatorError::Client)?;
    let metrics = OperatorMetrics::new();
    // A standby replica is ready too: rollouts and PodDisruptionBudgets count on it.
    let health = Arc::new(Health::new());
    health.set_ready(true);
    let (listener, bound) = telemetry::bind(settings.metrics_address).await?;
    tracing::info!(address = %bound, "serving /metrics, /healthz and /readyz");
    tokio::spawn(telemetry::serve_listener(listener, Arc::new(metrics.clone()), health.clone(), shutdown.child_token()));

    // Leadership: a watch channel that says whether this replica holds the lease.
    let stop = CancellationToken::new();
    let mut lease_holder = None;
    if settings.leader_election {
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &settings.lease_name)
            .with_namespace(&settings.lease_namespace)
            .with_identity(&settings.identity)
            .with_field_manager(FIELD_MANAGER)
            .with_duration(15)
            .with_grace(5)
            .build()
            .await
            .map_err(|e| OperatorError::Lease(e.to_string()))?;
        let (mut leader, task) = manager.watch().await;
        tracing::info!(lease = %settings.lease_name, identity = %settings.identity, "waiting for the leader lease");
        loop {
            if *leader.borrow_and_update() {
                break;
            }
            tokio::select! {
                changed = leader.changed() => if changed.is_err() { return Err(OperatorError::Lease("the lease watcher stopped".into())) },
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
        tracing::info!(lease = %settings.lease_name, identity = %settings.identity, "holding the leader lease; reconciling");
        let (stop, name) = (stop.clone(), settings.lease_name.clone());
        lease_holder = Some(task);
        tokio::spawn(async move {
            while leader.changed().await.is_ok() {
                if !*leader.borrow() {
                    break;
                }
            }
            tracing::error!(lease = %name, "lost the leader lease");
            stop.cancel();
        });
    }

    let recorder =
        Recorder::new(client.clone(), Reporter { controller: "mongo-replicator-operator".into(), instance: Some(settings.identity.clone()) });
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder,
        metrics,
        children: settings.children.clone(),
        resync: settings.resync,
        stall_after: settings.stall_after,
        azure: AzureAccess::new(arm_client(&settings.azure, &shutdown)?, settings.azure.cluster_issuer.clone()),
        peers: Default::default(),
    });
    let watch = watcher::Config::default().any_semantic();
    let scopes: Vec<Option<String>> =
        if settings.namespaces.is_empty() { vec![None] } else { settings.namespaces.iter().cloned().map(Some).collect() };
    let stopping = {
        let (stop, shutdown) = (stop.clone(), shutdown.clone());
        async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = shutdown.cancelled() => {}
            }
        }
    };
    let stopping = Box::pin(stopping).shared();
    let mut controllers = Vec::new();
    for scope in &scopes {
        let controller = Controller::new(scoped::<DeserializeGuard<MongoReplication>>(&client, scope), watch.clone());
        let store = controller.store();
        ctx.peers.watch(store.clone());
        let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=mongo-replicator-operator");
        let controller = controller
            .owns(scoped::<Job>(&client, scope), owned.clone())
            .owns(scoped::<Deployment>(&client, scope), owned.clone())
            .owns(scoped::<ConfigMap>(&client, scope), owned.clone())
            .owns(scoped::<ServiceAccount>(&client, scope), owned)
            .watches(scoped::<Secret>(&client, scope), watcher::Config::default(), move |secret: Secret| {
                // The replications of the Secret's namespace that name it.
                let (namespace, name) = (secret.namespace(), secret.name_any());
                store
                    .state()
                    .into_iter()
                    .filter(|guard| guard.0.as_ref().ok().is_some_and(|r| r.namespace() == namespace && references(r, &name)))
                    .map(|guard| ObjectRef::from_obj(&*guard))
                    .collect::<Vec<_>>()
            })
            .with_config(ControllerConfig::default().concurrency(settings.concurrency).debounce(Duration::from_millis(500)))
            .graceful_shutdown_on(stopping.clone());
        let ctx = ctx.clone();
        controllers.push(
            controller
                .run(reconcile_guarded, error_policy, ctx)
                .for_each(|result| async move {
                    if let Err(err) = result {
                        tracing::debug!(error = %err, "controller event");
                    }
                })
                .boxed(),
        );
    }
    futures::future::join_all(controllers).await;
    if stop.is_cancelled() && !shutdown.is_cancelled() {
        return Err(OperatorError::LostLease(settings.lease_name));
    }
    drop(lease_holder);
    tracing::info!("stopped");
    Ok(())
}

/// The operator's ARM client, when it has an Azure identity. A reconcile must not sit out long
/// waits, so a request gives up sooner than the client's default: the binding reports
/// `ArmThrottled` (or the like) and the reconcile comes back after ARM's `Retry-After`.
fn arm_client(settings: &AzureSettings, shutdown: &CancellationToken) -> Result<Option<ArmClient>, OperatorError> {
    let Some(identity) = settings.identity.clone() else {
        tracing::info!(
            "no Azure identity (AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE): replications that ask the operator to bind identities report OperatorIdentityMissing"
        );
        return Ok(None);
    };
    tracing::info!(client_id = %identity.client_id, arm = %settings.arm_endpoint, "binding identities in Azure as the operator's own workload identity");
    let azure = |e: &dyn std::fmt::Display| OperatorError::Azure(e.to_string());
    let tokens = TokenSource::new(identity, EntraMetrics::new()).map_err(|e| azure(&e))?;
    let transport = HttpsTransport::new(settings.ca_file.as_deref()).map_err(|e| azure(&e))?;
    let policy = RetryPolicy { max_attempts: 4, budget: Duration::from_secs(30), request_timeout: Duration::from_secs(20), ..RetryPolicy::default() };
    let client = ArmClient::new(&settings.arm_endpoint, Arc::new(tokens), Arc::new(transport)).map_err(|e| azure(&e))?;
    Ok(Some(client.with_retry_policy(policy).with_cancellation(shutdown.child_token())))
}

/// An API of namespaced objects in one namespace, or in all.
fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Whether a replication reads the Secret `name`.
fn references(replication: &MongoReplication, name: &str) -> bool {
    children::referenced_secrets(replication).iter().any(|(secret, _)| secret == name)
}

async fn reconcile_guarded(guard: Arc<DeserializeGuard<MongoReplication>>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    match &guard.0 {
        Ok(replication) => reconcile::reconcile(Arc::new(replication.clone()), ctx).await,
        Err(invalid) => {
            tracing::warn!(namespace = ?invalid.metadata.namespace, name = ?invalid.metadata.name, error = %invalid.error, "a MongoReplication does not match the schema");
            reconcile::report_invalid(&ctx, &invalid.metadata, &invalid.error).await?;
            Ok(Action::await_change())
        }
    }
}

/// A failed reconcile is logged, counted (by `reconcile`), published as a Warning Event on the
/// object with its reason, and tried again in 5 s.
fn error_policy(guard: Arc<DeserializeGuard<MongoReplication>>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    tracing::warn!(reason = error.reason(), error = %error, "reconcile failed; retrying");
    if let Ok(replication) = &guard.0 {
        let reference = replication.object_ref(&());
        let (reason, note) = (error.reason(), format!("reconcile failed, retrying in 5 s: {error}"));
        tokio::spawn(async move { reconcile::publish_event(&ctx.recorder, &reference, true, reason, "Reconcile", &note).await });
    }
    Action::requeue(Duration::from_secs(5))
}
