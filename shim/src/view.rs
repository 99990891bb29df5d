//! The VM's side of its name table ([`VmView`]): the search domains from resolv.conf and
//! whether the VM has IPv6, followed while the shim runs (a DHCP renewal can change both).

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;

use crate::control::tables::VmView;

/// How often the view is looked at again.
pub const POLL: Duration = Duration::from_secs(2);

/// The view now: glibc's search list (resolv.conf's `search`/`domain`, else the host name's
/// domain) and whether an interface has a global IPv6 address.
pub fn current(resolv_conf: &std::path::Path) -> VmView {
    VmView {
        search: crate::upstream::read_resolv(resolv_conf)
            .map(|r| r.search_domains(&crate::upstream::system_hostname()))
            .unwrap_or_default(),
        ipv6: crate::interfaces::has_global_ipv6(),
    }
}

/// Publishes the view, re-reading it every [`POLL`] until `stop` flips.
pub fn follow(resolv_conf: PathBuf, mut stop: watch::Receiver<bool>) -> watch::Receiver<VmView> {
    let (tx, rx) = watch::channel(current(&resolv_conf));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                _ = stop.changed() => return,
            }
            let now = current(&resolv_conf);
            tx.send_if_modified(|v| {
                if *v == now {
                    return false;
                }
                tracing::info!(search = ?now.search, ipv6 = now.ipv6, "the VM's DNS view changed");
                *v = now;
                true
            });
        }
    });
    rx
}
