//! The admin's config changes: apply (create or update, kubectl-style) and delete.

use std::collections::BTreeMap;

use vmesh_api::time::format_rfc3339_secs;
use vmesh_istio::model::{Kind, ObjectKey, Resource};
use vmesh_istio::workload::{belongs_to_group, is_auto_registered};

use super::{
    as_entry, encode, new_uid, ApplyAction, ApplyOutcome, Attempt, Registry, RegistryError,
};
use crate::store::{object_key, Precondition, Store, Txn};

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
                |_| std::future::ready(self.plan_apply(&order, &by_key)),
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
    ) -> Result<Attempt<ApplyPlan>, RegistryError> {
        let now = self.clock.now();
        let mut txn = Txn::default();
        let mut outcomes = Vec::new();
        let mut groups = Vec::new();
        for key in order {
            let Some(r) = by_key.get(key) else { continue };
            let mut r = r.clone();
            let existing = self.cache.get(key);
            let skey = object_key(key);
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
