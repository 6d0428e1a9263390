//! The operator's Helm chart as users meet it: `helm lint` passes, every object it renders is
//! accepted by a real kube-apiserver (`kubectl apply --dry-run=server`), the values schema refuses
//! bad values with helm's message, the Deployment drives the operator's interface, and the RBAC is
//! exactly what the operator touches — checked both as rendered rules and, on the lab, as what
//! the operator's ServiceAccount may and may not do; helm installs, upgrades and uninstalls it,
//! and the Argo CD health check in its README follows the MongoReplication conditions.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use anyhow::{Context, Result, bail, ensure};
use mongo_replicator_lab::KubeLab;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::support::{tempdir, yaml_documents};

pub(crate) const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/mongo-replicator");

/// Runs `program` with `args`, feeding `stdin`; returns its output whatever its exit status.
async fn run(program: &Path, args: &[&str], envs: &[(&str, &Path)], stdin: Option<&str>) -> Result<Output> {
    let mut command = tokio::process::Command::new(program);
    command.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    for (key, value) in envs {
        command.env(key, value);
    }
    let mut child = command.spawn().with_context(|| format!("cannot run {}", program.display()))?;
    let mut input = child.stdin.take().context("no stdin")?;
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await?;
    }
    drop(input);
    Ok(child.wait_with_output().await?)
}

pub(crate) fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// helm with its config, cache and data in a directory of its own, so tests never read or write
/// the user's helm settings.
pub(crate) struct Helm {
    bin: PathBuf,
    home: tempdir::Dir,
}

impl Helm {
    pub(crate) fn new() -> Result<Self> {
        Ok(Self { bin: mongo_replicator_lab::helm()?, home: tempdir::Dir::new("helm")? })
    }

    /// Runs helm with a values file holding `values` (YAML) after `args`.
    pub(crate) async fn run(&self, args: &[&str], values: &str) -> Result<Output> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = self.home.0.join(format!("values-{n}.yaml"));
        std::fs::write(&file, values)?;
        let file = file.display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--values", &file]);
        self.run_without_values(&all).await
    }

    pub(crate) async fn run_without_values(&self, args: &[&str]) -> Result<Output> {
        let dirs = [("HELM_CONFIG_HOME", "config"), ("HELM_CACHE_HOME", "cache"), ("HELM_DATA_HOME", "data")];
        let paths: Vec<(&str, PathBuf)> = dirs.iter().map(|(key, dir)| (*key, self.home.0.join(dir))).collect();
        let envs: Vec<(&str, &Path)> = paths.iter().map(|(key, path)| (*key, path.as_path())).collect();
        run(&self.bin, args, &envs, None).await
    }

    /// `helm template` of the chart as release `release` in `namespace`: the rendered text.
    async fn template(&self, release: &str, namespace: &str, values: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec!["template", release, CHART, "--namespace", namespace];
        args.extend(extra);
        let out = self.run(&args, values).await?;
        ensure!(out.status.success(), "helm template failed with values\n{values}\n{}", text(&out));
        Ok(String::from_utf8(out.stdout)?)
    }

    async fn objects(&self, release: &str, namespace: &str, values: &str) -> Result<Vec<Value>> {
        yaml_documents(&self.template(release, namespace, values, &[]).await?)
    }
}

fn kind_of(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

fn only<'a>(objects: &'a [Value], kind: &str) -> Result<&'a Value> {
    let found: Vec<_> = objects.iter().filter(|o| kind_of(o) == kind).collect();
    ensure!(found.len() == 1, "expected one {kind}, rendered {}", found.len());
    Ok(found[0])
}

/// The value sets every mode-dependent test runs with.
const ALL_NAMESPACES: &str = "{}";
const SERVICE_MONITOR: &str = "serviceMonitor: {enabled: true}\n";
const WORKLOAD_IDENTITY: &str = "azureWorkloadIdentity:
  enabled: true
  clientId: 11111111-1111-1111-1111-111111111111
  tenantId: 22222222-2222-2222-2222-222222222222
";

fn listed(namespaces: &[&str]) -> String {
    format!("watchNamespaces: [{}]\n", namespaces.join(", "))
}

#[tokio::test]
async fn helm_lint_strict_passes_in_every_mode() -> Result<()> {
    let helm = Helm::new()?;
    for values in [ALL_NAMESPACES.to_string(), listed(&["a", "b"]), SERVICE_MONITOR.to_string(), WORKLOAD_IDENTITY.to_string()] {
        let out = helm.run(&["lint", "--strict", CHART], &values).await?;
        let said = text(&out);
        assert!(out.status.success() && said.contains("0 chart(s) failed"), "helm lint --strict failed with values\n{values}\n{said}");
        assert!(!said.contains("[WARNING]") && !said.contains("[ERROR]"), "helm lint complains with values\n{values}\n{said}");
    }
    Ok(())
}

#[tokio::test]
async fn the_schema_refuses_bad_values_with_helms_message() -> Result<()> {
    let helm = Helm::new()?;
    let cases: &[(&str, &str)] = &[
        ("replicaCount: two\n", "at '/replicaCount': got string, want integer"),
        ("replicaCount: \"2\"\n", "at '/replicaCount': got string, want integer"),
        ("replicas: 2\n", "additional properties 'replicas' not allowed"),
        ("image: {repository: r, pullPolicy: Always, tags: latest}\n", "at '/image': additional properties 'tags' not allowed"),
        ("image: {repository: r, pullPolicy: Sometimes}\n", "at '/image/pullPolicy'"),
        ("watchNamespaces: [Data]\n", "at '/watchNamespaces/0'"),
        ("watchNamespaces: a,b\n", "at '/watchNamespaces': got string, want array"),
        ("azureWorkloadIdentity: {enabled: true}\n", "at '/azureWorkloadIdentity/clientId'"),
        ("entra: {authorityHost: \"http://login.example\"}\n", "at '/entra/authorityHost'"),
        ("leaderElection: {enabled: \"yes\", leaseName: l}\n", "at '/leaderElection/enabled': got string, want boolean"),
        ("serviceMonitor: {enabled: true, interval: soon}\n", "at '/serviceMonitor/interval'"),
        ("metrics: {port: 70000}\n", "at '/metrics/port'"),
    ];
    for (values, expect) in cases {
        let out = helm.run(&["template", "t", CHART], values).await?;
        let said = text(&out);
        assert!(!out.status.success(), "helm accepted\n{values}");
        assert!(said.contains("values don't meet the specifications of the schema"), "not a schema error for\n{values}\n{said}");
        assert!(said.contains(expect), "the error for\n{values}does not say {expect:?}:\n{said}");
        // helm lint reports the same error.
        let lint = helm.run(&["lint", "--strict", CHART], values).await?;
        assert!(!lint.status.success() && text(&lint).contains(expect), "helm lint accepted\n{values}\n{}", text(&lint));
    }
    // What the schema cannot say, the templates refuse with a sentence.
    let out = helm.run(&["template", "t", CHART], "leaderElection: {enabled: false, leaseName: l}\n").await?;
    assert!(!out.status.success() && text(&out).contains("leaderElection.enabled=false needs replicaCount: 1"), "{}", text(&out));
    let single = helm.run(&["template", "t", CHART], "replicaCount: 1\nleaderElection: {enabled: false, leaseName: l}\n").await?;
    assert!(single.status.success(), "one replica without leader election was refused: {}", text(&single));
    Ok(())
}

/// An expanded RBAC grant: (API group, resource, verb).
type Grant = (String, String, String);

/// What the operator touches in a watched namespace, verb by verb.
const OPERATOR_RULES: &[(&str, &[&str], &[&str])] = &[
    ("mongo-replicator.io", &["mongoreplications"], &["get", "list", "watch", "patch", "update"]),
    ("mongo-replicator.io", &["mongoreplications/status"], &["get", "patch", "update"]),
    ("mongo-replicator.io", &["mongoreplications/finalizers"], &["update"]),
    ("", &["serviceaccounts", "configmaps"], &["get", "list", "watch", "create", "patch", "update", "delete"]),
    ("", &["secrets"], &["get", "list", "watch"]),
    ("", &["pods"], &["get", "list", "watch"]),
    ("", &["events"], &["create", "patch"]),
    ("events.k8s.io", &["events"], &["create", "patch"]),
    ("batch", &["jobs"], &["get", "list", "watch", "create", "patch", "update", "delete"]),
    ("apps", &["deployments"], &["get", "list", "watch", "create", "patch", "update", "delete"]),
    ("rbac.authorization.k8s.io", &["roles", "rolebindings"], &["get", "list", "watch", "create", "patch", "update", "delete"]),
];

fn expected_operator_grants() -> BTreeSet<Grant> {
    let mut grants = BTreeSet::new();
    for (group, resources, verbs) in OPERATOR_RULES {
        for resource in *resources {
            for verb in *verbs {
                grants.insert((group.to_string(), resource.to_string(), verb.to_string()));
            }
        }
    }
    grants
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().map(|items| items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// The grants of a (Cluster)Role; fails on wildcards and on rules that are not plain
/// group/resource/verb rules (resourceNames and nonResourceURLs are checked by the caller).
fn grants_of(role: &Value) -> Result<BTreeSet<Grant>> {
    let rendered = serde_json::to_string(role)?;
    ensure!(!rendered.contains("\"*\""), "{} {} holds a wildcard: {rendered}", kind_of(role), name_of(role));
    let mut grants = BTreeSet::new();
    for rule in role["rules"].as_array().context("a role without rules")? {
        ensure!(rule.get("nonResourceURLs").is_none() && rule.get("resourceNames").is_none(), "unexpected rule {rule}");
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    ensure!(grants.insert((group.clone(), resource.clone(), verb.clone())), "{group}/{resource} {verb} granted twice");
                }
            }
        }
    }
    Ok(grants)
}

fn assert_lease_role(objects: &[Value], namespace: &str) -> Result<()> {
    let lease_role = objects.iter().find(|o| kind_of(o) == "Role" && name_of(o).ends_with("-leader-election")).context("no leader-election Role")?;
    assert_eq!(lease_role["metadata"]["namespace"], namespace, "the Lease Role is not in the release namespace");
    let rules = serde_json::json!([
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["mongo-replicator-operator"], "verbs": ["get", "update", "patch"]},
    ]);
    assert_eq!(lease_role["rules"], rules, "the leader-election Role grants more or less than the one Lease");
    Ok(())
}

fn binding_subject_is_the_operator(binding: &Value, namespace: &str) {
    let subjects = binding["subjects"].as_array().cloned().unwrap_or_default();
    let expected = serde_json::json!({"kind": "ServiceAccount", "name": "t-mongo-replicator", "namespace": namespace});
    assert_eq!(subjects, vec![expected], "{} {} binds someone else", kind_of(binding), name_of(binding));
}

#[tokio::test]
async fn rendered_rbac_is_least_privilege() -> Result<()> {
    let helm = Helm::new()?;

    // All namespaces: one ClusterRole with exactly the operator's grants.
    let objects = helm.objects("t", "ops", ALL_NAMESPACES).await?;
    let cluster_role = only(&objects, "ClusterRole")?;
    let grants = grants_of(cluster_role)?;
    assert_eq!(grants, expected_operator_grants(), "the ClusterRole's grants differ from what the operator touches");
    let secrets: BTreeSet<_> = grants.iter().filter(|(g, r, _)| g.is_empty() && r == "secrets").map(|(_, _, v)| v.as_str()).collect();
    assert_eq!(secrets, BTreeSet::from(["get", "list", "watch"]), "secrets must stay read-only");
    for forbidden in ["escalate", "bind", "impersonate", "deletecollection"] {
        assert!(!grants.iter().any(|(_, _, v)| v == forbidden), "the ClusterRole grants {forbidden}");
    }
    let bindings: Vec<_> = objects.iter().filter(|o| kind_of(o) == "ClusterRoleBinding").collect();
    let role_refs: BTreeSet<_> = bindings.iter().map(|b| b["roleRef"]["name"].as_str().unwrap_or_default()).collect();
    assert_eq!(role_refs, BTreeSet::from(["t-mongo-replicator", "system:service-account-issuer-discovery"]));
    for binding in &bindings {
        binding_subject_is_the_operator(binding, "ops");
    }
    assert_lease_role(&objects, "ops")?;
    let roles: Vec<_> = objects.iter().filter(|o| kind_of(o) == "Role").map(name_of).collect();
    assert_eq!(roles, vec!["t-mongo-replicator-leader-election"], "all-namespaces mode renders only the Lease Role");

    // Listed namespaces: no ClusterRole, the same grants as a Role in each listed namespace.
    let objects = helm.objects("t", "ops", &listed(&["team-a", "team-b"])).await?;
    assert!(!objects.iter().any(|o| kind_of(o) == "ClusterRole"), "listed namespaces still render a ClusterRole");
    let cluster_bindings: Vec<_> = objects.iter().filter(|o| kind_of(o) == "ClusterRoleBinding").collect();
    assert_eq!(cluster_bindings.len(), 1, "only the issuer-discovery binding is cluster-wide");
    assert_eq!(cluster_bindings[0]["roleRef"]["name"], "system:service-account-issuer-discovery");
    for namespace in ["team-a", "team-b"] {
        let in_ns =
            |kind: &str| objects.iter().find(|o| kind_of(o) == kind && name_of(o) == "t-mongo-replicator" && o["metadata"]["namespace"] == namespace);
        let role = in_ns("Role").with_context(|| format!("no Role in {namespace}"))?;
        assert_eq!(grants_of(role)?, expected_operator_grants(), "the Role in {namespace} differs from the ClusterRole's rules");
        let binding = in_ns("RoleBinding").with_context(|| format!("no RoleBinding in {namespace}"))?;
        assert_eq!(binding["roleRef"], serde_json::json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "t-mongo-replicator"}));
        binding_subject_is_the_operator(binding, "ops");
    }
    assert_lease_role(&objects, "ops")?;
    let namespaced: BTreeSet<_> = objects.iter().filter(|o| kind_of(o) == "Role").filter_map(|o| o["metadata"]["namespace"].as_str()).collect();
    assert_eq!(namespaced, BTreeSet::from(["ops", "team-a", "team-b"]), "Roles outside the listed and release namespaces");
    Ok(())
}

fn env_of(container: &Value) -> Vec<(String, Value)> {
    container["env"]
        .as_array()
        .map(|vars| {
            vars.iter()
                .map(|v| (v["name"].as_str().unwrap_or_default().to_string(), v.get("value").or(v.get("valueFrom")).cloned().unwrap_or(Value::Null)))
                .collect()
        })
        .unwrap_or_default()
}

fn env_value<'a>(env: &'a [(String, Value)], name: &str) -> Option<&'a Value> {
    env.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

#[tokio::test]
async fn the_deployment_drives_the_operators_interface() -> Result<()> {
    let helm = Helm::new()?;
    let objects = helm.objects("t", "ops", ALL_NAMESPACES).await?;
    let deployment = only(&objects, "Deployment")?;
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 2);
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "t-mongo-replicator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod["securityContext"]["runAsGroup"], 65532);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert!(pod["terminationGracePeriodSeconds"].is_u64());
    let anti_affinity = &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(anti_affinity[0]["podAffinityTerm"]["labelSelector"]["matchLabels"], spec["selector"]["matchLabels"]);
    let containers = pod["containers"].as_array().context("no containers")?;
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    assert_eq!(container["image"], "mongo-replicator:0.1.0", "the image tag defaults to the chart's appVersion");
    assert_eq!(container["imagePullPolicy"], "IfNotPresent");
    assert_eq!(container["args"], serde_json::json!(["operator"]));
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(container["ports"], serde_json::json!([{"name": "http-metrics", "containerPort": 8080, "protocol": "TCP"}]));
    assert_eq!(container["livenessProbe"]["httpGet"], serde_json::json!({"path": "/healthz", "port": "http-metrics"}));
    assert_eq!(container["readinessProbe"]["httpGet"], serde_json::json!({"path": "/readyz", "port": "http-metrics"}));
    assert!(container["resources"]["requests"]["memory"].is_string() && container["resources"]["limits"]["memory"].is_string());
    let env = env_of(container);
    let field = |path: &str| serde_json::json!({"fieldRef": {"fieldPath": path}});
    assert_eq!(env_value(&env, "POD_NAMESPACE"), Some(&field("metadata.namespace")));
    assert_eq!(env_value(&env, "POD_NAME"), Some(&field("metadata.name")));
    let plain = |name: &str| env_value(&env, name).and_then(Value::as_str).map(str::to_string);
    assert_eq!(plain("MREP_METRICS_ADDRESS").as_deref(), Some("0.0.0.0:8080"));
    assert_eq!(plain("MREP_WATCH_NAMESPACES").as_deref(), Some(""), "empty means every namespace");
    assert_eq!(plain("MREP_REPLICATOR_IMAGE").as_deref(), Some("mongo-replicator:0.1.0"));
    assert_eq!(plain("MREP_REPLICATOR_IMAGE_PULL_POLICY").as_deref(), Some("IfNotPresent"));
    assert_eq!(plain("MREP_LEADER_ELECTION").as_deref(), Some("true"));
    assert_eq!(plain("MREP_LEASE_NAME").as_deref(), Some("mongo-replicator-operator"));
    for unset in ["MREP_ENTRA_AUTHORITY_HOST", "MREP_ENTRA_CA_FILE", "MREP_ARM_ENDPOINT", "MREP_CLUSTER_OIDC_ISSUER", "RUST_LOG"] {
        assert!(plain(unset).is_none(), "{unset} is set by default");
    }
    let labels = &spec["template"]["metadata"]["labels"];
    assert!(labels.get("azure.workload.identity/use").is_none(), "the webhook label is on without workload identity");
    for key in ["app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version", "app.kubernetes.io/managed-by", "helm.sh/chart"]
    {
        for object in &objects {
            assert!(object["metadata"]["labels"][key].is_string(), "{} {} has no label {key}", kind_of(object), name_of(object));
        }
    }
    let pdb = only(&objects, "PodDisruptionBudget")?;
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], spec["selector"]["matchLabels"]);
    let service = only(&objects, "Service")?;
    assert_eq!(service["spec"]["selector"], spec["selector"]["matchLabels"]);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http-metrics");
    assert!(!objects.iter().any(|o| kind_of(o) == "ServiceMonitor"), "a ServiceMonitor without serviceMonitor.enabled");
    let service_account = only(&objects, "ServiceAccount")?;
    assert!(service_account["metadata"].get("annotations").is_none());

    // Every setting on: listed namespaces, the operator's own identity, sovereign-cloud settings.
    let values = format!(
        "{}{WORKLOAD_IDENTITY}{SERVICE_MONITOR}
image: {{repository: registry.example/mongo-replicator, tag: \"1.2.3\", pullPolicy: Always}}
replicator: {{image: registry.example/replicator@sha256:{}, imagePullPolicy: IfNotPresent}}
entra: {{authorityHost: \"https://login.microsoftonline.us/\"}}
arm: {{endpoint: \"https://management.usgovcloudapi.net\"}}
clusterOidcIssuer: \"https://usgovvirginia.oic.prod-aks.azure.us/tenant/cluster/\"
replicatorExtraCa: {{configMapName: corp-ca}}
serviceAccount: {{annotations: {{azure.workload.identity/service-account-token-expiration: \"86400\"}}}}
leaderElection: {{enabled: true, leaseName: other-lease}}
logLevel: debug
logFilter: info,mongo_replicator=trace
replicaCount: 1
metrics: {{port: 9090}}
",
        listed(&["team-a", "team-b"]),
        "a".repeat(64)
    );
    let objects = helm.objects("t", "ops", &values).await?;
    let deployment = only(&objects, "Deployment")?;
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.example/mongo-replicator:1.2.3");
    assert_eq!(container["imagePullPolicy"], "Always");
    let env = env_of(container);
    let plain = |name: &str| env_value(&env, name).and_then(Value::as_str).map(str::to_string);
    assert_eq!(plain("MREP_WATCH_NAMESPACES").as_deref(), Some("team-a,team-b"));
    assert_eq!(plain("MREP_REPLICATOR_IMAGE"), Some(format!("registry.example/replicator@sha256:{}", "a".repeat(64))));
    assert_eq!(plain("MREP_REPLICATOR_IMAGE_PULL_POLICY").as_deref(), Some("IfNotPresent"));
    assert_eq!(plain("MREP_ENTRA_AUTHORITY_HOST").as_deref(), Some("https://login.microsoftonline.us/"));
    assert_eq!(plain("MREP_ARM_ENDPOINT").as_deref(), Some("https://management.usgovcloudapi.net"));
    assert_eq!(plain("MREP_CLUSTER_OIDC_ISSUER").as_deref(), Some("https://usgovvirginia.oic.prod-aks.azure.us/tenant/cluster/"), "kept exactly");
    assert_eq!(plain("MREP_ENTRA_CA_FILE").as_deref(), Some("/etc/mongo-replicator-operator/entra-ca/ca.crt"));
    assert_eq!(deployment["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"], "corp-ca");
    assert_eq!(plain("MREP_LEASE_NAME").as_deref(), Some("other-lease"));
    assert_eq!(plain("MREP_LOG_LEVEL").as_deref(), Some("debug"));
    assert_eq!(plain("RUST_LOG").as_deref(), Some("info,mongo_replicator=trace"));
    assert_eq!(plain("MREP_METRICS_ADDRESS").as_deref(), Some("0.0.0.0:9090"));
    assert_eq!(deployment["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"], "true");
    let annotations = &only(&objects, "ServiceAccount")?["metadata"]["annotations"];
    assert_eq!(
        *annotations,
        serde_json::json!({
            "azure.workload.identity/client-id": "11111111-1111-1111-1111-111111111111",
            "azure.workload.identity/tenant-id": "22222222-2222-2222-2222-222222222222",
            "azure.workload.identity/service-account-token-expiration": "86400",
        })
    );
    let lease_role = objects.iter().find(|o| name_of(o) == "t-mongo-replicator-leader-election" && kind_of(o) == "Role").context("no Lease Role")?;
    assert_eq!(lease_role["rules"][1]["resourceNames"], serde_json::json!(["other-lease"]));
    assert!(!objects.iter().any(|o| kind_of(o) == "PodDisruptionBudget"), "a PodDisruptionBudget for one replica blocks node drains");
    let monitor = only(&objects, "ServiceMonitor")?;
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http-metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(monitor["spec"]["selector"]["matchLabels"], deployment["spec"]["selector"]["matchLabels"]);
    // The extra CA is only a name handed to the operator: the chart creates no ConfigMap.
    assert!(!objects.iter().any(|o| kind_of(o) == "ConfigMap"), "the chart created a ConfigMap");
    Ok(())
}

#[tokio::test]
async fn the_chart_ships_the_generated_crd() -> Result<()> {
    let helm = Helm::new()?;
    let rendered = yaml_documents(&helm.template("t", "ops", ALL_NAMESPACES, &["--include-crds"]).await?)?;
    let crds: Vec<_> = rendered.iter().filter(|o| kind_of(o) == "CustomResourceDefinition").collect();
    let generated = serde_json::to_value(mongo_replicator::crd::crd())?;
    assert_eq!(crds, vec![&generated], "helm installs a CRD that differs from the types (bash scripts/generate.sh)");
    Ok(())
}

/// A minimal ServiceMonitor CRD, so the dry run resolves monitoring.coreos.com/v1 as on a
/// cluster with the Prometheus Operator (its schema is not ours to check).
const SERVICE_MONITOR_CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          x-kubernetes-preserve-unknown-fields: true
";

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn of(lab: &KubeLab) -> Self {
        Self { bin: lab.bin_dir().join("kubectl"), kubeconfig: lab.kubeconfig().to_path_buf() }
    }

    async fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let kubeconfig = self.kubeconfig.display().to_string();
        let mut all = vec!["--kubeconfig", &kubeconfig];
        all.extend(args);
        run(&self.bin, &all, &[], stdin).await
    }

    async fn ok(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let out = self.run(args, stdin).await?;
        if !out.status.success() {
            bail!("kubectl {} failed: {}", args.join(" "), text(&out));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Installs the chart's CRDs (and the ServiceMonitor CRD) as an administrator would before a
    /// dry run of the templates, and waits until they are served.
    async fn install_crds(&self) -> Result<()> {
        let crds = format!("{CHART}/crds");
        self.ok(&["apply", "--server-side", "--force-conflicts", "--field-manager", "chart-tests", "-f", &crds], None).await?;
        self.ok(&["apply", "--server-side", "--field-manager", "chart-tests", "-f", "-"], Some(SERVICE_MONITOR_CRD)).await?;
        let names = ["crd/mongoreplications.mongo-replicator.io", "crd/servicemonitors.monitoring.coreos.com"];
        let mut args = vec!["wait", "--for=condition=Established", "--timeout=60s"];
        args.extend(names);
        self.ok(&args, None).await?;
        Ok(())
    }
}

/// `kubectl apply --dry-run=server` of the rendered chart: every object must be accepted, with
/// strict field validation (an unknown or misplaced field fails).
async fn dry_run(kubectl: &Kubectl, rendered: &str) -> Result<()> {
    let objects = yaml_documents(rendered)?;
    let out = kubectl.ok(&["apply", "--dry-run=server", "--validate=strict", "-o", "name", "-f", "-"], Some(rendered)).await?;
    let accepted: Vec<_> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(accepted.len(), objects.len(), "the apiserver accepted {accepted:?} of {} objects", objects.len());
    for object in &objects {
        let suffix = format!("/{}", name_of(object));
        assert!(
            accepted.iter().any(|a| a.ends_with(&suffix) && a.split(['.', '/']).next() == Some(kind_of(object).to_lowercase().as_str())),
            "{} {} is missing from the dry run's answer {accepted:?}",
            kind_of(object),
            name_of(object)
        );
    }
    Ok(())
}

#[tokio::test]
async fn the_apiserver_accepts_every_rendered_object() -> Result<()> {
    let lab = KubeLab::shared().await?;
    let kubectl = Kubectl::of(lab);
    kubectl.install_crds().await?;
    let helm = Helm::new()?;
    let release_ns = lab.namespace("chart-dry-run").await?;
    let team_a = lab.namespace("chart-team-a").await?;
    let team_b = lab.namespace("chart-team-b").await?;
    let cases = [
        ("all namespaces, defaults", ALL_NAMESPACES.to_string()),
        ("all namespaces, ServiceMonitor and workload identity", format!("{SERVICE_MONITOR}{WORKLOAD_IDENTITY}")),
        ("listed namespaces", format!("{}{SERVICE_MONITOR}", listed(&[&team_a, &team_b]))),
    ];
    for (what, values) in cases {
        let rendered = helm.template("t", &release_ns, &values, &[]).await?;
        dry_run(&kubectl, &rendered).await.with_context(|| format!("{what}: the dry run failed"))?;
    }
    Ok(())
}

/// The operator's RBAC on a real apiserver: installed for real (RBAC objects and the
/// ServiceAccount only), then probed as the operator's ServiceAccount.
#[tokio::test]
async fn the_operator_may_do_its_job_and_nothing_more() -> Result<()> {
    let lab = KubeLab::shared().await?;
    let kubectl = Kubectl::of(lab);
    kubectl.install_crds().await?;
    let helm = Helm::new()?;

    for mode in ["all namespaces", "listed namespaces"] {
        let release_ns = lab.namespace("chart-rbac").await?;
        let watched = lab.namespace("chart-watched").await?;
        let unwatched = lab.namespace("chart-unwatched").await?;
        // A release name of its own per mode: cluster-scoped objects must not collide.
        let release = format!("r{}", release_ns.rsplit('-').next().unwrap_or_default());
        let values = if mode == "listed namespaces" { listed(&[&watched]) } else { ALL_NAMESPACES.to_string() };
        let objects = helm.objects(&release, &release_ns, &values).await?;
        let rbac: Vec<_> = objects
            .iter()
            .filter(|o| o["apiVersion"] == "rbac.authorization.k8s.io/v1" || kind_of(o) == "ServiceAccount")
            .map(|o| serde_json::to_string(o).map(|json| format!("{json}\n---\n")))
            .collect::<Result<_, _>>()?;
        kubectl.ok(&["apply", "-f", "-"], Some(&rbac.concat())).await.with_context(|| format!("{mode}: cannot install the RBAC"))?;
        let service_account = format!("system:serviceaccount:{release_ns}:{release}-mongo-replicator");

        // `target` is what follows the verb in `kubectl auth can-i`: a resource, `resource/name`,
        // and `--subresource=...`.
        let can = |verb: &'static str, target: String, namespace: String| {
            let service_account = service_account.clone();
            let kubectl = &kubectl;
            async move {
                let mut args = vec!["auth", "can-i", verb];
                args.extend(target.split_whitespace());
                args.extend(["-n", &namespace, "--as", &service_account]);
                let out = kubectl.run(&args, None).await?;
                let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
                ensure!(answer == "yes" || answer == "no", "kubectl auth can-i said {}", text(&out));
                Ok::<bool, anyhow::Error>(answer == "yes")
            }
        };
        let w = || watched.clone();
        for (verb, resource) in [
            ("watch", "mongoreplications.mongo-replicator.io"),
            ("patch", "mongoreplications.mongo-replicator.io --subresource=status"),
            ("update", "mongoreplications.mongo-replicator.io --subresource=finalizers"),
            ("create", "deployments.apps"),
            ("delete", "jobs.batch"),
            ("create", "serviceaccounts"),
            ("update", "configmaps"),
            ("create", "roles.rbac.authorization.k8s.io"),
            ("create", "rolebindings.rbac.authorization.k8s.io"),
            ("watch", "secrets"),
            ("list", "pods"),
            ("create", "events"),
            ("patch", "events.events.k8s.io"),
        ] {
            assert!(can(verb, resource.to_string(), w()).await?, "{mode}: the operator cannot {verb} {resource} in a watched namespace");
        }
        for (verb, resource) in [
            ("create", "secrets"),
            ("update", "secrets"),
            ("delete", "secrets"),
            ("create", "mongoreplications.mongo-replicator.io"),
            ("delete", "mongoreplications.mongo-replicator.io"),
            ("create", "pods"),
            ("delete", "pods"),
            ("create", "pods --subresource=exec"),
            ("update", "mongoreplications.mongo-replicator.io --subresource=scale"),
            ("escalate", "roles.rbac.authorization.k8s.io"),
            ("bind", "roles.rbac.authorization.k8s.io"),
            ("create", "clusterroles.rbac.authorization.k8s.io"),
            ("create", "statefulsets.apps"),
            ("deletecollection", "jobs.batch"),
            ("create", "leases.coordination.k8s.io"),
        ] {
            assert!(!can(verb, resource.to_string(), w()).await?, "{mode}: the operator may {verb} {resource}");
        }
        // The Lease: created in the release namespace, and only the chart's one is writable.
        assert!(can("create", "leases.coordination.k8s.io".into(), release_ns.clone()).await?);
        assert!(can("update", "leases.coordination.k8s.io/mongo-replicator-operator".into(), release_ns.clone()).await?);
        assert!(!can("update", "leases.coordination.k8s.io/someone-elses".into(), release_ns.clone()).await?, "{mode}: other Leases are writable");
        assert!(!can("update", "leases.coordination.k8s.io/mongo-replicator-operator".into(), w()).await?);
        // Namespaces it does not watch are out of reach only when namespaces are listed.
        let reach = can("create", "deployments.apps".into(), unwatched.clone()).await?;
        assert_eq!(reach, mode == "all namespaces", "{mode}: reach into an unwatched namespace is {reach}");

        // The per-replication Role the operator creates is within what it holds (no escalate).
        let replicator_role = |name: &str, status_verb: &str| {
            format!(
                "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: {name}, namespace: {watched}}}
rules:
  - {{apiGroups: [mongo-replicator.io], resources: [mongoreplications/status], resourceNames: [orders-dr], verbs: [{status_verb}]}}
  - {{apiGroups: [mongo-replicator.io], resources: [mongoreplications], resourceNames: [orders-dr], verbs: [get]}}
"
            )
        };
        let as_operator = ["create", "--dry-run=server", "-o", "name", "-f", "-", "--as", &service_account];
        kubectl
            .ok(&as_operator, Some(&replicator_role("orders-dr-replicator", "patch")))
            .await
            .with_context(|| format!("{mode}: the operator cannot create the replicator's Role"))?;
        let refused = kubectl.run(&as_operator, Some(&replicator_role("orders-dr-too-much", "delete"))).await?;
        assert!(
            !refused.status.success() && text(&refused).contains("attempting to grant RBAC permissions not currently held"),
            "{mode}: the operator granted what it does not hold: {}",
            text(&refused)
        );
    }
    Ok(())
}

/// The Argo CD health check exactly as the chart's README gives it: the `argocd-cm` YAML block.
fn readme_health_check() -> Result<String> {
    let readme = std::fs::read_to_string(format!("{CHART}/README.md"))?;
    let key = "resource.customizations.health.mongo-replicator.io_MongoReplication";
    let block = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
        .find(|block| block.contains(key))
        .context("the chart README has no argocd-cm block with the health check")?;
    let docs = yaml_documents(block)?;
    docs.first().and_then(|d| d["data"][key].as_str()).map(str::to_string).context("the block does not hold the health check under data")
}

fn condition(kind: &str, status: &str, reason: &str, message: &str, generation: i64) -> Value {
    serde_json::json!({"type": kind, "status": status, "reason": reason, "message": message, "observedGeneration": generation,
        "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

fn replication(generation: i64, suspend: bool, status: Option<Value>) -> Value {
    let mut object = serde_json::json!({
        "apiVersion": "mongo-replicator.io/v1alpha1",
        "kind": "MongoReplication",
        "metadata": {"name": "orders-dr", "namespace": "data", "generation": generation},
        "spec": {"suspend": suspend},
    });
    if let Some(status) = status {
        object["status"] = status;
    }
    object
}

#[tokio::test]
async fn the_argocd_health_check_follows_the_conditions() -> Result<()> {
    let script_text = readme_health_check()?;
    let dir = tempdir::Dir::new("argocd-health")?;
    let script = dir.0.join("health.lua");
    std::fs::write(&script, &script_text)?;
    let ready = condition("Ready", "True", "Replicating", "lag 0 s", 2);
    let not_reconciling = condition("Reconciling", "False", "Reconciled", "", 2);
    let not_stalled = condition("Stalled", "False", "Reconciled", "", 2);
    let status = |generation: i64, conditions: Vec<Value>| {
        Some(serde_json::json!({"observedGeneration": generation, "phase": "Streaming", "conditions": conditions}))
    };
    let stalled = condition("Stalled", "True", "LoginFailed", "the target refused the login: AuthenticationFailed (18)", 2);
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("a new object", replication(1, false, None), "Progressing", "Waiting for the operator"),
        (
            "a status without observedGeneration",
            replication(1, false, Some(serde_json::json!({"conditions": []}))),
            "Progressing",
            "Waiting for the operator",
        ),
        (
            "an edit the operator has not seen",
            replication(3, false, status(2, vec![ready.clone(), not_reconciling.clone(), not_stalled.clone()])),
            "Progressing",
            "generation 3",
        ),
        (
            "ready for the current generation",
            replication(2, false, status(2, vec![ready.clone(), not_reconciling.clone(), not_stalled.clone()])),
            "Healthy",
            "Replicating: lag 0 s",
        ),
        (
            "Ready from an older generation",
            replication(2, false, status(2, vec![condition("Ready", "True", "Replicating", "", 1), not_reconciling.clone(), not_stalled.clone()])),
            "Progressing",
            "Waiting for the Ready condition",
        ),
        (
            "a rollout in progress",
            replication(
                2,
                false,
                status(
                    2,
                    vec![ready.clone(), condition("Reconciling", "True", "ValidationRunning", "validating the endpoints", 2), not_stalled.clone()],
                ),
            ),
            "Progressing",
            "ValidationRunning: validating the endpoints",
        ),
        (
            "not ready yet",
            replication(
                2,
                false,
                status(
                    2,
                    vec![condition("Ready", "False", "WaitingForProgress", "the replicator has not reported progress", 2), not_stalled.clone()],
                ),
            ),
            "Progressing",
            "WaitingForProgress: the replicator has not reported progress",
        ),
        (
            "stalled",
            replication(2, false, status(2, vec![stalled.clone(), condition("Ready", "False", "LoginFailed", "", 2)])),
            "Degraded",
            "LoginFailed: the target refused the login",
        ),
        ("stalled wins over a stale Ready=True", replication(2, false, status(2, vec![stalled, ready.clone()])), "Degraded", "LoginFailed"),
        (
            "suspended",
            replication(2, true, status(2, vec![condition("Ready", "False", "Suspended", "spec.suspend is true", 2), not_stalled])),
            "Suspended",
            "Suspended",
        ),
    ];
    let objects = Value::Array(cases.iter().map(|(_, object, _, _)| object.clone()).collect());
    let out = run(&mongo_replicator_lab::lua_health()?, &[&script.display().to_string()], &[], Some(&objects.to_string())).await?;
    ensure!(out.status.success(), "the health check failed to run: {}", text(&out));
    let results: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    assert_eq!(results.len(), cases.len());
    for ((what, _, status, message), result) in cases.iter().zip(&results) {
        assert_eq!(result["status"], *status, "{what}: {result}");
        let said = result["message"].as_str().unwrap_or_default();
        assert!(said.contains(message), "{what}: the message {said:?} does not say {message:?}");
    }
    Ok(())
}

/// `helm install`, `helm upgrade` across the two RBAC modes and `helm uninstall` on the lab's
/// apiserver: what helm itself does with the chart (the CRD from `crds/` kept on uninstall, no
/// immutable field changed by an upgrade, nothing left behind).
#[tokio::test]
async fn helm_installs_upgrades_and_uninstalls_the_chart() -> Result<()> {
    let lab = KubeLab::shared().await?;
    let kubectl = Kubectl::of(lab);
    let helm = Helm::new()?;
    let release_ns = lab.namespace("chart-install").await?;
    let watched = lab.namespace("chart-install-watched").await?;
    let release = format!("i{}", release_ns.rsplit('-').next().unwrap_or_default());
    let kubeconfig = lab.kubeconfig().display().to_string();
    let helm_on_lab = |verb: &'static str, values: String| {
        let (release, release_ns, kubeconfig, helm) = (release.clone(), release_ns.clone(), kubeconfig.clone(), &helm);
        async move {
            let mut args = vec![verb, &release];
            if verb != "uninstall" {
                args.push(CHART);
            }
            args.extend(["--namespace", &release_ns, "--kubeconfig", &kubeconfig]);
            let out = if verb == "uninstall" { helm.run_without_values(&args).await? } else { helm.run(&args, &values).await? };
            ensure!(out.status.success(), "helm {verb} failed: {}", text(&out));
            Ok(text(&out))
        }
    };
    let fullname = format!("{release}-mongo-replicator");
    let exists = |kind: &'static str, namespace: Option<String>| {
        let (kubectl, fullname) = (&kubectl, fullname.clone());
        async move {
            let mut args = vec!["get", kind, fullname.as_str(), "--ignore-not-found", "-o", "name"];
            if let Some(namespace) = &namespace {
                args.extend(["-n", namespace.as_str()]);
            }
            Ok::<bool, anyhow::Error>(!kubectl.ok(&args, None).await?.trim().is_empty())
        }
    };

    let said = helm_on_lab("install", listed(&[&watched])).await?;
    assert!(said.contains(&format!("It manages MongoReplications in: {watched}.")), "NOTES do not name the watched namespace: {said}");
    kubectl.ok(&["wait", "--for=condition=Established", "--timeout=60s", "crd/mongoreplications.mongo-replicator.io"], None).await?;
    assert!(exists("deployment", Some(release_ns.clone())).await?);
    assert!(exists("role", Some(watched.clone())).await?);
    assert!(!exists("clusterrole", None).await?, "listed namespaces installed a ClusterRole");

    // (An empty values file would make helm reuse the previous values.)
    helm_on_lab("upgrade", "watchNamespaces: []\n".to_string()).await?;
    assert!(exists("clusterrole", None).await?, "the upgrade to all namespaces did not install the ClusterRole");
    assert!(!exists("role", Some(watched.clone())).await?, "the upgrade left the Role in the formerly watched namespace");
    let env =
        kubectl.ok(&["get", "deployment", &fullname, "-n", &release_ns, "-o", "jsonpath={.spec.template.spec.containers[0].env}"], None).await?;
    let env: Vec<Value> = serde_json::from_str(&env)?;
    assert!(env.iter().any(|v| v["name"] == "MREP_WATCH_NAMESPACES" && v.get("value").is_none_or(|v| v == "")), "{env:?}");

    helm_on_lab("uninstall", "{}".to_string()).await?;
    for (kind, namespace) in
        [("deployment", Some(release_ns.clone())), ("clusterrole", None), ("clusterrolebinding", None), ("serviceaccount", Some(release_ns.clone()))]
    {
        assert!(!exists(kind, namespace).await?, "helm uninstall left the {kind}");
    }
    // Helm never deletes CRDs (and with them every MongoReplication).
    kubectl.ok(&["get", "crd", "mongoreplications.mongo-replicator.io"], None).await?;
    Ok(())
}
