//! Core's replication slots, read straight from shared memory the way
//! `pg_get_replication_slots()` reads them: the slot array under
//! `ReplicationSlotControlLock` (shared), each slot copied under its spinlock and examined
//! after the spinlock is released. A pass reads every slot this way instead of querying
//! `pg_replication_slots` through SPI: no plan, no tuplestore, no LSN turned into text and
//! back. The extension's own tables are still read through SPI (state.rs). The walsender
//! that holds an active slot is read the way `pg_stat_get_wal_senders()` reads it (what
//! `pg_stat_replication` shows): how far it has sent, and its client written and flushed.

use crate::policy::{Sender, SlotInfo};
use pgrx::pg_sys;

/// `ReplicationSlotControlLock` is `MainLWLockArray[37]` (src/include/storage/
/// lwlocknames.h). Core never renumbers the individual LWLocks (lwlocknames.txt keeps a
/// retired number unused), and 37 holds on every version from 13 to 18.
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
        if ctl.is_null() || max <= 0 {
            return out;
        }
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(REPLICATION_SLOT_CONTROL_LOCK)).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_SHARED);
        let base = (&raw mut (*ctl).replication_slots).cast::<pg_sys::ReplicationSlot>();
        for i in 0..max as usize {
            let slot = base.add(i);
            if !(*slot).in_use || !want(name_bytes(&(*slot).data.name)) {
                continue;
            }
            spin_acquire(&raw mut (*slot).mutex);
            let active_pid = (*slot).active_pid;
            let data = (*slot).data;
            let inactive_since = core_inactive_since(&*slot);
            spin_release(&raw mut (*slot).mutex);
            out.push(info(&data, active_pid, inactive_since));
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

/// Core's `inactive_since` (PostgreSQL 17 and later), 0 when unset.
#[cfg(any(feature = "pg17", feature = "pg18"))]
fn core_inactive_since(slot: &pg_sys::ReplicationSlot) -> i64 {
    slot.inactive_since
}

#[cfg(not(any(feature = "pg17", feature = "pg18")))]
fn core_inactive_since(_slot: &pg_sys::ReplicationSlot) -> i64 {
    0
}

/// Is the slot a standby's copy of a primary's slot (slot synchronisation, 17+)?
#[cfg(any(feature = "pg17", feature = "pg18"))]
fn synced(data: &pg_sys::ReplicationSlotPersistentData) -> bool {
    // a C bool, which the bindings give as a bool or an i8 depending on the version
    #[allow(clippy::unnecessary_cast)]
    let v = data.synced as i32;
    v != 0
}

#[cfg(not(any(feature = "pg17", feature = "pg18")))]
fn synced(_data: &pg_sys::ReplicationSlotPersistentData) -> bool {
    false
}

/// Why core invalidated the slot, in the words of `pg_replication_slots.invalidation_reason`.
#[cfg(any(feature = "pg17", feature = "pg18"))]
fn invalidation(data: &pg_sys::ReplicationSlotPersistentData) -> Option<&'static str> {
    use pg_sys::ReplicationSlotInvalidationCause as Cause;
    match data.invalidated {
        Cause::RS_INVAL_NONE => None,
        Cause::RS_INVAL_WAL_REMOVED => Some("wal_removed"),
        Cause::RS_INVAL_HORIZON => Some("rows_removed"),
        Cause::RS_INVAL_WAL_LEVEL => Some("wal_level_insufficient"),
        #[cfg(feature = "pg18")]
        Cause::RS_INVAL_IDLE_TIMEOUT => Some("idle_timeout"),
        _ => Some("unknown"),
    }
}

/// PostgreSQL 15 says only that a slot was invalidated (its restart LSN cleared, the LSN of
/// the invalidation kept), and the one cause it has is WAL removed by
/// max_slot_wal_keep_size (it shows the slot as `wal_status = 'lost'`).
#[cfg(not(any(feature = "pg17", feature = "pg18")))]
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
        synced: synced(data),
        sender: None,
        // What pg_replication_slots shows as xmin and catalog_xmin (InvalidTransactionId: unset).
        xmin: (data.xmin != pg_sys::InvalidTransactionId).then_some(data.xmin.into_inner()),
        catalog_xmin: (data.catalog_xmin != pg_sys::InvalidTransactionId).then_some(data.catalog_xmin.into_inner()),
    }
}

/// The next full transaction ID, the reference slot horizons are aged from (as `age()`
/// ages them). Read after the slots, so that no slot's xmin is newer than it. Cheap
/// enough to probe between passes: a shared lock on `XidGenLock` and a copy.
pub fn next_full_xid() -> u64 {
    // SAFETY: reads TransamVariables->nextXid under XidGenLock (shared), in any process
    // attached to shared memory, primary or standby; raises no ERROR.
    unsafe { pg_sys::ReadNextFullTransactionId().value }
}
