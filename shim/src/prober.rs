//! The probes the shim runs itself ([`ProbePlan::Shim`]): `exec`, `tcpSocket`, `grpc`, and
//! `httpGet` over HTTPS or to a host name. The schedule and the thresholds are the same
//! [`Prober`] the filter uses, so both follow Kubernetes' rules the same way; only the
//! checks differ.
//!
//! Like Kubernetes (and Istio's agent), an HTTPS probe does not verify the application's
//! certificate: it asks whether the application answers, not who it is.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::watch;
use vmesh_api::agent::{ProbeKind, ProbeTask};
use vmesh_api::probe::{GrpcHealthCheck, HttpHealthCheck, ReadinessProbe, TcpHealthCheck};
use vmesh_core::probe::{duration, Outcome, Prober};

use crate::control::session::Verdict;
use crate::probe::{ProbePlan, DEFAULT_HOST};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The schedule of a probe the shim runs, in the filter's task shape (its address fields
/// are not used).
pub fn schedule(id: u64, p: &ReadinessProbe) -> ProbeTask {
    let secs = |s: i32, at_least: u64| u64::try_from(s).unwrap_or(0).max(at_least) * 1000;
    let threshold = |n: i32| u32::try_from(n).unwrap_or(1).max(1);
    ProbeTask {
        id,
        kind: ProbeKind::HttpGet,
        host: String::new(),
        port: 1,
        path: String::new(),
        headers: Vec::new(),
        initial_delay_ms: secs(p.initial_delay_seconds, 0),
        period_ms: secs(p.period_seconds, 1),
        timeout_ms: secs(p.timeout_seconds, 1),
        success_threshold: threshold(p.success_threshold),
        failure_threshold: threshold(p.failure_threshold),
    }
}

/// Runs the plan's shim probe whenever there is one, publishing each verdict, until `stop`.
pub async fn run(
    mut plan: watch::Receiver<ProbePlan>,
    verdicts: watch::Sender<Option<Verdict>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let current = plan.borrow_and_update().clone();
        let ProbePlan::Shim { id, probe } = current else {
            tokio::select! {
                r = plan.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
            continue;
        };
        let mut prober = Prober::new(schedule(id, &probe), now_ms());
        let timeout = Duration::from_millis(prober.task().timeout_ms);
        loop {
            let wait = Duration::from_millis(prober.next_at().saturating_sub(now_ms()));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                r = plan.changed() => { if r.is_err() { return } break }
                _ = stop.changed() => return,
            }
            if !prober.start(now_ms()) {
                continue;
            }
            let outcome = tokio::select! {
                o = check(&probe, timeout) => o,
                _ = stop.changed() => return,
            };
            prober.finish(outcome);
            let r = prober.result();
            let verdict = Verdict {
                id: r.id,
                healthy: r.healthy,
                message: r.message,
            };
            verdicts.send_if_modified(|v| {
                if v.as_ref() == Some(&verdict) {
                    return false;
                }
                *v = Some(verdict);
                true
            });
        }
    }
}

/// One probe, bounded by `timeout`.
pub async fn check(probe: &ReadinessProbe, timeout: Duration) -> Outcome {
    let attempt = async {
        if let Some(e) = &probe.exec {
            return exec(&e.command).await;
        }
        if let Some(t) = &probe.tcp_socket {
            return tcp(t).await;
        }
        if let Some(h) = &probe.http_get {
            return http(h).await;
        }
        if let Some(g) = &probe.grpc {
            return grpc(g).await;
        }
        Outcome::failure("the probe names no method")
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(o) => o,
        Err(_) => Outcome::failure(format!(
            "timeout after {}",
            duration(timeout.as_millis() as u64)
        )),
    }
}

async fn exec(command: &[String]) -> Outcome {
    let Some((program, args)) = command.split_first() else {
        return Outcome::failure("exec: empty command");
    };
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        // A probe that outlives its timeout is killed with it.
        .kill_on_drop(true)
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => Outcome::success("exit status 0"),
        Ok(o) => {
            let said = String::from_utf8_lossy(if o.stderr.is_empty() {
                &o.stdout
            } else {
                &o.stderr
            })
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect::<String>();
            let code = o.status.code().map_or_else(
                || "killed by a signal".to_string(),
                |c| format!("exit status {c}"),
            );
            if said.is_empty() {
                Outcome::failure(code)
            } else {
                Outcome::failure(format!("{code}: {said}"))
            }
        }
        Err(e) => Outcome::failure(format!("exec {program}: {e}")),
    }
}

fn host(h: &str) -> &str {
    if h.is_empty() || h == "localhost" {
        DEFAULT_HOST
    } else {
        h
    }
}

async fn connect(host_name: &str, port: u32) -> Result<TcpStream, String> {
    let port = u16::try_from(port).map_err(|_| format!("port {port} is not 1-65535"))?;
    let target = host(host_name);
    // A host name is resolved by the VM's resolver, as any program on the VM would.
    TcpStream::connect((target, port))
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
            _ => e.to_string(),
        })
}

async fn tcp(t: &TcpHealthCheck) -> Outcome {
    match connect(&t.host, t.port).await {
        Ok(_) => Outcome::success("connected"),
        Err(e) => Outcome::failure(e),
    }
}

async fn http(h: &HttpHealthCheck) -> Outcome {
    let tcp = match connect(&h.host, h.port).await {
        Ok(s) => s,
        Err(e) => return Outcome::failure(e),
    };
    let path = if h.path.is_empty() { "/" } else { &h.path };
    let authority = format!("{}:{}", host(&h.host), h.port);
    let mut req = Request::get(path).header(hyper::header::HOST, authority.as_str());
    for hh in &h.http_headers {
        req = req.header(hh.name.as_str(), hh.value.as_str());
    }
    let req = match req.body(Empty::<Bytes>::new()) {
        Ok(r) => r,
        Err(e) => return Outcome::failure(format!("bad probe request: {e}")),
    };
    let status = if h.scheme.eq_ignore_ascii_case("https") {
        let tls = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls()));
        let name = rustls::pki_types::ServerName::try_from(host(&h.host).to_string())
            .unwrap_or_else(|_| loopback_name());
        match tls.connect(name, tcp).await {
            Ok(s) => send(TokioIo::new(s), req).await,
            Err(e) => Err(format!("TLS: {e}")),
        }
    } else {
        send(TokioIo::new(tcp), req).await
    };
    match status {
        Ok(s @ 200..=399) => Outcome::success(format!("HTTP {s}")),
        Ok(s) => Outcome::failure(format!("HTTP {s}")),
        Err(e) => Outcome::failure(e),
    }
}

/// The name sent when the probe's host is not a valid TLS name (nothing checks it).
fn loopback_name() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
}

async fn send<I>(io: I, req: Request<Empty<Bytes>>) -> Result<u16, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

/// `grpc.health.v1.Health/Check` over h2c: SERVING is healthy.
async fn grpc(g: &GrpcHealthCheck) -> Outcome {
    let tcp = match connect("", g.port).await {
        Ok(s) => s,
        Err(e) => return Outcome::failure(e),
    };
    let (mut sender, conn) = match hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    {
        Ok(x) => x,
        Err(e) => return Outcome::failure(format!("HTTP/2: {e}")),
    };
    tokio::spawn(conn);
    let req = Request::post(format!(
        "http://{DEFAULT_HOST}:{}/grpc.health.v1.Health/Check",
        g.port
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(Full::new(Bytes::from(grpc_request(&g.service))));
    let req = match req {
        Ok(r) => r,
        Err(e) => return Outcome::failure(format!("bad probe request: {e}")),
    };
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return Outcome::failure(e.to_string()),
    };
    if resp.status() != 200 {
        return Outcome::failure(format!("HTTP {}", resp.status().as_u16()));
    }
    let collected = match resp.into_body().collect().await {
        Ok(c) => c,
        Err(e) => return Outcome::failure(e.to_string()),
    };
    let grpc_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("0")
        .to_string();
    if grpc_status != "0" {
        return Outcome::failure(format!("gRPC status {grpc_status}"));
    }
    match grpc_serving_status(&collected.to_bytes()) {
        Some(1) => Outcome::success("SERVING"),
        Some(2) => Outcome::failure("NOT_SERVING"),
        Some(3) => Outcome::failure("SERVICE_UNKNOWN"),
        Some(n) => Outcome::failure(format!("status {n}")),
        None => Outcome::failure("UNKNOWN"),
    }
}

/// A length-prefixed gRPC message holding `HealthCheckRequest { service = 1 }`.
fn grpc_request(service: &str) -> Vec<u8> {
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        push_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut out = vec![0u8];
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(&msg);
    out
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The `status` (field 1, varint) of a `HealthCheckResponse` in a gRPC frame; `None` for
/// anything else (an empty message means status 0, UNKNOWN).
fn grpc_serving_status(frame: &[u8]) -> Option<u64> {
    let msg = frame.get(5..)?;
    let mut i = 0;
    while i < msg.len() {
        let key = *msg.get(i)?;
        i += 1;
        let (value, used) = read_varint(msg.get(i..)?)?;
        i += used;
        match (key >> 3, key & 7) {
            (1, 0) => return Some(value),
            (_, 0) => {}
            (_, 2) => i += usize::try_from(value).ok()?,
            _ => return None,
        }
    }
    None
}

fn read_varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// TLS for HTTPS probes: any certificate (Kubernetes' probes do not verify either).
fn insecure_tls() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AnyCertificate(provider.clone()));
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        })
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmesh_api::probe::ExecHealthCheck;

    fn exec_probe(cmd: &[&str]) -> ReadinessProbe {
        ReadinessProbe {
            exec: Some(ExecHealthCheck {
                command: cmd.iter().map(|s| s.to_string()).collect(),
            }),
            ..ReadinessProbe::default()
        }
    }

    #[tokio::test]
    async fn exec_probes_pass_on_exit_zero_and_say_why_otherwise() {
        let second = Duration::from_secs(1);
        assert!(check(&exec_probe(&["true"]), second).await.success);
        let o = check(
            &exec_probe(&["sh", "-c", "echo db down >&2; exit 3"]),
            second,
        )
        .await;
        assert_eq!(o, Outcome::failure("exit status 3: db down"));
        let o = check(&exec_probe(&["sleep", "5"]), Duration::from_millis(200)).await;
        assert_eq!(o, Outcome::failure("timeout after 200ms"));
        let o = check(&exec_probe(&["/nonexistent/probe"]), second).await;
        assert!(
            !o.success && o.message.starts_with("exec /nonexistent/probe"),
            "{o:?}"
        );
        assert!(!check(&exec_probe(&[]), second).await.success);
    }

    #[tokio::test]
    async fn tcp_and_http_probes_against_real_sockets() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = u32::from(listener.local_addr().unwrap().port());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                        .await;
                });
            }
        });
        let second = Duration::from_secs(1);
        let tcp = ReadinessProbe {
            tcp_socket: Some(TcpHealthCheck {
                host: String::new(),
                port,
            }),
            ..ReadinessProbe::default()
        };
        assert_eq!(check(&tcp, second).await, Outcome::success("connected"));
        let http = ReadinessProbe {
            http_get: Some(HttpHealthCheck {
                path: "/ready".into(),
                port,
                host: "localhost".into(),
                scheme: "HTTP".into(),
                http_headers: vec![],
            }),
            ..ReadinessProbe::default()
        };
        assert_eq!(check(&http, second).await, Outcome::failure("HTTP 503"));
        // A port nobody listens on.
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_port = u32::from(dead.local_addr().unwrap().port());
        drop(dead);
        let refused = ReadinessProbe {
            tcp_socket: Some(TcpHealthCheck {
                host: "127.0.0.1".into(),
                port: dead_port,
            }),
            ..ReadinessProbe::default()
        };
        assert_eq!(
            check(&refused, second).await,
            Outcome::failure("connection refused")
        );
    }

    #[test]
    fn grpc_health_messages() {
        assert_eq!(grpc_request(""), vec![0, 0, 0, 0, 0]);
        assert_eq!(grpc_request("db"), vec![0, 0, 0, 0, 4, 0x0a, 2, b'd', b'b']);
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
        assert_eq!(grpc_serving_status(&[0, 0, 0, 0, 0]), None);
        assert_eq!(grpc_serving_status(&[0, 0]), None);
    }

    #[test]
    fn schedules_take_istios_fields() {
        let p = ReadinessProbe {
            initial_delay_seconds: 2,
            period_seconds: 0,
            timeout_seconds: 3,
            failure_threshold: 0,
            ..ReadinessProbe::default()
        };
        let s = schedule(9, &p);
        assert_eq!(
            (s.id, s.initial_delay_ms, s.period_ms, s.timeout_ms),
            (9, 2000, 1000, 3000)
        );
        assert_eq!((s.success_threshold, s.failure_threshold), (1, 1));
    }
}
