//! The periodic work of [`Registry::tick`]: this replica's liveness lease, VMs that went quiet,
//! entries past their grace period or whose replica is gone, and live VMs whose group came back.

use std::collections::BTreeSet;

use vmesh_istio::model::{Kind, ObjectKey};
use vmesh_istio::workload::{self, controller_of, is_auto_registered, is_health_checked, Sweep};

use super::{as_entry, entry_key, Conn, Registry, RegistryError};
use crate::clock::nanos;
use crate::identity::Identity;
use crate::store::Store;

impl<S: Store> Registry<S> {
    /// Periodic work: lease, liveness timeouts, sweep, re-registration into re-created groups.
    pub async fn tick(&self) -> Result<(), RegistryError> {
        let now = self.clock.now();
        let renewed = self
            .store
            .keep_alive(&self.settings.replica, self.settings.lease_ttl)
            .await;
        self.lease_held
            .store(renewed.is_ok(), std::sync::atomic::Ordering::Relaxed);
        renewed?;
        let leases = self.store.leases().await?;
        self.saw_leases(leases.keys().cloned(), now);
        self.limiter.prune(now);

        // VMs that went quiet.
        let timeout = nanos(self.settings.liveness_timeout);
        let mut quiet = Vec::new();
        self.conns().retain(|k, c| {
            let keep = now.saturating_sub(c.last_seen) <= timeout;
            if !keep {
                quiet.push((k.clone(), c.conn_time));
            }
            keep
        });
        for (key, conn_time) in quiet {
            let replica = self.settings.replica.clone();
            match self
                .update_entry(&key, |e| {
                    Ok(workload::disconnect(e, &replica, conn_time, now))
                })
                .await
            {
                Ok(Some(_)) => {
                    tracing::debug!(entry = %key.name, namespace = %key.namespace, "VM disconnected")
                }
                Ok(None) | Err(RegistryError::NotFound(_)) => {}
                Err(e) => tracing::warn!(entry = %key.name, error = %e, "disconnect not recorded"),
            }
        }

        // Sweep entries.
        let grace = nanos(self.settings.grace);
        let groups: BTreeSet<(String, String)> = self
            .cache
            .list(Kind::WorkloadGroup, None)
            .iter()
            .map(|c| {
                (
                    c.object.meta().namespace.clone(),
                    c.object.meta().name.clone(),
                )
            })
            .collect();
        let entries = self.cache.list(Kind::WorkloadEntry, None);
        for c in entries {
            let Some(e) = as_entry(&c) else { continue };
            if !is_auto_registered(e) && !is_health_checked(e) {
                continue;
            }
            let key = entry_key(&e.metadata.namespace, &e.metadata.name);
            let alive = |ctl: &str| {
                if ctl == self.settings.replica {
                    self.conns().contains_key(&key)
                } else {
                    leases.contains_key(ctl)
                }
            };
            // Whether the group still exists does not matter (an imported entry of a missing
            // group lives until it is disconnected past grace); deleting a group deletes its
            // entries in the same commit.
            let decision = workload::sweep(e, now, grace, alive);
            let r = match decision {
                Sweep::Keep { .. } => Ok(()),
                Sweep::Delete => self.delete_entry_at(&key, c.revision).await,
                Sweep::ClearHealth => {
                    tracing::info!(entry = %key.name, namespace = %key.namespace,
                        "health-checked entry disconnected past the grace period; removing its health");
                    let mut e = e.clone();
                    workload::clear_health(&mut e);
                    self.put_entry_at(&key, c.revision, e).await
                }
                Sweep::MarkDisconnected => {
                    tracing::info!(entry = %key.name, namespace = %key.namespace,
                        controller = controller_of(e).unwrap_or_default(), "entry's replica is gone; marking disconnected");
                    let mut e = e.clone();
                    workload::mark_stale(&mut e, now);
                    self.put_entry_at(&key, c.revision, e).await
                }
            };
            match r {
                // A reconnect won the race: fine, the entry is alive again.
                Ok(()) | Err(RegistryError::Conflict(_)) => {}
                Err(e) => tracing::warn!(entry = %key.name, error = %e, "sweep write failed"),
            }
        }

        self.forget_gone(&leases).await;

        // Live VMs whose entry is gone while their group exists again.
        let missing: Vec<(String, String)> = {
            let conns = self.conns();
            conns
                .iter()
                .filter(|(k, _)| self.cache.get(k).is_none())
                .filter_map(|(_, c)| c.reg.as_ref())
                .map(|r| (r.namespace.clone(), r.group.clone()))
                .filter(|g| groups.contains(g))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        for (ns, g) in missing {
            self.reregister_group(&ns, &g).await;
        }
        Ok(())
    }

    /// Re-creates entries of this replica's live connections into a (re-)created group.
    pub async fn reregister_group(&self, namespace: &str, group: &str) {
        let conns: Vec<(ObjectKey, Conn)> = self
            .conns()
            .iter()
            .filter(|(_, c)| {
                c.reg
                    .as_ref()
                    .is_some_and(|r| r.namespace == namespace && r.group == group)
            })
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        for (key, c) in conns {
            let Some(reg) = c.reg else { continue };
            if self.cache.get(&key).is_some() {
                continue;
            }
            let id = Identity {
                namespace: reg.namespace.clone(),
                service_account: c.service_account.clone(),
                issuer: String::new(),
            };
            match self.register_inner(reg, &id).await {
                Ok(_) => {
                    tracing::info!(entry = %key.name, namespace, "re-registered into re-created group")
                }
                Err(e) => {
                    tracing::warn!(entry = %key.name, namespace, error = %e, "re-registration failed")
                }
            }
        }
    }
}
