//! The shim's HTTPS client of the control plane (`docs/protocol.md`).
//!
//! One TLS connection, HTTP/2, trusting only the bundle's root certificate: the name-table
//! long-poll and the heartbeats share it. A connection that fails is dropped and the next call
//! dials again, so a restarted control plane is picked up by the next call. Every call carries
//! the token as it is in its file now ([`TokenSource`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use vmesh_api::control::{
    ApiError, EntryRef, EntryRequest, ErrorKind, HealthRequest, HealthResponse, RegisterRequest,
    RegisterResponse,
};
use vmesh_api::paths::{content_type, control as path, header, query};

use super::token::{TokenError, TokenSource};

/// How long a call (but the long-poll) may take, connecting included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// What a long-poll may take beyond the wait it asked for.
const POLL_MARGIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("root certificate: no PEM CERTIFICATE in it")]
    NoCertificate,
    #[error("root certificate: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("control plane name {0:?} is not a valid TLS server name")]
    BadName(String),
}

/// Why a call failed. [`CallError::is_transient`] says whether retrying unchanged may help.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("connecting to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("HTTP/2: {0}")]
    Http(#[from] hyper::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("control plane said {0}")]
    Api(ApiError),
    #[error("unexpected response {status}: {reason}")]
    Decode { status: u16, reason: String },
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl CallError {
    /// Connection trouble, timeouts and 503 (or an unknown 5xx) are worth retrying with
    /// backoff; a refusal is not, until something changes.
    pub fn is_transient(&self) -> bool {
        match self {
            CallError::Connect { .. } | CallError::Http(_) | CallError::Timeout(_) => true,
            CallError::Api(e) => e.error.is_transient() || e.status >= 500,
            CallError::Decode { status, .. } => *status >= 500,
            CallError::Token(_) => false,
        }
    }

    /// How long the control plane asked us to wait before trying again (429's `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CallError::Api(e) => e.retry_after.map(Duration::from_secs),
            _ => None,
        }
    }

    /// The refusal's kind, if the control plane answered with one.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            CallError::Api(e) => Some(e.error),
            _ => None,
        }
    }
}

/// The answer to a name-table long-poll.
#[derive(Debug)]
pub enum TablePoll {
    /// A table the caller did not have: its version and JSON.
    Changed {
        version: String,
        json: Bytes,
    },
    NotModified,
}

/// Where the control plane is and how to trust it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The TLS name (the discovery host, e.g. `istiod.istio-system.svc`).
    pub server_name: String,
    /// `:authority` of requests (`host:port`).
    pub authority: String,
    pub root_pem: Vec<u8>,
}

pub struct ControlPlane {
    endpoint: Endpoint,
    name: ServerName<'static>,
    tls: TlsConnector,
    token: Arc<TokenSource>,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("endpoint", &self.endpoint.addr)
            .finish_non_exhaustive()
    }
}

/// A TLS client config trusting exactly the certificates in `root_pem`, offering HTTP/2.
pub fn tls_config(root_pem: &[u8]) -> Result<rustls::ClientConfig, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem) {
        roots.add(cert.map_err(|_| TlsSetupError::NoCertificate)?)?;
    }
    if roots.is_empty() {
        return Err(TlsSetupError::NoCertificate);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"h2".to_vec()];
    Ok(c)
}

impl ControlPlane {
    pub fn new(endpoint: Endpoint, token: Arc<TokenSource>) -> Result<Self, TlsSetupError> {
        let tls = TlsConnector::from(Arc::new(tls_config(&endpoint.root_pem)?));
        let name = ServerName::try_from(endpoint.server_name.clone())
            .map_err(|_| TlsSetupError::BadName(endpoint.server_name.clone()))?;
        Ok(ControlPlane {
            endpoint,
            name,
            tls,
            token,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn token(&self) -> &TokenSource {
        &self.token
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, CallError> {
        let addr = self.endpoint.addr;
        let fail = |reason: String| CallError::Connect { addr, reason };
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| fail(format!("TLS: {e}")))?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // A control plane that vanished without closing (a dead host, a dropped route)
            // is noticed by pings, not only by the next call's timeout.
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "control plane connection ended");
            }
        });
        Ok(sender)
    }

    /// The open connection, or a new one.
    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, CallError> {
        let mut conn = self.conn.lock().await;
        if let Some(s) = conn.as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let s = self.connect().await?;
        *conn = Some(s.clone());
        Ok(s)
    }

    async fn forget(&self) {
        *self.conn.lock().await = None;
    }

    /// One request; a status >= 400 is an [`CallError::Api`].
    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes), CallError> {
        let (token, _) = self.token.get()?;
        let attempt = async {
            let mut sender = self.sender().await?;
            let mut req = Request::builder()
                .method(method)
                .uri(format!(
                    "https://{}{path_and_query}",
                    self.endpoint.authority
                ))
                .header(ACCEPT, content_type::JSON);
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
                req = req.header(AUTHORIZATION, v);
            }
            if body.is_some() {
                req = req.header(CONTENT_TYPE, content_type::JSON);
            }
            let req = req
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| CallError::Decode {
                    status: 0,
                    reason: format!("request: {e}"),
                })?;
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, CallError>((status, headers, body))
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout(timeout)),
        };
        match result {
            Ok((status, headers, body)) if status.as_u16() >= 400 => Err(CallError::Api(
                ApiError::from_response(status.as_u16(), &body).with_retry_after(
                    headers
                        .get(hyper::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok()),
                ),
            )),
            Ok(ok) => Ok(ok),
            Err(e) => {
                if matches!(e, CallError::Http(_) | CallError::Timeout(_)) {
                    // The connection may be wedged; the next call dials afresh.
                    self.forget().await;
                }
                Err(e)
            }
        }
    }

    async fn post<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
    ) -> Result<Resp, CallError> {
        let body = serde_json::to_vec(req).map_err(|e| CallError::Decode {
            status: 0,
            reason: format!("request body: {e}"),
        })?;
        let (status, _, body) = self
            .call(Method::POST, path, Some(body), CALL_TIMEOUT)
            .await?;
        serde_json::from_slice(&body).map_err(|e| CallError::Decode {
            status: status.as_u16(),
            reason: format!("response body: {e}"),
        })
    }

    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, CallError> {
        self.post(path::REGISTER, req).await
    }

    pub async fn heartbeat(&self, entry: &EntryRef) -> Result<(), CallError> {
        self.post::<_, serde_json::Value>(path::HEARTBEAT, &EntryRequest::from(entry))
            .await
            .map(drop)
    }

    pub async fn health(&self, req: &HealthRequest) -> Result<HealthResponse, CallError> {
        self.post(path::HEALTH, req).await
    }

    pub async fn deregister(&self, entry: &EntryRef) -> Result<(), CallError> {
        self.post::<_, serde_json::Value>(path::DEREGISTER, &EntryRequest::from(entry))
            .await
            .map(drop)
    }

    /// `GET /v1/name-table`: waits up to `wait` for a version other than `known`.
    pub async fn name_table(
        &self,
        known: Option<&str>,
        wait: Duration,
    ) -> Result<TablePoll, CallError> {
        let mut target = format!("{}?{}={}", path::NAME_TABLE, query::WAIT, wait.as_secs());
        if let Some(v) = known {
            target.push_str(&format!("&{}={}", query::VERSION, query::encode(v)));
        }
        let (status, headers, body) = self
            .call(Method::GET, &target, None, wait + POLL_MARGIN)
            .await?;
        if status == StatusCode::NOT_MODIFIED {
            return Ok(TablePoll::NotModified);
        }
        let version = headers
            .get(header::TABLE_VERSION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Ok(TablePoll::Changed {
            version,
            json: body,
        })
    }
}
