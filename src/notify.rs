//! The JSON every event is sent as on channel `pgslotguard` (state::record). PURE:
//! unit-tested without PostgreSQL.
//!
//! Any role may LISTEN on any channel, and NOTIFY on it. So by default
//! (`pgslotguard.notify_payload = minimal`) a notification says only what anyone may know
//! — schema 2: `schema`, `id`, `at`, `slot`, `action` — and a listener reads the rest from
//! `pgslotguard.events` by `id`, which also tells a real event from a forged notification.
//!
//! With `notify_payload = full`, schema 1, every key always present (null when it does not
//! apply):
//! `schema`, `id`, `at` (UTC, RFC 3339, microseconds), `slot`, `action` (the event word),
//! `reason`, `retained_bytes`, `freed_bytes`, `actor`, `owner` and `holder` (of the lease),
//! `restart_lsn` (a guard drop: the slot's restart_lsn at the drop, as PostgreSQL prints an
//! LSN), `confirmed_flush_lsn` (a guard drop of a logical slot: what its consumer had
//! confirmed; the first change after it is lost; added in 0.3.0), and `truncated` (true
//! when the reason or the holder was cut to fit). Keys are only ever added within a schema
//! number.

use crate::event::Event;
use serde_json::json;

pub const SCHEMA: u32 = 1;
/// The minimal payload's schema.
pub const MINIMAL_SCHEMA: u32 = 2;

/// The notification for a recorded event by default: what the event is, not what it says.
pub fn minimal(e: &Event, id: i64, at: &str) -> String {
    json!({
        "schema": MINIMAL_SCHEMA,
        "id": id,
        "at": at,
        "slot": e.slot_name,
        "action": e.action.as_str(),
    })
    .to_string()
}

/// PostgreSQL refuses a NOTIFY payload of 8000 bytes or more.
pub const MAX_PAYLOAD: usize = 7999;

/// The notification for a recorded event: `id` and `at` as stored, `holder` as the lease had it.
pub fn payload(e: &Event, id: i64, at: &str, holder: Option<&str>) -> String {
    let build = |reason: &str, holder: Option<&str>, truncated: bool| {
        json!({
            "schema": SCHEMA,
            "id": id,
            "at": at,
            "slot": e.slot_name,
            "action": e.action.as_str(),
            "reason": reason,
            "retained_bytes": e.retained_bytes,
            "freed_bytes": e.freed_bytes,
            "actor": e.actor,
            "owner": e.lease_owner,
            "holder": holder,
            "restart_lsn": e.restart_lsn.map(crate::validate::format_lsn),
            "confirmed_flush_lsn": e.confirmed_flush.map(crate::validate::format_lsn),
            "truncated": truncated,
        })
        .to_string()
    };
    let whole = build(e.reason, holder, false);
    if whole.len() <= MAX_PAYLOAD {
        return whole;
    }
    // Cut the reason (a long error message) to the longest prefix that fits, then, if even
    // no reason is too long, the holder. Escaping makes the JSON longer than the text, so
    // the prefix is searched for rather than computed.
    let fits = |reason: &str, holder: Option<&str>| build(reason, holder, true).len() <= MAX_PAYLOAD;
    if fits("…", holder) {
        let keep = longest_prefix(e.reason, |p| fits(&format!("{p}…"), holder));
        return build(&format!("{}…", &e.reason[..keep]), holder, true);
    }
    let h = holder.unwrap_or_default();
    let keep = longest_prefix(h, |p| fits("…", Some(&format!("{p}…"))));
    build("…", Some(&format!("{}…", &h[..keep])), true)
}

/// The length of the longest prefix of `s`, cut at a character boundary, that `ok` accepts
/// (`ok` holds for the empty prefix and, being a length limit, for every shorter one).
fn longest_prefix(s: &str, ok: impl Fn(&str) -> bool) -> usize {
    let (mut lo, mut hi) = (0, s.len());
    while lo < hi {
        let mut mid = (lo + hi).div_ceil(2);
        while !s.is_char_boundary(mid) {
            mid -= 1;
        }
        if mid <= lo {
            // no boundary between lo and the midpoint: try the next one above it
            let next = (lo + 1..=hi).find(|&i| s.is_char_boundary(i)).unwrap_or(hi);
            if ok(&s[..next]) && next > lo {
                lo = next;
                continue;
            }
            break;
        }
        if ok(&s[..mid]) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Outcome;

    fn event<'a>(reason: &'a str) -> Event<'a> {
        Event {
            slot_name: Some("nightly"),
            retained_bytes: Some(123),
            lease_owner: Some("backup"),
            ..Event::new(Outcome::ExpireDrop, reason, "pgslotguard guard")
        }
    }

    #[test]
    fn the_minimal_payload_says_which_event_and_nothing_it_says() {
        let p = minimal(&event("lease expired 1s ago"), 42, "2026-11-30T01:02:03.000004Z");
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["action", "at", "id", "schema", "slot"]);
        assert_eq!(v["schema"], 2);
        assert_eq!(v["id"], 42);
        assert_eq!(v["slot"], "nightly");
        assert_eq!(v["action"], "expire_drop");
        assert!(!p.contains("backup") && !p.contains("expired"), "{p}");
    }

    #[test]
    fn every_key_is_there() {
        let p = payload(&event("lease expired 1s ago"), 42, "2026-11-30T01:02:03.000004Z", Some("b2 nightly"));
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["schema"], 1);
        assert_eq!(v["id"], 42);
        assert_eq!(v["at"], "2026-11-30T01:02:03.000004Z");
        assert_eq!(v["slot"], "nightly");
        assert_eq!(v["action"], "expire_drop");
        assert_eq!(v["reason"], "lease expired 1s ago");
        assert_eq!(v["retained_bytes"], 123);
        assert!(v["freed_bytes"].is_null());
        assert_eq!(v["actor"], "pgslotguard guard");
        assert_eq!(v["owner"], "backup");
        assert_eq!(v["holder"], "b2 nightly");
        assert!(v["restart_lsn"].is_null());
        assert_eq!(v["truncated"], false);
        let dropped = Event { restart_lsn: Some(0x1_0500_0028), ..event("lease expired 1s ago") };
        let v: serde_json::Value = serde_json::from_str(&payload(&dropped, 43, "t", None)).unwrap();
        assert_eq!(v["restart_lsn"], "1/5000028");
    }

    #[test]
    fn a_long_reason_and_holder_are_cut_to_fit_and_say_so() {
        // 1024-byte holder of characters that escape to six bytes each, and a huge reason
        let holder = "\u{1}".repeat(1024);
        let reason = "é\"\\\u{2}".repeat(5000);
        let p = payload(&event(&reason), i64::MAX, "2026-11-30T01:02:03.000004Z", Some(&holder));
        assert!(p.len() <= MAX_PAYLOAD, "{}", p.len());
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["truncated"], true);
        let cut = v["reason"].as_str().unwrap();
        assert!(cut.ends_with('…') && cut.len() > 100, "{} bytes", cut.len());
        assert!(p.len() > MAX_PAYLOAD - 16, "cut no more than needed: {}", p.len());
        assert_eq!(v["holder"].as_str().unwrap(), holder, "the holder fits once the reason is cut");
        // a holder that alone does not fit (PostgreSQL limits it to 1024 bytes; this is 2000)
        let p = payload(&event("r"), 1, "t", Some(&"\u{1}".repeat(2000)));
        assert!(p.len() <= MAX_PAYLOAD);
        assert!(serde_json::from_str::<serde_json::Value>(&p).unwrap()["holder"].as_str().unwrap().ends_with('…'));
        // a reason that fits is left whole
        let p = payload(&event(&"x".repeat(7000)), 1, "t", None);
        assert!(p.len() <= MAX_PAYLOAD);
        assert!(!p.contains('…'));
    }
}
