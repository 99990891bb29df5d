//! The local HTTP API: routing, request checks, and the accept loop with graceful shutdown.
//!
//! | path              | method    | what                                                   |
//! |-------------------|-----------|--------------------------------------------------------|
//! | `/dns-query`      | POST, GET | RFC 8484 DoH, relayed by [`crate::forwarder`]           |
//! | `/v1/name-table`  | GET       | long-poll for the name table ([`crate::names`])         |
//! | `/healthz`        | GET       | `ok`                                                   |
//! | `/vmesh.dns.v1.Forwarder/Forward` | POST (gRPC) | the filter's forwarding stream ([`crate::grpc`]) |
//!
//! HTTP/1.1 and h2c with prior knowledge share the port (hyper-util's `auto` builder).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use vmesh_api::agent::{AgentReply, AgentReport};

use crate::dataplane::Tracker;
use crate::forwarder::{Forwarder, Mode, UnknownTransport, TRANSPORT_HEADER};
use crate::grpc::{self, AnswerStream};
use crate::metrics::Metrics;
use crate::names::{long_poll, Poll, Tables, DEFAULT_WAIT, MAX_WAIT};
use crate::probe::ProbePlan;
use crate::status::{Board, Status};

use vmesh_api::paths::content_type::{DNS_MESSAGE, JSON};
use vmesh_api::paths::header::TABLE_VERSION as TABLE_VERSION_HEADER;
use vmesh_api::paths::query;
use vmesh_api::paths::shim as path;
/// Largest DNS message (and so the largest request body) accepted.
pub const MAX_DNS_MESSAGE: usize = 65535;
/// How long open connections get to finish after shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

type Body = Full<Bytes>;
/// A plain response, or the forwarding stream's.
type AnyBody = Either<Body, AnswerStream>;

/// What requests are served from.
#[derive(Debug)]
pub struct App {
    pub forwarder: Arc<Forwarder>,
    /// `None` when there is no name table source.
    pub tables: Option<Tables>,
    /// Flips to `true` at shutdown so long-polls return instead of holding it up.
    pub stop: watch::Receiver<bool>,
    /// The data plane's reports, and what the shim tells the agent back.
    pub agent: Agent,
    pub board: Arc<Board>,
    pub metrics: Arc<Metrics>,
}

/// What the report endpoint needs.
#[derive(Debug)]
pub struct Agent {
    pub tracker: Arc<Tracker>,
    /// The probe plan: a filter probe goes back to the agent in the reply.
    pub plan: watch::Receiver<ProbePlan>,
}

/// Largest agent report accepted.
pub const MAX_REPORT: usize = 64 << 10;

/// Accepts connections until `stop` flips, then lets open ones finish (up to
/// [`SHUTDOWN_GRACE`]).
pub async fn serve(listener: TcpListener, app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The forwarding stream carries every query of an Envoy worker: windows large enough
    // that flow control does not pace a burst, and BDP-adaptive beyond that.
    builder
        .http2()
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .adaptive_window(true);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(route(&app, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period; closing them");
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A dropped sender also means stop; the guard `wait_for` returns must not live across an
    // await, so it is dropped here.
    let _ = stop.wait_for(|s| *s).await;
}

/// The forwarding stream, or [`handle`] for everything else.
async fn route(app: &Arc<App>, req: Request<Incoming>) -> Response<AnyBody> {
    if req.uri().path() == vmesh_api::forward::PATH && req.method() == Method::POST {
        if grpc::is_grpc(&req) {
            let stop = app.stop.clone();
            return grpc::forward_stream(Arc::clone(&app.forwarder), req, stop).map(Either::Right);
        }
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content-type must be application/grpc",
        )
        .map(Either::Left);
    }
    handle(app, req).await.map(Either::Left)
}

/// Routes one request. Never fails: every problem is a status code.
pub async fn handle(app: &App, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (path.as_str(), req.method()) {
        (path::DNS_QUERY, &Method::POST) => dns_post(app, req).await,
        (path::DNS_QUERY, &Method::GET) => dns_get(app, &req).await,
        (path::DNS_QUERY, _) => not_allowed("GET, POST"),
        (path::NAME_TABLE, &Method::GET) => name_table(app, &req).await,
        (path::HEALTHZ, &Method::GET) => text(StatusCode::OK, "ok"),
        (path::AGENT_REPORT, &Method::POST) => agent_report(app, req).await,
        (path::STATUS, &Method::GET) => status(app),
        (path::METRICS, &Method::GET) => metrics(app),
        (path::AGENT_REPORT, _) => not_allowed("POST"),
        (path::NAME_TABLE | path::HEALTHZ | path::STATUS | path::METRICS, _) => not_allowed("GET"),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

async fn dns_post(app: &App, req: Request<Incoming>) -> Response<Body> {
    let content_type = req.headers().get(CONTENT_TYPE).map(HeaderValue::as_bytes);
    if !content_type.is_some_and(is_dns_message) {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content-type must be application/dns-message",
        );
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_DNS_MESSAGE as u64) {
        return too_large();
    }
    let mode = match transport_mode(&req) {
        Ok(mode) => mode,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let body = match Limited::new(req.into_body(), MAX_DNS_MESSAGE)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("cannot read body: {e}")),
    };
    relay(app, &body, mode).await
}

/// The client's transport as the filter reported it.
fn transport_mode(req: &Request<Incoming>) -> Result<Mode, UnknownTransport> {
    Mode::from_header(
        req.headers()
            .get(TRANSPORT_HEADER)
            .map(HeaderValue::as_bytes),
    )
}

async fn dns_get(app: &App, req: &Request<Incoming>) -> Response<Body> {
    let mode = match transport_mode(req) {
        Ok(mode) => mode,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let message = match vmesh_core::doh::query_from_query_string(req.uri().query()) {
        Ok(m) => m,
        Err(e @ vmesh_core::doh::DohError::TooLarge) => {
            return text(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string())
        }
        Err(e) => return text(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    relay(app, &message, mode).await
}

async fn relay(app: &App, query: &[u8], mode: Mode) -> Response<Body> {
    match app.forwarder.forward(query, mode).await {
        Ok(answer) => {
            tracing::debug!(source = ?answer.source, ?mode, len = answer.message.len(), "query relayed");
            let mut resp = Response::new(Full::new(Bytes::from(answer.message)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(DNS_MESSAGE));
            resp
        }
        Err(e) => text(StatusCode::BAD_REQUEST, &format!("not a DNS query: {e}")),
    }
}

async fn name_table(app: &App, req: &Request<Incoming>) -> Response<Body> {
    let Some(tables) = &app.tables else {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(br#"{"error":"no name table source"}"#),
        );
    };
    let query = req.uri().query();
    let wait = match query::param(query, query::WAIT) {
        None => DEFAULT_WAIT,
        Some(s) => match s.parse::<u64>() {
            Ok(secs) => Duration::from_secs(secs).min(MAX_WAIT),
            Err(_) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "wait= must be a whole number of seconds",
                )
            }
        },
    };
    let known = query::param(query, query::VERSION);
    let (status, table) =
        match long_poll(tables.clone(), known.as_deref(), wait, app.stop.clone()).await {
            Poll::Changed(t) => (StatusCode::OK, t),
            Poll::NotModified(t) => (StatusCode::NOT_MODIFIED, t),
            Poll::NoTable => {
                return json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Bytes::from_static(br#"{"error":"no name table yet"}"#),
                )
            }
        };
    let body = if status == StatusCode::OK {
        table.json.clone()
    } else {
        Bytes::new()
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    if status == StatusCode::OK {
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    }
    // Checked when the table was loaded; a version that is not a header value never gets here.
    if let Ok(v) = HeaderValue::from_str(&table.version) {
        resp.headers_mut().insert(TABLE_VERSION_HEADER, v);
    }
    resp
}

/// `POST /v1/agent/report`: the data plane's proof of life; the reply says the registration
/// state and the probe the agent runs.
async fn agent_report(app: &App, req: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(req.into_body(), MAX_REPORT).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return text(StatusCode::PAYLOAD_TOO_LARGE, "a report is at most 64 KiB")
        }
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("cannot read body: {e}")),
    };
    let report: AgentReport = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("not an agent report: {e}"),
            )
        }
    };
    app.metrics.count_agent_report();
    app.agent.tracker.report(report);
    let probe = match &*app.agent.plan.borrow() {
        ProbePlan::Filter(task) => Some(task.clone()),
        ProbePlan::None | ProbePlan::Shim { .. } => None,
    };
    let reply = AgentReply {
        state: app.board.registration_state(),
        workload_entry: app.board.workload_entry(),
        probe,
    };
    match serde_json::to_vec(&reply) {
        Ok(b) => json(StatusCode::OK, Bytes::from(b)),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn snapshot(app: &App) -> Status {
    app.board.snapshot(&app.agent.tracker.current())
}

/// `GET /v1/status`.
fn status(app: &App) -> Response<Body> {
    match serde_json::to_vec_pretty(&snapshot(app)) {
        Ok(b) => json(StatusCode::OK, Bytes::from(b)),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `GET /metrics`.
fn metrics(app: &App) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(app.metrics.render(&snapshot(app)))));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(vmesh_api::paths::content_type::PROMETHEUS),
    );
    resp
}

/// `application/dns-message`, parameters and case ignored.
fn is_dns_message(value: &[u8]) -> bool {
    let mime = value.split(|b| *b == b';').next().unwrap_or_default();
    mime.trim_ascii()
        .eq_ignore_ascii_case(DNS_MESSAGE.as_bytes())
}

fn json(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    resp
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn too_large() -> Response<Body> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        "a DNS message is at most 65535 bytes",
    )
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_message_content_type_ignores_case_and_parameters() {
        assert!(is_dns_message(b"application/dns-message"));
        assert!(is_dns_message(b"Application/DNS-Message; charset=binary"));
        assert!(!is_dns_message(b"application/json"));
        assert!(!is_dns_message(b""));
    }
}
