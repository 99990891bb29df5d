//! The name table as it travels: JSON in the shape of Istio's NameTable (istio.io
//! `pkg/dns/proto` NameTable), plus the client's namespace, cluster domain and search domains so
//! one document fully determines the answers. Described for users in `docs/name-table.md`.
//!
//! Unknown fields are accepted and ignored: a newer control plane may add fields and an older
//! filter must keep serving what it understands.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub const DEFAULT_DOMAIN: &str = "cluster.local";

/// Istio's ranges for the VIPs it allocates to ServiceEntry hosts without addresses:
/// 240.240.0.0/16 and 2001:2::/48. The control plane allocates from them; the shim drops the
/// IPv6 ones for a VM without IPv6, as Istio gives the v6 VIP only to dual-stack proxies.
pub const AUTO_VIP_V4_PREFIX: [u8; 2] = [240, 240];
pub const AUTO_VIP_V6_PREFIX: [u16; 3] = [0x2001, 0x2, 0];

/// Whether `ip` is in Istio's auto-allocation ranges.
pub fn is_auto_allocated(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            [a, b] == AUTO_VIP_V4_PREFIX
        }
        IpAddr::V6(v6) => {
            let [a, b, c, ..] = v6.segments();
            [a, b, c] == AUTO_VIP_V6_PREFIX
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NameTable {
    /// Opaque; changes whenever the content changes. Long-polls compare it.
    pub version: String,
    /// The client's own namespace: bare `name` queries resolve only to services in it.
    pub namespace: String,
    #[serde(default = "default_domain")]
    pub domain: String,
    /// Suffixes the client's resolver may append (resolv.conf `search`); a query that is a
    /// mesh name plus one of them is answered with a CNAME to the mesh name.
    #[serde(default)]
    pub search_domains: Vec<String>,
    /// Fully qualified host (no trailing dot) or `*.suffix` wildcard -> what it resolves to.
    pub names: BTreeMap<String, NameInfo>,
    /// Routing data for the data plane: per service host (same keys as `names`, which may
    /// lack a host that has no address), per port, the healthy endpoints. Absent in tables
    /// that only carry names; the DNS responder does not read it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, ServiceRoutes>,
    /// The client's own network (Istio's `ISTIO_META_NETWORK` / `topology.istio.io/network`);
    /// empty is the default network. An endpoint whose `network` differs from it is reached
    /// through one of that network's [`NameTable::gateways`], never directly.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    /// The client's locality (`region/zone/subzone`, Istio's `istio-locality` form); empty
    /// when unknown. Load balancing prefers endpoints whose locality shares the longest
    /// prefix with it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
    /// Per network, the east-west gateways that let other networks in (Istio's meshNetworks
    /// `gateways`, port 15443 by default). A network without one is unreachable from others:
    /// its endpoints are left out of cross-network routing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gateways: BTreeMap<String, Vec<Gateway>>,
}

/// An east-west gateway's address as seen from other networks: mutual TLS passes through it
/// untouched, routed by SNI `outbound_.PORT_._.HOST` (see `crate::traffic::sni`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    pub address: IpAddr,
    pub port: u16,
}

/// How to reach one service host: its VIPs and, per service port, the endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRoutes {
    /// The namespace of the ServiceEntry or Service that defines the host.
    pub namespace: String,
    pub registry: Registry,
    /// How the endpoints are used. Absent in tables from before the field existed, which
    /// only carried IP endpoints to balance over: [`Resolution::Static`].
    #[serde(default)]
    pub resolution: Resolution,
    /// The addresses clients dial (ClusterIPs, ServiceEntry addresses or allocated VIPs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<IpAddr>,
    pub ports: Vec<PortRoutes>,
}

/// A service's resolution, as Istio's `model.Resolution` derives it from a ServiceEntry's
/// `resolution` (or a Kubernetes Service's `clusterIP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Endpoints are addresses to balance over (STATIC, and Kubernetes Services with a
    /// ClusterIP).
    #[default]
    Static,
    /// Endpoints may be host names, to be resolved when connecting; every address of every
    /// endpoint is used (DNS). A DNS ServiceEntry without endpoints has the host itself as its
    /// one endpoint per port.
    Dns,
    /// As `Dns`, but only the first address a name resolves to is used (DNS_ROUND_ROBIN).
    DnsRoundRobin,
    /// No balancing: a connection goes to the address the client dialled (NONE, and headless
    /// Kubernetes Services). The endpoints are listed for information.
    None,
    /// A resolution a newer control plane sends that this version does not know; kept so
    /// that one new value does not make the whole table unreadable.
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRoutes {
    /// The service port clients dial.
    pub port: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Istio protocol name (`HTTP`, `TCP`, ...); empty when unset.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    /// Healthy endpoints only, sorted by address then port.
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// An IP, or a host name for DNS-resolved ServiceEntry endpoints.
    pub address: String,
    /// The port on the endpoint (after `targetPort` and the workload's named ports).
    pub port: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
    /// Load-balancing weight, at least 1.
    pub weight: u32,
    /// The workload's SPIFFE identity (`spiffe://TRUST_DOMAIN/ns/NS/sa/SA`) when it runs a
    /// sidecar that terminates mesh mTLS (Istio's `security.istio.io/tlsMode: istio`); the
    /// client verifies exactly this URI SAN. Empty: a plain endpoint, reached without TLS.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub identity: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NameInfo {
    pub ips: Vec<IpAddr>,
    pub registry: Registry,
    /// Kubernetes service name; with `namespace`, enables `name.ns`, `name.ns.svc` and (in the
    /// client's namespace) `name`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub shortname: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Registry {
    /// A Kubernetes Service: short forms apply.
    Kubernetes,
    /// A ServiceEntry host: matched exactly or by wildcard only.
    External,
}

fn default_domain() -> String {
    DEFAULT_DOMAIN.to_string()
}

#[cfg(feature = "native")]
impl NameTable {
    /// The table as JSON, with serde_json (native code; the filter never writes tables).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings, maps and IPs into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_allocation_ranges() {
        for (ip, auto) in [
            ("240.240.37.12", true),
            ("240.241.0.1", false),
            ("2001:2::250c", true),
            ("2001:2:1::1", false),
            ("2001:db8::1", false),
            ("10.96.0.10", false),
        ] {
            assert_eq!(is_auto_allocated(&ip.parse().unwrap()), auto, "{ip}");
        }
    }

    #[test]
    #[cfg(feature = "native")]
    fn tables_without_services_parse_and_serialize_without_the_field() {
        let old = br#"{"version":"1","namespace":"ns","names":{"a.example.com":{"ips":["10.0.0.1"],"registry":"External"}}}"#;
        let t: NameTable = serde_json::from_slice(old).unwrap();
        assert!(t.services.is_empty());
        assert!(!String::from_utf8(t.to_json()).unwrap().contains("services"));
    }

    #[test]
    #[cfg(feature = "native")]
    fn routes_without_a_resolution_are_static_and_unknown_resolutions_still_decode() {
        let old = br#"{"namespace":"ns","registry":"External","ports":[]}"#;
        let r: ServiceRoutes = serde_json::from_slice(old).unwrap();
        assert_eq!(r.resolution, Resolution::Static);
        let newer =
            br#"{"namespace":"ns","registry":"External","resolution":"DYNAMIC_DNS","ports":[]}"#;
        let r: ServiceRoutes = serde_json::from_slice(newer).unwrap();
        assert_eq!(r.resolution, Resolution::Unknown);
        let dns = br#"{"namespace":"ns","registry":"External","resolution":"DNS_ROUND_ROBIN","ports":[]}"#;
        let r: ServiceRoutes = serde_json::from_slice(dns).unwrap();
        assert_eq!(r.resolution, Resolution::DnsRoundRobin);
    }
}
