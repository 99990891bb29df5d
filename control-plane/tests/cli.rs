//! The `vmesh-control` binary as a person uses it: `serve`, then kubectl-like commands that
//! find the server's root cert and admin credential in the data dir.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::fixture;
use hyper::Method;
use serde_json::{json, Value};
use vmesh_control::client::Client;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmesh-control"))
}

fn ctl(dir: &Path, url: &str, args: &[&str]) -> Output {
    bin()
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .args(["--server", url])
        .output()
        .unwrap()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

struct Served {
    child: std::process::Child,
    url: String,
    dir: vmesh_test_support::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve() -> Served {
    let dir = vmesh_test_support::TempDir::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = bin()
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-format",
            "json",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}");
    common::wait_for_server(dir.path(), &url).await;
    Served { child, url, dir }
}

#[tokio::test]
async fn apply_get_token_vm_bundle_and_delete_from_the_command_line() {
    let s = serve().await;
    let d = s.dir.path();
    let out = ok(ctl(
        d,
        &s.url,
        &["apply", "-f", fixture("istio-vm.yaml").to_str().unwrap()],
    ));
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "workloadgroup.networking.istio.io/python-http created",
            "serviceentry.networking.istio.io/vm-workload-svc created",
            "service/mysqldb created"
        ]
    );
    let wg: Value = serde_json::from_str(&ok(ctl(
        d,
        &s.url,
        &[
            "get",
            "wg",
            "python-http",
            "-n",
            "vm-namespace",
            "-o",
            "json",
        ],
    )))
    .unwrap();
    assert_eq!(wg["spec"]["template"]["serviceAccount"], "vm-sa");
    let yaml = ok(ctl(
        d,
        &s.url,
        &["get", "serviceentries", "-n", "vm-namespace", "-o", "yaml"],
    ));
    assert!(yaml.contains("vmservice.example.com"), "{yaml}");
    let table = ok(ctl(d, &s.url, &["get", "se", "-A"]));
    assert!(
        table.lines().next().unwrap().starts_with("NAMESPACE"),
        "{table}"
    );
    assert!(table.contains("vm-workload-svc"));
    let o = ctl(d, &s.url, &["get", "gateways"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("doesn't have a resource type"));

    // token create -> a working VM token.
    let token = ok(ctl(
        d,
        &s.url,
        &[
            "token",
            "create",
            "-n",
            "vm-namespace",
            "--service-account",
            "vm-sa",
            "--ttl",
            "10m",
        ],
    ));
    let root = std::fs::read(d.join("root-cert.pem")).unwrap();
    let vm = Client::new(&s.url, &root, token.trim()).unwrap();
    let r: Value = vm
        .json(
            Method::POST,
            "/v1/register",
            Some(&json!({"group": "python-http", "address": "10.0.0.5"})),
        )
        .await
        .unwrap();
    assert_eq!(r["workloadEntry"]["name"], "python-http-10.0.0.5");
    let we = ok(ctl(d, &s.url, &["get", "we", "-n", "vm-namespace"]));
    assert!(
        we.contains("python-http-10.0.0.5") && we.contains("connected"),
        "{we}"
    );

    // vm-bundle writes istioctl's files; its token registers too.
    let out_dir = d.join("bundle");
    ok(ctl(
        d,
        &s.url,
        &[
            "vm-bundle",
            "--group",
            "python-http",
            "-n",
            "vm-namespace",
            "-o",
            out_dir.to_str().unwrap(),
        ],
    ));
    for f in [
        "cluster.env",
        "mesh.yaml",
        "root-cert.pem",
        "istio-token",
        "hosts",
    ] {
        assert!(out_dir.join(f).exists(), "{f} missing");
    }
    let env = std::fs::read_to_string(out_dir.join("cluster.env")).unwrap();
    assert!(
        env.contains("ISTIO_META_AUTO_REGISTER_GROUP='python-http'")
            && env.contains("SERVICE_ACCOUNT='vm-sa'"),
        "{env}"
    );
    let mesh = std::fs::read_to_string(out_dir.join("mesh.yaml")).unwrap();
    assert!(
        mesh.contains("discoveryAddress: istiod.istio-system.svc:"),
        "{mesh}"
    );
    assert!(mesh.contains("readinessProbe"), "{mesh}");
    assert_eq!(
        std::fs::read_to_string(out_dir.join("hosts")).unwrap(),
        "127.0.0.1 istiod.istio-system.svc\n"
    );
    let bundle_token = std::fs::read_to_string(out_dir.join("istio-token")).unwrap();
    let bundle_root = std::fs::read(out_dir.join("root-cert.pem")).unwrap();
    let vm2 = Client::new(&s.url, &bundle_root, &bundle_token).unwrap();
    vm2.json::<Value>(
        Method::POST,
        "/v1/register",
        Some(&json!({"group": "python-http", "address": "10.0.0.6"})),
    )
    .await
    .unwrap();

    assert_eq!(
        ok(ctl(
            d,
            &s.url,
            &["delete", "wg", "python-http", "-n", "vm-namespace"]
        ))
        .trim(),
        "workloadgroup.networking.istio.io/python-http deleted"
    );
    let o = ctl(
        d,
        &s.url,
        &["get", "wg", "python-http", "-n", "vm-namespace"],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("404"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[tokio::test]
async fn a_refused_file_reports_document_and_field_and_changes_nothing() {
    let s = serve().await;
    let d = s.dir.path();
    let f = d.join("bad.yaml");
    std::fs::write(&f, "apiVersion: v1\nkind: Service\nmetadata: {name: fine}\nspec: {ports: [{port: 80}]}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {name: g}\nspec:\n  template: {serviceAccount: sa}\n  probe: {httpGet: {port: 0}}\n").unwrap();
    let o = ctl(d, &s.url, &["apply", "-f", f.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("document 1") && err.contains("spec.probe.httpGet.port"),
        "{err}"
    );
    let o = ctl(d, &s.url, &["get", "svc", "fine"]);
    assert!(
        !o.status.success(),
        "the valid first document was not applied either"
    );
    std::fs::write(&f, "a: [unclosed\n").unwrap();
    let o = ctl(d, &s.url, &["apply", "-f", f.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid YAML"));
}

#[test]
fn serve_refuses_bad_flags_before_binding() {
    let dir = vmesh_test_support::TempDir::new();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let unreachable = format!("http://127.0.0.1:{}", vmesh_test_support::free_port());
    for args in [
        vec!["--heartbeat-interval", "20s", "--liveness-timeout", "10s"],
        vec!["--grace-period", "0s"],
        vec!["--jwks", "https://issuer=/does/not/exist.json"],
        vec!["--grace-period", "tomorrow"],
        vec!["--store", "etcd"],
        vec!["--store", "etcd", "--etcd-endpoints", "127.0.0.1:2379"],
        vec!["--etcd-endpoints", "http://127.0.0.1:2379"],
        vec![
            "--store",
            "etcd",
            "--etcd-endpoints",
            "https://127.0.0.1:2379",
            "--etcd-cert",
            "c.pem",
        ],
        // Nothing listens there: the store cannot be opened, so nothing is bound.
        vec!["--store", "etcd", "--etcd-endpoints", &unreachable],
    ] {
        let o = bin()
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(&args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} accepted");
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "{args:?}: port was bound"
        );
    }
}
