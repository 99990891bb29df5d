//! Mesh routing: where a connection goes, from the routing part of the name table
//! (`services`, `network`, `locality`, `gateways`; `vmesh_api::names`).
//!
//! The agent reads the table once ([`RouteIndex::from_json`], the serde-free reader) and
//! publishes a compact binary image ([`RouteIndex::image`]); each worker rebuilds the index from
//! it ([`RouteIndex::from_image`]). Compiling does all the work that does not depend on the
//! connection: per service port, the endpoints this client can reach (its own network directly,
//! other networks through their gateways, nothing in a network without one), kept only in the
//! best locality, with cumulative weights. A lookup is then one hash probe and one binary search
//! over the weights.
//!
//! Two lookups: by the connection's original destination ([`RouteIndex::outbound`], the VM's
//! outbound listener) and by service host and port ([`RouteIndex::by_host`], what an east-west
//! gateway routes SNI with).
//!
//! Decisions ([`Decision`]) name the clusters of `vmesh_api::traffic::clusters`:
//! - an endpoint with an identity (a sidecar): `MESH_MTLS` to it, SNI `outbound_.PORT_._.HOST`
//!   (as Istio sets it also for direct mTLS), SAN its identity;
//! - an endpoint in another network: `MESH_MTLS` to that network's gateway, same SNI and SAN
//!   (the gateway passes the TLS through to an endpoint of its choice, so the SAN holds when a
//!   service's endpoints in one network share an identity, as replicas of a WorkloadGroup do);
//!   endpoints without an identity there are unreachable (no SNI to route by) and skipped;
//! - an endpoint without an identity: `PASSTHROUGH` to it, plain TCP;
//! - `resolution: DNS` / `DNS_ROUND_ROBIN`: endpoints that are host names go to `DNS_FORWARD`
//!   (Envoy resolves them when connecting; plain TCP, as DNS services are outside the mesh);
//! - `resolution: NONE`: to the original destination, in mTLS when it is one of the service's
//!   endpoints with an identity in this network, else untouched;
//! - a known service with no reachable endpoint: `NO_ENDPOINT` (Envoy closes at once);
//! - anything else (no table, unknown destination, a resolution this version does not know):
//!   `PASSTHROUGH` to the original destination, untouched.

mod image;
mod parse;

use std::net::{IpAddr, SocketAddr};

use vmesh_api::names::{Endpoint, Gateway, Resolution, ServiceRoutes};
use vmesh_api::traffic::{clusters, sni};

pub use parse::RouteTable;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("routing table is not valid JSON of the expected shape: {0}")]
    Json(#[from] crate::json::JsonError),
    #[error("service {host:?}: {reason}")]
    InvalidService { host: String, reason: String },
    #[error("gateway of network {network:?}: {reason}")]
    InvalidGateway {
        network: String,
        reason: &'static str,
    },
    #[error("routing table too large")]
    TooLarge,
    #[error("routing table image is corrupt: {0}")]
    BadImage(&'static str),
}

/// Where one connection goes: the values the filter writes as `wasm.*` filter state
/// (`vmesh_api::traffic::state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// One of `vmesh_api::traffic::clusters`.
    pub cluster: &'static str,
    /// `IP:PORT` or `[IPv6]:PORT`; for [`clusters::DNS_FORWARD`] `HOST:PORT`.
    pub upstream: String,
    /// What the dynamic forward proxy resolves: the host name for DNS endpoints, else the IP.
    pub dynamic_host: String,
    pub dynamic_port: u16,
    /// Upstream SNI; empty unless the cluster is [`clusters::MESH_MTLS`].
    pub sni: String,
    /// The URI SAN the upstream must present; empty unless mTLS.
    pub san: String,
    /// The service port the connection was counted under ([`RouteIndex::service_port`]);
    /// `None` for destinations outside the table.
    pub service: Option<u32>,
}

impl Decision {
    /// The original destination, untouched.
    pub fn passthrough(dst: SocketAddr) -> Self {
        Decision {
            cluster: clusters::PASSTHROUGH,
            upstream: dst.to_string(),
            dynamic_host: dst.ip().to_string(),
            dynamic_port: dst.port(),
            sni: String::new(),
            san: String::new(),
            service: None,
        }
    }

    fn to_ip(addr: SocketAddr, mtls: Option<(&str, &str)>, service: u32) -> Self {
        let (cluster, sni, san) = match mtls {
            Some((sni, san)) => (clusters::MESH_MTLS, sni.to_string(), san.to_string()),
            None => (clusters::PASSTHROUGH, String::new(), String::new()),
        };
        Decision {
            cluster,
            upstream: addr.to_string(),
            dynamic_host: addr.ip().to_string(),
            dynamic_port: addr.port(),
            sni,
            san,
            service: Some(service),
        }
    }
}

/// The compiled routing table.
#[derive(Debug, Clone)]
pub struct RouteIndex {
    table: RouteTable,
    ports: Vec<PortIndex>,
    /// Sorted by key, looked up by binary search: sorted vectors cost the `.wasm` far less
    /// code than hash maps and are as quick at these sizes.
    /// Both lookups in one vector, so one sort is compiled in.
    keys: Vec<(Key, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Addr(IpAddr, u16),
    /// Lower-case host, port.
    Host(String, u16),
}

/// One service port, ready to choose from.
#[derive(Debug, Clone)]
struct PortIndex {
    host: String,
    port: u16,
    resolution: Resolution,
    sni: String,
    /// Reachable endpoints in the best locality, any network.
    all: Pick,
    /// Endpoints in the client's own network only (a gateway routes only there).
    local: Pick,
    /// `resolution: NONE`: endpoint IP -> identity, for endpoints in this network.
    none_identities: Vec<(IpAddr, String)>,
}

#[derive(Debug, Clone, Default)]
struct Pick {
    targets: Vec<Target>,
    /// Running sum of weights: `targets[i]` owns `[cum[i-1], cum[i])`.
    cum: Vec<u64>,
}

#[derive(Debug, Clone)]
struct Target {
    to: To,
    identity: String,
}

#[derive(Debug, Clone)]
enum To {
    Ip(SocketAddr),
    Name(String, u16),
    /// Another network's gateways; one is chosen per connection.
    Gateways(Vec<SocketAddr>),
}

impl RouteIndex {
    pub fn from_json(json: &[u8]) -> Result<Self, RouteError> {
        Self::compile(RouteTable::from_json(json)?)
    }

    /// The image another VM rebuilds this index from.
    pub fn image(&self) -> Vec<u8> {
        image::encode(&self.table)
    }

    pub fn from_image(bytes: &[u8]) -> Result<Self, RouteError> {
        Self::compile(image::decode(bytes)?)
    }

    pub fn version(&self) -> &str {
        &self.table.version
    }

    /// Service ports in the table.
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// A counted service port: its host and port (for per-service stats).
    pub fn service_port(&self, id: u32) -> Option<(&str, u16)> {
        let p = self.ports.get(id as usize)?;
        Some((p.host.as_str(), p.port))
    }

    pub fn compile(table: RouteTable) -> Result<Self, RouteError> {
        table.validate()?;
        let mut ports = Vec::new();
        let mut keys = Vec::new();
        for (host, svc) in &table.services {
            for pr in &svc.ports {
                let id = u32::try_from(ports.len()).map_err(|_| RouteError::TooLarge)?;
                let reachable = |local_only: bool| {
                    pr.endpoints
                        .iter()
                        .filter_map(|e| reach(&table, svc.resolution, e, local_only))
                        .collect::<Vec<_>>()
                };
                let mut none_identities = Vec::new();
                if svc.resolution == Resolution::None {
                    for e in &pr.endpoints {
                        if let (Ok(ip), true) =
                            (e.address.parse::<IpAddr>(), e.network == table.network)
                        {
                            none_identities.push((ip, e.identity.clone()));
                            keys.push((Key::Addr(ip, pr.port), id));
                        }
                    }
                }
                for vip in &svc.vips {
                    keys.push((Key::Addr(*vip, pr.port), id));
                }
                keys.push((Key::Host(host.to_ascii_lowercase(), pr.port), id));
                ports.push(PortIndex {
                    host: host.clone(),
                    port: pr.port,
                    resolution: svc.resolution,
                    sni: sni(pr.port, host),
                    all: best_locality(&table.locality, reachable(false)),
                    local: best_locality(&table.locality, reachable(true)),
                    none_identities,
                });
            }
        }
        // Two services on one address and port (or one host in two cases): the first host in
        // the table's order keeps it (a stable sort keeps insertion order among equals).
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        keys.dedup_by(|later, first| later.0 == first.0);
        Ok(RouteIndex { table, ports, keys })
    }

    /// The VM's outbound decision for a connection to `dst` (its original destination).
    /// `rand` is a uniformly random number; the same `rand` gives the same choice.
    pub fn outbound(&self, dst: SocketAddr, rand: u64) -> Decision {
        let key = Key::Addr(dst.ip(), dst.port());
        let Some(id) = find(&self.keys, |k| k.cmp(&key)) else {
            return Decision::passthrough(dst);
        };
        let Some(p) = self.ports.get(id as usize) else {
            return Decision::passthrough(dst);
        };
        match p.resolution {
            Resolution::Unknown => Decision::passthrough(dst),
            Resolution::None => match p.none_identities.iter().find(|(ip, _)| *ip == dst.ip()) {
                Some((_, identity)) if !identity.is_empty() => {
                    Decision::to_ip(dst, Some((&p.sni, identity)), id)
                }
                _ => Decision::to_ip(dst, None, id),
            },
            Resolution::Static | Resolution::Dns | Resolution::DnsRoundRobin => {
                p.choose(&p.all, rand, id)
            }
        }
    }

    /// The decision for service `host` (case-insensitive) and port among endpoints in the
    /// client's own network only (what an east-west gateway forwards to); `None` for a host and
    /// port not in the table.
    pub fn by_host(&self, host: &str, port: u16, rand: u64) -> Option<Decision> {
        let id = find(&self.keys, |k| match k {
            Key::Addr(..) => std::cmp::Ordering::Less,
            Key::Host(h, p) => cmp_ignore_case(h, host).then(p.cmp(&port)),
        })?;
        let p = self.ports.get(id as usize)?;
        Some(p.choose(&p.local, rand, id))
    }
}

impl PortIndex {
    fn choose(&self, pick: &Pick, rand: u64, id: u32) -> Decision {
        let no_endpoint = || Decision {
            cluster: clusters::NO_ENDPOINT,
            upstream: String::new(),
            dynamic_host: String::new(),
            dynamic_port: 0,
            sni: String::new(),
            san: String::new(),
            service: Some(id),
        };
        let Some(&total) = pick.cum.last() else {
            return no_endpoint();
        };
        if total == 0 {
            return no_endpoint();
        }
        let r = rand % total;
        // The first target whose running sum passes r.
        let i = pick.cum.partition_point(|&c| c <= r);
        let Some(t) = pick.targets.get(i) else {
            return no_endpoint();
        };
        let mtls = (!t.identity.is_empty()).then_some((self.sni.as_str(), t.identity.as_str()));
        match &t.to {
            To::Ip(addr) => Decision::to_ip(*addr, mtls, id),
            To::Gateways(gws) => {
                // The high bits: the low ones chose the endpoint.
                let n = gws.len().max(1) as u64;
                let g = usize::try_from((rand >> 32) % n).unwrap_or(0);
                match gws.get(g) {
                    Some(gw) => Decision::to_ip(*gw, mtls, id),
                    None => no_endpoint(),
                }
            }
            To::Name(name, port) => Decision {
                cluster: clusters::DNS_FORWARD,
                upstream: format!("{name}:{port}"),
                dynamic_host: name.clone(),
                dynamic_port: *port,
                sni: String::new(),
                san: String::new(),
                service: Some(id),
            },
        }
    }
}

fn find<K>(sorted: &[(K, u32)], cmp: impl Fn(&K) -> std::cmp::Ordering) -> Option<u32> {
    let i = sorted.binary_search_by(|(k, _)| cmp(k)).ok()?;
    sorted.get(i).map(|(_, id)| *id)
}

/// Compares a lower-case key with a host as written, without allocating per lookup.
fn cmp_ignore_case(lower: &str, host: &str) -> std::cmp::Ordering {
    lower
        .bytes()
        .cmp(host.bytes().map(|b| b.to_ascii_lowercase()))
}

/// How this client reaches endpoint `e`, if it can, with its locality and weight.
fn reach(
    table: &RouteTable,
    resolution: Resolution,
    e: &Endpoint,
    local_only: bool,
) -> Option<(Target, String, u32)> {
    let to = if e.network == table.network {
        match e.address.parse::<IpAddr>() {
            Ok(ip) => To::Ip(SocketAddr::new(ip, e.port)),
            // Validation lets names through only for DNS resolutions.
            Err(_) => To::Name(e.address.clone(), e.port),
        }
    } else {
        if local_only || e.identity.is_empty() || resolution == Resolution::None {
            return None;
        }
        let gws: Vec<SocketAddr> = table
            .gateways
            .iter()
            .find(|(n, _)| *n == e.network)
            .map(|(_, g)| {
                g.iter()
                    .map(|g| SocketAddr::new(g.address, g.port))
                    .collect()
            })
            .unwrap_or_default();
        if gws.is_empty() {
            return None;
        }
        To::Gateways(gws)
    };
    // Plain TCP to DNS-resolved names: the dynamic forward proxy cluster has no mesh TLS.
    let identity = match to {
        To::Name(..) => String::new(),
        _ => e.identity.clone(),
    };
    Some((Target { to, identity }, e.locality.clone(), e.weight))
}

/// How closely an endpoint's locality matches the client's, Istio's failover order: 0 for the
/// same region/zone/subzone, 1 same zone, 2 same region, 3 none (or the client's is unknown:
/// then every endpoint is 0).
fn priority(client: &str, endpoint: &str) -> u8 {
    if client.is_empty() {
        return 0;
    }
    let mut c = client.split('/');
    let mut e = endpoint.split('/');
    let mut matched = 0u8;
    for _ in 0..3 {
        match (c.next(), e.next()) {
            (Some(a), Some(b)) if a == b => matched += 1,
            // A client locality without a subzone matches any subzone of its zone.
            (None, _) => matched += 1,
            _ => break,
        }
    }
    3 - matched
}

/// Keeps the reachable endpoints of the best locality present (the table holds only healthy
/// ones, so Istio's failover goes to the next level only when a level is empty).
fn best_locality(client: &str, reachable: Vec<(Target, String, u32)>) -> Pick {
    let best = reachable
        .iter()
        .map(|(_, loc, _)| priority(client, loc))
        .min();
    let mut pick = Pick::default();
    let mut sum = 0u64;
    for (t, loc, w) in reachable {
        if Some(priority(client, &loc)) != best {
            continue;
        }
        sum = sum.saturating_add(u64::from(w));
        pick.targets.push(t);
        pick.cum.push(sum);
    }
    pick
}

impl RouteTable {
    fn validate(&self) -> Result<(), RouteError> {
        for (network, gws) in &self.gateways {
            for g in gws {
                if g.port == 0 {
                    return Err(RouteError::InvalidGateway {
                        network: network.clone(),
                        reason: "port 0",
                    });
                }
            }
        }
        for (host, svc) in &self.services {
            let bad = |reason: String| RouteError::InvalidService {
                host: host.clone(),
                reason,
            };
            if host.is_empty() || host.len() > 253 {
                return Err(bad("host name empty or longer than 253".into()));
            }
            for p in &svc.ports {
                if p.port == 0 {
                    return Err(bad("service port 0".into()));
                }
                for e in &p.endpoints {
                    if e.port == 0 {
                        return Err(bad(format!("endpoint {} has port 0", e.address)));
                    }
                    if e.weight == 0 {
                        return Err(bad(format!("endpoint {} has weight 0", e.address)));
                    }
                    let named = e.address.parse::<IpAddr>().is_err();
                    let dns = matches!(svc.resolution, Resolution::Dns | Resolution::DnsRoundRobin);
                    if named && !dns {
                        return Err(bad(format!(
                            "endpoint {:?} is not an IP address (only DNS resolutions take host names)",
                            e.address
                        )));
                    }
                    if named && crate::names::canonical_host(&e.address, false).is_err() {
                        return Err(bad(format!("endpoint {:?} is not a host name", e.address)));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The pieces of [`RouteTable`] the codec shares: (key, value) in the document's order. A
/// key given twice: the first one counts (lookups keep the first).
type Services = Vec<(String, ServiceRoutes)>;
type Gateways = Vec<(String, Vec<Gateway>)>;

#[cfg(test)]
mod tests;
