//! Istio conformance: the VM lifecycle (registration, health, liveness, authorization) and
//! the VM bundle, black-box through the HTTPS API and the CLI: apply YAML, register, report,
//! read entries and name tables. One test per behaviour; each names the Istio function it
//! follows (istio/istio `pilot/pkg/autoregistration`, `pilot/pkg/serviceregistry/serviceentry`,
//! `istioctl/pkg/workload`). The clock is the test's: time moves only when a test says so, and
//! the server's periodic work runs when a test calls `tick`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::{istio_vm_yaml, status_of, Options, TestServer, T0};
use hyper::Method;
use serde_json::{json, Value};
use vmesh_api::time::format_rfc3339_nanos;
use vmesh_control::client::{Client, ClientError};
use vmesh_control::clock::ManualClock;
use vmesh_control::registry::Settings;

const NS: &str = "vm-namespace";
const HOST: &str = "vmservice.example.com";
const SEC: u64 = 1_000_000_000;

struct Mesh {
    s: TestServer,
    clock: Arc<ManualClock>,
}

/// A server on a clock the test moves: grace 10 s, liveness timeout 15 s.
async fn mesh() -> Mesh {
    let clock = Arc::new(ManualClock::new(T0));
    let s = TestServer::with(Options {
        manual_clock: Some(clock.clone()),
        settings: Settings {
            replica: "replica-a".into(),
            grace: Duration::from_secs(10),
            liveness_timeout: Duration::from_secs(15),
            ..Settings::default()
        },
        ..Options::default()
    })
    .await;
    s.apply_yaml(&istio_vm_yaml()).await.unwrap();
    Mesh { s, clock }
}

impl Mesh {
    fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }

    async fn tick(&self) {
        self.s.running().registry.tick().await.unwrap();
    }

    async fn vm(&self, sa: &str) -> Client {
        self.s.vm(NS, sa).await
    }

    async fn entry(&self, name: &str) -> Option<Value> {
        self.s
            .admin
            .json::<Value>(
                Method::GET,
                &format!("/v1/admin/objects/we/{NS}/{name}"),
                None::<&()>,
            )
            .await
            .ok()
    }

    /// The endpoint addresses of `HOST`'s first port in the namespace's name table, once
    /// `ready` holds for them (tables follow config within milliseconds, not atomically).
    async fn endpoints_when(&self, what: &str, ready: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = std::time::Instant::now() + vmesh_test_support::eventually::patience();
        loop {
            let t: Value = self
                .s
                .admin
                .json(
                    Method::GET,
                    &format!("/v1/name-table?namespace={NS}"),
                    None::<&()>,
                )
                .await
                .unwrap();
            let eps: Vec<String> = t["services"][HOST]["ports"][0]["endpoints"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| e["address"].as_str().unwrap_or_default().to_string())
                        .collect()
                })
                .unwrap_or_default();
            if ready(&eps) {
                return eps;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: endpoints are {eps:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_endpoints(&self, want: &[&str]) {
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        self.endpoints_when(&format!("endpoints {want:?}"), |eps| {
            let mut eps = eps.to_vec();
            eps.sort();
            eps == want
        })
        .await;
    }
}

async fn post(vm: &Client, path: &str, body: Value) -> Result<Value, ClientError> {
    vm.json(Method::POST, path, Some(&body)).await
}

async fn register(vm: &Client, body: Value) -> Result<Value, ClientError> {
    post(vm, "/v1/register", body).await
}

fn python_http(addr: &str) -> Value {
    json!({"group": "python-http", "namespace": NS, "address": addr})
}

fn entry_req(name: &str) -> Value {
    json!({"namespace": NS, "name": name})
}

fn report(name: &str, healthy: bool, registration: &Value, sequence: u64) -> Value {
    json!({"namespace": NS, "name": name, "healthy": healthy,
           "message": if healthy { "" } else { "connection refused" },
           "registration": registration, "sequence": sequence})
}

fn healthy_condition(e: &Value) -> Option<&Value> {
    e["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Healthy")
}

fn annotation<'a>(e: &'a Value, key: &str) -> Option<&'a str> {
    e["metadata"]["annotations"][key].as_str()
}

/// A manual WorkloadEntry selected by the fixture's ServiceEntry (`app: python-http`).
fn manual_entry(name: &str, address: &str, annotations: &str, extra: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: {NS}\n  annotations: {{{annotations}}}\n\
         spec:\n  address: {address}\n  serviceAccount: vm-sa\n  labels: {{app: python-http}}\n{extra}"
    )
}

const HEALTH_CHECKED: &str = "proxy.istio.io/health-checks-enabled: \"true\"";

// --- Labels -----------------------------------------------------------------------------------

/// `serviceentry.ConvertWorkloadEntry`: selection sees `metadata.labels` over `spec.labels`.
#[tokio::test]
async fn selection_merges_metadata_labels_over_spec_labels() {
    let m = mesh().await;
    m.s.apply_yaml(&format!(
        "{}---\n{}",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: meta-wins\n  namespace: vm-namespace\n  labels: {app: python-http}\nspec:\n  address: 10.0.1.1\n  labels: {app: other}\n",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: spec-loses\n  namespace: vm-namespace\n  labels: {app: other}\nspec:\n  address: 10.0.1.2\n  labels: {app: python-http}\n",
    ))
    .await
    .unwrap();
    m.wait_endpoints(&["10.0.1.1"]).await;
}

/// `workloadEntryFromGroup`: the entry's `metadata.labels` are its (merged) labels too.
#[tokio::test]
async fn auto_registered_entries_carry_their_labels_in_metadata_and_spec() {
    let m = mesh().await;
    let vm = m.vm("vm-sa").await;
    let mut body = python_http("10.0.0.5");
    body["labels"] = json!({"version": "v1"});
    register(&vm, body).await.unwrap();
    let e = m.entry("python-http-10.0.0.5").await.unwrap();
    assert_eq!(e["metadata"]["labels"], e["spec"]["labels"]);
    assert_eq!(e["metadata"]["labels"]["app"], "python-http");
    assert_eq!(e["metadata"]["labels"]["version"], "v1");
}

// --- Health: ordering and clocks -----------------------------------------------------------

/// `health.transformHealthEvent`: `lastProbeTime` is the control plane's clock on receipt.
#[tokio::test]
async fn last_probe_time_is_stamped_by_the_control_plane() {
    let m = mesh().await;
    let vm = m.vm("vm-sa").await;
    let r = register(&vm, python_http("10.0.0.5")).await.unwrap();
    m.advance(7);
    let mut body = report("python-http-10.0.0.5", true, &r["registration"], 1);
    body["probeTime"] = json!("2001-01-01T00:00:00Z");
    post(&vm, "/v1/health", body).await.unwrap();
    let e = m.entry("python-http-10.0.0.5").await.unwrap();
    let c = healthy_condition(&e).unwrap();
    assert_eq!(c["lastProbeTime"], format_rfc3339_nanos(T0 + 7 * SEC));
    assert_eq!(c["status"], "True");
}

/// Issue 12: a report dated beyond the leeway into the future is refused and changes nothing
/// (Istio never reads the agent's time, so it cannot be frozen either).
#[tokio::test]
async fn a_health_report_dated_in_the_future_is_refused() {
    let m = mesh().await;
    let vm = m.vm("vm-sa").await;
    let r = register(&vm, python_http("10.0.0.5")).await.unwrap();
    post(
        &vm,
        "/v1/health",
        report("python-http-10.0.0.5", true, &r["registration"], 1),
    )
    .await
    .unwrap();
    m.wait_endpoints(&["10.0.0.5"]).await;
    let before = m.entry("python-http-10.0.0.5").await.unwrap();
    let old_shim = json!({"namespace": NS, "name": "python-http-10.0.0.5", "healthy": false,
                          "probeTime": "2500-01-01T00:00:00Z"});
    let (st, e) = status_of(post(&vm, "/v1/health", old_shim).await);
    assert_eq!((st, e.field.as_deref()), (400, Some("probeTime")), "{e:?}");
    let mut future_registration = report("python-http-10.0.0.5", false, &json!(0), 9);
    future_registration["registration"] = json!(T0 + 3600 * SEC);
    let (st, e) = status_of(post(&vm, "/v1/health", future_registration).await);
    assert_eq!((st, e.field.as_deref()), (400, Some("registration")));
    // Within the leeway is fine.
    let mut near = json!({"namespace": NS, "name": "python-http-10.0.0.5", "healthy": true});
    near["probeTime"] = json!(format_rfc3339_nanos(T0 + 20 * SEC));
    post(&vm, "/v1/health", near).await.unwrap();
    let after = m.entry("python-http-10.0.0.5").await.unwrap();
    assert_eq!(
        healthy_condition(&after).unwrap()["status"],
        healthy_condition(&before).unwrap()["status"]
    );
    m.wait_endpoints(&["10.0.0.5"]).await;
}

/// A VM whose clock stepped back is still heard: reports are ordered by the control plane's
/// registration number and the VM's sequence, never by the VM's clock.
#[tokio::test]
async fn a_vm_whose_clock_steps_back_is_still_heard() {
    let m = mesh().await;
    let vm = m.vm("vm-sa").await;
    let r = register(&vm, python_http("10.0.0.5")).await.unwrap();
    let mut first = report("python-http-10.0.0.5", true, &r["registration"], 1);
    first["probeTime"] = json!(format_rfc3339_nanos(T0));
    assert_eq!(
        post(&vm, "/v1/health", first).await.unwrap()["applied"],
        true
    );
    let mut stepped_back = report("python-http-10.0.0.5", false, &r["registration"], 2);
    stepped_back["probeTime"] = json!(format_rfc3339_nanos(T0 - 86_400 * SEC));
    assert_eq!(
        post(&vm, "/v1/health", stepped_back).await.unwrap()["applied"],
        true
    );
    let e = m.entry("python-http-10.0.0.5").await.unwrap();
    assert_eq!(healthy_condition(&e).unwrap()["status"], "False");
}

/// `state.Store.UpdateHealth` never goes back; here by sequence: a retried older report (or
/// one of an older registration) never overwrites a newer one.
#[tokio::test]
async fn a_retried_old_report_never_overwrites_a_newer_one() {
    let m = mesh().await;
    let vm = m.vm("vm-sa").await;
    let name = "python-http-10.0.0.5";
    let r1 = register(&vm, python_http("10.0.0.5")).await.unwrap();
    let reg1 = &r1["registration"];
    assert_eq!(
        post(&vm, "/v1/health", report(name, true, reg1, 2))
            .await
            .unwrap()["applied"],
        true
    );
    assert_eq!(
        post(&vm, "/v1/health", report(name, false, reg1, 1))
            .await
            .unwrap()["applied"],
        false
    );
    assert_eq!(
        post(&vm, "/v1/health", report(name, false, reg1, 2))
            .await
            .unwrap()["applied"],
        false
    );
    // The VM restarts: its new registration's first report wins over anything older.
    m.advance(1);
    let r2 = register(&vm, python_http("10.0.0.5")).await.unwrap();
    let reg2 = &r2["registration"];
    assert!(reg2.as_u64().unwrap() > reg1.as_u64().unwrap());
    assert_eq!(
        post(&vm, "/v1/health", report(name, false, reg2, 1))
            .await
            .unwrap()["applied"],
        true
    );
    assert_eq!(
        post(&vm, "/v1/health", report(name, true, reg1, 99))
            .await
            .unwrap()["applied"],
        false
    );
    let e = m.entry(name).await.unwrap();
    assert_eq!(healthy_condition(&e).unwrap()["status"], "False");
}

/// Compatibility (deliberate): a shim older than sequences sends only `probeTime`; its reports
/// are taken in arrival order, as Istio takes the agent's (`UpdateHealth` with the server's
/// time), provided the time is not in the future.
#[tokio::test]
async fn reports_of_shims_without_a_sequence_are_taken_in_arrival_order() {
    let m = mesh().await;
    let vm = m.vm("vm-sa").await;
    register(&vm, python_http("10.0.0.5")).await.unwrap();
    let old = |healthy: bool, t: u64| {
        json!({"namespace": NS, "name": "python-http-10.0.0.5", "healthy": healthy,
               "probeTime": format_rfc3339_nanos(t)})
    };
    assert_eq!(
        post(&vm, "/v1/health", old(true, T0)).await.unwrap()["applied"],
        true
    );
    m.advance(1);
    assert_eq!(
        post(&vm, "/v1/health", old(false, T0 - 60 * SEC))
            .await
            .unwrap()["applied"],
        true
    );
    let e = m.entry("python-http-10.0.0.5").await.unwrap();
    assert_eq!(healthy_condition(&e).unwrap()["status"], "False");
}

// --- Health: where it counts -----------------------------------------------------------------

/// `serviceentry.isHealthy`: only `proxy.istio.io/health-checks-enabled: "true"` makes the
/// `Healthy` condition count; on any other entry it does not remove it from endpoints.
#[tokio::test]
async fn health_counts_only_where_health_checks_are_enabled() {
    let m = mesh().await;
    let unhealthy = "status:\n  conditions:\n  - {type: Healthy, status: \"False\"}\n";
    m.s.apply_yaml(&format!(
        "{}---\n{}---\n{}",
        manual_entry("no-checks", "10.0.2.1", "", unhealthy),
        manual_entry(
            "checks-off",
            "10.0.2.2",
            "proxy.istio.io/health-checks-enabled: \"false\"",
            unhealthy
        ),
        manual_entry("checks-on", "10.0.2.3", HEALTH_CHECKED, unhealthy),
    ))
    .await
    .unwrap();
    m.wait_endpoints(&["10.0.2.1", "10.0.2.2"]).await;
    // An auto-registered entry of a group with a probe is unhealthy until it reports.
    let vm = m.vm("vm-sa").await;
    let r = register(&vm, python_http("10.0.0.5")).await.unwrap();
    let e = m.entry("python-http-10.0.0.5").await.unwrap();
    assert_eq!(
        annotation(&e, "proxy.istio.io/health-checks-enabled"),
        Some("true")
    );
    post(
        &vm,
        "/v1/health",
        report("python-http-10.0.0.5", true, &r["registration"], 1),
    )
    .await
    .unwrap();
    m.wait_endpoints(&["10.0.2.1", "10.0.2.2", "10.0.0.5"])
        .await;
}

// --- Manual health-checked entries -----------------------------------------------------------

/// `OnConnect` + `becomeControllerOf`: a VM may heartbeat and report health for a manual entry
/// with the health-checks annotation; it becomes the entry's controller.
#[tokio::test]
async fn a_vm_may_control_a_manual_health_checked_entry() {
    let m = mesh().await;
    m.s.apply_yaml(&manual_entry("db-vm", "10.0.3.1", HEALTH_CHECKED, ""))
        .await
        .unwrap();
    let vm = m.vm("vm-sa").await;
    let hb = post(&vm, "/v1/heartbeat", entry_req("db-vm"))
        .await
        .unwrap();
    assert_eq!(hb["registration"], T0);
    let e = m.entry("db-vm").await.unwrap();
    assert_eq!(
        annotation(&e, "istio.io/workloadController"),
        Some("replica-a")
    );
    assert_eq!(
        annotation(&e, "istio.io/connectedAt"),
        Some(format_rfc3339_nanos(T0).as_str())
    );
    assert_eq!(annotation(&e, "istio.io/autoRegistrationGroup"), None);
    post(
        &vm,
        "/v1/health",
        report("db-vm", true, &hb["registration"], 1),
    )
    .await
    .unwrap();
    m.wait_endpoints(&["10.0.3.1"]).await;
}

/// `shouldCleanupEntry` + `cleanupEntry` -> `deleteHealthCondition`: after disconnect and the
/// grace period a manual entry's `Healthy` condition is removed; the entry stays.
#[tokio::test]
async fn a_manual_entry_loses_its_health_after_disconnect_and_grace_and_stays() {
    let m = mesh().await;
    m.s.apply_yaml(&manual_entry("db-vm", "10.0.3.1", HEALTH_CHECKED, ""))
        .await
        .unwrap();
    let vm = m.vm("vm-sa").await;
    let hb = post(&vm, "/v1/heartbeat", entry_req("db-vm"))
        .await
        .unwrap();
    post(
        &vm,
        "/v1/health",
        report("db-vm", true, &hb["registration"], 1),
    )
    .await
    .unwrap();
    m.wait_endpoints(&["10.0.3.1"]).await;
    m.advance(16);
    m.tick().await;
    let e = m.entry("db-vm").await.unwrap();
    assert!(annotation(&e, "istio.io/disconnectedAt").is_some(), "{e}");
    assert!(
        healthy_condition(&e).is_some(),
        "kept during the grace period"
    );
    m.advance(11);
    m.tick().await;
    let e = m.entry("db-vm").await.expect("the entry itself stays");
    assert!(healthy_condition(&e).is_none(), "{e}");
    m.wait_endpoints(&[]).await;
}

// --- Reconnect and imported entries ------------------------------------------------------------

/// `registerWorkload` + `changeWorkloadEntryStateToConnected`: registering again only updates
/// the connection annotations and controller; labels and spec stay as created, whatever the
/// group now says or the VM now sends.
#[tokio::test]
async fn reconnect_updates_only_the_connection_annotations() {
    let m = mesh().await;
    let vm = m.vm("vm-sa").await;
    register(&vm, python_http("10.0.0.5")).await.unwrap();
    let before = m.entry("python-http-10.0.0.5").await.unwrap();
    m.s.apply_yaml(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: python-http, namespace: vm-namespace}\n\
         spec:\n  metadata: {labels: {app: python-http, tier: new}}\n  template: {serviceAccount: vm-sa, locality: r9/z9, weight: 7}\n",
    )
    .await
    .unwrap();
    m.advance(3);
    let mut again = python_http("10.0.0.5");
    again["labels"] = json!({"version": "v2"});
    again["locality"] = json!("r2/z2");
    register(&vm, again).await.unwrap();
    let after = m.entry("python-http-10.0.0.5").await.unwrap();
    assert_eq!(after["spec"], before["spec"]);
    assert_eq!(after["metadata"]["labels"], before["metadata"]["labels"]);
    assert_eq!(after["metadata"]["uid"], before["metadata"]["uid"]);
    assert_eq!(
        annotation(&after, "istio.io/connectedAt"),
        Some(format_rfc3339_nanos(T0 + 3 * SEC).as_str())
    );
}

/// `shouldCleanupEntry`: an imported entry carrying `istio.io/autoRegistrationGroup` of a group
/// that does not exist is kept until it is disconnected past the grace period; its VM may
/// reconnect to it meanwhile (`registerWorkload` needs no group for an existing entry).
#[tokio::test]
async fn an_imported_entry_of_a_missing_group_is_kept_until_disconnected_past_grace() {
    let m = mesh().await;
    m.s.apply_yaml(&manual_entry(
        "gone-group-10.0.4.1",
        "10.0.4.1",
        "istio.io/autoRegistrationGroup: gone-group, istio.io/workloadController: replica-zz, istio.io/connectedAt: \"2023-11-14T22:13:20Z\"",
        "",
    ))
    .await
    .unwrap();
    m.tick().await;
    let e = m
        .entry("gone-group-10.0.4.1")
        .await
        .expect("not deleted for lack of a group");
    assert!(
        annotation(&e, "istio.io/disconnectedAt").is_some(),
        "its replica is gone: {e}"
    );
    m.advance(5);
    let vm = m.vm("vm-sa").await;
    let r = register(&vm, json!({"group": "gone-group", "address": "10.0.4.1"}))
        .await
        .unwrap();
    assert_eq!(r["workloadEntry"]["name"], "gone-group-10.0.4.1");
    assert!(r.get("probe").is_none());
    m.advance(11);
    m.tick().await;
    let e = m
        .entry("gone-group-10.0.4.1")
        .await
        .expect("reconnected: kept");
    assert_eq!(
        annotation(&e, "istio.io/workloadController"),
        Some("replica-a")
    );
    m.advance(16);
    m.tick().await;
    assert!(
        m.entry("gone-group-10.0.4.1").await.is_some(),
        "disconnected, in grace"
    );
    m.advance(11);
    m.tick().await;
    assert!(m.entry("gone-group-10.0.4.1").await.is_none(), "past grace");
}

// --- Names --------------------------------------------------------------------------------------

const NETWORK_GROUP: &str = "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: netg, namespace: vm-namespace}\n\
    spec:\n  template: {serviceAccount: vm-sa, network: vm-network}\n";

/// `autoregisteredWorkloadEntryName`: the name has the network the VM sent, not the
/// template's; `spec.network` is still the effective one.
#[tokio::test]
async fn the_entry_name_uses_the_network_the_vm_sent() {
    let m = mesh().await;
    m.s.apply_yaml(NETWORK_GROUP).await.unwrap();
    let vm = m.vm("vm-sa").await;
    let r = register(&vm, json!({"group": "netg", "address": "10.0.5.1"}))
        .await
        .unwrap();
    assert_eq!(r["workloadEntry"]["name"], "netg-10.0.5.1");
    let e = m.entry("netg-10.0.5.1").await.unwrap();
    assert_eq!(e["spec"]["network"], "vm-network");
    let r = register(
        &vm,
        json!({"group": "netg", "address": "10.0.5.2", "network": "net2"}),
    )
    .await
    .unwrap();
    assert_eq!(r["workloadEntry"]["name"], "netg-10.0.5.2-net2");
    let e = m.entry("netg-10.0.5.2-net2").await.unwrap();
    assert_eq!(e["spec"]["network"], "net2");
}

/// `sanitizeIP`, after canonicalising: one IPv6 VM is one entry however it writes its address.
#[tokio::test]
async fn ipv6_addresses_are_canonicalised_before_naming() {
    let m = mesh().await;
    let vm = m.vm("vm-sa").await;
    let r = register(&vm, python_http("FD00:0:0::0005")).await.unwrap();
    assert_eq!(r["workloadEntry"]["name"], "python-http-fd00--5");
    let r = register(&vm, python_http("fd00::5")).await.unwrap();
    assert_eq!(r["workloadEntry"]["name"], "python-http-fd00--5");
    let e = m.entry("python-http-fd00--5").await.unwrap();
    assert_eq!(e["spec"]["address"], "fd00::5");
}

/// Issue 12: a VM-supplied network cannot make an entry name that is not a DNS-1123
/// subdomain (Istio would fail the create later); 400, nothing written.
#[tokio::test]
async fn an_entry_name_that_is_not_a_dns_subdomain_is_refused() {
    let m = mesh().await;
    let vm = m.vm("vm-sa").await;
    for network in ["a/b", "..", "../x", "x\u{200b}y", "Upper", "-"] {
        let mut body = python_http("10.0.0.5");
        body["network"] = json!(network);
        let (st, e) = status_of(register(&vm, body).await);
        assert_eq!(
            (st, e.field.as_deref()),
            (400, Some("network")),
            "{network:?}: {e:?}"
        );
    }
    let list: Value =
        m.s.admin
            .json(
                Method::GET,
                &format!("/v1/admin/objects/we/{NS}"),
                None::<&()>,
            )
            .await
            .unwrap();
    assert_eq!(list["items"], json!([]));
}

// --- Identity and authorization ----------------------------------------------------------------

/// `ensureProxyCanControlEntry`: an empty `template.serviceAccount` accepts any service
/// account of the group's namespace; the namespace must still match.
#[tokio::test]
async fn an_empty_template_service_account_accepts_any_account_of_the_namespace() {
    let m = mesh().await;
    m.s.apply_yaml(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: anysa, namespace: vm-namespace}\nspec:\n  template: {}\n",
    )
    .await
    .unwrap();
    let vm = m.vm("whoever").await;
    register(&vm, json!({"group": "anysa", "address": "10.0.6.1"}))
        .await
        .unwrap();
    let other = m.s.vm("other-ns", "whoever").await;
    let (st, _) = status_of(
        register(
            &other,
            json!({"group": "anysa", "namespace": NS, "address": "10.0.6.2"}),
        )
        .await,
    );
    assert_eq!(st, 403);
}

/// Issue 12 item 2 (`ensureProxyCanControlEntry` on every call): a VM identity may heartbeat,
/// report health for or deregister only the entries it controls; everything else is 403 and
/// changes nothing.
#[tokio::test]
async fn a_vm_may_touch_only_the_entries_it_controls() {
    let m = mesh().await;
    m.s.apply_yaml(&format!(
        "{}---\n{}",
        manual_entry("plain", "10.0.7.1", "", ""),
        manual_entry("other-sa", "10.0.7.2", HEALTH_CHECKED, "")
            .replace("serviceAccount: vm-sa", "serviceAccount: db-sa"),
    ))
    .await
    .unwrap();
    let vm = m.vm("vm-sa").await;
    let r = register(&vm, python_http("10.0.0.5")).await.unwrap();
    let wrong_sa = m.vm("default").await;
    let wrong_ns = m.s.vm("other", "vm-sa").await;
    let cases = [
        (&vm, "plain"),
        (&vm, "other-sa"),
        (&wrong_sa, "python-http-10.0.0.5"),
        (&wrong_ns, "python-http-10.0.0.5"),
    ];
    for (client, name) in cases {
        let before = m.entry(name).await.unwrap();
        for (path, body) in [
            ("/v1/heartbeat", entry_req(name)),
            ("/v1/health", report(name, false, &r["registration"], 7)),
            ("/v1/deregister", entry_req(name)),
        ] {
            let (st, e) = status_of(post(client, path, body).await);
            assert_eq!((st, e.error.as_str()), (403, "forbidden"), "{path} {name}");
        }
        assert_eq!(m.entry(name).await.unwrap(), before, "{name} changed");
    }
    // Its own entry it may.
    post(
        &vm,
        "/v1/health",
        report("python-http-10.0.0.5", true, &r["registration"], 1),
    )
    .await
    .unwrap();
    post(&vm, "/v1/deregister", entry_req("python-http-10.0.0.5"))
        .await
        .unwrap();
    assert!(m.entry("python-http-10.0.0.5").await.is_none());
}

// --- Entry metadata ----------------------------------------------------------------------------

/// `workloadEntryFromGroup`: the owner reference names `gvk.WorkloadGroup`, which is
/// `networking.istio.io/v1`, whatever version the group was applied in.
#[tokio::test]
async fn owner_references_name_networking_istio_io_v1() {
    let m = mesh().await;
    let vm = m.vm("vm-sa").await;
    register(&vm, python_http("10.0.0.5")).await.unwrap();
    let e = m.entry("python-http-10.0.0.5").await.unwrap();
    let o = &e["metadata"]["ownerReferences"][0];
    assert_eq!(
        (
            o["apiVersion"].as_str(),
            o["kind"].as_str(),
            o["controller"].as_bool()
        ),
        (
            Some("networking.istio.io/v1"),
            Some("WorkloadGroup"),
            Some(true)
        )
    );
}

/// pilot-agent's `GetLocalityLabel` / `SanitizeLocalityLabel` and `workloadEntryFromGroup`:
/// without a locality, the `istio-locality` label gives it; the entry does not keep the label.
#[tokio::test]
async fn the_istio_locality_label_is_the_locality_fallback() {
    let m = mesh().await;
    let vm = m.vm("vm-sa").await;
    let mut body = python_http("10.0.0.5");
    body["labels"] = json!({"istio-locality": "us-east1.us-east1-b"});
    register(&vm, body).await.unwrap();
    let e = m.entry("python-http-10.0.0.5").await.unwrap();
    assert_eq!(e["spec"]["locality"], "us-east1/us-east1-b");
    assert!(e["spec"]["labels"].get("istio-locality").is_none(), "{e}");
}

// --- The VM bundle -----------------------------------------------------------------------------

/// `istioctl x workload entry configure` (`createClusterEnv`, `createMeshConfig`,
/// `createCertsTokens`): the CLI's `vm-bundle` writes what istioctl writes.
#[tokio::test]
async fn vm_bundle_writes_what_istioctl_workload_entry_configure_writes() {
    let m = mesh().await;
    m.s.apply_yaml(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: reviews, namespace: vm-namespace}\n\
         spec:\n  metadata: {labels: {app: reviews}}\n  template:\n    serviceAccount: vm-sa\n    ports: {http: 9080}\n    labels: {version: v2}\n",
    )
    .await
    .unwrap();
    let out = m.s.dir.path().join("bundle");
    // The CLI calls this process's server: run it off the test's runtime thread.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vmesh-control"));
    cmd.args(["vm-bundle", "--group", "reviews", "-n", NS, "-o"])
        .arg(&out)
        .arg("--data-dir")
        .arg(m.s.dir.path())
        .args(["--server", &m.s.url]);
    let o = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let env = std::fs::read_to_string(out.join("cluster.env")).unwrap();
    for line in [
        "ISTIO_LOCAL_EXCLUDE_PORTS='22,15090,15021,15020'",
        "ISTIO_INBOUND_PORTS='9080'",
        r#"ISTIO_META_POD_PORTS='[{"name":"http","containerPort":9080,"protocol":""}]'"#,
        r#"ISTIO_METAJSON_LABELS='{"app":"reviews","service.istio.io/canonical-name":"reviews","service.istio.io/canonical-revision":"v2","version":"v2"}'"#,
        "ISTIO_META_AUTO_REGISTER_GROUP='reviews'",
        "SERVICE_ACCOUNT='vm-sa'",
    ] {
        assert!(env.lines().any(|l| l == line), "missing {line} in\n{env}");
    }
    // The token lives istioctl's default 3600 s.
    let token = std::fs::read_to_string(out.join("istio-token")).unwrap();
    let payload = token.trim().split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        3600
    );
}
