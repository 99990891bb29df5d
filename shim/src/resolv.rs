//! Following resolv.conf while the shim runs (when the upstreams come from it).
//!
//! DHCP clients, NetworkManager and cloud agents rewrite resolv.conf; the VM's DNS must follow
//! without a restart. The file is polled like the name table (`names.rs`): a cheap metadata
//! fingerprint each tick, a re-read when it changed. A file that became unreadable or lists no
//! usable resolver keeps the previous upstreams: forwarding somewhere beats forwarding nowhere.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{read_resolv_conf, without_self, ResolvWatch};
use crate::forwarder::Forwarder;
use crate::names::Fingerprint;

/// How often resolv.conf is looked at.
pub const POLL: Duration = Duration::from_secs(1);

/// Polls `w.path` until `stop` changes, replacing the forwarder's upstreams on each change.
pub fn follow(w: ResolvWatch, forwarder: Arc<Forwarder>, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut seen = std::fs::metadata(&w.path).ok().map(|m| Fingerprint::of(&m));
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => check(&w, &forwarder, &mut seen).await,
                _ = stop.changed() => break,
            }
        }
    });
}

async fn check(w: &ResolvWatch, forwarder: &Forwarder, seen: &mut Option<Fingerprint>) {
    let now = match tokio::fs::metadata(&w.path).await {
        Ok(meta) => Fingerprint::of(&meta),
        Err(error) => {
            if seen.take().is_some() {
                tracing::warn!(path = %w.path.display(), %error,
                    upstreams = ?forwarder.upstreams(),
                    "resolv.conf unreadable; keeping the current upstreams");
            }
            return;
        }
    };
    if *seen == Some(now) && !now.is_recent() {
        return;
    }
    *seen = Some(now);
    let path = w.path.clone();
    // Small file, blocking read: off the runtime's worker threads all the same.
    let read = tokio::task::spawn_blocking(move || read_resolv_conf(&path)).await;
    let found = match read {
        Ok(Ok(found)) => found,
        Ok(Err(error)) => {
            tracing::warn!(path = %w.path.display(), %error,
                "resolv.conf unreadable; keeping the current upstreams");
            *seen = None;
            return;
        }
        Err(error) => {
            tracing::warn!(%error, "resolv.conf read task failed; keeping the current upstreams");
            return;
        }
    };
    let upstreams = without_self(found, &w.own);
    if upstreams.is_empty() {
        tracing::warn!(path = %w.path.display(), upstreams = ?forwarder.upstreams(),
            "resolv.conf lists no usable resolver; keeping the current upstreams");
        return;
    }
    if *forwarder.upstreams() != *upstreams {
        tracing::info!(path = %w.path.display(), ?upstreams, "resolv.conf changed; new upstreams");
        forwarder.set_upstreams(upstreams);
    }
}
