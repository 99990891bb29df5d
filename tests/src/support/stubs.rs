//! In-test HTTP servers on 127.0.0.1 for what the filter's agent talks to:
//! - [`ShimStub`] stands in for the shim's agent endpoint (`POST /v1/agent/report`) until the
//!   real shim serves it: it records every report and answers with the reply the test sets.
//!   It also serves a name table (`GET /v1/name-table`, long-polled like the shim's: a new
//!   table from [`ShimStub::set_table`] answers waiting polls at once) so mesh names are
//!   answered; `/dns-query` gets 503, so forwarded names end in SERVFAIL.
//!   HTTP/1.1 and h2c on one port, like the shim (the sidecar's shim cluster speaks HTTP/2).
//! - [`ProbeTarget`] is an application for probes to hit: it answers GETs with the status the
//!   test sets and keeps the requests it saw.
//!
//! Each runs on its own small Tokio runtime, stopped when the value is dropped.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::TcpListener as StdListener;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use vmesh_api::agent::{AgentReply, AgentReport};
use vmesh_api::paths::{content_type, header, query, shim};

type Body = Full<Bytes>;

/// Serves `handle` on `port` until the runtime is dropped.
fn serve<F, Fut>(what: &str, port: u16, handle: F) -> Runtime
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let listener = StdListener::bind(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("{what}: bind 127.0.0.1:{port}: {e}"));
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("a Tokio listener");
        let builder = auto::Builder::new(TokioExecutor::new());
        while let Ok((stream, _)) = listener.accept().await {
            let handle = handle.clone();
            let service = hyper::service::service_fn(move |req| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(handle(req).await) }
            });
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            tokio::spawn(conn);
        }
    });
    runtime
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// A report as the stand-in received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub report: AgentReport,
}

#[derive(Debug, Default)]
struct ShimState {
    reports: Vec<Received>,
    reply: AgentReply,
    /// Bodies that did not parse as an [`AgentReport`] (the test fails on any).
    unparsed: Vec<String>,
}

/// The shim's agent endpoint, played by the test (see the module doc).
#[derive(Debug)]
pub struct ShimStub {
    pub port: u16,
    state: Arc<Mutex<ShimState>>,
    table: watch::Sender<Arc<serde_json::Value>>,
    _runtime: Runtime,
}

impl ShimStub {
    /// Listens on `port` (the sidecar's shim port), serving `table` as the name table.
    pub fn start(port: u16, table: serde_json::Value) -> ShimStub {
        let state = Arc::new(Mutex::new(ShimState::default()));
        let (tx, rx) = watch::channel(Arc::new(table));
        let shared = state.clone();
        let runtime = serve("shim stand-in", port, move |req| {
            let (state, table) = (shared.clone(), rx.clone());
            async move { shim_request(&state, table, req).await }
        });
        ShimStub {
            port,
            state,
            table: tx,
            _runtime: runtime,
        }
    }

    /// Serves a new name table; polls waiting for a change get it at once.
    pub fn set_table(&self, table: serde_json::Value) {
        self.table.send_replace(Arc::new(table));
    }

    /// What the next replies say.
    pub fn set_reply(&self, reply: AgentReply) {
        self.lock().reply = reply;
    }

    /// Every report received so far, in arrival order.
    pub fn reports(&self) -> Vec<Received> {
        let state = self.lock();
        assert!(
            state.unparsed.is_empty(),
            "reports that are no AgentReport: {:?}",
            state.unparsed
        );
        state.reports.clone()
    }

    pub fn last(&self) -> Option<Received> {
        self.reports().pop()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ShimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn shim_request(
    state: &Mutex<ShimState>,
    mut tables: watch::Receiver<Arc<serde_json::Value>>,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match path.as_str() {
        shim::AGENT_REPORT => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return reply(StatusCode::BAD_REQUEST, "text/plain", "body"),
            };
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            match serde_json::from_slice::<AgentReport>(&body) {
                Ok(report) => state.reports.push(Received {
                    at: Instant::now(),
                    report,
                }),
                Err(e) => state
                    .unparsed
                    .push(format!("{e}: {}", String::from_utf8_lossy(&body))),
            }
            let json = serde_json::to_vec(&state.reply).expect("a reply serializes");
            reply(StatusCode::OK, content_type::JSON, json)
        }
        shim::NAME_TABLE => {
            let asked = query.get(query::VERSION).cloned();
            let version_of = |t: &serde_json::Value| t["version"].as_str().map(String::from);
            let current = version_of(&tables.borrow_and_update());
            if asked.is_some() && asked == current {
                // Long-poll: hold the request until the table changes or the wait ends.
                let wait = query
                    .get(query::WAIT)
                    .and_then(|w| w.parse().ok())
                    .unwrap_or(30u64);
                let changed = tokio::time::timeout(Duration::from_secs(wait), tables.changed());
                if !matches!(changed.await, Ok(Ok(()))) {
                    return reply(StatusCode::NOT_MODIFIED, content_type::JSON, "");
                }
            }
            let table = tables.borrow().clone();
            let mut r = reply(
                StatusCode::OK,
                content_type::JSON,
                serde_json::to_vec(&*table).expect("a table serializes"),
            );
            if let Some(Ok(v)) = version_of(&table).map(|v| v.parse()) {
                r.headers_mut().insert(header::TABLE_VERSION, v);
            }
            r
        }
        _ => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the shim stand-in does not forward DNS",
        ),
    }
}

/// An application for probes to hit (see the module doc).
#[derive(Debug)]
pub struct ProbeTarget {
    pub port: u16,
    status: Arc<AtomicU16>,
    requests: Arc<Mutex<Vec<Request<()>>>>,
    _runtime: Runtime,
}

impl ProbeTarget {
    /// Listens on a free port and answers 200 until told otherwise.
    pub fn start() -> ProbeTarget {
        let port = vmesh_test_support::free_port();
        let status = Arc::new(AtomicU16::new(200));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (status.clone(), requests.clone());
        let runtime = serve("probe target", port, move |req: Request<Incoming>| {
            let (status, requests) = (s.clone(), r.clone());
            async move {
                let (parts, _) = req.into_parts();
                requests
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Request::from_parts(parts, ()));
                let code = StatusCode::from_u16(status.load(Ordering::SeqCst))
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                reply(code, "text/plain", "probe target\n")
            }
        });
        ProbeTarget {
            port,
            status,
            requests,
            _runtime: runtime,
        }
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// The request heads received so far: (path with query, headers as lower-case pairs).
    pub fn requests(&self) -> Vec<(String, Vec<(String, String)>)> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|r| {
                let path = r
                    .uri()
                    .path_and_query()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                let headers = r
                    .headers()
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_string(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect();
                (path, headers)
            })
            .collect()
    }
}
