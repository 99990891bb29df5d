//! `vmesh-shim capture install|remove` against real iptables, in network namespaces, with
//! real traffic.
//!
//! Each outer test creates a "VM" namespace joined to a "peer" namespace (the network outside
//! the VM, where dnsmasq is the VM's resolver) and runs its inner, ignored, twin inside the VM
//! namespace (see `support::netns`). Inside: the VM already has firewall and NAT rules of its
//! own (a default-drop INPUT policy among them, so replies that conntrack does not recognise
//! would be lost); the real shim forwards DNS as the proxy user (uid 1337); stand-ins play
//! Envoy's listeners: DNS on 15053 answers `*.mesh.test` itself and sends every other name
//! through the shim as the filter does, and 15001/15006 answer with the original destination
//! of each connection. `dig` and `bash`'s /dev/tcp play the applications (uid 1000) and the
//! proxy (uid 1337).

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use vmesh_core::dns::response::Owner;
use vmesh_core::dns::{Query, Rcode, ResponseBuilder};
use vmesh_shim::capture;

use support::eventually::eventually;
use support::netns::{self, Namespaces, PEER_V4, RESOLVER_V4, RESOLVER_V6, VM_V4, VM_V6};
use support::process::Proc;
use support::{Http, TempDir};

const SHIM: &str = env!("CARGO_BIN_EXE_vmesh-shim");

const APP_UID: u32 = 1000;
const PROXY_UID: u32 = 1337;
const SHIM_LISTEN: &str = "127.0.0.1:15020";

/// Answered by the Envoy stand-in itself, as the filter answers mesh names.
const MESH_NAME: &str = "svc.mesh.test";
const MESH_ADDR: &str = "198.18.0.15";
/// Known only to the resolver (dnsmasq), which answers NXDOMAIN for everything else.
const FORWARDED_NAME: &str = "forwarded.test";
const FORWARDED_ADDR: &str = "198.18.0.60";

const CAPTURED: &str = "NOERROR 198.18.0.15";
const RESOLVED: &str = "NOERROR 198.18.0.60";
const NXDOMAIN: &str = "NXDOMAIN";

// ---------------------------------------------------------------------------------------
// The tests.

#[test]
fn capture_in_a_dual_stack_namespace() {
    if let Some(why) = netns::unavailable() {
        eprintln!("skipping capture_in_a_dual_stack_namespace: {why}");
        return;
    }
    let dir = TempDir::new();
    let ns = Namespaces::create("d", true);
    netns::run_inside(
        &ns.vm,
        "inside_dual_stack",
        &[("VMESH_TEST_PEER", &ns.peer)],
        dir.path(),
    );
}

#[test]
fn capture_with_a_loopback_stub_resolver() {
    if let Some(why) = netns::unavailable() {
        eprintln!("skipping capture_with_a_loopback_stub_resolver: {why}");
        return;
    }
    let dir = TempDir::new();
    let ns = Namespaces::create("l", false);
    netns::run_inside(
        &ns.vm,
        "inside_loopback_stub_resolver",
        &[("VMESH_TEST_PEER", &ns.peer)],
        dir.path(),
    );
}

/// Bad settings, missing iptables commands and missing privileges are reported together,
/// and nothing is run. Needs no namespace: it never gets as far as iptables.
#[test]
fn refusals_are_reported_together_before_anything_changes() {
    let dir = TempDir::new();
    let resolv_conf = dir.file("resolv.conf", "nameserver 198.18.0.53\n");
    let running_as_root = netns::unavailable().is_none();
    // As root, drop to an ordinary user so that the missing privilege shows too.
    let mut cmd = if running_as_root {
        // By its full path: the PATH below is the child's, and Command looks programs up in it.
        let setpriv = capture::host::find_program("setpriv").expect("setpriv");
        let mut c = Command::new(setpriv);
        c.args([
            "--reuid",
            "1000",
            "--regid",
            "1000",
            "--clear-groups",
            "--",
            SHIM,
        ]);
        c
    } else {
        Command::new(SHIM)
    };
    let out = cmd
        .args([
            "capture",
            "install",
            "--inbound-ports",
            "80,x",
            "--ipv6",
            "on",
        ])
        .args(["--resolv-conf", resolv_conf.to_str().unwrap()])
        .env("PATH", dir.path().join("no-programs-here"))
        .env_remove(capture::ENV_CLUSTER_ENV)
        .output()
        .expect("run vmesh-shim");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for want in [
        "vmesh-shim: nothing changed:",
        "--inbound-ports ($ISTIO_INBOUND_PORTS): \"x\" is not a port (1-65535)",
        "iptables-save not found in PATH: install the iptables package",
        "iptables-restore not found in PATH",
        "ip6tables-save not found in PATH: needed for IPv6 (IPv6 on)",
        "ip6tables-restore not found in PATH",
        "changing firewall rules needs root with CAP_NET_ADMIN",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in:\n{stderr}");
    }
}

/// IPv4 and IPv6; the default iptables; settings from a cluster.env, the environment and
/// flags; install twice, reinstall with other settings, remove, remove again.
#[test]
#[ignore = "runs inside the namespaces capture_in_a_dual_stack_namespace creates"]
fn inside_dual_stack() {
    netns::assert_inside();
    let peer = std::env::var("VMESH_TEST_PEER").unwrap();
    let dir = TempDir::new();
    let ipt = Iptables::new("iptables");
    ipt.restore(V4, FIREWALL_V4);
    ipt.restore(V6, FIREWALL_V6);
    let before = ipt.snapshot();

    let _resolver = Resolver::start(&peer, &dir, true);
    let resolv_conf = dir.file(
        "resolv.conf",
        &format!("nameserver {RESOLVER_V4}\nnameserver {RESOLVER_V6}\n"),
    );
    let envoy = Envoy::start(true);
    let _shim = start_shim(&resolv_conf, &dir);
    eventually("the resolver answers", || {
        expect_dns(Who::Root, RESOLVER_V4, FORWARDED_NAME, &[], RESOLVED)
    });

    let cluster_env = dir.file(
        "cluster.env",
        &format!(
            "# as istioctl writes it, plus vmesh's exclusions\n\
             ISTIO_INBOUND_PORTS='*'\n\
             ISTIO_LOCAL_EXCLUDE_PORTS='22,8022'\n\
             ISTIO_SERVICE_CIDR='*'\n\
             ISTIO_SERVICE_EXCLUDE_CIDR='{RESOLVER_V4}/32,{RESOLVER_V6}/128'\n\
             ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE='5432'\n\
             ISTIO_META_DNS_CAPTURE='true'\n"
        ),
    );
    let args = [
        "--cluster-env",
        cluster_env.to_str().unwrap(),
        "--resolv-conf",
        resolv_conf.to_str().unwrap(),
        "--proxy-uid",
        "1337",
    ];
    let out = capture(&["install"], &args, &[]);
    assert!(
        out.contains("IPv4: installed") && out.contains("IPv6: installed"),
        "{out}"
    );
    let installed = ipt.snapshot();
    assert_matches_dry_run(&installed, &capture(&["install", "--dry-run"], &args, &[]));

    let out = capture(&["install"], &args, &[]);
    assert!(out.contains("IPv4: already installed"), "{out}");
    assert_eq!(
        ipt.snapshot(),
        installed,
        "a second install changes nothing"
    );

    // DNS to the nameservers, from an application: to Envoy (which forwards the names it does
    // not own through the shim, whose own queries go straight to the resolver).
    for ns in [RESOLVER_V4, RESOLVER_V6] {
        expect(Who::App, ns, MESH_NAME, &[], CAPTURED);
        expect(Who::App, ns, MESH_NAME, &["+tcp"], CAPTURED);
        let forwarded = envoy.forwarded();
        expect(Who::App, ns, FORWARDED_NAME, &[], RESOLVED);
        expect(Who::App, ns, FORWARDED_NAME, &["+tcp"], RESOLVED);
        assert_eq!(
            envoy.forwarded(),
            forwarded + 2,
            "went through Envoy and the shim"
        );
        // The proxy's own queries are not captured.
        expect(Who::Proxy, ns, MESH_NAME, &[], NXDOMAIN);
        expect(Who::Proxy, ns, MESH_NAME, &["+tcp"], NXDOMAIN);
    }
    // The same source port, one flow after the other: conntrack must keep them apart.
    for (src, port) in [(VM_V4, 40053), (VM_V6, 40054)] {
        let server = if src == VM_V4 {
            RESOLVER_V4
        } else {
            RESOLVER_V6
        };
        let bind = format!("-b{src}#{port}");
        expect(Who::App, server, MESH_NAME, &[&bind], CAPTURED);
        expect(Who::Proxy, server, MESH_NAME, &[&bind], NXDOMAIN);
        let bind = format!("-b{src}#{}", port + 100);
        expect(Who::Proxy, server, MESH_NAME, &[&bind], NXDOMAIN);
        expect(Who::App, server, MESH_NAME, &[&bind], CAPTURED);
    }

    // Outbound TCP.
    let vm6 = format!("[{VM_V6}]");
    let cases: &[(Who, &str, u16, &str)] = &[
        (Who::Root, "198.18.0.77", 80, "outbound 198.18.0.77:80"),
        (Who::App, "198.18.0.77", 80, "outbound 198.18.0.77:80"),
        (
            Who::App,
            "2001:db8:0:1::77",
            80,
            "outbound [2001:db8:0:1::77]:80",
        ),
        (Who::App, PEER_V4, 9, "outbound 198.18.0.2:9"),
        (Who::Proxy, PEER_V4, 9, REFUSED),
        (Who::App, RESOLVER_V4, 9, REFUSED),
        (Who::App, RESOLVER_V6, 9, REFUSED),
        (Who::App, PEER_V4, 5432, REFUSED),
        // To the VM itself: loopback, not captured; except the proxy reaching the VM's own
        // address, which is inbound traffic for the app.
        (Who::App, VM_V4, 9090, "app:9090 198.18.0.1:9090"),
        (Who::App, "127.0.0.1", 9090, "app:9090 127.0.0.1:9090"),
        (Who::Proxy, VM_V4, 8080, "inbound 198.18.0.1:8080"),
        (Who::Proxy, VM_V6, 8080, &format!("inbound {vm6}:8080")),
        (Who::Proxy, VM_V4, 8022, "app:8022 198.18.0.1:8022"),
        (Who::Proxy, "127.0.0.1", 8080, "app:8080 127.0.0.1:8080"),
        // Inbound.
        (Who::Peer(&peer), VM_V4, 8080, "inbound 198.18.0.1:8080"),
        (Who::Peer(&peer), VM_V4, 9090, "inbound 198.18.0.1:9090"),
        (
            Who::Peer(&peer),
            VM_V6,
            9090,
            &format!("inbound {vm6}:9090"),
        ),
        (Who::Peer(&peer), VM_V4, 8022, "app:8022 198.18.0.1:8022"),
    ];
    expect_tcp(cases);

    // Somebody else adds rules after the install, then the settings change: only inbound
    // port 8080 now (the environment beats cluster.env). vmesh's jumps keep their places.
    ipt.rules(V4, LATER_V4, "-A");
    ipt.rules(V6, LATER_V6, "-A");
    let with_later = ipt.snapshot();
    let out = capture(&["install"], &args, &[(capture::ENV_INBOUND_PORTS, "8080")]);
    assert!(out.contains("IPv4: installed"), "{out}");
    let reinstalled = ipt.snapshot();
    assert_eq!(
        outside_vmesh_chains(&reinstalled),
        outside_vmesh_chains(&with_later),
        "only vmesh's own chains changed"
    );
    assert_ne!(reinstalled, with_later);
    expect_tcp(&[
        (Who::Peer(&peer), VM_V4, 9090, "app:9090 198.18.0.1:9090"),
        (Who::Peer(&peer), VM_V4, 8080, "inbound 198.18.0.1:8080"),
    ]);

    // Remove: everything else exactly as it was, the later rules included.
    let out = capture(&["remove"], &[], &[]);
    assert!(
        out.contains("IPv4: removed") && out.contains("IPv6: removed"),
        "{out}"
    );
    let removed = ipt.snapshot();
    assert_eq!(removed, without_vmesh(&reinstalled));
    assert!(!removed.contains("VMESH"));
    ipt.rules(V4, LATER_V4, "-D");
    ipt.rules(V6, LATER_V6, "-D");
    assert_eq!(
        ipt.snapshot(),
        before,
        "byte for byte what was there before install"
    );
    let out = capture(&["remove"], &[], &[]);
    assert!(out.contains("IPv4: nothing to remove"), "{out}");
    assert_eq!(ipt.snapshot(), before);

    expect(Who::App, RESOLVER_V4, MESH_NAME, &[], NXDOMAIN);
    expect_tcp(&[
        (Who::Root, PEER_V4, 9, REFUSED),
        (Who::Peer(&peer), VM_V4, 8080, "app:8080 198.18.0.1:8080"),
    ]);
}

/// A stub resolver on 127.0.0.53 (as systemd-resolved) first in resolv.conf, its upstream
/// second; the stub runs as its own user, whose queries must not be captured. IPv4 only, so
/// no ip6tables rules; iptables-legacy when installed.
#[test]
#[ignore = "runs inside the namespaces capture_with_a_loopback_stub_resolver creates"]
fn inside_loopback_stub_resolver() {
    netns::assert_inside();
    let peer = std::env::var("VMESH_TEST_PEER").unwrap();
    let dir = TempDir::new();
    // The legacy backend when this kernel and system have it (it needs the ip_tables modules).
    let legacy_works = Command::new("iptables-legacy")
        .args(["-w", "-t", "nat", "-S"])
        .output()
        .is_ok_and(|o| o.status.success());
    let variant = if legacy_works {
        "iptables-legacy"
    } else {
        "iptables"
    };
    eprintln!("using {variant}");
    let ipt = Iptables::new(variant);
    ipt.restore(V4, FIREWALL_V4);
    let before = ipt.snapshot();

    let _upstream = Resolver::start(&peer, &dir, false);
    let stub_user = "nobody";
    let _stub = start_stub_resolver(stub_user, &dir);
    let resolv_conf = dir.file(
        "resolv.conf",
        &format!("nameserver 127.0.0.53\nnameserver {RESOLVER_V4}\n"),
    );
    let envoy = Envoy::start(false);
    let _shim = start_shim(&resolv_conf, &dir);
    eventually("the stub resolver answers", || {
        expect_dns(Who::Root, "127.0.0.53", FORWARDED_NAME, &[], RESOLVED)
    });

    let args = [
        "--resolv-conf",
        resolv_conf.to_str().unwrap(),
        "--proxy-uid",
        "1337",
        "--resolver-uid",
        stub_user,
        "--iptables",
        variant,
    ];
    let out = capture(&["install"], &args, &[]);
    assert!(
        out.contains("IPv4: installed")
            && out.contains("IPv6: not captured (no global IPv6 address and no IPv6 nameserver)"),
        "{out}"
    );
    let installed = ipt.snapshot();
    assert!(
        !ipt.save(V6).contains("VMESH"),
        "no IPv6 rules without IPv6"
    );
    assert_matches_dry_run(&installed, &capture(&["install", "--dry-run"], &args, &[]));
    capture(&["install"], &args, &[]);
    assert_eq!(ipt.snapshot(), installed);

    for server in ["127.0.0.53", RESOLVER_V4] {
        expect(Who::App, server, MESH_NAME, &[], CAPTURED);
        expect(Who::App, server, MESH_NAME, &["+tcp"], CAPTURED);
    }
    // Envoy -> shim -> stub (not captured: the proxy) -> upstream (not captured: the stub's
    // user, although the upstream is in resolv.conf too).
    let forwarded = envoy.forwarded();
    expect(Who::App, "127.0.0.53", FORWARDED_NAME, &[], RESOLVED);
    assert_eq!(
        envoy.forwarded(),
        forwarded + 1,
        "once through Envoy: the stub's own query to its upstream must not be captured"
    );
    expect(Who::Proxy, "127.0.0.53", MESH_NAME, &[], NXDOMAIN);
    expect(Who::Proxy, "127.0.0.53", MESH_NAME, &["+tcp"], NXDOMAIN);
    expect(Who::Proxy, RESOLVER_V4, MESH_NAME, &[], NXDOMAIN);
    let bind = "-b127.0.0.1#40063";
    expect(Who::App, "127.0.0.53", MESH_NAME, &[bind], CAPTURED);
    expect(Who::Proxy, "127.0.0.53", MESH_NAME, &[bind], NXDOMAIN);
    // Inbound capture is off (no ISTIO_INBOUND_PORTS); outbound is on.
    expect_tcp(&[
        (Who::Peer(&peer), VM_V4, 8080, "app:8080 198.18.0.1:8080"),
        (Who::App, PEER_V4, 9, "outbound 198.18.0.2:9"),
    ]);

    let out = capture(&["remove", "--iptables", variant], &[], &[]);
    assert!(out.contains("IPv4: removed"), "{out}");
    assert_eq!(ipt.snapshot(), before);
    expect(Who::App, "127.0.0.53", MESH_NAME, &[], NXDOMAIN);
}

// ---------------------------------------------------------------------------------------
// The VM's own rules, there before vmesh (and some added after it).

const FIREWALL_V4: &str = "\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:SITE_IN - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -j SITE_IN
-A SITE_IN -p icmp -j ACCEPT
-A SITE_IN -p tcp -m multiport --dports 22,8022,8080,9090,15006 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -p tcp -m tcp --dport 2222 -j MARK --set-xmark 0x1/0xffffffff
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p udp -m udp --dport 9999 -j CT --notrack
COMMIT
";

const FIREWALL_V6: &str = "\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:SITE_IN - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -j SITE_IN
-A SITE_IN -p ipv6-icmp -j ACCEPT
-A SITE_IN -p tcp -m multiport --dports 22,8022,8080,9090,15006 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s fd00:172:17::/64 -j MASQUERADE
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p udp -m udp --dport 9999 -j CT --notrack
COMMIT
";

/// Rules added after the install: (table, rule without `-A`/`-D`).
const LATER_V4: &[(&str, &str)] = &[
    (
        "nat",
        "OUTPUT -d 198.18.1.1/32 -p tcp -j DNAT --to-destination 198.18.0.2:9",
    ),
    (
        "nat",
        "PREROUTING -p tcp -m tcp --dport 2323 -j REDIRECT --to-ports 22",
    ),
    ("filter", "SITE_IN -p tcp -m tcp --dport 7777 -j ACCEPT"),
    ("raw", "OUTPUT -p udp -m udp --dport 9998 -j CT --notrack"),
];
const LATER_V6: &[(&str, &str)] = &[
    (
        "nat",
        "OUTPUT -d 2001:db8:1::1/128 -p tcp -j DNAT --to-destination [2001:db8:0:1::2]:9",
    ),
    ("filter", "SITE_IN -p tcp -m tcp --dport 7777 -j ACCEPT"),
];

// ---------------------------------------------------------------------------------------
// iptables in the test's namespace.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}
use Family::{V4, V6};

struct Iptables {
    variant: &'static str,
}

impl Iptables {
    fn new(variant: &'static str) -> Iptables {
        Iptables { variant }
    }

    fn command(&self, family: Family, suffix: &str) -> String {
        let base = match family {
            V4 => self.variant.to_string(),
            V6 => self.variant.replacen("iptables", "ip6tables", 1),
        };
        format!("{base}{suffix}")
    }

    /// Replaces the tables named in `text` (a fresh namespace has nothing to keep).
    fn restore(&self, family: Family, text: &str) {
        let program = self.command(family, "-restore");
        let mut child = Command::new(&program)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn rules(&self, family: Family, rules: &[(&str, &str)], op: &str) {
        for (table, rule) in rules {
            let mut args = vec!["-w", "-t", table, op];
            args.extend(rule.split(' '));
            netns::run(&self.command(family, ""), &args);
        }
    }

    /// `iptables-save` without comments and counters.
    fn save(&self, family: Family) -> String {
        let text = netns::run(&self.command(family, "-save"), &[]);
        let mut out = String::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            match (line.starts_with(':'), line.rsplit_once(" [")) {
                (true, Some((decl, _counters))) => out += &format!("{decl} [0:0]"),
                _ => out += line,
            }
            out.push('\n');
        }
        out
    }

    /// Both families, every table.
    fn snapshot(&self) -> String {
        format!("{}\n--- IPv6\n{}", self.save(V4), self.save(V6))
    }
}

/// Without the lines that declare or fill a vmesh chain (the jumps to them stay).
fn outside_vmesh_chains(save: &str) -> Vec<&str> {
    save.lines()
        .filter(|l| !l.starts_with(":VMESH_") && !l.starts_with("-A VMESH_"))
        .collect()
}

/// Without any line that mentions a vmesh chain: what `remove` must leave.
fn without_vmesh(save: &str) -> String {
    save.lines()
        .filter(|l| !l.contains("VMESH_"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The installed vmesh rules are exactly what `--dry-run` prints, in iptables-save's own
/// spelling (so the next install can tell that nothing changed).
fn assert_matches_dry_run(snapshot: &str, dry_run: &str) {
    let mut printed: Vec<&str> = dry_run.lines().filter(|l| l.starts_with("-A ")).collect();
    let mut installed: Vec<&str> = snapshot
        .lines()
        .filter(|l| l.starts_with("-A ") && l.contains("VMESH_"))
        .collect();
    printed.sort_unstable();
    installed.sort_unstable();
    assert_eq!(
        installed, printed,
        "installed rules vs --dry-run:\n{dry_run}"
    );
}

/// `vmesh-shim capture <command> <args>`, with only `env` of the capture settings' variables.
fn capture(command: &[&str], args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(SHIM);
    cmd.arg("capture").args(command).args(args);
    for var in [
        capture::ENV_INBOUND_PORTS,
        capture::ENV_LOCAL_EXCLUDE_PORTS,
        capture::ENV_SERVICE_CIDR,
        capture::ENV_SERVICE_EXCLUDE_CIDR,
        capture::ENV_OUTBOUND_EXCLUDE_PORTS,
        capture::ENV_PROXY_UIDS,
        capture::ENV_PROXY_GIDS,
        capture::ENV_RESOLVER_UIDS,
        capture::ENV_OUTBOUND_PORT,
        capture::ENV_INBOUND_PORT,
        capture::ENV_DNS_PORT,
        capture::ENV_DNS_CAPTURE,
        capture::ENV_IPV6,
        capture::ENV_CLUSTER_ENV,
        capture::ENV_IPTABLES,
        capture::ENV_RESOLV_CONF,
    ] {
        cmd.env_remove(var);
    }
    let out = cmd
        .envs(env.iter().copied())
        .output()
        .expect("run vmesh-shim");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "vmesh-shim capture {command:?} {args:?}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("vmesh-shim capture {command:?}:\n{stdout}");
    stdout
}

// ---------------------------------------------------------------------------------------
// Processes: the resolver, a stub resolver, the shim.

/// dnsmasq in the peer namespace on the resolver's addresses: `forwarded.test` has an
/// address, every other name is NXDOMAIN. No cache, so every query reaches it.
struct Resolver {
    _proc: Proc,
}

impl Resolver {
    fn start(peer: &str, dir: &TempDir, ipv6: bool) -> Resolver {
        let mut args: Vec<String> = ["netns", "exec", peer, "/usr/sbin/dnsmasq"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(dnsmasq_common());
        args.push(format!("--listen-address={RESOLVER_V4}"));
        if ipv6 {
            args.push(format!("--listen-address={RESOLVER_V6}"));
        }
        args.extend([
            "--user=root".to_string(),
            format!("--address=/{FORWARDED_NAME}/{FORWARDED_ADDR}"),
            "--local=/#/".to_string(),
        ]);
        let proc = Proc::spawn_guarded(
            "resolver",
            Path::new("ip"),
            &args,
            &dir.path().join("resolver.log"),
        );
        Resolver { _proc: proc }
    }
}

fn dnsmasq_common() -> Vec<String> {
    [
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--log-facility=-",
        "--log-queries",
        "--bind-interfaces",
        "--pid-file=",
        "--cache-size=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// dnsmasq on 127.0.0.53 in the VM, running as `user`, forwarding to the resolver: what
/// systemd-resolved's stub is to a VM.
fn start_stub_resolver(user: &str, dir: &TempDir) -> Proc {
    let mut args = dnsmasq_common();
    args.extend([
        "--listen-address=127.0.0.53".to_string(),
        format!("--user={user}"),
        format!("--server={RESOLVER_V4}"),
    ]);
    Proc::spawn_guarded(
        "stub resolver",
        Path::new("/usr/sbin/dnsmasq"),
        &args,
        &dir.path().join("stub.log"),
    )
}

/// The real shim, as the proxy user, forwarding to the nameservers of `resolv_conf`.
fn start_shim(resolv_conf: &Path, dir: &TempDir) -> Proc {
    let uid = PROXY_UID.to_string();
    let args: Vec<String> = [
        "--reuid",
        &uid,
        "--regid",
        &uid,
        "--clear-groups",
        "--",
        SHIM,
        "--listen",
        SHIM_LISTEN,
        "--resolv-conf",
        resolv_conf.to_str().unwrap(),
        "--forward-timeout",
        "3s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let shim = Proc::spawn_guarded(
        "shim",
        Path::new("setpriv"),
        &args,
        &dir.path().join("shim.log"),
    );
    eventually("the shim listens", || {
        std::net::TcpStream::connect(SHIM_LISTEN).map_err(|e| e.to_string())
    });
    shim
}

// ---------------------------------------------------------------------------------------
// Envoy's listeners, played in-process.

/// DNS on 15053 (UDP and TCP), outbound on 15001 (both on loopback, where iptables
/// redirects locally made connections), inbound on 15006, and the application on 8022, 8080
/// and 9090. Each TCP listener writes one line (who it is, and the connection's original
/// destination) and closes.
struct Envoy {
    _runtime: tokio::runtime::Runtime,
    forwarded: Arc<AtomicUsize>,
}

impl Envoy {
    fn start(ipv6: bool) -> Envoy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let forwarded = Arc::new(AtomicUsize::new(0));
        let shim = Http::h1(SHIM_LISTEN.parse().unwrap());
        runtime.block_on(async {
            let mut loopbacks: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap()];
            let mut anys: Vec<IpAddr> = vec!["0.0.0.0".parse().unwrap()];
            if ipv6 {
                loopbacks.push("::1".parse().unwrap());
                anys.push("::".parse().unwrap());
            }
            for ip in loopbacks {
                let dns = SocketAddr::new(ip, capture::DEFAULT_DNS_PORT);
                let udp = UdpSocket::bind(dns).await.unwrap();
                tokio::spawn(serve_udp(udp, shim.clone(), forwarded.clone()));
                tokio::spawn(serve_tcp(listen(dns), shim.clone(), forwarded.clone()));
                let outbound = SocketAddr::new(ip, capture::DEFAULT_OUTBOUND_PORT);
                tokio::spawn(report(listen(outbound), "outbound".into()));
            }
            for ip in anys {
                let inbound = SocketAddr::new(ip, capture::DEFAULT_INBOUND_PORT);
                tokio::spawn(report(listen(inbound), "inbound".into()));
                for port in [8022, 8080, 9090] {
                    let app = listen(SocketAddr::new(ip, port));
                    tokio::spawn(report(app, format!("app:{port}")));
                }
            }
        });
        Envoy {
            _runtime: runtime,
            forwarded,
        }
    }

    /// How many queries went on to the shim.
    fn forwarded(&self) -> usize {
        self.forwarded.load(Ordering::SeqCst)
    }
}

/// A listener on exactly `addr` (IPv6 ones take no IPv4).
fn listen(addr: SocketAddr) -> TcpListener {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    if addr.is_ipv6() {
        s.set_only_v6(true).unwrap();
    }
    s.set_reuse_address(true).unwrap();
    s.bind(&addr.into())
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    s.listen(128).unwrap();
    s.set_nonblocking(true).unwrap();
    TcpListener::from_std(s.into()).unwrap()
}

async fn report(listener: TcpListener, label: String) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let sock = socket2::SockRef::from(&stream);
        let original = match stream.local_addr() {
            Ok(a) if a.is_ipv4() => sock.original_dst_v4(),
            _ => sock.original_dst_v6(),
        };
        let original = original
            .ok()
            .and_then(|a| a.as_socket())
            .map_or("?".to_string(), |a| a.to_string());
        let _ = stream
            .write_all(format!("{label} {original}\n").as_bytes())
            .await;
    }
}

/// The filter's part: mesh names answered, the rest forwarded through the shim.
async fn answer(query: &[u8], transport: &str, shim: &Http, forwarded: &AtomicUsize) -> Vec<u8> {
    let q = Query::parse(query).expect("a query");
    let name = q.qname.to_lower_dotted().unwrap_or_default();
    if name.ends_with("mesh.test") {
        let mut b = ResponseBuilder::new(&q, Rcode::NoError, true, 65535);
        b.address(Owner::Question, MESH_ADDR.parse().unwrap(), 60);
        return b.finish().0;
    }
    forwarded.fetch_add(1, Ordering::SeqCst);
    shim.dns(query, Some(transport)).await.body.to_vec()
}

async fn serve_udp(udp: UdpSocket, shim: Http, forwarded: Arc<AtomicUsize>) {
    let udp = Arc::new(udp);
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
            return;
        };
        let query = buf[..n].to_vec();
        let (udp, shim, forwarded) = (udp.clone(), shim.clone(), forwarded.clone());
        tokio::spawn(async move {
            let reply = answer(&query, "udp", &shim, &forwarded).await;
            let _ = udp.send_to(&reply, peer).await;
        });
    }
}

async fn serve_tcp(listener: TcpListener, shim: Http, forwarded: Arc<AtomicUsize>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let (shim, forwarded) = (shim.clone(), forwarded.clone());
        tokio::spawn(async move {
            let mut len = [0u8; 2];
            if stream.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if stream.read_exact(&mut query).await.is_err() {
                return;
            }
            let reply = answer(&query, "tcp", &shim, &forwarded).await;
            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            let _ = stream.write_all(&framed).await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// Clients.

/// Who makes a query or a connection.
#[derive(Debug, Clone, Copy)]
enum Who<'a> {
    /// This test (root) in the VM.
    Root,
    /// An application in the VM (uid 1000).
    App,
    /// Envoy or the shim (uid 1337).
    Proxy,
    /// Something outside the VM, in this peer namespace.
    Peer(&'a str),
}

impl Who<'_> {
    /// `program` run as this client.
    fn command(&self, program: &str) -> Command {
        let as_user = |uid: u32| {
            let mut c = Command::new("setpriv");
            let id = uid.to_string();
            c.args([
                "--reuid",
                &id,
                "--regid",
                &id,
                "--clear-groups",
                "--",
                program,
            ]);
            c
        };
        match self {
            Who::Root => Command::new(program),
            Who::App => as_user(APP_UID),
            Who::Proxy => as_user(PROXY_UID),
            Who::Peer(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
        }
    }
}

/// `dig @server name A <extra>` as `who`: "STATUS addresses", or why there was no answer.
fn expect_dns(
    who: Who,
    server: &str,
    name: &str,
    extra: &[&str],
    want: &str,
) -> Result<(), String> {
    let mut cmd = who.command("dig");
    cmd.arg(format!("@{server}"));
    let mut args = vec![name, "A"];
    args.extend_from_slice(extra);
    let d = support::dig::run(cmd, &args)?;
    let got = format!("{} {}", d.status, d.data("A").join(","));
    if got.trim_end() == want {
        Ok(())
    } else {
        Err(format!("got {got:?}, want {want:?}\n{}", d.raw))
    }
}

#[track_caller]
fn expect(who: Who, server: &str, name: &str, extra: &[&str], want: &str) {
    if let Err(e) = expect_dns(who, server, name, extra, want) {
        panic!("{who:?} asking {server} for {name} {extra:?}: {e}");
    }
}

const REFUSED: &str = "refused";

/// A TCP connection from `who` to `host:port`: the line the listener wrote, or "refused".
fn connect(who: Who, host: &str, port: u16) -> String {
    let mut cmd = who.command("timeout");
    cmd.args([
        "5",
        "bash",
        "-c",
        "exec 3<>\"/dev/tcp/$0/$1\" && cat <&3",
        host,
        &port.to_string(),
    ]);
    let out = cmd.output().expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        stdout
    } else if stderr.contains("Connection refused") {
        REFUSED.to_string()
    } else {
        format!("failed ({}): {stderr}", out.status)
    }
}

#[track_caller]
fn expect_tcp(cases: &[(Who, &str, u16, &str)]) {
    let mut wrong = Vec::new();
    for (who, host, port, want) in cases {
        let got = connect(*who, host, *port);
        if got != *want {
            wrong.push(format!(
                "{who:?} -> {host} port {port}: got {got:?}, want {want:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "connections:\n{}", wrong.join("\n"));
}
