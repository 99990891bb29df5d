//! Host state: what one Envoy process shares between its VMs ([`Process`]) and what one VM's
//! store holds ([`VmState`]): contexts (roots, HTTP streams, connections), callouts, metric ids
//! and the call record.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

use wasmtime::{Memory, StoreLimits, TypedFunc};

use super::abi::{Action, LogLevel, MetricType, Pairs, PeerType, Status};
use super::record::{HostCall, HttpResponse, LocalResponse, Recorded};
use super::Plugin;

/// Process-wide state: the clock, shared data (per `vm_id`, as Envoy keys it), stats (by name;
/// every VM that defines a name adds to the same stat) and the clusters that exist.
#[derive(Debug)]
pub(crate) struct Process {
    pub now_ns: u64,
    pub shared: HashMap<(String, String), (Vec<u8>, u32)>,
    pub next_cas: u32,
    pub stats: BTreeMap<String, Stat>,
    pub clusters: BTreeSet<String>,
    pub log_level: LogLevel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub kind: MetricType,
    /// Counter total, gauge value, or the last value a histogram recorded.
    pub value: u64,
    /// Every value a histogram recorded.
    pub samples: Vec<u64>,
}

impl Process {
    pub fn new() -> Self {
        Process {
            // 2023-11-14T22:13:20Z: far from the epoch so "time 0" bugs show.
            now_ns: 1_700_000_000_000_000_000,
            shared: HashMap::new(),
            next_cas: 0,
            stats: BTreeMap::new(),
            clusters: BTreeSet::new(),
            log_level: LogLevel::Info,
        }
    }

    /// Envoy's `SharedData::set`: a non-zero `cas` must match the stored one; every write
    /// gets a fresh, non-zero cas.
    pub fn set_shared(&mut self, vm_id: &str, key: &str, value: Vec<u8>, cas: u32) -> Status {
        let slot = (vm_id.to_string(), key.to_string());
        if let Some((_, current)) = self.shared.get(&slot) {
            if cas != 0 && cas != *current {
                return Status::CasMismatch;
            }
        }
        self.next_cas = self.next_cas.wrapping_add(1).max(1);
        self.shared.insert(slot, (value, self.next_cas));
        Status::Ok
    }
}

pub(crate) type SharedProcess = Rc<RefCell<Process>>;

/// Where the VM is in its life, for Envoy's restricted-callback rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Running `_initialize`: only logging, environment, clock and random are allowed.
    Initialize,
    /// Running `malloc`/`proxy_on_memory_allocate` for a host copy: only logging and clock.
    Allocate,
    Normal,
}

#[derive(Debug)]
pub(crate) enum Context {
    Root(RootContext),
    Http(Stream),
    Connection(Connection),
}

#[derive(Debug, Default)]
pub(crate) struct RootContext {
    /// The plugin this root serves: several plugins with the same `vm_id` share one VM, each
    /// with its own root context.
    pub plugin: Plugin,
    pub tick_period_ms: u32,
    /// `proxy_get_status` values; set while a failed callout is being reported.
    pub status: (u32, String),
    /// `proxy_on_done` returned false: the root waits for `proxy_done`.
    pub pending_done: bool,
}

/// An HTTP stream as Envoy's filter manager holds it for this filter.
#[derive(Debug, Default)]
pub struct Stream {
    pub root: u32,
    /// Request headers, while Envoy lets the filter see them (during the headers callback,
    /// and afterwards only if it paused there).
    pub(crate) request_headers: Option<Pairs>,
    /// What `proxy_get_buffer_bytes(HttpRequestBody)` sees: the current chunk, or everything
    /// buffered since the filter paused.
    pub(crate) body: Vec<u8>,
    /// The filter returned Pause from a body callback; Envoy buffers until it resumes.
    pub(crate) buffering: bool,
    /// Request body bytes the filter let through to the router, in order.
    pub forwarded: Vec<u8>,
    pub local_response: Option<LocalResponse>,
    /// Times `proxy_continue_stream(HttpRequest)` resumed the request.
    pub resumed: u32,
    /// `proxy_close_stream(HttpRequest)` reset the stream.
    pub reset: bool,
}

/// A downstream connection as Envoy's network filter manager holds it for this filter, with
/// Envoy's echo filter after it (`envoy.filters.network.echo`, as in vm-sidecar.yaml): what the
/// filter lets through is written back to the client.
#[derive(Debug)]
pub struct Connection {
    pub root: u32,
    /// What `proxy_on_new_connection` returned.
    pub new_connection: Action,
    /// The connection's read buffer: bytes read and not yet taken by echo. While the filter
    /// holds the connection (it paused), later reads pile up behind the earlier bytes.
    pub(crate) read_buffer: Vec<u8>,
    /// Whether the filter can see the read buffer. Envoy's `Context::onData` points the filter
    /// at it for the callback and clears the pointer only when the filter returns Continue, so
    /// after a Pause it stays readable and writable from later callbacks (a callout response)
    /// until the next Continue.
    pub(crate) buffer_visible: bool,
    /// The client ended its side (a read with end of stream).
    pub read_closed: bool,
    /// The bytes echo is writing while `proxy_on_upstream_data` runs (Envoy's
    /// `Context::onWrite` shows the write to the filter).
    pub(crate) write_buffer: Option<Vec<u8>>,
    /// What went back to the client, in order.
    pub written: Vec<u8>,
    /// Writes the filter stopped in `proxy_on_upstream_data`; nothing in proxy-wasm can resume
    /// them (`proxy_continue_stream(Upstream)` is Unimplemented), so they never reach the client.
    pub write_stopped: Vec<u8>,
    /// Echo passed the end of stream on: the write side is closed.
    pub write_closed: bool,
    /// Times `proxy_continue_stream(Downstream)` resumed reading.
    pub resumed: u32,
    /// Closed, and by whom: `Local` when the filter closed it (`proxy_close_stream`),
    /// `Remote` when the test (the client) did. Envoy then ends the context at once.
    pub closed: Option<PeerType>,
    /// What `proxy_on_done` returned when the context ended.
    pub done: Option<bool>,
}

impl Connection {
    pub(crate) fn new(root: u32) -> Self {
        Connection {
            root,
            new_connection: Action::Continue,
            read_buffer: Vec::new(),
            buffer_visible: false,
            read_closed: false,
            write_buffer: None,
            written: Vec::new(),
            write_stopped: Vec::new(),
            write_closed: false,
            resumed: 0,
            closed: None,
            done: None,
        }
    }

    /// Bytes read that echo has not taken: what Envoy holds while the filter paused (nothing
    /// once the connection closed).
    pub fn held(&self) -> &[u8] {
        &self.read_buffer
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }
}

/// A callout the module dispatched and the test has not answered yet.
#[derive(Debug, Clone)]
pub(crate) struct Callout {
    pub root: u32,
}

/// A gRPC stream a root opened (`proxy_grpc_stream`), as Envoy's `Context::grpc_stream_` holds
/// it: what the module sent on it, until Envoy reports it closed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrpcStream {
    /// The root context that owns it (the root of the effective context at open).
    pub root: u32,
    pub cluster: String,
    pub service: String,
    pub method: String,
    /// Messages sent, in order (unframed, as the module passed them).
    pub sent: Vec<Vec<u8>>,
    /// Messages the test delivered on it, in order.
    pub received: Vec<Vec<u8>>,
    /// The module ended its side (`end_stream`, or `proxy_grpc_close`).
    pub local_closed: bool,
    /// `proxy_grpc_cancel`: Envoy reset it and will report nothing more.
    pub cancelled: bool,
}

/// Effects Envoy applies after the VM call returns (`DeferAfterCallActions`).
#[derive(Debug, Clone)]
pub(crate) enum Deferred {
    ContinueRequest(u32),
    ResetRequest(u32),
    LocalResponse(u32, LocalResponse),
    /// `continueReading()`: the read buffer goes on to the next filter (echo).
    ContinueReading(u32),
    /// `connection().close(FlushWrite)`.
    CloseConnection(u32),
}

pub(crate) struct VmState {
    pub process: SharedProcess,
    pub plugin: Plugin,
    pub limits: StoreLimits,
    pub memory: Option<Memory>,
    pub malloc: Option<TypedFunc<i32, i32>>,
    pub phase: Phase,
    /// Context of the callback in progress, and the one `proxy_set_effective_context` chose.
    pub current: u32,
    pub effective: u32,
    pub contexts: BTreeMap<u32, Context>,
    /// Connections whose contexts ended, kept for the test to inspect.
    pub ended_connections: BTreeMap<u32, Connection>,
    pub next_context_id: u32,
    /// Buffers only available during one callback.
    pub plugin_configuration_visible: bool,
    pub call_response: Option<HttpResponse>,
    pub callouts: BTreeMap<u32, Callout>,
    pub next_http_call_id: u32,
    /// Open gRPC streams by token; closed ones move to `closed_grpc_streams`.
    pub grpc_streams: BTreeMap<u32, GrpcStream>,
    pub closed_grpc_streams: BTreeMap<u32, GrpcStream>,
    pub next_grpc_stream_id: u32,
    /// The message `proxy_get_buffer_bytes(GrpcReceiveBuffer)` reads during a receive callback.
    pub grpc_receive: Option<Vec<u8>>,
    pub metric_ids: HashMap<u32, (MetricType, String)>,
    pub next_metric_id: [u32; 3],
    pub properties: HashMap<Vec<String>, Vec<u8>>,
    pub deferred: Vec<Deferred>,
    pub calls: Vec<Recorded>,
    pub random_state: u64,
}

impl VmState {
    pub fn new(process: SharedProcess, plugin: Plugin, limits: StoreLimits) -> Self {
        VmState {
            process,
            plugin,
            limits,
            memory: None,
            malloc: None,
            phase: Phase::Normal,
            current: 0,
            effective: 0,
            contexts: BTreeMap::new(),
            ended_connections: BTreeMap::new(),
            // 0 is Envoy's VM context.
            next_context_id: 1,
            plugin_configuration_visible: false,
            call_response: None,
            callouts: BTreeMap::new(),
            // Envoy: ids step by 4, the low bits telling HTTP (0) from gRPC callouts.
            next_http_call_id: 0,
            grpc_streams: BTreeMap::new(),
            closed_grpc_streams: BTreeMap::new(),
            // Envoy: gRPC stream tokens are 2 mod 4.
            next_grpc_stream_id: 2,
            grpc_receive: None,
            metric_ids: HashMap::new(),
            // Envoy: ids step by 4, the low bits carrying the metric type.
            next_metric_id: [0, 1, 2],
            properties: HashMap::new(),
            deferred: Vec::new(),
            calls: Vec::new(),
            random_state: 0x5eed_f00d_7e57,
        }
    }

    /// Envoy's `contextOrEffectiveContext()`.
    pub fn context_id(&self) -> u32 {
        if self.effective != 0 && self.contexts.contains_key(&self.effective) {
            self.effective
        } else {
            self.current
        }
    }

    pub fn root_of(&self, id: u32) -> u32 {
        match self.contexts.get(&id) {
            Some(Context::Http(s)) => s.root,
            Some(Context::Connection(c)) => c.root,
            _ => id,
        }
    }

    /// The plugin of a context's root (the VM's first plugin outside any root).
    pub fn plugin_of(&self, id: u32) -> &Plugin {
        match self.contexts.get(&self.root_of(id)) {
            Some(Context::Root(r)) => &r.plugin,
            _ => &self.plugin,
        }
    }

    pub fn connection_mut(&mut self, id: u32) -> Option<&mut Connection> {
        match self.contexts.get_mut(&id) {
            Some(Context::Connection(c)) => Some(c),
            _ => None,
        }
    }

    /// Whether the context is a live stream or connection (one with a request or connection
    /// behind it, e.g. for filter state).
    pub fn has_stream_info(&self, id: u32) -> bool {
        matches!(
            self.contexts.get(&id),
            Some(Context::Http(_) | Context::Connection(_))
        )
    }

    pub fn stream_mut(&mut self, id: u32) -> Option<&mut Stream> {
        match self.contexts.get_mut(&id) {
            Some(Context::Http(s)) => Some(s),
            _ => None,
        }
    }

    pub fn root_mut(&mut self, id: u32) -> Option<&mut RootContext> {
        let root = self.root_of(id);
        match self.contexts.get_mut(&root) {
            Some(Context::Root(r)) => Some(r),
            _ => None,
        }
    }

    pub fn record(&mut self, call: HostCall, status: Status) -> Status {
        let context = self.context_id();
        self.calls.push(Recorded {
            context,
            call,
            status,
        });
        status
    }

    /// Deterministic bytes for `random_get` (splitmix64): runs repeat exactly.
    pub fn random_bytes(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            self.random_state = self.random_state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.random_state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_data_cas_follows_envoy() {
        let mut p = Process::new();
        assert_eq!(p.set_shared("vm", "k", b"a".to_vec(), 0), Status::Ok);
        let cas = p.shared[&("vm".to_string(), "k".to_string())].1;
        assert_ne!(cas, 0);
        assert_eq!(
            p.set_shared("vm", "k", b"b".to_vec(), cas + 1),
            Status::CasMismatch
        );
        assert_eq!(p.set_shared("vm", "k", b"b".to_vec(), cas), Status::Ok);
        assert_eq!(
            p.set_shared("vm", "k", b"c".to_vec(), cas),
            Status::CasMismatch
        );
        // Another vm_id is another namespace.
        assert_eq!(p.set_shared("other", "k", b"x".to_vec(), 12345), Status::Ok);
        assert_eq!(p.shared[&("vm".to_string(), "k".to_string())].0, b"b");
    }
}
