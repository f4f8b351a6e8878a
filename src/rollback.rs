//! Slot creation is not transactional. A slot made by `backup_slot_lease` is remembered
//! here until its transaction ends: on commit it is forgotten, on abort (of the
//! transaction or of the subtransaction that made it) it is dropped, so
//! `BEGIN; SELECT backup_slot_lease('t'); ROLLBACK;` leaves no slot behind.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::ffi::CString;

thread_local! {
    /// Slots created in the current transaction: (name, subtransaction that owns it).
    static PENDING: RefCell<Vec<(String, pg_sys::SubTransactionId)>> = const { RefCell::new(Vec::new()) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Remember a slot this transaction created, to drop it if the transaction aborts.
pub fn created_in_this_transaction(name: &str) {
    if !REGISTERED.get() {
        unsafe {
            pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
        }
        REGISTERED.set(true);
    }
    let subid = unsafe { pg_sys::GetCurrentSubTransactionId() };
    PENDING.with_borrow_mut(|p| p.push((name.to_string(), subid)));
}

/// Drop a slot during abort. An ERROR here would escalate, so it is caught and logged.
fn drop_quietly(name: &str) {
    let Ok(cname) = CString::new(name) else { return };
    let dropped = PgTryBuilder::new(|| {
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
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            let pending = PENDING.with_borrow_mut(std::mem::take);
            for (name, _) in pending {
                drop_quietly(&name);
            }
        }
        XACT_EVENT_PRE_PREPARE => {
            if PENDING.with_borrow(|p| !p.is_empty()) {
                ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "cannot PREPARE a transaction that has leased a replication slot"
                );
            }
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PREPARE => {
            PENDING.with_borrow_mut(|p| p.clear());
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
            let gone: Vec<String> = PENDING.with_borrow_mut(|p| {
                let (gone, keep): (Vec<_>, Vec<_>) = p.drain(..).partition(|(_, s)| *s == my_subid);
                *p = keep;
                gone.into_iter().map(|(n, _)| n).collect()
            });
            for name in gone {
                drop_quietly(&name);
            }
        }
        SUBXACT_EVENT_COMMIT_SUB => PENDING.with_borrow_mut(|p| {
            for entry in p.iter_mut().filter(|(_, s)| *s == my_subid) {
                entry.1 = parent_subid;
            }
        }),
        _ => {}
    }
}
