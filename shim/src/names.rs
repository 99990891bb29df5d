//! The name table the filter long-polls, from a static JSON file (`--static-names`).
//!
//! The file is validated by core ([`NameIndex::from_json`]) before anything is served, then
//! polled: editors and config tools replace files by rename, so the path is re-read rather than
//! an inode watched. A valid edit is published through a `watch` channel that waiting
//! long-polls wake on; an invalid one is logged with its reason and the previous table stays.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper::header::HeaderValue;
use tokio::sync::watch;
use tokio::time::Instant;
use vmesh_core::names::{NameIndex, TableError};

/// How often the file is checked by default.
pub const DEFAULT_POLL: Duration = Duration::from_millis(250);
/// Long-poll wait when the client does not say.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(vmesh_api::paths::DEFAULT_TABLE_WAIT_SECS);
/// Longest long-poll wait a client can ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(vmesh_api::paths::MAX_TABLE_WAIT_SECS);

/// A table as served: its version and the JSON exactly as it was read (or, when its content
/// changed under an unchanged version, with a derived version written in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub version: String,
    /// The `version` written in the file.
    pub file_version: String,
    pub json: Bytes,
}

impl Table {
    /// The same table under version `<file version>~<content hash>` (`~` needs no escaping
    /// in a query string).
    fn with_content_version(self) -> Result<Table, serde_json::Error> {
        let version = format!(
            "{}~{:012x}",
            self.file_version,
            hash(&self.json) & 0xFFFF_FFFF_FFFF
        );
        let mut doc: serde_json::Value = serde_json::from_slice(&self.json)?;
        if let Some(obj) = doc.as_object_mut() {
            obj.insert("version".into(), serde_json::Value::String(version.clone()));
        }
        Ok(Table {
            version,
            file_version: self.file_version,
            json: serde_json::to_vec(&doc)?.into(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NamesError {
    #[error("cannot read name table {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid name table {path}: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: TableError,
    },
    #[error("invalid name table {path}: version {version:?} cannot be sent as an HTTP header")]
    UnusableVersion { path: PathBuf, version: String },
}

/// What identifies a file's state cheaply; content is hashed only when this changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: Option<SystemTime>,
}

impl Fingerprint {
    pub(crate) fn of(meta: &std::fs::Metadata) -> Self {
        Fingerprint {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: meta.modified().ok(),
        }
    }

    /// Modified so recently that another write within the same timestamp tick could follow
    /// unseen (coarse file system clocks): re-read until it has settled.
    pub(crate) fn is_recent(&self) -> bool {
        const SETTLE: Duration = Duration::from_secs(2);
        self.mtime
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_none_or(|age| age < SETTLE)
    }
}

/// A `--static-names` file, loaded and validated, ready to be watched.
#[derive(Debug)]
pub struct StaticNames {
    path: PathBuf,
    poll: Duration,
    table: Arc<Table>,
    fingerprint: Option<Fingerprint>,
    hash: u64,
}

impl StaticNames {
    /// Reads and validates the file; any problem is an error, since serving nothing valid
    /// from the start would be worse than refusing to start.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, NamesError> {
        let path = path.into();
        let read = |source| NamesError::Read {
            path: path.clone(),
            source,
        };
        let meta = std::fs::metadata(&path).map_err(read)?;
        let json = std::fs::read(&path).map_err(read)?;
        let hash = hash(&json);
        let table = validate(&path, json)?;
        Ok(StaticNames {
            fingerprint: Some(Fingerprint::of(&meta)),
            path,
            poll: DEFAULT_POLL,
            table: Arc::new(table),
            hash,
        })
    }

    pub fn with_poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> &str {
        &self.table.version
    }

    /// Starts polling the file until `stop` changes or is dropped; returns the channel the
    /// current table is published on.
    pub fn watch(mut self, mut stop: watch::Receiver<bool>) -> watch::Receiver<Option<Arc<Table>>> {
        let (tx, rx) = watch::channel(Some(self.table.clone()));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => self.check(&tx).await,
                    _ = stop.changed() => break,
                }
            }
        });
        rx
    }

    async fn check(&mut self, tx: &watch::Sender<Option<Arc<Table>>>) {
        let meta = match tokio::fs::metadata(&self.path).await {
            Ok(meta) => meta,
            Err(error) => {
                if self.fingerprint.take().is_some() {
                    tracing::warn!(path = %self.path.display(), %error, version = %self.table.version,
                        "name table file unreadable; still serving the last good table");
                }
                return;
            }
        };
        let fingerprint = Fingerprint::of(&meta);
        if self.fingerprint == Some(fingerprint) && !fingerprint.is_recent() {
            return;
        }
        self.fingerprint = Some(fingerprint);
        let json = match tokio::fs::read(&self.path).await {
            Ok(json) => json,
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, version = %self.table.version,
                    "name table file unreadable; still serving the last good table");
                self.fingerprint = None;
                return;
            }
        };
        let hash = hash(&json);
        if hash == self.hash {
            return;
        }
        // Remembered even when invalid, so one bad edit is reported once, not every poll.
        self.hash = hash;
        if json == self.table.json {
            // A bad edit reverted: nothing new to serve or to say.
            return;
        }
        match validate(&self.path, json) {
            Ok(mut table) => {
                if table.file_version == self.table.file_version {
                    // People edit names and forget the version. Clients long-poll by version,
                    // so serve the edit under a version derived from its content.
                    match table.with_content_version() {
                        Ok(t) => table = t,
                        Err(error) => {
                            tracing::warn!(%error, "name table edit rejected; still serving the last good table");
                            return;
                        }
                    }
                    tracing::info!(path = %self.path.display(), from = %self.table.version,
                        to = %table.version, "name table content changed without a version change; serving it under a derived version");
                } else {
                    tracing::info!(path = %self.path.display(), from = %self.table.version,
                        to = %table.version, "name table reloaded");
                }
                self.table = Arc::new(table);
                tx.send_replace(Some(self.table.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, version = %self.table.version,
                    "name table edit rejected; still serving the last good table");
            }
        }
    }
}

fn validate(path: &Path, json: Vec<u8>) -> Result<Table, NamesError> {
    let index = NameIndex::from_json(&json).map_err(|source| NamesError::Invalid {
        path: path.to_path_buf(),
        source,
    })?;
    let version = index.version().to_string();
    if HeaderValue::from_str(&version).is_err() {
        return Err(NamesError::UnusableVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    Ok(Table {
        file_version: version.clone(),
        version,
        json: json.into(),
    })
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// The table being served, as the server's long-polls follow it (`None` until there is one).
pub type Tables = watch::Receiver<Option<Arc<Table>>>;

/// The answer to a long-poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    /// A table the client does not have.
    Changed(Arc<Table>),
    /// The client's version is still current (at the deadline, or at shutdown).
    NotModified(Arc<Table>),
    /// There is no table yet (the control plane has not answered and nothing is cached).
    NoTable,
}

/// Waits until there is a table whose version differs from `known` (at once when it already
/// does, or when the client has none), `wait` passes, or `stop` fires.
pub async fn long_poll(
    mut tables: watch::Receiver<Option<Arc<Table>>>,
    known: Option<&str>,
    wait: Duration,
    mut stop: watch::Receiver<bool>,
) -> Poll {
    let deadline = Instant::now() + wait;
    loop {
        let current = tables.borrow_and_update().clone();
        let stopped = *stop.borrow();
        match current {
            Some(t) if known != Some(t.version.as_str()) => return Poll::Changed(t),
            Some(t) if stopped => return Poll::NotModified(t),
            None if stopped => return Poll::NoTable,
            _ => {}
        }
        let at_deadline = || match &current {
            Some(t) => Poll::NotModified(t.clone()),
            None => Poll::NoTable,
        };
        tokio::select! {
            changed = tables.changed() => {
                if changed.is_err() {
                    return at_deadline();
                }
            }
            _ = tokio::time::sleep_until(deadline) => return at_deadline(),
            _ = stop.changed() => return at_deadline(),
        }
    }
}
