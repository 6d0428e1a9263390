//! Benchmark of Entra sign-in against the lab's doubles (not a test: it prints figures and
//! ratios measured in one run). Run with `bash scripts/bench-auth.sh [--iterations N]`.
//!
//! - token acquisition through the in-crate OIDC client (azure_identity's
//!   WorkloadIdentityCredential over our transport), p50/p99;
//! - the same request as a bare HTTPS POST on the same transport: the client's overhead;
//! - opening an authenticated connection: MONGODB-OIDC through the login gateway vs SCRAM-SHA-256
//!   directly, each next to an unauthenticated connect + ping on the same path.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use mongo_replicator::auth::oidc::TokenSources;
use mongo_replicator::auth::oidc::{EntraMetrics, Identity, TokenSource};
use mongo_replicator::auth::{EndpointConfig, EndpointRole, EntraSettings, Login};
use mongo_replicator::https::HttpsTransport;
use mongo_replicator_lab::azure::{AzureLab, PodIdentity};
use mongo_replicator_lab::entra::{EntraOptions, TOKEN_EXCHANGE_AUDIENCE};
use mongo_replicator_lab::{KubeLab, ScramUser, SecantusOptions, SecantusServer};
use mongodb::bson::doc;
use mongodb::options::ClientOptions;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index.min(samples.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Figures {
    name: &'static str,
    samples: Vec<Duration>,
}

impl Figures {
    fn p50(&mut self) -> Duration {
        percentile(&mut self.samples, 0.5)
    }
    fn p99(&mut self) -> Duration {
        percentile(&mut self.samples, 0.99)
    }
    fn print(&mut self) {
        let (p50, p99) = (self.p50(), self.p99());
        println!("{:<48} {:>9.2} {:>9.2}", self.name, ms(p50), ms(p99));
    }
}

async fn connect_and_ping(options: ClientOptions) -> Result<Duration> {
    let started = Instant::now();
    let client = mongodb::Client::with_options(options)?;
    client.database("admin").run_command(doc! {"ping": 1}).await?;
    let elapsed = started.elapsed();
    client.shutdown().await;
    Ok(elapsed)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut iterations = 200usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // `cargo bench` passes --bench to every bench target.
            "--bench" => {}
            "--iterations" => iterations = args.next().context("--iterations needs a number")?.parse()?,
            "-h" | "--help" => {
                println!("auth-bench [--iterations N]: Entra token and MONGODB-OIDC login figures against the lab doubles");
                return Ok(());
            }
            other => bail!("unknown argument {other}"),
        }
    }
    println!(
        "auth-bench: {iterations} iterations each; Entra double, login gateway and SecantusDB on this machine's {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );

    let kube = KubeLab::start().await?;
    let azure = AzureLab::start(&kube, EntraOptions::default()).await?;
    let namespace = kube.namespace("bench").await?;
    let pod = PodIdentity::mint(&kube, azure.dir(), &namespace, "replicator").await?;
    let identity = azure.create_identity("bench");
    azure.add_federated_credential(&identity, "bench", kube.issuer(), &pod.subject(), TOKEN_EXCHANGE_AUDIENCE).await?;
    let oidc_identity = Identity {
        client_id: identity.client_id.clone(),
        tenant_id: azure.tenant_id().to_string(),
        scope: "https://ossrdbms-aad.database.windows.net/.default".into(),
        authority_host: azure.entra.authority_host(),
        token_file: pod.token_file.clone(),
        ca_file: Some(azure.ca_file().to_path_buf()),
    };

    // Token acquisition: each call refuses the previous token, so each one goes to Entra.
    let source = TokenSource::new(oidc_identity.clone(), EntraMetrics::new())?;
    let mut token = source.token(None, None).await?;
    let mut acquire = Figures { name: "token acquisition (OIDC client)", samples: Vec::new() };
    for _ in 0..iterations {
        let started = Instant::now();
        token = source.token(Some(token.generation), None).await?;
        acquire.samples.push(started.elapsed());
    }

    // The same request as a bare POST over the same kind of transport.
    let transport = HttpsTransport::new(Some(azure.ca_file()))?;
    let url = format!("{}{}/oauth2/v2.0/token", azure.entra.authority_host(), azure.tenant_id());
    let assertion = std::fs::read_to_string(&pod.token_file)?;
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("client_assertion", &assertion)
        .append_pair("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        .append_pair("client_id", &identity.client_id)
        .append_pair("grant_type", "client_credentials")
        .append_pair("scope", &oidc_identity.scope)
        .finish();
    let mut bare = Figures { name: "bare HTTPS POST of the same request", samples: Vec::new() };
    for _ in 0..iterations + 1 {
        let request =
            http::Request::post(&url).header("content-type", "application/x-www-form-urlencoded").body(Full::new(Bytes::from(body.clone())))?;
        let started = Instant::now();
        let (status, _, _) = transport.send(request).await.map_err(anyhow::Error::msg)?;
        anyhow::ensure!(status == 200, "bare POST answered {status}");
        bare.samples.push(started.elapsed());
    }
    bare.samples.remove(0); // the first one opened the connection

    // Authenticated connections.
    let server = SecantusServer::start(SecantusOptions::default()).await?;
    let cluster = azure.create_cluster("bench");
    azure.register_cluster_user(&cluster, &identity.principal_id).await?;
    let gateway = azure.gateway(&server, &cluster).await?;
    let endpoint = EndpointConfig {
        login: Login::Entra {
            uri: azure.gateway_uri(&gateway),
            identity: EntraSettings {
                client_id: Some(identity.client_id.clone()),
                tenant_id: Some(azure.tenant_id().to_string()),
                scope: None,
                authority_host: Some(azure.entra.authority_host()),
                token_file: Some(pod.token_file.clone()),
                ca_file: Some(azure.ca_file().to_path_buf()),
            },
        },
        ca_file: None,
    };
    let tokens = TokenSources::default();
    let user = ScramUser::new("bench", "bench-password", &[("admin", "root")]);
    let scram_server = SecantusServer::start(SecantusOptions { tls: true, users: vec![user.clone()], ..Default::default() }).await?;

    let oidc_options = endpoint.client_options(EndpointRole::Target, &tokens).await?;
    let first = connect_and_ping(oidc_options.clone()).await?; // fetches the token
    let plain_gateway = ClientOptions::parse(azure.gateway_uri(&gateway).replace("&authMechanism=MONGODB-OIDC", "")).await?;
    let scram = ClientOptions::parse(scram_server.uri_for(&user)).await?;
    let plain_direct = ClientOptions::parse(scram_server.uri()).await?;
    let mut oidc_login = Figures { name: "connect + MONGODB-OIDC login + ping (gateway)", samples: Vec::new() };
    let mut gateway_only = Figures { name: "connect + ping, no login (gateway)", samples: Vec::new() };
    let mut scram_login = Figures { name: "connect + SCRAM-SHA-256 login + ping (direct)", samples: Vec::new() };
    let mut direct_only = Figures { name: "connect + ping, no login (direct)", samples: Vec::new() };
    for _ in 0..iterations {
        // A fresh callback per client, as a new process would have; the token source is shared.
        let options = endpoint.client_options(EndpointRole::Target, &tokens).await?;
        oidc_login.samples.push(connect_and_ping(options).await?);
        gateway_only.samples.push(connect_and_ping(plain_gateway.clone()).await?);
        scram_login.samples.push(connect_and_ping(scram.clone()).await?);
        direct_only.samples.push(connect_and_ping(plain_direct.clone()).await?);
    }

    println!();
    println!("{:<48} {:>9} {:>9}", "", "p50 ms", "p99 ms");
    acquire.print();
    bare.print();
    oidc_login.print();
    gateway_only.print();
    scram_login.print();
    direct_only.print();
    println!();
    let overhead = acquire.p50().saturating_sub(bare.p50());
    println!("OIDC client overhead over the bare POST (p50): {:.2} ms ({:.2}x)", ms(overhead), ms(acquire.p50()) / ms(bare.p50()));
    let oidc_auth = oidc_login.p50().saturating_sub(gateway_only.p50());
    let scram_auth = scram_login.p50().saturating_sub(direct_only.p50());
    println!(
        "login cost (p50, minus the unauthenticated connect on the same path): MONGODB-OIDC {:.2} ms, SCRAM-SHA-256 {:.2} ms",
        ms(oidc_auth),
        ms(scram_auth)
    );
    println!("first connection of a process (token from Entra + login + ping): {:.2} ms", ms(first));
    println!("targets: token acquisition < 1000 ms, authentication < 200 ms, client overhead in single milliseconds");
    Ok(())
}
