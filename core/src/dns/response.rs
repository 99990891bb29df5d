//! Response building: question echoed as asked, names compressed, OPT added when the query had
//! one, and whole records cut from the end with TC set when the answer exceeds the client's
//! transport limit (RFC 1035 §4.1.1, RFC 2181 §9, RFC 6891 §7).

use std::net::IpAddr;

use super::message::{Header, Query, HEADER_LEN};
use super::wire::{encode_dotted_name, put_u16, put_u32, set_u16};
use super::{rtype, Rcode, WireError, ADVERTISED_UDP_PAYLOAD, CLASS_IN};

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
const OPT_RR_LEN: usize = 11;
/// Compression pointer to the question name, which always starts right after the header.
const QUESTION_NAME_PTR: u16 = 0xC000 | HEADER_LEN as u16;

/// Where a record's owner name is: the question, or a name written earlier (its offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Question,
    At(u16),
}

/// Whether [`ResponseBuilder::finish`] had to cut records to fit the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncated {
    No,
    Yes,
}

#[derive(Debug)]
pub struct ResponseBuilder {
    buf: Vec<u8>,
    /// End offset of every answer record written so far, so truncation cuts whole records.
    record_ends: Vec<usize>,
    /// Where the answer section starts (after the question).
    records_start: usize,
    opt: Option<u32>,
    limit: usize,
}

impl ResponseBuilder {
    /// Starts a response to a parsed query: same ID, opcode and RD, RA set, question echoed
    /// byte-for-byte in the case it was asked in. `limit` is the transport's maximum size.
    pub fn new(query: &Query<'_>, rcode: Rcode, authoritative: bool, limit: usize) -> Self {
        let mut b = Self::with_header(&query.header, rcode, authoritative, limit);
        set_u16(&mut b.buf, 4, 1);
        query.qname.write_to(&mut b.buf);
        put_u16(&mut b.buf, query.qtype);
        put_u16(&mut b.buf, query.qclass);
        b.records_start = b.buf.len();
        b.opt = query.edns.map(|e| {
            let ext_rcode = u32::from(rcode.value() >> 4);
            (ext_rcode << 24) | if e.dnssec_ok { 0x8000 } else { 0 }
        });
        b
    }

    /// A header-only error response for a query whose question could not be used.
    pub fn error_for_header(header: &Header, rcode: Rcode) -> Vec<u8> {
        Self::with_header(header, rcode, false, super::UDP_DEFAULT_LIMIT)
            .finish()
            .0
    }

    fn with_header(header: &Header, rcode: Rcode, authoritative: bool, limit: usize) -> Self {
        let mut flags = FLAG_QR | FLAG_RA | (header.flags & (0x7800 | FLAG_RD));
        if authoritative {
            flags |= FLAG_AA;
        }
        flags |= rcode.value() & 0x000F;
        let mut buf = Vec::with_capacity(128);
        put_u16(&mut buf, header.id);
        put_u16(&mut buf, flags);
        buf.extend_from_slice(&[0; 8]);
        ResponseBuilder {
            records_start: buf.len(),
            buf,
            record_ends: Vec::new(),
            opt: None,
            limit,
        }
    }

    /// Adds a CNAME answer and returns where its target name starts, for records owned by it.
    pub fn cname(&mut self, owner: Owner, target: &str, ttl: u32) -> Result<Owner, WireError> {
        self.record_head(owner, rtype::CNAME, ttl);
        let rdlen_at = self.buf.len();
        put_u16(&mut self.buf, 0);
        let target_at = self.buf.len();
        if let Err(e) = encode_dotted_name(target, &mut self.buf) {
            self.buf
                .truncate(self.record_ends.last().copied().unwrap_or(self.buf.len()));
            return Err(e);
        }
        let rdlen = self.buf.len() - target_at;
        set_u16(&mut self.buf, rdlen_at, rdlen as u16);
        self.end_record();
        // Offsets beyond 0x3FFF cannot be pointed at; fall back to repeating nothing clever.
        Ok(match u16::try_from(target_at) {
            Ok(at) if at <= 0x3FFF => Owner::At(at),
            _ => Owner::Question,
        })
    }

    /// Adds an A or AAAA record, by the address family.
    pub fn address(&mut self, owner: Owner, ip: IpAddr, ttl: u32) {
        match ip {
            IpAddr::V4(v4) => {
                self.record_head(owner, rtype::A, ttl);
                put_u16(&mut self.buf, 4);
                self.buf.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.record_head(owner, rtype::AAAA, ttl);
                put_u16(&mut self.buf, 16);
                self.buf.extend_from_slice(&v6.octets());
            }
        }
        self.end_record();
    }

    fn record_head(&mut self, owner: Owner, rrtype: u16, ttl: u32) {
        let ptr = match owner {
            Owner::Question => QUESTION_NAME_PTR,
            Owner::At(at) => 0xC000 | at,
        };
        put_u16(&mut self.buf, ptr);
        put_u16(&mut self.buf, rrtype);
        put_u16(&mut self.buf, CLASS_IN);
        put_u32(&mut self.buf, ttl);
    }

    fn end_record(&mut self) {
        self.record_ends.push(self.buf.len());
    }

    /// Cuts whole answer records from the end until the message (with its OPT record) fits
    /// the limit, sets TC when anything was cut, and appends OPT.
    pub fn finish(mut self) -> (Vec<u8>, Truncated) {
        let opt_len = if self.opt.is_some() { OPT_RR_LEN } else { 0 };
        let mut kept = self.record_ends.len();
        while kept > 0
            && self.record_ends.get(kept - 1).copied().unwrap_or(0) + opt_len > self.limit
        {
            kept -= 1;
        }
        let truncated = if kept < self.record_ends.len() {
            let end = match kept {
                0 => self.records_start,
                n => self
                    .record_ends
                    .get(n - 1)
                    .copied()
                    .unwrap_or(self.records_start),
            };
            self.buf.truncate(end);
            if let Some(flags) = self.buf.get_mut(2) {
                *flags |= (FLAG_TC >> 8) as u8;
            }
            Truncated::Yes
        } else {
            Truncated::No
        };
        set_u16(&mut self.buf, 6, kept as u16);
        if let Some(ttl) = self.opt {
            self.buf.push(0);
            put_u16(&mut self.buf, rtype::OPT);
            put_u16(&mut self.buf, ADVERTISED_UDP_PAYLOAD);
            put_u32(&mut self.buf, ttl);
            put_u16(&mut self.buf, 0);
            set_u16(&mut self.buf, 10, 1);
        }
        (self.buf, truncated)
    }
}

/// Fits an answer that vmesh did not build (a forwarded one) into the client's transport:
/// returned unchanged when it fits; otherwise cut to header and question with TC set, which
/// tells the client to retry over TCP (RFC 2181 §9). `None` when the answer is not a DNS
/// response at all.
pub fn fit_forwarded(answer: &[u8], limit: usize) -> Option<std::borrow::Cow<'_, [u8]>> {
    use super::wire::Decoder;
    let mut d = Decoder::new(answer);
    let header = Header::parse(&mut d).ok()?;
    if !header.is_response() {
        return None;
    }
    if answer.len() <= limit {
        return Some(std::borrow::Cow::Borrowed(answer));
    }
    for _ in 0..header.qdcount {
        d.read_name().ok()?;
        d.skip(4).ok()?;
    }
    let mut cut = answer.get(..d.position())?.to_vec();
    if let Some(flags) = cut.get_mut(2) {
        *flags |= (FLAG_TC >> 8) as u8;
    }
    for at in [6, 8, 10] {
        set_u16(&mut cut, at, 0);
    }
    Some(std::borrow::Cow::Owned(cut))
}

/// Puts `id` into a message's header (forwarded answers go back under the client's ID).
pub fn set_id(message: &mut [u8], id: u16) {
    set_u16(message, 0, id);
}
