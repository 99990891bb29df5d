//! The agent's httpGet probe, sent through Envoy: a GET on `probe_cluster`, an ORIGINAL_DST
//! cluster that takes the destination from the `x-envoy-original-dst-host` header
//! (`original_dst_lb_config.use_http_header`). Schedule, thresholds and the meaning of an
//! answer are `vmesh_core::probe`'s; this moves the request and the answer.

use std::time::Duration;

use proxy_wasm::hostcalls;
use vmesh_api::agent::{ProbeResult, ProbeTask};
use vmesh_core::probe::{duration, http_outcome, Outcome, Prober};

use crate::callout;
use crate::config::Config;

/// The header Envoy's ORIGINAL_DST load balancer reads the destination from.
const DESTINATION: &str = "x-envoy-original-dst-host";
const USER_AGENT: &str = concat!("vmesh-probe/", env!("CARGO_PKG_VERSION"));
/// Envoy's own failure replies are short; the application's body is not needed.
const BODY_READ: usize = 512;

pub struct ProbeRunner {
    config: Config,
    prober: Option<Prober>,
    in_flight: Option<u32>,
}

impl ProbeRunner {
    pub fn new(config: Config) -> Self {
        ProbeRunner {
            config,
            prober: None,
            in_flight: None,
        }
    }

    pub fn owns(&self, token: u32) -> bool {
        self.in_flight == Some(token)
    }

    pub fn result(&self) -> Option<ProbeResult> {
        self.prober.as_ref().map(Prober::result)
    }

    /// The task the shim's latest reply names. Another id starts over (a probe in flight for
    /// the old task is then ignored); the same id keeps the state.
    pub fn take(&mut self, task: Option<ProbeTask>, now: u64) {
        match (task, &self.prober) {
            (None, None) => {}
            (Some(t), Some(p)) if t.id == p.task().id => {}
            (None, Some(p)) => {
                log::info!("probe {} stopped: the shim named none", p.task().id);
                self.prober = None;
                self.in_flight = None;
            }
            (Some(t), _) => {
                let p = Prober::new(t, now);
                let t = p.task();
                log::info!(
                    "probe {}: GET {}{} every {} (timeout {}) after {}",
                    t.id,
                    destination(t),
                    t.path,
                    duration(t.period_ms),
                    duration(t.timeout_ms),
                    duration(t.initial_delay_ms)
                );
                self.prober = Some(p);
                self.in_flight = None;
            }
        }
    }

    pub fn on_tick(&mut self, now: u64) {
        let Some(p) = &mut self.prober else {
            return;
        };
        if !p.start(now) {
            return;
        }
        match send(&self.config, p.task()) {
            Ok(token) => self.in_flight = Some(token),
            Err(why) => self.finish(Outcome::failure(why)),
        }
    }

    pub fn on_response(&mut self, token: u32, headers: usize, body_size: usize) {
        if self.in_flight != Some(token) {
            return;
        }
        self.in_flight = None;
        let Some(timeout) = self.prober.as_ref().map(|p| p.task().timeout_ms) else {
            return;
        };
        let reply = callout::response_head(headers, body_size, BODY_READ);
        self.finish(http_outcome(reply.status, &reply.body, timeout));
    }

    fn finish(&mut self, outcome: Outcome) {
        let Some(p) = &mut self.prober else {
            return;
        };
        let was = p.is_healthy();
        p.finish(outcome);
        let r = p.result();
        if r.healthy != was {
            let verdict = if r.healthy { "healthy" } else { "unhealthy" };
            log::info!("probe {}: {verdict} ({})", r.id, r.message);
        }
    }
}

/// `HOST:PORT` (`[HOST]:PORT` for IPv6), as the ORIGINAL_DST header wants it.
fn destination(t: &ProbeTask) -> String {
    if t.host.contains(':') {
        format!("[{}]:{}", t.host, t.port)
    } else {
        format!("{}:{}", t.host, t.port)
    }
}

/// Dispatches the GET. The task's headers go along (names lower-cased); a `host` header
/// becomes the `:authority` (Kubernetes lets a probe set Host); pseudo-headers and the
/// destination header cannot be overridden.
fn send(config: &Config, t: &ProbeTask) -> Result<u32, String> {
    let target = destination(t);
    let path = if t.path.is_empty() { "/" } else { &t.path };
    let extra: Vec<(String, &str)> = t
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .filter(|(k, _)| !k.starts_with(':') && k != DESTINATION)
        .collect();
    let authority = extra
        .iter()
        .find(|(k, _)| k == "host")
        .map_or(target.as_str(), |(_, v)| v);
    let mut headers = vec![
        (":method", "GET"),
        (":path", path),
        (":authority", authority),
        (DESTINATION, target.as_str()),
    ];
    if !extra.iter().any(|(k, _)| k == "user-agent") {
        headers.push(("user-agent", USER_AGENT));
    }
    headers.extend(
        extra
            .iter()
            .filter(|(k, _)| k != "host")
            .map(|(k, v)| (k.as_str(), *v)),
    );
    hostcalls::dispatch_http_call(
        &config.probe_cluster,
        headers,
        None,
        vec![],
        Duration::from_millis(t.timeout_ms),
    )
    .map_err(|e| {
        format!(
            "probe not sent through cluster {}: {e:?}",
            config.probe_cluster
        )
    })
}
