//! The certificate directory Envoy reads through file-based SDS, and how it is replaced.
//!
//! ```text
//! CERT_DIR/
//!   sds-default.yaml   SDS resource `default`: cert-chain.pem + key.pem   (written at start)
//!   sds-rootca.yaml    SDS resource `ROOTCA`: root-cert.pem               (written at start)
//!   key.pem        -> ..data/key.pem          (symlinks, made once)
//!   cert-chain.pem -> ..data/cert-chain.pem
//!   root-cert.pem  -> ..data/root-cert.pem
//!   ..data         -> ..2026-11-30T12:00:00.123456789Z   (swapped by rename)
//!   ..2026-11-30T12:00:00.123456789Z/{key.pem,cert-chain.pem,root-cert.pem}
//! ```
//!
//! Envoy watches CERT_DIR (`watched_directory` of the SDS `path_config_source`) for entries
//! moved into it and then reads both SDS files again, and with them the three PEM files. So
//! a new certificate is written into a fresh directory first and made current by one
//! `rename(2)` of a `..data` symlink (the way Kubernetes updates a mounted secret): Envoy never
//! sees a key of one certificate beside the chain of another, and the rename is the event that
//! tells it. The layout is Kubernetes' `AtomicWriter`'s; the names are Istio's.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use vmesh_api::ca::{files, sds};

/// The symlink that names the current generation.
pub const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

#[derive(Debug, thiserror::Error)]
#[error("certificate directory {path}: {source}")]
pub struct DirError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn at(path: &Path) -> impl Fn(std::io::Error) -> DirError + '_ {
    move |source| DirError {
        path: path.to_path_buf(),
        source,
    }
}

/// The SDS resource file for the secret `default` (the VM's certificate and key).
pub fn sds_default(dir: &Path) -> String {
    format!(
        "# Written by vmesh-shim: the VM's certificate for Envoy's SDS secret `{name}`.\n\
         resources:\n\
         - \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n  \
           name: {name}\n  \
           tls_certificate:\n    \
             certificate_chain: {{filename: {chain}}}\n    \
             private_key: {{filename: {key}}}\n",
        name = sds::DEFAULT,
        chain = dir.join(files::CERT_CHAIN).display(),
        key = dir.join(files::KEY).display(),
    )
}

/// The SDS resource file for the secret `ROOTCA` (the mesh root peers must chain to).
pub fn sds_rootca(dir: &Path) -> String {
    format!(
        "# Written by vmesh-shim: the mesh root for Envoy's SDS secret `{name}`.\n\
         resources:\n\
         - \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n  \
           name: {name}\n  \
           validation_context:\n    \
             trusted_ca: {{filename: {root}}}\n",
        name = sds::ROOT_CA,
        root = dir.join(files::ROOT_CERT).display(),
    )
}

/// The certificate directory.
#[derive(Debug, Clone)]
pub struct CertDir {
    dir: PathBuf,
}

/// The three files of one certificate, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    pub key: String,
    pub chain: String,
    pub root: String,
}

impl CertDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CertDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory, the SDS files and the three symlinks (dangling until the first
    /// certificate). Run before Envoy starts: Envoy refuses a config whose SDS file or
    /// watched directory is missing, and does not pick up files that appear later but by a
    /// move into the directory.
    pub fn prepare(&self) -> Result<(), DirError> {
        std::fs::create_dir_all(&self.dir).map_err(at(&self.dir))?;
        // Only this user (the shim's, which Envoy runs as too) reads the key's directory.
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(at(&self.dir))?;
        for (name, text) in [
            (files::SDS_DEFAULT, sds_default(&self.dir)),
            (files::SDS_ROOTCA, sds_rootca(&self.dir)),
        ] {
            let path = self.dir.join(name);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                write_replacing(&path, text.as_bytes(), 0o644)?;
            }
        }
        for name in [files::KEY, files::CERT_CHAIN, files::ROOT_CERT] {
            let link = self.dir.join(name);
            let target = Path::new(DATA).join(name);
            if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(&target, &link).map_err(at(&link))?;
            }
        }
        Ok(())
    }

    /// The certificate in place, if all three files are readable.
    pub fn load(&self) -> Option<Material> {
        let read = |name| std::fs::read_to_string(self.dir.join(name)).ok();
        Some(Material {
            key: read(files::KEY)?,
            chain: read(files::CERT_CHAIN)?,
            root: read(files::ROOT_CERT)?,
        })
    }

    /// Makes `m` current in one rename, then removes the generation it replaced.
    pub fn install(&self, m: &Material) -> Result<(), DirError> {
        let generation = format!(
            "..{}",
            vmesh_api::time::format_rfc3339_nanos(now_nanos()).replace(':', "_")
        );
        let gen_dir = self.dir.join(&generation);
        std::fs::create_dir(&gen_dir).map_err(at(&gen_dir))?;
        std::fs::set_permissions(&gen_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(at(&gen_dir))?;
        write_new(&gen_dir.join(files::KEY), m.key.as_bytes(), 0o600)?;
        write_new(&gen_dir.join(files::CERT_CHAIN), m.chain.as_bytes(), 0o644)?;
        write_new(&gen_dir.join(files::ROOT_CERT), m.root.as_bytes(), 0o644)?;
        let data = self.dir.join(DATA);
        let previous = std::fs::read_link(&data).ok();
        let tmp = self.dir.join(DATA_TMP);
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&generation, &tmp).map_err(at(&tmp))?;
        std::fs::rename(&tmp, &data).map_err(at(&data))?;
        sync_dir(&self.dir);
        if let Some(old) = previous.filter(|p| *p != Path::new(&generation)) {
            // Envoy has read (or reads now, through `..data`) the new generation; the old
            // key must not stay on disk.
            let _ = std::fs::remove_dir_all(self.dir.join(old));
        }
        Ok(())
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Writes a file that must not exist yet, with `mode` from its creation (a key is never
/// readable by others, not even for a moment), and flushes it to disk.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DirError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(at(path))?;
    f.write_all(bytes).map_err(at(path))?;
    f.sync_all().map_err(at(path))
}

/// Replaces `path` by writing a temporary file beside it and renaming it over.
fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DirError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, bytes, mode)?;
    std::fs::rename(&tmp, path).map_err(at(path))
}

/// Makes a rename durable (best effort: some filesystems refuse to sync a directory).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn material(n: &str) -> Material {
        Material {
            key: format!("key {n}"),
            chain: format!("chain {n}"),
            root: format!("root {n}"),
        }
    }

    #[test]
    fn a_new_certificate_replaces_the_old_in_one_swap_and_the_old_key_is_gone() {
        let tmp = vmesh_test_support::TempDir::new();
        let d = CertDir::new(tmp.path().join("certs"));
        d.prepare().unwrap();
        assert_eq!(d.load(), None, "dangling links until the first certificate");
        let sds = std::fs::read_to_string(d.path().join(files::SDS_DEFAULT)).unwrap();
        assert!(
            sds.contains(&d.path().join(files::KEY).display().to_string()),
            "{sds}"
        );
        d.install(&material("1")).unwrap();
        assert_eq!(d.load(), Some(material("1")));
        let first = std::fs::read_link(d.path().join(DATA)).unwrap();
        d.install(&material("2")).unwrap();
        assert_eq!(d.load(), Some(material("2")));
        assert!(
            !d.path().join(&first).exists(),
            "the previous generation is removed"
        );
        let key = std::fs::metadata(d.path().join(files::KEY)).unwrap();
        assert_eq!(key.mode() & 0o777, 0o600);
        let dir = std::fs::metadata(d.path()).unwrap();
        assert_eq!(dir.mode() & 0o777, 0o700);
        // Preparing again (a restart) keeps the certificate in place.
        d.prepare().unwrap();
        assert_eq!(d.load(), Some(material("2")));
        let entries: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("..") && n != DATA)
            .collect();
        assert_eq!(entries.len(), 1, "{entries:?}");
    }
}
