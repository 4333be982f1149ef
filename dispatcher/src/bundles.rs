//! UDF bundles: a directory with a `bundle.json` manifest, packed as a
//! gzipped tar and named by the SHA-256 of that archive.
//!
//! * [`pack`] makes the archive deterministically (sorted entries, no
//!   times, owners or names of users; file modes `0644` or `0755`), so the
//!   same directory always has the same digest.
//! * [`inspect`] is what the dispatcher checks before it stores an archive:
//!   only regular files and directories, relative paths that stay inside,
//!   bounded sizes, a valid manifest at the root.
//! * [`unpack`] is what a worker does with an archive whose digest it has
//!   checked: the same checks, then the files, owned by the task's uid.
//!
//! An archive is untrusted input, and its bounds hold before anything is
//! read into memory (review H3): every byte decompressed goes through
//! [`Bounded`], which stops at the unpacked bound plus the headers'
//! share, and at a compression ratio no source tree has; a first pass over
//! the raw headers refuses a PAX or GNU long-name/long-link record larger
//! than [`MAX_META_BYTES`] before the tar reader would buffer it, and
//! counts every entry, metadata records included. What a check costs is
//! therefore the archive (the body, at most `bundle_max_bytes`) plus a
//! constant working set of about 1 MiB.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use dispatcher_wire::{BundleManifest, Runtime};
use sha2::{Digest as _, Sha256};

/// The manifest's file name, at the archive's root.
pub const MANIFEST: &str = "bundle.json";

/// Entries one archive may hold, PAX and long-name records included.
pub const MAX_ENTRIES: usize = 50_000;

/// The largest PAX (`x`, `g`) or GNU long-name/long-link (`L`, `K`)
/// record; the tar reader buffers these whole.
pub const MAX_META_BYTES: u64 = 64 * 1024;

/// The longest path of an entry, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// Decompressed bytes per compressed byte beyond which an archive is a
/// bomb (source trees compress about 3 to 10 times; zeros 1000 times).
/// Checked once [`RATIO_FLOOR`] bytes are out, so small archives of
/// repetitive files pass.
pub const MAX_RATIO: u64 = 200;
const RATIO_FLOOR: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{0}")]
    Invalid(String),
    /// A size bound: unpacked size, entries, a metadata record, the ratio.
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn invalid(msg: impl Into<String>) -> BundleError {
    BundleError::Invalid(msg.into())
}

fn too_large(msg: impl Into<String>) -> BundleError {
    BundleError::TooLarge(msg.into())
}

/// The decompressing reader of an archive, which fails once it has given
/// out more than `limit` bytes, or more than [`MAX_RATIO`] times the
/// compressed size; why it stopped is kept in `tripped`, since the tar
/// reader wraps the I/O error.
struct Bounded<'a> {
    inner: flate2::read::GzDecoder<&'a [u8]>,
    out: u64,
    limit: u64,
    compressed: u64,
    tripped: std::rc::Rc<std::cell::Cell<Option<&'static str>>>,
}

impl<'a> Bounded<'a> {
    fn new(archive: &'a [u8], max_unpacked: u64) -> Self {
        // Each entry's 512-byte header and up to 511 bytes of padding.
        let headers = MAX_ENTRIES as u64 * 1024 + 1024 * 1024;
        Bounded {
            inner: flate2::read::GzDecoder::new(archive),
            out: 0,
            limit: max_unpacked.saturating_add(headers),
            compressed: archive.len() as u64,
            tripped: Default::default(),
        }
    }
}

impl Read for Bounded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out += n as u64;
        let why = if self.out > self.limit {
            Some("decompressed, the archive is larger than the unpacked bound allows")
        } else if self.out > RATIO_FLOOR && self.out > self.compressed.saturating_mul(MAX_RATIO) {
            Some("the archive decompresses more than 200 times its size (a gzip bomb)")
        } else {
            None
        };
        if let Some(why) = why {
            self.tripped.set(Some(why));
            return Err(std::io::Error::other(why));
        }
        Ok(n)
    }
}

/// The first pass: the raw headers (metadata records not interpreted),
/// with the bounds that must hold before the tar reader buffers any of
/// them.
fn prescan(archive: &[u8], max_unpacked: u64) -> Result<(), BundleError> {
    let reader = Bounded::new(archive, max_unpacked);
    let tripped = reader.tripped.clone();
    let mut tar = tar::Archive::new(reader);
    let bounded = |e: std::io::Error| match tripped.get() {
        Some(why) => too_large(why),
        None => invalid(format!("not a gzipped tar: {e}")),
    };
    let entries = tar.entries().map_err(bounded)?.raw(true);
    let mut declared: u64 = 0;
    for (n, entry) in entries.enumerate() {
        if n >= MAX_ENTRIES {
            return Err(too_large(format!(
                "more than {MAX_ENTRIES} entries (metadata records included)"
            )));
        }
        let entry = entry.map_err(bounded)?;
        let kind = entry.header().entry_type();
        let meta = matches!(
            kind,
            tar::EntryType::XHeader
                | tar::EntryType::XGlobalHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        );
        if meta && entry.size() > MAX_META_BYTES {
            return Err(too_large(format!(
                "a {kind:?} record of {} bytes is over {MAX_META_BYTES} bytes",
                entry.size()
            )));
        }
        // Declared sizes first: refused before their bytes are inflated.
        declared = declared.saturating_add(entry.size());
        if declared > max_unpacked {
            return Err(too_large(format!(
                "unpacked, the bundle is over {max_unpacked} bytes"
            )));
        }
    }
    Ok(())
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Whether `s` is a digest as [`digest`] writes it.
pub fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Where an org's bundle lives in the object store.
pub fn object_key(org: uuid::Uuid, digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("bundles/{org}/{hex}.tar.gz")
}

/// A tag: an org's name for a digest, as tasks may name a bundle.
pub fn check_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
        && !tag.starts_with("sha256:");
    if ok {
        Ok(())
    } else {
        Err(
            "a tag is 1 to 128 of A-Z a-z 0-9 . _ - : starting with a letter or digit, \
             and does not start with sha256:"
                .into(),
        )
    }
}

/// Checks a manifest's fields beyond their types.
pub fn check_manifest(m: &BundleManifest) -> Result<(), String> {
    if m.runtime == Runtime::Exec {
        return Err("runtime: a bundle's runtime is node, python or rust".into());
    }
    let h = &m.handler;
    if h.is_empty() || h.len() > 256 || h.chars().any(|c| c.is_control() || c == '/') {
        return Err("handler: must be 1 to 256 characters, with no '/' or control".into());
    }
    match m.runtime {
        Runtime::Python | Runtime::Node if !h.contains('.') => {
            return Err(format!(
                "handler: {h:?} must be MODULE.FUNCTION (e.g. main.handler)"
            ))
        }
        _ => {}
    }
    if m.memory_mb == Some(0) || m.timeout_seconds == Some(0) {
        return Err("memory_mb and timeout_seconds must be at least 1".into());
    }
    Ok(())
}

/// The path an entry names, checked: relative, no `..`, no root or prefix.
/// `None` for the archive's root itself (`./`).
fn entry_path(raw: &Path) -> Result<Option<PathBuf>, BundleError> {
    if raw.as_os_str().len() > MAX_PATH_BYTES {
        return Err(invalid(format!(
            "an entry's path is over {MAX_PATH_BYTES} bytes"
        )));
    }
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => {
                return Err(invalid(format!(
                    "entry {} leaves the bundle (absolute or ..)",
                    raw.display()
                )))
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Walks an archive's entries with every check; calls `each` with the
/// checked path, the entry, and whether it is a directory.
fn walk(
    archive: &[u8],
    max_unpacked: u64,
    mut each: impl FnMut(&Path, &mut tar::Entry<'_, Bounded<'_>>, bool) -> Result<(), BundleError>,
) -> Result<BundleManifest, BundleError> {
    prescan(archive, max_unpacked)?;
    let reader = Bounded::new(archive, max_unpacked);
    let tripped = reader.tripped.clone();
    let mut tar = tar::Archive::new(reader);
    let mut manifest = None;
    let mut total: u64 = 0;
    let bounded = |e: std::io::Error| match tripped.get() {
        Some(why) => too_large(why),
        None => invalid(format!("not a gzipped tar: {e}")),
    };
    let entries = tar.entries().map_err(bounded)?;
    for entry in entries {
        let mut entry = entry.map_err(bounded)?;
        let raw = entry
            .path()
            .map_err(|e| invalid(format!("an entry's path: {e}")))?
            .into_owned();
        let kind = entry.header().entry_type();
        let is_dir = kind.is_dir();
        if !is_dir && !kind.is_file() {
            return Err(invalid(format!(
                "entry {} is a {:?}: a bundle holds only files and directories \
                 (bundle push copies what links point to)",
                raw.display(),
                kind
            )));
        }
        let Some(path) = entry_path(&raw)? else {
            continue;
        };
        total = total.saturating_add(entry.size());
        if total > max_unpacked {
            return Err(too_large(format!(
                "unpacked, the bundle is over {max_unpacked} bytes"
            )));
        }
        if path == Path::new(MANIFEST) && !is_dir {
            let mut text = Vec::new();
            (&mut entry)
                .take(64 * 1024)
                .read_to_end(&mut text)
                .map_err(|e| invalid(format!("{MANIFEST}: {e}")))?;
            let m: BundleManifest =
                serde_json::from_slice(&text).map_err(|e| invalid(format!("{MANIFEST}: {e}")))?;
            check_manifest(&m).map_err(|e| invalid(format!("{MANIFEST}: {e}")))?;
            manifest = Some(m);
            continue;
        }
        each(&path, &mut entry, is_dir).map_err(|e| match tripped.get() {
            Some(why) => too_large(why),
            None => e,
        })?;
    }
    manifest.ok_or_else(|| invalid(format!("no {MANIFEST} at the bundle's root")))
}

/// Checks an archive and returns its manifest.
pub fn inspect(archive: &[u8], max_unpacked: u64) -> Result<BundleManifest, BundleError> {
    walk(archive, max_unpacked, |_, entry, _| {
        // Read through, so sizes are real and a truncated archive fails.
        std::io::copy(entry, &mut std::io::sink())
            .map(|_| ())
            .map_err(|e| invalid(format!("a truncated archive: {e}")))
    })
}

/// Unpacks a checked archive into `dest` (which must exist), files `0644`
/// or `0755`, directories `0755`, everything owned by `uid` when given.
pub fn unpack(
    archive: &[u8],
    dest: &Path,
    max_unpacked: u64,
    uid: Option<u32>,
) -> Result<BundleManifest, BundleError> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    // Runs before any of the task's processes exist: nothing races it.
    let give = |p: &Path| -> std::io::Result<()> {
        match uid {
            Some(uid) => std::os::unix::fs::lchown(p, Some(uid), Some(uid)),
            None => Ok(()),
        }
    };
    let mut made_dirs = std::collections::HashSet::new();
    let mut mkdirs = |rel: &Path| -> std::io::Result<()> {
        let mut at = dest.to_path_buf();
        for c in rel.components() {
            at.push(c);
            if made_dirs.insert(at.clone()) {
                match std::fs::DirBuilder::new().mode(0o755).create(&at) {
                    Ok(()) => give(&at)?,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        if !std::fs::symlink_metadata(&at)?.is_dir() {
                            return Err(e);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    };
    let manifest = walk(archive, max_unpacked, |path, entry, is_dir| {
        if is_dir {
            return Ok(mkdirs(path)?);
        }
        if let Some(parent) = path.parent() {
            mkdirs(parent)?;
        }
        let exec = entry
            .header()
            .mode()
            .map(|m| m & 0o111 != 0)
            .unwrap_or(false);
        let target = dest.join(path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if exec { 0o755 } else { 0o644 })
            .open(&target)?; // create_new: never through an existing link
        std::io::copy(entry, &mut f)?;
        give(&target)?;
        Ok(())
    })?;
    // The manifest is unpacked too: runners may read it.
    let text = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
    std::fs::write(dest.join(MANIFEST), text)?;
    give(&dest.join(MANIFEST))?;
    Ok(manifest)
}

/// Packs `dir` (which must hold a valid `bundle.json`) deterministically.
/// Symbolic links are followed: the archive holds what they point to.
pub fn pack(dir: &Path) -> Result<(Vec<u8>, BundleManifest), BundleError> {
    let manifest_text = std::fs::read(dir.join(MANIFEST))
        .map_err(|e| invalid(format!("{}: {e}", dir.join(MANIFEST).display())))?;
    let manifest: BundleManifest =
        serde_json::from_slice(&manifest_text).map_err(|e| invalid(format!("{MANIFEST}: {e}")))?;
    check_manifest(&manifest).map_err(|e| invalid(format!("{MANIFEST}: {e}")))?;
    let mut files = Vec::new();
    collect(dir, Path::new(""), &mut files)?;
    files.sort();
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.follow_symlinks(true);
    for (rel, is_dir) in &files {
        let full = dir.join(rel);
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        if *is_dir {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            header.set_cksum();
            tar.append_data(&mut header, rel, std::io::empty())?;
        } else {
            let meta = std::fs::metadata(&full)?;
            use std::os::unix::fs::PermissionsExt as _;
            let exec = meta.permissions().mode() & 0o111 != 0;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(if exec { 0o755 } else { 0o644 });
            header.set_size(meta.len());
            header.set_cksum();
            tar.append_data(&mut header, rel, std::fs::File::open(&full)?)?;
        }
    }
    let bytes = tar.into_inner()?.finish()?;
    Ok((bytes, manifest))
}

/// Every file and directory under `dir` (relative paths), following
/// symbolic links; skips `.git`.
fn collect(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, bool)>) -> Result<(), BundleError> {
    for entry in std::fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let name = entry.file_name();
        if name == ".git" {
            continue;
        }
        let rel = rel.join(&name);
        let meta = std::fs::metadata(root.join(&rel))?; // follows links
        if meta.is_dir() {
            out.push((rel.clone(), true));
            collect(root, &rel, out)?;
        } else if meta.is_file() {
            out.push((rel, false));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle_dir(manifest: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bundle-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("lib")).unwrap();
        std::fs::write(dir.join(MANIFEST), manifest).unwrap();
        std::fs::write(dir.join("main.py"), "def handler(e, c):\n    return e\n").unwrap();
        std::fs::write(dir.join("lib/util.py"), "X = 1\n").unwrap();
        dir
    }

    #[test]
    fn pack_is_deterministic_and_unpacks_to_the_same_files() {
        let dir = bundle_dir(r#"{"runtime": "python", "handler": "main.handler"}"#);
        let (a, m) = pack(&dir).unwrap();
        // Touch a file's time: the digest does not change.
        std::fs::write(dir.join("lib/util.py"), "X = 1\n").unwrap();
        let (b, _) = pack(&dir).unwrap();
        assert_eq!(digest(&a), digest(&b));
        assert!(is_digest(&digest(&a)));
        assert_eq!(m.runtime, Runtime::Python);
        assert_eq!(inspect(&a, 1 << 20).unwrap(), m);
        let out = dir.with_extension("out");
        std::fs::create_dir_all(&out).unwrap();
        unpack(&a, &out, 1 << 20, None).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("lib/util.py")).unwrap(),
            "X = 1\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&out);
    }

    #[test]
    fn bad_archives_are_refused_with_a_reason() {
        let dir = bundle_dir(r#"{"runtime": "python", "handler": "main.handler"}"#);
        let (good, _) = pack(&dir).unwrap();
        let reason = |bytes: &[u8], max: u64| match inspect(bytes, max) {
            Err(BundleError::Invalid(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(reason(b"not gzip", 1 << 20).contains("gzipped tar"));
        let half = reason(&good[..good.len() / 2], 1 << 20);
        assert!(!half.is_empty(), "a truncated archive is refused");
        assert!(
            matches!(inspect(&good, 10), Err(BundleError::TooLarge(m)) if m.contains("over 10 bytes"))
        );
        // A path that leaves the bundle, and a symbolic link.
        let evil = |name: &str, kind: tar::EntryType| {
            let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let mut t = tar::Builder::new(gz);
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(0);
            h.set_mode(0o644);
            {
                let raw = h.as_old_mut();
                raw.name[..name.len()].copy_from_slice(name.as_bytes());
            }
            if kind == tar::EntryType::Symlink {
                h.set_link_name("/etc/passwd").unwrap();
            }
            h.set_cksum();
            t.append(&h, std::io::empty()).unwrap();
            t.into_inner().unwrap().finish().unwrap()
        };
        assert!(
            reason(&evil("../x", tar::EntryType::Regular), 1 << 20).contains("leaves the bundle")
        );
        assert!(
            reason(&evil("/abs", tar::EntryType::Regular), 1 << 20).contains("leaves the bundle")
        );
        assert!(reason(&evil("link", tar::EntryType::Symlink), 1 << 20)
            .contains("only files and directories"));
        // No manifest; a manifest of the wrong shape.
        assert!(reason(&evil("x.py", tar::EntryType::Regular), 1 << 20).contains("no bundle.json"));
        let bad = bundle_dir(r#"{"runtime": "exec", "handler": "x.y"}"#);
        assert!(matches!(pack(&bad), Err(BundleError::Invalid(m)) if m.contains("runtime")));
        let bad = bundle_dir(r#"{"runtime": "python", "handler": "nodot"}"#);
        assert!(
            matches!(pack(&bad), Err(BundleError::Invalid(m)) if m.contains("MODULE.FUNCTION"))
        );
        let bad = bundle_dir(r#"{"runtime": "python", "handler": "a.b", "extra": 1}"#);
        assert!(matches!(pack(&bad), Err(BundleError::Invalid(m)) if m.contains("unknown field")));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn tags_and_digests_are_told_apart() {
        assert!(check_tag("etl-v2").is_ok());
        assert!(check_tag("sha256:abc").is_err());
        assert!(check_tag("").is_err());
        assert!(check_tag("a b").is_err());
        assert!(!is_digest("sha256:ABC"));
        assert!(!is_digest(&format!("sha256:{}", "A".repeat(64))));
        assert!(is_digest(&format!("sha256:{}", "a".repeat(64))));
    }
}
