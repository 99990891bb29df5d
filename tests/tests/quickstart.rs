//! The README's quick start ("Load the filter into your own Envoy"), checked as users read it:
//! the YAML block must be `envoy-configs/quickstart.yaml` byte for byte, and the command block
//! is run line by line as written, from the repository root: the real shim with the names
//! file it names, the real Envoy with the real `.wasm`, and its `dig`s.
//!
//! Nothing in the commands is substituted. They use the well-known ports (15000, 15020,
//! 15053) and the system resolver, so they run in a network namespace of this test's own:
//! its loopback has those ports free whatever else runs on the machine, and its
//! `/etc/resolv.conf` (what `ip netns exec` mounts from /etc/netns) names a dnsmasq this test
//! starts on 127.0.0.1:53, which answers the README's non-mesh names with [`UPSTREAM_ADDR`].
//! A `dig` of a name in the names file must get the file's IPv4 addresses, any other name
//! dnsmasq's: only the shim's forwarding can bring that one back.
//!
//! Skips only without root/CAP_NET_ADMIN (`netns::unavailable`); anything else missing (Envoy,
//! dig, dnsmasq, the built artifacts) is a failure.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmesh_test_support::eventually::eventually;
use vmesh_test_support::netns::{self, As};
use vmesh_test_support::process::Proc;
use vmesh_test_support::{repo_root, TempDir};

const CONFIG: &str = "envoy-configs/quickstart.yaml";
const YAML_BLOCK: (&str, &str) = ("<!-- quickstart.yaml: begin", "<!-- quickstart.yaml: end");
const COMMAND_BLOCK: (&str, &str) = (
    "<!-- quickstart commands: begin",
    "<!-- quickstart commands: end",
);
/// What the test's resolver answers for the names the README expects to be forwarded.
const UPSTREAM_ADDR: &str = "198.18.0.53";

/// The fenced block between a begin and an end marker line: its language and its lines.
fn fenced_block(readme: &str, (begin, end): (&str, &str)) -> (String, Vec<String>) {
    let mut lines = readme.lines().skip_while(|l| !l.starts_with(begin)).skip(1);
    let fence = lines
        .next()
        .unwrap_or_else(|| panic!("README.md has no line starting with {begin:?}"));
    let lang = fence
        .strip_prefix("```")
        .unwrap_or_else(|| panic!("{begin:?} must be followed by a ``` fence, not {fence:?}"));
    let body: Vec<String> = lines
        .by_ref()
        .take_while(|l| *l != "```")
        .map(str::to_string)
        .collect();
    let after = lines.next().unwrap_or_default();
    assert!(
        after.starts_with(end),
        "the block after {begin:?} must close with ``` and then {end:?}, found {after:?}"
    );
    (lang.to_string(), body)
}

/// One line of the command block.
#[derive(Debug)]
enum Step {
    /// `... &`: a program that keeps running.
    Background(Vec<String>),
    /// `dig ... +short NAME`: its answer lines.
    Dig { args: Vec<String>, name: String },
}

/// The command block's lines as the shell would run them. The test runs them without a shell,
/// so a line may hold nothing the shell would read differently from plain words.
fn steps(lines: &[String]) -> Vec<Step> {
    let mut steps = Vec::new();
    for line in lines {
        let code = match line.find(" #") {
            Some(i) => &line[..i],
            None if line.trim_start().starts_with('#') => "",
            None => line,
        };
        let code = code.trim();
        if code.is_empty() {
            continue;
        }
        assert!(
            !code.contains(['\'', '"', '$', '\\', '|', ';', '<', '>', '`', '*', '~']),
            "README command {code:?} needs a shell to read it; this test runs plain words"
        );
        let (code, background) = match code.strip_suffix('&') {
            Some(rest) => (rest.trim_end(), true),
            None => (code, false),
        };
        let words: Vec<String> = code.split_whitespace().map(str::to_string).collect();
        if background {
            steps.push(Step::Background(words));
            continue;
        }
        assert_eq!(
            words[0], "dig",
            "README command {code:?}: only dig runs in the foreground here"
        );
        assert!(
            words.iter().any(|w| w == "+short"),
            "README command {code:?}: the test reads dig's +short output"
        );
        // The name: the one word that is neither the server, an option nor -p's value.
        let mut names = Vec::new();
        let mut after_p = false;
        for w in &words[1..] {
            if after_p {
                after_p = false;
            } else if w == "-p" {
                after_p = true;
            } else if !w.starts_with(['@', '+', '-']) {
                names.push(w.clone());
            }
        }
        assert_eq!(names.len(), 1, "README command {code:?}: one name to ask");
        let name = names.remove(0);
        steps.push(Step::Dig { args: words, name });
    }
    steps
}

/// The value after `flag` in a command.
fn flag_value<'a>(words: &'a [String], flag: &str) -> Option<&'a str> {
    words
        .iter()
        .position(|w| w == flag)
        .and_then(|i| words.get(i + 1))
        .map(String::as_str)
}

/// The IPv4 addresses the names file gives `name` (an exact key), if it has it.
fn table_v4(names_file: &Path, name: &str) -> Option<BTreeSet<String>> {
    let text = std::fs::read_to_string(names_file)
        .unwrap_or_else(|e| panic!("read {}: {e}", names_file.display()));
    let table: serde_json::Value = serde_json::from_str(&text).expect("the names file is JSON");
    let ips = table["names"].get(name)?["ips"].as_array()?.clone();
    Some(
        ips.iter()
            .filter_map(|ip| ip.as_str()?.parse::<Ipv4Addr>().ok())
            .map(|ip| ip.to_string())
            .collect(),
    )
}

/// The test's namespace; deleted (with /etc/netns/NAME) on drop, also when the test failed.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        netns::delete(&self.0);
    }
}

/// `ip` arguments that run `words` inside `ns` from the repository root.
fn in_root(ns: &str, root: &Path, words: &[String]) -> Vec<String> {
    let mut args = vec!["-C".to_string(), root.display().to_string()];
    args.extend(words.iter().cloned());
    netns::exec_args(ns, As::Caller, "env", &args)
}

/// The answer lines of a `dig +short` run inside `ns`.
fn dig_short(ns: &str, root: &Path, args: &[String]) -> Result<BTreeSet<String>, String> {
    let out = Command::new("ip")
        .args(in_root(ns, root, args))
        .output()
        .map_err(|e| format!("run dig: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "dig exited with {}: {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

#[test]
fn the_readme_quick_start_block_is_the_config_file() {
    let root = repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("read README.md");
    let (lang, lines) = fenced_block(&readme, YAML_BLOCK);
    assert_eq!(lang, "yaml");
    let file = std::fs::read_to_string(root.join(CONFIG)).expect("read the quick start config");
    let shown: String = lines.iter().map(|l| format!("{l}\n")).collect();
    assert!(
        shown == file,
        "README.md's quick start YAML differs from {CONFIG}: copy the file into the block"
    );
}

#[test]
fn the_readme_quick_start_answers_mesh_names_and_forwards_the_rest() {
    if let Some(why) = netns::unavailable() {
        eprintln!(
            "skipping the_readme_quick_start_answers_mesh_names_and_forwards_the_rest: {why}"
        );
        return;
    }
    let root = repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("read README.md");
    let (lang, lines) = fenced_block(&readme, COMMAND_BLOCK);
    assert_eq!(lang, "sh");
    let steps = steps(&lines);

    // What the commands name must exist before anything starts, with how to build it.
    let shim_cmd = steps
        .iter()
        .find_map(|s| match s {
            Step::Background(w) if w[0].ends_with("vmesh-shim") => Some(w),
            _ => None,
        })
        .expect("the quick start starts vmesh-shim");
    let names_file = root.join(
        flag_value(shim_cmd, "--static-names").expect("the quick start's shim has --static-names"),
    );
    let wasm = root.join("target/wasm32-wasip1/release/vmesh_filter.wasm");
    let config = std::fs::read_to_string(root.join(CONFIG)).expect("read the config");
    assert!(
        config.contains("filename: target/wasm32-wasip1/release/vmesh_filter.wasm"),
        "{CONFIG} no longer loads the .wasm this test checks for"
    );
    for (path, build) in [
        (
            root.join(&shim_cmd[0]),
            "cargo build --release -p vmesh-shim",
        ),
        (
            wasm,
            "cargo build --release --target wasm32-wasip1 -p vmesh-filter",
        ),
    ] {
        assert!(
            path.exists(),
            "{} is missing: build it with `{build}` (or ./scripts/build.sh)",
            path.display()
        );
    }

    // Each dig's expected answer: the names file's, or the resolver's for a name not in it.
    let digs: Vec<(&Vec<String>, &String, BTreeSet<String>, bool)> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Dig { args, name } => Some((args, name)),
            Step::Background(_) => None,
        })
        .map(|(args, name)| match table_v4(&names_file, name) {
            Some(ips) => (args, name, ips, true),
            None => (
                args,
                name,
                BTreeSet::from([UPSTREAM_ADDR.to_string()]),
                false,
            ),
        })
        .collect();
    assert!(
        digs.iter().any(|d| d.3) && digs.iter().any(|d| !d.3),
        "the quick start must dig a mesh name and a forwarded one: {digs:?}"
    );

    let ns = Namespace(format!("vmesh-t-{}-quick", std::process::id()));
    netns::add(&ns.0);
    netns::set_resolv_conf(&ns.0, "nameserver 127.0.0.1\n");
    let logs = TempDir::new();

    let mut dnsmasq_args: Vec<String> = [
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--log-facility=-",
        "--port=53",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--user=root",
        "--pid-file=",
        "--local=/#/",
    ]
    .map(String::from)
    .to_vec();
    for (_, name, _, mesh) in &digs {
        if !mesh {
            dnsmasq_args.push(format!("--address=/{name}/{UPSTREAM_ADDR}"));
        }
    }
    let _dnsmasq = Proc::spawn_guarded(
        "dnsmasq",
        &PathBuf::from("ip"),
        &netns::exec_args(&ns.0, As::Caller, "/usr/sbin/dnsmasq", &dnsmasq_args),
        &logs.path().join("dnsmasq.log"),
    );
    let forwarded = digs
        .iter()
        .find(|d| !d.3)
        .map(|d| d.1.clone())
        .unwrap_or_default();
    let direct: Vec<String> = [
        "dig",
        "@127.0.0.1",
        "+short",
        "+tries=1",
        "+time=1",
        &forwarded,
    ]
    .map(String::from)
    .to_vec();
    eventually("dnsmasq answers in the namespace", || {
        match dig_short(&ns.0, &root, &direct)? {
            got if got.contains(UPSTREAM_ADDR) => Ok(()),
            got => Err(format!("{got:?}")),
        }
    });

    // The README's order: each background program started as written, then the digs.
    let mut running = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Background(words) => {
                let name = Path::new(&words[0])
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                running.push(Proc::spawn(
                    &name,
                    &PathBuf::from("ip"),
                    &in_root(&ns.0, &root, words),
                    &logs.path().join(format!("{i}-{name}.log")),
                ));
            }
            Step::Dig { .. } => {}
        }
    }
    for (args, name, want, mesh) in &digs {
        let source = if *mesh {
            "the names file"
        } else {
            "the resolver, through the shim"
        };
        eventually(
            &format!("{} answers {name} from {source}", args.join(" ")),
            || {
                for p in running.iter_mut() {
                    if p.exited() {
                        return Err(format!("{} exited:\n{}", p.name(), p.log_text()));
                    }
                }
                match dig_short(&ns.0, &root, args)? {
                    got if got == *want => Ok(()),
                    got => Err(format!("got {got:?}, want {want:?}")),
                }
            },
        );
    }
}
