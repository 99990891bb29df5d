//! TLS: the control plane's root CA (created on first start in the data dir, like istiod's
//! self-signed root, and like it valid for 10 years) and a serving certificate for the
//! configured names and IPs, issued by it at every start with a lifetime of at most a year and
//! re-issued in the running server before it expires ([`ServingCert`]). Clients trust
//! `root-cert.pem`.

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// Istio's self-signed root lives 10 years (`citadel.DefaultSelfSignedCACertTTL`).
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The longest serving certificate issued (browsers' and the CA/B Forum's ceiling is lower;
/// a year bounds how long a leaked serving key is useful).
pub const MAX_SERVING_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far back `notBefore` is set: a client whose clock is a little behind still accepts a
/// certificate issued a moment ago.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS config: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("PEM in {0} is not a certificate or key")]
    Pem(String),
    #[error("{0:?} is neither a DNS name nor an IP address")]
    BadName(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn validity(lifetime: Duration) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (now - BACKDATE, now + lifetime)
}

/// The root's parameters. Only the name and constraints matter when re-loading it to sign
/// (the issuer's validity is not copied into what it signs).
fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "vmesh");
    dn.push(DnType::CommonName, "vmesh root CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (p.not_before, p.not_after) = validity(ROOT_LIFETIME);
    Ok(p)
}

/// Writes a file only the owner may read.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), std::io::Error> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    o.mode(0o600);
    let mut f = o.open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The root CA of a data dir.
pub struct Ca {
    key: KeyPair,
    pub cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads the CA from `dir`, creating it on first start.
    pub fn load_or_create(dir: &Path) -> Result<Ca, TlsError> {
        let (cert_path, key_path) = (dir.join(ROOT_CERT_FILE), dir.join(ROOT_KEY_FILE));
        if key_path.exists() && cert_path.exists() {
            let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key = KeyPair::from_pem(&key_pem)?;
            return Ok(Ca { key, cert_pem });
        }
        let key = KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&key)?;
        write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
        write_private(&cert_path, cert.pem().as_bytes()).map_err(io(&cert_path))?;
        Ok(Ca {
            key,
            cert_pem: cert.pem(),
        })
    }

    /// A serving certificate (chain: leaf, root) and its key for `names` (DNS names or IPs),
    /// valid from now for `lifetime` (capped at [`MAX_SERVING_LIFETIME`]).
    pub fn issue_server(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        for n in names {
            let san = match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    n.clone()
                        .try_into()
                        .map_err(|_| TlsError::BadName(n.clone()))?,
                ),
            };
            p.subject_alt_names.push(san);
        }
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names
                .first()
                .cloned()
                .unwrap_or_else(|| "vmesh-control".into()),
        );
        p.distinguished_name = dn;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        (p.not_before, p.not_after) = validity(lifetime.min(MAX_SERVING_LIFETIME));
        let leaf_key = KeyPair::generate()?;
        let issuer = Issuer::new(ca_params()?, &self.key);
        let leaf = p.signed_by(&leaf_key, &issuer)?;
        let root = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|_| TlsError::Pem(ROOT_CERT_FILE.into()))?;
        let key = PrivateKeyDer::try_from(leaf_key.serialize_der())
            .map_err(|_| TlsError::Pem("serving key".into()))?;
        Ok((vec![leaf.der().clone(), root], key))
    }

    /// A serving certificate ready for rustls.
    pub fn certified_key(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<Arc<CertifiedKey>, TlsError> {
        let (chain, key) = self.issue_server(names, lifetime)?;
        let signing = provider().key_provider.load_private_key(key)?;
        Ok(Arc::new(CertifiedKey::new(chain, signing)))
    }
}

/// The serving certificate a running server presents; [`ServingCert::replace`] swaps it for a
/// new one without a restart (connections already open keep the one they started with).
#[derive(Debug)]
pub struct ServingCert(RwLock<Arc<CertifiedKey>>);

impl ServingCert {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(ServingCert(RwLock::new(key)))
    }

    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// When to issue the next one: two thirds into a certificate's life, so that a failed
    /// renewal has a third of it to be retried in.
    pub fn renew_after(lifetime: Duration) -> Duration {
        lifetime.min(MAX_SERVING_LIFETIME) * 2 / 3
    }

    /// The server's TLS config, presenting whatever certificate is current.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, TlsError> {
        let mut c = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(c)
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A client config that trusts exactly the given root certificate PEM.
pub fn client_config(root_pem: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem) {
        let cert = cert.map_err(|_| TlsError::Pem("root certificate".into()))?;
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(TlsError::Pem("root certificate".into()));
    }
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::BadName(host.to_string()))
}
