//! `/dns-query`: relaying to real upstream sockets, named by the behaviour checked.

mod support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use base64::Engine;
use hyper::{Method, StatusCode};
use support::*;
use vmesh_core::dns::inspect::Response;
use vmesh_core::dns::Rcode;

const CLIENT_ID: u16 = 0xC1D0;

fn marker(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, n)
}

#[tokio::test]
async fn udp_answer_is_relayed_byte_for_byte_except_the_id() {
    let dns = DnsServer::start(Behaviour::Answer, marker(1)).await;
    let shim = start_shim(&["--upstream", &dns.addr.to_string()]).await;
    let q = query(CLIENT_ID, "www.Example.com", A, Some(1232));

    let reply = Http::h1(shim.local_addr()).dns(&q, Some("udp")).await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("content-type"),
        Some("application/dns-message")
    );
    assert_eq!(reply.body, dns.answer_for(&q, Proto::Udp));
    let seen = dns.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].proto, Proto::Udp);
    assert_eq!(
        seen[0].bytes[2..],
        q[2..],
        "the query goes upstream unchanged but for its ID"
    );
    shim.stop().await;
}

#[tokio::test]
async fn ipv6_upstream_is_asked_over_udp_and_tcp() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback on this machine");
        return;
    }
    let dns = DnsServer::start_on("::1".parse().unwrap(), Behaviour::TruncateUdp, marker(6)).await;
    let shim = start_shim(&["--upstream", &dns.addr.to_string()]).await;
    let http = Http::h1(shim.local_addr());
    let q = query(CLIENT_ID, "v6.example", A, None);

    assert_eq!(
        http.dns(&q, Some("udp")).await.body,
        dns.answer_for(&q, Proto::Udp)
    );
    // Truncated over UDP, so the TCP client's query is asked again over TCP.
    assert_eq!(
        http.dns(&q, Some("tcp")).await.body,
        dns.answer_for(&q, Proto::Tcp)
    );
    assert_eq!(
        dns.protocols_seen(),
        vec![Proto::Udp, Proto::Udp, Proto::Tcp]
    );
    shim.stop().await;
}

#[tokio::test]
async fn upstream_ids_are_random_not_the_clients() {
    let dns = DnsServer::start(Behaviour::Answer, marker(1)).await;
    let shim = start_shim(&["--upstream", &dns.addr.to_string()]).await;
    let http = Http::h1(shim.local_addr());
    for _ in 0..8 {
        let reply = http
            .dns(&query(CLIENT_ID, "a.example", A, None), Some("udp"))
            .await;
        assert_eq!(reply.body[..2], CLIENT_ID.to_be_bytes());
    }
    let ids: std::collections::HashSet<[u8; 2]> = dns
        .seen()
        .iter()
        .map(|s| [s.bytes[0], s.bytes[1]])
        .collect();
    // Eight fixed-ID queries giving at most two distinct upstream IDs would mean no randomness.
    assert!(ids.len() > 2, "upstream saw IDs {ids:?}");
    shim.stop().await;
}

#[tokio::test]
async fn get_with_base64url_query_is_relayed() {
    let dns = DnsServer::start(Behaviour::Answer, marker(1)).await;
    let shim = start_shim(&["--upstream", &dns.addr.to_string()]).await;
    let q = query(0, "get.example", A, None);
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&q);

    let reply = Http::h1(shim.local_addr())
        .get(&format!("/dns-query?dns={encoded}"))
        .await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, dns.answer_for(&q, Proto::Udp));
    shim.stop().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served_on_the_same_port() {
    let dns = DnsServer::start(Behaviour::Answer, marker(1)).await;
    let shim = start_shim(&["--upstream", &dns.addr.to_string()]).await;
    let q = query(CLIENT_ID, "h2.example", A, None);

    let reply = Http::h2c(shim.local_addr()).dns(&q, Some("tcp")).await;
    let health = Http::h2c(shim.local_addr()).get("/healthz").await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, dns.answer_for(&q, Proto::Tcp));
    assert_eq!(
        (health.status, &health.body[..]),
        (StatusCode::OK, &b"ok\n"[..])
    );
    shim.stop().await;
}

#[tokio::test]
async fn udp_transport_passes_a_truncated_answer_through() {
    let dns = DnsServer::start(Behaviour::TruncateUdp, marker(1)).await;
    let shim = start_shim(&["--upstream", &dns.addr.to_string()]).await;
    let q = query(CLIENT_ID, "many.example", A, None);

    let reply = Http::h1(shim.local_addr()).dns(&q, Some("udp")).await;

    assert_eq!(reply.body, dns.answer_for(&q, Proto::Udp));
    assert!(Response::parse(&reply.body).unwrap().truncated());
    assert_eq!(
        dns.protocols_seen(),
        vec![Proto::Udp],
        "the client retries over TCP, not the shim"
    );
    shim.stop().await;
}

#[tokio::test]
async fn tcp_transport_gets_the_whole_answer_over_udp_then_tcp_when_truncated() {
    let dns = DnsServer::start(Behaviour::TruncateUdp, marker(1)).await;
    let shim = start_shim(&["--upstream", &dns.addr.to_string()]).await;
    let q = query(CLIENT_ID, "many.example", A, None);

    let reply = Http::h1(shim.local_addr()).dns(&q, Some("tcp")).await;

    assert_eq!(reply.body, dns.answer_for(&q, Proto::Tcp));
    assert_eq!(Response::parse(&reply.body).unwrap().answers.len(), 100);
    assert_eq!(dns.protocols_seen(), vec![Proto::Udp, Proto::Tcp]);
    shim.stop().await;
}

#[tokio::test]
async fn tcp_transport_does_not_open_a_connection_when_udp_answers_whole() {
    let dns = DnsServer::start(Behaviour::Answer, marker(1)).await;
    let shim = start_shim(&["--upstream", &dns.addr.to_string()]).await;
    let q = query(CLIENT_ID, "one.example", A, None);

    let reply = Http::h1(shim.local_addr()).dns(&q, Some("tcp")).await;

    assert_eq!(Response::parse(&reply.body).unwrap().header.id, CLIENT_ID);
    assert_eq!(dns.protocols_seen(), vec![Proto::Udp]);
    shim.stop().await;
}

#[tokio::test]
async fn doh_without_transport_header_retries_a_truncated_answer_over_tcp() {
    let dns = DnsServer::start(Behaviour::TruncateUdp, marker(1)).await;
    let shim = start_shim(&["--upstream", &dns.addr.to_string()]).await;
    let q = query(CLIENT_ID, "many.example", A, None);

    let reply = Http::h1(shim.local_addr()).dns(&q, None).await;

    assert_eq!(reply.body, dns.answer_for(&q, Proto::Tcp));
    assert!(!Response::parse(&reply.body).unwrap().truncated());
    assert_eq!(dns.protocols_seen(), vec![Proto::Udp, Proto::Tcp]);
    shim.stop().await;
}

#[tokio::test]
async fn doh_gets_the_truncated_answer_when_no_upstream_answers_over_tcp() {
    let dns = DnsServer::start(Behaviour::TruncateUdpTcpBroken, marker(1)).await;
    let dead = dead_port().await;
    let shim = start_shim(&[
        "--upstream",
        &dns.addr.to_string(),
        "--upstream",
        &dead.to_string(),
    ])
    .await;
    let q = query(CLIENT_ID, "many.example", A, None);

    let reply = Http::h1(shim.local_addr()).dns(&q, None).await;

    // Better than SERVFAIL: real data, and TC says it is partial.
    assert_eq!(reply.body, dns.answer_for(&q, Proto::Udp));
    assert!(Response::parse(&reply.body).unwrap().truncated());
    shim.stop().await;
}

#[tokio::test]
async fn large_edns_answer_over_udp_arrives_intact() {
    let dns = DnsServer::start(Behaviour::Large, marker(1)).await;
    let shim = start_shim(&["--upstream", &dns.addr.to_string()]).await;
    let q = query(CLIENT_ID, "big.example", A, Some(4096));

    let reply = Http::h1(shim.local_addr()).dns(&q, Some("udp")).await;

    assert!(
        reply.body.len() > 3000,
        "answer is {} bytes",
        reply.body.len()
    );
    assert_eq!(reply.body, dns.answer_for(&q, Proto::Udp));
    assert_eq!(dns.protocols_seen(), vec![Proto::Udp]);
    shim.stop().await;
}

#[tokio::test]
async fn second_upstream_answers_when_the_first_refuses() {
    let dead = dead_port().await;
    let dns = DnsServer::start(Behaviour::Answer, marker(2)).await;
    let shim = start_shim(&[
        "--upstream",
        &dead.to_string(),
        "--upstream",
        &dns.addr.to_string(),
        "--forward-timeout",
        "4s",
    ])
    .await;
    let started = Instant::now();

    let reply = Http::h1(shim.local_addr())
        .dns(&query(CLIENT_ID, "x.example", A, None), Some("udp"))
        .await;

    assert_eq!(first_a(&reply.body), Some(marker(2)));
    // A refusal is reported by ICMP at once; waiting out the first share (2 s) would mean the
    // refusal was not noticed.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
    shim.stop().await;
}

#[tokio::test]
async fn second_upstream_answers_when_the_first_is_silent() {
    let silent = DnsServer::start(Behaviour::Silent, marker(1)).await;
    let dns = DnsServer::start(Behaviour::Answer, marker(2)).await;
    let shim = start_shim(&[
        "--upstream",
        &silent.addr.to_string(),
        "--upstream",
        &dns.addr.to_string(),
        "--forward-timeout",
        "1s",
    ])
    .await;

    let reply = Http::h1(shim.local_addr())
        .dns(&query(CLIENT_ID, "x.example", A, None), Some("udp"))
        .await;

    assert_eq!(first_a(&reply.body), Some(marker(2)));
    assert_eq!(silent.protocols_seen(), vec![Proto::Udp]);
    shim.stop().await;
}

#[tokio::test]
async fn servfail_for_the_query_when_every_upstream_fails() {
    let dead = dead_port().await;
    let silent = DnsServer::start(Behaviour::Silent, marker(1)).await;
    let shim = start_shim(&[
        "--upstream",
        &dead.to_string(),
        "--upstream",
        &silent.addr.to_string(),
        "--forward-timeout",
        "1s",
    ])
    .await;
    let q = query(CLIENT_ID, "Lost.Example", A, Some(1232));
    let started = Instant::now();

    let reply = Http::h1(shim.local_addr()).dns(&q, Some("tcp")).await;

    assert_eq!(reply.status, StatusCode::OK);
    let r = Response::parse(&reply.body).unwrap();
    assert_eq!(r.header.id, CLIENT_ID);
    assert_eq!(r.rcode(), Rcode::ServFail.value());
    assert_eq!(r.questions, vec![("Lost.Example".to_string(), A, 1)]);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    shim.stop().await;
}

#[tokio::test]
async fn upstream_nxdomain_and_servfail_are_answers_not_failures() {
    for rcode in [Rcode::NxDomain, Rcode::ServFail] {
        let first = DnsServer::start(Behaviour::Rcode(rcode), marker(1)).await;
        let second = DnsServer::start(Behaviour::Answer, marker(2)).await;
        let shim = start_shim(&[
            "--upstream",
            &first.addr.to_string(),
            "--upstream",
            &second.addr.to_string(),
        ])
        .await;
        let q = query(CLIENT_ID, "nx.example", A, None);

        let reply = Http::h1(shim.local_addr()).dns(&q, Some("udp")).await;

        assert_eq!(reply.body, first.answer_for(&q, Proto::Udp), "{rcode:?}");
        assert!(
            second.seen().is_empty(),
            "{rcode:?}: the second upstream was asked"
        );
        shim.stop().await;
    }
}

#[tokio::test]
async fn replies_with_another_id_or_question_or_garbage_are_ignored() {
    for kind in [
        Bogus::OtherId,
        Bogus::OtherQuestion,
        Bogus::OtherType,
        Bogus::NotAResponse,
        Bogus::Garbage,
    ] {
        let dns = DnsServer::start(Behaviour::BogusFirst(kind), marker(1)).await;
        let shim = start_shim(&["--upstream", &dns.addr.to_string()]).await;
        let q = query(CLIENT_ID, "spoof.example", A, None);

        let reply = Http::h1(shim.local_addr()).dns(&q, Some("udp")).await;

        assert_eq!(first_a(&reply.body), Some(marker(1)), "{kind:?}");
        assert_eq!(reply.body, dns.answer_for(&q, Proto::Udp), "{kind:?}");
        shim.stop().await;
    }
}

#[tokio::test]
async fn bad_requests_get_4xx_statuses() {
    let dns = DnsServer::start(Behaviour::Answer, marker(1)).await;
    let shim = start_shim(&["--upstream", &dns.addr.to_string()]).await;
    let http = Http::h1(shim.local_addr());
    let good = query(CLIENT_ID, "a.example", A, None);
    let mut response_not_query = good.clone();
    response_not_query[2] |= 0x80;
    let ct = ("content-type", "application/dns-message");

    type Case<'a> = (
        &'a str,
        Method,
        &'a str,
        Vec<(&'a str, &'a str)>,
        Vec<u8>,
        StatusCode,
    );
    let cases: Vec<Case> = vec![
        (
            "garbage body",
            Method::POST,
            "/dns-query",
            vec![ct],
            b"hello".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "empty body",
            Method::POST,
            "/dns-query",
            vec![ct],
            vec![],
            StatusCode::BAD_REQUEST,
        ),
        (
            "a response, not a query",
            Method::POST,
            "/dns-query",
            vec![ct],
            response_not_query,
            StatusCode::BAD_REQUEST,
        ),
        (
            "JSON content type",
            Method::POST,
            "/dns-query",
            vec![("content-type", "application/json")],
            good.clone(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "no content type",
            Method::POST,
            "/dns-query",
            vec![],
            good.clone(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "body over 65535 bytes",
            Method::POST,
            "/dns-query",
            vec![ct],
            vec![0; 65536],
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "unknown transport",
            Method::POST,
            "/dns-query",
            vec![ct, ("x-vmesh-transport", "quic")],
            good.clone(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "PUT",
            Method::PUT,
            "/dns-query",
            vec![ct],
            good.clone(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "DELETE name table",
            Method::DELETE,
            "/v1/name-table",
            vec![],
            vec![],
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "GET without dns=",
            Method::GET,
            "/dns-query",
            vec![],
            vec![],
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET with bad base64",
            Method::GET,
            "/dns-query?dns=%21%21%21",
            vec![],
            vec![],
            StatusCode::BAD_REQUEST,
        ),
        (
            "unknown path",
            Method::GET,
            "/nope",
            vec![],
            vec![],
            StatusCode::NOT_FOUND,
        ),
    ];
    for (what, method, path, headers, body, want) in cases {
        let reply = http.send(method, path, &headers, body).await;
        assert_eq!(reply.status, want, "{what}: {:?}", reply.body);
    }
    assert!(dns.seen().is_empty(), "nothing bad was relayed");
    shim.stop().await;
}

#[tokio::test]
async fn chunked_body_over_65535_bytes_is_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dns = DnsServer::start(Behaviour::Answer, marker(1)).await;
    let shim = start_shim(&["--upstream", &dns.addr.to_string()]).await;
    let mut stream = tokio::net::TcpStream::connect(shim.local_addr())
        .await
        .unwrap();
    let head = "POST /dns-query HTTP/1.1\r\nhost: x\r\ncontent-type: application/dns-message\r\n\
                transfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..3 {
        let chunk = vec![0u8; 30000];
        let _ = stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await;
        let _ = stream.write_all(&chunk).await;
        let _ = stream.write_all(b"\r\n").await;
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut response = Vec::new();
    within_patience("response", stream.read_to_end(&mut response))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    shim.stop().await;
}

#[tokio::test]
async fn a_rewritten_resolv_conf_is_followed_without_a_restart() {
    // resolv.conf has no port: the upstreams listen on port 53 of their own loopback addresses.
    let (Some(first), Some(second)) = (
        DnsServer::start_at(
            "127.0.53.1:53".parse().unwrap(),
            Behaviour::Answer,
            marker(1),
        )
        .await,
        DnsServer::start_at(
            "127.0.53.2:53".parse().unwrap(),
            Behaviour::Answer,
            marker(2),
        )
        .await,
    ) else {
        eprintln!("skipped: cannot bind port 53 on 127.0.53.1 and 127.0.53.2 (needs root)");
        return;
    };
    let dir = TempDir::new();
    let conf = dir.file("resolv.conf", "nameserver 127.0.53.1\n");
    let shim = start_shim(&["--resolv-conf", conf.to_str().unwrap()]).await;
    let http = Http::h1(shim.local_addr());
    let q = query(CLIENT_ID, "www.example.com", A, None);
    assert_eq!(
        first_a(&http.dns(&q, Some("udp")).await.body),
        Some(first.marker)
    );

    // Rewritten the way resolvconf and DHCP clients do it: a new file renamed over the old.
    dir.file("resolv.conf.new", "# new lease\nnameserver 127.0.53.2\n");
    std::fs::rename(dir.path().join("resolv.conf.new"), &conf).unwrap();
    assert_eventually_async(
        "queries go to the resolver the new resolv.conf names",
        || async { first_a(&http.dns(&q, Some("udp")).await.body) == Some(second.marker) },
    )
    .await;

    // A resolv.conf without a usable resolver keeps the last good upstreams. Checking that
    // nothing changes needs the shim to have looked: a few of its poll periods.
    std::fs::write(&conf, "search example.com\n").unwrap();
    tokio::time::sleep(vmesh_shim::resolv::POLL * 3).await;
    assert_eq!(
        first_a(&http.dns(&q, Some("udp")).await.body),
        Some(second.marker)
    );
    shim.stop().await;
}
