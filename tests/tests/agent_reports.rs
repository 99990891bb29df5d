//! The filter's agent in a real Envoy (vm-sidecar.yaml, two workers): its liveness reports
//! reach the shim's endpoint with Envoy's readiness and the data path's counters summed over
//! the workers, it runs the probe the reply names through Envoy's probe cluster, and its
//! reports stop when Envoy hangs (`kill -STOP`).
//!
//! The shim's side of `POST /v1/agent/report` is not built yet, so a stand-in
//! (`support::stubs::ShimStub`) listens on the shim's port: it records the reports, answers with
//! the reply the test sets, and serves the name table.

use std::time::Duration;

use vmesh_api::agent::{counter, AgentReply, ProbeKind, ProbeTask, RegistrationState};
use vmesh_test_support::eventually::eventually;
use vmesh_tests::support::dnsmasq::FORWARDED_NAME;
use vmesh_tests::support::sidecar::{test_table, Sidecar, SidecarOptions};
use vmesh_tests::support::stubs::{ProbeTarget, Received, ShimStub};

const PERIOD: Duration = Duration::from_millis(1000);

/// The newest report once `check` accepts it.
fn report_where(
    stub: &ShimStub,
    what: &str,
    check: impl Fn(&Received) -> Result<(), String>,
) -> Received {
    eventually(what, || {
        let last = stub.last().ok_or("no report yet")?;
        check(&last).map(|()| last)
    })
}

fn counter_of(r: &Received, name: &str) -> u64 {
    r.report.counters.get(name).unwrap_or(0)
}

#[test]
fn reports_carry_readiness_counters_and_the_probe_verdict_and_stop_when_envoy_hangs() {
    let s = Sidecar::start_with(SidecarOptions {
        shim: false,
        ..SidecarOptions::default()
    });
    let stub = ShimStub::start(s.shim_port, test_table("v1"));
    stub.set_reply(AgentReply {
        state: RegistrationState::Registered,
        ..AgentReply::default()
    });
    let first = report_where(&stub, "a report says Envoy is ready", |r| {
        (r.report.ready && r.report.period_ms == 1000)
            .then_some(())
            .ok_or(format!("{:?}", r.report))
    });
    s.wait_for_table();

    // DNS through both workers moves the counters. Counting starts from a report sent after
    // the table check's queries, so nothing else is in it.
    let settled = stub.last().expect("a report").report.seq;
    let before = report_where(&stub, "a report after the table check", |r| {
        (r.report.seq > settled)
            .then_some(())
            .ok_or("not yet".into())
    });
    for _ in 0..4 {
        assert_eq!(s.ask(&["vmservice.example.com"]).data("A"), ["240.240.0.1"]);
        s.ask(&["+tcp", "vmservice.example.com"]);
    }
    // The stand-in does not forward: SERVFAIL, an error.
    assert_eq!(s.ask(&[FORWARDED_NAME]).status, "SERVFAIL");
    let after = report_where(&stub, "reports count the queries", |r| {
        let moved = |name| counter_of(r, name) - counter_of(&before, name);
        let got = [
            moved(counter::DNS_QUERIES),
            moved(counter::DNS_ANSWERED),
            moved(counter::DNS_FORWARDED),
            moved(counter::DNS_ERRORS),
        ];
        (got == [9, 8, 1, 1]).then_some(()).ok_or(format!(
            "queries, answered, forwarded, errors moved by {got:?}"
        ))
    });
    assert_eq!(after.report.boot, first.report.boot);
    assert!(after.report.seq > first.report.seq);
    let idle = after.report.worker_idle_ms.expect("workers tick");
    assert!(idle < 1000, "workers tick every 250 ms, idle {idle} ms");

    // The probe the reply names runs through Envoy: healthy, then unhealthy.
    let app = ProbeTarget::start();
    stub.set_reply(AgentReply {
        state: RegistrationState::Registered,
        workload_entry: None,
        probe: Some(ProbeTask {
            id: 1,
            kind: ProbeKind::HttpGet,
            host: "127.0.0.1".into(),
            port: app.port,
            path: "/healthz?from=vmesh".into(),
            headers: vec![("X-Probe".into(), "vmesh".into())],
            initial_delay_ms: 0,
            period_ms: 300,
            timeout_ms: 1000,
            success_threshold: 1,
            failure_threshold: 1,
        }),
    });
    report_where(&stub, "the probe is healthy", |r| match &r.report.probe {
        Some(p) if p.healthy && p.message == "HTTP 200" => Ok(()),
        other => Err(format!("{other:?}")),
    });
    let (path, headers) = app.requests().pop().expect("the probe reached the app");
    assert_eq!(path, "/healthz?from=vmesh");
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(header("x-probe"), Some("vmesh"));
    assert_eq!(
        header("host"),
        Some(format!("127.0.0.1:{}", app.port).as_str())
    );
    // The cluster's upstream filters took the routing header off (and Envoy's internal mark).
    assert_eq!(header("x-envoy-original-dst-host"), None);
    assert_eq!(header("x-envoy-internal"), None);

    app.set_status(503);
    report_where(&stub, "the probe is unhealthy", |r| match &r.report.probe {
        Some(p) if !p.healthy && p.message == "HTTP 503" => Ok(()),
        other => Err(format!("{other:?}")),
    });

    // A hung Envoy sends nothing: the shim's judgement rests on reports stopping.
    s.envoy.signal("STOP");
    let hung = eventually("reports stop while Envoy is stopped", || {
        let last = stub.last().ok_or("no report")?;
        let silent = last.at.elapsed();
        (silent > PERIOD * 3)
            .then_some(last)
            .ok_or(format!("last report {silent:?} ago"))
    });
    s.envoy.signal("CONT");
    report_where(&stub, "reports resume after SIGCONT", |r| {
        (r.report.seq > hung.report.seq && r.report.boot == hung.report.boot)
            .then_some(())
            .ok_or(format!("seq {} after {}", r.report.seq, hung.report.seq))
    });
}

#[test]
fn a_new_table_is_answered_by_every_worker_within_a_second() {
    let s = Sidecar::start_with(SidecarOptions {
        shim: false,
        ..SidecarOptions::default()
    });
    let stub = ShimStub::start(s.shim_port, test_table("v1"));
    s.wait_for_table();
    let mut table = test_table("v2");
    table["names"]["vmservice.example.com"]["ips"] = serde_json::json!(["240.240.7.7"]);
    let changed = std::time::Instant::now();
    stub.set_table(table);
    // Several answers in a row from fresh source ports, so both workers are asked: the run
    // that ends the loop must have started within the second.
    let (mut in_a_row, mut run_started) = (0, changed.elapsed());
    while in_a_row < 6 {
        assert!(
            changed.elapsed() < Duration::from_secs(1) || in_a_row > 0,
            "the old table still answers after {:?}",
            changed.elapsed()
        );
        let d = s.ask(&["vmservice.example.com"]);
        if d.data("A") == ["240.240.7.7"] {
            if in_a_row == 0 {
                run_started = changed.elapsed();
            }
            in_a_row += 1;
        } else {
            in_a_row = 0;
        }
    }
    assert!(run_started < Duration::from_secs(1), "{run_started:?}");
    println!("every worker answers from the new table {run_started:?} after the change");
}
