//! ClusterIPs for Kubernetes Services that name none, as the API server allocates them from its
//! service CIDR (`--service-cluster-ip-range`, 10.96.0.0/12 by default).
//!
//! The API server picks at random; here the first candidate is a hash of the Service's
//! namespace and name, probing forward past used addresses, so the same inputs give the same
//! address. The caller writes the address into `spec.clusterIP`/`spec.clusterIPs` and records
//! it in the store, which is what keeps it across restarts. As in Kubernetes, the range's
//! network address (and for IPv4 its broadcast address) is never given out, nor its first host
//! address, which the API server keeps for the `kubernetes` Service.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A service CIDR: `address/prefix-length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceCidr {
    network: IpAddr,
    len: u8,
}

pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/12";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an address/prefix-length CIDR")]
    Syntax(String),
    #[error(
        "{0:?} has no room for Services: at least 8 addresses (IPv4 /29, IPv6 /125) are needed"
    )]
    TooSmall(String),
}

impl std::str::FromStr for ServiceCidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let syntax = || CidrError::Syntax(s.to_string());
        let (ip, len) = s.split_once('/').ok_or_else(syntax)?;
        let ip: IpAddr = ip.parse().map_err(|_| syntax())?;
        let len: u8 = len.parse().map_err(|_| syntax())?;
        let width = width(&ip);
        if len > width {
            return Err(syntax());
        }
        if width - len < 3 {
            return Err(CidrError::TooSmall(s.to_string()));
        }
        Ok(ServiceCidr {
            network: from_bits(&ip, to_bits(&ip) & !host_mask(width, len)),
            len,
        })
    }
}

impl std::fmt::Display for ServiceCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

impl Default for ServiceCidr {
    fn default() -> Self {
        ServiceCidr {
            network: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 0)),
            len: 12,
        }
    }
}

fn width(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

fn host_mask(width: u8, len: u8) -> u128 {
    let host_bits = u32::from(width - len);
    if host_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    }
}

fn to_bits(ip: &IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(*v4)),
        IpAddr::V6(v6) => u128::from(*v6),
    }
}

fn from_bits(like: &IpAddr, bits: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(bits).unwrap_or(u32::MAX))),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(bits)),
    }
}

fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl ServiceCidr {
    pub fn contains(&self, ip: &IpAddr) -> bool {
        ip.is_ipv4() == self.network.is_ipv4()
            && to_bits(ip) & !host_mask(width(ip), self.len) == to_bits(&self.network)
    }

    /// Offsets into the range that may be handed out: 2 .. last (exclusive of the broadcast
    /// address for IPv4).
    fn usable(&self) -> (u128, u128) {
        let mask = host_mask(width(&self.network), self.len);
        let last = if self.network.is_ipv4() {
            mask - 1
        } else {
            mask
        };
        (2, last)
    }

    /// An address for the Service `namespace/name` that is not in `used`; `skip` passes over
    /// that many free candidates first (a retry after another writer took the first one).
    /// `None` when the range is full.
    pub fn allocate(
        &self,
        namespace: &str,
        name: &str,
        used: &BTreeSet<IpAddr>,
        skip: usize,
    ) -> Option<IpAddr> {
        let (first, last) = self.usable();
        let count = last - first + 1;
        let start = u128::from(fnv1a64(&format!("{namespace}/{name}"))) % count;
        let base = to_bits(&self.network);
        // Only used addresses can be passed over, so a free one turns up within that many
        // steps (plus the ones skipped on purpose).
        let tries = u128::try_from(used.len() + skip + 1)
            .unwrap_or(u128::MAX)
            .min(count);
        let mut skip = skip;
        for i in 0..tries {
            let ip = from_bits(&self.network, base + first + (start + i) % count);
            if used.contains(&ip) {
                continue;
            }
            if skip == 0 {
                return Some(ip);
            }
            skip -= 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_to_their_network_and_refuse_nonsense() {
        let c: ServiceCidr = DEFAULT_SERVICE_CIDR.parse().unwrap();
        assert_eq!(c, ServiceCidr::default());
        assert_eq!(
            "10.96.5.5/12".parse::<ServiceCidr>().unwrap().to_string(),
            "10.96.0.0/12"
        );
        assert!(c.contains(&ip("10.111.255.254")));
        assert!(!c.contains(&ip("10.112.0.1")));
        assert!(!c.contains(&ip("fd00::1")));
        for bad in [
            "10.96.0.0",
            "10.96.0.0/33",
            "x/12",
            "10.0.0.0/30",
            "fd00::/126",
        ] {
            assert!(bad.parse::<ServiceCidr>().is_err(), "{bad}");
        }
        assert!("fd00:10:96::/112".parse::<ServiceCidr>().is_ok());
    }

    #[test]
    fn allocation_is_deterministic_avoids_used_and_reserved_addresses() {
        let c: ServiceCidr = "10.0.0.0/29".parse().unwrap();
        let mut used = BTreeSet::new();
        let mut got = Vec::new();
        for i in 0..5 {
            let a = c.allocate("ns", &format!("s{i}"), &used, 0).unwrap();
            assert_eq!(c.allocate("ns", &format!("s{i}"), &used, 0), Some(a));
            used.insert(a);
            got.push(a);
        }
        // .0 network, .1 the kubernetes Service, .7 broadcast: five usable addresses.
        let all: BTreeSet<IpAddr> = (2..=6).map(|i| ip(&format!("10.0.0.{i}"))).collect();
        assert_eq!(got.iter().copied().collect::<BTreeSet<_>>(), all);
        assert_eq!(c.allocate("ns", "s5", &used, 0), None);
        // A retry passes over the candidate another writer took.
        let empty = BTreeSet::new();
        let first = c.allocate("ns", "x", &empty, 0).unwrap();
        let second = c.allocate("ns", "x", &empty, 1).unwrap();
        assert_ne!(first, second);
        let v6: ServiceCidr = "fd00:10:96::/112".parse().unwrap();
        assert!(v6.contains(&v6.allocate("ns", "x", &empty, 0).unwrap()));
    }
}
