//! The operator's calls to the Kubernetes API: one timeout for each, one error type for a
//! failed reconcile (retried by the controller with backoff).

use std::time::Duration;

use kube::api::Api;
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use serde::de::DeserializeOwned;

use crate::reason::Reason;

/// Longest wait for one API call; a slow apiserver fails the reconcile, which is retried.
pub const API_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a reconcile failed; the controller retries it with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("the Kubernetes API refused {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("the Kubernetes API did not answer {what} within {} s", API_TIMEOUT.as_secs())]
    Timeout { what: String },
    #[error("cannot encode the replicator's configuration: {0}")]
    Encode(String),
}

impl ReconcileError {
    /// Stable label of the `errors` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            ReconcileError::Api { .. } => Reason::KubernetesApiError.as_str(),
            ReconcileError::Timeout { .. } => Reason::KubernetesApiTimeout.as_str(),
            ReconcileError::Encode(_) => Reason::ConfigEncodeFailed.as_str(),
        }
    }
}

/// Runs one API call with the per-call timeout.
pub async fn call<T>(what: impl Into<String>, fut: impl Future<Output = Result<T, kube::Error>>) -> Result<T, ReconcileError> {
    let what = what.into();
    match tokio::time::timeout(API_TIMEOUT, fut).await {
        Ok(result) => result.map_err(|source| ReconcileError::Api { what, source }),
        Err(_) => Err(ReconcileError::Timeout { what }),
    }
}

/// `get`, with 404 as `None`.
pub async fn get_opt<K>(api: &Api<K>, name: &str) -> Result<Option<K>, ReconcileError>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    call(format!("get {name}"), api.get_opt(name)).await
}

/// The API resource of MongoReplications, for writes that must not depend on the object's shape.
pub fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(crate::crd::GROUP, "v1alpha1", "MongoReplication"), "mongoreplications")
}
