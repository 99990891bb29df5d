//! The scenario, step by step. Each step checks what it shows and fails with a
//! [`DemoError`] when it does not hold; [`Mode`] only changes how it prints.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmesh_test_support::eventually::try_eventually_within;
use vmesh_test_support::netns::{self, As};
use vmesh_test_support::process::Proc;
use vmesh_test_support::{artifact, repo_root, which};

use crate::topology::{Leg, Network, Node, Topology};
use crate::{interrupt, DemoError};

pub const NET_A: Network = Network {
    name: "network-a",
    tag: "a",
    third_octet: 1,
};
pub const NET_B: Network = Network {
    name: "network-b",
    tag: "b",
    third_octet: 2,
};

/// A nameserver nobody runs (the VMs' resolv.conf names it): queries to it are captured into
/// Envoy, which answers mesh names; other names find no resolver.
pub const RESOLVER: &str = "198.18.3.53";

/// The group Envoy and the shim run as: the capture rules leave its traffic alone.
pub const PROXY_GID: u32 = 1337;

const VM_NAMESPACE: &str = "vm-services";
const SERVICE_HOST: &str = "vmservice.example.com";
const HTTPBIN_HOST: &str = "httpbin.default.svc.cluster.local";
const HTTPBIN_PORT: u16 = 8000;
const APP_PORT: u16 = 9090;
const HTTPBIN_APP_PORT: u16 = 8080;
/// The name the shim dials and the control plane's serving certificate carries.
const DISCOVERY_HOST: &str = "istiod.istio-system.svc";
const CP_PORT: u16 = 15012;
/// The east-west gateway's mTLS passthrough port (Istio's 15443).
const GATEWAY_PORT: u16 = vmesh_api::traffic::GATEWAY_PORT;

/// The control plane's timings: short, so the demo shows a replica leaving within seconds.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(3);
pub const GRACE_PERIOD: Duration = Duration::from_secs(5);

/// The seed's Istio config, as an Istio user writes it, plus the client's and httpbin's groups
/// and httpbin's Service. One file for the demo and the compose file, which applies it as is.
pub const MESH_YAML: &str = include_str!("../../envoy-configs/compose/mesh.yaml");

/// How the scenario prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// For a person: coloured headings, every command and its output.
    Show,
    /// For the test: the same lines without colour; the logs are removed when it passes.
    Check,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    /// How many times the client asks vmservice.example.com.
    pub requests: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Show,
            requests: 8,
        }
    }
}

/// What the scenario saw; the test asserts on it beyond the checks the steps make.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every namespace the run created.
    pub namespaces: Vec<String>,
    /// The pids of every program it started.
    pub pids: Vec<u32>,
    /// Auto-registered WorkloadEntries by name: address.
    pub entries: BTreeMap<String, String>,
    /// What vmservice.example.com resolved to on the client.
    pub service_vip: String,
    /// Per request from the client, the WorkloadEntry that answered.
    pub answers: Vec<String>,
    /// httpbin's answer through the east-west gateway.
    pub httpbin: String,
    /// Connections the gateway routed on 15443 (its `vmesh_gateway_cx_routed`).
    pub gateway_routed: u64,
    /// From stopping a replica's Envoy until it no longer answers.
    pub left_answers_after: Option<Duration>,
    /// From stopping it until its WorkloadEntry was deleted.
    pub entry_deleted_after: Option<Duration>,
}

/// Prints as the mode says.
#[derive(Debug, Clone, Copy)]
struct Out(Mode);

impl Out {
    fn step(&self, text: &str) {
        match self.0 {
            Mode::Show => println!("\n\x1b[1;34m== {text}\x1b[0m"),
            Mode::Check => println!("\n== {text}"),
        }
    }
    fn cmd(&self, where_: &str, text: &str) {
        match self.0 {
            Mode::Show => println!("\x1b[1m[{where_}]$ {text}\x1b[0m"),
            Mode::Check => println!("[{where_}]$ {text}"),
        }
    }
    fn text(&self, text: &str) {
        let t = text.trim_end();
        if !t.is_empty() {
            println!("{t}");
        }
    }
}

fn fail(what: &str, detail: impl std::fmt::Display) -> DemoError {
    DemoError::Step {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}

/// Fails with [`DemoError::Interrupted`] once Ctrl-C was pressed.
fn check_interrupt() -> Result<(), DemoError> {
    if interrupt::requested() {
        Err(DemoError::Interrupted)
    } else {
        Ok(())
    }
}

/// Polls `check` until it holds, for at most `patience`; stops early on Ctrl-C.
fn wait<T>(
    what: &str,
    patience: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, DemoError> {
    let got = try_eventually_within(what, patience, || {
        if interrupt::requested() {
            return Ok(None);
        }
        check().map(Some)
    })
    .map_err(|e| fail(what, e))?;
    got.ok_or(DemoError::Interrupted)
}

/// The built programs the scenario runs.
#[derive(Debug, Clone)]
struct Programs {
    control: PathBuf,
    shim: PathBuf,
    wasm: PathBuf,
    envoy: PathBuf,
    python: PathBuf,
}

impl Programs {
    /// The built artifacts (a panic that says how to build one that is missing) and the
    /// programs on PATH.
    fn find() -> Result<Programs, DemoError> {
        let on_path = |p: &str| {
            which(p).ok_or_else(|| {
                DemoError::Missing(format!("{p} on PATH (scripts/setup.sh installs it)"))
            })
        };
        for p in ["ip", "iptables-save", "setpriv", "curl", "dig"] {
            on_path(p)?;
        }
        Ok(Programs {
            control: artifact(
                "VMESH_CONTROL_BIN",
                "release/vmesh-control",
                "cargo build --release -p vmesh-control",
            ),
            shim: artifact(
                "VMESH_SHIM_BIN",
                "release/vmesh-shim",
                "cargo build --release -p vmesh-shim",
            ),
            wasm: artifact(
                "VMESH_FILTER_WASM",
                "wasm32-wasip1/release/vmesh_filter.wasm",
                "cargo build --release --target wasm32-wasip1 -p vmesh-filter",
            ),
            envoy: on_path("envoy")?,
            python: on_path("python3")?,
        })
    }
}

/// One VM: its namespace, and its app, shim and Envoy (in drop order: Envoy first).
#[derive(Debug)]
struct Vm {
    node: Node,
    /// The WorkloadGroup it registers with.
    group: &'static str,
    envoy: Option<Proc>,
    shim: Option<Proc>,
    app: Option<Proc>,
}

/// Everything running; dropped in field order: programs first, then the namespaces, then the
/// run directory.
#[derive(Debug)]
struct Demo {
    out: Out,
    vms: Vec<Vm>,
    gateway: Vec<Proc>,
    control: Option<Proc>,
    topology: Topology,
    programs: Programs,
    cp: Node,
    gw: Node,
    dir: PathBuf,
    report: Report,
}

/// Runs the scenario from nothing to torn down. The namespaces and programs are gone when it
/// returns, whether it passed, failed or was interrupted.
pub fn run(options: &Options) -> Result<Report, DemoError> {
    if let Some(why) = netns::unavailable() {
        return Err(DemoError::Unavailable(why));
    }
    let programs = Programs::find()?;
    remove_leftovers();
    let dir = std::env::temp_dir().join(format!("vmesh-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| fail("create the run directory", e))?;
    let out = Out(options.mode);
    let mut demo = Demo::start(out, programs, dir.clone())?;
    let result = demo.play(options);
    let mut report = demo.report.clone();
    out.step("Teardown: every program, firewall rule, interface and namespace");
    report.pids = demo.pids();
    report.namespaces = demo.topology.namespaces();
    drop(demo);
    let kept = match (&result, options.mode) {
        (Ok(()), Mode::Check) => {
            let _ = std::fs::remove_dir_all(&dir);
            false
        }
        _ => true,
    };
    if kept {
        println!("logs: {}", dir.display());
    }
    result.map(|()| report)
}

/// Namespaces of demo runs whose process is gone (killed before its teardown ran).
fn remove_leftovers() {
    for ns in netns::list("vmesh-demo-") {
        let pid = ns
            .trim_start_matches("vmesh-demo-")
            .split('-')
            .next()
            .unwrap_or_default()
            .to_string();
        if !Path::new("/proc").join(&pid).exists() {
            netns::delete(&ns);
        }
    }
}

impl Demo {
    /// The networks and their namespaces.
    fn start(out: Out, programs: Programs, dir: PathBuf) -> Result<Demo, DemoError> {
        out.step("1. Two networks in network namespaces (198.18.0.0/15), no route between them");
        let mut topology = Topology::new();
        topology.add_network(NET_A);
        topology.add_network(NET_B);
        let leg = |network, host| Leg { network, host };
        let cp = topology.add_node("cp", &[leg(NET_A, 10)], false);
        let gw = topology.add_node("gw", &[leg(NET_A, 2), leg(NET_B, 2)], false);
        let mut vms = Vec::new();
        for (name, group, l) in [
            ("vm-a1", "python-http", leg(NET_A, 21)),
            ("vm-a2", "python-http", leg(NET_A, 22)),
            ("httpbin", "httpbin", leg(NET_A, 30)),
            ("client", "client", leg(NET_B, 40)),
        ] {
            let node = topology.add_node(name, &[l], true);
            netns::set_resolv_conf(&node.ns, &format!("nameserver {RESOLVER}\n"));
            vms.push(Vm {
                node,
                group,
                envoy: None,
                shim: None,
                app: None,
            });
        }
        for n in std::iter::once(&cp)
            .chain(std::iter::once(&gw))
            .chain(vms.iter().map(|v| &v.node))
        {
            let addrs: Vec<String> = n
                .legs
                .iter()
                .map(|l| format!("{} {}", l.network.name, l.addr()))
                .collect();
            out.text(&format!("{:<8} {:<28} {}", n.name, n.ns, addrs.join(", ")));
        }
        Ok(Demo {
            out,
            vms,
            gateway: Vec::new(),
            control: None,
            topology,
            programs,
            cp,
            gw,
            dir,
            report: Report::default(),
        })
    }

    fn pids(&self) -> Vec<u32> {
        let vm_pids = self
            .vms
            .iter()
            .flat_map(|v| [&v.envoy, &v.shim, &v.app])
            .filter_map(|p| p.as_ref().and_then(Proc::pid));
        self.gateway
            .iter()
            .filter_map(Proc::pid)
            .chain(self.control.as_ref().and_then(Proc::pid))
            .chain(vm_pids)
            .collect()
    }

    fn play(&mut self, options: &Options) -> Result<(), DemoError> {
        self.control_plane()?;
        check_interrupt()?;
        self.gateway()?;
        check_interrupt()?;
        self.start_vms()?;
        check_interrupt()?;
        self.registered()?;
        check_interrupt()?;
        self.names()?;
        check_interrupt()?;
        self.requests(options.requests)?;
        check_interrupt()?;
        self.through_gateway()?;
        check_interrupt()?;
        self.replica_leaves()?;
        Ok(())
    }

    /// `vmesh-control ARGS` in the control plane's namespace, against it.
    fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let data = self.dir.join("cp");
        let server = format!("https://127.0.0.1:{CP_PORT}");
        let mut all = vec!["--server", &server, "--data-dir"];
        let data = data.display().to_string();
        all.push(&data);
        all.extend_from_slice(args);
        netns::exec(
            &self.cp.ns,
            &self.programs.control.display().to_string(),
            &all,
        )
        .result()
    }

    /// Runs and shows `vmesh-control ARGS`.
    fn show_ctl(&self, args: &[&str]) -> Result<String, DemoError> {
        self.out
            .cmd(&self.cp.name, &format!("vmesh-control {}", args.join(" ")));
        let text = self
            .ctl(args)
            .map_err(|e| fail(&format!("vmesh-control {}", args.join(" ")), e))?;
        self.out.text(&text);
        Ok(text)
    }

    fn control_plane(&mut self) -> Result<(), DemoError> {
        self.out.step(&format!(
            "2. The control plane in {} ({}:{CP_PORT})",
            NET_A.name,
            self.cp.addr()
        ));
        let data = self.dir.join("cp").display().to_string();
        // Istio's meshNetworks: network-a is reached from other networks through the
        // gateway's network-b address.
        let gw_b = self.gw.addr_in(NET_B).unwrap_or(Ipv4Addr::UNSPECIFIED);
        let networks = format!(
            "networks:\n  {a}:\n    endpoints:\n    - fromRegistry: Kubernetes\n    gateways:\n    \
             - address: {gw_b}\n      port: {GATEWAY_PORT}\n",
            a = NET_A.name,
        );
        let networks_file = self.dir.join("mesh-networks.yaml");
        std::fs::write(&networks_file, &networks).map_err(|e| fail("write meshNetworks", e))?;
        let networks_file = networks_file.display().to_string();
        let args: Vec<String> = [
            "serve",
            "--mesh-networks",
            &networks_file,
            "--data-dir",
            &data,
            "--listen",
            &format!("0.0.0.0:{CP_PORT}"),
            "--heartbeat-interval",
            &format!("{}ms", HEARTBEAT.as_millis()),
            "--liveness-timeout",
            &format!("{}ms", LIVENESS_TIMEOUT.as_millis()),
            "--grace-period",
            &format!("{}ms", GRACE_PERIOD.as_millis()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.out
            .text(&format!("meshNetworks (--mesh-networks):\n{networks}"));
        self.out.text(&format!(
            "heartbeats every {HEARTBEAT:?}; a silent VM is disconnected after {LIVENESS_TIMEOUT:?} \
             and its entry deleted {GRACE_PERIOD:?} later"
        ));
        let control = self.programs.control.display().to_string();
        self.control = Some(Proc::spawn(
            "vmesh-control",
            Path::new("ip"),
            &netns::exec_args(&self.cp.ns, As::Caller, &control, &args),
            &self.dir.join("control.log"),
        ));
        wait("the control plane answers", patience(), || {
            self.ctl(&["get", "workloadgroups", "-A"]).map(drop)
        })?;
        let manifest = self.dir.join("mesh.yaml");
        std::fs::write(&manifest, MESH_YAML).map_err(|e| fail("write mesh.yaml", e))?;
        self.out.text(MESH_YAML);
        self.show_ctl(&["apply", "-f", &manifest.display().to_string()])?;
        Ok(())
    }

    /// The east-west gateway: `envoy-configs/eastwest-gateway.yaml` with the filter, and a
    /// shim in gateway role for its table.
    fn gateway(&mut self) -> Result<(), DemoError> {
        let b = self.gw.addr_in(NET_B).unwrap_or(Ipv4Addr::UNSPECIFIED);
        let a = self.gw.addr_in(NET_A).unwrap_or(Ipv4Addr::UNSPECIFIED);
        self.out.step(&format!(
            "3. The east-west gateway: {a} in network-a, {b} in network-b (no IP forwarding); \
             {GATEWAY_PORT} mTLS passed through by SNI, {CP_PORT} to the control plane"
        ));
        let dir = self.dir.join("gw");
        std::fs::create_dir_all(&dir).map_err(|e| fail("create the gateway's directory", e))?;
        let bundle = self.bundle("istio-eastwestgateway", "istio-system", self.cp.addr())?;
        let shim = self.programs.shim.display().to_string();
        let shim_args: Vec<String> = [
            "--bundle",
            &bundle.display().to_string(),
            "--role",
            "gateway",
            "--address",
            &a.to_string(),
            "--state-dir",
            &dir.join("state").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.out.cmd(
            &self.gw.name,
            &format!("vmesh-shim --bundle {} --role gateway &", bundle.display()),
        );
        self.gateway.push(Proc::spawn(
            "gateway shim",
            Path::new("ip"),
            &netns::exec_args(&self.gw.ns, As::Caller, &shim, &shim_args),
            &dir.join("shim.log"),
        ));
        let config = dir.join("eastwest-gateway.yaml");
        std::fs::write(
            &config,
            gateway_config(&self.programs.wasm, self.cp.addr())?,
        )
        .map_err(|e| fail("write the gateway's config", e))?;
        self.out.cmd(
            &self.gw.name,
            "envoy -c envoy-configs/eastwest-gateway.yaml &",
        );
        let envoy = self.programs.envoy.display().to_string();
        let args = envoy_args(&config);
        self.gateway.push(Proc::spawn(
            "gateway envoy",
            Path::new("ip"),
            &netns::exec_args(&self.gw.ns, As::Caller, &envoy, &args),
            &dir.join("envoy.log"),
        ));
        wait("the gateway's Envoy is live", patience(), || {
            envoy_ready(&self.gw.ns)
        })?;
        // Network B reaches the control plane only through the gateway.
        let client = self.client()?.node.clone();
        let code = |addr: Ipv4Addr| {
            let url = format!("https://{addr}:{CP_PORT}/");
            let args = [
                "-sk",
                "-m",
                "2",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &url,
            ];
            let out = netns::exec(&client.ns, "curl", &args);
            (format!("curl -sk -w '%{{http_code}}' {url}"), out)
        };
        let (cmd, direct) = code(self.cp.addr());
        self.out.cmd(&client.name, &cmd);
        if direct.ok {
            return Err(fail(
                "network-b is cut off from network-a",
                format!(
                    "the client reached the control plane directly: {}",
                    direct.stdout
                ),
            ));
        }
        self.out.text(&format!(
            "{} (no route: network-b reaches network-a only through the gateway)",
            direct.stderr.trim()
        ));
        let (cmd, via) = code(b);
        self.out.cmd(&client.name, &cmd);
        let via = via
            .result()
            .map_err(|e| fail("the control plane through the gateway", e))?;
        self.out.text(&format!(
            "HTTP {via} (the control plane, through the gateway)"
        ));
        Ok(())
    }

    /// A VM bundle for `group` whose hosts file points the discovery name at `via`.
    fn bundle(&self, group: &str, namespace: &str, via: Ipv4Addr) -> Result<PathBuf, DemoError> {
        let out = self.dir.join(format!("bundle-{group}"));
        if !out.exists() {
            self.show_ctl(&[
                "vm-bundle",
                "--group",
                group,
                "-n",
                namespace,
                "-o",
                &out.display().to_string(),
            ])?;
        }
        // One bundle per way in: the client reaches the control plane through the gateway.
        let copy = self.dir.join(format!("bundle-{group}-{via}"));
        if !copy.exists() {
            std::fs::create_dir_all(&copy).map_err(|e| fail("copy the bundle", e))?;
            for f in ["cluster.env", "mesh.yaml", "root-cert.pem", "istio-token"] {
                std::fs::copy(out.join(f), copy.join(f)).map_err(|e| fail("copy the bundle", e))?;
            }
            std::fs::write(copy.join("hosts"), format!("{via} {DISCOVERY_HOST}\n"))
                .map_err(|e| fail("write the bundle's hosts file", e))?;
        }
        Ok(copy)
    }

    fn start_vms(&mut self) -> Result<(), DemoError> {
        self.out.step(
            "4. The VMs: app, shim from the VM bundle, Envoy with vmesh_filter.wasm, traffic capture",
        );
        let cp = self.cp.addr();
        let gw_b = self.gw.addr_in(NET_B).unwrap_or(Ipv4Addr::UNSPECIFIED);
        for i in 0..self.vms.len() {
            let (group, node) = (self.vms[i].group, self.vms[i].node.clone());
            let namespace = if group == "httpbin" {
                "default"
            } else {
                VM_NAMESPACE
            };
            // Network B has no route to the control plane: its VMs dial the gateway.
            let via = if node.addr_in(NET_B).is_some() {
                gw_b
            } else {
                cp
            };
            let bundle = self.bundle(group, namespace, via)?;
            let vm = self.start_vm(&node, group, &bundle)?;
            self.vms[i].app = vm.0;
            self.vms[i].shim = Some(vm.1);
            self.vms[i].envoy = Some(vm.2);
            check_interrupt()?;
        }
        for vm in &self.vms {
            wait(
                &format!("{}'s Envoy is live", vm.node.name),
                patience(),
                || envoy_ready(&vm.node.ns),
            )?;
        }
        Ok(())
    }

    /// Starts one VM's programs and installs its capture rules.
    fn start_vm(
        &self,
        node: &Node,
        group: &str,
        bundle: &Path,
    ) -> Result<(Option<Proc>, Proc, Proc), DemoError> {
        let dir = self.dir.join(&node.name);
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).map_err(|e| fail("create the VM's directory", e))?;
        let python = self.programs.python.display().to_string();
        let app = match group {
            "client" => None,
            "httpbin" => {
                let args = vec![
                    repo_root()
                        .join("scripts/demo/httpbin.py")
                        .display()
                        .to_string(),
                    "--port".into(),
                    HTTPBIN_APP_PORT.to_string(),
                ];
                self.out.cmd(
                    &node.name,
                    &format!("httpbin.py --port {HTTPBIN_APP_PORT} &"),
                );
                Some(Proc::spawn(
                    "httpbin",
                    Path::new("ip"),
                    &netns::exec_args(&node.ns, As::Caller, &python, &args),
                    &dir.join("app.log"),
                ))
            }
            _ => {
                let args = vec![
                    repo_root()
                        .join("scripts/demo/app.py")
                        .display()
                        .to_string(),
                    "--port".into(),
                    APP_PORT.to_string(),
                    "--bind".into(),
                    "0.0.0.0".into(),
                    "--unready".into(),
                    dir.join("unready").display().to_string(),
                    "--name".into(),
                    node.name.clone(),
                ];
                self.out.cmd(
                    &node.name,
                    &format!("app.py --port {APP_PORT} --name {} &", node.name),
                );
                Some(Proc::spawn(
                    "app",
                    Path::new("ip"),
                    &netns::exec_args(&node.ns, As::Caller, &python, &args),
                    &dir.join("app.log"),
                ))
            }
        };
        let shim = self.programs.shim.display().to_string();
        let shim_args: Vec<String> = vec![
            "--bundle".into(),
            bundle.display().to_string(),
            "--address".into(),
            node.addr().to_string(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--cert-dir".into(),
            certs.display().to_string(),
        ];
        self.out.cmd(
            &node.name,
            &format!("vmesh-shim --bundle {} &", bundle.display()),
        );
        let shim = Proc::spawn_guarded(
            "vmesh-shim",
            Path::new("ip"),
            &netns::exec_args(&node.ns, As::Group(PROXY_GID), &shim, &shim_args),
            &dir.join("shim.log"),
        );
        // Envoy refuses a config whose SDS files do not exist yet; the shim replaces these
        // with the VM's certificate.
        for f in [
            vmesh_api::ca::files::SDS_DEFAULT,
            vmesh_api::ca::files::SDS_ROOTCA,
        ] {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(certs.join(f));
        }
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, sidecar_config(&self.programs.wasm, &certs)?)
            .map_err(|e| fail("write the VM's Envoy config", e))?;
        self.out
            .cmd(&node.name, "envoy -c envoy-configs/vm-sidecar.yaml &");
        let envoy = self.programs.envoy.display().to_string();
        let envoy = Proc::spawn_guarded(
            "envoy",
            Path::new("ip"),
            &netns::exec_args(&node.ns, As::Group(PROXY_GID), &envoy, &envoy_args(&config)),
            &dir.join("envoy.log"),
        );
        let cluster_env = bundle.join("cluster.env").display().to_string();
        let gid = PROXY_GID.to_string();
        let capture = [
            "capture",
            "install",
            "--cluster-env",
            &cluster_env,
            "--proxy-gid",
            &gid,
        ];
        self.out
            .cmd(&node.name, &format!("vmesh-shim {}", capture.join(" ")));
        let text = netns::exec(
            &node.ns,
            &self.programs.shim.display().to_string(),
            &capture,
        )
        .result()
        .map_err(|e| fail(&format!("capture install on {}", node.name), e))?;
        self.out.text(&text);
        Ok((app, shim, envoy))
    }

    /// Waits for every VM's WorkloadEntry and shows them.
    fn registered(&mut self) -> Result<(), DemoError> {
        self.out
            .step("5. The auto-registered WorkloadEntries (nobody touched the control plane)");
        let want: Vec<(String, String)> = self
            .vms
            .iter()
            .map(|v| {
                let ns = if v.group == "httpbin" {
                    "default"
                } else {
                    VM_NAMESPACE
                };
                (ns.to_string(), v.node.addr().to_string())
            })
            .collect();
        let entries = wait("every VM registered and healthy", patience() * 2, || {
            let mut found = BTreeMap::new();
            for (ns, addr) in &want {
                let list = self.entries(ns)?;
                let e = list
                    .iter()
                    .find(|e| e["spec"]["address"] == addr.as_str())
                    .ok_or_else(|| format!("no entry for {addr} in {ns}"))?;
                if healthy(e) == Some(false) {
                    return Err(format!("{addr} is not healthy yet"));
                }
                let name = e["metadata"]["name"].as_str().unwrap_or_default();
                found.insert(name.to_string(), addr.clone());
            }
            Ok(found)
        })?;
        self.report.entries = entries;
        self.show_ctl(&["get", "workloadentries", "-n", VM_NAMESPACE])?;
        self.show_ctl(&["get", "workloadentries", "-n", "default"])?;
        Ok(())
    }

    /// WorkloadEntries of `namespace` as JSON objects.
    fn entries(&self, namespace: &str) -> Result<Vec<serde_json::Value>, String> {
        let text = self.ctl(&["get", "workloadentries", "-n", namespace, "-o", "json"])?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        Ok(match v.get("items") {
            Some(serde_json::Value::Array(items)) => items.clone(),
            _ => v.as_array().cloned().unwrap_or_default(),
        })
    }

    fn client(&self) -> Result<&Vm, DemoError> {
        self.vms
            .iter()
            .find(|v| v.group == "client")
            .ok_or_else(|| fail("find the client VM", "none"))
    }

    /// Mesh names answered through the client's Envoy (its DNS is captured).
    fn names(&mut self) -> Result<(), DemoError> {
        let client = self.client()?.node.clone();
        self.out.step(&format!(
            "6. Mesh names on the client ({}, {}), answered by the filter in its Envoy",
            client.addr(),
            NET_B.name
        ));
        let dig = |name: &str| {
            netns::exec(&client.ns, "dig", &["+short", "+tries=1", "+time=2", name]).result()
        };
        for name in [SERVICE_HOST, HTTPBIN_HOST] {
            let got = wait(
                &format!("{name} resolves on the client"),
                patience(),
                || {
                    let out = dig(name)?;
                    match out.lines().next() {
                        Some(ip) if ip.parse::<Ipv4Addr>().is_ok() => Ok(out.clone()),
                        _ => Err(format!("no address yet: {out:?}")),
                    }
                },
            )?;
            self.out.cmd(&client.name, &format!("dig +short {name}"));
            self.out.text(&got);
            if name == SERVICE_HOST {
                self.report.service_vip = got.lines().next().unwrap_or_default().to_string();
            }
        }
        Ok(())
    }

    /// curl on the client (a fresh connection each time, captured into its Envoy).
    fn curl(&self, url: &str) -> Result<String, String> {
        let client = &self.client().map_err(|e| e.to_string())?.node;
        netns::exec(&client.ns, "curl", &["-sS", "-m", "5", "--fail", url]).result()
    }

    /// Which WorkloadEntry a python-http answer ("hello from vm-a1") came from.
    fn answered_by(&self, body: &str) -> Option<String> {
        let vm = body.trim().strip_prefix("hello from ")?;
        let addr = self.vms.iter().find(|v| v.node.name == vm)?.node.addr();
        self.report
            .entries
            .iter()
            .find(|(_, a)| **a == addr.to_string())
            .map(|(name, _)| name.clone())
    }

    /// The client asks vmservice.example.com until both replicas have answered.
    fn requests(&mut self, count: usize) -> Result<(), DemoError> {
        let client = self.client()?.node.clone();
        let url = format!("http://{SERVICE_HOST}/");
        self.out.step(&format!(
            "7. curl {url} from the client: its Envoy picks a replica, mutual TLS across the \
             east-west gateway into {}",
            NET_A.name
        ));
        wait(
            "the first answer from vmservice.example.com",
            patience(),
            || self.curl(&url),
        )?;
        self.out
            .cmd(&client.name, &format!("curl -s {url}   # {count} times"));
        let replicas: BTreeMap<&String, &String> = self
            .report
            .entries
            .iter()
            .filter(|(name, _)| name.starts_with("python-http-"))
            .collect();
        let mut answers = Vec::new();
        // Connections are balanced one by one; keep asking (a few times more at most) until
        // each replica has answered once.
        for i in 0..count * 4 {
            check_interrupt()?;
            let all_seen = replicas.keys().all(|r| answers.contains(*r));
            if i >= count && all_seen {
                break;
            }
            let body = self
                .curl(&url)
                .map_err(|e| fail(&format!("request {} to {url}", i + 1), e))?;
            let entry = self
                .answered_by(&body)
                .ok_or_else(|| fail("tell who answered", format!("{body:?}")))?;
            self.out
                .text(&format!("{:>2}: {:<20} <- {entry}", i + 1, body.trim()));
            answers.push(entry);
        }
        for r in replicas.keys() {
            if !answers.contains(*r) {
                return Err(fail(
                    "both replicas answer",
                    format!("{r} never answered in {} requests", answers.len()),
                ));
            }
        }
        self.report.answers = answers;
        Ok(())
    }

    /// The client reaches httpbin (a cluster workload in network A) through the gateway.
    fn through_gateway(&mut self) -> Result<(), DemoError> {
        let client = self.client()?.node.clone();
        let url = format!("http://{HTTPBIN_HOST}:{HTTPBIN_PORT}/get");
        self.out.step(&format!(
            "8. curl {url} from the client: the Kubernetes Service httpbin.default, through the \
             east-west gateway"
        ));
        let body = wait("httpbin answers the client", patience(), || {
            let b = self.curl(&url)?;
            if b.contains("\"url\"") {
                Ok(b)
            } else {
                Err(format!("not httpbin's answer: {b:?}"))
            }
        })?;
        self.out.cmd(&client.name, &format!("curl -s {url}"));
        self.out.text(&body);
        self.report.httpbin = body;
        // The gateway's own count says the connections went through it.
        let routed = "wasmcustom.vmesh_gateway_cx_routed";
        let stats = netns::exec(
            &self.gw.ns,
            "curl",
            &[
                "-s",
                "-m",
                "2",
                &format!("http://127.0.0.1:15000/stats?filter={routed}"),
            ],
        )
        .result()
        .map_err(|e| fail("the gateway's stats", e))?;
        self.out.cmd(
            &self.gw.name,
            &format!("curl -s 'localhost:15000/stats?filter={routed}'"),
        );
        self.out.text(&stats);
        let count: u64 = stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{routed}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if count == 0 {
            return Err(fail(
                "the client's connections went through the gateway",
                format!("{routed} is 0"),
            ));
        }
        self.report.gateway_routed = count;
        Ok(())
    }

    /// One replica's Envoy stops: it leaves the answers, then its entry is deleted.
    fn replica_leaves(&mut self) -> Result<(), DemoError> {
        let Some(i) = self.vms.iter().position(|v| v.node.name == "vm-a2") else {
            return Err(fail("find vm-a2", "none"));
        };
        let gone = self.vms[i].node.clone();
        let entry = self
            .report
            .entries
            .iter()
            .find(|(_, a)| **a == gone.addr().to_string())
            .map(|(n, _)| n.clone())
            .unwrap_or_default();
        self.out.step(&format!(
            "9. {}'s Envoy stops: its entry turns unhealthy, leaves the answers, and is deleted \
             after the grace period ({GRACE_PERIOD:?})",
            gone.name
        ));
        self.out.cmd(&gone.name, "kill $(pidof envoy)");
        if let Some(mut envoy) = self.vms[i].envoy.take() {
            envoy.kill();
        }
        let stopped = Instant::now();
        let url = format!("http://{SERVICE_HOST}/");
        // Left: this many answers in a row from the others.
        const IN_A_ROW: usize = 6;
        let mut row = 0;
        let mut n = 0;
        let deadline = LIVENESS_TIMEOUT + GRACE_PERIOD + patience();
        while row < IN_A_ROW {
            check_interrupt()?;
            if stopped.elapsed() > deadline {
                return Err(fail(
                    &format!("{entry} leaves the answers"),
                    format!("still answering or failing after {deadline:?}"),
                ));
            }
            n += 1;
            let t = stopped.elapsed().as_secs_f32();
            match self.curl(&url) {
                Ok(body) => {
                    let who = self.answered_by(&body).unwrap_or_default();
                    if who == entry {
                        row = 0;
                    } else {
                        row += 1;
                    }
                    self.out
                        .text(&format!("{t:>5.1}s {n:>2}: {:<20} <- {who}", body.trim()));
                }
                Err(e) => {
                    row = 0;
                    self.out
                        .text(&format!("{t:>5.1}s {n:>2}: failed: {}", e.trim()));
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let left = stopped.elapsed();
        self.report.left_answers_after = Some(left);
        self.out.text(&format!(
            "{entry} left the answers {:.1}s after its Envoy stopped",
            left.as_secs_f32()
        ));
        wait(&format!("{entry} is deleted"), deadline, || {
            match self
                .entries(VM_NAMESPACE)?
                .iter()
                .any(|e| e["metadata"]["name"] == entry.as_str())
            {
                true => Err("still there".to_string()),
                false => Ok(()),
            }
        })?;
        let deleted = stopped.elapsed();
        self.report.entry_deleted_after = Some(deleted);
        self.out.text(&format!(
            "{entry} deleted {:.1}s after its Envoy stopped",
            deleted.as_secs_f32()
        ));
        self.show_ctl(&["get", "workloadentries", "-n", VM_NAMESPACE])?;
        Ok(())
    }
}

fn patience() -> Duration {
    vmesh_test_support::eventually::patience()
}

/// Whether an entry's Healthy condition is true; `None` without one (no health checks).
fn healthy(entry: &serde_json::Value) -> Option<bool> {
    entry["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Healthy")
        .map(|c| c["status"] == "True")
}

fn envoy_args(config: &Path) -> Vec<String> {
    vec![
        "-c".into(),
        config.display().to_string(),
        "--concurrency".into(),
        "1".into(),
        "--disable-hot-restart".into(),
        "-l".into(),
        "warning".into(),
    ]
}

/// Envoy's admin `/ready` in namespace `ns` says LIVE.
fn envoy_ready(ns: &str) -> Result<(), String> {
    let out = netns::exec(
        ns,
        "curl",
        &["-s", "-m", "2", "http://127.0.0.1:15000/ready"],
    )
    .result()?;
    if out.trim() == "LIVE" {
        Ok(())
    } else {
        Err(format!("not live: {out:?}"))
    }
}

/// Where the Envoy configs name the built filter (relative to the repository root).
const WASM_IN_CONFIG: &str = "target/wasm32-wasip1/release/vmesh_filter.wasm";

/// `envoy-configs/vm-sidecar.yaml` as a VM runs it: the built `.wasm` by its full path, the
/// certificate directory this VM's shim fills. Ports stay Istio's: each VM has its own
/// loopback.
fn sidecar_config(wasm: &Path, certs: &Path) -> Result<String, DemoError> {
    const CERTS_IN_CONFIG: &str = "/var/lib/vmesh/certs";
    let text = std::fs::read_to_string(repo_root().join("envoy-configs/vm-sidecar.yaml"))
        .map_err(|e| fail("read envoy-configs/vm-sidecar.yaml", e))?;
    if !text.contains(WASM_IN_CONFIG) || !text.contains(CERTS_IN_CONFIG) {
        return Err(fail(
            "render vm-sidecar.yaml",
            format!("it no longer names {WASM_IN_CONFIG} and {CERTS_IN_CONFIG}"),
        ));
    }
    Ok(text
        .replace(WASM_IN_CONFIG, &wasm.display().to_string())
        .replace(CERTS_IN_CONFIG, &certs.display().to_string()))
}

/// `envoy-configs/eastwest-gateway.yaml` as the gateway runs it: the built `.wasm` by its
/// full path, the control plane's address in network-a.
fn gateway_config(wasm: &Path, cp: Ipv4Addr) -> Result<String, DemoError> {
    const CP_IN_CONFIG: &str = "address: vmesh-control, port_value: 15012}";
    let text = std::fs::read_to_string(repo_root().join("envoy-configs/eastwest-gateway.yaml"))
        .map_err(|e| fail("read envoy-configs/eastwest-gateway.yaml", e))?;
    if !text.contains(WASM_IN_CONFIG) || !text.contains(CP_IN_CONFIG) {
        return Err(fail(
            "render eastwest-gateway.yaml",
            format!("it no longer names {WASM_IN_CONFIG} and {CP_IN_CONFIG}"),
        ));
    }
    Ok(text
        .replace(WASM_IN_CONFIG, &wasm.display().to_string())
        .replace(
            CP_IN_CONFIG,
            &format!("address: {cp}, port_value: {CP_PORT}}}"),
        ))
}
