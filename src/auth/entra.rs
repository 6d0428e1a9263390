//! Microsoft Entra token-endpoint errors, as messages a person can act on.
//!
//! The token endpoint answers failures with `{"error", "error_description": "AADSTS<code>: ...",
//! "error_codes": [<code>], ...}` (see FACTS §1). The codes below are the ones a workload-identity
//! setup runs into; each gets a stable reason (for conditions, Events and metric labels), a hint,
//! and whether waiting may help.

use serde::Deserialize;

use crate::reason::Reason;

/// What went wrong at the token endpoint, by AADSTS code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntraFailure {
    /// 70021: no federated identity credential matches; also seen for a while after one is created.
    NoFederatedCredential,
    /// 700211: the service-account token's issuer is not the credential's issuer.
    IssuerMismatch,
    /// 700212: the token's audience is not the credential's audience.
    AudienceMismatch,
    /// 700213: the token's subject (`system:serviceaccount:<ns>:<sa>`) is not the credential's subject.
    SubjectMismatch,
    /// 700024: the service-account token is outside its valid time range.
    AssertionExpired,
    /// 700016: no application or managed identity with this client id in the tenant.
    UnknownClient,
    /// 90002: the tenant does not exist.
    UnknownTenant,
    /// 900023: the tenant id is malformed.
    MalformedTenant,
    /// 70011: the requested scope is invalid.
    InvalidScope,
    /// Any other code.
    Other(u32),
}

impl EntraFailure {
    pub fn from_code(code: u32) -> Self {
        match code {
            70021 => Self::NoFederatedCredential,
            700211 => Self::IssuerMismatch,
            700212 => Self::AudienceMismatch,
            700213 => Self::SubjectMismatch,
            700024 => Self::AssertionExpired,
            700016 => Self::UnknownClient,
            90002 => Self::UnknownTenant,
            900023 => Self::MalformedTenant,
            70011 => Self::InvalidScope,
            other => Self::Other(other),
        }
    }

    /// The AADSTS code (0 when Entra's answer carried none).
    pub fn code(self) -> u32 {
        match self {
            Self::NoFederatedCredential => 70021,
            Self::IssuerMismatch => 700211,
            Self::AudienceMismatch => 700212,
            Self::SubjectMismatch => 700213,
            Self::AssertionExpired => 700024,
            Self::UnknownClient => 700016,
            Self::UnknownTenant => 90002,
            Self::MalformedTenant => 900023,
            Self::InvalidScope => 70011,
            Self::Other(code) => code,
        }
    }

    /// Stable reason for conditions, Events and metric labels.
    pub fn reason(self) -> Reason {
        match self {
            Self::NoFederatedCredential => Reason::NoFederatedCredential,
            Self::IssuerMismatch => Reason::FederatedCredentialIssuerMismatch,
            Self::AudienceMismatch => Reason::FederatedCredentialAudienceMismatch,
            Self::SubjectMismatch => Reason::FederatedCredentialSubjectMismatch,
            Self::AssertionExpired => Reason::ServiceAccountTokenExpired,
            Self::UnknownClient => Reason::ManagedIdentityNotFound,
            Self::UnknownTenant => Reason::TenantNotFound,
            Self::MalformedTenant => Reason::TenantIdMalformed,
            Self::InvalidScope => Reason::InvalidScope,
            Self::Other(_) => Reason::EntraTokenRequestFailed,
        }
    }

    /// What to do about it.
    pub fn hint(self) -> &'static str {
        match self {
            Self::NoFederatedCredential => {
                "no federated identity credential on the managed identity matches this service account; create one for the cluster's issuer and subject system:serviceaccount:<namespace>:<serviceaccount> (a new one can take a few minutes to take effect)"
            }
            Self::IssuerMismatch => {
                "the federated credential's issuer is not this cluster's OIDC issuer URL (compare exactly, trailing slash included)"
            }
            Self::AudienceMismatch => "the federated credential's audience must be api://AzureADTokenExchange, the audience of the projected token",
            Self::SubjectMismatch => "the federated credential's subject must be system:serviceaccount:<namespace>:<serviceaccount> of the pod",
            Self::AssertionExpired => {
                "the projected service-account token has expired; the kubelet refreshes it, so check the pod's token volume and the node's clock"
            }
            Self::UnknownClient => "no managed identity or application with this client id exists in the tenant; check clientId and tenantId",
            Self::UnknownTenant => "the tenant does not exist; check tenantId",
            Self::MalformedTenant => "the tenant id is malformed; it must be a GUID",
            Self::InvalidScope => "the token scope is invalid; for Azure DocumentDB it is https://ossrdbms-aad.database.windows.net/.default",
            Self::Other(_) => "Microsoft Entra refused the token request",
        }
    }

    /// Whether retrying later may succeed without a change (propagation of a new credential).
    pub fn may_pass_with_time(self) -> bool {
        matches!(self, Self::NoFederatedCredential)
    }
}

/// A token-endpoint error body.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: Option<String>,
    error_description: Option<String>,
    #[serde(default)]
    error_codes: Vec<u32>,
}

/// A refused token request, parsed from the endpoint's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntraError {
    pub failure: EntraFailure,
    pub status: u16,
    /// The first sentence of `error_description` (`AADSTS700213: ...`), without trace ids.
    pub description: String,
}

impl std::fmt::Display for EntraError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} (HTTP {}: {})", self.failure.reason(), self.failure.hint(), self.status, self.description)
    }
}

impl EntraError {
    /// Parses an error answer; a body that is not Entra's JSON still yields an error with its status.
    pub fn parse(status: u16, body: &str) -> Self {
        let parsed: Option<ErrorBody> = serde_json::from_str(body).ok();
        let code = parsed.as_ref().and_then(|b| b.error_codes.first().copied()).or_else(|| {
            let description = parsed.as_ref()?.error_description.as_deref()?;
            description.strip_prefix("AADSTS")?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        });
        let description = parsed
            .as_ref()
            .and_then(|b| b.error_description.as_deref().or(b.error.as_deref()))
            .map(first_sentence)
            .unwrap_or_else(|| "no error description".to_string());
        Self { failure: code.map_or(EntraFailure::Other(0), EntraFailure::from_code), status, description }
    }
}

/// Keeps `AADSTS<code>: <first sentence>` and drops trace and correlation ids and timestamps.
fn first_sentence(description: &str) -> String {
    let text = description.split(" Trace ID:").next().unwrap_or(description).trim();
    let end = text.find(". ").map_or(text.len(), |i| i + 1);
    text[..end].chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(code: u32, error: &str, text: &str) -> String {
        serde_json::json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {text} Trace ID: 0f6b Correlation ID: 9d1c Timestamp: 2026-01-01 00:00:00Z"),
            "error_codes": [code],
            "timestamp": "2026-01-01 00:00:00Z",
            "trace_id": "0f6b",
            "correlation_id": "9d1c",
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}")
        })
        .to_string()
    }

    #[test]
    fn each_workload_identity_failure_gets_its_own_reason_and_hint() {
        let cases = [
            (70021, "NoFederatedCredential", "create one"),
            (700211, "FederatedCredentialIssuerMismatch", "issuer"),
            (700212, "FederatedCredentialAudienceMismatch", "api://AzureADTokenExchange"),
            (700213, "FederatedCredentialSubjectMismatch", "system:serviceaccount"),
            (700024, "ServiceAccountTokenExpired", "expired"),
            (700016, "ManagedIdentityNotFound", "clientId"),
            (90002, "TenantNotFound", "tenantId"),
            (900023, "TenantIdMalformed", "GUID"),
            (70011, "InvalidScope", "ossrdbms-aad"),
        ];
        let reasons: std::collections::HashSet<_> = cases.iter().map(|c| c.1).collect();
        assert_eq!(reasons.len(), cases.len(), "reasons must be distinct");
        for (code, reason, hint) in cases {
            let err = EntraError::parse(400, &body(code, "invalid_client", "Something is wrong. More text."));
            assert_eq!(err.failure.reason(), reason, "{code}");
            let shown = err.to_string();
            assert!(shown.contains(hint) && shown.contains(&format!("AADSTS{code}")), "{shown}");
            assert!(!shown.contains("Trace ID") && !shown.contains("9d1c"), "{shown}");
        }
        assert!(EntraFailure::NoFederatedCredential.may_pass_with_time());
        assert!(!EntraFailure::SubjectMismatch.may_pass_with_time());
    }

    #[test]
    fn codes_come_from_the_description_when_the_list_is_missing_and_garbage_is_survived() {
        let without_codes = r#"{"error":"invalid_client","error_description":"AADSTS700213: No matching federated identity record found for presented assertion subject."}"#;
        assert_eq!(EntraError::parse(400, without_codes).failure, EntraFailure::SubjectMismatch);
        let garbage = EntraError::parse(502, "<html>bad gateway</html>");
        assert_eq!((garbage.failure, garbage.status), (EntraFailure::Other(0), 502));
        assert_eq!(garbage.failure.reason(), "EntraTokenRequestFailed");
    }
}
