//! The MongoReplication API as users meet it, on a real kube-apiserver: the CRD installs, the
//! examples are accepted, bad objects are refused with a message a person can act on, and
//! `kubectl get` / `kubectl explain` show what they should.

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams, ValidationDirective};
use mongo_replicator::crd::MongoReplication;
use mongo_replicator_lab::KubeLab;
use serde_json::{Value, json};

use crate::support::{TEST_MANAGER, install_crd, yaml_documents};

async fn setup(prefix: &str) -> Result<(kube::Client, String)> {
    let lab = KubeLab::shared().await?;
    let client = lab.client().await?;
    install_crd(&client).await?;
    let ns = lab.namespace(prefix).await?;
    Ok((client, ns))
}

fn mrep_api(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<MongoReplication>(&()))
}

/// Applies every object of an example file as `kubectl apply --server-side` does, refusing
/// unknown fields (a misspelt field would otherwise vanish silently); returns the
/// MongoReplications as stored.
async fn apply_documents(client: &kube::Client, ns: &str, docs: &[Value]) -> Result<Vec<DynamicObject>> {
    let params = PatchParams::apply(TEST_MANAGER).validation(ValidationDirective::Strict);
    let mut created = Vec::new();
    for doc in docs {
        let name = doc["metadata"]["name"].as_str().context("object without a name")?;
        match doc["kind"].as_str() {
            Some("Secret") => {
                Api::<Secret>::namespaced(client.clone(), ns).patch(name, &params, &Patch::Apply(doc)).await?;
            }
            Some("MongoReplication") => {
                created.push(mrep_api(client, ns).patch(name, &params, &Patch::Apply(doc)).await?);
            }
            other => anyhow::bail!("examples may hold Secrets and MongoReplications, not {other:?}"),
        }
    }
    Ok(created)
}

#[tokio::test]
async fn every_example_is_accepted_and_defaulted() -> Result<()> {
    let (client, ns) = setup("examples").await?;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut files: Vec<_> = std::fs::read_dir(dir)?.flatten().map(|e| e.path()).collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    assert!(files.len() >= 3, "expected the examples in {dir}, found {files:?}");
    for file in &files {
        let docs = yaml_documents(&std::fs::read_to_string(file)?).with_context(|| file.display().to_string())?;
        let created = apply_documents(&client, &ns, &docs).await.with_context(|| format!("example {} was refused", file.display()))?;
        assert_eq!(created.len(), 1, "{} should hold one MongoReplication", file.display());
        let stored = &created[0].data["spec"];
        // The apiserver applies the schema's defaults, so `kubectl get -o yaml` shows the effective mode.
        assert!(stored["mode"].is_string(), "{}: mode was not defaulted: {stored}", file.display());
        assert!(stored["suspend"].is_boolean(), "{}: suspend was not defaulted: {stored}", file.display());
        // Typed clients read back exactly what was stored.
        let name = created[0].metadata.name.clone().context("no name")?;
        let typed: MongoReplication = Api::namespaced(client.clone(), &ns).get(&name).await?;
        assert_eq!(serde_json::to_value(&typed.spec)?, *stored, "{}: typed round trip changed the spec", file.display());
    }
    Ok(())
}

/// A valid object that every rejection case below breaks in exactly one way.
fn valid(name: &str) -> Value {
    json!({
        "apiVersion": "mongo-replicator.io/v1alpha1",
        "kind": "MongoReplication",
        "metadata": {"name": name},
        "spec": {
            "source": {
                "auth": "entra",
                "uri": "mongodb+srv://src.global.mongocluster.cosmos.azure.com/?tls=true",
                "entra": {
                    "clientId": "11111111-1111-1111-1111-111111111111",
                    "tenantId": "22222222-2222-2222-2222-222222222222",
                    "managedIdentityResourceId": "/subscriptions/44444444-4444-4444-4444-444444444444/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/replicator",
                    "clusterUser": {
                        "clusterResourceId": "/subscriptions/44444444-4444-4444-4444-444444444444/resourceGroups/rg/providers/Microsoft.DocumentDB/mongoClusters/src",
                        "principalId": "33333333-3333-3333-3333-333333333333",
                        "roles": [{"db": "admin", "role": "root"}]
                    }
                }
            },
            "target": {"auth": "connectionString", "connectionStringSecretRef": {"name": "target-conn", "key": "uri"}},
            "namespaces": {"include": ["orders.*"], "exclude": ["orders.tmp_*"], "rename": [{"from": "orders.*", "to": "orders_dr.*"}]},
            "replicator": {"workers": 8, "batchSize": 1000}
        }
    })
}

/// Sets (`Some`) or removes (`None`) the value at a JSON pointer.
fn edit(mut obj: Value, pointer: &str, value: Option<Value>) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
    let target = obj.pointer_mut(parent).unwrap_or_else(|| panic!("no {parent} in the base object"));
    match (target, value) {
        (Value::Object(map), Some(v)) => {
            map.insert(key.to_string(), v);
        }
        (Value::Object(map), None) => {
            map.remove(key);
        }
        (Value::Array(items), Some(v)) => items[key.parse::<usize>().expect("array index")] = v,
        (other, _) => panic!("cannot edit {pointer} in {other}"),
    }
    obj
}

struct Case {
    what: &'static str,
    edits: Vec<(&'static str, Option<Value>)>,
    /// Text that must appear in the apiserver's answer: the field path and the user-facing reason.
    expect: &'static [&'static str],
}

fn case(what: &'static str, edits: Vec<(&'static str, Option<Value>)>, expect: &'static [&'static str]) -> Case {
    Case { what, edits, expect }
}

fn rejection_cases() -> Vec<Case> {
    let conn = || json!({"name": "s", "key": "uri"});
    vec![
        case("entra without the entra block", vec![("/spec/source/entra", None)], &["spec.source", "auth: entra requires the entra block"]),
        case(
            "entra with a connection string Secret",
            vec![("/spec/source/connectionStringSecretRef", Some(conn()))],
            &["spec.source", "auth: entra must not set connectionStringSecretRef"],
        ),
        case("entra without uri", vec![("/spec/source/uri", None)], &["spec.source", "auth: entra requires uri"]),
        case(
            "connectionString without its Secret",
            vec![("/spec/target/connectionStringSecretRef", None)],
            &["spec.target", "auth: connectionString requires connectionStringSecretRef"],
        ),
        case(
            "connectionString with an entra block",
            vec![(
                "/spec/target/entra",
                Some(json!({"clientId": "11111111-1111-1111-1111-111111111111", "tenantId": "22222222-2222-2222-2222-222222222222"})),
            )],
            &["spec.target", "auth: connectionString must not set entra"],
        ),
        case("connectionString with uri", vec![("/spec/target/uri", Some(json!("mongodb://db:27017")))], &["spec.target", "remove uri"]),
        case(
            "password inside an entra uri",
            vec![("/spec/source/uri", Some(json!("mongodb://admin:hunter2@src.example:27017/?tls=true")))],
            &["spec.source.uri", "uri must not contain a password"],
        ),
        case(
            "uri that is not a MongoDB connection string",
            vec![("/spec/source/uri", Some(json!("https://src.example")))],
            &["spec.source.uri", "uri must be a MongoDB connection string"],
        ),
        case(
            "clientId that is not a GUID",
            vec![("/spec/source/entra/clientId", Some(json!("orders-replicator")))],
            &["spec.source.entra.clientId", "clientId must be a GUID"],
        ),
        case(
            "tenantId that is not a GUID",
            vec![("/spec/source/entra/tenantId", Some(json!("contoso.onmicrosoft.com")))],
            &["spec.source.entra.tenantId", "tenantId must be a GUID"],
        ),
        case(
            "managed identity id of the wrong shape",
            vec![(
                "/spec/source/entra/managedIdentityResourceId",
                Some(json!("/subscriptions/44444444-4444-4444-4444-444444444444/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1")),
            )],
            &["spec.source.entra.managedIdentityResourceId", "managedIdentityResourceId must look like"],
        ),
        case(
            "cluster id of the wrong shape",
            vec![("/spec/source/entra/clusterUser/clusterResourceId", Some(json!("orders-cluster")))],
            &["spec.source.entra.clusterUser.clusterResourceId", "clusterResourceId must look like"],
        ),
        case(
            "principalId that is not a GUID",
            vec![("/spec/source/entra/clusterUser/principalId", Some(json!("replicator@contoso.com")))],
            &["spec.source.entra.clusterUser.principalId", "principalId must be a GUID"],
        ),
        case(
            "cluster user without roles",
            vec![("/spec/source/entra/clusterUser/roles", Some(json!([])))],
            &["spec.source.entra.clusterUser.roles", "at least 1 items"],
        ),
        case(
            "include pattern without a collection",
            vec![("/spec/namespaces/include", Some(json!(["orders"])))],
            &["spec.namespaces.include", "each include pattern must be 'database.collection'"],
        ),
        case(
            "exclude pattern with a $ in the database",
            vec![("/spec/namespaces/exclude", Some(json!(["bad$db.x"])))],
            &["spec.namespaces.exclude", "each exclude pattern must be 'database.collection'"],
        ),
        case(
            "rename into admin",
            vec![("/spec/namespaces/rename", Some(json!([{"from": "orders.x", "to": "admin.x"}])))],
            &["spec.namespaces.rename[0].to", "rename: to must be a valid 'database.collection' namespace"],
        ),
        case(
            "rename that drops a wildcard",
            vec![("/spec/namespaces/rename", Some(json!([{"from": "orders.*", "to": "orders_dr.all"}])))],
            &["spec.namespaces.rename[0]", "rename: to must have as many * wildcards as from"],
        ),
        case("zero workers", vec![("/spec/replicator/workers", Some(json!(0)))], &["spec.replicator.workers", "greater than or equal to 1"]),
        case("too many workers", vec![("/spec/replicator/workers", Some(json!(1000)))], &["spec.replicator.workers", "less than or equal to 64"]),
        case(
            "batchSize too large",
            vec![("/spec/replicator/batchSize", Some(json!(1_000_000)))],
            &["spec.replicator.batchSize", "less than or equal to 100000"],
        ),
        case("unknown mode", vec![("/spec/mode", Some(json!("Mirror")))], &["spec.mode", "Unsupported value: \"Mirror\"", "\"SnapshotAndStream\""]),
        case(
            "unknown auth method",
            vec![("/spec/target/auth", Some(json!("password")))],
            &["spec.target.auth", "Unsupported value: \"password\"", "\"connectionString\""],
        ),
        case(
            "startAt outside StreamOnly",
            vec![("/spec/startAt", Some(json!({"clusterTime": "1767225600.1"})))],
            &["spec.startAt applies only to mode: StreamOnly"],
        ),
        case(
            "startAt with both a time and a token",
            vec![("/spec/mode", Some(json!("StreamOnly"))), ("/spec/startAt", Some(json!({"clusterTime": "1767225600.1", "resumeToken": "8263"})))],
            &["spec.startAt", "startAt takes exactly one of clusterTime or resumeToken"],
        ),
        case(
            "scope that is not an https resource",
            vec![("/spec/source/entra/scope", Some(json!("ossrdbms-aad")))],
            &["spec.source.entra.scope", "scope must be an https resource"],
        ),
        case("no target", vec![("/spec/target", None)], &["spec.target", "Required value"]),
        case(
            "name too long for child objects",
            vec![("/metadata/name", Some(json!("a-replication-whose-name-is-much-longer-than-fifty-characters")))],
            &["metadata.name must be at most 50 characters"],
        ),
    ]
}

#[tokio::test]
async fn invalid_objects_are_rejected_with_a_clear_message() -> Result<()> {
    let (client, ns) = setup("rejections").await?;
    let api = mrep_api(&client, &ns);

    // The base object itself is valid, so each case fails for its own reason only.
    let base: DynamicObject = serde_json::from_value(valid("base-is-valid"))?;
    api.create(&PostParams::default(), &base).await.context("the valid base object was refused")?;

    let cases = rejection_cases();
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut obj = valid(&format!("bad-{i}"));
        for (pointer, value) in &case.edits {
            obj = edit(obj, pointer, value.clone());
        }
        let obj: DynamicObject = serde_json::from_value(obj)?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => failures.push(format!("{}: accepted", case.what)),
            Err(kube::Error::Api(status)) if status.code == 422 => {
                let message = &status.message;
                let missing: Vec<_> = case.expect.iter().filter(|e| !message.contains(*e)).collect();
                if !missing.is_empty() {
                    failures.push(format!("{}: message lacks {missing:?}: {message}", case.what));
                }
            }
            Err(err) => failures.push(format!("{}: expected 422 Invalid, got {err}", case.what)),
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    Ok(())
}

#[tokio::test]
async fn printer_columns_show_in_the_table_form() -> Result<()> {
    let (client, ns) = setup("columns").await?;
    let api = mrep_api(&client, &ns);
    let obj: DynamicObject = serde_json::from_value(valid("orders-dr"))?;
    api.create(&PostParams::default(), &obj).await?;
    let status = json!({
        "apiVersion": "mongo-replicator.io/v1alpha1",
        "kind": "MongoReplication",
        "status": {"phase": "Streaming", "progress": {"lagSeconds": 3}, "conditions": [
            {"type": "CaughtUp", "status": "True", "reason": "CaughtUp", "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"}
        ]}
    });
    api.patch_status("orders-dr", &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(&status)).await?;

    // What `kubectl get mongoreplications` asks for.
    let request = http::Request::get(format!("/apis/mongo-replicator.io/v1alpha1/namespaces/{ns}/mongoreplications"))
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())?;
    let table: Value = client.request(request).await?;
    let columns: Vec<&str> = table["columnDefinitions"].as_array().context("no columns")?.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(columns, ["Name", "Phase", "Source Auth", "Target Auth", "Lag", "Caught Up", "Verified", "Age"]);
    let cells = &table["rows"][0]["cells"];
    assert_eq!(cells[0], "orders-dr");
    assert_eq!(cells[1], "Streaming");
    assert_eq!(cells[2], "entra");
    assert_eq!(cells[3], "connectionString");
    assert_eq!(cells[4], 3);
    assert_eq!(cells[5], "True");
    Ok(())
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_docs() -> Result<()> {
    let lab = KubeLab::shared().await?;
    install_crd(&lab.client().await?).await?;
    let kubectl = lab.bin_dir().join("kubectl");
    // The apiserver publishes a new CRD's OpenAPI a moment after it is Established.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = tokio::process::Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(lab.kubeconfig())
            .args(["explain", "mongoreplications.spec.source.auth"])
            .output()
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && text.contains("How the replicator logs in") {
            assert!(text.contains("entra") && text.contains("connectionString"), "{text}");
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("kubectl explain did not show the field docs: {text}{}", String::from_utf8_lossy(&out.stderr));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
