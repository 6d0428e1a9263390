//! Endpoint credentials: connection strings read from files or environment variables (mounted
//! Secrets), kept in a type that never prints them, Microsoft Entra workload identity
//! (MONGODB-OIDC, [`oidc`]), and the driver options built from them.

pub mod endpoint;
pub mod entra;
pub mod oidc;

use std::fmt;

pub use self::endpoint::{AuthMethod, EndpointConfig, EndpointRole, EntraSettings, Login, UriSource, entra_identity};
use crate::reason::Reason;

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
    pub fn reason(&self) -> Reason {
        match self {
            AuthError::MissingEnv { .. } => Reason::ConnectionStringMissing,
            AuthError::UnreadableSecret { .. } => Reason::ConnectionStringUnreadable,
            AuthError::InvalidConnectionString { .. } => Reason::ConnectionStringInvalid,
            AuthError::MissingCaFile { .. } => Reason::CaFileMissing,
            AuthError::EntraSettingMissing { .. } => Reason::EntraSettingMissing,
            AuthError::CredentialsInEntraUri { .. } => Reason::CredentialsInEntraUri,
            AuthError::Entra { source, .. } => source.reason(),
        }
    }
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
}
