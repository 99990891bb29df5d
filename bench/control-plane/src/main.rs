//! Control-plane benchmark: spawns the real `vmesh-control serve` binary on 127.0.0.1 with a
//! fresh data dir and measures, over real HTTPS from this process,
//! - registrations per second on the embedded store, and with `--etcd` on a one-member etcd
//!   (started here in a temp dir) in the same run (`registrations`),
//! - name-table fan-out: N parked long-polls, time from a change to the last answer (`fanout`),
//! - resident memory per registered VM (`memory`),
//! - a VM's request latency while thousands of idle or slow unauthenticated connections are
//!   held open, against quiet phases interleaved with them (`slow-clients`),
//! - workload certificates signed per second: N clients, each on its own HTTP/2 connection as
//!   a VM's agent is, calling `CreateCertificate` with P-256 CSRs back to back (`certificates`).
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
    /// etcd, for `registrations --etcd` (Debian's `etcd-server`).
    #[arg(long, default_value = "etcd")]
    etcd_bin: PathBuf,
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
        /// Then the same on etcd (`--store etcd`, one member, data on this machine's disk).
        #[arg(long)]
        etcd: bool,
    },
    /// Change-to-last-notification latency with N long-polls parked.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        watchers: usize,
        #[arg(long, default_value_t = 30)]
        rounds: usize,
    },
    /// VM request latency with N idle/slow unauthenticated connections held open, in phases
    /// alternating with quiet ones.
    SlowClients {
        #[arg(long, default_value_t = 2000)]
        attackers: usize,
        /// Pairs of (quiet, attacked) phases.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value_t = 10)]
        phase_secs: u64,
    },
    /// Workload certificates signed per second, and a call's latency.
    Certificates {
        /// Concurrent clients, each on its own connection with one call in flight.
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// Calls measured (after a warm-up of one call per client).
        #[arg(long, default_value_t = 20_000)]
        calls: usize,
    },
    /// Embedded vs etcd with one and three replicas, in one run: registrations per second
    /// (connections spread over the replicas), name-table fan-out (long-polls spread over
    /// them, the change applied on one), resident memory per registered VM per replica.
    Replicas {
        #[arg(long, default_value_t = 10_000)]
        vms: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 10_000)]
        watchers: usize,
        #[arg(long, default_value_t = 20)]
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
  # Only the bench namespace sees the registered VMs: the fan-out's watchers in `watch`
  # get a table of ordinary size (see `fanout`).
  exportTo: ["."]
"#;

/// The namespace whose VMs watch a table that does not hold the registered VMs.
const WATCH_NS: &str = "watch";

struct Server {
    child: Child,
    admin: Client,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One etcd member on free ports with its data in a temp dir; killed when dropped.
struct Etcd {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Etcd {
    async fn start(bin: &PathBuf) -> anyhow::Result<Etcd> {
        let dir = tempfile::tempdir()?;
        let (client, peer) = (free_port()?, free_port()?);
        let c = format!("http://127.0.0.1:{client}");
        let p = format!("http://127.0.0.1:{peer}");
        let child = Command::new(bin)
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args(["--initial-cluster", &format!("bench={p}")])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let e = Etcd {
            child,
            endpoint: c,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", client))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("etcd did not come up");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(e)
    }
}

impl Server {
    async fn start(bin: &PathBuf) -> anyhow::Result<Server> {
        Self::start_with(bin, &[]).await
    }

    /// A server with extra `serve` flags (the store's).
    async fn start_with(bin: &PathBuf, extra: &[String]) -> anyhow::Result<Server> {
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
            // Thousands of VMs under one token, as fast as they go: no per-identity quota.
            .args([
                "--registration-rate",
                "0",
                "--max-entries-per-identity",
                "0",
            ])
            .args(extra)
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
            addr: format!("127.0.0.1:{port}"),
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

    /// CPU time the server has used (user + system), from `/proc/PID/stat`.
    fn cpu(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')').context("no comm in stat")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
        let ticks: u64 = f.get(11).context("no utime")?.parse::<u64>()?
            + f.get(12).context("no stime")?.parse::<u64>()?;
        // USER_HZ, which Linux fixes at 100 for /proc.
        Ok(Duration::from_millis(ticks * 10))
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
        register_on(&[vm], offset, n, concurrency).await
    }
}

/// The bearer token a VM client carries (its requests' `Authorization`).
fn vm_token(c: &Client) -> String {
    c.token().to_string()
}

/// Registers VMs `offset..offset + n` from `concurrency` kept-alive connections, connection
/// `i` to `clients[i % len]` (replicas); the elapsed time and each registration's latency.
async fn register_on(
    clients: &[Client],
    offset: usize,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(offset));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let (vm, next) = (clients[c % clients.len()].clone(), next.clone());
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

async fn replicas(
    cli: &Cli,
    embedded: Server,
    vms: usize,
    concurrency: usize,
    watchers: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let rate = |took: Duration| vms as f64 / took.as_secs_f64();
    let (took, mut lat) = embedded.register(0, vms, concurrency).await?;
    lat.sort();
    println!("| registrations, {vms} VMs, {concurrency} connections, embedded store | {:.0} registrations/s; latency p50 {}, p99 {} |",
        rate(took), ms(pct(&lat, 0.5)), ms(pct(&lat, 0.99)));
    fanout(std::slice::from_ref(&embedded), WATCH_NS, watchers, rounds).await?;
    drop(embedded);
    for n in [1usize, 3] {
        let e = Etcd::start(&cli.etcd_bin).await?;
        let mut servers = Vec::new();
        for i in 0..n {
            let flags = [
                "--store".to_string(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                e.endpoint.clone(),
                "--replica".into(),
                format!("bench-{i}"),
                ONE_SOURCE_FLEET[0].into(),
                ONE_SOURCE_FLEET[1].into(),
            ];
            servers.push(Server::start_with(&cli.server_bin, &flags).await?);
        }
        // A token minted by the first replica registers on every one (shared identity).
        let vm = servers[0].vm_client("bench", "bench-sa").await?;
        let clients: Vec<Client> = servers
            .iter()
            .map(|s| s.admin.with_token(&vm_token(&vm)))
            .collect();
        // Warm-up, so fixed costs are in the memory baseline.
        register_on(&clients, 1_000_000, 1000, concurrency).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before: Vec<u64> = servers
            .iter()
            .map(|s| s.rss_kib())
            .collect::<Result<_, _>>()?;
        let (took, mut lat) = register_on(&clients, 0, vms, concurrency).await?;
        lat.sort();
        println!("| registrations, {vms} VMs, {concurrency} connections, etcd (1 member, {n} replica{}) | {:.0} registrations/s; latency p50 {}, p99 {} |",
            if n > 1 { "s" } else { "" }, rate(took), ms(pct(&lat, 0.5)), ms(pct(&lat, 0.99)));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after: Vec<u64> = servers
            .iter()
            .map(|s| s.rss_kib())
            .collect::<Result<_, _>>()?;
        let per: Vec<String> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| format!("{:.0}", a.saturating_sub(*b) as f64 * 1024.0 / vms as f64))
            .collect();
        println!("| memory per registered VM, each of {n} replica(s) on etcd | {} bytes per VM (RSS growth over {vms} VMs) |", per.join(" / "));
        fanout(&servers, WATCH_NS, watchers, rounds).await?;
    }
    Ok(())
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

/// The namespace's current table version and size, once the server has settled (a poll
/// with it waits).
async fn current_version(vm: &Client) -> anyhow::Result<(String, usize)> {
    let mut version = String::new();
    let mut bytes = 0;
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
            return Ok((v, bytes));
        }
        bytes = r.body.len();
        version = v;
    }
}

/// CPU time used by all of `servers` together.
fn servers_cpu(servers: &[Server]) -> anyhow::Result<Duration> {
    servers.iter().map(Server::cpu).sum()
}

/// Long-polls parked on all of `servers` together.
async fn open_polls_all(servers: &[Server]) -> anyhow::Result<i64> {
    let mut n = 0;
    for s in servers {
        n += open_polls(&s.admin).await?;
    }
    Ok(n)
}

/// `watchers` long-polls spread over `servers` (replicas of one store); each change is
/// applied on the first, and the time runs until the last watcher on any replica answered.
async fn fanout(
    servers: &[Server],
    ns: &str,
    watchers: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let s = servers.first().context("no server")?;
    let vm = s.vm_client(ns, "watch-sa").await?;
    // One kept-alive connection per watcher, as each VM's shim has its own. A watcher connects
    // in its first round and long-polls at once, as a shim does: connections opened up front
    // would sit idle past the server's idle timeout while thousands of others handshake.
    let clients: Vec<Client> = (0..watchers)
        .map(|i| servers[i % servers.len()].admin.with_token(&vm_token(&vm)))
        .collect();
    let handshakes = Arc::new(tokio::sync::Semaphore::new(64));
    let mut conns: Vec<Option<vmesh_control::client::Connection>> =
        (0..watchers).map(|_| None).collect();
    let mut lasts = Vec::new();
    let mut every = Vec::new();
    let mut table_bytes = 0;
    let mut missed = 0usize;
    let mut server_cpu = Duration::ZERO;
    for round in 0..rounds {
        let (version, bytes) = current_version(&vm)
            .await
            .with_context(|| format!("round {round}: the current version"))?;
        table_bytes = bytes;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut handles = Vec::new();
        for (kept, client) in conns.drain(..).zip(&clients) {
            let (tx, path, client, handshakes) = (
                tx.clone(),
                format!(
                    "{}?version={version}&wait=60",
                    vmesh_api::paths::control::NAME_TABLE
                ),
                client.clone(),
                handshakes.clone(),
            );
            handles.push(tokio::spawn(async move {
                let mut c = match kept {
                    Some(c) => c,
                    None => {
                        let _permit = handshakes.acquire_owned().await?;
                        client.connect().await?
                    }
                };
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
                anyhow::Ok(c)
            }));
        }
        drop(tx);
        // Generous for the first round's handshakes (thousands, on a two-core machine).
        let deadline = Instant::now() + Duration::from_secs(30 + watchers as u64 / 100);
        while open_polls_all(servers)
            .await
            .with_context(|| format!("round {round}: counting parked long-polls"))?
            < watchers as i64
        {
            if Instant::now() > deadline {
                bail!(
                    "only {} of {watchers} long-polls parked",
                    open_polls_all(servers).await?
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The change: a new ServiceEntry visible to the watchers' namespace.
        let yaml = format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: change-{round}, namespace: bench}}\nspec:\n  hosts: [change-{round}.example.com]\n  addresses: [192.0.2.{}]\n  ports: [{{number: 80, name: http}}]\n  resolution: STATIC\n", round % 250 + 1);
        let documents = parse_documents("change.yaml", &yaml)?;
        let cpu_before = servers_cpu(servers)?;
        let changed_at = Instant::now();
        s.admin
            .apply(documents, "")
            .await
            .with_context(|| format!("round {round}: applying the change"))?;
        let mut last = Duration::ZERO;
        while let Some((at, r)) = rx.recv().await {
            let (status, _) = r.with_context(|| format!("round {round}: a watcher's long-poll"))?;
            if status != 200 {
                // 304: the poll's 60 s ran out before the change reached it.
                missed += 1;
                continue;
            }
            let d = at.duration_since(changed_at);
            every.push(d);
            last = last.max(d);
        }
        server_cpu += servers_cpu(servers)?.saturating_sub(cpu_before);
        for h in handles {
            conns.push(Some(
                h.await?
                    .with_context(|| format!("round {round}: a watcher"))?,
            ));
        }
        eprintln!("fan-out round {round}: last answer after {}", ms(last));
        lasts.push(last);
    }
    lasts.sort();
    every.sort();
    let on = if servers.len() > 1 {
        format!(", over {} replicas on etcd", servers.len())
    } else {
        String::new()
    };
    println!("| name-table fan-out, {watchers} long-polls in namespace {ns} ({table_bytes}-byte table){on}, {rounds} changes | change -> last answer: p50 {}, p99 {}, max {}; change -> each answer: p50 {}, p99 {}; {missed} polls ended unchanged after 60 s; server CPU {:.0} us per answer |",
        ms(pct(&lasts, 0.5)), ms(pct(&lasts, 0.99)), ms(*lasts.last().unwrap_or(&Duration::ZERO)), ms(pct(&every, 0.5)), ms(pct(&every, 0.99)),
        server_cpu.as_secs_f64() * 1e6 / (every.len().max(1)) as f64);
    Ok(())
}

#[derive(Default)]
struct Attack {
    opened: std::sync::atomic::AtomicU64,
    closed: std::sync::atomic::AtomicU64,
    /// How long connections idle after TLS were held before the server closed them.
    idle_held: std::sync::Mutex<Vec<Duration>>,
}

/// One attacking connection at a time from `source`, re-opened 100 ms after the server closes
/// it: kind 0 sends nothing, 1 half a ClientHello, 2 completes TLS and idles, 3 completes TLS
/// and trickles a request head a byte every 500 ms.
async fn attacker(
    server: std::net::SocketAddr,
    source: std::net::IpAddr,
    kind: usize,
    tls: tokio_rustls::TlsConnector,
    stats: Arc<Attack>,
    done: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 256];
    while !done.load(Relaxed) {
        let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
            return;
        };
        let connected = async {
            sock.bind((source, 0).into())?;
            sock.connect(server).await
        };
        let Ok(mut tcp) = connected.await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        stats.opened.fetch_add(1, Relaxed);
        let t = Instant::now();
        let closed = async {
            match kind {
                0 | 1 => {
                    if kind == 1 {
                        let _ = tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await;
                    }
                    loop {
                        if matches!(tcp.read(&mut buf).await, Ok(0) | Err(_)) {
                            return;
                        }
                    }
                }
                _ => {
                    let Ok(name) = vmesh_control::tls::server_name("127.0.0.1") else {
                        return;
                    };
                    let Ok(mut s) = tls.connect(name, tcp).await else {
                        return;
                    };
                    let head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ";
                    let mut i = 0;
                    loop {
                        if kind == 3 {
                            if s.write_all(&[head[i % head.len()]]).await.is_err() {
                                return;
                            }
                            i += 1;
                        }
                        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf))
                            .await
                        {
                            Ok(Ok(0)) | Ok(Err(_)) => {
                                if kind == 2 {
                                    stats
                                        .idle_held
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .push(t.elapsed());
                                }
                                return;
                            }
                            _ => {}
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = closed => {
                stats.closed.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ = async { while !done.load(Relaxed) { tokio::time::sleep(Duration::from_millis(100)).await } } => return,
        }
    }
}

/// A VM's requests for `secs`: register on a fresh connection (TLS included, as a VM that
/// reconnects), then a heartbeat on it. Latencies of both, and the errors.
async fn vm_phase(vm: &Client, secs: u64, offset: &mut usize) -> (Vec<Duration>, usize) {
    let mut lat = Vec::new();
    let mut errors = 0;
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        *offset += 1;
        let i = *offset;
        let ip = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
        let t = Instant::now();
        let r: Result<Value, _> = vm
            .json(
                Method::POST,
                vmesh_api::paths::control::REGISTER,
                Some(&json!({"group": "bench", "address": ip})),
            )
            .await;
        lat.push(t.elapsed());
        match r {
            Ok(r) => {
                let t = Instant::now();
                let hb = vm
                    .call(
                        Method::POST,
                        vmesh_api::paths::control::HEARTBEAT,
                        Some(serde_json::to_vec(&r["workloadEntry"]).unwrap_or_default()),
                    )
                    .await;
                lat.push(t.elapsed());
                errors += usize::from(hb.is_err());
            }
            Err(_) => errors += 1,
        }
    }
    lat.sort();
    (lat, errors)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

async fn slow_clients(
    s: &Server,
    attackers: usize,
    rounds: usize,
    secs: u64,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let vm = s.vm_client("bench", "bench-sa").await?;
    let root = std::fs::read(s._dir.path().join("root-cert.pem"))?;
    let mut cfg = vmesh_control::tls::client_config(&root)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let server: std::net::SocketAddr = s.addr.parse()?;
    let mut offset = 0;
    let (mut quiet, mut attacked) = (Vec::new(), Vec::new());
    let mut total_errors = (0, 0);
    let mut held = Vec::new();
    vm_phase(&vm, 1, &mut offset).await; // warm-up
    for round in 0..rounds {
        let (lat, errors) = vm_phase(&vm, secs, &mut offset).await;
        eprintln!(
            "round {round} quiet: {} requests, p50 {}, p99 {}, {errors} errors",
            lat.len(),
            ms(pct(&lat, 0.5)),
            ms(pct(&lat, 0.99))
        );
        total_errors.0 += errors;
        quiet.push((pct(&lat, 0.5), pct(&lat, 0.99)));

        let stats = Arc::new(Attack::default());
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for i in 0..attackers {
            // Four source addresses: the per-source cap (1,000) admits 500 from each.
            let source = std::net::IpAddr::from([127, 0, 0, 2 + (i % 4) as u8]);
            tasks.push(tokio::spawn(attacker(
                server,
                source,
                (i / 4) % 4,
                tls.clone(),
                stats.clone(),
                done.clone(),
            )));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while stats.opened.load(Relaxed) < attackers as u64 {
            if Instant::now() > deadline {
                bail!(
                    "only {} attacking connections opened",
                    stats.opened.load(Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let open = metric(&s.admin, "vmesh_connections_open")
            .await
            .unwrap_or(-1.0);
        let (lat, errors) = vm_phase(&vm, secs, &mut offset).await;
        eprintln!("round {round} attacked ({open} connections open at the start): {} requests, p50 {}, p99 {}, {errors} errors; attackers opened {}, server closed {}",
            lat.len(), ms(pct(&lat, 0.5)), ms(pct(&lat, 0.99)), stats.opened.load(Relaxed), stats.closed.load(Relaxed));
        total_errors.1 += errors;
        attacked.push((pct(&lat, 0.5), pct(&lat, 0.99)));
        done.store(true, Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        held.extend(
            stats
                .idle_held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .copied(),
        );
        // Let the server see the attackers' closes before the next quiet phase.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let q50 = median(quiet.iter().map(|x| x.0).collect());
    let q99 = median(quiet.iter().map(|x| x.1).collect());
    let a50 = median(attacked.iter().map(|x| x.0).collect());
    let a99 = median(attacked.iter().map(|x| x.1).collect());
    held.sort();
    println!("| VM requests with {attackers} idle/slow unauthenticated connections held, {rounds} interleaved rounds of {secs} s | quiet p50 {}, p99 {}; attacked p50 {}, p99 {} (medians of rounds); p99 ratio {:.2}; errors quiet {}, attacked {}; idle-after-TLS connections closed after p50 {}, max {} |",
        ms(q50), ms(q99), ms(a50), ms(a99), a99.as_secs_f64() / q99.as_secs_f64().max(1e-9), total_errors.0, total_errors.1, ms(pct(&held, 0.5)), ms(held.last().copied().unwrap_or_default()));
    Ok(())
}

/// `clients` connections call `CreateCertificate` back to back until `calls` have been
/// answered. The CSRs are made beforehand (one key per client, as a VM has one), so the
/// client's share of the CPU is TLS, HTTP/2 and prost, not key generation.
async fn certificates(s: &Server, clients: usize, calls: usize) -> anyhow::Result<()> {
    let vm = s.vm_client("bench", "bench-sa").await?;
    let spiffe = "spiffe://cluster.local/ns/bench/sa/bench-sa";
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        let key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![rcgen::SanType::URI(spiffe.to_string().try_into()?)];
        let req = vmesh_api::ca::IstioCertificateRequest {
            csr: p.serialize_request(&key)?.pem()?,
            validity_duration: 24 * 3600,
            metadata: None,
        };
        let mut conn = vm.connect_grpc().await?;
        // Warm-up: the connection's first call.
        conn.create_certificate(&req, "Kubernetes")
            .await?
            .map_err(|(code, m)| anyhow::anyhow!("refused: {code} {m}"))?;
        conns.push((conn, req));
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (mut conn, req) in conns {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < calls {
                let t = Instant::now();
                conn.create_certificate(&req, "Kubernetes")
                    .await?
                    .map_err(|(code, m)| anyhow::anyhow!("refused: {code} {m}"))?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::with_capacity(calls);
    for t in tasks {
        all.extend(t.await??);
    }
    let took = start.elapsed();
    all.sort();
    let issued = metric(&s.admin, "vmesh_certificates_issued_total").await;
    println!(
        "| workload certificates, P-256 CSRs, {clients} clients (own h2 connection each) | {:.0} certificates/s; call latency p50 {}, p99 {} ({} calls; server counted {:?} issued) |",
        all.len() as f64 / took.as_secs_f64(),
        ms(pct(&all, 0.5)),
        ms(pct(&all, 0.99)),
        all.len(),
        issued
    );
    Ok(())
}

async fn metric(admin: &Client, name: &str) -> Option<f64> {
    let r = admin.call(Method::GET, "/metrics", None).await.ok()?;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Every simulated VM connects from 127.0.0.1, where a real fleet has one address per VM: the
/// per-source cap (1,000 by default) is lifted to the total cap, except for `slow-clients`,
/// which measures that cap at work.
const ONE_SOURCE_FLEET: [&str; 2] = ["--max-connections-per-source", "20000"];

async fn run(cli: Cli) -> anyhow::Result<()> {
    let fleet = ONE_SOURCE_FLEET.map(String::from);
    let s = match cli.cmd {
        Cmd::SlowClients { .. } => Server::start(&cli.server_bin).await?,
        _ => Server::start_with(&cli.server_bin, &fleet).await?,
    };
    match cli.cmd {
        Cmd::Registrations {
            vms,
            concurrency,
            etcd,
        } => {
            let (took, mut lat) = s.register(0, vms, concurrency).await?;
            lat.sort();
            println!("| registrations, {vms} VMs, {concurrency} connections, embedded store | {:.0} registrations/s; latency p50 {}, p99 {} |",
                vms as f64 / took.as_secs_f64(), ms(pct(&lat, 0.5)), ms(pct(&lat, 0.99)));
            if etcd {
                drop(s);
                let e = Etcd::start(&cli.etcd_bin).await?;
                let flags = [
                    "--store".to_string(),
                    "etcd".into(),
                    "--etcd-endpoints".into(),
                    e.endpoint.clone(),
                    ONE_SOURCE_FLEET[0].into(),
                    ONE_SOURCE_FLEET[1].into(),
                ];
                let s = Server::start_with(&cli.server_bin, &flags).await?;
                let (took, mut lat) = s.register(0, vms, concurrency).await?;
                lat.sort();
                println!("| registrations, {vms} VMs, {concurrency} connections, etcd (1 member, 1 replica) | {:.0} registrations/s; latency p50 {}, p99 {} |",
                    vms as f64 / took.as_secs_f64(), ms(pct(&lat, 0.5)), ms(pct(&lat, 0.99)));
            }
        }
        Cmd::Fanout { watchers, rounds } => {
            fanout(std::slice::from_ref(&s), WATCH_NS, watchers, rounds).await?
        }
        Cmd::Replicas {
            vms,
            concurrency,
            watchers,
            rounds,
        } => replicas(&cli, s, vms, concurrency, watchers, rounds).await?,
        Cmd::SlowClients {
            attackers,
            rounds,
            phase_secs,
        } => slow_clients(&s, attackers, rounds, phase_secs).await?,
        Cmd::Certificates { clients, calls } => certificates(&s, clients, calls).await?,
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
