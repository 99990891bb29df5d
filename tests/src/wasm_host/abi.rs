//! proxy-wasm ABI 0.2.1 values as the host sees them, and the pairs wire format
//! (proxy-wasm-cpp-host `pairs_util.cc`): u32 count, count x (u32 key len, u32 value len), then
//! each key and value followed by a NUL byte, all little-endian.

/// `WasmResult` returned by every `proxy_*` host call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    BadExpression = 5,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    ResultMismatch = 9,
    InternalFailure = 10,
    BrokenConnection = 11,
    Unimplemented = 12,
}

/// The value a `proxy_on_request_*`, `proxy_on_new_connection` or `proxy_on_*_data` callback
/// returned (for a network filter, Pause is Envoy's `StopIteration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
    /// A value the SDK never returns; kept so a test can say what it was.
    Other(u32),
}

impl Action {
    pub(crate) fn from_raw(v: i32) -> Self {
        match v {
            0 => Action::Continue,
            1 => Action::Pause,
            other => Action::Other(other as u32),
        }
    }
}

macro_rules! abi_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $value:expr),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub(crate) fn from_raw(v: i32) -> Option<Self> {
                match v {
                    $($value => Some($name::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

abi_enum!(
    /// Log levels as Envoy's spdlog numbers them.
    LogLevel { Trace = 0, Debug = 1, Info = 2, Warn = 3, Error = 4, Critical = 5 }
);
abi_enum!(BufferType {
    HttpRequestBody = 0,
    HttpResponseBody = 1,
    DownstreamData = 2,
    UpstreamData = 3,
    HttpCallResponseBody = 4,
    GrpcReceiveBuffer = 5,
    VmConfiguration = 6,
    PluginConfiguration = 7,
    CallData = 8,
});
abi_enum!(MapType {
    HttpRequestHeaders = 0,
    HttpRequestTrailers = 1,
    HttpResponseHeaders = 2,
    HttpResponseTrailers = 3,
    GrpcReceiveInitialMetadata = 4,
    GrpcReceiveTrailingMetadata = 5,
    HttpCallResponseHeaders = 6,
    HttpCallResponseTrailers = 7,
});
abi_enum!(StreamType {
    HttpRequest = 0,
    HttpResponse = 1,
    Downstream = 2,
    Upstream = 3,
});
/// Who closed a connection, as `proxy_on_downstream_connection_close` reports it (the host
/// only passes it to the module, so it needs no decoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerType {
    Unknown = 0,
    Local = 1,
    Remote = 2,
}
abi_enum!(MetricType {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
});

/// Header pairs, in order, as strings (Envoy's header maps hold bytes; these tests only need text).
pub type Pairs = Vec<(String, String)>;

/// Envoy refuses larger pair blobs (proxy-wasm-cpp-host `limits.h`).
const PAIRS_MAX_BYTES: usize = 1024 * 1024;
const PAIRS_MAX_COUNT: usize = 1024;

pub fn encode_pairs(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Decodes pairs like Envoy's `PairsUtil::toPairs`: anything malformed or over the limits is
/// an empty list, not an error.
pub fn decode_pairs(buf: &[u8]) -> Pairs {
    decode_pairs_checked(buf).unwrap_or_default()
}

fn decode_pairs_checked(buf: &[u8]) -> Option<Pairs> {
    if buf.len() > PAIRS_MAX_BYTES {
        return None;
    }
    let word = |at: usize| -> Option<usize> {
        let b = buf.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = word(0)?;
    if count > PAIRS_MAX_COUNT {
        return None;
    }
    let mut pos = 4 + count * 8;
    if pos > buf.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let (klen, vlen) = (word(4 + i * 8)?, word(8 + i * 8)?);
        let key = buf.get(pos..pos + klen)?;
        if buf.get(pos + klen) != Some(&0) {
            return None;
        }
        pos += klen + 1;
        let value = buf.get(pos..pos + vlen)?;
        if buf.get(pos + vlen) != Some(&0) {
            return None;
        }
        pos += vlen + 1;
        pairs.push((
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    (pos == buf.len()).then_some(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_malformed_blobs_decode_to_nothing() {
        let pairs = vec![
            (":path".to_string(), "/x".to_string()),
            ("empty".to_string(), String::new()),
        ];
        let blob = encode_pairs(&pairs);
        assert_eq!(decode_pairs(&blob), pairs);
        assert!(decode_pairs(&blob[..blob.len() - 1]).is_empty());
        let mut trailing = blob.clone();
        trailing.push(0);
        assert!(decode_pairs(&trailing).is_empty());
        assert!(decode_pairs(&[]).is_empty());
    }
}
