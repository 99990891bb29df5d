//! The compiled name table: one flat byte image with an open-addressing hash index.
//!
//! Why a byte image and not a `HashMap`: Envoy runs one Wasm VM per worker thread, and each
//! must hold the table. The agent compiles the JSON once and publishes the image through shared
//! data; a worker copies it in and looks names up in place, so a worker's memory is the image
//! itself (about 60 bytes per name) and taking a new table is one copy plus a validation pass.
//!
//! Layout (little-endian):
//! ```text
//! 0   "VMNI"           magic
//! 4   u32 format       FORMAT
//! 8   u32 name_count
//! 12  u32 slot_count   power of two, at least 2 x name_count
//! 16  u32 slots_off
//! 20  u32 meta_off
//! 24  u32 total_len
//! 28  records          u8 len, name (lower-case, dotted), u8 flags,
//!                      u16 n4, n4 x 4 bytes, u16 n6, n6 x 16 bytes
//! slots_off            slot_count x (u32 hash, u32 record offset + 1; 0 = empty)
//! meta_off             version, namespace, domain: u16 len + bytes each;
//!                      u16 count + that many search domains
//! ```
//! Lookups hash the candidate name in pieces (no allocation), so their cost depends on the
//! query's label count, never on the table's size.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::json::{JsonError, JsonErrorKind, Reader};

use super::table::{NameInfo, NameTable, Registry};
use super::TableError;

const MAGIC: &[u8; 4] = b"VMNI";
const FORMAT: u32 = 1;
const HEADER_LEN: usize = 28;
const SLOT_LEN: usize = 8;
const FLAG_KUBERNETES_ALIASES: u8 = 1;
/// Longest host name in text form (RFC 1035 §2.3.4, 255 octets in wire form).
const MAX_NAME_TEXT: usize = 253;

/// A validated, compiled name table. Cheap to look up in; cloning copies the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameIndex {
    image: Vec<u8>,
    slot_mask: u32,
    slots_off: usize,
    meta: Meta,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Meta {
    version: String,
    namespace: String,
    domain: String,
    search_domains: Vec<String>,
}

/// One name's record inside the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub name: &'a str,
    flags: u8,
    v4: &'a [u8],
    v6: &'a [u8],
}

impl<'a> Record<'a> {
    pub fn ipv4(&self) -> impl ExactSizeIterator<Item = Ipv4Addr> + Clone + 'a {
        self.v4.chunks_exact(4).map(|c| {
            let mut o = [0u8; 4];
            o.copy_from_slice(c);
            Ipv4Addr::from(o)
        })
    }

    pub fn ipv6(&self) -> impl ExactSizeIterator<Item = Ipv6Addr> + Clone + 'a {
        self.v6.chunks_exact(16).map(|c| {
            let mut o = [0u8; 16];
            o.copy_from_slice(c);
            Ipv6Addr::from(o)
        })
    }

    fn has_kubernetes_aliases(&self) -> bool {
        self.flags & FLAG_KUBERNETES_ALIASES != 0
    }
}

/// How a query name matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match<'a> {
    /// The query name itself is owned: answer with its addresses.
    Direct(Record<'a>),
    /// The query is an owned name plus a search domain: answer CNAME `target`, then its
    /// addresses (owned by `target`).
    ViaSearchDomain { target: &'a str, record: Record<'a> },
}

impl<'a> Match<'a> {
    pub fn record(&self) -> Record<'a> {
        match self {
            Match::Direct(r) | Match::ViaSearchDomain { record: r, .. } => *r,
        }
    }
}

impl NameIndex {
    /// Compiles a JSON name table. Streams the names straight into the image, so the peak
    /// memory is the JSON text plus the image, not a parsed tree of it.
    pub fn from_json(json: &[u8]) -> Result<Self, TableError> {
        // Pass 1: everything but the names, which may come before or after the domain they
        // need; remember where the names start.
        let mut r = Reader::new(json);
        let (mut version, mut namespace, mut domain, mut search_domains) = (None, None, None, None);
        let mut names_at = None;
        let mut size = Size::default();
        r.begin_object()?;
        let mut first = true;
        while let Some(key) = r.next_key(&mut first)? {
            match key.as_ref() {
                "version" => {
                    let v = r.string()?.into_owned();
                    once(&r, &mut version, "version", v)?;
                }
                "namespace" => {
                    let v = r.string()?.into_owned();
                    once(&r, &mut namespace, "namespace", v)?;
                }
                "domain" => {
                    let v = r.string()?.into_owned();
                    once(&r, &mut domain, "domain", v)?;
                }
                "searchDomains" => {
                    let v = string_array(&mut r)?;
                    once(&r, &mut search_domains, "searchDomains", v)?;
                }
                "names" => {
                    once(&r, &mut names_at, "names", r.position())?;
                    size = measure_names(&mut r)?;
                }
                _ => r.skip_value()?,
            }
        }
        r.end()?;
        let missing = |field| {
            TableError::Json(JsonError {
                at: 0,
                kind: JsonErrorKind::MissingField(field),
            })
        };
        let names_at = names_at.ok_or(missing("names"))?;
        let domain = domain.unwrap_or_else(|| super::DEFAULT_DOMAIN.to_string());
        let meta = Meta {
            version: version.ok_or(missing("version"))?,
            namespace: namespace.ok_or(missing("namespace"))?,
            domain,
            search_domains: search_domains.unwrap_or_default(),
        };
        let mut builder = Builder::new(&meta, size);
        // Pass 2: the names, from where they start.
        let mut r = Reader::new(json);
        r.seek(names_at);
        r.begin_object()?;
        let mut first = true;
        while let Some(name) = r.next_key(&mut first)? {
            let info = name_info(&mut r)?;
            builder.add(&name, &info)?;
        }
        builder.finish(meta)
    }

    pub fn from_table(table: &NameTable) -> Result<Self, TableError> {
        let meta = Meta {
            version: table.version.clone(),
            namespace: table.namespace.clone(),
            domain: table.domain.clone(),
            search_domains: table.search_domains.clone(),
        };
        let mut size = Size::default();
        for (name, info) in &table.names {
            let v6 = info.ips.iter().filter(|ip| ip.is_ipv6()).count();
            size.add(name.len(), info.ips.len() - v6, v6);
        }
        let mut builder = Builder::new(&meta, size);
        for (name, info) in &table.names {
            builder.add(name, info)?;
        }
        builder.finish(meta)
    }

    /// Validates an image produced by [`NameIndex::image`] (possibly by another VM) and takes
    /// it. Every offset is checked here, so lookups can trust the structure.
    pub fn from_image(image: Vec<u8>) -> Result<Self, TableError> {
        let bad = |what: &'static str| TableError::BadImage(what);
        if image.get(..4) != Some(MAGIC.as_slice()) {
            return Err(bad("magic"));
        }
        if read_u32(&image, 4) != Some(FORMAT) {
            return Err(bad("format"));
        }
        let field = |at| {
            read_u32(&image, at)
                .map(|v| v as usize)
                .ok_or(bad("header"))
        };
        let (name_count, slot_count, slots_off, meta_off, total) =
            (field(8)?, field(12)?, field(16)?, field(20)?, field(24)?);
        if total != image.len() || !slot_count.is_power_of_two() || slot_count < name_count {
            return Err(bad("sizes"));
        }
        if slots_off < HEADER_LEN
            || slot_count
                .checked_mul(SLOT_LEN)
                .and_then(|n| n.checked_add(slots_off))
                != Some(meta_off)
        {
            return Err(bad("slot table bounds"));
        }
        let mut used = 0usize;
        for slot in 0..slot_count {
            let at = slots_off + slot * SLOT_LEN;
            let target = read_u32(&image, at + 4).ok_or(bad("slot"))? as usize;
            if target == 0 {
                continue;
            }
            let rec_at = target - 1;
            if rec_at < HEADER_LEN {
                return Err(bad("record offset"));
            }
            let (rec, end) = parse_record(&image, rec_at).ok_or(bad("record"))?;
            if end > slots_off || read_u32(&image, at) != Some(hash_parts(&[rec.name.as_bytes()])) {
                return Err(bad("record placement"));
            }
            used += 1;
        }
        if used != name_count {
            return Err(bad("name count"));
        }
        let meta = parse_meta(image.get(meta_off..).ok_or(bad("meta"))?).ok_or(bad("meta"))?;
        Ok(NameIndex {
            slot_mask: (slot_count - 1) as u32,
            slots_off,
            meta,
            image,
        })
    }

    /// The compiled image, to publish to other VMs.
    pub fn image(&self) -> &[u8] {
        &self.image
    }

    pub fn version(&self) -> &str {
        &self.meta.version
    }

    pub fn namespace(&self) -> &str {
        &self.meta.namespace
    }

    pub fn domain(&self) -> &str {
        &self.meta.domain
    }

    pub fn search_domains(&self) -> &[String] {
        &self.meta.search_domains
    }

    pub fn len(&self) -> usize {
        read_u32(&self.image, 8).unwrap_or(0) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves a lower-case dotted query name (no trailing dot) by the rules in
    /// `docs/name-table.md`: the name itself, then a search domain stripped from it.
    pub fn lookup<'a>(&'a self, qname: &'a str) -> Option<Match<'a>> {
        if let Some(record) = self.direct(qname) {
            return Some(Match::Direct(record));
        }
        for suffix in &self.meta.search_domains {
            let Some(base) = strip_domain(qname, suffix) else {
                continue;
            };
            if let Some(record) = self.direct(base) {
                // A wildcard has no name of its own: the CNAME points at the concrete name.
                let target = if record.name.starts_with("*.") {
                    base
                } else {
                    record.name
                };
                return Some(Match::ViaSearchDomain { target, record });
            }
        }
        None
    }

    /// Exact host, then the Kubernetes short forms, then the most specific wildcard.
    fn direct<'a>(&'a self, q: &str) -> Option<Record<'a>> {
        if q.is_empty() {
            return None;
        }
        let qb = q.as_bytes();
        if let Some(r) = self.find(&[qb]) {
            return Some(r);
        }
        if let Some(r) = self.kubernetes_alias(q) {
            return Some(r);
        }
        // Leftmost strip first = longest suffix = most specific wildcard.
        for (i, _) in q.match_indices('.') {
            let suffix = qb.get(i..).unwrap_or_default();
            if let Some(r) = self.find(&[b"*", suffix]) {
                return Some(r);
            }
        }
        None
    }

    fn kubernetes_alias<'a>(&'a self, q: &str) -> Option<Record<'a>> {
        let domain = self.meta.domain.as_bytes();
        let qb = q.as_bytes();
        let found = match q.split('.').count() {
            1 => self.find(&[qb, b".", self.meta.namespace.as_bytes(), b".svc.", domain]),
            2 => self.find(&[qb, b".svc.", domain]),
            3 if q.ends_with(".svc") => self.find(&[qb, b".", domain]),
            _ => None,
        }?;
        found.has_kubernetes_aliases().then_some(found)
    }

    fn find<'a>(&'a self, parts: &[&[u8]]) -> Option<Record<'a>> {
        let hash = hash_parts(parts);
        let mut slot = hash & self.slot_mask;
        // At most every slot once; the table is at most half full so this ends far sooner.
        for _ in 0..=self.slot_mask {
            let at = self.slots_off + slot as usize * SLOT_LEN;
            let target = read_u32(&self.image, at + 4)? as usize;
            if target == 0 {
                return None;
            }
            if read_u32(&self.image, at) == Some(hash) {
                let (rec, _) = parse_record(&self.image, target - 1)?;
                if equals_parts(rec.name.as_bytes(), parts) {
                    return Some(rec);
                }
            }
            slot = (slot + 1) & self.slot_mask;
        }
        None
    }
}

/// `q` without `.suffix`, if it ends with it and something is left.
fn strip_domain<'a>(q: &'a str, suffix: &str) -> Option<&'a str> {
    let base = q.strip_suffix(suffix)?.strip_suffix('.')?;
    (!base.is_empty()).then_some(base)
}

/// FNV-1a over the concatenated parts, finished with a murmur3 mix so the low bits used for
/// the slot are well spread.
fn hash_parts(parts: &[&[u8]]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for part in parts {
        for &b in part.iter() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

fn equals_parts(mut name: &[u8], parts: &[&[u8]]) -> bool {
    for part in parts {
        match name.strip_prefix(*part) {
            Some(rest) => name = rest,
            None => return false,
        }
    }
    name.is_empty()
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    let b = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([*b.first()?, *b.get(1)?]))
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    let mut o = [0u8; 4];
    o.copy_from_slice(b);
    Some(u32::from_le_bytes(o))
}

/// Parses the record at `at`; returns it and the offset just past it.
fn parse_record(image: &[u8], at: usize) -> Option<(Record<'_>, usize)> {
    let name_len = usize::from(*image.get(at)?);
    let name_at = at + 1;
    let name = std::str::from_utf8(image.get(name_at..name_at + name_len)?).ok()?;
    let mut pos = name_at + name_len;
    let flags = *image.get(pos)?;
    pos += 1;
    let n4 = usize::from(read_u16(image, pos)?);
    pos += 2;
    let v4 = image.get(pos..pos + n4 * 4)?;
    pos += n4 * 4;
    let n6 = usize::from(read_u16(image, pos)?);
    pos += 2;
    let v6 = image.get(pos..pos + n6 * 16)?;
    pos += n6 * 16;
    Some((
        Record {
            name,
            flags,
            v4,
            v6,
        },
        pos,
    ))
}

fn parse_meta(buf: &[u8]) -> Option<Meta> {
    let mut pos = 0usize;
    let string = |pos: &mut usize| -> Option<String> {
        let len = usize::from(read_u16(buf, *pos)?);
        let s = std::str::from_utf8(buf.get(*pos + 2..*pos + 2 + len)?)
            .ok()?
            .to_string();
        *pos += 2 + len;
        Some(s)
    };
    let version = string(&mut pos)?;
    let namespace = string(&mut pos)?;
    let domain = string(&mut pos)?;
    let count = read_u16(buf, pos)?;
    pos += 2;
    let mut search_domains = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        search_domains.push(string(&mut pos)?);
    }
    Some(Meta {
        version,
        namespace,
        domain,
        search_domains,
    })
}

/// Checks a host name as the table accepts it and returns its canonical (lower-case, no
/// trailing dot) form. `*` is allowed only as a whole leftmost label.
pub fn canonical_host(name: &str, allow_wildcard: bool) -> Result<String, &'static str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > MAX_NAME_TEXT {
        return Err("longer than 253 characters");
    }
    for (i, label) in name.split('.').enumerate() {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.len() > 63 {
            return Err("label longer than 63 characters");
        }
        if label == "*" {
            if i != 0 || !allow_wildcard {
                return Err("'*' is allowed only as the whole leftmost label");
            }
            continue;
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("label with a character other than letters, digits, '-' and '_'");
        }
    }
    if name == "*" {
        return Err("a bare '*' would match every name");
    }
    Ok(name.to_ascii_lowercase())
}

struct Builder {
    image: Vec<u8>,
    /// (hash, record offset) per name, placed into slots at the end.
    entries: Vec<(u32, u32)>,
    kubernetes_suffix: String,
}

impl Builder {
    /// Allocates the image once at (at least) its final size: Wasm memory never shrinks, so
    /// the peak of a growing Vec (old and new buffer during a reallocation) would stay the
    /// VM's size for good.
    fn new(meta: &Meta, size: Size) -> Self {
        let meta_len = 2
            + meta.version.len()
            + 2
            + meta.namespace.len()
            + 2
            + meta.domain.len()
            + 2
            + meta
                .search_domains
                .iter()
                .map(|d| 2 + d.len())
                .sum::<usize>();
        let capacity = HEADER_LEN + size.records + slot_count(size.names) * SLOT_LEN + meta_len;
        let mut image = Vec::with_capacity(capacity);
        image.extend_from_slice(&[0u8; HEADER_LEN]);
        Builder {
            image,
            entries: Vec::with_capacity(size.names),
            kubernetes_suffix: format!(".svc.{}", meta.domain.to_ascii_lowercase()),
        }
    }

    fn add(&mut self, raw_name: &str, info: &NameInfo) -> Result<(), TableError> {
        let invalid = |reason| TableError::InvalidName {
            name: raw_name.to_string(),
            reason,
        };
        let name = canonical_host(raw_name, true).map_err(invalid)?;
        let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = info.ips.iter().partition(|ip| ip.is_ipv4());
        let (Ok(n4), Ok(n6)) = (u16::try_from(v4.len()), u16::try_from(v6.len())) else {
            return Err(invalid("more than 65535 addresses"));
        };
        let aliases = info.registry == Registry::Kubernetes
            && !info.shortname.is_empty()
            && name
                == format!(
                    "{}.{}{}",
                    info.shortname, info.namespace, self.kubernetes_suffix
                );
        let offset = u32::try_from(self.image.len()).map_err(|_| TableError::TooLarge)?;
        // canonical_host bounds the name to 253 bytes.
        self.image.push(name.len() as u8);
        self.image.extend_from_slice(name.as_bytes());
        self.image
            .push(if aliases { FLAG_KUBERNETES_ALIASES } else { 0 });
        self.image.extend_from_slice(&n4.to_le_bytes());
        for ip in &v4 {
            if let IpAddr::V4(a) = ip {
                self.image.extend_from_slice(&a.octets());
            }
        }
        self.image.extend_from_slice(&n6.to_le_bytes());
        for ip in &v6 {
            if let IpAddr::V6(a) = ip {
                self.image.extend_from_slice(&a.octets());
            }
        }
        self.entries.push((hash_parts(&[name.as_bytes()]), offset));
        Ok(())
    }

    fn finish(mut self, mut meta: Meta) -> Result<NameIndex, TableError> {
        meta.domain =
            canonical_host(&meta.domain, false).map_err(|reason| TableError::InvalidName {
                name: meta.domain.clone(),
                reason,
            })?;
        for d in meta.search_domains.iter_mut() {
            *d = canonical_host(d, false).map_err(|reason| TableError::InvalidName {
                name: d.clone(),
                reason,
            })?;
        }
        if meta.version.len() > 1024 || meta.namespace.len() > 253 || meta.search_domains.len() > 64
        {
            return Err(TableError::TooLarge);
        }
        let slot_count = slot_count(self.entries.len());
        let slots_off = self.image.len();
        self.image.resize(slots_off + slot_count * SLOT_LEN, 0);
        let mask = slot_count - 1;
        for &(hash, offset) in &self.entries {
            let mut slot = hash as usize & mask;
            loop {
                let at = slots_off + slot * SLOT_LEN;
                match read_u32(&self.image, at + 4) {
                    Some(0) => {
                        write_u32(&mut self.image, at, hash);
                        write_u32(&mut self.image, at + 4, offset + 1);
                        break;
                    }
                    Some(existing) => {
                        if read_u32(&self.image, at) == Some(hash) {
                            let a =
                                parse_record(&self.image, existing as usize - 1).map(|r| r.0.name);
                            let b = parse_record(&self.image, offset as usize).map(|r| r.0.name);
                            if a.is_some() && a == b {
                                return Err(TableError::Duplicate(
                                    b.unwrap_or_default().to_string(),
                                ));
                            }
                        }
                        slot = (slot + 1) & mask;
                    }
                    None => return Err(TableError::TooLarge),
                }
            }
        }
        let meta_off = self.image.len();
        for s in [&meta.version, &meta.namespace, &meta.domain] {
            push_string(&mut self.image, s);
        }
        self.image
            .extend_from_slice(&(meta.search_domains.len() as u16).to_le_bytes());
        for s in &meta.search_domains {
            push_string(&mut self.image, s);
        }
        let total = self.image.len();
        let header = [
            FORMAT,
            self.entries.len() as u32,
            slot_count as u32,
            slots_off as u32,
            meta_off as u32,
            u32::try_from(total).map_err(|_| TableError::TooLarge)?,
        ];
        if let Some(h) = self.image.get_mut(..4) {
            h.copy_from_slice(MAGIC);
        }
        for (i, v) in header.iter().enumerate() {
            write_u32(&mut self.image, 4 + i * 4, *v);
        }
        // Names with a trailing dot were counted one byte long; give that back.
        self.image.shrink_to_fit();
        Ok(NameIndex {
            slot_mask: mask as u32,
            slots_off,
            meta,
            image: self.image,
        })
    }
}

/// Sets a field read from JSON, refusing a second occurrence.
fn once<T>(r: &Reader<'_>, slot: &mut Option<T>, field: &str, value: T) -> Result<(), TableError> {
    if slot.is_some() {
        return Err(TableError::Json(
            r.error(JsonErrorKind::DuplicateField(field.to_string())),
        ));
    }
    *slot = Some(value);
    Ok(())
}

fn string_array(r: &mut Reader<'_>) -> Result<Vec<String>, JsonError> {
    let mut out = Vec::new();
    r.begin_array()?;
    let mut first = true;
    while r.next_element(&mut first)? {
        out.push(r.string()?.into_owned());
    }
    Ok(out)
}

/// One `names` entry: `{"ips": [...], "registry": ..., "shortname": ..., "namespace": ...}`;
/// fields a newer producer adds are skipped.
fn name_info(r: &mut Reader<'_>) -> Result<NameInfo, TableError> {
    let (mut ips, mut registry, mut shortname, mut namespace) = (None, None, None, None);
    r.begin_object()?;
    let mut first = true;
    while let Some(key) = r.next_key(&mut first)? {
        match key.as_ref() {
            "ips" => {
                let at = r.position();
                let list = string_array(r)?
                    .iter()
                    .map(|s| s.parse::<IpAddr>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| {
                        TableError::Json(JsonError {
                            at,
                            kind: JsonErrorKind::Invalid("ips: not an IP address".into()),
                        })
                    })?;
                once(r, &mut ips, "ips", list)?;
            }
            "registry" => {
                let at = r.position();
                let value = match r.string()?.as_ref() {
                    "Kubernetes" => Registry::Kubernetes,
                    "External" => Registry::External,
                    other => {
                        return Err(TableError::Json(JsonError {
                            at,
                            kind: JsonErrorKind::Invalid(format!(
                                "registry {other:?} is neither \"Kubernetes\" nor \"External\""
                            )),
                        }))
                    }
                };
                once(r, &mut registry, "registry", value)?;
            }
            "shortname" => {
                let v = r.string()?.into_owned();
                once(r, &mut shortname, "shortname", v)?;
            }
            "namespace" => {
                let v = r.string()?.into_owned();
                once(r, &mut namespace, "namespace", v)?;
            }
            _ => r.skip_value()?,
        }
    }
    let missing = |field| TableError::Json(r.error(JsonErrorKind::MissingField(field)));
    Ok(NameInfo {
        ips: ips.ok_or_else(|| missing("ips"))?,
        registry: registry.ok_or_else(|| missing("registry"))?,
        shortname: shortname.unwrap_or_default(),
        namespace: namespace.unwrap_or_default(),
    })
}

/// Slots for `names` entries: at most half full, so probes stay short.
fn slot_count(names: usize) -> usize {
    (names * 2).max(2).next_power_of_two()
}

/// How many names a table has and how many bytes their records take.
#[derive(Debug, Clone, Copy, Default)]
struct Size {
    names: usize,
    records: usize,
}

impl Size {
    fn add(&mut self, name_len: usize, v4: usize, v6: usize) {
        self.names += 1;
        self.records += 1 + name_len + 1 + 2 + 4 * v4 + 2 + 16 * v6;
    }
}

/// First pass over `names`: counts names and their records' bytes without allocating (names
/// and addresses are borrowed from the JSON), so the image can be allocated at its size.
fn measure_names(r: &mut Reader<'_>) -> Result<Size, JsonError> {
    let mut size = Size::default();
    r.begin_object()?;
    let mut first = true;
    while let Some(name) = r.next_key(&mut first)? {
        let (mut v4, mut v6) = (0, 0);
        r.begin_object()?;
        let mut first_field = true;
        while let Some(field) = r.next_key(&mut first_field)? {
            if field != "ips" {
                r.skip_value()?;
                continue;
            }
            r.begin_array()?;
            let mut first_ip = true;
            while r.next_element(&mut first_ip)? {
                if r.string()?.contains(':') {
                    v6 += 1;
                } else {
                    v4 += 1;
                }
            }
        }
        size.add(name.len(), v4, v6);
    }
    Ok(size)
}

fn write_u32(buf: &mut [u8], at: usize, v: u32) {
    if let Some(dst) = buf.get_mut(at..at + 4) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
}

fn push_string(buf: &mut Vec<u8>, s: &str) {
    // Lengths were bounded in finish(); names are <= 253 bytes.
    buf.extend_from_slice(&(s.len() as u16).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::table::NameInfo;
    use std::collections::BTreeMap;

    fn info(ips: &[&str], registry: Registry, short: &str, ns: &str) -> NameInfo {
        NameInfo {
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            registry,
            shortname: short.into(),
            namespace: ns.into(),
        }
    }

    fn sample() -> NameTable {
        let mut names = BTreeMap::new();
        names.insert(
            "a.ns.svc.cluster.local".into(),
            info(&["10.0.0.1"], Registry::Kubernetes, "a", "ns"),
        );
        names.insert(
            "Host.Example.com.".into(),
            info(&["10.0.0.2", "fd00::2"], Registry::External, "", ""),
        );
        names.insert(
            "*.w.example.com".into(),
            info(&[], Registry::External, "", ""),
        );
        NameTable {
            version: "7".into(),
            namespace: "ns".into(),
            domain: "cluster.local".into(),
            search_domains: vec!["Corp.Example".into()],
            names,
            services: BTreeMap::new(),
            network: String::new(),
            gateways: BTreeMap::new(),
            locality: String::new(),
        }
    }

    #[test]
    fn json_streaming_and_struct_builds_give_the_same_image() {
        let t = sample();
        let from_struct = NameIndex::from_table(&t).unwrap();
        let from_json = NameIndex::from_json(&t.to_json()).unwrap();
        assert_eq!(from_struct, from_json);
        assert_eq!(from_json.len(), 3);
        assert_eq!(from_json.version(), "7");
        assert_eq!(from_json.search_domains(), ["corp.example"]);
        assert!(from_json.lookup("host.example.com").is_some());
    }

    #[test]
    fn fields_a_newer_producer_adds_are_skipped() {
        let json = br#"{"extra":{"deep":[1,{"x":[true,null,-1.5e3,"s\"]"]}]},"version":"2","namespace":"ns",
            "names":{"a.example.com":{"ips":["10.0.0.1"],"registry":"External","weight":{"v":[1,2]}}},
            "services":[{"host":"a.example.com","ports":[{"port":80,"endpoints":[]}]}]}"#;
        let idx = NameIndex::from_json(json).unwrap();
        assert_eq!(idx.version(), "2");
        assert!(idx.lookup("a.example.com").is_some());
    }

    #[test]
    fn image_survives_publication_to_another_vm() {
        let idx = NameIndex::from_table(&sample()).unwrap();
        let copy = NameIndex::from_image(idx.image().to_vec()).unwrap();
        assert_eq!(copy, idx);
        let rec = copy.lookup("a").unwrap().record();
        assert_eq!(
            rec.ipv4().collect::<Vec<_>>(),
            vec![Ipv4Addr::new(10, 0, 0, 1)]
        );
    }

    #[test]
    fn corrupt_images_are_refused_or_harmless_never_a_panic() {
        let image = NameIndex::from_table(&sample()).unwrap().image().to_vec();
        for i in 0..image.len() {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut bad = image.clone();
                bad[i] ^= flip;
                if let Ok(idx) = NameIndex::from_image(bad) {
                    let _ = idx.lookup("a");
                    let _ = idx.lookup("x.w.example.com.corp.example");
                }
            }
        }
        for len in 0..image.len() {
            assert!(
                NameIndex::from_image(image[..len].to_vec()).is_err(),
                "cut at {len}"
            );
        }
    }

    #[test]
    fn invalid_tables_are_refused_with_the_reason() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"version":"1","namespace":"n","names":{"a..b":{"ips":[],"registry":"External"}}}"#,
                "empty label",
            ),
            (
                r#"{"version":"1","namespace":"n","names":{"a.*.b":{"ips":[],"registry":"External"}}}"#,
                "leftmost",
            ),
            (
                r#"{"version":"1","namespace":"n","names":{"*":{"ips":[],"registry":"External"}}}"#,
                "every name",
            ),
            (
                r#"{"version":"1","namespace":"n","names":{"a b":{"ips":[],"registry":"External"}}}"#,
                "character",
            ),
            (
                r#"{"version":"1","namespace":"n","names":{"a":{"ips":["300.1.1.1"],"registry":"External"}}}"#,
                "address",
            ),
            (
                r#"{"version":"1","namespace":"n","names":{"a":{"ips":[],"registry":"Consul"}}}"#,
                "neither",
            ),
            (
                r#"{"version":"1","namespace":"n","names":{"A":{"ips":[],"registry":"External"},"a":{"ips":[],"registry":"External"}}}"#,
                "twice",
            ),
            (r#"{"version":"1","names":{}}"#, "namespace"),
            (
                r#"{"version":"1","namespace":"n"}"#,
                "missing field \"names\"",
            ),
            (
                r#"{"version":"1","version":"2","namespace":"n","names":{}}"#,
                "duplicate field",
            ),
            (
                r#"{"version":"1","namespace":"n","names":{"a":{"registry":"External"}}}"#,
                "missing field \"ips\"",
            ),
            (
                r#"{"version":"1","namespace":"n","names":{"a":{"ips":["10.0.0.1"],"registry":"External","ips":[]}}}"#,
                "duplicate field",
            ),
            (
                r#"{"version":"1","namespace":"n","domain":"","names":{}}"#,
                "empty name",
            ),
            (
                r#"{"version":"1","namespace":"n","names":{}} trailing"#,
                "trailing",
            ),
            (r#"[1,2]"#, "expected an object"),
        ];
        for (json, want) in cases {
            let err = NameIndex::from_json(json.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
    }

    #[test]
    fn lookup_cost_does_not_grow_with_the_table() {
        // Probe lengths stay short at 100k names: the table is at most half full.
        let mut names = BTreeMap::new();
        for i in 0..100_000 {
            names.insert(
                format!("svc{i}.ns{}.svc.cluster.local", i % 100),
                info(
                    &["10.0.0.1"],
                    Registry::Kubernetes,
                    &format!("svc{i}"),
                    &format!("ns{}", i % 100),
                ),
            );
        }
        let t = NameTable {
            version: "1".into(),
            namespace: "ns1".into(),
            domain: "cluster.local".into(),
            search_domains: vec![],
            names,
            services: BTreeMap::new(),
            network: String::new(),
            gateways: BTreeMap::new(),
            locality: String::new(),
        };
        let idx = NameIndex::from_table(&t).unwrap();
        let slots = (idx.slot_mask + 1) as usize;
        assert!(slots >= 200_000);
        let mut longest = 0;
        let mut run = 0;
        for s in 0..slots {
            if read_u32(&idx.image, idx.slots_off + s * SLOT_LEN + 4) == Some(0) {
                run = 0;
            } else {
                run += 1;
                longest = longest.max(run);
            }
        }
        assert!(longest < 64, "longest probe run {longest}");
        assert!(idx.lookup("svc12345.ns45").is_some());
        assert!(idx.lookup("svc1").is_some(), "own namespace short name");
        assert!(idx.lookup("svc2").is_none(), "other namespace");
    }

    #[test]
    fn the_index_ignores_the_services_field() {
        let json = br#"{"version":"1","namespace":"ns","names":{"a.example.com":{"ips":["240.240.0.1"],"registry":"External"}},
            "services":{"a.example.com":{"namespace":"ns","registry":"External","vips":["240.240.0.1"],
              "ports":[{"port":80,"name":"http","protocol":"HTTP","endpoints":[{"address":"10.0.0.5","port":9090,"weight":1}]}]}}}"#;
        let t: NameTable = serde_json::from_slice(json).unwrap();
        assert_eq!(t.services["a.example.com"].ports[0].endpoints[0].port, 9090);
        let idx = NameIndex::from_json(json).unwrap();
        assert_eq!(idx.len(), 1);
        assert_eq!(
            serde_json::from_slice::<NameTable>(&t.to_json()).unwrap(),
            t
        );
    }
}
