//! The product's ARM client against the ARM double, signed in as the operator would be: its
//! pod's projected service-account token exchanged at the Entra double for a management token.
//! Each test asserts what a user of the operator would observe: pods that can (or can no longer)
//! sign in, credentials and cluster users that exist, and the reasons of refusals.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mongo_replicator::auth::oidc::{EntraMetrics, Identity, TokenError, TokenSource};
use mongo_replicator::azure::arm::{ArmClient, ArmError, FederatedCredential, MANAGEMENT_SCOPE};
use mongo_replicator::https::HttpsTransport;
use mongo_replicator_lab::KubeLab;
use mongo_replicator_lab::azure::{AzureLab, LabIdentity, PodIdentity};
use mongo_replicator_lab::entra::{EntraOptions, TOKEN_EXCHANGE_AUDIENCE};

const DOCUMENTDB_SCOPE: &str = "https://ossrdbms-aad.database.windows.net/.default";

/// The operator: its own managed identity (federated with its pod's service account) and the
/// ARM client built from it, in a namespace of the lab cluster.
struct Operator {
    kube: &'static KubeLab,
    azure: AzureLab,
    namespace: String,
    arm: ArmClient,
}

async fn operator() -> Result<Operator> {
    let kube = KubeLab::shared().await?;
    let azure = AzureLab::start(kube, EntraOptions::default()).await?;
    let namespace = kube.namespace("arm").await?;
    let pod = PodIdentity::mint(kube, azure.dir(), &namespace, "operator").await?;
    let identity = azure.create_identity(&format!("operator-{}", rand::random::<u32>()));
    azure.add_federated_credential(&identity, "operator", kube.issuer(), &pod.subject(), TOKEN_EXCHANGE_AUDIENCE).await?;
    let tokens = TokenSource::new(entra_identity(&azure, &identity, &pod, MANAGEMENT_SCOPE), EntraMetrics::new())?;
    let transport = HttpsTransport::new(Some(azure.ca_file()))?;
    let arm = ArmClient::new(&azure.arm.url(), Arc::new(tokens), Arc::new(transport))?;
    Ok(Operator { kube, azure, namespace, arm })
}

fn entra_identity(azure: &AzureLab, identity: &LabIdentity, pod: &PodIdentity, scope: &str) -> Identity {
    Identity {
        client_id: identity.client_id.clone(),
        tenant_id: azure.tenant_id().to_string(),
        scope: scope.to_string(),
        authority_host: azure.entra.authority_host(),
        token_file: pod.token_file.clone(),
        ca_file: Some(azure.ca_file().to_path_buf()),
    }
}

/// What a newly started pod running as `pod` with `identity` gets: a DocumentDB token, or why not.
async fn sign_in(azure: &AzureLab, identity: &LabIdentity, pod: &PodIdentity) -> Result<(), TokenError> {
    let source = TokenSource::new(entra_identity(azure, identity, pod, DOCUMENTDB_SCOPE), EntraMetrics::new())?;
    source.token(None, None).await.map(|_| ())
}

fn new_identity(azure: &AzureLab, prefix: &str) -> LabIdentity {
    azure.create_identity(&format!("{prefix}-{}", rand::random::<u32>()))
}

fn credential_count(azure: &AzureLab, identity: &LabIdentity) -> usize {
    azure.arm.identity(&identity.resource_id).map(|i| i.credentials.len()).unwrap_or_default()
}

fn expect_reason<T: std::fmt::Debug>(result: Result<T, ArmError>, reason: &str) -> Result<ArmError> {
    let err = match result {
        Ok(value) => anyhow::bail!("expected {reason}, got {value:?}"),
        Err(err) => err,
    };
    ensure!(err.reason() == reason, "expected {reason}, got {}: {err}", err.reason());
    ensure!(!err.to_string().contains("eyJ"), "a token in an error: {err}");
    Ok(err)
}

#[tokio::test]
async fn a_credential_written_through_the_client_lets_a_pod_sign_in_until_it_is_deleted() -> Result<()> {
    let op = operator().await?;
    let azure = &op.azure;
    let workload = new_identity(azure, "replicator");
    let pod = PodIdentity::mint(op.kube, azure.dir(), &op.namespace, "replicator").await?;
    let err = sign_in(azure, &workload, &pod).await.expect_err("a pod signed in without a federated credential");
    ensure!(err.reason() == "NoFederatedCredential", "{err}");
    ensure!(op.arm.get_federated_credential(&workload.resource_id, "replicator").await?.is_none());

    let wanted = FederatedCredential::for_service_account(op.kube.issuer(), &op.namespace, "replicator");
    ensure!(wanted.subject == pod.subject() && wanted.audiences == [TOKEN_EXCHANGE_AUDIENCE]);
    let created = op.arm.put_federated_credential(&workload.resource_id, "replicator", &wanted).await?;
    ensure!(created == wanted, "ARM holds {created:?}");
    sign_in(azure, &workload, &pod).await.context("the pod cannot sign in with the credential the client wrote")?;

    // Idempotent: the same credential again changes nothing and answers the same.
    let again = op.arm.put_federated_credential(&workload.resource_id, "replicator", &wanted).await?;
    ensure!(again == created && credential_count(azure, &workload) == 1);
    // Resource ids are case-insensitive in ARM; so they are for the client.
    let shouted = workload.resource_id.to_uppercase();
    ensure!(op.arm.get_federated_credential(&shouted, "REPLICATOR").await? == Some(wanted.clone()));

    op.arm.delete_federated_credential(&workload.resource_id, "replicator").await?;
    ensure!(credential_count(azure, &workload) == 0);
    ensure!(op.arm.get_federated_credential(&workload.resource_id, "replicator").await?.is_none());
    // Deleting what is gone succeeds (ARM answers 204).
    op.arm.delete_federated_credential(&workload.resource_id, "replicator").await?;
    let err = sign_in(azure, &workload, &pod).await.expect_err("a pod signed in after its federated credential was deleted");
    ensure!(err.reason() == "NoFederatedCredential", "{err}");
    Ok(())
}

#[tokio::test]
async fn ten_concurrent_writes_under_one_identity_all_succeed_and_throttling_is_waited_out() -> Result<()> {
    let op = operator().await?;
    let azure = &op.azure;
    let target = new_identity(azure, "busy");
    let credential = |i: usize| FederatedCredential::for_service_account(op.kube.issuer(), &op.namespace, &format!("sa-{i}"));

    // ARM answers 409 to a second write under an identity while one is in flight (50 ms here).
    let requests_before = azure.arm.request_count();
    let started = Instant::now();
    let puts = (0..10).map(|i| {
        let (arm, id, credential) = (op.arm.clone(), target.resource_id.clone(), credential(i));
        tokio::spawn(async move { arm.put_federated_credential(&id, &format!("cred-{i}"), &credential).await })
    });
    for (i, put) in futures::future::join_all(puts).await.into_iter().enumerate() {
        let written = put?.with_context(|| format!("concurrent write {i} failed"))?;
        ensure!(written == credential(i));
    }
    let elapsed = started.elapsed();
    ensure!(credential_count(azure, &target) == 10);
    // The writes took turns: one read and one write each, none refused and retried.
    let requests = azure.arm.request_count() - requests_before;
    ensure!(requests == 20, "{requests} ARM requests for 10 credentials: some writes collided");
    ensure!(elapsed >= Duration::from_millis(500), "10 writes of 50 ms each took {elapsed:?}: they did not take turns");
    let concurrent = elapsed;

    // Throttled twice with Retry-After: 1: the write waits it out.
    azure.arm.throttle_next_writes(2, 1);
    let started = Instant::now();
    let written = op.arm.put_federated_credential(&target.resource_id, "cred-10", &credential(10)).await?;
    let elapsed = started.elapsed();
    ensure!(written == credential(10) && credential_count(azure, &target) == 11);
    ensure!(elapsed >= Duration::from_secs(2), "Retry-After was not honoured: {elapsed:?}");
    eprintln!("10 concurrent credential writes took turns in {concurrent:?}; two 429s waited out in {elapsed:?}");
    Ok(())
}

#[tokio::test]
async fn arm_refusals_reach_the_caller_with_stable_reasons() -> Result<()> {
    let op = operator().await?;
    let azure = &op.azure;
    let target = new_identity(azure, "full");
    let credential = |sa: &str| FederatedCredential::for_service_account(op.kube.issuer(), &op.namespace, sa);
    for i in 0..20 {
        op.arm.put_federated_credential(&target.resource_id, &format!("cred-{i}"), &credential(&format!("sa-{i}"))).await?;
    }
    let err = expect_reason(op.arm.put_federated_credential(&target.resource_id, "cred-20", &credential("sa-20")).await, "FederatedCredentialLimit")?;
    ensure!(!err.is_transient() && err.to_string().contains("maximum allowed is 20"), "{err}");
    ensure!(credential_count(azure, &target) == 20);
    // At the limit an existing credential can still change.
    op.arm.put_federated_credential(&target.resource_id, "cred-0", &credential("sa-moved")).await?;
    expect_reason(op.arm.put_federated_credential(&target.resource_id, "cred-1", &credential("sa-2")).await, "DuplicateIssuerSubject")?;

    let ghost = target.resource_id.replace(&target.name, "no-such-identity");
    let err = expect_reason(op.arm.put_federated_credential(&ghost, "cred", &credential("sa")).await, "IdentityNotFound")?;
    ensure!(err.to_string().contains("no-such-identity"), "{err}");
    expect_reason(op.arm.get_federated_credential(&ghost, "cred").await, "IdentityNotFound")?;
    // Nothing to delete under an identity that is gone.
    op.arm.delete_federated_credential(&ghost, "cred").await?;

    // Invalid input is refused before anything is sent.
    let requests_before = azure.arm.request_count();
    expect_reason(op.arm.put_federated_credential(&target.resource_id, "x", &credential("sa")).await, "InvalidFederatedCredentialName")?;
    let mut two_audiences = credential("sa");
    two_audiences.audiences.push("api://other".into());
    expect_reason(op.arm.put_federated_credential(&target.resource_id, "cred-x", &two_audiences).await, "InvalidFederatedCredential")?;
    let cluster_id = azure.create_cluster(&format!("not-an-identity-{}", rand::random::<u16>()));
    expect_reason(op.arm.get_federated_credential(&cluster_id, "cred").await, "InvalidResourceId")?;
    ensure!(azure.arm.request_count() == requests_before, "invalid input reached ARM");
    Ok(())
}

#[tokio::test]
async fn cluster_users_are_registered_listed_page_by_page_and_removed() -> Result<()> {
    let op = operator().await?;
    let azure = &op.azure;
    let cluster = azure.create_cluster(&format!("docs-{}", rand::random::<u16>()));
    let principals: Vec<String> = (0..5).map(|i| new_identity(azure, &format!("user{i}")).principal_id).collect();
    let roles = vec![("admin".to_string(), "root".to_string())];

    // The create is a long-running operation (300 ms, Retry-After: 1): put returns when it succeeded.
    op.arm.put_cluster_user(&cluster, &principals[0], &roles).await?;
    ensure!(azure.arm.is_cluster_user(&cluster, &principals[0]), "put returned before the user could sign in");
    let puts = principals[1..].iter().map(|p| op.arm.put_cluster_user(&cluster, p, &roles));
    for result in futures::future::join_all(puts).await {
        result?;
    }
    ensure!(principals.iter().all(|p| azure.arm.is_cluster_user(&cluster, p)));
    // Re-registering a user is harmless.
    op.arm.put_cluster_user(&cluster, &principals[0], &roles).await?;

    // Five users, two per page.
    let mut listed = op.arm.list_cluster_users(&cluster).await?;
    listed.sort_by_key(|name| name.to_ascii_lowercase());
    ensure!(listed == azure.arm.cluster_users(&cluster) && listed.len() == 5, "listed {listed:?}");

    // Delete waits until the user is gone. Re-registering a user while its delete is in
    // progress gets ARM's 409 ("being deleted"), which is retried until it can go ahead.
    let started = Instant::now();
    let readd = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        op.arm.put_cluster_user(&cluster, &principals[2], &roles).await
    };
    let (deleted, deleted_before_readding, readded) =
        tokio::join!(op.arm.delete_cluster_user(&cluster, &principals[0]), op.arm.delete_cluster_user(&cluster, &principals[2]), readd);
    deleted?;
    deleted_before_readding?;
    readded.context("re-registering a user while its delete was in progress")?;
    ensure!(!azure.arm.cluster_users(&cluster).iter().any(|u| u.eq_ignore_ascii_case(&principals[0])), "delete returned before the user was gone");
    ensure!(azure.arm.is_cluster_user(&cluster, &principals[2]), "the re-registered user is missing");
    op.arm.delete_cluster_user(&cluster, &principals[0]).await.context("deleting a user that is gone")?;
    ensure!(op.arm.list_cluster_users(&cluster).await?.len() == 4);
    eprintln!("cluster user delete and re-register took {:?}", started.elapsed());

    let ghost = cluster.replace("/docs-", "/no-such-cluster-");
    expect_reason(op.arm.put_cluster_user(&ghost, &principals[0], &roles).await, "ClusterNotFound")?;
    expect_reason(op.arm.list_cluster_users(&ghost).await, "ClusterNotFound")?;
    expect_reason(op.arm.put_cluster_user(&cluster, "not_an_object_id", &roles).await, "InvalidPrincipalId")?;
    expect_reason(op.arm.put_cluster_user(&cluster, &principals[0], &[]).await, "InvalidClusterUserRoles")?;
    Ok(())
}

#[tokio::test]
async fn the_cluster_issuer_is_discovered_as_its_tokens_carry_it() -> Result<()> {
    let kube = KubeLab::shared().await?;
    let issuer = mongo_replicator::azure::issuer::discover(&kube.client().await?).await?;
    assert_eq!(issuer, kube.issuer());
    // The same string as the `iss` of a projected token, which Entra compares exactly.
    let namespace = kube.namespace("issuer").await?;
    let token = kube.service_account_token(&namespace, "probe", "api://AzureADTokenExchange", 3600).await?;
    let claims = mongo_replicator_lab::jwt::decode(&token).map_err(|e| anyhow::anyhow!("{e}"))?.claims;
    assert_eq!(claims["iss"].as_str(), Some(issuer.as_str()));
    Ok(())
}
