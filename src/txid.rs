//! Whose change a pending lease record holds, and where that transaction stands: the one
//! place that asks the server about transactions (the commit log, the proc array, the
//! lock manager). The store keeps a change as "what the lease becomes if this transaction
//! commits" (`store::PendingRec`); this module says whether it did.
//!
//! - On a primary a change carries its (sub)transaction ID, assigned by the call. Its fate
//!   is the commit log's, so nothing is written to the store at commit, and a crash at any
//!   point leaves a record whose meaning the next reader can look up.
//! - On a hot standby no transaction ID can be assigned: a change carries its virtual
//!   transaction ID and the generation of the store's shared memory (made anew at every
//!   start). There the store is written at pre-commit, so a change still pending when its
//!   transaction has ended, or from an earlier life of the server, did not commit.

use pgrx::pg_sys;
use serde::{Deserialize, Serialize};

/// A transaction of this server that has no transaction ID (a hot standby's): a virtual
/// transaction ID, within one life of the server's shared memory (`gen`, made anew at
/// every start and crash restart). Kept in the store's records (`store::PendingRec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LocalXact {
    pub gen: i64,
    pub proc: i32,
    pub lxid: u32,
}

/// Who made a pending change: its transaction ID (on a primary) or its local transaction
/// (on a hot standby). The store's `PendingRec` is one.
pub trait Maker {
    fn xid(&self) -> Option<u32>;
    fn local(&self) -> Option<&LocalXact>;
}

/// Where the transaction of a pending change stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// This backend's own transaction (or one of its subtransactions).
    Mine,
    /// Another transaction, still running.
    Running,
    Committed,
    /// Rolled back, or cut short by a crash.
    Aborted,
}

/// Who makes a change now: this transaction, assigning it a transaction ID on a primary
/// (the change needs one, as a row lock does). `gen` is the store's generation.
pub fn current(gen: i64) -> (Option<u32>, Option<LocalXact>) {
    if in_recovery() {
        (None, Some(current_local(gen)))
    } else {
        // SAFETY: assigns (or returns) the current (sub)transaction's ID, in a transaction on
        // a primary; an ERROR it raises (xid wraparound protection) aborts the call.
        (Some(u32::from(unsafe { pg_sys::GetCurrentTransactionId() })), None)
    }
}

fn in_recovery() -> bool {
    // SAFETY: reads a flag in shared memory.
    unsafe { pg_sys::RecoveryInProgress() }
}

#[cfg(feature = "pg15")]
fn current_local(gen: i64) -> LocalXact {
    // SAFETY: MyProc is this backend's PGPROC, set for the life of the backend.
    unsafe { LocalXact { gen, proc: (*pg_sys::MyProc).backendId, lxid: (*pg_sys::MyProc).lxid } }
}

#[cfg(not(feature = "pg15"))]
fn current_local(gen: i64) -> LocalXact {
    // SAFETY: MyProc is this backend's PGPROC, set for the life of the backend.
    unsafe { LocalXact { gen, proc: (*pg_sys::MyProc).vxid.procNumber, lxid: (*pg_sys::MyProc).vxid.lxid } }
}

#[cfg(feature = "pg15")]
fn vxid(l: &LocalXact) -> pg_sys::VirtualTransactionId {
    pg_sys::VirtualTransactionId { backendId: l.proc, localTransactionId: l.lxid }
}

#[cfg(not(feature = "pg15"))]
fn vxid(l: &LocalXact) -> pg_sys::VirtualTransactionId {
    pg_sys::VirtualTransactionId { procNumber: l.proc, localTransactionId: l.lxid }
}

/// The oldest transaction ID whose status the commit log still keeps. A change older than
/// that has long been settled (the guard settles every change at its next pass): were one
/// left, its fate is unknown, and it is taken as rolled back only if it made nothing.
#[cfg(feature = "pg15")]
fn oldest_clog_xid() -> pg_sys::TransactionId {
    // SAFETY: a plain read of a field in shared memory (a 32-bit store is atomic); the value
    // only moves forward.
    unsafe { (*pg_sys::ShmemVariableCache).oldestClogXid }
}

#[cfg(not(feature = "pg15"))]
fn oldest_clog_xid() -> pg_sys::TransactionId {
    // SAFETY: as above.
    unsafe { (*pg_sys::TransamVariables).oldestClogXid }
}

/// The fate of a transaction ID (a change's, or a drop intent's).
pub fn xid_fate(xid: u32) -> Fate {
    let x = pg_sys::TransactionId::from(xid);
    // SAFETY: plain lookups in this backend's transaction state, the proc array and the
    // commit log; the ID is checked against the commit log's horizon first, so that
    // TransactionIdDidCommit never reads a truncated page (which would be an ERROR).
    unsafe {
        if pg_sys::TransactionIdIsCurrentTransactionId(x) {
            return Fate::Mine;
        }
        if pg_sys::TransactionIdIsInProgress(x) {
            return Fate::Running;
        }
        let oldest = oldest_clog_xid();
        if pg_sys::TransactionIdPrecedes(x, oldest) {
            // Its status is gone: a change this old was settled long ago or never mattered.
            return Fate::Aborted;
        }
        if pg_sys::TransactionIdDidCommit(x) {
            Fate::Committed
        } else {
            Fate::Aborted
        }
    }
}

/// The fate of a local (standby) transaction: running while its virtual transaction runs;
/// once it has ended, a change still pending did not commit (commit settles it first).
pub fn local_fate(l: &LocalXact, gen: i64) -> Fate {
    if l.gen != gen {
        return Fate::Aborted;
    }
    let mine = current_local(gen);
    if mine == *l {
        return Fate::Mine;
    }
    // SAFETY: VirtualXactLock with wait = false only looks: true when the virtual
    // transaction has ended (no lock is taken or waited for).
    let ended = unsafe { pg_sys::VirtualXactLock(vxid(l), false) };
    if ended {
        Fate::Aborted
    } else {
        Fate::Running
    }
}

/// The fate of a pending change's transaction.
pub fn fate(p: &impl Maker, gen: i64) -> Fate {
    match (p.xid(), p.local()) {
        (Some(x), _) => xid_fate(x),
        (None, Some(l)) => local_fate(l, gen),
        (None, None) => Fate::Aborted,
    }
}

/// Wait for the transaction of another session's pending change to end, as a row lock
/// waits: in the lock manager, so that a deadlock is found and reported, and a cancel or
/// `lock_timeout` ends the wait with an ERROR.
pub fn wait_for(p: &impl Maker) {
    match (p.xid(), p.local()) {
        (Some(x), _) => {
            // SAFETY: waits on the transaction's lock (its top-level one for a
            // subtransaction); no relation or tuple is named.
            unsafe {
                pg_sys::XactLockTableWait(
                    pg_sys::TransactionId::from(x),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    pg_sys::XLTW_Oper::XLTW_None,
                )
            }
        }
        (None, Some(l)) => {
            // SAFETY: waits on the virtual transaction's lock, as CREATE INDEX
            // CONCURRENTLY waits for older transactions; interruptible.
            unsafe {
                pg_sys::VirtualXactLock(vxid(l), true);
            }
        }
        (None, None) => {}
    }
}

/// Sleep `ms` milliseconds on this process's latch, as core's own short waits do: it ends
/// the process if the postmaster is gone, and a cancel or a timeout ends it with its ERROR.
pub fn nap_ms(ms: i64) {
    // SAFETY: a wait on this process's own latch; the interrupt check after it.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms as _,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
}

/// Is this backend's transaction ID `xid` (or one of its subtransactions')?
pub fn is_mine(p: &impl Maker, gen: i64) -> bool {
    match (p.xid(), p.local()) {
        (Some(x), _) => unsafe { pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from(x)) },
        (None, Some(l)) => l.gen == gen && current_local(gen) == *l,
        (None, None) => false,
    }
}

/// Is a server process with this PID still there?
pub fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

unsafe extern "C-unwind" {
    /// replication/message.h, which pgrx's bindings do not include.
    #[cfg(feature = "pg15")]
    fn LogLogicalMessage(prefix: *const std::ffi::c_char, message: *const std::ffi::c_char, size: usize, transactional: bool) -> u64;
    #[cfg(not(feature = "pg15"))]
    fn LogLogicalMessage(
        prefix: *const std::ffi::c_char,
        message: *const std::ffi::c_char,
        size: usize,
        transactional: bool,
        flush: bool,
    ) -> u64;
}

/// Make this (sub)transaction's ID durable in WAL before the store names it on disk.
///
/// A transaction ID that no WAL record carries can be given again after a crash (recovery
/// sets the next ID past the IDs it replays, and no further): a pending change on disk
/// naming it could then be read as another transaction's, running or committed. So before
/// a pending change is written durably, one tiny WAL record carrying the ID is written and
/// flushed: a transactional logical message, prefix `pgslotguard`, empty (logical decoding
/// shows it to a consumer that asks for messages). Nothing on a standby (no IDs there).
pub fn make_durable() {
    if in_recovery() {
        return;
    }
    // SAFETY: called in a transaction on a primary: LogLogicalMessage assigns the current
    // (sub)transaction an ID if it has none and inserts a record carrying it; XLogFlush
    // writes WAL up to it. An ERROR either raises propagates to the caller's transaction.
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            #[cfg(feature = "pg15")]
            {
                let lsn = LogLogicalMessage(c"pgslotguard".as_ptr(), c"".as_ptr(), 0, true);
                pg_sys::XLogFlush(lsn);
            }
            #[cfg(not(feature = "pg15"))]
            {
                // flush = true flushes a non-transactional message only (message.c, 17+).
                let lsn = LogLogicalMessage(c"pgslotguard".as_ptr(), c"".as_ptr(), 0, true, false);
                pg_sys::XLogFlush(lsn);
            }
        })
    }
}

/// The commit of this transaction must reach disk before it returns, whatever
/// `synchronous_commit` says: the lease change it carries is settled from the commit log.
pub fn force_sync_commit() {
    if !in_recovery() {
        // SAFETY: sets a flag of the current transaction, read at commit.
        unsafe { pg_sys::ForceSyncCommit() };
    }
}
