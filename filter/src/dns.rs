//! DNS over HTTPS (RFC 8484) on worker threads: an HTTP filter on Envoy's DoH listener.
//!
//! `/dns-query`, GET or POST, is answered with a local reply, from the table or from the
//! shim's forwarder. Anything else passes untouched to the router. UDP and TCP DNS are
//! network filters ([`crate::conn`]); they share this module's per-worker [`Worker`].

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use vmesh_api::forward::Transport as ForwardTransport;
use vmesh_core::doh;
use vmesh_core::names::NameIndex;
use vmesh_core::responder::{respond, servfail, Outcome, Transport};
use vmesh_core::tunnel::Counts;

use crate::config::Config;
use crate::metrics::{Counter, Metrics};
use crate::stream::{self, Owner};
use crate::table::WorkerTable;

/// Per-worker state shared by every stream on that worker.
pub struct Worker {
    pub config: Config,
    pub metrics: Metrics,
    pub table: RefCell<WorkerTable>,
    /// Leading address of the next answer; advancing it spreads clients over addresses.
    pub rotation: Cell<u32>,
    /// Context ids of this root's UDP tunnels that are owed keepalives (a forward in flight).
    /// Stream contexts list and unlist themselves; the root's tick sends the keepalives,
    /// since proxy-wasm gives timers to root contexts only.
    pub keepalive: RefCell<Vec<u32>>,
}

impl Worker {
    pub fn table(&self) -> Option<Rc<NameIndex>> {
        self.table.borrow().get()
    }
}

enum Mode {
    /// Not a stream for this filter.
    Pass,
    /// A DoH request refused with this status; the reply waits for the end of the request
    /// body, because a reply before it makes HTTP/2 reset the stream and some clients then
    /// report the reset instead of the reply.
    Reject(u32, &'static str),
    /// Waiting for the POST body.
    Body,
    /// Forwarded: the worker's stream sends the answer as this stream's local reply.
    Forwarded,
}

pub struct DnsStream {
    worker: Rc<Worker>,
    /// This stream's context id: the worker's stream answers a forward through it.
    id: u32,
    mode: Mode,
}

impl DnsStream {
    pub fn new(worker: Rc<Worker>, id: u32) -> Self {
        DnsStream {
            worker,
            id,
            mode: Mode::Pass,
        }
    }

    /// Refuses a DoH request, now or (`now == false`) once its body has arrived.
    fn reject(&mut self, status: u32, text: &'static str, now: bool) -> Action {
        if now {
            self.worker.metrics.add(Counter::DohRejected, 1);
            send_text(status, text);
        } else {
            self.mode = Mode::Reject(status, text);
        }
        Action::Pause
    }

    /// Answers a DoH query or forwards it (the reply is sent when the forward completes).
    fn doh_query(&mut self, query: Vec<u8>) -> Action {
        let worker = Rc::clone(&self.worker);
        let table = worker.table();
        let rotation = worker.rotation.get();
        worker.rotation.set(rotation.wrapping_add(1));
        match respond(
            &query,
            Transport::Https,
            table.as_deref(),
            &worker.config.cluster_domain,
            rotation,
        ) {
            Outcome::Reply { message, verdict } => {
                let mut counts = Counts::default();
                counts.record(verdict);
                worker.metrics.add_counts(&counts);
                send_dns_message(&message);
            }
            Outcome::Forward => {
                worker.metrics.add(Counter::Forwarded, 1);
                let owner = Owner::Doh(self.id, Rc::clone(&worker));
                if stream::submit(owner, ForwardTransport::Https, &query).is_ok() {
                    self.mode = Mode::Forwarded;
                    stream::flush(self.id);
                } else {
                    worker.metrics.add(Counter::ForwardFailed, 1);
                    send_dns_message(&servfail(&query, Transport::Https).unwrap_or_default());
                }
            }
            Outcome::Drop(e) => {
                worker.metrics.add(Counter::DohRejected, 1);
                send_text(400, &format!("not a DNS query: {e}\n"));
            }
        }
        Action::Pause
    }
}

impl Context for DnsStream {}

impl HttpContext for DnsStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let header = |name| {
            hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
                .ok()
                .flatten()
        };
        let path = header(":path").unwrap_or_default();
        let route = path.split('?').next().unwrap_or_default();
        match route {
            doh::PATH => {
                let method = header(":method").unwrap_or_default();
                match method.as_str() {
                    "GET" => match doh::query_from_path(&path) {
                        Ok(query) => self.doh_query(query),
                        Err(e) => {
                            self.worker.metrics.add(Counter::DohRejected, 1);
                            send_text(400, &format!("{e}\n"));
                            Action::Pause
                        }
                    },
                    "POST" => {
                        let ctype = header("content-type").unwrap_or_default();
                        if !ctype.eq_ignore_ascii_case(doh::CONTENT_TYPE) {
                            self.reject(
                                415,
                                "content-type must be application/dns-message\n",
                                end_of_stream,
                            )
                        } else if end_of_stream {
                            self.reject(400, "POST without a DNS message\n", true)
                        } else {
                            self.mode = Mode::Body;
                            Action::Pause
                        }
                    }
                    _ => self.reject(405, "use GET or POST\n", end_of_stream),
                }
            }
            _ => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match self.mode {
            Mode::Pass => Action::Continue,
            Mode::Reject(status, text) => self.reject(
                status,
                text,
                end_of_stream || body_size > vmesh_core::dns::TCP_LIMIT,
            ),
            Mode::Forwarded => Action::Pause,
            Mode::Body => {
                if body_size > vmesh_core::dns::TCP_LIMIT {
                    self.worker.metrics.add(Counter::DohRejected, 1);
                    send_text(413, "DNS message larger than 65535 bytes\n");
                    return Action::Pause;
                }
                if !end_of_stream {
                    return Action::Pause;
                }
                let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                self.doh_query(body)
            }
        }
    }
}

pub fn send_dns_message(message: &[u8]) {
    let age = doh::max_age(message).map(|ttl| format!("max-age={ttl}"));
    let mut headers = vec![("content-type", doh::CONTENT_TYPE)];
    if let Some(age) = age.as_deref() {
        headers.push(("cache-control", age));
    }
    if let Err(e) = hostcalls::send_http_response(200, headers, Some(message)) {
        log::warn!("DoH answer not sent: {e:?}");
    }
}

fn send_text(status: u32, body: &str) {
    if let Err(e) = hostcalls::send_http_response(
        status,
        vec![("content-type", "text/plain")],
        Some(body.as_bytes()),
    ) {
        log::warn!("DoH error reply not sent: {e:?}");
    }
}
