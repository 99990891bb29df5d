//! Random bytes for secrets and identifiers: the admin credential, token `jti`s, object
//! `uid`s, replica names.
//!
//! Every draw returns a `Result`: when the operating system's random source fails, the caller
//! fails (a request answers 503, `serve` refuses to start) instead of carrying on with the
//! zeros an ignored error would leave in the buffer. The source is a trait so tests can make it
//! fail; [`SystemEntropy`] (ring's `SystemRandom`, i.e. `getrandom`) is the only real one.

use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the system's random source failed")]
pub struct RandomError;

/// A source of cryptographically secure random bytes.
pub trait Entropy: Send + Sync + std::fmt::Debug {
    /// Fills all of `buf`, or fails; a failure leaves no usable bytes.
    fn fill(&self, buf: &mut [u8]) -> Result<(), RandomError>;
}

/// The operating system's source.
#[derive(Debug, Clone)]
pub struct SystemEntropy(ring::rand::SystemRandom);

impl Default for SystemEntropy {
    fn default() -> Self {
        SystemEntropy(ring::rand::SystemRandom::new())
    }
}

impl Entropy for SystemEntropy {
    fn fill(&self, buf: &mut [u8]) -> Result<(), RandomError> {
        ring::rand::SecureRandom::fill(&self.0, buf).map_err(|_| RandomError)
    }
}

/// `n` random bytes.
pub fn bytes(e: &dyn Entropy, n: usize) -> Result<Vec<u8>, RandomError> {
    let mut b = vec![0u8; n];
    e.fill(&mut b)?;
    Ok(b)
}

/// `n` random bytes as lower-case hex (`2n` characters).
pub fn hex(e: &dyn Entropy, n: usize) -> Result<String, RandomError> {
    let b = bytes(e, n)?;
    let mut s = String::with_capacity(2 * n);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    Ok(s)
}

/// A random (version 4) UUID, as Kubernetes gives objects in `metadata.uid`.
pub fn uuid_v4(e: &dyn Entropy) -> Result<String, RandomError> {
    let mut b = [0u8; 16];
    e.fill(&mut b)?;
    Ok(uuid::Builder::from_random_bytes(b).into_uuid().to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A random source that always fails, as `getrandom` does when the kernel cannot serve it.
    #[derive(Debug)]
    pub(crate) struct Failing;

    impl Entropy for Failing {
        fn fill(&self, _: &mut [u8]) -> Result<(), RandomError> {
            Err(RandomError)
        }
    }

    #[test]
    fn a_failing_source_is_an_error_never_zeros() {
        assert_eq!(bytes(&Failing, 16), Err(RandomError));
        assert_eq!(hex(&Failing, 4), Err(RandomError));
        assert_eq!(uuid_v4(&Failing), Err(RandomError));
    }

    #[test]
    fn system_draws_have_the_expected_shape_and_differ() {
        let e = SystemEntropy::default();
        let a = hex(&e, 32).unwrap();
        assert_eq!(a.len(), 64);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, hex(&e, 32).unwrap());
        let u = uuid_v4(&e).unwrap();
        let parts: Vec<&str> = u.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{u}"
        );
        assert!(parts[2].starts_with('4'), "version 4: {u}");
        assert!(
            matches!(&parts[3][..1], "8" | "9" | "a" | "b"),
            "RFC 4122 variant: {u}"
        );
    }
}
