//! Fixtures shared by the end-to-end tests: Envoy with the built filter, the shim, the control
//! plane, dnsmasq, a VM made of them, stub servers. The generic helpers (waiting, ports, temp
//! dirs, child processes, dig) are `vmesh-test-support`'s.

pub mod app;
pub mod control_plane;
pub mod dnsmasq;
pub mod doh;
pub mod echo;
pub mod envoy;
pub mod mesh_pki;
pub mod mtls;
pub mod shim;
pub mod sidecar;
pub mod slow_upstream;
pub mod stubs;
pub mod vm;

pub use vmesh_test_support::artifact;
