//! The filter's agent and the shim: `POST /v1/agent/report`.
//!
//! The agent (the filter's bootstrap singleton inside Envoy) reports to the shim on a period.
//! Each report is the data plane's proof of life: the shim registers the VM with the control
//! plane once a report says Envoy is ready, keeps heartbeating while reports arrive, and
//! reports the VM unhealthy and stops heartbeating when they stop (Envoy killed or hung).
//! The reply tells the agent the registration state and which probe, if any, it runs through
//! Envoy; the next report carries the probe's result.
//!
//! Both sides share these types. The shim (native) reads and writes them with serde; the
//! filter, which cannot afford serde_json, uses [`AgentReport::to_json`] and
//! [`AgentReply::from_json`]. Tests check the two agree.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::control::EntryRef;
use crate::json::{JsonError, JsonErrorKind, Reader, Writer};

/// Names of the data-path counters a report carries (cumulative since Envoy started).
pub mod counter {
    /// DNS queries received (UDP, TCP, DoH), malformed ones included.
    pub const DNS_QUERIES: &str = "dnsQueries";
    /// Answered from the name table.
    pub const DNS_ANSWERED: &str = "dnsAnswered";
    /// Sent to the shim's forwarder.
    pub const DNS_FORWARDED: &str = "dnsForwarded";
    /// Answered with an error code by the filter (FORMERR, NOTIMP, REFUSED, SERVFAIL for
    /// a failed forward or no table yet, BADVERS), or dropped.
    pub const DNS_ERRORS: &str = "dnsErrors";
    /// Connections the outbound listener took (mesh services and pass-through alike).
    pub const OUTBOUND_CONNECTIONS: &str = "outboundConnections";
    /// Outbound connections that never reached an upstream: connect failure (refused, timed
    /// out, a TLS handshake or SAN check that failed), or a service with no reachable endpoint.
    pub const OUTBOUND_FAILURES: &str = "outboundFailures";
}

/// The body of `POST /v1/agent/report`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    /// Identifies one run of Envoy (picked by the agent when it starts): a new value means
    /// Envoy restarted.
    pub boot: String,
    /// Counts this boot's reports from 1; the shim ignores one older than the newest it saw.
    pub seq: u64,
    /// How often the agent reports, in milliseconds. The shim calls the data plane dead when
    /// no report came for one and a half periods.
    pub period_ms: u64,
    /// Envoy is serving: its admin `/ready` said `LIVE` (listeners are up).
    pub ready: bool,
    /// Milliseconds since a worker thread last showed life (its periodic table check), as the
    /// agent read it; absent until a worker has ticked. A main thread that reports while every
    /// worker is stuck is not a working data plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_idle_ms: Option<u64>,
    /// Data-path counters by name ([`counter`]); names this side does not know are kept.
    #[serde(default)]
    pub counters: Counters,
    /// The result of the probe the shim gave the agent to run, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeResult>,
}

/// A report's counters: name -> cumulative count, in name order; in JSON an object.
///
/// A sorted list rather than a `BTreeMap`: the filter builds one per report, and a map's code
/// would cost its `.wasm` (budgeted at 250 KB) about 5 KB.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counters(Vec<(String, u64)>);

impl Counters {
    pub fn new() -> Self {
        Counters(Vec::new())
    }

    /// Sets a counter (adding it in name order if new).
    pub fn set(&mut self, name: &str, value: u64) {
        match self.0.binary_search_by(|(k, _)| k.as_str().cmp(name)) {
            Ok(i) => {
                if let Some(slot) = self.0.get_mut(i) {
                    slot.1 = value;
                }
            }
            Err(i) => self.0.insert(i, (name.to_string(), value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// (name, value), in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<S: AsRef<str>> FromIterator<(S, u64)> for Counters {
    fn from_iter<I: IntoIterator<Item = (S, u64)>>(iter: I) -> Self {
        let mut c = Counters::new();
        for (name, value) in iter {
            c.set(name.as_ref(), value);
        }
        c
    }
}

impl Serialize for Counters {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Counters {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, u64>::deserialize(deserializer)
            .map(|m| Counters(m.into_iter().collect()))
    }
}

/// A probe's current verdict, after its success and failure thresholds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResult {
    /// The [`ProbeTask::id`] this result is for (a result for an older task is ignored).
    pub id: u64,
    pub healthy: bool,
    /// Why, for people: `HTTP 200`, `HTTP 503`, `connection refused`, `timeout after 1s`.
    pub message: String,
}

/// The shim's registration state, as the agent and `vmesh-shim status` see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RegistrationState {
    /// Waiting for Envoy to be ready before registering.
    #[default]
    Waiting,
    /// Asking the control plane (or retrying after a transient failure).
    Registering,
    /// A WorkloadEntry exists and is kept alive.
    Registered,
    /// The control plane refused (401/403/404/409): waiting for something to change.
    Refused,
    /// The data plane stopped reporting: reported unhealthy, heartbeats stopped.
    DataPlaneDown,
    /// Shutting down: deregistering.
    Deregistering,
    /// No control plane configured (static names file): nothing to register with.
    Standalone,
}

impl RegistrationState {
    pub fn as_str(self) -> &'static str {
        match self {
            RegistrationState::Waiting => "waiting",
            RegistrationState::Registering => "registering",
            RegistrationState::Registered => "registered",
            RegistrationState::Refused => "refused",
            RegistrationState::DataPlaneDown => "dataPlaneDown",
            RegistrationState::Deregistering => "deregistering",
            RegistrationState::Standalone => "standalone",
        }
    }

    fn from_str(s: &str) -> Option<Self> {
        Some(match s {
            "waiting" => RegistrationState::Waiting,
            "registering" => RegistrationState::Registering,
            "registered" => RegistrationState::Registered,
            "refused" => RegistrationState::Refused,
            "dataPlaneDown" => RegistrationState::DataPlaneDown,
            "deregistering" => RegistrationState::Deregistering,
            "standalone" => RegistrationState::Standalone,
            _ => return None,
        })
    }
}

/// A probe for the agent to run through Envoy, with every default already applied by the
/// shim (the agent interprets nothing of Istio's probe).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeTask {
    /// Changes whenever the probe changes.
    pub id: u64,
    pub kind: ProbeKind,
    /// IP to connect to (the probe's `host`, or the VM's loopback).
    pub host: String,
    pub port: u16,
    /// `httpGet`: the request path (with query), and extra request headers.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    pub initial_delay_ms: u64,
    pub period_ms: u64,
    pub timeout_ms: u64,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProbeKind {
    /// HTTP GET; healthy when the status is 200-399 (Kubernetes' rule).
    #[default]
    HttpGet,
}

/// The body of the shim's 200 answer to a report.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentReply {
    pub state: RegistrationState,
    /// The VM's WorkloadEntry, once registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_entry: Option<EntryRef>,
    /// The probe the agent runs; absent when there is none or the shim runs it itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeTask>,
}

impl AgentReport {
    /// The report as JSON, without serde (for the filter).
    pub fn to_json(&self) -> String {
        let mut w = Writer::new();
        w.string("boot", &self.boot)
            .u64("seq", self.seq)
            .u64("periodMs", self.period_ms)
            .bool("ready", self.ready);
        if let Some(idle) = self.worker_idle_ms {
            w.u64("workerIdleMs", idle);
        }
        w.begin("counters");
        for (name, value) in self.counters.iter() {
            w.u64(name, value);
        }
        w.end();
        if let Some(p) = &self.probe {
            w.begin("probe")
                .u64("id", p.id)
                .bool("healthy", p.healthy)
                .string("message", &p.message)
                .end();
        }
        w.finish()
    }
}

impl AgentReply {
    /// Reads a reply without serde (for the filter). Unknown fields are skipped, so a newer
    /// shim can add some; an unknown state or probe kind is an error.
    ///
    /// Written for size as much as for reading: this is linked into the filter, whose `.wasm`
    /// is budgeted, so errors are built in one place and strings copied by one helper.
    pub fn from_json(json: &[u8]) -> Result<AgentReply, JsonError> {
        let mut r = Reader::new(json);
        let mut reply = AgentReply::default();
        let mut state = None;
        r.begin_object()?;
        let mut first = true;
        while let Some(key) = r.next_key(&mut first)? {
            match key.as_ref() {
                "state" => {
                    let s = r.string()?;
                    state = Some(
                        RegistrationState::from_str(&s)
                            .ok_or_else(|| invalid(&r, "unknown state", &s))?,
                    );
                }
                "workloadEntry" => reply.workload_entry = optional(&mut r, entry)?,
                "probe" => reply.probe = optional(&mut r, task)?,
                _ => r.skip_value()?,
            }
        }
        r.end()?;
        match state {
            Some(state) => reply.state = state,
            None => return Err(r.error(JsonErrorKind::MissingField("state"))),
        }
        Ok(reply)
    }
}

/// `null` (or absent) is `None`.
fn optional<T>(
    r: &mut Reader<'_>,
    read: fn(&mut Reader<'_>) -> Result<T, JsonError>,
) -> Result<Option<T>, JsonError> {
    if r.null()? {
        return Ok(None);
    }
    read(r).map(Some)
}

fn invalid(r: &Reader<'_>, what: &str, value: &str) -> JsonError {
    r.error(JsonErrorKind::Invalid(format!("{what} {value:?}")))
}

fn text(r: &mut Reader<'_>) -> Result<String, JsonError> {
    r.string().map(Cow::into_owned)
}

fn entry(r: &mut Reader<'_>) -> Result<EntryRef, JsonError> {
    let mut e = EntryRef::default();
    r.begin_object()?;
    let mut first = true;
    while let Some(key) = r.next_key(&mut first)? {
        match key.as_ref() {
            "namespace" => e.namespace = text(r)?,
            "name" => e.name = text(r)?,
            _ => r.skip_value()?,
        }
    }
    Ok(e)
}

fn task(r: &mut Reader<'_>) -> Result<ProbeTask, JsonError> {
    let mut t = ProbeTask::default();
    r.begin_object()?;
    let mut first = true;
    while let Some(key) = r.next_key(&mut first)? {
        match key.as_ref() {
            "id" => t.id = r.u64()?,
            "kind" => {
                let k = r.string()?;
                if k != "httpGet" {
                    return Err(invalid(r, "unknown probe kind", &k));
                }
                t.kind = ProbeKind::HttpGet;
            }
            "host" => t.host = text(r)?,
            "port" => {
                let p = r.u64()?;
                t.port = match u16::try_from(p) {
                    Ok(p) if p != 0 => p,
                    _ => return Err(invalid(r, "port not 1-65535:", &p.to_string())),
                };
            }
            "path" => t.path = text(r)?,
            "headers" => {
                r.begin_array()?;
                let mut first = true;
                while r.next_element(&mut first)? {
                    r.begin_array()?;
                    let mut inner = true;
                    let mut pair: [String; 2] = Default::default();
                    let mut n = 0;
                    while r.next_element(&mut inner)? {
                        let s = text(r)?;
                        if let Some(slot) = pair.get_mut(n) {
                            *slot = s;
                        }
                        n += 1;
                    }
                    if n != 2 {
                        return Err(r.error(JsonErrorKind::Expected("a header as [name, value]")));
                    }
                    let [name, value] = pair;
                    t.headers.push((name, value));
                }
            }
            "initialDelayMs" => t.initial_delay_ms = r.u64()?,
            "periodMs" => t.period_ms = r.u64()?,
            "timeoutMs" => t.timeout_ms = r.u64()?,
            "successThreshold" => t.success_threshold = small(r)?,
            "failureThreshold" => t.failure_threshold = small(r)?,
            _ => r.skip_value()?,
        }
    }
    if t.port == 0 {
        return Err(r.error(JsonErrorKind::MissingField("port")));
    }
    Ok(t)
}

fn small(r: &mut Reader<'_>) -> Result<u32, JsonError> {
    let v = r.u64()?;
    u32::try_from(v).map_err(|_| r.error(JsonErrorKind::BadInteger))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> AgentReport {
        AgentReport {
            boot: "18f3a9c2-1".into(),
            seq: 42,
            period_ms: 1000,
            ready: true,
            worker_idle_ms: Some(120),
            counters: [(counter::DNS_QUERIES, 10), (counter::DNS_ANSWERED, 7)]
                .into_iter()
                .collect(),
            probe: Some(ProbeResult {
                id: 3,
                healthy: false,
                message: "HTTP 503 \"busy\"".into(),
            }),
        }
    }

    #[test]
    fn the_filters_report_encoding_is_what_serde_reads() {
        for r in [report(), AgentReport::default()] {
            let parsed: AgentReport = serde_json::from_str(&r.to_json()).unwrap();
            assert_eq!(parsed, r);
        }
    }

    #[test]
    fn counters_are_a_json_object_in_name_order_whatever_the_insertion_order() {
        let mut c = Counters::new();
        c.set("b", 2);
        c.set("a", 1);
        c.set("c", 3);
        c.set("b", 20);
        assert_eq!(
            c.iter().collect::<Vec<_>>(),
            [("a", 1), ("b", 20), ("c", 3)]
        );
        assert_eq!((c.get("b"), c.get("z"), c.len()), (Some(20), None, 3));
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, r#"{"a":1,"b":20,"c":3}"#);
        let back: Counters = serde_json::from_str(r#"{"c":3,"a":1,"b":20}"#).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn the_filters_reply_decoding_agrees_with_serde() {
        let reply = AgentReply {
            state: RegistrationState::Registered,
            workload_entry: Some(EntryRef {
                namespace: "vm-namespace".into(),
                name: "python-http-10.0.0.5".into(),
            }),
            probe: Some(ProbeTask {
                id: 3,
                kind: ProbeKind::HttpGet,
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/ready?full=1".into(),
                headers: vec![("x-probe".into(), "vmesh".into())],
                initial_delay_ms: 1000,
                period_ms: 5000,
                timeout_ms: 1000,
                success_threshold: 1,
                failure_threshold: 3,
            }),
        };
        let json = serde_json::to_vec(&reply).unwrap();
        assert_eq!(AgentReply::from_json(&json).unwrap(), reply);
        for state in [
            RegistrationState::Waiting,
            RegistrationState::Registering,
            RegistrationState::Refused,
            RegistrationState::DataPlaneDown,
            RegistrationState::Deregistering,
            RegistrationState::Standalone,
        ] {
            let r = AgentReply {
                state,
                ..AgentReply::default()
            };
            let json = serde_json::to_vec(&r).unwrap();
            assert_eq!(AgentReply::from_json(&json).unwrap(), r, "{state:?}");
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::Value::String(state.as_str().into())
            );
        }
    }

    #[test]
    fn replies_from_a_newer_shim_skip_unknown_fields_but_not_unknown_meanings() {
        let newer =
            br#"{"state":"registered","extra":{"a":[1,2]},"workloadEntry":null,"probe":null}"#;
        assert_eq!(
            AgentReply::from_json(newer).unwrap().state,
            RegistrationState::Registered
        );
        for (bad, why) in [
            (&br#"{"state":"dancing"}"#[..], "unknown state"),
            (br#"{}"#, "missing field"),
            (
                br#"{"state":"waiting","probe":{"id":1,"kind":"exec","port":1}}"#,
                "unknown probe kind",
            ),
            (
                br#"{"state":"waiting","probe":{"id":1,"kind":"httpGet","port":70000}}"#,
                "not 1-65535",
            ),
            (
                br#"{"state":"waiting","probe":{"id":1,"kind":"httpGet"}}"#,
                "missing field",
            ),
            (
                br#"{"state":"waiting","probe":{"id":1,"port":1,"headers":[["a"]]}}"#,
                "[name, value]",
            ),
            (b"[", "expected an object"),
        ] {
            let err = AgentReply::from_json(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{}: {err}", String::from_utf8_lossy(bad));
        }
    }
}
