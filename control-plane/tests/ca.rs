//! The workload CA, black-box against the release binary: `CreateCertificate` called as
//! Istio's agent calls it (HTTP/2 over TLS, the service path, `authorization: Bearer`, the
//! `ClusterID` header, a prost-encoded request carrying a P-256 CSR with the SPIFFE URI SAN).
//! Chains are checked with `openssl verify`, a verifier that is not ours.
//!
//! The binary is `target/release/vmesh-control` (`VMESH_CONTROL_BIN` tests another one).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::Method;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use serde_json::{json, Value};
use vmesh_api::ca::{status, IssuedList, IstioCertificateRequest, PATH};
use vmesh_control::client::{Client, GrpcConnection};
use vmesh_test_support::process::Proc;
use vmesh_test_support::{free_port, TempDir};
use x509_parser::extensions::GeneralName;

use common::release::release_binary;
use common::{fixture, istio_vm_yaml, rs256, wait_for_server};

const CLUSTER_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// `vmesh-control serve` on a free port with `extra` flags, and an admin client once it is up.
struct Control {
    proc: Proc,
    url: String,
    data: PathBuf,
    admin: Client,
}

impl Control {
    async fn start(data: &Path, extra: &[&str]) -> Control {
        let port = free_port();
        let mut args = vec![
            "serve".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            data.display().to_string(),
            "--jwks".into(),
            format!(
                "{CLUSTER_ISSUER}={}",
                fixture("cluster-jwks.json").display()
            ),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = data.with_extension(format!("{port}.log"));
        let proc = Proc::spawn("vmesh-control", &release_binary(), &args, &log);
        let url = format!("https://127.0.0.1:{port}");
        let admin = wait_for_server(data, &url).await;
        Control {
            proc,
            url,
            data: data.to_path_buf(),
            admin,
        }
    }

    /// The CLI against this server (`get certificates`, `vm-bundle`).
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(release_binary())
            .args(args)
            .args(["--data-dir", &self.data.display().to_string()])
            .args(["--server", &self.url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    async fn grpc(&self, token: &str) -> GrpcConnection {
        self.admin.with_token(token).connect_grpc().await.unwrap()
    }

    async fn token(&self, ns: &str, sa: &str) -> String {
        self.admin
            .mint_token(ns, sa, Duration::from_secs(3600))
            .await
            .unwrap()
            .token
    }

    async fn metrics(&self) -> String {
        let r = self
            .admin
            .call(Method::GET, "/metrics", None)
            .await
            .unwrap();
        String::from_utf8(r.body.to_vec()).unwrap()
    }

    async fn issued(&self) -> IssuedList {
        self.admin
            .json(Method::GET, "/v1/admin/certificates", None::<&()>)
            .await
            .unwrap()
    }
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.to_string().try_into().unwrap())
}

/// A CSR as Istio's agent makes one: empty subject, the SPIFFE URI as the only SAN.
fn csr(key: &KeyPair, sans: Vec<SanType>) -> String {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p.serialize_request(key).unwrap().pem().unwrap()
}

fn request(csr: String, ttl: i64) -> IstioCertificateRequest {
    IstioCertificateRequest {
        csr,
        validity_duration: ttl,
        metadata: None,
    }
}

fn der(pem: &str) -> Vec<u8> {
    ::pem::parse(pem).unwrap().into_contents()
}

/// The leaf's URI SANs and its lifetime in seconds.
fn leaf_facts(pem: &str) -> (Vec<String>, i64) {
    let d = der(pem);
    let (_, x) = x509_parser::parse_x509_certificate(&d).unwrap();
    let uris = x
        .subject_alternative_name()
        .unwrap()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::URI(u) => u.to_string(),
                    other => format!("not a URI: {other}"),
                })
                .collect()
        })
        .unwrap_or_default();
    let life = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
    (uris, life)
}

/// `openssl verify` of `chain` (leaf first, root last) against `root_file`, the
/// intermediates as untrusted, for TLS client and server use.
fn openssl_verify(chain: &[String], root_file: &Path, dir: &TempDir) -> Result<(), String> {
    let leaf = dir.file("leaf.pem", &chain[0]);
    let middle = chain[1..chain.len() - 1].concat();
    let untrusted = (!middle.is_empty()).then(|| dir.file("untrusted.pem", &middle));
    for purpose in ["sslclient", "sslserver"] {
        let mut cmd = Command::new("openssl");
        cmd.arg("verify").arg("-CAfile").arg(root_file);
        if let Some(u) = &untrusted {
            cmd.arg("-untrusted").arg(u);
        }
        let out = cmd
            .arg("-purpose")
            .arg(purpose)
            .arg(&leaf)
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token as a cluster's `kubectl create token SA --audience istio-ca` makes it.
fn cluster_token(ns: &str, sa: &str, exp: u64) -> String {
    let jwks: Value =
        serde_json::from_slice(&std::fs::read(fixture("cluster-jwks.json")).unwrap()).unwrap();
    let now = now_secs();
    rs256(
        &json!({"alg": "RS256", "kid": jwks["keys"][0]["kid"]}),
        &json!({
            "aud": ["istio-ca"], "exp": exp, "iat": now - 600, "nbf": now - 600,
            "iss": CLUSTER_ISSUER, "jti": "b7f1c0de-0000-4000-8000-000000000001",
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "1"}},
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_bundles_token_gets_a_chain_to_the_bundles_root_naming_only_its_identity() {
    let dir = TempDir::new();
    let data = dir.path().join("data");
    let c = Control::start(&data, &[]).await;
    c.admin
        .apply(
            vmesh_control::config::parse_documents("istio-vm.yaml", &istio_vm_yaml()).unwrap(),
            "default",
        )
        .await
        .unwrap();
    let bundle = dir.path().join("bundle");
    c.cli(&[
        "vm-bundle",
        "--group",
        "python-http",
        "-n",
        "vm-namespace",
        "-o",
        &bundle.display().to_string(),
    ]);
    let token = std::fs::read_to_string(bundle.join("istio-token")).unwrap();
    let spiffe = "spiffe://cluster.local/ns/vm-namespace/sa/vm-sa";
    let key = KeyPair::generate().unwrap();
    let chain = c
        .grpc(token.trim())
        .await
        .create_certificate(&request(csr(&key, vec![uri(spiffe)]), 3600), "Kubernetes")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(chain.len(), 2, "leaf and root: {chain:?}");
    let root = std::fs::read_to_string(bundle.join("root-cert.pem")).unwrap();
    assert_eq!(
        der(&chain[1]),
        der(&root),
        "the chain ends in the bundle's root"
    );
    let (uris, life) = leaf_facts(&chain[0]);
    assert_eq!(uris, vec![spiffe.to_string()]);
    assert_eq!(life, 3600 + 300, "as asked, plus the backdating");
    openssl_verify(&chain, &bundle.join("root-cert.pem"), &dir).unwrap();

    // A CSR without any SAN gets the same identity (the token decides it).
    let chain = c
        .grpc(token.trim())
        .await
        .create_certificate(&request(csr(&key, vec![]), 0), "")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(leaf_facts(&chain[0]).0, vec![spiffe.to_string()]);
    // An RSA-2048 key, as Istio's agent sends with its default (non-ECC) settings.
    let rsa = rsa_key(&dir);
    let chain = c
        .grpc(token.trim())
        .await
        .create_certificate(&request(csr(&rsa, vec![uri(spiffe)]), 0), "")
        .await
        .unwrap()
        .unwrap();
    openssl_verify(&chain, &bundle.join("root-cert.pem"), &dir).unwrap();

    let listed = c.cli(&["get", "certificates", "-o", "json"]);
    let listed: IssuedList = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.items.len(), 3);
    assert_eq!(listed.items[2].spiffe_id, spiffe);
    assert_eq!(listed.items[2].cluster_id, "Kubernetes");
    assert_eq!(listed.items[2].peer, "127.0.0.1");
    let table = c.cli(&["get", "certificates"]);
    assert!(table.starts_with("SERIAL"), "{table}");
    assert!(table.contains(spiffe), "{table}");
    let m = c.metrics().await;
    assert!(m.contains("vmesh_certificates_issued_total 3"), "{m}");
}

/// An RSA-2048 key made by openssl (ring cannot generate RSA keys).
fn rsa_key(dir: &TempDir) -> KeyPair {
    let path = dir.path().join("rsa.pem");
    let ok = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&path)
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok);
    KeyPair::from_pem(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_identities_bad_tokens_and_garbage_are_refused_and_nothing_is_issued() {
    let dir = TempDir::new();
    let c = Control::start(&dir.path().join("data"), &[]).await;
    let key = KeyPair::generate().unwrap();
    let mine = "spiffe://cluster.local/ns/vm/sa/app";
    let tok = c.token("vm", "app").await;
    let other_ns = c.token("other", "app").await;
    let expired = cluster_token("vm", "app", now_secs() - 120);

    let cases: Vec<(&str, String, IstioCertificateRequest, u32, &str)> = vec![
        (
            "a CSR for another identity",
            tok.clone(),
            request(
                csr(&key, vec![uri("spiffe://cluster.local/ns/vm/sa/admin")]),
                0,
            ),
            status::INVALID_ARGUMENT,
            "may only have spiffe://cluster.local/ns/vm/sa/app",
        ),
        (
            "a CSR that adds a DNS name",
            tok.clone(),
            request(
                csr(
                    &key,
                    vec![
                        uri(mine),
                        SanType::DnsName("db.prod.svc".try_into().unwrap()),
                    ],
                ),
                0,
            ),
            status::INVALID_ARGUMENT,
            "DNS:db.prod.svc",
        ),
        (
            "a token of another namespace than the CSR asks",
            other_ns,
            request(csr(&key, vec![uri(mine)]), 0),
            status::INVALID_ARGUMENT,
            "spiffe://cluster.local/ns/other/sa/app",
        ),
        (
            "an expired token",
            expired,
            request(csr(&key, vec![uri(mine)]), 0),
            status::UNAUTHENTICATED,
            "expired",
        ),
        (
            "no token",
            String::new(),
            request(csr(&key, vec![uri(mine)]), 0),
            status::UNAUTHENTICATED,
            "no bearer token",
        ),
        (
            "the admin credential",
            std::fs::read_to_string(c.data.join("admin-token"))
                .unwrap()
                .trim()
                .to_string(),
            request(csr(&key, vec![uri(mine)]), 0),
            status::PERMISSION_DENIED,
            "service-account token",
        ),
        (
            "a garbage CSR",
            tok.clone(),
            request(
                "-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n".into(),
                0,
            ),
            status::INVALID_ARGUMENT,
            "CSR",
        ),
        (
            "a P-384 key",
            tok.clone(),
            request(
                csr(
                    &KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
                    vec![uri(mine)],
                ),
                0,
            ),
            status::INVALID_ARGUMENT,
            "P-256",
        ),
    ];
    for (what, token, req, code, says) in &cases {
        let r = c
            .grpc(token)
            .await
            .create_certificate(req, "Kubernetes")
            .await
            .unwrap();
        let (got, message) = r.expect_err(what);
        assert_eq!(got, *code, "{what}: {message}");
        assert!(message.contains(says), "{what}: {message:?}");
    }

    // Bytes that are not what a gRPC client sends.
    let mut conn = c.grpc(&tok).await;
    let framed = |m: &[u8]| {
        let mut v = vec![];
        vmesh_api::forward::frame(m, &mut v);
        Bytes::from(v)
    };
    let raw: Vec<(&str, Bytes, u32)> = vec![
        (
            "garbage protobuf",
            framed(&[0xff, 0xff, 0xff, 0xff, 0x0f]),
            status::INVALID_ARGUMENT,
        ),
        (
            "a truncated frame",
            Bytes::from_static(&[0, 0, 0, 1, 0, 1]),
            status::INVALID_ARGUMENT,
        ),
        ("no message", Bytes::new(), status::INVALID_ARGUMENT),
        (
            "a compressed message",
            Bytes::from_static(&[1, 0, 0, 0, 0]),
            status::UNIMPLEMENTED,
        ),
        (
            "an oversized message",
            framed(&vec![b'a'; 100 << 10]),
            status::RESOURCE_EXHAUSTED,
        ),
    ];
    for (what, body, code) in raw {
        let r = conn.unary(PATH, &[], body).await.unwrap();
        assert_eq!(r.http_status, 200, "{what}");
        assert_eq!(r.grpc_status, Some(code), "{what}: {}", r.grpc_message);
        assert!(r.body.is_empty(), "{what}");
    }
    // Not gRPC at all: gRPC's rule is 415 without a gRPC status.
    let r = c
        .admin
        .with_token(&tok)
        .call(Method::POST, PATH, Some(b"{}".to_vec()))
        .await;
    assert!(
        matches!(
            r,
            Err(vmesh_control::client::ClientError::Api { status: 415, .. })
        ),
        "{r:?}"
    );

    assert!(c.issued().await.items.is_empty(), "nothing issued");
    let m = c.metrics().await;
    for line in [
        "vmesh_certificates_issued_total 0",
        "vmesh_certificates_refused_total{reason=\"foreign_identity\"} 3",
        "vmesh_certificates_refused_total{reason=\"unauthenticated\"} 2",
        "vmesh_certificates_refused_total{reason=\"not_a_workload\"} 1",
        "vmesh_certificates_refused_total{reason=\"bad_csr\"} 1",
        "vmesh_certificates_refused_total{reason=\"key_type\"} 1",
        "vmesh_certificates_refused_total{reason=\"bad_message\"} 3",
        "vmesh_certificates_refused_total{reason=\"compressed\"} 1",
        "vmesh_certificates_refused_total{reason=\"oversized\"} 1",
    ] {
        assert!(m.contains(line), "{line} in\n{m}");
    }
    // Still serving after all that.
    let ok = c
        .grpc(&tok)
        .await
        .create_certificate(&request(csr(&key, vec![uri(mine)]), 0), "")
        .await
        .unwrap();
    assert!(ok.is_ok(), "{ok:?}");
    assert!(c.proc.log_text().find("panicked").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lifetime_is_what_was_asked_bounded_by_the_maximum() {
    let dir = TempDir::new();
    let c = Control::start(&dir.path().join("data"), &["--max-workload-cert-ttl", "2h"]).await;
    let tok = c.token("vm", "app").await;
    let key = KeyPair::generate().unwrap();
    for (asked, life) in [(600, 600), (48 * 3600, 7200), (0, 7200), (-1, 7200)] {
        let chain = c
            .grpc(&tok)
            .await
            .create_certificate(&request(csr(&key, vec![]), asked), "")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(leaf_facts(&chain[0]).1, life + 300, "asked {asked}");
    }
}

/// A root and an intermediate as an organisation (or Istio's `tools/certs` Makefile) makes
/// them with openssl, in Istio's `cacerts` layout; the intermediate's key is PKCS#1, as in
/// Istio's samples.
fn istio_cacerts(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let sh = r#"set -e
openssl req -x509 -newkey rsa:2048 -nodes -keyout root-key.pem -out root-cert.pem -days 3650 \
  -subj "/O=Istio/CN=Root CA" -addext basicConstraints=critical,CA:TRUE \
  -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl genrsa -traditional -out ca-key.pem 2048 2>/dev/null
openssl req -new -key ca-key.pem -out ca.csr -subj "/O=Istio/CN=Intermediate CA/L=cluster1"
printf 'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash\n' > ext.cnf
openssl x509 -req -in ca.csr -CA root-cert.pem -CAkey root-key.pem -CAcreateserial \
  -out ca-cert.pem -days 730 -extfile ext.cnf 2>/dev/null
cat ca-cert.pem root-cert.pem > cert-chain.pem
"#;
    let out = Command::new("sh")
        .args(["-c", sh])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read_to_string(dir.join("ca-key.pem"))
        .unwrap()
        .starts_with("-----BEGIN RSA PRIVATE KEY-----"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_with_istios_cacerts_every_certificate_chains_to_that_root() {
    let dir = TempDir::new();
    let data = dir.path().join("data");
    let cacerts = dir.path().join("cacerts");
    istio_cacerts(&cacerts);
    let root_file = cacerts.join("root-cert.pem");
    // First with its own root, then restarted on the plugged-in CA.
    let mut c = Control::start(&data, &[]).await;
    c.proc.kill();
    let c = Control::start(&data, &["--cacerts", &cacerts.display().to_string()]).await;
    // The CLI trusts the data dir's root-cert.pem, which is now Istio's root: the serving
    // certificate chains to it too (wait_for_server connected with it).
    assert_eq!(
        der(&std::fs::read_to_string(data.join("root-cert.pem")).unwrap()),
        der(&std::fs::read_to_string(&root_file).unwrap())
    );
    let tok = c.token("vm", "app").await;
    let key = KeyPair::generate().unwrap();
    let chain = c
        .grpc(&tok)
        .await
        .create_certificate(&request(csr(&key, vec![]), 0), "")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(chain.len(), 3, "leaf, Istio's intermediate, Istio's root");
    assert_eq!(
        der(&chain[1]),
        der(&std::fs::read_to_string(cacerts.join("ca-cert.pem")).unwrap())
    );
    assert_eq!(
        der(&chain[2]),
        der(&std::fs::read_to_string(&root_file).unwrap())
    );
    openssl_verify(&chain, &root_file, &dir).unwrap();
    // Chained without the intermediate it is not trusted: the intermediate really signs.
    let direct = vec![chain[0].clone(), chain[2].clone()];
    assert!(openssl_verify(&direct, &root_file, &dir).is_err());
    let mut c = c;
    c.proc.kill();

    // Started again without the flags, the data dir's root and key disagree: said at once.
    let out = Command::new(release_binary())
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--data-dir", &data.display().to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ca-cert"), "{err}");
}

#[test]
fn a_ca_that_cannot_sign_is_reported_before_the_port_is_bound() {
    let dir = TempDir::new();
    let cacerts = dir.path().join("cacerts");
    istio_cacerts(&cacerts);
    let port = free_port();
    let serve = |extra: &[&str]| {
        let out = Command::new(release_binary())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--data-dir", &dir.path().join("data").display().to_string()])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let p = |n: &str| cacerts.join(n).display().to_string();
    // The root's key with the intermediate's certificate.
    let e = serve(&[
        "--ca-cert",
        &p("ca-cert.pem"),
        "--ca-key",
        &p("root-key.pem"),
    ]);
    assert!(e.contains("is not the private key's"), "{e}");
    // A leaf is no CA.
    let leaf_dir = TempDir::new();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["x.example".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert = leaf_dir.file("leaf.pem", &leaf.pem());
    let k = leaf_dir.file("leaf-key.pem", &key.serialize_pem());
    let e = serve(&[
        "--ca-cert",
        &cert.display().to_string(),
        "--ca-key",
        &k.display().to_string(),
    ]);
    assert!(e.contains("not a CA certificate"), "{e}");
    // An intermediate without its root.
    let e = serve(&["--ca-cert", &p("ca-cert.pem"), "--ca-key", &p("ca-key.pem")]);
    assert!(e.contains("no root given"), "{e}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens"
    );
}

/// tonic, a stock gRPC stack (its own HTTP/2 client, framing, trailers and TLS), calls the CA
/// as Istio's Go agent would with grpc-go: the answer and the refusals arrive as gRPC
/// statuses any gRPC client understands, not only our hand-framed client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_grpc_client_gets_a_certificate_and_grpc_statuses() {
    use tonic::codegen::http::uri::PathAndQuery;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    use vmesh_api::ca::IstioCertificateResponse;

    let dir = TempDir::new();
    let data = dir.path().join("data");
    let c = Control::start(&data, &[]).await;
    let token = c.token("vm-namespace", "vm-sa").await;
    let root = std::fs::read_to_string(data.join("root-cert.pem")).unwrap();
    let channel = Channel::from_shared(c.url.clone())
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&root)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let grpc = tonic::client::Grpc::new(channel);
    let call = |req: IstioCertificateRequest, bearer: Option<String>| {
        let mut grpc = grpc.clone();
        async move {
            grpc.ready().await.unwrap();
            let mut req = tonic::Request::new(req);
            if let Some(t) = bearer {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            req.metadata_mut()
                .insert("clusterid", "Kubernetes".parse().unwrap());
            grpc.unary::<_, IstioCertificateResponse, _>(
                req,
                PathAndQuery::from_static(PATH),
                tonic_prost::ProstCodec::default(),
            )
            .await
        }
    };

    let spiffe = "spiffe://cluster.local/ns/vm-namespace/sa/vm-sa";
    let key = KeyPair::generate().unwrap();
    let ok = call(
        request(csr(&key, vec![uri(spiffe)]), 3600),
        Some(token.clone()),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(ok.cert_chain.len(), 2, "leaf and root: {:?}", ok.cert_chain);
    assert_eq!(leaf_facts(&ok.cert_chain[0]).0, vec![spiffe.to_string()]);
    openssl_verify(&ok.cert_chain, &data.join("root-cert.pem"), &dir).unwrap();

    let foreign = "spiffe://cluster.local/ns/vm-namespace/sa/other";
    let refused = call(request(csr(&key, vec![uri(foreign)]), 3600), Some(token))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains(foreign), "{refused:?}");

    let anonymous = call(request(csr(&key, vec![uri(spiffe)]), 3600), None)
        .await
        .unwrap_err();
    assert_eq!(
        anonymous.code(),
        tonic::Code::Unauthenticated,
        "{anonymous:?}"
    );
    assert_eq!(
        c.issued().await.items.len(),
        1,
        "only the first call issued"
    );
}
