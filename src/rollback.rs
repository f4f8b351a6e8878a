//! Slot creation and drops are not transactional; leases are. So the slot side effects of
//! the lease functions follow their transaction here:
//! * a slot made by `backup_slot_lease` is remembered until its transaction ends: on
//!   commit it is forgotten, on abort (of the transaction or of the subtransaction that
//!   made it) it is dropped, so `BEGIN; SELECT backup_slot_lease('t'); ROLLBACK;` leaves
//!   no slot behind;
//! * a slot released by `backup_slot_release` is dropped only when its transaction
//!   commits (in the pre-commit step, where an ERROR — the slot became active meanwhile —
//!   still aborts the commit, so the lease and its slot never part ways); on abort it is
//!   left as it was, with its lease.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::ffi::CString;

thread_local! {
    /// Slots created in the current transaction: (name, subtransaction that owns it).
    static PENDING: RefCell<Vec<(String, pg_sys::SubTransactionId)>> = const { RefCell::new(Vec::new()) };
    /// Slots released in the current transaction, dropped at commit: (name, subtransaction).
    static RELEASED: RefCell<Vec<(String, pg_sys::SubTransactionId)>> = const { RefCell::new(Vec::new()) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// A lease call in this transaction changed a lease: wake the guard at commit.
    static WAKE: Cell<bool> = const { Cell::new(false) };
    /// This transaction changed the lease or tracking table (`tables_changed`).
    static TABLES: Cell<bool> = const { Cell::new(false) };
}

fn register() {
    if !REGISTERED.get() {
        // SAFETY: the callbacks are plain functions that live as long as the library; they
        // are registered once per backend.
        unsafe {
            pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
        }
        REGISTERED.set(true);
    }
}

fn current_subxact() -> pg_sys::SubTransactionId {
    // SAFETY: only reads the transaction state of this backend.
    unsafe { pg_sys::GetCurrentSubTransactionId() }
}

/// Remember a slot this transaction created, to drop it if the transaction aborts.
pub fn created_in_this_transaction(name: &str) {
    register();
    PENDING.with_borrow_mut(|p| p.push((name.to_string(), current_subxact())));
}

/// Wake the guard worker when this transaction commits (not before: until then the worker
/// would read the old state). Many commits in a row wake it once per pass at most
/// (src/worker.rs spaces passes woken this way).
pub fn wake_guard_at_commit() {
    register();
    WAKE.set(true);
}

/// The statement trigger on the lease and tracking tables: this transaction changed them.
/// When it ends, reads of them kept by any backend are read again (state::Tables).
pub fn tables_changed() {
    register();
    TABLES.set(true);
}

#[pg_schema]
mod pgslotguard {
    use pgrx::prelude::*;

    /// Statement trigger (AFTER, FOR EACH STATEMENT) on the lease and tracking tables: when
    /// the transaction ends, reads of them that backends keep are read again (state.rs).
    #[pg_trigger]
    fn tables_changed<'a>(_trigger: &'a PgTrigger<'a>) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgHeapTupleError> {
        super::tables_changed();
        Ok(None)
    }
}

/// Has this transaction changed the lease or tracking table?
pub fn tables_changed_here() -> bool {
    TABLES.get()
}

/// Drop this slot when the transaction commits (not before: a rollback keeps it).
pub fn drop_at_commit(name: &str) {
    register();
    RELEASED.with_borrow_mut(|p| p.push((name.to_string(), current_subxact())));
}

/// Drop the released slots now, in the pre-commit step. An ERROR here aborts the commit.
fn drop_released() {
    let released = RELEASED.with_borrow_mut(std::mem::take);
    for (name, _) in released {
        let Ok(cname) = CString::new(name.as_str()) else { continue };
        // If a lease of this same transaction created the slot, it is no longer pending.
        PENDING.with_borrow_mut(|p| p.retain(|(n, _)| n != &name));
        // SAFETY: ReplicationSlotDrop(name, nowait) acquires the slot (ERROR if it is
        // active or gone) and drops it; we are in a valid transaction state before commit.
        unsafe { pg_sys::ReplicationSlotDrop(cname.as_ptr(), true) };
    }
}

/// Drop a slot during abort. An ERROR here would escalate, so it is caught and logged.
fn drop_quietly(name: &str) {
    let Ok(cname) = CString::new(name) else { return };
    let dropped = PgTryBuilder::new(|| {
        // SAFETY: during abort, after the aborting transaction released its resources;
        // ReplicationSlotDrop needs no snapshot or catalog access, and an ERROR it raises
        // is caught right here (an ERROR escaping an abort callback would be a PANIC).
        unsafe { pg_sys::ReplicationSlotDrop(cname.as_ptr(), true) };
        true
    })
    .catch_others(|e| {
        let msg = crate::error::caught_message(&e);
        warning!("pgslotguard: could not drop replication slot \"{name}\" of a rolled-back lease: {msg}");
        false
    })
    .execute();
    if dropped {
        log!("pgslotguard: dropped replication slot \"{name}\": the lease that created it was rolled back");
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PARALLEL_PRE_COMMIT => drop_released(),
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            WAKE.set(false);
            if TABLES.replace(false) {
                crate::shmem::tables_changed();
            }
            RELEASED.with_borrow_mut(|r| r.clear());
            let pending = PENDING.with_borrow_mut(std::mem::take);
            for (name, _) in pending {
                drop_quietly(&name);
            }
        }
        XACT_EVENT_PRE_PREPARE => {
            if PENDING.with_borrow(|p| !p.is_empty()) || RELEASED.with_borrow(|p| !p.is_empty()) {
                ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "cannot PREPARE a transaction that has leased or released a replication slot"
                );
            }
            if TABLES.get() {
                // Its changes would become visible at COMMIT PREPARED, perhaps in another
                // session, where no trigger of ours runs to tell the kept reads.
                ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "cannot PREPARE a transaction that has changed pgslotguard's lease or tracking table"
                );
            }
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PREPARE => {
            PENDING.with_borrow_mut(|p| p.clear());
            if TABLES.replace(false) {
                crate::shmem::tables_changed();
            }
            if WAKE.replace(false) {
                crate::shmem::wake_worker();
            }
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    parent_subid: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    match event {
        SUBXACT_EVENT_ABORT_SUB => {
            RELEASED.with_borrow_mut(|r| r.retain(|(_, s)| *s != my_subid));
            let gone: Vec<String> = PENDING.with_borrow_mut(|p| {
                let (gone, keep): (Vec<_>, Vec<_>) = p.drain(..).partition(|(_, s)| *s == my_subid);
                *p = keep;
                gone.into_iter().map(|(n, _)| n).collect()
            });
            for name in gone {
                drop_quietly(&name);
            }
        }
        SUBXACT_EVENT_COMMIT_SUB => {
            for list in [&PENDING, &RELEASED] {
                list.with_borrow_mut(|p| {
                    for entry in p.iter_mut().filter(|(_, s)| *s == my_subid) {
                        entry.1 = parent_subid;
                    }
                })
            }
        }
        _ => {}
    }
}
