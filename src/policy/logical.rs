//! PURE: the rules a lease's kind of slot adds — a logical slot's (a CDC connector's, a
//! subscription's) and a lease that lasts while its consumer streams.
//!
//! - A lease is on the kind of slot it was taken on: a physical lease never takes a logical
//!   slot of its name for its own, nor a logical lease a physical one; a temporary slot is
//!   no lease's.
//! - What a drop costs the consumer is said in its own terms: for a logical slot, the
//!   `confirmed_flush_lsn` it had confirmed (the first change after it is lost) and what
//!   the consumer must do — take a new snapshot, or have its subscription made again.
//! - `while_active`: a CDC connector cannot call `backup_slot_renew`. Such a lease lasts
//!   while a consumer streams from its slot and expires its ttl after the consumer went
//!   (or at its expiry, if later): the ttl becomes the grace a consumer has to come back.

use super::{Lease, Seen, SlotInfo};

/// Why the slot of this name is not the lease's, if it is not.
pub fn not_the_leased_slot(slot: &SlotInfo, lease: &Lease) -> Option<&'static str> {
    if slot.temporary {
        return Some("it is a temporary slot");
    }
    match (slot.physical, lease.logical) {
        (false, false) => Some("it is a logical slot, and the lease was taken on a physical one"),
        (true, true) => Some("it is a physical slot, and the lease was taken on a logical one"),
        _ => None,
    }
}

/// When the lease expires. A `while_active` lease: not while its slot is active; once it
/// is not, its ttl (the length of its last term) after the consumer went, or at its expiry
/// if that is later. Any other lease: at its expiry.
pub fn expiry(lease: &Lease, slot: &SlotInfo, seen: Option<&Seen>, now: i64) -> i64 {
    if !lease.while_active {
        return lease.expires_at;
    }
    let ttl = lease.expires_at - lease.renewed_at.unwrap_or(lease.leased_at);
    if slot.active() {
        return lease.expires_at.max(now.saturating_add(ttl));
    }
    // Gone since the guard saw it go (or since the server's own inactive_since on 17+, the
    // tracking's source); never seen active: at its expiry.
    match seen.and_then(|s| s.inactive_since).filter(|since| *since > lease.leased_at) {
        Some(since) => lease.expires_at.max(since.saturating_add(ttl)),
        None => lease.expires_at,
    }
}

/// What dropping a logical slot costs its consumer.
pub fn drop_cost(confirmed_flush: Option<u64>) -> String {
    let at = match confirmed_flush {
        Some(lsn) => format!(
            "confirmed_flush_lsn at the drop {}: the first change after it is lost to its consumer",
            crate::validate::format_lsn(lsn)
        ),
        None => "it had confirmed no change yet".to_string(),
    };
    format!(
        "{at}; its consumer must start afresh: a CDC connector takes a new snapshot, and a subscriber's subscription is made again (ALTER SUBSCRIPTION ... DISABLE, then SET (slot_name = NONE), DROP SUBSCRIPTION, and CREATE SUBSCRIPTION with copy_data)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;
    const NOW: i64 = 1_000_000 * S;

    fn lease(logical: bool, while_active: bool) -> Lease {
        Lease {
            slot_name: "cdc".into(),
            owner: "backup".into(),
            owner_oid: 10,
            leased_at: NOW - 3600 * S,
            born_at: NOW - 3600 * S,
            renewed_at: None,
            // a one-hour lease taken an hour ago, expiring now
            expires_at: NOW,
            max_retained: None,
            max_inactive: None,
            max_age: None,
            max_xmin_age: None,
            limit_by_superuser: false,
            adopted: false,
            logical,
            while_active,
        }
    }

    fn slot(physical: bool, active: bool) -> SlotInfo {
        SlotInfo {
            name: "cdc".into(),
            physical,
            temporary: false,
            active_pid: active.then_some(42),
            restart_lsn: Some(0),
            invalidation: None,
            core_inactive_since: None,
            synced: false,
            system: None,
            sender: None,
            xmin: None,
            catalog_xmin: None,
            logical: None,
        }
    }

    fn seen(inactive_since: Option<i64>) -> Seen {
        Seen { slot_name: "cdc".into(), first_seen: NOW - 3600 * S, inactive_since, dropping: None, stalled: None }
    }

    #[test]
    fn a_lease_is_only_on_the_kind_of_slot_it_was_taken_on() {
        // (slot physical, lease logical, temporary, a reason)
        let cases = [(true, false, false, false), (false, true, false, false), (false, false, false, true), (true, true, false, true), (true, false, true, true)];
        for (physical, logical, temporary, mismatch) in cases {
            let s = SlotInfo { temporary, ..slot(physical, false) };
            assert_eq!(not_the_leased_slot(&s, &lease(logical, false)).is_some(), mismatch, "{physical} {logical} {temporary}");
        }
    }

    #[test]
    fn a_lease_that_lasts_while_its_consumer_streams_expires_its_ttl_after_the_consumer_went() {
        // (while_active, active, inactive since, expires at)
        let cases = [
            // an ordinary lease: at its expiry, streaming or not
            (false, true, None, NOW),
            (false, false, Some(NOW - 10 * S), NOW),
            // while_active and streaming: an hour from now, and on with every pass
            (true, true, None, NOW + 3600 * S),
            // gone ten seconds ago: an hour after that
            (true, false, Some(NOW - 10 * S), NOW + 3590 * S),
            // gone two hours ago (before its last term even began): at its expiry
            (true, false, Some(NOW - 7200 * S), NOW),
            // never seen streaming: at its expiry
            (true, false, None, NOW),
        ];
        for (while_active, active, since, want) in cases {
            let got = expiry(&lease(true, while_active), &slot(false, active), Some(&seen(since)), NOW);
            assert_eq!(got, want, "{while_active} {active} {since:?}");
        }
    }

    #[test]
    fn a_logical_drop_names_the_change_its_consumer_loses_and_what_it_must_do() {
        let w = drop_cost(Some(0x1_0000_0028));
        assert!(w.contains("confirmed_flush_lsn at the drop 1/28") && w.contains("new snapshot") && w.contains("CREATE SUBSCRIPTION"), "{w}");
        assert!(drop_cost(None).starts_with("it had confirmed no change yet"));
    }
}
