//! The VM's registration session: its WorkloadEntry kept alive for as long as the data plane
//! is, and its health kept current, without anyone touching the control plane.
//!
//! ```text
//!  Waiting ──data plane alive──► Registering ──200──► Registered ──data plane down──► DataPlaneDown
//!     ▲                            │  ▲   │               │  heartbeats, health            │ unhealthy sent,
//!     │                 503, net ──┘  │   └─401/403/404/409─► Refused                     │ no heartbeats
//!     │                               └──────── heartbeat 404 ──┘  (waits for a change)   │
//!     └─────────────────────────────────────────── data plane alive again: Registering ◄──┘
//! ```
//!
//! - It registers only once Envoy says it serves (a report with `ready`), and again whenever
//!   the data plane comes back after being down (a restarted or resumed Envoy).
//! - While registered it heartbeats every `heartbeatIntervalSeconds`; a 404 means the entry is
//!   gone and it registers again at once.
//! - Health is decided from the data plane and the probe ([`decide`]) and sent on every
//!   change, one report at a time and retried until the control plane acknowledges it, so
//!   transitions are neither lost nor reordered; each report carries the registration number
//!   of the last register answer and a sequence higher than the one before, which is how the
//!   control plane orders them (this VM's clock plays no part).
//! - When the data plane stops reporting, it reports the entry unhealthy at once and stops
//!   heartbeating: the control plane then disconnects the entry and deletes it after its grace
//!   period, as for any VM that went away.
//! - Refusals (401/403 and 400) wait for the token file to change; 404 (no such group) and 409
//!   (a manual entry has the name) are asked again every [`REFUSED_RETRY`] too, since the
//!   group or entry may change on the control plane's side. Connection errors and 503 are
//!   retried with jittered exponential backoff.
//! - On shutdown it deregisters (bounded), so a stopped VM leaves the mesh at once.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;
use vmesh_api::agent::RegistrationState;
use vmesh_api::control::{
    EntryRef, ErrorKind, HealthRequest, RegisterRequest, RegisterResponse, MAX_HEALTH_MESSAGE,
};
use vmesh_api::time::format_rfc3339_nanos;

use super::client::{CallError, ControlPlane};
use crate::backoff::Backoff;
use crate::dataplane::{DataPlane, Liveness};
use crate::metrics::{Metrics, Outcome};
use crate::probe::ProbePlan;
use crate::status::Board;

/// How often a registration refused with 404 or 409 is asked again.
pub const REFUSED_RETRY: Duration = Duration::from_secs(30);
/// How often a refused session looks at the token file.
const TOKEN_CHECK: Duration = Duration::from_secs(1);

/// A verdict of a probe the shim runs itself (the filter's arrive in its reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The [`ProbePlan::id`] it is for.
    pub id: u64,
    pub healthy: bool,
    pub message: String,
}

/// The health to report: `None` when there is none to report (the group has no probe).
pub fn decide(dp: &DataPlane, plan: &ProbePlan, shim: Option<&Verdict>) -> Option<(bool, String)> {
    let id = plan.id()?;
    match &dp.state {
        Liveness::Unknown => {
            return Some((false, "data plane: no report from Envoy yet".into()));
        }
        Liveness::NotReady => {
            return Some((
                false,
                "data plane not ready: Envoy is not serving yet".into(),
            ));
        }
        Liveness::Down(why) => return Some((false, format!("data plane down: {why}"))),
        Liveness::Alive => {}
    }
    let verdict = match plan {
        ProbePlan::None => None,
        ProbePlan::Filter(_) => dp
            .probe
            .as_ref()
            .filter(|p| p.id == id)
            .map(|p| (p.healthy, p.message.clone())),
        ProbePlan::Shim { .. } => shim
            .filter(|v| v.id == id)
            .map(|v| (v.healthy, v.message.clone())),
    };
    Some(match verdict {
        None => (false, "probe: no result yet".into()),
        Some((true, m)) => (true, format!("probe passed: {m}")),
        Some((false, m)) => (false, format!("probe failed: {m}")),
    })
}

/// What registration needs besides the token.
#[derive(Debug, Clone)]
pub struct Session {
    pub cp: Arc<ControlPlane>,
    pub request: RegisterRequest,
    pub dataplane: watch::Receiver<DataPlane>,
    /// Verdicts of probes the shim runs.
    pub verdicts: watch::Receiver<Option<Verdict>>,
    /// The probe plan, for the report handler (filter probes) and the shim's prober.
    pub plan: watch::Sender<ProbePlan>,
    pub board: Arc<Board>,
    pub metrics: Arc<Metrics>,
    pub deregister_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Waiting,
    Registering,
    Registered,
    Refused {
        token: u64,
        retry_at: Option<Instant>,
    },
    DataPlaneDown,
}

/// Health as sent: one report in flight at a time, retried until acknowledged.
#[derive(Debug, Default)]
struct Health {
    acked: Option<(bool, String)>,
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// The `registration` of the last register answer: reports carry it with `sequence`, and
    /// the control plane orders them by the pair with no regard for this VM's clock. 0 from a
    /// control plane older than that: then reports carry `probeTime` instead.
    registration: u64,
    /// Of the last report sent; the next is always higher (never reset, so it also increases
    /// within every registration).
    sequence: u64,
    /// The last `probeTime` sent (old control planes only), in ns since the epoch: the next is
    /// always later.
    last_time: u64,
}

impl Session {
    fn now_nanos(&self, health: &mut Health) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let t = now.max(health.last_time.saturating_add(1_000));
        health.last_time = t;
        t
    }

    fn desired(&self) -> Option<(bool, String)> {
        let dp = self.dataplane.borrow().clone();
        let verdict = self.verdicts.borrow().clone();
        decide(&dp, &self.plan.borrow(), verdict.as_ref())
    }

    fn set(&self, state: RegistrationState, entry: Option<EntryRef>) {
        self.board.set_state(state, entry);
    }

    fn failed(&self, what: &str, e: &CallError) {
        if e.kind().is_some() {
            self.board.contact();
        }
        self.board.error(format!("{what}: {e}"));
    }

    /// Runs until `stop` flips, then deregisters (bounded) if it holds an entry.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut phase = Phase::Waiting;
        let mut entry: Option<EntryRef> = None;
        let mut heartbeat_every = Duration::from_secs(5);
        let mut next_heartbeat = Instant::now();
        let mut backoff = Backoff::default();
        let mut health = Health::default();
        let mut plan_id = 0u64;
        self.set(RegistrationState::Waiting, None);
        loop {
            if *stop.borrow() {
                break;
            }
            let alive = self.dataplane.borrow().is_alive();
            match phase.clone() {
                Phase::Waiting => {
                    if alive {
                        phase = Phase::Registering;
                        continue;
                    }
                    self.set(RegistrationState::Waiting, None);
                    self.board
                        .health(None, "not registered: waiting for Envoy to serve", true);
                    tokio::select! {
                        _ = self.dataplane.changed() => {}
                        _ = stop.changed() => {}
                    }
                }
                Phase::Registering => {
                    if !alive {
                        phase = if entry.is_some() {
                            Phase::DataPlaneDown
                        } else {
                            Phase::Waiting
                        };
                        continue;
                    }
                    self.set(RegistrationState::Registering, entry.clone());
                    let attempt = tokio::select! {
                        r = self.cp.register(&self.request) => r,
                        _ = stop.changed() => continue,
                    };
                    match attempt {
                        Ok(resp) => {
                            self.metrics.count_registration(Outcome::Ok);
                            self.board.contact();
                            backoff.reset();
                            heartbeat_every =
                                Duration::from_secs(resp.heartbeat_interval_seconds.max(1));
                            next_heartbeat = Instant::now() + heartbeat_every;
                            plan_id = self.adopt(&resp, plan_id);
                            if entry.as_ref() != Some(&resp.workload_entry) {
                                tracing::info!(entry = %resp.workload_entry, "registered");
                            } else {
                                tracing::info!(entry = %resp.workload_entry, "registered again");
                            }
                            entry = Some(resp.workload_entry);
                            health.registration = resp.registration;
                            // A (re)created entry starts unhealthy until told otherwise, and a
                            // reconnect may follow a report the control plane never saw.
                            health.acked = None;
                            health.retry_at = None;
                            self.set(RegistrationState::Registered, entry.clone());
                            phase = Phase::Registered;
                        }
                        Err(e) if e.is_transient() => {
                            self.metrics.count_registration(Outcome::Retry);
                            self.failed("register", &e);
                            let delay = backoff.next_delay();
                            tracing::warn!(error = %e, retry_in = ?delay, "registration failed; retrying");
                            self.pause(delay, &mut stop).await;
                        }
                        Err(e) => {
                            self.metrics.count_registration(Outcome::Refused);
                            self.failed("register", &e);
                            let retry_at =
                                matches!(e.kind(), Some(ErrorKind::NotFound | ErrorKind::Conflict))
                                    .then(|| Instant::now() + REFUSED_RETRY);
                            tracing::error!(error = %e, retry_in = ?retry_at.map(|_| REFUSED_RETRY),
                                "registration refused; waiting for the token (or the control plane's config) to change");
                            phase = Phase::Refused {
                                token: self.cp.token().generation(),
                                retry_at,
                            };
                        }
                    }
                }
                Phase::Refused { token, retry_at } => {
                    self.set(RegistrationState::Refused, entry.clone());
                    if self.cp.token().generation() != token
                        || retry_at.is_some_and(|t| Instant::now() >= t)
                    {
                        phase = Phase::Registering;
                        continue;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(TOKEN_CHECK) => {}
                        _ = self.dataplane.changed() => {}
                        _ = stop.changed() => {}
                    }
                    if !self.dataplane.borrow().is_alive() && entry.is_none() {
                        phase = Phase::Waiting;
                    }
                }
                Phase::Registered => {
                    let Some(current) = entry.clone() else {
                        phase = Phase::Registering;
                        continue;
                    };
                    if !alive {
                        tracing::warn!(entry = %current, "data plane down: reporting unhealthy, heartbeats stop");
                        phase = Phase::DataPlaneDown;
                        continue;
                    }
                    if Instant::now() >= next_heartbeat {
                        let beat = tokio::select! {
                            r = self.cp.heartbeat(&current) => r,
                            _ = stop.changed() => continue,
                        };
                        match beat {
                            Ok(()) => {
                                self.metrics.count_heartbeat(Outcome::Ok);
                                self.board.contact();
                                backoff.reset();
                                next_heartbeat = Instant::now() + heartbeat_every;
                                // The control plane answers again: a health report waiting out
                                // its backoff goes now, not up to 30 s later.
                                if health.retry_at.take().is_some() {
                                    health.backoff.reset();
                                }
                            }
                            Err(e) if e.kind() == Some(ErrorKind::NotFound) => {
                                self.metrics.count_heartbeat(Outcome::Gone);
                                self.failed("heartbeat", &e);
                                tracing::warn!(entry = %current, error = %e, "entry gone; registering again");
                                phase = Phase::Registering;
                                continue;
                            }
                            Err(e) if e.is_transient() => {
                                self.metrics.count_heartbeat(Outcome::Retry);
                                self.failed("heartbeat", &e);
                                let delay = backoff.next_delay().min(heartbeat_every);
                                tracing::warn!(error = %e, retry_in = ?delay, "heartbeat failed; retrying");
                                next_heartbeat = Instant::now() + delay;
                            }
                            Err(e) => {
                                self.metrics.count_heartbeat(Outcome::Refused);
                                self.failed("heartbeat", &e);
                                tracing::error!(entry = %current, error = %e, "heartbeat refused; waiting for a change");
                                phase = Phase::Refused {
                                    token: self.cp.token().generation(),
                                    retry_at: Some(Instant::now() + REFUSED_RETRY),
                                };
                                continue;
                            }
                        }
                    }
                    match self.send_health(&current, &mut health).await {
                        Err(e) if e.kind() == Some(ErrorKind::NotFound) => {
                            phase = Phase::Registering;
                            continue;
                        }
                        _ => {}
                    }
                    let health_retry = health.retry_at;
                    tokio::select! {
                        () = tokio::time::sleep_until(next_heartbeat) => {}
                        () = sleep_until_opt(health_retry) => {}
                        _ = self.dataplane.changed() => {}
                        _ = self.verdicts.changed() => {}
                        _ = stop.changed() => {}
                    }
                }
                Phase::DataPlaneDown => {
                    self.set(RegistrationState::DataPlaneDown, entry.clone());
                    if alive {
                        tracing::info!("data plane back; registering again");
                        phase = Phase::Registering;
                        continue;
                    }
                    if let Some(current) = entry.clone() {
                        if let Err(e) = self.send_health(&current, &mut health).await {
                            if e.kind() == Some(ErrorKind::NotFound) {
                                // The entry is gone: nothing left to report on.
                                health.acked = self.desired();
                                health.retry_at = None;
                            }
                        }
                    }
                    let health_retry = health.retry_at;
                    tokio::select! {
                        () = sleep_until_opt(health_retry) => {}
                        _ = self.dataplane.changed() => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
        if let Some(current) = entry {
            self.deregister(&current).await;
        }
    }

    /// Takes the probe from a registration response; returns the plan's number.
    fn adopt(&self, resp: &RegisterResponse, plan_id: u64) -> u64 {
        let fresh = ProbePlan::of(resp.probe.as_ref(), plan_id + 1);
        if self.plan.borrow().same_probe(&fresh) {
            return plan_id;
        }
        self.board.probe(fresh.describe());
        self.plan.send_replace(fresh);
        plan_id + 1
    }

    fn publish_health(&self, health: &Health) {
        match self.desired() {
            Some((healthy, message)) => {
                let acked = health.acked.as_ref() == Some(&(healthy, message.clone()));
                self.board.health(Some(healthy), &message, acked);
            }
            None => self
                .board
                .health(None, "the group has no probe: no health is reported", true),
        }
    }

    /// Sends the current health if the control plane does not have it yet (and no retry is
    /// pending). Errors are returned after being recorded; a transient one schedules a retry.
    async fn send_health(&self, entry: &EntryRef, health: &mut Health) -> Result<(), CallError> {
        self.publish_health(health);
        let Some((healthy, message)) = self.desired() else {
            return Ok(());
        };
        if health.acked.as_ref() == Some(&(healthy, message.clone())) {
            return Ok(());
        }
        if health.retry_at.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        let mut text = message.clone();
        truncate(&mut text, MAX_HEALTH_MESSAGE);
        let mut req = HealthRequest {
            namespace: entry.namespace.clone(),
            name: entry.name.clone(),
            healthy,
            message: text,
            ..HealthRequest::default()
        };
        if health.registration > 0 {
            health.sequence += 1;
            req.registration = Some(health.registration);
            req.sequence = Some(health.sequence);
        } else {
            req.probe_time = format_rfc3339_nanos(self.now_nanos(health));
        }
        match self.cp.health(&req).await {
            Ok(resp) => {
                self.metrics.count_health(Outcome::Ok);
                self.board.contact();
                if !resp.applied {
                    tracing::warn!(entry = %entry, "the control plane holds a newer health report");
                }
                tracing::info!(entry = %entry, healthy, %message, "health reported");
                health.acked = Some((healthy, message));
                health.retry_at = None;
                health.backoff.reset();
                self.publish_health(health);
                Ok(())
            }
            Err(e) => {
                self.failed("health", &e);
                if e.kind() == Some(ErrorKind::NotFound) {
                    self.metrics.count_health(Outcome::Gone);
                    return Err(e);
                }
                self.metrics.count_health(Outcome::Retry);
                let delay = health.backoff.next_delay();
                tracing::warn!(entry = %entry, error = %e, retry_in = ?delay, "health report failed; retrying");
                health.retry_at = Some(Instant::now() + delay);
                Err(e)
            }
        }
    }

    async fn deregister(&self, entry: &EntryRef) {
        self.set(RegistrationState::Deregistering, Some(entry.clone()));
        match tokio::time::timeout(self.deregister_timeout, self.cp.deregister(entry)).await {
            Ok(Ok(())) => tracing::info!(entry = %entry, "deregistered"),
            Ok(Err(e)) if e.kind() == Some(ErrorKind::NotFound) => {
                tracing::info!(entry = %entry, "entry already gone");
            }
            Ok(Err(e)) => {
                tracing::warn!(entry = %entry, error = %e, "deregistration failed; the control plane removes the entry after its grace period")
            }
            Err(_) => tracing::warn!(entry = %entry, timeout = ?self.deregister_timeout,
                "deregistration timed out; the control plane removes the entry after its grace period"),
        }
    }

    async fn pause(&self, delay: Duration, stop: &mut watch::Receiver<bool>) {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.changed() => {}
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmesh_api::agent::{ProbeKind, ProbeResult, ProbeTask};

    fn alive(probe: Option<ProbeResult>) -> DataPlane {
        DataPlane {
            state: Liveness::Alive,
            probe,
            ..DataPlane::default()
        }
    }

    fn filter_plan(id: u64) -> ProbePlan {
        ProbePlan::Filter(ProbeTask {
            id,
            kind: ProbeKind::HttpGet,
            host: "127.0.0.1".into(),
            port: 8080,
            ..ProbeTask::default()
        })
    }

    #[test]
    fn health_is_the_probe_and_a_live_data_plane() {
        let ok = |id| ProbeResult {
            id,
            healthy: true,
            message: "HTTP 200".into(),
        };
        assert_eq!(decide(&alive(None), &ProbePlan::None, None), None);
        assert_eq!(
            decide(&alive(Some(ok(1))), &filter_plan(1), None),
            Some((true, "probe passed: HTTP 200".into()))
        );
        assert_eq!(
            decide(&alive(Some(ok(1))), &filter_plan(2), None),
            Some((false, "probe: no result yet".into())),
            "a result for an older probe does not count"
        );
        let down = DataPlane {
            state: Liveness::Down("no report from Envoy for 1.5s".into()),
            probe: Some(ok(1)),
            ..DataPlane::default()
        };
        assert_eq!(
            decide(&down, &filter_plan(1), None),
            Some((
                false,
                "data plane down: no report from Envoy for 1.5s".into()
            ))
        );
        let shim = ProbePlan::Shim {
            id: 4,
            probe: vmesh_api::probe::ReadinessProbe::default(),
        };
        let v = Verdict {
            id: 4,
            healthy: false,
            message: "exit status 1".into(),
        };
        assert_eq!(
            decide(&alive(None), &shim, Some(&v)),
            Some((false, "probe failed: exit status 1".into()))
        );
    }

    #[test]
    fn messages_are_cut_on_a_character_boundary() {
        let mut s = "é".repeat(600);
        truncate(&mut s, MAX_HEALTH_MESSAGE);
        assert_eq!(s.len(), 1024);
        let mut s = format!("a{}", "é".repeat(600));
        truncate(&mut s, MAX_HEALTH_MESSAGE);
        assert_eq!(s.len(), 1023);
    }
}
