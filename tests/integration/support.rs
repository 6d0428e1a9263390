//! Helpers shared by the lab tests.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;

/// Field manager of everything the tests write.
pub const TEST_MANAGER: &str = "mongo-replicator-tests";

/// Installs the MongoReplication CRD with server-side apply and waits until it is Established.
pub async fn install_crd(client: &Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = mongo_replicator::crd::crd();
    let name = crd.metadata.name.clone().context("CRD without a name")?;
    api.patch(&name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(&crd))
        .await
        .context("the apiserver refused the CRD")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let current = api.get(&name).await?;
        let established = current
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True"));
        if established {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("CRD {name} not Established after 60 s: {:?}", current.status);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The YAML documents of a file as JSON values (empty documents skipped).
pub fn yaml_documents(text: &str) -> Result<Vec<serde_json::Value>> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text)?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}
