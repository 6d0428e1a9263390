//! Microsoft Entra workload identity end to end: a service-account token minted by the lab
//! apiserver's TokenRequest API is exchanged at the Entra double for an access token, which
//! logs in through the DocumentDB MONGODB-OIDC gateway double in front of SecantusDB.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mongo_replicator::auth;
use mongo_replicator::replicator::config::{EndpointRole, ReplicatorConfig};
use mongo_replicator_lab::azure::{AzureLab, LabIdentity, PodIdentity};
use mongo_replicator_lab::entra::{EntraOptions, TOKEN_EXCHANGE_AUDIENCE};
use mongo_replicator_lab::gateway::OidcGateway;
use mongo_replicator_lab::workload::{self, WorkloadSpec};
use mongo_replicator_lab::{KubeLab, ScramUser, SecantusOptions, SecantusServer};
use mongodb::bson::{Document, doc};
use serde_json::Value;

use crate::support::{ReplicatorProcess, eventually, tempdir};

/// A namespace, a pod's projected token and a managed identity with a federated credential for
/// that pod's service account: what the operator sets up for a MongoReplication.
struct Workload {
    azure: AzureLab,
    pod: PodIdentity,
    identity: LabIdentity,
    dir: tempdir::Dir,
}

async fn workload_identity(options: EntraOptions) -> Result<Workload> {
    let kube = KubeLab::shared().await?;
    let azure = AzureLab::start(kube, options).await?;
    let namespace = kube.namespace("entra").await?;
    let pod = PodIdentity::mint(kube, azure.dir(), &namespace, "replicator").await?;
    let identity = azure.create_identity(&format!("replicator-{}", rand::random::<u32>()));
    azure.add_federated_credential(&identity, "lab-cluster", kube.issuer(), &pod.subject(), TOKEN_EXCHANGE_AUDIENCE).await?;
    Ok(Workload { azure, pod, identity, dir: tempdir::Dir::new("entra")? })
}

/// A DocumentDB cluster: a SecantusDB server behind a login gateway, `principal` registered.
async fn cluster(azure: &AzureLab, name: &str, principal: Option<&str>) -> Result<(SecantusServer, OidcGateway)> {
    let server = SecantusServer::start(SecantusOptions::default()).await?;
    let id = azure.create_cluster(&format!("{name}-{}", rand::random::<u16>()));
    if let Some(principal) = principal {
        azure.register_cluster_user(&id, principal).await?;
    }
    let gateway = azure.gateway(&server, &id).await?;
    Ok((server, gateway))
}

/// A plain source (connection string from `SOURCE_URI`) and a DocumentDB target the workload
/// identity is a user of, with the config file for them.
async fn plain_source_entra_target(wi: &Workload, name: &str) -> Result<(SecantusServer, SecantusServer, OidcGateway, PathBuf)> {
    let azure = &wi.azure;
    let source = SecantusServer::start(SecantusOptions::default()).await?;
    let (target, gateway) = cluster(azure, name, Some(&wi.identity.principal_id)).await?;
    let target_yaml = entra_endpoint(azure, &azure.gateway_uri(&gateway), &wi.identity.client_id, azure.tenant_id(), &wi.pod.token_file);
    let config = write_config(&wi.dir.0, &format!("data/{name}"), "\n  auth: connectionString\n  uriEnv: SOURCE_URI", &target_yaml)?;
    Ok((source, target, gateway, config))
}

/// The YAML of an `auth: entra` endpoint.
fn entra_endpoint(azure: &AzureLab, uri: &str, client_id: &str, tenant_id: &str, token_file: &Path) -> String {
    format!(
        "
  auth: entra
  uri: \"{uri}\"
  entra:
    clientId: {client_id}
    tenantId: {tenant_id}
    authorityHost: {}
    tokenFile: {}
    caFile: {}",
        azure.entra.authority_host(),
        token_file.display(),
        azure.ca_file().display()
    )
}

fn write_config(dir: &Path, name: &str, source: &str, target: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{}.yaml", name.replace('/', "-")));
    std::fs::write(&path, format!("name: {name}\nsource:{source}\ntarget:{target}\nworkers: 2\nmetricsAddress: null\n"))?;
    Ok(path)
}

/// Runs `mongo-replicator validate`; its exit code, JSON verdict and termination message.
async fn validate(config: &Path) -> Result<(Option<i32>, Value, Value)> {
    validate_with_env(config, &[]).await
}

use crate::support::validate_with_env;

#[tokio::test]
async fn entra_login_validates_and_replicates_a_workload_through_the_gateway() -> Result<()> {
    let wi = workload_identity(EntraOptions::default()).await?;
    let azure = &wi.azure;
    let (source, source_gateway) = cluster(azure, "source", Some(&wi.identity.principal_id)).await?;
    let (target, target_gateway) = cluster(azure, "target", Some(&wi.identity.principal_id)).await?;
    let endpoint =
        |gateway: &OidcGateway| entra_endpoint(azure, &azure.gateway_uri(gateway), &wi.identity.client_id, azure.tenant_id(), &wi.pod.token_file);
    let config = write_config(&wi.dir.0, "data/entra", &endpoint(&source_gateway), &endpoint(&target_gateway))?;

    let (code, verdict, termination) = validate(&config).await?;
    ensure!(code == Some(0) && verdict["passed"] == true, "validate failed: {verdict:#}");
    ensure!(termination == verdict, "the termination message differs from the verdict");
    let checks: Vec<&str> = verdict["endpoints"][0]["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(checks, ["token", "login", "listCollections", "changeStream", "historyGuard"]);
    let token = std::fs::read_to_string(&wi.pod.token_file)?;
    ensure!(!verdict.to_string().contains(&token[..40]) && !verdict.to_string().contains("eyJ"), "a token reached the verdict");

    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    let spec = WorkloadSpec { seed: 11, initial_docs_per_collection: 100, large_doc_every: Some(150), ..Default::default() };
    workload::seed(&src, &spec).await?;
    let mut replicator = ReplicatorProcess::start(&["--config".into(), config.display().to_string()], &[])?;
    let load = workload::Workload::start(src.clone(), spec.clone());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stats = load.stop().await?;
    ensure!(stats.total > 100, "the workload did too little: {stats:?}");
    eventually(Duration::from_secs(120), || workload::assert_same_all(&src, &dst))
        .await
        .with_context(|| format!("replicator log ends with:\n{}", replicator.log_tail(15)))?;
    assert_eq!(replicator.terminate(Duration::from_secs(30)).await?, Some(0), "{}", replicator.log_tail(20));

    let (s, t) = (source_gateway.stats(), target_gateway.stats());
    ensure!(s.sasl_start_accepted + s.speculative_accepted > 0 && t.sasl_start_accepted + t.speculative_accepted > 0, "no OIDC login: {s:?} {t:?}");
    ensure!(s.sasl_start_refused == 0 && t.sasl_start_refused == 0, "refused logins: {s:?} {t:?}");
    // Source and target share the identity, so one token served both.
    ensure!(azure.entra.tokens_issued() <= 2, "{} tokens for one identity and one process", azure.entra.tokens_issued());
    ensure!(!replicator.log().contains(&token[..40]), "the service-account token reached the log");
    Ok(())
}

#[tokio::test]
async fn a_federated_credential_still_propagating_is_waited_for_not_fatal() -> Result<()> {
    let wi = workload_identity(EntraOptions { propagation_delay: Duration::from_secs(6), ..Default::default() }).await?;
    let (source, target, _gateway, config) = plain_source_entra_target(&wi, "propagating").await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    src.database("app").collection::<Document>("items").insert_many((0..100).map(|i| doc! {"_id": i})).await?;

    // Right after the credential was created, validate says so (and that it may take a while)...
    let (code, verdict, _) = validate_with_env(&config, &[("SOURCE_URI", source.uri())]).await?;
    ensure!(code == Some(1) && verdict["reason"] == "NoFederatedCredential", "{verdict:#}");
    ensure!(verdict["message"].as_str().unwrap_or_default().contains("few minutes"), "{verdict:#}");
    // ...while the replicator keeps trying and starts once Entra has caught up.
    let mut replicator = ReplicatorProcess::start(&["--config".into(), config.display().to_string()], &[("SOURCE_URI", source.uri())])?;
    let pairs = [("app.items".to_string(), "app.items".to_string())];
    eventually(Duration::from_secs(60), || workload::assert_same(&src, &dst, &pairs))
        .await
        .with_context(|| format!("replicator log ends with:\n{}", replicator.log_tail(15)))?;
    // The retry says why, not the driver's bare "Custom user error".
    let waits: Vec<String> = replicator.log().lines().filter(|l| l.contains("endpoint not reachable yet")).map(str::to_string).collect();
    ensure!(
        !waits.is_empty() && waits.iter().all(|l| l.contains("NoFederatedCredential") && !l.contains("Custom user error")),
        "the wait was not explained:\n{}",
        replicator.log_tail(20)
    );
    assert_eq!(replicator.terminate(Duration::from_secs(30)).await?, Some(0), "{}", replicator.log_tail(20));
    Ok(())
}

#[tokio::test]
async fn an_identity_deleted_mid_stream_stops_the_replicator_with_a_plain_reason() -> Result<()> {
    let wi = workload_identity(EntraOptions { token_lifetime: Duration::from_secs(8), ..Default::default() }).await?;
    let azure = &wi.azure;
    let (source, target, _gateway, config) = plain_source_entra_target(&wi, "deleted").await?;
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    let items = src.database("app").collection::<Document>("items");
    items.insert_one(doc! {"_id": 0}).await?;
    let mut replicator = ReplicatorProcess::start(&["--config".into(), config.display().to_string()], &[("SOURCE_URI", source.uri())])?;
    let pairs = [("app.items".to_string(), "app.items".to_string())];
    eventually(Duration::from_secs(60), || workload::assert_same(&src, &dst, &pairs)).await.with_context(|| replicator.log_tail(15))?;

    // The managed identity is deleted; once the token expires, Entra no longer knows the client.
    ensure!(azure.arm.remove_identity(&wi.identity.resource_id));
    for i in 1..=40 {
        items.insert_one(doc! {"_id": i}).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let code = replicator.wait(Duration::from_secs(60)).await?;
    ensure!(code == Some(4), "exit code {code:?}, expected 4 (refused for good):\n{}", replicator.log_tail(20));
    let log = replicator.log();
    let last = log.lines().rev().find(|l| l.contains("\"ERROR\"")).unwrap_or_default();
    ensure!(last.contains("ManagedIdentityNotFound") && last.contains("AADSTS700016"), "the final error does not say why:\n{last}");
    eprintln!("{last}");
    // Everything acknowledged before the token ran out is in the target, checkpointed.
    let applied = dst.database("app").collection::<Document>("items").count_documents(doc! {}).await?;
    ensure!(applied >= 1, "nothing applied");
    Ok(())
}

#[tokio::test]
async fn validate_refuses_a_wrong_scram_password_without_showing_it() -> Result<()> {
    let user = ScramUser::new("replicator", "right-password", &[("admin", "root")]);
    let server = SecantusServer::start(SecantusOptions { users: vec![user.clone()], ..Default::default() }).await?;
    let wrong = ScramUser::new("replicator", "wr0ng-passw0rd", &[]);
    let dir = tempdir::Dir::new("validate-scram")?;
    let endpoint = "\n  auth: connectionString\n  uriEnv: MONGO_URI";
    let config = write_config(&dir.0, "data/scram", endpoint, endpoint)?;

    let (code, verdict, _) = validate_with_env(&config, &[("MONGO_URI", server.uri_for(&user))]).await?;
    ensure!(code == Some(0) && verdict["passed"] == true, "{verdict:#}");
    let (code, verdict, termination) = validate_with_env(&config, &[("MONGO_URI", server.uri_for(&wrong))]).await?;
    ensure!(code == Some(1) && verdict["reason"] == "LoginFailed", "{verdict:#}");
    ensure!(verdict["message"].as_str().unwrap_or_default().starts_with("source: login:"), "{verdict:#}");
    for shown in [verdict.to_string(), termination.to_string()] {
        ensure!(!shown.contains("wr0ng-passw0rd"), "the password was shown: {shown}");
    }
    Ok(())
}

#[tokio::test]
async fn validate_names_each_entra_failure_plainly() -> Result<()> {
    let kube = KubeLab::shared().await?;
    let wi = workload_identity(EntraOptions::default()).await?;
    let azure = &wi.azure;
    let registered = wi.identity.principal_id.clone();
    let (_source_server, source_gateway) = cluster(azure, "v-source", Some(&registered)).await?;
    // Each identity below is also a user of the target, so only the failure under test shows.
    let target_server = SecantusServer::start(SecantusOptions::default()).await?;
    let target_cluster = azure.create_cluster(&format!("v-target-{}", rand::random::<u16>()));
    azure.register_cluster_user(&target_cluster, &registered).await?;
    let target_gateway = azure.gateway(&target_server, &target_cluster).await?;
    let source = entra_endpoint(azure, &azure.gateway_uri(&source_gateway), &wi.identity.client_id, azure.tenant_id(), &wi.pod.token_file);
    let issuer = kube.issuer().to_string();

    struct Case {
        name: &'static str,
        reason: &'static str,
        hint: &'static str,
        client_id: String,
        tenant_id: String,
        token_file: PathBuf,
    }
    let mut cases = Vec::new();
    let case = |name, reason, hint, identity: &LabIdentity, token_file: &Path| Case {
        name,
        reason,
        hint,
        client_id: identity.client_id.clone(),
        tenant_id: azure.tenant_id().to_string(),
        token_file: token_file.to_path_buf(),
    };
    let new_identity = |label: &str| azure.create_identity(&format!("{label}-{}", rand::random::<u32>()));

    let no_credential = new_identity("no-credential");
    azure.register_cluster_user(&target_cluster, &no_credential.principal_id).await?;
    cases.push(case("no federated credential", "NoFederatedCredential", "create one", &no_credential, &wi.pod.token_file));

    let wrong_subject = new_identity("wrong-subject");
    azure.add_federated_credential(&wrong_subject, "other-sa", &issuer, "system:serviceaccount:elsewhere:other", TOKEN_EXCHANGE_AUDIENCE).await?;
    cases.push(case("wrong subject", "FederatedCredentialSubjectMismatch", "system:serviceaccount:<namespace>", &wrong_subject, &wi.pod.token_file));

    let wrong_issuer = new_identity("wrong-issuer");
    azure
        .add_federated_credential(&wrong_issuer, "other-cluster", "https://oidc.example.invalid/", &wi.pod.subject(), TOKEN_EXCHANGE_AUDIENCE)
        .await?;
    cases.push(case("wrong issuer", "FederatedCredentialIssuerMismatch", "issuer", &wrong_issuer, &wi.pod.token_file));

    let odd_audience = PodIdentity::mint_with_audience(kube, azure.dir(), &wi.pod.namespace, "odd-audience", "api://not-token-exchange").await?;
    let wrong_audience = new_identity("wrong-audience");
    azure.add_federated_credential(&wrong_audience, "odd", &issuer, &odd_audience.subject(), TOKEN_EXCHANGE_AUDIENCE).await?;
    cases.push(case(
        "wrong audience",
        "FederatedCredentialAudienceMismatch",
        "api://AzureADTokenExchange",
        &wrong_audience,
        &odd_audience.token_file,
    ));

    let stale = PodIdentity::mint(kube, azure.dir(), &wi.pod.namespace, "stale").await?;
    let expired = new_identity("expired");
    azure.add_federated_credential(&expired, "stale", &issuer, &stale.subject(), TOKEN_EXCHANGE_AUDIENCE).await?;
    stale.expire(kube)?;
    cases.push(case("expired service-account token", "ServiceAccountTokenExpired", "expired", &expired, &stale.token_file));

    let mut unknown_client = case("unknown client", "ManagedIdentityNotFound", "clientId", &wi.identity, &wi.pod.token_file);
    unknown_client.client_id = "0b5f6a43-1111-4222-8333-944455556666".into();
    cases.push(unknown_client);
    let mut unknown_tenant = case("unknown tenant", "TenantNotFound", "tenantId", &wi.identity, &wi.pod.token_file);
    unknown_tenant.tenant_id = "7d1c9e20-aaaa-4bbb-8ccc-0123456789ab".into();
    cases.push(unknown_tenant);

    let missing = wi.dir.0.join("no-such-token");
    cases.push(case("no projected token", "ServiceAccountTokenUnreadable", "azure.workload.identity/use=true", &wi.identity, &missing));

    let not_a_user = new_identity("not-a-user");
    azure.add_federated_credential(&not_a_user, "lab", &issuer, &wi.pod.subject(), TOKEN_EXCHANGE_AUDIENCE).await?;
    cases.push(case("not a user of the cluster", "LoginFailed", "user of the cluster", &not_a_user, &wi.pod.token_file));

    let mut messages = std::collections::HashSet::new();
    for case in &cases {
        let target = entra_endpoint(azure, &azure.gateway_uri(&target_gateway), &case.client_id, &case.tenant_id, &case.token_file);
        let config = write_config(&wi.dir.0, &format!("v/{}", case.reason), &source, &target)?;
        let (code, verdict, termination) = validate(&config).await?;
        ensure!(code == Some(1), "{}: exit code {code:?}: {verdict:#}", case.name);
        ensure!(verdict["passed"] == false && verdict["reason"] == case.reason, "{}: expected reason {}, got {verdict:#}", case.name, case.reason);
        let message = verdict["message"].as_str().unwrap_or_default();
        ensure!(message.starts_with("target: ") && message.contains(case.hint), "{}: message lacks {:?}: {message}", case.name, case.hint);
        ensure!(termination["reason"] == case.reason, "{}: termination message {termination}", case.name);
        ensure!(
            verdict["endpoints"][0]["checks"].as_array().unwrap().iter().all(|c| c["passed"] == true),
            "{}: the source failed too: {verdict:#}",
            case.name
        );
        ensure!(!message.contains("eyJ") && !message.contains("Trace ID"), "{}: {message}", case.name);
        eprintln!("{}: {message}", case.name);
        messages.insert(message.to_string());
    }
    ensure!(messages.len() == cases.len(), "two failures read the same");
    Ok(())
}

fn oidc_identity(wi: &Workload) -> auth::oidc::Identity {
    auth::oidc::Identity {
        client_id: wi.identity.client_id.clone(),
        tenant_id: wi.azure.tenant_id().to_string(),
        scope: "https://ossrdbms-aad.database.windows.net/.default".into(),
        authority_host: wi.azure.entra.authority_host(),
        token_file: wi.pod.token_file.clone(),
        ca_file: Some(wi.azure.ca_file().to_path_buf()),
    }
}

#[tokio::test]
async fn a_refused_token_is_replaced_a_good_one_reused_and_the_deadline_kept() -> Result<()> {
    use auth::oidc::{EntraMetrics, TokenSource};
    let wi = workload_identity(EntraOptions::default()).await?;
    let entra = &wi.azure.entra;
    let source = TokenSource::new(oidc_identity(&wi), EntraMetrics::new())?;
    let first = source.token(None, None).await?;
    let again = source.token(None, None).await?;
    ensure!(again.generation == first.generation && entra.token_requests() == 1, "a fresh token was not reused");
    // The driver comes back with the token it was given: the server refused it.
    let replaced = source.token(Some(first.generation), None).await?;
    ensure!(replaced.generation > first.generation && replaced.secret() != first.secret(), "the refused token came back");
    ensure!(entra.token_requests() == 2);
    // Another client refused with the older token gets the new one without another call.
    let current = source.token(Some(first.generation), None).await?;
    ensure!(current.generation == replaced.generation && entra.token_requests() == 2);

    // A slow Entra: the driver's deadline is kept, and the error says what happened.
    entra.set_latency(Duration::from_secs(5));
    let started = Instant::now();
    let err = source.token(Some(current.generation), Some(Instant::now() + Duration::from_millis(500))).await.unwrap_err();
    ensure!(started.elapsed() < Duration::from_secs(2), "the deadline was not kept: {:?}", started.elapsed());
    ensure!(err.reason() == "EntraTimeout" && err.is_transient(), "{err}");
    Ok(())
}

#[tokio::test]
async fn fifty_concurrent_connections_make_one_entra_call() -> Result<()> {
    let wi = workload_identity(EntraOptions { latency: Duration::from_millis(200), ..Default::default() }).await?;
    let azure = &wi.azure;
    let (server, gateway) = cluster(azure, "fifty", Some(&wi.identity.principal_id)).await?;
    let endpoint = entra_endpoint(azure, &azure.gateway_uri(&gateway), &wi.identity.client_id, azure.tenant_id(), &wi.pod.token_file);
    let config = write_config(&wi.dir.0, "data/fifty", &endpoint, &endpoint)?;
    let config = ReplicatorConfig::from_file(&config)?;

    // Fifty clients (each with its own driver token cache) connect at once: the shared token
    // source lets one request through to Entra and the others wait for its answer.
    let tokens = auth::oidc::TokenSources::default();
    let mut clients = Vec::new();
    for _ in 0..50 {
        let options = config.target.client_options(EndpointRole::Target, &tokens).await?;
        clients.push(mongodb::Client::with_options(options)?);
    }
    let started = Instant::now();
    let pings = clients.iter().map(|c| async move { c.database("admin").run_command(doc! {"ping": 1}).await });
    for result in futures::future::join_all(pings).await {
        result.context("a ping through the gateway failed")?;
    }
    let elapsed = started.elapsed();
    ensure!(azure.entra.token_requests() == 1, "{} Entra calls for 50 connections", azure.entra.token_requests());
    let stats = gateway.stats();
    ensure!(stats.connections >= 50 && stats.sasl_start_accepted >= 50, "{stats:?}");
    let metrics = tokens.metrics();
    ensure!(metrics.acquisitions(&wi.identity.client_id) == 1);
    eprintln!("50 OIDC logins with one Entra call in {elapsed:?}");
    drop(server);
    Ok(())
}

#[tokio::test]
async fn tokens_expiring_every_30_seconds_for_3_minutes_cost_no_operation() -> Result<()> {
    let wi = workload_identity(EntraOptions { token_lifetime: Duration::from_secs(30), ..Default::default() }).await?;
    let azure = &wi.azure;
    let (source, source_gateway) = cluster(azure, "expiry-src", Some(&wi.identity.principal_id)).await?;
    let (target, target_gateway) = cluster(azure, "expiry-dst", Some(&wi.identity.principal_id)).await?;
    let endpoint =
        |gateway: &OidcGateway| entra_endpoint(azure, &azure.gateway_uri(gateway), &wi.identity.client_id, azure.tenant_id(), &wi.pod.token_file);
    let config = write_config(&wi.dir.0, "data/expiry", &endpoint(&source_gateway), &endpoint(&target_gateway))?;
    let port = mongo_replicator_lab::process::free_port()?;
    let args: Vec<String> = vec!["--config".into(), config.display().to_string(), "--metrics-address".into(), format!("127.0.0.1:{port}")];
    let (src, dst) = (source.admin_client().await?, target.admin_client().await?);
    let spec = WorkloadSpec { seed: 30, initial_docs_per_collection: 50, large_doc_every: None, writers: 1, ..Default::default() };
    workload::seed(&src, &spec).await?;
    let mut replicator = ReplicatorProcess::start(&args, &[])?;

    // Three minutes of steady writes, a few hundred operations every second.
    let until = Instant::now() + Duration::from_secs(185);
    let mut round = 0u64;
    while Instant::now() < until {
        round += 1;
        workload::run_for(src.clone(), WorkloadSpec { seed: 1000 + round, ..spec.clone() }, 100).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eventually(Duration::from_secs(120), || workload::assert_same_all(&src, &dst))
        .await
        .with_context(|| format!("replicator log ends with:\n{}", replicator.log_tail(15)))?;

    let metrics = mongo_replicator_lab::process::http_get(port, "/metrics").await?;
    let value = |series: &str| metrics.lines().find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok()).unwrap_or_default();
    let (source_reauth, target_reauth) = (
        value("mongo_replicator_mongodb_reauthentications_total{endpoint=\"source\"}"),
        value("mongo_replicator_mongodb_reauthentications_total{endpoint=\"target\"}"),
    );
    ensure!(source_reauth >= 3.0 && target_reauth >= 3.0, "re-authentications: source {source_reauth}, target {target_reauth}");
    for operation in ["write", "read", "stream"] {
        let retries = value(&format!("mongo_replicator_retries_total{{operation=\"{operation}\"}}"));
        ensure!(retries == 0.0, "{retries} {operation} operations failed and were retried:\n{}", replicator.log_tail(30));
    }
    let (s, t) = (source_gateway.stats(), target_gateway.stats());
    ensure!(s.reauth_required_sent >= 3 && t.reauth_required_sent >= 3, "the gateways expired too few tokens: {s:?} {t:?}");
    ensure!(s.sasl_start_refused + t.sasl_start_refused == 0, "a token was refused: {s:?} {t:?}");
    // About one token per half-life (15 s) for one identity, not one per connection.
    let issued = azure.entra.tokens_issued();
    ensure!((6..=40).contains(&issued), "{issued} tokens in 3 minutes");
    assert_eq!(replicator.terminate(Duration::from_secs(30)).await?, Some(0), "{}", replicator.log_tail(20));
    eprintln!(
        "3 min with 30 s tokens: {issued} tokens, re-authentications source {source_reauth} target {target_reauth}, gateway 391s {} + {}",
        s.reauth_required_sent, t.reauth_required_sent
    );
    Ok(())
}
