//! Workload certificates: the CA call a VM makes to get its mesh identity, exactly as Istio's
//! agent makes it of istiod, so a vmesh shim can use a real istiod and an Istio agent can use
//! vmesh as its CA.
//!
//! ```text
//! shim ──gRPC (HTTP/2 over TLS, :15012)──► control plane
//!   POST /istio.v1.auth.IstioCertificateService/CreateCertificate
//!   authorization: Bearer <the VM's token>
//!   IstioCertificateRequest{csr: PEM, validity_duration: seconds, metadata}
//!                          ◄── IstioCertificateResponse{cert_chain: [leaf, intermediates.., root]}
//! ```
//!
//! The schema, as Istio's `security/v1alpha1` API declares it (proto3; the messages below are
//! its Rust form, encoded and decoded by prost):
//!
//! ```text
//! package istio.v1.auth;
//! service IstioCertificateService {
//!   rpc CreateCertificate(IstioCertificateRequest) returns (IstioCertificateResponse);
//! }
//! message IstioCertificateRequest {
//!   string csr = 1;                       // PEM-encoded PKCS#10 request
//!   int64 validity_duration = 3;          // requested TTL in seconds
//!   google.protobuf.Struct metadata = 4;  // optional; Istio's agent may send CertSigner
//! }
//! message IstioCertificateResponse {
//!   repeated string cert_chain = 1;       // PEM each: leaf first, root last
//! }
//! ```
//!
//! Who the certificate is for is decided by the caller's token, never by the CSR: its only
//! URI SAN is `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`. Native code only
//! (the `native` feature): the filter never talks to the CA.

/// gRPC service, method and the HTTP/2 path they make.
pub const SERVICE: &str = "istio.v1.auth.IstioCertificateService";
pub const METHOD: &str = "CreateCertificate";
pub const PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// Istio's agent metadata header naming the cluster (`ClusterID`); sent, not required.
pub const CLUSTER_ID_HEADER: &str = "clusterid";

/// The TTL an agent asks for unless told otherwise (Istio's `SECRET_TTL`, 24 h).
pub const DEFAULT_TTL_SECS: i64 = 24 * 3600;
/// The share of a certificate's life after which the agent rotates it (Istio's
/// `SECRET_GRACE_PERIOD_RATIO`, 0.5: at half-life).
pub const ROTATE_AT: f64 = 0.5;
/// The default trust domain (Istio's mesh config `trustDomain`).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Request: a CSR and the TTL wanted.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded PKCS#10 certificate signing request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested validity in seconds; the CA bounds it by its maximum.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Free-form; Istio's agent may name a `CertSigner` here. vmesh ignores it.
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// Response: the signed chain, PEM per element, leaf first and root last.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// The SPIFFE ID Istio gives a workload: `spiffe://TD/ns/NS/sa/SA`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// Largest request message the CA reads: a CSR is a few KiB (an RSA-4096 one under 2 KiB),
/// so 64 KiB is room to spare and bounds what an unauthenticated caller makes it buffer.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// gRPC status codes the CA answers with (grpc/grpc `doc/statuscodes.md`), in the
/// `grpc-status` trailer; `grpc-message` says why, percent-encoded.
pub mod status {
    pub const OK: u32 = 0;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
    pub const UNAUTHENTICATED: u32 = 16;
    /// Trailer names.
    pub const STATUS_HEADER: &str = "grpc-status";
    pub const MESSAGE_HEADER: &str = "grpc-message";
}

/// One certificate the control plane issued, as `GET` [`crate::paths::control::ADMIN_CERTIFICATES`]
/// lists it (newest first) and `vmesh-control get certificates` prints it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCertificate {
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// The certificate's only URI SAN.
    pub spiffe_id: String,
    pub namespace: String,
    pub service_account: String,
    /// RFC 3339.
    pub issued_at: String,
    pub not_after: String,
    /// Where the request came from (the VM's address as the control plane saw it).
    #[serde(default)]
    pub peer: String,
    /// Istio's `ClusterID` metadata header, when the caller sent one.
    #[serde(default)]
    pub cluster_id: String,
}

/// The admin listing's body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedList {
    pub items: Vec<IssuedCertificate>,
}

/// Files where the VM's certificate lives, with Istio's names (what `istio-agent` writes for
/// file-mounted certificates, and what `cacerts` uses for a CA): Envoy reads them through SDS.
pub mod files {
    /// The VM's private key (PKCS#8 PEM, mode 0600; never leaves the VM).
    pub const KEY: &str = "key.pem";
    /// The VM's certificate followed by any intermediates.
    pub const CERT_CHAIN: &str = "cert-chain.pem";
    /// The mesh root the peers' certificates must chain to.
    pub const ROOT_CERT: &str = "root-cert.pem";
    /// Istio's `cacerts` secret: the CA's own certificate and key.
    pub const CA_CERT: &str = "ca-cert.pem";
    pub const CA_KEY: &str = "ca-key.pem";
    /// vmesh's SDS resource files beside them (Envoy's `path_config_source`), one per secret.
    pub const SDS_DEFAULT: &str = "sds-default.yaml";
    pub const SDS_ROOTCA: &str = "sds-rootca.yaml";
}

/// SDS secret names as Istio's sidecars name them.
pub mod sds {
    /// The workload's own certificate and key.
    pub const DEFAULT: &str = "default";
    /// The root(s) peers are verified against.
    pub const ROOT_CA: &str = "ROOTCA";
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn request_round_trips_with_istio_field_numbers() {
        let req = IstioCertificateRequest {
            csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
            validity_duration: DEFAULT_TTL_SECS,
            metadata: None,
        };
        let bytes = req.encode_to_vec();
        // Field 1 (csr, length-delimited) then field 3 (varint): tags 0x0a and 0x18.
        assert_eq!(bytes.first(), Some(&0x0a));
        assert!(bytes.contains(&0x18));
        assert_eq!(
            IstioCertificateRequest::decode(bytes.as_slice()).ok(),
            Some(req)
        );
    }

    #[test]
    fn spiffe_id_has_istio_shape() {
        assert_eq!(
            spiffe_id("cluster.local", "vm", "vm-sa"),
            "spiffe://cluster.local/ns/vm/sa/vm-sa"
        );
    }
}
