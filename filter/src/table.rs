//! Moving the compiled name table from the agent (main thread) to every worker VM.
//!
//! Shared data reaches all VMs with the same `vm_id` (a shared queue would reach only one
//! worker). The image goes first under [`IMAGE_KEY`], then its version under [`VERSION_KEY`];
//! workers poll the small version key and copy the image only when it changed.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use vmesh_core::names::NameIndex;

pub const IMAGE_KEY: &str = "vmesh.names.image";
pub const VERSION_KEY: &str = "vmesh.names.version";

/// Publishes a compiled table to all workers.
pub fn publish(index: &NameIndex) -> Result<(), String> {
    hostcalls::set_shared_data(IMAGE_KEY, Some(index.image()), None)
        .map_err(|s| format!("set_shared_data({IMAGE_KEY}): {s:?}"))?;
    hostcalls::set_shared_data(VERSION_KEY, Some(index.version().as_bytes()), None)
        .map_err(|s| format!("set_shared_data({VERSION_KEY}): {s:?}"))
}

thread_local! {
    /// The table this VM loaded last, with its version key. The DoH, UDP and TCP roots of a
    /// worker run in one VM; sharing it keeps one copy per VM instead of one per root.
    static LOADED: RefCell<Option<(Vec<u8>, Rc<NameIndex>)>> = const { RefCell::new(None) };
}

/// A root's view of the published table.
#[derive(Default)]
pub struct WorkerTable {
    current: Option<Rc<NameIndex>>,
    /// Version key content last acted on, so a bad image is not re-validated every tick.
    seen: Option<Vec<u8>>,
}

impl WorkerTable {
    pub fn get(&self) -> Option<Rc<NameIndex>> {
        self.current.clone()
    }

    /// Takes a newer published table, if any. Keeps the current one when the new image is
    /// unusable: serving the last good table beats serving nothing.
    pub fn refresh(&mut self) {
        let Ok((Some(version), _)) = hostcalls::get_shared_data(VERSION_KEY) else {
            return;
        };
        if self.seen.as_deref() == Some(version.as_slice()) {
            return;
        }
        let shared = LOADED.with_borrow(|loaded| match loaded {
            Some((v, index)) if *v == version => Some(Rc::clone(index)),
            _ => None,
        });
        if let Some(index) = shared {
            self.current = Some(index);
            self.seen = Some(version);
            return;
        }
        self.seen = Some(version.clone());
        let Ok((Some(image), _)) = hostcalls::get_shared_data(IMAGE_KEY) else {
            return;
        };
        match NameIndex::from_image(image) {
            Ok(index) => {
                log::debug!(
                    "name table {} loaded ({} names)",
                    index.version(),
                    index.len()
                );
                let index = Rc::new(index);
                // Drop this root's old copy before another root could keep it alive.
                self.current = Some(Rc::clone(&index));
                LOADED.set(Some((version, index)));
            }
            Err(e) => log::error!("published name table refused, keeping the previous one: {e}"),
        }
    }
}
