//! Ctrl-C and SIGTERM: remembered, so the scenario stops at its next step or wait and its
//! guards tear everything down, instead of the process dying with namespaces, firewall rules
//! and programs left behind.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Starts listening for SIGINT and SIGTERM on a thread of its own.
pub fn install() -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    // Registered here, before the thread starts, so a signal right after `install` returns is
    // not the default action (death).
    let (mut int, mut term) = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    std::thread::spawn(move || {
        rt.block_on(async {
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                REQUESTED.store(true, Ordering::SeqCst);
            }
        })
    });
    Ok(())
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
