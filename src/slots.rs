//! Core's replication slots, read straight from shared memory the way
//! `pg_get_replication_slots()` reads them: the slot array under
//! `ReplicationSlotControlLock` (shared), each slot copied under its spinlock and examined
//! after the spinlock is released. A pass reads every slot this way instead of querying
//! `pg_replication_slots` through SPI: no plan, no tuplestore, no LSN turned into text and
//! back. The extension's own tables are still read through SPI (state.rs). The walsender
//! that holds an active slot is read the way `pg_stat_get_wal_senders()` reads it (what
//! `pg_stat_replication` shows): how far it has sent, and its client written and flushed.

use crate::policy::{Sender, SlotInfo, SystemSlot};
use pgrx::pg_sys;

/// `ReplicationSlotControlLock` is `MainLWLockArray[37]` (src/include/storage/
/// lwlocknames.h). Core never renumbers the individual LWLocks (lwlocknames.txt keeps a
/// retired number unused), and 37 holds on every version from 13 to 19.
const REPLICATION_SLOT_CONTROL_LOCK: usize = 37;

/// Every slot in use.
pub fn all() -> Vec<SlotInfo> {
    read(|_| true)
}

/// The slot named `name`, if it exists.
pub fn one(name: &str) -> Option<SlotInfo> {
    read(|n| n == name.as_bytes()).into_iter().next()
}

/// The bytes of a `NameData` up to its terminating NUL.
fn name_bytes(n: &pg_sys::NameData) -> &[u8] {
    // SAFETY: NameData is 64 `c_char`s; reinterpreting them as bytes is sound.
    let bytes: &[u8] = unsafe { std::slice::from_raw_parts(n.data.as_ptr().cast::<u8>(), n.data.len()) };
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

fn read(want: impl Fn(&[u8]) -> bool) -> Vec<SlotInfo> {
    // The end of the WAL walsenders may send is read before their positions, so that a
    // walsender found short of it had that WAL to send when it was looked at.
    let send_limit = send_limit();
    let mut out = slots(want);
    if out.iter().any(SlotInfo::active) {
        let senders = walsenders(send_limit);
        for slot in &mut out {
            slot.sender = slot.active_pid.and_then(|pid| senders.iter().find(|(p, _)| *p == pid)).map(|(_, s)| *s);
        }
    }
    out
}

fn slots(want: impl Fn(&[u8]) -> bool) -> Vec<SlotInfo> {
    // SAFETY: a PGC_POSTMASTER setting, fixed while the server runs.
    let mut out = Vec::with_capacity(unsafe { pg_sys::max_replication_slots }.max(0) as usize);
    // SAFETY: ReplicationSlotCtl points to the slot array in shared memory, set up by the
    // postmaster before any backend or worker starts, with max_replication_slots entries
    // (a PGC_POSTMASTER setting, fixed while the server runs). Holding
    // ReplicationSlotControlLock in shared mode keeps slots from being created or dropped
    // (both take it exclusively), so `in_use` and the name are stable; the fields that
    // change while a slot is in use (active_pid, restart_lsn) are copied under the slot's
    // spinlock, as core's own readers do. Nothing between SpinLockAcquire and
    // SpinLockRelease can raise an ERROR or allocate (a plain copy), and an ERROR raised
    // while the LWLock is held releases it at abort (LWLockReleaseAll).
    unsafe {
        let ctl = pg_sys::ReplicationSlotCtl;
        let max = pg_sys::max_replication_slots;
        let all = max + repack_slots();
        if ctl.is_null() || all <= 0 {
            return out;
        }
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(REPLICATION_SLOT_CONTROL_LOCK)).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_SHARED);
        let base = (&raw mut (*ctl).replication_slots).cast::<pg_sys::ReplicationSlot>();
        for i in 0..all as usize {
            let slot = base.add(i);
            if !(*slot).in_use || !want(name_bytes(&(*slot).data.name)) {
                continue;
            }
            spin_acquire(&raw mut (*slot).mutex);
            let active = active_of(&*slot);
            let data = (*slot).data;
            let inactive_since = core_inactive_since(&*slot);
            spin_release(&raw mut (*slot).mutex);
            let mut slot_info = info(&data, pid_of(active), inactive_since);
            slot_info.system = system_slot(&slot_info.name, i >= max as usize);
            out.push(slot_info);
        }
        pg_sys::LWLockRelease(lock);
    }
    out
}

/// The end of the WAL a walsender may send now, as walsender.c's XLogSendPhysical computes
/// it: flushed WAL on a primary; on a standby (a cascading walsender) the furthest of what
/// the walreceiver has flushed and what has been replayed.
fn send_limit() -> u64 {
    // SAFETY: plain reads of positions in shared memory, each under the lock or spinlock
    // its function takes; none raises an ERROR. A NULL TimeLineID pointer is allowed.
    unsafe {
        if pg_sys::RecoveryInProgress() {
            let received = pg_sys::GetWalRcvFlushRecPtr(std::ptr::null_mut(), std::ptr::null_mut());
            received.max(pg_sys::GetXLogReplayRecPtr(std::ptr::null_mut()))
        } else {
            pg_sys::GetFlushRecPtr(std::ptr::null_mut())
        }
    }
}

/// Every running walsender: its PID and positions.
fn walsenders(send_limit: u64) -> Vec<(pg_sys::pid_t, Sender)> {
    let mut out = Vec::new();
    // SAFETY: WalSndCtl points to the walsender array in shared memory, set up by the
    // postmaster before any backend or worker starts, with max_wal_senders entries (a
    // PGC_POSTMASTER setting, fixed while the server runs). Each entry's PID and positions
    // are copied under its spinlock, as pg_stat_get_wal_senders() does; nothing between
    // SpinLockAcquire and SpinLockRelease can raise an ERROR or allocate.
    unsafe {
        let ctl = pg_sys::WalSndCtl;
        let max = pg_sys::max_wal_senders;
        if ctl.is_null() || max <= 0 {
            return out;
        }
        let base = (&raw mut (*ctl).walsnds).cast::<pg_sys::WalSnd>();
        for i in 0..max as usize {
            let w = base.add(i);
            spin_acquire(&raw mut (*w).mutex);
            let (pid, sent, write, flush) = ((*w).pid, (*w).sentPtr, (*w).write, (*w).flush);
            spin_release(&raw mut (*w).mutex);
            if pid != 0 {
                out.push((pid, Sender { sent, write, flush, send_limit }));
            }
        }
    }
    out
}

// A spinlock taken as core's S_LOCK takes it: one test-and-set (an atomic swap with
// acquire ordering, what `__sync_lock_test_and_set` is), and core's own s_lock() to spin
// and back off only when it is held. Released as S_UNLOCK does, by a store of zero with
// release ordering. pgrx's SpinLockAcquire wraps each call in a sigsetjmp, which at a
// thousand slots was a tenth of what reading them cost.
const _: () = assert!(std::mem::size_of::<pg_sys::slock_t>() == 1 || std::mem::size_of::<pg_sys::slock_t>() == 4);

/// # Safety
/// `lock` points to an initialised spinlock in shared memory.
unsafe fn spin_acquire(lock: *mut pg_sys::slock_t) {
    use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
    // SAFETY: slock_t is a byte (x86) or an int (other platforms), as the assertion above
    // checks; core only ever changes it atomically.
    let was_held = unsafe {
        if std::mem::size_of::<pg_sys::slock_t>() == 1 {
            AtomicU8::from_ptr(lock.cast()).swap(1, Ordering::Acquire) != 0
        } else {
            AtomicI32::from_ptr(lock.cast()).swap(1, Ordering::Acquire) != 0
        }
    };
    if was_held {
        // SAFETY: core's slow path, as S_LOCK calls it; it returns holding the lock.
        unsafe { pg_sys::s_lock(lock, c"slots.rs".as_ptr(), line!() as i32, c"spin_acquire".as_ptr()) };
    }
}

/// # Safety
/// The caller holds `lock` (taken with [`spin_acquire`]).
unsafe fn spin_release(lock: *mut pg_sys::slock_t) {
    use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
    // SAFETY: as in spin_acquire.
    unsafe {
        if std::mem::size_of::<pg_sys::slock_t>() == 1 {
            AtomicU8::from_ptr(lock.cast()).store(0, Ordering::Release);
        } else {
            AtomicI32::from_ptr(lock.cast()).store(0, Ordering::Release);
        }
    }
}

/// The slots of REPACK (CONCURRENTLY) (PostgreSQL 19): a pool of their own,
/// `max_repack_replication_slots` entries after the `max_replication_slots` of the slot
/// array (both PGC_POSTMASTER settings). Before 19 there is none.
#[cfg(feature = "pg19")]
fn repack_slots() -> i32 {
    // SAFETY: a PGC_POSTMASTER setting, fixed while the server runs.
    unsafe { pg_sys::max_repack_replication_slots }.max(0)
}

#[cfg(not(feature = "pg19"))]
fn repack_slots() -> i32 {
    0
}

/// The name core reserves for the slot a subscriber's `retain_dead_tuples` makes
/// (CONFLICT_DETECTION_SLOT, PostgreSQL 19: it holds back xmin on purpose).
pub const CONFLICT_DETECTION_SLOT: &str = "pg_conflict_detection";

/// Is this one of core's own slots, which no scope, limit or lease of ours may touch? On
/// 19: a slot in REPACK's pool (`in_repack_pool`), and the conflict detection slot, whose
/// name core reserves (no user can make a slot of that name). Before 19 neither exists,
/// and that name is an ordinary one.
pub fn system_slot(name: &str, in_repack_pool: bool) -> Option<SystemSlot> {
    if !cfg!(feature = "pg19") {
        return None;
    }
    if in_repack_pool {
        Some(SystemSlot::Repack)
    } else if name == CONFLICT_DETECTION_SLOT {
        Some(SystemSlot::ConflictDetection)
    } else {
        None
    }
}

/// Who holds the slot: a PID before 19, a process number on 19 (`active_proc`).
#[cfg(not(feature = "pg19"))]
fn active_of(slot: &pg_sys::ReplicationSlot) -> pg_sys::pid_t {
    slot.active_pid
}

#[cfg(not(feature = "pg19"))]
fn pid_of(active_pid: pg_sys::pid_t) -> pg_sys::pid_t {
    active_pid
}

#[cfg(feature = "pg19")]
fn active_of(slot: &pg_sys::ReplicationSlot) -> pg_sys::ProcNumber {
    slot.active_proc
}

/// The PID of the process numbered `proc` (INVALID_PROC_NUMBER: none, 0), as
/// pg_get_replication_slots() shows `active_pid` on 19: its PGPROC's pid.
#[cfg(feature = "pg19")]
fn pid_of(proc: pg_sys::ProcNumber) -> pg_sys::pid_t {
    if proc < 0 {
        return 0;
    }
    // SAFETY: ProcGlobal->allProcs has allProcCount entries, fixed at start; a slot's
    // active_proc is one of them. The pid is an int read whole.
    unsafe {
        let global = pg_sys::ProcGlobal;
        if global.is_null() || proc as u32 >= (*global).allProcCount {
            return 0;
        }
        (*(*global).allProcs.add(proc as usize)).pid
    }
}

/// Core's `inactive_since` (PostgreSQL 17 and later), 0 when unset.
#[cfg(any(feature = "pg17", feature = "pg18", feature = "pg19"))]
fn core_inactive_since(slot: &pg_sys::ReplicationSlot) -> i64 {
    slot.inactive_since
}

#[cfg(not(any(feature = "pg17", feature = "pg18", feature = "pg19")))]
fn core_inactive_since(_slot: &pg_sys::ReplicationSlot) -> i64 {
    0
}

/// A C bool of the slot's data, which the bindings give as a bool or an i8 depending on the
/// version, as a bool.
#[cfg(any(feature = "pg17", feature = "pg18", feature = "pg19"))]
macro_rules! c_bool {
    ($v:expr) => {{
        #[allow(clippy::unnecessary_cast)]
        let v = $v as i32;
        v != 0
    }};
}

/// Is the slot a standby's copy of a primary's slot (slot synchronisation, 17+)?
#[cfg(any(feature = "pg17", feature = "pg18", feature = "pg19"))]
fn synced(data: &pg_sys::ReplicationSlotPersistentData) -> bool {
    c_bool!(data.synced)
}

#[cfg(not(any(feature = "pg17", feature = "pg18", feature = "pg19")))]
fn synced(_data: &pg_sys::ReplicationSlotPersistentData) -> bool {
    false
}

/// Why core invalidated the slot, in the words of `pg_replication_slots.invalidation_reason`.
#[cfg(any(feature = "pg17", feature = "pg18", feature = "pg19"))]
fn invalidation(data: &pg_sys::ReplicationSlotPersistentData) -> Option<&'static str> {
    use pg_sys::ReplicationSlotInvalidationCause as Cause;
    match data.invalidated {
        Cause::RS_INVAL_NONE => None,
        Cause::RS_INVAL_WAL_REMOVED => Some("wal_removed"),
        Cause::RS_INVAL_HORIZON => Some("rows_removed"),
        Cause::RS_INVAL_WAL_LEVEL => Some("wal_level_insufficient"),
        #[cfg(any(feature = "pg18", feature = "pg19"))]
        Cause::RS_INVAL_IDLE_TIMEOUT => Some("idle_timeout"),
        _ => Some("unknown"),
    }
}

/// PostgreSQL 15 says only that a slot was invalidated (its restart LSN cleared, the LSN of
/// the invalidation kept), and the one cause it has is WAL removed by
/// max_slot_wal_keep_size (it shows the slot as `wal_status = 'lost'`).
#[cfg(not(any(feature = "pg17", feature = "pg18", feature = "pg19")))]
fn invalidation(data: &pg_sys::ReplicationSlotPersistentData) -> Option<&'static str> {
    (data.restart_lsn == 0 && data.invalidated_at != 0).then_some("wal_removed")
}

/// A slot's name as a pass keeps it: ASCII names (most) without a UTF-8 check; a byte
/// that is not UTF-8 becomes U+FFFD.
fn name_of(b: &[u8]) -> crate::policy::Name {
    if b.is_ascii() {
        // SAFETY: ASCII bytes are UTF-8.
        crate::policy::Name::from(unsafe { std::str::from_utf8_unchecked(b) })
    } else {
        crate::policy::Name::from(String::from_utf8_lossy(b))
    }
}

/// What `pg_replication_slots` shows of a slot, from its copied contents.
fn info(data: &pg_sys::ReplicationSlotPersistentData, active_pid: pg_sys::pid_t, inactive_since: i64) -> SlotInfo {
    use pg_sys::ReplicationSlotPersistency::{RS_EPHEMERAL, RS_TEMPORARY};
    SlotInfo {
        name: name_of(name_bytes(&data.name)),
        // A physical slot belongs to no database (core's SlotIsPhysical).
        physical: data.database == pg_sys::InvalidOid,
        // An ephemeral slot is a logical slot its creator has not finished making (it is
        // dropped if the creation fails): like a temporary one, it is never the guard's to
        // drop. pg_replication_slots shows it as not temporary.
        temporary: data.persistency == RS_TEMPORARY || data.persistency == RS_EPHEMERAL,
        active_pid: (active_pid != 0).then_some(active_pid),
        restart_lsn: (data.restart_lsn != 0).then_some(data.restart_lsn),
        invalidation: invalidation(data),
        core_inactive_since: (inactive_since != 0 && active_pid == 0).then_some(inactive_since),
        // The flag means something only on a standby: a promoted standby's slots keep it,
        // and are its own (core's documentation of pg_replication_slots.synced).
        synced: synced(data) && unsafe { pg_sys::RecoveryInProgress() },
        system: None,
        sender: None,
        // What pg_replication_slots shows as xmin and catalog_xmin (InvalidTransactionId: unset).
        xmin: (data.xmin != pg_sys::InvalidTransactionId).then_some(data.xmin.into_inner()),
        catalog_xmin: (data.catalog_xmin != pg_sys::InvalidTransactionId).then_some(data.catalog_xmin.into_inner()),
        logical: (data.database != pg_sys::InvalidOid).then(|| crate::policy::LogicalInfo {
            plugin: name_of(name_bytes(&data.plugin)),
            database: data.database.to_u32(),
            confirmed_flush: (data.confirmed_flush != 0).then_some(data.confirmed_flush),
            failover: failover(data),
        }),
    }
}

/// Is the slot synchronized to standbys (`failover`, 17+)?
#[cfg(any(feature = "pg17", feature = "pg18", feature = "pg19"))]
fn failover(data: &pg_sys::ReplicationSlotPersistentData) -> bool {
    c_bool!(data.failover)
}

#[cfg(not(any(feature = "pg17", feature = "pg18", feature = "pg19")))]
fn failover(_data: &pg_sys::ReplicationSlotPersistentData) -> bool {
    false
}

/// The next full transaction ID, the reference slot horizons are aged from (as `age()`
/// ages them). Read after the slots, so that no slot's xmin is newer than it. Cheap
/// enough to probe between passes: a shared lock on `XidGenLock` and a copy.
pub fn next_full_xid() -> u64 {
    // SAFETY: reads TransamVariables->nextXid under XidGenLock (shared), in any process
    // attached to shared memory, primary or standby; raises no ERROR.
    unsafe { pg_sys::ReadNextFullTransactionId().value }
}

// ---------------------------------------------------------------------------------------
// Making and dropping slots for the lease state machine (src/machine.rs), through core's
// own slot.c functions rather than SQL: a new lease's slot is made ephemeral (core drops
// an ephemeral slot at any ERROR, and at the next start after a crash) and made persistent
// only once its pending lease is on record; a drop checks, with the slot acquired, that it
// is the slot it means (its directory's identity) before it drops it.

use crate::error::GuardError;
use crate::store::Identity;

/// The identity of a slot's directory (`pg_replslot/<name>`), if it is on disk.
pub fn identity(name: &str) -> Option<Identity> {
    crate::store::file::slot_identity(name)
}

fn c_name(name: &str) -> Result<std::ffi::CString, GuardError> {
    std::ffi::CString::new(name).map_err(|_| GuardError::SlotNameInvalid(crate::validate::cut(name)))
}

/// Make a physical slot `name` that reserves WAL now, as core's
/// `pg_create_physical_replication_slot(name, true)` does, but EPHEMERAL and still
/// acquired by this backend: an ERROR before [`persist_and_release`] drops it (core's
/// error cleanup releases it, and releasing an ephemeral slot drops it), and a crash
/// leaves nothing (core removes ephemeral slots at start). Returns its directory's
/// identity. Raises core's ERROR if a slot of that name exists or none is free.
pub fn create_ephemeral(name: &str) -> Result<Identity, GuardError> {
    let c = c_name(name)?;
    // SAFETY: core's own sequence for a physical slot (slotfuncs.c), in a backend with no
    // slot acquired (a lease call never holds one across calls): CheckSlotRequirements
    // checks max_replication_slots and wal_level; ReplicationSlotCreate raises ERROR on a
    // name in use or no free slot, and leaves the new slot acquired (MyReplicationSlot);
    // ReplicationSlotReserveWal reserves WAL for MyReplicationSlot.
    unsafe { create(&c) };
    // SAFETY: reserves WAL for the slot just made and acquired.
    release_on_error(|| unsafe { pg_sys::ReplicationSlotReserveWal() });
    match identity(name) {
        Some(id) => Ok(id),
        None => {
            release_acquired();
            Err(GuardError::StoreIo(format!("replication slot \"{name}\" has no directory in pg_replslot after it was made")))
        }
    }
}

#[cfg(feature = "pg15")]
unsafe fn create(c: &std::ffi::CStr) {
    // SAFETY: as in create_ephemeral.
    unsafe {
        pg_sys::CheckSlotRequirements();
        pg_sys::ReplicationSlotCreate(c.as_ptr(), false, pg_sys::ReplicationSlotPersistency::RS_EPHEMERAL, false)
    }
}

#[cfg(any(feature = "pg17", feature = "pg18"))]
unsafe fn create(c: &std::ffi::CStr) {
    // SAFETY: as in create_ephemeral (no two-phase, no failover, not synced).
    unsafe {
        pg_sys::CheckSlotRequirements();
        pg_sys::ReplicationSlotCreate(c.as_ptr(), false, pg_sys::ReplicationSlotPersistency::RS_EPHEMERAL, false, false, false)
    }
}

#[cfg(feature = "pg19")]
unsafe fn create(c: &std::ffi::CStr) {
    // SAFETY: as in create_ephemeral (no two-phase, not REPACK's, no failover, not synced).
    unsafe {
        pg_sys::CheckSlotRequirements(false);
        pg_sys::ReplicationSlotCreate(c.as_ptr(), false, pg_sys::ReplicationSlotPersistency::RS_EPHEMERAL, false, false, false, false)
    }
}

/// The options of a new logical slot (`backup_slot_lease(..., plugin => ...)`).
pub struct LogicalOptions<'a> {
    pub plugin: &'a str,
    pub two_phase: bool,
    /// Synchronized to standbys (17+).
    pub failover: bool,
}

/// Make a logical slot `name` in the current database, as core's
/// `pg_create_logical_replication_slot` does (slotfuncs.c): EPHEMERAL and acquired until
/// [`persist_and_release`], its decoding start point found (which waits for transactions
/// running now to end, as core's does). Core refuses it in a transaction that has written
/// anything (its snapshot must not see that transaction's own writes): a logical lease is
/// the first write of its transaction. Returns the directory's identity.
pub fn create_ephemeral_logical(name: &str, opt: &LogicalOptions) -> Result<Identity, GuardError> {
    let c = c_name(name)?;
    let plugin = std::ffi::CString::new(opt.plugin).map_err(|_| GuardError::BadPlugin(crate::validate::cut(opt.plugin)))?;
    // SAFETY: core's own sequence (create_logical_replication_slot in slotfuncs.c), in a
    // backend with no slot acquired: the checks raise their ERRORs; ReplicationSlotCreate
    // leaves the new slot acquired; CreateInitDecodingContext loads the output plugin (an
    // ERROR if it does not exist), reserves WAL and the catalog horizon for the slot;
    // DecodingContextFindStartpoint reads WAL up to a consistent point; the context is
    // freed after. The reader callbacks are core's own functions (raw, below).
    unsafe { create_logical(&c, opt.two_phase, opt.failover) };
    // An ERROR from here on (no such plugin, a transaction that has written, a cancel while
    // it waits for a consistent point) must not leave the slot acquired: released, the
    // ephemeral slot is dropped (also where a savepoint or PL/pgSQL block catches the ERROR).
    release_on_error(|| unsafe {
        let mut routine = pg_sys::XLogReaderRoutine {
            page_read: Some(raw::read_local_xlog_page),
            segment_open: Some(raw::wal_segment_open),
            segment_close: Some(raw::wal_segment_close),
        };
        let ctx = init_decoding_context(&plugin, &mut routine);
        pg_sys::DecodingContextFindStartpoint(ctx);
        pg_sys::FreeDecodingContext(ctx);
    });
    match identity(name) {
        Some(id) => Ok(id),
        None => {
            release_acquired();
            Err(GuardError::StoreIo(format!("replication slot \"{name}\" has no directory in pg_replslot after it was made")))
        }
    }
}

/// core's CreateInitDecodingContext for a new slot of ours: no full snapshot, the restart
/// point found by core (and on 19, not REPACK's).
#[cfg(not(feature = "pg19"))]
unsafe fn init_decoding_context(plugin: &std::ffi::CStr, routine: &mut pg_sys::XLogReaderRoutine) -> *mut pg_sys::LogicalDecodingContext {
    // SAFETY: see create_ephemeral_logical.
    unsafe { pg_sys::CreateInitDecodingContext(plugin.as_ptr(), std::ptr::null_mut(), false, 0, routine, None, None, None) }
}

#[cfg(feature = "pg19")]
unsafe fn init_decoding_context(plugin: &std::ffi::CStr, routine: &mut pg_sys::XLogReaderRoutine) -> *mut pg_sys::LogicalDecodingContext {
    // SAFETY: see create_ephemeral_logical.
    unsafe { pg_sys::CreateInitDecodingContext(plugin.as_ptr(), std::ptr::null_mut(), false, false, 0, routine, None, None, None) }
}

#[cfg(feature = "pg15")]
unsafe fn create_logical(c: &std::ffi::CStr, two_phase: bool, _failover: bool) {
    // SAFETY: as in create_ephemeral_logical (failover is refused on 15 before this).
    unsafe {
        pg_sys::CheckSlotRequirements();
        pg_sys::CheckLogicalDecodingRequirements();
        pg_sys::ReplicationSlotCreate(c.as_ptr(), true, pg_sys::ReplicationSlotPersistency::RS_EPHEMERAL, two_phase)
    }
}

#[cfg(any(feature = "pg17", feature = "pg18"))]
unsafe fn create_logical(c: &std::ffi::CStr, two_phase: bool, failover: bool) {
    // SAFETY: as in create_ephemeral_logical.
    unsafe {
        pg_sys::CheckSlotRequirements();
        pg_sys::CheckLogicalDecodingRequirements();
        pg_sys::ReplicationSlotCreate(c.as_ptr(), true, pg_sys::ReplicationSlotPersistency::RS_EPHEMERAL, two_phase, failover, false)
    }
}

/// On 19 logical decoding needs only `wal_level = replica`: the first logical slot turns
/// it on (`effective_wal_level` becomes `logical`), as core's
/// pg_create_logical_replication_slot does before it builds the decoding context.
#[cfg(feature = "pg19")]
unsafe fn create_logical(c: &std::ffi::CStr, two_phase: bool, failover: bool) {
    // SAFETY: as in create_ephemeral_logical (not REPACK's, not synced).
    unsafe {
        pg_sys::CheckSlotRequirements(false);
        pg_sys::CheckLogicalDecodingRequirements(false);
        pg_sys::ReplicationSlotCreate(c.as_ptr(), true, pg_sys::ReplicationSlotPersistency::RS_EPHEMERAL, two_phase, false, failover, false);
    }
    release_on_error(|| unsafe { pg_sys::EnsureLogicalDecodingEnabled() });
}

/// Does this server make failover slots (17+)?
pub const FAILOVER_SLOTS: bool = cfg!(any(feature = "pg17", feature = "pg18", feature = "pg19"));

/// The slot this backend holds now: its consistent point (a logical slot's
/// `confirmed_flush`), read before it is released.
pub fn acquired_confirmed_flush() -> Option<u64> {
    // SAFETY: reads a field of the slot this backend acquired, if any.
    unsafe {
        let slot = pg_sys::MyReplicationSlot;
        if slot.is_null() {
            return None;
        }
        let lsn = (*slot).data.confirmed_flush;
        (lsn != 0).then_some(lsn)
    }
}

/// Core's WAL reader callbacks, as plain C functions (the bindings wrap each for calls from
/// Rust; a callback must be the function itself).
mod raw {
    use pgrx::pg_sys::{TimeLineID, XLogReaderState, XLogRecPtr, XLogSegNo};
    unsafe extern "C-unwind" {
        pub fn read_local_xlog_page(
            state: *mut XLogReaderState,
            target_page_ptr: XLogRecPtr,
            req_len: std::ffi::c_int,
            target_rec_ptr: XLogRecPtr,
            cur_page: *mut std::ffi::c_char,
        ) -> std::ffi::c_int;
        pub fn wal_segment_open(state: *mut XLogReaderState, next_seg_no: XLogSegNo, tli_p: *mut TimeLineID);
        pub fn wal_segment_close(state: *mut XLogReaderState);
    }
}

/// Make the slot this backend made with [`create_ephemeral`] persistent (saved to disk,
/// as core's ReplicationSlotPersist does) and release it; returns its restart LSN.
pub fn persist_and_release() -> Option<u64> {
    // SAFETY: MyReplicationSlot is the slot create_ephemeral left acquired (the caller
    // calls this right after recording its pending lease); ReplicationSlotPersist saves
    // it (an ERROR there leaves it acquired, and core's error cleanup releases it, now
    // persistent: the pending lease's abort then drops it).
    unsafe {
        let slot = pg_sys::MyReplicationSlot;
        if slot.is_null() {
            return None;
        }
        pg_sys::ReplicationSlotPersist();
        let lsn = (*slot).data.restart_lsn;
        pg_sys::ReplicationSlotRelease();
        (lsn != 0).then_some(lsn)
    }
}

/// Run `f` (core calls on the slot this backend just made, still ephemeral); on an ERROR,
/// release the slot (which drops it) before the ERROR goes on.
fn release_on_error<T>(f: impl FnOnce() -> T) -> T {
    pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(f))
        .catch_others(|e| {
            release_acquired();
            e.rethrow()
        })
        .execute()
}

/// Release the slot this backend holds, if any (an ephemeral one is dropped by it).
pub fn release_acquired() {
    // SAFETY: releases only a slot this backend acquired.
    unsafe {
        if !pg_sys::MyReplicationSlot.is_null() {
            pg_sys::ReplicationSlotRelease();
        }
    }
}

/// Why a drop by identity did not happen, when it did not raise core's ERROR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotDropped {
    /// No slot of the name exists.
    Gone,
    /// The slot of the name is another one (made since), synchronized from the primary, or
    /// core's own (19).
    NotTheSame,
    /// A process holds it.
    Active(i32),
}

/// Drop the slot `name` if it is the one `expected` names (any slot of the name when
/// `None`): the slot is acquired first (so that no one else drops or makes it meanwhile),
/// its directory's identity checked, then it is dropped as core's ReplicationSlotDrop
/// drops it. Never drops a slot synchronized from a primary (17+). Core's ERRORs on the
/// way (a failed rename) propagate.
pub fn drop_if_same(name: &str, expected: Option<Identity>) -> Result<Result<(), NotDropped>, GuardError> {
    let Some(now) = one(name) else { return Ok(Err(NotDropped::Gone)) };
    if let Some(pid) = now.active_pid {
        return Ok(Err(NotDropped::Active(pid)));
    }
    // A standby's copy of the primary's slot, or core's own (19): never ours to drop, whatever
    // asked (the pass never does: both are out of every scope).
    if now.synced || now.system.is_some() {
        return Ok(Err(NotDropped::NotTheSame));
    }
    let c = c_name(name)?;
    // SAFETY: acquire nowait: ERROR if the slot went or became active since the look
    // above (propagated to the caller, which runs this in a subtransaction or reports it).
    unsafe { acquire(&c) };
    let same = match (expected, identity(name)) {
        (Some(want), Some(here)) => want.same(&here),
        (None, _) => true,
        (Some(_), None) => false,
    };
    if !same {
        release_acquired();
        return Ok(Err(NotDropped::NotTheSame));
    }
    // SAFETY: the slot is acquired by this backend (MyReplicationSlot) and is the one meant.
    unsafe { drop_acquired() };
    Ok(Ok(()))
}

#[cfg(any(feature = "pg18", feature = "pg19"))]
unsafe fn acquire(c: &std::ffi::CStr) {
    // SAFETY: see drop_if_same. An invalidated slot may be dropped (error_if_invalid off).
    unsafe { pg_sys::ReplicationSlotAcquire(c.as_ptr(), true, false) }
}

#[cfg(not(any(feature = "pg18", feature = "pg19")))]
unsafe fn acquire(c: &std::ffi::CStr) {
    // SAFETY: see drop_if_same.
    unsafe { pg_sys::ReplicationSlotAcquire(c.as_ptr(), true) }
}

#[cfg(any(feature = "pg17", feature = "pg18"))]
unsafe fn drop_acquired() {
    // SAFETY: MyReplicationSlot is acquired; this is the second half of core's
    // ReplicationSlotDrop.
    unsafe { pg_sys::ReplicationSlotDropAcquired() }
}

/// On 19 a drop also asks for logical decoding to be turned off when the slot was the
/// last logical one and `wal_level` is `replica` (`effective_wal_level`), as core's own
/// ReplicationSlotDrop asks (try_disable).
#[cfg(feature = "pg19")]
unsafe fn drop_acquired() {
    // SAFETY: as above.
    unsafe { pg_sys::ReplicationSlotDropAcquired(true) }
}

/// PostgreSQL 15 does not export ReplicationSlotDropAcquired. Its ReplicationSlotRelease
/// drops an acquired slot whose persistency is ephemeral (slot.c: "Delete the slot"), by
/// that same function: the slot, acquired and checked, is marked ephemeral in memory and
/// released. Its on-disk state says persistent until the drop renames its directory away,
/// so a crash in between keeps it, exactly as a crash inside core's own drop does.
#[cfg(feature = "pg15")]
unsafe fn drop_acquired() {
    // SAFETY: MyReplicationSlot is acquired by this backend; persistency is changed under
    // the slot's spinlock, as ReplicationSlotPersist changes it.
    unsafe {
        let slot = pg_sys::MyReplicationSlot;
        spin_acquire(&raw mut (*slot).mutex);
        (*slot).data.persistency = pg_sys::ReplicationSlotPersistency::RS_EPHEMERAL;
        spin_release(&raw mut (*slot).mutex);
        pg_sys::ReplicationSlotRelease();
    }
}

/// The role of the process with PID `pid` (a walsender holding a slot), if it is a server
/// process with a role.
pub fn role_of(pid: i32) -> Option<pg_sys::Oid> {
    // SAFETY: BackendPidGetProc looks the PID up in the proc array under ProcArrayLock
    // and returns its PGPROC or NULL; roleId is set at connection and not changed after.
    unsafe {
        let proc_ = pg_sys::BackendPidGetProc(pid);
        (!proc_.is_null()).then(|| (*proc_).roleId).filter(|r| *r != pg_sys::InvalidOid)
    }
}

/// May `role` terminate the process `pid`, as core's pg_terminate_backend decides it
/// (signalfuncs.c): a superuser may; nobody else may signal a superuser's process; a role
/// may signal its own processes (those of a role it has the privileges of) and, as a
/// member of pg_signal_backend, any other.
pub fn may_terminate(role: pg_sys::Oid, pid: i32) -> bool {
    // SAFETY: plain catalog-cache lookups of role attributes and memberships.
    unsafe {
        if pg_sys::superuser_arg(role) {
            return true;
        }
        let Some(target) = role_of(pid) else { return false };
        if pg_sys::superuser_arg(target) {
            return false;
        }
        pg_sys::has_privs_of_role(role, target) || pg_sys::has_privs_of_role(role, pg_sys::Oid::from(pg_sys::ROLE_PG_SIGNAL_BACKEND))
    }
}
