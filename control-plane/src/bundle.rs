//! The VM bundle: the files `istioctl x workload entry configure --autoregister` writes for a
//! WorkloadGroup, which the shim reads on the VM: `cluster.env`, `mesh.yaml`, `root-cert.pem`,
//! `istio-token` and `hosts`.

use std::collections::BTreeMap;

use vmesh_istio::model::{Labels, WorkloadGroup};
use vmesh_istio::workload::{expected_service_account, probe_with_defaults};

/// Where the VM finds the control plane.
#[derive(Debug, Clone)]
pub struct BundleOptions {
    /// `host:port` put in mesh.yaml's `discoveryAddress`.
    pub discovery_address: String,
    /// IP the `hosts` file maps the discovery host to (empty: no hosts entry).
    pub control_plane_ip: String,
    pub cluster_id: String,
    pub mesh_id: String,
    pub trust_domain: String,
}

impl Default for BundleOptions {
    fn default() -> Self {
        BundleOptions {
            discovery_address: "istiod.istio-system.svc:15012".into(),
            control_plane_ip: String::new(),
            cluster_id: "Kubernetes".into(),
            mesh_id: String::new(),
            trust_domain: "cluster.local".into(),
        }
    }
}

const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";

fn canonical(labels: &Labels, group: &str) -> (String, String) {
    let pick = |keys: &[&str]| keys.iter().find_map(|k| labels.get(k).cloned());
    (
        pick(&[CANONICAL_NAME, "app.kubernetes.io/name", "app"])
            .unwrap_or_else(|| group.to_string()),
        pick(&[CANONICAL_REVISION, "app.kubernetes.io/version", "version"])
            .unwrap_or_else(|| "latest".into()),
    )
}

/// Ports the VM's inbound capture leaves alone (istioctl's `createClusterEnv`): 22 so a
/// broken mesh cannot lock the operator out, 15090 (Prometheus), 15021 and 15020 (the agent's
/// status ports).
pub const LOCAL_EXCLUDE_PORTS: &str = "22,15090,15021,15020";

/// The labels the VM's proxy carries (istioctl's `createMeshConfig`): the group's metadata
/// labels, then the template's over them, then the canonical service labels.
fn proxy_labels(group: &WorkloadGroup) -> (Labels, String, String) {
    let mut labels = group
        .spec
        .metadata
        .as_ref()
        .map(|m| m.labels.clone())
        .unwrap_or_default();
    labels.extend(
        group
            .spec
            .template
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    let (svc, rev) = canonical(&labels, &group.metadata.name);
    labels.insert(CANONICAL_NAME.into(), svc.clone());
    labels.insert(CANONICAL_REVISION.into(), rev.clone());
    (labels, svc, rev)
}

/// `ISTIO_META_POD_PORTS`: the template's named ports as Kubernetes container ports, sorted by
/// name (istioctl's `marshalWorkloadEntryPodPorts`); `None` without ports.
fn pod_ports(group: &WorkloadGroup) -> Option<String> {
    let ports = &group.spec.template.ports;
    if ports.is_empty() {
        return None;
    }
    // Istio's `model.PodPort`, in its field order.
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct PodPort<'a> {
        name: &'a str,
        container_port: u32,
        protocol: &'a str,
    }
    let list: Vec<PodPort> = ports
        .iter()
        .map(|(name, port)| PodPort {
            name,
            container_port: *port,
            protocol: "",
        })
        .collect();
    serde_json::to_string(&list).ok()
}

/// `ISTIO_INBOUND_PORTS`: the template's port numbers (by port name, istioctl takes Go's map
/// order), or `*` to capture every port when there are none.
fn inbound_ports(group: &WorkloadGroup) -> String {
    let ports: Vec<String> = group
        .spec
        .template
        .ports
        .values()
        .map(u32::to_string)
        .collect();
    if ports.is_empty() {
        "*".into()
    } else {
        ports.join(",")
    }
}

/// The proxy metadata both cluster.env and mesh.yaml carry, in istioctl's key names.
pub fn proxy_metadata(group: &WorkloadGroup, o: &BundleOptions) -> BTreeMap<String, String> {
    let name = &group.metadata.name;
    let ns = &group.metadata.namespace;
    let (labels, svc, rev) = proxy_labels(group);
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    put("CANONICAL_REVISION", rev);
    put("CANONICAL_SERVICE", svc);
    put("ISTIO_INBOUND_PORTS", inbound_ports(group));
    put("ISTIO_LOCAL_EXCLUDE_PORTS", LOCAL_EXCLUDE_PORTS.into());
    put(
        "ISTIO_METAJSON_LABELS",
        serde_json::to_string(&labels).unwrap_or_default(),
    );
    put("ISTIO_META_AUTO_REGISTER_GROUP", name.clone());
    put("ISTIO_META_CLUSTER_ID", o.cluster_id.clone());
    put("ISTIO_META_DNS_CAPTURE", "true".into());
    put("ISTIO_META_MESH_ID", o.mesh_id.clone());
    put("ISTIO_META_NETWORK", group.spec.template.network.clone());
    if let Some(p) = pod_ports(group) {
        put("ISTIO_META_POD_PORTS", p);
    }
    put("ISTIO_META_WORKLOAD_NAME", name.clone());
    put("ISTIO_NAMESPACE", ns.clone());
    put("ISTIO_SERVICE", format!("{name}.{ns}"));
    put("ISTIO_SERVICE_CIDR", "*".into());
    put("POD_NAMESPACE", ns.clone());
    put(
        "SERVICE_ACCOUNT",
        expected_service_account(group).to_string(),
    );
    put("TRUST_DOMAIN", o.trust_domain.clone());
    m
}

fn shell_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', r"'\''"))
}

/// File name -> contents (the token and root cert are added by the caller).
pub fn render(group: &WorkloadGroup, o: &BundleOptions) -> BTreeMap<&'static str, String> {
    let meta = proxy_metadata(group, o);
    let mut files = BTreeMap::new();
    let env: String = meta
        .iter()
        .map(|(k, v)| format!("{k}={}\n", shell_quote(v)))
        .collect();
    files.insert("cluster.env", env);
    let mut default_config = serde_json::json!({
        "discoveryAddress": o.discovery_address,
        "meshId": o.mesh_id,
        "proxyMetadata": meta,
    });
    if let Some(p) = &group.spec.probe {
        default_config["readinessProbe"] =
            serde_json::to_value(probe_with_defaults(p)).unwrap_or_default();
    }
    let mesh = serde_json::json!({ "defaultConfig": default_config });
    files.insert(
        "mesh.yaml",
        serde_norway::to_string(&mesh).unwrap_or_default(),
    );
    let host = o
        .discovery_address
        .rsplit_once(':')
        .map_or(o.discovery_address.as_str(), |(h, _)| h);
    let hosts = if o.control_plane_ip.is_empty() || host.parse::<std::net::IpAddr>().is_ok() {
        String::new()
    } else {
        format!("{} {host}\n", o.control_plane_ip)
    };
    files.insert("hosts", hosts);
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_matches_istioctl_for_the_python_http_group() {
        let g: WorkloadGroup = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.istio.io/v1alpha3", "kind": "WorkloadGroup",
            "metadata": {"name": "python-http", "namespace": "vm-namespace"},
            "spec": {"metadata": {"labels": {"app": "python-http"}},
                     "template": {"serviceAccount": "vm-sa", "network": "vm-network"},
                     "probe": {"periodSeconds": 5, "initialDelaySeconds": 1, "httpGet": {"port": 8080, "path": "/ready"}}}
        })).unwrap();
        let o = BundleOptions {
            control_plane_ip: "10.0.0.1".into(),
            ..Default::default()
        };
        let f = render(&g, &o);
        let env = &f["cluster.env"];
        for line in [
            "ISTIO_META_AUTO_REGISTER_GROUP='python-http'",
            "ISTIO_META_NETWORK='vm-network'",
            "POD_NAMESPACE='vm-namespace'",
            "SERVICE_ACCOUNT='vm-sa'",
            "CANONICAL_SERVICE='python-http'",
            "CANONICAL_REVISION='latest'",
            "ISTIO_METAJSON_LABELS='{\"app\":\"python-http\",\"service.istio.io/canonical-name\":\"python-http\",\"service.istio.io/canonical-revision\":\"latest\"}'",
        ] {
            assert!(env.lines().any(|l| l == line), "missing {line} in\n{env}");
        }
        let mesh: serde_json::Value = serde_norway::from_str(&f["mesh.yaml"]).unwrap();
        let dc = &mesh["defaultConfig"];
        assert_eq!(dc["discoveryAddress"], "istiod.istio-system.svc:15012");
        assert_eq!(
            dc["proxyMetadata"]["ISTIO_META_AUTO_REGISTER_GROUP"],
            "python-http"
        );
        assert_eq!(dc["readinessProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(dc["readinessProbe"]["periodSeconds"], 5);
        assert_eq!(dc["readinessProbe"]["timeoutSeconds"], 1);
        assert_eq!(f["hosts"], "10.0.0.1 istiod.istio-system.svc\n");
        for line in [
            "ISTIO_INBOUND_PORTS='*'",
            "ISTIO_LOCAL_EXCLUDE_PORTS='22,15090,15021,15020'",
        ] {
            assert!(env.lines().any(|l| l == line), "missing {line} in\n{env}");
        }
        assert!(!env.contains("ISTIO_META_POD_PORTS"));
    }

    #[test]
    fn template_ports_and_labels_reach_the_bundle_as_istioctl_writes_them() {
        let g: WorkloadGroup = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
            "metadata": {"name": "reviews", "namespace": "bookinfo"},
            "spec": {"metadata": {"labels": {"app": "reviews", "tier": "meta"}},
                     "template": {"ports": {"http": 9080, "grpc": 9090},
                                  "labels": {"tier": "template", "version": "v2"}}}
        }))
        .unwrap();
        let m = proxy_metadata(&g, &BundleOptions::default());
        assert_eq!(m["ISTIO_INBOUND_PORTS"], "9090,9080");
        assert_eq!(
            m["ISTIO_META_POD_PORTS"],
            r#"[{"name":"grpc","containerPort":9090,"protocol":""},{"name":"http","containerPort":9080,"protocol":""}]"#
        );
        let labels: BTreeMap<String, String> =
            serde_json::from_str(&m["ISTIO_METAJSON_LABELS"]).unwrap();
        assert_eq!(labels["tier"], "template", "the template's labels win");
        assert_eq!(labels["service.istio.io/canonical-revision"], "v2");
        assert_eq!(m["CANONICAL_REVISION"], "v2");
        assert_eq!(m["SERVICE_ACCOUNT"], "default");
    }
}
