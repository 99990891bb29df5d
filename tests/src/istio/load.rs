//! Files in, configs out: vmesh's Istio resources (YAML), the representative proxy configs
//! under `tests/fixtures/istio/`, and a patched config moved onto per-test ports and the built
//! module before Envoy runs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vmesh_test_support::repo_root;

/// Where the vmesh resources for Istio are.
pub fn resources_dir() -> PathBuf {
    repo_root().join("envoy-configs/istio")
}

pub fn fixtures_dir() -> PathBuf {
    repo_root().join("tests/fixtures/istio")
}

/// Every YAML document in `path` (empty documents skipped), as JSON values.
pub fn yaml_documents(path: &Path) -> Vec<Value> {
    use serde::Deserialize;
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| {
            Value::deserialize(d).unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Every resource in `envoy-configs/istio/`, with the file it came from.
pub fn resources() -> Vec<(PathBuf, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(resources_dir())
        .expect("read envoy-configs/istio")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .flat_map(|f| yaml_documents(&f).into_iter().map(move |d| (f.clone(), d)))
        .collect()
}

/// The resources of one kind.
pub fn resources_of(kind: &str) -> Vec<Value> {
    resources()
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| r.get("kind").and_then(Value::as_str) == Some(kind))
        .collect()
}

/// The EnvoyFilters that select a proxy with `labels` (no selector: every proxy).
pub fn envoy_filters_for(labels: &[(&str, &str)]) -> Vec<Value> {
    resources_of("EnvoyFilter")
        .into_iter()
        .filter(|f| {
            let Some(want) = f
                .pointer("/spec/workloadSelector/labels")
                .and_then(Value::as_object)
            else {
                return true;
            };
            want.iter().all(|(k, v)| {
                labels
                    .iter()
                    .any(|(lk, lv)| lk == k && Some(*lv) == v.as_str())
            })
        })
        .collect()
}

/// A fixture config (`sidecar.yaml`, `eastwest-gateway.yaml`).
pub fn fixture(name: &str) -> Value {
    let docs = yaml_documents(&fixtures_dir().join(name));
    docs.into_iter().next().expect("a config in the fixture")
}

/// The module path the resources name, replaced by the built one.
pub const WASM_IN_RESOURCES: &str = "/var/lib/vmesh/vmesh_filter.wasm";

/// `config` moved onto this test's ports and module: every `port_value` in `ports` becomes its
/// mapped value, every wildcard bind (`0.0.0.0`) loopback, every module path the built `.wasm`.
pub fn relocate(config: &mut Value, ports: &BTreeMap<u64, u16>, wasm: &Path) {
    match config {
        Value::Object(o) => {
            for (k, v) in o.iter_mut() {
                match (k.as_str(), &*v) {
                    ("port_value", Value::Number(n)) => {
                        if let Some(p) = n.as_u64().and_then(|n| ports.get(&n)) {
                            *v = Value::from(*p);
                        }
                    }
                    ("address", Value::String(a)) if a == "0.0.0.0" => {
                        *v = Value::from("127.0.0.1");
                    }
                    ("filename", Value::String(f)) if f == WASM_IN_RESOURCES => {
                        *v = Value::from(wasm.display().to_string());
                    }
                    _ => relocate(v, ports, wasm),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|v| relocate(v, ports, wasm)),
        _ => {}
    }
}
