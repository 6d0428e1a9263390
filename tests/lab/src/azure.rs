//! The Azure side of the lab in one place: the Entra and ARM doubles wired to each other, a
//! DocumentDB login gateway per cluster, and what a pod with workload identity would hold.
//!
//! Identities, federated credentials and cluster users are created through the ARM double's
//! HTTP API, as an administrator (or the operator) would, with a management token from the
//! Entra double; the Entra double then trusts what ARM holds.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::arm::{ArmDouble, ArmOptions, BearerCheck};
use crate::entra::{Directory, EntraDouble, EntraOptions, RegisteredCredential, RegisteredIdentity, TOKEN_EXCHANGE_AUDIENCE};
use crate::gateway::{OidcGateway, TokenGrant, TokenVerifier};
use crate::https::HttpsClient;
use crate::jwt::{self, SigningKey};
use crate::kube::KubeLab;
use crate::pki::LabCa;
use crate::{RunDir, SecantusServer};

/// Azure DocumentDB's token audience (the scope without `/.default`).
pub const DOCUMENTDB_AUDIENCE: &str = "https://ossrdbms-aad.database.windows.net";
const MANAGEMENT_AUDIENCE: &str = "https://management.azure.com";
const SUBSCRIPTION: &str = "3f2c4a1e-0000-4000-8000-00000000a2b1";

/// A user-assigned managed identity created in the doubles.
#[derive(Clone, Debug)]
pub struct LabIdentity {
    pub name: String,
    pub resource_id: String,
    pub client_id: String,
    pub principal_id: String,
}

/// Entra + ARM doubles, with a CA their certificates (and the gateways') come from.
pub struct AzureLab {
    pub entra: EntraDouble,
    pub arm: Arc<ArmDouble>,
    ca: LabCa,
    http: HttpsClient,
    tenant_id: String,
    extra_ips: Vec<IpAddr>,
    dir: RunDir,
}

fn guid() -> String {
    let n: u128 = rand::random();
    let h = format!("{n:032x}");
    format!("{}-{}-4{}-8{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

impl AzureLab {
    /// Starts the doubles; the Entra double trusts `kube`'s CA to read its issuer's keys.
    pub async fn start(kube: &KubeLab, options: EntraOptions) -> Result<Self> {
        Self::start_with_ips(kube, options, &[]).await
    }

    /// Like [`AzureLab::start`], with certificates (doubles and gateways) that also name
    /// `extra_ips`: the node's bridge address, where pods reach the doubles through a relay.
    pub async fn start_with_ips(kube: &KubeLab, options: EntraOptions, extra_ips: &[IpAddr]) -> Result<Self> {
        let dir = RunDir::new("azure")?;
        let ca = LabCa::create(dir.path())?;
        let options = EntraOptions { issuer_ca_pem: kube.ca().ca_pem(), ..options };
        let entra = EntraDouble::start(&ca.issue_server_with_ips("entra", &[], extra_ips)?, options).await?;
        let tenant_id = guid();
        entra.add_tenant(&tenant_id);
        let management = entra.verifier(MANAGEMENT_AUDIENCE);
        let bearer: BearerCheck = Arc::new(move |token| management(token).map(|_| ()));
        let arm = Arc::new(ArmDouble::start(&ca.issue_server_with_ips("arm", &[], extra_ips)?, bearer, ArmOptions::default()).await?);
        let for_entra = arm.clone();
        let directory: Directory = Arc::new(move |client_id| {
            let identity = for_entra.identity_by_client_id(client_id)?;
            Some(RegisteredIdentity {
                client_id: identity.client_id,
                principal_id: identity.principal_id,
                tenant_id: identity.tenant_id,
                credentials: identity
                    .credentials
                    .into_iter()
                    .map(|c| RegisteredCredential { issuer: c.issuer, subject: c.subject, audiences: c.audiences, created_at: c.created_at })
                    .collect(),
            })
        });
        entra.set_directory(directory);
        let http = HttpsClient::trusting(&ca.ca_pem())?;
        Ok(Self { entra, arm, ca, http, tenant_id, extra_ips: extra_ips.to_vec(), dir })
    }

    pub fn tenant_id(&self) -> &str {
        &self.tenant_id
    }

    /// The CA file that signs the doubles' and gateways' certificates.
    pub fn ca_file(&self) -> &Path {
        self.ca.ca_file()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn admin_token(&self) -> String {
        self.entra.mint(&self.tenant_id, &guid(), &guid(), MANAGEMENT_AUDIENCE, Duration::from_secs(3600))
    }

    /// A new user-assigned managed identity (created out of band, as `az identity create` would).
    pub fn create_identity(&self, name: &str) -> LabIdentity {
        let resource_id =
            format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/lab/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}");
        let identity = LabIdentity { name: name.into(), resource_id, client_id: guid(), principal_id: guid() };
        self.arm.add_identity(&identity.resource_id, &identity.client_id, &identity.principal_id, &self.tenant_id);
        identity
    }

    /// Creates a federated identity credential through ARM (FACTS §3).
    pub async fn add_federated_credential(&self, identity: &LabIdentity, name: &str, issuer: &str, subject: &str, audience: &str) -> Result<()> {
        let url = format!("{}{}/federatedIdentityCredentials/{name}?api-version=2024-11-30", self.arm.url(), identity.resource_id);
        let body = json!({"properties": {"issuer": issuer, "subject": subject, "audiences": [audience]}});
        let (status, answer, _) = self.http.json("PUT", &url, Some(&self.admin_token()), Some(&body)).await?;
        if !matches!(status, 200 | 201) {
            bail!("creating federated credential {name}: HTTP {status}: {answer}");
        }
        Ok(())
    }

    /// A new Azure DocumentDB cluster (Entra allowed) and its resource id.
    pub fn create_cluster(&self, name: &str) -> String {
        let id = format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/lab/providers/Microsoft.DocumentDB/mongoClusters/{name}");
        self.arm.add_cluster(&id, &["NativeAuth", "MicrosoftEntraID"]);
        id
    }

    /// Registers a principal as a cluster user through ARM and waits for the long-running
    /// operation to succeed (FACTS §2).
    pub async fn register_cluster_user(&self, cluster: &str, principal_id: &str) -> Result<()> {
        let url = format!("{}{cluster}/users/{principal_id}?api-version=2025-09-01", self.arm.url());
        let body = json!({"properties": {
            "identityProvider": {"type": "MicrosoftEntraID", "properties": {"principalType": "servicePrincipal"}},
            "roles": [{"db": "admin", "role": "root"}]}});
        let token = self.admin_token();
        let (status, answer, headers) = self.http.json("PUT", &url, Some(&token), Some(&body)).await?;
        if !matches!(status, 200 | 201) {
            bail!("registering cluster user {principal_id}: HTTP {status}: {answer}");
        }
        let operation = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("azure-asyncoperation"))
            .map(|(_, v)| v.clone())
            .context("no Azure-AsyncOperation header")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, state, _) = self.http.json("GET", &operation, Some(&token), None).await?;
            match state["status"].as_str() {
                Some("Succeeded") => return Ok(()),
                Some("InProgress") | None if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => bail!("cluster user operation ended as {state}"),
            }
        }
    }

    /// A DocumentDB login gateway for `cluster` in front of `backend`: tokens must be signed by
    /// the Entra double, for DocumentDB's audience, unexpired, and name a registered user.
    pub async fn gateway(&self, backend: &SecantusServer, cluster: &str) -> Result<OidcGateway> {
        let verify = self.entra.verifier(DOCUMENTDB_AUDIENCE);
        let arm = self.arm.clone();
        let cluster = cluster.to_string();
        let verifier: TokenVerifier = Arc::new(move |token| {
            let claims = verify(token)?;
            let oid = claims["oid"].as_str().unwrap_or_default().to_string();
            if !arm.is_cluster_user(&cluster, &oid) {
                return Err(format!("principal {oid} is not a user of the cluster"));
            }
            let exp = claims["exp"].as_u64().unwrap_or_default();
            Ok(TokenGrant { principal: oid, expires_at: UNIX_EPOCH + Duration::from_secs(exp) })
        });
        let cert = self.ca.issue_server_with_ips(&format!("gateway-{}", rand::random::<u32>()), &[], &self.extra_ips)?;
        OidcGateway::start(backend.port(), &cert, verifier).await
    }

    /// The connection string of a gateway, as DocumentDB's (no credentials).
    pub fn gateway_uri(&self, gateway: &OidcGateway) -> String {
        format!(
            "mongodb://127.0.0.1:{}/?directConnection=true&tls=true&tlsCAFile={}&authMechanism=MONGODB-OIDC",
            gateway.port(),
            self.ca_file().display()
        )
    }
}

/// What a pod with workload identity holds: a projected service-account token in a file.
pub struct PodIdentity {
    pub namespace: String,
    pub service_account: String,
    pub token_file: PathBuf,
}

impl PodIdentity {
    /// Mints a token with the TokenRequest API (audience `api://AzureADTokenExchange`, 1 hour,
    /// as the webhook's projected volume) and writes it where the pod would read it.
    pub async fn mint(kube: &KubeLab, dir: &Path, namespace: &str, service_account: &str) -> Result<Self> {
        Self::mint_with_audience(kube, dir, namespace, service_account, TOKEN_EXCHANGE_AUDIENCE).await
    }

    pub async fn mint_with_audience(kube: &KubeLab, dir: &Path, namespace: &str, service_account: &str, audience: &str) -> Result<Self> {
        let token = kube.service_account_token(namespace, service_account, audience, 3600).await?;
        let token_file = dir.join(format!("{namespace}-{service_account}-{}.token", rand::random::<u32>()));
        std::fs::write(&token_file, token)?;
        Ok(Self { namespace: namespace.into(), service_account: service_account.into(), token_file })
    }

    /// `system:serviceaccount:<namespace>:<name>`
    pub fn subject(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.service_account)
    }

    /// Replaces the token with one the apiserver's key signed but that expired a minute ago:
    /// what a pod holds when its token stopped being refreshed.
    pub fn expire(&self, kube: &KubeLab) -> Result<()> {
        let token = std::fs::read_to_string(&self.token_file)?;
        let parsed = jwt::decode(&token).map_err(|e| anyhow::anyhow!("{e}"))?;
        let kid = parsed.header["kid"].as_str().unwrap_or_default().to_string();
        let mut claims: Value = parsed.claims;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
        claims["iat"] = json!(now - 3700);
        claims["nbf"] = json!(now - 3700);
        claims["exp"] = json!(now - 60);
        let key = SigningKey::from_file(&kube.service_account_signing_key(), &kid)?;
        std::fs::write(&self.token_file, key.sign(&claims))?;
        Ok(())
    }
}
