//! Prometheus text exposition of the control plane's counters. Counters are plain atomics
//! bumped on the request path; gauges that describe stored state are computed at scrape time
//! from the cache, so they cannot drift.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::identity::TokenError;

const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, le) in self.buckets.iter().zip(BUCKETS) {
            if s <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, le) in self.buckets.iter().zip(BUCKETS) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{le}\"}} {}",
                b.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// A closed set of label values: what a counter's label may say, and how each value is written.
pub trait Label {
    fn label(&self) -> &'static str;
}

/// Counters keyed by one label whose values are the variants of `L`.
#[derive(Debug)]
pub struct LabeledCounter<L>(Mutex<BTreeMap<&'static str, u64>>, PhantomData<fn(&L)>);

impl<L> Default for LabeledCounter<L> {
    fn default() -> Self {
        LabeledCounter(Mutex::default(), PhantomData)
    }
}

impl<L: Label> LabeledCounter<L> {
    pub fn inc(&self, label: &L) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(label.label()).or_default() += 1;
    }

    pub fn get(&self, label: &L) -> u64 {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(label.label()).copied().unwrap_or(0)
    }

    fn render(&self, name: &str, label: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (v, n) in m.iter() {
            let _ = writeln!(out, "{name}{{{label}=\"{v}\"}} {n}");
        }
    }
}

/// How a registration ended (`vmesh_registrations_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrationResult {
    Ok,
    BadRequest,
    Forbidden,
    NotFound,
    Conflict,
    Unavailable,
    TooManyRequests,
}

impl Label for RegistrationResult {
    fn label(&self) -> &'static str {
        match self {
            RegistrationResult::Ok => "ok",
            RegistrationResult::BadRequest => "bad_request",
            RegistrationResult::Forbidden => "forbidden",
            RegistrationResult::NotFound => "not_found",
            RegistrationResult::Conflict => "conflict",
            RegistrationResult::Unavailable => "unavailable",
            RegistrationResult::TooManyRequests => "too_many_requests",
        }
    }
}

/// What became of a health report (`vmesh_health_reports_total{outcome}`): recorded, or
/// older than what the entry already says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthReportOutcome {
    Applied,
    Stale,
}

impl Label for HealthReportOutcome {
    fn label(&self) -> &'static str {
        match self {
            HealthReportOutcome::Applied => "applied",
            HealthReportOutcome::Stale => "stale",
        }
    }
}

impl Label for crate::conns::Refusal {
    fn label(&self) -> &'static str {
        self.reason()
    }
}

impl Label for crate::quota::QuotaRefusal {
    fn label(&self) -> &'static str {
        self.reason()
    }
}

impl Label for TokenError {
    fn label(&self) -> &'static str {
        self.reason()
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub registrations: LabeledCounter<RegistrationResult>,
    pub token_refusals: LabeledCounter<TokenError>,
    pub health_reports: LabeledCounter<HealthReportOutcome>,
    /// Registrations refused by a per-identity quota, by which one.
    pub quota_refusals: LabeledCounter<crate::quota::QuotaRefusal>,
    pub heartbeats: AtomicU64,
    pub open_long_polls: AtomicI64,
    /// Requests being handled now (long-polls and the scrape itself included).
    pub requests_in_flight: AtomicI64,
    pub store_commit: Histogram,
    /// TLS connections open now (handshaking included).
    pub connections_open: AtomicI64,
    /// Connections closed at accept because a cap was reached and nothing could give way.
    pub connections_refused: LabeledCounter<crate::conns::Refusal>,
    /// Unauthenticated connections closed to make room for new ones.
    pub connections_evicted: AtomicU64,
    pub accept_errors: AtomicU64,
    /// Workload certificates signed.
    pub certificates_issued: AtomicU64,
    /// CreateCertificate calls answered without a certificate.
    pub certificates_refused: LabeledCounter<crate::ca::Refusal>,
}

/// State-derived gauges, computed by the caller at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct EntryGauges {
    pub connected: u64,
    pub disconnected: u64,
    pub manual: u64,
    pub healthy: u64,
    pub unhealthy: u64,
}

/// A Prometheus label value: backslash, quote and newline escaped (replica names come from
/// a flag).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// This replica's own gauges: its name as a label, so that one dashboard over every replica
/// tells them apart.
#[derive(Debug, Default, Clone)]
pub struct ReplicaGauges {
    pub replica: String,
    /// Connected entries whose `istio.io/workloadController` is this replica.
    pub entries_owned: u64,
    /// Whether its last lease renewal went through (0 while the store is unreachable).
    pub lease_held: bool,
    /// Replicas holding a lease at its last look, itself included.
    pub replicas_alive: u64,
}

impl Metrics {
    pub fn render(&self, g: EntryGauges, r: &ReplicaGauges) -> String {
        let mut out = String::with_capacity(4096);
        self.registrations.render(
            "vmesh_registrations_total",
            "result",
            "VM registrations by result.",
            &mut out,
        );
        self.token_refusals.render(
            "vmesh_token_refusals_total",
            "reason",
            "Refused bearer tokens by reason.",
            &mut out,
        );
        self.health_reports.render(
            "vmesh_health_reports_total",
            "outcome",
            "Health reports by outcome (applied, stale).",
            &mut out,
        );
        self.quota_refusals.render(
            "vmesh_quota_refusals_total",
            "reason",
            "Registrations refused (429) by a per-identity quota: rate, entries, identities.",
            &mut out,
        );
        let _ = writeln!(
            out,
            "# HELP vmesh_heartbeats_total Liveness reports received.\n# TYPE vmesh_heartbeats_total counter\nvmesh_heartbeats_total {}",
            self.heartbeats.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP vmesh_workload_entries WorkloadEntries by state.\n# TYPE vmesh_workload_entries gauge");
        for (state, n) in [
            ("connected", g.connected),
            ("disconnected", g.disconnected),
            ("manual", g.manual),
        ] {
            let _ = writeln!(out, "vmesh_workload_entries{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP vmesh_workload_entries_health WorkloadEntries by health.\n# TYPE vmesh_workload_entries_health gauge");
        for (h, n) in [("healthy", g.healthy), ("unhealthy", g.unhealthy)] {
            let _ = writeln!(out, "vmesh_workload_entries_health{{health=\"{h}\"}} {n}");
        }
        let replica = label_value(&r.replica);
        let _ = writeln!(
            out,
            "# HELP vmesh_replica_entries_owned Connected WorkloadEntries this replica controls (istio.io/workloadController).\n# TYPE vmesh_replica_entries_owned gauge\nvmesh_replica_entries_owned{{replica=\"{replica}\"}} {}",
            r.entries_owned
        );
        let _ = writeln!(
            out,
            "# HELP vmesh_replica_lease_held 1 while this replica's liveness lease in the store is renewed.\n# TYPE vmesh_replica_lease_held gauge\nvmesh_replica_lease_held{{replica=\"{replica}\"}} {}",
            u8::from(r.lease_held)
        );
        let _ = writeln!(
            out,
            "# HELP vmesh_replicas_alive Replicas holding a liveness lease, as this replica last saw them.\n# TYPE vmesh_replicas_alive gauge\nvmesh_replicas_alive{{replica=\"{replica}\"}} {}",
            r.replicas_alive
        );
        let _ = writeln!(
            out,
            "# HELP vmesh_name_table_long_polls Name-table long-polls waiting now.\n# TYPE vmesh_name_table_long_polls gauge\nvmesh_name_table_long_polls {}",
            self.open_long_polls.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP vmesh_requests_in_flight API requests being handled now, this scrape included.\n# TYPE vmesh_requests_in_flight gauge\nvmesh_requests_in_flight {}",
            self.requests_in_flight.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP vmesh_connections_open Client connections open now.\n# TYPE vmesh_connections_open gauge\nvmesh_connections_open {}",
            self.connections_open.load(Ordering::Relaxed)
        );
        self.connections_refused.render(
            "vmesh_connections_refused_total",
            "reason",
            "Connections closed at accept: a cap was reached and every connection held was authenticated.",
            &mut out,
        );
        let _ = writeln!(
            out,
            "# HELP vmesh_connections_evicted_total Unauthenticated connections closed to make room at a cap.\n# TYPE vmesh_connections_evicted_total counter\nvmesh_connections_evicted_total {}",
            self.connections_evicted.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP vmesh_accept_errors_total Failed accept calls (out of descriptors or memory).\n# TYPE vmesh_accept_errors_total counter\nvmesh_accept_errors_total {}",
            self.accept_errors.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP vmesh_certificates_issued_total Workload certificates signed.\n# TYPE vmesh_certificates_issued_total counter\nvmesh_certificates_issued_total {}",
            self.certificates_issued.load(Ordering::Relaxed)
        );
        self.certificates_refused.render(
            "vmesh_certificates_refused_total",
            "reason",
            "CreateCertificate calls refused, by reason.",
            &mut out,
        );
        self.store_commit.render(
            "vmesh_store_commit_seconds",
            "Store commit latency (one fsync'd batch).",
            &mut out,
        );
        out
    }
}
