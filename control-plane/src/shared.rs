//! One identity for every replica on a shared store: the root CA (which also signs workload
//! certificates), the token-signing key and the admin credential live in the store under
//! [`IDENTITY_PREFIX`], so a token minted by one replica verifies on every other one, every
//! replica's serving certificate chains to the same `root-cert.pem`, and a VM may talk to any
//! replica.
//!
//! The store is the source of truth; the data dir holds a copy (0600, as on a single replica),
//! from which the rest of start-up loads exactly as it does with the embedded store. The first
//! replica to start creates the identity (or publishes the one its data dir already holds,
//! e.g. the single replica whose store was migrated into etcd) in one transaction that
//! requires every key absent: that transaction is the lock. A replica that loses the race
//! reads the winner's and overwrites what it had made locally. Serving keys stay per
//! replica: each replica's certificate names its own addresses, and sharing a key would only
//! widen what one leaked replica exposes.

use std::path::Path;

use crate::server::{ADMIN_TOKEN_FILE, SIGNING_KEY_FILE};
use crate::store::{Precondition, Store, StoreError, Txn};
use crate::tls::{write_private, ROOT_CERT_FILE, ROOT_KEY_FILE};

/// Where the shared identity lives in the store: one key per data-dir file, named after it.
pub const IDENTITY_PREFIX: &str = "meta/identity/";

/// How many times the create-if-absent transaction is retried after losing a race (a loser
/// reads the winner's at the next try, so more than two only helps against deletions).
const ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("shared identity in the store: {0}")]
    Store(#[from] StoreError),
    #[error("the store holds {present} without {missing}: the shared CA is half there; restore both keys or delete both")]
    HalfCa {
        present: &'static str,
        missing: &'static str,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the shared identity kept changing while this replica started")]
    Contended,
}

/// What [`adopt`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adopted {
    /// Another replica had created it; the data dir now holds its copy.
    Existing,
    /// This replica created (or published its data dir's) identity.
    Published,
}

/// The data-dir files that are shared. The root is left out when the CA is plugged in
/// (`--ca-cert`, `cacerts`): then every replica is given the same CA files by its operator,
/// and the root key never needs to be in the store at all.
pub fn shared_files(share_root: bool) -> Vec<&'static str> {
    let mut v = vec![SIGNING_KEY_FILE, ADMIN_TOKEN_FILE];
    if share_root {
        v.extend([ROOT_CERT_FILE, ROOT_KEY_FILE]);
    }
    v
}

pub fn store_key(file: &str) -> String {
    format!("{IDENTITY_PREFIX}{file}")
}

/// Makes `dir` hold the store's identity, creating it in the store first if it has none.
/// `create_local` makes whichever of the files are missing in `dir` (the single-replica
/// start-up does exactly that); it runs only when the store lacks some of them.
pub async fn adopt<S: Store>(
    store: &S,
    dir: &Path,
    share_root: bool,
    create_local: impl Fn() -> Result<(), SharedError>,
) -> Result<Adopted, SharedError> {
    let files = shared_files(share_root);
    for _ in 0..ATTEMPTS {
        // One listing, so all keys are read at one revision (never half of a commit).
        let (records, _) = store.list(IDENTITY_PREFIX).await?;
        let stored: Vec<Option<Vec<u8>>> = files
            .iter()
            .map(|f| {
                let k = store_key(f);
                records.iter().find(|r| r.key == k).map(|r| r.value.clone())
            })
            .collect();
        if stored.iter().all(Option::is_some) {
            for (f, v) in files.iter().zip(stored) {
                write_copy(dir, f, &v.unwrap_or_default())?;
            }
            return Ok(Adopted::Existing);
        }
        check_ca_pair(&files, &stored)?;
        create_local()?;
        let mut txn = Txn::default();
        for (f, v) in files.iter().zip(&stored) {
            if v.is_none() {
                let path = dir.join(f);
                let bytes = std::fs::read(&path).map_err(|source| SharedError::Io {
                    path: path.display().to_string(),
                    source,
                })?;
                let k = store_key(f);
                txn = txn.check(k.clone(), Precondition::Absent).put(k, bytes);
            }
        }
        match store.commit(txn).await {
            Ok(_) => {
                // Keys another replica had put before (a partial identity) still come to the
                // data dir; the next round reads them all.
                if stored.iter().all(Option::is_none) {
                    return Ok(Adopted::Published);
                }
            }
            Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(SharedError::Contended)
}

/// The root certificate and its key are one thing: never publish one beside another
/// replica's other half.
fn check_ca_pair(files: &[&'static str], stored: &[Option<Vec<u8>>]) -> Result<(), SharedError> {
    let has = |name: &str| {
        files
            .iter()
            .zip(stored)
            .any(|(f, v)| *f == name && v.is_some())
    };
    if !files.contains(&ROOT_CERT_FILE) {
        return Ok(());
    }
    match (has(ROOT_CERT_FILE), has(ROOT_KEY_FILE)) {
        (true, false) => Err(SharedError::HalfCa {
            present: ROOT_CERT_FILE,
            missing: ROOT_KEY_FILE,
        }),
        (false, true) => Err(SharedError::HalfCa {
            present: ROOT_KEY_FILE,
            missing: ROOT_CERT_FILE,
        }),
        _ => Ok(()),
    }
}

/// Writes the store's copy of `file` into `dir` (0600), saying so when it replaces a
/// different local one (a data dir that had been used alone before).
fn write_copy(dir: &Path, file: &str, value: &[u8]) -> Result<(), SharedError> {
    let path = dir.join(file);
    match std::fs::read(&path) {
        Ok(old) if old == value => return Ok(()),
        Ok(_) => tracing::warn!(file = %path.display(),
            "replacing the data dir's own copy with the replicas' shared one from the store"),
        Err(_) => {}
    }
    write_private(&path, value).map_err(|source| SharedError::Io {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::redb::RedbStore;
    use std::sync::Arc;

    fn store(dir: &Path) -> RedbStore {
        RedbStore::open(&dir.join("s.redb"), Arc::new(ManualClock::new(0)), None).unwrap()
    }

    fn make_files(dir: &Path, tag: &str) -> Result<(), SharedError> {
        for f in shared_files(true) {
            if !dir.join(f).exists() {
                write_private(&dir.join(f), format!("{tag}:{f}").as_bytes()).unwrap();
            }
        }
        Ok(())
    }

    #[tokio::test]
    async fn the_first_replica_publishes_and_the_others_adopt_its_identity() {
        let (s, a, b) = (
            vmesh_test_support::TempDir::new(),
            vmesh_test_support::TempDir::new(),
            vmesh_test_support::TempDir::new(),
        );
        let st = store(s.path());
        let r = adopt(&st, a.path(), true, || make_files(a.path(), "a")).await;
        assert_eq!(r.unwrap(), Adopted::Published);
        // b had an identity of its own (a data dir used alone before): the store's wins.
        make_files(b.path(), "b").unwrap();
        let r = adopt(&st, b.path(), true, || {
            panic!("not created when the store has one")
        });
        assert_eq!(r.await.unwrap(), Adopted::Existing);
        for f in shared_files(true) {
            assert_eq!(
                std::fs::read(b.path().join(f)).unwrap(),
                format!("a:{f}").as_bytes()
            );
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(b.path().join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
    }

    #[tokio::test]
    async fn half_a_ca_in_the_store_is_refused_not_completed() {
        let (s, a) = (
            vmesh_test_support::TempDir::new(),
            vmesh_test_support::TempDir::new(),
        );
        let st = store(s.path());
        st.commit(Txn::default().put(store_key(ROOT_CERT_FILE), b"cert".to_vec()))
            .await
            .unwrap();
        let r = adopt(&st, a.path(), true, || make_files(a.path(), "a")).await;
        assert!(matches!(r, Err(SharedError::HalfCa { .. })), "{r:?}");
        // With a plugged-in CA the root is not shared, so the stray key does not matter.
        let r = adopt(&st, a.path(), false, || make_files(a.path(), "a")).await;
        assert_eq!(r.unwrap(), Adopted::Published);
    }
}
