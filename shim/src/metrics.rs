//! The shim's `/metrics`, in Prometheus' text format: what it did (counters) and what it knows
//! now (gauges from the status board and the data plane's last report).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use vmesh_api::agent::RegistrationState;

use crate::status::Status;

/// How a call to the control plane ended, as its `result` label says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered as asked.
    Ok,
    /// Failed in a way worth trying again (unreachable, 5xx, timeout).
    Retry,
    /// Refused (4xx other than a missing entry): not retried as it is.
    Refused,
    /// The entry is gone: register again.
    Gone,
}

impl Outcome {
    const ALL: [Outcome; 4] = [Outcome::Ok, Outcome::Retry, Outcome::Refused, Outcome::Gone];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Retry => "retry",
            Outcome::Refused => "refused",
            Outcome::Gone => "gone",
        }
    }
}

#[derive(Debug, Default)]
struct ByOutcome([AtomicU64; Outcome::ALL.len()]);

impl ByOutcome {
    fn inc(&self, outcome: Outcome) {
        // The array has one counter per variant, in `Outcome::ALL`'s order.
        if let Some(c) = self.0.get(outcome as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for (outcome, c) in Outcome::ALL.iter().zip(&self.0) {
            let _ = writeln!(
                out,
                "{name}{{result=\"{}\"}} {}",
                outcome.as_str(),
                c.load(Ordering::Relaxed)
            );
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    registrations: ByOutcome,
    heartbeats: ByOutcome,
    health_reports: ByOutcome,
    agent_reports: AtomicU64,
}

impl Metrics {
    pub fn count_registration(&self, outcome: Outcome) {
        self.registrations.inc(outcome);
    }

    pub fn count_heartbeat(&self, outcome: Outcome) {
        self.heartbeats.inc(outcome);
    }

    pub fn count_health(&self, outcome: Outcome) {
        self.health_reports.inc(outcome);
    }

    pub fn count_agent_report(&self) {
        self.agent_reports.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, status: &Status) -> String {
        let mut out = String::new();
        self.registrations.render(
            &mut out,
            "vmesh_shim_registrations_total",
            "Registration attempts with the control plane, by result.",
        );
        self.heartbeats.render(
            &mut out,
            "vmesh_shim_heartbeats_total",
            "Heartbeats sent to the control plane, by result.",
        );
        self.health_reports.render(
            &mut out,
            "vmesh_shim_health_reports_total",
            "Health reports sent to the control plane, by result.",
        );
        gauge(
            &mut out,
            "vmesh_shim_agent_reports_total",
            "counter",
            "Liveness reports received from the filter's agent in Envoy.",
            self.agent_reports.load(Ordering::Relaxed) as f64,
        );
        let registered = status.registration.state == RegistrationState::Registered;
        gauge(
            &mut out,
            "vmesh_shim_registered",
            "gauge",
            "1 while the VM's WorkloadEntry is registered and kept alive.",
            f64::from(u8::from(registered)),
        );
        let healthy = match status.health.healthy {
            Some(true) => 1.0,
            Some(false) => 0.0,
            None => -1.0,
        };
        gauge(
            &mut out,
            "vmesh_shim_healthy",
            "gauge",
            "Health last decided: 1 healthy, 0 unhealthy, -1 none reported (no probe).",
            healthy,
        );
        gauge(
            &mut out,
            "vmesh_shim_data_plane_alive",
            "gauge",
            "1 while Envoy's agent reports on time and Envoy serves.",
            f64::from(u8::from(status.data_plane.state == "alive")),
        );
        if let Some(age) = status.registration.last_contact_seconds_ago {
            gauge(
                &mut out,
                "vmesh_shim_control_plane_last_contact_seconds",
                "gauge",
                "Seconds since the control plane last answered.",
                age,
            );
        }
        if let Some(age) = status.name_table.age_seconds {
            gauge(
                &mut out,
                "vmesh_shim_name_table_age_seconds",
                "gauge",
                "Seconds since the name table last changed.",
                age,
            );
        }
        gauge(
            &mut out,
            "vmesh_shim_name_table_names",
            "gauge",
            "Names in the table served to the filter.",
            status.name_table.names as f64,
        );
        if let Some(c) = &status.certificate {
            if let Some(t) = c.not_after_unix {
                gauge(
                    &mut out,
                    "vmesh_shim_cert_expiry_timestamp_seconds",
                    "gauge",
                    "When the VM's workload certificate expires (Unix seconds).",
                    t as f64,
                );
            }
            gauge(
                &mut out,
                "vmesh_shim_cert_valid",
                "gauge",
                "1 while the VM holds an unexpired workload certificate.",
                f64::from(u8::from(c.state == "valid" || c.state == "renewing")),
            );
            gauge(
                &mut out,
                "vmesh_shim_cert_issued_total",
                "counter",
                "Workload certificates obtained from the CA and installed (rotations included).",
                c.issued as f64,
            );
            gauge(
                &mut out,
                "vmesh_shim_cert_failures_total",
                "counter",
                "Failed attempts to obtain a workload certificate (unreachable CA or refusal).",
                c.failures as f64,
            );
        }
        for (name, value) in &status.data_plane.counters {
            let metric = format!("vmesh_data_plane_{}_total", snake(name));
            gauge(
                &mut out,
                &metric,
                "counter",
                "From the filter's last report (cumulative since Envoy started).",
                *value as f64,
            );
        }
        out
    }
}

fn gauge(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

/// `dnsQueries` -> `dns_queries`; anything but ASCII letters and digits becomes `_`.
fn snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() {
            out.push(c);
        } else {
            out.push('_');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn counter_names_become_prometheus_names() {
        assert_eq!(super::snake("dnsQueries"), "dns_queries");
        assert_eq!(super::snake("conn.open-x"), "conn_open_x");
    }
}
