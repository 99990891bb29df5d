//! Test support: an in-test authoritative DNS server on real sockets, an HTTP client for
//! HTTP/1.1 and h2c, the shim started in-process. Waiting, temp dirs, child processes, dig and
//! network namespaces for tests that change the firewall (`netns`) are `vmesh-test-support`'s,
//! re-exported here for the tests' `use support::*`.
// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code, unused_imports)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use vmesh_core::dns::response::{set_id, Owner};
use vmesh_core::dns::{Query, Rcode, ResponseBuilder};
use vmesh_shim::config::RunArgs;
use vmesh_shim::Running;
pub use vmesh_test_support::eventually::{assert_eventually_async, patience, within_patience};
pub use vmesh_test_support::{dig, eventually, free_port, netns, process, TempDir};

/// A query as dig sends it: RD set, one question, optional OPT with a UDP payload size.
pub fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
    let edns = edns.map(|udp_payload| vmesh_core::dns::Edns {
        udp_payload,
        version: 0,
        dnssec_ok: false,
    });
    vmesh_core::dns::build_query(id, name, qtype, edns).unwrap()
}

pub const A: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

/// What the test DNS server does with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// One A record with the server's marker address, TTL 3600, AD bit set.
    Answer,
    /// Over UDP: 100 records cut to 512 bytes with TC set. Over TCP: all 100.
    TruncateUdp,
    /// Like `TruncateUdp`, but TCP connections are closed without an answer.
    TruncateUdpTcpBroken,
    /// 190 A records, about 3 KB, over either transport.
    Large,
    /// Never answers (TCP connections are accepted and left hanging).
    Silent,
    /// Over UDP: first a bogus reply (its A record is [`BOGUS`]), then the right answer.
    BogusFirst(Bogus),
    /// A header-only-answer with this RCODE (e.g. NXDOMAIN, SERVFAIL).
    Rcode(Rcode),
}

/// The kinds of reply a forwarder must not take for an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bogus {
    /// Right question, another ID.
    OtherId,
    /// Right ID, the question of another name.
    OtherQuestion,
    /// Right ID, another query type.
    OtherType,
    /// Right ID, QR not set.
    NotAResponse,
    /// Right ID, then nothing that parses.
    Garbage,
}

/// The address in bogus replies.
pub const BOGUS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);

#[derive(Debug, Clone)]
pub struct Seen {
    pub proto: Proto,
    pub bytes: Vec<u8>,
}

/// An authoritative DNS server on 127.0.0.1, UDP and TCP on the same port.
pub struct DnsServer {
    pub addr: SocketAddr,
    pub marker: Ipv4Addr,
    behaviour: Behaviour,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl DnsServer {
    pub async fn start(behaviour: Behaviour, marker: Ipv4Addr) -> Self {
        Self::start_on("127.0.0.1".parse().unwrap(), behaviour, marker).await
    }

    pub async fn start_on(ip: std::net::IpAddr, behaviour: Behaviour, marker: Ipv4Addr) -> Self {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind(SocketAddr::new(ip, 0)).await.unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                break (udp, tcp);
            }
        };
        Self::serve(udp, tcp, behaviour, marker)
    }

    /// On a fixed address (port 53 for resolv.conf); `None` when it cannot be bound (not
    /// root, or taken).
    pub async fn start_at(
        addr: SocketAddr,
        behaviour: Behaviour,
        marker: Ipv4Addr,
    ) -> Option<Self> {
        let udp = UdpSocket::bind(addr).await.ok()?;
        let tcp = TcpListener::bind(addr).await.ok()?;
        Some(Self::serve(udp, tcp, behaviour, marker))
    }

    fn serve(udp: UdpSocket, tcp: TcpListener, behaviour: Behaviour, marker: Ipv4Addr) -> Self {
        let addr = udp.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let server = DnsServer {
            addr,
            marker,
            behaviour,
            seen: seen.clone(),
        };
        let udp = Arc::new(udp);
        let answers = Answerer { behaviour, marker };
        {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65535];
                loop {
                    let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                        return;
                    };
                    let q = buf[..n].to_vec();
                    seen.lock().unwrap().push(Seen {
                        proto: Proto::Udp,
                        bytes: q.clone(),
                    });
                    for reply in answers.udp_replies(&q) {
                        let _ = udp.send_to(&reply, peer).await;
                    }
                }
            });
        }
        tokio::spawn(async move {
            let mut hanging = Vec::new();
            loop {
                let Ok((mut stream, _)) = tcp.accept().await else {
                    return;
                };
                match behaviour {
                    Behaviour::Silent => {
                        hanging.push(stream);
                        continue;
                    }
                    Behaviour::TruncateUdpTcpBroken => continue,
                    _ => {}
                }
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut len = [0u8; 2];
                    if stream.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if stream.read_exact(&mut q).await.is_err() {
                        return;
                    }
                    seen.lock().unwrap().push(Seen {
                        proto: Proto::Tcp,
                        bytes: q.clone(),
                    });
                    let reply = answers.answer(&q, Proto::Tcp);
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&reply);
                    let _ = stream.write_all(&framed).await;
                });
            }
        });
        server
    }

    /// The answer this server gives to `query` over `proto` (byte-for-byte, same ID).
    pub fn answer_for(&self, query: &[u8], proto: Proto) -> Vec<u8> {
        Answerer {
            behaviour: self.behaviour,
            marker: self.marker,
        }
        .answer(query, proto)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn protocols_seen(&self) -> Vec<Proto> {
        self.seen().iter().map(|s| s.proto).collect()
    }
}

#[derive(Clone, Copy)]
struct Answerer {
    behaviour: Behaviour,
    marker: Ipv4Addr,
}

impl Answerer {
    fn answer(&self, q: &[u8], proto: Proto) -> Vec<u8> {
        let query = Query::parse(q).unwrap();
        let build = |count: usize, limit: usize, rcode: Rcode| {
            let mut b = ResponseBuilder::new(&query, rcode, true, limit);
            for i in 0..count {
                let [a, b2, c, _] = self.marker.octets();
                b.address(
                    Owner::Question,
                    Ipv4Addr::new(a, b2, c, i as u8).into(),
                    3600,
                );
            }
            let mut m = b.finish().0;
            // AD: a flag the shim has no reason to touch; it must come back as sent.
            m[3] |= 0x20;
            m
        };
        match self.behaviour {
            Behaviour::Answer | Behaviour::BogusFirst(_) | Behaviour::Silent => {
                let mut b = ResponseBuilder::new(&query, Rcode::NoError, true, 65535);
                b.address(Owner::Question, self.marker.into(), 3600);
                let mut m = b.finish().0;
                m[3] |= 0x20;
                m
            }
            Behaviour::TruncateUdp | Behaviour::TruncateUdpTcpBroken if proto == Proto::Udp => {
                build(100, 512, Rcode::NoError)
            }
            Behaviour::TruncateUdpTcpBroken => Vec::new(),
            Behaviour::TruncateUdp => build(100, 65535, Rcode::NoError),
            Behaviour::Large => build(190, 65535, Rcode::NoError),
            Behaviour::Rcode(rcode) => build(0, 65535, rcode),
        }
    }

    fn udp_replies(&self, q: &[u8]) -> Vec<Vec<u8>> {
        match self.behaviour {
            Behaviour::Silent => vec![],
            Behaviour::BogusFirst(kind) => {
                let right = self.answer(q, Proto::Udp);
                let liar = Answerer {
                    behaviour: Behaviour::Answer,
                    marker: BOGUS,
                };
                let id = u16::from_be_bytes([q[0], q[1]]);
                let bogus = match kind {
                    Bogus::OtherId => {
                        let mut m = liar.answer(q, Proto::Udp);
                        set_id(&mut m, id.wrapping_add(1));
                        m
                    }
                    Bogus::OtherQuestion => {
                        liar.answer(&query(id, "other.example", A, None), Proto::Udp)
                    }
                    Bogus::OtherType => {
                        liar.answer(&query(id, "spoof.example", 28, None), Proto::Udp)
                    }
                    Bogus::NotAResponse => {
                        let mut m = liar.answer(q, Proto::Udp);
                        m[2] &= 0x7F;
                        m
                    }
                    Bogus::Garbage => vec![q[0], q[1], 0x81, 0x80, 0, 1],
                };
                vec![bogus, right]
            }
            _ => vec![self.answer(q, Proto::Udp)],
        }
    }
}

/// A UDP and TCP port on 127.0.0.1 where nothing listens: queries to it are refused.
pub async fn dead_port() -> SocketAddr {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.local_addr().unwrap()
}

/// Starts the shim in-process on 127.0.0.1:0 with these extra flags.
pub async fn start_shim(args: &[&str]) -> Running {
    let mut argv = vec!["vmesh-shim", "--listen", "127.0.0.1:0"];
    argv.extend_from_slice(args);
    let mut settings = RunArgs::try_parse_from(argv).unwrap().validate().unwrap();
    settings.names = settings
        .names
        .map(|n| n.with_poll_interval(Duration::from_millis(50)));
    vmesh_shim::start(settings).await.unwrap()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// HTTP/1.1 or h2c-with-prior-knowledge client for one shim.
#[derive(Clone)]
pub struct Http {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    pub fn h1(addr: SocketAddr) -> Self {
        Http {
            base: format!("http://{addr}"),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn h2c(addr: SocketAddr) -> Self {
        Http {
            base: format!("http://{addr}"),
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .client
            .request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, &[], Vec::new()).await
    }

    /// POST /dns-query, with `x-vmesh-transport` when `transport` is given.
    pub async fn dns(&self, query: &[u8], transport: Option<&str>) -> Reply {
        let mut headers = vec![("content-type", "application/dns-message")];
        if let Some(t) = transport {
            headers.push(("x-vmesh-transport", t));
        }
        self.send(Method::POST, "/dns-query", &headers, query.to_vec())
            .await
    }
}

/// The first A address in a DNS answer.
pub fn first_a(message: &[u8]) -> Option<Ipv4Addr> {
    vmesh_core::dns::inspect::Response::parse(message)
        .ok()?
        .answers
        .iter()
        .find_map(|rr| match rr.data {
            vmesh_core::dns::inspect::RData::A(ip) => Some(ip),
            _ => None,
        })
}
