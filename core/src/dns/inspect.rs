//! Reading responses: used by the forwarder to check an upstream answered the question it was
//! asked, and by tests and the fuzz target to check what the responder built.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::message::Header;
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
