//! Reading what came back from a `dispatch_http_call` (the agent's calls).

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};

/// What came back from a callout.
pub struct CalloutResponse {
    /// `None` when Envoy failed the call itself (reset, connect failure, timeout, a response
    /// over its buffer limit).
    pub status: Option<u16>,
    pub body: Vec<u8>,
}

/// Reads the callout response in `on_http_call_response`. When Envoy fails a call it still
/// calls back, with no headers and no response maps; asking for `:status` then returns
/// BadArgument, on which the SDK panics and takes the whole VM down. So the header count is
/// checked first.
pub fn response(num_headers: usize, body_size: usize) -> CalloutResponse {
    response_head(num_headers, body_size, body_size)
}

/// [`response`] reading at most `max_body` bytes of the body.
pub fn response_head(num_headers: usize, body_size: usize, max_body: usize) -> CalloutResponse {
    let body_size = body_size.min(max_body);
    if num_headers == 0 {
        return CalloutResponse {
            status: None,
            body: Vec::new(),
        };
    }
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| s.parse().ok());
    let body = if body_size == 0 {
        Vec::new()
    } else {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    CalloutResponse { status, body }
}
