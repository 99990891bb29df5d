//! The forwarding stream (filter -> shim, one gRPC stream per Envoy worker) through the real
//! Envoy, filter and shim: the shim dying and coming back with queries in flight, and
//! thousands of queries in flight on one stream.

use std::collections::HashMap;
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmesh_core::dns::inspect::Response;
use vmesh_core::dns::{build_query, rtype};
use vmesh_tests::support::envoy::{Envoy, Ports};
use vmesh_tests::support::shim::{Shim, ShimOptions};
use vmesh_tests::support::slow_upstream::SlowUpstream;

/// The filter's `forward_timeout_ms` default: a query's deadline.
const DEADLINE: Duration = Duration::from_millis(6000);
/// The worker tick that expires deadlines (`table_check_ms`), plus scheduling slack.
const SLACK: Duration = Duration::from_millis(750);

fn query(id: u16, name: &str) -> Vec<u8> {
    build_query(id, name, rtype::A, None).expect("valid test name")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn client(envoy: &Envoy, timeout: Duration) -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(timeout)).expect("timeout");
    sock.connect(("127.0.0.1", envoy.dns)).expect("connect");
    sock
}

/// Reads answers on `sock` until `until`, as (id, rcode, when).
fn collect(sock: &UdpSocket, until: Instant) -> Vec<(u16, u16, Instant)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        match sock.recv(&mut buf) {
            Ok(n) => {
                let r = Response::parse(&buf[..n]).expect("a well-formed answer");
                out.push((r.header.id, r.rcode(), Instant::now()));
            }
            Err(_) => break,
        }
    }
    out
}

#[test]
fn queries_in_flight_when_the_shim_dies_are_answered_or_servfail_within_their_deadline_and_new_ones_flow_after_its_return(
) {
    let dir = vmesh_test_support::TempDir::new();
    // Names with the label "slow" wait 2 s upstream; others are answered at once.
    let upstream = SlowUpstream::selective(
        Duration::from_secs(2),
        Ipv4Addr::new(198, 51, 100, 9),
        b"\x04slow",
    );
    let shim_port = Shim::reserve_port();
    let opts = ShimOptions {
        upstreams: vec![upstream.addr()],
        ..ShimOptions::default()
    };
    let mut envoy = Envoy::start(dir.path(), shim_port);
    let mut shim = Shim::start(dir.path(), shim_port, &opts);
    let fast = client(&envoy, Duration::from_secs(5));
    vmesh_test_support::eventually::eventually("a forwarded name resolves", || {
        fast.send(&query(1, "fast.example.org"))
            .map_err(|e| e.to_string())?;
        let got = collect(&fast, Instant::now() + Duration::from_secs(1));
        match got.first() {
            Some((1, 0, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // 20 slow queries in flight, then the shim is killed and started again.
    let sock = client(&envoy, Duration::from_secs(10));
    let sent = Instant::now();
    for id in 0..20u16 {
        sock.send(&query(100 + id, &format!("slow{id}.example.org")))
            .expect("send");
    }
    std::thread::sleep(Duration::from_millis(300));
    shim.process().signal("KILL");
    std::thread::sleep(Duration::from_millis(500));
    let mut shim = Shim::start(dir.path(), shim_port, &opts);
    let back = Instant::now();

    // New queries flow within 1 s of the shim's return.
    let probe = client(&envoy, Duration::from_secs(2));
    let mut first_answer = None;
    for id in 0..40u16 {
        probe
            .send(&query(1000 + id, "fast.example.org"))
            .expect("send");
        let got = collect(&probe, Instant::now() + Duration::from_millis(50));
        if got.iter().any(|(_, rcode, _)| *rcode == 0) {
            first_answer = Some(back.elapsed());
            break;
        }
    }
    let Some(first_answer) = first_answer else {
        panic!(
            "no new query answered after the shim came back\nenvoy:\n{}\nshim:\n{}",
            tail(&envoy.log(), 60),
            tail(&shim.log(), 30)
        );
    };
    assert!(
        first_answer < Duration::from_secs(1),
        "new queries flowed {first_answer:?} after the shim's return"
    );

    // Every query in flight is answered (re-sent to the new shim) or SERVFAIL, once each,
    // within its deadline.
    let answers = collect(&sock, sent + DEADLINE + SLACK + Duration::from_secs(1));
    let mut by_id: HashMap<u16, Vec<(u16, Instant)>> = HashMap::new();
    for (id, rcode, at) in answers {
        by_id.entry(id).or_default().push((rcode, at));
    }
    for id in 100..120u16 {
        let got = by_id.get(&id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(got.len(), 1, "query {id}: {got:?}");
        let (rcode, at) = got[0];
        assert!(rcode == 0 || rcode == 2, "query {id}: rcode {rcode}");
        assert!(
            at.duration_since(sent) <= DEADLINE + SLACK,
            "query {id} answered after {:?}",
            at.duration_since(sent)
        );
    }
    assert!(envoy.is_running(), "Envoy never restarts");
    assert!(
        !envoy.log().contains("panicked"),
        "the VM did not panic:\n{}",
        envoy.log()
    );
    shim.stop();
}

#[test]
fn ten_thousand_queries_in_flight_on_one_stream_are_all_answered_once() {
    let dir = vmesh_test_support::TempDir::new();
    let upstream = SlowUpstream::start(Duration::from_secs(3), Ipv4Addr::new(198, 51, 100, 10));
    let shim_port = Shim::reserve_port();
    // One worker: one VM, one stream.
    let envoy = Envoy::start_on(dir.path(), shim_port, Ports::free(), 1);
    let _shim = Shim::start(
        dir.path(),
        shim_port,
        &ShimOptions {
            upstreams: vec![upstream.addr()],
            ..ShimOptions::default()
        },
    );
    const CLIENTS: u16 = 10;
    const EACH: u16 = 1000;
    // A reader per client socket, so answers never wait in a full receive buffer.
    let (tx, rx) = mpsc::channel();
    let mut senders = Vec::new();
    let started = Instant::now();
    for c in 0..CLIENTS {
        let sock = client(&envoy, Duration::from_secs(1));
        let reader = sock.try_clone().expect("clone");
        let tx = tx.clone();
        std::thread::spawn(move || {
            let got = collect(&reader, started + Duration::from_secs(15));
            let _ = tx.send((c, got));
        });
        senders.push(sock);
    }
    drop(tx);
    // Paced a little, so Envoy's listener socket does not overflow: ~10,000 in about 1 s,
    // all in flight at once behind the 3 s upstream.
    for i in 0..EACH {
        for sock in &senders {
            sock.send(&query(i, &format!("n{i}.example.org")))
                .expect("send");
        }
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let sent_in = started.elapsed();
    assert!(sent_in < Duration::from_secs(3), "sending took {sent_in:?}");
    let mut total = 0;
    let results: Vec<_> = rx.into_iter().collect();
    let counts: Vec<(u16, usize, usize)> = results
        .iter()
        .map(|(c, g)| {
            (
                *c,
                g.len(),
                g.iter().filter(|(_, rcode, _)| *rcode != 0).count(),
            )
        })
        .collect();
    eprintln!("(client, answers, not NOERROR): {counts:?}");
    if counts
        .iter()
        .any(|(_, n, bad)| *n != usize::from(EACH) || *bad > 0)
    {
        eprintln!("envoy log tail:\n{}", tail(&envoy.log(), 60));
        eprintln!("shim log tail:\n{}", tail(&_shim.log(), 30));
    }
    for (c, got) in results {
        let mut seen = vec![0u32; usize::from(EACH)];
        for (id, rcode, _) in got {
            assert_eq!(rcode, 0, "client {c} query {id}");
            seen[usize::from(id)] += 1;
        }
        let missing: Vec<usize> = (0..seen.len()).filter(|&i| seen[i] == 0).collect();
        let twice: Vec<usize> = (0..seen.len()).filter(|&i| seen[i] > 1).collect();
        assert!(
            missing.is_empty() && twice.is_empty(),
            "client {c}: {} unanswered (first {:?}), {} answered twice",
            missing.len(),
            missing.first(),
            twice.len()
        );
        total += seen.len();
    }
    assert_eq!(total, usize::from(CLIENTS * EACH));
}
