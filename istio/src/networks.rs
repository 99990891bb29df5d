//! Istio's meshNetworks: which east-west gateways let other networks into each network, in
//! the format istiod reads from its `meshNetworks` file (`--networksConfig`,
//! `/etc/istio/config/meshNetworks`):
//!
//! ```yaml
//! networks:
//!   network1:
//!     endpoints:
//!     - fromRegistry: Kubernetes
//!     gateways:
//!     - address: 198.18.1.10
//!       port: 15443
//! ```
//!
//! The control plane decodes the file (YAML or JSON) into [`MeshNetworks`] and turns it into
//! the tables' per-network gateway list with [`MeshNetworks::gateways`], which refuses what it
//! cannot route to rather than dropping it silently.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;
use vmesh_api::names::Gateway;
use vmesh_api::traffic::GATEWAY_PORT;

use super::validate::is_dns1123_subdomain;

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshNetworks {
    #[serde(default)]
    pub networks: BTreeMap<String, Network>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Network {
    /// Which endpoints belong to the network (`fromCidr` / `fromRegistry`). Read but not used:
    /// vmesh's endpoints carry their network themselves (a WorkloadEntry's `network`, which an
    /// auto-registered one takes from the VM's `ISTIO_META_NETWORK`).
    #[serde(default)]
    pub endpoints: Vec<NetworkEndpoints>,
    #[serde(default)]
    pub gateways: Vec<NetworkGateway>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkEndpoints {
    #[serde(default)]
    pub from_cidr: String,
    #[serde(default)]
    pub from_registry: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkGateway {
    /// The gateway's address as other networks reach it.
    #[serde(default)]
    pub address: String,
    /// A Service whose load-balancer address istiod looks up; vmesh has no such addresses.
    #[serde(default)]
    pub registry_service_name: String,
    /// 0 (unset): Istio's `tls` port, 15443.
    #[serde(default)]
    pub port: u32,
    #[serde(default)]
    pub locality: String,
}

/// Why a meshNetworks config cannot be used; each names the network and gateway (0-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworksError {
    #[error("networks.{network}: the name must be a lowercase RFC 1123 subdomain")]
    Name { network: String },
    #[error("networks.{network}.gateways[{index}]: registryServiceName is not supported (vmesh knows no load-balancer addresses); give the gateway's address")]
    RegistryService { network: String, index: usize },
    #[error("networks.{network}.gateways[{index}].address: {address:?} is not an IP address")]
    Address {
        network: String,
        index: usize,
        address: String,
    },
    #[error("networks.{network}.gateways[{index}].port: {port} is not a port")]
    Port {
        network: String,
        index: usize,
        port: u32,
    },
}

impl MeshNetworks {
    /// Per network, its gateways sorted and without duplicates; networks without gateways
    /// are left out (nothing from another network can reach them).
    pub fn gateways(&self) -> Result<BTreeMap<String, Vec<Gateway>>, NetworksError> {
        let mut out = BTreeMap::new();
        for (name, net) in &self.networks {
            if !is_dns1123_subdomain(name) {
                return Err(NetworksError::Name {
                    network: name.clone(),
                });
            }
            let mut gws = Vec::new();
            for (index, g) in net.gateways.iter().enumerate() {
                if !g.registry_service_name.is_empty() {
                    return Err(NetworksError::RegistryService {
                        network: name.clone(),
                        index,
                    });
                }
                let address: IpAddr = g.address.parse().map_err(|_| NetworksError::Address {
                    network: name.clone(),
                    index,
                    address: g.address.clone(),
                })?;
                let port = match g.port {
                    0 => GATEWAY_PORT,
                    p => u16::try_from(p).map_err(|_| NetworksError::Port {
                        network: name.clone(),
                        index,
                        port: p,
                    })?,
                };
                gws.push(Gateway { address, port });
            }
            gws.sort();
            gws.dedup();
            if !gws.is_empty() {
                out.insert(name.clone(), gws);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(json: &str) -> MeshNetworks {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn istio_mesh_networks_become_per_network_gateways() {
        let n = nets(
            r#"{"networks":{
                "network1":{"endpoints":[{"fromRegistry":"Kubernetes"}],
                            "gateways":[{"address":"198.18.1.10","port":15443},
                                        {"address":"198.18.1.9"},
                                        {"address":"198.18.1.10","port":15443}]},
                "vm-network":{"endpoints":[{"fromCidr":"198.19.0.0/16"}]}}}"#,
        );
        let g = n.gateways().unwrap();
        assert_eq!(g.len(), 1, "a network without gateways is left out");
        let addrs: Vec<String> = g["network1"]
            .iter()
            .map(|g| format!("{}:{}", g.address, g.port))
            .collect();
        assert_eq!(addrs, ["198.18.1.9:15443", "198.18.1.10:15443"]);
    }

    #[test]
    fn gateways_vmesh_cannot_route_to_are_refused_with_their_place() {
        let cases = [
            (
                r#"{"networks":{"n1":{"gateways":[{"registryServiceName":"istio-eastwestgateway.istio-system.svc.cluster.local","port":15443}]}}}"#,
                "networks.n1.gateways[0]: registryServiceName",
            ),
            (
                r#"{"networks":{"n1":{"gateways":[{"address":"198.18.1.1"},{"address":"gw.example.com"}]}}}"#,
                "networks.n1.gateways[1].address",
            ),
            (
                r#"{"networks":{"n1":{"gateways":[{"address":"198.18.1.1","port":70000}]}}}"#,
                "networks.n1.gateways[0].port",
            ),
            (
                r#"{"networks":{"Net_1":{"gateways":[{"address":"198.18.1.1"}]}}}"#,
                "networks.Net_1",
            ),
        ];
        for (json, place) in cases {
            let e = nets(json).gateways().unwrap_err().to_string();
            assert!(e.starts_with(place), "{e}");
        }
    }

    #[test]
    fn unknown_fields_are_refused_as_istio_s_schema_does() {
        assert!(
            serde_json::from_str::<MeshNetworks>(r#"{"networks":{"n":{"gatways":[]}}}"#).is_err()
        );
    }
}
