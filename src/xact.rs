//! Lease calls follow their transaction. This module remembers, per backend, what the
//! current transaction changed (src/machine.rs makes each change) and hands it back to the
//! machine at the transaction's end:
//! * pre-commit: the machine checks that the guard did not take a changed lease's slot
//!   meanwhile (an ERROR there aborts the commit) and marks the changes as committing;
//! * commit: the machine settles them (a release drops its slot now);
//! * abort, or a subtransaction's abort: the machine takes back that (sub)transaction's
//!   changes, and drops a slot a rolled-back lease made;
//! * PREPARE TRANSACTION is refused for a transaction with lease changes;
//! * a guard drop made by `backup_slot_enforce()` in this transaction keeps its intent
//!   until the transaction has committed its event ([`forget_at_commit`]); rolled back,
//!   the intent stays and the guard's next pass records the drop.
//!
//! Nothing here holds a lock across a statement of the user's transaction.

use crate::machine::{self, Staged};
use crate::policy::Outcome;
use crate::txid::{self, Fate};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};

/// One change remembered with the subtransaction that made it.
struct Entry {
    subxact: pg_sys::SubTransactionId,
    staged: Staged,
}

thread_local! {
    /// Changes of the current transaction, in call order.
    static STAGED: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
    /// Records a standby's pre-commit wrote, as they were before: put back if the
    /// transaction aborts after all.
    static UNDO: RefCell<Vec<crate::store::SlotRecord>> = const { RefCell::new(Vec::new()) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// Guard drops made in this transaction (`backup_slot_enforce()`): (slot, event,
    /// whether the drop warned of a loop), forgotten once the transaction has committed.
    static FORGET: RefCell<Vec<(String, Outcome, bool)>> = const { RefCell::new(Vec::new()) };
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

/// How many changes to one lease one transaction may nest in subtransactions.
const MAX_NESTED: usize = 16;

/// Remember a change the machine made for this transaction.
pub fn remember(staged: Staged) {
    register();
    let sub = current_subxact();
    STAGED.with_borrow_mut(|s| s.push(Entry { subxact: sub, staged }));
}

/// Refuse a change that would nest too deep (each level is a record to put back).
pub fn room_for(name: &str) -> Result<(), crate::error::GuardError> {
    let n = STAGED.with_borrow(|s| s.iter().filter(|e| e.staged.name == name).count());
    if n >= MAX_NESTED {
        return Err(crate::error::GuardError::TooManyNested(name.into()));
    }
    Ok(())
}

/// A guard drop this transaction made and recorded: its intent goes once the transaction
/// has committed, if the (sub)transaction that wrote the event committed with it; in any
/// other case the intent stays and the guard's next pass records the drop.
pub fn forget_at_commit(name: &str, action: Outcome, loop_warned: bool) {
    register();
    FORGET.with_borrow_mut(|f| f.push((name.to_string(), action, loop_warned)));
}

/// After the commit: forget the intents whose events committed.
fn forget_committed() {
    let drops = FORGET.with_borrow_mut(std::mem::take);
    for (name, action, loop_warned) in drops {
        let r = PgTryBuilder::new(|| {
            let committed = crate::store::record(&name)
                .map_err(|e| e.to_string())?
                .and_then(|r| r.seen)
                .and_then(|s| s.dropping)
                .and_then(|i| i.xid)
                .is_some_and(|x| txid::xid_fate(x) == Fate::Committed || txid::xid_fate(x) == Fate::Mine);
            if committed {
                machine::forget_dropped(&name, action, loop_warned).map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .catch_others(|e| Err(crate::error::caught_message(&e)))
        .execute();
        if let Err(e) = r {
            warning!("pgslotguard: could not forget the dropped replication slot \"{name}\": {e}; the guard's next pass does");
        }
    }
}

fn staged_now() -> Vec<Staged> {
    STAGED.with_borrow(|s| s.iter().map(|e| e.staged.clone()).collect())
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PARALLEL_PRE_COMMIT => {
            let staged = staged_now();
            if !staged.is_empty() {
                match machine::precommit(&staged) {
                    Ok(undo) => UNDO.set(undo),
                    Err(e) => e.report(),
                }
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            // The drops' events rolled back: their intents stay for the guard to record.
            FORGET.with_borrow_mut(|f| f.clear());
            let staged = STAGED.with_borrow_mut(std::mem::take).into_iter().map(|e| e.staged).collect::<Vec<_>>();
            let undo = UNDO.take();
            if !staged.is_empty() || !undo.is_empty() {
                machine::abort(&staged, undo);
            }
        }
        XACT_EVENT_PRE_PREPARE => {
            if STAGED.with_borrow(|s| !s.is_empty()) {
                ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "cannot PREPARE a transaction that has leased, renewed, released or kept a replication slot"
                );
            }
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PREPARE => {
            let staged = STAGED.with_borrow_mut(std::mem::take).into_iter().map(|e| e.staged).collect::<Vec<_>>();
            UNDO.take();
            if !staged.is_empty() {
                machine::commit(&staged);
            }
            forget_committed();
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
            let gone: Vec<Staged> = STAGED.with_borrow_mut(|s| {
                let (gone, keep): (Vec<_>, Vec<_>) = s.drain(..).partition(|e| e.subxact == my_subid);
                *s = keep;
                gone.into_iter().map(|e| e.staged).collect()
            });
            if !gone.is_empty() {
                machine::subabort(&gone);
            }
        }
        SUBXACT_EVENT_COMMIT_SUB => {
            STAGED.with_borrow_mut(|s| {
                for e in s.iter_mut().filter(|e| e.subxact == my_subid) {
                    e.subxact = parent_subid;
                }
            });
        }
        _ => {}
    }
}
