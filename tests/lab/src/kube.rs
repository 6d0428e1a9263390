//! A real Kubernetes control plane: etcd, kube-apiserver (RBAC on, TokenRequest and
//! service-account issuer discovery with an https issuer) and kube-controller-manager.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::OnceCell;

use crate::pki::{self, LabCa};
use crate::process::{LabProcess, free_port, wait_for_port};
use crate::{RunDir, Versions, cached_tool};

/// How a control plane is started. The default serves on 127.0.0.1 only, with no node.
#[derive(Clone, Debug, Default)]
pub struct KubeOptions {
    /// Serve (and advertise, in the `kubernetes` Service's endpoints) on this address instead
    /// of 127.0.0.1, so pods reach the apiserver through the Service; set by the node lab to
    /// its bridge's address, inside the lab's own network namespace.
    pub node_address: Option<IpAddr>,
    /// Extra kube-apiserver flags (`--flag=value`), e.g. an audit policy and log for a benchmark
    /// that counts who writes what.
    pub apiserver_args: Vec<String>,
}

/// The `kubernetes` Service's cluster IP (the first address of `--service-cluster-ip-range`).
pub const KUBERNETES_SERVICE_IP: [u8; 4] = [10, 96, 0, 1];

/// A running control plane. Processes stop when it is dropped or when the test process exits.
pub struct KubeLab {
    dir: RunDir,
    // Declared in stop order: fields drop top to bottom.
    controller_manager: LabProcess,
    apiserver: LabProcess,
    etcd: LabProcess,
    url: String,
    issuer: String,
    kubeconfig: PathBuf,
    ca: LabCa,
    bin_dir: PathBuf,
}

impl KubeLab {
    /// The lab shared by every test in this process, started on first use.
    pub async fn shared() -> Result<&'static KubeLab> {
        static SHARED: OnceCell<std::result::Result<KubeLab, String>> = OnceCell::const_new();
        SHARED
            .get_or_init(|| async { KubeLab::start().await.map_err(|err| format!("{err:#}")) })
            .await
            .as_ref()
            .map_err(|err| anyhow::anyhow!("the lab's control plane did not start: {err}"))
    }

    /// Starts a new control plane in its own directory on free ports.
    pub async fn start() -> Result<KubeLab> {
        Self::start_with(KubeOptions::default()).await
    }

    /// Starts a new control plane with `options`.
    pub async fn start_with(options: KubeOptions) -> Result<KubeLab> {
        let started = Instant::now();
        let bin_dir = cached_tool("build-kube.sh", "Kubernetes binaries")?;
        let dir = RunDir::new("kube")?;
        let ca = LabCa::create(&dir.path().join("pki"))?;
        let pki_dir = dir.path().join("pki");

        // etcd
        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = LabProcess::spawn(
            "etcd",
            &bin_dir.join("etcd"),
            &args(&[
                ("--name", "lab"),
                ("--data-dir", &dir.path().join("etcd").display().to_string()),
                ("--listen-client-urls", &etcd_url),
                ("--advertise-client-urls", &etcd_url),
                ("--listen-peer-urls", &peer_url),
                ("--initial-advertise-peer-urls", &peer_url),
                ("--initial-cluster", &format!("lab={peer_url}")),
                ("--log-level", "warn"),
                // Tests do not need durability across power loss; fsync dominates on shared disks.
                ("--unsafe-no-fsync", "true"),
            ]),
            &dir.path().join("etcd.log"),
        )?;
        wait_for_port(&mut etcd, etcd_port, Duration::from_secs(30)).await?;

        // kube-apiserver
        let address = options.node_address.unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let mut ips = vec![IpAddr::from(KUBERNETES_SERVICE_IP)];
        ips.extend(options.node_address);
        let serving = ca.issue_server_with_ips(
            "apiserver",
            &["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"],
            &ips,
        )?;
        let admin = ca.issue_client("admin", "lab-admin", Some("system:masters"))?;
        let (sa_key, sa_pub) = pki::rsa_key_pair(&pki_dir, "service-account")?;
        let port = free_port()?;
        let url = format!("https://{address}:{port}");
        let address_arg = address.to_string();
        let mut node_args = Vec::new();
        if options.node_address.is_some() {
            // The kubelet's serving certificate is from the lab CA; the apiserver calls it (logs,
            // exec, port-forward) on the node's InternalIP with a client certificate of its own.
            let kubelet_client = ca.issue_client("apiserver-kubelet-client", "kube-apiserver-kubelet-client", Some("system:masters"))?;
            node_args = args(&[
                ("--kubelet-preferred-address-types", "InternalIP"),
                ("--kubelet-client-certificate", &kubelet_client.cert.display().to_string()),
                ("--kubelet-client-key", &kubelet_client.key.display().to_string()),
                ("--kubelet-certificate-authority", &ca.ca_file().display().to_string()),
                ("--enable-admission-plugins", "NodeRestriction"),
            ]);
        }
        // With a node, the `kubernetes` Service's endpoints name the advertised address (as on a
        // cluster) and kubelets are authorized as nodes.
        let (reconciler, authorization) = if options.node_address.is_some() { ("lease", "Node,RBAC") } else { ("none", "RBAC") };
        // The issuer is the apiserver itself, so its discovery document and JWKS are reachable
        // at `{issuer}/.well-known/openid-configuration` as on AKS.
        let issuer = url.clone();
        let mut apiserver_args = args(&[
            ("--etcd-servers", &etcd_url),
            ("--bind-address", &address_arg),
            ("--advertise-address", &address_arg),
            ("--secure-port", &port.to_string()),
            ("--cert-dir", &pki_dir.display().to_string()),
            ("--tls-cert-file", &serving.cert.display().to_string()),
            ("--tls-private-key-file", &serving.key.display().to_string()),
            ("--client-ca-file", &ca.ca_file().display().to_string()),
            ("--service-account-issuer", &issuer),
            ("--service-account-key-file", &sa_pub.display().to_string()),
            ("--service-account-signing-key-file", &sa_key.display().to_string()),
            ("--authorization-mode", authorization),
            ("--service-cluster-ip-range", "10.96.0.0/16"),
            ("--endpoint-reconciler-type", reconciler),
            ("--profiling", "false"),
            ("--v", "1"),
        ]);
        apiserver_args.extend(node_args);
        apiserver_args.extend(options.apiserver_args.iter().cloned());
        let apiserver =
            LabProcess::spawn("kube-apiserver", &bin_dir.join("kube-apiserver"), &apiserver_args, &dir.path().join("kube-apiserver.log"))?;

        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&url, ca.ca_file(), &admin.cert, &admin.key))?;

        // kube-controller-manager
        let kcm_port = free_port()?;
        let kubeconfig_arg = kubeconfig.display().to_string();
        let controller_manager = LabProcess::spawn(
            "kube-controller-manager",
            &bin_dir.join("kube-controller-manager"),
            &args(&[
                ("--kubeconfig", &kubeconfig_arg),
                ("--authentication-kubeconfig", &kubeconfig_arg),
                ("--authorization-kubeconfig", &kubeconfig_arg),
                ("--bind-address", "127.0.0.1"),
                ("--secure-port", &kcm_port.to_string()),
                ("--cert-dir", &dir.path().join("kcm-certs").display().to_string()),
                ("--leader-elect", "false"),
                ("--service-account-private-key-file", &sa_key.display().to_string()),
                ("--root-ca-file", &ca.ca_file().display().to_string()),
                ("--use-service-account-credentials", "false"),
                ("--profiling", "false"),
                ("--v", "1"),
            ]),
            &dir.path().join("kube-controller-manager.log"),
        )?;

        let mut lab = KubeLab { dir, controller_manager, apiserver, etcd, url, issuer, kubeconfig, ca, bin_dir };
        lab.wait_ready(Duration::from_secs(120)).await?;
        lab.allow_public_issuer_discovery().await?;
        lab.wait_controller_manager(Duration::from_secs(120)).await?;
        tracing::info!(url = %lab.url, elapsed = ?started.elapsed(), "lab control plane ready");
        Ok(lab)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            self.etcd.check_running()?;
            self.apiserver.check_running()?;
            match self.client().await {
                Ok(client) => {
                    let req = http::Request::get("/readyz").body(Vec::new())?;
                    match client.request_text(req).await {
                        Ok(text) if text.trim() == "ok" => return Ok(()),
                        Ok(text) => last = text,
                        Err(err) => last = err.to_string(),
                    }
                }
                Err(err) => last = format!("{err:#}"),
            }
            if Instant::now() > deadline {
                bail!("kube-apiserver was not ready within {timeout:?} (last answer: {last}); its log ends with:\n{}", self.apiserver.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// AKS serves the issuer's discovery documents publicly; the lab does the same so the Entra
    /// double can fetch the JWKS like Entra does, without credentials.
    async fn allow_public_issuer_discovery(&self) -> Result<()> {
        let api: Api<ClusterRoleBinding> = Api::all(self.client().await?);
        let binding = ClusterRoleBinding {
            metadata: ObjectMeta { name: Some("lab-public-service-account-issuer-discovery".into()), ..Default::default() },
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: "system:service-account-issuer-discovery".into(),
            },
            subjects: Some(vec![Subject {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Group".into(),
                name: "system:unauthenticated".into(),
                ..Default::default()
            }]),
        };
        match api.create(&PostParams::default(), &binding).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(err) => Err(err).context("cannot bind system:service-account-issuer-discovery"),
        }
    }

    /// The controller manager works once its service-account controller has created `default`.
    async fn wait_controller_manager(&mut self, timeout: Duration) -> Result<()> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client().await?, "default");
        let deadline = Instant::now() + timeout;
        loop {
            self.controller_manager.check_running()?;
            if api.get_opt("default").await?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-controller-manager did not create the default ServiceAccount within {timeout:?}; its log ends with:\n{}",
                    self.controller_manager.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A new client with cluster-admin rights. Make one per test: a client belongs to the
    /// tokio runtime it was made on.
    pub async fn client(&self) -> Result<kube::Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Creates a namespace with a unique name starting with `prefix`.
    pub async fn namespace(&self, prefix: &str) -> Result<String> {
        let api: Api<Namespace> = Api::all(self.client().await?);
        let ns = Namespace { metadata: ObjectMeta { generate_name: Some(format!("{prefix}-")), ..Default::default() }, ..Default::default() };
        let created = api.create(&PostParams::default(), &ns).await?;
        created.metadata.name.context("the apiserver returned a namespace without a name")
    }

    /// A projected service-account token as the workload identity webhook gives a pod: minted by
    /// the TokenRequest API for `namespace/service_account` (created when missing) with `audience`.
    pub async fn service_account_token(&self, namespace: &str, service_account: &str, audience: &str, expiration_seconds: i64) -> Result<String> {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        let api: Api<ServiceAccount> = Api::namespaced(self.client().await?, namespace);
        if api.get_opt(service_account).await?.is_none() {
            let sa = ServiceAccount { metadata: ObjectMeta { name: Some(service_account.into()), ..Default::default() }, ..Default::default() };
            api.create(&PostParams::default(), &sa).await?;
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![audience.into()]),
                expiration_seconds: Some(expiration_seconds),
                ..Default::default()
            }),
            ..Default::default()
        };
        let answer = api.create_token_request(service_account, &PostParams::default(), &request).await?;
        answer.status.and_then(|s| s.token).context("TokenRequest answered without a token")
    }

    /// The key the apiserver signs service-account tokens with (PKCS#8 PEM).
    pub fn service_account_signing_key(&self) -> PathBuf {
        self.dir.path().join("pki").join("service-account.key")
    }

    /// The apiserver's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The service-account token issuer (an https URL).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// A kubeconfig file for the lab's administrator.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The lab's CA.
    pub fn ca(&self) -> &LabCa {
        &self.ca
    }

    /// The directory of this lab's data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The Kubernetes and etcd versions the lab runs.
    pub fn versions(&self) -> String {
        let etcd = std::fs::read_to_string(self.bin_dir.parent().unwrap_or(&self.bin_dir).join("etcd-version")).unwrap_or_default();
        format!("kubernetes {} / etcd {}", Versions::get().kube, etcd.trim())
    }

    /// The directory holding kubectl and the control-plane binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }
}

pub(crate) fn args(pairs: &[(&str, &str)]) -> Vec<String> {
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// A kubeconfig file's text for a client certificate (e.g. one from [`KubeLab::ca`]).
pub fn kubeconfig_yaml(url: &str, ca: &Path, cert: &Path, key: &Path) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: {url}
    certificate-authority: {ca}
users:
- name: lab-admin
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: lab
  context:
    cluster: lab
    user: lab-admin
    namespace: default
current-context: lab
",
        ca = ca.display(),
        cert = cert.display(),
        key = key.display()
    )
}
