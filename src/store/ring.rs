//! The per-node event ring: where a server that cannot write a table (a hot standby)
//! keeps its events, besides the server log. Bounded to [`RING_MAX`] events, oldest out
//! first; one file, `pg_slotguard/events`, written like every store file (temporary file,
//! fsync, rename; magic, version, CRC32C), so it survives restarts and crashes. The
//! events view shows these beside the table's rows; after a promotion new events go to
//! the table, and the ring keeps what the server recorded as a standby.

use super::codec::{self, Damage};
use super::file;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

pub const RING_FILE: &str = "pg_slotguard/events";
/// The most events the ring keeps.
pub const RING_MAX: usize = 1000;
/// 1000 events of at most a few kB each.
const MAX_CONTENT: usize = 8 << 20;

/// One event, as the ring keeps it (the columns of `pgslotguard.event_log`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RingEvent {
    pub id: i64,
    /// Microseconds since 2000-01-01.
    pub at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_name: Option<String>,
    pub action: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_bytes: Option<i64>,
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freed_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_wal_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_holder: Option<String>,
    /// The lease owner's OID: the events view shows a role its own events by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_owner_oid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Ring {
    pub next_id: i64,
    pub events: Vec<RingEvent>,
}

impl Ring {
    /// Add an event (its id assigned here), dropping the oldest beyond [`RING_MAX`].
    pub fn push(&mut self, mut e: RingEvent) -> i64 {
        self.next_id += 1;
        e.id = self.next_id;
        self.events.push(e);
        if self.events.len() > RING_MAX {
            let over = self.events.len() - RING_MAX;
            self.events.drain(..over);
        }
        self.next_id
    }
}

/// The ring as on disk: empty if there is none; a damaged file is set aside (durably,
/// named in the error) and the ring starts afresh, its ids going on above any the damaged
/// ring can have given ([`fresh_ids_from`]). A temporary file left by a crash is removed.
/// `Ok((ring, Some(warning)))`: the file was damaged, and the ring is the fresh one.
pub fn load() -> Result<(Ring, Option<String>), String> {
    let path = Path::new(RING_FILE);
    let _ = std::fs::remove_file(path.with_extension("tmp"));
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Ring::default(), None)),
        Err(e) => return Err(format!("could not read \"{RING_FILE}\": {e}")),
    };
    match codec::decode_value::<Ring>(&bytes, MAX_CONTENT) {
        Ok(r) => Ok((r, None)),
        Err(why) => Ok(set_aside(why)),
    }
}

/// The ring's events, for a reader that holds no lock: a damaged file is reported, and
/// left for the next writer ([`load`]) to set aside.
pub fn peek() -> Result<Vec<RingEvent>, String> {
    match std::fs::read(RING_FILE) {
        Ok(bytes) => codec::decode_value::<Ring>(&bytes, MAX_CONTENT)
            .map(|r| r.events)
            .map_err(|why| format!("\"{RING_FILE}\" is damaged ({why}); the guard sets it aside when it next records an event")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(format!("could not read \"{RING_FILE}\": {e}")),
    }
}

/// A damaged ring goes aside and a fresh one takes its place (under the writers' lock).
fn set_aside(why: Damage) -> (Ring, Option<String>) {
    let path = Path::new(RING_FILE);
    {
        let mut to = format!("{RING_FILE}.{}", why.suffix());
        let mut n = 1;
        while Path::new(&to).exists() {
            to = format!("{RING_FILE}.{}.{n}", why.suffix());
            n += 1;
        }
        let moved = std::fs::rename(path, &to).and_then(|_| file::sync_dir(Path::new(file::DIR)));
        let next_id = fresh_ids_from(now_ms());
        let r = Ring { next_id, events: vec![] };
        // Saved at once, so that the ids given from here on never fall back.
        let saved = save(&r);
        let how = match (moved, saved) {
            (Ok(()), Ok(())) => format!("moved it to \"{to}\" and started a new ring, its event ids from {}", next_id + 1),
            (Err(e), _) => format!("could not move it aside ({e}); started a new ring, its event ids from {}", next_id + 1),
            (_, Err(e)) => format!("moved it to \"{to}\"; could not write the new ring ({e})"),
        };
        (r, Some(format!("\"{RING_FILE}\" is damaged ({why}); {how}")))
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Where a ring started after damage numbers its events from: the clock in milliseconds,
/// which is above every id a ring can have given before (a ring numbers on from 1 by one
/// per event, or from an earlier such start, and no server records an event per
/// millisecond for long).
pub fn fresh_ids_from(now_ms: i64) -> i64 {
    now_ms.max(1)
}

/// Write the ring durably. The caller holds the store's writers' lock.
pub fn save(ring: &Ring) -> Result<(), file::WriteError> {
    file::ensure_dirs()?;
    let path = Path::new(RING_FILE);
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let r = (|| -> Result<(), file::WriteError> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(&codec::encode_value(ring))?;
        file::sync_file(&f).map_err(|error| file::WriteError { error, in_fsync: true })?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        file::sync_dir(Path::new(file::DIR)).map_err(|error| file::WriteError { error, in_fsync: true })
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_events_and_numbers_them_on() {
        let mut r = Ring::default();
        for i in 0..(RING_MAX + 5) {
            r.push(RingEvent { action: "warn".into(), reason: i.to_string(), actor: "worker".into(), ..Default::default() });
        }
        assert_eq!(r.events.len(), RING_MAX);
        assert_eq!(r.events[0].reason, "5");
        assert_eq!(r.events.last().unwrap().id, (RING_MAX + 5) as i64);
        let back: Ring = codec::decode_value(&codec::encode_value(&r), MAX_CONTENT).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_ring_started_after_damage_numbers_above_any_earlier_one() {
        // 2026 in milliseconds is about 1.8e12; a ring numbering by one per event from 1
        // would need that many events.
        let from = fresh_ids_from(1_796_000_000_000);
        let mut r = Ring { next_id: from, events: vec![] };
        let id = r.push(RingEvent::default());
        assert!(id > 1_000_000_000_000 && id == from + 1);
        assert_eq!(fresh_ids_from(0), 1);
    }
}
