//! One error type for the whole extension, and the one place where each error gets its
//! SQLSTATE, message and HINT. Functions inside return `Result<T, GuardError>`; the SQL
//! boundary calls [`GuardError::report`].

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("{0} must not be NULL")]
    NullArgument(&'static str),
    #[error("replication slot name \"\" is too short")]
    SlotNameTooShort,
    #[error("replication slot name \"{0}\" is too long")]
    SlotNameTooLong(String),
    #[error("replication slot name \"{0}\" contains invalid character")]
    SlotNameInvalid(String),
    #[error("holder is too long ({0} bytes, at most 1024)")]
    HolderTooLong(usize),
    #[error("holder must not contain control characters")]
    HolderControl,
    #[error("invalid max_retained \"{0}\": {1}")]
    BadSize(String, String),
    #[error("lease time for replication slot \"{slot}\" must be positive, got {ttl}")]
    TtlNotPositive { slot: String, ttl: String },
    #[error("lease time {ttl} for replication slot \"{slot}\" exceeds pgslotguard.max_ttl ({max})")]
    TtlTooLong { slot: String, ttl: String, max: String },
    #[error("lease time {ttl} for replication slot \"{slot}\" is out of range")]
    TtlOutOfRange { slot: String, ttl: String },
    #[error("pgslotguard.default_ttl ({default}) exceeds pgslotguard.max_ttl ({max})")]
    DefaultTtlAboveMax { default: String, max: String },
    #[error("replication slot \"{0}\" already exists")]
    SlotExists(String),
    #[error("replication slot \"{slot}\" is already leased until {until}")]
    AlreadyLeased { slot: String, until: String },
    /// Leased by a role whose lease the caller may not see: no owner, no time.
    #[error("replication slot \"{0}\" is already leased")]
    LeasedByAnother(String),
    #[error("no lease for replication slot \"{0}\"")]
    NoLease(String),
    #[error("replication slot \"{0}\" does not exist")]
    NoSlot(String),
    #[error("replication slot \"{slot}\" of lease no longer exists")]
    LeasedSlotGone { slot: String },
    #[error("replication slot name \"{slot}\" matches pgslotguard.exclude ('{pattern}'): the guard never touches it, so a lease on it would never be enforced")]
    ExcludedName { slot: String, pattern: String },
    #[error("replication slot \"{0}\" is a logical slot")]
    LogicalSlot(String),
    #[error("replication slot \"{0}\" is temporary")]
    TemporarySlot(String),
    /// One of core's own slots (19): `what` it is; `reserved_name` for the conflict
    /// detection slot, whose name core reserves.
    #[error("replication slot \"{slot}\" is PostgreSQL's own: the {what}")]
    CoreSlot { slot: String, what: &'static str, reserved_name: bool },
    #[error("replication slot \"{slot}\" is active for PID {pid}")]
    SlotActive { slot: String, pid: i32, action: &'static str },
    #[error("permission denied to {what}")]
    PermissionDenied { what: String, hint: &'static str },
    #[error("{what} {asked} for replication slot \"{slot}\" is above {guc} ({global})")]
    LimitRaise { slot: String, what: &'static str, asked: String, guc: &'static str, global: String },
    #[error("max_xmin_age for replication slot \"{slot}\" must be between 1 and 2000000000 transactions, got {value}")]
    XminLimitOutOfRange { slot: String, value: i64 },
    #[error("{what} for replication slot \"{slot}\" must be positive, got {value}")]
    LimitNotPositive { slot: String, what: &'static str, value: String },
    #[error("could not measure the filesystem of pg_wal: {0}")]
    Disk(String),
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("replication slot \"{0}\" is being dropped by the guard")]
    BeingDropped(String),
    #[error("pgslotguard is not loaded through shared_preload_libraries")]
    NotPreloaded,
    #[error("pgslotguard's store is full: it has room for {capacity} slot names (twice max_replication_slots)")]
    StoreFull { capacity: usize },
    #[error("pgslotguard's store: {0}")]
    StoreIo(String),
    #[error("the lease of replication slot \"{slot}\" changed before this transaction committed: {why}")]
    LeaseChanged { slot: String, why: String },
    #[error("pgslotguard's store has no record of replication slot \"{slot}\" in memory although its file is there: it did not fit at start")]
    StoreNotLoaded { slot: String },
    #[error("pgslotguard's store is not whole: {0} record(s) holding a lease, a change in flight or a drop intent did not fit in shared memory at start")]
    StoreNotWhole(u32),
    #[error("role \"{role}\" already holds {count} lease(s), the most pgslotguard.max_leases_per_role allows ({limit})")]
    TooManyLeases { role: String, count: usize, limit: i32 },
    #[error("only {free} replication slot(s) are free, and pgslotguard.reserved_slots keeps {reserved} for roles without a lease")]
    SlotsReserved { free: i32, reserved: i32 },
    #[error("permission denied to adopt replication slot \"{slot}\": it is active for PID {pid}, which this role may not terminate")]
    MayNotTerminate { slot: String, pid: i32 },
    #[error("too many changes to the lease of replication slot \"{0}\" in nested subtransactions of one transaction")]
    TooManyNested(String),
    #[error("output plugin name \"{0}\" is not valid")]
    BadPlugin(String),
    #[error("{0} is only for a logical slot")]
    LogicalOnly(&'static str),
    #[error("failover slots need PostgreSQL 17 or later")]
    NoFailover,
    #[error("enforcement pass failed: {0}")]
    Pass(String),
    #[error("{0}")]
    Spi(#[from] pgrx::spi::Error),
}

impl GuardError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use GuardError::*;
        use PgSqlErrorCode::*;
        match self {
            NullArgument(_) => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            SlotNameTooShort | SlotNameInvalid(_) => ERRCODE_INVALID_NAME,
            SlotNameTooLong(_) => ERRCODE_NAME_TOO_LONG,
            HolderTooLong(_) => ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
            HolderControl => ERRCODE_INVALID_PARAMETER_VALUE,
            BadSize(..) | LimitNotPositive { .. } | XminLimitOutOfRange { .. } | TtlNotPositive { .. } | TtlTooLong { .. } | TtlOutOfRange { .. } | DefaultTtlAboveMax { .. } => {
                ERRCODE_INVALID_PARAMETER_VALUE
            }
            SlotExists(_) | AlreadyLeased { .. } | LeasedByAnother(_) => ERRCODE_DUPLICATE_OBJECT,
            NoLease(_) | NoSlot(_) | LeasedSlotGone { .. } => ERRCODE_UNDEFINED_OBJECT,
            LogicalSlot(_) | TemporarySlot(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            // As core's own refusal of the reserved name (ReplicationSlotValidateName).
            CoreSlot { reserved_name: true, .. } => ERRCODE_RESERVED_NAME,
            CoreSlot { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            ExcludedName { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            SlotActive { .. } => ERRCODE_OBJECT_IN_USE,
            PermissionDenied { .. } | LimitRaise { .. } | MayNotTerminate { .. } => ERRCODE_INSUFFICIENT_PRIVILEGE,
            Disk(_) => ERRCODE_IO_ERROR,
            BeingDropped(_) => ERRCODE_OBJECT_IN_USE,
            NotUtf8(_) => ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            Pass(_) => ERRCODE_INTERNAL_ERROR,
            NotPreloaded => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            StoreFull { .. } => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            StoreIo(_) => ERRCODE_IO_ERROR,
            LeaseChanged { .. } => ERRCODE_T_R_SERIALIZATION_FAILURE,
            StoreNotLoaded { .. } | StoreNotWhole(_) => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            TooManyLeases { .. } | SlotsReserved { .. } => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            TooManyNested(_) => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            BadPlugin(_) | LogicalOnly(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            NoFailover => ERRCODE_FEATURE_NOT_SUPPORTED,
            Spi(_) => ERRCODE_INTERNAL_ERROR,
        }
    }

    pub fn hint(&self) -> String {
        use GuardError::*;
        match self {
            NullArgument(_) => "Pass a value.".into(),
            SlotNameTooShort | SlotNameInvalid(_) => {
                "Replication slot names may only contain lower case letters, numbers, and the underscore character.".into()
            }
            SlotNameTooLong(_) => "Replication slot names are at most 63 bytes long.".into(),
            HolderTooLong(_) => "Use a short label such as the host and job name.".into(),
            HolderControl => "Use a one-line label such as the host and job name, without newlines, tabs or escape characters.".into(),
            BadSize(..) => "Give a size above zero such as '512MB' or '50GB' (units: bytes, kB, MB, GB, TB, PB).".into(),
            TtlNotPositive { .. } => "Give an interval such as '2 hours'.".into(),
            TtlTooLong { .. } => "Take a shorter lease and renew it with backup_slot_renew(), or raise pgslotguard.max_ttl.".into(),
            TtlOutOfRange { .. } => "Give an interval such as '2 hours' or '3 days', within pgslotguard.max_ttl.".into(),
            DefaultTtlAboveMax { .. } => "Lower pgslotguard.default_ttl or raise pgslotguard.max_ttl, or pass a ttl to the call.".into(),
            SlotExists(_) => "Call backup_slot_lease() with adopt => true to put the existing slot under a lease, or choose another name.".into(),
            AlreadyLeased { .. } => "Renew it with backup_slot_renew(), or release it with backup_slot_release() first.".into(),
            LeasedByAnother(_) => "Choose another name: the lease belongs to another role.".into(),
            NoLease(_) => "SELECT * FROM pgslotguard.leases shows the leases that exist.".into(),
            NoSlot(_) => "Call backup_slot_lease() without adopt to create the slot.".into(),
            LeasedSlotGone { .. } => "The slot was dropped outside pgslotguard; the guard worker ends such leases at its next pass.".into(),
            LogicalSlot(_) => "Give plugin => ... to lease a new logical slot, or adopt => true to lease an existing one.".into(),
            ExcludedName { .. } => "Choose a name that pgslotguard.exclude does not match, or narrow pgslotguard.exclude (SELECT current_setting('pgslotguard.exclude')).".into(),
            TemporarySlot(_) => "A temporary slot ends with its session; it cannot be leased.".into(),
            CoreSlot { reserved_name: true, .. } => "PostgreSQL makes and keeps this slot while a subscription has retain_dead_tuples = true; it holds back xmin on purpose. Turn retain_dead_tuples off on the subscriptions (ALTER SUBSCRIPTION ... SET (retain_dead_tuples = false)) to have it dropped; pgslotguard never touches it.".into(),
            CoreSlot { .. } => "REPACK (CONCURRENTLY) holds this slot while it runs and drops it when it ends; pgslotguard never touches it.".into(),
            SlotActive { action, .. } => format!("Stop the client that streams from it before you {action} the slot, or call backup_slot_keep() to keep the slot and end the lease."),
            PermissionDenied { hint, .. } => (*hint).into(),
            LimitRaise { guc, .. } => format!("Only a superuser may give a lease a limit above {guc}; leave it NULL for the global limit."),
            LimitNotPositive { .. } => "Give an interval such as '30 min', or NULL for the global limit.".into(),
            XminLimitOutOfRange { .. } => "Give a number of transactions such as 100000000 (below autovacuum_freeze_max_age), or NULL for the global limit (pgslotguard.max_xmin_age).".into(),
            NotUtf8(_) => "pgslotguard reads its text arguments as UTF-8; in a SQL_ASCII database pass only ASCII or UTF-8 bytes (slot names are [a-z0-9_] anyway).".into(),
            BeingDropped(_) => "Its lease has ended; take a new lease once the slot is gone (pgslotguard.events records the drop).".into(),
            NotPreloaded => "Add pgslotguard to shared_preload_libraries and restart the server: leases are kept in shared memory and in pg_slotguard/ of the data directory.".into(),
            StoreFull { .. } => "Raise max_replication_slots (and restart), or release leases you no longer need.".into(),
            StoreIo(_) => "Check that the data directory's pg_slotguard/ is writable by the server and that its filesystem has space.".into(),
            LeaseChanged { .. } => "Nothing of this transaction was kept; retry it. SELECT * FROM pgslotguard.leases and pgslotguard.events show what happened.".into(),
            StoreNotLoaded { .. } | StoreNotWhole(_) => "Raise max_replication_slots back to what it was (the store has room for twice that many records) and restart the server; nothing on disk was changed meanwhile.".into(),
            TooManyLeases { .. } => "Release leases this role no longer needs, or have a superuser raise pgslotguard.max_leases_per_role.".into(),
            SlotsReserved { .. } => "Free a replication slot, or raise max_replication_slots (and restart); a superuser may lower pgslotguard.reserved_slots.".into(),
            MayNotTerminate { .. } => "Adopt it as the role that streams from it, as a member of pg_signal_backend, or as a superuser; or adopt it once it is inactive.".into(),
            TooManyNested(_) => "Change the lease fewer times in nested savepoints, or commit in between.".into(),
            BadPlugin(_) => "Name an output plugin installed on the server, such as pgoutput or test_decoding.".into(),
            LogicalOnly(_) => "Give plugin => 'pgoutput' (or another output plugin) to make a logical slot, or leave this option out.".into(),
            NoFailover => "Leave failover out on this server: slot synchronisation to standbys came with PostgreSQL 17.".into(),
            Pass(_) => "The server log has the details; the guard worker retries at its next pass.".into(),
            Disk(_) => "Check that the data directory's pg_wal (or the directory its symlink points to) is readable by the server.".into(),
            Spi(_) => "This is a bug in pgslotguard; please report it with the server log.".into(),
        }
    }

    /// Raise this error as a PostgreSQL ERROR. Never returns.
    pub fn report(self) -> ! {
        ErrorReport::new(self.sqlstate(), self.to_string(), "pgslotguard")
            .set_hint(self.hint())
            .report(PgLogLevel::ERROR);
        unreachable!("ERROR returned")
    }
}

/// Unwrap a result at the SQL boundary: the value, or an ERROR with SQLSTATE and HINT.
pub fn or_report<T>(r: Result<T, GuardError>) -> T {
    r.unwrap_or_else(|e| e.report())
}

/// The message of an error caught with `PgTryBuilder`.
pub fn caught_message(e: &pgrx::pg_sys::panic::CaughtError) -> String {
    use pgrx::pg_sys::panic::CaughtError::*;
    match e {
        PostgresError(r) | ErrorReport(r) | RustPanic { ereport: r, .. } => r.message().to_string(),
    }
}
