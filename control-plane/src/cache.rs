//! The in-memory view of the store, kept current from its watch (an informer, in Kubernetes
//! terms). Requests read here; writes go to the store and come back through the watch, so
//! every replica's view converges on the store's.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;
use vmesh_istio::model::{Kind, ObjectKey, Resource};
use vmesh_istio::vip::VipTable;

use crate::store::{
    parse_object_key, Change, Event, Record, Revision, Store, StoreError, OBJECT_PREFIX, VIPS_KEY,
};

/// One cached object and the revision that last wrote it (for compare-and-swap writes).
#[derive(Debug, Clone)]
pub struct Cached {
    pub object: Arc<Resource>,
    pub revision: Revision,
}

#[derive(Debug, Default)]
pub struct Snapshot {
    pub objects: BTreeMap<ObjectKey, Cached>,
    pub vips: VipTable,
    pub vips_revision: Option<Revision>,
    pub revision: Revision,
}

#[derive(Debug)]
pub struct Cache {
    state: RwLock<Snapshot>,
    applied: watch::Sender<Revision>,
    /// The task following the store's watch.
    follower: Mutex<Option<AbortHandle>>,
}

impl Cache {
    /// Lists the store, then follows its watch in a background task.
    pub async fn start<S: Store>(store: Arc<S>) -> Result<Arc<Cache>, StoreError> {
        let events = store.watch();
        let snap = load(&*store).await?;
        let (applied, _) = watch::channel(snap.revision);
        let cache = Arc::new(Cache {
            state: RwLock::new(snap),
            applied,
            follower: Mutex::new(None),
        });
        let task = tokio::spawn(follow(store, cache.clone(), events));
        *cache.follower.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
        Ok(cache)
    }

    /// Stops following the store (at shutdown, once the store is closed). What was read stays
    /// readable.
    pub fn stop(&self) {
        if let Some(t) = self
            .follower
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
    }

    pub fn read<T>(&self, f: impl FnOnce(&Snapshot) -> T) -> T {
        let g = self.state.read().unwrap_or_else(|p| p.into_inner());
        f(&g)
    }

    pub fn get(&self, key: &ObjectKey) -> Option<Cached> {
        self.read(|s| s.objects.get(key).cloned())
    }

    /// Objects of `kind` (in `namespace` when given), in key order.
    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> Vec<Cached> {
        self.read(|s| {
            s.objects
                .iter()
                .filter(|(k, _)| k.kind == kind && namespace.is_none_or(|n| k.namespace == n))
                .map(|(_, v)| v.clone())
                .collect()
        })
    }

    pub fn revision(&self) -> Revision {
        *self.applied.borrow()
    }

    /// Fires whenever a change has been applied.
    pub fn subscribe(&self) -> watch::Receiver<Revision> {
        self.applied.subscribe()
    }

    /// Waits until the cache reflects `rev` (read-your-writes after a commit).
    pub async fn wait_for(&self, rev: Revision) {
        let mut rx = self.applied.subscribe();
        let _ = rx.wait_for(|r| *r >= rev).await;
    }

    fn apply(&self, change: &Change) {
        let mut s = self.state.write().unwrap_or_else(|p| p.into_inner());
        if change.revision <= s.revision {
            return;
        }
        for ev in &change.events {
            match ev {
                Event::Put(rec) => put(&mut s, rec),
                Event::Delete { key } => {
                    if let Some(k) = parse_object_key(key) {
                        s.objects.remove(&k);
                    } else if key == VIPS_KEY {
                        s.vips.clear();
                        s.vips_revision = None;
                    }
                }
            }
        }
        s.revision = change.revision;
        drop(s);
        self.applied.send_replace(change.revision);
    }

    fn replace(&self, snap: Snapshot) {
        let rev = snap.revision;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = snap;
        self.applied.send_replace(rev);
    }
}

fn put(s: &mut Snapshot, rec: &Record) {
    if let Some(k) = parse_object_key(&rec.key) {
        match Resource::from_json_kind(k.kind, &rec.value) {
            Ok(r) => {
                s.objects.insert(
                    k,
                    Cached {
                        object: Arc::new(r),
                        revision: rec.mod_revision,
                    },
                );
            }
            Err(e) => {
                tracing::error!(key = %rec.key, error = %e, "undecodable object in store; ignored")
            }
        }
    } else if rec.key == VIPS_KEY {
        match serde_json::from_slice(&rec.value) {
            Ok(v) => {
                s.vips = v;
                s.vips_revision = Some(rec.mod_revision);
            }
            Err(e) => tracing::error!(error = %e, "undecodable VIP table in store; ignored"),
        }
    }
}

async fn load<S: Store>(store: &S) -> Result<Snapshot, StoreError> {
    let (records, revision) = store.list(OBJECT_PREFIX).await?;
    let mut s = Snapshot {
        revision,
        ..Snapshot::default()
    };
    for r in &records {
        put(&mut s, r);
    }
    match store.get(VIPS_KEY).await {
        Ok(r) => put(&mut s, &r),
        Err(StoreError::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    Ok(s)
}

async fn follow<S: Store>(
    store: Arc<S>,
    cache: Arc<Cache>,
    mut events: broadcast::Receiver<Change>,
) {
    loop {
        match events.recv().await {
            Ok(change) => cache.apply(&change),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "cache fell behind the store; re-listing");
                events = store.watch();
                loop {
                    match load(&*store).await {
                        Ok(s) => {
                            cache.replace(s);
                            break;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "re-list failed; retrying");
                            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        }
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
