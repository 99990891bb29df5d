//! Starting `vmesh-control serve`: everything is loaded and checked (data dir, CA, serving
//! certificate, admin credential, signing key, trusted JWKS, store) before the port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::App;
use crate::cache::Cache;
use crate::clock::Clock;
use crate::identity::{KeyError, Signer, Verifier};
use crate::metrics::Metrics;
use crate::registry::{Registry, Settings};
use crate::store::redb::RedbStore;
use crate::store::StoreError;
use crate::tables::{self, NameTables};
use crate::tls::{write_private, Ca, TlsError};

pub const ADMIN_TOKEN_FILE: &str = "admin-token";
pub const SIGNING_KEY_FILE: &str = "token-signing-key.pem";
pub const STORE_FILE: &str = "store.redb";

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Names and IPs in the serving certificate.
    pub sans: Vec<String>,
    /// `iss` of the tokens this control plane mints.
    pub issuer: String,
    /// Other trusted issuers: (issuer, JWKS file).
    pub jwks: Vec<(String, PathBuf)>,
    pub domain: String,
    pub settings: Settings,
    /// How often [`Registry::tick`] runs; `None` leaves it to the caller (tests).
    pub tick: Option<Duration>,
    /// How long table rebuilds wait to coalesce a burst of changes.
    pub coalesce: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{path}: {source}")]
    Key { path: String, source: KeyError },
    #[error("JWKS file {path}: {source}")]
    JwksRead {
        path: String,
        source: std::io::Error,
    },
    #[error("store {path}: {source}")]
    Store { path: String, source: StoreError },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub registry: Arc<Registry<RedbStore>>,
    pub store: Arc<RedbStore>,
    pub tables: Arc<NameTables>,
    pub metrics: Arc<Metrics>,
    pub admin_token: String,
    pub root_cert_pem: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, releases the lease, and waits for the accept loop to end.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
        for b in &self.background {
            b.abort();
        }
        self.registry.shutdown().await;
        self.store.close().await;
    }

    /// Resolves when the accept loop ends (a signal, or [`Running::stop`]).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

fn dir_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServeError + '_ {
    move |source| ServeError::DataDir {
        path: path.display().to_string(),
        source,
    }
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn admin_token(dir: &Path) -> Result<String, ServeError> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        _ => {
            let t = format!("vmesh-admin-{}", random_hex(32));
            write_private(&path, format!("{t}\n").as_bytes()).map_err(dir_err(&path))?;
            Ok(t)
        }
    }
}

fn signer(dir: &Path, issuer: &str) -> Result<Signer, ServeError> {
    let path = dir.join(SIGNING_KEY_FILE);
    let key_err = |source| ServeError::Key {
        path: path.display().to_string(),
        source,
    };
    let der = if path.exists() {
        let pem = std::fs::read(&path).map_err(dir_err(&path))?;
        PrivatePkcs8KeyDer::from_pem_slice(&pem)
            .map_err(|_| key_err(KeyError::Signing("not a PKCS#8 PEM key".into())))?
            .secret_pkcs8_der()
            .to_vec()
    } else {
        let der = Signer::generate_pkcs8().map_err(key_err)?;
        let pem = pem_encode("PRIVATE KEY", &der);
        write_private(&path, pem.as_bytes()).map_err(dir_err(&path))?;
        der
    };
    Signer::from_pkcs8(&der, issuer).map_err(key_err)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Loads everything, binds, and serves until [`Running::stop`] or `shutdown` resolves.
pub async fn start(
    cfg: ServeConfig,
    clock: Arc<dyn Clock>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Running, ServeError> {
    let dir = &cfg.data_dir;
    std::fs::create_dir_all(dir).map_err(dir_err(dir))?;
    let ca = Ca::load_or_create(dir)?;
    let tls = Arc::new(ca.server_config(&cfg.sans)?);
    let admin_token = admin_token(dir)?;
    let signer = Arc::new(signer(dir, &cfg.issuer)?);
    let mut verifier = Verifier::new(clock.clone());
    verifier
        .trust_signer(&signer)
        .map_err(|source| ServeError::Key {
            path: dir.join(SIGNING_KEY_FILE).display().to_string(),
            source,
        })?;
    for (issuer, path) in &cfg.jwks {
        let json = std::fs::read(path).map_err(|source| ServeError::JwksRead {
            path: path.display().to_string(),
            source,
        })?;
        verifier
            .trust_jwks(issuer, &json)
            .map_err(|source| ServeError::Key {
                path: path.display().to_string(),
                source,
            })?;
    }
    let metrics = Arc::new(Metrics::default());
    let m2 = metrics.clone();
    let store_path = dir.join(STORE_FILE);
    let store_err = |source| ServeError::Store {
        path: store_path.display().to_string(),
        source,
    };
    let store = Arc::new(
        RedbStore::open(
            &store_path,
            clock.clone(),
            Some(Arc::new(move |d, _| m2.store_commit.observe(d))),
        )
        .map_err(store_err)?,
    );
    let cache = Cache::start(store.clone()).await.map_err(store_err)?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: cfg.listen,
        source,
    })?;

    let registry = Arc::new(Registry::new(
        store.clone(),
        cache.clone(),
        clock.clone(),
        cfg.settings.clone(),
        metrics.clone(),
    ));
    let tables = NameTables::new(metrics.clone(), &cfg.domain);
    tables::rebuild(&*store, &cache, &tables).await;
    let mut background = vec![tokio::spawn(tables::run(
        store.clone(),
        cache.clone(),
        tables.clone(),
        cfg.coalesce,
    ))];
    if let Some(every) = cfg.tick {
        let r = registry.clone();
        background.push(tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                t.tick().await;
                if let Err(e) = r.tick().await {
                    tracing::warn!(error = %e, "periodic sweep failed");
                }
            }
        }));
    }
    let app = Arc::new(App {
        registry: registry.clone(),
        tables: tables.clone(),
        verifier: Arc::new(verifier),
        signer,
        admin_token: admin_token.clone(),
        metrics: metrics.clone(),
        clock,
    });
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(crate::api::serve(listener, tls, app, async move {
        tokio::select! {
            _ = shutdown => {}
            _ = stop_rx => {}
        }
    }));
    tracing::info!(%addr, replica = %cfg.settings.replica, data_dir = %dir.display(), "vmesh-control serving");
    Ok(Running {
        addr,
        registry,
        store,
        tables,
        metrics,
        admin_token,
        root_cert_pem: ca.cert_pem,
        stop: Some(stop_tx),
        task,
        background,
    })
}
