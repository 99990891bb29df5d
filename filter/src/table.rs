//! The compiled name table on its way from the agent to every worker ([`crate::published`]).

use std::borrow::Cow;
use std::cell::RefCell;
use std::thread::LocalKey;

use vmesh_core::names::NameIndex;

use crate::published::{self, Loaded, Published};

pub const IMAGE_KEY: &str = "vmesh.names.image";
pub const VERSION_KEY: &str = "vmesh.names.version";

thread_local! {
    static LOADED: Loaded<NameIndex> = const { RefCell::new(None) };
}

impl Published for NameIndex {
    const IMAGE_KEY: &'static str = IMAGE_KEY;
    const VERSION_KEY: &'static str = VERSION_KEY;
    const WHAT: &'static str = "name table";

    fn image(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(NameIndex::image(self))
    }
    fn version(&self) -> &str {
        NameIndex::version(self)
    }
    fn entries(&self) -> usize {
        NameIndex::len(self)
    }
    fn from_image(image: Vec<u8>) -> Result<Self, String> {
        NameIndex::from_image(image).map_err(|e| e.to_string())
    }
    fn loaded() -> &'static LocalKey<Loaded<Self>> {
        &LOADED
    }
}

/// Publishes a compiled name table to all workers.
pub fn publish(index: &NameIndex) -> Result<(), String> {
    published::publish(index)
}

/// A root's view of the published name table.
pub type WorkerTable = published::Worker<NameIndex>;
