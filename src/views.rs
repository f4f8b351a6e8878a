//! Set-returning functions behind the inspection views in sql/api.sql. They show the
//! decision of `policy::decide` for the current state, so the views say exactly what the
//! next pass would do.

use crate::policy::Action;
use crate::state;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;
use pgrx::prelude::*;

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
        let me_name = state::role_name(me);
        let (policy, verdict) = crate::error::or_report(state::as_owner(crate::enforce::preview));
        let rows: Vec<_> = verdict
            .decisions
            .into_iter()
            .filter(|d| all || d.lease_owner.as_deref() == Some(me_name.as_str()))
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
                    d.slot_name,
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
        ),
    > {
        let t = |v: i64| (v != 0).then(|| state::ts(v));
        let row = match crate::shmem::read() {
            None => (false, false, None, None, None, None, None, 0, 0, 0, 0, None, None, 0, None, None, false),
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
                )
            }
        };
        TableIterator::once(row)
    }
}
