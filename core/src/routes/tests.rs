use std::net::SocketAddr;

use vmesh_api::names::{Endpoint, Gateway, NameTable, PortRoutes, Registry, ServiceRoutes};
use vmesh_api::traffic::clusters;

use std::collections::BTreeMap;

use super::*;

const ID_A: &str = "spiffe://cluster.local/ns/vm-services/sa/my-vm";
const VIP: &str = "240.240.0.1:80";

fn ep(address: &str, port: u16, weight: u32, identity: &str) -> Endpoint {
    Endpoint {
        address: address.into(),
        port,
        network: String::new(),
        locality: String::new(),
        weight,
        identity: identity.into(),
    }
}

fn in_net(mut e: Endpoint, network: &str) -> Endpoint {
    e.network = network.into();
    e
}

fn at(mut e: Endpoint, locality: &str) -> Endpoint {
    e.locality = locality.into();
    e
}

fn table(resolution: Resolution, endpoints: Vec<Endpoint>) -> NameTable {
    let mut services = BTreeMap::new();
    services.insert(
        "vmservice.example.com".to_string(),
        ServiceRoutes {
            namespace: "vm-services".into(),
            registry: Registry::External,
            resolution,
            vips: vec!["240.240.0.1".parse().unwrap()],
            ports: vec![PortRoutes {
                port: 80,
                name: "http".into(),
                protocol: "HTTP".into(),
                endpoints,
            }],
        },
    );
    NameTable {
        version: "7".into(),
        namespace: "default".into(),
        domain: "cluster.local".into(),
        search_domains: vec![],
        names: BTreeMap::new(),
        services,
        network: String::new(),
        locality: String::new(),
        gateways: BTreeMap::new(),
    }
}

/// Through the JSON the control plane sends (serde here, the filter's reader in the index) and
/// through the image a worker receives, so every test covers both codecs.
fn index(t: &NameTable) -> RouteIndex {
    let compiled = RouteIndex::from_json(&t.to_json()).unwrap();
    RouteIndex::from_image(&compiled.image()).unwrap()
}

fn dst(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn upstreams(ix: &RouteIndex, to: &str, n: u64) -> BTreeMap<String, u64> {
    let mut seen = BTreeMap::new();
    for rand in 0..n {
        *seen.entry(ix.outbound(dst(to), rand).upstream).or_default() += 1;
    }
    seen
}

#[test]
fn a_vip_goes_to_an_endpoint_over_mtls_with_istio_sni_and_the_endpoint_identity() {
    let ix = index(&table(
        Resolution::Static,
        vec![ep("198.18.1.10", 9090, 1, ID_A)],
    ));
    let d = ix.outbound(dst(VIP), 12345);
    assert_eq!(d.cluster, clusters::MESH_MTLS);
    assert_eq!(d.upstream, "198.18.1.10:9090");
    assert_eq!(d.sni, "outbound_.80_._.vmservice.example.com");
    assert_eq!(d.san, ID_A);
    let id = d.service.unwrap();
    assert_eq!(ix.service_port(id), Some(("vmservice.example.com", 80)));
}

#[test]
fn endpoints_without_identity_get_plain_tcp() {
    let ix = index(&table(
        Resolution::Static,
        vec![ep("10.0.0.5", 8080, 1, "")],
    ));
    let d = ix.outbound(dst(VIP), 0);
    assert_eq!(d.cluster, clusters::PASSTHROUGH);
    assert_eq!(d.upstream, "10.0.0.5:8080");
    assert_eq!((d.sni.as_str(), d.san.as_str()), ("", ""));
}

#[test]
fn weights_distribute() {
    let ix = index(&table(
        Resolution::Static,
        vec![ep("10.0.0.1", 9090, 1, ID_A), ep("10.0.0.2", 9090, 3, ID_A)],
    ));
    let seen = upstreams(&ix, VIP, 4000);
    assert_eq!(seen.get("10.0.0.1:9090"), Some(&1000));
    assert_eq!(seen.get("10.0.0.2:9090"), Some(&3000));
}

#[test]
fn locality_preferred_then_failover() {
    let mut t = table(
        Resolution::Static,
        vec![
            at(ep("10.0.0.1", 9090, 1, ID_A), "eu/zone-a/s1"),
            at(ep("10.0.0.2", 9090, 1, ID_A), "eu/zone-b/s1"),
            at(ep("10.0.0.3", 9090, 1, ID_A), "us/zone-a/s1"),
        ],
    );
    t.locality = "eu/zone-a/s1".into();
    let only = |t: &NameTable| {
        upstreams(&index(t), VIP, 100)
            .into_keys()
            .collect::<Vec<_>>()
    };
    assert_eq!(only(&t), ["10.0.0.1:9090"]);
    // The same zone gone: the same region next, never the other region while it has one.
    let ports = &mut t.services.get_mut("vmservice.example.com").unwrap().ports;
    ports[0].endpoints.remove(0);
    assert_eq!(only(&t), ["10.0.0.2:9090"]);
    let ports = &mut t.services.get_mut("vmservice.example.com").unwrap().ports;
    ports[0].endpoints.remove(0);
    assert_eq!(only(&t), ["10.0.0.3:9090"]);
    // A client that does not know its locality uses every endpoint.
    let mut t = table(
        Resolution::Static,
        vec![
            at(ep("10.0.0.1", 9090, 1, ID_A), "eu/zone-a/s1"),
            at(ep("10.0.0.3", 9090, 1, ID_A), "us/zone-a/s1"),
        ],
    );
    t.locality = String::new();
    assert_eq!(only(&t).len(), 2);
}

#[test]
fn cross_network_via_gateway_with_sni() {
    let mut t = table(
        Resolution::Static,
        vec![in_net(ep("10.1.0.7", 9090, 1, ID_A), "net-b")],
    );
    t.network = "net-a".into();
    t.gateways.insert(
        "net-b".into(),
        vec![Gateway {
            address: "198.18.0.100".parse().unwrap(),
            port: 15443,
        }],
    );
    let d = index(&t).outbound(dst(VIP), 99);
    assert_eq!(d.cluster, clusters::MESH_MTLS);
    assert_eq!(d.upstream, "198.18.0.100:15443");
    assert_eq!(d.sni, "outbound_.80_._.vmservice.example.com");
    assert_eq!(d.san, ID_A);
    // A gateway in that network routes only to its own network's endpoints: none here.
    let gw_view = index(&t).by_host("VMService.example.com", 80, 0).unwrap();
    assert_eq!(gw_view.cluster, clusters::NO_ENDPOINT);
}

#[test]
fn endpoints_in_a_network_without_gateway_are_skipped() {
    let mut t = table(
        Resolution::Static,
        vec![
            in_net(ep("10.1.0.7", 9090, 5, ID_A), "net-b"),
            in_net(ep("10.2.0.7", 9090, 5, ""), "net-c"),
            in_net(ep("10.0.0.7", 9090, 1, ID_A), "net-a"),
        ],
    );
    t.network = "net-a".into();
    // net-c has a gateway, but its endpoint has no sidecar: no SNI to route it by.
    t.gateways.insert(
        "net-c".into(),
        vec![Gateway {
            address: "198.18.0.101".parse().unwrap(),
            port: 15443,
        }],
    );
    let seen = upstreams(&index(&t), VIP, 50);
    assert_eq!(seen.into_keys().collect::<Vec<_>>(), ["10.0.0.7:9090"]);
    // Nothing reachable at all: the connection is refused, not sent to the VIP.
    let mut t = table(
        Resolution::Static,
        vec![in_net(ep("10.1.0.7", 9090, 1, ID_A), "net-b")],
    );
    t.network = "net-a".into();
    let d = index(&t).outbound(dst(VIP), 0);
    assert_eq!(d.cluster, clusters::NO_ENDPOINT);
    assert!(d.service.is_some());
}

#[test]
fn unknown_destination_passes_through_untouched() {
    let ix = index(&table(
        Resolution::Static,
        vec![ep("10.0.0.1", 9090, 1, ID_A)],
    ));
    for to in ["93.184.216.34:443", "240.240.0.1:81", "[2001:db8::1]:80"] {
        let d = ix.outbound(dst(to), 3);
        assert_eq!(d, Decision::passthrough(dst(to)), "{to}");
        assert_eq!(d.cluster, clusters::PASSTHROUGH);
        assert_eq!(d.upstream, to);
        assert_eq!(d.service, None);
    }
}

#[test]
fn ipv6_upstreams_are_bracketed() {
    let ix = index(&table(
        Resolution::Static,
        vec![ep("2001:db8::7", 9090, 1, ID_A)],
    ));
    assert_eq!(ix.outbound(dst(VIP), 0).upstream, "[2001:db8::7]:9090");
}

#[test]
fn dns_services_go_to_the_dynamic_forward_proxy_by_name() {
    let ix = index(&table(
        Resolution::Dns,
        vec![ep("api.example.org", 443, 1, ID_A)],
    ));
    let d = ix.outbound(dst(VIP), 0);
    assert_eq!(d.cluster, clusters::DNS_FORWARD);
    assert_eq!(d.upstream, "api.example.org:443");
    assert_eq!(
        (d.dynamic_host.as_str(), d.dynamic_port),
        ("api.example.org", 443)
    );
    assert_eq!((d.sni.as_str(), d.san.as_str()), ("", ""));
    // A DNS service may list IPs too: those go directly.
    let ix = index(&table(Resolution::Dns, vec![ep("10.0.0.9", 443, 1, "")]));
    assert_eq!(ix.outbound(dst(VIP), 0).cluster, clusters::PASSTHROUGH);
}

#[test]
fn resolution_none_keeps_the_original_destination_with_mtls_for_mesh_endpoints() {
    let ix = index(&table(
        Resolution::None,
        vec![ep("10.0.0.1", 80, 1, ID_A), ep("10.0.0.2", 80, 1, "")],
    ));
    let d = ix.outbound(dst("10.0.0.1:80"), 0);
    assert_eq!(
        (d.cluster, d.upstream.as_str(), d.san.as_str()),
        (clusters::MESH_MTLS, "10.0.0.1:80", ID_A)
    );
    let d = ix.outbound(dst("10.0.0.2:80"), 0);
    assert_eq!(
        (d.cluster, d.upstream.as_str()),
        (clusters::PASSTHROUGH, "10.0.0.2:80")
    );
    assert!(d.service.is_some());
    // Through the VIP: still where the client dialled.
    assert_eq!(ix.outbound(dst(VIP), 0).upstream, VIP);
}

#[test]
fn a_resolution_this_version_does_not_know_passes_through() {
    let mut json =
        String::from_utf8(table(Resolution::Static, vec![ep("10.0.0.1", 9090, 1, ID_A)]).to_json())
            .unwrap();
    json = json.replace("\"STATIC\"", "\"DYNAMIC_DNS\"");
    let ix = RouteIndex::from_json(json.as_bytes()).unwrap();
    assert_eq!(ix.outbound(dst(VIP), 0), Decision::passthrough(dst(VIP)));
}

#[test]
fn gateway_lookup_by_host_uses_its_own_network_only() {
    let mut t = table(
        Resolution::Static,
        vec![
            in_net(ep("10.1.0.7", 9090, 1, ID_A), "net-b"),
            in_net(ep("10.0.0.7", 9090, 1, ID_A), "net-a"),
        ],
    );
    t.network = "net-a".into();
    t.gateways.insert(
        "net-b".into(),
        vec![Gateway {
            address: "198.18.0.100".parse().unwrap(),
            port: 15443,
        }],
    );
    let ix = index(&t);
    for rand in 0..20 {
        let d = ix.by_host("vmservice.example.com", 80, rand).unwrap();
        assert_eq!(d.upstream, "10.0.0.7:9090");
    }
    assert!(ix.by_host("vmservice.example.com", 81, 0).is_none());
    assert!(ix.by_host("other.example.com", 80, 0).is_none());
}

#[test]
fn tables_without_routing_data_route_nothing() {
    let json = br#"{"version":"1","namespace":"ns","names":{"a.example.com":{"ips":["10.0.0.1"],"registry":"External"}}}"#;
    let ix = RouteIndex::from_json(json).unwrap();
    assert!(ix.is_empty());
    assert_eq!(ix.version(), "1");
    assert_eq!(
        ix.outbound(dst("10.0.0.1:80"), 0),
        Decision::passthrough(dst("10.0.0.1:80"))
    );
}

#[test]
fn bad_table_input_is_a_typed_error_never_a_panic() {
    let good =
        String::from_utf8(table(Resolution::Static, vec![ep("10.0.0.1", 9090, 1, ID_A)]).to_json())
            .unwrap();
    type Expect = fn(&RouteError) -> bool;
    let cases: Vec<(String, Expect)> = vec![
        (good.replace("\"10.0.0.1\"", "\"not-an-ip\""), |e| {
            matches!(e, RouteError::InvalidService { .. })
        }),
        (good.replace("\"weight\":1", "\"weight\":0"), |e| {
            matches!(e, RouteError::InvalidService { .. })
        }),
        (good.replace("\"port\":9090", "\"port\":70000"), |e| {
            matches!(e, RouteError::Json(_))
        }),
        (good.replace("\"240.240.0.1\"", "\"240.240.0\""), |e| {
            matches!(e, RouteError::Json(_))
        }),
        (good.replace(",\"weight\":1", ""), |e| {
            matches!(e, RouteError::Json(_))
        }),
        (
            good.replacen(
                '{',
                r#"{"gateways":{"n":[{"address":"1.2.3.4","port":0}]},"#,
                1,
            ),
            |e| matches!(e, RouteError::InvalidGateway { .. }),
        ),
        (
            good.replacen('{', r#"{"network":"a","network":"b","#, 1),
            |e| matches!(e, RouteError::Json(_)),
        ),
    ];
    for (json, expected) in cases {
        let err = RouteIndex::from_json(json.as_bytes()).unwrap_err();
        assert!(expected(&err), "{json}: {err}");
    }
    // Every prefix of the document, and of the image: an error, not a panic.
    for n in 0..good.len() {
        assert!(RouteIndex::from_json(&good.as_bytes()[..n]).is_err());
    }
    let image = RouteIndex::from_json(good.as_bytes()).unwrap().image();
    for n in 0..image.len() {
        assert!(matches!(
            RouteIndex::from_image(&image[..n]),
            Err(RouteError::BadImage(_))
        ));
    }
    // Flipped bytes decode to an error or to a table that still validates.
    for i in 0..image.len() {
        let mut bad = image.clone();
        bad[i] ^= 0xff;
        if let Ok(ix) = RouteIndex::from_image(&bad) {
            let _ = ix.outbound(dst(VIP), 1);
        }
    }
}

#[test]
fn the_image_carries_the_whole_routing_table() {
    let mut t = table(
        Resolution::DnsRoundRobin,
        vec![at(in_net(ep("a.example.org", 1, 2, ID_A), "n2"), "r/z/s")],
    );
    t.network = "n1".into();
    t.locality = "r/z".into();
    t.gateways.insert(
        "n2".into(),
        vec![Gateway {
            address: "2001:db8::1".parse().unwrap(),
            port: 15443,
        }],
    );
    let ix = RouteIndex::from_json(&t.to_json()).unwrap();
    let again = RouteIndex::from_image(&ix.image()).unwrap();
    assert_eq!(again.table, ix.table);
    assert_eq!(again.image(), ix.image());
    assert_eq!(
        ix.table.services,
        t.services.into_iter().collect::<Vec<_>>()
    );
    assert_eq!(
        ix.table.gateways,
        t.gateways.into_iter().collect::<Vec<_>>()
    );
}
