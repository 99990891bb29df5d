//! Several replicas on one real etcd: one shared identity (root CA, token-signing key, admin
//! credential), config and VIPs the same everywhere, VMs handed over when a replica is killed,
//! and what etcd being down does to registration and name tables.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
use vmesh_test_support::process::Proc;
use vmesh_test_support::{free_port, TempDir};

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

// ---- real replicas (processes) ----

/// `vmesh-control serve --store etcd` as replica `name`, with periods short enough for a
/// quick test: heartbeats every second, a lease of 3s, a grace period of 4s.
fn replica(etcd: &Etcd, dir: &Path, name: &str, port: u16) -> Proc {
    let args: Vec<String> = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--replica",
        name,
        "--log",
        "warn",
        "--data-dir",
        &dir.display().to_string(),
        "--store",
        "etcd",
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--heartbeat-interval",
        "1s",
        "--liveness-timeout",
        "3s",
        "--lease-ttl",
        "3s",
        "--grace-period",
        "4s",
        "--registration-rate",
        "0",
        "--max-entries-per-identity",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Proc::spawn(
        name,
        Path::new(env!("CARGO_BIN_EXE_vmesh-control")),
        &args,
        &dir.with_extension("log"),
    )
}

/// What one simulated VM saw.
#[derive(Debug, Default)]
struct VmLog {
    /// Replica index it is talking to now.
    at: usize,
    /// Times its entry was missing while it was alive (`register again`).
    lost: usize,
    failovers: usize,
}

/// A VM as the shim behaves: registers at `start`, heartbeats every 500 ms on a kept-alive
/// connection, and on a connection error moves to the next replica (a heartbeat there takes
/// the entry over). Runs until `stop` flips.
async fn vm(
    clients: Vec<Client>,
    start: usize,
    address: String,
    log: Arc<Mutex<VmLog>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut at = start;
    let body = python_http(&address);
    let name = format!("python-http-{address}");
    let hb = json!({"namespace": "vm-namespace", "name": name});
    let mut conn: Option<vmesh_control::client::Connection> = None;
    let mut registered = false;
    while !*stop.borrow() {
        if conn.is_none() {
            conn = clients[at].connect().await.ok();
        }
        let Some(c) = conn.as_mut() else {
            at = (at + 1) % clients.len();
            let mut l = log.lock().unwrap();
            l.failovers += 1;
            l.at = at;
            continue;
        };
        let r = if registered {
            c.call(
                Method::POST,
                "/v1/heartbeat",
                Some(serde_json::to_vec(&hb).unwrap()),
            )
            .await
        } else {
            c.call(
                Method::POST,
                "/v1/register",
                Some(serde_json::to_vec(&body).unwrap()),
            )
            .await
        };
        match r {
            Ok(_) => registered = true,
            Err(vmesh_control::client::ClientError::Api { status: 404, .. }) => {
                log.lock().unwrap().lost += 1;
                registered = false;
                continue;
            }
            // 503 while a replica's store is briefly away, or a race: try again.
            Err(vmesh_control::client::ClientError::Api { .. }) => {}
            Err(_) => {
                conn = None;
                at = (at + 1) % clients.len();
                let mut l = log.lock().unwrap();
                l.failovers += 1;
                l.at = at;
                continue;
            }
        }
        log.lock().unwrap().at = at;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every auto-registered entry: name -> (uid, controller, disconnected).
async fn entries(admin: &Client) -> BTreeMap<String, (String, String, bool)> {
    let Ok(list) = admin
        .json::<Value>(
            Method::GET,
            "/v1/admin/objects/workloadentry/vm-namespace",
            None::<&()>,
        )
        .await
    else {
        return BTreeMap::new();
    };
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let a = &e["metadata"]["annotations"];
            (
                e["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                (
                    e["metadata"]["uid"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    a["istio.io/workloadController"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    a.get("istio.io/disconnectedAt").is_some(),
                ),
            )
        })
        .collect()
}

/// 100 VMs spread over three replicas, and 10 more on the one that is then killed with
/// SIGKILL, whose VMs die with it. The 100 fail over to the survivors, which take their
/// entries over: none is lost or re-created (same uid), none duplicated. The 10 dead VMs'
/// entries are marked disconnected by the survivors once the killed replica's lease ends,
/// and removed after the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_hands_its_vms_to_the_others_and_sweeps_the_dead_ones() {
    let etcd = Etcd::start();
    let parent = TempDir::new();
    let ports = [free_port(), free_port(), free_port()];
    let dirs: Vec<_> = (0..3)
        .map(|i| parent.path().join(format!("r{i}")))
        .collect();
    let mut procs: Vec<Proc> = (0..3)
        .map(|i| replica(&etcd, &dirs[i], &format!("replica-{i}"), ports[i]))
        .collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("https://127.0.0.1:{p}"))
        .collect();
    let mut admins = Vec::new();
    for i in 0..3 {
        admins.push(common::wait_for_server(&dirs[i], &urls[i]).await);
    }
    let docs = vmesh_control::config::parse_documents("istio-vm.yaml", &istio_vm_yaml()).unwrap();
    admins[0].apply(docs, "default").await.unwrap();
    let token = admins[1]
        .mint_token("vm-namespace", "vm-sa", Duration::from_secs(3600))
        .await
        .unwrap()
        .token;
    let clients: Vec<Client> = admins.iter().map(|a| a.with_token(&token)).collect();
    // Every replica has the group before the VMs come.
    for a in &admins {
        assert_eventually_async("the group reached every replica", async || {
            a.call(
                Method::GET,
                "/v1/admin/objects/workloadgroup/vm-namespace/python-http",
                None,
            )
            .await
            .is_ok()
        })
        .await;
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (dead_tx, dead_rx) = tokio::sync::watch::channel(false);
    let mut logs = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..110usize {
        let log = Arc::new(Mutex::new(VmLog::default()));
        logs.push(log.clone());
        // VMs 100.. live only on replica 2 and die with it.
        let (start, stop) = if i < 100 {
            (i % 3, stop_rx.clone())
        } else {
            (2, dead_rx.clone())
        };
        tasks.push(tokio::spawn(vm(
            clients.clone(),
            start,
            format!("10.1.{}.{}", i / 200, i % 200 + 1),
            log,
            stop,
        )));
    }
    let before = {
        let mut got = BTreeMap::new();
        assert_eventually_async("all 110 VMs registered", async || {
            got = entries(&admins[0]).await;
            got.len() == 110 && got.values().all(|(_, _, disc)| !disc)
        })
        .await;
        got
    };
    let owned_by_2 = before.values().filter(|(_, c, _)| c == "replica-2").count();
    assert!(owned_by_2 >= 40, "replica-2 owns its share: {owned_by_2}");

    // The 10 die with replica 2.
    dead_tx.send_replace(true);
    procs[2].kill();
    let dead: Vec<String> = (100..110usize)
        .map(|i| format!("python-http-10.1.{}.{}", i / 200, i % 200 + 1))
        .collect();

    assert_eventually_async(
        "the live VMs' entries moved to the survivors and the dead VMs' ones are gone",
        async || {
            let now = entries(&admins[0]).await;
            now.len() == 100
                && now
                    .values()
                    .all(|(_, c, disc)| !disc && (c == "replica-0" || c == "replica-1"))
                && dead.iter().all(|d| !now.contains_key(d))
        },
    )
    .await;
    let after = entries(&admins[1]).await;
    for (name, (uid, _, _)) in &after {
        assert_eq!(
            &before[name].0, uid,
            "{name} was re-created while its VM was alive"
        );
    }
    for l in &logs[..100] {
        let l = l.lock().unwrap();
        assert_eq!(l.lost, 0, "a live VM's entry went missing: {l:?}");
        assert!(l.at != 2, "{l:?}");
    }
    // The killed replica shows as gone until its entries are swept, then is forgotten.
    let list: Value = admins[0]
        .json(Method::GET, "/v1/admin/replicas", None::<&()>)
        .await
        .unwrap();
    let alive: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["alive"] == true)
        .map(|r| r["replica"].as_str().unwrap())
        .collect();
    assert_eq!(alive, ["replica-0", "replica-1"], "{list}");
    let owned: u64 = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["entriesOwned"].as_u64().unwrap())
        .sum();
    assert_eq!(owned, 100, "{list}");

    stop_tx.send_replace(true);
    for t in tasks {
        t.await.unwrap();
    }
    drop(procs);
}

/// etcd stopped: registration answers 503, while name-table reads and long-polls keep
/// serving the last table and a VM already connected keeps its heartbeats answered. etcd
/// back: both replicas resume by themselves (a registration succeeds; config applied on one
/// reaches the other's tables through its watch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_writes_answer_503_and_tables_keep_serving_then_replicas_resume() {
    let mut etcd = Etcd::start();
    let a = TestServer::with(on_etcd(&etcd, "replica-a")).await;
    let b = TestServer::with(on_etcd(&etcd, "replica-b")).await;
    a.apply_yaml(&istio_vm_yaml()).await.unwrap();
    let vm_on_b = b.admin.with_token(&a.token("vm-namespace", "vm-sa").await);
    assert_eventually_async("b registers a first VM", async || {
        register(&vm_on_b, python_http("10.0.0.1")).await.is_ok()
    })
    .await;
    let names = names_with(&b.admin, "vm-namespace", "vmservice.example.com").await;
    let r = b
        .admin
        .call(Method::GET, "/v1/name-table?namespace=vm-namespace", None)
        .await
        .unwrap();
    let version = r.headers["x-vmesh-table-version"]
        .to_str()
        .unwrap()
        .to_string();

    etcd.kill();
    let (status, _) = status_of(register(&vm_on_b, python_http("10.0.0.2")).await);
    assert_eq!(status, 503);
    let (status, _) = status_of(
        a.apply_yaml(&istio_vm_yaml().replace("vmservice", "other"))
            .await,
    );
    assert_eq!(status, 503);
    // The connected VM's heartbeats need no write.
    vm_on_b
        .call(
            Method::POST,
            "/v1/heartbeat",
            Some(
                serde_json::to_vec(
                    &json!({"namespace": "vm-namespace", "name": "python-http-10.0.0.1"}),
                )
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    // The table is served as it was; a long-poll on it waits and answers 304.
    let r = b
        .admin
        .call(Method::GET, "/v1/name-table?namespace=vm-namespace", None)
        .await
        .unwrap();
    let t: NameTable = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(serde_json::to_value(&t.names).unwrap(), names);
    let r = b
        .admin
        .call(
            Method::GET,
            &format!("/v1/name-table?namespace=vm-namespace&version={version}&wait=1"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);

    etcd.restart();
    assert_eventually_async("registration succeeds again", async || {
        register(&vm_on_b, python_http("10.0.0.2")).await.is_ok()
    })
    .await;
    let more = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: after-outage
  namespace: vm-namespace
spec:
  hosts: [after.example.com]
  location: MESH_INTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: python-http}}
"#;
    assert_eventually_async("a accepts config again", async || {
        a.apply_yaml(more).await.is_ok()
    })
    .await;
    names_with(&b.admin, "vm-namespace", "after.example.com").await;
    a.stop().await;
    b.stop().await;
}
