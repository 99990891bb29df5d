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

pub mod bundle;
pub mod capture;
pub mod cli;
pub mod config;
pub mod forwarder;
pub mod interfaces;
pub mod names;
pub mod resolv;
pub mod server;
pub mod status;
pub mod upstream;

use config::Settings;
use forwarder::Forwarder;
use server::App;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
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
}

impl Running {
    /// The bound address (the real port when the settings said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, ends waiting long-polls, and waits for open requests to finish.
    pub async fn stop(self) {
        self.stop.send_replace(true);
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
    let tables = settings.names.map(|n| n.watch(stopped.clone()));
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
    });
    let server = tokio::spawn(server::serve(listener, app, stopped));
    Ok(Running {
        local_addr,
        stop,
        server,
    })
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

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
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
