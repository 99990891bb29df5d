//! VM identity: bearer JWTs shaped like Kubernetes service-account tokens.
//!
//! The control plane mints ES256 tokens with its own key ([`Signer`]); tokens from other
//! issuers (a real cluster's `kubectl create token SA --audience istio-ca`, RS256) are checked
//! against that issuer's JWKS file. Every refusal has its own [`TokenError`] variant and
//! `reason()` string, which the server logs and counts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::random::{self, Entropy, RandomError, SystemEntropy};

pub const AUDIENCE: &str = "istio-ca";
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 30;
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
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("alg \"none\" is never accepted")]
    AlgNone,
    #[error("unsupported alg {0:?}")]
    UnsupportedAlg(String),
    #[error("issuer {0:?} is not trusted")]
    WrongIssuer(String),
    #[error("no key for kid {0:?} from this issuer")]
    UnknownKey(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("audience does not include {AUDIENCE:?}")]
    WrongAudience,
    #[error("subject is not system:serviceaccount:NAMESPACE:NAME")]
    BadSubject,
    #[error("kubernetes.io namespace/serviceaccount claims do not match the subject")]
    ClaimsMismatch,
}

impl TokenError {
    /// A stable label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "missing",
            TokenError::Malformed(_) => "malformed",
            TokenError::AlgNone => "alg_none",
            TokenError::UnsupportedAlg(_) => "unsupported_alg",
            TokenError::WrongIssuer(_) => "wrong_issuer",
            TokenError::UnknownKey(_) => "unknown_key",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
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
    BadKey { index: usize, reason: &'static str },
    #[error("signing key: {0}")]
    Signing(String),
    #[error(transparent)]
    Random(#[from] RandomError),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
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

#[derive(Debug, Clone)]
enum PublicKey {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed SEC1 point (0x04 || x || y) on P-256.
    P256(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Jwk {
    kid: Option<String>,
    key: PublicKey,
}

#[derive(Debug, Deserialize)]
struct JwksDoc {
    keys: Vec<serde_json::Map<String, serde_json::Value>>,
}

fn parse_jwks(json: &[u8]) -> Result<Vec<Jwk>, KeyError> {
    let doc: JwksDoc = serde_json::from_slice(json).map_err(|e| KeyError::Jwks(e.to_string()))?;
    let mut out = Vec::new();
    for (index, k) in doc.keys.iter().enumerate() {
        let s = |f: &str| k.get(f).and_then(|v| v.as_str());
        let b = |f: &'static str| -> Result<Vec<u8>, KeyError> {
            let v = s(f).ok_or(KeyError::BadKey {
                index,
                reason: "missing key material",
            })?;
            B64.decode(v).map_err(|_| KeyError::BadKey {
                index,
                reason: "key material is not base64url",
            })
        };
        if s("use").is_some_and(|u| u != "sig") {
            continue;
        }
        let key = match s("kty") {
            Some("RSA") => PublicKey::Rsa {
                n: b("n")?,
                e: b("e")?,
            },
            Some("EC") if s("crv") == Some("P-256") => {
                let (x, y) = (b("x")?, b("y")?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(KeyError::BadKey {
                        index,
                        reason: "P-256 coordinates must be 32 bytes",
                    });
                }
                let mut p = vec![4u8];
                p.extend_from_slice(&x);
                p.extend_from_slice(&y);
                PublicKey::P256(p)
            }
            _ => {
                return Err(KeyError::BadKey {
                    index,
                    reason: "only RSA and EC P-256 keys are supported",
                })
            }
        };
        out.push(Jwk {
            kid: s("kid").map(str::to_string),
            key,
        });
    }
    Ok(out)
}

/// Checks tokens from the trusted issuers.
#[derive(Debug, Clone)]
pub struct Verifier {
    issuers: BTreeMap<String, Vec<Jwk>>,
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
        let keys = parse_jwks(jwks)?;
        self.issuers
            .entry(issuer.to_string())
            .or_default()
            .extend(keys);
        Ok(())
    }

    pub fn trust_signer(&mut self, s: &Signer) {
        self.issuers.entry(s.issuer.clone()).or_default().push(Jwk {
            kid: Some(s.kid.clone()),
            key: PublicKey::P256(s.key.public_key().as_ref().to_vec()),
        });
    }

    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected three dot-separated parts"));
        };
        let header: Header = B64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed("header"))?;
        if header.alg.eq_ignore_ascii_case("none") {
            return Err(TokenError::AlgNone);
        }
        if header.alg != "RS256" && header.alg != "ES256" {
            return Err(TokenError::UnsupportedAlg(header.alg));
        }
        let claims: Claims = B64
            .decode(c)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed("claims"))?;
        let sig = B64
            .decode(sig)
            .map_err(|_| TokenError::Malformed("signature encoding"))?;
        let keys = self
            .issuers
            .get(&claims.iss)
            .ok_or_else(|| TokenError::WrongIssuer(claims.iss.clone()))?;
        let signed = &token.as_bytes()[..h.len() + 1 + c.len()];
        let fits = |k: &&Jwk| {
            let alg_ok = matches!(
                (&k.key, header.alg.as_str()),
                (PublicKey::Rsa { .. }, "RS256") | (PublicKey::P256(_), "ES256")
            );
            alg_ok && (header.kid.is_none() || k.kid == header.kid)
        };
        let candidates: Vec<&Jwk> = keys.iter().filter(fits).collect();
        if candidates.is_empty() {
            return Err(TokenError::UnknownKey(header.kid.unwrap_or_default()));
        }
        let ok = candidates.iter().any(|k| match &k.key {
            PublicKey::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, &sig)
                .is_ok(),
            PublicKey::P256(p) => UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, p)
                .verify(signed, &sig)
                .is_ok(),
        });
        if !ok {
            return Err(TokenError::BadSignature);
        }
        let now = self.clock.now() / 1_000_000_000;
        match claims.exp {
            Some(exp) if now < exp.saturating_add(LEEWAY_SECS) => {}
            _ => return Err(TokenError::Expired),
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
        let (ns, sa) = claims
            .sub
            .strip_prefix(SA_PREFIX)
            .and_then(|r| r.split_once(':'))
            .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
            .ok_or(TokenError::BadSubject)?;
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

/// The control plane's own token issuer (ES256).
pub struct Signer {
    key: EcdsaKeyPair,
    kid: String,
    issuer: String,
    /// ECDSA nonces (ring takes only its own source for those).
    rng: SystemRandom,
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
            kid,
            issuer: issuer.to_string(),
            rng,
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
        let header = Header {
            alg: "ES256".into(),
            kid: Some(self.kid.clone()),
            typ: Some("JWT".into()),
        };
        let signing_input = format!("{}.{}", b64_json(&header), b64_json(&claims));
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|e| KeyError::Signing(e.to_string()))?;
        Ok(format!("{signing_input}.{}", B64.encode(sig.as_ref())))
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

fn b64_json<T: Serialize>(v: &T) -> String {
    B64.encode(serde_json::to_vec(v).unwrap_or_default())
}

/// Compares secrets without leaking where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
}
