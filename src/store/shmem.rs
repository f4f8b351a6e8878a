//! The store in shared memory: a header and an array of fixed-size entries, one per slot
//! name the store knows, sized from `max_replication_slots` (a lease is a slot, and the
//! tracking is per slot; twice that, so that leases whose slots vanished and slots not yet
//! tracked fit together). Loaded from `pg_slotguard/` by the postmaster at startup (and
//! after every crash restart), as core's `StartupReplicationSlots` loads slots.
//!
//! Two LWLocks of tranche `pgslotguard`, as slot.c has `ReplicationSlotControlLock` and a
//! per-slot `io_in_progress_lock`:
//! - [`Locks::array`]: readers take it shared to copy entries out; writers take it
//!   exclusive only to change entries in memory (never across file I/O);
//! - [`Locks::write`]: held exclusive by whoever changes the store, for the whole change:
//!   check, write the file, fsync, rename, update memory. Changes are serialised, readers
//!   never wait on an fsync, and nothing holds it across a statement of a user's
//!   transaction (lease calls apply their changes at commit, src/xact.rs).

use super::codec::{DroppedRec, Identity, IntentRec, LeaseRec, LocalXact, PendingRec, SeenRec, SlotRecord};
use pgrx::pg_sys;
use std::sync::atomic::{AtomicPtr, Ordering};

const NAME_LEN: usize = 64;
const HOLDER_LEN: usize = crate::validate::MAX_HOLDER_BYTES;
const WORD_LEN: usize = 32;
pub const REASON_LEN: usize = 1024;
/// "Absent" for the optional integers of an entry.
const NONE: i64 = i64::MIN;

/// The words of the limits a warning can be remembered for (`Breach::limit_word`), one bit
/// each in an entry. A test holds this list and the Breach enum together.
pub const LIMIT_WORDS: [&str; 10] = ["expiry", "retained", "age", "inactivity", "floor", "stalled", "xmin", "lost", "space", "loop"];

pub const TRANCHE: &std::ffi::CStr = c"pgslotguard";

/// A bounded text field.
#[repr(C)]
#[derive(Clone, Copy)]
struct Text<const N: usize> {
    len: u16,
    bytes: [u8; N],
}

impl<const N: usize> Text<N> {
    fn set(&mut self, s: &str) {
        let mut n = s.len().min(N);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.bytes[..n].copy_from_slice(&s.as_bytes()[..n]);
        self.len = n as u16;
    }
    fn as_str(&self) -> &str {
        let b = &self.bytes[..(self.len as usize).min(N)];
        // Only ever set from a &str cut at a character boundary; checked all the same,
        // ASCII (most names) by the quicker test.
        if b.is_ascii() {
            // SAFETY: ASCII bytes are UTF-8.
            unsafe { std::str::from_utf8_unchecked(b) }
        } else {
            std::str::from_utf8(b).unwrap_or("")
        }
    }
    fn eq(&self, s: &str) -> bool {
        self.as_str() == s
    }
}

/// A lease's fields (the committed one, or the one a pending change leaves): plain old data.
#[repr(C)]
#[derive(Clone, Copy)]
struct LeaseBlock {
    has_holder: bool,
    limit_by_superuser: bool,
    adopted: bool,
    owner_gone: bool,
    logical: bool,
    while_active: bool,
    owner_oid: u32,
    owner: Text<NAME_LEN>,
    holder: Text<HOLDER_LEN>,
    lease_id: i64,
    leased_at: i64,
    renewed_at: i64,
    expires_at: i64,
    born_at: i64,
    renew_logged_at: i64,
    max_retained: i64,
    max_inactive: i64,
    max_age: i64,
    max_xmin_age: i64,
    reserved_lsn: i64,
    slot_ino: i64,
    slot_btime: i64,
}

impl LeaseBlock {
    fn get(&self) -> LeaseRec {
        LeaseRec {
            owner: self.owner.as_str().to_string(),
            holder: self.has_holder.then(|| self.holder.as_str().to_string()),
            leased_at: self.leased_at,
            renewed_at: opt(self.renewed_at),
            expires_at: self.expires_at,
            max_retained: opt(self.max_retained),
            max_inactive: opt(self.max_inactive),
            max_age: opt(self.max_age),
            max_xmin_age: opt(self.max_xmin_age),
            limit_by_superuser: self.limit_by_superuser,
            adopted: self.adopted,
            reserved_lsn: opt(self.reserved_lsn).map(|v| v as u64),
            slot_ino: None,
            slot: identity(self.slot_ino, self.slot_btime),
            owner_oid: (self.owner_oid != 0).then_some(self.owner_oid),
            lease_id: self.lease_id,
            born_at: opt(self.born_at),
            renew_logged_at: opt(self.renew_logged_at),
            owner_gone: self.owner_gone,
            logical: self.logical,
            while_active: self.while_active,
        }
    }

    fn set(&mut self, l: &LeaseRec) {
        self.owner.set(&l.owner);
        self.has_holder = l.holder.is_some();
        self.holder.set(l.holder.as_deref().unwrap_or(""));
        self.leased_at = l.leased_at;
        self.renewed_at = or_none(l.renewed_at);
        self.expires_at = l.expires_at;
        self.max_retained = or_none(l.max_retained);
        self.max_inactive = or_none(l.max_inactive);
        self.max_age = or_none(l.max_age);
        self.max_xmin_age = or_none(l.max_xmin_age);
        self.limit_by_superuser = l.limit_by_superuser;
        self.adopted = l.adopted;
        self.reserved_lsn = or_none(l.reserved_lsn.map(|v| v as i64));
        (self.slot_ino, self.slot_btime) = id_fields(l.identity());
        self.owner_oid = l.owner_oid.unwrap_or(0);
        self.lease_id = l.lease_id;
        self.born_at = or_none(l.born_at);
        self.renew_logged_at = or_none(l.renew_logged_at);
        self.owner_gone = l.owner_gone;
        self.logical = l.logical;
        self.while_active = l.while_active;
    }

    /// The policy's view of the lease, read from the block field by field, as `get` reads
    /// the record: every pass reads every lease this way (B2's cost), and going through
    /// `get` and `store::policy_lease` would copy the owner twice and the holder once, per
    /// lease and pass, for nothing.
    fn policy(&self, name: &str) -> crate::policy::Lease {
        crate::policy::Lease {
            slot_name: name.into(),
            owner: self.owner.as_str().into(),
            owner_oid: self.owner_oid,
            leased_at: self.leased_at,
            born_at: opt(self.born_at).unwrap_or(self.leased_at),
            renewed_at: opt(self.renewed_at),
            expires_at: self.expires_at,
            max_retained: opt(self.max_retained),
            max_inactive: opt(self.max_inactive),
            max_age: opt(self.max_age),
            max_xmin_age: opt(self.max_xmin_age),
            limit_by_superuser: self.limit_by_superuser,
            adopted: self.adopted,
            logical: self.logical,
            while_active: self.while_active,
        }
    }
}

fn identity(ino: i64, btime: i64) -> Option<Identity> {
    (ino != NONE).then_some(Identity { ino: ino as u64, btime })
}

fn id_fields(id: Option<Identity>) -> (i64, i64) {
    id.map_or((NONE, 0), |i| (i.ino as i64, i.btime))
}

/// One slot name's record in shared memory: plain old data.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Entry {
    in_use: bool,
    has_lease: bool,
    has_seen: bool,
    has_intent: bool,
    has_dropped: bool,
    has_pending: bool,
    pending_has_lease: bool,
    pending_drop_slot: bool,
    pending_made_slot: bool,
    /// The pending change's transaction has passed its pre-commit check: it commits (or
    /// fails) within moments, and the guard waits for it rather than act on the old lease.
    pending_precommitted: bool,
    /// The backend that made the pending change could not finish it at its commit or abort
    /// (its slot was active): the guard's next pass does.
    pending_abandoned: bool,
    /// The record's file may still hold a pending change that shared memory has settled
    /// (settled records are written again by the guard's next pass).
    file_dirty: bool,
    /// The pending change was put in shared memory only (`Put::MemoryOnly`): its
    /// transaction ID is not durable, so no file may name it (after a crash the ID could be
    /// another transaction's). Written by another writer, the record's file leaves it out.
    pending_volatile: bool,
    /// Loaded at start: a release or keep of this lease may have committed (its event is
    /// in the table) without reaching the store; the guard's first pass on a primary looks.
    unreconciled: bool,
    name: Text<NAME_LEN>,
    lease: LeaseBlock,
    pending: LeaseBlock,
    pending_xid: u32,
    pending_pid: i32,
    pending_local_proc: i32,
    pending_local_lxid: u32,
    pending_local_gen: i64,
    first_seen: i64,
    inactive_since: i64,
    stalled_lsn: i64,
    stalled_since: i64,
    seen_ino: i64,
    seen_btime: i64,
    intent_action: Text<WORD_LEN>,
    intent_at: i64,
    intent_reason: Text<REASON_LEN>,
    /// 0: none (`IntentRec::xid`).
    intent_xid: u32,
    intent_ino: i64,
    intent_btime: i64,
    warned: u32,
    dropped_at: i64,
    dropped_action: Text<WORD_LEN>,
    dropped_count: u32,
    loop_warned_at: i64,
}

fn opt(v: i64) -> Option<i64> {
    (v != NONE).then_some(v)
}
fn or_none(v: Option<i64>) -> i64 {
    v.unwrap_or(NONE)
}

/// What shared memory knows of a pending change beyond its record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PendingState {
    pub precommitted: bool,
    pub abandoned: bool,
    /// The backend that made it.
    pub pid: i32,
}

impl Entry {
    pub fn in_use(&self) -> bool {
        self.in_use
    }
    pub fn name(&self) -> &str {
        self.name.as_str()
    }
    pub fn is(&self, name: &str) -> bool {
        self.in_use && self.name.eq(name)
    }
    pub fn has_lease(&self) -> bool {
        self.has_lease
    }
    pub fn has_seen(&self) -> bool {
        self.has_seen
    }
    pub fn has_pending(&self) -> bool {
        self.has_pending
    }
    pub fn file_dirty(&self) -> bool {
        self.file_dirty
    }
    pub fn unreconciled(&self) -> bool {
        self.unreconciled
    }
    /// The entry only remembers a recent guard drop (the loop rule): it gives way to a
    /// record that needs the room.
    pub fn only_a_drop(&self) -> Option<i64> {
        (self.in_use && self.has_dropped && !self.has_lease && !self.has_seen && !self.has_pending && self.warned == 0)
            .then_some(self.dropped_at)
    }
    pub fn dropping(&self) -> bool {
        self.has_seen && self.has_intent
    }

    /// The entry's contents as a record.
    pub fn record(&self) -> SlotRecord {
        let lease = self.has_lease.then(|| self.lease.get());
        let seen = self.has_seen.then(|| self.seen());
        SlotRecord {
            name: self.name().to_string(),
            lease,
            seen,
            warned: self.warned_words(),
            dropped: self.dropped(),
            pending: self.pending(),
            node: None,
        }
    }

    pub fn pending(&self) -> Option<PendingRec> {
        self.has_pending.then(|| PendingRec {
            xid: (self.pending_xid != 0).then_some(self.pending_xid),
            local: (self.pending_local_gen != 0).then_some(LocalXact {
                gen: self.pending_local_gen,
                proc: self.pending_local_proc,
                lxid: self.pending_local_lxid,
            }),
            lease: self.pending_has_lease.then(|| self.pending.get()),
            drop_slot: self.pending_drop_slot,
            made_slot: self.pending_made_slot,
        })
    }

    pub fn pending_state(&self) -> PendingState {
        PendingState { precommitted: self.pending_precommitted, abandoned: self.pending_abandoned, pid: self.pending_pid }
    }

    /// Set what shared memory alone knows of the pending change.
    pub fn set_pending_state(&mut self, st: PendingState) {
        self.pending_precommitted = st.precommitted;
        self.pending_abandoned = st.abandoned;
        self.pending_pid = st.pid;
    }

    /// A lease of the role `oid`, committed or new in flight.
    pub fn owned_by(&self, oid: u32) -> bool {
        (self.has_lease && self.lease.owner_oid == oid) || (!self.has_lease && self.has_pending && self.pending_has_lease && self.pending.owner_oid == oid)
    }

    /// The committed lease's owner.
    pub fn owner(&self) -> super::Owner {
        super::Owner {
            name: self.name().to_string(),
            owner: self.lease.owner.as_str().to_string(),
            oid: self.lease.owner_oid,
            gone: self.lease.owner_gone,
            lease_id: self.lease.lease_id,
        }
    }

    pub fn set_file_dirty(&mut self, dirty: bool) {
        self.file_dirty = dirty;
    }

    pub fn pending_volatile(&self) -> bool {
        self.pending_volatile
    }

    pub fn set_pending_volatile(&mut self, v: bool) {
        self.pending_volatile = v;
    }

    pub fn set_unreconciled(&mut self, v: bool) {
        self.unreconciled = v;
    }

    pub fn dropped(&self) -> Option<DroppedRec> {
        self.has_dropped.then(|| DroppedRec {
            at: self.dropped_at,
            action: self.dropped_action.as_str().to_string(),
            drops: self.dropped_count,
            loop_warned_at: opt(self.loop_warned_at),
        })
    }

    pub fn recent_drop(&self) -> Option<crate::policy::RecentDrop> {
        let d = self.dropped()?;
        Some(crate::policy::RecentDrop {
            slot_name: self.name().to_string(),
            at: d.at,
            action: d.action,
            drops: d.drops,
            loop_warned_at: d.loop_warned_at,
        })
    }

    pub fn lease(&self) -> LeaseRec {
        self.lease.get()
    }

    pub fn seen(&self) -> SeenRec {
        SeenRec {
            first_seen: self.first_seen,
            inactive_since: opt(self.inactive_since),
            stalled: opt(self.stalled_lsn).zip(opt(self.stalled_since)).map(|(l, s)| (l as u64, s)),
            dropping: self.has_intent.then(|| IntentRec {
                action: self.intent_action.as_str().to_string(),
                reason: self.intent_reason.as_str().to_string(),
                at: self.intent_at,
                xid: (self.intent_xid != 0).then_some(self.intent_xid),
                slot: identity(self.intent_ino, self.intent_btime),
            }),
            slot: identity(self.seen_ino, self.seen_btime),
        }
    }

    /// The policy's view of the committed lease, without the holder (the pass has no use
    /// for it).
    pub fn policy_lease(&self) -> crate::policy::Lease {
        self.lease.policy(self.name())
    }

    /// The policy's view of the lease a pending change leaves, if it leaves one.
    pub fn policy_pending_lease(&self) -> Option<crate::policy::Lease> {
        (self.has_pending && self.pending_has_lease).then(|| self.pending.policy(self.name()))
    }

    pub fn policy_seen(&self) -> crate::policy::Seen {
        crate::policy::Seen {
            slot_name: self.name().into(),
            first_seen: self.first_seen,
            inactive_since: opt(self.inactive_since),
            dropping: self.has_intent.then(|| crate::policy::DropIntent {
                action: self.intent_action.as_str().to_string(),
                reason: self.intent_reason.as_str().to_string(),
                at: self.intent_at,
                xid: (self.intent_xid != 0).then_some(self.intent_xid),
            }),
            stalled: opt(self.stalled_lsn).zip(opt(self.stalled_since)).map(|(l, s)| (l as u64, s)),
        }
    }

    pub fn warned_words(&self) -> Vec<String> {
        LIMIT_WORDS.iter().enumerate().filter(|(i, _)| self.warned & (1 << i) != 0).map(|(_, w)| w.to_string()).collect()
    }

    /// Fill the entry from a record (the entry becomes in use). What shared memory alone
    /// knows of a pending change is kept while the record still holds the same change.
    pub fn set(&mut self, rec: &SlotRecord) {
        let same_pending = self.in_use && self.name.eq(&rec.name) && self.pending() == rec.pending;
        self.in_use = true;
        self.name.set(&rec.name);
        self.has_lease = rec.lease.is_some();
        if let Some(l) = &rec.lease {
            self.lease.set(l);
        }
        self.has_pending = rec.pending.is_some();
        let p = rec.pending.clone().unwrap_or_default();
        self.pending_xid = p.xid.unwrap_or(0);
        let l = p.local.unwrap_or_default();
        (self.pending_local_gen, self.pending_local_proc, self.pending_local_lxid) = (l.gen, l.proc, l.lxid);
        self.pending_has_lease = p.lease.is_some();
        if let Some(l) = &p.lease {
            self.pending.set(l);
        }
        self.pending_drop_slot = p.drop_slot;
        self.pending_made_slot = p.made_slot;
        if !same_pending {
            self.set_pending_state(PendingState::default());
        }
        self.has_seen = rec.seen.is_some();
        let seen = rec.seen.clone().unwrap_or_default();
        self.first_seen = seen.first_seen;
        self.inactive_since = or_none(seen.inactive_since);
        self.stalled_lsn = or_none(seen.stalled.map(|(l, _)| l as i64));
        self.stalled_since = or_none(seen.stalled.map(|(_, s)| s));
        (self.seen_ino, self.seen_btime) = id_fields(seen.slot);
        self.has_intent = seen.dropping.is_some();
        if let Some(i) = &seen.dropping {
            self.intent_action.set(&i.action);
            self.intent_at = i.at;
            self.intent_reason.set(&i.reason);
        }
        self.intent_xid = seen.dropping.as_ref().and_then(|i| i.xid).unwrap_or(0);
        (self.intent_ino, self.intent_btime) = id_fields(seen.dropping.as_ref().and_then(|i| i.slot));
        self.warned = words_to_bits(&rec.warned);
        self.has_dropped = rec.dropped.is_some();
        let d = rec.dropped.clone().unwrap_or_default();
        self.dropped_at = d.at;
        self.dropped_action.set(&d.action);
        self.dropped_count = d.drops;
        self.loop_warned_at = or_none(d.loop_warned_at);
    }
}

pub fn words_to_bits(words: &[String]) -> u32 {
    words.iter().filter_map(|w| LIMIT_WORDS.iter().position(|l| l == w)).fold(0, |b, i| b | (1 << i))
}

/// The start of the store's shared memory.
#[repr(C)]
pub struct Header {
    pub capacity: u32,
    /// This life of the store's shared memory (made anew at every start and crash restart):
    /// what a hot standby's pending changes are tied to (`txid::local_fate`).
    pub gen: i64,
    /// The store directory's identity, read at load: what each record is written with.
    pub node_ino: u64,
    pub node_btime: i64,
    /// Records that could not be loaded and that say more than a drop remembered (a
    /// lease, a change in flight, a drop intent): the store cannot be trusted, and the guard
    /// does not act until it is loaded whole.
    pub not_loaded: u32,
    /// The process running an enforcement pass, 0 for none: one pass at a time per node.
    pub pass_owner: std::sync::atomic::AtomicI32,
    /// Warnings about the node as a whole (the floor), as limit bits.
    pub node_warned: u32,
    /// One past the last entry in use: entries from here on are all unused, so readers
    /// stop here instead of walking the whole array (an entry is over 2 kB).
    pub used_to: u32,
}

/// The store's shared memory, once attached.
pub struct Shared {
    pub header: *mut Header,
    pub entries: *mut Entry,
    pub locks: *mut pg_sys::LWLockPadded,
}

static HEADER: AtomicPtr<Header> = AtomicPtr::new(std::ptr::null_mut());
static LOCKS: AtomicPtr<pg_sys::LWLockPadded> = AtomicPtr::new(std::ptr::null_mut());

pub fn capacity_for(max_replication_slots: i32) -> usize {
    (max_replication_slots.max(0) as usize) * 2
}

fn size_for(capacity: usize) -> usize {
    std::mem::size_of::<Header>().next_multiple_of(8) + capacity * std::mem::size_of::<Entry>()
}

/// The store, if this process is attached to it (the library was preloaded).
pub fn shared() -> Option<Shared> {
    let header = HEADER.load(Ordering::Acquire);
    let locks = LOCKS.load(Ordering::Acquire);
    if header.is_null() || locks.is_null() {
        return None;
    }
    // SAFETY: both pointers were set in the startup hook to shared memory that lives as
    // long as the server; the entries follow the header at the aligned offset.
    let entries = unsafe { (header as *mut u8).add(std::mem::size_of::<Header>().next_multiple_of(8)) } as *mut Entry;
    Some(Shared { header, entries, locks })
}

static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;

/// Install the hooks (from _PG_init, while preloading).
pub fn init() {
    // SAFETY: _PG_init runs in the postmaster while shared_preload_libraries are loaded,
    // single-threaded, before shared memory is made; chaining the previous hooks is the
    // documented way to install these.
    unsafe {
        PREV_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request);
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(startup);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn request() {
    // SAFETY: called by the postmaster in its shmem request phase, where
    // RequestAddinShmemSpace and RequestNamedLWLockTranche are allowed.
    unsafe {
        if let Some(prev) = PREV_REQUEST {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(size_for(capacity_for(pg_sys::max_replication_slots)));
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 2);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn startup() {
    // SAFETY: called in the postmaster (and in every backend under EXEC_BACKEND) after
    // shared memory exists. AddinShmemInitLock (MainLWLockArray[21] on every version from
    // 15 to 18) serialises ShmemInitStruct as core's contrib modules do. The area is
    // zeroed and loaded only when it was just made (`found` false): after a crash restart
    // it is made anew and loaded again from the files.
    unsafe {
        if let Some(prev) = PREV_STARTUP {
            prev();
        }
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let capacity = capacity_for(pg_sys::max_replication_slots);
        let mut found = false;
        let header = pg_sys::ShmemInitStruct(c"pgslotguard store".as_ptr(), size_for(capacity), &mut found) as *mut Header;
        let locks = pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr());
        if !found {
            std::ptr::write_bytes(header as *mut u8, 0, size_for(capacity));
            (*header).capacity = capacity as u32;
            // A new life of the store: never 0 (0 marks "no local transaction").
            (*header).gen = pg_sys::GetCurrentTimestamp().max(1);
        }
        HEADER.store(header, Ordering::Release);
        LOCKS.store(locks, Ordering::Release);
        pg_sys::LWLockRelease(init_lock);
        if !found {
            super::load_at_startup();
        }
    }
}

impl Shared {
    pub fn capacity(&self) -> usize {
        // SAFETY: set once at startup, never changed.
        unsafe { (*self.header).capacity as usize }
    }
    pub fn array_lock(&self) -> *mut pg_sys::LWLock {
        // SAFETY: the tranche has two locks; index 0 is the array's.
        unsafe { &raw mut (*self.locks.add(0)).lock }
    }
    pub fn write_lock(&self) -> *mut pg_sys::LWLock {
        // SAFETY: index 1 is the writers' lock.
        unsafe { &raw mut (*self.locks.add(1)).lock }
    }
    /// The entries. Callers hold the array lock (shared to read, exclusive to change).
    ///
    /// # Safety
    /// The caller holds the array lock in the mode that fits what it does with them.
    pub unsafe fn entries(&self) -> &mut [Entry] {
        // SAFETY: `capacity` entries follow the header (see `size_for`).
        unsafe { std::slice::from_raw_parts_mut(self.entries, self.capacity()) }
    }
    /// The entries up to the last one in use (every entry in use is among them).
    ///
    /// # Safety
    /// As for [`Shared::entries`].
    pub unsafe fn used(&self) -> &mut [Entry] {
        // SAFETY: as for `entries`; `used_to` never exceeds the capacity.
        unsafe {
            let n = ((*self.header).used_to as usize).min(self.capacity());
            std::slice::from_raw_parts_mut(self.entries, n)
        }
    }
    /// Entry `i` was set: the used part reaches it.
    ///
    /// # Safety
    /// The caller holds the array lock exclusive (or is the postmaster loading the store).
    pub unsafe fn note_set(&self, i: usize) {
        // SAFETY: as the caller holds the lock exclusive.
        let h = unsafe { &mut *self.header };
        h.used_to = h.used_to.max(i as u32 + 1);
    }
    /// An entry was cleared: the used part ends after the last entry still in use.
    ///
    /// # Safety
    /// As for [`Shared::note_set`].
    pub unsafe fn note_cleared(&self) {
        // SAFETY: as the caller holds the lock exclusive.
        unsafe {
            let n = self.used().iter().rposition(|e| e.in_use()).map_or(0, |i| i + 1);
            (*self.header).used_to = n as u32;
        }
    }
    /// This life of the store's shared memory.
    pub fn gen(&self) -> i64 {
        // SAFETY: set once by the startup hook before any backend runs.
        unsafe { (*self.header).gen }
    }
    /// The store directory's identity, as read at load.
    pub fn node(&self) -> Option<Identity> {
        // SAFETY: set once by the startup hook (load) before any backend runs.
        let h = unsafe { &*self.header };
        (h.node_ino != 0).then_some(Identity { ino: h.node_ino, btime: h.node_btime })
    }
    /// How many records that matter could not be loaded at start.
    pub fn not_loaded(&self) -> u32 {
        // SAFETY: set once by the startup hook before any backend runs.
        unsafe { (*self.header).not_loaded }
    }
    /// Take the pass lock for process `pid`: one enforcement pass at a time per node. A
    /// holder that is gone (killed: its server restarted and shared memory with it; or
    /// exited without releasing it) does not count. `Err`: the live holder's PID.
    pub fn try_take_pass(&self, pid: i32) -> Result<(), i32> {
        // SAFETY: an atomic in shared memory that lives as long as the server.
        let owner = unsafe { &(*self.header).pass_owner };
        loop {
            match owner.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(holder) if holder == pid => return Ok(()),
                Err(holder) if !crate::txid::process_alive(holder) => {
                    if owner.compare_exchange(holder, pid, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                        return Ok(());
                    }
                }
                Err(holder) => return Err(holder),
            }
        }
    }
    /// Release the pass lock if `pid` holds it.
    pub fn release_pass(&self, pid: i32) {
        // SAFETY: as above.
        let owner = unsafe { &(*self.header).pass_owner };
        let _ = owner.compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire);
    }
    /// # Safety
    /// As for [`Shared::entries`].
    pub unsafe fn header(&self) -> &mut Header {
        // SAFETY: the header lives at the start of the area.
        unsafe { &mut *self.header }
    }
}
