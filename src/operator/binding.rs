//! The identity-binding steps of a reconcile, the only code that calls Azure Resource Manager:
//! read what Azure holds, ask [`super::identity`] what to do (pure), record, then write.
//!
//! Writes are few and ordered so that a crash anywhere leaves something the next reconcile can
//! finish: the finalizer is added, then the object is listed in `status.azure.created`, then it
//! is created; cleanup deletes it, then unlists it, then drops the finalizer. ARM serialises
//! credential writes per identity ([`ArmClient`] holds one lock per identity for every
//! replication), so replications sharing an identity never race each other into 409s.

use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::core::DynamicObject;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::api::{ReconcileError, call, get_opt, resource};
use super::identity::{self, Binding, CredentialStep, FINALIZER, KEEP_ANNOTATION, Recorded, UserStep, Wanted};
use crate::azure::arm::{ArmClient, ArmError};
use crate::azure::issuer::{self, IssuerError};
use crate::crd::{AzureBindings, AzureObject, AzureObjectKind, MongoReplication};
use crate::reason::Reason;

/// A discovered issuer is trusted this long: it changes only when the cluster is rebuilt.
const ISSUER_TTL: Duration = Duration::from_secs(600);

/// The operator's access to Azure: its ARM client (absent when the operator has no Azure
/// identity) and the cluster's OIDC issuer.
pub struct AzureAccess {
    arm: Option<ArmClient>,
    /// From the chart (AKS: `oidcIssuerProfile.issuerURL`); wins over discovery.
    issuer_setting: Option<String>,
    discovered: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl AzureAccess {
    pub fn new(arm: Option<ArmClient>, issuer_setting: Option<String>) -> Self {
        Self { arm, issuer_setting: issuer_setting.filter(|i| !i.trim().is_empty()), discovered: tokio::sync::Mutex::new(None) }
    }

    /// The setting, else OIDC discovery through the apiserver (cached), exactly as given.
    async fn issuer(&self, client: &Client) -> Result<String, IssuerError> {
        if let Some(issuer) = &self.issuer_setting {
            return Ok(issuer.clone());
        }
        let mut cached = self.discovered.lock().await;
        if let Some((issuer, at)) = cached.as_ref()
            && at.elapsed() < ISSUER_TTL
        {
            return Ok(issuer.clone());
        }
        let issuer = issuer::discover(client).await?;
        tracing::info!(issuer = %issuer, "discovered the cluster's service-account issuer");
        *cached = Some((issuer.clone(), Instant::now()));
        Ok(issuer)
    }
}

/// The MongoReplications the operator watches (its controllers' caches). A cluster user is
/// named by principal alone, so replications may share one: whoever created it lists it, a
/// replication that finds it listed by another lists it too (co-owner), and the last one that
/// needs it removes it.
#[derive(Default)]
pub struct Peers(std::sync::RwLock<Vec<Store<DeserializeGuard<MongoReplication>>>>);

impl Peers {
    pub fn watch(&self, store: Store<DeserializeGuard<MongoReplication>>) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).push(store);
    }

    /// The other live replications, through `f`, until it returns true.
    fn any_other(&self, me: &MongoReplication, f: impl Fn(&MongoReplication) -> bool) -> bool {
        let stores = self.0.read().unwrap_or_else(|p| p.into_inner());
        stores
            .iter()
            .flat_map(|s| s.state())
            .any(|guard| guard.0.as_ref().ok().is_some_and(|r| r.uid() != me.uid() && r.metadata.deletion_timestamp.is_none() && f(r)))
    }

    fn want_user(&self, me: &MongoReplication, id: &str) -> bool {
        self.any_other(me, |r| identity::wanted(r, "", "").users.iter().any(|u| u.id().eq_ignore_ascii_case(id)))
    }

    fn list_user(&self, me: &MongoReplication, id: &str) -> bool {
        self.any_other(me, |r| r.status.as_ref().and_then(|s| s.azure.as_ref()).is_some_and(|a| identity::is_recorded(&a.created, id)))
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// An ARM failure as a binding the condition shows.
fn failed(what: &str, err: &ArmError) -> Binding {
    Binding::Failed {
        reason: err.reason().to_string(),
        message: format!("{what}: {err}"),
        transient: err.is_transient(),
        retry_after: err.retry_after(),
    }
}

fn refused(reason: Reason, message: String) -> Binding {
    Binding::Failed { reason: reason.to_string(), message, transient: false, retry_after: None }
}

fn no_identity(what: &str) -> Binding {
    refused(
        Reason::OperatorIdentityMissing,
        format!(
            "{what}, but the operator has no Azure identity: install the chart with azureWorkloadIdentity.enabled=true and its clientId (a managed identity that may write federated credentials and cluster users), or bind them yourself and remove managedIdentityResourceId and clusterUser from the spec"
        ),
    )
}

/// The record of one replication, as the reconcile changes it.
struct Book<'a> {
    client: &'a Client,
    replication: &'a MongoReplication,
    bindings: AzureBindings,
    has_finalizer: bool,
}

impl<'a> Book<'a> {
    fn open(client: &'a Client, replication: &'a MongoReplication) -> Self {
        let bindings = replication.status.as_ref().and_then(|s| s.azure.clone()).unwrap_or_default();
        Self { client, replication, bindings, has_finalizer: replication.finalizers().iter().any(|f| f == FINALIZER) }
    }

    /// Reads the record from the apiserver, not the watch cache: the record is written whole,
    /// so a stale copy (a requeue can run before the watch delivers the last write) would
    /// forget what was created.
    async fn refresh(&mut self) -> Result<(), ReconcileError> {
        let (namespace, name) = (self.replication.namespace().unwrap_or_default(), self.replication.name_any());
        let api: Api<MongoReplication> = Api::namespaced(self.client.clone(), &namespace);
        if let Some(live) = get_opt(&api, &name).await? {
            self.bindings = live.status.as_ref().and_then(|s| s.azure.clone()).unwrap_or_default();
            self.has_finalizer = live.finalizers().iter().any(|f| f == FINALIZER);
        }
        Ok(())
    }

    fn lists(&self, id: &str) -> bool {
        identity::is_recorded(&self.bindings.created, id)
    }

    /// Lists `id` before it is created: finalizer first, then the record.
    async fn list(&mut self, kind: AzureObjectKind, id: String) -> Result<(), ReconcileError> {
        self.finalize(true).await?;
        if !self.lists(&id) {
            self.bindings.created.push(AzureObject { kind, id, since: now() });
            self.save().await?;
        }
        Ok(())
    }

    /// Unlists `id`: it is gone, was never created, or is to be left alone.
    async fn unlist(&mut self, id: &str) -> Result<(), ReconcileError> {
        let before = self.bindings.created.len();
        self.bindings.created.retain(|o| !o.id.eq_ignore_ascii_case(id));
        if self.bindings.created.len() != before {
            self.save().await?;
        }
        Ok(())
    }

    /// One server-side apply of `status.azure`, under the identity steps' own field manager.
    async fn save(&self) -> Result<(), ReconcileError> {
        let (namespace, name) = (self.replication.namespace().unwrap_or_default(), self.replication.name_any());
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &namespace, &resource());
        let patch = json!({"apiVersion": "mongo-replicator.io/v1alpha1", "kind": "MongoReplication", "status": {"azure": self.bindings}});
        let params = PatchParams::apply(identity::FIELD_MANAGER).force();
        call(format!("record of the Azure objects of {namespace}/{name}"), api.patch_status(&name, &params, &Patch::Apply(&patch))).await.map(drop)
    }

    /// Adds or drops the finalizer (server-side apply of this one list entry).
    async fn finalize(&mut self, present: bool) -> Result<(), ReconcileError> {
        if self.has_finalizer == present {
            return Ok(());
        }
        let (namespace, name) = (self.replication.namespace().unwrap_or_default(), self.replication.name_any());
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &namespace, &resource());
        let finalizers: Vec<&str> = if present { vec![FINALIZER] } else { vec![] };
        let patch =
            json!({"apiVersion": "mongo-replicator.io/v1alpha1", "kind": "MongoReplication", "metadata": {"name": name, "finalizers": finalizers}});
        let params = PatchParams::apply(identity::FIELD_MANAGER).force();
        call(format!("finalizer of {namespace}/{name}"), api.patch(&name, &params, &Patch::Apply(&patch))).await?;
        self.has_finalizer = present;
        Ok(())
    }
}

/// Whether the user asked to leave the Azure objects in place.
fn keeps_objects(replication: &MongoReplication) -> bool {
    replication.annotations().get(KEEP_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Step: bind what the spec names (federated credentials for the replicator's service account,
/// cluster users) and remove what the operator created that it no longer names.
pub async fn bind(
    client: &Client,
    azure: &AzureAccess,
    peers: &Peers,
    replication: &MongoReplication,
    service_account: &str,
) -> Result<Binding, ReconcileError> {
    let mut book = Book::open(client, replication);
    let binding = bind_all(azure, peers, &mut book, service_account).await?;
    // Only what was created holds the object: a refused create leaves no finalizer behind. The
    // cache may lag the record (finalizer first, record second), so the apiserver decides.
    if book.bindings.created.is_empty() && book.has_finalizer {
        book.refresh().await?;
        if book.bindings.created.is_empty() {
            book.finalize(false).await?;
        }
    }
    Ok(binding)
}

async fn bind_all(azure: &AzureAccess, peers: &Peers, book: &mut Book<'_>, service_account: &str) -> Result<Binding, ReconcileError> {
    let (client, replication) = (book.client, book.replication);
    let issuer = if identity::asks_for_credentials(replication) {
        match azure.issuer(client).await {
            Ok(issuer) => issuer,
            Err(err) => {
                return Ok(Binding::Failed { reason: err.reason().to_string(), message: err.to_string(), transient: true, retry_after: None });
            }
        }
    } else {
        String::new()
    };
    let wanted = identity::wanted(replication, &issuer, service_account);
    if wanted.is_empty() && book.bindings.created.is_empty() {
        return Ok(Binding::NotNeeded);
    }
    let hash = wanted.hash();
    if let Some(message) = still_bound(replication, &book.bindings, &wanted, &hash) {
        return Ok(Binding::Bound { message });
    }
    let Some(arm) = azure.arm.as_ref() else {
        return Ok(no_identity(if wanted.is_empty() {
            "the operator created Azure objects it no longer needs"
        } else {
            "the spec asks the operator to bind Azure identities"
        }));
    };
    book.refresh().await?;

    let mut adopted = Vec::new();
    for wanted in &wanted.credentials {
        match bind_credential(arm, book, wanted).await? {
            Ok(Some(name)) => adopted.push(format!("credential {name} of {}", wanted.identity.rsplit('/').next().unwrap_or_default())),
            Ok(None) => {}
            Err(binding) => return Ok(binding),
        }
    }
    let mut in_progress = Vec::new();
    for wanted in &wanted.users {
        match bind_user(arm, book, peers, wanted).await? {
            Ok(None) => {}
            Ok(Some(message)) => in_progress.push(message),
            Err(binding) => return Ok(binding),
        }
    }
    if !in_progress.is_empty() {
        return Ok(Binding::InProgress { message: in_progress.join("; ") });
    }
    if let Err(binding) = release_unwanted(arm, book, peers, &wanted).await? {
        return Ok(binding);
    }
    book.bindings.bound_hash = Some(hash);
    book.bindings.checked_at = Some(now());
    book.save().await?;
    Ok(if wanted.is_empty() { Binding::NotNeeded } else { Binding::Bound { message: identity::bound_message(&wanted, &adopted) } })
}

/// The condition's message when the bindings were found in place for this very spec and issuer
/// less than [`identity::RECHECK`] ago, and nothing unwanted is left to remove.
fn still_bound(replication: &MongoReplication, bindings: &AzureBindings, wanted: &Wanted, hash: &str) -> Option<String> {
    if bindings.bound_hash.as_deref() != Some(hash) || bindings.created.iter().any(|o| !wanted.wants(&o.id)) {
        return None;
    }
    let checked: k8s_openapi::jiff::Timestamp = bindings.checked_at.as_deref()?.parse().ok()?;
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(checked).as_secs();
    if !(0..identity::RECHECK.as_secs() as i64).contains(&age) {
        return None;
    }
    let condition = replication.status.as_ref()?.conditions.iter().find(|c| c.type_ == identity::IDENTITY_BOUND)?;
    (condition.status == "True").then(|| condition.message.clone())
}

/// One federated credential: `Ok(Some(name))` when an existing one of that name was adopted.
async fn bind_credential(
    arm: &ArmClient,
    book: &mut Book<'_>,
    wanted: &identity::WantedCredential,
) -> Result<Result<Option<String>, Binding>, ReconcileError> {
    let what = format!("federated identity credential {} on {}", wanted.name, wanted.identity);
    let ours = match arm.get_federated_credential(&wanted.identity, &wanted.name).await {
        Ok(found) => found,
        Err(err) => return Ok(Err(failed(&format!("cannot read {what}"), &err))),
    };
    let all = match ours {
        Some(_) => Vec::new(),
        None => match arm.list_federated_credentials(&wanted.identity).await {
            Ok(all) => all,
            Err(err) => return Ok(Err(failed(&format!("cannot list the federated identity credentials of {}", wanted.identity), &err))),
        },
    };
    let id = wanted.id();
    match identity::credential_step(wanted, ours.as_ref(), &all) {
        CredentialStep::InPlace => {
            // Our deterministic name: ours, even if a lost status forgot it.
            if !book.lists(&id) {
                book.list(AzureObjectKind::FederatedIdentityCredential, id).await?;
            }
            Ok(Ok(None))
        }
        CredentialStep::Adopt { name } => {
            tracing::info!(identity = %wanted.identity, credential = %name, subject = %wanted.credential.subject, "adopting the existing federated identity credential with this issuer and subject");
            Ok(Ok(Some(name)))
        }
        CredentialStep::Refuse { reason, message } => Ok(Err(refused(reason, message))),
        step @ (CredentialStep::Create | CredentialStep::Update) => {
            book.list(AzureObjectKind::FederatedIdentityCredential, id.clone()).await?;
            match arm.put_federated_credential(&wanted.identity, &wanted.name, &wanted.credential).await {
                Ok(_) => Ok(Ok(None)),
                Err(ArmError::DuplicateIssuerSubject { .. }) => {
                    // Someone created the same trust in between: adopt it on the next look.
                    book.unlist(&id).await?;
                    Ok(Err(Binding::InProgress {
                        message: format!("another credential with this issuer and subject appeared while creating {what}; looking again"),
                    }))
                }
                Err(err) => {
                    // Refused outright: nothing was created. Ambiguous (timeouts, 5xx): keep the record.
                    if step == CredentialStep::Create && !err.is_transient() && !matches!(err, ArmError::Cancelled) {
                        book.unlist(&id).await?;
                    }
                    Ok(Err(failed(&format!("cannot write {what}"), &err)))
                }
            }
        }
    }
}

/// One cluster user: `Ok(Some(message))` while it is being provisioned.
async fn bind_user(
    arm: &ArmClient,
    book: &mut Book<'_>,
    peers: &Peers,
    wanted: &identity::WantedUser,
) -> Result<Result<Option<String>, Binding>, ReconcileError> {
    let what = format!("cluster user {} of {}", wanted.principal_id, wanted.cluster);
    let current = match arm.get_cluster_user(&wanted.cluster, &wanted.principal_id).await {
        Ok(current) => current,
        Err(err) => return Ok(Err(failed(&format!("cannot read {what}"), &err))),
    };
    let id = wanted.id();
    if current.is_some() && !book.lists(&id) && peers.list_user(book.replication, &id) {
        // Another replication created it: share it, so the last one that needs it removes it.
        book.list(AzureObjectKind::ClusterUser, id.clone()).await?;
    }
    let step = identity::user_step(wanted, current.as_ref(), book.lists(&id));
    match step {
        UserStep::InPlace => Ok(Ok(None)),
        UserStep::Wait { message } => Ok(Ok(Some(message))),
        UserStep::Refuse { reason, message } => Ok(Err(refused(reason, message))),
        UserStep::Create | UserStep::Update => {
            if step == UserStep::Create {
                match arm.cluster_allowed_modes(&wanted.cluster).await {
                    Ok(modes) => {
                        if let Err((reason, message)) = identity::entra_allowed(&wanted.cluster, &modes) {
                            return Ok(Err(refused(reason, message)));
                        }
                    }
                    Err(err) => return Ok(Err(failed(&format!("cannot read the cluster {}", wanted.cluster), &err))),
                }
            }
            book.list(AzureObjectKind::ClusterUser, id.clone()).await?;
            match arm.begin_cluster_user(&wanted.cluster, &wanted.principal_id, &wanted.roles).await {
                Ok(true) => Ok(Ok(None)),
                Ok(false) => Ok(Ok(Some(format!("registering principal {} as a user of {}", wanted.principal_id, wanted.cluster)))),
                Err(err) => {
                    if step == UserStep::Create && !err.is_transient() && !matches!(err, ArmError::Cancelled | ArmError::OperationFailed { .. }) {
                        book.unlist(&id).await?;
                    }
                    Ok(Err(failed(&format!("cannot register {what}"), &err)))
                }
            }
        }
    }
}

/// Removes (or, with the keep annotation, forgets) what the record lists but the spec no longer
/// names.
async fn release_unwanted(arm: &ArmClient, book: &mut Book<'_>, peers: &Peers, wanted: &Wanted) -> Result<Result<(), Binding>, ReconcileError> {
    let unwanted: Vec<AzureObject> = book.bindings.created.iter().filter(|o| !wanted.wants(&o.id)).cloned().collect();
    remove(arm, book, peers, &unwanted).await
}

/// Deletes each object and unlists it; 404 counts as done. A cluster user another replication
/// still needs is only unlisted. Stops at the first failure.
async fn remove(arm: &ArmClient, book: &mut Book<'_>, peers: &Peers, objects: &[AzureObject]) -> Result<Result<(), Binding>, ReconcileError> {
    let keep = keeps_objects(book.replication);
    for object in objects {
        let shared = object.kind == AzureObjectKind::ClusterUser && peers.want_user(book.replication, &object.id);
        if shared {
            tracing::info!(replication = %book.replication.name_any(), id = %object.id, "leaving a cluster user another replication still needs");
        } else if !keep {
            let result = match Recorded::parse(object) {
                Some(Recorded::Credential { identity, name }) => arm.delete_federated_credential(&identity, &name).await,
                Some(Recorded::User { cluster, principal_id }) => arm.delete_cluster_user(&cluster, &principal_id).await,
                None => {
                    tracing::warn!(id = %object.id, "dropping an unreadable record of an Azure object");
                    Ok(())
                }
            };
            if let Err(err) = result {
                return Ok(Err(failed(&format!("cannot remove {}", object.id), &err)));
            }
            tracing::info!(replication = %book.replication.name_any(), id = %object.id, "removed an Azure object the operator created");
        } else {
            tracing::info!(replication = %book.replication.name_any(), id = %object.id, annotation = KEEP_ANNOTATION, "leaving an Azure object in place");
        }
        book.unlist(&object.id).await?;
    }
    Ok(Ok(()))
}

/// Step, for a MongoReplication being deleted: remove every object the record lists, then drop
/// the finalizer. `Err(binding)` says why it cannot yet.
pub async fn release(
    client: &Client,
    azure: &AzureAccess,
    peers: &Peers,
    replication: &MongoReplication,
) -> Result<Result<(), Binding>, ReconcileError> {
    let mut book = Book::open(client, replication);
    book.refresh().await?;
    if !book.bindings.created.is_empty() && !keeps_objects(replication) {
        let Some(arm) = azure.arm.as_ref() else { return Ok(Err(no_identity("the Azure objects the operator created must be removed"))) };
        let objects = book.bindings.created.clone();
        if let Err(binding) = remove(arm, &mut book, peers, &objects).await? {
            return Ok(Err(binding));
        }
    }
    book.finalize(false).await?;
    Ok(Ok(()))
}
