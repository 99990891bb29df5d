//! When the VM's certificate must be renewed: pure decisions over what the shim holds, what it
//! wants and the time, so every rule is tested without files, clocks or a CA.
//!
//! Rules (Istio's agent keeps the same ones): renew at [`ROTATE_AT`] of the certificate's life
//! (half-life), at once when there is none, when it expired, when the token names another
//! identity, or when the trusted root no longer includes the root the certificate chains to.

use std::time::{Duration, SystemTime};

pub use vmesh_api::ca::ROTATE_AT;

/// What the shim knows of the certificate it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The certificate's URI SANs (the CA gives exactly one).
    pub uris: Vec<String>,
    /// DER of the chain's last element (the root it chains to).
    pub root_der: Vec<u8>,
}

/// Why a certificate is requested now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// None yet (first start, or the files were unreadable).
    Missing,
    /// Past the rotation point ([`ROTATE_AT`] of its life).
    HalfLife,
    /// Past `not_after`: peers refuse it.
    Expired,
    /// The token names another identity than the certificate.
    IdentityChanged,
    /// The mesh's trusted roots no longer include the certificate's root.
    RootChanged,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Missing => "no certificate yet",
            Reason::HalfLife => "half of its life passed",
            Reason::Expired => "it expired",
            Reason::IdentityChanged => "the token names another identity",
            Reason::RootChanged => "the mesh root changed",
        }
    }
}

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Renew(Reason),
    /// Nothing to do before this time (the rotation point).
    WaitUntil(SystemTime),
}

/// The rotation point: `not_before + ROTATE_AT * (not_after - not_before)`.
pub fn rotate_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO);
    not_before + life.mul_f64(ROTATE_AT)
}

/// What to do now. `roots` are the DER roots the mesh trusts now (the bundle's root file);
/// empty means "unknown", which never forces a renewal.
pub fn decide(now: SystemTime, held: Option<&Held>, want_uri: &str, roots: &[Vec<u8>]) -> Next {
    let Some(h) = held else {
        return Next::Renew(Reason::Missing);
    };
    if now >= h.not_after {
        return Next::Renew(Reason::Expired);
    }
    if h.uris.len() != 1 || h.uris.first().map(String::as_str) != Some(want_uri) {
        return Next::Renew(Reason::IdentityChanged);
    }
    if !roots.is_empty() && !roots.contains(&h.root_der) {
        return Next::Renew(Reason::RootChanged);
    }
    let at = rotate_at(h.not_before, h.not_after);
    if now >= at {
        Next::Renew(Reason::HalfLife)
    } else {
        Next::WaitUntil(at)
    }
}

/// The certificate's state as `vmesh-shim status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not obtained yet.
    Missing,
    Valid,
    /// Past its rotation point, not renewed yet (the CA is unreachable or refuses).
    Renewing,
    Expired,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Missing => "missing",
            State::Valid => "valid",
            State::Renewing => "renewing",
            State::Expired => "expired",
        }
    }
}

pub fn state(now: SystemTime, held: Option<&Held>) -> State {
    match held {
        None => State::Missing,
        Some(h) if now >= h.not_after => State::Expired,
        Some(h) if now >= rotate_at(h.not_before, h.not_after) => State::Renewing,
        Some(_) => State::Valid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URI: &str = "spiffe://cluster.local/ns/vm/sa/vm-sa";

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn held(from: u64, to: u64) -> Held {
        Held {
            not_before: at(from),
            not_after: at(to),
            uris: vec![URI.to_string()],
            root_der: vec![1, 2, 3],
        }
    }

    #[test]
    fn rotation_is_due_at_half_life() {
        let h = held(1000, 2000);
        let roots = [vec![1, 2, 3]];
        assert_eq!(
            decide(at(1200), Some(&h), URI, &roots),
            Next::WaitUntil(at(1500))
        );
        assert_eq!(
            decide(at(1500), Some(&h), URI, &roots),
            Next::Renew(Reason::HalfLife)
        );
        assert_eq!(
            decide(at(2000), Some(&h), URI, &roots),
            Next::Renew(Reason::Expired)
        );
    }

    #[test]
    fn no_certificate_is_requested_at_once() {
        assert_eq!(decide(at(5), None, URI, &[]), Next::Renew(Reason::Missing));
    }

    #[test]
    fn another_identity_or_extra_sans_force_a_renewal() {
        let h = held(1000, 2000);
        let other = "spiffe://cluster.local/ns/vm/sa/other";
        assert_eq!(
            decide(at(1100), Some(&h), other, &[]),
            Next::Renew(Reason::IdentityChanged)
        );
        let mut two = h.clone();
        two.uris.push(other.into());
        assert_eq!(
            decide(at(1100), Some(&two), URI, &[]),
            Next::Renew(Reason::IdentityChanged)
        );
    }

    #[test]
    fn a_root_the_mesh_no_longer_trusts_forces_a_renewal() {
        let h = held(1000, 2000);
        assert_eq!(
            decide(at(1100), Some(&h), URI, &[vec![9]]),
            Next::Renew(Reason::RootChanged)
        );
        // During a root rotation the bundle carries both roots: still trusted.
        assert_eq!(
            decide(at(1100), Some(&h), URI, &[vec![9], vec![1, 2, 3]]),
            Next::WaitUntil(at(1500))
        );
        // Unknown roots (the file is unreadable) do not force anything.
        assert_eq!(
            decide(at(1100), Some(&h), URI, &[]),
            Next::WaitUntil(at(1500))
        );
    }

    #[test]
    fn states_follow_the_life_of_the_certificate() {
        let h = held(1000, 2000);
        assert_eq!(state(at(1), None), State::Missing);
        assert_eq!(state(at(1499), Some(&h)), State::Valid);
        assert_eq!(state(at(1500), Some(&h)), State::Renewing);
        assert_eq!(state(at(2000), Some(&h)), State::Expired);
    }

    #[test]
    fn a_zero_length_life_rotates_at_its_start() {
        assert_eq!(rotate_at(at(10), at(10)), at(10));
        assert_eq!(rotate_at(at(10), at(5)), at(10));
    }
}
