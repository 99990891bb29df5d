//! Per-identity quotas on registration: a token bucket on the rate of `register` calls, and a
//! cap on the auto-registered entries one identity (namespace + service account) holds.
//!
//! One token could otherwise register without limit, and every entry costs memory in every
//! replica's cache, a key in the store and a line in its namespace's name table. The cap is
//! counted from the cache (the store's truth, shared by all replicas); the buckets are this
//! replica's own memory, so with N replicas an identity may register up to N times the rate.
//!
//! Times are the caller's clock in nanoseconds since the epoch: nothing here reads one, so the
//! bucket arithmetic is tested with plain numbers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

const NANOS_PER_SEC: f64 = 1e9;

/// Identities tracked at once, at most. A bucket that has refilled is dropped (it is the same
/// as no bucket), so this is only reached by this many identities registering within one
/// burst's refill time: then a new identity is refused for a second rather than the memory
/// growing.
pub const MAX_TRACKED_IDENTITIES: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuotaSettings {
    /// Auto-registered entries one identity may hold; 0: no cap.
    pub max_entries_per_identity: usize,
    /// Registrations per second one identity may make, sustained; 0: no limit.
    pub registration_rate: f64,
    /// Registrations one identity may make at once (the bucket's size).
    pub registration_burst: u32,
}

impl Default for QuotaSettings {
    /// A VM registers once per boot and then only heartbeats, so 10 a second per identity is
    /// 36,000 boots an hour for one service account, and a burst of 50 lets a scaled-out group
    /// boot together without waiting. 1,000 entries per identity is far more VMs than one
    /// service account usually runs, and with Kubernetes' bounds on what a VM sends (64
    /// labels, names of at most 253 bytes) keeps one token's share of memory to tens of MB.
    fn default() -> Self {
        QuotaSettings {
            max_entries_per_identity: 1_000,
            registration_rate: 10.0,
            registration_burst: 50,
        }
    }
}

/// Why a registration was refused (`vmesh_quota_refusals_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaRefusal {
    /// Over the registration rate.
    Rate,
    /// At the cap on entries.
    Entries,
    /// [`MAX_TRACKED_IDENTITIES`] identities are registering right now.
    Identities,
}

impl QuotaRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            QuotaRefusal::Rate => "rate",
            QuotaRefusal::Entries => "entries",
            QuotaRefusal::Identities => "identities",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: u64,
}

/// Token buckets on the registration rate, one per identity.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<(String, String), Bucket>>,
}

impl RateLimiter {
    pub fn new(settings: &QuotaSettings) -> Self {
        RateLimiter {
            rate: settings.registration_rate,
            burst: f64::from(settings.registration_burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, b: Bucket, now: u64) -> f64 {
        let elapsed = now.saturating_sub(b.at) as f64 / NANOS_PER_SEC;
        (b.tokens + elapsed * self.rate).min(self.burst)
    }

    /// Takes one registration from `namespace/service_account`'s bucket at `now`; when it is
    /// empty, `Err` with how long until it holds one again (at least a second: Retry-After
    /// counts whole seconds).
    pub fn take(
        &self,
        namespace: &str,
        service_account: &str,
        now: u64,
    ) -> Result<(), (QuotaRefusal, Duration)> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let key = (namespace.to_string(), service_account.to_string());
        if !buckets.contains_key(&key) && buckets.len() >= MAX_TRACKED_IDENTITIES {
            buckets.retain(|_, b| self.refilled(*b, now) < self.burst);
            if buckets.len() >= MAX_TRACKED_IDENTITIES {
                return Err((QuotaRefusal::Identities, Duration::from_secs(1)));
            }
        }
        let b = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = self.refilled(*b, now);
        if tokens >= 1.0 {
            *b = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            return Ok(());
        }
        let wait = (1.0 - tokens) / self.rate;
        Err((
            QuotaRefusal::Rate,
            Duration::from_secs_f64(wait.ceil().max(1.0)),
        ))
    }

    /// Drops the buckets that have refilled (the same as having none): what is tracked is
    /// only the identities that registered within the last burst's refill time.
    pub fn prune(&self, now: u64) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets.retain(|_, b| self.refilled(*b, now) < self.burst);
    }

    /// Identities tracked now (tests, metrics).
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000_000_000;
    const SEC: u64 = 1_000_000_000;

    fn limiter(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter::new(&QuotaSettings {
            registration_rate: rate,
            registration_burst: burst,
            ..QuotaSettings::default()
        })
    }

    #[test]
    fn a_burst_goes_through_then_the_rate_holds_with_a_retry_after() {
        let l = limiter(2.0, 3);
        for _ in 0..3 {
            assert_eq!(l.take("ns", "sa", T0), Ok(()));
        }
        assert_eq!(
            l.take("ns", "sa", T0),
            Err((QuotaRefusal::Rate, Duration::from_secs(1)))
        );
        // Half a second at 2/s is one registration.
        assert_eq!(l.take("ns", "sa", T0 + SEC / 2), Ok(()));
        assert!(l.take("ns", "sa", T0 + SEC / 2).is_err());
    }

    #[test]
    fn retry_after_is_the_whole_seconds_until_a_token_is_back() {
        let l = limiter(0.1, 1);
        assert_eq!(l.take("ns", "sa", T0), Ok(()));
        assert_eq!(
            l.take("ns", "sa", T0),
            Err((QuotaRefusal::Rate, Duration::from_secs(10)))
        );
        assert_eq!(
            l.take("ns", "sa", T0 + 7 * SEC + 1),
            Err((QuotaRefusal::Rate, Duration::from_secs(3)))
        );
        assert_eq!(l.take("ns", "sa", T0 + 10 * SEC), Ok(()));
    }

    #[test]
    fn one_identity_throttled_leaves_another_alone() {
        let l = limiter(1.0, 1);
        assert_eq!(l.take("ns", "noisy", T0), Ok(()));
        assert!(l.take("ns", "noisy", T0).is_err());
        assert_eq!(l.take("ns", "quiet", T0), Ok(()));
        assert_eq!(l.take("other", "noisy", T0), Ok(()));
    }

    #[test]
    fn refilled_buckets_are_forgotten_so_state_stays_bounded() {
        let l = limiter(10.0, 5);
        for i in 0..100 {
            l.take("ns", &format!("sa{i}"), T0).unwrap();
        }
        assert_eq!(l.tracked(), 100);
        l.prune(T0 + SEC / 20);
        assert_eq!(l.tracked(), 100, "not refilled yet");
        l.prune(T0 + SEC);
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn a_rate_of_zero_means_no_limit() {
        let l = limiter(0.0, 1);
        for _ in 0..1000 {
            assert_eq!(l.take("ns", "sa", T0), Ok(()));
        }
        assert_eq!(l.tracked(), 0);
    }
}
