//! Stamps the git commit into the module so Envoy's log says which build is running.
use std::process::Command;

fn main() {
    let hash = std::env::var("VMESH_GIT_HASH")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string())
        });
    println!(
        "cargo:rustc-env=VMESH_GIT_HASH={}",
        hash.unwrap_or_else(|| "unknown".into())
    );
    println!("cargo:rerun-if-env-changed=VMESH_GIT_HASH");
    println!("cargo:rerun-if-changed=../.git/HEAD");
}
