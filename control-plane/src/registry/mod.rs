//! The registry: config changes from admins, and the WorkloadEntry lifecycle of VMs.
//!
//! A VM registers (token identity checked against its WorkloadGroup), then keeps its entry
//! alive with heartbeats. This replica remembers each connection in memory, as istiod does a
//! gRPC stream: the entry is written on connect, reconnect and disconnect, never per
//! heartbeat. [`Registry::tick`] (once a second in the server, stepped by hand in tests)
//! renews this replica's liveness lease, disconnects VMs that went quiet, and sweeps entries
//! whose grace period ran out or whose replica is gone.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmesh_istio::cluster_ip::ServiceCidr;
use vmesh_istio::model::{Kind, ObjectKey, Resource, WorkloadEntry, WorkloadGroup};
use vmesh_istio::workload::{self, is_auto_registered, Registration};

use crate::cache::{Cache, Cached};
use crate::clock::Clock;
use crate::metrics::{EntryGauges, Metrics};
use crate::quota::{QuotaRefusal, QuotaSettings, RateLimiter};
use crate::store::{object_key, Precondition, Revision, Store, StoreError, Txn};

mod admin;
mod lifecycle;
pub mod replicas;
mod sweep;

/// How many times a compare-and-swap write is retried after losing a race.
const CAS_ATTEMPTS: usize = 8;

#[derive(Debug, Clone)]
pub struct Settings {
    /// This replica's name (`istio.io/workloadController`).
    pub replica: String,
    /// How long a disconnected auto-registered entry is kept.
    pub grace: Duration,
    /// How often VMs are told to send heartbeats.
    pub heartbeat_interval: Duration,
    /// Silence after which a VM counts as disconnected.
    pub liveness_timeout: Duration,
    /// TTL of this replica's liveness lease.
    pub lease_ttl: Duration,
    /// Where Services without a `clusterIP` get one from.
    pub service_cidr: ServiceCidr,
    /// Per-identity caps on registration.
    pub quota: QuotaSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            replica: "vmesh-control".into(),
            grace: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(5),
            liveness_timeout: Duration::from_secs(15),
            lease_ttl: Duration::from_secs(15),
            service_cidr: ServiceCidr::default(),
            quota: QuotaSettings::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("{field}: {message}")]
    BadRequest { field: String, message: String },
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Over a per-identity quota: the same call may go through after `retry_after`.
    #[error("too many requests: {message}")]
    TooManyRequests {
        reason: QuotaRefusal,
        message: String,
        retry_after: Duration,
    },
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(s) => RegistryError::NotFound(s),
            StoreError::Conflict(s) => RegistryError::Conflict(s),
            StoreError::Unavailable(s) => RegistryError::Unavailable(s),
        }
    }
}

fn bad(field: &str, message: impl Into<String>) -> RegistryError {
    RegistryError::BadRequest {
        field: field.to_string(),
        message: message.into(),
    }
}

pub use vmesh_api::control::{
    EntryRef, EntryRequest, HealthRequest, HealthResponse, HeartbeatResponse, RegisterRequest,
    RegisterResponse,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyOutcome {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub action: ApplyAction,
}

/// What `apply` did to one object, as kubectl says it (`created`, `configured`, `unchanged`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyAction {
    Created,
    Configured,
    Unchanged,
}

impl ApplyAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyAction::Created => "created",
            ApplyAction::Configured => "configured",
            ApplyAction::Unchanged => "unchanged",
        }
    }
}

impl std::fmt::Display for ApplyAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One try of a compare-and-swap write, as [`Registry::with_cas`] runs it.
enum Attempt<T> {
    /// Nothing to write: `T` is the result.
    Done(T),
    /// Commit this transaction; once it is committed, `T` is the result.
    Commit(Txn, T),
}

/// One VM connection held by this replica.
#[derive(Debug, Clone)]
struct Conn {
    conn_time: u64,
    last_seen: u64,
    /// What the VM registered with; `None` for a manual entry the VM connected to, which is
    /// never re-created.
    reg: Option<Registration>,
    service_account: String,
    /// The registration number handed to the VM (see `workload::HealthOrder`).
    registration: u64,
}

pub struct Registry<S: Store> {
    store: Arc<S>,
    cache: Arc<Cache>,
    clock: Arc<dyn Clock>,
    settings: Settings,
    metrics: Arc<Metrics>,
    conns: Mutex<HashMap<ObjectKey, Conn>>,
    /// The registration rate per identity.
    limiter: RateLimiter,
    /// Whether the last renewal of this replica's lease went through.
    lease_held: std::sync::atomic::AtomicBool,
    /// Leases seen at the last look.
    replicas_alive: std::sync::atomic::AtomicU64,
    /// When this replica last saw each replica's lease (nanoseconds).
    last_seen: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl<S: Store> std::fmt::Debug for Registry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn entry_key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(Kind::WorkloadEntry, ns, name)
}

fn encode(r: &Resource) -> Vec<u8> {
    serde_json::to_vec(r).unwrap_or_default()
}

fn as_entry(c: &Cached) -> Option<&WorkloadEntry> {
    match &*c.object {
        Resource::WorkloadEntry(e) => Some(e),
        _ => None,
    }
}

/// A random (version 4) UUID, as Kubernetes gives every object; a failing random source is an
/// error (the request answers 503), never an all-zero uid.
fn new_uid() -> Result<String, RegistryError> {
    crate::random::uuid_v4(&crate::random::SystemEntropy::default())
        .map_err(|e| RegistryError::Unavailable(e.to_string()))
}

impl<S: Store> Registry<S> {
    pub fn new(
        store: Arc<S>,
        cache: Arc<Cache>,
        clock: Arc<dyn Clock>,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Registry {
            store,
            cache,
            clock,
            limiter: RateLimiter::new(&settings.quota),
            settings,
            metrics,
            conns: Mutex::new(HashMap::new()),
            lease_held: Default::default(),
            replicas_alive: Default::default(),
            last_seen: Default::default(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, Conn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `entry` under `key` if the stored object is still at `revision` (a sweep's
    /// decision was made on that version; a newer one is judged again next tick).
    async fn put_entry_at(
        &self,
        key: &ObjectKey,
        revision: Revision,
        entry: WorkloadEntry,
    ) -> Result<(), RegistryError> {
        let skey = object_key(key);
        self.commit(
            Txn::default()
                .check(skey.clone(), Precondition::Revision(revision))
                .put(skey, encode(&Resource::WorkloadEntry(entry))),
        )
        .await
        .map(drop)
    }

    async fn commit(&self, txn: Txn) -> Result<Revision, RegistryError> {
        let rev = self.store.commit(txn).await?;
        self.cache.wait_for(rev).await;
        Ok(rev)
    }

    fn group(&self, ns: &str, name: &str) -> Option<WorkloadGroup> {
        let c = self
            .cache
            .get(&ObjectKey::new(Kind::WorkloadGroup, ns, name))?;
        match &*c.object {
            Resource::WorkloadGroup(g) => Some((**g).clone()),
            _ => None,
        }
    }

    /// The one compare-and-swap loop: runs `attempt` (given the number of races lost so far,
    /// so that a retry reads the store rather than the cache) and commits what it asks for,
    /// until a commit goes through, `attempt` has nothing to write or fails, or
    /// [`CAS_ATTEMPTS`] tries have lost their race: then `Conflict` with `exhausted()`.
    ///
    /// `attempt` is a plain closure returning a named future type rather than an async
    /// closure: the future of an `AsyncFnMut` borrows the closure, and the compiler cannot
    /// then prove the handler futures `Send` for every lifetime, which `tokio::spawn` needs.
    /// Callers give the closure references (or owned copies), never state it must lend out.
    async fn with_cas<T, F, Fut>(
        &self,
        exhausted: impl FnOnce() -> String,
        mut attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = Result<Attempt<T>, RegistryError>>,
    {
        for lost in 0..CAS_ATTEMPTS {
            match attempt(lost).await? {
                Attempt::Done(v) => return Ok(v),
                Attempt::Commit(txn, v) => match self.commit(txn).await {
                    Ok(_) => return Ok(v),
                    Err(RegistryError::Conflict(_)) => continue,
                    Err(e) => return Err(e),
                },
            }
        }
        Err(RegistryError::Conflict(exhausted()))
    }

    /// Reads the entry (fresh from the store after a lost race), lets `f` change it, and
    /// writes it back if it changed. `f` returning `false` means "leave it" (`Ok(None)`).
    async fn update_entry(
        &self,
        key: &ObjectKey,
        f: impl Fn(&mut WorkloadEntry) -> Result<bool, RegistryError>,
    ) -> Result<Option<WorkloadEntry>, RegistryError> {
        let skey = &object_key(key);
        let f = &f;
        self.with_cas(
            || format!("{key} kept changing"),
            move |lost| async move {
                let (mut entry, rev) = if lost > 0 {
                    let rec = self.store.get(skey).await?;
                    let r = Resource::from_json_kind(Kind::WorkloadEntry, &rec.value)
                        .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
                    match r {
                        Resource::WorkloadEntry(e) => (e, rec.mod_revision),
                        _ => return Err(RegistryError::NotFound(key.to_string())),
                    }
                } else {
                    let c = self.cache.get(key).ok_or_else(|| {
                        RegistryError::NotFound(format!(
                            "WorkloadEntry {}/{}",
                            key.namespace, key.name
                        ))
                    })?;
                    let e = as_entry(&c)
                        .cloned()
                        .ok_or_else(|| RegistryError::NotFound(key.to_string()))?;
                    (e, c.revision)
                };
                if !f(&mut entry)? {
                    return Ok(Attempt::Done(None));
                }
                let txn = Txn::default()
                    .check(skey.clone(), Precondition::Revision(rev))
                    .put(
                        skey.clone(),
                        encode(&Resource::WorkloadEntry(entry.clone())),
                    );
                Ok(Attempt::Commit(txn, Some(entry)))
            },
        )
        .await
    }

    async fn delete_entry_at(&self, key: &ObjectKey, rev: Revision) -> Result<(), RegistryError> {
        let skey = object_key(key);
        let txn = Txn::default()
            .check(skey.clone(), Precondition::Revision(rev))
            .delete(skey);
        self.commit(txn).await.map(drop)
    }

    /// Stops holding the liveness lease (clean shutdown).
    pub async fn shutdown(&self) {
        self.withdraw().await;
        if let Err(e) = self.store.revoke(&self.settings.replica).await {
            tracing::warn!(error = %e, "lease not revoked");
        }
    }

    /// Gauges for `/metrics`, from the cache.
    pub fn gauges(&self) -> EntryGauges {
        let mut g = EntryGauges::default();
        for c in self.cache.list(Kind::WorkloadEntry, None) {
            let Some(e) = as_entry(&c) else { continue };
            if !is_auto_registered(e) {
                g.manual += 1;
            } else if workload::disconnected_at(e).is_some() {
                g.disconnected += 1;
            } else {
                g.connected += 1;
            }
            if workload::is_healthy(e) {
                g.healthy += 1;
            } else {
                g.unhealthy += 1;
            }
        }
        g
    }

    /// Connections this replica holds (for tests and metrics).
    pub fn connection_count(&self) -> usize {
        self.conns().len()
    }
}
