//! Several replicas on one real etcd: one shared identity (root CA, token-signing key, admin
//! credential), config and VIPs the same everywhere, VMs handed over when a replica is killed,
//! and what etcd being down does to registration and name tables.

mod common;

use std::path::Path;

use common::{istio_vm_yaml, status_of, Options, TestServer};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use vmesh_api::names::NameTable;
use vmesh_control::client::Client;
use vmesh_control::registry::{RegisterResponse, Settings};
use vmesh_control::server::StoreConfig;
use vmesh_control::store::etcd::EtcdConfig;
use vmesh_test_support::etcd::Etcd;
use vmesh_test_support::eventually::assert_eventually_async;

fn on_etcd(etcd: &Etcd, replica: &str) -> Options {
    Options {
        store: StoreConfig::Etcd(
            EtcdConfig::new(vec![etcd.endpoint()], "/vmesh/", None, None, None).unwrap(),
        ),
        settings: Settings {
            replica: replica.into(),
            ..Settings::default()
        },
        ..Options::default()
    }
}

fn python_http(addr: &str) -> Value {
    json!({"group": "python-http", "namespace": "vm-namespace", "address": addr})
}

async fn register(
    vm: &Client,
    body: Value,
) -> Result<RegisterResponse, vmesh_control::client::ClientError> {
    vm.json(Method::POST, "/v1/register", Some(&body)).await
}

/// The names of `namespace`'s table as the admin reads it, once it names `host`.
async fn names_with(c: &Client, namespace: &str, host: &str) -> Value {
    let mut out = Value::Null;
    assert_eventually_async(&format!("a table naming {host}"), async || {
        let Ok(r) = c
            .call(
                Method::GET,
                &format!("/v1/name-table?namespace={namespace}"),
                None,
            )
            .await
        else {
            return false;
        };
        let Ok(t) = serde_json::from_slice::<NameTable>(&r.body) else {
            return false;
        };
        if !t.names.contains_key(host) {
            return false;
        }
        out = serde_json::to_value(&t.names).unwrap();
        true
    })
    .await;
    out
}

fn file(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

/// Three replicas started at once race to create the identity: one wins, the others take
/// its copy. Tokens minted by one register on another, every serving certificate chains to
/// the one root, config applied on one is seen by all, and the VIPs are the same everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_identity_config_and_vips() {
    let etcd = Etcd::start();
    let (a, b, c) = tokio::join!(
        TestServer::with(on_etcd(&etcd, "replica-a")),
        TestServer::with(on_etcd(&etcd, "replica-b")),
        TestServer::with(on_etcd(&etcd, "replica-c")),
    );
    for s in [&b, &c] {
        assert_eq!(s.running().root_cert_pem, a.running().root_cert_pem);
        assert_eq!(s.running().admin_token, a.running().admin_token);
        for f in [
            "root-cert.pem",
            "root-key.pem",
            "token-signing-key.pem",
            "admin-token",
        ] {
            assert_eq!(file(s.dir.path(), f), file(a.dir.path(), f), "{f}");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(s.dir.path().join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o077, 0, "{f} is the server user's alone");
            }
        }
    }
    // A client that trusts only a's root-cert.pem talks to every replica.
    let root = file(a.dir.path(), "root-cert.pem");
    for s in [&a, &b, &c] {
        let cl = Client::new(&s.url, &root, &a.running().admin_token).unwrap();
        cl.call(Method::GET, "/v1/admin/objects/workloadgroup", None)
            .await
            .unwrap();
    }

    a.apply_yaml(&istio_vm_yaml()).await.unwrap();
    // A token minted by a, presented to b, once b has seen the group a applied.
    let token = a.token("vm-namespace", "vm-sa").await;
    let vm_on_b = b.admin.with_token(&token);
    assert_eventually_async("b registers with a's token", async || {
        register(&vm_on_b, python_http("10.0.0.5")).await.is_ok()
    })
    .await;
    let entry: Value = c
        .admin
        .json(
            Method::GET,
            "/v1/admin/objects/workloadentry/vm-namespace/python-http-10.0.0.5",
            None::<&()>,
        )
        .await
        .unwrap();
    assert_eq!(
        entry["metadata"]["annotations"]["istio.io/workloadController"],
        "replica-b"
    );
    // The VIPs (of the ServiceEntry host and the Service's ClusterIP) are the same on all.
    for ns in ["vm-namespace", "vm"] {
        let host = if ns == "vm" {
            "mysqldb.vm.svc.cluster.local"
        } else {
            "vmservice.example.com"
        };
        let na = names_with(&a.admin, ns, host).await;
        assert_eq!(names_with(&b.admin, ns, host).await, na, "{ns}");
        assert_eq!(names_with(&c.admin, ns, host).await, na, "{ns}");
    }
    for s in [a, b, c] {
        s.stop().await;
    }
}
