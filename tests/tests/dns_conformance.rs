//! DNS conformance of the VM's DNS proxy, through `dig` against the real Envoy running the built
//! filter, with the real shim forwarding to dnsmasq as the system resolver. Each test is named
//! after the behaviour (or RFC section) it checks.

use vmesh_tests::support::dnsmasq::{BIG_NAME, FORWARDED_ADDR, FORWARDED_NAME};
use vmesh_tests::support::doh;
use vmesh_tests::support::sidecar::{test_table, Sidecar, SidecarOptions};

const ANSWERED: &str = "wasmcustom.vmesh_dns_answered";
const FORWARDED: &str = "wasmcustom.vmesh_dns_forwarded";

#[test]
fn mesh_a_record_is_answered_by_the_filter_without_leaving_envoy() {
    let s = Sidecar::start();
    let (answered, forwarded) = (s.envoy.stat(ANSWERED), s.envoy.stat(FORWARDED));
    let d = s.ask(&["vmservice.example.com", "A"]);
    assert_eq!(d.status, "NOERROR");
    assert!(d.has_flag("aa"), "authoritative: {:?}", d.flags);
    assert_eq!(d.data("A"), ["240.240.0.1"]);
    assert_eq!(d.answers[0].ttl, 30);
    assert_eq!(s.envoy.stat(ANSWERED), answered + 1);
    assert_eq!(s.envoy.stat(FORWARDED), forwarded, "nothing was forwarded");
}

#[test]
fn rfc4074_aaaa_for_a_v4_only_mesh_name_is_authoritative_nodata() {
    let s = Sidecar::start();
    let d = s.ask(&["vmservice.example.com", "AAAA"]);
    assert_eq!(d.status, "NOERROR");
    assert!(d.has_flag("aa"));
    assert!(d.answers.is_empty(), "{:?}", d.answers);
    // A dual-stack name does answer AAAA.
    assert_eq!(
        s.ask(&["details.vm-namespace.svc.cluster.local", "AAAA"])
            .data("AAAA"),
        ["fd00:10:96::a"]
    );
}

#[test]
fn kubernetes_short_name_forms_resolve_like_istio() {
    let s = Sidecar::start();
    for name in [
        "details.vm-namespace.svc.cluster.local",
        "details.vm-namespace.svc",
        "details.vm-namespace",
        "details",
    ] {
        let d = s.ask(&[name, "A"]);
        assert_eq!(d.data("A"), ["10.96.0.10"], "{name}: {}", d.raw);
        assert!(d.has_flag("aa"), "{name}");
    }
    assert_eq!(
        s.ask(&["helloworld.sample", "A"]).data("A"),
        ["10.96.12.34"]
    );
    // A bare name resolves only in the VM's own namespace; elsewhere it goes upstream.
    let other = s.ask(&["helloworld", "A"]);
    assert_eq!(other.status, "NXDOMAIN", "{}", other.raw);
}

#[test]
fn service_entry_wildcard_host_matches_any_depth_but_not_itself() {
    let s = Sidecar::start();
    assert_eq!(s.ask(&["a.wild.example.com"]).data("A"), ["240.240.0.2"]);
    assert_eq!(s.ask(&["x.y.wild.example.com"]).data("A"), ["240.240.0.2"]);
    assert_eq!(s.ask(&["wild.example.com"]).status, "NXDOMAIN");
}

#[test]
fn search_domain_suffix_is_answered_with_a_cname_chain() {
    let s = Sidecar::start();
    let d = s.ask(&["details.vm-namespace.svc.cluster.local.corp.example", "A"]);
    assert_eq!(d.status, "NOERROR");
    assert_eq!(d.data("CNAME"), ["details.vm-namespace.svc.cluster.local."]);
    assert_eq!(d.data("A"), ["10.96.0.10"]);
    let d = s.ask(&["vmservice.example.com.vm-namespace.svc.cluster.local", "A"]);
    assert_eq!(d.data("CNAME"), ["vmservice.example.com."]);
    assert_eq!(d.data("A"), ["240.240.0.1"]);
}

#[test]
fn names_compare_case_insensitively_and_the_question_is_echoed_as_asked() {
    let s = Sidecar::start();
    let d = s.ask(&["VmService.EXAMPLE.com", "A"]);
    assert_eq!(d.question, "VmService.EXAMPLE.com.");
    assert_eq!(d.answers[0].name, "VmService.EXAMPLE.com.");
    assert_eq!(d.data("A"), ["240.240.0.1"]);
}

#[test]
fn answers_rotate_through_a_names_addresses() {
    let s = Sidecar::start();
    let firsts: std::collections::BTreeSet<String> = (0..6)
        .map(|_| s.ask(&["rr.example.com"]).data("A")[0].clone())
        .collect();
    assert!(
        firsts.len() > 1,
        "every answer led with the same address: {firsts:?}"
    );
}

#[test]
fn non_mesh_name_is_forwarded_to_the_system_resolver() {
    let s = Sidecar::start();
    let forwarded = s.envoy.stat(FORWARDED);
    let d = s.ask(&[FORWARDED_NAME, "A"]);
    assert_eq!(d.data("A"), [FORWARDED_ADDR]);
    assert!(!d.has_flag("aa") || d.raw.contains(FORWARDED_ADDR));
    assert_eq!(s.envoy.stat(FORWARDED), forwarded + 1);
    assert_eq!(s.ask(&["nothere.example.org"]).status, "NXDOMAIN");
}

#[test]
fn txt_and_srv_for_a_mesh_name_are_forwarded() {
    let s = Sidecar::start();
    assert_eq!(
        s.ask(&["vmservice.example.com", "TXT"]).data("TXT"),
        ["\"vm txt\""]
    );
    assert_eq!(
        s.ask(&["vmservice.example.com", "SRV"]).data("SRV"),
        ["0 0 9090 target.example.com."]
    );
}

#[test]
fn rfc7766_dns_over_tcp_answers_mesh_names_and_forwards_the_rest() {
    let s = Sidecar::start();
    assert_eq!(
        s.ask(&["+tcp", "vmservice.example.com"]).data("A"),
        ["240.240.0.1"]
    );
    assert_eq!(s.ask(&["+tcp", "details"]).data("A"), ["10.96.0.10"]);
    assert_eq!(s.ask(&["+tcp", FORWARDED_NAME]).data("A"), [FORWARDED_ADDR]);
    assert_eq!(
        s.ask(&["+tcp", "vmservice.example.com", "TXT"]).data("TXT"),
        ["\"vm txt\""]
    );
}

#[test]
fn rfc1035_4_2_1_udp_answer_over_512_bytes_is_truncated_and_tcp_gets_it_whole() {
    let s = Sidecar::start();
    let udp = s.ask(&["+noedns", "+ignore", "big.mesh.example.com"]);
    assert!(udp.has_flag("tc"), "{}", udp.raw);
    assert!(udp.answers.len() < 100);
    let tcp = s.ask(&["+tcp", "big.mesh.example.com"]);
    assert!(!tcp.has_flag("tc"));
    assert_eq!(tcp.data("A").len(), 100);
    // dig's own fallback: UDP first, TC, then TCP.
    assert_eq!(
        s.ask(&["+noedns", "big.mesh.example.com"]).data("A").len(),
        100
    );
}

#[test]
fn rfc6891_edns_buffer_size_lifts_the_udp_limit_and_opt_is_returned() {
    let s = Sidecar::start();
    let d = s.ask(&["+bufsize=4096", "+ignore", "big.mesh.example.com"]);
    assert!(!d.has_flag("tc"), "{}", d.raw);
    assert_eq!(d.data("A").len(), 100);
    assert_eq!(d.edns_udp, Some(1232));
    let small = s.ask(&["+bufsize=1232", "+ignore", "big.mesh.example.com"]);
    assert!(small.has_flag("tc"));
}

#[test]
fn forwarded_large_edns_answer_arrives_intact_and_is_truncated_without_edns() {
    let s = Sidecar::start();
    let d = s.ask(&["+bufsize=4096", "+ignore", BIG_NAME]);
    assert!(!d.has_flag("tc"), "{}", d.raw);
    assert_eq!(d.data("A").len(), 100);
    let d = s.ask(&["+noedns", "+ignore", BIG_NAME]);
    assert!(d.has_flag("tc"), "{}", d.raw);
    assert_eq!(s.ask(&["+tcp", BIG_NAME]).data("A").len(), 100);
}

#[test]
fn servfail_when_every_upstream_is_dead() {
    // A port nobody listens on: the shim's UDP attempt is refused at once.
    let dead = format!("127.0.0.1:{}", vmesh_test_support::free_port());
    let s = Sidecar::start_with(SidecarOptions {
        upstreams: Some(vec![dead]),
        ..Default::default()
    });
    s.wait_for_table();
    assert_eq!(s.ask(&[FORWARDED_NAME]).status, "SERVFAIL");
    assert_eq!(s.ask(&["+tcp", FORWARDED_NAME]).status, "SERVFAIL");
    // Mesh names do not depend on the upstream.
    assert_eq!(s.ask(&["vmservice.example.com"]).data("A"), ["240.240.0.1"]);
}

#[test]
fn before_the_first_table_cluster_names_get_servfail_and_others_are_forwarded() {
    let s = Sidecar::start_with(SidecarOptions {
        table: None,
        ..Default::default()
    });
    assert_eq!(
        s.ask(&["details.vm-namespace.svc.cluster.local"]).status,
        "SERVFAIL"
    );
    assert_eq!(s.ask(&[FORWARDED_NAME]).data("A"), [FORWARDED_ADDR]);
}

#[test]
fn edited_table_file_is_picked_up_without_restarts() {
    let s = Sidecar::start();
    // Same version as before: people edit names and forget the version.
    let mut table = test_table("v1");
    table["names"]["new.example.com"] =
        serde_json::json!({"ips": ["240.240.9.9"], "registry": "External"});
    s.replace_table(&table);
    vmesh_test_support::eventually::eventually("the new name resolves", || {
        let d = s.dig(&["new.example.com"])?;
        if d.data("A") == ["240.240.9.9"] {
            Ok(())
        } else {
            Err(d.raw)
        }
    });
}

#[test]
fn table_keeps_serving_when_the_shim_goes_away() {
    let mut s = Sidecar::start();
    s.shim.as_mut().expect("shim").stop();
    for _ in 0..5 {
        assert_eq!(s.ask(&["vmservice.example.com"]).data("A"), ["240.240.0.1"]);
        assert_eq!(s.ask(&["+tcp", "details"]).data("A"), ["10.96.0.10"]);
    }
    // Forwarding has nowhere to go: SERVFAIL, not a hang.
    assert_eq!(s.ask(&[FORWARDED_NAME]).status, "SERVFAIL");
}

#[test]
fn dns_over_https_get_and_post_answer_mesh_names_and_forward_the_rest() {
    let s = Sidecar::start();
    for (name, want) in [
        ("vmservice.example.com", "240.240.0.1"),
        (FORWARDED_NAME, FORWARDED_ADDR),
    ] {
        let query = doh::query(name);
        let get = doh::get(s.envoy.doh, &query);
        assert_eq!(get.status, 200, "{name}");
        assert_eq!(get.content_type, "application/dns-message");
        assert_eq!(doh::addresses(&get.body), [want], "{name} GET");
        let post = doh::post(s.envoy.doh, &query, "application/dns-message");
        assert_eq!(doh::addresses(&post.body), [want], "{name} POST");
    }
    let wrong = doh::post(s.envoy.doh, &doh::query("x"), "text/plain");
    assert_eq!(wrong.status, 415);
}
