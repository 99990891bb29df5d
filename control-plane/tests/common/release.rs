//! The release binary as the hostile suites run it (`hostile.rs`, `hostile_bounds.rs`): spawned
//! on a free port with extra flags and environment, optionally under a lowered open-file limit;
//! the test cluster's token claims; metrics by name.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hyper::Method;
use serde_json::{json, Value};
use vmesh_control::client::{Client, ClientError};
use vmesh_control::config::Document;
use vmesh_test_support::free_port;
use vmesh_test_support::process::Proc;

use super::fixture;

pub fn release_binary() -> PathBuf {
    vmesh_test_support::artifact(
        "VMESH_CONTROL_BIN",
        "release/vmesh-control",
        "cargo build --release -p vmesh-control",
    )
}

pub const CLUSTER_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

pub struct Control {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub url: String,
}

impl Control {
    /// `vmesh-control serve` on a free port, under `prlimit --nofile=N` if `nofile` is given.
    pub fn spawn(
        data: &Path,
        logs: &Path,
        nofile: Option<u64>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Control {
        let port = free_port();
        let mut args: Vec<String> = Vec::new();
        let program = match nofile {
            Some(n) => {
                args.extend([format!("--nofile={n}:{n}"), "--".into()]);
                args.push(release_binary().display().to_string());
                PathBuf::from("prlimit")
            }
            None => release_binary(),
        };
        args.extend(
            [
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
                &data.display().to_string(),
            ]
            .map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let proc = Proc::spawn_env(
            "vmesh-control",
            &program,
            &args,
            &env,
            &logs.join(format!("control-{port}.log")),
        );
        Control {
            proc,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            url: format!("https://127.0.0.1:{port}"),
        }
    }
}

pub fn group_doc(ns: &str, name: &str, sa: &str) -> Document {
    Document {
        source: "hostile".into(),
        index: 0,
        object: json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"template": {"serviceAccount": sa}}}),
    }
}

pub async fn metric(admin: &Client, name: &str) -> Option<f64> {
    let r = admin.call(Method::GET, "/metrics", None).await.ok()?;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub fn cluster_kid() -> String {
    let jwks: Value =
        serde_json::from_slice(&std::fs::read(fixture("cluster-jwks.json")).unwrap()).unwrap();
    jwks["keys"][0]["kid"].as_str().unwrap().to_string()
}

pub fn cluster_claims(ns: &str, sa: &str) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({
        "aud": ["istio-ca"], "exp": now + 600, "iat": now, "nbf": now, "iss": CLUSTER_ISSUER,
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u"}},
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
    })
}

pub fn status(r: Result<impl std::fmt::Debug, ClientError>) -> u16 {
    match r {
        Err(ClientError::Api { status, .. }) => status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}
