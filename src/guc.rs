//! Every GUC in one place: name, unit, bounds, check hooks, and the `Policy` snapshot
//! that a pass reads once. The rest of the code never reads a GUC directly.

use crate::policy::disk::Floor;
use crate::policy::{CheckpointMode, Policy, Scope};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{CStr, CString};

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum ScopeGuc {
    #[name = c"leased"]
    Leased,
    #[name = c"physical"]
    Physical,
    #[name = c"all"]
    All,
}

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum CheckpointGuc {
    #[name = c"off"]
    Off,
    #[name = c"spread"]
    Spread,
    #[name = c"fast"]
    Fast,
}

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum NotifyPayloadGuc {
    #[name = c"minimal"]
    Minimal,
    #[name = c"full"]
    Full,
}

/// The default of pgslotguard.database (as cron.database_name defaults to postgres).
const DEFAULT_DATABASE: &CStr = c"postgres";
pub static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(DEFAULT_DATABASE));
pub static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
/// milliseconds
pub static NAPTIME: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// seconds
pub static DEFAULT_TTL: GucSetting<i32> = GucSetting::<i32>::new(3600);
/// seconds
pub static MAX_TTL: GucSetting<i32> = GucSetting::<i32>::new(7 * 86_400);
/// megabytes, -1 = off
pub static MAX_RETAINED_WAL: GucSetting<i32> = GucSetting::<i32>::new(-1);
/// seconds, -1 = off
pub static MAX_SLOT_AGE: GucSetting<i32> = GucSetting::<i32>::new(-1);
/// seconds, -1 = off
pub static MAX_INACTIVE_TIME: GucSetting<i32> = GucSetting::<i32>::new(-1);
pub static SCOPE: GucSetting<ScopeGuc> = GucSetting::<ScopeGuc>::new(ScopeGuc::Leased);
pub static EXCLUDE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static TERMINATE_ACTIVE: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static DRY_RUN: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static WARN_FRACTION: GucSetting<f64> = GucSetting::<f64>::new(0.8);
pub static MAX_STALLED_TIME: GucSetting<i32> = GucSetting::<i32>::new(-1);
/// transactions, -1 = off
pub static MAX_XMIN_AGE: GucSetting<i32> = GucSetting::<i32>::new(-1);
/// The bounds of `pgslotguard.max_xmin_age`, in transactions (besides -1, off).
///
/// The upper bound is core's own for `autovacuum_freeze_max_age` (2 billion): beyond it
/// even the laxest freezing setting already forces anti-wraparound vacuums that cannot
/// pass the slot, and the server's own wraparound WARNINGs begin about 107 million
/// transactions later (2^31 − 40 million), its refusal of writes at 2^31 − 3 million.
/// Useful values lie well below: under `autovacuum_freeze_max_age` (200 million by
/// default) so the slot never makes anti-wraparound vacuums futile, and in any case under
/// `vacuum_failsafe_age` (1.6 billion), where VACUUM gives up everything but freezing.
///
/// The lower bound is small on purpose: a limit against bloat rather than wraparound is
/// a matter of transactions per hour (a healthy standby's feedback xmin trails by the
/// length of its longest query). 1000 is below anything useful in production and lets
/// tests cross a limit in a second; below it, a streaming standby's own feedback lag would
/// cross it.
pub const MAX_XMIN_AGE_MIN: i32 = 1_000;
pub const MAX_XMIN_AGE_MAX: i32 = 2_000_000_000;
/// seconds, -1 = keep forever
pub static EVENT_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(30 * 86_400);
/// a size ('20GB') or a share of the filesystem ('10%'); -1 = off
pub static MIN_FREE_WAL_SPACE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"-1"));
pub static CHECKPOINT_AFTER_DROP: GucSetting<CheckpointGuc> = GucSetting::<CheckpointGuc>::new(CheckpointGuc::Fast);
pub static NOTIFY_PAYLOAD: GucSetting<NotifyPayloadGuc> = GucSetting::<NotifyPayloadGuc>::new(NotifyPayloadGuc::Minimal);
/// Test builds only: where a process pauses (src/testhook.rs).
#[cfg(feature = "pg_test")]
pub static TEST_PAUSE_AT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// leases one role other than a superuser may hold at once; -1 = no limit
pub static MAX_LEASES_PER_ROLE: GucSetting<i32> = GucSetting::<i32>::new(10);
/// replication slots a lease by a role other than a superuser never takes
pub static RESERVED_SLOTS: GucSetting<i32> = GucSetting::<i32>::new(2);

use crate::validate::US_PER_S;

/// Define every GUC, then reserve the prefix so a typo such as `pgslotguard.naptme` is
/// refused rather than silently kept as a placeholder.
pub fn init() {
    // A PGC_POSTMASTER setting can only be defined while the postmaster loads the library;
    // when pgslotguard is loaded later (not preloaded: no worker), it is shown read from
    // the configuration file instead, so CREATE EXTENSION still checks the database.
    let database_context = if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        GucContext::Postmaster
    } else {
        GucContext::Sighup
    };
    GucRegistry::define_string_guc(
        c"pgslotguard.database",
        c"Database that holds the pgslotguard extension; the guard worker connects there.",
        c"Like cron.database_name: CREATE EXTENSION pgslotguard is refused in any other database.",
        &DATABASE,
        database_context,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pgslotguard.enabled",
        c"Whether the guard worker enforces leases and limits.",
        c"When off, the worker stays connected but runs no pass.",
        &ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgslotguard.naptime",
        c"Time between two enforcement passes of the guard worker.",
        c"A breach is acted on at most this long (plus the pass itself) after it happens.",
        &NAPTIME,
        10,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    // Checked against pgslotguard.max_ttl where it is used (a lease without a ttl), not in
    // a check hook: a hook would see whichever of the two the configuration file set first.
    GucRegistry::define_int_guc(
        c"pgslotguard.default_ttl",
        c"Lease length when backup_slot_lease() or backup_slot_renew() is given no ttl.",
        c"Must not exceed pgslotguard.max_ttl; a lease without a ttl fails if it does.",
        &DEFAULT_TTL,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pgslotguard.max_ttl",
        c"Longest lease anyone may take or renew to.",
        c"",
        &MAX_TTL,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pgslotguard.max_retained_wal",
        c"Drop a slot in scope that retains more WAL than this (-1 disables).",
        c"Retained WAL is the current WAL position minus the slot's restart_lsn. A lease may set a lower limit of its own.",
        &MAX_RETAINED_WAL,
        -1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"pgslotguard.max_slot_age",
        c"Drop a slot in scope older than this (-1 disables).",
        c"Leased slots count from the lease, others from when the guard first saw them.",
        &MAX_SLOT_AGE,
        -1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pgslotguard.max_inactive_time",
        c"Drop a slot in scope that has had no walsender for longer than this (-1 disables).",
        c"Inactivity is tracked by the guard worker and survives restarts.",
        &MAX_INACTIVE_TIME,
        -1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_float_guc(
        c"pgslotguard.warn_fraction",
        c"Warn once when a slot in scope comes within this fraction of a limit (0 or 1 disables).",
        c"Retained WAL, age, inactivity, the share of a lease's term, and the space the free-space floor leaves: one WARNING, one warn event and one notification per crossing, given again only after the value fell back under.",
        &WARN_FRACTION,
        0.0,
        1.0,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgslotguard.max_stalled_time",
        c"Treat an active slot whose stream (its walsender's sent, write and flush positions) has not advanced for this long while WAL waits for it as a hard breach (-1 disables).",
        c"With terminate_active the guard terminates its walsender and drops the slot; without, it warns.",
        &MAX_STALLED_TIME,
        -1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    // -1 (off) or MAX_XMIN_AGE_MIN..MAX_XMIN_AGE_MAX: the values in between are refused
    // by the check hook.
    unsafe {
        GucRegistry::define_int_guc_with_hooks(
            c"pgslotguard.max_xmin_age",
            c"Drop a slot in scope whose xmin or catalog_xmin is older than this many transactions (-1 disables).",
            c"The age is counted as age() counts it, from the next transaction ID. Keep it below autovacuum_freeze_max_age: a slot older than that makes anti-wraparound vacuums run without effect.",
            &MAX_XMIN_AGE,
            -1,
            MAX_XMIN_AGE_MAX,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_max_xmin_age),
            None,
            None,
        );
    }
    GucRegistry::define_enum_guc(
        c"pgslotguard.scope",
        c"Which slots the limits cover: leased, physical (all physical slots) or all.",
        c"Unleased slots are never touched under scope = leased.",
        &SCOPE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"pgslotguard.exclude",
            c"Regular expression of slot names the guard never touches, whatever the scope.",
            c"Rust regex syntax (close to POSIX ERE); an empty string excludes nothing.",
            &EXCLUDE,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_exclude),
            None,
            None,
        );
    }
    GucRegistry::define_bool_guc(
        c"pgslotguard.terminate_active",
        c"For a retained-WAL, transaction-horizon or age breach on an active slot, terminate its walsender, then drop the slot.",
        c"Lease expiry and inactivity never terminate a walsender.",
        &TERMINATE_ACTIVE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pgslotguard.dry_run",
        c"Record and log would_drop instead of dropping slots.",
        c"",
        &DRY_RUN,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgslotguard.event_retention",
        c"Events older than this are purged from pgslotguard.events (-1 keeps them forever).",
        c"",
        &EVENT_RETENTION,
        -1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"pgslotguard.min_free_wal_space",
            c"Free space to keep on the filesystem that holds pg_wal: a size such as '20GB', or a share of the filesystem such as '10%' (-1 disables).",
            c"Below it, the guard drops the fewest slots in scope whose drop brings free space back above the floor plus a headroom, then requests a fast checkpoint.",
            &MIN_FREE_WAL_SPACE,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_min_free_wal_space),
            None,
            None,
        );
    }
    GucRegistry::define_enum_guc(
        c"pgslotguard.checkpoint_after_drop",
        c"Checkpoint the guard requests after it dropped slots, so that pg_wal shrinks at once: off, spread or fast.",
        c"A drop made for pgslotguard.min_free_wal_space always requests a fast checkpoint.",
        &CHECKPOINT_AFTER_DROP,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"pgslotguard.notify_payload",
        c"What a notification on channel pgslotguard carries: minimal (the event's id, time, slot and action) or full (every column of the event).",
        c"Any role can LISTEN on any channel, so full shows holders and reasons to roles that the events view hides them from. Any role can also NOTIFY: check a notification against pgslotguard.events by its id.",
        &NOTIFY_PAYLOAD,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgslotguard.max_leases_per_role",
        c"Most leases one role other than a superuser may hold at once (-1: no limit).",
        c"A role with REPLICATION could otherwise take every replication slot through leases.",
        &MAX_LEASES_PER_ROLE,
        -1,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgslotguard.reserved_slots",
        c"Replication slots that a lease by a role other than a superuser never takes.",
        c"A lease that would leave fewer free slots than this is refused, so that standbys, HA members and superusers can still make slots; as superuser_reserved_connections keeps connections.",
        &RESERVED_SLOTS,
        0,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    #[cfg(feature = "pg_test")]
    GucRegistry::define_string_guc(
        c"pgslotguard.test_pause_at",
        c"Test builds only: the pause points (src/testhook.rs) where a process sleeps.",
        c"",
        &TEST_PAUSE_AT,
        GucContext::Suset,
        GucFlags::default(),
    );
    unsafe {
        pg_sys::MarkGUCPrefixReserved(c"pgslotguard".as_ptr());
    }
}

/// Set the DETAIL of a refused GUC value (a check hook may not raise an ERROR).
unsafe fn check_detail(msg: &str) {
    let c = CString::new(msg).unwrap_or_default();
    unsafe {
        pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(c.as_ptr());
    }
}

/// Set the HINT of a refused GUC value.
unsafe fn check_hint(msg: &str) {
    let c = CString::new(msg).unwrap_or_default();
    unsafe {
        pg_sys::GUC_check_errhint_string = pg_sys::pstrdup(c.as_ptr());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_min_free_wal_space(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    let value = unsafe {
        if newval.is_null() || (*newval).is_null() {
            return true;
        }
        CStr::from_ptr(*newval).to_string_lossy().into_owned()
    };
    match Floor::parse(&value) {
        Ok(_) => true,
        Err(e) => {
            unsafe {
                check_detail(&format!("pgslotguard.min_free_wal_space: {e}"));
                check_hint("Give a size such as '20GB' or a share of the filesystem such as '10%'; -1 turns the floor off.");
            }
            false
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_max_xmin_age(
    newval: *mut i32,
    _extra: *mut *mut std::ffi::c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: the GUC machinery passes a valid pointer to the proposed value.
    let v = unsafe { *newval };
    if v == -1 || (MAX_XMIN_AGE_MIN..=MAX_XMIN_AGE_MAX).contains(&v) {
        return true;
    }
    unsafe {
        check_detail(&format!("pgslotguard.max_xmin_age must be -1 (off) or between {MAX_XMIN_AGE_MIN} and {MAX_XMIN_AGE_MAX} transactions."));
        check_hint("Keep it below autovacuum_freeze_max_age (200000000 by default).");
    }
    false
}

#[pg_guard]
unsafe extern "C-unwind" fn check_exclude(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    let value = unsafe {
        if newval.is_null() || (*newval).is_null() {
            return true;
        }
        CStr::from_ptr(*newval).to_string_lossy().into_owned()
    };
    match compile_exclude(&value) {
        Ok(_) => true,
        Err(e) => {
            unsafe { check_detail(&format!("pgslotguard.exclude is not a valid regular expression: {e}")) };
            false
        }
    }
}

fn compile_exclude(pattern: &str) -> Result<Option<regex::Regex>, regex::Error> {
    if pattern.is_empty() {
        Ok(None)
    } else {
        regex::Regex::new(pattern).map(Some)
    }
}

fn opt_limit(v: i32, scale: i64) -> Option<i64> {
    (v >= 0).then_some(v as i64 * scale)
}

thread_local! {
    /// `pgslotguard.exclude` as last compiled, with its text: compiled again only when
    /// the setting changes (a lease call checks it too).
    static EXCLUDE_RE: std::cell::RefCell<(String, Option<regex::Regex>)> = const { std::cell::RefCell::new((String::new(), None)) };
}

/// `pgslotguard.exclude`, compiled (`None`: excludes nothing).
pub fn exclude() -> Option<regex::Regex> {
    let text = EXCLUDE.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
    EXCLUDE_RE.with_borrow_mut(|cached| {
        if cached.0 != text {
            cached.1 = compile_exclude(&text).ok().flatten();
            cached.0 = text;
        }
        cached.1.clone()
    })
}

/// The policy in force now. Read once at the start of a pass.
pub fn policy() -> Policy {
    let exclude = exclude();
    Policy {
        max_retained_wal: max_retained_wal(),
        max_slot_age_us: opt_limit(MAX_SLOT_AGE.get(), US_PER_S),
        max_inactive_us: opt_limit(MAX_INACTIVE_TIME.get(), US_PER_S),
        scope: match SCOPE.get() {
            ScopeGuc::Leased => Scope::Leased,
            ScopeGuc::Physical => Scope::Physical,
            ScopeGuc::All => Scope::All,
        },
        exclude,
        terminate_active: TERMINATE_ACTIVE.get(),
        dry_run: DRY_RUN.get(),
        warn_fraction: WARN_FRACTION.get(),
        max_stalled_us: opt_limit(MAX_STALLED_TIME.get(), US_PER_S),
        max_xmin_age: opt_limit(MAX_XMIN_AGE.get(), 1),
        synchronized_standby_slots: synchronized_standby_slots(),
        min_free_wal: min_free_wal_space(),
        checkpoint: match CHECKPOINT_AFTER_DROP.get() {
            CheckpointGuc::Off => CheckpointMode::Off,
            CheckpointGuc::Spread => CheckpointMode::Spread,
            CheckpointGuc::Fast => CheckpointMode::Fast,
        },
    }
}

/// Core's `synchronized_standby_slots` (PostgreSQL 17 and later; empty on 15), read here
/// with the guard's own settings: a slot named there is never dropped.
fn synchronized_standby_slots() -> Vec<String> {
    // SAFETY: a lookup by name in the GUC table, missing_ok (the setting does not exist
    // before 17); the returned string belongs to the GUC machinery and is copied at once.
    let value = unsafe {
        let p = pg_sys::GetConfigOption(c"synchronized_standby_slots".as_ptr(), true, false);
        if p.is_null() {
            return Vec::new();
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    };
    crate::policy::horizon::parse_slot_list(&value)
}

/// The free-space floor, if set (the check hook has refused anything unparsable).
pub fn min_free_wal_space() -> Option<Floor> {
    MIN_FREE_WAL_SPACE.get().and_then(|c| Floor::parse(&c.to_string_lossy()).ok().flatten())
}

pub fn database() -> String {
    DATABASE.get().unwrap_or_else(|| DEFAULT_DATABASE.to_owned()).to_string_lossy().into_owned()
}
/// Notifications carry every column of the event (`pgslotguard.notify_payload = full`).
pub fn notify_full() -> bool {
    NOTIFY_PAYLOAD.get() == NotifyPayloadGuc::Full
}

/// Test builds only: `pgslotguard.test_pause_at`.
#[cfg(feature = "pg_test")]
pub fn test_pause_at() -> Option<String> {
    TEST_PAUSE_AT.get().map(|c| c.to_string_lossy().into_owned()).filter(|s| !s.is_empty())
}

/// `pgslotguard.max_leases_per_role`; `None`: no limit.
pub fn max_leases_per_role() -> Option<i32> {
    Some(MAX_LEASES_PER_ROLE.get()).filter(|v| *v >= 0)
}

/// `pgslotguard.reserved_slots`.
pub fn reserved_slots() -> i32 {
    RESERVED_SLOTS.get().max(0)
}

pub fn enabled() -> bool {
    ENABLED.get()
}
pub fn naptime_ms() -> u64 {
    NAPTIME.get().max(10) as u64
}
pub fn default_ttl_us() -> i64 {
    DEFAULT_TTL.get() as i64 * US_PER_S
}
pub fn max_ttl_us() -> i64 {
    MAX_TTL.get() as i64 * US_PER_S
}
const BYTES_PER_MB: i64 = 1 << 20;

/// Global retained-WAL limit in bytes, if set (the one place it is read).
pub fn max_retained_wal() -> Option<i64> {
    opt_limit(MAX_RETAINED_WAL.get(), BYTES_PER_MB)
}
/// Event retention in microseconds, if events are purged at all.
pub fn event_retention_us() -> Option<i64> {
    opt_limit(EVENT_RETENTION.get(), US_PER_S)
}
