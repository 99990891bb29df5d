//! `vmesh-shim status`: asks the running shim what it knows and prints it. (Being written.)

use crate::cli::StatusArgs;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("status is not built yet")]
    NotBuilt,
}

pub fn print(_args: &StatusArgs) -> Result<(), StatusError> {
    Err(StatusError::NotBuilt)
}
