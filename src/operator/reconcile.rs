//! One reconcile of one MongoReplication, as named steps. Only the I/O steps take the client:
//!
//! observe (Secrets, the validation Job and its pod, the Deployment and its pods) → check the
//! spec (pure) → build the children (pure, [`super::children`]) → apply them (server-side
//! apply, one field manager) → compute the status (pure, [`super::status`]) → one status
//! patch, skipped when only timestamps would change, and an Event per condition transition.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::core::{DynamicObject, ObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use super::api::ReconcileError;
use super::api::{API_TIMEOUT, call, get_opt, resource};
use super::binding::{self, AzureAccess, Peers};
use super::children::{self, ChildSettings, FIELD_MANAGER, Names, REPLICATION_LABEL};
use super::identity::{self, Binding, FINALIZER, IDENTITY_BOUND};
use super::metrics::OperatorMetrics;
use super::status::{self, Observed, Replicator, Validation};
use super::verification::{self, Verification};
use crate::crd::{AzureObjectKind, MongoReplication, MongoReplicationStatus};
use crate::reason::Reason;
use crate::replicator::namespace::NamespaceMap;

/// How often while something is in progress.
const WHILE_IN_PROGRESS: Duration = Duration::from_secs(5);
/// Shortest and longest wait before a validation that may pass with time (70021 while a new
/// federated credential propagates, an endpoint not reachable yet) runs again; the wait grows
/// with how long it has been failing.
const VALIDATION_RETRY: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(120));
/// Reasons of a failed validation that waiting may fix.
const RETRYABLE_VALIDATION: &[Reason] =
    &[Reason::NoFederatedCredential, Reason::EntraUnreachable, Reason::EntraTimeout, Reason::EndpointUnreachable, Reason::Timeout];
/// Exit codes of a replicator that stopped for good (see `replicate --help`).
const PERMANENT_EXIT_CODES: &[i32] = &[3, 4, 5];

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: OperatorMetrics,
    pub children: ChildSettings,
    /// How often a replication is looked at when nothing happens (progress, crash loops).
    pub resync: Duration,
    /// How long the replicator's writes may fail before the replication is `Stalled`.
    pub stall_after: Duration,
    /// ARM and the cluster's issuer, for identity bindings.
    pub azure: AzureAccess,
    /// Every MongoReplication the operator sees: cluster users may be shared between them.
    pub peers: Peers,
}

/// Annotation on every child: a hash of what the operator last applied, so an unchanged child
/// is not written again (a no-op apply is still a write to the apiserver).
pub const APPLIED_ANNOTATION: &str = "mongo-replicator.io/applied";

/// Server-side apply with the operator's field manager, skipped when the live object carries
/// the hash of this very object (read first: reads are cheap, writes are not). A child that is
/// gone or differs is applied again.
async fn apply<K>(api: &Api<K>, object: &K) -> Result<(), ReconcileError>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let mut object = object.clone();
    let encoded = serde_json::to_vec(&object).map_err(|e| ReconcileError::Encode(e.to_string()))?;
    let hash = children::config_hash(&String::from_utf8_lossy(&encoded), &[], "");
    if let Some(live) = get_opt(api, &name).await?
        && live.meta().annotations.as_ref().and_then(|a| a.get(APPLIED_ANNOTATION)) == Some(&hash)
    {
        return Ok(());
    }
    object.meta_mut().annotations.get_or_insert_with(Default::default).insert(APPLIED_ANNOTATION.to_string(), hash);
    call(
        format!("apply of {} {name}", K::kind(&Default::default())),
        api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&object)),
    )
    .await
    .map(drop)
}

/// Reconciles one object the watch could read.
pub async fn reconcile(replication: Arc<MongoReplication>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    let result = reconcile_inner(&replication, &ctx).await;
    ctx.metrics.reconciled(started.elapsed(), result.as_ref().err().map(ReconcileError::reason));
    result
}

async fn reconcile_inner(replication: &MongoReplication, ctx: &Context) -> Result<Action, ReconcileError> {
    if replication.metadata.deletion_timestamp.is_some() {
        return release_identities(ctx, replication).await;
    }
    let namespace = replication.namespace().unwrap_or_default();
    let apis = Apis::new(&ctx.client, &namespace);
    let secrets = observe_secrets(&apis, replication).await?;
    let plan = plan(replication, &secrets, &ctx.children)?;
    let binding = match plan.spec_error {
        None => binding::bind(&ctx.client, &ctx.azure, &ctx.peers, replication, &plan.names.replicator).await?,
        // A spec that cannot work binds nothing either.
        Some(_) => Binding::NotNeeded,
    };
    let retry_wait = validation_retry_wait(replication.status.as_ref());
    let (validation, retry_due) = observe_validation_of(&apis, &plan.names.job, retry_wait).await?;
    let validation = name_the_subject(validation, &namespace, &plan.names.replicator);
    let validation = explain_propagation(validation, replication.status.as_ref());
    let validation = if plan.spec_error.is_none() {
        let validation = rerun_validation_when_due(&apis, &plan.names.job, validation, retry_due).await?;
        apply_children(&apis, replication, &plan, &validation, binding.is_done(), &ctx.children).await?;
        validation
    } else {
        // A spec that cannot work changes nothing that runs; the status says why.
        validation
    };
    let replicator = observe_replicator(&apis, &replication.name_any(), &plan.names.replicator, &plan.hash).await?;
    let (verification, next_run) = verify_when_asked(&apis, replication, &plan, &replicator, &ctx.children).await?;
    let (mut observed, failing_for) = observe_all(replication, plan, binding, validation, replicator, ctx.stall_after);
    observed.verification = verification;
    let new = write_status(ctx, replication, &observed).await?;
    // A failing ARM call is tried again with backoff, not at the in-progress pace.
    let arm_backoff = match &observed.binding {
        Binding::Failed { retry_after, .. } => Some(identity::backoff(failing_since(&new, IDENTITY_BOUND), *retry_after)),
        _ => None,
    };
    let in_progress = arm_backoff.is_none() && new.conditions.iter().any(|c| c.type_ == status::RECONCILING && c.status == "True");
    let mut requeue = match arm_backoff {
        Some(backoff) => backoff,
        None if matches!(observed.validation, Validation::Failed { retrying: true, .. }) => retry_wait,
        None => ctx.resync,
    };
    if let Some(failing) = failing_for.filter(|f| *f < ctx.stall_after) {
        // Look again when failing writes would cross the threshold: nothing else may trigger it.
        requeue = requeue.min(ctx.stall_after - failing + Duration::from_secs(1));
    }
    if let Some(next) = next_run {
        requeue = requeue.min(next + Duration::from_secs(1));
    }
    if let Some(c) = &observed.caught_up
        && let Some((held, _)) = &c.caught_up_for
        && *held < c.sustain
    {
        // Likewise when being caught up will have held long enough.
        requeue = requeue.min(c.sustain - *held + Duration::from_secs(1));
    }
    Ok(Action::requeue(if in_progress { requeue.min(WHILE_IN_PROGRESS) } else { requeue }))
}

/// How long a condition has had its current status (zero when it is absent).
fn failing_since(status: &MongoReplicationStatus, type_: &str) -> Duration {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| k8s_openapi::jiff::Timestamp::now().duration_since(c.last_transition_time.0).as_secs().max(0) as u64)
        .map_or(Duration::ZERO, Duration::from_secs)
}

/// The wait before a retryable validation failure runs again: it grows with how long
/// `ConnectivityValidated` has been failing.
fn validation_retry_wait(status: Option<&MongoReplicationStatus>) -> Duration {
    let failing = status
        .filter(|s| s.conditions.iter().any(|c| c.type_ == status::CONNECTIVITY_VALIDATED && c.status == "False"))
        .map_or(Duration::ZERO, |s| failing_since(s, status::CONNECTIVITY_VALIDATED));
    crate::retry::proportional(failing, VALIDATION_RETRY.0, VALIDATION_RETRY.1)
}

/// Step, for a MongoReplication being deleted: the Azure objects the operator created go first
/// (the finalizer holds it until then); children are owned, so the garbage collector removes
/// them. A failing cleanup says why in the status and an Event, and backs off.
async fn release_identities(ctx: &Context, replication: &MongoReplication) -> Result<Action, ReconcileError> {
    if !replication.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    match binding::release(&ctx.client, &ctx.azure, &ctx.peers, replication).await? {
        Ok(()) => Ok(Action::await_change()),
        Err(Binding::Failed { reason, message, retry_after, .. }) => {
            let message = format!(
                "{message}; the MongoReplication is deleted once the Azure objects the operator created are removed (annotate it {}=true to leave them)",
                identity::KEEP_ANNOTATION
            );
            let old = replication.status.as_ref();
            let generation = replication.metadata.generation.unwrap_or_default();
            let new = status::releasing(old, generation, &reason, &message, &Time(k8s_openapi::jiff::Timestamp::now()));
            if status::differs(old, &new) {
                let (namespace, name) = (replication.namespace().unwrap_or_default(), replication.name_any());
                patch_status(&ctx.client, &namespace, &name, &new).await?;
                for condition in status::transitions(old, &new) {
                    publish(ctx, replication, &condition).await;
                }
            }
            Ok(Action::requeue(identity::backoff(failing_since(&new, IDENTITY_BOUND), retry_after)))
        }
        Err(_) => Ok(Action::requeue(WHILE_IN_PROGRESS)),
    }
}

/// A validation that fails with 70021 shortly after the operator created the federated
/// credential is most likely Entra's propagation delay: the message says so.
fn explain_propagation(validation: Validation, status: Option<&MongoReplicationStatus>) -> Validation {
    let Validation::Failed { reason, message, retrying } = validation else { return validation };
    let newest = status
        .and_then(|s| s.azure.as_ref())
        .into_iter()
        .flat_map(|a| a.created.iter())
        .filter(|o| o.kind == AzureObjectKind::FederatedIdentityCredential)
        .filter_map(|o| o.since.parse::<k8s_openapi::jiff::Timestamp>().ok().map(|t| (t, o.id.rsplit('/').next().unwrap_or_default().to_string())))
        .max_by_key(|(t, _)| *t);
    let message = match newest {
        Some((since, name)) if reason == Reason::NoFederatedCredential.as_str() => {
            let age = k8s_openapi::jiff::Timestamp::now().duration_since(since).as_secs().max(0);
            if age < 600 {
                format!(
                    "{message}; the operator created the federated identity credential {name} {age} s ago, and Microsoft Entra can take a few minutes to accept a new one"
                )
            } else {
                message
            }
        }
        _ => message,
    };
    Validation::Failed { reason, message, retrying }
}

/// The namespaced APIs one reconcile uses.
struct Apis {
    client: Client,
    namespace: String,
    secrets: Api<Secret>,
    jobs: Api<Job>,
    pods: Api<Pod>,
    deployments: Api<Deployment>,
}

impl Apis {
    fn new(client: &Client, namespace: &str) -> Self {
        Self {
            client: client.clone(),
            namespace: namespace.to_string(),
            secrets: Api::namespaced(client.clone(), namespace),
            jobs: Api::namespaced(client.clone(), namespace),
            pods: Api::namespaced(client.clone(), namespace),
            deployments: Api::namespaced(client.clone(), namespace),
        }
    }
}

/// The referenced Secrets as found: `(name, key, data)` with `None` for a missing Secret.
type ObservedSecrets = Vec<(String, String, Option<BTreeMap<String, Vec<u8>>>)>;

/// Observe: the Secrets the replication references.
async fn observe_secrets(apis: &Apis, replication: &MongoReplication) -> Result<ObservedSecrets, ReconcileError> {
    let mut found = Vec::new();
    for (name, key) in children::referenced_secrets(replication) {
        let data = get_opt(&apis.secrets, &name).await?.map(|s| s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect());
        found.push((name, key, data));
    }
    Ok(found)
}

/// What this replication should be, from its spec and Secrets: pure.
struct Plan {
    /// Why the spec cannot work as written, if it cannot.
    spec_error: Option<(String, String)>,
    config_yaml: String,
    hash: String,
    names: Names,
}

/// Check the spec (what the schema cannot say) and derive the configuration, its hash and the
/// children's names: pure.
fn plan(replication: &MongoReplication, secrets: &ObservedSecrets, settings: &ChildSettings) -> Result<Plan, ReconcileError> {
    let namespace = replication.namespace().unwrap_or_default();
    let mut spec_error = None;
    for (name, key, data) in secrets {
        match data {
            None => {
                spec_error.get_or_insert((
                    Reason::SecretNotFound.to_string(),
                    format!("Secret {namespace}/{name} does not exist; create it with the key {key}"),
                ));
            }
            Some(data) if data.get(key).is_none_or(|v| v.is_empty()) => {
                spec_error.get_or_insert((Reason::SecretKeyMissing.to_string(), format!("Secret {namespace}/{name} has no (or an empty) key {key}")));
            }
            Some(_) => {}
        }
    }
    let config = super::config::replicator_config(replication, &settings.entra);
    if let Err(err) = config.validate() {
        spec_error.get_or_insert((err.reason().to_string(), err.to_string()));
    }
    if let Err(err) = NamespaceMap::new(config.namespaces.as_ref(), &config.checkpoint_database) {
        spec_error.get_or_insert((err.reason().to_string(), err.to_string()));
    }
    let config_yaml = serde_saphyr::to_string(&config).map_err(|e| ReconcileError::Encode(e.to_string()))?;
    let secret_data: Vec<(&str, &BTreeMap<String, Vec<u8>>)> = secrets.iter().filter_map(|(n, _, d)| Some((n.as_str(), d.as_ref()?))).collect();
    // The Entra CA bundle rides in the ConfigMap beside the file: a new one rolls the pods too.
    let hashed = format!("{config_yaml}{}", settings.entra.ca_bundle.as_deref().unwrap_or_default());
    let hash = children::config_hash(&hashed, &secret_data, &children::image(replication, settings));
    let names = Names::of(&replication.name_any(), &hash);
    Ok(Plan { spec_error, config_yaml, hash, names })
}

/// Observe: the validation of this configuration, and whether a retryable failure is due to
/// run again.
async fn observe_validation_of(apis: &Apis, job_name: &str, retry_wait: Duration) -> Result<(Validation, bool), ReconcileError> {
    let Some(job) = get_opt(&apis.jobs, job_name).await? else { return Ok((Validation::Running, false)) };
    let validation = observe_validation(&job, &apis.pods).await?;
    // When it failed: the Failed condition's time (a failed Job has no completion time).
    let finished = job.status.and_then(|s| {
        let failed_at =
            s.conditions.iter().flatten().find(|c| c.type_ == "Failed" && c.status == "True").and_then(|c| c.last_transition_time.clone());
        failed_at.or(s.completion_time).or(s.start_time)
    });
    let waited = finished.map(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t.0).as_secs() as u64).unwrap_or(u64::MAX);
    Ok((validation, waited >= retry_wait.as_secs()))
}

/// Reasons of a federated credential that does not match this replication's pods.
const CREDENTIAL_MISMATCH: &[Reason] = &[
    Reason::NoFederatedCredential,
    Reason::FederatedCredentialSubjectMismatch,
    Reason::FederatedCredentialIssuerMismatch,
    Reason::FederatedCredentialAudienceMismatch,
];

/// A federated credential that does not match is the most common workload identity mistake:
/// the message names the subject this replication's pods present, which the operator knows.
fn name_the_subject(validation: Validation, namespace: &str, service_account: &str) -> Validation {
    match validation {
        Validation::Failed { reason, message, retrying } if CREDENTIAL_MISMATCH.iter().any(|r| r.as_str() == reason) => Validation::Failed {
            message: format!("{message}; this replication's pods present the subject system:serviceaccount:{namespace}:{service_account}"),
            reason,
            retrying,
        },
        other => other,
    }
}

/// A validation that may pass with time runs again once it is due: its Job is deleted and
/// recreated by [`apply_children`].
async fn rerun_validation_when_due(apis: &Apis, job_name: &str, validation: Validation, due: bool) -> Result<Validation, ReconcileError> {
    if matches!(validation, Validation::Failed { retrying: true, .. }) && due {
        delete_job(&apis.jobs, job_name).await?;
        return Ok(Validation::Running);
    }
    Ok(validation)
}

/// Build the children (pure) and apply them: the validation Job when this configuration has
/// none, the Deployment running only once it is validated; Jobs of older configurations go.
async fn apply_children(
    apis: &Apis,
    replication: &MongoReplication,
    plan: &Plan,
    validation: &Validation,
    identities_bound: bool,
    settings: &ChildSettings,
) -> Result<(), ReconcileError> {
    let run_replicator = *validation == Validation::Passed && !replication.spec.suspend;
    let built = children::build(&children::Inputs {
        replication,
        config_yaml: &plan.config_yaml,
        hash: &plan.hash,
        settings,
        run_replicator,
        verification_job: None,
    });
    let (client, namespace) = (&apis.client, apis.namespace.as_str());
    apply(&Api::<ServiceAccount>::namespaced(client.clone(), namespace), &built.service_account).await?;
    apply(&Api::<ConfigMap>::namespaced(client.clone(), namespace), &built.config_map).await?;
    apply(&Api::<Role>::namespaced(client.clone(), namespace), &built.role).await?;
    apply(&Api::<RoleBinding>::namespaced(client.clone(), namespace), &built.role_binding).await?;
    // A Job's template is immutable: it is created once per configuration, never re-applied.
    // It waits for the identities: a validation before the credential exists only fails.
    if *validation == Validation::Running && identities_bound && get_opt(&apis.jobs, &plan.names.job).await?.is_none() {
        apply(&apis.jobs, &built.job).await?;
    }
    remove_stale_jobs(&apis.jobs, &replication.name_any(), &plan.names.job).await?;
    apply(&apis.deployments, &built.deployment).await?;
    Ok(())
}

/// Step: the verification run the spec asks for (on demand, or one per interval). Its Job starts
/// once the replicator streams the current configuration (verifying a copy in progress says
/// nothing); Jobs of other runs go. Returns where the run is and, in `Continuous` mode, how long
/// until the next one.
async fn verify_when_asked(
    apis: &Apis,
    replication: &MongoReplication,
    plan: &Plan,
    replicator: &Replicator,
    settings: &ChildSettings,
) -> Result<(Verification, Option<Duration>), ReconcileError> {
    let name = replication.name_any();
    let unix_now = k8s_openapi::jiff::Timestamp::now().as_second().max(0) as u64;
    let wanted = verification::wanted_run(replication, unix_now);
    let shown = replication.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == verification::VERIFIED));
    if wanted.is_none() && !shown {
        // Nothing asked and nothing left from an earlier run: no list call on the common path.
        return Ok((Verification::NotAsked, None));
    }
    let current = wanted.as_ref().map(|(key, _)| verification::job_name(&name, key));
    let labels = format!("{REPLICATION_LABEL}={name},app.kubernetes.io/component=verification");
    let list = call(format!("list verification Jobs of {name}"), apis.jobs.list(&ListParams::default().labels(&labels))).await?;
    for job in list.items.iter().filter(|j| j.metadata.name != current) {
        delete_job(&apis.jobs, &job.name_any()).await?;
    }
    let (Some((_, next)), Some(job_name)) = (wanted, current) else { return Ok((Verification::NotAsked, None)) };
    if let Some(job) = list.items.into_iter().find(|j| j.metadata.name.as_deref() == Some(job_name.as_str())) {
        let Some(succeeded) = job_outcome(&job) else { return Ok((Verification::Running, next)) };
        let message = termination_message(&apis.pods, &job_name).await?;
        return Ok((verification::finished(succeeded, message.as_deref(), &job_name), next));
    }
    let streaming = *replicator == Replicator::Running
        && replication
            .status
            .as_ref()
            .and_then(|s| s.progress.as_ref())
            .is_some_and(|p| p.config_hash.as_deref() == Some(plan.hash.as_str()) && p.phase.as_deref() == Some("Stream"));
    if !streaming {
        return Ok((Verification::Waiting, next));
    }
    let built = children::build(&children::Inputs {
        replication,
        config_yaml: &plan.config_yaml,
        hash: &plan.hash,
        settings,
        run_replicator: true,
        verification_job: Some(&job_name),
    });
    if let Some(job) = &built.verification {
        apply(&apis.jobs, job).await?;
    }
    Ok((Verification::Running, next))
}

/// Whether a Job (of one pod, no retries) succeeded; `None` while it runs.
fn job_outcome(job: &Job) -> Option<bool> {
    let status = job.status.as_ref()?;
    let failed = status.failed.unwrap_or(0) > 0 || status.conditions.iter().flatten().any(|c| c.type_ == "Failed" && c.status == "True");
    if status.succeeded.unwrap_or(0) > 0 { Some(true) } else { failed.then_some(false) }
}

/// The termination message a Job's pod left, if any.
async fn termination_message(pods: &Api<Pod>, job: &str) -> Result<Option<String>, ReconcileError> {
    let list =
        call(format!("list pods of Job {job}"), pods.list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))).await?;
    Ok(list.items.iter().find_map(|pod| {
        let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
        statuses.iter().find_map(|s| s.state.as_ref()?.terminated.as_ref()?.message.clone())
    }))
}

/// Everything the status is computed from, and how long the replicator's writes have been failing.
fn observe_all(
    replication: &MongoReplication,
    plan: Plan,
    binding: Binding,
    validation: Validation,
    replicator: Replicator,
    stall_after: Duration,
) -> (Observed, Option<Duration>) {
    let progress = replication.status.as_ref().and_then(|s| s.progress.clone());
    let progress_current = progress.as_ref().and_then(|p| p.config_hash.as_deref()) == Some(plan.hash.as_str());
    let failing_for = progress
        .as_ref()
        .and_then(|p| p.writes_failing_since.as_deref())
        .and_then(|since| since.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|since| Duration::from_secs(k8s_openapi::jiff::Timestamp::now().duration_since(since).as_secs().max(0) as u64));
    let streams = replication.spec.mode != crate::crd::ReplicationMode::SnapshotOnly && !replication.spec.suspend;
    let caught_up = progress.as_ref().filter(|_| progress_current && streams && replicator == Replicator::Running).map(|p| {
        let cutover = replication.spec.cutover.as_ref();
        let since = p.caught_up_since.as_deref().and_then(|s| Some((s.parse::<k8s_openapi::jiff::Timestamp>().ok()?, s.to_string())));
        status::CaughtUp {
            snapshotting: p.phase.as_deref() == Some("Snapshot"),
            caught_up_for: since
                .map(|(t, s)| (Duration::from_secs(k8s_openapi::jiff::Timestamp::now().duration_since(t).as_secs().max(0) as u64), s)),
            sustain: crate::crd::Cutover::sustain(cutover),
            max_lag_seconds: crate::crd::Cutover::max_lag(cutover),
        }
    });
    let observed = Observed {
        generation: replication.metadata.generation.unwrap_or_default(),
        spec_error: plan.spec_error,
        binding,
        validation,
        suspended: replication.spec.suspend,
        replicator,
        progress,
        progress_current,
        writes_stuck_for: failing_for.filter(|f| *f >= stall_after),
        caught_up,
        verification: Verification::NotAsked,
    };
    (observed, failing_for)
}

/// Compute the status (pure) and write it once, only when more than timestamps changed; an
/// Event per condition transition.
async fn write_status(ctx: &Context, replication: &MongoReplication, observed: &Observed) -> Result<MongoReplicationStatus, ReconcileError> {
    let (namespace, name) = (replication.namespace().unwrap_or_default(), replication.name_any());
    let old = replication.status.as_ref();
    let new = status::compute(old, observed, &Time(k8s_openapi::jiff::Timestamp::now()));
    if status::differs(old, &new) {
        patch_status(&ctx.client, &namespace, &name, &new).await?;
        for condition in status::transitions(old, &new) {
            publish(ctx, replication, &condition).await;
        }
    }
    ctx.metrics.set_phase(&namespace, &name, new.phase);
    Ok(new)
}

/// Reads the verdict of a validation Job from its pod's termination message.
async fn observe_validation(job: &Job, pods: &Api<Pod>) -> Result<Validation, ReconcileError> {
    match job_outcome(job) {
        None => return Ok(Validation::Running),
        Some(true) => return Ok(Validation::Passed),
        Some(false) => {}
    }
    let name = job.name_any();
    let message = termination_message(pods, &name).await?;
    let verdict: Option<serde_json::Value> = message.as_deref().and_then(|m| serde_json::from_str(m).ok());
    let (reason, message) = match verdict {
        Some(v) => (
            v["reason"].as_str().unwrap_or(Reason::ValidationFailed.as_str()).to_string(),
            v["message"].as_str().unwrap_or("the validation failed").to_string(),
        ),
        None => (
            Reason::ValidationFailed.to_string(),
            format!("the validation Job {name} failed without a verdict (deadline passed, or the pod could not start)"),
        ),
    };
    let retrying = Reason::ALL.iter().any(|r| r.as_str() == reason && RETRYABLE_VALIDATION.contains(r));
    Ok(Validation::Failed { reason, message, retrying })
}

/// The replicator's state: its Deployment, and a container that ended for good.
async fn observe_replicator(apis: &Apis, replication: &str, name: &str, hash: &str) -> Result<Replicator, ReconcileError> {
    let (deployments, pods) = (&apis.deployments, &apis.pods);
    let Some(deployment) = get_opt(deployments, name).await? else { return Ok(Replicator::Stopped) };
    let wanted = deployment.spec.replicas.unwrap_or(1);
    if wanted == 0 {
        return Ok(Replicator::Stopped);
    }
    let labels = format!("{REPLICATION_LABEL}={replication},app.kubernetes.io/component=replicator");
    let list = call(format!("list pods of {name}"), pods.list(&ListParams::default().labels(&labels))).await?;
    for pod in &list.items {
        let current = pod.metadata.annotations.as_ref().and_then(|a| a.get(children::CONFIG_HASH_ANNOTATION)).is_some_and(|h| h == hash);
        let Some(statuses) = pod.status.as_ref().and_then(|s| s.container_statuses.as_ref()) else { continue };
        for status in statuses.iter().filter(|_| current) {
            let terminated =
                status.state.as_ref().and_then(|s| s.terminated.as_ref()).or(status.last_state.as_ref().and_then(|s| s.terminated.as_ref()));
            if let Some(terminated) = terminated.filter(|t| PERMANENT_EXIT_CODES.contains(&t.exit_code)) {
                let verdict: Option<serde_json::Value> = terminated.message.as_deref().and_then(|m| serde_json::from_str(m).ok());
                let reason = verdict.as_ref().and_then(|v| v["reason"].as_str()).unwrap_or(Reason::ReplicatorFailed.as_str()).to_string();
                let message = verdict
                    .as_ref()
                    .and_then(|v| v["message"].as_str())
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("the replicator exited with code {}", terminated.exit_code));
                return Ok(Replicator::Failed { reason, message });
            }
        }
    }
    let status = deployment.status.unwrap_or_default();
    let rolled_out = status.observed_generation == deployment.metadata.generation && status.updated_replicas.unwrap_or(0) >= wanted;
    Ok(if rolled_out && status.ready_replicas.unwrap_or(0) >= wanted { Replicator::Running } else { Replicator::Starting })
}

async fn delete_job(jobs: &Api<Job>, name: &str) -> Result<(), ReconcileError> {
    let params = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
    match tokio::time::timeout(API_TIMEOUT, jobs.delete(name, &params)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(kube::Error::Api(status))) if status.is_not_found() => Ok(()),
        Ok(Err(source)) => Err(ReconcileError::Api { what: format!("delete of Job {name}"), source }),
        Err(_) => Err(ReconcileError::Timeout { what: format!("delete of Job {name}") }),
    }
}

/// Deletes the validation Jobs of earlier configurations.
async fn remove_stale_jobs(jobs: &Api<Job>, replication: &str, current: &str) -> Result<(), ReconcileError> {
    let labels = format!("{REPLICATION_LABEL}={replication},app.kubernetes.io/component=validation");
    let list = call(format!("list Jobs of {replication}"), jobs.list(&ListParams::default().labels(&labels))).await?;
    for job in list.items.iter().filter(|j| j.metadata.name.as_deref() != Some(current)) {
        delete_job(jobs, &job.name_any()).await?;
    }
    Ok(())
}

/// One server-side apply of the operator's part of the status (never `progress`, which the
/// replicator owns). Dynamic, so it also works for an object the typed watch cannot read.
async fn patch_status(client: &Client, namespace: &str, name: &str, status: &MongoReplicationStatus) -> Result<(), ReconcileError> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource());
    let patch = serde_json::json!({
        "apiVersion": "mongo-replicator.io/v1alpha1",
        "kind": "MongoReplication",
        "status": status,
    });
    call(format!("status patch of {namespace}/{name}"), api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)))
        .await?;
    Ok(())
}

/// Publishes one Event about `reference`, its note cut to what the API keeps; a failed Event is
/// logged, never fatal.
pub async fn publish_event(recorder: &Recorder, reference: &ObjectReference, warning: bool, reason: &str, action: &str, note: &str) {
    let event = Event {
        type_: if warning { EventType::Warning } else { EventType::Normal },
        reason: reason.to_string(),
        note: Some(note.chars().take(1024).collect()),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(err) = recorder.publish(&event, reference).await {
        tracing::warn!(error = %err, "cannot publish an Event");
    }
}

/// An Event for a condition's transition, with the condition's reason: a Warning when the
/// reason is one of the error vocabulary's, Normal otherwise.
async fn publish(ctx: &Context, replication: &MongoReplication, condition: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition) {
    let error = Reason::ALL.iter().any(|r| r.as_str() == condition.reason);
    let note = format!("{} is {}: {}", condition.type_, condition.status, condition.message);
    publish_event(&ctx.recorder, &replication.object_ref(&()), error, &condition.reason, &condition.type_, &note).await;
}

/// For an object the watch could not read (written around the schema, or by an older CRD): a
/// `Stalled` condition and an Event that say why, so it never stalls the others.
pub async fn report_invalid(ctx: &Context, metadata: &ObjectMeta, error: &str) -> Result<(), ReconcileError> {
    let (Some(namespace), Some(name)) = (metadata.namespace.as_deref(), metadata.name.as_deref()) else { return Ok(()) };
    let message = format!("the object does not match the MongoReplication schema: {error}");
    let observed = Observed {
        generation: metadata.generation.unwrap_or_default(),
        spec_error: Some((Reason::InvalidSpec.to_string(), message.clone())),
        binding: Binding::NotNeeded,
        validation: Validation::Running,
        suspended: false,
        replicator: Replicator::Stopped,
        progress: None,
        progress_current: false,
        writes_stuck_for: None,
        caught_up: None,
        verification: Verification::NotAsked,
    };
    let new = status::compute(None, &observed, &Time(k8s_openapi::jiff::Timestamp::now()));
    patch_status(&ctx.client, namespace, name, &new).await?;
    let reference = ObjectReference {
        api_version: Some("mongo-replicator.io/v1alpha1".into()),
        kind: Some("MongoReplication".into()),
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        uid: metadata.uid.clone(),
        ..Default::default()
    };
    publish_event(&ctx.recorder, &reference, true, Reason::InvalidSpec.as_str(), "Reconcile", &message).await;
    Ok(())
}
