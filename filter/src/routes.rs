//! Moving the compiled routing table from the agent to every worker VM, as [`crate::table`]
//! does for names: the image under [`IMAGE_KEY`], then its version under [`VERSION_KEY`];
//! workers poll the version on their tick and rebuild the index only when it changed.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use vmesh_core::routes::RouteIndex;

pub const IMAGE_KEY: &str = "vmesh.routes.image";
pub const VERSION_KEY: &str = "vmesh.routes.version";

/// Publishes a compiled routing table to all workers.
pub fn publish(index: &RouteIndex) -> Result<(), String> {
    hostcalls::set_shared_data(IMAGE_KEY, Some(&index.image()), None)
        .map_err(|s| format!("set_shared_data({IMAGE_KEY}): {s:?}"))?;
    hostcalls::set_shared_data(VERSION_KEY, Some(index.version().as_bytes()), None)
        .map_err(|s| format!("set_shared_data({VERSION_KEY}): {s:?}"))
}

thread_local! {
    /// The index this VM built last, with its version key, shared by the VM's roots.
    static LOADED: RefCell<Option<(Vec<u8>, Rc<RouteIndex>)>> = const { RefCell::new(None) };
}

/// A root's view of the published routing table.
#[derive(Default)]
pub struct WorkerRoutes {
    current: Option<Rc<RouteIndex>>,
    seen: Option<Vec<u8>>,
}

impl WorkerRoutes {
    pub fn get(&self) -> Option<Rc<RouteIndex>> {
        self.current.clone()
    }

    /// Takes a newer published table, if any; keeps the current one when the new image is
    /// unusable.
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
        match RouteIndex::from_image(&image) {
            Ok(index) => {
                log::debug!(
                    "routing table {} loaded ({} service ports)",
                    index.version(),
                    index.len()
                );
                let index = Rc::new(index);
                self.current = Some(Rc::clone(&index));
                LOADED.set(Some((version, index)));
            }
            Err(e) => log::error!("published routing table refused, keeping the previous one: {e}"),
        }
    }
}
