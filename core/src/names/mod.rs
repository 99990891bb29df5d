//! Mesh names: the JSON table ([`table`]) and its compiled, shareable form ([`index`]).

pub mod index;
/// The name table as it travels (defined once, in `vmesh-api`).
pub use vmesh_api::names as table;

pub use index::{canonical_host, Match, NameIndex, Record};
pub use table::{
    Endpoint, NameInfo, NameTable, PortRoutes, Registry, ServiceRoutes, DEFAULT_DOMAIN,
};

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("name table is not valid JSON of the expected shape: {0}")]
    Json(#[from] crate::json::JsonError),
    #[error("name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("name {0:?} appears twice (names compare case-insensitively)")]
    Duplicate(String),
    #[error("name table too large")]
    TooLarge,
    #[error("compiled name table image is corrupt: {0}")]
    BadImage(&'static str),
}
