//! The compiled routing table on its way from the agent to every worker, as the names travel
//! ([`crate::published`]).

use std::borrow::Cow;
use std::cell::RefCell;
use std::thread::LocalKey;

use vmesh_core::routes::RouteIndex;

use crate::published::{self, Loaded, Published};

pub const IMAGE_KEY: &str = "vmesh.routes.image";
pub const VERSION_KEY: &str = "vmesh.routes.version";

thread_local! {
    static LOADED: Loaded<RouteIndex> = const { RefCell::new(None) };
}

impl Published for RouteIndex {
    const IMAGE_KEY: &'static str = IMAGE_KEY;
    const VERSION_KEY: &'static str = VERSION_KEY;
    const WHAT: &'static str = "routing table";

    fn image(&self) -> Cow<'_, [u8]> {
        Cow::Owned(RouteIndex::image(self))
    }
    fn version(&self) -> &str {
        RouteIndex::version(self)
    }
    fn entries(&self) -> usize {
        RouteIndex::len(self)
    }
    fn from_image(image: Vec<u8>) -> Result<Self, String> {
        RouteIndex::from_image(&image).map_err(|e| e.to_string())
    }
    fn loaded() -> &'static LocalKey<Loaded<Self>> {
        &LOADED
    }
}

/// Publishes a compiled routing table to all workers.
pub fn publish(index: &RouteIndex) -> Result<(), String> {
    published::publish(index)
}

/// A root's view of the published routing table.
pub type WorkerRoutes = published::Worker<RouteIndex>;
