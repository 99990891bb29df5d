//! Shared test support: an in-process server on 127.0.0.1:0 in a temp dir, clients for the
//! admin and for VMs, the Istio doc fixtures. Waiting and temp dirs are `vmesh-test-support`'s.
#![allow(dead_code)]

pub mod release;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use vmesh_control::api::ApplyRequest;
use vmesh_control::client::{Client, ClientError};
use vmesh_control::clock::{Clock, ManualClock, SystemClock};
use vmesh_control::config::parse_documents;
use vmesh_control::registry::Settings;
use vmesh_control::server::{start, Running, ServeConfig, StoreConfig};
use vmesh_test_support::eventually::patience;
use vmesh_test_support::TempDir;

pub const T0: u64 = 1_700_000_000_000_000_000;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn istio_vm_yaml() -> String {
    std::fs::read_to_string(fixture("istio-vm.yaml")).unwrap()
}

pub struct TestServer {
    pub running: Option<Running>,
    pub dir: TempDir,
    pub admin: Client,
    pub url: String,
    pub clock: Arc<dyn Clock>,
}

pub struct Options {
    pub manual_clock: Option<Arc<ManualClock>>,
    pub settings: Settings,
    pub jwks: Vec<(String, PathBuf)>,
    pub store: StoreConfig,
    pub gateways: std::collections::BTreeMap<String, Vec<vmesh_api::names::Gateway>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            manual_clock: None,
            settings: Settings {
                replica: "replica-a".into(),
                ..Settings::default()
            },
            jwks: vec![],
            store: StoreConfig::Embedded,
            gateways: Default::default(),
        }
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::with(Options::default()).await
    }

    pub async fn with(o: Options) -> TestServer {
        Self::in_dir(o, TempDir::new()).await
    }

    /// Stops this server and starts a new one on the same data dir.
    pub async fn restart(mut self, o: Options) -> TestServer {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        Self::in_dir(o, self.dir).await
    }

    pub async fn in_dir(o: Options, dir: TempDir) -> TestServer {
        let clock: Arc<dyn Clock> = match o.manual_clock {
            Some(c) => c,
            None => Arc::new(SystemClock),
        };
        let cfg = ServeConfig {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            sans: vec!["localhost".into(), "127.0.0.1".into()],
            issuer: "https://vmesh-control.test".into(),
            jwks: o.jwks,
            domain: "cluster.local".into(),
            settings: o.settings,
            tick: None,
            coalesce: Duration::from_millis(5),
            shutdown_grace: Duration::from_secs(10),
            hygiene: Default::default(),
            cert_lifetime: Duration::from_secs(90 * 24 * 3600),
            ca: Default::default(),
            store: o.store,
            gateways: o.gateways,
        };
        let running = start(cfg, clock.clone()).await.unwrap();
        let url = format!("https://{}", running.addr);
        let admin =
            Client::new(&url, running.root_cert_pem.as_bytes(), &running.admin_token).unwrap();
        TestServer {
            running: Some(running),
            dir,
            admin,
            url,
            clock,
        }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub async fn apply_yaml(&self, yaml: &str) -> Result<serde_json::Value, ClientError> {
        let documents = parse_documents("test.yaml", yaml).unwrap();
        self.admin
            .json(
                Method::POST,
                "/v1/admin/apply",
                Some(&ApplyRequest {
                    documents,
                    namespace: "default".into(),
                }),
            )
            .await
    }

    pub async fn token(&self, ns: &str, sa: &str) -> String {
        self.admin
            .mint_token(ns, sa, Duration::from_secs(3600))
            .await
            .unwrap()
            .token
    }

    pub async fn vm(&self, ns: &str, sa: &str) -> Client {
        self.admin.with_token(&self.token(ns, sa).await)
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }
}

/// The status code of a failed call.
pub fn status_of<T: std::fmt::Debug>(
    r: Result<T, ClientError>,
) -> (u16, vmesh_control::api::ApiError) {
    match r {
        Err(ClientError::Api { status, error }) => (status, error),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Waits until a `vmesh-control serve` process using `dir` answers `/healthz` at `url`, and
/// returns an admin client for it.
pub async fn wait_for_server(dir: &std::path::Path, url: &str) -> Client {
    let deadline = std::time::Instant::now() + patience();
    loop {
        if let (Ok(root), Ok(tok)) = (
            std::fs::read(dir.join("root-cert.pem")),
            std::fs::read_to_string(dir.join("admin-token")),
        ) {
            if let Ok(c) = Client::new(url, &root, tok.trim()) {
                if c.call(Method::GET, "/healthz", None).await.is_ok() {
                    return c;
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "server did not come up"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A JWT signed RS256 by the test cluster's service-account key (`fixtures/cluster-sa-signer.pk8`,
/// whose public half is `fixtures/cluster-jwks.json`), with any header and claims.
pub fn rs256(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    let der = std::fs::read(fixture("cluster-sa-signer.pk8")).unwrap();
    let key = ring::signature::RsaKeyPair::from_pkcs8(&der).unwrap();
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let mut sig = vec![0u8; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .unwrap();
    format!("{input}.{}", B64.encode(sig))
}
