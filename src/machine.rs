//! The lease state machine: the one place that moves a lease's slot from state to state,
//! as slot.c owns a slot's. The API (through xact.rs, which follows the transaction) and
//! the guard's pass (enforce.rs) ask it for each transition; nothing else writes a lease.
//!
//! A slot name's record (src/store/) is in one of these states, and every transition is on
//! disk before its effect, so that whoever comes next — the transaction's own commit or
//! abort, the guard's next pass, the next start — can finish it or undo it:
//!
//! ```text
//!            lease call: pending record (durable), then the slot is made persistent
//!   (none) ──────────────────────────────────────────────► pending ── commit ──► leased
//!                                                            │  (its transaction's fate,
//!                                                            │   from the commit log)
//!                                         abort / crash ─────┴──► slot dropped (by the
//!                                                                  call, or the guard's next
//!                                                                  pass: rollback_drop)
//!   leased ── renew, keep, release: pending (renew: durable; keep/release: their event
//!             row is the durable part) ── commit ──► leased / gone
//!   leased ── guard decides: intent (durable) ──► slot dropped ──► event committed ──► gone
//! ```
//!
//! - **Pending.** A change is written as "what the lease becomes if this transaction
//!   commits" (`store::PendingRec`), tagged with the transaction (txid.rs). A new lease's
//!   slot is made ephemeral first and made persistent only after its pending record is on
//!   disk: an ERROR before that drops it (core), a crash leaves nothing (core removes
//!   ephemeral slots at start), and after it the record names the slot (its directory's
//!   identity) for whoever settles the change.
//! - **One change at a time.** A second transaction that wants to change a lease with a
//!   change in flight waits for the first to end, as a row lock waits (`txid::wait_for`,
//!   in the lock manager, so deadlocks are found), then applies to what it left. The guard
//!   never waits: it acts on the committed lease, and a change that finds at its pre-commit
//!   that the guard took the slot fails with 40001. Only a change past its pre-commit (it
//!   commits within moments) makes the guard look again a little later.
//! - **Settled by the commit log.** On a primary nothing is written at commit: the record
//!   with a committed transaction ID means the new lease. A release or keep writes only
//!   shared memory in the call; its event row (with the lease's id) commits with it and is
//!   forced to disk, so after a crash the guard's first pass finds it in the event table
//!   (`reconcile`). On a hot standby (no transaction IDs) the change is written at
//!   pre-commit.
//! - **Identity before every drop.** A slot is dropped only if it is the one the record
//!   names, checked with the slot acquired (`slots::drop_if_same`).
//! - **Exactly one record of every drop.** Release records its event in its transaction;
//!   the guard records each of its drops once, after the drop, and forgets the intent only
//!   once the record has committed (enforce.rs). One pass at a time (`store::PassLock`).

use crate::error::GuardError;
use crate::policy::Outcome;
use crate::slots::{self, NotDropped};
use crate::state::{self, Event};
use crate::store::{self, Identity, IntentRec, LeaseRec, PendingRec, PendingState, Put, SlotRecord};
use crate::txid::{self, Fate};
use pgrx::pg_sys;
use pgrx::prelude::*;

type Result<T> = std::result::Result<T, GuardError>;

/// One change this transaction made, as xact.rs remembers it until the transaction ends.
#[derive(Debug, Clone)]
pub struct Staged {
    pub name: String,
    /// The change as written.
    pub change: PendingRec,
    /// The record's pending change before this one (this transaction's own earlier
    /// change, in an enclosing subtransaction): put back if this one's subtransaction
    /// rolls back.
    pub before: Option<PendingRec>,
}

/// A change to an existing lease.
#[derive(Debug, Clone)]
pub enum Change {
    /// The lease becomes this (a renewal).
    Renew(LeaseRec),
    /// The lease ends and its slot stays.
    Keep,
    /// The lease ends and its slot is dropped.
    Release,
}

/// The words of a rolled-back lease's drop.
pub const ROLLED_BACK: &str = "the backup_slot_lease() call that made it did not commit (rolled back, or cut short by a crash): its lease never existed";

fn my_pid() -> i32 {
    // SAFETY: this process's PID.
    unsafe { pg_sys::MyProcPid }
}

/// The lease of a record as this transaction sees it (its own change on top).
fn seen_by_me(rec: &SlotRecord, gen: i64) -> Option<LeaseRec> {
    let p = rec.pending.as_ref();
    store::resolve(rec.lease.clone(), p.map(|p| (p, txid::fate(p, gen))), p.and_then(|p| p.lease.clone()))
}

/// The lease of `name` as this transaction sees it.
pub fn lease_of(name: &str) -> Result<Option<LeaseRec>> {
    Ok(store::record(name)?.and_then(|r| seen_by_me(&r, store::gen())))
}

/// Is a change to `name` past its pre-commit, its transaction still running?
pub fn committing(name: &str) -> Result<bool> {
    let Some((rec, st)) = store::record_and_state(name)? else { return Ok(false) };
    Ok(st.precommitted && rec.pending.as_ref().is_some_and(|p| txid::fate(p, store::gen()) == Fate::Running))
}

/// Leases held by the role `owner` (by OID), new ones in flight included.
pub fn leases_held_by(owner: u32) -> Result<usize> {
    store::leases_of(owner)
}

/// The same change (what a record holds is this change, not one made since).
fn same_change(a: &PendingRec, b: &PendingRec) -> bool {
    a.xid == b.xid
        && a.local == b.local
        && a.drop_slot == b.drop_slot
        && a.made_slot == b.made_slot
        && a.lease.as_ref().map(|l| (l.lease_id, l.expires_at)) == b.lease.as_ref().map(|l| (l.lease_id, l.expires_at))
}

/// The guard is dropping this slot (its intent is on record): no lease call may change it.
fn not_being_dropped(name: &str, rec: &SlotRecord) -> Result<()> {
    if rec.seen.as_ref().is_some_and(|s| s.dropping.is_some()) {
        return Err(GuardError::BeingDropped(name.into()));
    }
    Ok(())
}

fn refuse_if_not_whole() -> Result<()> {
    match store::not_loaded() {
        0 => Ok(()),
        n => Err(GuardError::StoreNotWhole(n)),
    }
}

/// What a step under the writers' lock found.
enum Step<T> {
    Done(T),
    /// Another transaction has a change in flight (or one that ended and must still drop
    /// a slot): wait for it (outside the lock), then try again on what it left.
    Wait(Turn),
}

/// What a change of this transaction waits for before it builds on a record.
enum Turn {
    /// Another transaction's change, still running: its end.
    Xact(PendingRec),
    /// Another transaction's change that ended, whose slot must still go (a committed
    /// release's, an aborted new lease's): its backend drops it in a moment at its commit
    /// or abort, or, if that backend is gone, the guard at its next pass.
    Settling,
}

/// The record a change of this transaction builds on, under the writers' lock. Another
/// transaction's change still running is waited for. One that has ended and is not settled
/// yet (its backend is between its commit and its commit callback, or was killed there)
/// is settled into the record here: a committed change folded in, an aborted one taken
/// away, so that this change never writes over it (a release lost under a later lease
/// call that rolled back, found by tests/chaos.rs). Unless a slot must still go with it:
/// that drop is waited for, since it is the slot's end and must be recorded as such.
fn build_on(cur: SlotRecord, gen: i64) -> std::result::Result<SlotRecord, Turn> {
    let Some(p) = cur.pending.clone() else { return Ok(cur) };
    let still_there = |id: Option<Identity>| match (slots::identity(&cur.name), id) {
        (None, _) => false,
        (Some(here), Some(made)) => here.same(&made),
        (Some(_), None) => true,
    };
    match txid::fate(&p, gen) {
        Fate::Mine => Ok(cur),
        Fate::Running => Err(Turn::Xact(p)),
        Fate::Committed if p.drop_slot && still_there(cur.lease.as_ref().and_then(|l| l.identity())) => Err(Turn::Settling),
        Fate::Committed => Ok(fold(cur, &p)),
        Fate::Aborted if p.made_slot && still_there(p.lease.as_ref().and_then(|l| l.identity())) => Err(Turn::Settling),
        Fate::Aborted => {
            let mut rec = cur;
            rec.pending = None;
            Ok(rec)
        }
    }
}

/// How long a change waits for the drop of a slot whose lease ended (`Turn::Settling`)
/// before it refuses: the ending backend drops it within milliseconds; a slot still in use
/// waits for the guard, which drops it once its consumer is gone.
const SETTLING_NAPS: u32 = 200;

/// Wait for what `build_on` said. `naps`: the naps already taken for a settling drop, by
/// this call.
fn wait_turn_for(t: &Turn, name: &str, naps: &mut u32) -> Result<()> {
    match t {
        Turn::Xact(p) => txid::wait_for(p),
        Turn::Settling => {
            if *naps >= SETTLING_NAPS {
                return Err(GuardError::BeingDropped(name.into()));
            }
            *naps += 1;
            // A backend killed between its commit and the drop leaves it to the guard.
            crate::shmem::wake_worker();
            txid::nap_ms(10);
        }
    }
    Ok(())
}

/// Take a new lease on `name`: make its slot (or, `adopt`, take the existing one), record
/// the lease as pending with this transaction, and make the slot persistent. `check` sees
/// the record as it is once no other transaction has a change in flight on it, and refuses
/// (already leased, ...) by returning an error; it may run more than once. `remember` is
/// told of the change before the slot is persistent, so that any ERROR after that point
/// finds it at abort. Returns the slot's restart LSN.
pub fn lease(
    name: &str,
    mut rec: LeaseRec,
    adopt: bool,
    logical: Option<&slots::LogicalOptions>,
    check: &mut dyn FnMut(Option<&LeaseRec>, &SlotRecord) -> Result<()>,
    remember: &mut dyn FnMut(Staged),
) -> Result<Option<u64>> {
    refuse_if_not_whole()?;
    let gen = store::gen();
    let mut naps = 0;
    loop {
        wait_turn_naps(name, gen, &mut naps)?;
        if adopt {
            let (xid, local) = txid::current(gen);
            txid::force_sync_commit();
            let id = slots::identity(name).ok_or_else(|| GuardError::NoSlot(name.into()))?;
            rec.slot = Some(id);
            let step = store::change(|w| {
                let cur = match build_on(w.get(name), gen) {
                    Ok(r) => r,
                    Err(t) => return Ok(Step::Wait(t)),
                };
                not_being_dropped(name, &cur)?;
                check(seen_by_me(&cur, gen).as_ref(), &cur)?;
                // An adopted slot is as old as the guard's first sight of it: a lease taken
                // again on the same slot (keep, then adopt) never makes it younger.
                let first_seen = cur.seen.as_ref().filter(|s| s.slot.is_none_or(|sid| sid.same(&id))).map(|s| s.first_seen);
                rec.born_at = Some(first_seen.map_or(rec.leased_at, |f| f.min(rec.leased_at)));
                let change = PendingRec { xid, local, lease: Some(rec.clone()), drop_slot: false, made_slot: false };
                let staged = Staged { name: name.into(), change: change.clone(), before: cur.pending.clone() };
                let mut new = cur;
                new.pending = Some(change);
                txid::make_durable();
                w.put(&new)?;
                w.mark(name, |e| e.set_pending_state(PendingState { pid: my_pid(), ..Default::default() }));
                Ok(Step::Done(staged))
            })?;
            match step {
                Step::Wait(t) => wait_turn_for(&t, name, &mut naps)?,
                Step::Done(staged) => {
                    remember(staged);
                    return Ok(rec.reserved_lsn);
                }
            }
            continue;
        }
        // A new slot: ephemeral until its pending lease is on disk. A logical one is made
        // before this transaction has an ID (core makes its snapshot without one).
        let id = match logical {
            Some(opt) => slots::create_ephemeral_logical(name, opt)?,
            None => slots::create_ephemeral(name)?,
        };
        crate::testhook::pause("lease_ephemeral");
        rec.slot = Some(id);
        rec.born_at = Some(rec.leased_at);
        rec.logical = logical.is_some();
        let consistent_point = if logical.is_some() { slots::acquired_confirmed_flush() } else { None };
        let ids = PgTryBuilder::new(|| txid::current(gen)).catch_others(|e| {
            slots::release_acquired();
            e.rethrow()
        });
        let (xid, local) = ids.execute();
        txid::force_sync_commit();
        let recorded = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
            store::change(|w| {
                let cur = match build_on(w.get(name), gen) {
                    Ok(r) => r,
                    Err(t) => return Ok(Step::Wait(t)),
                };
                not_being_dropped(name, &cur)?;
                check(seen_by_me(&cur, gen).as_ref(), &cur)?;
                let change = PendingRec { xid, local, lease: Some(rec.clone()), drop_slot: false, made_slot: true };
                let staged = Staged { name: name.into(), change: change.clone(), before: cur.pending.clone() };
                let mut new = cur;
                new.pending = Some(change);
                // A tracking of an earlier slot of this name is not this slot's.
                if new.seen.as_ref().is_some_and(|s| s.dropping.is_none() && s.slot.is_some_and(|sid| !sid.same(&id))) {
                    new.seen = None;
                }
                txid::make_durable();
                w.put(&new)?;
                w.mark(name, |e| e.set_pending_state(PendingState { pid: my_pid(), ..Default::default() }));
                Ok(Step::Done(staged))
            })
        }))
        .catch_others(|e| {
            // The slot is still ephemeral and acquired: releasing it drops it.
            slots::release_acquired();
            e.rethrow()
        })
        .execute();
        match recorded {
            Err(e) => {
                slots::release_acquired();
                return Err(e);
            }
            Ok(Step::Wait(t)) => {
                slots::release_acquired();
                wait_turn_for(&t, name, &mut naps)?;
            }
            Ok(Step::Done(staged)) => {
                remember(staged);
                crate::testhook::pause("lease_pending");
                let lsn = slots::persist_and_release();
                crate::testhook::pause("lease_persisted");
                // A logical slot's is its consistent point, as core's function returns it.
                return Ok(consistent_point.or(lsn));
            }
        }
    }
}

/// Wait until no other transaction has a change to `name` in flight, and no slot of an
/// ended change of another is still to be dropped (`build_on`).
pub fn wait_turn(name: &str) -> Result<()> {
    wait_turn_naps(name, store::gen(), &mut 0)
}

fn wait_turn_naps(name: &str, gen: i64, naps: &mut u32) -> Result<()> {
    while let Some(rec) = store::record(name)? {
        match build_on(rec, gen) {
            Err(t) => wait_turn_for(&t, name, naps)?,
            Ok(_) => break,
        }
    }
    Ok(())
}

/// Change the lease of `name` (renew, keep, release). `decide` sees the lease as this
/// transaction sees it, once no other transaction has a change in flight on it, and says
/// what to do (or refuses); it may run more than once. Returns the lease as it was.
pub fn change(
    name: &str,
    decide: &mut dyn FnMut(Option<&LeaseRec>, &SlotRecord) -> Result<Change>,
    remember: &mut dyn FnMut(Staged),
) -> Result<LeaseRec> {
    refuse_if_not_whole()?;
    let gen = store::gen();
    let (xid, local) = txid::current(gen);
    txid::force_sync_commit();
    let mut naps = 0;
    loop {
        wait_turn_naps(name, gen, &mut naps)?;
        let step = store::change(|w| {
            let cur = match build_on(w.get(name), gen) {
                Ok(r) => r,
                Err(t) => return Ok(Step::Wait(t)),
            };
            not_being_dropped(name, &cur)?;
            let now = seen_by_me(&cur, gen);
            let what = decide(now.as_ref(), &cur)?;
            let Some(before_lease) = now else { return Err(GuardError::NoLease(name.into())) };
            // A slot made by this very transaction stays made by it: if the transaction
            // does not commit, it goes whatever came after.
            let made_slot = cur.pending.as_ref().is_some_and(|p| p.made_slot && txid::is_mine(p, gen));
            let change = match what {
                Change::Renew(l) => PendingRec { xid, local, lease: Some(l), drop_slot: false, made_slot },
                Change::Keep => PendingRec { xid, local, lease: None, drop_slot: false, made_slot },
                Change::Release => PendingRec { xid, local, lease: None, drop_slot: true, made_slot },
            };
            let staged = Staged { name: name.into(), change: change.clone(), before: cur.pending.clone() };
            let mut new = cur;
            new.pending = Some(change);
            // A renewal must survive any crash once it has committed: written durably now.
            // A keep or release is re-derived from its committed event after a crash (and on
            // a standby is written at pre-commit): shared memory only, no sync.
            // A keep or release in the transaction that made the slot is written durably
            // too: its file must go on naming the slot this transaction made (a file that
            // left the change out would leave the slot without a record after a crash).
            let how = if staged.change.lease.is_some() || made_slot { Put::Durable } else { Put::MemoryOnly };
            if how == Put::Durable {
                txid::make_durable();
            }
            w.put_as(&new, how)?;
            w.mark(name, |e| e.set_pending_state(PendingState { pid: my_pid(), ..Default::default() }));
            Ok(Step::Done((staged, before_lease)))
        })?;
        match step {
            Step::Wait(t) => wait_turn_for(&t, name, &mut naps)?,
            Step::Done((staged, before)) => {
                remember(staged);
                crate::testhook::pause("change_pending");
                return Ok(before);
            }
        }
    }
}

/// Pre-commit of a transaction with lease changes (an ERROR here aborts the commit). For
/// each change: the guard must not have taken the slot meanwhile (its drop intent, or the
/// record gone); then the change is marked as committing, so that the guard waits the
/// moment it takes rather than act on the old lease. On a hot standby, where nothing else
/// is durable, the change is written now; returns the records as they were, to put back if
/// the commit still fails.
pub fn precommit(staged: &[Staged]) -> Result<Vec<SlotRecord>> {
    let gen = store::gen();
    let mut undo = vec![];
    let standby = state::in_recovery();
    for name in names(staged) {
        store::change(|w| {
            let cur = w.get(&name);
            let mine = cur.pending.as_ref().is_some_and(|p| txid::is_mine(p, gen));
            let taken = cur.seen.as_ref().is_some_and(|s| s.dropping.is_some());
            if taken {
                return Err(GuardError::LeaseChanged {
                    slot: name.clone(),
                    why: "the guard is dropping its slot (pgslotguard.events says why)".into(),
                });
            }
            if !mine {
                return Err(GuardError::LeaseChanged { slot: name.clone(), why: "the guard ended the lease or dropped its slot meanwhile".into() });
            }
            let Some(p) = cur.pending.clone() else { return Ok(()) };
            if p.lease.is_some() && slots::one(&name).is_none() {
                return Err(GuardError::LeaseChanged { slot: name.clone(), why: "its slot was dropped meanwhile".into() });
            }
            if standby {
                undo.push(cur.clone());
                let slot = cur.lease.as_ref().and_then(|l| l.identity());
                let mut done = fold(cur, &p);
                if p.drop_slot {
                    // The slot goes at commit; until it has, a durable intent says it must.
                    done.seen.get_or_insert_with(|| store::SeenRec { first_seen: state::now_us(), slot, ..Default::default() }).dropping =
                        Some(intent(Outcome::Release, "released", slot));
                }
                w.put(&done)?;
            } else {
                w.mark(&name, |e| {
                    let mut st = e.pending_state();
                    st.precommitted = true;
                    e.set_pending_state(st);
                });
            }
            Ok(())
        })?;
    }
    crate::testhook::pause("precommit");
    Ok(undo)
}

/// Settle the committed change `p` on the record of `name` — if the record still holds it:
/// a change made since by another transaction (a new lease once a release dropped the slot)
/// is never written over. `how(record)`: how the settled record is written.
fn settle_committed(name: &str, p: &PendingRec, how: impl FnOnce(&SlotRecord) -> Put) -> Result<()> {
    store::change(|w| {
        let cur = w.get(name);
        if !cur.pending.as_ref().is_some_and(|c| same_change(c, p)) {
            return Ok(());
        }
        let done = fold(cur, p);
        let how = if done.is_empty() { Put::Dropped } else { how(&done) };
        w.put_as(&done, how)
    })
}

/// The record once the change `p` has committed.
fn fold(mut rec: SlotRecord, p: &PendingRec) -> SlotRecord {
    rec.pending = None;
    rec.lease = p.lease.clone();
    if rec.lease.is_none() && p.drop_slot {
        rec.seen = None;
        rec.warned.clear();
    }
    rec
}

fn intent(action: Outcome, reason: &str, slot: Option<Identity>) -> IntentRec {
    IntentRec { action: action.as_str().into(), reason: cut_reason(reason), at: state::now_us(), xid: None, slot }
}

/// An intent's reason as stored: shared memory keeps at most this many bytes, and what is
/// written back must be what was written (never a reason cut on its way through memory).
pub fn cut_reason(reason: &str) -> String {
    let max = store::shmem::REASON_LEN;
    if reason.len() <= max {
        return reason.to_string();
    }
    let mut n = max - 3;
    while !reason.is_char_boundary(n) {
        n -= 1;
    }
    format!("{}...", &reason[..n])
}

fn names(staged: &[Staged]) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for s in staged {
        if !out.contains(&s.name) {
            out.push(s.name.clone());
        }
    }
    out
}

/// After the commit (nothing here may raise an ERROR: the transaction has committed).
/// Each change is settled in shared memory; a release drops its slot now, by identity.
/// What cannot be finished here (the slot became active) is left for the guard, marked
/// abandoned.
pub fn commit(staged: &[Staged]) {
    let gen = store::gen();
    let standby = state::in_recovery();
    for name in names(staged) {
        let r = PgTryBuilder::new(|| commit_one(&name, gen, standby).map_err(|e| e.to_string()))
            .catch_others(|e| Err(crate::error::caught_message(&e)))
            .execute();
        if let Err(e) = r {
            warning!("pgslotguard: could not finish the change to the lease of replication slot \"{name}\" at commit: {e}; the guard's next pass does");
            let _ = PgTryBuilder::new(|| store::change(|w| Ok(abandon(w, &name))).map_err(|e| e.to_string()))
                .catch_others(|e| Err(crate::error::caught_message(&e)))
                .execute();
        }
    }
    crate::shmem::wake_worker();
}

fn abandon(w: &mut store::Writer, name: &str) {
    w.mark(name, |e| {
        let mut st = e.pending_state();
        st.abandoned = true;
        e.set_pending_state(st);
    });
}

fn commit_one(name: &str, gen: i64, standby: bool) -> Result<()> {
    if standby {
        // Written at pre-commit; only a release's drop is left.
        let Some(rec) = store::record(name)? else { return Ok(()) };
        if let Some(i) = rec.seen.as_ref().and_then(|s| s.dropping.as_ref()).filter(|i| i.action == Outcome::Release.as_str()) {
            if slots::drop_if_same(name, i.slot)?.is_ok() || slots::one(name).is_none() {
                let slot = i.slot;
                store::change(|w| {
                    // Only this release's record goes (a lease taken since stays).
                    let cur = w.get(name);
                    let same = cur.seen.as_ref().and_then(|s| s.dropping.as_ref()).is_some_and(|d| d.action == Outcome::Release.as_str() && d.slot == slot);
                    if same && cur.lease.is_none() && cur.pending.is_none() {
                        w.put_as(&SlotRecord::new(name), Put::Dropped)?;
                    }
                    Ok(())
                })?;
                log!("pgslotguard: dropped replication slot \"{name}\": released");
            }
        }
        return Ok(());
    }
    let Some(rec) = store::record(name)? else { return Ok(()) };
    let Some(p) = rec.pending.clone().filter(|p| txid::fate(p, gen) == Fate::Committed || txid::is_mine(p, gen)) else { return Ok(()) };
    if p.drop_slot {
        crate::testhook::pause("commit_release");
        let id = rec.lease.as_ref().and_then(|l| l.identity());
        match slots::drop_if_same(name, id)? {
            Ok(()) | Err(NotDropped::Gone) | Err(NotDropped::NotTheSame) => {
                crate::testhook::pause("commit_released");
                settle_committed(name, &p, |_| Put::Dropped)?
            }
            Err(NotDropped::Active(pid)) => {
                warning!("pgslotguard: replication slot \"{name}\" was released but is active for PID {pid}; the guard drops it once it is inactive");
                store::change(|w| Ok(abandon(w, name)))?;
            }
        }
        return Ok(());
    }
    // A new lease or a renewal: its file already says so (the commit log settles it); a keep
    // writes its file now, whole (its committed event re-derives it after a crash).
    settle_committed(name, &p, |_| if p.lease.is_some() { Put::MemoryOnly } else { Put::Whole })
}

/// After an abort (nothing here may raise an ERROR). Each change of the transaction is
/// taken back: on a standby the records written at pre-commit are put back; a slot the
/// transaction made is dropped now if it can be (inactive, and not while the backend exits),
/// and otherwise left for the guard, which drops it (`rollback_drop`).
pub fn abort(staged: &[Staged], undo: Vec<SlotRecord>) {
    for before in undo.into_iter().rev() {
        let name = before.name.clone();
        let r = PgTryBuilder::new(|| store::change(|w| w.put(&before)).map_err(|e| e.to_string()))
            .catch_others(|e| Err(crate::error::caught_message(&e)))
            .execute();
        if let Err(e) = r {
            warning!("pgslotguard: could not put back the lease of replication slot \"{name}\" after its transaction aborted: {e}");
        }
    }
    take_back(staged, true);
}

/// After a subtransaction's abort: its changes are taken back, innermost first; an
/// enclosing change of this transaction on the same lease is put back as the change in
/// flight.
pub fn subabort(staged: &[Staged]) {
    take_back(staged, false);
}

fn take_back(staged: &[Staged], whole: bool) {
    let gen = store::gen();
    for s in staged.iter().rev() {
        let name = s.name.clone();
        let r = PgTryBuilder::new(|| take_back_one(s, gen, whole).map_err(|e| e.to_string()))
            .catch_others(|e| Err(crate::error::caught_message(&e)))
            .execute();
        if let Err(e) = r {
            warning!("pgslotguard: could not take back the change to the lease of replication slot \"{name}\": {e}; the guard's next pass does");
        }
    }
}

fn take_back_one(s: &Staged, gen: i64, whole: bool) -> Result<()> {
    // What is left of this transaction's changes to the lease once this one is taken back:
    // nothing after an abort; after a subtransaction's abort, the enclosing change (if this
    // transaction made one before, in a subtransaction still alive).
    let restore = if whole { None } else { s.before.clone().filter(|b| txid::is_mine(b, gen)) };
    // The slot goes with the change that made it: when nothing left of the transaction
    // made it (a slot made by an enclosing change stays, with that change).
    let made_here = s.change.made_slot && !restore.as_ref().is_some_and(|b| b.made_slot);
    let slot = s.change.lease.as_ref().and_then(|l| l.identity());
    // SAFETY: a plain read of a process-local flag.
    let exiting = unsafe { pg_sys::proc_exit_inprogress };
    let mut dropped = false;
    if made_here && !exiting {
        // This backend may still hold the slot (an ERROR while it was being made
        // persistent): release it first.
        slots::release_acquired();
        // Inactive and ours: drop it now. An ERROR cannot escape here (caught above), and
        // while the backend exits nothing that may raise one is tried: the guard does it.
        if slots::one(&s.name).is_some_and(|i| i.active_pid.is_none()) {
            dropped = slots::drop_if_same(&s.name, slot)?.is_ok();
            if dropped {
                log!("pgslotguard: dropped replication slot \"{}\": the lease that created it was rolled back", s.name);
            }
        }
    }
    store::change(|w| {
        let cur = w.get(&s.name);
        // Only this change is taken back: if the record holds another (the guard's work
        // since), it stays.
        if !cur.pending.as_ref().is_some_and(|p| same_change(p, &s.change)) {
            return Ok(());
        }
        let mut new = cur;
        new.pending = restore.clone();
        if dropped && new.seen.as_ref().is_some_and(|seen| seen.dropping.is_none()) {
            // What a pass tracked of the slot while the call ran (its first sight, warnings)
            // went with it: a failed lease leaves no file behind, not even until the next
            // pass forgets it.
            new.seen = None;
            new.warned.clear();
        }
        if made_here && !dropped && slots::identity(&s.name).zip(slot).is_some_and(|(h, m)| h.same(&m)) {
            // The slot is still there (active, or the backend is exiting): it must go, and the
            // guard's next pass drops it (terminating its consumer) and records the drop.
            new.pending = None;
            new.seen.get_or_insert_with(|| store::SeenRec { first_seen: state::now_us(), ..Default::default() }).dropping =
                Some(intent(Outcome::RollbackDrop, ROLLED_BACK, slot));
            warning!(
                "pgslotguard: could not drop replication slot \"{}\" of a rolled-back lease now (it is in use, or this session is ending); the guard drops it at its next pass",
                s.name
            );
            crate::shmem::wake_worker();
            return w.put(&new);
        }
        // The enclosing change is written back durably (the aborted one, on disk, would
        // otherwise read as this whole transaction's). Taking back the transaction's last
        // change needs no sync: a change of a transaction that did not commit means nothing.
        let how = if restore.is_some() { Put::Durable } else { Put::Whole };
        if new.is_empty() {
            w.put_as(&new, Put::Dropped)
        } else {
            w.put_as(&new, how)
        }
    })
}

// ---------------------------------------------------------------------------------------
// The guard's side: settling what callers left, and its own two-step drops.

/// What settling found for the pass.
#[derive(Default)]
pub struct Settled {
    /// Slots whose change is committing right now: the pass leaves them to the next pass.
    pub busy: Vec<String>,
    /// Lines for the log and events of what was settled (slot, outcome, reason).
    pub done: Vec<(String, Outcome, String)>,
}

/// Settle every change in flight that its transaction will not settle itself: committed
/// or rolled back while its backend could not finish it (killed, or its slot in use), or
/// from before a restart. Run at the start of each pass, before the snapshot it decides
/// on. `records`: the pass may write (not a dry run).
pub fn settle(actor: &str, records: bool) -> Result<Settled> {
    let mut out = Settled::default();
    let gen = store::gen();
    // Owners are looked at again only when roles changed (and at the first pass).
    let roles_changed = records && take_roles_changed();
    let view = store::housekeeping_view(roles_changed)?;
    for p in view.in_flight {
        match p.fate {
            Fate::Mine => continue,
            Fate::Running => {
                if p.state.precommitted {
                    out.busy.push(p.name.clone());
                }
                continue;
            }
            Fate::Committed | Fate::Aborted => {}
        }
        // Its backend is still there and will finish it in its own commit or abort callback
        // (the commit log says so a moment before the callbacks run).
        if !p.state.abandoned && p.state.pid != 0 && p.state.pid != my_pid() && txid::process_alive(p.state.pid) {
            continue;
        }
        if !records {
            continue;
        }
        settle_one(&p.name, gen, &mut out)?;
    }
    if !records {
        return Ok(out);
    }
    if !view.unreconciled.is_empty() && !state::in_recovery() {
        reconcile(&view.unreconciled, &mut out)?;
    }
    write_settled(&view.dirty)?;
    if roles_changed {
        look_up_owners(actor, view.owners)?;
    }
    Ok(out)
}

/// Records that shared memory settled at a commit without writing their file (the file
/// still holds the committed change, which means the same): written now, whole, so that no
/// file keeps a transaction ID for long (the commit log forgets old ones).
fn write_settled(dirty: &[String]) -> Result<()> {
    for name in dirty {
        store::change(|w| {
            let rec = w.get(name);
            if rec.pending.is_none() && !rec.is_empty() {
                w.put_as(&rec, Put::Whole)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

static ROLES_CHANGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
static ROLES_WATCHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Did roles change (pg_authid) since the last look? True the first time in a process; after
/// that, core's catalog-cache invalidation says so (a role dropped, made, altered).
fn take_roles_changed() -> bool {
    use std::sync::atomic::Ordering;
    if !ROLES_WATCHED.swap(true, Ordering::Relaxed) {
        // SAFETY: registers a callback that lives as long as the library, once per process;
        // it only sets a flag.
        unsafe {
            pg_sys::CacheRegisterSyscacheCallback(pg_sys::SysCacheIdentifier::AUTHOID as i32, Some(roles_changed), pg_sys::Datum::from(0));
        }
    }
    ROLES_CHANGED.swap(false, Ordering::Relaxed)
}

#[pg_guard]
unsafe extern "C-unwind" fn roles_changed(_arg: pg_sys::Datum, _cacheid: i32, _hash: u32) {
    ROLES_CHANGED.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn settle_one(name: &str, gen: i64, out: &mut Settled) -> Result<()> {
    let Some(rec) = store::record(name)? else { return Ok(()) };
    let Some(p) = rec.pending.clone() else { return Ok(()) };
    match txid::fate(&p, gen) {
        Fate::Committed if p.drop_slot => {
            let id = rec.lease.as_ref().and_then(|l| l.identity());
            match slots::drop_if_same(name, id)? {
                Ok(()) => {
                    settle_committed(name, &p, |_| Put::Dropped)?;
                    out.done.push((name.into(), Outcome::Release, "released; the slot was dropped by the guard after the release committed".into()));
                }
                Err(NotDropped::Gone | NotDropped::NotTheSame) => settle_committed(name, &p, |_| Put::Dropped)?,
                Err(NotDropped::Active(_)) => {}
            }
        }
        Fate::Committed => settle_committed(name, &p, |_| Put::Durable)?,
        Fate::Aborted => {
            let slot = p.lease.as_ref().and_then(|l| l.identity());
            let here = slots::identity(name);
            let orphan = p.made_slot && here.zip(slot).is_some_and(|(h, m)| h.same(&m));
            store::change(|w| {
                let mut new = w.get(name);
                if !new.pending.as_ref().is_some_and(|x| same_change(x, &p)) {
                    return Ok(());
                }
                new.pending = None;
                if orphan {
                    new.seen.get_or_insert_with(|| store::SeenRec { first_seen: state::now_us(), slot, ..Default::default() }).dropping =
                        Some(intent(Outcome::RollbackDrop, ROLLED_BACK, slot));
                    w.put(&new)
                } else if new.is_empty() {
                    w.put_as(&new, Put::Dropped)
                } else {
                    w.put_as(&new, Put::Whole)
                }
            })?;
        }
        Fate::Running | Fate::Mine => {}
    }
    Ok(())
}

/// After a start, a release or keep that committed may not have reached the store (it is
/// written in shared memory only; its event row, forced to disk with its commit, is the
/// durable part). The first pass on a primary looks for the events of every loaded lease by
/// its id and finishes what it finds.
fn reconcile(unreconciled: &[String], out: &mut Settled) -> Result<()> {
    let mut ids = vec![];
    for name in unreconciled {
        if let Some(l) = store::record(name)?.and_then(|r| r.lease).filter(|l| l.lease_id != 0) {
            ids.push((name.clone(), l.lease_id, l.identity()));
        }
    }
    let ended = state::ended_leases(&ids.iter().map(|(_, id, _)| *id).collect::<Vec<_>>())?;
    for (name, id, slot) in ids {
        let Some(action) = ended.iter().find(|(i, _)| *i == id).map(|(_, a)| *a) else { continue };
        if action == Outcome::Release {
            match slots::drop_if_same(&name, slot)? {
                Ok(()) => out.done.push((name.clone(), Outcome::Release, "released before the restart; the guard dropped the slot after it".into())),
                Err(NotDropped::Active(_)) => continue,
                Err(_) => {}
            }
        }
        store::change(|w| {
            let mut rec = w.get(&name);
            if rec.lease.as_ref().is_some_and(|l| l.lease_id == id) {
                rec.lease = None;
                if action == Outcome::Release {
                    rec.seen = None;
                    rec.warned.clear();
                }
                return if rec.is_empty() { w.put_as(&rec, Put::Dropped) } else { w.put(&rec) };
            }
            Ok(())
        })?;
        log!("pgslotguard: the lease of replication slot \"{name}\" was ended by a {} that committed before the restart", action.as_str());
    }
    store::change(|w| {
        for name in unreconciled {
            w.mark(name, |e| e.set_unreconciled(false));
        }
        Ok(())
    })
}

/// Leases recorded before 0.3.0 name their owner only: look the OID up once. A lease whose
/// owner role no longer exists belongs to superusers only: said once, in the log and the
/// events.
fn look_up_owners(actor: &str, owners: Vec<store::Owner>) -> Result<()> {
    for o in owners {
        if o.gone {
            continue;
        }
        // Before 0.3.0 a lease named its owner only: the role of that name now, once.
        let oid = if o.oid != 0 { Some(o.oid) } else { state::role_oid(&o.owner) };
        let gone = !oid.is_some_and(state::role_exists);
        if oid == Some(o.oid) && !gone {
            continue;
        }
        let Some(l) = store::record(&o.name)?.and_then(|r| r.lease).filter(|l| l.lease_id == o.lease_id) else { continue };
        if gone {
            let reason = format!(
                "the role that took this lease (\"{}\"{}) no longer exists: only a superuser may renew, release or keep it; the guard enforces it as before",
                crate::validate::for_log(&l.owner),
                oid.map(|x| format!(", OID {x}")).unwrap_or_default()
            );
            warning!("pgslotguard: replication slot \"{}\": {reason}", o.name);
            state::record(&Event { slot_name: Some(&o.name), ..Event::new(Outcome::Warn, &reason, actor).of_lease(&l) })?;
        }
        store::update(&o.name, |r| {
            if let Some(x) = r.lease.as_mut().filter(|x| x.lease_id == o.lease_id) {
                x.owner_oid = Some(oid.unwrap_or(0));
                x.owner_gone = gone;
            }
        })?;
    }
    Ok(())
}

/// The guard's first step of a drop, under the writers' lock its caller holds (after its
/// second look): the intent, durable, naming the slot to drop. Returns the slot's
/// identity. A change in flight of the caller's own transaction (backup_slot_enforce() in
/// the transaction that made it) is taken back with it.
///
/// A new lease whose transaction has not committed is judged as the lease it would be
/// (`store::judged`): its drop fails that transaction at its commit, and the reason says
/// so (the lease is named by the event, though no 'lease' event will ever be there).
pub fn mark_dropping(w: &mut store::Writer, name: &str, action: Outcome, reason: &str) -> Result<Marked> {
    let mut rec = w.get(name);
    let gen = w.gen();
    let uncommitted = rec
        .pending
        .as_ref()
        .filter(|p| p.made_slot && rec.lease.is_none() && matches!(txid::fate(*p, gen), Fate::Running | Fate::Mine))
        .and_then(|p| p.lease.clone());
    let reason = match &uncommitted {
        Some(_) => format!("{reason}; {UNCOMMITTED_LEASE}"),
        None => reason.to_string(),
    };
    let slot = rec
        .lease
        .as_ref()
        .and_then(|l| l.identity())
        .or_else(|| rec.pending.as_ref().and_then(|p| p.lease.as_ref()).and_then(|l| l.identity()))
        .or_else(|| rec.seen.as_ref().and_then(|s| s.slot))
        .or_else(|| slots::identity(name));
    if rec.pending.as_ref().is_some_and(|p| txid::is_mine(p, gen)) {
        rec.pending = None;
    }
    let seen = rec.seen.get_or_insert_with(|| store::SeenRec { first_seen: state::now_us(), slot, ..Default::default() });
    seen.dropping = Some(intent(action, &reason, slot));
    w.put(&rec)?;
    Ok(Marked { reason, uncommitted })
}

/// What [`mark_dropping`] marked.
pub struct Marked {
    /// The reason on record.
    pub reason: String,
    /// The lease judged, if its transaction had not committed.
    pub uncommitted: Option<LeaseRec>,
}

/// Said of the drop of a slot whose new lease had not committed.
pub const UNCOMMITTED_LEASE: &str = "the lease call that made it had not committed yet, and fails at its commit (40001)";

/// A drop made in a caller's transaction (`backup_slot_enforce()`): note on its intent the
/// transaction ID that writes its event, assigning one now, before the event is written.
pub fn note_intent_xid(name: &str) -> Result<()> {
    // SAFETY: assigns (or returns) the current (sub)transaction's ID; called inside a
    // transaction on a primary, where the event about to be written needs one anyway.
    let xid = u32::from(unsafe { pg_sys::GetCurrentTransactionId() });
    txid::make_durable();
    store::update(name, |r| {
        if let Some(i) = r.seen.as_mut().and_then(|s| s.dropping.as_mut()) {
            i.xid = Some(xid);
        }
    })
}

/// The guard's drop itself: the slot its intent names, if it is still that slot.
pub fn drop_marked(name: &str) -> Result<std::result::Result<(), NotDropped>> {
    let slot = store::record(name)?.and_then(|r| r.seen).and_then(|s| s.dropping).and_then(|i| i.slot);
    slots::drop_if_same(name, slot)
}

/// Clear the guard's intent to drop `name` (the drop did not happen: the slot is decided
/// afresh).
pub fn clear_intent(name: &str) -> Result<()> {
    store::update(name, |r| {
        if let Some(s) = r.seen.as_mut() {
            s.dropping = None;
        }
    })
}

/// Forget the tracking of an unleased slot (a slot of the name made since is not it).
pub fn forget_tracking(name: &str) -> Result<()> {
    store::update(name, |r| {
        if r.seen.as_ref().is_some_and(|s| s.dropping.is_none()) {
            r.seen = None;
            r.warned.clear();
        }
    })
}

/// A slot the guard dropped, its event committed: its lease ends and its record goes (its
/// tracking, warnings and drop intent with it), but the drop itself is remembered for an
/// hour (`policy::LOOP_WINDOW_US`): a slot made again under the name and dropped again for
/// the same limit is a loop. `loop_warned`: this drop warned of a loop.
pub fn forget_dropped(name: &str, action: Outcome, loop_warned: bool) -> Result<()> {
    let now = state::now_us();
    store::update(name, |r| {
        let before = r.dropped.take().filter(|d| now - d.at < crate::policy::LOOP_WINDOW_US && d.action == action.as_str());
        let remembered = action.is_guard_drop() && action != Outcome::RollbackDrop;
        let dropped = remembered.then(|| store::DroppedRec {
            at: now,
            action: action.as_str().to_string(),
            drops: before.as_ref().map_or(0, |d| d.drops) + 1,
            loop_warned_at: if loop_warned { Some(now) } else { before.and_then(|d| d.loop_warned_at) },
        });
        // A change in flight of another transaction (a lease call on the name since)
        // stays: it is that transaction's to settle.
        let pending = r.pending.take().filter(|p| p.lease.is_some() && p.made_slot);
        *r = SlotRecord { dropped, pending, ..SlotRecord::new(name) };
    })
}

/// End the lease of a slot (the slot stays, or is already gone).
pub fn end_lease(w: &mut store::Writer, name: &str) -> Result<()> {
    let mut rec = w.get(name);
    rec.lease = None;
    if rec.pending.as_ref().is_some_and(|p| txid::is_mine(p, w.gen())) {
        rec.pending = None;
    }
    w.put(&rec)
}

/// What the guard does about a drop intent it finds at the start of a pass.
pub enum Finish {
    /// A caller's transaction that made it is still running: not this pass's.
    Leave,
    /// The slot is still there and the drop was the guard's decision: decided afresh.
    Cleared,
    /// The slot must go (a rolled-back lease's, a release's) and is still in use.
    Waiting(i32),
    /// The drop happened; its event is recorded (now, or before): forget the intent once
    /// that has committed.
    Forget { action: Outcome, reason: String, recorded_now: bool },
}

/// Finish a drop intent found at the start of a pass: the guard (or a caller's
/// transaction) decided a drop and was stopped before it recorded it, or a lease call's
/// slot must go. `in_callers_transaction`: the event recorded here commits with the
/// caller's transaction (`backup_slot_enforce()`), whose ID the intent notes first.
pub fn finish(name: &str, actor: &str, in_callers_transaction: bool) -> Result<Finish> {
    let Some(rec) = store::record(name)? else { return Ok(Finish::Cleared) };
    let Some(i) = rec.seen.as_ref().and_then(|s| s.dropping.clone()) else { return Ok(Finish::Cleared) };
    if let Some(x) = i.xid {
        if txid::xid_fate(x) == Fate::Running {
            return Ok(Finish::Leave);
        }
    }
    let action = Outcome::parse(&i.action).unwrap_or(Outcome::ExpireDrop);
    let must = matches!(action, Outcome::RollbackDrop | Outcome::Release);
    let here = slots::identity(name);
    let present = here.zip(i.slot).is_some_and(|(h, s)| h.same(&s)) || (i.slot.is_none() && here.is_some());
    if present {
        if !must {
            clear_intent(name)?;
            return Ok(Finish::Cleared);
        }
        match slots::drop_if_same(name, i.slot)? {
            Ok(()) | Err(NotDropped::Gone) | Err(NotDropped::NotTheSame) => {}
            Err(NotDropped::Active(pid)) if action == Outcome::RollbackDrop => {
                // A consumer holds the slot of a lease that never existed: it goes.
                let gone = state::terminate(pid)?;
                log!("pgslotguard: terminated process {pid}, which held replication slot \"{name}\" of a lease that was rolled back");
                if !gone || slots::drop_if_same(name, i.slot)?.is_err() {
                    return Ok(Finish::Waiting(pid));
                }
            }
            Err(NotDropped::Active(pid)) => return Ok(Finish::Waiting(pid)),
        }
        log!("pgslotguard: dropped replication slot \"{name}\": {}", i.reason);
    }
    // Recorded already? A release's event is its call's; the guard's own, once per drop.
    let recorded = action == Outcome::Release
        || match i.xid {
            Some(x) => txid::xid_fate(x) == Fate::Committed,
            None => state::drop_recorded(name, action, i.at)?,
        };
    if recorded {
        return Ok(Finish::Forget { action, reason: i.reason, recorded_now: false });
    }
    let why = match (action, i.xid) {
        (Outcome::RollbackDrop, _) => "",
        (_, Some(_)) => " (recorded at the next pass: the transaction of the backup_slot_enforce() call that dropped the slot rolled back)",
        (_, None) => " (recorded at the next pass: the guard was stopped after it dropped the slot)",
    };
    let reason = format!("{}{why}", i.reason);
    let owner = rec.lease.clone();
    if in_callers_transaction {
        note_intent_xid(name)?;
    }
    let e = Event { slot_name: Some(name), ..Event::new(action, &reason, actor) };
    let e = match &owner {
        Some(l) => e.of_lease(l),
        None => e,
    };
    state::record(&e)?;
    if !present {
        log!("pgslotguard: dropped replication slot \"{name}\": {reason}");
    }
    Ok(Finish::Forget { action, reason, recorded_now: true })
}

/// The drop intents to finish at the start of a pass.
pub fn intents() -> Result<Vec<String>> {
    store::intent_names()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_stored_as_memory_keeps_it() {
        let max = store::shmem::REASON_LEN;
        assert_eq!(cut_reason("short"), "short");
        let long = "é".repeat(max);
        let cut = cut_reason(&long);
        assert!(cut.len() <= max && cut.ends_with("..."), "{}", cut.len());
        // What shared memory keeps of it is all of it: written back, it is the same.
        assert_eq!(cut_reason(&cut), cut);
    }
}
