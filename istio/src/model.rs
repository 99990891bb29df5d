//! The Kubernetes-shaped objects vmesh understands, as serde types: Istio's WorkloadGroup,
//! WorkloadEntry and ServiceEntry (`networking.istio.io` v1, v1beta1, v1alpha3) and the core
//! `v1 Service`. Field names and defaults follow the Istio API and Kubernetes; specs refuse
//! unknown fields (as the CRDs' structural schemas do), metadata ignores the server-managed
//! fields vmesh does not use.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
pub use vmesh_api::probe::{
    ExecHealthCheck, GrpcHealthCheck, HttpHeader, HttpHealthCheck, ReadinessProbe, TcpHealthCheck,
};

pub use super::labels::Labels;

/// API groups/versions accepted for the Istio kinds, newest first.
pub const ISTIO_API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    WorkloadGroup,
    WorkloadEntry,
    ServiceEntry,
    Service,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::WorkloadGroup,
        Kind::WorkloadEntry,
        Kind::ServiceEntry,
        Kind::Service,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::WorkloadGroup => "WorkloadGroup",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::Service => "Service",
        }
    }

    /// The kind named by `kind` under `api_version`, as a manifest states it.
    pub fn from_manifest(api_version: &str, kind: &str) -> Result<Kind, KindError> {
        let k = match kind {
            "WorkloadGroup" => Kind::WorkloadGroup,
            "WorkloadEntry" => Kind::WorkloadEntry,
            "ServiceEntry" => Kind::ServiceEntry,
            "Service" => Kind::Service,
            _ => {
                return Err(KindError::UnknownKind {
                    api_version: api_version.to_string(),
                    kind: kind.to_string(),
                })
            }
        };
        let ok = match k {
            Kind::Service => api_version == "v1",
            _ => ISTIO_API_VERSIONS.contains(&api_version),
        };
        if ok {
            Ok(k)
        } else {
            Err(KindError::UnknownVersion {
                api_version: api_version.to_string(),
                kind: kind.to_string(),
            })
        }
    }

    /// The kind a command line names, kubectl style: `workloadgroup`, `workloadgroups`, `wg`, ...
    pub fn from_cli(name: &str) -> Option<Kind> {
        let n = name.to_ascii_lowercase();
        let n = n.split('.').next().unwrap_or_default();
        Some(match n {
            "workloadgroup" | "workloadgroups" | "wg" => Kind::WorkloadGroup,
            "workloadentry" | "workloadentries" | "we" => Kind::WorkloadEntry,
            "serviceentry" | "serviceentries" | "se" => Kind::ServiceEntry,
            "service" | "services" | "svc" => Kind::Service,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KindError {
    #[error("no matches for kind {kind:?} in version {api_version:?}")]
    UnknownKind { api_version: String, kind: String },
    #[error("kind {kind:?} is not served in version {api_version:?}")]
    UnknownVersion { api_version: String, kind: String },
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub annotations: Labels,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub creation_timestamp: String,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_owner_deletion: Option<bool>,
}

/// A Kubernetes object: apiVersion, kind, metadata, spec and (for WorkloadEntry) status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Object<S> {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: S,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

/// Istio's `IstioStatus`, reduced to what vmesh maintains: conditions (WorkloadEntry) and the
/// auto-allocated addresses (ServiceEntry, Istio's `ServiceEntryStatus.addresses`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<ServiceEntryAddress>,
}

/// One auto-allocated address of one ServiceEntry host.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryAddress {
    pub value: String,
    pub host: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_probe_time: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

pub type WorkloadGroup = Object<WorkloadGroupSpec>;
pub type WorkloadEntry = Object<WorkloadEntrySpec>;
pub type ServiceEntry = Object<ServiceEntrySpec>;
pub type Service = Object<ServiceSpec>;

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntrySpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Port name -> port number on the workload.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
    /// 0 means unset (Istio then uses 1).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadGroupSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<GroupMetadata>,
    pub template: WorkloadEntrySpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ReadinessProbe>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupMetadata {
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub annotations: Labels,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    #[default]
    MeshExternal,
    MeshInternal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    #[default]
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServiceEntryPort>,
    #[serde(default)]
    pub location: Location,
    #[serde(default)]
    pub resolution: Resolution,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<WorkloadEntrySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntryPort {
    pub number: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    #[serde(default)]
    pub name: String,
    /// 0 means unset: the endpoint port is `number` unless the workload names the port.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub target_port: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: Labels,
}

/// The parts of a Kubernetes `ServiceSpec` vmesh uses; the rest is accepted and dropped.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type", skip_serializing_if = "String::is_empty")]
    pub type_: String,
    #[serde(
        default,
        rename = "clusterIP",
        skip_serializing_if = "String::is_empty"
    )]
    pub cluster_ip: String,
    #[serde(default, rename = "clusterIPs", skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub selector: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub port: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app_protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(u32),
    String(String),
}

/// Any object vmesh stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Resource {
    // Groups and ServiceEntries are few and large; entries are many and stay inline.
    WorkloadGroup(Box<WorkloadGroup>),
    WorkloadEntry(WorkloadEntry),
    ServiceEntry(Box<ServiceEntry>),
    Service(Service),
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::WorkloadGroup(_) => Kind::WorkloadGroup,
            Resource::WorkloadEntry(_) => Kind::WorkloadEntry,
            Resource::ServiceEntry(_) => Kind::ServiceEntry,
            Resource::Service(_) => Kind::Service,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Resource::WorkloadGroup(o) => &o.metadata,
            Resource::WorkloadEntry(o) => &o.metadata,
            Resource::ServiceEntry(o) => &o.metadata,
            Resource::Service(o) => &o.metadata,
        }
    }

    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Resource::WorkloadGroup(o) => &mut o.metadata,
            Resource::WorkloadEntry(o) => &mut o.metadata,
            Resource::ServiceEntry(o) => &mut o.metadata,
            Resource::Service(o) => &mut o.metadata,
        }
    }

    /// Decodes a stored object whose kind is known (untagged decoding would try each shape).
    pub fn from_json_kind(kind: Kind, json: &[u8]) -> Result<Resource, serde_json::Error> {
        Ok(match kind {
            Kind::WorkloadGroup => Resource::WorkloadGroup(Box::new(serde_json::from_slice(json)?)),
            Kind::WorkloadEntry => Resource::WorkloadEntry(serde_json::from_slice(json)?),
            Kind::ServiceEntry => Resource::ServiceEntry(Box::new(serde_json::from_slice(json)?)),
            Kind::Service => Resource::Service(serde_json::from_slice(json)?),
        })
    }
}

/// Identifies an object: kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        ObjectKey {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    pub fn of(r: &Resource) -> Self {
        let m = r.meta();
        ObjectKey::new(r.kind(), &m.namespace, &m.name)
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_resolve_from_manifests_and_command_lines() {
        let cases = [
            (
                "networking.istio.io/v1",
                "WorkloadGroup",
                Ok(Kind::WorkloadGroup),
            ),
            (
                "networking.istio.io/v1beta1",
                "ServiceEntry",
                Ok(Kind::ServiceEntry),
            ),
            (
                "networking.istio.io/v1alpha3",
                "WorkloadEntry",
                Ok(Kind::WorkloadEntry),
            ),
            ("v1", "Service", Ok(Kind::Service)),
        ];
        for (v, k, want) in cases {
            assert_eq!(Kind::from_manifest(v, k), want, "{v} {k}");
        }
        assert!(matches!(
            Kind::from_manifest("networking.istio.io/v1", "Gateway"),
            Err(KindError::UnknownKind { .. })
        ));
        assert!(matches!(
            Kind::from_manifest("apps/v1", "Service"),
            Err(KindError::UnknownVersion { .. })
        ));
        assert_eq!(Kind::from_cli("we"), Some(Kind::WorkloadEntry));
        assert_eq!(
            Kind::from_cli("serviceentries.networking.istio.io"),
            Some(Kind::ServiceEntry)
        );
        assert_eq!(Kind::from_cli("svc"), Some(Kind::Service));
        assert_eq!(Kind::from_cli("pods"), None);
    }

    #[test]
    fn specs_refuse_unknown_fields_but_metadata_ignores_server_fields() {
        let bad = r#"{"apiVersion":"networking.istio.io/v1","kind":"WorkloadGroup",
            "metadata":{"name":"a"},"spec":{"template":{"adress":"x"}}}"#;
        assert!(serde_json::from_str::<WorkloadGroup>(bad).is_err());
        let ok = r#"{"apiVersion":"networking.istio.io/v1","kind":"WorkloadGroup",
            "metadata":{"name":"a","managedFields":[]},"spec":{"template":{}}}"#;
        assert!(serde_json::from_str::<WorkloadGroup>(ok).is_ok());
    }
}
