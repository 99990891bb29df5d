//! A VM's own calls: register, heartbeat, health, deregister. The connection is remembered in
//! memory (as istiod does a gRPC stream); the entry is written on connect, reconnect, health
//! changes and deregistration, never per heartbeat.
//!
//! Every call on an existing entry is authorized against that entry (Istio's
//! `ensureProxyCanControlEntry`, see [`may_control`]): a refusal is a 403 and writes nothing.

use vmesh_api::control::HEALTH_FUTURE_LEEWAY_SECS;
use vmesh_api::time::parse_rfc3339;
use vmesh_istio::model::{Kind, Labels, ObjectKey, Resource, WorkloadEntry};
use vmesh_istio::validate::{is_dns1123_subdomain, validate_register_labels};
use vmesh_istio::workload::{
    self, apply_health, auto_registration_group, canonical_address, connect, entry_from_group,
    entry_name, is_auto_registered, may_control, next_registration, probe_with_defaults,
    ControlRefusal, EntryNameError, HealthOrder, HealthOutcome, HealthReport, Registration,
};

use super::{
    as_entry, bad, encode, entry_key, new_uid, Attempt, Conn, EntryRef, EntryRequest,
    HealthRequest, HealthResponse, HeartbeatResponse, RegisterRequest, RegisterResponse, Registry,
    RegistryError,
};
use crate::cache::Cached;
use crate::identity::Identity;
use crate::metrics::{HealthReportOutcome, RegistrationResult};
use crate::quota::QuotaRefusal;
use crate::store::{object_key, Precondition, Store, StoreError, Txn};

const NANOS_PER_SEC: u64 = 1_000_000_000;

fn name_error(e: EntryNameError) -> RegistryError {
    match e {
        EntryNameError::Address(_) | EntryNameError::Unusable { .. } => {
            bad("address", e.to_string())
        }
        // The group name was checked and the address is canonical: the network broke it.
        EntryNameError::Name(_) => bad("network", e.to_string()),
    }
}

/// A refusal to let `id` control `key`, logged with its reason.
fn refused(id: &Identity, key: &ObjectKey, r: &ControlRefusal) -> RegistryError {
    tracing::warn!(namespace = %key.namespace, entry = %key.name, token_namespace = %id.namespace,
        token_service_account = %id.service_account, reason = r.reason(), "request refused");
    RegistryError::Forbidden(format!("{}/{}: {r}", key.namespace, key.name))
}

impl<S: Store> Registry<S> {
    /// A VM joins: identity checked against the group, entry created or taken over.
    pub async fn register(
        &self,
        id: &Identity,
        mut req: RegisterRequest,
    ) -> Result<RegisterResponse, RegistryError> {
        let r = self.register_checked(id, &mut req).await;
        self.metrics.registrations.inc(&match &r {
            Ok(_) => RegistrationResult::Ok,
            Err(RegistryError::BadRequest { .. }) => RegistrationResult::BadRequest,
            Err(RegistryError::Forbidden(_)) => RegistrationResult::Forbidden,
            Err(RegistryError::NotFound(_)) => RegistrationResult::NotFound,
            Err(RegistryError::Conflict(_)) => RegistrationResult::Conflict,
            Err(RegistryError::Unavailable(_)) => RegistrationResult::Unavailable,
            Err(RegistryError::TooManyRequests { .. }) => RegistrationResult::TooManyRequests,
        });

        r
    }

    async fn register_checked(
        &self,
        id: &Identity,
        req: &mut RegisterRequest,
    ) -> Result<RegisterResponse, RegistryError> {
        if req.namespace.is_empty() {
            req.namespace = id.namespace.clone();
        }
        if req.group.is_empty() {
            return Err(bad("group", "Required value"));
        }
        if !is_dns1123_subdomain(&req.group) {
            return Err(bad(
                "group",
                format!(
                    "Invalid value: {:?}: must be a lowercase RFC 1123 subdomain",
                    req.group
                ),
            ));
        }
        let address = canonical_address(&req.address).map_err(name_error)?;
        for (field, v) in [("network", &req.network), ("locality", &req.locality)] {
            if v.len() > 253 || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(
                    field,
                    "Invalid value: no whitespace, at most 253 characters",
                ));
            }
        }
        let labels: Labels = req.labels.clone().into_iter().collect();
        if let Some(e) = validate_register_labels(&labels, "labels")
            .into_iter()
            .next()
        {
            return Err(bad(&e.path, e.message));
        }
        if id.namespace != req.namespace {
            tracing::warn!(token_namespace = %id.namespace, group_namespace = %req.namespace, group = %req.group,
                reason = "namespace_mismatch", "registration refused");
            return Err(RegistryError::Forbidden(format!(
                "token namespace {:?} does not match the group's namespace {:?}",
                id.namespace, req.namespace
            )));
        }
        // Every register call is a store write (a reconnect too), so the rate counts them
        // all; the cap on entries (in `write_registration`) counts only new ones.
        self.limiter
            .take(&id.namespace, &id.service_account, self.clock.now())
            .map_err(|(reason, retry_after)| {
                self.metrics.quota_refusals.inc(&reason);
                // Debug: a client hammering past its rate would otherwise write a warning per
                // request; the refusals are counted in `vmesh_quota_refusals_total`.
                tracing::debug!(namespace = %id.namespace, service_account = %id.service_account,
                    reason = reason.reason(), "registration refused: over the identity's rate");
                RegistryError::TooManyRequests {
                    reason,
                    message: format!(
                        "{}/{}: over {} registrations per second (burst {})",
                        id.namespace,
                        id.service_account,
                        self.settings.quota.registration_rate,
                        self.settings.quota.registration_burst
                    ),
                    retry_after,
                }
            })?;
        let reg = Registration {
            group: req.group.clone(),
            namespace: req.namespace.clone(),
            address,
            network: req.network.clone(),
            locality: req.locality.clone(),
            labels,
        };
        self.register_inner(reg, id).await
    }

    pub(super) async fn register_inner(
        &self,
        reg: Registration,
        id: &Identity,
    ) -> Result<RegisterResponse, RegistryError> {
        let name = entry_name(&reg).map_err(name_error)?;
        let key = entry_key(&reg.namespace, &name);
        let now = self.clock.now();
        // Remember the connection first, so a sweep between commit and here cannot see an
        // entry of ours without one.
        let previous = self.conns().insert(
            key.clone(),
            Conn {
                conn_time: now,
                last_seen: now,
                reg: Some(reg.clone()),
                service_account: id.service_account.clone(),
                registration: now,
            },
        );
        let result = self.write_registration(&key, &reg, id, now).await;
        let registration = match result {
            Ok(r) => r,
            Err(e) => {
                let mut conns = self.conns();
                match previous {
                    Some(p) => conns.insert(key.clone(), p),
                    None => conns.remove(&key),
                };
                return Err(e);
            }
        };
        if let Some(c) = self.conns().get_mut(&key) {
            if c.conn_time == now {
                c.registration = registration;
            }
        }
        // An imported entry may outlive its group: then there is no probe to hand out.
        let probe = self
            .group(&reg.namespace, &reg.group)
            .and_then(|g| g.spec.probe.as_ref().map(probe_with_defaults));
        Ok(RegisterResponse {
            workload_entry: EntryRef {
                namespace: key.namespace,
                name: key.name,
            },
            heartbeat_interval_seconds: self.settings.heartbeat_interval.as_secs().max(1),
            liveness_timeout_seconds: self.settings.liveness_timeout.as_secs().max(1),
            probe,
            registration,
        })
    }

    /// Creates the entry from the group, or (it exists) only marks it connected: a reconnect
    /// never rewrites labels or spec from the group as it is now, and needs no group at all
    /// (Istio's `registerWorkload`). Returns the registration number.
    async fn write_registration(
        &self,
        key: &ObjectKey,
        reg: &Registration,
        id: &Identity,
        now: u64,
    ) -> Result<u64, RegistryError> {
        let skey = &object_key(key);
        self.with_cas(
            || format!("{key} kept changing"),
            move |lost| async move {
                // The cache first; after a lost race, the store itself.
                let existing = if lost > 0 {
                    match self.store.get(skey).await {
                        Ok(rec) => {
                            match Resource::from_json_kind(Kind::WorkloadEntry, &rec.value) {
                                Ok(Resource::WorkloadEntry(e)) => Some((e, rec.mod_revision)),
                                _ => {
                                    return Err(RegistryError::Unavailable(format!(
                                        "{skey} undecodable"
                                    )))
                                }
                            }
                        }
                        Err(StoreError::NotFound(_)) => None,
                        Err(e) => return Err(e.into()),
                    }
                } else {
                    self.cache
                        .get(key)
                        .and_then(|c| as_entry(&c).cloned().map(|e| (e, c.revision)))
                };
                let (entry, check, registration) = match existing {
                    None => {
                        let group = self.group(&reg.namespace, &reg.group).ok_or_else(|| {
                            RegistryError::NotFound(format!(
                                "WorkloadGroup {}/{}",
                                reg.namespace, reg.group
                            ))
                        })?;
                        let mut e = entry_from_group(&group, reg, &self.settings.replica, now)
                            .map_err(name_error)?;
                        may_control(&e, &id.namespace, &id.service_account)
                            .map_err(|r| refused(id, key, &r))?;
                        self.check_entry_cap(id)?;
                        e.metadata.uid = new_uid()?;
                        (e, Precondition::Absent, now)
                    }
                    Some((mut old, mod_revision)) => {
                        if auto_registration_group(&old) != Some(reg.group.as_str()) {
                            return Err(RegistryError::Conflict(format!(
                                "WorkloadEntry {}/{} exists and was not auto-registered by this group",
                                key.namespace, key.name
                            )));
                        }
                        may_control(&old, &id.namespace, &id.service_account)
                            .map_err(|r| refused(id, key, &r))?;
                        let registration = next_registration(Some(&old), now);
                        connect(&mut old, &self.settings.replica, now);
                        (old, Precondition::Revision(mod_revision), registration)
                    }
                };
                let txn = Txn::default()
                    .check(skey.clone(), check)
                    .put(skey.clone(), encode(&Resource::WorkloadEntry(entry)));
                Ok(Attempt::Commit(txn, registration))
            },
        )
        .await
    }

    /// Refuses a new entry when `id` already controls `max_entries_per_identity`
    /// auto-registered ones (those of its namespace that name its service account or none:
    /// what [`may_control`] lets it control). Counted in the cache, so every replica sees the
    /// same count; registrations racing each other may overshoot by as many as are in flight,
    /// which the rate bounds.
    fn check_entry_cap(&self, id: &Identity) -> Result<(), RegistryError> {
        let cap = self.settings.quota.max_entries_per_identity;
        if cap == 0 {
            return Ok(());
        }
        let from = ObjectKey::new(Kind::WorkloadEntry, &id.namespace, "");
        let held = self.cache.read(|s| {
            s.objects
                .range(from..)
                .take_while(|(k, _)| k.kind == Kind::WorkloadEntry && k.namespace == id.namespace)
                .filter_map(|(_, c)| as_entry(c))
                .filter(|e| {
                    is_auto_registered(e)
                        && may_control(e, &id.namespace, &id.service_account).is_ok()
                })
                .take(cap)
                .count()
        });
        if held < cap {
            return Ok(());
        }
        self.metrics.quota_refusals.inc(&QuotaRefusal::Entries);
        tracing::warn!(namespace = %id.namespace, service_account = %id.service_account, cap,
            reason = QuotaRefusal::Entries.reason(), "registration refused: at the identity's cap on entries");
        Err(RegistryError::TooManyRequests {
            reason: QuotaRefusal::Entries,
            message: format!(
                "{}/{} already holds {cap} auto-registered WorkloadEntries (the cap); deregister some or wait for disconnected ones to be removed",
                id.namespace, id.service_account
            ),
            // Disconnected entries go after the grace period: the earliest a slot can free up
            // without anyone deregistering.
            retry_after: self.settings.grace.max(std::time::Duration::from_secs(1)),
        })
    }

    /// The entry `key` if `id` may control it; `None` if there is none. Namespace first, so a
    /// foreign token learns nothing about which entries exist.
    fn authorize(&self, id: &Identity, key: &ObjectKey) -> Result<Option<Cached>, RegistryError> {
        if id.namespace != key.namespace {
            let r = ControlRefusal::Namespace {
                token: id.namespace.clone(),
                entry: key.namespace.clone(),
            };
            return Err(refused(id, key, &r));
        }
        let Some(cached) = self.cache.get(key) else {
            return Ok(None);
        };
        let entry = as_entry(&cached).ok_or_else(|| RegistryError::NotFound(key.to_string()))?;
        may_control(entry, &id.namespace, &id.service_account).map_err(|r| refused(id, key, &r))?;
        Ok(Some(cached))
    }

    /// Makes sure this replica holds the VM's connection to `entry`: cheap when it already
    /// does; otherwise a reconnect, a takeover from another replica, or (a manual
    /// health-checked entry) the VM becoming its controller (Istio's `becomeControllerOf`).
    /// Returns the connection's registration number.
    async fn ensure_connected(
        &self,
        id: &Identity,
        key: &ObjectKey,
        entry: &WorkloadEntry,
        now: u64,
    ) -> Result<u64, RegistryError> {
        {
            let mut conns = self.conns();
            if let Some(c) = conns.get_mut(key) {
                if workload::owned_by(entry, &self.settings.replica, c.conn_time) {
                    c.last_seen = now;
                    return Ok(c.registration);
                }
            }
        }
        // The connection is recorded before the write, as in `register_inner`, so a sweep in
        // between cannot find our entry without one.
        let reg = match self.conns().get(key) {
            Some(c) => c.reg.clone(),
            // Taken over from another replica: what the entry says about the VM. Its labels
            // already include the group's, which only matters if the group is re-created.
            None => auto_registration_group(entry).map(|group| Registration {
                group: group.to_string(),
                namespace: entry.metadata.namespace.clone(),
                address: entry.spec.address.clone(),
                network: entry.spec.network.clone(),
                locality: entry.spec.locality.clone(),
                labels: entry.spec.labels.clone(),
            }),
        };
        let registration = next_registration(Some(entry), now);
        let conn = Conn {
            conn_time: now,
            last_seen: now,
            reg,
            service_account: id.service_account.clone(),
            registration,
        };
        let previous = self.conns().insert(key.clone(), conn);
        let replica = self.settings.replica.clone();
        let result = self
            .update_entry(key, |e| {
                // The entry may have changed since it was authorized.
                may_control(e, &id.namespace, &id.service_account)
                    .map_err(|r| refused(id, key, &r))?;
                connect(e, &replica, now);
                Ok(true)
            })
            .await;
        if let Err(e) = result {
            let mut conns = self.conns();
            match previous {
                Some(p) => conns.insert(key.clone(), p),
                None => conns.remove(key),
            };
            return Err(e);
        }
        Ok(registration)
    }

    /// A liveness report. Cheap when this replica already holds the connection; otherwise
    /// a reconnect (taking the entry over from another replica if need be).
    pub async fn heartbeat(
        &self,
        id: &Identity,
        req: &EntryRequest,
    ) -> Result<HeartbeatResponse, RegistryError> {
        self.metrics
            .heartbeats
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = entry_key(&req.namespace, &req.name);
        let cached = self.authorize(id, &key)?;
        let now = self.clock.now();
        let Some(cached) = cached else {
            // Entry gone (group deleted, or swept). If we know the VM, register it again.
            let reg = self.conns().get_mut(&key).and_then(|c| {
                c.last_seen = now;
                c.reg.clone()
            });
            return match reg {
                Some(reg) => self
                    .register_inner(reg, id)
                    .await
                    .map(|r| HeartbeatResponse {
                        registration: r.registration,
                    }),
                None => Err(RegistryError::NotFound(format!(
                    "WorkloadEntry {}/{}: register again",
                    key.namespace, key.name
                ))),
            };
        };
        let entry = as_entry(&cached).ok_or_else(|| RegistryError::NotFound(key.to_string()))?;
        let registration = self.ensure_connected(id, &key, entry, now).await?;
        Ok(HeartbeatResponse { registration })
    }

    pub async fn health(
        &self,
        id: &Identity,
        req: &HealthRequest,
    ) -> Result<HealthResponse, RegistryError> {
        let key = entry_key(&req.namespace, &req.name);
        if req.message.len() > vmesh_api::control::MAX_HEALTH_MESSAGE {
            return Err(bad("message", "Too long: at most 1024 bytes"));
        }
        let now = self.clock.now();
        let latest = now.saturating_add(HEALTH_FUTURE_LEEWAY_SECS * NANOS_PER_SEC);
        if !req.probe_time.is_empty() {
            let t = parse_rfc3339(&req.probe_time).ok_or_else(|| {
                bad(
                    "probeTime",
                    format!("Invalid value: {:?}: must be RFC 3339", req.probe_time),
                )
            })?;
            if t > latest {
                return Err(bad(
                    "probeTime",
                    format!(
                        "Invalid value: {:?}: more than {HEALTH_FUTURE_LEEWAY_SECS} s ahead of the control plane's clock",
                        req.probe_time
                    ),
                ));
            }
        }
        let order = match (req.registration, req.sequence) {
            (Some(registration), Some(sequence)) => {
                if registration > latest {
                    return Err(bad(
                        "registration",
                        "Invalid value: not a registration this control plane handed out",
                    ));
                }
                Some(HealthOrder {
                    registration,
                    sequence,
                })
            }
            (None, None) => None,
            (None, Some(_)) => return Err(bad("registration", "Required value with sequence")),
            (Some(_), None) => return Err(bad("sequence", "Required value with registration")),
        };
        let Some(cached) = self.authorize(id, &key)? else {
            return Err(RegistryError::NotFound(format!(
                "WorkloadEntry {}/{}",
                key.namespace, key.name
            )));
        };
        let entry = as_entry(&cached).ok_or_else(|| RegistryError::NotFound(key.to_string()))?;
        // Health comes over the VM's connection in Istio; here it counts as a heartbeat and
        // makes this replica the entry's controller if it was not.
        self.ensure_connected(id, &key, entry, now).await?;
        let report = HealthReport {
            healthy: req.healthy,
            message: req.message.clone(),
            order,
        };
        let updated = self
            .update_entry(&key, |e| {
                may_control(e, &id.namespace, &id.service_account)
                    .map_err(|r| refused(id, &key, &r))?;
                Ok(apply_health(e, &report, now) == HealthOutcome::Applied)
            })
            .await?;
        let applied = updated.is_some();
        self.metrics.health_reports.inc(if applied {
            &HealthReportOutcome::Applied
        } else {
            &HealthReportOutcome::Stale
        });
        Ok(HealthResponse { applied })
    }

    /// A clean shutdown of the VM: its auto-registered entry goes at once; a manual
    /// health-checked one is marked disconnected (its health goes after the grace period).
    pub async fn deregister(&self, id: &Identity, req: &EntryRequest) -> Result<(), RegistryError> {
        let key = entry_key(&req.namespace, &req.name);
        let cached = self.authorize(id, &key)?;
        let conn = self.conns().remove(&key);
        let Some(c) = cached else {
            return Err(RegistryError::NotFound(format!(
                "WorkloadEntry {}/{}",
                key.namespace, key.name
            )));
        };
        if !as_entry(&c).is_some_and(is_auto_registered) {
            let Some(conn) = conn else { return Ok(()) };
            let (replica, now) = (self.settings.replica.clone(), self.clock.now());
            return self
                .update_entry(&key, |e| {
                    Ok(workload::disconnect(e, &replica, conn.conn_time, now))
                })
                .await
                .map(drop);
        }
        // After a lost race (a reconnect or health write), the entry as the store has it.
        let (skey, key, c) = (&object_key(&key), &key, &c);
        self.with_cas(
            || format!("{key} kept changing"),
            move |lost| async move {
                let rev = if lost == 0 {
                    c.revision
                } else {
                    match self.store.get(skey).await {
                        Ok(rec) => rec.mod_revision,
                        Err(StoreError::NotFound(_)) => return Ok(Attempt::Done(())),
                        Err(e) => return Err(e.into()),
                    }
                };
                let txn = Txn::default()
                    .check(skey.clone(), Precondition::Revision(rev))
                    .delete(skey.clone());
                Ok(Attempt::Commit(txn, ()))
            },
        )
        .await
    }
}
