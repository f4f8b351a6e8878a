//! PURE: the free-space floor for `pg_wal` and the projection of what a drop gives back.
//!
//! PostgreSQL removes WAL only at a checkpoint, and only what nothing keeps: the oldest
//! `restart_lsn` among *all* slots, `wal_keep_size` and the new checkpoint's redo point
//! decide the first segment kept. Retention is not additive: dropping a slot frees
//! nothing while an older slot remains. And a checkpoint *recycles* old segments as
//! future ones (up to about `max_wal_size` ahead of the redo point) instead of removing
//! them, so a drop frees only what lies beyond that. The model here, from xlog.c
//! (`KeepLogSeg`, `RemoveOldXlogFiles`, `XLOGfileslop`):
//!
//! ```text
//! after the checkpoint the guard requests (redo ≈ the insert position now):
//!   first kept segment = min(insert seg, oldest remaining restart seg (capped by
//!                            max_slot_wal_keep_size), insert seg − wal_keep_size)
//!   pg_wal after ≤ (insert seg − first kept + 1) + (max_wal_size − 1 segment) segments
//!   freed = pg_wal now − min(pg_wal now, that)
//! ```
//!
//! Recycling is taken at its upper bound (`max_wal_size`; core recycles less when its WAL
//! rate estimate is low). So the projection errs on the side of freeing *less*: the guard
//! may drop one slot more than needed, never one too few for the floor.

use rustc_hash::FxHashSet as HashSet;

/// What the guard measured of the filesystem that holds `pg_wal`, and the server
/// settings that decide what a checkpoint keeps. Bytes, LSNs as `u64`.
#[derive(Debug, Clone, PartialEq)]
pub struct WalDisk {
    /// Free bytes for an unprivileged user (statvfs `f_bavail`): what PostgreSQL can use.
    pub free: i64,
    /// Size of the filesystem.
    pub total: i64,
    /// Bytes of WAL segments in `pg_wal` now.
    pub pg_wal: i64,
    pub insert_lsn: u64,
    pub segment_size: i64,
    pub wal_keep: i64,
    pub max_wal: i64,
    /// `max_slot_wal_keep_size`, if set: core never keeps more for a slot.
    pub max_slot_keep: Option<i64>,
    /// The start of the oldest segment waiting for the archiver (a `.ready` file in
    /// `pg_wal/archive_status`): a checkpoint removes nothing from there on, whatever the
    /// slots, until it is archived.
    pub unarchived: Option<u64>,
}

/// `pgslotguard.min_free_wal_space`: a size, or a share of the filesystem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Floor {
    Bytes(i64),
    Percent(f64),
}

impl Floor {
    /// Parse the GUC's text: `-1` (or empty, or `off`) → no floor; `'20GB'`; `'10%'`.
    pub fn parse(text: &str) -> Result<Option<Floor>, String> {
        let t = text.trim();
        if t.is_empty() || t == "-1" || t.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        if let Some(pct) = t.strip_suffix('%') {
            let v: f64 = pct.trim().parse().map_err(|_| format!("invalid percentage: \"{text}\""))?;
            if !(v > 0.0 && v < 100.0) {
                return Err(format!("a percentage must be above 0% and below 100%, got \"{text}\""));
            }
            return Ok(Some(Floor::Percent(v)));
        }
        let bytes = crate::validate::parse_size(t)?;
        if bytes <= 0 {
            return Err(format!("the floor must be above zero, got \"{text}\" (-1 turns it off)"));
        }
        Ok(Some(Floor::Bytes(bytes)))
    }

    /// The floor in bytes on a filesystem of `total` bytes.
    pub fn bytes(self, total: i64) -> i64 {
        match self {
            Floor::Bytes(b) => b,
            Floor::Percent(p) => (total as f64 * p / 100.0) as i64,
        }
    }
}

/// How far above the floor the guard restores free space before it stops dropping: a
/// tenth of the floor, and at least four WAL segments. Without it, the WAL written while
/// the checkpoint runs would cross the floor again at once and cost the next slot; it is
/// kept small so that no slot is dropped for space the primary does not need.
pub fn headroom(floor: i64, segment_size: i64) -> i64 {
    (floor / 10).max(4 * segment_size)
}

/// A WAL segment file name in `pg_wal`: 24 upper-case hex digits (timeline, log, seg).
pub fn is_segment_name(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// The LSN a WAL segment starts at, from its file name (`XLogFromFileName`: the log and
/// seg parts; the timeline does not matter).
pub fn segment_start(name: &str, segment_size: i64) -> Option<u64> {
    if !is_segment_name(name) || segment_size <= 0 {
        return None;
    }
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    let per_log = 0x1_0000_0000u64 / segment_size as u64;
    Some((log * per_log + seg) * segment_size as u64)
}

/// The pseudo-pin of WAL the archiver has not archived yet ([`WalDisk::unarchived`]):
/// nothing the guard may drop, it holds back like the oldest slot. Its name is empty (no
/// slot has that name).
pub const ARCHIVER: &str = "";
pub const ARCHIVER_WHY: &str = "it waits for the archiver (archive_command)";

/// The pins the projection works with: the slots', and the archiver's when WAL waits for it.
pub fn with_archiver(mut pins: Vec<Pin>, disk: &WalDisk) -> Vec<Pin> {
    if let Some(lsn) = disk.unarchived {
        pins.push(Pin { name: ARCHIVER.into(), restart_lsn: lsn, droppable: false, why_not: ARCHIVER_WHY });
    }
    pins
}

/// A slot as the projection sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pin {
    pub name: String,
    pub restart_lsn: u64,
    /// The guard may drop it for the floor (in scope, not excluded, inactive or
    /// `terminate_active`). Otherwise `why_not` says why not.
    pub droppable: bool,
    pub why_not: &'static str,
}

/// The size `pg_wal` would have after a checkpoint, with only `remaining_oldest` (the
/// oldest restart LSN of the slots left, if any) holding WAL back.
pub fn projected_pg_wal(disk: &WalDisk, remaining_oldest: Option<u64>) -> i64 {
    let seg = disk.segment_size.max(1) as u64;
    let cur = disk.insert_lsn / seg;
    let mut first = cur;
    if let Some(r) = remaining_oldest {
        let mut rs = r / seg;
        if let Some(cap) = disk.max_slot_keep {
            rs = rs.max(cur.saturating_sub(cap.max(0) as u64 / seg));
        }
        first = first.min(rs);
    }
    first = first.min(cur.saturating_sub(disk.wal_keep.max(0) as u64 / seg));
    let live = cur - first + 1;
    let ahead = (disk.max_wal.max(0) as u64 / seg).saturating_sub(1);
    let bound = ((live + ahead) * seg).min(i64::MAX as u64) as i64;
    disk.pg_wal.min(bound)
}

/// Bytes a checkpoint would free with `oldest` the oldest restart LSN still held.
fn freed_at(disk: &WalDisk, oldest: Option<u64>) -> i64 {
    disk.pg_wal - projected_pg_wal(disk, oldest)
}

/// The removal horizon as slots go, oldest first: the pins in restart-LSN order and a
/// cursor at the oldest one not yet gone. Slots only ever go, so the cursor only moves
/// forward, and a pass over n slots costs O(n log n), not a scan per drop.
#[derive(Clone)]
pub struct Horizon<'a> {
    pins: &'a [Pin],
    by_name: std::collections::HashMap<&'a str, usize>,
    order: Vec<usize>,
    gone: Vec<bool>,
    at: usize,
}

impl<'a> Horizon<'a> {
    pub fn new(pins: &'a [Pin]) -> Horizon<'a> {
        let mut order: Vec<usize> = (0..pins.len()).collect();
        order.sort_by(|&a, &b| pins[a].restart_lsn.cmp(&pins[b].restart_lsn).then(pins[a].name.cmp(&pins[b].name)));
        let by_name = pins.iter().enumerate().map(|(i, p)| (p.name.as_str(), i)).collect();
        Horizon { pins, by_name, order, gone: vec![false; pins.len()], at: 0 }
    }

    /// The pins, oldest first.
    pub fn oldest_first(&self) -> impl Iterator<Item = &'a Pin> + '_ {
        self.order.iter().map(|&i| &self.pins[i])
    }

    /// Mark the pin named `name` gone.
    pub fn drop_pin(&mut self, name: &str) {
        if let Some(&i) = self.by_name.get(name) {
            self.gone[i] = true;
        }
    }

    /// The oldest pin not gone.
    pub fn oldest(&mut self) -> Option<&'a Pin> {
        while self.at < self.order.len() && self.gone[self.order[self.at]] {
            self.at += 1;
        }
        self.order.get(self.at).map(|&i| &self.pins[i])
    }

    /// What a checkpoint frees with the pins gone so far.
    pub fn freed(&mut self, disk: &WalDisk) -> i64 {
        let oldest = self.oldest().map(|p| p.restart_lsn);
        freed_at(disk, oldest)
    }
}

/// For each pin: the bytes freed by dropping it together with every droppable pin that
/// is not younger (what `pgslotguard.slots.frees_bytes` shows), beyond what a checkpoint
/// frees anyway. O(n log n): with every droppable pin up to a pin's restart LSN gone, the
/// horizon is the oldest *non-droppable* other pin up to there, or else the first pin
/// after it.
pub fn frees_per_slot(disk: &WalDisk, pins: &[Pin]) -> Vec<(String, i64)> {
    let h = Horizon::new(pins);
    let sorted: Vec<u64> = h.oldest_first().map(|p| p.restart_lsn).collect();
    let base = freed_at(disk, sorted.first().copied());
    let stays: Vec<&Pin> = h.oldest_first().filter(|p| !p.droppable).take(2).collect();
    pins.iter()
        .map(|p| {
            let r = p.restart_lsn;
            let after = sorted.get(sorted.partition_point(|&x| x <= r)).copied();
            let stay = stays.iter().find(|o| o.name != p.name).map(|o| o.restart_lsn).filter(|&x| x <= r);
            let oldest = match (stay, after) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            (p.name.clone(), freed_at(disk, oldest) - base)
        })
        .collect()
}

/// What the floor asks of this pass.
#[derive(Debug, Clone, PartialEq)]
pub struct FloorPlan {
    pub floor: i64,
    pub headroom: i64,
    /// Free space is below the floor.
    pub below: bool,
    /// Slots to drop for the floor, oldest first, each with the bytes its drop adds to
    /// what the checkpoint frees.
    pub drops: Vec<(String, i64)>,
    /// Bytes the checkpoint frees with every planned drop (including those decided for
    /// other limits this pass) done.
    pub freed: i64,
    /// Free space is projected back above floor + headroom.
    pub restores: bool,
    /// A slot the guard may not drop that holds back what the floor needs: its name,
    /// why it is not dropped, and the bytes it alone keeps beyond the planned drops.
    pub blocker: Option<(String, &'static str, i64)>,
}

/// Plan the fewest drops that bring free space back above the floor plus the headroom.
/// `already` are slots this pass drops anyway (for other limits): they count as gone.
/// Droppable pins are taken oldest first, since only the oldest slot's drop moves the
/// removal horizon; if even dropping every droppable pin cannot restore the floor, the
/// plan keeps the fewest drops that free the most, and names the slot in the way.
pub fn plan(disk: &WalDisk, floor: Floor, pins: &[Pin], already: &HashSet<&str>) -> FloorPlan {
    let floor = floor.bytes(disk.total);
    let headroom = headroom(floor, disk.segment_size);
    let mut out =
        FloorPlan { floor, headroom, below: disk.free < floor, drops: vec![], freed: 0, restores: true, blocker: None };
    let mut h = Horizon::new(pins);
    for name in already {
        h.drop_pin(name);
    }
    let mut got = h.freed(disk);
    out.freed = got;
    if !out.below {
        return out;
    }
    let target = floor + headroom;
    let candidates: Vec<&Pin> =
        h.oldest_first().filter(|p| p.droppable && !already.contains(p.name.as_str())).collect();

    // Walk oldest first; remember the shortest prefix that frees the most.
    let (mut best_k, mut best) = (0usize, got);
    let mut steps: Vec<(String, i64)> = vec![];
    let mut walk = h.clone();
    for (k, p) in candidates.iter().enumerate() {
        if disk.free + got >= target {
            break;
        }
        walk.drop_pin(&p.name);
        let now = walk.freed(disk);
        steps.push((p.name.clone(), now - got));
        got = now;
        if got > best {
            best = got;
            best_k = k + 1;
        }
    }
    steps.truncate(best_k);
    out.drops = steps;
    out.freed = best;
    out.restores = disk.free + best >= target;
    if !out.restores {
        // What stands in the way: the oldest pin the guard may not drop once every one it
        // may drop is gone (a droppable slot just younger than it frees nothing while it
        // stays, so it is not what is in the way). What it holds back: what goes with it,
        // or, when another such pin sits right beside it, what goes with all of them.
        for p in &candidates {
            h.drop_pin(&p.name);
        }
        if let Some(p) = h.oldest().filter(|p| !p.droppable) {
            let mut without = h.clone();
            without.drop_pin(&p.name);
            let mut extra = without.freed(disk) - best;
            if extra <= 0 {
                for q in pins {
                    without.drop_pin(&q.name);
                }
                extra = without.freed(disk) - best;
            }
            if extra > 0 {
                out.blocker = Some((p.name.clone(), p.why_not, extra));
            }
        }
    }
    out
}

/// What a checkpoint the guard requested gave back, from `pg_wal`'s size before the
/// request and after the checkpoint: the bytes freed (never negative) and the words for
/// its `checkpoint` event. WAL written while the checkpoint ran can leave `pg_wal` larger
/// than before: that is reported as growth, with nothing freed, not as a negative "freed".
pub fn checkpoint_freed(before: i64, after: i64) -> (i64, String) {
    let size = crate::validate::pretty_size;
    if after > before {
        (0, format!("pg_wal {} → {} (freed nothing: pg_wal grew by {} while it ran", size(before), size(after), size(after - before)))
    } else {
        (before - after, format!("pg_wal {} → {} (freed {}", size(before), size(after), size(before - after)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: i64 = 1 << 20;
    const SEG: i64 = 16 * MB;

    /// 1 GB filesystem, insert position at segment 100, max_wal_size 64MB (4 segments),
    /// no wal_keep_size.
    fn disk(free: i64, pg_wal: i64) -> WalDisk {
        WalDisk {
            free,
            total: 1024 * MB,
            pg_wal,
            insert_lsn: (100 * SEG) as u64,
            segment_size: SEG,
            wal_keep: 0,
            max_wal: 64 * MB,
            max_slot_keep: None,
            unarchived: None,
        }
    }
    /// A slot whose restart LSN lies `segs_back` segments behind the insert position.
    fn pin(name: &str, segs_back: i64, droppable: bool) -> Pin {
        Pin {
            name: name.into(),
            restart_lsn: ((100 - segs_back) * SEG) as u64,
            droppable,
            why_not: if droppable { "" } else { "not leased (scope = leased)" },
        }
    }
    fn none() -> HashSet<&'static str> {
        HashSet::default()
    }

    /// The definition the guard's O(n log n) walks must agree with: what a checkpoint
    /// frees once the slots named in `dropped` are gone.
    fn freed(disk: &WalDisk, pins: &[Pin], dropped: &HashSet<&str>) -> i64 {
        freed_at(disk, pins.iter().filter(|p| !dropped.contains(p.name.as_str())).map(|p| p.restart_lsn).min())
    }

    #[test]
    fn a_checkpoint_that_pg_wal_outgrew_frees_nothing_and_says_it_grew() {
        assert_eq!(checkpoint_freed(144 * MB, 96 * MB), (48 * MB, "pg_wal 144 MB → 96 MB (freed 48 MB".to_string()));
        let (freed, words) = checkpoint_freed(128 * MB, 144 * MB);
        assert_eq!(freed, 0);
        assert_eq!(words, "pg_wal 128 MB → 144 MB (freed nothing: pg_wal grew by 16 MB while it ran");
        assert!(!words.contains('-'), "{words}");
    }

    #[test]
    fn a_segment_name_gives_the_lsn_it_starts_at() {
        assert_eq!(segment_start("000000010000000000000003", SEG), Some(3 * SEG as u64));
        assert_eq!(segment_start("0000000200000001000000FE", SEG), Some((0x1_0000_0000u64) + 0xFE * SEG as u64));
        assert_eq!(segment_start("000000010000000100000001", 64 * MB), Some(0x1_0000_0000u64 + 64 * MB as u64));
        assert_eq!(segment_start("00000001.history", SEG), None);
        assert_eq!(segment_start("000000010000000000000003.partial", SEG), None);
    }

    #[test]
    fn floor_parses_sizes_and_percentages() {
        assert_eq!(Floor::parse("-1").unwrap(), None);
        assert_eq!(Floor::parse("").unwrap(), None);
        assert_eq!(Floor::parse("off").unwrap(), None);
        assert_eq!(Floor::parse("20GB").unwrap(), Some(Floor::Bytes(20 << 30)));
        assert_eq!(Floor::parse("10%").unwrap(), Some(Floor::Percent(10.0)));
        assert_eq!(Floor::parse(" 2.5 % ").unwrap(), Some(Floor::Percent(2.5)));
        for bad in ["0", "0%", "100%", "150%", "-5%", "ten%", "10XB", "-2GB", "GB"] {
            assert!(Floor::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Floor::Percent(10.0).bytes(1000 * MB), 100 * MB);
        assert_eq!(Floor::Bytes(5 * MB).bytes(1), 5 * MB);
    }

    #[test]
    fn segment_names_are_recognised() {
        assert!(is_segment_name("000000010000000000000042"));
        for other in ["000000010000000000000042.partial", "00000002.history", "archive_status", "xlogtemp.123", "00000001000000000000004g"] {
            assert!(!is_segment_name(other), "{other}");
        }
    }

    #[test]
    fn headroom_is_a_tenth_of_the_floor_and_at_least_four_segments() {
        assert_eq!(headroom(10 << 30, SEG), 1 << 30);
        assert_eq!(headroom(100 * MB, SEG), 64 * MB);
    }

    #[test]
    fn projection_keeps_live_wal_plus_recycled_segments() {
        // 40 segments on disk, slot 30 segments back: 31 live + 3 recycled ahead = 34.
        let d = disk(0, 40 * SEG);
        assert_eq!(projected_pg_wal(&d, Some((70 * SEG) as u64)), 34 * SEG);
        // no slot: 1 live + 3 ahead
        assert_eq!(projected_pg_wal(&d, None), 4 * SEG);
        // never more than what is there now
        assert_eq!(projected_pg_wal(&disk(0, 10 * SEG), Some((70 * SEG) as u64)), 10 * SEG);
    }

    #[test]
    fn wal_keep_size_and_max_slot_wal_keep_size_count() {
        let mut d = disk(0, 60 * SEG);
        d.wal_keep = 20 * SEG;
        // wal_keep_size keeps 21 live segments even without a slot
        assert_eq!(projected_pg_wal(&d, None), 24 * SEG);
        d.wal_keep = 0;
        d.max_slot_keep = Some(10 * SEG);
        // a slot 50 segments back keeps only 10 (core invalidates it at the checkpoint)
        assert_eq!(projected_pg_wal(&d, Some((50 * SEG) as u64)), 14 * SEG);
    }

    #[test]
    fn retention_is_not_additive_only_the_oldest_slot_counts() {
        let d = disk(0, 60 * SEG);
        let pins = vec![pin("old", 50, true), pin("young", 10, true)];
        // dropping the young slot frees nothing: the old one still holds everything
        assert_eq!(freed(&d, &pins, &["young"].into_iter().collect()), 60 * SEG - 54 * SEG);
        assert_eq!(freed(&d, &pins, &none()), 6 * SEG);
        // dropping the old one frees down to the young one's horizon
        assert_eq!(freed(&d, &pins, &["old"].into_iter().collect()), 60 * SEG - 14 * SEG);
        assert_eq!(freed(&d, &pins, &["old", "young"].into_iter().collect()), 60 * SEG - 4 * SEG);
    }

    #[test]
    fn recycling_means_a_small_slot_frees_nothing() {
        // pg_wal is at the recycling bound; the slot holds back less than max_wal_size
        let mut d = disk(0, 8 * SEG);
        d.max_wal = 1024 * MB;
        let pins = vec![pin("a", 5, true)];
        assert_eq!(freed(&d, &pins, &["a"].into_iter().collect()), 0);
    }

    #[test]
    fn frees_per_slot_counts_every_older_droppable_slot() {
        let d = disk(0, 60 * SEG);
        let pins = vec![pin("old", 50, true), pin("mid", 30, true), pin("standby", 40, false)];
        let f: std::collections::HashMap<_, _> = frees_per_slot(&d, &pins).into_iter().collect();
        // base: a checkpoint alone frees 60 - 54 = 6 segments
        // old alone: the standby (40 back) becomes the horizon: 60 - 44 = 16, minus base
        assert_eq!(f["old"], 10 * SEG);
        // mid with every older droppable (old): standby still holds 40 back
        assert_eq!(f["mid"], 10 * SEG);
        // standby with old: horizon at mid (30 back): 60 - 34 = 26, minus base
        assert_eq!(f["standby"], 20 * SEG);
    }

    #[test]
    fn frees_per_slot_agrees_with_the_definition_on_many_shapes() {
        // the O(n log n) walk against the definition: drop the slot and every droppable
        // one not younger, project, subtract what a checkpoint frees anyway
        let d = disk(0, 200 * SEG);
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            seed >> 33
        };
        for round in 0..200 {
            let n = 1 + (round % 9);
            let pins: Vec<Pin> =
                (0..n).map(|i| pin(&format!("s{i}"), 1 + (next() % 60) as i64, next() % 3 != 0)).collect();
            let base = freed(&d, &pins, &HashSet::default());
            for (name, got) in frees_per_slot(&d, &pins) {
                let p = pins.iter().find(|p| p.name == name).unwrap();
                let mut set: HashSet<&str> = pins
                    .iter()
                    .filter(|o| o.droppable && o.restart_lsn <= p.restart_lsn)
                    .map(|o| o.name.as_str())
                    .collect();
                set.insert(p.name.as_str());
                assert_eq!(got, freed(&d, &pins, &set) - base, "{name} in {pins:?}");
            }
        }
    }

    #[test]
    fn above_the_floor_nothing_is_planned() {
        let d = disk(500 * MB, 60 * SEG);
        let p = plan(&d, Floor::Bytes(100 * MB), &[pin("a", 50, true)], &none());
        assert!(!p.below);
        assert!(p.drops.is_empty());
    }

    #[test]
    fn below_the_floor_the_oldest_slot_goes_first_and_only_as_many_as_needed() {
        // free 50 MB, floor 100 MB, headroom 64 MB: needs 114 MB more.
        let d = disk(50 * MB, 60 * SEG);
        let pins = vec![pin("young", 10, true), pin("old", 50, true), pin("mid", 30, true)];
        let p = plan(&d, Floor::Bytes(100 * MB), &pins, &none());
        assert!(p.below && p.restores);
        // dropping "old" moves the horizon to "mid": frees 60 - 34 = 26 segments = 416 MB
        assert_eq!(p.drops, vec![("old".to_string(), 20 * SEG)]);
        assert_eq!(p.freed, 26 * SEG);
        assert_eq!(p.blocker, None);
    }

    #[test]
    fn a_checkpoint_alone_may_be_enough() {
        // the slot is young; a checkpoint alone frees 55 of the 60 segments
        let d = disk(50 * MB, 60 * SEG);
        let p = plan(&d, Floor::Bytes(100 * MB), &[pin("a", 1, true)], &none());
        assert!(p.below && p.restores);
        assert!(p.drops.is_empty());
        assert_eq!(p.freed, 55 * SEG);
    }

    #[test]
    fn slots_dropped_for_other_limits_count_as_gone() {
        let d = disk(50 * MB, 60 * SEG);
        let pins = vec![pin("old", 50, true), pin("mid", 30, true)];
        let p = plan(&d, Floor::Bytes(100 * MB), &pins, &["old"].into_iter().collect());
        assert!(p.restores);
        assert!(p.drops.is_empty());
    }

    #[test]
    fn an_out_of_scope_slot_in_the_way_is_named_and_not_dropped() {
        let d = disk(10 * MB, 60 * SEG);
        let pins = vec![pin("standby", 55, false), pin("orphan", 40, true)];
        let p = plan(&d, Floor::Bytes(200 * MB), &pins, &none());
        assert!(p.below && !p.restores);
        // dropping the orphan frees nothing while the older standby slot stays
        assert!(p.drops.is_empty(), "{p:?}");
        let (name, why, extra) = p.blocker.unwrap();
        assert_eq!(name, "standby");
        assert_eq!(why, "not leased (scope = leased)");
        // what it holds back from the floor: with it gone, the orphan's drop frees too, and
        // the horizon is the insert position: 60 - 5 = 55 segments instead of 60 - 59 = 1
        assert_eq!(extra, 55 * SEG);
    }

    #[test]
    fn drops_that_help_are_kept_even_when_the_floor_cannot_be_reached() {
        let d = disk(10 * MB, 60 * SEG);
        let pins = vec![pin("orphan", 55, true), pin("standby", 40, false)];
        let p = plan(&d, Floor::Bytes(900 * MB), &pins, &none());
        assert!(!p.restores);
        assert_eq!(p.drops.len(), 1);
        assert_eq!(p.drops[0].0, "orphan");
        assert_eq!(p.blocker.as_ref().map(|b| b.0.as_str()), Some("standby"));
    }

    #[test]
    fn nothing_is_dropped_when_nothing_would_be_freed() {
        let mut d = disk(10 * MB, 8 * SEG);
        d.max_wal = 1024 * MB;
        let p = plan(&d, Floor::Bytes(100 * MB), &[pin("a", 5, true)], &none());
        assert!(p.below && !p.restores);
        assert!(p.drops.is_empty());
        assert_eq!(p.blocker, None);
    }
}
