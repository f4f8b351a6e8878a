//! The per-node store: each server's leases, the changes to them not yet settled, its
//! tracking of its slots (first seen, inactive since, stall, drop intent) and the warnings
//! it has given, kept where its slots are kept — in files under the data directory, loaded
//! into shared memory at start — and never in the catalogs, so that it works on a hot
//! standby and nothing of it replicates.
//!
//! - `codec` (pure): a record and its bytes (magic, version, CRC32C, content);
//! - `file`: the durable write and the load, as slot.c does them;
//! - `shmem`: the entry array in shared memory, its hooks and locks;
//! - `ring`: a standby's events;
//! - here: reading a copy (with each pending change resolved from its transaction's fate,
//!   `txid`), and serialised changes ([`change`]).
//!
//! The transitions of a lease's slot — pending, leased, ending, gone — are made by
//! src/machine.rs; this module only keeps what it writes.

pub mod codec;
pub mod file;
pub mod ring;
pub mod shmem;

use crate::error::GuardError;
use crate::policy::{Lease, Seen};
use crate::txid::{self, Fate};
pub use codec::{DroppedRec, Identity, IntentRec, LeaseRec, LocalXact, PendingRec, SeenRec, SlotRecord};
pub use file::Durability;
use pgrx::pg_sys;
use pgrx::prelude::*;
pub use shmem::PendingState;

type Result<T> = std::result::Result<T, GuardError>;

/// Is the store there (the library was preloaded)?
pub fn attached() -> bool {
    shmem::shared().is_some()
}

fn shared() -> Result<shmem::Shared> {
    shmem::shared().ok_or(GuardError::NotPreloaded)
}

/// This life of the store's shared memory (`txid::local_fate`).
pub fn gen() -> i64 {
    shmem::shared().map_or(0, |s| s.gen())
}

/// How many records that matter (a lease, a change in flight, a drop intent) could not be
/// loaded at start: while any is out, the store is not whole and the guard does not act.
pub fn not_loaded() -> u32 {
    shmem::shared().map_or(0, |s| s.not_loaded())
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

/// A pending change as a pass sees it: what it is, and where its transaction stands.
#[derive(Debug, Clone)]
pub struct Pending {
    pub name: String,
    pub rec: PendingRec,
    pub state: PendingState,
    pub fate: Fate,
    /// The committed lease the change applies to, if there is one.
    pub committed: Option<Lease>,
}

/// What the store holds, as the pass decides on it: each lease as its transactions'
/// fates leave it ([`resolve`]).
#[derive(Default)]
pub struct Contents {
    pub leases: Vec<Lease>,
    pub seen: Vec<Seen>,
    /// (slot name, or '' for the node; limit word).
    pub warned: Vec<(String, String)>,
    /// Guard drops remembered for the loop rule.
    pub recent_drops: Vec<crate::policy::RecentDrop>,
    /// Every change in flight.
    pub pending: Vec<Pending>,
}

/// The lease a reader sees, given the committed lease, the pending change and its fate:
/// - its own transaction's change, or one that committed: the lease as the change leaves it;
/// - another transaction's change still running, or one that did not commit: the
///   committed lease.
pub fn resolve<T: Clone>(committed: Option<T>, pending: Option<(&PendingRec, Fate)>, pending_lease: Option<T>) -> Option<T> {
    match pending {
        None => committed,
        Some((_, Fate::Mine | Fate::Committed)) => pending_lease,
        Some((_, Fate::Running | Fate::Aborted)) => committed,
    }
}

/// The lease the guard judges: as [`resolve`], except that a new lease whose slot a running
/// transaction made is judged as the lease it will be (its slot pins WAL meanwhile, and an
/// open transaction must not hold it out of every limit; if the guard drops it, the
/// transaction fails at its commit).
pub fn judged<T: Clone>(committed: Option<T>, pending: Option<(&PendingRec, Fate)>, pending_lease: Option<T>) -> Option<T> {
    match pending {
        Some((p, Fate::Running)) if p.made_slot => pending_lease,
        _ => resolve(committed, pending, pending_lease),
    }
}

/// The policy's view of a lease record.
pub fn policy_lease(name: &str, l: &LeaseRec) -> Lease {
    Lease {
        slot_name: name.into(),
        owner: l.owner.as_str().into(),
        owner_oid: l.owner_oid.unwrap_or(0),
        leased_at: l.leased_at,
        born_at: l.born(),
        renewed_at: l.renewed_at,
        expires_at: l.expires_at,
        max_retained: l.max_retained,
        max_inactive: l.max_inactive,
        max_age: l.max_age,
        max_xmin_age: l.max_xmin_age,
        limit_by_superuser: l.limit_by_superuser,
        adopted: l.adopted,
        logical: l.logical,
        while_active: l.while_active,
    }
}

/// A copy of the store (`only`: the record of one slot name), each lease as the guard
/// judges it ([`judged`]).
pub fn read(only: Option<&str>) -> Result<Contents> {
    let sh = shared()?;
    let gen = sh.gen();
    let mut out = Contents::default();
    // Entries with a change in flight: resolved after the lock is released (the fate of a
    // transaction is looked up in the proc array and the commit log).
    let mut in_flight: Vec<(String, PendingRec, PendingState, Option<Lease>, Option<Lease>)> = vec![];
    {
        let _lock = Held::take(sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
        // SAFETY: the array lock is held shared; entries are only read.
        let entries = unsafe { sh.used() };
        out.leases.reserve(entries.len());
        out.seen.reserve(entries.len());
        for e in entries.iter().filter(|e| e.in_use() && only.is_none_or(|n| e.is(n))) {
            let committed = e.has_lease().then(|| e.policy_lease());
            if e.has_pending() {
                if let Some(p) = e.pending() {
                    in_flight.push((e.name().to_string(), p, e.pending_state(), committed, e.policy_pending_lease()));
                }
            } else if let Some(l) = committed {
                out.leases.push(l);
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
    }
    for (name, rec, state, committed, pending_lease) in in_flight {
        let fate = txid::fate(&rec, gen);
        if let Some(l) = judged(committed.clone(), Some((&rec, fate)), pending_lease) {
            out.leases.push(l);
        }
        out.pending.push(Pending { name, rec, state, fate, committed });
    }
    Ok(out)
}

/// Every record, in name order (the views), each lease resolved as [`read`] does.
pub fn records() -> Result<Vec<SlotRecord>> {
    let sh = shared()?;
    let gen = sh.gen();
    let mut out: Vec<SlotRecord> = {
        let _lock = Held::take(sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
        // SAFETY: the array lock is held shared.
        unsafe { sh.used() }.iter().filter(|e| e.in_use()).map(|e| e.record()).collect()
    };
    for r in &mut out {
        if let Some(p) = r.pending.take() {
            let fate = txid::fate(&p, gen);
            r.lease = resolve(r.lease.take(), Some((&p, fate)), p.lease.clone());
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The record of one slot name, as stored (its pending change unresolved).
pub fn record(name: &str) -> Result<Option<SlotRecord>> {
    let sh = shared()?;
    let _lock = Held::take(sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
    // SAFETY: the array lock is held shared.
    Ok(unsafe { sh.used() }.iter().find(|e| e.is(name)).map(|e| e.record()))
}

/// The record of one slot name with what shared memory alone knows of its pending change.
pub fn record_and_state(name: &str) -> Result<Option<(SlotRecord, PendingState)>> {
    let sh = shared()?;
    let _lock = Held::take(sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
    // SAFETY: the array lock is held shared.
    Ok(unsafe { sh.used() }.iter().find(|e| e.is(name)).map(|e| (e.record(), e.pending_state())))
}

/// What a pass settles, from one walk over the store under one lock: the changes in
/// flight, the names whose file shared memory settled without writing it, the leases loaded
/// at start and not yet reconciled, and (`owners`) every committed lease's owner.
#[derive(Default)]
pub struct Housekeeping {
    pub in_flight: Vec<Pending>,
    pub dirty: Vec<String>,
    pub unreconciled: Vec<String>,
    pub owners: Vec<Owner>,
}

pub fn housekeeping_view(owners: bool) -> Result<Housekeeping> {
    let sh = shared()?;
    let gen = sh.gen();
    let mut out = Housekeeping::default();
    let mut raw: Vec<(String, PendingRec, PendingState, Option<Lease>)> = vec![];
    {
        let _lock = Held::take(sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
        // SAFETY: the array lock is held shared.
        for e in unsafe { sh.used() }.iter().filter(|e| e.in_use()) {
            if e.has_pending() {
                if let Some(p) = e.pending() {
                    raw.push((e.name().to_string(), p, e.pending_state(), e.has_lease().then(|| e.policy_lease())));
                }
            }
            if e.file_dirty() {
                out.dirty.push(e.name().to_string());
            }
            if e.unreconciled() {
                out.unreconciled.push(e.name().to_string());
            }
            if owners && e.has_lease() {
                out.owners.push(e.owner());
            }
        }
    }
    out.in_flight = raw
        .into_iter()
        .map(|(name, rec, state, committed)| {
            let fate = txid::fate(&rec, gen);
            Pending { name, rec, state, fate, committed }
        })
        .collect();
    Ok(out)
}

/// How many leases the role `oid` holds, a new one in flight counted as held.
pub fn leases_of(oid: u32) -> Result<usize> {
    let sh = shared()?;
    let _lock = Held::take(sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
    // SAFETY: the array lock is held shared.
    Ok(unsafe { sh.used() }.iter().filter(|e| e.in_use() && e.owned_by(oid)).count())
}

/// A lease's owner as the store keeps it (`machine::look_up_owners`).
pub struct Owner {
    pub name: String,
    pub owner: String,
    /// 0: not yet looked up (a lease from before 0.3.0), or not found.
    pub oid: u32,
    pub gone: bool,
    pub lease_id: i64,
}

/// The names of the records with a drop intent.
pub fn intent_names() -> Result<Vec<String>> {
    let sh = shared()?;
    let _lock = Held::take(sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
    // SAFETY: the array lock is held shared.
    Ok(unsafe { sh.used() }.iter().filter(|e| e.in_use() && e.dropping()).map(|e| e.name().to_string()).collect())
}

/// A change to the store, serialised with every other (see [`change`]).
pub struct Writer {
    sh: shmem::Shared,
    _lock: Held,
}

/// How a record reaches its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// Written durably (removed durably when nothing is left).
    Durable,
    /// Written whole but without the directory's fsync: for a record whose old contents
    /// mean the same (a change the commit log has settled).
    Whole,
    /// For the record of a slot that was just dropped: removed without an fsync of the
    /// directory when nothing is left (core's drop is durable: a file an operating-system
    /// crash brings back names a slot that is gone, and its lease ends at the next start).
    Dropped,
    /// Shared memory only: the file keeps what it says (a release or keep in flight, which
    /// its committed event re-derives after a crash; see machine.rs).
    MemoryOnly,
}

impl Writer {
    /// The current record of `name` (an empty one if the store has none).
    pub fn get(&self, name: &str) -> SlotRecord {
        let _lock = Held::take(self.sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
        // SAFETY: the array lock is held shared.
        unsafe { self.sh.used() }.iter().find(|e| e.is(name)).map(|e| e.record()).unwrap_or_else(|| SlotRecord::new(name))
    }

    /// What shared memory alone knows of the pending change of `name`.
    pub fn pending_state(&self, name: &str) -> PendingState {
        let _lock = Held::take(self.sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
        // SAFETY: the array lock is held shared.
        unsafe { self.sh.used() }.iter().find(|e| e.is(name)).map(|e| e.pending_state()).unwrap_or_default()
    }

    /// Change what shared memory alone knows of a record (no file is written).
    pub fn mark(&mut self, name: &str, f: impl FnOnce(&mut shmem::Entry)) {
        let _lock = Held::take(self.sh.array_lock(), pg_sys::LWLockMode::LW_EXCLUSIVE);
        // SAFETY: the array lock is held exclusive.
        if let Some(e) = unsafe { self.sh.used() }.iter_mut().find(|e| e.is(name)) {
            f(e);
        }
    }

    /// The generation of the store's shared memory.
    pub fn gen(&self) -> i64 {
        self.sh.gen()
    }

    /// Make `rec` the record of its name: its file is written durably (or removed, when
    /// nothing is left to keep), then shared memory follows.
    pub fn put(&mut self, rec: &SlotRecord) -> Result<()> {
        self.put_as(rec, Put::Durable)
    }

    /// [`Writer::put`] for the record of a slot that was just dropped ([`Put::Dropped`]).
    pub fn put_dropped(&mut self, rec: &SlotRecord) -> Result<()> {
        self.put_as(rec, Put::Dropped)
    }

    pub fn put_as(&mut self, rec: &SlotRecord, how: Put) -> Result<()> {
        if rec.name.is_empty() {
            return self.put_node(rec);
        }
        let mut rec = rec.clone();
        rec.node = self.sh.node();
        // Nothing left to keep: memory and file both go (a file left behind with no entry
        // would read as a record that did not fit).
        let how = if how == Put::MemoryOnly && rec.is_empty() { Put::Dropped } else { how };
        let (index, before) = {
            let _lock = Held::take(self.sh.array_lock(), pg_sys::LWLockMode::LW_SHARED);
            // SAFETY: the array lock is held shared; only writers (we hold the writers'
            // lock) change which entries are in use, so the index stays valid.
            let entries = unsafe { self.sh.entries() };
            let used = unsafe { self.sh.used() }.len();
            match entries[..used].iter().position(|e| e.is(&rec.name)) {
                Some(i) => (Ok(i), Some((entries[i].pending(), entries[i].pending_volatile()))),
                None => (Err(entries.iter().position(|e| !e.in_use())), None),
            }
        };
        // A pending change kept in shared memory only (its transaction ID not durable) stays
        // out of the file when a writer that leaves it as it is writes the record (the
        // guard's tracking, say): the file says what it said of the lease, and memory
        // differs from it as before.
        let (was_pending, was_volatile) = before.unwrap_or((None, false));
        let volatile = match how {
            Put::MemoryOnly => rec.pending.is_some() && (rec.pending != was_pending || was_volatile),
            _ => was_volatile && rec.pending.is_some() && rec.pending == was_pending,
        };
        let image = if volatile && how != Put::MemoryOnly { SlotRecord { pending: None, ..rec.clone() } } else { rec.clone() };
        // A name the store has no entry for, whose file is there all the same, is a record
        // that did not fit at start: it is never written over (see load_at_startup).
        if index.is_err() && how != Put::MemoryOnly && file::record_path(&rec.name).exists() {
            return Err(GuardError::StoreNotLoaded { slot: rec.name.clone() });
        }
        // A full store makes room by forgetting the oldest recent drop (the loop rule is a
        // courtesy; a lease or the tracking of a live slot is not).
        let index = match index {
            Ok(i) => Some(i),
            Err(Some(i)) => Some(i),
            Err(None) if !rec.is_empty() => self.evict_a_drop()?,
            Err(None) => None,
        };
        match how {
            Put::MemoryOnly => {}
            _ if image.is_empty() => {
                file::remove_as(&rec.name, how == Put::Durable).map_err(|e| io_error("remove", &rec.name, e))?;
            }
            _ => {
                if index.is_none() {
                    return Err(GuardError::StoreFull { capacity: self.sh.capacity() });
                }
                let durability = if how == Put::Whole { Durability::Whole } else { Durability::Durable };
                file::write_as(&image, durability).map_err(|e| io_error("write", &rec.name, e))?;
            }
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
                e.set(&rec);
                // The file differs from memory after a memory-only change, until a write
                // that may carry it.
                e.set_file_dirty(how == Put::MemoryOnly || volatile);
                e.set_pending_volatile(volatile);
                // SAFETY: the array lock is held exclusive.
                unsafe { self.sh.note_set(i) };
            }
        } else if how == Put::MemoryOnly && !rec.is_empty() {
            return Err(GuardError::StoreFull { capacity: self.sh.capacity() });
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

/// A failed write of the store. A failed fsync is a PANIC, as for PostgreSQL's own files
/// (`data_sync_retry = off`, the default): after it, what is on disk is unknown while
/// shared memory says the write happened, and a restart reads the truth from the files.
fn io_error(what: &str, name: &str, e: file::WriteError) -> GuardError {
    let message = format!("could not {what} file \"{}\": {e}", file::record_path(name).display());
    if e.in_fsync {
        // SAFETY: data_sync_elevel only reads a GUC; PANIC (when it says so) does not return.
        let level = unsafe { pg_sys::data_sync_elevel(PgLogLevel::ERROR as i32) };
        if level >= PgLogLevel::PANIC as i32 {
            pgrx::ereport!(PgLogLevel::PANIC, PgSqlErrorCode::ERRCODE_DATA_CORRUPTED, format!("pgslotguard: {message}"));
        }
    }
    GuardError::StoreIo(message)
}

/// Run `f` with the writers' lock: every change to the store goes through here, one at a
/// time. Never held while a user's transaction waits between statements: a change takes it
/// for the moment it writes, and a wait for another transaction happens outside it.
pub fn change<T>(f: impl FnOnce(&mut Writer) -> Result<T>) -> Result<T> {
    let sh = shared()?;
    let lock = Held::take(sh.write_lock(), pg_sys::LWLockMode::LW_EXCLUSIVE);
    let mut w = Writer { sh, _lock: lock };
    f(&mut w)
}

/// Change the record of one name (durably, when it changed).
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

/// One enforcement pass at a time per node: the pass lock, held by this process until the
/// returned guard is dropped. `Err`: the PID of the process whose pass runs now.
pub struct PassLock {
    sh: shmem::Shared,
    pid: i32,
}

pub fn try_pass_lock() -> Result<std::result::Result<PassLock, i32>> {
    let sh = shared()?;
    // SAFETY: this process's PID.
    let pid = unsafe { pg_sys::MyProcPid };
    Ok(sh.try_take_pass(pid).map(|()| PassLock { sh, pid }))
}

impl Drop for PassLock {
    fn drop(&mut self) {
        self.sh.release_pass(self.pid);
    }
}

/// Add an event to the per-node ring (where a standby keeps its events); returns its id.
pub fn ring_push(e: ring::RingEvent) -> Result<i64> {
    change(|_| {
        let mut r = match ring::load() {
            Ok((r, None)) => r,
            Ok((r, Some(why))) => {
                warning!("pgslotguard: {why}");
                r
            }
            Err(why) => return Err(GuardError::StoreIo(why)),
        };
        let id = r.push(e);
        ring::save(&r).map_err(|e| io_error("write", ring::RING_FILE, e))?;
        Ok(id)
    })
}

/// The events of the per-node ring, oldest first.
pub fn ring_events() -> Result<Vec<ring::RingEvent>> {
    ring::peek().map_err(GuardError::StoreIo)
}

/// Does a record say more than a drop remembered (so that losing it could lose a lease or
/// a drop)? Such records are loaded first, and one that does not fit makes the store not
/// whole.
fn matters(rec: &SlotRecord) -> bool {
    rec.lease.is_some() || rec.pending.is_some() || rec.seen.as_ref().is_some_and(|s| s.dropping.is_some())
}

/// Load the files into shared memory: in the postmaster at startup (and after a crash
/// restart), before any backend runs. Never fails: what cannot be read is set aside and
/// named in a WARNING, and its slot is not leased; a lease whose slot is not on this
/// server ends here, with one LOG line for all of them.
///
/// Records that matter (a lease, a change in flight, a drop intent) load first, then the
/// tracking of slots, then remembered drops; a record that does not fit is left on disk
/// untouched and never written over, and if it mattered the guard does not act until the
/// store has room for it (max_replication_slots raised again).
pub(crate) fn load_at_startup() {
    let Some(sh) = shmem::shared() else { return };
    let node = file::node_identity();
    {
        // SAFETY: the postmaster, before any other process is attached: no lock is needed.
        let h = unsafe { sh.header() };
        let n = node.unwrap_or_default();
        (h.node_ino, h.node_btime) = (n.ino, n.btime);
    }
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
    let mut copied = 0usize;
    let mut kept = 0usize;
    let mut over = vec![];
    let mut over_matters = 0u32;
    // SAFETY: the postmaster, before any other process is attached: no lock is needed.
    let entries = unsafe { sh.entries() };
    let mut next = 0usize;
    let mut records = loaded.records;
    // What matters first, then tracking, then remembered drops; by name within each.
    records.sort_by_key(|r| (!matters(r), r.seen.is_none(), r.name.clone()));
    for mut rec in records {
        if rec.name.is_empty() {
            // SAFETY: as above.
            unsafe { sh.header() }.node_warned = shmem::words_to_bits(&rec.warned);
            continue;
        }
        let mut rewrite = false;
        // A record written in another store (this data directory is a copy): its changes in
        // flight and drop intents are the other server's, never this one's to finish.
        if rec.node.is_some() && node.is_some() && !rec.node.zip(node).is_some_and(|(a, b)| a.same(&b)) {
            if rec.pending.take().is_some() {
                rewrite = true;
            }
            if let Some(s) = rec.seen.as_mut() {
                if s.dropping.take().is_some() {
                    rewrite = true;
                }
            }
            copied += 1;
        }
        let dropping = rec.seen.as_ref().is_some_and(|s| s.dropping.is_some());
        let here = file::slot_identity(&rec.name);
        if let Some(l) = &rec.lease {
            let same = match (here, l.identity()) {
                (Some(h), Some(id)) => h.same(&id),
                (Some(_), None) => true,
                (None, _) => false,
            };
            // A committed release or keep may be in flight for it (machine.rs reconciles):
            // a lease whose slot is gone ends quietly either way.
            if !same && !dropping {
                rec.lease = None;
                rewrite = true;
                ended.push(rec.name.clone());
            }
        }
        if let Some(p) = &rec.pending {
            // A change whose slot is gone from this server leaves nothing to finish but the
            // lease it would make: a new lease on a slot no longer here never existed.
            let slot = p.lease.as_ref().and_then(|l| l.identity());
            if p.made_slot && !here.zip(slot).is_some_and(|(h, s)| h.same(&s)) {
                rec.pending = None;
                rewrite = true;
            }
        }
        if rewrite {
            rec.node = node;
            let r = if rec.is_empty() { file::remove(&rec.name) } else { file::write(&rec) };
            if let Err(e) = r {
                warning!("pgslotguard: could not rewrite store file \"{}\": {e}", file::record_path(&rec.name).display());
            }
            if rec.is_empty() {
                continue;
            }
        }
        if next >= entries.len() {
            if matters(&rec) {
                over_matters += 1;
            }
            over.push(rec.name.clone());
            continue;
        }
        kept += rec.lease.is_some() as usize;
        entries[next].set(&rec);
        // A lease in its file (committed, or in a change the commit log may say committed)
        // may have been released or kept since, by a transaction whose change reached only
        // shared memory: the first pass on a primary looks for that in the event table.
        entries[next].set_unreconciled(rec.lease.is_some() || rec.pending.as_ref().is_some_and(|p| p.lease.is_some()));
        // SAFETY: as above.
        unsafe { sh.note_set(next) };
        next += 1;
    }
    // SAFETY: as above.
    unsafe { sh.header() }.not_loaded = over_matters;
    if !ended.is_empty() {
        log!(
            "pgslotguard: ended {} lease(s) whose replication slot is not on this server: {} (the data directory was copied from another server, or the slot was dropped while the server was down)",
            ended.len(),
            ended.join(", ")
        );
    }
    if copied > 0 {
        log!("pgslotguard: {copied} store record(s) were written on another server (this data directory is a copy): their changes in flight and drop intents are not this server's, and are forgotten");
    }
    if !over.is_empty() {
        warning!(
            "pgslotguard: {} store record(s) do not fit in shared memory (room for {}, twice max_replication_slots) and are not loaded: {}{}",
            over.len(),
            entries.len(),
            over.join(", "),
            if over_matters > 0 {
                format!("; {over_matters} of them hold a lease, a change in flight or a drop intent, so the guard does not act and lease calls are refused until max_replication_slots is raised again")
            } else {
                String::new()
            }
        );
    }
    if kept > 0 {
        debug1!("pgslotguard: loaded {kept} lease(s) from {}", file::DIR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_limit_word_has_a_bit() {
        use crate::policy::Breach;
        for b in [Breach::Expired, Breach::Retained, Breach::Age, Breach::Inactive, Breach::Space, Breach::Lost, Breach::Stalled, Breach::Xmin] {
            assert!(super::shmem::LIMIT_WORDS.contains(&b.limit_word()), "{}", b.limit_word());
        }
    }

    #[test]
    fn a_reader_sees_and_the_guard_judges_the_lease_each_fate_leaves() {
        let new_lease = PendingRec { xid: Some(7), made_slot: true, ..Default::default() };
        let renew = PendingRec { xid: Some(7), ..Default::default() };
        let (old, new) = (Some("old"), Some("new"));
        // (committed, change, fate, acted on)
        let cases = [
            (old, None, None, old),
            (old, Some(&renew), Some(Fate::Mine), new),
            (old, Some(&renew), Some(Fate::Committed), new),
            (old, Some(&renew), Some(Fate::Running), old),
            (old, Some(&renew), Some(Fate::Aborted), old),
            // a release: the change leaves no lease
            (old, Some(&renew), Some(Fate::Committed), None),
                // another transaction's new lease in flight: not seen yet; rolled back, none
            (None, Some(&new_lease), Some(Fate::Running), None),
            (None, Some(&new_lease), Some(Fate::Aborted), None),
        ];
        for (i, (committed, change, fate, want)) in cases.into_iter().enumerate() {
            let pending_lease = if i == 5 { None } else { new };
            let got = resolve(committed, change.zip(fate), pending_lease);
            assert_eq!(got, want, "case {i}");
        }
        // The guard judges another transaction's new lease in flight as the lease it will be
        // (its slot exists and pins WAL), and anything else as a reader sees it.
        assert_eq!(judged(None, Some((&new_lease, Fate::Running)), new), new);
        assert_eq!(judged(old, Some((&renew, Fate::Running)), new), old);
        assert_eq!(judged(None, Some((&new_lease, Fate::Aborted)), new), None);
    }
}
