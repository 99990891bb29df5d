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
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use vmesh_api::ca::{self, IstioCertificateRequest, IstioCertificateResponse};
use vmesh_api::control::{
    ApiError, EntryRef, EntryRequest, ErrorKind, HealthRequest, HealthResponse, RegisterRequest,
    RegisterResponse,
};
use vmesh_api::forward;
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
    /// A gRPC call ended with a status other than OK (`grpc-status`, `grpc-message`).
    #[error("gRPC status {code}: {message}")]
    Grpc { code: u32, message: String },
}

/// gRPC status codes the client tells apart (grpc/grpc `doc/statuscodes.md`).
pub mod grpc_code {
    pub const OK: u32 = 0;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNAVAILABLE: u32 = 14;
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
            CallError::Grpc { code, .. } => matches!(
                *code,
                grpc_code::UNAVAILABLE
                    | grpc_code::DEADLINE_EXCEEDED
                    | grpc_code::RESOURCE_EXHAUSTED
            ),
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
            Ok((status, _, body)) if status.as_u16() >= 400 => Err(CallError::Api(
                ApiError::from_response(status.as_u16(), &body),
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

    /// Istio's `CreateCertificate`, over the same connection and trust as every other call:
    /// one gRPC message each way (`vmesh_api::forward::frame`), the status in the trailers
    /// (or in the headers, for a gRPC "trailers-only" answer).
    pub async fn create_certificate(
        &self,
        req: &IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, CallError> {
        let (token, _) = self.token.get()?;
        let mut body = Vec::new();
        forward::frame(&req.encode_to_vec(), &mut body);
        let attempt = async {
            let mut sender = self.sender().await?;
            let mut r = Request::builder()
                .method(Method::POST)
                .uri(format!("https://{}{}", self.endpoint.authority, ca::PATH))
                .header(CONTENT_TYPE, forward::GRPC_CONTENT_TYPE)
                .header("te", "trailers");
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
                r = r.header(AUTHORIZATION, v);
            }
            let r = r
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| CallError::Decode {
                    status: 0,
                    reason: format!("request: {e}"),
                })?;
            sender.ready().await?;
            let resp = sender.send_request(r).await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let collected = resp.into_body().collect().await?;
            let trailers = collected.trailers().cloned();
            Ok::<_, CallError>((status, headers, trailers, collected.to_bytes()))
        };
        let (status, headers, trailers, bytes) =
            match tokio::time::timeout(CALL_TIMEOUT, attempt).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    if matches!(e, CallError::Http(_)) {
                        self.forget().await;
                    }
                    return Err(e);
                }
                Err(_) => {
                    self.forget().await;
                    return Err(CallError::Timeout(CALL_TIMEOUT));
                }
            };
        if status != StatusCode::OK {
            return Err(CallError::Api(ApiError::from_response(
                status.as_u16(),
                &bytes,
            )));
        }
        let grpc_status = |h: &hyper::HeaderMap| {
            let code = h
                .get("grpc-status")?
                .to_str()
                .ok()?
                .trim()
                .parse::<u32>()
                .ok()?;
            let message = h
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .map(percent_decode)
                .unwrap_or_default();
            Some((code, message))
        };
        let (code, message) = trailers
            .as_ref()
            .and_then(grpc_status)
            .or_else(|| grpc_status(&headers))
            .ok_or_else(|| CallError::Decode {
                status: 200,
                reason: "no grpc-status in the answer".into(),
            })?;
        if code != grpc_code::OK {
            return Err(CallError::Grpc { code, message });
        }
        let mut frames = forward::GrpcFrames::default();
        frames.push(&bytes);
        let decode = |reason: String| CallError::Decode {
            status: 200,
            reason,
        };
        let message = frames
            .next_message()
            .map_err(|e| decode(e.to_string()))?
            .ok_or_else(|| decode("no response message".into()))?;
        IstioCertificateResponse::decode(message).map_err(|e| decode(e.to_string()))
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2, "Responses").
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
