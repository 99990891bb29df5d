//! Control-plane benchmark: spawns the real `vmesh-control serve` binary on 127.0.0.1 with a
//! fresh data dir and measures, over real HTTPS from this process,
//! - registrations per second on the embedded store (`registrations`),
//! - name-table fan-out: N parked long-polls, time from a change to the last answer (`fanout`),
//! - resident memory per registered VM (`memory`).
//!
//! Results go to stdout as Markdown rows for docs/benchmarks.md.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hyper::Method;
use serde_json::{json, Value};
use vmesh_control::client::Client;
use vmesh_control::config::parse_documents;

#[derive(Debug, Parser)]
struct Cli {
    /// The server binary (build it with `cargo build --profile native -p vmesh-control`).
    #[arg(long, default_value = "target/native/vmesh-control")]
    server_bin: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Registrations per second.
    Registrations {
        #[arg(long, default_value_t = 20_000)]
        vms: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Change-to-last-notification latency with N long-polls parked.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        watchers: usize,
        #[arg(long, default_value_t = 30)]
        rounds: usize,
    },
    /// Resident memory per registered VM.
    Memory {
        #[arg(long, default_value_t = 20_000)]
        vms: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
}

const GROUP_YAML: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: bench, namespace: bench}
spec:
  metadata: {labels: {app: bench}}
  template: {serviceAccount: bench-sa}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bench, namespace: bench}
spec:
  hosts: [bench.example.com]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  resolution: STATIC
  workloadSelector: {labels: {app: bench}}
"#;

struct Server {
    child: Child,
    admin: Client,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    async fn start(bin: &PathBuf) -> anyhow::Result<Server> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(bin)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--log",
                "warn",
            ])
            // Long liveness so no VM times out while the benchmark runs.
            .args(["--heartbeat-interval", "60s", "--liveness-timeout", "600s"])
            .arg("--data-dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let url = format!("https://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let admin = loop {
            if let (Ok(root), Ok(tok)) = (
                std::fs::read(dir.path().join("root-cert.pem")),
                std::fs::read_to_string(dir.path().join("admin-token")),
            ) {
                let c = Client::new(&url, &root, tok.trim())?;
                if c.call(Method::GET, "/healthz", None).await.is_ok() {
                    break c;
                }
            }
            if Instant::now() > deadline {
                bail!("server did not come up");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        admin
            .apply(parse_documents("bench.yaml", GROUP_YAML)?, "")
            .await?;
        Ok(Server {
            child,
            admin,
            _dir: dir,
        })
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS")
    }

    async fn vm_client(&self, ns: &str, sa: &str) -> anyhow::Result<Client> {
        let t = self
            .admin
            .mint_token(ns, sa, Duration::from_secs(3600))
            .await?;
        Ok(self.admin.with_token(&t.token))
    }

    /// Registers VMs `offset..offset + n` (distinct IPs) from `concurrency` kept-alive
    /// connections; returns the elapsed time and each registration's latency.
    async fn register(
        &self,
        offset: usize,
        n: usize,
        concurrency: usize,
    ) -> anyhow::Result<(Duration, Vec<Duration>)> {
        let vm = self.vm_client("bench", "bench-sa").await?;
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(offset));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (vm, next) = (vm.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let mut conn = vm.connect().await?;
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= offset + n {
                        return anyhow::Ok(lat);
                    }
                    let ip = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
                    let t = Instant::now();
                    conn.json::<Value>(
                        Method::POST,
                        vmesh_api::paths::control::REGISTER,
                        Some(&json!({"group": "bench", "address": ip})),
                    )
                    .await?;
                    lat.push(t.elapsed());
                }
            }));
        }
        let mut all = Vec::with_capacity(n);
        for t in tasks {
            all.extend(t.await??);
        }
        Ok((start.elapsed(), all))
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

async fn open_polls(admin: &Client) -> anyhow::Result<i64> {
    let m = admin.call(Method::GET, "/metrics", None).await?;
    let text = String::from_utf8_lossy(&m.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("vmesh_name_table_long_polls "))
        .and_then(|v| v.trim().parse().ok())
        .context("no long-poll gauge")
}

/// The namespace's current table version, once the server has settled (a poll with it waits).
async fn current_version(vm: &Client) -> anyhow::Result<String> {
    let mut version = String::new();
    loop {
        let r = vm
            .call(
                Method::GET,
                &format!(
                    "{}?version={version}&wait=1",
                    vmesh_api::paths::control::NAME_TABLE
                ),
                None,
            )
            .await?;
        let v = r
            .headers
            .get(vmesh_api::paths::header::TABLE_VERSION)
            .context("no version")?
            .to_str()?
            .to_string();
        if r.status.as_u16() == 304 {
            return Ok(v);
        }
        version = v;
    }
}

async fn fanout(s: &Server, watchers: usize, rounds: usize) -> anyhow::Result<()> {
    let vm = s.vm_client("bench", "bench-sa").await?;
    // One kept-alive connection per watcher, as each VM's shim has its own.
    let mut conns = Vec::with_capacity(watchers);
    for _ in 0..watchers {
        conns.push(vm.connect().await?);
    }
    let mut lasts = Vec::new();
    let mut every = Vec::new();
    for round in 0..rounds {
        let version = current_version(&vm).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut handles = Vec::new();
        for mut c in conns.drain(..) {
            let (tx, path) = (
                tx.clone(),
                format!(
                    "{}?version={version}&wait=60",
                    vmesh_api::paths::control::NAME_TABLE
                ),
            );
            handles.push(tokio::spawn(async move {
                let r = c.call(Method::GET, &path, None).await;
                let _ = tx.send((
                    Instant::now(),
                    r.map(|r| {
                        (
                            r.status.as_u16(),
                            r.headers
                                .get(vmesh_api::paths::header::TABLE_VERSION)
                                .map(|v| v.to_str().unwrap_or_default().to_string()),
                        )
                    }),
                ));
                c
            }));
        }
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(30);
        while open_polls(&s.admin).await? < watchers as i64 {
            if Instant::now() > deadline {
                bail!(
                    "only {} of {watchers} long-polls parked",
                    open_polls(&s.admin).await?
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The change: a new ServiceEntry visible to the watchers' namespace.
        let yaml = format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: change-{round}, namespace: bench}}\nspec:\n  hosts: [change-{round}.example.com]\n  addresses: [192.0.2.{}]\n  ports: [{{number: 80, name: http}}]\n  resolution: STATIC\n", round % 250 + 1);
        let documents = parse_documents("change.yaml", &yaml)?;
        let changed_at = Instant::now();
        s.admin.apply(documents, "").await?;
        let mut last = Duration::ZERO;
        while let Some((at, r)) = rx.recv().await {
            let (status, _) = r?;
            if status != 200 {
                bail!("a watcher got {status}");
            }
            let d = at.duration_since(changed_at);
            every.push(d);
            last = last.max(d);
        }
        for h in handles {
            conns.push(h.await?);
        }
        lasts.push(last);
    }
    lasts.sort();
    every.sort();
    println!("| name-table fan-out, {watchers} long-polls, {rounds} changes | change -> last answer: p50 {}, p99 {}, max {}; change -> each answer: p50 {}, p99 {} |",
        ms(pct(&lasts, 0.5)), ms(pct(&lasts, 0.99)), ms(*lasts.last().unwrap_or(&Duration::ZERO)), ms(pct(&every, 0.5)), ms(pct(&every, 0.99)));
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let s = Server::start(&cli.server_bin).await?;
    match cli.cmd {
        Cmd::Registrations { vms, concurrency } => {
            let (took, mut lat) = s.register(0, vms, concurrency).await?;
            lat.sort();
            println!("| registrations, {vms} VMs, {concurrency} connections | {:.0} registrations/s; latency p50 {}, p99 {} |",
                vms as f64 / took.as_secs_f64(), ms(pct(&lat, 0.5)), ms(pct(&lat, 0.99)));
        }
        Cmd::Fanout { watchers, rounds } => fanout(&s, watchers, rounds).await?,
        Cmd::Memory { vms, concurrency } => {
            // Warm up: TLS, a table, a few registrations, so fixed costs are in the baseline.
            let vm = s.vm_client("bench", "bench-sa").await?;
            vm.call(Method::GET, vmesh_api::paths::control::NAME_TABLE, None)
                .await?;
            s.register(0, 1000, concurrency).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let before = s.rss_kib()?;
            s.register(1000, vms, concurrency).await?;
            vm.call(Method::GET, vmesh_api::paths::control::NAME_TABLE, None)
                .await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = s.rss_kib()?;
            let per = (after.saturating_sub(before)) as f64 * 1024.0 / vms as f64;
            println!("| memory, {vms} more VMs registered (after 1,000) | RSS {before} KiB -> {after} KiB: {per:.0} bytes per VM |");
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}
