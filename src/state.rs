//! SPI access to the `pgslotguard.*` tables (core's slots are read from shared memory, in
//! src/slots.rs); slot creation
//! and drops go through PostgreSQL's own functions. Every query is schema-qualified and
//! takes its values as `$n` arguments, never spliced into the text.

use crate::error::GuardError;
use crate::policy::disk::{self, WalDisk};
use crate::policy::{CheckpointMode, DropIntent, Lease, Outcome, Seen, SlotInfo, Snapshot};
use pgrx::datum::{DatumWithOid, Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiTupleTable;
use std::rc::Rc;

pub type Result<T> = std::result::Result<T, GuardError>;

/// Microseconds since 2000-01-01 (PostgreSQL's `TimestampTz`) → SQL argument.
pub fn ts(us: i64) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(us as pg_sys::TimestampTz).unwrap_or_else(|_| TimestampWithTimeZone::negative_infinity())
}

fn us(t: TimestampWithTimeZone) -> i64 {
    pg_sys::TimestampTz::from(t)
}

pub fn now_us() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Microseconds on the monotonic clock (which no one sets), from the first call in this
/// process: what sleeps and the wall-clock jump rule (policy::timing) are timed on.
pub fn mono_us() -> i64 {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(std::time::Instant::now).elapsed().as_micros() as i64
}

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

fn update(query: &'static str, args: &[DatumWithOid]) -> Result<usize> {
    write(query, args, |t| Ok(t.len()))
}

/// The slot named `name`, read from shared memory (src/slots.rs).
pub fn slot(name: &str) -> Result<Option<SlotInfo>> {
    Ok(crate::slots::one(name))
}

/// Current WAL position: the insert position on a primary, the last replayed one on a standby.
pub fn current_lsn() -> u64 {
    unsafe {
        if pg_sys::RecoveryInProgress() {
            pg_sys::GetXLogReplayRecPtr(std::ptr::null_mut())
        } else {
            pg_sys::GetXLogInsertRecPtr()
        }
    }
}

pub fn in_recovery() -> bool {
    unsafe { pg_sys::RecoveryInProgress() }
}

// The pass reads whole tables (a thousand leases are a thousand rows): each query returns
// one row of arrays, one per column, which SPI hands over in one tuple instead of a
// thousand. Reading them row by row cost more than the rest of the pass together.

/// Column `n` of the first row, as a vector of nullable values (empty for no rows).
fn column<T>(t: &SpiTupleTable, n: usize) -> pgrx::spi::Result<Vec<Option<T>>>
where
    Vec<Option<T>>: FromDatum + IntoDatum,
{
    Ok(t.get::<Vec<Option<T>>>(n)?.unwrap_or_default())
}

/// The tracking table and the leases, each as one row of arrays, in one query (one plan,
/// one portal): every row, or (`_OF`) the rows of the slot named `$1`.
macro_rules! tables_query {
    ($filter:literal) => {
        concat!(
            "SELECT s.n, s.f, s.i, s.a, s.r, l.*, w.*, s.sl, s.ss
               FROM (SELECT array_agg(slot_name::text) n, array_agg(first_seen) f, array_agg(inactive_since) i,
                            array_agg(drop_action) a, array_agg(drop_reason) r,
                            array_agg((stalled_lsn OPERATOR(pg_catalog.-) '0/0'::pg_catalog.pg_lsn)::int8) sl,
                            array_agg(stalled_since) ss
                       FROM pgslotguard.slot_seen ",
            $filter,
            ") s,
                    (SELECT array_agg(slot_name::text), array_agg(leased_at), array_agg(expires_at),
                            array_agg(max_retained), array_agg(owner::text), array_agg(limit_by_superuser),
                            array_agg((extract(epoch FROM max_inactive) * 1000000)::int8),
                            array_agg((extract(epoch FROM max_age) * 1000000)::int8), array_agg(renewed_at)
                       FROM pgslotguard.lease_data ",
            $filter,
            ") l,
                    (SELECT array_agg(slot_name::text), array_agg(limit_name) FROM pgslotguard.warned ",
            $filter,
            ") w"
        )
    };
}
const TABLES_QUERY: &str = tables_query!("");
const TABLES_OF_QUERY: &str = tables_query!("WHERE slot_name OPERATOR(pg_catalog.=) $1::name");

/// Tracking rows from columns 1-5 and 17-18 of the first row.
fn seen_rows(t: &SpiTupleTable) -> pgrx::spi::Result<Vec<Seen>> {
    let names = column::<String>(t, 1)?;
    let first = column::<TimestampWithTimeZone>(t, 2)?;
    let inactive = column::<TimestampWithTimeZone>(t, 3)?;
    let actions = column::<String>(t, 4)?;
    let mut reasons = column::<String>(t, 5)?.into_iter();
    let mut stalled_lsn = column::<i64>(t, 17)?.into_iter();
    let mut stalled_since = column::<TimestampWithTimeZone>(t, 18)?.into_iter();
    let mut out = Vec::with_capacity(names.len());
    for (((name, first), inactive), action) in names.into_iter().zip(first).zip(inactive).zip(actions) {
        let reason = reasons.next().flatten();
        let stall = stalled_lsn.next().flatten().zip(stalled_since.next().flatten());
        out.push(Seen {
            slot_name: name.unwrap_or_default(),
            first_seen: first.map(us).unwrap_or(0),
            inactive_since: inactive.map(us),
            dropping: action.map(|action| DropIntent { action, reason: reason.unwrap_or_default() }),
            stalled: stall.map(|(lsn, since)| (lsn as u64, us(since))),
        });
    }
    Ok(out)
}

/// Warnings given (slot, limit) from columns 15-16 of the first row.
fn warned_rows(t: &SpiTupleTable) -> pgrx::spi::Result<Vec<(String, String)>> {
    let slots = column::<String>(t, 15)?;
    let limits = column::<String>(t, 16)?;
    Ok(slots.into_iter().zip(limits).map(|(s, l)| (s.unwrap_or_default(), l.unwrap_or_default())).collect())
}

/// Leases from columns 6-14 of the first row.
fn lease_rows(t: &SpiTupleTable) -> pgrx::spi::Result<Vec<Lease>> {
    let names = column::<String>(t, 6)?;
    let mut leased = column::<TimestampWithTimeZone>(t, 7)?.into_iter().flatten();
    let mut expires = column::<TimestampWithTimeZone>(t, 8)?.into_iter().flatten();
    let mut limits = column::<i64>(t, 9)?.into_iter();
    let mut owners = column::<String>(t, 10)?.into_iter();
    let mut by_superuser = column::<bool>(t, 11)?.into_iter().flatten();
    let mut max_inactive = column::<i64>(t, 12)?.into_iter();
    let mut max_age = column::<i64>(t, 13)?.into_iter();
    let mut renewed = column::<TimestampWithTimeZone>(t, 14)?.into_iter();
    // leased_at, expires_at and limit_by_superuser are NOT NULL; max_retained may be NULL.
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        out.push(Lease {
            slot_name: name.unwrap_or_default(),
            owner: owners.next().flatten().unwrap_or_default(),
            leased_at: leased.next().map(us).unwrap_or(0),
            expires_at: expires.next().map(us).unwrap_or(0),
            max_retained: limits.next().flatten(),
            limit_by_superuser: by_superuser.next().unwrap_or(false),
            max_inactive: max_inactive.next().flatten(),
            max_age: max_age.next().flatten(),
            max_xmin_age: None,
            renewed_at: renewed.next().flatten().map(us),
        });
    }
    Ok(out)
}

/// The tracking rows and the leases as a full read returned them, kept by this backend
/// while nothing has changed them: reading them costs more than the rest of a pass at a
/// thousand leases (B2).
struct Tables {
    key: TablesKey,
    read: TablesRead,
}

/// One read of the tables (shared, not copied, by the snapshots made from it).
#[derive(Clone)]
struct TablesRead {
    seen: Rc<Vec<Seen>>,
    leases: Rc<Vec<Lease>>,
    warned: Rc<Vec<(String, String)>>,
}

/// What a kept read is valid for: the count of commits that changed the tables (shared
/// memory, `shmem::tables_changed`) and the tables themselves (a dropped and re-created
/// extension has new ones).
#[derive(Clone, Copy, PartialEq)]
struct TablesKey {
    changes: u64,
    lease_data: pg_sys::Oid,
    slot_seen: pg_sys::Oid,
}

thread_local! {
    static TABLES: std::cell::RefCell<Option<Tables>> = const { std::cell::RefCell::new(None) };
}

/// The key under which a full read may be kept, taken before the query runs; None when a
/// kept read cannot be trusted:
/// - the library is not preloaded (no count of changes in shared memory);
/// - on a standby, where the tables change by WAL replay and no trigger fires;
/// - in a repeatable read or serializable transaction, whose snapshot may be older than
///   the count (the read must be as of that snapshot);
/// - after this transaction changed the tables itself (its changes are not committed, so
///   only this transaction may see them).
///
/// Every committed change counts: statement triggers on both tables (`tables_changed`,
/// ENABLE ALWAYS, so replicas by session_replication_role and COPY count too) bump the
/// count once the changing transaction has committed (or aborted), when the change is
/// visible to any later snapshot. Read the count, then query: a commit that the query
/// does not see bumps the count after it was read, and the next read queries again.
fn tables_key() -> Option<TablesKey> {
    // SAFETY: plain reads of this backend's transaction state and two syscache lookups.
    unsafe {
        if pg_sys::RecoveryInProgress() || pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 {
            return None;
        }
    }
    if crate::rollback::tables_changed_here() {
        return None;
    }
    let changes = crate::shmem::tables_changes()?;
    // SAFETY: catalog lookups by name, in a transaction (a pass or a view's query).
    let (lease_data, slot_seen) = unsafe {
        let ns = pg_sys::get_namespace_oid(c"pgslotguard".as_ptr(), true);
        (pg_sys::get_relname_relid(c"lease_data".as_ptr(), ns), pg_sys::get_relname_relid(c"slot_seen".as_ptr(), ns))
    };
    Some(TablesKey { changes, lease_data, slot_seen })
}

/// Everything a decision needs, read now: the tracking rows and the leases (those whose
/// slot is gone too) through SPI, then the slots from shared memory. `only`: one slot's.
///
/// The leases are read first, and the order matters: a lease's slot is created before the
/// lease commits, so every lease the query sees has a slot the later read sees unless it
/// was really dropped. Read the other way round, a lease committing between the two reads
/// would look like a lease whose slot is missing. (A slot created after the tracking rows
/// were read is simply new to the tracking.)
fn read_snapshot(only: Option<&str>) -> Result<Snapshot> {
    let now = now_us();
    let current_lsn = current_lsn();
    let rows = |t: SpiTupleTable| {
        let t = t.first();
        Ok(TablesRead { seen: Rc::new(seen_rows(&t)?), leases: Rc::new(lease_rows(&t)?), warned: Rc::new(warned_rows(&t)?) })
    };
    let tables = match only {
        None => match tables_key() {
            Some(key) => match TABLES.with_borrow(|c| c.as_ref().filter(|c| c.key == key).map(|c| c.read.clone())) {
                Some(kept) => kept,
                None => {
                    let read = read(TABLES_QUERY, &[], rows)?;
                    TABLES.set(Some(Tables { key, read: read.clone() }));
                    read
                }
            },
            None => read(TABLES_QUERY, &[], rows)?,
        },
        Some(name) => read(TABLES_OF_QUERY, &[name.into()], rows)?,
    };
    let slots = match only {
        None => crate::slots::all(),
        Some(name) => crate::slots::one(name).into_iter().collect(),
    };
    let TablesRead { seen, leases, warned } = tables;
    Ok(Snapshot { now, current_lsn, slots, leases, seen, warned, restart_before: Default::default(), disk: None, held: Default::default(), next_xid: crate::slots::next_full_xid() })
}

/// Every slot, lease and tracking row.
pub fn snapshot() -> Result<Snapshot> {
    read_snapshot(None)
}

/// The same, for one slot name only (the second look before acting).
pub fn snapshot_of(name: &str) -> Result<Snapshot> {
    read_snapshot(Some(name))
}

/// Record first-seen and inactive-since times for the slots of `snap` (see
/// `policy::track`), and forget slots that are gone. Rows are written only when something
/// changed, so an idle pass writes no WAL; `write = false` (dry run) writes nothing.
/// Leaves the tracking as it now stands in `snap.seen`.
pub fn track(snap: &mut Snapshot, policy: &crate::policy::Policy, write: bool) -> Result<()> {
    let Some(now_seen) = crate::policy::track(policy, snap) else { return Ok(()) };
    let before: rustc_hash::FxHashMap<&str, &Seen> = snap.seen.iter().map(|s| (s.slot_name.as_str(), s)).collect();
    let unchanged = now_seen.len() == snap.seen.len() && now_seen.iter().all(|n| before.get(n.slot_name.as_str()) == Some(&n));
    if unchanged || !write {
        snap.seen = now_seen.into();
        return Ok(());
    }
    let names: Vec<String> = snap.slots.iter().map(|s| s.name.clone()).collect();
    update(
        "DELETE FROM pgslotguard.slot_seen WHERE slot_name::text <> ALL ($1::text[]) AND drop_action IS NULL",
        &[names.into()],
    )?;
    // The rows of the slots there are, as policy::track has them; only changed ones are written.
    let present: rustc_hash::FxHashSet<&str> = snap.slots.iter().map(|s| s.name.as_str()).collect();
    let rows: Vec<&Seen> = now_seen.iter().filter(|n| present.contains(n.slot_name.as_str())).collect();
    let names: Vec<String> = rows.iter().map(|n| n.slot_name.clone()).collect();
    let first: Vec<TimestampWithTimeZone> = rows.iter().map(|n| ts(n.first_seen)).collect();
    let inactive: Vec<Option<TimestampWithTimeZone>> = rows.iter().map(|n| n.inactive_since.map(ts)).collect();
    let stalled_lsn: Vec<Option<i64>> = rows.iter().map(|n| n.stalled.map(|(lsn, _)| lsn as i64)).collect();
    let stalled_since: Vec<Option<TimestampWithTimeZone>> = rows.iter().map(|n| n.stalled.map(|(_, t)| ts(t))).collect();
    update(
        "INSERT INTO pgslotguard.slot_seen AS t (slot_name, first_seen, inactive_since, stalled_lsn, stalled_since)
         SELECT n, f, i, '0/0'::pg_catalog.pg_lsn OPERATOR(pg_catalog.+) sl::numeric, ss
           FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::timestamptz[]), pg_catalog.unnest($3::timestamptz[]),
                           pg_catalog.unnest($4::int8[]), pg_catalog.unnest($5::timestamptz[])) AS u(n, f, i, sl, ss)
         ON CONFLICT (slot_name) DO UPDATE
            SET inactive_since = excluded.inactive_since, stalled_lsn = excluded.stalled_lsn, stalled_since = excluded.stalled_since
          WHERE (t.inactive_since, t.stalled_lsn, t.stalled_since)
                IS DISTINCT FROM (excluded.inactive_since, excluded.stalled_lsn, excluded.stalled_since)",
        &[names.into(), first.into(), inactive.into(), stalled_lsn.into(), stalled_since.into()],
    )?;
    snap.seen = now_seen.into();
    Ok(())
}

/// A lease row with what the API needs to check rights and state.
pub struct LeaseRow {
    pub owner: String,
    pub expires_at: TimestampWithTimeZone,
}

/// The lease of `name`, locked against concurrent change until the end of the transaction.
pub fn lease_for_update(name: &str) -> Result<Option<LeaseRow>> {
    write(
        "SELECT owner::text, expires_at FROM pgslotguard.lease_data WHERE slot_name = $1::name FOR UPDATE",
        &[name.into()],
        |mut t| {
            if t.is_empty() {
                return Ok(None);
            }
            t = t.first();
            Ok(Some(LeaseRow {
                owner: t.get::<String>(1)?.unwrap_or_default(),
                expires_at: t.get::<TimestampWithTimeZone>(2)?.unwrap_or_else(TimestampWithTimeZone::negative_infinity),
            }))
        },
    )
}

/// Create a physical slot that reserves WAL now; returns its restart LSN as text.
pub fn create_slot(name: &str) -> Result<String> {
    write(
        "SELECT lsn::text FROM pg_catalog.pg_create_physical_replication_slot($1::name, true, false)",
        &[name.into()],
        |t| Ok(t.first().get::<String>(1)?.unwrap_or_default()),
    )
}

pub fn drop_slot(name: &str) -> Result<()> {
    write("SELECT pg_catalog.pg_drop_replication_slot($1::name)", &[name.into()], |_| Ok(()))
}

/// How long the guard waits for a walsender it terminated to exit; a longer wait would hold
/// up the whole pass (if it has not exited, the next pass drops the slot).
const TERMINATE_WAIT_MS: i64 = 1000;

/// Terminate a walsender and wait up to [`TERMINATE_WAIT_MS`] for it to go.
pub fn terminate(pid: i32) -> Result<bool> {
    write("SELECT pg_catalog.pg_terminate_backend($1, $2)", &[pid.into(), TERMINATE_WAIT_MS.into()], |t| {
        Ok(t.first().get::<bool>(1)?.unwrap_or(false))
    })
}

pub struct NewLease<'a> {
    pub slot_name: &'a str,
    pub holder: Option<&'a str>,
    pub owner: &'a str,
    pub leased_at: TimestampWithTimeZone,
    pub expires_at: TimestampWithTimeZone,
    pub max_retained: Option<i64>,
    /// Microseconds.
    pub max_inactive: Option<i64>,
    pub max_age: Option<i64>,
    pub limit_by_superuser: bool,
    pub adopted: bool,
    pub lsn: Option<&'a str>,
}

/// Insert a lease; returns its expiry.
pub fn insert_lease(l: &NewLease) -> Result<TimestampWithTimeZone> {
    write(
        "INSERT INTO pgslotguard.lease_data
                (slot_name, holder, owner, leased_at, expires_at, max_retained, adopted, reserved_lsn,
                 limit_by_superuser, max_inactive, max_age)
         VALUES ($1::name, $2, $3::name, $4, $8, $5, $6, $7::pg_catalog.pg_lsn, $9,
                 pg_catalog.make_interval(secs => $10 / 1e6), pg_catalog.make_interval(secs => $11 / 1e6))
         RETURNING expires_at",
        &[
            l.slot_name.into(),
            l.holder.into(),
            l.owner.into(),
            l.leased_at.into(),
            l.max_retained.into(),
            l.adopted.into(),
            l.lsn.into(),
            l.expires_at.into(),
            l.limit_by_superuser.into(),
            l.max_inactive.into(),
            l.max_age.into(),
        ],
        |t| Ok(t.first().get::<TimestampWithTimeZone>(1)?),
    )
    .map(|v| v.unwrap_or_else(TimestampWithTimeZone::negative_infinity))
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

pub fn renew_lease(name: &str, now: TimestampWithTimeZone, expires_at: TimestampWithTimeZone) -> Result<TimestampWithTimeZone> {
    write(
        "UPDATE pgslotguard.lease_data SET expires_at = $2, renewed_at = $3
          WHERE slot_name = $1::name RETURNING expires_at",
        &[name.into(), expires_at.into(), now.into()],
        |t| Ok(t.first().get::<TimestampWithTimeZone>(1)?),
    )
    .map(|v| v.unwrap_or_else(TimestampWithTimeZone::negative_infinity))
}

/// Make the guard's intent to drop a slot durable before it drops it (the drop itself is
/// not transactional). Also creates the tracking row if the slot is new this pass.
pub fn mark_dropping(name: &str, action: Outcome, reason: &str) -> Result<()> {
    update(
        "INSERT INTO pgslotguard.slot_seen AS t (slot_name, first_seen, drop_action, drop_reason)
         VALUES ($1::name, pg_catalog.clock_timestamp(), $2, $3)
         ON CONFLICT (slot_name) DO UPDATE SET drop_action = excluded.drop_action, drop_reason = excluded.drop_reason",
        &[name.into(), action.as_str().into(), reason.into()],
    )
    .map(|_| ())
}

/// Forget the tracking row of a slot that is gone (after its drop is recorded).
pub fn forget_slot(name: &str) -> Result<()> {
    update("DELETE FROM pgslotguard.slot_seen WHERE slot_name = $1::name", &[name.into()]).map(|_| ())
}

/// Clear drop intents on slots that still exist (a drop that failed or was cut short
/// before it happened): the slot is decided afresh.
pub fn clear_drop_marks(names: &[String]) -> Result<()> {
    update(
        "UPDATE pgslotguard.slot_seen SET drop_action = NULL, drop_reason = NULL WHERE slot_name::text = ANY ($1::text[])",
        &[names.to_vec().into()],
    )
    .map(|_| ())
}

/// Is the guard dropping this slot (an intent committed, the drop not yet recorded)?
pub fn drop_pending(name: &str) -> Result<bool> {
    read(
        "SELECT EXISTS (SELECT 1 FROM pgslotguard.slot_seen WHERE slot_name = $1::name AND drop_action IS NOT NULL)",
        &[name.into()],
        |t| Ok(t.first().get::<bool>(1)?.unwrap_or(false)),
    )
}

pub fn delete_lease(name: &str) -> Result<usize> {
    update("DELETE FROM pgslotguard.lease_data WHERE slot_name = $1::name", &[name.into()])
}

pub struct Event<'a> {
    pub slot_name: Option<&'a str>,
    pub action: Outcome,
    pub reason: &'a str,
    pub retained_bytes: Option<i64>,
    pub actor: &'a str,
    pub lease_owner: Option<&'a str>,
    /// Drops: the WAL the drop lets the next checkpoint remove (projected).
    /// Checkpoints: the bytes pg_wal shrank by (measured).
    pub freed_bytes: Option<i64>,
    /// Checkpoints: the size of pg_wal measured after it.
    pub pg_wal_bytes: Option<i64>,
}

impl<'a> Event<'a> {
    /// An event about no slot in particular; set the other fields with struct update.
    pub fn new(action: Outcome, reason: &'a str, actor: &'a str) -> Self {
        Event {
            slot_name: None,
            action,
            reason,
            retained_bytes: None,
            actor,
            lease_owner: None,
            freed_bytes: None,
            pg_wal_bytes: None,
        }
    }
}

/// Remember a warning given (the floor's with slot name ''), until it re-arms.
pub fn remember_warning(slot: &str, limit: &str) -> Result<()> {
    update(
        "INSERT INTO pgslotguard.warned (slot_name, limit_name) VALUES ($1::name, $2) ON CONFLICT DO NOTHING",
        &[slot.into(), limit.into()],
    )
    .map(|_| ())
}

/// Forget warnings whose value fell back under the threshold (or whose slot is gone).
pub fn forget_warnings(slots: Vec<String>, limits: Vec<String>) -> Result<()> {
    update(
        "DELETE FROM pgslotguard.warned w USING ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::text[])) AS f(s, l)
          WHERE w.slot_name::text OPERATOR(pg_catalog.=) f.s AND w.limit_name OPERATOR(pg_catalog.=) f.l",
        &[slots.into(), limits.into()],
    )
    .map(|_| ())
}

/// The channel every event is also sent on, at commit (`pg_notify`).
pub const CHANNEL: &str = "pgslotguard";

/// Record an event, with the holder of the slot's lease (if it has one now), and send it
/// to listeners on [`CHANNEL`] as JSON. NOTIFY is transactional: listeners get it when the
/// transaction that recorded the event commits, in commit order, and never if it rolls back.
pub fn record(e: &Event) -> Result<()> {
    let (id, at, holder) = write(
        "INSERT INTO pgslotguard.event_log
                (slot_name, action, reason, retained_bytes, actor, lease_owner, freed_bytes, pg_wal_bytes, lease_holder)
         VALUES ($1::name, $2, $3, $4, $5, $6::name, $7, $8,
                 (SELECT holder FROM pgslotguard.lease_data WHERE slot_name OPERATOR(pg_catalog.=) $1::name))
         RETURNING id, pg_catalog.to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), lease_holder",
        &[
            e.slot_name.into(),
            e.action.as_str().into(),
            e.reason.into(),
            e.retained_bytes.into(),
            e.actor.into(),
            e.lease_owner.into(),
            e.freed_bytes.into(),
            e.pg_wal_bytes.into(),
        ],
        |t| {
            let t = t.first();
            Ok((t.get::<i64>(1)?.unwrap_or(0), t.get::<String>(2)?.unwrap_or_default(), t.get::<String>(3)?))
        },
    )?;
    let payload = crate::notify::payload(e, id, &at, holder.as_deref());
    write("SELECT pg_catalog.pg_notify($1, $2)", &[CHANNEL.into(), payload.into()], |_| Ok(()))
}

/// Delete events older than the retention; returns how many went. Looks first, so a
/// pass with nothing to purge stays read-only.
pub fn purge_events(older_than_us: i64) -> Result<usize> {
    let cutoff = ts(now_us() - older_than_us);
    let any = read("SELECT EXISTS (SELECT 1 FROM pgslotguard.event_log WHERE at < $1)", &[cutoff.into()], |t| {
        Ok(t.first().get::<bool>(1)?.unwrap_or(false))
    })?;
    if !any {
        return Ok(0);
    }
    update("DELETE FROM pgslotguard.event_log WHERE at < $1", &[cutoff.into()])
}

/// Pin the session's search_path (the worker's SPI queries must not resolve anything
/// through a schema a user can write to).
pub fn pin_search_path() -> Result<()> {
    read("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', false)", &[], |_| Ok(()))
}

/// Is the extension installed in this database (its tables readable)?
pub fn extension_installed() -> Result<bool> {
    read(
        "SELECT pg_catalog.to_regclass('pgslotguard.lease_data') IS NOT NULL
            AND EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pgslotguard')",
        &[],
        |t| Ok(t.first().get::<bool>(1)?.unwrap_or(false)),
    )
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
    let owner = read("SELECT extowner FROM pg_catalog.pg_extension WHERE oid = $1", &[ext.into()], |t| {
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
    Ok(WalDisk {
        free: st.f_bavail as i64 * unit,
        total: st.f_blocks as i64 * unit,
        pg_wal: segments * seg,
        insert_lsn: current_lsn(),
        segment_size: seg,
        wal_keep: keep_mb * MB,
        max_wal: max_mb * MB,
        max_slot_keep: (slot_keep_mb >= 0).then_some(slot_keep_mb * MB),
    })
}

unsafe extern "C-unwind" {
    /// postmaster/bgwriter.h, which pgrx's bindings do not include.
    fn RequestCheckpoint(flags: std::ffi::c_int);
}

/// Ask the checkpointer for a checkpoint and return at once (no CHECKPOINT_WAIT: the
/// pass does not wait for it). FORCE makes it run even on a primary that wrote nothing
/// since the last one; fast adds IMMEDIATE (no spreading of the writes).
pub fn request_checkpoint(mode: CheckpointMode) {
    let flags = match mode {
        CheckpointMode::Off => return,
        CheckpointMode::Spread => pg_sys::CHECKPOINT_FORCE,
        CheckpointMode::Fast => pg_sys::CHECKPOINT_FORCE | pg_sys::CHECKPOINT_IMMEDIATE,
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
