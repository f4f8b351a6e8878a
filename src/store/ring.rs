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

/// The ring as on disk: empty if there is none; a damaged file is set aside (named in
/// the error) and the ring starts afresh.
pub fn load() -> Result<Ring, String> {
    let path = Path::new(RING_FILE);
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ring::default()),
        Err(e) => return Err(format!("could not read \"{RING_FILE}\": {e}")),
    };
    codec::decode_value::<Ring>(&bytes, MAX_CONTENT).or_else(|why: Damage| {
        let to = format!("{RING_FILE}.{}", why.suffix());
        let _ = std::fs::rename(path, &to);
        Err(format!("\"{RING_FILE}\" is damaged ({why}); moved it to \"{to}\" and started a new ring"))
    })
}

/// Write the ring durably. The caller holds the store's writers' lock.
pub fn save(ring: &Ring) -> std::io::Result<()> {
    file::ensure_dirs()?;
    let path = Path::new(RING_FILE);
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let r = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(&codec::encode_value(ring))?;
        file::sync_file(&f)?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        file::sync_dir(Path::new(file::DIR))
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
}
