//! The system resolvers the shim forwards to, and one query/answer exchange with one of them.
//!
//! Which resolvers: the `nameserver` lines of resolv.conf (parsed here, as glibc reads them,
//! with its `search` list), or addresses given on the command line, minus any address that is the shim itself or the
//! Envoy DNS listener in front of it (forwarding there would loop). How: UDP through the
//! socket pool ([`crate::pool`]), or TCP with the RFC 1035 §4.2.2 length prefix (here).
//! An answer is only taken when [`vmesh_core::dns::inspect::answers`] says it answers the query
//! that was sent (ID and question), so stray and spoofed answers are skipped.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use vmesh_core::dns::{inspect, Query};
use vmesh_core::framing::{self, Framing};

/// The port resolv.conf nameservers listen on; resolv.conf has no way to say another.
pub const DNS_PORT: u16 = 53;

/// glibc and musl use at most this many nameservers (MAXNS); later lines are ignored there,
/// so they are ignored here too.
pub const MAX_RESOLV_NAMESERVERS: usize = 3;

/// What resolv.conf yielded: the nameservers to use, the search list, and the lines that were
/// not used.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolvConf {
    pub nameservers: Vec<SocketAddr>,
    /// The `search` (or `domain`) list as written: lower-cased, trailing dots removed, the
    /// root (`.`) left out. `None` when there is no such line; [`ResolvConf::search_domains`]
    /// applies glibc's fallback then.
    pub search: Option<Vec<String>>,
    pub skipped: Vec<SkippedLine>,
}

impl ResolvConf {
    /// The domains a short name is tried in, as glibc's resolver uses them: the `search` or
    /// `domain` line, whichever comes last; without either, the domain part of the host name
    /// (`vm1.corp.example` -> `corp.example`), or none.
    pub fn search_domains(&self, hostname: &str) -> Vec<String> {
        match &self.search {
            Some(list) => list.clone(),
            None => hostname
                .split_once('.')
                .and_then(|(_, domain)| normalize_domain(domain))
                .into_iter()
                .collect(),
        }
    }
}

/// Lower-cased, without trailing dots; `None` for the root or an empty word.
fn normalize_domain(word: &str) -> Option<String> {
    let d = word.trim_end_matches('.');
    (!d.is_empty()).then(|| d.to_ascii_lowercase())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct SkippedLine {
    /// 1-based line number.
    pub line: usize,
    pub reason: SkipReason,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    #[error("`nameserver` without an address")]
    MissingAddress,
    #[error("{0:?} is not an IP address")]
    BadAddress(String),
    #[error("unknown network interface {0:?} in a scoped IPv6 address")]
    UnknownInterface(String),
    #[error("only the first {MAX_RESOLV_NAMESERVERS} nameservers are used (as glibc does)")]
    BeyondMaximum,
}

/// Parses resolv.conf text. `interface_index` maps an interface name (from `fe80::1%eth0`)
/// to its index; [`interface_index`] is the real one, tests pass their own.
pub fn parse_resolv_conf(text: &str, interface_index: impl Fn(&str) -> Option<u32>) -> ResolvConf {
    let mut out = ResolvConf::default();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let mut words = raw.split_whitespace();
        match words.next() {
            Some("nameserver") => {}
            // glibc: `domain` and `search` replace each other, the last line wins; `domain`
            // names one domain. A word starting a comment ends the list.
            Some(keyword @ ("search" | "domain")) => {
                let domains = words
                    .take_while(|w| !w.starts_with(['#', ';']))
                    .take(if keyword == "domain" { 1 } else { usize::MAX })
                    .filter_map(normalize_domain);
                out.search = Some(domains.collect());
                continue;
            }
            // Comments (# or ;), blank lines and the other keywords (options, sortlist, ...).
            _ => continue,
        }
        let skip = |reason| SkippedLine { line, reason };
        // A comment may follow the address without a space, as glibc allows.
        let address = words
            .next()
            .map(|w| w.split(['#', ';']).next().unwrap_or(""))
            .unwrap_or("");
        if address.is_empty() {
            out.skipped.push(skip(SkipReason::MissingAddress));
            continue;
        }
        let ip = match parse_ip(address, &interface_index) {
            Ok(ip) => ip,
            Err(reason) => {
                out.skipped.push(skip(reason));
                continue;
            }
        };
        if out.nameservers.len() == MAX_RESOLV_NAMESERVERS {
            out.skipped.push(skip(SkipReason::BeyondMaximum));
            continue;
        }
        out.nameservers.push(with_port(ip, DNS_PORT));
    }
    out
}

/// Reads and parses a resolv.conf file (see [`parse_resolv_conf`]), with the real interface
/// indexes.
pub fn read_resolv(path: &Path) -> io::Result<ResolvConf> {
    Ok(parse_resolv_conf(
        &std::fs::read_to_string(path)?,
        interface_index,
    ))
}

/// This machine's host name (for [`ResolvConf::search_domains`]); empty if unreadable.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// An IP address with an optional IPv6 zone (`fe80::1%eth0` or `fe80::1%2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopedIp {
    V4(Ipv4Addr),
    V6 { ip: Ipv6Addr, scope_id: u32 },
}

fn parse_ip(
    text: &str,
    interface_index: impl Fn(&str) -> Option<u32>,
) -> Result<ScopedIp, SkipReason> {
    let (ip, zone) = match text.split_once('%') {
        Some((ip, zone)) => (ip, Some(zone)),
        None => (text, None),
    };
    let bad = || SkipReason::BadAddress(text.to_string());
    match (ip.parse::<IpAddr>().map_err(|_| bad())?, zone) {
        (IpAddr::V4(v4), None) => Ok(ScopedIp::V4(v4)),
        (IpAddr::V4(_), Some(_)) => Err(bad()),
        (IpAddr::V6(v6), None) => Ok(ScopedIp::V6 {
            ip: v6,
            scope_id: 0,
        }),
        (IpAddr::V6(v6), Some(zone)) => {
            let scope_id = match zone.parse::<u32>() {
                Ok(n) => n,
                Err(_) if !zone.is_empty() => interface_index(zone)
                    .ok_or_else(|| SkipReason::UnknownInterface(zone.to_string()))?,
                Err(_) => return Err(bad()),
            };
            Ok(ScopedIp::V6 { ip: v6, scope_id })
        }
    }
}

fn with_port(ip: ScopedIp, port: u16) -> SocketAddr {
    match ip {
        ScopedIp::V4(v4) => SocketAddr::new(IpAddr::V4(v4), port),
        ScopedIp::V6 { ip, scope_id } => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope_id)),
    }
}

/// Parses `IPv4:PORT`, `[IPv6]:PORT` or `[IPv6%zone]:PORT`. Host names are refused on purpose:
/// resolving them would ask the very resolver being configured.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, AddrError> {
    let bad = |why| AddrError {
        text: text.to_string(),
        why,
    };
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or(bad("missing ']'"))?;
        let port = after.strip_prefix(':').ok_or(bad("missing :PORT"))?;
        (host, port)
    } else {
        let (host, port) = text.rsplit_once(':').ok_or(bad("missing :PORT"))?;
        if host.contains(':') {
            return Err(bad("IPv6 addresses go in brackets, as [::1]:53"));
        }
        (host, port)
    };
    let port: u16 = port
        .parse()
        .map_err(|_| bad("port is not a number 0-65535"))?;
    let ip = parse_ip(host, interface_index).map_err(|reason| match reason {
        SkipReason::UnknownInterface(_) => bad("unknown network interface"),
        _ => bad("host must be an IP address"),
    })?;
    Ok(with_port(ip, port))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?}: {why} (expected IPv4:PORT or [IPv6]:PORT)")]
pub struct AddrError {
    pub text: String,
    pub why: &'static str,
}

/// The index of a network interface, read from sysfs (no libc call needed).
pub fn interface_index(name: &str) -> Option<u32> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return None;
    }
    let path = Path::new("/sys/class/net").join(name).join("ifindex");
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether sending to `upstream` would reach `own` (the shim, or Envoy's DNS listener).
/// An unspecified `own` IP (0.0.0.0 or ::) listens on every local address, and loopback is
/// always local, so those count as self too.
pub fn is_self(upstream: SocketAddr, own: SocketAddr) -> bool {
    if upstream.port() != own.port() {
        return false;
    }
    let (up, own) = (upstream.ip().to_canonical(), own.ip().to_canonical());
    up == own || (own.is_unspecified() && (up.is_loopback() || up.is_unspecified()))
}

/// Transport for one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Udp,
    Tcp,
}

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("no answer in time")]
    Timeout,
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no random query ID: {0}")]
    Random(getrandom::Error),
    #[error("answer over TCP does not answer the query (ID or question differ, or not DNS)")]
    Mismatch,
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> ExchangeError {
    move |source| ExchangeError::Io { op, source }
}

/// Sends `query` (whose parsed form is `asked`) to `upstream` over a new TCP connection and
/// returns its answer, byte-for-byte, or an error at `deadline`. (UDP goes through the socket
/// pool, [`crate::pool`].)
pub async fn exchange_tcp_until(
    upstream: SocketAddr,
    query: &[u8],
    asked: &Query<'_>,
    deadline: Instant,
) -> Result<Vec<u8>, ExchangeError> {
    timeout_at(deadline, exchange_tcp(upstream, query, asked))
        .await
        .unwrap_or(Err(ExchangeError::Timeout))
}

async fn exchange_tcp(
    upstream: SocketAddr,
    query: &[u8],
    asked: &Query<'_>,
) -> Result<Vec<u8>, ExchangeError> {
    let mut stream = TcpStream::connect(upstream)
        .await
        .map_err(io_err("TCP connect"))?;
    // Length and message in one write: some servers mishandle a split prefix.
    let mut framed = Vec::with_capacity(query.len() + 2);
    framing::encode(Framing::Tcp, query, &mut framed);
    stream
        .write_all(&framed)
        .await
        .map_err(io_err("TCP send"))?;
    let mut len = [0u8; 2];
    stream
        .read_exact(&mut len)
        .await
        .map_err(io_err("TCP receive"))?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream
        .read_exact(&mut answer)
        .await
        .map_err(io_err("TCP receive"))?;
    if !inspect::answers(asked, &answer) {
        return Err(ExchangeError::Mismatch);
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifindex(name: &str) -> Option<u32> {
        (name == "eth0").then_some(2)
    }

    fn v6(text: &str, scope_id: u32) -> SocketAddr {
        SocketAddr::V6(SocketAddrV6::new(text.parse().unwrap(), 53, 0, scope_id))
    }

    #[test]
    fn resolv_conf_table() {
        let text = "\
# generated by NetworkManager
; another comment style
search corp.example svc.cluster.local
options ndots:5 timeout:2 attempts:3 rotate

nameserver 10.0.0.2
nameserver\t::1   # trailing comment
nameserver fe80::1%eth0
nameserver
nameserver dns.example.com
nameserver 10.0.0.3#inline
  nameserver 10.0.0.4
nameservers 10.9.9.9
";
        let parsed = parse_resolv_conf(text, ifindex);
        assert_eq!(
            parsed.nameservers,
            vec![
                "10.0.0.2:53".parse().unwrap(),
                v6("::1", 0),
                v6("fe80::1", 2)
            ]
        );
        let skipped: Vec<(usize, SkipReason)> = parsed
            .skipped
            .into_iter()
            .map(|s| (s.line, s.reason))
            .collect();
        assert_eq!(
            skipped,
            vec![
                (9, SkipReason::MissingAddress),
                (10, SkipReason::BadAddress("dns.example.com".into())),
                (11, SkipReason::BeyondMaximum),
                (12, SkipReason::BeyondMaximum),
            ]
        );
    }

    #[test]
    fn resolv_conf_search_list_table() {
        let cases: &[(&str, Option<&[&str]>)] = &[
            ("nameserver 10.0.0.2\n", None),
            (
                "search Corp.Example. svc.cluster.local\n",
                Some(&["corp.example", "svc.cluster.local"]),
            ),
            (
                "search\tA.example  b.example\t\n",
                Some(&["a.example", "b.example"]),
            ),
            // The last of `domain` and `search` wins; `domain` takes one name.
            (
                "search a.example\ndomain b.example c.example\n",
                Some(&["b.example"]),
            ),
            (
                "domain b.example\nsearch a.example x.example\n",
                Some(&["a.example", "x.example"]),
            ),
            ("search a.example # trailing\n", Some(&["a.example"])),
            ("search a.example ;also\n", Some(&["a.example"])),
            ("search . a.example..\n", Some(&["a.example"])),
            ("search\n", Some(&[])),
            ("# search a.example\n; domain b.example\n", None),
            ("searches a.example\n", None),
        ];
        for (text, want) in cases {
            let got = parse_resolv_conf(text, ifindex).search;
            let want = want.map(|w| w.iter().map(|d| d.to_string()).collect::<Vec<_>>());
            assert_eq!(got, want, "{text:?}");
        }
    }

    #[test]
    fn search_domains_fall_back_to_the_host_name_domain() {
        let none = parse_resolv_conf("nameserver 10.0.0.2\n", ifindex);
        assert_eq!(none.search_domains("vm1.Corp.Example."), ["corp.example"]);
        assert!(none.search_domains("vm1").is_empty());
        let empty = parse_resolv_conf("search\n", ifindex);
        assert!(empty.search_domains("vm1.corp.example").is_empty());
        let listed = parse_resolv_conf("domain a.example\n", ifindex);
        assert_eq!(listed.search_domains("vm1.corp.example"), ["a.example"]);
    }

    #[test]
    fn resolv_conf_scoped_and_malformed_addresses() {
        let cases: &[(&str, Result<SocketAddr, SkipReason>)] = &[
            ("nameserver 192.0.2.1", Ok("192.0.2.1:53".parse().unwrap())),
            ("nameserver 2001:db8::53", Ok(v6("2001:db8::53", 0))),
            ("nameserver fe80::1%7", Ok(v6("fe80::1", 7))),
            ("nameserver fe80::1%eth0", Ok(v6("fe80::1", 2))),
            (
                "nameserver fe80::1%wlan9",
                Err(SkipReason::UnknownInterface("wlan9".into())),
            ),
            (
                "nameserver fe80::1%",
                Err(SkipReason::BadAddress("fe80::1%".into())),
            ),
            (
                "nameserver 10.0.0.1%eth0",
                Err(SkipReason::BadAddress("10.0.0.1%eth0".into())),
            ),
            (
                "nameserver 10.0.0.256",
                Err(SkipReason::BadAddress("10.0.0.256".into())),
            ),
            (
                "nameserver [::1]",
                Err(SkipReason::BadAddress("[::1]".into())),
            ),
        ];
        for (line, want) in cases {
            let parsed = parse_resolv_conf(line, ifindex);
            let got = match (parsed.nameservers.first(), parsed.skipped.first()) {
                (Some(addr), None) => Ok(*addr),
                (None, Some(s)) => Err(s.reason.clone()),
                other => panic!("{line}: {other:?}"),
            };
            assert_eq!(&got, want, "{line}");
        }
    }

    #[test]
    fn socket_addr_flags_table() {
        assert_eq!(
            parse_socket_addr("127.0.0.1:53"),
            Ok("127.0.0.1:53".parse().unwrap())
        );
        assert_eq!(
            parse_socket_addr("[::1]:5353"),
            Ok("[::1]:5353".parse().unwrap())
        );
        assert_eq!(
            parse_socket_addr("[fe80::1%3]:53").map(|a| match a {
                SocketAddr::V6(v6) => v6.scope_id(),
                SocketAddr::V4(_) => 0,
            }),
            Ok(3)
        );
        for bad in [
            "127.0.0.1",
            "::1:53",
            "localhost:53",
            "[::1]",
            "[::1]53",
            "1.2.3.4:99999",
            "",
        ] {
            assert!(parse_socket_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn self_addresses_include_wildcard_listeners() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(is_self(addr("127.0.0.1:15053"), addr("127.0.0.1:15053")));
        assert!(is_self(
            addr("[::ffff:127.0.0.1]:15053"),
            addr("127.0.0.1:15053")
        ));
        assert!(is_self(addr("127.0.0.1:15053"), addr("0.0.0.0:15053")));
        assert!(is_self(addr("[::1]:15053"), addr("[::]:15053")));
        assert!(!is_self(addr("127.0.0.1:53"), addr("127.0.0.1:15053")));
        assert!(!is_self(addr("10.0.0.2:15053"), addr("127.0.0.1:15053")));
    }
}
