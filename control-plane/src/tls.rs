//! TLS: the control plane's root CA (created on first start in the data dir, like istiod's
//! self-signed root, and like it valid for 10 years) and a serving certificate for the
//! configured names and IPs, issued by it at every start with a lifetime of at most a year and
//! re-issued in the running server before it expires ([`ServingCert`]). Clients trust
//! `root-cert.pem`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
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
    #[error("{what}: {reason}")]
    BadCa { what: String, reason: String },
    #[error("data dir {dir}: {reason} (was the server last started with --ca-cert? pass it again, or remove root-cert.pem and root-key.pem to start a new root)")]
    Mismatch { dir: String, reason: String },
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

/// Where an existing CA comes from (`--ca-cert`, `--ca-key`, `--ca-chain`, `--ca-root`, or
/// Istio's `cacerts` directory): the CA signs, the root is what every party trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// The signing CA's certificate (Istio's `ca-cert.pem`): usually an intermediate.
    pub cert: PathBuf,
    /// Its private key (`ca-key.pem`): PKCS#8, PKCS#1 (RSA) or SEC1 (EC) PEM.
    pub key: PathBuf,
    /// Certificates between the CA and the root (`cert-chain.pem`; may include the CA itself
    /// and the root, as Istio's does).
    pub chain: Option<PathBuf>,
    /// The root (`root-cert.pem`); default: the chain's self-signed last certificate, or the
    /// CA itself when it is self-signed.
    pub root: Option<PathBuf>,
}

impl CaFiles {
    /// Istio's `cacerts` layout in `dir`; `cert-chain.pem` is optional there.
    pub fn cacerts(dir: &Path) -> CaFiles {
        use vmesh_api::ca::files;
        let chain = dir.join("cert-chain.pem");
        CaFiles {
            cert: dir.join(files::CA_CERT),
            key: dir.join(files::CA_KEY),
            chain: chain.exists().then_some(chain),
            root: Some(dir.join(files::ROOT_CERT)),
        }
    }
}

/// The CA that signs the serving certificate and workload certificates: the data dir's own
/// self-signed root, or an existing CA loaded from files.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The signing CA's certificate and those between it and the root, in that order; empty
    /// when the CA is the root itself.
    intermediates: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
    /// The root as PEM: what clients trust and the bundle hands to VMs.
    pub root_pem: String,
    /// The signing CA's own expiry: nothing it signs outlives it.
    pub not_after: time::OffsetDateTime,
    /// Loaded from files rather than the data dir's own root.
    pub external: bool,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("external", &self.external)
            .field("intermediates", &self.intermediates.len())
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(io(path))
}

fn certs_in(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::Pem(path.display().to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(path.display().to_string()));
    }
    Ok(certs)
}

/// PEM with `\n` line ends (what openssl and Go write; the pem crate's default is `\r\n`).
pub fn pem_of(der: &CertificateDer<'_>) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// What a CA certificate must be to sign with: parsed, a CA, matching its key, in its validity.
struct CaCert {
    self_signed: bool,
    not_after: time::OffsetDateTime,
}

fn check_ca_cert(
    der: &CertificateDer<'_>,
    key: Option<&KeyPair>,
    what: &str,
) -> Result<CaCert, TlsError> {
    let bad = |reason: String| TlsError::BadCa {
        what: what.to_string(),
        reason,
    };
    let (_, x) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    match x.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => {
            return Err(bad(
                "not a CA certificate (basicConstraints CA:TRUE missing)".into(),
            ))
        }
    }
    if let Some(key) = key {
        if x.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad("its public key is not the private key's".into()));
        }
    }
    let now = time::OffsetDateTime::now_utc();
    let not_after = x.validity().not_after.to_datetime();
    if now > not_after {
        return Err(bad(format!("expired at {not_after}")));
    }
    if now < x.validity().not_before.to_datetime() {
        return Err(bad(format!(
            "not valid before {}",
            x.validity().not_before.to_datetime()
        )));
    }
    Ok(CaCert {
        self_signed: x.subject() == x.issuer(),
        not_after,
    })
}

/// A private key PEM as rcgen (on ring) reads it: PKCS#8. PKCS#1 RSA keys and SEC1 EC keys,
/// which openssl and Istio's sample `cacerts` use, are wrapped into PKCS#8 first.
fn load_key(path: &Path) -> Result<KeyPair, TlsError> {
    let text = read(path)?;
    let parsed = pem::parse(&text).map_err(|_| TlsError::Pem(path.display().to_string()))?;
    let der = parsed.contents();
    let candidates: Vec<Vec<u8>> = match parsed.tag() {
        "PRIVATE KEY" => vec![der.to_vec()],
        "RSA PRIVATE KEY" => vec![pkcs8_wrap(RSA_ALG_ID, der)],
        "EC PRIVATE KEY" => vec![pkcs8_wrap(EC_P256_ALG_ID, der), pkcs8_wrap(EC_P384_ALG_ID, der)],
        other => {
            return Err(TlsError::BadCa {
                what: path.display().to_string(),
                reason: format!("PEM block {other:?} is not a private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)"),
            })
        }
    };
    candidates
        .into_iter()
        .find_map(|d| KeyPair::try_from(d).ok())
        .ok_or_else(|| TlsError::BadCa {
            what: path.display().to_string(),
            reason:
                "not an ECDSA P-256/P-384, Ed25519 or RSA private key this server can sign with"
                    .into(),
        })
}

/// AlgorithmIdentifier DER: rsaEncryption with NULL parameters.
const RSA_ALG_ID: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
/// id-ecPublicKey with prime256v1.
const EC_P256_ALG_ID: &[u8] = &[
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
    0xce, 0x3d, 0x03, 0x01, 0x07,
];
/// id-ecPublicKey with secp384r1.
const EC_P384_ALG_ID: &[u8] = &[
    0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04,
    0x00, 0x22,
];

fn der_len(n: usize, out: &mut Vec<u8>) {
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = n.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        let len = &bytes[skip..];
        out.push(0x80 | len.len() as u8);
        out.extend_from_slice(len);
    }
}

/// PKCS#8 `PrivateKeyInfo { version 0, algorithm, privateKey OCTET STRING }` around a key.
fn pkcs8_wrap(alg_id: &[u8], key: &[u8]) -> Vec<u8> {
    let mut inner = vec![0x02, 0x01, 0x00];
    inner.extend_from_slice(alg_id);
    inner.push(0x04);
    der_len(key.len(), &mut inner);
    inner.extend_from_slice(key);
    let mut out = vec![0x30];
    der_len(inner.len(), &mut out);
    out.extend_from_slice(&inner);
    out
}

impl Ca {
    /// Loads the CA from `dir`, creating it on first start.
    pub fn load_or_create(dir: &Path) -> Result<Ca, TlsError> {
        let (cert_path, key_path) = (dir.join(ROOT_CERT_FILE), dir.join(ROOT_KEY_FILE));
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let key = load_key(&key_path)?;
                let cert = certs_in(&cert_path)?.swap_remove(0);
                check_ca_cert(&cert, Some(&key), &cert_path.display().to_string()).map_err(
                    |e| TlsError::Mismatch {
                        dir: dir.display().to_string(),
                        reason: e.to_string(),
                    },
                )?;
                Ca::from_parts(key, cert.clone(), vec![], cert, false)
            }
            (true, false) => Err(TlsError::Mismatch {
                dir: dir.display().to_string(),
                reason: format!("{ROOT_CERT_FILE} without {ROOT_KEY_FILE}"),
            }),
            _ => {
                let key = KeyPair::generate()?;
                let cert = ca_params()?.self_signed(&key)?;
                write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
                write_private(&cert_path, cert.pem().as_bytes()).map_err(io(&cert_path))?;
                Ca::from_parts(key, cert.der().clone(), vec![], cert.der().clone(), false)
            }
        }
    }

    /// An existing CA (an organisation's intermediate, or Istio's `cacerts`): checked here, so
    /// that a wrong file is reported before the server binds, not at the first signature.
    pub fn from_files(f: &CaFiles) -> Result<Ca, TlsError> {
        let key = load_key(&f.key)?;
        let mut cert_file = certs_in(&f.cert)?;
        let cert = cert_file.remove(0);
        let info = check_ca_cert(&cert, Some(&key), &f.cert.display().to_string())?;
        // Everything else that was given, in order: the rest of ca-cert.pem, then the chain.
        let mut others = cert_file;
        if let Some(chain) = &f.chain {
            others.extend(certs_in(chain)?);
        }
        let root = match &f.root {
            Some(r) => certs_in(r)?.swap_remove(0),
            None => match others.last() {
                Some(last) => last.clone(),
                None if info.self_signed => cert.clone(),
                None => {
                    return Err(TlsError::BadCa {
                        what: f.cert.display().to_string(),
                        reason: "not self-signed, and no root given (--ca-root or --ca-chain ending in the root)".into(),
                    })
                }
            },
        };
        let root_info = check_ca_cert(&root, None, "root certificate")?;
        if !root_info.self_signed {
            return Err(TlsError::BadCa {
                what: "root certificate".into(),
                reason: "not self-signed (the last certificate of the chain must be the root, or pass --ca-root)".into(),
            });
        }
        let mut intermediates: Vec<CertificateDer<'static>> = vec![];
        for c in others {
            if c != root && c != cert && !intermediates.contains(&c) {
                intermediates.push(c);
            }
        }
        let ca = Ca::from_parts(key, cert, intermediates, root, true)?;
        ca.check()?;
        Ok(ca)
    }

    fn from_parts(
        key: KeyPair,
        cert: CertificateDer<'static>,
        above: Vec<CertificateDer<'static>>,
        root: CertificateDer<'static>,
        external: bool,
    ) -> Result<Ca, TlsError> {
        let info = check_ca_cert(&cert, Some(&key), "CA certificate")?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        let intermediates = if cert == root {
            vec![]
        } else {
            let mut i = vec![cert];
            i.extend(above);
            i
        };
        Ok(Ca {
            issuer,
            root_pem: pem_of(&root),
            intermediates,
            root,
            not_after: info.not_after,
            external,
        })
    }

    /// Proves that what this CA signs verifies to its root, with a real verifier: a chain
    /// that does not link up is an error at start, not at every handshake.
    fn check(&self) -> Result<(), TlsError> {
        let name = "vmesh-ca-check".to_string();
        let (chain, _) = self.issue_server(std::slice::from_ref(&name), Duration::from_secs(60))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.root.clone())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::BadCa {
            what: "root certificate".into(),
            reason: e.to_string(),
        })?;
        let (leaf, rest) = chain.split_first().ok_or(TlsError::Pem("chain".into()))?;
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            &*verifier,
            leaf,
            rest,
            &server_name(&name)?,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map_err(|e| TlsError::BadCa {
            what: "CA chain".into(),
            reason: format!("a certificate it signs does not verify to the root: {e}"),
        })?;
        Ok(())
    }

    /// Signs `params` for `public_key` (a CSR's): the workload CA's way in.
    pub fn sign(
        &self,
        params: &CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<rcgen::Certificate, TlsError> {
        Ok(params.signed_by(public_key, &self.issuer)?)
    }

    /// What follows a leaf this CA signed, as PEM: intermediates, then the root.
    pub fn chain_pem(&self) -> Vec<String> {
        let mut v: Vec<String> = self.intermediates.iter().map(pem_of).collect();
        v.push(self.root_pem.clone());
        v
    }

    /// A serving certificate (chain: leaf, intermediates, root) and its key for `names` (DNS
    /// names or IPs), valid from now for `lifetime` (capped at [`MAX_SERVING_LIFETIME`]).
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
        p.not_after = p.not_after.min(self.not_after);
        let leaf_key = KeyPair::generate()?;
        let leaf = p.signed_by(&leaf_key, &self.issuer)?;
        let key = PrivateKeyDer::try_from(leaf_key.serialize_der())
            .map_err(|_| TlsError::Pem("serving key".into()))?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        chain.push(self.root.clone());
        Ok((chain, key))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn openssl(dir: &Path, args: &[&str]) {
        let ok = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(ok, "openssl {args:?}");
    }

    #[test]
    fn pkcs1_and_sec1_keys_are_read_as_openssl_writes_them() {
        let dir = vmesh_test_support::TempDir::new();
        let d = dir.path();
        openssl(d, &["genrsa", "-traditional", "-out", "rsa.pem", "2048"]);
        openssl(
            d,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "p256.pem",
            ],
        );
        openssl(
            d,
            &[
                "ecparam",
                "-name",
                "secp384r1",
                "-genkey",
                "-noout",
                "-out",
                "p384.pem",
            ],
        );
        for (file, tag, alg) in [
            ("rsa.pem", "RSA PRIVATE KEY", &rcgen::PKCS_RSA_SHA256),
            ("p256.pem", "EC PRIVATE KEY", &rcgen::PKCS_ECDSA_P256_SHA256),
            ("p384.pem", "EC PRIVATE KEY", &rcgen::PKCS_ECDSA_P384_SHA384),
        ] {
            let text = std::fs::read_to_string(d.join(file)).unwrap();
            assert!(
                text.starts_with(&format!("-----BEGIN {tag}-----")),
                "{file}"
            );
            let key = load_key(&d.join(file)).unwrap();
            assert!(key.is_compatible(alg), "{file}");
        }
        let e = load_key(&dir.file(
            "cert.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ));
        assert!(matches!(e, Err(TlsError::BadCa { .. })), "{e:?}");
    }

    #[test]
    fn a_data_dir_whose_root_and_key_disagree_is_refused() {
        let a = vmesh_test_support::TempDir::new();
        let b = vmesh_test_support::TempDir::new();
        Ca::load_or_create(a.path()).unwrap();
        Ca::load_or_create(b.path()).unwrap();
        std::fs::copy(b.path().join(ROOT_CERT_FILE), a.path().join(ROOT_CERT_FILE)).unwrap();
        let e = Ca::load_or_create(a.path());
        assert!(matches!(e, Err(TlsError::Mismatch { .. })), "{e:?}");
        std::fs::remove_file(b.path().join(ROOT_KEY_FILE)).unwrap();
        let e = Ca::load_or_create(b.path());
        assert!(matches!(e, Err(TlsError::Mismatch { .. })), "{e:?}");
        // Not overwritten: the operator decides.
        assert!(!b.path().join(ROOT_KEY_FILE).exists());
    }
}
