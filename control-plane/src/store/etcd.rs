//! The store on etcd (v3 API), for control planes that must not depend on one machine.
//!
//! Every key lives under a prefix (`--etcd-prefix`, default `/vmesh/`), so one etcd can hold
//! several control planes and other users' data. The trait maps onto etcd one to one:
//!
//! - a record's revision is etcd's `mod_revision`, a commit's revision the revision of its
//!   etcd transaction; `Precondition`s become compares on `version` (absent: 0, present: > 0)
//!   and `mod_revision`;
//! - the watch is one etcd watch on the prefix, started at open and resumed after the last
//!   revision it delivered whenever its stream breaks. A commit is acknowledged only once the
//!   watch has delivered it, as the embedded store publishes before it acknowledges, so a
//!   caller that commits and then waits for its cache sees its own write;
//! - a liveness lease `holder` is an etcd lease with the key `<prefix>lease/<holder>` attached:
//!   etcd removes the key when the lease runs out, so every replica sees the same leases and a
//!   dead replica's lease ends without anyone's help. Lease keys are no part of the data: the
//!   watch and `list` leave them out.
//!
//! Every etcd error (unreachable, no leader, timeout) is [`StoreError::Unavailable`]; a failed
//! compare is [`StoreError::Conflict`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;

use super::redb::CommitObserver;
use super::{Change, Event, Op, Precondition, Record, Revision, Store, StoreError, Txn};
use crate::clock::{nanos, Clock};

pub const DEFAULT_PREFIX: &str = "/vmesh/";
/// Where liveness leases live, below the prefix; data keys start with `obj/` or `meta/`.
const LEASE_DIR: &str = "lease/";
/// How long one etcd request may take before the store reports itself unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a commit waits for its own change to come back through the watch. Past it the
/// commit is acknowledged anyway: it is in etcd, and the watch catches up when it reconnects.
const WATCH_WAIT: Duration = Duration::from_secs(10);
/// Records per range request when listing (a listing of many VMs stays far below gRPC's
/// message size limit).
const PAGE: i64 = 500;
/// etcd refuses transactions with more operations than `--max-txn-ops` (128 by default).
pub const MAX_TXN_OPS: usize = 128;

/// Where the etcd cluster is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port` of each member.
    pub endpoints: Vec<String>,
    /// Prepended to every key; ends with `/`.
    pub prefix: String,
    /// CA that signed the members' certificates (`--cacert`, as etcdctl).
    pub cacert: Option<PathBuf>,
    /// Client certificate and key, for members that require client certificates.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd's own authentication (a user with a role granting the prefix).
    pub user: Option<Credentials>,
}

/// An etcd user and password; the password never shows in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub name: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl std::str::FromStr for Credentials {
    type Err = EtcdConfigError;

    /// `NAME:PASSWORD`, as etcdctl's `--user`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((name, password)) if !name.is_empty() => Ok(Credentials {
                name: name.to_string(),
                password: password.to_string(),
            }),
            _ => Err(EtcdConfigError::BadUser),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdConfigError {
    #[error("no etcd endpoint given")]
    NoEndpoints,
    #[error("etcd endpoint {0:?}: expected http://host:port or https://host:port")]
    BadEndpoint(String),
    #[error("etcd target {0:?}: expected etcd://host:port[,host:port...]")]
    BadTarget(String),
    #[error("--etcd-prefix must not be empty")]
    EmptyPrefix,
    #[error("--etcd-cert and --etcd-key go together")]
    HalfIdentity,
    #[error("--etcd-user: expected NAME:PASSWORD")]
    BadUser,
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

impl EtcdConfig {
    /// Checks what can be checked without etcd: endpoints are URLs, the prefix ends with `/`
    /// (so `/vmesh` and `/vmesh2` never overlap), cert and key come as a pair.
    pub fn new(
        endpoints: Vec<String>,
        prefix: &str,
        cacert: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Self, EtcdConfigError> {
        if endpoints.is_empty() {
            return Err(EtcdConfigError::NoEndpoints);
        }
        for e in &endpoints {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .ok_or_else(|| EtcdConfigError::BadEndpoint(e.clone()))?;
            if rest.is_empty() || rest.contains('/') && !rest.ends_with('/') {
                return Err(EtcdConfigError::BadEndpoint(e.clone()));
            }
        }
        if prefix.is_empty() {
            return Err(EtcdConfigError::EmptyPrefix);
        }
        if cert.is_some() != key.is_some() {
            return Err(EtcdConfigError::HalfIdentity);
        }
        let prefix = if prefix.ends_with('/') {
            prefix.to_string()
        } else {
            format!("{prefix}/")
        };
        Ok(EtcdConfig {
            endpoints,
            prefix,
            cacert,
            cert,
            key,
            user: None,
        })
    }

    /// Authenticates as `user` (etcd with auth enabled).
    pub fn with_user(mut self, user: Credentials) -> Self {
        self.user = Some(user);
        self
    }

    /// `etcd://host:port[,host:port]` (as `migrate --to` takes it): each member over https when
    /// TLS files are given, plain http otherwise.
    pub fn endpoints_from_target(target: &str, tls: bool) -> Result<Vec<String>, EtcdConfigError> {
        let hosts = target
            .strip_prefix("etcd://")
            .ok_or_else(|| EtcdConfigError::BadTarget(target.to_string()))?
            .trim_end_matches('/');
        let scheme = if tls { "https" } else { "http" };
        let out: Vec<String> = hosts
            .split(',')
            .map(|h| format!("{scheme}://{h}"))
            .collect();
        if hosts.is_empty() || hosts.split(',').any(|h| h.is_empty() || h.contains('/')) {
            return Err(EtcdConfigError::BadTarget(target.to_string()));
        }
        Ok(out)
    }

    fn tls(&self) -> Result<Option<TlsOptions>, EtcdConfigError> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| EtcdConfigError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        if self.cacert.is_none() && self.cert.is_none() {
            return Ok(None);
        }
        let mut t = TlsOptions::new();
        if let Some(ca) = &self.cacert {
            t = t.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(c), Some(k)) = (&self.cert, &self.key) {
            t = t.identity(Identity::from_pem(read(c)?, read(k)?));
        }
        Ok(Some(t))
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}"))
}

/// Runs one etcd request with the store's deadline.
async fn call<T>(
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(unavailable),
        Err(_) => Err(unavailable(format!(
            "no answer within {}s",
            REQUEST_TIMEOUT.as_secs()
        ))),
    }
}

/// The end of the key range that starts with `prefix` (etcd's `GetPrefixRangeEnd`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): every key from the prefix on.
    vec![0]
}

/// etcd applies a transaction's operations to the state before it and refuses two on one
/// key; the trait applies them one after the other. The last operation on a key decides its
/// outcome, so only that one is kept (in its place).
fn last_op_per_key(ops: Vec<Op>) -> Vec<Op> {
    let key = |op: &Op| match op {
        Op::Put { key, .. } | Op::Delete { key } => key.clone(),
    };
    let mut last: HashMap<String, usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        last.insert(key(op), i);
    }
    ops.into_iter()
        .enumerate()
        .filter(|(i, op)| last.get(&key(op)) == Some(i))
        .map(|(_, op)| op)
        .collect()
}

/// The revision as etcd's signed type (revisions never come near `i64::MAX`).
fn signed(rev: Revision) -> i64 {
    i64::try_from(rev).unwrap_or(i64::MAX)
}

fn unsigned(rev: i64) -> Revision {
    Revision::try_from(rev).unwrap_or(0)
}

#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    prefix: String,
    events: broadcast::Sender<Change>,
    /// The last revision the watch has delivered.
    seen: watch::Sender<Revision>,
    /// The leases this process holds: holder -> (lease id, granted TTL in seconds).
    held: tokio::sync::Mutex<HashMap<String, (i64, i64)>>,
    /// Counts lease keys that went away (expired or revoked), as the watch saw them.
    leases_gone: watch::Sender<u64>,
    follower: Mutex<Option<AbortHandle>>,
    clock: Arc<dyn Clock>,
    observer: Option<CommitObserver>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = self
            .follower
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
    }
}

/// What the watch follower knows: the keys that exist under the prefix (to tell watchers
/// which ones went away if etcd compacted the history it would have resumed from).
struct Follower {
    client: Client,
    prefix: String,
    events: broadcast::Sender<Change>,
    seen: watch::Sender<Revision>,
    leases_gone: watch::Sender<u64>,
    keys: BTreeSet<String>,
}

impl EtcdStore {
    /// Connects and reads the current revision; fails `Unavailable` when no member answers.
    pub async fn open(
        cfg: &EtcdConfig,
        clock: Arc<dyn Clock>,
        observer: Option<CommitObserver>,
    ) -> Result<Self, StoreError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            // A member that goes silent breaks the watch stream within seconds, so the
            // follower reconnects (to another member when there are several).
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some(t) = cfg.tls().map_err(unavailable)? {
            opts = opts.with_tls(t);
        }
        if let Some(u) = &cfg.user {
            // etcd's auth tokens expire (5 minutes by default); a long-running server
            // re-authenticates instead of failing from then on.
            opts = opts
                .with_user(u.name.clone(), u.password.clone())
                .with_auto_token_refresh(true);
        }
        let mut client = call(Client::connect(&cfg.endpoints, Some(opts))).await?;
        let prefix = cfg.prefix.clone();
        let (keys, rev) = data_keys(&mut client, &prefix).await?;
        let (events, _) = broadcast::channel(4096);
        let (seen, _) = watch::channel(rev);
        let (leases_gone, _) = watch::channel(0);
        let follower = Follower {
            client: client.clone(),
            prefix: prefix.clone(),
            events: events.clone(),
            seen: seen.clone(),
            leases_gone: leases_gone.clone(),
            keys,
        };
        let task = tokio::spawn(follower.run());
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                client,
                prefix,
                events,
                seen,
                held: tokio::sync::Mutex::new(HashMap::new()),
                leases_gone,
                follower: Mutex::new(Some(task.abort_handle())),
                clock,
                observer,
            }),
        })
    }

    /// Stops following etcd (at shutdown). Leases are released by their holders before.
    pub async fn close(&self) {
        if let Some(t) = self
            .inner
            .follower
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
    }

    /// Whether nothing at all (data or leases) is stored under the prefix.
    pub async fn is_empty(&self) -> Result<bool, StoreError> {
        let p = self.inner.prefix.as_bytes();
        let r = call(
            self.client().get(
                p,
                Some(
                    GetOptions::new()
                        .with_range(prefix_end(p))
                        .with_count_only(),
                ),
            ),
        )
        .await?;
        Ok(r.count() == 0)
    }

    /// Deletes everything under the prefix (`migrate --force`).
    pub async fn clear(&self) -> Result<(), StoreError> {
        let p = self.inner.prefix.as_bytes();
        call(self.client().delete(
            p,
            Some(etcd_client::DeleteOptions::new().with_range(prefix_end(p))),
        ))
        .await
        .map(drop)
    }

    fn client(&self) -> Client {
        self.inner.client.clone()
    }

    /// Changes whenever a liveness lease ends (etcd deleting the key of an expired lease, or
    /// a replica revoking its own): the survivors act on a dead replica when etcd says it is
    /// dead, not at their next periodic look.
    pub fn leases_gone(&self) -> watch::Receiver<u64> {
        self.inner.leases_gone.subscribe()
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.inner.prefix)
    }

    fn lease_key(&self, holder: &str) -> String {
        format!("{}{LEASE_DIR}{holder}", self.inner.prefix)
    }

    /// Waits until the watch has delivered `rev` (or [`WATCH_WAIT`] passed).
    async fn delivered(&self, rev: Revision) {
        let mut rx = self.inner.seen.subscribe();
        let wait = rx.wait_for(|r| *r >= rev);
        if tokio::time::timeout(WATCH_WAIT, wait).await.is_err() {
            tracing::warn!(
                revision = rev,
                "etcd watch has not delivered a commit yet; acknowledging it anyway"
            );
        }
    }

    async fn grant(&self, key: &str, ttl: i64) -> Result<i64, StoreError> {
        let mut c = self.client();
        let id = call(c.lease_grant(ttl, None)).await?.id();
        call(c.put(key, ttl.to_string(), Some(PutOptions::new().with_lease(id)))).await?;
        Ok(id)
    }

    /// Renews lease `id`; false when etcd no longer has it.
    async fn renew(&self, id: i64) -> Result<bool, StoreError> {
        let mut c = self.client();
        let (mut keeper, mut stream) = call(c.lease_keep_alive(id)).await?;
        call(keeper.keep_alive()).await?;
        let r = call(stream.message()).await?;
        Ok(r.is_some_and(|r| r.ttl() > 0))
    }
}

/// The data keys under `prefix` (without it) and the revision they were read at.
async fn data_keys(
    client: &mut Client,
    prefix: &str,
) -> Result<(BTreeSet<String>, Revision), StoreError> {
    let (records, rev) = range(client, prefix, "", true).await?;
    Ok((records.into_iter().map(|r| r.key).collect(), rev))
}

/// Every data record whose key starts with `prefix` + `under`, paged, all pages read at the
/// revision of the first.
async fn range(
    client: &mut Client,
    prefix: &str,
    under: &str,
    keys_only: bool,
) -> Result<(Vec<Record>, Revision), StoreError> {
    let start = format!("{prefix}{under}");
    let end = prefix_end(start.as_bytes());
    let lease_dir = format!("{prefix}{LEASE_DIR}");
    let mut from = start.into_bytes();
    let mut at = 0i64;
    let mut out = Vec::new();
    loop {
        let mut o = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if keys_only {
            o = o.with_keys_only();
        }
        if at > 0 {
            o = o.with_revision(at);
        }
        let r = call(client.get(from.clone(), Some(o))).await?;
        if at == 0 {
            at = r.header().map_or(0, |h| h.revision());
        }
        for kv in r.kvs() {
            let Some(key) = own_key(kv.key(), prefix, &lease_dir) else {
                continue;
            };
            out.push(Record {
                key,
                value: kv.value().to_vec(),
                mod_revision: unsigned(kv.mod_revision()),
            });
        }
        match r.kvs().last() {
            Some(last) if r.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((out, unsigned(at))),
        }
    }
}

/// The store key of an etcd key: the prefix removed; `None` for lease keys and keys that are
/// not UTF-8 (nothing vmesh writes).
fn own_key(raw: &[u8], prefix: &str, lease_dir: &str) -> Option<String> {
    let s = std::str::from_utf8(raw).ok()?;
    if s.starts_with(lease_dir) {
        return None;
    }
    s.strip_prefix(prefix).map(str::to_string)
}

impl Follower {
    /// Follows the prefix from the revision after the last delivered one, reconnecting with a
    /// backoff whenever the stream breaks.
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.follow().await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "etcd watch broken; resuming");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn follow(&mut self) -> Result<(), StoreError> {
        let from = signed(*self.seen.borrow()) + 1;
        let mut stream = call(
            self.client.watch(
                self.prefix.as_bytes(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(from)
                        .with_progress_notify(),
                ),
            ),
        )
        .await?;
        let lease_dir = format!("{}{LEASE_DIR}", self.prefix);
        while let Some(resp) = stream.message().await.map_err(unavailable)? {
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    tracing::warn!(
                        from,
                        compacted = resp.compact_revision(),
                        "etcd compacted the history the watch resumes from; re-reading the store"
                    );
                    self.resync().await?;
                    return Ok(());
                }
                return Err(unavailable(format!(
                    "watch cancelled: {}",
                    resp.cancel_reason()
                )));
            }
            // Events come in revision order; one transaction's never span two responses.
            let mut change: Option<Change> = None;
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let rev = unsigned(kv.mod_revision());
                if change.as_ref().is_some_and(|c| c.revision != rev) {
                    if let Some(c) = change.take() {
                        self.publish(c);
                    }
                }
                let c = change.get_or_insert_with(|| Change {
                    revision: rev,
                    events: Vec::new(),
                });
                // A revision that only touched leases still advances the watchers, which
                // wait for revisions they were told about (a commit's, a listing's).
                let Some(key) = own_key(kv.key(), &self.prefix, &lease_dir) else {
                    if ev.event_type() == EventType::Delete {
                        self.leases_gone.send_modify(|n| *n += 1);
                    }
                    continue;
                };
                c.events.push(match ev.event_type() {
                    EventType::Put => Event::Put(Record {
                        key,
                        value: kv.value().to_vec(),
                        mod_revision: rev,
                    }),
                    EventType::Delete => Event::Delete { key },
                });
            }
            if let Some(c) = change {
                self.publish(c);
            }
        }
        Err(unavailable("watch stream ended"))
    }

    fn publish(&mut self, c: Change) {
        for e in &c.events {
            match e {
                Event::Put(r) => {
                    self.keys.insert(r.key.clone());
                }
                Event::Delete { key } => {
                    self.keys.remove(key);
                }
            }
        }
        let rev = c.revision;
        let _ = self.events.send(c);
        self.seen.send_replace(rev);
    }

    /// After a compaction: one change that puts every record and deletes every key that went
    /// away, at the revision the store was read at.
    async fn resync(&mut self) -> Result<(), StoreError> {
        let (records, rev) = range(&mut self.client, &self.prefix, "", false).await?;
        let now: BTreeSet<String> = records.iter().map(|r| r.key.clone()).collect();
        let mut events: Vec<Event> = self
            .keys
            .difference(&now)
            .map(|k| Event::Delete { key: k.clone() })
            .collect();
        events.extend(records.into_iter().map(Event::Put));
        self.publish(Change {
            revision: rev,
            events,
        });
        Ok(())
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Record, StoreError> {
        let r = call(self.client().get(self.full(key), None)).await?;
        let kv = r
            .kvs()
            .first()
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        Ok(Record {
            key: key.to_string(),
            value: kv.value().to_vec(),
            mod_revision: unsigned(kv.mod_revision()),
        })
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<Record>, Revision), StoreError> {
        range(&mut self.client(), &self.inner.prefix, prefix, false).await
    }

    async fn commit(&self, txn: Txn) -> Result<Revision, StoreError> {
        let started = Instant::now();
        let compares: Vec<Compare> = txn
            .checks
            .iter()
            .map(|(k, p)| match p {
                Precondition::Absent => Compare::version(self.full(k), CompareOp::Equal, 0),
                Precondition::Present => Compare::version(self.full(k), CompareOp::Greater, 0),
                Precondition::Revision(r) => {
                    Compare::mod_revision(self.full(k), CompareOp::Equal, signed(*r))
                }
            })
            .collect();
        let ops = last_op_per_key(txn.ops);
        let puts = ops.iter().any(|o| matches!(o, Op::Put { .. }));
        let ops: Vec<TxnOp> = ops
            .into_iter()
            .map(|o| match o {
                Op::Put { key, value } => TxnOp::put(self.full(&key), value, None),
                Op::Delete { key } => TxnOp::delete(self.full(&key), None),
            })
            .collect();
        let r = call(
            self.client()
                .txn(etcd_client::Txn::new().when(compares).and_then(ops)),
        )
        .await?;
        if !r.succeeded() {
            let keys: Vec<&str> = txn.checks.iter().map(|(k, _)| k.as_str()).collect();
            return Err(StoreError::Conflict(format!(
                "a precondition on {} does not hold",
                keys.join(", ")
            )));
        }
        let deleted = r.op_responses().iter().any(|o| match o {
            TxnOpResponse::Delete(d) => d.deleted() > 0,
            _ => false,
        });
        if let Some(o) = &self.inner.observer {
            o(started.elapsed(), 1);
        }
        if !puts && !deleted {
            // Nothing changed, so etcd made no revision of it: the answer is what the watch
            // has delivered (waiting for etcd's current revision could wait for writes
            // outside the prefix that never come through it).
            return Ok(*self.inner.seen.borrow());
        }
        let rev = unsigned(r.header().map_or(0, |h| h.revision()));
        self.delivered(rev).await;
        Ok(rev)
    }

    fn watch(&self) -> broadcast::Receiver<Change> {
        self.inner.events.subscribe()
    }

    async fn keep_alive(&self, holder: &str, ttl: Duration) -> Result<(), StoreError> {
        let secs = i64::try_from(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0))
            .unwrap_or(i64::MAX)
            .max(1);
        let key = self.lease_key(holder);
        let mut held = self.inner.held.lock().await;
        if let Some(&(id, granted)) = held.get(holder) {
            if granted == secs && self.renew(id).await? {
                return Ok(());
            }
        }
        let id = self.grant(&key, secs).await?;
        if let Some((old, _)) = held.insert(holder.to_string(), (id, secs)) {
            // Moved to a new lease; the old one has nothing attached any more.
            let _ = call(self.client().lease_revoke(old)).await;
        }
        Ok(())
    }

    async fn revoke(&self, holder: &str) -> Result<(), StoreError> {
        let key = self.lease_key(holder);
        let id = match self.inner.held.lock().await.remove(holder) {
            Some((id, _)) => Some(id),
            None => call(self.client().get(key.as_str(), None))
                .await?
                .kvs()
                .first()
                .map(|kv| kv.lease())
                .filter(|l| *l != 0),
        };
        if let Some(id) = id {
            // A lease that already ran out is as good as revoked.
            let _ = call(self.client().lease_revoke(id)).await;
        }
        call(self.client().delete(key, None)).await.map(drop)
    }

    async fn leases(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let dir = format!("{}{LEASE_DIR}", self.inner.prefix);
        let r = call(self.client().get(
            dir.as_str(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        ))
        .await?;
        let now = self.inner.clock.now();
        let mut out = BTreeMap::new();
        for kv in r.kvs() {
            let Some(holder) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix(dir.as_str()))
            else {
                continue;
            };
            // etcd deletes the key of an expired lease within a moment; until it does, the
            // lease's own TTL says it is gone.
            let Ok(ttl) = call(self.client().lease_time_to_live(kv.lease(), None)).await else {
                continue;
            };
            // Whole seconds left, rounded down: 0 is a lease in its last second, still held
            // (-1 is etcd's "no such lease").
            if ttl.ttl() >= 0 {
                let left = Duration::from_secs(u64::try_from(ttl.ttl()).unwrap_or(0));
                out.insert(holder.to_string(), now.saturating_add(nanos(left)));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_range_ends_after_the_last_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/vmesh/"), b"/vmesh0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn the_last_operation_on_a_key_decides_it() {
        let put = |k: &str, v: &[u8]| Op::Put {
            key: k.into(),
            value: v.to_vec(),
        };
        let del = |k: &str| Op::Delete { key: k.into() };
        assert_eq!(
            last_op_per_key(vec![
                put("a", b"1"),
                put("b", b"1"),
                del("a"),
                put("b", b"2")
            ]),
            vec![del("a"), put("b", b"2")]
        );
        assert_eq!(
            last_op_per_key(vec![put("b", b"b"), put("c", b"c"), del("a")]),
            vec![put("b", b"b"), put("c", b"c"), del("a")]
        );
    }

    #[test]
    fn lease_keys_and_foreign_keys_are_not_data() {
        assert_eq!(
            own_key(b"/vmesh/obj/a", "/vmesh/", "/vmesh/lease/").as_deref(),
            Some("obj/a")
        );
        assert_eq!(
            own_key(b"/vmesh/lease/r1", "/vmesh/", "/vmesh/lease/"),
            None
        );
        assert_eq!(own_key(b"/vmesh/\xff", "/vmesh/", "/vmesh/lease/"), None);
    }

    #[test]
    fn config_is_checked_before_connecting() {
        let ok =
            EtcdConfig::new(vec!["http://127.0.0.1:2379".into()], "/x", None, None, None).unwrap();
        assert_eq!(ok.prefix, "/x/");
        for bad in ["127.0.0.1:2379", "http://", "unix:///tmp/sock"] {
            assert!(matches!(
                EtcdConfig::new(vec![bad.into()], "/x/", None, None, None),
                Err(EtcdConfigError::BadEndpoint(_))
            ));
        }
        assert!(matches!(
            EtcdConfig::new(vec![], "/x/", None, None, None),
            Err(EtcdConfigError::NoEndpoints)
        ));
        assert!(matches!(
            EtcdConfig::new(
                vec!["https://e:2379".into()],
                "/x/",
                None,
                Some("c.pem".into()),
                None
            ),
            Err(EtcdConfigError::HalfIdentity)
        ));
        assert!(matches!(
            EtcdConfig::new(vec!["http://e:2379".into()], "", None, None, None),
            Err(EtcdConfigError::EmptyPrefix)
        ));
    }

    #[test]
    fn users_are_name_colon_password_and_the_password_is_not_shown() {
        let u: Credentials = "vmesh:s3cr:et".parse().unwrap();
        assert_eq!((u.name.as_str(), u.password.as_str()), ("vmesh", "s3cr:et"));
        assert!(!format!("{u:?}").contains("s3cr"));
        assert!("vmesh".parse::<Credentials>().is_err());
        assert!(":pw".parse::<Credentials>().is_err());
    }

    #[test]
    fn migrate_targets_name_members_by_host_and_port() {
        assert_eq!(
            EtcdConfig::endpoints_from_target("etcd://10.0.0.1:2379,10.0.0.2:2379", false).unwrap(),
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(
            EtcdConfig::endpoints_from_target("etcd://e:2379", true).unwrap(),
            ["https://e:2379"]
        );
        for bad in [
            "http://e:2379",
            "etcd://",
            "etcd://a:1,,b:2",
            "etcd://a:1/x",
        ] {
            assert!(
                EtcdConfig::endpoints_from_target(bad, false).is_err(),
                "{bad}"
            );
        }
    }
}
