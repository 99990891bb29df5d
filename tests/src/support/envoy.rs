//! A real Envoy running `envoy-configs/vm-sidecar.yaml` with the built filter, on per-test ports.

use super::artifact;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmesh_test_support::eventually::eventually;
use vmesh_test_support::process::Proc;
use vmesh_test_support::{free_port, repo_root};

const WASM_IN_CONFIG: &str = "target/wasm32-wasip1/release/vmesh_filter.wasm";

#[derive(Debug)]
pub struct Envoy {
    pub admin: u16,
    pub dns: u16,
    pub doh: u16,
    /// The inbound mTLS listener (15006 in the config).
    pub inbound: u16,
    /// Where Envoy reads the VM's certificate (SDS files).
    pub cert_dir: PathBuf,
    ports: Ports,
    proc: Proc,
}

/// The directory of SDS files in `vm-sidecar.yaml`, replaced by each test's.
pub const CERT_DIR_IN_CONFIG: &str = "/var/lib/vmesh/certs";

pub fn wasm() -> PathBuf {
    artifact(
        "VMESH_FILTER_WASM",
        "wasm32-wasip1/release/vmesh_filter.wasm",
        "cargo build --release --target wasm32-wasip1 -p vmesh-filter",
    )
}

/// The sidecar config with its well-known ports and its certificate directory replaced by
/// this test's. The inbound listener listens on loopback only, the outbound one on
/// `ports.outbound_ip` (a loopback address a test's table may use as a VIP: without the
/// capture rules, a connection's original destination is the listener's own address).
pub fn render_config(ports: Ports, shim: u16, cert_dir: &Path) -> String {
    let Ports {
        admin,
        dns,
        doh,
        inbound,
        app,
        outbound,
        outbound_ip,
    } = ports;
    let text = std::fs::read_to_string(repo_root().join("envoy-configs/vm-sidecar.yaml"))
        .expect("read vm-sidecar.yaml");
    let mut out = text.replace(WASM_IN_CONFIG, &wasm().display().to_string());
    assert!(
        out.contains(CERT_DIR_IN_CONFIG),
        "vm-sidecar.yaml no longer reads {CERT_DIR_IN_CONFIG}"
    );
    out = out.replace(CERT_DIR_IN_CONFIG, &cert_dir.display().to_string());
    out = out.replace(
        "address: 0.0.0.0, port_value: 15006",
        "address: 127.0.0.1, port_value: 15006",
    );
    let outbound_bind = "address: 0.0.0.0, port_value: 15001";
    assert!(
        out.contains(outbound_bind),
        "vm-sidecar.yaml no longer has {outbound_bind}"
    );
    out = out.replace(
        outbound_bind,
        &format!("address: {outbound_ip}, port_value: 15001"),
    );
    let direct = "destination_port: 15006}";
    assert!(
        out.contains(direct),
        "vm-sidecar.yaml no longer has {direct}"
    );
    out = out.replace(direct, &format!("destination_port: {inbound}}}"));
    for (from, to) in [
        (15000, admin),
        (15053, dns),
        (15054, doh),
        (15020, shim),
        (15006, inbound),
        (15001, outbound),
        (8080, app),
    ] {
        let needle = format!("port_value: {from}}}");
        assert!(
            out.contains(&needle),
            "vm-sidecar.yaml no longer has {needle}"
        );
        out = out.replace(&needle, &format!("port_value: {to}}}"));
    }
    out
}

/// Where an Envoy listens, so a restarted one can listen there again, and the app port its
/// inbound listener forwards to.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub admin: u16,
    pub dns: u16,
    pub doh: u16,
    pub inbound: u16,
    pub app: u16,
    /// The outbound listener (15001 in the config) and the address it binds.
    pub outbound: u16,
    pub outbound_ip: std::net::Ipv4Addr,
}

impl Ports {
    pub fn free() -> Ports {
        Ports {
            admin: free_port(),
            dns: free_port(),
            doh: free_port(),
            inbound: free_port(),
            app: free_port(),
            outbound: free_port(),
            outbound_ip: std::net::Ipv4Addr::LOCALHOST,
        }
    }
}

/// Makes sure the SDS files Envoy's config names exist, as installing the VM would (Envoy
/// refuses to start without them). A shim that writes them first wins: placeholders are
/// only created where nothing is, and the shim's later rename replaces them.
pub fn prepare_cert_dir(cert_dir: &Path) {
    std::fs::create_dir_all(cert_dir).expect("create the cert dir");
    for name in [
        vmesh_api::ca::files::SDS_DEFAULT,
        vmesh_api::ca::files::SDS_ROOTCA,
    ] {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(cert_dir.join(name));
    }
}

impl Envoy {
    /// Starts Envoy (two workers, so the table must reach more than one VM) and waits until
    /// its admin endpoint says it is live.
    pub fn start(dir: &Path, shim_port: u16) -> Envoy {
        Envoy::start_on(dir, shim_port, Ports::free(), 2)
    }

    /// Starts Envoy on `ports` with `concurrency` worker threads.
    pub fn start_on(dir: &Path, shim_port: u16, ports: Ports, concurrency: u32) -> Envoy {
        let envoy = Envoy::spawn(dir, shim_port, ports, concurrency);
        envoy.wait_live();
        envoy
    }

    /// Starts Envoy without waiting for it to be live ([`Envoy::wait_live`]); see
    /// `Shim::spawn` for why.
    pub fn spawn(dir: &Path, shim_port: u16, ports: Ports, concurrency: u32) -> Envoy {
        let Ports {
            admin,
            dns,
            doh,
            inbound,
            ..
        } = ports;
        let cert_dir = dir.join("certs");
        prepare_cert_dir(&cert_dir);
        let config = dir.join(format!("envoy-{dns}.yaml"));
        std::fs::write(&config, render_config(ports, shim_port, &cert_dir)).expect("write config");
        let args = vec![
            "-c".to_string(),
            config.display().to_string(),
            "--concurrency".into(),
            concurrency.to_string(),
            "--disable-hot-restart".into(),
            "-l".into(),
            "info".into(),
        ];
        let program = which("envoy");
        let proc = Proc::spawn(
            "envoy",
            &program,
            &args,
            &dir.join(format!("envoy-{dns}.log")),
        );
        Envoy {
            admin,
            dns,
            doh,
            inbound,
            cert_dir,
            ports,
            proc,
        }
    }

    pub fn wait_live(&self) {
        eventually("envoy is live", || match self.admin_get("/ready") {
            Ok((200, body)) if body.trim() == "LIVE" => Ok(()),
            other => Err(format!("{other:?}")),
        });
    }

    /// GET on the admin endpoint: (status, body).
    pub fn admin_get(&self, path: &str) -> Result<(u16, String), String> {
        http_get(self.admin, path)
    }

    /// A stat's current value (counters and gauges), 0 when it does not exist yet.
    pub fn stat(&self, name: &str) -> u64 {
        let (_, body) = self
            .admin_get(&format!("/stats?filter=^{name}$"))
            .unwrap_or_default();
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    pub fn is_running(&mut self) -> bool {
        !self.proc.exited()
    }

    pub fn ports(&self) -> Ports {
        self.ports
    }

    /// The running process (for signals).
    pub fn process(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Sends Envoy a signal by name (`STOP` hangs it, `CONT` resumes it).
    pub fn signal(&self, signal: &str) {
        self.proc.signal(signal);
    }
}

pub fn which(program: &str) -> PathBuf {
    vmesh_test_support::which(program)
        .unwrap_or_else(|| panic!("{program} is not on PATH: run scripts/setup.sh"))
}

/// A minimal HTTP/1.1 GET (the admin API is plain text; no client library needed).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let status = raw
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or(format!("bad response: {raw}"))?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

/// Undoes HTTP/1.1 chunked transfer coding.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
