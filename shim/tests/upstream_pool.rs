//! The upstream socket pool (`pool.rs`) through the forwarder: spoofed answers are ignored,
//! sockets are shared and rotated, answers are matched by ID, question and source.

mod support;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::net::UdpSocket;
use vmesh_core::dns::inspect::Response;
use vmesh_core::dns::response::{set_id, Owner};
use vmesh_core::dns::{Query, Rcode, ResponseBuilder};
use vmesh_shim::forwarder::{Forwarder, Mode};
use vmesh_shim::pool::{MAX_USES, POOL_SIZE};

fn marker(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, n)
}

/// An answer to `query` (its ID and question) with one A record.
fn answer(query: &[u8], ip: Ipv4Addr) -> Vec<u8> {
    let q = Query::parse(query).expect("a query");
    let mut b = ResponseBuilder::new(&q, Rcode::NoError, false, 4096);
    b.address(Owner::Question, ip.into(), 60);
    b.finish().0
}

#[tokio::test]
async fn spoofed_answers_with_the_wrong_source_id_or_question_are_ignored_and_the_right_one_taken()
{
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let spoofer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    let fwd = Arc::new(Forwarder::new(vec![addr], Duration::from_secs(3)));
    let q = query(0xC1D0, "victim.example", A, None);
    let asking = {
        let fwd = Arc::clone(&fwd);
        let q = q.clone();
        tokio::spawn(async move { fwd.forward(&q, Mode::Udp).await })
    };
    let mut buf = vec![0u8; 4096];
    let (n, shim_port) = upstream.recv_from(&mut buf).await.unwrap();
    let sent = buf[..n].to_vec();
    assert_eq!(sent[2..], q[2..], "only the ID differs");
    // 1. The right ID and question, from another address: the connected socket never sees it.
    spoofer
        .send_to(&answer(&sent, marker(66)), shim_port)
        .await
        .unwrap();
    // 2. From the upstream, the right question under another ID.
    let mut other_id = answer(&sent, marker(67));
    let id = u16::from_be_bytes([sent[0], sent[1]]);
    set_id(&mut other_id, id.wrapping_add(1));
    upstream.send_to(&other_id, shim_port).await.unwrap();
    // 3. From the upstream, the right ID with another question.
    let mut other_q = query(0, "attacker.example", A, None);
    set_id(&mut other_q, id);
    upstream
        .send_to(&answer(&other_q, marker(68)), shim_port)
        .await
        .unwrap();
    // 4. The real answer.
    tokio::time::sleep(Duration::from_millis(50)).await;
    upstream
        .send_to(&answer(&sent, marker(1)), shim_port)
        .await
        .unwrap();

    let got = within_patience("the answer", asking)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first_a(&got.message), Some(marker(1)));
    assert_eq!(u16::from_be_bytes([got.message[0], got.message[1]]), 0xC1D0);
    let ignored = &fwd.pool().ignored;
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(ignored.unknown_id.load(Relaxed), 1, "the other ID");
    assert_eq!(
        ignored.wrong_question.load(Relaxed),
        1,
        "the other question"
    );
}

/// Answers every query on `socket` after `delay`; records the source ports seen.
async fn echo_upstream(socket: UdpSocket, delay: Duration, ports: Arc<std::sync::Mutex<Vec<u16>>>) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            return;
        };
        ports.lock().unwrap().push(from.port());
        let reply = answer(&buf[..n], marker(9));
        let socket = Arc::clone(&socket);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = socket.send_to(&reply, from).await;
        });
    }
}

#[tokio::test]
async fn concurrent_queries_share_the_pool() {
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = upstream.local_addr().unwrap();
    let ports = Arc::new(std::sync::Mutex::new(Vec::new()));
    tokio::spawn(echo_upstream(
        upstream,
        Duration::from_millis(200),
        Arc::clone(&ports),
    ));
    let fwd = Arc::new(Forwarder::new(vec![addr], Duration::from_secs(5)));
    // 200 at once (more would overflow the test upstream's receive buffer), all waiting on
    // the slow upstream together.
    let mut tasks = Vec::new();
    for i in 0..200u16 {
        let fwd = Arc::clone(&fwd);
        tasks.push(tokio::spawn(async move {
            let q = query(i, &format!("n{i}.example"), A, None);
            let a = fwd.forward(&q, Mode::Udp).await.unwrap();
            (i, a.message)
        }));
    }
    for t in tasks {
        let (i, message) = within_patience("an answer", t).await.unwrap();
        let r = Response::parse(&message).unwrap();
        assert_eq!((r.header.id, r.rcode()), (i, 0));
        assert_eq!(first_a(&message), Some(marker(9)));
    }
    let distinct: HashSet<u16> = ports.lock().unwrap().iter().copied().collect();
    // A socket per query would be 200 ports; a pool uses at most its size.
    assert!(
        distinct.len() <= POOL_SIZE,
        "{} source ports for 200 queries",
        distinct.len()
    );
    assert!(distinct.len() > 1, "queries spread over several sockets");
}

#[tokio::test]
async fn worn_out_sockets_are_replaced_by_fresh_ones() {
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = upstream.local_addr().unwrap();
    let ports = Arc::new(std::sync::Mutex::new(Vec::new()));
    tokio::spawn(echo_upstream(upstream, Duration::ZERO, Arc::clone(&ports)));
    let fwd = Arc::new(Forwarder::new(vec![addr], Duration::from_secs(5)));
    let q = query(1, "first.example", A, None);
    fwd.forward(&q, Mode::Udp).await.unwrap();
    let first: HashSet<SocketAddr> = fwd.pool().local_addrs(addr).into_iter().collect();
    // Enough queries that every socket of the pool wore out at least once.
    let total = POOL_SIZE * MAX_USES as usize * 2;
    for batch in 0..total / 64 {
        let mut tasks = Vec::new();
        for i in 0..64u16 {
            let fwd = Arc::clone(&fwd);
            tasks.push(tokio::spawn(async move {
                let q = query(i, &format!("b{batch}.example"), A, None);
                fwd.forward(&q, Mode::Udp).await.unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    let now: HashSet<SocketAddr> = fwd.pool().local_addrs(addr).into_iter().collect();
    assert_eq!(now.len(), POOL_SIZE);
    assert!(
        now.is_disjoint(&first),
        "every socket was replaced: {first:?} -> {now:?}"
    );
}
