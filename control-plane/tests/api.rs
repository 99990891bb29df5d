//! The HTTPS API end to end: real TLS on 127.0.0.1, the admin credential and minted VM tokens,
//! Istio's documentation fixtures.

mod common;

use common::{istio_vm_yaml, status_of, Options, TestServer};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use vmesh_api::names::NameTable;
use vmesh_control::registry::RegisterResponse;

async fn register(
    vm: &vmesh_control::client::Client,
    body: Value,
) -> Result<RegisterResponse, vmesh_control::client::ClientError> {
    vm.json(Method::POST, "/v1/register", Some(&body)).await
}

fn python_http(addr: &str) -> Value {
    json!({"group": "python-http", "namespace": "vm-namespace", "address": addr,
           "locality": "us-east1/us-east1-b", "labels": {"version": "v1"}})
}

async fn table(c: &vmesh_control::client::Client, query: &str) -> (u16, String, Option<NameTable>) {
    let r = c
        .call(Method::GET, &format!("/v1/name-table{query}"), None)
        .await
        .unwrap();
    let v = r
        .headers
        .get("x-vmesh-table-version")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let t = (r.status == StatusCode::OK).then(|| serde_json::from_slice(&r.body).unwrap());
    (r.status.as_u16(), v, t)
}

/// The first table that names `host` (tables follow config within milliseconds, not atomically).
async fn table_naming(c: &vmesh_control::client::Client, host: &str) -> (String, NameTable) {
    let mut version = String::new();
    let deadline = std::time::Instant::now() + vmesh_test_support::eventually::patience();
    loop {
        let (st, v, t) = table(c, &format!("?version={version}&wait=1")).await;
        if let Some(t) = t.filter(|t| t.names.contains_key(host)) {
            return (v, t);
        }
        assert!(st == 200 || st == 304);
        assert!(
            std::time::Instant::now() < deadline,
            "no table names {host}"
        );
        version = v;
    }
}

#[tokio::test]
async fn istio_doc_fixtures_apply_read_back_and_reapply_unchanged() {
    let s = TestServer::start().await;
    let r = s.apply_yaml(&istio_vm_yaml()).await.unwrap();
    let actions: Vec<&str> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["created", "created", "created"]);
    let r = s.apply_yaml(&istio_vm_yaml()).await.unwrap();
    assert!(
        r["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["action"] == "unchanged"),
        "{r}"
    );
    let g: Value = s
        .admin
        .json(
            Method::GET,
            "/v1/admin/objects/workloadgroup/vm-namespace/python-http",
            None::<&()>,
        )
        .await
        .unwrap();
    assert_eq!(g["spec"]["template"]["serviceAccount"], "vm-sa");
    assert_eq!(g["spec"]["metadata"]["labels"]["app"], "python-http");
    assert!(!g["metadata"]["uid"].as_str().unwrap().is_empty());
    assert!(!g["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .is_empty());
    let list: Value = s
        .admin
        .json(Method::GET, "/v1/admin/objects/se", None::<&()>)
        .await
        .unwrap();
    assert_eq!(
        list["items"][0]["spec"]["hosts"][0],
        "vmservice.example.com"
    );
    s.stop().await;
}

#[tokio::test]
async fn vm_registers_and_its_endpoint_appears_after_a_healthy_report() {
    let s = TestServer::start().await;
    s.apply_yaml(&istio_vm_yaml()).await.unwrap();
    let vm = s.vm("vm-namespace", "vm-sa").await;
    let r = register(&vm, python_http("10.0.0.5")).await.unwrap();
    assert_eq!(r.workload_entry.name, "python-http-10.0.0.5");
    assert_eq!(r.workload_entry.namespace, "vm-namespace");
    let probe = r.probe.clone().expect("the group has a probe");
    assert_eq!((probe.period_seconds, probe.timeout_seconds), (5, 1));
    assert_eq!(probe.http_get.unwrap().path, "/ready");

    let we: Value = s
        .admin
        .json(
            Method::GET,
            "/v1/admin/objects/we/vm-namespace/python-http-10.0.0.5",
            None::<&()>,
        )
        .await
        .unwrap();
    assert_eq!(we["spec"]["address"], "10.0.0.5");
    assert_eq!(we["spec"]["labels"]["app"], "python-http");
    assert_eq!(we["spec"]["labels"]["version"], "v1");
    assert_eq!(we["spec"]["serviceAccount"], "vm-sa");
    assert_eq!(we["spec"]["locality"], "us-east1/us-east1-b");
    assert_eq!(
        we["metadata"]["annotations"]["istio.io/autoRegistrationGroup"],
        "python-http"
    );
    assert_eq!(
        we["metadata"]["annotations"]["istio.io/workloadController"],
        "replica-a"
    );
    assert!(we["metadata"]["annotations"]["istio.io/connectedAt"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(
        we["metadata"]["ownerReferences"][0]["kind"],
        "WorkloadGroup"
    );

    // The name table has the VIP at once, but no endpoint until the VM reports healthy.
    let (v1, t) = table_naming(&vm, "vmservice.example.com").await;
    assert_eq!(t.namespace, "vm-namespace");
    assert_eq!(t.version, v1);
    let vip = t.names["vmservice.example.com"].ips[0];
    assert!(vip.to_string().starts_with("240.240."), "{vip}");
    assert!(t.services["vmservice.example.com"].ports[0]
        .endpoints
        .is_empty());

    let h: Value = vm
        .json(
            Method::POST,
            "/v1/health",
            Some(
                &json!({"namespace": "vm-namespace", "name": "python-http-10.0.0.5",
            "healthy": true, "registration": r.registration, "sequence": 2}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(h["applied"], true);
    let (status, v2, t) = table(&vm, &format!("?version={v1}&wait=10")).await;
    assert_eq!(status, 200);
    assert_ne!(v1, v2);
    let eps = &t.unwrap().services["vmservice.example.com"].ports[0].endpoints;
    assert_eq!(eps.len(), 1);
    assert_eq!((eps[0].address.as_str(), eps[0].port), ("10.0.0.5", 9090));
    // An older report does not undo the newer one.
    let h: Value = vm
        .json(
            Method::POST,
            "/v1/health",
            Some(
                &json!({"namespace": "vm-namespace", "name": "python-http-10.0.0.5",
            "healthy": false, "registration": r.registration, "sequence": 1}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(h["applied"], false);
    s.stop().await;
}

#[tokio::test]
async fn registration_errors_are_typed() {
    let s = TestServer::start().await;
    s.apply_yaml(&istio_vm_yaml()).await.unwrap();
    s.apply_yaml("apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: python-http-10.0.0.9, namespace: vm-namespace}\nspec: {address: 10.0.0.9}\n")
        .await
        .unwrap();
    let vm = s.vm("vm-namespace", "vm-sa").await;

    let (st, e) = status_of(register(&vm, python_http("not-an-ip")).await);
    assert_eq!(
        (st, e.error.as_str(), e.field.as_deref()),
        (400, "bad_request", Some("address"))
    );
    let (st, e) = status_of(
        register(
            &vm,
            json!({"group": "python-http", "address": "10.0.0.1", "labelz": {}}),
        )
        .await,
    );
    assert_eq!((st, e.field.as_deref()), (400, Some("labelz")), "{e:?}");
    let (st, e) = status_of(register(&vm, json!({"group": "python-http", "address": 5})).await);
    assert_eq!((st, e.field.as_deref()), (400, Some("address")), "{e:?}");
    let (st, _) = status_of(
        vm.call(Method::POST, "/v1/register", Some(b"{not json".to_vec()))
            .await,
    );
    assert_eq!(st, 400);
    let (st, e) = status_of(
        register(
            &vm,
            json!({"group": "python-http", "address": "10.0.0.1", "labels": {"bad key!": "x"}}),
        )
        .await,
    );
    assert_eq!((st, e.field.as_deref()), (400, Some("labels[bad key!]")));

    let (st, e) = status_of(register(&vm.with_token(""), python_http("10.0.0.1")).await);
    assert_eq!((st, e.error.as_str()), (401, "unauthorized"));
    let (st, _) = status_of(register(&vm.with_token("a.b.c"), python_http("10.0.0.1")).await);
    assert_eq!(st, 401);

    let other_ns = s.vm("other", "vm-sa").await;
    let (st, e) = status_of(register(&other_ns, python_http("10.0.0.1")).await);
    assert_eq!((st, e.error.as_str()), (403, "forbidden"), "{e:?}");
    let wrong_sa = s.vm("vm-namespace", "default").await;
    let (st, e) = status_of(register(&wrong_sa, python_http("10.0.0.1")).await);
    assert_eq!(st, 403, "{e:?}");
    assert!(e.message.contains("service account"));

    let (st, e) = status_of(register(&vm, json!({"group": "nope", "address": "10.0.0.1"})).await);
    assert_eq!((st, e.error.as_str()), (404, "not_found"));

    let (st, e) = status_of(register(&vm, python_http("10.0.0.9")).await);
    assert_eq!((st, e.error.as_str()), (409, "conflict"), "{e:?}");

    let m = s.admin.call(Method::GET, "/metrics", None).await.unwrap();
    let m = String::from_utf8(m.body.to_vec()).unwrap();
    for line in [
        "vmesh_registrations_total{result=\"bad_request\"} 2",
        "vmesh_registrations_total{result=\"forbidden\"} 2",
        "vmesh_registrations_total{result=\"not_found\"} 1",
        "vmesh_registrations_total{result=\"conflict\"} 1",
        "vmesh_token_refusals_total{reason=\"missing\"} 1",
        "vmesh_token_refusals_total{reason=\"malformed\"} 1",
    ] {
        assert!(m.contains(line), "{line} not in\n{m}");
    }
    s.stop().await;
}

#[tokio::test]
async fn only_the_admin_changes_config_and_only_vms_register() {
    let s = TestServer::start().await;
    s.apply_yaml(&istio_vm_yaml()).await.unwrap();
    let vm = s.vm("vm-namespace", "vm-sa").await;
    let (st, _) = status_of(vm.call(Method::GET, "/v1/admin/objects/we", None).await);
    assert_eq!(st, 403);
    let (st, _) = status_of(
        vm.call(
            Method::POST,
            "/v1/admin/tokens",
            Some(br#"{"namespace":"vm-namespace","serviceAccount":"x","ttlSeconds":60}"#.to_vec()),
        )
        .await,
    );
    assert_eq!(st, 403);
    let (st, _) = status_of(
        vm.call(
            Method::DELETE,
            "/v1/admin/objects/wg/vm-namespace/python-http",
            None,
        )
        .await,
    );
    assert_eq!(st, 403);
    let (st, _) = status_of(register(&s.admin, python_http("10.0.0.1")).await);
    assert_eq!(st, 403);
    s.stop().await;
}

#[tokio::test]
async fn name_table_long_poll_answers_stale_at_once_times_out_with_304_and_wakes_on_change() {
    let s = TestServer::start().await;
    s.apply_yaml(&istio_vm_yaml()).await.unwrap();
    let vm = s.vm("vm-namespace", "vm-sa").await;
    let (st, _, _) = table(&vm, "?version=stale&wait=5").await;
    assert_eq!(st, 200);
    let (v, _) = table_naming(&vm, "vmservice.example.com").await;
    let started = std::time::Instant::now();
    let (st, v304, t) = table(&vm, &format!("?version={v}&wait=1")).await;
    assert_eq!((st, v304.as_str(), t.is_none()), (304, v.as_str(), true));
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));

    let waiter = {
        let vm = vm.clone();
        let v = v.clone();
        tokio::spawn(async move { table(&vm, &format!("?version={v}&wait=30")).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    s.apply_yaml("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: extra, namespace: vm-namespace}\nspec:\n  hosts: [extra.example.com]\n  addresses: [192.0.2.7]\n  ports: [{number: 443, name: tls, protocol: TLS}]\n  resolution: STATIC\n  endpoints: [{address: 192.0.2.8}]\n")
        .await
        .unwrap();
    let (st, v2, t) = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st, 200);
    assert_ne!(v2, v);
    let t = t.unwrap();
    assert_eq!(t.names["extra.example.com"].ips[0].to_string(), "192.0.2.7");
    assert_eq!(
        t.services["extra.example.com"].ports[0].endpoints[0].address,
        "192.0.2.8"
    );

    // A change another namespace cannot see leaves this namespace's version alone.
    s.apply_yaml("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: private, namespace: team-b}\nspec:\n  hosts: [private.example.com]\n  exportTo: [\".\"]\n  addresses: [192.0.2.9]\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n")
        .await
        .unwrap();
    let (st, _, _) = table(&vm, &format!("?version={v2}&wait=1")).await;
    assert_eq!(st, 304);
    let (st, e) = status_of(vm.call(Method::GET, "/v1/name-table?wait=soon", None).await);
    assert_eq!((st, e.field.as_deref()), (400, Some("wait")));
    s.stop().await;
}

#[tokio::test]
async fn refused_config_names_document_and_field_and_applies_nothing() {
    let s = TestServer::start().await;
    let yaml = "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: ok-group, namespace: ns1}\nspec: {template: {serviceAccount: sa}}\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad, namespace: ns1}\nspec:\n  hosts: [a.example.com]\n  ports: [{number: 99999, name: http}]\n";
    let (st, e) = status_of(s.apply_yaml(yaml).await);
    assert_eq!(st, 400);
    assert_eq!(
        (e.error.as_str(), e.index, e.field.as_deref()),
        ("invalid", Some(1), Some("spec.ports[0].number")),
        "{e:?}"
    );
    assert!(e.message.contains("ServiceEntry/bad"), "{}", e.message);
    let (st, _) = status_of(
        s.admin
            .call(Method::GET, "/v1/admin/objects/wg/ns1/ok-group", None)
            .await,
    );
    assert_eq!(st, 404, "nothing from a refused batch is applied");

    let (st, e) = status_of(s.apply_yaml("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\nspec: {}\n").await);
    assert_eq!(st, 400);
    assert!(e.message.contains("VirtualService"), "{}", e.message);
    let (st, e) = status_of(
        s.admin
            .call(
                Method::POST,
                "/v1/admin/apply",
                Some(b"{\"documents\": 7}".to_vec()),
            )
            .await,
    );
    assert_eq!((st, e.field.as_deref()), (400, Some("documents")));
    let (st, _) = status_of(
        s.admin
            .call(Method::GET, "/v1/admin/objects/gateways", None)
            .await,
    );
    assert_eq!(st, 404);
    s.stop().await;
}

#[tokio::test]
async fn deregister_deletes_the_entry_at_once_and_group_deletion_cascades() {
    let s = TestServer::start().await;
    s.apply_yaml(&istio_vm_yaml()).await.unwrap();
    let vm = s.vm("vm-namespace", "vm-sa").await;
    register(&vm, python_http("10.0.0.5")).await.unwrap();
    register(&vm, python_http("10.0.0.6")).await.unwrap();
    let _: Value = vm
        .json(
            Method::POST,
            "/v1/deregister",
            Some(&json!({"namespace": "vm-namespace", "name": "python-http-10.0.0.5"})),
        )
        .await
        .unwrap();
    let (st, _) = status_of(
        s.admin
            .call(
                Method::GET,
                "/v1/admin/objects/we/vm-namespace/python-http-10.0.0.5",
                None,
            )
            .await,
    );
    assert_eq!(st, 404);
    s.admin
        .call(
            Method::DELETE,
            "/v1/admin/objects/workloadgroup/vm-namespace/python-http",
            None,
        )
        .await
        .unwrap();
    let list: Value = s
        .admin
        .json(
            Method::GET,
            "/v1/admin/objects/we?namespace=vm-namespace",
            None::<&()>,
        )
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 0, "{list}");
    // Re-creating the group brings the still-connected VM back at once.
    s.apply_yaml(&istio_vm_yaml()).await.unwrap();
    let we: Value = s
        .admin
        .json(
            Method::GET,
            "/v1/admin/objects/we/vm-namespace/python-http-10.0.0.6",
            None::<&()>,
        )
        .await
        .unwrap();
    assert_eq!(we["spec"]["address"], "10.0.0.6");
    s.stop().await;
}

#[tokio::test]
async fn healthz_metrics_and_jwks_are_served_without_credentials() {
    let s = TestServer::start().await;
    let anon = s.admin.with_token("");
    let r = anon.call(Method::GET, "/healthz", None).await.unwrap();
    assert_eq!(&r.body[..], b"ok\n");
    let m = anon.call(Method::GET, "/metrics", None).await.unwrap();
    let m = String::from_utf8(m.body.to_vec()).unwrap();
    for name in [
        "vmesh_workload_entries{state=\"connected\"}",
        "vmesh_name_table_long_polls",
        "vmesh_store_commit_seconds_bucket",
        "vmesh_workload_entries_health{health=\"healthy\"}",
    ] {
        assert!(m.contains(name), "{name} missing from\n{m}");
    }
    let j: Value = anon
        .json(Method::GET, "/.well-known/jwks.json", None::<&()>)
        .await
        .unwrap();
    assert_eq!(j["keys"][0]["kty"], "EC");
    s.stop().await;
}

#[tokio::test]
async fn vips_are_stable_across_restarts() {
    let s = TestServer::start().await;
    s.apply_yaml(&istio_vm_yaml()).await.unwrap();
    let vm = s.vm("vm-namespace", "vm-sa").await;
    let (_, t) = table_naming(&vm, "vmservice.example.com").await;
    let before = t.names["vmservice.example.com"].ips.clone();
    let s = s.restart(Options::default()).await;
    let vm = s.vm("vm-namespace", "vm-sa").await;
    let (_, _, t) = table(&vm, "").await;
    assert_eq!(t.unwrap().names["vmservice.example.com"].ips, before);
    s.stop().await;
}
