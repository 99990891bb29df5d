//! The real `vmesh-control serve` in a temp data dir on a free port, driven through its own
//! CLI (`apply`, `get -o json`, `vm-bundle`, `token create`) as an operator would.

use super::artifact;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use vmesh_test_support::eventually::eventually;
use vmesh_test_support::free_port;
use vmesh_test_support::process::Proc;

pub fn binary() -> PathBuf {
    artifact(
        "VMESH_CONTROL_BIN",
        "release/vmesh-control",
        "cargo build --release -p vmesh-control",
    )
}

/// Timings short enough for tests (the defaults are 5 s / 15 s / 10 s).
#[derive(Debug, Clone)]
pub struct CpOptions {
    pub heartbeat_interval: Duration,
    pub liveness_timeout: Duration,
    pub grace_period: Duration,
}

impl Default for CpOptions {
    fn default() -> Self {
        CpOptions {
            heartbeat_interval: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(3),
            grace_period: Duration::from_secs(3),
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[derive(Debug)]
pub struct ControlPlane {
    pub port: u16,
    pub data_dir: PathBuf,
    pub options: CpOptions,
    proc: Option<Proc>,
    log_dir: PathBuf,
    starts: u32,
}

impl ControlPlane {
    /// Starts a control plane with its data under `dir/cp-data`.
    pub fn start(dir: &Path, options: CpOptions) -> ControlPlane {
        let mut cp = ControlPlane {
            port: free_port(),
            data_dir: dir.join("cp-data"),
            options,
            proc: None,
            log_dir: dir.to_path_buf(),
            starts: 0,
        };
        cp.launch();
        cp
    }

    fn launch(&mut self) {
        self.starts += 1;
        let args = vec![
            "serve".to_string(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.port),
            "--heartbeat-interval".into(),
            ms(self.options.heartbeat_interval),
            "--liveness-timeout".into(),
            ms(self.options.liveness_timeout),
            "--grace-period".into(),
            ms(self.options.grace_period),
            "--replica".into(),
            "vmesh-control-test".into(),
            "--log".into(),
            "info".into(),
        ];
        let log = self
            .log_dir
            .join(format!("control-{}-{}.log", self.port, self.starts));
        self.proc = Some(Proc::spawn("vmesh-control", &binary(), &args, &log));
        eventually("the control plane answers", || {
            self.cli(&["get", "workloadgroups", "-A"]).map(drop)
        });
    }

    /// Kills the process (SIGKILL); [`ControlPlane::restart`] starts it again on the same
    /// data dir and port.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// Runs `vmesh-control ARGS` against this server: stdout, or stderr as the error.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(binary())
            .args(["--server", &self.url(), "--data-dir"])
            .arg(&self.data_dir)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "vmesh-control {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// `vmesh-control apply -f` with this YAML.
    pub fn apply(&self, dir: &Path, yaml: &str) {
        let file = dir.join(format!("apply-{}.yaml", free_port()));
        std::fs::write(&file, yaml).expect("write manifest");
        self.cli(&["apply", "-f", &file.display().to_string()])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The WorkloadEntries of `namespace`, as `get -o json` prints them.
    pub fn entries(&self, namespace: &str) -> Result<Vec<serde_json::Value>, String> {
        let out = self.cli(&["get", "workloadentries", "-n", namespace, "-o", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        Ok(match v.get("items") {
            Some(serde_json::Value::Array(items)) => items.clone(),
            _ if v.is_array() => v.as_array().cloned().unwrap_or_default(),
            _ => vec![v],
        })
    }

    /// The entry named `name` in `namespace`, if it exists.
    pub fn entry(&self, namespace: &str, name: &str) -> Result<Option<serde_json::Value>, String> {
        Ok(self
            .entries(namespace)?
            .into_iter()
            .find(|e| e["metadata"]["name"] == name))
    }

    /// `vmesh-control vm-bundle` for `group` into `out`.
    pub fn bundle(&self, group: &str, namespace: &str, out: &Path) {
        self.cli(&[
            "vm-bundle",
            "--group",
            group,
            "-n",
            namespace,
            "-o",
            &out.display().to_string(),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// A VM token for `namespace/service_account`.
    pub fn token(&self, namespace: &str, service_account: &str, ttl: &str) -> String {
        self.cli(&[
            "token",
            "create",
            "-n",
            namespace,
            "--service-account",
            service_account,
            "--ttl",
            ttl,
        ])
        .unwrap_or_else(|e| panic!("{e}"))
        .trim()
        .to_string()
    }
}

/// The `Healthy` condition of an entry: (status, message).
pub fn healthy_condition(entry: &serde_json::Value) -> Option<(String, String)> {
    entry["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Healthy")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["message"].as_str().unwrap_or_default().to_string(),
            )
        })
}
