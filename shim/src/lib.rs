//! vmesh-shim: the native helper that runs beside Envoy on a VM.
//!
//! The vmesh filter inside Envoy calls it over local HTTP. A DNS query the filter cannot answer
//! from the mesh name table arrives at `/dns-query` ([`server`]), is relayed by the
//! [`forwarder`] to the system resolvers ([`upstream`]) and its answer goes back unchanged but
//! for the ID. The name table the filter answers from is long-polled at `/v1/name-table`
//! ([`names`]). [`config`] turns flags into [`config::Settings`] before anything is bound;
//! [`start`] binds and serves until [`Running::stop`].

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub mod backoff;
pub mod bundle;
pub mod capture;
pub mod cert;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod envoy_stats;
pub mod forwarder;
pub mod grpc;
pub mod interfaces;
pub mod metrics;
pub mod names;
pub mod pool;
pub mod probe;
pub mod prober;
pub mod resolv;
pub mod server;
pub mod status;
pub mod upstream;
pub mod view;

use config::Settings;
use forwarder::Forwarder;
use server::App;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("control plane TLS: {0}")]
    Tls(control::client::TlsSetupError),
    #[error("{0}")]
    CertDir(cert::dir::DirError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A serving shim.
#[derive(Debug)]
pub struct Running {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    session: Option<JoinHandle<()>>,
    keeper: Option<JoinHandle<()>>,
}

impl Running {
    /// The bound address (the real port when the settings said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Deregisters (bounded), stops accepting, ends waiting long-polls, and waits for open
    /// requests to finish.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        if let Some(keeper) = self.keeper {
            if let Err(error) = keeper.await {
                tracing::error!(%error, "certificate keeper failed");
            }
        }
        if let Some(session) = self.session {
            if let Err(error) = session.await {
                tracing::error!(%error, "registration session failed");
            }
        }
        if let Err(error) = self.server.await {
            tracing::error!(%error, "server task failed");
        }
    }
}

/// Binds the listener and starts serving.
pub async fn start(settings: Settings) -> Result<Running, StartError> {
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: settings.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: settings.listen,
        source,
    })?;
    let (stop, stopped) = watch::channel(false);
    let names_version = settings.names.as_ref().map(|n| n.version().to_string());
    let metrics = Arc::new(metrics::Metrics::default());
    let tracker = dataplane::Tracker::new();
    tokio::spawn(Arc::clone(&tracker).watch_deadline(stopped.clone()));
    let (plan_tx, plan) = watch::channel(probe::ProbePlan::None);
    let mode = if settings.control.is_some() {
        "controlPlane"
    } else if settings.names.is_some() {
        "static"
    } else {
        "forwarder"
    };
    let board = Arc::new(status::Board::new(
        mode,
        settings
            .control
            .as_ref()
            .and_then(|c| c.bundle.discovery.targets.first())
            .map(|t| format!("{} ({})", t.connect, t.server_name)),
    ));
    let mut session = None;
    let mut keeper = None;
    tokio::spawn(envoy_stats::follow(
        settings.envoy_admin,
        Arc::clone(&board),
        stopped.clone(),
    ));
    let tables = match (settings.names, settings.control) {
        (Some(names), _) => Some(names.watch(stopped.clone())),
        (None, Some(c)) => {
            let (tables, session_task, keeper_task) = start_control_plane(
                c,
                settings.resolv_conf.clone(),
                &tracker,
                plan_tx,
                &board,
                &metrics,
                stopped.clone(),
            )?;
            session = Some(session_task);
            keeper = Some(keeper_task);
            Some(tables)
        }
        (None, None) => None,
    };
    tracing::info!(
        listen = %local_addr,
        upstreams = ?settings.upstreams,
        forward_timeout = ?settings.forward_timeout,
        names_version = names_version.as_deref().unwrap_or("none"),
        version = env!("CARGO_PKG_VERSION"),
        "vmesh-shim serving"
    );
    let forwarder = Arc::new(Forwarder::new(settings.upstreams, settings.forward_timeout));
    if let Some(w) = settings.resolv_watch {
        resolv::follow(w, Arc::clone(&forwarder), stopped.clone());
    }
    let app = Arc::new(App {
        forwarder,
        tables,
        stop: stopped.clone(),
        agent: server::Agent { tracker, plan },
        board,
        metrics,
    });
    let server = tokio::spawn(server::serve(listener, app, stopped));
    Ok(Running {
        local_addr,
        stop,
        server,
        session,
        keeper,
    })
}

/// Starts the control-plane side: the cached table, the table long-poll, the VM's view of
/// it, and the registration session.
fn start_control_plane(
    c: config::ControlSettings,
    resolv_conf: std::path::PathBuf,
    tracker: &Arc<dataplane::Tracker>,
    plan: watch::Sender<probe::ProbePlan>,
    board: &Arc<status::Board>,
    metrics: &Arc<metrics::Metrics>,
    stopped: watch::Receiver<bool>,
) -> Result<(names::Tables, JoinHandle<()>, JoinHandle<()>), StartError> {
    let b = &c.bundle;
    // Before anything is served: Envoy, started after the shim, needs the SDS files there.
    // Absolute: the SDS files name the PEM files by path, and Envoy resolves a relative one
    // against its own working directory, not the shim's.
    let cert_dir =
        cert::dir::CertDir::new(std::path::absolute(&c.cert_dir).unwrap_or(c.cert_dir.clone()));
    cert_dir.prepare().map_err(StartError::CertDir)?;
    let endpoints = b
        .discovery
        .targets
        .iter()
        .map(|t| control::client::Endpoint {
            addr: t.connect,
            server_name: t.server_name.clone(),
            authority: t.address.clone(),
        })
        .collect();
    let token = Arc::new(control::token::TokenSource::new(&b.token_path));
    let status = Arc::clone(board);
    let cp = control::client::ControlPlane::new(
        endpoints,
        &b.root_cert_pem,
        token,
        Box::new(move |e| status.control_plane(e.to_string())),
    )
    .map_err(StartError::Tls)?;
    let cp = Arc::new(cp);
    let keeper = cert::Keeper {
        cp: Arc::clone(&cp),
        dir: cert_dir,
        ttl: c.cert_ttl,
        trust_domain: if b.trust_domain.is_empty() {
            vmesh_api::ca::DEFAULT_TRUST_DOMAIN.to_string()
        } else {
            b.trust_domain.clone()
        },
        root_path: b.root_cert_path.clone(),
        board: Arc::clone(board),
    };
    let gateway = c.role == config::Role::Gateway;
    // A gateway terminates no TLS: nothing asks for its certificate.
    let keeper = if gateway {
        tokio::spawn(async {})
    } else {
        tokio::spawn(keeper.run(stopped.clone()))
    };
    let view = view::follow(resolv_conf, stopped.clone());
    let (tables_tx, tables) = watch::channel(None);
    let source = control::tables::CpTables {
        cp: Arc::clone(&cp),
        whoami: control::client::TableClient {
            network: b.network.clone(),
            locality: b.locality.clone(),
        },
        cache: c.state_dir.join(control::tables::CACHE_FILE),
        view,
        tables: tables_tx,
        board: Arc::clone(board),
    };
    let cached = source.load_cache();
    tokio::spawn(source.run(cached, stopped.clone()));
    if gateway {
        // No WorkloadEntry: no service selects a gateway, and the table is all it needs.
        tracing::info!(
            network = %b.network,
            "gateway role: fetching the table only, not registering"
        );
        return Ok((tables, tokio::spawn(async {}), keeper));
    }
    let (verdicts_tx, verdicts) = watch::channel(None);
    tokio::spawn(prober::run(plan.subscribe(), verdicts_tx, stopped.clone()));
    let session = control::session::Session {
        cp,
        request: c.bundle.register_request(),
        dataplane: tracker.subscribe(),
        verdicts,
        plan,
        board: Arc::clone(board),
        metrics: Arc::clone(metrics),
        deregister_timeout: c.deregister_timeout,
    };
    Ok((tables, tokio::spawn(session.run(stopped)), keeper))
}

/// Serves until `signal` completes, then shuts down gracefully.
pub async fn run(
    settings: Settings,
    signal: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let running = start(settings).await?;
    signal.await;
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is called (inside the
/// runtime), not when it is first awaited, so a signal that arrives while the shim is still
/// starting is not lost (the default action would kill it without deregistering).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    let int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>, name: &'static str| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot watch {name}");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            () = wait(term, "SIGTERM") => {},
            () = wait(int, "SIGINT") => {},
        }
    }
}

/// Installs the log subscriber. An invalid filter falls back to `info`; [`config::RunArgs::validate`]
/// reports it as an error right after, so the warnings it logs are not lost.
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
