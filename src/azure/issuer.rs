//! The cluster's service-account token issuer: what a federated identity credential must name
//! as its `issuer`, exactly as the cluster's tokens carry it in `iss`.
//!
//! Every cluster serves OIDC discovery at `/.well-known/openid-configuration` (readable through
//! the `system:service-account-issuer-discovery` ClusterRole); its `issuer` is the value of the
//! `iss` claim, trailing slash and all (AKS reports it with one; Entra compares exactly).

use serde::Deserialize;

/// Why the issuer could not be discovered.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error(
        "cannot read the cluster's OIDC discovery document (/.well-known/openid-configuration): {0}; the operator needs the system:service-account-issuer-discovery ClusterRole"
    )]
    Unreadable(String),
    #[error("the cluster's OIDC discovery document has no usable issuer: {0}")]
    Invalid(String),
}

impl IssuerError {
    pub fn reason(&self) -> crate::reason::Reason {
        match self {
            IssuerError::Unreadable(_) => crate::reason::Reason::IssuerDiscoveryFailed,
            IssuerError::Invalid(_) => crate::reason::Reason::IssuerInvalid,
        }
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: Option<String>,
}

/// The issuer named by a discovery document; Entra accepts only https issuers.
pub fn issuer_from_discovery(document: &str) -> Result<String, IssuerError> {
    let discovery: Discovery = serde_json::from_str(document).map_err(|e| IssuerError::Invalid(format!("not JSON: {e}")))?;
    let issuer = discovery.issuer.filter(|i| !i.trim().is_empty()).ok_or_else(|| IssuerError::Invalid("no issuer field".into()))?;
    if !issuer.starts_with("https://") {
        return Err(IssuerError::Invalid(format!("{issuer} is not an https URL, which Microsoft Entra requires")));
    }
    Ok(issuer)
}

/// Reads the cluster's issuer through the API server.
pub async fn discover(client: &kube::Client) -> Result<String, IssuerError> {
    let request = http::Request::get("/.well-known/openid-configuration").body(Vec::new()).map_err(|e| IssuerError::Unreadable(e.to_string()))?;
    let document = client.request_text(request).await.map_err(|e| IssuerError::Unreadable(e.to_string()))?;
    issuer_from_discovery(&document)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issuer_is_kept_exactly_and_must_be_https() {
        let aks = r#"{"issuer":"https://eastus.oic.prod-aks.azure.com/0000/1111/","jwks_uri":"https://eastus.oic.prod-aks.azure.com/0000/1111/openid/v1/jwks"}"#;
        assert_eq!(issuer_from_discovery(aks).unwrap(), "https://eastus.oic.prod-aks.azure.com/0000/1111/");
        assert_eq!(
            issuer_from_discovery(r#"{"issuer":"https://kubernetes.default.svc.cluster.local"}"#).unwrap(),
            "https://kubernetes.default.svc.cluster.local"
        );
        assert_eq!(issuer_from_discovery(r#"{"issuer":"http://plain"}"#).unwrap_err().reason(), "IssuerInvalid");
        assert_eq!(issuer_from_discovery(r#"{"jwks_uri":"x"}"#).unwrap_err().reason(), "IssuerInvalid");
        assert_eq!(issuer_from_discovery("<html>").unwrap_err().reason(), "IssuerInvalid");
    }
}
