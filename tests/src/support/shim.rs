//! The real `vmesh-shim` binary: DoH forwarder and name-table source.

use super::artifact;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmesh_test_support::eventually::eventually;
use vmesh_test_support::free_port;
use vmesh_test_support::process::Proc;

#[derive(Debug)]
pub struct Shim {
    pub port: u16,
    proc: Proc,
}

/// What the shim is started with.
#[derive(Debug, Clone, Default)]
pub struct ShimOptions {
    pub static_names: Option<PathBuf>,
    pub upstreams: Vec<String>,
    /// The Envoy DNS listener, which the shim must never forward to.
    pub self_addr: Option<String>,
    pub forward_timeout: Option<String>,
    /// More flags, and environment variables (e.g. `ISTIO_SVC_IP`).
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

pub fn binary() -> PathBuf {
    artifact(
        "VMESH_SHIM_BIN",
        "release/vmesh-shim",
        "cargo build --release -p vmesh-shim",
    )
}

impl Shim {
    pub fn start(dir: &Path, port: u16, opts: &ShimOptions) -> Shim {
        let shim = Shim::spawn(dir, port, opts);
        shim.wait_serving();
        shim
    }

    /// Starts the shim without waiting for it to serve ([`Shim::wait_serving`]). Processes
    /// die with the thread that started them, so tests that start many at once start them
    /// all from their own thread this way, then wait.
    pub fn spawn(dir: &Path, port: u16, opts: &ShimOptions) -> Shim {
        let mut args = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--log-level".into(),
            "debug".into(),
        ];
        if let Some(f) = &opts.static_names {
            args.push("--static-names".into());
            args.push(f.display().to_string());
        }
        for u in &opts.upstreams {
            args.push("--upstream".into());
            args.push(u.clone());
        }
        if let Some(s) = &opts.self_addr {
            args.push("--self-addr".into());
            args.push(s.clone());
        }
        if let Some(t) = &opts.forward_timeout {
            args.push("--forward-timeout".into());
            args.push(t.clone());
        }
        args.extend(opts.args.iter().cloned());
        let proc = Proc::spawn_env(
            "vmesh-shim",
            &binary(),
            &args,
            &opts.env,
            &dir.join(format!("shim-{port}.log")),
        );
        Shim { port, proc }
    }

    pub fn wait_serving(&self) {
        eventually("shim /healthz", || self.healthz());
    }

    /// A port for a shim that is not started yet (Envoy is configured with it first).
    pub fn reserve_port() -> u16 {
        free_port()
    }

    fn healthz(&self) -> Result<(), String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: shim\r\nconnection: close\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        if out.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(out)
        }
    }

    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// The running process (for signals and its exit status).
    pub fn process(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// `GET path` on the shim's local API: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String), String> {
        super::envoy::http_get(self.port, path)
    }

    /// `/v1/status` as JSON.
    pub fn status(&self) -> Result<serde_json::Value, String> {
        let (code, body) = self.get("/v1/status")?;
        if code != 200 {
            return Err(format!("status {code}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))
    }

    pub fn log(&self) -> String {
        self.proc.log_text()
    }
}
