//! Istio conformance, services side: ServiceEntry resolutions, Kubernetes Services, host
//! conflicts, auto-allocated VIPs and validation. Black-box through the HTTPS API (and the
//! CLI for `get`): apply YAML, register, read objects and name tables. Each test names the
//! Istio (or Kubernetes) function whose behaviour it checks.

mod common;

use std::process::Command;

use common::{status_of, Options, TestServer};
use hyper::Method;
use serde_json::{json, Value};
use vmesh_api::names::{NameTable, Registry, Resolution};
use vmesh_control::client::Client;
use vmesh_control::registry::Settings;
use vmesh_test_support::eventually::assert_eventually_async;

/// The first table for the admin's view of `ns` that satisfies `ok`.
async fn table_where(s: &TestServer, ns: &str, ok: impl Fn(&NameTable) -> bool) -> NameTable {
    let deadline = std::time::Instant::now() + vmesh_test_support::eventually::patience();
    let mut version = String::new();
    loop {
        let r = s
            .admin
            .call(
                Method::GET,
                &format!("/v1/name-table?namespace={ns}&version={version}&wait=1"),
                None,
            )
            .await
            .unwrap();
        if r.status == 200 {
            let t: NameTable = serde_json::from_slice(&r.body).unwrap();
            if ok(&t) {
                return t;
            }
            version = t.version;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no table for {ns} as expected"
        );
    }
}

async fn get(s: &TestServer, path: &str) -> Value {
    s.admin
        .json(
            Method::GET,
            &format!("/v1/admin/objects/{path}"),
            None::<&()>,
        )
        .await
        .unwrap()
}

fn ips(t: &NameTable, host: &str) -> Vec<String> {
    t.names
        .get(host)
        .map(|n| n.ips.iter().map(ToString::to_string).collect())
        .unwrap_or_default()
}

/// Istio `convertServiceEntryToInstances`: a DNS (or DNS_ROUND_ROBIN) ServiceEntry with neither
/// endpoints nor a selector has its host as the endpoint, on the target port, and the table
/// says how to resolve it.
#[tokio::test]
async fn dns_service_entry_without_endpoints_routes_to_its_own_host_convert_service_entry_to_instances(
) {
    let s = TestServer::start().await;
    s.apply_yaml(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external-db, namespace: apps}
spec:
  hosts: [db.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 5432, name: tcp, protocol: TCP, targetPort: 6432}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external-api, namespace: apps}
spec:
  hosts: [api.example.com]
  resolution: DNS_ROUND_ROBIN
  ports: [{number: 443, name: https, protocol: HTTPS}]
"#,
    )
    .await
    .unwrap();
    let t = table_where(&s, "apps", |t| t.services.len() == 2).await;
    let db = &t.services["db.example.com"];
    assert_eq!(db.resolution, Resolution::Dns);
    let ep = &db.ports[0].endpoints[0];
    assert_eq!((ep.address.as_str(), ep.port), ("db.example.com", 6432));
    let api = &t.services["api.example.com"];
    assert_eq!(api.resolution, Resolution::DnsRoundRobin);
    assert_eq!(api.ports[0].endpoints[0].address, "api.example.com");
    assert_eq!(api.ports[0].endpoints[0].port, 443);
    // Clients still dial the allocated VIP, which the data path maps to the host.
    assert!(ips(&t, "db.example.com")[0].starts_with("240.240."));
    s.stop().await;
}

/// Istio `BuildNameTable`: a NONE ServiceEntry (Passthrough) with a selector and no addresses
/// answers DNS with the IPs of its healthy endpoints, and gets no allocated VIP
/// (`shouldV2AutoAllocateIPFromPieces`).
#[tokio::test]
async fn none_service_entry_with_a_selector_answers_with_healthy_endpoint_ips_build_name_table() {
    let s = TestServer::start().await;
    let r = s
        .apply_yaml(
            r#"
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: cache, namespace: vm}
spec:
  metadata: {labels: {app: cache}}
  template: {serviceAccount: cache-sa}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cache, namespace: vm}
spec:
  hosts: [cache.vm.example]
  location: MESH_INTERNAL
  resolution: NONE
  ports: [{number: 6379, name: redis, protocol: Redis}]
  workloadSelector: {labels: {app: cache}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: cache-sick
  namespace: vm
  annotations: {proxy.istio.io/health-checks-enabled: "true"}
spec: {address: 10.9.0.9, labels: {app: cache}}
status:
  conditions: [{type: Healthy, status: "False"}]
"#,
        )
        .await
        .unwrap();
    // Istio warns about a selector on NONE but accepts it.
    assert!(r["warnings"][0]
        .as_str()
        .unwrap()
        .contains("workloadSelector should not be set when resolution mode is NONE"));
    let vm = s.vm("vm", "cache-sa").await;
    let reg: Value = vm
        .json(
            Method::POST,
            "/v1/register",
            Some(&json!({"group": "cache", "namespace": "vm", "address": "10.9.0.2"})),
        )
        .await
        .unwrap();
    assert_eq!(reg["workloadEntry"]["name"], "cache-10.9.0.2");
    let t = table_where(&s, "vm", |t| t.names.contains_key("cache.vm.example")).await;
    assert_eq!(ips(&t, "cache.vm.example"), ["10.9.0.2"]);
    assert_eq!(t.services["cache.vm.example"].resolution, Resolution::None);
    assert!(t.services["cache.vm.example"].vips.is_empty());
    let se = get(&s, "serviceentry/vm/cache").await;
    assert!(se["status"]["addresses"].is_null(), "{se}");
    s.stop().await;
}

/// Istio `findServiceTargetPort` + `serviceInstanceFromWorkloadInstance`: a WorkloadEntry port
/// named like the Service port wins over an integer `targetPort`.
#[tokio::test]
async fn workload_port_named_like_the_service_port_wins_over_an_integer_target_port_service_instance_from_workload_instance(
) {
    let s = TestServer::start().await;
    s.apply_yaml(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: vm}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web-named, namespace: vm}
spec: {address: 10.8.0.1, labels: {app: web}, ports: {http: 9000}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web-plain, namespace: vm}
spec: {address: 10.8.0.2, labels: {app: web}}
"#,
    )
    .await
    .unwrap();
    let host = "web.vm.svc.cluster.local";
    let t = table_where(&s, "vm", |t| {
        t.services
            .get(host)
            .is_some_and(|r| r.ports[0].endpoints.len() == 2)
    })
    .await;
    let eps: Vec<(&str, u16)> = t.services[host].ports[0]
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.port))
        .collect();
    assert_eq!(eps, [("10.8.0.1", 9000), ("10.8.0.2", 8080)]);
    s.stop().await;
}

/// Kubernetes API server (`pkg/registry/core/service/ipallocator`): a Service without
/// `clusterIP` gets one from the service CIDR, written into `spec.clusterIP`/`clusterIPs`,
/// kept on re-apply and across restarts; the field is immutable; `None` stays headless;
/// a requested address outside the range or taken by another Service is refused.
#[tokio::test]
async fn service_without_cluster_ip_gets_one_from_the_service_cidr_kept_across_restarts_ipallocator(
) {
    let s = TestServer::start().await;
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: mysqldb, namespace: vm}
spec:
  selector: {app: mysqldb}
  ports: [{name: tcp, port: 3306}]
---
apiVersion: v1
kind: Service
metadata: {name: mysql-headless, namespace: vm}
spec:
  clusterIP: None
  selector: {app: mysqldb}
  ports: [{name: tcp, port: 3306}]
"#;
    s.apply_yaml(yaml).await.unwrap();
    let svc = get(&s, "service/vm/mysqldb").await;
    let ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let parsed: std::net::Ipv4Addr = ip.parse().unwrap();
    let [a, b, ..] = parsed.octets();
    assert!(a == 10 && (96..112).contains(&b), "{ip} is in 10.96.0.0/12");
    assert_eq!(svc["spec"]["clusterIPs"], json!([ip]));
    assert_eq!(
        get(&s, "service/vm/mysql-headless").await["spec"]["clusterIP"],
        "None"
    );
    let t = table_where(&s, "vm", |t| {
        t.names.contains_key("mysqldb.vm.svc.cluster.local")
    })
    .await;
    assert_eq!(
        ips(&t, "mysqldb.vm.svc.cluster.local"),
        std::slice::from_ref(&ip)
    );

    // Re-applying the manifest (still without an address) changes nothing.
    let r = s.apply_yaml(yaml).await.unwrap();
    assert!(r["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|o| o["action"] == "unchanged"));
    // Another address for the same Service is refused: the field is immutable.
    let changed = yaml.replacen(
        "  selector: {app: mysqldb}\n  ports: [{name: tcp, port: 3306}]",
        "  clusterIP: 10.96.0.99\n  selector: {app: mysqldb}\n  ports: [{name: tcp, port: 3306}]",
        1,
    );
    let (status, e) = status_of(s.apply_yaml(&changed).await);
    assert_eq!(status, 400);
    assert!(e.message.contains("field is immutable"), "{}", e.message);
    // Requested addresses: outside the range, or another Service's, are refused.
    for (addr, why) in [
        ("192.168.0.10", "not in the valid range"),
        (ip.as_str(), "already allocated"),
    ] {
        let other = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: other, namespace: vm}}\nspec:\n  clusterIP: {addr}\n  ports: [{{port: 80}}]\n"
        );
        let (status, e) = status_of(s.apply_yaml(&other).await);
        assert_eq!(status, 400, "{addr}");
        assert!(e.message.contains(why), "{}", e.message);
    }

    let s = s.restart(Options::default()).await;
    assert_eq!(get(&s, "service/vm/mysqldb").await["spec"]["clusterIP"], ip);
    let r = s.apply_yaml(yaml).await.unwrap();
    assert!(r["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|o| o["action"] == "unchanged"));
    s.stop().await;
}

/// Kubernetes API server `--service-cluster-ip-range`: the range addresses come from.
#[tokio::test]
async fn service_cluster_ip_range_setting_chooses_where_addresses_come_from_ipallocator() {
    let s = TestServer::with(Options {
        settings: Settings {
            replica: "replica-a".into(),
            service_cidr: "fd00:10:96::/112".parse().unwrap(),
            ..Settings::default()
        },
        ..Options::default()
    })
    .await;
    s.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: vm}\nspec:\n  ports: [{port: 80}]\n",
    )
    .await
    .unwrap();
    let ip = get(&s, "service/vm/web").await["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(ip.starts_with("fd00:10:96::"), "{ip}");
    s.stop().await;
}

/// Istio `initServiceRegistry` (the Kubernetes-over-ServiceEntry guard against squatting):
/// a Service's host is answered from the Service even where a ServiceEntry in the client's
/// own namespace claims it.
#[tokio::test]
async fn kubernetes_service_wins_over_a_service_entry_claiming_its_host_init_service_registry() {
    let s = TestServer::start().await;
    s.apply_yaml(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: squat, namespace: client}
spec:
  hosts: [details.bookinfo.svc.cluster.local]
  addresses: [192.0.2.66]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints: [{address: 192.0.2.67}]
---
apiVersion: v1
kind: Service
metadata: {name: details, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 9080}]
"#,
    )
    .await
    .unwrap();
    let host = "details.bookinfo.svc.cluster.local";
    let t = table_where(&s, "client", |t| t.names.contains_key(host)).await;
    assert_eq!(t.names[host].registry, Registry::Kubernetes);
    assert_eq!(ips(&t, host), ["10.96.0.20"]);
    assert_eq!(t.services[host].namespace, "bookinfo");
    s.stop().await;
}

/// Istio's IP auto-allocation controller (`pilot/pkg/controllers/ipallocate`,
/// `statusPatchForAddresses`): allocated addresses are in `status.addresses` as
/// `{value, host}`; the opt-out label and own `addresses` mean none; `/32` and `/128`
/// addresses answer as IPs (`convertServices`).
#[tokio::test]
async fn auto_allocated_addresses_are_written_to_service_entry_status_ipallocate() {
    let s = TestServer::start().await;
    s.apply_yaml(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: auto, namespace: apps}
spec:
  hosts: [auto.example.com]
  resolution: DNS
  ports: [{number: 443, name: https, protocol: HTTPS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: opted-out
  namespace: apps
  labels: {networking.istio.io/enable-autoallocate-ip: "false"}
spec:
  hosts: [opted.example.com]
  resolution: DNS
  ports: [{number: 443, name: https, protocol: HTTPS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pinned, namespace: apps}
spec:
  hosts: [pinned.example.com]
  addresses: [192.0.2.7/32, 2001:db8::7/128]
  resolution: STATIC
  ports: [{number: 443, name: https, protocol: HTTPS}]
  endpoints: [{address: 192.0.2.8}]
"#,
    )
    .await
    .unwrap();
    let t = table_where(&s, "apps", |t| {
        t.names.contains_key("auto.example.com") && t.names.contains_key("pinned.example.com")
    })
    .await;
    assert_eq!(ips(&t, "pinned.example.com"), ["192.0.2.7", "2001:db8::7"]);
    assert!(!t.names.contains_key("opted.example.com"));
    let auto = ips(&t, "auto.example.com");
    assert_eventually_async("status.addresses written", async || {
        !get(&s, "serviceentry/apps/auto").await["status"]["addresses"].is_null()
    })
    .await;
    let status = get(&s, "serviceentry/apps/auto").await["status"]["addresses"].clone();
    assert_eq!(
        status,
        json!([{"value": auto[0], "host": "auto.example.com"},
               {"value": auto[1], "host": "auto.example.com"}])
    );
    for name in ["opted-out", "pinned"] {
        let se = get(&s, &format!("serviceentry/apps/{name}")).await;
        assert!(se["status"]["addresses"].is_null(), "{se}");
    }
    // Re-applying the manifest keeps the status and reports nothing changed.
    let r = s
        .apply_yaml(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: auto, namespace: apps}\nspec:\n  hosts: [auto.example.com]\n  resolution: DNS\n  ports: [{number: 443, name: https, protocol: HTTPS}]\n",
        )
        .await
        .unwrap();
    assert_eq!(r["results"][0]["action"], "unchanged");
    // Opting out afterwards clears the status, as the controller's `clearStaleAddresses`.
    s.apply_yaml(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: auto, namespace: apps, labels: {networking.istio.io/enable-autoallocate-ip: \"false\"}}\nspec:\n  hosts: [auto.example.com]\n  resolution: DNS\n  ports: [{number: 443, name: https, protocol: HTTPS}]\n",
    )
    .await
    .unwrap();
    assert_eventually_async("status cleared", async || {
        get(&s, "serviceentry/apps/auto").await["status"]["addresses"].is_null()
    })
    .await;
    s.stop().await;
}

/// `get serviceentries` shows the addresses (declared, else allocated) as a column.
// The CLI process blocks its caller while it talks to the server in this runtime: two threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_serviceentries_shows_an_addresses_column() {
    let s = TestServer::start().await;
    s.apply_yaml(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: auto, namespace: apps}\nspec:\n  hosts: [auto.example.com]\n  resolution: DNS\n  ports: [{number: 443, name: https, protocol: HTTPS}]\n",
    )
    .await
    .unwrap();
    let get_se = || {
        let out = Command::new(env!("CARGO_BIN_EXE_vmesh-control"))
            .args(["get", "serviceentries", "-n", "apps", "--server", &s.url])
            .arg("--data-dir")
            .arg(s.dir.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eventually_async("the allocated addresses are listed", async || {
        get_se().contains(",2001:2::")
    })
    .await;
    let text = get_se();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["NAME", "HOSTS", "ADDRESSES", "LOCATION", "RESOLUTION"]
    );
    assert_eq!(rows[1][..2], ["auto", "auto.example.com"]);
    assert!(rows[1][2].starts_with("240.240."), "{text}");
    assert_eq!(rows[1][3..], ["MESH_EXTERNAL", "DNS"]);
    s.stop().await;
}

async fn refusal(admin: &Client, yaml: &str) -> (u16, String, String) {
    let documents = vmesh_control::config::parse_documents("t.yaml", yaml).unwrap();
    let r = admin
        .json::<Value>(
            Method::POST,
            "/v1/admin/apply",
            Some(&vmesh_control::api::ApplyRequest {
                documents,
                namespace: "apps".into(),
            }),
        )
        .await;
    let (status, e) = status_of(r);
    (status, e.field.unwrap_or_default(), e.message)
}

fn se_yaml(spec: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: se}}\nspec:\n{spec}")
}

/// Istio `ValidateServiceEntry`, `validateWorkloadEntry` and `validateReadinessProbe`: what
/// istiod refuses is refused with 400, the field, and Istio's message; nothing is applied.
#[tokio::test]
async fn validation_refuses_what_istio_refuses_with_istios_message_validate_service_entry() {
    let s = TestServer::start().await;
    let http = "  ports: [{number: 80, name: http, protocol: HTTP}]\n";
    let cases: Vec<(String, &str, &str)> = vec![
        (
            se_yaml(&format!("  hosts: [a.example.com]\n  resolution: NONE\n{http}  endpoints: [{{address: 10.0.0.1}}]\n")),
            "spec.endpoints",
            "no endpoints should be provided for resolution type none",
        ),
        (
            se_yaml(&format!("  hosts: [a.example.com]\n  resolution: DNS_ROUND_ROBIN\n{http}  endpoints: [{{address: a1.example.com}}, {{address: a2.example.com}}]\n")),
            "spec.endpoints",
            "there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN",
        ),
        (
            se_yaml(&format!("  hosts: [a.example.com]\n  addresses: [10.1.0.0/16]\n  resolution: DNS\n{http}")),
            "spec.addresses",
            "CIDR addresses are allowed only for NONE/STATIC resolution types",
        ),
        (
            se_yaml("  hosts: [a.example.com, b.example.com]\n  resolution: DNS\n  ports: [{number: 5432, name: tcp, protocol: TCP}]\n"),
            "spec.ports",
            "multiple hosts provided with non-HTTP, non-TLS ports",
        ),
        (
            se_yaml(&format!("  hosts: [\"*.example.com\"]\n  resolution: DNS\n{http}")),
            "spec.hosts[0]",
            "hosts must be FQDN or contain only prefix wildcards if no endpoints are provided for resolution mode DNS",
        ),
        (
            se_yaml("  hosts: [a.example.com]\n  resolution: STATIC\n  ports: [{number: 80, name: web, protocol: HTTP3}]\n"),
            "spec.ports[0].protocol",
            "unsupported protocol: HTTP3",
        ),
        (
            se_yaml("  hosts: [a.example.com]\n  resolution: STATIC\n  ports: [{number: 80, name: http_web, protocol: HTTP}]\n"),
            "spec.ports[0].name",
            "invalid port name: http_web",
        ),
        (
            se_yaml(&format!("  hosts: [a_b.example.com]\n  resolution: STATIC\n{http}")),
            "spec.hosts[0]",
            "domain name \"a_b.example.com\" invalid (label \"a_b\" invalid)",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: g}\nspec:\n  template: {}\n  probe: {httpGet: {port: 8080, scheme: https}}\n".to_string(),
            "spec.probe.httpGet.scheme",
            "httpGet.scheme must be one of \"HTTPS\", \"HTTP\"",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w}\nspec: {}\n".to_string(),
            "spec.address",
            "address is required",
        ),
    ];
    for (yaml, field, message) in cases {
        let (status, f, m) = refusal(&s.admin, &yaml).await;
        assert_eq!((status, f.as_str()), (400, field), "{yaml}\n{m}");
        assert!(m.contains(message), "{yaml}\nwant {message}\ngot {m}");
    }
    let listed: Value = s
        .admin
        .json(Method::GET, "/v1/admin/objects/serviceentry", None::<&()>)
        .await
        .unwrap();
    assert_eq!(listed["items"], json!([]));
    s.stop().await;
}

/// Istio `ValidateServiceEntry` / `validateWorkloadEntry`, the other direction: a ServiceEntry
/// without ports, `exportTo: ["~"]`, a WorkloadEntry with a network and no address are
/// accepted; where Istio warns, the apply succeeds and carries the warning.
#[tokio::test]
async fn validation_accepts_what_istio_accepts_and_returns_its_warnings_validate_service_entry() {
    let s = TestServer::start().await;
    let r = s
        .apply_yaml(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: no-ports, namespace: apps}
spec:
  hosts: [noports.example.com]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: hidden, namespace: apps}
spec:
  hosts: [hidden.example.com]
  resolution: STATIC
  exportTo: ["~"]
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: remote, namespace: apps}
spec: {network: network-2, labels: {app: remote}}
"#,
        )
        .await
        .unwrap();
    let actions: Vec<&str> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["created", "created", "created"]);
    let warnings: Vec<&str> = r["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains(
        "WorkloadEntry/remote: spec.address: address is unset with network \"network-2\""
    ));
    // `~`: nobody's table has it.
    let t = table_where(&s, "apps", |t| t.names.contains_key("noports.example.com")).await;
    assert!(!t.names.contains_key("hidden.example.com"));
    s.stop().await;
}
