//! The embedded store: one redb file in the data dir.
//!
//! Writes go through a single writer thread that takes every transaction waiting in its queue,
//! applies them in order inside one redb write transaction (each still all-or-nothing against
//! the state the earlier ones left), commits with fsync, and only then answers them and
//! publishes their changes. That group commit is what lets many registrations share one
//! fsync while every acknowledged write is on disk.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, oneshot};

use super::{Change, Event, Op, Precondition, Record, Revision, Store, StoreError, Txn};
use crate::clock::{nanos, Clock};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LEASES: TableDefinition<&str, u64> = TableDefinition::new("leases");
const REVISION: &str = "revision";
/// Transactions taken into one commit at most.
const MAX_BATCH: usize = 1024;
/// redb's own page cache. Reads are served from the control plane's cache, so this only
/// speeds up the B-tree walks of writes; pages it does not hold come from the OS page cache,
/// which does not count against the process.
const CACHE_BYTES: usize = 4 << 20;

type Reply = oneshot::Sender<Result<Revision, StoreError>>;

enum Work {
    Txn(Txn, Reply),
    Lease(String, Option<u64>, Reply),
    Close(Reply),
}

/// The open database; `None` once closed, so the file lock is released even while clones of
/// the store are still around.
type Shared = Arc<std::sync::RwLock<Option<Arc<Database>>>>;

/// Observes commit latency (for metrics) without the store knowing about metrics.
pub type CommitObserver = Arc<dyn Fn(Duration, usize) + Send + Sync>;

#[derive(Clone)]
pub struct RedbStore {
    db: Shared,
    queue: mpsc::Sender<Work>,
    events: broadcast::Sender<Change>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) `path`. Fails if another process has it open.
    pub fn open(
        path: &Path,
        clock: Arc<dyn Clock>,
        observer: Option<CommitObserver>,
    ) -> Result<Self, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(unavailable)?;
        {
            let w = db.begin_write().map_err(unavailable)?;
            w.open_table(KV).map_err(unavailable)?;
            w.open_table(META).map_err(unavailable)?;
            w.open_table(LEASES).map_err(unavailable)?;
            w.commit().map_err(unavailable)?;
        }
        let db: Shared = Arc::new(std::sync::RwLock::new(Some(Arc::new(db))));
        let (queue, rx) = mpsc::channel();
        let (events, _) = broadcast::channel(4096);
        let writer = Writer {
            db: db.clone(),
            events: events.clone(),
            observer,
        };
        std::thread::Builder::new()
            .name("vmesh-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(unavailable)?;
        Ok(RedbStore {
            db,
            queue,
            events,
            clock,
        })
    }

    async fn submit(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<Revision, StoreError>>) -> Work,
    ) -> Result<Revision, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send(make(tx))
            .map_err(|_| unavailable("writer stopped"))?;
        rx.await.map_err(|_| unavailable("writer stopped"))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = open_db(&self.db)?;
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(unavailable)?
    }

    /// Finishes queued writes, then closes the database file. Later calls fail `Unavailable`.
    pub async fn close(&self) {
        let _ = self.submit(Work::Close).await;
    }
}

fn open_db(db: &Shared) -> Result<Arc<Database>, StoreError> {
    db.read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| unavailable("store closed"))
}

fn split(stored: &[u8]) -> (Revision, Vec<u8>) {
    let (head, body) = stored.split_at(stored.len().min(8));
    let mut rev = [0u8; 8];
    rev[..head.len()].copy_from_slice(head);
    (u64::from_le_bytes(rev), body.to_vec())
}

fn join(rev: Revision, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + value.len());
    v.extend_from_slice(&rev.to_le_bytes());
    v.extend_from_slice(value);
    v
}

impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Record, StoreError> {
        let key = key.to_string();
        self.read(move |db| {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(KV).map_err(unavailable)?;
            let v = t.get(key.as_str()).map_err(unavailable)?;
            let Some(v) = v else {
                return Err(StoreError::NotFound(key));
            };
            let (mod_revision, value) = split(v.value());
            Ok(Record {
                key,
                value,
                mod_revision,
            })
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Record>, Revision), StoreError> {
        let prefix = prefix.to_string();
        self.read(move |db| {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(KV).map_err(unavailable)?;
            let rev = r
                .open_table(META)
                .map_err(unavailable)?
                .get(REVISION)
                .map_err(unavailable)?
                .map(|g| g.value())
                .unwrap_or(0);
            let mut out = Vec::new();
            for item in t.range(prefix.as_str()..).map_err(unavailable)? {
                let (k, v) = item.map_err(unavailable)?;
                if !k.value().starts_with(prefix.as_str()) {
                    break;
                }
                let (mod_revision, value) = split(v.value());
                out.push(Record {
                    key: k.value().to_string(),
                    value,
                    mod_revision,
                });
            }
            Ok((out, rev))
        })
        .await
    }

    async fn commit(&self, txn: Txn) -> Result<Revision, StoreError> {
        self.submit(|tx| Work::Txn(txn, tx)).await
    }

    fn watch(&self) -> broadcast::Receiver<Change> {
        self.events.subscribe()
    }

    async fn keep_alive(&self, holder: &str, ttl: Duration) -> Result<(), StoreError> {
        let expiry = self.clock.now().saturating_add(nanos(ttl));
        self.submit(|tx| Work::Lease(holder.to_string(), Some(expiry), tx))
            .await
            .map(drop)
    }

    async fn revoke(&self, holder: &str) -> Result<(), StoreError> {
        self.submit(|tx| Work::Lease(holder.to_string(), None, tx))
            .await
            .map(drop)
    }

    async fn leases(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let now = self.clock.now();
        self.read(move |db| {
            let r = db.begin_read().map_err(unavailable)?;
            let t = r.open_table(LEASES).map_err(unavailable)?;
            let mut out = BTreeMap::new();
            for item in t.iter().map_err(unavailable)? {
                let (k, v) = item.map_err(unavailable)?;
                if v.value() > now {
                    out.insert(k.value().to_string(), v.value());
                }
            }
            Ok(out)
        })
        .await
    }
}

struct Writer {
    db: Shared,
    events: broadcast::Sender<Change>,
    observer: Option<CommitObserver>,
}

impl Writer {
    fn run(self, rx: mpsc::Receiver<Work>) {
        while let Ok(first) = rx.recv() {
            // Everything queued before a `Close` is committed; nothing after it is taken.
            let mut batch = Vec::new();
            let mut close = None;
            match first {
                Work::Close(tx) => close = Some(tx),
                w => batch.push(w),
            }
            while close.is_none() && batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Work::Close(tx)) => close = Some(tx),
                    Ok(w) => batch.push(w),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                let started = Instant::now();
                let n = batch.len();
                match self.apply(batch) {
                    Ok((replies, changes)) => {
                        if let Some(o) = &self.observer {
                            o(started.elapsed(), n);
                        }
                        // Durable now: publish, then acknowledge.
                        for c in changes {
                            let _ = self.events.send(c);
                        }
                        for (tx, r) in replies {
                            let _ = tx.send(r);
                        }
                    }
                    Err((replies, e)) => {
                        tracing::error!(error = %e, "store commit failed");
                        for tx in replies {
                            let _ = tx.send(Err(e.clone()));
                        }
                    }
                }
            }
            if let Some(tx) = close {
                *self.db.write().unwrap_or_else(|p| p.into_inner()) = None;
                let _ = tx.send(Ok(0));
                return;
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn apply(
        &self,
        batch: Vec<Work>,
    ) -> Result<(Vec<(Reply, Result<Revision, StoreError>)>, Vec<Change>), (Vec<Reply>, StoreError)>
    {
        let mut replies = Vec::with_capacity(batch.len());
        let mut changes = Vec::new();
        let mut pending: Vec<Reply> = Vec::new();
        let result = (|| -> Result<(), StoreError> {
            let w = open_db(&self.db)?.begin_write().map_err(unavailable)?;
            {
                let mut kv = w.open_table(KV).map_err(unavailable)?;
                let mut meta = w.open_table(META).map_err(unavailable)?;
                let mut leases = w.open_table(LEASES).map_err(unavailable)?;
                let mut rev = meta
                    .get(REVISION)
                    .map_err(unavailable)?
                    .map(|g| g.value())
                    .unwrap_or(0);
                for work in batch {
                    match work {
                        Work::Lease(holder, expiry, tx) => {
                            match expiry {
                                Some(e) => leases.insert(holder.as_str(), e).map(drop),
                                None => leases.remove(holder.as_str()).map(drop),
                            }
                            .map_err(unavailable)?;
                            replies.push((tx, Ok(rev)));
                        }
                        Work::Close(tx) => replies.push((tx, Ok(rev))),
                        Work::Txn(txn, tx) => {
                            if let Err(e) = check(&kv, &txn) {
                                replies.push((tx, Err(e)));
                                continue;
                            }
                            rev += 1;
                            let mut events = Vec::with_capacity(txn.ops.len());
                            for op in txn.ops {
                                match op {
                                    Op::Put { key, value } => {
                                        kv.insert(key.as_str(), join(rev, &value).as_slice())
                                            .map_err(unavailable)?;
                                        events.push(Event::Put(Record {
                                            key,
                                            value,
                                            mod_revision: rev,
                                        }));
                                    }
                                    Op::Delete { key } => {
                                        if kv.remove(key.as_str()).map_err(unavailable)?.is_some() {
                                            events.push(Event::Delete { key });
                                        }
                                    }
                                }
                            }
                            changes.push(Change {
                                revision: rev,
                                events,
                            });
                            replies.push((tx, Ok(rev)));
                        }
                    }
                }
                meta.insert(REVISION, rev).map_err(unavailable)?;
            }
            w.commit().map_err(unavailable)
        })();
        match result {
            Ok(()) => Ok((replies, changes)),
            Err(e) => {
                pending.extend(replies.into_iter().map(|(tx, _)| tx));
                Err((pending, e))
            }
        }
    }
}

fn check(kv: &redb::Table<&str, &[u8]>, txn: &Txn) -> Result<(), StoreError> {
    for (key, want) in &txn.checks {
        let cur = kv
            .get(key.as_str())
            .map_err(unavailable)?
            .map(|g| split(g.value()).0);
        let ok = match (want, cur) {
            (Precondition::Absent, None) => true,
            (Precondition::Present, Some(_)) => true,
            (Precondition::Revision(r), Some(c)) => *r == c,
            _ => false,
        };
        if !ok {
            return Err(StoreError::Conflict(match cur {
                None => format!("{key} does not exist"),
                Some(c) => format!("{key} is at revision {c}"),
            }));
        }
    }
    Ok(())
}
