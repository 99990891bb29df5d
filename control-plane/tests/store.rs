//! The store contract, run unchanged against the embedded redb store and a real etcd; crash
//! safety of the real binary under `kill -9` on both; `serve --store etcd` across restarts and
//! `migrate` from the embedded store into etcd.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::T0;
use hyper::Method;
use serde_json::{json, Value};
use vmesh_control::api::ApplyRequest;
use vmesh_control::client::Client;
use vmesh_control::clock::{ManualClock, SystemClock};
use vmesh_control::config::Document;
use vmesh_control::store::contract::store_contract;
use vmesh_control::store::etcd::{EtcdConfig, EtcdStore};
use vmesh_control::store::redb::RedbStore;
use vmesh_control::store::{Event, Store, StoreError, Txn};
use vmesh_test_support::etcd::Etcd;
use vmesh_test_support::eventually::assert_eventually_async;
use vmesh_test_support::process::Proc;
use vmesh_test_support::{free_port, TempDir};

#[tokio::test]
async fn redb_store_meets_the_store_contract() {
    let dir = vmesh_test_support::TempDir::new();
    let clock = Arc::new(ManualClock::new(T0));
    let s = RedbStore::open(&dir.path().join("s.redb"), clock.clone(), None).unwrap();
    store_contract(&s, |d| clock.advance(d)).await;
}

async fn etcd_store(etcd: &Etcd, prefix: &str) -> EtcdStore {
    let cfg = EtcdConfig::new(vec![etcd.endpoint()], prefix, None, None, None).unwrap();
    EtcdStore::open(&cfg, Arc::new(SystemClock), None)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_meets_the_store_contract() {
    let etcd = Etcd::start();
    let s = etcd_store(&etcd, "/contract/").await;
    // etcd's leases run on its own clock: the contract's clock moves by waiting.
    store_contract(&s, |d| {
        tokio::task::block_in_place(|| std::thread::sleep(d))
    })
    .await;
}

/// etcd serving https and requiring client certificates: the store connects with the files of
/// `--etcd-cacert/--etcd-cert/--etcd-key`, and without a client certificate it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_connects_over_tls_with_a_client_certificate() {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let dir = TempDir::new();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.clone().self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, &ca_key);
    let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &issuer).unwrap();
        (
            dir.file(&format!("{name}.pem"), &cert.pem()),
            dir.file(&format!("{name}-key.pem"), &key.serialize_pem()),
        )
    };
    let ca_file = dir.file("ca.pem", &ca.pem());
    let (server, server_key) = leaf("server", ExtendedKeyUsagePurpose::ServerAuth);
    let (client, client_key) = leaf("client", ExtendedKeyUsagePurpose::ClientAuth);
    let etcd = Etcd::start_tls(vmesh_test_support::etcd::Tls {
        ca: ca_file.clone(),
        cert: server,
        key: server_key,
    });
    let cfg = EtcdConfig::new(
        vec![etcd.endpoint()],
        "/tls/",
        Some(ca_file.clone()),
        Some(client),
        Some(client_key),
    )
    .unwrap();
    let s = EtcdStore::open(&cfg, Arc::new(SystemClock), None)
        .await
        .unwrap();
    s.commit(Txn::default().put("obj/x".into(), b"x".to_vec()))
        .await
        .unwrap();
    assert_eq!(s.get("obj/x").await.unwrap().value, b"x");

    let no_client_cert =
        EtcdConfig::new(vec![etcd.endpoint()], "/tls/", Some(ca_file), None, None).unwrap();
    let e = EtcdStore::open(&no_client_cert, Arc::new(SystemClock), None).await;
    assert!(matches!(e, Err(StoreError::Unavailable(_))), "{e:?}");
}

/// etcd with authentication enabled: refused without a user, served with `--etcd-user`'s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_authenticates_as_the_configured_user() {
    let etcd = Etcd::start();
    let mut admin = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    admin.role_add("root").await.unwrap();
    admin.user_add("root", "rootpw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();
    let cfg = EtcdConfig::new(vec![etcd.endpoint()], "/auth/", None, None, None).unwrap();
    let e = EtcdStore::open(&cfg, Arc::new(SystemClock), None).await;
    assert!(matches!(e, Err(StoreError::Unavailable(_))), "{e:?}");
    let wrong = cfg.clone().with_user("root:nope".parse().unwrap());
    let e = EtcdStore::open(&wrong, Arc::new(SystemClock), None).await;
    assert!(matches!(e, Err(StoreError::Unavailable(_))), "{e:?}");
    let s = EtcdStore::open(
        &cfg.with_user("root:rootpw".parse().unwrap()),
        Arc::new(SystemClock),
        None,
    )
    .await
    .unwrap();
    s.commit(Txn::default().put("obj/x".into(), b"x".to_vec()))
        .await
        .unwrap();
    assert_eq!(s.get("obj/x").await.unwrap().value, b"x");
}

/// Two control planes under different prefixes of one etcd see nothing of each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_prefixes_keep_control_planes_apart() {
    let etcd = Etcd::start();
    let a = etcd_store(&etcd, "/a/").await;
    let b = etcd_store(&etcd, "/a2").await;
    let mut wb = b.watch();
    a.commit(Txn::default().put("obj/x".into(), b"a".to_vec()))
        .await
        .unwrap();
    let rb = b
        .commit(Txn::default().put("obj/x".into(), b"b".to_vec()))
        .await
        .unwrap();
    assert_eq!(a.get("obj/x").await.unwrap().value, b"a");
    assert_eq!(b.list("obj/").await.unwrap().0.len(), 1);
    let c = wb.try_recv().unwrap();
    assert_eq!(c.revision, rb, "b's watch starts with b's own commit");
    assert!(wb.try_recv().is_err());
}

/// etcd down: every call fails `Unavailable` (503 in the API) within the request deadline;
/// etcd back: writes succeed again and the watch resumes where it stopped, by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_is_unavailable_while_etcd_is_down_and_resumes_by_itself() {
    let mut etcd = Etcd::start();
    let s = etcd_store(&etcd, "/vmesh/").await;
    let mut w = s.watch();
    s.commit(Txn::default().put("obj/before".into(), vec![1]))
        .await
        .unwrap();
    etcd.kill();
    let e = s
        .commit(Txn::default().put("obj/during".into(), vec![1]))
        .await;
    assert!(matches!(e, Err(StoreError::Unavailable(_))), "{e:?}");
    assert!(matches!(
        s.get("obj/before").await,
        Err(StoreError::Unavailable(_))
    ));
    etcd.restart();
    assert_eventually_async("writes succeed once etcd is back", async || {
        s.commit(Txn::default().put("obj/after".into(), vec![2]))
            .await
            .is_ok()
    })
    .await;
    let mut keys = Vec::new();
    while let Ok(c) = w.try_recv() {
        for e in c.events {
            if let Event::Put(r) = e {
                keys.push(r.key);
            }
        }
    }
    assert_eq!(keys.first().map(String::as_str), Some("obj/before"));
    assert_eq!(keys.last().map(String::as_str), Some("obj/after"));
}

#[tokio::test]
async fn concurrent_commits_share_fsyncs_and_all_succeed() {
    let dir = vmesh_test_support::TempDir::new();
    let s = Arc::new(
        RedbStore::open(
            &dir.path().join("s.redb"),
            Arc::new(ManualClock::new(T0)),
            None,
        )
        .unwrap(),
    );
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.commit(Txn::default().put(format!("obj/k{i:03}"), vec![1]))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut revs = BTreeSet::new();
    for t in tasks {
        revs.insert(t.await.unwrap());
    }
    assert_eq!(revs.len(), 200, "every transaction gets its own revision");
    assert_eq!(s.list("obj/").await.unwrap().0.len(), 200);
}

#[tokio::test]
async fn a_closed_store_releases_its_file_and_keeps_every_commit() {
    let dir = vmesh_test_support::TempDir::new();
    let path = dir.path().join("s.redb");
    let clock = Arc::new(ManualClock::new(T0));
    let s = RedbStore::open(&path, clock.clone(), None).unwrap();
    assert!(
        RedbStore::open(&path, clock.clone(), None).is_err(),
        "a second opener is refused"
    );
    s.commit(Txn::default().put("obj/x".into(), b"x".to_vec()))
        .await
        .unwrap();
    s.close().await;
    assert!(matches!(
        s.get("obj/x").await,
        Err(StoreError::Unavailable(_))
    ));
    let again = RedbStore::open(&path, clock, None).unwrap();
    assert_eq!(again.get("obj/x").await.unwrap().value, b"x");
}

// ---- crash safety of the real binary ----

/// `vmesh-control serve` on `dir` with `store` (the store flags), its log next to the data
/// dir; killed (SIGKILL) when dropped.
struct Server {
    proc: Proc,
    url: String,
}

fn spawn(dir: &Path, port: u16, store: &[String]) -> Server {
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--replica",
        "crash-test",
        "--log",
        "warn",
        "--data-dir",
        &dir.display().to_string(),
        // The writers register as fast as they can with one token: no per-identity quota.
        "--registration-rate",
        "0",
        "--max-entries-per-identity",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(store.iter().cloned());
    let log = dir.with_extension("log");
    Server {
        proc: Proc::spawn(
            "vmesh-control",
            Path::new(env!("CARGO_BIN_EXE_vmesh-control")),
            &args,
            &log,
        ),
        url: format!("https://127.0.0.1:{port}"),
    }
}

fn etcd_flags(etcd: &Etcd) -> Vec<String> {
    vec![
        "--store".into(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        etcd.endpoint(),
    ]
}

fn group_doc(i: usize) -> Document {
    Document {
        source: "crash".into(),
        index: 0,
        object: json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
            "metadata": {"name": format!("g{i}"), "namespace": "crash"},
            "spec": {"template": {"serviceAccount": "vm"}}}),
    }
}

/// A tiny deterministic generator, so a failing run can be replayed from its printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_at_random_moments() {
    kill_9_rounds(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_at_random_moments_on_etcd() {
    let etcd = Etcd::start();
    kill_9_rounds(&etcd_flags(&etcd)).await;
}

/// Spawns the real binary on `store`, hammers it with config writes and registrations from
/// several clients, `kill -9`s it at a random moment, restarts it, and checks that every write
/// it had acknowledged is there. Several rounds on one data dir (and store).
async fn kill_9_rounds(store: &[String]) {
    let seed = std::env::var("VMESH_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash test seed {seed} (set VMESH_CRASH_SEED to replay)");
    let mut rng = Rng(seed);
    let parent = TempDir::new();
    let data = parent.path().join("data");
    let dir = data.as_path();
    let acked_groups = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let acked_entries = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let mut next_group = 0usize;
    for round in 0..5 {
        let port = free_port();
        let mut p = spawn(dir, port, store);
        let admin = common::wait_for_server(dir, &p.url).await;
        // Everything acknowledged in earlier rounds is still there.
        let acked = snapshot(&acked_groups, &acked_entries);
        check(&admin, &acked.0, &acked.1).await;
        if round == 0 {
            admin
                .json::<Value>(
                    Method::POST,
                    "/v1/admin/apply",
                    Some(&ApplyRequest {
                        documents: vec![group_doc(0)],
                        namespace: String::new(),
                    }),
                )
                .await
                .unwrap();
            acked_groups.lock().unwrap().insert("g0".to_string());
            next_group = 1;
        }
        let tok = admin
            .mint_token("crash", "vm", Duration::from_secs(3600))
            .await
            .unwrap();
        let vm = admin.with_token(&tok.token);
        let mut workers = Vec::new();
        for w in 0..6 {
            let (admin, vm) = (admin.clone(), vm.clone());
            let (groups, entries) = (acked_groups.clone(), acked_entries.clone());
            let base = next_group + w * 100_000;
            workers.push(tokio::spawn(async move {
                let Ok(mut ac) = admin.connect().await else {
                    return;
                };
                let Ok(mut vc) = vm.connect().await else {
                    return;
                };
                for i in 0.. {
                    if w % 2 == 0 {
                        let g = base + i;
                        let req = ApplyRequest {
                            documents: vec![group_doc(g)],
                            namespace: String::new(),
                        };
                        match ac
                            .json::<Value>(Method::POST, "/v1/admin/apply", Some(&req))
                            .await
                        {
                            Ok(_) => {
                                groups.lock().unwrap().insert(format!("g{g}"));
                            }
                            Err(_) => return,
                        }
                    } else {
                        let ip = format!("10.{round}.{}.{}", w * 40 + i / 250, i % 250 + 1);
                        let body = json!({"group": "g0", "namespace": "crash", "address": ip});
                        match vc
                            .json::<Value>(Method::POST, "/v1/register", Some(&body))
                            .await
                        {
                            Ok(r) => {
                                entries.lock().unwrap().insert(
                                    r["workloadEntry"]["name"].as_str().unwrap().to_string(),
                                );
                            }
                            Err(_) => return,
                        }
                    }
                }
            }));
        }
        next_group += 1_000_000;
        let wait = 100 + rng.next() % 400;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        // SIGKILL: no chance to flush or clean up.
        p.proc.kill();
        for w in workers {
            let _ = w.await;
        }
        eprintln!(
            "round {round}: killed after {wait} ms; {} groups, {} entries acknowledged so far",
            acked_groups.lock().unwrap().len(),
            acked_entries.lock().unwrap().len()
        );
    }
    let port = free_port();
    let mut p = spawn(dir, port, store);
    let admin = common::wait_for_server(dir, &p.url).await;
    let acked = snapshot(&acked_groups, &acked_entries);
    check(&admin, &acked.0, &acked.1).await;
    assert!(
        acked_entries.lock().unwrap().len() > 10 && acked_groups.lock().unwrap().len() > 10,
        "the hammer did work"
    );
    p.proc.kill();
}

type Acked = Arc<std::sync::Mutex<BTreeSet<String>>>;

fn snapshot(g: &Acked, e: &Acked) -> (BTreeSet<String>, BTreeSet<String>) {
    (g.lock().unwrap().clone(), e.lock().unwrap().clone())
}

async fn check(admin: &Client, groups: &BTreeSet<String>, entries: &BTreeSet<String>) {
    let have = |kind: &'static str| async move {
        let v: Value = admin
            .json(
                Method::GET,
                &format!("/v1/admin/objects/{kind}?namespace=crash"),
                None::<&()>,
            )
            .await
            .unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect::<BTreeSet<_>>()
    };
    let g = have("workloadgroup").await;
    let missing: Vec<_> = groups.difference(&g).collect();
    assert!(missing.is_empty(), "acknowledged groups lost: {missing:?}");
    let e = have("workloadentry").await;
    let missing: Vec<_> = entries.difference(&e).collect();
    assert!(missing.is_empty(), "acknowledged entries lost: {missing:?}");
}

/// `close` racing with commits: whatever was queued before the close is committed, whatever
/// came after is refused, and the file is released either way (a commit queued right behind
/// a close used to be dropped and the close answered without releasing the file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_racing_commits_keeps_every_acknowledged_commit_and_releases_the_file() {
    let dir = vmesh_test_support::TempDir::new();
    let path = dir.path().join("s.redb");
    let clock = Arc::new(ManualClock::new(T0));
    for round in 0..20 {
        let s = RedbStore::open(&path, clock.clone(), None).unwrap();
        let commit = |i: usize| {
            let s = s.clone();
            async move {
                let key = format!("obj/r{round}-{i}");
                (
                    key.clone(),
                    s.commit(Txn::default().put(key, vec![1])).await,
                )
            }
        };
        let (_, a, b, c, d) = tokio::join!(s.close(), commit(0), commit(1), commit(2), commit(3));
        let again = RedbStore::open(&path, clock.clone(), None).unwrap_or_else(|e| {
            panic!("round {round}: the closed store still holds its file: {e}")
        });
        for (key, r) in [a, b, c, d] {
            match r {
                Ok(_) => assert!(again.get(&key).await.is_ok(), "{key} acknowledged but lost"),
                Err(e) => assert!(matches!(e, StoreError::Unavailable(_)), "{key}: {e}"),
            }
        }
        again.close().await;
    }
}

/// A WorkloadGroup applied and a VM registered: both are there after a clean restart, and
/// nothing was stored in the data dir (which keeps the identity files only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_etcd_keeps_config_and_registrations_across_a_restart() {
    let etcd = Etcd::start();
    let parent = TempDir::new();
    let dir = parent.path().join("data");
    let flags = etcd_flags(&etcd);
    let mut p = spawn(&dir, free_port(), &flags);
    let admin = common::wait_for_server(&dir, &p.url).await;
    let entry = apply_and_register(&admin).await;
    p.proc.signal("TERM");
    assert!(
        p.proc
            .wait_exit(Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "serve stops cleanly"
    );
    assert!(!dir.join("store.redb").exists(), "the data is in etcd");
    let p = spawn(&dir, free_port(), &flags);
    let admin = common::wait_for_server(&dir, &p.url).await;
    check(&admin, &["g0".to_string()].into(), &[entry].into()).await;
}

/// `migrate` copies an embedded store into etcd, refuses to overwrite a non-empty prefix
/// unless `--force`, and a server on etcd then serves what the embedded one had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_copies_an_embedded_store_into_etcd() {
    let etcd = Etcd::start();
    let parent = TempDir::new();
    let dir = parent.path().join("data");
    let mut p = spawn(&dir, free_port(), &[]);
    let admin = common::wait_for_server(&dir, &p.url).await;
    let entry = apply_and_register(&admin).await;
    p.proc.signal("TERM");
    assert!(p.proc.wait_exit(Duration::from_secs(30)).is_some());
    let migrate = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmesh-control"))
            .arg("migrate")
            .arg("--from")
            .arg(&dir)
            .args(["--to", &etcd.target()])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = migrate(&[]);
    assert!(ok, "{out}");
    let (ok, out) = migrate(&[]);
    assert!(
        !ok && out.contains("--force"),
        "a second copy is refused: {out}"
    );
    let (ok, out) = migrate(&["--force"]);
    assert!(ok, "{out}");
    std::fs::remove_file(dir.join("store.redb")).unwrap();
    let p = spawn(&dir, free_port(), &etcd_flags(&etcd));
    let admin = common::wait_for_server(&dir, &p.url).await;
    check(&admin, &["g0".to_string()].into(), &[entry].into()).await;
}

/// Applies WorkloadGroup `crash/g0` and registers one VM in it; the entry's name.
async fn apply_and_register(admin: &Client) -> String {
    admin
        .json::<Value>(
            Method::POST,
            "/v1/admin/apply",
            Some(&ApplyRequest {
                documents: vec![group_doc(0)],
                namespace: String::new(),
            }),
        )
        .await
        .unwrap();
    let tok = admin
        .mint_token("crash", "vm", Duration::from_secs(3600))
        .await
        .unwrap();
    let r: Value = admin
        .with_token(&tok.token)
        .json(
            Method::POST,
            "/v1/register",
            Some(&json!({"group": "g0", "namespace": "crash", "address": "10.1.2.3"})),
        )
        .await
        .unwrap();
    r["workloadEntry"]["name"].as_str().unwrap().to_string()
}

/// etcd stopped: a registration answers 503 (the store is unavailable, nothing is half
/// written); etcd back: registrations succeed again without touching the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_answers_503_while_etcd_is_down_and_succeeds_once_it_is_back() {
    let mut etcd = Etcd::start();
    let parent = TempDir::new();
    let dir = parent.path().join("data");
    let p = spawn(&dir, free_port(), &etcd_flags(&etcd));
    let admin = common::wait_for_server(&dir, &p.url).await;
    apply_and_register(&admin).await;
    let tok = admin
        .mint_token("crash", "vm", Duration::from_secs(3600))
        .await
        .unwrap();
    let vm = admin.with_token(&tok.token);
    let register = |ip: &'static str| {
        let vm = vm.clone();
        async move {
            vm.json::<Value>(
                Method::POST,
                "/v1/register",
                Some(&json!({"group": "g0", "namespace": "crash", "address": ip})),
            )
            .await
        }
    };
    etcd.kill();
    let (status, _) = common::status_of(register("10.1.2.4").await);
    assert_eq!(status, 503);
    etcd.restart();
    assert_eventually_async("registration succeeds once etcd is back", async || {
        register("10.1.2.4").await.is_ok()
    })
    .await;
}
