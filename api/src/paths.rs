//! Paths, header names and content types, shared by the filter, the shim and the control plane.

/// The shim's local API (plain HTTP/1.1 and h2c on 127.0.0.1:15020), called by the filter.
pub mod shim {
    /// RFC 8484 DNS over HTTP: a query the filter does not answer, relayed to the VM's resolvers.
    pub const DNS_QUERY: &str = "/dns-query";
    /// Long-poll of the VM's name table (same shape as the control plane's).
    pub const NAME_TABLE: &str = "/v1/name-table";
    /// The filter's agent reports liveness (and registers) here; see [`crate::agent`].
    pub const AGENT_REPORT: &str = "/v1/agent/report";
    /// What the shim knows: registration, health, table, last contact (`vmesh-shim status`).
    pub const STATUS: &str = "/v1/status";
    /// Prometheus text.
    pub const METRICS: &str = "/metrics";
    pub const HEALTHZ: &str = "/healthz";
}

/// The control plane's HTTPS API (`docs/protocol.md`).
pub mod control {
    pub const REGISTER: &str = "/v1/register";
    pub const HEARTBEAT: &str = "/v1/heartbeat";
    pub const HEALTH: &str = "/v1/health";
    pub const DEREGISTER: &str = "/v1/deregister";
    pub const NAME_TABLE: &str = "/v1/name-table";
    pub const ADMIN_APPLY: &str = "/v1/admin/apply";
    pub const ADMIN_TOKENS: &str = "/v1/admin/tokens";
    /// Followed by `KIND[/NAMESPACE[/NAME]]`.
    pub const ADMIN_OBJECTS: &str = "/v1/admin/objects/";
    pub const JWKS: &str = "/.well-known/jwks.json";
    pub const METRICS: &str = "/metrics";
    pub const HEALTHZ: &str = "/healthz";
}

/// Header names (lower case, as HTTP/2 sends them).
pub mod header {
    /// How the DNS client asked the filter: `udp` or `tcp` (absent: a DoH client).
    pub const TRANSPORT: &str = "x-vmesh-transport";
    /// The name table version of a long-poll answer (200 and 304).
    pub const TABLE_VERSION: &str = "x-vmesh-table-version";
}

/// Query parameters of the name-table long-poll.
pub mod query {
    pub const VERSION: &str = "version";
    pub const WAIT: &str = "wait";
    /// The admin credential's choice of namespace.
    pub const NAMESPACE: &str = "namespace";
}

/// Content types.
pub mod content_type {
    pub const DNS_MESSAGE: &str = "application/dns-message";
    pub const JSON: &str = "application/json";
    pub const PROMETHEUS: &str = "text/plain; version=0.0.4";
}

/// Name-table long-poll waits, in seconds: the default when the client names none, and the most
/// a client may ask for.
pub const DEFAULT_TABLE_WAIT_SECS: u64 = 30;
pub const MAX_TABLE_WAIT_SECS: u64 = 120;
