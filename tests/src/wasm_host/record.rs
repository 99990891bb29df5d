//! What the module asked of the host: every host call with its arguments and the status it
//! got, in order. Tests assert on these, never on log text.

use super::abi::{BufferType, LogLevel, MapType, MetricType, Pairs, Status, StreamType};

/// One host call as the host received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostCall {
    Log {
        level: LogLevel,
        message: String,
    },
    GetLogLevel,
    GetCurrentTime,
    SetTickPeriod {
        millis: u32,
    },
    GetBuffer {
        buffer: BufferType,
        start: u32,
        max_size: u32,
    },
    SetBuffer {
        buffer: BufferType,
        start: u32,
        size: u32,
        data: Vec<u8>,
    },
    GetHeaderMapPairs {
        map: MapType,
    },
    SetHeaderMapPairs {
        map: MapType,
        pairs: Pairs,
    },
    GetHeaderMapValue {
        map: MapType,
        key: String,
    },
    AddHeaderMapValue {
        map: MapType,
        key: String,
        value: String,
    },
    ReplaceHeaderMapValue {
        map: MapType,
        key: String,
        value: String,
    },
    RemoveHeaderMapValue {
        map: MapType,
        key: String,
    },
    GetProperty {
        path: Vec<String>,
    },
    SetProperty {
        path: Vec<String>,
        value: Vec<u8>,
    },
    GetSharedData {
        key: String,
    },
    SetSharedData {
        key: String,
        value: Vec<u8>,
        cas: u32,
    },
    HttpCall(HttpCallRequest),
    SendLocalResponse(LocalResponse),
    ContinueStream {
        stream: StreamType,
    },
    CloseStream {
        stream: StreamType,
    },
    DefineMetric {
        kind: MetricType,
        name: String,
        id: u32,
    },
    IncrementMetric {
        id: u32,
        offset: i64,
    },
    RecordMetric {
        id: u32,
        value: u64,
    },
    GetMetric {
        id: u32,
    },
    GrpcStream {
        /// 0 when the host refused to open it.
        token: u32,
        cluster: String,
        service: String,
        method: String,
    },
    GrpcSend {
        token: u32,
        message: Vec<u8>,
        end_stream: bool,
    },
    GrpcClose {
        token: u32,
    },
    GrpcCancel {
        token: u32,
    },
    SetEffectiveContext {
        context: u32,
    },
    Done,
    GetStatus,
    /// An import the host provides only so the module links (gRPC, shared queues, foreign
    /// functions): it answers `Unimplemented`.
    Unsupported {
        name: &'static str,
    },
    /// A call with an argument out of the ABI's range (unknown buffer or map type...).
    BadEnum {
        name: &'static str,
        value: i32,
    },
    Wasi(WasiCall),
}

/// WASI calls; `errno` is what the host returned (0 = success).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WasiCall {
    RandomGet { len: u32, errno: u16 },
    EnvironSizesGet { errno: u16 },
    EnvironGet { errno: u16 },
    FdWrite { fd: u32, text: String, errno: u16 },
    ProcExit { code: u32 },
}

/// A host call, the context it was made in (after `proxy_set_effective_context`), and the
/// status the host returned (`Ok` for WASI calls, whose result is in [`WasiCall`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub context: u32,
    pub call: HostCall,
    pub status: Status,
}

/// A `proxy_http_call` as dispatched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCallRequest {
    /// 0 when the host refused the call.
    pub token: u32,
    pub upstream: String,
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
    pub timeout_ms: u32,
}

impl HttpCallRequest {
    /// First value of a header (names compare case-insensitively, as in Envoy).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// A `proxy_send_local_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Pairs,
    pub grpc_status: i32,
}

impl LocalResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// The response a test hands back for an HTTP callout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
}

impl HttpResponse {
    pub fn status(code: u16) -> Self {
        HttpResponse {
            headers: vec![(":status".into(), code.to_string())],
            body: Vec::new(),
            trailers: Vec::new(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
}

pub(crate) fn header<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}
