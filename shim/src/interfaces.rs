//! This machine's own IP addresses, read from procfs: the VM's address when nothing names it
//! (see [`crate::bundle`]), and whether the VM has IPv6 at all ([`has_global_ipv6`]).
//!
//! `getifaddrs(3)` would be the usual source, but it needs `unsafe` (forbidden in this
//! workspace) or a new native dependency. Linux publishes the same facts as text, which is
//! stable kernel ABI and needs no external program:
//!
//! - IPv6: `/proc/net/if_inet6`, one address a line with its interface index, scope and flags
//!   and the interface name.
//! - IPv4: `/proc/net/fib_trie` lists every local address as a `/32 host LOCAL` leaf, without
//!   its interface; `/proc/net/route` gives each connected route's interface, so an address
//!   belongs to the interface of the longest non-default route containing it. An address no
//!   route contains (a /32 on `lo`, a point-to-point peer) comes after those that have one.
//!
//! Addresses are then ordered as `hostname --all-ip-addresses` (what Istio's `istio-start.sh`
//! takes the first of when `ISTIO_SVC_IP` is unset) lists them from getifaddrs: IPv4 before
//! IPv6, each by interface index. Parsing is pure (`parse_*`), so tests pass their own text.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

pub const IF_INET6: &str = "/proc/net/if_inet6";
pub const FIB_TRIE: &str = "/proc/net/fib_trie";
pub const ROUTE: &str = "/proc/net/route";

/// One address of this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddr {
    /// The interface name (`eth0`); empty when no route tells it (IPv4 only).
    pub interface: String,
    /// The interface index; `u32::MAX` when unknown, which sorts it last.
    pub index: u32,
    pub ip: IpAddr,
    /// IPv6 only: a temporary (privacy) or deprecated address, which changes or goes away on
    /// its own and so is a poor identity for the VM.
    pub transient: bool,
}

impl InterfaceAddr {
    /// Loopback, link-local, unspecified and multicast addresses are not the VM's address in
    /// the mesh (nothing outside the machine, or outside its link, reaches them).
    pub fn is_usable(&self) -> bool {
        match self.ip {
            IpAddr::V4(ip) => {
                !(ip.is_loopback()
                    || ip.is_link_local()
                    || ip.is_unspecified()
                    || ip.is_multicast())
            }
            IpAddr::V6(ip) => {
                !(ip.is_loopback()
                    || is_v6_link_local(ip)
                    || ip.is_unspecified()
                    || ip.is_multicast())
            }
        }
    }
}

fn is_v6_link_local(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

// Flags of /proc/net/if_inet6 (the low byte of the kernel's IFA_F_*).
const IFA_F_TEMPORARY: u8 = 0x01;
const IFA_F_DADFAILED: u8 = 0x08;
const IFA_F_DEPRECATED: u8 = 0x20;
const IFA_F_TENTATIVE: u8 = 0x40;
// Scope column: the kernel's IFA_HOST and IFA_LINK; global (and ULA) addresses are 0x00.
const SCOPE_HOST: u8 = 0x10;
const SCOPE_LINK: u8 = 0x20;

/// Parses `/proc/net/if_inet6`: `ADDR(32 hex) IFINDEX PREFIXLEN SCOPE FLAGS NAME`, all hex.
/// Addresses that failed duplicate address detection or are still tentative are left out:
/// the kernel does not use them yet (or ever). Malformed lines are skipped.
pub fn parse_if_inet6(text: &str) -> Vec<InterfaceAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [addr, index, _prefix, scope, flags, name] = f[..] else {
            continue;
        };
        let (Ok(bits), Ok(index), Ok(scope), Ok(flags)) = (
            u128::from_str_radix(addr, 16),
            u32::from_str_radix(index, 16),
            u8::from_str_radix(scope, 16),
            u8::from_str_radix(flags, 16),
        ) else {
            continue;
        };
        if addr.len() != 32 || flags & (IFA_F_DADFAILED | IFA_F_TENTATIVE) != 0 {
            continue;
        }
        let ip = Ipv6Addr::from(bits);
        if scope & (SCOPE_HOST | SCOPE_LINK) != 0 && !ip.is_loopback() && !is_v6_link_local(ip) {
            // The scope column disagrees with the address bits; trust neither.
            continue;
        }
        out.push(InterfaceAddr {
            interface: name.to_string(),
            index,
            ip: IpAddr::V6(ip),
            transient: flags & (IFA_F_TEMPORARY | IFA_F_DEPRECATED) != 0,
        });
    }
    out
}

/// The local IPv4 addresses in `/proc/net/fib_trie`: each leaf line `|-- A.B.C.D` followed by
/// a `/32 host LOCAL` line. The trie is printed once per routing table (`Main:`, `Local:`),
/// so an address appears more than once; it is listed once, in first-seen order.
pub fn parse_fib_trie_local(text: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut leaf: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(ip) = line.strip_prefix("|--") {
            leaf = ip.trim().parse().ok();
        } else if line.starts_with('/') {
            let mut words = line.split_whitespace();
            let local = words.next() == Some("/32")
                && words.next() == Some("host")
                && words.next() == Some("LOCAL");
            if let (true, Some(ip)) = (local, leaf) {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        } else {
            // A `+--` node or a table header: the next `/..` line belongs to no leaf.
            leaf = None;
        }
    }
    out
}

/// A route of `/proc/net/route`: interface, destination and mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub interface: String,
    pub destination: Ipv4Addr,
    pub mask: Ipv4Addr,
}

/// Parses `/proc/net/route`: a header line, then `IFACE DEST GATEWAY FLAGS REFCNT USE METRIC
/// MASK ...`, addresses as 8 hex digits.
pub fn parse_proc_route(text: &str) -> Vec<Route> {
    // The kernel prints the address's bytes read as a native u32; reading them back the same
    // way restores them.
    let hex = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|n| Ipv4Addr::from(n.to_ne_bytes()))
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(Route {
                interface: (*f.first()?).to_string(),
                destination: hex(f.get(1)?)?,
                mask: hex(f.get(7)?)?,
            })
        })
        .collect()
}

/// Gives each local IPv4 address the interface of the longest non-default route containing
/// it, and that interface's index from `index_of` (the real one reads sysfs).
pub fn ipv4_interface_addrs(
    locals: &[Ipv4Addr],
    routes: &[Route],
    index_of: impl Fn(&str) -> Option<u32>,
) -> Vec<InterfaceAddr> {
    locals
        .iter()
        .map(|&ip| {
            let route = routes
                .iter()
                .filter(|r| {
                    let mask = u32::from(r.mask);
                    mask != 0 && u32::from(ip) & mask == u32::from(r.destination) & mask
                })
                .max_by_key(|r| u32::from(r.mask).count_ones());
            let interface = route.map(|r| r.interface.clone()).unwrap_or_default();
            InterfaceAddr {
                index: index_of(&interface).unwrap_or(u32::MAX),
                interface,
                ip: IpAddr::V4(ip),
                transient: false,
            }
        })
        .collect()
}

/// Orders addresses as `hostname --all-ip-addresses` does: IPv4 first, then IPv6, each by
/// interface index, keeping the order within an interface. A stable sort.
pub fn sort_like_hostname(addrs: &mut [InterfaceAddr]) {
    addrs.sort_by_key(|a| (a.ip.is_ipv6(), a.index));
}

/// The address a VM is known by when nothing names it: the first usable address (see
/// [`InterfaceAddr::is_usable`]) in `addrs`' order, preferring stable IPv6 addresses to
/// temporary or deprecated ones.
pub fn pick_address(addrs: &[InterfaceAddr]) -> Option<&InterfaceAddr> {
    let usable = || addrs.iter().filter(|a| a.is_usable());
    usable().find(|a| !a.transient).or_else(|| usable().next())
}

/// Whether any of `addrs` is an IPv6 address others can reach: global scope, which includes
/// unique local addresses (fc00::/7; reachable within the site, which is where the mesh is).
pub fn has_global_ipv6_in(addrs: &[InterfaceAddr]) -> bool {
    addrs.iter().any(|a| a.ip.is_ipv6() && a.is_usable())
}

/// Every address of this machine, ordered by [`sort_like_hostname`]. An unreadable
/// `if_inet6` means IPv6 is disabled (the file is absent then) and contributes nothing; the
/// IPv4 files are always there on Linux, so failing to read them is an error.
pub fn system_addrs() -> std::io::Result<Vec<InterfaceAddr>> {
    let read = |p: &str| std::fs::read_to_string(Path::new(p));
    let locals = parse_fib_trie_local(&read(FIB_TRIE)?);
    let routes = parse_proc_route(&read(ROUTE)?);
    let mut addrs = ipv4_interface_addrs(&locals, &routes, crate::upstream::interface_index);
    addrs.extend(
        read(IF_INET6)
            .map(|t| parse_if_inet6(&t))
            .unwrap_or_default(),
    );
    sort_like_hostname(&mut addrs);
    Ok(addrs)
}

/// Whether this machine has an IPv6 address others can reach, right now (reads
/// `/proc/net/if_inet6` on every call; it is small). Without one, IPv6 answers would send
/// clients to addresses they cannot use. False when IPv6 is disabled.
pub fn has_global_ipv6() -> bool {
    std::fs::read_to_string(IF_INET6)
        .map(|t| has_global_ipv6_in(&parse_if_inet6(&t)))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured on a test VM (columns as the kernel prints them), plus made-up lines for the
    // flags: a temporary, a deprecated, a tentative, a DAD-failed address and garbage.
    const IF_INET6_TEXT: &str = "\
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000002 04 40 00 82     eth0
20010db8000000000000000000000007 03 40 00 01     ens4
20010db8000000000000000000000008 03 40 00 20     ens4
20010db8000000000000000000000009 03 40 00 40     ens4
20010db800000000000000000000000a 03 40 00 08     ens4
not a line
";

    const FIB_TRIE_TEXT: &str = "\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
        +-- 192.0.2.0/30 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
     |-- 172.17.0.1
        /32 host LOCAL
     |-- 169.254.3.3
        /32 host LOCAL
     |-- 10.9.9.9
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 127.0.0.1
        /32 host LOCAL
     |-- 192.0.2.2
        /32 host LOCAL
";

    const ROUTE_TEXT: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
";

    fn index_of(name: &str) -> Option<u32> {
        match name {
            "lo" => Some(1),
            "docker0" => Some(2),
            "eth0" => Some(4),
            _ => None,
        }
    }

    #[test]
    fn if_inet6_lines() {
        let got: Vec<(String, u32, String, bool)> = parse_if_inet6(IF_INET6_TEXT)
            .into_iter()
            .map(|a| (a.interface, a.index, a.ip.to_string(), a.transient))
            .collect();
        let want = [
            ("eth0", 4, "fe80::fc:ff:fe00:1", false),
            ("lo", 1, "::1", false),
            ("eth0", 4, "fd00::2", false),
            ("ens4", 3, "2001:db8::7", true),
            ("ens4", 3, "2001:db8::8", true),
        ];
        let want: Vec<(String, u32, String, bool)> = want
            .iter()
            .map(|(i, n, ip, t)| (i.to_string(), *n, ip.to_string(), *t))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn fib_trie_local_addresses_once_each() {
        let want: Vec<Ipv4Addr> = [
            "127.0.0.1",
            "192.0.2.2",
            "172.17.0.1",
            "169.254.3.3",
            "10.9.9.9",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(parse_fib_trie_local(FIB_TRIE_TEXT), want);
    }

    #[test]
    fn route_table_in_host_byte_order() {
        let routes = parse_proc_route(ROUTE_TEXT);
        assert_eq!(routes.len(), 3);
        assert_eq!(routes[1].destination, Ipv4Addr::new(192, 0, 2, 0));
        assert_eq!(routes[1].mask, Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(routes[2].interface, "docker0");
    }

    #[test]
    fn addresses_ordered_like_hostname_and_picked() {
        let locals = parse_fib_trie_local(FIB_TRIE_TEXT);
        let routes = parse_proc_route(ROUTE_TEXT);
        let mut addrs = ipv4_interface_addrs(&locals, &routes, index_of);
        addrs.extend(parse_if_inet6(IF_INET6_TEXT));
        sort_like_hostname(&mut addrs);
        let order: Vec<String> = addrs
            .iter()
            .map(|a| format!("{}@{}", a.ip, a.interface))
            .collect();
        assert_eq!(
            order,
            [
                // 127.0.0.1 and 169.254.3.3 and 10.9.9.9 have no route: interface unknown, last.
                "172.17.0.1@docker0",
                "192.0.2.2@eth0",
                "127.0.0.1@",
                "169.254.3.3@",
                "10.9.9.9@",
                "::1@lo",
                "2001:db8::7@ens4",
                "2001:db8::8@ens4",
                "fe80::fc:ff:fe00:1@eth0",
                "fd00::2@eth0",
            ]
        );
        assert_eq!(
            pick_address(&addrs).map(|a| a.ip),
            Some("172.17.0.1".parse().unwrap())
        );
        assert!(has_global_ipv6_in(&addrs));
    }

    #[test]
    fn picking_skips_loopback_link_local_and_prefers_stable_ipv6() {
        let addr = |ip: &str, transient| InterfaceAddr {
            interface: "x".into(),
            index: 1,
            ip: ip.parse().unwrap(),
            transient,
        };
        let cases: &[(&[InterfaceAddr], Option<&str>, bool)] = &[
            (&[], None, false),
            (&[addr("127.0.0.1", false), addr("::1", false)], None, false),
            (
                &[addr("169.254.1.1", false), addr("fe80::1", false)],
                None,
                false,
            ),
            (
                &[addr("2001:db8::1", true), addr("2001:db8::2", false)],
                Some("2001:db8::2"),
                true,
            ),
            (&[addr("2001:db8::1", true)], Some("2001:db8::1"), true),
            (
                &[addr("10.0.0.5", false), addr("fd00::5", false)],
                Some("10.0.0.5"),
                true,
            ),
            (&[addr("10.0.0.5", false)], Some("10.0.0.5"), false),
        ];
        for (addrs, want, v6) in cases {
            let want = want.map(|w| w.parse::<IpAddr>().unwrap());
            assert_eq!(pick_address(addrs).map(|a| a.ip), want, "{addrs:?}");
            assert_eq!(has_global_ipv6_in(addrs), *v6, "{addrs:?}");
        }
    }

    #[test]
    fn this_machine_is_readable() {
        // Whatever the machine has, reading it works and loopback is never picked.
        let addrs = system_addrs().unwrap();
        assert!(addrs.iter().any(|a| a.ip.is_loopback()), "{addrs:?}");
        if let Some(a) = pick_address(&addrs) {
            assert!(!a.ip.is_loopback());
        }
    }

    #[test]
    fn global_ipv6_table() {
        let lo = "00000000000000000000000000000001 01 80 10 80       lo\n";
        let link = "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n";
        let ula = "fd000000000000000000000000000002 04 40 00 82     eth0\n";
        let global = "20010db8000000000000000000000001 02 40 00 80     eth0\n";
        let cases = [
            ("", false),
            (lo, false),
            (&*format!("{lo}{link}"), false),
            (&*format!("{lo}{link}{ula}"), true),
            (&*format!("{lo}{global}"), true),
            ("garbage\n", false),
        ];
        for (text, want) in cases {
            assert_eq!(has_global_ipv6_in(&parse_if_inet6(text)), want, "{text}");
        }
    }
}
