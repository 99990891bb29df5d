//! The VM's side of its name table ([`VmView`]): the search domains from resolv.conf and
//! whether the VM has IPv6, followed while the shim runs (a DHCP renewal can change both).

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;

use crate::control::tables::VmView;

/// How often the view is looked at again.
pub const POLL: Duration = Duration::from_secs(2);

/// The view now.
pub fn current(resolv_conf: &std::path::Path) -> VmView {
    let text = std::fs::read_to_string(resolv_conf).unwrap_or_default();
    VmView {
        search: search_domains(&text),
        ipv6: has_global_ipv6(),
    }
}

/// resolv.conf's search list: the last `search` or `domain` line wins (glibc), names
/// lower-cased, trailing dots dropped.
pub fn search_domains(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("search") => {
                found = words
                    .map(|w| w.trim_end_matches('.').to_ascii_lowercase())
                    .filter(|w| !w.is_empty())
                    .collect();
            }
            Some("domain") => {
                found = words
                    .next()
                    .map(|w| w.trim_end_matches('.').to_ascii_lowercase())
                    .filter(|w| !w.is_empty())
                    .into_iter()
                    .collect();
            }
            _ => {}
        }
    }
    found
}

/// Whether any interface has a global IPv6 address (`/proc/net/if_inet6`: scope 00).
pub fn has_global_ipv6() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6")
        .map(|t| {
            t.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(3) == Some(&"00") && f.get(5) != Some(&"lo")
            })
        })
        .unwrap_or(false)
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_last_search_or_domain_line_wins() {
        let t = "domain a.example\nsearch corp.example. Lab.Example\nnameserver 10.0.0.2\n";
        assert_eq!(super::search_domains(t), ["corp.example", "lab.example"]);
        assert_eq!(super::search_domains("search x\ndomain y.\n"), ["y"]);
        assert!(super::search_domains("nameserver 1.1.1.1\n").is_empty());
    }
}
