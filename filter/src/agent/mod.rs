//! The agent root: a bootstrap singleton, one per Envoy, on the main thread. Three jobs share
//! its timer and its callouts (told apart by token):
//! - [`names`]: keeps the name table in sync with the shim and publishes it to the workers;
//! - [`report`]: checks Envoy's readiness and reports liveness and data-path counters to the
//!   shim on a period; the reply says the registration state and which probe to run;
//! - [`probe`]: runs that probe (httpGet) through Envoy; its verdict rides on the next report.

mod names;
mod probe;
mod report;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proxy_wasm::hostcalls;

use crate::config::Config;
use crate::metrics::Metrics;

/// The agent's timer: table retries, reports and probes start on it. Shorter for report
/// periods under it.
const TICK: Duration = Duration::from_millis(200);

pub struct Agent {
    names: names::NamePoll,
    reports: report::Reports,
    probe: probe::ProbeRunner,
}

impl Agent {
    pub fn new(config: Config, metrics: Metrics) -> Self {
        crate::liveness::agent_runs_here();
        let tick = TICK.min(Duration::from_millis(config.report_period_ms));
        if let Err(e) = hostcalls::set_tick_period(tick) {
            log::error!("cannot start the agent tick: {e:?}");
        }
        Agent {
            reports: report::Reports::new(config.clone(), metrics.clone(), now()),
            probe: probe::ProbeRunner::new(config.clone()),
            names: names::NamePoll::new(config, metrics),
        }
    }

    pub fn on_tick(&mut self) {
        let now = now();
        self.names.on_tick(now);
        self.probe.on_tick(millis(now));
        self.reports.on_tick(now, self.probe.result());
    }

    pub fn on_http_call_response(&mut self, token: u32, headers: usize, body_size: usize) {
        if self.names.owns(token) {
            self.names.on_http_call_response(token, headers, body_size);
        } else if self.reports.owns(token) {
            let now = now();
            let reply =
                self.reports
                    .on_response(token, headers, body_size, now, self.probe.result());
            if let Some(task) = reply {
                self.probe.take(task, millis(now));
            }
            // A report that was due while this one was out goes now, not on the next tick.
            self.reports.on_tick(now, self.probe.result());
        } else if self.probe.owns(token) {
            self.probe.on_response(token, headers, body_size);
        }
    }
}

fn now() -> SystemTime {
    hostcalls::get_current_time().unwrap_or(UNIX_EPOCH)
}

fn millis(t: SystemTime) -> u64 {
    crate::liveness::nanos(t) / 1_000_000
}
