//! The SQL API, as internal functions in schema `pgslotguard`; the user-facing
//! `backup_slot_*` functions in sql/api.sql are thin SQL wrappers with the documented
//! signatures. Each function checks the caller's rights first, then its arguments, then
//! asks the lease state machine (src/machine.rs, through xact.rs's bookkeeping) to move
//! the slot, with the extension owner's rights (like a SECURITY DEFINER function, but with
//! the caller still known).

use crate::error::{or_report, GuardError};
use crate::policy::Outcome;
use crate::state::{self, Event};
use crate::machine::{self, Change};
use crate::store::LeaseRec;
use crate::validate::{self, pretty_duration, pretty_size};
use crate::xact;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::prelude::*;

type Result<T> = std::result::Result<T, GuardError>;

fn caller() -> pg_sys::Oid {
    unsafe { pg_sys::GetUserId() }
}

fn is_superuser(role: pg_sys::Oid) -> bool {
    unsafe { pg_sys::superuser_arg(role) }
}

/// A text argument as UTF-8. The SQL wrappers pass text arguments as their raw bytes
/// (`convert_to($n, 'SQL_ASCII')`, which converts nothing), so that bytes that are not UTF-8 — possible in a SQL_ASCII database —
/// get a proper error here instead of failing inside the argument conversion.
fn utf8<'a>(arg: Option<&'a [u8]>, what: &'static str) -> Result<Option<&'a str>> {
    arg.map(|b| std::str::from_utf8(b).map_err(|_| GuardError::NotUtf8(what))).transpose()
}

/// A lease's times: `leased_at` is the clock time of the call (not the start of its
/// transaction, so a lease taken late in a long transaction still runs its full ttl), and
/// `expires_at` = that + ttl, computed by PostgreSQL's own calendar arithmetic. The
/// result, not the interval, is checked: it must lie in (now, now + max_ttl]. `ttl` NULL
/// means `pgslotguard.default_ttl`, which must itself fit under `max_ttl`.
struct LeaseTimes {
    ttl: Interval,
    now: TimestampWithTimeZone,
    expires_at: TimestampWithTimeZone,
}

fn lease_times(slot: &str, ttl: Option<Interval>) -> Result<LeaseTimes> {
    let max = crate::guc::max_ttl_us();
    let ttl = match ttl {
        Some(t) => t,
        None => {
            let default = crate::guc::default_ttl_us();
            if default > max {
                return Err(GuardError::DefaultTtlAboveMax { default: pretty_duration(default), max: pretty_duration(max) });
            }
            Interval::from_micros(default)
        }
    };
    if !validate::ttl_fields_in_range(ttl.months(), ttl.days(), ttl.micros()) {
        return Err(GuardError::TtlOutOfRange { slot: slot.into(), ttl: ttl.to_string() });
    }
    let (now, expires_at) = state::clock_plus(ttl)?;
    let span = pg_sys::TimestampTz::from(expires_at) - pg_sys::TimestampTz::from(now);
    if span <= 0 {
        return Err(GuardError::TtlNotPositive { slot: slot.into(), ttl: ttl.to_string() });
    }
    if span > max {
        return Err(GuardError::TtlTooLong { slot: slot.into(), ttl: ttl.to_string(), max: pretty_duration(max) });
    }
    Ok(LeaseTimes { ttl, now, expires_at })
}

/// May the caller see this lease (its owner, a superuser, or a member of pg_monitor, who
/// reads every lease in the views)?
fn may_see(me: pg_sys::Oid, lease: &LeaseRec) -> bool {
    owns(me, lease) || is_superuser(me) || state::is_member_of_pg_monitor(me)
}

/// Is the caller the lease's owner (by role OID; a lease from before 0.3.0 not yet looked
/// up, by name)?
fn owns(me: pg_sys::Oid, lease: &LeaseRec) -> bool {
    match lease.owner_oid {
        Some(o) => o != 0 && o == me.to_u32(),
        None => state::role_name(me) == lease.owner,
    }
}

/// The caller may change this lease: its owner, or a superuser. A caller that may not
/// even see the lease is answered as if there were none.
fn check_owner(me: pg_sys::Oid, slot: &str, lease: &LeaseRec, verb: &str) -> Result<()> {
    if owns(me, lease) || is_superuser(me) {
        return Ok(());
    }
    if !may_see(me, lease) {
        return Err(GuardError::NoLease(slot.into()));
    }
    Err(GuardError::PermissionDenied {
        what: format!("{verb} the lease of replication slot \"{slot}\" (owned by role \"{}\")", validate::for_log(&lease.owner)),
        hint: "Only the role that took a lease, or a superuser, may renew, release or keep it.",
    })
}

/// What every lease call needs first, before any argument is read: the right core asks
/// of a role that creates or drops a slot (REPLICATION, or superuser), checked at every
/// call (a role that lost it since it took a lease may no longer change it).
fn may_use_slots(me: pg_sys::Oid, verb: &str) -> Result<()> {
    if is_superuser(me) || unsafe { pg_sys::has_rolreplication(me) } {
        return Ok(());
    }
    Err(GuardError::PermissionDenied {
        what: format!("{verb} replication slots"),
        hint: "Only superusers and roles with the REPLICATION attribute may lease, renew, release or keep replication slots.",
    })
}

/// A random lease id (never 0, which marks a lease from before 0.3.0).
fn new_lease_id() -> i64 {
    let mut b = [0u8; 8];
    // SAFETY: fills the buffer from the server's strong random source.
    let ok = unsafe { pg_sys::pg_strong_random(b.as_mut_ptr().cast(), b.len()) };
    let v = if ok { i64::from_le_bytes(b) } else { state::now_us() ^ (i64::from(unsafe { pg_sys::MyProcPid }) << 40) };
    if v == 0 {
        1
    } else {
        v
    }
}

fn warn_if_unguarded() {
    if crate::store::attached() && crate::shmem::worker_running().is_none() {
        ereport!(
            PgLogLevel::WARNING,
            PgSqlErrorCode::ERRCODE_WARNING,
            "pgslotguard: no guard worker is running; this lease will not be enforced",
            "Add pgslotguard to shared_preload_libraries, set pgslotguard.database to this database, and restart the server."
        );
    }
}

#[pg_schema]
pub mod pgslotguard {
    use super::*;

    /// Implementation of backup_slot_lease(); see sql/api.sql.
    #[pg_extern(volatile, parallel_unsafe, name = "lease_slot")]
    #[search_path(pg_catalog, pg_temp)]
    pub fn lease_slot(
        slot_name: Option<&[u8]>,
        ttl: Option<Interval>,
        holder: Option<&[u8]>,
        max_retained: Option<&[u8]>,
        adopt: Option<bool>,
        max_inactive: Option<Interval>,
        max_age: Option<Interval>,
        max_xmin_age: Option<i64>,
        plugin: Option<&[u8]>,
        two_phase: Option<bool>,
        failover: Option<bool>,
        while_active: Option<bool>,
    ) -> TableIterator<
        'static,
        (name!(slot_name, String), name!(lsn, Option<String>), name!(expires_at, TimestampWithTimeZone)),
    > {
        let row = or_report((|| {
            may_use_slots(caller(), "lease")?;
            let (slot_name, holder) = (utf8(slot_name, "slot_name")?, utf8(holder, "holder")?);
            let limits = Limits { max_retained: utf8(max_retained, "max_retained")?, max_inactive, max_age, max_xmin_age };
            let kind = Kind {
                adopt: adopt.unwrap_or(false),
                plugin: utf8(plugin, "plugin")?,
                two_phase: two_phase.unwrap_or(false),
                failover: failover.unwrap_or(false),
                while_active: while_active.unwrap_or(false),
            };
            lease(slot_name, ttl, holder, limits, kind)
        })());
        warn_if_unguarded();
        TableIterator::once(row)
    }


    #[pg_extern(volatile, parallel_unsafe, name = "renew_slot")]
    #[search_path(pg_catalog, pg_temp)]
    pub fn renew_slot(slot_name: Option<&[u8]>, ttl: Option<Interval>) -> TimestampWithTimeZone {
        or_report(may_use_slots(caller(), "renew leases of").and_then(|()| utf8(slot_name, "slot_name")).and_then(|n| renew(n, ttl)))
    }


    #[pg_extern(volatile, parallel_unsafe, name = "release_slot")]
    #[search_path(pg_catalog, pg_temp)]
    pub fn release_slot(slot_name: Option<&[u8]>) -> bool {
        or_report(may_use_slots(caller(), "release").and_then(|()| utf8(slot_name, "slot_name")).and_then(|n| release(n, true)))
    }


    #[pg_extern(volatile, parallel_unsafe, name = "keep_slot")]
    #[search_path(pg_catalog, pg_temp)]
    pub fn keep_slot(slot_name: Option<&[u8]>) -> bool {
        or_report(may_use_slots(caller(), "keep").and_then(|()| utf8(slot_name, "slot_name")).and_then(|n| release(n, false)))
    }


    #[pg_extern(volatile, parallel_unsafe, name = "enforce_now")]
    #[search_path(pg_catalog, pg_temp)]
    pub fn enforce_now(
        dry_run: Option<bool>,
    ) -> TableIterator<
        'static,
        (
            name!(slot_name, String),
            name!(action, String),
            name!(reason, String),
            name!(retained_bytes, Option<i64>),
        ),
    > {
        let rows = or_report(enforce(dry_run.unwrap_or(false)));
        TableIterator::new(rows.into_iter().map(|d| (d.slot_name, d.action.as_str().to_string(), d.reason, d.retained_bytes)))
    }
}

/// What kind of lease backup_slot_lease takes: on a new physical slot, a new logical one
/// (`plugin`), or an existing one (`adopt`); lasting while its consumer streams or not.
struct Kind<'a> {
    adopt: bool,
    plugin: Option<&'a str>,
    two_phase: bool,
    failover: bool,
    while_active: bool,
}

/// A lease's own limits, as passed to backup_slot_lease.
struct Limits<'a> {
    max_retained: Option<&'a str>,
    max_inactive: Option<Interval>,
    max_age: Option<Interval>,
    /// Transactions.
    max_xmin_age: Option<i64>,
}

/// A lease's own time limit in microseconds (a day is 24 h, a month 30 days, as for
/// interval comparisons); it must be positive.
fn limit_us(slot: &str, what: &'static str, value: Option<Interval>) -> Result<Option<i64>> {
    let Some(v) = value else { return Ok(None) };
    if !validate::ttl_fields_in_range(v.months(), v.days(), v.micros()) {
        return Err(GuardError::LimitNotPositive { slot: slot.into(), what, value: v.to_string() });
    }
    let us = (v.months() as i64 * 30 + v.days() as i64) * 86_400_000_000 + v.micros();
    if us <= 0 {
        return Err(GuardError::LimitNotPositive { slot: slot.into(), what, value: v.to_string() });
    }
    Ok(Some(us))
}

/// A role that is not a superuser may only tighten a global limit, never loosen it.
fn not_above(slot: &str, what: &'static str, asked: Option<i64>, guc: &'static str, global: Option<i64>, fmt: fn(i64) -> String) -> Result<()> {
    match (asked, global) {
        (Some(asked), Some(global)) if asked > global => Err(GuardError::LimitRaise {
            slot: slot.into(),
            what,
            asked: fmt(asked),
            guc,
            global: fmt(global),
        }),
        _ => Ok(()),
    }
}

fn lease(
    name: Option<&str>,
    ttl: Option<Interval>,
    holder: Option<&str>,
    limits: Limits,
    kind: Kind,
) -> Result<(String, Option<String>, TimestampWithTimeZone)> {
    let me = caller();
    let name = validate::slot_name(name)?;
    let adopt = kind.adopt;
    if kind.plugin.is_none() && !adopt {
        if kind.two_phase {
            return Err(GuardError::LogicalOnly("two_phase"));
        }
        if kind.failover {
            return Err(GuardError::LogicalOnly("failover"));
        }
    }
    if kind.failover && !crate::slots::FAILOVER_SLOTS {
        return Err(GuardError::NoFailover);
    }
    if let Some(p) = kind.plugin {
        if adopt {
            return Err(GuardError::BadPlugin(format!("{} (adopt takes the slot's own plugin)", validate::cut(p))));
        }
        if p.is_empty() || p.len() > 63 {
            return Err(GuardError::BadPlugin(validate::cut(p)));
        }
    }
    let holder = validate::holder(holder)?;
    let max_retained = validate::max_retained(limits.max_retained)?;
    let max_inactive = limit_us(name, "max_inactive", limits.max_inactive)?;
    let max_age = limit_us(name, "max_age", limits.max_age)?;
    // One range for a lease's own limit and the global one (pgslotguard.max_xmin_age).
    let range = crate::guc::MAX_XMIN_AGE_MIN as i64..=crate::guc::MAX_XMIN_AGE_MAX as i64;
    let max_xmin_age = match limits.max_xmin_age {
        Some(v) if !range.contains(&v) => return Err(GuardError::XminLimitOutOfRange { slot: name.into(), value: v }),
        v => v,
    };
    let superuser = is_superuser(me);
    if !superuser {
        let policy = crate::guc::policy();
        not_above(name, "max_retained", max_retained, "pgslotguard.max_retained_wal", policy.max_retained_wal, pretty_size)?;
        not_above(name, "max_inactive", max_inactive, "pgslotguard.max_inactive_time", policy.max_inactive_us, pretty_duration)?;
        not_above(name, "max_age", max_age, "pgslotguard.max_slot_age", policy.max_slot_age_us, pretty_duration)?;
        not_above(name, "max_xmin_age", max_xmin_age, "pgslotguard.max_xmin_age", policy.max_xmin_age, |v| format!("{v} transactions"))?;
    }
    // pgslotguard.exclude names slots the guard never touches: a lease there would be a
    // promise the guard does not keep (a lease taken before the name was excluded stays,
    // and can still be renewed, released or kept; the views show it out of scope).
    if let Some(re) = crate::guc::exclude().filter(|re| re.is_match(name)) {
        return Err(GuardError::ExcludedName { slot: name.into(), pattern: re.as_str().into() });
    }
    let own_limits = max_retained.is_some() || max_inactive.is_some() || max_age.is_some() || max_xmin_age.is_some();
    let times = lease_times(name, ttl)?;
    xact::room_for(name)?;

    let actor = state::role_name(me);
    state::as_owner(|| {
        if !superuser {
            limit_per_role(me, &actor)?;
            if !adopt {
                reserved_slots()?;
            }
        }
        // Another transaction's change to this name first ends, as a row lock would make
        // us wait (and a release that committed first drops its slot): what is checked
        // below is what that change left.
        machine::wait_turn(name)?;
        // A lease there is said first (to whom may see it), as the machine's check says it.
        match machine::lease_of(name)? {
            Some(l) if may_see(me, &l) => {
                return Err(GuardError::AlreadyLeased { slot: name.into(), until: state::ts(l.expires_at).to_string() })
            }
            Some(_) => return Err(GuardError::LeasedByAnother(name.into())),
            None => {}
        }
        let slot = state::slot(name)?;
        // Core's own slots (19) first: whether or not one exists now under that name.
        if let Some(what) = slot.as_ref().and_then(|s| s.system).or(crate::slots::system_slot(name, false)) {
            return Err(GuardError::CoreSlot {
                slot: name.into(),
                what: what.description(),
                reserved_name: what == crate::policy::SystemSlot::ConflictDetection,
            });
        }
        match (slot, adopt) {
            (Some(_), false) => return Err(GuardError::SlotExists(name.into())),
            (None, true) => return Err(GuardError::NoSlot(name.into())),
            (Some(s), true) => {
                // A logical slot is adopted as one (a CDC connector's, a subscription's): in
                // any database, decoded by its own plugin; the lease only guards it.
                if s.temporary || s.synced {
                    return Err(GuardError::TemporarySlot(name.into()));
                }
                // An active slot may be adopted (Barman's streams all the time), but only by a
                // role that may terminate its consumer as core decides it: the guard would
                // terminate that consumer for a hard limit (terminate_active).
                if let Some(pid) = s.active_pid {
                    if !crate::slots::may_terminate(me, pid) {
                        return Err(GuardError::MayNotTerminate { slot: name.into(), pid });
                    }
                }
            }
            (None, false) => {}
        }
        let rec = LeaseRec {
            owner: actor.clone(),
            owner_oid: Some(me.to_u32()),
            holder: holder.map(str::to_string),
            leased_at: state::us(times.now),
            renewed_at: None,
            expires_at: state::us(times.expires_at),
            max_retained,
            max_inactive,
            max_age,
            max_xmin_age,
            limit_by_superuser: own_limits && superuser,
            adopted: adopt,
            reserved_lsn: None,
            lease_id: new_lease_id(),
            ..Default::default()
        };
        let mut rec = LeaseRec { while_active: kind.while_active, ..rec };
        if adopt {
            let s = state::slot(name)?;
            rec.logical = s.as_ref().is_some_and(|s| !s.physical);
            // The point its consumer is at: confirmed_flush_lsn for a logical slot.
            rec.reserved_lsn = s.and_then(|s| s.logical.as_ref().map_or(s.restart_lsn, |l| l.confirmed_flush));
        }
        let logical = kind.plugin.map(|plugin| crate::slots::LogicalOptions { plugin, two_phase: kind.two_phase, failover: kind.failover });
        let mut check = |existing: Option<&LeaseRec>, _: &crate::store::SlotRecord| -> Result<()> {
            match existing {
                Some(l) if may_see(me, l) => Err(GuardError::AlreadyLeased { slot: name.into(), until: state::ts(l.expires_at).to_string() }),
                Some(_) => Err(GuardError::LeasedByAnother(name.into())),
                None => Ok(()),
            }
        };
        let lsn = machine::lease(name, rec.clone(), adopt, logical.as_ref(), &mut check, &mut xact::remember)?;
        rec.logical = rec.logical || logical.is_some();
        if !adopt {
            rec.reserved_lsn = lsn;
        }
        let lsn = rec.reserved_lsn.map(validate::format_lsn);
        let what = match (adopt, kind.plugin, rec.logical) {
            (true, _, true) => "adopted existing logical slot".to_string(),
            (true, _, false) => "adopted existing slot".to_string(),
            (false, Some(p), _) => format!("created logical slot (plugin {})", validate::cut(p)),
            (false, None, _) => "created slot".to_string(),
        };
        let mut reason = format!("{what} for {}", times.ttl);
        if kind.while_active {
            reason.push_str(", lasting while its consumer streams");
        }
        if let Some(h) = holder {
            reason.push_str(&format!(", holder {h}"));
        }
        if let Some(m) = max_retained {
            reason.push_str(&format!(", max_retained {}", pretty_size(m)));
        }
        if let Some(m) = max_inactive {
            reason.push_str(&format!(", max_inactive {}", pretty_duration(m)));
        }
        if let Some(m) = max_age {
            reason.push_str(&format!(", max_age {}", pretty_duration(m)));
        }
        if let Some(m) = max_xmin_age {
            reason.push_str(&format!(", max_xmin_age {m} transactions"));
        }
        state::record(&Event { slot_name: Some(name), ..Event::new(Outcome::Lease, &reason, &actor).of_lease(&rec) })?;
        Ok((name.to_string(), lsn, times.expires_at))
    })
}

/// `pgslotguard.max_leases_per_role`: a role other than a superuser holds at most that many
/// leases.
fn limit_per_role(me: pg_sys::Oid, role: &str) -> Result<()> {
    if let Some(limit) = crate::guc::max_leases_per_role() {
        let count = machine::leases_held_by(me.to_u32())?;
        if count >= limit as usize {
            return Err(GuardError::TooManyLeases { role: role.into(), count, limit });
        }
    }
    Ok(())
}

/// `pgslotguard.reserved_slots`: a lease by a role other than a superuser never takes the
/// last free replication slots.
fn reserved_slots() -> Result<()> {
    let reserved = crate::guc::reserved_slots();
    // SAFETY: a PGC_POSTMASTER setting, fixed while the server runs.
    let max = unsafe { pg_sys::max_replication_slots };
    // REPACK's slots (19) come from a pool of their own.
    let free = max - crate::slots::all().iter().filter(|s| s.system != Some(crate::policy::SystemSlot::Repack)).count() as i32;
    if free <= reserved {
        return Err(GuardError::SlotsReserved { free: free.max(0), reserved });
    }
    Ok(())
}

/// Renewals within this long of the last one recorded are not recorded again: a renewal
/// loop must not flood the event log and its listeners (the lease's renewed_at and expiry
/// always show the last one).
const RENEW_RECORD_EVERY_US: i64 = 60_000_000;

fn renew(name: Option<&str>, ttl: Option<Interval>) -> Result<TimestampWithTimeZone> {
    let me = caller();
    let name = validate::slot_name(name)?;
    let times = lease_times(name, ttl)?;
    xact::room_for(name)?;
    state::as_owner(|| {
        let now = state::us(times.now);
        let mut renewed = None;
        let mut decide = |lease: Option<&LeaseRec>, _: &crate::store::SlotRecord| -> Result<Change> {
            let lease = lease.ok_or_else(|| GuardError::NoLease(name.into()))?;
            check_owner(me, name, lease, "renew")?;
            if state::slot(name)?.is_none() {
                return Err(GuardError::LeasedSlotGone { slot: name.into() });
            }
            let record = lease.renew_logged_at.is_none_or(|t| now - t >= RENEW_RECORD_EVERY_US || now < t);
            let l = LeaseRec {
                renewed_at: Some(now),
                expires_at: state::us(times.expires_at),
                renew_logged_at: if record { Some(now) } else { lease.renew_logged_at },
                ..lease.clone()
            };
            renewed = Some((l.clone(), record));
            Ok(Change::Renew(l))
        };
        machine::change(name, &mut decide, &mut xact::remember)?;
        let Some((lease, record)) = renewed else { return Err(GuardError::NoLease(name.into())) };
        if record {
            let (reason, actor) = (format!("renewed for {}, until {}", times.ttl, times.expires_at), state::role_name(me));
            state::record(&Event { slot_name: Some(name), ..Event::new(Outcome::Renew, &reason, &actor).of_lease(&lease) })?;
        }
        Ok(times.expires_at)
    })
}

/// End a lease: drop its slot (`backup_slot_release`) or keep it (`backup_slot_keep`).
/// Both happen when the transaction commits: a rolled-back release keeps slot and lease.
fn release(name: Option<&str>, drop: bool) -> Result<bool> {
    let me = caller();
    let name = validate::slot_name(name)?;
    let verb = if drop { "release" } else { "keep" };
    xact::room_for(name)?;
    state::as_owner(|| {
        let mut retained = None;
        let mut decide = |lease: Option<&LeaseRec>, _: &crate::store::SlotRecord| -> Result<Change> {
            let lease = lease.ok_or_else(|| GuardError::NoLease(name.into()))?;
            check_owner(me, name, lease, verb)?;
            let slot = state::slot(name)?.ok_or_else(|| GuardError::LeasedSlotGone { slot: name.into() })?;
            if drop {
                if let Some(pid) = slot.active_pid {
                    return Err(GuardError::SlotActive { slot: name.into(), pid, action: "release" });
                }
            }
            retained = slot.restart_lsn.map(|r| state::current_lsn().saturating_sub(r) as i64);
            Ok(if drop { Change::Release } else { Change::Keep })
        };
        let lease = machine::change(name, &mut decide, &mut xact::remember)?;
        let reason = if drop { "backup done: slot dropped" } else { "lease ended, slot kept" };
        let actor = state::role_name(me);
        // Recorded with the lease's id: after a crash between this commit and the store,
        // the guard finds the release or keep by it (machine.rs, `reconcile`).
        state::record(&Event {
            slot_name: Some(name),
            retained_bytes: retained,
            ..Event::new(if drop { Outcome::Release } else { Outcome::Keep }, reason, &actor).of_lease(&lease)
        })?;
        Ok(true)
    })
}

fn enforce(dry_run: bool) -> Result<Vec<crate::enforce::Done>> {
    let me = caller();
    let allowed = is_superuser(me) || (dry_run && state::is_member_of_pg_monitor(me));
    if !allowed {
        return Err(GuardError::PermissionDenied {
            what: "run an enforcement pass".into(),
            hint: "Only a superuser may run backup_slot_enforce(); members of pg_monitor may run it with dry_run => true.",
        });
    }
    let name = state::role_name(me);
    // A dry run by a role that may not act records nothing (events, notifications, log).
    let records = is_superuser(me);
    state::as_owner(|| {
        let mut actor = crate::enforce::Actor { name: &name, own_transaction: false, records, warned: None, clock: None, restarts: None };
        Ok(crate::enforce::run_pass(&mut actor, dry_run)?.done)
    })
}
