//! An EnvoyFilter's `configPatches` applied to a static Envoy config, as istiod applies them to
//! what it generates for a proxy (Istio's `networking/core/envoyfilter`), for the subset vmesh
//! uses and its tests exercise:
//!
//! | applyTo          | operations                                          |
//! |------------------|-----------------------------------------------------|
//! | `BOOTSTRAP`      | `MERGE`                                             |
//! | `CLUSTER`        | `ADD`                                               |
//! | `LISTENER`       | `ADD`                                               |
//! | `NETWORK_FILTER` | `MERGE`, `ADD`, `INSERT_BEFORE`, `INSERT_AFTER`, `INSERT_FIRST`, `REMOVE` |
//!
//! Anything else is refused ([`PatchError::Unsupported`]) rather than guessed. Matching follows
//! Istio: `match.context` (absent means `ANY`) against the context the listener or cluster is
//! generated in ([`PatchContext`]); `match.listener.portNumber`, `name`, `filterChain.name` and
//! `filterChain.filter.name`. `MERGE` is protobuf merge as Istio does it on the JSON form:
//! messages merge field by field, repeated fields are appended, scalars replaced, and an `Any`
//! whose type changes is replaced whole.
//!
//! Stricter than Istio in one place: an `ADD` whose name is already taken is refused here
//! ([`PatchError::NameTaken`]); Istio would send both and Envoy refuse the duplicate, so the
//! clash shows up earlier and with the patch's index.

use serde_json::Value;

use super::{listener_port, PatchContext, ProxyKind};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("not an EnvoyFilter (networking.istio.io/v1alpha3): {0}")]
    NotAnEnvoyFilter(String),
    #[error("configPatches[{index}]: {reason}")]
    Malformed { index: usize, reason: String },
    #[error("configPatches[{index}]: applyTo {apply_to} with {operation} is not simulated")]
    Unsupported {
        index: usize,
        apply_to: String,
        operation: String,
    },
    #[error("configPatches[{index}]: a {what} named {name:?} is already there")]
    NameTaken {
        index: usize,
        what: &'static str,
        name: String,
    },
    #[error("the Envoy config has no {0}")]
    ConfigShape(&'static str),
}

/// What one EnvoyFilter changed, for tests that check a patch did reach its target.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// One entry per patch: how many places it changed (0: its match found nothing).
    pub per_patch: Vec<usize>,
}

/// Applies `envoy_filter`'s patches, in order, to `config` (a static Envoy bootstrap whose
/// `static_resources` hold what istiod would send for a proxy of `kind`).
pub fn apply(
    config: &mut Value,
    kind: ProxyKind,
    envoy_filter: &Value,
) -> Result<Applied, PatchError> {
    let api = envoy_filter.get("apiVersion").and_then(Value::as_str);
    let k = envoy_filter.get("kind").and_then(Value::as_str);
    if api != Some("networking.istio.io/v1alpha3") || k != Some("EnvoyFilter") {
        return Err(PatchError::NotAnEnvoyFilter(format!(
            "apiVersion {api:?}, kind {k:?}"
        )));
    }
    let patches = envoy_filter
        .pointer("/spec/configPatches")
        .and_then(Value::as_array)
        .ok_or_else(|| PatchError::NotAnEnvoyFilter("no spec.configPatches".into()))?;
    let mut applied = Applied::default();
    for (index, p) in patches.iter().enumerate() {
        applied.per_patch.push(apply_one(config, kind, index, p)?);
    }
    Ok(applied)
}

fn apply_one(
    config: &mut Value,
    kind: ProxyKind,
    index: usize,
    p: &Value,
) -> Result<usize, PatchError> {
    let malformed = |reason: &str| PatchError::Malformed {
        index,
        reason: reason.to_string(),
    };
    let apply_to = p
        .get("applyTo")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("no applyTo"))?;
    let operation = p
        .pointer("/patch/operation")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("no patch.operation"))?;
    let value = p.pointer("/patch/value");
    let context = p.pointer("/match/context").and_then(Value::as_str);
    let unsupported = || PatchError::Unsupported {
        index,
        apply_to: apply_to.to_string(),
        operation: operation.to_string(),
    };
    match (apply_to, operation) {
        ("BOOTSTRAP", "MERGE") => {
            let value = value.ok_or_else(|| malformed("MERGE without a value"))?;
            merge(config, value);
            Ok(1)
        }
        ("CLUSTER", "ADD") => {
            if !PatchContext::of_added_cluster(kind).selected_by(context) {
                return Ok(0);
            }
            let value = value.ok_or_else(|| malformed("ADD without a value"))?;
            add_named(
                config,
                "/static_resources/clusters",
                "cluster",
                index,
                value,
            )
        }
        ("LISTENER", "ADD") => {
            // Istio adds a listener in the context the patch names; a sidecar's outbound
            // context is where its listeners of its own go.
            let here = match kind {
                ProxyKind::Sidecar => [PatchContext::SidecarOutbound, PatchContext::SidecarInbound]
                    .into_iter()
                    .any(|c| c.selected_by(context)),
                ProxyKind::Gateway => PatchContext::Gateway.selected_by(context),
            };
            if !here {
                return Ok(0);
            }
            let value = value.ok_or_else(|| malformed("ADD without a value"))?;
            add_named(
                config,
                "/static_resources/listeners",
                "listener",
                index,
                value,
            )
        }
        ("NETWORK_FILTER", op) => network_filter(config, kind, index, p, op, value)
            .and_then(|n| n.ok_or_else(unsupported)),
        _ => Err(unsupported()),
    }
}

fn add_named(
    config: &mut Value,
    list: &'static str,
    what: &'static str,
    index: usize,
    value: &Value,
) -> Result<usize, PatchError> {
    let name = value
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| PatchError::Malformed {
            index,
            reason: format!("the added {what} has no name"),
        })?;
    let items = config
        .pointer_mut(list)
        .and_then(Value::as_array_mut)
        .ok_or(PatchError::ConfigShape(list))?;
    if items
        .iter()
        .any(|i| i.get("name").and_then(Value::as_str) == Some(name))
    {
        return Err(PatchError::NameTaken {
            index,
            what,
            name: name.to_string(),
        });
    }
    items.push(value.clone());
    Ok(1)
}

/// `Ok(None)`: an operation this stand-in does not simulate on network filters.
fn network_filter(
    config: &mut Value,
    kind: ProxyKind,
    index: usize,
    p: &Value,
    op: &str,
    value: Option<&Value>,
) -> Result<Option<usize>, PatchError> {
    if !matches!(
        op,
        "MERGE" | "ADD" | "INSERT_BEFORE" | "INSERT_AFTER" | "INSERT_FIRST" | "REMOVE"
    ) {
        return Ok(None);
    }
    let malformed = |reason: &str| PatchError::Malformed {
        index,
        reason: reason.to_string(),
    };
    let value = match op {
        "REMOVE" => None,
        _ => Some(value.ok_or_else(|| malformed("no patch.value"))?),
    };
    let m = p.get("match");
    let context = m.and_then(|m| m.get("context")).and_then(Value::as_str);
    let port = m
        .and_then(|m| m.pointer("/listener/portNumber"))
        .and_then(Value::as_u64);
    let listener_name = m
        .and_then(|m| m.pointer("/listener/name"))
        .and_then(Value::as_str);
    let chain_name = m
        .and_then(|m| m.pointer("/listener/filterChain/name"))
        .and_then(Value::as_str);
    let filter_name = m
        .and_then(|m| m.pointer("/listener/filterChain/filter/name"))
        .and_then(Value::as_str);
    if matches!(op, "MERGE" | "INSERT_BEFORE" | "INSERT_AFTER" | "REMOVE") && filter_name.is_none()
    {
        return Err(malformed(&format!(
            "{op} needs match.listener.filterChain.filter.name"
        )));
    }
    let listeners = config
        .pointer_mut("/static_resources/listeners")
        .and_then(Value::as_array_mut)
        .ok_or(PatchError::ConfigShape("static_resources.listeners"))?;
    let mut changed = 0;
    for listener in listeners.iter_mut() {
        let Some(ctx) = PatchContext::of_listener(kind, listener) else {
            continue;
        };
        if !ctx.selected_by(context)
            || port.is_some_and(|p| listener_port(listener) != Some(p))
            || listener_name
                .is_some_and(|n| listener.get("name").and_then(Value::as_str) != Some(n))
        {
            continue;
        }
        let Some(chains) = listener
            .get_mut("filter_chains")
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for chain in chains.iter_mut() {
            if chain_name.is_some_and(|n| chain.get("name").and_then(Value::as_str) != Some(n)) {
                continue;
            }
            let Some(filters) = chain.get_mut("filters").and_then(Value::as_array_mut) else {
                continue;
            };
            let at = filter_name.and_then(|n| {
                filters
                    .iter()
                    .position(|f| f.get("name").and_then(Value::as_str) == Some(n))
            });
            if filter_name.is_some() && at.is_none() {
                continue;
            }
            match (op, at, value) {
                ("MERGE", Some(i), Some(v)) => {
                    if let Some(f) = filters.get_mut(i) {
                        merge(f, v);
                    }
                }
                ("REMOVE", Some(i), _) => {
                    filters.remove(i);
                }
                ("INSERT_BEFORE", Some(i), Some(v)) => filters.insert(i, v.clone()),
                ("INSERT_AFTER", Some(i), Some(v)) => filters.insert(i + 1, v.clone()),
                ("INSERT_FIRST", _, Some(v)) => filters.insert(0, v.clone()),
                ("ADD", _, Some(v)) => filters.push(v.clone()),
                _ => continue,
            }
            changed += 1;
        }
    }
    Ok(Some(changed))
}

/// Protobuf merge on the JSON form of a message: objects field by field, arrays appended,
/// scalars replaced; an `Any` (`@type`) whose type differs is replaced whole.
pub fn merge(dst: &mut Value, src: &Value) {
    match (dst, src) {
        (Value::Object(d), Value::Object(s)) => {
            let retyped = matches!((d.get("@type"), s.get("@type")), (Some(a), Some(b)) if a != b);
            if retyped {
                *d = s.clone();
                return;
            }
            for (k, v) in s {
                match d.get_mut(k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        d.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(d), Value::Array(s)) => d.extend(s.iter().cloned()),
        (d, s) => *d = s.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> Value {
        json!({
            "bootstrap_extensions": [{"name": "envoy.bootstrap.internal_listener"}],
            "static_resources": {
                "clusters": [{"name": "PassthroughCluster"}],
                "listeners": [
                    {"address": {"socket_address": {"port_value": 15090}},
                     "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager"}]}]},
                    {"name": "virtualInbound", "traffic_direction": "INBOUND",
                     "address": {"socket_address": {"port_value": 15006}},
                     "filter_chains": [{"name": "inbound|9090||", "filters": [
                        {"name": "envoy.filters.network.rbac"},
                        {"name": "envoy.filters.network.tcp_proxy", "typed_config": {"@type": "tcp", "stat_prefix": "a"}}]}]},
                    {"name": "virtualOutbound", "traffic_direction": "OUTBOUND",
                     "address": {"socket_address": {"port_value": 15001}},
                     "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy"}]}]}
                ]
            }
        })
    }

    fn filter(patches: Value) -> Value {
        json!({"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
               "metadata": {"name": "t"}, "spec": {"configPatches": patches}})
    }

    fn names(chain: &Value) -> Vec<&str> {
        chain["filters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn bootstrap_merge_appends_to_repeated_fields() {
        let mut c = config();
        apply(
            &mut c,
            ProxyKind::Sidecar,
            &filter(json!([{"applyTo": "BOOTSTRAP",
            "patch": {"operation": "MERGE", "value": {"bootstrap_extensions": [{"name": "w"}]}}}])),
        )
        .unwrap();
        assert_eq!(
            c["bootstrap_extensions"][0]["name"],
            "envoy.bootstrap.internal_listener"
        );
        assert_eq!(c["bootstrap_extensions"][1]["name"], "w");
    }

    #[test]
    fn insert_before_inserts_in_front_of_the_named_filter_in_the_matching_context_only() {
        let mut c = config();
        let a = apply(&mut c, ProxyKind::Sidecar, &filter(json!([{"applyTo": "NETWORK_FILTER",
            "match": {"context": "SIDECAR_INBOUND", "listener": {"filterChain": {"filter": {"name": "envoy.filters.network.tcp_proxy"}}}},
            "patch": {"operation": "INSERT_BEFORE", "value": {"name": "x"}}}])))
        .unwrap();
        assert_eq!(a.per_patch, [1]);
        let inbound = &c["static_resources"]["listeners"][1]["filter_chains"][0];
        assert_eq!(
            names(inbound),
            [
                "envoy.filters.network.rbac",
                "x",
                "envoy.filters.network.tcp_proxy"
            ]
        );
        let outbound = &c["static_resources"]["listeners"][2]["filter_chains"][0];
        assert_eq!(names(outbound), ["envoy.filters.network.tcp_proxy"]);
    }

    #[test]
    fn insert_first_and_add_go_to_the_ends_of_chains_on_the_matched_port() {
        let mut c = config();
        apply(
            &mut c,
            ProxyKind::Sidecar,
            &filter(json!([
            {"applyTo": "NETWORK_FILTER", "match": {"listener": {"portNumber": 15006}},
             "patch": {"operation": "INSERT_FIRST", "value": {"name": "first"}}},
            {"applyTo": "NETWORK_FILTER", "match": {"listener": {"portNumber": 15006}},
             "patch": {"operation": "ADD", "value": {"name": "last"}}}])),
        )
        .unwrap();
        let inbound = &c["static_resources"]["listeners"][1]["filter_chains"][0];
        assert_eq!(
            names(inbound),
            [
                "first",
                "envoy.filters.network.rbac",
                "envoy.filters.network.tcp_proxy",
                "last"
            ]
        );
    }

    #[test]
    fn merge_changes_fields_of_the_named_filter_and_keeps_the_rest() {
        let mut c = config();
        apply(&mut c, ProxyKind::Sidecar, &filter(json!([{"applyTo": "NETWORK_FILTER",
            "match": {"listener": {"name": "virtualInbound", "filterChain": {"name": "inbound|9090||",
                "filter": {"name": "envoy.filters.network.tcp_proxy"}}}},
            "patch": {"operation": "MERGE", "value": {"typed_config": {"@type": "tcp", "idle_timeout": "5s"}}}}])))
        .unwrap();
        let tcp = &c["static_resources"]["listeners"][1]["filter_chains"][0]["filters"][1];
        assert_eq!(
            tcp["typed_config"],
            json!({"@type": "tcp", "stat_prefix": "a", "idle_timeout": "5s"})
        );
    }

    #[test]
    fn the_bootstrap_s_own_listeners_are_never_patched() {
        let mut c = config();
        let a = apply(
            &mut c,
            ProxyKind::Sidecar,
            &filter(json!([{"applyTo": "NETWORK_FILTER",
            "match": {"listener": {"portNumber": 15090}},
            "patch": {"operation": "INSERT_FIRST", "value": {"name": "x"}}}])),
        )
        .unwrap();
        assert_eq!(a.per_patch, [0]);
    }

    #[test]
    fn gateway_patches_do_not_reach_sidecars_and_sidecar_patches_not_gateways() {
        let add = |ctx: &str| {
            filter(json!([{"applyTo": "CLUSTER", "match": {"context": ctx},
            "patch": {"operation": "ADD", "value": {"name": "vmesh_x"}}}]))
        };
        let mut c = config();
        assert_eq!(
            apply(&mut c, ProxyKind::Sidecar, &add("GATEWAY"))
                .unwrap()
                .per_patch,
            [0]
        );
        assert_eq!(
            apply(&mut c, ProxyKind::Gateway, &add("SIDECAR_OUTBOUND"))
                .unwrap()
                .per_patch,
            [0]
        );
        assert_eq!(
            apply(&mut c, ProxyKind::Gateway, &add("GATEWAY"))
                .unwrap()
                .per_patch,
            [1]
        );
    }

    #[test]
    fn adding_a_name_that_is_taken_is_refused_with_the_patch_index() {
        let mut c = config();
        let err = apply(
            &mut c,
            ProxyKind::Sidecar,
            &filter(json!([{"applyTo": "CLUSTER",
            "patch": {"operation": "ADD", "value": {"name": "PassthroughCluster"}}}])),
        )
        .unwrap_err();
        assert_eq!(
            err,
            PatchError::NameTaken {
                index: 0,
                what: "cluster",
                name: "PassthroughCluster".into()
            }
        );
    }

    #[test]
    fn operations_it_does_not_simulate_are_refused_not_guessed() {
        let mut c = config();
        let err = apply(
            &mut c,
            ProxyKind::Sidecar,
            &filter(json!([{"applyTo": "HTTP_ROUTE",
            "patch": {"operation": "MERGE", "value": {}}}])),
        )
        .unwrap_err();
        assert!(
            matches!(err, PatchError::Unsupported { index: 0, .. }),
            "{err}"
        );
    }
}
