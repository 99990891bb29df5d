//! Istio's side of loading `vmesh_filter.wasm`, without Istio: its CRD schemas' checks (the
//! pinned npm package under `tests/schemas/`, [`schema`]), and a stand-in for the part of
//! istiod that turns an EnvoyFilter ([`envoyfilter`]) and a WasmPlugin ([`wasmplugin`]) into a
//! proxy's Envoy config. istiod cannot run here (it needs Kubernetes), so this stand-in is the
//! one piece of these tests that is not the real thing; everything after it is (Envoy 1.40's own `--mode validate`, a running
//! Envoy with the built `.wasm`, the real shim).
//!
//! The stand-in's modules are pure: JSON values in, JSON values or typed errors out. Reading
//! the files and relocating a config onto per-test ports is [`load`]'s; [`schema`] runs node
//! and tsc on the installed package.

pub mod envoyfilter;
pub mod load;
pub mod schema;
pub mod wasmplugin;

/// Which kind of Istio proxy a config belongs to: it decides which patch contexts match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    Sidecar,
    Gateway,
}

/// The context a listener or cluster is generated in, as an EnvoyFilter's `match.context`
/// names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchContext {
    SidecarInbound,
    SidecarOutbound,
    Gateway,
}

impl PatchContext {
    pub fn name(self) -> &'static str {
        match self {
            PatchContext::SidecarInbound => "SIDECAR_INBOUND",
            PatchContext::SidecarOutbound => "SIDECAR_OUTBOUND",
            PatchContext::Gateway => "GATEWAY",
        }
    }

    /// Whether a patch's `match.context` (absent: `ANY`) selects this context.
    pub fn selected_by(self, wanted: Option<&str>) -> bool {
        match wanted {
            None | Some("ANY") => true,
            Some(w) => w == self.name(),
        }
    }

    /// The context of a listener istiod generated: a sidecar's `virtualInbound` (traffic
    /// direction INBOUND) is inbound, the rest outbound; every gateway listener is GATEWAY.
    /// `None` for the bootstrap's own listeners (they have no name in Istio's template): Istio
    /// patches only what it sends over LDS.
    pub fn of_listener(kind: ProxyKind, listener: &serde_json::Value) -> Option<PatchContext> {
        listener.get("name")?;
        Some(match kind {
            ProxyKind::Gateway => PatchContext::Gateway,
            ProxyKind::Sidecar => {
                if listener.get("traffic_direction").and_then(|d| d.as_str()) == Some("INBOUND") {
                    PatchContext::SidecarInbound
                } else {
                    PatchContext::SidecarOutbound
                }
            }
        })
    }

    /// The context clusters are added in: the proxy's outbound one.
    pub fn of_added_cluster(kind: ProxyKind) -> PatchContext {
        match kind {
            ProxyKind::Sidecar => PatchContext::SidecarOutbound,
            ProxyKind::Gateway => PatchContext::Gateway,
        }
    }
}

/// A listener's port (`address.socket_address.port_value`), if it has one.
pub fn listener_port(listener: &serde_json::Value) -> Option<u64> {
    listener
        .pointer("/address/socket_address/port_value")
        .and_then(|p| p.as_u64())
}
