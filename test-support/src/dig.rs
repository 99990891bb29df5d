//! Running `dig` (BIND's client, the tool operators use) and reading what it printed.

use std::process::Command;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub name: String,
    pub ttl: u32,
    pub rtype: String,
    pub data: String,
}

#[derive(Debug, Clone)]
pub struct Dig {
    pub status: String,
    pub flags: Vec<String>,
    pub answers: Vec<Answer>,
    /// The EDNS UDP size the server advertised, if it sent OPT.
    pub edns_udp: Option<u32>,
    pub question: String,
    pub raw: String,
}

impl Dig {
    pub fn has_flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
    }

    /// Answer data of one type, in order.
    pub fn data(&self, rtype: &str) -> Vec<String> {
        self.answers
            .iter()
            .filter(|a| a.rtype == rtype)
            .map(|a| a.data.clone())
            .collect()
    }
}

/// `dig @127.0.0.1 -p PORT <args> +tries=1 +time=T`, parsed. `Err` if dig got no answer.
pub fn dig(port: u16, args: &[&str]) -> Result<Dig, String> {
    let mut cmd = Command::new("dig");
    cmd.arg("@127.0.0.1").arg("-p").arg(port.to_string());
    run(cmd, args)
}

/// `cmd` (dig with its server, possibly behind `setpriv` or `ip netns exec`) with
/// `+tries=1 +time=T <args>`, parsed. `Err` if dig got no answer.
pub fn run(mut cmd: Command, args: &[&str]) -> Result<Dig, String> {
    let out = cmd
        .args(["+tries=1", "+time=3"])
        .args(args)
        .output()
        .map_err(|e| format!("run dig: {e}"))?;
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    parse(&raw).ok_or_else(|| format!("dig {args:?} got no answer:\n{raw}"))
}

fn parse(raw: &str) -> Option<Dig> {
    let status = raw
        .lines()
        .find_map(|l| l.split("status: ").nth(1))?
        .split(',')
        .next()?
        .to_string();
    let flags = raw
        .lines()
        .find_map(|l| l.strip_prefix(";; flags: "))
        .and_then(|l| l.split(';').next())
        .map(|f| f.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let edns_udp = raw
        .lines()
        .find_map(|l| l.split("udp: ").nth(1))
        .and_then(|v| v.trim().parse().ok());
    let question = raw
        .lines()
        .skip_while(|l| !l.starts_with(";; QUESTION SECTION:"))
        .nth(1)
        .map(|l| {
            l.trim_start_matches(';')
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let answers = raw
        .lines()
        .skip_while(|l| !l.starts_with(";; ANSWER SECTION:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next()?.to_string();
            let ttl = parts.next()?.parse().ok()?;
            let _class = parts.next()?;
            let rtype = parts.next()?.to_string();
            let data = parts.collect::<Vec<_>>().join(" ");
            Some(Answer {
                name,
                ttl,
                rtype,
                data,
            })
        })
        .collect();
    Some(Dig {
        status,
        flags,
        answers,
        edns_udp,
        question,
        raw: raw.to_string(),
    })
}
