//! The HTTPS API (documented for client authors in `docs/protocol.md`).
//!
//! Every request carries `Authorization: Bearer ...`: either the admin credential from the data
//! dir (config, tokens) or a VM's service-account token (register, heartbeat, health,
//! deregister, name table). Errors are JSON `{"error": kind, "message": ..., "field": ...}` with
//! 400 / 401 / 403 / 404 / 409 / 429 (with `Retry-After`) / 503 as the protocol document
//! lists.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use vmesh_istio::model::{Kind, ObjectKey, Resource};

use crate::activity::Activity;
use crate::clock::Clock;
use crate::config::{decode_all_checked, ConfigError, Document};
use crate::identity::{constant_time_eq, Identity, KeyError, Signer, TokenError, Verifier};
use crate::metrics::Metrics;
use crate::registry::{EntryRequest, HealthRequest, RegisterRequest, Registry, RegistryError};
use crate::store::Store;
use crate::tables::NameTables;

pub use vmesh_api::paths::header::TABLE_VERSION as VERSION_HEADER;
use vmesh_api::paths::{
    control as path, DEFAULT_TABLE_WAIT_SECS as DEFAULT_WAIT_SECS,
    MAX_TABLE_WAIT_SECS as MAX_WAIT_SECS,
};
const MAX_VM_BODY: usize = 64 << 10;
const MAX_ADMIN_BODY: usize = 16 << 20;
const MAX_TOKEN_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// Everything a request handler needs.
pub struct App<S: Store> {
    pub registry: Arc<Registry<S>>,
    pub tables: Arc<NameTables>,
    pub verifier: Arc<Verifier>,
    pub signer: Arc<Signer>,
    pub admin_token: String,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// Signs workload certificates (`CreateCertificate`).
    pub ca: Arc<crate::ca::WorkloadCa>,
}

impl<S: Store> std::fmt::Debug for App<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

pub use vmesh_api::control::{ApiError, ErrorKind};

fn unauthorized(e: &TokenError) -> ApiError {
    ApiError::new(ErrorKind::Unauthorized, e.to_string())
}

fn forbidden(m: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Forbidden, m)
}

fn not_found(m: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::NotFound, m)
}

impl From<ConfigError> for ApiError {
    fn from(e: ConfigError) -> Self {
        ApiError {
            field: Some(e.field.clone()),
            source: Some(e.source_name.clone()),
            index: Some(e.index),
            ..ApiError::new(ErrorKind::Invalid, e.to_string())
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let m = e.to_string();
        match e {
            RegistryError::BadRequest { field, message } => ApiError::bad(&field, message),
            RegistryError::Forbidden(_) => forbidden(m),
            RegistryError::NotFound(_) => not_found(m),
            RegistryError::Conflict(_) => ApiError::new(ErrorKind::Conflict, m),
            RegistryError::Unavailable(_) => ApiError::new(ErrorKind::Unavailable, m),
            RegistryError::TooManyRequests { retry_after, .. } => ApiError {
                // Whole seconds, rounded up: coming back early is only refused again.
                retry_after: Some(
                    retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0),
                ),
                ..ApiError::new(ErrorKind::TooManyRequests, m)
            },
        }
    }
}

/// Minting fails only when the random source or the signing primitive does: the server's
/// trouble, maybe passing, never the caller's.
impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        ApiError::new(ErrorKind::Unavailable, e.to_string())
    }
}

type Resp = Response<Full<Bytes>>;

/// A response body: the JSON API's, or a gRPC answer (which needs trailers).
pub type Body = http_body_util::Either<Full<Bytes>, GrpcBody>;

/// A unary gRPC response body: at most one message, then the trailers carrying the status.
#[derive(Debug)]
pub struct GrpcBody {
    data: Option<Bytes>,
    trailers: Option<hyper::HeaderMap>,
}

impl hyper::body::Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(d) = this.data.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(d))));
        }
        std::task::Poll::Ready(
            this.trailers
                .take()
                .map(|t| Ok(hyper::body::Frame::trailers(t))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// `grpc-message` as the gRPC spec encodes it: printable ASCII except `%` as is, everything
/// else percent-encoded (so any error text is a valid header value).
fn grpc_message(m: &str) -> HeaderValue {
    let mut out = String::with_capacity(m.len());
    for b in m.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap_or(HeaderValue::from_static(""))
}

/// A gRPC answer: HTTP 200, the message (if any), and `grpc-status`/`grpc-message` trailers.
fn grpc_response(message: Option<Vec<u8>>, code: u32, text: &str) -> Response<Body> {
    use vmesh_api::ca::status;
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert(status::STATUS_HEADER, HeaderValue::from(code));
    if !text.is_empty() {
        trailers.insert(status::MESSAGE_HEADER, grpc_message(text));
    }
    let data = message.map(|m| {
        let mut framed = Vec::with_capacity(m.len() + 5);
        vmesh_api::forward::frame(&m, &mut framed);
        Bytes::from(framed)
    });
    let mut r = Response::new(http_body_util::Either::Right(GrpcBody {
        data,
        trailers: Some(trailers),
    }));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(vmesh_api::forward::GRPC_CONTENT_TYPE),
    );
    r
}

/// The client's address, as the connection saw it.
#[derive(Debug, Clone, Copy)]
struct Peer(std::net::SocketAddr);

fn json_response<T: Serialize>(status: StatusCode, v: &T) -> Resp {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(vmesh_api::paths::content_type::JSON),
    );
    r
}

fn error_response(e: &ApiError) -> Resp {
    let mut r = json_response(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        e,
    );
    if let Some(secs) = e.retry_after {
        r.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

/// Counts a request in `vmesh_requests_in_flight` while it is handled.
struct InFlight<'a>(&'a Metrics);

impl<'a> InFlight<'a> {
    fn new(m: &'a Metrics) -> Self {
        m.requests_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(m)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .requests_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

enum Caller {
    Admin,
    Vm(Identity),
}

/// A query parameter, percent-decoded; empty counts as absent.
fn query_param(query: &str, name: &str) -> Option<String> {
    vmesh_api::paths::query::param(Some(query), name).filter(|v| !v.is_empty())
}

/// A network name a client may send: Istio's are free-form, but a table key made of anything
/// would let a client fill the table cache with junk, so the characters are those of
/// Kubernetes label values and names.
fn is_network_name(s: &str) -> bool {
    s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Istio's locality, `region[/zone[/subzone]]`: at most three parts of printable ASCII.
fn is_locality(s: &str) -> bool {
    s.is_empty()
        || (s.split('/').count() <= 3
            && s.split('/')
                .all(|p| p.len() <= 63 && p.bytes().all(|b| b.is_ascii_graphic())))
}

/// The body, refused once it is over `limit` bytes or still arriving after `timeout`: a client
/// trickling a body a byte at a time would otherwise hold its request (and its connection)
/// for as long as it liked.
async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let collected = tokio::time::timeout(timeout, Limited::new(req.into_body(), limit).collect())
        .await
        .map_err(|_| {
            ApiError::new(
                ErrorKind::Timeout,
                format!("request body not received within {timeout:?}"),
            )
        })?;
    collected.map(|c| c.to_bytes()).map_err(|e| {
        ApiError::bad(
            "",
            format!("request body unreadable or larger than {limit} bytes: {e}"),
        )
    })
}

/// A request body: one JSON object and nothing after it. serde would take a struct from an
/// array too (`["g", "", "10.0.0.1"]` as a RegisterRequest, by position) and stops reading
/// after the first value, so both are refused here: what a request means is never decided by
/// field order or by bytes the parser did not look at.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let first = body.iter().find(|c| !c.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(ApiError::bad(
            "",
            "invalid JSON body: must be a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        ApiError::bad(
            if path == "." { "" } else { &path },
            format!("invalid JSON body: {}", e.inner()),
        )
    })?;
    de.end()
        .map_err(|e| ApiError::bad("", format!("invalid JSON body: data after the object: {e}")))?;
    Ok(v)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApplyRequest {
    pub documents: Vec<Document>,
    /// Namespace for objects that name none.
    #[serde(default)]
    pub namespace: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    pub namespace: String,
    pub service_account: String,
    pub ttl_seconds: u64,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenResponse {
    pub token: String,
    pub expires_at: String,
}

/// Never shows the token.
impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl<S: Store> App<S> {
    /// Who is calling, from `Authorization: Bearer`: the admin credential or a verified
    /// service-account token. A refusal is counted and logged here, for every API.
    fn authenticate(&self, req: &Request<Incoming>) -> Result<Caller, TokenError> {
        let token = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let refuse = |e: TokenError| {
            self.metrics.token_refusals.inc(&e);
            // The error's text quotes what the client sent (an issuer, a kid): a Debug field,
            // so it is escaped and quoted, never a line of its own.
            tracing::warn!(reason = e.reason(), error = ?e.to_string(), "token refused");
            e
        };
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(refuse(TokenError::Missing));
        };
        let caller = if constant_time_eq(token.as_bytes(), self.admin_token.as_bytes()) {
            Caller::Admin
        } else {
            self.verifier
                .verify(token)
                .map(Caller::Vm)
                .map_err(refuse)?
        };
        // Authenticated: this connection is no longer one an idle attacker could be holding.
        if let Some(Proven(p)) = req.extensions().get::<Proven>() {
            p.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(caller)
    }

    fn caller(&self, req: &Request<Incoming>) -> Result<Caller, ApiError> {
        self.authenticate(req).map_err(|e| {
            if e == TokenError::TooLarge {
                return ApiError::new(ErrorKind::HeaderTooLarge, e.to_string());
            }
            unauthorized(&e)
        })
    }

    fn vm(&self, caller: Caller) -> Result<Identity, ApiError> {
        match caller {
            Caller::Vm(id) => Ok(id),
            Caller::Admin => Err(forbidden("this call needs a VM service-account token")),
        }
    }

    fn admin(&self, caller: &Caller) -> Result<(), ApiError> {
        match caller {
            Caller::Admin => Ok(()),
            Caller::Vm(id) => {
                tracing::warn!(namespace = ?id.namespace, service_account = ?id.service_account, "VM token used on an admin call");
                Err(forbidden(
                    "only the admin credential may change config or mint tokens",
                ))
            }
        }
    }

    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let _in_flight = InFlight::new(&self.metrics);
        if path == vmesh_api::ca::PATH {
            let resp = self.create_certificate(req).await;
            tracing::debug!(%method, path = ?path, status = resp.status().as_u16(), "request");
            return Ok(resp);
        }
        let r = self.route(req).await;
        let resp = r.unwrap_or_else(|e| error_response(&e));
        tracing::debug!(%method, path = ?path, status = resp.status().as_u16(), "request");
        Ok(resp.map(http_body_util::Either::Left))
    }

    /// Istio's `IstioCertificateService/CreateCertificate`, unary gRPC: the token decides the
    /// identity, [`crate::ca::WorkloadCa`] the certificate.
    async fn create_certificate(&self, req: Request<Incoming>) -> Response<Body> {
        // gRPC's rule for a request that is not gRPC at all: 415, no gRPC status.
        let grpc = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(vmesh_api::forward::GRPC_CONTENT_TYPE));
        if req.method() != Method::POST || !grpc {
            let e = ApiError::new(
                ErrorKind::UnsupportedMediaType,
                "CreateCertificate is gRPC: POST with content-type application/grpc",
            );
            return error_response(&e).map(http_body_util::Either::Left);
        }
        match self.issue(req).await {
            Ok(chain) => {
                let msg = prost::Message::encode_to_vec(&vmesh_api::ca::IstioCertificateResponse {
                    cert_chain: chain,
                });
                grpc_response(Some(msg), vmesh_api::ca::status::OK, "")
            }
            Err(refusal) => {
                self.metrics.certificates_refused.inc(&refusal);
                match refusal {
                    crate::ca::Refusal::ForeignIdentity { .. }
                    | crate::ca::Refusal::NotAWorkload => {
                        tracing::warn!(reason = refusal.reason(), error = ?refusal.to_string(), "certificate refused")
                    }
                    _ => {
                        tracing::debug!(reason = refusal.reason(), error = ?refusal.to_string(), "certificate refused")
                    }
                }
                grpc_response(None, refusal.grpc_status(), &refusal.to_string())
            }
        }
    }

    async fn issue(&self, req: Request<Incoming>) -> Result<Vec<String>, crate::ca::Refusal> {
        use crate::ca::Refusal;
        use vmesh_api::ca::{IstioCertificateRequest, CLUSTER_ID_HEADER, MAX_REQUEST_BYTES};
        // The token first: nobody unauthenticated gets the server to read and parse a body.
        let id = match self.authenticate(&req).map_err(Refusal::Token)? {
            Caller::Vm(id) => id,
            Caller::Admin => return Err(Refusal::NotAWorkload),
        };
        let peer = req
            .extensions()
            .get::<Peer>()
            .map(|p| p.0.ip().to_string())
            .unwrap_or_default();
        let cluster_id: String = req
            .headers()
            .get(CLUSTER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .chars()
            .take(253)
            .collect();
        let limit = MAX_REQUEST_BYTES + 5;
        let body = tokio::time::timeout(
            self.body_timeout,
            Limited::new(req.into_body(), limit).collect(),
        )
        .await
        .map_err(|_| Refusal::Timeout(self.body_timeout))?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Refusal::Oversized {
                    limit: MAX_REQUEST_BYTES,
                }
            } else {
                Refusal::BadMessage(format!("request body: {e}"))
            }
        })?
        .to_bytes();
        let mut frames = vmesh_api::forward::GrpcFrames::default();
        frames.push(&body);
        let msg = match frames.next_message() {
            Ok(Some(m)) => m.to_vec(),
            Ok(None) => {
                return Err(Refusal::BadMessage(
                    "no complete gRPC message in the request".into(),
                ))
            }
            Err(vmesh_api::forward::DecodeError::Compressed(_)) => return Err(Refusal::Compressed),
            Err(e) => return Err(Refusal::BadMessage(e.to_string())),
        };
        if frames.pending() > 0 {
            return Err(Refusal::BadMessage(
                "more than one message on a unary call".into(),
            ));
        }
        let r: IstioCertificateRequest = prost::Message::decode(msg.as_slice())
            .map_err(|e| Refusal::BadMessage(format!("not an IstioCertificateRequest: {e}")))?;
        let mut signed = self
            .ca
            .sign(&r.csr, &id, r.validity_duration, self.clock.now())?;
        self.metrics
            .certificates_issued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        signed.record.peer = peer;
        signed.record.cluster_id = cluster_id;
        self.ca.remember(signed.record);
        Ok(signed.chain)
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Resp, ApiError> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let method = req.method().clone();
        match (&method, path.as_str()) {
            (&Method::GET, path::HEALTHZ) => {
                let mut r = Response::new(Full::new(Bytes::from_static(b"ok\n")));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                return Ok(r);
            }
            (&Method::GET, path::METRICS) => {
                let text = self
                    .metrics
                    .render(self.registry.gauges(), &self.registry.replica_gauges());
                let mut r = Response::new(Full::new(Bytes::from(text)));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                return Ok(r);
            }
            (&Method::GET, path::JWKS) => {
                return Ok(json_response(StatusCode::OK, &self.signer.jwks()));
            }
            _ => {}
        }
        let caller = self.caller(&req)?;
        match (&method, path.as_str()) {
            (&Method::POST, path::REGISTER) => {
                let id = self.vm(caller)?;
                let body: RegisterRequest =
                    parse_json(&read_body(req, MAX_VM_BODY, self.body_timeout).await?)?;
                let r = self.registry.register(&id, body).await?;
                Ok(json_response(StatusCode::OK, &r))
            }
            (&Method::POST, path::HEARTBEAT) => {
                let id = self.vm(caller)?;
                let body: EntryRequest =
                    parse_json(&read_body(req, MAX_VM_BODY, self.body_timeout).await?)?;
                let r = self.registry.heartbeat(&id, &body).await?;
                Ok(json_response(StatusCode::OK, &r))
            }
            (&Method::POST, path::HEALTH) => {
                let id = self.vm(caller)?;
                let body: HealthRequest =
                    parse_json(&read_body(req, MAX_VM_BODY, self.body_timeout).await?)?;
                let r = self.registry.health(&id, &body).await?;
                Ok(json_response(StatusCode::OK, &r))
            }
            (&Method::POST, path::DEREGISTER) => {
                let id = self.vm(caller)?;
                let body: EntryRequest =
                    parse_json(&read_body(req, MAX_VM_BODY, self.body_timeout).await?)?;
                self.registry.deregister(&id, &body).await?;
                Ok(json_response(StatusCode::OK, &serde_json::json!({})))
            }
            (&Method::GET, path::NAME_TABLE) => self.name_table(caller, &query).await,
            (&Method::POST, path::ADMIN_APPLY) => {
                self.admin(&caller)?;
                let body: ApplyRequest =
                    parse_json(&read_body(req, MAX_ADMIN_BODY, self.body_timeout).await?)?;
                let ns = if body.namespace.is_empty() {
                    "default"
                } else {
                    &body.namespace
                };
                let (resources, warnings) = decode_all_checked(&body.documents, ns)?;
                let results = self.registry.apply(resources).await?;
                // Istio's webhook warnings, for the client to print as kubectl does.
                let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
                let mut out = serde_json::json!({ "results": results });
                if !warnings.is_empty() {
                    out["warnings"] = serde_json::json!(warnings);
                }
                Ok(json_response(StatusCode::OK, &out))
            }
            (&Method::GET, path::ADMIN_CERTIFICATES) => {
                self.admin(&caller)?;
                Ok(json_response(
                    StatusCode::OK,
                    &vmesh_api::ca::IssuedList {
                        items: self.ca.recent(),
                    },
                ))
            }
            (&Method::GET, path::ADMIN_REPLICAS) => {
                self.admin(&caller)?;
                Ok(json_response(
                    StatusCode::OK,
                    &self.registry.replicas().await?,
                ))
            }
            (&Method::POST, path::ADMIN_TOKENS) => {
                self.admin(&caller)?;
                let body: TokenRequest =
                    parse_json(&read_body(req, MAX_VM_BODY, self.body_timeout).await?)?;
                self.mint(&body)
            }
            (m, p) if p.starts_with(path::ADMIN_OBJECTS) => {
                self.admin(&caller)?;
                self.objects(m, p.trim_start_matches(path::ADMIN_OBJECTS), &query)
                    .await
            }
            _ => Err(not_found(format!("no route for {method} {path}"))),
        }
    }

    async fn name_table(&self, caller: Caller, query: &str) -> Result<Resp, ApiError> {
        let ns = match caller {
            Caller::Vm(id) => id.namespace,
            // The admin may read any namespace's table (debugging, benchmarks).
            Caller::Admin => {
                query_param(query, vmesh_api::paths::query::NAMESPACE).ok_or_else(|| {
                    ApiError::bad("namespace", "Required value for the admin credential")
                })?
            }
        };
        let known = query_param(query, vmesh_api::paths::query::VERSION);
        let known = known.as_deref();
        let wait = match query_param(query, vmesh_api::paths::query::WAIT) {
            None => DEFAULT_WAIT_SECS,
            Some(w) => w
                .parse::<u64>()
                .map_err(|_| ApiError::bad("wait", "Invalid value: seconds as an integer"))?
                .min(MAX_WAIT_SECS),
        };
        let network = query_param(query, vmesh_api::paths::query::NETWORK).unwrap_or_default();
        if !is_network_name(&network) {
            return Err(ApiError::bad(
                "network",
                "Invalid value: at most 253 characters from [A-Za-z0-9._-]",
            ));
        }
        let locality = query_param(query, vmesh_api::paths::query::LOCALITY).unwrap_or_default();
        if !is_locality(&locality) {
            return Err(ApiError::bad(
                "locality",
                "Invalid value: region/zone/subzone, each at most 63 printable characters",
            ));
        }
        let key = crate::tables::TableKey {
            namespace: ns,
            network,
            locality,
        };
        match self
            .tables
            .poll(&key, known, Duration::from_secs(wait))
            .await
        {
            Some(t) => {
                let mut r = Response::new(Full::new(t.body.clone()));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(vmesh_api::paths::content_type::JSON),
                );
                if let Ok(v) = HeaderValue::from_str(&t.version) {
                    r.headers_mut().insert(VERSION_HEADER, v);
                }
                Ok(r)
            }
            None => {
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NOT_MODIFIED;
                if let Some(v) = known.and_then(|v| HeaderValue::from_str(v).ok()) {
                    r.headers_mut().insert(VERSION_HEADER, v);
                }
                Ok(r)
            }
        }
    }

    fn mint(&self, body: &TokenRequest) -> Result<Resp, ApiError> {
        use vmesh_istio::validate::{is_dns1123_label, is_dns1123_subdomain};
        if !is_dns1123_label(&body.namespace) {
            return Err(ApiError::bad(
                "namespace",
                "Invalid value: must be an RFC 1123 label",
            ));
        }
        if !is_dns1123_subdomain(&body.service_account) {
            return Err(ApiError::bad(
                "serviceAccount",
                "Invalid value: must be an RFC 1123 subdomain",
            ));
        }
        let ttl = Duration::from_secs(body.ttl_seconds);
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(ApiError::bad(
                "ttlSeconds",
                "Invalid value: between 1 second and 366 days",
            ));
        }
        let now = self.clock.now();
        let token = self
            .signer
            .mint(&body.namespace, &body.service_account, now, ttl)
            .map_err(ApiError::from)?;
        let expires_at = vmesh_api::time::format_rfc3339_secs(now + crate::clock::nanos(ttl));
        Ok(json_response(
            StatusCode::OK,
            &TokenResponse { token, expires_at },
        ))
    }

    async fn objects(&self, method: &Method, rest: &str, query: &str) -> Result<Resp, ApiError> {
        let mut parts = rest.split('/');
        let kind_s = parts.next().unwrap_or_default();
        let kind = Kind::from_cli(kind_s).ok_or_else(|| {
            not_found(format!(
                "the server doesn't have a resource type {kind_s:?}"
            ))
        })?;
        let ns = parts
            .next()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .or_else(|| query_param(query, vmesh_api::paths::query::NAMESPACE));
        let name = parts.next().filter(|s| !s.is_empty());
        let cache = self.registry.cache();
        let with_version = |c: &crate::cache::Cached| {
            let mut r: Resource = (*c.object).clone();
            r.meta_mut().resource_version = c.revision.to_string();
            r
        };
        match (method, name) {
            (&Method::GET, Some(name)) => {
                let ns = ns.unwrap_or_else(|| "default".into());
                let c = cache
                    .get(&ObjectKey::new(kind, &ns, name))
                    .ok_or_else(|| not_found(format!("{kind} {ns}/{name} not found")))?;
                Ok(json_response(StatusCode::OK, &with_version(&c)))
            }
            (&Method::GET, None) => {
                let items: Vec<Resource> = cache
                    .list(kind, ns.as_deref())
                    .iter()
                    .map(with_version)
                    .collect();
                Ok(json_response(
                    StatusCode::OK,
                    &serde_json::json!({ "items": items }),
                ))
            }
            (&Method::DELETE, Some(name)) => {
                let ns = ns.unwrap_or_else(|| "default".into());
                self.registry
                    .delete(&ObjectKey::new(kind, &ns, name))
                    .await?;
                Ok(json_response(
                    StatusCode::OK,
                    &serde_json::json!({"kind": kind, "namespace": ns, "name": name, "action": "deleted"}),
                ))
            }
            _ => Err(ApiError::new(
                ErrorKind::MethodNotAllowed,
                "use GET or DELETE",
            )),
        }
    }
}

/// What keeps a client from holding a connection (and so a file descriptor) for nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hygiene {
    /// From accept to a finished TLS handshake.
    pub handshake_timeout: Duration,
    /// HTTP/1.1: from the connection being ready for a request to that request's head having
    /// arrived in full. hyper starts this clock when it starts waiting, so an idle HTTP/1.1
    /// keep-alive connection closes after it too.
    pub header_read_timeout: Duration,
    /// From the head to the whole body.
    pub body_timeout: Duration,
    /// No request in flight for this long: the connection is closed (HTTP/2: GOAWAY). A
    /// long-poll is a request in flight, so a parked VM is never idle.
    pub idle_timeout: Duration,
    /// Open connections, at most (further capped by the open-file limit, see
    /// [`crate::conns::fd_budget`]).
    pub max_connections: usize,
    pub max_connections_per_source: usize,
}

impl Default for Hygiene {
    fn default() -> Self {
        Hygiene {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(20),
            max_connections: 20_000,
            max_connections_per_source: 1_000,
        }
    }
}

/// Largest request head: a 16 KiB token and ordinary headers fit twice over.
const MAX_HEADER_BYTES: usize = 64 << 10;
/// Concurrent HTTP/2 streams per connection: a VM needs two (a long-poll and a heartbeat).
const MAX_H2_STREAMS: u32 = 32;
/// How long a connection told to close (idle, evicted) gets to do so before it is dropped.
const CLOSE_PATIENCE: Duration = Duration::from_secs(2);

/// Resolves once `stop` is `true` (or its sender is gone: nobody can stop us any more, so
/// stop now rather than never).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Logs a recurring failure at most once per `every`, with how many were left out: under
/// attack the log stays readable and its writes cost nothing noticeable.
#[derive(Debug)]
pub struct RateLimited {
    every: Duration,
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl RateLimited {
    pub fn new(every: Duration) -> Self {
        RateLimited {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed since the last one)` when this occurrence should be logged.
    pub fn hit(&mut self) -> Option<u64> {
        self.hit_at(tokio::time::Instant::now())
    }

    fn hit_at(&mut self, now: tokio::time::Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Counts a connection in `vmesh_connections_open` while it is open.
struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    fn new(m: &Arc<Metrics>) -> Self {
        m.connections_open
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        OpenConnection(m.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0
            .connections_open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Marks the connection a request arrived on as authenticated (see [`crate::conns`]).
#[derive(Clone)]
struct Proven(Arc<std::sync::atomic::AtomicBool>);

/// Accepts TLS connections until `stop` turns `true`, then closes the listener and returns the
/// connections still open. Each of them has been told to finish the request it is serving and
/// close; the caller decides how long to wait for them.
pub async fn serve<S: Store>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Arc<App<S>>,
    hygiene: Hygiene,
    admission: Arc<crate::conns::Admission>,
    mut stop: watch::Receiver<bool>,
) -> JoinSet<()> {
    let acceptor = TlsAcceptor::from(tls);
    let mut conns = JoinSet::new();
    let mut accept_errors = RateLimited::new(Duration::from_secs(10));
    let mut refusals = RateLimited::new(Duration::from_secs(10));
    let mut backoff = Duration::ZERO;
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(x) => {
                    backoff = Duration::ZERO;
                    x
                }
                Err(e) => {
                    // Out of descriptors (EMFILE/ENFILE) or memory: retrying at once would spin
                    // and log thousands of times a second. Back off, doubling to 250 ms (longer
                    // would keep the VMs queued behind the failure waiting after it has passed).
                    app.metrics.accept_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_millis(250));
                    if let Some(suppressed) = accept_errors.hit() {
                        tracing::warn!(error = %e, suppressed, retry_in = ?backoff, "accept failed");
                    }
                    tokio::select! {
                        _ = stopped(&mut stop) => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    continue;
                }
            },
        };
        let admitted = match admission.admit(peer.ip()) {
            Ok(a) => a,
            Err(refusal) => {
                app.metrics.connections_refused.inc(&refusal);
                if let Some(suppressed) = refusals.hit() {
                    tracing::warn!(reason = refusal.reason(), source = %peer.ip(), suppressed,
                        "connection refused: at the connection cap with every connection authenticated");
                }
                continue;
            }
        };
        if admitted.evicted > 0 {
            app.metrics.connections_evicted.fetch_add(
                admitted.evicted as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let _ = tcp.set_nodelay(true);
        conns.spawn(connection(
            acceptor.clone(),
            tcp,
            peer,
            app.clone(),
            hygiene,
            admitted.ticket,
            stop.clone(),
        ));
    }
    drop(listener);
    conns
}

/// One client connection: TLS, then HTTP/1.1 or HTTP/2 (as ALPN chose) until the client
/// closes, the connection idles out or is evicted, or `stop`.
async fn connection<S: Store>(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    app: Arc<App<S>>,
    hygiene: Hygiene,
    ticket: crate::conns::Ticket,
    mut stop: watch::Receiver<bool>,
) {
    let evicted = ticket.evicted.clone();
    let _open = OpenConnection::new(&app.metrics);
    let tls = tokio::select! {
        biased;
        // No request has been read yet: nothing to finish.
        _ = stopped(&mut stop) => return,
        _ = evicted.notified() => return,
        r = tokio::time::timeout(hygiene.handshake_timeout, acceptor.accept(tcp)) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    let activity = Activity::new();
    let proven = Proven(ticket.proven.clone());
    let act = activity.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let busy = act.begin();
        req.extensions_mut().insert(proven.clone());
        req.extensions_mut().insert(Peer(peer));
        let app = app.clone();
        async move {
            let r = app.handle(req).await;
            drop(busy);
            r
        }
    });
    // Bytes going out count as activity: a long-poll's large answer may take longer than
    // the idle timeout to reach a slow or busy client after its handler returned.
    let io = hyper_util::rt::TokioIo::new(activity.watch_writes(tls));
    let timer = hyper_util::rt::TokioTimer::new();
    let result = if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        b.timer(timer)
            .max_concurrent_streams(MAX_H2_STREAMS)
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            // Pings find peers that vanished without a FIN; idleness is `idle_timeout`'s. A
            // ping is a write, and writes count as activity (`activity.rs`): at twice the idle
            // timeout, pings cannot keep an idle connection open (it is closed first).
            .keep_alive_interval(Some(hygiene.idle_timeout.saturating_mul(2)))
            .keep_alive_timeout(hygiene.header_read_timeout);
        drive(
            b.serve_connection(io, svc),
            &activity,
            hygiene,
            &evicted,
            &mut stop,
        )
        .await
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(timer)
            .header_read_timeout(hygiene.header_read_timeout)
            .max_buf_size(MAX_HEADER_BYTES);
        drive(
            b.serve_connection(io, svc),
            &activity,
            hygiene,
            &evicted,
            &mut stop,
        )
        .await
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
    drop(ticket);
}

/// Runs a connection until it ends, is idle for `idle_timeout`, is evicted, or `stop`.
async fn drive<C>(
    conn: C,
    activity: &Activity,
    hygiene: Hygiene,
    evicted: &tokio::sync::Notify,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), C::Error>
where
    C: hyper_util::server::graceful::GracefulConnection<Error = hyper::Error>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = stopped(stop) => {
            // HTTP/1.1: the request being served is answered, then the connection closes
            // (an idle one closes now). HTTP/2: GOAWAY, open streams are answered.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        _ = activity.idle_for(hygiene.idle_timeout) => {
            conn.as_mut().graceful_shutdown();
            // A client that ignores GOAWAY does not keep the descriptor.
            tokio::time::timeout(CLOSE_PATIENCE, conn).await.unwrap_or(Ok(()))
        }
        // Never authenticated, and its slot is wanted: nothing of value is lost.
        _ = evicted.notified() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::tests::Failing;
    use crate::random::RandomError;

    #[test]
    fn grpc_messages_are_percent_encoded_as_the_grpc_spec_says() {
        assert_eq!(
            grpc_message("CSR: 100% bad").to_str().unwrap(),
            "CSR: 100%25 bad"
        );
        assert_eq!(
            grpc_message("line\nbreak é").to_str().unwrap(),
            "line%0Abreak %C3%A9"
        );
    }

    #[test]
    fn a_recurring_failure_is_logged_once_per_period_with_the_count_left_out() {
        let mut r = RateLimited::new(Duration::from_secs(10));
        let t0 = tokio::time::Instant::now();
        assert_eq!(r.hit_at(t0), Some(0));
        for ms in 1..100 {
            assert_eq!(r.hit_at(t0 + Duration::from_millis(ms * 10)), None);
        }
        assert_eq!(r.hit_at(t0 + Duration::from_secs(10)), Some(99));
        assert_eq!(r.hit_at(t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn a_body_must_be_one_json_object_and_nothing_more() {
        let ok: Result<EntryRequest, _> = parse_json(b" {\"namespace\":\"ns\",\"name\":\"n\"}\n ");
        assert!(ok.is_ok(), "{ok:?}");
        for bad in [
            &br#"{"namespace":"ns","name":"n"}{"namespace":"ns","name":"m"}"#[..],
            br#"{"namespace":"ns","name":"n"} x"#,
            br#"["ns","n"]"#,
            br#""ns/n""#,
            b"null",
            b"",
        ] {
            let e = parse_json::<EntryRequest>(bad).unwrap_err();
            assert_eq!(
                (e.status, e.field.as_deref()),
                (400, Some("")),
                "{:?}: {e:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_failing_random_source_answers_503() {
        let signer = Signer::from_pkcs8(&Signer::generate_pkcs8().unwrap(), "https://i.test")
            .unwrap()
            .with_id_source(Arc::new(Failing));
        let e = signer
            .mint(
                "ns",
                "sa",
                1_700_000_000_000_000_000,
                Duration::from_secs(60),
            )
            .map_err(ApiError::from)
            .unwrap_err();
        assert_eq!(e.status, 503, "{e:?}");
        // A registration's new uid: the registry reports it as unavailable.
        let e = ApiError::from(RegistryError::Unavailable(RandomError.to_string()));
        assert_eq!(e.status, 503, "{e:?}");
    }
}
