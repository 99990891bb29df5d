//! WorkloadEntry auto-registration semantics, as Istio's `autoregistration` controller has
//! them: the entry's name, labels, annotations and owner reference from a WorkloadGroup and a
//! connecting VM; which identity may control which entry; connect / disconnect / grace-period
//! cleanup with ownership by one control-plane replica; and the `Healthy` condition, stamped
//! with the control plane's clock and ordered by a per-registration sequence.
//!
//! Times are nanoseconds since the Unix epoch, passed in by the caller.

use std::net::IpAddr;

use super::model::{
    Condition, HttpHealthCheck, Labels, ObjectMeta, OwnerReference, ReadinessProbe, Status,
    WorkloadEntry, WorkloadGroup,
};
use super::validate::is_dns1123_subdomain;
use vmesh_api::time::{format_rfc3339_nanos, format_rfc3339_secs, parse_rfc3339};

pub const ANNOTATION_AUTO_REGISTRATION_GROUP: &str = "istio.io/autoRegistrationGroup";
pub const ANNOTATION_WORKLOAD_CONTROLLER: &str = "istio.io/workloadController";
pub const ANNOTATION_CONNECTED_AT: &str = "istio.io/connectedAt";
pub const ANNOTATION_DISCONNECTED_AT: &str = "istio.io/disconnectedAt";
/// Set on entries whose group has a probe: such an entry is unhealthy until a healthy report.
/// Its presence (any value) lets a VM report health for a manual entry; only a true value
/// makes the reports count (Istio's `IsEligibleForHealthStatusUpdates` and `isHealthy`).
pub const ANNOTATION_HEALTH_CHECKS_ENABLED: &str = "proxy.istio.io/health-checks-enabled";
/// vmesh's own: `REGISTRATION/SEQUENCE` of the last health report applied, so that a retried
/// older report never overwrites a newer one whatever the clocks say. Istio needs none: its
/// reports travel in order on one gRPC stream.
pub const ANNOTATION_HEALTH_SEQUENCE: &str = "vmesh.io/health-sequence";
/// The locality labels pilot-agent reads, newest first (`pkg/model/proxy.go`
/// `GetLocalityLabel`); the legacy one uses `.` for `/`.
pub const LABEL_TOPOLOGY_LOCALITY: &str = "topology.istio.io/locality";
pub const LABEL_LOCALITY_LEGACY: &str = "istio-locality";
/// The apiVersion owner references name, whatever version the group was applied in: istiod
/// writes `gvk.WorkloadGroup`, which is `networking.istio.io/v1`.
pub const WORKLOAD_GROUP_API_VERSION: &str = "networking.istio.io/v1";
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

/// Why a registration cannot name its entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryNameError {
    #[error("Invalid value: {0:?}: must be an IP address")]
    Address(String),
    #[error("Invalid value: {address:?}: {why}")]
    Unusable {
        address: String,
        why: vmesh_api::control::AddressRefusal,
    },
    #[error("Invalid value: the entry name {0:?} (group-address-network) is not a lowercase RFC 1123 subdomain")]
    Name(String),
}

/// The address as the entry carries it: parsed and printed back, so that `fd00:0::1` and
/// `fd00::1` are one VM (RFC 5952 form for IPv6). Only a VM's self-reported address comes
/// through here, so addresses no workload can have are refused
/// ([`vmesh_api::control::workload_address_refusal`]); Istio checks none, and an admin's
/// WorkloadEntry may still name them (with a warning, see `validate`).
pub fn canonical_address(address: &str) -> Result<String, EntryNameError> {
    let ip = address
        .trim()
        .parse::<IpAddr>()
        .map_err(|_| EntryNameError::Address(address.to_string()))?;
    if let Some(why) = vmesh_api::control::workload_address_refusal(ip) {
        return Err(EntryNameError::Unusable {
            address: address.to_string(),
            why,
        });
    }
    Ok(ip.to_string())
}

/// `group-IP[-network]` with the network the VM sent (not the template's), ':' turned into
/// '-', keeping the last 253 characters (Istio's `autoregisteredWorkloadEntryName`). Unlike
/// Istio, the result must be a valid object name: a cut that leaves a leading '-' or '.' drops
/// it, and anything else invalid (a network with '/', "..", upper case, invisible characters)
/// is an error rather than a failed create later.
pub fn workload_entry_name(
    group: &str,
    address: &str,
    network: &str,
) -> Result<String, EntryNameError> {
    let ip = canonical_address(address)?;
    let mut name = format!("{group}-{ip}");
    if !network.is_empty() {
        name.push('-');
        name.push_str(network);
    }
    let name = name.replace(':', "-");
    let cut = name
        .char_indices()
        .map(|(i, _)| i)
        .find(|i| name.len() - i <= MAX_NAME_LEN)
        .unwrap_or(name.len());
    let name = name
        .get(cut..)
        .unwrap_or_default()
        .trim_start_matches(['-', '.']);
    if is_dns1123_subdomain(name) {
        Ok(name.to_string())
    } else {
        Err(EntryNameError::Name(name.to_string()))
    }
}

/// The entry name of a registration.
pub fn entry_name(reg: &Registration) -> Result<String, EntryNameError> {
    workload_entry_name(&reg.group, &reg.address, &reg.network)
}

/// The service account the bundle's token is minted for: the template's, or `default`
/// (istioctl's `readWorkloadGroup`). Registration accepts more: see [`may_control`].
pub fn expected_service_account(group: &WorkloadGroup) -> &str {
    match group.spec.template.service_account.as_str() {
        "" => DEFAULT_SERVICE_ACCOUNT,
        sa => sa,
    }
}

/// Istio's label saying whether a workload's sidecar terminates mesh mTLS (`istio`) or not
/// (`disabled`, or any other value).
pub const LABEL_TLS_MODE: &str = "security.istio.io/tlsMode";
pub const TLS_MODE_ISTIO: &str = "istio";

/// The service account whose SPIFFE identity a workload's sidecar presents, or `None` when it
/// runs none (Istio's `getTLSModeFromWorkloadEntry`): the `security.istio.io/tlsMode` label
/// decides when present; otherwise a `serviceAccount` means a sidecar. vmesh adds one case:
/// an auto-registered entry always has one (its VM registered through its sidecar), even when
/// the template names no account.
///
/// Where Istio leaves the identity empty (tlsMode `istio` without a `serviceAccount`: mTLS
/// without a SAN check), the table has no way to say "TLS, any identity", so the account is
/// `default`, the one Kubernetes gives a pod that names none and the one a VM's token is
/// minted for when its group names none ([`expected_service_account`]).
pub fn sidecar_service_account<'a>(
    spec: &'a super::model::WorkloadEntrySpec,
    labels: &Labels,
    auto_registered: bool,
) -> Option<&'a str> {
    let sidecar = match labels.get(LABEL_TLS_MODE) {
        Some(mode) => mode == TLS_MODE_ISTIO,
        None => auto_registered || !spec.service_account.is_empty(),
    };
    sidecar.then_some(match spec.service_account.as_str() {
        "" => DEFAULT_SERVICE_ACCOUNT,
        sa => sa,
    })
}

/// Labels: the VM's over the group's metadata labels over the template's.
pub fn merge_labels(template: &Labels, group_meta: &Labels, vm: &Labels) -> Labels {
    let mut out = template.clone();
    out.extend(group_meta.iter().map(|(k, v)| (k.clone(), v.clone())));
    out.extend(vm.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

/// The labels selection sees: `metadata.labels` over `spec.labels` (Istio's
/// `serviceentry.ConvertWorkloadEntry`).
pub fn effective_labels(entry: &WorkloadEntry) -> Labels {
    let mut out = entry.spec.labels.clone();
    out.extend(
        entry
            .metadata
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    out
}

/// The locality pilot-agent derives from the proxy's labels (`GetLocalityLabel`, then
/// `SanitizeLocalityLabel`): used when the VM sent none.
pub fn locality_from_labels(labels: &Labels) -> String {
    if let Some(l) = labels.get(LABEL_TOPOLOGY_LOCALITY) {
        return l.clone();
    }
    match labels.get(LABEL_LOCALITY_LEGACY) {
        Some(l) if l.contains('/') => l.clone(),
        Some(l) => l.replace('.', "/"),
        None => String::new(),
    }
}

/// The entry a VM gets when it registers into `group`, connected to `controller` at `now`
/// (Istio's `workloadEntryFromGroup`).
pub fn entry_from_group(
    group: &WorkloadGroup,
    reg: &Registration,
    controller: &str,
    now: u64,
) -> Result<WorkloadEntry, EntryNameError> {
    let name = entry_name(reg)?;
    let gmeta = group.spec.metadata.clone().unwrap_or_default();
    let mut spec = group.spec.template.clone();
    spec.address = canonical_address(&reg.address)?;
    spec.labels = merge_labels(&group.spec.template.labels, &gmeta.labels, &reg.labels);
    if !reg.network.is_empty() {
        spec.network = reg.network.clone();
    }
    if !reg.locality.is_empty() {
        spec.locality = reg.locality.clone();
    } else {
        let from_labels = locality_from_labels(&reg.labels);
        if !from_labels.is_empty() {
            spec.locality = from_labels;
        }
    }
    // The locality is in `spec.locality` now; Istio drops the legacy label, whose value
    // (`region.zone`) only existed because labels cannot hold '/'.
    spec.labels.remove(LABEL_LOCALITY_LEGACY);
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
            name,
            namespace: group.metadata.namespace.clone(),
            labels: spec.labels.clone(),
            annotations,
            owner_references: vec![OwnerReference {
                api_version: WORKLOAD_GROUP_API_VERSION.to_string(),
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
    Ok(entry)
}

/// Why an identity may not control an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlRefusal {
    #[error("token namespace {token:?} does not match the entry's namespace {entry:?}")]
    Namespace { token: String, entry: String },
    #[error("token service account {token:?} does not match the entry's {entry:?}")]
    ServiceAccount { token: String, entry: String },
    #[error("the entry is neither auto-registered nor health-checked (no {ANNOTATION_HEALTH_CHECKS_ENABLED} annotation)")]
    NotControllable,
}

impl ControlRefusal {
    /// For logs: `namespace_mismatch`, `service_account_mismatch`, `not_controllable`.
    pub fn reason(&self) -> &'static str {
        match self {
            ControlRefusal::Namespace { .. } => "namespace_mismatch",
            ControlRefusal::ServiceAccount { .. } => "service_account_mismatch",
            ControlRefusal::NotControllable => "not_controllable",
        }
    }
}

/// Whether a VM with this identity may connect to, report health for or leave the entry:
/// auto-registered entries and manual ones with health checks (Istio's `OnConnect` with
/// `IsEligibleForHealthStatusUpdates`), same namespace, and the entry's service account unless
/// it names none, in which case any account of the namespace will do (Istio's
/// `ensureProxyCanControlEntry`).
pub fn may_control(
    entry: &WorkloadEntry,
    namespace: &str,
    service_account: &str,
) -> Result<(), ControlRefusal> {
    if entry.metadata.namespace != namespace {
        return Err(ControlRefusal::Namespace {
            token: namespace.to_string(),
            entry: entry.metadata.namespace.clone(),
        });
    }
    if !is_auto_registered(entry) && !health_eligible(entry) {
        return Err(ControlRefusal::NotControllable);
    }
    let want = &entry.spec.service_account;
    if !want.is_empty() && want != service_account {
        return Err(ControlRefusal::ServiceAccount {
            token: service_account.to_string(),
            entry: want.clone(),
        });
    }
    Ok(())
}

/// Marks the entry connected to `controller` at `now` (also a reconnect or a takeover, and a
/// VM becoming the controller of a manual health-checked entry). Nothing else changes: a
/// reconnect keeps the labels and spec it was created with (Istio's
/// `changeWorkloadEntryStateToConnected`).
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
        .get(ANNOTATION_AUTO_REGISTRATION_GROUP)
        .is_some_and(|g| !g.is_empty())
}

/// The group an auto-registered entry came from.
pub fn auto_registration_group(entry: &WorkloadEntry) -> Option<&str> {
    entry
        .metadata
        .annotations
        .get(ANNOTATION_AUTO_REGISTRATION_GROUP)
        .map(String::as_str)
        .filter(|g| !g.is_empty())
}

/// A manual entry a VM has connected to (Istio's `isHealthCheckedWorkloadEntry`).
pub fn is_health_checked(entry: &WorkloadEntry) -> bool {
    !is_auto_registered(entry) && controller_of(entry).is_some_and(|c| !c.is_empty())
}

/// Whether a VM may report health for the entry at all: the annotation is present, whatever
/// its value (Istio's `IsEligibleForHealthStatusUpdates`).
pub fn health_eligible(entry: &WorkloadEntry) -> bool {
    entry
        .metadata
        .annotations
        .contains_key(ANNOTATION_HEALTH_CHECKS_ENABLED)
}

/// Whether reported health counts: the annotation is true as Go's `strconv.ParseBool` reads
/// it (Istio's `parseHealthAnnotation`).
pub fn health_checks_enabled(entry: &WorkloadEntry) -> bool {
    entry
        .metadata
        .annotations
        .get(ANNOTATION_HEALTH_CHECKS_ENABLED)
        .is_some_and(|v| matches!(v.as_str(), "1" | "t" | "T" | "true" | "TRUE" | "True"))
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
/// connection's: a reconnect to another replica took it, or the VM reconnected since. Manual
/// health-checked entries are disconnected the same way (Istio's
/// `changeWorkloadEntryStateToDisconnected`), so that their health goes after the grace period.
pub fn disconnect(entry: &mut WorkloadEntry, controller: &str, conn_time: u64, now: u64) -> bool {
    if !(is_auto_registered(entry) || is_health_checked(entry))
        || !owned_by(entry, controller, conn_time)
    {
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
    /// An auto-registered entry disconnected for longer than the grace period: delete it.
    Delete,
    /// A manual health-checked entry disconnected for longer than the grace period: remove its
    /// `Healthy` condition, keep the entry (Istio's `deleteHealthCondition`).
    ClearHealth,
}

/// The sweep's decision for one entry (Istio's `shouldCleanupEntry` and `cleanupEntry`).
/// `controller_alive` says whether a replica still holds its liveness lease. Whether the
/// entry's group still exists does not matter: an imported entry of a missing group lives
/// until it is disconnected past the grace period, like any other.
pub fn sweep(
    entry: &WorkloadEntry,
    now: u64,
    grace_nanos: u64,
    controller_alive: impl Fn(&str) -> bool,
) -> Sweep {
    let auto = is_auto_registered(entry);
    if !auto && !is_health_checked(entry) {
        return Sweep::Keep { recheck_at: None };
    }
    if let Some(at) = disconnected_at(entry) {
        if !auto && healthy_condition(entry).is_none() {
            return Sweep::Keep { recheck_at: None };
        }
        let due = at.saturating_add(grace_nanos);
        return if now < due {
            Sweep::Keep {
                recheck_at: Some(due),
            }
        } else if auto {
            Sweep::Delete
        } else {
            Sweep::ClearHealth
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

/// Applies the sweep's `ClearHealth`; false if there was no condition.
pub fn clear_health(entry: &mut WorkloadEntry) -> bool {
    let Some(status) = entry.status.as_mut() else {
        return false;
    };
    let before = status.conditions.len();
    status.conditions.retain(|c| c.type_ != CONDITION_HEALTHY);
    let changed = status.conditions.len() != before;
    if status.conditions.is_empty() {
        entry.status = None;
    }
    changed
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

/// Where a health report stands among the reports for one entry: the registration it belongs
/// to (the control plane's clock when the VM registered, handed to it in the answer), then its
/// place in that registration. Compared as a pair, so a new registration's first report beats
/// every report of an older one, however the VM's clock moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HealthOrder {
    pub registration: u64,
    pub sequence: u64,
}

impl HealthOrder {
    fn parse(s: &str) -> Option<HealthOrder> {
        let (r, q) = s.split_once('/')?;
        Some(HealthOrder {
            registration: r.parse().ok()?,
            sequence: q.parse().ok()?,
        })
    }
}

impl std::fmt::Display for HealthOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registration, self.sequence)
    }
}

/// The order of the last health report applied to the entry.
pub fn health_order(entry: &WorkloadEntry) -> Option<HealthOrder> {
    entry
        .metadata
        .annotations
        .get(ANNOTATION_HEALTH_SEQUENCE)
        .and_then(|s| HealthOrder::parse(s))
}

/// The registration number to hand a VM connecting at `now`: the control plane's clock, but
/// always past the registration of the last report applied, so that a replica whose clock is
/// behind cannot hand out numbers whose reports would all be stale.
pub fn next_registration(entry: Option<&WorkloadEntry>, now: u64) -> u64 {
    match entry.and_then(health_order) {
        Some(o) => now.max(o.registration.saturating_add(1)),
        None => now,
    }
}

/// A probe result from a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    pub healthy: bool,
    pub message: String,
    /// `None` for clients older than sequenced reports: those are taken in arrival order, as
    /// Istio takes them.
    pub order: Option<HealthOrder>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthOutcome {
    /// The condition was written.
    Applied,
    /// A report at or before the one recorded: ignored.
    Stale,
}

pub fn healthy_condition(entry: &WorkloadEntry) -> Option<&Condition> {
    entry
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION_HEALTHY))
}

/// Records a probe result received at `now` (the control plane's clock, as Istio's
/// `transformHealthEvent` stamps `lastProbeTime` on receipt) unless a later report is already
/// recorded: by sequence when the report has one, else by time (Istio's `UpdateHealth`). The
/// probe time never goes back, even when this replica's clock is behind the last writer's.
pub fn apply_health(entry: &mut WorkloadEntry, report: &HealthReport, now: u64) -> HealthOutcome {
    if let (Some(new), Some(old)) = (report.order, health_order(entry)) {
        if new <= old {
            return HealthOutcome::Stale;
        }
    }
    let status_str = if report.healthy { "True" } else { "False" };
    let prev = healthy_condition(entry).cloned();
    let prev_time = prev
        .as_ref()
        .and_then(|p| parse_rfc3339(&p.last_probe_time));
    let stamp = match (report.order, prev_time) {
        (None, Some(t)) if t > now => return HealthOutcome::Stale,
        (_, Some(t)) => now.max(t),
        (_, None) => now,
    };
    let probe_time = format_rfc3339_nanos(stamp);
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
    if let Some(order) = report.order {
        entry
            .metadata
            .annotations
            .insert(ANNOTATION_HEALTH_SEQUENCE.to_string(), order.to_string());
    }
    HealthOutcome::Applied
}

/// Whether the entry receives traffic: with health checks enabled only after a healthy
/// report; otherwise always, whatever condition it carries (Istio's `isHealthy`).
pub fn is_healthy(entry: &WorkloadEntry) -> bool {
    if health_checks_enabled(entry) {
        healthy_condition(entry).is_some_and(|c| c.status == "True")
    } else {
        true
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
        // Group names are subdomains: labels of at most 63.
        let long = vec!["g".repeat(50); 6].join(".");
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
            // One VM, however its IPv6 address is written.
            ("g", "FD00:0:0::0001", "", "g-fd00--1".to_string()),
            (
                long.as_str(),
                "1.2.3.4",
                "",
                // The last 253 characters.
                format!("{}-1.2.3.4", &long[long.len() - 245..]),
            ),
        ];
        for (g, ip, net, want) in cases {
            let got = workload_entry_name(g, ip, net).unwrap();
            assert_eq!(got, want);
            assert!(got.len() <= MAX_NAME_LEN);
        }
    }

    #[test]
    fn entry_names_that_are_not_object_names_are_refused() {
        for net in ["a/b", "..", "a..b", "Net", "n\u{200b}x", "-", "a b"] {
            let r = workload_entry_name("g", "10.0.0.1", net);
            assert!(matches!(r, Err(EntryNameError::Name(_))), "{net:?}: {r:?}");
        }
        assert!(matches!(
            workload_entry_name("g", "vm.example", ""),
            Err(EntryNameError::Address(_))
        ));
        for ip in ["169.254.169.254", "0.0.0.0", "::", "ff02::1", "fe80::1"] {
            let r = workload_entry_name("g", ip, "");
            assert!(
                matches!(r, Err(EntryNameError::Unusable { .. })),
                "{ip}: {r:?}"
            );
        }
        // A cut that would start with '-' keeps a valid name.
        let g = format!("ggg-{}", vec!["g".repeat(60); 4].join("."));
        let got = workload_entry_name(&g, "10.0.0.1", "").unwrap();
        assert!(got.starts_with('g') && got.len() == 252, "{got}");
    }

    #[test]
    fn entry_from_group_merges_labels_annotations_and_owner() {
        let e = entry_from_group(&group(false), &reg("10.0.0.1", ""), "replica-a", T0).unwrap();
        // The name has the network the VM sent (none); the spec the effective one.
        assert_eq!(e.metadata.name, "python-http-10.0.0.1");
        assert_eq!(e.spec.network, "vm-network");
        assert_eq!(e.metadata.namespace, "vm-namespace");
        assert_eq!(e.metadata.labels, e.spec.labels);
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
        assert_eq!(o[0].api_version, "networking.istio.io/v1");
        assert!(belongs_to_group(&e, "vm-namespace", "python-http"));
        assert!(is_healthy(&e), "no probe: healthy until told otherwise");
        let with_probe =
            entry_from_group(&group(true), &reg("10.0.0.1", "n2"), "replica-a", T0).unwrap();
        assert_eq!(with_probe.spec.network, "n2");
        assert_eq!(with_probe.metadata.name, "python-http-10.0.0.1-n2");
        assert!(
            !is_healthy(&with_probe),
            "probe: unhealthy until the first healthy report"
        );
    }

    #[test]
    fn locality_falls_back_to_the_istio_locality_label_which_the_entry_does_not_keep() {
        let mut r = reg("10.0.0.1", "");
        r.locality.clear();
        r.labels
            .insert(LABEL_LOCALITY_LEGACY.into(), "r1.z1".into());
        let e = entry_from_group(&group(false), &r, "a", T0).unwrap();
        assert_eq!(e.spec.locality, "r1/z1");
        assert!(!e.spec.labels.contains_key(LABEL_LOCALITY_LEGACY));
        r.locality = "r2/z2".into();
        let e = entry_from_group(&group(false), &r, "a", T0).unwrap();
        assert_eq!(e.spec.locality, "r2/z2", "what the VM sent wins");
    }

    #[test]
    fn metadata_labels_win_over_spec_labels_for_selection() {
        let mut e = entry_from_group(&group(false), &reg("10.0.0.1", ""), "a", T0).unwrap();
        e.metadata.labels = [("tier".to_string(), "meta".to_string())].into();
        let l = effective_labels(&e);
        assert_eq!(l.get("tier").map(String::as_str), Some("meta"));
        assert_eq!(l.get("app").map(String::as_str), Some("python-http"));
    }

    #[test]
    fn disconnect_then_grace_then_delete_unless_reconnected() {
        let grace = 10 * SEC;
        let mut e = entry_from_group(&group(false), &reg("10.0.0.1", ""), "a", T0).unwrap();
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
        let mut e = entry_from_group(&group(false), &reg("10.0.0.1", ""), "a", T0).unwrap();
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
        let mut e = entry_from_group(&group(false), &reg("10.0.0.1", ""), "dead", T0).unwrap();
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

    fn rep(healthy: bool, registration: u64, sequence: u64, m: &str) -> HealthReport {
        HealthReport {
            healthy,
            message: m.into(),
            order: Some(HealthOrder {
                registration,
                sequence,
            }),
        }
    }

    #[test]
    fn health_is_ordered_by_registration_then_sequence_and_stamped_with_the_servers_clock() {
        let mut e = entry_from_group(&group(true), &reg("10.0.0.1", ""), "a", T0).unwrap();
        let steps = [
            (rep(true, 1, 5, "ok"), HealthOutcome::Applied, true),
            (
                rep(false, 1, 3, "retried old failure"),
                HealthOutcome::Stale,
                true,
            ),
            (
                rep(false, 1, 5, "same report again"),
                HealthOutcome::Stale,
                true,
            ),
            (rep(false, 1, 6, "refused"), HealthOutcome::Applied, false),
            // A new registration starts again at 1 and still wins.
            (rep(true, 2, 1, ""), HealthOutcome::Applied, true),
            (
                rep(false, 1, 99, "the old registration's"),
                HealthOutcome::Stale,
                true,
            ),
        ];
        for (i, (r, outcome, healthy)) in steps.into_iter().enumerate() {
            let now = T0 + (i as u64 + 1) * SEC;
            assert_eq!(apply_health(&mut e, &r, now), outcome, "{r:?}");
            assert_eq!(is_healthy(&e), healthy, "{r:?}");
        }
        let c = healthy_condition(&e).unwrap();
        assert_eq!(c.last_probe_time, format_rfc3339_nanos(T0 + 5 * SEC));
        assert_eq!(c.last_transition_time, format_rfc3339_nanos(T0 + 5 * SEC));
        assert_eq!(e.status.as_ref().unwrap().conditions.len(), 1);
        assert_eq!(
            health_order(&e),
            Some(HealthOrder {
                registration: 2,
                sequence: 1
            })
        );
        // Same status: the transition time stays; a replica whose clock is behind does not
        // move the probe time back.
        let mut e2 = e.clone();
        apply_health(&mut e2, &rep(true, 2, 2, ""), T0);
        let c2 = healthy_condition(&e2).unwrap();
        assert_eq!(c2.last_transition_time, format_rfc3339_nanos(T0 + 5 * SEC));
        assert_eq!(c2.last_probe_time, format_rfc3339_nanos(T0 + 5 * SEC));
        assert_eq!(next_registration(Some(&e2), 0), 3);
        assert_eq!(next_registration(Some(&e2), T0), T0);
    }

    #[test]
    fn unsequenced_reports_are_taken_in_arrival_order_like_istio() {
        let mut e = entry_from_group(&group(true), &reg("10.0.0.1", ""), "a", T0).unwrap();
        let old = |healthy| HealthReport {
            healthy,
            message: String::new(),
            order: None,
        };
        assert_eq!(
            apply_health(&mut e, &old(true), T0 + 2 * SEC),
            HealthOutcome::Applied
        );
        assert_eq!(
            apply_health(&mut e, &old(false), T0 + 3 * SEC),
            HealthOutcome::Applied
        );
        assert!(!is_healthy(&e));
        // Received by a replica whose clock is behind the recorded probe time: Istio drops it.
        assert_eq!(
            apply_health(&mut e, &old(true), T0 + SEC),
            HealthOutcome::Stale
        );
    }

    #[test]
    fn health_counts_only_where_health_checks_are_enabled() {
        let mut e = entry_from_group(&group(false), &reg("10.0.0.1", ""), "a", T0).unwrap();
        apply_health(&mut e, &rep(false, 1, 1, "down"), T0);
        assert!(
            is_healthy(&e),
            "no health-checks annotation: the condition is ignored"
        );
        for (v, counts) in [
            ("true", true),
            ("1", true),
            ("True", true),
            ("false", false),
            ("yes", false),
            ("", false),
        ] {
            e.metadata
                .annotations
                .insert(ANNOTATION_HEALTH_CHECKS_ENABLED.into(), v.into());
            assert_eq!(is_healthy(&e), !counts, "{v:?}");
            assert!(health_eligible(&e));
        }
    }

    #[test]
    fn manual_health_checked_entries_lose_their_health_after_disconnect_and_grace() {
        let grace = 10 * SEC;
        let mut e = WorkloadEntry {
            api_version: "networking.istio.io/v1".into(),
            kind: "WorkloadEntry".into(),
            metadata: ObjectMeta {
                name: "manual".into(),
                namespace: "vm-namespace".into(),
                annotations: [(ANNOTATION_HEALTH_CHECKS_ENABLED.into(), "true".into())].into(),
                ..Default::default()
            },
            spec: WorkloadEntrySpec::default(),
            status: None,
        };
        let alive = |c: &str| c == "a";
        assert_eq!(
            sweep(&e, T0, grace, alive),
            Sweep::Keep { recheck_at: None }
        );
        connect(&mut e, "a", T0);
        assert!(is_health_checked(&e));
        apply_health(&mut e, &rep(true, 1, 1, ""), T0);
        assert!(disconnect(&mut e, "a", T0, T0 + SEC));
        assert_eq!(
            sweep(&e, T0 + 5 * SEC, grace, alive),
            Sweep::Keep {
                recheck_at: Some(T0 + 11 * SEC)
            }
        );
        assert_eq!(sweep(&e, T0 + 11 * SEC, grace, alive), Sweep::ClearHealth);
        assert!(clear_health(&mut e));
        assert!(healthy_condition(&e).is_none());
        assert_eq!(
            sweep(&e, T0 + 99 * SEC, grace, alive),
            Sweep::Keep { recheck_at: None }
        );
    }

    #[test]
    fn control_follows_istios_ensure_proxy_can_control_entry() {
        let e = entry_from_group(&group(false), &reg("10.0.0.1", ""), "a", T0).unwrap();
        assert_eq!(may_control(&e, "vm-namespace", "vm-sa"), Ok(()));
        assert!(matches!(
            may_control(&e, "other", "vm-sa"),
            Err(ControlRefusal::Namespace { .. })
        ));
        assert!(matches!(
            may_control(&e, "vm-namespace", "default"),
            Err(ControlRefusal::ServiceAccount { .. })
        ));
        // An empty template service account: any account of the namespace.
        let mut g = group(false);
        g.spec.template.service_account.clear();
        let any = entry_from_group(&g, &reg("10.0.0.1", ""), "a", T0).unwrap();
        assert_eq!(may_control(&any, "vm-namespace", "whoever"), Ok(()));
        assert!(may_control(&any, "other", "whoever").is_err());
        // A manual entry only with the health-checks annotation.
        let mut manual = any.clone();
        manual.metadata.annotations.clear();
        assert_eq!(
            may_control(&manual, "vm-namespace", "whoever"),
            Err(ControlRefusal::NotControllable)
        );
        manual
            .metadata
            .annotations
            .insert(ANNOTATION_HEALTH_CHECKS_ENABLED.into(), "false".into());
        assert_eq!(may_control(&manual, "vm-namespace", "whoever"), Ok(()));
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
