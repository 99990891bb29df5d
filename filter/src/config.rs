//! Plugin configuration: JSON in the Envoy `configuration` field, parsed and validated once in
//! `on_configure`. Every field has a default, so an empty configuration is valid.

use vmesh_core::json::{JsonErrorKind, Reader};
use vmesh_core::names::{canonical_host, DEFAULT_DOMAIN};

/// Which part of the filter a root context runs, chosen by the plugin's `root_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Bootstrap singleton: keeps the name table in sync and publishes it to workers.
    Agent,
    /// HTTP filter on worker threads: answers DNS over HTTPS (RFC 8484).
    Dns,
    /// Network filter in front of echo on the internal listener udp_proxy tunnels to:
    /// answers UDP DNS carried in an HTTP/1.1 POST tunnel as RFC 9297 capsules.
    DnsUdp,
    /// Network filter in front of echo on the TCP DNS listener: RFC 1035 framing.
    DnsTcp,
    /// Network filter on the VM's outbound listener (15001): original destination -> the
    /// decision `set_filter_state` hands to `tcp_proxy` (`vmesh_api::traffic`).
    Outbound,
    /// Network filter on an east-west gateway's 15443 listener: SNI -> an endpoint of the
    /// gateway's own network, TLS passed through ([`crate::gateway`]).
    Gateway,
}

/// The root ids, in the order [`ConfigError::UnknownRootId`] lists them.
pub const ROOT_IDS: [&str; 6] = [
    "vmesh_agent",
    "vmesh_dns",
    "vmesh_dns_udp",
    "vmesh_dns_tcp",
    vmesh_api::traffic::roots::OUTBOUND,
    vmesh_api::traffic::roots::GATEWAY,
];

impl Role {
    pub fn from_root_id(root_id: &str) -> Result<Self, ConfigError> {
        match root_id {
            "vmesh_agent" => Ok(Role::Agent),
            "vmesh_dns" => Ok(Role::Dns),
            "vmesh_dns_udp" => Ok(Role::DnsUdp),
            "vmesh_dns_tcp" => Ok(Role::DnsTcp),
            vmesh_api::traffic::roots::OUTBOUND => Ok(Role::Outbound),
            vmesh_api::traffic::roots::GATEWAY => Ok(Role::Gateway),
            other => Err(ConfigError::UnknownRootId(other.to_string())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Envoy cluster of the shim (forwarder and name-table source). The forwarding stream
    /// names it as its gRPC target, which restricts its first character (see `validate`).
    pub shim_cluster: String,
    pub shim_authority: String,
    /// Names inside this domain get SERVFAIL until the first table arrives.
    pub cluster_domain: String,
    /// How long a forwarded query may take before the client gets SERVFAIL. The shim is given
    /// five sixths of what is left (and its own 5 s cap), so its answer (possibly SERVFAIL)
    /// wins.
    pub forward_timeout_ms: u64,
    /// Long-poll wait asked of the table source.
    pub table_wait_s: u64,
    /// How often workers look for a newly published table.
    pub table_check_ms: u64,
    /// Envoy cluster of Envoy's own admin endpoint: the agent asks its `/ready`.
    pub admin_cluster: String,
    /// ORIGINAL_DST cluster (`use_http_header`) the agent's httpGet probes go through.
    pub probe_cluster: String,
    /// How often the agent reports to the shim.
    pub report_period_ms: u64,
    /// How often a UDP tunnel with a forward in flight gets a keepalive, so that udp_proxy's
    /// session idle timeout (1 s in vm-sidecar.yaml) cannot end it before the answer arrives.
    /// Must stay well under that timeout.
    pub udp_keepalive_ms: u64,
    pub log_level: LogLevel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("root_id {0:?} is not one of {ROOT_IDS:?}")]
    UnknownRootId(String),
    #[error("configuration is not valid JSON for vmesh: {0}")]
    Json(String),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl Default for Config {
    fn default() -> Self {
        Config {
            shim_cluster: "vmesh_shim".into(),
            shim_authority: "vmesh-shim".into(),
            cluster_domain: DEFAULT_DOMAIN.into(),
            forward_timeout_ms: 6000,
            table_wait_s: 30,
            table_check_ms: 250,
            admin_cluster: "vmesh_admin".into(),
            probe_cluster: "vmesh_probe".into(),
            report_period_ms: 1000,
            udp_keepalive_ms: 250,
            log_level: LogLevel::Info,
        }
    }
}

impl Config {
    /// Parses and validates the plugin configuration. Unknown fields are refused: a typo must
    /// not silently fall back to a default.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let mut cfg = Config::default();
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(cfg);
        }
        let json = |e: vmesh_core::json::JsonError| ConfigError::Json(e.to_string());
        let mut r = Reader::new(bytes);
        r.begin_object().map_err(json)?;
        let mut first = true;
        let mut seen: Vec<String> = Vec::new();
        while let Some(key) = r.next_key(&mut first).map_err(json)? {
            if seen.iter().any(|k| *k == key) {
                return Err(json(
                    r.error(JsonErrorKind::DuplicateField(key.into_owned())),
                ));
            }
            match key.as_ref() {
                "shim_cluster" => cfg.shim_cluster = r.string().map_err(json)?.into_owned(),
                "shim_authority" => cfg.shim_authority = r.string().map_err(json)?.into_owned(),
                "cluster_domain" => cfg.cluster_domain = r.string().map_err(json)?.into_owned(),
                "forward_timeout_ms" => cfg.forward_timeout_ms = r.u64().map_err(json)?,
                "table_wait_s" => cfg.table_wait_s = r.u64().map_err(json)?,
                "table_check_ms" => cfg.table_check_ms = r.u64().map_err(json)?,
                "admin_cluster" => cfg.admin_cluster = r.string().map_err(json)?.into_owned(),
                "probe_cluster" => cfg.probe_cluster = r.string().map_err(json)?.into_owned(),
                "report_period_ms" => cfg.report_period_ms = r.u64().map_err(json)?,
                "udp_keepalive_ms" => cfg.udp_keepalive_ms = r.u64().map_err(json)?,
                "log_level" => {
                    cfg.log_level = match r.string().map_err(json)?.as_ref() {
                        "trace" => LogLevel::Trace,
                        "debug" => LogLevel::Debug,
                        "info" => LogLevel::Info,
                        "warn" => LogLevel::Warn,
                        "error" => LogLevel::Error,
                        other => {
                            return Err(ConfigError::Invalid {
                                field: "log_level",
                                reason: format!(
                                    "{other:?} is not one of trace, debug, info, warn, error"
                                ),
                            })
                        }
                    }
                }
                other => {
                    return Err(json(
                        r.error(JsonErrorKind::UnknownField(other.to_string())),
                    ))
                }
            }
            seen.push(key.into_owned());
        }
        r.end().map_err(json)?;
        cfg.validate()
    }

    fn validate(self) -> Result<Self, ConfigError> {
        let mut cfg = self;
        cfg.cluster_domain =
            canonical_host(&cfg.cluster_domain, false).map_err(|reason| ConfigError::Invalid {
                field: "cluster_domain",
                reason: reason.to_string(),
            })?;
        let range = |field, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    field,
                    reason: format!("{v} is outside {lo}..={hi}"),
                })
            }
        };
        range("forward_timeout_ms", cfg.forward_timeout_ms, 100, 60_000)?;
        range("table_wait_s", cfg.table_wait_s, 1, 120)?;
        range("table_check_ms", cfg.table_check_ms, 10, 60_000)?;
        range("report_period_ms", cfg.report_period_ms, 100, 60_000)?;
        range("udp_keepalive_ms", cfg.udp_keepalive_ms, 10, 10_000)?;
        // Envoy reads a gRPC target as a serialized GrpcService first and as a cluster name
        // only when that fails to parse; a name that parses would make Envoy answer
        // BadArgument, on which the SDK panics. A first byte whose protobuf wire type is 6 or
        // 7 (none exists) can never parse: `vmesh_shim` starts with 0x76, wire type 6.
        if cfg
            .shim_cluster
            .bytes()
            .next()
            .is_some_and(|b| b >= 0x80 || b & 7 < 6)
        {
            return Err(ConfigError::Invalid {
                field: "shim_cluster",
                reason: "must start with one of &'./67>?FGNOVW^_fgnovw~ (gRPC target)".into(),
            });
        }
        for (field, v) in [
            ("shim_cluster", &cfg.shim_cluster),
            ("shim_authority", &cfg.shim_authority),
            ("admin_cluster", &cfg.admin_cluster),
            ("probe_cluster", &cfg.probe_cluster),
        ] {
            if v.is_empty() {
                return Err(ConfigError::Invalid {
                    field,
                    reason: "must not be empty".into(),
                });
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_configuration_means_defaults() {
        let cfg = Config::parse(b"").unwrap();
        assert_eq!(cfg.shim_cluster, "vmesh_shim");
        assert_eq!(cfg.cluster_domain, "cluster.local");
        assert_eq!(
            (cfg.admin_cluster.as_str(), cfg.probe_cluster.as_str()),
            ("vmesh_admin", "vmesh_probe")
        );
        assert_eq!(cfg.report_period_ms, 1000);
        assert_eq!(Config::parse(b"{}").unwrap(), cfg);
    }

    #[test]
    fn bad_configurations_are_refused_with_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"shim_clutser":"x"}"#, "unknown field"),
            (r#"{"forward_timeout_ms":5}"#, "forward_timeout_ms"),
            (r#"{"cluster_domain":"a..b"}"#, "cluster_domain"),
            (r#"{"log_level":"loud"}"#, "log_level"),
            (r#"{"table_wait_s":1.5}"#, "integer"),
            (r#"{"udp_keepalive_ms":0}"#, "udp_keepalive_ms"),
            (r#"{"table_wait_s":5,"table_wait_s":6}"#, "duplicate"),
            (r#"{"shim_cluster":""}"#, "shim_cluster"),
            (r#"{"shim_cluster":"shim"}"#, "shim_cluster"),
            (r#"{"admin_cluster":""}"#, "admin_cluster"),
            (r#"{"probe_cluster":""}"#, "probe_cluster"),
            (r#"{"report_period_ms":99}"#, "report_period_ms"),
            (r#"{"report_period_ms":60001}"#, "report_period_ms"),
            ("not json", "not valid JSON"),
        ];
        for (json, want) in cases {
            let err = Config::parse(json.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
    }

    #[test]
    fn roles_come_from_root_ids() {
        assert_eq!(Role::from_root_id("vmesh_agent"), Ok(Role::Agent));
        assert_eq!(Role::from_root_id("vmesh_dns"), Ok(Role::Dns));
        assert_eq!(Role::from_root_id("vmesh_dns_udp"), Ok(Role::DnsUdp));
        assert_eq!(Role::from_root_id("vmesh_dns_tcp"), Ok(Role::DnsTcp));
        assert_eq!(Role::from_root_id("vmesh_outbound"), Ok(Role::Outbound));
        let err = Role::from_root_id("dns").unwrap_err().to_string();
        assert!(err.contains("vmesh_dns_tcp"), "{err}");
        assert!(Role::from_root_id("dns").is_err());
    }
}
