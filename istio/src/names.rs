//! Name-table assembly: the mesh's Services and ServiceEntries, with the WorkloadEntries they
//! select, become one [`NameTable`] per client namespace.
//!
//! [`MeshNames::build`] does the per-mesh work once (selection, port mapping, health, VIPs);
//! [`MeshNames::table_for`] then filters by visibility (`exportTo`) and picks one definition
//! per host. The table's version is a hash of its content, so it changes exactly when what a
//! namespace sees changes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::model::{Resolution, Service, ServiceEntry, WorkloadEntry};
use super::select::{
    selected_by_service, selected_by_service_entry, service_endpoints, service_entry_endpoints,
    Endpoint,
};
use super::vip::{slot_ips, VipTable};
use vmesh_api::names::{self as table, NameInfo, NameTable, PortRoutes, Registry, ServiceRoutes};
use vmesh_api::time::parse_rfc3339;

/// Kubernetes annotation that limits a Service's visibility, as Istio reads it.
pub const ANNOTATION_EXPORT_TO: &str = "networking.istio.io/exportTo";

/// Everything the tables are built from.
#[derive(Debug, Clone, Copy)]
pub struct Mesh<'a> {
    pub domain: &'a str,
    pub services: &'a [&'a Service],
    pub service_entries: &'a [&'a ServiceEntry],
    pub entries: &'a [&'a WorkloadEntry],
    pub vips: &'a VipTable,
}

/// ServiceEntry hosts that get an allocated VIP: no `addresses`, not a wildcard, resolution
/// other than NONE (Istio's rule).
pub fn hosts_needing_vips(service_entries: &[&ServiceEntry]) -> BTreeSet<String> {
    service_entries
        .iter()
        .filter(|se| se.spec.addresses.is_empty() && se.spec.resolution != Resolution::None)
        .flat_map(|se| se.spec.hosts.iter())
        .filter(|h| !h.starts_with("*."))
        .map(|h| h.to_ascii_lowercase())
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Visibility {
    All,
    Namespaces(BTreeSet<String>),
}

impl Visibility {
    fn parse<'a>(own_ns: &str, list: impl Iterator<Item = &'a str>) -> Visibility {
        let mut set = BTreeSet::new();
        for x in list {
            match x.trim() {
                "*" => return Visibility::All,
                "." => {
                    set.insert(own_ns.to_string());
                }
                "" => {}
                ns => {
                    set.insert(ns.to_string());
                }
            }
        }
        if set.is_empty() {
            Visibility::All
        } else {
            Visibility::Namespaces(set)
        }
    }

    fn sees(&self, ns: &str) -> bool {
        match self {
            Visibility::All => true,
            Visibility::Namespaces(s) => s.contains(ns),
        }
    }
}

/// One definition of one host.
#[derive(Debug, Clone)]
struct HostDef {
    host: String,
    namespace: String,
    source: String,
    created: u64,
    registry: Registry,
    visibility: Visibility,
    info: NameInfo,
    routes: ServiceRoutes,
}

impl HostDef {
    /// Lower sorts first: Kubernetes over ServiceEntry, then older, then by namespace/name.
    fn rank(&self) -> (u8, u64, &str, &str) {
        let reg = match self.registry {
            Registry::Kubernetes => 0,
            Registry::External => 1,
        };
        (reg, self.created, &self.namespace, &self.source)
    }
}

/// The mesh's hosts, computed once per change, from which per-namespace tables are cut.
#[derive(Debug, Clone, Default)]
pub struct MeshNames {
    domain: String,
    /// Host -> its definitions, best first.
    hosts: BTreeMap<String, Vec<HostDef>>,
}

fn to_port(p: u32) -> u16 {
    u16::try_from(p).unwrap_or(0)
}

fn routes_ports(
    ports: impl Iterator<Item = (u32, String, String, Vec<Endpoint>)>,
) -> Vec<PortRoutes> {
    ports
        .map(|(port, name, protocol, eps)| PortRoutes {
            port: to_port(port),
            name,
            protocol,
            endpoints: eps
                .into_iter()
                .filter(|e| e.healthy)
                .map(|e| table::Endpoint {
                    address: e.address,
                    port: e.port,
                    network: e.network,
                    locality: e.locality,
                    weight: e.weight,
                })
                .collect(),
        })
        .collect()
}

fn created(ts: &str) -> u64 {
    parse_rfc3339(ts).unwrap_or(u64::MAX)
}

impl MeshNames {
    pub fn build(mesh: &Mesh<'_>) -> MeshNames {
        let mut out = MeshNames {
            domain: mesh.domain.to_string(),
            hosts: BTreeMap::new(),
        };
        // Selectors only look inside their own namespace: index once, not per service.
        let mut by_ns: BTreeMap<&str, Vec<&WorkloadEntry>> = BTreeMap::new();
        for e in mesh.entries {
            by_ns
                .entry(e.metadata.namespace.as_str())
                .or_default()
                .push(e);
        }
        let in_ns = |ns: &str| by_ns.get(ns).map(Vec::as_slice).unwrap_or_default();
        for svc in mesh.services {
            out.add_service(svc, in_ns(&svc.metadata.namespace));
        }
        for se in mesh.service_entries {
            out.add_service_entry(se, in_ns(&se.metadata.namespace), mesh);
        }
        for defs in out.hosts.values_mut() {
            defs.sort_by(|a, b| a.rank().cmp(&b.rank()));
        }
        out
    }

    fn push(&mut self, def: HostDef) {
        self.hosts.entry(def.host.clone()).or_default().push(def);
    }

    fn add_service(&mut self, svc: &Service, entries: &[&WorkloadEntry]) {
        let m = &svc.metadata;
        let host = format!("{}.{}.svc.{}", m.name, m.namespace, self.domain);
        let selected = selected_by_service(svc, entries.iter().copied());
        let per_port: Vec<(u32, String, String, Vec<Endpoint>)> = svc
            .spec
            .ports
            .iter()
            .map(|p| {
                (
                    p.port,
                    p.name.clone(),
                    p.app_protocol.clone(),
                    service_endpoints(p, &selected),
                )
            })
            .collect();
        let headless = svc.spec.cluster_ip == "None";
        let mut vips: Vec<IpAddr> = Vec::new();
        for ip in std::iter::once(&svc.spec.cluster_ip).chain(svc.spec.cluster_ips.iter()) {
            if let Ok(ip) = ip.parse::<IpAddr>() {
                if !vips.contains(&ip) {
                    vips.push(ip);
                }
            }
        }
        let ips = if headless {
            // Headless names answer with the healthy workloads themselves.
            let set: BTreeSet<IpAddr> = selected
                .iter()
                .filter(|e| super::workload::is_healthy(e))
                .filter_map(|e| e.spec.address.parse().ok())
                .collect();
            set.into_iter().collect()
        } else {
            vips.clone()
        };
        let visibility = Visibility::parse(
            &m.namespace,
            m.annotations
                .get(ANNOTATION_EXPORT_TO)
                .map(String::as_str)
                .unwrap_or_default()
                .split(','),
        );
        self.push(HostDef {
            host,
            namespace: m.namespace.clone(),
            source: m.name.clone(),
            created: created(&m.creation_timestamp),
            registry: Registry::Kubernetes,
            visibility,
            info: NameInfo {
                ips,
                registry: Registry::Kubernetes,
                shortname: m.name.clone(),
                namespace: m.namespace.clone(),
            },
            routes: ServiceRoutes {
                namespace: m.namespace.clone(),
                registry: Registry::Kubernetes,
                vips,
                ports: routes_ports(per_port.into_iter()),
            },
        });
    }

    fn add_service_entry(
        &mut self,
        se: &ServiceEntry,
        entries: &[&WorkloadEntry],
        mesh: &Mesh<'_>,
    ) {
        let m = &se.metadata;
        let selected = selected_by_service_entry(se, entries.iter().copied());
        let per_port: Vec<(u32, String, String, Vec<Endpoint>)> = se
            .spec
            .ports
            .iter()
            .map(|p| {
                (
                    p.number,
                    p.name.clone(),
                    p.protocol.clone(),
                    service_entry_endpoints(se, p, &selected),
                )
            })
            .collect();
        let declared: Vec<IpAddr> = se
            .spec
            .addresses
            .iter()
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .collect();
        let visibility =
            Visibility::parse(&m.namespace, se.spec.export_to.iter().map(String::as_str));
        for host in &se.spec.hosts {
            let host = host.to_ascii_lowercase();
            let ips = if !declared.is_empty() {
                declared.clone()
            } else {
                mesh.vips
                    .get(&host)
                    .map(|s| slot_ips(*s).to_vec())
                    .unwrap_or_default()
            };
            self.push(HostDef {
                host: host.clone(),
                namespace: m.namespace.clone(),
                source: m.name.clone(),
                created: created(&m.creation_timestamp),
                registry: Registry::External,
                visibility: visibility.clone(),
                info: NameInfo {
                    ips: ips.clone(),
                    registry: Registry::External,
                    shortname: String::new(),
                    namespace: String::new(),
                },
                routes: ServiceRoutes {
                    namespace: m.namespace.clone(),
                    registry: Registry::External,
                    vips: ips,
                    ports: routes_ports(per_port.clone().into_iter()),
                },
            });
        }
    }

    /// The table a client in `namespace` receives, its version set.
    pub fn table_for(&self, namespace: &str) -> NameTable {
        let mut names = BTreeMap::new();
        let mut services = BTreeMap::new();
        for (host, defs) in &self.hosts {
            // The client's own namespace wins over the global order, as in Istio's sidecar scope.
            let visible = defs.iter().filter(|d| d.visibility.sees(namespace));
            let best = visible
                .clone()
                .find(|d| d.namespace == namespace)
                .or_else(|| defs.iter().find(|d| d.visibility.sees(namespace)));
            let Some(def) = best else { continue };
            if !def.info.ips.is_empty() {
                names.insert(host.clone(), def.info.clone());
            }
            if !def.routes.ports.is_empty() {
                services.insert(host.clone(), def.routes.clone());
            }
        }
        let mut t = NameTable {
            version: String::new(),
            namespace: namespace.to_string(),
            domain: self.domain.clone(),
            search_domains: vec![
                format!("{namespace}.svc.{}", self.domain),
                format!("svc.{}", self.domain),
                self.domain.clone(),
            ],
            names,
            services,
        };
        t.version = content_version(&t);
        t
    }
}

/// A hash of everything but the version: equal content, equal version.
pub fn content_version(t: &NameTable) -> String {
    let json = t.to_json();
    let h = json.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use crate::vip::allocate;
    use crate::workload::{apply_health, HealthReport, ANNOTATION_HEALTH_CHECKS_ENABLED};
    use vmesh_core::names::NameIndex;

    fn meta(name: &str, ns: &str) -> ObjectMeta {
        ObjectMeta {
            name: name.into(),
            namespace: ns.into(),
            ..Default::default()
        }
    }

    fn vm(name: &str, addr: &str, app: &str) -> WorkloadEntry {
        WorkloadEntry {
            api_version: "networking.istio.io/v1".into(),
            kind: "WorkloadEntry".into(),
            metadata: meta(name, "vm-namespace"),
            spec: WorkloadEntrySpec {
                address: addr.into(),
                labels: [("app".to_string(), app.to_string())].into(),
                ..Default::default()
            },
            status: None,
        }
    }

    fn vmservice(resolution: Resolution) -> ServiceEntry {
        ServiceEntry {
            api_version: "networking.istio.io/v1".into(),
            kind: "ServiceEntry".into(),
            metadata: meta("vmservice", "vm-namespace"),
            spec: ServiceEntrySpec {
                hosts: vec!["vmservice.example.com".into()],
                location: Location::MeshInternal,
                resolution,
                ports: vec![ServiceEntryPort {
                    number: 80,
                    name: "http".into(),
                    protocol: "HTTP".into(),
                    target_port: 9090,
                }],
                workload_selector: Some(WorkloadSelector {
                    labels: [("app".to_string(), "python-http".to_string())].into(),
                }),
                ..Default::default()
            },
            status: None,
        }
    }

    fn svc(name: &str, ns: &str, cluster_ip: &str) -> Service {
        Service {
            api_version: "v1".into(),
            kind: "Service".into(),
            metadata: meta(name, ns),
            spec: ServiceSpec {
                cluster_ip: cluster_ip.into(),
                ports: vec![ServicePort {
                    name: "tcp".into(),
                    port: 3306,
                    ..Default::default()
                }],
                selector: [("app".to_string(), "mysqldb".to_string())].into(),
                ..Default::default()
            },
            status: None,
        }
    }

    struct Fixture {
        services: Vec<Service>,
        ses: Vec<ServiceEntry>,
        entries: Vec<WorkloadEntry>,
    }

    impl Fixture {
        fn names(&self) -> MeshNames {
            let services: Vec<&Service> = self.services.iter().collect();
            let ses: Vec<&ServiceEntry> = self.ses.iter().collect();
            let entries: Vec<&WorkloadEntry> = self.entries.iter().collect();
            let vips = allocate(&VipTable::new(), &hosts_needing_vips(&ses));
            MeshNames::build(&Mesh {
                domain: "cluster.local",
                services: &services,
                service_entries: &ses,
                entries: &entries,
                vips: &vips,
            })
        }
    }

    #[test]
    fn vm_service_entry_gets_a_vip_and_healthy_endpoints_on_the_target_port() {
        let mut sick = vm("python-http-10.0.0.3", "10.0.0.3", "python-http");
        sick.metadata
            .annotations
            .insert(ANNOTATION_HEALTH_CHECKS_ENABLED.into(), "true".into());
        let f = Fixture {
            services: vec![],
            ses: vec![vmservice(Resolution::Static)],
            entries: vec![
                vm("python-http-10.0.0.1", "10.0.0.1", "python-http"),
                vm("x", "10.0.0.2", "other"),
                sick.clone(),
            ],
        };
        let t = f.names().table_for("sample");
        let info = &t.names["vmservice.example.com"];
        assert_eq!(info.registry, Registry::External);
        assert_eq!(info.ips.len(), 2);
        assert!(info.ips[0].to_string().starts_with("240.240."));
        assert!(info.ips[1].to_string().starts_with("2001:2::"));
        let routes = &t.services["vmservice.example.com"];
        assert_eq!(routes.vips, info.ips);
        assert_eq!(routes.ports[0].port, 80);
        let eps: Vec<_> = routes.ports[0]
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.port))
            .collect();
        assert_eq!(
            eps,
            [("10.0.0.1", 9090)],
            "unhealthy and unselected entries are left out"
        );
        assert_eq!(
            t.search_domains,
            [
                "sample.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        NameIndex::from_json(&t.to_json()).unwrap();

        // A healthy report brings the third VM in and changes the version.
        let mut f2 = f;
        apply_health(
            &mut f2.entries[2],
            &HealthReport {
                healthy: true,
                message: String::new(),
                order: None,
            },
            1,
        );
        let t2 = f2.names().table_for("sample");
        assert_eq!(
            t2.services["vmservice.example.com"].ports[0]
                .endpoints
                .len(),
            2
        );
        assert_ne!(t.version, t2.version);
    }

    #[test]
    fn resolution_none_without_addresses_has_no_name() {
        let f = Fixture {
            services: vec![],
            ses: vec![vmservice(Resolution::None)],
            entries: vec![],
        };
        let t = f.names().table_for("vm-namespace");
        assert!(t.names.is_empty());
    }

    #[test]
    fn kubernetes_services_cluster_ip_and_headless() {
        let mut db = vm("m1", "10.1.0.1", "mysqldb");
        db.metadata.namespace = "vm".into();
        let mut db2 = vm("m2", "10.1.0.2", "mysqldb");
        db2.metadata.namespace = "vm".into();
        let f = Fixture {
            services: vec![
                svc("mysqldb", "vm", "10.96.0.10"),
                svc("mysql-headless", "vm", "None"),
            ],
            ses: vec![],
            entries: vec![db, db2],
        };
        let t = f.names().table_for("bookinfo");
        let c = &t.names["mysqldb.vm.svc.cluster.local"];
        assert_eq!(c.ips, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            (c.registry, c.shortname.as_str(), c.namespace.as_str()),
            (Registry::Kubernetes, "mysqldb", "vm")
        );
        let h = &t.names["mysql-headless.vm.svc.cluster.local"];
        assert_eq!(h.ips.len(), 2);
        assert_eq!(
            t.services["mysqldb.vm.svc.cluster.local"].ports[0]
                .endpoints
                .len(),
            2
        );
    }

    #[test]
    fn export_to_limits_visibility_and_local_namespace_wins_duplicates() {
        let mut private = vmservice(Resolution::Static);
        private.spec.export_to = vec![".".into()];
        let mut other = vmservice(Resolution::Static);
        other.metadata = meta("dup", "team-b");
        other.spec.addresses = vec!["192.0.2.50".into()];
        let f = Fixture {
            services: vec![],
            ses: vec![private, other],
            entries: vec![],
        };
        let n = f.names();
        let own = n.table_for("vm-namespace");
        assert!(own.names["vmservice.example.com"].ips[0]
            .to_string()
            .starts_with("240.240."));
        let b = n.table_for("team-b");
        assert_eq!(
            b.names["vmservice.example.com"].ips[0].to_string(),
            "192.0.2.50"
        );
        let c = n.table_for("team-c");
        assert_eq!(
            c.names["vmservice.example.com"].ips[0].to_string(),
            "192.0.2.50"
        );
    }

    #[test]
    fn versions_change_only_with_the_namespace_content() {
        let mut private = vmservice(Resolution::Static);
        private.spec.export_to = vec![".".into()];
        let a = Fixture {
            services: vec![],
            ses: vec![private.clone()],
            entries: vec![],
        };
        let mut b = Fixture {
            services: vec![],
            ses: vec![private],
            entries: vec![],
        };
        b.entries
            .push(vm("python-http-10.0.0.9", "10.0.0.9", "python-http"));
        let (na, nb) = (a.names(), b.names());
        assert_eq!(
            na.table_for("elsewhere").version,
            nb.table_for("elsewhere").version
        );
        assert_ne!(
            na.table_for("vm-namespace").version,
            nb.table_for("vm-namespace").version
        );
        assert_eq!(
            na.table_for("vm-namespace").version,
            a.names().table_for("vm-namespace").version
        );
    }
}
