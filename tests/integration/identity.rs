//! Identity bindings through the operator, fault by fault, against the ARM and Entra doubles:
//! each fault ends bound or with its own `IdentityBound` reason, and the credentials the double
//! holds at the end are counted — never a duplicate, never a leak. The operator has its own
//! Azure identity, as the chart gives it; one test installs the chart so the real webhook gives
//! the operator pod that identity.
//!
//! The replications here watch only their bindings: their endpoints name a tenant the Entra
//! double does not know, so each validation fails once, for good (`TenantNotFound`), and no
//! pods pile up. The Entra → Entra example that binds, validates and replicates is in
//! `operator_entra`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Event};
use kube::api::{Api, ListParams, Patch, PatchParams};
use mongo_replicator::crd::{AzureObject, MongoReplication};
use mongo_replicator::operator::identity::{FINALIZER, KEEP_ANNOTATION};
use mongo_replicator_lab::azure::LabIdentity;
use mongo_replicator_lab::entra::TOKEN_EXCHANGE_AUDIENCE;
use mongo_replicator_lab::image::REPLICATOR_IMAGE;
use mongo_replicator_lab::node::{NODE_ADDRESS, NodeLab, Relay};
use mongo_replicator_lab::workload::{self, WorkloadSpec};
use mongo_replicator_lab::{SecantusOptions, SecantusServer};
use serde_json::{Value, json};

use crate::chart::{CHART, Helm, text};
use crate::operator::{Operator, apply, condition, in_pod, put_secret, wait_condition};
use crate::operator_entra::{EntraLab, point_entra};
use crate::support::{TEST_MANAGER, eventually, install_crd};

const REPLICATOR_BIN: &str = env!("CARGO_BIN_EXE_mongo-replicator");
/// A tenant the Entra double does not know: validation stops at `TenantNotFound`.
const UNKNOWN_TENANT: &str = "0badc0de-0000-4000-8000-000000000000";
const SUBSCRIPTION: &str = "3f2c4a1e-0000-4000-8000-00000000a2b1";

/// One line of the fault matrix.
struct Row {
    fault: &'static str,
    outcome: String,
    credentials: usize,
}

fn print_matrix(title: &str, rows: &[Row]) {
    eprintln!("\n{title}\n| fault | outcome | credentials at the end |\n| --- | --- | --- |");
    for row in rows {
        eprintln!("| {} | {} | {} |", row.fault, row.outcome, row.credentials);
    }
}

/// A replication that only binds: both endpoints log in as `identity` (bound once), in a tenant
/// validation cannot reach; `user` adds a `clusterUser` to the source.
fn binding_only(name: &str, identity: &LabIdentity, identity_id: Option<&str>, user: Option<Value>) -> Value {
    let mut entra = json!({"clientId": identity.client_id, "tenantId": UNKNOWN_TENANT});
    if let Some(id) = identity_id {
        entra["managedIdentityResourceId"] = json!(id);
    }
    let mut source = json!({"auth": "entra", "uri": format!("mongodb://{NODE_ADDRESS}:9/?directConnection=true"), "entra": entra.clone()});
    if let Some(user) = user {
        source["entra"]["clusterUser"] = user;
    }
    json!({
        "apiVersion": "mongo-replicator.io/v1alpha1", "kind": "MongoReplication", "metadata": {"name": name},
        "spec": {"source": source, "target": {"auth": "entra", "uri": format!("mongodb://{NODE_ADDRESS}:9/?directConnection=true"), "entra": entra}},
    })
}

fn credentials_of(lab: &EntraLab, identity: &LabIdentity) -> usize {
    lab.azure.arm.identity(&identity.resource_id).map(|i| i.credentials.len()).unwrap_or_default()
}

fn created(r: &MongoReplication) -> Vec<AzureObject> {
    r.status.as_ref().and_then(|s| s.azure.as_ref()).map(|a| a.created.clone()).unwrap_or_default()
}

fn has_finalizer(r: &MongoReplication) -> bool {
    r.metadata.finalizers.iter().flatten().any(|f| f == FINALIZER)
}

async fn wait_gone(api: &Api<MongoReplication>, name: &str, operator: &Operator) -> Result<()> {
    eventually(Duration::from_secs(120), || async {
        ensure!(api.get_opt(name).await?.is_none(), "{name} is still there");
        Ok(())
    })
    .await
    .with_context(|| operator.log_tail(20))
}

async fn setup(prefix: &str) -> Result<(&'static NodeLab, kube::Client, String, EntraLab)> {
    let node = NodeLab::shared(Path::new(REPLICATOR_BIN)).await?;
    let client = node.kube().client().await?;
    install_crd(&client).await?;
    let ns = node.namespace(prefix).await?;
    let lab = EntraLab::start(node).await?;
    Ok((node, client, ns, lab))
}

#[tokio::test]
async fn arm_throttling_conflicts_and_server_errors_end_bound_without_a_duplicate() -> Result<()> {
    let (node, client, ns, lab) = setup("bind-transient").await?;
    let (operator, _) = lab.operator_with_identity(node, &ns, &[]).await?;
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    let arm = &lab.azure.arm;
    let mut rows = Vec::new();

    // 429 with Retry-After: honoured, within the request.
    let identity = lab.identity("throttled");
    arm.throttle_next_writes(2, 3);
    let started = Instant::now();
    apply(&api, &binding_only("throttled", &identity, Some(&identity.resource_id), None)).await?;
    let r = wait_condition(&api, "throttled", "IdentityBound", "True", None, Some(&operator)).await?;
    let waited = started.elapsed();
    ensure!(waited >= Duration::from_secs(6), "bound after {waited:?}: the two Retry-After: 3 were not honoured");
    ensure!(credentials_of(&lab, &identity) == 1 && created(&r).len() == 1 && has_finalizer(&r));
    rows.push(Row { fault: "ARM 429, `Retry-After: 3` (2 writes)", outcome: format!("bound after {waited:.1?}"), credentials: 1 });

    // 409 from someone else's write, and 500s: retried with backoff inside one request.
    for (fault, status, name) in [("409 conflicting write (3 writes)", 409, "conflicted"), ("ARM 500 (3 writes)", 500, "erroring")] {
        let identity = lab.identity(name);
        arm.fail_next_writes(3, status);
        apply(&api, &binding_only(name, &identity, Some(&identity.resource_id), None)).await?;
        let r = wait_condition(&api, name, "IdentityBound", "True", None, Some(&operator)).await?;
        ensure!(credentials_of(&lab, &identity) == 1 && created(&r).len() == 1, "{name}: {:?}", lab.azure.arm.identity(&identity.resource_id));
        rows.push(Row { fault, outcome: "bound (retried inside the request)".into(), credentials: 1 });
    }

    // 500s beyond one request's attempts: the condition says so, the reconcile backs off, and
    // the next reconciles finish the job. The record kept through the failures names one object.
    let identity = lab.identity("outage");
    arm.fail_next_writes(10, 500);
    let started = Instant::now();
    apply(&api, &binding_only("outage", &identity, Some(&identity.resource_id), None)).await?;
    let failing = wait_condition(&api, "outage", "IdentityBound", "False", Some("ArmUnavailable"), Some(&operator)).await?;
    ensure!(condition(&failing, "Stalled").is_some_and(|c| c.status == "False"), "a transient failure stalled: {:?}", failing.status);
    ensure!(condition(&failing, "IdentityBound").is_some_and(|c| c.message.contains("retrying")));
    let r = wait_condition(&api, "outage", "IdentityBound", "True", None, Some(&operator)).await?;
    ensure!(credentials_of(&lab, &identity) == 1 && created(&r).len() == 1);
    rows.push(Row {
        fault: "ARM 500 for 10 writes (beyond a request's 4 attempts)",
        outcome: format!("`IdentityBound=False ArmUnavailable` (retrying, not Stalled), then bound after {:.1?}", started.elapsed()),
        credentials: 1,
    });

    // Everything the operator created goes on delete, finalizers and all.
    for name in ["throttled", "conflicted", "erroring", "outage"] {
        api.delete(name, &Default::default()).await?;
    }
    for name in ["throttled", "conflicted", "erroring", "outage"] {
        wait_gone(&api, name, &operator).await?;
    }
    let left: Vec<_> = arm.all_credentials().into_iter().filter(|(identity, _)| !identity.starts_with("mongo-replicator-operator")).collect();
    ensure!(left.is_empty(), "credentials left after delete: {left:?}");
    print_matrix("Identity bindings: transient ARM faults", &rows);
    Ok(())
}

#[tokio::test]
async fn what_a_person_must_fix_gets_its_own_reason_and_nothing_is_created() -> Result<()> {
    let (node, client, ns, lab) = setup("bind-refused").await?;
    let (operator, _) = lab.operator_with_identity(node, &ns, &[]).await?;
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    let issuer = node.kube().issuer().to_string();
    let arm = &lab.azure.arm;
    let mut rows = Vec::new();
    let stalled_with = |r: &MongoReplication, reason: &str| -> Result<()> {
        ensure!(condition(r, "Stalled").is_some_and(|c| c.status == "True" && c.reason == reason), "{:?}", r.status);
        ensure!(!has_finalizer(r) && created(r).is_empty(), "something was recorded: {:?} {:?}", r.metadata.finalizers, created(r));
        Ok(())
    };

    // An identity that does not exist; once someone creates it, the binding follows on its own.
    let later = lab.identity("created-later");
    arm.remove_identity(&later.resource_id);
    apply(&api, &binding_only("no-identity", &later, Some(&later.resource_id), None)).await?;
    let r = wait_condition(&api, "no-identity", "IdentityBound", "False", Some("IdentityNotFound"), Some(&operator)).await?;
    stalled_with(&r, "IdentityNotFound")?;
    arm.add_identity(&later.resource_id, &later.client_id, &later.principal_id, lab.azure.tenant_id());
    wait_condition(&api, "no-identity", "IdentityBound", "True", None, Some(&operator)).await?;
    rows.push(Row {
        fault: "managed identity does not exist",
        outcome: "`IdentityNotFound`, Stalled, nothing recorded; bound once the identity was created (no edit)".into(),
        credentials: credentials_of(&lab, &later),
    });

    // The limit of 20 credentials per identity.
    let full = lab.identity("full");
    for i in 0..20 {
        lab.azure
            .add_federated_credential(
                &full,
                &format!("other-{i}"),
                &issuer,
                &format!("system:serviceaccount:elsewhere:sa-{i}"),
                TOKEN_EXCHANGE_AUDIENCE,
            )
            .await?;
    }
    apply(&api, &binding_only("full", &full, Some(&full.resource_id), None)).await?;
    let r = wait_condition(&api, "full", "IdentityBound", "False", Some("FederatedCredentialLimit"), Some(&operator)).await?;
    stalled_with(&r, "FederatedCredentialLimit")?;
    ensure!(condition(&r, "IdentityBound").is_some_and(|c| c.message.contains("20") && c.message.contains(&full.resource_id)));
    ensure!(credentials_of(&lab, &full) == 20);
    rows.push(Row { fault: "identity already holds 20 credentials", outcome: "`FederatedCredentialLimit`, Stalled".into(), credentials: 20 });

    // A credential for this very issuer and subject, made by hand: used, never duplicated, never removed.
    let by_hand = lab.identity("by-hand");
    let subject = format!("system:serviceaccount:{ns}:adopted-replicator");
    lab.azure.add_federated_credential(&by_hand, "made-by-hand", &issuer, &subject, TOKEN_EXCHANGE_AUDIENCE).await?;
    apply(&api, &binding_only("adopted", &by_hand, Some(&by_hand.resource_id), None)).await?;
    let r = wait_condition(&api, "adopted", "IdentityBound", "True", None, Some(&operator)).await?;
    ensure!(condition(&r, "IdentityBound").is_some_and(|c| c.message.contains("made-by-hand")), "{:?}", r.status);
    ensure!(!has_finalizer(&r) && created(&r).is_empty(), "an adopted credential was recorded as created");
    api.delete("adopted", &Default::default()).await?;
    wait_gone(&api, "adopted", &operator).await?;
    ensure!(credentials_of(&lab, &by_hand) == 1, "the hand-made credential was touched");
    rows.push(Row {
        fault: "same issuer and subject already registered by hand",
        outcome: "adopted: bound, not recorded, no finalizer; left in place on delete".into(),
        credentials: 1,
    });

    // The same issuer and subject for another audience: a person must choose.
    let odd = lab.identity("odd-audience");
    lab.azure.add_federated_credential(&odd, "odd", &issuer, &format!("system:serviceaccount:{ns}:odd-replicator"), "api://something-else").await?;
    apply(&api, &binding_only("odd", &odd, Some(&odd.resource_id), None)).await?;
    let r = wait_condition(&api, "odd", "IdentityBound", "False", Some("DuplicateIssuerSubject"), Some(&operator)).await?;
    stalled_with(&r, "DuplicateIssuerSubject")?;
    rows.push(Row {
        fault: "same issuer and subject, other audience",
        outcome: "`DuplicateIssuerSubject`, Stalled".into(),
        credentials: credentials_of(&lab, &odd),
    });

    // Cluster users: someone else's user with other roles; a cluster that does not exist; a
    // cluster without Entra sign-in.
    let member = lab.identity("member");
    let cluster = lab.azure.create_cluster(&format!("shared-{}", rand::random::<u16>()));
    lab.azure.register_cluster_user(&cluster, &member.principal_id).await?;
    let user = |cluster: &str| json!({"clusterResourceId": cluster, "principalId": member.principal_id, "roles": [{"db": "admin", "role": "readAnyDatabase"}]});
    apply(&api, &binding_only("other-roles", &member, None, Some(user(&cluster)))).await?;
    let r = wait_condition(&api, "other-roles", "IdentityBound", "False", Some("ClusterUserRolesDiffer"), Some(&operator)).await?;
    stalled_with(&r, "ClusterUserRolesDiffer")?;
    let roles = arm.cluster_user_roles(&cluster, &member.principal_id).context("the user is gone")?;
    ensure!(roles == [("admin".to_string(), "root".to_string())], "the user's roles were changed: {roles:?}");
    rows.push(Row {
        fault: "principal already a cluster user with other roles",
        outcome: "`ClusterUserRolesDiffer`, Stalled, roles untouched".into(),
        credentials: 0,
    });

    let nowhere = format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/lab/providers/Microsoft.DocumentDB/mongoClusters/nowhere");
    apply(&api, &binding_only("no-cluster", &member, None, Some(user(&nowhere)))).await?;
    let r = wait_condition(&api, "no-cluster", "IdentityBound", "False", Some("ClusterNotFound"), Some(&operator)).await?;
    stalled_with(&r, "ClusterNotFound")?;
    rows.push(Row { fault: "DocumentDB cluster does not exist", outcome: "`ClusterNotFound`, Stalled".into(), credentials: 0 });

    let native =
        format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/lab/providers/Microsoft.DocumentDB/mongoClusters/native-{}", rand::random::<u16>());
    arm.add_cluster(&native, &["NativeAuth"]);
    apply(&api, &binding_only("native-only", &member, None, Some(user(&native)))).await?;
    let r = wait_condition(&api, "native-only", "IdentityBound", "False", Some("EntraNotAllowedOnCluster"), Some(&operator)).await?;
    stalled_with(&r, "EntraNotAllowedOnCluster")?;
    ensure!(arm.cluster_users(&native).is_empty());
    rows.push(Row { fault: "cluster does not allow Entra sign-in", outcome: "`EntraNotAllowedOnCluster`, Stalled, no user".into(), credentials: 0 });

    // Nothing was created for any of them: deletes are immediate, and nothing is left behind.
    for name in ["no-identity", "full", "odd", "other-roles", "no-cluster", "native-only"] {
        api.delete(name, &Default::default()).await?;
    }
    for name in ["no-identity", "full", "odd", "other-roles", "no-cluster", "native-only"] {
        wait_gone(&api, name, &operator).await?;
    }
    ensure!(credentials_of(&lab, &later) == 0, "the credential of no-identity was left behind");
    ensure!(credentials_of(&lab, &full) == 20 && credentials_of(&lab, &odd) == 1);
    print_matrix("Identity bindings: what a person must fix", &rows);
    Ok(())
}

#[tokio::test]
async fn without_permission_nothing_is_created_and_a_refused_cleanup_holds_the_object_with_a_reason() -> Result<()> {
    let (node, client, ns, lab) = setup("bind-forbidden").await?;
    let (operator, own) = lab.operator_with_identity(node, &ns, &[]).await?;
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    let arm = &lab.azure.arm;
    let mut rows = Vec::new();

    // The operator's identity may read but not write: nothing is created, the condition says what to grant.
    let identity = lab.identity("guarded");
    arm.deny_writes_by(Some(&own.principal_id));
    apply(&api, &binding_only("guarded", &identity, Some(&identity.resource_id), None)).await?;
    let r = wait_condition(&api, "guarded", "IdentityBound", "False", Some("ArmForbidden"), Some(&operator)).await?;
    ensure!(condition(&r, "Stalled").is_some_and(|c| c.status == "True"), "{:?}", r.status);
    ensure!(condition(&r, "IdentityBound").is_some_and(|c| c.message.contains("grant it a role")), "{:?}", r.status);
    ensure!(!has_finalizer(&r) && created(&r).is_empty() && credentials_of(&lab, &identity) == 0);
    // Granted later: bound on the next try, without touching the object.
    arm.deny_writes_by(None);
    wait_condition(&api, "guarded", "IdentityBound", "True", None, Some(&operator)).await?;
    rows.push(Row {
        fault: "operator's identity lacks permission (403)",
        outcome: "`ArmForbidden`, Stalled, nothing recorded; bound once granted (no edit)".into(),
        credentials: credentials_of(&lab, &identity),
    });

    // A refused cleanup keeps the object, says why, and backs off; granted, it finishes.
    arm.deny_writes_by(Some(&own.principal_id));
    let requests = arm.request_count();
    api.delete("guarded", &Default::default()).await?;
    let r = wait_condition(&api, "guarded", "IdentityBound", "False", Some("ArmForbidden"), Some(&operator)).await?;
    ensure!(r.metadata.deletion_timestamp.is_some() && has_finalizer(&r));
    ensure!(condition(&r, "IdentityBound").is_some_and(|c| c.message.contains(KEEP_ANNOTATION)), "{:?}", r.status);
    let events = Api::<Event>::namespaced(client.clone(), &ns).list(&ListParams::default()).await?.items;
    ensure!(events.iter().any(|e| e.reason.as_deref() == Some("ArmForbidden") && e.type_.as_deref() == Some("Warning")), "no Warning Event");
    tokio::time::sleep(Duration::from_secs(20)).await;
    let during = arm.request_count() - requests;
    ensure!(during < 40, "{during} ARM requests in 20 s of a refused cleanup: a hot loop");
    arm.deny_writes_by(None);
    wait_gone(&api, "guarded", &operator).await?;
    ensure!(credentials_of(&lab, &identity) == 0);
    rows.push(Row {
        fault: "cleanup refused (403) on delete",
        outcome: format!("Terminating with `IdentityBound=False ArmForbidden` and a Warning Event, {during} ARM requests in 20 s; gone once granted"),
        credentials: 0,
    });

    // The keep annotation leaves the credential in place on delete.
    let kept = lab.identity("kept");
    let mut object = binding_only("kept", &kept, Some(&kept.resource_id), None);
    object["metadata"]["annotations"] = json!({KEEP_ANNOTATION: "true"});
    apply(&api, &object).await?;
    wait_condition(&api, "kept", "IdentityBound", "True", None, Some(&operator)).await?;
    api.delete("kept", &Default::default()).await?;
    wait_gone(&api, "kept", &operator).await?;
    ensure!(credentials_of(&lab, &kept) == 1, "the kept credential was removed");
    rows.push(Row {
        fault: "`mongo-replicator.io/keep-azure-objects: \"true\"`, then delete",
        outcome: "deleted at once, credential left".into(),
        credentials: 1,
    });
    print_matrix("Identity bindings: permissions and cleanup", &rows);
    Ok(())
}

#[tokio::test]
async fn an_operator_killed_between_the_arm_write_and_its_status_write_leaks_nothing() -> Result<()> {
    let (node, client, ns, lab) = setup("bind-killed").await?;
    let (env, _) = lab.operator_env(node, &ns).await?;
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let operator = Operator::start_with_env(node, &ns, &env).await?;
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    let arm = &lab.azure.arm;

    // ARM applies the write at once and answers 4 s later: the operator dies in between.
    arm.set_write_latency(Duration::from_secs(4));
    let identity = lab.identity("interrupted");
    apply(&api, &binding_only("interrupted", &identity, Some(&identity.resource_id), None)).await?;
    eventually(Duration::from_secs(60), || async {
        ensure!(arm.writes_in_flight() > 0, "no credential write in flight yet");
        Ok(())
    })
    .await?;
    operator.kill().await?;
    ensure!(credentials_of(&lab, &identity) == 1, "the write was not applied before the kill");
    // The record was written before the call: it names what ARM now holds.
    let r = api.get("interrupted").await?;
    ensure!(has_finalizer(&r) && created(&r).len() == 1, "no record of the write in flight: {:?}", r.status);
    arm.set_write_latency(Duration::from_millis(50));

    let operator = Operator::start_with_env(node, &ns, &env).await?;
    let r = wait_condition(&api, "interrupted", "IdentityBound", "True", None, Some(&operator)).await?;
    ensure!(credentials_of(&lab, &identity) == 1 && created(&r).len() == 1, "{:?}", lab.azure.arm.identity(&identity.resource_id));
    api.delete("interrupted", &Default::default()).await?;
    wait_gone(&api, "interrupted", &operator).await?;
    ensure!(credentials_of(&lab, &identity) == 0, "the credential leaked");
    print_matrix(
        "Identity bindings: a crash",
        &[Row {
            fault: "operator SIGKILLed with the ARM write applied, answer not received",
            outcome: "restarted operator: bound, one record; removed on delete".into(),
            credentials: 0,
        }],
    );
    Ok(())
}

#[tokio::test]
async fn ten_replications_sharing_one_identity_bind_with_their_writes_serialised() -> Result<()> {
    let (node, client, ns, lab) = setup("bind-ten").await?;
    let (operator, _) = lab.operator_with_identity(node, &ns, &[]).await?;
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    let arm = &lab.azure.arm;
    // Each write holds the identity for 250 ms: overlapping writes would get 409.
    arm.set_write_latency(Duration::from_millis(250));
    let shared = lab.identity("shared");
    let names: Vec<String> = (0..10).map(|i| format!("team-{i}")).collect();
    let started = Instant::now();
    for name in &names {
        apply(&api, &binding_only(name, &shared, Some(&shared.resource_id), None)).await?;
    }
    for name in &names {
        wait_condition(&api, name, "IdentityBound", "True", None, Some(&operator)).await?;
    }
    let bind_time = started.elapsed();
    let credentials = lab.azure.arm.identity(&shared.resource_id).context("identity gone")?.credentials;
    let mut subjects: Vec<&str> = credentials.iter().map(|c| c.subject.as_str()).collect();
    subjects.sort();
    subjects.dedup();
    ensure!(credentials.len() == 10 && subjects.len() == 10, "{credentials:?}");
    ensure!(arm.concurrent_write_conflicts() == 0, "{} writes overlapped", arm.concurrent_write_conflicts());

    let started = Instant::now();
    for name in &names {
        api.delete(name, &Default::default()).await?;
    }
    for name in &names {
        wait_gone(&api, name, &operator).await?;
    }
    let delete_time = started.elapsed();
    ensure!(credentials_of(&lab, &shared) == 0 && arm.concurrent_write_conflicts() == 0);
    eprintln!(
        "ten replications sharing one identity (250 ms per ARM write): all IdentityBound in {bind_time:.1?}, all deleted with their credentials in {delete_time:.1?}, 0 overlapping writes"
    );
    Ok(())
}

#[tokio::test]
async fn the_issuer_setting_wins_over_discovery_and_is_kept_exactly() -> Result<()> {
    let (node, client, ns, lab) = setup("bind-issuer").await?;
    // As an AKS user passes oidcIssuerProfile.issuerURL: with its trailing slash.
    let aks = "https://westus2.oic.prod-aks.azure.com/3f2c4a1e/0c2d6c8e-lab/";
    let (operator, _) = lab.operator_with_identity(node, &ns, &[("MREP_CLUSTER_OIDC_ISSUER", aks)]).await?;
    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    let identity = lab.identity("aks");
    apply(&api, &binding_only("aks", &identity, Some(&identity.resource_id), None)).await?;
    wait_condition(&api, "aks", "IdentityBound", "True", None, Some(&operator)).await?;
    let credentials = lab.azure.arm.identity(&identity.resource_id).context("identity gone")?.credentials;
    ensure!(credentials.len() == 1 && credentials[0].issuer == aks, "{credentials:?}");
    ensure!(node.kube().issuer() != aks, "the lab's own issuer would not show which one won");
    Ok(())
}

/// The path a user takes: `helm install` with `azureWorkloadIdentity`, the real webhook gives the
/// operator pod its identity, the operator binds a migration into DocumentDB, and data arrives.
#[tokio::test]
async fn the_chart_installed_operator_binds_with_its_own_workload_identity() -> Result<()> {
    let (node, client, ns, lab) = setup("bind-chart").await?;
    let kube = node.kube();
    let release_ns = node.namespace("bind-chart-operator").await?;
    let release = format!("b{}", release_ns.rsplit('-').next().unwrap_or_default());
    let fullname = format!("{release}-mongo-replicator");

    // The operator's own identity, trusted for the chart's ServiceAccount (an administrator's
    // one-time setup); ARM and Entra through relays on the node's address.
    let own = lab.identity("operator");
    let subject = format!("system:serviceaccount:{release_ns}:{fullname}");
    lab.azure.add_federated_credential(&own, "operator", kube.issuer(), &subject, TOKEN_EXCHANGE_AUDIENCE).await?;
    lab.azure.arm.backdate_credentials(&own.resource_id, Duration::from_secs(3600));
    let arm_port: u16 = url::Url::parse(&lab.azure.arm.url())?.port().context("ARM double without a port")?;
    let _arm_relay = Relay::start(arm_port).await?;
    let ca = std::fs::read_to_string(lab.azure.ca_file())?;
    let ca_map: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "azure-ca"}, "data": {"ca.crt": ca}}))?;
    Api::<ConfigMap>::namespaced(client.clone(), &release_ns)
        .patch("azure-ca", &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(&ca_map))
        .await?;

    let (repository, tag) = REPLICATOR_IMAGE.rsplit_once(':').context("image without a tag")?;
    let values = format!(
        "image: {{repository: {repository}, tag: {tag}, pullPolicy: Never}}
replicaCount: 1
leaderElection: {{enabled: false}}
watchNamespaces: [{ns}]
logFilter: info,mongo_replicator=debug
entra: {{authorityHost: 'https://{NODE_ADDRESS}:{}/'}}
arm: {{endpoint: 'https://{NODE_ADDRESS}:{arm_port}/'}}
replicatorExtraCa: {{configMapName: azure-ca}}
azureWorkloadIdentity: {{enabled: true, clientId: {}, tenantId: {}}}
",
        lab.azure.entra.port(),
        own.client_id,
        lab.azure.tenant_id()
    );
    let helm = Helm::new()?;
    let kubeconfig = kube.kubeconfig().display().to_string();
    let args = ["install", &release, CHART, "--namespace", &release_ns, "--kubeconfig", &kubeconfig, "--skip-crds", "--wait", "--timeout", "120s"];
    let out = helm.run(&args, &values).await?;
    ensure!(out.status.success(), "helm install failed: {}", text(&out));

    // The webhook mutated the operator pod: its token and client id came from there.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &release_ns);
    let pod = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=mongo-replicator"))
        .await?
        .items
        .into_iter()
        .next()
        .context("no operator pod")?;
    let env: Vec<String> = pod.spec.iter().flat_map(|s| s.containers.iter()).flat_map(|c| c.env.iter().flatten()).map(|e| e.name.clone()).collect();
    ensure!(
        env.iter().any(|e| e == "AZURE_FEDERATED_TOKEN_FILE") && env.iter().any(|e| e == "AZURE_CLIENT_ID"),
        "the webhook did not mutate the operator pod: {env:?}"
    );

    // A migration into DocumentDB whose identity and cluster user the operator creates.
    let source = SecantusServer::start(SecantusOptions::default()).await?;
    let _source_relay = Relay::start(source.port()).await?;
    put_secret(&client, &ns, "source-conn", json!({"uri": in_pod(&source.uri())})).await?;
    let writer = lab.identity("migration-writer");
    let cluster = lab.cluster("migration", &[]).await?;
    let mut object = json!({
        "apiVersion": "mongo-replicator.io/v1alpha1", "kind": "MongoReplication", "metadata": {"name": "migration"},
        "spec": {
            "source": {"auth": "connectionString", "connectionStringSecretRef": {"name": "source-conn", "key": "uri"}},
            "target": {"auth": "entra", "entra": {"managedIdentityResourceId": "", "clusterUser": {"roles": [{"db": "admin", "role": "root"}]}}},
            "replicator": {"workers": 2},
        }
    });
    point_entra(&mut object["spec"]["target"], &cluster, &writer, lab.azure.tenant_id());
    let (src, dst) = (source.admin_client().await?, cluster.server.admin_client().await?);
    let spec = WorkloadSpec { seed: 111, initial_docs_per_collection: 100, ..Default::default() };
    workload::seed(&src, &spec).await?;

    let api: Api<MongoReplication> = Api::namespaced(client.clone(), &ns);
    let applied = Instant::now();
    apply(&api, &object).await?;
    let ready = wait_condition(&api, "migration", "Ready", "True", None, None).await?;
    eprintln!("chart-installed operator, its own workload identity: apply to Ready {:.1?} (binding included)", applied.elapsed());
    ensure!(condition(&ready, "IdentityBound").is_some_and(|c| c.status == "True"));
    ensure!(credentials_of(&lab, &writer) == 1 && lab.azure.arm.is_cluster_user(&cluster.id, &writer.principal_id));
    eventually(Duration::from_secs(120), || workload::assert_same_all(&src, &dst)).await?;

    api.delete("migration", &Default::default()).await?;
    eventually(Duration::from_secs(120), || async {
        ensure!(api.get_opt("migration").await?.is_none(), "migration is still there");
        Ok(())
    })
    .await?;
    ensure!(credentials_of(&lab, &writer) == 0 && lab.azure.arm.cluster_users(&cluster.id).is_empty(), "the operator's objects were left behind");
    let out = helm.run_without_values(&["uninstall", &release, "--namespace", &release_ns, "--kubeconfig", &kubeconfig]).await?;
    ensure!(out.status.success(), "helm uninstall failed: {}", text(&out));
    Ok(())
}
