//! The WorkloadGroup's readiness probe: who runs it, and how it reads to people.
//!
//! A plain-HTTP `httpGet` to an IP runs in the filter, through Envoy ([`ProbePlan::Filter`]):
//! a probe that passes proves the application answers *and* Envoy can reach it. What Wasm
//! cannot do (`exec`, `tcpSocket`, `grpc`, `httpGet` over HTTPS or to a host name) runs in
//! the shim ([`ProbePlan::Shim`]). The registration response carries the probe with Istio's
//! defaults filled in by the control plane; the host defaults to the VM's loopback, as Istio's
//! agent probes `localhost`.

use std::time::Duration;

use vmesh_api::agent::{ProbeKind, ProbeTask};
use vmesh_api::probe::ReadinessProbe;

/// Where the probe runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ProbePlan {
    /// The group has no probe: no health is reported (as in Istio, the entry has no
    /// `Healthy` condition).
    #[default]
    None,
    /// The filter runs it through Envoy.
    Filter(ProbeTask),
    /// The shim runs it.
    Shim { id: u64, probe: ReadinessProbe },
}

/// Where a probe without a host connects.
pub const DEFAULT_HOST: &str = "127.0.0.1";

fn secs(s: i32, at_least: u64) -> u64 {
    u64::try_from(s).unwrap_or(0).max(at_least) * 1000
}

fn threshold(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(1).max(1)
}

impl ProbePlan {
    /// The plan for `probe` (with Istio's defaults applied), numbered `id`.
    pub fn of(probe: Option<&ReadinessProbe>, id: u64) -> ProbePlan {
        let Some(p) = probe else {
            return ProbePlan::None;
        };
        if let Some(h) = &p.http_get {
            let host = if h.host.is_empty() || h.host == "localhost" {
                DEFAULT_HOST.to_string()
            } else {
                h.host.clone()
            };
            let plain = h.scheme.is_empty() || h.scheme.eq_ignore_ascii_case("http");
            let port = u16::try_from(h.port).ok().filter(|p| *p != 0);
            if let (true, true, Some(port)) =
                (plain, host.parse::<std::net::IpAddr>().is_ok(), port)
            {
                return ProbePlan::Filter(ProbeTask {
                    id,
                    kind: ProbeKind::HttpGet,
                    host,
                    port,
                    path: if h.path.is_empty() {
                        "/".into()
                    } else {
                        h.path.clone()
                    },
                    headers: h
                        .http_headers
                        .iter()
                        .map(|hh| (hh.name.clone(), hh.value.clone()))
                        .collect(),
                    initial_delay_ms: secs(p.initial_delay_seconds, 0),
                    period_ms: secs(p.period_seconds, 1),
                    timeout_ms: secs(p.timeout_seconds, 1),
                    success_threshold: threshold(p.success_threshold),
                    failure_threshold: threshold(p.failure_threshold),
                });
            }
        }
        ProbePlan::Shim {
            id,
            probe: p.clone(),
        }
    }

    pub fn id(&self) -> Option<u64> {
        match self {
            ProbePlan::None => None,
            ProbePlan::Filter(t) => Some(t.id),
            ProbePlan::Shim { id, .. } => Some(*id),
        }
    }

    /// The same plan ignoring its number.
    pub fn same_probe(&self, other: &ProbePlan) -> bool {
        match (self, other) {
            (ProbePlan::None, ProbePlan::None) => true,
            (ProbePlan::Filter(a), ProbePlan::Filter(b)) => {
                ProbeTask { id: 0, ..a.clone() } == ProbeTask { id: 0, ..b.clone() }
            }
            (ProbePlan::Shim { probe: a, .. }, ProbePlan::Shim { probe: b, .. }) => a == b,
            _ => false,
        }
    }

    /// The probe as people read it, for `status`.
    pub fn describe(&self) -> Option<String> {
        match self {
            ProbePlan::None => None,
            ProbePlan::Filter(t) => Some(format!(
                "httpGet http://{}:{}{} every {}, by Envoy",
                t.host,
                t.port,
                t.path,
                human(Duration::from_millis(t.period_ms))
            )),
            ProbePlan::Shim { probe, .. } => {
                let what = if let Some(h) = &probe.http_get {
                    let host = if h.host.is_empty() {
                        "localhost"
                    } else {
                        &h.host
                    };
                    let scheme = if h.scheme.is_empty() {
                        "http"
                    } else {
                        &h.scheme
                    };
                    format!(
                        "httpGet {}://{host}:{}{}",
                        scheme.to_ascii_lowercase(),
                        h.port,
                        h.path
                    )
                } else if let Some(t) = &probe.tcp_socket {
                    let host = if t.host.is_empty() {
                        "localhost"
                    } else {
                        &t.host
                    };
                    format!("tcpSocket {host}:{}", t.port)
                } else if let Some(e) = &probe.exec {
                    format!("exec {:?}", e.command)
                } else if let Some(g) = &probe.grpc {
                    format!("grpc port {} service {:?}", g.port, g.service)
                } else {
                    "no method".to_string()
                };
                let period = u64::try_from(probe.period_seconds).unwrap_or(10).max(1);
                Some(format!(
                    "{what} every {}, by the shim",
                    human(Duration::from_secs(period))
                ))
            }
        }
    }
}

fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmesh_api::probe::{ExecHealthCheck, HttpHeader, HttpHealthCheck};

    fn http(scheme: &str, host: &str) -> ReadinessProbe {
        ReadinessProbe {
            initial_delay_seconds: 2,
            timeout_seconds: 1,
            period_seconds: 5,
            success_threshold: 1,
            failure_threshold: 3,
            http_get: Some(HttpHealthCheck {
                path: "/ready".into(),
                port: 8080,
                host: host.into(),
                scheme: scheme.into(),
                http_headers: vec![HttpHeader {
                    name: "x-probe".into(),
                    value: "1".into(),
                }],
            }),
            ..ReadinessProbe::default()
        }
    }

    #[test]
    fn plain_http_to_an_ip_runs_in_envoy_the_rest_in_the_shim() {
        let ProbePlan::Filter(t) = ProbePlan::of(Some(&http("HTTP", "")), 7) else {
            panic!("expected a filter probe");
        };
        assert_eq!(
            (t.id, t.host.as_str(), t.port, t.path.as_str()),
            (7, "127.0.0.1", 8080, "/ready")
        );
        assert_eq!(
            (t.initial_delay_ms, t.period_ms, t.timeout_ms),
            (2000, 5000, 1000)
        );
        assert_eq!((t.success_threshold, t.failure_threshold), (1, 3));
        assert_eq!(t.headers, vec![("x-probe".to_string(), "1".to_string())]);
        assert!(matches!(
            ProbePlan::of(Some(&http("http", "localhost")), 1),
            ProbePlan::Filter(ref t) if t.host == "127.0.0.1"
        ));
        assert!(matches!(
            ProbePlan::of(Some(&http("HTTP", "10.0.0.7")), 1),
            ProbePlan::Filter(_)
        ));
        for shim in [http("HTTPS", ""), http("HTTP", "app.internal")] {
            assert!(matches!(
                ProbePlan::of(Some(&shim), 1),
                ProbePlan::Shim { .. }
            ));
        }
        let exec = ReadinessProbe {
            exec: Some(ExecHealthCheck {
                command: vec!["true".into()],
            }),
            ..ReadinessProbe::default()
        };
        assert!(matches!(
            ProbePlan::of(Some(&exec), 1),
            ProbePlan::Shim { .. }
        ));
        assert_eq!(ProbePlan::of(None, 1), ProbePlan::None);
    }

    #[test]
    fn plans_compare_without_their_numbers_and_describe_themselves() {
        let a = ProbePlan::of(Some(&http("HTTP", "")), 1);
        let b = ProbePlan::of(Some(&http("HTTP", "")), 2);
        assert!(a.same_probe(&b));
        assert!(!a.same_probe(&ProbePlan::None));
        assert_eq!(
            a.describe().unwrap(),
            "httpGet http://127.0.0.1:8080/ready every 5s, by Envoy"
        );
    }
}
