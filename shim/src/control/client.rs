//! The shim's HTTPS client of the control plane (`docs/protocol.md`).
//!
//! One TLS connection, HTTP/2, trusting only the bundle's root certificate: the name-table
//! long-poll and the heartbeats share it. A connection that fails is dropped and the next call
//! dials again, so a restarted control plane is picked up by the next call. Every call carries
//! the token as it is in its file now ([`TokenSource`]).
//!
//! Replicas: the control plane may have several addresses. A dial tries the one in use first,
//! then the others in their order, and the first that connects is used from then on: the shim
//! sticks to a replica while it works and moves on only when it cannot connect to it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
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
/// How long one address may take to connect (TCP, TLS, HTTP/2) before the next is tried: a
/// replica whose host is gone drops packets instead of refusing.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("root certificate: no PEM CERTIFICATE in it")]
    NoCertificate,
    #[error("root certificate: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("control plane name {0:?} is not a valid TLS server name")]
    BadName(String),
    #[error("no control plane address")]
    NoEndpoint,
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

/// One address of the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The TLS name (the discovery host, e.g. `istiod.istio-system.svc`).
    pub server_name: String,
    /// `:authority` of requests (`host:port`).
    pub authority: String,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.addr, self.server_name)
    }
}

/// What a name-table client says about itself: the table carries them back for the data
/// plane's routing (its own network decides which endpoints it reaches directly).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableClient {
    /// `ISTIO_META_NETWORK`.
    pub network: String,
    /// `region/zone/subzone`, from the labels as pilot-agent reads them.
    pub locality: String,
}

pub struct ControlPlane {
    /// Never empty.
    endpoints: Vec<(Endpoint, ServerName<'static>)>,
    /// Index of the endpoint in use: the last one that connected.
    current: AtomicUsize,
    tls: TlsConnector,
    token: Arc<TokenSource>,
    /// The open connection and the index of the endpoint it goes to.
    conn: tokio::sync::Mutex<Option<(usize, SendRequest<Full<Bytes>>)>>,
    /// Told each endpoint a connection is made to (for `status`).
    on_connect: Box<dyn Fn(&Endpoint) + Send + Sync>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("in_use", &self.in_use().addr)
            .finish_non_exhaustive()
    }
}

/// The order a dial tries `n` endpoints in: the one in use, then the others after it, round.
pub fn dial_order(current: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (current + k) % n)
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
    /// `endpoints` in the order to try them; every one is trusted through `root_pem`.
    /// `on_connect` hears of every connection made, with its endpoint.
    pub fn new(
        endpoints: Vec<Endpoint>,
        root_pem: &[u8],
        token: Arc<TokenSource>,
        on_connect: Box<dyn Fn(&Endpoint) + Send + Sync>,
    ) -> Result<Self, TlsSetupError> {
        if endpoints.is_empty() {
            return Err(TlsSetupError::NoEndpoint);
        }
        let tls = TlsConnector::from(Arc::new(tls_config(root_pem)?));
        let endpoints = endpoints
            .into_iter()
            .map(|e| {
                let name = ServerName::try_from(e.server_name.clone())
                    .map_err(|_| TlsSetupError::BadName(e.server_name.clone()))?;
                Ok((e, name))
            })
            .collect::<Result<_, TlsSetupError>>()?;
        Ok(ControlPlane {
            endpoints,
            current: AtomicUsize::new(0),
            tls,
            token,
            conn: tokio::sync::Mutex::new(None),
            on_connect,
        })
    }

    /// The endpoint in use (the first before anything connected).
    pub fn in_use(&self) -> &Endpoint {
        let i = self.current.load(Ordering::Relaxed);
        &self.endpoints[i.min(self.endpoints.len() - 1)].0
    }

    pub fn token(&self) -> &TokenSource {
        &self.token
    }

    /// Dials the endpoints in [`dial_order`]; the first that connects becomes the one in use.
    async fn connect(&self) -> Result<(usize, SendRequest<Full<Bytes>>), CallError> {
        let current = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in dial_order(current, self.endpoints.len()) {
            let (endpoint, name) = &self.endpoints[i];
            let attempt = tokio::time::timeout(CONNECT_TIMEOUT, self.connect_to(endpoint, name));
            let result = match attempt.await {
                Ok(r) => r,
                Err(_) => Err(CallError::Connect {
                    addr: endpoint.addr,
                    reason: format!("no connection within {CONNECT_TIMEOUT:?}"),
                }),
            };
            match result {
                Ok(s) => {
                    if i != current {
                        tracing::info!(control_plane = %endpoint, "control plane address changed");
                    }
                    self.current.store(i, Ordering::Relaxed);
                    (self.on_connect)(endpoint);
                    return Ok((i, s));
                }
                Err(e) => {
                    if self.endpoints.len() > 1 {
                        tracing::debug!(control_plane = %endpoint, error = %e, "trying the next address");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(CallError::Timeout(CONNECT_TIMEOUT)))
    }

    async fn connect_to(
        &self,
        endpoint: &Endpoint,
        name: &ServerName<'static>,
    ) -> Result<SendRequest<Full<Bytes>>, CallError> {
        let addr = endpoint.addr;
        let fail = |reason: String| CallError::Connect { addr, reason };
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(name.clone(), tcp)
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

    /// The open connection (and its endpoint's index), or a new one.
    async fn sender(&self) -> Result<(usize, SendRequest<Full<Bytes>>), CallError> {
        let mut conn = self.conn.lock().await;
        if let Some((i, s)) = conn.as_ref() {
            if !s.is_closed() {
                return Ok((*i, s.clone()));
            }
        }
        let (i, s) = self.connect().await?;
        *conn = Some((i, s.clone()));
        Ok((i, s))
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
            let (i, mut sender) = self.sender().await?;
            let mut req = Request::builder()
                .method(method)
                .uri(format!(
                    "https://{}{path_and_query}",
                    self.endpoints[i].0.authority
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

    /// `GET /v1/name-table`: waits up to `wait` for a version other than `known`. The
    /// table is cut for `whoami`'s network and locality (empty ones are not sent).
    pub async fn name_table(
        &self,
        known: Option<&str>,
        wait: Duration,
        whoami: &TableClient,
    ) -> Result<TablePoll, CallError> {
        let mut target = format!("{}?{}={}", path::NAME_TABLE, query::WAIT, wait.as_secs());
        if let Some(v) = known {
            target.push_str(&format!("&{}={}", query::VERSION, query::encode(v)));
        }
        for (name, value) in [
            (query::NETWORK, &whoami.network),
            (query::LOCALITY, &whoami.locality),
        ] {
            if !value.is_empty() {
                target.push_str(&format!("&{name}={}", query::encode(value)));
            }
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
            let (i, mut sender) = self.sender().await?;
            let mut r = Request::builder()
                .method(Method::POST)
                .uri(format!(
                    "https://{}{}",
                    self.endpoints[i].0.authority,
                    ca::PATH
                ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dial_starts_with_the_address_in_use_and_goes_round() {
        assert_eq!(dial_order(0, 3).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(dial_order(1, 3).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(dial_order(0, 1).collect::<Vec<_>>(), [0]);
    }
}
