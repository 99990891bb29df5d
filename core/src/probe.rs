//! The probe the shim hands the filter's agent (a WorkloadGroup readiness probe, every default
//! already applied), run by Kubernetes' rules: when to probe, what an answer means, and the
//! verdict after the success and failure thresholds.
//!
//! No I/O: the filter sends the request through Envoy when [`Prober::start`] says so, turns
//! what came back into an [`Outcome`] with [`http_outcome`], hands it to [`Prober::finish`],
//! and reports [`Prober::result`]. Times are milliseconds on the host's clock.

use vmesh_api::agent::{ProbeResult, ProbeTask};

/// Kubernetes' defaults, used when a task carries 0: the shim fills every field in, so this
/// only keeps a bad task from probing in a hot loop or without a deadline (Envoy reads a
/// callout timeout of 0 as none).
const DEFAULT_PERIOD_MS: u64 = 10_000;
const DEFAULT_TIMEOUT_MS: u64 = 1_000;

/// One probe's result, before the thresholds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub success: bool,
    /// For people: `HTTP 200`, `HTTP 503`, `connection refused`, `timeout after 1s`.
    pub message: String,
}

impl Outcome {
    pub fn success(message: impl Into<String>) -> Self {
        Outcome {
            success: true,
            message: message.into(),
        }
    }

    pub fn failure(message: impl Into<String>) -> Self {
        Outcome {
            success: false,
            message: message.into(),
        }
    }
}

/// One probe task's schedule and verdict. A new task (another id) is a new `Prober`: nothing
/// carries over.
#[derive(Debug, Clone)]
pub struct Prober {
    task: ProbeTask,
    /// When the next probe may start.
    next_at: u64,
    in_flight: bool,
    healthy: bool,
    /// How many outcomes in a row were like the last one.
    run: u32,
    last: Option<Outcome>,
}

impl Prober {
    /// Starts the task's clock: the first probe is due `initial_delay_ms` after `now`. The
    /// verdict is unhealthy until enough successes count.
    pub fn new(task: ProbeTask, now: u64) -> Self {
        let mut task = task;
        if task.period_ms == 0 {
            task.period_ms = DEFAULT_PERIOD_MS;
        }
        if task.timeout_ms == 0 {
            task.timeout_ms = DEFAULT_TIMEOUT_MS;
        }
        task.success_threshold = task.success_threshold.max(1);
        task.failure_threshold = task.failure_threshold.max(1);
        Prober {
            next_at: now.saturating_add(task.initial_delay_ms),
            task,
            in_flight: false,
            healthy: false,
            run: 0,
            last: None,
        }
    }

    /// The task, with zero period, timeout and thresholds replaced by their defaults.
    pub fn task(&self) -> &ProbeTask {
        &self.task
    }

    /// Whether a probe starts now. If so it counts as in flight until [`Prober::finish`], and
    /// the next one is due a period after this one started (or when this one ends, if later:
    /// probes never overlap).
    pub fn start(&mut self, now: u64) -> bool {
        if self.in_flight || now < self.next_at {
            return false;
        }
        self.in_flight = true;
        self.next_at = now.saturating_add(self.task.period_ms);
        true
    }

    pub fn is_in_flight(&self) -> bool {
        self.in_flight
    }

    /// When the next probe is due (it starts on the first [`Prober::start`] at or after it).
    pub fn next_at(&self) -> u64 {
        self.next_at
    }

    /// Takes the outcome of the probe in flight. `successThreshold` successes in a row make an
    /// unhealthy verdict healthy; `failureThreshold` failures in a row make a healthy one
    /// unhealthy.
    pub fn finish(&mut self, outcome: Outcome) {
        self.in_flight = false;
        let same = self
            .last
            .as_ref()
            .is_some_and(|l| l.success == outcome.success);
        self.run = if same { self.run.saturating_add(1) } else { 1 };
        if outcome.success && !self.healthy && self.run >= self.task.success_threshold {
            self.healthy = true;
        } else if !outcome.success && self.healthy && self.run >= self.task.failure_threshold {
            self.healthy = false;
        }
        self.last = Some(outcome);
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy
    }

    /// The verdict, with the last outcome's message; when the thresholds hold the verdict
    /// against the last outcome, the message says how far along the run is.
    pub fn result(&self) -> ProbeResult {
        let message = match &self.last {
            None => "waiting for the first probe".to_string(),
            Some(last) if last.success == self.healthy => last.message.clone(),
            Some(last) if last.success => format!(
                "{} ({} of {} successes needed)",
                last.message, self.run, self.task.success_threshold
            ),
            Some(last) => format!(
                "{} ({} of {} failures before unhealthy)",
                last.message, self.run, self.task.failure_threshold
            ),
        };
        ProbeResult {
            id: self.task.id,
            healthy: self.healthy,
            message,
        }
    }
}

/// What an Envoy reply body starts with when the router could not connect upstream.
const CONNECT_ERROR: &str = "upstream connect error or disconnect/reset before headers.";
/// Envoy's reply body when the request's deadline passed.
const TIMEOUT: &str = "upstream request timeout";
/// Envoy's reply body when the load balancer found no host (an ORIGINAL_DST cluster given no
/// usable address).
const NO_HOST: &str = "no healthy upstream";

/// What an httpGet probe's answer means (Kubernetes' rule: 200-399 is a success). `status` is
/// `None` when Envoy failed the call without a response. Envoy answers a callout it could not
/// complete with its own 503/504 and a fixed text; those are told apart from the
/// application's answers by that text and reported as what happened.
pub fn http_outcome(status: Option<u16>, body: &[u8], timeout_ms: u64) -> Outcome {
    // Bytes, not `str` searches: this runs inside the filter, whose size is budgeted.
    let text = body.trim_ascii();
    match status {
        Some(s @ 200..=399) => Outcome::success(format!("HTTP {s}")),
        Some(503) if text.starts_with(CONNECT_ERROR.as_bytes()) => {
            Outcome::failure(connect_error(text))
        }
        Some(503) if text == NO_HOST.as_bytes() => {
            Outcome::failure("no healthy upstream (bad probe address?)")
        }
        Some(504) if text == TIMEOUT.as_bytes() => {
            Outcome::failure(format!("timeout after {}", duration(timeout_ms)))
        }
        Some(s) => Outcome::failure(format!("HTTP {s}")),
        None => Outcome::failure("no response (Envoy reset the call)"),
    }
}

/// The connect failure in words, from the reason Envoy gives after `reset reason: `. Envoy
/// 1.40 tells a callout only `remote connection failure` when the connect failed (refused or
/// no route): the transport's own reason (`Connection refused`) is not in a callout's reply.
fn connect_error(text: &[u8]) -> String {
    const REASON: &[u8] = b"reset reason: ";
    let reason = find(text, REASON)
        .and_then(|at| text.get(at + REASON.len()..))
        .unwrap_or_default();
    if find(text, b"Connection refused").is_some() {
        return "connection refused".into();
    }
    if reason.starts_with(b"remote connection failure") {
        return "connection refused or unreachable".into();
    }
    if reason.starts_with(b"connection timeout") {
        return "connect timeout".into();
    }
    format!(
        "upstream connect error ({})",
        String::from_utf8_lossy(reason.get(..reason.len().min(200)).unwrap_or(reason))
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `1s`, `1.5s`, `250ms`.
pub fn duration(ms: u64) -> String {
    match (ms / 1000, ms % 1000) {
        (0, ms) => format!("{ms}ms"),
        (s, 0) => format!("{s}s"),
        (s, frac) => {
            let frac = format!("{frac:03}");
            format!("{s}.{}s", frac.trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmesh_api::agent::ProbeKind;

    fn task(success: u32, failure: u32) -> ProbeTask {
        ProbeTask {
            id: 7,
            kind: ProbeKind::HttpGet,
            host: "127.0.0.1".into(),
            port: 8080,
            path: "/ready".into(),
            headers: vec![],
            initial_delay_ms: 5_000,
            period_ms: 1_000,
            timeout_ms: 500,
            success_threshold: success,
            failure_threshold: failure,
        }
    }

    fn ok() -> Outcome {
        Outcome::success("HTTP 200")
    }

    fn bad() -> Outcome {
        Outcome::failure("HTTP 503")
    }

    /// Runs one probe at `now` with `outcome`; panics if none was due.
    fn probe(p: &mut Prober, now: u64, outcome: Outcome) {
        assert!(p.start(now), "no probe due at {now}");
        p.finish(outcome);
    }

    #[test]
    fn the_first_probe_waits_for_the_initial_delay_then_one_per_period() {
        let mut p = Prober::new(task(1, 3), 100_000);
        assert!(!p.start(100_000));
        assert!(!p.start(104_999));
        assert!(p.start(105_000));
        assert!(p.is_in_flight());
        // Never two at once, even when the period passed.
        assert!(!p.start(107_000));
        p.finish(ok());
        // The period runs from the start of the last probe.
        assert!(p.start(107_000));
        p.finish(ok());
        assert_eq!(p.next_at(), 108_000);
        assert!(!p.start(107_999));
        assert!(p.start(108_000));
    }

    #[test]
    fn unhealthy_until_success_threshold_successes_in_a_row() {
        let mut p = Prober::new(task(2, 3), 0);
        let r = p.result();
        assert_eq!((r.id, r.healthy), (7, false));
        assert_eq!(r.message, "waiting for the first probe");
        probe(&mut p, 5_000, ok());
        assert!(!p.is_healthy());
        assert_eq!(p.result().message, "HTTP 200 (1 of 2 successes needed)");
        probe(&mut p, 6_000, bad());
        probe(&mut p, 7_000, ok());
        assert!(!p.is_healthy(), "a failure restarts the run");
        probe(&mut p, 8_000, ok());
        assert!(p.is_healthy());
        assert_eq!(p.result().message, "HTTP 200");
    }

    #[test]
    fn healthy_until_failure_threshold_failures_in_a_row() {
        let mut p = Prober::new(task(1, 3), 0);
        probe(&mut p, 5_000, ok());
        assert!(p.is_healthy(), "the first success counts");
        probe(&mut p, 6_000, bad());
        probe(&mut p, 7_000, bad());
        let r = p.result();
        assert!(r.healthy);
        assert_eq!(r.message, "HTTP 503 (2 of 3 failures before unhealthy)");
        probe(&mut p, 8_000, ok());
        probe(&mut p, 9_000, bad());
        probe(&mut p, 10_000, bad());
        assert!(p.is_healthy(), "a success restarts the run");
        probe(&mut p, 11_000, bad());
        let r = p.result();
        assert_eq!((r.healthy, r.message.as_str()), (false, "HTTP 503"));
    }

    #[test]
    fn failures_before_the_first_success_keep_it_unhealthy() {
        let mut p = Prober::new(task(1, 1), 0);
        probe(&mut p, 5_000, bad());
        assert_eq!(p.result().message, "HTTP 503");
        assert!(!p.result().healthy);
        probe(&mut p, 6_000, ok());
        assert!(p.result().healthy);
        probe(&mut p, 7_000, bad());
        assert!(!p.result().healthy);
    }

    #[test]
    fn zero_period_timeout_and_thresholds_fall_back_to_kubernetes_defaults() {
        let mut t = task(0, 0);
        (t.period_ms, t.timeout_ms, t.initial_delay_ms) = (0, 0, 0);
        let mut p = Prober::new(t, 0);
        let t = p.task();
        assert_eq!((t.period_ms, t.timeout_ms), (10_000, 1_000));
        assert_eq!((t.success_threshold, t.failure_threshold), (1, 1));
        probe(&mut p, 0, ok());
        assert!(!p.start(9_999));
        assert!(p.start(10_000));
    }

    #[test]
    fn kubernetes_rule_200_to_399_is_a_success() {
        for (status, success) in [
            (200, true),
            (204, true),
            (301, true),
            (399, true),
            (199, false),
            (400, false),
            (404, false),
            (500, false),
        ] {
            let o = http_outcome(Some(status), b"whatever", 1000);
            assert_eq!(o.success, success, "{status}");
            assert_eq!(o.message, format!("HTTP {status}"));
        }
    }

    #[test]
    fn envoys_own_replies_say_what_happened() {
        // What Envoy 1.40 answers a callout whose connect was refused.
        let failed = b"upstream connect error or disconnect/reset before headers. reset reason: \
remote connection failure";
        assert_eq!(
            http_outcome(Some(503), failed, 1000),
            Outcome::failure("connection refused or unreachable")
        );
        // Should a later Envoy add the transport's reason, it is used.
        let refused = b"upstream connect error or disconnect/reset before headers. reset reason: \
remote connection failure, transport failure reason: delayed connect error: Connection refused";
        assert_eq!(
            http_outcome(Some(503), refused, 1000).message,
            "connection refused"
        );
        let other = b"upstream connect error or disconnect/reset before headers. reset reason: \
connection termination";
        assert_eq!(
            http_outcome(Some(503), other, 1000).message,
            "upstream connect error (connection termination)"
        );
        let connect_timeout = b"upstream connect error or disconnect/reset before headers. \
reset reason: connection timeout";
        assert_eq!(
            http_outcome(Some(503), connect_timeout, 1000).message,
            "connect timeout"
        );
        assert_eq!(
            http_outcome(Some(504), b"upstream request timeout", 1000),
            Outcome::failure("timeout after 1s")
        );
        assert_eq!(
            http_outcome(Some(504), b"upstream request timeout", 1500).message,
            "timeout after 1.5s"
        );
        assert!(http_outcome(Some(503), b"no healthy upstream", 1000)
            .message
            .starts_with("no healthy upstream"));
        // The application's own 503 and 504 stay HTTP statuses.
        assert_eq!(http_outcome(Some(503), b"busy", 1000).message, "HTTP 503");
        assert_eq!(
            http_outcome(Some(504), b"gateway timeout", 1000).message,
            "HTTP 504"
        );
        let reset = http_outcome(None, b"", 1000);
        assert!(!reset.success);
        assert!(reset.message.contains("reset"), "{}", reset.message);
    }

    #[test]
    fn durations_read_like_kubernetes_ones() {
        assert_eq!(duration(1000), "1s");
        assert_eq!(duration(30_000), "30s");
        assert_eq!(duration(1500), "1.5s");
        assert_eq!(duration(1250), "1.25s");
        assert_eq!(duration(250), "250ms");
        assert_eq!(duration(0), "0ms");
    }
}
