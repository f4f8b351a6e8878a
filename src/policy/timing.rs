//! When the guard looks again: pure scheduling, no clock of its own.
//!
//! Three things decide the next pass beside `pgslotguard.naptime`, which only bounds an
//! idle sleep:
//! - the time-driven limits (lease expiry, age, inactivity), from [`super::next_due`];
//! - the WAL budget: how much WAL may still be written before a slot in scope crosses its
//!   retained-WAL limit or free space crosses the floor ([`wal_budget`]). Between passes the
//!   worker probes the WAL insert position (a read of shared memory, no transaction) and
//!   passes again once half the budget is spent ([`next_probe`]); a probe's spacing follows
//!   the WAL rate measured over the recent probes ([`WalRate`]);
//! - a wall-clock jump: a time-driven limit is acted on only once the monotonic clock
//!   agrees that the time has passed ([`ClockWatch`]).
//!
//! All times are microseconds. `wall` times are the database clock (`GetCurrentTimestamp`,
//! what lease times are stored in); `mono` times come from a monotonic clock that no one
//! sets, counted from any origin.

use super::{Action, Snapshot, Verdict};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::collections::VecDeque;

/// The shortest time between two probes: at 15 MB/s of WAL, 20 ms is 300 kB.
pub const MIN_PROBE_US: i64 = 20_000;
/// The longest time between two probes while a WAL budget applies: how late the guard can
/// notice that a quiet server started writing. A probe costs a few microseconds.
pub const MAX_PROBE_US: i64 = 200_000;
/// The rate is measured over the probes and passes of this last stretch of time.
const RATE_WINDOW_US: i64 = 5_000_000;
/// Two observations closer than this are too close to measure a rate between.
const MIN_RATE_SPAN_US: i64 = 10_000;
/// A wall clock that moves this much more than the monotonic one, between two passes, has
/// jumped (rather than drifted or been slewed by NTP, which moves it by at most 0.05 %).
pub const JUMP_TOLERANCE_US: i64 = 1_000_000;

/// The WAL insert position, observed at monotonic times; the rate is the fastest seen
/// between two consecutive observations of the last few seconds, so that a burst is not
/// averaged away (erring toward looking again too soon, never too late).
#[derive(Debug, Default, Clone)]
pub struct WalRate {
    samples: VecDeque<(i64, u64)>,
}

impl WalRate {
    pub fn observe(&mut self, mono: i64, lsn: u64) {
        if let Some(&(t, l)) = self.samples.back() {
            if mono - t < MIN_RATE_SPAN_US || lsn < l {
                // Too close to measure (or WAL position moved back: a new timeline).
                if lsn < l {
                    self.samples.clear();
                } else {
                    return;
                }
            }
        }
        self.samples.push_back((mono, lsn));
        while self.samples.len() > 2 && self.samples.front().is_some_and(|&(t, _)| mono - t > RATE_WINDOW_US) {
            self.samples.pop_front();
        }
    }

    /// Bytes per second, once two observations are far enough apart.
    pub fn bytes_per_s(&self) -> Option<f64> {
        self.samples
            .iter()
            .zip(self.samples.iter().skip(1))
            .map(|(&(t0, l0), &(t1, l1))| (l1 - l0) as f64 * 1e6 / (t1 - t0) as f64)
            .reduce(f64::max)
    }
}

/// How many bytes of WAL may still be written before a limit that WAL moves is crossed:
/// the smallest headroom under a retained-WAL limit among the slots in scope that the pass
/// left alone, and the free space above the floor, when the disk was measured. `None`: no
/// such limit applies, and only time can bring the next breach.
///
/// The headroom assumes the slot's restart LSN stands still (an orphaned slot): a slot that
/// streams keeps its headroom, and the guard only probes more than it needed to.
pub fn wal_budget(verdict: &Verdict) -> Option<i64> {
    // A slot retains WAL (retained_bytes is set) only when it has a restart LSN.
    let retained = verdict
        .decisions
        .iter()
        .filter(|d| d.slot_exists && d.in_scope && d.action == Action::None)
        .filter_map(|d| Some(d.retained_limit? - d.retained_bytes?));
    // Below the floor, this pass has dropped what it could (or nothing it may drop helps):
    // more WAL changes nothing the next pass could do, so only free space above it counts.
    // Exactly at the floor (free space is measured in whole blocks, and a filesystem that
    // fills segment by segment lands on it) the budget is zero: the next WAL written is
    // the crossing, so the worker passes at once when it sees any.
    let floor = verdict
        .disk
        .as_ref()
        .and_then(|v| v.plan.as_ref().map(|plan| v.disk.free - plan.floor))
        .filter(|&b| b >= 0);
    retained.chain(floor).map(|b| b.max(0)).min()
}

/// What the worker does at a probe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Probe {
    /// Half the budget is spent: pass now.
    PassNow,
    /// Probe again after this many microseconds.
    In(i64),
}

/// The worker has written `written` bytes of WAL since the pass that measured `budget`.
/// Pass again once half of it is spent: each pass halves what is left, so the passes close
/// in on a crossing and the last one before it comes at most [`MIN_PROBE_US`] of WAL
/// early or late. Until then, probe when half the budget would be spent at the measured
/// rate, but at least every [`MAX_PROBE_US`] (the rate can rise) and at most every
/// [`MIN_PROBE_US`].
///
/// No WAL written, no pass: what WAL moves has not moved (so a slot exactly at its limit
/// does not make the worker pass in a loop on an idle server).
pub fn next_probe(budget: i64, written: i64, rate: Option<f64>) -> Probe {
    let left = budget / 2 - written;
    if left <= 0 && written > 0 {
        return Probe::PassNow;
    }
    let left = left.max(1);
    let wait = match rate {
        Some(r) if r > 0.0 => (left as f64 / r * 1e6) as i64,
        _ => MAX_PROBE_US,
    };
    Probe::In(wait.clamp(MIN_PROBE_US, MAX_PROBE_US))
}

/// The deadline of each slot's nearest time-driven limit (lease expiry, age, inactivity)
/// on the wall clock, for slots in scope the pass leaves alone or drops for such a limit.
pub fn time_deadlines<'a>(policy: &super::Policy, snap: &'a Snapshot) -> Vec<(&'a str, i64)> {
    let leases: HashMap<&str, &super::Lease> = snap.leases.iter().map(|l| (l.slot_name.as_str(), l)).collect();
    let seen: HashMap<&str, &super::Seen> = snap.seen.iter().map(|s| (s.slot_name.as_str(), s)).collect();
    let mut out = Vec::with_capacity(snap.slots.len());
    for slot in &snap.slots {
        let name = slot.name.as_str();
        if let Some(d) = slot_deadline(policy, snap, slot, leases.get(name).copied(), seen.get(name).copied()) {
            out.push((name, d));
        }
    }
    out
}

/// The first time one of a slot's time-driven limits falls due (lease expiry, age,
/// inactivity, stall), on the wall clock.
pub(super) fn slot_deadline(
    policy: &super::Policy,
    snap: &Snapshot,
    slot: &super::SlotInfo,
    lease: Option<&super::Lease>,
    seen: Option<&super::Seen>,
) -> Option<i64> {
    let expiry = lease.map(|l| super::logical::expiry(l, slot, seen, snap.now));
    let born = lease.map(|l| l.born_at).or(seen.map(|s| s.first_seen));
    let age = super::age_limit(policy, lease).zip(born).map(|(limit, born)| born + limit + 1);
    let idle = match (super::inactive_limit(policy, lease), seen.and_then(|s| s.inactive_since)) {
        (Some(limit), Some(since)) if !slot.active() => Some(since + limit + 1),
        _ => None,
    };
    let stalled = policy.max_stalled_us.zip(super::stalled_since(snap, slot, seen)).map(|(limit, since)| since + limit + 1);
    [expiry, age, idle, stalled].into_iter().flatten().min()
}

/// The rule for a wall-clock jump. The database clock says when a lease expires or a
/// slot is too old or idle too long (those times are stored, and survive restarts); the
/// monotonic clock says how much time has really passed. The worker acts on a time-driven
/// limit only when both agree:
/// - the first time the worker sees a deadline, it notes when that deadline falls on the
///   monotonic clock (now + the wall time left);
/// - a slot whose deadline has passed on the wall clock but not on the monotonic one is
///   *held*: its time-driven limits are not breached yet (a clock set forward does not
///   make the guard drop early), and the worker wakes when the monotonic deadline comes;
/// - a clock set back makes a deadline later on the wall clock; the wall clock wins, so
///   the lease lasts longer in real time, never shorter. Nothing stalls: sleeps are timed
///   on the monotonic clock and never longer than naptime, and the retained-WAL limit and
///   the floor, which no clock moves, still apply;
/// - a changed deadline (a renewed lease, a slot that became active and idle again) is
///   noted afresh. A worker that starts anew knows nothing of jumps before it started.
#[derive(Debug, Default, Clone)]
pub struct ClockWatch {
    /// Slot → (wall deadline, monotonic deadline).
    noted: HashMap<String, (i64, i64)>,
    /// The last pass's (wall, mono) times, to report a jump.
    last: Option<(i64, i64)>,
    /// The worker said that slots are held (once per stretch of holding).
    pub held_logged: bool,
}

impl ClockWatch {
    /// Note this pass's deadlines; returns the slots held (see the type's rule) and the
    /// time until the nearest monotonic deadline of a held slot.
    pub fn hold(&mut self, wall: i64, mono: i64, deadlines: &[(&str, i64)]) -> (HashSet<String>, Option<i64>) {
        let mut noted = HashMap::default();
        let mut held = HashSet::default();
        let mut next: Option<i64> = None;
        for (name, wall_dl) in deadlines {
            let mono_dl = match self.noted.get(*name) {
                Some(&(w, m)) if w == *wall_dl => m,
                _ => mono + (wall_dl - wall).max(0),
            };
            if *wall_dl <= wall && mono_dl > mono {
                held.insert(name.to_string());
                let left = mono_dl - mono;
                next = Some(next.map_or(left, |n| n.min(left)));
            }
            noted.insert(name.to_string(), (*wall_dl, mono_dl));
        }
        self.noted = noted;
        (held, next)
    }

    /// How far the wall clock moved beyond (positive) or short of (negative) the monotonic
    /// clock since the last pass, when that is more than [`JUMP_TOLERANCE_US`].
    pub fn jump(&mut self, wall: i64, mono: i64) -> Option<i64> {
        let jump = self.last.map(|(w, m)| (wall - w) - (mono - m));
        self.last = Some((wall, mono));
        jump.filter(|j| j.abs() > JUMP_TOLERANCE_US)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{judge, Lease, Policy, SlotInfo};

    const S: i64 = 1_000_000;
    const MB: i64 = 1 << 20;

    #[test]
    fn the_rate_is_the_fastest_recent_stretch() {
        let mut r = WalRate::default();
        assert_eq!(r.bytes_per_s(), None);
        r.observe(0, 0);
        assert_eq!(r.bytes_per_s(), None, "one observation measures nothing");
        r.observe(S, 10 * MB as u64);
        r.observe(2 * S, 40 * MB as u64);
        r.observe(3 * S, 45 * MB as u64);
        assert_eq!(r.bytes_per_s(), Some(30.0 * MB as f64));
        // a burst older than the window is forgotten
        r.observe(9 * S, 50 * MB as u64);
        r.observe(10 * S, 51 * MB as u64);
        assert_eq!(r.bytes_per_s(), Some(MB as f64));
    }

    #[test]
    fn observations_too_close_together_are_skipped_and_a_new_timeline_restarts_the_rate() {
        let mut r = WalRate::default();
        r.observe(0, 0);
        r.observe(1_000, 100 * MB as u64);
        assert_eq!(r.bytes_per_s(), None, "1 ms apart: not a rate");
        r.observe(S, MB as u64);
        assert_eq!(r.bytes_per_s(), Some(MB as f64));
        r.observe(2 * S, 0);
        assert_eq!(r.bytes_per_s(), None);
    }

    #[test]
    fn a_pass_comes_once_half_the_budget_is_spent() {
        assert_eq!(next_probe(64 * MB, 32 * MB, Some(1.0)), Probe::PassNow);
        // at the limit: the first byte written crosses it; none written, nothing to do
        assert_eq!(next_probe(0, 1, None), Probe::PassNow);
        assert_eq!(next_probe(0, 0, None), Probe::In(MAX_PROBE_US));
        // 16 MB to go at 16 MB/s: a second, but a probe at most every 200 ms
        assert_eq!(next_probe(64 * MB, 16 * MB, Some(16.0 * MB as f64)), Probe::In(MAX_PROBE_US));
        // 1 MB to go at 100 MB/s: 10 ms, but no probe sooner than 20 ms
        assert_eq!(next_probe(64 * MB, 31 * MB, Some(100.0 * MB as f64)), Probe::In(MIN_PROBE_US));
        // 1 MB to go at 20 MB/s: 50 ms
        assert_eq!(next_probe(64 * MB, 31 * MB, Some(20.0 * MB as f64)), Probe::In(50_000));
        // no WAL written lately: the longest probe
        assert_eq!(next_probe(64 * MB, 0, Some(0.0)), Probe::In(MAX_PROBE_US));
    }

    #[test]
    fn passes_close_in_on_a_crossing_and_the_overshoot_is_one_short_probe_of_wal() {
        // An orphaned slot under a 64 MB limit, 15 MB/s of WAL, the worker probing and
        // passing as the functions say: the pass that sees the breach comes within a
        // minimal probe of WAL after the crossing.
        let limit = 64 * MB;
        let rate = 15.0 * MB as f64;
        let (mut t, mut retained, mut passes) = (0i64, 0i64, 0);
        let mut budget = limit - retained;
        let mut written = 0;
        loop {
            match next_probe(budget, written, Some(rate)) {
                Probe::PassNow => {
                    passes += 1;
                    if retained > limit {
                        break;
                    }
                    budget = limit - retained;
                    written = 0;
                    continue;
                }
                Probe::In(us) => {
                    t += us;
                    let w = (rate * us as f64 / 1e6) as i64;
                    written += w;
                    retained += w;
                }
            }
            if budget <= 0 && retained > limit {
                passes += 1;
                break;
            }
        }
        let over = retained - limit;
        assert!(over <= (rate * MIN_PROBE_US as f64 / 1e6) as i64 + 1, "overshoot {over} bytes after {passes} passes");
        assert!(passes < 20, "{passes} passes to close in on a crossing 4 s away");
        assert!(t > 4 * S && t < 5 * S);
    }

    fn slot(name: &str, restart: u64) -> SlotInfo {
        SlotInfo {
            synced: false,
            system: None,
            name: name.into(),
            physical: true,
            temporary: false,
            active_pid: None,
            restart_lsn: Some(restart),
            invalidation: None,
            core_inactive_since: None,
            sender: None,
            xmin: None,
            catalog_xmin: None,
            logical: None,
        }
    }

    fn lease(name: &str, expires_at: i64) -> Lease {
        Lease {
            slot_name: name.into(),
            owner: "backup".into(),
            owner_oid: 10,
            leased_at: 0,
            born_at: 0,
            expires_at,
            max_retained: None,
            max_inactive: None,
            max_age: None,
            max_xmin_age: None,
            renewed_at: None,
            limit_by_superuser: false,
            adopted: false,
            logical: false,
            while_active: false,
        }
    }

    fn snap(slots: Vec<SlotInfo>, leases: Vec<Lease>) -> Snapshot {
        Snapshot {
            now: 10 * S,
            mono: 0,
            current_lsn: 100 * MB as u64,
            slots,
            leases: leases.into(),
            seen: Default::default(),
            warned: Default::default(),
            restart_before: Default::default(),
            disk: None,
            held: HashSet::default(),
            next_xid: 0,
            recent_drops: Default::default(),
        }
    }

    #[test]
    fn the_budget_is_the_smallest_headroom_of_a_slot_in_scope_left_alone() {
        let p = Policy { max_retained_wal: Some(64 * MB), ..Policy::default() };
        let mut tight = lease("b", 3600 * S);
        tight.max_retained = Some(40 * MB);
        let s = snap(
            vec![slot("a", 50 * MB as u64), slot("b", 80 * MB as u64), slot("unleased", 0), slot("over", 0)],
            vec![lease("a", 3600 * S), tight, lease("over", 3600 * S)],
        );
        // a: 64 - 50 = 14 MB; b: 40 - 20 = 20 MB; unleased: out of scope; over: dropped now
        assert_eq!(wal_budget(&judge(&p, &s)), Some(14 * MB));
        // without the global limit, b's own limit still applies
        assert_eq!(wal_budget(&judge(&Policy::default(), &s)), Some(20 * MB));
        // no retained-WAL limit and no floor: time alone brings the next breach
        let s = snap(vec![slot("a", 0)], vec![lease("a", 3600 * S)]);
        assert_eq!(wal_budget(&judge(&Policy::default(), &s)), None);
    }

    #[test]
    fn the_budget_includes_the_free_space_above_the_floor() {
        use crate::policy::disk::{Floor, WalDisk};
        let p = Policy { min_free_wal: Some(Floor::Bytes(100 * MB)), ..Policy::default() };
        let mut s = snap(vec![slot("a", 90 * MB as u64)], vec![lease("a", 3600 * S)]);
        s.disk = Some(WalDisk {
            free: 130 * MB,
            total: 1000 * MB,
            pg_wal: 16 * MB,
            insert_lsn: 100 * MB as u64,
            segment_size: 16 * MB,
            wal_keep: 0,
            max_wal: 1024 * MB,
            max_slot_keep: None,
            unarchived: None,
        });
        assert_eq!(wal_budget(&judge(&p, &s)), Some(30 * MB));
        // below the floor: the pass did what it could; no budget from the floor
        s.disk.as_mut().unwrap().free = 90 * MB;
        assert_eq!(wal_budget(&judge(&p, &s)), None);
    }

    #[test]
    fn free_space_exactly_at_the_floor_leaves_a_budget_of_zero_so_the_next_wal_passes_at_once() {
        use crate::policy::disk::{Floor, WalDisk};
        // No retained-WAL limit: the floor is the only budget (a standby's orphan whose
        // pg_wal filled segment by segment onto the floor stopped the probes before).
        let p = Policy { min_free_wal: Some(Floor::Bytes(64 * MB)), ..Policy::default() };
        let mut s = snap(vec![slot("a", 90 * MB as u64)], vec![lease("a", 3600 * S)]);
        s.disk = Some(WalDisk {
            free: 64 * MB,
            total: 160 * MB,
            pg_wal: 96 * MB,
            insert_lsn: 100 * MB as u64,
            segment_size: 16 * MB,
            wal_keep: 0,
            max_wal: 32 * MB,
            max_slot_keep: None,
            unarchived: None,
        });
        assert_eq!(wal_budget(&judge(&p, &s)), Some(0));
        assert_eq!(next_probe(0, 8192, None), Probe::PassNow);
        assert!(matches!(next_probe(0, 0, None), Probe::In(_)), "no WAL written, no pass");
    }

    #[test]
    fn deadlines_are_the_nearest_time_limit_of_each_slot() {
        let p = Policy { max_slot_age_us: Some(100 * S), ..Policy::default() };
        let s = snap(vec![slot("a", 0), slot("b", 0)], vec![lease("a", 500 * S), lease("b", 50 * S)]);
        assert_eq!(time_deadlines(&p, &s), vec![("a", 100 * S + 1), ("b", 50 * S)]);
    }

    #[test]
    fn a_clock_set_forward_holds_a_deadline_until_the_monotonic_clock_reaches_it() {
        let mut w = ClockWatch::default();
        let dl = vec![("a", 1000 * S)];
        // wall 0, mono 5 s: deadline 1000 s ahead on both clocks
        assert_eq!(w.hold(0, 5 * S, &dl), (HashSet::default(), None));
        assert_eq!(w.jump(0, 5 * S), None);
        // one second later the wall clock reads 2000 s: a jump of 1999 s
        let (held, next) = w.hold(2000 * S, 6 * S, &dl);
        assert!(held.contains("a"));
        assert_eq!(next, Some(999 * S));
        assert_eq!(w.jump(2000 * S, 6 * S), Some(1999 * S));
        // the monotonic deadline comes: no longer held
        let (held, _) = w.hold(2999 * S, 1005 * S, &dl);
        assert!(held.is_empty());
    }

    #[test]
    fn a_clock_set_back_lengthens_a_lease_and_a_renewal_is_noted_afresh() {
        let mut w = ClockWatch::default();
        let dl = vec![("a", 100 * S)];
        w.hold(90 * S, 0, &dl);
        // the clock goes back an hour: the wall deadline is far off, nothing held; the
        // lease ends when the wall clock says so (later in real time)
        let (held, next) = w.hold(90 * S - 3600 * S, 20 * S, &dl);
        assert!(held.is_empty() && next.is_none());
        assert_eq!(w.jump(90 * S - 3600 * S, 20 * S), None, "the first pass only notes the clocks");
        // renewed after a forward jump: the new deadline is noted from now
        let mut w = ClockWatch::default();
        w.hold(0, 0, &dl);
        let renewed = vec![("a", 5000 * S)];
        let (held, _) = w.hold(4000 * S, S, &renewed);
        assert!(held.is_empty());
        let (held, next) = w.hold(5001 * S, 2 * S, &renewed);
        assert!(held.contains("a"), "the renewed deadline is 1000 s of real time after it was noted");
        assert_eq!(next, Some(999 * S));
    }

    #[test]
    fn a_worker_that_starts_after_a_deadline_acts_at_once() {
        let mut w = ClockWatch::default();
        let (held, _) = w.hold(100 * S, 0, &[("a", 50 * S)]);
        assert!(held.is_empty());
    }
}
