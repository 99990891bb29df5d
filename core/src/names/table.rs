//! The name table as it travels: JSON in the shape of Istio's NameTable (istio.io
//! `pkg/dns/proto` NameTable), plus the client's namespace, cluster domain and search domains so
//! one document fully determines the answers. Described for users in `docs/name-table.md`.
//!
//! Unknown fields are accepted and ignored: a newer control plane may add fields and an older
//! filter must keep serving what it understands.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub const DEFAULT_DOMAIN: &str = "cluster.local";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NameTable {
    /// Opaque; changes whenever the content changes. Long-polls compare it.
    pub version: String,
    /// The client's own namespace: bare `name` queries resolve only to services in it.
    pub namespace: String,
    #[serde(default = "default_domain")]
    pub domain: String,
    /// Suffixes the client's resolver may append (resolv.conf `search`); a query that is a
    /// mesh name plus one of them is answered with a CNAME to the mesh name.
    #[serde(default)]
    pub search_domains: Vec<String>,
    /// Fully qualified host (no trailing dot) or `*.suffix` wildcard -> what it resolves to.
    pub names: BTreeMap<String, NameInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NameInfo {
    pub ips: Vec<IpAddr>,
    pub registry: Registry,
    /// Kubernetes service name; with `namespace`, enables `name.ns`, `name.ns.svc` and (in the
    /// client's namespace) `name`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub shortname: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Registry {
    /// A Kubernetes Service: short forms apply.
    Kubernetes,
    /// A ServiceEntry host: matched exactly or by wildcard only.
    External,
}

pub(crate) fn default_domain() -> String {
    DEFAULT_DOMAIN.to_string()
}

impl NameTable {
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings, maps and IPs into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}
