//! Name tables per client (namespace, network, locality) and their long-poll.
//!
//! A background task rebuilds [`MeshNames`] after store changes (coalescing bursts for a few
//! milliseconds), allocates VIPs, persists the VIP table and writes each ServiceEntry's
//! `status.addresses` (as Istio's IP auto-allocation controller does), then re-cuts the table
//! of every namespace a client has asked for. Long-polls wait on one generation counter and compare
//! their namespace's version, so a change wakes every waiter once and only those whose table
//! changed answer.
//!
//! A table also carries the client's own network and locality (its data plane routes with
//! them), so the cache is keyed by all three: there are few distinct networks and localities
//! in a mesh, and each key costs one serialization per change, not one per request. Keys
//! beyond [`MAX_CACHED_TABLES`] (clients making up localities) are cut per request instead of
//! growing the cache.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use vmesh_api::names::Gateway;
use vmesh_istio::model::{ObjectKey, Resource, Service, ServiceEntry, Status, WorkloadEntry};
use vmesh_istio::names::{hosts_needing_vips, status_addresses, Client, Mesh, MeshNames};
use vmesh_istio::vip::allocate;

use crate::cache::Cache;
use crate::metrics::Metrics;
use crate::store::{object_key, Precondition, Revision, Store, Txn, VIPS_KEY};

/// One namespace's table, serialized once and shared by every response.
#[derive(Debug)]
pub struct Served {
    pub version: String,
    pub body: Bytes,
}

/// Most (namespace, network, locality) tables kept and re-cut on every change.
pub const MAX_CACHED_TABLES: usize = 1024;

/// Whom a table is for; see [`Client`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TableKey {
    pub namespace: String,
    pub network: String,
    pub locality: String,
}

impl TableKey {
    pub fn namespace(ns: &str) -> TableKey {
        TableKey {
            namespace: ns.to_string(),
            ..TableKey::default()
        }
    }

    fn client(&self) -> Client<'_> {
        Client {
            namespace: &self.namespace,
            network: &self.network,
            locality: &self.locality,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    mesh: Arc<MeshNames>,
    per_ns: HashMap<TableKey, Arc<Served>>,
}

#[derive(Debug)]
pub struct NameTables {
    inner: RwLock<Inner>,
    generation: watch::Sender<u64>,
    /// Set at shutdown: waiting long-polls answer at once and new ones do not wait.
    closed: AtomicBool,
    metrics: Arc<Metrics>,
    domain: String,
    trust_domain: String,
    gateways: BTreeMap<String, Vec<Gateway>>,
}

fn serve(mesh: &MeshNames, key: &TableKey) -> Arc<Served> {
    let t = mesh.table_for_client(&key.client());
    Arc::new(Served {
        body: Bytes::from(t.to_json()),
        version: t.version,
    })
}

struct PollGuard<'a>(&'a Metrics);

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        self.0.open_long_polls.fetch_sub(1, Ordering::Relaxed);
    }
}

impl NameTables {
    /// Tables for a mesh with this cluster domain, SPIFFE trust domain (endpoint
    /// identities) and per-network east-west gateways (meshNetworks).
    pub fn new(
        metrics: Arc<Metrics>,
        domain: &str,
        trust_domain: &str,
        gateways: BTreeMap<String, Vec<Gateway>>,
    ) -> Arc<Self> {
        let (generation, _) = watch::channel(0);
        Arc::new(NameTables {
            inner: RwLock::new(Inner::default()),
            generation,
            closed: AtomicBool::new(false),
            metrics,
            domain: domain.to_string(),
            trust_domain: trust_domain.to_string(),
            gateways,
        })
    }

    /// The client's current table.
    pub fn current(&self, key: &TableKey) -> Arc<Served> {
        {
            let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = g.per_ns.get(key) {
                return s.clone();
            }
        }
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let mesh = g.mesh.clone();
        if g.per_ns.len() >= MAX_CACHED_TABLES && !g.per_ns.contains_key(key) {
            drop(g);
            return serve(&mesh, key);
        }
        g.per_ns
            .entry(key.clone())
            .or_insert_with(|| serve(&mesh, key))
            .clone()
    }

    /// Ends every long-poll now (they answer "not modified") and makes later ones answer
    /// without waiting: the server is shutting down and the client should come back (to
    /// this replica once it is up again, or another).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // Wakes every waiter; each sees `closed` after its version check.
        self.generation.send_modify(|n| *n += 1);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The table at once if `known` is not its version; otherwise the next one, or `None`
    /// after `wait` (or at once after [`NameTables::close`]).
    pub async fn poll(
        &self,
        ns: &TableKey,
        known: Option<&str>,
        wait: Duration,
    ) -> Option<Arc<Served>> {
        // Subscribed before `closed` is read, so a `close` in between still wakes this poll.
        let mut rx = self.generation.subscribe();
        let cur = self.current(ns);
        if known != Some(cur.version.as_str()) {
            return Some(cur);
        }
        if self.is_closed() {
            return None;
        }
        self.metrics.open_long_polls.fetch_add(1, Ordering::Relaxed);
        let _guard = PollGuard(&self.metrics);
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    let cur = self.current(ns);
                    if known != Some(cur.version.as_str()) {
                        return Some(cur);
                    }
                    if self.is_closed() {
                        return None;
                    }
                }
                _ = &mut deadline => return None,
            }
        }
    }

    fn publish(&self, mesh: MeshNames) {
        let namespaces: Vec<TableKey> = {
            let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
            g.per_ns.keys().cloned().collect()
        };
        let fresh: HashMap<TableKey, Arc<Served>> = namespaces
            .iter()
            .map(|ns| (ns.clone(), serve(&mesh, ns)))
            .collect();
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let changed = fresh
            .iter()
            .any(|(ns, s)| g.per_ns.get(ns).is_none_or(|old| old.version != s.version));
        g.mesh = Arc::new(mesh);
        g.per_ns = fresh;
        drop(g);
        if changed {
            self.generation.send_modify(|n| *n += 1);
        }
    }
}

/// Rebuilds the tables whenever the cache changes, until `stop` resolves (a rebuild under way
/// finishes first) or the cache goes away.
///
/// The wait before a rebuild is `coalesce`, or four times the recent rebuild duration if that
/// is longer, so a storm of registrations into a large mesh spends at most about a fifth of a
/// core on rebuilding while small meshes see changes within milliseconds.
pub async fn run<S: Store>(
    store: Arc<S>,
    cache: Arc<Cache>,
    tables: Arc<NameTables>,
    coalesce: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut changes = cache.subscribe();
    let mut recent = Duration::ZERO;
    loop {
        let started = std::time::Instant::now();
        rebuild(&*store, &cache, &tables).await;
        recent = started.elapsed().max(recent / 2);
        tokio::select! {
            biased;
            _ = &mut stop => return,
            changed = changes.changed() => if changed.is_err() {
                return;
            },
        }
        tokio::select! {
            biased;
            _ = &mut stop => return,
            _ = tokio::time::sleep(coalesce.max(recent * 4)) => {}
        }
        changes.borrow_and_update();
    }
}

/// One rebuild: VIPs allocated (and persisted, with the ServiceEntries' `status.addresses`,
/// when they change), tables re-cut.
pub async fn rebuild<S: Store>(store: &S, cache: &Cache, tables: &NameTables) {
    // Take references under the lock, build outside it: writers must not wait for a rebuild.
    let (objects, old_vips, vips_revision) = cache.read(|s| {
        let objects: Vec<(Arc<Resource>, Revision)> = s
            .objects
            .values()
            .map(|c| (c.object.clone(), c.revision))
            .collect();
        (objects, s.vips.clone(), s.vips_revision)
    });
    let (mut services, mut ses, mut entries): (
        Vec<&Service>,
        Vec<&ServiceEntry>,
        Vec<&WorkloadEntry>,
    ) = (Vec::new(), Vec::new(), Vec::new());
    let mut se_revisions: Vec<Revision> = Vec::new();
    for (o, rev) in &objects {
        match &**o {
            Resource::Service(o) => services.push(o),
            Resource::ServiceEntry(o) => {
                ses.push(o);
                se_revisions.push(*rev);
            }
            Resource::WorkloadEntry(o) => entries.push(o),
            Resource::WorkloadGroup(_) => {}
        }
    }
    let vips = allocate(&old_vips, &hosts_needing_vips(&ses));
    let mesh = MeshNames::build(&Mesh {
        domain: &tables.domain,
        services: &services,
        service_entries: &ses,
        entries: &entries,
        vips: &vips,
        trust_domain: &tables.trust_domain,
        gateways: &tables.gateways,
    });
    let mut txn = Txn::default();
    if vips != old_vips {
        let check = vips_revision.map_or(Precondition::Absent, Precondition::Revision);
        txn = txn.check(VIPS_KEY.to_string(), check).put(
            VIPS_KEY.to_string(),
            serde_json::to_vec(&vips).unwrap_or_default(),
        );
    }
    for (se, rev) in ses.iter().zip(&se_revisions) {
        let want = status_addresses(se, &vips);
        let have = se
            .status
            .as_ref()
            .map(|s| s.addresses.as_slice())
            .unwrap_or_default();
        if want.as_slice() == have {
            continue;
        }
        let mut updated = (*se).clone();
        let status = updated.status.get_or_insert_with(Status::default);
        status.addresses = want;
        if *status == Status::default() {
            updated.status = None;
        }
        let r = Resource::ServiceEntry(Box::new(updated));
        let key = object_key(&ObjectKey::of(&r));
        txn = txn
            .check(key.clone(), Precondition::Revision(*rev))
            .put(key, serde_json::to_vec(&r).unwrap_or_default());
    }
    if !txn.ops.is_empty() {
        // A lost race means another writer changed the table or an entry; the change wakes
        // the next rebuild, which starts from what was written.
        if let Err(e) = store.commit(txn).await {
            tracing::warn!(error = %e, "VIP table not persisted; will retry on the next change");
        }
    }
    tables.publish(mesh);
}
