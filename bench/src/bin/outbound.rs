//! The outbound data path against plain `tcp_proxy`: HTTP/1.1 through one Envoy (one worker)
//! whose listeners differ only in who picks the upstream.
//!
//! - `filter`: the sidecar's outbound chain (vm-sidecar.yaml: `vmesh_outbound` wasm filter ->
//!   `set_filter_state` -> `tcp_proxy`), the table routing its address (a 127.x VIP) to the
//!   backend in plain TCP (`vmesh_passthrough`);
//! - `plain`: `tcp_proxy` to a static cluster with the same backend;
//! - `filter_mtls`: the same filter chain, the table routing to the backend's mTLS port with
//!   its SPIFFE identity (`vmesh_mesh_mtls`: SDS certificate, SAN and SNI from filter state);
//! - `plain_mtls`: `tcp_proxy` to a static cluster with the same client certificate, SAN
//!   check and SNI.
//!
//! The backend is a second Envoy answering `200 ok` itself (plain and mTLS listeners). The
//! table comes from the real `vmesh-shim` (`--static-names`). Per round and side: keep-alive
//! load (requests/s, p50/p99 latency) and connection churn (one request per new connection:
//! connections/s, and the client Envoy's CPU time per connection from /proc). Rounds alternate
//! the order so drift on a shared machine hits both sides alike.
//!
//! `cargo build --release --target wasm32-wasip1 -p vmesh-filter && cargo build --release -p vmesh-shim`
//! `cargo run --release -p vmesh-bench --bin vmesh-bench-outbound -- [ROUNDS] [SECS] [CONNS]`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vmesh_shim::cert::dir::{CertDir, Material};

const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";
const VIP_PLAIN: &str = "127.0.20.1";
const VIP_MTLS: &str = "127.0.20.2";

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A mesh CA; the server's certificate in `server`, the client VM's in `client`.
fn certificates(server: &Path, client: &Path) -> anyhow::Result<()> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "vmesh bench root");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    for (dir, id) in [
        (server, SERVER_ID),
        (client, "spiffe://cluster.local/ns/bench/sa/client"),
    ] {
        let key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
            id.to_string(),
        )?)];
        let cert = p.signed_by(&key, &issuer)?;
        let d = CertDir::new(dir);
        d.prepare()?;
        d.install(&Material {
            key: key.serialize_pem(),
            chain: cert.pem(),
            root: ca_cert.pem(),
        })?;
    }
    Ok(())
}

fn sds(certs: &Path) -> String {
    let c = certs.display();
    format!(
        r#"tls_certificate_sds_secret_configs:
            - name: default
              sds_config: {{resource_api_version: V3, path_config_source: {{path: {c}/sds-default.yaml, watched_directory: {{path: {c}}}}}}}
            validation_context_sds_secret_config:
              name: ROOTCA
              sds_config: {{resource_api_version: V3, path_config_source: {{path: {c}/sds-rootca.yaml, watched_directory: {{path: {c}}}}}}}"#
    )
}

fn backend_config(certs: &Path, admin: u16, http: u16, mtls: u16) -> String {
    let hcm = r#"- name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: backend
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                direct_response: {status: 200, body: {inline_string: "ok"}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}"#;
    let sds = sds(certs);
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
node: {{id: backend, cluster: backend}}
static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: {http}}}}}
    filter_chains:
    - filters:
      {hcm}
  - name: mtls
    address: {{socket_address: {{address: 127.0.0.1, port_value: {mtls}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            {sds}
      filters:
      {hcm}
"#
    )
}

/// The outbound chain exactly as vm-sidecar.yaml has it (read from there, so the benchmark
/// follows the config).
fn outbound_chain() -> anyhow::Result<String> {
    let text = std::fs::read_to_string(repo().join("envoy-configs/vm-sidecar.yaml"))?;
    let start = text
        .find("  - name: outbound\n")
        .context("vm-sidecar.yaml has no outbound listener")?;
    let rest = &text[start..];
    let chain = rest
        .find("    filter_chains:\n")
        .context("outbound listener without filter chains")?;
    let end = rest[chain..]
        .find("\n\n")
        .context("outbound listener not followed by a blank line")?;
    Ok(rest[chain..chain + end].replace(
        "*vmesh_vm",
        "{vm_id: vmesh, runtime: envoy.wasm.runtime.v8, code: {local: {filename: WASM}}}",
    ))
}

struct ClientPorts {
    admin: u16,
    shim: u16,
    filter: u16,
    plain: u16,
    filter_mtls: u16,
    plain_mtls: u16,
    http: u16,
    mtls: u16,
}

fn client_config(certs: &Path, wasm: &Path, p: &ClientPorts) -> anyhow::Result<String> {
    let chain = outbound_chain()?.replace("WASM", &wasm.display().to_string());
    let sds = sds(certs);
    let ClientPorts {
        admin,
        shim,
        filter,
        plain,
        filter_mtls,
        plain_mtls,
        http,
        mtls,
    } = p;
    let mesh_tls = format!(
        r#"transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
            {sds}"#
    );
    let c = certs.display();
    // The same certificate, root, SAN check and SNI as the filter's mTLS, fixed in config.
    let static_tls = format!(
        r#"transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: outbound_.{filter_mtls}_._.bench.example.com
        common_tls_context:
          tls_certificate_sds_secret_configs:
          - name: default
            sds_config: {{resource_api_version: V3, path_config_source: {{path: {c}/sds-default.yaml, watched_directory: {{path: {c}}}}}}}
          combined_validation_context:
            default_validation_context: {{match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{SERVER_ID}"}}}}]}}
            validation_context_sds_secret_config:
              name: ROOTCA
              sds_config: {{resource_api_version: V3, path_config_source: {{path: {c}/sds-rootca.yaml, watched_directory: {{path: {c}}}}}}}"#
    );
    let plain_chain = |name: &str, cluster: &str| {
        format!(
            r#"    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {name}, cluster: {cluster}}}"#
        )
    };
    Ok(format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
node: {{id: bench, cluster: bench}}
bootstrap_extensions:
- name: envoy.bootstrap.wasm
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.wasm.v3.WasmService
    singleton: true
    config:
      name: vmesh_agent
      root_id: vmesh_agent
      configuration: {{"@type": type.googleapis.com/google.protobuf.StringValue, value: "{{}}"}}
      vm_config: {{vm_id: vmesh, runtime: envoy.wasm.runtime.v8, code: {{local: {{filename: {wasm}}}}}}}
static_resources:
  listeners:
  - name: filter
    address: {{socket_address: {{address: {VIP_PLAIN}, port_value: {filter}}}}}
{chain}
  - name: filter_mtls
    address: {{socket_address: {{address: {VIP_MTLS}, port_value: {filter_mtls}}}}}
{chain}
  - name: plain
    address: {{socket_address: {{address: 127.0.0.1, port_value: {plain}}}}}
{plain_http}
  - name: plain_mtls
    address: {{socket_address: {{address: 127.0.0.1, port_value: {plain_mtls}}}}}
{plain_mtls_chain}
  clusters:
  - name: backend_http
    connect_timeout: 5s
    load_assignment: {{cluster_name: backend_http, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {http}}}}}}}}}]}}]}}
  - name: backend_mtls
    connect_timeout: 5s
    load_assignment: {{cluster_name: backend_mtls, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {mtls}}}}}}}}}]}}]}}
    {static_tls}
  - name: vmesh_mesh_mtls
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
    {mesh_tls}
  - name: vmesh_passthrough
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
  - name: vmesh_no_endpoint
    connect_timeout: 1s
    load_assignment: {{cluster_name: vmesh_no_endpoint, endpoints: []}}
  - name: vmesh_shim
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment: {{cluster_name: vmesh_shim, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {shim}}}}}}}}}]}}]}}
  - name: vmesh_admin
    connect_timeout: 1s
    load_assignment: {{cluster_name: vmesh_admin, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}}}]}}]}}
"#,
        wasm = wasm.display(),
        plain_http = plain_chain("plain", "backend_http"),
        plain_mtls_chain = plain_chain("plain_mtls", "backend_mtls"),
    ))
}

fn table(p: &ClientPorts) -> String {
    format!(
        r#"{{"version":"1","namespace":"bench","names":{{}},"services":{{
  "plain.bench.example.com":{{"namespace":"bench","registry":"External","resolution":"STATIC","vips":["{VIP_PLAIN}"],
    "ports":[{{"port":{filter},"endpoints":[{{"address":"127.0.0.1","port":{http},"weight":1}}]}}]}},
  "bench.example.com":{{"namespace":"bench","registry":"External","resolution":"STATIC","vips":["{VIP_MTLS}"],
    "ports":[{{"port":{filter_mtls},"endpoints":[{{"address":"127.0.0.1","port":{mtls},"weight":1,"identity":"{SERVER_ID}"}}]}}]}}
}}}}"#,
        filter = p.filter,
        http = p.http,
        filter_mtls = p.filter_mtls,
        mtls = p.mtls,
    )
}

struct Stop(Child);
impl Drop for Stop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(program: &Path, args: &[String], log: &Path) -> anyhow::Result<Stop> {
    let log = std::fs::File::create(log)?;
    Ok(Stop(
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", program.display()))?,
    ))
}

fn envoy(config: &Path, log: &Path) -> anyhow::Result<Stop> {
    let args = [
        "-c",
        &config.display().to_string(),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "-l",
        "warning",
    ]
    .map(String::from);
    spawn(Path::new("envoy"), &args, log)
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n";
const REQUEST_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n";

/// Reads one response (headers and a Content-Length body) from `s`.
fn response(s: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("closed before a full response");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                bail!("not 200: {head}");
            }
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Ok(());
            }
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// `conns` keep-alive connections sending requests back to back: (requests/s, p50, p99 us).
fn keepalive(port: (&str, u16), conns: usize, secs: f64) -> anyhow::Result<(f64, f64, f64)> {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let addr = format!("{}:{}", port.0, port.1);
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let mut s = TcpStream::connect(&addr)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut lat = Vec::new();
                let mut buf = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    s.write_all(REQUEST)?;
                    response(&mut s, &mut buf)?;
                    lat.push(t.elapsed());
                }
                Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().map_err(|_| anyhow::anyhow!("client thread"))??);
    }
    all.sort();
    Ok((all.len() as f64 / secs, pct(&all, 0.5), pct(&all, 0.99)))
}

/// `conns` threads each opening a connection per request: (connections/s, p99 us, count,
/// failed). A failed request is counted, not fatal: under churn the loopback's ephemeral ports
/// fill with TIME_WAIT sockets (client -> Envoy and Envoy -> backend both take one), and one
/// refused connect must not throw the whole run away; the failures are printed beside it.
fn churn(port: (&str, u16), conns: usize, secs: f64) -> anyhow::Result<(f64, f64, usize, usize)> {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let addr = format!("{}:{}", port.0, port.1);
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || -> (Vec<Duration>, usize) {
                let mut lat = Vec::new();
                let mut failed = 0;
                let mut buf = Vec::new();
                let one = |buf: &mut Vec<u8>| -> anyhow::Result<()> {
                    let mut s = TcpStream::connect(&addr)?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    s.write_all(REQUEST_CLOSE)?;
                    response(&mut s, buf)
                };
                while Instant::now() < end {
                    let t = Instant::now();
                    match one(&mut buf) {
                        Ok(()) => lat.push(t.elapsed()),
                        Err(_) => failed += 1,
                    }
                }
                (lat, failed)
            })
        })
        .collect();
    let (mut all, mut failed) = (Vec::new(), 0);
    for h in handles {
        let (lat, f) = h.join().map_err(|_| anyhow::anyhow!("client thread"))?;
        all.extend(lat);
        failed += f;
    }
    all.sort();
    Ok((all.len() as f64 / secs, pct(&all, 0.99), all.len(), failed))
}

/// User + system CPU time of a process, in microseconds.
fn cpu_us(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    Ok(ticks * 10_000.0)
}

fn stat(admin: u16, name: &str) -> u64 {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", admin)) else {
        return 0;
    };
    let _ = write!(
        s,
        "GET /stats?filter=^{name}$ HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Filter,
    Plain,
    FilterMtls,
    PlainMtls,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: f64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (rounds, secs, conns) = (arg(1, 4.0) as usize, arg(2, 4.0), arg(3, 8.0) as usize);
    let target = repo().join("target");
    let wasm = target.join("wasm32-wasip1/release/vmesh_filter.wasm");
    let shim_bin = target.join("release/vmesh-shim");
    for f in [&wasm, &shim_bin] {
        if !f.exists() {
            bail!("{} missing: build it first (see the header)", f.display());
        }
    }
    let dir = tempfile::tempdir()?;
    let (server_certs, client_certs) = (dir.path().join("server"), dir.path().join("client"));
    certificates(&server_certs, &client_certs)?;
    let p = ClientPorts {
        admin: free_port()?,
        shim: free_port()?,
        filter: free_port()?,
        plain: free_port()?,
        filter_mtls: free_port()?,
        plain_mtls: free_port()?,
        http: free_port()?,
        mtls: free_port()?,
    };
    let backend_admin = free_port()?;
    let backend_path = dir.path().join("backend.yaml");
    std::fs::write(
        &backend_path,
        backend_config(&server_certs, backend_admin, p.http, p.mtls),
    )?;
    let _backend = envoy(&backend_path, &dir.path().join("backend.log"))?;
    let table_path = dir.path().join("table.json");
    std::fs::write(&table_path, table(&p))?;
    let _shim = spawn(
        &shim_bin,
        &[
            "--listen".into(),
            format!("127.0.0.1:{}", p.shim),
            "--static-names".into(),
            table_path.display().to_string(),
            "--upstream".into(),
            "127.0.0.1:9".into(),
        ],
        &dir.path().join("shim.log"),
    )?;
    let client_path = dir.path().join("client.yaml");
    std::fs::write(&client_path, client_config(&client_certs, &wasm, &p)?)?;
    let client = envoy(&client_path, &dir.path().join("client.log"))?;
    let pid = client.0.id();
    // No connection to a filter listener before the table is published: until then the
    // filter passes connections through to their destination, the listener itself.
    let ready = Instant::now() + Duration::from_secs(60);
    while stat(p.admin, "wasmcustom.vmesh_table_updates") < 1 {
        if Instant::now() > ready {
            let log = std::fs::read_to_string(dir.path().join("client.log")).unwrap_or_default();
            bail!("the table never arrived; client Envoy's log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let addr = |side: Side| match side {
        Side::Filter => (VIP_PLAIN, p.filter),
        Side::Plain => ("127.0.0.1", p.plain),
        Side::FilterMtls => (VIP_MTLS, p.filter_mtls),
        Side::PlainMtls => ("127.0.0.1", p.plain_mtls),
    };
    for side in [Side::Filter, Side::Plain, Side::FilterMtls, Side::PlainMtls] {
        let backend = Instant::now() + Duration::from_secs(30);
        while let Err(e) = churn(addr(side), 1, 0.2) {
            if Instant::now() > backend {
                let log =
                    std::fs::read_to_string(dir.path().join("client.log")).unwrap_or_default();
                bail!("{side:?} never answered: {e}; client Envoy's log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!(
        "side        round  req/s  p50_us  p99_us  conn/s  conn_p99_us  cpu_us/conn  conn_failed"
    );
    // Per side: sums of req/s, p50, p99, conn/s, conn p99, cpu per connection.
    let mut sums = [[0.0f64; 6]; 4];
    for r in 0..rounds {
        let mut order = [Side::Filter, Side::Plain, Side::FilterMtls, Side::PlainMtls];
        if r % 2 == 1 {
            order = [Side::Plain, Side::Filter, Side::PlainMtls, Side::FilterMtls];
        }
        for side in order {
            let (rps, p50, p99) = keepalive(addr(side), conns, secs)?;
            let before = cpu_us(pid)?;
            let (cps, cp99, n, failed) = churn(addr(side), conns, secs)?;
            let cpu = (cpu_us(pid)? - before) / n.max(1) as f64;
            println!(
                "{side:<11?} {r}  {rps:.0}  {p50:.0}  {p99:.0}  {cps:.0}  {cp99:.0}  {cpu:.1}  {failed}"
            );
            let s = &mut sums[side as usize];
            for (acc, v) in s.iter_mut().zip([rps, p50, p99, cps, cp99, cpu]) {
                *acc += v / rounds as f64;
            }
        }
    }
    let [f, pl, fm, pm] = sums;
    for (name, a, b) in [("plain", f, pl), ("mTLS", fm, pm)] {
        println!(
            "filter/{name}: req/s {:.2}x, p50 +{:.0} us, p99 +{:.0} us, conn/s {:.2}x, conn p99 +{:.0} us, CPU/conn +{:.1} us ({:.1} vs {:.1})",
            a[0] / b[0],
            a[1] - b[1],
            a[2] - b[2],
            a[3] / b[3],
            a[4] - b[4],
            a[5] - b[5],
            a[5],
            b[5]
        );
    }
    let sent = stat(p.admin, "wasmcustom.vmesh_outbound_cx_total");
    let failed = stat(p.admin, "wasmcustom.vmesh_outbound_cx_failed");
    println!("filter connections: {sent}, failed: {failed}");
    Ok(())
}
