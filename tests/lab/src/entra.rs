//! A Microsoft Entra ID double: the token endpoint of workload identity federation (FACTS §1),
//! OIDC discovery and JWKS, over HTTPS on loopback.
//!
//! It does what Entra does with a client assertion: finds the managed identity by client id,
//! finds a federated identity credential for the assertion's issuer and subject, verifies the
//! signature with the issuer's published keys (fetched through the issuer's OIDC discovery, as
//! Entra does), checks the time window and audience, and answers with the AADSTS errors real
//! users see. Access tokens are RS256 JWTs signed with the double's own key.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};

use crate::https::{Handler, HttpRequest, HttpResponse, HttpsClient, HttpsServer};
use crate::jwt::{self, SigningKey};
use crate::pki::CertFiles;

/// The audience a projected service-account token must carry for Entra.
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A federated identity credential as Entra sees it.
#[derive(Clone, Debug)]
pub struct RegisteredCredential {
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
    pub created_at: Instant,
}

/// A managed identity as Entra sees it.
#[derive(Clone, Debug)]
pub struct RegisteredIdentity {
    pub client_id: String,
    pub principal_id: String,
    pub tenant_id: String,
    pub credentials: Vec<RegisteredCredential>,
}

/// Verifies an access token; its claims, or why it is refused.
pub type AccessTokenCheck = Arc<dyn Fn(&str) -> Result<Value, String> + Send + Sync>;

/// Looks a managed identity up by client id (the ARM double is the source of truth).
pub type Directory = Arc<dyn Fn(&str) -> Option<RegisteredIdentity> + Send + Sync>;

/// How the double behaves.
#[derive(Clone, Debug)]
pub struct EntraOptions {
    /// `expires_in` of issued tokens (Entra: 60–90 minutes).
    pub token_lifetime: Duration,
    /// For this long after a federated credential is created, requests still get 70021.
    pub propagation_delay: Duration,
    /// Resources (scope without `/.default`) this tenant issues tokens for.
    pub resources: Vec<String>,
    /// CA certificates (PEM) to trust when fetching an issuer's discovery document and keys.
    pub issuer_ca_pem: String,
    /// Extra latency before answering a token request.
    pub latency: Duration,
}

impl Default for EntraOptions {
    fn default() -> Self {
        Self {
            token_lifetime: Duration::from_secs(3599),
            propagation_delay: Duration::ZERO,
            resources: vec!["https://ossrdbms-aad.database.windows.net".into(), "https://management.azure.com".into()],
            issuer_ca_pem: String::new(),
            latency: Duration::ZERO,
        }
    }
}

struct State {
    key: SigningKey,
    options: RwLock<EntraOptions>,
    tenants: RwLock<HashSet<String>>,
    directory: RwLock<Option<Directory>>,
    issuer_keys: Mutex<HashMap<String, Value>>,
    token_requests: AtomicUsize,
    tokens_issued: AtomicUsize,
    authority: String,
}

/// The running double; stops when dropped.
pub struct EntraDouble {
    server: HttpsServer,
    state: Arc<State>,
}

impl EntraDouble {
    pub async fn start(cert: &CertFiles, options: EntraOptions) -> Result<Self> {
        let dir = crate::RunDir::new("entra-key")?;
        let key = SigningKey::generate(dir.path(), "entra-lab-1")?;
        // The port is known only after binding; the state learns its authority right after.
        let slot: Arc<RwLock<Option<Arc<State>>>> = Arc::default();
        let handler_slot = slot.clone();
        let handler: Handler = Arc::new(move |req| {
            let state = handler_slot.read().unwrap().clone();
            Box::pin(async move {
                match state {
                    Some(state) => handle(&state, req).await,
                    None => HttpResponse::empty(503),
                }
            })
        });
        let server = HttpsServer::start(cert, handler).await?;
        let state = Arc::new(State {
            key,
            options: RwLock::new(options),
            tenants: RwLock::default(),
            directory: RwLock::default(),
            issuer_keys: Mutex::default(),
            token_requests: AtomicUsize::new(0),
            tokens_issued: AtomicUsize::new(0),
            authority: format!("{}/", server.url()),
        });
        *slot.write().unwrap() = Some(state.clone());
        Ok(Self { server, state })
    }

    /// The authority host to give the product (`https://127.0.0.1:<port>/`).
    pub fn authority_host(&self) -> String {
        self.state.authority.clone()
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    pub fn add_tenant(&self, tenant_id: &str) {
        self.state.tenants.write().unwrap().insert(tenant_id.to_string());
    }

    pub fn set_directory(&self, directory: Directory) {
        *self.state.directory.write().unwrap() = Some(directory);
    }

    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.state.options.write().unwrap().token_lifetime = lifetime;
    }

    /// Extra time before each token answer (a slow or distant Entra).
    pub fn set_latency(&self, latency: Duration) {
        self.state.options.write().unwrap().latency = latency;
    }

    pub fn set_propagation_delay(&self, delay: Duration) {
        self.state.options.write().unwrap().propagation_delay = delay;
    }

    /// Token requests received (answered or refused).
    pub fn token_requests(&self) -> usize {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    pub fn tokens_issued(&self) -> usize {
        self.state.tokens_issued.load(Ordering::SeqCst)
    }

    /// The keys access tokens are signed with.
    pub fn jwks(&self) -> Value {
        self.state.key.jwks()
    }

    /// Signs an access token directly (for a test that needs, say, an ARM token without a pod).
    pub fn mint(&self, tenant_id: &str, principal_id: &str, client_id: &str, audience: &str, lifetime: Duration) -> String {
        self.state.key.sign(&access_claims(tenant_id, principal_id, client_id, audience, lifetime))
    }

    /// Verifies an access token this double issued for `audience`: signature, audience, time.
    /// Returns its claims.
    pub fn verify(&self, token: &str, audience: &str) -> Result<Value, String> {
        verify_access_token(&self.state.key.jwks(), token, audience)
    }

    /// A verifier closure for the other doubles.
    pub fn verifier(&self, audience: &str) -> AccessTokenCheck {
        let jwks = self.state.key.jwks();
        let audience = audience.to_string();
        Arc::new(move |token| verify_access_token(&jwks, token, &audience))
    }
}

/// Signature, audience and time checks of an access token.
pub fn verify_access_token(jwks: &Value, token: &str, audience: &str) -> Result<Value, String> {
    let claims = jwt::decode(token).map_err(|e| e.to_string())?.verify(jwks).map_err(|e| e.to_string())?;
    if !jwt::audiences(&claims).iter().any(|a| a == audience) {
        return Err(format!("audience {} is not {audience}", claims["aud"]));
    }
    jwt::check_time(&claims, 0).map_err(|e| format!("token {e}"))?;
    Ok(claims)
}

fn access_claims(tenant_id: &str, principal_id: &str, client_id: &str, audience: &str, lifetime: Duration) -> Value {
    let now = jwt::now_secs();
    // v1 tokens, as Azure database resources receive (FACTS §1).
    json!({
        "aud": audience,
        "iss": format!("https://sts.windows.net/{tenant_id}/"),
        "iat": now,
        "nbf": now,
        "exp": now + lifetime.as_secs() as i64,
        "oid": principal_id,
        "sub": principal_id,
        "tid": tenant_id,
        "appid": client_id,
        "uti": format!("{:x}", rand::random::<u64>()),
        "ver": "1.0",
    })
}

async fn handle(state: &State, req: HttpRequest) -> HttpResponse {
    let segments: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), segments.as_slice()) {
        ("POST", [tenant, "oauth2", "v2.0", "token"]) => {
            state.token_requests.fetch_add(1, Ordering::SeqCst);
            let latency = state.options.read().unwrap().latency;
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            token_endpoint(state, tenant, &req).await
        }
        ("GET", [tenant, "v2.0", ".well-known", "openid-configuration"]) => HttpResponse::json(
            200,
            &json!({
                "issuer": format!("{}{tenant}/v2.0", state.authority),
                "token_endpoint": format!("{}{tenant}/oauth2/v2.0/token", state.authority),
                "jwks_uri": format!("{}{tenant}/discovery/v2.0/keys", state.authority),
                "id_token_signing_alg_values_supported": ["RS256"],
            }),
        ),
        ("GET", [_, "discovery", "v2.0", "keys"]) => HttpResponse::json(200, &state.key.jwks()),
        _ => HttpResponse::json(404, &json!({"error": "not_found"})),
    }
}

/// An Entra error answer (FACTS §1 shape).
fn refuse(status: u16, error: &str, code: u32, text: &str) -> HttpResponse {
    let trace = format!("{:032x}", rand::random::<u128>());
    let correlation = format!("{:032x}", rand::random::<u128>());
    let timestamp = "2026-01-01 00:00:00Z";
    HttpResponse::json(
        status,
        &json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {text} Trace ID: {trace} Correlation ID: {correlation} Timestamp: {timestamp}"),
            "error_codes": [code],
            "timestamp": timestamp,
            "trace_id": trace,
            "correlation_id": correlation,
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
        }),
    )
}

async fn token_endpoint(state: &State, tenant: &str, req: &HttpRequest) -> HttpResponse {
    if tenant.is_empty() || !tenant.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') {
        return refuse(
            400,
            "invalid_request",
            900023,
            &format!("Specified tenant identifier '{tenant}' is neither a valid DNS name, nor a valid external domain."),
        );
    }
    if !state.tenants.read().unwrap().contains(tenant) {
        return refuse(
            400,
            "invalid_tenant",
            90002,
            &format!("Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."),
        );
    }
    let form = req.form();
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    if field("grant_type") != "client_credentials" {
        return refuse(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.");
    }
    if field("client_assertion_type") != ASSERTION_TYPE || field("client_assertion").is_empty() {
        return refuse(400, "invalid_request", 900144, "The request body must contain the following parameter: 'client_assertion'.");
    }
    let options = state.options.read().unwrap().clone();
    let scope = field("scope");
    let resource = scope.strip_suffix("/.default").unwrap_or_default();
    if scope.contains(' ') || !options.resources.iter().any(|r| r == resource) {
        return refuse(
            400,
            "invalid_scope",
            70011,
            &format!(
                "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid: {scope}."
            ),
        );
    }
    let client_id = field("client_id");
    let directory = state.directory.read().unwrap().clone();
    let identity = directory.and_then(|d| d(client_id)).filter(|i| i.tenant_id == tenant);
    let Some(identity) = identity else {
        return refuse(
            400,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant."
            ),
        );
    };
    let assertion = match jwt::decode(field("client_assertion")) {
        Ok(assertion) => assertion,
        Err(err) => return refuse(400, "invalid_client", 50027, &format!("JWT token is invalid or malformed: {err}.")),
    };
    let issuer = assertion.claims["iss"].as_str().unwrap_or_default().to_string();
    let subject = assertion.claims["sub"].as_str().unwrap_or_default().to_string();
    if identity.credentials.is_empty() {
        return refuse(400, "invalid_request", 70021, "No matching federated identity record found for presented assertion.");
    }
    let by_issuer: Vec<&RegisteredCredential> = identity.credentials.iter().filter(|c| c.issuer == issuer).collect();
    if by_issuer.is_empty() {
        return refuse(
            400,
            "invalid_request",
            700211,
            &format!(
                "No matching federated identity record found for presented assertion issuer '{issuer}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion."
            ),
        );
    }
    let keys = match issuer_keys(state, &issuer, &options.issuer_ca_pem).await {
        Ok(keys) => keys,
        Err(err) => {
            return refuse(400, "invalid_client", 50166, &format!("Request to External OIDC endpoint failed: {err}."));
        }
    };
    let claims = match assertion.verify(&keys) {
        Ok(claims) => claims,
        Err(err) => return refuse(401, "invalid_client", 700027, &format!("Client assertion failed signature validation: {err}.")),
    };
    if let Err(err) = jwt::check_time(&claims, 0) {
        return refuse(401, "invalid_client", 700024, &format!("Client assertion is not within its valid time range ({err})."));
    }
    let by_subject: Vec<&&RegisteredCredential> = by_issuer.iter().filter(|c| c.subject == subject).collect();
    if by_subject.is_empty() {
        return refuse(
            400,
            "invalid_request",
            700213,
            &format!(
                "No matching federated identity record found for presented assertion subject '{subject}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion."
            ),
        );
    }
    let presented = jwt::audiences(&claims);
    let Some(credential) = by_subject.iter().find(|c| c.audiences.iter().any(|a| presented.contains(a))) else {
        return refuse(
            400,
            "invalid_request",
            700212,
            &format!(
                "No matching federated identity record found for presented assertion audience '{}'. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion.",
                presented.join(",")
            ),
        );
    };
    if credential.created_at.elapsed() < options.propagation_delay {
        return refuse(400, "invalid_request", 70021, "No matching federated identity record found for presented assertion.");
    }
    let token = state.key.sign(&access_claims(tenant, &identity.principal_id, client_id, resource, options.token_lifetime));
    state.tokens_issued.fetch_add(1, Ordering::SeqCst);
    let lifetime = options.token_lifetime.as_secs();
    HttpResponse::json(200, &json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token}))
}

/// The issuer's signing keys, through its OIDC discovery document; cached per issuer.
async fn issuer_keys(state: &State, issuer: &str, ca_pem: &str) -> Result<Value> {
    if let Some(keys) = state.issuer_keys.lock().unwrap().get(issuer) {
        return Ok(keys.clone());
    }
    let client = HttpsClient::trusting(ca_pem)?;
    let discovery_url = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
    let (status, discovery, _) = client.json("GET", &discovery_url, None, None).await?;
    anyhow::ensure!(status == 200, "{discovery_url} answered {status}");
    let jwks_uri = discovery["jwks_uri"].as_str().ok_or_else(|| anyhow::anyhow!("no jwks_uri in {discovery_url}"))?;
    let (status, keys, _) = client.json("GET", jwks_uri, None, None).await?;
    anyhow::ensure!(status == 200, "{jwks_uri} answered {status}");
    state.issuer_keys.lock().unwrap().insert(issuer.to_string(), keys.clone());
    Ok(keys)
}
