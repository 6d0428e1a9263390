//! How to reach and log in to one endpoint: where its connection string comes from, or which
//! Microsoft Entra identity it logs in as, and the driver options built from that.
//!
//! In the replicator's configuration file an endpoint is a flat map (`auth`, `uri`, `uriFile`,
//! `uriEnv`, `caFile`, `entra`); here it is a [`Login`], so code never checks at run time which
//! of several optional fields is set.

use std::fmt;
use std::path::{Path, PathBuf};

use mongodb::options::{AuthMechanism, ClientOptions, Credential, Tls, TlsOptions};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::oidc::{self, TokenSources};
use super::{AuthError, ConnectionString};

/// Which side of the replication an endpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointRole {
    Source,
    Target,
}

impl fmt::Display for EndpointRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EndpointRole::Source => "source",
            EndpointRole::Target => "target",
        })
    }
}

/// How an endpoint logs in, as the configuration file names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthMethod {
    /// The connection string carries the credentials (SCRAM, X.509, ...).
    ConnectionString,
    /// Microsoft Entra workload identity (MONGODB-OIDC), for Azure DocumentDB.
    Entra,
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMethod::ConnectionString => "connectionString",
            AuthMethod::Entra => "entra",
        })
    }
}

/// Where a connection string (with its credentials) comes from. Never from the file itself.
#[derive(Clone, Debug, PartialEq)]
pub enum UriSource {
    /// A file, usually a mounted Secret key (`uriFile`).
    File(PathBuf),
    /// An environment variable (`uriEnv`).
    Env(String),
    /// Given on the command line; never written to a file.
    Given(ConnectionString),
}

impl UriSource {
    /// Reads the connection string.
    pub fn read(&self, role: EndpointRole) -> Result<ConnectionString, AuthError> {
        match self {
            UriSource::Given(uri) => Ok(uri.clone()),
            UriSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|err| AuthError::UnreadableSecret {
                    role,
                    path: path.display().to_string(),
                    reason: err.kind().to_string(),
                })?;
                Ok(ConnectionString::new(text))
            }
            UriSource::Env(name) => match std::env::var(name) {
                Ok(value) if !value.trim().is_empty() => Ok(ConnectionString::new(value)),
                _ => Err(AuthError::MissingEnv { role, name: name.clone() }),
            },
        }
    }
}

/// How an endpoint logs in.
#[derive(Clone, Debug, PartialEq)]
pub enum Login {
    /// The whole connection string, credentials included, from a Secret or the environment.
    ConnectionString(UriSource),
    /// A connection string without credentials, and the Entra identity whose tokens log in.
    Entra { uri: String, identity: EntraSettings },
}

impl Login {
    pub fn method(&self) -> AuthMethod {
        match self {
            Login::ConnectionString(_) => AuthMethod::ConnectionString,
            Login::Entra { .. } => AuthMethod::Entra,
        }
    }
}

/// How to reach and log in to one endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointConfig {
    pub login: Login,
    /// Extra CA certificates (PEM file) to trust for this endpoint's TLS.
    pub ca_file: Option<PathBuf>,
}

/// Microsoft Entra workload identity for one endpoint. Omitted values come from the variables
/// the workload identity webhook injects.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntraSettings {
    /// Client id of the user-assigned managed identity. Default: `AZURE_CLIENT_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Tenant id. Default: `AZURE_TENANT_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Token scope. Default: Azure DocumentDB's, `https://ossrdbms-aad.database.windows.net/.default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Microsoft Entra authority. Default: `AZURE_AUTHORITY_HOST`, else `https://login.microsoftonline.com/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority_host: Option<String>,
    /// The projected service-account token. Default: `AZURE_FEDERATED_TOKEN_FILE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for the authority (private endpoints, private clouds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// An endpoint as the configuration file spells it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EndpointFile {
    /// `connectionString` (the whole URI from `uriFile` or `uriEnv`) or `entra`.
    auth: AuthMethod,
    /// For `auth: entra`: the connection string without credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uri_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uri_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entra: Option<EntraSettings>,
}

impl EndpointFile {
    fn into_config(self, role: EndpointRole) -> Result<EndpointConfig, String> {
        let login = match self.auth {
            AuthMethod::ConnectionString => {
                if self.uri.is_some() {
                    return Err(format!(
                        "{role}: auth: connectionString reads the URI from uriFile or uriEnv, so that it never sits in a config file; remove uri"
                    ));
                }
                if self.entra.is_some() {
                    return Err(format!("{role}: auth: connectionString must not set entra"));
                }
                match (self.uri_file, self.uri_env) {
                    (Some(file), None) => Login::ConnectionString(UriSource::File(file)),
                    (None, Some(env)) => Login::ConnectionString(UriSource::Env(env)),
                    _ => return Err(format!("{role}: give the connection string exactly one way: uriFile or uriEnv")),
                }
            }
            AuthMethod::Entra => {
                if self.uri_file.is_some() || self.uri_env.is_some() {
                    return Err(format!("{role}: auth: entra takes its connection string (without credentials) in uri, not uriFile or uriEnv"));
                }
                match self.uri {
                    Some(uri) if !uri.trim().is_empty() => Login::Entra { uri, identity: self.entra.unwrap_or_default() },
                    _ => return Err(format!("{role}: auth: entra needs uri")),
                }
            }
        };
        Ok(EndpointConfig { login, ca_file: self.ca_file })
    }

    fn from_config(endpoint: &EndpointConfig) -> Self {
        let mut file =
            EndpointFile { auth: endpoint.login.method(), uri: None, uri_file: None, uri_env: None, ca_file: endpoint.ca_file.clone(), entra: None };
        match &endpoint.login {
            Login::ConnectionString(UriSource::File(path)) => file.uri_file = Some(path.clone()),
            Login::ConnectionString(UriSource::Env(name)) => file.uri_env = Some(name.clone()),
            // A connection string from the command line is a secret: it is never written out.
            Login::ConnectionString(UriSource::Given(_)) => {}
            Login::Entra { uri, identity } => {
                file.uri = Some(uri.clone());
                file.entra = (identity != &EntraSettings::default()).then(|| identity.clone());
            }
        }
        file
    }
}

impl Serialize for EndpointConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        EndpointFile::from_config(self).serialize(serializer)
    }
}

impl EndpointConfig {
    /// Reads an endpoint of the configuration file; errors name the endpoint's role.
    pub fn deserialize_as<'de, D: Deserializer<'de>>(deserializer: D, role: EndpointRole) -> Result<Self, D::Error> {
        EndpointFile::deserialize(deserializer)?.into_config(role).map_err(serde::de::Error::custom)
    }

    /// Driver options for the endpoint: its connection string, extra CA certificates and an app
    /// name that shows up in the server's logs. An `auth: entra` endpoint logs in with
    /// MONGODB-OIDC through the token source of its identity in `tokens`.
    pub async fn client_options(&self, role: EndpointRole, tokens: &TokenSources) -> Result<ClientOptions, AuthError> {
        let uri = match &self.login {
            Login::ConnectionString(source) => source.read(role)?,
            Login::Entra { uri, .. } => ConnectionString::new(uri.clone()),
        };
        let mut options = ClientOptions::parse(uri.expose()).await.map_err(|err| AuthError::InvalidConnectionString {
            role,
            redacted: uri.redacted(),
            detail: uri.scrub(&err.to_string()),
        })?;
        if let Login::Entra { identity, .. } = &self.login {
            if options.credential.as_ref().is_some_and(|c| c.username.is_some() || c.password.is_some()) {
                return Err(AuthError::CredentialsInEntraUri { role });
            }
            let identity = entra_identity(identity, role)?;
            let source = tokens.get(&identity).map_err(|source| AuthError::Entra { role, source })?;
            let callback = oidc::callback(source, &role.to_string(), tokens.metrics().clone());
            options.credential =
                Some(Credential::builder().mechanism(AuthMechanism::MongoDbOidc).source("$external".to_string()).oidc_callback(callback).build());
        }
        if let Some(ca) = &self.ca_file {
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

    /// The connection string, for scrubbing it from driver messages; `None` for `auth: entra`
    /// (its URI holds no secret) or when it cannot be read.
    pub fn secret(&self, role: EndpointRole) -> Option<ConnectionString> {
        match &self.login {
            Login::ConnectionString(source) => source.read(role).ok(),
            Login::Entra { .. } => None,
        }
    }
}

/// The Entra identity of an `auth: entra` endpoint: its settings, else the variables the
/// workload identity webhook injects (FACTS §4), else the public cloud's defaults.
pub fn entra_identity(settings: &EntraSettings, role: EndpointRole) -> Result<oidc::Identity, AuthError> {
    let settings = settings.clone();
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

    fn endpoint(yaml: &str, role: EndpointRole) -> Result<EndpointConfig, String> {
        let value: serde_json::Value = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        EndpointConfig::deserialize_as(value, role).map_err(|e| e.to_string())
    }

    #[test]
    fn each_login_reads_its_own_fields_and_writes_them_back() {
        let file = endpoint("{auth: connectionString, uriFile: /s/uri, caFile: /s/ca.crt}", EndpointRole::Source).unwrap();
        assert_eq!(file.login, Login::ConnectionString(UriSource::File("/s/uri".into())));
        let env = endpoint("{auth: connectionString, uriEnv: TARGET_URI}", EndpointRole::Target).unwrap();
        assert_eq!(env.login, Login::ConnectionString(UriSource::Env("TARGET_URI".into())));
        let entra = endpoint("{auth: entra, uri: 'mongodb+srv://c.example/?tls=true', entra: {clientId: c1}}", EndpointRole::Target).unwrap();
        assert!(matches!(&entra.login, Login::Entra { identity, .. } if identity.client_id.as_deref() == Some("c1")));
        for config in [file, env, entra] {
            let back = EndpointConfig::deserialize_as(serde_json::to_value(&config).unwrap(), EndpointRole::Source).unwrap();
            assert_eq!(back, config);
        }
        let given = EndpointConfig { login: Login::ConnectionString(UriSource::Given(ConnectionString::new("mongodb://u:p@h"))), ca_file: None };
        assert!(!serde_json::to_string(&given).unwrap().contains("p@h"), "a given connection string is never written");
    }

    #[test]
    fn mixed_or_missing_fields_are_refused_naming_the_endpoint() {
        let cases = [
            ("{auth: connectionString, uri: 'mongodb://u:p@h'}", "remove uri"),
            ("{auth: connectionString, uriFile: /a, uriEnv: B}", "exactly one way"),
            ("{auth: connectionString}", "exactly one way"),
            ("{auth: connectionString, uriEnv: B, entra: {clientId: c1}}", "must not set entra"),
            ("{auth: entra, entra: {clientId: c1}}", "entra needs uri"),
            ("{auth: entra, uri: 'mongodb://h', uriFile: /a}", "not uriFile"),
            ("{auth: connectionString, uriEnv: B, workerz: 3}", "workerz"),
        ];
        for (yaml, expected) in cases {
            let err = endpoint(yaml, EndpointRole::Target).unwrap_err();
            assert!(err.contains(expected), "{yaml}: {err}");
            assert!(!err.contains("u:p@h"), "{err}");
        }
        assert!(endpoint("{auth: entra, uri: ''}", EndpointRole::Source).unwrap_err().contains("source: auth: entra needs uri"));
    }

    #[tokio::test]
    async fn an_entra_uri_with_a_password_is_refused_and_missing_identity_names_the_variable() {
        let mut identity =
            EntraSettings { client_id: Some("c".into()), tenant_id: Some("t".into()), token_file: Some("/t".into()), ..Default::default() };
        let endpoint = EndpointConfig {
            login: Login::Entra { uri: "mongodb://app:secret@db.example:27017/?tls=true".into(), identity: identity.clone() },
            ca_file: None,
        };
        let err = endpoint.client_options(EndpointRole::Source, &TokenSources::default()).await.unwrap_err();
        assert_eq!(err.reason(), "CredentialsInEntraUri");
        assert!(!err.to_string().contains("secret"));
        if std::env::var_os("AZURE_CLIENT_ID").is_none() {
            identity.client_id = None;
            let err = entra_identity(&identity, EndpointRole::Source).unwrap_err().to_string();
            assert!(err.contains("AZURE_CLIENT_ID") && err.contains("clientId"), "{err}");
        }
    }

    #[test]
    fn entra_settings_take_precedence_over_the_webhook_variables() {
        let settings = EntraSettings {
            client_id: Some("c1".into()),
            tenant_id: Some("t1".into()),
            authority_host: Some("https://login.example/".into()),
            token_file: Some("/t".into()),
            ..Default::default()
        };
        let identity = entra_identity(&settings, EndpointRole::Target).unwrap();
        assert_eq!((identity.client_id.as_str(), identity.tenant_id.as_str()), ("c1", "t1"));
        assert_eq!(identity.authority_host, "https://login.example/");
        assert_eq!(identity.scope, crate::crd::DOCUMENTDB_SCOPE);
        assert_eq!(identity.token_file, PathBuf::from("/t"));
    }
}
