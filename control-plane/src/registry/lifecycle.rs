//! A VM's own calls: register, heartbeat, health, deregister. The connection is remembered in
//! memory (as istiod does a gRPC stream); the entry is written on connect, reconnect, health
//! changes and deregistration, never per heartbeat.

use vmesh_api::time::parse_rfc3339;
use vmesh_istio::model::{Kind, Labels, ObjectKey, Resource, WorkloadEntry};
use vmesh_istio::validate::validate_labels;
use vmesh_istio::workload::{
    self, apply_health, entry_from_group, expected_service_account, is_auto_registered,
    probe_with_defaults, HealthOutcome, HealthReport, Registration,
    ANNOTATION_AUTO_REGISTRATION_GROUP,
};

use super::{
    as_entry, bad, encode, entry_key, new_uid, Attempt, Conn, EntryRef, EntryRequest,
    HealthRequest, HealthResponse, RegisterRequest, RegisterResponse, Registry, RegistryError,
};
use crate::cache::Cached;
use crate::identity::Identity;
use crate::metrics::{HealthReportOutcome, RegistrationResult};
use crate::store::{object_key, Precondition, Store, StoreError, Txn};

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
        if req.address.parse::<std::net::IpAddr>().is_err() {
            return Err(bad(
                "address",
                format!("Invalid value: {:?}: must be an IP address", req.address),
            ));
        }
        for (field, v) in [("network", &req.network), ("locality", &req.locality)] {
            if v.len() > 253 || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(
                    field,
                    "Invalid value: no whitespace, at most 253 characters",
                ));
            }
        }
        let labels: Labels = req.labels.clone().into_iter().collect();
        if let Some(e) = validate_labels(&labels, "labels").into_iter().next() {
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
        let reg = Registration {
            group: req.group.clone(),
            namespace: req.namespace.clone(),
            address: req.address.clone(),
            network: req.network.clone(),
            locality: req.locality.clone(),
            labels,
        };
        self.register_inner(reg, &id.service_account).await
    }

    pub(super) async fn register_inner(
        &self,
        reg: Registration,
        service_account: &str,
    ) -> Result<RegisterResponse, RegistryError> {
        let group = self.group(&reg.namespace, &reg.group).ok_or_else(|| {
            RegistryError::NotFound(format!("WorkloadGroup {}/{}", reg.namespace, reg.group))
        })?;
        let want = expected_service_account(&group);
        if service_account != want {
            tracing::warn!(namespace = %reg.namespace, group = %reg.group, token_service_account = %service_account,
                expected = %want, reason = "service_account_mismatch", "registration refused");
            return Err(RegistryError::Forbidden(format!(
                "token service account {service_account:?} does not match the group's {want:?}"
            )));
        }
        let now = self.clock.now();
        let fresh = entry_from_group(&group, &reg, &self.settings.replica, now);
        let key = entry_key(&fresh.metadata.namespace, &fresh.metadata.name);
        // Remember the connection first, so a sweep between commit and here cannot see an
        // entry of ours without one.
        let previous = self.conns().insert(
            key.clone(),
            Conn {
                conn_time: now,
                last_seen: now,
                reg: reg.clone(),
                service_account: service_account.to_string(),
            },
        );
        let result = self.write_registration(&key, fresh, &reg.group).await;
        if result.is_err() {
            let mut conns = self.conns();
            match previous {
                Some(p) => conns.insert(key.clone(), p),
                None => conns.remove(&key),
            };
        }
        result?;
        Ok(RegisterResponse {
            workload_entry: EntryRef {
                namespace: key.namespace,
                name: key.name,
            },
            heartbeat_interval_seconds: self.settings.heartbeat_interval.as_secs().max(1),
            liveness_timeout_seconds: self.settings.liveness_timeout.as_secs().max(1),
            probe: group.spec.probe.as_ref().map(probe_with_defaults),
        })
    }

    async fn write_registration(
        &self,
        key: &ObjectKey,
        fresh: WorkloadEntry,
        group: &str,
    ) -> Result<(), RegistryError> {
        let skey = &object_key(key);
        let fresh = &fresh;
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
                let (entry, check) = match existing {
                    None => {
                        let mut e = fresh.clone();
                        e.metadata.uid = new_uid()?;
                        (e, Precondition::Absent)
                    }
                    Some((old, mod_revision)) => {
                        let same_group = old
                            .metadata
                            .annotations
                            .get(ANNOTATION_AUTO_REGISTRATION_GROUP)
                            .is_some_and(|g| g == group);
                        if !same_group {
                            return Err(RegistryError::Conflict(format!(
                            "WorkloadEntry {}/{} exists and was not auto-registered by this group",
                            key.namespace, key.name
                        )));
                        }
                        // Reconnect: keep identity and health, take the new connection's metadata.
                        let mut e = fresh.clone();
                        e.metadata.uid = old.metadata.uid;
                        e.metadata.creation_timestamp = old.metadata.creation_timestamp;
                        e.status = old.status;
                        (e, Precondition::Revision(mod_revision))
                    }
                };
                let txn = Txn::default()
                    .check(skey.clone(), check)
                    .put(skey.clone(), encode(&Resource::WorkloadEntry(entry)));
                Ok(Attempt::Commit(txn, ()))
            },
        )
        .await
    }

    fn authorize(&self, id: &Identity, key: &ObjectKey) -> Result<Option<Cached>, RegistryError> {
        if id.namespace != key.namespace {
            tracing::warn!(token_namespace = %id.namespace, namespace = %key.namespace, reason = "namespace_mismatch", "request refused");
            return Err(RegistryError::Forbidden(format!(
                "token namespace {:?} does not match {:?}",
                id.namespace, key.namespace
            )));
        }
        let cached = self.cache.get(key);
        let sa = match cached.as_ref().and_then(as_entry) {
            Some(e) if e.spec.service_account.is_empty() => {
                workload::DEFAULT_SERVICE_ACCOUNT.to_string()
            }
            Some(e) => e.spec.service_account.clone(),
            None => match self.conns().get(key) {
                Some(c) => c.service_account.clone(),
                None => return Ok(None),
            },
        };
        if sa != id.service_account {
            tracing::warn!(namespace = %key.namespace, entry = %key.name, token_service_account = %id.service_account,
                expected = %sa, reason = "service_account_mismatch", "request refused");
            return Err(RegistryError::Forbidden(format!(
                "token service account {:?} does not own {}/{}",
                id.service_account, key.namespace, key.name
            )));
        }
        Ok(cached)
    }

    /// A liveness report. Cheap when this replica already holds the connection; otherwise
    /// a reconnect (taking the entry over from another replica if need be).
    pub async fn heartbeat(&self, id: &Identity, req: &EntryRequest) -> Result<(), RegistryError> {
        self.metrics
            .heartbeats
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = entry_key(&req.namespace, &req.name);
        let cached = self.authorize(id, &key)?;
        let now = self.clock.now();
        let Some(cached) = cached else {
            // Entry gone (group deleted, or swept). If we know the VM, register it again.
            let conn = self.conns().get(&key).cloned();
            return match conn {
                Some(c) => {
                    if let Some(c) = self.conns().get_mut(&key) {
                        c.last_seen = now;
                    }
                    self.register_inner(c.reg, &c.service_account)
                        .await
                        .map(drop)
                }
                None => Err(RegistryError::NotFound(format!(
                    "WorkloadEntry {}/{}: register again",
                    key.namespace, key.name
                ))),
            };
        };
        let entry = as_entry(&cached).ok_or_else(|| RegistryError::NotFound(key.to_string()))?;
        {
            let mut conns = self.conns();
            if let Some(c) = conns.get_mut(&key) {
                if workload::owned_by(entry, &self.settings.replica, c.conn_time) {
                    c.last_seen = now;
                    return Ok(());
                }
            }
        }
        if !is_auto_registered(entry) {
            return Err(RegistryError::Conflict(format!(
                "{}/{} is not auto-registered",
                key.namespace, key.name
            )));
        }
        // Reconnect or takeover. The connection is recorded before the write, as in
        // `register_inner`, so a sweep in between cannot find our entry without one.
        let reg = match self.conns().get(&key) {
            Some(c) => c.reg.clone(),
            // Taken over from another replica: what the entry says about the VM. Its labels
            // already include the group's, which only matters if the group is re-created.
            None => Registration {
                group: entry
                    .metadata
                    .annotations
                    .get(ANNOTATION_AUTO_REGISTRATION_GROUP)
                    .cloned()
                    .unwrap_or_default(),
                namespace: entry.metadata.namespace.clone(),
                address: entry.spec.address.clone(),
                network: entry.spec.network.clone(),
                locality: entry.spec.locality.clone(),
                labels: entry.spec.labels.clone(),
            },
        };
        let conn = Conn {
            conn_time: now,
            last_seen: now,
            reg,
            service_account: id.service_account.clone(),
        };
        let previous = self.conns().insert(key.clone(), conn);
        let replica = self.settings.replica.clone();
        let result = self
            .update_entry(&key, |e| {
                workload::connect(e, &replica, now);
                Ok(true)
            })
            .await;
        if result.is_err() {
            let mut conns = self.conns();
            match previous {
                Some(p) => conns.insert(key, p),
                None => conns.remove(&key),
            };
        }
        result.map(drop)
    }

    pub async fn health(
        &self,
        id: &Identity,
        req: &HealthRequest,
    ) -> Result<HealthResponse, RegistryError> {
        let key = entry_key(&req.namespace, &req.name);
        let probe_time = parse_rfc3339(&req.probe_time).ok_or_else(|| {
            bad(
                "probeTime",
                format!("Invalid value: {:?}: must be RFC 3339", req.probe_time),
            )
        })?;
        if req.message.len() > 1024 {
            return Err(bad("message", "Too long: at most 1024 bytes"));
        }
        if self.authorize(id, &key)?.is_none() {
            return Err(RegistryError::NotFound(format!(
                "WorkloadEntry {}/{}",
                key.namespace, key.name
            )));
        }
        let report = HealthReport {
            healthy: req.healthy,
            message: req.message.clone(),
            probe_time,
        };
        let updated = self
            .update_entry(&key, |e| {
                Ok(apply_health(e, &report) == HealthOutcome::Applied)
            })
            .await?;
        let applied = updated.is_some();
        self.metrics.health_reports.inc(if applied {
            &HealthReportOutcome::Applied
        } else {
            &HealthReportOutcome::Stale
        });
        if let Some(c) = self.conns().get_mut(&key) {
            c.last_seen = c.last_seen.max(self.clock.now());
        }
        Ok(HealthResponse { applied })
    }

    /// A clean shutdown of the VM: its auto-registered entry goes at once.
    pub async fn deregister(&self, id: &Identity, req: &EntryRequest) -> Result<(), RegistryError> {
        let key = entry_key(&req.namespace, &req.name);
        let cached = self.authorize(id, &key)?;
        self.conns().remove(&key);
        let Some(c) = cached else {
            return Err(RegistryError::NotFound(format!(
                "WorkloadEntry {}/{}",
                key.namespace, key.name
            )));
        };
        if !as_entry(&c).is_some_and(is_auto_registered) {
            return Err(RegistryError::Conflict(format!(
                "{}/{} is not auto-registered",
                key.namespace, key.name
            )));
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
