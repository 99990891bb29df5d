//! WorkloadEntry lifecycle with a controllable clock: two replicas (registries) share one
//! store, as istiod replicas share the Kubernetes API; `tick()` is stepped by hand.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{istio_vm_yaml, T0};
use vmesh_api::time::format_rfc3339_nanos;
use vmesh_control::cache::Cache;
use vmesh_control::clock::{Clock, ManualClock};
use vmesh_control::config::{decode_all, parse_documents};
use vmesh_control::identity::Identity;
use vmesh_control::metrics::Metrics;
use vmesh_control::registry::{
    EntryRequest, HealthRequest, RegisterRequest, Registry, RegistryError, Settings,
};
use vmesh_control::store::redb::RedbStore;
use vmesh_istio::model::{Kind, ObjectKey, Resource, WorkloadEntry};
use vmesh_istio::workload::{
    controller_of, disconnected_at, is_healthy, ANNOTATION_CONNECTED_AT, ANNOTATION_DISCONNECTED_AT,
};

struct Mesh {
    _dir: vmesh_test_support::TempDir,
    clock: Arc<ManualClock>,
    a: Registry<RedbStore>,
    b: Registry<RedbStore>,
}

fn settings(replica: &str, grace: Duration) -> Settings {
    Settings {
        replica: replica.into(),
        grace,
        heartbeat_interval: Duration::from_secs(5),
        liveness_timeout: Duration::from_secs(15),
        lease_ttl: Duration::from_secs(15),
        ..Settings::default()
    }
}

async fn mesh_with_grace(grace: Duration) -> Mesh {
    let dir = vmesh_test_support::TempDir::new();
    let clock = Arc::new(ManualClock::new(T0));
    let store =
        Arc::new(RedbStore::open(&dir.path().join("store.redb"), clock.clone(), None).unwrap());
    let reg = |name: &str, cache| {
        Registry::new(
            store.clone(),
            cache,
            clock.clone() as Arc<dyn Clock>,
            settings(name, grace),
            Arc::new(Metrics::default()),
        )
    };
    let a = reg("replica-a", Cache::start(store.clone()).await.unwrap());
    let b = reg("replica-b", Cache::start(store.clone()).await.unwrap());
    let docs = parse_documents("istio-vm.yaml", &istio_vm_yaml()).unwrap();
    a.apply(decode_all(&docs, "default").unwrap())
        .await
        .unwrap();
    Mesh {
        _dir: dir,
        clock,
        a,
        b,
    }
}

async fn mesh() -> Mesh {
    mesh_with_grace(Duration::from_secs(10)).await
}

fn vm_identity() -> Identity {
    Identity {
        namespace: "vm-namespace".into(),
        service_account: "vm-sa".into(),
        issuer: "test".into(),
    }
}

fn req(addr: &str) -> RegisterRequest {
    RegisterRequest {
        group: "python-http".into(),
        namespace: "vm-namespace".into(),
        address: addr.into(),
        network: String::new(),
        locality: String::new(),
        labels: Default::default(),
    }
}

fn entry_ref(name: &str) -> EntryRequest {
    EntryRequest {
        namespace: "vm-namespace".into(),
        name: name.into(),
    }
}

/// The entry as replica `r` sees it once its cache caught up.
fn entry(r: &Registry<RedbStore>, name: &str) -> Option<WorkloadEntry> {
    r.cache()
        .get(&ObjectKey::new(Kind::WorkloadEntry, "vm-namespace", name))
        .and_then(|c| match &*c.object {
            Resource::WorkloadEntry(e) => Some(e.clone()),
            _ => None,
        })
}

const NAME: &str = "python-http-10.0.0.5";

impl Mesh {
    fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }

    async fn tick_both(&self) {
        self.a.tick().await.unwrap();
        self.b.tick().await.unwrap();
    }

    async fn settle(&self) {
        // Both caches follow the same store; wait until b has seen everything a wrote.
        let rev = self.a.cache().revision().max(self.b.cache().revision());
        self.a.cache().wait_for(rev).await;
        self.b.cache().wait_for(rev).await;
    }
}

#[tokio::test]
async fn quiet_vm_is_disconnected_then_deleted_after_the_grace_period() {
    let m = mesh().await;
    m.a.register(&vm_identity(), req("10.0.0.5")).await.unwrap();
    m.tick_both().await;
    m.advance(10);
    m.tick_both().await;
    assert!(
        disconnected_at(&entry(&m.a, NAME).unwrap()).is_none(),
        "10 s of silence is within the liveness timeout"
    );
    m.advance(6);
    m.a.tick().await.unwrap();
    let e = entry(&m.a, NAME).unwrap();
    assert_eq!(
        e.metadata.annotations.get(ANNOTATION_DISCONNECTED_AT),
        Some(&format_rfc3339_nanos(m.clock.now()))
    );
    assert!(!e.metadata.annotations.contains_key(ANNOTATION_CONNECTED_AT));
    m.advance(9);
    m.tick_both().await;
    assert!(
        entry(&m.a, NAME).is_some(),
        "still inside the 10 s grace period"
    );
    m.advance(2);
    m.a.tick().await.unwrap();
    assert!(
        entry(&m.a, NAME).is_none(),
        "deleted once the grace period ran out"
    );
}

#[tokio::test]
async fn heartbeats_keep_a_vm_connected_and_a_heartbeat_within_grace_reconnects_it() {
    let m = mesh().await;
    m.a.register(&vm_identity(), req("10.0.0.5")).await.unwrap();
    for _ in 0..5 {
        m.advance(5);
        m.a.heartbeat(&vm_identity(), &entry_ref(NAME))
            .await
            .unwrap();
        m.a.tick().await.unwrap();
    }
    assert!(disconnected_at(&entry(&m.a, NAME).unwrap()).is_none());
    m.advance(16);
    m.a.tick().await.unwrap();
    assert!(disconnected_at(&entry(&m.a, NAME).unwrap()).is_some());
    m.advance(5);
    m.a.heartbeat(&vm_identity(), &entry_ref(NAME))
        .await
        .unwrap();
    let e = entry(&m.a, NAME).unwrap();
    assert!(disconnected_at(&e).is_none(), "reconnected");
    m.advance(20);
    m.a.heartbeat(&vm_identity(), &entry_ref(NAME))
        .await
        .unwrap();
    m.a.tick().await.unwrap();
    assert!(
        entry(&m.a, NAME).is_some(),
        "the reconnect cancelled the deletion"
    );
}

#[tokio::test]
async fn the_grace_period_is_configurable() {
    let m = mesh_with_grace(Duration::from_secs(60)).await;
    m.a.register(&vm_identity(), req("10.0.0.5")).await.unwrap();
    m.advance(16);
    m.a.tick().await.unwrap();
    m.advance(30);
    m.a.tick().await.unwrap();
    assert!(entry(&m.a, NAME).is_some());
    m.advance(31);
    m.a.tick().await.unwrap();
    assert!(entry(&m.a, NAME).is_none());
}

#[tokio::test]
async fn reconnect_to_another_replica_takes_ownership_and_the_old_replicas_late_disconnect_is_a_no_op(
) {
    let m = mesh().await;
    m.a.register(&vm_identity(), req("10.0.0.5")).await.unwrap();
    m.tick_both().await;
    m.advance(3);
    // The VM's connection moves to replica b.
    m.settle().await;
    m.b.heartbeat(&vm_identity(), &entry_ref(NAME))
        .await
        .unwrap();
    m.settle().await;
    assert_eq!(
        controller_of(&entry(&m.a, NAME).unwrap()),
        Some("replica-b")
    );
    for _ in 0..4 {
        m.advance(5);
        m.b.heartbeat(&vm_identity(), &entry_ref(NAME))
            .await
            .unwrap();
        m.tick_both().await;
    }
    // a's connection went quiet long ago; its disconnect must not touch b's entry.
    m.settle().await;
    let e = entry(&m.a, NAME).unwrap();
    assert_eq!(controller_of(&e), Some("replica-b"));
    assert!(disconnected_at(&e).is_none(), "{e:?}");
    assert_eq!(m.a.connection_count(), 0);
    assert_eq!(m.b.connection_count(), 1);
}

#[tokio::test]
async fn entries_of_a_replica_whose_lease_expired_are_cleaned_by_another() {
    let m = mesh().await;
    m.a.register(&vm_identity(), req("10.0.0.5")).await.unwrap();
    m.tick_both().await;
    // Replica a dies: it ticks no more and its lease runs out after 15 s.
    m.advance(10);
    m.b.tick().await.unwrap();
    m.settle().await;
    assert!(
        disconnected_at(&entry(&m.b, NAME).unwrap()).is_none(),
        "a's lease is still alive"
    );
    m.advance(6);
    m.b.tick().await.unwrap();
    m.settle().await;
    assert!(
        disconnected_at(&entry(&m.b, NAME).unwrap()).is_some(),
        "stale entry marked disconnected"
    );
    m.advance(11);
    m.b.tick().await.unwrap();
    m.settle().await;
    assert!(
        entry(&m.b, NAME).is_none(),
        "and deleted after the grace period"
    );
}

#[tokio::test]
async fn health_is_ordered_by_sequence_across_replicas_and_an_entry_with_a_probe_is_unhealthy_until_a_healthy_report(
) {
    let m = mesh().await;
    let r = m.a.register(&vm_identity(), req("10.0.0.5")).await.unwrap();
    assert_eq!(r.registration, m.clock.now());
    assert!(!is_healthy(&entry(&m.a, NAME).unwrap()));
    let report = |healthy, sequence: u64| HealthRequest {
        namespace: "vm-namespace".into(),
        name: NAME.into(),
        healthy,
        message: if healthy {
            String::new()
        } else {
            "connection refused".into()
        },
        registration: Some(r.registration),
        sequence: Some(sequence),
        probe_time: String::new(),
    };
    assert!(
        m.a.health(&vm_identity(), &report(true, 10))
            .await
            .unwrap()
            .applied
    );
    assert!(is_healthy(&entry(&m.a, NAME).unwrap()));
    assert!(
        !m.a.health(&vm_identity(), &report(false, 9))
            .await
            .unwrap()
            .applied
    );
    assert!(is_healthy(&entry(&m.a, NAME).unwrap()));
    // Another replica records a newer failure; the entry follows it.
    m.settle().await;
    m.advance(1);
    assert!(
        m.b.health(&vm_identity(), &report(false, 11))
            .await
            .unwrap()
            .applied
    );
    m.settle().await;
    let e = entry(&m.a, NAME).unwrap();
    assert!(!is_healthy(&e));
    let c = e
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Healthy")
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.message.as_str()),
        ("False", "connection refused")
    );
    assert_eq!(c.last_probe_time, format_rfc3339_nanos(m.clock.now()));
    // Health survives a reconnect.
    m.a.register(&vm_identity(), req("10.0.0.5")).await.unwrap();
    assert!(!is_healthy(&entry(&m.a, NAME).unwrap()));
}

#[tokio::test]
async fn group_deletion_deletes_its_entries_and_recreation_reregisters_live_vms_at_once() {
    let m = mesh().await;
    m.a.register(&vm_identity(), req("10.0.0.5")).await.unwrap();
    m.a.register(&vm_identity(), req("10.0.0.6")).await.unwrap();
    m.a.delete(&ObjectKey::new(
        Kind::WorkloadGroup,
        "vm-namespace",
        "python-http",
    ))
    .await
    .unwrap();
    assert!(entry(&m.a, NAME).is_none());
    assert!(entry(&m.a, "python-http-10.0.0.6").is_none());
    // Heartbeats while the group is gone keep the VM known but cannot re-create it.
    m.advance(5);
    let r = m.a.heartbeat(&vm_identity(), &entry_ref(NAME)).await;
    assert!(matches!(r, Err(RegistryError::NotFound(_))), "{r:?}");
    let docs = parse_documents("istio-vm.yaml", &istio_vm_yaml()).unwrap();
    m.a.apply(decode_all(&docs, "default").unwrap())
        .await
        .unwrap();
    assert!(entry(&m.a, NAME).is_some(), "re-registered at once");
    assert!(entry(&m.a, "python-http-10.0.0.6").is_some());
}

#[tokio::test]
async fn identity_must_match_the_group() {
    let m = mesh().await;
    let wrong_sa = Identity {
        service_account: "default".into(),
        ..vm_identity()
    };
    assert!(matches!(
        m.a.register(&wrong_sa, req("10.0.0.5")).await,
        Err(RegistryError::Forbidden(_))
    ));
    let wrong_ns = Identity {
        namespace: "other".into(),
        ..vm_identity()
    };
    assert!(matches!(
        m.a.register(&wrong_ns, req("10.0.0.5")).await,
        Err(RegistryError::Forbidden(_))
    ));
    m.a.register(&vm_identity(), req("10.0.0.5")).await.unwrap();
    assert!(matches!(
        m.a.heartbeat(&wrong_sa, &entry_ref(NAME)).await,
        Err(RegistryError::Forbidden(_))
    ));
    assert!(matches!(
        m.a.deregister(&wrong_ns, &entry_ref(NAME)).await,
        Err(RegistryError::Forbidden(_))
    ));
    assert!(entry(&m.a, NAME).is_some(), "a refusal changes nothing");
}
