//! Mesh traffic: the names the filter, the Envoy configs (`envoy-configs/`) and the tests share
//! for routing connections, and Istio's SNI for a service port.
//!
//! The filter decides where a connection goes in `on_new_connection` and writes its decision as
//! `wasm.*` filter state (proxy-wasm `set_property`); `envoy.filters.network.set_filter_state`,
//! placed after it, copies those values into the objects Envoy's `tcp_proxy` and upstream TLS
//! read (verified on Envoy 1.40: `../shared/reference/envoy-1.40-experiments/q7-*.yaml`):
//!
//! | the filter writes          | copied into                                         |
//! |----------------------------|-----------------------------------------------------|
//! | [`state::CLUSTER`]         | `envoy.tcp_proxy.cluster`                           |
//! | [`state::UPSTREAM`]        | `envoy.network.transport_socket.original_dst_address` |
//! | [`state::SNI`]             | `envoy.network.upstream_server_name`                |
//! | [`state::SAN`]             | `envoy.network.upstream_subject_alt_names`          |
//! | [`state::DYNAMIC_HOST`]    | `envoy.upstream.dynamic_host`                       |
//! | [`state::DYNAMIC_PORT`]    | `envoy.upstream.dynamic_port`                       |

/// The roots of the one `.wasm` that handle traffic (the DNS and agent roots are elsewhere).
pub mod roots {
    /// The VM's outbound listener (15001): original destination -> service -> endpoint.
    pub const OUTBOUND: &str = "vmesh_outbound";
    /// The VM's inbound listener (15006): counts what arrives for the local app.
    pub const INBOUND: &str = "vmesh_inbound";
    /// The east-west gateway (15443): SNI `outbound_.PORT_._.HOST` -> an endpoint in its network.
    pub const GATEWAY: &str = "vmesh_gateway";
}

/// Filter-state names the filter writes with `set_property`; Envoy sees them as `wasm.NAME`
/// (`%FILTER_STATE(wasm.NAME:PLAIN)%` in a format string).
pub mod state {
    /// Which cluster `tcp_proxy` uses: one of [`super::clusters`].
    pub const CLUSTER: &str = "vmesh_cluster";
    /// `IP:PORT` (`[IPv6]:PORT`) the connection goes to.
    pub const UPSTREAM: &str = "vmesh_upstream";
    /// The SNI of the upstream TLS handshake (mesh mTLS only).
    pub const SNI: &str = "vmesh_sni";
    /// The URI SAN the upstream certificate must carry (mesh mTLS only).
    pub const SAN: &str = "vmesh_san";
    /// The host name [`super::clusters::DNS_FORWARD`] resolves (DNS-resolved services); for
    /// other decisions the upstream IP, which no other cluster reads.
    pub const DYNAMIC_HOST: &str = "vmesh_dynamic_host";
    /// The port that goes with [`DYNAMIC_HOST`].
    pub const DYNAMIC_PORT: &str = "vmesh_dynamic_port";
}

/// The clusters a filter decision names (every Envoy config that loads a traffic root defines
/// the ones that root can choose).
pub mod clusters {
    /// ORIGINAL_DST with the workload certificate (SDS) as upstream mTLS: mesh endpoints, and
    /// other networks' gateways.
    pub const MESH_MTLS: &str = "vmesh_mesh_mtls";
    /// ORIGINAL_DST in plain TCP: destinations outside the mesh (unchanged), endpoints
    /// without a sidecar, and the gateway's pass-through of TLS it does not terminate.
    pub const PASSTHROUGH: &str = "vmesh_passthrough";
    /// Dynamic forward proxy in plain TCP: endpoints of `resolution: DNS` services, which are
    /// host names that Envoy resolves when connecting.
    pub const DNS_FORWARD: &str = "vmesh_dns_forward";
    /// A cluster without endpoints: a known service with no endpoint this client can reach
    /// (Envoy closes the connection at once, as Istio's empty cluster does).
    pub const NO_ENDPOINT: &str = "vmesh_no_endpoint";
}

/// The per-service-port stat the outbound filter keeps, without Envoy's `wasmcustom.` prefix:
/// `vmesh_outbound_HOST_PORT_WHAT` (`WHAT`: `cx_total`, `cx_failed`, `bytes_sent`,
/// `bytes_received`).
pub fn outbound_stat(host: &str, port: u16, what: &str) -> String {
    format!("vmesh_outbound_{host}_{port}_{what}")
}

/// The port east-west gateways listen on for mesh mTLS (Istio's `tls` port, AUTO_PASSTHROUGH).
pub const GATEWAY_PORT: u16 = 15443;

/// The SNI Istio gives a service port, `outbound_.PORT_._.HOST` (with a subset:
/// `outbound_.PORT_.SUBSET_.HOST`), which east-west gateways route by.
pub fn sni(port: u16, host: &str) -> String {
    format!("outbound_.{port}_._.{host}")
}

/// A parsed [`sni`]: the service port, the subset (empty for `_`) and the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceSni<'a> {
    pub port: u16,
    pub subset: &'a str,
    pub host: &'a str,
}

/// Reads an SNI of the [`sni`] form; `None` for anything else (a gateway passes nothing it
/// cannot place). The host is returned as written; callers compare it case-insensitively.
pub fn parse_sni(sni: &str) -> Option<ServiceSni<'_>> {
    let rest = sni.strip_prefix("outbound_.")?;
    let (port, rest) = rest.split_once("_.")?;
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let (subset, host) = rest.split_once("_.")?;
    let subset = if subset == "_" { "" } else { subset };
    if host.is_empty() || subset.contains('.') {
        return None;
    }
    Some(ServiceSni { port, subset, host })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_round_trips_as_istio_writes_it() {
        let s = sni(80, "vmservice.example.com");
        assert_eq!(s, "outbound_.80_._.vmservice.example.com");
        assert_eq!(
            parse_sni(&s),
            Some(ServiceSni {
                port: 80,
                subset: "",
                host: "vmservice.example.com"
            })
        );
    }

    #[test]
    fn sni_with_a_subset_and_hosts_with_underscores() {
        assert_eq!(
            parse_sni("outbound_.9080_.v1_.reviews.default.svc.cluster.local"),
            Some(ServiceSni {
                port: 9080,
                subset: "v1",
                host: "reviews.default.svc.cluster.local"
            })
        );
        assert_eq!(
            parse_sni("outbound_.53_._._dns.example.com").map(|s| s.host),
            Some("_dns.example.com")
        );
    }

    #[test]
    fn other_snis_are_not_service_snis() {
        for bad in [
            "",
            "vmservice.example.com",
            "outbound_.",
            "outbound_.80_._.",
            "outbound_._._.host",
            "outbound_.0_._.host",
            "outbound_.65536_._.host",
            "outbound_.+80_._.host",
            "outbound_.80_.a.b_.host",
            "inbound_.80_._.host",
            "outbound_.80.host",
        ] {
            assert_eq!(parse_sni(bad), None, "{bad:?}");
        }
    }
}
