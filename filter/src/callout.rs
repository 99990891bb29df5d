//! Forwarding a query to the shim with `dispatch_http_call`, and reading the result.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};
use vmesh_api::paths::{content_type, header, shim};

use crate::config::Config;

/// Sends `query` to the shim's DoH forwarder. `transport` ("udp"/"tcp") tells the shim which
/// transport semantics the client asked with; DoH clients send none. Returns the callout
/// token, or `None` when Envoy refused the call (the caller answers SERVFAIL).
pub fn forward(cfg: &Config, query: &[u8], transport: Option<&str>) -> Option<u32> {
    let mut headers = vec![
        (":method", "POST"),
        (":path", shim::DNS_QUERY),
        (":authority", cfg.shim_authority.as_str()),
        ("content-type", content_type::DNS_MESSAGE),
        ("accept", content_type::DNS_MESSAGE),
    ];
    if let Some(t) = transport {
        headers.push((header::TRANSPORT, t));
    }
    let timeout = Duration::from_millis(cfg.forward_timeout_ms);
    match hostcalls::dispatch_http_call(&cfg.shim_cluster, headers, Some(query), vec![], timeout) {
        Ok(token) => Some(token),
        Err(e) => {
            log::warn!("forward to cluster {} not sent: {e:?}", cfg.shim_cluster);
            None
        }
    }
}

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
