//! A mesh CA for tests that need several sidecars with workload certificates but no control
//! plane: it issues SPIFFE certificates and installs them where `vm-sidecar.yaml`'s SDS reads
//! (the same files and SDS resources the shim writes: `docs/identity.md`).

use std::path::Path;

use vmesh_api::ca::{files, sds};

#[derive(Debug)]
pub struct MeshCa {
    key: rcgen::KeyPair,
    params: rcgen::CertificateParams,
    pub root_pem: String,
}

impl MeshCa {
    pub fn new() -> MeshCa {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "vmesh test mesh root");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let root_pem = params.self_signed(&key).expect("self-sign the CA").pem();
        MeshCa {
            key,
            params,
            root_pem,
        }
    }

    /// Writes a certificate for `spiffe_id` and the SDS files into `cert_dir` (before Envoy
    /// starts: it refuses a config whose SDS files do not exist).
    pub fn install(&self, cert_dir: &Path, spiffe_id: &str) {
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let mut leaf = rcgen::CertificateParams::default();
        // Not rcgen's default subject, which the root would share: a leaf named like its
        // issuer looks self-signed to a verifier.
        leaf.distinguished_name = rcgen::DistinguishedName::new();
        leaf.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(spiffe_id).expect("a URI"),
        )];
        leaf.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = leaf.signed_by(&key, &issuer).expect("sign the leaf");
        std::fs::create_dir_all(cert_dir).expect("cert dir");
        let write = |name: &str, text: &str| {
            std::fs::write(cert_dir.join(name), text).expect("write a cert file");
        };
        write(files::KEY, &key.serialize_pem());
        write(files::CERT_CHAIN, &cert.pem());
        write(files::ROOT_CERT, &self.root_pem);
        write(
            files::SDS_DEFAULT,
            &format!(
                "resources:\n- \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n  \
                 name: {}\n  tls_certificate:\n    certificate_chain: {{filename: {}}}\n    \
                 private_key: {{filename: {}}}\n",
                sds::DEFAULT,
                cert_dir.join(files::CERT_CHAIN).display(),
                cert_dir.join(files::KEY).display()
            ),
        );
        write(
            files::SDS_ROOTCA,
            &format!(
                "resources:\n- \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n  \
                 name: {}\n  validation_context:\n    trusted_ca: {{filename: {}}}\n",
                sds::ROOT_CA,
                cert_dir.join(files::ROOT_CERT).display()
            ),
        );
    }
}

impl Default for MeshCa {
    fn default() -> Self {
        MeshCa::new()
    }
}
