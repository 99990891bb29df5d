//! Fixtures and helpers shared by the end-to-end tests.

pub mod app;
pub mod control_plane;
pub mod dig;
pub mod dnsmasq;
pub mod doh;
pub mod envoy;
pub mod eventually;
pub mod process;
pub mod shim;
pub mod sidecar;
pub mod slow_upstream;
pub mod stubs;
pub mod vm;

use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;

/// The workspace root (tests run with the `tests/` crate as their directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A port free for both UDP and TCP on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind a TCP port");
        let port = tcp.local_addr().expect("local addr").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

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
