//! The store on disk: `pg_slotguard/slots/<name>` under the data directory, one file per
//! slot name, written the way core writes `pg_replslot/<name>/state` (`SaveSlotToPath`):
//! write `<name>.tmp` (created exclusively, after removing a stale one), fsync it, rename
//! it over `<name>`, fsync the directory. A crash at any point leaves the old file or the
//! new one, never a mix; a `.tmp` left by a crash is removed at the next load.
//!
//! Plain `std::fs` (every backend and the postmaster run in the data directory, so the
//! paths are relative): nothing here raises a PostgreSQL ERROR, so the postmaster can load
//! the store at startup and log what it could not read instead of failing. fsync follows
//! the server's `fsync` setting, as core's own `pg_fsync` does.

use super::codec::{self, Damage, Identity, SlotRecord};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A failed write: `synced` false when the failure was an fsync's. After a failed fsync
/// the kernel may have dropped the dirty pages and cleared the error, so what is on disk is
/// unknown: PostgreSQL's rule (data_sync_retry = off) is a PANIC, and the caller follows it.
#[derive(Debug)]
pub struct WriteError {
    pub error: std::io::Error,
    pub in_fsync: bool,
}

impl From<std::io::Error> for WriteError {
    fn from(error: std::io::Error) -> Self {
        WriteError { error, in_fsync: false }
    }
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.in_fsync {
            write!(f, "could not fsync: {}", self.error)
        } else {
            self.error.fmt(f)
        }
    }
}

fn fsync_err(error: std::io::Error) -> WriteError {
    WriteError { error, in_fsync: true }
}

/// The store's directory, relative to the data directory.
pub const DIR: &str = "pg_slotguard";
/// Where the per-slot records live.
pub const SLOTS_DIR: &str = "pg_slotguard/slots";

pub(crate) fn fsync_enabled() -> bool {
    // SAFETY: a plain bool GUC of the server, set by the GUC machinery.
    unsafe { pgrx::pg_sys::enableFsync }
}

pub(crate) fn sync_file(f: &std::fs::File) -> std::io::Result<()> {
    if fsync_enabled() {
        f.sync_all()?;
    }
    Ok(())
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    if fsync_enabled() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The node's own record (warnings about the node as a whole): a record with no name.
pub const NODE_FILE: &str = "pg_slotguard/node";

pub fn record_path(name: &str) -> PathBuf {
    if name.is_empty() {
        PathBuf::from(NODE_FILE)
    } else {
        Path::new(SLOTS_DIR).join(name)
    }
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// Make the directories (durably) if they are missing.
pub fn ensure_dirs() -> std::io::Result<()> {
    for d in [DIR, SLOTS_DIR] {
        if !Path::new(d).is_dir() {
            std::fs::create_dir_all(d)?;
            sync_dir(Path::new(d))?;
            sync_dir(Path::new(d).parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
        }
    }
    Ok(())
}

/// How far a record's write must reach before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Temp file, fsync, rename, fsync of the directory: the new record survives any crash.
    Durable,
    /// Temp file, fsync, rename: after a crash of the operating system the file holds the
    /// new record or the old one, whole, never a mix or nothing (what the old one says must
    /// mean the same: a change already settled from the commit log).
    Whole,
}

/// Write `rec` durably as its file (temp file, fsync, rename, fsync of the directory).
pub fn write(rec: &SlotRecord) -> Result<(), WriteError> {
    write_as(rec, Durability::Durable)
}

/// Write `rec` as its file, as far as `how` says.
pub fn write_as(rec: &SlotRecord, how: Durability) -> Result<(), WriteError> {
    ensure_dirs()?;
    let path = record_path(&rec.name);
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(&codec::encode(rec))?;
        sync_file(&f).map_err(fsync_err)?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        if how == Durability::Durable {
            sync_dir(parent(&path)).map_err(fsync_err)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Remove the file of `name` durably (nothing left to keep of that slot).
pub fn remove(name: &str) -> Result<(), WriteError> {
    remove_as(name, true)
}

/// Remove the file of `name`; `durable`: fsync the directory, so that the removal
/// survives a crash of the operating system too.
pub fn remove_as(name: &str, durable: bool) -> Result<(), WriteError> {
    let path = record_path(name);
    match std::fs::remove_file(&path) {
        Ok(()) if durable => sync_dir(parent(&path)).map_err(fsync_err),
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What a load found.
#[derive(Default)]
pub struct Loaded {
    pub records: Vec<SlotRecord>,
    /// Files that failed their check, each moved aside: (file, moved to, why).
    pub damaged: Vec<(String, String, Damage)>,
    /// Files that could not even be read or moved: (file, error).
    pub unreadable: Vec<(String, String)>,
}

/// Read every record. A temporary file (a write cut short by a crash) is removed; a file
/// that fails its check is renamed `<name>.<why>` (`.<why>.N` if that exists) and left
/// for the DBA; other names are left alone.
pub fn load() -> Loaded {
    let mut out = Loaded::default();
    let node = Path::new(NODE_FILE);
    let _ = std::fs::remove_file(node.with_extension("tmp"));
    match std::fs::read(node) {
        Ok(bytes) => match codec::decode(&bytes) {
            Ok(rec) if rec.name.is_empty() => out.records.push(rec),
            Ok(rec) => set_aside(node, Damage::BadContent(format!("it names slot \"{}\"", rec.name)), &mut out),
            Err(why) => set_aside(node, why, &mut out),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => out.unreadable.push((NODE_FILE.to_string(), e.to_string())),
    }
    let Ok(dir) = std::fs::read_dir(SLOTS_DIR) else { return out };
    let mut names: Vec<String> = dir.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    for file in names {
        let path = Path::new(SLOTS_DIR).join(&file);
        if file.ends_with(".tmp") {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        if !codec::is_record_name(&file) {
            continue;
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                out.unreadable.push((path.display().to_string(), e.to_string()));
                continue;
            }
        };
        match codec::decode(&bytes) {
            Ok(rec) if rec.name == file => out.records.push(rec),
            Ok(rec) => {
                let why = Damage::BadContent(format!("it names slot \"{}\"", rec.name));
                set_aside(&path, why, &mut out);
            }
            Err(why) => set_aside(&path, why, &mut out),
        }
    }
    out
}

fn set_aside(path: &Path, why: Damage, out: &mut Loaded) {
    let base = format!("{}.{}", path.display(), why.suffix());
    let mut to = PathBuf::from(&base);
    let mut n = 1;
    while to.exists() {
        to = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    match std::fs::rename(path, &to).and_then(|_| sync_dir(parent(path))) {
        Ok(()) => out.damaged.push((path.display().to_string(), to.display().to_string(), why)),
        Err(e) => out.unreadable.push((path.display().to_string(), format!("{why}; and it could not be moved aside: {e}"))),
    }
}

/// A directory's [`Identity`]: its inode and birth time (statx), if it is there.
pub fn dir_identity(path: &Path) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok().filter(|m| m.is_dir())?;
    let btime = m
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos().min(i64::MAX as u128) as i64);
    Some(Identity { ino: m.ino(), btime })
}

/// The identity of a slot's directory in `pg_replslot`, if the slot is there on disk
/// (every slot but a temporary one has its directory from the moment it is made).
pub fn slot_identity(name: &str) -> Option<Identity> {
    dir_identity(&Path::new("pg_replslot").join(name))
}

/// The identity of the store's own directory (made if missing): a copy of the data
/// directory has another.
pub fn node_identity() -> Option<Identity> {
    ensure_dirs().ok()?;
    dir_identity(Path::new(DIR))
}
