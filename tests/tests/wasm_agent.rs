//! The agent root (`vmesh_agent`, Envoy's bootstrap singleton): it long-polls the name table
//! from the shim, publishes the compiled image to the workers through shared data, and backs
//! off on failures while the last published table keeps serving.

use std::time::Duration;

use vmesh_core::names::NameIndex;
use vmesh_tests::wasm_host::vmesh::{
    self, single_callout, small_table, IMAGE_KEY, SHIM_AUTHORITY, SHIM_CLUSTER, VERSION_KEY, VM_ID,
};
use vmesh_tests::wasm_host::{Host, HostCall, HttpResponse, Status, Vm, VmError};

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
    let call = single_callout(&vm, mark);
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
    assert!(vm.http_calls_since(mark).is_empty());
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
    let call = single_callout(&vm, mark);
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
    let token = vm.pending_callouts()[0];
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
    assert_eq!(keys, [IMAGE_KEY, VERSION_KEY], "workers key on the version");
    assert_eq!(writes[1].1, b"v1");

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
    let token = vm.pending_callouts()[0];
    let mark = vm.mark();
    let table = small_table("2024-06-01T00:00:00Z/7 a&b");
    vm.http_call_response(token, HttpResponse::status(200).body(table.to_json()))?;
    let next = single_callout(&vm, mark);
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
        let token = vm.pending_callouts()[0];
        let mark = vm.mark();
        vm.http_call_response(token, HttpResponse::status(304))?;
        let next = single_callout(&vm, mark);
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

    let token = vm.pending_callouts()[0];
    let mark = vm.mark();
    vm.http_call_response(token, HttpResponse::status(503).body("no upstream"))?;
    vm.tick()?;
    host.advance(Duration::from_millis(249));
    vm.tick()?;
    assert!(
        vm.http_calls_since(mark).is_empty(),
        "polled inside the backoff"
    );
    host.advance(Duration::from_millis(1));
    vm.tick()?;
    let retry = single_callout(&vm, mark);
    assert_eq!(
        retry.header(":path"),
        Some("/v1/name-table?wait=30&version=v1")
    );

    // A second failure in a row waits twice as long.
    let mark = vm.mark();
    vm.http_call_response(retry.token, HttpResponse::status(503))?;
    host.advance(Duration::from_millis(499));
    vm.tick()?;
    assert!(vm.http_calls_since(mark).is_empty());
    host.advance(Duration::from_millis(1));
    vm.tick()?;
    single_callout(&vm, mark);

    assert_eq!(published(&host), before, "the last table keeps serving");
    Ok(())
}

#[test]
fn backoff_doubles_up_to_five_seconds_and_resets_after_success() -> Result<(), VmError> {
    let (host, mut vm) = agent_with_v1()?;
    for expected_ms in [250, 500, 1000, 2000, 4000, 5000, 5000] {
        let token = vm.pending_callouts()[0];
        vm.http_call_response(token, HttpResponse::status(500))?;
        let mark = vm.mark();
        host.advance(Duration::from_millis(expected_ms - 1));
        vm.tick()?;
        assert!(vm.http_calls_since(mark).is_empty(), "{expected_ms} ms");
        host.advance(Duration::from_millis(1));
        vm.tick()?;
        single_callout(&vm, mark);
    }
    // Success resets the backoff: the next failure waits the first step again.
    vmesh::publish(&host, &mut vm, &small_table("v2"))?;
    let token = vm.pending_callouts()[0];
    vm.http_call_response(token, HttpResponse::status(500))?;
    let mark = vm.mark();
    host.advance(Duration::from_millis(250));
    vm.tick()?;
    single_callout(&vm, mark);
    Ok(())
}

#[test]
fn a_poll_the_host_refuses_to_dispatch_backs_off() -> Result<(), VmError> {
    let host = vmesh::host();
    let mut vm = vmesh::agent(&host, r#"{"shim_cluster":"no_such_cluster"}"#)?;
    let mark = vm.mark();
    vm.tick()?;
    let attempts = vm.http_calls_since(mark);
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].1, Status::BadArgument);
    assert!(vm.pending_callouts().is_empty());

    let mark = vm.mark();
    host.advance(Duration::from_millis(200));
    vm.tick()?;
    assert!(
        vm.http_calls_since(mark).is_empty(),
        "retried inside the backoff"
    );
    host.advance(Duration::from_millis(50));
    vm.tick()?;
    assert_eq!(vm.http_calls_since(mark).len(), 1);
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
        let token = vm.pending_callouts()[0];
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
        assert!(vm.http_calls_since(mark).is_empty(), "body {i}");
        host.advance(Duration::from_millis(250));
        vm.tick()?;
        assert_eq!(vm.http_calls_since(mark).len(), 1, "body {i}");
    }
    Ok(())
}

#[test]
fn a_response_for_a_poll_no_longer_in_flight_is_ignored() -> Result<(), VmError> {
    // The SDK routes callouts by token; the agent also checks the token is its current poll.
    let (host, mut vm) = agent_with_v1()?;
    let before = published(&host);
    let token = vm.pending_callouts()[0];
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
    let token = vm.pending_callouts()[0];
    vm.http_call_reset(token)?;
    assert!(!vm.is_failed());
    assert_eq!(published(&host), before);
    let mark = vm.mark();
    host.advance(Duration::from_millis(250));
    vm.tick()?;
    single_callout(&vm, mark);
    Ok(())
}
