//! The guard worker: connect, then one enforcement pass every `pgslotguard.naptime` (and
//! at once on SIGHUP). Errors are contained per slot (enforce.rs) and per pass (here): the
//! worker logs them, publishes them in shared memory and carries on; it never panics.

use crate::policy::timing::{self, ClockWatch, Probe, WalRate};
use crate::validate::pretty_duration;
use crate::{enforce, guc, shmem, state};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::collections::HashSet;
use std::time::{Duration, Instant};

pub const WORKER_NAME: &str = "pgslotguard guard";
/// How often the worker looks for the end of a checkpoint it requested.
const CHECKPOINT_POLL_US: i64 = 500_000;
/// How often the worker looks for the extension while it is not created.
const MISSING_EXTENSION_POLL_US: i64 = 1_000_000;
/// The least time between the start of a pass and one woken by a lease call.
const MIN_WOKEN_SPACING: Duration = Duration::from_millis(100);
/// The postmaster restarts the worker this long after it exits with an error.
const RESTART_DELAY: Duration = Duration::from_secs(5);

/// Register the guard worker (from _PG_init, when preloaded).
pub fn register() {
    BackgroundWorkerBuilder::new(WORKER_NAME)
        .set_type(WORKER_NAME)
        .set_library("pgslotguard")
        .set_function("pgslotguard_worker_main")
        .enable_spi_access()
        // Start at consistent state: a hot standby's slots are guarded too (each pass asks
        // whether recovery is still in progress; promotion does not restart the worker).
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(RESTART_DELAY))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pgslotguard_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = guc::database();
    if shmem::read().is_some_and(|s| s.database_missing) {
        wait_for_database(&db);
        return;
    }
    shmem::update(|s| s.database_missing = true);
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    shmem::update(|s| s.database_missing = false);
    // Whatever the database's or the role's settings say (ALTER DATABASE ... SET
    // default_transaction_read_only = on, a statement_timeout, a search_path): the guard's
    // own, before its first transaction.
    state::pin_worker_session();

    let pid = unsafe { pg_sys::MyProcPid };
    shmem::update(|s| {
        s.pid = pid;
        s.started_at = state::now_us();
    });
    shmem::clear_pid_at_exit();
    log!("pgslotguard: guard worker started (database \"{db}\", naptime {} ms)", guc::naptime_ms());

    let mut warned = HashSet::new();
    let mut restarts = rustc_hash::FxHashMap::default();
    let mut clock = ClockWatch::default();
    let mut rate = WalRate::default();
    // The same measure over the next transaction ID (policy::horizon::xid_budget).
    let mut xid_rate = WalRate::default();
    let mut missing_logged = false;
    let mut disabled_logged = false;
    'passes: loop {
        let started = Instant::now();
        let started_at = state::now_us();
        if let Some(j) = clock.jump(started_at, state::mono_us()) {
            log!(
                "pgslotguard: the system clock moved {} {} against real time since the last pass; lease times follow the clock, time-driven drops wait for real time",
                if j > 0 { "forward" } else { "back" },
                pretty_duration(j.abs())
            );
        }
        let mut next = Next::default();
        if guc::enabled() {
            disabled_logged = false;
            let mut actor = enforce::Actor { name: "worker", own_transaction: true, records: true, warned: Some(&mut warned), clock: Some(&mut clock), restarts: Some(&mut restarts) };
            next = one_pass(&db, &mut actor, &mut missing_logged);
        } else if !disabled_logged {
            log!("pgslotguard: pgslotguard.enabled is off; the guard worker idles");
            disabled_logged = true;
        }
        rate.observe(state::mono_us(), state::current_lsn());
        xid_rate.observe(state::mono_us(), crate::slots::next_full_xid());
        // Sleep until the next lease expiry, age or inactivity deadline, or naptime,
        // whichever comes first; while a checkpoint the guard requested is under way, look
        // again soon to record what pg_wal measures once it completes. Sleeping is timed
        // on the monotonic clock, so a wall-clock jump neither stalls nor hurries it.
        let mut wait_us = guc::naptime_ms() as i64 * 1000;
        if let Some(d) = next.due_us {
            wait_us = wait_us.min(d);
        }
        if missing_logged {
            // The extension is not there yet: notice CREATE EXTENSION within a second.
            wait_us = wait_us.min(MISSING_EXTENSION_POLL_US);
        }
        if shmem::read().is_some_and(|s| s.ckpt_pending) {
            wait_us = wait_us.min(CHECKPOINT_POLL_US);
        }
        let mut end = started + Duration::from_micros(wait_us.max(0) as u64);
        shmem::update(|s| s.next_pass = started_at + wait_us);
        // What the pass allocated is free now: give its pages back before sleeping, so an
        // idle guard holds only what it keeps between passes (at 1000 leases a pass makes
        // and frees a few MB; the allocator would otherwise hold them for its purge delay,
        // and a pass every naptime keeps them resident for good).
        // SAFETY: mi_collect only returns the calling thread's free pages to the OS.
        unsafe { libmimalloc_sys::mi_collect(true) };
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            // Between passes, while a retained-WAL limit or the floor applies, probe the WAL
            // position and pass again once half the budget the last pass measured is spent.
            let mut wake = end;
            if let Some((budget, at_lsn)) = next.wal_budget {
                let lsn = state::current_lsn();
                rate.observe(state::mono_us(), lsn);
                match timing::next_probe(budget, lsn.saturating_sub(at_lsn) as i64, rate.bytes_per_s()) {
                    Probe::PassNow => break,
                    Probe::In(us) => wake = wake.min(now + Duration::from_micros(us as u64)),
                }
            }
            // Likewise the next transaction ID, while a transaction-horizon limit applies:
            // a slot's xmin ages with transactions, not with WAL or time.
            if let Some((budget, at_xid)) = next.xid_budget {
                let xid = crate::slots::next_full_xid();
                xid_rate.observe(state::mono_us(), xid);
                match timing::next_probe(budget, xid.saturating_sub(at_xid) as i64, xid_rate.bytes_per_s()) {
                    Probe::PassNow => break,
                    Probe::In(us) => wake = wake.min(now + Duration::from_micros(us as u64)),
                }
            }
            // WaitLatch counts whole milliseconds: round up, so a wait never ends early.
            let ms = wake.saturating_duration_since(now).as_micros().div_ceil(1000) as u64;
            if !BackgroundWorker::wait_latch(Some(Duration::from_millis(ms))) {
                break 'passes;
            }
            if BackgroundWorker::sighup_received() {
                // SAFETY: the worker's main loop, outside any transaction: where a backend
                // processes a reload too.
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                break;
            }
            if !shmem::take_wake() {
                // A probe's time came (or the pass's): loop to probe or pass.
                if next.wal_budget.is_some() {
                    shmem::update(|s| s.probes += 1);
                }
                continue;
            }
            // Woken by a lease call that committed: pass now, but not sooner than
            // MIN_WOKEN_SPACING after the last pass began, so that a burst of lease calls
            // (1000 renews in a second) costs a handful of passes, not one each.
            end = end.min(started + MIN_WOKEN_SPACING);
        }
    }
    log!("pgslotguard: guard worker shutting down");
    // Exit code 1, not 0: a bgworker that exits with 0 is unregistered for good, and a
    // guard stopped by a stray SIGTERM must come back (bgw_restart_time). At server
    // shutdown the postmaster restarts nothing, whatever the code.
    unsafe { pg_sys::proc_exit(1) };
}

/// The last start could not connect to pgslotguard.database (it exited with FATAL:
/// database does not exist). Connect to no database, say so once, and look for the
/// database every naptime; once it exists, exit so that the postmaster starts a worker
/// that connects to it (a process connects once). No FATAL every few seconds meanwhile.
fn wait_for_database(db: &str) {
    BackgroundWorker::connect_worker_to_spi(None, None);
    let cname = std::ffi::CString::new(db).unwrap_or_default();
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_CATALOG_NAME,
        format!("pgslotguard: database \"{db}\" named by pgslotguard.database does not exist; the guard worker waits for it"),
        "pgslotguard",
    )
    .set_hint("Create the database, or set pgslotguard.database to an existing one and restart the server.")
    .report(PgLogLevel::LOG);
    loop {
        let exists = BackgroundWorker::transaction(|| unsafe {
            pg_sys::get_database_oid(cname.as_ptr(), true) != pg_sys::InvalidOid
        });
        if exists {
            log!("pgslotguard: database \"{db}\" exists now; the guard worker restarts to connect to it");
            shmem::update(|s| s.database_missing = false);
            unsafe { pg_sys::proc_exit(1) };
        }
        if !BackgroundWorker::wait_latch(Some(Duration::from_millis(guc::naptime_ms()))) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
    unsafe { pg_sys::proc_exit(1) };
}

/// When the next pass is due, as the last pass found.
#[derive(Default)]
struct Next {
    /// Microseconds from the pass's snapshot until the next time-driven limit is due.
    due_us: Option<i64>,
    /// The WAL budget and the WAL position it was measured at (policy::timing).
    wal_budget: Option<(i64, u64)>,
    /// The transaction ID budget and the next full transaction ID it was measured at
    /// (policy::horizon).
    xid_budget: Option<(i64, u64)>,
}

/// The extension in the database is older than the library: its SQL objects (and, for
/// 0.1.0, its leases, kept in tables then) are not what this library reads. Said every
/// pass, as a pass that failed, until the DBA runs the update.
fn not_updated(db: &str, version: &str) -> String {
    let leases = if version == "0.1.0" {
        match enforce::in_subtransaction(state::old_table_leases) {
            Ok(n) => format!("its {n} lease(s) are kept in tables that this library does not read, and are not enforced"),
            Err(e) => format!("its leases are kept in tables that this library does not read ({e}), and are not enforced"),
        }
    } else {
        "no lease is enforced".to_string()
    };
    format!(
        "extension \"pgslotguard\" in database \"{db}\" is at version {version}, the library at {}: {leases}; run ALTER EXTENSION pgslotguard UPDATE in database \"{db}\"",
        state::LIBRARY_VERSION
    )
}

/// One pass in its own transaction; returns when the next pass is due.
fn one_pass(db: &str, actor: &mut enforce::Actor, missing_logged: &mut bool) -> Next {
    let start = state::now_us();
    let outcome = BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| {
        let version = enforce::in_subtransaction(state::extension_version)?;
        let Some(version) = version else { return Ok(None) };
        if version != state::LIBRARY_VERSION {
            return Err(not_updated(db, &version));
        }
        // At the top level of the transaction, so that the pass can commit action by action.
        enforce::run_pass(actor, false).map(Some).map_err(|e| e.to_string())
    }));
    let elapsed = state::now_us() - start;
    match outcome {
        Ok(None) => {
            if !*missing_logged {
                ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                    format!("pgslotguard: extension \"pgslotguard\" is not installed in database \"{db}\"; the guard worker waits for it"),
                    "pgslotguard",
                )
                .set_hint(format!("Run CREATE EXTENSION pgslotguard in database \"{db}\" (pgslotguard.database)."))
                .report(PgLogLevel::LOG);
                *missing_logged = true;
            }
            Next::default()
        }
        Ok(Some(summary)) => {
            if *missing_logged {
                log!("pgslotguard: extension found in database \"{db}\"; enforcing");
                *missing_logged = false;
            }
            shmem::update(|s| {
                s.passes += 1;
                s.last_pass_start = start;
                s.last_pass_us = elapsed;
                s.drops += summary.drops;
                s.errors += summary.errors;
                if let Some(e) = &summary.last_error {
                    s.set_last_error(e, state::now_us());
                }
            });
            // Measured from the pass's snapshot, taken as it began.
            Next { due_us: summary.next_due_us, wal_budget: summary.wal_budget, xid_budget: summary.xid_budget }
        }
        Err(msg) => {
            warning!("pgslotguard: enforcement pass failed: {msg}");
            shmem::update(|s| {
                s.passes += 1;
                s.errors += 1;
                s.last_pass_start = start;
                s.last_pass_us = elapsed;
                s.set_last_error(&format!("pass failed: {msg}"), state::now_us());
            });
            Next::default()
        }
    }
}
