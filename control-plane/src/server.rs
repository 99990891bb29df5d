//! Starting `vmesh-control serve`: everything is loaded and checked (data dir, CA, serving
//! certificate, admin credential, signing key, trusted JWKS, store) before the port is bound;
//! and stopping it ([`Running::stop_unless`]): stop accepting, answer long-polls, let
//! in-flight requests finish within a grace period, stop the background tasks, close the
//! store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivatePkcs8KeyDer;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::api::App;
use crate::cache::Cache;
use crate::clock::Clock;
use crate::identity::{KeyError, Signer, Verifier};
use crate::metrics::Metrics;
use crate::random::{self, Entropy, RandomError, SystemEntropy};
use crate::registry::{Registry, Settings};
use crate::store::etcd::{EtcdConfig, EtcdStore};
use crate::store::redb::RedbStore;
use crate::store::{AnyStore, StoreError};
use crate::tables::{self, NameTables};
use crate::tls::{write_private, Ca, ServingCert, TlsError, ROOT_KEY_FILE};

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
    /// How long in-flight requests get to finish when the server stops.
    pub shutdown_grace: Duration,
    /// Timeouts and connection caps.
    pub hygiene: crate::api::Hygiene,
    /// Lifetime of the serving certificate (at most a year); it is re-issued two thirds in.
    pub cert_lifetime: Duration,
    /// The workload CA: trust domain, TTL bound, and an existing CA to sign with.
    pub ca: CaConfig,
    /// Where config and WorkloadEntries live.
    pub store: StoreConfig,
    /// Per network, its east-west gateways (meshNetworks), given to every table.
    pub gateways: std::collections::BTreeMap<String, Vec<vmesh_api::names::Gateway>>,
}

/// How workload certificates are issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaConfig {
    /// `spiffe://TRUST_DOMAIN/...` (Istio's mesh config `trustDomain`).
    pub trust_domain: String,
    /// The longest certificate issued (Istio's `MAX_WORKLOAD_CERT_TTL`).
    pub max_ttl: Duration,
    /// Sign with this CA instead of the data dir's own root.
    pub files: Option<crate::tls::CaFiles>,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            trust_domain: vmesh_api::ca::DEFAULT_TRUST_DOMAIN.into(),
            max_ttl: crate::ca::DEFAULT_MAX_TTL,
            files: None,
        }
    }
}

/// The store `serve` runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreConfig {
    /// `store.redb` in the data dir (one replica).
    #[default]
    Embedded,
    /// An etcd cluster; the data dir keeps the identity files only.
    Etcd(EtcdConfig),
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("data dir {path} is writable by every user: another user could replace its keys or store (chmod o-w, or use a directory of its own)")]
    WorldWritable { path: String },
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
    #[error("admin credential: {0}")]
    Random(#[from] RandomError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running server. [`Running::stop`] (or [`Running::stop_unless`]) shuts it down; every task
/// it started is owned here and awaited exactly once, by that call.
pub struct Running {
    pub addr: SocketAddr,
    pub registry: Arc<Registry<AnyStore>>,
    pub store: Arc<AnyStore>,
    pub tables: Arc<NameTables>,
    pub metrics: Arc<Metrics>,
    pub admin_token: String,
    pub root_cert_pem: String,
    cache: Arc<Cache>,
    grace: Duration,
    /// `true` once shutdown begins: the accept loop, every connection and the tick task see it.
    stop: watch::Sender<bool>,
    accept: JoinHandle<JoinSet<()>>,
    tick: Option<JoinHandle<()>>,
    rebuild_stop: oneshot::Sender<()>,
    rebuild: JoinHandle<()>,
    renew: JoinHandle<()>,
}

/// Never shows the admin credential.
impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("addr", &self.addr)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Connections still open when shutdown began (each had been told to finish its request).
    pub open_connections: usize,
    /// Of those, how many were still busy when the grace period ran out (or was cut short) and
    /// were closed with a request unanswered.
    pub cut_off: usize,
}

impl Running {
    /// Shuts down, giving in-flight requests up to the grace period.
    pub async fn stop(self) -> Stopped {
        self.stop_unless(std::future::pending()).await
    }

    /// Shuts down; `cut_short` resolving (a second signal) ends the grace period early.
    ///
    /// 1. Stop accepting (the listener is closed) and tell every connection to finish the
    ///    request it is serving and close (HTTP/1.1 without keep-alive, HTTP/2 GOAWAY); a
    ///    connection still in its TLS handshake is closed.
    /// 2. Long-polls answer 304 at once; a poll arriving now does not wait.
    /// 3. Wait for the connections, at most the grace period; writes that were in flight
    ///    commit and are answered. Whatever is left is closed.
    /// 4. The periodic tick finishes the round it is in and stops; the table task finishes its
    ///    rebuild and stops.
    /// 5. The replica's lease is released, the store takes its queued writes and closes its
    ///    file, and the cache stops following it.
    pub async fn stop_unless(self, cut_short: impl std::future::Future<Output = ()>) -> Stopped {
        let started = std::time::Instant::now();
        self.stop.send_replace(true);
        self.tables.close();
        let mut conns = self.accept.await.unwrap_or_default();
        let open_connections = conns.len();
        tokio::pin!(cut_short);
        let drained = tokio::select! {
            _ = async { while conns.join_next().await.is_some() {} } => true,
            _ = tokio::time::sleep(self.grace) => false,
            _ = &mut cut_short => false,
        };
        let cut_off = conns.len();
        if !drained && cut_off > 0 {
            tracing::warn!(
                connections = cut_off,
                "closing connections whose requests did not finish within the grace period"
            );
        }
        conns.shutdown().await;
        if let Some(mut tick) = self.tick {
            tokio::select! {
                _ = &mut tick => {}
                _ = tokio::time::sleep(self.grace) => {
                    tracing::warn!("periodic sweep still running after the grace period; stopped");
                    tick.abort();
                }
            }
        }
        // Between renewals it only sleeps; a renewal cut off is redone at the next start.
        self.renew.abort();
        let _ = self.rebuild_stop.send(());
        let _ = self.rebuild.await;
        self.registry.shutdown().await;
        self.store.close().await;
        self.cache.stop();
        tracing::info!(
            open_connections,
            cut_off,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "stopped"
        );
        Stopped {
            open_connections,
            cut_off,
        }
    }
}

fn dir_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServeError + '_ {
    move |source| ServeError::DataDir {
        path: path.display().to_string(),
        source,
    }
}

/// The admin credential of `dir`, created on first start from 32 random bytes.
fn admin_token(dir: &Path, entropy: &dyn Entropy) -> Result<String, ServeError> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        _ => {
            let t = format!("vmesh-admin-{}", random::hex(entropy, 32)?);
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

/// Files that must be the server user's alone.
const SECRET_FILES: [&str; 4] = [
    ROOT_KEY_FILE,
    ADMIN_TOKEN_FILE,
    SIGNING_KEY_FILE,
    STORE_FILE,
];

/// Creates the data dir (0700) or checks an existing one: refused if every user may write to
/// it (anyone could have swapped in their own CA key or admin credential); a secret that group
/// or others may read is made 0600, with a warning that it may have been read. `embedded`:
/// the store file is kept here too.
fn secure_data_dir(dir: &Path, embedded: bool) -> Result<(), ServeError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(dir_err(dir))?;
        }
        let mode = std::fs::metadata(dir)
            .map_err(dir_err(dir))?
            .permissions()
            .mode();
        if mode & 0o002 != 0 {
            return Err(ServeError::WorldWritable {
                path: dir.display().to_string(),
            });
        }
        for name in SECRET_FILES {
            let path = dir.join(name);
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(dir_err(&path))?;
                tracing::warn!(file = %path.display(), was = format!("{mode:o}"),
                    "secret was readable by other users; made 0600 (treat its contents as exposed)");
            }
        }
        // redb initializes an empty file: created here, the store is never readable by others,
        // not even for the moment between its creation and a chmod.
        let store = dir.join(STORE_FILE);
        if embedded && !store.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&store)
                .map_err(dir_err(&store))?;
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir).map_err(dir_err(dir))?;
    Ok(())
}

/// Re-issues the serving certificate two thirds into each one's life, until aborted.
async fn renew_serving_cert(
    ca: Arc<Ca>,
    sans: Vec<String>,
    lifetime: Duration,
    cert: Arc<ServingCert>,
) {
    let mut wait = ServingCert::renew_after(lifetime);
    loop {
        tokio::time::sleep(wait).await;
        match ca.certified_key(&sans, lifetime) {
            Ok(k) => {
                cert.replace(k);
                wait = ServingCert::renew_after(lifetime);
                tracing::info!(lifetime = ?lifetime, "serving certificate renewed");
            }
            Err(e) => {
                // The current one still has a third of its life: retry well within it.
                wait = (ServingCert::renew_after(lifetime) / 20).max(Duration::from_secs(1));
                tracing::warn!(error = %e, retry_in = ?wait, "serving certificate renewal failed");
            }
        }
    }
}

/// Loads everything, binds, and serves until [`Running::stop`].
pub async fn start(cfg: ServeConfig, clock: Arc<dyn Clock>) -> Result<Running, ServeError> {
    let dir = &cfg.data_dir;
    secure_data_dir(dir, cfg.store == StoreConfig::Embedded)?;
    let ca = Arc::new(match &cfg.ca.files {
        Some(files) => {
            let ca = Ca::from_files(files)?;
            // The CLI and `vm-bundle` trust (and hand to VMs) the data dir's root-cert.pem:
            // with a plugged-in CA that is its root. The data dir's own root key, if any, is
            // left alone; started again without --ca-cert, the server says the two disagree.
            let root = dir.join(crate::tls::ROOT_CERT_FILE);
            write_private(&root, ca.root_pem.as_bytes()).map_err(dir_err(&root))?;
            ca
        }
        None => Ca::load_or_create(dir)?,
    });
    let workload_ca = Arc::new(crate::ca::WorkloadCa::new(
        ca.clone(),
        &cfg.ca.trust_domain,
        cfg.ca.max_ttl,
    ));
    let serving = ServingCert::new(ca.certified_key(&cfg.sans, cfg.cert_lifetime)?);
    let tls = Arc::new(serving.server_config()?);
    let admin_token = admin_token(dir, &SystemEntropy::default())?;
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
    let observer: crate::store::redb::CommitObserver =
        Arc::new(move |d, _| m2.store_commit.observe(d));
    let (store, store_name) = match &cfg.store {
        StoreConfig::Embedded => {
            let path = dir.join(STORE_FILE);
            let store = RedbStore::open(&path, clock.clone(), Some(observer));
            (store.map(AnyStore::Redb), path.display().to_string())
        }
        StoreConfig::Etcd(e) => {
            let store = EtcdStore::open(e, clock.clone(), Some(observer)).await;
            let name = format!("etcd {} (prefix {})", e.endpoints.join(","), e.prefix);
            (store.map(AnyStore::Etcd), name)
        }
    };
    let store_err = |source| ServeError::Store {
        path: store_name.clone(),
        source,
    };
    let store = Arc::new(store.map_err(store_err)?);
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
    let tables = NameTables::new(
        metrics.clone(),
        &cfg.domain,
        &cfg.ca.trust_domain,
        cfg.gateways.clone(),
    );
    tables::rebuild(&*store, &cache, &tables).await;
    let (rebuild_stop, rebuild_stopped) = oneshot::channel::<()>();
    let rebuild = tokio::spawn(tables::run(
        store.clone(),
        cache.clone(),
        tables.clone(),
        cfg.coalesce,
        async move {
            let _ = rebuild_stopped.await;
        },
    ));
    let (stop, _) = watch::channel(false);
    let tick = cfg.tick.map(|every| {
        let r = registry.clone();
        let mut stopping = stop.subscribe();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // A round that has begun runs to its end: its writes are compare-and-swap
                // transactions that are fine to finish, and cutting one off saves nothing.
                tokio::select! {
                    biased;
                    _ = crate::api::stopped(&mut stopping) => return,
                    _ = t.tick() => {}
                }
                if let Err(e) = r.tick().await {
                    tracing::warn!(error = %e, "periodic sweep failed");
                }
            }
        })
    });
    let app = Arc::new(App {
        registry: registry.clone(),
        tables: tables.clone(),
        verifier: Arc::new(verifier),
        signer,
        admin_token: admin_token.clone(),
        metrics: metrics.clone(),
        clock,
        body_timeout: cfg.hygiene.body_timeout,
        ca: workload_ca,
    });
    let h = cfg.hygiene;
    let (nofile, nofile_max) = match crate::conns::raise_nofile() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            (None, None)
        }
    };
    let limits = crate::conns::Limits {
        total: nofile.map_or(h.max_connections, |n| {
            h.max_connections.min(crate::conns::fd_budget(n))
        }),
        per_source: h.max_connections_per_source,
    };
    let admission = crate::conns::Admission::new(limits);
    let root_cert_pem = ca.root_pem.clone();
    let renew = tokio::spawn(renew_serving_cert(
        ca,
        cfg.sans.clone(),
        cfg.cert_lifetime,
        serving,
    ));
    let accept = tokio::spawn(crate::api::serve(
        listener,
        tls,
        app,
        h,
        admission,
        stop.subscribe(),
    ));
    tracing::info!(%addr, replica = %cfg.settings.replica, data_dir = %dir.display(),
        max_connections = limits.total, max_connections_per_source = limits.per_source,
        open_file_limit = nofile, open_file_hard_limit = nofile_max, "vmesh-control serving");
    Ok(Running {
        addr,
        registry,
        store,
        tables,
        metrics,
        admin_token,
        root_cert_pem,
        cache,
        grace: cfg.shutdown_grace,
        stop,
        accept,
        tick,
        rebuild_stop,
        rebuild,
        renew,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::tests::Failing;

    #[test]
    fn no_admin_credential_is_written_when_the_random_source_fails() {
        let dir = vmesh_test_support::TempDir::new();
        assert!(matches!(
            admin_token(dir.path(), &Failing),
            Err(ServeError::Random(_))
        ));
        assert!(!dir.path().join(ADMIN_TOKEN_FILE).exists());
        let t = admin_token(dir.path(), &SystemEntropy::default()).unwrap();
        assert!(t.starts_with("vmesh-admin-") && t.len() == 12 + 64, "{t}");
        // Existing credentials are read, not drawn again (the source is not asked).
        assert_eq!(admin_token(dir.path(), &Failing).unwrap(), t);
    }
}
