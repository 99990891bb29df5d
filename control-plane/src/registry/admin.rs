//! The admin's config changes: apply (create or update, kubectl-style) and delete.

use std::collections::BTreeMap;
use std::net::IpAddr;

use vmesh_api::time::format_rfc3339_secs;
use vmesh_istio::model::{Kind, ObjectKey, Resource, Service};
use vmesh_istio::workload::{belongs_to_group, is_auto_registered};

use super::{
    as_entry, bad, encode, new_uid, ApplyAction, ApplyOutcome, Attempt, Registry, RegistryError,
};
use crate::store::{cluster_ip_key, object_key, Precondition, Store, Txn};

/// A Service's addresses as `spec.clusterIP` and `spec.clusterIPs` give them.
fn cluster_ips(s: &Service) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in std::iter::once(&s.spec.cluster_ip).chain(&s.spec.cluster_ips) {
        if let Ok(ip) = ip.parse::<IpAddr>() {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

fn as_service(r: &Resource) -> Option<&Service> {
    match r {
        Resource::Service(s) => Some(s),
        _ => None,
    }
}

/// What one try of `apply` found: the report, and the WorkloadGroups it writes (whose live VMs
/// are re-registered once it is committed).
struct ApplyPlan {
    outcomes: Vec<ApplyOutcome>,
    groups: Vec<(String, String)>,
}

impl<S: Store> Registry<S> {
    /// Applies objects atomically, keeping uid, creation time and (for entries) status.
    pub async fn apply(
        &self,
        resources: Vec<Resource>,
    ) -> Result<Vec<ApplyOutcome>, RegistryError> {
        // Document order for the report (as kubectl prints it); a later duplicate wins.
        let mut order: Vec<ObjectKey> = Vec::new();
        let mut by_key: BTreeMap<ObjectKey, Resource> = BTreeMap::new();
        for r in resources {
            let key = ObjectKey::of(&r);
            if by_key.insert(key.clone(), r).is_none() {
                order.push(key);
            }
        }
        let ApplyPlan { outcomes, groups } = self
            .with_cas(
                || "objects kept changing during apply".into(),
                |lost| std::future::ready(self.plan_apply(&order, &by_key, lost)),
            )
            .await?;
        for (ns, g) in groups {
            self.reregister_group(&ns, &g).await;
        }
        Ok(outcomes)
    }

    /// One try of `apply` against the cache: what each object's apply does, the transaction
    /// (nothing to commit when all are unchanged), and the WorkloadGroups it writes.
    fn plan_apply(
        &self,
        order: &[ObjectKey],
        by_key: &BTreeMap<ObjectKey, Resource>,
        lost: usize,
    ) -> Result<Attempt<ApplyPlan>, RegistryError> {
        let now = self.clock.now();
        let mut txn = Txn::default();
        let mut outcomes = Vec::new();
        let mut groups = Vec::new();
        // Which Service holds which ClusterIP, to allocate around them and refuse duplicates.
        let mut ip_owners: BTreeMap<IpAddr, ObjectKey> = BTreeMap::new();
        for c in self.cache.list(Kind::Service, None) {
            if let Some(s) = as_service(&c.object) {
                for ip in cluster_ips(s) {
                    ip_owners.insert(ip, ObjectKey::of(&c.object));
                }
            }
        }
        for key in order {
            let Some(r) = by_key.get(key) else { continue };
            let mut r = r.clone();
            let existing = self.cache.get(key);
            let skey = object_key(key);
            if let Resource::Service(svc) = &mut r {
                let old = existing.as_ref().and_then(|c| as_service(&c.object));
                txn = self.settle_cluster_ip(key, svc, old, &mut ip_owners, lost, txn)?;
            }
            let meta = r.meta_mut();
            meta.resource_version.clear();
            let action = match &existing {
                Some(old) => {
                    let om = old.object.meta();
                    meta.uid = om.uid.clone();
                    meta.creation_timestamp = om.creation_timestamp.clone();
                    meta.generation = om.generation;
                    if let (Resource::WorkloadEntry(new), Resource::WorkloadEntry(o)) =
                        (&mut r, &*old.object)
                    {
                        if new.status.is_none() {
                            new.status = o.status.clone();
                        }
                    }
                    // The allocated addresses live in status, which a manifest does not carry.
                    if let (Resource::ServiceEntry(new), Resource::ServiceEntry(o)) =
                        (&mut r, &*old.object)
                    {
                        if new.status.is_none() {
                            new.status = o.status.clone();
                        }
                    }
                    if r == *old.object {
                        ApplyAction::Unchanged
                    } else {
                        r.meta_mut().generation = old.object.meta().generation + 1;
                        ApplyAction::Configured
                    }
                }
                None => {
                    meta.uid = new_uid()?;
                    meta.creation_timestamp = format_rfc3339_secs(now);
                    meta.generation = 1;
                    ApplyAction::Created
                }
            };
            outcomes.push(ApplyOutcome {
                kind: key.kind,
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                action,
            });
            if action == ApplyAction::Unchanged {
                continue;
            }
            if key.kind == Kind::WorkloadGroup {
                groups.push((key.namespace.clone(), key.name.clone()));
            }
            txn = txn
                .check(
                    skey.clone(),
                    match &existing {
                        Some(old) => Precondition::Revision(old.revision),
                        None => Precondition::Absent,
                    },
                )
                .put(skey, encode(&r));
        }
        let plan = ApplyPlan { outcomes, groups };
        Ok(if txn.ops.is_empty() {
            Attempt::Done(plan)
        } else {
            Attempt::Commit(txn, plan)
        })
    }

    /// The API server's ClusterIP rules for a Service being applied: an existing Service keeps
    /// its address (a manifest without one leaves it, a different one is refused: the field is
    /// immutable); a new one without an address gets one from the service CIDR; a requested
    /// address must be in the CIDR and free. `None` (headless) and ExternalName get none.
    /// Newly taken addresses are claimed in the store within `txn`.
    fn settle_cluster_ip(
        &self,
        key: &ObjectKey,
        svc: &mut Service,
        old: Option<&Service>,
        ip_owners: &mut BTreeMap<IpAddr, ObjectKey>,
        lost: usize,
        mut txn: Txn,
    ) -> Result<Txn, RegistryError> {
        let spec = &mut svc.spec;
        if spec.cluster_ips.is_empty() && !spec.cluster_ip.is_empty() {
            spec.cluster_ips = vec![spec.cluster_ip.clone()];
        }
        if spec.cluster_ip.is_empty() {
            if let Some(first) = spec.cluster_ips.first() {
                spec.cluster_ip = first.clone();
            }
        }
        if let Some(old) = old.filter(|o| !o.spec.cluster_ip.is_empty()) {
            if spec.cluster_ip.is_empty() {
                spec.cluster_ip = old.spec.cluster_ip.clone();
                spec.cluster_ips = old.spec.cluster_ips.clone();
            } else if spec.cluster_ip != old.spec.cluster_ip {
                return Err(bad(
                    "spec.clusterIP",
                    format!("Invalid value: {:?}: field is immutable", spec.cluster_ip),
                ));
            }
            return Ok(txn);
        }
        if spec.cluster_ip == "None" || spec.type_ == "ExternalName" {
            return Ok(txn);
        }
        let cidr = self.settings.service_cidr;
        let wanted = if spec.cluster_ip.is_empty() {
            let used = ip_owners.keys().copied().collect();
            let ip = cidr
                .allocate(&key.namespace, &key.name, &used, lost)
                .ok_or_else(|| {
                    RegistryError::Unavailable(format!(
                        "failed to allocate a ClusterIP for Service {}/{}: range {cidr} is full",
                        key.namespace, key.name
                    ))
                })?;
            spec.cluster_ip = ip.to_string();
            spec.cluster_ips = vec![spec.cluster_ip.clone()];
            vec![ip]
        } else {
            let ips = cluster_ips(svc);
            for ip in &ips {
                let refuse = |why: String| {
                    bad(
                        "spec.clusterIPs",
                        format!("Invalid value: [{ip:?}]: failed to allocate IP {ip}: {why}"),
                    )
                };
                if !cidr.contains(ip) {
                    return Err(refuse(format!(
                        "the provided IP ({ip}) is not in the valid range. The range of valid IPs is {cidr} (--service-cluster-ip-range)"
                    )));
                }
                if ip_owners.get(ip).is_some_and(|o| o != key) {
                    return Err(refuse("provided IP is already allocated".into()));
                }
            }
            ips
        };
        for ip in wanted {
            ip_owners.insert(ip, key.clone());
            let k = cluster_ip_key(&ip);
            txn = txn
                .check(k.clone(), Precondition::Absent)
                .put(k, format!("{}/{}", key.namespace, key.name).into_bytes());
        }
        Ok(txn)
    }

    /// Deletes an object; deleting a WorkloadGroup deletes its entries in the same commit.
    pub async fn delete(&self, key: &ObjectKey) -> Result<(), RegistryError> {
        self.with_cas(
            || format!("{key} kept changing"),
            move |_| async move {
                let Some(c) = self.cache.get(key) else {
                    return Err(RegistryError::NotFound(format!(
                        "{} {}/{}",
                        key.kind, key.namespace, key.name
                    )));
                };
                let skey = object_key(key);
                let mut txn = Txn::default()
                    .check(skey.clone(), Precondition::Revision(c.revision))
                    .delete(skey);
                if let Some(s) = as_service(&c.object) {
                    for ip in cluster_ips(s) {
                        txn = txn.delete(cluster_ip_key(&ip));
                    }
                }
                if key.kind == Kind::WorkloadGroup {
                    for e in self.cache.list(Kind::WorkloadEntry, Some(&key.namespace)) {
                        if as_entry(&e).is_some_and(|we| {
                            is_auto_registered(we)
                                && belongs_to_group(we, &key.namespace, &key.name)
                        }) {
                            txn = txn.delete(object_key(&ObjectKey::of(&e.object)));
                        }
                    }
                }
                Ok(Attempt::Commit(txn, ()))
            },
        )
        .await
    }
}
