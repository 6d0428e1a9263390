//! The in-crate OIDC client: logs in to Azure DocumentDB with MONGODB-OIDC by exchanging the
//! pod's projected service-account token for a Microsoft Entra access token.
//!
//! The driver's built-in Azure mode asks IMDS, which a pod with workload identity does not use,
//! so each `auth: entra` endpoint gets a machine callback backed by a [`TokenSource`]: one per
//! identity (authority, tenant, client id, scope, token file), shared by every connection of
//! every client that uses it. A token source makes one Entra call at a time, hands out its
//! cached token until it is near expiry, and fetches a new one early; when the driver comes back
//! with the token it was given (the server refused it or said it expired), it fetches a new one
//! instead of returning the same token again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, Transport};
use azure_identity::{ClientAssertionCredentialOptions, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions};
use futures::FutureExt;
use mongodb::options::oidc::{Callback, CallbackContext, IdpServerResponse};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::entra::EntraError;
use crate::crd::DOCUMENTDB_SCOPE;
use crate::error_chain::causes;
use crate::https::{HttpsTransport, TransportError};
use crate::reason::Reason;

/// Public-cloud authority, used when neither the settings nor `AZURE_AUTHORITY_HOST` name one.
pub const PUBLIC_AUTHORITY_HOST: &str = "https://login.microsoftonline.com/";
/// Longest a refresh waits when the driver gives no deadline.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);
/// Tokens are renewed this long before they expire (azure_identity uses the same margin)...
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

/// Where and as whom to ask Microsoft Entra for tokens. Missing values come from the variables
/// the workload identity webhook injects (`AZURE_CLIENT_ID`, `AZURE_TENANT_ID`,
/// `AZURE_FEDERATED_TOKEN_FILE`, `AZURE_AUTHORITY_HOST`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Identity {
    pub client_id: String,
    pub tenant_id: String,
    pub scope: String,
    pub authority_host: String,
    pub token_file: PathBuf,
    /// Extra CA certificates (PEM) to trust for the authority host.
    pub ca_file: Option<PathBuf>,
}

/// Why no token could be had.
#[derive(Clone, Debug, thiserror::Error)]
pub enum TokenError {
    #[error("Microsoft Entra refused the token request for client {client_id}: {error}")]
    Refused { client_id: String, error: EntraError },
    #[error(
        "cannot read the service-account token file {path}: {detail}; is the pod labelled azure.workload.identity/use=true and its ServiceAccount annotated?"
    )]
    TokenFile { path: String, detail: String },
    #[error("Microsoft Entra at {authority} is unreachable: {detail}")]
    Unreachable { authority: String, detail: String },
    #[error("Microsoft Entra at {authority} did not answer within {millis} ms (the driver's deadline)")]
    Timeout { authority: String, millis: u64 },
    #[error("invalid workload identity settings: {0}")]
    Settings(String),
}

impl TokenError {
    /// Stable reason for conditions, Events and metric labels.
    pub fn reason(&self) -> Reason {
        match self {
            TokenError::Refused { error, .. } => error.failure.reason(),
            TokenError::TokenFile { .. } => Reason::ServiceAccountTokenUnreadable,
            TokenError::Unreachable { .. } => Reason::EntraUnreachable,
            TokenError::Timeout { .. } => Reason::EntraTimeout,
            TokenError::Settings(_) => Reason::EntraSettingsInvalid,
        }
    }

    /// Whether trying again later may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            TokenError::Refused { error, .. } => error.failure.may_pass_with_time() || error.status == 429 || error.status >= 500,
            TokenError::Unreachable { .. } | TokenError::Timeout { .. } => true,
            TokenError::TokenFile { .. } | TokenError::Settings(_) => false,
        }
    }

    /// The metric label: the AADSTS code when Entra gave one, else the reason.
    fn code_label(&self) -> String {
        match self {
            TokenError::Refused { error, .. } if error.failure.code() != 0 => error.failure.code().to_string(),
            TokenError::Refused { error, .. } => format!("HTTP{}", error.status),
            other => other.reason().to_string(),
        }
    }
}

/// An access token. Its `Debug` never shows the token.
#[derive(Clone)]
pub struct AccessToken {
    secret: String,
    pub expires_at: Instant,
    pub lifetime: Duration,
    /// Counts the tokens a source has fetched; tells the source which token a caller holds.
    pub generation: u64,
}

impl AccessToken {
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Whether it is time to fetch the next token: within five minutes of expiry, or past half
    /// its life for short-lived tokens (so there is always time left to fetch a new one).
    fn should_refresh(&self, now: Instant) -> bool {
        let margin = REFRESH_MARGIN.min(self.lifetime / 2);
        now + margin >= self.expires_at
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken").field("expires_at", &self.expires_at).field("generation", &self.generation).finish_non_exhaustive()
    }
}

/// The Entra metrics, registered once; shared by every token source.
#[derive(Clone, Debug)]
pub struct EntraMetrics {
    acquisitions: Family<ClientLabel, Counter>,
    duration: Family<ClientLabel, Histogram, fn() -> Histogram>,
    failures: Family<FailureLabel, Counter>,
    reauthentications: Family<EndpointLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabel {
    client_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabel {
    client_id: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: String,
}

fn duration_histogram() -> Histogram {
    // 5 ms doubling to ~20 s: Entra answers in tens to hundreds of milliseconds.
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

impl Default for EntraMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl EntraMetrics {
    pub fn new() -> Self {
        Self {
            acquisitions: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            failures: Family::default(),
            reauthentications: Family::default(),
        }
    }

    /// Adds the metrics to `registry` (the replicator's, prefixed `mongo_replicator`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "entra_token_acquisitions",
            "Access tokens obtained from Microsoft Entra, by managed identity client id. About one per \
             token lifetime per identity is healthy; many more mean tokens are refused by the database",
            self.acquisitions.clone(),
        );
        registry.register_with_unit(
            "entra_token_request_duration",
            "Time to obtain an access token from Microsoft Entra (successful or not)",
            Unit::Seconds,
            self.duration.clone(),
        );
        registry.register(
            "entra_token_failures",
            "Failed token requests, by client id and AADSTS code (70021 no federated credential, 700211/700212/700213 \
             issuer/audience/subject mismatch, 700024 expired service-account token, 700016 unknown identity, \
             90002 unknown tenant) or reason (EntraUnreachable, EntraTimeout, ServiceAccountTokenUnreadable)",
            self.failures.clone(),
        );
        registry.register(
            "mongodb_reauthentications",
            "MONGODB-OIDC re-authentications, by endpoint: the server refused or expired a token and the \
             driver asked for a new one",
            self.reauthentications.clone(),
        );
    }

    pub fn reauthentications(&self, endpoint: &str) -> u64 {
        self.reauthentications.get_or_create(&EndpointLabel { endpoint: endpoint.into() }).get()
    }

    pub fn acquisitions(&self, client_id: &str) -> u64 {
        self.acquisitions.get_or_create(&ClientLabel { client_id: client_id.into() }).get()
    }
}

/// Tokens for one identity: a cache, a single-flight refresh and the credential behind them.
pub struct TokenSource {
    identity: Identity,
    transport: Arc<HttpsTransport>,
    metrics: EntraMetrics,
    /// Held across a refresh, so concurrent callers wait for one Entra call.
    current: tokio::sync::Mutex<Option<AccessToken>>,
    generation: AtomicU64,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource").field("client_id", &self.identity.client_id).finish_non_exhaustive()
    }
}

impl TokenSource {
    pub fn new(identity: Identity, metrics: EntraMetrics) -> Result<Self, TokenError> {
        if !identity.authority_host.starts_with("https://") {
            return Err(TokenError::Settings(format!("authority host {} must be an https URL", identity.authority_host)));
        }
        let transport = HttpsTransport::new(identity.ca_file.as_deref()).map_err(|e: TransportError| TokenError::Settings(e.to_string()))?;
        Ok(Self { identity, transport: Arc::new(transport), metrics, current: tokio::sync::Mutex::new(None), generation: AtomicU64::new(0) })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// A token that is not near expiry. `refused` is the generation of a token the caller was
    /// refused with: when it is still the cached one, a new one is fetched regardless of age.
    pub async fn token(&self, refused: Option<u64>, deadline: Option<Instant>) -> Result<AccessToken, TokenError> {
        let asked = Instant::now();
        let deadline = deadline.unwrap_or_else(|| asked + DEFAULT_DEADLINE);
        let mut current = tokio::time::timeout_at(deadline.into(), self.current.lock()).await.map_err(|_| self.timeout(asked))?;
        if let Some(token) = current.as_ref()
            && !token.should_refresh(Instant::now())
            && refused != Some(token.generation)
        {
            return Ok(token.clone());
        }
        let fetched = match tokio::time::timeout_at(deadline.into(), self.fetch()).await {
            Ok(result) => result,
            Err(_) => Err(self.timeout(asked)),
        };
        match fetched {
            Ok(token) => {
                *current = Some(token.clone());
                Ok(token)
            }
            Err(err) => {
                self.metrics.failures.get_or_create(&FailureLabel { client_id: self.identity.client_id.clone(), code: err.code_label() }).inc();
                // A token in its refresh window still works; use it while Entra is unavailable.
                match current.as_ref() {
                    Some(token) if refused != Some(token.generation) && token.expires_at > Instant::now() && err.is_transient() => {
                        tracing::warn!(client_id = %self.identity.client_id, reason = %err.reason(), error = %err, "token refresh failed; using the current token until it expires");
                        Ok(token.clone())
                    }
                    _ => Err(err),
                }
            }
        }
    }

    fn timeout(&self, waited_since: Instant) -> TokenError {
        TokenError::Timeout { authority: self.identity.authority_host.clone(), millis: waited_since.elapsed().as_millis() as u64 }
    }

    /// One token request. A new credential each time: it re-reads the service-account token
    /// file (the kubelet rotates it) and has no cache of its own that could hand back a token
    /// the server just refused.
    async fn fetch(&self) -> Result<AccessToken, TokenError> {
        let started = Instant::now();
        let identity = &self.identity;
        let mut cloud = CustomConfiguration::default();
        cloud.authority_host = identity.authority_host.clone();
        let client_options = ClientOptions {
            transport: Some(Transport::new(self.transport.clone())),
            cloud: Some(Arc::new(CloudConfiguration::Custom(cloud))),
            ..Default::default()
        };
        let options = WorkloadIdentityCredentialOptions {
            client_id: Some(identity.client_id.clone()),
            tenant_id: Some(identity.tenant_id.clone()),
            token_file_path: Some(identity.token_file.clone()),
            credential_options: ClientAssertionCredentialOptions { client_options },
        };
        let credential = WorkloadIdentityCredential::new(Some(options)).map_err(|err| self.construction_error(err))?;
        let result = credential.get_token(&[identity.scope.as_str()], None).await;
        self.metrics.duration.get_or_create(&ClientLabel { client_id: identity.client_id.clone() }).observe(started.elapsed().as_secs_f64());
        let token = result.map_err(|err| self.request_error(err))?;
        let remaining = token.expires_on - azure_core::time::OffsetDateTime::now_utc();
        let lifetime = Duration::try_from(remaining).unwrap_or_default();
        self.metrics.acquisitions.get_or_create(&ClientLabel { client_id: identity.client_id.clone() }).inc();
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(client_id = %identity.client_id, lifetime_seconds = lifetime.as_secs(), elapsed_ms = started.elapsed().as_millis() as u64, "obtained a Microsoft Entra access token");
        Ok(AccessToken { secret: token.token.secret().to_string(), expires_at: started + lifetime, lifetime, generation })
    }

    fn construction_error(&self, err: azure_core::Error) -> TokenError {
        let text = err.to_string();
        if text.contains("token file") || text.contains("federated token") {
            let detail = std::fs::metadata(&self.identity.token_file).err().map(|e| e.kind().to_string()).unwrap_or_else(|| "unreadable".into());
            return TokenError::TokenFile { path: self.identity.token_file.display().to_string(), detail };
        }
        TokenError::Settings(text)
    }

    fn request_error(&self, err: azure_core::Error) -> TokenError {
        use azure_core::error::ErrorKind;
        // azure_identity wraps the HTTP error in a credential error; the answer is inside.
        let inner = err.downcast_ref::<azure_core::Error>().unwrap_or(&err);
        match inner.kind() {
            ErrorKind::HttpResponse { status, raw_response, .. } => {
                let body = raw_response.as_ref().map(|r| String::from_utf8_lossy(r.body()).into_owned()).unwrap_or_default();
                TokenError::Refused { client_id: self.identity.client_id.clone(), error: EntraError::parse(u16::from(*status), &body) }
            }
            ErrorKind::Io | ErrorKind::Connection => {
                TokenError::Unreachable { authority: self.identity.authority_host.clone(), detail: inner.to_string() }
            }
            _ => TokenError::Unreachable {
                authority: self.identity.authority_host.clone(),
                detail: causes(&err).last().map(ToString::to_string).unwrap_or_default(),
            },
        }
    }
}

/// One [`TokenSource`] per identity for the whole process.
#[derive(Clone, Default)]
pub struct TokenSources {
    sources: Arc<Mutex<HashMap<Identity, Arc<TokenSource>>>>,
    metrics: EntraMetrics,
}

impl TokenSources {
    pub fn new(metrics: EntraMetrics) -> Self {
        Self { sources: Arc::default(), metrics }
    }

    pub fn metrics(&self) -> &EntraMetrics {
        &self.metrics
    }

    pub fn get(&self, identity: &Identity) -> Result<Arc<TokenSource>, TokenError> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(source) = sources.get(identity) {
            return Ok(source.clone());
        }
        let source = Arc::new(TokenSource::new(identity.clone(), self.metrics.clone())?);
        sources.insert(identity.clone(), source.clone());
        Ok(source)
    }
}

/// The driver callback for one client: asks `source` for tokens and remembers which one it
/// handed out, so a second call with that token still current means the server refused it.
pub fn callback(source: Arc<TokenSource>, endpoint: &str, metrics: EntraMetrics) -> Callback {
    let endpoint = endpoint.to_string();
    let handed_out: Arc<Mutex<Option<u64>>> = Arc::default();
    Callback::machine(move |ctx: CallbackContext| {
        let source = source.clone();
        let handed_out = handed_out.clone();
        let endpoint = endpoint.clone();
        let metrics = metrics.clone();
        async move {
            let previous = *handed_out.lock().unwrap_or_else(|p| p.into_inner());
            if previous.is_some() {
                metrics.reauthentications.get_or_create(&EndpointLabel { endpoint: endpoint.clone() }).inc();
            }
            let token = source.token(previous, ctx.timeout).await.map_err(|err| {
                tracing::warn!(endpoint = %endpoint, reason = %err.reason(), error = %err, "no Microsoft Entra token for MONGODB-OIDC");
                mongodb::error::Error::custom(err)
            })?;
            *handed_out.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.generation);
            Ok(IdpServerResponse::builder().access_token(token.secret().to_string()).expires(Some(token.expires_at)).build())
        }
        .boxed()
    })
}

/// The token error behind a driver error, when the OIDC callback failed.
pub fn token_error(err: &mongodb::error::Error) -> Option<&TokenError> {
    err.get_custom::<TokenError>()
}

/// The scope to ask for when none is configured.
pub fn default_scope() -> &'static str {
    DOCUMENTDB_SCOPE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(lifetime: Duration, expires_in: Duration) -> AccessToken {
        AccessToken { secret: "t".into(), expires_at: Instant::now() + expires_in, lifetime, generation: 1 }
    }

    #[test]
    fn long_tokens_refresh_five_minutes_before_expiry_and_short_ones_at_half_life() {
        let now = Instant::now();
        assert!(!token(Duration::from_secs(3600), Duration::from_secs(301)).should_refresh(now));
        assert!(token(Duration::from_secs(3600), Duration::from_secs(299)).should_refresh(now));
        assert!(!token(Duration::from_secs(30), Duration::from_secs(16)).should_refresh(now));
        assert!(token(Duration::from_secs(30), Duration::from_secs(14)).should_refresh(now));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let t = AccessToken { secret: "eyJsecret".into(), expires_at: Instant::now(), lifetime: Duration::ZERO, generation: 3 };
        assert!(!format!("{t:?}").contains("eyJ"));
    }

    #[test]
    fn an_http_authority_is_refused() {
        let identity = Identity { authority_host: "http://login.example/".into(), ..Default::default() };
        let err = TokenSource::new(identity, EntraMetrics::new()).unwrap_err();
        assert_eq!(err.reason(), "EntraSettingsInvalid");
    }
}
