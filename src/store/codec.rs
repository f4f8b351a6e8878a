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
    /// The inode of the slot's directory in `pg_replslot`, as 0.2.0 kept it: read, never
    /// written (see `slot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_ino: Option<u64>,
    /// The slot this lease made or adopted ([`Identity`] of its directory in
    /// `pg_replslot`): a slot of the same name made since (dropped and made again, or in a
    /// copied data directory) is not the slot of this lease, and the guard never drops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<Identity>,
    /// The role that took the lease, by OID: a role dropped and made again under the same
    /// name is another role. (`owner` keeps its name for the views and events; absent in a
    /// record written before 0.3.0, until the guard looks the name up.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_oid: Option<u32>,
    /// A random number naming this lease (not its slot): the events of its calls carry it,
    /// so that after a crash the guard finds a release or keep that committed and had not
    /// yet reached the store. 0 in a record written before 0.3.0.
    #[serde(default)]
    pub lease_id: i64,
    /// Where the slot's age counts from: the lease for a slot it made, the guard's first
    /// sight of the slot for one it adopted (a lease taken again on the same slot does not
    /// make it younger). Absent: `leased_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub born_at: Option<i64>,
    /// The last renewal that was recorded as an event: renewals within a minute of it are
    /// not (a renewal loop must not flood the event log and its listeners).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_logged_at: Option<i64>,
    /// The guard has said once that the owner role no longer exists.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub owner_gone: bool,
    /// The lease is on a logical slot (made with `plugin => ...`, or adopted as one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub logical: bool,
    /// `while_active => true`: the lease lasts while a consumer streams, and expires its
    /// ttl after the consumer went.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub while_active: bool,
}

impl LeaseRec {
    /// The slot this lease is about, as recorded (0.2.0's inode alone for older records).
    pub fn identity(&self) -> Option<Identity> {
        self.slot.or(self.slot_ino.map(|ino| Identity { ino, btime: 0 }))
    }
    /// Where the slot's age counts from.
    pub fn born(&self) -> i64 {
        self.born_at.unwrap_or(self.leased_at)
    }
}

/// Which directory a slot (or the store) is: its inode and its birth time (statx), so that
/// a directory made again under the same name, which ext4 may give the same inode, is not
/// taken for the old one. `btime` 0: the filesystem does not keep birth times, and the
/// inode alone is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Identity {
    pub ino: u64,
    /// Nanoseconds since the Unix epoch, or 0.
    #[serde(default)]
    pub btime: i64,
}

impl Identity {
    /// The same directory: the same inode, born at the same instant where both know it.
    pub fn same(&self, other: &Identity) -> bool {
        self.ino == other.ino && (self.btime == 0 || other.btime == 0 || self.btime == other.btime)
    }
}

pub use crate::txid::LocalXact;

/// A change to a lease made by a transaction that has not yet been settled: the store says
/// what the lease becomes if that transaction commits. Written before the change has any
/// effect (for a new lease: before its slot is made persistent), so that whoever comes
/// next (the transaction itself at commit or abort, the guard's next pass, the next
/// start) can finish or undo it: the transaction's own commit status says which.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PendingRec {
    /// The (sub)transaction ID of the change, on a primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xid: Option<u32>,
    /// The transaction of the change, on a hot standby (no transaction ID there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalXact>,
    /// The lease as the change leaves it; `None`: the change ends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseRec>,
    /// The change ends the lease and drops its slot (a release).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drop_slot: bool,
    /// This transaction made the slot: if it does not commit, the slot is dropped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub made_slot: bool,
}

impl crate::txid::Maker for PendingRec {
    fn xid(&self) -> Option<u32> {
        self.xid
    }
    fn local(&self) -> Option<&LocalXact> {
        self.local.as_ref()
    }
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
    /// The slot to drop: a slot of the name that is not this one is never dropped for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<Identity>,
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
    /// The slot the tracking is of: a slot of the name made since is tracked afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<Identity>,
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
    /// A change to the lease not yet settled ([`PendingRec`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingRec>,
    /// The store this record was written in (the [`Identity`] of `pg_slotguard/`): a
    /// record found in another one was copied with the data directory (pg_basebackup, a
    /// file copy), and its changes in flight and drop intents are not this server's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Identity>,
}

impl SlotRecord {
    pub fn new(name: &str) -> SlotRecord {
        SlotRecord { name: name.to_string(), ..Default::default() }
    }
    /// Nothing left to keep: the file goes.
    pub fn is_empty(&self) -> bool {
        self.lease.is_none() && self.seen.is_none() && self.warned.is_empty() && self.dropped.is_none() && self.pending.is_none()
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
                slot_ino: None,
                slot: Some(Identity { ino: 1234, btime: 1_700_000_000_123_456_789 }),
                owner_oid: Some(16384),
                lease_id: -42,
                born_at: Some(0),
                renew_logged_at: Some(2),
                owner_gone: false,
                logical: true,
                while_active: true,
            }),
            seen: Some(SeenRec {
                first_seen: 7,
                inactive_since: Some(8),
                stalled: Some((9, 10)),
                dropping: Some(IntentRec {
                    action: "expire_drop".into(),
                    reason: "lease expired 1s ago".into(),
                    at: 11,
                    xid: Some(742),
                    slot: Some(Identity { ino: 1234, btime: 0 }),
                }),
                slot: Some(Identity { ino: 1234, btime: 5 }),
            }),
            warned: vec!["expiry".into(), "retained".into()],
            dropped: Some(DroppedRec { at: 11, action: "retained_drop".into(), drops: 2, loop_warned_at: Some(12) }),
            pending: Some(PendingRec {
                xid: Some(743),
                local: Some(LocalXact { gen: 1, proc: 3, lxid: 9 }),
                lease: None,
                drop_slot: true,
                made_slot: true,
            }),
            node: Some(Identity { ino: 77, btime: 78 }),
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

    /// Store files as version 1 of the format wrote them, kept in the repository: a server
    /// updated to a later pgslotguard finds such files in its data directory, so every
    /// later version must read these as they are (a new format adds files of its own beside
    /// them, and never replaces these). `v1-lease` and `v1-dropped` were written by a
    /// server (0.2.x: a lease with every option the call takes, tracked by the guard; a
    /// name whose slot the guard dropped at expiry); `v1-full` by `encode` of 0.2's fullest
    /// record; `v1-0.3-full` by `encode(&full())` of 0.3 (the fields 0.3 added, all of them
    /// optional: version 1 still).
    const GOLDEN: [(&str, &[u8]); 4] = [
        ("v1-lease", include_bytes!("golden/v1-lease")),
        ("v1-dropped", include_bytes!("golden/v1-dropped")),
        ("v1-full", include_bytes!("golden/v1-full")),
        ("v1-0.3-full", include_bytes!("golden/v1-0.3-full")),
    ];

    #[test]
    fn store_files_written_by_format_version_1_read_as_written() {
        for (name, bytes) in GOLDEN {
            assert_eq!(&bytes[0..4], b"PGSG", "{name}: the magic");
            assert_eq!(u32_at(bytes, 4), 1, "{name}: the version");
            assert_eq!(u32_at(bytes, 12) as usize, bytes.len() - HEADER_LEN, "{name}: the length");
        }
        let lease = SlotRecord {
            name: "nightly".into(),
            lease: Some(LeaseRec {
                owner: "postgres".into(),
                holder: Some("host b2 — ticket 42".into()),
                leased_at: 849_597_457_513_058,
                renewed_at: None,
                expires_at: 849_601_057_513_058,
                max_retained: Some(1 << 30),
                max_inactive: Some(86_400_000_000),
                max_age: Some(172_800_000_000),
                max_xmin_age: Some(1_000_000),
                limit_by_superuser: true,
                adopted: false,
                reserved_lsn: Some(22_092_424),
                slot_ino: Some(10_087_281),
                ..Default::default()
            }),
            seen: Some(SeenRec { first_seen: 849_597_457_530_092, inactive_since: Some(849_597_457_530_092), ..Default::default() }),
            ..SlotRecord::new("nightly")
        };
        let dropped = SlotRecord {
            dropped: Some(DroppedRec { at: 849_597_458_525_501, action: "expire_drop".into(), drops: 1, loop_warned_at: None }),
            ..SlotRecord::new("expired")
        };
        let full_02 = SlotRecord {
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
                ..Default::default()
            }),
            seen: Some(SeenRec {
                first_seen: 7,
                inactive_since: Some(8),
                stalled: Some((9, 10)),
                dropping: Some(IntentRec { action: "expire_drop".into(), reason: "lease expired 1s ago".into(), at: 11, xid: Some(742), slot: None }),
                slot: None,
            }),
            warned: vec!["expiry".into(), "retained".into()],
            dropped: Some(DroppedRec { at: 11, action: "retained_drop".into(), drops: 2, loop_warned_at: Some(12) }),
            ..SlotRecord::new("nightly")
        };
        assert_eq!(decode(GOLDEN[0].1), Ok(lease));
        assert_eq!(decode(GOLDEN[1].1), Ok(dropped));
        assert_eq!(decode(GOLDEN[2].1), Ok(full_02));
        assert_eq!(decode(GOLDEN[3].1), Ok(full()));
        // What this version writes of each reads back the same; the newest file is written
        // byte for byte as it is (0.3 writes a 0.2 record with its new fields, lease_id 0).
        for (name, bytes) in GOLDEN {
            let rec = decode(bytes).unwrap();
            assert_eq!(decode(&encode(&rec)), Ok(rec), "{name}: read back otherwise");
        }
        assert_eq!(encode(&full()), GOLDEN[3].1, "v1-0.3-full: written otherwise today");
    }

    /// CRC32C the slow way, bit by bit (Castagnoli's polynomial, reflected; start at !0,
    /// finish with ^ !0, as PostgreSQL's pg_comp_crc32c): a reference that shares no code
    /// with the crate `checksum` uses.
    fn crc32c_bitwise(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn the_checksum_is_crc32c_of_the_version_the_length_and_the_content() {
        // RFC 3720's check value: the reference is CRC32C.
        assert_eq!(crc32c_bitwise(b"123456789"), 0xe306_9283);
        for (name, bytes) in GOLDEN {
            let content = &bytes[HEADER_LEN..];
            let covered = [&1u32.to_le_bytes()[..], &(content.len() as u32).to_le_bytes(), content].concat();
            assert_eq!(checksum(1, content), crc32c_bitwise(&covered), "{name}");
            assert_eq!(checksum(1, content), u32_at(bytes, 8), "{name}: the checksum stored in it");
        }
        // The stored checksums themselves, as the files hold them.
        let stored: Vec<u32> = GOLDEN.iter().map(|(_, b)| u32_at(b, 8)).collect();
        assert_eq!(stored, [0xce9f_ca21, 0x8df9_338f, 0x12e8_68b8, 0x8ee7_dd57]);
    }

    #[test]
    fn record_names_are_slot_names_only() {
        assert!(is_record_name("nightly_2"));
        for bad in ["", "x.tmp", "x.bad-checksum", "Upper", &"a".repeat(64)] {
            assert!(!is_record_name(bad), "{bad}");
        }
    }
}
