//! The per-node store: each server's leases, its tracking of its slots (first seen,
//! inactive since, stall, drop intent) and the warnings it has given, kept where its slots
//! are kept — in files under the data directory, loaded into shared memory at start — and
//! never in the catalogs, so that it works on a hot standby and nothing of it replicates.
//!
//! - `codec` (pure): a record and its bytes (magic, version, CRC32C, content);
//! - `file`: the durable write and the load, as slot.c does them;
//! - `shmem`: the entry array in shared memory, its hooks and locks;
//! - here: reading a copy, and serialised changes ([`change`]).
//!
//! Readers copy what they need out under the array lock (shared) and work on the copy.
//! A change runs under the writers' lock: it reads the current record, writes its file,
//! then updates shared memory. Lease calls stage their changes and apply them at commit
//! (src/xact.rs); the guard applies its own at once.

pub mod codec;
pub mod file;
pub mod ring;
pub mod shmem;

use crate::error::GuardError;
use crate::policy::{Lease, Seen};
pub use codec::{DroppedRec, IntentRec, LeaseRec, SeenRec, SlotRecord};
use pgrx::pg_sys;
use pgrx::prelude::*;

type Result<T> = std::result::Result<T, GuardError>;

/// Is the store there (the library was preloaded)?
pub fn attached() -> bool {
    shmem::shared().is_some()
}

fn shared() -> Result<shmem::Shared> {
    shmem::shared().ok_or(GuardError::NotPreloaded)
}

/// An LWLock held until dropped (also when a panic unwinds through its holder).
struct Held(*mut pg_sys::LWLock);

impl Held {
    fn take(lock: *mut pg_sys::LWLock, mode: pg_sys::LWLockMode::Type) -> Held {
        // SAFETY: a lock of our tranche in shared memory; LWLockAcquire waits without
        // raising an ERROR, and an ERROR later releases it at abort (LWLockReleaseAll).
        unsafe { pg_sys::LWLockAcquire(lock, mode) };
        Held(lock)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: release only if this process still holds it (an abort may have released
        // every LWLock already).
        unsafe {
            if pg_sys::LWLockHeldByMe(self.0) {
                pg_sys::LWLockRelease(self.0);
            }
        }
    }
}

/// What the store holds, as the pass decides on it.
#[derive(Default)]
pub struct Contents {
    pub leases: Vec<Lease>,
    pub seen: Vec<Seen>,
    /// (slot name, or '' for the node; limit word).
    pub warned: Vec<(String, String)>,
    /// Guard drops remembered for the loop rule.
    pub recent_drops: Vec<crate::policy::RecentDrop>,
}

/// The policy's view of a lease record.
pub fn policy_lease(name: &str, l: &LeaseRec) -> Lease {
    Lease {
        slot_name: name.into(),
        owner: l.owner.as_str().into(),
        leased_at: l.leased_at,
        renewed_at: l.renewed_at,
        expires_at: l.expires_at,
        max_retained: l.max_retained,
        max_inactive: l.max_inactive,
        max_age: l.max_age,
        max_xmin_age: l.max_xmin_age,
        limit_by_superuser: l.limit_by_superuser,
        adopted: l.adopted,
    }
}

/// A copy of the store (`only`: the record of one slot name).
pub fn read(only: Option<&str>) -> Result<Contents> {
    let sh = shared()?;
    let mut out = Contents::default();
    let _lock = Held::take(sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
    // SAFETY: the array lock is held shared; entries are only read.
    let entries = unsafe { sh.used() };
    out.leases.reserve(entries.len());
    out.seen.reserve(entries.len());
    for e in entries.iter().filter(|e| e.in_use() && only.is_none_or(|n| e.is(n))) {
        if e.has_lease() {
            out.leases.push(e.policy_lease());
        }
        if e.has_seen() {
            out.seen.push(e.policy_seen());
        }
        for w in e.warned_words() {
            out.warned.push((e.name().to_string(), w));
        }
        if let Some(d) = e.recent_drop() {
            out.recent_drops.push(d);
        }
    }
    if only.is_none() {
        // SAFETY: as above.
        let node = unsafe { sh.header() }.node_warned;
        for (i, w) in shmem::LIMIT_WORDS.iter().enumerate() {
            if node & (1 << i) != 0 {
                out.warned.push((String::new(), w.to_string()));
            }
        }
    }
    Ok(out)
}

/// Every record, in name order (the views).
pub fn records() -> Result<Vec<SlotRecord>> {
    let sh = shared()?;
    let mut out: Vec<SlotRecord> = {
        let _lock = Held::take(sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
        // SAFETY: the array lock is held shared.
        unsafe { sh.used() }.iter().filter(|e| e.in_use()).map(|e| e.record()).collect()
    };
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The record of one slot name.
pub fn record(name: &str) -> Result<Option<SlotRecord>> {
    let sh = shared()?;
    let _lock = Held::take(sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
    // SAFETY: the array lock is held shared.
    Ok(unsafe { sh.used() }.iter().find(|e| e.is(name)).map(|e| e.record()))
}

/// The lease of a slot, if it has one.
pub fn lease(name: &str) -> Result<Option<LeaseRec>> {
    Ok(record(name)?.and_then(|r| r.lease))
}

/// Is the guard dropping this slot (an intent made durable, the drop not yet recorded)?
pub fn dropping(name: &str) -> Result<bool> {
    Ok(record(name)?.and_then(|r| r.seen).is_some_and(|s| s.dropping.is_some()))
}

/// A change to the store, serialised with every other (see [`change`]).
pub struct Writer {
    sh: shmem::Shared,
    _lock: Held,
}

impl Writer {
    /// The current record of `name` (an empty one if the store has none).
    pub fn get(&self, name: &str) -> SlotRecord {
        let _lock = Held::take(self.sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
        // SAFETY: the array lock is held shared.
        unsafe { self.sh.used() }.iter().find(|e| e.is(name)).map(|e| e.record()).unwrap_or_else(|| SlotRecord::new(name))
    }

    /// Make `rec` the record of its name: its file is written durably (or removed, when
    /// nothing is left to keep), then shared memory follows.
    pub fn put(&mut self, rec: &SlotRecord) -> Result<()> {
        self.put_as(rec, true)
    }

    /// [`Writer::put`] for the record of a slot that was just dropped (a release): when
    /// nothing is left to keep, its file is removed without an fsync of the directory.
    /// Core's drop is durable, so a file that an operating-system crash brings back names
    /// a slot that is gone, and that lease ends quietly at the next start (load_at_startup).
    pub fn put_dropped(&mut self, rec: &SlotRecord) -> Result<()> {
        self.put_as(rec, false)
    }

    fn put_as(&mut self, rec: &SlotRecord, durable_removal: bool) -> Result<()> {
        if rec.name.is_empty() {
            return self.put_node(rec);
        }
        let index = {
            let _lock = Held::take(self.sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
            // SAFETY: the array lock is held shared; only writers (we hold the writers'
            // lock) change which entries are in use, so the index stays valid.
            let entries = unsafe { self.sh.entries() };
            let used = unsafe { self.sh.used() }.len();
            entries[..used].iter().position(|e| e.is(&rec.name)).or_else(|| entries.iter().position(|e| !e.in_use()))
        };
        // A full store makes room by forgetting the oldest recent drop (the loop rule is a
        // courtesy; a lease or the tracking of a live slot is not).
        let index = match index {
            Some(i) => Some(i),
            None if !rec.is_empty() => self.evict_a_drop()?,
            None => None,
        };
        if rec.is_empty() {
            file::remove_as(&rec.name, durable_removal).map_err(|e| io_error("remove", &rec.name, e))?;
        } else {
            if index.is_none() {
                return Err(GuardError::StoreFull { capacity: self.sh.capacity() });
            }
            file::write(rec).map_err(|e| io_error("write", &rec.name, e))?;
        }
        if let Some(i) = index {
            let _lock = Held::take(self.sh.array_lock(), pg_sys::LWLockMode::LW_EXCLUSIVE);
            // SAFETY: the array lock is held exclusive.
            let e = &mut unsafe { self.sh.entries() }[i];
            if rec.is_empty() {
                if e.is(&rec.name) {
                    // SAFETY: Entry is plain old data; all zeroes is an unused entry. The
                    // array lock is held exclusive.
                    unsafe {
                        *e = std::mem::zeroed();
                        self.sh.note_cleared();
                    }
                }
            } else {
                e.set(rec);
                // SAFETY: the array lock is held exclusive.
                unsafe { self.sh.note_set(i) };
            }
        }
        Ok(())
    }

    /// Forget the oldest record that only remembers a drop: its file goes, and its entry
    /// is free. `None`: there is none.
    fn evict_a_drop(&mut self) -> Result<Option<usize>> {
        let oldest = {
            let _lock = Held::take(self.sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
            // SAFETY: the array lock is held shared; only writers (we hold the writers'
            // lock) change which entries are in use.
            let entries = unsafe { self.sh.used() };
            entries
                .iter()
                .enumerate()
                .filter_map(|(i, e)| e.only_a_drop().map(|at| (at, i, e.name().to_string())))
                .min()
        };
        let Some((_, i, name)) = oldest else { return Ok(None) };
        file::remove(&name).map_err(|e| io_error("remove", &name, e))?;
        let _lock = Held::take(self.sh.array_lock(), pg_sys::LWLockMode::LW_EXCLUSIVE);
        // SAFETY: the array lock is held exclusive; Entry is plain old data and all zeroes
        // is an unused entry.
        unsafe {
            self.sh.entries()[i] = std::mem::zeroed();
            self.sh.note_cleared();
        }
        Ok(Some(i))
    }

    fn put_node(&mut self, rec: &SlotRecord) -> Result<()> {
        if rec.is_empty() {
            file::remove("").map_err(|e| io_error("remove", "", e))?;
        } else {
            file::write(rec).map_err(|e| io_error("write", "", e))?;
        }
        let _lock = Held::take(self.sh.array_lock(), pg_sys::LWLockMode::LW_EXCLUSIVE);
        // SAFETY: the array lock is held exclusive.
        unsafe { self.sh.header() }.node_warned = shmem::words_to_bits(&rec.warned);
        Ok(())
    }

    /// The node's own record (warnings about the node as a whole).
    pub fn node(&self) -> SlotRecord {
        let _lock = Held::take(self.sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
        // SAFETY: the array lock is held shared.
        let bits = unsafe { self.sh.header() }.node_warned;
        let warned = shmem::LIMIT_WORDS.iter().enumerate().filter(|(i, _)| bits & (1 << i) != 0).map(|(_, w)| w.to_string()).collect();
        SlotRecord { warned, ..SlotRecord::new("") }
    }
}

fn io_error(what: &str, name: &str, e: std::io::Error) -> GuardError {
    GuardError::StoreIo(format!("could not {what} file \"{}\": {e}", file::record_path(name).display()))
}

/// Run `f` with the writers' lock: every change to the store goes through here, one at a
/// time. Never called while a user's transaction waits between statements: lease calls
/// apply their changes at commit, and the guard holds it only for its own change.
pub fn change<T>(f: impl FnOnce(&mut Writer) -> Result<T>) -> Result<T> {
    let sh = shared()?;
    let lock = Held::take(sh.write_lock(), pg_sys::LWLockMode::LW_EXCLUSIVE);
    let mut w = Writer { sh, _lock: lock };
    f(&mut w)
}

/// Change the record of one name.
pub fn update(name: &str, f: impl FnOnce(&mut SlotRecord)) -> Result<()> {
    change(|w| {
        let mut rec = w.get(name);
        let before = rec.clone();
        f(&mut rec);
        if rec != before {
            w.put(&rec)?;
        }
        Ok(())
    })
}

/// Add an event to the per-node ring (where a standby keeps its events); returns its id.
pub fn ring_push(e: ring::RingEvent) -> Result<i64> {
    change(|_| {
        let mut r = ring::load().unwrap_or_else(|why| {
            warning!("pgslotguard: {why}");
            ring::Ring::default()
        });
        let id = r.push(e);
        ring::save(&r).map_err(|e| GuardError::StoreIo(format!("could not write file \"{}\": {e}", ring::RING_FILE)))?;
        Ok(id)
    })
}

/// The events of the per-node ring, oldest first.
pub fn ring_events() -> Result<Vec<ring::RingEvent>> {
    ring::load().map(|r| r.events).map_err(GuardError::StoreIo)
}

/// Load the files into shared memory: in the postmaster at startup (and after a crash
/// restart), before any backend runs. Never fails: what cannot be read is set aside and
/// named in a WARNING, and its slot is not leased; a lease whose slot is not on this
/// server ends here, with one LOG line for all of them.
pub(crate) fn load_at_startup() {
    let Some(sh) = shmem::shared() else { return };
    let loaded = file::load();
    for (path, moved, why) in &loaded.damaged {
        warning!(
            "pgslotguard: store file \"{path}\" is damaged ({why}); moved it to \"{moved}\": its slot is not leased, and the guard does not act on what the file said"
        );
    }
    for (path, why) in &loaded.unreadable {
        warning!("pgslotguard: could not read store file \"{path}\": {why}; its slot is not leased");
    }
    let mut ended = vec![];
    let mut kept = 0usize;
    let mut over = vec![];
    // SAFETY: the postmaster, before any other process is attached: no lock is needed.
    let entries = unsafe { sh.entries() };
    let mut next = 0usize;
    for mut rec in loaded.records {
        if rec.name.is_empty() {
            // SAFETY: as above.
            unsafe { sh.header() }.node_warned = shmem::words_to_bits(&rec.warned);
            continue;
        }
        let dropping = rec.seen.as_ref().is_some_and(|s| s.dropping.is_some());
        if let Some(l) = &rec.lease {
            let ino = file::slot_dir_ino(&rec.name);
            let same = ino.is_some() && (l.slot_ino.is_none() || l.slot_ino == ino);
            if !same && !dropping {
                rec.lease = None;
                let r = if rec.is_empty() { file::remove(&rec.name) } else { file::write(&rec) };
                if let Err(e) = r {
                    warning!("pgslotguard: could not rewrite store file \"{}\": {e}", file::record_path(&rec.name).display());
                }
                ended.push(rec.name.clone());
                if rec.is_empty() {
                    continue;
                }
            }
        }
        if next >= entries.len() {
            over.push(rec.name.clone());
            continue;
        }
        kept += rec.lease.is_some() as usize;
        entries[next].set(&rec);
        // SAFETY: as above.
        unsafe { sh.note_set(next) };
        next += 1;
    }
    if !ended.is_empty() {
        log!(
            "pgslotguard: ended {} lease(s) whose replication slot is not on this server: {} (the data directory was copied from another server, or the slot was dropped while the server was down)",
            ended.len(),
            ended.join(", ")
        );
    }
    if !over.is_empty() {
        warning!(
            "pgslotguard: {} store record(s) do not fit in shared memory (room for {}, twice max_replication_slots) and are not loaded: {}",
            over.len(),
            entries.len(),
            over.join(", ")
        );
    }
    if kept > 0 {
        debug1!("pgslotguard: loaded {kept} lease(s) from {}", file::DIR);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_limit_word_has_a_bit() {
        use crate::policy::Breach;
        for b in [Breach::Expired, Breach::Retained, Breach::Age, Breach::Inactive, Breach::Space, Breach::Lost, Breach::Stalled, Breach::Xmin] {
            assert!(super::shmem::LIMIT_WORDS.contains(&b.limit_word()), "{}", b.limit_word());
        }
    }
}
