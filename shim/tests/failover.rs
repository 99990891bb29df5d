//! Several control-plane addresses: the real shim binary against the real control plane
//! (`vmesh-control serve`, the debug build of this workspace unless `VMESH_CONTROL_BIN` names
//! another) and a port where nothing listens, so connections to it are refused. The shim's
//! name-table long-poll reaches the control plane without an Envoy (registration would wait
//! for one), and `vmesh-shim status --json` says which address it uses.

use std::path::{Path, PathBuf};
use std::process::Command;

use vmesh_test_support::eventually::eventually;
use vmesh_test_support::process::Proc;
use vmesh_test_support::{artifact, free_port, repo_root, TempDir};

fn control_binary() -> PathBuf {
    artifact(
        "VMESH_CONTROL_BIN",
        "debug/vmesh-control",
        "cargo build -p vmesh-control",
    )
}

fn control(data: &Path, args: &[&str]) -> String {
    let out = Command::new(control_binary())
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vmesh-control {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `vmesh-control serve` on `port` with the data in `data`, up and answering.
fn serve(dir: &Path, data: &Path, port: u16) -> Proc {
    let args: Vec<String> = [
        "serve",
        "--data-dir",
        &data.display().to_string(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--log",
        "info",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let p = Proc::spawn(
        "vmesh-control",
        &control_binary(),
        &args,
        &dir.join(format!("control-{port}.log")),
    );
    let server = format!("https://127.0.0.1:{port}");
    eventually("the control plane answers", || {
        let out = Command::new(control_binary())
            .args(["--server", &server, "--data-dir"])
            .arg(data)
            .args(["get", "workloadgroups", "-A"])
            .output()
            .map_err(|e| e.to_string())?;
        out.status
            .success()
            .then_some(())
            .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
    });
    p
}

/// `registration.controlPlane` and `nameTable.source` of the shim's status.
fn status(shim_listen: &str) -> Result<(String, String), String> {
    let out = Command::new(env!("CARGO_BIN_EXE_vmesh-shim"))
        .args(["status", "--json", "--listen", shim_listen])
        .output()
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {out:?}"))?;
    Ok((
        v["registration"]["controlPlane"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        v["nameTable"]["source"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    ))
}

/// The first address refuses connections: the shim gets its table through the second and says
/// so. The control plane then moves to the first address (restarted there on the same data):
/// the shim's connection breaks, the second address now refuses, and it follows to the first.
#[test]
fn the_shim_uses_the_address_that_answers_and_follows_the_control_plane_to_another() {
    let dir = TempDir::new();
    let data = dir.path().join("cp-data");
    let (live, dead) = (free_port(), free_port());
    let mut cp = serve(dir.path(), &data, live);
    let fixture = repo_root().join("control-plane/tests/fixtures/istio-vm.yaml");
    let server = format!("https://127.0.0.1:{live}");
    let with_server = |args: &[&str]| {
        let mut all = vec!["--server", server.as_str()];
        all.extend_from_slice(args);
        control(&data, &all)
    };
    with_server(&["apply", "-f", &fixture.display().to_string()]);
    let bundle = dir.path().join("bundle");
    with_server(&[
        "vm-bundle",
        "--group",
        "python-http",
        "-n",
        "vm-namespace",
        "-o",
        &bundle.display().to_string(),
    ]);

    let listen = format!("127.0.0.1:{}", free_port());
    let args: Vec<String> = [
        "--listen",
        &listen,
        "--upstream",
        &format!("127.0.0.1:{}", free_port()),
        "--bundle",
        &bundle.display().to_string(),
        "--state-dir",
        &dir.path().join("state").display().to_string(),
        "--resolv-conf",
        &dir.file("resolv.conf", "nameserver 198.18.0.53\n")
            .display()
            .to_string(),
        "--discovery-address",
        &format!("127.0.0.1:{dead},127.0.0.1:{live}"),
        "--log-level",
        "debug",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _shim = Proc::spawn_env(
        "vmesh-shim",
        Path::new(env!("CARGO_BIN_EXE_vmesh-shim")),
        &args,
        &[("ISTIO_SVC_IP".into(), "198.18.0.81".into())],
        &dir.path().join("shim.log"),
    );
    let uses = |port: u16| {
        eventually(&format!("the shim uses 127.0.0.1:{port}"), || {
            let (cp, source) = status(&listen)?;
            if cp.starts_with(&format!("127.0.0.1:{port} ")) && source == "controlPlane" {
                Ok(())
            } else {
                Err(format!("control plane {cp:?}, table from {source:?}"))
            }
        })
    };
    uses(live);

    cp.kill();
    let _cp = serve(dir.path(), &data, dead);
    uses(dead);
}
