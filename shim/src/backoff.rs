//! Jittered exponential backoff for calls to the control plane (`docs/protocol.md`: 0.5 s
//! doubling to 30 s, with jitter), so a thousand VMs that lost their control plane together
//! do not come back in lockstep.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            failures: 0,
        }
    }

    /// The wait before the next attempt: the exponential step, then a uniformly random
    /// amount between half of it and all of it ("equal jitter").
    pub fn next_delay(&mut self) -> Duration {
        let step = self
            .first
            .saturating_mul(1u32 << self.failures.min(16))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = step / 2;
        half + half.mul_f64(random_unit())
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// A random number in [0, 1); 0.5 if the system cannot give one (jitter is a nicety, not a
/// secret).
fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    match getrandom::fill(&mut b) {
        Ok(()) => (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut steps = Vec::new();
        for _ in 0..10 {
            steps.push(b.next_delay());
        }
        let bounds = [
            500u64, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000,
        ];
        for (d, hi) in steps.iter().zip(bounds) {
            let d = d.as_millis() as u64;
            assert!(d >= hi / 2 && d <= hi, "{d} not in [{}, {hi}]", hi / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(500));
    }
}
