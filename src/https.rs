//! The HTTPS client of the product: Microsoft Entra token requests (as azure_identity's
//! transport) and Azure Resource Manager calls go through it. hyper + rustls
//! (ring, like the rest of the binary) trusting the system roots plus optional extra CA
//! certificates (private endpoints, sovereign or private clouds), with pooled keep-alive
//! connections so a token refresh does not pay a TLS handshake.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use azure_core::http::headers::{HeaderName, HeaderValue, Headers};
use azure_core::http::{AsyncRawResponse, Body, HttpClient, Request, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::error_chain::describe;
use crate::reason::Reason;

/// Why the transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read extra CA certificates from {path}: {reason}")]
    UnreadableCa { path: String, reason: String },
    #[error("no trusted CA certificates: the system has none and no caFile was given")]
    NoRoots,
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

impl TransportError {
    pub fn reason(&self) -> Reason {
        match self {
            TransportError::UnreadableCa { .. } => Reason::CaFileUnreadable,
            TransportError::NoRoots => Reason::NoTrustedCertificates,
            TransportError::Tls(_) => Reason::TlsSetupFailed,
        }
    }
}

/// An `azure_core` HTTP client over hyper and rustls.
#[derive(Clone)]
pub struct HttpsTransport {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for HttpsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsTransport").finish_non_exhaustive()
    }
}

impl HttpsTransport {
    /// Trusts the system's CA certificates and, when given, the PEM certificates in `extra_ca`.
    pub fn new(extra_ca: Option<&Path>) -> Result<Self, TransportError> {
        let mut roots = rustls::RootCertStore::empty();
        // Unreadable system certificates are skipped: the extra CA may be all that is needed.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = extra_ca {
            let unreadable = |reason: String| TransportError::UnreadableCa { path: path.display().to_string(), reason };
            let pem = std::fs::read(path).map_err(|e| unreadable(e.kind().to_string()))?;
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(&pem).collect::<Result<_, _>>().map_err(|e| unreadable(e.to_string()))?;
            if certs.is_empty() {
                return Err(unreadable("no PEM certificate in the file".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| unreadable(e.to_string()))?;
            }
        }
        if roots.is_empty() {
            return Err(TransportError::NoRoots);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TransportError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only().enable_http1().wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(connector);
        Ok(Self { client })
    }

    /// Sends one request and reads the whole answer: status, headers and body.
    pub async fn send(&self, request: http::Request<Full<Bytes>>) -> Result<(u16, http::HeaderMap, Bytes), String> {
        let response = self.client.request(request).await.map_err(|e| describe(&e))?; // causes say what failed (DNS, refused, certificate)
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((parts.status.as_u16(), parts.headers, body))
    }
}

#[async_trait::async_trait]
impl HttpClient for HttpsTransport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        use azure_core::error::{Error, ErrorKind};
        let body = match request.body() {
            Body::Bytes(bytes) => bytes.clone(),
            Body::SeekableStream(_) => {
                return Err(Error::with_message(ErrorKind::Other, "streamed request bodies are not supported by this transport"));
            }
        };
        let mut builder = http::Request::builder().method(request.method().as_str()).uri(request.url().as_str());
        for (name, value) in request.headers().iter() {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let http_request = builder.body(Full::new(body)).map_err(|e| Error::with_message(ErrorKind::DataConversion, e.to_string()))?;
        let (status, headers, body) = self.send(http_request).await.map_err(|e| Error::with_message(ErrorKind::Io, e))?;
        let mut out = Headers::new();
        for (name, value) in &headers {
            if let Ok(value) = value.to_str() {
                out.insert(HeaderName::from(name.as_str().to_string()), HeaderValue::from(value.to_string()));
            }
        }
        Ok(AsyncRawResponse::from_bytes(StatusCode::from(status), out, body))
    }
}
