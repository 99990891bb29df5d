//! The DNS root (`vmesh_dns`) on a worker VM: it loads the table the agent published and
//! answers DNS carried three ways — `/udp-tunnel` (RFC 9297 capsules), `/tcp-tunnel`
//! (RFC 1035 §4.2.2 length framing) and `/dns-query` (RFC 8484 DoH) — forwarding what the
//! mesh does not own through the shim.

use std::net::Ipv4Addr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use vmesh_core::dns::inspect::{RData, Response};
use vmesh_core::framing::Framing;
use vmesh_tests::wasm_host::vmesh::{
    self, framed, query, responses, single_callout, small_table, upstream_answer, A, AAAA,
    IMAGE_KEY, SHIM_AUTHORITY, SHIM_CLUSTER, VERSION_KEY, VM_ID,
};
use vmesh_tests::wasm_host::{
    Action, BufferType, Host, HostCall, HttpResponse, MapType, Plugin, Status, StreamType, Vm,
    VmError,
};

const MESH: &str = "reviews.apps.svc.cluster.local";
const OTHER: &str = "example.org";
const DNS_MESSAGE: &str = "application/dns-message";

/// An agent that published table v1 and a worker that loaded it on its tick.
struct Mesh {
    host: Host,
    worker: Vm,
}

fn mesh_with(worker_config: &str) -> Result<Mesh, VmError> {
    let host = vmesh::host();
    let mut worker = vmesh::dns_worker(&host, worker_config)?;
    let mut agent = vmesh::agent(&host, "{}")?;
    vmesh::publish(&host, &mut agent, &small_table("v1"))?;
    worker.tick()?;
    Ok(Mesh { host, worker })
}

fn mesh() -> Result<Mesh, VmError> {
    mesh_with("{}")
}

fn tunnel(vm: &mut Vm, path: &str) -> Result<u32, VmError> {
    let s = vm.create_http_stream()?;
    let headers = [
        (":method", "POST"),
        (":path", path),
        (":authority", "dns.internal"),
        ("content-type", "application/octet-stream"),
    ];
    assert_eq!(vm.request_headers(s, &headers, false)?, Action::Continue);
    Ok(s)
}

fn addresses(r: &Response) -> Vec<String> {
    r.answers
        .iter()
        .map(|rr| match &rr.data {
            RData::A(ip) => ip.to_string(),
            RData::Aaaa(ip) => ip.to_string(),
            RData::Cname(t) => format!("CNAME {t}"),
            RData::Other(_) => format!("type {}", rr.rtype),
        })
        .collect()
}

fn set_buffer_calls(vm: &Vm, mark: usize) -> Vec<(u32, u32, Vec<u8>)> {
    vm.calls_since(mark)
        .into_iter()
        .filter_map(|r| match r.call {
            HostCall::SetBuffer {
                buffer: BufferType::HttpRequestBody,
                start,
                size,
                data,
            } => {
                assert_eq!(r.status, Status::Ok);
                Some((start, size, data))
            }
            _ => None,
        })
        .collect()
}

fn resumed_request(vm: &Vm, mark: usize) -> bool {
    vm.calls_since(mark).iter().any(|r| {
        r.status == Status::Ok
            && r.call
                == HostCall::ContinueStream {
                    stream: StreamType::HttpRequest,
                }
    })
}

/// Sends one good mesh query on a fresh UDP tunnel and checks it is answered: proof that the
/// VM is alive and serving after whatever came before.
fn still_answers(vm: &mut Vm) -> Result<(), VmError> {
    let s = tunnel(vm, "/udp-tunnel")?;
    let body = framed(Framing::Capsule, &[&query(0x0A0A, MESH, A)]);
    assert_eq!(vm.request_body(s, &body, false)?, Action::Continue);
    let out = responses(Framing::Capsule, &vm.stream(s).forwarded);
    assert_eq!(
        (out.len(), out[0].header.id, out[0].rcode()),
        (1, 0x0A0A, 0)
    );
    vm.finish_stream(s)?;
    Ok(())
}

#[test]
fn worker_loads_the_published_table_on_its_tick() -> Result<(), VmError> {
    let host = vmesh::host();
    let mut worker = vmesh::dns_worker(&host, "{}")?;
    assert_eq!(
        worker.tick_period(),
        Some(std::time::Duration::from_millis(250))
    );

    // No table yet: a cluster-domain name is SERVFAIL, not forwarded.
    let s = tunnel(&mut worker, "/udp-tunnel")?;
    let body = framed(Framing::Capsule, &[&query(1, MESH, A)]);
    assert_eq!(worker.request_body(s, &body, false)?, Action::Continue);
    let out = responses(Framing::Capsule, &worker.stream(s).forwarded);
    assert_eq!(out[0].rcode(), 2);

    let mut agent = vmesh::agent(&host, "{}")?;
    vmesh::publish(&host, &mut agent, &small_table("v1"))?;
    let mark = worker.mark();
    worker.tick()?;
    let reads: Vec<String> = worker
        .calls_since(mark)
        .into_iter()
        .filter_map(|r| match r.call {
            HostCall::GetSharedData { key } => Some(key),
            _ => None,
        })
        .collect();
    assert_eq!(reads, [VERSION_KEY, IMAGE_KEY]);

    let body = framed(Framing::Capsule, &[&query(2, MESH, A)]);
    worker.request_body(s, &body, false)?;
    let out = responses(Framing::Capsule, &worker.stream(s).forwarded);
    assert_eq!((out[1].header.id, out[1].rcode()), (2, 0));

    // An unchanged version is not copied again.
    let mark = worker.mark();
    worker.tick()?;
    let reads = worker
        .calls_since(mark)
        .into_iter()
        .filter(|r| matches!(r.call, HostCall::GetSharedData { .. }))
        .count();
    assert_eq!(reads, 1);
    Ok(())
}

#[test]
fn a_corrupt_published_image_is_refused_and_the_loaded_table_keeps_serving() -> Result<(), VmError>
{
    let Mesh { host, mut worker } = mesh()?;
    host.set_shared_data(VM_ID, IMAGE_KEY, b"VMNI not really an image");
    host.set_shared_data(VM_ID, VERSION_KEY, b"v2");
    worker.tick()?;
    still_answers(&mut worker)
}

#[test]
fn a_worker_in_another_vm_id_does_not_see_the_table() -> Result<(), VmError> {
    let Mesh { host, .. } = mesh()?;
    let mut other = vmesh::started(
        &host,
        Plugin {
            vm_id: "other".into(),
            ..vmesh::plugin(vmesh::DNS_ROOT_ID, "{}")
        },
    )?;
    other.tick()?;
    let s = tunnel(&mut other, "/udp-tunnel")?;
    let body = framed(Framing::Capsule, &[&query(7, MESH, A)]);
    other.request_body(s, &body, false)?;
    let out = responses(Framing::Capsule, &other.stream(s).forwarded);
    assert_eq!(out[0].rcode(), 2, "not ready: SERVFAIL");
    Ok(())
}

#[test]
fn udp_tunnel_mesh_query_is_rewritten_in_place_into_the_answer() -> Result<(), VmError> {
    let Mesh { host, mut worker } = mesh()?;
    let s = tunnel(&mut worker, "/udp-tunnel")?;
    let body = framed(Framing::Capsule, &[&query(0x1234, MESH, A)]);
    let mark = worker.mark();
    assert_eq!(worker.request_body(s, &body, false)?, Action::Continue);

    let writes = set_buffer_calls(&worker, mark);
    assert_eq!(writes.len(), 1);
    let (start, size, answer) = &writes[0];
    assert_eq!(
        (*start, *size as usize),
        (0, body.len()),
        "whole body replaced"
    );
    assert!(worker.http_calls_since(mark).is_empty());
    assert_eq!(&worker.stream(s).forwarded, answer);

    let out = responses(Framing::Capsule, answer);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].header.id, out[0].rcode()), (0x1234, 0));
    assert!(out[0].authoritative());
    let mut ips = addresses(&out[0]);
    ips.sort();
    assert_eq!(ips, ["10.96.0.10", "10.96.0.11"]);
    assert_eq!(host.stat_value("vmesh_dns_answered"), 1);
    assert!(worker.finish_stream(s)?);
    Ok(())
}

#[test]
fn short_names_and_aaaa_follow_the_table() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh()?;
    let s = tunnel(&mut worker, "/udp-tunnel")?;
    let body = framed(
        Framing::Capsule,
        &[
            &query(1, "reviews", A),
            &query(2, "ratings.shop", AAAA),
            &query(3, "db.wild.example.com", A),
        ],
    );
    assert_eq!(worker.request_body(s, &body, false)?, Action::Continue);
    let out = responses(Framing::Capsule, &worker.stream(s).forwarded);
    let got: Vec<(u16, Vec<String>)> = out.iter().map(|r| (r.header.id, addresses(r))).collect();
    assert_eq!(got[1], (2, vec!["fd00::20".to_string()]));
    assert_eq!(got[2], (3, vec!["240.240.0.2".to_string()]));
    assert_eq!(got[0].0, 1);
    assert_eq!(got[0].1.len(), 2);
    Ok(())
}

#[test]
fn udp_tunnel_non_mesh_query_is_forwarded_through_the_shim_and_paused() -> Result<(), VmError> {
    let Mesh { host, mut worker } = mesh()?;
    let s = tunnel(&mut worker, "/udp-tunnel")?;
    let q = query(0x4242, OTHER, A);
    let body = framed(Framing::Capsule, &[&q]);
    let mark = worker.mark();
    assert_eq!(worker.request_body(s, &body, false)?, Action::Pause);

    let call = single_callout(&worker, mark);
    assert_eq!(call.upstream, SHIM_CLUSTER);
    assert_eq!(call.header(":method"), Some("POST"));
    assert_eq!(call.header(":path"), Some("/dns-query"));
    assert_eq!(call.header(":authority"), Some(SHIM_AUTHORITY));
    assert_eq!(call.header("content-type"), Some(DNS_MESSAGE));
    assert_eq!(call.header("accept"), Some(DNS_MESSAGE));
    assert_eq!(call.header("x-vmesh-transport"), Some("udp"));
    assert_eq!(call.body, q, "the query goes as received");
    assert_eq!(call.timeout_ms, 6000);
    assert!(set_buffer_calls(&worker, mark).is_empty());
    assert!(
        worker.stream(s).forwarded.is_empty(),
        "held while in flight"
    );
    assert_eq!(host.stat_value("vmesh_dns_forwarded"), 1);
    Ok(())
}

#[test]
fn forwarded_answer_replaces_the_held_body_with_the_clients_id_and_resumes() -> Result<(), VmError>
{
    let Mesh { mut worker, .. } = mesh()?;
    let s = tunnel(&mut worker, "/udp-tunnel")?;
    let q = query(0x4242, OTHER, A);
    let body = framed(Framing::Capsule, &[&q]);
    worker.request_body(s, &body, false)?;
    let token = worker.pending_callouts()[0];

    let upstream = upstream_answer(&q, 0x7777, Ipv4Addr::new(93, 184, 216, 34), 300);
    let mark = worker.mark();
    worker.http_call_response(token, HttpResponse::status(200).body(upstream))?;

    let calls = worker.calls_since(mark);
    assert_eq!(
        calls.first().map(|r| (&r.call, r.status)),
        Some((&HostCall::SetEffectiveContext { context: s }, Status::Ok)),
        "the SDK switches to the stream that made the call"
    );
    assert!(calls.iter().any(|r| r.context == s
        && matches!(&r.call, HostCall::GetHeaderMapValue { map: MapType::HttpCallResponseHeaders, key } if key == ":status")));
    let writes = set_buffer_calls(&worker, mark);
    assert_eq!(writes.len(), 1);
    assert_eq!(
        (writes[0].0, writes[0].1 as usize),
        (0, body.len()),
        "the held query is replaced"
    );
    assert!(resumed_request(&worker, mark));
    assert_eq!(worker.stream(s).resumed, 1);

    let out = responses(Framing::Capsule, &worker.stream(s).forwarded);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].header.id, out[0].rcode()), (0x4242, 0));
    assert_eq!(addresses(&out[0]), ["93.184.216.34"]);
    Ok(())
}

#[test]
fn forwarder_503_becomes_servfail_for_that_query() -> Result<(), VmError> {
    let Mesh { host, mut worker } = mesh()?;
    let s = tunnel(&mut worker, "/udp-tunnel")?;
    let body = framed(Framing::Capsule, &[&query(0x5151, OTHER, A)]);
    worker.request_body(s, &body, false)?;
    let token = worker.pending_callouts()[0];
    let mark = worker.mark();
    worker.http_call_response(
        token,
        HttpResponse::status(503).body("upstream connect error"),
    )?;
    assert!(resumed_request(&worker, mark));
    let out = responses(Framing::Capsule, &worker.stream(s).forwarded);
    assert_eq!((out[0].header.id, out[0].rcode()), (0x5151, 2));
    assert_eq!(host.stat_value("vmesh_dns_forward_failed"), 1);
    Ok(())
}

#[test]
fn forwarder_garbage_becomes_servfail() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh()?;
    // Not DNS responses: too short for a header, or QR clear. (Past a response header the
    // filter relays the shim's answer as is; the shim checks upstream answers.)
    for (i, garbage) in [&b""[..], b"\x00", &[0x00; 40][..], b"<html>oops</html>"]
        .into_iter()
        .enumerate()
    {
        let s = tunnel(&mut worker, "/udp-tunnel")?;
        let id = 0x6000 + i as u16;
        worker.request_body(s, &framed(Framing::Capsule, &[&query(id, OTHER, A)]), false)?;
        let token = worker.pending_callouts()[0];
        worker.http_call_response(token, HttpResponse::status(200).body(garbage))?;
        let out = responses(Framing::Capsule, &worker.stream(s).forwarded);
        assert_eq!((out[0].header.id, out[0].rcode()), (id, 2), "garbage {i}");
    }
    Ok(())
}

#[test]
fn forward_reset_by_envoy_becomes_servfail_without_killing_the_vm() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh()?;
    let s = tunnel(&mut worker, "/udp-tunnel")?;
    worker.request_body(
        s,
        &framed(Framing::Capsule, &[&query(0x5252, OTHER, A)]),
        false,
    )?;
    let token = worker.pending_callouts()[0];
    worker.http_call_reset(token)?;
    let out = responses(Framing::Capsule, &worker.stream(s).forwarded);
    assert_eq!((out[0].header.id, out[0].rcode()), (0x5252, 2));
    still_answers(&mut worker)
}

#[test]
fn a_forward_the_host_refuses_to_dispatch_is_servfail_at_once() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh_with(r#"{"shim_cluster":"gone"}"#)?;
    let s = tunnel(&mut worker, "/udp-tunnel")?;
    let mark = worker.mark();
    let body = framed(Framing::Capsule, &[&query(0x5353, OTHER, A)]);
    assert_eq!(worker.request_body(s, &body, false)?, Action::Continue);
    assert_eq!(worker.http_calls_since(mark)[0].1, Status::BadArgument);
    let out = responses(Framing::Capsule, &worker.stream(s).forwarded);
    assert_eq!((out[0].header.id, out[0].rcode()), (0x5353, 2));
    Ok(())
}

#[test]
fn two_capsules_in_one_body_get_two_answers_in_order() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh()?;
    let s = tunnel(&mut worker, "/udp-tunnel")?;
    let body = framed(
        Framing::Capsule,
        &[&query(1, MESH, A), &query(2, "vm-db.example.com", A)],
    );
    assert_eq!(worker.request_body(s, &body, false)?, Action::Continue);
    let out = responses(Framing::Capsule, &worker.stream(s).forwarded);
    let got: Vec<(u16, u16)> = out.iter().map(|r| (r.header.id, r.rcode())).collect();
    assert_eq!(got, [(1, 0), (2, 0)]);
    assert_eq!(addresses(&out[1]), ["240.240.0.1"]);
    Ok(())
}

#[test]
fn answers_keep_query_order_around_a_forward_and_queries_arriving_meanwhile() -> Result<(), VmError>
{
    let Mesh { mut worker, .. } = mesh()?;
    let s = tunnel(&mut worker, "/udp-tunnel")?;
    let q2 = query(2, OTHER, A);
    let first = framed(Framing::Capsule, &[&query(1, MESH, A), &q2]);
    assert_eq!(worker.request_body(s, &first, false)?, Action::Pause);
    // Envoy holds the body; the next datagram arrives while the forward is in flight.
    let later = framed(Framing::Capsule, &[&query(3, MESH, A)]);
    assert_eq!(worker.request_body(s, &later, false)?, Action::Pause);
    assert!(worker.stream(s).forwarded.is_empty());

    let token = worker.pending_callouts()[0];
    let mark = worker.mark();
    let upstream = upstream_answer(&q2, 9, Ipv4Addr::new(192, 0, 2, 1), 60);
    worker.http_call_response(token, HttpResponse::status(200).body(upstream))?;
    let writes = set_buffer_calls(&worker, mark);
    assert_eq!(
        writes[0].1 as usize,
        first.len() + later.len(),
        "the whole held body is replaced"
    );
    let out = responses(Framing::Capsule, &worker.stream(s).forwarded);
    let ids: Vec<u16> = out.iter().map(|r| r.header.id).collect();
    assert_eq!(ids, [1, 2, 3]);

    // After the resume, the next chunk is seen on its own again.
    let next = framed(Framing::Capsule, &[&query(4, MESH, A)]);
    assert_eq!(worker.request_body(s, &next, false)?, Action::Continue);
    let out = responses(Framing::Capsule, &worker.stream(s).forwarded);
    assert_eq!(out.len(), 4);
    assert_eq!(out[3].header.id, 4);
    Ok(())
}

#[test]
fn out_of_order_callout_responses_release_the_stream_only_when_all_are_back() -> Result<(), VmError>
{
    let Mesh { mut worker, .. } = mesh()?;
    let s = tunnel(&mut worker, "/udp-tunnel")?;
    let (qa, qb) = (query(10, OTHER, A), query(11, "example.net", A));
    assert_eq!(
        worker.request_body(s, &framed(Framing::Capsule, &[&qa, &qb]), false)?,
        Action::Pause
    );
    let tokens = worker.pending_callouts();
    assert_eq!(tokens.len(), 2);
    let mark = worker.mark();
    let answer_b = upstream_answer(&qb, 1, Ipv4Addr::new(192, 0, 2, 11), 60);
    worker.http_call_response(tokens[1], HttpResponse::status(200).body(answer_b))?;
    assert!(
        !resumed_request(&worker, mark),
        "still waiting for the first"
    );
    assert!(worker.stream(s).forwarded.is_empty());
    let answer_a = upstream_answer(&qa, 2, Ipv4Addr::new(192, 0, 2, 10), 60);
    worker.http_call_response(tokens[0], HttpResponse::status(200).body(answer_a))?;
    assert!(resumed_request(&worker, mark));
    let out = responses(Framing::Capsule, &worker.stream(s).forwarded);
    let got: Vec<(u16, Vec<String>)> = out.iter().map(|r| (r.header.id, addresses(r))).collect();
    assert_eq!(
        got,
        [
            (10, vec!["192.0.2.10".to_string()]),
            (11, vec!["192.0.2.11".to_string()])
        ]
    );
    Ok(())
}

#[test]
fn a_capsule_split_across_two_body_callbacks_is_answered_once_complete() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh()?;
    let s = tunnel(&mut worker, "/udp-tunnel")?;
    let body = framed(Framing::Capsule, &[&query(0x0202, MESH, A)]);
    let (head, tail) = body.split_at(7);
    let mark = worker.mark();
    assert_eq!(worker.request_body(s, head, false)?, Action::Continue);
    let writes = set_buffer_calls(&worker, mark);
    assert_eq!(
        writes,
        [(0, head.len() as u32, Vec::new())],
        "partial frame kept back"
    );
    assert!(worker.stream(s).forwarded.is_empty());

    assert_eq!(worker.request_body(s, tail, false)?, Action::Continue);
    let out = responses(Framing::Capsule, &worker.stream(s).forwarded);
    assert_eq!(
        (out.len(), out[0].header.id, out[0].rcode()),
        (1, 0x0202, 0)
    );
    Ok(())
}

#[test]
fn tcp_tunnel_uses_two_byte_length_framing() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh()?;
    let s = tunnel(&mut worker, "/tcp-tunnel")?;
    let q_other = query(0x0303, OTHER, A);
    let body = framed(
        Framing::Tcp,
        &[&query(0x0301, MESH, A), &query(0x0302, MESH, AAAA)],
    );
    // Split inside the second length prefix: TCP segments fall anywhere.
    let cut = body.len() - 30;
    assert_eq!(
        worker.request_body(s, &body[..cut], false)?,
        Action::Continue
    );
    assert_eq!(
        worker.request_body(s, &body[cut..], false)?,
        Action::Continue
    );
    let out = responses(Framing::Tcp, &worker.stream(s).forwarded);
    let got: Vec<(u16, u16)> = out.iter().map(|r| (r.header.id, r.rcode())).collect();
    assert_eq!(got, [(0x0301, 0), (0x0302, 0)]);
    assert!(out[1].answers.is_empty(), "reviews has no IPv6: NODATA");

    let mark = worker.mark();
    assert_eq!(
        worker.request_body(s, &framed(Framing::Tcp, &[&q_other]), false)?,
        Action::Pause
    );
    let call = single_callout(&worker, mark);
    assert_eq!(call.header("x-vmesh-transport"), Some("tcp"));
    let upstream = upstream_answer(&q_other, 1, Ipv4Addr::new(192, 0, 2, 3), 60);
    worker.http_call_response(call.token, HttpResponse::status(200).body(upstream))?;
    let out = responses(Framing::Tcp, &worker.stream(s).forwarded);
    assert_eq!(out[2].header.id, 0x0303);
    Ok(())
}

#[test]
fn x_dns_framing_tcp_selects_length_framing_on_the_udp_tunnel_path() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh()?;
    let s = worker.create_http_stream()?;
    let headers = [
        (":method", "POST"),
        (":path", "/udp-tunnel"),
        (":authority", "dns.internal"),
        ("x-dns-framing", "tcp"),
    ];
    assert_eq!(
        worker.request_headers(s, &headers, false)?,
        Action::Continue
    );
    let body = framed(Framing::Tcp, &[&query(0x0401, MESH, A)]);
    worker.request_body(s, &body, false)?;
    let out = responses(Framing::Tcp, &worker.stream(s).forwarded);
    assert_eq!(out[0].header.id, 0x0401);
    Ok(())
}

fn doh_stream(
    vm: &mut Vm,
    method: &str,
    path: &str,
    ctype: Option<&str>,
    eos: bool,
) -> Result<(u32, Action), VmError> {
    let s = vm.create_http_stream()?;
    let mut headers = vec![
        (":method", method),
        (":path", path),
        (":authority", "dns.internal"),
        (":scheme", "https"),
    ];
    if let Some(ct) = ctype {
        headers.push(("content-type", ct));
    }
    let action = vm.request_headers(s, &headers, eos)?;
    Ok((s, action))
}

fn local_reply(vm: &Vm, s: u32) -> (u32, Option<String>, Vec<u8>) {
    let r = vm.stream(s).local_response.clone().expect("a local reply");
    (
        r.status,
        r.header("content-type").map(str::to_string),
        r.body,
    )
}

#[test]
fn doh_get_is_answered_with_a_local_dns_message_reply() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh()?;
    let q = query(0, MESH, A);
    let path = format!("/dns-query?dns={}", URL_SAFE_NO_PAD.encode(&q));
    let (s, action) = doh_stream(&mut worker, "GET", &path, None, true)?;
    assert_eq!(action, Action::Pause);
    let reply = worker
        .stream(s)
        .local_response
        .clone()
        .expect("a local reply");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some(DNS_MESSAGE));
    assert_eq!(
        reply.header("cache-control"),
        Some("max-age=30"),
        "RFC 8484 §5.1"
    );
    let r = Response::parse(&reply.body).expect("a DNS message");
    assert_eq!((r.header.id, r.rcode()), (0, 0));
    assert_eq!(r.answers.len(), 2);
    Ok(())
}

#[test]
fn doh_post_is_answered_after_the_whole_body_arrives() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh()?;
    let (s, action) = doh_stream(&mut worker, "POST", "/dns-query", Some(DNS_MESSAGE), false)?;
    assert_eq!(action, Action::Pause, "waits for the body");
    let q = query(0x7001, "vm-db.example.com", A);
    let (head, tail) = q.split_at(10);
    assert_eq!(worker.request_body(s, head, false)?, Action::Pause);
    assert!(worker.stream(s).local_response.is_none());
    assert_eq!(worker.request_body(s, tail, true)?, Action::Pause);
    let (status, ctype, body) = local_reply(&worker, s);
    assert_eq!((status, ctype.as_deref()), (200, Some(DNS_MESSAGE)));
    let r = Response::parse(&body).expect("a DNS message");
    assert_eq!(r.header.id, 0x7001);
    assert_eq!(addresses(&r), ["240.240.0.1"]);
    Ok(())
}

#[test]
fn doh_non_mesh_query_is_forwarded_and_replied_with_the_clients_id() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh()?;
    let (s, _) = doh_stream(&mut worker, "POST", "/dns-query", Some(DNS_MESSAGE), false)?;
    let q = query(0x7002, OTHER, A);
    let mark = worker.mark();
    assert_eq!(worker.request_body(s, &q, true)?, Action::Pause);
    let call = single_callout(&worker, mark);
    assert_eq!(call.header(":path"), Some("/dns-query"));
    assert_eq!(
        call.header("x-vmesh-transport"),
        None,
        "DoH has no transport limit"
    );
    assert!(worker.stream(s).local_response.is_none());
    let upstream = upstream_answer(&q, 0x9999, Ipv4Addr::new(192, 0, 2, 7), 42);
    worker.http_call_response(call.token, HttpResponse::status(200).body(upstream))?;
    let (status, _, body) = local_reply(&worker, s);
    let r = Response::parse(&body).expect("a DNS message");
    assert_eq!((status, r.header.id, r.rcode()), (200, 0x7002, 0));
    assert_eq!(
        worker
            .stream(s)
            .local_response
            .as_ref()
            .and_then(|l| l.header("cache-control")),
        Some("max-age=42")
    );

    // A failed forward is a SERVFAIL DNS answer, still HTTP 200.
    let (s, _) = doh_stream(&mut worker, "POST", "/dns-query", Some(DNS_MESSAGE), false)?;
    worker.request_body(s, &query(0x7003, OTHER, A), true)?;
    let token = worker.pending_callouts()[0];
    worker.http_call_response(token, HttpResponse::status(504))?;
    let (status, _, body) = local_reply(&worker, s);
    let r = Response::parse(&body).expect("a DNS message");
    assert_eq!((status, r.header.id, r.rcode()), (200, 0x7003, 2));
    Ok(())
}

#[test]
fn doh_requests_that_are_not_dns_get_http_errors() -> Result<(), VmError> {
    let Mesh { host, mut worker } = mesh()?;
    let q = URL_SAFE_NO_PAD.encode(query(1, MESH, A));
    let cases: [(&str, String, Option<&str>, bool, u32); 6] = [
        ("POST", "/dns-query".into(), Some("text/plain"), false, 415),
        ("POST", "/dns-query".into(), None, false, 415),
        (
            "GET",
            "/dns-query?dns=***not-base64***".into(),
            None,
            true,
            400,
        ),
        ("GET", "/dns-query?ct=x".into(), None, true, 400),
        ("POST", "/dns-query".into(), Some(DNS_MESSAGE), true, 400),
        ("PUT", format!("/dns-query?dns={q}"), None, true, 405),
    ];
    for (method, path, ctype, eos, want) in cases {
        let (s, action) = doh_stream(&mut worker, method, &path, ctype, eos)?;
        assert_eq!(action, Action::Pause, "{method} {path}");
        if !eos {
            // A refusal waits for the request body: replying before it makes HTTP/2 reset
            // the stream, and some clients report the reset instead of the reply.
            assert!(
                worker.stream(s).local_response.is_none(),
                "{method} {path}: replied early"
            );
            assert_eq!(worker.request_body(s, b"not read", true)?, Action::Pause);
        }
        let (status, ctype, _) = local_reply(&worker, s);
        assert_eq!(status, want, "{method} {path} {ctype:?}");
        assert_eq!(ctype.as_deref(), Some("text/plain"));
    }
    assert!(host.stat_value("vmesh_doh_rejected") >= 2);
    still_answers(&mut worker)
}

#[test]
fn other_paths_pass_through_untouched() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh()?;
    let s = tunnel(&mut worker, "/healthz")?;
    let mark = worker.mark();
    assert_eq!(worker.request_body(s, b"hello", true)?, Action::Continue);
    assert_eq!(worker.stream(s).forwarded, b"hello");
    assert!(set_buffer_calls(&worker, mark).is_empty());
    Ok(())
}

/// xorshift64*: deterministic bytes for hostile inputs.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

#[test]
fn random_bytes_on_the_tunnels_never_trap_the_vm() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh()?;
    for (path, framing) in [
        ("/udp-tunnel", Framing::Capsule),
        ("/tcp-tunnel", Framing::Tcp),
    ] {
        for seed in 0..150u64 {
            let s = tunnel(&mut worker, path)?;
            let len = [1, 2, 3, 12, 40, 200, 1500, 9000][seed as usize % 8];
            let junk = noise(seed, len);
            let action = worker.request_body(s, &junk, seed % 3 == 0)?;
            // Whatever it decided, answer any forwards so the stream completes.
            for token in worker.pending_callouts() {
                worker.http_call_response(token, HttpResponse::status(503))?;
            }
            let st = worker.stream(s);
            if !st.reset && action == Action::Continue {
                // What went out is well-framed DNS (possibly nothing).
                responses(framing, &st.forwarded);
            }
            worker.finish_stream(s)?;
        }
        // Junk capsules that frame fine but hold junk messages.
        let s = tunnel(&mut worker, path)?;
        let junk: Vec<Vec<u8>> = (0..50)
            .map(|i| noise(1000 + i, 5 + i as usize * 7))
            .collect();
        let refs: Vec<&[u8]> = junk.iter().map(Vec::as_slice).collect();
        worker.request_body(s, &framed(framing, &refs), false)?;
        for token in worker.pending_callouts() {
            worker.http_call_response(token, HttpResponse::status(200).body(noise(7, 30)))?;
        }
        assert!(!worker.stream(s).reset, "{path}: framing was valid");
        responses(framing, &worker.stream(s).forwarded);
    }
    assert!(!worker.is_failed());
    still_answers(&mut worker)
}

#[test]
fn an_oversized_capsule_resets_that_stream_only() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh()?;
    let s = tunnel(&mut worker, "/udp-tunnel")?;
    // Capsule type 0, length 0x100000: no DNS message is that large.
    let mut body = vec![0x00, 0x80, 0x10, 0x00, 0x00];
    body.extend_from_slice(&[0u8; 64]);
    let mark = worker.mark();
    assert_eq!(worker.request_body(s, &body, false)?, Action::Pause);
    assert!(worker.calls_since(mark).iter().any(|r| r.call
        == HostCall::CloseStream {
            stream: StreamType::HttpRequest
        }));
    assert!(worker.stream(s).reset);
    assert!(worker.stream(s).forwarded.is_empty());
    worker.finish_stream(s)?;
    still_answers(&mut worker)
}

#[test]
fn hostile_doh_bodies_get_http_or_dns_errors_never_a_trap() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh()?;
    for seed in 0..60u64 {
        let (s, _) = doh_stream(&mut worker, "POST", "/dns-query", Some(DNS_MESSAGE), false)?;
        let junk = noise(seed + 5000, [1, 11, 12, 13, 64, 512][seed as usize % 6]);
        worker.request_body(s, &junk, true)?;
        for token in worker.pending_callouts() {
            worker.http_call_response(token, HttpResponse::status(503))?;
        }
        let (status, _, body) = local_reply(&worker, s);
        match status {
            200 => {
                Response::parse(&body).expect("a DNS error answer");
            }
            400 => {}
            other => panic!("seed {seed}: status {other}"),
        }
        worker.finish_stream(s)?;
    }
    // Over 65535 bytes is refused before it is parsed.
    let (s, _) = doh_stream(&mut worker, "POST", "/dns-query", Some(DNS_MESSAGE), false)?;
    worker.request_body(s, &vec![0u8; 70_000], false)?;
    assert_eq!(local_reply(&worker, s).0, 413);
    still_answers(&mut worker)
}

#[test]
fn a_forward_answered_after_its_stream_ended_is_dropped() -> Result<(), VmError> {
    // Envoy makes callouts on the root context, so ending the stream does not cancel them;
    // the answer still arrives and must find nothing to write to.
    let Mesh { mut worker, .. } = mesh()?;
    let s = tunnel(&mut worker, "/udp-tunnel")?;
    let q = query(0x0808, OTHER, A);
    worker.request_body(s, &framed(Framing::Capsule, &[&q]), false)?;
    let token = worker.pending_callouts()[0];
    worker.finish_stream(s)?;
    let mark = worker.mark();
    let upstream = upstream_answer(&q, 1, Ipv4Addr::new(192, 0, 2, 8), 60);
    worker.http_call_response(token, HttpResponse::status(200).body(upstream))?;
    assert!(
        worker.calls_since(mark).is_empty(),
        "{:?}",
        worker.calls_since(mark)
    );
    still_answers(&mut worker)
}
