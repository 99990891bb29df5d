//! Name-table assembly: the mesh's Services and ServiceEntries, with the WorkloadEntries they
//! select, become one [`NameTable`] per client namespace.
//!
//! [`MeshNames::build`] does the per-mesh work once (selection, port mapping, health, VIPs);
//! [`MeshNames::table_for`] then filters by visibility (`exportTo`) and picks one definition
//! per host. The table's version is a hash of its content, so it changes exactly when what a
//! namespace sees changes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::model::{Resolution, Service, ServiceEntry, ServiceEntryAddress, WorkloadEntry};
use super::select::{
    is_dns, selected_by_service, selected_by_service_entry, service_endpoints,
    service_entry_endpoints, Endpoint,
};
use super::validate::{is_partial_wildcard, parse_cidr};
use super::vip::{slot_ips, VipTable};
use vmesh_api::ca::spiffe_id;
use vmesh_api::names::{
    self as table, NameInfo, NameTable, PortRoutes, Registry, Resolution as TableResolution,
    ServiceRoutes,
};
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
    /// The SPIFFE trust domain of endpoint identities (`spiffe://TD/ns/NS/sa/SA`).
    pub trust_domain: &'a str,
    /// Per network, its east-west gateways (from meshNetworks), copied into every table.
    pub gateways: &'a BTreeMap<String, Vec<table::Gateway>>,
}

/// Who a table is for: the namespace decides what it sees; network and locality are the
/// client's own, copied into the table for the data plane's routing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Client<'a> {
    pub namespace: &'a str,
    pub network: &'a str,
    pub locality: &'a str,
}

/// ServiceEntry label that opts its hosts out of VIP auto-allocation when `"false"`.
pub const LABEL_ENABLE_AUTOALLOCATE_IP: &str = "networking.istio.io/enable-autoallocate-ip";

/// Whether a ServiceEntry's hosts get auto-allocated addresses (Istio's
/// `shouldV2AutoAllocateIPFromPieces`): not NONE (the data plane could not honour them), not
/// opted out by label, and no `addresses` of its own.
pub fn should_auto_allocate(se: &ServiceEntry) -> bool {
    se.spec.resolution != Resolution::None
        && !se
            .metadata
            .labels
            .get(LABEL_ENABLE_AUTOALLOCATE_IP)
            .is_some_and(|v| v.eq_ignore_ascii_case("false"))
        && se.spec.addresses.is_empty()
}

/// The hosts of a ServiceEntry that get an address (Istio's `keepHost`: no wildcards), as the
/// name table and the VIP table key them: lower case, no trailing dot.
fn allocated_hosts(se: &ServiceEntry) -> impl Iterator<Item = String> + '_ {
    se.spec
        .hosts
        .iter()
        .filter(|h| !h.contains('*'))
        .map(|h| table_host(h))
}

/// A host as tables carry it: lower case, without a trailing dot.
fn table_host(h: &str) -> String {
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// ServiceEntry hosts that get an allocated VIP.
pub fn hosts_needing_vips(service_entries: &[&ServiceEntry]) -> BTreeSet<String> {
    service_entries
        .iter()
        .filter(|se| should_auto_allocate(se))
        .flat_map(|se| allocated_hosts(se))
        .collect()
}

/// What Istio's IP auto-allocation controller writes into a ServiceEntry's
/// `status.addresses` (`statusPatchForAddresses`): per host in spec order, its IPv4 then its
/// IPv6 address; empty when the entry does not qualify.
pub fn status_addresses(se: &ServiceEntry, vips: &VipTable) -> Vec<ServiceEntryAddress> {
    if !should_auto_allocate(se) {
        return Vec::new();
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (spec_host, host) in se
        .spec
        .hosts
        .iter()
        .filter(|h| !h.contains('*'))
        .map(|h| (h, table_host(h)))
    {
        if !seen.insert(host.clone()) {
            continue;
        }
        if let Some(slot) = vips.get(&host) {
            for ip in slot_ips(*slot) {
                out.push(ServiceEntryAddress {
                    value: ip.to_string(),
                    host: spec_host.clone(),
                });
            }
        }
    }
    out
}

/// The IPs a ServiceEntry's `addresses` give DNS: plain IPs, and CIDRs as wide as one address
/// (`/32`, `/128`), as Istio's `convertServices` turns them into IPs. Wider CIDRs match
/// traffic but are no answer to a query.
fn declared_ips(addresses: &[String]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for a in addresses {
        let ip = match a.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => parse_cidr(a)
                .filter(|(ip, len)| u32::from(*len) == if ip.is_ipv4() { 32 } else { 128 })
                .map(|(ip, _)| ip),
        };
        if let Some(ip) = ip.filter(|ip| !out.contains(ip)) {
            out.push(ip);
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Visibility {
    All,
    /// `~`: no client namespace sees it (Istio keeps it for the service's own proxies).
    Nobody,
    Namespaces(BTreeSet<String>),
}

impl Visibility {
    fn parse<'a>(own_ns: &str, list: impl Iterator<Item = &'a str>) -> Visibility {
        let mut set = BTreeSet::new();
        for x in list {
            match x.trim() {
                "*" => return Visibility::All,
                "~" => return Visibility::Nobody,
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
            Visibility::Nobody => false,
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
    /// Lower sorts first: older, then by namespace/name (Istio's `SortServicesByCreationTime`).
    fn rank(&self) -> (u64, &str, &str) {
        (self.created, &self.namespace, &self.source)
    }

    /// Which of the definitions visible to a client in `ns` it gets, lowest first: a Kubernetes
    /// Service over any ServiceEntry (so nobody can squat on a Service's name, Istio's guard in
    /// `initServiceRegistry`), then one from the client's own namespace (the sidecar scope's
    /// `selectServices`), then the oldest.
    fn preference(&self, ns: &str) -> (bool, bool) {
        (self.registry != Registry::Kubernetes, self.namespace != ns)
    }
}

/// The mesh's hosts, computed once per change, from which per-namespace tables are cut.
#[derive(Debug, Clone, Default)]
pub struct MeshNames {
    domain: String,
    /// Host -> its definitions, best first.
    hosts: BTreeMap<String, Vec<HostDef>>,
    gateways: BTreeMap<String, Vec<table::Gateway>>,
}

fn to_port(p: u32) -> u16 {
    u16::try_from(p).unwrap_or(0)
}

type PortEndpoints = (u32, String, String, Vec<Endpoint>);

/// The service's namespace and the trust domain, which with an endpoint's service account
/// make its SPIFFE identity (selection only looks in the service's own namespace, and Istio
/// names inline endpoints' accounts in the ServiceEntry's).
#[derive(Clone, Copy)]
struct IdentityScope<'a> {
    trust_domain: &'a str,
    namespace: &'a str,
}

fn routes_ports(
    ports: impl Iterator<Item = PortEndpoints>,
    scope: IdentityScope<'_>,
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
                    identity: e
                        .service_account
                        .as_deref()
                        .map(|sa| spiffe_id(scope.trust_domain, scope.namespace, sa))
                        .unwrap_or_default(),
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
            gateways: mesh.gateways.clone(),
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
            out.add_service(svc, in_ns(&svc.metadata.namespace), mesh);
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

    fn add_service(&mut self, svc: &Service, entries: &[&WorkloadEntry], mesh: &Mesh<'_>) {
        let m = &svc.metadata;
        let host = format!("{}.{}.svc.{}", m.name, m.namespace, self.domain);
        let selected = selected_by_service(svc, entries.iter().copied());
        let per_port: Vec<PortEndpoints> = svc
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
                resolution: if headless {
                    TableResolution::None
                } else {
                    TableResolution::Static
                },
                vips,
                ports: routes_ports(
                    per_port.into_iter(),
                    IdentityScope {
                        trust_domain: mesh.trust_domain,
                        namespace: &m.namespace,
                    },
                ),
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
        let per_port: Vec<PortEndpoints> = se
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
        // Istio's `convertServiceEntryToInstances`: a DNS entry with neither endpoints nor a
        // selector routes to each host itself, on the target port.
        let host_is_endpoint =
            is_dns(se) && se.spec.endpoints.is_empty() && se.spec.workload_selector.is_none();
        let resolution = match se.spec.resolution {
            Resolution::None => TableResolution::None,
            Resolution::Static => TableResolution::Static,
            Resolution::Dns => TableResolution::Dns,
            Resolution::DnsRoundRobin => TableResolution::DnsRoundRobin,
        };
        let declared = declared_ips(&se.spec.addresses);
        // NONE without addresses is headless: Istio's name table answers with the healthy
        // endpoints' IPs (`BuildNameTable`, Passthrough services with ports).
        let headless_ips: Vec<IpAddr> = if se.spec.resolution == Resolution::None
            && declared.is_empty()
            && !se.spec.ports.is_empty()
        {
            let set: BTreeSet<IpAddr> = per_port
                .iter()
                .flat_map(|(_, _, _, eps)| eps.iter())
                .filter(|e| e.healthy)
                .filter_map(|e| e.address.parse().ok())
                .collect();
            set.into_iter().collect()
        } else {
            Vec::new()
        };
        let auto = should_auto_allocate(se);
        let visibility =
            Visibility::parse(&m.namespace, se.spec.export_to.iter().map(String::as_str));
        for spec_host in &se.spec.hosts {
            // Istio accepts `*foo.example.com` with a warning; no name table can carry it.
            if is_partial_wildcard(spec_host) {
                continue;
            }
            let host = table_host(spec_host);
            let vips = if !declared.is_empty() {
                declared.clone()
            } else if auto {
                mesh.vips
                    .get(&host)
                    .map(|s| slot_ips(*s).to_vec())
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            let ips = if vips.is_empty() {
                headless_ips.clone()
            } else {
                vips.clone()
            };
            let ports = if host_is_endpoint && !host.starts_with("*.") {
                se.spec
                    .ports
                    .iter()
                    .map(|p| PortRoutes {
                        port: to_port(p.number),
                        name: p.name.clone(),
                        protocol: p.protocol.clone(),
                        endpoints: vec![table::Endpoint {
                            address: host.clone(),
                            port: to_port(if p.target_port != 0 {
                                p.target_port
                            } else {
                                p.number
                            }),
                            network: String::new(),
                            locality: String::new(),
                            weight: 1,
                            identity: String::new(),
                        }],
                    })
                    .collect()
            } else {
                routes_ports(
                    per_port.clone().into_iter(),
                    IdentityScope {
                        trust_domain: mesh.trust_domain,
                        namespace: &m.namespace,
                    },
                )
            };
            self.push(HostDef {
                host: host.clone(),
                namespace: m.namespace.clone(),
                source: m.name.clone(),
                created: created(&m.creation_timestamp),
                registry: Registry::External,
                visibility: visibility.clone(),
                info: NameInfo {
                    ips,
                    registry: Registry::External,
                    shortname: String::new(),
                    namespace: String::new(),
                },
                routes: ServiceRoutes {
                    namespace: m.namespace.clone(),
                    registry: Registry::External,
                    resolution,
                    vips,
                    ports,
                },
            });
        }
    }

    /// The table a client in `namespace` receives (no network, no locality), its version set.
    pub fn table_for(&self, namespace: &str) -> NameTable {
        self.table_for_client(&Client {
            namespace,
            ..Client::default()
        })
    }

    /// The table `client` receives, its version set.
    pub fn table_for_client(&self, client: &Client<'_>) -> NameTable {
        let namespace = client.namespace;
        let mut names = BTreeMap::new();
        let mut services = BTreeMap::new();
        for (host, defs) in &self.hosts {
            // `defs` is in Istio's creation order; the first of the most preferred wins.
            let best = defs
                .iter()
                .filter(|d| d.visibility.sees(namespace))
                .min_by_key(|d| d.preference(namespace));
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
            network: client.network.to_string(),
            gateways: self.gateways.clone(),
            locality: client.locality.to_string(),
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
                trust_domain: "cluster.local",
                gateways: &BTreeMap::new(),
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

    fn healthy(mut e: WorkloadEntry) -> WorkloadEntry {
        e.metadata
            .annotations
            .insert(ANNOTATION_HEALTH_CHECKS_ENABLED.into(), "true".into());
        apply_health(
            &mut e,
            &HealthReport {
                healthy: true,
                message: String::new(),
                order: None,
            },
            1,
        );
        e
    }

    /// Istio `convertServiceEntryToInstances`: DNS without endpoints or selector -> the host.
    #[test]
    fn dns_without_endpoints_routes_to_the_host_itself_on_the_target_port() {
        let mut se = vmservice(Resolution::Dns);
        se.spec.workload_selector = None;
        for r in [Resolution::Dns, Resolution::DnsRoundRobin] {
            se.spec.resolution = r;
            let f = Fixture {
                services: vec![],
                ses: vec![se.clone()],
                entries: vec![],
            };
            let t = f.names().table_for("vm-namespace");
            let routes = &t.services["vmservice.example.com"];
            assert_eq!(
                routes.resolution,
                if r == Resolution::Dns {
                    TableResolution::Dns
                } else {
                    TableResolution::DnsRoundRobin
                }
            );
            let ep = &routes.ports[0].endpoints[0];
            assert_eq!(
                (ep.address.as_str(), ep.port),
                ("vmservice.example.com", 9090)
            );
            assert!(t.names["vmservice.example.com"].ips[0]
                .to_string()
                .starts_with("240.240."));
        }
    }

    /// Istio `BuildNameTable`: a NONE (Passthrough) service without addresses answers with the
    /// healthy endpoints' IPs, and gets no allocated VIP.
    #[test]
    fn resolution_none_with_a_selector_answers_with_healthy_endpoint_ips() {
        let f = Fixture {
            services: vec![],
            ses: vec![vmservice(Resolution::None)],
            entries: vec![
                healthy(vm("a", "10.0.0.2", "python-http")),
                healthy(vm("b", "10.0.0.1", "python-http")),
                {
                    let mut sick = vm("c", "10.0.0.3", "python-http");
                    sick.metadata
                        .annotations
                        .insert(ANNOTATION_HEALTH_CHECKS_ENABLED.into(), "true".into());
                    sick
                },
            ],
        };
        let t = f.names().table_for("vm-namespace");
        let ips: Vec<String> = t.names["vmservice.example.com"]
            .ips
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ips, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(
            t.services["vmservice.example.com"].resolution,
            TableResolution::None
        );
        assert!(t.services["vmservice.example.com"].vips.is_empty());
    }

    /// Istio `initServiceRegistry`: a Kubernetes Service wins over a ServiceEntry squatting on
    /// its host, even one in the client's own namespace.
    #[test]
    fn kubernetes_service_wins_over_a_service_entry_of_the_same_host() {
        let mut squat = vmservice(Resolution::Static);
        squat.metadata = meta("squat", "bookinfo");
        squat.spec.hosts = vec!["mysqldb.vm.svc.cluster.local".into()];
        squat.spec.addresses = vec!["192.0.2.9".into()];
        let f = Fixture {
            services: vec![svc("mysqldb", "vm", "10.96.0.10")],
            ses: vec![squat],
            entries: vec![],
        };
        let t = f.names().table_for("bookinfo");
        let n = &t.names["mysqldb.vm.svc.cluster.local"];
        assert_eq!(n.registry, Registry::Kubernetes);
        assert_eq!(n.ips, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
    }

    /// Istio `shouldV2AutoAllocateIPFromPieces` and `convertServices`.
    #[test]
    fn opt_out_label_and_single_address_cidrs() {
        let mut opted = vmservice(Resolution::Static);
        opted
            .metadata
            .labels
            .insert(LABEL_ENABLE_AUTOALLOCATE_IP.into(), "False".into());
        let mut cidrs = vmservice(Resolution::Static);
        cidrs.metadata = meta("cidrs", "vm-namespace");
        cidrs.spec.hosts = vec!["cidr.example.com".into()];
        cidrs.spec.addresses = vec![
            "192.0.2.7/32".into(),
            "2001:db8::7/128".into(),
            "198.51.100.0/24".into(),
        ];
        let f = Fixture {
            services: vec![],
            ses: vec![opted.clone(), cidrs],
            entries: vec![],
        };
        let t = f.names().table_for("vm-namespace");
        assert!(!t.names.contains_key("vmservice.example.com"));
        let ips: Vec<String> = t.names["cidr.example.com"]
            .ips
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ips, ["192.0.2.7", "2001:db8::7"]);
        assert!(status_addresses(&opted, &VipTable::new()).is_empty());
    }

    #[test]
    fn status_addresses_list_each_host_v4_then_v6() {
        let mut se = vmservice(Resolution::Static);
        se.spec.hosts = vec!["A.example.com".into(), "*.wild.example.com".into()];
        let vips = allocate(&VipTable::new(), &hosts_needing_vips(&[&se]));
        let st = status_addresses(&se, &vips);
        assert_eq!(st.len(), 2);
        assert!(st.iter().all(|a| a.host == "A.example.com"));
        assert!(st[0].value.starts_with("240.240."));
        assert!(st[1].value.starts_with("2001:2::"));
    }

    /// Istio's `getTLSModeFromWorkloadEntry`, plus auto-registered entries (a VM registers
    /// through its sidecar) and `default` where Istio would check no SAN.
    #[test]
    fn endpoints_with_a_sidecar_carry_their_spiffe_identity() {
        let mut auto = vm("python-http-10.0.0.1", "10.0.0.1", "python-http");
        auto.metadata.annotations.insert(
            crate::workload::ANNOTATION_AUTO_REGISTRATION_GROUP.into(),
            "python-http".into(),
        );
        let mut auto_sa = vm("python-http-10.0.0.2", "10.0.0.2", "python-http");
        auto_sa.metadata.annotations = auto.metadata.annotations.clone();
        auto_sa.spec.service_account = "my-vm".into();
        let mut manual_sa = vm("m3", "10.0.0.3", "python-http");
        manual_sa.spec.service_account = "db".into();
        let mut labelled = vm("m4", "10.0.0.4", "python-http");
        labelled
            .spec
            .labels
            .insert(crate::workload::LABEL_TLS_MODE.into(), "istio".into());
        let mut disabled = vm("m5", "10.0.0.5", "python-http");
        disabled.spec.service_account = "db".into();
        disabled
            .metadata
            .labels
            .insert(crate::workload::LABEL_TLS_MODE.into(), "disabled".into());
        let plain = vm("m6", "10.0.0.6", "python-http");
        let f = Fixture {
            services: vec![],
            ses: vec![vmservice(Resolution::Static)],
            entries: vec![auto, auto_sa, manual_sa, labelled, disabled, plain],
        };
        let t = f.names().table_for("sample");
        let ids: Vec<(&str, &str)> = t.services["vmservice.example.com"].ports[0]
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.identity.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                (
                    "10.0.0.1",
                    "spiffe://cluster.local/ns/vm-namespace/sa/default"
                ),
                (
                    "10.0.0.2",
                    "spiffe://cluster.local/ns/vm-namespace/sa/my-vm"
                ),
                ("10.0.0.3", "spiffe://cluster.local/ns/vm-namespace/sa/db"),
                (
                    "10.0.0.4",
                    "spiffe://cluster.local/ns/vm-namespace/sa/default"
                ),
                ("10.0.0.5", ""),
                ("10.0.0.6", ""),
            ]
        );
    }

    #[test]
    fn inline_and_dns_host_endpoints_are_plain_unless_istio_s_rule_says_otherwise() {
        let mut inline = vmservice(Resolution::Static);
        inline.spec.workload_selector = None;
        inline.spec.endpoints = vec![
            WorkloadEntrySpec {
                address: "10.0.1.1".into(),
                ..Default::default()
            },
            WorkloadEntrySpec {
                address: "10.0.1.2".into(),
                service_account: "ext".into(),
                ..Default::default()
            },
        ];
        let mut dns = vmservice(Resolution::Dns);
        dns.metadata = meta("dns", "vm-namespace");
        dns.spec.hosts = vec!["dns.example.com".into()];
        dns.spec.workload_selector = None;
        let f = Fixture {
            services: vec![],
            ses: vec![inline, dns],
            entries: vec![],
        };
        let t = f.names().table_for("sample");
        let ids: Vec<&str> = t.services["vmservice.example.com"].ports[0]
            .endpoints
            .iter()
            .map(|e| e.identity.as_str())
            .collect();
        assert_eq!(ids, ["", "spiffe://cluster.local/ns/vm-namespace/sa/ext"]);
        assert_eq!(
            t.services["dns.example.com"].ports[0].endpoints[0].identity,
            ""
        );
    }

    #[test]
    fn the_client_s_network_locality_and_the_mesh_gateways_are_in_its_table() {
        let mut e = vm("python-http-10.0.0.1", "10.0.0.1", "python-http");
        e.spec.network = "vm-network".into();
        let ses = [vmservice(Resolution::Static)];
        let se_refs: Vec<&ServiceEntry> = ses.iter().collect();
        let entries = [&e];
        let vips = allocate(&VipTable::new(), &hosts_needing_vips(&se_refs));
        let gateways: BTreeMap<String, Vec<table::Gateway>> = [(
            "vm-network".to_string(),
            vec![table::Gateway {
                address: "198.18.1.10".parse().unwrap(),
                port: 15443,
            }],
        )]
        .into();
        let build = |gateways: &BTreeMap<String, Vec<table::Gateway>>| {
            MeshNames::build(&Mesh {
                domain: "cluster.local",
                services: &[],
                service_entries: &se_refs,
                entries: &entries,
                vips: &vips,
                trust_domain: "example.org",
                gateways,
            })
        };
        let names = build(&gateways);
        let client = Client {
            namespace: "sample",
            network: "network1",
            locality: "us-east/1a",
        };
        let t = names.table_for_client(&client);
        assert_eq!(
            (t.network.as_str(), t.locality.as_str()),
            ("network1", "us-east/1a")
        );
        assert_eq!(t.gateways, gateways);
        let ep = &t.services["vmservice.example.com"].ports[0].endpoints[0];
        assert_eq!(ep.network, "vm-network");
        // The same content for another network is another table, and so is a gateway change.
        let other = names.table_for_client(&Client {
            network: "vm-network",
            ..client
        });
        assert_ne!(t.version, other.version);
        let no_gateways = build(&BTreeMap::new()).table_for_client(&client);
        assert_ne!(t.version, no_gateways.version);
        assert!(no_gateways.gateways.is_empty());
        NameIndex::from_json(&t.to_json()).unwrap();
    }

    #[test]
    fn export_to_none_hides_a_service_entry_from_every_namespace() {
        let mut hidden = vmservice(Resolution::Static);
        hidden.spec.export_to = vec!["~".into()];
        let f = Fixture {
            services: vec![],
            ses: vec![hidden],
            entries: vec![],
        };
        assert!(f.names().table_for("vm-namespace").names.is_empty());
    }
}
