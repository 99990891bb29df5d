//! WorkloadEntry auto-registration semantics, as Istio's `autoregistration` controller has
//! them: the entry's name, labels, annotations and owner reference from a WorkloadGroup and a
//! connecting VM; connect / disconnect / grace-period cleanup with ownership by one
//! control-plane replica; and the `Healthy` condition, which never goes back in probe time.
//!
//! Times are nanoseconds since the Unix epoch, passed in by the caller.

use super::model::{
    Condition, HttpHealthCheck, Labels, ObjectMeta, OwnerReference, ReadinessProbe, Status,
    WorkloadEntry, WorkloadGroup,
};
use vmesh_api::time::{format_rfc3339_nanos, format_rfc3339_secs, parse_rfc3339};

pub const ANNOTATION_AUTO_REGISTRATION_GROUP: &str = "istio.io/autoRegistrationGroup";
pub const ANNOTATION_WORKLOAD_CONTROLLER: &str = "istio.io/workloadController";
pub const ANNOTATION_CONNECTED_AT: &str = "istio.io/connectedAt";
pub const ANNOTATION_DISCONNECTED_AT: &str = "istio.io/disconnectedAt";
/// Set on entries whose group has a probe: such an entry is unhealthy until a healthy report.
pub const ANNOTATION_HEALTH_CHECKS_ENABLED: &str = "proxy.istio.io/health-checks-enabled";
pub const CONDITION_HEALTHY: &str = "Healthy";
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// Kubernetes object names are at most this long.
pub const MAX_NAME_LEN: usize = 253;

/// What a VM says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Registration {
    pub group: String,
    pub namespace: String,
    pub address: String,
    pub network: String,
    pub locality: String,
    pub labels: Labels,
}

/// `group-IP[-network]`, ':' turned into '-', keeping the last 253 characters.
pub fn workload_entry_name(group: &str, address: &str, network: &str) -> String {
    let mut name = format!("{group}-{address}");
    if !network.is_empty() {
        name.push('-');
        name.push_str(network);
    }
    let name = name.replace(':', "-");
    match name.len().checked_sub(MAX_NAME_LEN) {
        Some(cut) if cut > 0 => name.get(cut..).unwrap_or_default().to_string(),
        _ => name,
    }
}

/// The service account a VM in this group must present: the template's, or `default`.
pub fn expected_service_account(group: &WorkloadGroup) -> &str {
    match group.spec.template.service_account.as_str() {
        "" => DEFAULT_SERVICE_ACCOUNT,
        sa => sa,
    }
}

/// Labels: the VM's over the group's metadata labels over the template's.
pub fn merge_labels(template: &Labels, group_meta: &Labels, vm: &Labels) -> Labels {
    let mut out = template.clone();
    out.extend(group_meta.iter().map(|(k, v)| (k.clone(), v.clone())));
    out.extend(vm.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

/// The entry a VM gets when it registers into `group`, connected to `controller` at `now`.
pub fn entry_from_group(
    group: &WorkloadGroup,
    reg: &Registration,
    controller: &str,
    now: u64,
) -> WorkloadEntry {
    let gmeta = group.spec.metadata.clone().unwrap_or_default();
    let mut spec = group.spec.template.clone();
    spec.address = reg.address.clone();
    spec.labels = merge_labels(&group.spec.template.labels, &gmeta.labels, &reg.labels);
    if !reg.network.is_empty() {
        spec.network = reg.network.clone();
    }
    if !reg.locality.is_empty() {
        spec.locality = reg.locality.clone();
    }
    let mut annotations = gmeta.annotations;
    annotations.insert(
        ANNOTATION_AUTO_REGISTRATION_GROUP.to_string(),
        group.metadata.name.clone(),
    );
    if group.spec.probe.is_some() {
        annotations.insert(
            ANNOTATION_HEALTH_CHECKS_ENABLED.to_string(),
            "true".to_string(),
        );
    }
    let mut entry = WorkloadEntry {
        api_version: "networking.istio.io/v1".to_string(),
        kind: "WorkloadEntry".to_string(),
        metadata: ObjectMeta {
            name: workload_entry_name(&group.metadata.name, &reg.address, &spec.network),
            namespace: group.metadata.namespace.clone(),
            annotations,
            owner_references: vec![OwnerReference {
                api_version: group.api_version.clone(),
                kind: "WorkloadGroup".to_string(),
                name: group.metadata.name.clone(),
                uid: group.metadata.uid.clone(),
                controller: Some(true),
                block_owner_deletion: None,
            }],
            creation_timestamp: format_rfc3339_secs(now),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    };
    connect(&mut entry, controller, now);
    entry
}

/// Marks the entry connected to `controller` at `now` (also a reconnect or a takeover).
pub fn connect(entry: &mut WorkloadEntry, controller: &str, now: u64) {
    let a = &mut entry.metadata.annotations;
    a.insert(
        ANNOTATION_CONNECTED_AT.to_string(),
        format_rfc3339_nanos(now),
    );
    a.insert(
        ANNOTATION_WORKLOAD_CONTROLLER.to_string(),
        controller.to_string(),
    );
    a.remove(ANNOTATION_DISCONNECTED_AT);
}

pub fn is_auto_registered(entry: &WorkloadEntry) -> bool {
    entry
        .metadata
        .annotations
        .contains_key(ANNOTATION_AUTO_REGISTRATION_GROUP)
}

pub fn controller_of(entry: &WorkloadEntry) -> Option<&str> {
    entry
        .metadata
        .annotations
        .get(ANNOTATION_WORKLOAD_CONTROLLER)
        .map(String::as_str)
}

pub fn connected_at(entry: &WorkloadEntry) -> Option<u64> {
    annotation_time(entry, ANNOTATION_CONNECTED_AT)
}

pub fn disconnected_at(entry: &WorkloadEntry) -> Option<u64> {
    annotation_time(entry, ANNOTATION_DISCONNECTED_AT)
}

fn annotation_time(entry: &WorkloadEntry, key: &str) -> Option<u64> {
    entry
        .metadata
        .annotations
        .get(key)
        .and_then(|t| parse_rfc3339(t))
}

/// Whether the connection `controller` made at `conn_time` still owns the entry. A VM that
/// reconnected elsewhere (or later) has moved the ownership on.
pub fn owned_by(entry: &WorkloadEntry, controller: &str, conn_time: u64) -> bool {
    controller_of(entry) == Some(controller) && connected_at(entry) == Some(conn_time)
}

/// The disconnect of the connection `controller` made at `conn_time`: sets `disconnectedAt`
/// and returns true, or returns false (and changes nothing) when the entry is no longer that
/// connection's: a reconnect to another replica took it, or the VM reconnected since.
pub fn disconnect(entry: &mut WorkloadEntry, controller: &str, conn_time: u64, now: u64) -> bool {
    if !is_auto_registered(entry) || !owned_by(entry, controller, conn_time) {
        return false;
    }
    mark_disconnected(entry, now);
    true
}

fn mark_disconnected(entry: &mut WorkloadEntry, now: u64) {
    let a = &mut entry.metadata.annotations;
    a.remove(ANNOTATION_CONNECTED_AT);
    a.insert(
        ANNOTATION_DISCONNECTED_AT.to_string(),
        format_rfc3339_nanos(now),
    );
}

/// What the periodic sweep should do with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// Leave it; look again at `recheck_at` if set.
    Keep { recheck_at: Option<u64> },
    /// Connected to a replica that is gone: mark it disconnected now (then the grace period runs).
    MarkDisconnected,
    /// Disconnected for longer than the grace period: delete it.
    Delete,
}

/// The sweep's decision for one entry. `controller_alive` says whether a replica still holds
/// its liveness lease.
pub fn sweep(
    entry: &WorkloadEntry,
    now: u64,
    grace_nanos: u64,
    controller_alive: impl Fn(&str) -> bool,
) -> Sweep {
    if !is_auto_registered(entry) {
        return Sweep::Keep { recheck_at: None };
    }
    if let Some(at) = disconnected_at(entry) {
        let due = at.saturating_add(grace_nanos);
        return if now >= due {
            Sweep::Delete
        } else {
            Sweep::Keep {
                recheck_at: Some(due),
            }
        };
    }
    match controller_of(entry) {
        Some(c) if controller_alive(c) => Sweep::Keep { recheck_at: None },
        // Connected to nobody we know of (or an entry without the annotations): stale.
        _ => Sweep::MarkDisconnected,
    }
}

/// Applies the sweep's `MarkDisconnected`.
pub fn mark_stale(entry: &mut WorkloadEntry, now: u64) {
    mark_disconnected(entry, now);
}

/// Whether the entry is an auto-registered member of the group `namespace/name`.
pub fn belongs_to_group(entry: &WorkloadEntry, namespace: &str, name: &str) -> bool {
    entry.metadata.namespace == namespace
        && entry
            .metadata
            .owner_references
            .iter()
            .any(|o| o.kind == "WorkloadGroup" && o.name == name)
}

/// The group's probe with Istio's defaults filled in: initial delay 0 s, timeout 1 s, period
/// 10 s, success and failure thresholds 1; httpGet path `/` and scheme `HTTP`.
pub fn probe_with_defaults(p: &ReadinessProbe) -> ReadinessProbe {
    let or = |v: i32, d: i32| if v > 0 { v } else { d };
    ReadinessProbe {
        initial_delay_seconds: p.initial_delay_seconds.max(0),
        timeout_seconds: or(p.timeout_seconds, 1),
        period_seconds: or(p.period_seconds, 10),
        success_threshold: or(p.success_threshold, 1),
        failure_threshold: or(p.failure_threshold, 1),
        http_get: p.http_get.as_ref().map(|h| HttpHealthCheck {
            path: if h.path.is_empty() {
                "/".into()
            } else {
                h.path.clone()
            },
            scheme: if h.scheme.is_empty() {
                "HTTP".into()
            } else {
                h.scheme.to_ascii_uppercase()
            },
            ..h.clone()
        }),
        ..p.clone()
    }
}

/// A probe result from a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    pub healthy: bool,
    pub message: String,
    /// When the probe ran (nanoseconds since the epoch).
    pub probe_time: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthOutcome {
    /// The condition changed (status, message or probe time).
    Applied,
    /// A report at or before the recorded probe time: ignored.
    Stale,
}

pub fn healthy_condition(entry: &WorkloadEntry) -> Option<&Condition> {
    entry
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION_HEALTHY))
}

/// Records a probe result unless an equal or newer one is already recorded.
pub fn apply_health(entry: &mut WorkloadEntry, report: &HealthReport) -> HealthOutcome {
    let status_str = if report.healthy { "True" } else { "False" };
    let prev = healthy_condition(entry).cloned();
    if let Some(prev) = &prev {
        if parse_rfc3339(&prev.last_probe_time).is_some_and(|t| t >= report.probe_time) {
            return HealthOutcome::Stale;
        }
    }
    let probe_time = format_rfc3339_nanos(report.probe_time);
    let transition = match &prev {
        Some(p) if p.status == status_str => p.last_transition_time.clone(),
        _ => probe_time.clone(),
    };
    let cond = Condition {
        type_: CONDITION_HEALTHY.to_string(),
        status: status_str.to_string(),
        last_probe_time: probe_time,
        last_transition_time: transition,
        reason: String::new(),
        message: report.message.clone(),
    };
    let status = entry.status.get_or_insert_with(Status::default);
    status.conditions.retain(|c| c.type_ != CONDITION_HEALTHY);
    status.conditions.push(cond);
    HealthOutcome::Applied
}

/// Whether the entry receives traffic: with health checks enabled only after a healthy
/// report; otherwise unless a report said unhealthy.
pub fn is_healthy(entry: &WorkloadEntry) -> bool {
    let checks = entry
        .metadata
        .annotations
        .get(ANNOTATION_HEALTH_CHECKS_ENABLED)
        .is_some_and(|v| v == "true");
    match healthy_condition(entry) {
        Some(c) => c.status == "True",
        None => !checks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{GroupMetadata, ReadinessProbe, WorkloadEntrySpec, WorkloadGroupSpec};

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * SEC;

    fn group(probe: bool) -> WorkloadGroup {
        WorkloadGroup {
            api_version: "networking.istio.io/v1".into(),
            kind: "WorkloadGroup".into(),
            metadata: ObjectMeta {
                name: "python-http".into(),
                namespace: "vm-namespace".into(),
                uid: "uid-1".into(),
                ..Default::default()
            },
            spec: WorkloadGroupSpec {
                metadata: Some(GroupMetadata {
                    labels: [
                        ("app".into(), "python-http".into()),
                        ("tier".into(), "group".into()),
                    ]
                    .into(),
                    annotations: [("team".into(), "a".into())].into(),
                }),
                template: WorkloadEntrySpec {
                    service_account: "vm-sa".into(),
                    network: "vm-network".into(),
                    labels: [("tier".into(), "template".into()), ("t".into(), "1".into())].into(),
                    ..Default::default()
                },
                probe: probe.then(ReadinessProbe::default),
            },
            status: None,
        }
    }

    fn reg(addr: &str, network: &str) -> Registration {
        Registration {
            group: "python-http".into(),
            namespace: "vm-namespace".into(),
            address: addr.into(),
            network: network.into(),
            locality: "us-east/1a".into(),
            labels: [("tier".into(), "vm".into())].into(),
        }
    }

    #[test]
    fn entry_names_follow_istio() {
        let long = "g".repeat(260);
        let cases = [
            (
                "python-http",
                "10.0.0.1",
                "",
                "python-http-10.0.0.1".to_string(),
            ),
            (
                "python-http",
                "10.0.0.1",
                "vm-net",
                "python-http-10.0.0.1-vm-net".to_string(),
            ),
            ("g", "fd00::1", "", "g-fd00--1".to_string()),
            (
                long.as_str(),
                "1.2.3.4",
                "",
                format!("{}-1.2.3.4", "g".repeat(245)),
            ),
        ];
        for (g, ip, net, want) in cases {
            let got = workload_entry_name(g, ip, net);
            assert_eq!(got, want);
            assert!(got.len() <= MAX_NAME_LEN);
        }
    }

    #[test]
    fn entry_from_group_merges_labels_annotations_and_owner() {
        let e = entry_from_group(&group(false), &reg("10.0.0.1", ""), "replica-a", T0);
        assert_eq!(e.metadata.name, "python-http-10.0.0.1-vm-network");
        assert_eq!(e.metadata.namespace, "vm-namespace");
        assert_eq!(e.spec.labels.get("tier").map(String::as_str), Some("vm"));
        assert_eq!(
            e.spec.labels.get("app").map(String::as_str),
            Some("python-http")
        );
        assert_eq!(e.spec.labels.get("t").map(String::as_str), Some("1"));
        assert_eq!(e.spec.service_account, "vm-sa");
        assert_eq!(e.spec.locality, "us-east/1a");
        let a = &e.metadata.annotations;
        assert_eq!(
            a.get(ANNOTATION_AUTO_REGISTRATION_GROUP)
                .map(String::as_str),
            Some("python-http")
        );
        assert_eq!(
            a.get(ANNOTATION_WORKLOAD_CONTROLLER).map(String::as_str),
            Some("replica-a")
        );
        assert_eq!(
            a.get(ANNOTATION_CONNECTED_AT).map(String::as_str),
            Some("2023-11-14T22:13:20Z")
        );
        assert_eq!(a.get("team").map(String::as_str), Some("a"));
        assert!(!a.contains_key(ANNOTATION_HEALTH_CHECKS_ENABLED));
        let o = &e.metadata.owner_references;
        assert_eq!(o.len(), 1);
        assert_eq!(
            (o[0].kind.as_str(), o[0].name.as_str(), o[0].uid.as_str()),
            ("WorkloadGroup", "python-http", "uid-1")
        );
        assert!(belongs_to_group(&e, "vm-namespace", "python-http"));
        assert!(is_healthy(&e), "no probe: healthy until told otherwise");
        let with_probe = entry_from_group(&group(true), &reg("10.0.0.1", "n2"), "replica-a", T0);
        assert_eq!(with_probe.spec.network, "n2");
        assert!(
            !is_healthy(&with_probe),
            "probe: unhealthy until the first healthy report"
        );
    }

    #[test]
    fn disconnect_then_grace_then_delete_unless_reconnected() {
        let grace = 10 * SEC;
        let mut e = entry_from_group(&group(false), &reg("10.0.0.1", ""), "a", T0);
        let alive = |c: &str| c == "a" || c == "b";
        assert_eq!(
            sweep(&e, T0 + SEC, grace, alive),
            Sweep::Keep { recheck_at: None }
        );
        assert!(disconnect(&mut e, "a", T0, T0 + SEC));
        assert!(e
            .metadata
            .annotations
            .contains_key(ANNOTATION_DISCONNECTED_AT));
        assert!(!e.metadata.annotations.contains_key(ANNOTATION_CONNECTED_AT));
        assert_eq!(
            sweep(&e, T0 + 5 * SEC, grace, alive),
            Sweep::Keep {
                recheck_at: Some(T0 + 11 * SEC)
            }
        );
        assert_eq!(sweep(&e, T0 + 11 * SEC, grace, alive), Sweep::Delete);
        // Reconnect within grace cancels the deletion.
        connect(&mut e, "a", T0 + 6 * SEC);
        assert_eq!(
            sweep(&e, T0 + 20 * SEC, grace, alive),
            Sweep::Keep { recheck_at: None }
        );
    }

    #[test]
    fn reconnect_to_another_replica_takes_ownership_and_late_disconnect_is_a_no_op() {
        let mut e = entry_from_group(&group(false), &reg("10.0.0.1", ""), "a", T0);
        connect(&mut e, "b", T0 + SEC);
        let before = e.clone();
        assert!(!disconnect(&mut e, "a", T0, T0 + 2 * SEC));
        assert_eq!(e, before);
        // The same replica's older connection is also superseded by its newer one.
        connect(&mut e, "b", T0 + 3 * SEC);
        assert!(!disconnect(&mut e, "b", T0 + SEC, T0 + 4 * SEC));
        assert!(disconnect(&mut e, "b", T0 + 3 * SEC, T0 + 4 * SEC));
    }

    #[test]
    fn entries_of_a_gone_replica_are_marked_then_deleted() {
        let grace = 10 * SEC;
        let mut e = entry_from_group(&group(false), &reg("10.0.0.1", ""), "dead", T0);
        let alive = |c: &str| c == "live";
        assert_eq!(sweep(&e, T0 + SEC, grace, alive), Sweep::MarkDisconnected);
        mark_stale(&mut e, T0 + SEC);
        assert_eq!(sweep(&e, T0 + 11 * SEC, grace, alive), Sweep::Delete);
        let manual = WorkloadEntry {
            metadata: ObjectMeta::default(),
            ..e.clone()
        };
        assert_eq!(
            sweep(&manual, T0 + 99 * SEC, grace, alive),
            Sweep::Keep { recheck_at: None }
        );
    }

    #[test]
    fn health_is_monotonic_by_probe_time() {
        let mut e = entry_from_group(&group(true), &reg("10.0.0.1", ""), "a", T0);
        let rep = |healthy, t, m: &str| HealthReport {
            healthy,
            probe_time: T0 + t * SEC,
            message: m.into(),
        };
        let steps = [
            (rep(true, 5, "ok"), HealthOutcome::Applied, true),
            (rep(false, 3, "old failure"), HealthOutcome::Stale, true),
            (rep(false, 5, "same time"), HealthOutcome::Stale, true),
            (rep(false, 6, "refused"), HealthOutcome::Applied, false),
            (
                rep(false, 7, "refused again"),
                HealthOutcome::Applied,
                false,
            ),
            (rep(true, 8, ""), HealthOutcome::Applied, true),
        ];
        for (r, outcome, healthy) in steps {
            assert_eq!(apply_health(&mut e, &r), outcome, "{r:?}");
            assert_eq!(is_healthy(&e), healthy, "{r:?}");
        }
        let c = healthy_condition(&e).unwrap();
        assert_eq!(c.last_probe_time, format_rfc3339_nanos(T0 + 8 * SEC));
        assert_eq!(c.last_transition_time, format_rfc3339_nanos(T0 + 8 * SEC));
        assert_eq!(e.status.as_ref().unwrap().conditions.len(), 1);
        let mut e2 = e.clone();
        apply_health(&mut e2, &rep(true, 9, ""));
        assert_eq!(
            healthy_condition(&e2).unwrap().last_transition_time,
            format_rfc3339_nanos(T0 + 8 * SEC)
        );
    }

    #[test]
    fn probe_defaults_follow_istio() {
        let p = ReadinessProbe {
            http_get: Some(HttpHealthCheck {
                port: 8080,
                ..Default::default()
            }),
            period_seconds: 5,
            ..Default::default()
        };
        let d = probe_with_defaults(&p);
        assert_eq!(
            (d.initial_delay_seconds, d.timeout_seconds, d.period_seconds),
            (0, 1, 5)
        );
        assert_eq!((d.success_threshold, d.failure_threshold), (1, 1));
        let h = d.http_get.unwrap();
        assert_eq!(
            (h.path.as_str(), h.scheme.as_str(), h.port),
            ("/", "HTTP", 8080)
        );
    }

    #[test]
    fn expected_service_account_defaults() {
        let mut g = group(false);
        assert_eq!(expected_service_account(&g), "vm-sa");
        g.spec.template.service_account.clear();
        assert_eq!(expected_service_account(&g), "default");
    }
}
