//! The DNS role on worker threads: an HTTP filter on Envoy's internal DNS listener.
//!
//! Three kinds of stream reach it, told apart by path:
//! - `/udp-tunnel`: udp_proxy's POST tunnel, datagrams as RFC 9297 capsules;
//! - `/tcp-tunnel` (or `x-dns-framing: tcp`): tcp_proxy's POST tunnel, RFC 1035 framing;
//! - `/dns-query`: DNS over HTTPS (RFC 8484), GET or POST, answered with a local reply.
//!
//! Tunnel bodies are rewritten in place from queries to answers; the router sends them to an
//! echo listener, which reflects them back to the client. Anything else passes untouched.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use vmesh_core::doh;
use vmesh_core::framing::Framing;
use vmesh_core::names::NameIndex;
use vmesh_core::responder::{forwarded_answer, respond, servfail, Outcome, Transport};
use vmesh_core::tunnel::{Counts, Tunnel};

use crate::callout;
use crate::config::Config;
use crate::metrics::{Counter, Metrics};
use crate::table::WorkerTable;

/// Per-worker state shared by every stream on that worker.
pub struct Worker {
    pub config: Config,
    pub metrics: Metrics,
    pub table: RefCell<WorkerTable>,
    /// Leading address of the next answer; advancing it spreads clients over addresses.
    pub rotation: Cell<u32>,
}

impl Worker {
    fn table(&self) -> Option<Rc<NameIndex>> {
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
    Tunnel(Tunnel),
    Doh(Option<Vec<u8>>),
}

pub struct DnsStream {
    worker: Rc<Worker>,
    mode: Mode,
    /// Callout token -> tunnel slot (tunnels) or 0 (DoH).
    callouts: HashMap<u32, usize>,
    /// Whether Envoy holds the body for us (we returned Pause from the body callback). While
    /// it does, each callback sees the whole held body, of which `parsed` bytes are known.
    held: bool,
    parsed: usize,
}

impl DnsStream {
    pub fn new(worker: Rc<Worker>) -> Self {
        DnsStream {
            worker,
            mode: Mode::Pass,
            callouts: HashMap::new(),
            held: false,
            parsed: 0,
        }
    }

    fn forward(&mut self, query: &[u8], transport: Option<&str>, slot: usize) -> bool {
        let cfg = &self.worker.config;
        let mut headers = vec![
            (":method", "POST"),
            (":path", doh::PATH),
            (":authority", cfg.shim_authority.as_str()),
            ("content-type", doh::CONTENT_TYPE),
            ("accept", doh::CONTENT_TYPE),
        ];
        if let Some(t) = transport {
            headers.push(("x-vmesh-transport", t));
        }
        let timeout = Duration::from_millis(cfg.forward_timeout_ms);
        match hostcalls::dispatch_http_call(
            &cfg.shim_cluster,
            headers,
            Some(query),
            vec![],
            timeout,
        ) {
            Ok(token) => {
                self.callouts.insert(token, slot);
                true
            }
            Err(e) => {
                log::warn!("forward to cluster {} not sent: {e:?}", cfg.shim_cluster);
                false
            }
        }
    }

    fn tunnel_body(&mut self, body_size: usize) -> Action {
        let Mode::Tunnel(tunnel) = &mut self.mode else {
            return Action::Continue;
        };
        let start = if self.held { self.parsed } else { 0 };
        let new = body_size.saturating_sub(start);
        let bytes = if new == 0 {
            Vec::new()
        } else {
            hostcalls::get_buffer(BufferType::HttpRequestBody, start, new)
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        let worker = Rc::clone(&self.worker);
        let table = worker.table();
        let mut rotation = worker.rotation.get();
        let fed = tunnel.feed(
            &bytes,
            table.as_deref(),
            &worker.config.cluster_domain,
            &mut rotation,
        );
        worker.rotation.set(rotation);
        let transport = match tunnel.framing() {
            Framing::Tcp => "tcp",
            Framing::Capsule => "udp",
        };
        let jobs = match fed {
            Ok(jobs) => jobs,
            Err(e) => {
                log::debug!("tunnel stream is not DNS, resetting it: {e}");
                let _ = hostcalls::reset_http_request();
                return Action::Pause;
            }
        };
        let failed: Vec<usize> = jobs
            .into_iter()
            .filter(|job| !self.forward(&job.query, Some(transport), job.slot))
            .map(|job| job.slot)
            .collect();
        let Mode::Tunnel(tunnel) = &mut self.mode else {
            return Action::Continue;
        };
        for slot in failed {
            tunnel.complete(slot, None);
        }
        let action = if tunnel.is_waiting() {
            self.held = true;
            self.parsed = body_size;
            Action::Pause
        } else {
            self.release(body_size);
            Action::Continue
        };
        self.flush_counts();
        action
    }

    /// Replaces the `buffered` body bytes (the queries seen so far) with the answers and
    /// forgets the hold; the caller continues or resumes the stream.
    fn release(&mut self, buffered: usize) {
        let Mode::Tunnel(tunnel) = &mut self.mode else {
            return;
        };
        let out = tunnel.take_output();
        if let Err(e) = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, buffered, &out) {
            log::warn!("answers not written to the stream: {e:?}");
        }
        self.held = false;
        self.parsed = 0;
    }

    fn flush_counts(&mut self) {
        if let Mode::Tunnel(t) = &mut self.mode {
            let counts = t.take_counts();
            if counts != Counts::default() {
                self.worker.metrics.add_counts(&counts);
            }
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
                if self.forward(&query, None, 0) {
                    self.mode = Mode::Doh(Some(query));
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

impl Context for DnsStream {
    fn on_http_call_response(
        &mut self,
        token: u32,
        headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some(slot) = self.callouts.remove(&token) else {
            return;
        };
        let reply = callout::response(headers, body_size);
        let body = (reply.status == Some(200)).then_some(reply.body);
        match &mut self.mode {
            Mode::Tunnel(tunnel) => {
                tunnel.complete(slot, body.as_deref());
                if !tunnel.is_waiting() {
                    self.release(self.parsed);
                    let _ = hostcalls::resume_http_request();
                }
                self.flush_counts();
            }
            Mode::Doh(Some(query)) => {
                let answer = match &body {
                    Some(b) => forwarded_answer(query, b, Transport::Https),
                    None => {
                        self.worker.metrics.add(Counter::ForwardFailed, 1);
                        servfail(query, Transport::Https)
                    }
                };
                send_dns_message(&answer.unwrap_or_default());
            }
            Mode::Doh(None) | Mode::Pass | Mode::Reject(..) => {}
        }
    }
}

impl HttpContext for DnsStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let header = |name| {
            hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
                .ok()
                .flatten()
        };
        let path = header(":path").unwrap_or_default();
        let route = path.split('?').next().unwrap_or_default();
        let tcp_framing = header("x-dns-framing").as_deref() == Some("tcp");
        match route {
            "/udp-tunnel" if !tcp_framing => {
                self.mode = Mode::Tunnel(Tunnel::new(Framing::Capsule));
                Action::Continue
            }
            "/tcp-tunnel" | "/udp-tunnel" => {
                self.mode = Mode::Tunnel(Tunnel::new(Framing::Tcp));
                Action::Continue
            }
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
                            self.mode = Mode::Doh(None);
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
            Mode::Tunnel(_) => self.tunnel_body(body_size),
            Mode::Doh(Some(_)) => Action::Pause,
            Mode::Doh(None) => {
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

fn send_dns_message(message: &[u8]) {
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
