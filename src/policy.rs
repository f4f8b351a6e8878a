//! PURE decision logic: given the policy, the slots, the leases, what the guard has seen
//! of each slot and the clock, what must happen to each slot?
//!
//! No pgrx types, no SPI, no clock: every input is a plain value, so every limit, scope
//! and edge case is a unit test. Times are microseconds (PostgreSQL `TimestampTz` scale),
//! sizes are bytes, LSNs are plain `u64`.
//!
//! Rules (DESIGN.md "Policy" and "Lease rules"), as decided here:
//! * A limit is breached when the value is strictly above it (`> limit`); a lease is
//!   expired from the instant `now >= expires_at`.
//! * Excluded names (`pgslotguard.exclude`) and temporary slots are never in scope.
//!   A leased slot is always in scope unless excluded; unleased slots follow `scope`.
//! * Hard limits (retained WAL, transaction horizon, age) may terminate an active slot's walsender when
//!   `terminate_active` is on; lease expiry and inactivity never do.
//! * An active slot is never dropped for lease expiry alone: it waits (`expired_active`).
//! * A lease whose slot no longer exists is ended.
//! * A slot named in `synchronized_standby_slots` (17+) is never dropped: the pass warns.

pub mod disk;
pub mod horizon;
pub mod logical;
pub mod timing;

use disk::{Floor, WalDisk};
use regex::Regex;
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

/// A slot or role name as a pass holds it: inline up to 24 bytes (most names), so a pass
/// at a thousand slots makes no allocation per name it reads or copies.
pub type Name = compact_str::CompactString;
use std::rc::Rc;

/// Which slots the limits cover (`pgslotguard.scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Leased,
    Physical,
    All,
}

/// What the guard asks of the checkpointer after it dropped slots
/// (`pgslotguard.checkpoint_after_drop`). A drop for the free-space floor always asks
/// for a fast one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointMode {
    Off,
    Spread,
    Fast,
}

impl CheckpointMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointMode::Off => "off",
            CheckpointMode::Spread => "spread",
            CheckpointMode::Fast => "fast",
        }
    }
}

/// One snapshot of the policy GUCs, read once per pass.
#[derive(Debug, Clone)]
pub struct Policy {
    pub max_retained_wal: Option<i64>,
    pub max_slot_age_us: Option<i64>,
    pub max_inactive_us: Option<i64>,
    pub scope: Scope,
    pub exclude: Option<Regex>,
    pub terminate_active: bool,
    pub dry_run: bool,
    /// `pgslotguard.min_free_wal_space`.
    pub min_free_wal: Option<Floor>,
    pub checkpoint: CheckpointMode,
    /// `pgslotguard.warn_fraction` (0 or 1: no warnings).
    pub warn_fraction: f64,
    /// `pgslotguard.max_stalled_time`.
    pub max_stalled_us: Option<i64>,
    /// `pgslotguard.max_xmin_age`, in transactions.
    pub max_xmin_age: Option<i64>,
    /// Core's `synchronized_standby_slots` (17+), as slot names: never dropped.
    pub synchronized_standby_slots: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_retained_wal: None,
            max_slot_age_us: None,
            max_inactive_us: None,
            scope: Scope::Leased,
            exclude: None,
            terminate_active: false,
            dry_run: false,
            min_free_wal: None,
            checkpoint: CheckpointMode::Fast,
            // Off here, so that each rule is tested alone; the GUC's default is 0.8.
            warn_fraction: 0.0,
            max_stalled_us: None,
            max_xmin_age: None,
            synchronized_standby_slots: Vec::new(),
        }
    }
}

/// Every word the guard and the API write to `pgslotguard.events.action` (and nowhere
/// else are they spelled: the CHECK constraint in sql/tables.sql lists the same words,
/// and a test holds the two together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Lease,
    Renew,
    Release,
    Keep,
    ExpireDrop,
    RetainedDrop,
    AgeDrop,
    InactiveDrop,
    SpaceDrop,
    LostDrop,
    StalledDrop,
    XminDrop,
    /// The guard dropped the slot of a lease call that did not commit (rolled back with
    /// its slot in use, or cut short by a crash): a lease that never existed.
    RollbackDrop,
    Terminate,
    WouldDrop,
    Checkpoint,
    Warn,
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 18] = [
        Outcome::Lease,
        Outcome::Renew,
        Outcome::Release,
        Outcome::Keep,
        Outcome::ExpireDrop,
        Outcome::RetainedDrop,
        Outcome::AgeDrop,
        Outcome::InactiveDrop,
        Outcome::SpaceDrop,
        Outcome::LostDrop,
        Outcome::StalledDrop,
        Outcome::XminDrop,
        Outcome::RollbackDrop,
        Outcome::Terminate,
        Outcome::WouldDrop,
        Outcome::Checkpoint,
        Outcome::Warn,
        Outcome::Error,
    ];

    /// The outcome a word names (as stored in a drop intent).
    pub fn parse(word: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == word)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Lease => "lease",
            Outcome::Renew => "renew",
            Outcome::Release => "release",
            Outcome::Keep => "keep",
            Outcome::ExpireDrop => "expire_drop",
            Outcome::RetainedDrop => "retained_drop",
            Outcome::AgeDrop => "age_drop",
            Outcome::InactiveDrop => "inactive_drop",
            Outcome::SpaceDrop => "space_drop",
            Outcome::LostDrop => "lost_drop",
            Outcome::StalledDrop => "stalled_drop",
            Outcome::XminDrop => "xmin_drop",
            Outcome::RollbackDrop => "rollback_drop",
            Outcome::Terminate => "terminate",
            Outcome::WouldDrop => "would_drop",
            Outcome::Checkpoint => "checkpoint",
            Outcome::Warn => "warn",
            Outcome::Error => "error",
        }
    }

    /// A slot was dropped by the guard.
    pub fn is_guard_drop(self) -> bool {
        matches!(
            self,
            Outcome::ExpireDrop
                | Outcome::RetainedDrop
                | Outcome::AgeDrop
                | Outcome::InactiveDrop
                | Outcome::SpaceDrop
                | Outcome::LostDrop
                | Outcome::StalledDrop
                | Outcome::XminDrop
                | Outcome::RollbackDrop
        )
    }
}

/// A row of `pg_replication_slots`, as the guard needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotInfo {
    pub name: Name,
    pub physical: bool,
    pub temporary: bool,
    pub active_pid: Option<i32>,
    pub restart_lsn: Option<u64>,
    /// Why core invalidated the slot (`pg_replication_slots.invalidation_reason` on 17+:
    /// `wal_removed`, `rows_removed`, `wal_level_insufficient`, `idle_timeout` on 18);
    /// `None` for a usable slot.
    pub invalidation: Option<&'static str>,
    /// Core's `inactive_since` (17+): when the slot last lost its walsender, or when the
    /// server started. `None` on 15 and while the slot is active.
    pub core_inactive_since: Option<i64>,
    /// A standby's copy of a primary's slot, kept in step by slot synchronisation
    /// (`sync_replication_slots`, 17+): the primary's, never the guard's to touch.
    pub synced: bool,
    /// One of core's own slots (PostgreSQL 19): never in scope, never leased or adopted.
    pub system: Option<SystemSlot>,
    /// The walsender that holds the slot, when a walsender does (`pg_stat_replication`).
    pub sender: Option<Sender>,
    /// The transaction horizon the slot holds back: `xmin` (a standby's, through
    /// hot_standby_feedback) and `catalog_xmin` (a logical slot's); `None` when unset.
    pub xmin: Option<u32>,
    pub catalog_xmin: Option<u32>,
    /// A logical slot's own facts (`None` for a physical slot).
    pub logical: Option<LogicalInfo>,
}

/// Core's own slots on PostgreSQL 19, which the guard never drops, terminates or warns
/// about, whatever the scope and limits (doc/install.md, "PostgreSQL 19").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemSlot {
    /// A slot of REPACK (CONCURRENTLY), from its own pool (`max_repack_replication_slots`):
    /// temporary, held for the length of one REPACK.
    Repack,
    /// `pg_conflict_detection`, which a subscriber with `retain_dead_tuples` keeps to hold
    /// back xmin on purpose (the dead rows conflict detection needs).
    ConflictDetection,
}

impl SystemSlot {
    /// What it is, as an ERROR says it ("... is PostgreSQL's own: the {}").
    pub fn description(self) -> &'static str {
        match self {
            SystemSlot::Repack => "slot of a running REPACK (CONCURRENTLY)",
            SystemSlot::ConflictDetection => "conflict detection slot that retain_dead_tuples keeps",
        }
    }

    /// Why it is out of scope, as slot_decisions says it.
    pub fn reason(self) -> &'static str {
        match self {
            SystemSlot::Repack => "REPACK (CONCURRENTLY)'s own slot (core's)",
            SystemSlot::ConflictDetection => "conflict detection slot of retain_dead_tuples (core's)",
        }
    }
}

/// What a logical slot has beyond a physical one (`pg_replication_slots`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LogicalInfo {
    /// The output plugin (`pgoutput`, `test_decoding`, ...).
    pub plugin: Name,
    /// The database it decodes (its OID).
    pub database: u32,
    /// `confirmed_flush_lsn`: what its consumer has confirmed; the first change after it is
    /// what the consumer loses if the slot is dropped.
    pub confirmed_flush: Option<u64>,
    /// Synchronized to standbys (17+, `failover`).
    pub failover: bool,
}

impl SlotInfo {
    pub fn active(&self) -> bool {
        self.active_pid.is_some()
    }
}

/// What the walsender holding a slot reports, as `pg_stat_replication` shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sender {
    /// `sent_lsn`: how far the walsender has sent WAL to its client.
    pub sent: u64,
    /// `write_lsn`, `flush_lsn`: how far its client says it has written and flushed WAL
    /// (0 until it says). `restart_lsn` follows `flush`, which `pg_receivewal` and
    /// `pg_basebackup` (without `--synchronous`) report only when a segment is complete.
    pub write: u64,
    pub flush: u64,
    /// The end of the WAL the walsender may send, read just before its positions: flushed
    /// WAL on a primary, received or replayed WAL on a standby (a cascading walsender).
    pub send_limit: u64,
}

impl Sender {
    /// How far the stream has got: the furthest of sent, written and flushed. The client
    /// reads what the walsender sends (a client that stops reading stops `sent` once the
    /// socket buffers are full, a few MB on), and a stream that reports its flush only per
    /// segment still moves `sent` and `write` with every transaction.
    pub fn progress(&self) -> u64 {
        self.sent.max(self.write).max(self.flush)
    }
}

/// A lease row.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub slot_name: Name,
    /// The role that holds the lease, by name (names survive pg_dump and restore; OIDs
    /// do not), carried into decisions so the events and views can say whose lease it was.
    pub owner: Name,
    /// The owner role's OID (0: not known, a lease from before 0.3.0 not yet looked up).
    pub owner_oid: u32,
    pub leased_at: i64,
    /// Where the slot's age counts from: `leased_at` for a slot the lease made; for an
    /// adopted slot, when the guard first saw it (a lease taken again on the same slot
    /// does not make it younger).
    pub born_at: i64,
    /// When the lease was last renewed; its current term runs from then (or from
    /// `leased_at`) to `expires_at`.
    pub renewed_at: Option<i64>,
    pub expires_at: i64,
    pub max_retained: Option<i64>,
    /// The lease's own inactivity and age limits, in microseconds.
    pub max_inactive: Option<i64>,
    pub max_age: Option<i64>,
    /// The lease's own transaction-horizon limit, in transactions.
    pub max_xmin_age: Option<i64>,
    /// A superuser set the lease's own limits: they may exceed the global ones. Otherwise
    /// a lease's own limit only ever tightens the global one (`max_retained_wal`,
    /// `max_inactive_time`, `max_slot_age`, `max_xmin_age`), whatever the DBA sets it to later.
    pub limit_by_superuser: bool,
    /// The lease adopted a slot someone else made (`adopt => true`): its consumer is not a
    /// backup the lease started.
    pub adopted: bool,
    /// The lease is on a logical slot (made with `plugin => ...`, or adopted as one).
    pub logical: bool,
    /// `while_active => true`: the lease lasts while a consumer streams from its slot, and
    /// expires its ttl after the consumer went (policy::logical::expiry).
    pub while_active: bool,
}

/// A slot the guard dropped within [`LOOP_WINDOW_US`]: kept per node (in the store) after
/// the slot is gone, so that a slot made again under the name and over the same limit is
/// seen as a drop/recreate loop.
#[derive(Debug, Clone, PartialEq)]
pub struct RecentDrop {
    pub slot_name: String,
    /// When the guard last dropped a slot of this name.
    pub at: i64,
    /// The drop event of that drop (`retained_drop`, ...).
    pub action: String,
    /// Guard drops of this name within the window, the last included.
    pub drops: u32,
    /// When the guard last warned of a loop on this name.
    pub loop_warned_at: Option<i64>,
}

/// How long the guard remembers a drop, and how often at most it warns of one loop.
pub const LOOP_WINDOW_US: i64 = 3600 * 1_000_000;

/// A drop that repeats one the guard made within [`LOOP_WINDOW_US`] (same name, same limit).
#[derive(Debug, Clone, PartialEq)]
pub struct DropLoop {
    /// Guard drops of this name within the window before this one.
    pub drops: u32,
    /// When the previous one was.
    pub last_at: i64,
    /// No loop warning on this name within the window: this drop warns (once an hour).
    pub warn: bool,
}

/// What the guard has recorded of a slot over time (PostgreSQL 15 has no `inactive_since`).
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub slot_name: Name,
    pub first_seen: i64,
    pub inactive_since: Option<i64>,
    /// The guard committed its intent to drop this slot (the event it will record and
    /// why) and may have died before it recorded the drop: see `enforce::drop_slot`.
    pub dropping: Option<DropIntent>,
    /// An active slot whose stream stopped while WAL waited for it: its progress position
    /// (see [`behind`]), and since when (`pgslotguard.max_stalled_time`).
    pub stalled: Option<(u64, i64)>,
}

/// A drop the guard has decided and made durable before doing it.
#[derive(Debug, Clone, PartialEq)]
pub struct DropIntent {
    pub action: String,
    pub reason: String,
    /// When the guard decided it.
    pub at: i64,
    /// Made by `backup_slot_enforce()` in the caller's transaction: the transaction ID
    /// that wrote its event (`store::IntentRec::xid`).
    pub xid: Option<u32>,
}

/// Everything a decision needs, taken at one instant.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub now: i64,
    /// The monotonic clock, read together with `now` (`timing::ClockWatch` compares the
    /// two clocks, so they must be read at the same instant; 0 where no one compares).
    pub mono: i64,
    /// Current WAL position (on a standby: last replayed).
    pub current_lsn: u64,
    pub slots: Vec<SlotInfo>,
    /// Shared with the read a backend keeps of its tables (state.rs), so an unchanged
    /// read costs no copy.
    pub leases: Rc<Vec<Lease>>,
    pub seen: Rc<Vec<Seen>>,
    /// Warnings given and not re-armed: (slot name, or '' for the floor; limit word).
    pub warned: Rc<Vec<(String, String)>>,
    /// Each slot's `restart_lsn` at the worker's previous pass (empty for a pass run by
    /// hand): a stall is noted when two passes see the same one.
    pub restart_before: HashMap<String, u64>,
    /// The filesystem that holds `pg_wal`, when measured.
    pub disk: Option<WalDisk>,
    /// Slots whose time-driven limits (expiry, age, inactivity) have come on the wall clock
    /// but not on the monotonic one: the clock was set forward (`timing::ClockWatch`).
    pub held: HashSet<String>,
    /// The next full transaction ID (`ReadNextFullTransactionId`), read after the slots:
    /// what slot horizons are aged from. 0: not read (no ages).
    pub next_xid: u64,
    /// Slots the guard dropped within [`LOOP_WINDOW_US`].
    pub recent_drops: Rc<Vec<RecentDrop>>,
}

/// Why a slot is (not) dropped; also the event action name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Breach {
    Expired,
    Retained,
    Age,
    Inactive,
    /// Free space on the filesystem of `pg_wal` is below `pgslotguard.min_free_wal_space`.
    Space,
    /// Core invalidated the slot (`wal_status = 'lost'`): it can never be used again.
    Lost,
    /// An active slot's stream has not moved for `max_stalled_time` while WAL waited for
    /// it (see [`behind`]): its consumer is stuck.
    Stalled,
    /// The slot holds the transaction horizon (`xmin` or `catalog_xmin`) back more
    /// transactions than `pgslotguard.max_xmin_age`.
    Xmin,
}

impl Breach {
    /// Hard limits may terminate an active walsender (with `terminate_active`).
    pub fn is_hard(self) -> bool {
        matches!(self, Breach::Retained | Breach::Xmin | Breach::Age | Breach::Space | Breach::Lost | Breach::Stalled)
    }
    /// The event recorded for a drop for this reason.
    pub fn drop_action(self) -> Outcome {
        match self {
            Breach::Expired => Outcome::ExpireDrop,
            Breach::Retained => Outcome::RetainedDrop,
            Breach::Age => Outcome::AgeDrop,
            Breach::Inactive => Outcome::InactiveDrop,
            Breach::Space => Outcome::SpaceDrop,
            Breach::Lost => Outcome::LostDrop,
            Breach::Stalled => Outcome::StalledDrop,
            Breach::Xmin => Outcome::XminDrop,
        }
    }
    /// The `state` of a slot within the warn fraction of this limit.
    pub fn near_state(self) -> &'static str {
        match self {
            Breach::Expired => "expiring",
            Breach::Retained => "near_retained",
            Breach::Age => "near_age",
            Breach::Inactive => "near_inactive",
            Breach::Space => "near_floor",
            Breach::Lost => "lost",
            Breach::Stalled => "near_stalled",
            Breach::Xmin => "near_xmin",
        }
    }
    /// The limit's name in `pgslotguard.warned` and in warnings.
    pub fn limit_word(self) -> &'static str {
        match self {
            Breach::Expired => "expiry",
            Breach::Retained => "retained",
            Breach::Age => "age",
            Breach::Inactive => "inactivity",
            Breach::Space => "floor",
            Breach::Lost => "lost",
            Breach::Stalled => "stalled",
            Breach::Xmin => "xmin",
        }
    }
    /// The `state` shown in `pgslotguard.leases` for an inactive slot with this breach.
    pub fn state(self) -> &'static str {
        match self {
            Breach::Expired => "expired",
            Breach::Retained => "over_retained",
            Breach::Age => "over_age",
            Breach::Inactive => "over_inactive",
            Breach::Space => "below_floor",
            Breach::Lost => "lost",
            Breach::Stalled => "stalled",
            Breach::Xmin => "over_xmin",
        }
    }
}

/// What the pass does about one slot (or one lease without a slot).
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Nothing to do.
    None,
    /// Drop the slot (terminating its walsender first when `terminate` is set).
    Drop { breach: Breach, terminate: Option<i32>, reason: String },
    /// A limit is breached but the slot is active and may not be touched now.
    Wait { breach: Breach, reason: String },
    /// The lease's slot is gone: end the lease.
    EndLease { reason: String },
}

/// The guard's verdict on one slot, with everything the `slots` view shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub slot_name: Name,
    /// False for a lease whose slot no longer exists.
    pub slot_exists: bool,
    pub leased: bool,
    /// Owner of the lease, if leased.
    pub lease_owner: Option<Name>,
    /// The owner role's OID (0: unknown), for the views' filter: a role sees its own.
    pub lease_owner_oid: u32,
    pub in_scope: bool,
    /// Why the slot is in scope or not, in words.
    pub scope_reason: &'static str,
    pub retained_bytes: Option<i64>,
    pub age_us: Option<i64>,
    pub inactive_us: Option<i64>,
    /// Every limit that applies to the slot, as numbers (retained WAL, transaction horizon,
    /// age, stall, lease expiry, inactivity): what the warn threshold looks at.
    pub limits: Limits,
    /// `ok`, `expired`, `expired_active`, `over_retained`, `over_xmin`, `over_age`, `over_inactive`,
    /// `below_floor`, `slot_missing`, or `out_of_scope`.
    pub state: &'static str,
    pub action: Action,
    /// Bytes of `pg_wal` a checkpoint would free if this slot were dropped together with
    /// every older slot in scope (when the disk was measured).
    pub frees_bytes: Option<i64>,
    /// For a slot this pass drops: the bytes its drop adds to what the checkpoint frees,
    /// the drops of this pass taken oldest first.
    pub releases_bytes: Option<i64>,
    /// The retained-WAL limit in force for this slot (see [`retained_limit`]).
    pub retained_limit: Option<i64>,
    /// Why core invalidated the slot, if it did ([`SlotInfo::invalidation`]).
    pub invalidation: Option<&'static str>,
    /// How many transactions the slot's `xmin` and `catalog_xmin` are old, counted from the
    /// next transaction ID as `age()` counts ([`horizon::xid_age`]).
    pub xmin_age: Option<i64>,
    pub catalog_xmin_age: Option<i64>,
    /// The slot's `restart_lsn`: at a drop, the first WAL its consumer will never get.
    pub restart_lsn: Option<u64>,
    /// A logical slot: its `confirmed_flush_lsn`, what its consumer has confirmed (the
    /// first change after it is what the consumer loses at a drop). `None` for a physical one.
    pub logical_flush: Option<Option<u64>>,
    /// Its consumer is not a backup a lease started (the slot is adopted or unleased): a
    /// drop breaks it for good, and it must start again from a new base backup.
    pub foreign_consumer: bool,
    /// This drop repeats a recent guard drop of the same name for the same limit.
    pub drop_loop: Option<DropLoop>,
    /// When the first of the slot's time-driven limits falls due (`timing::slot_deadline`),
    /// for a slot in scope; what [`next_due`] wakes the worker for.
    pub time_due: Option<i64>,
}

/// Every limit that applies to a slot ([`Decision::limits`]), in priority order. Kept on
/// the heap, so that a decision stays small: a pass walks its thousand decisions several
/// times. None at all for a slot no limit applies to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Limits(Option<Box<[Option<Limit>; 6]>>);

impl Limits {
    pub fn none() -> Self {
        Limits(None)
    }
    pub fn of(limits: [Option<Limit>; 6]) -> Self {
        Limits(limits.iter().any(Option::is_some).then(|| Box::new(limits)))
    }
    pub fn iter(&self) -> impl Iterator<Item = &Limit> {
        self.0.iter().flat_map(|l| l.iter().flatten())
    }
}

/// The limit closest to being hit: the one furthest along.
fn nearest<'a>(limits: impl Iterator<Item = &'a Limit>) -> Option<Limit> {
    limits.copied().max_by(|a, b| a.frac.partial_cmp(&b.frac).unwrap_or(std::cmp::Ordering::Equal))
}

impl Decision {
    /// The limit closest to being hit.
    pub fn nearest(&self) -> Option<Limit> {
        nearest(self.limits.iter())
    }

    /// The limit closest to being hit, in words ("lease expires in 59m 10s").
    pub fn nearest_limit(&self) -> Option<String> {
        self.nearest().map(|l| l.words())
    }

    /// The limit of this kind that applies to the slot, if one does.
    pub fn limit(&self, breach: Breach) -> Option<&Limit> {
        self.limits.iter().find(|l| l.breach == breach)
    }

    /// What a drop of this slot costs its consumer, in words for the drop's event, log
    /// line and notification.
    pub fn drop_cost(&self) -> String {
        if let Some(flush) = self.logical_flush {
            return logical::drop_cost(flush);
        }
        let mut w = match self.restart_lsn {
            Some(lsn) => format!("restart_lsn at the drop {}: the first WAL its consumer will never get", crate::validate::format_lsn(lsn)),
            None => "it had reserved no WAL".to_string(),
        };
        if self.foreign_consumer {
            w.push_str("; its consumer must start from a new base backup");
        }
        w
    }

    /// The LSN the slot's consumer loses at a drop: `confirmed_flush_lsn` for a logical
    /// slot, `restart_lsn` for a physical one.
    pub fn lost_lsn(&self) -> Option<u64> {
        match self.logical_flush {
            Some(flush) => flush,
            None => self.restart_lsn,
        }
    }

    /// The warning of a drop/recreate loop, when this drop is one and the loop has not been
    /// warned of within the hour.
    pub fn loop_warning(&self, now: i64) -> Option<String> {
        let l = self.drop_loop.as_ref().filter(|l| l.warn)?;
        let Action::Drop { breach, .. } = &self.action else { return None };
        Some(format!(
            "drop/recreate loop: replication slot \"{}\" was dropped by the guard {} ago ({} in the last hour, {}) and was made again under the same name, which breaks the same limit; the guard drops it again each time (the disk comes first) and warns of this loop at most once an hour: stop whatever recreates it, or fix its consumer (doc/barman.md, doc/patroni.md)",
            self.slot_name,
            fmt_us(now - l.last_at),
            l.drops,
            breach.drop_action().as_str(),
        ))
    }
}

/// The loop a drop decision is part of: the guard dropped a slot of this name for the same
/// limit within [`LOOP_WINDOW_US`] before `now`.
pub fn drop_loop(recent: &[RecentDrop], name: &str, breach: Breach, now: i64) -> Option<DropLoop> {
    let r = recent.iter().find(|r| r.slot_name == name)?;
    if r.action != breach.drop_action().as_str() || now - r.at >= LOOP_WINDOW_US {
        return None;
    }
    let warn = r.loop_warned_at.is_none_or(|w| now - w >= LOOP_WINDOW_US);
    Some(DropLoop { drops: r.drops, last_at: r.at, warn })
}

/// One limit as it applies to one slot: how far along it is (`frac`, 1.0 = at the limit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub breach: Breach,
    pub over: bool,
    pub frac: f64,
    /// Retained bytes, age or idle time; for expiry: now - expires_at.
    pub used: i64,
    pub limit: i64,
}

impl Limit {
    /// The warning for a limit that is near: how far along, and how much is left.
    pub fn warn_words(&self) -> String {
        let (used, limit) = (self.used, self.limit);
        let pct = (self.frac * 100.0).floor();
        match self.breach {
            Breach::Retained => format!("retains {} of WAL, {pct}% of its limit of {}", fmt_bytes(used), fmt_bytes(limit)),
            Breach::Age => format!("age {} is {pct}% of its limit of {}", fmt_us(used), fmt_us(limit)),
            Breach::Expired if used >= 0 => "lease has expired".into(),
            // whole seconds left, rounded up: "in 0s" would read as expired
            Breach::Expired => format!(
                "lease expires in {} unless renewed ({pct}% of its term used)",
                fmt_us((-used + 999_999) / 1_000_000 * 1_000_000)
            ),
            Breach::Inactive => format!("inactive for {}, {pct}% of its limit of {}", fmt_us(used), fmt_us(limit)),
            Breach::Stalled => format!("its consumer has not advanced for {}, {pct}% of pgslotguard.max_stalled_time ({})", fmt_us(used), fmt_us(limit)),
            Breach::Xmin => format!("holds the transaction horizon {used} transactions back, {pct}% of its limit of {limit}"),
            Breach::Space | Breach::Lost => self.words(),
        }
    }

    pub fn words(&self) -> String {
        let (used, limit) = (self.used, self.limit);
        match (self.breach, self.over) {
            (Breach::Retained, true) => {
                format!("retains {} of WAL, above the limit of {}", fmt_bytes(used), fmt_bytes(limit))
            }
            (Breach::Retained, false) => format!("retained WAL {} of {}", fmt_bytes(used), fmt_bytes(limit)),
            (Breach::Age, true) => format!("age {} is above pgslotguard.max_slot_age ({})", fmt_us(used), fmt_us(limit)),
            (Breach::Age, false) => format!("age limit reached in {}", fmt_us(limit - used)),
            (Breach::Expired, true) => format!("lease expired {} ago", fmt_us(used)),
            (Breach::Expired, false) => format!("lease expires in {}", fmt_us(-used)),
            (Breach::Inactive, true) => format!(
                "inactive for {}, above pgslotguard.max_inactive_time ({})",
                fmt_us(used),
                fmt_us(limit)
            ),
            (Breach::Inactive, false) => format!("inactivity limit reached in {}", fmt_us(limit - used)),
            (Breach::Space, _) => format!("free space {} of floor {}", fmt_bytes(used), fmt_bytes(limit)),
            (Breach::Lost, _) => "invalidated by PostgreSQL".into(),
            (Breach::Stalled, true) => format!(
                "active, and its consumer has not advanced for {} while WAL waits for it, above pgslotguard.max_stalled_time ({})",
                fmt_us(used),
                fmt_us(limit)
            ),
            (Breach::Stalled, false) => format!("stall limit reached in {}", fmt_us(limit - used)),
            (Breach::Xmin, true) => format!(
                "holds the transaction horizon (xmin or catalog_xmin) {used} transactions back, above pgslotguard.max_xmin_age ({limit}): VACUUM cannot remove newer dead rows or freeze past it"
            ),
            (Breach::Xmin, false) => format!("xmin age limit reached in {} transactions", limit - used),
        }
    }
}

fn fmt_bytes(b: i64) -> String {
    crate::validate::pretty_size(b)
}
fn fmt_us(us: i64) -> String {
    crate::validate::pretty_duration(us)
}

/// The guard's tracking of slots (first seen, inactive since) updated by this snapshot:
/// new slots are seen now, a slot without a walsender is inactive since it was first
/// seen so, and vanished slots are forgotten — unless a drop intent on them is still to
/// be recorded. PostgreSQL 15 tracks none of this itself. `None`: the tracking is the
/// snapshot's own, unchanged (the usual pass).
pub fn track(policy: &Policy, snap: &Snapshot) -> Option<Vec<Seen>> {
    let unchanged = |s: &SlotInfo, k: &Seen| k.inactive_since.is_none() == s.active() && k.stalled == stall(policy, snap, s, Some(k));
    // The usual pass: every slot known, none turned active or idle, none stalled or
    // moving again, none gone. The store and core fill their arrays in the order slots
    // are made, so the tracking is often in the slots' own order: then no map is needed.
    if snap.seen.len() == snap.slots.len()
        && snap.slots.iter().zip(snap.seen.iter()).all(|(s, k)| s.name == k.slot_name && unchanged(s, k))
    {
        return None;
    }
    let known: HashMap<&str, &Seen> = snap.seen.iter().map(|s| (s.slot_name.as_str(), s)).collect();
    let same = snap.seen.len() == snap.slots.len()
        && snap.slots.iter().all(|s| known.get(s.name.as_str()).is_some_and(|k| unchanged(s, k)));
    if same {
        return None;
    }
    let present: HashSet<&str> = snap.slots.iter().map(|s| s.name.as_str()).collect();
    let mut out: Vec<Seen> = snap
        .slots
        .iter()
        .map(|s| match known.get(s.name.as_str()) {
            // On 17+, core's inactive_since says when a slot lost its walsender between two
            // passes (or before the guard first saw it), more exactly than the pass does.
            None => Seen {
                slot_name: s.name.clone(),
                first_seen: snap.now,
                inactive_since: (!s.active()).then(|| idle_since(s, snap.now)),
                dropping: None,
                stalled: stall(policy, snap, s, None),
            },
            Some(k) => Seen {
                inactive_since: if s.active() { None } else { k.inactive_since.or_else(|| Some(idle_since(s, snap.now))) },
                stalled: stall(policy, snap, s, Some(k)),
                ..(*k).clone()
            },
        })
        .collect();
    out.extend(snap.seen.iter().filter(|k| k.dropping.is_some() && !present.contains(k.slot_name.as_str())).cloned());
    Some(out)
}

/// The progress position of an active slot whose consumer has WAL waiting for it, `None`
/// for any other slot:
/// - held by a walsender: [`Sender::progress`], waiting when below the end of the WAL the
///   walsender may send. A stream that has sent all there is (an idle primary) is not
///   behind, whatever its `restart_lsn`.
/// - held by another backend (a SQL function such as `pg_logical_slot_get_changes`, which
///   reports nothing else): its `restart_lsn`, waiting when below the current WAL position.
pub(crate) fn behind(snap: &Snapshot, s: &SlotInfo) -> Option<u64> {
    if !s.active() {
        return None;
    }
    match s.sender {
        Some(w) => Some(w.progress()).filter(|&p| p < w.send_limit),
        None => s.restart_lsn.filter(|&r| r < snap.current_lsn),
    }
}

/// Since when an active slot has been stalled: its tracking notes a stall at the progress
/// position it is still behind at. One definition for the limit and its deadline
/// (`timing::time_deadlines`).
pub(crate) fn stalled_since(snap: &Snapshot, slot: &SlotInfo, seen: Option<&Seen>) -> Option<i64> {
    let (lsn, since) = seen?.stalled?;
    (behind(snap, slot) == Some(lsn)).then_some(since)
}

/// How long an active slot has been stalled.
fn stalled_for(snap: &Snapshot, slot: &SlotInfo, seen: Option<&Seen>) -> Option<i64> {
    stalled_since(snap, slot, seen).map(|since| snap.now - since)
}

/// The stall of a slot as this pass sees it (`pgslotguard.max_stalled_time` on): a slot
/// [`behind`] at the progress position its tracking noted is stalled since then; one
/// behind elsewhere is noted from now if its `restart_lsn` is the one the worker's
/// previous pass saw (a consumer whose flush moved has made progress); any other slot is
/// not stalled. So a stall is noted from the second pass of the worker that sees it, and a
/// healthy stream, which has sent all there is at almost every pass, seldom writes
/// tracking: only at a pass that finds its walsender between a commit and its send.
fn stall(policy: &Policy, snap: &Snapshot, s: &SlotInfo, known: Option<&Seen>) -> Option<(u64, i64)> {
    policy.max_stalled_us?;
    let p = behind(snap, s)?;
    match known.and_then(|k| k.stalled) {
        Some((lsn, since)) if lsn == p => Some((lsn, since)),
        _ => (s.restart_lsn.is_some() && snap.restart_before.get(s.name.as_str()) == s.restart_lsn.as_ref()).then_some((p, snap.now)),
    }
}

/// When an inactive slot the guard finds idle became so: core's `inactive_since` where
/// core has one (17+), never later than now. Core sets it to the server's start time for
/// every slot at startup, so it only seeds the guard's tracking, which survives restarts
/// (README, PostgreSQL versions).
fn idle_since(slot: &SlotInfo, now: i64) -> i64 {
    slot.core_inactive_since.map_or(now, |t| t.min(now))
}

/// How long from `snap.now` until a limit that only time moves is reached on a slot the
/// guard leaves alone now: a lease's expiry, the age limit, the inactivity limit. `None`:
/// nothing of the kind lies ahead. (A limit is breached when the value is strictly
/// above it, so age and inactivity are due one microsecond after the limit.) The worker
/// sleeps until then rather than a whole naptime.
pub fn next_due(policy: &Policy, snap: &Snapshot, decisions: &[Decision]) -> Option<i64> {
    let limits = decisions
        .iter()
        .filter(|d| d.slot_exists && d.in_scope && d.action == Action::None)
        .filter_map(|d| d.time_due)
        .map(|deadline| deadline - snap.now);
    // and when a time limit comes within the warn fraction (pgslotguard.warn_fraction)
    let warns = decisions
        .iter()
        .filter(|d| d.slot_exists && d.in_scope && d.action == Action::None && policy.warn_fraction > 0.0 && policy.warn_fraction < 1.0)
        .flat_map(|d| d.limits.iter())
        .filter(|l| !matches!(l.breach, Breach::Retained | Breach::Xmin) && l.frac < policy.warn_fraction)
        .map(|l| {
            // time runs one-for-one: the limit's span times the fraction still to go
            let span = match l.breach {
                Breach::Expired if l.frac > 0.0 => -l.used as f64 / (1.0 - l.frac),
                _ => l.limit as f64,
            };
            ((policy.warn_fraction - l.frac) * span).ceil() as i64
        });
    limits.chain(warns).filter(|&t| t > 0).min()
}

/// A limit a slot (or, with no slot, the free-space floor) has come within the warn
/// fraction of (`pgslotguard.warn_fraction`).
#[derive(Debug, Clone, PartialEq)]
pub struct Warning {
    pub slot_name: Option<Name>,
    pub limit: Breach,
    /// How far along, 1.0 = at the limit.
    pub frac: f64,
    /// What it says: made when asked (a pass sees every crossed limit each time, and
    /// says only the new ones), from the slot's limit, or made at once for the floor.
    of: Result<Limit, String>,
}

impl Warning {
    /// The key a warning is remembered by until it re-arms (`pgslotguard.warned`).
    pub fn key(&self) -> (&str, &'static str) {
        (self.slot_name.as_deref().unwrap_or(""), self.limit.limit_word())
    }

    /// The warning in words.
    pub fn words(&self) -> String {
        match &self.of {
            Ok(l) => l.warn_words(),
            Err(words) => words.clone(),
        }
    }
}

/// The warn threshold: every limit of a slot in scope at or past `fraction` of the way
/// (retained WAL, age, inactivity, the share of its lease's term used), and the
/// free-space floor (the share used of the space the floor leaves usable). `fraction` of
/// 0 or 1 (or more) turns warnings off. The caller warns for the ones it has not warned
/// of yet, and forgets (re-arms) those no longer crossed.
///
/// A slot the pass drops gets no warning (the drop says it all); a slot that waits with
/// a breach counts as crossing (its wait is warned of once already).
pub fn warnings(policy: &Policy, verdict: &Verdict, fraction: f64) -> Vec<Warning> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return vec![];
    }
    let mut out = vec![];
    for d in verdict.decisions.iter().filter(|d| d.slot_exists && d.in_scope) {
        if matches!(d.action, Action::Drop { .. } | Action::EndLease { .. }) {
            continue;
        }
        for l in d.limits.iter().filter(|l| l.frac >= fraction) {
            out.push(Warning { slot_name: Some(d.slot_name.clone()), limit: l.breach, frac: l.frac, of: Ok(*l) });
        }
    }
    // (A floor the filesystem cannot meet is reported as such by judge(), not as a share.)
    let floor = verdict.disk.as_ref().zip(policy.min_free_wal).map(|(v, f)| (v, f.bytes(v.disk.total)));
    if let Some((v, floor)) = floor.filter(|(v, f)| *f < v.disk.total) {
        let usable = (v.disk.total - floor).max(1);
        let used = v.disk.total - v.disk.free;
        let frac = ratio(used, usable);
        if frac >= fraction {
            out.push(Warning {
                slot_name: None,
                limit: Breach::Space,
                frac,
                of: Err(format!(
                    "free space on the filesystem of pg_wal is {} of {}, {} above pgslotguard.min_free_wal_space ({}): {:.0}% of the space it leaves is used",
                    fmt_bytes(v.disk.free),
                    fmt_bytes(v.disk.total),
                    fmt_bytes((v.disk.free - floor).max(0)),
                    fmt_bytes(floor),
                    frac.min(1.0) * 100.0
                )),
            });
        }
    }
    out
}

/// What the free-space floor asks of a pass, beside the per-slot decisions.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskVerdict {
    pub disk: WalDisk,
    /// The floor's plan, when a floor is set.
    pub plan: Option<disk::FloorPlan>,
    /// Bytes the next checkpoint frees once every drop decided this pass is done.
    pub freed: i64,
    /// Below the floor, no slot can give more back, and the floor is not restored: why.
    pub stuck: Option<String>,
}

/// The decisions of a pass, and the floor's verdict when the disk was measured.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub decisions: Vec<Decision>,
    pub disk: Option<DiskVerdict>,
}

/// Decide, for every slot and every lease in the snapshot, what must happen.
/// The result is in slot-name order, so passes and views are stable.
pub fn decide(policy: &Policy, snap: &Snapshot) -> Vec<Decision> {
    judge(policy, snap).decisions
}

/// [`decide`], plus the free-space floor: when free space on `pg_wal`'s filesystem is
/// below `min_free_wal_space`, the fewest slots in scope whose drop brings it back above
/// the floor plus the headroom are dropped too (oldest first; see [`disk::plan`]).
pub fn judge(policy: &Policy, snap: &Snapshot) -> Verdict {
    let mut decisions = decide_limits(policy, snap);
    let Some(wal) = &snap.disk else { return Verdict { decisions, disk: None } };
    // Decisions of existing slots by name (decisions of leases without a slot have no
    // pin), the names borrowed from the snapshot: the decisions are in name order.
    let index: HashMap<&str, usize> = snap
        .slots
        .iter()
        .filter_map(|s| {
            let i = decisions.binary_search_by(|d| d.slot_name.as_str().cmp(s.name.as_str())).ok()?;
            decisions[i].slot_exists.then_some((s.name.as_str(), i))
        })
        .collect();
    let pins: Vec<disk::Pin> = snap
        .slots
        .iter()
        .filter_map(|s| {
            let r = s.restart_lsn?;
            let d = &decisions[*index.get(s.name.as_str())?];
            let (droppable, why_not) = if !d.in_scope {
                (false, d.scope_reason)
            } else if horizon::is_synchronized_standby_slot(policy, &s.name) {
                (false, horizon::SYNCHRONIZED_STANDBY_SLOTS_WHY)
            } else if s.active() && !policy.terminate_active {
                (false, "active, and pgslotguard.terminate_active is off")
            } else {
                (true, "")
            };
            Some(disk::Pin { name: s.name.to_string(), restart_lsn: r, droppable, why_not })
        })
        .collect();
    let pins = disk::with_archiver(pins, wal);
    for (name, frees) in disk::frees_per_slot(wal, &pins) {
        if let Some(&i) = index.get(name.as_str()) {
            decisions[i].frees_bytes = Some(frees);
        }
    }
    let already: HashSet<&str> = decisions
        .iter()
        .filter(|d| matches!(d.action, Action::Drop { .. }))
        .map(|d| d.slot_name.as_str())
        .collect();
    // A floor as large as the filesystem can never be met: the guard says so (once) and
    // does not act on it, rather than drop every slot it may for nothing.
    let unmeetable = policy.min_free_wal.map(|f| f.bytes(wal.total)).filter(|&f| f >= wal.total);
    let plan = policy.min_free_wal.filter(|_| unmeetable.is_none()).map(|floor| disk::plan(wal, floor, &pins, &already));
    let mut dropping: HashSet<String> = already.iter().map(|s| s.to_string()).collect();
    let mut stuck = unmeetable.map(|f| {
        format!(
            "pgslotguard.min_free_wal_space ({}) is not below the size of the filesystem of pg_wal ({}): the floor can never be met, and the guard does not act on it; lower it",
            fmt_bytes(f),
            fmt_bytes(wal.total)
        )
    });
    if let Some(p) = plan.as_ref().filter(|p| p.below) {
        let why = format!(
            "free space on the filesystem of pg_wal is {} of {}, below pgslotguard.min_free_wal_space ({})",
            fmt_bytes(wal.free),
            fmt_bytes(wal.total),
            fmt_bytes(p.floor)
        );
        for (name, marginal) in &p.drops {
            let Some(&i) = index.get(name.as_str()) else { continue };
            let pid = snap.slots.iter().find(|s| &s.name == name).and_then(|s| s.active_pid);
            let mut reason = format!("{why}; dropping it frees about {} of pg_wal", fmt_bytes(*marginal));
            if let Some(pid) = pid {
                reason.push_str(&format!("; walsender PID {pid} terminated (terminate_active)"));
            }
            decisions[i].state = Breach::Space.state();
            decisions[i].action = Action::Drop { breach: Breach::Space, terminate: pid, reason };
            dropping.insert(name.clone());
        }
        if let Some((_, _, extra)) = p.blocker.as_ref().filter(|b| b.0 == disk::ARCHIVER) {
            stuck = Some(format!(
                "{why}; pg_wal holds {} and {} of it waits for the archiver (WAL from {} on is not archived yet; see pg_stat_archiver and archive_command): no slot drop frees it, so none is made",
                fmt_bytes(wal.pg_wal),
                fmt_bytes(*extra),
                crate::validate::format_lsn(wal.unarchived.unwrap_or(0))
            ));
        } else if let Some((name, not_why, extra)) =
            // Core's own slot (19) is named by nothing of ours: in its way, the pass says
            // only that no slot it may drop holds back more (below).
            p.blocker.as_ref().filter(|(name, ..)| !snap.slots.iter().any(|s| s.name == name.as_str() && s.system.is_some()))
        {
            if let Some(d) = index.get(name.as_str()).map(|&i| &mut decisions[i]).filter(|d| d.action == Action::None) {
                d.action = Action::Wait {
                    breach: Breach::Space,
                    reason: format!(
                        "{why}; this slot holds back {} of pg_wal that the floor needs, and is not dropped: {not_why}",
                        fmt_bytes(*extra)
                    ),
                };
            }
        } else if !p.restores {
            stuck = Some(format!(
                "{why}; pg_wal holds {} and no slot the guard may drop holds back more: the rest of the filesystem is used by something else, or max_wal_size ({}) is too large for it",
                fmt_bytes(wal.pg_wal),
                fmt_bytes(wal.max_wal)
            ));
        }
    }
    // What each drop of this pass releases, oldest first.
    let mut horizon = disk::Horizon::new(&pins);
    let mut so_far = horizon.freed(wal);
    let order: Vec<String> = horizon.oldest_first().filter(|p| dropping.contains(&p.name)).map(|p| p.name.clone()).collect();
    for name in order {
        horizon.drop_pin(&name);
        let now = horizon.freed(wal);
        if let Some(&i) = index.get(name.as_str()) {
            decisions[i].releases_bytes = Some(now - so_far);
        }
        so_far = now;
    }
    Verdict { decisions, disk: Some(DiskVerdict { disk: wal.clone(), plan, freed: so_far, stuck }) }
}

/// The per-slot limits: scope, expiry, retained WAL, age, inactivity.
fn decide_limits(policy: &Policy, snap: &Snapshot) -> Vec<Decision> {
    // Each name's lease and tracking, in one map: one lookup per slot.
    let mut by_name: HashMap<&str, (Option<usize>, Option<&Seen>)> = HashMap::default();
    by_name.reserve(snap.leases.len().max(snap.seen.len()));
    for (i, l) in snap.leases.iter().enumerate() {
        by_name.entry(l.slot_name.as_str()).or_default().0 = Some(i);
    }
    for s in snap.seen.iter() {
        by_name.entry(s.slot_name.as_str()).or_default().1 = Some(s);
    }
    // Every slot, then every lease whose slot is gone, in name order (names are unique: a
    // lease without a slot has no slot of its name). The order is made on names and
    // indices, and each decision is made in place once: a decision is over 500 bytes, and
    // sorting a thousand of them cost more than judging them.
    let mut with_slot = vec![false; snap.leases.len()];
    let mut entries: Vec<(&str, Result<usize, usize>)> = Vec::with_capacity(snap.slots.len() + snap.leases.len());
    for (i, slot) in snap.slots.iter().enumerate() {
        if let Some(&(Some(j), _)) = by_name.get(slot.name.as_str()) {
            with_slot[j] = true;
        }
        entries.push((slot.name.as_str(), Ok(i)));
    }
    for (j, lease) in snap.leases.iter().enumerate().filter(|(j, _)| !with_slot[*j]) {
        entries.push((lease.slot_name.as_str(), Err(j)));
    }
    // Each decision goes straight into its place and is finished there: a decision is
    // copied once, not once more for every step that touches it.
    let mut out: Vec<Decision> = Vec::with_capacity(entries.len());
    for k in name_order(&entries, |e| e.0) {
        let (name, what) = entries[k];
        match what {
            Ok(i) => {
                let (lease, seen) = by_name.get(name).copied().unwrap_or_default();
                out.push(decide_slot(policy, snap, &snap.slots[i], lease.map(|j| &snap.leases[j]), seen));
                let Some(d) = out.last_mut() else { continue };
                horizon::spare_synchronized_standby_slot(policy, d);
                if let Action::Drop { breach, .. } = d.action {
                    d.drop_loop = drop_loop(&snap.recent_drops, name, breach, snap.now);
                }
            }
            Err(j) => out.push(missing_slot(snap, &snap.leases[j])),
        }
    }
    out
}

/// The indices of `items` in the order of their names (unique). Each item is sorted as
/// one number: its name's first 12 bytes, which order as the bytes do (names hold no NUL,
/// so a shorter name padded with zeroes orders before a longer one it begins), and its
/// index. Names that share their first 12 bytes are then put in order among themselves.
/// A thousand slots sort in a fraction of the time their names would.
fn name_order<T>(items: &[T], name: impl Fn(&T) -> &str) -> Vec<usize> {
    const PREFIX: usize = 12;
    let mut keys: Vec<u128> = items
        .iter()
        .enumerate()
        .map(|(i, it)| {
            let n = name(it).as_bytes();
            let mut b = [0u8; 16];
            b[..n.len().min(PREFIX)].copy_from_slice(&n[..n.len().min(PREFIX)]);
            b[PREFIX..].copy_from_slice(&(i as u32).to_be_bytes());
            u128::from_be_bytes(b)
        })
        .collect();
    keys.sort_unstable();
    let mut order: Vec<usize> = keys.iter().map(|&k| k as u32 as usize).collect();
    let mut start = 0;
    while start < keys.len() {
        let mut end = start + 1;
        while end < keys.len() && keys[end] >> 32 == keys[start] >> 32 {
            end += 1;
        }
        if end - start > 1 {
            order[start..end].sort_unstable_by(|&a, &b| name(&items[a]).cmp(name(&items[b])));
        }
        start = end;
    }
    order
}

/// The decision on a lease whose slot no longer exists: end the lease.
fn missing_slot(snap: &Snapshot, lease: &Lease) -> Decision {
    Decision {
        slot_name: lease.slot_name.clone(),
        slot_exists: false,
        leased: true,
        lease_owner: Some(lease.owner.clone()),
        lease_owner_oid: lease.owner_oid,
        in_scope: true,
        scope_reason: "leased",
        retained_bytes: None,
        age_us: Some(snap.now - lease.born_at),
        inactive_us: None,
        limits: Limits::none(),
        state: "slot_missing",
        action: Action::EndLease { reason: "slot no longer exists (dropped outside pgslotguard); lease ended".into() },
        frees_bytes: None,
        releases_bytes: None,
        retained_limit: None,
        invalidation: None,
        xmin_age: None,
        catalog_xmin_age: None,
        restart_lsn: None,
        logical_flush: None,
        foreign_consumer: lease.adopted,
        drop_loop: None,
        time_due: None,
    }
}

fn scope_of(policy: &Policy, slot: &SlotInfo, leased: bool) -> (bool, &'static str) {
    // First of all: core's own slots are out of every scope, leased (a lease taken on 18 of
    // a slot that 19 reserves) or not.
    if let Some(system) = slot.system {
        return (false, system.reason());
    }
    if let Some(re) = &policy.exclude {
        if re.is_match(&slot.name) {
            return (false, "excluded by pgslotguard.exclude");
        }
    }
    // Before temporary: slot synchronisation makes a synced slot temporary until the
    // primary's slot has caught up with it, and it is the primary's all the same.
    if slot.synced {
        return (false, "synchronized from the primary (synced)");
    }
    if slot.temporary {
        return (false, "temporary slot (ends with its session)");
    }
    if leased {
        return (true, "leased");
    }
    match policy.scope {
        Scope::Leased => (false, "not leased (scope = leased)"),
        Scope::Physical if !slot.physical => (false, "logical slot (scope = physical)"),
        Scope::Physical => (true, "physical slot (scope = physical)"),
        Scope::All => (true, "any slot (scope = all)"),
    }
}

#[inline]
fn decide_slot(
    policy: &Policy,
    snap: &Snapshot,
    slot: &SlotInfo,
    lease: Option<&Lease>,
    seen: Option<&Seen>,
) -> Decision {
    let now = snap.now;
    let retained = slot.restart_lsn.map(|r| snap.current_lsn.saturating_sub(r) as i64).unwrap_or(0);
    let born = lease.map(|l| l.born_at).or(seen.map(|s| s.first_seen));
    let age = born.map(|b| now - b);
    let inactive = if slot.active() {
        None
    } else {
        seen.and_then(|s| s.inactive_since).map(|t| now - t)
    };
    let xmin_age = horizon::xid_age(snap.next_xid, slot.xmin);
    let catalog_xmin_age = horizon::xid_age(snap.next_xid, slot.catalog_xmin);
    if let Some(why) = lease.and_then(|l| logical::not_the_leased_slot(slot, l)) {
        return Decision {
            slot_name: slot.name.clone(),
            slot_exists: true,
            leased: true,
            lease_owner: lease.map(|l| l.owner.clone()),
            lease_owner_oid: lease.map_or(0, |l| l.owner_oid),
            in_scope: false,
            scope_reason: "not the slot of its lease",
            retained_bytes: slot.restart_lsn.map(|_| retained),
            age_us: age,
            inactive_us: inactive,
                limits: Limits::none(),
            state: "slot_replaced",
            action: Action::EndLease {
                reason: format!("the slot of this name is not the one the lease created or adopted: {why}; lease ended, slot left alone"),
            },
            frees_bytes: None,
            releases_bytes: None,
            retained_limit: None,
            invalidation: slot.invalidation,
            xmin_age,
            catalog_xmin_age,
            restart_lsn: slot.restart_lsn,
            logical_flush: slot.logical.as_ref().map(|l| l.confirmed_flush),
            foreign_consumer: lease.is_none_or(|l| l.adopted),
            drop_loop: None,
            time_due: None,
        };
    }
    let (in_scope, scope_reason) = scope_of(policy, slot, lease.is_some());

    let mut d = Decision {
        slot_name: slot.name.clone(),
        slot_exists: true,
        leased: lease.is_some(),
        lease_owner: lease.map(|l| l.owner.clone()),
        lease_owner_oid: lease.map_or(0, |l| l.owner_oid),
        in_scope,
        scope_reason,
        retained_bytes: slot.restart_lsn.map(|_| retained),
        age_us: age,
        inactive_us: inactive,
        limits: Limits::none(),
        state: if in_scope { "ok" } else { "out_of_scope" },
        action: Action::None,
        frees_bytes: None,
        releases_bytes: None,
        retained_limit: None,
        invalidation: slot.invalidation,
        xmin_age,
        catalog_xmin_age,
        restart_lsn: slot.restart_lsn,
        logical_flush: slot.logical.as_ref().map(|l| l.confirmed_flush),
        foreign_consumer: lease.is_none_or(|l| l.adopted),
        drop_loop: None,
        time_due: None,
    };
    if !in_scope {
        // Core's own slots (19) hold the horizon back by design (retain_dead_tuples,
        // REPACK): named by nothing of ours, as they are touched by nothing.
        if slot.system.is_none() {
            horizon::name_out_of_scope_slot(policy, lease, &mut d);
        }
        return d;
    }

    let retained_limit = retained_limit(policy, lease);
    d.retained_limit = retained_limit;
    d.time_due = timing::slot_deadline(policy, snap, slot, lease, seen);

    // A slot core has invalidated can never be used again: it is dropped at once, whatever
    // its limits, and the event says why core invalidated it.
    if let Some(why) = slot.invalidation {
        let words = format!("invalidated by PostgreSQL ({why}): it can never be used again");
        d.state = Breach::Lost.state();
        d.action = match slot.active_pid {
            Some(pid) if !policy.terminate_active => Action::Wait {
                breach: Breach::Lost,
                reason: format!("{words}; active for PID {pid}, not dropped: terminate_active is off"),
            },
            Some(pid) => Action::Drop {
                breach: Breach::Lost,
                terminate: Some(pid),
                reason: format!("{words}; walsender PID {pid} terminated (terminate_active)"),
            },
            None => Action::Drop { breach: Breach::Lost, terminate: None, reason: words },
        };
        return d;
    }

    // Every limit that applies, as numbers, in priority order (hard limits, then expiry,
    // then inactivity); words are made only for the ones shown. On the stack: a pass
    // judges every slot.
    // A slot held by a forward clock jump has its time-driven limits shown but not breached.
    let timely = snap.held.is_empty() || !snap.held.contains(slot.name.as_str());
    // A limit breached when its value exceeds it; `applies` is false while a clock jump holds it.
    let exceeds = |breach, applies: bool, (limit, used): (i64, i64)| Limit { breach, over: applies && used > limit, frac: ratio(used, limit), used, limit };
    // The horizon a slot holds is the older of its xmin and catalog_xmin.
    let held_back = xmin_age.max(catalog_xmin_age);
    let limits: [Option<Limit>; 6] = [
        retained_limit.map(|limit| exceeds(Breach::Retained, true, (limit, retained))),
        xmin_limit(policy, lease).zip(held_back).map(|v| exceeds(Breach::Xmin, true, v)),
        age_limit(policy, lease).zip(age).map(|v| exceeds(Breach::Age, timely, v)),
        policy.max_stalled_us.zip(stalled_for(snap, slot, seen)).map(|v| exceeds(Breach::Stalled, timely, v)),
        lease.map(|l| {
            // A lease that lasts while its consumer streams expires its ttl after the
            // consumer went (policy::logical::expiry); any other, at its expiry.
            let expires = logical::expiry(l, slot, seen, now);
            let over = timely && now >= expires;
            let start = l.renewed_at.unwrap_or(l.leased_at);
            let span = (l.expires_at - start).max(1);
            let frac = if over { 1.0 + ratio(now - expires, span) } else { ratio(now - (expires - span), span) };
            Limit { breach: Breach::Expired, over, frac, used: now - expires, limit: 0 }
        }),
        inactive_limit(policy, lease).zip(inactive).map(|v| exceeds(Breach::Inactive, timely, v)),
    ];

    d.limits = Limits::of(limits);
    let nearest = nearest(limits.iter().flatten());

    // Within the warn fraction of a limit (not over it): the state says which.
    let warn = policy.warn_fraction;
    if let Some(n) = nearest.filter(|n| warn > 0.0 && warn < 1.0 && n.frac >= warn && !n.over) {
        d.state = n.breach.near_state();
    }

    // The first breach in priority order decides.
    let breach = limits.iter().flatten().find(|l| l.over).map(|l| (l.breach, l.words()));
    let Some((breach, words)) = breach else { return d };

    match slot.active_pid {
        None => {
            d.state = breach.state();
            d.action = Action::Drop { breach, terminate: None, reason: words };
        }
        Some(pid) if breach.is_hard() && policy.terminate_active => {
            d.state = breach.state();
            d.action = Action::Drop {
                breach,
                terminate: Some(pid),
                reason: format!("{words}; walsender PID {pid} terminated (terminate_active)"),
            };
        }
        Some(pid) => {
            d.state = if breach == Breach::Expired { "expired_active" } else { breach.state() };
            let why = if breach.is_hard() {
                "terminate_active is off"
            } else {
                "an active slot is not dropped for this limit alone"
            };
            d.action = Action::Wait {
                breach,
                reason: format!("{words}; active for PID {pid}, not dropped: {why}"),
            };
        }
    }
    d
}

/// A limit as it applies to a slot: the global one, tightened by the lease's own; a lease
/// limit set by a superuser replaces the global one.
fn lease_limit(lease: Option<&Lease>, own: impl Fn(&Lease) -> Option<i64>, global: Option<i64>) -> Option<i64> {
    match (lease.and_then(own), global) {
        (Some(own), Some(global)) if !lease.is_some_and(|l| l.limit_by_superuser) => Some(own.min(global)),
        (Some(own), _) => Some(own),
        (None, global) => global,
    }
}

/// The retained-WAL limit of a slot: `max_retained_wal` and the lease's `max_retained`.
pub fn retained_limit(policy: &Policy, lease: Option<&Lease>) -> Option<i64> {
    lease_limit(lease, |l| l.max_retained, policy.max_retained_wal)
}

/// The age limit of a slot: `max_slot_age` and the lease's `max_age`.
pub fn age_limit(policy: &Policy, lease: Option<&Lease>) -> Option<i64> {
    lease_limit(lease, |l| l.max_age, policy.max_slot_age_us)
}

/// The inactivity limit of a slot: `max_inactive_time` and the lease's `max_inactive`.
pub fn inactive_limit(policy: &Policy, lease: Option<&Lease>) -> Option<i64> {
    lease_limit(lease, |l| l.max_inactive, policy.max_inactive_us)
}

/// The transaction-horizon limit of a slot: `max_xmin_age` and the lease's `max_xmin_age`.
pub fn xmin_limit(policy: &Policy, lease: Option<&Lease>) -> Option<i64> {
    lease_limit(lease, |l| l.max_xmin_age, policy.max_xmin_age)
}

/// Why the slot named like a lease is not the lease's slot, if it is not: a lease only
/// ever creates or adopts a permanent physical slot, so a logical or temporary slot under
/// its name was made by someone else after the lease's slot was dropped.
///
/// A physical slot's restart LSN is no identity: it moves *back* when a client starts
/// streaming at a segment boundary or from its own older position (seen here: 0/30598E8
/// → 0/3000000 as pg_receivewal attached), so a physical slot re-created under the name
/// between two passes cannot be told from the lease's own (README, Known limits).
fn ratio(value: i64, limit: i64) -> f64 {
    if limit <= 0 {
        if value > 0 {
            f64::INFINITY
        } else {
            1.0
        }
    } else {
        value as f64 / limit as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000; // one second in microseconds
    const MB: i64 = 1 << 20;
    const NOW: i64 = 1_000_000 * S;

    fn slot(name: &str) -> SlotInfo {
        SlotInfo {
            synced: false,
            system: None,
            name: name.into(),
            physical: true,
            temporary: false,
            active_pid: None,
            restart_lsn: Some(0),
            invalidation: None,
            core_inactive_since: None,
            sender: None,
            xmin: None,
            catalog_xmin: None,
            logical: None,
        }
    }
    fn lease(name: &str, leased_ago: i64, expires_in: i64) -> Lease {
        Lease {
            slot_name: name.into(),
            owner: "backup".into(),
            owner_oid: 10,
            leased_at: NOW - leased_ago,
            born_at: NOW - leased_ago,
            expires_at: NOW + expires_in,
            max_retained: None,
            max_inactive: None,
            max_age: None,
            max_xmin_age: None,
            renewed_at: None,
            limit_by_superuser: false,
            adopted: false,
            logical: false,
            while_active: false,
        }
    }
    fn snap(slots: Vec<SlotInfo>, leases: Vec<Lease>) -> Snapshot {
        Snapshot { now: NOW, current_lsn: 10 * MB as u64, slots, leases: leases.into(), ..Snapshot::default() }
    }
    fn one(policy: &Policy, s: &Snapshot) -> Decision {
        let d = decide(policy, s);
        assert_eq!(d.len(), 1, "{d:#?}");
        d.into_iter().next().unwrap()
    }
    fn dropped(d: &Decision) -> Option<Breach> {
        match &d.action {
            Action::Drop { breach, .. } => Some(*breach),
            _ => None,
        }
    }

    #[test]
    fn a_drop_says_what_it_costs_the_consumer() {
        // (what, leased, adopted, restart_lsn, words expected, new base backup named)
        type Case<'a> = (&'a str, bool, bool, Option<u64>, &'a str, bool);
        let cases: [Case; 5] = [
            ("a backup's own lease", true, false, Some(0x1_0000_0028), "restart_lsn at the drop 1/28: the first WAL its consumer will never get", false),
            ("an adopted slot (Barman's)", true, true, Some(0x500_0000), "restart_lsn at the drop 0/5000000", true),
            ("an unleased slot under scope = physical", false, false, Some(0x300_0000), "restart_lsn at the drop 0/3000000", true),
            ("a slot that reserved no WAL", false, false, None, "it had reserved no WAL", true),
            ("an adopted slot that reserved no WAL", true, true, None, "it had reserved no WAL", true),
        ];
        let policy = Policy { max_slot_age_us: Some(S), scope: Scope::Physical, ..Policy::default() };
        for (what, leased, adopted, lsn, words, fresh_backup) in cases {
            let mut sl = slot("a");
            sl.restart_lsn = lsn;
            let leases = if leased { vec![Lease { adopted, ..lease("a", 10 * S, 3600 * S) }] } else { vec![] };
            let mut s = snap(vec![sl], leases);
            s.seen = vec![Seen { slot_name: "a".into(), first_seen: NOW - 10 * S, inactive_since: Some(NOW - 10 * S), dropping: None, stalled: None }].into();
            let d = one(&policy, &s);
            assert_eq!(dropped(&d), Some(Breach::Age), "{what}");
            let cost = d.drop_cost();
            assert!(cost.starts_with(words), "{what}: {cost}");
            assert_eq!(cost.contains("its consumer must start from a new base backup"), fresh_backup, "{what}: {cost}");
        }
    }

    #[test]
    fn a_slot_dropped_again_for_the_same_limit_within_the_hour_is_a_loop_warned_of_once_an_hour() {
        let recent = |action: &str, ago: i64, warned_ago: Option<i64>| RecentDrop {
            slot_name: "barman".into(),
            at: NOW - ago,
            action: action.into(),
            drops: 1,
            loop_warned_at: warned_ago.map(|w| NOW - w),
        };
        // (what, recent drop of the name, loop?, warn now?)
        let cases: Vec<(&str, Option<RecentDrop>, bool, bool)> = vec![
            ("never dropped before", None, false, false),
            ("dropped 2 min ago for the same limit: the loop is said", Some(recent("retained_drop", 120 * S, None)), true, true),
            ("said 10 min ago: not again", Some(recent("retained_drop", 60 * S, Some(600 * S))), true, false),
            ("said an hour ago: said again", Some(recent("retained_drop", 60 * S, Some(3600 * S))), true, true),
            ("dropped for another limit", Some(recent("inactive_drop", 60 * S, None)), false, false),
            ("dropped over an hour ago", Some(recent("retained_drop", 3600 * S, None)), false, false),
            ("dropped just under an hour ago", Some(recent("retained_drop", 3600 * S - 1, None)), true, true),
        ];
        let policy = Policy { max_retained_wal: Some(MB), scope: Scope::Physical, ..Policy::default() };
        for (what, r, is_loop, warn) in cases {
            let mut s = snap(vec![slot("barman")], vec![]);
            s.recent_drops = r.into_iter().collect::<Vec<_>>().into();
            let d = one(&policy, &s);
            // The loop never changes the decision: the slot is dropped again (disk first).
            assert_eq!(dropped(&d), Some(Breach::Retained), "{what}");
            assert_eq!(d.drop_loop.is_some(), is_loop, "{what}: {:?}", d.drop_loop);
            let w = d.loop_warning(NOW);
            assert_eq!(w.is_some(), warn, "{what}: {w:?}");
            if let Some(w) = w {
                assert!(w.starts_with("drop/recreate loop: replication slot \"barman\""), "{w}");
                assert!(w.contains("retained_drop"), "{w}");
            }
        }
        // Out of scope (an unleased slot under scope = leased) nothing is dropped: no loop.
        let mut s = snap(vec![slot("barman")], vec![]);
        s.recent_drops = vec![recent("retained_drop", 60 * S, None)].into();
        let d = one(&Policy { max_retained_wal: Some(MB), ..Policy::default() }, &s);
        assert_eq!((dropped(&d), d.drop_loop), (None, None));
    }

    #[test]
    fn unexpired_lease_is_ok() {
        let d = one(&Policy::default(), &snap(vec![slot("a")], vec![lease("a", 60 * S, 3600 * S)]));
        assert_eq!(d.state, "ok");
        assert_eq!(d.action, Action::None);
        assert!(d.in_scope);
        assert_eq!(d.retained_bytes, Some(10 * MB));
        assert_eq!(d.nearest_limit().as_deref(), Some("lease expires in 1h 00m"));
    }

    #[test]
    fn expired_inactive_lease_is_dropped() {
        let d = one(&Policy::default(), &snap(vec![slot("a")], vec![lease("a", 3600 * S, -S)]));
        assert_eq!(dropped(&d), Some(Breach::Expired));
        assert_eq!(d.state, "expired");
    }

    #[test]
    fn lease_expires_exactly_at_expires_at() {
        let d = one(&Policy::default(), &snap(vec![slot("a")], vec![lease("a", 3600 * S, 0)]));
        assert_eq!(dropped(&d), Some(Breach::Expired));
        let d = one(&Policy::default(), &snap(vec![slot("a")], vec![lease("a", 3600 * S, 1)]));
        assert_eq!(d.action, Action::None);
    }

    #[test]
    fn expired_active_lease_waits_even_with_terminate_active() {
        let mut s = slot("a");
        s.active_pid = Some(42);
        let p = Policy { terminate_active: true, ..Policy::default() };
        let d = one(&p, &snap(vec![s], vec![lease("a", 3600 * S, -S)]));
        assert_eq!(d.state, "expired_active");
        assert!(matches!(d.action, Action::Wait { breach: Breach::Expired, .. }));
    }

    #[test]
    fn global_retained_limit_drops_leased_slot() {
        let p = Policy { max_retained_wal: Some(8 * MB), ..Policy::default() };
        let d = one(&p, &snap(vec![slot("a")], vec![lease("a", S, 3600 * S)]));
        assert_eq!(dropped(&d), Some(Breach::Retained));
        assert_eq!(d.state, "over_retained");
        // exactly at the limit is not over it
        let p = Policy { max_retained_wal: Some(10 * MB), ..Policy::default() };
        assert_eq!(one(&p, &snap(vec![slot("a")], vec![lease("a", S, 3600 * S)])).action, Action::None);
    }

    #[test]
    fn per_lease_limit_only_tightens_the_global_one_unless_a_superuser_set_it() {
        let mut l = lease("a", S, 3600 * S);
        l.max_retained = Some(4 * MB);
        let p = Policy::default();
        assert_eq!(dropped(&one(&p, &snap(vec![slot("a")], vec![l.clone()]))), Some(Breach::Retained));
        // a lease taken with 100 MB while the global limit was off: the DBA's later 1 MB wins
        l.max_retained = Some(100 * MB);
        let p = Policy { max_retained_wal: Some(MB), ..Policy::default() };
        let d = one(&p, &snap(vec![slot("a")], vec![l.clone()]));
        assert_eq!(dropped(&d), Some(Breach::Retained));
        assert_eq!(d.retained_limit, Some(MB));
        // a superuser's lease limit replaces the global one, both ways
        l.limit_by_superuser = true;
        let d = one(&p, &snap(vec![slot("a")], vec![l]));
        assert_eq!(d.action, Action::None);
        assert_eq!(d.retained_limit, Some(100 * MB));
    }

    #[test]
    fn per_lease_time_limits_tighten_the_global_ones_and_set_the_deadlines() {
        let mut l = lease("a", 100 * S, 3600 * S);
        l.max_inactive = Some(30 * S);
        l.max_age = Some(90 * S);
        let mut s = snap(vec![slot("a")], vec![l.clone()]);
        s.seen = vec![Seen { slot_name: "a".into(), first_seen: NOW - 100 * S, inactive_since: Some(NOW - 20 * S), dropping: None, stalled: None }].into();
        // global limits off: the lease's own age limit (90 s) is passed at 100 s
        assert_eq!(dropped(&one(&Policy::default(), &s)), Some(Breach::Age));
        // inactivity alone: 20 s idle under 30 s is fine; the deadline is the lease's
        Rc::make_mut(&mut s.leases)[0].max_age = None;
        let d = one(&Policy::default(), &s);
        assert_eq!(d.action, Action::None);
        assert_eq!(timing::time_deadlines(&Policy::default(), &s), vec![("a", NOW + 10 * S + 1)]);
        // a looser global limit does not loosen the lease's; a tighter one wins
        let p = Policy { max_inactive_us: Some(3600 * S), ..Policy::default() };
        assert_eq!(one(&p, &s).nearest().map(|n| n.limit), Some(30 * S));
        let p = Policy { max_inactive_us: Some(10 * S), ..Policy::default() };
        assert_eq!(dropped(&one(&p, &s)), Some(Breach::Inactive));
        // a superuser's own limit replaces the global one, both ways
        Rc::make_mut(&mut s.leases)[0].limit_by_superuser = true;
        assert_eq!(one(&p, &s).action, Action::None);
        assert_eq!(inactive_limit(&p, Some(&s.leases[0])), Some(30 * S));
        assert_eq!(age_limit(&Policy { max_slot_age_us: Some(S), ..Policy::default() }, Some(&s.leases[0])), Some(S));
    }

    #[test]
    fn a_slot_core_invalidated_is_dropped_as_lost_whatever_its_limits() {
        let mut lost = slot("gone_wal");
        lost.restart_lsn = None;
        lost.invalidation = Some("wal_removed");
        let d = one(&Policy::default(), &snap(vec![lost.clone()], vec![lease("gone_wal", S, 3600 * S)]));
        assert_eq!(d.state, "lost");
        match &d.action {
            Action::Drop { breach: Breach::Lost, terminate: None, reason } => {
                assert!(reason.contains("wal_removed") && reason.contains("never be used again"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(Breach::Lost.drop_action(), Outcome::LostDrop);
        assert!(Outcome::LostDrop.is_guard_drop());
        // out of scope (not leased, scope = leased): left alone
        let d = one(&Policy::default(), &snap(vec![lost.clone()], vec![]));
        assert_eq!(d.action, Action::None);
        assert!(!d.in_scope);
        // in scope by scope = physical, unleased: dropped too
        let p = Policy { scope: Scope::Physical, ..Policy::default() };
        assert_eq!(dropped(&one(&p, &snap(vec![lost.clone()], vec![]))), Some(Breach::Lost));
        // excluded by name: never touched
        let p = Policy { scope: Scope::Physical, exclude: Some(regex::Regex::new("^gone").unwrap()), ..Policy::default() };
        assert_eq!(one(&p, &snap(vec![lost], vec![])).action, Action::None);
    }

    #[test]
    fn warnings_come_at_the_fraction_of_each_limit_and_not_for_a_drop() {
        let p = Policy { max_retained_wal: Some(10 * MB), warn_fraction: 0.8, ..Policy::default() };
        // slot a: 8 MB of 10 (0.8); its lease 50 min into 60 (0.83); slot b: fresh
        let mut a = slot("a");
        a.restart_lsn = Some(2 * MB as u64);
        let mut l = lease("a", 50 * 60 * S, 10 * 60 * S);
        l.renewed_at = None;
        let b = SlotInfo { restart_lsn: Some(10 * MB as u64), ..slot("b") };
        let s = snap(vec![a.clone(), b], vec![l.clone(), lease("b", S, 3600 * S)]);
        let v = judge(&p, &s);
        let w = warnings(&p, &v, p.warn_fraction);
        let got: Vec<(Option<&str>, Breach)> = w.iter().map(|w| (w.slot_name.as_deref(), w.limit)).collect();
        assert_eq!(got, vec![(Some("a"), Breach::Retained), (Some("a"), Breach::Expired)]);
        assert!(w[1].words().contains("expires in 10m") && w[1].words().contains("unless renewed"), "{}", w[1].words());
        assert_eq!(w[0].key(), ("a", "retained"));
        assert_eq!(v.decisions[0].state, "expiring", "the nearest limit names the state");
        // renewed 5 min ago for 10 more minutes: a third of the term, no expiry warning
        let mut renewed = l.clone();
        renewed.renewed_at = Some(NOW - 5 * 60 * S);
        let s2 = snap(vec![a.clone()], vec![renewed]);
        let w = warnings(&p, &judge(&p, &s2), 0.8);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].limit, Breach::Retained);
        // 0 and 1 turn warnings off
        assert!(warnings(&p, &v, 0.0).is_empty() && warnings(&p, &v, 1.0).is_empty());
        // dropped (its lease expired): no warning besides
        let v = judge(&p, &snap(vec![a.clone()], vec![lease("a", 3600 * S, -S)]));
        assert!(matches!(v.decisions[0].action, Action::Drop { .. }));
        assert!(warnings(&p, &v, 0.8).is_empty());
    }

    #[test]
    fn the_floor_warns_when_most_of_the_space_it_leaves_is_used() {
        let p = Policy { min_free_wal: Some(Floor::Bytes(100 * MB)), warn_fraction: 0.8, ..Policy::default() };
        // 1024 MB filesystem, floor 100 MB: 924 MB usable; 874 MB used is 94 %
        let mut s = disk_snap(150 * MB, vec![slot("a")], vec![lease("a", S, 3600 * S)]);
        let w = warnings(&p, &judge(&p, &s), 0.8);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].slot_name, None);
        assert_eq!(w[0].key(), ("", "floor"));
        assert!(w[0].words().contains("50 MB above"), "{}", w[0].words());
        // 524 MB used: 56 %
        s.disk.as_mut().unwrap().free = 500 * MB;
        assert!(warnings(&p, &judge(&p, &s), 0.8).is_empty());
    }

    #[test]
    fn the_worker_wakes_when_a_time_limit_comes_within_the_warn_fraction() {
        let p = Policy { max_inactive_us: Some(100 * S), warn_fraction: 0.5, ..Policy::default() };
        let mut s = snap(vec![slot("a")], vec![lease("a", 10 * S, 90 * S)]);
        s.seen = vec![Seen { slot_name: "a".into(), first_seen: NOW - 10 * S, inactive_since: Some(NOW - 10 * S), dropping: None, stalled: None }].into();
        let d = decide(&p, &s);
        // lease term 100 s, 10 s used: half at +40 s; inactivity 10 of 100 s: half at +40 s
        assert_eq!(next_due(&p, &s, &d), Some(40 * S));
        Rc::make_mut(&mut s.leases)[0].expires_at = NOW + 30 * S;
        // term 40 s, 10 s used: half at +10 s
        assert_eq!(next_due(&p, &s, &decide(&p, &s)), Some(10 * S));
    }

    #[test]
    fn a_stall_is_noted_at_the_second_pass_and_breaches_after_max_stalled_time() {
        let p = Policy { max_stalled_us: Some(10 * S), ..Policy::default() };
        let mut a = slot("a");
        a.active_pid = Some(7);
        a.restart_lsn = Some(5 * MB as u64);
        let mut s = snap(vec![a.clone()], vec![lease("a", S, 3600 * S)]);
        s.seen = vec![Seen { slot_name: "a".into(), first_seen: NOW - S, inactive_since: None, dropping: None, stalled: None }].into();
        // first pass that sees this LSN: nothing noted (a stream reports every few seconds)
        assert_eq!(track(&p, &s), None);
        // the previous pass saw the same LSN, behind the current position: noted from now
        s.restart_before.insert("a".into(), 5 * MB as u64);
        assert_eq!(track(&p, &s).unwrap()[0].stalled, Some((5 * MB as u64, NOW)));
        // the limit off: nothing noted
        assert_eq!(track(&Policy::default(), &s), None);
        // stalled for 20 s: a hard breach; waits without terminate_active, dropped with it
        Rc::make_mut(&mut s.seen)[0].stalled = Some((5 * MB as u64, NOW - 20 * S));
        assert_eq!(track(&p, &s), None, "still stalled: nothing to write");
        let d = one(&p, &s);
        assert_eq!(d.state, "stalled");
        match &d.action {
            Action::Wait { breach: Breach::Stalled, reason } => assert!(reason.contains("has not advanced for 20s"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let p2 = Policy { terminate_active: true, ..p.clone() };
        assert!(matches!(one(&p2, &s).action, Action::Drop { breach: Breach::Stalled, terminate: Some(7), .. }));
        // its deadline: 10 s after it was noted
        Rc::make_mut(&mut s.seen)[0].stalled = Some((5 * MB as u64, NOW - 4 * S));
        assert_eq!(next_due(&p, &s, &decide(&p, &s)), Some(6 * S + 1));
        // it moved on, caught up, or lost its walsender: no longer stalled
        let mut moved = a.clone();
        moved.restart_lsn = Some(6 * MB as u64);
        let mut caught_up = a.clone();
        caught_up.restart_lsn = Some(10 * MB as u64);
        let mut idle = a.clone();
        idle.active_pid = None;
        for slot in [moved, caught_up, idle] {
            let mut t = s.clone();
            t.slots = vec![slot];
            assert_eq!(track(&p, &t).unwrap()[0].stalled, None);
            assert!(!matches!(one(&p, &t).action, Action::Wait { breach: Breach::Stalled, .. } | Action::Drop { breach: Breach::Stalled, .. }));
        }
    }

    #[test]
    fn a_stream_is_stalled_only_while_its_progress_stands_still_with_wal_waiting_for_it() {
        // A walsender streams from slot "a"; its client reports its flush (and so moves
        // restart_lsn) only when a segment is complete: restart_lsn sits at 4 MB, as at
        // the worker's previous pass, in every case but one. The current WAL position is
        // 10 MB; max_stalled_time 10 s.
        let p = Policy { max_stalled_us: Some(10 * S), terminate_active: true, ..Policy::default() };
        let m = |n: i64| (n * MB) as u64;
        let stream = |sent, write, send_limit| Some(Sender { sent, write, flush: m(4), send_limit });
        struct Case {
            what: &'static str,
            active: bool,
            sender: Option<Sender>,
            /// The tracking's note before this pass.
            noted: Option<(u64, i64)>,
            /// restart_lsn at the worker's previous pass (4 MB now).
            restart_before: Option<u64>,
            /// The note after this pass, and whether it is a stall breach.
            note: Option<(u64, i64)>,
            breach: bool,
        }
        let cases = [
            Case {
                what: "an idle primary: all WAL sent and written, only flush (= restart_lsn) lags",
                active: true,
                sender: stream(m(10), m(10), m(10)),
                noted: None,
                restart_before: Some(m(4)),
                note: None,
                breach: false,
            },
            Case {
                what: "an idle primary whose insert position is a page header past the last record: nothing to send",
                active: true,
                sender: stream(m(10) - 24, m(10) - 24, m(10) - 24),
                noted: Some((m(10) - 24, NOW - 20 * S)),
                restart_before: Some(m(4)),
                note: None,
                breach: false,
            },
            Case {
                what: "write advancing while restart_lsn stays: noted afresh, not stalled",
                active: true,
                sender: stream(m(9), m(9), m(10)),
                noted: Some((m(8), NOW - 20 * S)),
                restart_before: Some(m(4)),
                note: Some((m(9), NOW)),
                breach: false,
            },
            Case {
                what: "sent advancing ahead of write (a client reading behind its socket buffers)",
                active: true,
                sender: stream(m(9), m(8), m(10)),
                noted: Some((m(8), NOW - 20 * S)),
                restart_before: Some(m(4)),
                note: Some((m(9), NOW)),
                breach: false,
            },
            Case {
                what: "nothing advancing while WAL was written: stalled since the note",
                active: true,
                sender: stream(m(8), m(8), m(10)),
                noted: Some((m(8), NOW - 20 * S)),
                restart_before: Some(m(4)),
                note: Some((m(8), NOW - 20 * S)),
                breach: true,
            },
            Case {
                what: "sent stuck ahead of a stopped client's write: stalled at sent",
                active: true,
                sender: stream(m(9), m(7), m(10)),
                noted: Some((m(9), NOW - 20 * S)),
                restart_before: Some(m(4)),
                note: Some((m(9), NOW - 20 * S)),
                breach: true,
            },
            Case {
                what: "behind, first seen so: noted from now",
                active: true,
                sender: stream(m(8), m(8), m(10)),
                noted: None,
                restart_before: Some(m(4)),
                note: Some((m(8), NOW)),
                breach: false,
            },
            Case {
                what: "behind, but restart_lsn moved since the previous pass: its client flushed, not noted",
                active: true,
                sender: stream(m(8), m(8), m(10)),
                noted: None,
                restart_before: Some(m(3)),
                note: None,
                breach: false,
            },
            Case {
                what: "behind, in a pass run by hand (no previous pass): not noted",
                active: true,
                sender: stream(m(8), m(8), m(10)),
                noted: None,
                restart_before: None,
                note: None,
                breach: false,
            },
            Case {
                what: "caught up after a stall: the note ends",
                active: true,
                sender: stream(m(10), m(9), m(10)),
                noted: Some((m(8), NOW - 20 * S)),
                restart_before: Some(m(4)),
                note: None,
                breach: false,
            },
            Case {
                what: "held by a backend that is no walsender: judged by restart_lsn, below the current position",
                active: true,
                sender: None,
                noted: Some((m(4), NOW - 20 * S)),
                restart_before: Some(m(4)),
                note: Some((m(4), NOW - 20 * S)),
                breach: true,
            },
            Case {
                what: "inactive: never stalled",
                active: false,
                sender: None,
                noted: Some((m(4), NOW - 20 * S)),
                restart_before: Some(m(4)),
                note: None,
                breach: false,
            },
        ];
        for c in cases {
            let a = SlotInfo { active_pid: c.active.then_some(7), restart_lsn: Some(m(4)), sender: c.sender, ..slot("a") };
            let mut s = snap(vec![a], vec![lease("a", 3600 * S, 3600 * S)]);
            s.seen = vec![Seen { slot_name: "a".into(), first_seen: NOW - 100 * S, inactive_since: (!c.active).then_some(NOW - S), dropping: None, stalled: c.noted }].into();
            if let Some(r) = c.restart_before {
                s.restart_before.insert("a".into(), r);
            }
            let note = track(&p, &s).map_or(c.noted, |seen| seen[0].stalled);
            assert_eq!(note, c.note, "{}", c.what);
            // the pass judges the tracking as written
            Rc::make_mut(&mut s.seen)[0].stalled = note;
            let d = one(&p, &s);
            assert_eq!(dropped(&d) == Some(Breach::Stalled), c.breach, "{}: {d:#?}", c.what);
            if c.breach {
                assert_eq!(d.state, "stalled", "{}", c.what);
                match &d.action {
                    Action::Drop { reason, terminate: Some(7), .. } => assert!(reason.contains("its consumer has not advanced for 20s while WAL waits for it"), "{reason}"),
                    other => panic!("{}: {other:?}", c.what),
                }
            }
            // the worker wakes at a stall's deadline, and only for a stall still current
            let due = next_due(&p, &s, &decide(&p, &s));
            match note {
                Some((_, since)) if !c.breach => assert_eq!(due, Some(since + 10 * S + 1 - NOW), "{}", c.what),
                _ => assert!(due.is_none_or(|d| d > 10 * S), "{}: due {due:?}", c.what),
            }
        }
    }

    #[test]
    fn a_slot_that_took_a_leased_name_is_never_dropped_by_the_lease() {
        let mut logical = slot("relog");
        logical.physical = false;
        let d = one(&Policy::default(), &snap(vec![logical], vec![lease("relog", 3600 * S, -S)]));
        assert_eq!(d.state, "slot_replaced");
        assert!(!d.in_scope);
        match &d.action {
            Action::EndLease { reason } => assert!(reason.contains("it is a logical slot"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let mut temp = slot("retemp");
        temp.temporary = true;
        let d = one(&Policy::default(), &snap(vec![temp], vec![lease("retemp", 3600 * S, -S)]));
        assert!(matches!(d.action, Action::EndLease { .. }), "{d:?}");
        // the lease's own physical slot: dropped as usual
        assert_eq!(dropped(&one(&Policy::default(), &snap(vec![slot("mine")], vec![lease("mine", 3600 * S, -S)]))), Some(Breach::Expired));
    }

    #[test]
    fn slot_without_reserved_wal_retains_nothing() {
        let mut s = slot("a");
        s.restart_lsn = None;
        let p = Policy { max_retained_wal: Some(0), ..Policy::default() };
        let d = one(&p, &snap(vec![s], vec![lease("a", S, 3600 * S)]));
        assert_eq!(d.action, Action::None);
        assert_eq!(d.retained_bytes, None);
    }

    #[test]
    fn restart_lsn_ahead_of_current_counts_as_zero() {
        let mut s = slot("a");
        s.restart_lsn = Some(20 * MB as u64);
        let p = Policy { max_retained_wal: Some(0), ..Policy::default() };
        let d = one(&p, &snap(vec![s], vec![lease("a", S, 3600 * S)]));
        assert_eq!(d.retained_bytes, Some(0));
        assert_eq!(d.action, Action::None);
    }

    #[test]
    fn age_limit_counts_from_lease_or_first_seen() {
        let p = Policy { max_slot_age_us: Some(100 * S), scope: Scope::Physical, ..Policy::default() };
        let d = one(&p, &snap(vec![slot("a")], vec![lease("a", 101 * S, 3600 * S)]));
        assert_eq!(dropped(&d), Some(Breach::Age));
        let d = one(&p, &snap(vec![slot("a")], vec![lease("a", 100 * S, 3600 * S)]));
        assert_eq!(d.action, Action::None, "exactly at the limit");
        let mut s = snap(vec![slot("u")], vec![]);
        s.seen = vec![Seen { slot_name: "u".into(), first_seen: NOW - 200 * S, inactive_since: None, dropping: None, stalled: None }].into();
        assert_eq!(dropped(&one(&p, &s)), Some(Breach::Age));
        // never seen before: no age yet, so no age breach
        assert_eq!(one(&p, &snap(vec![slot("u")], vec![])).action, Action::None);
    }

    #[test]
    fn inactivity_limit_uses_tracked_inactive_since() {
        let p = Policy { max_inactive_us: Some(60 * S), ..Policy::default() };
        let mut s = snap(vec![slot("a")], vec![lease("a", 3600 * S, 3600 * S)]);
        s.seen = vec![Seen { slot_name: "a".into(), first_seen: NOW - 3600 * S, inactive_since: Some(NOW - 61 * S), dropping: None, stalled: None }].into();
        let d = one(&p, &s);
        assert_eq!(dropped(&d), Some(Breach::Inactive));
        assert_eq!(d.inactive_us, Some(61 * S));
        Rc::make_mut(&mut s.seen)[0].inactive_since = Some(NOW - 60 * S);
        assert_eq!(one(&p, &s).action, Action::None);
        // an active slot is never inactive, whatever the record says
        Rc::make_mut(&mut s.seen)[0].inactive_since = Some(NOW - 600 * S);
        s.slots[0].active_pid = Some(7);
        let d = one(&p, &s);
        assert_eq!(d.action, Action::None);
        assert_eq!(d.inactive_us, None);
    }

    #[test]
    fn scope_leased_never_touches_unleased_slots() {
        let p = Policy { max_retained_wal: Some(MB), max_slot_age_us: Some(S), ..Policy::default() };
        let mut s = snap(vec![slot("standby1")], vec![]);
        s.seen = vec![Seen { slot_name: "standby1".into(), first_seen: 0, inactive_since: Some(0), dropping: None, stalled: None }].into();
        let d = one(&p, &s);
        assert!(!d.in_scope);
        assert_eq!(d.state, "out_of_scope");
        assert_eq!(d.scope_reason, "not leased (scope = leased)");
        assert_eq!(d.action, Action::None);
    }

    #[test]
    fn scope_physical_covers_unleased_physical_not_logical() {
        let p = Policy { max_retained_wal: Some(MB), scope: Scope::Physical, ..Policy::default() };
        let mut logical = slot("sub");
        logical.physical = false;
        let d = decide(&p, &snap(vec![slot("phys"), logical], vec![]));
        assert_eq!(dropped(&d[0]), Some(Breach::Retained));
        assert_eq!(d[1].slot_name, "sub");
        assert!(!d[1].in_scope);
        assert_eq!(d[1].action, Action::None);
    }

    #[test]
    fn scope_all_covers_logical_slots() {
        let p = Policy { max_retained_wal: Some(MB), scope: Scope::All, ..Policy::default() };
        let mut logical = slot("sub");
        logical.physical = false;
        assert_eq!(dropped(&one(&p, &snap(vec![logical], vec![]))), Some(Breach::Retained));
    }

    #[test]
    fn exclude_wins_over_every_scope_and_lease() {
        for scope in [Scope::Leased, Scope::Physical, Scope::All] {
            let p = Policy {
                max_retained_wal: Some(MB),
                scope,
                exclude: Some(Regex::new("^standby_").unwrap()),
                ..Policy::default()
            };
            let d = decide(&p, &snap(vec![slot("standby_1"), slot("x")], vec![lease("standby_1", S, -S)]));
            assert!(!d[0].in_scope, "{scope:?}");
            assert_eq!(d[0].scope_reason, "excluded by pgslotguard.exclude");
            assert_eq!(d[0].action, Action::None);
            assert_eq!(d[1].in_scope, scope != Scope::Leased);
        }
    }

    #[test]
    fn temporary_slots_are_never_in_scope() {
        let mut t = slot("pg_basebackup_123");
        t.temporary = true;
        let p = Policy { max_retained_wal: Some(0), scope: Scope::All, ..Policy::default() };
        let d = one(&p, &snap(vec![t], vec![]));
        assert!(!d.in_scope);
        assert_eq!(d.action, Action::None);
    }

    #[test]
    fn a_slot_synchronized_from_the_primary_is_never_in_scope_whatever_the_scope_or_lease() {
        let mut t = slot("failover_sub");
        t.synced = true;
        t.physical = false;
        t.temporary = true;
        for scope in [Scope::Leased, Scope::Physical, Scope::All] {
            let p = Policy { max_retained_wal: Some(0), max_slot_age_us: Some(1), max_inactive_us: Some(1), scope, ..Policy::default() };
            let d = one(&p, &snap(vec![t.clone()], vec![]));
            assert!(!d.in_scope, "{scope:?}");
            assert_eq!(d.scope_reason, "synchronized from the primary (synced)");
            assert_eq!(d.action, Action::None);
        }
    }

    #[test]
    fn core_s_own_slots_are_never_in_scope_whatever_the_scope_limits_or_lease() {
        // PostgreSQL 19's conflict detection slot (physical, xmin held back on purpose,
        // inactive) and a REPACK slot (logical, temporary, active), far past every limit.
        let mut cd = slot("pg_conflict_detection");
        cd.system = Some(SystemSlot::ConflictDetection);
        cd.xmin = Some(10);
        let mut rp = slot("pg_repack_4242");
        rp.system = Some(SystemSlot::Repack);
        rp.physical = false;
        rp.active_pid = Some(4242);
        rp.catalog_xmin = Some(10);
        for scope in [Scope::Leased, Scope::Physical, Scope::All] {
            let p = Policy {
                max_retained_wal: Some(0),
                max_slot_age_us: Some(1),
                max_inactive_us: Some(1),
                max_xmin_age: Some(1),
                terminate_active: true,
                scope,
                ..Policy::default()
            };
            // Leased too: a lease taken on 18 of a slot of that name, before an upgrade. (A
            // REPACK slot is never leased: its name is new, and a lease's own slot of that
            // name lives in the other pool.)
            for leases in [vec![], vec![lease("pg_conflict_detection", S, -S)]] {
                // Their horizons 10,000 transactions back: an ordinary slot out of scope is
                // named for it (horizon::name_out_of_scope_slot); core's are not.
                let d = decide(&p, &Snapshot { next_xid: 10_010, ..snap(vec![cd.clone(), rp.clone()], leases) });
                for (d, why) in d.iter().zip(["conflict detection slot of retain_dead_tuples (core's)", "REPACK (CONCURRENTLY)'s own slot (core's)"]) {
                    assert!(!d.in_scope, "{scope:?} {}", d.slot_name);
                    assert_eq!(d.scope_reason, why);
                    assert_eq!(d.action, Action::None, "{scope:?} {}", d.slot_name);
                }
            }
        }
    }

    #[test]
    fn hard_breach_on_active_slot_waits_without_terminate_active() {
        let mut s = slot("a");
        s.active_pid = Some(99);
        let p = Policy { max_retained_wal: Some(MB), ..Policy::default() };
        let d = one(&p, &snap(vec![s.clone()], vec![lease("a", S, 3600 * S)]));
        assert!(matches!(d.action, Action::Wait { breach: Breach::Retained, .. }));
        assert_eq!(d.state, "over_retained");
        let p = Policy { terminate_active: true, ..p };
        let d = one(&p, &snap(vec![s], vec![lease("a", S, 3600 * S)]));
        match d.action {
            Action::Drop { breach: Breach::Retained, terminate: Some(99), reason } => {
                assert!(reason.contains("PID 99 terminated"), "{reason}")
            }
            other => panic!("expected terminate+drop, got {other:?}"),
        }
    }

    #[test]
    fn retained_breach_takes_priority_over_expiry() {
        let p = Policy { max_retained_wal: Some(MB), ..Policy::default() };
        let d = one(&p, &snap(vec![slot("a")], vec![lease("a", 3600 * S, -S)]));
        assert_eq!(dropped(&d), Some(Breach::Retained));
    }

    #[test]
    fn lease_without_slot_is_ended() {
        let d = one(&Policy::default(), &snap(vec![], vec![lease("gone", S, 3600 * S)]));
        assert!(!d.slot_exists);
        assert_eq!(d.state, "slot_missing");
        assert!(matches!(d.action, Action::EndLease { .. }));
    }

    #[test]
    fn dry_run_does_not_change_the_decision() {
        // dry_run is applied where actions are carried out (enforce.rs), so the views show
        // what a real pass would do.
        let p = Policy { dry_run: true, ..Policy::default() };
        let d = one(&p, &snap(vec![slot("a")], vec![lease("a", 3600 * S, -S)]));
        assert_eq!(dropped(&d), Some(Breach::Expired));
    }

    #[test]
    fn nearest_limit_is_the_most_used_one() {
        let p = Policy { max_retained_wal: Some(11 * MB), ..Policy::default() };
        let d = one(&p, &snap(vec![slot("a")], vec![lease("a", 60 * S, 3600 * S)]));
        assert_eq!(d.nearest_limit().as_deref(), Some("retained WAL 10 MB of 11 MB"));
    }

    #[test]
    fn names_come_in_byte_order_however_long_their_shared_prefix() {
        let names = [
            "b", "abcdefghijklmnopr", "", "bench_p_9", "a_", "abcdefghijkl", "abcdefghijklmnopq", "é", "a", "abcdefghijklmnop",
            "bench_p_10", "ab", "abcdefghijk", "patroni_member_2", "patroni_member_10",
        ];
        let order = name_order(&names, |n| n);
        let got: Vec<&str> = order.iter().map(|&i| names[i]).collect();
        let mut want = names.to_vec();
        want.sort();
        assert_eq!(got, want);
        assert!(name_order(&[] as &[&str], |n| n).is_empty());
    }

    #[test]
    fn decisions_come_out_sorted_by_name() {
        let d = decide(&Policy::default(), &snap(vec![slot("b"), slot("a")], vec![lease("c", 0, 10)]));
        let names: Vec<_> = d.iter().map(|d| d.slot_name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    // ---- the free-space floor, through judge() ----

    const SEG: i64 = 16 * MB;

    /// Insert position at segment 100; pg_wal holds 60 segments; 1 GB filesystem with
    /// `free` bytes free; max_wal_size 4 segments.
    fn disk_snap(free: i64, slots: Vec<SlotInfo>, leases: Vec<Lease>) -> Snapshot {
        let mut s = snap(slots, leases);
        s.current_lsn = (100 * SEG) as u64;
        s.disk = Some(WalDisk {
            free,
            total: 1024 * MB,
            pg_wal: 60 * SEG,
            insert_lsn: (100 * SEG) as u64,
            segment_size: SEG,
            wal_keep: 0,
            max_wal: 4 * SEG,
            max_slot_keep: None,
            unarchived: None,
        });
        s
    }
    fn pinned(name: &str, segs_back: i64) -> SlotInfo {
        SlotInfo { restart_lsn: Some(((100 - segs_back) * SEG) as u64), ..slot(name) }
    }
    fn floor(bytes: i64) -> Policy {
        Policy { min_free_wal: Some(Floor::Bytes(bytes)), ..Policy::default() }
    }
    fn find<'a>(v: &'a Verdict, name: &str) -> &'a Decision {
        v.decisions.iter().find(|d| d.slot_name == name).unwrap()
    }

    #[test]
    fn floor_drops_the_oldest_leased_slot_only() {
        let s = disk_snap(
            50 * MB,
            vec![pinned("old", 50), pinned("young", 10)],
            vec![lease("old", S, 3600 * S), lease("young", S, 3600 * S)],
        );
        let v = judge(&floor(100 * MB), &s);
        let old = find(&v, "old");
        assert_eq!(dropped(old), Some(Breach::Space));
        assert_eq!(old.state, "below_floor");
        match &old.action {
            Action::Drop { reason, .. } => {
                assert!(reason.contains("below pgslotguard.min_free_wal_space (100 MB)"), "{reason}");
                assert!(reason.contains("dropping it frees about 640 MB of pg_wal"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // a checkpoint alone frees 6 segments; without "old" the horizon is "young"
        assert_eq!(old.releases_bytes, Some(40 * SEG));
        assert_eq!(find(&v, "young").action, Action::None);
        assert_eq!(v.disk.as_ref().unwrap().freed, 46 * SEG);
    }

    #[test]
    fn without_a_floor_nothing_is_dropped_for_space_but_frees_is_shown() {
        let s = disk_snap(10 * MB, vec![pinned("old", 50)], vec![lease("old", S, 3600 * S)]);
        let v = judge(&Policy::default(), &s);
        let d = find(&v, "old");
        assert_eq!(d.action, Action::None);
        assert_eq!(d.frees_bytes, Some(50 * SEG));
    }

    #[test]
    fn floor_never_drops_an_unleased_slot_under_scope_leased_and_names_it() {
        let s = disk_snap(10 * MB, vec![pinned("standby", 55), pinned("orphan", 40)], vec![lease("orphan", S, 3600 * S)]);
        let v = judge(&floor(200 * MB), &s);
        assert_eq!(find(&v, "orphan").action, Action::None, "dropping the orphan frees nothing");
        match &find(&v, "standby").action {
            Action::Wait { breach: Breach::Space, reason } => {
                assert!(reason.contains("not dropped: not leased (scope = leased)"), "{reason}");
                assert!(reason.contains("holds back 880 MB of pg_wal that the floor needs"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn floor_never_drops_an_excluded_slot() {
        let p = Policy { exclude: Some(Regex::new("^keep").unwrap()), scope: Scope::All, ..floor(200 * MB) };
        let s = disk_snap(10 * MB, vec![pinned("keep_me", 55)], vec![]);
        let v = judge(&p, &s);
        assert!(matches!(find(&v, "keep_me").action, Action::Wait { breach: Breach::Space, .. }));
    }

    #[test]
    fn the_excluded_slot_in_the_way_is_named_even_with_a_droppable_slot_just_younger() {
        // scope = all; the excluded standby slot is the oldest, and a leased slot sits a
        // few bytes after it, in the same segment: dropping the leased one frees nothing
        // while the excluded one stays, and it is the excluded one that is in the way.
        let p = Policy { exclude: Some(Regex::new("^standby").unwrap()), scope: Scope::All, ..floor(200 * MB) };
        let mut young = pinned("orphan", 55);
        young.restart_lsn = young.restart_lsn.map(|r| r + 4096);
        let s = disk_snap(10 * MB, vec![pinned("standby_1", 55), young], vec![lease("orphan", S, 3600 * S)]);
        let v = judge(&p, &s);
        assert_eq!(find(&v, "orphan").action, Action::None, "dropping it alone frees nothing");
        match &find(&v, "standby_1").action {
            Action::Wait { breach: Breach::Space, reason } => {
                assert!(reason.contains("not dropped: excluded by pgslotguard.exclude"), "{reason}");
                assert!(reason.contains("holds back"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(v.disk.unwrap().stuck.is_none(), "the slot in the way is named, not \"something else\"");
    }

    #[test]
    fn wal_waiting_for_the_archiver_is_no_reason_to_drop_a_slot_and_is_named() {
        // A failing archiver: WAL from 60 segments back is not archived; the leased slot
        // pins from 50 back. Dropping it frees nothing: no drop, and the archiver is named.
        let mut s = disk_snap(10 * MB, vec![pinned("nightly", 50)], vec![lease("nightly", S, 3600 * S)]);
        s.disk.as_mut().unwrap().unarchived = Some((40 * SEG) as u64);
        let v = judge(&floor(100 * MB), &s);
        assert_eq!(find(&v, "nightly").action, Action::None);
        assert_eq!(find(&v, "nightly").frees_bytes, Some(0));
        let d = v.disk.unwrap();
        assert_eq!(d.freed, 0, "a checkpoint frees nothing while the archiver holds the WAL");
        let stuck = d.stuck.unwrap();
        assert!(stuck.contains("waits for the archiver") && stuck.contains("pg_stat_archiver"), "{stuck}");
        // Archived up to just past the slot: the slot is what holds the WAL, and goes.
        let mut s = disk_snap(10 * MB, vec![pinned("nightly", 50)], vec![lease("nightly", S, 3600 * S)]);
        s.disk.as_mut().unwrap().unarchived = Some((95 * SEG) as u64);
        let v = judge(&floor(100 * MB), &s);
        assert_eq!(dropped(find(&v, "nightly")), Some(Breach::Space));
    }

    #[test]
    fn a_floor_the_filesystem_cannot_meet_is_reported_and_drops_nothing() {
        // a 1 GB filesystem and a 2 GB floor: said once, and nothing dropped for it
        let s = disk_snap(500 * MB, vec![pinned("fresh", 1)], vec![lease("fresh", S, 3600 * S)]);
        let p = Policy { warn_fraction: 0.8, ..floor(2048 * MB) };
        let v = judge(&p, &s);
        assert_eq!(find(&v, "fresh").action, Action::None);
        let stuck = v.disk.clone().unwrap().stuck.unwrap();
        assert!(stuck.contains("(2048 MB) is not below the size of the filesystem of pg_wal (1024 MB)"), "{stuck}");
        assert!(v.disk.as_ref().unwrap().plan.is_none());
        assert!(warnings(&p, &v, 0.8).is_empty(), "no share of a space the floor does not leave");
        // a floor that leaves room: the share used is a sane percentage, at most 100%
        let p = Policy { warn_fraction: 0.8, ..floor(1000 * MB) };
        let s = disk_snap(500 * MB, vec![], vec![]);
        let w = warnings(&p, &judge(&p, &s), 0.8);
        assert!(w[0].words().ends_with(": 100% of the space it leaves is used"), "{}", w[0].words());
    }

    #[test]
    fn floor_drops_an_active_slot_only_with_terminate_active() {
        let mut a = pinned("busy", 50);
        a.active_pid = Some(77);
        let s = disk_snap(10 * MB, vec![a], vec![lease("busy", S, 3600 * S)]);
        let v = judge(&floor(100 * MB), &s);
        match &find(&v, "busy").action {
            Action::Wait { breach: Breach::Space, reason } => {
                assert!(reason.contains("active, and pgslotguard.terminate_active is off"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let p = Policy { terminate_active: true, ..floor(100 * MB) };
        match &find(&judge(&p, &s), "busy").action {
            Action::Drop { breach: Breach::Space, terminate: Some(77), .. } => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn floor_that_no_drop_can_restore_is_reported() {
        // 8 segments in pg_wal, all live: nothing to free, and no slot to blame
        let mut s = disk_snap(10 * MB, vec![pinned("a", 2)], vec![lease("a", S, 3600 * S)]);
        s.disk.as_mut().unwrap().pg_wal = 8 * SEG;
        s.disk.as_mut().unwrap().max_wal = 64 * SEG;
        let v = judge(&floor(100 * MB), &s);
        assert_eq!(find(&v, "a").action, Action::None);
        let stuck = v.disk.unwrap().stuck.unwrap();
        assert!(stuck.contains("no slot the guard may drop holds back more"), "{stuck}");
    }

    #[test]
    fn a_slot_dropped_for_another_limit_counts_toward_the_floor() {
        let s = disk_snap(
            50 * MB,
            vec![pinned("old", 50), pinned("young", 10)],
            vec![lease("old", 3600 * S, -S), lease("young", S, 3600 * S)],
        );
        let v = judge(&floor(100 * MB), &s);
        assert_eq!(dropped(find(&v, "old")), Some(Breach::Expired));
        assert_eq!(find(&v, "young").action, Action::None);
        assert_eq!(find(&v, "old").releases_bytes, Some(40 * SEG));
    }

    #[test]
    fn outcome_words_are_distinct() {
        let words: HashSet<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(words.len(), Outcome::ALL.len());
        assert!(Outcome::ALL.iter().filter(|o| o.is_guard_drop()).all(|o| o.as_str().ends_with("_drop")));
        assert!(!Outcome::WouldDrop.is_guard_drop());
    }

    #[test]
    fn tracking_sees_new_slots_now_and_keeps_what_it_knew() {
        let mut a = slot("a");
        a.active_pid = Some(1);
        let mut s = snap(vec![a, slot("b"), slot("c")], vec![]);
        s.seen = vec![
            Seen { slot_name: "b".into(), first_seen: 5, inactive_since: Some(7), dropping: None, stalled: None },
            Seen { slot_name: "c".into(), first_seen: 5, inactive_since: None, dropping: None, stalled: None },
            Seen { slot_name: "gone".into(), first_seen: 5, inactive_since: None, dropping: None, stalled: None },
            Seen {
                slot_name: "dropped".into(),
                first_seen: 5,
                inactive_since: None,
                dropping: Some(DropIntent { action: "expire_drop".into(), reason: "r".into(), at: 0, xid: None }),
                stalled: None,
            },
        ]
        .into();
        let t = track(&Policy::default(), &s).expect("changed");
        let by: HashMap<&str, &Seen> = t.iter().map(|x| (x.slot_name.as_str(), x)).collect();
        assert_eq!((by["a"].first_seen, by["a"].inactive_since), (NOW, None));
        assert_eq!((by["b"].first_seen, by["b"].inactive_since), (5, Some(7)));
        assert_eq!(by["c"].inactive_since, Some(NOW), "went inactive now");
        assert!(!by.contains_key("gone"));
        assert!(by.contains_key("dropped"), "a drop intent stays until its drop is recorded");
        // the next pass over the same slots finds nothing to change
        let mut again = snap(s.slots.clone(), vec![]);
        again.seen = Rc::new(t.into_iter().filter(|x| x.slot_name != "dropped").collect());
        assert_eq!(track(&Policy::default(), &again), None);
    }

    #[test]
    fn core_inactive_since_seeds_the_tracking_of_a_slot_first_seen_idle() {
        let mut a = slot("a");
        a.core_inactive_since = Some(NOW - 300 * S);
        let mut future = slot("b");
        future.core_inactive_since = Some(NOW + S);
        let t = track(&Policy::default(), &snap(vec![a, future, slot("c")], vec![])).expect("new slots");
        let by: HashMap<&str, &Seen> = t.iter().map(|x| (x.slot_name.as_str(), x)).collect();
        assert_eq!(by["a"].inactive_since, Some(NOW - 300 * S), "idle since core says");
        assert_eq!(by["b"].inactive_since, Some(NOW), "never later than now");
        assert_eq!(by["c"].inactive_since, Some(NOW), "15: no core value, idle from now");
    }

    #[test]
    fn a_slot_held_by_a_clock_jump_is_not_dropped_for_time_but_still_for_wal() {
        let p = Policy { max_retained_wal: Some(5 * MB), max_slot_age_us: Some(S), ..Policy::default() };
        let mut s = snap(vec![slot("a")], vec![lease("a", 10 * S, -S)]);
        s.slots[0].restart_lsn = Some(8 * MB as u64);
        s.held.insert("a".into());
        let d = one(&p, &s);
        assert_eq!(d.action, Action::None, "expired and too old on the wall clock only");
        s.slots[0].restart_lsn = Some(0);
        assert!(matches!(one(&p, &s).action, Action::Drop { breach: Breach::Retained, .. }));
    }

    #[test]
    fn next_due_is_the_nearest_expiry_age_or_inactivity_ahead() {
        let p = Policy { max_slot_age_us: Some(100 * S), max_inactive_us: Some(50 * S), ..Policy::default() };
        let mut s = snap(vec![slot("a"), slot("b")], vec![lease("a", 10 * S, 30 * S), lease("b", 95 * S, 3600 * S)]);
        s.seen = vec![Seen { slot_name: "b".into(), first_seen: NOW - 95 * S, inactive_since: Some(NOW - 40 * S), dropping: None, stalled: None }].into();
        let d = decide(&p, &s);
        // a: expires in 30 s (age 90 s ahead); b: age limit in 5 s, inactivity in 10 s
        assert_eq!(next_due(&p, &s, &d), Some(5 * S + 1));
        // without limits, the expiry of a
        assert_eq!(next_due(&Policy::default(), &s, &decide(&Policy::default(), &s)), Some(30 * S));
    }

    #[test]
    fn nothing_is_due_for_slots_out_of_scope_acted_on_or_waiting() {
        let p = Policy { max_slot_age_us: Some(100 * S), ..Policy::default() };
        // unleased under scope = leased; an expired lease (dropped this pass); an expired
        // active one (waits for its walsender, not for a time)
        let mut active = slot("busy");
        active.active_pid = Some(3);
        let s = snap(vec![slot("free"), slot("gone"), active], vec![lease("gone", S, -S), lease("busy", S, -S)]);
        assert_eq!(next_due(&p, &s, &decide(&p, &s)), None);
    }
}
