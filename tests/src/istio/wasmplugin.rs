//! A WasmPlugin turned into the network filter istiod puts in a proxy's filter chains (Istio's
//! `model/extensions.go` and `networking/core/networkfilter.go`), for `type: NETWORK`.
//!
//! istiod sends the filter through ECDS (`config_discovery`) and pilot-agent rewrites its code
//! source to a local file; with no xDS server here the stand-in writes the resolved filter
//! inline, as the config_dump shows it once ECDS has delivered it:
//! `envoy.filters.network.wasm` named `NAMESPACE.NAME`, `root_id` = `pluginName`, the
//! `pluginConfig` as JSON in a `google.protobuf.StringValue`, a VM with the V8 runtime, the
//! module, no `vm_id` (Istio sets none) and the `ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION`
//! variable, and `failStrategy` as the failure policy.
//!
//! Where: in every TCP or HTTP filter chain of the listeners the plugin's `match` selects
//! (`mode` CLIENT: a sidecar's outbound listeners; SERVER: its `virtualInbound`; gateways take
//! both; `ports`: the listener's port or the chain's `destination_port`), in phase order
//! (AUTHN, AUTHZ, then Istio's RBAC, STATS, UNSPECIFIED, then the terminal `tcp_proxy` or
//! `http_connection_manager`), and within a phase by descending `priority`. Istio may leave
//! its catch-all chains out; the stand-in puts the filter in them too, which only adds places
//! where the filter must work beside Istio's.
//!
//! Refused, not guessed ([`WasmPluginError::Unsupported`]): `type: HTTP`, URLs other than
//! `file://` (pilot-agent would download them), `targetRefs`.

use serde_json::{json, Value};

use super::{listener_port, PatchContext, ProxyKind};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WasmPluginError {
    #[error("not a WasmPlugin (extensions.istio.io/v1alpha1): {0}")]
    NotAWasmPlugin(String),
    #[error("{field}: {value:?} is not simulated")]
    Unsupported { field: &'static str, value: String },
    #[error("{field}: {reason}")]
    Malformed { field: &'static str, reason: String },
    #[error("the Envoy config has no {0}")]
    ConfigShape(&'static str),
}

const RESOURCE_VERSION_ENV: &str = "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION";

/// The filter a WasmPlugin becomes, and where it goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    pub filter: Value,
    /// Order among the filters of a chain ([`rank`]).
    pub rank: u8,
    pub priority: i64,
    /// The listener contexts its `match.mode` selects.
    pub modes: Vec<&'static str>,
    pub ports: Vec<u64>,
}

/// Where a filter sorts in a chain: Istio's phases and its own filters between them.
fn rank(name: &str) -> u8 {
    match name {
        "AUTHN" => 10,
        "AUTHZ" => 20,
        "envoy.filters.network.rbac" => 25,
        "STATS" => 30,
        "UNSPECIFIED_PHASE" => 40,
        "envoy.filters.network.tcp_proxy" | "envoy.filters.network.http_connection_manager" => 90,
        _ => 0,
    }
}

/// Translates one WasmPlugin.
pub fn translate(plugin: &Value) -> Result<Translated, WasmPluginError> {
    let api = plugin.get("apiVersion").and_then(Value::as_str);
    let kind = plugin.get("kind").and_then(Value::as_str);
    if api != Some("extensions.istio.io/v1alpha1") || kind != Some("WasmPlugin") {
        return Err(WasmPluginError::NotAWasmPlugin(format!(
            "apiVersion {api:?}, kind {kind:?}"
        )));
    }
    let meta = |f: &str| {
        plugin
            .pointer(&format!("/metadata/{f}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let spec = plugin
        .get("spec")
        .ok_or_else(|| WasmPluginError::NotAWasmPlugin("no spec".into()))?;
    let s = |f: &str| spec.get(f).and_then(Value::as_str);
    match s("type") {
        Some("NETWORK") => {}
        other => {
            return Err(WasmPluginError::Unsupported {
                field: "type",
                value: other.unwrap_or("HTTP (the default)").to_string(),
            })
        }
    }
    if spec.get("targetRefs").is_some() || spec.get("targetRef").is_some() {
        return Err(WasmPluginError::Unsupported {
            field: "targetRefs",
            value: "set".into(),
        });
    }
    let url = s("url").ok_or(WasmPluginError::Malformed {
        field: "url",
        reason: "missing".into(),
    })?;
    let file = url
        .strip_prefix("file://")
        .ok_or(WasmPluginError::Unsupported {
            field: "url",
            value: url.to_string(),
        })?;
    let name = format!("{}.{}", meta("namespace"), meta("name"));
    let mut config = json!({
        "name": name,
        "root_id": s("pluginName").unwrap_or_default(),
        "vm_config": {
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": file}},
            "environment_variables": {"key_values": {RESOURCE_VERSION_ENV: meta("resourceVersion")}},
        },
    });
    if let Some(cfg) = spec
        .get("pluginConfig")
        .filter(|c| c.as_object().is_some_and(|o| !o.is_empty()))
    {
        config["configuration"] = json!({
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": cfg.to_string(),
        });
    }
    let policy = match s("failStrategy") {
        None | Some("FAIL_CLOSE") => "FAIL_CLOSED",
        Some("FAIL_OPEN") => "FAIL_OPEN",
        Some("FAIL_RELOAD") => "FAIL_RELOAD",
        Some(other) => {
            return Err(WasmPluginError::Malformed {
                field: "failStrategy",
                reason: format!("{other:?} is not FAIL_CLOSE, FAIL_OPEN or FAIL_RELOAD"),
            })
        }
    };
    config["failure_policy"] = json!(policy);
    let phase = s("phase").unwrap_or("UNSPECIFIED_PHASE");
    let mut modes = Vec::new();
    let mut ports = Vec::new();
    let matches = spec
        .get("match")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for m in &matches {
        let wanted: &[&'static str] = match m.get("mode").and_then(Value::as_str) {
            Some("CLIENT") => &["SIDECAR_OUTBOUND", "GATEWAY"],
            Some("SERVER") => &["SIDECAR_INBOUND", "GATEWAY"],
            _ => &["SIDECAR_OUTBOUND", "SIDECAR_INBOUND", "GATEWAY"],
        };
        modes.extend(wanted.iter().copied());
        for p in m
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            ports.extend(p.get("number").and_then(Value::as_u64));
        }
    }
    if matches.is_empty() {
        modes.extend(["SIDECAR_OUTBOUND", "SIDECAR_INBOUND", "GATEWAY"]);
    }
    Ok(Translated {
        filter: json!({
            "name": name,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm",
                "config": config,
            },
        }),
        rank: rank(phase),
        priority: spec.get("priority").and_then(Value::as_i64).unwrap_or(0),
        modes,
        ports,
    })
}

/// Puts `plugins` into `config`'s filter chains; returns how many chains each went into.
pub fn apply(
    config: &mut Value,
    kind: ProxyKind,
    plugins: &[Value],
) -> Result<Vec<usize>, WasmPluginError> {
    let translated = plugins
        .iter()
        .map(translate)
        .collect::<Result<Vec<_>, _>>()?;
    // Insertion in phase order, then descending priority, leaves each chain sorted.
    let mut order: Vec<usize> = (0..translated.len()).collect();
    order.sort_by_key(|&i| (translated[i].rank, -translated[i].priority));
    let listeners = config
        .pointer_mut("/static_resources/listeners")
        .and_then(Value::as_array_mut)
        .ok_or(WasmPluginError::ConfigShape("static_resources.listeners"))?;
    let mut counts = vec![0; translated.len()];
    for &i in &order {
        let t = &translated[i];
        for listener in listeners.iter_mut() {
            let Some(ctx) = PatchContext::of_listener(kind, listener) else {
                continue;
            };
            if !t.modes.contains(&ctx.name()) {
                continue;
            }
            let port = listener_port(listener);
            let Some(chains) = listener
                .get_mut("filter_chains")
                .and_then(Value::as_array_mut)
            else {
                continue;
            };
            for chain in chains.iter_mut() {
                let chain_port = chain
                    .pointer("/filter_chain_match/destination_port")
                    .and_then(Value::as_u64)
                    .or(port);
                if !t.ports.is_empty() && !chain_port.is_some_and(|p| t.ports.contains(&p)) {
                    continue;
                }
                let Some(filters) = chain.get_mut("filters").and_then(Value::as_array_mut) else {
                    continue;
                };
                let terminal = filters
                    .last()
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .is_some_and(|n| rank(n) == 90);
                if !terminal {
                    continue;
                }
                // Plugins go in sorted, so one already in the chain sorts at or before this
                // one; as a name rank() does not know, it counts as 0 and stays in front.
                let at = filters
                    .iter()
                    .position(|f| {
                        rank(f.get("name").and_then(Value::as_str).unwrap_or_default()) > t.rank
                    })
                    .unwrap_or(filters.len());
                filters.insert(at, t.filter.clone());
                counts[i] += 1;
            }
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(name: &str, phase: &str, priority: i64, mode: &str) -> Value {
        json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
               "metadata": {"name": name, "namespace": "ns", "resourceVersion": "7"},
               "spec": {"url": "file:///m.wasm", "pluginName": "root", "type": "NETWORK",
                        "phase": phase, "priority": priority, "pluginConfig": {"a": 1},
                        "match": [{"mode": mode}]}})
    }

    fn config() -> Value {
        json!({"static_resources": {"listeners": [
            {"name": "virtualInbound", "traffic_direction": "INBOUND",
             "filter_chains": [{"filters": [{"name": "envoy.filters.network.rbac"},
                                            {"name": "envoy.filters.network.tcp_proxy"}]}]},
            {"name": "virtualOutbound", "traffic_direction": "OUTBOUND",
             "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy"}]}]}]}})
    }

    fn names(c: &Value, listener: usize) -> Vec<String> {
        c["static_resources"]["listeners"][listener]["filter_chains"][0]["filters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn the_filter_carries_the_plugin_as_istio_builds_it() {
        let t = translate(&plugin("p", "STATS", 0, "CLIENT")).unwrap();
        let cfg = &t.filter["typed_config"]["config"];
        assert_eq!(t.filter["name"], "ns.p");
        assert_eq!(cfg["root_id"], "root");
        assert_eq!(cfg["configuration"]["value"], r#"{"a":1}"#);
        assert_eq!(cfg["vm_config"]["code"]["local"]["filename"], "/m.wasm");
        assert_eq!(cfg["vm_config"].get("vm_id"), None);
        assert_eq!(cfg["failure_policy"], "FAIL_CLOSED");
    }

    #[test]
    fn phases_order_the_filters_around_istio_s_own_and_priority_orders_within_a_phase() {
        let mut c = config();
        apply(
            &mut c,
            ProxyKind::Sidecar,
            &[
                plugin("stats", "STATS", 0, "SERVER"),
                plugin("authn-low", "AUTHN", 1, "SERVER"),
                plugin("authn-high", "AUTHN", 9, "SERVER"),
                plugin("authz", "AUTHZ", 0, "SERVER"),
            ],
        )
        .unwrap();
        assert_eq!(
            names(&c, 0),
            [
                "ns.authn-high",
                "ns.authn-low",
                "ns.authz",
                "envoy.filters.network.rbac",
                "ns.stats",
                "envoy.filters.network.tcp_proxy"
            ]
        );
        assert_eq!(
            names(&c, 1),
            ["envoy.filters.network.tcp_proxy"],
            "SERVER only: not outbound"
        );
    }

    #[test]
    fn client_mode_goes_to_outbound_chains_only() {
        let mut c = config();
        let counts = apply(
            &mut c,
            ProxyKind::Sidecar,
            &[plugin("p", "STATS", 0, "CLIENT")],
        )
        .unwrap();
        assert_eq!(counts, [1]);
        assert_eq!(names(&c, 1), ["ns.p", "envoy.filters.network.tcp_proxy"]);
    }

    #[test]
    fn http_plugins_and_remote_urls_are_refused() {
        let mut p = plugin("p", "STATS", 0, "CLIENT");
        p["spec"]["type"] = json!("HTTP");
        assert!(matches!(
            translate(&p),
            Err(WasmPluginError::Unsupported { field: "type", .. })
        ));
        let mut p = plugin("p", "STATS", 0, "CLIENT");
        p["spec"]["url"] = json!("oci://ghcr.io/x/y:1");
        assert!(matches!(
            translate(&p),
            Err(WasmPluginError::Unsupported { field: "url", .. })
        ));
    }
}
