//! Virtual IPs for ServiceEntry hosts that have no `addresses`, from 240.240.0.0/16 and the
//! matching 2001:2::/48 address (Istio's auto-allocation ranges).
//!
//! A host keeps the slot it already has (the caller persists the table, which makes VIPs stable
//! across restarts). New hosts are placed in sorted order, each at a hash of its name, probing
//! forward past taken slots, so the same inputs always give the same table whatever order
//! objects arrived in.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use vmesh_api::names::{AUTO_VIP_V4_PREFIX, AUTO_VIP_V6_PREFIX};

/// Slot number -> address: slot `n` is 240.240.(n>>8).(n&255) and 2001:2::n. Slots whose last
/// octet is 0 or 255 are never used, to stay clear of tools that treat them specially.
pub type VipTable = BTreeMap<String, u16>;

const SLOTS: u32 = 1 << 16;

fn usable(slot: u32) -> bool {
    let last = slot & 0xff;
    last != 0 && last != 0xff
}

fn fnv1a32(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The table for exactly `wanted` hosts: existing slots kept, hosts no longer wanted released,
/// new hosts allocated deterministically. Hosts beyond the range's capacity get no slot.
pub fn allocate(existing: &VipTable, wanted: &BTreeSet<String>) -> VipTable {
    let mut out: VipTable = existing
        .iter()
        .filter(|(h, _)| wanted.contains(*h))
        .map(|(h, s)| (h.clone(), *s))
        .collect();
    let mut taken: BTreeSet<u16> = out.values().copied().collect();
    for host in wanted {
        if out.contains_key(host) {
            continue;
        }
        let start = fnv1a32(host) % SLOTS;
        let free = (0..SLOTS)
            .map(|i| (start + i) % SLOTS)
            .filter(|s| usable(*s))
            .filter_map(|s| u16::try_from(s).ok())
            .find(|s| !taken.contains(s));
        if let Some(slot) = free {
            taken.insert(slot);
            out.insert(host.clone(), slot);
        }
    }
    out
}

pub fn slot_v4(slot: u16) -> Ipv4Addr {
    let [hi, lo] = slot.to_be_bytes();
    let [a, b] = AUTO_VIP_V4_PREFIX;
    Ipv4Addr::new(a, b, hi, lo)
}

pub fn slot_v6(slot: u16) -> Ipv6Addr {
    let [a, b, c] = AUTO_VIP_V6_PREFIX;
    Ipv6Addr::new(a, b, c, 0, 0, 0, 0, slot)
}

/// Both addresses of a slot, IPv4 first.
pub fn slot_ips(slot: u16) -> [IpAddr; 2] {
    [IpAddr::V4(slot_v4(slot)), IpAddr::V6(slot_v6(slot))]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(hosts: &[&str]) -> BTreeSet<String> {
        hosts.iter().map(|h| h.to_string()).collect()
    }

    #[test]
    fn allocation_is_deterministic_and_keeps_existing_slots() {
        let a = allocate(
            &VipTable::new(),
            &set(&["a.example.com", "b.example.com", "c.example.com"]),
        );
        let b = allocate(
            &VipTable::new(),
            &set(&["c.example.com", "a.example.com", "b.example.com"]),
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), 3);
        let mut grown = set(&[
            "a.example.com",
            "b.example.com",
            "c.example.com",
            "d.example.com",
        ]);
        let a2 = allocate(&a, &grown);
        for h in ["a.example.com", "b.example.com", "c.example.com"] {
            assert_eq!(a2[h], a[h], "{h} kept its VIP");
        }
        grown.remove("a.example.com");
        let a3 = allocate(&a2, &grown);
        assert!(!a3.contains_key("a.example.com"));
        assert_eq!(a3["d.example.com"], a2["d.example.com"]);
    }

    #[test]
    fn collisions_probe_forward_to_the_next_free_usable_slot() {
        let host = "collide.example.com";
        let natural = (fnv1a32(host) % SLOTS) as u16;
        // Occupy the host's natural slot with another host.
        let existing: VipTable = [("holder.example.com".to_string(), natural)].into();
        let t = allocate(&existing, &set(&[host, "holder.example.com"]));
        assert_eq!(t["holder.example.com"], natural);
        let got = t[host];
        assert_ne!(got, natural);
        let expect = (1..SLOTS)
            .map(|i| (u32::from(natural) + i) % SLOTS)
            .find(|s| usable(*s))
            .unwrap() as u16;
        assert_eq!(got, expect);
        // The same inputs resolve the collision the same way every time.
        assert_eq!(allocate(&existing, &set(&[host, "holder.example.com"])), t);
    }

    #[test]
    fn slots_map_into_the_istio_ranges() {
        assert_eq!(slot_v4(0x0102), Ipv4Addr::new(240, 240, 1, 2));
        assert_eq!(slot_v6(0x0102).to_string(), "2001:2::102");
        let t = allocate(
            &VipTable::new(),
            &(0..2000).map(|i| format!("h{i}.example.com")).collect(),
        );
        assert_eq!(t.len(), 2000);
        assert!(t.values().all(|s| usable(u32::from(*s))));
        assert_eq!(t.values().collect::<BTreeSet<_>>().len(), 2000);
    }
}
