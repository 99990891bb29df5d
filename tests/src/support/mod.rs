//! Fixtures shared by the end-to-end tests: Envoy with the built filter, the shim, the control
//! plane, dnsmasq, a VM made of them, stub servers. The generic helpers (waiting, ports, temp
//! dirs, child processes, dig) are `vmesh-test-support`'s.

pub mod app;
pub mod control_plane;
pub mod dnsmasq;
pub mod doh;
pub mod envoy;
pub mod shim;
pub mod sidecar;
pub mod slow_upstream;
pub mod stubs;
pub mod vm;

use std::path::PathBuf;

use vmesh_test_support::repo_root;

/// A built artifact under `target/`, or a panic that says how to build it.
pub fn artifact(env: &str, relative: &str, build: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let path = repo_root().join("target").join(relative);
    assert!(
        path.exists(),
        "{} is missing: build it with `{build}` (or set {env})",
        path.display()
    );
    path
}
