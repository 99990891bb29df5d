//! Network namespaces for tests (and the demo) that need real iptables and real traffic.
//!
//! The building blocks ([`add`], [`delete`], [`exec_args`], [`run`]) are what every user
//! shares; the multi-network demo (`vmesh-demo`) builds its two networks from them.
//! [`Namespaces`] is a "VM" namespace joined by a veth pair to a "peer" namespace (the network
//! outside the VM, where its resolver lives), with addresses from 198.18.0.0/15 and
//! 2001:db8::/32 only; both are deleted on drop, also when the test failed.
//!
//! A test cannot move itself into a namespace (that takes `setns`, which is unsafe code), so
//! [`run_inside`] runs one ignored test of the same test binary under `ip netns exec`: the
//! outer test owns the namespaces, the inner one does the work. The inner process dies with
//! the outer test (parent-death signal), and the processes it starts die with it.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::eventually::patience;

pub const VM_V4: &str = "198.18.0.1";
pub const PEER_V4: &str = "198.18.0.2";
/// The VM's resolver, in the peer namespace.
pub const RESOLVER_V4: &str = "198.18.0.53";
pub const VM_V6: &str = "2001:db8:0:1::1";
pub const PEER_V6: &str = "2001:db8:0:1::2";
pub const RESOLVER_V6: &str = "2001:db8:0:1::53";

/// Set in the inner test's environment; an inner test refuses to run without it (it would
/// change the host's firewall).
pub const INNER_ENV: &str = "VMESH_TEST_IN_NAMESPACE";

/// Why a namespace test cannot run here, if it cannot: it needs root with CAP_NET_ADMIN and
/// iptables. Anything else missing is a failure, not a skip.
pub fn unavailable() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let uid = field("Uid:")
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    let cap_eff = field("CapEff:").and_then(|hex| u64::from_str_radix(hex, 16).ok());
    // CAP_NET_ADMIN is capability 12.
    let net_admin = cap_eff.is_some_and(|caps| caps & (1 << 12) != 0);
    if uid != "0" || !net_admin {
        return Some(format!(
            "needs root with CAP_NET_ADMIN (effective uid {uid})"
        ));
    }
    for program in ["iptables-save", "iptables-restore"] {
        if crate::which(program).is_none() {
            return Some(format!("{program} is not installed"));
        }
    }
    None
}

/// Adds the namespace `name` with its loopback up, first deleting a leftover of that name
/// (a run killed before its cleanup).
pub fn add(name: &str) {
    delete(name);
    run("ip", &["netns", "add", name]);
    run("ip", &["-n", name, "link", "set", "lo", "up"]);
}

/// Deletes the namespace `name` (its interfaces and firewall rules go with it) and what
/// `ip netns exec` reads for it under /etc/netns; quiet when there is none.
pub fn delete(name: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(Path::new(ETC_NETNS).join(name));
}

/// Where `ip netns exec NAME` finds files it bind-mounts over /etc (resolv.conf, hosts).
pub const ETC_NETNS: &str = "/etc/netns";

/// Gives namespace `name` its own /etc/resolv.conf (as `ip netns exec` sees it).
pub fn set_resolv_conf(name: &str, content: &str) {
    let dir = Path::new(ETC_NETNS).join(name);
    std::fs::create_dir_all(&dir).expect("create /etc/netns/NAME");
    std::fs::write(dir.join("resolv.conf"), content).expect("write the namespace's resolv.conf");
}

/// The namespaces whose names start with `prefix` (`ip netns list`).
pub fn list(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// The interfaces of the root namespace (`ip -o link show`): a test compares them before and
/// after to show it left no veth behind.
pub fn root_links() -> std::collections::BTreeSet<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().to_string())
        .collect()
}

/// Who a program in a namespace runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum As {
    /// The caller's credentials (root).
    Caller,
    /// Root's user with this group: iptables' `--gid-owner` tells it apart from root's other
    /// programs (traffic capture leaves the proxy's group alone), and it can still read what
    /// only root may (a program installed under /root).
    Group(u32),
}

/// `ip` arguments that run `program args` inside namespace `ns` as `who`, for
/// [`crate::process::Proc`] with program `ip` (`ip netns exec` and `setpriv` exec, so the
/// process is the program itself). A change of group clears the parent-death signal, so
/// programs run as [`As::Group`] must be started with `Proc::spawn_guarded`, whose guard keeps
/// it and passes the end on.
pub fn exec_args(ns: &str, who: As, program: &str, args: &[String]) -> Vec<String> {
    let mut v: Vec<String> = vec!["netns".into(), "exec".into(), ns.into()];
    if let As::Group(gid) = who {
        v.extend([
            "setpriv".into(),
            "--regid".into(),
            gid.to_string(),
            "--clear-groups".into(),
            "--".into(),
        ]);
    }
    v.push(program.to_string());
    v.extend(args.iter().cloned());
    v
}

/// Runs `program args` in namespace `ns` to completion.
pub fn exec(ns: &str, program: &str, args: &[&str]) -> Output {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) => Output {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        },
        Err(e) => Output {
            ok: false,
            stdout: String::new(),
            stderr: format!("cannot run ip netns exec {ns} {program}: {e}"),
        },
    }
}

/// What [`exec`] saw.
#[derive(Debug, Clone)]
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// stdout when the program succeeded, else its stderr (and stdout) as the error.
    pub fn result(self) -> Result<String, String> {
        if self.ok {
            Ok(self.stdout)
        } else {
            Err(format!("{}{}", self.stderr.trim(), self.stdout.trim()))
        }
    }
}

/// Runs `program args`, panicking with its error output when it fails; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The VM and peer namespaces; deleted on drop.
#[derive(Debug)]
pub struct Namespaces {
    pub vm: String,
    pub peer: String,
}

impl Namespaces {
    /// `vmesh-t-<pid>-<tag>-vm` and `-peer` (tag: one short word per test, so tests of one
    /// binary can run side by side), joined by a veth pair. The VM gets 198.18.0.1/24; the
    /// peer 198.18.0.2/24 and the resolver's 198.18.0.53/24; with `ipv6`, the same in
    /// 2001:db8:0:1::/64.
    pub fn create(tag: &str, ipv6: bool) -> Namespaces {
        let pid = std::process::id();
        let ns = Namespaces {
            vm: format!("vmesh-t-{pid}-{tag}-vm"),
            peer: format!("vmesh-t-{pid}-{tag}-peer"),
        };
        ns.delete();
        // Interface names are at most 15 bytes.
        let (vm_if, peer_if) = (format!("vt{pid}{tag}v"), format!("vt{pid}{tag}p"));
        assert!(vm_if.len() <= 15, "tag {tag:?} too long");
        for name in [&ns.vm, &ns.peer] {
            run("ip", &["netns", "add", name]);
            if ipv6 {
                // No duplicate address detection: addresses (link-local ones too) are usable
                // at once instead of a second or two later.
                let no_dad = "net.ipv6.conf.default.accept_dad=0";
                run("ip", &["netns", "exec", name, "sysctl", "-qw", no_dad]);
            }
        }
        run(
            "ip",
            &[
                "-n", &ns.vm, "link", "add", &vm_if, "type", "veth", "peer", "name", &peer_if,
                "netns", &ns.peer,
            ],
        );
        let mut v4 = vec![(&ns.vm, &vm_if, VM_V4), (&ns.peer, &peer_if, PEER_V4)];
        v4.push((&ns.peer, &peer_if, RESOLVER_V4));
        for (name, link, addr) in &v4 {
            run(
                "ip",
                &[
                    "-n",
                    name,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    link,
                ],
            );
        }
        if ipv6 {
            let v6 = [
                (&ns.vm, &vm_if, VM_V6),
                (&ns.peer, &peer_if, PEER_V6),
                (&ns.peer, &peer_if, RESOLVER_V6),
            ];
            for (name, link, addr) in v6 {
                let cidr = format!("{addr}/64");
                run(
                    "ip",
                    &["-n", name, "-6", "addr", "add", &cidr, "dev", link, "nodad"],
                );
            }
        }
        for (name, link) in [(&ns.vm, &vm_if), (&ns.peer, &peer_if)] {
            run("ip", &["-n", name, "link", "set", "lo", "up"]);
            run("ip", &["-n", name, "link", "set", link, "up"]);
        }
        ns
    }

    fn delete(&self) {
        for name in [&self.vm, &self.peer] {
            delete(name);
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.delete();
    }
}

/// Runs the ignored test `test` of this test binary inside namespace `ns` with `env` added
/// (and [`INNER_ENV`] set), and fails when it fails, with its output.
pub fn run_inside(ns: &str, test: &str, env: &[(&str, &str)], log_dir: &Path) {
    let exe = std::env::current_exe().expect("test binary path");
    let log = log_dir.join(format!("{test}.log"));
    let out = File::create(&log).expect("create log file");
    let err = out.try_clone().expect("clone log file");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--", "ip", "netns", "exec", ns])
        .arg(&exe)
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INNER_ENV, "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let mut child = cmd.spawn().expect("start the inner test");
    // The inner test waits on many things, each within `patience`.
    let deadline = Instant::now() + patience() * 8;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the inner test") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // Shown with --nocapture (libtest keeps a passing test's output to itself otherwise).
    eprintln!("---- {test} inside {ns} ----\n{text}");
    match status {
        Some(s) if s.success() && text.contains("1 passed") => {}
        Some(s) => panic!("{test} inside {ns} failed ({s}):\n{text}"),
        None => panic!("{test} inside {ns} did not finish in time:\n{text}"),
    }
}

/// Panics unless this process is an inner test started by [`run_inside`].
pub fn assert_inside() {
    assert!(
        std::env::var_os(INNER_ENV).is_some(),
        "this test changes the firewall of the namespace it runs in: it only runs inside one \
         (started by its outer test), never on its own"
    );
}
