//! Which workloads back a service, on which ports: ServiceEntry `workloadSelector` and inline
//! `endpoints`, and Kubernetes Service `selector` (Istio selects WorkloadEntries into both).
//!
//! Port mapping, as Istio: for a ServiceEntry (`convertWorkloadInstanceToServiceInstance`) a
//! workload's own port named like the service port wins, then the port's `targetPort`, then its
//! number. For a Kubernetes Service (`findServiceTargetPort` + `serviceInstanceFromWorkloadInstance`)
//! a named `targetPort` must be a port of the workload, and an integer one yields to a workload
//! port named like the Service port.
//!
//! Workloads whose address is a host name or a unix socket are selected only by DNS
//! ServiceEntries, as in Istio (`DNSServiceEntryOnly`): nothing else could route to them.

use std::net::IpAddr;

use super::model::{
    IntOrString, Labels, Resolution, Service, ServiceEntry, ServiceEntryPort, ServicePort,
    WorkloadEntry, WorkloadEntrySpec,
};
use super::workload::{effective_labels, is_auto_registered, is_healthy, sidecar_service_account};

/// Every selector label present with the same value. An empty selector selects everything.
pub fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// One backend of one service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub address: String,
    pub port: u16,
    pub network: String,
    pub locality: String,
    pub weight: u32,
    pub healthy: bool,
    /// The service account of the workload's sidecar (in the service's namespace, where
    /// selection looks), `None` for a plain endpoint: see [`sidecar_service_account`].
    pub service_account: Option<String>,
}

fn endpoint(
    spec: &WorkloadEntrySpec,
    port: u32,
    healthy: bool,
    service_account: Option<&str>,
) -> Option<Endpoint> {
    Some(Endpoint {
        address: spec.address.clone(),
        port: u16::try_from(port).ok().filter(|p| *p != 0)?,
        network: spec.network.clone(),
        locality: spec.locality.clone(),
        weight: spec.weight.max(1),
        healthy,
        service_account: service_account.map(str::to_string),
    })
}

/// [`sidecar_service_account`] of a selected WorkloadEntry.
fn entry_service_account(e: &WorkloadEntry) -> Option<&str> {
    sidecar_service_account(&e.spec, &effective_labels(e), is_auto_registered(e))
}

fn se_target(spec: &WorkloadEntrySpec, port: &ServiceEntryPort) -> u32 {
    match spec.ports.get(&port.name) {
        Some(p) => *p,
        None if port.target_port != 0 => port.target_port,
        None => port.number,
    }
}

/// Whether only a DNS ServiceEntry can select this workload: its address is not an IP.
fn dns_only(e: &WorkloadEntry) -> bool {
    !e.spec.address.is_empty() && e.spec.address.parse::<IpAddr>().is_err()
}

/// Whether a ServiceEntry resolves its endpoints by DNS (Istio's `isDNSTypeService`).
pub fn is_dns(se: &ServiceEntry) -> bool {
    matches!(
        se.spec.resolution,
        Resolution::Dns | Resolution::DnsRoundRobin
    )
}

/// The entries a ServiceEntry's selector picks: same namespace, labels match (an entry's
/// labels are `metadata.labels` over `spec.labels`, as Istio's `ConvertWorkloadEntry` has them).
pub fn selected_by_service_entry<'a>(
    se: &ServiceEntry,
    entries: impl IntoIterator<Item = &'a WorkloadEntry>,
) -> Vec<&'a WorkloadEntry> {
    let Some(sel) = &se.spec.workload_selector else {
        return Vec::new();
    };
    let dns = is_dns(se);
    entries
        .into_iter()
        .filter(|e| {
            e.metadata.namespace == se.metadata.namespace
                && selects(&sel.labels, &effective_labels(e))
                && (dns || !dns_only(e))
        })
        .collect()
}

/// Endpoints of one ServiceEntry port: its inline endpoints, or the selected workloads.
pub fn service_entry_endpoints(
    se: &ServiceEntry,
    port: &ServiceEntryPort,
    selected: &[&WorkloadEntry],
) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = if se.spec.workload_selector.is_some() {
        selected
            .iter()
            .filter_map(|e| {
                endpoint(
                    &e.spec,
                    se_target(&e.spec, port),
                    is_healthy(e),
                    entry_service_account(e),
                )
            })
            .collect()
    } else {
        se.spec
            .endpoints
            .iter()
            // Istio converts inline endpoints as WorkloadEntries: the same TLS rule.
            .filter_map(|s| {
                endpoint(
                    s,
                    se_target(s, port),
                    true,
                    sidecar_service_account(s, &s.labels, false),
                )
            })
            .collect()
    };
    out.sort();
    out
}

/// The entries a Kubernetes Service selects: same namespace, non-empty selector matches.
pub fn selected_by_service<'a>(
    svc: &Service,
    entries: impl IntoIterator<Item = &'a WorkloadEntry>,
) -> Vec<&'a WorkloadEntry> {
    if svc.spec.selector.is_empty() {
        return Vec::new();
    }
    entries
        .into_iter()
        .filter(|e| {
            e.metadata.namespace == svc.metadata.namespace
                && selects(&svc.spec.selector, &effective_labels(e))
                && !dns_only(e)
        })
        .collect()
}

/// Endpoints of one Service port among the selected workloads, as Istio maps a Service port
/// onto a WorkloadEntry: a named `targetPort` the workload does not declare leaves that
/// workload out; an integer (or defaulted) `targetPort` is used unless the workload declares a
/// port named like the Service port, which wins.
pub fn service_endpoints(port: &ServicePort, selected: &[&WorkloadEntry]) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = selected
        .iter()
        .filter_map(|e| {
            let named = |name: &str| e.spec.ports.get(name).copied().filter(|p| *p != 0);
            let target = match &port.target_port {
                Some(IntOrString::String(name)) if !name.is_empty() => named(name)?,
                Some(IntOrString::Int(n)) if *n != 0 => named(&port.name).unwrap_or(*n),
                _ => named(&port.name).unwrap_or(port.port),
            };
            endpoint(&e.spec, target, is_healthy(e), entry_service_account(e))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ObjectMeta, ServiceEntrySpec, ServiceSpec, WorkloadSelector};

    fn we(
        name: &str,
        ns: &str,
        addr: &str,
        labels: &[(&str, &str)],
        ports: &[(&str, u32)],
    ) -> WorkloadEntry {
        WorkloadEntry {
            api_version: "networking.istio.io/v1".into(),
            kind: "WorkloadEntry".into(),
            metadata: ObjectMeta {
                name: name.into(),
                namespace: ns.into(),
                ..Default::default()
            },
            spec: WorkloadEntrySpec {
                address: addr.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ports: ports.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                ..Default::default()
            },
            status: None,
        }
    }

    fn vmservice() -> ServiceEntry {
        ServiceEntry {
            api_version: "networking.istio.io/v1".into(),
            kind: "ServiceEntry".into(),
            metadata: ObjectMeta {
                name: "vmservice".into(),
                namespace: "vm-namespace".into(),
                ..Default::default()
            },
            spec: ServiceEntrySpec {
                hosts: vec!["vmservice.example.com".into()],
                ports: vec![
                    ServiceEntryPort {
                        number: 80,
                        name: "http".into(),
                        protocol: "HTTP".into(),
                        target_port: 9090,
                    },
                    ServiceEntryPort {
                        number: 8443,
                        name: "https".into(),
                        protocol: "HTTPS".into(),
                        target_port: 0,
                    },
                ],
                workload_selector: Some(WorkloadSelector {
                    labels: [("app".to_string(), "python-http".to_string())].into(),
                }),
                ..Default::default()
            },
            status: None,
        }
    }

    #[test]
    fn selector_matching() {
        let l: Labels = [
            ("app".into(), "python-http".into()),
            ("v".into(), "1".into()),
        ]
        .into();
        let cases: [(&[(&str, &str)], bool); 4] = [
            (&[], true),
            (&[("app", "python-http")], true),
            (&[("app", "python-http"), ("v", "2")], false),
            (&[("other", "x")], false),
        ];
        for (sel, want) in cases {
            let sel: Labels = sel
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(selects(&sel, &l), want, "{sel:?}");
        }
    }

    #[test]
    fn service_entry_ports_map_through_workload_names_then_target_port_then_number() {
        let se = vmservice();
        let entries = [
            we(
                "a",
                "vm-namespace",
                "10.0.0.2",
                &[("app", "python-http")],
                &[],
            ),
            we(
                "b",
                "vm-namespace",
                "10.0.0.1",
                &[("app", "python-http")],
                &[("http", 8080), ("https", 9443)],
            ),
            we("c", "other-ns", "10.0.0.3", &[("app", "python-http")], &[]),
            we("d", "vm-namespace", "10.0.0.4", &[("app", "else")], &[]),
        ];
        let sel = selected_by_service_entry(&se, &entries);
        assert_eq!(sel.len(), 2);
        let http: Vec<_> = service_entry_endpoints(&se, &se.spec.ports[0], &sel)
            .into_iter()
            .map(|e| (e.address, e.port))
            .collect();
        assert_eq!(
            http,
            [
                ("10.0.0.1".to_string(), 8080),
                ("10.0.0.2".to_string(), 9090)
            ]
        );
        let https: Vec<_> = service_entry_endpoints(&se, &se.spec.ports[1], &sel)
            .into_iter()
            .map(|e| (e.address, e.port))
            .collect();
        assert_eq!(
            https,
            [
                ("10.0.0.1".to_string(), 9443),
                ("10.0.0.2".to_string(), 8443)
            ]
        );
    }

    #[test]
    fn inline_endpoints_and_kubernetes_services() {
        let mut se = vmservice();
        se.spec.workload_selector = None;
        se.spec.endpoints = vec![WorkloadEntrySpec {
            address: "192.0.2.1".into(),
            weight: 3,
            ..Default::default()
        }];
        let eps = service_entry_endpoints(&se, &se.spec.ports[0], &[]);
        assert_eq!(
            (eps[0].port, eps[0].weight, eps[0].healthy),
            (9090, 3, true)
        );

        let svc = Service {
            api_version: "v1".into(),
            kind: "Service".into(),
            metadata: ObjectMeta {
                name: "mysqldb".into(),
                namespace: "vm".into(),
                ..Default::default()
            },
            spec: ServiceSpec {
                selector: [("app".to_string(), "mysqldb".to_string())].into(),
                ports: vec![
                    ServicePort {
                        name: "tcp".into(),
                        port: 3306,
                        ..Default::default()
                    },
                    ServicePort {
                        name: "named".into(),
                        port: 80,
                        target_port: Some(IntOrString::String("web".into())),
                        ..Default::default()
                    },
                    ServicePort {
                        name: "num".into(),
                        port: 81,
                        target_port: Some(IntOrString::Int(8081)),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
            status: None,
        };
        let entries = [
            we(
                "m1",
                "vm",
                "10.1.0.1",
                &[("app", "mysqldb")],
                &[("web", 8000)],
            ),
            we("m2", "vm", "10.1.0.2", &[("app", "mysqldb")], &[]),
        ];
        let sel = selected_by_service(&svc, &entries);
        let ports = |i: usize| -> Vec<(String, u16)> {
            service_endpoints(&svc.spec.ports[i], &sel)
                .into_iter()
                .map(|e| (e.address, e.port))
                .collect()
        };
        assert_eq!(
            ports(0),
            [
                ("10.1.0.1".to_string(), 3306),
                ("10.1.0.2".to_string(), 3306)
            ]
        );
        assert_eq!(ports(1), [("10.1.0.1".to_string(), 8000)]);
        assert_eq!(
            ports(2),
            [
                ("10.1.0.1".to_string(), 8081),
                ("10.1.0.2".to_string(), 8081)
            ]
        );
        let mut no_sel = svc.clone();
        no_sel.spec.selector.clear();
        assert!(selected_by_service(&no_sel, &entries).is_empty());
    }

    /// Istio `findServiceTargetPort` + `serviceInstanceFromWorkloadInstance`.
    #[test]
    fn a_workload_port_named_like_the_service_port_wins_over_an_integer_target_port() {
        let svc = Service {
            api_version: "v1".into(),
            kind: "Service".into(),
            metadata: ObjectMeta {
                name: "web".into(),
                namespace: "vm".into(),
                ..Default::default()
            },
            spec: ServiceSpec {
                selector: [("app".to_string(), "web".to_string())].into(),
                ports: vec![ServicePort {
                    name: "http".into(),
                    port: 80,
                    target_port: Some(IntOrString::Int(8080)),
                    ..Default::default()
                }],
                ..Default::default()
            },
            status: None,
        };
        let entries = [
            we("a", "vm", "10.1.0.1", &[("app", "web")], &[("http", 9000)]),
            we("b", "vm", "10.1.0.2", &[("app", "web")], &[]),
            // A host-name address: only DNS ServiceEntries can use it.
            we("c", "vm", "vm3.example.com", &[("app", "web")], &[]),
        ];
        let sel = selected_by_service(&svc, &entries);
        let eps: Vec<(String, u16)> = service_endpoints(&svc.spec.ports[0], &sel)
            .into_iter()
            .map(|e| (e.address, e.port))
            .collect();
        assert_eq!(
            eps,
            [
                ("10.1.0.1".to_string(), 9000),
                ("10.1.0.2".to_string(), 8080)
            ]
        );
    }
}
