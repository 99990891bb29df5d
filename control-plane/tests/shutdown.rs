//! The release binary (`panic = "abort"`, the build operators run) stopped by SIGTERM and
//! SIGINT under load: it exits 0, promptly, with long-polls answered and every acknowledged
//! write on disk; and what it logs never holds a token's `jti` or the admin credential.
//!
//! The binary is the one `scripts/build.sh` builds (`target/release/vmesh-control`); set
//! `VMESH_CONTROL_BIN` to test another one.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use hyper::Method;
use serde_json::{json, Value};
use vmesh_control::client::Client;
use vmesh_control::config::Document;
use vmesh_test_support::free_port;
use vmesh_test_support::process::Proc;

use common::release::release_binary;

/// `vmesh-control serve` on a free port, its log in `log_dir`.
struct Control {
    proc: Proc,
    url: String,
}

impl Control {
    fn spawn(data: &Path, log_dir: &Path, level: &str) -> Control {
        let port = free_port();
        let args = [
            "serve".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--log".into(),
            level.into(),
            "--data-dir".into(),
            data.display().to_string(),
        ];
        // Through the environment, not a flag, so a binary from before the flag existed can be
        // tested too (VMESH_CONTROL_BIN): it shows what this test catches. Long: a held
        // long-poll or unfinished connection would show as a slow exit.
        let env = [
            (
                "VMESH_CONTROL_SHUTDOWN_GRACE".to_string(),
                "30s".to_string(),
            ),
            // The load registers as fast as it can with one token: no per-identity quota.
            (
                "VMESH_CONTROL_REGISTRATION_RATE".to_string(),
                "0".to_string(),
            ),
            (
                "VMESH_CONTROL_MAX_ENTRIES_PER_IDENTITY".to_string(),
                "0".to_string(),
            ),
        ];
        let proc = Proc::spawn_env(
            "vmesh-control",
            &release_binary(),
            &args,
            &env,
            &log_dir.join(format!("control-{port}.log")),
        );
        Control {
            proc,
            url: format!("https://127.0.0.1:{port}"),
        }
    }

    fn log_text(&self) -> String {
        self.proc.log_text()
    }

    fn signal(&self, name: &str) {
        self.proc.signal(name);
    }

    /// The exit status, or a panic with the log if it has not exited within `patience`. Polls
    /// without blocking the runtime, so the load's clients keep reading their answers.
    async fn exit_within(&mut self, patience: Duration) -> ExitStatus {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(st) = self.proc.try_status() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "still running {patience:?} after the signal; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn group_doc(ns: &str, name: &str, sa: &str) -> Document {
    Document {
        source: "shutdown".into(),
        index: 0,
        object: json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"template": {"serviceAccount": sa}}}),
    }
}

type Acked = Arc<Mutex<BTreeSet<String>>>;

/// A name-table long-poll as one poller saw it.
#[derive(Debug)]
struct Poll {
    sent: Instant,
    ended: Instant,
    outcome: Result<u16, String>,
}

/// Loops `step` (a fresh connection after any error) until `done`.
async fn until_done<F, Fut>(done: Arc<AtomicBool>, client: Client, mut step: F)
where
    F: FnMut(vmesh_control::client::Connection, u64) -> Fut,
    Fut: std::future::Future<Output = Option<vmesh_control::client::Connection>>,
{
    let mut conn = None;
    for i in 0.. {
        if done.load(Ordering::SeqCst) {
            return;
        }
        let c = match conn.take() {
            Some(c) => c,
            None => match client.connect().await {
                Ok(c) => c,
                Err(_) => {
                    // Down (shutting down or stopped): wait for the test to say "done".
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        conn = step(c, i).await;
    }
}

async fn metric(admin: &Client, name: &str) -> Option<f64> {
    let r = admin.call(Method::GET, "/metrics", None).await.ok()?;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Applies, registrations with heartbeats and long-polls in flight, then `signal`: the process
/// exits 0 within a few seconds (its long-polls wait 60 s and its grace period is 30 s, so
/// neither is what ended it), the long-polls that were waiting were answered, and after a
/// restart on the same data dir every write that got a 2xx is there.
async fn stop_under_load(signal: &str) {
    let data = vmesh_test_support::TempDir::new();
    let logs = vmesh_test_support::TempDir::new();
    let mut p = Control::spawn(data.path(), logs.path(), "info");
    let admin = common::wait_for_server(data.path(), &p.url).await;
    admin
        .apply(vec![group_doc("load", "load-vms", "load-sa")], "")
        .await
        .unwrap();
    let hour = Duration::from_secs(3600);
    let vm = admin.with_token(
        &admin
            .mint_token("load", "load-sa", hour)
            .await
            .unwrap()
            .token,
    );
    // A namespace nothing is written to: its table stays put, so its polls really wait.
    let poller = admin.with_token(
        &admin
            .mint_token("quiet", "poller", hour)
            .await
            .unwrap()
            .token,
    );

    let done = Arc::new(AtomicBool::new(false));
    let groups: Acked = Arc::default();
    let entries: Acked = Arc::default();
    let heartbeats = Arc::new(AtomicU64::new(0));
    let polls: Arc<Mutex<Vec<Poll>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..2u64 {
        let groups = groups.clone();
        workers.push(tokio::spawn(until_done(
            done.clone(),
            admin.clone(),
            move |mut c, i| {
                let groups = groups.clone();
                async move {
                    let name = format!("g{w}-{i}");
                    let req = vmesh_control::api::ApplyRequest {
                        documents: vec![group_doc("load", &name, "load-sa")],
                        namespace: String::new(),
                    };
                    c.json::<Value>(Method::POST, "/v1/admin/apply", Some(&req))
                        .await
                        .ok()
                        .map(|_| {
                            groups.lock().unwrap().insert(name);
                            c
                        })
                }
            },
        )));
    }
    for w in 0..2u64 {
        let (entries, heartbeats) = (entries.clone(), heartbeats.clone());
        workers.push(tokio::spawn(until_done(
            done.clone(),
            vm.clone(),
            move |mut c, i| {
                let (entries, heartbeats) = (entries.clone(), heartbeats.clone());
                async move {
                    let ip = format!("10.{w}.{}.{}", i / 250, i % 250 + 1);
                    let body = json!({"group": "load-vms", "namespace": "load", "address": ip});
                    let r: Value = c
                        .json(Method::POST, "/v1/register", Some(&body))
                        .await
                        .ok()?;
                    let entry = r["workloadEntry"].clone();
                    entries
                        .lock()
                        .unwrap()
                        .insert(entry["name"].as_str().unwrap().to_string());
                    c.call(
                        Method::POST,
                        "/v1/heartbeat",
                        Some(serde_json::to_vec(&entry).unwrap()),
                    )
                    .await
                    .ok()?;
                    heartbeats.fetch_add(1, Ordering::Relaxed);
                    Some(c)
                }
            },
        )));
    }
    for _ in 0..3 {
        let polls = polls.clone();
        let version = Arc::new(Mutex::new(String::new()));
        workers.push(tokio::spawn(until_done(
            done.clone(),
            poller.clone(),
            move |mut c, _| {
                let (polls, version) = (polls.clone(), version.clone());
                async move {
                    let v = version.lock().unwrap().clone();
                    let sent = Instant::now();
                    let r = c
                        .call(
                            Method::GET,
                            &format!("/v1/name-table?version={v}&wait=60"),
                            None,
                        )
                        .await;
                    let ok = r.is_ok();
                    polls.lock().unwrap().push(Poll {
                        sent,
                        ended: Instant::now(),
                        outcome: match r {
                            Ok(r) => {
                                if let Some(v) = r.headers.get("x-vmesh-table-version") {
                                    *version.lock().unwrap() = v.to_str().unwrap().to_string();
                                }
                                Ok(r.status.as_u16())
                            }
                            Err(e) => Err(e.to_string()),
                        },
                    });
                    ok.then_some(c)
                }
            },
        )));
    }

    // Load is on: writes are being acknowledged and the three polls are waiting.
    let load = || async {
        let g = groups.lock().unwrap().len();
        let e = entries.lock().unwrap().len();
        (g, e, metric(&admin, "vmesh_name_table_long_polls").await)
    };
    vmesh_test_support::eventually::assert_eventually_async(
        "load builds up: >= 20 groups and entries acknowledged, 3 long-polls waiting",
        async || matches!(load().await, (g, e, Some(polls)) if g >= 20 && e >= 20 && polls == 3.0),
    )
    .await;
    // Every poll the server counted as waiting was sent before now.
    let waiting_since = Instant::now();
    let signalled = Instant::now();
    p.signal(signal);
    let status = p
        .exit_within(vmesh_test_support::eventually::patience())
        .await;
    let took = signalled.elapsed();
    done.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let log = p.log_text();
    assert_eq!(
        status.code(),
        Some(0),
        "{signal}: exit status {status}; log:\n{log}"
    );
    assert!(
        took < Duration::from_secs(10),
        "{signal}: exit took {took:?} (long-polls or the grace period held it); log:\n{log}"
    );
    assert!(log.contains(signal) && log.contains("stopped"), "{log}");

    // Polls waiting when the signal came were answered (not cut off), at once. (A poll sent
    // later may have been refused or cut in its handshake: it was never waiting.)
    let polls = std::mem::take(&mut *polls.lock().unwrap());
    let waiting: Vec<&Poll> = polls
        .iter()
        .filter(|p| p.sent < waiting_since && p.ended >= signalled)
        .collect();
    assert!(!waiting.is_empty(), "no poll was waiting: {polls:?}");
    for poll in &waiting {
        assert!(
            matches!(poll.outcome, Ok(200 | 304)),
            "a waiting long-poll was not answered: {poll:?}"
        );
        assert!(
            poll.ended - signalled < Duration::from_secs(5),
            "a long-poll held on: {poll:?}"
        );
    }

    let acked_groups = groups.lock().unwrap().clone();
    let acked_entries = entries.lock().unwrap().clone();
    eprintln!(
        "{signal}: exit 0 after {took:?}; {} applies, {} registrations, {} heartbeats acknowledged; {} long-polls answered at shutdown",
        acked_groups.len(),
        acked_entries.len(),
        heartbeats.load(Ordering::Relaxed),
        waiting.len()
    );
    let mut again = Control::spawn(data.path(), logs.path(), "info");
    let admin = common::wait_for_server(data.path(), &again.url).await;
    let have = |kind: &'static str| {
        let admin = admin.clone();
        async move {
            let v: Value = admin
                .json(
                    Method::GET,
                    &format!("/v1/admin/objects/{kind}?namespace=load"),
                    None::<&()>,
                )
                .await
                .unwrap();
            v["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
                .collect::<BTreeSet<_>>()
        }
    };
    let lost: Vec<_> = acked_groups
        .difference(&have("workloadgroup").await)
        .cloned()
        .collect();
    assert!(lost.is_empty(), "acknowledged applies lost: {lost:?}");
    let lost: Vec<_> = acked_entries
        .difference(&have("workloadentry").await)
        .cloned()
        .collect();
    assert!(lost.is_empty(), "acknowledged registrations lost: {lost:?}");
    again.signal("TERM");
    let status = again
        .exit_within(vmesh_test_support::eventually::patience())
        .await;
    assert_eq!(status.code(), Some(0), "idle stop: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_0_promptly_and_keeps_every_acknowledged_write() {
    stop_under_load("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_under_load_exits_0_promptly_and_keeps_every_acknowledged_write() {
    stop_under_load("INT").await;
}

/// One run at the most verbose level that registers with a minted token, heartbeats, long-polls,
/// uses the admin credential, and is refused a few ways (a forged token, a VM token on an admin
/// call, a wrong admin credential): neither the token's `jti`, nor the token, nor the admin
/// credential appears anywhere in what it logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_a_token_id_nor_the_admin_credential_is_logged() {
    let data = vmesh_test_support::TempDir::new();
    let logs = vmesh_test_support::TempDir::new();
    let mut p = Control::spawn(data.path(), logs.path(), "trace");
    let admin = common::wait_for_server(data.path(), &p.url).await;
    let admin_credential = std::fs::read_to_string(data.path().join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    admin
        .apply(vec![group_doc("vm-ns", "vms", "vm-sa")], "")
        .await
        .unwrap();
    let token = admin
        .mint_token("vm-ns", "vm-sa", Duration::from_secs(600))
        .await
        .unwrap()
        .token;
    let parts: Vec<&str> = token.split('.').collect();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    let jti = claims["jti"].as_str().unwrap().to_string();
    assert!(jti.len() >= 16, "{claims}");

    let vm = admin.with_token(&token);
    let r: Value = vm
        .json(
            Method::POST,
            "/v1/register",
            Some(&json!({"group": "vms", "namespace": "vm-ns", "address": "10.9.0.1"})),
        )
        .await
        .unwrap();
    vm.call(
        Method::POST,
        "/v1/heartbeat",
        Some(serde_json::to_vec(&r["workloadEntry"]).unwrap()),
    )
    .await
    .unwrap();
    let t = vm.call(Method::GET, "/v1/name-table", None).await.unwrap();
    let v = t.headers["x-vmesh-table-version"].to_str().unwrap();
    vm.call(
        Method::GET,
        &format!("/v1/name-table?version={v}&wait=1"),
        None,
    )
    .await
    .unwrap();
    // Refusals log at warn: each must say why without echoing what it refused.
    let flipped = if parts[2].starts_with('A') { 'B' } else { 'A' };
    let forged = format!("{}.{}.{flipped}{}", parts[0], parts[1], &parts[2][1..]);
    assert!(admin
        .with_token(&forged)
        .call(Method::GET, "/v1/name-table", None)
        .await
        .is_err());
    assert!(vm
        .apply(vec![group_doc("vm-ns", "other", "vm-sa")], "")
        .await
        .is_err());
    let wrong_admin = format!("{admin_credential}0");
    assert!(admin
        .with_token(&wrong_admin)
        .apply(vec![group_doc("vm-ns", "other", "vm-sa")], "")
        .await
        .is_err());
    p.signal("TERM");
    let status = p
        .exit_within(vmesh_test_support::eventually::patience())
        .await;
    assert_eq!(status.code(), Some(0), "{status}");

    let log = p.log_text();
    // The run did log, at every level, including the refusals.
    for expected in [
        "token refused",
        "VM token used on an admin call",
        "/v1/register",
        "stopped",
    ] {
        assert!(log.contains(expected), "no {expected:?} in the log:\n{log}");
    }
    for (what, secret) in [
        ("the token's jti", jti.as_str()),
        ("the token's claims", parts[1]),
        ("the token's signature", &parts[2][1..]),
        ("the admin credential", admin_credential.as_str()),
    ] {
        if let Some(at) = log.find(secret) {
            let line = log[..at].lines().count();
            panic!("{what} is in the log (line {line}):\n{log}");
        }
    }
}
