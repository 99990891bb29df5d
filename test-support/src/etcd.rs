//! A real etcd (`etcd` from Debian's `etcd-server`, or `VMESH_ETCD`) for the suites that run
//! the control plane on it: one member on free 127.0.0.1 ports with its data in a temp dir,
//! killed and removed when dropped, also when the test fails. Its client URL is plain http, or
//! https requiring client certificates ([`Etcd::start_tls`]); health is read from a separate
//! plain-http metrics URL either way.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::process::Proc;
use crate::{eventually, free_port, TempDir};

/// One running etcd member.
#[derive(Debug)]
pub struct Etcd {
    // Declared first, so the process is gone before its data dir is removed.
    proc: Proc,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    tls: Option<Tls>,
}

/// The member's TLS files: CA that client certificates must chain to, its certificate and key.
#[derive(Debug, Clone)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn binary() -> PathBuf {
    std::env::var_os("VMESH_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

impl Etcd {
    /// Starts a member and waits until it reports itself healthy.
    pub fn start() -> Etcd {
        Self::start_with(None)
    }

    /// A member whose client URL is https and requires a client certificate from `tls.ca`.
    pub fn start_tls(tls: Tls) -> Etcd {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<Tls>) -> Etcd {
        let dir = TempDir::new();
        let (client_port, peer_port, metrics_port) = (free_port(), free_port(), free_port());
        let proc = Self::spawn(&dir, client_port, peer_port, metrics_port, tls.as_ref());
        let e = Etcd {
            proc,
            dir,
            client_port,
            peer_port,
            metrics_port,
            tls,
        };
        e.wait_healthy();
        e
    }

    fn spawn(dir: &TempDir, client: u16, peer: u16, metrics: u16, tls: Option<&Tls>) -> Proc {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let c = format!("{scheme}://127.0.0.1:{client}");
        let p = format!("http://127.0.0.1:{peer}");
        let mut args: Vec<String> = [
            "--name",
            "vmesh-test",
            "--data-dir",
            &dir.path().join("data").display().to_string(),
            "--listen-client-urls",
            &c,
            "--advertise-client-urls",
            &c,
            "--listen-peer-urls",
            &p,
            "--initial-advertise-peer-urls",
            &p,
            "--initial-cluster",
            &format!("vmesh-test={p}"),
            "--logger",
            "zap",
            "--log-level",
            "warn",
            "--listen-metrics-urls",
            &format!("http://127.0.0.1:{metrics}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(t) = tls {
            for (flag, path) in [
                ("--trusted-ca-file", &t.ca),
                ("--cert-file", &t.cert),
                ("--key-file", &t.key),
            ] {
                args.push(flag.into());
                args.push(path.display().to_string());
            }
            args.push("--client-cert-auth".into());
        }
        Proc::spawn("etcd", &binary(), &args, &dir.path().join("etcd.log"))
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS), the member's client URL.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// `etcd://127.0.0.1:PORT`, as `vmesh-control migrate --to` takes it.
    pub fn target(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    /// Kills the member (SIGKILL); its data stays for [`Etcd::restart`].
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts the member again on its data and ports, and waits until it is healthy.
    pub fn restart(&mut self) {
        self.proc.kill();
        self.proc = Self::spawn(
            &self.dir,
            self.client_port,
            self.peer_port,
            self.metrics_port,
            self.tls.as_ref(),
        );
        self.wait_healthy();
    }

    fn wait_healthy(&self) {
        let port = self.metrics_port;
        eventually::eventually("etcd answers /health", || {
            health(port).map_err(|e| format!("{e}; log: {}", self.proc.log_text()))
        });
    }
}

/// `GET /health` on the metrics port: ok when etcd has a leader and serves.
fn health(port: u16) -> Result<(), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    if body.contains("\"health\":\"true\"") {
        Ok(())
    } else {
        Err(format!("unhealthy: {body}"))
    }
}
