//! The DNS proxy's decision for one query: answer it here, forward it, or drop it.
//!
//! Mesh names (per [`NameIndex::lookup`]) asked as A or AAAA are answered authoritatively;
//! other types for mesh names and every non-mesh name are forwarded unchanged; before the first
//! table arrives, names inside the cluster domain get SERVFAIL (there is nobody better to ask)
//! and everything else is forwarded.

use std::net::IpAddr;

use crate::dns::response::{fit_forwarded, set_id, Owner};
use crate::dns::{
    rtype, Query, QueryError, Rcode, ResponseBuilder, Truncated, CLASS_IN, TCP_LIMIT,
};
use crate::names::{Match, NameIndex};

/// TTL of mesh answers, as Istio's DNS proxy uses.
pub const MESH_TTL: u32 = 30;

/// The transport a query arrived on; it bounds the answer size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    /// DNS over HTTPS (RFC 8484): no UDP size limit.
    Https,
}

impl Transport {
    pub fn limit(self, query: &Query<'_>) -> usize {
        match self {
            Transport::Udp => query.udp_limit(),
            Transport::Tcp | Transport::Https => TCP_LIMIT,
        }
    }
}

/// What happened to a query, for counters and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Mesh name answered with addresses (possibly after a CNAME).
    Answered {
        truncated: bool,
    },
    /// Mesh name without addresses of the asked family: NOERROR, empty, authoritative.
    NoData,
    /// Inside the cluster domain while no table is loaded.
    NotReady,
    FormErr,
    NotImp,
    Refused,
    BadVers,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Reply {
        message: Vec<u8>,
        verdict: Verdict,
    },
    /// Send the query, as received, to the forwarder.
    Forward,
    /// Send nothing back.
    Drop(QueryError),
}

/// Decides what to do with one DNS message. `rotation` picks which address leads the answer
/// (callers pass a counter) so clients spread over a name's addresses.
pub fn respond(
    message: &[u8],
    transport: Transport,
    table: Option<&NameIndex>,
    cluster_domain: &str,
    rotation: u32,
) -> Outcome {
    let query = match Query::parse(message) {
        Ok(q) => q,
        Err(e) => {
            return match (e.rcode(), e.header()) {
                (Some(rcode), Some(header)) => Outcome::Reply {
                    message: ResponseBuilder::error_for_header(header, rcode),
                    verdict: if rcode == Rcode::NotImp {
                        Verdict::NotImp
                    } else {
                        Verdict::FormErr
                    },
                },
                _ => Outcome::Drop(e),
            }
        }
    };
    let limit = transport.limit(&query);
    let reply = |rcode, verdict| Outcome::Reply {
        message: ResponseBuilder::new(&query, rcode, false, limit).finish().0,
        verdict,
    };
    if query.edns.is_some_and(|e| e.version != 0) {
        return reply(Rcode::BadVers, Verdict::BadVers);
    }
    if matches!(query.qtype, rtype::AXFR | rtype::IXFR) {
        // Zone transfers are not relayed: the mesh is not a zone and upstreams are not ours.
        return reply(Rcode::Refused, Verdict::Refused);
    }
    if query.qclass != CLASS_IN {
        return Outcome::Forward;
    }
    let Some(name) = query.qname.to_lower_dotted() else {
        return Outcome::Forward;
    };
    let Some(table) = table else {
        return if in_domain(&name, cluster_domain) {
            reply(Rcode::ServFail, Verdict::NotReady)
        } else {
            Outcome::Forward
        };
    };
    let Some(found) = table.lookup(&name) else {
        return Outcome::Forward;
    };
    let want_v4 = match query.qtype {
        rtype::A => true,
        rtype::AAAA => false,
        _ => return Outcome::Forward,
    };
    let mut b = ResponseBuilder::new(&query, Rcode::NoError, true, limit);
    let owner = match found {
        Match::Direct(_) => Owner::Question,
        Match::ViaSearchDomain { target, .. } => match b.cname(Owner::Question, target, MESH_TTL) {
            Ok(owner) => owner,
            // Table names are validated, so this cannot happen; forwarding is the safe answer.
            Err(_) => return Outcome::Forward,
        },
    };
    let record = found.record();
    let count = if want_v4 {
        record.ipv4().len()
    } else {
        record.ipv6().len()
    };
    if want_v4 {
        add_rotated(
            &mut b,
            owner,
            record.ipv4().map(IpAddr::V4),
            count,
            rotation,
        );
    } else {
        add_rotated(
            &mut b,
            owner,
            record.ipv6().map(IpAddr::V6),
            count,
            rotation,
        );
    }
    let (message, truncated) = b.finish();
    let verdict = if count == 0 {
        Verdict::NoData
    } else {
        Verdict::Answered {
            truncated: truncated == Truncated::Yes,
        }
    };
    Outcome::Reply { message, verdict }
}

fn add_rotated(
    b: &mut ResponseBuilder,
    owner: Owner,
    ips: impl Iterator<Item = IpAddr> + Clone,
    count: usize,
    rotation: u32,
) {
    if count == 0 {
        return;
    }
    let start = rotation as usize % count;
    for ip in ips.clone().skip(start).chain(ips.take(start)) {
        b.address(owner, ip, MESH_TTL);
    }
}

/// SERVFAIL for a query that could not be forwarded; `None` if it is not an answerable query.
pub fn servfail(message: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let query = Query::parse(message).ok()?;
    let limit = transport.limit(&query);
    Some(
        ResponseBuilder::new(&query, Rcode::ServFail, false, limit)
            .finish()
            .0,
    )
}

/// Prepares a forwarded answer for the client: its own ID, cut to its transport's limit.
/// Falls back to SERVFAIL when the forwarder returned something that is not a DNS response.
pub fn forwarded_answer(query: &[u8], answer: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let parsed = Query::parse(query).ok()?;
    let limit = transport.limit(&parsed);
    match fit_forwarded(answer, limit) {
        Some(fitted) => {
            let mut out = fitted.into_owned();
            set_id(&mut out, parsed.header.id);
            Some(out)
        }
        None => servfail(query, transport),
    }
}

fn in_domain(name: &str, domain: &str) -> bool {
    name == domain
        || name
            .strip_suffix(domain)
            .is_some_and(|rest| rest.ends_with('.'))
}
