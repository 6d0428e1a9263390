//! Identity bindings, as pure decisions: which federated identity credentials and DocumentDB
//! cluster users a replication needs (FACTS §2–3), what to do about each given what Azure holds,
//! and what the `IdentityBound` condition says. The reconcile reads Azure, asks these functions,
//! and writes (see `reconcile::bind_identities`).
//!
//! Ownership: the operator removes only what it created. Each object is listed in
//! `status.azure.created` *before* it is created, so an operator killed between the ARM call and
//! the status write leaves a record, never an orphan. Objects that already existed with the
//! same meaning (a credential with this issuer and subject, a user with these roles) are adopted:
//! used, never listed, never removed.

use std::collections::BTreeSet;
use std::time::Duration;

use kube::ResourceExt;

use crate::azure::arm::{ClusterUser, FederatedCredential, MAX_FEDERATED_CREDENTIALS};
use crate::crd::{AzureObject, AzureObjectKind, MongoReplication};
use crate::reason::Reason;

/// Holds the MongoReplication until the Azure objects the operator created are removed. Added
/// only before the first object is created.
pub const FINALIZER: &str = "mongo-replicator.io/azure-cleanup";
/// `"true"` on a MongoReplication: leave the Azure objects the operator created in place when it
/// is deleted or stops naming them.
pub const KEEP_ANNOTATION: &str = "mongo-replicator.io/keep-azure-objects";
/// The field manager of `status.azure` and of the finalizer.
pub const FIELD_MANAGER: &str = "mongo-replicator-identity";
/// The condition type.
pub const IDENTITY_BOUND: &str = "IdentityBound";
/// Bindings found in place are checked in Azure again after this long: ARM reads are cheap,
/// but hundreds of replications resyncing every few minutes would add up.
pub const RECHECK: Duration = Duration::from_secs(600);
/// ARM's sign-in mode for Microsoft Entra on a DocumentDB cluster (FACTS §2).
const ENTRA_MODE: &str = "MicrosoftEntraID";
/// Longest federated identity credential name (FACTS §3: 3–120 characters).
const MAX_NAME: usize = 120;

/// A federated identity credential the replication needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedCredential {
    /// The managed identity's resource id, as the spec gives it.
    pub identity: String,
    /// Deterministic, from the replication's namespace, name and uid: see [`credential_name`].
    pub name: String,
    pub credential: FederatedCredential,
}

impl WantedCredential {
    pub fn id(&self) -> String {
        credential_id(&self.identity, &self.name)
    }
}

/// A cluster user the replication needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedUser {
    pub cluster: String,
    pub principal_id: String,
    pub roles: Vec<(String, String)>,
}

impl WantedUser {
    pub fn id(&self) -> String {
        user_id(&self.cluster, &self.principal_id)
    }
}

/// Everything a replication needs bound in Azure.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub credentials: Vec<WantedCredential>,
    pub users: Vec<WantedUser>,
}

impl Wanted {
    pub fn is_empty(&self) -> bool {
        self.credentials.is_empty() && self.users.is_empty()
    }

    /// Changes when anything that is bound would change (identity, issuer, subject, cluster,
    /// roles), so bindings found in place are not read again until then (or [`RECHECK`]).
    pub fn hash(&self) -> String {
        let mut text = String::new();
        for c in &self.credentials {
            text.push_str(&format!(
                "fic\0{}\0{}\0{}\0{}\0{:?}\n",
                c.identity.to_ascii_lowercase(),
                c.name,
                c.credential.issuer,
                c.credential.subject,
                c.credential.audiences
            ));
        }
        for u in &self.users {
            text.push_str(&format!("user\0{}\0{}\0{:?}\n", u.cluster.to_ascii_lowercase(), u.principal_id.to_ascii_lowercase(), role_set(&u.roles)));
        }
        short_hash(&text)
    }

    /// Whether the object `id` (of a record) is still wanted. ARM ids are case-insensitive.
    pub fn wants(&self, id: &str) -> bool {
        self.credentials.iter().map(WantedCredential::id).chain(self.users.iter().map(WantedUser::id)).any(|w| w.eq_ignore_ascii_case(id))
    }
}

/// Whether the spec asks the operator to bind anything (and so needs the cluster's issuer for
/// credentials, and an Azure identity of its own).
pub fn asks_for_credentials(replication: &MongoReplication) -> bool {
    endpoints(replication).any(|e| e.managed_identity_resource_id.is_some())
}

fn endpoints(replication: &MongoReplication) -> impl Iterator<Item = &crate::crd::EntraIdentity> {
    [&replication.spec.source, &replication.spec.target]
        .into_iter()
        .filter(|e| e.auth == crate::crd::AuthMethod::Entra)
        .filter_map(|e| e.entra.as_ref())
}

/// What the spec asks to bind: one credential per named identity (source and target may name
/// the same one: bound once) for the replicator's service account, one user per (cluster,
/// principal). `issuer` is the cluster's OIDC issuer, exactly.
pub fn wanted(replication: &MongoReplication, issuer: &str, service_account: &str) -> Wanted {
    let namespace = replication.namespace().unwrap_or_default();
    let name = credential_name(&namespace, &replication.name_any(), replication.uid().as_deref().unwrap_or_default());
    let mut wanted = Wanted::default();
    for entra in endpoints(replication) {
        if let Some(identity) = &entra.managed_identity_resource_id
            && !wanted.credentials.iter().any(|c| c.identity.eq_ignore_ascii_case(identity))
        {
            wanted.credentials.push(WantedCredential {
                identity: identity.clone(),
                name: name.clone(),
                credential: FederatedCredential::for_service_account(issuer, &namespace, service_account),
            });
        }
        if let Some(user) = &entra.cluster_user
            && !wanted
                .users
                .iter()
                .any(|u| u.cluster.eq_ignore_ascii_case(&user.cluster_resource_id) && u.principal_id.eq_ignore_ascii_case(&user.principal_id))
        {
            wanted.users.push(WantedUser {
                cluster: user.cluster_resource_id.clone(),
                principal_id: user.principal_id.clone(),
                roles: user.roles.iter().map(|r| (r.db.clone(), r.role.clone())).collect(),
            });
        }
    }
    wanted
}

/// `mrep-<namespace>-<name>-<uid prefix>`: recognisably ours in the portal, unique per
/// replication (the uid tells a re-created namesake apart), within ARM's rules
/// (`^[a-zA-Z0-9][a-zA-Z0-9-_]{2,119}$`). Namespace and name are DNS labels or subdomains, so
/// only `.` needs replacing; a long pair is shortened and a hash keeps it unique.
pub fn credential_name(namespace: &str, name: &str, uid: &str) -> String {
    let clean = |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect::<String>();
    let uid: String = uid.chars().filter(char::is_ascii_alphanumeric).take(8).collect();
    let full = format!("mrep-{}-{}-{uid}", clean(namespace), clean(name));
    if full.len() <= MAX_NAME {
        return full;
    }
    let digest = &short_hash(&format!("{namespace}/{name}"))[..8];
    let room = MAX_NAME - "mrep-".len() - 1 - digest.len() - 1 - uid.len();
    let pair: String = format!("{}-{}", clean(namespace), clean(name)).chars().take(room).collect();
    format!("mrep-{}-{digest}-{uid}", pair.trim_end_matches('-'))
}

pub fn credential_id(identity: &str, name: &str) -> String {
    format!("{identity}/federatedIdentityCredentials/{name}")
}

pub fn user_id(cluster: &str, principal_id: &str) -> String {
    format!("{cluster}/users/{principal_id}")
}

/// A recorded object, split back into what the ARM client takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    Credential { identity: String, name: String },
    User { cluster: String, principal_id: String },
}

impl Recorded {
    /// `None` for a record this version cannot read (hand-edited): it is dropped, not guessed at.
    pub fn parse(object: &AzureObject) -> Option<Self> {
        let split = |marker: &str| {
            let at = object.id.to_ascii_lowercase().rfind(&marker.to_ascii_lowercase())?;
            let (parent, child) = (&object.id[..at], &object.id[at + marker.len()..]);
            (!parent.is_empty() && !child.is_empty() && !child.contains('/')).then(|| (parent.to_string(), child.to_string()))
        };
        match object.kind {
            AzureObjectKind::FederatedIdentityCredential => {
                split("/federatedIdentityCredentials/").map(|(identity, name)| Recorded::Credential { identity, name })
            }
            AzureObjectKind::ClusterUser => split("/users/").map(|(cluster, principal_id)| Recorded::User { cluster, principal_id }),
        }
    }
}

/// Whether the record lists `id` (ARM ids are case-insensitive).
pub fn is_recorded(created: &[AzureObject], id: &str) -> bool {
    created.iter().any(|o| o.id.eq_ignore_ascii_case(id))
}

/// What to do about one wanted credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialStep {
    /// ARM holds it under our name, as wanted.
    InPlace,
    /// Create it (after recording it).
    Create,
    /// Our name holds other values (the cluster's issuer changed): write them.
    Update,
    /// Another credential of the identity already trusts this issuer and subject: use it.
    Adopt { name: String },
    /// A person must act.
    Refuse { reason: Reason, message: String },
}

/// Decides from the credential under our name and, when there is none, the identity's list.
pub fn credential_step(wanted: &WantedCredential, ours: Option<&FederatedCredential>, all: &[(String, FederatedCredential)]) -> CredentialStep {
    match ours {
        Some(current) if *current == wanted.credential => return CredentialStep::InPlace,
        Some(_) => return CredentialStep::Update,
        None => {}
    }
    let same_trust = all.iter().find(|(_, c)| c.issuer == wanted.credential.issuer && c.subject == wanted.credential.subject);
    if let Some((name, existing)) = same_trust {
        if existing.audiences == wanted.credential.audiences {
            return CredentialStep::Adopt { name: name.clone() };
        }
        return CredentialStep::Refuse {
            reason: Reason::DuplicateIssuerSubject,
            message: format!(
                "the federated identity credential {name} of {} already trusts subject {} from issuer {} but for the audiences {:?}, not {:?}; an identity holds one credential per issuer and subject: fix or delete {name}",
                wanted.identity, wanted.credential.subject, wanted.credential.issuer, existing.audiences, wanted.credential.audiences
            ),
        };
    }
    if all.len() >= MAX_FEDERATED_CREDENTIALS {
        return CredentialStep::Refuse {
            reason: Reason::FederatedCredentialLimit,
            message: format!(
                "the managed identity {} already has {} federated identity credentials, the most Azure allows: delete unused ones or use another identity for this replication",
                wanted.identity,
                all.len()
            ),
        };
    }
    CredentialStep::Create
}

/// What to do about one wanted cluster user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserStep {
    InPlace,
    /// Register it (after recording it).
    Create,
    /// Ours, with other roles or a failed provisioning: write it again.
    Update,
    /// Being provisioned or removed: look again shortly.
    Wait {
        message: String,
    },
    Refuse {
        reason: Reason,
        message: String,
    },
}

/// Decides from the user as ARM holds it; `ours` when the record lists it.
pub fn user_step(wanted: &WantedUser, current: Option<&ClusterUser>, ours: bool) -> UserStep {
    let Some(current) = current else { return UserStep::Create };
    let roles_match = role_set(&current.roles) == role_set(&wanted.roles);
    let (who, cluster) = (&wanted.principal_id, &wanted.cluster);
    match current.provisioning_state.as_str() {
        _ if !roles_match && !ours => UserStep::Refuse {
            reason: Reason::ClusterUserRolesDiffer,
            message: format!(
                "principal {who} is already a user of {cluster} with the roles {}, not {} as the spec asks; the operator does not change a user it did not create: align spec.*.entra.clusterUser.roles or change the user yourself",
                show_roles(&current.roles),
                show_roles(&wanted.roles)
            ),
        },
        _ if !roles_match => UserStep::Update,
        "Succeeded" => UserStep::InPlace,
        "Failed" | "Canceled" if ours => UserStep::Update,
        "Failed" | "Canceled" => UserStep::Refuse {
            reason: Reason::ArmOperationFailed,
            message: format!("the cluster user {who} of {cluster} is in provisioning state {}; fix or delete it", current.provisioning_state),
        },
        state => UserStep::Wait { message: format!("the cluster user {who} of {cluster} is {state}") },
    }
}

/// A cluster must allow Microsoft Entra sign-in for its users to log in with tokens.
pub fn entra_allowed(cluster: &str, modes: &[String]) -> Result<(), (Reason, String)> {
    if modes.iter().any(|m| m.eq_ignore_ascii_case(ENTRA_MODE)) {
        return Ok(());
    }
    Err((
        Reason::EntraNotAllowedOnCluster,
        format!(
            "the cluster {cluster} does not allow Microsoft Entra ID sign-in (authConfig.allowedModes: {modes:?}); add {ENTRA_MODE} to its allowed modes"
        ),
    ))
}

/// 16 hex digits of the SHA-256 of `text`.
fn short_hash(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn role_set(roles: &[(String, String)]) -> BTreeSet<(String, String)> {
    roles.iter().cloned().collect()
}

fn show_roles(roles: &[(String, String)]) -> String {
    let shown: Vec<String> = role_set(roles).into_iter().map(|(db, role)| format!("{role}@{db}")).collect();
    format!("[{}]", shown.join(", "))
}

/// Where the bindings are, for the `IdentityBound` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// The spec names nothing to bind: no condition.
    NotNeeded,
    Bound {
        message: String,
    },
    /// Something is being created or provisioned.
    InProgress {
        message: String,
    },
    /// It failed; `transient` when waiting may fix it (throttling, conflicts, an unavailable ARM);
    /// `retry_after` when ARM asked for a wait.
    Failed {
        reason: String,
        message: String,
        transient: bool,
        retry_after: Option<Duration>,
    },
}

impl Binding {
    pub fn is_done(&self) -> bool {
        matches!(self, Binding::NotNeeded | Binding::Bound { .. })
    }
}

/// The condition's message once everything is bound: what, in a sentence.
pub fn bound_message(wanted: &Wanted, adopted: &[String]) -> String {
    let mut parts = Vec::new();
    if !wanted.credentials.is_empty() {
        let names: Vec<String> = wanted.credentials.iter().map(|c| format!("{} on {}", c.name, last_segment(&c.identity))).collect();
        parts.push(format!("federated identity credentials {} for {}", names.join(", "), wanted.credentials[0].credential.subject));
    }
    if !wanted.users.is_empty() {
        let users: Vec<String> = wanted.users.iter().map(|u| format!("{} on {}", u.principal_id, last_segment(&u.cluster))).collect();
        parts.push(format!("cluster users {}", users.join(", ")));
    }
    let mut message = format!("in place: {}", parts.join("; "));
    if !adopted.is_empty() {
        message.push_str(&format!(" (existing, used as they are: {})", adopted.join(", ")));
    }
    message
}

fn last_segment(id: &str) -> &str {
    id.rsplit('/').next().unwrap_or(id)
}

/// How long to wait before trying a failed binding (or cleanup) again: between 10 s and 10 min,
/// growing with how long it has been failing, so a lasting failure costs few ARM calls. `retry_after` (ARM throttling) is honoured when longer.
pub fn backoff(failing_for: Duration, retry_after: Option<Duration>) -> Duration {
    let wait = crate::retry::proportional(failing_for, Duration::from_secs(10), Duration::from_secs(600));
    retry_after.map_or(wait, |ra| wait.max(ra))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::MongoReplication;

    const IDENTITY: &str =
        "/subscriptions/44444444-4444-4444-4444-444444444444/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader";
    const CLUSTER: &str = "/subscriptions/44444444-4444-4444-4444-444444444444/resourceGroups/rg/providers/Microsoft.DocumentDB/mongoClusters/orders";
    const ISSUER: &str = "https://oidc.example/tenant/cluster/";

    fn replication(source_identity: Option<&str>, target_identity: Option<&str>) -> MongoReplication {
        let entra = |identity: Option<&str>| {
            let mut e = serde_json::json!({"clientId": "11111111-1111-1111-1111-111111111111", "tenantId": "22222222-2222-2222-2222-222222222222"});
            if let Some(id) = identity {
                e["managedIdentityResourceId"] = id.into();
                e["clusterUser"] = serde_json::json!({"clusterResourceId": CLUSTER, "principalId": "33333333-3333-3333-3333-333333333333", "roles": [{"db": "admin", "role": "root"}]});
            }
            e
        };
        serde_json::from_value(serde_json::json!({
            "apiVersion": "mongo-replicator.io/v1alpha1", "kind": "MongoReplication",
            "metadata": {"name": "orders.dr", "namespace": "shop", "uid": "0f1e2d3c-aaaa-bbbb-cccc-000000000000"},
            "spec": {
                "source": {"auth": "entra", "uri": "mongodb://a/", "entra": entra(source_identity)},
                "target": {"auth": "entra", "uri": "mongodb://b/", "entra": entra(target_identity)},
            }
        }))
        .unwrap()
    }

    fn credential(issuer: &str, subject: &str) -> FederatedCredential {
        FederatedCredential { issuer: issuer.into(), subject: subject.into(), audiences: vec!["api://AzureADTokenExchange".into()] }
    }

    #[test]
    fn names_are_ours_valid_and_unique_per_replication() {
        assert_eq!(credential_name("shop", "orders.dr", "0f1e2d3c-aaaa"), "mrep-shop-orders-dr-0f1e2d3c");
        let long = credential_name(&"n".repeat(63), &"x".repeat(253), "0f1e2d3c-aaaa");
        assert!(long.len() <= 120 && long.starts_with("mrep-") && long.ends_with("-0f1e2d3c"), "{long}");
        assert_ne!(long, credential_name(&"n".repeat(63), &format!("{}y", "x".repeat(252)), "0f1e2d3c-aaaa"), "a hash keeps long names apart");
        for name in [credential_name("a", "b", "c"), long] {
            assert!(name.len() >= 3 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{name}");
        }
    }

    #[test]
    fn both_endpoints_are_bound_and_one_identity_once() {
        let other = IDENTITY.replace("reader", "writer");
        let w = wanted(&replication(Some(IDENTITY), Some(&other)), ISSUER, "orders.dr-replicator");
        assert_eq!(w.credentials.len(), 2);
        assert_eq!(w.credentials[0].credential.subject, "system:serviceaccount:shop:orders.dr-replicator");
        assert_eq!(w.credentials[0].credential.issuer, ISSUER, "the issuer is kept exactly, trailing slash too");
        assert_eq!(w.users.len(), 1, "one (cluster, principal) pair, named twice, is one user");
        let same = wanted(&replication(Some(IDENTITY), Some(&IDENTITY.to_uppercase().replace("/SUBSCRIPTIONS", "/subscriptions"))), ISSUER, "sa");
        assert_eq!(same.credentials.len(), 1, "ARM ids are case-insensitive");
        assert!(wanted(&replication(None, None), ISSUER, "sa").is_empty());
        assert!(w.wants(&w.credentials[1].id().to_uppercase()));
        assert_ne!(w.hash(), wanted(&replication(Some(IDENTITY), Some(&other)), "https://other/", "orders.dr-replicator").hash());
    }

    #[test]
    fn an_existing_trust_is_adopted_and_the_limit_is_named() {
        let w = &wanted(&replication(Some(IDENTITY), None), ISSUER, "sa").credentials[0];
        assert_eq!(credential_step(w, Some(&w.credential), &[]), CredentialStep::InPlace);
        assert_eq!(credential_step(w, Some(&credential("https://old/", &w.credential.subject)), &[]), CredentialStep::Update);
        let by_hand = vec![("by-hand".to_string(), w.credential.clone())];
        assert_eq!(credential_step(w, None, &by_hand), CredentialStep::Adopt { name: "by-hand".into() });
        let other_audience = vec![("odd".to_string(), FederatedCredential { audiences: vec!["api://other".into()], ..w.credential.clone() })];
        assert!(matches!(credential_step(w, None, &other_audience), CredentialStep::Refuse { reason: Reason::DuplicateIssuerSubject, .. }));
        let full: Vec<_> = (0..20).map(|i| (format!("c{i}"), credential(ISSUER, &format!("system:serviceaccount:x:{i}")))).collect();
        match credential_step(w, None, &full) {
            CredentialStep::Refuse { reason: Reason::FederatedCredentialLimit, message } => {
                assert!(message.contains("20") && message.contains(IDENTITY), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(credential_step(w, None, &full[..19]), CredentialStep::Create);
    }

    #[test]
    fn a_user_someone_else_made_is_reported_never_changed() {
        let w = &wanted(&replication(Some(IDENTITY), None), ISSUER, "sa").users[0];
        let user = |roles: &[(&str, &str)], state: &str| ClusterUser {
            roles: roles.iter().map(|(d, r)| (d.to_string(), r.to_string())).collect(),
            provisioning_state: state.into(),
        };
        assert_eq!(user_step(w, None, false), UserStep::Create);
        assert_eq!(user_step(w, Some(&user(&[("admin", "root")], "Succeeded")), false), UserStep::InPlace);
        match user_step(w, Some(&user(&[("admin", "readAnyDatabase")], "Succeeded")), false) {
            UserStep::Refuse { reason: Reason::ClusterUserRolesDiffer, message } => {
                assert!(message.contains("readAnyDatabase@admin") && message.contains("root@admin"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(user_step(w, Some(&user(&[("admin", "readAnyDatabase")], "Succeeded")), true), UserStep::Update);
        assert!(matches!(user_step(w, Some(&user(&[("admin", "root")], "InProgress")), true), UserStep::Wait { .. }));
        assert_eq!(user_step(w, Some(&user(&[("admin", "root")], "Failed")), true), UserStep::Update);
        assert!(entra_allowed(CLUSTER, &["NativeAuth".into(), "MicrosoftEntraID".into()]).is_ok());
        assert_eq!(entra_allowed(CLUSTER, &["NativeAuth".into()]).unwrap_err().0, Reason::EntraNotAllowedOnCluster);
    }

    #[test]
    fn records_parse_back_and_backoff_grows_within_bounds() {
        let w = wanted(&replication(Some(IDENTITY), None), ISSUER, "sa");
        let fic = AzureObject { kind: AzureObjectKind::FederatedIdentityCredential, id: w.credentials[0].id(), since: String::new() };
        assert_eq!(Recorded::parse(&fic), Some(Recorded::Credential { identity: IDENTITY.into(), name: w.credentials[0].name.clone() }));
        let user = AzureObject { kind: AzureObjectKind::ClusterUser, id: w.users[0].id(), since: String::new() };
        assert_eq!(
            Recorded::parse(&user),
            Some(Recorded::User { cluster: CLUSTER.into(), principal_id: "33333333-3333-3333-3333-333333333333".into() })
        );
        assert_eq!(Recorded::parse(&AzureObject { id: "junk".into(), ..user }), None);
        assert_eq!(backoff(Duration::ZERO, None), Duration::from_secs(10));
        assert_eq!(backoff(Duration::from_secs(120), None), Duration::from_secs(60));
        assert_eq!(backoff(Duration::from_secs(86400), None), Duration::from_secs(600));
        assert_eq!(backoff(Duration::ZERO, Some(Duration::from_secs(30))), Duration::from_secs(30));
    }
}
