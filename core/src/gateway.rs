//! The east-west gateway's decision: a connection's SNI (`outbound_.PORT_._.HOST`, read by
//! Envoy's TLS inspector) -> an endpoint of that service port in the gateway's own network ->
//! plain TCP to it, the client's TLS passed through untouched (Istio's `AUTO_PASSTHROUGH`).
//!
//! The endpoint is chosen by [`RouteIndex::by_host`] (the gateway's table carries its own
//! network, so "local" means the gateway's network), with the same weights and locality
//! preference as a VM's outbound choice. The gateway terminates no TLS, so where a VM would
//! open mTLS to a sidecar the gateway opens plain TCP and the client's handshake goes through;
//! the client checked the SAN it expects, the sidecar checks the client's certificate.

use crate::routes::{Decision, RouteIndex};
use vmesh_api::traffic::{clusters, parse_sni};

/// Why the gateway closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No SNI, or not one of Istio's service SNIs (or one with a subset: vmesh has none).
    UnknownSni,
    /// The gateway has no table yet.
    NoTable,
    /// The table has no such service port.
    UnknownService,
    /// The service port has no endpoint in the gateway's network.
    NoEndpoint,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownSni => "unknown_sni",
            Refusal::NoTable => "no_table",
            Refusal::UnknownService => "unknown_service",
            Refusal::NoEndpoint => "no_endpoint",
        }
    }
}

/// Where a connection with `sni` goes, or why it is closed. `rand` is a uniformly random
/// number (the same `rand`, the same choice).
pub fn route(index: Option<&RouteIndex>, sni: &str, rand: u64) -> Result<Decision, Refusal> {
    let s = parse_sni(sni).ok_or(Refusal::UnknownSni)?;
    if !s.subset.is_empty() {
        return Err(Refusal::UnknownSni);
    }
    let index = index.ok_or(Refusal::NoTable)?;
    let mut d = index
        .by_host(s.host, s.port, rand)
        .ok_or(Refusal::UnknownService)?;
    // Host-name endpoints (`resolution: DNS`) are outside the mesh: no sidecar to carry TLS
    // to, and the gateway config has no resolving cluster.
    if d.cluster == clusters::NO_ENDPOINT || d.cluster == clusters::DNS_FORWARD {
        return Err(Refusal::NoEndpoint);
    }
    if d.cluster == clusters::MESH_MTLS {
        // The TLS is the client's, end to end: the gateway only carries it.
        d.cluster = clusters::PASSTHROUGH;
        d.sni.clear();
        d.san.clear();
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use vmesh_api::names::{
        Endpoint, Gateway, NameTable, PortRoutes, Registry, Resolution, ServiceRoutes,
    };

    use super::*;

    const ID: &str = "spiffe://cluster.local/ns/vm-services/sa/my-vm";

    fn ep(address: &str, network: &str, identity: &str) -> Endpoint {
        Endpoint {
            address: address.into(),
            port: 9090,
            network: network.into(),
            locality: String::new(),
            weight: 1,
            identity: identity.into(),
        }
    }

    fn index(endpoints: Vec<Endpoint>) -> RouteIndex {
        let mut services = BTreeMap::new();
        services.insert(
            "vmservice.example.com".to_string(),
            ServiceRoutes {
                namespace: "vm-services".into(),
                registry: Registry::External,
                resolution: Resolution::Static,
                vips: vec!["240.240.0.1".parse().unwrap()],
                ports: vec![PortRoutes {
                    port: 80,
                    name: "http".into(),
                    protocol: "HTTP".into(),
                    endpoints,
                }],
            },
        );
        let t = NameTable {
            version: "1".into(),
            namespace: "istio-system".into(),
            domain: "cluster.local".into(),
            search_domains: vec![],
            names: BTreeMap::new(),
            services,
            network: "network1".into(),
            locality: String::new(),
            gateways: [(
                "network2".to_string(),
                vec![Gateway {
                    address: "198.18.2.10".parse().unwrap(),
                    port: 15443,
                }],
            )]
            .into(),
        };
        RouteIndex::from_json(&serde_json::to_vec(&t).unwrap()).unwrap()
    }

    #[test]
    fn a_service_sni_goes_to_an_endpoint_of_the_gateway_s_network_in_plain_tcp() {
        let i = index(vec![
            ep("198.18.1.5", "network1", ID),
            ep("198.18.2.5", "network2", ID),
        ]);
        for rand in 0..16 {
            let d = route(Some(&i), "outbound_.80_._.vmservice.example.com", rand << 7).unwrap();
            assert_eq!(d.cluster, clusters::PASSTHROUGH);
            assert_eq!(
                d.upstream, "198.18.1.5:9090",
                "never another network's endpoint"
            );
            assert!(d.sni.is_empty() && d.san.is_empty(), "TLS untouched");
        }
        let d = route(Some(&i), "outbound_.80_._.VMService.Example.com", 3).unwrap();
        assert_eq!(
            d.upstream, "198.18.1.5:9090",
            "hosts compare case-insensitively"
        );
    }

    #[test]
    fn what_the_gateway_cannot_place_is_refused_with_the_reason() {
        let only_remote = index(vec![ep("198.18.2.5", "network2", ID)]);
        let local = index(vec![ep("198.18.1.5", "network1", "")]);
        for (i, sni, want) in [
            (Some(&local), "", Refusal::UnknownSni),
            (Some(&local), "vmservice.example.com", Refusal::UnknownSni),
            (
                Some(&local),
                "outbound_.80_.v1_.vmservice.example.com",
                Refusal::UnknownSni,
            ),
            (
                None,
                "outbound_.80_._.vmservice.example.com",
                Refusal::NoTable,
            ),
            (
                Some(&local),
                "outbound_.81_._.vmservice.example.com",
                Refusal::UnknownService,
            ),
            (
                Some(&local),
                "outbound_.80_._.other.example.com",
                Refusal::UnknownService,
            ),
            (
                Some(&only_remote),
                "outbound_.80_._.vmservice.example.com",
                Refusal::NoEndpoint,
            ),
        ] {
            assert_eq!(route(i, sni, 1).unwrap_err(), want, "{sni:?}");
        }
        // A plain endpoint in the gateway's network is reachable too (the client's bytes,
        // whatever they are, pass through).
        let d = route(Some(&local), "outbound_.80_._.vmservice.example.com", 1).unwrap();
        assert_eq!(d.upstream, "198.18.1.5:9090");
    }
}
