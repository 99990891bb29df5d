//! The routing table as the agent publishes it to worker VMs: a length-prefixed binary form of
//! [`RouteTable`], so workers neither parse JSON nor see the names part of the table. Decoding
//! checks every length against the bytes left and returns [`RouteError::BadImage`], never
//! panics; the decoded table is validated again by [`super::RouteIndex::compile`].
//!
//! ```text
//! "VMRT" u32 format, str version, str network, str locality,
//! u32 services x (str host, str namespace, u8 registry, u8 resolution, u32 vips x ip,
//!                 u32 ports x (u16 port, str name, str protocol,
//!                              u32 endpoints x (str address, u16 port, str network,
//!                                               str locality, u32 weight, str identity))),
//! u32 networks x (str network, u32 gateways x (ip, u16 port))
//! str = u32 length + UTF-8; ip = u8 4 or 6 + 4 or 16 bytes; little-endian
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use vmesh_api::names::{Endpoint, Gateway, PortRoutes, Registry, Resolution, ServiceRoutes};

use super::{RouteError, RouteTable};

const MAGIC: &[u8; 4] = b"VMRT";
const FORMAT: u32 = 1;

pub fn encode(t: &RouteTable) -> Vec<u8> {
    let mut w = Vec::with_capacity(256);
    w.extend_from_slice(MAGIC);
    u32_(&mut w, FORMAT);
    str_(&mut w, &t.version);
    str_(&mut w, &t.network);
    str_(&mut w, &t.locality);
    len(&mut w, t.services.len());
    for (host, s) in &t.services {
        str_(&mut w, host);
        str_(&mut w, &s.namespace);
        w.push(match s.registry {
            Registry::Kubernetes => 0,
            Registry::External => 1,
        });
        w.push(match s.resolution {
            Resolution::Static => 0,
            Resolution::Dns => 1,
            Resolution::DnsRoundRobin => 2,
            Resolution::None => 3,
            Resolution::Unknown => 4,
        });
        len(&mut w, s.vips.len());
        for v in &s.vips {
            ip_(&mut w, v);
        }
        len(&mut w, s.ports.len());
        for p in &s.ports {
            w.extend_from_slice(&p.port.to_le_bytes());
            str_(&mut w, &p.name);
            str_(&mut w, &p.protocol);
            len(&mut w, p.endpoints.len());
            for e in &p.endpoints {
                str_(&mut w, &e.address);
                w.extend_from_slice(&e.port.to_le_bytes());
                str_(&mut w, &e.network);
                str_(&mut w, &e.locality);
                u32_(&mut w, e.weight);
                str_(&mut w, &e.identity);
            }
        }
    }
    len(&mut w, t.gateways.len());
    for (network, gws) in &t.gateways {
        str_(&mut w, network);
        len(&mut w, gws.len());
        for g in gws {
            ip_(&mut w, &g.address);
            w.extend_from_slice(&g.port.to_le_bytes());
        }
    }
    w
}

pub fn decode(bytes: &[u8]) -> Result<RouteTable, RouteError> {
    let mut r = Cursor(bytes);
    if r.take(4)? != MAGIC.as_slice() {
        return Err(RouteError::BadImage("magic"));
    }
    if r.u32()? != FORMAT {
        return Err(RouteError::BadImage("format"));
    }
    let mut t = RouteTable {
        version: r.str()?,
        network: r.str()?,
        locality: r.str()?,
        ..RouteTable::default()
    };
    for _ in 0..r.count()? {
        let host = r.str()?;
        let namespace = r.str()?;
        let registry = match r.u8()? {
            0 => Registry::Kubernetes,
            1 => Registry::External,
            _ => return Err(RouteError::BadImage("registry")),
        };
        let resolution = match r.u8()? {
            0 => Resolution::Static,
            1 => Resolution::Dns,
            2 => Resolution::DnsRoundRobin,
            3 => Resolution::None,
            4 => Resolution::Unknown,
            _ => return Err(RouteError::BadImage("resolution")),
        };
        let mut vips = Vec::new();
        for _ in 0..r.count()? {
            vips.push(r.ip()?);
        }
        let mut ports = Vec::new();
        for _ in 0..r.count()? {
            let port = r.u16()?;
            let name = r.str()?;
            let protocol = r.str()?;
            let mut endpoints = Vec::new();
            for _ in 0..r.count()? {
                endpoints.push(Endpoint {
                    address: r.str()?,
                    port: r.u16()?,
                    network: r.str()?,
                    locality: r.str()?,
                    weight: r.u32()?,
                    identity: r.str()?,
                });
            }
            ports.push(PortRoutes {
                port,
                name,
                protocol,
                endpoints,
            });
        }
        let svc = ServiceRoutes {
            namespace,
            registry,
            resolution,
            vips,
            ports,
        };
        t.services.push((host, svc));
    }
    let mut gateways = Vec::new();
    for _ in 0..r.count()? {
        let network = r.str()?;
        let mut list = Vec::new();
        for _ in 0..r.count()? {
            list.push(Gateway {
                address: r.ip()?,
                port: r.u16()?,
            });
        }
        gateways.push((network, list));
    }
    t.gateways = gateways;
    if !r.0.is_empty() {
        return Err(RouteError::BadImage("trailing bytes"));
    }
    Ok(t)
}

fn u32_(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn len(w: &mut Vec<u8>, n: usize) {
    // Tables are far below 4 G entries; compile refuses what would not fit an id anyway.
    u32_(w, u32::try_from(n).unwrap_or(u32::MAX));
}

fn str_(w: &mut Vec<u8>, s: &str) {
    len(w, s.len());
    w.extend_from_slice(s.as_bytes());
}

fn ip_(w: &mut Vec<u8>, ip: &IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            w.push(4);
            w.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            w.push(6);
            w.extend_from_slice(&v6.octets());
        }
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RouteError> {
        if n > self.0.len() {
            return Err(RouteError::BadImage("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RouteError> {
        <[u8; N]>::try_from(self.take(N)?).map_err(|_| RouteError::BadImage("truncated"))
    }

    fn u8(&mut self) -> Result<u8, RouteError> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, RouteError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, RouteError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// An element count: each element takes at least one byte, so a count beyond the bytes
    /// left is corrupt (and cannot make a loop run long).
    fn count(&mut self) -> Result<usize, RouteError> {
        let n = self.u32()? as usize;
        if n > self.0.len() {
            return Err(RouteError::BadImage("count beyond the image"));
        }
        Ok(n)
    }

    fn str(&mut self) -> Result<String, RouteError> {
        let n = self.u32()? as usize;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| RouteError::BadImage("UTF-8"))
    }

    fn ip(&mut self) -> Result<IpAddr, RouteError> {
        match self.u8()? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.array::<4>()?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(self.array::<16>()?))),
            _ => Err(RouteError::BadImage("address family")),
        }
    }
}
