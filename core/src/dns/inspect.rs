//! Reading responses: used by the forwarder to check an upstream answered the question it was
//! asked, and by tests and the fuzz target to check what the responder built.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::message::{Header, Query};
use super::wire::{Decoder, Labels};
use super::{rtype, WireError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub header: Header,
    /// Question names as sent (case preserved), dotted.
    pub questions: Vec<(String, u16, u16)>,
    pub answers: Vec<Rr>,
    pub authority: Vec<Rr>,
    pub additional: Vec<Rr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rr {
    pub name: String,
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    pub data: RData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(String),
    Other(Vec<u8>),
}

impl Response {
    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        let mut d = Decoder::new(buf);
        let header = Header::parse(&mut d)?;
        let mut questions = Vec::new();
        for _ in 0..header.qdcount {
            let name = dotted(&d.read_name()?);
            questions.push((name, d.read_u16()?, d.read_u16()?));
        }
        let mut section = |count: u16| -> Result<Vec<Rr>, WireError> {
            (0..count).map(|_| read_rr(&mut d)).collect()
        };
        let answers = section(header.ancount)?;
        let authority = section(header.nscount)?;
        let additional = section(header.arcount)?;
        Ok(Response {
            header,
            questions,
            answers,
            authority,
            additional,
        })
    }

    pub fn rcode(&self) -> u16 {
        self.header.flags & 0x000F
    }

    pub fn truncated(&self) -> bool {
        self.header.flags & 0x0200 != 0
    }

    pub fn authoritative(&self) -> bool {
        self.header.flags & 0x0400 != 0
    }
}

/// Whether `response` answers `query`: QR set, the same ID, and the same single question (name
/// compared case-insensitively, RFC 4343 §3; type and class equal). Only the header and the
/// question are read, so an answer cut anywhere after its question (TC) still matches; a
/// forwarder uses this to refuse stray or spoofed datagrams before relaying an answer.
pub fn answers(query: &Query<'_>, response: &[u8]) -> bool {
    let mut d = Decoder::new(response);
    let Ok(header) = Header::parse(&mut d) else {
        return false;
    };
    if !header.is_response() || header.id != query.header.id || header.qdcount != 1 {
        return false;
    }
    let Ok(name) = d.read_name() else {
        return false;
    };
    let same_name = name.len() == query.qname.len()
        && name
            .iter()
            .zip(query.qname.iter())
            .all(|(a, b)| a.eq_ignore_ascii_case(b));
    same_name && d.read_u16() == Ok(query.qtype) && d.read_u16() == Ok(query.qclass)
}

fn dotted(labels: &Labels<'_>) -> String {
    labels
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect::<Vec<_>>()
        .join(".")
}

fn read_rr(d: &mut Decoder<'_>) -> Result<Rr, WireError> {
    let name = dotted(&d.read_name()?);
    let rtype = d.read_u16()?;
    let class = d.read_u16()?;
    let ttl = d.read_u32()?;
    let rdlen = usize::from(d.read_u16()?);
    let start = d.position();
    let data = match (rtype, rdlen) {
        (rtype::A, 4) => {
            let s = d.read_slice(4)?;
            let mut o = [0u8; 4];
            o.copy_from_slice(s);
            RData::A(Ipv4Addr::from(o))
        }
        (rtype::AAAA, 16) => {
            let s = d.read_slice(16)?;
            let mut o = [0u8; 16];
            o.copy_from_slice(s);
            RData::Aaaa(Ipv6Addr::from(o))
        }
        (rtype::CNAME, _) => {
            let target = dotted(&d.read_name()?);
            if d.position() != start + rdlen {
                return Err(WireError::Truncated { at: start });
            }
            RData::Cname(target)
        }
        _ => RData::Other(d.read_slice(rdlen)?.to_vec()),
    };
    Ok(Rr {
        name,
        rtype,
        class,
        ttl,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::message::tests::query_bytes;

    #[test]
    fn answers_matches_id_and_question_case_insensitively() {
        let q = query_bytes(0x1234, "Www.Example.com", rtype::A, None);
        let query = Query::parse(&q).unwrap();
        let reply = |id: u16, name: &str, qtype: u16| {
            let mut r = query_bytes(id, name, qtype, None);
            r[2] |= 0x80;
            r
        };
        let good = reply(0x1234, "wWW.EXAMPLE.COM", rtype::A);
        assert!(answers(&query, &good));
        let mut cut_after_question = good.clone();
        cut_after_question[7] = 3; // claims three answers it does not carry
        assert!(
            answers(&query, &cut_after_question),
            "TC answers may be cut anywhere"
        );

        let mut not_a_response = good.clone();
        not_a_response[2] &= 0x7F;
        let mut other_class = good.clone();
        let at = other_class.len() - 1;
        other_class[at] = 3;
        let mut no_question = good.clone();
        no_question[5] = 0;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("other ID", reply(0x1235, "www.example.com", rtype::A)),
            ("other name", reply(0x1234, "www.example.org", rtype::A)),
            ("longer name", reply(0x1234, "a.www.example.com", rtype::A)),
            ("other type", reply(0x1234, "www.example.com", rtype::AAAA)),
            ("other class", other_class),
            ("QR=0", not_a_response),
            ("QDCOUNT=0", no_question),
            ("cut in the question", good[..good.len() - 2].to_vec()),
            ("header only", good[..12].to_vec()),
            ("empty", Vec::new()),
        ];
        for (what, bytes) in cases {
            assert!(!answers(&query, &bytes), "{what}");
        }
    }
}
