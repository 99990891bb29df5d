//! The VM bundle: what a VM needs to join the mesh, in the files Istio puts on a VM
//! (`istioctl x workload entry configure`, and `vmesh-control vm-bundle -o DIR` writes the same
//! five): `cluster.env`, the mesh config, the service-account token, the root certificate and
//! the hosts entry of the control plane.
//!
//! Flow: [`load`] reads each file once and hands its text to a pure parser
//! ([`parse_cluster_env`], [`parse_mesh_config`], [`parse_token`], [`check_root_cert`],
//! [`parse_host_port`] with [`lookup_hosts`]); every problem in every file becomes one
//! [`BundleError`] and all of them are returned together, so a person fixes a bundle in one
//! go. What passes becomes a typed [`Bundle`].
//!
//! Where a value comes from, highest first:
//!
//! 1. a command-line override ([`Overrides`]: `--group`, `--namespace`, `--network`,
//!    `--address`, `--discovery-address`);
//! 2. the process environment, when the variable is set and not empty;
//! 3. `cluster.env`;
//! 4. the mesh config's `defaultConfig.proxyMetadata`.
//!
//! 3 over 4 is Istio's order: istioctl writes cluster.env as proxyMetadata plus its own
//! overrides (`istioctl/pkg/workload/workload.go`), and pilot-agent reads proxyMetadata first
//! and lets the environment replace it (`pkg/bootstrap/config.go` `GetNodeMetaData`). 2 over 3
//! is this shim's choice, the usual layering of a program's settings: it lets a unit file or a
//! shell change one value without editing the bundle. It is not what every launcher does with
//! cluster.env: Istio's `istio-start.sh` sources it with `set -a`, and systemd's
//! `EnvironmentFile=` beats `Environment=`; both let the file win. When the shim itself runs
//! with `EnvironmentFile=cluster.env` the two layers hold the same values and the question does
//! not arise.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use base64::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use vmesh_api::control::RegisterRequest;

use crate::interfaces::{self, InterfaceAddr};

/// Istio's paths on a VM (the VM install guide copies the bundle there; pilot-agent reads
/// them: `pkg/config/constants` `ThirdPartyJwtPath`, `pkg/security` `DefaultRootCertFilePath`,
/// `tools/packaging/common/istio-start.sh` `ISTIO_CLUSTER_CONFIG`).
pub const ISTIO_CLUSTER_ENV: &str = "/var/lib/istio/envoy/cluster.env";
pub const ISTIO_MESH_CONFIG: &str = "/etc/istio/config/mesh";
pub const ISTIO_TOKEN: &str = "/var/run/secrets/tokens/istio-token";
pub const ISTIO_ROOT_CERT: &str = "/etc/certs/root-cert.pem";
pub const SYSTEM_HOSTS: &str = "/etc/hosts";

/// File names in a bundle directory, as `vmesh-control vm-bundle` and istioctl write them.
pub const BUNDLE_CLUSTER_ENV: &str = "cluster.env";
pub const BUNDLE_MESH_CONFIG: &str = "mesh.yaml";
pub const BUNDLE_TOKEN: &str = "istio-token";
pub const BUNDLE_ROOT_CERT: &str = "root-cert.pem";
pub const BUNDLE_HOSTS: &str = "hosts";

/// The variables read, in Istio's spelling (istioctl's cluster.env).
pub const VAR_GROUP: &str = "ISTIO_META_AUTO_REGISTER_GROUP";
pub const VAR_NAMESPACE: &str = "POD_NAMESPACE";
pub const VAR_SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";
pub const VAR_NETWORK: &str = "ISTIO_META_NETWORK";
pub const VAR_LABELS: &str = "ISTIO_METAJSON_LABELS";
pub const VAR_CANONICAL_SERVICE: &str = "CANONICAL_SERVICE";
pub const VAR_CANONICAL_REVISION: &str = "CANONICAL_REVISION";
pub const VAR_TRUST_DOMAIN: &str = "TRUST_DOMAIN";
pub const VAR_INBOUND_PORTS: &str = "ISTIO_INBOUND_PORTS";
pub const VAR_LOCAL_EXCLUDE_PORTS: &str = "ISTIO_LOCAL_EXCLUDE_PORTS";
/// The VM's address: `istio-start.sh` takes `ISTIO_SVC_IP` (or the first address of
/// `hostname --all-ip-addresses`) and starts pilot-agent with `INSTANCE_IP` set to it.
pub const VAR_SVC_IP: &str = "ISTIO_SVC_IP";
pub const VAR_INSTANCE_IP: &str = "INSTANCE_IP";

/// Every variable the shim reads (the process environment is consulted for these).
pub const VARS: [&str; 12] = [
    VAR_GROUP,
    VAR_NAMESPACE,
    VAR_SERVICE_ACCOUNT,
    VAR_NETWORK,
    VAR_LABELS,
    VAR_CANONICAL_SERVICE,
    VAR_CANONICAL_REVISION,
    VAR_TRUST_DOMAIN,
    VAR_INBOUND_PORTS,
    VAR_LOCAL_EXCLUDE_PORTS,
    VAR_SVC_IP,
    VAR_INSTANCE_IP,
];

/// Istio has no locality variable: pilot-agent takes the locality from the proxy's labels
/// (`ISTIO_METAJSON_LABELS`), `topology.istio.io/locality` first, then the legacy
/// `istio-locality` with `.` for `/` (`pkg/model/proxy.go` `GetLocalityLabel`,
/// `SanitizeLocalityLabel`), else from the cloud platform's metadata (not done here).
pub const LABEL_LOCALITY: &str = "topology.istio.io/locality";
pub const LABEL_LOCALITY_LEGACY: &str = "istio-locality";

/// Everything the VM needs to register and talk to the control plane, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The WorkloadGroup (`ISTIO_META_AUTO_REGISTER_GROUP`, `--group`).
    pub group: String,
    /// Its namespace (`POD_NAMESPACE`, `--namespace`).
    pub namespace: String,
    /// The group template's service account (`SERVICE_ACCOUNT`); may be empty. The token, not
    /// this, is the identity; a mismatch is a [`BundleWarning`].
    pub service_account: String,
    /// `ISTIO_META_NETWORK`, `--network`; empty: the template's.
    pub network: String,
    /// `ISTIO_METAJSON_LABELS`: merged over the group's labels at registration.
    pub labels: BTreeMap<String, String>,
    /// `region/zone/subzone` from the labels (see [`LABEL_LOCALITY`]); may be empty.
    pub locality: String,
    /// Informational (`CANONICAL_SERVICE`, `CANONICAL_REVISION`, `TRUST_DOMAIN`).
    pub canonical_service: String,
    pub canonical_revision: String,
    pub trust_domain: String,
    /// For traffic capture, as written (`ISTIO_INBOUND_PORTS`: `*` or a list;
    /// `ISTIO_LOCAL_EXCLUDE_PORTS`: a comma-separated list).
    pub inbound_ports: String,
    pub local_exclude_ports: String,
    /// The VM's address in the mesh, and where it came from.
    pub address: IpAddr,
    pub address_source: AddressSource,
    pub discovery: Discovery,
    /// Re-read on every rotation by the control-plane client; checked once here.
    pub token_path: PathBuf,
    /// What the token said when it was checked.
    pub token: TokenClaims,
    pub root_cert_path: PathBuf,
    /// PEM, at least one CERTIFICATE: the only roots the control-plane client trusts.
    pub root_cert_pem: Vec<u8>,
    /// Every variable as merged (process environment over cluster.env over proxyMetadata;
    /// the process environment only for [`VARS`] and names the files also set).
    pub vars: BTreeMap<String, String>,
    /// The files this came from.
    pub paths: BundlePaths,
}

impl Bundle {
    /// The `POST /v1/register` body for this VM.
    pub fn register_request(&self) -> RegisterRequest {
        RegisterRequest {
            group: self.group.clone(),
            namespace: self.namespace.clone(),
            address: self.address.to_string(),
            network: self.network.clone(),
            locality: self.locality.clone(),
            labels: self.labels.clone(),
        }
    }
}

/// The control plane's addresses: where to connect and the names to check certificates for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// As configured: `host:port`, or several, comma-separated (replicas).
    pub address: String,
    /// Where to connect, in the order to try: the configured addresses in turn, a name with
    /// several hosts-file entries (as a DNS name with several A records) giving one target per
    /// address. Never empty.
    pub targets: Vec<Target>,
    /// The hosts file that gave IPs; `None` when every host is an IP literal.
    pub hosts_file: Option<PathBuf>,
}

/// One place the control plane may be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` as configured (the requests' `:authority`).
    pub address: String,
    /// The TLS server name: the host as written (lower-cased, without a trailing dot), or the
    /// IP literal.
    pub server_name: String,
    pub connect: SocketAddr,
}

/// Where the VM's address came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressSource {
    /// `--address`.
    Flag,
    /// A variable ([`VAR_SVC_IP`] or [`VAR_INSTANCE_IP`]).
    Variable { name: &'static str, from: VarSource },
    /// The first usable address of this interface (empty: unknown interface).
    Interface(String),
}

impl std::fmt::Display for AddressSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddressSource::Flag => f.write_str("--address"),
            AddressSource::Variable { name, from } => write!(f, "{name} ({from})"),
            AddressSource::Interface(i) if i.is_empty() => f.write_str("this machine's addresses"),
            AddressSource::Interface(i) => write!(f, "interface {i}"),
        }
    }
}

/// Which layer a variable's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarSource {
    Environment,
    ClusterEnv,
    ProxyMetadata,
}

impl std::fmt::Display for VarSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VarSource::Environment => "process environment",
            VarSource::ClusterEnv => "cluster.env",
            VarSource::ProxyMetadata => "mesh config proxyMetadata",
        })
    }
}

/// The five files' paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundlePaths {
    pub cluster_env: PathBuf,
    pub mesh_config: PathBuf,
    pub token: PathBuf,
    pub root_cert: PathBuf,
    pub hosts: PathBuf,
    /// Whether the mesh config was named (by `--bundle`, a flag or its variable) rather than
    /// left at Istio's default. A named file must exist; the default one may be absent when
    /// `--discovery-address` is given, since then nothing else is needed from it.
    pub mesh_config_named: bool,
    /// The same for the hosts file, which is not needed when the discovery host is an IP.
    pub hosts_named: bool,
}

impl BundlePaths {
    /// Istio's paths on a VM.
    pub fn istio() -> Self {
        BundlePaths {
            cluster_env: ISTIO_CLUSTER_ENV.into(),
            mesh_config: ISTIO_MESH_CONFIG.into(),
            token: ISTIO_TOKEN.into(),
            root_cert: ISTIO_ROOT_CERT.into(),
            hosts: SYSTEM_HOSTS.into(),
            mesh_config_named: false,
            hosts_named: false,
        }
    }

    /// The files of a `vmesh-control vm-bundle -o DIR` directory.
    pub fn in_dir(dir: &Path) -> Self {
        BundlePaths {
            cluster_env: dir.join(BUNDLE_CLUSTER_ENV),
            mesh_config: dir.join(BUNDLE_MESH_CONFIG),
            token: dir.join(BUNDLE_TOKEN),
            root_cert: dir.join(BUNDLE_ROOT_CERT),
            hosts: dir.join(BUNDLE_HOSTS),
            mesh_config_named: true,
            hosts_named: true,
        }
    }
}

/// Command-line values that replace the bundle's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub group: Option<String>,
    pub namespace: Option<String>,
    pub network: Option<String>,
    pub address: Option<IpAddr>,
    /// `host:port`, replacing the mesh config's `discoveryAddress`.
    pub discovery_address: Option<String>,
}

/// What [`load`] needs from the machine besides the files, passed in so tests control it.
pub struct Machine<'a> {
    /// A process environment variable.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// This machine's addresses, in preference order ([`interfaces::system_addrs`]).
    pub addrs: &'a dyn Fn() -> io::Result<Vec<InterfaceAddr>>,
    /// Seconds since the Unix epoch, to tell an expired token.
    pub now_unix: u64,
}

impl std::fmt::Debug for Machine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("now_unix", &self.now_unix)
            .finish_non_exhaustive()
    }
}

impl Machine<'static> {
    /// The real process environment, interfaces and clock.
    pub fn real() -> Self {
        Machine {
            env: &|name| std::env::var(name).ok(),
            addrs: &interfaces::system_addrs,
            now_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

/// A bundle that passed, and what is worth a warning but not a refusal.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub bundle: Bundle,
    pub warnings: Vec<BundleWarning>,
}

/// Which file a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    ClusterEnv,
    MeshConfig,
    Token,
    RootCert,
    Hosts,
}

impl std::fmt::Display for FileKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileKind::ClusterEnv => "cluster.env",
            FileKind::MeshConfig => "mesh config",
            FileKind::Token => "token",
            FileKind::RootCert => "root cert",
            FileKind::Hosts => "hosts file",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{file} {path}: {source}")]
    Read {
        file: FileKind,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cluster.env {path}: {error}")]
    ClusterEnvLine { path: PathBuf, error: EnvLineError },
    #[error(
        "{name} is not set (not in cluster.env {path}, the environment or the mesh config's \
         proxyMetadata); it names the {what}, or pass {flag}"
    )]
    MissingVar {
        name: &'static str,
        what: &'static str,
        flag: &'static str,
        path: PathBuf,
    },
    #[error("{name} from the {from}: {reason}")]
    BadVar {
        name: &'static str,
        from: VarSource,
        reason: String,
    },
    #[error("mesh config {path}: {reason}")]
    MeshConfig { path: PathBuf, reason: String },
    #[error(
        "mesh config {path}: no defaultConfig.discoveryAddress (the control plane's host:port); \
         or pass --discovery-address"
    )]
    NoDiscoveryAddress { path: PathBuf },
    #[error("discovery address {text:?} (from {from}): {reason}")]
    DiscoveryAddress {
        text: String,
        from: String,
        reason: DiscoveryError,
    },
    #[error(
        "hosts file {path}: no entry for the discovery host {host} (the shim finds its control \
         plane only there or as an IP, never through DNS; add a line `IP {host}`)"
    )]
    HostNotInHosts { host: String, path: PathBuf },
    #[error("token {path}: {reason}")]
    Token { path: PathBuf, reason: TokenError },
    #[error("root cert {path}: {reason}")]
    RootCert {
        path: PathBuf,
        reason: RootCertError,
    },
    #[error("no address for this VM: {reason}; set ISTIO_SVC_IP (in cluster.env or the environment) or pass --address")]
    NoAddress { reason: String },
}

/// Worth saying, not worth refusing to start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleWarning {
    #[error(
        "token {path}: expired {ago}s ago (exp {exp}); registration fails until a new token is \
         written there"
    )]
    TokenExpired { path: PathBuf, exp: u64, ago: u64 },
    #[error(
        "token {path}: it is for {what} {token:?} but the bundle says {bundle:?}; the control \
         plane refuses a registration whose token does not match the WorkloadGroup"
    )]
    TokenMismatch {
        path: PathBuf,
        what: &'static str,
        token: String,
        bundle: String,
    },
}

/// Reads and checks every file, and returns the bundle or every problem found.
pub fn load(
    paths: &BundlePaths,
    o: &Overrides,
    m: &Machine<'_>,
) -> Result<Loaded, Vec<BundleError>> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();

    let read = |file, path: &Path| -> Result<String, BundleError> {
        std::fs::read_to_string(path).map_err(|source| BundleError::Read {
            file,
            path: path.to_path_buf(),
            source,
        })
    };

    let env_file = match read(FileKind::ClusterEnv, &paths.cluster_env) {
        Ok(text) => {
            let parsed = parse_cluster_env(&text);
            errors.extend(
                parsed
                    .errors
                    .into_iter()
                    .map(|error| BundleError::ClusterEnvLine {
                        path: paths.cluster_env.clone(),
                        error,
                    }),
            );
            Some(parsed.vars)
        }
        Err(e) => {
            errors.push(e);
            None
        }
    };

    let mesh = match read(FileKind::MeshConfig, &paths.mesh_config) {
        Ok(text) => parse_mesh_config(&text)
            .map_err(|reason| {
                errors.push(BundleError::MeshConfig {
                    path: paths.mesh_config.clone(),
                    reason,
                })
            })
            .ok(),
        Err(BundleError::Read { source, .. })
            if source.kind() == io::ErrorKind::NotFound
                && !paths.mesh_config_named
                && o.discovery_address.is_some() =>
        {
            Some(MeshConfig::default())
        }
        Err(e) => {
            errors.push(e);
            None
        }
    };

    let empty = BTreeMap::new();
    let layers = Layers {
        env: m.env,
        file: env_file.as_ref().unwrap_or(&empty),
        meta: mesh.as_ref().map_or(&empty, |c| &c.proxy_metadata),
    };
    let get = |name: &str| layers.get(name).map(|(v, _)| v).unwrap_or_default();
    // A missing variable is only news when cluster.env was read: otherwise that is the error.
    let mut required = |name: &'static str, what, flag, over: &Option<String>| -> String {
        if let Some(v) = over {
            return v.clone();
        }
        match layers.get(name) {
            Some((v, _)) if !v.is_empty() => v,
            _ => {
                if env_file.is_some() {
                    errors.push(BundleError::MissingVar {
                        name,
                        what,
                        flag,
                        path: paths.cluster_env.clone(),
                    });
                }
                String::new()
            }
        }
    };
    let group = required(VAR_GROUP, "WorkloadGroup", "--group", &o.group);
    let namespace = required(
        VAR_NAMESPACE,
        "WorkloadGroup's namespace",
        "--namespace",
        &o.namespace,
    );
    let network = o.network.clone().unwrap_or_else(|| get(VAR_NETWORK));

    let labels = match layers.get(VAR_LABELS) {
        Some((text, from)) if !text.trim().is_empty() => {
            parse_labels(&text).unwrap_or_else(|reason| {
                errors.push(BundleError::BadVar {
                    name: VAR_LABELS,
                    from,
                    reason,
                });
                BTreeMap::new()
            })
        }
        _ => BTreeMap::new(),
    };
    let locality = locality_of(&labels);

    let address = match resolve_address(o, &layers, m) {
        Ok(a) => Some(a),
        Err(e) => {
            errors.push(e);
            None
        }
    };

    let discovery = discovery(paths, o, mesh.as_ref(), &mut errors);

    let token = match read_token(&paths.token) {
        Ok(t) => Some(t.claims),
        Err(reason) => {
            errors.push(BundleError::Token {
                path: paths.token.clone(),
                reason,
            });
            None
        }
    };

    let root_cert_pem = match std::fs::read(&paths.root_cert) {
        Ok(pem) => match check_root_cert(&pem) {
            Ok(_) => Some(pem),
            Err(reason) => {
                errors.push(BundleError::RootCert {
                    path: paths.root_cert.clone(),
                    reason,
                });
                None
            }
        },
        Err(source) => {
            errors.push(BundleError::Read {
                file: FileKind::RootCert,
                path: paths.root_cert.clone(),
                source,
            });
            None
        }
    };

    let service_account = get(VAR_SERVICE_ACCOUNT);
    if let Some(claims) = &token {
        warnings.extend(token_warnings(
            &paths.token,
            claims,
            &namespace,
            &service_account,
            m.now_unix,
        ));
    }

    match (address, discovery, token, root_cert_pem) {
        (Some((address, address_source)), Some(discovery), Some(token), Some(root_cert_pem))
            if errors.is_empty() =>
        {
            Ok(Loaded {
                bundle: Bundle {
                    group,
                    namespace,
                    service_account,
                    network,
                    labels,
                    locality,
                    canonical_service: get(VAR_CANONICAL_SERVICE),
                    canonical_revision: get(VAR_CANONICAL_REVISION),
                    trust_domain: get(VAR_TRUST_DOMAIN),
                    inbound_ports: get(VAR_INBOUND_PORTS),
                    local_exclude_ports: get(VAR_LOCAL_EXCLUDE_PORTS),
                    address,
                    address_source,
                    discovery,
                    token_path: paths.token.clone(),
                    token,
                    root_cert_path: paths.root_cert.clone(),
                    root_cert_pem,
                    vars: layers.merged(),
                    paths: paths.clone(),
                },
                warnings,
            })
        }
        _ => Err(errors),
    }
}

/// The variable layers, highest first: process environment (non-empty values only),
/// cluster.env, proxyMetadata.
struct Layers<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    file: &'a BTreeMap<String, String>,
    meta: &'a BTreeMap<String, String>,
}

impl Layers<'_> {
    fn get(&self, name: &str) -> Option<(String, VarSource)> {
        if let Some(v) = (self.env)(name).filter(|v| !v.is_empty()) {
            return Some((v, VarSource::Environment));
        }
        if let Some(v) = self.file.get(name) {
            return Some((v.clone(), VarSource::ClusterEnv));
        }
        self.meta
            .get(name)
            .map(|v| (v.clone(), VarSource::ProxyMetadata))
    }

    fn merged(&self) -> BTreeMap<String, String> {
        let names = self
            .meta
            .keys()
            .chain(self.file.keys())
            .map(String::as_str)
            .chain(VARS);
        names
            .filter_map(|n| self.get(n).map(|(v, _)| (n.to_string(), v)))
            .collect()
    }
}

fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    serde_json::from_str(text).map_err(|e| format!("expected a JSON object of string labels: {e}"))
}

/// The locality pilot-agent would take from these labels (see [`LABEL_LOCALITY`]).
pub fn locality_of(labels: &BTreeMap<String, String>) -> String {
    if let Some(l) = labels.get(LABEL_LOCALITY) {
        return l.clone();
    }
    match labels.get(LABEL_LOCALITY_LEGACY) {
        Some(l) if l.contains('/') => l.clone(),
        Some(l) => l.replace('.', "/"),
        None => String::new(),
    }
}

fn resolve_address(
    o: &Overrides,
    layers: &Layers<'_>,
    m: &Machine<'_>,
) -> Result<(IpAddr, AddressSource), BundleError> {
    if let Some(ip) = o.address {
        return Ok((ip, AddressSource::Flag));
    }
    for name in [VAR_SVC_IP, VAR_INSTANCE_IP] {
        let Some((text, from)) = layers.get(name).filter(|(v, _)| !v.trim().is_empty()) else {
            continue;
        };
        let bad = |reason: &str| BundleError::BadVar {
            name,
            from,
            reason: format!("{text:?}: {reason}"),
        };
        let ip: IpAddr = text.trim().parse().map_err(|_| bad("not an IP address"))?;
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(bad("not a unicast address"));
        }
        return Ok((ip, AddressSource::Variable { name, from }));
    }
    let addrs = (m.addrs)().map_err(|e| BundleError::NoAddress {
        reason: format!("cannot read this machine's addresses: {e}"),
    })?;
    interfaces::pick_address(&addrs)
        .map(|a| (a.ip, AddressSource::Interface(a.interface.clone())))
        .ok_or_else(|| BundleError::NoAddress {
            reason: "this machine has no address but loopback and link-local ones".into(),
        })
}

fn discovery(
    paths: &BundlePaths,
    o: &Overrides,
    mesh: Option<&MeshConfig>,
    errors: &mut Vec<BundleError>,
) -> Option<Discovery> {
    let (text, from) = match (&o.discovery_address, mesh) {
        (Some(text), _) => (text.clone(), "--discovery-address".to_string()),
        (None, Some(mesh)) => match &mesh.discovery_address {
            Some(text) => (
                text.clone(),
                format!("mesh config {}", paths.mesh_config.display()),
            ),
            None => {
                errors.push(BundleError::NoDiscoveryAddress {
                    path: paths.mesh_config.clone(),
                });
                return None;
            }
        },
        // The mesh config's own error is reported already.
        (None, None) => return None,
    };
    let mut parsed = Vec::new();
    for item in text.split(',') {
        match parse_host_port(item) {
            Ok((host, port)) => parsed.push((item.trim().to_string(), host, port)),
            Err(reason) => {
                errors.push(BundleError::DiscoveryAddress {
                    text: item.trim().to_string(),
                    from: from.clone(),
                    reason,
                });
            }
        }
    }
    if parsed.len() != text.split(',').count() {
        return None;
    }
    let named = parsed.iter().any(|(_, h, _)| matches!(h, Host::Name(_)));
    let hosts = if paths.hosts_named || named {
        match std::fs::read_to_string(&paths.hosts) {
            Ok(t) => Some(t),
            Err(source) => {
                errors.push(BundleError::Read {
                    file: FileKind::Hosts,
                    path: paths.hosts.clone(),
                    source,
                });
                return None;
            }
        }
    } else {
        None
    };
    let mut targets = Vec::new();
    let mut missing = false;
    for (address, host, port) in parsed {
        let (ips, server_name) = match host {
            Host::Ip(ip) => (vec![ip], ip.to_string()),
            Host::Name(name) => {
                let ips = lookup_hosts_all(hosts.as_deref().unwrap_or(""), &name);
                if ips.is_empty() {
                    errors.push(BundleError::HostNotInHosts {
                        host: name,
                        path: paths.hosts.clone(),
                    });
                    missing = true;
                    continue;
                }
                (ips, name)
            }
        };
        for ip in ips {
            let connect = SocketAddr::new(ip, port);
            if !targets.iter().any(|t: &Target| t.connect == connect) {
                targets.push(Target {
                    address: address.clone(),
                    server_name: server_name.clone(),
                    connect,
                });
            }
        }
    }
    if missing {
        return None;
    }
    Some(Discovery {
        address: text,
        targets,
        hosts_file: named.then(|| paths.hosts.clone()),
    })
}

fn token_warnings(
    path: &Path,
    claims: &TokenClaims,
    namespace: &str,
    service_account: &str,
    now: u64,
) -> Vec<BundleWarning> {
    let mut out = Vec::new();
    if let Some(exp) = claims.expires.filter(|&exp| exp <= now) {
        out.push(BundleWarning::TokenExpired {
            path: path.to_path_buf(),
            exp,
            ago: now - exp,
        });
    }
    let mut differs = |what, token: &Option<String>, bundle: &str| {
        if let Some(t) = token
            .as_deref()
            .filter(|t| !bundle.is_empty() && t != &bundle)
        {
            out.push(BundleWarning::TokenMismatch {
                path: path.to_path_buf(),
                what,
                token: t.to_string(),
                bundle: bundle.to_string(),
            });
        }
    };
    differs("namespace", &claims.namespace, namespace);
    differs("service account", &claims.service_account, service_account);
    out
}

// ---------------------------------------------------------------------------------------------
// cluster.env

/// cluster.env's variables, and its lines that could not be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedEnv {
    pub vars: BTreeMap<String, String>,
    pub errors: Vec<EnvLineError>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct EnvLineError {
    /// 1-based.
    pub line: usize,
    pub reason: EnvLineReason,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvLineReason {
    #[error("expected NAME=value")]
    NoAssignment,
    #[error("{0:?} is not a variable name (letters, digits and _, not starting with a digit)")]
    BadName(String),
    #[error("unterminated {0} quote (a value must end on its line)")]
    Unterminated(&'static str),
    #[error("unquoted `{0}` would be expanded by a shell; put the value in single quotes")]
    Expansion(char),
    #[error("unquoted {0:?} ends the value for a shell; quote the whole value")]
    Unquoted(char),
    #[error("text after the value; quote a value with spaces")]
    TrailingText,
    #[error("a backslash ends the line (continuation lines are not supported)")]
    Continuation,
}

/// Parses cluster.env: one `NAME=value` a line, as a POSIX shell would assign it, which is how
/// Istio reads the file (`istio-start.sh` sources it) and how systemd's `EnvironmentFile=`
/// reads such simple lines. The value may be unquoted, in single quotes (verbatim), in double
/// quotes (backslash escapes `\" \\ \$ \``), or several of these joined, so istioctl's
/// `'it'"'"'s'` and vm-bundle's `'it'\''s'` both give `it's`. Blank lines, `#` comments
/// (whole lines, or after a value and a space) and an `export ` prefix are allowed. What a
/// shell would do more with (`$` expansion, command substitution, a `;` starting another
/// command, a value broken over lines) is an error rather than a guess. Later lines win.
pub fn parse_cluster_env(text: &str) -> ParsedEnv {
    let mut out = ParsedEnv::default();
    for (i, line) in text.lines().enumerate() {
        match parse_env_line(line) {
            Ok(Some((name, value))) => {
                out.vars.insert(name, value);
            }
            Ok(None) => {}
            Err(reason) => out.errors.push(EnvLineError {
                line: i + 1,
                reason,
            }),
        }
    }
    out
}

fn parse_env_line(line: &str) -> Result<Option<(String, String)>, EnvLineReason> {
    let line = line.trim_start_matches([' ', '\t']);
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let line = line
        .strip_prefix("export")
        .filter(|rest| rest.starts_with([' ', '\t']))
        .map_or(line, |rest| rest.trim_start_matches([' ', '\t']));
    let (name, value) = line.split_once('=').ok_or(EnvLineReason::NoAssignment)?;
    let valid_name = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        return Err(if name.contains([' ', '\t']) || name.is_empty() {
            EnvLineReason::NoAssignment
        } else {
            EnvLineReason::BadName(name.to_string())
        });
    }
    Ok(Some((name.to_string(), shell_word(value)?)))
}

/// One shell word (the value), then nothing but an optional comment.
fn shell_word(text: &str) -> Result<String, EnvLineReason> {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next() {
                    Some('\'') => break,
                    Some(c) => out.push(c),
                    None => return Err(EnvLineReason::Unterminated("single")),
                }
            },
            '"' => loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c @ ('"' | '\\' | '$' | '`')) => out.push(c),
                        Some(c) => {
                            out.push('\\');
                            out.push(c);
                        }
                        None => return Err(EnvLineReason::Continuation),
                    },
                    Some(c @ ('$' | '`')) => return Err(EnvLineReason::Expansion(c)),
                    Some(c) => out.push(c),
                    None => return Err(EnvLineReason::Unterminated("double")),
                }
            },
            '\\' => match chars.next() {
                Some(c) => out.push(c),
                None => return Err(EnvLineReason::Continuation),
            },
            '$' | '`' => return Err(EnvLineReason::Expansion(c)),
            ';' | '&' | '|' | '<' | '>' | '(' | ')' => return Err(EnvLineReason::Unquoted(c)),
            ' ' | '\t' => {
                let rest = chars.as_str().trim_start_matches([' ', '\t']);
                if rest.is_empty() || rest.starts_with('#') {
                    break;
                }
                return Err(EnvLineReason::TrailingText);
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Mesh config

/// The parts of Istio's mesh config the shim uses; everything else in it is ignored.
/// `defaultConfig.readinessProbe` is ignored too: registration returns the group's probe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshConfig {
    /// `defaultConfig.discoveryAddress`, `host:port`.
    pub discovery_address: Option<String>,
    /// `defaultConfig.proxyMetadata`: variables below cluster.env (see the module doc).
    pub proxy_metadata: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct MeshFile {
    #[serde(default)]
    default_config: Option<ProxyConfigFile>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProxyConfigFile {
    #[serde(default)]
    discovery_address: Option<String>,
    #[serde(default)]
    proxy_metadata: Option<BTreeMap<String, serde_norway::Value>>,
}

/// Parses the mesh config (YAML, as `/etc/istio/config/mesh` or a bundle's `mesh.yaml`).
/// A proxyMetadata value written as a YAML bool or number (`true` for `"true"`) is taken as
/// its text; a list or map there is an error. An empty file is an empty config.
pub fn parse_mesh_config(text: &str) -> Result<MeshConfig, String> {
    let file: Option<MeshFile> = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    let Some(dc) = file.and_then(|f| f.default_config) else {
        return Ok(MeshConfig::default());
    };
    let mut proxy_metadata = BTreeMap::new();
    for (k, v) in dc.proxy_metadata.unwrap_or_default() {
        let v = match v {
            serde_norway::Value::String(s) => s,
            serde_norway::Value::Bool(b) => b.to_string(),
            serde_norway::Value::Number(n) => n.to_string(),
            serde_norway::Value::Null => String::new(),
            _ => {
                return Err(format!(
                    "defaultConfig.proxyMetadata.{k}: expected a string"
                ))
            }
        };
        proxy_metadata.insert(k, v);
    }
    Ok(MeshConfig {
        discovery_address: dc.discovery_address.filter(|a| !a.trim().is_empty()),
        proxy_metadata,
    })
}

// ---------------------------------------------------------------------------------------------
// Discovery address and hosts file

/// The host part of `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    /// Lower-cased, without a trailing dot.
    Name(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    #[error("expected HOST:PORT or [IPv6]:PORT")]
    Shape,
    #[error("the port is not a number 1-65535")]
    Port,
    #[error("the host is neither an IP address nor a DNS name")]
    Host,
}

/// Parses `host:port`, `IPv4:PORT` or `[IPv6]:PORT`.
pub fn parse_host_port(text: &str) -> Result<(Host, u16), DiscoveryError> {
    let text = text.trim();
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or(DiscoveryError::Shape)?;
        let port = after.strip_prefix(':').ok_or(DiscoveryError::Shape)?;
        let ip: std::net::Ipv6Addr = host.parse().map_err(|_| DiscoveryError::Host)?;
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = text.rsplit_once(':').ok_or(DiscoveryError::Shape)?;
        if host.contains(':') {
            return Err(DiscoveryError::Shape);
        }
        let host = match host.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(dns_name(host).ok_or(DiscoveryError::Host)?),
        };
        (host, port)
    };
    let port: u16 = port.parse().map_err(|_| DiscoveryError::Port)?;
    if port == 0 {
        return Err(DiscoveryError::Port);
    }
    Ok((host, port))
}

/// A host name as RFC 1123 allows it (plus `_`, which Kubernetes names do not use but some
/// DNS names do), lower-cased, without a trailing dot.
fn dns_name(text: &str) -> Option<String> {
    let name = text.strip_suffix('.').unwrap_or(text);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    ok.then(|| name.to_ascii_lowercase())
}

/// The first address /etc/hosts-format `text` gives `name` (canonical name or alias,
/// compared without case and trailing dot). `#` starts a comment anywhere; lines whose address
/// does not parse are skipped, as glibc skips them. IPv6 zones (`fe80::1%eth0`) are not read.
pub fn lookup_hosts(text: &str, name: &str) -> Option<IpAddr> {
    lookup_hosts_all(text, name).into_iter().next()
}

/// Every address /etc/hosts-format `text` gives `name`, in file order without repeats: a name
/// on several lines is a name with several addresses (glibc's `multi on`), as a DNS name with
/// several A records (`istiod.istio-system.svc` with several replicas).
pub fn lookup_hosts_all(text: &str, name: &str) -> Vec<IpAddr> {
    let want = name.trim_end_matches('.');
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        if words.any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(want)) && !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Token

/// What the service-account token says, as far as the VM cares before the control plane
/// verifies it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenClaims {
    /// `exp`, seconds since the Unix epoch.
    pub expires: Option<u64>,
    /// From the `kubernetes.io` claims, else from `sub` (`system:serviceaccount:NS:SA`).
    pub namespace: Option<String>,
    pub service_account: Option<String>,
}

/// A token as read from its file.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The JWT, without surrounding whitespace: the bearer credential.
    pub jwt: String,
    pub claims: TokenClaims,
}

/// Never shows the JWT (a bearer credential); the claims that matter to the VM are enough to
/// tell tokens apart in a log.
impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("claims", &self.claims)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Read(io::Error),
    #[error("the file is empty")]
    Empty,
    #[error("not a JWT ({0}); expected three base64url parts separated by dots")]
    NotJwt(&'static str),
}

/// Reads a token file and checks it is shaped like a JWT (see [`parse_token`]). The
/// control-plane client calls this on every rotation.
pub fn read_token(path: &Path) -> Result<Token, TokenError> {
    let text = std::fs::read_to_string(path).map_err(TokenError::Read)?;
    let jwt = text.trim().to_string();
    let claims = parse_token(&jwt)?;
    Ok(Token { jwt, claims })
}

/// Checks that `text` is a JWT: three base64url parts, the first two JSON objects. The
/// signature is not checked (the control plane does that).
pub fn parse_token(text: &str) -> Result<TokenClaims, TokenError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(TokenError::Empty);
    }
    let parts: Vec<&str> = text.split('.').collect();
    let [header, payload, signature] = parts[..] else {
        return Err(TokenError::NotJwt("not three parts"));
    };
    let decode = |part: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .ok()
            .filter(|b| !b.is_empty())
    };
    let object = |part: &str| -> Option<serde_json::Map<String, serde_json::Value>> {
        serde_json::from_slice(&decode(part)?).ok()
    };
    object(header).ok_or(TokenError::NotJwt("the header is not base64url JSON"))?;
    let claims = object(payload).ok_or(TokenError::NotJwt("the payload is not base64url JSON"))?;
    decode(signature).ok_or(TokenError::NotJwt("the signature is not base64url"))?;

    let k8s = claims.get("kubernetes.io");
    let text_at = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_string);
    let sub = text_at(claims.get("sub"));
    let sub_parts: Vec<&str> = sub
        .as_deref()
        .and_then(|s| s.strip_prefix("system:serviceaccount:"))
        .map(|s| s.splitn(2, ':').collect())
        .unwrap_or_default();
    Ok(TokenClaims {
        expires: claims.get("exp").and_then(|e| {
            e.as_u64()
                .or_else(|| e.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        }),
        namespace: text_at(k8s.and_then(|k| k.get("namespace")))
            .or_else(|| sub_parts.first().map(|s| s.to_string())),
        service_account: text_at(
            k8s.and_then(|k| k.get("serviceaccount"))
                .and_then(|s| s.get("name")),
        )
        .or_else(|| sub_parts.get(1).map(|s| s.to_string())),
    })
}

// ---------------------------------------------------------------------------------------------
// Root certificate

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RootCertError {
    #[error("no CERTIFICATE block in PEM")]
    NoCertificate,
    #[error("bad PEM: {0}")]
    Pem(String),
    #[error("a CERTIFICATE block does not hold a DER certificate")]
    NotDer,
}

/// Checks that `pem` holds at least one CERTIFICATE block, each decodable and starting like
/// DER (an ASN.1 SEQUENCE); returns how many. Whether they are valid CA certificates is for
/// the TLS handshake to find out.
pub fn check_root_cert(pem: &[u8]) -> Result<usize, RootCertError> {
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| RootCertError::Pem(e.to_string()))?;
        if cert.first() != Some(&0x30) || cert.len() < 64 {
            return Err(RootCertError::NotDer);
        }
        n += 1;
    }
    if n == 0 {
        return Err(RootCertError::NoCertificate);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_ok(text: &str) -> BTreeMap<String, String> {
        let parsed = parse_cluster_env(text);
        assert!(parsed.errors.is_empty(), "{text:?}: {:?}", parsed.errors);
        parsed.vars
    }

    #[test]
    fn cluster_env_values_table() {
        let cases: &[(&str, &str)] = &[
            ("A='python-http'", "python-http"),
            ("A=python-http", "python-http"),
            ("A=\"python-http\"", "python-http"),
            ("A=''", ""),
            ("A=", ""),
            ("A=\"\"", ""),
            // vm-bundle's quoting of a single quote, and istioctl's.
            (r"A='it'\''s'", "it's"),
            (r#"A='it'"'"'s'"#, "it's"),
            // JSON labels as both write them.
            (
                r#"A='{"app":"python-http","version":"v1"}'"#,
                r#"{"app":"python-http","version":"v1"}"#,
            ),
            ("A='a b  c'", "a b  c"),
            ("A='$HOME `x` \\n'", "$HOME `x` \\n"),
            (r#"A="say \"hi\" \\ \$ \` \n""#, r#"say "hi" \ $ ` \n"#),
            (r"A=a\ b", "a b"),
            ("A=a#b", "a#b"),
            ("A='v' # a comment", "v"),
            ("A=v\t# a comment", "v"),
            ("A='v'   ", "v"),
            ("export A='v'", "v"),
            ("  \tA='v'", "v"),
            ("A=15090,15021,15020", "15090,15021,15020"),
            ("A=*", "*"),
            ("A=x=y", "x=y"),
        ];
        for (line, want) in cases {
            let vars = env_ok(line);
            assert_eq!(vars.get("A").map(String::as_str), Some(*want), "{line}");
        }
    }

    #[test]
    fn cluster_env_errors_carry_line_numbers() {
        let text = "\
# istioctl output
ISTIO_META_AUTO_REGISTER_GROUP='python-http'

POD_NAMESPACE='vm-namespace
just words
1BAD=x
A=$HOME
B=\"${X}\"
C=a b
D=a;b
E=x\\
F='ok'
 = x
G=`id`
exportH=1
";
        let parsed = parse_cluster_env(text);
        let got: Vec<(usize, EnvLineReason)> = parsed
            .errors
            .into_iter()
            .map(|e| (e.line, e.reason))
            .collect();
        assert_eq!(
            got,
            vec![
                (4, EnvLineReason::Unterminated("single")),
                (5, EnvLineReason::NoAssignment),
                (6, EnvLineReason::BadName("1BAD".into())),
                (7, EnvLineReason::Expansion('$')),
                (8, EnvLineReason::Expansion('$')),
                (9, EnvLineReason::TrailingText),
                (10, EnvLineReason::Unquoted(';')),
                (11, EnvLineReason::Continuation),
                (13, EnvLineReason::NoAssignment),
                (14, EnvLineReason::Expansion('`')),
            ]
        );
        let vars: Vec<(&str, &str)> = parsed
            .vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            vars,
            [
                ("F", "ok"),
                ("ISTIO_META_AUTO_REGISTER_GROUP", "python-http"),
                ("exportH", "1")
            ]
        );
        let shown = parse_cluster_env("x").errors[0].to_string();
        assert_eq!(shown, "line 1: expected NAME=value");
    }

    #[test]
    fn cluster_env_later_lines_win() {
        assert_eq!(env_ok("A=1\nA=2\n")["A"], "2");
    }

    #[test]
    fn mesh_config_table() {
        // (text, Ok((discoveryAddress, proxyMetadata)) or Err(part of the message))
        type Want<'a> = Result<(Option<&'a str>, &'a [(&'a str, &'a str)]), &'a str>;
        let cases: &[(&str, Want)] = &[
            (
                "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n  \
                 proxyMetadata:\n    ISTIO_META_DNS_CAPTURE: \"true\"\n    MESH: ''\n  \
                 readinessProbe:\n    httpGet:\n      port: 8080\n",
                Ok((
                    Some("istiod.istio-system.svc:15012"),
                    &[("ISTIO_META_DNS_CAPTURE", "true"), ("MESH", "")],
                )),
            ),
            // Istio's mesh config has many more fields; they are ignored.
            (
                "accessLogFile: /dev/stdout\ntrustDomain: cluster.local\ndefaultConfig:\n  \
                 discoveryAddress: 10.0.0.1:15012\n  tracing:\n    zipkin: {address: x:9411}\n",
                Ok((Some("10.0.0.1:15012"), &[])),
            ),
            // Unquoted YAML scalars are taken as their text.
            (
                "defaultConfig:\n  proxyMetadata:\n    A: true\n    B: 15\n    C:\n",
                Ok((None, &[("A", "true"), ("B", "15"), ("C", "")])),
            ),
            ("", Ok((None, &[]))),
            ("# only a comment\n", Ok((None, &[]))),
            ("defaultConfig:\n", Ok((None, &[]))),
            ("defaultConfig:\n  discoveryAddress: ''\n", Ok((None, &[]))),
            (
                "defaultConfig:\n  proxyMetadata:\n    A: [1, 2]\n",
                Err("defaultConfig.proxyMetadata.A: expected a string"),
            ),
            ("defaultConfig: [\n", Err("")),
            ("defaultConfig: 7\n", Err("")),
            ("defaultConfig:\n  discoveryAddress: [a]\n", Err("")),
        ];
        for (text, want) in cases {
            let got = parse_mesh_config(text);
            match (got, want) {
                (Ok(c), Ok((addr, meta))) => {
                    assert_eq!(c.discovery_address.as_deref(), *addr, "{text}");
                    let meta: BTreeMap<String, String> = meta
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    assert_eq!(c.proxy_metadata, meta, "{text}");
                }
                (Err(e), Err(want)) => assert!(e.contains(want), "{text}: {e}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn host_port_table() {
        let name = |n: &str| Host::Name(n.into());
        let ip = |i: &str| Host::Ip(i.parse().unwrap());
        type Want = Result<(Host, u16), DiscoveryError>;
        let cases: &[(&str, Want)] = &[
            (
                "istiod.istio-system.svc:15012",
                Ok((name("istiod.istio-system.svc"), 15012)),
            ),
            ("Istiod.Example.:443", Ok((name("istiod.example"), 443))),
            ("10.0.0.1:15012", Ok((ip("10.0.0.1"), 15012))),
            ("[2001:db8::1]:15012", Ok((ip("2001:db8::1"), 15012))),
            (" vmesh-control:15012 ", Ok((name("vmesh-control"), 15012))),
            ("istiod", Err(DiscoveryError::Shape)),
            ("2001:db8::1:15012", Err(DiscoveryError::Shape)),
            ("[2001:db8::1]15012", Err(DiscoveryError::Shape)),
            ("[istiod]:15012", Err(DiscoveryError::Host)),
            ("istiod:0", Err(DiscoveryError::Port)),
            ("istiod:http", Err(DiscoveryError::Port)),
            ("istiod:70000", Err(DiscoveryError::Port)),
            ("-bad.example:1", Err(DiscoveryError::Host)),
            ("a..b:1", Err(DiscoveryError::Host)),
            ("a b:1", Err(DiscoveryError::Host)),
            (":15012", Err(DiscoveryError::Host)),
        ];
        for (text, want) in cases {
            assert_eq!(&parse_host_port(text), want, "{text}");
        }
    }

    #[test]
    fn hosts_lookup_table() {
        let hosts = "\
# /etc/hosts
127.0.0.1\tlocalhost
::1     localhost ip6-localhost ip6-loopback
not-an-ip istiod.istio-system.svc
10.0.0.1 istiod.istio-system.svc istiod   # the control plane
10.0.0.2 istiod.istio-system.svc
2001:db8::5 vmesh-control.example. vmesh-control
fe80::1%eth0 scoped.example
#10.9.9.9 commented.example
10.0.0.3 other.example#comment-right-after
";
        let cases: &[(&str, Option<&str>)] = &[
            ("istiod.istio-system.svc", Some("10.0.0.1")),
            ("ISTIOD.istio-system.svc.", Some("10.0.0.1")),
            ("istiod", Some("10.0.0.1")),
            ("vmesh-control", Some("2001:db8::5")),
            ("vmesh-control.example", Some("2001:db8::5")),
            ("localhost", Some("127.0.0.1")),
            ("ip6-loopback", Some("::1")),
            ("other.example", Some("10.0.0.3")),
            ("commented.example", None),
            ("scoped.example", None),
            ("istio-system.svc", None),
            ("", None),
        ];
        for (name, want) in cases {
            let want = want.map(|w| w.parse::<IpAddr>().unwrap());
            assert_eq!(lookup_hosts(hosts, name), want, "{name}");
        }
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    fn jwt(claims: &str) -> String {
        format!(
            "{}.{}.{}",
            b64(r#"{"alg":"ES256","kid":"k"}"#),
            b64(claims),
            b64("sig")
        )
    }

    #[test]
    fn token_shapes_table() {
        let k8s = jwt(
            r#"{"iss":"x","sub":"system:serviceaccount:vm-namespace:vm-sa","exp":1700003600,
                "kubernetes.io":{"namespace":"vm-namespace","serviceaccount":{"name":"vm-sa","uid":"u"}}}"#,
        );
        assert_eq!(
            parse_token(&format!("{k8s}\n")).unwrap(),
            TokenClaims {
                expires: Some(1_700_003_600),
                namespace: Some("vm-namespace".into()),
                service_account: Some("vm-sa".into()),
            }
        );
        assert_eq!(
            parse_token(&jwt(r#"{"sub":"system:serviceaccount:ns:sa"}"#)).unwrap(),
            TokenClaims {
                expires: None,
                namespace: Some("ns".into()),
                service_account: Some("sa".into()),
            }
        );
        assert_eq!(parse_token(&jwt("{}")).unwrap(), TokenClaims::default());

        let bad: &[(&str, &str)] = &[
            ("", "empty"),
            ("  \n", "empty"),
            ("not-a-jwt", "not three parts"),
            ("a.b", "not three parts"),
            ("a.b.c.d", "not three parts"),
            (&format!("{}.{}.", b64("{}"), b64("{}")), "signature"),
            (&format!("!!.{}.{}", b64("{}"), b64("s")), "header"),
            (
                &format!("{}.{}.{}", b64("{}"), b64("[1]"), b64("s")),
                "payload",
            ),
            (
                &format!("{}.{}.{}", b64("x"), b64("{}"), b64("s")),
                "header",
            ),
        ];
        for (text, want) in bad {
            let e = parse_token(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn token_warnings_for_expiry_and_identity() {
        let claims = TokenClaims {
            expires: Some(1000),
            namespace: Some("ns".into()),
            service_account: Some("sa".into()),
        };
        let p = Path::new("/t");
        assert!(token_warnings(p, &claims, "ns", "sa", 999).is_empty());
        assert!(
            token_warnings(p, &claims, "ns", "", 10).is_empty(),
            "no SA in the bundle"
        );
        let w = token_warnings(p, &claims, "other", "sa2", 1000);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(matches!(w[0], BundleWarning::TokenExpired { ago: 0, .. }));
        assert!(w[1].to_string().contains("namespace \"ns\""), "{}", w[1]);
        assert!(w[2].to_string().contains("service account"), "{}", w[2]);
    }

    // A self-signed P-256 certificate made with openssl for these tests; only its shape matters.
    const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBizCCATGgAwIBAgIUdI+vAp0kE/uLnq18ZkfEjudK/igwCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPdm1lc2ggdGVzdCByb290MCAXDTI2MTEzMDA2MDgwOFoYDzIx
MjYxMTA2MDYwODA4WjAaMRgwFgYDVQQDDA92bWVzaCB0ZXN0IHJvb3QwWTATBgcq
hkjOPQIBBggqhkjOPQMBBwNCAAS2RynEaCghA5rl9pd7tqRNY5jOOfYVWHTgQyn8
dZCojE+MSN6y+YzNN3RZcwYy0sYpkjSH8jHxSYGN+Pfns2cMo1MwUTAdBgNVHQ4E
FgQUbWt/94EaVMkBQInamO5pGtFKM+YwHwYDVR0jBBgwFoAUbWt/94EaVMkBQIna
mO5pGtFKM+YwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiBJo78s
IkE3qNaW8qgn29aN4K12q2DPhYQP0D6ySG3qygIhAKabTsOqYn3R0g7wgmotbWae
zbWKdM0gKDTibeCX8m19
-----END CERTIFICATE-----
";

    #[test]
    fn root_cert_table() {
        let two = format!("{CERT_PEM}{CERT_PEM}");
        let with_key = format!(
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n{CERT_PEM}"
        );
        let cases: &[(&str, Result<usize, &str>)] = &[
            (CERT_PEM, Ok(1)),
            (&two, Ok(2)),
            (&with_key, Ok(1)),
            ("", Err("no CERTIFICATE")),
            ("hello\n", Err("no CERTIFICATE")),
            (
                "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
                Err("no CERTIFICATE"),
            ),
            (
                "-----BEGIN CERTIFICATE-----\nMIIB\n",
                Err("bad PEM"),
            ),
            (
                "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
                Err("bad PEM"),
            ),
            (
                "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
                Err("DER"),
            ),
        ];
        for (pem, want) in cases {
            match (check_root_cert(pem.as_bytes()), want) {
                (Ok(n), Ok(w)) => assert_eq!(n, *w),
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{pem}: {e}"),
                (got, want) => panic!("{pem}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn locality_from_labels_like_pilot_agent() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], ""),
            (&[("app", "x")], ""),
            (
                &[(LABEL_LOCALITY, "us-east1/us-east1-b")],
                "us-east1/us-east1-b",
            ),
            (
                &[(LABEL_LOCALITY_LEGACY, "us-east1.us-east1-b.rack1")],
                "us-east1/us-east1-b/rack1",
            ),
            (&[(LABEL_LOCALITY_LEGACY, "r/z.1")], "r/z.1"),
            (
                &[(LABEL_LOCALITY, "a/b"), (LABEL_LOCALITY_LEGACY, "c.d")],
                "a/b",
            ),
        ];
        for (pairs, want) in cases {
            assert_eq!(locality_of(&labels(pairs)), *want, "{pairs:?}");
        }
    }

    // --- load(): the precedence rules over real files -----------------------------------

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir()
                .join(format!("vmesh-bundle-unit-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.0.join(name), text).unwrap();
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn bundle_dir(tag: &str, cluster_env: &str) -> Dir {
        let d = Dir::new(tag);
        d.write(BUNDLE_CLUSTER_ENV, cluster_env);
        d.write(
            BUNDLE_MESH_CONFIG,
            "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n  \
             proxyMetadata:\n    ISTIO_META_NETWORK: meta-net\n    TRUST_DOMAIN: meta.local\n",
        );
        d.write(
            BUNDLE_TOKEN,
            &jwt(r#"{"sub":"system:serviceaccount:vm-namespace:vm-sa","exp":2000}"#),
        );
        d.write(BUNDLE_ROOT_CERT, CERT_PEM);
        d.write(BUNDLE_HOSTS, "10.0.0.1 istiod.istio-system.svc\n");
        d
    }

    const ENV: &str =
        "ISTIO_META_AUTO_REGISTER_GROUP='python-http'\nPOD_NAMESPACE='vm-namespace'\n\
                       SERVICE_ACCOUNT='vm-sa'\nTRUST_DOMAIN='cluster.local'\n";

    fn machine<'a>(
        env: &'a dyn Fn(&str) -> Option<String>,
        addrs: &'a dyn Fn() -> io::Result<Vec<InterfaceAddr>>,
    ) -> Machine<'a> {
        Machine {
            env,
            addrs,
            now_unix: 1000,
        }
    }

    fn eth0() -> io::Result<Vec<InterfaceAddr>> {
        Ok(vec![
            InterfaceAddr {
                interface: "lo".into(),
                index: 1,
                ip: "127.0.0.1".parse().unwrap(),
                transient: false,
            },
            InterfaceAddr {
                interface: "eth0".into(),
                index: 2,
                ip: "10.0.0.5".parse().unwrap(),
                transient: false,
            },
        ])
    }

    #[test]
    fn address_precedence_table() {
        let d = bundle_dir("addr", ENV);
        let paths = BundlePaths::in_dir(&d.0);
        type Case<'a> = (
            &'a str,                  // cluster.env additions
            &'a [(&'a str, &'a str)], // process environment
            Option<&'a str>,          // --address
            &'a str,                  // want
            AddressSource,
        );
        let var = |name, from| AddressSource::Variable { name, from };
        let cases: Vec<Case> = vec![
            (
                "",
                &[],
                None,
                "10.0.0.5",
                AddressSource::Interface("eth0".into()),
            ),
            (
                "INSTANCE_IP=10.1.1.2\n",
                &[],
                None,
                "10.1.1.2",
                var(VAR_INSTANCE_IP, VarSource::ClusterEnv),
            ),
            (
                "INSTANCE_IP=10.1.1.2\nISTIO_SVC_IP=10.1.1.1\n",
                &[],
                None,
                "10.1.1.1",
                var(VAR_SVC_IP, VarSource::ClusterEnv),
            ),
            (
                "ISTIO_SVC_IP=10.1.1.1\n",
                &[("ISTIO_SVC_IP", "10.2.2.2")],
                None,
                "10.2.2.2",
                var(VAR_SVC_IP, VarSource::Environment),
            ),
            (
                "ISTIO_SVC_IP=10.1.1.1\n",
                &[("INSTANCE_IP", "10.2.2.3")],
                None,
                "10.1.1.1",
                var(VAR_SVC_IP, VarSource::ClusterEnv),
            ),
            // An empty variable counts as unset, as `istio-start.sh`'s `-z` test has it.
            (
                "ISTIO_SVC_IP=''\n",
                &[("ISTIO_SVC_IP", ""), ("INSTANCE_IP", "fd00::7")],
                None,
                "fd00::7",
                var(VAR_INSTANCE_IP, VarSource::Environment),
            ),
            (
                "ISTIO_SVC_IP=10.1.1.1\n",
                &[("ISTIO_SVC_IP", "10.2.2.2")],
                Some("10.3.3.3"),
                "10.3.3.3",
                AddressSource::Flag,
            ),
        ];
        for (extra, env, flag, want, source) in cases {
            d.write(BUNDLE_CLUSTER_ENV, &format!("{ENV}{extra}"));
            let lookup = |n: &str| {
                env.iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.to_string())
            };
            let o = Overrides {
                address: flag.map(|f| f.parse().unwrap()),
                ..Overrides::default()
            };
            let b = load(&paths, &o, &machine(&lookup, &eth0)).unwrap().bundle;
            assert_eq!(
                b.address,
                want.parse::<IpAddr>().unwrap(),
                "{extra} {env:?}"
            );
            assert_eq!(b.address_source, source, "{extra} {env:?}");
        }
    }

    #[test]
    fn bad_or_missing_addresses_are_errors() {
        let d = bundle_dir("badaddr", &format!("{ENV}ISTIO_SVC_IP=vm.example\n"));
        let paths = BundlePaths::in_dir(&d.0);
        let errors = load(&paths, &Overrides::default(), &machine(&|_| None, &eth0)).unwrap_err();
        assert!(
            matches!(
                &errors[..],
                [BundleError::BadVar {
                    name: VAR_SVC_IP,
                    from: VarSource::ClusterEnv,
                    ..
                }]
            ),
            "{errors:?}"
        );

        d.write(BUNDLE_CLUSTER_ENV, &format!("{ENV}INSTANCE_IP=0.0.0.0\n"));
        let errors = load(&paths, &Overrides::default(), &machine(&|_| None, &eth0)).unwrap_err();
        assert!(
            errors[0].to_string().contains("not a unicast"),
            "{errors:?}"
        );

        d.write(BUNDLE_CLUSTER_ENV, ENV);
        let only_lo = || -> io::Result<Vec<InterfaceAddr>> {
            eth0().map(|mut a| {
                a.truncate(1);
                a
            })
        };
        let errors =
            load(&paths, &Overrides::default(), &machine(&|_| None, &only_lo)).unwrap_err();
        assert!(
            matches!(&errors[..], [BundleError::NoAddress { .. }]),
            "{errors:?}"
        );
        let unreadable =
            || -> io::Result<Vec<InterfaceAddr>> { Err(io::Error::other("no procfs")) };
        let errors = load(
            &paths,
            &Overrides::default(),
            &machine(&|_| None, &unreadable),
        )
        .unwrap_err();
        assert!(errors[0].to_string().contains("no procfs"), "{errors:?}");
    }

    #[test]
    fn variables_layer_environment_over_cluster_env_over_proxy_metadata() {
        let d = bundle_dir(
            "layers",
            &format!(
                "{ENV}ISTIO_METAJSON_LABELS='{{\"app\":\"python-http\",\"istio-locality\":\"r1.z1\"}}'\n"
            ),
        );
        let paths = BundlePaths::in_dir(&d.0);
        let env = |n: &str| match n {
            VAR_GROUP => Some("from-env".to_string()),
            VAR_NAMESPACE => Some(String::new()), // empty: does not override
            _ => None,
        };
        let b = load(&paths, &Overrides::default(), &machine(&env, &eth0))
            .unwrap()
            .bundle;
        assert_eq!(b.group, "from-env");
        assert_eq!(b.namespace, "vm-namespace");
        assert_eq!(b.network, "meta-net", "only proxyMetadata sets it");
        assert_eq!(
            b.trust_domain, "cluster.local",
            "cluster.env over proxyMetadata"
        );
        assert_eq!(b.locality, "r1/z1");
        assert_eq!(b.labels["app"], "python-http");
        assert_eq!(b.vars[VAR_GROUP], "from-env");
        assert_eq!(b.vars[VAR_NETWORK], "meta-net");
        assert_eq!(
            b.discovery,
            Discovery {
                address: "istiod.istio-system.svc:15012".into(),
                targets: vec![Target {
                    address: "istiod.istio-system.svc:15012".into(),
                    server_name: "istiod.istio-system.svc".into(),
                    connect: "10.0.0.1:15012".parse().unwrap(),
                }],
                hosts_file: Some(paths.hosts.clone()),
            }
        );
        let r = b.register_request();
        assert_eq!(
            (
                r.group.as_str(),
                r.namespace.as_str(),
                r.address.as_str(),
                r.network.as_str()
            ),
            ("from-env", "vm-namespace", "10.0.0.5", "meta-net")
        );
        assert_eq!(r.locality, "r1/z1");

        let o = Overrides {
            group: Some("g".into()),
            namespace: Some("n".into()),
            network: Some(String::new()),
            discovery_address: Some("[2001:db8::9]:443".into()),
            address: None,
        };
        let b = load(&paths, &o, &machine(&env, &eth0)).unwrap().bundle;
        assert_eq!(
            (b.group.as_str(), b.namespace.as_str(), b.network.as_str()),
            ("g", "n", "")
        );
        assert_eq!(
            b.discovery.targets[0].connect,
            "[2001:db8::9]:443".parse().unwrap()
        );
        assert_eq!(b.discovery.targets[0].server_name, "2001:db8::9");
        assert_eq!(b.discovery.hosts_file, None);
    }

    /// Replicas: several comma-separated addresses, and a name with several hosts-file
    /// entries (a DNS name with several A records), become targets in the order given.
    #[test]
    fn several_discovery_addresses_and_a_name_with_several_addresses_are_all_targets() {
        let d = bundle_dir("replicas", ENV);
        d.write(
            BUNDLE_HOSTS,
            "10.0.0.1 istiod.istio-system.svc\n10.0.0.2 istiod.istio-system.svc\n\
             10.0.0.1 istiod.istio-system.svc # again\n",
        );
        let paths = BundlePaths::in_dir(&d.0);
        let o = Overrides {
            discovery_address: Some("istiod.istio-system.svc:15012, 10.0.0.9:443".into()),
            ..Overrides::default()
        };
        let b = load(&paths, &o, &machine(&|_| None, &eth0)).unwrap().bundle;
        let got: Vec<(&str, &str, String)> = b
            .discovery
            .targets
            .iter()
            .map(|t| {
                (
                    t.address.as_str(),
                    t.server_name.as_str(),
                    t.connect.to_string(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "istiod.istio-system.svc:15012",
                    "istiod.istio-system.svc",
                    "10.0.0.1:15012".to_string()
                ),
                (
                    "istiod.istio-system.svc:15012",
                    "istiod.istio-system.svc",
                    "10.0.0.2:15012".to_string()
                ),
                ("10.0.0.9:443", "10.0.0.9", "10.0.0.9:443".to_string()),
            ]
        );
        let o = Overrides {
            discovery_address: Some("10.0.0.9:443,,nohost:1".into()),
            ..Overrides::default()
        };
        let errors = load(&paths, &o, &machine(&|_| None, &eth0)).unwrap_err();
        assert!(
            errors.iter().any(
                |e| matches!(e, BundleError::DiscoveryAddress { text, .. } if text.is_empty())
            ),
            "{errors:?}"
        );
    }

    #[test]
    fn a_default_mesh_config_may_be_missing_when_the_discovery_address_is_given() {
        let d = bundle_dir("nomesh", ENV);
        std::fs::remove_file(d.0.join(BUNDLE_MESH_CONFIG)).unwrap();
        let mut paths = BundlePaths::in_dir(&d.0);
        let o = Overrides {
            discovery_address: Some("10.9.9.9:15012".into()),
            ..Overrides::default()
        };
        let m = machine(&|_| None, &eth0);
        // Named by --bundle: it must be there.
        let errors = load(&paths, &o, &m).unwrap_err();
        assert!(
            matches!(
                &errors[..],
                [BundleError::Read {
                    file: FileKind::MeshConfig,
                    ..
                }]
            ),
            "{errors:?}"
        );
        paths.mesh_config_named = false;
        let b = load(&paths, &o, &m).unwrap().bundle;
        assert_eq!(
            b.discovery.targets[0].connect,
            "10.9.9.9:15012".parse().unwrap()
        );
        // Without --discovery-address nothing gives the control plane's address.
        assert!(load(&paths, &Overrides::default(), &m).is_err());
    }

    #[test]
    fn every_problem_is_reported_together() {
        let d = bundle_dir(
            "all",
            "POD_NAMESPACE=vm-namespace\nbad line\nISTIO_METAJSON_LABELS='[1]'\n",
        );
        d.write(BUNDLE_TOKEN, "");
        d.write(BUNDLE_ROOT_CERT, "not pem\n");
        d.write(BUNDLE_HOSTS, "10.0.0.1 other.example\n");
        let errors = load(
            &BundlePaths::in_dir(&d.0),
            &Overrides::default(),
            &machine(&|_| None, &eth0),
        )
        .unwrap_err();
        let kinds: Vec<String> = errors
            .iter()
            .map(|e| match e {
                BundleError::ClusterEnvLine { error, .. } => format!("line {}", error.line),
                BundleError::MissingVar { name, .. } => format!("missing {name}"),
                BundleError::BadVar { name, .. } => format!("bad {name}"),
                BundleError::HostNotInHosts { host, .. } => format!("hosts {host}"),
                BundleError::Token { .. } => "token".into(),
                BundleError::RootCert { .. } => "root cert".into(),
                other => format!("{other}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "line 2",
                "missing ISTIO_META_AUTO_REGISTER_GROUP",
                "bad ISTIO_METAJSON_LABELS",
                "hosts istiod.istio-system.svc",
                "token",
                "root cert"
            ]
        );
    }

    #[test]
    fn unreadable_files_are_named_and_do_not_hide_the_others() {
        let d = Dir::new("none");
        let errors = load(
            &BundlePaths::in_dir(&d.0),
            &Overrides::default(),
            &machine(&|_| None, &eth0),
        )
        .unwrap_err();
        let files: Vec<String> = errors
            .iter()
            .map(|e| match e {
                BundleError::Read { file, .. } => file.to_string(),
                BundleError::Token { .. } => "token".into(),
                other => format!("{other}"),
            })
            .collect();
        // No "variable missing" noise: the missing cluster.env says it all. No discovery
        // error either: the missing mesh config does.
        assert_eq!(files, ["cluster.env", "mesh config", "token", "root cert"]);
        assert!(errors[0]
            .to_string()
            .contains(&*d.0.join("cluster.env").to_string_lossy()));
    }
}
