//! The Azure Resource Manager client the operator binds identities with (FACTS §2–3):
//!
//! - federated identity credentials on user-assigned managed identities, so a workload's
//!   service-account token can be exchanged for an Entra token (api-version `2024-11-30`);
//! - Microsoft Entra users of Azure DocumentDB clusters, so that token can sign in
//!   (api-version `2025-09-01`, a long-running operation).
//!
//! ARM refuses concurrent federated-credential writes under one identity (409) and throttles
//! writes (429 + `Retry-After`), so the client writes one credential at a time per identity and
//! retries what waiting can fix, within bounds; everything else comes back at once as an
//! [`ArmError`] with a stable [`reason`](ArmError::reason). Tokens never appear in errors or logs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::Full;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use url::Url;

use tokio_util::sync::CancellationToken;

use crate::auth::oidc::{AccessToken, TokenError, TokenSource};
use crate::https::HttpsTransport;
use crate::reason::Reason;
use crate::retry::{self, Decision, Failure};

/// The public-cloud ARM endpoint (sovereign clouds have their own).
pub const PUBLIC_ENDPOINT: &str = "https://management.azure.com/";
/// The scope of the tokens ARM accepts; the [`TokenSource`] given to [`ArmClient::new`] asks for it.
pub const MANAGEMENT_SCOPE: &str = "https://management.azure.com/.default";
/// The api-version of `Microsoft.ManagedIdentity` (identities and federated credentials).
pub const FEDERATED_CREDENTIAL_API_VERSION: &str = "2024-11-30";
/// The api-version of `Microsoft.DocumentDB/mongoClusters` and its users.
pub const MONGO_CLUSTER_API_VERSION: &str = "2025-09-01";
/// The audience of projected service-account tokens that Entra exchanges.
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
/// ARM keeps at most this many federated identity credentials per managed identity.
pub const MAX_FEDERATED_CREDENTIALS: usize = 20;
/// The longest issuer, subject or audience a federated identity credential may hold.
const MAX_CLAIM_CHARS: usize = 600;
/// The shortest wait between two polls of a long-running operation.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// A guard against a `nextLink` chain that never ends.
const MAX_PAGES: usize = 1000;

/// What a federated identity credential trusts: tokens from `issuer` about `subject` for one
/// audience. Issuer and subject are compared case-sensitively by Entra, so they are kept as given
/// (an AKS issuer URL keeps its trailing slash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederatedCredential {
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
}

impl FederatedCredential {
    /// The credential a pod running as `namespace/service_account` of the cluster whose OIDC
    /// issuer is `issuer` needs (audience `api://AzureADTokenExchange`).
    pub fn for_service_account(issuer: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            issuer: issuer.to_string(),
            subject: format!("system:serviceaccount:{namespace}:{service_account}"),
            audiences: vec![TOKEN_EXCHANGE_AUDIENCE.to_string()],
        }
    }
}

/// A DocumentDB cluster user: its `(db, role)` pairs and provisioning state (`Succeeded`,
/// `InProgress`, `Deleting`, `Failed`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterUser {
    pub roles: Vec<(String, String)>,
    pub provisioning_state: String,
}

/// How long the client keeps trying. The defaults suit a reconcile loop: a request gives up
/// after about two minutes, so the controller can report and back off itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included (401 re-authentication not counted).
    pub max_attempts: u32,
    /// First backoff after a 409, 5xx or transport error; doubles per attempt, jittered.
    pub base_delay: Duration,
    /// Longest backoff between two attempts.
    pub max_delay: Duration,
    /// No retry is started that would end later than this after the first attempt (a
    /// `Retry-After` beyond it ends the request at once).
    pub budget: Duration,
    /// Longest wait for one answer.
    pub request_timeout: Duration,
    /// Longest wait for a long-running operation (cluster user create or delete) to finish.
    pub operation_timeout: Duration,
    /// Poll interval of a long-running operation when ARM gives no `Retry-After`.
    pub poll_interval: Duration,
}

impl RetryPolicy {
    /// The schedule of [`crate::retry`] these bounds describe.
    fn schedule(&self) -> retry::Policy {
        retry::Policy { first_delay: self.base_delay, max_delay: self.max_delay, max_attempts: Some(self.max_attempts), budget: Some(self.budget) }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            budget: Duration::from_secs(120),
            request_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_secs(2),
        }
    }
}

/// Why an ARM call failed. Messages carry ARM's `error.code` and `error.message`, never a token.
#[derive(Debug, thiserror::Error)]
pub enum ArmError {
    #[error("invalid Azure Resource Manager endpoint {endpoint:?}: {detail}")]
    InvalidEndpoint { endpoint: String, detail: String },
    #[error("{id:?} is not {kind} resource id: {detail}")]
    InvalidResourceId { kind: &'static str, id: String, detail: String },
    #[error(
        "federated identity credential name {name:?} is invalid: it must be 3 to 120 characters, start with a letter or digit and hold only letters, digits, '-' and '_'"
    )]
    InvalidCredentialName { name: String },
    #[error("federated identity credential {name}: {detail}")]
    InvalidCredential { name: String, detail: String },
    #[error("principal id {principal_id:?} is invalid: a cluster user is named by the principal's object id, 1 to 63 letters, digits and '-'")]
    InvalidPrincipalId { principal_id: String },
    #[error("cluster user roles are invalid: {detail}")]
    InvalidRoles { detail: String },
    #[error("the managed identity {identity} does not exist ({code}: {message})")]
    IdentityNotFound { identity: String, code: String, message: String },
    #[error("the Azure DocumentDB cluster {cluster} does not exist ({code}: {message})")]
    ClusterNotFound { cluster: String, code: String, message: String },
    #[error(
        "the managed identity {identity} already has the maximum of {MAX_FEDERATED_CREDENTIALS} federated identity credentials; delete unused ones ({code}: {message})"
    )]
    FederatedCredentialLimit { identity: String, code: String, message: String },
    #[error(
        "another federated identity credential of {identity} already has this issuer and subject, which must be unique per identity ({code}: {message})"
    )]
    DuplicateIssuerSubject { identity: String, code: String, message: String },
    #[error("Azure Resource Manager refused the request with HTTP {status} ({code}: {message})")]
    InvalidRequest { status: u16, code: String, message: String },
    #[error("Azure Resource Manager refused the access token, also a newly fetched one (HTTP 401, {code}: {message})")]
    Unauthorized { code: String, message: String },
    #[error(
        "the operator's identity is not allowed to do this (HTTP 403, {code}: {message}); grant it a role on the resource (Managed Identity Contributor for federated credentials, DocumentDB contributor for cluster users)"
    )]
    Forbidden { code: String, message: String },
    #[error("Azure Resource Manager still throttles the request (HTTP 429) after {attempts} attempts ({code}: {message})")]
    Throttled { attempts: u32, retry_after_secs: Option<u64>, code: String, message: String },
    #[error("Azure Resource Manager still answers with a conflict (HTTP 409) after {attempts} attempts ({code}: {message})")]
    Conflict { attempts: u32, code: String, message: String },
    #[error("Azure Resource Manager is unavailable: HTTP {status} after {attempts} attempts ({code}: {message})")]
    Unavailable { status: u16, attempts: u32, code: String, message: String },
    #[error("{operation} ended {status} ({code}: {message})")]
    OperationFailed { operation: String, status: String, code: String, message: String },
    #[error("{operation} did not finish within {waited_secs} s")]
    Timeout { operation: String, waited_secs: u64 },
    #[error("Azure Resource Manager at {endpoint} is unreachable after {attempts} attempts: {detail}")]
    Transport { endpoint: String, attempts: u32, detail: String },
    #[error("unexpected answer from Azure Resource Manager: {detail}")]
    UnexpectedResponse { detail: String },
    #[error("no access token for Azure Resource Manager: {0}")]
    Token(#[from] TokenError),
    #[error("stopped by a shutdown while waiting to retry a request to Azure Resource Manager")]
    Cancelled,
}

impl ArmError {
    /// Stable reason for conditions, Events and metric labels.
    pub fn reason(&self) -> Reason {
        match self {
            ArmError::InvalidEndpoint { .. } => Reason::InvalidArmEndpoint,
            ArmError::InvalidResourceId { .. } => Reason::InvalidResourceId,
            ArmError::InvalidCredentialName { .. } => Reason::InvalidFederatedCredentialName,
            ArmError::InvalidCredential { .. } => Reason::InvalidFederatedCredential,
            ArmError::InvalidPrincipalId { .. } => Reason::InvalidPrincipalId,
            ArmError::InvalidRoles { .. } => Reason::InvalidClusterUserRoles,
            ArmError::IdentityNotFound { .. } => Reason::IdentityNotFound,
            ArmError::ClusterNotFound { .. } => Reason::ClusterNotFound,
            ArmError::FederatedCredentialLimit { .. } => Reason::FederatedCredentialLimit,
            ArmError::DuplicateIssuerSubject { .. } => Reason::DuplicateIssuerSubject,
            ArmError::InvalidRequest { .. } => Reason::ArmInvalidRequest,
            ArmError::Unauthorized { .. } => Reason::ArmUnauthorized,
            ArmError::Forbidden { .. } => Reason::ArmForbidden,
            ArmError::Throttled { .. } => Reason::ArmThrottled,
            ArmError::Conflict { .. } => Reason::ArmConflict,
            ArmError::Unavailable { .. } => Reason::ArmUnavailable,
            ArmError::OperationFailed { .. } => Reason::ArmOperationFailed,
            ArmError::Timeout { .. } => Reason::ArmTimeout,
            ArmError::Transport { .. } => Reason::ArmUnreachable,
            ArmError::UnexpectedResponse { .. } => Reason::ArmUnexpectedResponse,
            ArmError::Token(err) => err.reason(),
            ArmError::Cancelled => Reason::Cancelled,
        }
    }

    /// Whether trying again later may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            ArmError::Throttled { .. }
            | ArmError::Conflict { .. }
            | ArmError::Unavailable { .. }
            | ArmError::Timeout { .. }
            | ArmError::Transport { .. } => true,
            ArmError::Token(err) => err.is_transient(),
            _ => false,
        }
    }

    /// How long ARM asked to wait, when it throttled the last attempt.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ArmError::Throttled { retry_after_secs, .. } => retry_after_secs.map(Duration::from_secs),
            _ => None,
        }
    }
}

/// Calls Azure Resource Manager as the identity of a [`TokenSource`]. Cheap to clone; clones
/// share the per-identity write serialisation.
#[derive(Clone)]
pub struct ArmClient {
    endpoint: Url,
    tokens: Arc<TokenSource>,
    transport: Arc<HttpsTransport>,
    policy: RetryPolicy,
    writes: WriteLocks,
    cancel: CancellationToken,
}

impl std::fmt::Debug for ArmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArmClient").field("endpoint", &self.endpoint.as_str()).field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl ArmClient {
    /// `endpoint` is https://management.azure.com/ in public cloud (a setting: sovereign clouds
    /// and the lab differ). `tokens` must ask for [`MANAGEMENT_SCOPE`] (see
    /// [`crate::auth::oidc::Identity`]); only https endpoints are accepted, as every request
    /// carries a bearer token.
    pub fn new(endpoint: &str, tokens: Arc<TokenSource>, transport: Arc<HttpsTransport>) -> Result<Self, ArmError> {
        Ok(Self {
            endpoint: parse_endpoint(endpoint)?,
            tokens,
            transport,
            policy: RetryPolicy::default(),
            writes: WriteLocks::default(),
            cancel: CancellationToken::new(),
        })
    }

    /// The same client with other retry bounds.
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The same client, ending its waits (retries, long-running operations) when `cancel` fires.
    pub fn with_cancellation(mut self, cancel: CancellationToken) -> Self {
        self.cancel = cancel;
        self
    }

    /// Creates or updates the federated identity credential `name` on a user-assigned identity
    /// (FACTS §3), idempotent. A credential that already holds these values is not written again:
    /// ARM throttles credential writes hard (about 0.25/s per resource), reads far less. Returns
    /// what ARM holds.
    pub async fn put_federated_credential(
        &self,
        identity_resource_id: &str,
        name: &str,
        credential: &FederatedCredential,
    ) -> Result<FederatedCredential, ArmError> {
        let identity = IdentityId::parse(identity_resource_id)?;
        check_credential_name(name)?;
        check_credential(name, credential)?;
        let url = self.url(&identity.credential_path(name), FEDERATED_CREDENTIAL_API_VERSION)?;
        let _turn = self.writes.acquire(&identity.key()).await;
        if let Some(current) = self.read_credential(&url).await?
            && current == *credential
        {
            tracing::debug!(identity = %identity, credential = name, "federated identity credential is up to date");
            return Ok(current);
        }
        let body = json!({ "properties": credential });
        let response = self.exchange(Method::PUT, &url, Some(&body)).await?;
        match response.status {
            200 | 201 => {
                tracing::info!(identity = %identity, credential = name, subject = %credential.subject, created = response.status == 201, "wrote federated identity credential");
                credential_from(&response.body)
            }
            _ => Err(response.refusal(&Target::CredentialWrite(&identity))),
        }
    }

    /// The federated identity credential `name`, or `None` when the identity has none by that
    /// name. A missing identity is [`ArmError::IdentityNotFound`].
    pub async fn get_federated_credential(&self, identity_resource_id: &str, name: &str) -> Result<Option<FederatedCredential>, ArmError> {
        let identity = IdentityId::parse(identity_resource_id)?;
        check_credential_name(name)?;
        let url = self.url(&identity.credential_path(name), FEDERATED_CREDENTIAL_API_VERSION)?;
        if let Some(credential) = self.read_credential(&url).await? {
            return Ok(Some(credential));
        }
        // ARM answers 404 both for a missing credential and a missing identity; ask which.
        let url = self.url(identity.as_str(), FEDERATED_CREDENTIAL_API_VERSION)?;
        let response = self.exchange(Method::GET, &url, None).await?;
        match response.status {
            200 => Ok(None),
            _ => Err(response.refusal(&Target::Identity(&identity))),
        }
    }

    /// Deletes the federated identity credential `name`. Deleting one that does not exist, or
    /// whose identity does not exist, succeeds: either way nothing trusts it any more.
    pub async fn delete_federated_credential(&self, identity_resource_id: &str, name: &str) -> Result<(), ArmError> {
        let identity = IdentityId::parse(identity_resource_id)?;
        check_credential_name(name)?;
        let url = self.url(&identity.credential_path(name), FEDERATED_CREDENTIAL_API_VERSION)?;
        let _turn = self.writes.acquire(&identity.key()).await;
        let response = self.exchange(Method::DELETE, &url, None).await?;
        match response.status {
            200 | 204 => {
                tracing::info!(identity = %identity, credential = name, existed = response.status == 200, "deleted federated identity credential");
                Ok(())
            }
            404 => {
                tracing::info!(identity = %identity, credential = name, "the managed identity is gone, and its federated identity credentials with it");
                Ok(())
            }
            _ => Err(response.refusal(&Target::CredentialWrite(&identity))),
        }
    }

    /// Registers a principal as an Azure DocumentDB cluster user (FACTS §2) and waits for the
    /// long-running operation (polls `Azure-AsyncOperation`, honours `Retry-After`, bounded by
    /// [`RetryPolicy::operation_timeout`]). `roles` are `(db, role)` pairs, e.g. `("admin", "root")`.
    pub async fn put_cluster_user(&self, cluster_resource_id: &str, principal_id: &str, roles: &[(String, String)]) -> Result<(), ArmError> {
        let started = Instant::now();
        let (put, done) = self.send_cluster_user(cluster_resource_id, principal_id, roles).await?;
        if !done {
            self.wait_for(&put.operation, &put.response, &put.url, started, LroKind::Create).await?;
        }
        tracing::info!(cluster = %put.cluster, principal_id, elapsed_ms = started.elapsed().as_millis() as u64, "registered cluster user");
        Ok(())
    }

    /// Like [`ArmClient::put_cluster_user`], without waiting for the long-running operation:
    /// `true` when ARM answered that it already succeeded. A caller that cannot wait (a reconcile)
    /// reads [`ArmClient::get_cluster_user`]'s provisioning state later.
    pub async fn begin_cluster_user(&self, cluster_resource_id: &str, principal_id: &str, roles: &[(String, String)]) -> Result<bool, ArmError> {
        let (put, done) = self.send_cluster_user(cluster_resource_id, principal_id, roles).await?;
        tracing::info!(cluster = %put.cluster, principal_id, done, "started registering cluster user");
        Ok(done)
    }

    /// The PUT of a cluster user; `true` when no long-running operation follows.
    async fn send_cluster_user(
        &self,
        cluster_resource_id: &str,
        principal_id: &str,
        roles: &[(String, String)],
    ) -> Result<(UserPut, bool), ArmError> {
        let cluster = ClusterId::parse(cluster_resource_id)?;
        check_principal_id(principal_id)?;
        check_roles(roles)?;
        let url = self.url(&cluster.user_path(principal_id), MONGO_CLUSTER_API_VERSION)?;
        let body = user_body(roles);
        let operation = format!("registering principal {principal_id} as a user of {cluster}");
        let response = self.exchange(Method::PUT, &url, Some(&body)).await?;
        if !matches!(response.status, 200 | 201) {
            return Err(response.refusal(&Target::Cluster(&cluster)));
        }
        let state = provisioning_state(&response.body);
        let done = match state.as_deref() {
            Some("Failed" | "Canceled") => return Err(operation_failed(&operation, &response.body, state.as_deref())),
            Some("Succeeded") | None => response.header("azure-asyncoperation").is_none(),
            _ => false,
        };
        Ok((UserPut { cluster, url, operation, response }, done))
    }

    /// Removes a cluster user and waits until it is gone. A user (or cluster) that does not
    /// exist is already gone.
    pub async fn delete_cluster_user(&self, cluster_resource_id: &str, principal_id: &str) -> Result<(), ArmError> {
        let cluster = ClusterId::parse(cluster_resource_id)?;
        check_principal_id(principal_id)?;
        let url = self.url(&cluster.user_path(principal_id), MONGO_CLUSTER_API_VERSION)?;
        let operation = format!("removing user {principal_id} from {cluster}");
        let started = Instant::now();
        let response = self.exchange(Method::DELETE, &url, None).await?;
        match response.status {
            200 | 204 | 404 => {}
            202 => self.wait_for(&operation, &response, &url, started, LroKind::Delete).await?,
            _ => return Err(response.refusal(&Target::Cluster(&cluster))),
        }
        tracing::info!(cluster = %cluster, principal_id, elapsed_ms = started.elapsed().as_millis() as u64, "removed cluster user");
        Ok(())
    }

    /// The names (principal object ids) of the cluster's users in any provisioning state,
    /// following `nextLink` through every page.
    pub async fn list_cluster_users(&self, cluster_resource_id: &str) -> Result<Vec<String>, ArmError> {
        let cluster = ClusterId::parse(cluster_resource_id)?;
        let mut next = Some(self.url(&cluster.users_path(), MONGO_CLUSTER_API_VERSION)?);
        let mut names = Vec::new();
        let mut pages = 0;
        while let Some(url) = next.take() {
            pages += 1;
            if pages > MAX_PAGES {
                return Err(ArmError::UnexpectedResponse { detail: format!("the user list of {cluster} has more than {MAX_PAGES} pages") });
            }
            let response = self.exchange(Method::GET, &url, None).await?;
            if response.status != 200 {
                return Err(response.refusal(&Target::Cluster(&cluster)));
            }
            let page: UserPage = serde_json::from_slice(&response.body)
                .map_err(|err| ArmError::UnexpectedResponse { detail: format!("the user list of {cluster} is not a page of users: {err}") })?;
            names.extend(page.value.into_iter().map(|user| user.name));
            if let Some(link) = page.next_link.filter(|l| !l.is_empty()) {
                next = Some(self.follow(&link)?);
            }
        }
        Ok(names)
    }

    /// Every federated identity credential of an identity, by name (at most
    /// [`MAX_FEDERATED_CREDENTIALS`], one page). A missing identity is [`ArmError::IdentityNotFound`].
    pub async fn list_federated_credentials(&self, identity_resource_id: &str) -> Result<Vec<(String, FederatedCredential)>, ArmError> {
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            value: Vec<Named>,
        }
        #[derive(Deserialize)]
        struct Named {
            name: String,
            properties: FederatedCredential,
        }
        let identity = IdentityId::parse(identity_resource_id)?;
        let url = self.url(&identity.credentials_path(), FEDERATED_CREDENTIAL_API_VERSION)?;
        let response = self.exchange(Method::GET, &url, None).await?;
        if response.status != 200 {
            return Err(response.refusal(&Target::Identity(&identity)));
        }
        let page: Page = serde_json::from_slice(&response.body).map_err(|err| ArmError::UnexpectedResponse {
            detail: format!("the federated identity credentials of {identity} are not a list of credentials: {err}"),
        })?;
        Ok(page.value.into_iter().map(|c| (c.name, c.properties)).collect())
    }

    /// A cluster user as ARM holds it, or `None` when the principal is not a user of the cluster.
    /// A missing cluster is [`ArmError::ClusterNotFound`].
    pub async fn get_cluster_user(&self, cluster_resource_id: &str, principal_id: &str) -> Result<Option<ClusterUser>, ArmError> {
        let cluster = ClusterId::parse(cluster_resource_id)?;
        check_principal_id(principal_id)?;
        let url = self.url(&cluster.user_path(principal_id), MONGO_CLUSTER_API_VERSION)?;
        let response = self.exchange(Method::GET, &url, None).await?;
        match response.status {
            200 => {}
            // A 404 names either the user or the cluster; the cluster's GET says which.
            404 => return self.cluster_allowed_modes(cluster_resource_id).await.map(|_| None),
            _ => return Err(response.refusal(&Target::Cluster(&cluster))),
        }
        let value: Value = serde_json::from_slice(&response.body)
            .map_err(|err| ArmError::UnexpectedResponse { detail: format!("the cluster user {principal_id} of {cluster} is not JSON: {err}") })?;
        let roles = value["properties"]["roles"]
            .as_array()
            .map(|roles| roles.iter().filter_map(|r| Some((r["db"].as_str()?.to_string(), r["role"].as_str()?.to_string()))).collect::<Vec<_>>())
            .unwrap_or_default();
        let state = value["properties"]["provisioningState"].as_str().unwrap_or("Succeeded").to_string();
        Ok(Some(ClusterUser { roles, provisioning_state: state }))
    }

    /// The sign-in modes a cluster allows (`properties.authConfig.allowedModes`, e.g.
    /// `NativeAuth`, `MicrosoftEntraID`). A missing cluster is [`ArmError::ClusterNotFound`].
    pub async fn cluster_allowed_modes(&self, cluster_resource_id: &str) -> Result<Vec<String>, ArmError> {
        let cluster = ClusterId::parse(cluster_resource_id)?;
        let url = self.url(cluster.as_str(), MONGO_CLUSTER_API_VERSION)?;
        let response = self.exchange(Method::GET, &url, None).await?;
        if response.status != 200 {
            return Err(response.refusal(&Target::Cluster(&cluster)));
        }
        let value: Value = serde_json::from_slice(&response.body)
            .map_err(|err| ArmError::UnexpectedResponse { detail: format!("the cluster {cluster} is not JSON: {err}") })?;
        Ok(value["properties"]["authConfig"]["allowedModes"]
            .as_array()
            .map(|modes| modes.iter().filter_map(|m| m.as_str().map(str::to_string)).collect())
            .unwrap_or_default())
    }

    /// GET of a federated identity credential; `None` on 404 (credential or identity missing).
    async fn read_credential(&self, url: &Url) -> Result<Option<FederatedCredential>, ArmError> {
        let response = self.exchange(Method::GET, url, None).await?;
        match response.status {
            200 => credential_from(&response.body).map(Some),
            404 => Ok(None),
            _ => Err(response.refusal(&Target::Other)),
        }
    }

    /// Waits for a long-running operation started by `first`: through `Azure-AsyncOperation`
    /// when ARM gives one, else `Location`, else by reading the resource at `resource`.
    async fn wait_for(&self, operation: &str, first: &Response, resource: &Url, started: Instant, kind: LroKind) -> Result<(), ArmError> {
        let deadline = started + self.policy.operation_timeout;
        let (poll, how) = match (first.header("azure-asyncoperation"), first.header("location")) {
            (Some(url), _) => (self.follow(url)?, Poll::AsyncOperation),
            (None, Some(url)) if kind == LroKind::Delete => (self.follow(url)?, Poll::Location),
            _ => (resource.clone(), Poll::Resource),
        };
        let mut retry_after = first.retry_after();
        loop {
            // `Retry-After: 0` is honoured, but not as a busy loop.
            let wait = retry_after.unwrap_or(self.policy.poll_interval).max(MIN_POLL_INTERVAL);
            if Instant::now() + wait > deadline {
                return Err(ArmError::Timeout { operation: operation.to_string(), waited_secs: started.elapsed().as_secs().max(1) });
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.cancel.cancelled() => return Err(ArmError::Cancelled),
            }
            let response = self.exchange(Method::GET, &poll, None).await?;
            retry_after = response.retry_after();
            let done = match how {
                Poll::AsyncOperation if response.status == 200 => {
                    let status = json_field(&response.body, &["status"]);
                    match status.as_deref() {
                        Some("Succeeded") => true,
                        Some("Failed" | "Canceled" | "Cancelled") => return Err(operation_failed(operation, &response.body, status.as_deref())),
                        _ => false,
                    }
                }
                Poll::Location => match response.status {
                    202 => false,
                    200 | 204 => true,
                    _ => return Err(response.refusal(&Target::Other)),
                },
                Poll::Resource => match (response.status, kind) {
                    (404, LroKind::Delete) => true,
                    (200, _) => {
                        let state = provisioning_state(&response.body);
                        match state.as_deref() {
                            Some("Succeeded") if kind == LroKind::Create => true,
                            Some("Failed" | "Canceled") => return Err(operation_failed(operation, &response.body, state.as_deref())),
                            _ => false,
                        }
                    }
                    _ => return Err(response.refusal(&Target::Other)),
                },
                Poll::AsyncOperation => return Err(response.refusal(&Target::Other)),
            };
            if done {
                return Ok(());
            }
            tracing::debug!(operation, elapsed_ms = started.elapsed().as_millis() as u64, "long-running operation in progress");
        }
    }

    /// `{endpoint}{path}?api-version=…`
    fn url(&self, path: &str, api_version: &str) -> Result<Url, ArmError> {
        resource_url(&self.endpoint, path, api_version)
    }

    /// A URL ARM handed back (`nextLink`, `Azure-AsyncOperation`, `Location`). The bearer token
    /// goes only to the configured endpoint, so a URL elsewhere is refused.
    fn follow(&self, link: &str) -> Result<Url, ArmError> {
        follow_link(&self.endpoint, link)
    }

    /// One request with retries: 401 once with a new token; 429 after `Retry-After`; 408, 409,
    /// 5xx and transport errors after a jittered backoff; within [`RetryPolicy`]. Any other
    /// answer is returned for the caller to interpret.
    async fn exchange(&self, method: Method, url: &Url, body: Option<&Value>) -> Result<Response, ArmError> {
        let body = &body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let method = &method;
        // A refused token is replaced once per request, and that attempt is not counted.
        let reauthenticated = &std::sync::atomic::AtomicBool::new(false);
        let attempt = || async move {
            let mut refused = None;
            loop {
                let token = self.tokens.token(refused.take(), None).await.map_err(|e| Attempt::Final(e.into()))?;
                let request = build_request(method, url, body, &token).map_err(Attempt::Final)?;
                let answer = match tokio::time::timeout(self.policy.request_timeout, self.transport.send(request)).await {
                    Ok(Ok((status, headers, body))) => Response::new(status, headers, body, token.secret()),
                    Ok(Err(detail)) => return Err(Attempt::Retryable(Err(redact_tokens(&detail, token.secret())))),
                    Err(_) => return Err(Attempt::Retryable(Err(format!("no answer within {} s", self.policy.request_timeout.as_secs())))),
                };
                if answer.status == 401 && !reauthenticated.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    // The token may have been revoked or expired early: fetch a new one, once.
                    tracing::info!(method = %method, path = url.path(), "Azure Resource Manager refused the access token; fetching a new one");
                    refused = Some(token.generation);
                    continue;
                }
                return if is_retryable(answer.status) { Err(Attempt::Retryable(Ok(answer))) } else { Ok(answer) };
            }
        };
        let on_retry = |attempt: &Attempt, wait: Duration, number: u32| match attempt {
            Attempt::Retryable(Ok(response)) => {
                tracing::warn!(method = %method, path = url.path(), status = response.status, code = %response.failure().code, attempt = number, wait_ms = wait.as_millis() as u64, request_id = response.header("x-ms-request-id").unwrap_or_default(), "Azure Resource Manager asked to retry")
            }
            Attempt::Retryable(Err(detail)) => {
                tracing::warn!(method = %method, path = url.path(), error = %detail, attempt = number, wait_ms = wait.as_millis() as u64, "Azure Resource Manager unreachable; retrying")
            }
            Attempt::Final(_) => {}
        };
        retry::retry(&self.policy.schedule(), &self.cancel, attempt, Attempt::decision, on_retry).await.map_err(|failure| match failure {
            Failure::Stopped(attempt) => attempt.into_error(0, &self.endpoint),
            Failure::Exhausted { last, attempts } => last.into_error(attempts, &self.endpoint),
            Failure::Cancelled { .. } => ArmError::Cancelled,
        })
    }
}

/// A cluster user's PUT, accepted.
struct UserPut {
    cluster: ClusterId,
    url: Url,
    operation: String,
    response: Response,
}

/// A failed attempt of one request.
enum Attempt {
    /// An answer worth another attempt (or a transport failure's description).
    Retryable(Result<Response, String>),
    /// An error no retry fixes (no token, a request that cannot be built).
    Final(ArmError),
}

impl Attempt {
    /// Retry-After is honoured as given; otherwise the policy's backoff.
    fn decision(&self) -> Decision {
        match self {
            Attempt::Retryable(Ok(response)) => response.retry_after().map_or(Decision::Retry, Decision::RetryAfter),
            Attempt::Retryable(Err(_)) => Decision::Retry,
            Attempt::Final(_) => Decision::Stop,
        }
    }

    fn into_error(self, attempts: u32, endpoint: &Url) -> ArmError {
        match self {
            Attempt::Retryable(answer) => exhausted(answer, attempts, endpoint),
            Attempt::Final(err) => err,
        }
    }
}

/// One async mutex per managed identity (lower-cased resource id: ARM ids are case-insensitive),
/// so the client writes one federated credential at a time under an identity. Entries are
/// removed when nobody holds or waits for them.
#[derive(Clone, Default)]
struct WriteLocks(Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>);

/// An identity's turn to be written; the next writer goes when it is dropped.
struct WriteTurn {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    locks: WriteLocks,
    key: String,
}

impl WriteLocks {
    async fn acquire(&self, key: &str) -> WriteTurn {
        let lock = self.0.lock().unwrap_or_else(|p| p.into_inner()).entry(key.to_string()).or_default().clone();
        let guard = lock.lock_owned().await;
        WriteTurn { guard: Some(guard), locks: self.clone(), key: key.to_string() }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for WriteTurn {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.locks.0.lock().unwrap_or_else(|p| p.into_inner());
        // Waiters clone the Arc under this map lock, so a count of one means nobody waits.
        if locks.get(&self.key).is_some_and(|lock| Arc::strong_count(lock) == 1) {
            locks.remove(&self.key);
        }
    }
}

/// An answer worth interpreting: status, headers, body, and for failures ARM's error with any
/// token removed.
struct Response {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
    failure: Option<ArmFailure>,
}

impl Response {
    /// `secret` is the token the request carried, removed from ARM's message.
    fn new(status: u16, headers: HeaderMap, body: Bytes, secret: &str) -> Self {
        let failure = (status >= 400).then(|| ArmFailure::parse(status, &body, secret));
        Self { status, headers, body, failure }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
    }

    fn retry_after(&self) -> Option<Duration> {
        self.header("retry-after").and_then(parse_retry_after)
    }

    fn failure(&self) -> ArmFailure {
        self.failure.clone().unwrap_or_else(|| ArmFailure { status: self.status, code: format!("HTTP{}", self.status), message: String::new() })
    }

    fn refusal(&self, target: &Target<'_>) -> ArmError {
        if let Some(request_id) = self.header("x-ms-request-id") {
            tracing::debug!(status = self.status, request_id, "Azure Resource Manager refused the request");
        }
        refusal(self.failure(), target)
    }
}

/// ARM's `{"error":{"code","message"}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ArmFailure {
    status: u16,
    code: String,
    message: String,
}

impl ArmFailure {
    fn parse(status: u16, body: &[u8], secret: &str) -> Self {
        let value: Option<Value> = serde_json::from_slice(body).ok();
        let error = value.as_ref().and_then(|v| v.get("error"));
        let text = |field: &str| error.and_then(|e| e.get(field)).and_then(Value::as_str).map(str::to_string);
        let code = text("code").filter(|c| !c.is_empty()).unwrap_or_else(|| format!("HTTP{status}"));
        let message = text("message").unwrap_or_else(|| {
            let raw = String::from_utf8_lossy(body);
            let raw = raw.trim();
            match raw.char_indices().nth(300) {
                Some((cut, _)) => format!("{}…", &raw[..cut]),
                None => raw.to_string(),
            }
        });
        Self { status, code, message: redact_tokens(&message, secret) }
    }
}

/// What a request was about, to name what is missing on 404 and to read a 400.
enum Target<'a> {
    CredentialWrite(&'a IdentityId),
    Identity(&'a IdentityId),
    Cluster(&'a ClusterId),
    Other,
}

/// The error for a final (not retried) refusal.
fn refusal(failure: ArmFailure, target: &Target<'_>) -> ArmError {
    let ArmFailure { status, code, message } = failure;
    let lower = message.to_ascii_lowercase();
    match (status, target) {
        (401, _) => ArmError::Unauthorized { code, message },
        (403, _) => ArmError::Forbidden { code, message },
        (404, Target::CredentialWrite(id) | Target::Identity(id)) => ArmError::IdentityNotFound { identity: id.to_string(), code, message },
        (404, Target::Cluster(id)) => ArmError::ClusterNotFound { cluster: id.to_string(), code, message },
        (400, Target::CredentialWrite(id)) if lower.contains("issuer and subject combination already exists") => {
            ArmError::DuplicateIssuerSubject { identity: id.to_string(), code, message }
        }
        // ARM's wording of the limit is not documented; it names the maximum or a limit.
        (400, Target::CredentialWrite(id))
            if (lower.contains("maximum") || lower.contains("limit") || lower.contains("too many"))
                && (lower.contains("federated identity credential") || lower.contains(&MAX_FEDERATED_CREDENTIALS.to_string())) =>
        {
            ArmError::FederatedCredentialLimit { identity: id.to_string(), code, message }
        }
        _ => ArmError::InvalidRequest { status, code, message },
    }
}

/// The error once retries are exhausted.
fn exhausted(answer: Result<Response, String>, attempts: u32, endpoint: &Url) -> ArmError {
    match answer {
        Err(detail) => ArmError::Transport { endpoint: endpoint.as_str().trim_end_matches('/').to_string(), attempts, detail },
        Ok(response) => {
            let retry_after_secs = response.retry_after().map(|d| d.as_secs());
            let ArmFailure { status, code, message } = response.failure();
            match status {
                429 => ArmError::Throttled { attempts, retry_after_secs, code, message },
                409 => ArmError::Conflict { attempts, code, message },
                _ => ArmError::Unavailable { status, attempts, code, message },
            }
        }
    }
}

/// Answers worth another attempt: ARM throttling (429), concurrent writes (409), timeouts and
/// server errors.
fn is_retryable(status: u16) -> bool {
    matches!(status, 408 | 409 | 429) || status >= 500
}

/// `Retry-After` in seconds (what ARM sends); an HTTP date is not expected and ignored.
fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn build_request(method: &Method, url: &Url, body: &Bytes, token: &AccessToken) -> Result<http::Request<Full<Bytes>>, ArmError> {
    let mut authorization = HeaderValue::from_str(&format!("Bearer {}", token.secret()))
        .map_err(|_| ArmError::UnexpectedResponse { detail: "Microsoft Entra issued an access token that is not a valid header value".into() })?;
    authorization.set_sensitive(true);
    let mut builder = http::Request::builder().method(method.clone()).uri(url.as_str()).header(http::header::AUTHORIZATION, authorization);
    builder = builder.header(http::header::ACCEPT, "application/json");
    if !body.is_empty() {
        builder = builder.header(http::header::CONTENT_TYPE, "application/json");
    }
    builder
        .header(http::header::USER_AGENT, concat!("mongo-replicator/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(body.clone()))
        .map_err(|err| ArmError::InvalidResourceId { kind: "an ARM", id: url.path().to_string(), detail: err.to_string() })
}

/// Replaces the token, and anything shaped like a JWT, in text that may be shown or logged.
fn redact_tokens(text: &str, secret: &str) -> String {
    let text = if secret.len() >= 8 { text.replace(secret, "***") } else { text.to_string() };
    redact_jwts(&text)
}

/// `eyJ…` runs of base64url with two dots (a JWT) become `***`.
fn redact_jwts(text: &str) -> String {
    let is_jwt_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("eyJ") {
        let run_len = rest[start..].find(|c: char| !is_jwt_char(c)).unwrap_or(rest.len() - start);
        let run = &rest[start..start + run_len];
        out.push_str(&rest[..start]);
        out.push_str(if run.matches('.').count() >= 2 { "***" } else { run });
        rest = &rest[start + run_len..];
    }
    out.push_str(rest);
    out
}

fn parse_endpoint(endpoint: &str) -> Result<Url, ArmError> {
    let invalid = |detail: &str| ArmError::InvalidEndpoint { endpoint: endpoint.to_string(), detail: detail.to_string() };
    let url = Url::parse(endpoint.trim()).map_err(|err| invalid(&err.to_string()))?;
    if url.scheme() != "https" {
        return Err(invalid("it must be an https URL: every request carries a bearer token"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("it has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("it must be a plain base URL such as https://management.azure.com/"));
    }
    Ok(url)
}

fn resource_url(endpoint: &Url, path: &str, api_version: &str) -> Result<Url, ArmError> {
    let base = endpoint.as_str().trim_end_matches('/');
    Url::parse(&format!("{base}{path}?api-version={api_version}")).map_err(|err| ArmError::InvalidResourceId {
        kind: "an ARM",
        id: path.to_string(),
        detail: err.to_string(),
    })
}

fn follow_link(endpoint: &Url, link: &str) -> Result<Url, ArmError> {
    let url = endpoint.join(link).map_err(|err| ArmError::UnexpectedResponse { detail: format!("ARM handed back an invalid URL: {err}") })?;
    if url.origin() != endpoint.origin() {
        return Err(ArmError::UnexpectedResponse {
            detail: format!(
                "ARM pointed to {} (not {}); the access token is only sent to the configured endpoint",
                url.origin().ascii_serialization(),
                endpoint.origin().ascii_serialization()
            ),
        });
    }
    Ok(url)
}

/// Splits `/subscriptions/{sub}/resourceGroups/{rg}/providers/{namespace}/{type}/{name}` and
/// checks the provider and type (case-insensitively, as ARM). Returns the normalised id.
fn parse_resource_id(id: &str, kind: &'static str, namespace: &str, resource_type: &str) -> Result<String, ArmError> {
    let invalid = |detail: String| ArmError::InvalidResourceId { kind, id: id.to_string(), detail };
    let trimmed = id.trim().trim_matches('/');
    let segments: Vec<&str> = trimmed.split('/').collect();
    let expected = format!("/subscriptions/<subscription>/resourceGroups/<group>/providers/{namespace}/{resource_type}/<name>");
    if segments.len() != 8 {
        return Err(invalid(format!("expected {expected}")));
    }
    for (i, word) in [(0, "subscriptions"), (2, "resourceGroups"), (4, "providers"), (5, namespace), (6, resource_type)] {
        if !segments[i].eq_ignore_ascii_case(word) {
            return Err(invalid(format!("expected {expected}")));
        }
    }
    for segment in [segments[1], segments[3], segments[7]] {
        check_segment(segment).map_err(&invalid)?;
    }
    Ok(format!("/{trimmed}"))
}

/// A path segment that cannot change the path it is put in.
fn check_segment(segment: &str) -> Result<(), String> {
    if segment.is_empty() {
        return Err("a segment is empty".into());
    }
    if segment == "." || segment == ".." {
        return Err(format!("segment {segment:?} is not a name"));
    }
    match segment.chars().find(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#' | '%' | '\\' | '"')) {
        Some(c) => Err(format!("{c:?} is not allowed in {segment:?}")),
        None => Ok(()),
    }
}

/// A user-assigned managed identity's resource id.
#[derive(Clone, Debug, PartialEq, Eq)]
struct IdentityId(String);

impl IdentityId {
    fn parse(id: &str) -> Result<Self, ArmError> {
        parse_resource_id(id, "a user-assigned managed identity", "Microsoft.ManagedIdentity", "userAssignedIdentities").map(Self)
    }

    fn as_str(&self) -> &str {
        &self.0
    }

    /// What serialises writes: ARM compares resource ids case-insensitively.
    fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }

    fn credentials_path(&self) -> String {
        format!("{}/federatedIdentityCredentials", self.0)
    }

    fn credential_path(&self, name: &str) -> String {
        format!("{}/federatedIdentityCredentials/{name}", self.0)
    }
}

impl std::fmt::Display for IdentityId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An Azure DocumentDB (mongoClusters) resource id.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ClusterId(String);

impl ClusterId {
    fn parse(id: &str) -> Result<Self, ArmError> {
        parse_resource_id(id, "an Azure DocumentDB cluster", "Microsoft.DocumentDB", "mongoClusters").map(Self)
    }

    fn as_str(&self) -> &str {
        &self.0
    }

    fn users_path(&self) -> String {
        format!("{}/users", self.0)
    }

    fn user_path(&self, principal_id: &str) -> String {
        format!("{}/users/{principal_id}", self.0)
    }
}

impl std::fmt::Display for ClusterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `^[a-zA-Z0-9][a-zA-Z0-9-_]{2,119}$` (FACTS §3).
fn check_credential_name(name: &str) -> Result<(), ArmError> {
    let mut chars = name.chars();
    let first = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest = chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if first && rest && (3..=120).contains(&name.len()) { Ok(()) } else { Err(ArmError::InvalidCredentialName { name: name.to_string() }) }
}

/// Exactly one audience; issuer (an https URL), subject and audience non-empty, at most 600
/// characters, without wildcards (FACTS §3).
fn check_credential(name: &str, credential: &FederatedCredential) -> Result<(), ArmError> {
    let invalid = |detail: String| ArmError::InvalidCredential { name: name.to_string(), detail };
    if credential.audiences.len() != 1 {
        return Err(invalid(format!("it must have exactly one audience ({TOKEN_EXCHANGE_AUDIENCE}), not {}", credential.audiences.len())));
    }
    for (field, value) in [("issuer", &credential.issuer), ("subject", &credential.subject), ("audience", &credential.audiences[0])] {
        if value.trim().is_empty() {
            return Err(invalid(format!("the {field} is empty")));
        }
        let chars = value.chars().count();
        if chars > MAX_CLAIM_CHARS {
            return Err(invalid(format!("the {field} is {chars} characters long; at most {MAX_CLAIM_CHARS} are allowed")));
        }
        if value.contains('*') {
            return Err(invalid(format!("the {field} {value:?} contains '*'; wildcards are not supported")));
        }
    }
    match Url::parse(&credential.issuer) {
        Ok(url) if url.scheme() == "https" && url.host_str().is_some() => Ok(()),
        _ => Err(invalid(format!("the issuer {:?} is not an https URL (the cluster's OIDC issuer)", credential.issuer))),
    }
}

/// `^[a-zA-Z0-9-]*`, 1–63 characters: the principal's object id (FACTS §2).
fn check_principal_id(principal_id: &str) -> Result<(), ArmError> {
    if (1..=63).contains(&principal_id.len()) && principal_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        Ok(())
    } else {
        Err(ArmError::InvalidPrincipalId { principal_id: principal_id.to_string() })
    }
}

fn check_roles(roles: &[(String, String)]) -> Result<(), ArmError> {
    if roles.is_empty() {
        return Err(ArmError::InvalidRoles { detail: "at least one (db, role) is needed, e.g. (\"admin\", \"root\")".into() });
    }
    match roles.iter().find(|(db, role)| db.trim().is_empty() || role.trim().is_empty()) {
        Some((db, role)) => Err(ArmError::InvalidRoles { detail: format!("({db:?}, {role:?}) has an empty database or role") }),
        None => Ok(()),
    }
}

/// The PUT body of a cluster user: a service principal signing in with Entra (FACTS §2).
fn user_body(roles: &[(String, String)]) -> Value {
    let roles: Vec<Value> = roles.iter().map(|(db, role)| json!({"db": db, "role": role})).collect();
    json!({"properties": {
        "identityProvider": {"type": "MicrosoftEntraID", "properties": {"principalType": "servicePrincipal"}},
        "roles": roles,
    }})
}

/// A federated identity credential resource: `{id, name, type, properties: {…}}`.
fn credential_from(body: &[u8]) -> Result<FederatedCredential, ArmError> {
    #[derive(Deserialize)]
    struct Resource {
        properties: FederatedCredential,
    }
    serde_json::from_slice::<Resource>(body).map(|r| r.properties).map_err(|err| ArmError::UnexpectedResponse {
        detail: format!("a federated identity credential without issuer, subject and audiences: {err}"),
    })
}

#[derive(Deserialize)]
struct UserPage {
    #[serde(default)]
    value: Vec<NamedResource>,
    #[serde(rename = "nextLink")]
    next_link: Option<String>,
}

#[derive(Deserialize)]
struct NamedResource {
    name: String,
}

fn json_field(body: &[u8], path: &[&str]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    path.iter().try_fold(&value, |v, key| v.get(key))?.as_str().map(str::to_string)
}

fn provisioning_state(body: &[u8]) -> Option<String> {
    json_field(body, &["properties", "provisioningState"])
}

/// An operation that ended `Failed` or `Canceled`, with the operation's `error` when it has one.
fn operation_failed(operation: &str, body: &[u8], status: Option<&str>) -> ArmError {
    ArmError::OperationFailed {
        operation: operation.to_string(),
        status: status.unwrap_or("Failed").to_string(),
        code: json_field(body, &["error", "code"]).unwrap_or_else(|| "OperationFailed".into()),
        message: json_field(body, &["error", "message"]).map(|m| redact_jwts(&m)).unwrap_or_default(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LroKind {
    Create,
    Delete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Poll {
    AsyncOperation,
    Location,
    Resource,
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDENTITY: &str =
        "/subscriptions/3f2c4a1e-0000-4000-8000-00000000a2b1/resourceGroups/lab/providers/Microsoft.ManagedIdentity/userAssignedIdentities/repl";
    const CLUSTER: &str = "/subscriptions/3f2c4a1e-0000-4000-8000-00000000a2b1/resourceGroups/lab/providers/Microsoft.DocumentDB/mongoClusters/docs";

    fn endpoint() -> Url {
        parse_endpoint(PUBLIC_ENDPOINT).unwrap()
    }

    fn failure(status: u16, code: &str, message: &str) -> ArmFailure {
        ArmFailure { status, code: code.into(), message: message.into() }
    }

    #[test]
    fn urls_are_the_documented_paths_and_api_versions() {
        let identity = IdentityId::parse(IDENTITY).unwrap();
        let url = resource_url(&endpoint(), &identity.credential_path("repl-sa"), FEDERATED_CREDENTIAL_API_VERSION).unwrap();
        assert_eq!(url.as_str(), format!("https://management.azure.com{IDENTITY}/federatedIdentityCredentials/repl-sa?api-version=2024-11-30"));
        let cluster = ClusterId::parse(CLUSTER).unwrap();
        let url = resource_url(&endpoint(), &cluster.user_path("6f1c3c2e-0d4b"), MONGO_CLUSTER_API_VERSION).unwrap();
        assert_eq!(url.as_str(), format!("https://management.azure.com{CLUSTER}/users/6f1c3c2e-0d4b?api-version=2025-09-01"));
        let url = resource_url(&endpoint(), &cluster.users_path(), MONGO_CLUSTER_API_VERSION).unwrap();
        assert_eq!(url.as_str(), format!("https://management.azure.com{CLUSTER}/users?api-version=2025-09-01"));
        // A lab or sovereign endpoint without a trailing slash works the same.
        let lab = parse_endpoint("https://127.0.0.1:8443").unwrap();
        assert_eq!(resource_url(&lab, &cluster.users_path(), MONGO_CLUSTER_API_VERSION).unwrap().path(), format!("{CLUSTER}/users"));
    }

    #[test]
    fn resource_ids_are_checked_and_normalised() {
        let spaced = format!("  {}/ ", IDENTITY.to_lowercase());
        assert_eq!(IdentityId::parse(&spaced).unwrap().as_str(), IDENTITY.to_lowercase());
        assert_eq!(IdentityId::parse(IDENTITY.trim_start_matches('/')).unwrap().as_str(), IDENTITY);
        for bad in [
            CLUSTER,
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a/b",
            "/subscriptions//resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/..",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a?x=1",
            "/subscriptions/s/resourceGroups/r g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a",
            "",
        ] {
            let err = IdentityId::parse(bad).unwrap_err();
            assert_eq!(err.reason(), "InvalidResourceId", "{bad}");
        }
        let err = ClusterId::parse(IDENTITY).unwrap_err().to_string();
        assert!(err.contains("Microsoft.DocumentDB/mongoClusters"), "{err}");
    }

    #[test]
    fn credential_names_follow_the_arm_pattern() {
        for good in ["abc", "repl-sa", "a_b-c", "0ab", &"a".repeat(120)] {
            assert!(check_credential_name(good).is_ok(), "{good}");
        }
        for bad in ["ab", "-abc", "_abc", "a.bc", "a/bc", "ab c", "", &"a".repeat(121)] {
            assert_eq!(check_credential_name(bad).unwrap_err().reason(), "InvalidFederatedCredentialName", "{bad}");
        }
    }

    #[test]
    fn credentials_need_one_audience_an_https_issuer_and_no_wildcards() {
        let good = FederatedCredential::for_service_account("https://oidc.example/issuer/", "ns", "sa");
        assert_eq!(good.subject, "system:serviceaccount:ns:sa");
        assert!(check_credential("c", &good).is_ok());
        let with = |f: &dyn Fn(&mut FederatedCredential)| {
            let mut c = good.clone();
            f(&mut c);
            check_credential("c", &c).unwrap_err()
        };
        let cases: Vec<(ArmError, &str)> = vec![
            (with(&|c| c.audiences.push("api://other".into())), "exactly one audience"),
            (with(&|c| c.audiences.clear()), "exactly one audience"),
            (with(&|c| c.issuer = "http://oidc.example/".into()), "https URL"),
            (with(&|c| c.subject = "system:serviceaccount:ns:*".into()), "wildcards"),
            (with(&|c| c.subject = "x".repeat(601)), "601 characters"),
            (with(&|c| c.audiences = vec![" ".into()]), "audience is empty"),
        ];
        for (err, text) in cases {
            assert_eq!(err.reason(), "InvalidFederatedCredential");
            assert!(err.to_string().contains(text), "{err}");
        }
    }

    #[test]
    fn principal_ids_and_roles_are_checked() {
        assert!(check_principal_id("6f1c3c2e-0d4b-4a8e-9b1a-2c7d5e8f9a01").is_ok());
        for bad in ["", "a_b", "dot.ted", &"a".repeat(64)] {
            assert_eq!(check_principal_id(bad).unwrap_err().reason(), "InvalidPrincipalId", "{bad}");
        }
        assert_eq!(check_roles(&[]).unwrap_err().reason(), "InvalidClusterUserRoles");
        assert!(check_roles(&[("admin".into(), "".into())]).is_err());
        let roles = [("admin".to_string(), "root".to_string())];
        assert!(check_roles(&roles).is_ok());
        assert_eq!(
            user_body(&roles),
            json!({"properties":{"identityProvider":{"type":"MicrosoftEntraID","properties":{"principalType":"servicePrincipal"}},"roles":[{"db":"admin","role":"root"}]}})
        );
    }

    #[test]
    fn arm_refusals_map_to_stable_reasons() {
        let identity = IdentityId::parse(IDENTITY).unwrap();
        let cluster = ClusterId::parse(CLUSTER).unwrap();
        let write = Target::CredentialWrite(&identity);
        let cases = [
            (
                refusal(
                    failure(
                        404,
                        "ResourceNotFound",
                        "The Resource 'Microsoft.ManagedIdentity/userAssignedIdentities/repl' under resource group 'lab' was not found.",
                    ),
                    &write,
                ),
                "IdentityNotFound",
            ),
            (
                refusal(
                    failure(404, "ResourceNotFound", "The Resource 'Microsoft.DocumentDB/mongoClusters/docs' was not found."),
                    &Target::Cluster(&cluster),
                ),
                "ClusterNotFound",
            ),
            (
                refusal(failure(400, "BadRequest", "Issuer and subject combination already exists for this Managed Identity."), &write),
                "DuplicateIssuerSubject",
            ),
            (
                refusal(
                    failure(
                        400,
                        "BadRequest",
                        "The managed identity 'x' already has 20 federated identity credentials, the maximum allowed is 20: cannot create 'y'.",
                    ),
                    &write,
                ),
                "FederatedCredentialLimit",
            ),
            (refusal(failure(400, "BadRequest", "The issuer 'x' is not a valid https URL."), &write), "ArmInvalidRequest"),
            (
                refusal(
                    failure(400, "NoRegisteredProviderFound", "No registered resource provider found for API version '2023-01-31'."),
                    &Target::Cluster(&cluster),
                ),
                "ArmInvalidRequest",
            ),
            (refusal(failure(401, "InvalidAuthenticationToken", "The access token is invalid."), &write), "ArmUnauthorized"),
            (refusal(failure(403, "AuthorizationFailed", "The client does not have authorization."), &write), "ArmForbidden"),
        ];
        for (err, reason) in cases {
            assert_eq!(err.reason(), reason, "{err}");
            assert!(!err.is_transient(), "{err}");
        }
        let err = refusal(failure(400, "BadRequest", "Issuer and subject combination already exists for this Managed Identity."), &write);
        assert!(err.to_string().contains("BadRequest: Issuer and subject combination already exists"), "{err}");
    }

    fn response(status: u16, headers: &[(&str, &str)], body: &str) -> Response {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        Response::new(status, map, Bytes::from(body.to_string()), "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl")
    }

    #[test]
    fn exhausted_retries_say_what_kept_failing() {
        let endpoint = endpoint();
        let throttled =
            response(429, &[("retry-after", "7")], r#"{"error":{"code":"TooManyRequests","message":"Please try again after 7 seconds."}}"#);
        let err = exhausted(Ok(throttled), 6, &endpoint);
        assert_eq!((err.reason().as_str(), err.retry_after(), err.is_transient()), ("ArmThrottled", Some(Duration::from_secs(7)), true));
        let conflict = response(
            409,
            &[],
            r#"{"error":{"code":"ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity","message":"Concurrent writes are not supported."}}"#,
        );
        let err = exhausted(Ok(conflict), 6, &endpoint);
        assert_eq!(err.reason(), "ArmConflict");
        assert!(err.to_string().contains("ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity"), "{err}");
        let err = exhausted(Ok(response(503, &[], "<html>Service Unavailable</html>")), 6, &endpoint);
        assert_eq!(err.reason(), "ArmUnavailable");
        assert!(err.to_string().contains("HTTP503: <html>Service Unavailable</html>"), "{err}");
        let err = exhausted(Err("connection refused".into()), 6, &endpoint);
        assert_eq!(err.reason(), "ArmUnreachable");
        assert!(err.to_string().contains("https://management.azure.com") && err.to_string().contains("connection refused"), "{err}");
    }

    #[test]
    fn tokens_never_reach_error_messages() {
        let secret = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
        let body =
            format!(r#"{{"error":{{"code":"InvalidAuthenticationToken","message":"The access token '{secret}' is invalid; also eyJa.eyJb.c"}}}}"#);
        let answer = response(401, &[], &body);
        let err = answer.refusal(&Target::Other);
        let text = err.to_string();
        assert!(!text.contains("eyJ") && text.contains("The access token '***' is invalid; also ***"), "{text}");
        assert_eq!(redact_jwts("no token here: eyJnotajwt"), "no token here: eyJnotajwt");
        assert_eq!(redact_tokens("refused opaque-secret-value.", "opaque-secret-value"), "refused ***.");
    }

    #[test]
    fn retries_honour_retry_after_back_off_with_jitter_and_stop_within_bounds() {
        let policy = RetryPolicy::default();
        // Retry-After is honoured as given; other retryable answers take the policy's backoff.
        let throttled = Attempt::Retryable(Ok(response(429, &[("retry-after", "7")], "{}")));
        assert_eq!(throttled.decision(), Decision::RetryAfter(Duration::from_secs(7)));
        assert_eq!(Attempt::Retryable(Ok(response(503, &[], "{}"))).decision(), Decision::Retry);
        assert_eq!(Attempt::Retryable(Err("refused".into())).decision(), Decision::Retry);
        assert_eq!(Attempt::Final(ArmError::Cancelled).decision(), Decision::Stop);
        // Backoff doubles from 500 ms, jittered between half and all of it, within 6 attempts and 120 s.
        let schedule = policy.schedule();
        let first = schedule.backoff().next().unwrap();
        assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500), "{first:?}");
        assert_eq!((schedule.max_attempts, schedule.budget), (Some(6), Some(Duration::from_secs(120))));
        assert!(is_retryable(429) && is_retryable(409) && is_retryable(500) && is_retryable(503) && is_retryable(408));
        assert!(!is_retryable(400) && !is_retryable(401) && !is_retryable(403) && !is_retryable(404) && !is_retryable(202));
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn links_are_followed_only_to_the_endpoint() {
        let endpoint = endpoint();
        let next = format!("https://management.azure.com{CLUSTER}/users?api-version=2025-09-01&$skipToken=2");
        assert_eq!(follow_link(&endpoint, &next).unwrap().as_str(), next);
        for elsewhere in ["https://evil.example/op", "http://management.azure.com/op", "https://management.azure.com:8443/op"] {
            let err = follow_link(&endpoint, elsewhere).unwrap_err();
            assert_eq!(err.reason(), "ArmUnexpectedResponse", "{elsewhere}");
        }
    }

    #[test]
    fn endpoints_must_be_plain_https_urls() {
        assert!(parse_endpoint("https://management.usgovcloudapi.net/").is_ok());
        for bad in ["http://management.azure.com/", "management.azure.com", "https://management.azure.com/?x=1", "https://u:p@management.azure.com/"]
        {
            assert_eq!(parse_endpoint(bad).unwrap_err().reason(), "InvalidArmEndpoint", "{bad}");
        }
    }

    #[test]
    fn arm_bodies_are_read_leniently() {
        let body = br#"{"id":"x","name":"repl-sa","type":"Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials","properties":{"issuer":"https://i/","subject":"s","audiences":["api://AzureADTokenExchange"]}}"#;
        assert_eq!(
            credential_from(body).unwrap(),
            FederatedCredential { issuer: "https://i/".into(), subject: "s".into(), audiences: vec![TOKEN_EXCHANGE_AUDIENCE.into()] }
        );
        assert_eq!(credential_from(b"{}").unwrap_err().reason(), "ArmUnexpectedResponse");
        assert_eq!(provisioning_state(br#"{"properties":{"provisioningState":"InProgress"}}"#).as_deref(), Some("InProgress"));
        let failed = operation_failed("op", br#"{"status":"Failed","error":{"code":"InternalServerError","message":"boom"}}"#, Some("Failed"));
        assert_eq!(failed.reason(), "ArmOperationFailed");
        assert_eq!(failed.to_string(), "op ended Failed (InternalServerError: boom)");
        let page: UserPage = serde_json::from_slice(br#"{"value":[{"name":"a"},{"name":"b"}],"nextLink":"https://x/next"}"#).unwrap();
        assert_eq!((page.value.len(), page.next_link.as_deref()), (2, Some("https://x/next")));
    }

    #[tokio::test]
    async fn writes_under_one_identity_take_turns_and_the_lock_map_empties() {
        let locks = WriteLocks::default();
        let first = locks.acquire("/a").await;
        let other = locks.acquire("/b").await; // another identity does not wait
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _turn = locks.acquire("/a").await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "a second writer of /a went while the first held its turn");
        drop(first);
        waiter.await.unwrap();
        drop(other);
        assert_eq!(locks.len(), 0);
    }
}
