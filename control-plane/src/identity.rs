//! VM identity: bearer JWTs shaped like Kubernetes service-account tokens.
//!
//! The control plane mints ES256 tokens with its own key ([`Signer`]); tokens from other
//! issuers (a real cluster's `kubectl create token SA --audience istio-ca`, RS256) are checked
//! against that issuer's JWKS file. Every refusal has its own [`TokenError`] variant and
//! `reason()` string, which the server logs and counts.
//!
//! The JWS work (JWK keys, signature verification, signing) is `jsonwebtoken`'s, on `ring`.
//! What stays here is what a service-account token means: a token is first read without
//! trusting it, only to classify what is wrong with it and to pick its issuer's keys; the claims
//! used afterwards are the ones `jsonwebtoken::decode` returns from a verified token, checked
//! against this control plane's clock with a 30 s leeway (`jsonwebtoken`'s own time checks read
//! the system clock, so they are off).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::random::{self, Entropy, RandomError, SystemEntropy};

pub const AUDIENCE: &str = "istio-ca";
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 30;
/// Longest token read at all. Kubernetes tokens are about 1 KiB; anything near this is an
/// attempt to make the server base64-decode, parse and hash megabytes per request.
pub const MAX_TOKEN_BYTES: usize = 16 << 10;
/// Shortest RSA modulus a trusted JWKS may hold (NIST SP 800-57: 1024-bit keys are broken in
/// practice, 2048 is the floor Kubernetes and every mainstream issuer use).
pub const MIN_RSA_BITS: usize = 2048;
const SA_PREFIX: &str = "system:serviceaccount:";

/// Who a verified token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
    pub issuer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no bearer token")]
    Missing,
    #[error("token longer than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("alg \"none\" is never accepted")]
    AlgNone,
    #[error("unsupported alg {0:?}")]
    UnsupportedAlg(String),
    #[error("header marks extensions critical that this server does not implement")]
    UnknownCritical,
    #[error("issuer {0:?} is not trusted")]
    WrongIssuer(String),
    #[error("no key for kid {0:?} from this issuer")]
    UnknownKey(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token has no exp claim")]
    MissingExp,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("audience does not include {AUDIENCE:?}")]
    WrongAudience,
    #[error("subject is not system:serviceaccount:NAMESPACE:NAME with Kubernetes names")]
    BadSubject,
    #[error("kubernetes.io namespace/serviceaccount claims do not match the subject")]
    ClaimsMismatch,
}

impl TokenError {
    /// A stable label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "missing",
            TokenError::TooLarge => "too_large",
            TokenError::Malformed(_) => "malformed",
            TokenError::AlgNone => "alg_none",
            TokenError::UnsupportedAlg(_) => "unsupported_alg",
            TokenError::UnknownCritical => "unknown_crit",
            TokenError::WrongIssuer(_) => "wrong_issuer",
            TokenError::UnknownKey(_) => "unknown_key",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::MissingExp => "missing_exp",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongAudience => "wrong_audience",
            TokenError::BadSubject => "bad_subject",
            TokenError::ClaimsMismatch => "claims_mismatch",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("JWKS is not valid JSON of the expected shape: {0}")]
    Jwks(String),
    #[error("JWKS key {index}: {reason}")]
    BadKey { index: usize, reason: String },
    #[error("signing key: {0}")]
    Signing(String),
    #[error(transparent)]
    Random(#[from] RandomError),
}

/// The header as read before anything is trusted: what classifies a refusal and picks a key.
#[derive(Debug, Clone, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    /// Never used; read so that a `typ` that is not a string is a malformed header.
    #[serde(default)]
    #[allow(dead_code)]
    typ: Option<String>,
    /// RFC 7515 4.1.11: extensions the recipient must understand or refuse the token. This
    /// server implements none, so any `crit` at all is a refusal (an empty list is invalid).
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KubeClaims {
    namespace: String,
    serviceaccount: KubeRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<KubeRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KubeRef {
    name: String,
    #[serde(default)]
    uid: String,
}

#[derive(Clone, Serialize, Deserialize)]
struct Claims {
    #[serde(default)]
    iss: String,
    #[serde(default)]
    sub: String,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    #[serde(rename = "kubernetes.io", default)]
    kube: Option<KubeClaims>,
}

/// Leaves out `jti`: a token's id is as good as the token for finding it in someone's logs.
impl std::fmt::Debug for Claims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claims")
            .field("iss", &self.iss)
            .field("sub", &self.sub)
            .field("aud", &self.aud)
            .field("exp", &self.exp)
            .field("iat", &self.iat)
            .field("nbf", &self.nbf)
            .field("kube", &self.kube)
            .finish_non_exhaustive()
    }
}

/// A trusted public key and the one algorithm it verifies.
#[derive(Clone)]
struct TrustedKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
struct JwksDoc {
    keys: Vec<serde_json::Value>,
}

/// The signing keys of a JWKS document: RSA keys verify RS256 and P-256 keys ES256; keys whose
/// `use` is not `sig` are skipped, any other key is an error.
fn parse_jwks(doc: JwksDoc) -> Result<Vec<TrustedKey>, KeyError> {
    let mut out = Vec::new();
    for (index, k) in doc.keys.into_iter().enumerate() {
        let bad = |reason: &str| KeyError::BadKey {
            index,
            reason: reason.to_string(),
        };
        let jwk: Jwk = serde_json::from_value(k).map_err(|e| bad(&e.to_string()))?;
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != PublicKeyUse::Signature)
        {
            continue;
        }
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(rsa) => {
                let n = B64
                    .decode(&rsa.n)
                    .map_err(|_| bad("RSA modulus is not base64url"))?;
                let bits = modulus_bits(&n);
                if bits < MIN_RSA_BITS {
                    return Err(bad(&format!(
                        "RSA key of {bits} bits; at least {MIN_RSA_BITS} are required"
                    )));
                }
                Algorithm::RS256
            }
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                let coordinate = |c: &str| B64.decode(c).map(|b| b.len());
                if coordinate(&ec.x) != Ok(32) || coordinate(&ec.y) != Ok(32) {
                    return Err(bad("P-256 coordinates must be 32 bytes of base64url"));
                }
                Algorithm::ES256
            }
            _ => return Err(bad("only RSA and EC P-256 keys are supported")),
        };
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| bad("key material is not base64url"))?;
        out.push(TrustedKey {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    Ok(out)
}

/// The bit length of a big-endian unsigned integer (leading zero bytes do not count).
fn modulus_bits(n: &[u8]) -> usize {
    match n.iter().position(|b| *b != 0) {
        Some(i) => (n.len() - i - 1) * 8 + (8 - n[i].leading_zeros() as usize),
        None => 0,
    }
}

/// Signature and key checks are `jsonwebtoken`'s; time, audience and subject are checked here.
fn signature_only(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v
}

/// Checks tokens from the trusted issuers.
#[derive(Debug, Clone)]
pub struct Verifier {
    issuers: BTreeMap<String, Vec<TrustedKey>>,
    clock: Arc<dyn Clock>,
}

impl Verifier {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Verifier {
            issuers: BTreeMap::new(),
            clock,
        }
    }

    /// Trusts `issuer` with the keys of a JWKS document (`/openid/v1/jwks` of a cluster).
    pub fn trust_jwks(&mut self, issuer: &str, jwks: &[u8]) -> Result<(), KeyError> {
        let doc: JwksDoc =
            serde_json::from_slice(jwks).map_err(|e| KeyError::Jwks(e.to_string()))?;
        let keys = parse_jwks(doc)?;
        self.issuers
            .entry(issuer.to_string())
            .or_default()
            .extend(keys);
        Ok(())
    }

    /// Trusts the tokens `s` mints, through the JWKS it publishes.
    pub fn trust_signer(&mut self, s: &Signer) -> Result<(), KeyError> {
        let doc = serde_json::from_value(s.jwks()).map_err(|e| KeyError::Jwks(e.to_string()))?;
        let keys = parse_jwks(doc)?;
        self.issuers
            .entry(s.issuer.clone())
            .or_default()
            .extend(keys);
        Ok(())
    }

    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        // Before any decoding, parsing or hashing: the cost of a refusal stays constant.
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected three dot-separated parts"));
        };
        // Read without trusting anything yet: what kind of refusal, and whose keys.
        let header: Header = B64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed("header"))?;
        if header.alg.eq_ignore_ascii_case("none") {
            return Err(TokenError::AlgNone);
        }
        if header.crit.is_some() {
            return Err(TokenError::UnknownCritical);
        }
        let alg = match header.alg.as_str() {
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            _ => return Err(TokenError::UnsupportedAlg(header.alg)),
        };
        let unverified: Claims = B64
            .decode(c)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed("claims"))?;
        if B64.decode(sig).is_err() {
            return Err(TokenError::Malformed("signature encoding"));
        }
        let keys = self
            .issuers
            .get(&unverified.iss)
            .ok_or_else(|| TokenError::WrongIssuer(unverified.iss.clone()))?;
        let candidates: Vec<&TrustedKey> = keys
            .iter()
            .filter(|k| k.alg == alg && (header.kid.is_none() || k.kid == header.kid))
            .collect();
        if candidates.is_empty() {
            return Err(TokenError::UnknownKey(header.kid.unwrap_or_default()));
        }
        let validation = signature_only(alg);
        let mut verified = None;
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &validation) {
                Ok(data) => {
                    verified = Some(data.claims);
                    break;
                }
                Err(e) if *e.kind() == JwtErrorKind::InvalidSignature => {}
                // The header passed the reading above, so it holds something jsonwebtoken's
                // stricter header refuses (a malformed `jwk` or `x5c`, say).
                Err(_) => return Err(TokenError::Malformed("header")),
            }
        }
        let claims = verified.ok_or(TokenError::BadSignature)?;
        let now = self.clock.now() / 1_000_000_000;
        match claims.exp {
            Some(exp) if now < exp.saturating_add(LEEWAY_SECS) => {}
            Some(_) => return Err(TokenError::Expired),
            // Not "expired": a token that never expires is an issuer misconfiguration the
            // operator needs to see named, not a clock problem.
            None => return Err(TokenError::MissingExp),
        }
        if claims
            .nbf
            .into_iter()
            .chain(claims.iat)
            .any(|t| t > now + LEEWAY_SECS)
        {
            return Err(TokenError::NotYetValid);
        }
        let aud_ok = match &claims.aud {
            Some(Audience::One(a)) => a == AUDIENCE,
            Some(Audience::Many(v)) => v.iter().any(|a| a == AUDIENCE),
            None => false,
        };
        if !aud_ok {
            return Err(TokenError::WrongAudience);
        }
        let (ns, sa) = parse_subject(&claims.sub)?;
        let kube = claims.kube.as_ref().ok_or(TokenError::ClaimsMismatch)?;
        if kube.namespace != ns || kube.serviceaccount.name != sa {
            return Err(TokenError::ClaimsMismatch);
        }
        Ok(Identity {
            namespace: ns.to_string(),
            service_account: sa.to_string(),
            issuer: claims.iss,
        })
    }
}

/// `system:serviceaccount:NAMESPACE:NAME` split in two, each a name Kubernetes could have
/// given (namespace a DNS-1123 label, account a DNS-1123 subdomain). A trusted issuer signing
/// anything else (control characters, '/', upper case) is refused here, so no such string
/// reaches an entry, a log line or a store key as an identity.
fn parse_subject(sub: &str) -> Result<(&str, &str), TokenError> {
    use vmesh_istio::validate::{is_dns1123_label, is_dns1123_subdomain};
    sub.strip_prefix(SA_PREFIX)
        .and_then(|r| r.split_once(':'))
        .filter(|(ns, sa)| is_dns1123_label(ns) && is_dns1123_subdomain(sa))
        .ok_or(TokenError::BadSubject)
}

/// The control plane's own token issuer (ES256).
pub struct Signer {
    /// The public half and its `kid`; the private key signs through `encoding`.
    key: EcdsaKeyPair,
    encoding: EncodingKey,
    kid: String,
    issuer: String,
    /// Token ids (`jti`).
    ids: Arc<dyn Entropy>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &self.kid)
            .field("issuer", &self.issuer)
            .finish()
    }
}

impl Signer {
    /// A new PKCS#8 P-256 key, DER.
    pub fn generate_pkcs8() -> Result<Vec<u8>, KeyError> {
        let rng = SystemRandom::new();
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|e| KeyError::Signing(e.to_string()))
    }

    pub fn from_pkcs8(der: &[u8], issuer: &str) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|e| KeyError::Signing(e.to_string()))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key().as_ref());
        let kid = B64.encode(&digest.as_ref()[..16]);
        Ok(Signer {
            key,
            encoding: EncodingKey::from_ec_der(der),
            kid,
            issuer: issuer.to_string(),
            ids: Arc::new(SystemEntropy::default()),
        })
    }

    /// The same signer drawing token ids from `ids` (tests use a failing source).
    pub fn with_id_source(mut self, ids: Arc<dyn Entropy>) -> Self {
        self.ids = ids;
        self
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// A token for `namespace/service_account`, valid from `now` for `ttl`, shaped like a
    /// projected Kubernetes service-account token.
    pub fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        now_nanos: u64,
        ttl: Duration,
    ) -> Result<String, KeyError> {
        let now = now_nanos / 1_000_000_000;
        let jti = random::bytes(&*self.ids, 16).map_err(KeyError::Random)?;
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: format!("{SA_PREFIX}{namespace}:{service_account}"),
            aud: Some(Audience::Many(vec![AUDIENCE.to_string()])),
            exp: Some(now + ttl.as_secs()),
            iat: Some(now),
            nbf: Some(now),
            jti: Some(B64.encode(jti)),
            kube: Some(KubeClaims {
                namespace: namespace.to_string(),
                serviceaccount: KubeRef {
                    name: service_account.to_string(),
                    uid: String::new(),
                },
                pod: None,
            }),
        };
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| KeyError::Signing(e.to_string()))
    }

    /// The public key as a JWKS document (what `/.well-known/jwks.json` serves).
    pub fn jwks(&self) -> serde_json::Value {
        let p = self.key.public_key().as_ref();
        let (x, y) = (
            p.get(1..33).unwrap_or_default(),
            p.get(33..65).unwrap_or_default(),
        );
        serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
            "kid": self.kid, "x": B64.encode(x), "y": B64.encode(y)}]})
    }
}

/// Compares secrets in time that does not depend on where they differ (`subtle`).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::tests::Failing;

    fn signer() -> Signer {
        Signer::from_pkcs8(&Signer::generate_pkcs8().unwrap(), "https://issuer.test").unwrap()
    }

    #[test]
    fn a_failing_random_source_refuses_to_mint_instead_of_a_zero_jti() {
        let s = signer().with_id_source(Arc::new(Failing));
        assert_eq!(
            s.mint(
                "ns",
                "sa",
                1_700_000_000_000_000_000,
                Duration::from_secs(60)
            ),
            Err(KeyError::Random(RandomError))
        );
    }

    #[test]
    fn modulus_bits_ignore_leading_zero_bytes() {
        assert_eq!(modulus_bits(&[]), 0);
        assert_eq!(modulus_bits(&[0, 0]), 0);
        assert_eq!(modulus_bits(&[1]), 1);
        assert_eq!(modulus_bits(&[0, 0x80, 0]), 16);
        assert_eq!(modulus_bits(&[0xff; 256]), 2048);
        assert_eq!(modulus_bits(&[0x7f; 256]), 2047);
    }

    #[test]
    fn claims_debug_leaves_out_the_jti() {
        let token = signer()
            .mint(
                "ns",
                "sa",
                1_700_000_000_000_000_000,
                Duration::from_secs(60),
            )
            .unwrap();
        let payload = token.split('.').nth(1).unwrap();
        let claims: Claims = serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap();
        let jti = claims.jti.clone().unwrap();
        assert!(jti.len() >= 20, "{jti}");
        let debug = format!("{claims:?} {claims:#?}");
        assert!(debug.contains("system:serviceaccount:ns:sa"), "{debug}");
        assert!(!debug.contains(&jti), "{debug}");
    }

    #[test]
    fn a_subject_whose_names_kubernetes_could_not_have_given_is_refused() {
        assert_eq!(
            parse_subject("system:serviceaccount:vm-ns:vm-sa.x"),
            Ok(("vm-ns", "vm-sa.x"))
        );
        for bad in [
            "system:serviceaccount:vm-ns\n2030 INFO forged:vm-sa",
            "system:serviceaccount:vm-ns:vm-sa\u{1b}[31m",
            "system:serviceaccount:vm-ns:vm\u{202e}sa",
            "system:serviceaccount:Vm-Ns:vm-sa",
            "system:serviceaccount:vm.ns:vm-sa",
            "system:serviceaccount:vm-ns:a/b",
            "system:serviceaccount:vm-ns:a:b",
            "system:serviceaccount::vm-sa",
            "system:serviceaccount:vm-ns:",
            "vm-ns:vm-sa",
        ] {
            assert_eq!(parse_subject(bad), Err(TokenError::BadSubject), "{bad:?}");
        }
    }
}
