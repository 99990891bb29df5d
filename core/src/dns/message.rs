//! Query parsing, layered the way resolvers expect bad input to be handled:
//! an unreadable header or a response (QR=1) is dropped silently, an opcode other than QUERY is
//! NOTIMP, anything else malformed is FORMERR (RFC 1035 §4.1.1, RFC 6891 §6.1.1).

use super::wire::{Decoder, Labels};
use super::{rtype, Rcode, WireError};

pub const HEADER_LEN: usize = 12;

const FLAG_QR: u16 = 0x8000;
const FLAG_RD: u16 = 0x0100;
const OPCODE_SHIFT: u16 = 11;

/// The fixed 12-byte header (RFC 1035 §4.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    pub fn parse(d: &mut Decoder<'_>) -> Result<Self, WireError> {
        Ok(Header {
            id: d.read_u16()?,
            flags: d.read_u16()?,
            qdcount: d.read_u16()?,
            ancount: d.read_u16()?,
            nscount: d.read_u16()?,
            arcount: d.read_u16()?,
        })
    }

    pub fn is_response(&self) -> bool {
        self.flags & FLAG_QR != 0
    }

    pub fn opcode(&self) -> u8 {
        ((self.flags >> OPCODE_SHIFT) & 0x0F) as u8
    }

    pub fn recursion_desired(&self) -> bool {
        self.flags & FLAG_RD != 0
    }
}

/// EDNS(0) parameters of a query's OPT record (RFC 6891 §6.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    pub udp_payload: u16,
    pub version: u8,
    pub dnssec_ok: bool,
}

/// A well-formed standard query with exactly one question.
#[derive(Debug, Clone)]
pub struct Query<'a> {
    pub header: Header,
    pub qname: Labels<'a>,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
}

/// Why a message is not a query vmesh can answer, and what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// No usable header: there is nobody to answer.
    #[error("dropped: header unreadable")]
    ShortHeader,
    /// A response sent to a server: answering could start a loop between two servers.
    #[error("dropped: message is a response (QR=1)")]
    IsResponse,
    /// Answered with NOTIMP.
    #[error("opcode {opcode} not implemented")]
    Opcode { header: Header, opcode: u8 },
    /// Answered with FORMERR.
    #[error("malformed query: {reason}")]
    Malformed {
        header: Header,
        reason: Malformation,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformation {
    #[error("QDCOUNT is {0}, not 1")]
    QuestionCount(u16),
    #[error("bad question: {0}")]
    Question(WireError),
    #[error("bad record after the question: {0}")]
    Record(WireError),
    #[error("more than one OPT record")]
    DuplicateOpt,
    #[error("OPT record with a non-root owner name")]
    OptOwner,
}

impl QueryError {
    /// The RCODE to answer with, or `None` when the message must be dropped.
    pub fn rcode(&self) -> Option<Rcode> {
        match self {
            QueryError::ShortHeader | QueryError::IsResponse => None,
            QueryError::Opcode { .. } => Some(Rcode::NotImp),
            QueryError::Malformed { .. } => Some(Rcode::FormErr),
        }
    }

    pub fn header(&self) -> Option<&Header> {
        match self {
            QueryError::ShortHeader | QueryError::IsResponse => None,
            QueryError::Opcode { header, .. } | QueryError::Malformed { header, .. } => {
                Some(header)
            }
        }
    }
}

impl<'a> Query<'a> {
    pub fn parse(buf: &'a [u8]) -> Result<Self, QueryError> {
        let mut d = Decoder::new(buf);
        let header = Header::parse(&mut d).map_err(|_| QueryError::ShortHeader)?;
        if header.is_response() {
            return Err(QueryError::IsResponse);
        }
        if header.opcode() != 0 {
            return Err(QueryError::Opcode {
                header,
                opcode: header.opcode(),
            });
        }
        let malformed = |reason| QueryError::Malformed { header, reason };
        if header.qdcount != 1 {
            return Err(malformed(Malformation::QuestionCount(header.qdcount)));
        }
        let qname = d
            .read_name()
            .map_err(|e| malformed(Malformation::Question(e)))?;
        let qtype = d
            .read_u16()
            .map_err(|e| malformed(Malformation::Question(e)))?;
        let qclass = d
            .read_u16()
            .map_err(|e| malformed(Malformation::Question(e)))?;

        // Answer and authority sections are unusual in a query but legal: skip them, bounded.
        let skipped = u32::from(header.ancount) + u32::from(header.nscount);
        for _ in 0..skipped {
            read_record(&mut d).map_err(|e| malformed(Malformation::Record(e)))?;
        }
        let mut edns = None;
        for _ in 0..header.arcount {
            let rec = read_record(&mut d).map_err(|e| malformed(Malformation::Record(e)))?;
            if rec.rtype != rtype::OPT {
                continue;
            }
            if edns.is_some() {
                return Err(malformed(Malformation::DuplicateOpt));
            }
            if !rec.owner_is_root {
                return Err(malformed(Malformation::OptOwner));
            }
            edns = Some(Edns {
                udp_payload: rec.class,
                version: ((rec.ttl >> 16) & 0xFF) as u8,
                dnssec_ok: rec.ttl & 0x8000 != 0,
            });
        }
        Ok(Query {
            header,
            qname,
            qtype,
            qclass,
            edns,
        })
    }

    /// Largest answer this query's client accepts over UDP: max(512, EDNS payload size).
    pub fn udp_limit(&self) -> usize {
        let advertised = self.edns.map(|e| usize::from(e.udp_payload)).unwrap_or(0);
        advertised.max(super::UDP_DEFAULT_LIMIT)
    }
}

/// Builds a standard query the way stub resolvers send it: RD set, one question of class IN,
/// and an OPT record when `edns` is given. For clients of the forwarder, benchmarks and tests;
/// vmesh itself only answers queries.
pub fn build_query(
    id: u16,
    name: &str,
    qtype: u16,
    edns: Option<Edns>,
) -> Result<Vec<u8>, WireError> {
    let mut q = Vec::with_capacity(HEADER_LEN + name.len() + 2 + 4 + 11);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&FLAG_RD.to_be_bytes());
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    super::wire::encode_dotted_name(name, &mut q)?;
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&super::CLASS_IN.to_be_bytes());
    if let Some(e) = edns {
        q.push(0);
        q.extend_from_slice(&rtype::OPT.to_be_bytes());
        q.extend_from_slice(&e.udp_payload.to_be_bytes());
        q.extend_from_slice(&[0, e.version, if e.dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
    }
    Ok(q)
}

struct RecordHead {
    owner_is_root: bool,
    rtype: u16,
    class: u16,
    ttl: u32,
}

fn read_record(d: &mut Decoder<'_>) -> Result<RecordHead, WireError> {
    let owner = d.read_name()?;
    let rtype = d.read_u16()?;
    let class = d.read_u16()?;
    let ttl = d.read_u32()?;
    let rdlen = d.read_u16()?;
    d.skip(usize::from(rdlen))?;
    Ok(RecordHead {
        owner_is_root: owner.is_empty(),
        rtype,
        class,
        ttl,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A query as dig sends it, with an optional EDNS payload size.
    pub fn query_bytes(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let edns = edns.map(|udp_payload| Edns {
            udp_payload,
            version: 0,
            dnssec_ok: false,
        });
        build_query(id, name, qtype, edns).unwrap()
    }

    #[test]
    fn parses_a_query_with_edns() {
        let bytes = query_bytes(0xBEEF, "Foo.Example.COM", rtype::A, Some(4096));
        let q = Query::parse(&bytes).unwrap();
        assert_eq!(q.header.id, 0xBEEF);
        assert!(q.header.recursion_desired());
        assert_eq!(q.qtype, rtype::A);
        assert_eq!(q.qclass, 1);
        assert_eq!(
            q.qname.to_lower_dotted().as_deref(),
            Some("foo.example.com")
        );
        assert_eq!(
            q.edns,
            Some(Edns {
                udp_payload: 4096,
                version: 0,
                dnssec_ok: false
            })
        );
        assert_eq!(q.udp_limit(), 4096);
    }

    #[test]
    fn rfc6891_6_2_5_payload_below_512_is_treated_as_512() {
        let q = query_bytes(1, "a", rtype::A, Some(100));
        assert_eq!(Query::parse(&q).unwrap().udp_limit(), 512);
        let q = query_bytes(1, "a", rtype::A, None);
        assert_eq!(Query::parse(&q).unwrap().udp_limit(), 512);
    }

    #[test]
    fn layered_rejection_table() {
        let good = query_bytes(7, "a.b", rtype::A, None);
        let mut response = good.clone();
        response[2] |= 0x80;
        let mut notify = good.clone();
        notify[2] |= 4 << 3;
        let mut two_questions = good.clone();
        two_questions[5] = 2;
        let mut zero_questions = good.clone();
        zero_questions[5] = 0;
        let mut cut = good.clone();
        cut.truncate(good.len() - 3);
        let mut two_opts = query_bytes(7, "a.b", rtype::A, Some(1232));
        two_opts[11] = 2;
        two_opts.extend_from_slice(&[0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0]);
        let mut opt_owner = query_bytes(7, "a.b", rtype::A, None);
        opt_owner[11] = 1;
        opt_owner.extend_from_slice(&[1, b'x', 0, 0, 41, 4, 0, 0, 0, 0, 0, 0, 0]);

        let cases: Vec<(&str, &[u8], Option<Rcode>)> = vec![
            ("empty", &[], None),
            ("11 bytes", &good[..11], None),
            ("QR=1", &response, None),
            ("NOTIFY opcode", &notify, Some(Rcode::NotImp)),
            ("QDCOUNT=2", &two_questions, Some(Rcode::FormErr)),
            ("QDCOUNT=0", &zero_questions, Some(Rcode::FormErr)),
            ("question cut", &cut, Some(Rcode::FormErr)),
            ("two OPT", &two_opts, Some(Rcode::FormErr)),
            ("OPT not at root", &opt_owner, Some(Rcode::FormErr)),
        ];
        for (what, bytes, want) in cases {
            let err = Query::parse(bytes).unwrap_err();
            assert_eq!(err.rcode(), want, "{what}: {err}");
            if want.is_some() {
                assert_eq!(err.header().unwrap().id, 7, "{what}");
            }
        }
    }

    #[test]
    fn unknown_additional_records_are_skipped() {
        let mut q = query_bytes(9, "x", rtype::AAAA, None);
        q[11] = 1;
        // a TXT record in the additional section, compressed owner pointing at the question
        q.extend_from_slice(&[0xC0, 12, 0, 16, 0, 1, 0, 0, 0, 5, 0, 2, 1, b'z']);
        let parsed = Query::parse(&q).unwrap();
        assert_eq!(parsed.qtype, rtype::AAAA);
        assert!(parsed.edns.is_none());
    }
}
