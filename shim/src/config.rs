//! Command-line flags (each with an environment variable fallback) and their validation into
//! [`Settings`]. Every flag is checked and every problem reported together before the shim
//! binds anything, including reading resolv.conf, the name table file and the VM bundle.
//!
//! The mode is decided here, once (see [`Mode`]): where the name table comes from.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::bundle::{self, Bundle, BundleError, BundlePaths, Machine, Overrides};
use crate::names::{NamesError, StaticNames};
use crate::upstream::{self, AddrError};

pub const ENV_LISTEN: &str = "VMESH_SHIM_LISTEN";
pub const ENV_RESOLV_CONF: &str = "VMESH_SHIM_RESOLV_CONF";
pub const ENV_UPSTREAMS: &str = "VMESH_SHIM_UPSTREAMS";
pub const ENV_SELF_ADDRS: &str = "VMESH_SHIM_SELF_ADDRS";
pub const ENV_FORWARD_TIMEOUT: &str = "VMESH_SHIM_FORWARD_TIMEOUT";
pub const ENV_STATIC_NAMES: &str = "VMESH_SHIM_STATIC_NAMES";
pub const ENV_LOG_LEVEL: &str = "VMESH_SHIM_LOG_LEVEL";
pub const ENV_BUNDLE: &str = "VMESH_SHIM_BUNDLE";
pub const ENV_CLUSTER_ENV: &str = "VMESH_SHIM_CLUSTER_ENV";
pub const ENV_MESH_CONFIG: &str = "VMESH_SHIM_MESH_CONFIG";
pub const ENV_TOKEN_FILE: &str = "VMESH_SHIM_TOKEN_FILE";
pub const ENV_ROOT_CERT: &str = "VMESH_SHIM_ROOT_CERT";
pub const ENV_HOSTS_FILE: &str = "VMESH_SHIM_HOSTS_FILE";
pub const ENV_DISCOVERY_ADDRESS: &str = "VMESH_SHIM_DISCOVERY_ADDRESS";
pub const ENV_STATE_DIR: &str = "VMESH_SHIM_STATE_DIR";
pub const ENV_DEREGISTER_TIMEOUT: &str = "VMESH_SHIM_DEREGISTER_TIMEOUT";
pub const ENV_CERT_DIR: &str = "VMESH_SHIM_CERT_DIR";
pub const ENV_CERT_TTL: &str = "VMESH_SHIM_CERT_TTL";
pub const ENV_ENVOY_ADMIN: &str = "VMESH_SHIM_ENVOY_ADMIN";
pub const ENV_ROLE: &str = "VMESH_SHIM_ROLE";

/// The WorkloadGroup a gateway's bundle is taken to name when it names none: a gateway never
/// registers, so the group is only a label in `status`.
pub const GATEWAY_GROUP: &str = "istio-eastwestgateway";

/// What the shim runs beside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Role {
    /// A VM's sidecar: registers the VM, reports its health, keeps its certificate.
    #[default]
    Vm,
    /// An east-west gateway: long-polls the table (for the gateway's network) and serves it to
    /// the gateway's Envoy, nothing else. It registers no WorkloadEntry (no service selects a
    /// gateway) and asks for no certificate (it terminates no TLS).
    Gateway,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:15020";
/// Envoy's DNS listener, where captured DNS traffic goes: never an upstream.
pub const DEFAULT_SELF_ADDR: &str = "127.0.0.1:15053";
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmesh";
pub const DEFAULT_DEREGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Under the state dir, not Istio's `/etc/certs`: there the bundle's `root-cert.pem` is the
/// root the shim trusts the control plane by, and rewriting it would change that trust.
pub const CERT_SUBDIR: &str = "certs";
pub const DEFAULT_ENVOY_ADMIN: &str = "127.0.0.1:15000";

const CONTROL_PLANE: &str = "Control plane (any of these selects control-plane mode)";

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

    // Control-plane mode. None of these has a clap default: "given" must be told from
    // "defaulted" to pick the mode, so the defaults are applied in `validate`.
    /// A directory written by `vmesh-control vm-bundle -o DIR`: all five files from there (a
    /// file flag below still replaces its one file). Default: Istio's paths.
    #[arg(long, env = ENV_BUNDLE, value_name = "DIR", help_heading = CONTROL_PLANE)]
    pub bundle: Option<PathBuf>,

    /// cluster.env [default: /var/lib/istio/envoy/cluster.env, or DIR/cluster.env]
    #[arg(long, env = ENV_CLUSTER_ENV, value_name = "FILE", help_heading = CONTROL_PLANE)]
    pub cluster_env: Option<PathBuf>,

    /// Istio mesh config (YAML) [default: /etc/istio/config/mesh, or DIR/mesh.yaml]
    #[arg(long, env = ENV_MESH_CONFIG, value_name = "FILE", help_heading = CONTROL_PLANE)]
    pub mesh_config: Option<PathBuf>,

    /// Service-account token, re-read when it changes
    /// [default: /var/run/secrets/tokens/istio-token, or DIR/istio-token]
    #[arg(long, env = ENV_TOKEN_FILE, value_name = "FILE", help_heading = CONTROL_PLANE)]
    pub token_file: Option<PathBuf>,

    /// The control plane's root certificate (PEM)
    /// [default: /etc/certs/root-cert.pem, or DIR/root-cert.pem]
    #[arg(long, env = ENV_ROOT_CERT, value_name = "FILE", help_heading = CONTROL_PLANE)]
    pub root_cert: Option<PathBuf>,

    /// Hosts file the discovery host is looked up in (never DNS)
    /// [default: /etc/hosts, or DIR/hosts]
    #[arg(long, env = ENV_HOSTS_FILE, value_name = "FILE", help_heading = CONTROL_PLANE)]
    pub hosts_file: Option<PathBuf>,

    /// The control plane, replacing the mesh config's defaultConfig.discoveryAddress.
    /// Several (replicas) comma-separated, tried in order; a host with several addresses in
    /// the hosts file stands for all of them.
    #[arg(long, env = ENV_DISCOVERY_ADDRESS, value_name = "HOST:PORT[,HOST:PORT]", help_heading = CONTROL_PLANE)]
    pub discovery_address: Option<String>,

    /// The VM's address in the mesh. Default: ISTIO_SVC_IP, then INSTANCE_IP (environment over
    /// cluster.env), else the machine's first address that is not loopback or link-local.
    #[arg(long, value_name = "IP", help_heading = CONTROL_PLANE)]
    pub address: Option<String>,

    /// The WorkloadGroup. Default: ISTIO_META_AUTO_REGISTER_GROUP (environment over cluster.env).
    #[arg(long, value_name = "NAME", help_heading = CONTROL_PLANE)]
    pub group: Option<String>,

    /// The WorkloadGroup's namespace. Default: POD_NAMESPACE (environment over cluster.env).
    #[arg(long, value_name = "NAMESPACE", help_heading = CONTROL_PLANE)]
    pub namespace: Option<String>,

    /// The VM's network. Default: ISTIO_META_NETWORK (environment over cluster.env).
    #[arg(long, value_name = "NETWORK", help_heading = CONTROL_PLANE)]
    pub network: Option<String>,

    /// `vm`: register, report health, keep the certificate. `gateway` (beside an east-west
    /// gateway's Envoy): only fetch the table; the bundle then needs no WorkloadGroup.
    #[arg(long, env = ENV_ROLE, value_enum, help_heading = CONTROL_PLANE)]
    pub role: Option<Role>,

    /// Where the shim keeps its state (the last name table) [default: /var/lib/vmesh]
    #[arg(long, env = ENV_STATE_DIR, value_name = "DIR", help_heading = CONTROL_PLANE)]
    pub state_dir: Option<PathBuf>,

    /// How long deregistering may take at shutdown [default: 5s]
    #[arg(long, env = ENV_DEREGISTER_TIMEOUT, value_name = "DURATION", help_heading = CONTROL_PLANE)]
    pub deregister_timeout: Option<String>,

    /// Where the VM's certificate is written for Envoy's SDS (key.pem, cert-chain.pem,
    /// root-cert.pem, sds-*.yaml) [default: STATE_DIR/certs]
    #[arg(long, env = ENV_CERT_DIR, value_name = "DIR", help_heading = CONTROL_PLANE)]
    pub cert_dir: Option<PathBuf>,

    /// The certificate lifetime asked of the CA, which may give less [default: 24h]
    #[arg(long, env = ENV_CERT_TTL, value_name = "DURATION", help_heading = CONTROL_PLANE)]
    pub cert_ttl: Option<String>,

    /// Envoy's admin endpoint, read for the inbound listener's handshake counters.
    #[arg(long, env = ENV_ENVOY_ADMIN, default_value = DEFAULT_ENVOY_ADMIN, value_name = "IP:PORT")]
    pub envoy_admin: String,
}

/// Validated configuration: everything needed to start, nothing left to check.
#[derive(Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub upstreams: Vec<SocketAddr>,
    pub forward_timeout: Duration,
    /// Static mode: the name table file.
    pub names: Option<StaticNames>,
    /// Control-plane mode: the bundle and what the control-plane client needs besides it.
    pub control: Option<ControlSettings>,
    /// Set when the upstreams came from resolv.conf: the file to follow, and the addresses
    /// that are this machine's own DNS front (never used as upstreams).
    pub resolv_watch: Option<ResolvWatch>,
    /// The VM's search domains from resolv.conf at start (see
    /// [`upstream::ResolvConf::search_domains`]); empty when resolv.conf is unreadable and
    /// `--upstream` made it unnecessary.
    pub search_domains: Vec<String>,
    /// The resolv.conf the search domains come from (followed in control-plane mode).
    pub resolv_conf: PathBuf,
    /// Envoy's admin endpoint (its inbound listener's TLS counters).
    pub envoy_admin: SocketAddr,
}

impl Settings {
    pub fn mode(&self) -> Mode {
        match (&self.names, &self.control) {
            (_, Some(_)) => Mode::ControlPlane,
            (Some(_), None) => Mode::Static,
            (None, None) => Mode::ForwarderOnly,
        }
    }
}

/// Where the name table comes from.
///
/// - **Control plane**: `--bundle` or any other control-plane flag is given, or Istio's
///   cluster.env exists (a VM set up the Istio way). The shim registers and long-polls.
/// - **Static**: `--static-names FILE`. Combined with a control-plane flag it is an error;
///   an Istio cluster.env on the machine is then ignored (and that is logged).
/// - **Forwarder only**: neither. DNS forwarding works; `/v1/name-table` answers 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    ControlPlane,
    Static,
    ForwarderOnly,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ControlPlane => "control-plane",
            Mode::Static => "static",
            Mode::ForwarderOnly => "forwarder-only",
        }
    }
}

/// Control-plane mode's settings.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    pub bundle: Bundle,
    /// Exists and is writable (checked by creating and removing a file).
    pub state_dir: PathBuf,
    /// The longest `POST /v1/deregister` may take at shutdown.
    pub deregister_timeout: Duration,
    /// Where the VM's certificate goes (Envoy's SDS files).
    pub cert_dir: PathBuf,
    /// The certificate lifetime asked for.
    pub cert_ttl: Duration,
    pub role: Role,
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
    #[error(
        "--static-names cannot be combined with {}: the name table comes either from a file or \
         from the control plane",
        .0.join(", ")
    )]
    ModeConflict(Vec<&'static str>),
    #[error("--bundle {path}: {reason}")]
    BundleDir { path: PathBuf, reason: String },
    #[error("--address {text:?}: {reason}")]
    Address { text: String, reason: &'static str },
    #[error("{0}: must not be empty")]
    Empty(&'static str),
    #[error("--state-dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--deregister-timeout {0:?}: expected a positive duration such as 5s or 1500ms")]
    DeregisterTimeout(String),
    #[error("--cert-ttl {0:?}: expected a duration of at least 1s such as 24h or 90m")]
    CertTtl(String),
    #[error("--envoy-admin: {0}")]
    EnvoyAdmin(AddrError),
    /// A problem in a bundle file or value; it names the file.
    #[error("{0}")]
    Bundle(BundleError),
}

/// All the problems found, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:{}", list(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn list(errors: &[ConfigError]) -> String {
    errors.iter().map(|e| format!("\n  - {e}")).collect()
}

impl RunArgs {
    /// Checks every flag, reads resolv.conf, the name table or the bundle, and drops upstreams
    /// that are the shim itself. Warnings (skipped resolv.conf lines, dropped upstreams, an
    /// expired token) are logged, and so is the mode.
    pub fn validate(self) -> Result<Settings, ConfigErrors> {
        self.validate_on(&Machine::real(), &BundlePaths::istio())
    }

    /// [`RunArgs::validate`] with the machine's facts (environment, addresses, clock) and
    /// Istio's default paths given, so tests do not depend on the machine they run on.
    pub fn validate_on(
        self,
        machine: &Machine<'_>,
        istio: &BundlePaths,
    ) -> Result<Settings, ConfigErrors> {
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
        let envoy_admin = upstream::parse_socket_addr(&self.envoy_admin)
            .map_err(|e| errors.push(ConfigError::EnvoyAdmin(e)))
            .ok();
        let forward_timeout = parse_duration(&self.forward_timeout)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| errors.push(ConfigError::ForwardTimeout(self.forward_timeout.clone())))
            .ok();

        let resolv = upstream::read_resolv(&self.resolv_conf);
        let search_domains = resolv
            .as_ref()
            .map(|r| r.search_domains(&upstream::system_hostname()))
            .unwrap_or_default();
        let (candidates, source) = if self.upstreams.is_empty() {
            let found = match resolv {
                Ok(parsed) => {
                    log_skipped(&self.resolv_conf, &parsed);
                    Some(parsed.nameservers)
                }
                Err(source) => {
                    errors.push(ConfigError::ResolvConf {
                        path: self.resolv_conf.clone(),
                        source,
                    });
                    None
                }
            };
            (found, format!("in {}", self.resolv_conf.display()))
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
        let mode = self.mode(istio, &mut errors);
        let names = self.static_names.as_ref().and_then(|path| {
            StaticNames::load(path)
                .map_err(|e| errors.push(ConfigError::Names(e)))
                .ok()
        });
        let control = (mode == Mode::ControlPlane)
            .then(|| self.control_settings(machine, istio, &mut errors))
            .flatten();

        let resolv_watch = self.upstreams.is_empty().then(|| ResolvWatch {
            path: self.resolv_conf.clone(),
            own,
        });
        match (listen, forward_timeout, envoy_admin) {
            (Some(listen), Some(forward_timeout), Some(envoy_admin)) if errors.is_empty() => {
                let settings = Settings {
                    listen,
                    upstreams,
                    forward_timeout,
                    names,
                    control,
                    resolv_watch,
                    search_domains,
                    resolv_conf: self.resolv_conf.clone(),
                    envoy_admin,
                };
                log_mode(&settings);
                Ok(settings)
            }
            _ => Err(ConfigErrors(errors)),
        }
    }

    /// The control-plane flags given (on the command line or through their variables).
    pub fn control_plane_flags(&self) -> Vec<&'static str> {
        let given = [
            ("--bundle", self.bundle.is_some()),
            ("--cluster-env", self.cluster_env.is_some()),
            ("--mesh-config", self.mesh_config.is_some()),
            ("--token-file", self.token_file.is_some()),
            ("--root-cert", self.root_cert.is_some()),
            ("--hosts-file", self.hosts_file.is_some()),
            ("--discovery-address", self.discovery_address.is_some()),
            ("--address", self.address.is_some()),
            ("--group", self.group.is_some()),
            ("--namespace", self.namespace.is_some()),
            ("--network", self.network.is_some()),
            ("--role", self.role.is_some()),
            ("--state-dir", self.state_dir.is_some()),
            ("--deregister-timeout", self.deregister_timeout.is_some()),
            ("--cert-dir", self.cert_dir.is_some()),
            ("--cert-ttl", self.cert_ttl.is_some()),
        ];
        given
            .into_iter()
            .filter_map(|(flag, on)| on.then_some(flag))
            .collect()
    }

    fn mode(&self, istio: &BundlePaths, errors: &mut Vec<ConfigError>) -> Mode {
        let flags = self.control_plane_flags();
        // Unknown (say, a directory the shim may not look into) counts as present, so that
        // reading it reports why rather than the shim quietly running without a table.
        let istio_vm = istio.cluster_env.try_exists().unwrap_or(true);
        match (&self.static_names, flags.is_empty()) {
            (Some(_), false) => {
                errors.push(ConfigError::ModeConflict(flags));
                Mode::Static
            }
            (Some(_), true) => {
                if istio_vm {
                    tracing::info!(cluster_env = %istio.cluster_env.display(),
                        "Istio's cluster.env is present but ignored: --static-names is given");
                }
                Mode::Static
            }
            (None, false) => Mode::ControlPlane,
            (None, true) if istio_vm => Mode::ControlPlane,
            (None, true) => Mode::ForwarderOnly,
        }
    }

    fn control_settings(
        &self,
        machine: &Machine<'_>,
        istio: &BundlePaths,
        errors: &mut Vec<ConfigError>,
    ) -> Option<ControlSettings> {
        let deregister_timeout = match &self.deregister_timeout {
            None => Some(DEFAULT_DEREGISTER_TIMEOUT),
            Some(text) => parse_duration(text).filter(|d| !d.is_zero()).or_else(|| {
                errors.push(ConfigError::DeregisterTimeout(text.clone()));
                None
            }),
        };
        let cert_ttl = match &self.cert_ttl {
            None => Some(Duration::from_secs(
                u64::try_from(vmesh_api::ca::DEFAULT_TTL_SECS).unwrap_or(86_400),
            )),
            Some(text) => parse_duration(text)
                .filter(|d| *d >= Duration::from_secs(1))
                .or_else(|| {
                    errors.push(ConfigError::CertTtl(text.clone()));
                    None
                }),
        };
        let state_dir = self
            .state_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let cert_dir = self
            .cert_dir
            .clone()
            .unwrap_or_else(|| state_dir.join(CERT_SUBDIR));
        let state_ok = check_writable_dir(&state_dir)
            .map_err(|source| {
                errors.push(ConfigError::StateDir {
                    path: state_dir.clone(),
                    source,
                })
            })
            .is_ok();

        let address = self.address.as_ref().and_then(|text| {
            let reason = match text.trim().parse::<IpAddr>() {
                Ok(ip) if !(ip.is_unspecified() || ip.is_multicast()) => return Some(ip),
                Ok(_) => "not a unicast address",
                Err(_) => "not an IP address",
            };
            errors.push(ConfigError::Address {
                text: text.clone(),
                reason,
            });
            None
        });
        let mut not_empty = |flag, value: &Option<String>| {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                errors.push(ConfigError::Empty(flag));
            }
            value.clone()
        };
        let role = self.role.unwrap_or_default();
        let group = not_empty("--group", &self.group);
        let overrides = Overrides {
            group: match role {
                Role::Gateway => group.or_else(|| Some(GATEWAY_GROUP.to_string())),
                Role::Vm => group,
            },
            namespace: not_empty("--namespace", &self.namespace),
            network: self.network.clone(),
            address,
            discovery_address: not_empty("--discovery-address", &self.discovery_address),
        };

        let mut paths = match &self.bundle {
            Some(dir) => {
                if !dir.is_dir() {
                    let reason = match std::fs::metadata(dir) {
                        Ok(_) => "not a directory".to_string(),
                        Err(e) => e.to_string(),
                    };
                    errors.push(ConfigError::BundleDir {
                        path: dir.clone(),
                        reason,
                    });
                    // Each of its five files would only repeat that.
                    return None;
                }
                BundlePaths::in_dir(dir)
            }
            None => istio.clone(),
        };
        let set = |path: &mut PathBuf, flag: &Option<PathBuf>| {
            if let Some(p) = flag {
                path.clone_from(p);
            }
        };
        set(&mut paths.cluster_env, &self.cluster_env);
        set(&mut paths.mesh_config, &self.mesh_config);
        set(&mut paths.token, &self.token_file);
        set(&mut paths.root_cert, &self.root_cert);
        set(&mut paths.hosts, &self.hosts_file);
        paths.mesh_config_named |= self.mesh_config.is_some();
        paths.hosts_named |= self.hosts_file.is_some();

        let loaded = bundle::load(&paths, &overrides, machine)
            .map_err(|e| errors.extend(e.into_iter().map(ConfigError::Bundle)))
            .ok()?;
        for warning in &loaded.warnings {
            tracing::warn!("{warning}");
        }
        Some(ControlSettings {
            bundle: loaded.bundle,
            state_dir,
            deregister_timeout: deregister_timeout.filter(|_| state_ok)?,
            cert_dir,
            cert_ttl: cert_ttl?,
            role,
        })
    }
}

/// Creates `dir` if needed and proves it writable by creating and removing a file in it.
fn check_writable_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".vmesh-shim-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

fn log_mode(s: &Settings) {
    let mode = s.mode().as_str();
    match (&s.control, &s.names) {
        (Some(c), _) => {
            let b = &c.bundle;
            tracing::info!(
                mode,
                group = %b.group,
                namespace = %b.namespace,
                network = %b.network,
                address = %b.address,
                address_from = %b.address_source,
                discovery = %b.discovery.address,
                connect = %b.discovery.targets.iter().map(|t| t.connect.to_string()).collect::<Vec<_>>().join(","),
                cluster_env = %b.paths.cluster_env.display(),
                token = %b.token_path.display(),
                state_dir = %c.state_dir.display(),
                "mode selected: names from the control plane"
            );
        }
        (None, Some(n)) => {
            tracing::info!(
                mode,
                version = n.version(),
                "mode selected: names from a file"
            )
        }
        (None, None) => tracing::info!(mode, "mode selected: no name table, DNS forwarding only"),
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

pub(crate) fn read_resolv_conf(path: &Path) -> std::io::Result<Vec<SocketAddr>> {
    let parsed = upstream::read_resolv(path)?;
    log_skipped(path, &parsed);
    Ok(parsed.nameservers)
}

fn log_skipped(path: &Path, parsed: &upstream::ResolvConf) {
    for skipped in &parsed.skipped {
        tracing::warn!(path = %path.display(), %skipped, "resolv.conf line not used");
    }
}

/// `1500ms`, `5s`, `2m`, `1m30s` (humantime's units), or a bare number of seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    match text.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(text).ok(),
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
            ("1.5s", Some(Duration::from_millis(1500))),
            ("-1s", None),
            ("1m30s", Some(Duration::from_secs(90))),
            ("5h", Some(Duration::from_secs(5 * 3600))),
            ("soon", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), want, "{text:?}");
        }
    }
}
