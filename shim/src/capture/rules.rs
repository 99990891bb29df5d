//! The capture rule set as a pure function of the settings: no files, no commands.
//!
//! [`build`] turns [`Settings`] into a [`Ruleset`] for one address family: the vmesh chains of
//! each table with their rules, and the jumps into them from the built-in chains. Every rule is
//! written the way `iptables-save` prints it, so what is installed can be compared with what
//! is wanted line by line (see `plan`).
//!
//! What the rules do, in the order a new connection meets them:
//!
//! - nat PREROUTING -> `VMESH_INBOUND`: TCP arriving from outside, to a captured port and not to
//!   an excluded one, goes to Envoy's inbound listener (`VMESH_IN_REDIRECT`).
//! - nat OUTPUT -> `VMESH_OUTPUT`: first the traffic that must never be captured returns: the
//!   proxy's own connections (Envoy's and the shim's uid, except that Envoy reaching one of
//!   this machine's non-loopback addresses is inbound traffic for the app and is treated as
//!   such), and a local resolver's DNS (its upstream queries). Then DNS to the resolv.conf
//!   nameservers goes to Envoy's DNS listener (`VMESH_DNS`), before the loopback exemption so a
//!   stub resolver on 127.0.0.53 is captured too. Then loopback, excluded destinations and
//!   ports return, and the remaining TCP goes to Envoy's outbound listener (`VMESH_REDIRECT`).
//! - raw OUTPUT/PREROUTING -> `VMESH_DNS_CT_OUT`/`VMESH_DNS_CT_IN`: the proxy's (and the local
//!   resolver's) UDP queries to the nameservers, and their answers, are tracked in a conntrack
//!   zone of their own. Without it a query from the proxy that happens to reuse the source port
//!   of an application's recent (captured) query would match that query's conntrack entry and
//!   be redirected to Envoy again: a loop. In their own zone the two flows never meet.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Every chain vmesh creates starts with this; nothing else does. `remove` relies on it.
pub const CHAIN_PREFIX: &str = "VMESH_";

pub const INBOUND: &str = "VMESH_INBOUND";
pub const IN_REDIRECT: &str = "VMESH_IN_REDIRECT";
pub const OUTPUT: &str = "VMESH_OUTPUT";
pub const REDIRECT: &str = "VMESH_REDIRECT";
pub const DNS: &str = "VMESH_DNS";
pub const DNS_CT_OUT: &str = "VMESH_DNS_CT_OUT";
pub const DNS_CT_IN: &str = "VMESH_DNS_CT_IN";

/// The conntrack zone of the proxy's own DNS flows to the nameservers (applications' flows stay
/// in the default zone 0). High, so it is unlikely to meet another user of zones.
pub const UPSTREAM_DNS_ZONE: u16 = 65053;

/// Where Envoy's inbound passthrough connects to the application from (Istio's convention);
/// such connections must not be captured again.
const PASSTHROUGH_V4: &str = "127.0.0.6";
const PASSTHROUGH_V6: &str = "::6";

const DNS_PORT: u16 = 53;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        match ip.to_canonical() {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// Every loopback address: traffic to them is local by definition.
    fn loopback(self) -> Cidr {
        match self {
            Family::V4 => Cidr::new(Ipv4Addr::new(127, 0, 0, 0).into(), 8),
            Family::V6 => Cidr::host(Ipv6Addr::LOCALHOST.into()),
        }
    }

    fn passthrough_source(self) -> Cidr {
        let ip: IpAddr = match self {
            Family::V4 => PASSTHROUGH_V4.parse().expect("valid literal"),
            Family::V6 => PASSTHROUGH_V6.parse().expect("valid literal"),
        };
        Cidr::host(ip)
    }
}

/// An address prefix. The address is kept with its host bits cleared, as iptables stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `addr/prefix` with the host bits of `addr` cleared; `prefix` is capped at the family's
    /// width.
    pub fn new(addr: IpAddr, prefix: u8) -> Cidr {
        match addr.to_canonical() {
            IpAddr::V4(v4) => {
                let prefix = prefix.min(32);
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                Cidr {
                    addr: Ipv4Addr::from(u32::from(v4) & mask).into(),
                    prefix,
                }
            }
            IpAddr::V6(v6) => {
                let prefix = prefix.min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                Cidr {
                    addr: Ipv6Addr::from(u128::from(v6) & mask).into(),
                    prefix,
                }
            }
        }
    }

    /// The single address `ip`.
    pub fn host(ip: IpAddr) -> Cidr {
        Cidr::new(ip, 128)
    }

    /// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (one host). Host bits are cleared, as
    /// iptables does.
    pub fn parse(text: &str) -> Result<Cidr, CidrError> {
        let bad = |why| CidrError {
            text: text.to_string(),
            why,
        };
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
        let width = match Family::of(addr) {
            Family::V4 => 32,
            Family::V6 => 128,
        };
        let prefix = match prefix {
            None => width,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= width && !p.starts_with('+') => n,
                _ => return Err(bad("prefix length out of range")),
            },
        };
        Ok(Cidr::new(addr, prefix))
    }

    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn is_loopback(&self) -> bool {
        self.addr.is_loopback()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?}: {why}")]
pub struct CidrError {
    pub text: String,
    pub why: &'static str,
}

/// Which inbound TCP ports go to Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Off,
    All,
    Ports(Vec<u16>),
}

/// Which outbound TCP destinations go to Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    Off,
    All,
    Cidrs(Vec<Cidr>),
}

/// Envoy's listeners the traffic is redirected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub outbound: u16,
    pub inbound: u16,
    pub dns: u16,
}

/// Everything the rules depend on, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub inbound: Inbound,
    /// Inbound ports never captured (they win over `inbound`).
    pub inbound_exclude_ports: Vec<u16>,
    pub outbound: Outbound,
    pub outbound_exclude_cidrs: Vec<Cidr>,
    pub outbound_exclude_ports: Vec<u16>,
    /// Envoy's and the shim's uids: their traffic is never captured (no loops).
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    /// A local caching resolver's uids (systemd-resolved): its DNS is never captured.
    pub resolver_uids: Vec<u32>,
    pub ports: Ports,
    /// The nameservers whose DNS traffic is captured; empty turns DNS capture off.
    pub dns_servers: Vec<IpAddr>,
}

/// The rules of one address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub family: Family,
    pub tables: Vec<Table>,
}

/// The vmesh part of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: &'static str,
    /// vmesh's chains, in the order they are declared.
    pub chains: Vec<&'static str>,
    /// The rules of those chains, in order.
    pub rules: Vec<Rule>,
    /// The jumps into vmesh's chains from the built-in chains.
    pub jumps: Vec<Rule>,
}

/// One rule: its chain and the rest of the line as `iptables-save` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub chain: String,
    pub spec: String,
}

impl Rule {
    /// The rule as an `iptables-save` line (`-A CHAIN spec`).
    pub fn line(&self) -> String {
        format!("-A {} {}", self.chain, self.spec)
    }
}

impl Ruleset {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    pub fn rule_count(&self) -> usize {
        self.tables
            .iter()
            .map(|t| t.rules.len() + t.jumps.len())
            .sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Uid(u32),
    Gid(u32),
}

/// The matches of one rule. [`Match::then`] writes them in `iptables-save`'s order:
/// addresses, interface, protocol, then the match modules in the order they were added.
#[derive(Debug, Clone, Default)]
struct Match {
    source: Option<Cidr>,
    dest: Option<(bool, Cidr)>,
    out_lo: bool,
    proto: Option<Proto>,
    sport: Option<u16>,
    dport: Option<(bool, u16)>,
    owner: Option<Owner>,
}

impl Match {
    fn new() -> Match {
        Match::default()
    }
    fn source(mut self, c: Cidr) -> Match {
        self.source = Some(c);
        self
    }
    fn dest(mut self, c: Cidr) -> Match {
        self.dest = Some((false, c));
        self
    }
    fn not_dest(mut self, c: Cidr) -> Match {
        self.dest = Some((true, c));
        self
    }
    fn out_lo(mut self) -> Match {
        self.out_lo = true;
        self
    }
    fn proto(mut self, p: Proto) -> Match {
        self.proto = Some(p);
        self
    }
    fn sport(mut self, port: u16) -> Match {
        self.sport = Some(port);
        self
    }
    fn dport(mut self, port: u16) -> Match {
        self.dport = Some((false, port));
        self
    }
    fn not_dport(mut self, port: u16) -> Match {
        self.dport = Some((true, port));
        self
    }
    fn owner(mut self, o: Owner) -> Match {
        self.owner = Some(o);
        self
    }

    /// The spec of a rule with these matches and `target` (with its options).
    fn then(&self, target: &str) -> String {
        let mut words: Vec<String> = Vec::new();
        if let Some(s) = self.source {
            words.push(format!("-s {s}"));
        }
        if let Some((negated, d)) = self.dest {
            words.push(format!("{}-d {d}", if negated { "! " } else { "" }));
        }
        if self.out_lo {
            words.push("-o lo".into());
        }
        if let Some(p) = self.proto {
            words.push(format!("-p {}", p.name()));
            if self.sport.is_some() || self.dport.is_some() {
                words.push(format!("-m {}", p.name()));
            }
            if let Some(port) = self.sport {
                words.push(format!("--sport {port}"));
            }
            if let Some((negated, port)) = self.dport {
                words.push(format!("{}--dport {port}", if negated { "! " } else { "" }));
            }
        }
        match self.owner {
            Some(Owner::Uid(uid)) => words.push(format!("-m owner --uid-owner {uid}")),
            Some(Owner::Gid(gid)) => words.push(format!("-m owner --gid-owner {gid}")),
            None => {}
        }
        words.push(format!("-j {target}"));
        words.join(" ")
    }
}

/// Collects one table's chains and rules.
struct TableBuilder {
    table: Table,
}

impl TableBuilder {
    fn new(name: &'static str) -> TableBuilder {
        TableBuilder {
            table: Table {
                name,
                chains: Vec::new(),
                rules: Vec::new(),
                jumps: Vec::new(),
            },
        }
    }

    fn rule(&mut self, chain: &'static str, spec: String) {
        if !self.table.chains.contains(&chain) {
            self.table.chains.push(chain);
        }
        self.table.rules.push(Rule {
            chain: chain.to_string(),
            spec,
        });
    }

    fn jump(&mut self, builtin: &str, spec: String) {
        self.table.jumps.push(Rule {
            chain: builtin.to_string(),
            spec,
        });
    }

    fn has(&self, chain: &str) -> bool {
        self.table.chains.contains(&chain)
    }

    fn finish(self) -> Option<Table> {
        (!self.table.chains.is_empty()).then_some(self.table)
    }
}

/// The rules for `family`. Chains that would be empty are left out, and so are the jumps to
/// them: a configuration that captures nothing yields an empty rule set.
pub fn build(s: &Settings, family: Family) -> Ruleset {
    let nameservers: Vec<Cidr> = s
        .dns_servers
        .iter()
        .filter(|ip| Family::of(**ip) == family)
        .map(|ip| Cidr::host(ip.to_canonical()))
        .collect();
    let loopback = family.loopback();
    let owners: Vec<Owner> = s
        .proxy_uids
        .iter()
        .map(|u| Owner::Uid(*u))
        .chain(s.proxy_gids.iter().map(|g| Owner::Gid(*g)))
        .collect();
    // Whose DNS queries go straight to the nameservers: the proxy's and a local resolver's.
    let upstream_askers: Vec<Owner> = owners
        .iter()
        .copied()
        .chain(s.resolver_uids.iter().map(|u| Owner::Uid(*u)))
        .collect();

    let mut nat = TableBuilder::new("nat");

    // Inbound.
    let inbound_ports: Option<Vec<Option<u16>>> = match &s.inbound {
        Inbound::Off => None,
        Inbound::All => Some(vec![None]),
        Inbound::Ports(ports) => Some(
            ports
                .iter()
                .filter(|p| !s.inbound_exclude_ports.contains(p))
                .map(|p| Some(*p))
                .collect(),
        ),
    };
    let inbound_ports = inbound_ports.filter(|ports| !ports.is_empty());
    if let Some(ports) = &inbound_ports {
        let tcp = Match::new().proto(Proto::Tcp);
        nat.rule(
            IN_REDIRECT,
            tcp.then(&format!("REDIRECT --to-ports {}", s.ports.inbound)),
        );
        if s.inbound == Inbound::All {
            for port in &s.inbound_exclude_ports {
                nat.rule(INBOUND, tcp.clone().dport(*port).then("RETURN"));
            }
        }
        for port in ports {
            let m = match port {
                Some(p) => tcp.clone().dport(*p),
                None => tcp.clone(),
            };
            nat.rule(INBOUND, m.then(IN_REDIRECT));
        }
        nat.jump("PREROUTING", tcp.then(INBOUND));
    }

    // Outbound: what never goes to Envoy comes first.
    let redirect_to: Option<Vec<Option<Cidr>>> = match &s.outbound {
        Outbound::Off => None,
        Outbound::All => Some(vec![None]),
        Outbound::Cidrs(cidrs) => Some(
            cidrs
                .iter()
                .filter(|c| c.family() == family)
                .map(|c| Some(*c))
                .collect(),
        ),
    };
    let redirect_to = redirect_to.filter(|to| !to.is_empty());
    let capture_dns = !nameservers.is_empty();
    if redirect_to.is_some() || capture_dns || nat.has(INBOUND) {
        if nat.has(INBOUND) {
            nat.rule(
                OUTPUT,
                Match::new()
                    .source(family.passthrough_source())
                    .out_lo()
                    .then("RETURN"),
            );
        }
        for owner in &owners {
            if nat.has(INBOUND) {
                // Envoy calling one of this machine's own addresses: inbound for the app.
                nat.rule(
                    OUTPUT,
                    Match::new()
                        .not_dest(loopback)
                        .out_lo()
                        .proto(Proto::Tcp)
                        .not_dport(DNS_PORT)
                        .owner(*owner)
                        .then(INBOUND),
                );
            }
            nat.rule(OUTPUT, Match::new().owner(*owner).then("RETURN"));
        }
        if capture_dns || redirect_to.is_some() {
            for uid in &s.resolver_uids {
                for proto in [Proto::Udp, Proto::Tcp] {
                    nat.rule(
                        OUTPUT,
                        Match::new()
                            .proto(proto)
                            .dport(DNS_PORT)
                            .owner(Owner::Uid(*uid))
                            .then("RETURN"),
                    );
                }
            }
        }
        if capture_dns {
            let to = format!("REDIRECT --to-ports {}", s.ports.dns);
            for ns in &nameservers {
                for proto in [Proto::Udp, Proto::Tcp] {
                    let m = Match::new().dest(*ns).proto(proto).dport(DNS_PORT);
                    nat.rule(DNS, m.then(&to));
                }
            }
            nat.rule(OUTPUT, Match::new().then(DNS));
        }
        if let Some(to) = &redirect_to {
            nat.rule(OUTPUT, Match::new().out_lo().then("RETURN"));
            for cidr in s
                .outbound_exclude_cidrs
                .iter()
                .filter(|c| c.family() == family)
            {
                nat.rule(OUTPUT, Match::new().dest(*cidr).then("RETURN"));
            }
            for port in &s.outbound_exclude_ports {
                nat.rule(
                    OUTPUT,
                    Match::new().proto(Proto::Tcp).dport(*port).then("RETURN"),
                );
            }
            nat.rule(
                REDIRECT,
                Match::new()
                    .proto(Proto::Tcp)
                    .then(&format!("REDIRECT --to-ports {}", s.ports.outbound)),
            );
            for cidr in to {
                let m = match cidr {
                    Some(c) => Match::new().dest(*c),
                    None => Match::new(),
                };
                nat.rule(OUTPUT, m.proto(Proto::Tcp).then(REDIRECT));
            }
        }
        // Only rules that return would be left (no DNS, no redirect): nothing to jump to.
        let captures = nat
            .table
            .rules
            .iter()
            .any(|r| r.chain == OUTPUT && !r.spec.ends_with("-j RETURN"));
        if captures {
            nat.jump("OUTPUT", Match::new().then(OUTPUT));
        } else {
            nat.table.rules.retain(|r| r.chain != OUTPUT);
            nat.table.chains.retain(|c| *c != OUTPUT);
        }
    }

    // Conntrack zones for the proxy's own UDP DNS.
    let mut raw = TableBuilder::new("raw");
    if capture_dns {
        let zone = format!("CT --zone {UPSTREAM_DNS_ZONE}");
        for ns in &nameservers {
            for owner in &upstream_askers {
                let m = Match::new()
                    .dest(*ns)
                    .proto(Proto::Udp)
                    .dport(DNS_PORT)
                    .owner(*owner);
                raw.rule(DNS_CT_OUT, m.then(&zone));
            }
        }
        for ns in &nameservers {
            let answer = Match::new().source(*ns).proto(Proto::Udp).sport(DNS_PORT);
            // A resolver on loopback answers from this machine (raw OUTPUT); a remote one's
            // answers arrive from outside (raw PREROUTING).
            let chain = if ns.is_loopback() {
                DNS_CT_OUT
            } else {
                DNS_CT_IN
            };
            raw.rule(chain, answer.then(&zone));
        }
        let udp = Match::new().proto(Proto::Udp);
        if raw.has(DNS_CT_OUT) {
            raw.jump("OUTPUT", udp.then(DNS_CT_OUT));
        }
        if raw.has(DNS_CT_IN) {
            raw.jump("PREROUTING", udp.then(DNS_CT_IN));
        }
    }

    Ruleset {
        family,
        tables: [nat.finish(), raw.finish()].into_iter().flatten().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            inbound: Inbound::Off,
            inbound_exclude_ports: vec![22, 15020, 15021, 15090],
            outbound: Outbound::All,
            outbound_exclude_cidrs: vec![],
            outbound_exclude_ports: vec![],
            proxy_uids: vec![1337],
            proxy_gids: vec![],
            resolver_uids: vec![],
            ports: Ports {
                outbound: 15001,
                inbound: 15006,
                dns: 15053,
            },
            dns_servers: vec!["198.18.0.53".parse().unwrap()],
        }
    }

    /// The rule set as `iptables-restore` input for a clean system (tables, chains, rules,
    /// jumps), the form the table below is written in.
    fn render(r: &Ruleset) -> String {
        let mut out = String::new();
        for t in &r.tables {
            out += &format!("*{}\n", t.name);
            for c in &t.chains {
                out += &format!(":{c} - [0:0]\n");
            }
            for rule in t.rules.iter().chain(&t.jumps) {
                out += &rule.line();
                out.push('\n');
            }
            out += "COMMIT\n";
        }
        out
    }

    #[test]
    fn cidr_table() {
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("10.0.0.0/8", Ok("10.0.0.0/8")),
            ("10.1.2.3/8", Ok("10.0.0.0/8")),
            ("10.1.2.3", Ok("10.1.2.3/32")),
            ("0.0.0.0/0", Ok("0.0.0.0/0")),
            ("2001:db8::1/32", Ok("2001:db8::/32")),
            ("2001:db8::1", Ok("2001:db8::1/128")),
            ("::/0", Ok("::/0")),
            ("::ffff:10.0.0.1", Ok("10.0.0.1/32")),
            ("10.0.0.0/33", Err("prefix length out of range")),
            ("10.0.0.0/+8", Err("prefix length out of range")),
            ("10.0.0.0/", Err("prefix length out of range")),
            ("2001:db8::/129", Err("prefix length out of range")),
            ("example.com/8", Err("not an IP address")),
            ("10.0.0/8", Err("not an IP address")),
            ("", Err("not an IP address")),
        ];
        for (text, want) in cases {
            let got = Cidr::parse(text).map(|c| c.to_string()).map_err(|e| e.why);
            assert_eq!(got, want.map(String::from), "{text:?}");
        }
    }

    #[test]
    fn rulesets_table() {
        type Case = (
            &'static str,
            Box<dyn Fn(&mut Settings)>,
            Family,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                "defaults: DNS to the nameserver and all outbound TCP, no inbound",
                Box::new(|_| {}),
                Family::V4,
                "\
*nat
:VMESH_OUTPUT - [0:0]
:VMESH_DNS - [0:0]
:VMESH_REDIRECT - [0:0]
-A VMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A VMESH_DNS -d 198.18.0.53/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053
-A VMESH_DNS -d 198.18.0.53/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053
-A VMESH_OUTPUT -j VMESH_DNS
-A VMESH_OUTPUT -o lo -j RETURN
-A VMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A VMESH_OUTPUT -p tcp -j VMESH_REDIRECT
-A OUTPUT -j VMESH_OUTPUT
COMMIT
*raw
:VMESH_DNS_CT_OUT - [0:0]
:VMESH_DNS_CT_IN - [0:0]
-A VMESH_DNS_CT_OUT -d 198.18.0.53/32 -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 65053
-A VMESH_DNS_CT_IN -s 198.18.0.53/32 -p udp -m udp --sport 53 -j CT --zone 65053
-A OUTPUT -p udp -j VMESH_DNS_CT_OUT
-A PREROUTING -p udp -j VMESH_DNS_CT_IN
COMMIT
",
            ),
            (
                "every inbound port but the excluded ones; Envoy calling its own address is inbound",
                Box::new(|s| {
                    s.inbound = Inbound::All;
                    s.dns_servers.clear();
                    s.outbound = Outbound::Off;
                }),
                Family::V4,
                "\
*nat
:VMESH_IN_REDIRECT - [0:0]
:VMESH_INBOUND - [0:0]
:VMESH_OUTPUT - [0:0]
-A VMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A VMESH_INBOUND -p tcp -m tcp --dport 22 -j RETURN
-A VMESH_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A VMESH_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A VMESH_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A VMESH_INBOUND -p tcp -j VMESH_IN_REDIRECT
-A VMESH_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A VMESH_OUTPUT ! -d 127.0.0.0/8 -o lo -p tcp -m tcp ! --dport 53 -m owner --uid-owner 1337 -j VMESH_INBOUND
-A VMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A PREROUTING -p tcp -j VMESH_INBOUND
-A OUTPUT -j VMESH_OUTPUT
COMMIT
",
            ),
            (
                "a port list: excluded ports are left out, nothing else returns",
                Box::new(|s| {
                    s.inbound = Inbound::Ports(vec![8080, 22, 9090]);
                    s.dns_servers.clear();
                    s.outbound = Outbound::Off;
                    s.proxy_uids = vec![1337, 998];
                }),
                Family::V4,
                "\
*nat
:VMESH_IN_REDIRECT - [0:0]
:VMESH_INBOUND - [0:0]
:VMESH_OUTPUT - [0:0]
-A VMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A VMESH_INBOUND -p tcp -m tcp --dport 8080 -j VMESH_IN_REDIRECT
-A VMESH_INBOUND -p tcp -m tcp --dport 9090 -j VMESH_IN_REDIRECT
-A VMESH_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A VMESH_OUTPUT ! -d 127.0.0.0/8 -o lo -p tcp -m tcp ! --dport 53 -m owner --uid-owner 1337 -j VMESH_INBOUND
-A VMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A VMESH_OUTPUT ! -d 127.0.0.0/8 -o lo -p tcp -m tcp ! --dport 53 -m owner --uid-owner 998 -j VMESH_INBOUND
-A VMESH_OUTPUT -m owner --uid-owner 998 -j RETURN
-A PREROUTING -p tcp -j VMESH_INBOUND
-A OUTPUT -j VMESH_OUTPUT
COMMIT
",
            ),
            (
                "only excluded ports listed: no inbound capture at all",
                Box::new(|s| {
                    s.inbound = Inbound::Ports(vec![22]);
                    s.dns_servers.clear();
                    s.outbound = Outbound::Off;
                }),
                Family::V4,
                "",
            ),
            (
                "nothing captured in IPv4 when only IPv6 ranges are listed",
                Box::new(|s| {
                    s.outbound = Outbound::Cidrs(vec![Cidr::parse("2001:db8::/32").unwrap()]);
                    s.dns_servers.clear();
                }),
                Family::V4,
                "",
            ),
            (
                "service ranges, exclusions, gid, a local resolver on loopback and its uid",
                Box::new(|s| {
                    s.outbound = Outbound::Cidrs(vec![
                        Cidr::parse("10.96.0.0/12").unwrap(),
                        Cidr::parse("2001:db8::/32").unwrap(),
                        Cidr::parse("198.18.0.0/15").unwrap(),
                    ]);
                    s.outbound_exclude_cidrs = vec![
                        Cidr::parse("10.96.0.10").unwrap(),
                        Cidr::parse("2001:db8::1").unwrap(),
                    ];
                    s.outbound_exclude_ports = vec![5432];
                    s.proxy_gids = vec![1337];
                    s.resolver_uids = vec![991];
                    s.dns_servers = vec![
                        "127.0.0.53".parse().unwrap(),
                        "2001:db8::53".parse().unwrap(),
                    ];
                }),
                Family::V4,
                "\
*nat
:VMESH_OUTPUT - [0:0]
:VMESH_DNS - [0:0]
:VMESH_REDIRECT - [0:0]
-A VMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A VMESH_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A VMESH_OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 991 -j RETURN
-A VMESH_OUTPUT -p tcp -m tcp --dport 53 -m owner --uid-owner 991 -j RETURN
-A VMESH_DNS -d 127.0.0.53/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053
-A VMESH_DNS -d 127.0.0.53/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053
-A VMESH_OUTPUT -j VMESH_DNS
-A VMESH_OUTPUT -o lo -j RETURN
-A VMESH_OUTPUT -d 10.96.0.10/32 -j RETURN
-A VMESH_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN
-A VMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A VMESH_OUTPUT -d 10.96.0.0/12 -p tcp -j VMESH_REDIRECT
-A VMESH_OUTPUT -d 198.18.0.0/15 -p tcp -j VMESH_REDIRECT
-A OUTPUT -j VMESH_OUTPUT
COMMIT
*raw
:VMESH_DNS_CT_OUT - [0:0]
-A VMESH_DNS_CT_OUT -d 127.0.0.53/32 -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 65053
-A VMESH_DNS_CT_OUT -d 127.0.0.53/32 -p udp -m udp --dport 53 -m owner --gid-owner 1337 -j CT --zone 65053
-A VMESH_DNS_CT_OUT -d 127.0.0.53/32 -p udp -m udp --dport 53 -m owner --uid-owner 991 -j CT --zone 65053
-A VMESH_DNS_CT_OUT -s 127.0.0.53/32 -p udp -m udp --sport 53 -j CT --zone 65053
-A OUTPUT -p udp -j VMESH_DNS_CT_OUT
COMMIT
",
            ),
            (
                "the same in IPv6",
                Box::new(|s| {
                    s.inbound = Inbound::Ports(vec![8080]);
                    s.outbound_exclude_cidrs = vec![
                        Cidr::parse("10.96.0.10").unwrap(),
                        Cidr::parse("2001:db8::1").unwrap(),
                    ];
                    s.dns_servers = vec!["127.0.0.53".parse().unwrap(), "2001:db8::53".parse().unwrap()];
                }),
                Family::V6,
                "\
*nat
:VMESH_IN_REDIRECT - [0:0]
:VMESH_INBOUND - [0:0]
:VMESH_OUTPUT - [0:0]
:VMESH_DNS - [0:0]
:VMESH_REDIRECT - [0:0]
-A VMESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A VMESH_INBOUND -p tcp -m tcp --dport 8080 -j VMESH_IN_REDIRECT
-A VMESH_OUTPUT -s ::6/128 -o lo -j RETURN
-A VMESH_OUTPUT ! -d ::1/128 -o lo -p tcp -m tcp ! --dport 53 -m owner --uid-owner 1337 -j VMESH_INBOUND
-A VMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A VMESH_DNS -d 2001:db8::53/128 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053
-A VMESH_DNS -d 2001:db8::53/128 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053
-A VMESH_OUTPUT -j VMESH_DNS
-A VMESH_OUTPUT -o lo -j RETURN
-A VMESH_OUTPUT -d 2001:db8::1/128 -j RETURN
-A VMESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A VMESH_OUTPUT -p tcp -j VMESH_REDIRECT
-A PREROUTING -p tcp -j VMESH_INBOUND
-A OUTPUT -j VMESH_OUTPUT
COMMIT
*raw
:VMESH_DNS_CT_OUT - [0:0]
:VMESH_DNS_CT_IN - [0:0]
-A VMESH_DNS_CT_OUT -d 2001:db8::53/128 -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 65053
-A VMESH_DNS_CT_IN -s 2001:db8::53/128 -p udp -m udp --sport 53 -j CT --zone 65053
-A OUTPUT -p udp -j VMESH_DNS_CT_OUT
-A PREROUTING -p udp -j VMESH_DNS_CT_IN
COMMIT
",
            ),
            (
                "DNS only: the proxy's and the resolver's queries return before the redirect",
                Box::new(|s| {
                    s.outbound = Outbound::Off;
                    s.resolver_uids = vec![991];
                    s.ports.dns = 5353;
                }),
                Family::V4,
                "\
*nat
:VMESH_OUTPUT - [0:0]
:VMESH_DNS - [0:0]
-A VMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A VMESH_OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 991 -j RETURN
-A VMESH_OUTPUT -p tcp -m tcp --dport 53 -m owner --uid-owner 991 -j RETURN
-A VMESH_DNS -d 198.18.0.53/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 5353
-A VMESH_DNS -d 198.18.0.53/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 5353
-A VMESH_OUTPUT -j VMESH_DNS
-A OUTPUT -j VMESH_OUTPUT
COMMIT
*raw
:VMESH_DNS_CT_OUT - [0:0]
:VMESH_DNS_CT_IN - [0:0]
-A VMESH_DNS_CT_OUT -d 198.18.0.53/32 -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 65053
-A VMESH_DNS_CT_OUT -d 198.18.0.53/32 -p udp -m udp --dport 53 -m owner --uid-owner 991 -j CT --zone 65053
-A VMESH_DNS_CT_IN -s 198.18.0.53/32 -p udp -m udp --sport 53 -j CT --zone 65053
-A OUTPUT -p udp -j VMESH_DNS_CT_OUT
-A PREROUTING -p udp -j VMESH_DNS_CT_IN
COMMIT
",
            ),
            (
                "nothing to capture",
                Box::new(|s| {
                    s.outbound = Outbound::Off;
                    s.dns_servers.clear();
                }),
                Family::V4,
                "",
            ),
        ];
        for (what, change, family, want) in cases {
            let mut s = settings();
            change(&mut s);
            let got = render(&build(&s, family));
            assert_eq!(got, want, "{what}\n--- got:\n{got}");
        }
    }

    #[test]
    fn every_chain_has_the_prefix_and_every_jump_leads_to_a_declared_chain() {
        let mut s = settings();
        s.inbound = Inbound::All;
        s.resolver_uids = vec![991];
        s.proxy_gids = vec![1337];
        for family in [Family::V4, Family::V6] {
            s.dns_servers = vec!["198.18.0.53".parse().unwrap(), "::1".parse().unwrap()];
            for t in build(&s, family).tables {
                for c in &t.chains {
                    assert!(c.starts_with(CHAIN_PREFIX), "{c}");
                    assert!(t.rules.iter().any(|r| r.chain == *c), "{c} is empty");
                }
                for r in t.rules.iter().chain(&t.jumps) {
                    let target = r.spec.rsplit("-j ").next().unwrap();
                    let target = target.split(' ').next().unwrap();
                    if target.starts_with(CHAIN_PREFIX) {
                        assert!(t.chains.contains(&target), "{} jumps nowhere", r.line());
                    }
                }
                for j in &t.jumps {
                    assert!(!j.chain.starts_with(CHAIN_PREFIX), "{}", j.line());
                }
            }
        }
    }
}
