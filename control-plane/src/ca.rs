//! The workload CA: turns a VM's CSR into a SPIFFE certificate for the identity its token
//! proved, signed by the control plane's CA ([`crate::tls::Ca`]: the data dir's root or a
//! plugged-in intermediate). The gRPC framing around it lives in `api.rs`; this module decides
//! what is signed.
//!
//! ```text
//! token ─verify─► Identity{ns, sa} ──┐
//! CSR ─parse, self-signature, key type, SANs ─► public key ─┴─► leaf{URI SAN spiffe://TD/ns/NS/sa/SA,
//!                                                               TTL = min(asked or 24h, max, CA's life)}
//! ```
//!
//! The CSR contributes only its public key: subject, extensions and anything else it asks for
//! are never copied. A CSR that asks for a SAN other than the token's SPIFFE ID is refused
//! rather than silently narrowed, so a misconfigured agent learns why at once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateSigningRequestDer;
use vmesh_api::ca::{spiffe_id, status, IssuedCertificate, DEFAULT_TTL_SECS};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::identity::{Identity, TokenError};
use crate::tls::Ca;

/// Istio's `MAX_WORKLOAD_CERT_TTL` default: 90 days.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// `notBefore` is this far back: a peer whose clock is a little behind accepts a fresh cert.
const BACKDATE: Duration = Duration::from_secs(300);
/// Smallest RSA key accepted (Istio's agents use 2048 by default).
const MIN_RSA_BITS: usize = 2048;
/// How many issued certificates `get certificates` can show.
pub const RECENT: usize = 1024;

/// Why a certificate was not issued. Each has a gRPC status (Istio's choices where Istio has
/// one) and a metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Token(TokenError),
    #[error("the admin credential has no workload identity; call with a service-account token")]
    NotAWorkload,
    #[error("{0}")]
    BadMessage(String),
    #[error("request message over {limit} bytes")]
    Oversized { limit: usize },
    #[error("compressed gRPC messages are not accepted (send grpc-encoding identity)")]
    Compressed,
    #[error("CSR: {0}")]
    BadCsr(String),
    #[error("CSR signature does not verify with its own public key")]
    CsrSignature,
    #[error("CSR key: {0} (ECDSA P-256 or RSA of at least 2048 bits)")]
    KeyType(String),
    #[error("CSR asks for {asked}; this token may only have {allowed}")]
    ForeignIdentity { asked: String, allowed: String },
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("request not received within {0:?}")]
    Timeout(Duration),
}

impl Refusal {
    pub fn grpc_status(&self) -> u32 {
        match self {
            Refusal::Token(_) => status::UNAUTHENTICATED,
            Refusal::NotAWorkload => status::PERMISSION_DENIED,
            Refusal::Oversized { .. } => status::RESOURCE_EXHAUSTED,
            Refusal::Compressed => status::UNIMPLEMENTED,
            Refusal::Signing(_) => status::INTERNAL,
            Refusal::Timeout(_) => status::DEADLINE_EXCEEDED,
            Refusal::BadMessage(_)
            | Refusal::BadCsr(_)
            | Refusal::CsrSignature
            | Refusal::KeyType(_)
            | Refusal::ForeignIdentity { .. } => status::INVALID_ARGUMENT,
        }
    }

    /// `vmesh_certificates_refused_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Token(_) => "unauthenticated",
            Refusal::NotAWorkload => "not_a_workload",
            Refusal::BadMessage(_) => "bad_message",
            Refusal::Oversized { .. } => "oversized",
            Refusal::Compressed => "compressed",
            Refusal::BadCsr(_) => "bad_csr",
            Refusal::CsrSignature => "bad_csr_signature",
            Refusal::KeyType(_) => "key_type",
            Refusal::ForeignIdentity { .. } => "foreign_identity",
            Refusal::Signing(_) => "signing",
            Refusal::Timeout(_) => "timeout",
        }
    }
}

impl crate::metrics::Label for Refusal {
    fn label(&self) -> &'static str {
        self.reason()
    }
}

/// A signed certificate: the chain to answer with and what `get certificates` shows.
#[derive(Debug, Clone)]
pub struct Signed {
    /// PEM each: leaf, intermediates, root.
    pub chain: Vec<String>,
    pub record: IssuedCertificate,
}

/// The CA as workloads see it.
pub struct WorkloadCa {
    ca: Arc<Ca>,
    trust_domain: String,
    max_ttl: Duration,
    recent: Mutex<VecDeque<IssuedCertificate>>,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for WorkloadCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCa")
            .field("trust_domain", &self.trust_domain)
            .field("max_ttl", &self.max_ttl)
            .finish_non_exhaustive()
    }
}

/// What the CSR asks for, once checked: only its public key is used.
struct Csr {
    spki_der: Vec<u8>,
}

fn parse_csr(pem: &str, allowed: &str) -> Result<Csr, Refusal> {
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| Refusal::BadCsr("not a PEM CERTIFICATE REQUEST".into()))?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| Refusal::BadCsr(format!("not a PKCS#10 request: {e}")))?;
    let info = &csr.certification_request_info;
    match info.subject_pki.parsed() {
        Ok(PublicKey::EC(_)) => {
            let curve = info
                .subject_pki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            if curve.as_ref() != Some(&x509_parser::oid_registry::OID_EC_P256) {
                return Err(Refusal::KeyType(match curve {
                    Some(c) => format!("EC curve {c}"),
                    None => "EC key without a named curve".into(),
                }));
            }
        }
        Ok(PublicKey::RSA(rsa)) => {
            let bits = rsa.key_size();
            if bits < MIN_RSA_BITS {
                return Err(Refusal::KeyType(format!("RSA key of {bits} bits")));
            }
        }
        Ok(_) => {
            return Err(Refusal::KeyType(format!(
                "algorithm {}",
                info.subject_pki.algorithm.algorithm
            )))
        }
        Err(e) => return Err(Refusal::KeyType(format!("unreadable public key: {e}"))),
    }
    // After the key type: a key the CA refuses anyway is not worth a signature check.
    csr.verify_signature().map_err(|_| Refusal::CsrSignature)?;
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(u) if *u == allowed => {}
                            other => {
                                return Err(Refusal::ForeignIdentity {
                                    asked: describe(other),
                                    allowed: allowed.to_string(),
                                })
                            }
                        }
                    }
                }
                ParsedExtension::ParseError { error } => {
                    return Err(Refusal::BadCsr(format!("unreadable extension: {error}")))
                }
                // Key usages, basic constraints and the rest: the CA decides those itself.
                _ => {}
            }
        }
    }
    Ok(Csr {
        spki_der: info.subject_pki.raw.to_vec(),
    })
}

/// A SAN as an operator would write it, bounded so an error stays one line.
fn describe(n: &GeneralName<'_>) -> String {
    let s = match n {
        GeneralName::URI(u) => format!("URI:{u}"),
        GeneralName::DNSName(d) => format!("DNS:{d}"),
        GeneralName::RFC822Name(e) => format!("email:{e}"),
        GeneralName::IPAddress(ip) => match ip.len() {
            4 | 16 => {
                let addr: Option<std::net::IpAddr> = match ip.len() {
                    4 => <[u8; 4]>::try_from(*ip).ok().map(Into::into),
                    _ => <[u8; 16]>::try_from(*ip).ok().map(Into::into),
                };
                addr.map_or_else(|| "IP".into(), |a| format!("IP:{a}"))
            }
            _ => "IP".into(),
        },
        other => format!("{other}"),
    };
    s.chars().take(200).collect()
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    let nanos = u64::try_from(t.unix_timestamp_nanos()).unwrap_or(0);
    vmesh_api::time::format_rfc3339_secs(nanos)
}

impl WorkloadCa {
    pub fn new(ca: Arc<Ca>, trust_domain: &str, max_ttl: Duration) -> Self {
        WorkloadCa {
            ca,
            trust_domain: trust_domain.to_string(),
            max_ttl,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            rng: ring::rand::SystemRandom::new(),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The validity a request gets: what it asked (zero or negative: Istio's 24 h default),
    /// at most the maximum. (istiod refuses a TTL over its maximum; bounding it instead lets an
    /// agent configured for longer still get a certificate, which it rotates at half-life.)
    pub fn ttl(&self, requested_secs: i64) -> Duration {
        let asked = if requested_secs <= 0 {
            DEFAULT_TTL_SECS
        } else {
            requested_secs
        };
        Duration::from_secs(u64::try_from(asked).unwrap_or(0)).min(self.max_ttl)
    }

    /// Signs `csr_pem` for `id`, valid from `now_nanos` for [`WorkloadCa::ttl`].
    pub fn sign(
        &self,
        csr_pem: &str,
        id: &Identity,
        requested_secs: i64,
        now_nanos: u64,
    ) -> Result<Signed, Refusal> {
        let spiffe = spiffe_id(&self.trust_domain, &id.namespace, &id.service_account);
        let csr = parse_csr(csr_pem, &spiffe)?;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(&csr.spki_der)
            .map_err(|e| Refusal::KeyType(format!("unsupported public key: {e}")))?;
        let now = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_nanos))
            .map_err(|e| Refusal::Signing(format!("clock: {e}")))?;
        let mut p = CertificateParams::default();
        // Istio's workload certificates have an empty subject; the SAN is then critical
        // (RFC 5280 4.2.1.6), which rcgen does for an empty subject.
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names =
            vec![SanType::URI(spiffe.clone().try_into().map_err(|_| {
                Refusal::Signing(format!("{spiffe:?} is not an IA5 string"))
            })?)];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = now - BACKDATE;
        p.not_after = (now + self.ttl(requested_secs)).min(self.ca.not_after);
        let mut serial = [0u8; 16];
        ring::rand::SecureRandom::fill(&self.rng, &mut serial)
            .map_err(|_| Refusal::Signing("no randomness for a serial number".into()))?;
        // Positive and of full length: DER INTEGERs are signed and minimal.
        serial[0] = (serial[0] & 0x7f) | 0x40;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        let leaf = self
            .ca
            .sign(&p, &public_key)
            .map_err(|e| Refusal::Signing(e.to_string()))?;
        let mut chain = vec![leaf.pem().replace("\r\n", "\n")];
        chain.extend(self.ca.chain_pem());
        let record = IssuedCertificate {
            serial: serial.iter().map(|b| format!("{b:02X}")).collect(),
            spiffe_id: spiffe,
            namespace: id.namespace.clone(),
            service_account: id.service_account.clone(),
            issued_at: rfc3339(now),
            not_after: rfc3339(p.not_after),
            peer: String::new(),
            cluster_id: String::new(),
        };
        Ok(Signed { chain, record })
    }

    /// Remembers an issued certificate for `get certificates` (the oldest is forgotten past
    /// [`RECENT`]; memory only, so a restart starts an empty list).
    pub fn remember(&self, record: IssuedCertificate) {
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() == RECENT {
            r.pop_back();
        }
        r.push_front(record);
    }

    /// Newest first.
    pub fn recent(&self) -> Vec<IssuedCertificate> {
        let r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        r.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::KeyPair;

    fn ca() -> WorkloadCa {
        let dir = vmesh_test_support::TempDir::new();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        WorkloadCa::new(Arc::new(ca), "cluster.local", DEFAULT_MAX_TTL)
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity {
            namespace: ns.into(),
            service_account: sa.into(),
            issuer: "test".into(),
        }
    }

    fn csr(key: &KeyPair, sans: Vec<SanType>) -> String {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = sans;
        p.serialize_request(key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.to_string().try_into().unwrap())
    }

    const NOW: u64 = 1_800_000_000_000_000_000;

    #[test]
    fn the_only_uri_san_is_the_tokens_spiffe_id() {
        let ca = ca();
        let key = KeyPair::generate().unwrap();
        for sans in [vec![], vec![uri("spiffe://cluster.local/ns/vm/sa/app")]] {
            let s = ca.sign(&csr(&key, sans), &id("vm", "app"), 0, NOW).unwrap();
            assert_eq!(s.chain.len(), 2, "leaf and root");
            let der = CertificateDer::from_pem_slice(s.chain[0].as_bytes()).unwrap();
            let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
            let san = x.subject_alternative_name().unwrap().unwrap();
            assert!(san.critical, "empty subject: SAN critical");
            assert_eq!(
                san.value.general_names,
                vec![GeneralName::URI("spiffe://cluster.local/ns/vm/sa/app")]
            );
            assert_eq!(s.record.spiffe_id, "spiffe://cluster.local/ns/vm/sa/app");
            let life = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
            assert_eq!(life, DEFAULT_TTL_SECS + 300, "24h plus the backdating");
            assert!(!x.is_ca());
        }
    }

    use rustls::pki_types::CertificateDer;

    #[test]
    fn a_csr_asking_for_another_name_is_refused() {
        let ca = ca();
        let key = KeyPair::generate().unwrap();
        for san in [
            uri("spiffe://cluster.local/ns/other/sa/app"),
            uri("spiffe://evil.example/ns/vm/sa/app"),
            SanType::DnsName("app.vm.svc".try_into().unwrap()),
            SanType::IpAddress("10.0.0.1".parse().unwrap()),
            SanType::Rfc822Name("a@b.example".try_into().unwrap()),
        ] {
            let e = ca
                .sign(
                    &csr(&key, vec![uri("spiffe://cluster.local/ns/vm/sa/app"), san]),
                    &id("vm", "app"),
                    0,
                    NOW,
                )
                .unwrap_err();
            assert!(matches!(e, Refusal::ForeignIdentity { .. }), "{e}");
            assert_eq!(e.grpc_status(), status::INVALID_ARGUMENT);
        }
    }

    #[test]
    fn ttl_is_asked_or_24h_and_at_most_the_maximum() {
        let ca = WorkloadCa::new(ca().ca, "cluster.local", Duration::from_secs(3600));
        assert_eq!(ca.ttl(0), Duration::from_secs(3600));
        assert_eq!(ca.ttl(-5), Duration::from_secs(3600));
        assert_eq!(ca.ttl(60), Duration::from_secs(60));
        assert_eq!(ca.ttl(i64::MAX), Duration::from_secs(3600));
        let big = WorkloadCa::new(ca.ca.clone(), "cluster.local", DEFAULT_MAX_TTL);
        assert_eq!(big.ttl(0), Duration::from_secs(24 * 3600));
    }

    #[test]
    fn weak_or_foreign_keys_and_garbage_are_refused() {
        let ca = ca();
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let e = ca.sign(&csr(&p384, vec![]), &id("vm", "app"), 0, NOW);
        assert!(matches!(e, Err(Refusal::KeyType(_))), "{e:?}");
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let e = ca.sign(&csr(&ed, vec![]), &id("vm", "app"), 0, NOW);
        assert!(matches!(e, Err(Refusal::KeyType(_))), "{e:?}");
        for garbage in [
            "",
            "hello",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            let e = ca.sign(garbage, &id("vm", "app"), 0, NOW);
            assert!(matches!(e, Err(Refusal::BadCsr(_))), "{e:?}");
        }
    }

    #[test]
    fn a_csr_whose_signature_does_not_verify_is_refused() {
        let ca = ca();
        let key = KeyPair::generate().unwrap();
        let pem = csr(&key, vec![]);
        let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        // The last byte is inside the signature's BIT STRING.
        if let Some(b) = der.last_mut() {
            *b ^= 1;
        }
        let bad = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        let e = ca.sign(&bad, &id("vm", "app"), 0, NOW);
        assert!(matches!(e, Err(Refusal::CsrSignature)), "{e:?}");
    }

    #[test]
    fn the_recent_list_is_bounded_and_newest_first() {
        let ca = ca();
        let key = KeyPair::generate().unwrap();
        let s = ca
            .sign(&csr(&key, vec![]), &id("vm", "app"), 0, NOW)
            .unwrap();
        for i in 0..RECENT + 5 {
            let mut r = s.record.clone();
            r.serial = i.to_string();
            ca.remember(r);
        }
        let r = ca.recent();
        assert_eq!(r.len(), RECENT);
        assert_eq!(r[0].serial, (RECENT + 4).to_string());
    }
}
