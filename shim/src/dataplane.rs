//! The data plane as the shim sees it: alive while the filter's agent keeps reporting.
//!
//! Envoy proves it is alive by what it does, not by its process existing: the agent inside it
//! posts a report every period ([`vmesh_api::agent::AgentReport`]). When reports stop for one
//! and a half periods (Envoy killed, or hung: `kill -STOP`, a wedged main thread), or the
//! worker threads stop ticking while the main thread still reports, the data plane is down.
//! [`Tracker`] keeps the verdict in a `watch` channel the registration session follows.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use vmesh_api::agent::{AgentReport, ProbeResult};

/// Shortest silence that counts as a dead data plane, whatever period the agent states:
/// tighter than this, a loaded machine's scheduling hiccups would look like deaths.
pub const MIN_SILENCE: Duration = Duration::from_millis(750);
/// Worker threads idle this long (and at least two report periods) mean a stuck data plane.
pub const MIN_WORKER_IDLE: Duration = Duration::from_secs(2);

/// The verdict, plus what the last report said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataPlane {
    pub state: Liveness,
    /// The Envoy run the reports come from.
    pub boot: Option<String>,
    /// The latest result of the probe the agent runs.
    pub probe: Option<ProbeResult>,
    pub counters: BTreeMap<String, u64>,
    /// When the last report arrived.
    pub last_report: Option<Instant>,
    pub reports: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// No report yet since the shim started.
    Unknown,
    /// Reporting, but Envoy is not serving yet (listeners not up, or draining).
    NotReady,
    /// Reporting and serving.
    Alive,
    /// Was reporting; stopped (or its workers did). Why, for people.
    Down(String),
}

impl Default for DataPlane {
    fn default() -> Self {
        DataPlane {
            state: Liveness::Unknown,
            boot: None,
            probe: None,
            counters: BTreeMap::new(),
            last_report: None,
            reports: 0,
        }
    }
}

impl DataPlane {
    pub fn is_alive(&self) -> bool {
        self.state == Liveness::Alive
    }
}

#[derive(Debug)]
struct Inner {
    seq: u64,
    period: Duration,
    deadline: Option<Instant>,
}

/// Takes the agent's reports and watches for their absence.
#[derive(Debug)]
pub struct Tracker {
    inner: Mutex<Inner>,
    tx: watch::Sender<DataPlane>,
    /// Wakes the deadline watcher when a report moves the deadline.
    moved: tokio::sync::Notify,
}

/// How long a silence means death for reports every `period`.
pub fn silence_limit(period: Duration) -> Duration {
    (period * 3 / 2).max(MIN_SILENCE)
}

impl Tracker {
    pub fn new() -> Arc<Self> {
        Arc::new(Tracker {
            inner: Mutex::new(Inner {
                seq: 0,
                period: Duration::from_secs(1),
                deadline: None,
            }),
            tx: watch::channel(DataPlane::default()).0,
            moved: tokio::sync::Notify::new(),
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<DataPlane> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> DataPlane {
        self.tx.borrow().clone()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one report. A report older than the newest of the same Envoy run (a late
    /// retry) is ignored; a new run starts over.
    pub fn report(&self, r: AgentReport) {
        let now = Instant::now();
        let current = self.tx.borrow().clone();
        let same_run = current.boot.as_deref() == Some(r.boot.as_str());
        {
            let mut inner = self.inner();
            if same_run && r.seq <= inner.seq {
                return;
            }
            inner.seq = r.seq;
            inner.period = Duration::from_millis(r.period_ms.clamp(10, 600_000));
            inner.deadline = Some(now + silence_limit(inner.period));
        }
        if !same_run && current.boot.is_some() {
            tracing::info!(boot = %r.boot, "Envoy restarted (a new agent run reports)");
        }
        let period = Duration::from_millis(r.period_ms);
        let idle_limit = (period * 2).max(MIN_WORKER_IDLE);
        let state = match r.worker_idle_ms.map(Duration::from_millis) {
            Some(idle) if idle > idle_limit => Liveness::Down(format!(
                "Envoy's worker threads idle for {:.1}s",
                idle.as_secs_f64()
            )),
            _ if !r.ready => Liveness::NotReady,
            _ => Liveness::Alive,
        };
        if state != current.state {
            match &state {
                Liveness::Alive => tracing::info!(boot = %r.boot, "data plane alive"),
                Liveness::NotReady => tracing::info!(boot = %r.boot, "data plane not ready"),
                Liveness::Down(why) => tracing::warn!(boot = %r.boot, %why, "data plane down"),
                Liveness::Unknown => {}
            }
        }
        self.tx.send_replace(DataPlane {
            state,
            boot: Some(r.boot),
            probe: r.probe,
            counters: r.counters.iter().map(|(k, v)| (k.to_string(), v)).collect(),
            last_report: Some(now),
            reports: current.reports + 1,
        });
        self.moved.notify_one();
    }

    /// Marks the data plane down when the deadline passes without a report. Runs until
    /// `stop` flips.
    pub async fn watch_deadline(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let deadline = self.inner().deadline;
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = expired => self.expire(),
                () = self.moved.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    fn expire(&self) {
        let (period, silence) = {
            let mut inner = self.inner();
            match inner.deadline {
                Some(d) if d <= Instant::now() => {
                    inner.deadline = None;
                    (inner.period, silence_limit(inner.period))
                }
                _ => return,
            }
        };
        let why = format!(
            "no report from Envoy for {:.1}s (it reports every {:.1}s)",
            silence.as_secs_f64(),
            period.as_secs_f64()
        );
        tracing::warn!(%why, "data plane down");
        self.tx.send_modify(|d| d.state = Liveness::Down(why));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(boot: &str, seq: u64) -> AgentReport {
        AgentReport {
            boot: boot.into(),
            seq,
            period_ms: 100,
            ready: true,
            ..AgentReport::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silence_for_one_and_a_half_periods_is_death_and_a_report_revives() {
        let t = Tracker::new();
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(Arc::clone(&t).watch_deadline(stop));
        let mut rx = t.subscribe();
        assert_eq!(rx.borrow().state, Liveness::Unknown);
        t.report(report("a", 1));
        assert!(rx.borrow_and_update().is_alive());
        // The floor applies to a 100 ms period: 750 ms of silence.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(t.current().is_alive());
        rx.changed().await.unwrap();
        assert!(matches!(rx.borrow().state, Liveness::Down(ref why) if why.contains("no report")));
        t.report(report("a", 2));
        assert!(t.current().is_alive());
        stop_tx.send_replace(true);
    }

    #[test]
    fn late_reports_of_a_run_are_ignored_and_a_new_run_starts_over() {
        let t = Tracker::new();
        t.report(report("a", 5));
        let mut old = report("a", 4);
        old.ready = false;
        t.report(old);
        assert!(t.current().is_alive(), "seq 4 after 5 is a late retry");
        let mut fresh = report("b", 1);
        fresh.ready = false;
        t.report(fresh);
        assert_eq!(t.current().state, Liveness::NotReady);
        assert_eq!(t.current().boot.as_deref(), Some("b"));
    }

    #[test]
    fn idle_workers_mean_a_stuck_data_plane() {
        let t = Tracker::new();
        let mut r = report("a", 1);
        r.worker_idle_ms = Some(5000);
        t.report(r);
        assert!(matches!(t.current().state, Liveness::Down(ref why) if why.contains("worker")));
        let mut r = report("a", 2);
        r.worker_idle_ms = Some(300);
        t.report(r);
        assert!(t.current().is_alive());
    }
}
