//! Command-line flags (each with an environment variable fallback) and their validation into
//! [`Settings`]. Every flag is checked and every problem reported together before the shim
//! binds anything, including reading resolv.conf and the name table file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::names::{NamesError, StaticNames};
use crate::upstream::{self, AddrError};

pub const ENV_LISTEN: &str = "VMESH_SHIM_LISTEN";
pub const ENV_RESOLV_CONF: &str = "VMESH_SHIM_RESOLV_CONF";
pub const ENV_UPSTREAMS: &str = "VMESH_SHIM_UPSTREAMS";
pub const ENV_SELF_ADDRS: &str = "VMESH_SHIM_SELF_ADDRS";
pub const ENV_FORWARD_TIMEOUT: &str = "VMESH_SHIM_FORWARD_TIMEOUT";
pub const ENV_STATIC_NAMES: &str = "VMESH_SHIM_STATIC_NAMES";
pub const ENV_LOG_LEVEL: &str = "VMESH_SHIM_LOG_LEVEL";

pub const DEFAULT_LISTEN: &str = "127.0.0.1:15020";
/// Envoy's DNS listener, where captured DNS traffic goes: never an upstream.
pub const DEFAULT_SELF_ADDR: &str = "127.0.0.1:15053";
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";

/// The flags of `vmesh-shim` (running the shim, the default command).
#[derive(Debug, Clone, Parser)]
#[command(name = "vmesh-shim", version, about)]
pub struct RunArgs {
    /// Address of the local HTTP API (HTTP/1.1 and h2c with prior knowledge).
    #[arg(long, env = ENV_LISTEN, default_value = DEFAULT_LISTEN, value_name = "IP:PORT")]
    pub listen: String,

    /// resolv.conf to read upstream resolvers from (its `nameserver` lines, port 53).
    #[arg(long, env = ENV_RESOLV_CONF, default_value = DEFAULT_RESOLV_CONF, value_name = "PATH")]
    pub resolv_conf: PathBuf,

    /// Upstream resolver; repeat for more, tried in order. Replaces resolv.conf entirely.
    #[arg(long = "upstream", env = ENV_UPSTREAMS, value_delimiter = ',', value_name = "IP:PORT")]
    pub upstreams: Vec<String>,

    /// An address that is this machine's own DNS front (never forwarded to); repeatable.
    #[arg(long = "self-addr", env = ENV_SELF_ADDRS, value_delimiter = ',',
        default_value = DEFAULT_SELF_ADDR, value_name = "IP:PORT")]
    pub self_addrs: Vec<String>,

    /// Total time to get an answer for one query, over all upstreams (e.g. 5s, 1500ms).
    #[arg(long, env = ENV_FORWARD_TIMEOUT, default_value = "5s", value_name = "DURATION")]
    pub forward_timeout: String,

    /// JSON name table file served at /v1/name-table; re-read when it changes.
    #[arg(long, env = ENV_STATIC_NAMES, value_name = "FILE")]
    pub static_names: Option<PathBuf>,

    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives.
    #[arg(long, env = ENV_LOG_LEVEL, default_value = "info", value_name = "FILTER")]
    pub log_level: String,
}

/// Validated configuration: everything needed to start, nothing left to check.
#[derive(Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub upstreams: Vec<SocketAddr>,
    pub forward_timeout: Duration,
    pub names: Option<StaticNames>,
    /// Set when the upstreams came from resolv.conf: the file to follow, and the addresses
    /// that are this machine's own DNS front (never used as upstreams).
    pub resolv_watch: Option<ResolvWatch>,
    /// Set in control-plane mode.
    pub control: Option<crate::ControlPlaneMode>,
}

/// resolv.conf as the source of the upstreams, followed while the shim runs: DHCP clients,
/// NetworkManager and cloud agents rewrite it, and the VM's DNS must follow.
#[derive(Debug, Clone)]
pub struct ResolvWatch {
    pub path: PathBuf,
    pub own: Vec<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--listen: {0}")]
    Listen(AddrError),
    #[error("--upstream: {0}")]
    Upstream(AddrError),
    #[error("--self-addr: {0}")]
    SelfAddr(AddrError),
    #[error("--forward-timeout {0:?}: expected a positive duration such as 5s or 1500ms")]
    ForwardTimeout(String),
    #[error("--log-level {text:?}: {reason}")]
    LogLevel { text: String, reason: String },
    #[error("--resolv-conf {path}: {source}")]
    ResolvConf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no upstream resolver left{detail}: the shim would have nowhere to forward DNS queries"
    )]
    NoUpstreams { detail: String },
    #[error("--static-names: {0}")]
    Names(NamesError),
}

/// All the problems found, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:{}", list(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn list(errors: &[ConfigError]) -> String {
    errors.iter().map(|e| format!("\n  - {e}")).collect()
}

impl RunArgs {
    /// Checks every flag, reads resolv.conf and the name table, and drops upstreams that are
    /// the shim itself. Warnings (skipped resolv.conf lines, dropped upstreams) are logged.
    pub fn validate(self) -> Result<Settings, ConfigErrors> {
        let mut errors = Vec::new();
        if let Err(reason) = EnvFilter::try_new(&self.log_level) {
            errors.push(ConfigError::LogLevel {
                text: self.log_level.clone(),
                reason: reason.to_string(),
            });
        }
        let listen = upstream::parse_socket_addr(&self.listen)
            .map_err(|e| errors.push(ConfigError::Listen(e)))
            .ok();
        let mut own: Vec<SocketAddr> = listen.into_iter().collect();
        for text in &self.self_addrs {
            match upstream::parse_socket_addr(text) {
                Ok(addr) => own.push(addr),
                Err(e) => errors.push(ConfigError::SelfAddr(e)),
            }
        }
        let forward_timeout = parse_duration(&self.forward_timeout)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| errors.push(ConfigError::ForwardTimeout(self.forward_timeout.clone())))
            .ok();

        let (candidates, source) = if self.upstreams.is_empty() {
            let found = read_resolv_conf(&self.resolv_conf).map_err(|source| {
                errors.push(ConfigError::ResolvConf {
                    path: self.resolv_conf.clone(),
                    source,
                })
            });
            (found.ok(), format!("in {}", self.resolv_conf.display()))
        } else {
            let mut addrs = Vec::new();
            for text in &self.upstreams {
                match upstream::parse_socket_addr(text) {
                    Ok(addr) => addrs.push(addr),
                    Err(e) => errors.push(ConfigError::Upstream(e)),
                }
            }
            (Some(addrs), "from --upstream".to_string())
        };
        let mut upstreams = Vec::new();
        if let Some(candidates) = candidates {
            let before = candidates.len();
            upstreams = without_self(candidates, &own);
            if upstreams.is_empty() {
                let detail = match before {
                    0 => format!(" (none {source})"),
                    n => format!(" ({n} {source}, all of them this machine's own DNS front)"),
                };
                errors.push(ConfigError::NoUpstreams { detail });
            }
        }

        let names = self.static_names.as_ref().and_then(|path| {
            StaticNames::load(path)
                .map_err(|e| errors.push(ConfigError::Names(e)))
                .ok()
        });

        let resolv_watch = self.upstreams.is_empty().then(|| ResolvWatch {
            path: self.resolv_conf.clone(),
            own,
        });
        match (listen, forward_timeout) {
            (Some(listen), Some(forward_timeout)) if errors.is_empty() => Ok(Settings {
                listen,
                upstreams,
                forward_timeout,
                names,
                resolv_watch,
                control: None,
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

/// `candidates` without the addresses that are this shim or its Envoy DNS listener (the shim
/// must never forward to itself), each dropped one logged.
pub fn without_self(candidates: Vec<SocketAddr>, own: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut upstreams = Vec::new();
    for addr in candidates {
        match own.iter().find(|o| upstream::is_self(addr, **o)) {
            Some(o) => tracing::warn!(upstream = %addr, own = %o,
                "dropping upstream resolver: it is this shim or its Envoy DNS listener"),
            None => upstreams.push(addr),
        }
    }
    upstreams
}

pub(crate) fn read_resolv_conf(path: &std::path::Path) -> std::io::Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(path)?;
    let parsed = upstream::parse_resolv_conf(&text, upstream::interface_index);
    for skipped in &parsed.skipped {
        tracing::warn!(path = %path.display(), %skipped, "resolv.conf line not used");
    }
    Ok(parsed.nameservers)
}

/// `1500ms`, `5s`, `2m`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_table() {
        let cases = [
            ("5s", Some(Duration::from_secs(5))),
            ("1500ms", Some(Duration::from_millis(1500))),
            ("2m", Some(Duration::from_secs(120))),
            ("7", Some(Duration::from_secs(7))),
            (" 3s ", Some(Duration::from_secs(3))),
            ("", None),
            ("s", None),
            ("1.5s", None),
            ("-1s", None),
            ("5h", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), want, "{text:?}");
        }
    }
}
