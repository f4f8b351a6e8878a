//! PURE: what one store file holds, and its bytes on disk.
//!
//! A file is the record of one slot name (`pg_slotguard/slots/<name>`): its lease, if it
//! has one, what the guard has tracked of the slot, and the warnings given about it. The
//! file layout follows core's slot state files (`SaveSlotToPath`): a fixed header with a
//! magic number, a format version, a CRC32C and the length of what follows, then the
//! content. The content is JSON, so that a DBA can read a file with `tail -c +17`, and a
//! later version can add a field without a new layout (an absent field reads as its
//! default). The CRC32C covers the version, the length and the content.
//!
//! No pgrx, no I/O: encode and decode are table-tested.

use serde::{Deserialize, Serialize};

/// "PGSG", little-endian: the first four bytes of every store file.
pub const MAGIC: u32 = 0x4753_4750;
/// The format this code writes; a file of another version is set aside, never guessed at.
pub const VERSION: u32 = 1;
/// magic, version, crc, length: four u32.
pub const HEADER_LEN: usize = 16;
/// No record is larger (a holder is at most 1 kB, a reason a few hundred bytes): a length
/// above this is damage, not a record to allocate for.
pub const MAX_CONTENT: usize = 64 * 1024;

/// A lease, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct LeaseRec {
    pub owner: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// Microseconds since 2000-01-01 (PostgreSQL's TimestampTz), as every time here.
    pub leased_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_at: Option<i64>,
    pub expires_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retained: Option<i64>,
    /// Microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_inactive: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<i64>,
    /// Transactions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_xmin_age: Option<i64>,
    #[serde(default)]
    pub limit_by_superuser: bool,
    #[serde(default)]
    pub adopted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_lsn: Option<u64>,
    /// The inode of the slot's directory in `pg_replslot` when the lease was taken: a
    /// slot of the same name in a copied data directory (or a slot dropped and made again
    /// while the server was down) is not the slot of this lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_ino: Option<u64>,
}

/// A drop the guard has decided and made durable before doing it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntentRec {
    pub action: String,
    pub reason: String,
    /// When the guard decided the drop (0 in a record written before this was kept).
    #[serde(default)]
    pub at: i64,
    /// A drop made by `backup_slot_enforce()` inside the caller's transaction: the
    /// transaction ID that wrote its event. The event exists once that commits; while it
    /// runs, the worker leaves the intent alone; if it aborted, the worker records the drop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xid: Option<u32>,
}

/// What the guard has tracked of a slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SeenRec {
    pub first_seen: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactive_since: Option<i64>,
    /// (LSN, since): an active slot that has not moved while WAL was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<(u64, i64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropping: Option<IntentRec>,
}

/// The guard's last drop of a slot of this name, remembered for an hour after it
/// (`policy::LOOP_WINDOW_US`) to see a drop/recreate loop, whether or not a slot of the
/// name exists now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DroppedRec {
    pub at: i64,
    /// The drop event (`retained_drop`, ...).
    pub action: String,
    /// Guard drops of this name within the hour.
    #[serde(default)]
    pub drops: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loop_warned_at: Option<i64>,
}

/// Everything the store keeps about one slot name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SlotRecord {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseRec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<SeenRec>,
    /// Limits warned of (`Breach::limit_word`) and not re-armed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warned: Vec<String>,
    /// A recent guard drop of this name (absent in files written before 0.2.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<DroppedRec>,
}

impl SlotRecord {
    pub fn new(name: &str) -> SlotRecord {
        SlotRecord { name: name.to_string(), ..Default::default() }
    }
    /// Nothing left to keep: the file goes.
    pub fn is_empty(&self) -> bool {
        self.lease.is_none() && self.seen.is_none() && self.warned.is_empty() && self.dropped.is_none()
    }
}

/// Why a file could not be read; each has the suffix the file is set aside under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    Truncated { len: usize },
    BadMagic(u32),
    UnknownVersion(u32),
    BadChecksum { stored: u32, computed: u32 },
    BadContent(String),
}

impl Damage {
    /// The suffix of the name a damaged file is moved to: it says why.
    pub fn suffix(&self) -> &'static str {
        match self {
            Damage::Truncated { .. } => "truncated",
            Damage::BadMagic(_) => "bad-magic",
            Damage::UnknownVersion(_) => "unknown-version",
            Damage::BadChecksum { .. } => "bad-checksum",
            Damage::BadContent(_) => "bad-content",
        }
    }
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Truncated { len } => write!(f, "file is truncated ({len} bytes)"),
            Damage::BadMagic(m) => write!(f, "file has wrong magic number: {m:#010x} instead of {MAGIC:#010x}"),
            Damage::UnknownVersion(v) => write!(f, "file has unsupported version {v} (this pgslotguard reads version {VERSION})"),
            Damage::BadChecksum { stored, computed } => {
                write!(f, "checksum mismatch: is {computed:#010x}, should be {stored:#010x}")
            }
            Damage::BadContent(e) => write!(f, "content does not parse: {e}"),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn checksum(version: u32, content: &[u8]) -> u32 {
    let mut c = crc32c::crc32c(&version.to_le_bytes());
    c = crc32c::crc32c_append(c, &(content.len() as u32).to_le_bytes());
    crc32c::crc32c_append(c, content)
}

/// The bytes of a store file for `rec`.
pub fn encode(rec: &SlotRecord) -> Vec<u8> {
    encode_value(rec)
}

/// The bytes of a store file holding any serialisable value (the event ring).
pub fn encode_value<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising plain structs of strings and integers cannot fail.
    let content = serde_json::to_vec(value).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + content.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&checksum(VERSION, &content).to_le_bytes());
    out.extend_from_slice(&(content.len() as u32).to_le_bytes());
    out.extend_from_slice(&content);
    out
}

/// The record in a store file's bytes, checked in the order slot.c checks its own: the
/// length of the header, the magic, the version, the length, the checksum, the content.
pub fn decode(bytes: &[u8]) -> Result<SlotRecord, Damage> {
    decode_value(bytes, MAX_CONTENT)
}

/// [`decode`] for any value, with content of at most `max` bytes.
pub fn decode_value<T: serde::de::DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, Damage> {
    if bytes.len() < HEADER_LEN {
        return Err(Damage::Truncated { len: bytes.len() });
    }
    let magic = u32_at(bytes, 0);
    if magic != MAGIC {
        return Err(Damage::BadMagic(magic));
    }
    let version = u32_at(bytes, 4);
    if version != VERSION {
        return Err(Damage::UnknownVersion(version));
    }
    let stored = u32_at(bytes, 8);
    let len = u32_at(bytes, 12) as usize;
    if len > max || bytes.len() != HEADER_LEN + len {
        return Err(Damage::Truncated { len: bytes.len() });
    }
    let content = &bytes[HEADER_LEN..];
    let computed = checksum(version, content);
    if computed != stored {
        return Err(Damage::BadChecksum { stored, computed });
    }
    serde_json::from_slice(content).map_err(|e| Damage::BadContent(e.to_string()))
}

/// A store file's name is its slot's name: slot names are `[a-z0-9_]`, 1 to 63 bytes
/// (core refuses any other), so they are safe file names. Anything else in the directory
/// (a temporary file, a file set aside) is not a record.
pub fn is_record_name(file: &str) -> bool {
    !file.is_empty() && file.len() <= 63 && file.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> SlotRecord {
        SlotRecord {
            name: "nightly".into(),
            lease: Some(LeaseRec {
                owner: "backup".into(),
                holder: Some("host b2 — ticket 42".into()),
                leased_at: 1,
                renewed_at: Some(2),
                expires_at: 3_600_000_000,
                max_retained: Some(64 << 20),
                max_inactive: Some(5),
                max_age: Some(6),
                max_xmin_age: Some(1_000_000),
                limit_by_superuser: true,
                adopted: true,
                reserved_lsn: Some(0x1_0000_0028),
                slot_ino: Some(1234),
            }),
            seen: Some(SeenRec {
                first_seen: 7,
                inactive_since: Some(8),
                stalled: Some((9, 10)),
                dropping: Some(IntentRec { action: "expire_drop".into(), reason: "lease expired 1s ago".into(), at: 11, xid: Some(742) }),
            }),
            warned: vec!["expiry".into(), "retained".into()],
            dropped: Some(DroppedRec { at: 11, action: "retained_drop".into(), drops: 2, loop_warned_at: Some(12) }),
        }
    }

    #[test]
    fn a_file_without_a_recent_drop_still_reads() {
        // content as 0.2.0 wrote it: no "dropped"
        let old = SlotRecord { dropped: None, ..full() };
        let bytes = encode(&old);
        assert_eq!(decode(&bytes).map(|r| r.dropped), Ok(None));
        let only_drop = SlotRecord { dropped: full().dropped, ..SlotRecord::new("gone") };
        assert!(!only_drop.is_empty(), "a record that only remembers a drop is kept");
        assert_eq!(decode(&encode(&only_drop)), Ok(only_drop));
    }

    #[test]
    fn a_record_reads_back_as_written() {
        for rec in [full(), SlotRecord::new("a"), SlotRecord { seen: Some(SeenRec::default()), ..SlotRecord::new("b") }] {
            assert_eq!(decode(&encode(&rec)), Ok(rec));
        }
    }

    #[test]
    fn every_kind_of_damage_is_named_and_never_read_as_a_record() {
        let good = encode(&full());
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x01;
        let mut magic = good.clone();
        magic[0] = b'X';
        let mut version = good.clone();
        version[4] = 2;
        let mut garbage = good[..HEADER_LEN].to_vec();
        garbage.extend_from_slice(b"{not json");
        let len = (garbage.len() - HEADER_LEN) as u32;
        garbage[12..16].copy_from_slice(&len.to_le_bytes());
        let crc = checksum(VERSION, &garbage[HEADER_LEN..]);
        garbage[8..12].copy_from_slice(&crc.to_le_bytes());
        let cases: [(&[u8], &str); 7] = [
            (&[], "truncated"),
            (&good[..10], "truncated"),
            (&good[..good.len() - 1], "truncated"),
            (&flipped, "bad-checksum"),
            (&magic, "bad-magic"),
            (&version, "unknown-version"),
            (&garbage, "bad-content"),
        ];
        for (bytes, suffix) in cases {
            let err = decode(bytes).expect_err(suffix);
            assert_eq!(err.suffix(), suffix, "{err}");
        }
    }

    #[test]
    fn a_huge_length_is_damage_not_an_allocation() {
        let mut b = encode(&full());
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&b).unwrap_err().suffix(), "truncated");
    }

    #[test]
    fn absent_fields_read_as_their_defaults() {
        let content = br#"{"name":"x","lease":{"owner":"o","leased_at":1,"expires_at":2}}"#;
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&checksum(VERSION, content).to_le_bytes());
        b.extend_from_slice(&(content.len() as u32).to_le_bytes());
        b.extend_from_slice(content);
        let rec = decode(&b).unwrap();
        let lease = rec.lease.unwrap();
        assert_eq!((lease.owner.as_str(), lease.holder, lease.adopted, lease.max_xmin_age), ("o", None, false, None));
    }

    #[test]
    fn the_checksum_is_crc32c() {
        // RFC 3720's check value for CRC32C over "123456789".
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn record_names_are_slot_names_only() {
        assert!(is_record_name("nightly_2"));
        for bad in ["", "x.tmp", "x.bad-checksum", "Upper", &"a".repeat(64)] {
            assert!(!is_record_name(bad), "{bad}");
        }
    }
}
