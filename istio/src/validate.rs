//! Semantic validation of objects that already decoded: what Istio's validation webhook and
//! the Kubernetes API server would refuse. Every error names its field path the way kubectl
//! does (`spec.ports[0].number`).

use std::net::IpAddr;

use super::model::{
    Labels, ObjectMeta, ReadinessProbe, Resolution, Resource, Service, ServiceEntry, WorkloadEntry,
    WorkloadEntrySpec, WorkloadGroup,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// All problems with `r`, empty when it is valid.
pub fn validate(r: &Resource) -> Vec<FieldError> {
    let mut e = Errors::default();
    match r {
        Resource::WorkloadGroup(o) => workload_group(o, &mut e),
        Resource::WorkloadEntry(o) => workload_entry(o, &mut e),
        Resource::ServiceEntry(o) => service_entry(o, &mut e),
        Resource::Service(o) => service(o, &mut e),
    }
    e.0
}

/// DNS-1123 label: lower-case alphanumerics and '-', starting and ending alphanumeric, <= 63.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// DNS-1123 subdomain: dot-separated labels, <= 253 in all.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn metadata(m: &ObjectMeta, e: &mut Errors) {
    if m.name.is_empty() {
        e.add("metadata.name", "Required value: name is required");
    } else if !is_dns1123_subdomain(&m.name) {
        e.add(
            "metadata.name",
            format!(
                "Invalid value: {:?}: must be a lowercase RFC 1123 subdomain",
                m.name
            ),
        );
    }
    if !m.namespace.is_empty() && !is_dns1123_label(&m.namespace) {
        e.add(
            "metadata.namespace",
            format!(
                "Invalid value: {:?}: must be a lowercase RFC 1123 label",
                m.namespace
            ),
        );
    }
    labels(&m.labels, "metadata.labels", e);
}

fn label_key_ok(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && name
            .bytes()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    name_ok && prefix.is_none_or(is_dns1123_subdomain)
}

fn label_value_ok(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && v.bytes().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && v.bytes().last().is_some_and(|c| c.is_ascii_alphanumeric()))
}

fn labels(l: &Labels, path: &str, e: &mut Errors) {
    for (k, v) in l {
        if !label_key_ok(k) {
            e.add(
                format!("{path}[{k}]"),
                "Invalid value: not a valid label key",
            );
        } else if !label_value_ok(v) {
            e.add(
                format!("{path}[{k}]"),
                format!("Invalid value: {v:?}: not a valid label value"),
            );
        }
    }
}

/// Checks user-supplied labels (registration requests) with the same rules as metadata.
pub fn validate_labels(l: &Labels, path: &str) -> Vec<FieldError> {
    let mut e = Errors::default();
    labels(l, path, &mut e);
    e.0
}

fn port_ok(p: u32) -> bool {
    (1..=65535).contains(&p)
}

fn workload_spec(s: &WorkloadEntrySpec, path: &str, address_required: bool, e: &mut Errors) {
    if address_required && s.address.is_empty() {
        e.add(
            format!("{path}.address"),
            "Required value: address is required",
        );
    } else if !s.address.is_empty() && !address_ok(&s.address) {
        e.add(
            format!("{path}.address"),
            format!(
                "Invalid value: {:?}: must be an IP, a host name or unix:// path",
                s.address
            ),
        );
    }
    for (name, port) in &s.ports {
        if !port_ok(*port) {
            e.add(
                format!("{path}.ports[{name}]"),
                format!("Invalid value: {port}: must be between 1 and 65535"),
            );
        }
    }
    labels(&s.labels, &format!("{path}.labels"), e);
    if !s.service_account.is_empty() && !is_dns1123_subdomain(&s.service_account) {
        e.add(
            format!("{path}.serviceAccount"),
            "Invalid value: must be a lowercase RFC 1123 subdomain",
        );
    }
}

fn address_ok(a: &str) -> bool {
    a.parse::<IpAddr>().is_ok() || a.starts_with("unix://") || is_host(a, false)
}

/// A DNS host as ServiceEntry hosts allow: labels of letters, digits, '-' and '_'; optionally
/// a leading `*.` wildcard.
fn is_host(h: &str, allow_wildcard: bool) -> bool {
    let rest = match h.strip_prefix("*.") {
        Some(r) if allow_wildcard => r,
        Some(_) => return false,
        None => h,
    };
    !rest.is_empty()
        && rest.len() <= 253
        && rest.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn workload_group(o: &WorkloadGroup, e: &mut Errors) {
    metadata(&o.metadata, e);
    if let Some(m) = &o.spec.metadata {
        labels(&m.labels, "spec.metadata.labels", e);
    }
    // Istio: the address comes from the connecting VM, never from the template.
    if !o.spec.template.address.is_empty() {
        e.add(
            "spec.template.address",
            "Forbidden: address must be empty in a template",
        );
    }
    workload_spec(&o.spec.template, "spec.template", false, e);
    if let Some(p) = &o.spec.probe {
        probe(p, e);
    }
}

fn probe(p: &ReadinessProbe, e: &mut Errors) {
    let set = [
        p.http_get.is_some(),
        p.tcp_socket.is_some(),
        p.exec.is_some(),
        p.grpc.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set != 1 {
        e.add(
            "spec.probe",
            "Invalid value: exactly one of httpGet, tcpSocket, exec or grpc must be set",
        );
    }
    for (v, f) in [
        (p.initial_delay_seconds, "initialDelaySeconds"),
        (p.timeout_seconds, "timeoutSeconds"),
        (p.period_seconds, "periodSeconds"),
        (p.success_threshold, "successThreshold"),
        (p.failure_threshold, "failureThreshold"),
    ] {
        if v < 0 {
            e.add(
                format!("spec.probe.{f}"),
                "Invalid value: must not be negative",
            );
        }
    }
    let check_port = |port: u32, path: &str, e: &mut Errors| {
        if !port_ok(port) {
            e.add(
                path,
                format!("Invalid value: {port}: must be between 1 and 65535"),
            );
        }
    };
    if let Some(h) = &p.http_get {
        check_port(h.port, "spec.probe.httpGet.port", e);
        if !h.scheme.is_empty() && !matches!(h.scheme.as_str(), "HTTP" | "HTTPS" | "http" | "https")
        {
            e.add(
                "spec.probe.httpGet.scheme",
                "Unsupported value: must be HTTP or HTTPS",
            );
        }
    }
    if let Some(t) = &p.tcp_socket {
        check_port(t.port, "spec.probe.tcpSocket.port", e);
    }
    if let Some(g) = &p.grpc {
        check_port(g.port, "spec.probe.grpc.port", e);
    }
    if let Some(x) = &p.exec {
        if x.command.is_empty() {
            e.add(
                "spec.probe.exec.command",
                "Required value: command is required",
            );
        }
    }
}

fn workload_entry(o: &WorkloadEntry, e: &mut Errors) {
    metadata(&o.metadata, e);
    workload_spec(&o.spec, "spec", true, e);
}

fn service_entry(o: &ServiceEntry, e: &mut Errors) {
    metadata(&o.metadata, e);
    let s = &o.spec;
    if s.hosts.is_empty() {
        e.add(
            "spec.hosts",
            "Required value: at least one host is required",
        );
    }
    for (i, h) in s.hosts.iter().enumerate() {
        if h == "*" {
            e.add(
                format!("spec.hosts[{i}]"),
                "Invalid value: \"*\" is not allowed",
            );
        } else if !is_host(h, true) {
            e.add(
                format!("spec.hosts[{i}]"),
                format!(
                    "Invalid value: {h:?}: must be a DNS name, optionally with a leading \"*.\""
                ),
            );
        }
    }
    for (i, a) in s.addresses.iter().enumerate() {
        if !cidr_or_ip_ok(a) {
            e.add(
                format!("spec.addresses[{i}]"),
                format!("Invalid value: {a:?}: must be an IP or CIDR"),
            );
        }
    }
    if s.ports.is_empty() && s.resolution != Resolution::None {
        // Istio needs ports to build listeners and endpoints for resolved entries.
        e.add(
            "spec.ports",
            "Required value: at least one port is required",
        );
    }
    let mut names = std::collections::BTreeSet::new();
    let mut numbers = std::collections::BTreeSet::new();
    for (i, p) in s.ports.iter().enumerate() {
        if !port_ok(p.number) {
            e.add(
                format!("spec.ports[{i}].number"),
                format!("Invalid value: {}: must be between 1 and 65535", p.number),
            );
        }
        if p.target_port != 0 && !port_ok(p.target_port) {
            e.add(
                format!("spec.ports[{i}].targetPort"),
                format!(
                    "Invalid value: {}: must be between 1 and 65535",
                    p.target_port
                ),
            );
        }
        if p.name.is_empty() {
            e.add(
                format!("spec.ports[{i}].name"),
                "Required value: port name is required",
            );
        } else if !names.insert(p.name.as_str()) {
            e.add(
                format!("spec.ports[{i}].name"),
                format!("Duplicate value: {:?}", p.name),
            );
        }
        if !numbers.insert(p.number) {
            e.add(
                format!("spec.ports[{i}].number"),
                format!("Duplicate value: {}", p.number),
            );
        }
    }
    if s.workload_selector.is_some() && !s.endpoints.is_empty() {
        e.add(
            "spec.workloadSelector",
            "Forbidden: only one of workloadSelector or endpoints may be set",
        );
    }
    if let Some(w) = &s.workload_selector {
        labels(&w.labels, "spec.workloadSelector.labels", e);
    }
    for (i, ep) in s.endpoints.iter().enumerate() {
        workload_spec(ep, &format!("spec.endpoints[{i}]"), true, e);
        if s.resolution == Resolution::Static
            && ep.address.parse::<IpAddr>().is_err()
            && !ep.address.starts_with("unix://")
        {
            e.add(
                format!("spec.endpoints[{i}].address"),
                "Invalid value: resolution STATIC needs IP endpoint addresses",
            );
        }
    }
    for (i, x) in s.export_to.iter().enumerate() {
        if !(x == "*" || x == "." || is_dns1123_label(x)) {
            e.add(
                format!("spec.exportTo[{i}]"),
                "Invalid value: must be \"*\", \".\" or a namespace",
            );
        }
    }
}

fn cidr_or_ip_ok(a: &str) -> bool {
    match a.split_once('/') {
        None => a.parse::<IpAddr>().is_ok(),
        Some((ip, len)) => match (ip.parse::<IpAddr>(), len.parse::<u8>()) {
            (Ok(IpAddr::V4(_)), Ok(l)) => l <= 32,
            (Ok(IpAddr::V6(_)), Ok(l)) => l <= 128,
            _ => false,
        },
    }
}

fn service(o: &Service, e: &mut Errors) {
    metadata(&o.metadata, e);
    if !o.metadata.name.is_empty() && !is_dns1123_label(&o.metadata.name) {
        e.add(
            "metadata.name",
            "Invalid value: a Service name must be an RFC 1123 label",
        );
    }
    let s = &o.spec;
    if !s.type_.is_empty()
        && !matches!(
            s.type_.as_str(),
            "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
        )
    {
        e.add("spec.type", format!("Unsupported value: {:?}", s.type_));
    }
    if !(s.cluster_ip.is_empty()
        || s.cluster_ip == "None"
        || s.cluster_ip.parse::<IpAddr>().is_ok())
    {
        e.add(
            "spec.clusterIP",
            format!(
                "Invalid value: {:?}: must be an IP or \"None\"",
                s.cluster_ip
            ),
        );
    }
    for (i, ip) in s.cluster_ips.iter().enumerate() {
        if !(ip == "None" || ip.parse::<IpAddr>().is_ok()) {
            e.add(
                format!("spec.clusterIPs[{i}]"),
                format!("Invalid value: {ip:?}"),
            );
        }
    }
    if s.ports.is_empty() && s.cluster_ip != "None" && s.type_ != "ExternalName" {
        e.add("spec.ports", "Required value");
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, p) in s.ports.iter().enumerate() {
        if !port_ok(p.port) {
            e.add(
                format!("spec.ports[{i}].port"),
                format!("Invalid value: {}: must be between 1 and 65535", p.port),
            );
        }
        if s.ports.len() > 1 && p.name.is_empty() {
            e.add(format!("spec.ports[{i}].name"), "Required value");
        }
        if !names.insert(p.name.as_str()) {
            e.add(
                format!("spec.ports[{i}].name"),
                format!("Duplicate value: {:?}", p.name),
            );
        }
        if let Some(super::model::IntOrString::Int(t)) = p.target_port {
            if !port_ok(t) {
                e.add(
                    format!("spec.ports[{i}].targetPort"),
                    format!("Invalid value: {t}: must be between 1 and 65535"),
                );
            }
        }
    }
    labels(&s.selector, "spec.selector", e);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(v: serde_json::Value, kind: crate::model::Kind) -> Vec<String> {
        let r = Resource::from_json_kind(kind, v.to_string().as_bytes()).unwrap();
        validate(&r).into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn invalid_fields_are_reported_by_path() {
        use crate::model::Kind::*;
        let cases: Vec<(serde_json::Value, _, Vec<&str>)> = vec![
            (
                json!({"apiVersion":"networking.istio.io/v1","kind":"WorkloadGroup",
                  "metadata":{"name":"python-http","namespace":"vm-namespace"},
                  "spec":{"template":{"serviceAccount":"vm-sa"}}}),
                WorkloadGroup,
                vec![],
            ),
            (
                json!({"apiVersion":"networking.istio.io/v1","kind":"WorkloadGroup",
                  "metadata":{"name":"Bad_Name"},
                  "spec":{"template":{"address":"1.2.3.4","ports":{"http":70000}},
                          "probe":{"httpGet":{"port":0},"tcpSocket":{"port":80}}}}),
                WorkloadGroup,
                vec![
                    "metadata.name",
                    "spec.template.address",
                    "spec.template.ports[http]",
                    "spec.probe",
                    "spec.probe.httpGet.port",
                ],
            ),
            (
                json!({"apiVersion":"networking.istio.io/v1","kind":"ServiceEntry",
                  "metadata":{"name":"se"},
                  "spec":{"hosts":["ok.example.com","*","bad host"],"addresses":["10.0.0.0/33"],
                          "resolution":"STATIC",
                          "ports":[{"number":80,"name":"http"},{"number":0,"name":"http","targetPort":99999}],
                          "workloadSelector":{"labels":{"app":"x"}},
                          "endpoints":[{"address":"1.1.1.1"}]}}),
                ServiceEntry,
                vec![
                    "spec.hosts[1]",
                    "spec.hosts[2]",
                    "spec.addresses[0]",
                    "spec.ports[1].number",
                    "spec.ports[1].targetPort",
                    "spec.ports[1].name",
                    "spec.workloadSelector",
                ],
            ),
            (
                json!({"apiVersion":"networking.istio.io/v1","kind":"WorkloadEntry",
                  "metadata":{"name":"we"},"spec":{}}),
                WorkloadEntry,
                vec!["spec.address"],
            ),
            (
                json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"mysqldb","namespace":"vm"},
                  "spec":{"ports":[{"port":3306,"name":"tcp"}],"selector":{"app":"mysqldb"}}}),
                Service,
                vec![],
            ),
            (
                json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"a.b"},
                  "spec":{"clusterIP":"nope","ports":[{"port":0}]}}),
                Service,
                vec!["metadata.name", "spec.clusterIP", "spec.ports[0].port"],
            ),
        ];
        for (v, kind, want) in cases {
            assert_eq!(paths(v.clone(), kind), want, "{v}");
        }
    }

    #[test]
    fn label_syntax_follows_kubernetes() {
        for (k, ok) in [
            ("app", true),
            ("istio.io/rev", true),
            ("-x", false),
            ("a/b/c", false),
            ("", false),
        ] {
            assert_eq!(label_key_ok(k), ok, "{k}");
        }
        for (v, ok) in [
            ("", true),
            ("v1.2_3", true),
            ("has space", false),
            ("-lead", false),
        ] {
            assert_eq!(label_value_ok(v), ok, "{v}");
        }
    }
}
