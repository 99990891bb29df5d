//! vmesh in Istio-managed proxies (docs/istio.md): the resources in `envoy-configs/istio/`
//! checked against Istio's CRD schemas (the pinned npm package in `tests/schemas/`), applied to a
//! representative Istio sidecar and east-west gateway config (`tests/fixtures/istio/`) by the
//! stand-in for istiod (`vmesh_tests::istio`), run through `envoy --mode validate`, and then
//! run: the real Envoy 1.40 with the built `.wasm` and the real shim, answering mesh names on
//! vmesh's DNS listener and routing by SNI on vmesh's gateway port while Istio's own listeners
//! keep serving.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use vmesh_test_support::eventually::eventually;
use vmesh_test_support::process::Proc;
use vmesh_test_support::{dig::dig, free_port, repo_root, TempDir};
use vmesh_tests::istio::{envoyfilter, load, schema, wasmplugin, ProxyKind};
use vmesh_tests::support::echo::Echo;
use vmesh_tests::support::envoy::{http_get, wasm, which};
use vmesh_tests::support::mtls;
use vmesh_tests::support::shim::{Shim, ShimOptions};

/// The labels of the fixtures' proxies, which the resources' selectors are matched against.
const SIDECAR_LABELS: &[(&str, &str)] = &[("app", "python-http")];
const GATEWAY_LABELS: &[(&str, &str)] = &[("istio", "eastwestgateway")];

/// What Istio's CRD schemas (both checks of `vmesh_tests::istio::schema`) say about each
/// resource, in order: empty when it passes.
fn schema_verdicts(resources: &[Value]) -> Vec<Vec<String>> {
    let crd = schema::crd_check(resources).unwrap_or_else(|e| panic!("the CRD check: {e}"));
    let strict = schema::unknown_field_check(resources)
        .unwrap_or_else(|e| panic!("the unknown-field check: {e}"));
    crd.into_iter()
        .zip(strict)
        .map(|(mut c, s)| {
            c.extend(s);
            c
        })
        .collect()
}

#[test]
fn every_resource_passes_the_crd_schema_of_its_kind_and_version() {
    let resources = load::resources();
    let kinds: Vec<&str> = resources
        .iter()
        .filter_map(|(_, r)| r["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"EnvoyFilter") && kinds.contains(&"WasmPlugin"),
        "{kinds:?}"
    );
    let values: Vec<Value> = resources.iter().map(|(_, r)| r.clone()).collect();
    for ((file, r), errors) in resources.iter().zip(schema_verdicts(&values)) {
        assert!(
            errors.is_empty(),
            "{} ({}): {errors:#?}",
            file.display(),
            r["metadata"]["name"]
        );
    }
}

#[test]
fn broken_resources_are_refused_by_the_schema() {
    let filter = load::resources_of("EnvoyFilter").remove(0);
    let plugin = load::resources_of("WasmPlugin").remove(0);
    let broken: Vec<(&str, Value)> = vec![
        ("a misspelt field", {
            let mut r = filter.clone();
            r["spec"]["configPatches"][0]["aplyTo"] = json!("BOOTSTRAP");
            r
        }),
        ("a misspelt field in a listener match", {
            let mut r = filter.clone();
            r["spec"]["configPatches"][1]["match"]["listener"] = json!({"portNumbr": 15153});
            r
        }),
        ("a misspelt field in a WasmPlugin", {
            let mut r = plugin.clone();
            r["spec"]["imagePullPolicyy"] = json!("Always");
            r
        }),
        ("an operation Istio does not have", {
            let mut r = filter.clone();
            r["spec"]["configPatches"][0]["patch"]["operation"] = json!("PREPEND");
            r
        }),
        ("a context Istio does not have", {
            let mut r = filter.clone();
            r["spec"]["configPatches"][1]["match"]["context"] = json!("SIDECAR");
            r
        }),
        ("a port that is not a number", {
            let mut r = filter.clone();
            r["spec"]["configPatches"][1]["match"]["listener"] = json!({"portNumber": "15153"});
            r
        }),
        ("a name that is not a DNS subdomain", {
            let mut r = filter.clone();
            r["metadata"]["name"] = json!("vmesh_sidecar");
            r
        }),
        ("a wrong version", {
            let mut r = filter.clone();
            r["apiVersion"] = json!("networking.istio.io/v1alpha1");
            r
        }),
        ("a plugin type Istio does not have", {
            let mut r = plugin.clone();
            r["spec"]["type"] = json!("TCP");
            r
        }),
        ("a phase Istio does not have", {
            let mut r = plugin.clone();
            r["spec"]["phase"] = json!("LOGGING");
            r
        }),
        ("a match mode as a list", {
            let mut r = plugin.clone();
            r["spec"]["match"] = json!([{"mode": ["CLIENT"]}]);
            r
        }),
    ];
    let (whats, resources): (Vec<&str>, Vec<Value>) = broken.into_iter().unzip();
    let crd = schema::crd_check(&resources).expect("the CRD check");
    let strict = schema::unknown_field_check(&resources).expect("the unknown-field check");
    for ((what, crd), strict) in whats.iter().zip(crd).zip(strict) {
        if what.starts_with("a misspelt") {
            // The CRD validators leave objects open (the API server prunes what it does not
            // know): only the strict check sees a misspelt field, and as an unknown one.
            assert!(crd.is_empty(), "{what}: {crd:?}");
            assert!(
                strict.iter().any(|d| schema::is_unknown_field(d)),
                "{what}: {strict:?}"
            );
        } else {
            assert!(!crd.is_empty(), "{what}: accepted by the CRD schema");
        }
    }
}

/// Istio's own ports and names, which vmesh's listeners and clusters must not take.
const ISTIO_PORTS: std::ops::RangeInclusive<u64> = 15000..=15090;
const ISTIO_NAMES: &[&str] = &[
    "virtualOutbound",
    "virtualInbound",
    "BlackHoleCluster",
    "PassthroughCluster",
    "InboundPassthroughCluster",
    "xds-grpc",
    "sds-grpc",
    "prometheus_stats",
    "agent",
];

#[test]
fn the_resources_add_only_vmesh_names_on_ports_outside_istio_s_and_touch_no_route() {
    for f in load::resources_of("EnvoyFilter") {
        let name = f["metadata"]["name"].clone();
        for p in f["spec"]["configPatches"].as_array().expect("patches") {
            let apply_to = p["applyTo"].as_str().unwrap_or_default();
            let op = p["patch"]["operation"].as_str().unwrap_or_default();
            match (apply_to, op) {
                ("BOOTSTRAP", "MERGE") => {
                    // Only new extensions: nothing of Istio's bootstrap is rewritten.
                    let value = p["patch"]["value"].as_object().expect("a value");
                    assert_eq!(
                        value.keys().collect::<Vec<_>>(),
                        ["bootstrap_extensions"],
                        "{name}"
                    );
                }
                ("CLUSTER" | "LISTENER", "ADD") => {
                    let added = p["patch"]["value"]["name"].as_str().unwrap_or_default();
                    assert!(
                        added.starts_with("vmesh_") && !ISTIO_NAMES.contains(&added),
                        "{name}: {added}"
                    );
                    if apply_to == "LISTENER" {
                        let port =
                            p["patch"]["value"]["address"]["socket_address"]["port_value"].as_u64();
                        assert!(
                            !port.is_some_and(|p| ISTIO_PORTS.contains(&p)),
                            "{name}: {added} listens on {port:?}, one of Istio's"
                        );
                    }
                }
                other => panic!("{name}: {other:?} changes what Istio generates"),
            }
        }
    }
}

/// How many places each patch of each EnvoyFilter changed, by EnvoyFilter name.
type Reach = BTreeMap<String, Vec<usize>>;

/// A fixture with the WasmPlugins and then the EnvoyFilters that select it applied, in
/// istiod's order: WasmPlugins are part of the listeners istiod builds, EnvoyFilters patch
/// what it built (so vmesh's own listeners do not get the WasmPlugin's filter).
fn istio_config(kind: ProxyKind) -> (Value, Reach) {
    let (fixture, labels) = match kind {
        ProxyKind::Sidecar => ("sidecar.yaml", SIDECAR_LABELS),
        ProxyKind::Gateway => ("eastwest-gateway.yaml", GATEWAY_LABELS),
    };
    let mut config = load::fixture(fixture);
    let counts = wasmplugin::apply(&mut config, kind, &load::resources_of("WasmPlugin"))
        .expect("the WasmPlugins translate");
    assert!(
        counts.iter().all(|&n| n > 0),
        "a WasmPlugin found no chain in the {kind:?}: {counts:?}"
    );
    let mut reach = Reach::new();
    for f in load::envoy_filters_for(labels) {
        let applied = envoyfilter::apply(&mut config, kind, &f).expect("the EnvoyFilter applies");
        let name = f["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        reach.insert(name, applied.per_patch);
    }
    (config, reach)
}

fn write_config(dir: &Path, name: &str, config: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(config).expect("JSON")).expect("write");
    path
}

fn envoy_validate(config: &Path) -> Result<(), String> {
    let out = std::process::Command::new(which("envoy"))
        .args(["--mode", "validate", "-c"])
        .arg(config)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn istio_s_configs_with_vmesh_applied_pass_envoy_validate() {
    let dir = TempDir::new();
    let keep = BTreeMap::new();
    let mut reached = Reach::new();
    for (name, kind, fixture) in [
        ("sidecar", ProxyKind::Sidecar, "sidecar.yaml"),
        ("gateway", ProxyKind::Gateway, "eastwest-gateway.yaml"),
    ] {
        let mut plain = load::fixture(fixture);
        load::relocate(&mut plain, &keep, &wasm());
        let path = write_config(dir.path(), &format!("{name}-istio.json"), &plain);
        envoy_validate(&path).unwrap_or_else(|e| panic!("{fixture} as it is: {e}"));
        let (mut patched, reach) = istio_config(kind);
        for (filter, per_patch) in reach {
            let total = reached
                .entry(filter)
                .or_insert_with(|| vec![0; per_patch.len()]);
            total.iter_mut().zip(per_patch).for_each(|(t, n)| *t += n);
        }
        load::relocate(&mut patched, &keep, &wasm());
        let path = write_config(dir.path(), &format!("{name}-vmesh.json"), &patched);
        envoy_validate(&path).unwrap_or_else(|e| panic!("{fixture} with vmesh: {e}"));
    }
    // Every patch of every EnvoyFilter reached a proxy: a typo in a match would make it reach
    // none, silently, in Istio too. (The mesh-wide agent and its clusters reach both.)
    let filters = load::resources_of("EnvoyFilter").len();
    assert_eq!(reached.len(), filters, "{reached:?}");
    for (filter, per_patch) in &reached {
        assert!(per_patch.iter().all(|&n| n >= 1), "{filter}: {per_patch:?}");
    }
}

/// Every well-known port of a fixture and of the resources, each on a free one.
fn free_ports(known: &[u64]) -> BTreeMap<u64, u16> {
    known.iter().map(|&p| (p, free_port())).collect()
}

struct Proxy {
    ports: BTreeMap<u64, u16>,
    _envoy: Proc,
}

impl Proxy {
    /// Starts Envoy on `kind`'s fixture with vmesh applied, after `tweak` (a test's own
    /// change, said where it is made).
    fn start(
        dir: &Path,
        kind: ProxyKind,
        ports: BTreeMap<u64, u16>,
        tweak: impl FnOnce(&mut Value),
    ) -> Proxy {
        let (mut config, _) = istio_config(kind);
        tweak(&mut config);
        load::relocate(&mut config, &ports, &wasm());
        let path = write_config(dir, &format!("{kind:?}.json"), &config);
        let args: Vec<String> = [
            "-c",
            &path.display().to_string(),
            "--concurrency",
            "2",
            "--disable-hot-restart",
            "-l",
            "info",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let envoy = Proc::spawn(
            "envoy",
            &which("envoy"),
            &args,
            &dir.join(format!("{kind:?}-envoy.log")),
        );
        let proxy = Proxy {
            ports,
            _envoy: envoy,
        };
        eventually("envoy is live", || match proxy.get(15000, "/ready") {
            Ok((200, body)) if body.trim() == "LIVE" => Ok(()),
            other => Err(format!("{other:?}")),
        });
        proxy
    }

    fn port(&self, istio: u64) -> u16 {
        self.ports[&istio]
    }

    /// GET on the listener that is `istio` in the fixture.
    fn get(&self, istio: u64, path: &str) -> Result<(u16, String), String> {
        http_get(self.port(istio), path)
    }

    fn stat(&self, name: &str) -> u64 {
        let (_, body) = self
            .get(15000, &format!("/stats?filter=^{name}$"))
            .unwrap_or_default();
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The names of the active listeners.
    fn listeners(&self) -> String {
        self.get(15000, "/listeners")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }
}

/// The real shim beside the proxy, on vmesh's port in Istio (15120), serving the sample
/// name table and receiving the agent's reports.
fn start_shim(dir: &Path, ports: &BTreeMap<u64, u16>) -> Shim {
    Shim::start(
        dir,
        ports[&15120],
        &ShimOptions {
            static_names: Some(repo_root().join("envoy-configs/sample-names.json")),
            // Nothing is forwarded in these tests; an upstream nobody serves keeps the shim
            // off the machine's resolvers.
            upstreams: vec![format!("127.0.0.1:{}", free_port())],
            self_addr: Some(format!("127.0.0.1:{}", ports[&15153])),
            args: vec![
                "--envoy-admin".into(),
                format!("127.0.0.1:{}", ports[&15000]),
            ],
            ..ShimOptions::default()
        },
    )
}

/// The shim has the agent's reports and says the data plane (workers included) is alive.
fn wait_for_reports(shim: &Shim) {
    eventually("the agent's reports reach the shim", || {
        let s = shim.status()?;
        let dp = &s["dataPlane"];
        (dp["state"] == "alive" && dp["reports"].as_u64().unwrap_or(0) > 0)
            .then_some(())
            .ok_or(format!("{dp}"))
    });
}

#[test]
fn an_istio_sidecar_with_vmesh_answers_mesh_names_and_istio_s_listeners_keep_serving() {
    let dir = TempDir::new();
    let ports = free_ports(&[15000, 15001, 15006, 15020, 15021, 15090, 15120, 15153, 80]);
    let shim = start_shim(dir.path(), &ports);
    // The ServiceEntry's listener and cluster on loopback: without Istio's traffic capture
    // nothing reaches a listener that binds no socket, and the endpoint is this test's app.
    let app = Echo::start();
    let app_port = app.port;
    let proxy = Proxy::start(dir.path(), ProxyKind::Sidecar, ports, |c| {
        for l in c["static_resources"]["listeners"]
            .as_array_mut()
            .expect("listeners")
        {
            if l["name"] == "240.240.0.1_80" {
                l["address"]["socket_address"]["address"] = json!("127.0.0.1");
                l.as_object_mut()
                    .expect("a listener")
                    .remove("bind_to_port");
            }
        }
        for cl in c["static_resources"]["clusters"]
            .as_array_mut()
            .expect("clusters")
        {
            if cl["name"] == "outbound|80||vmservice.example.com" {
                cl["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                    ["socket_address"] = json!({"address": "127.0.0.1", "port_value": app_port});
            }
        }
    });

    let dns = proxy.port(15153);
    eventually("a mesh name over UDP on vmesh's DNS listener", || {
        let a = dig(dns, &["vmservice.example.com"])?.data("A");
        (a == ["240.240.0.1"]).then_some(()).ok_or(format!("{a:?}"))
    });
    let tcp = dig(dns, &["+tcp", "details.vm-namespace.svc.cluster.local"]).expect("TCP answer");
    assert_eq!(tcp.data("A"), ["10.96.0.10"], "{}", tcp.raw);
    wait_for_reports(&shim);

    // Istio's listeners are all there and serve as before: Prometheus through Istio's own
    // route (now with vmesh's counters, which its stats matcher lets through), health routed
    // to pilot-agent's port (503: no pilot-agent runs here).
    let listeners = proxy.listeners();
    for name in [
        "virtualOutbound",
        "virtualInbound",
        "240.240.0.1_80",
        "vmesh_dns_tcp",
    ] {
        assert!(listeners.contains(name), "{name} missing: {listeners}");
    }
    let (code, prom) = proxy.get(15090, "/stats/prometheus").expect("15090");
    assert_eq!(code, 200);
    assert!(prom.contains("vmesh_dns_"), "{prom}");
    let (code, _) = proxy.get(15021, "/healthz/ready").expect("15021");
    assert_eq!(
        code, 503,
        "Istio's health route, to pilot-agent that is not here"
    );

    // The WasmPlugin's filter sits on Istio's outbound chains: a connection through the
    // ServiceEntry's chain is counted by it and still goes where Istio's tcp_proxy sends it.
    let (_, dump) = proxy.get(15000, "/config_dump").expect("config_dump");
    assert!(
        dump.contains("istio-system.vmesh-outbound-stats"),
        "no WasmPlugin filter"
    );
    let mut c = TcpStream::connect(("127.0.0.1", proxy.port(80))).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    c.write_all(b"ping\n").expect("write");
    let mut back = [0u8; 5];
    c.read_exact(&mut back)
        .expect("the app's echo through Istio's chain");
    assert_eq!(&back, b"ping\n");
    drop(c);
    eventually("the WasmPlugin's root counts the connection", || {
        let (n, sent) = (
            proxy.stat("wasmcustom.vmesh_outbound_cx_total"),
            proxy.stat("wasmcustom.vmesh_outbound_bytes_sent"),
        );
        (n >= 1 && sent >= 5)
            .then_some(())
            .ok_or(format!("connections {n}, bytes sent {sent}"))
    });
    assert_eq!(app.accepted(), 1);
}

#[test]
fn an_istio_east_west_gateway_with_vmesh_routes_by_sni_on_its_own_port_beside_istio_s() {
    let dir = TempDir::new();
    let ports = free_ports(&[
        15000, 15012, 15020, 15021, 15090, 15443, 15120, 15153, 15543,
    ]);
    let shim = start_shim(dir.path(), &ports);
    let proxy = Proxy::start(dir.path(), ProxyKind::Gateway, ports, |_| {});
    wait_for_reports(&shim);

    // An SNI that is no service port of Istio's form, and one of a service the table does not
    // have: both closed at once and counted (the second only once the table is published,
    // which it says by not counting no_table).
    let tls = proxy.port(15543);
    assert!(mtls::connect_sni(tls, "example.com", None)
        .and_then(|mut c| c.echo("x"))
        .is_err());
    eventually("an unknown SNI is counted", || {
        let n = proxy.stat("wasmcustom.vmesh_gateway_refused_unknown_sni");
        (n >= 1).then_some(()).ok_or(format!("{n}"))
    });
    eventually(
        "an unknown service is refused by the published table",
        || {
            let _ = mtls::connect_sni(tls, "outbound_.80_._.nowhere.example.com", None)
                .and_then(|mut c| c.echo("x"));
            let n = proxy.stat("wasmcustom.vmesh_gateway_refused_unknown_service");
            (n >= 1).then_some(()).ok_or(format!("{n}"))
        },
    );

    let listeners = proxy.listeners();
    for name in ["0.0.0.0_15443", "0.0.0.0_15012", "vmesh_gateway_tls"] {
        assert!(listeners.contains(name), "{name} missing: {listeners}");
    }
    assert!(
        !listeners.contains("vmesh_dns"),
        "sidecar DNS on a gateway: {listeners}"
    );
    let (code, _) = proxy.get(15090, "/stats/prometheus").expect("15090");
    assert_eq!(code, 200);
}
