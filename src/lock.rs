//! The per-slot-name lock that serialises every lease operation and guard action on one
//! slot name, and that only pgslotguard can take.
//!
//! It is a heavyweight lock in PostgreSQL's lock manager, of type advisory, but with a
//! key that no SQL function can produce: `pg_advisory_lock()` and friends always set the
//! fourth key field to 1 (one bigint key) or 2 (two int4 keys), and this lock sets it to
//! [`FIELD4`]. So no role can take or hold it, and with it stall the guard (the advisory
//! lock pgslotguard used before could be taken by any role with CONNECT). It shows in
//! `pg_locks` as `locktype = 'advisory'`, `objsubid = 29543`.
//!
//! The guard worker never waits for it: `try_lock` fails at once when another
//! transaction holds it, and the pass skips that slot and retries at the next one. The SQL
//! functions wait for it at most [`API_WAIT_MS`] (a lease call of another session in an
//! open transaction holds it until that transaction ends), then fail with 55P03.
//! The lock is held until the end of the transaction (or subtransaction that aborts).

use crate::error::GuardError;
use pgrx::pg_sys;

/// The fourth key field: "sg". Never 1 or 2, the values SQL-level advisory locks use.
const FIELD4: u16 = 0x7367;
/// The third key field, a constant: "pgsg".
const FIELD3: u32 = 0x7067_7367;
/// Longest a SQL function waits for another transaction's lease operation on the same name.
pub const API_WAIT_MS: u64 = 5_000;
/// How often a waiting SQL function tries again.
const RETRY_MS: u64 = 10;

/// FNV-1a of the slot name: two names that collide only share a lock (a short wait or a
/// skipped pass for one of them), never a wrong result.
fn name_hash(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

fn tag(name: &str) -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        // SAFETY: MyDatabaseId is set once the backend is connected to its database, which
        // every caller (SQL function or connected worker) is.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: name_hash(name),
        locktag_field3: FIELD3,
        locktag_field4: FIELD4,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

/// Take the lock on `name` if it is free; never wait. True when taken (or already held
/// by this transaction).
pub fn try_lock(name: &str) -> bool {
    let t = tag(name);
    // SAFETY: `t` is a valid LOCKTAG on this stack frame; LockAcquire copies it. A
    // transaction-level lock (sessionLock = false) is released by the lock manager at
    // transaction or subtransaction abort and at commit, so nothing leaks on ERROR.
    let r = unsafe { pg_sys::LockAcquire(&t, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, false, true) };
    r != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// Take the lock on `name`, waiting at most [`API_WAIT_MS`] for another transaction to
/// finish its lease operation on the same name. Query cancel and statement_timeout
/// interrupt the wait.
pub fn lock_bounded(name: &str) -> Result<(), GuardError> {
    let mut waited = 0;
    loop {
        if try_lock(name) {
            return Ok(());
        }
        if waited >= API_WAIT_MS {
            return Err(GuardError::Busy { slot: name.into(), waited_ms: waited });
        }
        // SAFETY: pg_usleep only sleeps; interrupts are checked right after.
        unsafe { pg_sys::pg_usleep((RETRY_MS * 1000) as std::ffi::c_long) };
        pgrx::check_for_interrupts!();
        waited += RETRY_MS;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_cannot_be_made_by_sql_advisory_locks() {
        // pg_advisory_lock(bigint) sets field4 = 1, pg_advisory_lock(int, int) sets 2.
        assert!(FIELD4 != 1 && FIELD4 != 2);
    }

    #[test]
    fn name_hash_is_stable_and_spreads() {
        assert_eq!(name_hash(""), 0x811c_9dc5);
        assert_eq!(name_hash("a"), 0xe40c_292c);
        assert_ne!(name_hash("nightly"), name_hash("nightlz"));
    }
}
