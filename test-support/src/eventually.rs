//! Waiting for a condition instead of sleeping a fixed time: synchronous ([`eventually`],
//! [`assert_eventually!`](crate::assert_eventually)) for tests that drive processes, and
//! asynchronous ([`assert_eventually_async`], [`within_patience`]) for tests on a Tokio runtime.

use std::future::Future;
use std::time::{Duration, Instant};

/// How long conditions may take to become true: 15 s, or `VMESH_TEST_PATIENCE_MS` on slow
/// machines.
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
    check: impl FnMut() -> Result<T, String>,
) -> T {
    try_eventually_within(what, patience, check).unwrap_or_else(|e| panic!("{e}"))
}

/// [`eventually_within`] that returns the failure instead of panicking, for callers that
/// must clean up and report (the demo).
pub fn try_eventually_within<T>(
    what: &str,
    patience: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + patience;
    let mut pause = Duration::from_millis(10);
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("{what}: still failing after {patience:?}: {e}"))
            }
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    }
}

/// `assert_eventually!(condition, "what", args...)`: polls a boolean condition (blocking).
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr, $($what:tt)+) => {
        $crate::eventually::eventually(&format!($($what)+), || {
            if $cond { Ok(()) } else { Err("condition false".to_string()) }
        })
    };
}

/// Polls the async `check` every 20 ms until it is true, failing the test after [`patience`].
pub async fn assert_eventually_async(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + patience();
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not true within {:?}: {what}",
            patience()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Awaits `fut`, failing the test after [`patience`].
pub async fn within_patience<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(patience(), fut).await {
        Ok(v) => v,
        Err(_) => panic!("not done within {:?}: {what}", patience()),
    }
}
