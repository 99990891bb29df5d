//! Moving a compiled index from the agent (main thread) to every worker VM: the name table
//! ([`crate::table`]) and the routing table ([`crate::routes`]) travel the same way.
//!
//! Shared data reaches all VMs with the same `vm_id` (a shared queue would reach only one
//! worker). The image goes first under its image key, then its version under its version key;
//! workers poll the small version key and copy the image only when it changed.

use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;
use std::thread::LocalKey;

use proxy_wasm::hostcalls;

/// The index a VM built last, with the version key it came from.
pub type Loaded<T> = RefCell<Option<(Vec<u8>, Rc<T>)>>;

/// An index the agent compiles once and every worker rebuilds from its image.
pub trait Published: Sized + 'static {
    const IMAGE_KEY: &'static str;
    const VERSION_KEY: &'static str;
    /// What the log calls it ("name table", "routing table").
    const WHAT: &'static str;

    /// The image to publish (borrowed where the index keeps it as bytes already).
    fn image(&self) -> Cow<'_, [u8]>;
    fn version(&self) -> &str;
    /// How many entries it holds, for the log.
    fn entries(&self) -> usize;
    fn from_image(image: Vec<u8>) -> Result<Self, String>;
    /// The index this VM built last, with its version key, shared by the VM's roots (the
    /// DoH, UDP and TCP roots of a worker run in one VM: one copy per VM, not per root).
    /// A thread-local per type, because statics cannot be generic.
    fn loaded() -> &'static LocalKey<Loaded<Self>>;
}

/// Publishes a compiled index to all workers.
pub fn publish<T: Published>(index: &T) -> Result<(), String> {
    hostcalls::set_shared_data(T::IMAGE_KEY, Some(&index.image()), None)
        .map_err(|s| format!("set_shared_data({}): {s:?}", T::IMAGE_KEY))?;
    hostcalls::set_shared_data(T::VERSION_KEY, Some(index.version().as_bytes()), None)
        .map_err(|s| format!("set_shared_data({}): {s:?}", T::VERSION_KEY))
}

/// A root's view of a published index.
pub struct Worker<T> {
    current: Option<Rc<T>>,
    /// Version key content last acted on, so a bad image is not re-validated every tick.
    seen: Option<Vec<u8>>,
}

impl<T> Default for Worker<T> {
    fn default() -> Self {
        Worker {
            current: None,
            seen: None,
        }
    }
}

impl<T: Published> Worker<T> {
    pub fn get(&self) -> Option<Rc<T>> {
        self.current.clone()
    }

    /// Takes a newer published index, if any. Keeps the current one when the new image is
    /// unusable: serving the last good table beats serving nothing.
    pub fn refresh(&mut self) {
        let Ok((Some(version), _)) = hostcalls::get_shared_data(T::VERSION_KEY) else {
            return;
        };
        if self.seen.as_deref() == Some(version.as_slice()) {
            return;
        }
        let shared = T::loaded().with_borrow(|loaded| match loaded {
            Some((v, index)) if *v == version => Some(Rc::clone(index)),
            _ => None,
        });
        if let Some(index) = shared {
            self.current = Some(index);
            self.seen = Some(version);
            return;
        }
        self.seen = Some(version.clone());
        let Ok((Some(image), _)) = hostcalls::get_shared_data(T::IMAGE_KEY) else {
            return;
        };
        match T::from_image(image) {
            Ok(index) => {
                log::debug!(
                    "{} {} loaded ({} entries)",
                    T::WHAT,
                    index.version(),
                    index.entries()
                );
                let index = Rc::new(index);
                // Drop this root's old copy before another root could keep it alive.
                self.current = Some(Rc::clone(&index));
                T::loaded().set(Some((version, index)));
            }
            Err(e) => log::error!(
                "published {} refused, keeping the previous one: {e}",
                T::WHAT
            ),
        }
    }
}
