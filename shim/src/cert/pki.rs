//! The VM's key, its certificate signing request and what a signed chain says: no I/O.
//!
//! The key is ECDSA P-256 (what Istio's agent generates by default) and never leaves the VM:
//! only the CSR does. The CSR asks for one URI SAN, the SPIFFE ID the token names; the CA
//! decides anyway, from the token.

use std::time::{Duration, SystemTime};

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::policy::Held;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating the key: {0}")]
    Key(rcgen::Error),
    #[error("SPIFFE ID {0:?} is not a valid URI SAN")]
    Uri(String),
    #[error("building the CSR: {0}")]
    Csr(rcgen::Error),
    #[error("the CA answered an empty certificate chain")]
    EmptyChain,
    #[error("certificate {index} of the chain: {reason}")]
    BadCertificate { index: usize, reason: String },
    #[error("the certificate is for {got:?}, not {want:?}")]
    WrongIdentity { got: Vec<String>, want: String },
    #[error("the certificate is not for this key")]
    WrongKey,
}

/// A new key and the CSR for `spiffe_id`, both PEM.
pub fn key_and_csr(spiffe_id: &str) -> Result<(String, String), PkiError> {
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(PkiError::Key)?;
    let uri = rcgen::string::Ia5String::try_from(spiffe_id)
        .map_err(|_| PkiError::Uri(spiffe_id.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    // Istio's agent sends no subject either: the identity is the SAN.
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(PkiError::Csr)?;
    Ok((key.serialize_pem(), csr))
}

/// One certificate of a chain, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Lower-case hex without leading zero bytes, as Envoy's `/certs` prints it.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub uris: Vec<String>,
    pub public_key_der: Vec<u8>,
}

/// The DER of every CERTIFICATE block in `pem`, in order.
pub fn pem_certs(pem: &[u8]) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

fn time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    match u64::try_from(secs) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

pub fn cert_info(der: &[u8], index: usize) -> Result<CertInfo, PkiError> {
    let bad = |reason: String| PkiError::BadCertificate { index, reason };
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
    let mut uris = Vec::new();
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| bad(e.to_string()))?
    {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris.push((*u).to_string());
            }
        }
    }
    let serial: String = cert
        .raw_serial()
        .iter()
        .skip_while(|b| **b == 0)
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(CertInfo {
        serial: if serial.is_empty() {
            "0".into()
        } else {
            serial
        },
        not_before: time(cert.validity().not_before),
        not_after: time(cert.validity().not_after),
        uris,
        public_key_der: cert.public_key().subject_public_key.data.to_vec(),
    })
}

/// A signed chain the shim accepts: leaf first, root last (the CA's answer, one PEM each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub leaf: CertInfo,
    /// Leaf and intermediates, PEM, as Envoy's `certificate_chain` wants them.
    pub chain_pem: String,
    /// The root, PEM, for Envoy's `ROOTCA`.
    pub root_pem: String,
    pub root_der: Vec<u8>,
}

impl Chain {
    pub fn held(&self) -> Held {
        Held {
            not_before: self.leaf.not_before,
            not_after: self.leaf.not_after,
            uris: self.leaf.uris.clone(),
            root_der: self.root_der.clone(),
        }
    }
}

/// Checks the CA's answer: a leaf for `key_pem`'s key naming only `want_uri`. A one-element
/// chain (a CA that leaves the root out) is completed with `fallback_root_pem`, the mesh
/// root the shim already trusts.
pub fn accept_chain(
    elements: &[String],
    key_pem: &str,
    want_uri: &str,
    fallback_root_pem: &[u8],
) -> Result<Chain, PkiError> {
    let ders: Vec<Vec<u8>> = elements
        .iter()
        .flat_map(|e| pem_certs(e.as_bytes()))
        .collect();
    let leaf_der = ders.first().ok_or(PkiError::EmptyChain)?;
    let leaf = cert_info(leaf_der, 0)?;
    if leaf.uris.len() != 1 || leaf.uris.first().map(String::as_str) != Some(want_uri) {
        return Err(PkiError::WrongIdentity {
            got: leaf.uris,
            want: want_uri.to_string(),
        });
    }
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(PkiError::Key)?;
    if key.public_key_raw() != leaf.public_key_der.as_slice() {
        return Err(PkiError::WrongKey);
    }
    let (chain_ders, root_der) = match ders.split_last() {
        Some((root, rest)) if !rest.is_empty() => (rest.to_vec(), root.clone()),
        _ => {
            let root = pem_certs(fallback_root_pem)
                .into_iter()
                .next()
                .ok_or(PkiError::EmptyChain)?;
            (ders.clone(), root)
        }
    };
    for (i, der) in chain_ders.iter().enumerate().skip(1) {
        cert_info(der, i)?;
    }
    Ok(Chain {
        leaf,
        chain_pem: chain_ders.iter().map(|d| to_pem(d)).collect(),
        root_pem: to_pem(&root_der),
        root_der,
    })
}

/// Reads back what [`accept_chain`] wrote: the chain file (leaf first) and the root file.
pub fn read_chain(chain_pem: &[u8], root_pem: &[u8]) -> Result<Chain, PkiError> {
    let ders = pem_certs(chain_pem);
    let leaf = cert_info(ders.first().ok_or(PkiError::EmptyChain)?, 0)?;
    let root_der = pem_certs(root_pem)
        .into_iter()
        .next()
        .ok_or(PkiError::EmptyChain)?;
    Ok(Chain {
        leaf,
        chain_pem: String::from_utf8_lossy(chain_pem).into_owned(),
        root_pem: String::from_utf8_lossy(root_pem).into_owned(),
        root_der,
    })
}

pub fn to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const URI: &str = "spiffe://cluster.local/ns/vm/sa/vm-sa";

    /// A test CA signing `csr` for `uri` (what the control plane does, minimally).
    fn sign(csr_pem: &str, uri: &str) -> (Vec<String>, String) {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, &ca_key);
        let req = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        let mut params = req.params;
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(uri).unwrap(),
        )];
        let leaf = params.signed_by(&req.public_key, &issuer).unwrap();
        (vec![leaf.pem(), ca_cert.pem()], ca_cert.pem())
    }

    #[test]
    fn the_csr_asks_for_the_spiffe_id_only_and_the_signed_chain_is_accepted() {
        let (key, csr) = key_and_csr(URI).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        assert_eq!(parsed.params.subject_alt_names.len(), 1);
        let (chain, root) = sign(&csr, URI);
        let c = accept_chain(&chain, &key, URI, b"").unwrap();
        assert_eq!(c.leaf.uris, vec![URI.to_string()]);
        assert_eq!(pem_certs(root.as_bytes()), vec![c.root_der.clone()]);
        assert_eq!(
            pem_certs(c.chain_pem.as_bytes()).len(),
            1,
            "the root is not in the chain file"
        );
        let back = read_chain(c.chain_pem.as_bytes(), c.root_pem.as_bytes()).unwrap();
        assert_eq!(back.leaf, c.leaf);
        assert_eq!(back.root_der, c.root_der);
    }

    #[test]
    fn a_chain_for_another_identity_or_key_is_refused() {
        let (key, csr) = key_and_csr(URI).unwrap();
        let (chain, _) = sign(&csr, "spiffe://cluster.local/ns/vm/sa/other");
        assert!(matches!(
            accept_chain(&chain, &key, URI, b""),
            Err(PkiError::WrongIdentity { .. })
        ));
        let (other_key, _) = key_and_csr(URI).unwrap();
        let (chain, _) = sign(&csr, URI);
        assert!(matches!(
            accept_chain(&chain, &other_key, URI, b""),
            Err(PkiError::WrongKey)
        ));
        assert!(matches!(
            accept_chain(&[], &key, URI, b""),
            Err(PkiError::EmptyChain)
        ));
        assert!(matches!(
            accept_chain(&["not pem".into()], &key, URI, b""),
            Err(PkiError::EmptyChain)
        ));
    }

    #[test]
    fn a_leaf_alone_is_completed_with_the_trusted_root() {
        let (key, csr) = key_and_csr(URI).unwrap();
        let (chain, root) = sign(&csr, URI);
        let leaf_only = chain.first().cloned().into_iter().collect::<Vec<_>>();
        let c = accept_chain(&leaf_only, &key, URI, root.as_bytes()).unwrap();
        assert_eq!(pem_certs(root.as_bytes()), vec![c.root_der]);
    }
}
