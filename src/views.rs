//! Set-returning functions behind the inspection views in sql/api.sql. They show the
//! decision of `policy::decide` for the current state, so the views say exactly what the
//! next pass would do.

use crate::policy::Action;
use crate::state;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::prelude::*;

/// A lease is the caller's own: by its owner's OID, never by name (a role dropped and made
/// again under the same name is another role). A lease from before 0.3.0 is shown to its
/// owner once the guard has looked the owner's OID up (its first pass).
fn owned_by(owner_oid: u32, me: pg_sys::Oid) -> bool {
    owner_oid != 0 && owner_oid == me.to_u32()
}

#[pg_schema]
pub mod pgslotguard {
    use super::*;

    /// One row per slot and per lease without a slot: the guard's verdict.
    /// Members of pg_monitor see every row; other roles the rows of their own leases.
    #[allow(clippy::type_complexity)]
    #[pg_extern(stable, parallel_unsafe, name = "slot_decisions")]
    #[search_path(pg_catalog, pg_temp)]
    pub fn slot_decisions() -> TableIterator<
        'static,
        (
            name!(slot_name, String),
            name!(slot_exists, bool),
            name!(leased, bool),
            name!(in_scope, bool),
            name!(scope_reason, String),
            name!(retained_bytes, Option<i64>),
            name!(age_us, Option<i64>),
            name!(inactive_us, Option<i64>),
            name!(nearest_limit, Option<String>),
            name!(state, String),
            name!(next_action, String),
            name!(action_reason, Option<String>),
            name!(frees_bytes, Option<i64>),
            name!(max_retained_bytes, Option<i64>),
            name!(invalidation_reason, Option<String>),
            name!(xmin_age, Option<i64>),
            name!(catalog_xmin_age, Option<i64>),
            name!(max_xmin_age, Option<i64>),
        ),
    > {
        let me = unsafe { pg_sys::GetUserId() };
        let all = state::is_member_of_pg_monitor(me);
        let (policy, verdict) = crate::error::or_report(state::as_owner(crate::enforce::preview));
        let rows: Vec<_> = verdict
            .decisions
            .into_iter()
            .filter(|d| all || owned_by(d.lease_owner_oid, me))
            .map(|d| {
                let nearest = d.nearest_limit();
                let max_xmin_age = d.limit(crate::policy::Breach::Xmin).map(|l| l.limit);
                let (next, reason) = match &d.action {
                    Action::None => ("none".to_string(), None),
                    Action::Drop { breach, terminate, reason } => {
                        let a = if policy.dry_run {
                            "would_drop".to_string()
                        } else if terminate.is_some() {
                            format!("terminate, {}", breach.drop_action().as_str())
                        } else {
                            breach.drop_action().as_str().to_string()
                        };
                        (a, Some(reason.clone()))
                    }
                    Action::Wait { reason, .. } => ("wait".to_string(), Some(reason.clone())),
                    Action::EndLease { reason } => ("end_lease".to_string(), Some(reason.clone())),
                };
                (
                    d.slot_name.to_string(),
                    d.slot_exists,
                    d.leased,
                    d.in_scope,
                    d.scope_reason.to_string(),
                    d.retained_bytes,
                    d.age_us,
                    d.inactive_us,
                    nearest,
                    d.state.to_string(),
                    next,
                    reason,
                    d.frees_bytes,
                    d.retained_limit,
                    d.invalidation.map(str::to_string),
                    d.xmin_age,
                    d.catalog_xmin_age,
                    max_xmin_age,
                )
            })
            .collect();
        TableIterator::new(rows)
    }

    /// The leases in this server's store. Members of pg_monitor see every lease; other
    /// roles their own.
    #[allow(clippy::type_complexity)]
    #[pg_extern(stable, parallel_unsafe, name = "lease_rows")]
    #[search_path(pg_catalog, pg_temp)]
    pub fn lease_rows() -> TableIterator<
        'static,
        (
            name!(slot_name, String),
            name!(holder, Option<String>),
            name!(owner, String),
            name!(leased_at, TimestampWithTimeZone),
            name!(renewed_at, Option<TimestampWithTimeZone>),
            name!(expires_at, TimestampWithTimeZone),
            name!(max_retained, Option<i64>),
            name!(max_inactive, Option<Interval>),
            name!(max_age, Option<Interval>),
            name!(adopted, bool),
            name!(reserved_lsn, Option<String>),
            name!(limit_by_superuser, bool),
            name!(max_xmin_age, Option<i64>),
            name!(while_active, bool),
        ),
    > {
        let me = unsafe { pg_sys::GetUserId() };
        let all = state::is_member_of_pg_monitor(me);
        // Each lease as its transactions' fates leave it, this transaction's own changes
        // included.
        let records = crate::error::or_report(crate::store::records());
        let interval = |us: Option<i64>| us.map(Interval::from_micros);
        let rows: Vec<_> = records
            .into_iter()
            .filter_map(|r| Some((r.name, r.lease?)))
            .filter(|(_, l)| all || owned_by(l.owner_oid.unwrap_or(0), me))
            .map(|(name, l)| {
                (
                    name,
                    l.holder,
                    l.owner,
                    state::ts(l.leased_at),
                    l.renewed_at.map(state::ts),
                    state::ts(l.expires_at),
                    l.max_retained,
                    interval(l.max_inactive),
                    interval(l.max_age),
                    l.adopted,
                    l.reserved_lsn.map(crate::validate::format_lsn),
                    l.limit_by_superuser,
                    l.max_xmin_age,
                    l.while_active,
                )
            })
            .collect();
        TableIterator::new(rows)
    }

    /// What the guard remembers of each slot, from this server's store (pg_monitor).
    #[allow(clippy::type_complexity)]
    #[pg_extern(stable, parallel_unsafe, name = "tracking_rows")]
    #[search_path(pg_catalog, pg_temp)]
    pub fn tracking_rows() -> TableIterator<
        'static,
        (
            name!(slot_name, String),
            name!(leased, bool),
            name!(first_seen, Option<TimestampWithTimeZone>),
            name!(inactive_since, Option<TimestampWithTimeZone>),
            name!(stalled_lsn, Option<String>),
            name!(stalled_since, Option<TimestampWithTimeZone>),
            name!(drop_action, Option<String>),
            name!(drop_reason, Option<String>),
            name!(warned, Vec<String>),
        ),
    > {
        let mut records = crate::error::or_report(crate::store::records());
        let node = crate::error::or_report(crate::store::read(None)).warned;
        let node: Vec<String> = node.into_iter().filter(|(s, _)| s.is_empty()).map(|(_, w)| w).collect();
        if !node.is_empty() {
            records.insert(0, crate::store::SlotRecord { warned: node, ..crate::store::SlotRecord::new("") });
        }
        // A record that only remembers a recent drop (the loop rule) has nothing to show here.
        let rows: Vec<_> = records
            .into_iter()
            .filter(|r| r.lease.is_some() || r.seen.is_some() || !r.warned.is_empty())
            .map(|r| {
                let seen = r.seen.unwrap_or_default();
                let has_seen = seen.first_seen != 0;
                (
                    r.name,
                    r.lease.is_some(),
                    has_seen.then(|| state::ts(seen.first_seen)),
                    seen.inactive_since.map(state::ts),
                    seen.stalled.map(|(lsn, _)| crate::validate::format_lsn(lsn)),
                    seen.stalled.map(|(_, t)| state::ts(t)),
                    seen.dropping.as_ref().map(|d| d.action.clone()),
                    seen.dropping.map(|d| d.reason),
                    r.warned,
                )
            })
            .collect();
        TableIterator::new(rows)
    }

    /// The events this server keeps in its per-node ring (as a standby: no table can be
    /// written there). Members of pg_monitor see every event; other roles those of their
    /// own leases, as in the table.
    #[allow(clippy::type_complexity)]
    #[pg_extern(stable, parallel_unsafe, name = "ring_events")]
    #[search_path(pg_catalog, pg_temp)]
    pub fn ring_events() -> TableIterator<
        'static,
        (
            name!(id, i64),
            name!(at, TimestampWithTimeZone),
            name!(slot_name, Option<String>),
            name!(action, String),
            name!(reason, String),
            name!(retained_bytes, Option<i64>),
            name!(actor, String),
            name!(lease_owner, Option<String>),
            name!(freed_bytes, Option<i64>),
            name!(pg_wal_bytes, Option<i64>),
            name!(lease_holder, Option<String>),
        ),
    > {
        let me = unsafe { pg_sys::GetUserId() };
        let all = state::is_member_of_pg_monitor(me);
        let events = crate::error::or_report(crate::store::ring_events());
        let rows: Vec<_> = events
            .into_iter()
            .filter(|e| all || owned_by(e.lease_owner_oid.unwrap_or(0), me))
            .map(|e| {
                (e.id, state::ts(e.at), e.slot_name, e.action, e.reason, e.retained_bytes, e.actor, e.lease_owner, e.freed_bytes, e.pg_wal_bytes, e.lease_holder)
            })
            .collect();
        TableIterator::new(rows)
    }

    /// The filesystem that holds pg_wal as the guard sees it: sizes, the floor and its
    /// headroom (NULL when no floor is set).
    #[pg_extern(volatile, parallel_unsafe, name = "wal_space")]
    #[search_path(pg_catalog, pg_temp)]
    pub fn wal_space() -> TableIterator<
        'static,
        (
            name!(pg_wal_bytes, i64),
            name!(fs_free_bytes, i64),
            name!(fs_total_bytes, i64),
            name!(floor_bytes, Option<i64>),
            name!(headroom_bytes, Option<i64>),
        ),
    > {
        let d = crate::error::or_report(state::wal_disk());
        let floor = crate::guc::min_free_wal_space().map(|f| f.bytes(d.total));
        let headroom = floor.map(|f| crate::policy::disk::headroom(f, d.segment_size));
        TableIterator::once((d.pg_wal, d.free, d.total, floor, headroom))
    }

    /// The guard worker's status block from shared memory.
    #[allow(clippy::type_complexity)]
    #[pg_extern(volatile, parallel_unsafe, name = "worker_status")]
    #[search_path(pg_catalog, pg_temp)]
    pub fn worker_status() -> TableIterator<
        'static,
        (
            name!(preloaded, bool),
            name!(running, bool),
            name!(pid, Option<i32>),
            name!(started_at, Option<TimestampWithTimeZone>),
            name!(last_pass_at, Option<TimestampWithTimeZone>),
            name!(last_pass_ms, Option<f64>),
            name!(next_pass_at, Option<TimestampWithTimeZone>),
            name!(passes, i64),
            name!(wal_probes, i64),
            name!(drops, i64),
            name!(errors, i64),
            name!(last_error, Option<String>),
            name!(last_error_at, Option<TimestampWithTimeZone>),
            name!(busy_skips, i64),
            name!(last_busy_slot, Option<String>),
            name!(last_busy_at, Option<TimestampWithTimeZone>),
            name!(checkpoint_pending, bool),
            name!(in_recovery, bool),
        ),
    > {
        let standby = state::in_recovery();
        let t = |v: i64| (v != 0).then(|| state::ts(v));
        let row = match crate::shmem::read() {
            None => (false, false, None, None, None, None, None, 0, 0, 0, 0, None, None, 0, None, None, false, standby),
            Some(s) => {
                let running = crate::shmem::worker_running().is_some();
                (
                    true,
                    running,
                    running.then_some(s.pid),
                    t(s.started_at),
                    t(s.last_pass_start),
                    (s.last_pass_start != 0).then(|| s.last_pass_us as f64 / 1000.0),
                    if running { t(s.next_pass) } else { None },
                    s.passes,
                    s.probes,
                    s.drops,
                    s.errors,
                    s.last_error(),
                    t(s.last_error_at),
                    s.busy_skips,
                    s.last_busy(),
                    t(s.last_busy_at),
                    s.ckpt_pending,
                    standby,
                )
            }
        };
        TableIterator::once(row)
    }
}
