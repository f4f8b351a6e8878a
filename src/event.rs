//! An event: what the guard or a lease call did to a slot, as it is recorded (the event
//! table, or a standby's ring: src/state.rs) and sent to listeners (src/notify.rs). A plain
//! value, below both.

use crate::policy::Outcome;

/// One event, before it is recorded.
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
    /// Guard drops: the slot's restart_lsn at the drop (the first WAL its consumer will
    /// never get); sent in the notification (the event's reason says it too).
    pub restart_lsn: Option<u64>,
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
            restart_lsn: None,
        }
    }
}

