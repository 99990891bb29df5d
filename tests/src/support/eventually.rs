//! Waiting for a condition instead of sleeping a fixed time.

use std::time::{Duration, Instant};

/// How long conditions may take to become true. Overridable for slow machines.
pub fn patience() -> Duration {
    std::env::var("VMESH_TEST_PATIENCE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(15))
}

/// Polls `check` until it returns `Ok`, or panics with its last error after `patience()`.
pub fn eventually<T>(what: &str, check: impl FnMut() -> Result<T, String>) -> T {
    eventually_within(what, patience(), check)
}

/// [`eventually`] for conditions that take longer by design than the usual patience.
pub fn eventually_within<T>(
    what: &str,
    patience: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + patience;
    let mut pause = Duration::from_millis(10);
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("{what}: still failing after {patience:?}: {e}")
            }
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// `assert_eventually!(condition, "what")`: polls a boolean condition.
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr, $($what:tt)+) => {
        $crate::support::eventually::eventually(&format!($($what)+), || {
            if $cond { Ok(()) } else { Err("condition false".to_string()) }
        })
    };
}
