//! Table-driven checks of the DNS proxy's answers, named by the rule they check
//! (docs/name-table.md, ARCHITECTURE.md "DNS").

use vmesh_core::dns::inspect::{RData, Response};
use vmesh_core::dns::{build_query, rtype, Edns};
use vmesh_core::names::NameIndex;
use vmesh_core::responder::{respond, Outcome, Transport, Verdict};

const TXT: u16 = 16;
const SRV: u16 = 33;

fn table() -> NameIndex {
    let big: Vec<String> = (0..100).map(|i| format!("\"10.9.0.{i}\"")).collect();
    let json = format!(
        r#"{{"version":"v1","namespace":"apps","domain":"cluster.local",
        "searchDomains":["apps.svc.cluster.local","svc.cluster.local","cluster.local","corp.example"],
        "names":{{
          "details.apps.svc.cluster.local":{{"ips":["10.0.0.10"],"registry":"Kubernetes","shortname":"details","namespace":"apps"}},
          "ratings.shop.svc.cluster.local":{{"ips":["10.0.0.20","fd00::20"],"registry":"Kubernetes","shortname":"ratings","namespace":"shop"}},
          "vmservice.example.com":{{"ips":["240.240.0.1"],"registry":"External"}},
          "*.wild.example.com":{{"ips":["240.240.0.2"],"registry":"External"}},
          "v6only.example.com":{{"ips":["2001:2::1"],"registry":"External"}},
          "big.example.com":{{"ips":[{}],"registry":"External"}}
        }}}}"#,
        big.join(",")
    );
    NameIndex::from_json(json.as_bytes()).unwrap()
}

fn query(name: &str, qtype: u16, edns: Option<(u16, u8)>) -> Vec<u8> {
    let edns = edns.map(|(udp_payload, version)| Edns {
        udp_payload,
        version,
        dnssec_ok: false,
    });
    build_query(0x1234, name, qtype, edns).unwrap()
}

/// The answer as "owner TYPE data" lines, for comparing against expectations.
fn render(resp: &Response) -> Vec<String> {
    resp.answers
        .iter()
        .map(|rr| match &rr.data {
            RData::A(ip) => format!("{} A {ip}", rr.name),
            RData::Aaaa(ip) => format!("{} AAAA {ip}", rr.name),
            RData::Cname(t) => format!("{} CNAME {t}", rr.name),
            RData::Other(_) => format!("{} {}", rr.name, rr.rtype),
        })
        .collect()
}

fn answer(table: Option<&NameIndex>, name: &str, qtype: u16) -> Option<(Response, Verdict)> {
    match respond(
        &query(name, qtype, None),
        Transport::Udp,
        table,
        "cluster.local",
        0,
    ) {
        Outcome::Reply { message, verdict } => Some((Response::parse(&message).unwrap(), verdict)),
        Outcome::Forward => None,
        Outcome::Drop(e) => panic!("dropped {name}: {e}"),
    }
}

#[test]
fn mesh_name_forms_resolve_as_istio_dns_proxy_does() {
    let t = table();
    let cases: &[(&str, u16, &[&str])] = &[
        (
            "details.apps.svc.cluster.local",
            rtype::A,
            &["details.apps.svc.cluster.local A 10.0.0.10"],
        ),
        (
            "details.apps.svc",
            rtype::A,
            &["details.apps.svc A 10.0.0.10"],
        ),
        ("details.apps", rtype::A, &["details.apps A 10.0.0.10"]),
        ("details", rtype::A, &["details A 10.0.0.10"]),
        ("ratings.shop", rtype::A, &["ratings.shop A 10.0.0.20"]),
        (
            "ratings.shop.svc",
            rtype::AAAA,
            &["ratings.shop.svc AAAA fd00::20"],
        ),
        (
            "vmservice.example.com",
            rtype::A,
            &["vmservice.example.com A 240.240.0.1"],
        ),
        (
            "a.wild.example.com",
            rtype::A,
            &["a.wild.example.com A 240.240.0.2"],
        ),
        (
            "x.y.wild.example.com",
            rtype::A,
            &["x.y.wild.example.com A 240.240.0.2"],
        ),
        (
            "details.apps.svc.cluster.local.corp.example",
            rtype::A,
            &[
                "details.apps.svc.cluster.local.corp.example CNAME details.apps.svc.cluster.local",
                "details.apps.svc.cluster.local A 10.0.0.10",
            ],
        ),
        (
            "details.corp.example",
            rtype::A,
            &[
                "details.corp.example CNAME details.apps.svc.cluster.local",
                "details.apps.svc.cluster.local A 10.0.0.10",
            ],
        ),
        (
            "ratings.shop.svc.cluster.local",
            rtype::A,
            &["ratings.shop.svc.cluster.local A 10.0.0.20"],
        ),
        (
            "ratings.shop.apps.svc.cluster.local",
            rtype::A,
            &[
                "ratings.shop.apps.svc.cluster.local CNAME ratings.shop.svc.cluster.local",
                "ratings.shop.svc.cluster.local A 10.0.0.20",
            ],
        ),
        (
            "vmservice.example.com.corp.example",
            rtype::A,
            &[
                "vmservice.example.com.corp.example CNAME vmservice.example.com",
                "vmservice.example.com A 240.240.0.1",
            ],
        ),
        (
            "a.wild.example.com.corp.example",
            rtype::A,
            &[
                "a.wild.example.com.corp.example CNAME a.wild.example.com",
                "a.wild.example.com A 240.240.0.2",
            ],
        ),
    ];
    for (name, qtype, want) in cases {
        let (resp, verdict) =
            answer(Some(&t), name, *qtype).unwrap_or_else(|| panic!("{name} forwarded"));
        assert_eq!(render(&resp), *want, "{name}");
        assert!(resp.authoritative(), "{name}: AA");
        assert_eq!(resp.rcode(), 0, "{name}");
        assert_eq!(verdict, Verdict::Answered { truncated: false }, "{name}");
        assert_eq!(resp.header.id, 0x1234);
        assert!(resp.answers.iter().all(|rr| rr.ttl == 30), "{name}: TTL 30");
    }
}

#[test]
fn names_outside_the_mesh_and_other_types_are_forwarded() {
    let t = table();
    let forwarded: &[(&str, u16)] = &[
        ("example.org", rtype::A),
        ("ratings", rtype::A),   // short name of another namespace
        ("vmservice", rtype::A), // ServiceEntry hosts have no short forms
        ("vmservice.example", rtype::A),
        ("wild.example.com", rtype::A), // a wildcard does not match its own suffix
        ("nothere.apps.svc.cluster.local", rtype::A),
        ("vmservice.example.com", TXT),
        ("details.apps.svc.cluster.local", SRV),
        ("details", 255),
    ];
    for (name, qtype) in forwarded {
        assert!(
            answer(Some(&t), name, *qtype).is_none(),
            "{name} type {qtype} should be forwarded"
        );
    }
}

#[test]
fn rfc4074_aaaa_for_v4_only_name_is_authoritative_nodata() {
    let t = table();
    for (name, qtype) in [
        ("vmservice.example.com", rtype::AAAA),
        ("v6only.example.com", rtype::A),
        ("details", rtype::AAAA),
    ] {
        let (resp, verdict) = answer(Some(&t), name, qtype).unwrap();
        assert_eq!(verdict, Verdict::NoData, "{name}");
        assert_eq!(resp.rcode(), 0);
        assert!(resp.authoritative());
        assert!(resp.answers.is_empty());
    }
}

#[test]
fn names_compare_case_insensitively_and_the_question_is_echoed_as_asked() {
    let t = table();
    let (resp, _) = answer(Some(&t), "VmService.EXAMPLE.com", rtype::A).unwrap();
    assert_eq!(
        resp.questions,
        vec![("VmService.EXAMPLE.com".to_string(), rtype::A, 1)]
    );
    assert_eq!(render(&resp), ["VmService.EXAMPLE.com A 240.240.0.1"]);
}

#[test]
fn before_a_table_arrives_cluster_names_fail_and_others_are_forwarded() {
    let (resp, verdict) = answer(None, "details.apps.svc.cluster.local", rtype::A).unwrap();
    assert_eq!((resp.rcode(), verdict), (2, Verdict::NotReady));
    assert!(answer(None, "cluster.local.example.org", rtype::A).is_none());
    assert!(answer(None, "vmservice.example.com", rtype::A).is_none());
}

#[test]
fn rfc1035_4_2_1_udp_answer_is_cut_to_512_with_tc_and_whole_over_tcp() {
    let t = table();
    let udp = respond(
        &query("big.example.com", rtype::A, None),
        Transport::Udp,
        Some(&t),
        "cluster.local",
        0,
    );
    let Outcome::Reply { message, verdict } = udp else {
        panic!("not answered")
    };
    assert!(message.len() <= 512);
    assert_eq!(verdict, Verdict::Answered { truncated: true });
    let resp = Response::parse(&message).unwrap();
    assert!(resp.truncated());
    assert!(!resp.answers.is_empty() && resp.answers.len() < 100);

    let Outcome::Reply { message, .. } = respond(
        &query("big.example.com", rtype::A, None),
        Transport::Tcp,
        Some(&t),
        "cluster.local",
        0,
    ) else {
        panic!("not answered")
    };
    let resp = Response::parse(&message).unwrap();
    assert!(!resp.truncated());
    assert_eq!(resp.answers.len(), 100);
    // Every owner is a 2-byte pointer to the question: 12 + question + 100 x 16.
    assert_eq!(message.len(), 12 + 17 + 4 + 100 * 16);
}

#[test]
fn rfc6891_edns_payload_size_lifts_the_udp_limit_and_opt_is_echoed() {
    let t = table();
    let q = query("big.example.com", rtype::A, Some((4096, 0)));
    let Outcome::Reply { message, .. } = respond(&q, Transport::Udp, Some(&t), "cluster.local", 0)
    else {
        panic!()
    };
    let resp = Response::parse(&message).unwrap();
    assert!(!resp.truncated());
    assert_eq!(resp.answers.len(), 100);
    assert_eq!(resp.additional.len(), 1);
    assert_eq!(resp.additional[0].rtype, rtype::OPT);

    // EDNS 1232 holds 73 records of 16 bytes after header, question and OPT.
    let q = query("big.example.com", rtype::A, Some((1232, 0)));
    let Outcome::Reply { message, .. } = respond(&q, Transport::Udp, Some(&t), "cluster.local", 0)
    else {
        panic!()
    };
    let resp = Response::parse(&message).unwrap();
    assert!(resp.truncated() && message.len() <= 1232);
    assert_eq!(resp.answers.len(), (1232 - 12 - 21 - 11) / 16);
    assert_eq!(resp.additional.len(), 1, "OPT survives truncation");
}

#[test]
fn rfc6891_6_1_3_unknown_edns_version_gets_badvers() {
    let q = query("vmservice.example.com", rtype::A, Some((1232, 1)));
    let Outcome::Reply { message, verdict } =
        respond(&q, Transport::Udp, Some(&table()), "cluster.local", 0)
    else {
        panic!()
    };
    assert_eq!(verdict, Verdict::BadVers);
    let resp = Response::parse(&message).unwrap();
    assert_eq!(resp.rcode(), 0, "low bits of 16");
    assert_eq!(resp.additional[0].ttl >> 24, 1, "extended RCODE high bits");
}

#[test]
fn zone_transfers_are_refused() {
    let (resp, verdict) = answer(Some(&table()), "vmservice.example.com", rtype::AXFR).unwrap();
    assert_eq!((resp.rcode(), verdict), (5, Verdict::Refused));
}

#[test]
fn answers_rotate_through_a_names_addresses() {
    let t = table();
    let first = |rotation| {
        let q = query("big.example.com", rtype::A, None);
        let Outcome::Reply { message, .. } =
            respond(&q, Transport::Tcp, Some(&t), "cluster.local", rotation)
        else {
            panic!()
        };
        Response::parse(&message).unwrap().answers[0].data.clone()
    };
    assert_eq!(first(0), RData::A("10.9.0.0".parse().unwrap()));
    assert_eq!(first(1), RData::A("10.9.0.1".parse().unwrap()));
    assert_eq!(first(101), RData::A("10.9.0.1".parse().unwrap()));
}

#[test]
fn forwarded_answers_get_the_client_id_and_are_cut_for_udp() {
    use vmesh_core::responder::forwarded_answer;
    let t = table();
    let client_query = query("big.example.com", rtype::A, None);
    let Outcome::Reply {
        message: mut upstream,
        ..
    } = respond(&client_query, Transport::Tcp, Some(&t), "cluster.local", 0)
    else {
        panic!()
    };
    upstream[0] = 0x99;
    upstream[1] = 0x99;

    let over_tcp = forwarded_answer(&client_query, &upstream, Transport::Tcp).unwrap();
    assert_eq!(&over_tcp[..2], &[0x12, 0x34]);
    assert_eq!(&over_tcp[2..], &upstream[2..], "byte-for-byte but the ID");

    let over_udp =
        Response::parse(&forwarded_answer(&client_query, &upstream, Transport::Udp).unwrap())
            .unwrap();
    assert!(over_udp.truncated());
    assert_eq!(over_udp.header.id, 0x1234);
    assert_eq!(over_udp.questions.len(), 1);
    assert!(over_udp.answers.is_empty());

    // Something that is not a DNS response becomes SERVFAIL for the client.
    let garbage =
        Response::parse(&forwarded_answer(&client_query, b"<html>", Transport::Udp).unwrap())
            .unwrap();
    assert_eq!((garbage.rcode(), garbage.header.id), (2, 0x1234));
}
