//! Worker liveness for the agent's reports: every DNS root's periodic table check stamps the
//! time in shared data under [`WORKER_TICK_KEY`]; the agent reads it and reports how long ago
//! a worker last showed life. One key for all workers: it holds the latest tick of any of
//! them. No cost per query.
//!
//! Envoy runs each plugin's timer on the main thread too (its thread-local VMs include the
//! main thread's), and there the DNS roots share the VM with the agent, as they share its
//! `vm_id`. Those ticks prove nothing about the workers, so a VM that runs the agent does not
//! stamp (verified in Envoy 1.40: the main thread's DNS roots see the agent's state).

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

use proxy_wasm::hostcalls;

pub const WORKER_TICK_KEY: &str = "vmesh.worker.tick";

thread_local! {
    /// This VM runs the agent: it is the main thread's.
    static MAIN_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Called when the agent starts in this VM.
pub fn agent_runs_here() {
    MAIN_THREAD.set(true);
}

pub fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Called on a DNS root's tick.
pub fn record_worker_tick() {
    if MAIN_THREAD.get() {
        return;
    }
    let Ok(now) = hostcalls::get_current_time() else {
        return;
    };
    if let Err(e) =
        hostcalls::set_shared_data(WORKER_TICK_KEY, Some(&nanos(now).to_le_bytes()), None)
    {
        log::debug!("worker tick not recorded: {e:?}");
    }
}

/// Milliseconds since a worker last ticked, as of `now`; `None` before any has.
pub fn worker_idle_ms(now: SystemTime) -> Option<u64> {
    let Ok((Some(bytes), _)) = hostcalls::get_shared_data(WORKER_TICK_KEY) else {
        return None;
    };
    let tick = u64::from_le_bytes(<[u8; 8]>::try_from(bytes.as_slice()).ok()?);
    Some(nanos(now).saturating_sub(tick) / 1_000_000)
}
