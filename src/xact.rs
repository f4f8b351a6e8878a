//! Lease calls follow their transaction, although neither slots nor the store are
//! transactional:
//! * a slot made by `backup_slot_lease` is remembered until its transaction ends: on
//!   commit it is forgotten, on abort (of the transaction or of the subtransaction that
//!   made it) it is dropped, so `BEGIN; SELECT backup_slot_lease('t'); ROLLBACK;` leaves
//!   no slot behind;
//! * a change to a lease (taken, renewed, ended) is staged in this backend and applied to
//!   the store at `XACT_EVENT_PRE_COMMIT` (where an ERROR still aborts the commit), under
//!   the store's writers' lock for that moment only: no lock the guard needs is held
//!   across a statement of a user's transaction, so an open transaction never stalls the
//!   guard, and the guard sees a change only once it commits;
//! * at commit each staged change is checked against the store as it is then: a lease
//!   that the guard ended or is dropping meanwhile, or that another session changed,
//!   fails the commit with a clear error instead of being silently overwritten;
//! * a released slot is dropped at that same moment, so a rolled-back release keeps slot
//!   and lease; a change applied at pre-commit whose transaction still aborts afterwards
//!   is put back at abort;
//! * a guard drop made by `backup_slot_enforce()` in this transaction keeps its intent
//!   until the transaction has committed its event ([`forget_at_commit`]); rolled back,
//!   the intent stays and the guard's next pass records the drop.

use crate::error::GuardError;
use crate::policy::Outcome;
use crate::store::{self, LeaseRec, SlotRecord};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::ffi::CString;

/// A staged change to one lease.
#[derive(Clone)]
pub enum Op {
    /// The lease becomes this (taken or renewed).
    Put(LeaseRec),
    /// The lease ends; `drop_slot`: its slot is dropped too (release, not keep).
    End { drop_slot: bool },
}

struct Staged {
    subxact: pg_sys::SubTransactionId,
    name: String,
    /// The lease in the store when the call was made: what the commit expects to find.
    base: Option<LeaseRec>,
    op: Op,
}

thread_local! {
    /// Slots created in the current transaction: (name, subtransaction that owns it).
    static PENDING: RefCell<Vec<(String, pg_sys::SubTransactionId)>> = const { RefCell::new(Vec::new()) };
    /// Lease changes of the current transaction, in call order.
    static STAGED: RefCell<Vec<Staged>> = const { RefCell::new(Vec::new()) };
    /// Records as they were before this transaction's pre-commit changed them: put back if
    /// the transaction aborts after all.
    static APPLIED: RefCell<Vec<SlotRecord>> = const { RefCell::new(Vec::new()) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// A lease call in this transaction changed a lease: wake the guard at commit.
    static WAKE: Cell<bool> = const { Cell::new(false) };
    /// Guard drops made in this transaction (`backup_slot_enforce()`): (slot, event,
    /// whether the drop warned of a loop), forgotten once the transaction has committed.
    static FORGET: RefCell<Vec<(String, Outcome, bool, Forget)>> = const { RefCell::new(Vec::new()) };
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

/// Stage a change to the lease of `name`, applied when the transaction commits. `base`
/// is the lease as the call found it (see [`lease`]).
pub fn stage(name: &str, base: Option<LeaseRec>, op: Op) {
    register();
    WAKE.set(true);
    STAGED.with_borrow_mut(|s| s.push(Staged { subxact: current_subxact(), name: name.to_string(), base, op }));
}

/// The lease of `name` as this transaction sees it: the store's, with this transaction's
/// own staged changes on top.
pub fn lease(name: &str) -> Result<Option<LeaseRec>, GuardError> {
    Ok(lease_and_base(name)?.0)
}

/// The lease of `name` as this transaction sees it, and the store's lease its change must
/// still find at commit (the base of a new staged change): both from one read, so that a
/// commit of another session between two reads cannot slip in.
pub fn lease_and_base(name: &str) -> Result<(Option<LeaseRec>, Option<LeaseRec>), GuardError> {
    let staged = STAGED.with_borrow(|s| {
        let first = s.iter().find(|st| st.name == name)?;
        let last = s.iter().rev().find(|st| st.name == name)?;
        let now = match &last.op {
            Op::Put(l) => Some(l.clone()),
            Op::End { .. } => None,
        };
        Some((now, first.base.clone()))
    });
    match staged {
        Some(v) => Ok(v),
        None => {
            let l = store::lease(name)?;
            Ok((l.clone(), l))
        }
    }
}

/// The leases this transaction has staged, latest per name: `None` for a lease it ended.
pub fn staged() -> Vec<(String, Option<LeaseRec>)> {
    STAGED.with_borrow(|s| {
        let mut out: Vec<(String, Option<LeaseRec>)> = vec![];
        for st in s {
            let after = match &st.op {
                Op::Put(l) => Some(l.clone()),
                Op::End { .. } => None,
            };
            match out.iter_mut().find(|(n, _)| *n == st.name) {
                Some(e) => e.1 = after,
                None => out.push((st.name.clone(), after)),
            }
        }
        out
    })
}

/// How a committed drop's intent is forgotten (`state::forget_dropped`, handed down by
/// the caller: this module sits below the state).
pub type Forget = fn(&str, Outcome, bool) -> Result<(), GuardError>;

/// A guard drop this transaction made and recorded: its intent goes once the transaction
/// has committed, if the (sub)transaction that wrote the event committed with it; in any
/// other case the intent stays and the guard's next pass records the drop
/// (`enforce::finish_interrupted_drops`).
pub fn forget_at_commit(name: &str, action: Outcome, loop_warned: bool, forget: Forget) {
    register();
    FORGET.with_borrow_mut(|f| f.push((name.to_string(), action, loop_warned, forget)));
}

/// Where the transaction that wrote a drop's event stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XidState {
    Running,
    Committed,
    /// Rolled back, or cut short by a crash.
    Aborted,
}

/// Has this transaction ID committed? (In the commit callback of its own transaction,
/// where it still counts as running, the commit log already says so.)
pub fn xid_committed(xid: u32) -> bool {
    // SAFETY: a plain lookup in the commit log, for a recent transaction ID.
    unsafe { pg_sys::TransactionIdDidCommit(pg_sys::TransactionId::from(xid)) }
}

pub fn xid_state(xid: u32) -> XidState {
    let x = pg_sys::TransactionId::from(xid);
    // SAFETY: plain lookups in the proc array and the commit log, for a transaction ID a
    // drop intent noted moments to hours ago (far inside the commit log's horizon).
    unsafe {
        if pg_sys::TransactionIdIsInProgress(x) {
            XidState::Running
        } else if pg_sys::TransactionIdDidCommit(x) {
            XidState::Committed
        } else {
            XidState::Aborted
        }
    }
}


/// After the commit: forget the intents whose events committed.
fn forget_committed() {
    let drops = FORGET.with_borrow_mut(std::mem::take);
    for (name, action, loop_warned, forget) in drops {
        let r = PgTryBuilder::new(|| {
            let committed = store::record(&name)
                .map_err(|e| e.to_string())?
                .and_then(|r| r.seen)
                .and_then(|s| s.dropping)
                .and_then(|i| i.xid)
                .is_some_and(xid_committed);
            if committed {
                forget(&name, action, loop_warned).map_err(|e| e.to_string())?;
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

/// Forget this transaction's staged changes to `name`: the guard, run by hand in this same
/// transaction (`backup_slot_enforce()`), has ended that lease itself.
pub fn discard(name: &str) {
    STAGED.with_borrow_mut(|s| s.retain(|st| st.name != name));
}

/// A name's staged changes, folded: what the store should hold at commit.
struct Change {
    name: String,
    base: Option<LeaseRec>,
    after: Option<LeaseRec>,
    drop_slot: bool,
}

fn changes() -> Vec<Change> {
    let staged = STAGED.with_borrow_mut(std::mem::take);
    let mut out: Vec<Change> = vec![];
    for st in staged {
        let i = match out.iter().position(|c| c.name == st.name) {
            Some(i) => i,
            None => {
                out.push(Change { name: st.name.clone(), base: st.base.clone(), after: st.base.clone(), drop_slot: false });
                out.len() - 1
            }
        };
        match st.op {
            Op::Put(l) => out[i].after = Some(l),
            Op::End { drop_slot } => {
                out[i].after = None;
                out[i].drop_slot |= drop_slot;
            }
        }
    }
    out
}

/// Apply the staged changes, in the pre-commit step. An ERROR here aborts the commit.
fn apply_staged() {
    let changes = changes();
    if changes.is_empty() {
        return;
    }
    let r = store::change(|w| {
        for c in &changes {
            let now = w.get(&c.name);
            check(c, &now)?;
            if c.drop_slot {
                drop_slot(&c.name);
            }
            APPLIED.with_borrow_mut(|a| a.push(now.clone()));
            let mut rec = now;
            rec.lease = c.after.clone();
            if rec.lease.is_none() && c.base.is_some() {
                // The lease ended: so does what the guard tracked of a dropped slot.
                if c.drop_slot {
                    rec.seen = None;
                    rec.warned.clear();
                }
            }
            if c.drop_slot {
                w.put_dropped(&rec)?;
            } else {
                w.put(&rec)?;
            }
        }
        Ok(())
    });
    if let Err(e) = r {
        e.report();
    }
}

/// Is the store still as this transaction's calls found it?
fn check(c: &Change, now: &SlotRecord) -> Result<(), GuardError> {
    let changed = |why: &str| Err(GuardError::LeaseChanged { slot: c.name.clone(), why: why.into() });
    if now.seen.as_ref().is_some_and(|s| s.dropping.is_some()) {
        return Err(GuardError::BeingDropped(c.name.clone()));
    }
    // The lease this transaction's calls found must be the one there now: the same
    // lease (taken at the same instant), or still none.
    match (&c.base, &now.lease) {
        (None, Some(l)) if c.after.is_some() => {
            return Err(GuardError::AlreadyLeased { slot: c.name.clone(), until: crate::time::ts(l.expires_at).to_string() })
        }
        (None, Some(_)) => return changed("another session took a lease on it meanwhile"),
        (Some(_), None) => return changed("the lease ended meanwhile (the guard dropped the slot, or another session released it)"),
        (Some(b), Some(n)) if b.leased_at != n.leased_at || b.owner != n.owner => {
            return changed("it was released and leased again meanwhile")
        }
        _ => {}
    }
    if c.after.is_some() && crate::slots::one(&c.name).is_none() {
        return changed("its slot was dropped meanwhile");
    }
    Ok(())
}

fn drop_slot(name: &str) {
    let Ok(cname) = CString::new(name) else { return };
    // If a lease of this same transaction created the slot, it is no longer pending.
    PENDING.with_borrow_mut(|p| p.retain(|(n, _)| n != name));
    if crate::slots::one(name).is_none() {
        return;
    }
    // SAFETY: ReplicationSlotDrop(name, nowait) acquires the slot (ERROR if it is active)
    // and drops it; we are in a valid transaction state before commit.
    unsafe { pg_sys::ReplicationSlotDrop(cname.as_ptr(), true) };
}

/// Put back records that a pre-commit changed, when the transaction aborts after all.
fn undo_applied() {
    let applied = APPLIED.with_borrow_mut(std::mem::take);
    for before in applied.into_iter().rev() {
        let name = before.name.clone();
        let r = PgTryBuilder::new(|| store::change(|w| w.put(&before)).map_err(|e| e.to_string()))
            .catch_others(|e| Err(crate::error::caught_message(&e)))
            .execute();
        if let Err(e) = r {
            warning!("pgslotguard: could not put back the lease of replication slot \"{name}\" after its transaction aborted: {e}");
        }
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
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PARALLEL_PRE_COMMIT => apply_staged(),
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            WAKE.set(false);
            // The drops' events rolled back: their intents stay for the guard to record.
            FORGET.with_borrow_mut(|f| f.clear());
            STAGED.with_borrow_mut(|s| s.clear());
            undo_applied();
            let pending = PENDING.with_borrow_mut(std::mem::take);
            for (name, _) in pending {
                drop_quietly(&name);
            }
        }
        XACT_EVENT_PRE_PREPARE => {
            if PENDING.with_borrow(|p| !p.is_empty()) || STAGED.with_borrow(|s| !s.is_empty()) {
                ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "cannot PREPARE a transaction that has leased, renewed, released or kept a replication slot"
                );
            }
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PREPARE => {
            PENDING.with_borrow_mut(|p| p.clear());
            APPLIED.with_borrow_mut(|a| a.clear());
            forget_committed();
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
            STAGED.with_borrow_mut(|s| s.retain(|st| st.subxact != my_subid));
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
            PENDING.with_borrow_mut(|p| {
                for entry in p.iter_mut().filter(|(_, s)| *s == my_subid) {
                    entry.1 = parent_subid;
                }
            });
            STAGED.with_borrow_mut(|s| {
                for st in s.iter_mut().filter(|st| st.subxact == my_subid) {
                    st.subxact = parent_subid;
                }
            });
        }
        _ => {}
    }
}
