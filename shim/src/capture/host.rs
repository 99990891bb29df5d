//! What capture needs to know about the machine, and the iptables commands it runs.
//!
//! The parsers (passwd/group lines, `/proc/net/if_inet6`, capability masks) are pure and
//! tested here; the functions that read the real files or run commands are thin wrappers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::rules::Family;

/// `CAP_NET_ADMIN`, the capability iptables needs (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;

/// The id of `name` in an `/etc/passwd` or `/etc/group` text (third field).
pub fn id_in(db: &str, name: &str) -> Option<u32> {
    db.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

/// A user (or group) given by name or number. Names are looked up in the local database file
/// only: the accounts that matter here (the proxy, systemd-resolve) are local system accounts.
pub fn resolve_id(text: &str, db: Option<&str>) -> Result<u32, IdError> {
    if let Ok(n) = text.parse::<u32>() {
        return Ok(n);
    }
    match db {
        Some(db) => id_in(db, text).ok_or(IdError::Unknown),
        None => Err(IdError::NoDatabase),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("no such name")]
    Unknown,
    #[error("the account database could not be read")]
    NoDatabase,
}

pub const PASSWD: &str = "/etc/passwd";
pub const GROUP: &str = "/etc/group";

pub fn read_db(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Whether a `/proc/self/status` text says the process may change firewall rules: root, or
/// `CAP_NET_ADMIN` in its effective set.
pub fn may_admin_network(status: &str) -> bool {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let cap_eff = field("CapEff:").and_then(|hex| u64::from_str_radix(hex, 16).ok());
    cap_eff.is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

pub fn this_process_may_admin_network() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| may_admin_network(&s))
}

/// `program` found in `PATH`, as the shell would find it.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).is_file().then(|| PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The iptables commands of one family, e.g. `iptables-nft-save` and `iptables-nft-restore`
/// for IPv4 of the `iptables-nft` variant, `ip6tables-nft-save` for its IPv6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commands {
    pub save: String,
    pub restore: String,
}

/// The variants `--iptables` accepts.
pub const VARIANTS: [&str; 3] = ["iptables", "iptables-nft", "iptables-legacy"];

impl Commands {
    pub fn of(variant: &str, family: Family) -> Commands {
        let base = match family {
            Family::V4 => variant.to_string(),
            Family::V6 => variant.replacen("iptables", "ip6tables", 1),
        };
        Commands {
            save: format!("{base}-save"),
            restore: format!("{base}-restore"),
        }
    }

    /// The ones not found in `PATH`.
    pub fn missing(&self) -> Vec<String> {
        [&self.save, &self.restore]
            .into_iter()
            .filter(|p| find_program(p).is_none())
            .cloned()
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// `iptables-save` output: every table that exists, no counters.
pub fn save(c: &Commands) -> Result<String, RunError> {
    run(&c.save, &[], None)
}

/// Feeds `input` to `iptables-restore --noflush`, waiting for the xtables lock if another
/// program holds it (the legacy backend has one).
pub fn restore(c: &Commands, input: &str) -> Result<(), RunError> {
    run(&c.restore, &["--noflush", "--wait=10"], Some(input)).map(|_| ())
}

fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, RunError> {
    let spawn_err = |source| RunError::Spawn {
        program: program.to_string(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A failed write shows up as the command's own error below.
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(RunError::Failed {
            program: program.to_string(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_table() {
        let passwd = "\
root:x:0:0:root:/root:/bin/bash
systemd-resolve:x:991:991:systemd Resolver:/:/usr/sbin/nologin
istio-proxy:x:1337:1337::/var/lib/istio:/bin/sh
broken:x:notanumber:1::/:/bin/sh
";
        let cases: &[(&str, Option<&str>, Result<u32, IdError>)] = &[
            ("istio-proxy", Some(passwd), Ok(1337)),
            ("systemd-resolve", Some(passwd), Ok(991)),
            ("1338", Some(passwd), Ok(1338)),
            ("0", None, Ok(0)),
            ("nobody", Some(passwd), Err(IdError::Unknown)),
            ("broken", Some(passwd), Err(IdError::Unknown)),
            ("istio", Some(passwd), Err(IdError::Unknown)),
            ("istio-proxy", None, Err(IdError::NoDatabase)),
        ];
        for (text, db, want) in cases {
            assert_eq!(resolve_id(text, *db), *want, "{text}");
        }
    }

    #[test]
    fn network_admin_table() {
        let cases = [
            ("CapEff:\t000001ffffffffff\n", true),
            ("CapEff:\t0000000000001000\n", true),
            ("CapEff:\t0000000000000000\n", false),
            ("CapEff:\t0000000000000fff\n", false),
            ("Name:\tx\n", false),
        ];
        for (status, want) in cases {
            assert_eq!(may_admin_network(status), want, "{status}");
        }
    }

    #[test]
    fn commands_per_variant_and_family() {
        assert_eq!(
            Commands::of("iptables-legacy", Family::V6),
            Commands {
                save: "ip6tables-legacy-save".into(),
                restore: "ip6tables-legacy-restore".into(),
            }
        );
        assert_eq!(Commands::of("iptables", Family::V4).save, "iptables-save");
    }
}
