//! Endpoint credentials: connection strings read from files or environment variables (mounted
//! Secrets), kept in a type that never prints them, Microsoft Entra workload identity
//! (MONGODB-OIDC, [`oidc`]), and the driver options built from them.

pub mod entra;
pub mod oidc;
pub mod transport;

use std::fmt;
use std::path::Path;

use mongodb::options::{AuthMechanism, ClientOptions, Credential, Tls, TlsOptions};

use crate::crd::AuthMethod;
use crate::replicator::config::{EndpointConfig, EndpointRole};

/// A connection string that may hold credentials. `Debug` and `Display` show it with the user
/// information and secret-bearing options replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString(String);

impl ConnectionString {
    pub fn new(uri: impl Into<String>) -> Self {
        Self(uri.into().trim().to_string())
    }

    /// The connection string itself, for the driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The connection string with credentials replaced by `***`.
    pub fn redacted(&self) -> String {
        let uri = &self.0;
        let Some((scheme, rest)) = uri.split_once("://") else {
            return "***".to_string();
        };
        let (authority_end, _) = rest.char_indices().find(|(_, c)| matches!(c, '/' | '?')).unwrap_or((rest.len(), ' '));
        let (authority, tail) = rest.split_at(authority_end);
        let hosts = match authority.rsplit_once('@') {
            Some((_, hosts)) => format!("***@{hosts}"),
            None => authority.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let params: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((k, _)) if is_secret_option(k) => format!("{k}=***"),
                        _ => pair.to_string(),
                    })
                    .collect();
                format!("{path}?{}", params.join("&"))
            }
            None => tail.to_string(),
        };
        format!("{scheme}://{hosts}{tail}")
    }

    /// Removes this connection string and its credentials from a text (an error message from
    /// the driver, say) before it is logged or shown.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.replace(&self.0, &self.redacted());
        if let Some((_, rest)) = self.0.split_once("://")
            && let Some((userinfo, _)) = rest.split('/').next().unwrap_or_default().rsplit_once('@')
            && let Some((_, password)) = userinfo.split_once(':')
            // Very short passwords would blank out unrelated text; the whole URI is gone anyway.
            && password.len() >= 3
        {
            out = out.replace(password, "***");
            out = out.replace(&percent_decode(password), "***");
        }
        out
    }
}

fn is_secret_option(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password") || key.contains("secret") || key.contains("token") || key == "authmechanismproperties"
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectionString({})", self.redacted())
    }
}

impl fmt::Display for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Why an endpoint's credentials could not be turned into driver options.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{role}: no connection string: set uriFile or uriEnv, or pass --{role}-uri (auth: connectionString)")]
    NoConnectionString { role: EndpointRole },
    #[error("{role}: cannot read the connection string from {path}: {reason}")]
    UnreadableSecret { role: EndpointRole, path: String, reason: String },
    #[error("{role}: environment variable {name} is not set or empty")]
    MissingEnv { role: EndpointRole, name: String },
    #[error("{role}: invalid connection string {redacted}: {detail}")]
    InvalidConnectionString { role: EndpointRole, redacted: String, detail: String },
    #[error("{role}: CA file {path} does not exist")]
    MissingCaFile { role: EndpointRole, path: String },
    #[error(
        "{role}: auth: entra needs the managed identity's {field}: set entra.{field} or the {env} environment variable (the workload identity webhook sets it when the pod is labelled azure.workload.identity/use=true)"
    )]
    EntraSettingMissing { role: EndpointRole, field: &'static str, env: &'static str },
    #[error("{role}: an auth: entra connection string must not carry a user name or password; Microsoft Entra tokens are the credentials")]
    CredentialsInEntraUri { role: EndpointRole },
    #[error("{role}: {source}")]
    Entra { role: EndpointRole, source: oidc::TokenError },
}

impl AuthError {
    /// Stable reason for conditions, Events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::NoConnectionString { .. } | AuthError::MissingEnv { .. } => "ConnectionStringMissing",
            AuthError::UnreadableSecret { .. } => "ConnectionStringUnreadable",
            AuthError::InvalidConnectionString { .. } => "ConnectionStringInvalid",
            AuthError::MissingCaFile { .. } => "CaFileMissing",
            AuthError::EntraSettingMissing { .. } => "EntraSettingMissing",
            AuthError::CredentialsInEntraUri { .. } => "CredentialsInEntraUri",
            AuthError::Entra { source, .. } => source.reason(),
        }
    }
}

/// Reads an endpoint's connection string from its file or environment variable.
pub fn connection_string(endpoint: &EndpointConfig, role: EndpointRole) -> Result<ConnectionString, AuthError> {
    if let Some(uri) = &endpoint.connection_string {
        return Ok(uri.clone());
    }
    if let Some(path) = &endpoint.uri_file {
        let text = std::fs::read_to_string(path).map_err(|err| AuthError::UnreadableSecret {
            role,
            path: path.display().to_string(),
            reason: err.kind().to_string(),
        })?;
        return Ok(ConnectionString::new(text));
    }
    if let Some(name) = &endpoint.uri_env {
        return match std::env::var(name) {
            Ok(value) if !value.trim().is_empty() => Ok(ConnectionString::new(value)),
            _ => Err(AuthError::MissingEnv { role, name: name.clone() }),
        };
    }
    Err(AuthError::NoConnectionString { role })
}

/// Driver options for an endpoint: its connection string, extra CA certificates and an app name
/// that shows up in the server's logs. An `auth: entra` endpoint logs in with MONGODB-OIDC
/// through the process-wide token source of its identity.
pub async fn client_options(endpoint: &EndpointConfig, role: EndpointRole) -> Result<ClientOptions, AuthError> {
    let uri = match endpoint.auth {
        AuthMethod::ConnectionString => connection_string(endpoint, role)?,
        AuthMethod::Entra => ConnectionString::new(endpoint.uri.clone().unwrap_or_default()),
    };
    let mut options = ClientOptions::parse(uri.expose()).await.map_err(|err| AuthError::InvalidConnectionString {
        role,
        redacted: uri.redacted(),
        detail: uri.scrub(&err.to_string()),
    })?;
    if endpoint.auth == AuthMethod::Entra {
        if options.credential.as_ref().is_some_and(|c| c.username.is_some() || c.password.is_some()) {
            return Err(AuthError::CredentialsInEntraUri { role });
        }
        let identity = entra_identity(endpoint, role)?;
        let sources = oidc::TokenSources::global();
        let source = sources.get(&identity).map_err(|source| AuthError::Entra { role, source })?;
        let callback = oidc::callback(source, &role.to_string(), sources.metrics().clone());
        options.credential =
            Some(Credential::builder().mechanism(AuthMechanism::MongoDbOidc).source("$external".to_string()).oidc_callback(callback).build());
    }
    if let Some(ca) = &endpoint.ca_file {
        if !Path::new(ca).exists() {
            return Err(AuthError::MissingCaFile { role, path: ca.display().to_string() });
        }
        let mut tls = match options.tls.take() {
            Some(Tls::Enabled(tls)) => tls,
            _ => TlsOptions::default(),
        };
        tls.ca_file_path = Some(ca.clone());
        options.tls = Some(Tls::Enabled(tls));
    }
    options.app_name = Some(format!("mongo-replicator/{}", env!("CARGO_PKG_VERSION")));
    Ok(options)
}

/// The Entra identity of an `auth: entra` endpoint: its settings, else the variables the
/// workload identity webhook injects (FACTS §4), else the public cloud's defaults.
pub fn entra_identity(endpoint: &EndpointConfig, role: EndpointRole) -> Result<oidc::Identity, AuthError> {
    let settings = endpoint.entra.clone().unwrap_or_default();
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let required = |value: Option<String>, field: &'static str, name: &'static str| {
        value.or_else(|| env(name)).ok_or(AuthError::EntraSettingMissing { role, field, env: name })
    };
    Ok(oidc::Identity {
        client_id: required(settings.client_id, "clientId", "AZURE_CLIENT_ID")?,
        tenant_id: required(settings.tenant_id, "tenantId", "AZURE_TENANT_ID")?,
        token_file: required(settings.token_file.map(|p| p.display().to_string()), "tokenFile", "AZURE_FEDERATED_TOKEN_FILE")?.into(),
        scope: settings.scope.unwrap_or_else(|| oidc::default_scope().to_string()),
        authority_host: settings.authority_host.or_else(|| env("AZURE_AUTHORITY_HOST")).unwrap_or_else(|| oidc::PUBLIC_AUTHORITY_HOST.to_string()),
        ca_file: settings.ca_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_user_information_and_secret_options() {
        let uri = ConnectionString::new("mongodb://app:p%40ss@db1:27017,db2:27017/shop?tls=true&tlsCertificateKeyFilePassword=k3y&replicaSet=rs0");
        let shown = uri.to_string();
        assert_eq!(shown, "mongodb://***@db1:27017,db2:27017/shop?tls=true&tlsCertificateKeyFilePassword=***&replicaSet=rs0");
        assert!(!format!("{uri:?}").contains("p%40ss"));
        assert_eq!(ConnectionString::new("mongodb+srv://c.example/?tls=true").to_string(), "mongodb+srv://c.example/?tls=true");
        assert_eq!(ConnectionString::new("not a uri").to_string(), "***");
    }

    #[test]
    fn scrub_removes_the_password_in_any_spelling() {
        let uri = ConnectionString::new("mongodb://app:s3cr%2Ft@db:27017/?authSource=admin");
        let message = format!("failed to parse {}: password s3cr/t or s3cr%2Ft rejected", uri.expose());
        let scrubbed = uri.scrub(&message);
        assert!(!scrubbed.contains("s3cr"), "{scrubbed}");
        assert!(scrubbed.contains("mongodb://***@db:27017"), "{scrubbed}");
    }

    #[tokio::test]
    async fn an_entra_uri_with_a_password_is_refused_and_missing_identity_names_the_variable() {
        use crate::replicator::config::EntraSettings;
        let mut endpoint = EndpointConfig {
            auth: AuthMethod::Entra,
            uri: Some("mongodb://app:secret@db.example:27017/?tls=true".into()),
            uri_file: None,
            uri_env: None,
            ca_file: None,
            entra: Some(EntraSettings {
                client_id: Some("c".into()),
                tenant_id: Some("t".into()),
                token_file: Some("/t".into()),
                ..Default::default()
            }),
            connection_string: None,
        };
        let err = client_options(&endpoint, EndpointRole::Source).await.unwrap_err();
        assert_eq!(err.reason(), "CredentialsInEntraUri");
        assert!(!err.to_string().contains("secret"));
        if std::env::var_os("AZURE_CLIENT_ID").is_none() {
            endpoint.entra = Some(EntraSettings::default());
            let err = entra_identity(&endpoint, EndpointRole::Source).unwrap_err().to_string();
            assert!(err.contains("AZURE_CLIENT_ID") && err.contains("clientId"), "{err}");
        }
    }
}
