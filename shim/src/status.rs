//! What the shim knows, for operators: the [`Board`] every part of the shim writes to, served
//! as JSON at `/v1/status`, and `vmesh-shim status`, which asks a running shim and prints it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde::{Deserialize, Serialize};
use vmesh_api::agent::RegistrationState;
use vmesh_api::control::EntryRef;
use vmesh_api::paths::shim as path;

use crate::cli::StatusArgs;
use crate::dataplane::{DataPlane, Liveness};

/// What `/v1/status` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// `controlPlane`, `static` (a names file) or `forwarder` (no table source).
    pub mode: String,
    pub registration: Registration,
    pub health: Health,
    pub data_plane: DataPlaneStatus,
    pub name_table: TableStatus,
    /// The VM's workload certificate (control-plane mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// `missing`, `valid`, `renewing` (past half-life, not renewed yet) or `expired`.
    pub state: String,
    /// Where Envoy reads it.
    pub dir: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after_unix: Option<u64>,
    /// When the shim renews it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_at: Option<String>,
    /// Certificates installed, and failed attempts, since the shim started.
    pub issued: u64,
    pub failures: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_seconds_ago: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    pub state: RegistrationState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_entry: Option<EntryRef>,
    /// `address (server name)` of the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<String>,
    /// Seconds since the control plane last answered anything (an error included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_contact_seconds_ago: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_seconds_ago: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// The health last decided (`None`: nothing to report, e.g. the group has no probe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    /// Why.
    pub message: String,
    /// Whether the control plane has acknowledged it.
    pub acknowledged: bool,
    /// The probe, as people read it (`httpGet http://127.0.0.1:8080/ready every 5s, by Envoy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataPlaneStatus {
    /// `unknown`, `notReady`, `alive` or `down`.
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub why: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report_seconds_ago: Option<f64>,
    pub reports: u64,
    pub counters: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TableStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `controlPlane`, `cache` (the copy on disk, control plane not reached yet), `file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_seconds: Option<f64>,
    pub names: usize,
}

/// Where the shim's parts record what they know.
#[derive(Debug)]
pub struct Board {
    mode: &'static str,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The control plane address in use (the first configured until one answers).
    control_plane: Option<String>,
    state: RegistrationState,
    entry: Option<EntryRef>,
    last_contact: Option<SystemTime>,
    last_error: Option<(String, SystemTime)>,
    healthy: Option<bool>,
    health_message: String,
    acknowledged: bool,
    probe: Option<String>,
    table: Option<(String, &'static str, SystemTime, usize)>,
    certificate: Option<crate::cert::Facts>,
    /// Envoy's own counters the shim reads from its admin endpoint (see [`crate::envoy_stats`]),
    /// shown beside the filter's.
    envoy_counters: BTreeMap<String, u64>,
}

fn ago(t: SystemTime) -> f64 {
    let secs = SystemTime::now()
        .duration_since(t)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64();
    (secs * 10.0).round() / 10.0
}

impl Board {
    /// `mode` as [`Status::mode`] spells it; `control_plane` describes where it is, if any.
    pub fn new(mode: &'static str, control_plane: Option<String>) -> Self {
        let state = if control_plane.is_some() {
            RegistrationState::Waiting
        } else {
            RegistrationState::Standalone
        };
        Board {
            mode,
            inner: Mutex::new(Inner {
                control_plane,
                state,
                ..Inner::default()
            }),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn registration_state(&self) -> RegistrationState {
        self.inner().state
    }

    pub fn workload_entry(&self) -> Option<EntryRef> {
        self.inner().entry.clone()
    }

    pub fn set_state(&self, state: RegistrationState, entry: Option<EntryRef>) {
        let mut i = self.inner();
        i.state = state;
        if entry.is_some() || state == RegistrationState::Waiting {
            i.entry = entry;
        }
    }

    /// The control plane answered (anything, errors included).
    pub fn contact(&self) {
        self.inner().last_contact = Some(SystemTime::now());
    }

    /// The shim connected to the control plane at `at` (`address (name)`): the one in use.
    pub fn control_plane(&self, at: String) {
        self.inner().control_plane = Some(at);
    }

    pub fn error(&self, message: String) {
        self.inner().last_error = Some((message, SystemTime::now()));
    }

    pub fn health(&self, healthy: Option<bool>, message: &str, acknowledged: bool) {
        let mut i = self.inner();
        i.healthy = healthy;
        i.health_message = message.to_string();
        i.acknowledged = acknowledged;
    }

    pub fn probe(&self, description: Option<String>) {
        self.inner().probe = description;
    }

    pub fn table(&self, version: &str, source: &'static str, names: usize) {
        self.inner().table = Some((version.to_string(), source, SystemTime::now(), names));
    }

    /// Updates what the certificate keeper shows.
    pub fn certificate(&self, f: impl FnOnce(&mut crate::cert::Facts)) {
        let mut i = self.inner();
        f(i.certificate.get_or_insert_with(Default::default));
    }

    pub fn envoy_counters(&self, counters: BTreeMap<String, u64>) {
        self.inner().envoy_counters = counters;
    }

    pub fn snapshot(&self, data_plane: &DataPlane) -> Status {
        let i = self.inner();
        let (state, why) = match &data_plane.state {
            Liveness::Unknown => ("unknown", String::new()),
            Liveness::NotReady => ("notReady", "Envoy is not serving yet".to_string()),
            Liveness::Alive => ("alive", String::new()),
            Liveness::Down(why) => ("down", why.clone()),
        };
        Status {
            mode: self.mode.to_string(),
            registration: Registration {
                state: i.state,
                workload_entry: i.entry.clone(),
                control_plane: i.control_plane.clone(),
                last_contact_seconds_ago: i.last_contact.map(ago),
                last_error: i.last_error.as_ref().map(|(m, _)| m.clone()),
                last_error_seconds_ago: i.last_error.as_ref().map(|(_, t)| ago(*t)),
            },
            health: Health {
                healthy: i.healthy,
                message: i.health_message.clone(),
                acknowledged: i.acknowledged,
                probe: i.probe.clone(),
            },
            data_plane: DataPlaneStatus {
                state: state.to_string(),
                why,
                boot: data_plane.boot.clone(),
                last_report_seconds_ago: data_plane
                    .last_report
                    .map(|t| (t.elapsed().as_secs_f64() * 10.0).round() / 10.0),
                reports: data_plane.reports,
                counters: data_plane
                    .counters
                    .iter()
                    .chain(&i.envoy_counters)
                    .map(|(k, v)| (k.clone(), *v))
                    .collect(),
            },
            name_table: TableStatus {
                version: i.table.as_ref().map(|t| t.0.clone()),
                source: i.table.as_ref().map(|t| t.1.to_string()),
                age_seconds: i.table.as_ref().map(|t| ago(t.2)),
                names: i.table.as_ref().map_or(0, |t| t.3),
            },
            certificate: i.certificate.as_ref().map(certificate_status),
        }
    }
}

fn certificate_status(f: &crate::cert::Facts) -> CertificateStatus {
    use crate::cert::{nanos, policy};
    let held = match (f.not_before, f.not_after) {
        (Some(not_before), Some(not_after)) => Some(policy::Held {
            not_before,
            not_after,
            uris: Vec::new(),
            root_der: Vec::new(),
        }),
        _ => None,
    };
    let rfc = |t: SystemTime| vmesh_api::time::format_rfc3339_secs(nanos(t));
    CertificateStatus {
        state: policy::state(SystemTime::now(), held.as_ref())
            .as_str()
            .to_string(),
        dir: f.dir.clone(),
        spiffe_id: f.spiffe_id.clone(),
        serial: f.serial.clone(),
        not_after: f.not_after.map(rfc),
        not_after_unix: f.not_after.map(|t| nanos(t) / 1_000_000_000),
        rotate_at: held
            .as_ref()
            .map(|h| rfc(policy::rotate_at(h.not_before, h.not_after))),
        issued: f.issued,
        failures: f.failures,
        last_error: f.last_error.as_ref().map(|(m, _)| m.clone()),
        last_error_seconds_ago: f.last_error.as_ref().map(|(_, t)| ago(*t)),
    }
}

/// `vmesh-shim status` failures.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("--listen {0:?}: not an IP:PORT")]
    Listen(String),
    #[error("cannot reach the shim at {addr}: {reason} (is it running?)")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("the shim at {addr} answered {status}: {body}")]
    Refused {
        addr: SocketAddr,
        status: u16,
        body: String,
    },
    #[error("the shim's status is not what this version reads: {0}")]
    Decode(String),
}

/// Asks the shim at `args.listen` and prints its status.
pub fn print(args: &StatusArgs) -> Result<(), StatusError> {
    let addr = crate::upstream::parse_socket_addr(&args.listen)
        .map_err(|_| StatusError::Listen(args.listen.clone()))?;
    let body = fetch(addr)?;
    if args.json {
        println!("{}", String::from_utf8_lossy(&body).trim_end());
        return Ok(());
    }
    let status: Status =
        serde_json::from_slice(&body).map_err(|e| StatusError::Decode(e.to_string()))?;
    print!("{}", render(&status));
    Ok(())
}

fn fetch(addr: SocketAddr) -> Result<Bytes, StatusError> {
    let unreachable = |reason: String| StatusError::Unreachable { addr, reason };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| unreachable(e.to_string()))?;
    runtime.block_on(async {
        let call = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
            tokio::spawn(conn);
            let req = hyper::Request::get(path::STATUS)
                .header(hyper::header::HOST, "vmesh-shim")
                .body(Empty::<Bytes>::new())
                .map_err(|e| unreachable(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            if status != 200 {
                return Err(StatusError::Refused {
                    addr,
                    status,
                    body: String::from_utf8_lossy(&body).trim().to_string(),
                });
            }
            Ok(body)
        };
        tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .unwrap_or_else(|_| Err(unreachable("no answer within 5s".into())))
    })
}

fn seconds(s: Option<f64>) -> String {
    s.map_or_else(|| "never".to_string(), |s| format!("{s:.1}s ago"))
}

/// The status as people read it.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let r = &s.registration;
    let _ = writeln!(out, "mode:            {}", s.mode);
    let _ = writeln!(out, "registration:    {}", r.state.as_str());
    if let Some(e) = &r.workload_entry {
        let _ = writeln!(out, "workload entry:  {e}");
    }
    if let Some(cp) = &r.control_plane {
        let _ = writeln!(out, "control plane:   {cp}");
        let _ = writeln!(
            out,
            "last contact:    {}",
            seconds(r.last_contact_seconds_ago)
        );
    }
    if let Some(e) = &r.last_error {
        let _ = writeln!(
            out,
            "last error:      {e} ({})",
            seconds(r.last_error_seconds_ago)
        );
    }
    let h = &s.health;
    let verdict = match h.healthy {
        Some(true) => "healthy",
        Some(false) => "unhealthy",
        None => "not reported",
    };
    let ack = if h.healthy.is_some() && !h.acknowledged {
        " (not yet acknowledged)"
    } else {
        ""
    };
    let _ = writeln!(out, "health:          {verdict}{ack}: {}", h.message);
    if let Some(p) = &h.probe {
        let _ = writeln!(out, "probe:           {p}");
    }
    let d = &s.data_plane;
    let why = if d.why.is_empty() {
        String::new()
    } else {
        format!(": {}", d.why)
    };
    let _ = writeln!(
        out,
        "data plane:      {}{why} (last report {})",
        d.state,
        seconds(d.last_report_seconds_ago)
    );
    if !d.counters.is_empty() {
        let counters: Vec<String> = d.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "counters:        {}", counters.join(" "));
    }
    if let Some(c) = &s.certificate {
        let _ = writeln!(
            out,
            "certificate:     {} {} serial {} (expires {}, renews {}) in {}",
            c.state,
            c.spiffe_id.as_deref().unwrap_or("-"),
            c.serial.as_deref().unwrap_or("-"),
            c.not_after.as_deref().unwrap_or("-"),
            c.rotate_at.as_deref().unwrap_or("-"),
            c.dir
        );
        if c.state == "expired" || c.state == "missing" {
            let _ = writeln!(
                out,
                "                 ERROR: the VM has no valid certificate: mesh peers refuse its mTLS"
            );
        }
        if let Some(e) = &c.last_error {
            let _ = writeln!(
                out,
                "certificate error: {e} ({})",
                seconds(c.last_error_seconds_ago)
            );
        }
    }
    let t = &s.name_table;
    match &t.version {
        Some(v) => {
            let _ = writeln!(
                out,
                "name table:      {v} from {}, {} names, {}",
                t.source.as_deref().unwrap_or("?"),
                t.names,
                t.age_seconds
                    .map_or_else(String::new, |a| format!("updated {a:.1}s ago"))
            );
        }
        None => {
            let _ = writeln!(out, "name table:      none yet");
        }
    }
    out
}
