//! DNS wire format: the bounds-checked decoder ([`wire`]), query parsing ([`message`]) and the
//! response builder with compression and truncation ([`response`]).

pub mod inspect;
pub mod message;
pub mod response;
pub mod wire;

pub use message::{build_query, Edns, Header, Query, QueryError};
pub use response::{ResponseBuilder, Truncated};

/// Why bytes could not be decoded. Positions are byte offsets into the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message ends early at byte {at}")]
    Truncated { at: usize },
    #[error("compression pointer at byte {at} does not point backwards")]
    BadPointer { at: usize },
    #[error("reserved label type at byte {at}")]
    BadLabelType { at: usize },
    #[error("label longer than 63 octets")]
    LabelTooLong,
    #[error("name longer than 255 octets")]
    NameTooLong,
    #[error("empty label inside a name")]
    EmptyLabel,
}

/// Response codes vmesh sends (RFC 1035 §4.1.1, RFC 6891 §9 for BADVERS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    NoError,
    FormErr,
    ServFail,
    NxDomain,
    NotImp,
    Refused,
    /// Extended RCODE 16: only expressible with an OPT record.
    BadVers,
}

impl Rcode {
    /// The full 12-bit value; the low 4 bits go into the header, the rest into OPT.
    pub fn value(self) -> u16 {
        match self {
            Rcode::NoError => 0,
            Rcode::FormErr => 1,
            Rcode::ServFail => 2,
            Rcode::NxDomain => 3,
            Rcode::NotImp => 4,
            Rcode::Refused => 5,
            Rcode::BadVers => 16,
        }
    }
}

/// Record types vmesh treats specially; everything else is just a number to forward.
pub mod rtype {
    pub const A: u16 = 1;
    pub const CNAME: u16 = 5;
    pub const AAAA: u16 = 28;
    pub const OPT: u16 = 41;
    pub const IXFR: u16 = 251;
    pub const AXFR: u16 = 252;
}

/// Class IN (RFC 1035 §3.2.4).
pub const CLASS_IN: u16 = 1;

/// Largest UDP answer without EDNS (RFC 1035 §4.2.1).
pub const UDP_DEFAULT_LIMIT: usize = 512;
/// Largest message over TCP (2-byte length prefix, RFC 1035 §4.2.2).
pub const TCP_LIMIT: usize = 65535;
/// UDP payload size vmesh advertises in its own OPT record (the DNS flag day 2020 value).
pub const ADVERTISED_UDP_PAYLOAD: u16 = 1232;
