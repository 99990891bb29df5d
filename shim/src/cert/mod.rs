//! The VM's workload certificate: obtained from the control plane's CA with the VM's token,
//! kept where Envoy reads it through SDS, renewed before it expires.
//!
//! ```text
//! token ──claims──► spiffe://TD/ns/NS/sa/SA ──► key + CSR (pki) ──CreateCertificate──► CA
//!                                                               chain ◄──┘
//! chain checked (pki::accept_chain) ──► CertDir::install (one rename) ──► Envoy reloads SDS
//! ```
//!
//! [`policy`] decides when (half-life, expiry, another identity, another root), [`pki`]
//! builds and checks the certificates, [`dir`] lays out the files; [`Keeper`] is the loop
//! that does the I/O between them. Failures are retried with jittered exponential backoff
//! and reported on the status board (`vmesh-shim status`), in the log and in `/metrics`.

pub mod dir;
pub mod pki;
pub mod policy;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use vmesh_api::ca::{self, IstioCertificateRequest};

use crate::backoff::Backoff;
use crate::control::client::{CallError, ControlPlane};
use crate::status::Board;
use dir::{CertDir, DirError, Material};
use pki::{Chain, PkiError};
use policy::{Next, Reason};

/// How often the shim looks again at the token and the bundle's root while it waits for the
/// rotation point: a new root or identity is acted on within this time.
pub const RECHECK: Duration = Duration::from_secs(30);

/// Why getting a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("token: {0}")]
    Token(String),
    #[error("the CA: {0}")]
    Call(#[from] CallError),
    #[error("{0}")]
    Pki(#[from] PkiError),
    #[error("{0}")]
    Dir(#[from] DirError),
}

impl CertError {
    /// A refusal (the CA said no, or answered something unusable) rather than trouble
    /// reaching it.
    pub fn is_refusal(&self) -> bool {
        match self {
            CertError::Call(e) => !e.is_transient(),
            CertError::Token(_) | CertError::Pki(_) => true,
            CertError::Dir(_) => false,
        }
    }
}

/// What the keeper shows on the status board.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    pub dir: String,
    pub spiffe_id: Option<String>,
    pub serial: Option<String>,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
    /// Certificates installed since the shim started.
    pub issued: u64,
    /// Failed attempts since the shim started.
    pub failures: u64,
    pub last_error: Option<(String, SystemTime)>,
}

/// Keeps the VM's certificate.
#[derive(Debug)]
pub struct Keeper {
    pub cp: Arc<ControlPlane>,
    pub dir: CertDir,
    /// The TTL asked for (the CA may give less).
    pub ttl: Duration,
    pub trust_domain: String,
    /// The bundle's root file: the roots the mesh trusts now (re-read on every check).
    pub root_path: PathBuf,
    pub board: Arc<Board>,
}

impl Keeper {
    /// The identity the token names now.
    fn wanted(&self) -> Result<String, CertError> {
        let (token, _) = self
            .cp
            .token()
            .get()
            .map_err(|e| CertError::Token(e.to_string()))?;
        let claims =
            crate::bundle::parse_token(&token).map_err(|e| CertError::Token(e.to_string()))?;
        match (claims.namespace, claims.service_account) {
            (Some(ns), Some(sa)) => Ok(ca::spiffe_id(&self.trust_domain, &ns, &sa)),
            _ => Err(CertError::Token(
                "it names no namespace and service account".into(),
            )),
        }
    }

    fn roots(&self) -> (Vec<u8>, Vec<Vec<u8>>) {
        let pem = std::fs::read(&self.root_path).unwrap_or_default();
        let ders = pki::pem_certs(&pem);
        (pem, ders)
    }

    /// The certificate already in the directory (a restart), if it reads back.
    fn held(&self) -> Option<Chain> {
        let m = self.dir.load()?;
        match pki::read_chain(m.chain.as_bytes(), m.root.as_bytes()) {
            Ok(c) => Some(c),
            Err(error) => {
                tracing::warn!(%error, dir = %self.dir.path().display(),
                    "the certificate in place does not read back; requesting a new one");
                None
            }
        }
    }

    async fn renew(&self, want: &str, fallback_root: &[u8]) -> Result<Chain, CertError> {
        let (key, csr) = pki::key_and_csr(want)?;
        let req = IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(ca::DEFAULT_TTL_SECS),
            metadata: None,
        };
        let resp = self.cp.create_certificate(&req).await?;
        let chain = pki::accept_chain(&resp.cert_chain, &key, want, fallback_root)?;
        self.dir.install(&Material {
            key,
            chain: chain.chain_pem.clone(),
            root: chain.root_pem.clone(),
        })?;
        Ok(chain)
    }

    fn show(&self, f: impl FnOnce(&mut Facts)) {
        self.board.certificate(|facts| {
            facts.dir = self.dir.path().display().to_string();
            f(facts);
        });
    }

    fn show_chain(&self, c: &Chain) {
        self.show(|f| {
            f.spiffe_id = c.leaf.uris.first().cloned();
            f.serial = Some(c.leaf.serial.clone());
            f.not_before = Some(c.leaf.not_before);
            f.not_after = Some(c.leaf.not_after);
        });
    }

    /// Runs until `stop` flips.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut held = self.held();
        self.show(|_| {});
        if let Some(c) = &held {
            self.show_chain(c);
            tracing::info!(serial = %c.leaf.serial, spiffe_id = ?c.leaf.uris,
                "certificate in place from before");
        }
        let mut backoff = Backoff::default();
        loop {
            let (root_pem, roots) = self.roots();
            let outcome = match self.wanted() {
                Err(e) => Err(e),
                Ok(want) => {
                    let now = SystemTime::now();
                    match policy::decide(
                        now,
                        held.as_ref().map(Chain::held).as_ref(),
                        &want,
                        &roots,
                    ) {
                        Next::WaitUntil(t) => {
                            let wait = t.duration_since(now).unwrap_or(Duration::ZERO).min(RECHECK);
                            if sleep_or_stop(wait, &mut stop).await {
                                return;
                            }
                            continue;
                        }
                        Next::Renew(reason) => self
                            .renew_logged(&want, reason, &root_pem)
                            .await
                            .map(|mut c| {
                                // CAs backdate notBefore (vmesh's by minutes) for peers
                                // with slow clocks; the life the shim splits in half starts
                                // when it got the certificate, or a short-lived one would
                                // be due again at once.
                                c.leaf.not_before = c.leaf.not_before.max(now);
                                c
                            }),
                    }
                }
            };
            match outcome {
                Ok(c) => {
                    backoff.reset();
                    self.show_chain(&c);
                    self.show(|f| f.issued += 1);
                    held = Some(c);
                }
                Err(e) => {
                    let state =
                        policy::state(SystemTime::now(), held.as_ref().map(Chain::held).as_ref());
                    let kind = if e.is_refusal() { "refused" } else { "failed" };
                    let message = format!("certificate request {kind}: {e}");
                    tracing::error!(certificate = state.as_str(), error = %e, "{message}");
                    self.show(|f| {
                        f.failures += 1;
                        f.last_error = Some((message.clone(), SystemTime::now()));
                    });
                    if sleep_or_stop(backoff.next_delay(), &mut stop).await {
                        return;
                    }
                }
            }
        }
    }

    async fn renew_logged(
        &self,
        want: &str,
        reason: Reason,
        root_pem: &[u8],
    ) -> Result<Chain, CertError> {
        tracing::info!(spiffe_id = %want, reason = reason.as_str(), "requesting a certificate");
        let c = self.renew(want, root_pem).await?;
        tracing::info!(
            serial = %c.leaf.serial,
            spiffe_id = %want,
            not_after = %vmesh_api::time::format_rfc3339_secs(nanos(c.leaf.not_after)),
            "certificate installed"
        );
        Ok(c)
    }
}

pub fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Sleeps `d`; true when `stop` flipped first.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        _ = stop.changed() => true,
    }
}
