//! Traffic capture: iptables rules that send the VM's DNS, outbound TCP and inbound TCP
//! through Envoy, as Istio's VM setup does, and their exact removal.
//!
//! The flow: [`CaptureArgs`] (flags, environment, optionally Istio's cluster.env) are checked
//! all at once into [`rules::Settings`]; [`rules::build`] turns those into the wanted rules of
//! each address family; [`plan`] compares them with what `iptables-save` prints and writes the
//! `iptables-restore --noflush` input that gets there; [`host`] runs the two commands. Only
//! the last step touches the system, and nothing is touched unless every check passed.

pub mod host;
pub mod plan;
pub mod rules;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::Args;

use host::{Commands, RunError};
use rules::{Cidr, Family, Inbound, Outbound, Ports, Settings};

pub const ENV_INBOUND_PORTS: &str = "ISTIO_INBOUND_PORTS";
pub const ENV_LOCAL_EXCLUDE_PORTS: &str = "ISTIO_LOCAL_EXCLUDE_PORTS";
pub const ENV_SERVICE_CIDR: &str = "ISTIO_SERVICE_CIDR";
pub const ENV_SERVICE_EXCLUDE_CIDR: &str = "ISTIO_SERVICE_EXCLUDE_CIDR";
pub const ENV_OUTBOUND_EXCLUDE_PORTS: &str = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE";
pub const ENV_PROXY_UIDS: &str = "ENVOY_USER";
pub const ENV_PROXY_GIDS: &str = "VMESH_CAPTURE_PROXY_GIDS";
pub const ENV_RESOLVER_UIDS: &str = "VMESH_CAPTURE_RESOLVER_UIDS";
pub const ENV_OUTBOUND_PORT: &str = "ENVOY_PORT";
pub const ENV_INBOUND_PORT: &str = "INBOUND_CAPTURE_PORT";
pub const ENV_DNS_PORT: &str = "VMESH_CAPTURE_DNS_PORT";
pub const ENV_DNS_CAPTURE: &str = "ISTIO_META_DNS_CAPTURE";
pub const ENV_IPV6: &str = "VMESH_CAPTURE_IPV6";
pub const ENV_CLUSTER_ENV: &str = "ISTIO_CLUSTER_CONFIG";
pub const ENV_IPTABLES: &str = "VMESH_CAPTURE_IPTABLES";
pub use crate::config::ENV_RESOLV_CONF;

pub const DEFAULT_LOCAL_EXCLUDE_PORTS: &str = "22,15020,15021,15090";
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
pub const DEFAULT_DNS_PORT: u16 = 15053;
/// The proxy's account, as Istio's VM packages create it; uid 1337 when it does not exist.
pub const DEFAULT_PROXY_USER: &str = "istio-proxy";
pub const FALLBACK_PROXY_UID: u32 = 1337;
/// systemd-resolved's account: its upstream queries are never captured.
pub const DEFAULT_RESOLVER_USER: &str = "systemd-resolve";

/// The flags of `capture install`. Every one also reads an environment variable and, when
/// `--cluster-env` names a file, that file; a flag beats the environment, which beats the file.
#[derive(Debug, Clone, Default, Args)]
pub struct CaptureArgs {
    /// Inbound TCP ports sent to Envoy's inbound listener: `*` for every port, a comma list,
    /// or empty for none [default: empty]
    #[arg(long, env = ENV_INBOUND_PORTS, value_name = "PORTS")]
    pub inbound_ports: Option<String>,

    /// Inbound ports never captured [default: 22,15020,15021,15090]
    #[arg(long, env = ENV_LOCAL_EXCLUDE_PORTS, value_name = "PORTS")]
    pub local_exclude_ports: Option<String>,

    /// Outbound TCP destinations sent to Envoy's outbound listener: `*` for all, a comma list
    /// of CIDRs (IPv4 and IPv6), or empty for none [default: *]
    #[arg(long, env = ENV_SERVICE_CIDR, value_name = "CIDRS")]
    pub service_cidr: Option<String>,

    /// Outbound destinations never captured (comma list of CIDRs) [default: empty]
    #[arg(long, env = ENV_SERVICE_EXCLUDE_CIDR, value_name = "CIDRS")]
    pub service_exclude_cidr: Option<String>,

    /// Outbound TCP ports never captured [default: empty]
    #[arg(long, env = ENV_OUTBOUND_EXCLUDE_PORTS, value_name = "PORTS")]
    pub outbound_exclude_ports: Option<String>,

    /// Users (names or uids) whose traffic is never captured: Envoy's and the shim's;
    /// repeatable or comma-separated [default: istio-proxy, or 1337 without that user]
    #[arg(long, env = ENV_PROXY_UIDS, value_delimiter = ',', value_name = "USER")]
    pub proxy_uid: Vec<String>,

    /// Groups (names or gids) whose traffic is never captured; repeatable [default: none]
    #[arg(long, env = ENV_PROXY_GIDS, value_delimiter = ',', value_name = "GROUP")]
    pub proxy_gid: Vec<String>,

    /// Users of a local caching resolver whose DNS queries are never captured; repeatable
    /// [default: systemd-resolve, when that user exists]
    #[arg(long, env = ENV_RESOLVER_UIDS, value_delimiter = ',', value_name = "USER")]
    pub resolver_uid: Vec<String>,

    /// Envoy's outbound listener [default: 15001]
    #[arg(long, env = ENV_OUTBOUND_PORT, value_name = "PORT")]
    pub outbound_port: Option<String>,

    /// Envoy's inbound listener [default: 15006]
    #[arg(long, env = ENV_INBOUND_PORT, value_name = "PORT")]
    pub inbound_port: Option<String>,

    /// Envoy's DNS listener (UDP and TCP) [default: 15053]
    #[arg(long, env = ENV_DNS_PORT, value_name = "PORT")]
    pub dns_port: Option<String>,

    /// Capture DNS to the resolv.conf nameservers: true or false [default: true]
    #[arg(long, env = ENV_DNS_CAPTURE, value_name = "BOOL")]
    pub dns_capture: Option<String>,

    /// resolv.conf naming the nameservers whose DNS is captured [default: /etc/resolv.conf]
    #[arg(long, env = ENV_RESOLV_CONF, value_name = "PATH")]
    pub resolv_conf: Option<PathBuf>,

    /// IPv6 rules (ip6tables): auto (when the machine has a global IPv6 address or an IPv6
    /// nameserver), on, or off [default: auto]
    #[arg(long, env = ENV_IPV6, value_name = "MODE")]
    pub ipv6: Option<String>,

    /// Istio's cluster.env (shell `KEY='value'` lines): read the settings above from it
    #[arg(long, env = ENV_CLUSTER_ENV, value_name = "PATH")]
    pub cluster_env: Option<PathBuf>,

    /// Which iptables: iptables (the system's choice), iptables-nft or iptables-legacy;
    /// ip6tables follows [default: iptables]
    #[arg(long, env = ENV_IPTABLES, value_name = "VARIANT")]
    pub iptables: Option<String>,

    /// Print the rules (as iptables-restore input) instead of installing them.
    #[arg(long)]
    pub dry_run: bool,
}

/// The flags of `capture remove`: it removes whatever vmesh installed, whatever the settings
/// were, so it needs none of them.
#[derive(Debug, Clone, Default, Args)]
pub struct RemoveArgs {
    /// Which iptables: iptables, iptables-nft or iptables-legacy [default: iptables]
    #[arg(long, env = ENV_IPTABLES, value_name = "VARIANT")]
    pub iptables: Option<String>,

    /// Print what would be deleted (as iptables-restore input) instead of deleting it.
    #[arg(long)]
    pub dry_run: bool,
}

/// A setting: its flag and its environment variable (also its cluster.env key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub flag: &'static str,
    pub env: &'static str,
}

const INBOUND_PORTS: Setting = Setting {
    flag: "--inbound-ports",
    env: ENV_INBOUND_PORTS,
};
const LOCAL_EXCLUDE_PORTS: Setting = Setting {
    flag: "--local-exclude-ports",
    env: ENV_LOCAL_EXCLUDE_PORTS,
};
const SERVICE_CIDR: Setting = Setting {
    flag: "--service-cidr",
    env: ENV_SERVICE_CIDR,
};
const SERVICE_EXCLUDE_CIDR: Setting = Setting {
    flag: "--service-exclude-cidr",
    env: ENV_SERVICE_EXCLUDE_CIDR,
};
const OUTBOUND_EXCLUDE_PORTS: Setting = Setting {
    flag: "--outbound-exclude-ports",
    env: ENV_OUTBOUND_EXCLUDE_PORTS,
};
const PROXY_UIDS: Setting = Setting {
    flag: "--proxy-uid",
    env: ENV_PROXY_UIDS,
};
const PROXY_GIDS: Setting = Setting {
    flag: "--proxy-gid",
    env: ENV_PROXY_GIDS,
};
const RESOLVER_UIDS: Setting = Setting {
    flag: "--resolver-uid",
    env: ENV_RESOLVER_UIDS,
};
const OUTBOUND_PORT: Setting = Setting {
    flag: "--outbound-port",
    env: ENV_OUTBOUND_PORT,
};
const INBOUND_PORT: Setting = Setting {
    flag: "--inbound-port",
    env: ENV_INBOUND_PORT,
};
const DNS_PORT: Setting = Setting {
    flag: "--dns-port",
    env: ENV_DNS_PORT,
};
const DNS_CAPTURE: Setting = Setting {
    flag: "--dns-capture",
    env: ENV_DNS_CAPTURE,
};
const RESOLV_CONF: Setting = Setting {
    flag: "--resolv-conf",
    env: ENV_RESOLV_CONF,
};
const IPV6: Setting = Setting {
    flag: "--ipv6",
    env: ENV_IPV6,
};
const IPTABLES: Setting = Setting {
    flag: "--iptables",
    env: ENV_IPTABLES,
};

/// The settings cluster.env may hold.
const FILE_SETTINGS: [Setting; 15] = [
    INBOUND_PORTS,
    LOCAL_EXCLUDE_PORTS,
    SERVICE_CIDR,
    SERVICE_EXCLUDE_CIDR,
    OUTBOUND_EXCLUDE_PORTS,
    PROXY_UIDS,
    PROXY_GIDS,
    RESOLVER_UIDS,
    OUTBOUND_PORT,
    INBOUND_PORT,
    DNS_PORT,
    DNS_CAPTURE,
    RESOLV_CONF,
    IPV6,
    IPTABLES,
];

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The flag or its environment variable.
    Given,
    File(PathBuf),
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Given => Ok(()),
            Origin::File(path) => write!(f, ", from {}", path.display()),
            Origin::Default => write!(f, ", the default"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("{} (${}{origin}): {why}", .setting.flag, .setting.env)]
    Invalid {
        setting: Setting,
        origin: Origin,
        why: String,
    },
    #[error("--cluster-env {path}: {source}")]
    ClusterEnvRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--cluster-env {path}: {error}")]
    ClusterEnvLine {
        path: PathBuf,
        error: crate::bundle::EnvLineError,
    },
    #[error("--resolv-conf {path}: {source}")]
    ResolvConf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "DNS capture is on but {path} names no usable nameserver: nothing to capture DNS for \
         (turn it off with --dns-capture false)"
    )]
    NoNameservers { path: PathBuf },
    #[error("--outbound-port, --inbound-port and --dns-port must be three different ports (got {outbound}, {inbound}, {dns})")]
    SamePorts {
        outbound: u16,
        inbound: u16,
        dns: u16,
    },
    #[error("{program} not found in PATH: {why}")]
    MissingProgram { program: String, why: String },
    #[error(
        "changing firewall rules needs root with CAP_NET_ADMIN; this process does not have it"
    )]
    NotPermitted,
}

/// Every problem found, reported together; nothing was changed.
#[derive(Debug, thiserror::Error)]
#[error("nothing changed:{}", list(.0))]
pub struct Problems(pub Vec<Problem>);

fn list(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("\n  - {p}")).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Invalid(#[from] Problems),
    #[error("{family}: {source} (the other family's rules, if any, are in place; run again)")]
    Apply {
        family: &'static str,
        #[source]
        source: RunError,
    },
}

/// A fully checked `capture install`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub settings: Settings,
    /// The families that get rules; the others lose any vmesh rules they have.
    pub families: Vec<Family>,
    /// Why IPv6 is or is not captured, for the summary.
    pub ipv6_reason: String,
    pub iptables: String,
    pub dry_run: bool,
}

/// What validation needs from the machine, so tests can supply their own.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub passwd: Option<String>,
    pub group: Option<String>,
    pub has_global_ipv6: bool,
}

impl Machine {
    pub fn this() -> Machine {
        Machine {
            passwd: host::read_db(host::PASSWD),
            group: host::read_db(host::GROUP),
            has_global_ipv6: crate::interfaces::has_global_ipv6(),
        }
    }
}

/// A value and where it came from.
struct Picked {
    text: String,
    origin: Origin,
}

/// Flag or environment, then cluster.env, then the default.
struct Sources {
    file: HashMap<String, String>,
    file_path: Option<PathBuf>,
}

impl Sources {
    fn pick(&self, given: Option<&str>, s: Setting, default: &str) -> Picked {
        if let Some(text) = given {
            return Picked {
                text: text.to_string(),
                origin: Origin::Given,
            };
        }
        match (self.file.get(s.env), &self.file_path) {
            (Some(text), Some(path)) => Picked {
                text: text.clone(),
                origin: Origin::File(path.clone()),
            },
            _ => Picked {
                text: default.to_string(),
                origin: Origin::Default,
            },
        }
    }

    fn port(
        &self,
        problems: &mut Vec<Problem>,
        given: &Option<String>,
        s: Setting,
        default: u16,
    ) -> u16 {
        let p = self.pick(given.as_deref(), s, &default.to_string());
        parse_port(p.text.trim())
            .map_err(|why| invalid(problems, s, &p, why))
            .unwrap_or(default)
    }

    /// For the repeatable flags: an empty list was not given.
    fn pick_list(&self, given: &[String], s: Setting) -> Option<Picked> {
        let given = (!given.is_empty()).then(|| given.join(","));
        let p = self.pick(given.as_deref(), s, "");
        (p.origin != Origin::Default).then_some(p)
    }
}

impl CaptureArgs {
    /// Checks every setting and reads cluster.env and resolv.conf; every problem is reported.
    /// Warnings (unused resolv.conf lines, IPv6 nameservers left alone) are logged.
    pub fn validate(&self, machine: &Machine) -> Result<Config, Problems> {
        let mut problems = Vec::new();
        let mut sources = Sources {
            file: HashMap::new(),
            file_path: self.cluster_env.clone(),
        };
        if let Some(path) = &self.cluster_env {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    // The same reader as the shim's bundle: a file the shim would refuse is
                    // refused here too.
                    let parsed = crate::bundle::parse_cluster_env(&text);
                    sources.file = parsed
                        .vars
                        .into_iter()
                        .filter(|(k, _)| FILE_SETTINGS.iter().any(|s| s.env == k))
                        .collect();
                    problems.extend(parsed.errors.into_iter().map(|error| {
                        Problem::ClusterEnvLine {
                            path: path.clone(),
                            error,
                        }
                    }));
                }
                Err(source) => problems.push(Problem::ClusterEnvRead {
                    path: path.clone(),
                    source,
                }),
            }
        }
        // Inbound.
        let p = sources.pick(self.inbound_ports.as_deref(), INBOUND_PORTS, "");
        let inbound = match p.text.trim() {
            "*" => Inbound::All,
            _ => match parse_ports(&p.text) {
                Ok(ports) if ports.is_empty() => Inbound::Off,
                Ok(ports) => Inbound::Ports(ports),
                Err(why) => {
                    invalid(&mut problems, INBOUND_PORTS, &p, why);
                    Inbound::Off
                }
            },
        };
        let p = sources.pick(
            self.local_exclude_ports.as_deref(),
            LOCAL_EXCLUDE_PORTS,
            DEFAULT_LOCAL_EXCLUDE_PORTS,
        );
        let inbound_exclude_ports = parse_ports(&p.text)
            .map_err(|why| invalid(&mut problems, LOCAL_EXCLUDE_PORTS, &p, why))
            .unwrap_or_default();

        // Outbound.
        let p = sources.pick(self.service_cidr.as_deref(), SERVICE_CIDR, "*");
        let outbound = match p.text.trim() {
            "*" => Outbound::All,
            _ => match parse_cidrs(&p.text) {
                Ok(cidrs) if cidrs.is_empty() => Outbound::Off,
                Ok(cidrs) => Outbound::Cidrs(cidrs),
                Err(why) => {
                    invalid(&mut problems, SERVICE_CIDR, &p, why);
                    Outbound::Off
                }
            },
        };
        let p = sources.pick(
            self.service_exclude_cidr.as_deref(),
            SERVICE_EXCLUDE_CIDR,
            "",
        );
        let outbound_exclude_cidrs = parse_cidrs(&p.text)
            .map_err(|why| invalid(&mut problems, SERVICE_EXCLUDE_CIDR, &p, why))
            .unwrap_or_default();
        let p = sources.pick(
            self.outbound_exclude_ports.as_deref(),
            OUTBOUND_EXCLUDE_PORTS,
            "",
        );
        let outbound_exclude_ports = parse_ports(&p.text)
            .map_err(|why| invalid(&mut problems, OUTBOUND_EXCLUDE_PORTS, &p, why))
            .unwrap_or_default();

        // Who is never captured.
        let passwd = machine.passwd.as_deref();
        let proxy_uids = match sources.pick_list(&self.proxy_uid, PROXY_UIDS) {
            Some(p) => parse_ids(&p.text, passwd)
                .map_err(|why| invalid(&mut problems, PROXY_UIDS, &p, why))
                .unwrap_or_default(),
            None => vec![passwd
                .and_then(|db| host::id_in(db, DEFAULT_PROXY_USER))
                .unwrap_or(FALLBACK_PROXY_UID)],
        };
        if proxy_uids.is_empty() && !problems.iter().any(is_about(PROXY_UIDS)) {
            let p = sources.pick(Some(""), PROXY_UIDS, "");
            invalid(
                &mut problems,
                PROXY_UIDS,
                &p,
                "at least one is needed: Envoy's own traffic would be captured again (a loop)"
                    .into(),
            );
        }
        let proxy_gids = match sources.pick_list(&self.proxy_gid, PROXY_GIDS) {
            Some(p) => parse_ids(&p.text, machine.group.as_deref())
                .map_err(|why| invalid(&mut problems, PROXY_GIDS, &p, why))
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let resolver_uids = match sources.pick_list(&self.resolver_uid, RESOLVER_UIDS) {
            Some(p) => parse_ids(&p.text, passwd)
                .map_err(|why| invalid(&mut problems, RESOLVER_UIDS, &p, why))
                .unwrap_or_default(),
            None => passwd
                .and_then(|db| host::id_in(db, DEFAULT_RESOLVER_USER))
                .into_iter()
                .collect(),
        };

        // Envoy's ports.
        let ports = Ports {
            outbound: sources.port(
                &mut problems,
                &self.outbound_port,
                OUTBOUND_PORT,
                DEFAULT_OUTBOUND_PORT,
            ),
            inbound: sources.port(
                &mut problems,
                &self.inbound_port,
                INBOUND_PORT,
                DEFAULT_INBOUND_PORT,
            ),
            dns: sources.port(&mut problems, &self.dns_port, DNS_PORT, DEFAULT_DNS_PORT),
        };

        // DNS.
        let p = sources.pick(self.dns_capture.as_deref(), DNS_CAPTURE, "true");
        let dns_capture = parse_bool(&p.text)
            .map_err(|why| invalid(&mut problems, DNS_CAPTURE, &p, why))
            .unwrap_or(true);
        let p = sources.pick(
            self.resolv_conf.as_deref().and_then(|p| p.to_str()),
            RESOLV_CONF,
            crate::config::DEFAULT_RESOLV_CONF,
        );
        let resolv_conf = PathBuf::from(&p.text);
        let mut dns_servers: Vec<IpAddr> = Vec::new();
        if dns_capture {
            match crate::config::read_resolv_conf(&resolv_conf) {
                Ok(found) => {
                    for addr in found {
                        let ip = addr.ip().to_canonical();
                        if !dns_servers.contains(&ip) {
                            dns_servers.push(ip);
                        }
                    }
                    if dns_servers.is_empty() {
                        problems.push(Problem::NoNameservers {
                            path: resolv_conf.clone(),
                        });
                    }
                }
                Err(source) => problems.push(Problem::ResolvConf {
                    path: resolv_conf.clone(),
                    source,
                }),
            }
        }

        // Families.
        let p = sources.pick(self.ipv6.as_deref(), IPV6, "auto");
        let v6_nameservers: Vec<IpAddr> = dns_servers
            .iter()
            .copied()
            .filter(|ip| Family::of(*ip) == Family::V6)
            .collect();
        let (ipv6, ipv6_reason) = match p.text.trim().to_ascii_lowercase().as_str() {
            "on" | "true" => (true, "IPv6 on".to_string()),
            "off" | "false" => (false, "IPv6 off".to_string()),
            "auto" if machine.has_global_ipv6 => (true, "a global IPv6 address".to_string()),
            "auto" if !v6_nameservers.is_empty() => (true, "an IPv6 nameserver".to_string()),
            "auto" => (
                false,
                "no global IPv6 address and no IPv6 nameserver".to_string(),
            ),
            _ => {
                problems.push(Problem::Invalid {
                    setting: IPV6,
                    origin: p.origin.clone(),
                    why: format!("{:?} is not auto, on or off", p.text),
                });
                (false, String::new())
            }
        };
        if !ipv6 && !v6_nameservers.is_empty() {
            tracing::warn!(nameservers = ?v6_nameservers,
                "IPv6 is off: DNS to these IPv6 nameservers is not captured");
        }
        let mut families = vec![Family::V4];
        if ipv6 {
            families.push(Family::V6);
        }

        let p = sources.pick(self.iptables.as_deref(), IPTABLES, "iptables");
        let iptables = p.text.trim().to_string();
        let known_variant = host::VARIANTS.contains(&iptables.as_str());
        if !known_variant {
            problems.push(Problem::Invalid {
                setting: IPTABLES,
                origin: p.origin,
                why: format!("{iptables:?} is not one of {}", host::VARIANTS.join(", ")),
            });
        }

        if ports.outbound == ports.inbound
            || ports.outbound == ports.dns
            || ports.inbound == ports.dns
        {
            problems.push(Problem::SamePorts {
                outbound: ports.outbound,
                inbound: ports.inbound,
                dns: ports.dns,
            });
        }

        // What the machine lacks is reported with the rest; a dry run needs none of it.
        if !self.dry_run {
            for family in families.iter().filter(|_| known_variant) {
                for program in Commands::of(&iptables, *family).missing() {
                    let why = match family {
                        Family::V4 => "install the iptables package".to_string(),
                        Family::V6 => format!("needed for IPv6 ({ipv6_reason}); install the iptables package or turn IPv6 off with --ipv6 off"),
                    };
                    problems.push(Problem::MissingProgram { program, why });
                }
            }
            if !host::this_process_may_admin_network() {
                problems.push(Problem::NotPermitted);
            }
        }

        if !problems.is_empty() {
            return Err(Problems(problems));
        }
        Ok(Config {
            settings: Settings {
                inbound,
                inbound_exclude_ports,
                outbound,
                outbound_exclude_cidrs,
                outbound_exclude_ports,
                proxy_uids,
                proxy_gids,
                resolver_uids,
                ports,
                dns_servers,
            },
            families,
            ipv6_reason,
            iptables,
            dry_run: self.dry_run,
        })
    }
}

fn invalid(problems: &mut Vec<Problem>, setting: Setting, p: &Picked, why: String) {
    problems.push(Problem::Invalid {
        setting,
        origin: p.origin.clone(),
        why,
    });
}

fn is_about(setting: Setting) -> impl Fn(&Problem) -> bool {
    move |p| matches!(p, Problem::Invalid { setting: s, .. } if *s == setting)
}

/// The items of a comma list, trimmed; empty items (a trailing comma) are skipped.
fn items(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(p) if p != 0 && !text.starts_with('+') => Ok(p),
        _ if text.contains([':', '-']) => Err(format!(
            "{text:?}: port ranges are not supported, list the ports"
        )),
        _ => Err(format!("{text:?} is not a port (1-65535)")),
    }
}

/// A comma list of ports, without duplicates, in the order given.
fn parse_ports(text: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for item in items(text) {
        if item == "*" {
            return Err("`*` must be the whole value".into());
        }
        let p = parse_port(item)?;
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    Ok(ports)
}

fn parse_cidrs(text: &str) -> Result<Vec<Cidr>, String> {
    let mut cidrs = Vec::new();
    for item in items(text) {
        if item == "*" {
            return Err("`*` is not allowed here (or must be the whole value)".into());
        }
        let c = Cidr::parse(item).map_err(|e| e.to_string())?;
        if !cidrs.contains(&c) {
            cidrs.push(c);
        }
    }
    Ok(cidrs)
}

fn parse_ids(text: &str, db: Option<&str>) -> Result<Vec<u32>, String> {
    let mut ids = Vec::new();
    for item in items(text) {
        let id = host::resolve_id(item, db).map_err(|e| format!("{item:?}: {e}"))?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("{text:?} is not true or false")),
    }
}

/// The rules of `family` as `iptables-restore` input for a system without vmesh rules.
pub fn render(config: &Config, family: Family) -> String {
    plan::install(&rules::build(&config.settings, family), &[]).unwrap_or_default()
}

/// `capture install`: makes the installed rules exactly the wanted ones, in each family.
pub fn install(args: &CaptureArgs) -> Result<(), CaptureError> {
    let config = args.validate(&Machine::this())?;
    if config.dry_run {
        for family in &config.families {
            println!(
                "# {}: {} --noflush input, for a system without vmesh rules",
                family.name(),
                Commands::of(&config.iptables, *family).restore
            );
            print!("{}", render(&config, *family));
        }
        return Ok(());
    }
    for family in [Family::V4, Family::V6] {
        let commands = Commands::of(&config.iptables, family);
        if config.families.contains(&family) {
            let wanted = rules::build(&config.settings, family);
            let changed = apply(&commands, family, |current| plan::install(&wanted, current))?;
            let state = match (wanted.is_empty(), changed) {
                (true, _) => "nothing to capture".to_string(),
                (false, true) => format!("installed, {} rules", wanted.rule_count()),
                (false, false) => format!("already installed, {} rules", wanted.rule_count()),
            };
            println!("{}: {state}", family.name());
        } else if commands.missing().is_empty() {
            // Rules from an earlier install (when the machine had IPv6) must not linger.
            match apply(&commands, family, plan::remove) {
                Ok(removed) => {
                    let what = if removed {
                        ", earlier rules removed"
                    } else {
                        ""
                    };
                    println!(
                        "{}: not captured ({}){what}",
                        family.name(),
                        config.ipv6_reason
                    );
                }
                Err(error) => tracing::warn!(%error, "cannot check for earlier IPv6 rules"),
            }
        } else {
            println!("{}: not captured ({})", family.name(), config.ipv6_reason);
        }
    }
    Ok(())
}

/// `capture remove`: deletes every vmesh chain and every jump to one, in both families, and
/// nothing else.
pub fn remove(args: &RemoveArgs) -> Result<(), CaptureError> {
    let iptables = args.iptables.clone().unwrap_or_else(|| "iptables".into());
    let mut problems = Vec::new();
    if !host::VARIANTS.contains(&iptables.as_str()) {
        problems.push(Problem::Invalid {
            setting: IPTABLES,
            origin: Origin::Given,
            why: format!("{iptables:?} is not one of {}", host::VARIANTS.join(", ")),
        });
    } else {
        for program in Commands::of(&iptables, Family::V4).missing() {
            problems.push(Problem::MissingProgram {
                program,
                why: "install the iptables package".into(),
            });
        }
    }
    if !host::this_process_may_admin_network() {
        problems.push(Problem::NotPermitted);
    }
    if !problems.is_empty() {
        return Err(Problems(problems).into());
    }
    for family in [Family::V4, Family::V6] {
        let commands = Commands::of(&iptables, family);
        if family == Family::V6 && !commands.missing().is_empty() {
            continue;
        }
        if args.dry_run {
            let current = host::save(&commands).map_err(|source| CaptureError::Apply {
                family: family.name(),
                source,
            })?;
            println!("# {}: {} --noflush input", family.name(), commands.restore);
            print!(
                "{}",
                plan::remove(&plan::parse_save(&current)).unwrap_or_default()
            );
            continue;
        }
        let removed = apply(&commands, family, plan::remove)?;
        let state = if removed {
            "removed"
        } else {
            "nothing to remove"
        };
        println!("{}: {state}", family.name());
    }
    Ok(())
}

/// Reads the family's tables, plans, and applies the plan; whether anything changed.
fn apply(
    commands: &Commands,
    family: Family,
    plan: impl FnOnce(&[plan::SavedTable]) -> Option<String>,
) -> Result<bool, CaptureError> {
    let err = |source| CaptureError::Apply {
        family: family.name(),
        source,
    };
    let current = plan::parse_save(&host::save(commands).map_err(err)?);
    match plan(&current) {
        Some(input) => {
            tracing::debug!(family = family.name(), %input, "iptables-restore --noflush");
            host::restore(commands, &input).map_err(err)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: CaptureArgs,
    }

    fn machine() -> Machine {
        Machine {
            passwd: Some(
                "root:x:0:0::/root:/bin/sh\nsystemd-resolve:x:991:991::/:/bin/false\n".into(),
            ),
            group: Some("root:x:0:\nistio-proxy:x:1337:\n".into()),
            has_global_ipv6: false,
        }
    }

    /// A file in a directory that lives as long as the test (the returned guard).
    fn temp_file(name: &str, text: &str) -> (vmesh_test_support::TempDir, PathBuf) {
        let dir = vmesh_test_support::TempDir::new();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn args(argv: &[&str]) -> CaptureArgs {
        let mut full = vec!["capture", "--dry-run"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).unwrap().args
    }

    fn problems(argv: &[&str]) -> Vec<String> {
        match args(argv).validate(&machine()) {
            Ok(c) => panic!("expected problems, got {c:?}"),
            Err(Problems(p)) => p.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn defaults() {
        let (_resolv_dir, resolv) = temp_file("resolv-defaults", "nameserver 198.18.0.53\n");
        let c = args(&["--resolv-conf", resolv.to_str().unwrap()])
            .validate(&machine())
            .unwrap();
        assert_eq!(
            c.settings,
            Settings {
                inbound: Inbound::Off,
                inbound_exclude_ports: vec![22, 15020, 15021, 15090],
                outbound: Outbound::All,
                outbound_exclude_cidrs: vec![],
                outbound_exclude_ports: vec![],
                proxy_uids: vec![FALLBACK_PROXY_UID],
                proxy_gids: vec![],
                resolver_uids: vec![991],
                ports: Ports {
                    outbound: 15001,
                    inbound: 15006,
                    dns: 15053
                },
                dns_servers: vec!["198.18.0.53".parse().unwrap()],
            }
        );
        assert_eq!(c.families, vec![Family::V4]);
        assert_eq!(c.iptables, "iptables");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let got = problems(&[
            "--inbound-ports",
            "80,http",
            "--local-exclude-ports",
            "22,0",
            "--service-cidr",
            "10.0.0.0/8,*",
            "--service-exclude-cidr",
            "10.0.0.0/40",
            "--outbound-exclude-ports",
            "1000-2000",
            "--proxy-uid",
            "istio-proxy",
            "--proxy-gid",
            "nogroup",
            "--resolver-uid",
            "systemd-resolve,nobody",
            "--outbound-port",
            "70000",
            "--dns-capture",
            "maybe",
            "--ipv6",
            "sometimes",
            "--iptables",
            "nft",
            "--resolv-conf",
            "/nonexistent/resolv.conf",
        ]);
        let want = [
            "--inbound-ports ($ISTIO_INBOUND_PORTS): \"http\" is not a port (1-65535)",
            "--local-exclude-ports ($ISTIO_LOCAL_EXCLUDE_PORTS): \"0\" is not a port (1-65535)",
            "--service-cidr ($ISTIO_SERVICE_CIDR): `*` is not allowed here (or must be the whole value)",
            "--service-exclude-cidr ($ISTIO_SERVICE_EXCLUDE_CIDR): \"10.0.0.0/40\": prefix length out of range",
            "--outbound-exclude-ports ($ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE): \"1000-2000\": port ranges are not supported, list the ports",
            "--proxy-uid ($ENVOY_USER): \"istio-proxy\": no such name",
            "--proxy-gid ($VMESH_CAPTURE_PROXY_GIDS): \"nogroup\": no such name",
            "--resolver-uid ($VMESH_CAPTURE_RESOLVER_UIDS): \"nobody\": no such name",
            "--outbound-port ($ENVOY_PORT): \"70000\" is not a port (1-65535)",
            "--dns-capture ($ISTIO_META_DNS_CAPTURE): \"maybe\" is not true or false",
            "--resolv-conf /nonexistent/resolv.conf: No such file or directory (os error 2)",
            "--ipv6 ($VMESH_CAPTURE_IPV6): \"sometimes\" is not auto, on or off",
            "--iptables ($VMESH_CAPTURE_IPTABLES): \"nft\" is not one of iptables, iptables-nft, iptables-legacy",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn cluster_env_is_read_and_flags_win() {
        let (_resolv_dir, resolv) = temp_file(
            "resolv-cluster",
            "nameserver 198.18.0.53\nnameserver 2001:db8::53\n",
        );
        let (_file_dir, file) = temp_file(
            "cluster.env",
            &format!(
                "ISTIO_INBOUND_PORTS='*'\nISTIO_LOCAL_EXCLUDE_PORTS='15090,15021,15020'\n\
                 ISTIO_SERVICE_CIDR='10.96.0.0/12'\nENVOY_PORT='15011'\n\
                 VMESH_SHIM_RESOLV_CONF='{}'\nISTIO_META_DNS_CAPTURE='true'\n",
                resolv.display()
            ),
        );
        let c = args(&[
            "--cluster-env",
            file.to_str().unwrap(),
            "--service-cidr",
            "*",
            "--proxy-uid",
            "1337,998",
        ])
        .validate(&machine())
        .unwrap();
        assert_eq!(c.settings.inbound, Inbound::All);
        assert_eq!(c.settings.inbound_exclude_ports, vec![15090, 15021, 15020]);
        assert_eq!(c.settings.outbound, Outbound::All, "the flag wins");
        assert_eq!(c.settings.ports.outbound, 15011);
        assert_eq!(c.settings.proxy_uids, vec![1337, 998]);
        assert_eq!(
            c.settings.dns_servers,
            vec![
                "198.18.0.53".parse::<IpAddr>().unwrap(),
                "2001:db8::53".parse().unwrap()
            ]
        );
        assert_eq!(
            c.families,
            vec![Family::V4, Family::V6],
            "an IPv6 nameserver"
        );
        assert_eq!(c.ipv6_reason, "an IPv6 nameserver");

        let (_bad_dir, bad) = temp_file(
            "cluster-bad.env",
            "ISTIO_INBOUND_PORTS='*'\nENVOY_PORT=$PORT\n",
        );
        let got = problems(&["--cluster-env", bad.to_str().unwrap()]);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].ends_with(
                "line 2: unquoted `$` would be expanded by a shell; put the value in single quotes"
            ),
            "{got:?}"
        );

        let (_bad_dir, bad) =
            temp_file("cluster-value.env", "ISTIO_LOCAL_EXCLUDE_PORTS='22,ssh'\n");
        let got = problems(&["--cluster-env", bad.to_str().unwrap()]);
        assert_eq!(
            got,
            [format!(
                "--local-exclude-ports ($ISTIO_LOCAL_EXCLUDE_PORTS, from {}): \"ssh\" is not a port (1-65535)",
                bad.display()
            )]
        );
    }

    #[test]
    fn dns_needs_a_nameserver_unless_off() {
        let (_empty_dir, empty) = temp_file("resolv-empty", "search example.com\n");
        let got = problems(&["--resolv-conf", empty.to_str().unwrap()]);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("names no usable nameserver"), "{got:?}");
        let c = args(&[
            "--resolv-conf",
            empty.to_str().unwrap(),
            "--dns-capture",
            "false",
        ])
        .validate(&machine())
        .unwrap();
        assert!(c.settings.dns_servers.is_empty());
    }

    #[test]
    fn ports_must_differ_and_empty_uid_list_is_refused() {
        let (_resolv_dir, resolv) = temp_file("resolv-ports", "nameserver 198.18.0.53\n");
        let r = resolv.to_str().unwrap();
        let got = problems(&["--resolv-conf", r, "--inbound-port", "15001"]);
        assert_eq!(got, ["--outbound-port, --inbound-port and --dns-port must be three different ports (got 15001, 15001, 15053)"]);
        let got = problems(&["--resolv-conf", r, "--proxy-uid", ","]);
        assert_eq!(got, ["--proxy-uid ($ENVOY_USER): at least one is needed: Envoy's own traffic would be captured again (a loop)"]);
    }

    #[test]
    fn ipv6_modes() {
        let (_resolv_dir, resolv) = temp_file("resolv-v4", "nameserver 198.18.0.53\n");
        let r = resolv.to_str().unwrap();
        let mut m = machine();
        let families = |argv: &[&str], m: &Machine| {
            let mut a = vec!["--resolv-conf", r];
            a.extend_from_slice(argv);
            args(&a).validate(m).unwrap().families
        };
        assert_eq!(families(&[], &m), [Family::V4]);
        assert_eq!(families(&["--ipv6", "on"], &m), [Family::V4, Family::V6]);
        m.has_global_ipv6 = true;
        assert_eq!(families(&[], &m), [Family::V4, Family::V6]);
        assert_eq!(families(&["--ipv6", "off"], &m), [Family::V4]);
    }
}
