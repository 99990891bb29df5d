//! Reading the routing part of a name table with the serde-free reader (the filter links no
//! serde_json). Everything else in the document (`names`, search domains, fields a newer
//! control plane adds) is skipped.

use std::net::IpAddr;

use vmesh_api::names::{Endpoint, Gateway, PortRoutes, Registry, Resolution, ServiceRoutes};

use crate::json::{JsonError, JsonErrorKind, Reader};

use super::{Gateways, RouteError, Services};

/// The routing part of a name table, as the control plane sent it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    pub version: String,
    pub network: String,
    pub locality: String,
    pub services: Services,
    pub gateways: Gateways,
}

impl RouteTable {
    pub fn from_json(json: &[u8]) -> Result<Self, RouteError> {
        let mut r = Reader::new(json);
        let mut t = RouteTable::default();
        let mut seen = Seen::default();
        r.begin_object()?;
        let mut first = true;
        while let Some(key) = r.next_key(&mut first)? {
            match key.as_ref() {
                "version" => {
                    seen.once(&r, "version")?;
                    t.version = r.string()?.into_owned();
                }
                "network" => {
                    seen.once(&r, "network")?;
                    t.network = r.string()?.into_owned();
                }
                "locality" => {
                    seen.once(&r, "locality")?;
                    t.locality = r.string()?.into_owned();
                }
                "services" => {
                    seen.once(&r, "services")?;
                    t.services = services(&mut r)?;
                }
                "gateways" => {
                    seen.once(&r, "gateways")?;
                    t.gateways = gateways(&mut r)?;
                }
                _ => r.skip_value()?,
            }
        }
        r.end()?;
        Ok(t)
    }
}

#[derive(Default)]
struct Seen(Vec<&'static str>);

impl Seen {
    fn once(&mut self, r: &Reader<'_>, field: &'static str) -> Result<(), JsonError> {
        if self.0.contains(&field) {
            return Err(r.error(JsonErrorKind::DuplicateField(field.to_string())));
        }
        self.0.push(field);
        Ok(())
    }
}

fn invalid(r: &Reader<'_>, what: String) -> JsonError {
    r.error(JsonErrorKind::Invalid(what))
}

fn ip(r: &mut Reader<'_>, field: &str) -> Result<IpAddr, JsonError> {
    let at = r.position();
    let s = r.string()?;
    s.parse().map_err(|_| JsonError {
        at,
        kind: JsonErrorKind::Invalid(format!("{field}: {s:?} is not an IP address")),
    })
}

fn int<T: TryFrom<u64>>(r: &mut Reader<'_>, field: &str) -> Result<T, JsonError> {
    let at = r.position();
    let v = r.u64()?;
    T::try_from(v).map_err(|_| JsonError {
        at,
        kind: JsonErrorKind::Invalid(format!("{field}: {v} out of range")),
    })
}

fn services(r: &mut Reader<'_>) -> Result<Services, JsonError> {
    let mut out = Vec::new();
    r.begin_object()?;
    let mut first = true;
    while let Some(host) = r.next_key(&mut first)? {
        let svc = service(r)?;
        out.push((host.into_owned(), svc));
    }
    Ok(out)
}

fn service(r: &mut Reader<'_>) -> Result<ServiceRoutes, JsonError> {
    let mut seen = Seen::default();
    let (mut namespace, mut registry, mut resolution) = (None, None, Resolution::Static);
    let (mut vips, mut ports) = (Vec::new(), None);
    r.begin_object()?;
    let mut first = true;
    while let Some(key) = r.next_key(&mut first)? {
        match key.as_ref() {
            "namespace" => {
                seen.once(r, "namespace")?;
                namespace = Some(r.string()?.into_owned());
            }
            "registry" => {
                seen.once(r, "registry")?;
                registry = Some(match r.string()?.as_ref() {
                    "Kubernetes" => Registry::Kubernetes,
                    "External" => Registry::External,
                    other => return Err(invalid(r, format!("registry {other:?}"))),
                });
            }
            "resolution" => {
                seen.once(r, "resolution")?;
                resolution = match r.string()?.as_ref() {
                    "STATIC" => Resolution::Static,
                    "DNS" => Resolution::Dns,
                    "DNS_ROUND_ROBIN" => Resolution::DnsRoundRobin,
                    "NONE" => Resolution::None,
                    _ => Resolution::Unknown,
                };
            }
            "vips" => {
                seen.once(r, "vips")?;
                r.begin_array()?;
                let mut first = true;
                while r.next_element(&mut first)? {
                    vips.push(ip(r, "vips")?);
                }
            }
            "ports" => {
                seen.once(r, "ports")?;
                let mut list = Vec::new();
                r.begin_array()?;
                let mut first = true;
                while r.next_element(&mut first)? {
                    list.push(port(r)?);
                }
                ports = Some(list);
            }
            _ => r.skip_value()?,
        }
    }
    let missing = |f| r.error(JsonErrorKind::MissingField(f));
    Ok(ServiceRoutes {
        namespace: namespace.ok_or_else(|| missing("namespace"))?,
        registry: registry.ok_or_else(|| missing("registry"))?,
        resolution,
        vips,
        ports: ports.ok_or_else(|| missing("ports"))?,
    })
}

fn port(r: &mut Reader<'_>) -> Result<PortRoutes, JsonError> {
    let mut seen = Seen::default();
    let mut p = PortRoutes {
        port: 0,
        name: String::new(),
        protocol: String::new(),
        endpoints: Vec::new(),
    };
    let (mut has_port, mut has_endpoints) = (false, false);
    r.begin_object()?;
    let mut first = true;
    while let Some(key) = r.next_key(&mut first)? {
        match key.as_ref() {
            "port" => {
                seen.once(r, "port")?;
                p.port = int(r, "port")?;
                has_port = true;
            }
            "name" => {
                seen.once(r, "name")?;
                p.name = r.string()?.into_owned();
            }
            "protocol" => {
                seen.once(r, "protocol")?;
                p.protocol = r.string()?.into_owned();
            }
            "endpoints" => {
                seen.once(r, "endpoints")?;
                r.begin_array()?;
                let mut first = true;
                while r.next_element(&mut first)? {
                    p.endpoints.push(endpoint(r)?);
                }
                has_endpoints = true;
            }
            _ => r.skip_value()?,
        }
    }
    if !has_port {
        return Err(r.error(JsonErrorKind::MissingField("port")));
    }
    if !has_endpoints {
        return Err(r.error(JsonErrorKind::MissingField("endpoints")));
    }
    Ok(p)
}

fn endpoint(r: &mut Reader<'_>) -> Result<Endpoint, JsonError> {
    let mut seen = Seen::default();
    let (mut address, mut port, mut weight) = (None, None, None);
    let mut e = Endpoint {
        address: String::new(),
        port: 0,
        network: String::new(),
        locality: String::new(),
        weight: 0,
        identity: String::new(),
    };
    r.begin_object()?;
    let mut first = true;
    while let Some(key) = r.next_key(&mut first)? {
        match key.as_ref() {
            "address" => {
                seen.once(r, "address")?;
                address = Some(r.string()?.into_owned());
            }
            "port" => {
                seen.once(r, "port")?;
                port = Some(int(r, "port")?);
            }
            "weight" => {
                seen.once(r, "weight")?;
                weight = Some(int(r, "weight")?);
            }
            "network" => {
                seen.once(r, "network")?;
                e.network = r.string()?.into_owned();
            }
            "locality" => {
                seen.once(r, "locality")?;
                e.locality = r.string()?.into_owned();
            }
            "identity" => {
                seen.once(r, "identity")?;
                e.identity = r.string()?.into_owned();
            }
            _ => r.skip_value()?,
        }
    }
    let missing = |f| r.error(JsonErrorKind::MissingField(f));
    e.address = address.ok_or_else(|| missing("address"))?;
    e.port = port.ok_or_else(|| missing("port"))?;
    e.weight = weight.ok_or_else(|| missing("weight"))?;
    Ok(e)
}

fn gateways(r: &mut Reader<'_>) -> Result<Gateways, JsonError> {
    let mut out = Vec::new();
    r.begin_object()?;
    let mut first = true;
    while let Some(network) = r.next_key(&mut first)? {
        let mut list = Vec::new();
        r.begin_array()?;
        let mut first_gw = true;
        while r.next_element(&mut first_gw)? {
            let mut seen = Seen::default();
            let (mut address, mut port) = (None, None);
            r.begin_object()?;
            let mut first_field = true;
            while let Some(key) = r.next_key(&mut first_field)? {
                match key.as_ref() {
                    "address" => {
                        seen.once(r, "address")?;
                        address = Some(ip(r, "gateways.address")?);
                    }
                    "port" => {
                        seen.once(r, "port")?;
                        port = Some(int(r, "gateways.port")?);
                    }
                    _ => r.skip_value()?,
                }
            }
            let missing = |f| r.error(JsonErrorKind::MissingField(f));
            list.push(Gateway {
                address: address.ok_or_else(|| missing("address"))?,
                port: port.ok_or_else(|| missing("port"))?,
            });
        }
        out.push((network.into_owned(), list));
    }
    Ok(out)
}
