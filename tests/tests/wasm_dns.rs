//! The DNS roots on a worker VM, built as vm-sidecar.yaml builds it: three plugins with one
//! `vm_id`, so three root contexts in one VM —
//! - `vmesh_dns_udp`: a network filter in front of Envoy's echo filter, speaking the server
//!   side of udp_proxy's HTTP/1.1 POST tunnel (a chunked body of RFC 9297 capsules);
//! - `vmesh_dns_tcp`: a network filter in front of echo, RFC 1035 §4.2.2 length framing;
//! - `vmesh_dns`: an HTTP filter answering RFC 8484 DoH.
//!
//! Each loads the table the agent published, answers mesh names and forwards the rest through
//! the shim. The network roots answer by replacing the connection's read buffer (echo writes
//! it back) and hold the whole connection while a forward is in flight.

use std::net::Ipv4Addr;
use std::time::Duration;

use vmesh_api::forward::Transport;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use vmesh_core::dns::inspect::{RData, Response};
use vmesh_core::framing::Framing;
use vmesh_core::udp_tunnel::{KEEPALIVE, REJECTION};
use vmesh_tests::wasm_host::vmesh::{
    self, capsule_chunk, chunk, framed, query, responses, small_table, tunnel_response,
    tunnel_responses, upstream_answer, TunnelResponse, WorkerVm, A, AAAA, IMAGE_KEY, LAST_CHUNK,
    SHIM_CLUSTER, TUNNEL_RESPONSE_HEAD, UDP_TUNNEL_HEAD, VERSION_KEY, VM_ID,
};
use vmesh_tests::wasm_host::{
    Action, BufferType, Host, HostCall, PeerType, Plugin, Status, StreamType, Vm, VmError,
};

const MESH: &str = "reviews.apps.svc.cluster.local";
const OTHER: &str = "example.org";
const DNS_MESSAGE: &str = "application/dns-message";

/// An agent that published table v1 and a worker VM whose three DNS roots loaded it on their
/// ticks. `worker`'s first root is the DoH one.
struct Mesh {
    host: Host,
    worker: Vm,
    doh: u32,
    udp: u32,
    tcp: u32,
}

fn mesh_with(worker_config: &str) -> Result<Mesh, VmError> {
    let host = vmesh::host();
    let mut w = vmesh::worker_vm(&host, worker_config)?;
    let mut agent = vmesh::agent(&host, "{}")?;
    vmesh::publish(&host, &mut agent, &small_table("v1"))?;
    w.tick()?;
    let WorkerVm { vm, doh, udp, tcp } = w;
    Ok(Mesh {
        host,
        worker: vm,
        doh,
        udp,
        tcp,
    })
}

fn mesh() -> Result<Mesh, VmError> {
    mesh_with("{}")
}

/// A new udp_proxy tunnel connection on `root` whose request head has been read and answered.
fn udp_tunnel(vm: &mut Vm, root: u32) -> Result<u32, VmError> {
    let c = vm.create_connection_on(root)?;
    assert_eq!(vm.connection(c).new_connection, Action::Continue);
    assert_eq!(
        vm.downstream_data(c, UDP_TUNNEL_HEAD, false)?,
        Action::Continue
    );
    assert_eq!(
        vm.connection(c).written,
        TUNNEL_RESPONSE_HEAD,
        "the head is answered before any datagram"
    );
    Ok(c)
}

/// One read carrying `messages` as capsules in one chunk, as udp_proxy sends a datagram.
fn send_capsules(vm: &mut Vm, c: u32, messages: &[&[u8]]) -> Result<Action, VmError> {
    vm.downstream_data(c, &capsule_chunk(messages), false)
}

/// What udp_proxy has received on a tunnel connection so far.
fn udp_answers(vm: &Vm, c: u32) -> TunnelResponse {
    tunnel_response(&vm.connection(c).written).expect("the tunnel's response")
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

/// `proxy_set_buffer_bytes(DownstreamData)` calls after `mark`: (start, size, data).
fn set_buffer_calls(vm: &Vm, mark: usize) -> Vec<(u32, u32, Vec<u8>)> {
    vm.calls_since(mark)
        .into_iter()
        .filter_map(|r| match r.call {
            HostCall::SetBuffer {
                buffer: BufferType::DownstreamData,
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

/// `proxy_get_buffer_bytes(DownstreamData)` calls after `mark`: (start, max size).
fn get_buffer_calls(vm: &Vm, mark: usize) -> Vec<(u32, u32)> {
    vm.calls_since(mark)
        .into_iter()
        .filter_map(|r| match r.call {
            HostCall::GetBuffer {
                buffer: BufferType::DownstreamData,
                start,
                max_size,
            } => Some((start, max_size)),
            _ => None,
        })
        .collect()
}

fn stream_calls(vm: &Vm, mark: usize, call: &HostCall) -> usize {
    vm.calls_since(mark)
        .iter()
        .filter(|r| r.status == Status::Ok && r.call == *call)
        .count()
}

/// Whether anything was written to a connection or resumed after `mark`.
fn writes_anything(vm: &Vm, mark: usize) -> bool {
    vm.calls_since(mark).iter().any(|r| {
        matches!(
            r.call,
            HostCall::SetBuffer { .. } | HostCall::ContinueStream { .. }
        )
    })
}

fn resumed_reading(vm: &Vm, mark: usize) -> bool {
    let resume = HostCall::ContinueStream {
        stream: StreamType::Downstream,
    };
    stream_calls(vm, mark, &resume) > 0
}

fn closed_connection(vm: &Vm, mark: usize) -> bool {
    let close = HostCall::CloseStream {
        stream: StreamType::Downstream,
    };
    stream_calls(vm, mark, &close) > 0
}

/// Sends one good mesh query on a fresh UDP tunnel and checks it is answered: proof that the
/// VM is alive and serving after whatever came before.
fn still_answers(vm: &mut Vm, udp_root: u32) -> Result<(), VmError> {
    let c = udp_tunnel(vm, udp_root)?;
    assert_eq!(
        send_capsules(vm, c, &[&query(0x0A0A, MESH, A)])?,
        Action::Continue
    );
    assert_eq!(udp_answers(vm, c).ids_and_rcodes(), [(0x0A0A, 0)]);
    vm.finish_connection(c)
}

#[test]
fn worker_loads_the_published_table_on_its_tick() -> Result<(), VmError> {
    let host = vmesh::host();
    let mut worker = vmesh::dns_udp_worker(&host, "{}")?;
    assert_eq!(
        worker.tick_period(),
        Some(std::time::Duration::from_millis(250))
    );
    let udp = worker.root_id();

    // No table yet: a cluster-domain name is SERVFAIL, not forwarded.
    let c = udp_tunnel(&mut worker, udp)?;
    let mark = worker.mark();
    assert_eq!(
        send_capsules(&mut worker, c, &[&query(1, MESH, A)])?,
        Action::Continue
    );
    assert!(worker.http_calls_since(mark).is_empty());
    assert_eq!(udp_answers(&worker, c).ids_and_rcodes(), [(1, 2)]);
    assert_eq!(host.stat_value("vmesh_dns_not_ready"), 1);

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

    // The same connection is answered from the table now.
    send_capsules(&mut worker, c, &[&query(2, MESH, A)])?;
    assert_eq!(udp_answers(&worker, c).ids_and_rcodes(), [(1, 2), (2, 0)]);

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
fn without_a_table_the_tcp_root_also_answers_cluster_names_servfail() -> Result<(), VmError> {
    let host = vmesh::host();
    let mut worker = vmesh::dns_tcp_worker(&host, "{}")?;
    let c = worker.create_connection()?;
    let mark = worker.mark();
    let body = framed(
        Framing::Tcp,
        &[&query(3, "ratings.shop.svc.cluster.local", A)],
    );
    assert_eq!(worker.downstream_data(c, &body, false)?, Action::Continue);
    assert!(worker.http_calls_since(mark).is_empty(), "not forwarded");
    let out = responses(Framing::Tcp, &worker.connection(c).written);
    assert_eq!((out[0].header.id, out[0].rcode()), (3, 2));
    Ok(())
}

#[test]
fn a_corrupt_published_image_is_refused_and_the_loaded_table_keeps_serving() -> Result<(), VmError>
{
    let Mesh {
        host,
        mut worker,
        doh,
        udp,
        tcp,
    } = mesh()?;
    host.set_shared_data(VM_ID, IMAGE_KEY, b"VMNI not really an image");
    host.set_shared_data(VM_ID, VERSION_KEY, b"v2");
    for root in [doh, udp, tcp] {
        worker.tick_root(root)?;
    }
    still_answers(&mut worker, udp)
}

#[test]
fn a_worker_in_another_vm_id_does_not_see_the_table() -> Result<(), VmError> {
    let Mesh { host, .. } = mesh()?;
    let mut other = vmesh::started(
        &host,
        Plugin {
            vm_id: "other".into(),
            ..vmesh::plugin(vmesh::DNS_UDP_ROOT_ID, "{}")
        },
    )?;
    other.tick()?;
    let udp = other.root_id();
    let c = udp_tunnel(&mut other, udp)?;
    send_capsules(&mut other, c, &[&query(7, MESH, A)])?;
    assert_eq!(
        udp_answers(&other, c).ids_and_rcodes(),
        [(7, 2)],
        "not ready: SERVFAIL"
    );
    Ok(())
}

#[test]
fn udp_mesh_query_replaces_the_read_buffer_with_the_response_head_and_its_answer(
) -> Result<(), VmError> {
    let Mesh {
        host,
        mut worker,
        udp,
        ..
    } = mesh()?;
    let c = worker.create_connection_on(udp)?;
    let mut input = UDP_TUNNEL_HEAD.to_vec();
    input.extend(capsule_chunk(&[&query(0x1234, MESH, A)]));
    let mark = worker.mark();
    assert_eq!(worker.downstream_data(c, &input, false)?, Action::Continue);

    assert_eq!(get_buffer_calls(&worker, mark), [(0, input.len() as u32)]);
    let writes = set_buffer_calls(&worker, mark);
    assert_eq!(writes.len(), 1);
    let (start, size, reply) = &writes[0];
    assert_eq!(
        (*start, *size as usize),
        (0, input.len()),
        "whole read buffer replaced"
    );
    assert!(worker.http_calls_since(mark).is_empty());
    assert_eq!(&worker.connection(c).written, reply, "echo wrote it back");
    assert!(worker.connection(c).held().is_empty());

    let out = udp_answers(&worker, c);
    assert_eq!((out.chunks, out.ended), (1, false));
    assert_eq!(out.ids_and_rcodes(), [(0x1234, 0)]);
    assert!(out.responses[0].authoritative());
    let mut ips = addresses(&out.responses[0]);
    ips.sort();
    assert_eq!(ips, ["10.96.0.10", "10.96.0.11"]);
    assert_eq!(host.stat_value("vmesh_dns_answered"), 1);

    // The request's last chunk ends the response.
    assert_eq!(
        worker.downstream_data(c, LAST_CHUNK, false)?,
        Action::Continue
    );
    assert!(worker.connection(c).written.ends_with(LAST_CHUNK));
    assert!(udp_answers(&worker, c).ended);

    worker.finish_connection(c)?;
    let conn = worker.connection(c);
    assert_eq!(
        (conn.closed, conn.done),
        (Some(PeerType::Remote), Some(true))
    );
    Ok(())
}

#[test]
fn udp_tunnel_head_is_answered_at_once_then_each_read_gets_one_chunk() -> Result<(), VmError> {
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    let c = worker.create_connection_on(udp)?;
    // udp_proxy sends the head alone and waits for a 2xx before it sends any datagram.
    let mark = worker.mark();
    assert_eq!(
        worker.downstream_data(c, UDP_TUNNEL_HEAD, false)?,
        Action::Continue
    );
    assert_eq!(
        set_buffer_calls(&worker, mark),
        [(
            0,
            UDP_TUNNEL_HEAD.len() as u32,
            TUNNEL_RESPONSE_HEAD.to_vec()
        )]
    );
    assert_eq!(worker.connection(c).written, TUNNEL_RESPONSE_HEAD);
    let out = udp_answers(&worker, c);
    assert_eq!((out.chunks, out.ended), (0, false));

    // One datagram per read.
    send_capsules(&mut worker, c, &[&query(1, MESH, A)])?;
    assert_eq!(udp_answers(&worker, c).chunks, 1);
    // Two capsules in one chunk, then two chunks in one read: one answer chunk per read.
    send_capsules(&mut worker, c, &[&query(2, MESH, A), &query(3, MESH, AAAA)])?;
    assert_eq!(udp_answers(&worker, c).chunks, 2);
    let mut two_chunks = capsule_chunk(&[&query(4, "vm-db.example.com", A)]);
    two_chunks.extend(capsule_chunk(&[&query(5, "db.wild.example.com", A)]));
    worker.downstream_data(c, &two_chunks, false)?;
    let out = udp_answers(&worker, c);
    assert_eq!((out.chunks, out.ended), (3, false));

    assert_eq!(
        worker.downstream_data(c, LAST_CHUNK, false)?,
        Action::Continue
    );
    let out = udp_answers(&worker, c);
    assert_eq!(
        out.ids_and_rcodes(),
        [(1, 0), (2, 0), (3, 0), (4, 0), (5, 0)]
    );
    assert_eq!((out.chunks, out.ended), (3, true));
    Ok(())
}

#[test]
fn a_second_tunnel_request_on_the_same_connection_is_answered_like_the_first() -> Result<(), VmError>
{
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    let c = worker.create_connection_on(udp)?;
    for id in [1, 2] {
        let mut request = UDP_TUNNEL_HEAD.to_vec();
        request.extend(capsule_chunk(&[&query(id, MESH, A)]));
        request.extend(LAST_CHUNK);
        assert_eq!(
            worker.downstream_data(c, &request, false)?,
            Action::Continue
        );
    }
    let all = tunnel_responses(&worker.connection(c).written);
    let got: Vec<_> = all.iter().map(|r| (r.ids_and_rcodes(), r.ended)).collect();
    assert_eq!(got, [(vec![(1, 0)], true), (vec![(2, 0)], true)]);
    Ok(())
}

#[test]
fn short_names_and_aaaa_follow_the_table() -> Result<(), VmError> {
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    let c = udp_tunnel(&mut worker, udp)?;
    let action = send_capsules(
        &mut worker,
        c,
        &[
            &query(1, "reviews", A),
            &query(2, "ratings.shop", AAAA),
            &query(3, "db.wild.example.com", A),
        ],
    )?;
    assert_eq!(action, Action::Continue);
    let out = udp_answers(&worker, c).responses;
    let got: Vec<(u16, Vec<String>)> = out.iter().map(|r| (r.header.id, addresses(r))).collect();
    assert_eq!(got[1], (2, vec!["fd00::20".to_string()]));
    assert_eq!(got[2], (3, vec!["240.240.0.2".to_string()]));
    assert_eq!(got[0].0, 1);
    assert_eq!(got[0].1.len(), 2);
    Ok(())
}

#[test]
fn successive_answers_rotate_the_leading_address_across_connections() -> Result<(), VmError> {
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    let mut leads = Vec::new();
    for _ in 0..2 {
        let c = udp_tunnel(&mut worker, udp)?;
        for id in 1..=2 {
            send_capsules(&mut worker, c, &[&query(id, MESH, A)])?;
        }
        for r in udp_answers(&worker, c).responses {
            let mut ips = addresses(&r);
            leads.push(ips[0].clone());
            ips.sort();
            assert_eq!(ips, ["10.96.0.10", "10.96.0.11"], "same set, another order");
        }
        worker.finish_connection(c)?;
    }
    assert_eq!(
        leads,
        ["10.96.0.10", "10.96.0.11", "10.96.0.10", "10.96.0.11"],
        "the worker's rotation goes on across connections"
    );
    Ok(())
}

#[test]
fn udp_non_mesh_query_is_forwarded_through_the_shim_and_the_connection_paused(
) -> Result<(), VmError> {
    let Mesh {
        host,
        mut worker,
        udp,
        ..
    } = mesh()?;
    let c = udp_tunnel(&mut worker, udp)?;
    let q = query(0x4242, OTHER, A);
    let datagram = capsule_chunk(&[&q]);
    let mark = worker.mark();
    assert_eq!(
        worker.downstream_data(c, &datagram, false)?,
        Action::Pause,
        "paused, so the read buffer can carry the answer later"
    );

    let token = vmesh::forward_stream(&worker);
    let stream = worker
        .grpc_stream(token)
        .expect("the worker's stream")
        .clone();
    assert_eq!(
        (
            stream.cluster.as_str(),
            stream.service.as_str(),
            stream.method.as_str()
        ),
        (SHIM_CLUSTER, "vmesh.dns.v1.Forwarder", "Forward")
    );
    assert_eq!(
        stream.root,
        worker.root_id(),
        "the first DNS root opened it and owns it"
    );
    let sends: Vec<_> = worker
        .calls_since(mark)
        .into_iter()
        .filter(|r| matches!(r.call, HostCall::GrpcSend { .. }))
        .collect();
    assert_eq!(sends.len(), 1, "one message for the read's one query");
    assert_eq!(sends[0].context, stream.root, "sent as the owning root");
    assert_eq!(sends[0].status, Status::Ok);
    let sent = vmesh::forwards(&worker);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].message, q, "the query goes as received");
    assert_eq!(sent[0].transport, Transport::Udp);
    assert_eq!(sent[0].budget_ms, 5000, "five sixths of the 6 s deadline");
    assert_eq!(
        set_buffer_calls(&worker, mark),
        [(0, datagram.len() as u32, Vec::new())],
        "the filter keeps the query; the read buffer is emptied"
    );
    assert!(!resumed_reading(&worker, mark), "nothing to send yet");
    let conn = worker.connection(c);
    assert_eq!(
        conn.written, TUNNEL_RESPONSE_HEAD,
        "nothing more while in flight"
    );
    assert!(conn.held().is_empty());
    assert_eq!(host.stat_value("vmesh_dns_forwarded"), 1);
    Ok(())
}

#[test]
fn forwarded_answer_goes_out_through_the_paused_read_buffer_with_the_clients_id(
) -> Result<(), VmError> {
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    let c = udp_tunnel(&mut worker, udp)?;
    let q = query(0x4242, OTHER, A);
    worker.downstream_data(c, &capsule_chunk(&[&q]), false)?;
    let fwd = vmesh::forwards(&worker).remove(0);

    let upstream = upstream_answer(&q, 0x7777, Ipv4Addr::new(93, 184, 216, 34), 300);
    let mark = worker.mark();
    vmesh::answer_forward(&mut worker, &fwd, &upstream)?;

    let calls = worker.calls_since(mark);
    let root = worker.root_id();
    assert_eq!(
        calls.first().map(|r| (&r.call, r.status)),
        Some((&HostCall::SetEffectiveContext { context: root }, Status::Ok)),
        "the SDK delivers the message to the root that owns the stream"
    );
    assert!(
        calls
            .iter()
            .any(|r| r.call == HostCall::SetEffectiveContext { context: c }),
        "the root writes to the connection as the connection"
    );
    let writes = set_buffer_calls(&worker, mark);
    assert_eq!(writes.len(), 1);
    assert_eq!(
        (writes[0].0, writes[0].1),
        (0, 0),
        "written into the empty read buffer"
    );
    assert!(resumed_reading(&worker, mark));
    let conn = worker.connection(c);
    assert_eq!(conn.resumed, 1);
    assert!(conn.held().is_empty(), "echo took the answer");

    let out = udp_answers(&worker, c);
    assert_eq!(out.ids_and_rcodes(), [(0x4242, 0)]);
    assert_eq!(addresses(&out.responses[0]), ["93.184.216.34"]);
    Ok(())
}

#[test]
fn a_forward_in_flight_holds_only_its_own_answer_and_the_last_chunk() -> Result<(), VmError> {
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    let c = worker.create_connection_on(udp)?;
    // The whole request in one read: head, a forwarded query, a mesh one, the last chunk.
    let q = query(7, OTHER, A);
    let mut input = UDP_TUNNEL_HEAD.to_vec();
    input.extend(capsule_chunk(&[&q]));
    input.extend(capsule_chunk(&[&query(8, MESH, A)]));
    input.extend(LAST_CHUNK);
    let mark = worker.mark();
    assert_eq!(worker.downstream_data(c, &input, false)?, Action::Pause);
    assert!(
        resumed_reading(&worker, mark),
        "what is ready is pushed on at once, the read stays paused"
    );
    let out = udp_answers(&worker, c);
    assert_eq!(
        (out.ids_and_rcodes(), out.ended),
        (vec![(8, 0)], false),
        "the head and the mesh answer left; the response waits for the forward"
    );

    let fwd = vmesh::forwards(&worker).remove(0);
    let upstream = upstream_answer(&q, 1, Ipv4Addr::new(192, 0, 2, 7), 60);
    vmesh::answer_forward(&mut worker, &fwd, &upstream)?;
    let out = udp_answers(&worker, c);
    assert_eq!(out.ids_and_rcodes(), [(8, 0), (7, 0)]);
    assert_eq!(
        (out.chunks, out.ended),
        (2, true),
        "a chunk each, then the last chunk"
    );
    Ok(())
}

/// Every host call of the UDP root's tick after `mark`, as (context, call, status).
/// The calls a tick made, without the table check and the worker's proof of life (its time
/// in shared data, which `wasm_agent.rs` tests).
fn tick_calls(vm: &Vm, mark: usize) -> Vec<(u32, HostCall, Status)> {
    vm.calls_since(mark)
        .into_iter()
        .filter(|r| {
            !matches!(
                r.call,
                HostCall::GetSharedData { .. }
                    | HostCall::Log { .. }
                    | HostCall::GetCurrentTime
                    | HostCall::SetSharedData { .. }
            )
        })
        .map(|r| (r.context, r.call, r.status))
        .collect()
}

#[test]
fn a_tunnel_waiting_for_a_forward_gets_a_keepalive_on_every_udp_tick_until_the_answer(
) -> Result<(), VmError> {
    let Mesh {
        mut worker,
        udp,
        tcp,
        ..
    } = mesh_with(r#"{"udp_keepalive_ms":100}"#)?;
    // udp_proxy's idle timeout (1 s) must not end a session whose answer is still coming: the
    // UDP root ticks at the keepalive period, the others at the table check period.
    assert_eq!(
        worker.tick_period_of(udp),
        Some(std::time::Duration::from_millis(100))
    );
    assert_eq!(
        worker.tick_period_of(tcp),
        Some(std::time::Duration::from_millis(250))
    );
    let idle = udp_tunnel(&mut worker, udp)?;
    send_capsules(&mut worker, idle, &[&query(1, MESH, A)])?;
    let c = udp_tunnel(&mut worker, udp)?;
    let q = query(0x4343, OTHER, A);
    assert_eq!(send_capsules(&mut worker, c, &[&q])?, Action::Pause);

    for n in 1..=2 {
        let mark = worker.mark();
        worker.tick_root(udp)?;
        assert_eq!(
            tick_calls(&worker, mark),
            [
                // Recorded in the context each call made effective.
                (c, HostCall::SetEffectiveContext { context: c }, Status::Ok),
                (
                    c,
                    HostCall::SetBuffer {
                        buffer: BufferType::DownstreamData,
                        start: 0,
                        size: 0,
                        data: KEEPALIVE.to_vec()
                    },
                    Status::Ok
                ),
                (
                    c,
                    HostCall::ContinueStream {
                        stream: StreamType::Downstream
                    },
                    Status::Ok
                ),
                (
                    udp,
                    HostCall::SetEffectiveContext { context: udp },
                    Status::Ok
                ),
            ],
            "tick {n}: only the tunnel that is owed an answer, then back to the root"
        );
        let out = udp_answers(&worker, c);
        assert_eq!((out.keepalives, out.chunks), (n, 0));
        assert!(worker.connection(c).held().is_empty(), "echo sent it");
        assert_eq!(udp_answers(&worker, idle).keepalives, 0, "it may expire");
    }

    let fwd = vmesh::forwards(&worker).remove(0);
    let upstream = upstream_answer(&q, 9, Ipv4Addr::new(192, 0, 2, 9), 60);
    vmesh::answer_forward(&mut worker, &fwd, &upstream)?;
    let mark = worker.mark();
    worker.tick_root(udp)?;
    assert_eq!(tick_calls(&worker, mark), [], "nothing owed, nothing sent");
    let out = udp_answers(&worker, c);
    assert_eq!(out.ids_and_rcodes(), [(0x4343, 0)]);
    assert_eq!(out.keepalives, 2);
    Ok(())
}

#[test]
fn tcp_connections_and_closed_tunnels_get_no_keepalives() -> Result<(), VmError> {
    let Mesh {
        mut worker,
        udp,
        tcp,
        ..
    } = mesh()?;
    let gone = udp_tunnel(&mut worker, udp)?;
    send_capsules(&mut worker, gone, &[&query(1, OTHER, A)])?;
    let live = udp_tunnel(&mut worker, udp)?;
    send_capsules(&mut worker, live, &[&query(2, OTHER, A)])?;
    let t = worker.create_connection_on(tcp)?;
    assert_eq!(
        worker.downstream_data(t, &framed(Framing::Tcp, &[&query(3, OTHER, A)]), false)?,
        Action::Pause
    );
    // udp_proxy ended one session (its idle timeout, or the client went away) mid-forward.
    worker.finish_connection(gone)?;

    let mark = worker.mark();
    worker.tick_root(udp)?;
    worker.tick_root(tcp)?;
    let written: Vec<u32> = tick_calls(&worker, mark)
        .into_iter()
        .filter(|(_, call, _)| matches!(call, HostCall::SetBuffer { .. }))
        .map(|(context, _, _)| context)
        .collect();
    assert_eq!(written, [live]);
    assert_eq!(udp_answers(&worker, live).keepalives, 1);
    assert!(worker.connection(t).written.is_empty());
    still_answers(&mut worker, udp)
}

#[test]
fn forwarder_503_becomes_servfail_for_that_query() -> Result<(), VmError> {
    let Mesh {
        host,
        mut worker,
        udp,
        ..
    } = mesh()?;
    let c = udp_tunnel(&mut worker, udp)?;
    send_capsules(&mut worker, c, &[&query(0x5151, OTHER, A)])?;
    let fwd = vmesh::forwards(&worker).remove(0);
    let mark = worker.mark();
    vmesh::answer_forward(&mut worker, &fwd, &[])?;
    assert!(resumed_reading(&worker, mark));
    assert_eq!(udp_answers(&worker, c).ids_and_rcodes(), [(0x5151, 2)]);
    assert_eq!(host.stat_value("vmesh_dns_forward_failed"), 1);
    Ok(())
}

#[test]
fn forwarder_garbage_becomes_servfail() -> Result<(), VmError> {
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    // Not DNS responses: too short for a header, or QR clear. (Past a response header the
    // filter relays the shim's answer as is; the shim checks upstream answers.)
    for (i, garbage) in [&b""[..], b"\x00", &[0x00; 40][..], b"<html>oops</html>"]
        .into_iter()
        .enumerate()
    {
        let c = udp_tunnel(&mut worker, udp)?;
        let id = 0x6000 + i as u16;
        send_capsules(&mut worker, c, &[&query(id, OTHER, A)])?;
        let fwd = vmesh::forwards(&worker).remove(0);
        vmesh::answer_forward(&mut worker, &fwd, garbage)?;
        assert_eq!(
            udp_answers(&worker, c).ids_and_rcodes(),
            [(id, 2)],
            "garbage {i}"
        );
    }
    Ok(())
}

#[test]
fn a_stream_reset_sends_the_query_again_on_the_next_stream_and_answers_it_once(
) -> Result<(), VmError> {
    let Mesh {
        host,
        mut worker,
        udp,
        ..
    } = mesh()?;
    let c = udp_tunnel(&mut worker, udp)?;
    let q = query(0x5252, OTHER, A);
    send_capsules(&mut worker, c, &[&q])?;
    let first = vmesh::forwards(&worker).remove(0);
    // The shim went away: Envoy reports the stream closed (UNAVAILABLE).
    worker.grpc_close(first.token, 14)?;
    assert!(worker.grpc_streams().is_empty());
    assert!(
        udp_answers(&worker, c).responses.is_empty(),
        "no SERVFAIL yet"
    );
    // The next tick after the backoff opens a new stream and sends the query again.
    host.advance(Duration::from_millis(100));
    worker.tick_root(udp)?;
    let again = vmesh::forwards(&worker);
    assert_eq!(again.len(), 1);
    assert_ne!(again[0].token, first.token);
    assert_eq!((again[0].id, &again[0].message), (first.id, &q));
    // Answered once, however often the shim answers.
    let upstream = upstream_answer(&q, 1, Ipv4Addr::new(192, 0, 2, 52), 60);
    vmesh::answer_forward(&mut worker, &again[0], &upstream)?;
    vmesh::answer_forward(&mut worker, &again[0], &upstream)?;
    assert_eq!(udp_answers(&worker, c).ids_and_rcodes(), [(0x5252, 0)]);
    still_answers(&mut worker, udp)
}

#[test]
fn a_forward_without_an_answer_is_servfail_at_its_deadline() -> Result<(), VmError> {
    let Mesh {
        host,
        mut worker,
        udp,
        tcp,
        ..
    } = mesh()?;
    let c = udp_tunnel(&mut worker, udp)?;
    send_capsules(&mut worker, c, &[&query(0x5454, OTHER, A)])?;
    let t = worker.create_connection_on(tcp)?;
    worker.downstream_data(t, &framed(Framing::Tcp, &[&query(0x5455, OTHER, A)]), false)?;
    let token = vmesh::forward_stream(&worker);
    host.advance(Duration::from_millis(5999));
    worker.tick_root(udp)?;
    assert!(udp_answers(&worker, c).responses.is_empty());
    host.advance(Duration::from_millis(1));
    worker.tick_root(tcp)?;
    assert_eq!(udp_answers(&worker, c).ids_and_rcodes(), [(0x5454, 2)]);
    let out = responses(Framing::Tcp, &worker.connection(t).written);
    assert_eq!((out[0].header.id, out[0].rcode()), (0x5455, 2));
    // A late answer finds nothing to write to.
    let late = vmesh::sent_on(&worker, token);
    let answer = upstream_answer(&late[0].message, 1, Ipv4Addr::LOCALHOST, 1);
    let mark = worker.mark();
    vmesh::answer_forward(&mut worker, &late[0], &answer)?;
    assert!(!writes_anything(&worker, mark));
    assert_eq!(udp_answers(&worker, c).responses.len(), 1);
    still_answers(&mut worker, udp)
}

#[test]
fn many_queries_in_one_read_go_out_in_one_message_and_answers_may_come_batched(
) -> Result<(), VmError> {
    let Mesh {
        mut worker, tcp, ..
    } = mesh()?;
    let t = worker.create_connection_on(tcp)?;
    let qs: Vec<Vec<u8>> = (0..50u16).map(|i| query(100 + i, OTHER, A)).collect();
    let refs: Vec<&[u8]> = qs.iter().map(Vec::as_slice).collect();
    let mark = worker.mark();
    worker.downstream_data(t, &framed(Framing::Tcp, &refs), false)?;
    let sends = worker
        .calls_since(mark)
        .into_iter()
        .filter(|r| matches!(r.call, HostCall::GrpcSend { .. }))
        .count();
    assert_eq!(sends, 1);
    let fwds = vmesh::forwards(&worker);
    assert_eq!(fwds.len(), 50);
    let answers: Vec<Vec<u8>> = fwds
        .iter()
        .rev()
        .map(|f| upstream_answer(&f.message, 7, Ipv4Addr::new(192, 0, 2, 50), 60))
        .collect();
    let batch: Vec<(u32, &[u8])> = fwds
        .iter()
        .rev()
        .zip(&answers)
        .map(|(f, a)| (f.id, a.as_slice()))
        .collect();
    vmesh::answer_forwards(&mut worker, fwds[0].token, &batch)?;
    let out = responses(Framing::Tcp, &worker.connection(t).written);
    let mut ids: Vec<u16> = out.iter().map(|r| r.header.id).collect();
    assert_eq!(ids.len(), 50, "each once");
    ids.sort_unstable();
    assert_eq!(ids, (100..150).collect::<Vec<u16>>());
    Ok(())
}

#[test]
fn an_unknown_shim_cluster_is_servfail_at_once_and_never_traps() -> Result<(), VmError> {
    // Envoy answers BadArgument to a gRPC stream on an unknown cluster, on which the SDK
    // panics; the filter checks the cluster with a callout first.
    let Mesh {
        mut worker, udp, ..
    } = mesh_with(r#"{"shim_cluster":"gone"}"#)?;
    assert!(worker.grpc_streams().is_empty());
    assert!(!worker
        .calls()
        .iter()
        .any(|r| matches!(r.call, HostCall::GrpcStream { .. })));
    let c = udp_tunnel(&mut worker, udp)?;
    assert_eq!(
        send_capsules(&mut worker, c, &[&query(0x5353, OTHER, A)])?,
        Action::Continue
    );
    assert_eq!(udp_answers(&worker, c).ids_and_rcodes(), [(0x5353, 2)]);
    assert!(!worker.is_failed());
    Ok(())
}

#[test]
fn two_capsules_in_one_chunk_get_two_answers_in_order() -> Result<(), VmError> {
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    let c = udp_tunnel(&mut worker, udp)?;
    let action = send_capsules(
        &mut worker,
        c,
        &[&query(1, MESH, A), &query(2, "vm-db.example.com", A)],
    )?;
    assert_eq!(action, Action::Continue);
    let out = udp_answers(&worker, c);
    assert_eq!(out.ids_and_rcodes(), [(1, 0), (2, 0)]);
    assert_eq!(out.chunks, 1);
    assert_eq!(addresses(&out.responses[1]), ["240.240.0.1"]);
    Ok(())
}

#[test]
fn answers_leave_as_they_are_ready_while_a_forward_is_in_flight() -> Result<(), VmError> {
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    let c = udp_tunnel(&mut worker, udp)?;
    let q2 = query(2, OTHER, A);
    let first = capsule_chunk(&[&query(1, MESH, A), &q2]);
    assert_eq!(worker.downstream_data(c, &first, false)?, Action::Pause);
    assert_eq!(udp_answers(&worker, c).ids_and_rcodes(), [(1, 0)]);
    // The next datagram arrives while the forward is in flight: the read buffer holds only
    // it (the filter emptied the buffer), and its answer leaves at once.
    let later = capsule_chunk(&[&query(3, MESH, A)]);
    let mark = worker.mark();
    assert_eq!(worker.downstream_data(c, &later, false)?, Action::Pause);
    assert_eq!(get_buffer_calls(&worker, mark), [(0, later.len() as u32)]);
    assert_eq!(udp_answers(&worker, c).ids_and_rcodes(), [(1, 0), (3, 0)]);
    assert!(worker.connection(c).held().is_empty());

    let fwd = vmesh::forwards(&worker).remove(0);
    let upstream = upstream_answer(&q2, 9, Ipv4Addr::new(192, 0, 2, 1), 60);
    vmesh::answer_forward(&mut worker, &fwd, &upstream)?;
    let ids: Vec<u16> = udp_answers(&worker, c)
        .responses
        .iter()
        .map(|r| r.header.id)
        .collect();
    assert_eq!(ids, [1, 3, 2]);

    // With nothing in flight, reads go straight through again.
    let next = capsule_chunk(&[&query(4, MESH, A)]);
    let mark = worker.mark();
    assert_eq!(worker.downstream_data(c, &next, false)?, Action::Continue);
    assert!(!resumed_reading(&worker, mark));
    let out = udp_answers(&worker, c);
    assert_eq!(out.responses.len(), 4);
    assert_eq!(out.responses[3].header.id, 4);
    Ok(())
}

#[test]
fn out_of_order_callout_responses_each_leave_when_they_arrive() -> Result<(), VmError> {
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    let c = udp_tunnel(&mut worker, udp)?;
    let (qa, qb) = (query(10, OTHER, A), query(11, "example.net", A));
    assert_eq!(send_capsules(&mut worker, c, &[&qa, &qb])?, Action::Pause);
    let tokens = vmesh::forwards(&worker);
    assert_eq!(tokens.len(), 2);
    let mark = worker.mark();
    let answer_b = upstream_answer(&qb, 1, Ipv4Addr::new(192, 0, 2, 11), 60);
    vmesh::answer_forward(&mut worker, &tokens[1], &answer_b)?;
    assert!(
        resumed_reading(&worker, mark),
        "the second answer does not wait for the first"
    );
    assert_eq!(udp_answers(&worker, c).ids_and_rcodes(), [(11, 0)]);
    let answer_a = upstream_answer(&qa, 2, Ipv4Addr::new(192, 0, 2, 10), 60);
    vmesh::answer_forward(&mut worker, &tokens[0], &answer_a)?;
    let out = udp_answers(&worker, c);
    let got: Vec<(u16, Vec<String>)> = out
        .responses
        .iter()
        .map(|r| (r.header.id, addresses(r)))
        .collect();
    assert_eq!(
        got,
        [
            (11, vec!["192.0.2.11".to_string()]),
            (10, vec!["192.0.2.10".to_string()])
        ]
    );
    assert_eq!(worker.connection(c).resumed, 2);
    Ok(())
}

#[test]
fn a_capsule_split_across_two_reads_is_answered_once_complete() -> Result<(), VmError> {
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    let c = udp_tunnel(&mut worker, udp)?;
    let datagram = capsule_chunk(&[&query(0x0202, MESH, A)]);
    let (head, tail) = datagram.split_at(7);
    let mark = worker.mark();
    assert_eq!(worker.downstream_data(c, head, false)?, Action::Continue);
    assert_eq!(
        set_buffer_calls(&worker, mark),
        [(0, head.len() as u32, Vec::new())],
        "partial chunk kept back"
    );
    assert_eq!(worker.connection(c).written, TUNNEL_RESPONSE_HEAD);

    assert_eq!(worker.downstream_data(c, tail, false)?, Action::Continue);
    assert_eq!(udp_answers(&worker, c).ids_and_rcodes(), [(0x0202, 0)]);
    Ok(())
}

#[test]
fn any_split_of_a_tunnel_request_around_a_forward_gets_the_same_response() -> Result<(), VmError> {
    // Read boundaries fall anywhere: in the head, a chunk-size line, a capsule, between
    // chunks, and the forward completes before or after the second read.
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    let q = query(1, OTHER, A);
    let upstream = upstream_answer(&q, 0x0909, Ipv4Addr::new(192, 0, 2, 1), 60);
    let mut input = UDP_TUNNEL_HEAD.to_vec();
    input.extend(capsule_chunk(&[&q]));
    input.extend(capsule_chunk(&[&query(2, MESH, A)]));
    input.extend(LAST_CHUNK);
    for answer_between_reads in [false, true] {
        for split in 1..input.len() {
            let c = worker.create_connection_on(udp)?;
            for part in [&input[..split], &input[split..]] {
                worker.downstream_data(c, part, false)?;
                if answer_between_reads {
                    answer_all(&mut worker, &upstream)?;
                }
            }
            answer_all(&mut worker, &upstream)?;
            let out = udp_answers(&worker, c);
            let mut got = out.ids_and_rcodes();
            // Answers leave in the order they are ready, which depends on the split.
            got.sort_unstable();
            assert_eq!(
                (got, out.ended),
                (vec![(1, 0), (2, 0)], true),
                "split at {split}, answered between reads: {answer_between_reads}"
            );
            assert!(worker.connection(c).held().is_empty());
            worker.finish_connection(c)?;
        }
    }
    Ok(())
}

#[test]
fn tcp_root_answers_two_byte_framed_queries_split_across_callbacks() -> Result<(), VmError> {
    let Mesh {
        mut worker, tcp, ..
    } = mesh()?;
    let first = framed(Framing::Tcp, &[&query(0x0301, MESH, A)]);
    let mut body = first.clone();
    body.extend(framed(Framing::Tcp, &[&query(0x0302, MESH, AAAA)]));
    // TCP segments fall anywhere; here inside the second length prefix.
    let c = worker.create_connection_on(tcp)?;
    let cut = first.len() + 1;
    assert_eq!(
        worker.downstream_data(c, &body[..cut], false)?,
        Action::Continue
    );
    let out = responses(Framing::Tcp, &worker.connection(c).written);
    assert_eq!(out.len(), 1, "the partial frame is kept back");
    assert_eq!(
        worker.downstream_data(c, &body[cut..], false)?,
        Action::Continue
    );
    let out = responses(Framing::Tcp, &worker.connection(c).written);
    let got: Vec<(u16, u16)> = out.iter().map(|r| (r.header.id, r.rcode())).collect();
    assert_eq!(got, [(0x0301, 0), (0x0302, 0)]);
    assert!(out[1].answers.is_empty(), "reviews has no IPv6: NODATA");

    let q_other = query(0x0303, OTHER, A);
    let mark = worker.mark();
    assert_eq!(
        worker.downstream_data(c, &framed(Framing::Tcp, &[&q_other]), false)?,
        Action::Pause
    );
    let _ = mark;
    let fwd = vmesh::forwards(&worker).remove(0);
    assert_eq!(fwd.transport, Transport::Tcp);
    let upstream = upstream_answer(&q_other, 1, Ipv4Addr::new(192, 0, 2, 3), 60);
    vmesh::answer_forward(&mut worker, &fwd, &upstream)?;
    assert_eq!(worker.connection(c).resumed, 1);
    let out = responses(Framing::Tcp, &worker.connection(c).written);
    assert_eq!(out[2].header.id, 0x0303);
    worker.finish_connection(c)?;

    // Every cut of the two queries gives the same two answers.
    for cut in 1..body.len() {
        let c = worker.create_connection_on(tcp)?;
        worker.downstream_data(c, &body[..cut], false)?;
        worker.downstream_data(c, &body[cut..], false)?;
        let out = responses(Framing::Tcp, &worker.connection(c).written);
        let ids: Vec<u16> = out.iter().map(|r| r.header.id).collect();
        assert_eq!(ids, [0x0301, 0x0302], "cut at {cut}");
        worker.finish_connection(c)?;
    }
    Ok(())
}

/// What udp_proxy never sends: another method, a body that is not chunked, no HTTP at all.
const NOT_A_TUNNEL: [&[u8]; 3] = [
    b"GET /udp-tunnel HTTP/1.1\r\nhost: dns.vmesh.internal\r\n\r\n",
    b"POST /udp-tunnel HTTP/1.1\r\nhost: dns.vmesh.internal\r\ncontent-length: 5\r\n\r\nhello",
    b"SSH-2.0-OpenSSH_9.6\r\n",
];

#[test]
fn a_request_udp_proxy_never_sends_gets_a_400_and_nothing_more() -> Result<(), VmError> {
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    for request in NOT_A_TUNNEL {
        let what = String::from_utf8_lossy(request);
        let c = worker.create_connection_on(udp)?;
        let mark = worker.mark();
        assert_eq!(
            worker.downstream_data(c, request, false)?,
            Action::Continue,
            "{what}"
        );
        assert_eq!(
            set_buffer_calls(&worker, mark),
            [(0, request.len() as u32, REJECTION.to_vec())],
            "{what}: the read buffer becomes the 400"
        );
        assert!(
            !closed_connection(&worker, mark),
            "{what}: closing here would drop the 400; its connection: close ends it"
        );
        // Whatever follows is dropped, not echoed back.
        worker.downstream_data(c, b"more bytes\r\n", false)?;
        let conn = worker.connection(c);
        assert_eq!(conn.written, REJECTION, "{what}");
        assert!(worker.http_calls_since(mark).is_empty());
    }

    // Broken framing after the 200 head: the connection is closed.
    let c = udp_tunnel(&mut worker, udp)?;
    send_capsules(&mut worker, c, &[&query(1, OTHER, A)])?;
    let mark = worker.mark();
    assert_eq!(
        worker.downstream_data(c, b"zz\r\n", false)?,
        Action::Continue
    );
    assert_eq!(set_buffer_calls(&worker, mark), [(0, 4, Vec::new())]);
    assert!(closed_connection(&worker, mark));
    assert_eq!(worker.connection(c).closed, Some(PeerType::Local));
    // The forward's answer finds nothing to write to.
    let fwd = vmesh::forwards(&worker).remove(0);
    let mark = worker.mark();
    vmesh::answer_forward(&mut worker, &fwd, &[])?;
    assert!(!writes_anything(&worker, mark));
    still_answers(&mut worker, udp)
}

#[test]
fn an_oversized_capsule_closes_that_connection_only() -> Result<(), VmError> {
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    let c = udp_tunnel(&mut worker, udp)?;
    let other = udp_tunnel(&mut worker, udp)?;
    // Capsule type 0, length 0x100000: no DNS message is that large.
    let mut capsule = vec![0x00, 0x80, 0x10, 0x00, 0x00];
    capsule.extend_from_slice(&[0u8; 64]);
    let mark = worker.mark();
    worker.downstream_data(c, &chunk(&capsule), false)?;
    assert!(closed_connection(&worker, mark));
    assert_eq!(worker.connection(c).closed, Some(PeerType::Local));
    assert_eq!(
        udp_answers(&worker, c).responses.len(),
        0,
        "nothing answered"
    );
    // The other connection of the same client pool is unaffected.
    send_capsules(&mut worker, other, &[&query(5, MESH, A)])?;
    assert_eq!(udp_answers(&worker, other).ids_and_rcodes(), [(5, 0)]);
    still_answers(&mut worker, udp)
}

#[test]
fn metrics_count_each_query_by_outcome_on_both_network_roots() -> Result<(), VmError> {
    let Mesh {
        host,
        mut worker,
        udp,
        tcp,
        ..
    } = mesh()?;
    let c = udp_tunnel(&mut worker, udp)?;
    send_capsules(
        &mut worker,
        c,
        &[
            &query(1, MESH, A),
            &query(2, MESH, AAAA),
            &[1, 2, 3],
            &query(3, OTHER, A),
        ],
    )?;
    let fwd = vmesh::forwards(&worker).remove(0);
    vmesh::answer_forward(&mut worker, &fwd, &[])?;
    assert_eq!(
        udp_answers(&worker, c).ids_and_rcodes(),
        [(1, 0), (2, 0), (3, 2)],
        "the junk capsule is dropped"
    );

    let t = worker.create_connection_on(tcp)?;
    let q = query(4, OTHER, A);
    let body = framed(Framing::Tcp, &[&query(5, "vm-db.example.com", A), &q]);
    worker.downstream_data(t, &body, false)?;
    let fwd = vmesh::forwards(&worker).remove(0);
    let upstream = upstream_answer(&q, 1, Ipv4Addr::new(192, 0, 2, 4), 60);
    vmesh::answer_forward(&mut worker, &fwd, &upstream)?;
    assert_eq!(
        responses(Framing::Tcp, &worker.connection(t).written).len(),
        2
    );

    let stats = [
        "vmesh_dns_answered",
        "vmesh_dns_nodata",
        "vmesh_dns_dropped",
        "vmesh_dns_forwarded",
        "vmesh_dns_forward_failed",
        "vmesh_dns_not_ready",
        "vmesh_dns_formerr",
    ]
    .map(|name| (name, host.stat_value(name)));
    assert_eq!(
        stats,
        [
            ("vmesh_dns_answered", 2),
            ("vmesh_dns_nodata", 1),
            ("vmesh_dns_dropped", 1),
            ("vmesh_dns_forwarded", 2),
            ("vmesh_dns_forward_failed", 1),
            ("vmesh_dns_not_ready", 0),
            ("vmesh_dns_formerr", 0),
        ]
    );
    Ok(())
}

#[test]
fn a_forward_answered_after_its_connection_closed_is_dropped() -> Result<(), VmError> {
    // Envoy makes callouts on the root context, so the client closing the connection does not
    // cancel them; the answer still arrives and must find nothing to write to.
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    let c = udp_tunnel(&mut worker, udp)?;
    let q = query(0x0808, OTHER, A);
    send_capsules(&mut worker, c, &[&q])?;
    let fwd = vmesh::forwards(&worker).remove(0);
    worker.finish_connection(c)?;
    assert_eq!(worker.connection(c).closed, Some(PeerType::Remote));
    let mark = worker.mark();
    let upstream = upstream_answer(&q, 1, Ipv4Addr::new(192, 0, 2, 8), 60);
    vmesh::answer_forward(&mut worker, &fwd, &upstream)?;
    assert!(
        !writes_anything(&worker, mark),
        "{:?}",
        worker.calls_since(mark)
    );
    assert_eq!(worker.connection(c).written, TUNNEL_RESPONSE_HEAD);
    still_answers(&mut worker, udp)
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
    let _ = mark;
    let fwd = vmesh::forwards(&worker).remove(0);
    assert_eq!(
        fwd.transport,
        Transport::Https,
        "DoH has no transport limit"
    );
    assert_eq!(fwd.message, q);
    assert!(worker.stream(s).local_response.is_none());
    let upstream = upstream_answer(&q, 0x9999, Ipv4Addr::new(192, 0, 2, 7), 42);
    vmesh::answer_forward(&mut worker, &fwd, &upstream)?;
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
    let fwd = vmesh::forwards(&worker).remove(0);
    vmesh::answer_forward(&mut worker, &fwd, &[])?;
    let (status, _, body) = local_reply(&worker, s);
    let r = Response::parse(&body).expect("a DNS message");
    assert_eq!((status, r.header.id, r.rcode()), (200, 0x7003, 2));
    Ok(())
}

#[test]
fn doh_requests_that_are_not_dns_get_http_errors() -> Result<(), VmError> {
    let Mesh {
        host,
        mut worker,
        udp,
        ..
    } = mesh()?;
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
    still_answers(&mut worker, udp)
}

/// A POST stream on the first (DoH) root with headers read.
fn post_stream(vm: &mut Vm, path: &str) -> Result<u32, VmError> {
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

#[test]
fn other_paths_pass_through_the_doh_root_untouched() -> Result<(), VmError> {
    let Mesh { mut worker, .. } = mesh()?;
    // The tunnel paths are network filters' business now: the HTTP filter lets them by.
    for path in ["/healthz", "/udp-tunnel", "/tcp-tunnel"] {
        let s = post_stream(&mut worker, path)?;
        let mark = worker.mark();
        let body = capsule_chunk(&[&query(1, MESH, A)]);
        assert_eq!(worker.request_body(s, &body, true)?, Action::Continue);
        assert_eq!(worker.stream(s).forwarded, body, "{path}");
        assert!(worker.stream(s).local_response.is_none(), "{path}");
        let writes = worker
            .calls_since(mark)
            .into_iter()
            .filter(|r| matches!(r.call, HostCall::SetBuffer { .. }))
            .count();
        assert_eq!(writes, 0, "{path}");
        worker.finish_stream(s)?;
    }
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

/// Answers every forward in flight (with `answer`; empty: SERVFAIL) so paused connections
/// complete.
fn answer_all(vm: &mut Vm, answer: &[u8]) -> Result<(), VmError> {
    for f in vmesh::forwards(vm) {
        vmesh::answer_forward(vm, &f, answer)?;
    }
    Ok(())
}

/// Whatever a connection wrote must be well-formed for its root: a tunnel response (or
/// nothing), or whole length-framed DNS responses.
fn check_written(vm: &Vm, c: u32, framing: Framing, what: &str) {
    let written = &vm.connection(c).written;
    match framing {
        Framing::Capsule => {
            if written.as_slice() == REJECTION {
                return; // refused before any response began
            }
            let response = tunnel_response(written);
            if vm.connection(c).is_closed() {
                assert!(
                    response.is_none_or(|r| !r.ended),
                    "{what}: a refused tunnel never ends well"
                );
            }
        }
        Framing::Tcp => {
            responses(Framing::Tcp, written);
        }
    }
}

#[test]
fn random_bytes_on_the_dns_connections_never_trap_the_vm() -> Result<(), VmError> {
    let Mesh {
        mut worker,
        udp,
        tcp,
        ..
    } = mesh()?;
    let servfail: &[u8] = &[];
    for seed in 0..150u64 {
        let len = [1, 2, 3, 12, 40, 200, 1500, 9000][seed as usize % 8];
        let junk = noise(seed, len);
        let eos = seed % 3 == 0;
        // Raw junk on both roots; on the UDP root also junk after a good head, and junk
        // capsules in good chunks.
        let mut cases: Vec<(u32, Framing, Vec<u8>)> = vec![
            (udp, Framing::Capsule, junk.clone()),
            (tcp, Framing::Tcp, junk.clone()),
        ];
        let mut after_head = UDP_TUNNEL_HEAD.to_vec();
        after_head.extend(&junk);
        cases.push((udp, Framing::Capsule, after_head));
        let mut in_chunk = UDP_TUNNEL_HEAD.to_vec();
        in_chunk.extend(chunk(&junk));
        cases.push((udp, Framing::Capsule, in_chunk));
        for (i, (root, framing, input)) in cases.into_iter().enumerate() {
            let what = format!("seed {seed} case {i}");
            let c = worker.create_connection_on(root)?;
            // Sometimes in two reads, so junk also lands while the connection is held.
            let cut = if seed % 2 == 0 {
                input.len()
            } else {
                input.len() / 2
            };
            for (part, last) in [(&input[..cut], cut == input.len()), (&input[cut..], true)] {
                if part.is_empty() || worker.connection(c).is_closed() {
                    continue;
                }
                worker.downstream_data(c, part, eos && last)?;
            }
            answer_all(&mut worker, servfail)?;
            check_written(&worker, c, framing, &what);
            worker.finish_connection(c)?;
        }
    }
    // Junk messages that frame fine: every one is answered or dropped, nothing is refused.
    let junk: Vec<Vec<u8>> = (0..50)
        .map(|i| noise(1000 + i, 5 + i as usize * 7))
        .collect();
    let refs: Vec<&[u8]> = junk.iter().map(Vec::as_slice).collect();
    let c = udp_tunnel(&mut worker, udp)?;
    worker.downstream_data(c, &capsule_chunk(&refs), false)?;
    answer_all(&mut worker, &noise(7, 30))?;
    assert!(
        !worker.connection(c).is_closed(),
        "capsule framing was valid"
    );
    udp_answers(&worker, c);
    let t = worker.create_connection_on(tcp)?;
    worker.downstream_data(t, &framed(Framing::Tcp, &refs), false)?;
    answer_all(&mut worker, &noise(8, 30))?;
    assert!(!worker.connection(t).is_closed());
    responses(Framing::Tcp, &worker.connection(t).written);

    assert!(!worker.is_failed());
    still_answers(&mut worker, udp)
}

#[test]
fn hostile_doh_bodies_get_http_or_dns_errors_never_a_trap() -> Result<(), VmError> {
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    for seed in 0..60u64 {
        let (s, _) = doh_stream(&mut worker, "POST", "/dns-query", Some(DNS_MESSAGE), false)?;
        let junk = noise(seed + 5000, [1, 11, 12, 13, 64, 512][seed as usize % 6]);
        worker.request_body(s, &junk, true)?;
        answer_all(&mut worker, &[])?;
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
    still_answers(&mut worker, udp)
}

#[test]
fn answers_for_one_tunnel_in_one_stream_message_leave_with_one_resume() -> Result<(), VmError> {
    // Two resumes queued for one connection in one callback run nested in Envoy 1.40, which
    // crashed it: the answers go out together instead.
    let Mesh {
        mut worker, udp, ..
    } = mesh()?;
    let c = udp_tunnel(&mut worker, udp)?;
    let (qa, qb) = (query(21, OTHER, A), query(22, "example.net", A));
    send_capsules(&mut worker, c, &[&qa, &qb])?;
    let fwds = vmesh::forwards(&worker);
    let (aa, ab) = (
        upstream_answer(&qa, 1, Ipv4Addr::new(192, 0, 2, 21), 60),
        upstream_answer(&qb, 1, Ipv4Addr::new(192, 0, 2, 22), 60),
    );
    let mark = worker.mark();
    vmesh::answer_forwards(
        &mut worker,
        fwds[0].token,
        &[(fwds[1].id, &ab), (fwds[0].id, &aa)],
    )?;
    let resumes = worker
        .calls_since(mark)
        .iter()
        .filter(|r| matches!(r.call, HostCall::ContinueStream { .. }))
        .count();
    assert_eq!(resumes, 1);
    let out = udp_answers(&worker, c);
    assert_eq!(
        out.ids_and_rcodes(),
        [(22, 0), (21, 0)],
        "in the order answered"
    );
    assert_eq!(out.chunks, 2, "each answer whole in its chunk");
    Ok(())
}

#[test]
fn a_shim_unreachable_for_a_second_makes_forwards_servfail_at_once_until_it_greets_again(
) -> Result<(), VmError> {
    let Mesh {
        host,
        mut worker,
        udp,
        ..
    } = mesh()?;
    let c = udp_tunnel(&mut worker, udp)?;
    send_capsules(&mut worker, c, &[&query(31, OTHER, A)])?;
    let token = vmesh::forward_stream(&worker);
    worker.grpc_close(token, 14)?;
    // Reopened streams fail too (the shim is gone).
    for _ in 0..4 {
        host.advance(Duration::from_millis(250));
        worker.tick_root(udp)?;
        if let Some(&t) = worker.grpc_streams().keys().next() {
            worker.grpc_close(t, 14)?;
        }
    }
    assert_eq!(
        udp_answers(&worker, c).ids_and_rcodes(),
        [(31, 2)],
        "after 1 s the waiting query gets SERVFAIL, not at its 6 s deadline"
    );
    let c2 = udp_tunnel(&mut worker, udp)?;
    assert_eq!(
        send_capsules(&mut worker, c2, &[&query(32, OTHER, A)])?,
        Action::Continue,
        "new queries do not wait"
    );
    assert_eq!(udp_answers(&worker, c2).ids_and_rcodes(), [(32, 2)]);
    // The shim is back: a stream opens and the shim greets it with an empty message.
    host.advance(Duration::from_millis(500));
    worker.tick_root(udp)?;
    let token = vmesh::forward_stream(&worker);
    worker.grpc_receive(token, &[])?;
    let c3 = udp_tunnel(&mut worker, udp)?;
    assert_eq!(
        send_capsules(&mut worker, c3, &[&query(33, OTHER, A)])?,
        Action::Pause,
        "forwarded again"
    );
    Ok(())
}
