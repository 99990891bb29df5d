//! How queries move through Envoy (udp_proxy's tunnel to the network filter, the TCP listener),
//! checked with raw sockets against the real Envoy, shim and filter: what dig cannot show.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use std::net::Ipv4Addr;

use vmesh_core::dns::inspect::{RData, Response};
use vmesh_core::dns::{build_query, rtype};
use vmesh_test_support::eventually::eventually;
use vmesh_test_support::repo_root;
use vmesh_tests::support::envoy::Envoy;
use vmesh_tests::support::sidecar::{Sidecar, SidecarOptions};
use vmesh_tests::support::slow_upstream::SlowUpstream;

const MESH: &str = "vmservice.example.com";
const SLOW: &str = "slow.example.org";

/// A sidecar whose only upstream is a UDP socket that never answers, so every forward stays in
/// flight for the shim's whole budget. Returns the socket too: it must outlive the test.
fn sidecar_with_silent_upstream() -> (Sidecar, UdpSocket) {
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind the silent upstream");
    let s = Sidecar::start_with(SidecarOptions {
        upstreams: Some(vec![silent.local_addr().expect("addr").to_string()]),
        forward_timeout: Some("3s".into()),
        ..Default::default()
    });
    s.wait_for_table();
    (s, silent)
}

fn query(id: u16, name: &str) -> Vec<u8> {
    build_query(id, name, rtype::A, None).expect("valid test name")
}

fn recv_udp(sock: &UdpSocket) -> Response {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("an answer before the socket timeout");
    Response::parse(&buf[..n]).expect("a well-formed answer")
}

/// udp_proxy's session idle timeout in vm-sidecar.yaml, so the tests below keep meaning what
/// they say if it changes.
fn udp_idle_timeout() -> Duration {
    let config = std::fs::read_to_string(repo_root().join("envoy-configs/vm-sidecar.yaml"))
        .expect("read vm-sidecar.yaml");
    let value = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("idle_timeout: "))
        .expect("udp_proxy's idle_timeout in vm-sidecar.yaml");
    let secs: f64 = value
        .trim()
        .strip_suffix('s')
        .and_then(|v| v.parse().ok())
        .expect("idle_timeout in seconds");
    Duration::from_secs_f64(secs)
}

/// Live udp_proxy sessions (one internal tunnel connection each).
fn udp_sessions(envoy: &Envoy) -> u64 {
    envoy.stat("udp.dns_udp.downstream_sess_active")
}

fn no_udp_sessions_left(envoy: &Envoy) {
    eventually("every UDP session has ended", || {
        match udp_sessions(envoy) {
            0 => Ok(()),
            n => Err(format!("{n} sessions")),
        }
    });
}

fn recv_tcp(conn: &mut TcpStream) -> Response {
    let mut len = [0u8; 2];
    conn.read_exact(&mut len).expect("an answer length");
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut msg).expect("the answer");
    Response::parse(&msg).expect("a well-formed answer")
}

#[test]
fn a_forward_in_flight_does_not_hold_later_answers_on_the_same_udp_socket() {
    let (s, _silent) = sidecar_with_silent_upstream();
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    sock.connect(("127.0.0.1", s.envoy.dns)).expect("connect");
    let sent = Instant::now();
    sock.send(&query(1, SLOW)).expect("send");
    sock.send(&query(2, MESH)).expect("send");
    let first = recv_udp(&sock);
    assert_eq!(first.header.id, 2, "the mesh answer comes first");
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "the mesh answer waited {:?} for the forward",
        sent.elapsed()
    );
    let second = recv_udp(&sock);
    assert_eq!((second.header.id, second.rcode()), (1, 2), "SERVFAIL");
}

#[test]
fn rfc7766_7_pipelined_tcp_answers_leave_as_they_are_ready() {
    let (s, _silent) = sidecar_with_silent_upstream();
    let mut conn = TcpStream::connect(("127.0.0.1", s.envoy.dns)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut bytes = Vec::new();
    for (id, name) in [(1, SLOW), (2, MESH), (3, MESH)] {
        let q = query(id, name);
        bytes.extend_from_slice(&u16::try_from(q.len()).expect("short").to_be_bytes());
        bytes.extend_from_slice(&q);
    }
    let sent = Instant::now();
    conn.write_all(&bytes).expect("send");
    let ids: Vec<u16> = (0..2).map(|_| recv_tcp(&mut conn).header.id).collect();
    assert_eq!(ids, [2, 3]);
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
    let last = recv_tcp(&mut conn);
    assert_eq!((last.header.id, last.rcode()), (1, 2), "SERVFAIL");
    // The connection goes on after the forward.
    conn.write_all(&bytes[bytes.len() - (2 + query(3, MESH).len())..])
        .expect("send again");
    assert_eq!(recv_tcp(&mut conn).header.id, 3);
}

#[test]
fn more_udp_clients_than_envoys_default_connection_limit_are_all_answered() {
    let s = Sidecar::start();
    // Envoy's default circuit breaker allows 1,024 connections per cluster; every UDP client
    // address is one tunnel connection, so the sidecar raises it.
    let clients: Vec<UdpSocket> = (0..1500)
        .map(|_| {
            let c = UdpSocket::bind("127.0.0.1:0").expect("bind");
            c.connect(("127.0.0.1", s.envoy.dns)).expect("connect");
            c.set_nonblocking(true).expect("nonblocking");
            c
        })
        .collect();
    let mut unanswered: Vec<usize> = (0..clients.len()).collect();
    // Resent until answered: the kernel may drop a datagram when Envoy's socket buffer is full,
    // which is UDP, not the limit under test.
    eventually("every client address gets its answer", || {
        for (n, &i) in unanswered.iter().enumerate() {
            let id = u16::try_from(i).expect("fits");
            clients[i]
                .send(&query(id, MESH))
                .map_err(|e| e.to_string())?;
            if n % 100 == 99 {
                // Paced, so the burst fits in Envoy's socket buffer.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let mut buf = [0u8; 512];
        unanswered.retain(|&i| match clients[i].recv(&mut buf) {
            Ok(n) => Response::parse(&buf[..n]).map(|r| r.header.id) != Ok(i as u16),
            Err(_) => true,
        });
        if unanswered.is_empty() {
            Ok(())
        } else {
            Err(format!("{} clients unanswered", unanswered.len()))
        }
    });
    assert!(
        s.envoy
            .stat("cluster.vmesh_dns_udp_tunnel.upstream_cx_total")
            >= 1500
    );
    assert_eq!(
        s.envoy
            .stat("cluster.vmesh_dns_udp_tunnel.upstream_cx_overflow"),
        0
    );
}

#[test]
fn a_forward_slower_than_the_udp_idle_timeout_reaches_the_client_waiting_for_it() {
    let delay = Duration::from_secs(3);
    assert!(
        delay > 2 * udp_idle_timeout(),
        "the upstream must be slower than the idle timeout for this test to mean anything"
    );
    let answer_ip = Ipv4Addr::new(198, 51, 100, 7);
    let slow = SlowUpstream::start(delay, answer_ip);
    let s = Sidecar::start_with(SidecarOptions {
        upstreams: Some(vec![slow.addr()]),
        ..Default::default()
    });
    s.wait_for_table();
    // The table probes' sessions end first, so the counters below are this client's alone.
    no_udp_sessions_left(&s.envoy);
    let expired = s.envoy.stat("udp.dns_udp.idle_timeout");

    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    sock.connect(("127.0.0.1", s.envoy.dns)).expect("connect");
    let sent = Instant::now();
    sock.send(&query(0x5107, SLOW)).expect("send");
    let answer = recv_udp(&sock);
    assert!(sent.elapsed() >= delay, "answered before the upstream did");
    assert_eq!((answer.header.id, answer.rcode()), (0x5107, 0));
    let ips: Vec<_> = answer
        .answers
        .iter()
        .filter_map(|rr| match rr.data {
            RData::A(ip) => Some(ip),
            _ => None,
        })
        .collect();
    assert_eq!(ips, [answer_ip]);
    assert_eq!(
        s.envoy.stat("udp.dns_udp.idle_timeout"),
        expired,
        "the filter's keepalives kept the session from idling out"
    );
    assert_eq!(
        s.envoy.stat("udp.dns_udp.downstream_sess_total"),
        s.envoy.stat("udp.dns_udp.idle_timeout") + 1,
        "one session carried the query and its answer"
    );
    // Once answered, the session is waste for a fresh-port client: it ends.
    no_udp_sessions_left(&s.envoy);
    assert_eq!(s.envoy.stat("udp.dns_udp.idle_timeout"), expired + 1);
}

#[test]
fn a_client_keeping_its_socket_keeps_one_session_and_idle_sessions_end() {
    let s = Sidecar::start();
    no_udp_sessions_left(&s.envoy);
    let total = s.envoy.stat("udp.dns_udp.downstream_sess_total");

    let keeper = UdpSocket::bind("127.0.0.1:0").expect("bind");
    keeper
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    keeper.connect(("127.0.0.1", s.envoy.dns)).expect("connect");
    for id in 0..50 {
        keeper.send(&query(id, MESH)).expect("send");
        assert_eq!(recv_udp(&keeper).header.id, id);
    }
    assert_eq!(
        s.envoy.stat("udp.dns_udp.downstream_sess_total"),
        total + 1,
        "50 queries from one socket, one session"
    );

    // Fresh ports, as glibc asks: a session each, and none outlives the idle timeout.
    for id in 0..20 {
        let fresh = UdpSocket::bind("127.0.0.1:0").expect("bind");
        fresh
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        fresh.connect(("127.0.0.1", s.envoy.dns)).expect("connect");
        fresh.send(&query(id, MESH)).expect("send");
        assert_eq!(recv_udp(&fresh).header.id, id);
    }
    assert_eq!(
        s.envoy.stat("udp.dns_udp.downstream_sess_total"),
        total + 21
    );
    no_udp_sessions_left(&s.envoy);
}
