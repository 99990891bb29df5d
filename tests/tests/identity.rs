//! Workload identity end to end: the real control plane's CA, a real shim started from the
//! VM bundle, a real Envoy with the built filter reading the VM's certificate through SDS, and
//! an echo app behind the inbound mTLS listener. Everything listens on 127.0.0.1.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use vmesh_api::ca::files;
use vmesh_test_support::eventually::eventually;
use vmesh_test_support::TempDir;
use vmesh_tests::support::control_plane::{ControlPlane, CpOptions};
use vmesh_tests::support::echo::Echo;
use vmesh_tests::support::mtls::{self, Identity};
use vmesh_tests::support::vm::{Vm, VmOptions};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const NS: &str = "vm-namespace";
const GROUP: &str = "payments";
const SA: &str = "payments-sa";
const SPIFFE: &str = "spiffe://cluster.local/ns/vm-namespace/sa/payments-sa";

struct Mesh {
    // Drop order: the VM, then the app and the control plane.
    vm: Vm,
    echo: Echo,
    cp: ControlPlane,
    bundle: std::path::PathBuf,
    _dir: TempDir,
}

fn start(shim_args: &[&str]) -> Mesh {
    let dir = TempDir::new();
    let echo = Echo::start();
    let cp = ControlPlane::start(dir.path(), CpOptions::default());
    cp.apply(
        dir.path(),
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata:\n  name: {GROUP}\n  \
             namespace: {NS}\nspec:\n  metadata:\n    labels:\n      app: {GROUP}\n  template:\n    \
             serviceAccount: {SA}\n"
        ),
    );
    let bundle = dir.path().join("bundle");
    cp.bundle(GROUP, NS, &bundle);
    let mut options = VmOptions::new("198.18.9.1", "127.0.0.1:9");
    options.app_port = Some(echo.port);
    options.shim_args = shim_args.iter().map(|s| s.to_string()).collect();
    let vm = Vm::start(dir.path(), &bundle, options);
    Mesh {
        vm,
        echo,
        cp,
        bundle,
        _dir: dir,
    }
}

fn ders(pem_bytes: &[u8]) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem_bytes)
        .filter_map(Result::ok)
        .map(|p| p.contents)
        .collect()
}

/// Serial (lower-case hex, no leading zeros, as Envoy prints it) and URI SANs.
fn serial_and_uris(der: &[u8]) -> (String, Vec<String>) {
    let (_, c) = X509Certificate::from_der(der).expect("a certificate");
    let serial: String = c
        .raw_serial()
        .iter()
        .skip_while(|b| **b == 0)
        .map(|b| format!("{b:02x}"))
        .collect();
    let uris = c
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    (serial, uris)
}

/// The VM's certificate files once the shim wrote them: (chain, key).
fn wait_certificate(vm: &Vm) -> (Vec<u8>, Vec<u8>) {
    eventually("the shim holds a valid certificate", || {
        let s = vm.status()?;
        match s["certificate"]["state"].as_str() {
            Some("valid") => Ok(()),
            _ => Err(format!("{}", s["certificate"])),
        }
    });
    let dir = vm.cert_dir();
    (
        std::fs::read(dir.join(files::CERT_CHAIN)).expect("cert-chain.pem"),
        std::fs::read(dir.join(files::KEY)).expect("key.pem"),
    )
}

/// The serial of the `default` certificate Envoy holds (admin `/certs`).
fn envoy_serial(vm: &mut Vm) -> Result<(String, String), String> {
    let (_, body) = vm.envoy().admin_get("/certs")?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    for c in v["certificates"].as_array().into_iter().flatten() {
        for leaf in c["cert_chain"].as_array().into_iter().flatten() {
            let uri = leaf["subject_alt_names"][0]["uri"]
                .as_str()
                .unwrap_or_default();
            if let Some(serial) = leaf["serial_number"].as_str() {
                return Ok((serial.to_string(), uri.to_string()));
            }
        }
    }
    Err(format!("no certificate chain in {body}"))
}

/// A certificate for the same identity from a CA nobody in the mesh trusts.
fn foreign_identity() -> Identity {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(SPIFFE).expect("uri"),
    )];
    let cert = leaf.signed_by(&key, &issuer).expect("sign");
    Identity {
        chain_pem: cert.pem().into_bytes(),
        key_pem: key.serialize_pem().into_bytes(),
    }
}

fn verify_chain(chain: &[Vec<u8>], root_pem_path: &Path) {
    let roots = ders(&std::fs::read(root_pem_path).expect("bundle root"));
    let root_der = roots.first().expect("a root in the bundle");
    let (_, root) = X509Certificate::from_der(root_der).expect("root");
    let certs: Vec<X509Certificate> = chain
        .iter()
        .map(|d| X509Certificate::from_der(d).expect("cert").1)
        .collect();
    for (i, c) in certs.iter().enumerate() {
        let issuer = certs.get(i + 1).unwrap_or(&root);
        c.verify_signature(Some(issuer.public_key()))
            .unwrap_or_else(|e| panic!("certificate {i} is not signed by the next: {e}"));
    }
}

#[test]
fn a_vm_gets_a_certificate_for_its_token_identity_and_envoy_serves_it_on_15006() {
    let mut m = start(&[]);
    let (chain_pem, key_pem) = wait_certificate(&m.vm);
    let chain = ders(&chain_pem);
    let (serial, uris) = serial_and_uris(chain.first().expect("a leaf"));
    assert_eq!(
        uris,
        vec![SPIFFE.to_string()],
        "the only URI SAN is the token's identity"
    );
    verify_chain(&chain, &m.bundle.join(files::ROOT_CERT));
    let key_mode = std::fs::metadata(m.vm.cert_dir().join(files::KEY))
        .expect("key.pem")
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    // The root Envoy verifies peers against is the bundle's.
    assert_eq!(
        ders(&std::fs::read(m.vm.cert_dir().join(files::ROOT_CERT)).expect("root")),
        ders(&std::fs::read(m.bundle.join(files::ROOT_CERT)).expect("bundle root"))
    );
    eventually(
        "Envoy's /certs shows the VM's certificate",
        || match envoy_serial(&mut m.vm)? {
            (s, uri) if s == serial && uri == SPIFFE => Ok(()),
            other => Err(format!("{other:?}, want {serial}")),
        },
    );
    let issued =
        m.cp.cli(&["get", "certificates"])
            .expect("get certificates");
    assert!(issued.contains(SPIFFE), "{issued}");

    // A mesh certificate (the VM's own) reaches the app through 15006, and Envoy presents
    // the VM's certificate.
    let mesh = Identity {
        chain_pem: chain_pem.clone(),
        key_pem,
    };
    let mut conn = mtls::connect(m.vm.ports.inbound, Some(&mesh)).expect("mTLS handshake");
    assert_eq!(conn.echo("ping\n").expect("echo"), "ping\n");
    assert_eq!(Some(&conn.server_cert), chain.first());
    assert_eq!(m.echo.bytes(), 5);

    // Without a client certificate, or with one from another root: refused, and not a byte
    // reaches the app. (Envoy's tcp_proxy may already have connected to the app while the
    // handshake was under way; the app then sees a connection close without data.)
    let refused = |c: Result<mtls::Conn, String>| match c {
        Err(_) => (),
        Ok(mut c) => assert!(c.echo("ping\n").is_err(), "the handshake must be refused"),
    };
    refused(mtls::connect(m.vm.ports.inbound, None));
    refused(mtls::connect(m.vm.ports.inbound, Some(&foreign_identity())));
    assert_eq!(m.echo.bytes(), 5);

    eventually("the shim counts accepted and refused handshakes", || {
        let s = m.vm.status()?;
        let c = &s["dataPlane"]["counters"];
        match (
            c["inboundTlsAccepted"].as_u64(),
            c["inboundTlsRefused"].as_u64(),
        ) {
            (Some(1), Some(2)) => Ok(()),
            _ => Err(format!("{c}")),
        }
    });
    let (_, metrics) = m.vm.shim().get("/metrics").expect("metrics");
    assert!(
        metrics.contains("vmesh_shim_cert_expiry_timestamp_seconds"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vmesh_data_plane_inbound_tls_refused_total 2"),
        "{metrics}"
    );
}

#[test]
fn a_short_lived_certificate_rotates_in_place_and_open_connections_survive() {
    // 8 s certificates: the shim renews every 4 s or so.
    let mut m = start(&["--cert-ttl", "8s"]);
    let (chain_pem, key_pem) = wait_certificate(&m.vm);
    let first = serial_and_uris(ders(&chain_pem).first().expect("leaf")).0;
    let mesh = Identity { chain_pem, key_pem };
    eventually(
        "Envoy serves the first certificate",
        || match envoy_serial(&mut m.vm)? {
            (s, _) if s == first => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let mut open = mtls::connect(m.vm.ports.inbound, Some(&mesh)).expect("mTLS handshake");
    assert_eq!(open.echo("before\n").expect("echo"), "before\n");

    let rotated = eventually(
        "Envoy serves a renewed certificate",
        || match envoy_serial(&mut m.vm)? {
            (s, uri) if s != first && uri == SPIFFE => Ok(s),
            other => Err(format!("{other:?}")),
        },
    );
    // Same Envoy, same connection: it carries on.
    assert!(m.vm.envoy().is_running());
    assert_eq!(
        open.echo("after\n").expect("echo after the rotation"),
        "after\n"
    );
    // New handshakes get a renewed certificate (the shim may have renewed again since).
    // The client shows the VM's current certificate: the first may have expired by now.
    let presented = eventually("a new connection sees a renewed certificate", || {
        let dir = m.vm.cert_dir();
        let current = Identity {
            chain_pem: std::fs::read(dir.join(files::CERT_CHAIN)).map_err(|e| e.to_string())?,
            key_pem: std::fs::read(dir.join(files::KEY)).map_err(|e| e.to_string())?,
        };
        let mut fresh = mtls::connect(m.vm.ports.inbound, Some(&current))?;
        fresh.echo("fresh\n")?;
        Ok(serial_and_uris(&fresh.server_cert).0)
    });
    assert_ne!(presented, first, "rotated to {rotated}");
    let status = m.vm.status().expect("status");
    assert!(
        status["certificate"]["issued"].as_u64() >= Some(2),
        "{status}"
    );
    assert_eq!(
        status["certificate"]["failures"].as_u64(),
        Some(0),
        "{status}"
    );
}
