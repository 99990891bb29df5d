//! Configuration: upstream selection, the mode and the VM bundle, refusal to start, and the
//! built binary's behaviour (errors before any port is bound, env fallbacks, graceful exit on
//! SIGTERM).

mod support;

use std::io::BufRead;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser;
use support::*;
use vmesh_shim::bundle::{AddressSource, BundlePaths, Machine, VarSource};
use vmesh_shim::config::{
    ConfigError, Mode, RunArgs, Settings, ENV_BUNDLE, ENV_LISTEN, ENV_STATE_DIR, ENV_UPSTREAMS,
};
use vmesh_shim::interfaces::InterfaceAddr;

fn validate(args: &[&str]) -> Result<Settings, Vec<ConfigError>> {
    validate_with(args, &[], &no_istio())
}

/// Validates as the binary would on a VM whose only address is 10.0.0.5 on eth0, whose process
/// environment is `env`, and whose Istio default paths are `istio`.
fn validate_with(
    args: &[&str],
    env: &[(&str, &str)],
    istio: &BundlePaths,
) -> Result<Settings, Vec<ConfigError>> {
    let mut argv = vec!["vmesh-shim"];
    argv.extend_from_slice(args);
    let lookup = |name: &str| {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let machine = Machine {
        env: &lookup,
        addrs: &vm_addrs,
        // The fixture's token expires one day; the tests do not.
        now_unix: 0,
    };
    RunArgs::try_parse_from(argv)
        .unwrap()
        .validate_on(&machine, istio)
        .map_err(|e| e.0)
}

fn vm_addrs() -> std::io::Result<Vec<InterfaceAddr>> {
    Ok(vec![
        InterfaceAddr {
            interface: "lo".into(),
            index: 1,
            ip: "127.0.0.1".parse().unwrap(),
            transient: false,
        },
        InterfaceAddr {
            interface: "eth0".into(),
            index: 2,
            ip: "10.0.0.5".parse().unwrap(),
            transient: false,
        },
    ])
}

/// Istio's default paths, pointed where nothing is: the machine running the tests must not
/// decide the mode.
fn no_istio() -> BundlePaths {
    let mut p = BundlePaths::in_dir(Path::new("/nonexistent/vmesh-shim-test-istio"));
    p.mesh_config_named = false;
    p.hosts_named = false;
    p
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn resolv_conf_nameservers_are_the_upstreams_on_port_53() {
    let dir = TempDir::new();
    let conf = dir.file(
        "resolv.conf",
        "# comment\nsearch example\nnameserver 10.0.0.2\nnameserver 2001:db8::53\noptions rotate\n",
    );
    let s = validate(&["--resolv-conf", conf.to_str().unwrap()]).unwrap();
    assert_eq!(s.upstreams, addrs(&["10.0.0.2:53", "[2001:db8::53]:53"]));
}

#[test]
fn upstream_flags_replace_resolv_conf_entirely() {
    let s = validate(&[
        "--resolv-conf",
        "/nonexistent/resolv.conf",
        "--upstream",
        "10.1.1.1:5353",
        "--upstream",
        "[::1]:53",
    ])
    .unwrap();
    assert_eq!(s.upstreams, addrs(&["10.1.1.1:5353", "[::1]:53"]));
}

#[test]
fn upstreams_that_are_the_shim_or_its_envoy_listener_are_dropped() {
    let dir = TempDir::new();
    let conf = dir.file("resolv.conf", "nameserver 127.0.0.1\nnameserver 10.0.0.2\n");
    let s = validate(&[
        "--listen",
        "127.0.0.1:53",
        "--resolv-conf",
        conf.to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(
        s.upstreams,
        addrs(&["10.0.0.2:53"]),
        "the listen address is self"
    );

    let s = validate(&[
        "--upstream",
        "127.0.0.1:15053",
        "--upstream",
        "10.0.0.2:53",
        "--upstream",
        "127.0.0.1:5300",
        "--self-addr",
        "0.0.0.0:5300",
        "--self-addr",
        "127.0.0.1:15053",
    ])
    .unwrap();
    assert_eq!(s.upstreams, addrs(&["10.0.0.2:53"]));
}

#[test]
fn no_upstream_left_is_a_configuration_error() {
    let dir = TempDir::new();
    let empty = dir.file("resolv.conf", "search example\n");
    let errors = validate(&["--resolv-conf", empty.to_str().unwrap()]).unwrap_err();
    assert!(
        matches!(errors[..], [ConfigError::NoUpstreams { .. }]),
        "{errors:?}"
    );

    let errors = validate(&["--upstream", "127.0.0.1:15053"]).unwrap_err();
    assert!(
        matches!(errors[..], [ConfigError::NoUpstreams { .. }]),
        "{errors:?}"
    );

    let errors = validate(&["--resolv-conf", "/nonexistent/resolv.conf"]).unwrap_err();
    assert!(
        matches!(errors[..], [ConfigError::ResolvConf { .. }]),
        "{errors:?}"
    );
}

#[test]
fn every_bad_flag_is_reported_together() {
    let errors = validate(&[
        "--listen",
        "localhost:15020",
        "--upstream",
        "dns.example:53",
        "--self-addr",
        "::1:53",
        "--forward-timeout",
        "soon",
        "--log-level",
        "info,[",
        "--static-names",
        "/nonexistent/names.json",
    ])
    .unwrap_err();
    let kinds: Vec<&str> = errors
        .iter()
        .map(|e| match e {
            ConfigError::Listen(_) => "listen",
            ConfigError::Upstream(_) => "upstream",
            ConfigError::SelfAddr(_) => "self-addr",
            ConfigError::ForwardTimeout(_) => "forward-timeout",
            ConfigError::LogLevel { .. } => "log-level",
            ConfigError::ResolvConf { .. } => "resolv-conf",
            ConfigError::NoUpstreams { .. } => "no-upstreams",
            ConfigError::Names(_) => "static-names",
            other => panic!("unexpected {other}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "log-level",
            "listen",
            "self-addr",
            "forward-timeout",
            "upstream",
            "no-upstreams",
            "static-names"
        ]
    );
}

#[test]
fn invalid_static_names_file_refuses_to_start() {
    let dir = TempDir::new();
    let bad = dir.file(
        "names.json",
        r#"{"version":"v1","namespace":"a","names":{"x..y":{"ips":[],"registry":"External"}}}"#,
    );
    let errors = validate(&[
        "--upstream",
        "10.0.0.2:53",
        "--static-names",
        bad.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(matches!(errors[..], [ConfigError::Names(_)]), "{errors:?}");
    assert!(errors[0].to_string().contains("x..y"), "{}", errors[0]);
}

fn shim_binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmesh-shim"));
    cmd.env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

#[test]
fn binary_refuses_to_start_without_upstreams_before_binding() {
    let dir = TempDir::new();
    let empty = dir.file("resolv.conf", "");
    // Hold the port: a binary that tried to bind first would fail with "address in use".
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let out = shim_binary()
        .args(["--listen", &held.local_addr().unwrap().to_string()])
        .args(["--resolv-conf", empty.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no upstream resolver left"), "{stderr}");
    assert!(!stderr.contains("cannot listen"), "{stderr}");
}

#[test]
fn binary_reports_all_errors_at_once() {
    let out = shim_binary()
        .args([
            "--listen",
            "nope",
            "--forward-timeout",
            "0s",
            "--upstream",
            "x",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for flag in ["--listen", "--forward-timeout", "--upstream"] {
        assert!(stderr.contains(flag), "{flag} missing from: {stderr}");
    }
}

#[tokio::test]
async fn binary_reads_env_fallbacks_and_exits_cleanly_on_sigterm() {
    let dns = DnsServer::start(Behaviour::Answer, "192.0.2.9".parse().unwrap()).await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = ChildGuard(
        shim_binary()
            .env(ENV_LISTEN, listen.to_string())
            .env(ENV_UPSTREAMS, dns.addr.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let http = Http::h1(listen);
    assert_eventually_async("the binary serves /healthz", || async {
        tokio::net::TcpStream::connect(listen).await.is_ok()
    })
    .await;
    let q = query(7, "env.example", A, None);
    let reply = http.dns(&q, Some("udp")).await;
    assert_eq!(reply.body, dns.answer_for(&q, Proto::Udp));

    let pid = child.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut exit = None;
    assert_eventually_async("exit after SIGTERM", || {
        exit = exit.or_else(|| child.0.try_wait().unwrap());
        std::future::ready(exit.is_some())
    })
    .await;
    assert!(exit.unwrap().success(), "{exit:?}");
}

// --- The VM bundle and the mode ---------------------------------------------------------------

/// The real output of `vmesh-control vm-bundle` for the WorkloadGroup of
/// `control-plane/tests/fixtures/istio-vm.yaml`, made with:
///
/// ```sh
/// vmesh-control serve --data-dir D --listen 127.0.0.1:15012 &
/// vmesh-control apply --data-dir D -f control-plane/tests/fixtures/istio-vm.yaml
/// vmesh-control vm-bundle --data-dir D --group python-http -n vm-namespace \
///     --token-duration 8760h -o shim/tests/fixtures/vm-bundle
/// ```
///
/// The root CA and token come from a throwaway data dir (its keys were deleted): they are
/// good for nothing but their shape. `live_vm_bundle_from_vmesh_control` does the same against
/// a freshly built control plane.
fn fixture_bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vm-bundle")
}

/// A writable copy of the fixture bundle.
fn bundle_copy() -> TempDir {
    let dir = TempDir::new();
    for entry in std::fs::read_dir(fixture_bundle()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// What every bundle made by vm-bundle for python-http must give, whatever its port.
fn assert_python_http_bundle(settings: &Settings, dir: &Path, state_dir: &Path, port: u16) {
    assert_eq!(settings.mode(), Mode::ControlPlane);
    assert!(settings.names.is_none());
    let c = settings.control.as_ref().unwrap();
    assert_eq!(c.state_dir, state_dir);
    assert_eq!(c.deregister_timeout, Duration::from_secs(5));
    let b = &c.bundle;
    assert_eq!(b.group, "python-http");
    assert_eq!(b.namespace, "vm-namespace");
    assert_eq!(b.service_account, "vm-sa");
    assert_eq!(b.network, "");
    assert_eq!(b.labels["app"], "python-http");
    assert_eq!(b.labels["service.istio.io/canonical-name"], "python-http");
    assert_eq!(b.locality, "");
    assert_eq!(b.canonical_service, "python-http");
    assert_eq!(b.canonical_revision, "latest");
    assert_eq!(b.trust_domain, "cluster.local");
    assert_eq!(b.inbound_ports, "*");
    assert_eq!(b.local_exclude_ports, "22,15090,15021,15020");
    assert_eq!(b.vars["ISTIO_META_DNS_CAPTURE"], "true");
    assert_eq!(b.address, "10.0.0.5".parse::<std::net::IpAddr>().unwrap());
    assert_eq!(b.address_source, AddressSource::Interface("eth0".into()));
    assert_eq!(
        b.discovery.address,
        format!("istiod.istio-system.svc:{port}")
    );
    assert_eq!(b.discovery.targets.len(), 1);
    assert_eq!(
        b.discovery.targets[0].server_name,
        "istiod.istio-system.svc"
    );
    assert_eq!(
        b.discovery.targets[0].connect,
        format!("127.0.0.1:{port}").parse().unwrap()
    );
    assert_eq!(b.discovery.hosts_file, Some(dir.join("hosts")));
    assert_eq!(b.token_path, dir.join("istio-token"));
    assert_eq!(b.token.namespace.as_deref(), Some("vm-namespace"));
    assert_eq!(b.token.service_account.as_deref(), Some("vm-sa"));
    assert!(b.token.expires.is_some());
    assert_eq!(b.root_cert_path, dir.join("root-cert.pem"));
    assert_eq!(
        b.root_cert_pem,
        std::fs::read(dir.join("root-cert.pem")).unwrap()
    );
    let register = serde_json::to_value(b.register_request()).unwrap();
    assert_eq!(register["group"], "python-http");
    assert_eq!(register["namespace"], "vm-namespace");
    assert_eq!(register["address"], "10.0.0.5");
    assert_eq!(register["labels"]["app"], "python-http");
}

#[test]
fn vm_bundle_dir_gives_the_control_plane_settings() {
    let state = TempDir::new();
    let dir = fixture_bundle();
    let settings = validate(&[
        "--upstream",
        "10.0.0.2:53",
        "--bundle",
        s(&dir),
        "--state-dir",
        s(state.path()),
    ])
    .unwrap();
    assert_python_http_bundle(&settings, &dir, state.path(), 15012);
}

#[test]
fn file_flags_and_overrides_replace_single_bundle_values() {
    let state = TempDir::new();
    let other = TempDir::new();
    let hosts = other.file("hosts", "10.1.2.3 vmesh-control.example\n");
    let env = other.file(
        "cluster.env",
        "ISTIO_META_AUTO_REGISTER_GROUP=g\nPOD_NAMESPACE=n\n",
    );
    let settings = validate_with(
        &[
            "--upstream",
            "10.0.0.2:53",
            "--bundle",
            s(&fixture_bundle()),
            "--state-dir",
            s(state.path()),
            "--hosts-file",
            s(&hosts),
            "--discovery-address",
            "vmesh-control.example:443",
            "--cluster-env",
            s(&env),
            "--network",
            "net-b",
            "--address",
            "2001:db8::5",
            "--deregister-timeout",
            "1500ms",
        ],
        &[("ISTIO_SVC_IP", "10.9.9.9"), ("POD_NAMESPACE", "env-ns")],
        &no_istio(),
    )
    .unwrap();
    let c = settings.control.unwrap();
    assert_eq!(c.deregister_timeout, Duration::from_millis(1500));
    let b = c.bundle;
    assert_eq!(b.group, "g");
    assert_eq!(
        b.namespace, "env-ns",
        "process environment over cluster.env"
    );
    assert_eq!(b.network, "net-b");
    // Not in the replacement cluster.env: from the bundle's mesh.yaml proxyMetadata.
    assert_eq!(b.service_account, "vm-sa");
    assert_eq!(b.address.to_string(), "2001:db8::5");
    assert_eq!(b.address_source, AddressSource::Flag);
    assert_eq!(
        b.discovery.targets[0].connect,
        "10.1.2.3:443".parse().unwrap()
    );
    assert_eq!(b.discovery.targets[0].server_name, "vmesh-control.example");
    assert_eq!(b.paths.token, fixture_bundle().join("istio-token"));
}

#[test]
fn istio_paths_on_the_machine_select_control_plane_mode() {
    let vm = bundle_copy();
    let mut istio = BundlePaths::in_dir(vm.path());
    istio.mesh_config_named = false;
    istio.hosts_named = false;
    let state = TempDir::new();
    let settings = validate_with(
        &["--upstream", "10.0.0.2:53", "--state-dir", s(state.path())],
        &[("ISTIO_SVC_IP", "10.7.7.7")],
        &istio,
    )
    .unwrap();
    assert_eq!(settings.mode(), Mode::ControlPlane);
    let b = settings.control.unwrap().bundle;
    assert_eq!(b.group, "python-http");
    assert_eq!(b.address.to_string(), "10.7.7.7");
    assert_eq!(
        b.address_source,
        AddressSource::Variable {
            name: "ISTIO_SVC_IP",
            from: VarSource::Environment
        }
    );

    // --static-names wins over an Istio cluster.env that is merely present.
    let names = vm.file(
        "names.json",
        r#"{"version":"v1","namespace":"vm-namespace","names":{}}"#,
    );
    let settings = validate_with(
        &["--upstream", "10.0.0.2:53", "--static-names", s(&names)],
        &[],
        &istio,
    )
    .unwrap();
    assert_eq!(settings.mode(), Mode::Static);
    assert!(settings.control.is_none());
}

#[test]
fn without_a_table_source_the_shim_only_forwards() {
    let settings = validate(&["--upstream", "10.0.0.2:53"]).unwrap();
    assert_eq!(settings.mode(), Mode::ForwarderOnly);
    assert!(settings.names.is_none() && settings.control.is_none());
}

#[test]
fn static_names_with_control_plane_flags_is_an_error_naming_them() {
    let dir = TempDir::new();
    let names = dir.file(
        "names.json",
        r#"{"version":"v1","namespace":"vm-namespace","names":{}}"#,
    );
    let errors = validate(&[
        "--upstream",
        "10.0.0.2:53",
        "--static-names",
        s(&names),
        "--bundle",
        s(&fixture_bundle()),
        "--group",
        "g",
    ])
    .unwrap_err();
    assert!(
        matches!(&errors[..], [ConfigError::ModeConflict(flags)] if flags == &["--bundle", "--group"]),
        "{errors:?}"
    );
    assert!(
        errors[0].to_string().contains("--bundle, --group"),
        "{}",
        errors[0]
    );
}

#[test]
fn a_discovery_address_alone_selects_control_plane_mode_and_asks_for_the_rest() {
    let state = TempDir::new();
    let errors = validate(&[
        "--upstream",
        "10.0.0.2:53",
        "--discovery-address",
        "10.0.0.1:15012",
        "--state-dir",
        s(state.path()),
    ])
    .unwrap_err();
    // The mesh config at its default path may be absent: --discovery-address replaces it.
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(text.len(), 3, "{text:#?}");
    assert!(
        text[0].starts_with("cluster.env /nonexistent/"),
        "{text:#?}"
    );
    assert!(text[1].starts_with("token /nonexistent/"), "{text:#?}");
    assert!(text[2].starts_with("root cert /nonexistent/"), "{text:#?}");
}

#[test]
fn control_plane_flag_problems_are_reported_together() {
    let dir = TempDir::new();
    let file = dir.file("plain", "");
    let errors = validate(&[
        "--upstream",
        "10.0.0.2:53",
        "--bundle",
        "/nonexistent/bundle",
        "--address",
        "vm.example",
        "--deregister-timeout",
        "0s",
        "--state-dir",
        s(&file.join("sub")),
        "--group",
        "",
    ])
    .unwrap_err();
    let kinds: Vec<&str> = errors
        .iter()
        .map(|e| match e {
            ConfigError::DeregisterTimeout(_) => "deregister-timeout",
            ConfigError::StateDir { .. } => "state-dir",
            ConfigError::Address { .. } => "address",
            ConfigError::Empty("--group") => "group",
            ConfigError::BundleDir { .. } => "bundle",
            other => panic!("unexpected {other}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "deregister-timeout",
            "state-dir",
            "address",
            "group",
            "bundle"
        ]
    );
}

/// A copy of the fixture with one problem in every file: no group (in cluster.env nor in the
/// mesh config's proxyMetadata, which would stand in for it), a token
/// that cannot be read (a directory: the tests may run as root, who reads any file), a root
/// cert that is not PEM, and a hosts file without the discovery host.
fn broken_bundle() -> TempDir {
    let dir = bundle_copy();
    for (file, group) in [
        ("cluster.env", "ISTIO_META_AUTO_REGISTER_GROUP="),
        ("mesh.yaml", "    ISTIO_META_AUTO_REGISTER_GROUP:"),
    ] {
        let text = std::fs::read_to_string(dir.path().join(file)).unwrap();
        let without: String = text
            .lines()
            .filter(|l| !l.starts_with(group))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_ne!(text, without, "{file} names the group");
        std::fs::write(dir.path().join(file), without).unwrap();
    }
    let token = dir.path().join("istio-token");
    std::fs::remove_file(&token).unwrap();
    std::fs::create_dir(&token).unwrap();
    dir.file("root-cert.pem", "this is not PEM\n");
    dir.file("hosts", "10.0.0.1 other.example\n");
    dir
}

#[test]
fn a_broken_bundle_reports_every_problem() {
    let dir = broken_bundle();
    let state = TempDir::new();
    let errors = validate(&[
        "--upstream",
        "10.0.0.2:53",
        "--bundle",
        s(dir.path()),
        "--state-dir",
        s(state.path()),
    ])
    .unwrap_err();
    let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let want = [
        "ISTIO_META_AUTO_REGISTER_GROUP is not set",
        "no entry for the discovery host istiod.istio-system.svc",
        "token ",
        "root cert ",
    ];
    assert_eq!(text.len(), want.len(), "{text:#?}");
    for (got, want) in text.iter().zip(want) {
        assert!(got.contains(want), "{got:?} should say {want:?}");
    }
}

/// Reads the child's stderr on a thread, line by line.
fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn binary_reports_every_bundle_error_at_once_and_binds_nothing() {
    let dir = broken_bundle();
    let state = TempDir::new();
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let out = shim_binary()
        .args(["--listen", &held.local_addr().unwrap().to_string()])
        .args(["--upstream", "10.0.0.2:53"])
        .args(["--bundle", s(dir.path())])
        .args(["--state-dir", s(state.path())])
        .args(["--deregister-timeout", "soon"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for want in [
        "invalid configuration",
        "--deregister-timeout \"soon\"",
        "ISTIO_META_AUTO_REGISTER_GROUP is not set",
        "no entry for the discovery host istiod.istio-system.svc",
        "istio-token: Is a directory",
        "root-cert.pem: no CERTIFICATE block",
    ] {
        assert!(stderr.contains(want), "{want:?} missing from:\n{stderr}");
    }
    assert!(!stderr.contains("cannot listen"), "{stderr}");
}

#[test]
fn binary_takes_the_bundle_and_istio_variables_from_the_environment() {
    let state = TempDir::new();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = ChildGuard(
        shim_binary()
            .env(ENV_LISTEN, listen.to_string())
            .env(ENV_UPSTREAMS, "10.0.0.2:53")
            .env(ENV_BUNDLE, fixture_bundle())
            .env(ENV_STATE_DIR, state.path())
            .env("ISTIO_SVC_IP", "10.9.8.7")
            .env("POD_NAMESPACE", "other-ns")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = stderr_lines(&mut child.0);
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + patience();
    while !seen
        .iter()
        .any(|l: &String| l.contains("vmesh-shim serving"))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!(
                "no `serving` line within {:?}:\n{}",
                patience(),
                seen.join("\n")
            ),
        }
    }
    let log = seen.join("\n");
    let mode = seen
        .iter()
        .find(|l| l.contains("mode selected"))
        .unwrap_or_else(|| panic!("no mode line in:\n{log}"));
    for want in [
        "control-plane",
        "group=python-http",
        "namespace=other-ns",
        "address=10.9.8.7",
        "address_from=ISTIO_SVC_IP (process environment)",
        "connect=127.0.0.1:15012",
    ] {
        assert!(mode.contains(want), "{want:?} missing from: {mode}");
    }
    // The token is for vm-namespace: worth a warning, not a refusal.
    assert!(
        log.contains("WARN") && log.contains("it is for namespace \"vm-namespace\""),
        "{log}"
    );

    // SIGTERM handling is `binary_reads_env_fallbacks_and_exits_cleanly_on_sigterm`'s
    // business; the guard kills this one.
}

/// Kills the spawned binary if the test fails before it exits (`Child` tracks whether it was
/// reaped, so this never signals a reused pid).
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
