//! Plugin configuration: JSON in the Envoy `configuration` field, parsed and validated once in
//! `on_configure`. Every field has a default, so an empty configuration is valid.

use serde::Deserialize;
use vmesh_core::names::{canonical_host, DEFAULT_DOMAIN};

/// Which part of the filter a root context runs, chosen by the plugin's `root_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Bootstrap singleton: keeps the name table in sync and publishes it to workers.
    Agent,
    /// HTTP filter on worker threads: answers DNS.
    Dns,
}

impl Role {
    pub fn from_root_id(root_id: &str) -> Result<Self, ConfigError> {
        match root_id {
            "vmesh_agent" => Ok(Role::Agent),
            "vmesh_dns" => Ok(Role::Dns),
            other => Err(ConfigError::UnknownRootId(other.to_string())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Envoy cluster of the shim (forwarder and name-table source).
    #[serde(default = "defaults::shim_cluster")]
    pub shim_cluster: String,
    #[serde(default = "defaults::shim_authority")]
    pub shim_authority: String,
    /// Names inside this domain get SERVFAIL until the first table arrives.
    #[serde(default = "defaults::cluster_domain")]
    pub cluster_domain: String,
    /// How long a forwarded query may take before the client gets SERVFAIL. Longer than the
    /// shim's own 5 s upstream budget so the shim's answer (possibly SERVFAIL) wins.
    #[serde(default = "defaults::forward_timeout_ms")]
    pub forward_timeout_ms: u64,
    /// Long-poll wait asked of the table source.
    #[serde(default = "defaults::table_wait_s")]
    pub table_wait_s: u64,
    /// How often workers look for a newly published table.
    #[serde(default = "defaults::table_check_ms")]
    pub table_check_ms: u64,
    #[serde(default = "defaults::log_level")]
    pub log_level: LogLevel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("root_id {0:?} is neither \"vmesh_agent\" nor \"vmesh_dns\"")]
    UnknownRootId(String),
    #[error("configuration is not valid JSON for vmesh: {0}")]
    Json(String),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

mod defaults {
    use super::LogLevel;
    pub fn shim_cluster() -> String {
        "vmesh_shim".into()
    }
    pub fn shim_authority() -> String {
        "vmesh-shim".into()
    }
    pub fn cluster_domain() -> String {
        super::DEFAULT_DOMAIN.into()
    }
    pub fn forward_timeout_ms() -> u64 {
        6000
    }
    pub fn table_wait_s() -> u64 {
        30
    }
    pub fn table_check_ms() -> u64 {
        250
    }
    pub fn log_level() -> LogLevel {
        LogLevel::Info
    }
}

impl Config {
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::Json(e.to_string()))?;
        let mut cfg: Config = if text.trim().is_empty() {
            serde_json::from_str("{}")
        } else {
            serde_json::from_str(text)
        }
        .map_err(|e| ConfigError::Json(e.to_string()))?;
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
        for (field, v) in [
            ("shim_cluster", &cfg.shim_cluster),
            ("shim_authority", &cfg.shim_authority),
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
        assert_eq!(Config::parse(b"{}").unwrap(), cfg);
    }

    #[test]
    fn bad_configurations_are_refused_with_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"shim_clutser":"x"}"#, "unknown field"),
            (r#"{"forward_timeout_ms":5}"#, "forward_timeout_ms"),
            (r#"{"cluster_domain":"a..b"}"#, "cluster_domain"),
            (r#"{"log_level":"loud"}"#, "unknown variant"),
            (r#"{"shim_cluster":""}"#, "shim_cluster"),
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
        assert!(Role::from_root_id("dns").is_err());
    }
}
