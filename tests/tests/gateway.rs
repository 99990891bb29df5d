//! The east-west gateway end to end, on loopback: the real control plane, the real shim in
//! gateway role (table only, no registration) and a real Envoy running
//! `envoy-configs/eastwest-gateway.yaml` with the built filter. Two TLS backends stand in for
//! a service's sidecars, one in the gateway's network and one in another; clients connect to
//! 15443 with Istio's SNI and must reach the local one with their TLS untouched.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use vmesh_test_support::eventually::eventually;
use vmesh_test_support::process::Proc;
use vmesh_test_support::{free_port, repo_root, TempDir};
use vmesh_tests::support::control_plane::{ControlPlane, CpOptions};
use vmesh_tests::support::envoy::{http_get, wasm, which};
use vmesh_tests::support::mtls;
use vmesh_tests::support::shim::{Shim, ShimOptions};

const SNI: &str = "outbound_.80_._.vmservice.example.com";

/// A TLS echo server with its own self-signed certificate (any certificate: the gateway
/// never looks inside the TLS), on 127.0.0.1.
struct TlsBackend {
    port: u16,
    cert_der: Vec<u8>,
}

impl TlsBackend {
    fn start(name: &str) -> TlsBackend {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("self-signed");
        let cert_der = cert.der().to_vec();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert_der.clone())],
            PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
        )
        .expect("server config");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        // Lives as long as the test process: each test starts its own on a fresh port.
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let config = Arc::clone(&config);
                std::thread::spawn(move || echo_tls(config, tcp));
            }
        });
        TlsBackend { port, cert_der }
    }
}

fn echo_tls(config: Arc<rustls::ServerConfig>, tcp: TcpStream) {
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                    return;
                }
            }
        }
    }
}

struct Gateway {
    // Drop order: Envoy, then its shim.
    envoy: Proc,
    _shim: Shim,
    tls_port: u16,
    cp_port: u16,
    admin: u16,
}

impl Gateway {
    fn stat(&self, name: &str) -> u64 {
        let (_, body) =
            http_get(self.admin, &format!("/stats?filter=^{name}$")).unwrap_or_default();
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// `eastwest-gateway.yaml` on this test's ports, forwarding 15012 to `cp_port`.
fn render_gateway(tls: u16, cp: u16, admin: u16, shim: u16, cp_port: u16) -> String {
    let text = std::fs::read_to_string(repo_root().join("envoy-configs/eastwest-gateway.yaml"))
        .expect("read eastwest-gateway.yaml");
    let mut out = text.replace(
        "target/wasm32-wasip1/release/vmesh_filter.wasm",
        &wasm().display().to_string(),
    );
    let cluster = "address: vmesh-control, port_value: 15012}";
    assert!(out.contains(cluster), "the control-plane cluster moved");
    out = out.replace(
        cluster,
        &format!("address: 127.0.0.1, port_value: {cp_port}}}"),
    );
    out = out.replace("address: 0.0.0.0,", "address: 127.0.0.1,");
    for (from, to) in [(15443, tls), (15012, cp), (15000, admin), (15020, shim)] {
        let needle = format!("port_value: {from}}}");
        assert!(
            out.contains(&needle),
            "eastwest-gateway.yaml has no {needle}"
        );
        out = out.replace(&needle, &format!("port_value: {to}}}"));
    }
    out
}

fn start_gateway(dir: &Path, cp: &ControlPlane, bundle: &Path) -> Gateway {
    let (tls_port, cp_port, admin, shim_port) =
        (free_port(), free_port(), free_port(), free_port());
    let config = dir.join("eastwest-gateway.yaml");
    std::fs::write(
        &config,
        render_gateway(tls_port, cp_port, admin, shim_port, cp.port),
    )
    .expect("write config");
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 198.18.0.53\n").expect("resolv.conf");
    let state: PathBuf = dir.join("gw-state");
    // The gateway's shim reaches the control plane through the gateway's own 15012 only.
    let shim = Shim::spawn(
        dir,
        shim_port,
        &ShimOptions {
            upstreams: vec!["127.0.0.1:9".into()],
            args: [
                "--bundle",
                &bundle.display().to_string(),
                "--role",
                "gateway",
                "--network",
                "network1",
                "--discovery-address",
                &format!("127.0.0.1:{cp_port}"),
                "--state-dir",
                &state.display().to_string(),
                "--resolv-conf",
                &resolv.display().to_string(),
                "--envoy-admin",
                &format!("127.0.0.1:{admin}"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            env: vec![("ISTIO_SVC_IP".into(), "198.18.1.10".into())],
            ..ShimOptions::default()
        },
    );
    let envoy = Proc::spawn(
        "envoy",
        &which("envoy"),
        &[
            "-c".to_string(),
            config.display().to_string(),
            "--concurrency".into(),
            "2".into(),
            "--disable-hot-restart".into(),
            "-l".into(),
            "info".into(),
        ],
        &dir.join("envoy-gateway.log"),
    );
    shim.wait_serving();
    eventually("the gateway's Envoy is live", || {
        match http_get(admin, "/ready") {
            Ok((200, body)) if body.trim() == "LIVE" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    Gateway {
        envoy,
        _shim: shim,
        tls_port,
        cp_port,
        admin,
    }
}

struct Mesh {
    gw: Gateway,
    local: TlsBackend,
    remote: TlsBackend,
    cp: ControlPlane,
    _dir: TempDir,
}

fn mesh() -> Mesh {
    let dir = TempDir::new();
    let cp = ControlPlane::start(dir.path(), CpOptions::default());
    let local = TlsBackend::start("local.backend.test");
    let remote = TlsBackend::start("remote.backend.test");
    cp.apply(
        dir.path(),
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {{name: istio-eastwestgateway, namespace: istio-system}}
spec:
  metadata: {{labels: {{app: istio-eastwestgateway}}}}
  template: {{serviceAccount: istio-eastwestgateway, network: network1}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: vm-workload-svc, namespace: vm-services}}
spec:
  hosts: [vmservice.example.com]
  location: MESH_INTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 9090}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: python-http}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: local, namespace: vm-services}}
spec:
  address: 127.0.0.1
  ports: {{http: {local}}}
  network: network1
  serviceAccount: my-vm
  labels: {{app: python-http}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: remote, namespace: vm-services}}
spec:
  address: 127.0.0.2
  ports: {{http: {remote}}}
  network: network2
  serviceAccount: my-vm
  labels: {{app: python-http}}
"#,
            local = local.port,
            remote = remote.port,
        ),
    );
    let bundle = dir.path().join("gw-bundle");
    cp.bundle("istio-eastwestgateway", "istio-system", &bundle);
    let gw = start_gateway(dir.path(), &cp, &bundle);
    Mesh {
        gw,
        local,
        remote,
        cp,
        _dir: dir,
    }
}

#[test]
fn service_sni_reaches_an_endpoint_in_the_gateway_s_network_with_tls_untouched() {
    let m = mesh();
    // The table arrives through the gateway's own 15012 (the shim knows no other way to the
    // control plane), then every connection goes to the endpoint in network1.
    eventually("the gateway routes the service SNI", || {
        let mut c = mtls::connect_sni(m.gw.tls_port, SNI, None)?;
        c.echo("ping").map(drop)
    });
    for i in 0..8 {
        let mut c =
            mtls::connect_sni(m.gw.tls_port, SNI, None).expect("handshake through the gateway");
        assert_eq!(
            c.server_cert, m.local.cert_der,
            "the client sees the backend's own certificate (TLS passed through), never the other network's"
        );
        assert_ne!(c.server_cert, m.remote.cert_der);
        let line = format!("hello {i}");
        assert_eq!(c.echo(&line).expect("echo"), line);
    }
    assert!(m.gw.stat("wasmcustom.vmesh_gateway_cx_routed") >= 9);
    drop(m.cp);
}

#[test]
fn snis_the_gateway_cannot_place_are_closed_and_counted() {
    let mut m = mesh();
    eventually("the gateway has its table", || {
        mtls::connect_sni(m.gw.tls_port, SNI, None)?
            .echo("ping")
            .map(drop)
    });
    for (sni, stat) in [
        (
            "outbound_.80_._.unknown.example.com",
            "wasmcustom.vmesh_gateway_refused_unknown_service",
        ),
        (
            "outbound_.81_._.vmservice.example.com",
            "wasmcustom.vmesh_gateway_refused_unknown_service",
        ),
        (
            "vmservice.example.com",
            "wasmcustom.vmesh_gateway_refused_unknown_sni",
        ),
    ] {
        let before = m.gw.stat(stat);
        let r = mtls::connect_sni(m.gw.tls_port, sni, None).and_then(|mut c| c.echo("x"));
        assert!(r.is_err(), "{sni}: {r:?}");
        eventually(&format!("{stat} counted"), || {
            let now = m.gw.stat(stat);
            (now > before).then_some(()).ok_or(format!("{now}"))
        });
    }
    assert!(!m.gw.envoy.exited(), "{}", m.gw.envoy.log_text());
}

#[test]
fn the_control_plane_is_reachable_through_15012() {
    let m = mesh();
    // The control plane's root, as the bundle carries it to VMs.
    let root = m._dir.path().join("gw-bundle").join("root-cert.pem");
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(&root)
        .arg(format!("https://127.0.0.1:{}/healthz", m.gw.cp_port))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        m.gw.stat("tcp.control_plane.downstream_cx_total") >= 1,
        "through the gateway's listener"
    );
}
