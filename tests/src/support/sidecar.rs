//! The whole VM-side data plane for one test: dnsmasq (system resolver), the shim, and Envoy
//! with the filter, wired together on this test's ports.

use super::dnsmasq::Dnsmasq;
use super::envoy::Envoy;
use super::shim::{Shim, ShimOptions};
use std::path::PathBuf;
use vmesh_test_support::dig::{dig, Dig};
use vmesh_test_support::eventually::eventually;

/// The VM's namespace in the test table.
pub const NAMESPACE: &str = "vm-namespace";

/// The table every DNS test starts from (the shape `docs/name-table.md` describes).
pub fn test_table(version: &str) -> serde_json::Value {
    let big: Vec<String> = (1..=100).map(|i| format!("240.240.1.{i}")).collect();
    serde_json::json!({
        "version": version,
        "namespace": NAMESPACE,
        "domain": "cluster.local",
        "searchDomains": ["vm-namespace.svc.cluster.local", "svc.cluster.local", "cluster.local", "corp.example"],
        "names": {
            "vmservice.example.com": {"ips": ["240.240.0.1"], "registry": "External"},
            "*.wild.example.com": {"ips": ["240.240.0.2"], "registry": "External"},
            "big.mesh.example.com": {"ips": big, "registry": "External"},
            "details.vm-namespace.svc.cluster.local": {
                "ips": ["10.96.0.10", "fd00:10:96::a"], "registry": "Kubernetes",
                "shortname": "details", "namespace": "vm-namespace"
            },
            "helloworld.sample.svc.cluster.local": {
                "ips": ["10.96.12.34"], "registry": "Kubernetes",
                "shortname": "helloworld", "namespace": "sample"
            },
            "rr.example.com": {"ips": ["240.240.2.1", "240.240.2.2", "240.240.2.3"], "registry": "External"}
        }
    })
}

#[derive(Debug, Clone)]
pub struct SidecarOptions {
    /// The name table file the shim serves; `None` starts the shim without a table source.
    pub table: Option<serde_json::Value>,
    /// Start the shim at all.
    pub shim: bool,
    /// Upstreams for the shim; default: the fixture's dnsmasq.
    pub upstreams: Option<Vec<String>>,
    /// The shim's upstream budget (default 5 s).
    pub forward_timeout: Option<String>,
}

impl Default for SidecarOptions {
    fn default() -> Self {
        SidecarOptions {
            table: Some(test_table("v1")),
            shim: true,
            upstreams: None,
            forward_timeout: None,
        }
    }
}

#[derive(Debug)]
pub struct Sidecar {
    // Field order is drop order: Envoy first, then the processes it talks to.
    pub envoy: Envoy,
    pub shim: Option<Shim>,
    pub dnsmasq: Dnsmasq,
    pub shim_port: u16,
    pub names_file: PathBuf,
    pub dir: vmesh_test_support::TempDir,
}

impl Sidecar {
    /// The usual setup; returns once a mesh name is answered (the table reached the workers).
    pub fn start() -> Sidecar {
        let s = Sidecar::start_with(SidecarOptions::default());
        s.wait_for_table();
        s
    }

    pub fn start_with(opts: SidecarOptions) -> Sidecar {
        let dir = vmesh_test_support::TempDir::new();
        let dnsmasq = Dnsmasq::start(dir.path());
        let names_file = dir.path().join("names.json");
        if let Some(table) = &opts.table {
            write_table(&names_file, table);
        }
        let shim_port = Shim::reserve_port();
        let envoy = Envoy::start(dir.path(), shim_port);
        let shim = opts.shim.then(|| {
            Shim::start(
                dir.path(),
                shim_port,
                &ShimOptions {
                    static_names: opts.table.is_some().then(|| names_file.clone()),
                    upstreams: opts
                        .upstreams
                        .clone()
                        .unwrap_or_else(|| vec![dnsmasq.addr()]),
                    self_addr: Some(format!("127.0.0.1:{}", envoy.dns)),
                    forward_timeout: opts.forward_timeout.clone(),
                    ..ShimOptions::default()
                },
            )
        });
        Sidecar {
            envoy,
            shim,
            dnsmasq,
            shim_port,
            names_file,
            dir,
        }
    }

    pub fn wait_for_table(&self) {
        eventually("the mesh name table reaches every worker", || {
            // Several queries, so more than one worker (and UDP session) is likely asked.
            for _ in 0..4 {
                let d = self.dig(&["vmservice.example.com"])?;
                if d.data("A") != ["240.240.0.1"] {
                    return Err(format!("not yet: {} {:?}", d.status, d.answers));
                }
            }
            Ok(())
        });
    }

    pub fn dig(&self, args: &[&str]) -> Result<Dig, String> {
        dig(self.envoy.dns, args)
    }

    /// dig that must get an answer.
    pub fn ask(&self, args: &[&str]) -> Dig {
        self.dig(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Replaces the table file the way an editor does (write elsewhere, rename over).
    pub fn replace_table(&self, table: &serde_json::Value) {
        write_table(&self.names_file, table);
    }
}

fn write_table(path: &std::path::Path, table: &serde_json::Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(table).expect("serialize table"),
    )
    .expect("write table");
    std::fs::rename(&tmp, path).expect("rename table");
}
