//! The demo (`scripts/demo.sh`) as a test: the same scenario (`vmesh-demo`), run in checking
//! mode. Two networks of network namespaces, the real control plane, shims, Envoys with the
//! built `vmesh_filter.wasm` and the shim's iptables capture; every step checks what it shows
//! (see `demo/src/scenario.rs`), and this test checks the report and that the teardown left
//! no namespace, interface or process behind.
//!
//! Skips only without root/CAP_NET_ADMIN or iptables (`netns::unavailable`); anything else
//! missing (Envoy, the built artifacts, curl, dig) is a failure.

use std::collections::BTreeSet;

use vmesh_demo::{Mode, Options};
use vmesh_test_support::netns;

#[test]
fn the_seed_scenario_runs_across_two_networks_and_leaves_nothing_behind() {
    if let Some(why) = netns::unavailable() {
        eprintln!(
            "skipping the_seed_scenario_runs_across_two_networks_and_leaves_nothing_behind: {why}"
        );
        return;
    }
    let links_before = netns::root_links();
    let report = vmesh_demo::run(&Options {
        mode: Mode::Check,
        requests: 8,
    })
    .unwrap_or_else(|e| panic!("the scenario failed: {e}"));

    // Both python-http replicas, the client and httpbin registered themselves.
    let addrs: BTreeSet<&str> = report.entries.values().map(String::as_str).collect();
    for want in ["198.18.1.21", "198.18.1.22", "198.18.1.30", "198.18.2.40"] {
        assert!(
            addrs.contains(want),
            "no entry for {want}: {:?}",
            report.entries
        );
    }
    assert!(
        report.service_vip.starts_with("240.240."),
        "vmservice.example.com resolved to {:?} on the client",
        report.service_vip
    );

    // The client's requests reached both replicas, each named by its WorkloadEntry.
    for replica in [
        "python-http-198.18.1.21-network-a",
        "python-http-198.18.1.22-network-a",
    ] {
        assert!(
            report.answers.iter().any(|a| a == replica),
            "{replica} never answered: {:?}",
            report.answers
        );
    }
    // httpbin answered the client in network-b, through the gateway.
    assert!(
        report.httpbin.contains("\"url\""),
        "httpbin's answer: {}",
        report.httpbin
    );
    assert!(report.gateway_routed > 0, "the gateway routed nothing");
    // The stopped replica left the answers, and its entry went, within the liveness timeout
    // plus the grace period plus slack for a loaded machine.
    let bound = vmesh_demo::scenario::LIVENESS_TIMEOUT
        + vmesh_demo::scenario::GRACE_PERIOD
        + std::time::Duration::from_secs(10);
    let left = report.left_answers_after.expect("the replica left");
    assert!(
        left <= bound,
        "left the answers after {left:?} (bound {bound:?})"
    );
    let deleted = report.entry_deleted_after.expect("the entry was deleted");
    assert!(
        deleted <= bound,
        "deleted after {deleted:?} (bound {bound:?})"
    );
    assert!(
        deleted >= vmesh_demo::scenario::GRACE_PERIOD,
        "deleted after {deleted:?}, before the grace period"
    );

    // Teardown: nothing of the run is left.
    let prefix = vmesh_demo::topology::prefix_for(std::process::id());
    assert!(
        netns::list(&prefix).is_empty(),
        "namespaces left: {:?}",
        netns::list(&prefix)
    );
    assert!(!report.namespaces.is_empty());
    let links_after = netns::root_links();
    assert!(
        links_after.is_subset(&links_before),
        "new interfaces in the root namespace: {:?}",
        links_after.difference(&links_before).collect::<Vec<_>>()
    );
    assert!(!report.pids.is_empty());
    for pid in &report.pids {
        assert!(
            !std::path::Path::new("/proc").join(pid.to_string()).exists(),
            "process {pid} still runs"
        );
    }
    for ns in &report.namespaces {
        assert!(
            !std::path::Path::new(netns::ETC_NETNS).join(ns).exists(),
            "/etc/netns/{ns} is left"
        );
    }
}
