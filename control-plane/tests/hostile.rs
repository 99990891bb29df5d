//! Hostile clients against the release binary (`scripts/build.sh` builds it; set
//! `VMESH_CONTROL_BIN` to test another one): connections held open beyond the open-file limit
//! while a VM keeps working, token edge cases, data-dir and certificate hygiene, and log
//! injection. Timeouts are lowered through the environment so the suite stays fast.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use common::release::{
    cluster_claims, cluster_kid, group_doc, metric, status, Control, CLUSTER_ISSUER,
};
use common::{fixture, rs256};
use hyper::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use vmesh_control::client::ClientError;
use vmesh_test_support::eventually::assert_eventually_async;

fn tls_connector(data: &Path) -> tokio_rustls::TlsConnector {
    let root = std::fs::read(data.join("root-cert.pem")).unwrap();
    let mut cfg = vmesh_control::tls::client_config(&root).unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// What one attacking connection does once connected.
#[derive(Debug, Clone, Copy)]
enum Attack {
    /// Connects and sends nothing.
    Silent,
    /// Sends the first bytes of a TLS ClientHello and stops.
    HalfHandshake,
    /// Completes TLS and sends nothing.
    IdleAfterTls,
    /// Completes TLS and sends a request head one byte every 300 ms.
    SlowHeaders,
}

#[derive(Debug, Default)]
struct AttackStats {
    opened: AtomicU64,
    closed_by_server: AtomicU64,
    /// How long TLS-complete idle connections were held before the server closed them.
    idle_held: Mutex<Vec<Duration>>,
}

/// Holds one attacking connection from `source` at a time, re-opening it when the server closes
/// it, until `done`.
async fn attacker(
    server: SocketAddr,
    source: [u8; 4],
    attack: Attack,
    tls: tokio_rustls::TlsConnector,
    stats: Arc<AttackStats>,
    done: Arc<AtomicBool>,
) {
    while !done.load(Ordering::Relaxed) {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::from((source, 0))).unwrap();
        let Ok(mut tcp) = sock.connect(server).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        stats.opened.fetch_add(1, Ordering::Relaxed);
        let opened = Instant::now();
        let mut buf = [0u8; 64];
        let closed = match attack {
            Attack::Silent => wait_closed(&mut tcp, &mut buf, &done).await,
            Attack::HalfHandshake => {
                let _ = tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await;
                wait_closed(&mut tcp, &mut buf, &done).await
            }
            Attack::IdleAfterTls | Attack::SlowHeaders => {
                let name = vmesh_control::tls::server_name("127.0.0.1").unwrap();
                match tls.connect(name, tcp).await {
                    Err(_) => true,
                    Ok(mut s) => {
                        let head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ";
                        let mut i = 0;
                        loop {
                            if done.load(Ordering::Relaxed) {
                                break false;
                            }
                            if matches!(attack, Attack::SlowHeaders) {
                                let b = head[i % head.len()];
                                i += 1;
                                if s.write_all(&[b]).await.is_err() {
                                    break true;
                                }
                            }
                            match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf))
                                .await
                            {
                                Ok(Ok(0)) | Ok(Err(_)) => {
                                    if matches!(attack, Attack::IdleAfterTls) {
                                        stats.idle_held.lock().unwrap().push(opened.elapsed());
                                    }
                                    break true;
                                }
                                // A 408 or the like: keep reading until the close.
                                Ok(Ok(_)) | Err(_) => {}
                            }
                        }
                    }
                }
            }
        };
        if closed {
            stats.closed_by_server.fetch_add(1, Ordering::Relaxed);
            // Not a spin: a real attacker has a cost per connection too.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Waits until the peer closes (`true`) or `done` (`false`).
async fn wait_closed(tcp: &mut TcpStream, buf: &mut [u8], done: &AtomicBool) -> bool {
    loop {
        if done.load(Ordering::Relaxed) {
            return false;
        }
        match tokio::time::timeout(Duration::from_millis(300), tcp.read(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            _ => {}
        }
    }
}

/// The measured failure: idle TLS connections beyond the open-file limit made every legitimate
/// request fail. Here the server runs under `prlimit --nofile=256`, and three attacking
/// addresses hold 360 connections (silent, half a handshake, idle after TLS, trickling a
/// request head) open and re-open them as they are closed, while a VM registers, heartbeats
/// and long-polls on fresh connections: every one of its requests succeeds, the idle
/// connections are closed within the timeouts, and the accept loop does not flood the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_held_beyond_the_open_file_limit_do_not_stop_a_vm() {
    let data = vmesh_test_support::TempDir::new();
    let logs = vmesh_test_support::TempDir::new();
    let mut p = Control::spawn(
        data.path(),
        logs.path(),
        Some(256),
        &[],
        &[
            ("VMESH_CONTROL_IDLE_TIMEOUT", "3s"),
            ("VMESH_CONTROL_HEADER_READ_TIMEOUT", "2s"),
            ("VMESH_CONTROL_HANDSHAKE_TIMEOUT", "2s"),
            ("VMESH_CONTROL_MAX_CONNECTIONS_PER_SOURCE", "120"),
            // The VM registers as fast as it can for 8 s: this test is about connections,
            // not the per-identity quota (hostile_bounds.rs tests that).
            ("VMESH_CONTROL_REGISTRATION_RATE", "0"),
            ("VMESH_CONTROL_MAX_ENTRIES_PER_IDENTITY", "0"),
        ],
    );
    let admin = common::wait_for_server(data.path(), &p.url).await;
    admin
        .apply(vec![group_doc("vm-ns", "vms", "vm-sa")], "")
        .await
        .unwrap();
    let vm = admin.with_token(
        &admin
            .mint_token("vm-ns", "vm-sa", Duration::from_secs(600))
            .await
            .unwrap()
            .token,
    );

    let done = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(AttackStats::default());
    let tls = tls_connector(data.path());
    let mut attackers = Vec::new();
    for (a, source) in [[127, 0, 0, 2], [127, 0, 0, 3], [127, 0, 0, 4]]
        .into_iter()
        .enumerate()
    {
        for i in 0..120 {
            let attack = match (a * 120 + i) % 4 {
                0 => Attack::Silent,
                1 => Attack::HalfHandshake,
                2 => Attack::IdleAfterTls,
                _ => Attack::SlowHeaders,
            };
            attackers.push(tokio::spawn(attacker(
                p.addr,
                source,
                attack,
                tls.clone(),
                stats.clone(),
                done.clone(),
            )));
        }
    }
    // The attack is in place: more connections opened than the server has descriptors.
    assert_eventually_async("360 attacking connections opened", async || {
        stats.opened.load(Ordering::Relaxed) >= 360
    })
    .await;

    // The VM: long-polls back to back (each a fresh connection, as after a reconnect) while
    // it registers and heartbeats.
    let vm_done = Arc::new(AtomicBool::new(false));
    let poller = {
        let (vm, vm_done) = (vm.clone(), vm_done.clone());
        tokio::spawn(async move {
            let (mut ok, mut errors, mut version) = (0u32, Vec::new(), String::new());
            while !vm_done.load(Ordering::Relaxed) {
                let path = format!("/v1/name-table?version={version}&wait=1");
                match vm.call(Method::GET, &path, None).await {
                    Ok(r) => {
                        ok += 1;
                        if let Some(v) = r.headers.get("x-vmesh-table-version") {
                            version = v.to_str().unwrap().to_string();
                        }
                    }
                    Err(e) => errors.push(format!("long-poll: {e}")),
                }
            }
            (ok, errors)
        })
    };
    let mut errors = Vec::new();
    let mut requests = 0u32;
    let mut latencies = Vec::new();
    let started = Instant::now();
    let mut i = 0u32;
    while started.elapsed() < Duration::from_secs(8) {
        i += 1;
        let ip = format!("10.0.{}.{}", i / 250, i % 250 + 1);
        let t = Instant::now();
        let r: Result<Value, ClientError> = vm
            .json(
                Method::POST,
                "/v1/register",
                Some(&json!({"group": "vms", "namespace": "vm-ns", "address": ip})),
            )
            .await;
        latencies.push(t.elapsed());
        requests += 1;
        match r {
            Ok(r) => {
                let entry = r["workloadEntry"].clone();
                requests += 1;
                let t = Instant::now();
                if let Err(e) = vm
                    .call(
                        Method::POST,
                        "/v1/heartbeat",
                        Some(serde_json::to_vec(&entry).unwrap()),
                    )
                    .await
                {
                    errors.push(format!("heartbeat: {e}"));
                }
                latencies.push(t.elapsed());
            }
            Err(e) => errors.push(format!("register: {e}")),
        }
    }
    vm_done.store(true, Ordering::SeqCst);
    let (polls, poll_errors) = poller.await.unwrap();
    errors.extend(poll_errors);
    latencies.sort();
    let closed = stats.closed_by_server.load(Ordering::Relaxed);
    let evicted = metric(&admin, "vmesh_connections_evicted_total").await;
    done.store(true, Ordering::SeqCst);
    for a in attackers {
        a.await.unwrap();
    }
    let log = p.proc.log_text();
    assert!(
        errors.is_empty(),
        "{} of {requests} VM requests failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    assert!(
        requests > 20 && polls >= 4,
        "only {requests} requests and {polls} long-polls in 8 s"
    );
    assert!(
        closed > 100,
        "the server closed only {closed} attacking connections"
    );
    let held = stats.idle_held.lock().unwrap().clone();
    let longest = held.iter().max().copied().unwrap_or_default();
    // HTTP/1.1 head timeout 2 s (it covers a silent connection after TLS), idle 3 s; slack for
    // a loaded 2-core machine.
    assert!(
        !held.is_empty() && longest < Duration::from_secs(6),
        "idle TLS connections held {longest:?} ({} closed)",
        held.len()
    );
    let accept_warnings = log.matches("accept failed").count();
    assert!(
        accept_warnings <= 2,
        "accept loop logged {accept_warnings} warnings:\n{log}"
    );
    eprintln!(
        "{requests} VM requests (p50 {:?}, max {:?}) and {polls} long-polls, 0 failed; {} attacking connections opened, {closed} closed by the server ({} evictions); idle TLS held at most {longest:?}",
        latencies[latencies.len() / 2],
        latencies.last().unwrap(),
        stats.opened.load(Ordering::Relaxed),
        evicted.unwrap_or(-1.0)
    );
    p.proc.signal("TERM");
    assert_eq!(
        p.proc
            .wait_exit(Duration::from_secs(20))
            .and_then(|s| s.code()),
        Some(0)
    );
}

/// Token edge cases over HTTPS: a token over 16 KiB is refused with 431 before any crypto, a
/// `crit` header and a missing `exp` each have their own reason; and a `--jwks` file with a
/// 1024-bit RSA key stops the server at start, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tokens_are_refused_each_with_its_reason() {
    let data = vmesh_test_support::TempDir::new();
    let logs = vmesh_test_support::TempDir::new();
    let jwks = format!(
        "{CLUSTER_ISSUER}={}",
        fixture("cluster-jwks.json").display()
    );
    let p = Control::spawn(data.path(), logs.path(), None, &["--jwks", &jwks], &[]);
    let admin = common::wait_for_server(data.path(), &p.url).await;
    let register = |token: String| {
        let c = admin.with_token(&token);
        async move {
            c.call(
                Method::POST,
                "/v1/register",
                Some(br#"{"group": "g", "namespace": "vm-ns", "address": "10.0.0.1"}"#.to_vec()),
            )
            .await
        }
    };
    let huge = format!("a.{}.c", "A".repeat(20 << 10));
    assert_eq!(status(register(huge).await), 431);
    let crit = rs256(
        &json!({"alg": "RS256", "kid": cluster_kid(), "crit": ["x-ext"], "x-ext": true}),
        &cluster_claims("vm-ns", "vm-sa"),
    );
    assert_eq!(status(register(crit).await), 401);
    let mut no_exp = cluster_claims("vm-ns", "vm-sa");
    no_exp.as_object_mut().unwrap().remove("exp");
    let no_exp = rs256(&json!({"alg": "RS256", "kid": cluster_kid()}), &no_exp);
    let e = register(no_exp).await.unwrap_err();
    assert!(e.to_string().contains("no exp"), "{e}");
    for reason in ["too_large", "unknown_crit", "missing_exp"] {
        let n = metric(
            &admin,
            &format!("vmesh_token_refusals_total{{reason=\"{reason}\"}}"),
        )
        .await;
        assert_eq!(n, Some(1.0), "{reason}");
    }

    // A JWKS with a 1024-bit key: refused at start, before the port is bound.
    let mut short: Value =
        serde_json::from_slice(&std::fs::read(fixture("cluster-jwks.json")).unwrap()).unwrap();
    let n = B64.decode(short["keys"][0]["n"].as_str().unwrap()).unwrap();
    short["keys"][0]["n"] = json!(B64.encode(&n[..128]));
    let short_path = logs.path().join("short-jwks.json");
    std::fs::write(&short_path, short.to_string()).unwrap();
    let data2 = vmesh_test_support::TempDir::new();
    let arg = format!("{CLUSTER_ISSUER}={}", short_path.display());
    let mut bad = Control::spawn(data2.path(), logs.path(), None, &["--jwks", &arg], &[]);
    let st = bad.proc.wait_exit(Duration::from_secs(20));
    assert_eq!(st.and_then(|s| s.code()), Some(1));
    let log = bad.proc.log_text();
    assert!(log.contains("1024 bits") && log.contains("2048"), "{log}");
}

/// Files and certificates: a world-writable data dir is refused; a secret readable by others is
/// made 0600 with a warning; the store is 0600; the root lives 10 years; the serving
/// certificate is re-issued in the running server before it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_is_private_and_the_serving_certificate_renews_itself() {
    use std::os::unix::fs::PermissionsExt;
    let logs = vmesh_test_support::TempDir::new();
    let data = vmesh_test_support::TempDir::new();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;

    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut refused = Control::spawn(data.path(), logs.path(), None, &[], &[]);
    let st = refused.proc.wait_exit(Duration::from_secs(20));
    assert_eq!(st.and_then(|s| s.code()), Some(1));
    assert!(refused.proc.log_text().contains("writable by every user"));
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // First start creates everything private; then the admin credential is made readable.
    let mut p = Control::spawn(data.path(), logs.path(), None, &[], &[]);
    common::wait_for_server(data.path(), &p.url).await;
    p.proc.signal("TERM");
    p.proc.wait_exit(Duration::from_secs(20));
    for f in [
        "store.redb",
        "admin-token",
        "root-key.pem",
        "token-signing-key.pem",
    ] {
        assert_eq!(mode(&data.path().join(f)), 0o600, "{f}");
    }
    let admin_token = data.path().join("admin-token");
    std::fs::set_permissions(&admin_token, std::fs::Permissions::from_mode(0o644)).unwrap();

    let p = Control::spawn(
        data.path(),
        logs.path(),
        None,
        &["--cert-lifetime", "3s"],
        &[],
    );
    common::wait_for_server(data.path(), &p.url).await;
    assert_eq!(mode(&admin_token), 0o600);
    assert!(p.proc.log_text().contains("made 0600"));

    let end = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-checkend"])
        .arg((9 * 365 * 24 * 3600).to_string())
        .arg("-in")
        .arg(data.path().join("root-cert.pem"))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(end.success(), "root expires within 9 years");
    let end = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-checkend"])
        .arg((11 * 365 * 24 * 3600).to_string())
        .arg("-in")
        .arg(data.path().join("root-cert.pem"))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!end.success(), "root outlives 11 years");

    // The leaf the server presents changes without a restart (renewed two thirds into 3 s),
    // and every one it presents is valid now.
    let tls = tls_connector(data.path());
    let leaf = || {
        let tls = tls.clone();
        let addr = p.addr;
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let s = tls
                .connect(vmesh_control::tls::server_name("127.0.0.1").unwrap(), tcp)
                .await
                .expect("handshake with a valid certificate");
            s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
        }
    };
    let first = leaf().await;
    assert_eventually_async("a renewed serving certificate", async || {
        leaf().await != first
    })
    .await;
    let renewed = leaf().await;
    assert_eventually_async("renewed again", async || leaf().await != renewed).await;
}

/// Strings a client controls (a token's namespace, a kid, an issuer, a request path) carrying
/// newlines, a forged log line and terminal escape sequences: the log has no raw control
/// character and no forged line, and the attempts are in it, escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_input_can_forge_a_log_line_or_emit_control_characters() {
    let data = vmesh_test_support::TempDir::new();
    let logs = vmesh_test_support::TempDir::new();
    let jwks = format!(
        "{CLUSTER_ISSUER}={}",
        fixture("cluster-jwks.json").display()
    );
    let p = Control::spawn(
        data.path(),
        logs.path(),
        None,
        &["--jwks", &jwks, "--log", "debug"],
        &[],
    );
    let admin = common::wait_for_server(data.path(), &p.url).await;
    admin
        .apply(vec![group_doc("vm-ns", "vms", "vm-sa")], "")
        .await
        .unwrap();
    // No ':' in it: a service-account subject splits on them.
    let forged = "\n2030-01-01T00.00.00.000000Z  INFO FORGED line\x1b[31m\r\u{202e}";
    // Signed by the trusted cluster key: refused for its subject (not a Kubernetes name), and
    // what is logged of the refusal must still be escaped.
    let ns = format!("vm-ns{forged}");
    let token = rs256(
        &json!({"alg": "RS256", "kid": cluster_kid()}),
        &cluster_claims(&ns, "vm-sa"),
    );
    let vm = admin.with_token(&token);
    let _ = vm
        .call(
            Method::POST,
            "/v1/register",
            Some(
                json!({"group": "vms", "namespace": "vm-ns", "address": "10.0.0.9"})
                    .to_string()
                    .into_bytes(),
            ),
        )
        .await;
    let _ = vm
        .call(Method::GET, "/v1/admin/objects/workloadgroup", None)
        .await;
    let unsigned = |header: Value, claims: Value| {
        format!(
            "{}.{}.c2ln",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        )
    };
    for token in [
        unsigned(
            json!({"alg": "RS256", "kid": format!("k{forged}")}),
            json!({"iss": CLUSTER_ISSUER}),
        ),
        unsigned(
            json!({"alg": "RS256"}),
            json!({"iss": format!("i{forged}")}),
        ),
        unsigned(json!({"alg": format!("A{forged}")}), json!({})),
    ] {
        let _ = admin
            .with_token(&token)
            .call(Method::GET, "/v1/name-table", None)
            .await;
    }
    let _ = admin
        .call(
            Method::GET,
            "/v1/%0a2030-01-01%20INFO%20FORGED%1b%5b31m",
            None,
        )
        .await;
    assert_eventually_async("the attempts are logged", async || {
        p.proc.log_text().matches("FORGED").count() >= 3
    })
    .await;
    let log = p.proc.log_text();
    let raw: Vec<char> = log
        .chars()
        .filter(|c| (c.is_control() && *c != '\n') || *c == '\u{202e}')
        .collect();
    assert!(raw.is_empty(), "raw control characters {raw:?} in:\n{log}");
    for line in log.lines() {
        assert!(
            !line.starts_with("2030-01-01") && !line.trim_start().starts_with("INFO FORGED"),
            "forged line {line:?} in:\n{log}"
        );
    }
}

/// An HTTP/2 connection that answers the server's pings but sends no request is still closed
/// after the idle timeout: the server's pings (writes, which count as activity so that a large
/// answer still draining is not idle) come only every twice the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_answering_pings_is_closed() {
    let data = vmesh_test_support::TempDir::new();
    let logs = vmesh_test_support::TempDir::new();
    let p = Control::spawn(
        data.path(),
        logs.path(),
        None,
        &[],
        &[
            ("VMESH_CONTROL_IDLE_TIMEOUT", "1s"),
            ("VMESH_CONTROL_HEADER_READ_TIMEOUT", "5s"),
        ],
    );
    common::wait_for_server(data.path(), &p.url).await;
    let root = std::fs::read(data.path().join("root-cert.pem")).unwrap();
    let mut cfg = vmesh_control::tls::client_config(&root).unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    // The client preface and an empty SETTINGS frame; then only answers to the server.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let opened = Instant::now();
    let held = tokio::time::timeout(Duration::from_secs(30), async {
        let mut head = [0u8; 9];
        loop {
            if tls.read_exact(&mut head).await.is_err() {
                return opened.elapsed();
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let mut payload = vec![0u8; len];
            if tls.read_exact(&mut payload).await.is_err() {
                return opened.elapsed();
            }
            let reply: Vec<u8> = match (kind, flags & 1) {
                // SETTINGS without ACK: acknowledge it.
                (4, 0) => b"\0\0\0\x04\x01\0\0\0\0".to_vec(),
                // PING without ACK: send it back acknowledged.
                (6, 0) => [b"\0\0\x08\x06\x01\0\0\0\0".as_slice(), &payload].concat(),
                _ => continue,
            };
            if tls.write_all(&reply).await.is_err() {
                return opened.elapsed();
            }
        }
    })
    .await
    .expect("an idle HTTP/2 connection answering pings stayed open for 30 s");
    // Idle timeout 1 s, then GOAWAY and at most 2 s for the client to leave; slack for load.
    assert!(held < Duration::from_secs(10), "held for {held:?}");
}
