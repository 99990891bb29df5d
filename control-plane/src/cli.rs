//! The `vmesh-control` command line: `serve`, and kubectl-like commands that talk to a running
//! server with the admin credential from the data dir.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hyper::Method;
use vmesh_istio::model::{Kind, Resource, WorkloadGroup};

use crate::bundle::{render, BundleOptions};
use crate::client::Client;
use crate::clock::SystemClock;
use crate::config::parse_documents;
use crate::random::{self, Entropy, SystemEntropy};
use crate::registry::Settings;
use crate::server::{start, ServeConfig, StoreConfig, ADMIN_TOKEN_FILE, STORE_FILE};
use crate::store::etcd::{Credentials, EtcdConfig, EtcdStore};
use crate::store::redb::RedbStore;
use crate::tls::{write_private, ROOT_CERT_FILE};

pub const ENV_DATA_DIR: &str = "VMESH_CONTROL_DATA_DIR";
pub const ENV_SERVER: &str = "VMESH_CONTROL_SERVER";
pub const ENV_LISTEN: &str = "VMESH_CONTROL_LISTEN";
pub const ENV_GRACE_PERIOD: &str = "VMESH_CONTROL_GRACE_PERIOD";
pub const ENV_HEARTBEAT_INTERVAL: &str = "VMESH_CONTROL_HEARTBEAT_INTERVAL";
pub const ENV_LIVENESS_TIMEOUT: &str = "VMESH_CONTROL_LIVENESS_TIMEOUT";
pub const ENV_SAN: &str = "VMESH_CONTROL_SAN";
pub const ENV_ISSUER: &str = "VMESH_CONTROL_ISSUER";
pub const ENV_JWKS: &str = "VMESH_CONTROL_JWKS";
pub const ENV_REPLICA: &str = "VMESH_CONTROL_REPLICA";
pub const ENV_DOMAIN: &str = "VMESH_CONTROL_DOMAIN";
pub const ENV_LOG: &str = "VMESH_CONTROL_LOG";
pub const ENV_LOG_FORMAT: &str = "VMESH_CONTROL_LOG_FORMAT";
pub const ENV_SERVICE_CIDR: &str = "VMESH_CONTROL_SERVICE_CLUSTER_IP_RANGE";
pub const ENV_SHUTDOWN_GRACE: &str = "VMESH_CONTROL_SHUTDOWN_GRACE";
pub const ENV_HANDSHAKE_TIMEOUT: &str = "VMESH_CONTROL_HANDSHAKE_TIMEOUT";
pub const ENV_HEADER_READ_TIMEOUT: &str = "VMESH_CONTROL_HEADER_READ_TIMEOUT";
pub const ENV_BODY_TIMEOUT: &str = "VMESH_CONTROL_BODY_TIMEOUT";
pub const ENV_IDLE_TIMEOUT: &str = "VMESH_CONTROL_IDLE_TIMEOUT";
pub const ENV_MAX_CONNECTIONS: &str = "VMESH_CONTROL_MAX_CONNECTIONS";
pub const ENV_MAX_CONNECTIONS_PER_SOURCE: &str = "VMESH_CONTROL_MAX_CONNECTIONS_PER_SOURCE";
pub const ENV_CERT_LIFETIME: &str = "VMESH_CONTROL_CERT_LIFETIME";
pub const ENV_MAX_ENTRIES_PER_IDENTITY: &str = "VMESH_CONTROL_MAX_ENTRIES_PER_IDENTITY";
pub const ENV_REGISTRATION_RATE: &str = "VMESH_CONTROL_REGISTRATION_RATE";
pub const ENV_REGISTRATION_BURST: &str = "VMESH_CONTROL_REGISTRATION_BURST";
pub const ENV_TRUST_DOMAIN: &str = "VMESH_CONTROL_TRUST_DOMAIN";
pub const ENV_MESH_NETWORKS: &str = "VMESH_CONTROL_MESH_NETWORKS";
pub const ENV_MAX_WORKLOAD_CERT_TTL: &str = "MAX_WORKLOAD_CERT_TTL";
pub const ENV_CA_CERT: &str = "VMESH_CONTROL_CA_CERT";
pub const ENV_CA_KEY: &str = "VMESH_CONTROL_CA_KEY";
pub const ENV_CA_CHAIN: &str = "VMESH_CONTROL_CA_CHAIN";
pub const ENV_CA_ROOT: &str = "VMESH_CONTROL_CA_ROOT";
pub const ENV_CACERTS: &str = "VMESH_CONTROL_CACERTS";
pub const ENV_STORE: &str = "VMESH_CONTROL_STORE";
pub const ENV_ETCD_ENDPOINTS: &str = "VMESH_CONTROL_ETCD_ENDPOINTS";
pub const ENV_ETCD_PREFIX: &str = "VMESH_CONTROL_ETCD_PREFIX";
pub const ENV_ETCD_CACERT: &str = "VMESH_CONTROL_ETCD_CACERT";
pub const ENV_ETCD_CERT: &str = "VMESH_CONTROL_ETCD_CERT";
pub const ENV_ETCD_KEY: &str = "VMESH_CONTROL_ETCD_KEY";
pub const ENV_ETCD_USER: &str = "VMESH_CONTROL_ETCD_USER";

#[derive(Debug, Parser)]
#[command(name = "vmesh-control", version, about = "vmesh control plane")]
pub struct Cli {
    /// Data dir: root CA, admin credential, signing key, store.
    #[arg(long, global = true, env = ENV_DATA_DIR, default_value = "./vmesh-data")]
    pub data_dir: PathBuf,
    /// Server to talk to (client commands).
    #[arg(long, global = true, env = ENV_SERVER, default_value = "https://127.0.0.1:15012")]
    pub server: String,
    /// Log filter (tracing env-filter syntax).
    #[arg(long, global = true, env = ENV_LOG, default_value = "info")]
    pub log: String,
    #[arg(long, global = true, env = ENV_LOG_FORMAT, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// Parsed once per process: the size of the largest variant (serve's flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane.
    Serve(Box<ServeArgs>),
    /// Create or update objects from a file or directory of YAML/JSON manifests.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Namespace for objects that name none.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Show objects.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
    },
    /// Delete an object (deleting a WorkloadGroup deletes its auto-registered entries).
    Delete {
        kind: String,
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Service-account tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Write the files a VM needs (like `istioctl x workload entry configure --autoregister`).
    VmBundle(BundleArgs),
    /// Copy a single-replica (embedded) store into etcd. The server must be stopped.
    Migrate(MigrateArgs),
}

/// Which store `serve` runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// `store.redb` in the data dir: one replica, nothing else to run.
    Embedded,
    /// An etcd cluster (`--etcd-endpoints`).
    Etcd,
}

/// How to reach etcd, named as etcdctl names them.
#[derive(Debug, Args)]
pub struct EtcdArgs {
    /// Every key goes under this prefix (several control planes can share one etcd).
    #[arg(long, env = ENV_ETCD_PREFIX, default_value = crate::store::etcd::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// CA certificate (PEM) that signed the etcd members' certificates.
    #[arg(long, env = ENV_ETCD_CACERT)]
    pub etcd_cacert: Option<PathBuf>,
    /// Client certificate (PEM), for members that require one.
    #[arg(long, env = ENV_ETCD_CERT)]
    pub etcd_cert: Option<PathBuf>,
    /// Key of the client certificate (PEM).
    #[arg(long, env = ENV_ETCD_KEY)]
    pub etcd_key: Option<PathBuf>,
    /// NAME:PASSWORD of an etcd user, for etcd with authentication enabled (as etcdctl's
    /// `--user`; the environment variable keeps the password off the command line).
    #[arg(long, env = ENV_ETCD_USER, hide_env_values = true)]
    pub etcd_user: Option<Credentials>,
}

impl EtcdArgs {
    fn config(&self, endpoints: Vec<String>) -> anyhow::Result<EtcdConfig> {
        for p in [&self.etcd_cacert, &self.etcd_cert, &self.etcd_key]
            .into_iter()
            .flatten()
        {
            if !p.is_file() {
                bail!("{} is not a readable file", p.display());
            }
        }
        let cfg = EtcdConfig::new(
            endpoints,
            &self.etcd_prefix,
            self.etcd_cacert.clone(),
            self.etcd_cert.clone(),
            self.etcd_key.clone(),
        )?;
        Ok(match &self.etcd_user {
            Some(u) => cfg.with_user(u.clone()),
            None => cfg,
        })
    }

    fn tls(&self) -> bool {
        self.etcd_cacert.is_some() || self.etcd_cert.is_some()
    }
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Data dir of the single-replica server (its `store.redb` is read).
    #[arg(long)]
    pub from: PathBuf,
    /// `etcd://host:port[,host:port...]` (https when TLS files are given).
    #[arg(long)]
    pub to: String,
    /// Replace whatever is under the target prefix (refused otherwise).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Yaml,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a token shaped like `kubectl create token SA --audience istio-ca`.
    Create {
        #[arg(short = 'n', long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        #[arg(long, value_parser = parse_duration, default_value = "1h")]
        ttl: Duration,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[arg(long, env = ENV_LISTEN, default_value = "127.0.0.1:15012")]
    pub listen: std::net::SocketAddr,
    /// How long a disconnected auto-registered WorkloadEntry is kept.
    #[arg(long, env = ENV_GRACE_PERIOD, value_parser = parse_duration, default_value = "10s")]
    pub grace_period: Duration,
    #[arg(long, env = ENV_HEARTBEAT_INTERVAL, value_parser = parse_duration, default_value = "5s")]
    pub heartbeat_interval: Duration,
    /// Silence after which a VM counts as disconnected.
    #[arg(long, env = ENV_LIVENESS_TIMEOUT, value_parser = parse_duration, default_value = "15s")]
    pub liveness_timeout: Duration,
    /// Names and IPs for the serving certificate.
    #[arg(long, env = ENV_SAN, value_delimiter = ',',
          default_value = "localhost,127.0.0.1,::1,istiod.istio-system.svc,vmesh-control")]
    pub san: Vec<String>,
    /// Issuer (`iss`) of the tokens this control plane mints.
    #[arg(long, env = ENV_ISSUER, default_value = "https://vmesh-control.vmesh.local")]
    pub issuer: String,
    /// Trust another issuer: ISSUER=JWKS_FILE (e.g. a cluster's /openid/v1/jwks).
    #[arg(long, env = ENV_JWKS, value_delimiter = ',', value_parser = parse_jwks_arg)]
    pub jwks: Vec<(String, PathBuf)>,
    /// This replica's name (istio.io/workloadController); default: a fresh random name.
    #[arg(long, env = ENV_REPLICA)]
    pub replica: Option<String>,
    #[arg(long, env = ENV_DOMAIN, default_value = vmesh_api::names::DEFAULT_DOMAIN)]
    pub domain: String,
    /// Where Services without a clusterIP get one, as the Kubernetes API server's flag of the
    /// same name.
    #[arg(long, env = ENV_SERVICE_CIDR, default_value = vmesh_istio::cluster_ip::DEFAULT_SERVICE_CIDR)]
    pub service_cluster_ip_range: vmesh_istio::cluster_ip::ServiceCidr,
    /// At SIGTERM/SIGINT: how long in-flight requests get to finish before their connections
    /// are closed (a second signal ends it early).
    #[arg(long, env = ENV_SHUTDOWN_GRACE, value_parser = parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,
    /// From accept to a finished TLS handshake.
    #[arg(long, env = ENV_HANDSHAKE_TIMEOUT, value_parser = parse_duration, default_value = "10s")]
    pub handshake_timeout: Duration,
    /// HTTP/1.1: a request head must arrive in full within this (an idle keep-alive connection
    /// closes after it too).
    #[arg(long, env = ENV_HEADER_READ_TIMEOUT, value_parser = parse_duration, default_value = "10s")]
    pub header_read_timeout: Duration,
    /// A request body must arrive in full within this (else 408).
    #[arg(long, env = ENV_BODY_TIMEOUT, value_parser = parse_duration, default_value = "30s")]
    pub body_timeout: Duration,
    /// A connection with no request in flight for this long is closed (long-polls are in
    /// flight).
    #[arg(long, env = ENV_IDLE_TIMEOUT, value_parser = parse_duration, default_value = "20s")]
    pub idle_timeout: Duration,
    /// Open connections at most (also kept 64 below the open-file limit, which is raised to
    /// its hard limit at start). At the cap, an unauthenticated connection of the address
    /// holding the most is closed.
    #[arg(long, env = ENV_MAX_CONNECTIONS, default_value_t = 20_000)]
    pub max_connections: usize,
    /// Open connections from one source address at most.
    #[arg(long, env = ENV_MAX_CONNECTIONS_PER_SOURCE, default_value_t = 1_000)]
    pub max_connections_per_source: usize,
    /// Lifetime of the serving certificate (at most 365d); re-issued two thirds in, without a
    /// restart.
    #[arg(long, env = ENV_CERT_LIFETIME, value_parser = parse_duration, default_value = "90d")]
    pub cert_lifetime: Duration,
    /// Auto-registered WorkloadEntries one identity (namespace + service account) may hold;
    /// a registration creating one more is refused with 429. 0: no cap.
    #[arg(long, env = ENV_MAX_ENTRIES_PER_IDENTITY, default_value_t = 1_000)]
    pub max_entries_per_identity: usize,
    /// Registrations per second one identity may make, sustained (this replica's count);
    /// beyond it 429 with Retry-After. 0: no limit.
    #[arg(long, env = ENV_REGISTRATION_RATE, default_value_t = 10.0)]
    pub registration_rate: f64,
    /// Registrations one identity may make at once before the rate applies.
    #[arg(long, env = ENV_REGISTRATION_BURST, default_value_t = 50)]
    pub registration_burst: u32,
    /// Trust domain of workload identities: spiffe://TRUST_DOMAIN/ns/NS/sa/SA (Istio's mesh
    /// config `trustDomain`; `vm-bundle` writes the same default).
    #[arg(long, env = ENV_TRUST_DOMAIN, default_value = vmesh_api::ca::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Istio's meshNetworks file (istiod's `--networksConfig`, YAML or JSON:
    /// `networks: NAME: {gateways: [{address: IP, port: 15443}]}`): each network's east-west
    /// gateways, which every name table carries. Read once at start.
    #[arg(long, env = ENV_MESH_NETWORKS)]
    pub mesh_networks: Option<PathBuf>,
    /// Longest workload certificate issued; a longer request is cut to it (env as istiod's).
    #[arg(long, env = ENV_MAX_WORKLOAD_CERT_TTL, value_parser = parse_duration, default_value = "90d")]
    pub max_workload_cert_ttl: Duration,
    /// Sign with an existing CA (an intermediate) instead of the data dir's own root:
    /// its certificate (PEM) ...
    #[arg(long, env = ENV_CA_CERT, requires = "ca_key", conflicts_with = "cacerts")]
    pub ca_cert: Option<PathBuf>,
    /// ... and its private key (PKCS#8, PKCS#1 or SEC1 PEM).
    #[arg(long, env = ENV_CA_KEY, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Certificates between --ca-cert and the root (may include both, as Istio's
    /// cert-chain.pem does).
    #[arg(long, env = ENV_CA_CHAIN, requires = "ca_cert")]
    pub ca_chain: Option<PathBuf>,
    /// The root every party trusts; default: the chain's last certificate, or --ca-cert when
    /// it is self-signed.
    #[arg(long, env = ENV_CA_ROOT, requires = "ca_cert")]
    pub ca_root: Option<PathBuf>,
    /// Istio's `cacerts` directory (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem):
    /// share a root with an Istio cluster.
    #[arg(long, env = ENV_CACERTS)]
    pub cacerts: Option<PathBuf>,
    /// Where config and WorkloadEntries are stored.
    #[arg(long, env = ENV_STORE, value_enum, default_value_t = StoreKind::Embedded)]
    pub store: StoreKind,
    /// etcd members (`--store etcd`): http://host:port or https://host:port, comma-separated.
    #[arg(long, env = ENV_ETCD_ENDPOINTS, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(Debug, Args)]
pub struct BundleArgs {
    #[arg(long)]
    pub group: String,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// host:port the VM dials; default: the istiod name on the server's port.
    #[arg(long)]
    pub discovery_address: Option<String>,
    /// Lifetime of the token written to `istio-token` (istioctl's `--tokenDuration`, 3600 s);
    /// a bare number is seconds.
    #[arg(long = "token-duration", alias = "token-ttl", value_parser = parse_duration, default_value = "3600")]
    pub token_duration: Duration,
    #[arg(long, default_value = "Kubernetes")]
    pub cluster_id: String,
    #[arg(long, default_value = "")]
    pub mesh_id: String,
    /// Written to mesh.yaml and cluster.env; must be the server's --trust-domain, which the
    /// VM's certificate is issued in.
    #[arg(long, env = ENV_TRUST_DOMAIN, default_value = vmesh_api::ca::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
}

/// `10s`, `1h30m`, `500ms`, `2d` (humantime's units, which include Go's); a bare number is
/// seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

fn parse_jwks_arg(s: &str) -> Result<(String, PathBuf), String> {
    let (iss, path) = s.split_once('=').ok_or("expected ISSUER=JWKS_FILE")?;
    if iss.is_empty() || path.is_empty() {
        return Err("expected ISSUER=JWKS_FILE".into());
    }
    Ok((iss.to_string(), PathBuf::from(path)))
}

fn init_tracing(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).context("--log")?;
    // Escaped, so no input can forge a line or reach a terminal as an escape sequence; hence
    // no colours either (they would be escaped too).
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(|| crate::logsafe::Escaping(std::io::stderr()));
    match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Entry point of the binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(&cli.log, cli.log_format)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(run(cli));
    // Whatever is left (a store read on a blocking thread) does not hold up the exit.
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

fn admin_client(cli: &Cli) -> anyhow::Result<Client> {
    let root_path = cli.data_dir.join(ROOT_CERT_FILE);
    let root =
        std::fs::read(&root_path).with_context(|| format!("reading {}", root_path.display()))?;
    let tok_path = cli.data_dir.join(ADMIN_TOKEN_FILE);
    let token = std::fs::read_to_string(&tok_path)
        .with_context(|| format!("reading {}", tok_path.display()))?;
    Ok(Client::new(&cli.server, &root, token.trim())?)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Serve(a) => serve(&cli, a).await,
        Command::Apply { file, namespace } => apply(&admin_client(&cli)?, file, namespace).await,
        Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output,
        } if matches!(
            kind.as_str(),
            "certificates" | "certificate" | "certs" | "cert"
        ) =>
        {
            let _ = (name, namespace, all_namespaces);
            get_certificates(&admin_client(&cli)?, *output).await
        }
        Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output,
        } => {
            get(
                &admin_client(&cli)?,
                kind,
                name.as_deref(),
                namespace.as_deref(),
                *all_namespaces,
                *output,
            )
            .await
        }
        Command::Delete {
            kind,
            name,
            namespace,
        } => {
            let k = Kind::from_cli(kind)
                .with_context(|| format!("the server doesn't have a resource type {kind:?}"))?;
            let c = admin_client(&cli)?;
            c.call(
                Method::DELETE,
                &format!(
                    "/v1/admin/objects/{}/{namespace}/{name}",
                    k.as_str().to_ascii_lowercase()
                ),
                None,
            )
            .await?;
            println!("{}/{name} deleted", resource_name(k));
            Ok(())
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    namespace,
                    service_account,
                    ttl,
                },
        } => {
            let r = admin_client(&cli)?
                .mint_token(namespace, service_account, *ttl)
                .await?;
            println!("{}", r.token);
            Ok(())
        }
        Command::VmBundle(a) => vm_bundle(&cli, a).await,
        Command::Migrate(a) => migrate(a).await,
    }
}

async fn serve(cli: &Cli, a: &ServeArgs) -> anyhow::Result<()> {
    if a.liveness_timeout <= a.heartbeat_interval {
        bail!(
            "--liveness-timeout ({}) must be longer than --heartbeat-interval ({})",
            humantime::format_duration(a.liveness_timeout),
            humantime::format_duration(a.heartbeat_interval)
        );
    }
    if a.grace_period.is_zero() {
        bail!("--grace-period must be positive");
    }
    for (flag, d) in [
        ("--handshake-timeout", a.handshake_timeout),
        ("--header-read-timeout", a.header_read_timeout),
        ("--body-timeout", a.body_timeout),
        ("--idle-timeout", a.idle_timeout),
    ] {
        if d.is_zero() {
            bail!("{flag} must be positive");
        }
    }
    if a.max_connections == 0 || a.max_connections_per_source == 0 {
        bail!("--max-connections and --max-connections-per-source must be positive");
    }
    if !(a.registration_rate.is_finite() && a.registration_rate >= 0.0) {
        bail!("--registration-rate must be a number of registrations per second, 0 or more");
    }
    if a.registration_burst == 0 {
        bail!("--registration-burst must be positive");
    }
    if a.cert_lifetime < Duration::from_secs(1)
        || a.cert_lifetime > crate::tls::MAX_SERVING_LIFETIME
    {
        bail!(
            "--cert-lifetime ({}) must be between 1s and 365d",
            humantime::format_duration(a.cert_lifetime)
        );
    }
    if a.max_workload_cert_ttl < Duration::from_secs(60) {
        bail!(
            "--max-workload-cert-ttl ({}) must be at least 1m",
            humantime::format_duration(a.max_workload_cert_ttl)
        );
    }
    // Istio's trust domains are DNS-like names; anything else would make a SPIFFE ID that
    // peers cannot match.
    if !vmesh_istio::validate::is_dns1123_subdomain(&a.trust_domain) {
        bail!(
            "--trust-domain {:?} must be a lower-case DNS name (like cluster.local)",
            a.trust_domain
        );
    }
    let gateways = match &a.mesh_networks {
        None => Default::default(),
        Some(path) => read_mesh_networks(path)
            .with_context(|| format!("--mesh-networks {}", path.display()))?,
    };
    for (_, p) in &a.jwks {
        if !p.is_file() {
            bail!("--jwks: {} is not a readable file", p.display());
        }
    }
    let store = match a.store {
        StoreKind::Embedded => {
            if !a.etcd_endpoints.is_empty() {
                bail!("--etcd-endpoints needs --store etcd");
            }
            StoreConfig::Embedded
        }
        StoreKind::Etcd => StoreConfig::Etcd(
            a.etcd
                .config(a.etcd_endpoints.clone())
                .context("--store etcd")?,
        ),
    };
    // Before anything is loaded or bound: from here on a SIGTERM or SIGINT is a request to
    // shut down (answered once start-up is complete), never the default "die at once".
    let mut signals = Signals::install()?;
    let replica = match &a.replica {
        Some(r) => r.clone(),
        None => replica_name(&SystemEntropy::default())?,
    };
    let cfg = ServeConfig {
        data_dir: cli.data_dir.clone(),
        listen: a.listen,
        sans: a.san.clone(),
        issuer: a.issuer.clone(),
        jwks: a.jwks.clone(),
        domain: a.domain.clone(),
        settings: Settings {
            replica,
            grace: a.grace_period,
            heartbeat_interval: a.heartbeat_interval,
            liveness_timeout: a.liveness_timeout,
            lease_ttl: a.liveness_timeout.max(Duration::from_secs(10)),
            service_cidr: a.service_cluster_ip_range,
            quota: crate::quota::QuotaSettings {
                max_entries_per_identity: a.max_entries_per_identity,
                registration_rate: a.registration_rate,
                registration_burst: a.registration_burst,
            },
        },
        tick: Some(Duration::from_secs(1)),
        coalesce: Duration::from_millis(10),
        shutdown_grace: a.shutdown_grace,
        hygiene: crate::api::Hygiene {
            handshake_timeout: a.handshake_timeout,
            header_read_timeout: a.header_read_timeout,
            body_timeout: a.body_timeout,
            idle_timeout: a.idle_timeout,
            max_connections: a.max_connections,
            max_connections_per_source: a.max_connections_per_source,
        },
        cert_lifetime: a.cert_lifetime,
        ca: crate::server::CaConfig {
            trust_domain: a.trust_domain.clone(),
            max_ttl: a.max_workload_cert_ttl,
            files: ca_files(a),
        },
        store,
        gateways,
    };
    let running = start(cfg, Arc::new(SystemClock)).await?;
    let signal = signals.next().await;
    tracing::info!(signal, grace = ?a.shutdown_grace, "shutting down");
    // A second signal ends the grace period: the store is still closed cleanly.
    running
        .stop_unless(async {
            let signal = signals.next().await;
            tracing::warn!(signal, "second signal: not waiting for in-flight requests");
        })
        .await;
    Ok(())
}

/// The per-network gateways of a meshNetworks file.
pub fn read_mesh_networks(
    path: &std::path::Path,
) -> anyhow::Result<std::collections::BTreeMap<String, Vec<vmesh_api::names::Gateway>>> {
    let text = std::fs::read_to_string(path)?;
    let networks: vmesh_istio::networks::MeshNetworks = serde_norway::from_str(&text)?;
    Ok(networks.gateways()?)
}

fn ca_files(a: &ServeArgs) -> Option<crate::tls::CaFiles> {
    if let Some(dir) = &a.cacerts {
        return Some(crate::tls::CaFiles::cacerts(dir));
    }
    Some(crate::tls::CaFiles {
        cert: a.ca_cert.clone()?,
        key: a.ca_key.clone()?,
        chain: a.ca_chain.clone(),
        root: a.ca_root.clone(),
    })
}

/// `migrate`: opens the embedded store (refused while a server has it open), then copies it.
async fn migrate(a: &MigrateArgs) -> anyhow::Result<()> {
    let path = a.from.join(STORE_FILE);
    if !path.is_file() {
        bail!("--from: {} does not exist", path.display());
    }
    let endpoints = EtcdConfig::endpoints_from_target(&a.to, a.etcd.tls())?;
    let cfg = a.etcd.config(endpoints)?;
    let from = RedbStore::open(&path, Arc::new(SystemClock), None)
        .with_context(|| format!("opening {} (is the server still running?)", path.display()))?;
    let to = EtcdStore::open(&cfg, Arc::new(SystemClock), None)
        .await
        .with_context(|| format!("connecting to {}", a.to))?;
    let n = crate::store::migrate::copy(&from, &to, a.force).await?;
    from.close().await;
    to.close().await;
    println!(
        "copied {n} keys from {} to {} (prefix {})",
        path.display(),
        a.to,
        cfg.prefix
    );
    Ok(())
}

/// `vmesh-control-` and 8 random hex digits.
fn replica_name(entropy: &dyn Entropy) -> anyhow::Result<String> {
    let suffix = random::hex(entropy, 4).context("choosing a replica name (or pass --replica)")?;
    Ok(format!("vmesh-control-{suffix}"))
}

/// SIGTERM (systemd, Kubernetes, `kill`) and SIGINT (Ctrl-C), both asking for a clean
/// shutdown. Registered on creation: a signal that arrives before anyone waits is kept.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

fn manifest_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.as_os_str() == "-" || path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no .yaml, .yml or .json files in {}", path.display());
    }
    Ok(files)
}

fn resource_name(k: Kind) -> String {
    match k {
        Kind::Service => "service".into(),
        k => format!("{}.networking.istio.io", k.as_str().to_ascii_lowercase()),
    }
}

async fn apply(c: &Client, path: &Path, namespace: &str) -> anyhow::Result<()> {
    let mut documents = Vec::new();
    for f in manifest_files(path)? {
        let text = if f.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())?
        } else {
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?
        };
        documents.extend(
            parse_documents(&f.display().to_string(), &text)
                .map_err(|e| anyhow::anyhow!("error: {e}"))?,
        );
    }
    let (outcomes, warnings) = c.apply_with_warnings(documents, namespace).await?;
    // Before the results, on stderr, as kubectl prints an admission webhook's warnings.
    for w in warnings {
        eprintln!("Warning: {w}");
    }
    for o in outcomes {
        println!("{}/{} {}", resource_name(o.kind), o.name, o.action);
    }
    Ok(())
}

/// The workload certificates the server issued recently, newest first.
async fn get_certificates(c: &Client, output: Option<Output>) -> anyhow::Result<()> {
    let list: vmesh_api::ca::IssuedList = c
        .json(
            Method::GET,
            vmesh_api::paths::control::ADMIN_CERTIFICATES,
            None::<&()>,
        )
        .await?;
    match output {
        Some(Output::Json) => println!("{}", serde_json::to_string_pretty(&list)?),
        Some(Output::Yaml) => print!("{}", serde_norway::to_string(&list)?),
        None if list.items.is_empty() => {
            eprintln!("No certificates issued since the server started.")
        }
        None => {
            let mut rows = vec![vec![
                "SERIAL".to_string(),
                "IDENTITY".into(),
                "NOT AFTER".into(),
                "ISSUED AT".into(),
                "PEER".into(),
            ]];
            for i in &list.items {
                rows.push(vec![
                    i.serial.clone(),
                    i.spiffe_id.clone(),
                    i.not_after.clone(),
                    i.issued_at.clone(),
                    i.peer.clone(),
                ]);
            }
            print_rows(&rows);
        }
    }
    Ok(())
}

async fn get(
    c: &Client,
    kind: &str,
    name: Option<&str>,
    namespace: Option<&str>,
    all: bool,
    output: Option<Output>,
) -> anyhow::Result<()> {
    let k = Kind::from_cli(kind)
        .with_context(|| format!("the server doesn't have a resource type {kind:?}"))?;
    let ks = k.as_str().to_ascii_lowercase();
    let ns = if all {
        None
    } else {
        Some(namespace.unwrap_or("default"))
    };
    let items: Vec<serde_json::Value> = match name {
        Some(n) => {
            let path = format!("/v1/admin/objects/{ks}/{}/{n}", ns.unwrap_or("default"));
            vec![c.json(Method::GET, &path, None::<&()>).await?]
        }
        None => {
            let path = match ns {
                Some(ns) => format!("/v1/admin/objects/{ks}?namespace={ns}"),
                None => format!("/v1/admin/objects/{ks}"),
            };
            let v: serde_json::Value = c.json(Method::GET, &path, None::<&()>).await?;
            v["items"].as_array().cloned().unwrap_or_default()
        }
    };
    let doc = if name.is_some() {
        items.first().cloned().unwrap_or_default()
    } else {
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items})
    };
    match output {
        Some(Output::Json) => println!("{}", serde_json::to_string_pretty(&doc)?),
        Some(Output::Yaml) => print!("{}", serde_norway::to_string(&doc)?),
        None => print_table(k, &items, all),
    }
    Ok(())
}

fn print_table(k: Kind, items: &[serde_json::Value], all: bool) {
    if items.is_empty() {
        eprintln!("No resources found.");
        return;
    }
    let mut rows = vec![];
    let head: Vec<&str> = match k {
        Kind::WorkloadEntry => vec!["NAME", "ADDRESS", "STATE", "HEALTHY"],
        Kind::ServiceEntry => vec!["NAME", "HOSTS", "ADDRESSES", "LOCATION", "RESOLUTION"],
        Kind::WorkloadGroup => vec!["NAME", "SERVICE ACCOUNT"],
        Kind::Service => vec!["NAME", "CLUSTER-IP", "PORTS"],
    };
    let mut header: Vec<String> = head.iter().map(|s| s.to_string()).collect();
    if all {
        header.insert(0, "NAMESPACE".into());
    }
    rows.push(header);
    for v in items {
        let r: Result<Resource, _> = Resource::from_json_kind(k, v.to_string().as_bytes());
        let Ok(r) = r else { continue };
        let mut row: Vec<String> = match &r {
            Resource::WorkloadEntry(e) => {
                let state = if !vmesh_istio::workload::is_auto_registered(e) {
                    "manual"
                } else if vmesh_istio::workload::disconnected_at(e).is_some() {
                    "disconnected"
                } else {
                    "connected"
                };
                let health = vmesh_istio::workload::healthy_condition(e)
                    .map_or("-".to_string(), |c| c.status.clone());
                vec![
                    e.metadata.name.clone(),
                    e.spec.address.clone(),
                    state.into(),
                    health,
                ]
            }
            Resource::ServiceEntry(s) => vec![
                s.metadata.name.clone(),
                s.spec.hosts.join(","),
                {
                    // Declared addresses, else the auto-allocated ones from status.
                    let allocated = s.status.iter().flat_map(|st| &st.addresses);
                    let list: Vec<&str> = if s.spec.addresses.is_empty() {
                        allocated.map(|a| a.value.as_str()).collect()
                    } else {
                        s.spec.addresses.iter().map(String::as_str).collect()
                    };
                    if list.is_empty() {
                        "<none>".to_string()
                    } else {
                        list.join(",")
                    }
                },
                serde_json::to_value(s.spec.location)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                serde_json::to_value(s.spec.resolution)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
            ],
            Resource::WorkloadGroup(g) => {
                vec![
                    g.metadata.name.clone(),
                    vmesh_istio::workload::expected_service_account(g).to_string(),
                ]
            }
            Resource::Service(s) => vec![
                s.metadata.name.clone(),
                if s.spec.cluster_ip.is_empty() {
                    "<none>".into()
                } else {
                    s.spec.cluster_ip.clone()
                },
                s.spec
                    .ports
                    .iter()
                    .map(|p| {
                        format!(
                            "{}/{}",
                            p.port,
                            if p.protocol.is_empty() {
                                "TCP"
                            } else {
                                &p.protocol
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            ],
        };
        if all {
            row.insert(0, r.meta().namespace.clone());
        }
        rows.push(row);
    }
    print_rows(&rows);
}

/// Columns padded to their widest cell, as kubectl prints them.
fn print_rows(rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}

async fn vm_bundle(cli: &Cli, a: &BundleArgs) -> anyhow::Result<()> {
    let c = admin_client(cli)?;
    let group: WorkloadGroup = c
        .json(
            Method::GET,
            &format!(
                "/v1/admin/objects/workloadgroup/{}/{}",
                a.namespace, a.group
            ),
            None::<&()>,
        )
        .await?;
    let sa = vmesh_istio::workload::expected_service_account(&group).to_string();
    let tok = c.mint_token(&a.namespace, &sa, a.token_duration).await?;
    let server = cli
        .server
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let (server_host, server_port) = server.rsplit_once(':').unwrap_or((server, "15012"));
    let server_host = server_host.trim_start_matches('[').trim_end_matches(']');
    let opts = BundleOptions {
        discovery_address: a
            .discovery_address
            .clone()
            .unwrap_or_else(|| format!("istiod.istio-system.svc:{server_port}")),
        control_plane_ip: if server_host.parse::<std::net::IpAddr>().is_ok() {
            server_host.to_string()
        } else {
            String::new()
        },
        cluster_id: a.cluster_id.clone(),
        mesh_id: a.mesh_id.clone(),
        trust_domain: a.trust_domain.clone(),
    };
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("creating {}", a.output.display()))?;
    for (name, body) in render(&group, &opts) {
        let p = a.output.join(name);
        std::fs::write(&p, body).with_context(|| format!("writing {}", p.display()))?;
    }
    let root = std::fs::read(cli.data_dir.join(ROOT_CERT_FILE))?;
    std::fs::write(a.output.join("root-cert.pem"), root)?;
    write_private(&a.output.join("istio-token"), tok.token.as_bytes())?;
    println!(
        "wrote cluster.env, mesh.yaml, root-cert.pem, istio-token, hosts to {}",
        a.output.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        for (s, d) in [
            ("10s", 10_000),
            ("1h30m", 5_400_000),
            ("500ms", 500),
            ("15", 15_000),
            (" 15 ", 15_000),
            ("0", 0),
            ("2d", 172_800_000),
            ("1m30s", 90_000),
            ("1h 30m", 5_400_000),
            ("250ms", 250),
            // Decimal fractions, as Go's time.ParseDuration takes them (humantime >= 2.2).
            ("1.5s", 1_500),
        ] {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(d)), "{s}");
        }
        for s in ["", "10x", "s", "-1s", "soon"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
        // What the CLI prints reads back as the same duration.
        for d in [Duration::from_secs(5400), Duration::from_millis(1500)] {
            let text = humantime::format_duration(d).to_string();
            assert_eq!(parse_duration(&text), Ok(d), "{text}");
        }
    }

    #[test]
    fn no_replica_name_when_the_random_source_fails() {
        assert!(replica_name(&crate::random::tests::Failing).is_err());
        let name = replica_name(&SystemEntropy::default()).unwrap();
        assert!(
            name.len() == "vmesh-control-".len() + 8 && name != "vmesh-control-00000000",
            "{name}"
        );
    }

    #[test]
    fn command_line_parses() {
        Cli::try_parse_from([
            "vmesh-control",
            "serve",
            "--grace-period",
            "30s",
            "--listen",
            "127.0.0.1:0",
        ])
        .unwrap();
        Cli::try_parse_from([
            "vmesh-control",
            "get",
            "we",
            "-n",
            "vm-namespace",
            "-o",
            "yaml",
        ])
        .unwrap();
        Cli::try_parse_from([
            "vmesh-control",
            "token",
            "create",
            "-n",
            "ns",
            "--service-account",
            "sa",
            "--ttl",
            "1h",
        ])
        .unwrap();
        assert!(Cli::try_parse_from(["vmesh-control", "serve", "--grace-period", "soon"]).is_err());
    }
}
