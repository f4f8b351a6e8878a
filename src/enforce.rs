//! One enforcement pass: snapshot → decide → act → record. The guard worker and
//! `backup_slot_enforce()` run this very code; dry run is a flag on the same path.
//!
//! One pass at a time per node (`store::PassLock`): the worker skips a pass while
//! `backup_slot_enforce()` runs one, and that function waits for the worker's.
//!
//! A pass first settles what callers left (src/machine.rs: changes whose transaction
//! ended without finishing them, drop intents of an interrupted pass), then decides on a
//! fresh snapshot. Each action runs in its own subtransaction, so a failure on one slot
//! (dropped concurrently, became active, ...) is logged, recorded as an `error` event,
//! and the pass goes on with the next slot. Before acting on a slot the pass looks at it
//! again under the store's writers' lock, which lease calls take only for the moment they
//! write: no user's transaction can hold up the guard. A slot whose lease change is
//! committing at that moment is left to a pass a moment later (`busy_skips`).
//! After drops, the pass asks the checkpointer for a checkpoint so `pg_wal` shrinks now.

use crate::error::{caught_message, GuardError};
use crate::policy::timing::{self, ClockWatch};
use crate::policy::{self, Action, Breach, CheckpointMode, Decision, DiskVerdict, Outcome, Policy, Verdict};
use crate::machine::{self, Finish};
use crate::state::{self, Event};
use crate::store::LeaseRec;
use crate::validate::{pretty_duration, pretty_size};
use crate::xact;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::HashSet;
use std::rc::Rc;

/// What one pass did about one slot (a row of `backup_slot_enforce()`).
#[derive(Debug, Clone)]
pub struct Done {
    pub slot_name: String,
    pub action: Outcome,
    pub reason: String,
    pub retained_bytes: Option<i64>,
}

/// Totals of a pass, for the worker's status block.
#[derive(Debug, Default, Clone)]
pub struct PassSummary {
    pub done: Vec<Done>,
    pub drops: i64,
    pub errors: i64,
    pub last_error: Option<String>,
    /// Microseconds from the pass's snapshot until the next time-driven limit is due
    /// (`policy::next_due`), when one is.
    pub next_due_us: Option<i64>,
    /// Bytes of WAL that may still be written before a limit that WAL moves is crossed
    /// (`policy::timing::wal_budget`), when such a limit applies; and the WAL position the
    /// pass measured it at.
    pub wal_budget: Option<(i64, u64)>,
    /// Transactions that may still be assigned before the transaction-horizon limit (or its
    /// warn fraction) is crossed (`policy::horizon::xid_budget`), and the next full
    /// transaction ID the pass measured it at.
    pub xid_budget: Option<(i64, u64)>,
}

/// A warning the worker has given and will not repeat while it holds: a slot waiting on
/// a breach, or (slot `None`) the floor that no drop can restore.
pub type WarnKey = (Option<String>, Breach);

/// Who runs the pass: the worker, or a role calling backup_slot_enforce().
pub struct Actor<'a> {
    pub name: &'a str,
    /// The pass may commit between actions (the worker, which owns its transaction).
    pub own_transaction: bool,
    /// The pass records what it finds (events, notifications, warnings remembered, log
    /// lines). Off for a dry run by a role that may not act (a pg_monitor member): it
    /// returns what a pass would do and leaves no trace, so it can be run at will.
    pub records: bool,
    /// Warnings already given in an earlier pass (the worker keeps them so a waiting slot
    /// is reported once, not every naptime). `None`: report every time.
    pub warned: Option<&'a mut HashSet<WarnKey>>,
    /// The worker's wall-clock jump rule (`policy::timing::ClockWatch`); a SQL caller has
    /// none and acts on the database clock alone.
    pub clock: Option<&'a mut ClockWatch>,
    /// Each slot's restart_lsn at the worker's previous pass, for stalls
    /// (`Snapshot::restart_before`); a SQL caller has none.
    pub restarts: Option<&'a mut rustc_hash::FxHashMap<String, u64>>,
}

/// What happened to one decision.
enum Step {
    Did(Outcome),
    /// The second look found that the decision no longer applies.
    Skipped,
}

/// The policy and the verdict for the current state, without acting: what the views show.
pub fn preview() -> Result<(Policy, Verdict), GuardError> {
    let policy = crate::guc::policy();
    let mut snap = state::snapshot()?;
    snap.disk = state::wal_disk().ok();
    let verdict = policy::judge(&policy, &snap);
    Ok((policy, verdict))
}

/// Run one pass. `dry_run` (or `pgslotguard.dry_run`) records `would_drop` and touches
/// nothing, tracking included.
///
/// Run by the worker (`actor.own_transaction`), every action commits on its own: the
/// record of a drop that happened never waits for the rest of the pass, and a slot's
/// lock is held only while its action runs. Run by `backup_slot_enforce()`, the whole
/// pass is part of the caller's transaction.
pub fn run_pass(actor: &mut Actor, dry_run: bool) -> Result<PassSummary, GuardError> {
    let policy = crate::guc::policy();
    let dry_run = dry_run || policy.dry_run;
    let mut summary = PassSummary::default();
    match crate::store::not_loaded() {
        0 => {}
        n => return Err(GuardError::StoreNotWhole(n)),
    }
    // One pass at a time per node. The worker does not wait for a pass run by hand (it
    // passes again shortly); backup_slot_enforce() waits for the worker's, interruptibly.
    let _pass = loop {
        match crate::store::try_pass_lock()? {
            Ok(lock) => break lock,
            Err(_) if actor.own_transaction => {
                summary.next_due_us = Some(BUSY_RETRY_US);
                return Ok(summary);
            }
            Err(_) => {
                // SAFETY: a short sleep, then the backend's interrupt check (a cancel ends the wait).
                unsafe { pg_sys::pg_usleep(10_000) };
                pgrx::check_for_interrupts!();
            }
        }
    };
    if !dry_run {
        follow_up_checkpoint(actor, &mut summary);
    }
    let name = actor.name;
    let settled = if dry_run || !actor.records {
        machine::Settled::default()
    } else {
        let s = in_subtransaction(|| machine::settle(name, true)).map_err(GuardError::Pass)?;
        for (slot, action, reason) in &s.done {
            log!("pgslotguard: replication slot \"{slot}\": {reason}");
            summary.done.push(Done { slot_name: slot.clone(), action: *action, reason: reason.clone(), retained_bytes: None });
        }
        s
    };
    commit_point(actor);
    if !dry_run && actor.records {
        for done in finish_intents(actor) {
            if done.action.is_guard_drop() {
                summary.drops += 1;
            }
            summary.done.push(done);
        }
    }
    let mut clock = actor.clock.as_deref_mut();
    let mut restarts = actor.restarts.as_deref_mut();
    let Read { verdict, disk_error, due, budget, xid_budget, warned } =
        in_subtransaction(|| read_state(&policy, dry_run, clock.as_deref_mut(), restarts.as_deref_mut()))
            .map_err(GuardError::Pass)?;
    summary.next_due_us = due;
    if !settled.busy.is_empty() {
        summary.next_due_us = Some(summary.next_due_us.map_or(BUSY_RETRY_US, |d| d.min(BUSY_RETRY_US)));
    }
    summary.wal_budget = budget;
    summary.xid_budget = xid_budget;
    if let Some(e) = disk_error {
        summary.failed(None, &e, None);
    }
    commit_point(actor);

    if let Some(warned) = actor.warned.as_deref_mut() {
        // A warning (or, in dry run, a would_drop) is given once per crossing: it is
        // forgotten once its slot no longer waits or would be dropped.
        let waiting: HashSet<&str> = verdict
            .decisions
            .iter()
            .filter(|d| matches!(d.action, Action::Wait { .. } | Action::Drop { .. }))
            .map(|d| d.slot_name.as_str())
            .collect();
        let stuck = verdict.disk.as_ref().is_some_and(|v| v.stuck.is_some());
        warned.retain(|(slot, _)| match slot {
            Some(s) => waiting.contains(s.as_str()),
            None => stuck,
        });
    }

    for d in &verdict.decisions {
        if settled.busy.iter().any(|b| *b == d.slot_name) && !matches!(d.action, Action::None) {
            // Its lease change is committing right now: decided again a moment later, on
            // what the commit leaves.
            crate::shmem::update(|s| {
                s.busy_skips += 1;
                s.set_last_busy(&d.slot_name, state::now_us());
            });
            continue;
        }
        let step = match &d.action {
            Action::None => continue,
            Action::Wait { breach, reason } => warn_once(actor, d, *breach, reason),
            Action::EndLease { reason } => end_lease(&policy, actor, d, reason, dry_run),
            Action::Drop { breach, reason, .. } if dry_run => would_drop(actor, d, *breach, reason),
            Action::Drop { breach, terminate, reason } => drop_slot(&policy, actor, d, *breach, *terminate, reason),
        };
        summary.note(actor, d, step);
        commit_point(actor);
    }

    warn_near_limits(&policy, actor, &verdict, &warned);

    if let Some(v) = &verdict.disk {
        if let Some(why) = &v.stuck {
            stuck_floor(actor, why);
        }
        if !dry_run {
            request_checkpoint(&policy, v, &summary);
        }
    }

    if let Some(retention) = crate::guc::event_retention_us().filter(|_| !dry_run) {
        if let Err(e) = in_subtransaction(|| state::purge_events(retention)) {
            summary.failed(None, &format!("could not purge old events: {e}"), None);
        }
    }
    Ok(summary)
}

/// What a pass read and decided, before acting.
struct Read {
    verdict: Verdict,
    /// Why the disk could not be measured, when a floor needs it.
    disk_error: Option<String>,
    /// Microseconds until the next time-driven limit (or a held one) is due.
    due: Option<i64>,
    /// The WAL budget, and the WAL position it was measured at.
    budget: Option<(i64, u64)>,
    /// The transaction ID budget, and the next full transaction ID it was measured at.
    xid_budget: Option<(i64, u64)>,
    /// Warnings given before this pass and not re-armed.
    warned: Rc<Vec<(String, String)>>,
}

/// Read everything the pass decides on, update the tracking, apply the wall-clock jump
/// rule, measure the disk, and decide. (Drop intents are finished before: a slot with one
/// is not decided on until it is settled.)
fn read_state(
    policy: &Policy,
    dry_run: bool,
    clock: Option<&mut ClockWatch>,
    restarts: Option<&mut rustc_hash::FxHashMap<String, u64>>,
) -> Result<Read, GuardError> {
    let mut snap = state::snapshot()?;
    // A drop still in flight (a caller's transaction that has not ended; a slot that must
    // go and is in use) is not decided again: its slot and lease are left out.
    let dropping: std::collections::HashSet<String> =
        snap.seen.iter().filter(|s| s.dropping.is_some()).map(|s| s.slot_name.to_string()).collect();
    if !dropping.is_empty() {
        Rc::make_mut(&mut snap.leases).retain(|l| !dropping.contains(l.slot_name.as_str()));
        snap.slots.retain(|s| !dropping.contains(s.name.as_str()));
        for s in Rc::make_mut(&mut snap.seen).iter_mut() {
            s.dropping = None;
        }
    }
    if let Some(r) = restarts {
        snap.restart_before = std::mem::take(r);
        *r = snap.slots.iter().filter_map(|s| Some((s.name.to_string(), s.restart_lsn?))).collect();
    }
    state::track(&mut snap, policy, !dry_run)?;
    let mut held_due = None;
    if let Some(watch) = clock {
        let (held, due) = watch.hold(snap.now, snap.mono, &timing::time_deadlines(policy, &snap));
        if !held.is_empty() && !watch.held_logged {
            log!(
                "pgslotguard: the system clock was set forward; time limits of {} slot(s) wait until that much time has really passed",
                held.len()
            );
        }
        watch.held_logged = !held.is_empty();
        snap.held = held;
        held_due = due;
    }
    // The disk is measured (statvfs, a listing of pg_wal) only when something needs it:
    // the floor, or a drop whose released WAL is recorded and followed by a checkpoint.
    let mut verdict = policy::judge(policy, &snap);
    let drops = verdict.decisions.iter().any(|d| matches!(d.action, Action::Drop { .. }));
    let mut disk_error = None;
    if policy.min_free_wal.is_some() || drops {
        snap.disk = match state::wal_disk() {
            Ok(d) => Some(d),
            Err(e) => {
                if policy.min_free_wal.is_some() {
                    disk_error = Some(e.to_string());
                }
                None
            }
        };
        verdict = policy::judge(policy, &snap);
    }
    let due = [policy::next_due(policy, &snap, &verdict.decisions), held_due].into_iter().flatten().min();
    let budget = timing::wal_budget(&verdict).map(|b| (b, snap.current_lsn));
    let xid_budget = policy::horizon::xid_budget(policy, &verdict.decisions).map(|b| (b, snap.next_xid));
    Ok(Read { verdict, disk_error, due, budget, xid_budget, warned: snap.warned.clone() })
}

/// How soon the worker passes again when a slot was left alone because its lease change
/// was committing, or a pass run by hand held the pass lock.
const BUSY_RETRY_US: i64 = 100_000;

/// Finish the drop intents left by an interrupted pass (the guard, or a caller's
/// transaction, decided a drop and was stopped before it recorded it), and drop the slots
/// that must go (a rolled-back lease's; a release's still in use at its commit): each
/// recorded once (machine::finish), then forgotten once that record has committed — at once
/// for the worker, at the caller's commit for `backup_slot_enforce()`.
fn finish_intents(actor: &mut Actor) -> Vec<Done> {
    let names = match in_subtransaction(machine::intents) {
        Ok(n) => n,
        Err(e) => {
            warning!("pgslotguard: could not read the drop intents: {e}");
            return vec![];
        }
    };
    let in_callers_transaction = !actor.own_transaction && !state::in_recovery();
    let mut done = vec![];
    for name in names {
        let step = in_subtransaction(|| machine::finish(&name, actor.name, in_callers_transaction));
        match step {
            Ok(Finish::Leave | Finish::Cleared) => {}
            Ok(Finish::Waiting(pid)) => {
                if let Some(warned) = actor.warned.as_deref_mut() {
                    if !warned.insert((Some(name.clone()), Breach::Expired)) {
                        continue;
                    }
                }
                warning!("pgslotguard: replication slot \"{name}\" must be dropped (its lease ended) but is active for PID {pid}; the guard drops it once it is inactive");
            }
            Ok(Finish::Forget { action, reason, recorded_now }) => {
                commit_point(actor);
                if in_callers_transaction && recorded_now {
                    xact::forget_at_commit(&name, action, false);
                } else if let Err(e) = in_subtransaction(|| machine::forget_dropped(&name, action, false)) {
                    warning!("pgslotguard: could not forget the dropped replication slot \"{name}\": {e}; the next pass does");
                }
                commit_point(actor);
                if recorded_now {
                    done.push(Done { slot_name: name, action, reason, retained_bytes: None });
                }
            }
            Err(e) => warning!("pgslotguard: could not finish the drop of replication slot \"{name}\": {e}"),
        }
    }
    done
}

/// Commit what the pass did so far and go on in a new transaction (the worker only: it
/// owns its transaction; a SQL caller's transaction is the caller's).
fn commit_point(actor: &Actor) {
    if !actor.own_transaction {
        return;
    }
    // SAFETY: the worker calls run_pass at the top level of the transaction that
    // BackgroundWorker::transaction started, with its snapshot pushed, outside any
    // subtransaction (actions run in their own, already ended) and SPI connection (each
    // query connects and disconnects). This ends that transaction and starts the next
    // the same way, so BackgroundWorker::transaction pops and commits the last one.
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
}

impl PassSummary {
    fn note(&mut self, actor: &Actor, d: &Decision, step: Result<Step, String>) {
        let reason = match &d.action {
            Action::Drop { reason, .. } | Action::Wait { reason, .. } | Action::EndLease { reason } => reason.clone(),
            Action::None => String::new(),
        };
        match step {
            Ok(Step::Skipped) => {}
            Ok(Step::Did(action)) => {
                if action.is_guard_drop() {
                    self.drops += 1;
                }
                self.done.push(Done { slot_name: d.slot_name.to_string(), action, reason, retained_bytes: d.retained_bytes });
            }
            Err(msg) if !actor.records => self.failed(Some(d), &msg, None),
            Err(msg) => {
                // Record the error in its own subtransaction; if even that fails, the log has it.
                let recorded = in_subtransaction(|| record(d, Outcome::Error, &msg, actor.name));
                self.failed(Some(d), &msg, recorded.err());
            }
        }
    }

    fn failed(&mut self, d: Option<&Decision>, msg: &str, unrecorded: Option<String>) {
        self.errors += 1;
        let text = match d {
            Some(d) => format!("could not act on replication slot \"{}\": {}", d.slot_name, msg),
            None => msg.to_string(),
        };
        warning!("pgslotguard: {}", text);
        if let Some(again) = unrecorded {
            warning!("pgslotguard: could not record the error event: {again}");
        }
        self.last_error = Some(text);
        if let Some(d) = d {
            self.done.push(Done {
                slot_name: d.slot_name.to_string(),
                action: Outcome::Error,
                reason: msg.to_string(),
                retained_bytes: d.retained_bytes,
            });
        }
    }
}

/// A breach on a slot that may not be touched now: one WARNING and one `warn` event, once
/// for as long as it lasts (when the actor keeps a memory of warnings).
fn warn_once(actor: &mut Actor, d: &Decision, breach: Breach, reason: &str) -> Result<Step, String> {
    if !actor.records {
        return Ok(Step::Did(Outcome::Warn));
    }
    if let Some(warned) = actor.warned.as_deref_mut() {
        if !warned.insert((Some(d.slot_name.to_string()), breach)) {
            return Ok(Step::Skipped);
        }
    }
    in_subtransaction(|| {
        warning!("pgslotguard: replication slot \"{}\": {}", d.slot_name, reason);
        record(d, Outcome::Warn, reason, actor.name)?;
        Ok(Step::Did(Outcome::Warn))
    })
}

/// The warn threshold (`policy::warnings`): one WARNING, one `warn` event (and so one
/// notification) for each limit newly crossed, remembered in `pgslotguard.warned` so that
/// a restarted worker does not warn again; a warning re-arms once its value is back
/// under the threshold. Given in dry run too: a warning touches no slot.
fn warn_near_limits(policy: &Policy, actor: &Actor, verdict: &policy::Verdict, before: &[(String, String)]) {
    if !actor.records {
        return;
    }
    let now = policy::warnings(policy, verdict, policy.warn_fraction);
    // Sets, not lists: at a thousand slots near a limit, each pass looks up every one.
    let crossed: rustc_hash::FxHashSet<(&str, &str)> = now.iter().map(|w| w.key()).collect();
    let given: rustc_hash::FxHashSet<(&str, &str)> = before.iter().map(|(s, l)| (s.as_str(), l.as_str())).collect();
    for w in &now {
        let (slot, limit) = w.key();
        if given.contains(&(slot, limit)) {
            continue;
        }
        // The decisions are in name order (policy::judge).
        let decision = w.slot_name.as_deref().and_then(|n| {
            verdict.decisions.binary_search_by(|d| d.slot_name.as_str().cmp(n)).ok().map(|i| &verdict.decisions[i])
        });
        let words = w.words();
        let r = in_subtransaction(|| {
            match decision {
                Some(d) => {
                    warning!("pgslotguard: replication slot \"{}\": {}", d.slot_name, words);
                    record(d, Outcome::Warn, &words, actor.name)?;
                }
                None => {
                    warning!("pgslotguard: {}", words);
                    state::record(&Event::new(Outcome::Warn, &words, actor.name))?;
                }
            }
            state::remember_warning(slot, limit)?;
            Ok(())
        });
        if let Err(e) = r {
            warning!("pgslotguard: could not record a warning: {e}");
        }
        commit_point(actor);
    }
    let (slots, limits): (Vec<String>, Vec<String>) = before
        .iter()
        .filter(|(s, l)| !crossed.contains(&(s.as_str(), l.as_str())))
        .map(|(s, l)| (s.clone(), l.clone()))
        .unzip();
    if !slots.is_empty() {
        if let Err(e) = in_subtransaction(|| state::forget_warnings(slots, limits)) {
            warning!("pgslotguard: could not re-arm warnings: {e}");
        }
        commit_point(actor);
    }
}

/// Free space is below the floor and no slot the guard may drop can give more back.
fn stuck_floor(actor: &mut Actor, why: &str) {
    if !actor.records {
        return;
    }
    if let Some(warned) = actor.warned.as_deref_mut() {
        if !warned.insert((None, Breach::Space)) {
            return;
        }
    }
    warning!("pgslotguard: {}", why);
    if let Err(e) = in_subtransaction(|| {
        state::record(&Event::new(Outcome::Warn, why, actor.name))
    }) {
        warning!("pgslotguard: could not record the warning: {e}");
    }
}

fn end_lease(policy: &Policy, actor: &Actor, d: &Decision, reason: &str, dry_run: bool) -> Result<Step, String> {
    in_subtransaction(|| {
        if dry_run {
            if actor.records {
                log!("pgslotguard: would end lease of replication slot \"{}\": {}", d.slot_name, reason);
            }
            return Ok(Step::Skipped);
        }
        let stop = crate::store::change(|w| {
            if let Some(stop) = second_look(policy, d)? {
                return Ok(Some(stop));
            }
            machine::end_lease(w, &d.slot_name)?;
            Ok(None)
        })?;
        if let Some(stop) = stop {
            return Ok(stop);
        }
        record(d, Outcome::Warn, reason, actor.name)?;
        log!("pgslotguard: ended lease of replication slot \"{}\": {}", d.slot_name, reason);
        Ok(Step::Did(Outcome::Warn))
    })
}

fn would_drop(actor: &mut Actor, d: &Decision, breach: Breach, reason: &str) -> Result<Step, String> {
    if !actor.records {
        return Ok(Step::Did(Outcome::WouldDrop));
    }
    if let Some(warned) = actor.warned.as_deref_mut() {
        if !warned.insert((Some(d.slot_name.to_string()), breach)) {
            return Ok(Step::Skipped);
        }
    }
    in_subtransaction(|| {
        let reason = format!("{reason}; {}", d.drop_cost());
        log!("pgslotguard: would drop replication slot \"{}\": {}{}", d.slot_name, reason, retained_words(d));
        record(d, Outcome::WouldDrop, &format!("{}: {}", breach.drop_action().as_str(), reason), actor.name)?;
        Ok(Step::Did(Outcome::WouldDrop))
    })
}

/// Drop a slot in two steps, so that no drop goes unrecorded and no drop is recorded that
/// did not happen: first, under the store's writers' lock and after a second look, the
/// intent (the event it will be, and the identity of the slot it is about) is made durable
/// and committed; then the slot is dropped — only if it is still that slot — and the event
/// recorded and committed; then the intent goes. A guard killed in between leaves the
/// intent, and its next pass records the drop (`finish_intents`). Between the two, lease
/// calls on the slot refuse (55006).
fn drop_slot(
    policy: &Policy,
    actor: &mut Actor,
    d: &Decision,
    breach: Breach,
    terminate: Option<i32>,
    reason: &str,
) -> Result<Step, String> {
    let action = breach.drop_action();
    // What the drop costs the consumer (restart_lsn; a new base backup for a slot the guard
    // did not make for a backup). On a standby the WAL a slot held goes only at a
    // restartpoint, and a standby makes one only at a checkpoint record it replays from
    // the primary: the record says so.
    let mut words = format!("{reason}; {}", d.drop_cost());
    if state::in_recovery() {
        words = format!("{words}; {STANDBY_WAL_NOTE}");
    }
    let reason = words.as_str();
    // Terminating a consumer of a leased slot takes what core asks of the lease's owner to
    // terminate it (its own role, pg_signal_backend, or superuser for a superuser's): a
    // lease gives no role more than core does. The DBA's own policy on unleased slots
    // (terminate_active) is the superuser's.
    if let Some(pid) = terminate {
        let owner = in_subtransaction(|| machine::lease_of(&d.slot_name)).ok().flatten().and_then(|l| l.owner_oid);
        if let Some(owner) = owner.filter(|o| *o != 0) {
            if !crate::slots::may_terminate(pg_sys::Oid::from(owner), pid) {
                let words = format!(
                    "{reason}; its walsender (PID {pid}) is not one the lease's owner may terminate, so the guard waits for it to end"
                );
                return warn_once(actor, d, breach, &words);
            }
        }
    }
    // A drop/recreate loop: said once an hour, before the drop (the drop goes ahead).
    let loop_words = d.loop_warning(state::now_us());
    if let Some(w) = &loop_words {
        in_subtransaction(|| {
            warning!("pgslotguard: {w}");
            record(d, Outcome::Warn, w, actor.name)
        })?;
        commit_point(actor);
    }
    let mut marked = None;
    let first = in_subtransaction(|| {
        // The second look and the intent under the store's writers' lock: a lease change
        // committing meanwhile is either seen by the second look or refused at its commit
        // (the slot is being dropped).
        let stop = crate::store::change(|w| {
            if let Some(stop) = second_look(policy, d)? {
                return Ok(Some(stop));
            }
            marked = Some(machine::mark_dropping(w, &d.slot_name, action, reason)?);
            Ok(None)
        })?;
        if let Some(stop) = stop {
            return Ok(Some(stop));
        }
        if let Some(pid) = terminate {
            let gone = state::terminate(pid)?;
            log!(
                "pgslotguard: terminated walsender PID {} of replication slot \"{}\"{}",
                pid,
                d.slot_name,
                if gone { "" } else { " (still exiting; the slot is dropped at the next pass)" }
            );
            record(d, Outcome::Terminate, &format!("walsender PID {pid}: {reason}"), actor.name)?;
            if !gone {
                // A walsender blocked on a stalled client can take a while to exit;
                // dropping now would only fail. The next pass finds the intent on a slot
                // that is still there, clears it and decides again.
                return Ok(Some(Step::Did(Outcome::Terminate)));
            }
        }
        Ok(None)
    })?;
    if let Some(step) = first {
        return Ok(step);
    }
    // A new lease whose transaction had not committed: the reason says so, and the event
    // names that lease.
    let (reason, uncommitted) = match marked {
        Some(m) => (m.reason, m.uncommitted),
        None => (reason.to_string(), None),
    };
    let reason = reason.as_str();
    commit_point(actor);
    crate::testhook::pause("guard_intent");
    // The drop and its event in one subtransaction, committed right after: on a primary
    // the event is written first and rolls back if the drop fails; on a standby (whose
    // ring is not transactional) the drop comes first, and the ring is written only for a
    // drop that happened. A pass run in a caller's transaction cannot commit its record:
    // the intent notes the transaction ID that writes the event, and goes only once that
    // has committed (`xact::forget_at_commit`); if the caller rolls back, the next pass
    // records the drop.
    let standby = state::in_recovery();
    let in_callers_transaction = !actor.own_transaction && !standby;
    // Not dropped (it went, was made again, or became active since the second look): the
    // subtransaction rolls back with the event it wrote, and the intent goes at once.
    let mut not_dropped = None;
    let dropped = in_subtransaction(|| {
        if in_callers_transaction {
            machine::note_intent_xid(&d.slot_name)?;
        }
        if !standby {
            record_of(d, action, reason, actor.name, uncommitted.as_ref())?;
            crate::testhook::pause("guard_recorded");
        }
        if let Err(why) = machine::drop_marked(&d.slot_name)? {
            not_dropped = Some(why);
            return Err(GuardError::Pass(format!("replication slot \"{}\" was not dropped: {why:?}", d.slot_name)));
        }
        crate::testhook::pause("guard_dropped");
        if standby {
            record_of(d, action, reason, actor.name, uncommitted.as_ref())?;
            crate::testhook::pause("guard_recorded");
        }
        log!("pgslotguard: dropped replication slot \"{}\": {}{}", d.slot_name, reason, retained_words(d));
        Ok(Step::Did(action))
    });
    let dropped = match (dropped, not_dropped) {
        (Ok(step), _) => step,
        (Err(e), None) => return Err(e),
        (Err(_), Some(why)) => {
            // Not dropped (it went, was made again, or became active since the second
            // look): its intent goes at once, and the next pass decides afresh.
            commit_point(actor);
            in_subtransaction(|| machine::clear_intent(&d.slot_name))?;
            if matches!(why, crate::slots::NotDropped::NotTheSame) {
                // A slot of this name made since (dropped and made again): never the one the
                // lease made or the tracking saw. The lease ends; the new slot is tracked
                // afresh and, unleased, judged as any other.
                if d.leased {
                    let words = "the slot of this name is not the one the lease made or adopted (it was dropped and made again): lease ended, slot left alone";
                    in_subtransaction(|| {
                        record(d, Outcome::Warn, words, actor.name)?;
                        crate::store::change(|w| machine::end_lease(w, &d.slot_name))
                    })?;
                    log!("pgslotguard: replication slot \"{}\": {words}", d.slot_name);
                }
                in_subtransaction(|| machine::forget_tracking(&d.slot_name))?;
                commit_point(actor);
                return Ok(Step::Did(Outcome::Warn));
            }
            return Ok(Step::Skipped);
        }
    };
    // Only once the event has committed does the intent go: a guard killed before that
    // leaves it, and its next pass records the drop (or, finding the event committed,
    // only forgets the intent).
    commit_point(actor);
    if in_callers_transaction {
        xact::forget_at_commit(&d.slot_name, action, loop_words.is_some());
    } else if let Err(e) = in_subtransaction(|| machine::forget_dropped(&d.slot_name, action, loop_words.is_some())) {
        warning!("pgslotguard: could not forget the dropped replication slot \"{}\": {e}; the next pass does", d.slot_name);
    }
    Ok(dropped)
}

/// A checkpoint the guard requested for the floor alone (no drop) that freed less than a
/// segment: the next one for the floor alone waits this long. What keeps the WAL is not
/// something a checkpoint removes (an archiver that fails, a slot the guard may not drop),
/// and a checkpoint every pass would only add I/O to a full disk. Drops still get theirs.
pub const CHECKPOINT_BACKOFF_US: i64 = 60_000_000;

/// What a drop on a standby frees, and when.
pub const STANDBY_WAL_NOTE: &str =
    "on this standby the WAL it held is removed at the next restartpoint, which waits for a checkpoint record from the primary";

fn retained_words(d: &Decision) -> String {
    d.retained_bytes.map(|b| format!(" (retained {})", pretty_size(b))).unwrap_or_default()
}

/// Before acting on a slot, under the store's writers' lock (which the caller holds, and
/// which a lease change takes only for the moment of its commit): read this slot and its
/// lease again, and decide again. A lease renewed or released, or a slot that became
/// active, since the pass's snapshot is left alone (the lock makes the second look final). A drop for the floor depends on every slot, not one: for it the
/// second look checks that the slot is still there, in scope, and as active as it was.
/// `None`: go ahead; otherwise the step to report instead.
fn second_look(policy: &Policy, d: &Decision) -> Result<Option<Step>, GuardError> {
    // A lease change past its pre-commit commits within moments: acting on the lease it
    // replaces could drop a slot its caller is about to be told is renewed. Left to a pass
    // a moment later (the change marks itself under the same lock, so one of the two sees
    // the other).
    if machine::committing(&d.slot_name)? {
        crate::shmem::update(|s| {
            s.busy_skips += 1;
            s.set_last_busy(&d.slot_name, state::now_us());
        });
        return Ok(Some(Step::Skipped));
    }
    let fresh = state::snapshot_of(&d.slot_name)?;
    let again = policy::decide(policy, &fresh).into_iter().find(|f| f.slot_name == d.slot_name);
    let same = match (again, &d.action) {
        (Some(f), Action::Drop { breach: Breach::Space, terminate, .. }) => {
            let active = fresh.slots.iter().any(|s| s.active());
            f.slot_exists && f.in_scope && active == terminate.is_some()
        }
        (Some(f), Action::Drop { breach: b2, terminate: t2, .. }) => {
            matches!(f.action, Action::Drop { breach: b1, terminate: t1, .. } if b1 == *b2 && t1.is_some() == t2.is_some())
        }
        (Some(f), Action::EndLease { .. }) => matches!(f.action, Action::EndLease { .. }),
        _ => false,
    };
    Ok(if same { None } else { Some(Step::Skipped) })
}

/// After the drops of a pass, ask for the checkpoint that gives their WAL back:
/// - a drop for the floor, or a floor that a checkpoint alone restores: fast, always;
/// - any other drop: as `pgslotguard.checkpoint_after_drop` says.
///
/// The request is remembered in shared memory; a later pass records what `pg_wal`
/// measured once the checkpoint completed (`follow_up_checkpoint`).
fn request_checkpoint(policy: &Policy, v: &DiskVerdict, summary: &PassSummary) {
    let dropped: Vec<&Done> = summary.done.iter().filter(|d| d.action.is_guard_drop()).collect();
    let for_floor = dropped.iter().any(|d| d.action == Outcome::SpaceDrop);
    let below = v.plan.as_ref().is_some_and(|p| p.below) && v.freed > 0;
    let pending = crate::shmem::read().is_some_and(|s| s.ckpt_pending);
    let mode = if for_floor || (below && !pending) {
        CheckpointMode::Fast
    } else if !dropped.is_empty() {
        policy.checkpoint
    } else {
        CheckpointMode::Off
    };
    if mode == CheckpointMode::Off {
        return;
    }
    if dropped.is_empty() && crate::shmem::read().is_some_and(|s| state::now_us() < s.ckpt_quiet_until) {
        return;
    }
    let before = match in_subtransaction(|| state::last_checkpoint_lsn()) {
        Ok(lsn) => lsn,
        Err(e) => {
            warning!("pgslotguard: could not read the last checkpoint from pg_control: {e}");
            return;
        }
    };
    if let Err(e) = in_subtransaction(|| {
        state::request_checkpoint(mode);
        Ok(())
    }) {
        warning!("pgslotguard: could not request a checkpoint: {e}");
        return;
    }
    let why = if dropped.is_empty() {
        "free space is below pgslotguard.min_free_wal_space".to_string()
    } else {
        format!("dropping {} slot(s)", dropped.len())
    };
    log!(
        "pgslotguard: requested a {} {} after {}; it frees about {} of pg_wal ({} now){}",
        mode.as_str(),
        if state::in_recovery() { "restartpoint" } else { "checkpoint" },
        why,
        pretty_size(v.freed),
        pretty_size(v.disk.pg_wal),
        if state::in_recovery() { " once the standby replays the primary's next checkpoint record" } else { "" }
    );
    crate::shmem::update(|s| {
        if !s.ckpt_pending {
            s.ckpt_lsn_before = before;
            s.ckpt_pg_wal_before = v.disk.pg_wal;
            s.ckpt_requested_at = state::now_us();
            s.ckpt_drops = 0;
        }
        s.ckpt_pending = true;
        s.ckpt_fast = s.ckpt_fast || mode == CheckpointMode::Fast;
        s.ckpt_projected = v.freed;
        s.ckpt_drops += dropped.len() as i64;
    });
}

/// A checkpoint the guard requested has completed (pg_control shows a newer one): record
/// what `pg_wal` measures now, as a `checkpoint` event.
fn follow_up_checkpoint(actor: &Actor, summary: &mut PassSummary) {
    let Some(st) = crate::shmem::read().filter(|s| s.ckpt_pending) else { return };
    let r = in_subtransaction(|| {
        if state::last_checkpoint_lsn()? == st.ckpt_lsn_before {
            // A standby makes a restartpoint only at a checkpoint record it has replayed
            // from the primary: the one requested right after the drop was skipped if none
            // had come since the last. Ask again at every look (a skipped request costs the
            // checkpointer a comparison), so that it is made as soon as one has been
            // replayed, not at the standby's own checkpoint_timeout.
            if state::in_recovery() {
                state::request_checkpoint(if st.ckpt_fast { CheckpointMode::Fast } else { CheckpointMode::Spread });
            }
            return Ok(None);
        }
        let disk = state::wal_disk()?;
        let (freed, change) = crate::policy::disk::checkpoint_freed(st.ckpt_pg_wal_before, disk.pg_wal);
        let reason = format!(
            "{} checkpoint requested after {} drop(s) completed within {}: {}, projected {}); {} free of {}",
            if st.ckpt_fast { "fast" } else { "spread" },
            st.ckpt_drops,
            pretty_duration(state::now_us() - st.ckpt_requested_at),
            change,
            pretty_size(st.ckpt_projected),
            pretty_size(disk.free),
            pretty_size(disk.total),
        );
        state::record(&Event {
            freed_bytes: Some(freed),
            pg_wal_bytes: Some(disk.pg_wal),
            ..Event::new(Outcome::Checkpoint, &reason, actor.name)
        })?;
        Ok(Some((reason, freed, disk.segment_size)))
    });
    match r {
        Ok(None) => {}
        Ok(Some((reason, freed, segment))) => {
            log!("pgslotguard: {reason}");
            let idle = st.ckpt_drops == 0 && freed < segment;
            if idle {
                log!(
                    "pgslotguard: the checkpoint requested for pgslotguard.min_free_wal_space freed nothing; the next one for the floor alone waits {}",
                    pretty_duration(CHECKPOINT_BACKOFF_US)
                );
            }
            crate::shmem::update(|s| {
                s.ckpt_pending = false;
                s.ckpt_fast = false;
                s.ckpt_quiet_until = if idle { state::now_us() + CHECKPOINT_BACKOFF_US } else { 0 };
            });
            summary.done.push(Done { slot_name: String::new(), action: Outcome::Checkpoint, reason, retained_bytes: None });
        }
        Err(e) => summary.failed(None, &format!("could not record the checkpoint: {e}"), None),
    }
}

/// Record an event about the slot of `d`, on behalf of its lease's owner (if leased).
fn record(d: &Decision, action: Outcome, reason: &str, actor: &str) -> Result<(), GuardError> {
    record_of(d, action, reason, actor, None)
}

/// [`record`], naming `judged` (a new lease not committed yet) when the slot has no other.
fn record_of(d: &Decision, action: Outcome, reason: &str, actor: &str, judged: Option<&LeaseRec>) -> Result<(), GuardError> {
    let drop = action.is_guard_drop();
    // The lease as it stands (its holder, id and owner), if the slot has one.
    let lease = if d.leased { machine::lease_of(&d.slot_name)?.or_else(|| judged.cloned()) } else { None };
    let e = Event {
        slot_name: Some(&d.slot_name),
        retained_bytes: d.retained_bytes,
        lease_owner: d.lease_owner.as_deref(),
        freed_bytes: if drop { d.releases_bytes } else { None },
        restart_lsn: if drop { d.restart_lsn } else { None },
        confirmed_flush: if drop { d.logical_flush.flatten() } else { None },
        ..Event::new(action, reason, actor)
    };
    state::record(&match &lease {
        Some(l) => e.of_lease(l),
        None => e,
    })
}

/// Run `f` in an internal subtransaction (as PL/pgSQL's exception blocks do): on success it
/// is released, on any ERROR or panic it is rolled back and the message returned.
pub fn in_subtransaction<T, F>(f: F) -> Result<T, String>
where
    F: FnOnce() -> Result<T, GuardError>,
{
    let f = std::panic::AssertUnwindSafe(f);
    // SAFETY: this is the sequence PL/pgSQL's exception blocks use (pl_exec.c,
    // exec_stmt_block): remember the memory context and resource owner, begin an
    // internal subtransaction, run the body under PgTryBuilder (which catches the ERROR
    // longjmp and Rust panics alike), then release or roll back the subtransaction and
    // restore both. The subtransaction ends on every path, before this frame returns.
    unsafe {
        let old_ctx = pg_sys::CurrentMemoryContext;
        let old_owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(old_ctx);

        let result = PgTryBuilder::new(|| match f() {
            Ok(v) => Ok(v),
            Err(e) => Err(e.to_string()),
        })
        .catch_others(|e| Err(caught_message(&e)))
        .execute();

        match &result {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(old_ctx);
        pg_sys::CurrentResourceOwner = old_owner;
        result
    }
}
