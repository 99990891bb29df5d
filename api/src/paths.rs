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
    /// Workload certificates issued recently (newest first).
    pub const ADMIN_CERTIFICATES: &str = "/v1/admin/certificates";
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

/// Query parameters of the name-table long-poll, and reading and writing query strings.
pub mod query {
    pub const VERSION: &str = "version";
    pub const WAIT: &str = "wait";
    /// The admin credential's choice of namespace.
    pub const NAMESPACE: &str = "namespace";
    /// The client's network (`ISTIO_META_NETWORK`), echoed in the table's `network`.
    pub const NETWORK: &str = "network";
    /// The client's locality (`region/zone/subzone`), echoed in the table's `locality`.
    pub const LOCALITY: &str = "locality";

    /// `s` percent-encoded for a query value (RFC 3986 unreserved characters stay as they are;
    /// versions are opaque strings).
    pub fn encode(s: &str) -> String {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                out.push(char::from(b));
            } else {
                out.push('%');
                for nibble in [b >> 4, b & 0xF] {
                    out.push(char::from(
                        HEX.get(usize::from(nibble)).copied().unwrap_or(b'0'),
                    ));
                }
            }
        }
        out
    }

    /// The first value of `name` in a query string, decoded as HTML forms encode
    /// (`application/x-www-form-urlencoded`, WHATWG URL: `+` is a space, a `%` not followed
    /// by two hex digits stays as it is, invalid UTF-8 becomes U+FFFD). Native code only (the
    /// `native` feature); the filter only writes query strings.
    #[cfg(feature = "native")]
    pub fn param(query: Option<&str>, name: &str) -> Option<String> {
        form_urlencoded::parse(query?.as_bytes())
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn rfc3986_values_are_encoded() {
            assert_eq!(encode("v1-a.b_c~"), "v1-a.b_c~");
            assert_eq!(encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        }

        #[test]
        #[cfg(feature = "native")]
        fn values_round_trip_and_first_wins() {
            for v in ["a b&c=d", "68083db4~e77b6f16", "é%"] {
                let q = format!("x=1&version={}", encode(v));
                assert_eq!(param(Some(&q), VERSION).as_deref(), Some(v));
            }
            let q = Some("version=v%201&wait=5&dns=AAAB-_&version=other&flag");
            assert_eq!(param(q, VERSION).as_deref(), Some("v 1"));
            assert_eq!(param(q, WAIT).as_deref(), Some("5"));
            assert_eq!(param(q, "dns").as_deref(), Some("AAAB-_"));
            assert_eq!(param(q, "flag").as_deref(), Some(""));
            assert_eq!(param(q, "missing"), None);
            assert_eq!(param(None, "dns"), None);
            assert_eq!(param(Some("v=%zz"), "v").as_deref(), Some("%zz"));
            assert_eq!(param(Some("v=%4"), "v").as_deref(), Some("%4"));
            assert_eq!(param(Some("v=%FF"), "v").as_deref(), Some("\u{FFFD}"));
            assert_eq!(param(Some("k%65y=1"), "key").as_deref(), Some("1"));
            assert_eq!(param(Some("v=a+b"), "v").as_deref(), Some("a b"));
        }
    }
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
