//! vmesh-test-support: the helpers every vmesh test suite shares (the end-to-end tests in
//! `tests/`, the shim's and the control plane's integration tests).
//!
//! - [`eventually`]: wait for a condition with a patience setting instead of sleeping;
//! - [`free_port`] and [`TempDir`]: per-test ports on 127.0.0.1 and temp dirs;
//! - [`process`]: child processes that die with the test thread that started them;
//! - [`dig`]: BIND's `dig`, run and parsed;
//! - [`etcd`]: a real etcd member on free ports, removed with the test;
//! - [`netns`]: network namespaces (198.18.0.0/15 addresses), programs run inside them, and
//!   the rule for when a namespace test may skip.
//!
//! It has no Wasm host and no vmesh crate in it, so a suite that uses it builds none of them.

pub mod dig;
pub mod etcd;
pub mod eventually;
pub mod netns;
pub mod process;

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A built artifact under the workspace's `target/` (`relative`, e.g. `release/vmesh-shim`), or
/// the path in `env` when it is set; a panic that says how to build it when it is missing.
/// `scripts/build.sh` builds every artifact the suites use.
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

/// `program` found on `PATH`, as the shell would find it.
pub fn which(program: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The ports [`free_port`] hands out: below Linux's default ephemeral range (32768-60999), so
/// no outgoing socket (the shim's upstream pool, a client, etcd's peers) can take one between
/// the moment it is found free and the moment the program under test binds it. A port taken
/// from the ephemeral range with `bind(:0)` and released raced exactly that way in CI (Envoy:
/// "cannot bind ... Address already in use").
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port free for both UDP and TCP on 127.0.0.1 right now, never the same one twice in a
/// process (until the range wraps). Processes start at different offsets (by pid), so test
/// binaries running side by side rarely probe the same ports, and a port in use is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    // The first caller picks this process's offset; the loser of a race keeps the winner's.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = TEST_PORTS.start + offset as u16;
        let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) else {
            continue;
        };
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            drop(tcp);
            return port;
        }
    }
    panic!("no free port in {TEST_PORTS:?} on 127.0.0.1");
}

/// A directory removed when dropped. Readable by every user (0755), because tests run programs
/// as other users (the shim as Envoy's proxy user, dnsmasq as nobody) on files in it.
#[derive(Debug)]
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("vmesh-test-")
            .tempdir()
            .expect("create a temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("make the temp dir readable");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Writes `content` to `name` in the directory and returns its path.
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, content).expect("write a file in the temp dir");
        p
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        self.path()
    }
}
