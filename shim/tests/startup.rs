//! Configuration: upstream selection, refusal to start, and the built binary's behaviour
//! (errors before any port is bound, env fallbacks, graceful exit on SIGTERM).

mod support;

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};

use clap::Parser;
use support::*;
use vmesh_shim::config::{ConfigError, RunArgs, Settings, ENV_LISTEN, ENV_UPSTREAMS};

fn validate(args: &[&str]) -> Result<Settings, Vec<ConfigError>> {
    let mut argv = vec!["vmesh-shim"];
    argv.extend_from_slice(args);
    RunArgs::try_parse_from(argv)
        .unwrap()
        .validate()
        .map_err(|e| e.0)
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    assert_eventually("the binary serves /healthz", || async {
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
    assert_eventually("exit after SIGTERM", || {
        exit = exit.or_else(|| child.0.try_wait().unwrap());
        std::future::ready(exit.is_some())
    })
    .await;
    assert!(exit.unwrap().success(), "{exit:?}");
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
