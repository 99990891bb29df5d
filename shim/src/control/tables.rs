//! The VM's name table from the control plane: long-polled, kept on disk, and shaped to the
//! VM before the filter sees it.
//!
//! - **Long-poll** `GET /v1/name-table?version=V&wait=30` with the VM's token; every new table
//!   is checked by the same compiler the filter uses ([`NameIndex::from_json`]) before it
//!   replaces the one served, so a table the filter would refuse never reaches it.
//! - **Cache**: the control plane's table is written to `STATE_DIR/name-table.json`
//!   (atomically: a temporary file, fsync, rename, fsync of the directory) and read back at
//!   start, so mesh names keep resolving when the control plane is down, also across a shim
//!   restart.
//! - **The VM's view** ([`VmView`]), applied here rather than in the filter because only the
//!   shim can read the VM's files and interfaces: the search domains are the VM's own
//!   (resolv.conf `search`, as Istio's DNS proxy uses the host's search list), and the IPv6
//!   VIPs Istio auto-allocates are dropped when the VM has no IPv6 address (Istio gives the v6
//!   VIP only to dual-stack proxies). The served version is the control plane's plus a hash
//!   of the view, so a change of either reaches the filter.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use vmesh_api::names::{is_auto_allocated, NameTable};
use vmesh_core::names::NameIndex;

use super::client::{ControlPlane, TableClient, TablePoll};
use crate::backoff::Backoff;
use crate::names::Table;
use crate::status::Board;

/// The wait asked of the control plane per long-poll.
pub const POLL_WAIT: Duration = Duration::from_secs(30);
pub const CACHE_FILE: &str = "name-table.json";

/// What the VM contributes to its table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct VmView {
    /// resolv.conf's search list, in order.
    pub search: Vec<String>,
    /// Whether the VM has a global IPv6 address.
    pub ipv6: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("name table from the control plane refused: {0}")]
    Invalid(#[from] vmesh_core::names::TableError),
    #[error("name table from the control plane refused: {0}")]
    Shape(#[from] serde_json::Error),
}

/// The control plane's table as this VM serves it.
pub fn apply_view(cp_json: &[u8], view: &VmView) -> Result<(Table, usize), ViewError> {
    // The filter's own compiler first: what it would refuse is refused here.
    NameIndex::from_json(cp_json)?;
    let mut t: NameTable = serde_json::from_slice(cp_json)?;
    let cp_version = t.version.clone();
    t.search_domains = view.search.clone();
    if !view.ipv6 {
        for info in t.names.values_mut() {
            info.ips
                .retain(|ip| !(ip.is_ipv6() && is_auto_allocated(ip)));
        }
        for svc in t.services.values_mut() {
            svc.vips
                .retain(|ip| !(ip.is_ipv6() && is_auto_allocated(ip)));
        }
    }
    let mut h = DefaultHasher::new();
    view.hash(&mut h);
    t.version = format!("{cp_version}~{:08x}", h.finish() & 0xFFFF_FFFF);
    let names = t.names.len();
    let json = serde_json::to_vec(&t)?;
    // The view only removes addresses and replaces search domains; check the result all the
    // same, since the filter will compile exactly these bytes.
    NameIndex::from_json(&json)?;
    Ok((
        Table {
            version: t.version,
            file_version: cp_version,
            json: Bytes::from(json),
        },
        names,
    ))
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The control-plane table source.
pub struct CpTables {
    pub cp: Arc<ControlPlane>,
    /// The network and locality the table is asked for.
    pub whoami: TableClient,
    pub cache: PathBuf,
    pub view: watch::Receiver<VmView>,
    pub tables: watch::Sender<Option<Arc<Table>>>,
    pub board: Arc<Board>,
}

impl CpTables {
    /// Serves the cached table, if there is a usable one. Called before the shim listens.
    pub fn load_cache(&self) -> Option<Vec<u8>> {
        let json = match std::fs::read(&self.cache) {
            Ok(json) => json,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::warn!(path = %self.cache.display(), %error, "cached name table unreadable; waiting for the control plane");
                return None;
            }
        };
        let view = self.view.borrow().clone();
        match apply_view(&json, &view) {
            Ok((table, names)) => {
                tracing::info!(path = %self.cache.display(), version = %table.version, names,
                    "serving the cached name table until the control plane answers");
                self.board.table(&table.version, "cache", names);
                self.tables.send_replace(Some(Arc::new(table)));
                Some(json)
            }
            Err(error) => {
                tracing::warn!(path = %self.cache.display(), %error, "cached name table unusable; waiting for the control plane");
                None
            }
        }
    }

    fn publish(&self, cp_json: &[u8], source: &'static str) -> Result<(), ViewError> {
        let view = self.view.borrow().clone();
        let (table, names) = apply_view(cp_json, &view)?;
        let unchanged = self
            .tables
            .borrow()
            .as_ref()
            .is_some_and(|t| t.version == table.version);
        self.board.table(&table.version, source, names);
        if !unchanged {
            tracing::info!(version = %table.version, names, source, "name table updated");
            self.tables.send_replace(Some(Arc::new(table)));
        }
        Ok(())
    }

    /// Long-polls until `stop` flips.
    pub async fn run(self, cached: Option<Vec<u8>>, mut stop: watch::Receiver<bool>) {
        let mut view = self.view.clone();
        let mut cp_json = cached;
        // The version the control plane last gave; the cache's is not trusted to be current.
        let mut known: Option<String> = None;
        let mut backoff = Backoff::default();
        let mut refused_token: Option<u64> = None;
        loop {
            if *stop.borrow() {
                return;
            }
            if let Some(generation) = refused_token {
                // The control plane refused this token; asking again with it is pointless.
                if self.cp.token().generation() == generation {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.changed() => return,
                    }
                }
                refused_token = None;
            }
            let poll = self
                .cp
                .name_table(known.as_deref(), POLL_WAIT, &self.whoami);
            let result = tokio::select! {
                r = poll => r,
                Ok(()) = view.changed() => {
                    if let Some(json) = &cp_json {
                        if let Err(error) = self.publish(json, "controlPlane") {
                            tracing::warn!(%error, "name table not re-shaped for the VM's new view");
                        }
                    }
                    continue;
                }
                _ = stop.changed() => return,
            };
            match result {
                Ok(TablePoll::NotModified) => {
                    self.board.contact();
                    backoff.reset();
                }
                Ok(TablePoll::Changed { version, json }) => {
                    self.board.contact();
                    backoff.reset();
                    match self.publish(&json, "controlPlane") {
                        Ok(()) => {
                            known = Some(version);
                            if let Err(error) = write_atomically(&self.cache, &json) {
                                tracing::warn!(path = %self.cache.display(), %error,
                                    "name table not cached on disk; a restart without the control plane would serve none");
                            }
                            cp_json = Some(json.to_vec());
                        }
                        Err(error) => {
                            tracing::error!(%error, %version, "keeping the previous name table");
                            self.board.error(error.to_string());
                            // Ask again after a pause rather than spin on the same table.
                            known = Some(version);
                            self.pause(backoff.next_delay(), &mut stop).await;
                        }
                    }
                }
                Err(error) => {
                    if error.kind().is_some() {
                        self.board.contact();
                    }
                    self.board.error(format!("name table: {error}"));
                    if !error.is_transient() {
                        tracing::error!(%error, "name table refused by the control plane; waiting for a new token");
                        refused_token = Some(self.cp.token().generation());
                        continue;
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "name table poll failed; serving the last table");
                    self.pause(delay, &mut stop).await;
                }
            }
        }
    }

    async fn pause(&self, delay: Duration, stop: &mut watch::Receiver<bool>) {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CP: &str = r#"{"version":"68083db4","namespace":"vm-namespace","domain":"cluster.local",
        "searchDomains":["vm-namespace.svc.cluster.local","svc.cluster.local","cluster.local"],
        "names":{"vmservice.example.com":{"ips":["240.240.37.12","2001:2::250c"],"registry":"External"},
                 "v6.example.com":{"ips":["2001:db8::5"],"registry":"External"}},
        "services":{"vmservice.example.com":{"namespace":"vm-namespace","registry":"External",
            "vips":["240.240.37.12","2001:2::250c"],"ports":[]}}}"#;

    #[test]
    fn the_vms_search_list_replaces_the_tables_and_v6_vips_go_without_ipv6() {
        let view = VmView {
            search: vec!["corp.example".into()],
            ipv6: false,
        };
        let (table, names) = apply_view(CP.as_bytes(), &view).unwrap();
        assert_eq!(names, 2);
        let t: NameTable = serde_json::from_slice(&table.json).unwrap();
        assert_eq!(t.search_domains, vec!["corp.example"]);
        let ips =
            |h: &str| -> Vec<String> { t.names[h].ips.iter().map(|i| i.to_string()).collect() };
        assert_eq!(ips("vmservice.example.com"), ["240.240.37.12"]);
        // Only auto-allocated v6 addresses go: a ServiceEntry's own v6 address stays.
        assert_eq!(ips("v6.example.com"), ["2001:db8::5"]);
        assert_eq!(t.services["vmservice.example.com"].vips.len(), 1);
        assert_eq!(table.file_version, "68083db4");
        assert!(table.version.starts_with("68083db4~"));
        assert_eq!(t.version, table.version);

        let dual = VmView {
            search: vec![],
            ipv6: true,
        };
        let (t2, _) = apply_view(CP.as_bytes(), &dual).unwrap();
        let t2: NameTable = serde_json::from_slice(&t2.json).unwrap();
        assert_eq!(t2.names["vmservice.example.com"].ips.len(), 2);
        assert!(t2.search_domains.is_empty());
        assert_ne!(t2.version, t.version, "another view, another version");
    }

    #[test]
    fn a_table_the_filter_would_refuse_is_refused() {
        let bad = r#"{"version":"1","namespace":"ns","names":{"bad..name":{"ips":[],"registry":"External"}}}"#;
        assert!(apply_view(bad.as_bytes(), &VmView::default()).is_err());
        assert!(apply_view(b"{", &VmView::default()).is_err());
    }

    #[test]
    fn atomic_writes_replace_the_file() {
        let dir = vmesh_test_support::TempDir::new();
        let p = dir.path().join(CACHE_FILE);
        write_atomically(&p, b"one").unwrap();
        write_atomically(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
