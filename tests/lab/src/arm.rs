//! A double of Azure Resource Manager (`https://management.azure.com`) for the two resource kinds
//! the product writes (FACTS §2–3):
//!
//! - federated identity credentials of user-assigned managed identities, api-version `2024-11-30`:
//!   `{identityId}/federatedIdentityCredentials[/{name}]`;
//! - Entra users of Azure DocumentDB clusters, api-version `2025-09-01`:
//!   `{clusterId}[/users[/{principalObjectId}]]`, a long-running operation with
//!   `Azure-AsyncOperation` status resources under
//!   `/subscriptions/{sub}/providers/Microsoft.DocumentDB/locations/{location}/…`.
//!
//! Case: ARM resource ids are case-insensitive, so the double looks identities, clusters,
//! credential names and user names up case-insensitively (whole resource id lower-cased) and
//! answers with the casing they were created with. Issuer, subject and audiences are compared
//! case-sensitively, as Entra does.
//!
//! Each request needs `Authorization: Bearer <token>` accepted by the caller's [`BearerCheck`];
//! only the api-version of FACTS is accepted for each kind (real ARM also knows older ones).
//! Errors have the ARM shape `{"error":{"code":"…","message":"…"}}`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};

use crate::https::{Handler, HttpRequest, HttpResponse, HttpsServer};
use crate::pki::CertFiles;

/// The api-version of `Microsoft.ManagedIdentity` federated identity credentials.
pub const FIC_API_VERSION: &str = "2024-11-30";
/// The api-version of `Microsoft.DocumentDB/mongoClusters` (and its users).
pub const MONGO_API_VERSION: &str = "2025-09-01";
pub const FIC_TYPE: &str = "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials";
pub const IDENTITY_TYPE: &str = "Microsoft.ManagedIdentity/userAssignedIdentities";
pub const CLUSTER_TYPE: &str = "Microsoft.DocumentDB/mongoClusters";
pub const USER_TYPE: &str = "Microsoft.DocumentDB/mongoClusters/users";
/// At most this many federated identity credentials per managed identity.
pub const MAX_FEDERATED_CREDENTIALS: usize = 20;
/// The Azure region every resource of the double lives in.
pub const LOCATION: &str = "westus2";
/// The longest issuer, subject or audience a federated identity credential may hold.
const MAX_CLAIM_LEN: usize = 600;

/// Checks the token of `Authorization: Bearer <token>`; `Err(reason)` refuses it.
pub type BearerCheck = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// How the double behaves.
#[derive(Clone, Debug)]
pub struct ArmOptions {
    /// How long a federated identity credential write is in flight; a second write under the same
    /// identity in that window gets 409.
    pub write_latency: Duration,
    /// How long a cluster user's create or delete takes (the long-running operation).
    pub provisioning_delay: Duration,
    /// Users per page of a user list (then `nextLink`).
    pub page_size: usize,
}

impl Default for ArmOptions {
    fn default() -> Self {
        Self { write_latency: Duration::from_millis(50), provisioning_delay: Duration::from_millis(300), page_size: 2 }
    }
}

#[derive(Clone, Debug)]
pub struct FederatedCredential {
    pub name: String,
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
    /// When it was created (an update keeps it); the Entra double may model propagation with it.
    pub created_at: Instant,
}

#[derive(Clone, Debug)]
pub struct ManagedIdentity {
    pub resource_id: String,
    pub client_id: String,
    pub principal_id: String,
    pub tenant_id: String,
    /// In creation order.
    pub credentials: Vec<FederatedCredential>,
}

/// The ARM double; stops when dropped.
pub struct ArmDouble {
    server: HttpsServer,
    shared: Arc<Shared>,
}

impl ArmDouble {
    pub async fn start(cert: &CertFiles, bearer: BearerCheck, options: ArmOptions) -> Result<ArmDouble> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                identities: HashMap::new(),
                clusters: HashMap::new(),
                busy: HashSet::new(),
                throttle: None,
                failures: None,
                denied: None,
                concurrent_conflicts: 0,
                operations: HashMap::new(),
                write_latency: options.write_latency,
                provisioning_delay: options.provisioning_delay,
                page_size: options.page_size.max(1),
                lro_retry_after: 1,
            }),
            bearer,
            base: OnceLock::new(),
            requests: AtomicUsize::new(0),
        });
        let for_handler = shared.clone();
        let handler: Handler = Arc::new(move |request| {
            let shared = for_handler.clone();
            Box::pin(async move { shared.handle(request).await })
        });
        let server = HttpsServer::start(cert, handler).await?;
        let _ = shared.base.set(server.url());
        Ok(ArmDouble { server, shared })
    }

    /// `https://127.0.0.1:<port>`, standing for `https://management.azure.com`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Adds (or replaces, keeping its credentials) a user-assigned managed identity, e.g.
    /// `/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id`.
    pub fn add_identity(&self, resource_id: &str, client_id: &str, principal_id: &str, tenant_id: &str) {
        let resource_id = normalize_id(resource_id);
        let mut state = self.shared.lock();
        let credentials = state.identities.remove(&key_of(&resource_id)).map(|i| i.credentials).unwrap_or_default();
        state.identities.insert(
            key_of(&resource_id),
            ManagedIdentity {
                resource_id,
                client_id: client_id.to_string(),
                principal_id: principal_id.to_string(),
                tenant_id: tenant_id.to_string(),
                credentials,
            },
        );
    }

    /// Deletes a managed identity and its federated credentials (as `az identity delete`).
    pub fn remove_identity(&self, resource_id: &str) -> bool {
        self.shared.lock().identities.remove(&key_of(&normalize_id(resource_id))).is_some()
    }

    /// Adds (or replaces the modes of) a DocumentDB cluster, e.g.
    /// `/subscriptions/s/resourceGroups/rg/providers/Microsoft.DocumentDB/mongoClusters/c`, with
    /// `properties.authConfig.allowedModes` such as `["NativeAuth", "MicrosoftEntraID"]`.
    pub fn add_cluster(&self, resource_id: &str, allowed_modes: &[&str]) {
        let resource_id = normalize_id(resource_id);
        let name = last_segment(&resource_id);
        let mut state = self.shared.lock();
        let users = state.clusters.remove(&key_of(&resource_id)).map(|c| c.users).unwrap_or_default();
        state
            .clusters
            .insert(key_of(&resource_id), Cluster { resource_id, name, allowed_modes: allowed_modes.iter().map(|m| m.to_string()).collect(), users });
    }

    pub fn identity_by_client_id(&self, client_id: &str) -> Option<ManagedIdentity> {
        self.shared.lock().identities.values().find(|i| i.client_id.eq_ignore_ascii_case(client_id)).cloned()
    }

    pub fn identity(&self, resource_id: &str) -> Option<ManagedIdentity> {
        self.shared.lock().identities.get(&key_of(&normalize_id(resource_id))).cloned()
    }

    /// Whether the principal is a provisioned user of the cluster: its create finished and no
    /// delete has started. A re-PUT of a provisioned user keeps it usable while it updates.
    pub fn is_cluster_user(&self, cluster_resource_id: &str, principal_id: &str) -> bool {
        let now = Instant::now();
        let mut state = self.shared.lock();
        let Some(cluster) = state.clusters.get_mut(&key_of(&normalize_id(cluster_resource_id))) else { return false };
        cluster.purge(now);
        cluster.users.get(&principal_id.to_ascii_lowercase()).is_some_and(|u| u.deleting_at.is_none() && now >= u.usable_at)
    }

    /// The `(db, role)` pairs of a cluster user, when it exists.
    pub fn cluster_user_roles(&self, cluster_resource_id: &str, principal_id: &str) -> Option<Vec<(String, String)>> {
        let state = self.shared.lock();
        let user = state.clusters.get(&key_of(&normalize_id(cluster_resource_id)))?.users.get(&principal_id.to_ascii_lowercase())?;
        let roles = user.roles.as_array()?.iter().filter_map(|r| Some((r["db"].as_str()?.to_string(), r["role"].as_str()?.to_string())));
        Some(roles.collect())
    }

    /// The names of the cluster's users in any provisioning state (creating, succeeded or being
    /// deleted), sorted case-insensitively.
    pub fn cluster_users(&self, cluster_resource_id: &str) -> Vec<String> {
        let now = Instant::now();
        let mut state = self.shared.lock();
        let Some(cluster) = state.clusters.get_mut(&key_of(&normalize_id(cluster_resource_id))) else { return Vec::new() };
        cluster.purge(now);
        cluster.users.values().map(|u| u.name.clone()).collect()
    }

    /// The next `count` writes (PUT/DELETE of either kind) get 429 `TooManyRequests` with
    /// `Retry-After: <retry_after_secs>`.
    pub fn throttle_next_writes(&self, count: usize, retry_after_secs: u64) {
        self.shared.lock().throttle = (count > 0).then_some(Throttle { remaining: count, retry_after: retry_after_secs });
    }

    /// Changes [`ArmOptions::write_latency`] for later writes.
    pub fn set_write_latency(&self, latency: Duration) {
        self.shared.lock().write_latency = latency;
    }

    /// Changes [`ArmOptions::provisioning_delay`] for later user operations.
    pub fn set_provisioning_delay(&self, delay: Duration) {
        self.shared.lock().provisioning_delay = delay;
    }

    /// The `Retry-After` seconds of long-running user operations (default 1).
    pub fn set_lro_retry_after(&self, secs: u64) {
        self.shared.lock().lro_retry_after = secs;
    }

    /// All requests received, including refused ones.
    pub fn request_count(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// The next `count` writes get `status` (a 5xx: `InternalServerError`; 409: a conflict, as
    /// when someone else writes the same resource).
    pub fn fail_next_writes(&self, count: usize, status: u16) {
        self.shared.lock().failures = (count > 0).then_some(Failures { remaining: count, status });
    }

    /// Writes by this principal (the `oid` of its token) get 403 `AuthorizationFailed`, as for
    /// an identity without a role on the resource; `None` lifts it.
    pub fn deny_writes_by(&self, principal_id: Option<&str>) {
        self.shared.lock().denied = principal_id.map(str::to_ascii_lowercase);
    }

    /// Makes an identity's credentials look `by` older, as if created before a test began (the
    /// Entra double's propagation delay then no longer applies to them).
    pub fn backdate_credentials(&self, resource_id: &str, by: Duration) {
        if let Some(identity) = self.shared.lock().identities.get_mut(&key_of(&normalize_id(resource_id))) {
            for credential in &mut identity.credentials {
                credential.created_at = credential.created_at.checked_sub(by).unwrap_or(credential.created_at);
            }
        }
    }

    /// 409s answered because two credential writes under one identity overlapped.
    pub fn concurrent_write_conflicts(&self) -> usize {
        self.shared.lock().concurrent_conflicts
    }

    /// Credential writes in flight now.
    pub fn writes_in_flight(&self) -> usize {
        self.shared.lock().busy.len()
    }

    /// Every identity's credentials, by identity name.
    pub fn all_credentials(&self) -> Vec<(String, FederatedCredential)> {
        let state = self.shared.lock();
        state.identities.values().flat_map(|i| i.credentials.iter().map(|c| (last_segment(&i.resource_id), c.clone()))).collect()
    }
}

struct Shared {
    state: Mutex<State>,
    bearer: BearerCheck,
    base: OnceLock<String>,
    requests: AtomicUsize,
}

struct State {
    /// By lower-cased resource id.
    identities: HashMap<String, ManagedIdentity>,
    /// By lower-cased resource id.
    clusters: HashMap<String, Cluster>,
    /// Identities (lower-cased ids) with a credential write in flight.
    busy: HashSet<String>,
    throttle: Option<Throttle>,
    failures: Option<Failures>,
    /// A principal (lower-cased object id) whose writes are refused with 403.
    denied: Option<String>,
    concurrent_conflicts: usize,
    operations: HashMap<String, Operation>,
    write_latency: Duration,
    provisioning_delay: Duration,
    page_size: usize,
    lro_retry_after: u64,
}

struct Throttle {
    remaining: usize,
    retry_after: u64,
}

struct Failures {
    remaining: usize,
    status: u16,
}

struct Cluster {
    resource_id: String,
    name: String,
    allowed_modes: Vec<String>,
    /// By lower-cased user name.
    users: BTreeMap<String, User>,
}

impl Cluster {
    /// Drops users whose delete finished.
    fn purge(&mut self, now: Instant) {
        self.users.retain(|_, u| u.deleting_at.is_none_or(|at| now < at));
    }
}

struct User {
    name: String,
    principal_type: String,
    roles: Value,
    /// When the latest create/update finishes.
    ready_at: Instant,
    /// When the first create finished (the user can sign in from then on).
    usable_at: Instant,
    deleting_at: Option<Instant>,
}

impl User {
    fn provisioning_state(&self, now: Instant) -> &'static str {
        if self.deleting_at.is_some() {
            "Deleting"
        } else if now >= self.ready_at {
            "Succeeded"
        } else {
            "InProgress"
        }
    }

    fn to_json(&self, cluster_id: &str, now: Instant) -> Value {
        json!({
            "id": format!("{cluster_id}/users/{}", self.name),
            "name": self.name,
            "type": USER_TYPE,
            "properties": {
                "identityProvider": {"type": "MicrosoftEntraID", "properties": {"principalType": self.principal_type}},
                "roles": self.roles,
                "provisioningState": self.provisioning_state(now),
            }
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OperationKind {
    CreateUser,
    DeleteUser,
}

struct Operation {
    kind: OperationKind,
    /// The lower-cased cluster id and user name it works on.
    cluster_key: String,
    user_key: String,
    subscription: String,
    started: Instant,
    done_at: Instant,
}

/// A parsed request path.
enum Route {
    Identity { id: String },
    Credentials { id: String },
    Credential { id: String, name: String },
    Cluster { id: String },
    Users { id: String },
    User { id: String, name: String },
    AsyncOperation { id: String },
    OperationResult { id: String },
}

impl Route {
    fn parse(path: &str) -> Option<(Route, String)> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let is = |i: usize, word: &str| segments.get(i).is_some_and(|s| s.eq_ignore_ascii_case(word));
        let id_of = |n: usize| format!("/{}", segments[..n].join("/"));
        let subscription = segments.get(1).map(|s| s.to_string()).unwrap_or_default();
        if !is(0, "subscriptions") || subscription.is_empty() {
            return None;
        }
        // /subscriptions/{sub}/providers/Microsoft.DocumentDB/locations/{loc}/{kind}/{id}
        if is(2, "providers") && is(3, "Microsoft.DocumentDB") && is(4, "locations") && segments.len() == 8 {
            let id = segments[7].to_string();
            if is(6, "mongoClusterAzureAsyncOperation") {
                return Some((Route::AsyncOperation { id }, subscription));
            }
            if is(6, "mongoClusterOperationResults") {
                return Some((Route::OperationResult { id }, subscription));
            }
            return None;
        }
        if !(is(2, "resourceGroups") && is(4, "providers") && segments.len() >= 8 && segments.iter().skip(1).take(7).all(|s| !s.is_empty())) {
            return None;
        }
        let route = if is(5, "Microsoft.ManagedIdentity") && is(6, "userAssignedIdentities") {
            let id = id_of(8);
            match segments.len() {
                8 => Route::Identity { id },
                9 if is(8, "federatedIdentityCredentials") => Route::Credentials { id },
                10 if is(8, "federatedIdentityCredentials") => Route::Credential { id, name: segments[9].to_string() },
                _ => return None,
            }
        } else if is(5, "Microsoft.DocumentDB") && is(6, "mongoClusters") {
            let id = id_of(8);
            match segments.len() {
                8 => Route::Cluster { id },
                9 if is(8, "users") => Route::Users { id },
                10 if is(8, "users") => Route::User { id, name: segments[9].to_string() },
                _ => return None,
            }
        } else {
            return None;
        };
        Some((route, subscription))
    }

    /// The api-version this route is served at and the resource type named in errors.
    fn api(&self) -> (&'static str, &'static str) {
        match self {
            Route::Identity { .. } => (FIC_API_VERSION, "userAssignedIdentities"),
            Route::Credentials { .. } | Route::Credential { .. } => (FIC_API_VERSION, "userAssignedIdentities/federatedIdentityCredentials"),
            Route::Cluster { .. } => (MONGO_API_VERSION, "mongoClusters"),
            Route::Users { .. } | Route::User { .. } => (MONGO_API_VERSION, "mongoClusters/users"),
            Route::AsyncOperation { .. } => (MONGO_API_VERSION, "locations/mongoClusterAzureAsyncOperation"),
            Route::OperationResult { .. } => (MONGO_API_VERSION, "locations/mongoClusterOperationResults"),
        }
    }
}

/// Clears an identity's "write in flight" flag when the write ends (or its request is dropped).
struct BusyGuard<'a> {
    shared: &'a Shared,
    key: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().busy.remove(&self.key);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn handle(&self, request: HttpRequest) -> HttpResponse {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let response = self.dispatch(&request).await;
        response
            .with_header("x-ms-request-id", new_id())
            .with_header("x-ms-correlation-request-id", new_id())
            .with_header("cache-control", "no-cache")
    }

    /// `https://<host the caller used>`, for `nextLink` and operation URLs.
    fn base(&self, request: &HttpRequest) -> String {
        match request.header("host") {
            Some(host) if !host.is_empty() => format!("https://{host}"),
            _ => self.base.get().cloned().unwrap_or_default(),
        }
    }

    async fn dispatch(&self, request: &HttpRequest) -> HttpResponse {
        if let Err(refused) = self.authenticate(request) {
            return refused;
        }
        let Some((route, subscription)) = Route::parse(&request.path) else {
            return arm_error(
                404,
                "InvalidResourceType",
                format!(
                    "The resource type of '{}' could not be found: this ARM double serves only Microsoft.ManagedIdentity/userAssignedIdentities[/federatedIdentityCredentials] and Microsoft.DocumentDB/mongoClusters[/users].",
                    request.path
                ),
            );
        };
        let (api_version, resource_type) = route.api();
        if let Err(refused) = check_api_version(request, api_version, resource_type) {
            return refused;
        }
        let method = request.method.to_ascii_uppercase();
        let writes = matches!(route, Route::Credential { .. } | Route::User { .. }) && matches!(method.as_str(), "PUT" | "DELETE");
        if writes && let Some(refused) = self.take_throttle(&request.path) {
            return refused;
        }
        if writes && let Some(refused) = self.take_failure(&request.path) {
            return refused;
        }
        if writes && let Some(refused) = self.authorize(request, &method) {
            return refused;
        }
        let base = self.base(request);
        match (route, method.as_str()) {
            (Route::Identity { id }, "GET") => self.get_identity(&id),
            (Route::Credentials { id }, "GET") => self.list_credentials(&id),
            (Route::Credential { id, name }, "GET") => self.get_credential(&id, &name),
            (Route::Credential { id, name }, "PUT") => self.put_credential(&id, &name, request).await,
            (Route::Credential { id, name }, "DELETE") => self.delete_credential(&id, &name).await,
            (Route::Cluster { id }, "GET") => self.get_cluster(&id),
            (Route::Users { id }, "GET") => self.list_users(&id, request, &base),
            (Route::User { id, name }, "GET") => self.get_user(&id, &name),
            (Route::User { id, name }, "PUT") => self.put_user(&id, &name, &subscription, request, &base),
            (Route::User { id, name }, "DELETE") => self.delete_user(&id, &name, &subscription, &base),
            (Route::AsyncOperation { id }, "GET") => self.get_async_operation(&id, request),
            (Route::OperationResult { id }, "GET") => self.get_operation_result(&id, request),
            (_, method) => {
                arm_error(405, "MethodNotAllowed", format!("The requested resource '{}' does not support http method '{method}'.", request.path))
            }
        }
    }

    fn authenticate(&self, request: &HttpRequest) -> Result<(), HttpResponse> {
        let challenge = |description: &str| {
            format!("Bearer authorization_uri=\"https://login.microsoftonline.com/\", error=\"invalid_token\", error_description=\"{description}\"")
        };
        let Some(header) = request.header("authorization") else {
            return Err(arm_error(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.")
                .with_header("www-authenticate", challenge("The authentication failed because of missing 'Authorization' header.")));
        };
        let token = match header.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => token.trim(),
            _ => {
                return Err(arm_error(
                    401,
                    "AuthenticationFailed",
                    "Authentication failed. The 'Authorization' header is provided in an invalid format: expected 'Bearer <access token>'.",
                )
                .with_header("www-authenticate", challenge("The authentication failed because of an invalid 'Authorization' header.")));
            }
        };
        (self.bearer)(token).map_err(|reason| {
            arm_error(401, "InvalidAuthenticationToken", format!("The access token is invalid: {reason}"))
                .with_header("www-authenticate", challenge("The access token is invalid."))
        })
    }

    fn take_failure(&self, path: &str) -> Option<HttpResponse> {
        let mut state = self.lock();
        let failures = state.failures.as_mut()?;
        failures.remaining -= 1;
        let status = failures.status;
        if failures.remaining == 0 {
            state.failures = None;
        }
        Some(match status {
            409 => arm_error(409, "Conflict", format!("The request for '{path}' conflicts with another operation in progress on the resource.")),
            _ => arm_error(status, "InternalServerError", "Encountered internal server error. Diagnostic information: timestamp '20261201T000000Z'."),
        })
    }

    /// Role-based access: a denied principal may read but not write.
    fn authorize(&self, request: &HttpRequest, method: &str) -> Option<HttpResponse> {
        let denied = self.lock().denied.clone()?;
        let token = request.header("authorization")?.split_once(' ')?.1.trim().to_string();
        let oid = crate::jwt::decode(&token).ok()?.claims["oid"].as_str()?.to_ascii_lowercase();
        (oid == denied).then(|| {
            let action = if request.path.to_ascii_lowercase().contains("/federatedidentitycredentials/") {
                "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials"
            } else {
                "Microsoft.DocumentDB/mongoClusters/users"
            };
            let verb = if method == "DELETE" { "delete" } else { "write" };
            arm_error(
                403,
                "AuthorizationFailed",
                format!(
                    "The client '{oid}' with object id '{oid}' does not have authorization to perform action '{action}/{verb}' over scope '{}' or the scope is invalid. If access was recently granted, please refresh your credentials.",
                    request.path
                ),
            )
        })
    }

    fn take_throttle(&self, path: &str) -> Option<HttpResponse> {
        let mut state = self.lock();
        let throttle = state.throttle.as_mut()?;
        throttle.remaining -= 1;
        let retry_after = throttle.retry_after;
        if throttle.remaining == 0 {
            state.throttle = None;
        }
        Some(
            arm_error(
                429,
                "TooManyRequests",
                format!("The request is being throttled: too many write requests for '{path}'. Please try again after {retry_after} seconds."),
            )
            .with_header("retry-after", retry_after.to_string())
            .with_header("x-ms-ratelimit-remaining-subscription-writes", "0"),
        )
    }

    // ---- managed identities and their federated identity credentials ----

    fn identity_not_found(id: &str) -> HttpResponse {
        resource_not_found(IDENTITY_TYPE, id)
    }

    fn get_identity(&self, id: &str) -> HttpResponse {
        let key = &key_of(id);
        let state = self.lock();
        let Some(identity) = state.identities.get(key) else { return Self::identity_not_found(id) };
        HttpResponse::json(
            200,
            &json!({
                "id": identity.resource_id,
                "name": last_segment(&identity.resource_id),
                "type": IDENTITY_TYPE,
                "location": LOCATION,
                "properties": {"tenantId": identity.tenant_id, "principalId": identity.principal_id, "clientId": identity.client_id},
            }),
        )
    }

    fn list_credentials(&self, id: &str) -> HttpResponse {
        let key = &key_of(id);
        let state = self.lock();
        let Some(identity) = state.identities.get(key) else { return Self::identity_not_found(id) };
        let value: Vec<Value> = identity.credentials.iter().map(|c| credential_json(&identity.resource_id, c)).collect();
        HttpResponse::json(200, &json!({ "value": value }))
    }

    fn get_credential(&self, id: &str, name: &str) -> HttpResponse {
        let key = &key_of(id);
        let state = self.lock();
        let Some(identity) = state.identities.get(key) else { return Self::identity_not_found(id) };
        match identity.credentials.iter().find(|c| c.name.eq_ignore_ascii_case(name)) {
            Some(credential) => HttpResponse::json(200, &credential_json(&identity.resource_id, credential)),
            None => credential_not_found(&identity.resource_id, name),
        }
    }

    /// Marks the identity as having a write in flight, or answers 409 when one already is.
    fn begin_write(&self, id: &str) -> Result<BusyGuard<'_>, HttpResponse> {
        let key = &key_of(id);
        let mut state = self.lock();
        let Some(identity) = state.identities.get(key) else { return Err(Self::identity_not_found(id)) };
        let resource_id = identity.resource_id.clone();
        if !state.busy.insert(key.to_string()) {
            state.concurrent_conflicts += 1;
            return Err(arm_error(
                409,
                "ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity",
                format!(
                    "Too many Federated Identity Credentials are written concurrently for the managed identity '{resource_id}'. Concurrent Federated Identity Credentials writes under the same managed identity are not supported."
                ),
            ));
        }
        Ok(BusyGuard { shared: self, key: key.to_string() })
    }

    fn write_latency(&self) -> Duration {
        self.lock().write_latency
    }

    async fn put_credential(&self, id: &str, name: &str, request: &HttpRequest) -> HttpResponse {
        let key = &key_of(id);
        if !self.lock().identities.contains_key(key) {
            return Self::identity_not_found(id);
        }
        if let Err(message) = check_credential_name(name) {
            return arm_error(400, "BadRequest", message);
        }
        let (issuer, subject, audiences) = match parse_credential_body(&request.body) {
            Ok(parsed) => parsed,
            Err(refused) => return refused,
        };
        let _busy = match self.begin_write(id) {
            Ok(guard) => guard,
            Err(refused) => return refused,
        };
        // Applied first, answered after the latency: a caller that dies in between (or times
        // out) has written without knowing it, as with real ARM.
        let answer = self.apply_credential(key, id, name, issuer, subject, audiences);
        tokio::time::sleep(self.write_latency()).await;
        answer
    }

    fn apply_credential(&self, key: &str, id: &str, name: &str, issuer: String, subject: String, audiences: Vec<String>) -> HttpResponse {
        let mut state = self.lock();
        let Some(identity) = state.identities.get_mut(key) else { return Self::identity_not_found(id) };
        if let Some(other) = identity.credentials.iter().find(|c| !c.name.eq_ignore_ascii_case(name) && c.issuer == issuer && c.subject == subject) {
            return arm_error(
                400,
                "BadRequest",
                format!(
                    "Issuer and subject combination already exists for this Managed Identity. Federated identity credential '{}' already has issuer '{issuer}' and subject '{subject}'.",
                    other.name
                ),
            );
        }
        let (status, credential) = match identity.credentials.iter_mut().find(|c| c.name.eq_ignore_ascii_case(name)) {
            Some(existing) => {
                existing.issuer = issuer;
                existing.subject = subject;
                existing.audiences = audiences;
                (200, existing.clone())
            }
            None => {
                if identity.credentials.len() >= MAX_FEDERATED_CREDENTIALS {
                    return arm_error(
                        400,
                        "BadRequest",
                        format!(
                            "The managed identity '{}' already has {} federated identity credentials, the maximum allowed is {MAX_FEDERATED_CREDENTIALS}: cannot create '{name}'.",
                            identity.resource_id,
                            identity.credentials.len()
                        ),
                    );
                }
                let credential = FederatedCredential { name: name.to_string(), issuer, subject, audiences, created_at: Instant::now() };
                identity.credentials.push(credential.clone());
                (201, credential)
            }
        };
        HttpResponse::json(status, &credential_json(&identity.resource_id, &credential))
    }

    async fn delete_credential(&self, id: &str, name: &str) -> HttpResponse {
        let key = &key_of(id);
        let _busy = match self.begin_write(id) {
            Ok(guard) => guard,
            Err(refused) => return refused,
        };
        tokio::time::sleep(self.write_latency()).await;
        let mut state = self.lock();
        let Some(identity) = state.identities.get_mut(key) else { return Self::identity_not_found(id) };
        let before = identity.credentials.len();
        identity.credentials.retain(|c| !c.name.eq_ignore_ascii_case(name));
        HttpResponse::empty(if identity.credentials.len() < before { 200 } else { 204 })
    }

    // ---- DocumentDB clusters and their users ----

    fn cluster_not_found(id: &str) -> HttpResponse {
        resource_not_found(CLUSTER_TYPE, id)
    }

    fn get_cluster(&self, id: &str) -> HttpResponse {
        let key = &key_of(id);
        let state = self.lock();
        let Some(cluster) = state.clusters.get(key) else { return Self::cluster_not_found(id) };
        HttpResponse::json(
            200,
            &json!({
                "id": cluster.resource_id,
                "name": cluster.name,
                "type": CLUSTER_TYPE,
                "location": LOCATION,
                "properties": {
                    "provisioningState": "Succeeded",
                    "clusterStatus": "Ready",
                    "authConfig": {"allowedModes": cluster.allowed_modes},
                },
            }),
        )
    }

    fn list_users(&self, id: &str, request: &HttpRequest, base: &str) -> HttpResponse {
        let key = &key_of(id);
        let now = Instant::now();
        let mut state = self.lock();
        let page_size = state.page_size;
        let Some(cluster) = state.clusters.get_mut(key) else { return Self::cluster_not_found(id) };
        cluster.purge(now);
        let skip = match request.query.get("$skipToken").map(|t| t.parse::<usize>()) {
            None => 0,
            Some(Ok(skip)) => skip,
            Some(Err(_)) => return arm_error(400, "BadRequest", "The $skipToken of this user list is not one the service handed out in a nextLink."),
        };
        let value: Vec<Value> = cluster.users.values().skip(skip).take(page_size).map(|u| u.to_json(&cluster.resource_id, now)).collect();
        let mut body = json!({ "value": value });
        if skip + page_size < cluster.users.len() {
            body["nextLink"] =
                Value::String(format!("{base}{}/users?api-version={MONGO_API_VERSION}&$skipToken={}", cluster.resource_id, skip + page_size));
        }
        HttpResponse::json(200, &body)
    }

    fn get_user(&self, id: &str, name: &str) -> HttpResponse {
        let key = &key_of(id);
        let now = Instant::now();
        let mut state = self.lock();
        let Some(cluster) = state.clusters.get_mut(key) else { return Self::cluster_not_found(id) };
        cluster.purge(now);
        match cluster.users.get(&name.to_ascii_lowercase()) {
            Some(user) => HttpResponse::json(200, &user.to_json(&cluster.resource_id, now)),
            None => user_not_found(cluster, name),
        }
    }

    fn put_user(&self, id: &str, name: &str, subscription: &str, request: &HttpRequest, base: &str) -> HttpResponse {
        let key = &key_of(id);
        let now = Instant::now();
        let mut state = self.lock();
        let delay = state.provisioning_delay;
        let retry_after = state.lro_retry_after;
        let Some(cluster) = state.clusters.get_mut(key) else { return Self::cluster_not_found(id) };
        cluster.purge(now);
        if let Err(message) = check_user_name(name) {
            return arm_error(400, "BadRequest", message);
        }
        if !cluster.allowed_modes.iter().any(|m| m == "MicrosoftEntraID") {
            return arm_error(
                400,
                "BadRequest",
                format!(
                    "Microsoft Entra ID authentication is not enabled on mongo cluster '{}': properties.authConfig.allowedModes is {:?}. Add 'MicrosoftEntraID' to allowedModes before adding Entra users.",
                    cluster.name, cluster.allowed_modes
                ),
            );
        }
        let (principal_type, roles) = match parse_user_body(&request.body) {
            Ok(parsed) => parsed,
            Err(refused) => return refused,
        };
        let user_key = name.to_ascii_lowercase();
        let status = match cluster.users.get_mut(&user_key) {
            Some(user) if user.deleting_at.is_some() => {
                return arm_error(
                    409,
                    "Conflict",
                    format!(
                        "The user '{}' of mongo cluster '{}' is being deleted; retry once the delete operation has finished.",
                        user.name, cluster.name
                    ),
                );
            }
            Some(user) => {
                user.principal_type = principal_type;
                user.roles = roles;
                user.ready_at = now + delay;
                200
            }
            None => {
                let user = User { name: name.to_string(), principal_type, roles, ready_at: now + delay, usable_at: now + delay, deleting_at: None };
                cluster.users.insert(user_key.clone(), user);
                201
            }
        };
        let body = cluster.users[&user_key].to_json(&cluster.resource_id, now);
        let operation = Operation {
            kind: OperationKind::CreateUser,
            cluster_key: key.to_string(),
            user_key,
            subscription: subscription.to_string(),
            started: now,
            done_at: now + delay,
        };
        let id = new_id();
        let async_url = async_operation_url(base, &operation.subscription, &id);
        state.operations.insert(id, operation);
        HttpResponse::json(status, &body).with_header("retry-after", retry_after.to_string()).with_header("azure-asyncoperation", async_url)
    }

    fn delete_user(&self, id: &str, name: &str, subscription: &str, base: &str) -> HttpResponse {
        let key = &key_of(id);
        let now = Instant::now();
        let mut state = self.lock();
        let delay = state.provisioning_delay;
        let retry_after = state.lro_retry_after;
        let Some(cluster) = state.clusters.get_mut(key) else { return Self::cluster_not_found(id) };
        cluster.purge(now);
        let user_key = name.to_ascii_lowercase();
        let Some(user) = cluster.users.get_mut(&user_key) else { return HttpResponse::empty(204) };
        let done_at = *user.deleting_at.get_or_insert(now + delay);
        let operation = Operation {
            kind: OperationKind::DeleteUser,
            cluster_key: key.to_string(),
            user_key,
            subscription: subscription.to_string(),
            started: now,
            done_at,
        };
        let id = new_id();
        let async_url = async_operation_url(base, subscription, &id);
        let location = operation_result_url(base, subscription, &id);
        state.operations.insert(id, operation);
        HttpResponse::empty(202)
            .with_header("retry-after", retry_after.to_string())
            .with_header("location", location)
            .with_header("azure-asyncoperation", async_url)
    }

    fn operation_not_found(id: &str) -> HttpResponse {
        arm_error(404, "ResourceNotFound", format!("The operation '{id}' was not found: it was never started by this service."))
    }

    /// `Azure-AsyncOperation`: `{"status":"InProgress"}` until the operation is done, then `Succeeded`.
    fn get_async_operation(&self, id: &str, request: &HttpRequest) -> HttpResponse {
        let now = Instant::now();
        let state = self.lock();
        let Some(operation) = state.operations.get(id) else { return Self::operation_not_found(id) };
        let done = now >= operation.done_at;
        let mut body = json!({
            "id": request.path,
            "name": id,
            "status": if done { "Succeeded" } else { "InProgress" },
            "percentComplete": if done { 100.0 } else { 0.0 },
            "elapsedMilliseconds": now.saturating_duration_since(operation.started).as_millis() as u64,
        });
        if let Some(cluster) = state.clusters.get(&operation.cluster_key) {
            body["resourceId"] = Value::String(format!("{}/users/{}", cluster.resource_id, operation.user_key));
        }
        let response = HttpResponse::json(200, &body);
        if done { response } else { response.with_header("retry-after", state.lro_retry_after.to_string()) }
    }

    /// `Location`: 202 until the operation is done, then 204 (delete) or 200 with the user (create).
    fn get_operation_result(&self, id: &str, request: &HttpRequest) -> HttpResponse {
        let now = Instant::now();
        let mut state = self.lock();
        let retry_after = state.lro_retry_after;
        let Some(operation) = state.operations.get(id) else { return Self::operation_not_found(id) };
        if now < operation.done_at {
            let base = self.base(request);
            let location = operation_result_url(&base, &operation.subscription, id);
            return HttpResponse::empty(202).with_header("retry-after", retry_after.to_string()).with_header("location", location);
        }
        let (kind, cluster_key, user_key) = (operation.kind, operation.cluster_key.clone(), operation.user_key.clone());
        if kind == OperationKind::CreateUser
            && let Some(cluster) = state.clusters.get_mut(&cluster_key)
        {
            cluster.purge(now);
            if let Some(user) = cluster.users.get(&user_key) {
                return HttpResponse::json(200, &user.to_json(&cluster.resource_id, now));
            }
        }
        HttpResponse::empty(204)
    }
}

fn credential_json(identity_id: &str, credential: &FederatedCredential) -> Value {
    json!({
        "id": format!("{identity_id}/federatedIdentityCredentials/{}", credential.name),
        "name": credential.name,
        "type": FIC_TYPE,
        "properties": {"issuer": credential.issuer, "subject": credential.subject, "audiences": credential.audiences},
    })
}

fn credential_not_found(identity_id: &str, name: &str) -> HttpResponse {
    arm_error(
        404,
        "ResourceNotFound",
        format!("The federated identity credential '{name}' was not found under the managed identity '{identity_id}'."),
    )
}

fn user_not_found(cluster: &Cluster, name: &str) -> HttpResponse {
    arm_error(404, "ResourceNotFound", format!("The user '{name}' was not found in mongo cluster '{}'.", cluster.resource_id))
}

/// `^[a-zA-Z0-9][a-zA-Z0-9-_]{2,119}$`
fn check_credential_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if first_ok && rest_ok && (3..=120).contains(&name.len()) {
        Ok(())
    } else {
        Err(format!(
            "The federated identity credential name '{name}' is invalid: it must be 3 to 120 characters, start with a letter or digit and hold only letters, digits, '-' and '_' (pattern ^[a-zA-Z0-9][a-zA-Z0-9-_]{{2,119}}$)."
        ))
    }
}

/// `^[a-zA-Z0-9-]*`, 1–63 characters.
fn check_user_name(name: &str) -> Result<(), String> {
    if (1..=63).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        Ok(())
    } else {
        Err(format!(
            "The user name '{name}' is invalid: it must be the principal's object id, 1 to 63 characters of letters, digits and '-' (pattern ^[a-zA-Z0-9-]*)."
        ))
    }
}

fn parse_json(body: &[u8]) -> Result<Value, HttpResponse> {
    serde_json::from_slice(body)
        .map_err(|err| arm_error(400, "InvalidRequestContent", format!("The request content was invalid and could not be deserialized: '{err}'.")))
}

/// `{"properties":{"issuer","subject","audiences":[one]}}` → (issuer, subject, audiences).
fn parse_credential_body(body: &[u8]) -> Result<(String, String, Vec<String>), HttpResponse> {
    let bad = |message: String| arm_error(400, "BadRequest", message);
    let value = parse_json(body)?;
    let Some(properties) = value.get("properties").filter(|p| p.is_object()) else {
        return Err(bad("The request body has no 'properties' object: expected {\"properties\":{\"issuer\",\"subject\",\"audiences\"}}.".into()));
    };
    let text = |field: &str| -> Result<String, HttpResponse> {
        let Some(value) = properties.get(field).and_then(Value::as_str).filter(|v| !v.is_empty()) else {
            return Err(bad(format!("The federated identity credential property '{field}' is required and must be a non-empty string.")));
        };
        check_claim(field, value).map_err(bad)?;
        Ok(value.to_string())
    };
    let issuer = text("issuer")?;
    let subject = text("subject")?;
    match url::Url::parse(&issuer) {
        Ok(url) if url.scheme() == "https" && url.host_str().is_some() => {}
        _ => return Err(bad(format!("The issuer '{issuer}' is not a valid https URL."))),
    }
    let Some(audiences) = properties.get("audiences").and_then(Value::as_array) else {
        return Err(bad(
            "The federated identity credential property 'audiences' is required and must be an array holding exactly one audience.".into()
        ));
    };
    if audiences.len() != 1 {
        return Err(bad(format!("The federated identity credential must have exactly one audience, but {} were given.", audiences.len())));
    }
    let Some(audience) = audiences[0].as_str().filter(|a| !a.is_empty()) else {
        return Err(bad("The audience of a federated identity credential must be a non-empty string.".into()));
    };
    check_claim("audiences", audience).map_err(bad)?;
    Ok((issuer, subject, vec![audience.to_string()]))
}

fn check_claim(field: &str, value: &str) -> Result<(), String> {
    let length = value.chars().count();
    if length > MAX_CLAIM_LEN {
        return Err(format!(
            "The federated identity credential property '{field}' is {length} characters long; at most {MAX_CLAIM_LEN} are allowed."
        ));
    }
    if value.contains('*') {
        return Err(format!(
            "The federated identity credential property '{field}' ('{value}') contains a wildcard ('*'); wildcards are not supported."
        ));
    }
    Ok(())
}

/// The PUT body of a cluster user → (principalType, roles).
fn parse_user_body(body: &[u8]) -> Result<(String, Value), HttpResponse> {
    let bad = |message: String| arm_error(400, "BadRequest", message);
    let value = parse_json(body)?;
    let Some(properties) = value.get("properties").filter(|p| p.is_object()) else {
        return Err(bad("The request body has no 'properties' object: expected {\"properties\":{\"identityProvider\",\"roles\"}}.".into()));
    };
    let provider = properties.get("identityProvider");
    match provider.and_then(|p| p.get("type")).and_then(Value::as_str) {
        Some("MicrosoftEntraID") => {}
        Some(other) => {
            return Err(bad(format!("The identity provider type '{other}' is not supported for mongo cluster users: only 'MicrosoftEntraID' is.")));
        }
        None => return Err(bad("properties.identityProvider.type is required and must be 'MicrosoftEntraID'.".into())),
    }
    let principal_type = provider.and_then(|p| p.get("properties")).and_then(|p| p.get("principalType")).and_then(Value::as_str);
    match principal_type {
        Some("servicePrincipal") => {}
        Some(kind) if kind.eq_ignore_ascii_case("group") => {
            return Err(bad(
                "Microsoft Entra ID groups are not supported as mongo cluster users: register each service principal (principalType 'servicePrincipal') instead.".into(),
            ));
        }
        Some(other) => {
            return Err(bad(format!(
                "The principal type '{other}' is not supported here: workload identities are registered with principalType 'servicePrincipal'."
            )));
        }
        None => return Err(bad("properties.identityProvider.properties.principalType is required ('servicePrincipal').".into())),
    }
    let roles = properties.get("roles").cloned().unwrap_or(Value::Null);
    let valid = roles.as_array().is_some_and(|roles| {
        !roles.is_empty()
            && roles.iter().all(|r| r.get("db").and_then(Value::as_str) == Some("admin") && r.get("role").and_then(Value::as_str) == Some("root"))
    });
    if !valid {
        return Err(bad(format!(
            "properties.roles must be a non-empty array of {{\"db\":\"admin\",\"role\":\"root\"}} (the only role mongo cluster users can have), got {roles}."
        )));
    }
    Ok(("servicePrincipal".to_string(), roles))
}

fn check_api_version(request: &HttpRequest, expected: &str, resource_type: &str) -> Result<(), HttpResponse> {
    match request.query.get("api-version") {
        None => Err(arm_error(400, "MissingApiVersionParameter", "The api-version query parameter (?api-version=) is required for all requests.")),
        Some(version) if version == expected => Ok(()),
        Some(version) if !looks_like_api_version(version) => Err(arm_error(
            400,
            "InvalidApiVersionParameter",
            format!("The api-version '{version}' is invalid. The supported versions are '{expected}'."),
        )),
        Some(version) => {
            let namespace = if expected == FIC_API_VERSION { "Microsoft.ManagedIdentity" } else { "Microsoft.DocumentDB" };
            Err(arm_error(
                400,
                "NoRegisteredProviderFound",
                format!(
                    "No registered resource provider found for location '{LOCATION}' and API version '{version}' for type '{resource_type}' of namespace '{namespace}'. The supported api-versions are '{expected}'. The supported locations are '{LOCATION}'."
                ),
            ))
        }
    }
}

/// `YYYY-MM-DD`, optionally followed by `-preview` or similar.
fn looks_like_api_version(version: &str) -> bool {
    let bytes = version.as_bytes();
    bytes.len() >= 10
        && bytes[..10].iter().enumerate().all(|(i, b)| if i == 4 || i == 7 { *b == b'-' } else { b.is_ascii_digit() })
        && (bytes.len() == 10 || (bytes[10] == b'-' && bytes.len() > 11))
}

/// ARM's 404 for a missing top-level resource of `kind`.
fn resource_not_found(kind: &str, id: &str) -> HttpResponse {
    let (rg, name) = rg_and_name(id);
    arm_error(
        404,
        "ResourceNotFound",
        format!(
            "The Resource '{kind}/{name}' under resource group '{rg}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix"
        ),
    )
}

fn arm_error(status: u16, code: &str, message: impl Into<String>) -> HttpResponse {
    HttpResponse::json(status, &json!({"error": {"code": code, "message": message.into()}}))
}

fn async_operation_url(base: &str, subscription: &str, id: &str) -> String {
    format!(
        "{base}/subscriptions/{subscription}/providers/Microsoft.DocumentDB/locations/{LOCATION}/mongoClusterAzureAsyncOperation/{id}?api-version={MONGO_API_VERSION}"
    )
}

fn operation_result_url(base: &str, subscription: &str, id: &str) -> String {
    format!(
        "{base}/subscriptions/{subscription}/providers/Microsoft.DocumentDB/locations/{LOCATION}/mongoClusterOperationResults/{id}?api-version={MONGO_API_VERSION}"
    )
}

fn normalize_id(resource_id: &str) -> String {
    format!("/{}", resource_id.trim().trim_matches('/'))
}

fn key_of(resource_id: &str) -> String {
    resource_id.to_ascii_lowercase()
}

fn last_segment(resource_id: &str) -> String {
    resource_id.rsplit('/').next().unwrap_or_default().to_string()
}

/// The resource group and name of a resource id, for error messages.
fn rg_and_name(id: &str) -> (String, String) {
    let segments: Vec<&str> = id.trim_start_matches('/').split('/').collect();
    (segments.get(3).copied().unwrap_or_default().to_string(), segments.last().copied().unwrap_or_default().to_string())
}

/// A random GUID-shaped id.
fn new_id() -> String {
    let hex = format!("{:032x}", rand::random::<u128>());
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::https::HttpsClient;
    use crate::pki::LabCa;

    const SUB: &str = "00000000-0000-0000-0000-000000000001";
    const ISSUER: &str = "https://oidc.lab.example/issuer/";
    const AUDIENCE: &str = "api://AzureADTokenExchange";

    struct Lab {
        arm: ArmDouble,
        client: HttpsClient,
        _dir: crate::RunDir,
    }

    async fn lab(options: ArmOptions) -> Lab {
        let dir = crate::RunDir::new("arm").unwrap();
        let ca = LabCa::create(dir.path()).unwrap();
        let cert = ca.issue_server("arm", &[]).unwrap();
        let bearer: BearerCheck =
            Arc::new(|token: &str| if token == "good-token" { Ok(()) } else { Err(format!("token '{token}' is not accepted by the lab")) });
        let arm = ArmDouble::start(&cert, bearer, options).await.unwrap();
        let client = HttpsClient::trusting(&ca.ca_pem()).unwrap();
        Lab { arm, client, _dir: dir }
    }

    impl Lab {
        async fn call(&self, method: &str, path_and_query: &str, body: Option<&Value>) -> (u16, Value, Vec<(String, String)>) {
            let url = if path_and_query.starts_with("https://") { path_and_query.to_string() } else { format!("{}{path_and_query}", self.arm.url()) };
            self.client.json(method, &url, Some("good-token"), body).await.unwrap()
        }
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn code(body: &Value) -> &str {
        body["error"]["code"].as_str().unwrap_or_default()
    }

    fn message(body: &Value) -> &str {
        body["error"]["message"].as_str().unwrap_or_default()
    }

    fn identity_id(name: &str) -> String {
        format!("/subscriptions/{SUB}/resourceGroups/lab-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}")
    }

    fn fic(identity: &str, name: &str) -> String {
        format!("{}/federatedIdentityCredentials/{name}?api-version={FIC_API_VERSION}", identity_id(identity))
    }

    fn fic_body(issuer: &str, subject: &str, audiences: &[&str]) -> Value {
        json!({"properties": {"issuer": issuer, "subject": subject, "audiences": audiences}})
    }

    #[tokio::test]
    async fn federated_identity_credentials() {
        let lab = lab(ArmOptions { write_latency: Duration::from_millis(5), ..ArmOptions::default() }).await;
        lab.arm.add_identity(&identity_id("uami"), "client-1", "principal-1", "tenant-1");
        lab.arm.add_identity(&identity_id("other"), "client-2", "principal-2", "tenant-1");
        let sa = |n: &str| format!("system:serviceaccount:repl:{n}");

        // Create, then update.
        let (status, body, _) = lab.call("PUT", &fic("uami", "repl-sa"), Some(&fic_body(ISSUER, &sa("a"), &[AUDIENCE]))).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["name"], "repl-sa");
        assert_eq!(body["type"], FIC_TYPE);
        assert_eq!(body["id"], format!("{}/federatedIdentityCredentials/repl-sa", identity_id("uami")));
        assert_eq!(body["properties"], json!({"issuer": ISSUER, "subject": sa("a"), "audiences": [AUDIENCE]}));
        let (status, _, _) = lab.call("PUT", &fic("uami", "repl-sa"), Some(&fic_body(ISSUER, &sa("a"), &[AUDIENCE]))).await;
        assert_eq!(status, 200);
        let (status, body, _) = lab.call("PUT", &fic("uami", "repl-sa"), Some(&fic_body(ISSUER, &sa("b"), &[AUDIENCE]))).await;
        assert_eq!((status, body["properties"]["subject"].as_str()), (200, Some(sa("b").as_str())));

        // Get and list; resource group and provider segments are case-insensitive.
        let (status, body, _) = lab.call("GET", &fic("uami", "repl-sa"), None).await;
        assert_eq!((status, body["properties"]["subject"].as_str()), (200, Some(sa("b").as_str())));
        let lower = format!(
            "/subscriptions/{SUB}/resourcegroups/LAB-RG/providers/microsoft.managedidentity/userassignedidentities/UAMI/federatedidentitycredentials?api-version={FIC_API_VERSION}"
        );
        let (status, body, _) = lab.call("GET", &lower, None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["value"].as_array().unwrap().len(), 1);
        assert_eq!(body["value"][0]["name"], "repl-sa");
        let (status, body, _) = lab.call("GET", &format!("{}?api-version={FIC_API_VERSION}", identity_id("uami")), None).await;
        assert_eq!((status, body["properties"]["clientId"].as_str()), (200, Some("client-1")));

        // Names.
        for bad in ["ab", "-abc", "a.bc", &"x".repeat(121)] {
            let (status, body, _) = lab.call("PUT", &fic("uami", bad), Some(&fic_body(ISSUER, &sa("n"), &[AUDIENCE]))).await;
            assert_eq!((status, code(&body)), (400, "BadRequest"), "name {bad}: {body}");
            assert!(message(&body).contains("^[a-zA-Z0-9][a-zA-Z0-9-_]{2,119}$"), "{body}");
        }
        // Audiences: exactly one.
        for audiences in [&[AUDIENCE, "api://other"][..], &[][..]] {
            let (status, body, _) = lab.call("PUT", &fic("uami", "aud"), Some(&fic_body(ISSUER, &sa("aud"), audiences))).await;
            assert_eq!((status, code(&body)), (400, "BadRequest"));
            assert!(message(&body).contains("exactly one audience"), "{body}");
        }
        // Wildcards, length, issuer URL, malformed JSON.
        let (status, body, _) = lab.call("PUT", &fic("uami", "wild"), Some(&fic_body(ISSUER, "system:serviceaccount:repl:*", &[AUDIENCE]))).await;
        assert_eq!(status, 400);
        assert!(message(&body).contains("wildcard"), "{body}");
        let long_issuer = format!("https://oidc.lab.example/{}", "i".repeat(600));
        let (status, body, _) = lab.call("PUT", &fic("uami", "long"), Some(&fic_body(&long_issuer, &sa("long"), &[AUDIENCE]))).await;
        assert_eq!(status, 400);
        assert!(message(&body).contains("at most 600"), "{body}");
        let (status, body, _) = lab.call("PUT", &fic("uami", "long"), Some(&fic_body(ISSUER, &"s".repeat(601), &[AUDIENCE]))).await;
        assert_eq!(status, 400, "{body}");
        let (status, body, _) = lab.call("PUT", &fic("uami", "plain"), Some(&fic_body("http://oidc.lab.example", &sa("p"), &[AUDIENCE]))).await;
        assert_eq!(status, 400, "{body}");
        let (status, body, _) = lab.call("PUT", &fic("uami", "junk"), Some(&json!("not an object"))).await;
        assert_eq!((status, code(&body)), (400, "BadRequest"));
        let response = lab
            .client
            .send("PUT", &format!("{}{}", lab.arm.url(), fic("uami", "junk")), &[("authorization", "Bearer good-token")], bytes::Bytes::from("{"))
            .await
            .unwrap();
        assert_eq!(response.status, 400);
        assert!(String::from_utf8_lossy(&response.body).contains("InvalidRequestContent"));

        // Issuer + subject unique per identity (case-sensitive), but fine on another identity.
        let (status, body, _) = lab.call("PUT", &fic("uami", "dup"), Some(&fic_body(ISSUER, &sa("b"), &[AUDIENCE]))).await;
        assert_eq!((status, code(&body)), (400, "BadRequest"));
        assert!(message(&body).starts_with("Issuer and subject combination already exists for this Managed Identity"), "{body}");
        let (status, _, _) = lab.call("PUT", &fic("uami", "dup"), Some(&fic_body(ISSUER, &sa("B"), &[AUDIENCE]))).await;
        assert_eq!(status, 201);
        let (status, _, _) = lab.call("PUT", &fic("other", "dup"), Some(&fic_body(ISSUER, &sa("b"), &[AUDIENCE]))).await;
        assert_eq!(status, 201);

        // Unknown identity, unknown credential.
        for method in ["PUT", "GET", "DELETE"] {
            let body = fic_body(ISSUER, &sa("x"), &[AUDIENCE]);
            let (status, body, _) = lab.call(method, &fic("ghost", "cred"), (method == "PUT").then_some(&body)).await;
            assert_eq!((status, code(&body)), (404, "ResourceNotFound"), "{method}");
            assert!(message(&body).contains("userAssignedIdentities/ghost"), "{body}");
        }
        let (status, body, _) = lab.call("GET", &fic("uami", "never"), None).await;
        assert_eq!((status, code(&body)), (404, "ResourceNotFound"));
        let (status, _, _) = lab.call("DELETE", &fic("uami", "never"), None).await;
        assert_eq!(status, 204);

        // At most 20 per identity (2 exist).
        for i in 0..18 {
            let (status, body, _) =
                lab.call("PUT", &fic("uami", &format!("fill-{i}")), Some(&fic_body(ISSUER, &sa(&format!("f{i}")), &[AUDIENCE]))).await;
            assert_eq!(status, 201, "{body}");
        }
        let (status, body, _) = lab.call("PUT", &fic("uami", "one-too-many"), Some(&fic_body(ISSUER, &sa("many"), &[AUDIENCE]))).await;
        assert_eq!((status, code(&body)), (400, "BadRequest"));
        assert!(message(&body).contains("maximum allowed is 20"), "{body}");
        let (status, _, _) = lab.call("PUT", &fic("uami", "fill-0"), Some(&fic_body(ISSUER, &sa("f0-new"), &[AUDIENCE]))).await;
        assert_eq!(status, 200, "updates are allowed at the limit");

        // Delete: 200, then 204, then 404 on GET.
        let (status, _, _) = lab.call("DELETE", &fic("uami", "FILL-1"), None).await;
        assert_eq!(status, 200);
        let (status, _, _) = lab.call("DELETE", &fic("uami", "fill-1"), None).await;
        assert_eq!(status, 204);
        let (status, _, _) = lab.call("GET", &fic("uami", "fill-1"), None).await;
        assert_eq!(status, 404);
        let identity = lab.arm.identity_by_client_id("client-1").unwrap();
        assert_eq!(identity.credentials.len(), 19);
        assert_eq!(identity.principal_id, "principal-1");
        assert!(identity.credentials.iter().any(|c| c.name == "repl-sa" && c.subject == sa("b")));

        // Two writes under one identity at once: one gets 409.
        lab.arm.set_write_latency(Duration::from_millis(300));
        let body_a = fic_body(ISSUER, &sa("ca"), &[AUDIENCE]);
        let body_b = fic_body(ISSUER, &sa("cb"), &[AUDIENCE]);
        let (url_a, url_b) = (fic("other", "conc-a"), fic("other", "conc-b"));
        let (a, b) = tokio::join!(lab.call("PUT", &url_a, Some(&body_a)), lab.call("PUT", &url_b, Some(&body_b)));
        let mut statuses = [a.0, b.0];
        statuses.sort();
        assert_eq!(statuses, [201, 409]);
        let refused = if a.0 == 409 { &a.1 } else { &b.1 };
        assert_eq!(code(refused), "ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity");
        assert!(message(refused).contains("Concurrent Federated Identity Credentials writes under the same managed identity are not supported"));
        // Writes under different identities do not conflict.
        let (url_c, url_d) = (fic("other", "conc-c"), fic("uami", "fill-2"));
        let (a, b) = tokio::join!(lab.call("PUT", &url_c, Some(&body_b)), lab.call("DELETE", &url_d, None));
        assert_eq!((a.0, b.0), (201, 200));
        lab.arm.set_write_latency(Duration::from_millis(5));

        // Throttling: the next two writes get 429 + Retry-After; reads are not throttled.
        lab.arm.throttle_next_writes(2, 7);
        let (status, _, _) = lab.call("GET", &fic("uami", "repl-sa"), None).await;
        assert_eq!(status, 200);
        for _ in 0..2 {
            let (status, body, headers) = lab.call("PUT", &fic("uami", "repl-sa"), Some(&fic_body(ISSUER, &sa("b"), &[AUDIENCE]))).await;
            assert_eq!((status, code(&body)), (429, "TooManyRequests"));
            assert_eq!(header(&headers, "retry-after"), Some("7"));
        }
        let (status, _, _) = lab.call("PUT", &fic("uami", "repl-sa"), Some(&fic_body(ISSUER, &sa("b"), &[AUDIENCE]))).await;
        assert_eq!(status, 200);

        // Bearer and api-version.
        let url = format!("{}{}", lab.arm.url(), fic("uami", "repl-sa"));
        let (status, body, headers) = lab.client.json("GET", &url, None, None).await.unwrap();
        assert_eq!((status, code(&body)), (401, "AuthenticationFailed"));
        assert!(header(&headers, "www-authenticate").is_some_and(|h| h.starts_with("Bearer ")));
        let (status, body, _) = lab.client.json("GET", &url, Some("bad-token"), None).await.unwrap();
        assert_eq!((status, code(&body)), (401, "InvalidAuthenticationToken"));
        assert!(message(&body).contains("bad-token"), "{body}");
        let wrong = fic("uami", "repl-sa").replace(FIC_API_VERSION, "2023-01-31");
        let (status, body, _) = lab.call("GET", &wrong, None).await;
        assert_eq!((status, code(&body)), (400, "NoRegisteredProviderFound"));
        assert!(message(&body).contains(FIC_API_VERSION), "{body}");
        let (status, body, _) = lab.call("GET", &fic("uami", "repl-sa").replace(FIC_API_VERSION, "latest"), None).await;
        assert_eq!((status, code(&body)), (400, "InvalidApiVersionParameter"));
        let (status, body, _) = lab.call("GET", fic("uami", "repl-sa").split('?').next().unwrap(), None).await;
        assert_eq!((status, code(&body)), (400, "MissingApiVersionParameter"));
        let (status, _, _) = lab.call("POST", &fic("uami", "repl-sa"), None).await;
        assert_eq!(status, 405);
        assert!(lab.arm.request_count() > 60);
    }

    fn cluster_id(name: &str) -> String {
        format!("/subscriptions/{SUB}/resourceGroups/lab-rg/providers/Microsoft.DocumentDB/mongoClusters/{name}")
    }

    fn user(cluster: &str, name: &str) -> String {
        format!("{}/users/{name}?api-version={MONGO_API_VERSION}", cluster_id(cluster))
    }

    fn user_body(principal_type: &str) -> Value {
        json!({"properties": {
            "identityProvider": {"type": "MicrosoftEntraID", "properties": {"principalType": principal_type}},
            "roles": [{"db": "admin", "role": "root"}],
        }})
    }

    /// Polls an `Azure-AsyncOperation` URL until it leaves `InProgress`; returns the final status
    /// and how many polls said `InProgress`.
    async fn wait_operation(lab: &Lab, url: &str) -> (String, usize) {
        let mut in_progress = 0;
        for _ in 0..100 {
            let (status, body, _) = lab.call("GET", url, None).await;
            assert_eq!(status, 200, "{body}");
            match body["status"].as_str().unwrap() {
                "InProgress" => in_progress += 1,
                done => return (done.to_string(), in_progress),
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        panic!("operation {url} never finished");
    }

    #[tokio::test]
    async fn mongo_cluster_users() {
        let lab = lab(ArmOptions { provisioning_delay: Duration::from_millis(200), ..ArmOptions::default() }).await;
        lab.arm.add_cluster(&cluster_id("docs"), &["NativeAuth", "MicrosoftEntraID"]);
        lab.arm.add_cluster(&cluster_id("native"), &["NativeAuth"]);
        let principal = "6f1c3c2e-0d4b-4a8e-9b1a-2c7d5e8f9a01";

        let (status, body, _) = lab.call("GET", &format!("{}?api-version={MONGO_API_VERSION}", cluster_id("docs")), None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["properties"]["authConfig"]["allowedModes"], json!(["NativeAuth", "MicrosoftEntraID"]));
        assert_eq!(body["type"], CLUSTER_TYPE);

        // Create: 201 InProgress with a long-running operation, then Succeeded.
        let (status, body, headers) = lab.call("PUT", &user("docs", principal), Some(&user_body("servicePrincipal"))).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["properties"]["provisioningState"], "InProgress");
        assert_eq!(body["name"], principal);
        assert_eq!(body["type"], USER_TYPE);
        assert_eq!(header(&headers, "retry-after"), Some("1"));
        let operation = header(&headers, "azure-asyncoperation").unwrap().to_string();
        assert!(operation.starts_with(&lab.arm.url()) && operation.contains("api-version=2025-09-01"), "{operation}");
        assert!(!lab.arm.is_cluster_user(&cluster_id("docs"), principal));
        let (status, in_progress) = wait_operation(&lab, &operation).await;
        assert_eq!(status, "Succeeded");
        assert!(in_progress >= 1);
        let (status, body, _) = lab.call("GET", &user("docs", principal), None).await;
        assert_eq!((status, body["properties"]["provisioningState"].as_str()), (200, Some("Succeeded")));
        assert!(lab.arm.is_cluster_user(&cluster_id("docs"), principal));
        assert!(!lab.arm.is_cluster_user(&cluster_id("native"), principal));

        // Re-PUT: 200, the user stays usable while it updates.
        let (status, body, headers) = lab.call("PUT", &user("docs", principal), Some(&user_body("servicePrincipal"))).await;
        assert_eq!((status, body["properties"]["provisioningState"].as_str()), (200, Some("InProgress")));
        assert!(header(&headers, "azure-asyncoperation").is_some());
        assert!(lab.arm.is_cluster_user(&cluster_id("docs"), principal));

        // Refusals.
        let (status, body, _) = lab.call("PUT", &user("docs", "group-1"), Some(&user_body("group"))).await;
        assert_eq!((status, code(&body)), (400, "BadRequest"));
        assert!(message(&body).contains("groups are not supported"), "{body}");
        let mut native = user_body("servicePrincipal");
        native["properties"]["identityProvider"]["type"] = json!("NativeAuth");
        let (status, body, _) = lab.call("PUT", &user("docs", "native-1"), Some(&native)).await;
        assert_eq!((status, code(&body)), (400, "BadRequest"));
        let mut reader = user_body("servicePrincipal");
        reader["properties"]["roles"] = json!([{"db": "app", "role": "read"}]);
        let (status, _, _) = lab.call("PUT", &user("docs", "reader"), Some(&reader)).await;
        assert_eq!(status, 400);
        for bad in ["bad_name", "dot.ted", &"a".repeat(64)] {
            let (status, body, _) = lab.call("PUT", &user("docs", bad), Some(&user_body("servicePrincipal"))).await;
            assert_eq!((status, code(&body)), (400, "BadRequest"), "{bad}");
            assert!(message(&body).contains("1 to 63"), "{body}");
        }
        let (status, _, _) = lab.call("PUT", &user("docs", &"a".repeat(63)), Some(&user_body("servicePrincipal"))).await;
        assert_eq!(status, 201);
        let (status, body, _) = lab.call("PUT", &user("native", principal), Some(&user_body("servicePrincipal"))).await;
        assert_eq!((status, code(&body)), (400, "BadRequest"));
        assert!(message(&body).contains("MicrosoftEntraID") && message(&body).contains("allowedModes"), "{body}");
        for method in ["PUT", "GET"] {
            let body = user_body("servicePrincipal");
            let (status, body, _) = lab.call(method, &user("ghost", principal), (method == "PUT").then_some(&body)).await;
            assert_eq!((status, code(&body)), (404, "ResourceNotFound"), "{method}");
            assert!(message(&body).contains("mongoClusters/ghost"), "{body}");
        }
        let (status, body, _) = lab.call("GET", &user("docs", "nobody"), None).await;
        assert_eq!((status, code(&body)), (404, "ResourceNotFound"));

        // List, paged by nextLink (page size 2, five users).
        for name in ["user-c", "user-d", "user-e"] {
            let (status, _, _) = lab.call("PUT", &user("docs", name), Some(&user_body("servicePrincipal"))).await;
            assert_eq!(status, 201);
        }
        let mut next = Some(format!("{}/users?api-version={MONGO_API_VERSION}", cluster_id("docs")));
        let (mut listed, mut pages) = (Vec::new(), 0);
        while let Some(url) = next {
            let (status, body, _) = lab.call("GET", &url, None).await;
            assert_eq!(status, 200, "{body}");
            pages += 1;
            let value = body["value"].as_array().unwrap();
            assert!(value.len() <= 2);
            listed.extend(value.iter().map(|u| u["name"].as_str().unwrap().to_string()));
            next = body["nextLink"].as_str().map(str::to_string);
        }
        assert_eq!(pages, 3);
        assert_eq!(listed, lab.arm.cluster_users(&cluster_id("docs")));
        assert_eq!(listed.len(), 5);

        // Delete: 202 with Location and Azure-AsyncOperation, gone after the operation; then 204.
        let (status, _, headers) = lab.call("DELETE", &user("docs", principal), None).await;
        assert_eq!(status, 202);
        let location = header(&headers, "location").unwrap().to_string();
        let operation = header(&headers, "azure-asyncoperation").unwrap().to_string();
        assert!(!lab.arm.is_cluster_user(&cluster_id("docs"), principal));
        let (status, body, _) = lab.call("GET", &user("docs", principal), None).await;
        assert_eq!((status, body["properties"]["provisioningState"].as_str()), (200, Some("Deleting")));
        let (status, _, _) = lab.call("GET", &location, None).await;
        assert_eq!(status, 202);
        assert_eq!(wait_operation(&lab, &operation).await.0, "Succeeded");
        let (status, _, _) = lab.call("GET", &location, None).await;
        assert_eq!(status, 204);
        let (status, _, _) = lab.call("GET", &user("docs", principal), None).await;
        assert_eq!(status, 404);
        assert!(!lab.arm.cluster_users(&cluster_id("docs")).iter().any(|u| u == principal));
        let (status, _, _) = lab.call("DELETE", &user("docs", principal), None).await;
        assert_eq!(status, 204);

        // Throttling applies to user writes too.
        lab.arm.throttle_next_writes(1, 3);
        let (status, body, headers) = lab.call("DELETE", &user("docs", "user-c"), None).await;
        assert_eq!((status, code(&body), header(&headers, "retry-after")), (429, "TooManyRequests", Some("3")));

        // Bearer and api-version.
        let url = format!("{}{}", lab.arm.url(), user("docs", "user-c"));
        let (status, body, _) = lab.client.json("GET", &url, None, None).await.unwrap();
        assert_eq!((status, code(&body)), (401, "AuthenticationFailed"));
        let (status, body, _) = lab.client.json("GET", &url, Some("stale"), None).await.unwrap();
        assert_eq!((status, code(&body)), (401, "InvalidAuthenticationToken"));
        let (status, body, _) = lab.call("GET", &user("docs", "user-c").replace(MONGO_API_VERSION, FIC_API_VERSION), None).await;
        assert_eq!((status, code(&body)), (400, "NoRegisteredProviderFound"));
        assert!(message(&body).contains(MONGO_API_VERSION), "{body}");
    }
}
