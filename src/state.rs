//! SPI access to the `pgslotguard.*` tables (core's slots are read from shared memory, in
//! src/slots.rs); slot creation
//! and drops go through PostgreSQL's own functions. Every query is schema-qualified and
//! takes its values as `$n` arguments, never spliced into the text.

use crate::error::GuardError;
use crate::policy::disk::{self, WalDisk};
use crate::policy::{CheckpointMode, Outcome, Seen, SlotInfo, Snapshot};
use pgrx::datum::{DatumWithOid, Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiTupleTable;
use std::rc::Rc;

pub type Result<T> = std::result::Result<T, GuardError>;

pub use crate::time::{mono_us, now_us, ts, us};
pub use crate::event::Event;

thread_local! {
    /// Plans of the queries every pass runs, kept for the life of the backend: planning the
    /// slot/lease join costs about as much as running it.
    static PLANS: std::cell::RefCell<std::collections::HashMap<&'static str, pgrx::spi::OwnedPreparedStatement>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// Run one of our queries with its arguments. Every query here is a literal with `$n`
/// parameters, so its plan is prepared once per backend (argument types from the
/// arguments) and reused: planning costs about as much as running most of them.
/// `mutating` queries go through SPI's read-write path, which assigns the transaction an
/// ID; the others run read-only, so a pass that only reads writes no WAL, and the views
/// work on a hot standby (where a transaction ID cannot be assigned).
fn run<T>(
    query: &'static str,
    args: &[DatumWithOid],
    mutating: bool,
    f: impl FnOnce(SpiTupleTable) -> pgrx::spi::Result<T>,
) -> Result<T> {
    let types: Vec<pgrx::PgOid> = args.iter().map(|a| pgrx::PgOid::from(a.oid())).collect();
    let types = &types[..];
    Ok(Spi::connect_mut(|c| {
        if !PLANS.with_borrow(|p| p.contains_key(query)) {
            let stmt = if mutating { c.prepare_mut(query, types)? } else { c.prepare(query, types)? };
            let stmt = stmt.keep();
            PLANS.with_borrow_mut(|p| p.insert(query, stmt));
        }
        PLANS.with_borrow(|p| match p.get(query) {
            Some(stmt) if mutating => c.update(stmt, None, args).and_then(f),
            Some(stmt) => c.select(stmt, None, args).and_then(f),
            None => Err(pgrx::spi::Error::NoTupleTable),
        })
    })?)
}

/// A query that only reads.
fn read<T>(query: &'static str, args: &[DatumWithOid], f: impl FnOnce(SpiTupleTable) -> pgrx::spi::Result<T>) -> Result<T> {
    run(query, args, false, f)
}

/// A query that writes (or locks rows, or creates or drops a slot).
fn write<T>(query: &'static str, args: &[DatumWithOid], f: impl FnOnce(SpiTupleTable) -> pgrx::spi::Result<T>) -> Result<T> {
    run(query, args, true, f)
}

/// The slot named `name`, read from shared memory (src/slots.rs).
pub fn slot(name: &str) -> Result<Option<SlotInfo>> {
    Ok(crate::slots::one(name))
}

/// Current WAL position: the insert position on a primary; on a standby the further of
/// the last replayed and the last received (flushed by the WAL receiver) position, since
/// WAL received and not yet replayed sits in the standby's pg_wal too.
pub fn current_lsn() -> u64 {
    // SAFETY: plain reads of shared-memory positions, each under core's own spinlock.
    unsafe {
        if pg_sys::RecoveryInProgress() {
            let replayed = pg_sys::GetXLogReplayRecPtr(std::ptr::null_mut());
            let received = pg_sys::GetWalRcvFlushRecPtr(std::ptr::null_mut(), std::ptr::null_mut());
            replayed.max(received)
        } else {
            pg_sys::GetXLogInsertRecPtr()
        }
    }
}

pub fn in_recovery() -> bool {
    unsafe { pg_sys::RecoveryInProgress() }
}

/// Everything a decision needs, read now: the store (leases, tracking, warnings given,
/// from shared memory), then the slots (from shared memory too). `only`: one slot's.
///
/// The store is read first, and the order matters: a lease's slot is created before the
/// lease is applied at commit, so every lease the read sees has a slot the later read
/// sees unless it was really dropped. Read the other way round, a lease committing between
/// the two reads would look like a lease whose slot is missing. (A slot created after the
/// store was read is simply new to the tracking.)
fn read_snapshot(only: Option<&str>) -> Result<Snapshot> {
    // Both clocks at one instant: the worker's clock rule compares them.
    let (now, mono) = (now_us(), mono_us());
    let current_lsn = current_lsn();
    // Each lease as its transactions' fates leave it (this transaction's own changes
    // included): src/store/mod.rs, `resolve`.
    let store = crate::store::read(only)?;
    let slots = match only {
        None => crate::slots::all(),
        Some(name) => crate::slots::one(name).into_iter().collect(),
    };
    // A new lease another transaction is still making, its slot not yet persistent (a
    // slot ephemeral until its pending lease is on disk, machine::lease): not judged yet.
    let mut store = store;
    if store.pending.iter().any(|p| p.fate == crate::txid::Fate::Running && p.rec.made_slot) {
        let in_making: rustc_hash::FxHashSet<&str> = store
            .pending
            .iter()
            .filter(|p| p.fate == crate::txid::Fate::Running && p.rec.made_slot)
            .filter(|p| slots.iter().find(|s| s.name == p.name).is_none_or(|s| s.temporary))
            .map(|p| p.name.as_str())
            .collect();
        let names: Vec<String> = in_making.iter().map(|n| n.to_string()).collect();
        store.leases.retain(|l| !names.iter().any(|n| *n == l.slot_name));
    }
    Ok(Snapshot {
        now,
        mono,
        current_lsn,
        slots,
        leases: Rc::new(store.leases),
        seen: Rc::new(store.seen),
        warned: Rc::new(store.warned),
        restart_before: Default::default(),
        disk: None,
        held: Default::default(),
        next_xid: crate::slots::next_full_xid(),
        recent_drops: Rc::new(store.recent_drops),
    })
}

/// Every slot, lease and tracking record.
pub fn snapshot() -> Result<Snapshot> {
    read_snapshot(None)
}

/// The same, for one slot name only (the second look before acting).
pub fn snapshot_of(name: &str) -> Result<Snapshot> {
    read_snapshot(Some(name))
}

/// Record first-seen and inactive-since times for the slots of `snap` (see
/// `policy::track`), and forget slots that are gone. Records are written only when
/// something changed, so an idle pass writes nothing; `write = false` (dry run) writes
/// nothing. Leaves the tracking as it now stands in `snap.seen`.
pub fn track(snap: &mut Snapshot, policy: &crate::policy::Policy, write: bool) -> Result<()> {
    // A guard drop is remembered for an hour (the loop rule), then forgotten.
    let window = crate::policy::LOOP_WINDOW_US;
    if write && snap.recent_drops.iter().any(|r| snap.now - r.at >= window) {
        let old: Vec<String> = snap.recent_drops.iter().filter(|r| snap.now - r.at >= window).map(|r| r.slot_name.clone()).collect();
        crate::store::change(|w| {
            for name in &old {
                let mut rec = w.get(name);
                rec.dropped = None;
                w.put(&rec)?;
            }
            Ok(())
        })?;
        Rc::make_mut(&mut snap.recent_drops).retain(|r| snap.now - r.at < window);
    }
    let Some(now_seen) = crate::policy::track(policy, snap) else { return Ok(()) };
    if write {
        let before: rustc_hash::FxHashMap<&str, &Seen> = snap.seen.iter().map(|s| (s.slot_name.as_str(), s)).collect();
        let after: rustc_hash::FxHashSet<&str> = now_seen.iter().map(|s| s.slot_name.as_str()).collect();
        let changed: Vec<&Seen> = now_seen.iter().filter(|n| before.get(n.slot_name.as_str()) != Some(n)).collect();
        let gone: Vec<&str> = snap.seen.iter().map(|s| s.slot_name.as_str()).filter(|n| !after.contains(n)).collect();
        if !changed.is_empty() || !gone.is_empty() {
            crate::store::change(|w| {
                for n in &changed {
                    let mut rec = w.get(&n.slot_name);
                    let dropping = rec.seen.as_ref().and_then(|s| s.dropping.clone());
                    // The slot this tracking is of, from its first sight: a slot of the name
                    // made since is not it (machine::forget_tracking).
                    let slot = rec.seen.as_ref().and_then(|s| s.slot).or_else(|| crate::slots::identity(&n.slot_name));
                    rec.seen = Some(crate::store::SeenRec {
                        first_seen: n.first_seen,
                        inactive_since: n.inactive_since,
                        stalled: n.stalled,
                        dropping,
                        slot,
                    });
                    w.put(&rec)?;
                }
                for name in &gone {
                    let mut rec = w.get(name);
                    if rec.seen.as_ref().is_some_and(|s| s.dropping.is_some()) {
                        continue;
                    }
                    rec.seen = None;
                    rec.warned.clear();
                    w.put(&rec)?;
                }
                Ok(())
            })?;
        }
    }
    snap.seen = now_seen.into();
    Ok(())
}

/// Has the guard's drop of `name` for `action`, decided at `since`, been recorded already?
/// Looks in both places an event can be: the per-node ring (where a standby records, also
/// before a promotion) and, on a primary, the event table.
pub fn drop_recorded(name: &str, action: Outcome, since: i64) -> Result<bool> {
    let in_ring = crate::store::ring_events()?.iter().any(|e| e.slot_name.as_deref() == Some(name) && e.action == action.as_str() && e.at >= since);
    if in_ring || in_recovery() {
        return Ok(in_ring);
    }
    read(
        "SELECT EXISTS (SELECT 1 FROM pgslotguard.event_log WHERE slot_name OPERATOR(pg_catalog.=) $1::pg_catalog.name AND action OPERATOR(pg_catalog.=) $2 AND at OPERATOR(pg_catalog.>=) $3)",
        &[name.into(), action.as_str().into(), ts(since).into()],
        |t| Ok(t.first().get::<bool>(1)?.unwrap_or(false)),
    )
}

/// The release and keep events of the leases `ids` (`store::LeaseRec::lease_id`): what the
/// guard's first pass after a start looks for (machine.rs, `reconcile`).
pub fn ended_leases(ids: &[i64]) -> Result<Vec<(i64, Outcome)>> {
    if ids.is_empty() {
        return Ok(vec![]);
    }
    read(
        "SELECT lease_id, action FROM pgslotguard.event_log
          WHERE lease_id OPERATOR(pg_catalog.=) ANY ($1) AND action OPERATOR(pg_catalog.=) ANY ('{release,keep}'::pg_catalog.text[])",
        &[ids.to_vec().into()],
        |t| {
            let mut out = vec![];
            for row in t {
                if let (Some(id), Some(a)) = (row.get::<i64>(1)?, row.get::<String>(2)?) {
                    if let Some(o) = Outcome::parse(&a) {
                        out.push((id, o));
                    }
                }
            }
            Ok(out)
        },
    )
}

/// The OID of the role named `name`, if there is one.
pub fn role_oid(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a catalog-cache lookup by name; missing_ok, so no ERROR.
    let oid = unsafe { pg_sys::get_role_oid(c.as_ptr(), true) };
    (oid != pg_sys::InvalidOid).then(|| oid.to_u32())
}

/// Does the role with this OID exist?
pub fn role_exists(oid: u32) -> bool {
    if oid == 0 {
        return false;
    }
    // SAFETY: a catalog-cache lookup by OID; NULL when there is none.
    unsafe { !pg_sys::GetUserNameFromId(pg_sys::Oid::from(oid), true).is_null() }
}

/// Remember a warning given (the floor's with slot name ''), until it re-arms.
pub fn remember_warning(slot: &str, limit: &str) -> Result<()> {
    crate::store::change(|w| {
        let mut rec = if slot.is_empty() { w.node() } else { w.get(slot) };
        if !rec.warned.iter().any(|l| l == limit) {
            rec.warned.push(limit.to_string());
            w.put(&rec)?;
        }
        Ok(())
    })
}

/// Forget warnings whose value fell back under the threshold (or whose slot is gone).
pub fn forget_warnings(slots: Vec<String>, limits: Vec<String>) -> Result<()> {
    crate::store::change(|w| {
        for (slot, limit) in slots.iter().zip(&limits) {
            let mut rec = if slot.is_empty() { w.node() } else { w.get(slot) };
            if rec.warned.iter().any(|l| l == limit) {
                rec.warned.retain(|l| l != limit);
                w.put(&rec)?;
            }
        }
        Ok(())
    })
}

/// How long the guard waits for a walsender it terminated to exit; a longer wait would hold
/// up the whole pass (if it has not exited, the next pass drops the slot).
const TERMINATE_WAIT_MS: i64 = 1000;

/// Terminate a walsender and wait up to [`TERMINATE_WAIT_MS`] for it to go.
pub fn terminate(pid: i32) -> Result<bool> {
    read("SELECT pg_catalog.pg_terminate_backend($1, $2)", &[pid.into(), TERMINATE_WAIT_MS.into()], |t| {
        Ok(t.first().get::<bool>(1)?.unwrap_or(false))
    })
}

/// The clock time now, and now + `ttl` by PostgreSQL's calendar arithmetic.
pub fn clock_plus(ttl: Interval) -> Result<(TimestampWithTimeZone, TimestampWithTimeZone)> {
    read(
        "SELECT t, t OPERATOR(pg_catalog.+) $1 FROM (SELECT pg_catalog.clock_timestamp() AS t) c",
        &[ttl.into()],
        |t| {
            let r = t.first();
            let never = TimestampWithTimeZone::negative_infinity;
            Ok((r.get::<TimestampWithTimeZone>(1)?.unwrap_or_else(never), r.get::<TimestampWithTimeZone>(2)?.unwrap_or_else(never)))
        },
    )
}

/// The channel every event is also sent on, at commit (`pg_notify`).
pub const CHANNEL: &str = "pgslotguard";

/// Record an event, with the holder of the slot's lease (if it has one now), and send it
/// to listeners on [`CHANNEL`] as JSON. NOTIFY is transactional: listeners get it when the
/// transaction that recorded the event commits, in commit order, and never if it rolls back.
pub fn record(e: &Event) -> Result<()> {
    let holder = e.lease_holder.map(str::to_string);
    if in_recovery() {
        return record_in_ring(e, holder);
    }
    let (id, at) = write(
        "INSERT INTO pgslotguard.event_log
                (slot_name, action, reason, retained_bytes, actor, lease_owner, freed_bytes, pg_wal_bytes, lease_holder,
                 lease_owner_oid, lease_id)
         VALUES ($1::pg_catalog.name, $2, $3, $4, $5, $6::pg_catalog.name, $7, $8, $9, $10::pg_catalog.oid, $11)
         RETURNING id, pg_catalog.to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        &[
            e.slot_name.into(),
            e.action.as_str().into(),
            e.reason.into(),
            e.retained_bytes.into(),
            e.actor.into(),
            e.lease_owner.into(),
            e.freed_bytes.into(),
            e.pg_wal_bytes.into(),
            holder.as_deref().into(),
            e.lease_owner_oid.map(|o| o as i64).into(),
            e.lease_id.into(),
        ],
        |t| {
            let t = t.first();
            Ok((t.get::<i64>(1)?.unwrap_or(0), t.get::<String>(2)?.unwrap_or_default()))
        },
    )?;
    let payload = if crate::guc::notify_full() {
        crate::notify::payload(e, id, &at, holder.as_deref())
    } else {
        crate::notify::minimal(e, id, &at)
    };
    write("SELECT pg_catalog.pg_notify($1, $2)", &[CHANNEL.into(), payload.into()], |_| Ok(()))
}

/// Where no table can be written (a hot standby): the event goes to the server log and to
/// the per-node ring (src/store/ring.rs), which the events view shows too. No NOTIFY:
/// core cannot send one during recovery. The ring is not transactional: an event recorded
/// by a transaction that then rolls back stays there (the log has it anyway).
fn record_in_ring(e: &Event, holder: Option<String>) -> Result<()> {
    let id = crate::store::ring_push(crate::store::ring::RingEvent {
        id: 0,
        at: now_us(),
        slot_name: e.slot_name.map(str::to_string),
        action: e.action.as_str().to_string(),
        reason: e.reason.to_string(),
        retained_bytes: e.retained_bytes,
        actor: e.actor.to_string(),
        lease_owner: e.lease_owner.map(str::to_string),
        freed_bytes: e.freed_bytes,
        pg_wal_bytes: e.pg_wal_bytes,
        lease_holder: holder,
        lease_owner_oid: e.lease_owner_oid,
        lease_id: e.lease_id,
    })?;
    let on = e.slot_name.map(|s| format!(" on replication slot \"{s}\"")).unwrap_or_default();
    log!("pgslotguard: event {}{on} by {} (standby event {id}): {}", e.action.as_str(), e.actor, crate::validate::for_log(e.reason));
    Ok(())
}

/// Delete events older than the retention; returns how many went. Looks first, so a
/// pass with nothing to purge stays read-only. Nothing on a standby (the table is the
/// primary's; the ring is bounded by count).
pub fn purge_events(older_than_us: i64) -> Result<usize> {
    if in_recovery() {
        return Ok(0);
    }
    let cutoff = ts(now_us() - older_than_us);
    // min(at) is one step down the index on `at`, whatever the table holds. (EXISTS with
    // `at < $1` got a generic plan that scanned the whole table when nothing was old
    // enough: 25 ms a pass at 137 000 events.)
    let oldest = read("SELECT pg_catalog.min(at) FROM pgslotguard.event_log", &[], |t| {
        Ok(t.first().get::<TimestampWithTimeZone>(1)?)
    })?;
    if !oldest.is_some_and(|o| pg_sys::TimestampTz::from(o) < pg_sys::TimestampTz::from(cutoff)) {
        return Ok(0);
    }
    // Planned for this cutoff, not kept: a generic plan guesses a third of the table for
    // `at < $1`, where a purge each pass deletes the few events that aged out since the last.
    Ok(Spi::connect_mut(|c| {
        c.update("DELETE FROM pgslotguard.event_log WHERE at OPERATOR(pg_catalog.<) $1", None, &[cutoff.into()]).map(|t| t.len())
    })?)
}

/// The worker's own session settings, whatever a DBA or a role set for the database or
/// the role (ALTER DATABASE/ROLE ... SET): a pass must be able to write, must not be cut
/// short by a timeout meant for users, and must resolve nothing through a schema a user can
/// write to. Lock waits are bounded (no lock of ours is one a user can take, but a
/// superuser can lock the event table).
pub const WORKER_SETTINGS: [(&str, &str); 7] = [
    ("search_path", "pg_catalog, pg_temp"),
    ("default_transaction_read_only", "off"),
    ("default_transaction_isolation", "read committed"),
    ("statement_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
    ("lock_timeout", "10s"),
    ("session_replication_role", "origin"),
];

/// Pin the worker's session settings ([`WORKER_SETTINGS`]), outside any transaction, as
/// an override no database or role setting can change.
pub fn pin_worker_session() {
    for (name, value) in WORKER_SETTINGS {
        let (n, v) = (std::ffi::CString::new(name).unwrap_or_default(), std::ffi::CString::new(value).unwrap_or_default());
        // SAFETY: SetConfigOption sets a setting of this backend, as the worker's own
        // override (PGC_S_OVERRIDE wins over database and role settings); every name here
        // is a core setting the superuser context may set.
        unsafe {
            pg_sys::SetConfigOption(n.as_ptr(), v.as_ptr(), pg_sys::GucContext::PGC_SUSET, pg_sys::GucSource::PGC_S_OVERRIDE);
        }
    }
}

/// The version of the extension installed in this database, if it is.
pub fn extension_version() -> Result<Option<String>> {
    read("SELECT extversion FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pgslotguard'", &[], |t| {
        if t.is_empty() {
            return Ok(None);
        }
        Ok(t.first().get::<String>(1)?)
    })
}

/// The version this library is (its SQL objects are the same version's).
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Leases kept in the tables of version 0.1.0, not yet moved into the store
/// (`ALTER EXTENSION pgslotguard UPDATE` moves them). Only asked while 0.1.0 is installed.
pub fn old_table_leases() -> Result<i64> {
    read("SELECT pg_catalog.count(*) FROM pgslotguard.lease_data", &[], |t| Ok(t.first().get::<i64>(1)?.unwrap_or(0)))
}

thread_local! {
    /// (extension oid, its owner): looked up once per installed extension per backend.
    static OWNER: std::cell::Cell<(pg_sys::Oid, pg_sys::Oid)> =
        const { std::cell::Cell::new((pg_sys::InvalidOid, pg_sys::InvalidOid)) };
}

/// Owner of the extension: the role whose rights the API uses for its own tables and slots.
pub fn extension_owner() -> Result<pg_sys::Oid> {
    let ext = unsafe { pg_sys::get_extension_oid(c"pgslotguard".as_ptr(), true) };
    let (cached_ext, cached_owner) = OWNER.get();
    if ext != pg_sys::InvalidOid && ext == cached_ext {
        return Ok(cached_owner);
    }
    let owner = read("SELECT extowner FROM pg_catalog.pg_extension WHERE oid OPERATOR(pg_catalog.=) $1", &[ext.into()], |t| {
        Ok(t.first().get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID)))
    })?;
    OWNER.set((ext, owner));
    Ok(owner)
}

pub fn role_name(oid: pg_sys::Oid) -> String {
    unsafe {
        let p = pg_sys::GetUserNameFromId(oid, true);
        if p.is_null() {
            format!("oid {}", oid.to_u32())
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

pub fn is_member_of_pg_monitor(role: pg_sys::Oid) -> bool {
    unsafe { pg_sys::has_privs_of_role(role, pg_sys::Oid::from(pg_sys::ROLE_PG_MONITOR)) }
}

/// Run `f` as the extension owner, restoring the caller's identity afterwards (also on
/// ERROR: transaction abort restores it, as for SECURITY DEFINER functions).
pub fn as_owner<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let owner = extension_owner()?;
    let (mut saved_user, mut saved_ctx) = (pg_sys::InvalidOid, 0i32);
    // SAFETY: the pattern fmgr_security_definer uses. SECURITY_LOCAL_USERID_CHANGE marks
    // the switch so that SET ROLE / SET SESSION AUTHORIZATION are refused inside it, and
    // AbortTransaction/AbortSubTransaction restore the saved user and context if `f`
    // raises an ERROR (which then does not return here). On return we restore them.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_ctx);
        pg_sys::SetUserIdAndSecContext(owner, saved_ctx | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let r = f();
    // SAFETY: restores exactly what was saved above, in the same transaction state.
    unsafe { pg_sys::SetUserIdAndSecContext(saved_user, saved_ctx) };
    r
}


const MB: i64 = 1 << 20;

/// The filesystem that holds `pg_wal` (statvfs follows the symlink that `initdb -X`
/// makes), the WAL segments in it, and the server settings that decide what a
/// checkpoint keeps. Every backend runs in the data directory, so `pg_wal` is relative.
pub fn wal_disk() -> Result<WalDisk> {
    // SAFETY: statvfs is plain data; all zeroes is a valid value for it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is NUL-terminated and `st` is a valid out-parameter.
    if unsafe { libc::statvfs(c"pg_wal".as_ptr(), &mut st) } != 0 {
        return Err(GuardError::Disk(format!("statvfs(\"pg_wal\"): {}", std::io::Error::last_os_error())));
    }
    let unit = st.f_frsize as i64;
    let segments = std::fs::read_dir("pg_wal")
        .map_err(|e| GuardError::Disk(format!("reading directory \"pg_wal\": {e}")))?
        .filter_map(|e| e.ok())
        .filter(|e| disk::is_segment_name(&e.file_name().to_string_lossy()))
        .count() as i64;
    // SAFETY: these are the server's own settings, plain ints set by the GUC machinery.
    let (seg, keep_mb, max_mb, slot_keep_mb) = unsafe {
        (
            pg_sys::wal_segment_size as i64,
            pg_sys::wal_keep_size_mb as i64,
            pg_sys::max_wal_size_mb as i64,
            pg_sys::max_slot_wal_keep_size_mb as i64,
        )
    };
    // Segments waiting for the archiver: `.ready` status files (core writes them only
    // while archiving is on, and turns them to `.done` once archived).
    let unarchived = std::fs::read_dir("pg_wal/archive_status")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".ready").and_then(|seg_name| disk::segment_start(seg_name, seg))
                })
                .min()
        })
        .unwrap_or(None);
    Ok(WalDisk {
        free: st.f_bavail as i64 * unit,
        total: st.f_blocks as i64 * unit,
        pg_wal: segments * seg,
        insert_lsn: current_lsn(),
        segment_size: seg,
        wal_keep: keep_mb * MB,
        max_wal: max_mb * MB,
        max_slot_keep: (slot_keep_mb >= 0).then_some(slot_keep_mb * MB),
        unarchived,
    })
}

unsafe extern "C-unwind" {
    /// postmaster/bgwriter.h, which pgrx's bindings do not include.
    fn RequestCheckpoint(flags: std::ffi::c_int);
}

/// "Do it without delays": CHECKPOINT_IMMEDIATE until 18, renamed CHECKPOINT_FAST in 19
/// (the same bit).
#[cfg(not(feature = "pg19"))]
const CHECKPOINT_FAST: u32 = pg_sys::CHECKPOINT_IMMEDIATE;
#[cfg(feature = "pg19")]
const CHECKPOINT_FAST: u32 = pg_sys::CHECKPOINT_FAST;

/// Ask the checkpointer for a checkpoint and return at once (no CHECKPOINT_WAIT: the
/// pass does not wait for it). FORCE makes it run even on a primary that wrote nothing
/// since the last one; fast adds IMMEDIATE (no spreading of the writes).
pub fn request_checkpoint(mode: CheckpointMode) {
    let flags = match mode {
        CheckpointMode::Off => return,
        CheckpointMode::Spread => pg_sys::CHECKPOINT_FORCE,
        CheckpointMode::Fast => pg_sys::CHECKPOINT_FORCE | CHECKPOINT_FAST,
    };
    // SAFETY: RequestCheckpoint(int) is exported by the server and callable from any
    // backend; pg_guard_ffi_boundary turns an ERROR raised inside it into a Rust panic
    // that the caller's subtransaction catches.
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| RequestCheckpoint(flags as std::ffi::c_int)) };
}

/// The LSN of the last completed checkpoint, from pg_control (changes when a checkpoint
/// ends, unlike the redo pointer in shared memory, which moves when one begins).
pub fn last_checkpoint_lsn() -> Result<u64> {
    read("SELECT checkpoint_lsn::text FROM pg_catalog.pg_control_checkpoint()", &[], |t| {
        Ok(t.first().get::<&str>(1)?.and_then(crate::validate::parse_lsn).unwrap_or(0))
    })
}
