//! The VM calls of the control plane's HTTPS API, as `docs/protocol.md` describes them for
//! client authors. The control plane serves them; the shim (and the CLI, tests and benchmark)
//! call them.
//!
//! Requests refuse unknown fields (a typo is a 400, not silently ignored); responses are read
//! leniently, so a newer control plane may add fields.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::probe::ReadinessProbe;

/// `POST /v1/register`: join the mesh as a WorkloadEntry of `group`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterRequest {
    pub group: String,
    /// The group's namespace; defaults to the token's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// The VM's IP (v4 or v6).
    pub address: String,
    /// Overrides the template's network.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    /// `region/zone/subzone`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
    /// Merged over the group's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A WorkloadEntry by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for EntryRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    pub workload_entry: EntryRef,
    /// Send a heartbeat this often.
    pub heartbeat_interval_seconds: u64,
    /// Silence after which the control plane counts the VM as disconnected.
    pub liveness_timeout_seconds: u64,
    /// The group's probe with Istio's defaults filled in; absent when the group has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ReadinessProbe>,
    /// This registration's number (the control plane's clock, ns since the epoch): health
    /// reports carry it with their own sequence. 0 from servers that predate it.
    #[serde(default)]
    pub registration: u64,
}

/// The answer to `POST /v1/heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatResponse {
    /// The registration number of this connection, as [`RegisterResponse::registration`]; a
    /// client of a manual WorkloadEntry (which never registers) takes it from here.
    #[serde(default)]
    pub registration: u64,
}

/// `POST /v1/heartbeat` and `POST /v1/deregister`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntryRequest {
    pub namespace: String,
    pub name: String,
}

impl From<&EntryRef> for EntryRequest {
    fn from(e: &EntryRef) -> Self {
        EntryRequest {
            namespace: e.namespace.clone(),
            name: e.name.clone(),
        }
    }
}

/// `POST /v1/health`.
///
/// The control plane stamps `lastProbeTime` with its own clock and orders reports by
/// `(registration, sequence)`, so a VM's clock can neither freeze the entry's health nor make
/// it deaf. Reports without a sequence (clients older than it) are taken in arrival order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthRequest {
    pub namespace: String,
    pub name: String,
    pub healthy: bool,
    #[serde(default)]
    pub message: String,
    /// The `registration` of the register (or heartbeat) answer this report belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<u64>,
    /// Increases with every report of one registration; a report not after the recorded one
    /// is ignored, so retrying is always safe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// Optional, RFC 3339: when the VM ran the probe. Only checked (a time more than
    /// [`HEALTH_FUTURE_LEEWAY_SECS`] ahead of the control plane's clock is refused); never
    /// recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub probe_time: String,
}

/// How far ahead of the control plane's clock a health report's times may be.
pub const HEALTH_FUTURE_LEEWAY_SECS: u64 = 30;

/// Longest `message` a health report may carry, in bytes.
pub const MAX_HEALTH_MESSAGE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthResponse {
    /// False when an equal or newer probe result was already recorded.
    pub applied: bool,
}

/// The `error` of an error body: what kind of refusal, and so what a client does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// 400: malformed or invalid request; do not retry unchanged.
    BadRequest,
    /// 400: refused config (`apply`).
    Invalid,
    /// 401: no token or a refused one; retry with a new token.
    Unauthorized,
    /// 403: the identity does not match; retry when the token or the config changes.
    Forbidden,
    /// 404: no such group, entry, object or route.
    NotFound,
    /// 405.
    MethodNotAllowed,
    /// 409: a manual entry of that name exists, or writers kept racing.
    Conflict,
    /// 408: the request body did not arrive in time; retry, on a faster path.
    Timeout,
    /// 431: the bearer token (or another header) is over the size limit; do not retry unchanged.
    HeaderTooLarge,
    /// 503: the store cannot commit or read; retry with backoff.
    Unavailable,
    /// 415: a gRPC method called without gRPC's content type.
    UnsupportedMediaType,
    /// A kind this client does not know (a newer server), or no error body at all.
    #[serde(other)]
    Unknown,
}

impl ErrorKind {
    /// The wire name (`bad_request`, `not_found`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Timeout => "timeout",
            ErrorKind::HeaderTooLarge => "header_too_large",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::UnsupportedMediaType => "unsupported_media_type",
            ErrorKind::Unknown => "unknown",
        }
    }

    /// The HTTP status this kind is sent with.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest | ErrorKind::Invalid => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::Conflict => 409,
            ErrorKind::Timeout => 408,
            ErrorKind::HeaderTooLarge => 431,
            ErrorKind::Unavailable => 503,
            ErrorKind::UnsupportedMediaType => 415,
            ErrorKind::Unknown => 500,
        }
    }

    /// Whether the same request may succeed later without anything changing (503, 408 and
    /// unknown server errors); connection errors are retried the same way.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorKind::Unavailable | ErrorKind::Unknown | ErrorKind::Timeout
        )
    }
}

/// Every non-2xx response's body (but 304).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    /// The HTTP status (not in the body).
    #[serde(skip)]
    pub status: u16,
    pub error: ErrorKind,
    pub message: String,
    /// The JSON path of the offending field (`""` for the body itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For refused config: the document's source and 0-based index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

impl ApiError {
    pub fn new(error: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            status: error.status(),
            error,
            message: message.into(),
            field: None,
            source: None,
            index: None,
        }
    }

    /// A 400 about one field.
    pub fn bad(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field.to_string()),
            ..ApiError::new(ErrorKind::BadRequest, message)
        }
    }

    /// Reads an error response; a body that is not an error body still gives the status and
    /// what the body said. Native clients only (the `native` feature).
    #[cfg(feature = "native")]
    pub fn from_response(status: u16, body: &[u8]) -> Self {
        match serde_json::from_slice::<ApiError>(body) {
            Ok(e) => ApiError { status, ..e },
            Err(_) => ApiError {
                status,
                error: ErrorKind::Unknown,
                message: String::from_utf8_lossy(body)
                    .trim()
                    .chars()
                    .take(512)
                    .collect(),
                field: None,
                source: None,
                index: None,
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(feature = "native")]
    fn error_bodies_round_trip_and_unknown_kinds_are_kept_apart() {
        let e = ApiError::bad("address", "must be an IP address");
        let body = serde_json::to_vec(&e).unwrap();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"error":"bad_request","message":"must be an IP address","field":"address"}"#
        );
        assert_eq!(ApiError::from_response(400, &body), e);
        for kind in [
            ErrorKind::BadRequest,
            ErrorKind::Invalid,
            ErrorKind::Unauthorized,
            ErrorKind::Forbidden,
            ErrorKind::NotFound,
            ErrorKind::MethodNotAllowed,
            ErrorKind::Conflict,
            ErrorKind::Unavailable,
            ErrorKind::Unknown,
        ] {
            let wire = serde_json::to_value(kind).unwrap();
            assert_eq!(wire, kind.as_str(), "{kind:?}");
        }
        let newer =
            ApiError::from_response(429, br#"{"error":"rate_limited","message":"slow down"}"#);
        assert_eq!(newer.error, ErrorKind::Unknown);
        assert_eq!(newer.status, 429);
        let html = ApiError::from_response(502, b"<html>bad gateway</html>");
        assert_eq!(
            (html.error, html.message.as_str()),
            (ErrorKind::Unknown, "<html>bad gateway</html>")
        );
    }

    #[test]
    fn requests_refuse_unknown_fields_and_responses_ignore_them() {
        let typo = r#"{"group":"g","adress":"10.0.0.1"}"#;
        assert!(serde_json::from_str::<RegisterRequest>(typo).is_err());
        let newer = r#"{"workloadEntry":{"namespace":"ns","name":"g-10.0.0.1"},"heartbeatIntervalSeconds":5,"livenessTimeoutSeconds":15,"extra":1}"#;
        let r: RegisterResponse = serde_json::from_str(newer).unwrap();
        assert_eq!(r.workload_entry.to_string(), "ns/g-10.0.0.1");
    }
}
