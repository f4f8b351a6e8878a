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
    /// The owner role's OID: the events view shows a role the events of its own leases by
    /// OID, never by a name a new role could take.
    pub lease_owner_oid: Option<u32>,
    /// The holder of the slot's lease when the event was recorded.
    pub lease_holder: Option<&'a str>,
    /// The lease the event is about (`store::LeaseRec::lease_id`).
    pub lease_id: Option<i64>,
    /// Drops: the WAL the drop lets the next checkpoint remove (projected).
    /// Checkpoints: the bytes pg_wal shrank by (measured).
    pub freed_bytes: Option<i64>,
    /// Checkpoints: the size of pg_wal measured after it.
    pub pg_wal_bytes: Option<i64>,
    /// Guard drops: the slot's restart_lsn at the drop (the first WAL its consumer will
    /// never get); sent in the notification (the event's reason says it too).
    pub restart_lsn: Option<u64>,
    /// Guard drops of a logical slot: its confirmed_flush_lsn at the drop (the first change
    /// after it is what its consumer loses); sent in the notification.
    pub confirmed_flush: Option<u64>,
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
            lease_owner_oid: None,
            lease_holder: None,
            lease_id: None,
            freed_bytes: None,
            pg_wal_bytes: None,
            restart_lsn: None,
            confirmed_flush: None,
        }
    }
}


impl<'a> Event<'a> {
    /// The event about a lease: its owner (name and OID), holder and id.
    pub fn of_lease(self, l: &'a crate::store::LeaseRec) -> Self {
        Event {
            lease_owner: Some(&l.owner),
            lease_owner_oid: l.owner_oid,
            lease_holder: l.holder.as_deref(),
            lease_id: Some(l.lease_id),
            ..self
        }
    }
}
