//! The vmesh filter as the host sees it: its roots and plugin configurations, a worker VM as
//! vm-sidecar.yaml builds it, name tables (small ones, and Kubernetes-scale ones for memory
//! measurements), DNS queries, the framings its connections carry, and udp_proxy's side of the
//! HTTP/1.1 tunnel (request head and chunks out, a strictly checked chunked response back).
//! DNS and capsule wire work is vmesh-core's; nothing here re-implements it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use vmesh_core::dns::inspect::Response;
use vmesh_core::dns::response::{set_id, Owner};
use vmesh_core::dns::{Query, Rcode, ResponseBuilder};
use vmesh_core::framing::{encode, Frames, Framing};
use vmesh_core::names::{NameInfo, NameTable, Registry};

use vmesh_api::forward::{self, Transport};

use super::{Host, HttpCallRequest, HttpResponse, Plugin, Status, Vm, VmError};

pub const VM_ID: &str = "vmesh";
pub const AGENT_ROOT_ID: &str = "vmesh_agent";
/// DNS over HTTPS (an HTTP filter).
pub const DNS_ROOT_ID: &str = "vmesh_dns";
/// UDP DNS through udp_proxy's tunnel (a network filter in front of echo).
pub const DNS_UDP_ROOT_ID: &str = "vmesh_dns_udp";
/// TCP DNS (a network filter in front of echo).
pub const DNS_TCP_ROOT_ID: &str = "vmesh_dns_tcp";
pub const SHIM_CLUSTER: &str = "vmesh_shim";
pub const SHIM_AUTHORITY: &str = "vmesh-shim";
/// Envoy's admin endpoint, where the agent asks `/ready`.
pub const ADMIN_CLUSTER: &str = "vmesh_admin";
/// The ORIGINAL_DST cluster the agent's probes go through.
pub const PROBE_CLUSTER: &str = "vmesh_probe";
/// Shared data key where worker ticks leave their time (filter `liveness.rs`).
pub const WORKER_TICK_KEY: &str = "vmesh.worker.tick";
/// Shared data keys the agent publishes under (filter `table.rs`).
pub const IMAGE_KEY: &str = "vmesh.names.image";
pub const VERSION_KEY: &str = "vmesh.names.version";
/// The same for the routing table (filter `routes.rs`).
pub const ROUTES_IMAGE_KEY: &str = "vmesh.routes.image";
pub const ROUTES_VERSION_KEY: &str = "vmesh.routes.version";

pub const A: u16 = 1;
pub const AAAA: u16 = 28;

/// An Envoy process whose cluster manager has vm-sidecar.yaml's clusters for the filter: the
/// shim, Envoy's admin and the probe cluster.
pub fn host() -> Host {
    let host = Host::new();
    for cluster in [SHIM_CLUSTER, ADMIN_CLUSTER, PROBE_CLUSTER] {
        host.add_cluster(cluster);
    }
    host
}

pub fn plugin(root_id: &str, configuration: &str) -> Plugin {
    Plugin {
        vm_id: VM_ID.into(),
        root_id: root_id.into(),
        name: format!("{root_id}_plugin"),
        configuration: configuration.as_bytes().to_vec(),
        vm_configuration: Vec::new(),
    }
}

/// A VM started and configured as Envoy does for a plugin; refusing either step is an error.
pub fn started(host: &Host, plugin: Plugin) -> Result<Vm, VmError> {
    let mut vm = host.vm(plugin)?;
    if !vm.start()? {
        return Err(VmError::Setup("proxy_on_vm_start returned false".into()));
    }
    if !vm.configure()? {
        return Err(VmError::Setup(format!(
            "proxy_on_configure returned false: {:?}",
            vm.logs()
        )));
    }
    Ok(vm)
}

pub fn agent(host: &Host, configuration: &str) -> Result<Vm, VmError> {
    started(host, plugin(AGENT_ROOT_ID, configuration))
}

/// A worker VM with only the DoH root.
pub fn dns_worker(host: &Host, configuration: &str) -> Result<Vm, VmError> {
    started(host, plugin(DNS_ROOT_ID, configuration))
}

/// A worker VM with only the UDP DNS root: connections carry udp_proxy's tunnel.
pub fn dns_udp_worker(host: &Host, configuration: &str) -> Result<Vm, VmError> {
    started(host, plugin(DNS_UDP_ROOT_ID, configuration))
}

/// A worker VM with only the TCP DNS root.
pub fn dns_tcp_worker(host: &Host, configuration: &str) -> Result<Vm, VmError> {
    started(host, plugin(DNS_TCP_ROOT_ID, configuration))
}

/// Adds a plugin with the VM's `vm_id` to a started VM, started and configured as Envoy does;
/// refusing either step is an error. Returns its root context.
pub fn added(vm: &mut Vm, plugin: Plugin) -> Result<u32, VmError> {
    let root_id = plugin.root_id.clone();
    let (root, ok) = vm.add_root(plugin)?;
    if !ok {
        return Err(VmError::Setup(format!(
            "{root_id}: proxy_on_vm_start returned false"
        )));
    }
    if !vm.configure_root(root)? {
        return Err(VmError::Setup(format!(
            "{root_id}: proxy_on_configure returned false: {:?}",
            vm.logs()
        )));
    }
    Ok(root)
}

/// One Envoy worker's vmesh VM as vm-sidecar.yaml makes it: the DoH, UDP and TCP plugins share
/// `vm_id`, so they are three root contexts in one VM.
#[derive(Debug)]
pub struct WorkerVm {
    pub vm: Vm,
    pub doh: u32,
    pub udp: u32,
    pub tcp: u32,
}

impl WorkerVm {
    pub fn roots(&self) -> [u32; 3] {
        [self.doh, self.udp, self.tcp]
    }

    /// Fires every root's timer (each root keeps its own copy of the table).
    pub fn tick(&mut self) -> Result<(), VmError> {
        for root in self.roots() {
            self.vm.tick_root(root)?;
        }
        Ok(())
    }
}

/// A worker VM with the three DNS roots, each with `configuration`.
pub fn worker_vm(host: &Host, configuration: &str) -> Result<WorkerVm, VmError> {
    let mut vm = dns_worker(host, configuration)?;
    let doh = vm.root_id();
    let udp = added(&mut vm, plugin(DNS_UDP_ROOT_ID, configuration))?;
    let tcp = added(&mut vm, plugin(DNS_TCP_ROOT_ID, configuration))?;
    Ok(WorkerVm { vm, doh, udp, tcp })
}

/// A query the filter sent on its forwarding stream (`vmesh_api::forward`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The stream it went on.
    pub token: u32,
    pub id: u32,
    pub transport: Transport,
    pub budget_ms: u32,
    pub message: Vec<u8>,
}

/// Every query sent on `token`, in order, answered or not.
pub fn sent_on(vm: &Vm, token: u32) -> Vec<Forward> {
    let Some(stream) = vm.grpc_stream(token) else {
        return Vec::new();
    };
    stream
        .sent
        .iter()
        .flat_map(|m| forward::queries(m).collect::<Vec<_>>())
        .map(|q| {
            let q = q.expect("the filter sends well-formed queries");
            Forward {
                token,
                id: q.id,
                transport: q.transport,
                budget_ms: q.budget_ms,
                message: q.message.to_vec(),
            }
        })
        .collect()
}

/// The open forwarding stream; panics unless there is exactly one.
pub fn forward_stream(vm: &Vm) -> u32 {
    let open: Vec<u32> = vm.grpc_streams().keys().copied().collect();
    match open.as_slice() {
        [token] => *token,
        other => panic!("expected one open forwarding stream, got {other:?}"),
    }
}

/// Queries sent on the open streams that the test has not answered, oldest first.
pub fn forwards(vm: &Vm) -> Vec<Forward> {
    let mut out = Vec::new();
    for (&token, stream) in vm.grpc_streams() {
        let answered: Vec<u32> = stream
            .received
            .iter()
            .flat_map(|m| {
                forward::answers(m)
                    .filter_map(Result::ok)
                    .map(|a| a.id)
                    .collect::<Vec<_>>()
            })
            .collect();
        out.extend(
            sent_on(vm, token)
                .into_iter()
                .filter(|f| !answered.contains(&f.id)),
        );
    }
    out
}

/// The shim answers `forward` with `answer` (empty: it will not relay it), alone in one
/// message.
pub fn answer_forward(vm: &mut Vm, forward: &Forward, answer: &[u8]) -> Result<(), VmError> {
    answer_forwards(vm, forward.token, &[(forward.id, answer)])
}

/// One `ForwardResponse` with these answers, on stream `token`.
pub fn answer_forwards(vm: &mut Vm, token: u32, answers: &[(u32, &[u8])]) -> Result<(), VmError> {
    let mut message = Vec::new();
    for &(id, answer) in answers {
        forward::push_answer(
            &forward::Answer {
                id,
                message: answer,
            },
            &mut message,
        );
    }
    vm.grpc_receive(token, &message)
}

/// The one callout accepted after `mark`; panics if there is not exactly one.
pub fn single_callout(vm: &Vm, mark: usize) -> HttpCallRequest {
    let calls: Vec<_> = vm
        .http_calls_since(mark)
        .into_iter()
        .filter(|(_, status)| *status == Status::Ok)
        .map(|(req, _)| req)
        .collect();
    assert_eq!(calls.len(), 1, "expected one callout, got {calls:?}");
    calls.into_iter().next().unwrap_or_else(|| unreachable!())
}

/// Callouts dispatched after `mark` (accepted or not) whose `:path` starts with `path`.
pub fn calls_to(vm: &Vm, mark: usize, path: &str) -> Vec<(HttpCallRequest, Status)> {
    vm.http_calls_since(mark)
        .into_iter()
        .filter(|(req, _)| req.header(":path").is_some_and(|p| p.starts_with(path)))
        .collect()
}

/// The one callout to `path` accepted after `mark`; panics if there is not exactly one.
pub fn single_callout_to(vm: &Vm, mark: usize, path: &str) -> HttpCallRequest {
    let calls: Vec<_> = calls_to(vm, mark, path)
        .into_iter()
        .filter(|(_, status)| *status == Status::Ok)
        .map(|(req, _)| req)
        .collect();
    assert_eq!(
        calls.len(),
        1,
        "expected one callout to {path}, got {calls:?}"
    );
    calls.into_iter().next().unwrap_or_else(|| unreachable!())
}

/// Callouts to `path` the module made and the test has not answered yet, oldest first.
pub fn pending_to(vm: &Vm, path: &str) -> Vec<HttpCallRequest> {
    let pending = vm.pending_callouts();
    calls_to(vm, 0, path)
        .into_iter()
        .filter(|(req, status)| *status == Status::Ok && pending.contains(&req.token))
        .map(|(req, _)| req)
        .collect()
}

/// The agent's name-table poll in flight; panics unless there is exactly one.
pub fn table_poll(vm: &Vm) -> u32 {
    match pending_to(vm, NAME_TABLE_PATH).as_slice() {
        [poll] => poll.token,
        other => panic!(
            "agent has {} polls in flight, not one: {other:?}",
            other.len()
        ),
    }
}

/// Path of the shim's name table long-poll.
pub const NAME_TABLE_PATH: &str = vmesh_api::paths::shim::NAME_TABLE;

/// Runs an agent until it has published `table`: a tick sends the poll (unless one is in
/// flight), which gets a 200.
pub fn publish(host: &Host, agent_vm: &mut Vm, table: &NameTable) -> Result<(), VmError> {
    if pending_to(agent_vm, NAME_TABLE_PATH).is_empty() {
        agent_vm.tick()?;
    }
    let token = table_poll(agent_vm);
    agent_vm.http_call_response(token, HttpResponse::status(200).body(table.to_json()))?;
    let published = host.shared_data(VM_ID, VERSION_KEY).map(|(v, _)| v);
    assert_eq!(
        published.as_deref(),
        Some(table.version.as_bytes()),
        "agent did not publish table {}: {:?}",
        table.version,
        agent_vm.logs()
    );
    Ok(())
}

fn info(ips: &[&str], registry: Registry, shortname: &str, namespace: &str) -> NameInfo {
    NameInfo {
        ips: ips.iter().map(|ip| ip.parse().expect("test IP")).collect(),
        registry,
        shortname: shortname.into(),
        namespace: namespace.into(),
    }
}

/// A small table: two Kubernetes services and two ServiceEntry hosts (one wildcard).
pub fn small_table(version: &str) -> NameTable {
    let mut names = BTreeMap::new();
    names.insert(
        "reviews.apps.svc.cluster.local".to_string(),
        info(
            &["10.96.0.10", "10.96.0.11"],
            Registry::Kubernetes,
            "reviews",
            "apps",
        ),
    );
    names.insert(
        "ratings.shop.svc.cluster.local".to_string(),
        info(
            &["10.96.0.20", "fd00::20"],
            Registry::Kubernetes,
            "ratings",
            "shop",
        ),
    );
    names.insert(
        "vm-db.example.com".to_string(),
        info(&["240.240.0.1"], Registry::External, "", ""),
    );
    names.insert(
        "*.wild.example.com".to_string(),
        info(&["240.240.0.2"], Registry::External, "", ""),
    );
    NameTable {
        version: version.into(),
        namespace: "apps".into(),
        domain: "cluster.local".into(),
        search_domains: vec![
            "apps.svc.cluster.local".into(),
            "svc.cluster.local".into(),
            "cluster.local".into(),
        ],
        names,
        services: Default::default(),
        network: String::new(),
        gateways: Default::default(),
        locality: String::new(),
    }
}

const SERVICES: &[&str] = &[
    "reviews",
    "ratings",
    "details",
    "productpage",
    "checkout",
    "cart",
    "payments",
    "inventory",
    "catalog",
    "search",
    "auth",
    "users",
    "orders",
    "shipping",
    "notifications",
    "recommendations",
    "frontend",
    "api-gateway",
    "billing",
    "ledger",
];
const VARIANTS: &[&str] = &[
    "", "-v2", "-api", "-grpc", "-worker", "-cache", "-db", "-canary",
];
const NAMESPACES: &[&str] = &[
    "default",
    "payments-prod",
    "payments-staging",
    "shop",
    "identity",
    "data-platform",
    "observability",
    "istio-system",
    "ml-serving",
    "search-infra",
    "team-alpha",
    "team-bravo",
];
const PARTNERS: &[&str] = &[
    "payments.partner-a.com",
    "api.partner-b.io",
    "internal.corp.example",
    "legacy-vms.example.net",
    "eu-west-1.rds.example.cloud",
];

/// A name table the size of a large mesh: 80 % Kubernetes services
/// (`<service>-<n>.<namespace>.svc.cluster.local`, a ClusterIP, every 10th dual-stack) and
/// 20 % ServiceEntry hosts (`<role>-<n>.<partner domain>`, auto-allocated 240.240/16
/// addresses, some with two, one in a hundred a `*.` wildcard). Deterministic.
pub fn kubernetes_scale_table(names: usize, version: &str) -> NameTable {
    let mut table = NameTable {
        version: version.into(),
        namespace: "shop".into(),
        domain: "cluster.local".into(),
        search_domains: vec![
            "shop.svc.cluster.local".into(),
            "svc.cluster.local".into(),
            "cluster.local".into(),
        ],
        names: BTreeMap::new(),
        services: Default::default(),
        network: String::new(),
        gateways: Default::default(),
        locality: String::new(),
    };
    let kubernetes = names * 4 / 5;
    for i in 0..kubernetes {
        let service = format!(
            "{}{}-{}",
            SERVICES[i % SERVICES.len()],
            VARIANTS[(i / SERVICES.len()) % VARIANTS.len()],
            i / (SERVICES.len() * VARIANTS.len())
        );
        let namespace = NAMESPACES[(i * 7) % NAMESPACES.len()];
        let n = i as u32;
        let mut ips = vec![IpAddr::V4(Ipv4Addr::new(
            10,
            96 + ((n >> 16) & 15) as u8,
            (n >> 8) as u8,
            n as u8,
        ))];
        if i % 10 == 0 {
            ips.push(IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                10,
                96,
                0,
                0,
                0,
                (n >> 16) as u16,
                n as u16,
            )));
        }
        table.names.insert(
            format!("{service}.{namespace}.svc.cluster.local"),
            NameInfo {
                ips,
                registry: Registry::Kubernetes,
                shortname: service,
                namespace: namespace.into(),
            },
        );
    }
    for j in 0..names - kubernetes {
        let partner = PARTNERS[j % PARTNERS.len()];
        let host = if j % 100 == 99 {
            format!("*.tenant-{j}.{partner}")
        } else {
            let role = ["api", "db", "cache", "mq", "vm"][(j / PARTNERS.len()) % 5];
            format!("{role}-{j}.{partner}")
        };
        let n = j as u32;
        let mut ips = vec![IpAddr::V4(Ipv4Addr::new(240, 240, (n >> 8) as u8, n as u8))];
        if j % 7 == 0 {
            ips.push(IpAddr::V4(Ipv4Addr::new(240, 241, (n >> 8) as u8, n as u8)));
        }
        table.names.insert(
            host,
            NameInfo {
                ips,
                registry: Registry::External,
                shortname: String::new(),
                namespace: String::new(),
            },
        );
    }
    table
}

/// A standard query (RD set, one question, class IN, no EDNS).
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    vmesh_core::dns::build_query(id, name, qtype, None).expect("a valid test name")
}

/// What an upstream resolver would answer to `query`: NOERROR with one A record, under its
/// own `id` (the filter must restore the client's).
pub fn upstream_answer(query: &[u8], id: u16, ip: Ipv4Addr, ttl: u32) -> Vec<u8> {
    let parsed = Query::parse(query).expect("a well-formed test query");
    let mut b = ResponseBuilder::new(&parsed, Rcode::NoError, false, 65535);
    b.address(Owner::Question, IpAddr::V4(ip), ttl);
    let mut answer = b.finish().0;
    set_id(&mut answer, id);
    answer
}

/// Messages framed for a tunnel.
pub fn framed(framing: Framing, messages: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        encode(framing, m, &mut out);
    }
    out
}

/// The DNS responses in a tunnel's output; panics on anything that is not one.
pub fn responses(framing: Framing, bytes: &[u8]) -> Vec<Response> {
    let mut frames = Frames::new(framing, bytes);
    let out: Vec<Response> = frames
        .by_ref()
        .map(|f| {
            let msg = f.expect("well-framed output").expect("a DNS message");
            Response::parse(msg).expect("a parseable DNS response")
        })
        .collect();
    assert_eq!(
        frames.consumed(),
        bytes.len(),
        "output ends with a partial frame"
    );
    out
}

/// The request head udp_proxy sends for each client address (`tunneling_config` with
/// `use_post` and `post_path: /udp-tunnel`, over HTTP/1.1): its body is chunked.
pub const UDP_TUNNEL_HEAD: &[u8] =
    b"POST /udp-tunnel HTTP/1.1\r\nhost: dns.vmesh.internal\r\ntransfer-encoding: chunked\r\n\r\n";
/// The response head the filter answers a tunnel request with, before any datagram.
pub const TUNNEL_RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
/// The last chunk (RFC 9112 §7.1), without trailers: it ends a request or a response body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// One chunk of a chunked body (RFC 9112 §7.1), as udp_proxy frames each datagram.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// DNS messages as RFC 9297 DATAGRAM capsules in one chunk.
pub fn capsule_chunk(messages: &[&[u8]]) -> Vec<u8> {
    chunk(&framed(Framing::Capsule, messages))
}

/// A tunnel response as udp_proxy reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelResponse {
    /// The DNS answers, in order.
    pub responses: Vec<Response>,
    /// How many chunks carried them (the filter writes one per callback that had answers).
    pub chunks: usize,
    /// Keepalive chunks (`vmesh_core::udp_tunnel::KEEPALIVE`) among them, which udp_proxy
    /// drops; not counted in `chunks`.
    pub keepalives: usize,
    /// The last chunk came: the response is complete.
    pub ended: bool,
}

impl TunnelResponse {
    /// (id, rcode) of each answer.
    pub fn ids_and_rcodes(&self) -> Vec<(u16, u16)> {
        self.responses
            .iter()
            .map(|r| (r.header.id, r.rcode()))
            .collect()
    }
}

/// Longest chunk-size line the filter writes: a hex length of a chunk that holds DNS answers.
const MAX_CHUNK_SIZE_LINE: usize = 8;

/// Parses what the filter wrote back on a tunnel connection: a 200 head, then chunks that each
/// hold whole capsules of DNS responses or are a keepalive, then possibly the last chunk.
/// Strict: anything else
/// (another head, a chunk cut short, chunk extensions, trailers, an empty chunk that is not the
/// last, bytes after the last chunk) fails the test. Nothing written yet is `None`.
pub fn tunnel_response(bytes: &[u8]) -> Option<TunnelResponse> {
    let mut all = tunnel_responses(bytes);
    assert!(
        all.len() <= 1,
        "{} responses where one was expected: {all:?}",
        all.len()
    );
    all.pop()
}

/// [`tunnel_response`] for a connection that carried several requests one after another:
/// every response but the last must have ended.
pub fn tunnel_responses(mut bytes: &[u8]) -> Vec<TunnelResponse> {
    let mut out: Vec<TunnelResponse> = Vec::new();
    while !bytes.is_empty() {
        if let Some(previous) = out.last() {
            assert!(
                previous.ended,
                "bytes after an unfinished response: {:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let Some(body) = bytes.strip_prefix(TUNNEL_RESPONSE_HEAD) else {
            panic!(
                "not the tunnel's 200 head: {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
            );
        };
        let (response, rest) = chunked_body(body);
        out.push(response);
        bytes = rest;
    }
    out
}

/// Reads chunks up to and including the last one (or to the end of the bytes); returns what
/// follows the last chunk.
fn chunked_body(mut body: &[u8]) -> (TunnelResponse, &[u8]) {
    let mut response = TunnelResponse {
        responses: Vec::new(),
        chunks: 0,
        keepalives: 0,
        ended: false,
    };
    while !body.is_empty() {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else {
            panic!(
                "chunk-size line without CRLF: {:?}",
                String::from_utf8_lossy(body)
            );
        };
        let line = &body[..eol];
        assert!(
            !line.is_empty()
                && line.len() <= MAX_CHUNK_SIZE_LINE
                && line.iter().all(u8::is_ascii_hexdigit),
            "bad chunk-size line {:?}",
            String::from_utf8_lossy(line)
        );
        let size = usize::from_str_radix(std::str::from_utf8(line).expect("hex digits"), 16)
            .expect("a chunk size");
        if let Some(after) = body.strip_prefix(vmesh_core::udp_tunnel::KEEPALIVE) {
            response.keepalives += 1;
            body = after;
            continue;
        }
        let rest = &body[eol + 2..];
        if size == 0 {
            let Some(after) = rest.strip_prefix(b"\r\n".as_slice()) else {
                panic!(
                    "last chunk not ended by an empty line (trailers?): {:?}",
                    String::from_utf8_lossy(rest)
                );
            };
            response.ended = true;
            return (response, after);
        }
        assert!(
            rest.len() >= size + 2,
            "chunk of {size} bytes cut short: {} bytes left",
            rest.len()
        );
        assert_eq!(
            &rest[size..size + 2],
            b"\r\n",
            "chunk data not followed by CRLF"
        );
        // `responses` fails on a capsule cut at the chunk's end: each chunk holds whole ones.
        response
            .responses
            .extend(responses(Framing::Capsule, &rest[..size]));
        response.chunks += 1;
        body = &rest[size + 2..];
    }
    (response, body)
}
