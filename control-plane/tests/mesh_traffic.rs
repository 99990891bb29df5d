//! What the control plane gives the data plane for mesh traffic, black-box through the HTTPS
//! API: endpoint identities (Istio's tlsMode rule), the client's network and locality echoed
//! from the long-poll's query, and meshNetworks' per-network east-west gateways.

mod common;

use std::collections::BTreeMap;

use common::{status_of, Options, TestServer};
use hyper::{Method, StatusCode};
use serde_json::json;
use vmesh_api::names::{Gateway, NameTable};

const YAML: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: python-http, namespace: vm-services}
spec:
  metadata: {labels: {app: python-http}}
  template: {serviceAccount: my-vm}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vm-workload-svc, namespace: vm-services}
spec:
  hosts: [vmservice.example.com]
  location: MESH_INTERNAL
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 9090}]
  resolution: STATIC
  workloadSelector: {labels: {app: python-http}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: manual-plain, namespace: vm-services}
spec: {address: 198.18.0.7, labels: {app: python-http}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: manual-sidecar, namespace: vm-services}
spec:
  address: 198.18.0.8
  labels: {app: python-http, security.istio.io/tlsMode: istio}
"#;

fn gateways() -> BTreeMap<String, Vec<Gateway>> {
    [(
        "vm-network".to_string(),
        vec![Gateway {
            address: "198.18.1.10".parse().unwrap(),
            port: 15443,
        }],
    )]
    .into()
}

/// The first table for `query` whose vmservice port has `n` endpoints.
async fn table_with(vm: &vmesh_control::client::Client, query: &str, n: usize) -> NameTable {
    let mut found = None;
    vmesh_test_support::eventually::assert_eventually_async(
        "a table with every endpoint",
        async || {
            let Ok(r) = vm
                .call(Method::GET, &format!("/v1/name-table?{query}"), None)
                .await
            else {
                return false;
            };
            let Ok(t) = serde_json::from_slice::<NameTable>(&r.body) else {
                return false;
            };
            let eps = t
                .services
                .get("vmservice.example.com")
                .and_then(|s| s.ports.first())
                .map_or(0, |p| p.endpoints.len());
            found = Some(t);
            eps == n
        },
    )
    .await;
    found.unwrap()
}

#[tokio::test]
async fn tables_carry_identities_the_client_s_network_and_locality_and_the_gateways() {
    let s = TestServer::with(Options {
        gateways: gateways(),
        ..Options::default()
    })
    .await;
    s.apply_yaml(YAML).await.unwrap();
    let vm = s.vm("vm-services", "my-vm").await;
    let r = vm
        .json::<serde_json::Value>(
            Method::POST,
            "/v1/register",
            Some(&json!({"group": "python-http", "namespace": "vm-services",
                         "address": "198.18.0.5", "network": "vm-network"})),
        )
        .await
        .unwrap();
    assert_eq!(
        r["workloadEntry"]["name"],
        "python-http-198.18.0.5-vm-network"
    );

    let t = table_with(&vm, "network=network1&locality=us-east%2F1a", 3).await;
    assert_eq!(t.network, "network1");
    assert_eq!(t.locality, "us-east/1a");
    assert_eq!(t.gateways, gateways());
    let eps: Vec<(&str, &str, &str)> = t.services["vmservice.example.com"].ports[0]
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.network.as_str(), e.identity.as_str()))
        .collect();
    assert_eq!(
        eps,
        [
            (
                "198.18.0.5",
                "vm-network",
                "spiffe://cluster.local/ns/vm-services/sa/my-vm"
            ),
            ("198.18.0.7", "", ""),
            (
                "198.18.0.8",
                "",
                "spiffe://cluster.local/ns/vm-services/sa/default"
            ),
        ],
        "the VM's network flows from its registration; identities follow Istio's tlsMode rule"
    );

    // Another network is another table (another version); no parameters, none of the two.
    let other = table_with(&vm, "network=vm-network", 3).await;
    assert_eq!(other.network, "vm-network");
    assert!(other.locality.is_empty());
    assert_ne!(other.version, t.version);
    let plain = table_with(&vm, "", 3).await;
    assert!(plain.network.is_empty() && plain.locality.is_empty());

    // A long-poll with the current version of its own key waits; another key's answers at once.
    let r = vm
        .call(
            Method::GET,
            &format!(
                "/v1/name-table?network=network1&locality=us-east%2F1a&version={}&wait=1",
                t.version
            ),
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    let r = vm
        .call(
            Method::GET,
            &format!(
                "/v1/name-table?network=vm-network&version={}&wait=1",
                t.version
            ),
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    s.stop().await;
}

#[tokio::test]
async fn malformed_network_or_locality_is_a_bad_request() {
    let s = TestServer::start().await;
    let vm = s.vm("vm-services", "my-vm").await;
    for (query, field) in [
        ("network=a%20b", "network"),
        ("network=a%2Fb", "network"),
        ("locality=a%2Fb%2Fc%2Fd", "locality"),
        ("locality=r%20r", "locality"),
    ] {
        let (st, e) = status_of(
            vm.json::<serde_json::Value>(
                Method::GET,
                &format!("/v1/name-table?{query}"),
                None::<&()>,
            )
            .await,
        );
        assert_eq!(st, 400, "{query}");
        assert!(format!("{e:?}").contains(field), "{query}: {e:?}");
    }
    s.stop().await;
}
