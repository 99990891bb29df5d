//! `vmesh-control migrate`: a single-replica store copied into etcd.
//!
//! Keys and values are copied as they are; revisions are not: etcd numbers its own, so every
//! copied record gets the revision of the etcd transaction that wrote it. Nothing depends on
//! the old numbers (a server lists its store at start, and compare-and-swap writes use
//! revisions read from the same store). Liveness leases are not copied: each replica takes
//! its own within one sweep of starting.

use super::etcd::{EtcdStore, MAX_TXN_OPS};
use super::redb::RedbStore;
use super::{Precondition, Store, StoreError, Txn};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("the target prefix already holds data; pass --force to replace it")]
    NotEmpty,
    #[error("reading the embedded store: {0}")]
    Source(StoreError),
    #[error("writing to etcd: {0}")]
    Target(StoreError),
}

/// Copies every record of `from` into `to`, which must be empty unless `force` (then its
/// prefix is cleared first). Each key is written only if absent, so a server already
/// writing to the target makes the copy fail instead of being overwritten. Returns the
/// number of keys copied.
pub async fn copy(from: &RedbStore, to: &EtcdStore, force: bool) -> Result<usize, MigrateError> {
    if !to.is_empty().await.map_err(MigrateError::Target)? {
        if !force {
            return Err(MigrateError::NotEmpty);
        }
        to.clear().await.map_err(MigrateError::Target)?;
    }
    let (records, _) = from.list("").await.map_err(MigrateError::Source)?;
    // etcd caps a transaction's operations (and compares) at 128 by default.
    for batch in records.chunks(MAX_TXN_OPS / 2) {
        let txn = batch.iter().fold(Txn::default(), |t, r| {
            t.check(r.key.clone(), Precondition::Absent)
                .put(r.key.clone(), r.value.clone())
        });
        to.commit(txn).await.map_err(MigrateError::Target)?;
    }
    Ok(records.len())
}
