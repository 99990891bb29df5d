//! The inbound mTLS listener against plaintext: new connections per second (each a TCP
//! connect, for TLS a full handshake with client certificates, then one echoed byte) and the
//! latency of that, and the round trip on an open connection.
//!
//! Envoy runs two listeners that differ only in the TLS transport socket: `tls` is the
//! sidecar's `inbound_mtls` (SDS `default`/`ROOTCA` from a certificate directory laid out by
//! the shim's own `CertDir`), `plain` the same `tcp_proxy` without TLS. Both forward to an
//! in-process echo app. Rounds alternate the order (A/B, B/A, ...) so drift on a shared
//! machine hits both sides alike.
//!
//! `cargo run --release -p vmesh-bench --bin vmesh-bench-inbound-tls -- [ROUNDS] [SECS] [CLIENTS]`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};
use vmesh_shim::cert::dir::{CertDir, Material};

/// Accepts Envoy's certificate (a SPIFFE URI only, no host name to check); the handshake's
/// signature is still verified, so the cost measured is a real handshake's.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn echo_app() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let _ = conn.set_nodelay(true);
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(port)
}

/// A mesh CA, the VM's certificate (installed into `dir`) and a client's.
fn certificates(
    dir: &Path,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "vmesh bench root");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let leaf = |sa: &str| -> anyhow::Result<(rcgen::Certificate, rcgen::KeyPair)> {
        let key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::default();
        // Not rcgen's default subject, which is also the root's: a leaf named like its
        // issuer looks self-signed to a verifier.
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
            format!("spiffe://cluster.local/ns/bench/sa/{sa}"),
        )?)];
        Ok((p.signed_by(&key, &issuer)?, key))
    };
    let (vm, vm_key) = leaf("vm")?;
    let d = CertDir::new(dir);
    d.prepare()?;
    d.install(&Material {
        key: vm_key.serialize_pem(),
        chain: vm.pem(),
        root: ca_cert.pem(),
    })?;
    let (client, client_key) = leaf("client")?;
    Ok((
        vec![client.der().clone()],
        PrivateKeyDer::try_from(client_key.serialize_der()).map_err(anyhow::Error::msg)?,
    ))
}

fn envoy_config(dir: &Path, admin: u16, tls: u16, plain: u16, app: u16) -> String {
    let certs = dir.display();
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
node: {{id: bench, cluster: bench}}
static_resources:
  listeners:
  - name: inbound_mtls
    stat_prefix: inbound_mtls
    address: {{socket_address: {{address: 127.0.0.1, port_value: {tls}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificate_sds_secret_configs:
            - name: default
              sds_config: {{resource_api_version: V3, path_config_source: {{path: {certs}/sds-default.yaml, watched_directory: {{path: {certs}}}}}}}
            validation_context_sds_secret_config:
              name: ROOTCA
              sds_config: {{resource_api_version: V3, path_config_source: {{path: {certs}/sds-rootca.yaml, watched_directory: {{path: {certs}}}}}}}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: inbound_mtls, cluster: app}}
  - name: plain
    address: {{socket_address: {{address: 127.0.0.1, port_value: {plain}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: plain, cluster: app}}
  clusters:
  - name: app
    connect_timeout: 1s
    load_assignment:
      cluster_name: app
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {app}}}}}}}
"#
    )
}

struct Stop(Child);
impl Drop for Stop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Plain,
    Tls,
}

/// One new connection: connect (and handshake), echo one byte, close.
fn one(side: Side, port: u16, config: &Arc<ClientConfig>) -> anyhow::Result<()> {
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut b = [0u8; 1];
    match side {
        Side::Plain => {
            let mut s = tcp;
            s.write_all(b"x")?;
            s.read_exact(&mut b)?;
        }
        Side::Tls => {
            let c = ClientConnection::new(Arc::clone(config), ServerName::try_from("vm.bench")?)?;
            let mut s = StreamOwned::new(c, tcp);
            s.write_all(b"x")?;
            s.read_exact(&mut b)?;
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    }
    Ok(())
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// `clients` threads opening connections for `secs`: (connections/s, p50 us, p99 us).
fn churn(
    side: Side,
    port: u16,
    config: &Arc<ClientConfig>,
    secs: f64,
    clients: usize,
) -> (f64, f64, f64) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let config = Arc::clone(config);
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    if one(side, port, &config).is_ok() {
                        lat.push(t.elapsed());
                    }
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    all.sort();
    (all.len() as f64 / secs, pct(&all, 0.5), pct(&all, 0.99))
}

/// Round trips of one byte on one open connection for `secs`: (p50 us, p99 us).
fn round_trips(
    side: Side,
    port: u16,
    config: &Arc<ClientConfig>,
    secs: f64,
) -> anyhow::Result<(f64, f64)> {
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_nodelay(true)?;
    let mut s: Box<dyn ReadWrite> = match side {
        Side::Plain => Box::new(tcp),
        Side::Tls => Box::new(StreamOwned::new(
            ClientConnection::new(Arc::clone(config), ServerName::try_from("vm.bench")?)?,
            tcp,
        )),
    };
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut lat = Vec::new();
    let mut b = [0u8; 1];
    while Instant::now() < end {
        let t = Instant::now();
        s.write_all(b"x")?;
        s.read_exact(&mut b)?;
        lat.push(t.elapsed());
    }
    lat.sort();
    Ok((pct(&lat, 0.5), pct(&lat, 0.99)))
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: f64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (rounds, secs, clients) = (arg(1, 6.0) as usize, arg(2, 5.0), arg(3, 4.0) as usize);
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let (chain, key) = certificates(&certs)?;
    let app = echo_app()?;
    let (admin, tls, plain) = (free_port()?, free_port()?, free_port()?);
    let config_path = dir.path().join("envoy.yaml");
    std::fs::write(&config_path, envoy_config(&certs, admin, tls, plain, app))?;
    let log = std::fs::File::create(dir.path().join("envoy.log"))?;
    let _envoy = Stop(
        Command::new("envoy")
            .args([
                "-c",
                &config_path.display().to_string(),
                "--concurrency",
                "1",
            ])
            .args(["--disable-hot-restart", "-l", "warning"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("envoy on PATH")?,
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_client_auth_cert(chain, key)?,
    );
    // Envoy is up and has the certificate once a TLS connection echoes.
    let ready = Instant::now() + Duration::from_secs(30);
    while one(Side::Tls, tls, &config).is_err() {
        if Instant::now() > ready {
            let log = std::fs::read_to_string(dir.path().join("envoy.log")).unwrap_or_default();
            let last = one(Side::Tls, tls, &config).err();
            bail!("the TLS listener never answered ({last:?}); Envoy's log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("side  round  conn/s  conn_p50_us  conn_p99_us  rtt_p50_us  rtt_p99_us");
    let mut sums = [[0.0f64; 5]; 2];
    for r in 0..rounds {
        let order = if r % 2 == 0 {
            [Side::Plain, Side::Tls]
        } else {
            [Side::Tls, Side::Plain]
        };
        for side in order {
            let port = if side == Side::Tls { tls } else { plain };
            let (rate, p50, p99) = churn(side, port, &config, secs, clients);
            let (r50, r99) = round_trips(side, port, &config, secs / 2.0)?;
            println!("{side:?}  {r}  {rate:.0}  {p50:.0}  {p99:.0}  {r50:.0}  {r99:.0}");
            let s = &mut sums[usize::from(side == Side::Tls)];
            for (acc, v) in s.iter_mut().zip([rate, p50, p99, r50, r99]) {
                *acc += v / rounds as f64;
            }
        }
    }
    let [p, t] = sums;
    println!(
        "mean plain: {:.0} conn/s, p50 {:.0} us, p99 {:.0} us; rtt p50 {:.0} us, p99 {:.0} us",
        p[0], p[1], p[2], p[3], p[4]
    );
    println!(
        "mean tls:   {:.0} conn/s, p50 {:.0} us, p99 {:.0} us; rtt p50 {:.0} us, p99 {:.0} us",
        t[0], t[1], t[2], t[3], t[4]
    );
    println!(
        "tls/plain: conn/s {:.2}x, conn p50 {:.2}x (+{:.0} us), conn p99 {:.2}x, rtt p50 {:.2}x (+{:.0} us), rtt p99 {:.2}x",
        t[0] / p[0], t[1] / p[1], t[1] - p[1], t[2] / p[2], t[3] / p[3], t[3] - p[3], t[4] / p[4]
    );
    Ok(())
}
