//! The store: where config and WorkloadEntries live, behind a trait shaped like etcd's API
//! (revisioned keys, compare-and-swap transactions, a watch stream and TTL leases). The
//! embedded default is [`redb::RedbStore`]; [`etcd::EtcdStore`] keeps the same data in etcd;
//! [`AnyStore`] is whichever one `serve` was told to use.
//!
//! Keys are strings: `obj/<Kind>/<namespace>/<name>` for objects, `meta/...` for vmesh's own
//! bookkeeping (the VIP table). Every committed transaction gets the next revision; an
//! acknowledged commit is durable.

pub mod contract;
pub mod etcd;
pub mod migrate;
pub mod redb;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use tokio::sync::broadcast;
use vmesh_istio::model::{Kind, ObjectKey};

pub type Revision = u64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// One stored value and the revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: Revision,
}

/// What a transaction requires of a key before it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    Absent,
    Present,
    /// Present and last written at this revision.
    Revision(Revision),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// All-or-nothing: every check holds and every op applies, or nothing changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub checks: Vec<(String, Precondition)>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn put(mut self, key: String, value: Vec<u8>) -> Self {
        self.ops.push(Op::Put { key, value });
        self
    }

    pub fn delete(mut self, key: String) -> Self {
        self.ops.push(Op::Delete { key });
        self
    }

    pub fn check(mut self, key: String, p: Precondition) -> Self {
        self.checks.push((key, p));
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Record),
    Delete { key: String },
}

/// The changes of one committed transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub revision: Revision,
    pub events: Vec<Event>,
}

/// A storage backend. Implementations must make a commit durable before acknowledging it and
/// deliver every commit to watchers in revision order.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> impl Future<Output = Result<Record, StoreError>> + Send;
    /// Every record under `prefix`, with the revision the listing reflects.
    fn list(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<(Vec<Record>, Revision), StoreError>> + Send;
    /// Applies `txn` atomically; `Conflict` when a precondition fails.
    fn commit(&self, txn: Txn) -> impl Future<Output = Result<Revision, StoreError>> + Send;
    /// Commits from now on. A receiver that lags gets `RecvError::Lagged` and must re-list.
    fn watch(&self) -> broadcast::Receiver<Change>;
    /// Holds (or renews) the liveness lease `holder` for `ttl`.
    fn keep_alive(
        &self,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Releases the lease at once (a clean shutdown).
    fn revoke(&self, holder: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Holders whose lease has not expired, with their expiry (nanoseconds since the epoch).
    fn leases(&self) -> impl Future<Output = Result<BTreeMap<String, u64>, StoreError>> + Send;
}

/// The store a server runs on, chosen at start.
#[derive(Debug, Clone)]
pub enum AnyStore {
    Redb(redb::RedbStore),
    Etcd(etcd::EtcdStore),
}

impl AnyStore {
    /// Fires when another holder's lease ends (etcd); `None` for the embedded store, which
    /// has one replica and nobody else's lease to watch.
    pub fn leases_gone(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self {
            AnyStore::Redb(_) => None,
            AnyStore::Etcd(s) => Some(s.leases_gone()),
        }
    }

    /// Finishes (embedded) or stops following (etcd); later calls may fail `Unavailable`.
    pub async fn close(&self) {
        match self {
            AnyStore::Redb(s) => s.close().await,
            AnyStore::Etcd(s) => s.close().await,
        }
    }
}

impl Store for AnyStore {
    async fn get(&self, key: &str) -> Result<Record, StoreError> {
        match self {
            AnyStore::Redb(s) => s.get(key).await,
            AnyStore::Etcd(s) => s.get(key).await,
        }
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Record>, Revision), StoreError> {
        match self {
            AnyStore::Redb(s) => s.list(prefix).await,
            AnyStore::Etcd(s) => s.list(prefix).await,
        }
    }

    async fn commit(&self, txn: Txn) -> Result<Revision, StoreError> {
        match self {
            AnyStore::Redb(s) => s.commit(txn).await,
            AnyStore::Etcd(s) => s.commit(txn).await,
        }
    }

    fn watch(&self) -> broadcast::Receiver<Change> {
        match self {
            AnyStore::Redb(s) => s.watch(),
            AnyStore::Etcd(s) => s.watch(),
        }
    }

    async fn keep_alive(&self, holder: &str, ttl: Duration) -> Result<(), StoreError> {
        match self {
            AnyStore::Redb(s) => s.keep_alive(holder, ttl).await,
            AnyStore::Etcd(s) => s.keep_alive(holder, ttl).await,
        }
    }

    async fn revoke(&self, holder: &str) -> Result<(), StoreError> {
        match self {
            AnyStore::Redb(s) => s.revoke(holder).await,
            AnyStore::Etcd(s) => s.revoke(holder).await,
        }
    }

    async fn leases(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        match self {
            AnyStore::Redb(s) => s.leases().await,
            AnyStore::Etcd(s) => s.leases().await,
        }
    }
}

pub const OBJECT_PREFIX: &str = "obj/";
pub const VIPS_KEY: &str = "meta/vips";
/// One key per allocated ClusterIP, valued with its Service's `namespace/name`: two writers
/// cannot both take an address (as Kubernetes' `IPAddress` objects guard its allocator).
pub const CLUSTER_IP_PREFIX: &str = "meta/clusterip/";

pub fn cluster_ip_key(ip: &std::net::IpAddr) -> String {
    format!("{CLUSTER_IP_PREFIX}{ip}")
}

pub fn object_key(k: &ObjectKey) -> String {
    format!("{OBJECT_PREFIX}{}/{}/{}", k.kind, k.namespace, k.name)
}

pub fn kind_prefix(kind: Kind) -> String {
    format!("{OBJECT_PREFIX}{kind}/")
}

/// The object a store key names, if it names one.
pub fn parse_object_key(key: &str) -> Option<ObjectKey> {
    let rest = key.strip_prefix(OBJECT_PREFIX)?;
    let mut it = rest.splitn(3, '/');
    let kind = match it.next()? {
        "WorkloadGroup" => Kind::WorkloadGroup,
        "WorkloadEntry" => Kind::WorkloadEntry,
        "ServiceEntry" => Kind::ServiceEntry,
        "Service" => Kind::Service,
        _ => return None,
    };
    Some(ObjectKey::new(kind, it.next()?, it.next()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_round_trip() {
        let k = ObjectKey::new(Kind::WorkloadEntry, "vm-namespace", "python-http-10.0.0.1");
        assert_eq!(
            object_key(&k),
            "obj/WorkloadEntry/vm-namespace/python-http-10.0.0.1"
        );
        assert_eq!(parse_object_key(&object_key(&k)), Some(k));
        assert_eq!(parse_object_key("meta/vips"), None);
    }
}
