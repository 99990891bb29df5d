//! The agent's liveness reports: every `report_period_ms`, ask Envoy's admin `/ready` (through
//! `admin_cluster`), then POST an [`AgentReport`] to the shim. One cycle at a time; a report
//! whose callout fails is not retried, the next one supersedes it (the shim judges by
//! arrival). Failures and registration changes are logged when they change, not per report.

use std::fmt::Write;
use std::time::{Duration, SystemTime};

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;
use vmesh_api::agent::{AgentReply, AgentReport, ProbeResult, ProbeTask, RegistrationState};
use vmesh_api::paths::{content_type, shim};

use crate::callout;
use crate::config::Config;
use crate::liveness;
use crate::metrics::{report_counters, Metrics};

/// Envoy admin's readiness endpoint and what it says when the server is live.
const READY_PATH: &str = "/ready";
const LIVE: &str = "LIVE";

enum Phase {
    Idle,
    /// Waiting for `/ready`; the report follows.
    Readiness(u32),
    Report(u32),
}

pub struct Reports {
    config: Config,
    metrics: Metrics,
    /// This run of Envoy.
    boot: String,
    /// The last report sent.
    seq: u64,
    /// When the next cycle is due (ms on the host clock).
    next_at: u64,
    phase: Phase,
    /// `admin_cluster` does not exist: readiness is not checked and Envoy counts as ready.
    no_admin: bool,
    ready: bool,
    /// The last registration state the shim told (logged when it changes).
    state: Option<RegistrationState>,
    /// Why the last report failed, until one succeeds (logged when it changes).
    failing: Option<String>,
}

impl Reports {
    pub fn new(config: Config, metrics: Metrics, now: SystemTime) -> Self {
        Reports {
            config,
            metrics,
            boot: boot_id(now),
            seq: 0,
            next_at: 0,
            phase: Phase::Idle,
            no_admin: false,
            ready: false,
            state: None,
            failing: None,
        }
    }

    pub fn owns(&self, token: u32) -> bool {
        matches!(self.phase, Phase::Readiness(t) | Phase::Report(t) if t == token)
    }

    /// Starts a cycle when one is due and none is under way.
    pub fn on_tick(&mut self, now: SystemTime, probe: Option<ProbeResult>) {
        let now_ms = super::millis(now);
        if !matches!(self.phase, Phase::Idle) || now_ms < self.next_at {
            return;
        }
        // Keep to the period's grid unless a whole period was missed.
        let period = self.config.report_period_ms;
        let next = self.next_at.saturating_add(period);
        self.next_at = if next > now_ms {
            next
        } else {
            now_ms.saturating_add(period)
        };
        if self.no_admin {
            return self.send(now, probe);
        }
        let headers = vec![
            (":method", "GET"),
            (":path", READY_PATH),
            (":authority", self.config.admin_cluster.as_str()),
        ];
        match hostcalls::dispatch_http_call(
            &self.config.admin_cluster,
            headers,
            None,
            vec![],
            Duration::from_millis(period / 2),
        ) {
            Ok(token) => self.phase = Phase::Readiness(token),
            Err(Status::BadArgument) => {
                log::warn!(
                    "cluster {} is unknown: Envoy's readiness is not checked and counts as \
                     ready from now on",
                    self.config.admin_cluster
                );
                self.no_admin = true;
                self.set_ready(true, "assumed");
                self.send(now, probe);
            }
            Err(e) => {
                self.set_ready(false, &format!("/ready not asked: {e:?}"));
                self.send(now, probe);
            }
        }
    }

    /// Takes a callout response of this part. When a report's reply was understood, returns
    /// the probe task it names (`Some(None)`: no probe).
    pub fn on_response(
        &mut self,
        token: u32,
        headers: usize,
        body_size: usize,
        now: SystemTime,
        probe: Option<ProbeResult>,
    ) -> Option<Option<ProbeTask>> {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        let reply = callout::response(headers, body_size);
        match phase {
            Phase::Readiness(t) if t == token => {
                let body = reply.body.trim_ascii();
                match reply.status {
                    Some(200) if body == LIVE.as_bytes() => self.set_ready(true, LIVE),
                    Some(s) => self.set_ready(
                        false,
                        &format!("/ready {s} {}", String::from_utf8_lossy(body)),
                    ),
                    None => self.set_ready(false, "/ready did not answer"),
                }
                self.send(now, probe);
                None
            }
            Phase::Report(t) if t == token => match reply.status {
                Some(200) => match AgentReply::from_json(&reply.body) {
                    Ok(reply) => {
                        self.reached();
                        self.registration(&reply);
                        Some(reply.probe)
                    }
                    Err(e) => {
                        self.failed(format!("the shim's reply is not understood: {e}"));
                        None
                    }
                },
                Some(s) => {
                    self.failed(format!("the shim answered {s}"));
                    None
                }
                None => {
                    self.failed("the shim did not answer".into());
                    None
                }
            },
            other => {
                self.phase = other;
                None
            }
        }
    }

    fn send(&mut self, now: SystemTime, probe: Option<ProbeResult>) {
        let seq = self.seq.saturating_add(1);
        let report = AgentReport {
            boot: self.boot.clone(),
            seq,
            period_ms: self.config.report_period_ms,
            ready: self.ready,
            worker_idle_ms: liveness::worker_idle_ms(now),
            counters: report_counters(|c| self.metrics.get(c)),
            probe,
        };
        let body = report.to_json();
        let headers = vec![
            (":method", "POST"),
            (":path", shim::AGENT_REPORT),
            (":authority", self.config.shim_authority.as_str()),
            ("content-type", content_type::JSON),
            ("accept", content_type::JSON),
        ];
        match hostcalls::dispatch_http_call(
            &self.config.shim_cluster,
            headers,
            Some(body.as_bytes()),
            vec![],
            Duration::from_millis(self.config.report_period_ms),
        ) {
            Ok(token) => {
                self.seq = seq;
                self.phase = Phase::Report(token);
            }
            Err(e) => self.failed(format!(
                "not sent to cluster {}: {e:?}",
                self.config.shim_cluster
            )),
        }
    }

    fn set_ready(&mut self, ready: bool, why: &str) {
        if ready != self.ready {
            if ready {
                log::info!("Envoy is ready ({why}); reports say so");
            } else {
                log::info!("Envoy is not ready ({why}); reports say so");
            }
        }
        self.ready = ready;
    }

    fn failed(&mut self, why: String) {
        if self.failing.as_ref() != Some(&why) {
            log::warn!("agent report failed: {why}; the next report replaces it");
            self.failing = Some(why);
        }
    }

    fn reached(&mut self) {
        if let Some(why) = self.failing.take() {
            log::info!("agent reports reach the shim again (last failure: {why})");
        }
    }

    fn registration(&mut self, reply: &AgentReply) {
        if self.state == Some(reply.state) {
            return;
        }
        self.state = Some(reply.state);
        match &reply.workload_entry {
            Some(e) => log::info!(
                "registration {} (WorkloadEntry {}/{})",
                reply.state.as_str(),
                e.namespace,
                e.name
            ),
            None => log::info!("registration {}", reply.state.as_str()),
        }
    }
}

/// Names one run of Envoy: the agent's start time in nanoseconds (hex), then 4 random bytes
/// from WASI `random_get` when the host gives them (Envoy does), so two Envoys started in the
/// same nanosecond still differ.
fn boot_id(now: SystemTime) -> String {
    let mut id = format!("{:x}", liveness::nanos(now));
    let mut random = [0u8; 4];
    if getrandom::fill(&mut random).is_ok() {
        id.push('-');
        for b in random {
            let _ = write!(id, "{b:02x}");
        }
    }
    id
}
