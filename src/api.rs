//! The SQL API, as internal functions in schema `pgslotguard`; the user-facing
//! `backup_slot_*` functions in sql/api.sql are thin SQL wrappers with the documented
//! signatures. Each function checks its arguments and the caller's rights, then does its
//! work with the extension owner's rights (like a SECURITY DEFINER function, but with the
//! caller still known), through state.rs.

use crate::error::{or_report, GuardError};
use crate::policy::Outcome;
use crate::state::{self, Event};
use crate::store::LeaseRec;
use crate::xact::{self, Op};
use crate::validate::{self, pretty_duration, pretty_size};
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

/// The caller may change this lease: its owner, or a superuser.
fn check_owner(me: pg_sys::Oid, slot: &str, owner: &str, verb: &str) -> Result<()> {
    if state::role_name(me) == owner || is_superuser(me) {
        return Ok(());
    }
    Err(GuardError::PermissionDenied {
        what: format!("{verb} the lease of replication slot \"{slot}\" (owned by role \"{owner}\")"),
        hint: "Only the role that took a lease, or a superuser, may renew, release or keep it.",
    })
}

/// Between the two steps of a guard's drop (src/enforce.rs) the slot is the guard's.
fn not_being_dropped(name: &str) -> Result<()> {
    if crate::store::dropping(name)? {
        return Err(GuardError::BeingDropped(name.into()));
    }
    Ok(())
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
    ) -> TableIterator<
        'static,
        (name!(slot_name, String), name!(lsn, Option<String>), name!(expires_at, TimestampWithTimeZone)),
    > {
        let row = or_report((|| {
            let (slot_name, holder) = (utf8(slot_name, "slot_name")?, utf8(holder, "holder")?);
            let limits = Limits { max_retained: utf8(max_retained, "max_retained")?, max_inactive, max_age, max_xmin_age };
            lease(slot_name, ttl, holder, limits, adopt.unwrap_or(false))
        })());
        warn_if_unguarded();
        TableIterator::once(row)
    }


    #[pg_extern(volatile, parallel_unsafe, name = "renew_slot")]
    #[search_path(pg_catalog, pg_temp)]
    pub fn renew_slot(slot_name: Option<&[u8]>, ttl: Option<Interval>) -> TimestampWithTimeZone {
        or_report(utf8(slot_name, "slot_name").and_then(|n| renew(n, ttl)))
    }


    #[pg_extern(volatile, parallel_unsafe, name = "release_slot")]
    #[search_path(pg_catalog, pg_temp)]
    pub fn release_slot(slot_name: Option<&[u8]>) -> bool {
        or_report(utf8(slot_name, "slot_name").and_then(|n| release(n, true)))
    }


    #[pg_extern(volatile, parallel_unsafe, name = "keep_slot")]
    #[search_path(pg_catalog, pg_temp)]
    pub fn keep_slot(slot_name: Option<&[u8]>) -> bool {
        or_report(utf8(slot_name, "slot_name").and_then(|n| release(n, false)))
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
    adopt: bool,
) -> Result<(String, Option<String>, TimestampWithTimeZone)> {
    let name = validate::slot_name(name)?;
    let holder = validate::holder(holder)?;
    let max_retained = validate::max_retained(limits.max_retained)?;
    let max_inactive = limit_us(name, "max_inactive", limits.max_inactive)?;
    let max_age = limit_us(name, "max_age", limits.max_age)?;
    let max_xmin_age = match limits.max_xmin_age {
        Some(v) if !(1..=crate::guc::MAX_XMIN_AGE_MAX as i64).contains(&v) => {
            return Err(GuardError::XminLimitOutOfRange { slot: name.into(), value: v })
        }
        v => v,
    };
    let me = caller();
    if !is_superuser(me) && !unsafe { pg_sys::has_rolreplication(me) } {
        return Err(GuardError::PermissionDenied {
            what: format!("lease replication slot \"{name}\""),
            hint: "Only superusers and roles with the REPLICATION attribute may lease replication slots.",
        });
    }
    if !is_superuser(me) {
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

    let actor = state::role_name(me);
    state::as_owner(|| {
        let (existing, base) = xact::lease_and_base(name)?;
        if let Some(existing) = existing {
            return Err(GuardError::AlreadyLeased { slot: name.into(), until: state::ts(existing.expires_at).to_string() });
        }
        let lsn = match (state::slot(name)?, adopt) {
            (Some(_), false) => return Err(GuardError::SlotExists(name.into())),
            (None, true) => return Err(GuardError::NoSlot(name.into())),
            (Some(s), true) => {
                if !s.physical {
                    return Err(GuardError::LogicalSlot(name.into()));
                }
                if s.temporary {
                    return Err(GuardError::TemporarySlot(name.into()));
                }
                // An active slot may be adopted (Barman's streams all the time): the guard
                // never drops an active slot for lease expiry or inactivity, and for a hard
                // limit only with terminate_active, as for any leased slot.
                not_being_dropped(name)?;
                s.restart_lsn.map(crate::validate::format_lsn)
            }
            (None, false) => {
                let lsn = state::create_slot(name)?;
                xact::created_in_this_transaction(name);
                Some(lsn)
            }
        };
        xact::stage(
            name,
            base,
            Op::Put(LeaseRec {
                owner: actor.clone(),
                holder: holder.map(str::to_string),
                leased_at: state::us(times.now),
                renewed_at: None,
                expires_at: state::us(times.expires_at),
                max_retained,
                max_inactive,
                max_age,
                max_xmin_age,
                limit_by_superuser: own_limits && is_superuser(me),
                adopted: adopt,
                reserved_lsn: lsn.as_deref().and_then(crate::validate::parse_lsn),
                slot_ino: crate::store::file::slot_dir_ino(name),
            }),
        );
        let mut reason = format!("{} for {}", if adopt { "adopted existing slot" } else { "created slot" }, times.ttl);
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
        state::record(&Event {
            slot_name: Some(name),
            lease_owner: Some(&actor),
            ..Event::new(Outcome::Lease, &reason, &actor)
        })?;
        Ok((name.to_string(), lsn, times.expires_at))
    })
}

fn renew(name: Option<&str>, ttl: Option<Interval>) -> Result<TimestampWithTimeZone> {
    let name = validate::slot_name(name)?;
    let times = lease_times(name, ttl)?;
    let me = caller();
    state::as_owner(|| {
        let (lease, base) = xact::lease_and_base(name)?;
        let lease = lease.ok_or_else(|| GuardError::NoLease(name.into()))?;
        check_owner(me, name, &lease.owner, "renew")?;
        not_being_dropped(name)?;
        if state::slot(name)?.is_none() {
            return Err(GuardError::LeasedSlotGone { slot: name.into() });
        }
        let renewed = LeaseRec { renewed_at: Some(state::us(times.now)), expires_at: state::us(times.expires_at), ..lease.clone() };
        xact::stage(name, base, Op::Put(renewed));
        let (reason, actor) = (format!("renewed for {}, until {}", times.ttl, times.expires_at), state::role_name(me));
        state::record(&Event {
            slot_name: Some(name),
            lease_owner: Some(&lease.owner),
            ..Event::new(Outcome::Renew, &reason, &actor)
        })?;
        Ok(times.expires_at)
    })
}

/// End a lease: drop its slot (`backup_slot_release`) or keep it (`backup_slot_keep`).
/// Both happen when the transaction commits: a rolled-back release keeps slot and lease.
fn release(name: Option<&str>, drop: bool) -> Result<bool> {
    let name = validate::slot_name(name)?;
    let verb = if drop { "release" } else { "keep" };
    let me = caller();
    state::as_owner(|| {
        let (lease, base) = xact::lease_and_base(name)?;
        let lease = lease.ok_or_else(|| GuardError::NoLease(name.into()))?;
        check_owner(me, name, &lease.owner, verb)?;
        not_being_dropped(name)?;
        let slot = state::slot(name)?.ok_or_else(|| GuardError::LeasedSlotGone { slot: name.into() })?;
        if drop {
            if let Some(pid) = slot.active_pid {
                return Err(GuardError::SlotActive { slot: name.into(), pid, action: "release" });
            }
        }
        let retained = slot.restart_lsn.map(|r| state::current_lsn().saturating_sub(r) as i64);
        let reason = if drop { "backup done: slot dropped" } else { "lease ended, slot kept" };
        let actor = state::role_name(me);
        // Recorded while the lease still says who held it (the event's holder).
        state::record(&Event {
            slot_name: Some(name),
            retained_bytes: retained,
            lease_owner: Some(&lease.owner),
            ..Event::new(if drop { Outcome::Release } else { Outcome::Keep }, reason, &actor)
        })?;
        xact::stage(name, base, Op::End { drop_slot: drop });
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
