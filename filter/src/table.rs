//! Moving the compiled name table from the agent (main thread) to every worker VM.
//!
//! Shared data reaches all VMs with the same `vm_id` (a shared queue would reach only one
//! worker). The image goes first under [`IMAGE_KEY`], then its version under [`VERSION_KEY`];
//! workers poll the small version key and copy the image only when it changed.

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

/// A worker's copy of the published table.
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
        self.seen = Some(version);
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
                self.current = Some(Rc::new(index));
            }
            Err(e) => log::error!("published name table refused, keeping the previous one: {e}"),
        }
    }
}
