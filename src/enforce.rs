//! One enforcement pass: snapshot → decide → act → record. The guard worker and
//! `backup_slot_enforce()` run this very code; dry run is a flag on the same path.
//!
//! Each action runs in its own subtransaction, so a failure on one slot (dropped
//! concurrently, became active, ...) is logged, recorded as an `error` event, and the pass
//! goes on with the next slot.

use crate::error::{caught_message, GuardError};
use crate::policy::{self, Action, Decision, Policy};
use crate::state::{self, Event};
use crate::validate::pretty_size;
use pgrx::pg_sys;
use pgrx::prelude::*;

/// What one pass did about one slot (a row of `backup_slot_enforce()`).
#[derive(Debug, Clone)]
pub struct Done {
    pub slot_name: String,
    pub action: String,
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
}

/// Who runs the pass: the worker, or a role calling backup_slot_enforce().
pub struct Actor<'a> {
    pub name: &'a str,
    /// Warnings already given for a slot in an earlier pass (the worker keeps them so a
    /// waiting slot is reported once, not every naptime). `None`: report every time.
    pub warned: Option<&'a mut std::collections::HashSet<(String, &'static str)>>,
}

/// The decisions for the current state, without acting: what the views show.
pub fn preview() -> Result<(Policy, Vec<Decision>), GuardError> {
    let policy = crate::guc::policy();
    let snap = state::snapshot()?;
    let decisions = policy::decide(&policy, &snap);
    Ok((policy, decisions))
}

/// Run one pass. `dry_run` (or `pgslotguard.dry_run`) records `would_drop` and touches nothing.
pub fn run_pass(actor: &mut Actor, dry_run: bool) -> Result<PassSummary, GuardError> {
    let policy = crate::guc::policy();
    let dry_run = dry_run || policy.dry_run;
    let mut snap = state::snapshot()?;
    snap.seen = state::track(&snap)?;
    let decisions = policy::decide(&policy, &snap);
    let mut summary = PassSummary::default();

    let still_waiting: std::collections::HashSet<String> = decisions
        .iter()
        .filter(|d| matches!(d.action, Action::Wait { .. }))
        .map(|d| d.slot_name.clone())
        .collect();
    if let Some(warned) = actor.warned.as_deref_mut() {
        warned.retain(|(slot, _)| still_waiting.contains(slot));
    }

    for d in decisions {
        let outcome = match &d.action {
            Action::None => continue,
            Action::Wait { breach, reason } => {
                let key = (d.slot_name.clone(), breach.drop_action());
                if let Some(warned) = actor.warned.as_deref_mut() {
                    if !warned.insert(key) {
                        continue;
                    }
                }
                in_subtransaction(|| {
                    warning!("pgslotguard: replication slot \"{}\": {}", d.slot_name, reason);
                    record(&d, "warn", reason, actor.name)?;
                    Ok("warn".to_string())
                })
            }
            Action::EndLease { reason } => in_subtransaction(|| {
                if dry_run {
                    log!("pgslotguard: would end lease of replication slot \"{}\": {}", d.slot_name, reason);
                    return Ok("would_end_lease".to_string());
                }
                if !still_decided(&policy, &d)? {
                    return Ok(SKIPPED.to_string());
                }
                state::delete_lease(&d.slot_name)?;
                log!("pgslotguard: ended lease of replication slot \"{}\": {}", d.slot_name, reason);
                record(&d, "warn", reason, actor.name)?;
                Ok("end_lease".to_string())
            }),
            Action::Drop { breach, terminate, reason } => {
                let retained = d.retained_bytes.map(|b| format!(" (retained {})", pretty_size(b))).unwrap_or_default();
                if dry_run {
                    in_subtransaction(|| {
                        log!("pgslotguard: would drop replication slot \"{}\": {}{}", d.slot_name, reason, retained);
                        record(&d, "would_drop", &format!("{}: {}", breach.drop_action(), reason), actor.name)?;
                        Ok("would_drop".to_string())
                    })
                } else {
                    in_subtransaction(|| {
                        if !still_decided(&policy, &d)? {
                            return Ok(SKIPPED.to_string());
                        }
                        if let Some(pid) = terminate {
                            let gone = state::terminate(*pid)?;
                            log!(
                                "pgslotguard: terminated walsender PID {} of replication slot \"{}\"{}",
                                pid,
                                d.slot_name,
                                if gone { "" } else { " (still exiting; the slot is dropped at the next pass)" }
                            );
                            record(&d, "terminate", &format!("walsender PID {pid}: {reason}"), actor.name)?;
                            if !gone {
                                // A walsender blocked on a stalled client can take a while to
                                // exit; dropping now would only fail. The next pass drops it.
                                return Ok("terminate".to_string());
                            }
                        }
                        state::delete_lease(&d.slot_name)?;
                        state::drop_slot(&d.slot_name)?;
                        log!("pgslotguard: dropped replication slot \"{}\": {}{}", d.slot_name, reason, retained);
                        record(&d, breach.drop_action(), reason, actor.name)?;
                        Ok(breach.drop_action().to_string())
                    })
                }
            }
        };
        let reason = match &d.action {
            Action::Drop { reason, .. } | Action::Wait { reason, .. } | Action::EndLease { reason } => reason.clone(),
            Action::None => String::new(),
        };
        match outcome {
            Ok(action) if action == SKIPPED => {}
            Ok(action) => {
                if action.ends_with("_drop") && action != "would_drop" {
                    summary.drops += 1;
                }
                summary.done.push(Done { slot_name: d.slot_name.clone(), action, reason, retained_bytes: d.retained_bytes });
            }
            Err(msg) => {
                summary.errors += 1;
                let text = format!("could not act on replication slot \"{}\": {}", d.slot_name, msg);
                warning!("pgslotguard: {}", text);
                // Record the error in its own subtransaction; if even that fails, the log has it.
                if let Err(again) = in_subtransaction(|| record(&d, "error", &msg, actor.name)) {
                    warning!("pgslotguard: could not record the error event: {again}");
                }
                summary.last_error = Some(text);
                summary.done.push(Done { slot_name: d.slot_name.clone(), action: "error".into(), reason: msg, retained_bytes: d.retained_bytes });
            }
        }
    }

    if let Some(retention) = crate::guc::event_retention_us() {
        state::purge_events(retention)?;
    }
    Ok(summary)
}

/// Returned by an action that found, on a second look, that it no longer applies.
const SKIPPED: &str = "skipped";

/// Before acting on a slot: take the per-name lock the API takes, read this slot and its
/// lease again, and decide again. A lease renewed or released, or a slot that became
/// active, since the pass's snapshot is left alone (the lock makes the second look final).
fn still_decided(policy: &Policy, d: &Decision) -> Result<bool, GuardError> {
    state::lock_name(&d.slot_name)?;
    let fresh = state::snapshot_of(&d.slot_name)?;
    let again = policy::decide(policy, &fresh).into_iter().find(|f| f.slot_name == d.slot_name);
    Ok(match (again.map(|f| f.action), &d.action) {
        (Some(Action::Drop { breach: b1, terminate: t1, .. }), Action::Drop { breach: b2, terminate: t2, .. }) => {
            b1 == *b2 && t1.is_some() == t2.is_some()
        }
        (Some(Action::EndLease { .. }), Action::EndLease { .. }) => true,
        _ => false,
    })
}

/// Record an event about the slot of `d`, on behalf of its lease's owner (if leased).
fn record(d: &Decision, action: &str, reason: &str, actor: &str) -> Result<(), GuardError> {
    state::record(&Event {
        slot_name: Some(&d.slot_name),
        action,
        reason,
        retained_bytes: d.retained_bytes,
        actor,
        lease_owner: d.lease_owner.map(pg_sys::Oid::from),
    })
}

/// Run `f` in an internal subtransaction (as PL/pgSQL's exception blocks do): on success it
/// is released, on any ERROR or panic it is rolled back and the message returned.
pub fn in_subtransaction<T, F>(f: F) -> Result<T, String>
where
    F: FnOnce() -> Result<T, GuardError>,
{
    let f = std::panic::AssertUnwindSafe(f);
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
