//! Semantic validation of objects that already decoded: what Istio's validation webhook and
//! the Kubernetes API server would refuse. Every finding names its field path the way kubectl
//! does (`spec.ports[0].number`); for the Istio kinds the message is the one Istio's
//! `pkg/config/validation` gives, so a refusal reads the same as `kubectl apply` against istiod.
//!
//! Istio's validation returns errors and warnings; [`check`] keeps that split. Errors refuse the
//! object, warnings are reported back to the caller (as kubectl prints the webhook's warnings)
//! and the object is accepted.

use std::collections::BTreeSet;
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

/// What validation found: errors refuse the object, warnings do not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    pub errors: Vec<FieldError>,
    pub warnings: Vec<FieldError>,
}

#[derive(Default)]
struct Errors(Findings);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.errors.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.warnings.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Errors and warnings for `r`.
pub fn check(r: &Resource) -> Findings {
    let mut e = Errors::default();
    match r {
        Resource::WorkloadGroup(o) => workload_group(o, &mut e),
        Resource::WorkloadEntry(o) => workload_entry(o, &mut e),
        Resource::ServiceEntry(o) => service_entry(o, &mut e),
        Resource::Service(o) => service(o, &mut e),
    }
    e.0
}

/// All errors with `r`, empty when it is valid (warnings are left out: see [`check`]).
pub fn validate(r: &Resource) -> Vec<FieldError> {
    check(r).errors
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
    annotations(&m.annotations, "metadata.annotations", e);
}

/// Kubernetes' limit on all of an object's annotations together (`TotalAnnotationSizeLimitB`:
/// keys and values, in bytes).
pub const MAX_ANNOTATIONS_BYTES: usize = 256 << 10;
/// Label values and the name part of qualified names (label and annotation keys).
pub const MAX_LABEL_VALUE_LEN: usize = 63;

const NAME_CHARS: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";

/// The `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?` shape of label values and name parts.
fn name_chars_ok(s: &str) -> bool {
    s.bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && s.bytes().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|c| c.is_ascii_alphanumeric())
}

/// What is wrong with `k` as a qualified name (Kubernetes' `IsQualifiedName`, which label and
/// annotation keys must be): an optional DNS-1123 subdomain prefix and '/', then a name of at
/// most 63 characters.
fn qualified_name_problem(k: &str) -> Option<String> {
    let parts: Vec<&str> = k.split('/').collect();
    let (prefix, name) = match parts.as_slice() {
        [name] => (None, *name),
        [prefix, name] => (Some(*prefix), *name),
        _ => {
            return Some(format!(
                "a qualified name {NAME_CHARS}, with an optional DNS subdomain prefix and '/'"
            ))
        }
    };
    if let Some(p) = prefix {
        if p.is_empty() {
            return Some("prefix part must be non-empty".into());
        }
        if p.len() > 253 {
            return Some("prefix part must be no more than 253 characters".into());
        }
        if !is_dns1123_subdomain(p) {
            return Some("prefix part must be a lowercase RFC 1123 subdomain".into());
        }
    }
    if name.is_empty() {
        return Some("name part must be non-empty".into());
    }
    if name.len() > MAX_LABEL_VALUE_LEN {
        return Some(format!(
            "name part must be no more than {MAX_LABEL_VALUE_LEN} characters"
        ));
    }
    (!name_chars_ok(name)).then(|| format!("name part {NAME_CHARS}"))
}

#[cfg(test)]
fn label_key_ok(k: &str) -> bool {
    qualified_name_problem(k).is_none()
}

/// What is wrong with `v` as a label value (Kubernetes' `IsValidLabelValue`): empty, or at
/// most 63 characters of the name shape.
fn label_value_problem(v: &str) -> Option<String> {
    if v.is_empty() {
        return None;
    }
    if v.len() > MAX_LABEL_VALUE_LEN {
        return Some(format!(
            "must be no more than {MAX_LABEL_VALUE_LEN} characters"
        ));
    }
    (!name_chars_ok(v)).then(|| format!("a valid label must be an empty string or {NAME_CHARS}"))
}

#[cfg(test)]
fn label_value_ok(v: &str) -> bool {
    label_value_problem(v).is_none()
}

fn labels(l: &Labels, path: &str, e: &mut Errors) {
    for (k, v) in l {
        if let Some(why) = qualified_name_problem(k) {
            e.add(
                format!("{path}[{k}]"),
                format!("Invalid value: not a valid label key: {why}"),
            );
        } else if let Some(why) = label_value_problem(v) {
            e.add(
                format!("{path}[{k}]"),
                format!("Invalid value: {v:?}: {why}"),
            );
        }
    }
}

/// Kubernetes' `ValidateAnnotations`: every key a qualified name (compared in lower case, as
/// Kubernetes does), and all keys and values together at most 256 KiB.
fn annotations(a: &Labels, path: &str, e: &mut Errors) {
    let mut total = 0usize;
    for (k, v) in a {
        if let Some(why) = qualified_name_problem(&k.to_ascii_lowercase()) {
            e.add(
                format!("{path}[{k}]"),
                format!("Invalid value: not a valid annotation key: {why}"),
            );
        }
        total = total.saturating_add(k.len()).saturating_add(v.len());
    }
    if total > MAX_ANNOTATIONS_BYTES {
        e.add(
            path,
            format!("Too long: must have at most {MAX_ANNOTATIONS_BYTES} bytes"),
        );
    }
}

/// Checks labels a VM sends with its registration: the rules of metadata labels, and at most
/// [`vmesh_api::control::MAX_REGISTER_LABELS`] of them.
pub fn validate_register_labels(l: &Labels, path: &str) -> Vec<FieldError> {
    use vmesh_api::control::MAX_REGISTER_LABELS;
    let mut e = Errors::default();
    if l.len() > MAX_REGISTER_LABELS {
        e.add(
            path,
            format!(
                "Too many: {}: must have at most {MAX_REGISTER_LABELS} items",
                l.len()
            ),
        );
        return e.0.errors;
    }
    labels(l, path, &mut e);
    e.0.errors
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
        annotations(&m.annotations, "spec.metadata.annotations", e);
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
        // Istio compares with Kubernetes' URIScheme constants: upper case only.
        if !h.scheme.is_empty() && !matches!(h.scheme.as_str(), "HTTP" | "HTTPS") {
            e.add(
                "spec.probe.httpGet.scheme",
                r#"httpGet.scheme must be one of "HTTPS", "HTTP""#,
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

/// Istio's `validateWorkloadEntry`: for a WorkloadEntry (`service_ports` `None`, host names
/// allowed) and for each inline endpoint of a ServiceEntry (its port names must be the
/// ServiceEntry's; STATIC endpoints must be IPs or unix sockets).
fn istio_workload(
    s: &WorkloadEntrySpec,
    path: &str,
    service_ports: Option<&BTreeSet<&str>>,
    allow_fqdn: bool,
    e: &mut Errors,
) {
    let addr = s.address.as_str();
    if addr.is_empty() {
        if s.network.is_empty() {
            e.add(format!("{path}.address"), "address is required");
            return;
        }
        // A workload on another network is reached through that network's gateway.
        e.warn(
            format!("{path}.address"),
            format!("address is unset with network {:?}", s.network),
        );
    }
    let unix = addr.starts_with(UNIX_PREFIX);
    if unix {
        if addr.len() == UNIX_PREFIX.len() {
            e.add(format!("{path}.address"), "unix address must not be empty");
        }
        if !s.ports.is_empty() {
            e.add(
                format!("{path}.ports"),
                format!("unix endpoint {addr} must not include ports"),
            );
        }
    } else if !addr.is_empty() && addr.parse::<IpAddr>().is_err() {
        if !allow_fqdn {
            e.add(
                format!("{path}.address"),
                format!("endpoint address {addr:?} is not a valid IP address"),
            );
        } else if validate_fqdn(addr).is_err() {
            e.add(
                format!("{path}.address"),
                format!("endpoint address {addr:?} is not a valid FQDN or an IP address"),
            );
        }
    }
    for (name, port) in &s.ports {
        let p = format!("{path}.ports[{name}]");
        if service_ports.is_some_and(|sp| !sp.contains(name.as_str())) {
            e.add(
                &p,
                format!("endpoint port {port} is not defined by the service entry"),
            );
        }
        if !is_dns1123_label_any_case(name) {
            e.add(&p, format!("invalid port name: {name}"));
        }
        if !port_ok(*port) {
            e.add(&p, port_range(*port));
        }
    }
    labels(&s.labels, &format!("{path}.labels"), e);
    if unix && service_ports.is_some_and(|sp| sp.len() != 1) {
        e.add(
            format!("{path}.address"),
            "exactly 1 service port required for unix endpoints",
        );
    }
}

const UNIX_PREFIX: &str = "unix://";

fn port_range(port: u32) -> String {
    format!("port number {port} must be in the range 1..65535")
}

fn workload_entry(o: &WorkloadEntry, e: &mut Errors) {
    metadata(&o.metadata, e);
    istio_workload(&o.spec, "spec", None, true, e);
    // Istio accepts these and so does apply (an admin may mean it), but says so: a VM
    // registering such an address is refused (`workload::canonical_address`).
    if let Some(why) = o
        .spec
        .address
        .parse::<IpAddr>()
        .ok()
        .and_then(vmesh_api::control::workload_address_refusal)
    {
        e.warn(
            "spec.address",
            format!("address {:?}: {why}", o.spec.address),
        );
    }
    if !o.spec.service_account.is_empty() && !is_dns1123_subdomain(&o.spec.service_account) {
        e.add(
            "spec.serviceAccount",
            "Invalid value: must be a lowercase RFC 1123 subdomain",
        );
    }
}

/// Istio's `labels.IsDNS1123Label`: unlike Kubernetes object names, upper case is allowed.
fn is_dns1123_label_any_case(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Istio's `ValidateDNS1123Labels`: every label a DNS-1123 label (a trailing dot allowed), the
/// top-level label not all digits.
fn validate_dns1123_labels(domain: &str) -> Result<(), String> {
    let parts: Vec<&str> = domain.split('.').collect();
    let tld = parts.last().copied().unwrap_or_default();
    if !tld.is_empty() && tld.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "domain name {domain:?} invalid (top level domain {tld:?} cannot be all-numeric)"
        ));
    }
    for (i, label) in parts.iter().enumerate() {
        if i + 1 == parts.len() && label.is_empty() {
            return Ok(());
        }
        if !is_dns1123_label_any_case(label) {
            return Err(format!(
                "domain name {domain:?} invalid (label {label:?} invalid)"
            ));
        }
    }
    Ok(())
}

/// Istio's `CheckDNS1123Preconditions`.
fn dns_preconditions(name: &str) -> Result<(), String> {
    if name.len() > 255 {
        return Err(format!("domain name {name:?} too long (max 255)"));
    }
    if name.is_empty() {
        return Err("empty domain name not allowed".into());
    }
    Ok(())
}

/// Istio's `ValidateFQDN`.
fn validate_fqdn(name: &str) -> Result<(), String> {
    dns_preconditions(name)?;
    validate_dns1123_labels(name)
}

/// Istio's `ValidateWildcardDomain`: a FQDN whose first label may be `*`, `*label` or `*-label`.
fn validate_wildcard_domain(domain: &str) -> Result<(), String> {
    dns_preconditions(domain)?;
    let (first, rest) = match domain.split_once('.') {
        Some((f, r)) => (f, Some(r)),
        None => (domain, None),
    };
    let wildcard_ok = first == "*"
        || is_dns1123_label_any_case(first)
        || first
            .strip_prefix("*-")
            .or_else(|| first.strip_prefix('*'))
            .is_some_and(is_dns1123_label_any_case);
    if !wildcard_ok {
        return Err(format!(
            "domain name {domain:?} invalid (label {first:?} invalid)"
        ));
    }
    match rest {
        Some(r) => validate_dns1123_labels(r),
        None => Ok(()),
    }
}

/// A host with a wildcard that is not a whole leftmost label (`*foo.example.com`): Istio warns
/// (`ValidatePartialWildCard`) and name tables cannot carry it.
pub fn is_partial_wildcard(host: &str) -> bool {
    host.contains('*') && host.len() != 1 && !host.starts_with("*.")
}

/// Istio's protocol names (`protocol.Parse`, case-insensitive); `None` when unknown.
pub fn parse_protocol(p: &str) -> Option<Protocol> {
    Some(match p.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "grpc" => Protocol::Grpc,
        "grpc-web" => Protocol::GrpcWeb,
        "http" => Protocol::Http,
        "http_proxy" => Protocol::HttpProxy,
        "http2" => Protocol::Http2,
        "https" => Protocol::Https,
        "tls" => Protocol::Tls,
        "mongo" => Protocol::Mongo,
        "redis" => Protocol::Redis,
        "mysql" => Protocol::MySql,
        _ => return None,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Grpc,
    GrpcWeb,
    Http,
    HttpProxy,
    Http2,
    Https,
    Tls,
    Mongo,
    Redis,
    MySql,
}

impl Protocol {
    pub fn is_http(self) -> bool {
        matches!(
            self,
            Protocol::Http
                | Protocol::Http2
                | Protocol::HttpProxy
                | Protocol::Grpc
                | Protocol::GrpcWeb
        )
    }

    pub fn is_tls(self) -> bool {
        matches!(self, Protocol::Https | Protocol::Tls)
    }

    pub fn is_tcp(self) -> bool {
        matches!(
            self,
            Protocol::Tcp
                | Protocol::Https
                | Protocol::Tls
                | Protocol::Mongo
                | Protocol::Redis
                | Protocol::MySql
        )
    }
}

/// Istio's `ValidateServiceEntry`, rule for rule, with its messages.
fn service_entry(o: &ServiceEntry, e: &mut Errors) {
    metadata(&o.metadata, e);
    let s = &o.spec;
    if let Some(w) = &s.workload_selector {
        labels(&w.labels, "spec.workloadSelector.labels", e);
        for (k, v) in &w.labels {
            if k.contains('*') || v.contains('*') {
                e.add(
                    "spec.workloadSelector.labels",
                    format!("wildcard is not supported in selector: \"{k}={v}\""),
                );
            }
        }
        if w.labels.is_empty() {
            e.warn(
                "spec.workloadSelector",
                "service entry: workload selector specified without labels, will be applied to all services in namespace",
            );
        }
        if !s.endpoints.is_empty() {
            e.add(
                "spec.workloadSelector",
                "only one of WorkloadSelector or Endpoints is allowed in Service Entry",
            );
        }
    }
    if s.hosts.is_empty() {
        e.add("spec.hosts", "service entry must have at least one host");
    }
    for (i, h) in s.hosts.iter().enumerate() {
        let path = format!("spec.hosts[{i}]");
        if h == "*" {
            e.add(path, format!("invalid host {h}"));
            continue;
        }
        if let Err(m) = validate_wildcard_domain(h) {
            e.add(&path, m);
        }
        if is_partial_wildcard(h) {
            e.warn(path, format!("partial wildcard {h:?} not allowed"));
        }
    }
    let mut cidr = false;
    for (i, a) in s.addresses.iter().enumerate() {
        let path = format!("spec.addresses[{i}]");
        if a.matches('/').count() == 1 {
            cidr = true;
            if parse_cidr(a).is_none() {
                e.add(path, format!("{a} is not a valid CIDR block"));
            }
        } else if a.parse::<IpAddr>().is_err() {
            e.add(path, format!("{a} is not a valid IP"));
        }
    }
    if cidr && !matches!(s.resolution, Resolution::None | Resolution::Static) {
        e.add(
            "spec.addresses",
            "CIDR addresses are allowed only for NONE/STATIC resolution types",
        );
    }
    let auto_allocation = super::names::should_auto_allocate(o);
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, p) in s.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        if !names.insert(p.name.as_str()) {
            e.add(
                format!("{path}.name"),
                format!("service entry port name {:?} already defined", p.name),
            );
        }
        if !numbers.insert(p.number) {
            e.add(
                format!("{path}.number"),
                format!("service entry port {} already defined", p.number),
            );
        }
        if p.target_port != 0 && !port_ok(p.target_port) {
            e.add(format!("{path}.targetPort"), port_range(p.target_port));
        }
        if s.addresses.is_empty()
            && !auto_allocation
            && (p.protocol.is_empty() || p.protocol == "TCP")
        {
            e.warn(
                format!("{path}.protocol"),
                "addresses are required for ports serving TCP (or unset) protocol when IP Autoallocation is not enabled",
            );
        }
        if !is_dns1123_label_any_case(&p.name) {
            e.add(
                format!("{path}.name"),
                format!("invalid port name: {}", p.name),
            );
        }
        if !p.protocol.is_empty() && parse_protocol(&p.protocol).is_none() {
            e.add(
                format!("{path}.protocol"),
                format!("unsupported protocol: {}", p.protocol),
            );
        }
        if !port_ok(p.number) {
            e.add(format!("{path}.number"), port_range(p.number));
        }
    }
    let resolution = resolution_name(s.resolution);
    match s.resolution {
        Resolution::None => {
            if !s.endpoints.is_empty() {
                e.add(
                    "spec.endpoints",
                    "no endpoints should be provided for resolution type none",
                );
            }
            if s.workload_selector.is_some() {
                e.warn(
                    "spec.workloadSelector",
                    "workloadSelector should not be set when resolution mode is NONE",
                );
            }
        }
        Resolution::Static => {
            for (i, ep) in s.endpoints.iter().enumerate() {
                istio_workload(ep, &format!("spec.endpoints[{i}]"), Some(&names), false, e);
            }
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            if s.endpoints.is_empty() {
                for (i, h) in s.hosts.iter().enumerate() {
                    if let Err(m) = validate_fqdn(h) {
                        e.add(
                            format!("spec.hosts[{i}]"),
                            format!("hosts must be FQDN or contain only prefix wildcards if no endpoints are provided for resolution mode {resolution}, {m}"),
                        );
                        break;
                    }
                }
            }
            if s.resolution == Resolution::DnsRoundRobin && s.endpoints.len() > 1 {
                e.add(
                    "spec.endpoints",
                    format!("there must only be 0 or 1 endpoint for resolution mode {resolution}"),
                );
            }
            for (i, ep) in s.endpoints.iter().enumerate() {
                let path = format!("spec.endpoints[{i}]");
                if ep.address.parse::<IpAddr>().is_err() && validate_fqdn(&ep.address).is_err() {
                    e.add(
                        format!("{path}.address"),
                        format!(
                            "endpoint address {:?} is not a valid FQDN or an IP address",
                            ep.address
                        ),
                    );
                }
                labels(&ep.labels, &format!("{path}.labels"), e);
                for (name, port) in &ep.ports {
                    let p = format!("{path}.ports[{name}]");
                    if !names.contains(name.as_str()) {
                        e.add(
                            &p,
                            format!("endpoint port {port} is not defined by the service entry"),
                        );
                    }
                    if !is_dns1123_label_any_case(name) {
                        e.add(&p, format!("invalid port name: {name}"));
                    }
                    if !port_ok(*port) {
                        e.add(&p, port_range(*port));
                    }
                }
            }
            let tcp = s
                .ports
                .iter()
                .any(|p| parse_protocol(&p.protocol).is_some_and(Protocol::is_tcp));
            if !s.addresses.is_empty() && tcp && s.hosts.len() > 1 {
                e.warn(
                    "spec.hosts",
                    "service entry can not have more than one host specified simultaneously with address and tcp port",
                );
            }
        }
    }
    // Plain TCP carries nothing that tells the hosts apart (HTTP has the authority, TLS the
    // SNI), so several hosts need NONE, where hosts are ignored.
    if s.resolution != Resolution::None && s.hosts.len() > 1 {
        let opaque = s
            .ports
            .iter()
            .any(|p| !parse_protocol(&p.protocol).is_some_and(|p| p.is_http() || p.is_tls()));
        if opaque {
            e.add(
                "spec.ports",
                "multiple hosts provided with non-HTTP, non-TLS ports",
            );
        }
    }
    export_to(&o.metadata.namespace, &s.export_to, e);
}

fn resolution_name(r: Resolution) -> &'static str {
    match r {
        Resolution::None => "NONE",
        Resolution::Static => "STATIC",
        Resolution::Dns => "DNS",
        Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
    }
}

/// Istio's `validateExportTo` for a ServiceEntry (which, unlike other kinds, may say `~`).
fn export_to(namespace: &str, list: &[String], e: &mut Errors) {
    let mut seen = BTreeSet::new();
    for x in list {
        let key = if x == "." { namespace } else { x.as_str() };
        if seen.contains(key) {
            if key != x {
                e.add(
                    "spec.exportTo",
                    format!("duplicate entries in exportTo: . and current namespace {namespace}"),
                );
            } else {
                e.add(
                    "spec.exportTo",
                    format!("duplicate entries in exportTo for entry {x}"),
                );
            }
            continue;
        }
        if x == "~" || x == "." || x == "*" || is_dns1123_label_any_case(key) {
            seen.insert(key);
        } else {
            e.add(
                "spec.exportTo",
                "only .,*, or a valid DNS 1123 label is allowed as exportTo entry",
            );
        }
    }
    if seen.contains("*") && list.len() > 1 {
        e.add(
            "spec.exportTo",
            "cannot have both public (*) and non-public exportTo values for a resource",
        );
    }
    if seen.contains("~") && list.len() > 1 {
        e.add(
            "spec.exportTo",
            "cannot export service entry to no one (~) and someone",
        );
    }
}

/// `ip/len` with the length within the family's width.
pub fn parse_cidr(a: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = a.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
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
                    "spec.workloadSelector",
                    "spec.hosts[1]",
                    "spec.hosts[2]",
                    "spec.addresses[0]",
                    "spec.ports[1].name",
                    "spec.ports[1].targetPort",
                    "spec.ports[1].number",
                    "spec.ports",
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

    fn se(spec: serde_json::Value) -> Resource {
        let v = json!({"apiVersion":"networking.istio.io/v1","kind":"ServiceEntry",
            "metadata":{"name":"se","namespace":"ns"},"spec":spec});
        Resource::from_json_kind(crate::model::Kind::ServiceEntry, v.to_string().as_bytes())
            .unwrap()
    }

    fn we(spec: serde_json::Value) -> Resource {
        let v = json!({"apiVersion":"networking.istio.io/v1","kind":"WorkloadEntry",
            "metadata":{"name":"we","namespace":"ns"},"spec":spec});
        Resource::from_json_kind(crate::model::Kind::WorkloadEntry, v.to_string().as_bytes())
            .unwrap()
    }

    fn wg_probe(probe: serde_json::Value) -> Resource {
        let v = json!({"apiVersion":"networking.istio.io/v1","kind":"WorkloadGroup",
            "metadata":{"name":"wg","namespace":"ns"},"spec":{"template":{},"probe":probe}});
        Resource::from_json_kind(crate::model::Kind::WorkloadGroup, v.to_string().as_bytes())
            .unwrap()
    }

    /// Istio's `ValidateServiceEntry`, `ValidateWorkloadEntry` and `validateReadinessProbe`:
    /// each case is refused (or accepted) as istiod's webhook does, with its message.
    #[test]
    fn istio_validation_parity_refusals_carry_istios_messages() {
        let http = json!([{"number": 80, "name": "http", "protocol": "HTTP"}]);
        let tcp = json!([{"number": 5432, "name": "tcp", "protocol": "TCP"}]);
        let cases: Vec<(&str, Resource, &str, &str)> = vec![
            (
                "NONE with endpoints",
                se(json!({"hosts": ["a.example.com"], "resolution": "NONE", "ports": http,
                          "endpoints": [{"address": "10.0.0.1"}]})),
                "spec.endpoints",
                "no endpoints should be provided for resolution type none",
            ),
            (
                "DNS_ROUND_ROBIN with several endpoints",
                se(json!({"hosts": ["a.example.com"], "resolution": "DNS_ROUND_ROBIN", "ports": http,
                          "endpoints": [{"address": "a1.example.com"}, {"address": "a2.example.com"}]})),
                "spec.endpoints",
                "there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN",
            ),
            (
                "CIDR addresses with DNS",
                se(json!({"hosts": ["a.example.com"], "resolution": "DNS", "ports": http,
                          "addresses": ["10.1.0.0/16"]})),
                "spec.addresses",
                "CIDR addresses are allowed only for NONE/STATIC resolution types",
            ),
            (
                "several hosts on a TCP port",
                se(json!({"hosts": ["a.example.com", "b.example.com"], "resolution": "DNS", "ports": tcp})),
                "spec.ports",
                "multiple hosts provided with non-HTTP, non-TLS ports",
            ),
            (
                "several hosts on a port without protocol",
                se(json!({"hosts": ["a.example.com", "b.example.com"], "resolution": "STATIC",
                          "ports": [{"number": 80, "name": "p"}]})),
                "spec.ports",
                "multiple hosts provided with non-HTTP, non-TLS ports",
            ),
            (
                "wildcard host with DNS and no endpoints",
                se(json!({"hosts": ["*.example.com"], "resolution": "DNS", "ports": http})),
                "spec.hosts[0]",
                "hosts must be FQDN or contain only prefix wildcards if no endpoints are provided for resolution mode DNS, domain name \"*.example.com\" invalid (label \"*\" invalid)",
            ),
            (
                "unknown protocol",
                se(json!({"hosts": ["a.example.com"], "resolution": "STATIC",
                          "ports": [{"number": 80, "name": "web", "protocol": "HTTP3"}]})),
                "spec.ports[0].protocol",
                "unsupported protocol: HTTP3",
            ),
            (
                "port name that is not a DNS label",
                se(json!({"hosts": ["a.example.com"], "resolution": "STATIC",
                          "ports": [{"number": 80, "name": "http_web", "protocol": "HTTP"}]})),
                "spec.ports[0].name",
                "invalid port name: http_web",
            ),
            (
                "host with a label that is not a DNS label",
                se(json!({"hosts": ["a_b.example.com"], "resolution": "STATIC", "ports": http})),
                "spec.hosts[0]",
                "domain name \"a_b.example.com\" invalid (label \"a_b\" invalid)",
            ),
            (
                "host with an all-numeric top-level domain",
                se(json!({"hosts": ["a.example.123"], "resolution": "STATIC", "ports": http})),
                "spec.hosts[0]",
                // Istio checks the labels after the first one as their own name, and names that.
                "domain name \"example.123\" invalid (top level domain \"123\" cannot be all-numeric)",
            ),
            (
                "the bare wildcard host",
                se(json!({"hosts": ["*"], "ports": http})),
                "spec.hosts[0]",
                "invalid host *",
            ),
            (
                "STATIC endpoint that is a host name",
                se(json!({"hosts": ["a.example.com"], "resolution": "STATIC", "ports": http,
                          "endpoints": [{"address": "db.example.com"}]})),
                "spec.endpoints[0].address",
                "endpoint address \"db.example.com\" is not a valid IP address",
            ),
            (
                "endpoint port the ServiceEntry does not define",
                se(json!({"hosts": ["a.example.com"], "resolution": "STATIC", "ports": http,
                          "endpoints": [{"address": "10.0.0.1", "ports": {"grpc": 9000}}]})),
                "spec.endpoints[0].ports[grpc]",
                "endpoint port 9000 is not defined by the service entry",
            ),
            (
                "exportTo ~ with another namespace",
                se(json!({"hosts": ["a.example.com"], "resolution": "STATIC", "ports": http,
                          "exportTo": ["~", "other"]})),
                "spec.exportTo",
                "cannot export service entry to no one (~) and someone",
            ),
            (
                "lower-case probe scheme",
                wg_probe(json!({"httpGet": {"port": 8080, "scheme": "https"}})),
                "spec.probe.httpGet.scheme",
                "httpGet.scheme must be one of \"HTTPS\", \"HTTP\"",
            ),
            (
                "WorkloadEntry without address or network",
                we(json!({})),
                "spec.address",
                "address is required",
            ),
        ];
        for (what, r, path, message) in cases {
            let f = check(&r);
            assert!(
                f.errors.contains(&FieldError {
                    path: path.into(),
                    message: message.into()
                }),
                "{what}: {:?}",
                f.errors
            );
        }
    }

    /// What Istio accepts is accepted; where Istio only warns, vmesh warns too and applies.
    #[test]
    fn istio_validation_parity_accepts_what_istio_accepts() {
        let cases: Vec<(&str, Resource, Vec<&str>)> = vec![
            (
                "ServiceEntry without ports",
                se(json!({"hosts": ["a.example.com"], "resolution": "DNS"})),
                vec![],
            ),
            (
                "exportTo ~",
                se(json!({"hosts": ["a.example.com"], "resolution": "STATIC",
                          "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                          "exportTo": ["~"]})),
                vec![],
            ),
            (
                "WorkloadEntry with a network and no address",
                we(json!({"network": "network-2"})),
                vec!["address is unset with network \"network-2\""],
            ),
            (
                "NONE with a selector",
                se(json!({"hosts": ["a.example.com"], "resolution": "NONE",
                          "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                          "workloadSelector": {"labels": {"app": "a"}}})),
                vec!["workloadSelector should not be set when resolution mode is NONE"],
            ),
            (
                "partial wildcard host",
                se(json!({"hosts": ["*foo.example.com"], "resolution": "STATIC",
                          "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}]})),
                vec!["partial wildcard \"*foo.example.com\" not allowed"],
            ),
            (
                "TCP port without addresses and auto-allocation opted out",
                {
                    let mut r = se(json!({"hosts": ["a.example.com"], "resolution": "DNS",
                                          "ports": [{"number": 5432, "name": "tcp", "protocol": "TCP"}]}));
                    r.meta_mut().labels.insert(
                        "networking.istio.io/enable-autoallocate-ip".into(),
                        "false".into(),
                    );
                    r
                },
                vec!["addresses are required for ports serving TCP (or unset) protocol when IP Autoallocation is not enabled"],
            ),
            (
                "upper-case host and DNS endpoints",
                se(json!({"hosts": ["DB.Example.com"], "resolution": "DNS",
                          "ports": [{"number": 5432, "name": "tcp", "protocol": "TCP"}],
                          "endpoints": [{"address": "db1.example.com"}]})),
                vec![],
            ),
            (
                "upper-case probe scheme",
                wg_probe(json!({"httpGet": {"port": 8080, "scheme": "HTTPS"}})),
                vec![],
            ),
        ];
        for (what, r, warnings) in cases {
            let f = check(&r);
            assert_eq!(f.errors, vec![], "{what}");
            let got: Vec<&str> = f.warnings.iter().map(|w| w.message.as_str()).collect();
            assert_eq!(got, warnings, "{what}");
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

    fn label_findings(l: &[(&str, &str)]) -> Vec<FieldError> {
        let l: Labels = l
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        validate_register_labels(&l, "labels")
    }

    #[test]
    fn label_value_over_63_is_refused() {
        assert_eq!(label_findings(&[("app", &"v".repeat(63))]), vec![]);
        let e = label_findings(&[("app", &"v".repeat(64))]);
        assert!(e[0].message.contains("no more than 63"), "{e:?}");
    }

    #[test]
    fn label_value_outside_the_name_charset_is_refused() {
        for v in ["a b", "-a", "a-", "a/b", "\u{200b}", "é", "a\nb"] {
            assert!(!label_value_ok(v), "{v:?}");
        }
        for v in ["", "a", "A-b_c.9", "1"] {
            assert!(label_value_ok(v), "{v:?}");
        }
    }

    #[test]
    fn label_key_name_part_over_63_is_refused() {
        assert!(label_key_ok(&"k".repeat(63)));
        let why = qualified_name_problem(&"k".repeat(64)).unwrap();
        assert!(why.contains("name part must be no more than 63"), "{why}");
        let why = qualified_name_problem(&format!("example.com/{}", "k".repeat(64))).unwrap();
        assert!(why.contains("name part"), "{why}");
    }

    #[test]
    fn label_key_prefix_must_be_a_dns1123_subdomain_of_at_most_253() {
        let long = vec!["p".repeat(63); 4].join(".");
        assert_eq!(long.len(), 255);
        let why = qualified_name_problem(&format!("{long}/app")).unwrap();
        assert!(why.contains("253"), "{why}");
        assert_eq!(
            qualified_name_problem("/app").as_deref(),
            Some("prefix part must be non-empty")
        );
        for bad in ["Example.com/app", "ex_ample.com/app", "a..b/app", "a/b/c"] {
            assert!(!label_key_ok(bad), "{bad}");
        }
        let ok = format!("{}/app", vec!["p".repeat(63); 3].join("."));
        assert!(label_key_ok(&ok));
        assert!(label_key_ok("app.kubernetes.io/Name_1"));
    }

    #[test]
    fn more_than_max_register_labels_are_refused() {
        use vmesh_api::control::MAX_REGISTER_LABELS;
        let keys: Vec<String> = (0..=MAX_REGISTER_LABELS).map(|i| format!("k{i}")).collect();
        let all: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), "v")).collect();
        assert_eq!(label_findings(&all[..MAX_REGISTER_LABELS]), vec![]);
        let e = label_findings(&all);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].message.starts_with("Too many: 65"), "{e:?}");
    }

    #[test]
    fn annotations_over_256_kib_in_total_are_refused() {
        let wg = |annotations: serde_json::Value| {
            Resource::from_json_kind(
                crate::model::Kind::WorkloadGroup,
                &serde_json::to_vec(&serde_json::json!({
                    "apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
                    "metadata": {"name": "g", "namespace": "ns", "annotations": annotations},
                    "spec": {"template": {}}}))
                .unwrap(),
            )
            .unwrap()
        };
        // Two keys of 1 byte each: exactly at the limit, then one byte over.
        let v = "x".repeat(MAX_ANNOTATIONS_BYTES / 2 - 1);
        assert_eq!(validate(&wg(serde_json::json!({"a": v, "b": v}))), vec![]);
        let e = validate(&wg(serde_json::json!({"a": v, "b": format!("{v}x")})));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].path, "metadata.annotations");
        assert!(e[0].message.contains("262144"), "{e:?}");
    }

    #[test]
    fn annotation_keys_must_be_qualified_names() {
        let with_key = |key: &str| {
            let mut r = we(serde_json::json!({"address": "10.0.0.1"}));
            if let Resource::WorkloadEntry(e) = &mut r {
                e.metadata.annotations.insert(key.into(), "v".into());
            }
            validate(&r)
        };
        assert_eq!(with_key("example.com/Some-Key"), vec![]);
        assert_eq!(with_key("istio.io/connectedAt"), vec![]);
        for bad in ["a b", "/x", "a/b/c", "x\u{1b}[31m"] {
            let e = with_key(bad);
            assert_eq!(e.len(), 1, "{bad:?}: {e:?}");
            assert!(e[0].message.contains("annotation key"), "{e:?}");
        }
    }

    #[test]
    fn a_workload_entry_at_a_link_local_address_is_accepted_with_a_warning() {
        for addr in ["169.254.169.254", "0.0.0.0", "fe80::1", "224.0.0.1"] {
            let f = check(&we(serde_json::json!({"address": addr})));
            assert_eq!(f.errors, vec![], "{addr}");
            assert_eq!(f.warnings.len(), 1, "{addr}: {f:?}");
            assert_eq!(f.warnings[0].path, "spec.address");
        }
        let f = check(&we(serde_json::json!({"address": "10.0.0.1"})));
        assert_eq!(f.warnings, vec![]);
    }
}
