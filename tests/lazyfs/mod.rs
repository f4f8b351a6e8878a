//! lazyfs: a FUSE layer for power-loss tests, in the spirit of LazyFS
//! (github.com/dsrhaslab/lazyfs). Mounted over a directory, it passes every operation through
//! to a backing directory at once, and remembers what a power cut would take back. It runs in
//! the test's own process, on a thread of its own (the `fuser` crate, no libfuse: root mounts
//! /dev/fuse directly); the test cuts power with a call.
//!
//! `LazyFs::cut` is the power cut: from that instant every request fails with EIO, so nothing
//! more becomes durable. The caller then kills every process that uses the mount (power loss
//! kills everything), and `LazyFs::unmount_to_durable` unmounts and rewrites the backing
//! directory to exactly the durable state, which the next mount starts from.
//!
//! The durability model is strict: what POSIX promises, plus the one rule of journalling
//! filesystems that PostgreSQL relies on.
//! - A file's data and size are durable as of its last fsync or fdatasync, by any descriptor
//!   (a write through a descriptor opened O_SYNC or O_DSYNC counts as one). Later writes,
//!   truncations and allocations are undone at a cut.
//! - A directory's entries (name -> inode) are durable as of its last fsync. create, mkdir,
//!   symlink, link, rename, unlink and rmdir change the live names only: at a cut every
//!   directory gets back the entries of its last fsync (a rename across directories needs both
//!   fsynced). Nothing else makes a name durable: not an fsync of the file after a rename.
//! - One exception, which ext4 (`ext4_sync_parent`, and its journal) and XFS (its log) keep
//!   and PostgreSQL counts on (it fsyncs new relation files and new directories, never their
//!   directory): an fsync of a file or directory that has no durable name yet, because it was
//!   made since its directory's last fsync, also makes durable the name it has now, and so on
//!   up while the directory is in the same case.
//! - What is in the backing directory when the layer is mounted is durable. Permissions,
//!   owners and times are not modelled (they stay as last set); neither are xattrs or locks
//!   (the kernel keeps locks locally).
//!
//! A file unlinked (or renamed over) while a durable name still points to it is kept alive by
//! a hard link in an attic beside the backing directory, so the cut can bring it back; a file
//! overwritten since its last fsync has the old content of the blocks it changed kept in
//! memory (4 kB blocks, saved at their first change after the fsync). stat shows the backing
//! inode numbers, and after a cut every file and directory that survives keeps its inode, as
//! on a real disk (the store knows a slot by the inode of its directory); only the change
//! times of files differ (the durable tree is put back together with hard links).

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};
use nix::dir::{Dir, Type};
use nix::fcntl::{AtFlags, OFlag, AT_FDCWD};
use nix::sys::stat::{FchmodatFlags, FileStat, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The mount source every layer is mounted with: scripts/suite unmounts leftovers of a killed
/// run by it.
pub const FSNAME: &str = "pgsg-lazyfs";
/// The unit of saved old content.
const BLOCK: u64 = 4096;
/// How long the kernel may cache names and attributes: everything goes through the layer, so
/// the kernel's cache never goes stale.
const TTL: Duration = Duration::from_secs(1);
/// The root's node id, and its inode number to the kernel (FUSE's).
const ROOT: u64 = 1;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

/// A file, directory or symlink of the backing directory, by its own id (the kernel's inode
/// number for it: backing inode numbers can be reused, ids never are).
struct Node {
    kind: Kind,
    /// Its inode number in the backing directory.
    ino: u64,
    /// An O_PATH descriptor, while the kernel knows the node (lookup count above zero).
    fd: Option<OwnedFd>,
    nlookup: u64,
    /// Its live name (parent id, name) as last seen.
    name: Option<(u64, OsString)>,
    /// How many durable directory entries name it.
    durable_links: u32,
    /// File: durable size, and the content of each block changed since the last fsync.
    durable_size: u64,
    saved: BTreeMap<u64, Vec<u8>>,
    /// File: hard-linked in the attic (by its id) because its last live name went.
    in_attic: bool,
    /// Directory: the durable entries.
    entries: BTreeMap<OsString, u64>,
    /// Directory: mode and owner, to make it again.
    mode: u32,
    uid: u32,
    gid: u32,
    /// Symlink: its target.
    target: OsString,
}

enum Handle {
    File { file: File, node: u64, sync: bool },
    Dir { entries: Vec<(u64, FileType, OsString)> },
}

struct State {
    cut: bool,
    nodes: HashMap<u64, Node>,
    by_ino: HashMap<u64, u64>,
    next_node: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    attic: OwnedFd,
}

type Res<T> = Result<T, Errno>;

/// The names in the directory `dir`, without "." and "..".
fn entries(dir: BorrowedFd<'_>) -> nix::Result<Vec<OsString>> {
    let mut d = Dir::openat(dir, ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
    Ok(d.iter()
        .filter_map(|e| e.ok())
        .map(|e| OsStr::from_bytes(e.file_name().to_bytes()).to_owned())
        .filter(|n| n != "." && n != "..")
        .collect())
}

fn errno(e: nix::errno::Errno) -> Errno {
    Errno::from_i32(e as i32)
}

fn ioerr(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn kind_of(mode: u32) -> Kind {
    match mode & libc::S_IFMT {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    }
}

fn ftype(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFREG => FileType::RegularFile,
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        _ => FileType::BlockDevice,
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs())
    }
}

fn attr(ino: u64, s: &FileStat, in_attic: bool) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: s.st_size as u64,
        blocks: s.st_blocks as u64,
        atime: time(s.st_atime, s.st_atime_nsec),
        mtime: time(s.st_mtime, s.st_mtime_nsec),
        ctime: time(s.st_ctime, s.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: ftype(s.st_mode),
        perm: (s.st_mode & 0o7777) as u16,
        // The attic's link is not one the mount shows.
        nlink: (s.st_nlink as u32).saturating_sub(in_attic as u32),
        uid: s.st_uid,
        gid: s.st_gid,
        rdev: s.st_rdev as u32,
        blksize: s.st_blksize as u32,
        flags: 0,
    }
}

/// `/proc/self/fd/N`: reopens an O_PATH descriptor for I/O.
fn proc_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn read_full_at(f: &File, buf: &mut [u8], mut off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                off += k as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Node {
    fn new(kind: Kind, s: &FileStat, durable_size: u64) -> Node {
        Node {
            kind,
            ino: s.st_ino,
            fd: None,
            nlookup: 0,
            name: None,
            durable_links: 0,
            durable_size,
            saved: BTreeMap::new(),
            in_attic: false,
            entries: BTreeMap::new(),
            mode: s.st_mode & 0o7777,
            uid: s.st_uid,
            gid: s.st_gid,
            target: OsString::new(),
        }
    }

    /// Keep the old content of [start, end) before it changes (only what is durable).
    fn save(&mut self, f: &File, start: u64, end: u64) -> Res<()> {
        let end = end.min(self.durable_size);
        if self.kind != Kind::File || start >= end {
            return Ok(());
        }
        for b in start / BLOCK..=(end - 1) / BLOCK {
            if let std::collections::btree_map::Entry::Vacant(e) = self.saved.entry(b) {
                let mut buf = vec![0u8; BLOCK as usize];
                let n = read_full_at(f, &mut buf, b * BLOCK).map_err(ioerr)?;
                buf.truncate(n);
                e.insert(buf);
            }
        }
        Ok(())
    }
}

impl State {
    /// The node the kernel means by `ino`: the kernel knows nodes by their backing inode
    /// numbers (so that stat shows the real ones, stable across mounts, as after a real power
    /// cut), except the root, which is 1. An inode number the kernel still knows is never
    /// reused: the layer holds the inode open until the kernel forgets it.
    fn id(&self, ino: INodeNo) -> Res<u64> {
        if ino.0 == ROOT {
            Ok(ROOT)
        } else {
            self.by_ino.get(&ino.0).copied().ok_or(Errno::ESTALE)
        }
    }

    /// The kernel's inode number for node `id`, and its attributes.
    fn attr(&self, id: u64, s: &FileStat) -> Res<FileAttr> {
        let n = self.node(id)?;
        Ok(attr(if id == ROOT { ROOT } else { s.st_ino }, s, n.in_attic))
    }

    fn node(&self, id: u64) -> Res<&Node> {
        self.nodes.get(&id).ok_or(Errno::ESTALE)
    }

    fn node_mut(&mut self, id: u64) -> Res<&mut Node> {
        self.nodes.get_mut(&id).ok_or(Errno::ESTALE)
    }

    fn fd(&self, id: u64) -> Res<BorrowedFd<'_>> {
        self.node(id)?.fd.as_ref().map(|f| f.as_fd()).ok_or(Errno::ESTALE)
    }

    /// A node for a backing inode the layer has just made (or, `durable_size` given, found).
    fn add(&mut self, s: &FileStat, durable_size: u64) -> u64 {
        let id = self.next_node;
        self.next_node += 1;
        self.nodes.insert(id, Node::new(kind_of(s.st_mode), s, durable_size));
        self.by_ino.insert(s.st_ino, id);
        id
    }

    /// The node of a backing inode found as `name` in directory `parent`.
    fn known(&mut self, parent: u64, name: &OsStr, s: &FileStat) -> u64 {
        if let Some(&id) = self.by_ino.get(&s.st_ino) {
            return id;
        }
        // Not made through the layer nor there at the mount: nothing durable names it.
        let target = match kind_of(s.st_mode) {
            Kind::Symlink => self.fd(parent).ok().and_then(|d| nix::fcntl::readlinkat(d, name).ok()).unwrap_or_default(),
            _ => OsString::new(),
        };
        let id = self.add(s, 0);
        self.nodes.get_mut(&id).unwrap().target = target;
        id
    }

    /// Everything under `dir` (node `id`) is durable: the mount's starting point.
    fn walk(&mut self, dir: &OwnedFd, id: u64) -> nix::Result<()> {
        for name in entries(dir.as_fd())? {
            let s = nix::sys::stat::fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
            let child = match self.by_ino.get(&s.st_ino) {
                Some(&c) => c,
                None => {
                    let c = self.add(&s, s.st_size as u64);
                    let n = self.nodes.get_mut(&c).unwrap();
                    if n.kind == Kind::Symlink {
                        n.target = nix::fcntl::readlinkat(dir, name.as_os_str())?;
                    }
                    c
                }
            };
            let n = self.nodes.get_mut(&child).unwrap();
            n.durable_links += 1;
            n.name = Some((id, name.clone()));
            let is_dir = n.kind == Kind::Dir;
            self.nodes.get_mut(&id).unwrap().entries.insert(name.clone(), child);
            if is_dir {
                let sub = nix::fcntl::openat(dir, name.as_os_str(), OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())?;
                self.walk(&sub, child)?;
            }
        }
        Ok(())
    }

    fn link_count(&mut self, id: u64, up: bool) {
        if let Some(n) = self.nodes.get_mut(&id) {
            if up {
                n.durable_links += 1;
            } else {
                n.durable_links = n.durable_links.saturating_sub(1);
            }
        }
    }

    /// The ext4/XFS rule: a node with no durable name gets its current one, and so on up.
    fn make_name_durable(&mut self, mut id: u64) {
        while id != ROOT {
            let Ok(n) = self.node(id) else { return };
            if n.durable_links > 0 {
                return;
            }
            let Some((parent, name)) = n.name.clone() else { return };
            let ino = n.ino;
            let still = match self.fd(parent) {
                Ok(pfd) => nix::sys::stat::fstatat(pfd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW).map(|s| s.st_ino == ino).unwrap_or(false),
                Err(_) => false,
            };
            if !still {
                return;
            }
            let Some(p) = self.nodes.get_mut(&parent) else { return };
            let old = p.entries.insert(name, id);
            if let Some(o) = old.filter(|&o| o != id) {
                self.link_count(o, false);
            }
            if old != Some(id) {
                self.link_count(id, true);
            }
            id = parent;
        }
    }

    /// fsync of a directory: its entries now are its durable ones.
    fn sync_dir(&mut self, id: u64) -> Res<()> {
        let mut stats = Vec::new();
        {
            let dfd = self.fd(id)?;
            for name in entries(dfd).map_err(errno)? {
                let s = nix::sys::stat::fstatat(dfd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW).map_err(errno)?;
                stats.push((name, s));
            }
        }
        let mut fresh = BTreeMap::new();
        for (name, s) in stats {
            let child = self.known(id, &name, &s);
            fresh.insert(name, child);
        }
        let old = std::mem::replace(&mut self.node_mut(id)?.entries, fresh.clone());
        for (name, c) in &old {
            if fresh.get(name) != Some(c) {
                self.link_count(*c, false);
            }
        }
        for (name, c) in &fresh {
            if old.get(name) != Some(c) {
                self.link_count(*c, true);
            }
        }
        self.make_name_durable(id);
        Ok(())
    }

    /// fsync/fdatasync of a file: its data and size now are durable.
    fn sync_file(&mut self, id: u64, f: &File) -> Res<()> {
        let size = f.metadata().map_err(ioerr)?.len();
        let n = self.node_mut(id)?;
        n.durable_size = size;
        n.saved.clear();
        self.make_name_durable(id);
        Ok(())
    }

    /// Before the name `name` in `dir` goes (unlink, rename over it): if it is the last name
    /// of a file that a durable entry names, keep the file in the attic.
    fn keep_if_durable(&mut self, dir: u64, name: &OsStr) -> Res<()> {
        let dfd = self.fd(dir)?;
        let Ok(s) = nix::sys::stat::fstatat(dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW) else { return Ok(()) };
        if kind_of(s.st_mode) != Kind::File || s.st_nlink > 1 {
            return Ok(());
        }
        let Some(&id) = self.by_ino.get(&s.st_ino) else { return Ok(()) };
        let n = self.node(id)?;
        if n.durable_links == 0 || n.in_attic {
            return Ok(());
        }
        nix::unistd::linkat(dfd, name, &self.attic, id.to_string().as_str(), AtFlags::empty()).map_err(errno)?;
        self.node_mut(id)?.in_attic = true;
        Ok(())
    }

    fn new_fh(&mut self, h: Handle) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, h);
        fh
    }

    /// Count a lookup of `id`, found as `name` in `parent`, reached through `fd` (O_PATH).
    fn looked_up(&mut self, id: u64, parent: u64, name: &OsStr, fd: OwnedFd) -> Res<FileAttr> {
        let s = nix::sys::stat::fstat(&fd).map_err(errno)?;
        let n = self.node_mut(id)?;
        n.nlookup += 1;
        if n.fd.is_none() {
            n.fd = Some(fd);
        }
        n.name = Some((parent, name.to_owned()));
        self.attr(id, &s)
    }

    fn lookup(&mut self, parent: u64, name: &OsStr) -> Res<(u64, FileAttr)> {
        let pfd = self.fd(parent)?;
        let fd = nix::fcntl::openat(pfd, name, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty()).map_err(errno)?;
        let s = nix::sys::stat::fstat(&fd).map_err(errno)?;
        let id = self.known(parent, name, &s);
        Ok((id, self.looked_up(id, parent, name, fd)?))
    }

    /// A node made just now by the layer as `name` in `parent`.
    fn made(&mut self, parent: u64, name: &OsStr, target: Option<&OsStr>) -> Res<(u64, FileAttr)> {
        let pfd = self.fd(parent)?;
        let fd = nix::fcntl::openat(pfd, name, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty()).map_err(errno)?;
        let s = nix::sys::stat::fstat(&fd).map_err(errno)?;
        let id = self.add(&s, 0);
        if let Some(t) = target {
            self.node_mut(id)?.target = t.to_owned();
        }
        Ok((id, self.looked_up(id, parent, name, fd)?))
    }

    fn reopen(&self, id: u64) -> Res<File> {
        let fd = self.fd(id)?;
        std::fs::OpenOptions::new().read(true).write(true).open(proc_path(fd)).map_err(ioerr)
    }

    fn stat(&self, id: u64) -> Res<FileStat> {
        nix::sys::stat::fstat(self.fd(id)?).map_err(errno)
    }
}

struct Layer {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Layer {
    /// The state, or EIO once the power is cut.
    fn st(&self) -> Res<MutexGuard<'_, State>> {
        let st = lock(&self.state);
        if st.cut {
            Err(Errno::EIO)
        } else {
            Ok(st)
        }
    }
}

fn chown_new(dir: BorrowedFd<'_>, name: &OsStr, req: &Request) -> Res<()> {
    nix::unistd::fchownat(dir, name, Some(Uid::from_raw(req.uid())), Some(Gid::from_raw(req.gid())), AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(errno)
}

fn timespec(t: Option<TimeOrNow>) -> TimeSpec {
    match t {
        None => TimeSpec::UTIME_OMIT,
        Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
        Some(TimeOrNow::SpecificTime(t)) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            TimeSpec::new(d.as_secs() as i64, d.subsec_nanos() as i64)
        }
    }
}

macro_rules! reply {
    ($reply:expr, $res:expr, |$v:pat_param| $ok:expr) => {
        match $res {
            Ok($v) => $ok,
            Err(e) => $reply.error(e),
        }
    };
}

impl Filesystem for Layer {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let res = self.st().and_then(|mut st| {
            let parent = st.id(parent)?;
            Ok(st.lookup(parent, name)?.1)
        });
        reply!(reply, res, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut st = lock(&self.state);
        let Ok(id) = st.id(ino) else { return };
        if let Some(n) = st.nodes.get_mut(&id) {
            n.nlookup = n.nlookup.saturating_sub(nlookup);
            if n.nlookup == 0 && id != ROOT {
                n.fd = None;
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let res = self.st().and_then(|st| {
            let id = st.id(ino)?;
            let s = match fh.and_then(|fh| st.handles.get(&fh.0)) {
                Some(Handle::File { file, .. }) => nix::sys::stat::fstat(file).map_err(errno)?,
                _ => st.stat(id)?,
            };
            st.attr(id, &s)
        });
        reply!(reply, res, |a| reply.attr(&TTL, &a));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let res = self.st().and_then(|mut st| {
            let id = st.id(ino)?;
            let kind = st.node(id)?.kind;
            if let Some(size) = size {
                let file = match fh.and_then(|fh| st.handles.get(&fh.0)) {
                    Some(Handle::File { file, .. }) => file.try_clone().map_err(ioerr)?,
                    _ => st.reopen(id)?,
                };
                let cur = file.metadata().map_err(ioerr)?.len();
                if size < cur {
                    st.node_mut(id)?.save(&file, size, cur)?;
                }
                file.set_len(size).map_err(ioerr)?;
            }
            if kind != Kind::Symlink {
                let path = proc_path(st.fd(id)?);
                if let Some(mode) = mode {
                    nix::sys::stat::fchmodat(AT_FDCWD, &path, Mode::from_bits_truncate(mode & 0o7777), FchmodatFlags::FollowSymlink)
                        .map_err(errno)?;
                }
                if atime.is_some() || mtime.is_some() {
                    nix::sys::stat::utimensat(AT_FDCWD, &path, &timespec(atime), &timespec(mtime), UtimensatFlags::FollowSymlink)
                        .map_err(errno)?;
                }
            }
            if uid.is_some() || gid.is_some() {
                nix::unistd::fchownat(st.fd(id)?, "", uid.map(Uid::from_raw), gid.map(Gid::from_raw), AtFlags::AT_EMPTY_PATH)
                    .map_err(errno)?;
            }
            st.attr(id, &st.stat(id)?)
        });
        reply!(reply, res, |a| reply.attr(&TTL, &a));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let res = self.st().and_then(|st| nix::fcntl::readlinkat(st.fd(st.id(ino)?)?, "").map_err(errno));
        reply!(reply, res, |t| reply.data(t.as_bytes()));
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, _rdev: u32, reply: ReplyEntry) {
        // Regular files only (PostgreSQL makes no other kind).
        let res = self.st().and_then(|mut st| {
            if mode & libc::S_IFMT != libc::S_IFREG {
                return Err(Errno::EPERM);
            }
            let parent = st.id(parent)?;
            let pfd = st.fd(parent)?;
            let f = nix::fcntl::openat(pfd, name, OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::from_bits_truncate(mode & 0o7777))
                .map_err(errno)?;
            drop(f);
            chown_new(pfd, name, req)?;
            Ok(st.made(parent, name, None)?.1)
        });
        reply!(reply, res, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let res = self.st().and_then(|mut st| {
            let parent = st.id(parent)?;
            let pfd = st.fd(parent)?;
            nix::sys::stat::mkdirat(pfd, name, Mode::from_bits_truncate(mode & 0o7777)).map_err(errno)?;
            chown_new(pfd, name, req)?;
            Ok(st.made(parent, name, None)?.1)
        });
        reply!(reply, res, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.st().and_then(|mut st| {
            let parent = st.id(parent)?;
            st.keep_if_durable(parent, name)?;
            nix::unistd::unlinkat(st.fd(parent)?, name, UnlinkatFlags::NoRemoveDir).map_err(errno)
        });
        reply!(reply, res, |_| reply.ok());
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.st().and_then(|st| nix::unistd::unlinkat(st.fd(st.id(parent)?)?, name, UnlinkatFlags::RemoveDir).map_err(errno));
        reply!(reply, res, |_| reply.ok());
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let res = self.st().and_then(|mut st| {
            let parent = st.id(parent)?;
            let pfd = st.fd(parent)?;
            nix::unistd::symlinkat(target, pfd, link_name).map_err(errno)?;
            chown_new(pfd, link_name, req)?;
            Ok(st.made(parent, link_name, Some(target.as_os_str()))?.1)
        });
        reply!(reply, res, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn rename(&self, _req: &Request, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr, flags: RenameFlags, reply: ReplyEmpty) {
        let res = self.st().and_then(|mut st| {
            let (parent, newparent) = (st.id(parent)?, st.id(newparent)?);
            let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
            if !exchange {
                st.keep_if_durable(newparent, newname)?;
            }
            nix::fcntl::renameat2(
                st.fd(parent)?,
                name,
                st.fd(newparent)?,
                newname,
                nix::fcntl::RenameFlags::from_bits_truncate(flags.bits()),
            )
            .map_err(errno)?;
            let mut moved = vec![(newparent, newname)];
            if exchange {
                moved.push((parent, name));
            }
            for (dir, n) in moved {
                let s = nix::sys::stat::fstatat(st.fd(dir)?, n, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(errno)?;
                if let Some(&id) = st.by_ino.get(&s.st_ino) {
                    st.node_mut(id)?.name = Some((dir, n.to_owned()));
                }
            }
            Ok(())
        });
        reply!(reply, res, |_| reply.ok());
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let res = self.st().and_then(|mut st| {
            let (id, newparent) = (st.id(ino)?, st.id(newparent)?);
            nix::unistd::linkat(st.fd(id)?, "", st.fd(newparent)?, newname, AtFlags::AT_EMPTY_PATH).map_err(errno)?;
            let fd = nix::fcntl::openat(st.fd(newparent)?, newname, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(errno)?;
            st.looked_up(id, newparent, newname, fd)
        });
        reply!(reply, res, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let res = self.st().and_then(|mut st| {
            let id = st.id(ino)?;
            if st.node(id)?.kind != Kind::File {
                return Err(Errno::EINVAL);
            }
            let file = st.reopen(id)?;
            if flags.0 & libc::O_TRUNC != 0 {
                let cur = file.metadata().map_err(ioerr)?.len();
                st.node_mut(id)?.save(&file, 0, cur)?;
                file.set_len(0).map_err(ioerr)?;
            }
            Ok(st.new_fh(Handle::File { file, node: id, sync: flags.0 & libc::O_DSYNC != 0 }))
        });
        reply!(reply, res, |fh| reply.opened(FileHandle(fh), FopenFlags::empty()));
    }

    fn read(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags, _lock: Option<LockOwner>, reply: ReplyData) {
        let res = self.st().and_then(|st| match st.handles.get(&fh.0) {
            Some(Handle::File { file, .. }) => {
                let mut buf = vec![0u8; size as usize];
                let n = read_full_at(file, &mut buf, offset).map_err(ioerr)?;
                buf.truncate(n);
                Ok(buf)
            }
            _ => Err(Errno::EBADF),
        });
        reply!(reply, res, |b| reply.data(&b));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let res = self.st().and_then(|mut st| {
            let st = &mut *st;
            let Some(Handle::File { file, node, sync }) = st.handles.get(&fh.0) else { return Err(Errno::EBADF) };
            let (id, sync) = (*node, *sync);
            let file = file.try_clone().map_err(ioerr)?;
            st.node_mut(id)?.save(&file, offset, offset + data.len() as u64)?;
            file.write_all_at(data, offset).map_err(ioerr)?;
            if sync {
                st.sync_file(id, &file)?;
            }
            Ok(data.len() as u32)
        });
        reply!(reply, res, |n| reply.written(n));
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, _lock: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        lock(&self.state).handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let res = self.st().and_then(|mut st| {
            let id = st.id(ino)?;
            let file = match st.handles.get(&fh.0) {
                Some(Handle::File { file, .. }) => file.try_clone().map_err(ioerr)?,
                _ => st.reopen(id)?,
            };
            st.sync_file(id, &file)
        });
        reply!(reply, res, |_| reply.ok());
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let res = self.st().and_then(|mut st| {
            let id = st.id(ino)?;
            let up = st.node(id)?.name.as_ref().map(|(p, _)| *p).unwrap_or(ROOT);
            let up = if up == ROOT { ROOT } else { st.node(up)?.ino };
            let mut entries = vec![(ino.0, FileType::Directory, OsString::from(".")), (up, FileType::Directory, OsString::from(".."))];
            let dfd = st.fd(id)?;
            let mut d = Dir::openat(dfd, ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).map_err(errno)?;
            for e in d.iter() {
                let e = e.map_err(errno)?;
                let name = OsStr::from_bytes(e.file_name().to_bytes()).to_owned();
                if name == "." || name == ".." {
                    continue;
                }
                let kind = match e.file_type() {
                    Some(Type::Directory) => FileType::Directory,
                    Some(Type::File) => FileType::RegularFile,
                    Some(Type::Symlink) => FileType::Symlink,
                    Some(Type::Fifo) => FileType::NamedPipe,
                    Some(Type::Socket) => FileType::Socket,
                    Some(Type::CharacterDevice) => FileType::CharDevice,
                    Some(Type::BlockDevice) => FileType::BlockDevice,
                    None => nix::sys::stat::fstatat(dfd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW).map(|s| ftype(s.st_mode)).map_err(errno)?,
                };
                entries.push((e.ino(), kind, name));
            }
            drop(d);
            Ok(st.new_fh(Handle::Dir { entries }))
        });
        reply!(reply, res, |fh| reply.opened(FileHandle(fh), FopenFlags::empty()));
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let st = match self.st() {
            Ok(st) => st,
            Err(e) => return reply.error(e),
        };
        let Some(Handle::Dir { entries }) = st.handles.get(&fh.0) else { return reply.error(Errno::EBADF) };
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        lock(&self.state).handles.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let res = self.st().and_then(|mut st| {
            let id = st.id(ino)?;
            st.sync_dir(id)
        });
        reply!(reply, res, |_| reply.ok());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let res = self.st().and_then(|st| nix::sys::statvfs::fstatvfs(st.fd(ROOT)?).map_err(errno));
        reply!(reply, res, |s| reply.statfs(
            s.blocks(),
            s.blocks_free(),
            s.blocks_available(),
            s.files(),
            s.files_free(),
            s.block_size() as u32,
            s.name_max() as u32,
            s.fragment_size() as u32
        ));
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, flags: i32, reply: ReplyCreate) {
        let res = self.st().and_then(|mut st| {
            let parent = st.id(parent)?;
            let pfd = st.fd(parent)?;
            let exists = nix::sys::stat::fstatat(pfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok();
            let (id, a, file) = if exists {
                if flags & libc::O_EXCL != 0 {
                    return Err(Errno::EEXIST);
                }
                let (id, a) = st.lookup(parent, name)?;
                let file = st.reopen(id)?;
                if flags & libc::O_TRUNC != 0 {
                    let cur = file.metadata().map_err(ioerr)?.len();
                    st.node_mut(id)?.save(&file, 0, cur)?;
                    file.set_len(0).map_err(ioerr)?;
                }
                (id, a, file)
            } else {
                let fd = nix::fcntl::openat(pfd, name, OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::from_bits_truncate(mode & 0o7777))
                    .map_err(errno)?;
                chown_new(pfd, name, req)?;
                let (id, a) = st.made(parent, name, None)?;
                (id, a, File::from(fd))
            };
            let fh = st.new_fh(Handle::File { file, node: id, sync: flags & libc::O_DSYNC != 0 });
            Ok((a, fh))
        });
        reply!(reply, res, |(a, fh)| reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty()));
    }

    fn fallocate(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        let res = self.st().and_then(|mut st| {
            let Some(Handle::File { file, node, .. }) = st.handles.get(&fh.0) else { return Err(Errno::EBADF) };
            let (id, file) = (*node, file.try_clone().map_err(ioerr)?);
            // Plain allocation changes no data; punching, zeroing, collapsing and inserting do.
            if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
                let cur = file.metadata().map_err(ioerr)?.len();
                st.node_mut(id)?.save(&file, offset, cur.max(offset + length))?;
            }
            nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::from_bits_truncate(mode), offset as i64, length as i64).map_err(errno)
        });
        reply!(reply, res, |_| reply.ok());
    }
}

/// What a cut took back.
#[derive(Debug, Default)]
pub struct Report {
    /// Files whose data or size went back to their last fsync.
    pub files_reverted: usize,
    /// Durable names that were gone or named something else before the cut.
    pub names_restored: usize,
    /// Names that were not durable.
    pub names_dropped: usize,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} files back to their last fsync, {} durable names brought back, {} names not durable dropped",
            self.files_reverted, self.names_restored, self.names_dropped
        )
    }
}

fn sibling(backing: &Path, what: &str) -> PathBuf {
    let mut name = backing.file_name().unwrap_or_default().to_owned();
    name.push(format!(".lazyfs-{what}"));
    backing.with_file_name(name)
}

/// A mounted layer. Dropped without `unmount_to_durable`, it cuts and unmounts (lazily if
/// something still holds it) and leaves the backing directory as it was live.
pub struct LazyFs {
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    attic: PathBuf,
}

impl LazyFs {
    /// Mount a layer over `mountpoint`, passing through to `backing` (a directory on the same
    /// filesystem as its siblings `<backing>.lazyfs-*`, which the layer uses). Needs root.
    pub fn mount(backing: &Path, mountpoint: &Path) -> LazyFs {
        // One O_PATH descriptor per node the kernel knows: a data directory has thousands.
        if let Ok((_, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
        }
        let attic = sibling(backing, "attic");
        let _ = std::fs::remove_dir_all(&attic);
        std::fs::create_dir(&attic).unwrap_or_else(|e| panic!("lazyfs: cannot make {}: {e}", attic.display()));
        let open_dir = |p: &Path| {
            nix::fcntl::open(p, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
                .unwrap_or_else(|e| panic!("lazyfs: cannot open {}: {e}", p.display()))
        };
        let root_fd = open_dir(backing);
        let s = nix::sys::stat::fstat(&root_fd).unwrap();
        let mut st = State {
            cut: false,
            nodes: HashMap::new(),
            by_ino: HashMap::new(),
            next_node: ROOT,
            handles: HashMap::new(),
            next_fh: 1,
            attic: open_dir(&attic),
        };
        let root = st.add(&s, 0);
        assert_eq!(root, ROOT);
        {
            let r = st.nodes.get_mut(&ROOT).unwrap();
            r.durable_links = 1;
            r.nlookup = 1;
        }
        st.walk(&root_fd, ROOT).unwrap_or_else(|e| panic!("lazyfs: cannot read {}: {e}", backing.display()));
        st.nodes.get_mut(&ROOT).unwrap().fd = Some(root_fd);
        let state = Arc::new(Mutex::new(st));
        let mut config = Config::default();
        // allow_other + default_permissions: the server runs as postgres, and the kernel checks
        // permissions against the backing files' owners and modes.
        config.mount_options = vec![MountOption::FSName(FSNAME.into()), MountOption::DefaultPermissions, MountOption::RW];
        config.acl = SessionACL::All;
        let session = fuser::spawn_mount(Layer { state: state.clone() }, mountpoint, &config).unwrap_or_else(|e| {
            panic!(
                "lazyfs: mounting FUSE on {} was refused ({e}): this test needs root and a usable /dev/fuse; it does not skip",
                mountpoint.display()
            )
        });
        LazyFs { state, session: Some(session), backing: backing.to_path_buf(), mountpoint: mountpoint.to_path_buf(), attic }
    }

    /// The power cut: from now on every request fails with EIO and nothing more becomes
    /// durable. Kill every process using the mount next, then `unmount_to_durable`.
    pub fn cut(&self) {
        lock(&self.state).cut = true;
    }

    /// Unmount, retrying while something still holds the mount (for up to `wait`); or say
    /// what holds it.
    fn unmount(&mut self, wait: Duration) -> Result<(), String> {
        let Some(session) = self.session.take() else { return Ok(()) };
        let deadline = Instant::now() + wait;
        loop {
            match nix::mount::umount(&self.mountpoint) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) => break,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => {
                    // Still busy: detach it so that it goes once its last user does, and leave
                    // the session's thread to end with it.
                    let holders = users(&self.mountpoint);
                    let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
                    std::mem::forget(session);
                    return Err(holders);
                }
            }
        }
        let _ = session.join();
        Ok(())
    }

    /// After `cut` and after every process that used the mount is gone: unmount, and make the
    /// backing directory hold exactly the durable state. Returns what the cut took back.
    pub fn unmount_to_durable(mut self) -> Report {
        self.cut();
        if let Err(holders) = self.unmount(Duration::from_secs(10)) {
            panic!("lazyfs: {} was still in use 10 s after the cut, by {holders}", self.mountpoint.display());
        }
        let st = lock(&self.state);
        rebuild(&st, &self.backing, &self.attic).unwrap_or_else(|e| panic!("lazyfs: rebuilding {} failed: {e}", self.backing.display()))
    }
}

/// The processes with a file, or their working directory, under `dir`: "pid (comm)", for a
/// message.
fn users(dir: &Path) -> String {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let under = |p: PathBuf| std::fs::read_link(p).map(|l| l.starts_with(dir)).unwrap_or(false);
        let fds = std::fs::read_dir(e.path().join("fd")).into_iter().flatten().flatten().any(|fd| under(fd.path()));
        if fds || under(e.path().join("cwd")) {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            out.push(format!("{pid} ({})", comm.trim()));
        }
    }
    if out.is_empty() {
        "no process found".into()
    } else {
        out.join(", ")
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if self.session.is_some() {
            self.cut();
            let _ = self.unmount(Duration::from_secs(5));
        }
    }
}

/// Every entry under `dir`, by relative path: (inode number, is a directory).
fn live_tree(dir: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, (u64, bool)>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        let r = rel.join(e.file_name());
        out.insert(r.clone(), (m.ino(), m.is_dir()));
        if m.is_dir() {
            live_tree(&e.path(), &r, out)?;
        }
    }
    Ok(())
}

/// Turn the backing directory into the durable tree, in place: as after a real power cut,
/// a directory or file that survives keeps its inode (the store knows a slot by the inode of
/// its directory). Every live directory but the top is moved aside and emptied, its files
/// moved aside too; then the durable tree is put together again from them, the attic, and
/// new directories where a durable one is gone.
fn rebuild(st: &State, backing: &Path, attic: &Path) -> std::io::Result<Report> {
    let mut live = BTreeMap::new();
    live_tree(backing, Path::new(""), &mut live)?;
    let work = sibling(backing, "work");
    let _ = std::fs::remove_dir_all(&work);
    let (dirs, files) = (work.join("dirs"), work.join("files"));
    std::fs::create_dir_all(&dirs)?;
    std::fs::create_dir_all(&files)?;
    // Directories aside, deepest first (a parent moves once its subdirectories are out).
    let mut by_depth: Vec<(&PathBuf, u64)> = live.iter().filter(|(_, (_, d))| *d).map(|(p, (i, _))| (p, *i)).collect();
    by_depth.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (p, ino) in &by_depth {
        std::fs::rename(backing.join(p), dirs.join(ino.to_string()))?;
    }
    // Then what is left in them, the files, symlinks and the rest.
    let mut source: HashMap<u64, PathBuf> = HashMap::new();
    let mut n = 0u64;
    for d in std::iter::once(backing.to_path_buf()).chain(by_depth.iter().map(|(_, ino)| dirs.join(ino.to_string()))) {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ino = e.metadata()?.ino();
            let to = files.join(n.to_string());
            n += 1;
            std::fs::rename(e.path(), &to)?;
            source.entry(ino).or_insert(to);
        }
    }
    let mut durable = BTreeMap::new();
    let mut report = Report::default();
    let mut restored = HashSet::new();
    let mut put = Put { st, dirs: &dirs, source: &source, attic, restored: &mut restored, durable: &mut durable, report: &mut report };
    put.dir(ROOT, backing, Path::new(""))?;
    for (p, ino) in &durable {
        if live.get(p).map(|(i, _)| i) != Some(ino) {
            report.names_restored += 1;
        }
    }
    report.names_dropped = live.keys().filter(|p| !durable.contains_key(*p)).count();
    std::fs::remove_dir_all(&work)?;
    let _ = std::fs::remove_dir_all(attic);
    Ok(report)
}

struct Put<'a> {
    st: &'a State,
    dirs: &'a Path,
    source: &'a HashMap<u64, PathBuf>,
    attic: &'a Path,
    restored: &'a mut HashSet<u64>,
    durable: &'a mut BTreeMap<PathBuf, u64>,
    report: &'a mut Report,
}

impl Put<'_> {
    /// Fill the (empty) directory at `path` with node `dir`'s durable entries.
    fn dir(&mut self, dir: u64, path: &Path, rel: &Path) -> std::io::Result<()> {
        let lost = |what: &str, p: &Path| std::io::Error::other(format!("lazyfs: the durable {what} {} is nowhere", p.display()));
        for (name, &id) in &self.st.nodes[&dir].entries {
            let n = &self.st.nodes[&id];
            let (p, r) = (path.join(name), rel.join(name));
            self.durable.insert(r.clone(), n.ino);
            // The inode still is this node's (backing inode numbers of gone files are reused).
            let own = self.st.by_ino.get(&n.ino) == Some(&id);
            match n.kind {
                Kind::Dir => {
                    let aside = self.dirs.join(n.ino.to_string());
                    if own && aside.is_dir() {
                        std::fs::rename(&aside, &p)?;
                    } else {
                        std::fs::create_dir(&p)?;
                        std::os::unix::fs::chown(&p, Some(n.uid), Some(n.gid))?;
                        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(n.mode))?;
                    }
                    self.dir(id, &p, &r)?;
                }
                Kind::File => {
                    let src = if n.in_attic {
                        self.attic.join(id.to_string())
                    } else {
                        self.source.get(&n.ino).filter(|_| own).cloned().ok_or_else(|| lost("file", &r))?
                    };
                    if self.restored.insert(id) {
                        let f = std::fs::OpenOptions::new().read(true).write(true).open(&src)?;
                        if !n.saved.is_empty() || f.metadata()?.len() != n.durable_size {
                            self.report.files_reverted += 1;
                        }
                        for (b, data) in &n.saved {
                            f.write_all_at(data, b * BLOCK)?;
                        }
                        f.set_len(n.durable_size)?;
                    }
                    std::fs::hard_link(&src, &p)?;
                }
                Kind::Symlink => {
                    std::os::unix::fs::symlink(&n.target, &p)?;
                    std::os::unix::fs::lchown(&p, Some(n.uid), Some(n.gid))?;
                }
                // Not made by PostgreSQL; what it was is not kept.
                Kind::Other => {}
            }
        }
        Ok(())
    }
}

/// The layer's own test: what it keeps and what it discards at a cut, one case per
/// directory (an fsync of a directory makes all its entries durable at once). Not named
/// `tests`: scripts/suite runs the lib's tests by that name before the integration suites.
#[cfg(test)]
mod self_check {
    use super::LazyFs;
    use std::fs::{self, File, OpenOptions};
    use std::io::{ErrorKind, Write};
    use std::path::{Path, PathBuf};

    fn write(p: &Path, data: &str) -> File {
        let mut f = File::create(p).unwrap();
        f.write_all(data.as_bytes()).unwrap();
        f
    }

    fn fsync_dir(p: &Path) {
        File::open(p).unwrap().sync_all().unwrap();
    }

    fn read(p: &Path) -> Option<String> {
        match fs::read_to_string(p) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => panic!("{}: {e}", p.display()),
        }
    }

    #[test]
    fn a_power_cut_keeps_what_was_synced_and_discards_the_rest() {
        let top = std::env::temp_dir().join(format!("pgsg-lazyfs-self-{}", std::process::id()));
        let _ = fs::remove_dir_all(&top);
        let (disk, mnt) = (top.join("disk"), top.join("mnt"));
        fs::create_dir_all(&mnt).unwrap();
        // Durable before the mount: one directory per case, and the files some cases change.
        for d in ["new", "append", "rename", "renamed", "over", "unlink", "unlinked", "trunc", "mkdir", "newdir", "twice"] {
            fs::create_dir_all(disk.join(d)).unwrap();
        }
        for f in ["append/f", "over/target", "unlink/f", "unlinked/f", "trunc/f", "twice/f"] {
            fs::write(disk.join(f), "durable content").unwrap();
        }
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let inodes_before = (ino(&disk.join("append")), ino(&disk.join("append/f")), ino(&disk.join("unlink/f")));
        let lazy = LazyFs::mount(&disk, &mnt);
        let m = |p: &str| mnt.join(p);
        assert_eq!(ino(&m("append")), inodes_before.0, "stat through the layer must show the backing inode");

        // A new file not fsynced is gone; one fsynced survives whole (its name too: the file
        // is new, so its fsync makes its name durable, as on ext4).
        write(&m("new/unsynced"), "lost");
        write(&m("new/synced"), "kept").sync_all().unwrap();
        // Data written after the last fsync is lost, and so is a size change.
        {
            let mut f = OpenOptions::new().append(true).open(m("append/f")).unwrap();
            f.write_all(b" and more").unwrap();
        }
        // A rename not followed by an fsync of its directory is undone; the temp file, fsynced
        // while new, stays under its old name. With the fsync of the directory, it holds.
        write(&m("rename/x.tmp"), "new x").sync_all().unwrap();
        fs::rename(m("rename/x.tmp"), m("rename/x")).unwrap();
        write(&m("renamed/x.tmp"), "new x").sync_all().unwrap();
        fs::rename(m("renamed/x.tmp"), m("renamed/x")).unwrap();
        fsync_dir(&m("renamed"));
        // A rename over a durable file, not made durable: the old file comes back whole.
        write(&m("over/target.tmp"), "replacement").sync_all().unwrap();
        fs::rename(m("over/target.tmp"), m("over/target")).unwrap();
        // An unlink without the fsync of the directory is undone; with it, it holds.
        fs::remove_file(m("unlink/f")).unwrap();
        fs::remove_file(m("unlinked/f")).unwrap();
        fsync_dir(&m("unlinked"));
        // A truncation after the last fsync is undone.
        OpenOptions::new().write(true).open(m("trunc/f")).unwrap().set_len(3).unwrap();
        // A new directory whose parent is not fsynced is gone; a file fsynced in a new
        // directory brings the directory's name with it (it is new too).
        fs::create_dir(m("mkdir/d")).unwrap();
        fs::create_dir(m("newdir/d")).unwrap();
        write(&m("newdir/d/f"), "in a new directory").sync_all().unwrap();
        // Only the synced prefix of two writes survives.
        {
            let mut f = OpenOptions::new().write(true).open(m("twice/f")).unwrap();
            f.write_all(b"DURABLE").unwrap();
            f.sync_data().unwrap();
            f.write_all(b" CONTENT").unwrap();
        }
        // Everything reads back live before the cut.
        assert_eq!(read(&m("new/unsynced")).as_deref(), Some("lost"));
        assert_eq!(read(&m("append/f")).as_deref(), Some("durable content and more"));

        lazy.cut();
        let err = fs::read(m("append/f")).expect_err("a read after the cut must fail");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        let report = lazy.unmount_to_durable();
        eprintln!("lazyfs self-test cut: {report}");

        let d = |p: &str| -> PathBuf { disk.join(p) };
        let seen = |p: &str| read(&d(p));
        assert_eq!(seen("new/unsynced"), None, "a file never fsynced must be gone");
        assert_eq!(seen("new/synced").as_deref(), Some("kept"));
        assert_eq!(seen("append/f").as_deref(), Some("durable content"));
        assert_eq!(seen("rename/x"), None, "a rename without the directory's fsync must be undone");
        assert_eq!(seen("rename/x.tmp").as_deref(), Some("new x"));
        assert_eq!(seen("renamed/x").as_deref(), Some("new x"));
        assert_eq!(seen("renamed/x.tmp"), None);
        assert_eq!(seen("over/target").as_deref(), Some("durable content"), "the file renamed over must come back");
        assert_eq!(seen("over/target.tmp").as_deref(), Some("replacement"));
        assert_eq!(seen("unlink/f").as_deref(), Some("durable content"), "an unlink without the directory's fsync must be undone");
        assert_eq!(seen("unlinked/f"), None);
        assert_eq!(seen("trunc/f").as_deref(), Some("durable content"));
        assert!(!d("mkdir/d").exists(), "a directory made without its parent's fsync must be gone");
        assert_eq!(seen("newdir/d/f").as_deref(), Some("in a new directory"));
        assert_eq!(seen("twice/f").as_deref(), Some("DURABLE content"));
        // As after a real power cut, what survives keeps its inode (the store knows a slot by
        // the inode of its directory).
        let inodes_after = (ino(&disk.join("append")), ino(&disk.join("append/f")), ino(&disk.join("unlink/f")));
        assert_eq!(inodes_after, inodes_before, "a durable directory or file got a new inode");
        assert!(report.files_reverted >= 3 && report.names_dropped >= 3 && report.names_restored >= 2, "{report}");

        // The next mount starts from the durable state, and a second cut with nothing done
        // in between takes nothing back.
        let lazy = LazyFs::mount(&disk, &mnt);
        assert_eq!(read(&m("over/target")).as_deref(), Some("durable content"));
        lazy.cut();
        let report = lazy.unmount_to_durable();
        assert_eq!((report.files_reverted, report.names_restored, report.names_dropped), (0, 0, 0), "{report}");
        fs::remove_dir_all(&top).unwrap();
    }
}
