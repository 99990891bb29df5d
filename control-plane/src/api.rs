//! The HTTPS API (documented for client authors in `docs/protocol.md`).
//!
//! Every request carries `Authorization: Bearer ...`: either the admin credential from the data
//! dir (config, tokens) or a VM's service-account token (register, heartbeat, health,
//! deregister, name table). Errors are JSON `{"error": kind, "message": ..., "field": ...}` with
//! 400 / 401 / 403 / 404 / 409 / 503 as the protocol document lists.

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
    json_response(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        e,
    )
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

async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| {
            ApiError::bad(
                "",
                format!("request body unreadable or larger than {limit} bytes: {e}"),
            )
        })
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        ApiError::bad(
            if path == "." { "" } else { &path },
            format!("invalid JSON body: {}", e.inner()),
        )
    })
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
    fn caller(&self, req: &Request<Incoming>) -> Result<Caller, ApiError> {
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
            tracing::warn!(reason = e.reason(), error = %e, "token refused");
            unauthorized(&e)
        };
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(refuse(TokenError::Missing));
        };
        if constant_time_eq(token.as_bytes(), self.admin_token.as_bytes()) {
            return Ok(Caller::Admin);
        }
        self.verifier.verify(token).map(Caller::Vm).map_err(refuse)
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
                tracing::warn!(namespace = %id.namespace, service_account = %id.service_account, "VM token used on an admin call");
                Err(forbidden(
                    "only the admin credential may change config or mint tokens",
                ))
            }
        }
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Resp, Infallible> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let _in_flight = InFlight::new(&self.metrics);
        let r = self.route(req).await;
        let resp = r.unwrap_or_else(|e| error_response(&e));
        tracing::debug!(%method, %path, status = resp.status().as_u16(), "request");
        Ok(resp)
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
                let text = self.metrics.render(self.registry.gauges());
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
                let body: RegisterRequest = parse_json(&read_body(req, MAX_VM_BODY).await?)?;
                let r = self.registry.register(&id, body).await?;
                Ok(json_response(StatusCode::OK, &r))
            }
            (&Method::POST, path::HEARTBEAT) => {
                let id = self.vm(caller)?;
                let body: EntryRequest = parse_json(&read_body(req, MAX_VM_BODY).await?)?;
                let r = self.registry.heartbeat(&id, &body).await?;
                Ok(json_response(StatusCode::OK, &r))
            }
            (&Method::POST, path::HEALTH) => {
                let id = self.vm(caller)?;
                let body: HealthRequest = parse_json(&read_body(req, MAX_VM_BODY).await?)?;
                let r = self.registry.health(&id, &body).await?;
                Ok(json_response(StatusCode::OK, &r))
            }
            (&Method::POST, path::DEREGISTER) => {
                let id = self.vm(caller)?;
                let body: EntryRequest = parse_json(&read_body(req, MAX_VM_BODY).await?)?;
                self.registry.deregister(&id, &body).await?;
                Ok(json_response(StatusCode::OK, &serde_json::json!({})))
            }
            (&Method::GET, path::NAME_TABLE) => self.name_table(caller, &query).await,
            (&Method::POST, path::ADMIN_APPLY) => {
                self.admin(&caller)?;
                let body: ApplyRequest = parse_json(&read_body(req, MAX_ADMIN_BODY).await?)?;
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
            (&Method::POST, path::ADMIN_TOKENS) => {
                self.admin(&caller)?;
                let body: TokenRequest = parse_json(&read_body(req, MAX_VM_BODY).await?)?;
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
        match self
            .tables
            .poll(&ns, known, Duration::from_secs(wait))
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

/// How long a client gets to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves once `stop` is `true` (or its sender is gone: nobody can stop us any more, so
/// stop now rather than never).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Accepts TLS connections until `stop` turns `true`, then closes the listener and returns the
/// connections still open. Each of them has been told to finish the request it is serving and
/// close; the caller decides how long to wait for them.
pub async fn serve<S: Store>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Arc<App<S>>,
    mut stop: watch::Receiver<bool>,
) -> JoinSet<()> {
    let acceptor = TlsAcceptor::from(tls);
    let mut conns = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        conns.spawn(connection(
            acceptor.clone(),
            tcp,
            peer,
            app.clone(),
            stop.clone(),
        ));
    }
    drop(listener);
    conns
}

/// One client connection: TLS, then HTTP/1.1 or HTTP/2 until the client closes or `stop`.
async fn connection<S: Store>(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    app: Arc<App<S>>,
    mut stop: watch::Receiver<bool>,
) {
    let tls = tokio::select! {
        biased;
        // No request has been read yet: nothing to finish.
        _ = stopped(&mut stop) => return,
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => return,
        },
    };
    let svc = hyper::service::service_fn(move |req| app.clone().handle(req));
    let builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stopped(&mut stop) => {
            // HTTP/1.1: the request being served is answered, then the connection closes
            // (an idle one closes now). HTTP/2: GOAWAY, open streams are answered.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::tests::Failing;
    use crate::random::RandomError;

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
