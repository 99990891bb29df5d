//! The registry: config changes from admins, and the WorkloadEntry lifecycle of VMs.
//!
//! A VM registers (token identity checked against its WorkloadGroup), then keeps its entry
//! alive with heartbeats. This replica remembers each connection in memory, as istiod does a
//! gRPC stream: the entry is written on connect, reconnect and disconnect, never per
//! heartbeat. [`Registry::tick`] (once a second in the server, stepped by hand in tests)
//! renews this replica's liveness lease, disconnects VMs that went quiet, and sweeps entries
//! whose grace period ran out or whose replica is gone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmesh_core::istio::model::{Kind, Labels, ObjectKey, Resource, WorkloadEntry, WorkloadGroup};
use vmesh_core::istio::time::{format_rfc3339_secs, parse_rfc3339};
use vmesh_core::istio::validate::validate_labels;
use vmesh_core::istio::workload::{
    self, apply_health, belongs_to_group, controller_of, entry_from_group,
    expected_service_account, is_auto_registered, probe_with_defaults, HealthOutcome, HealthReport,
    Registration, Sweep, ANNOTATION_AUTO_REGISTRATION_GROUP,
};

use crate::cache::{Cache, Cached};
use crate::clock::{nanos, Clock};
use crate::identity::Identity;
use crate::metrics::{EntryGauges, Metrics};
use crate::random::SystemEntropy;
use crate::store::{object_key, Precondition, Revision, Store, StoreError, Txn};

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
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            replica: "vmesh-control".into(),
            grace: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(5),
            liveness_timeout: Duration::from_secs(15),
            lease_ttl: Duration::from_secs(15),
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
    EntryRef, EntryRequest, HealthRequest, HealthResponse, RegisterRequest, RegisterResponse,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyOutcome {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// `created`, `configured` or `unchanged`, as kubectl says.
    pub action: String,
}

/// One VM connection held by this replica.
#[derive(Debug, Clone)]
struct Conn {
    conn_time: u64,
    last_seen: u64,
    reg: Registration,
    service_account: String,
}

pub struct Registry<S: Store> {
    store: Arc<S>,
    cache: Arc<Cache>,
    clock: Arc<dyn Clock>,
    settings: Settings,
    metrics: Arc<Metrics>,
    conns: Mutex<HashMap<ObjectKey, Conn>>,
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

fn new_uid() -> Result<String, RegistryError> {
    crate::random::uuid_v4(&SystemEntropy::default())
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
            settings,
            metrics,
            conns: Mutex::new(HashMap::new()),
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

    /// Reads the entry (fresh from the store after a lost race), lets `f` change it, and
    /// writes it back if it changed. `f` returning `None` means "leave it".
    async fn update_entry(
        &self,
        key: &ObjectKey,
        mut f: impl FnMut(&mut WorkloadEntry) -> Result<bool, RegistryError>,
    ) -> Result<Option<WorkloadEntry>, RegistryError> {
        let skey = object_key(key);
        let mut fresh = false;
        for _ in 0..CAS_ATTEMPTS {
            let (mut entry, rev) = if fresh {
                let rec = self.store.get(&skey).await?;
                let r = Resource::from_json_kind(Kind::WorkloadEntry, &rec.value)
                    .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
                match r {
                    Resource::WorkloadEntry(e) => (e, rec.mod_revision),
                    _ => return Err(RegistryError::NotFound(key.to_string())),
                }
            } else {
                let c = self.cache.get(key).ok_or_else(|| {
                    RegistryError::NotFound(format!("WorkloadEntry {}/{}", key.namespace, key.name))
                })?;
                let e = as_entry(&c)
                    .cloned()
                    .ok_or_else(|| RegistryError::NotFound(key.to_string()))?;
                (e, c.revision)
            };
            if !f(&mut entry)? {
                return Ok(None);
            }
            let txn = Txn::default()
                .check(skey.clone(), Precondition::Revision(rev))
                .put(
                    skey.clone(),
                    encode(&Resource::WorkloadEntry(entry.clone())),
                );
            match self.commit(txn).await {
                Ok(_) => return Ok(Some(entry)),
                Err(RegistryError::Conflict(_)) => fresh = true,
                Err(RegistryError::NotFound(_)) => fresh = true,
                Err(e) => return Err(e),
            }
        }
        Err(RegistryError::Conflict(format!("{key} kept changing")))
    }

    async fn delete_entry_at(&self, key: &ObjectKey, rev: Revision) -> Result<(), RegistryError> {
        let skey = object_key(key);
        let txn = Txn::default()
            .check(skey.clone(), Precondition::Revision(rev))
            .delete(skey);
        self.commit(txn).await.map(drop)
    }

    /// A VM joins: identity checked against the group, entry created or taken over.
    pub async fn register(
        &self,
        id: &Identity,
        mut req: RegisterRequest,
    ) -> Result<RegisterResponse, RegistryError> {
        let r = self.register_checked(id, &mut req).await;
        self.metrics.registrations.inc(match &r {
            Ok(_) => "ok",
            Err(RegistryError::BadRequest { .. }) => "bad_request",
            Err(RegistryError::Forbidden(_)) => "forbidden",
            Err(RegistryError::NotFound(_)) => "not_found",
            Err(RegistryError::Conflict(_)) => "conflict",
            Err(RegistryError::Unavailable(_)) => "unavailable",
        });
        r
    }

    async fn register_checked(
        &self,
        id: &Identity,
        req: &mut RegisterRequest,
    ) -> Result<RegisterResponse, RegistryError> {
        if req.namespace.is_empty() {
            req.namespace = id.namespace.clone();
        }
        if req.group.is_empty() {
            return Err(bad("group", "Required value"));
        }
        if req.address.parse::<std::net::IpAddr>().is_err() {
            return Err(bad(
                "address",
                format!("Invalid value: {:?}: must be an IP address", req.address),
            ));
        }
        for (field, v) in [("network", &req.network), ("locality", &req.locality)] {
            if v.len() > 253 || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(
                    field,
                    "Invalid value: no whitespace, at most 253 characters",
                ));
            }
        }
        let labels: Labels = req.labels.clone().into_iter().collect();
        if let Some(e) = validate_labels(&labels, "labels").into_iter().next() {
            return Err(bad(&e.path, e.message));
        }
        if id.namespace != req.namespace {
            tracing::warn!(token_namespace = %id.namespace, group_namespace = %req.namespace, group = %req.group,
                reason = "namespace_mismatch", "registration refused");
            return Err(RegistryError::Forbidden(format!(
                "token namespace {:?} does not match the group's namespace {:?}",
                id.namespace, req.namespace
            )));
        }
        let reg = Registration {
            group: req.group.clone(),
            namespace: req.namespace.clone(),
            address: req.address.clone(),
            network: req.network.clone(),
            locality: req.locality.clone(),
            labels,
        };
        self.register_inner(reg, &id.service_account).await
    }

    async fn register_inner(
        &self,
        reg: Registration,
        service_account: &str,
    ) -> Result<RegisterResponse, RegistryError> {
        let group = self.group(&reg.namespace, &reg.group).ok_or_else(|| {
            RegistryError::NotFound(format!("WorkloadGroup {}/{}", reg.namespace, reg.group))
        })?;
        let want = expected_service_account(&group);
        if service_account != want {
            tracing::warn!(namespace = %reg.namespace, group = %reg.group, token_service_account = %service_account,
                expected = %want, reason = "service_account_mismatch", "registration refused");
            return Err(RegistryError::Forbidden(format!(
                "token service account {service_account:?} does not match the group's {want:?}"
            )));
        }
        let now = self.clock.now();
        let fresh = entry_from_group(&group, &reg, &self.settings.replica, now);
        let key = entry_key(&fresh.metadata.namespace, &fresh.metadata.name);
        // Remember the connection first, so a sweep between commit and here cannot see an
        // entry of ours without one.
        let previous = self.conns().insert(
            key.clone(),
            Conn {
                conn_time: now,
                last_seen: now,
                reg: reg.clone(),
                service_account: service_account.to_string(),
            },
        );
        let result = self.write_registration(&key, fresh, &reg.group).await;
        if result.is_err() {
            let mut conns = self.conns();
            match previous {
                Some(p) => conns.insert(key.clone(), p),
                None => conns.remove(&key),
            };
        }
        result?;
        Ok(RegisterResponse {
            workload_entry: EntryRef {
                namespace: key.namespace,
                name: key.name,
            },
            heartbeat_interval_seconds: self.settings.heartbeat_interval.as_secs().max(1),
            liveness_timeout_seconds: self.settings.liveness_timeout.as_secs().max(1),
            probe: group.spec.probe.as_ref().map(probe_with_defaults),
        })
    }

    async fn write_registration(
        &self,
        key: &ObjectKey,
        fresh: WorkloadEntry,
        group: &str,
    ) -> Result<(), RegistryError> {
        let skey = object_key(key);
        let mut fresh_read = false;
        for _ in 0..CAS_ATTEMPTS {
            // The cache first; after a lost race, the store itself.
            let existing = if fresh_read {
                match self.store.get(&skey).await {
                    Ok(rec) => match Resource::from_json_kind(Kind::WorkloadEntry, &rec.value) {
                        Ok(Resource::WorkloadEntry(e)) => Some((e, rec.mod_revision)),
                        _ => return Err(RegistryError::Unavailable(format!("{skey} undecodable"))),
                    },
                    Err(StoreError::NotFound(_)) => None,
                    Err(e) => return Err(e.into()),
                }
            } else {
                self.cache
                    .get(key)
                    .and_then(|c| as_entry(&c).cloned().map(|e| (e, c.revision)))
            };
            fresh_read = true;
            let (entry, check) = match existing {
                None => {
                    let mut e = fresh.clone();
                    e.metadata.uid = new_uid()?;
                    (e, Precondition::Absent)
                }
                Some((old, mod_revision)) => {
                    let same_group = old
                        .metadata
                        .annotations
                        .get(ANNOTATION_AUTO_REGISTRATION_GROUP)
                        .is_some_and(|g| g == group);
                    if !same_group {
                        return Err(RegistryError::Conflict(format!(
                            "WorkloadEntry {}/{} exists and was not auto-registered by this group",
                            key.namespace, key.name
                        )));
                    }
                    // Reconnect: keep identity and health, take the new connection's metadata.
                    let mut e = fresh.clone();
                    e.metadata.uid = old.metadata.uid;
                    e.metadata.creation_timestamp = old.metadata.creation_timestamp;
                    e.status = old.status;
                    (e, Precondition::Revision(mod_revision))
                }
            };
            let txn = Txn::default()
                .check(skey.clone(), check)
                .put(skey.clone(), encode(&Resource::WorkloadEntry(entry)));
            match self.commit(txn).await {
                Ok(_) => return Ok(()),
                Err(RegistryError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(RegistryError::Conflict(format!("{key} kept changing")))
    }

    fn authorize(&self, id: &Identity, key: &ObjectKey) -> Result<Option<Cached>, RegistryError> {
        if id.namespace != key.namespace {
            tracing::warn!(token_namespace = %id.namespace, namespace = %key.namespace, reason = "namespace_mismatch", "request refused");
            return Err(RegistryError::Forbidden(format!(
                "token namespace {:?} does not match {:?}",
                id.namespace, key.namespace
            )));
        }
        let cached = self.cache.get(key);
        let sa = match cached.as_ref().and_then(as_entry) {
            Some(e) if e.spec.service_account.is_empty() => {
                workload::DEFAULT_SERVICE_ACCOUNT.to_string()
            }
            Some(e) => e.spec.service_account.clone(),
            None => match self.conns().get(key) {
                Some(c) => c.service_account.clone(),
                None => return Ok(None),
            },
        };
        if sa != id.service_account {
            tracing::warn!(namespace = %key.namespace, entry = %key.name, token_service_account = %id.service_account,
                expected = %sa, reason = "service_account_mismatch", "request refused");
            return Err(RegistryError::Forbidden(format!(
                "token service account {:?} does not own {}/{}",
                id.service_account, key.namespace, key.name
            )));
        }
        Ok(cached)
    }

    /// A liveness report. Cheap when this replica already holds the connection; otherwise
    /// a reconnect (taking the entry over from another replica if need be).
    pub async fn heartbeat(&self, id: &Identity, req: &EntryRequest) -> Result<(), RegistryError> {
        self.metrics
            .heartbeats
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = entry_key(&req.namespace, &req.name);
        let cached = self.authorize(id, &key)?;
        let now = self.clock.now();
        let Some(cached) = cached else {
            // Entry gone (group deleted, or swept). If we know the VM, register it again.
            let conn = self.conns().get(&key).cloned();
            return match conn {
                Some(c) => {
                    if let Some(c) = self.conns().get_mut(&key) {
                        c.last_seen = now;
                    }
                    self.register_inner(c.reg, &c.service_account)
                        .await
                        .map(drop)
                }
                None => Err(RegistryError::NotFound(format!(
                    "WorkloadEntry {}/{}: register again",
                    key.namespace, key.name
                ))),
            };
        };
        let entry = as_entry(&cached).ok_or_else(|| RegistryError::NotFound(key.to_string()))?;
        {
            let mut conns = self.conns();
            if let Some(c) = conns.get_mut(&key) {
                if workload::owned_by(entry, &self.settings.replica, c.conn_time) {
                    c.last_seen = now;
                    return Ok(());
                }
            }
        }
        if !is_auto_registered(entry) {
            return Err(RegistryError::Conflict(format!(
                "{}/{} is not auto-registered",
                key.namespace, key.name
            )));
        }
        // Reconnect or takeover. The connection is recorded before the write, as in
        // `register_inner`, so a sweep in between cannot find our entry without one.
        let reg = match self.conns().get(&key) {
            Some(c) => c.reg.clone(),
            // Taken over from another replica: what the entry says about the VM. Its labels
            // already include the group's, which only matters if the group is re-created.
            None => Registration {
                group: entry
                    .metadata
                    .annotations
                    .get(ANNOTATION_AUTO_REGISTRATION_GROUP)
                    .cloned()
                    .unwrap_or_default(),
                namespace: entry.metadata.namespace.clone(),
                address: entry.spec.address.clone(),
                network: entry.spec.network.clone(),
                locality: entry.spec.locality.clone(),
                labels: entry.spec.labels.clone(),
            },
        };
        let conn = Conn {
            conn_time: now,
            last_seen: now,
            reg,
            service_account: id.service_account.clone(),
        };
        let previous = self.conns().insert(key.clone(), conn);
        let replica = self.settings.replica.clone();
        let result = self
            .update_entry(&key, |e| {
                workload::connect(e, &replica, now);
                Ok(true)
            })
            .await;
        if result.is_err() {
            let mut conns = self.conns();
            match previous {
                Some(p) => conns.insert(key, p),
                None => conns.remove(&key),
            };
        }
        result.map(drop)
    }

    pub async fn health(
        &self,
        id: &Identity,
        req: &HealthRequest,
    ) -> Result<HealthResponse, RegistryError> {
        let key = entry_key(&req.namespace, &req.name);
        let probe_time = parse_rfc3339(&req.probe_time).ok_or_else(|| {
            bad(
                "probeTime",
                format!("Invalid value: {:?}: must be RFC 3339", req.probe_time),
            )
        })?;
        if req.message.len() > 1024 {
            return Err(bad("message", "Too long: at most 1024 bytes"));
        }
        if self.authorize(id, &key)?.is_none() {
            return Err(RegistryError::NotFound(format!(
                "WorkloadEntry {}/{}",
                key.namespace, key.name
            )));
        }
        let report = HealthReport {
            healthy: req.healthy,
            message: req.message.clone(),
            probe_time,
        };
        let updated = self
            .update_entry(&key, |e| {
                Ok(apply_health(e, &report) == HealthOutcome::Applied)
            })
            .await?;
        let applied = updated.is_some();
        self.metrics
            .health_reports
            .inc(if applied { "applied" } else { "stale" });
        if let Some(c) = self.conns().get_mut(&key) {
            c.last_seen = c.last_seen.max(self.clock.now());
        }
        Ok(HealthResponse { applied })
    }

    /// A clean shutdown of the VM: its auto-registered entry goes at once.
    pub async fn deregister(&self, id: &Identity, req: &EntryRequest) -> Result<(), RegistryError> {
        let key = entry_key(&req.namespace, &req.name);
        let cached = self.authorize(id, &key)?;
        self.conns().remove(&key);
        let Some(c) = cached else {
            return Err(RegistryError::NotFound(format!(
                "WorkloadEntry {}/{}",
                key.namespace, key.name
            )));
        };
        if !as_entry(&c).is_some_and(is_auto_registered) {
            return Err(RegistryError::Conflict(format!(
                "{}/{} is not auto-registered",
                key.namespace, key.name
            )));
        }
        match self.delete_entry_at(&key, c.revision).await {
            Err(RegistryError::Conflict(_)) => match self.store.get(&object_key(&key)).await {
                Ok(rec) => self.delete_entry_at(&key, rec.mod_revision).await,
                Err(StoreError::NotFound(_)) => Ok(()),
                Err(e) => Err(e.into()),
            },
            r => r,
        }
    }

    /// Periodic work: lease, liveness timeouts, sweep, re-registration into re-created groups.
    pub async fn tick(&self) -> Result<(), RegistryError> {
        let now = self.clock.now();
        self.store
            .keep_alive(&self.settings.replica, self.settings.lease_ttl)
            .await?;
        let leases = self.store.leases().await?;

        // VMs that went quiet.
        let timeout = nanos(self.settings.liveness_timeout);
        let mut quiet = Vec::new();
        self.conns().retain(|k, c| {
            let keep = now.saturating_sub(c.last_seen) <= timeout;
            if !keep {
                quiet.push((k.clone(), c.conn_time));
            }
            keep
        });
        for (key, conn_time) in quiet {
            let replica = self.settings.replica.clone();
            match self
                .update_entry(&key, |e| {
                    Ok(workload::disconnect(e, &replica, conn_time, now))
                })
                .await
            {
                Ok(Some(_)) => {
                    tracing::debug!(entry = %key.name, namespace = %key.namespace, "VM disconnected")
                }
                Ok(None) | Err(RegistryError::NotFound(_)) => {}
                Err(e) => tracing::warn!(entry = %key.name, error = %e, "disconnect not recorded"),
            }
        }

        // Sweep entries.
        let grace = nanos(self.settings.grace);
        let groups: BTreeSet<(String, String)> = self
            .cache
            .list(Kind::WorkloadGroup, None)
            .iter()
            .map(|c| {
                (
                    c.object.meta().namespace.clone(),
                    c.object.meta().name.clone(),
                )
            })
            .collect();
        let entries = self.cache.list(Kind::WorkloadEntry, None);
        for c in entries {
            let Some(e) = as_entry(&c) else { continue };
            if !is_auto_registered(e) {
                continue;
            }
            let key = entry_key(&e.metadata.namespace, &e.metadata.name);
            let group = e
                .metadata
                .annotations
                .get(ANNOTATION_AUTO_REGISTRATION_GROUP)
                .cloned()
                .unwrap_or_default();
            let orphan = !groups.contains(&(e.metadata.namespace.clone(), group));
            let alive = |ctl: &str| {
                if ctl == self.settings.replica {
                    self.conns().contains_key(&key)
                } else {
                    leases.contains_key(ctl)
                }
            };
            let decision = if orphan {
                Sweep::Delete
            } else {
                workload::sweep(e, now, grace, alive)
            };
            let r = match decision {
                Sweep::Keep { .. } => Ok(()),
                Sweep::Delete => self.delete_entry_at(&key, c.revision).await,
                Sweep::MarkDisconnected => {
                    tracing::info!(entry = %key.name, namespace = %key.namespace,
                        controller = controller_of(e).unwrap_or_default(), "entry's replica is gone; marking disconnected");
                    let mut e = e.clone();
                    workload::mark_stale(&mut e, now);
                    let skey = object_key(&key);
                    self.commit(
                        Txn::default()
                            .check(skey.clone(), Precondition::Revision(c.revision))
                            .put(skey, encode(&Resource::WorkloadEntry(e))),
                    )
                    .await
                    .map(drop)
                }
            };
            match r {
                // A reconnect won the race: fine, the entry is alive again.
                Ok(()) | Err(RegistryError::Conflict(_)) => {}
                Err(e) => tracing::warn!(entry = %key.name, error = %e, "sweep write failed"),
            }
        }

        // Live VMs whose entry is gone while their group exists again.
        let missing: Vec<(String, String)> = {
            let conns = self.conns();
            conns
                .iter()
                .filter(|(k, c)| {
                    self.cache.get(k).is_none()
                        && groups.contains(&(c.reg.namespace.clone(), c.reg.group.clone()))
                })
                .map(|(_, c)| (c.reg.namespace.clone(), c.reg.group.clone()))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        for (ns, g) in missing {
            self.reregister_group(&ns, &g).await;
        }
        Ok(())
    }

    /// Re-creates entries of this replica's live connections into a (re-)created group.
    pub async fn reregister_group(&self, namespace: &str, group: &str) {
        let conns: Vec<(ObjectKey, Conn)> = self
            .conns()
            .iter()
            .filter(|(_, c)| c.reg.namespace == namespace && c.reg.group == group)
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        for (key, c) in conns {
            if self.cache.get(&key).is_some() {
                continue;
            }
            match self.register_inner(c.reg.clone(), &c.service_account).await {
                Ok(_) => {
                    tracing::info!(entry = %key.name, namespace, "re-registered into re-created group")
                }
                Err(e) => {
                    tracing::warn!(entry = %key.name, namespace, error = %e, "re-registration failed")
                }
            }
        }
    }

    /// Stops holding the liveness lease (clean shutdown).
    pub async fn shutdown(&self) {
        if let Err(e) = self.store.revoke(&self.settings.replica).await {
            tracing::warn!(error = %e, "lease not revoked");
        }
    }

    /// Applies objects atomically, keeping uid, creation time and (for entries) status.
    pub async fn apply(
        &self,
        resources: Vec<Resource>,
    ) -> Result<Vec<ApplyOutcome>, RegistryError> {
        // Document order for the report (as kubectl prints it); a later duplicate wins.
        let mut order: Vec<ObjectKey> = Vec::new();
        let mut by_key: BTreeMap<ObjectKey, Resource> = BTreeMap::new();
        for r in resources {
            let key = ObjectKey::of(&r);
            if by_key.insert(key.clone(), r).is_none() {
                order.push(key);
            }
        }
        for _ in 0..CAS_ATTEMPTS {
            let now = self.clock.now();
            let mut txn = Txn::default();
            let mut outcomes = Vec::new();
            let mut groups = Vec::new();
            for key in &order {
                let Some(r) = by_key.get(key) else { continue };
                let mut r = r.clone();
                let existing = self.cache.get(key);
                let skey = object_key(key);
                let meta = r.meta_mut();
                meta.resource_version.clear();
                let action = match &existing {
                    Some(old) => {
                        let om = old.object.meta();
                        meta.uid = om.uid.clone();
                        meta.creation_timestamp = om.creation_timestamp.clone();
                        meta.generation = om.generation;
                        if let (Resource::WorkloadEntry(new), Resource::WorkloadEntry(o)) =
                            (&mut r, &*old.object)
                        {
                            if new.status.is_none() {
                                new.status = o.status.clone();
                            }
                        }
                        if r == *old.object {
                            "unchanged"
                        } else {
                            r.meta_mut().generation = old.object.meta().generation + 1;
                            "configured"
                        }
                    }
                    None => {
                        meta.uid = new_uid()?;
                        meta.creation_timestamp = format_rfc3339_secs(now);
                        meta.generation = 1;
                        "created"
                    }
                };
                outcomes.push(ApplyOutcome {
                    kind: key.kind,
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    action: action.to_string(),
                });
                if action == "unchanged" {
                    continue;
                }
                if key.kind == Kind::WorkloadGroup {
                    groups.push((key.namespace.clone(), key.name.clone()));
                }
                txn = txn
                    .check(
                        skey.clone(),
                        match &existing {
                            Some(old) => Precondition::Revision(old.revision),
                            None => Precondition::Absent,
                        },
                    )
                    .put(skey, encode(&r));
            }
            if txn.ops.is_empty() {
                return Ok(outcomes);
            }
            match self.commit(txn).await {
                Ok(_) => {
                    for (ns, g) in groups {
                        self.reregister_group(&ns, &g).await;
                    }
                    return Ok(outcomes);
                }
                Err(RegistryError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(RegistryError::Conflict(
            "objects kept changing during apply".into(),
        ))
    }

    /// Deletes an object; deleting a WorkloadGroup deletes its entries in the same commit.
    pub async fn delete(&self, key: &ObjectKey) -> Result<(), RegistryError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some(c) = self.cache.get(key) else {
                return Err(RegistryError::NotFound(format!(
                    "{} {}/{}",
                    key.kind, key.namespace, key.name
                )));
            };
            let skey = object_key(key);
            let mut txn = Txn::default()
                .check(skey.clone(), Precondition::Revision(c.revision))
                .delete(skey);
            if key.kind == Kind::WorkloadGroup {
                for e in self.cache.list(Kind::WorkloadEntry, Some(&key.namespace)) {
                    if as_entry(&e).is_some_and(|we| {
                        is_auto_registered(we) && belongs_to_group(we, &key.namespace, &key.name)
                    }) {
                        txn = txn.delete(object_key(&ObjectKey::of(&e.object)));
                    }
                }
            }
            match self.commit(txn).await {
                Ok(_) => return Ok(()),
                Err(RegistryError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(RegistryError::Conflict(format!("{key} kept changing")))
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
