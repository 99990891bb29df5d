//! Traffic capture: iptables rules that send the VM's DNS, outbound and inbound TCP through
//! Envoy, as Istio's VM setup does. (Being written.)

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct CaptureArgs {}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("traffic capture is not built yet")]
    NotBuilt,
}

pub fn install(_args: &CaptureArgs) -> Result<(), CaptureError> {
    Err(CaptureError::NotBuilt)
}

pub fn remove(_args: &CaptureArgs) -> Result<(), CaptureError> {
    Err(CaptureError::NotBuilt)
}
