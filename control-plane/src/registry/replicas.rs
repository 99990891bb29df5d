//! The replicas of one control plane, as the store knows them: each announces itself (its
//! address) under [`REPLICA_PREFIX`] and holds a liveness lease named after it; the entries it
//! owns are those whose `istio.io/workloadController` names it. `vmesh-control get replicas`
//! and the per-replica gauges of `/metrics` read this.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use vmesh_api::time::format_rfc3339_nanos;
use vmesh_istio::model::Kind;
use vmesh_istio::workload::{self, controller_of};

use super::{as_entry, Registry, RegistryError};
use crate::metrics::ReplicaGauges;
use crate::store::{Store, Txn};

/// `meta/replica/<replica>`: what a replica says about itself ([`ReplicaRecord`]).
pub const REPLICA_PREFIX: &str = "meta/replica/";

/// A replica's announcement, written when it starts and deleted when it stops cleanly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaRecord {
    /// Where VMs and admins reach it (`host:port`).
    pub address: String,
    /// RFC 3339.
    pub started: String,
}

/// One row of `vmesh-control get replicas` (`GET /v1/admin/replicas`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub replica: String,
    /// Empty when the replica never announced one (an older version, or a record removed).
    pub address: String,
    /// Its lease is held: it is alive as far as the store can tell.
    pub alive: bool,
    /// Connected entries whose `istio.io/workloadController` it is.
    pub entries_owned: u64,
    /// When the answering replica last saw its lease (RFC 3339); empty if never.
    pub last_seen: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaList {
    /// The replica that answered.
    pub answered_by: String,
    pub items: Vec<ReplicaStatus>,
}

impl<S: Store> Registry<S> {
    /// Takes the lease and announces this replica at `address` (at start, before serving).
    pub async fn announce(&self, address: &str) -> Result<(), RegistryError> {
        self.store
            .keep_alive(&self.settings.replica, self.settings.lease_ttl)
            .await?;
        self.lease_held.store(true, Ordering::Relaxed);
        let rec = ReplicaRecord {
            address: address.to_string(),
            started: format_rfc3339_nanos(self.clock.now()),
        };
        let key = format!("{REPLICA_PREFIX}{}", self.settings.replica);
        self.store
            .commit(Txn::default().put(key, serde_json::to_vec(&rec).unwrap_or_default()))
            .await?;
        Ok(())
    }

    /// Deletes this replica's announcement (a clean shutdown; a killed replica's stays until
    /// the survivors have swept its entries).
    pub(super) async fn withdraw(&self) {
        let key = format!("{REPLICA_PREFIX}{}", self.settings.replica);
        if let Err(e) = self.store.commit(Txn::default().delete(key)).await {
            tracing::warn!(error = %e, "replica announcement not withdrawn");
        }
    }

    /// Deletes the announcements of replicas that hold no lease and control no entry any more
    /// (a killed replica, once the survivors have swept its VMs). Compare-and-swap on the
    /// record: a replica that comes back and announces itself again keeps its new one.
    pub(super) async fn forget_gone(&self, leases: &BTreeMap<String, u64>) {
        let Ok((records, _)) = self.store.list(REPLICA_PREFIX).await else {
            return;
        };
        let controllers: BTreeSet<String> = self
            .cache
            .list(Kind::WorkloadEntry, None)
            .iter()
            .filter_map(|c| as_entry(c).and_then(controller_of).map(str::to_string))
            .collect();
        for r in records {
            let Some(name) = r.key.strip_prefix(REPLICA_PREFIX) else {
                continue;
            };
            if leases.contains_key(name) || controllers.contains(name) {
                continue;
            }
            let txn = Txn::default()
                .check(
                    r.key.clone(),
                    crate::store::Precondition::Revision(r.mod_revision),
                )
                .delete(r.key.clone());
            match self.store.commit(txn).await {
                Ok(_) => tracing::info!(
                    replica = name,
                    "replica gone and its entries swept; forgotten"
                ),
                Err(e) => {
                    tracing::debug!(replica = name, error = %e, "replica not forgotten this time")
                }
            }
        }
    }

    /// Connected entries per controlling replica, from the cache.
    fn owned(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for c in self.cache.list(Kind::WorkloadEntry, None) {
            let Some(e) = as_entry(&c) else { continue };
            if workload::disconnected_at(e).is_some() {
                continue;
            }
            if let Some(ctl) = controller_of(e) {
                *out.entry(ctl.to_string()).or_insert(0) += 1;
            }
        }
        out
    }

    /// Remembers when each lease was seen (the tick's and the listing's reads).
    pub(super) fn saw_leases(&self, holders: impl Iterator<Item = String>, now: u64) {
        let mut seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut alive = 0;
        for h in holders {
            seen.insert(h, now);
            alive += 1;
        }
        self.replicas_alive.store(alive, Ordering::Relaxed);
    }

    /// Every replica the store knows of: announced, holding a lease, or named as an entry's
    /// controller.
    pub async fn replicas(&self) -> Result<ReplicaList, RegistryError> {
        let (records, _) = self.store.list(REPLICA_PREFIX).await?;
        let leases = self.store.leases().await?;
        let now = self.clock.now();
        self.saw_leases(leases.keys().cloned(), now);
        let owned = self.owned();
        let mut addresses = BTreeMap::new();
        for r in records {
            let Some(name) = r.key.strip_prefix(REPLICA_PREFIX) else {
                continue;
            };
            let address = serde_json::from_slice::<ReplicaRecord>(&r.value)
                .map(|r| r.address)
                .unwrap_or_default();
            addresses.insert(name.to_string(), address);
        }
        let names: BTreeSet<String> = addresses
            .keys()
            .chain(leases.keys())
            .chain(owned.keys())
            .cloned()
            .collect();
        let seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        let items = names
            .into_iter()
            .map(|name| ReplicaStatus {
                address: addresses.get(&name).cloned().unwrap_or_default(),
                alive: leases.contains_key(&name),
                entries_owned: owned.get(&name).copied().unwrap_or(0),
                last_seen: seen
                    .get(&name)
                    .map(|t| format_rfc3339_nanos(*t))
                    .unwrap_or_default(),
                replica: name,
            })
            .collect();
        Ok(ReplicaList {
            answered_by: self.settings.replica.clone(),
            items,
        })
    }

    /// Gauges for `/metrics`: this replica's own view.
    pub fn replica_gauges(&self) -> ReplicaGauges {
        ReplicaGauges {
            replica: self.settings.replica.clone(),
            entries_owned: self
                .owned()
                .get(&self.settings.replica)
                .copied()
                .unwrap_or(0),
            lease_held: self.lease_held.load(Ordering::Relaxed),
            replicas_alive: self.replicas_alive.load(Ordering::Relaxed),
        }
    }
}
