//! The agent root (`vmesh_agent`, Envoy's bootstrap singleton): it long-polls the name table
//! from the shim, publishes the compiled image to the workers through shared data, and backs
//! off on failures while the last published table keeps serving. On a period it asks Envoy's
//! admin `/ready`, reports liveness and the data path's counters to the shim, and runs the
//! httpGet probe the shim's reply names through Envoy; the next report carries its verdict.

use std::time::Duration;

use vmesh_api::agent::{
    counter, AgentReply, AgentReport, ProbeKind, ProbeResult, ProbeTask, RegistrationState,
};
use vmesh_api::control::EntryRef;
use vmesh_api::paths::shim::AGENT_REPORT;
use vmesh_core::framing::Framing;
use vmesh_core::names::NameIndex;
use vmesh_tests::wasm_host::vmesh::{
    self, calls_to, framed, pending_to, query, single_callout_to, small_table, table_poll,
    ADMIN_CLUSTER, IMAGE_KEY, NAME_TABLE_PATH as TABLE, PROBE_CLUSTER, ROUTES_IMAGE_KEY,
    ROUTES_VERSION_KEY, SHIM_AUTHORITY, SHIM_CLUSTER, VERSION_KEY, VM_ID, WORKER_TICK_KEY,
};
use vmesh_tests::wasm_host::{
    Host, HostCall, HttpCallRequest, HttpResponse, LogLevel, Status, Vm, VmError,
};

fn agent() -> Result<(Host, Vm), VmError> {
    let host = vmesh::host();
    let vm = vmesh::agent(&host, "{}")?;
    Ok((host, vm))
}

/// The agent with table `v1` published and its next long-poll in flight.
fn agent_with_v1() -> Result<(Host, Vm), VmError> {
    let (host, mut vm) = agent()?;
    vmesh::publish(&host, &mut vm, &small_table("v1"))?;
    Ok((host, vm))
}

/// What workers would read: the version key, and the image with its cas.
type Published = (Option<Vec<u8>>, Option<(Vec<u8>, u32)>);

fn published(host: &Host) -> Published {
    (
        host.shared_data(VM_ID, VERSION_KEY).map(|(v, _)| v),
        host.shared_data(VM_ID, IMAGE_KEY),
    )
}

#[test]
fn first_tick_long_polls_the_shim_for_the_table() -> Result<(), VmError> {
    let (_host, mut vm) = agent()?;
    assert!(vm.tick_period().is_some());
    let mark = vm.mark();
    vm.tick()?;
    let call = single_callout_to(&vm, mark, TABLE);
    assert_eq!(call.upstream, SHIM_CLUSTER);
    assert_eq!(call.header(":method"), Some("GET"));
    assert_eq!(call.header(":path"), Some("/v1/name-table?wait=30"));
    assert_eq!(call.header(":authority"), Some(SHIM_AUTHORITY));
    assert_eq!(call.header("accept"), Some("application/json"));
    assert!(call.body.is_empty());
    assert_eq!(call.timeout_ms, 35_000, "wait plus a margin");

    // One poll at a time: more ticks while it is in flight send nothing.
    let mark = vm.mark();
    vm.tick()?;
    vm.tick()?;
    assert!(calls_to(&vm, mark, TABLE).is_empty());
    Ok(())
}

#[test]
fn configured_wait_cluster_and_authority_go_into_the_poll() -> Result<(), VmError> {
    let host = vmesh::host();
    host.add_cluster("names");
    let mut vm = vmesh::agent(
        &host,
        r#"{"shim_cluster":"names","shim_authority":"names.local","table_wait_s":5}"#,
    )?;
    let mark = vm.mark();
    vm.tick()?;
    let call = single_callout_to(&vm, mark, TABLE);
    assert_eq!(call.upstream, "names");
    assert_eq!(call.header(":authority"), Some("names.local"));
    assert_eq!(call.header(":path"), Some("/v1/name-table?wait=5"));
    assert_eq!(call.timeout_ms, 10_000);
    Ok(())
}

#[test]
fn a_200_table_is_published_image_first_then_version() -> Result<(), VmError> {
    let (host, mut vm) = agent()?;
    vm.tick()?;
    let token = table_poll(&vm);
    let table = small_table("v1");
    let mark = vm.mark();
    vm.http_call_response(token, HttpResponse::status(200).body(table.to_json()))?;

    let writes: Vec<(String, Vec<u8>)> = vm
        .calls_since(mark)
        .into_iter()
        .filter_map(|r| match r.call {
            HostCall::SetSharedData { key, value, cas } => {
                assert_eq!((r.status, cas), (Status::Ok, 0));
                Some((key, value))
            }
            _ => None,
        })
        .collect();
    let keys: Vec<&str> = writes.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [IMAGE_KEY, VERSION_KEY, ROUTES_IMAGE_KEY, ROUTES_VERSION_KEY],
        "workers key on the version; names first, then routes"
    );
    assert_eq!(writes[1].1, b"v1");
    assert_eq!(writes[3].1, b"v1");
    let routes = vmesh_core::routes::RouteIndex::from_image(&writes[2].1).expect("routes image");
    assert_eq!(routes.version(), "v1");

    let index = NameIndex::from_image(writes[0].1.clone()).expect("a valid image");
    assert_eq!((index.version(), index.len()), ("v1", table.names.len()));
    assert_eq!(published(&host).0.as_deref(), Some(&b"v1"[..]));
    assert_eq!(host.stat_value("vmesh_table_updates"), 1);
    assert_eq!(host.stat_value("vmesh_table_names"), 4);
    Ok(())
}

#[test]
fn after_a_table_the_next_poll_goes_out_at_once_with_its_version() -> Result<(), VmError> {
    let (host, mut vm) = agent()?;
    vm.tick()?;
    let token = table_poll(&vm);
    let mark = vm.mark();
    let table = small_table("2024-06-01T00:00:00Z/7 a&b");
    vm.http_call_response(token, HttpResponse::status(200).body(table.to_json()))?;
    let next = single_callout_to(&vm, mark, TABLE);
    assert_eq!(
        next.header(":path"),
        Some("/v1/name-table?wait=30&version=2024-06-01T00%3A00%3A00Z%2F7%20a%26b")
    );
    assert_eq!(
        published(&host).0.as_deref(),
        Some(table.version.as_bytes())
    );
    Ok(())
}

#[test]
fn not_modified_304_polls_again_at_once_with_the_same_version() -> Result<(), VmError> {
    let (host, mut vm) = agent_with_v1()?;
    let before = published(&host);
    for _ in 0..3 {
        let token = table_poll(&vm);
        let mark = vm.mark();
        vm.http_call_response(token, HttpResponse::status(304))?;
        let next = single_callout_to(&vm, mark, TABLE);
        assert_eq!(
            next.header(":path"),
            Some("/v1/name-table?wait=30&version=v1")
        );
        assert!(!vm
            .calls_since(mark)
            .iter()
            .any(|r| matches!(r.call, HostCall::SetSharedData { .. })));
    }
    assert_eq!(published(&host), before);
    Ok(())
}

#[test]
fn a_503_backs_off_on_the_host_clock_and_keeps_the_published_table() -> Result<(), VmError> {
    let (host, mut vm) = agent_with_v1()?;
    let before = published(&host);

    let token = table_poll(&vm);
    let mark = vm.mark();
    vm.http_call_response(token, HttpResponse::status(503).body("no upstream"))?;
    vm.tick()?;
    host.advance(Duration::from_millis(249));
    vm.tick()?;
    assert!(
        calls_to(&vm, mark, TABLE).is_empty(),
        "polled inside the backoff"
    );
    host.advance(Duration::from_millis(1));
    vm.tick()?;
    let retry = single_callout_to(&vm, mark, TABLE);
    assert_eq!(
        retry.header(":path"),
        Some("/v1/name-table?wait=30&version=v1")
    );

    // A second failure in a row waits twice as long.
    let mark = vm.mark();
    vm.http_call_response(retry.token, HttpResponse::status(503))?;
    host.advance(Duration::from_millis(499));
    vm.tick()?;
    assert!(calls_to(&vm, mark, TABLE).is_empty());
    host.advance(Duration::from_millis(1));
    vm.tick()?;
    single_callout_to(&vm, mark, TABLE);

    assert_eq!(published(&host), before, "the last table keeps serving");
    Ok(())
}

#[test]
fn backoff_doubles_up_to_five_seconds_and_resets_after_success() -> Result<(), VmError> {
    let (host, mut vm) = agent_with_v1()?;
    for expected_ms in [250, 500, 1000, 2000, 4000, 5000, 5000] {
        let token = table_poll(&vm);
        vm.http_call_response(token, HttpResponse::status(500))?;
        let mark = vm.mark();
        host.advance(Duration::from_millis(expected_ms - 1));
        vm.tick()?;
        assert!(calls_to(&vm, mark, TABLE).is_empty(), "{expected_ms} ms");
        host.advance(Duration::from_millis(1));
        vm.tick()?;
        single_callout_to(&vm, mark, TABLE);
    }
    // Success resets the backoff: the next failure waits the first step again.
    vmesh::publish(&host, &mut vm, &small_table("v2"))?;
    let token = table_poll(&vm);
    vm.http_call_response(token, HttpResponse::status(500))?;
    let mark = vm.mark();
    host.advance(Duration::from_millis(250));
    vm.tick()?;
    single_callout_to(&vm, mark, TABLE);
    Ok(())
}

#[test]
fn a_poll_the_host_refuses_to_dispatch_backs_off() -> Result<(), VmError> {
    let host = vmesh::host();
    let mut vm = vmesh::agent(&host, r#"{"shim_cluster":"no_such_cluster"}"#)?;
    let mark = vm.mark();
    vm.tick()?;
    let attempts = calls_to(&vm, mark, TABLE);
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].1, Status::BadArgument);
    assert!(vmesh::pending_to(&vm, TABLE).is_empty());

    let mark = vm.mark();
    host.advance(Duration::from_millis(200));
    vm.tick()?;
    assert!(
        calls_to(&vm, mark, TABLE).is_empty(),
        "retried inside the backoff"
    );
    host.advance(Duration::from_millis(50));
    vm.tick()?;
    assert_eq!(calls_to(&vm, mark, TABLE).len(), 1);
    assert!(!vm.is_failed());
    Ok(())
}

#[test]
fn an_invalid_table_is_refused_and_the_previous_one_stays() -> Result<(), VmError> {
    let bodies: [&[u8]; 4] = [
        b"{not json",
        br#"{"version":"v2","namespace":"apps","names":{"bad..name":{"ips":["10.0.0.1"],"registry":"External"}}}"#,
        br#"{"version":"v2","namespace":"apps","names":{"a.example.com":{"ips":["10.0.0.1"],"registry":"External"},"A.example.com":{"ips":["10.0.0.2"],"registry":"External"}}}"#,
        b"",
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        let (host, mut vm) = agent_with_v1()?;
        let before = published(&host);
        let token = table_poll(&vm);
        let mark = vm.mark();
        vm.http_call_response(token, HttpResponse::status(200).body(body))?;
        assert!(
            !vm.calls_since(mark)
                .iter()
                .any(|r| matches!(r.call, HostCall::SetSharedData { .. })),
            "body {i} was published"
        );
        assert_eq!(published(&host), before, "body {i}");
        assert_eq!(host.stat_value("vmesh_table_rejected"), 1, "body {i}");
        assert_eq!(host.stat_value("vmesh_table_updates"), 1, "body {i}");
        // Refusal counts as a failure: the next poll waits for the backoff.
        assert!(calls_to(&vm, mark, TABLE).is_empty(), "body {i}");
        host.advance(Duration::from_millis(250));
        vm.tick()?;
        assert_eq!(calls_to(&vm, mark, TABLE).len(), 1, "body {i}");
    }
    Ok(())
}

#[test]
fn a_response_for_a_poll_no_longer_in_flight_is_ignored() -> Result<(), VmError> {
    // The SDK routes callouts by token; the agent also checks the token is its current poll.
    let (host, mut vm) = agent_with_v1()?;
    let before = published(&host);
    let token = table_poll(&vm);
    assert_eq!(
        vm.http_call_response(token + 4, HttpResponse::status(200)),
        Err(VmError::UnknownToken(token + 4))
    );
    assert_eq!(published(&host), before);
    Ok(())
}

#[test]
fn a_poll_envoy_resets_backs_off_without_killing_the_vm() -> Result<(), VmError> {
    let (host, mut vm) = agent_with_v1()?;
    let before = published(&host);
    let token = table_poll(&vm);
    vm.http_call_reset(token)?;
    assert!(!vm.is_failed());
    assert_eq!(published(&host), before);
    let mark = vm.mark();
    host.advance(Duration::from_millis(250));
    vm.tick()?;
    single_callout_to(&vm, mark, TABLE);
    Ok(())
}

// ---- Reports: readiness, liveness, counters ----

const READY: &str = "/ready";
const PERIOD: Duration = Duration::from_millis(1000);

/// Readiness checks in flight (to the admin cluster: a probe's path may start with /ready too).
fn checks(vm: &Vm) -> Vec<HttpCallRequest> {
    let mut calls = pending_to(vm, READY);
    calls.retain(|c| c.upstream == ADMIN_CLUSTER);
    calls
}

/// The readiness check in flight; panics unless there is exactly one.
fn readiness(vm: &Vm) -> HttpCallRequest {
    match checks(vm).as_slice() {
        [call] => call.clone(),
        other => panic!("{} readiness checks in flight: {other:?}", other.len()),
    }
}

/// The report in flight with its body parsed as the shim parses it; panics unless there is
/// exactly one.
fn report(vm: &Vm) -> (HttpCallRequest, AgentReport) {
    match pending_to(vm, AGENT_REPORT).as_slice() {
        [call] => {
            let parsed = serde_json::from_slice(&call.body).unwrap_or_else(|e| {
                panic!("report body is not an AgentReport ({e}): {:?}", call.body)
            });
            (call.clone(), parsed)
        }
        other => panic!("{} reports in flight: {other:?}", other.len()),
    }
}

fn reply_json(reply: &AgentReply) -> HttpResponse {
    HttpResponse::status(200)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(reply).expect("a reply serializes"))
}

fn registered() -> AgentReply {
    AgentReply {
        state: RegistrationState::Registered,
        workload_entry: Some(EntryRef {
            namespace: "apps".into(),
            name: "vm-10.0.0.5".into(),
        }),
        probe: None,
    }
}

/// One report cycle from where the agent is: a tick if no readiness check is in flight, `/ready`
/// answered LIVE, and the report answered with `reply`. Returns the report.
fn cycle(vm: &mut Vm, reply: &AgentReply) -> Result<AgentReport, VmError> {
    if checks(vm).is_empty() {
        vm.tick()?;
    }
    let check = readiness(vm);
    vm.http_call_response(check.token, HttpResponse::status(200).body("LIVE\n"))?;
    let (call, parsed) = report(vm);
    vm.http_call_response(call.token, reply_json(reply))?;
    Ok(parsed)
}

/// Moves the clock a report period on and runs a cycle.
fn next_cycle(host: &Host, vm: &mut Vm, reply: &AgentReply) -> Result<AgentReport, VmError> {
    host.advance(PERIOD);
    cycle(vm, reply)
}

fn warnings(vm: &Vm) -> Vec<String> {
    vm.logs()
        .into_iter()
        .filter(|(level, _)| *level == LogLevel::Warn)
        .map(|(_, m)| m)
        .collect()
}

#[test]
fn the_first_tick_asks_envoy_admin_ready_then_reports_to_the_shim() -> Result<(), VmError> {
    let (_host, mut vm) = agent()?;
    assert_eq!(vm.tick_period(), Some(Duration::from_millis(200)));
    let mark = vm.mark();
    vm.tick()?;
    let check = single_callout_to(&vm, mark, READY);
    assert_eq!(check.upstream, ADMIN_CLUSTER);
    assert_eq!(check.header(":method"), Some("GET"));
    assert_eq!(check.header(":authority"), Some(ADMIN_CLUSTER));
    assert_eq!(check.timeout_ms, 500, "half a period");
    assert!(
        pending_to(&vm, AGENT_REPORT).is_empty(),
        "the report waits for /ready"
    );

    vm.http_call_response(check.token, HttpResponse::status(200).body("LIVE\n"))?;
    let (call, r) = report(&vm);
    assert_eq!(call.upstream, SHIM_CLUSTER);
    assert_eq!(call.header(":method"), Some("POST"));
    assert_eq!(call.header(":authority"), Some(SHIM_AUTHORITY));
    assert_eq!(call.header("content-type"), Some("application/json"));
    assert_eq!(
        call.timeout_ms, 1000,
        "a report is superseded after one period"
    );
    assert!(r.boot.len() > 16, "start time and random bytes: {}", r.boot);
    assert_eq!((r.seq, r.period_ms, r.ready), (1, 1000, true));
    let names: Vec<&str> = r.counters.iter().map(|(name, _)| name).collect();
    assert_eq!(
        names,
        [
            counter::DNS_ANSWERED,
            counter::DNS_ERRORS,
            counter::DNS_FORWARDED,
            counter::DNS_QUERIES,
            counter::OUTBOUND_CONNECTIONS,
            counter::OUTBOUND_FAILURES
        ]
    );
    assert!(r.counters.iter().all(|(_, v)| v == 0));
    assert_eq!(r.worker_idle_ms, None, "no worker has ticked");
    assert_eq!(r.probe, None);
    Ok(())
}

#[test]
fn reports_follow_the_period_with_seq_counting_up_and_one_boot() -> Result<(), VmError> {
    let (host, mut vm) = agent()?;
    let first = cycle(&mut vm, &registered())?;
    let mut seqs = vec![first.seq];
    for _ in 0..3 {
        let mark = vm.mark();
        host.advance(Duration::from_millis(999));
        vm.tick()?;
        assert!(calls_to(&vm, mark, READY).is_empty(), "early");
        host.advance(Duration::from_millis(1));
        let r = cycle(&mut vm, &registered())?;
        assert_eq!(r.boot, first.boot);
        seqs.push(r.seq);
    }
    assert_eq!(seqs, [1, 2, 3, 4]);

    // Another Envoy is another boot (the test host's random bytes repeat; the clock differs).
    let other_host = vmesh::host();
    other_host.advance(Duration::from_nanos(1));
    let mut other = vmesh::agent(&other_host, "{}")?;
    let other_boot = cycle(&mut other, &registered())?.boot;
    assert_ne!(other_boot, first.boot);
    let (time, random) = first.boot.split_once('-').expect("time-random");
    assert!(
        u128::from_str_radix(time, 16).is_ok() && random.len() == 8,
        "{first:?}"
    );
    Ok(())
}

#[test]
fn the_report_period_is_configurable_and_shortens_the_tick() -> Result<(), VmError> {
    let host = vmesh::host();
    let mut vm = vmesh::agent(&host, r#"{"report_period_ms":100}"#)?;
    assert_eq!(vm.tick_period(), Some(Duration::from_millis(100)));
    let r = cycle(&mut vm, &registered())?;
    assert_eq!(r.period_ms, 100);
    host.advance(Duration::from_millis(100));
    vm.tick()?;
    let check = readiness(&vm);
    assert_eq!(check.timeout_ms, 50);
    Ok(())
}

#[test]
fn readiness_is_asked_every_report_and_only_live_is_ready() -> Result<(), VmError> {
    let (host, mut vm) = agent()?;
    for (status, body, ready) in [
        (503, "PRE_INITIALIZING\n", false),
        (200, "LIVE\n", true),
        (503, "DRAINING\n", false),
        (200, "something else", false),
        (200, "LIVE", true),
    ] {
        host.advance(PERIOD);
        vm.tick()?;
        let check = readiness(&vm);
        vm.http_call_response(check.token, HttpResponse::status(status).body(body))?;
        let (call, r) = report(&vm);
        assert_eq!(r.ready, ready, "{status} {body:?}");
        vm.http_call_response(call.token, reply_json(&registered()))?;
    }
    // A readiness check Envoy fails says not ready; the report still goes.
    host.advance(PERIOD);
    vm.tick()?;
    vm.http_call_reset(readiness(&vm).token)?;
    assert!(!report(&vm).1.ready);
    Ok(())
}

#[test]
fn without_the_admin_cluster_envoy_counts_as_ready_after_the_first_tick() -> Result<(), VmError> {
    let host = Host::new();
    host.add_cluster(SHIM_CLUSTER);
    let mut vm = vmesh::agent(&host, "{}")?;
    let mark = vm.mark();
    vm.tick()?;
    let tried = calls_to(&vm, mark, READY);
    assert_eq!(tried.len(), 1);
    assert_eq!(tried[0].1, Status::BadArgument);
    let (call, r) = report(&vm);
    assert!(r.ready, "the first report already says ready");
    vm.http_call_response(call.token, reply_json(&registered()))?;

    for _ in 0..3 {
        let mark = vm.mark();
        host.advance(PERIOD);
        vm.tick()?;
        assert!(calls_to(&vm, mark, READY).is_empty(), "not asked again");
        let (call, r) = report(&vm);
        assert!(r.ready);
        vm.http_call_response(call.token, reply_json(&registered()))?;
    }
    let warned: Vec<String> = warnings(&vm)
        .into_iter()
        .filter(|w| w.contains(ADMIN_CLUSTER))
        .collect();
    assert_eq!(warned.len(), 1, "warned once: {warned:?}");
    Ok(())
}

#[test]
fn one_report_in_flight_and_an_overdue_one_goes_when_it_returns() -> Result<(), VmError> {
    let (host, mut vm) = agent()?;
    vm.tick()?;
    let check = readiness(&vm);
    vm.http_call_response(check.token, HttpResponse::status(200).body("LIVE"))?;
    let (call, first) = report(&vm);
    let mark = vm.mark();
    for _ in 0..10 {
        host.advance(Duration::from_millis(200));
        vm.tick()?;
    }
    assert!(calls_to(&vm, mark, READY).is_empty());
    assert!(calls_to(&vm, mark, AGENT_REPORT).is_empty());
    // The shim answers late: the next cycle starts in that callback, not a tick later.
    vm.http_call_response(call.token, reply_json(&registered()))?;
    let check = readiness(&vm);
    vm.http_call_response(check.token, HttpResponse::status(200).body("LIVE"))?;
    assert_eq!(report(&vm).1.seq, first.seq + 1);
    Ok(())
}

#[test]
fn a_failed_report_is_not_retried_the_next_one_supersedes_it() -> Result<(), VmError> {
    let (host, mut vm) = agent()?;
    cycle(&mut vm, &registered())?;
    for fail in [
        HttpResponse::status(503).body("no healthy upstream"),
        HttpResponse::status(404),
    ] {
        host.advance(PERIOD);
        vm.tick()?;
        let check = readiness(&vm);
        vm.http_call_response(check.token, HttpResponse::status(200).body("LIVE"))?;
        let (call, r) = report(&vm);
        vm.http_call_response(call.token, fail)?;
        let mark = vm.mark();
        host.advance(Duration::from_millis(999));
        vm.tick()?;
        assert!(calls_to(&vm, mark, AGENT_REPORT).is_empty(), "retried");
        host.advance(Duration::from_millis(1));
        let next = cycle(&mut vm, &registered())?;
        assert_eq!(next.seq, r.seq + 1);
    }
    // Envoy failing the call (shim down) is the same.
    host.advance(PERIOD);
    vm.tick()?;
    let check = readiness(&vm);
    vm.http_call_response(check.token, HttpResponse::status(200).body("LIVE"))?;
    let (call, r) = report(&vm);
    vm.http_call_reset(call.token)?;
    assert_eq!(next_cycle(&host, &mut vm, &registered())?.seq, r.seq + 1);
    assert!(!vm.is_failed());
    // Each failure was logged when it first happened, not per report.
    assert_eq!(warnings(&vm).len(), 3, "{:?}", warnings(&vm));
    Ok(())
}

#[test]
fn a_reply_that_is_not_understood_is_logged_and_the_agent_keeps_going() -> Result<(), VmError> {
    let (host, mut vm) = agent()?;
    cycle(&mut vm, &registered())?;
    for body in [
        &b"{not json"[..],
        br#"{"state":"dancing"}"#,
        br#"{"state":"registered","probe":{"id":1,"kind":"exec","port":80}}"#,
        b"",
    ] {
        host.advance(PERIOD);
        vm.tick()?;
        let check = readiness(&vm);
        vm.http_call_response(check.token, HttpResponse::status(200).body("LIVE"))?;
        let (call, _) = report(&vm);
        vm.http_call_response(call.token, HttpResponse::status(200).body(body))?;
        assert!(!vm.is_failed());
    }
    let warned = warnings(&vm);
    assert!(
        warned.iter().any(|w| w.contains("not understood")),
        "{warned:?}"
    );
    let r = next_cycle(&host, &mut vm, &registered())?;
    assert_eq!(r.seq, 6);
    Ok(())
}

#[test]
fn registration_changes_are_logged_once_each() -> Result<(), VmError> {
    let (host, mut vm) = agent()?;
    let waiting = AgentReply {
        state: RegistrationState::Waiting,
        ..AgentReply::default()
    };
    cycle(&mut vm, &waiting)?;
    next_cycle(&host, &mut vm, &waiting)?;
    next_cycle(&host, &mut vm, &registered())?;
    next_cycle(&host, &mut vm, &registered())?;
    let infos: Vec<String> = vm
        .logs()
        .into_iter()
        .filter(|(l, m)| *l == LogLevel::Info && m.starts_with("registration"))
        .map(|(_, m)| m)
        .collect();
    assert_eq!(infos.len(), 2, "{infos:?}");
    assert!(infos[1].contains("apps/vm-10.0.0.5"), "{infos:?}");
    Ok(())
}

#[test]
fn counters_are_the_workers_dns_stats_summed() -> Result<(), VmError> {
    let (host, mut agent_vm) = agent()?;
    vmesh::publish(&host, &mut agent_vm, &small_table("v1"))?;
    let mut answered = Vec::new();
    // Two worker VMs, as Envoy with two worker threads has.
    for _ in 0..2 {
        let mut worker = vmesh::dns_tcp_worker(&host, "{}")?;
        worker.tick()?;
        let c = worker.create_connection()?;
        let mut formerr = query(2, "vm-db.example.com", vmesh::A);
        formerr[5] = 0; // QDCOUNT 0
        let bytes = framed(
            Framing::Tcp,
            &[
                &query(1, "vm-db.example.com", vmesh::A),
                &formerr,
                &query(3, "elsewhere.example.org", vmesh::A),
            ],
        );
        worker.downstream_data(c, &bytes, false)?;
        // The shim cannot relay it: SERVFAIL.
        for f in vmesh::forwards(&worker) {
            vmesh::answer_forward(&mut worker, &f, &[])?;
        }
        answered.push(worker.connection(c).written.len());
    }
    assert!(answered.iter().all(|n| *n > 0));
    let r = cycle(&mut agent_vm, &registered())?;
    let get = |name| r.counters.get(name);
    assert_eq!(get(counter::DNS_QUERIES), Some(6));
    assert_eq!(get(counter::DNS_ANSWERED), Some(2));
    assert_eq!(get(counter::DNS_FORWARDED), Some(2));
    // FORMERR and the failed forward, on each worker.
    assert_eq!(get(counter::DNS_ERRORS), Some(4));
    Ok(())
}

#[test]
fn worker_idle_ms_is_the_time_since_any_worker_last_ticked() -> Result<(), VmError> {
    let (host, mut agent_vm) = agent()?;
    let mut worker = vmesh::worker_vm(&host, "{}")?;
    let mark = worker.vm.mark();
    worker.tick()?;
    let stamps = worker
        .vm
        .calls_since(mark)
        .into_iter()
        .filter(
            |r| matches!(&r.call, HostCall::SetSharedData { key, .. } if key == WORKER_TICK_KEY),
        )
        .count();
    assert_eq!(stamps, 3, "each DNS root's tick");
    host.advance(Duration::from_millis(700));
    let r = cycle(&mut agent_vm, &registered())?;
    assert_eq!(r.worker_idle_ms, Some(700));
    // Workers stop ticking (hung): the idle time grows.
    host.advance(Duration::from_millis(2500));
    let r = cycle(&mut agent_vm, &registered())?;
    assert_eq!(r.worker_idle_ms, Some(3200));
    worker.tick()?;
    let r = next_cycle(&host, &mut agent_vm, &registered())?;
    assert_eq!(r.worker_idle_ms, Some(1000));
    Ok(())
}

// ---- The httpGet probe the shim names ----

fn task(id: u64) -> ProbeTask {
    ProbeTask {
        id,
        kind: ProbeKind::HttpGet,
        host: "127.0.0.1".into(),
        port: 8080,
        path: "/ready?full=1".into(),
        headers: vec![("X-Probe".into(), "vmesh".into())],
        initial_delay_ms: 2000,
        period_ms: 1000,
        timeout_ms: 700,
        success_threshold: 1,
        failure_threshold: 2,
    }
}

fn with_probe(task: ProbeTask) -> AgentReply {
    AgentReply {
        probe: Some(task),
        ..registered()
    }
}

/// Probe callouts after `mark`.
fn probes_since(vm: &Vm, mark: usize) -> Vec<HttpCallRequest> {
    vm.http_calls_since(mark)
        .into_iter()
        .filter(|(c, _)| c.upstream == PROBE_CLUSTER)
        .map(|(c, _)| c)
        .collect()
}

/// Runs one probe: moves the clock to when it is due, ticks, answers it with `response`
/// (`None`: Envoy fails the call). Returns the request.
fn probe_once(
    host: &Host,
    vm: &mut Vm,
    wait: Duration,
    response: Option<HttpResponse>,
) -> Result<HttpCallRequest, VmError> {
    host.advance(wait);
    let mark = vm.mark();
    vm.tick()?;
    let call = match probes_since(vm, mark).as_slice() {
        [call] => call.clone(),
        other => panic!("expected one probe, got {other:?}"),
    };
    match response {
        Some(r) => vm.http_call_response(call.token, r)?,
        None => vm.http_call_reset(call.token)?,
    }
    Ok(call)
}

/// The probe result the next report carries: the cycle in flight, or the next one (the clock
/// moves on in tick-sized steps until it starts).
fn reported(host: &Host, vm: &mut Vm, reply: &AgentReply) -> Result<Option<ProbeResult>, VmError> {
    for _ in 0..=10 {
        if !checks(vm).is_empty() || !pending_to(vm, AGENT_REPORT).is_empty() {
            break;
        }
        host.advance(Duration::from_millis(100));
        vm.tick()?;
    }
    if !checks(vm).is_empty() {
        let check = readiness(vm);
        vm.http_call_response(check.token, HttpResponse::status(200).body("LIVE"))?;
    }
    let (call, r) = report(vm);
    vm.http_call_response(call.token, reply_json(reply))?;
    Ok(r.probe)
}

#[test]
fn a_probe_task_runs_through_the_probe_cluster_after_its_initial_delay() -> Result<(), VmError> {
    let (host, mut vm) = agent()?;
    let mut t = task(5);
    t.headers.push(("Host".into(), "app.example".into()));
    let reply = with_probe(t);
    let mark = vm.mark();
    cycle(&mut vm, &reply)?;
    // Known but not run yet: the verdict is unhealthy until a success counts.
    let r = next_cycle(&host, &mut vm, &reply)?.probe.expect("a result");
    assert_eq!((r.id, r.healthy), (5, false));
    assert_eq!(r.message, "waiting for the first probe");
    host.advance(Duration::from_millis(999));
    vm.tick()?;
    assert!(
        probes_since(&vm, mark).is_empty(),
        "inside the initial delay"
    );

    let call = probe_once(&host, &mut vm, Duration::from_millis(1), None)?;
    assert_eq!(call.header(":method"), Some("GET"));
    assert_eq!(call.header(":path"), Some("/ready?full=1"));
    assert_eq!(
        call.header(":authority"),
        Some("app.example"),
        "Host overrides"
    );
    assert_eq!(
        call.header("x-envoy-original-dst-host"),
        Some("127.0.0.1:8080")
    );
    assert_eq!(call.header("x-probe"), Some("vmesh"));
    assert!(call
        .header("user-agent")
        .is_some_and(|ua| ua.starts_with("vmesh-probe/")));
    assert_eq!(call.header("host"), None);
    assert_eq!(call.timeout_ms, 700);
    assert!(call.body.is_empty());
    Ok(())
}

#[test]
fn probe_thresholds_decide_the_verdict_the_next_report_carries() -> Result<(), VmError> {
    let (host, mut vm) = agent()?;
    let reply = with_probe(task(7));
    cycle(&mut vm, &reply)?;
    let second = Duration::from_millis(1000);
    probe_once(
        &host,
        &mut vm,
        Duration::from_millis(2000),
        Some(HttpResponse::status(204)),
    )?;
    let r = reported(&host, &mut vm, &reply)?.expect("a result");
    assert_eq!((r.healthy, r.message.as_str()), (true, "HTTP 204"));

    probe_once(&host, &mut vm, second, Some(HttpResponse::status(503)))?;
    let r = reported(&host, &mut vm, &reply)?.expect("a result");
    assert!(r.healthy, "one failure of two");
    assert_eq!(r.message, "HTTP 503 (1 of 2 failures before unhealthy)");

    probe_once(&host, &mut vm, second, Some(HttpResponse::status(500)))?;
    let r = reported(&host, &mut vm, &reply)?.expect("a result");
    assert_eq!(
        (r.id, r.healthy, r.message.as_str()),
        (7, false, "HTTP 500")
    );

    probe_once(&host, &mut vm, second, Some(HttpResponse::status(301)))?;
    assert!(reported(&host, &mut vm, &reply)?.expect("a result").healthy);
    Ok(())
}

#[test]
fn failed_probe_callouts_are_unhealthy_with_what_envoy_said() -> Result<(), VmError> {
    let mut t = task(9);
    (t.initial_delay_ms, t.failure_threshold) = (0, 1);
    let reply = with_probe(t);
    let refused = HttpResponse::status(503).body(
        "upstream connect error or disconnect/reset before headers. reset reason: remote \
         connection failure",
    );
    let timeout = HttpResponse::status(504).body("upstream request timeout");
    for (response, message) in [
        (None, "no response (Envoy reset the call)"),
        (Some(refused), "connection refused or unreachable"),
        (Some(timeout), "timeout after 700ms"),
        (
            Some(HttpResponse::status(503).body("app says no")),
            "HTTP 503",
        ),
    ] {
        let (host, mut vm) = agent()?;
        cycle(&mut vm, &reply)?;
        probe_once(
            &host,
            &mut vm,
            Duration::from_millis(200),
            Some(HttpResponse::status(200)),
        )?;
        probe_once(&host, &mut vm, Duration::from_millis(1000), response)?;
        let r = reported(&host, &mut vm, &reply)?.expect("a result");
        assert_eq!((r.healthy, r.message.as_str()), (false, message));
        assert!(!vm.is_failed());
    }
    Ok(())
}

#[test]
fn probes_never_overlap_and_a_missing_probe_cluster_is_a_failure() -> Result<(), VmError> {
    let (host, mut vm) = agent()?;
    let mut t = task(3);
    t.initial_delay_ms = 0;
    let reply = with_probe(t.clone());
    cycle(&mut vm, &reply)?;
    let mark = vm.mark();
    host.advance(Duration::from_millis(200));
    vm.tick()?;
    assert_eq!(probes_since(&vm, mark).len(), 1);
    for _ in 0..10 {
        host.advance(Duration::from_millis(200));
        vm.tick()?;
    }
    assert_eq!(
        probes_since(&vm, mark).len(),
        1,
        "the first is still in flight"
    );

    let host = Host::new();
    for cluster in [SHIM_CLUSTER, ADMIN_CLUSTER] {
        host.add_cluster(cluster);
    }
    let mut vm = vmesh::agent(&host, "{}")?;
    cycle(&mut vm, &reply)?;
    host.advance(Duration::from_millis(200));
    vm.tick()?;
    let r = reported(&host, &mut vm, &reply)?.expect("a result");
    assert!(!r.healthy);
    assert!(r.message.contains(PROBE_CLUSTER), "{}", r.message);
    Ok(())
}

#[test]
fn a_new_probe_id_starts_over_and_no_probe_stops_probing() -> Result<(), VmError> {
    let (host, mut vm) = agent()?;
    let mut t = task(1);
    t.initial_delay_ms = 0;
    cycle(&mut vm, &with_probe(t.clone()))?;
    probe_once(
        &host,
        &mut vm,
        Duration::from_millis(200),
        Some(HttpResponse::status(200)),
    )?;
    // The same id again keeps the verdict.
    let r = reported(&host, &mut vm, &with_probe(t.clone()))?.expect("a result");
    assert!(r.healthy);

    // A probe in flight when the task changes is ignored.
    host.advance(Duration::from_millis(1000));
    let mark = vm.mark();
    vm.tick()?;
    let old = probes_since(&vm, mark);
    let mut t2 = task(2);
    (t2.initial_delay_ms, t2.port, t2.host) = (1500, 9090, "::1".into());
    let r = reported(&host, &mut vm, &with_probe(t2.clone()))?.expect("a result");
    assert_eq!(r.id, 1, "the report went before the new task");
    vm.http_call_response(old[0].token, HttpResponse::status(500))?;
    let r = reported(&host, &mut vm, &with_probe(t2.clone()))?.expect("a result");
    assert_eq!((r.id, r.healthy), (2, false));
    assert_eq!(r.message, "waiting for the first probe");
    let call = probe_once(
        &host,
        &mut vm,
        Duration::from_millis(500),
        Some(HttpResponse::status(200)),
    )?;
    assert_eq!(call.header("x-envoy-original-dst-host"), Some("[::1]:9090"));
    assert_eq!(call.header(":authority"), Some("[::1]:9090"));

    // A reply without a probe stops it; reports carry no result.
    reported(&host, &mut vm, &registered())?;
    let mark = vm.mark();
    for _ in 0..10 {
        host.advance(Duration::from_millis(500));
        vm.tick()?;
    }
    assert!(probes_since(&vm, mark).is_empty());
    assert_eq!(reported(&host, &mut vm, &registered())?, None);
    Ok(())
}

#[test]
fn dns_roots_in_the_agents_vm_are_the_main_thread_and_show_no_worker_life() -> Result<(), VmError> {
    // Envoy runs the DNS plugins' timers on the main thread too, in the agent's VM (same
    // vm_id); those ticks would hide hung workers.
    let (_host, mut vm) = agent()?;
    let dns = vmesh::added(&mut vm, vmesh::plugin(vmesh::DNS_ROOT_ID, "{}"))?;
    let mark = vm.mark();
    vm.tick_root(dns)?;
    assert!(
        !vm.calls_since(mark).iter().any(
            |r| matches!(&r.call, HostCall::SetSharedData { key, .. } if key == WORKER_TICK_KEY)
        ),
        "the main thread stamped a worker tick"
    );
    assert_eq!(cycle(&mut vm, &registered())?.worker_idle_ms, None);
    Ok(())
}
