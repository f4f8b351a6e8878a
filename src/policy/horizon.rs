//! The transaction horizon a slot holds back, and the slots the HA machinery owns.
//!
//! A slot keeps `xmin` (a standby's oldest snapshot, sent by `hot_standby_feedback`) and
//! `catalog_xmin` (a logical slot's). VACUUM removes no row version newer than the
//! oldest of them in any table of the cluster, and freezing cannot pass it: at about
//! 2^31 − 3 million transactions the primary refuses writes. `pgslotguard.max_xmin_age`
//! limits how many transactions old the horizon of a slot in scope may get.
//!
//! Ages are counted as `age(xid)` counts them: from the next transaction ID, modulo 2^32,
//! read as a signed 32-bit distance (`(int32) (next - xid)` in xid.c). A slot's xmin can
//! never be more than 2^31 transactions old: the server stops assigning them first.
//!
//! Also here: `synchronized_standby_slots` (17+). A failover-enabled logical walsender
//! sends nothing until every slot named there has confirmed the WAL, and waits while a
//! named slot does not exist; dropping one stops logical replication. The guard never
//! drops such a slot: it warns, and names the setting.

use super::{Action, Breach, Decision, Policy};

/// The first normal transaction ID: 0 is invalid, 1 bootstrap and 2 frozen.
const FIRST_NORMAL_XID: u32 = 3;

/// How many transactions `xid` is old, counted from `next_full_xid` (the next full
/// transaction ID, `ReadNextFullTransactionId`) as `age()` counts: the 32-bit distance,
/// read as signed. `None` for an unset (or special) xid, or when the next ID is unknown.
pub fn xid_age(next_full_xid: u64, xid: Option<u32>) -> Option<i64> {
    let xid = xid.filter(|&x| x >= FIRST_NORMAL_XID)?;
    if next_full_xid < FIRST_NORMAL_XID as u64 {
        return None;
    }
    // The low 32 bits of a full transaction ID are the xid; the epoch does not matter
    // for a distance of less than 2^31.
    Some((next_full_xid as u32).wrapping_sub(xid) as i32 as i64)
}

/// How many transactions may still be assigned before a slot in scope that the pass left
/// alone crosses its transaction-horizon limit, or the warn fraction of it: the worker
/// probes the next transaction ID between passes and passes again once half of it is
/// used ([`super::timing::next_probe`], the same rule as the WAL budget). `None`: no such
/// limit applies.
///
/// The headroom assumes the slot's horizon stands still (a standby that has gone, an idle
/// logical slot): one that moves keeps its headroom, and the guard only probes more than
/// it needed to.
pub fn xid_budget(policy: &Policy, decisions: &[Decision]) -> Option<i64> {
    let warn = policy.warn_fraction;
    decisions
        .iter()
        .filter(|d| d.slot_exists && d.in_scope && d.action == Action::None)
        .filter_map(|d| d.limit(Breach::Xmin))
        .flat_map(|l| {
            // Over the limit when the age is above it: one more transaction than the gap.
            let breach = l.limit - l.used;
            // Warned when the age reaches the fraction (`frac >= warn`).
            let warning = (warn > 0.0 && warn < 1.0 && l.frac < warn).then(|| (warn * l.limit as f64).ceil() as i64 - l.used - 1);
            [Some(breach), warning].into_iter().flatten()
        })
        .map(|b| b.max(0))
        .min()
}

/// A slot out of scope that holds the horizon back more than `max_xmin_age`: never
/// touched, but named. Unlike WAL, which the free-space floor guards, nothing else stops
/// such a slot from taking the cluster to wraparound, so the pass warns once per crossing
/// (`Action::Wait`, state still `out_of_scope`), saying why it leaves the slot alone.
pub fn name_out_of_scope_slot(policy: &Policy, lease: Option<&super::Lease>, d: &mut Decision) {
    let (Some(limit), Some(age)) = (super::xmin_limit(policy, lease), d.xmin_age.max(d.catalog_xmin_age)) else { return };
    if age > limit && d.action == Action::None {
        let words = super::Limit { breach: Breach::Xmin, over: true, frac: age as f64 / limit as f64, used: age, limit }.words();
        d.action = Action::Wait { breach: Breach::Xmin, reason: format!("{words}; not dropped: {}", d.scope_reason) };
    }
}

/// The slot names of `synchronized_standby_slots`, as core reads the list
/// (`SplitIdentifierString`): comma-separated, blanks around names ignored, a quoted name
/// kept as written (`""` for a quote), an unquoted one in lower case.
pub fn parse_slot_list(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in value.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let name = match part.strip_prefix('"').and_then(|p| p.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\""),
            None => part.to_lowercase(),
        };
        out.push(name);
    }
    out
}

/// Why a slot named in `synchronized_standby_slots` is not dropped.
pub const SYNCHRONIZED_STANDBY_SLOTS_WHY: &str = "named in synchronized_standby_slots: failover-enabled logical replication stops while a slot named there does not exist; remove it from synchronized_standby_slots (and reload) to let the guard drop it";

/// The slot is named in `synchronized_standby_slots`.
pub fn is_synchronized_standby_slot(policy: &Policy, name: &str) -> bool {
    policy.synchronized_standby_slots.iter().any(|n| n == name)
}

/// A drop decided for a slot named in `synchronized_standby_slots` becomes a warning
/// (whatever the limit, and with no walsender terminated): the slot stays.
pub fn spare_synchronized_standby_slot(policy: &Policy, d: &mut Decision) {
    if !is_synchronized_standby_slot(policy, &d.slot_name) {
        return;
    }
    if let Action::Drop { breach, terminate, reason } = &d.action {
        let words = match terminate {
            Some(pid) => reason.trim_end_matches(&format!("; walsender PID {pid} terminated (terminate_active)")).to_string(),
            None => reason.clone(),
        };
        d.action = Action::Wait { breach: *breach, reason: format!("{words}; not dropped: {SYNCHRONIZED_STANDBY_SLOTS_WHY}") };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{decide, judge, next_due, warnings, Lease, Outcome, Scope, SlotInfo, Snapshot};
    use std::rc::Rc;

    const S: i64 = 1_000_000;
    const NOW: i64 = 1_000_000 * S;
    /// An epoch past the first, so that 32-bit wraparound is in play.
    const NEXT: u64 = (5u64 << 32) + 1_000_000;

    fn slot(name: &str, xmin: Option<u32>, catalog_xmin: Option<u32>) -> SlotInfo {
        SlotInfo {
            synced: false,
            system: None,
            sender: None,
            name: name.into(),
            physical: catalog_xmin.is_none(),
            temporary: false,
            active_pid: None,
            restart_lsn: Some(0),
            invalidation: None,
            core_inactive_since: None,
            xmin,
            catalog_xmin,
            logical: None,
        }
    }
    fn lease(name: &str) -> Lease {
        Lease {
            slot_name: name.into(),
            owner: "backup".into(),
            owner_oid: 10,
            leased_at: NOW - S,
            born_at: NOW - S,
            expires_at: NOW + 3600 * S,
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
        Snapshot { now: NOW, current_lsn: 0, slots, leases: leases.into(), next_xid: NEXT, ..Snapshot::default() }
    }
    /// The xid that is `age` transactions old at NEXT.
    fn aged(age: u32) -> Option<u32> {
        Some((NEXT as u32).wrapping_sub(age))
    }
    fn xmin_policy(limit: i64) -> Policy {
        Policy { max_xmin_age: Some(limit), scope: Scope::All, ..Policy::default() }
    }
    fn one(p: &Policy, s: &Snapshot) -> Decision {
        let mut d = decide(p, s);
        assert_eq!(d.len(), 1, "{d:#?}");
        d.remove(0)
    }

    #[test]
    fn ages_are_counted_like_age_across_the_32_bit_wraparound() {
        // (next full xid, xid, age)
        let cases: &[(u64, Option<u32>, Option<i64>)] = &[
            (1000, Some(900), Some(100)),
            // the xid was assigned before the counter wrapped to a new epoch
            ((1 << 32) + 10, Some(u32::MAX - 9), Some(20)),
            ((1 << 32) + 10, Some(3), Some(7)),
            // the oldest an xid can be, 2^31 - 1 transactions
            ((7 << 32) + 5, Some(5u32.wrapping_sub(i32::MAX as u32)), Some(i32::MAX as i64)),
            // an xid ahead of the counter (read out of order) is negative, as age() says
            (1000, Some(1010), Some(-10)),
            // unset and special xids hold nothing
            (1000, None, None),
            (1000, Some(0), None),
            (1000, Some(2), None),
            // the counter not read
            (0, Some(900), None),
        ];
        for &(next, xid, want) in cases {
            assert_eq!(xid_age(next, xid), want, "next {next}, xid {xid:?}");
        }
    }

    #[test]
    fn the_older_of_xmin_and_catalog_xmin_is_held_against_the_limit() {
        let p = xmin_policy(10_000);
        // a standby's slot, 10 001 transactions behind: dropped as xmin_drop
        let d = one(&p, &snap(vec![slot("standby", aged(10_001), None)], vec![]));
        assert_eq!(d.xmin_age, Some(10_001));
        assert_eq!(d.state, "over_xmin");
        match &d.action {
            Action::Drop { breach: Breach::Xmin, terminate: None, reason } => {
                assert!(reason.contains("10001 transactions back, above pgslotguard.max_xmin_age (10000)"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(Breach::Xmin.drop_action(), Outcome::XminDrop);
        assert_eq!(Outcome::XminDrop.as_str(), "xmin_drop");
        assert!(Outcome::XminDrop.is_guard_drop());
        // exactly at the limit is not over it
        assert_eq!(one(&p, &snap(vec![slot("standby", aged(10_000), None)], vec![])).action, Action::None);
        // a logical slot: catalog_xmin old, xmin recent; the older one counts
        let d = one(&p, &snap(vec![slot("sub", aged(5), aged(20_000))], vec![]));
        assert_eq!((d.xmin_age, d.catalog_xmin_age), (Some(5), Some(20_000)));
        assert!(matches!(d.action, Action::Drop { breach: Breach::Xmin, .. }));
        // a slot that holds no horizon is never over it
        let d = one(&p, &snap(vec![slot("backup", None, None)], vec![]));
        assert_eq!((d.limit(Breach::Xmin), &d.action, d.xmin_age), (None, &Action::None, None));
        // the limit off: shown, never acted on
        let d = one(&Policy { scope: Scope::All, ..Policy::default() }, &snap(vec![slot("standby", aged(1 << 30), None)], vec![]));
        assert_eq!((d.action, d.xmin_age), (Action::None, Some(1 << 30)));
    }

    #[test]
    fn the_xmin_limit_follows_scope_and_exclude() {
        let old = || vec![slot("standby", aged(50_000), None), slot("sub", None, aged(50_000))];
        let cases: &[(Scope, Option<&str>, [bool; 2])] = &[
            // scope, exclude, [standby dropped, sub dropped]
            (Scope::Leased, None, [false, false]),
            (Scope::Physical, None, [true, false]),
            (Scope::All, None, [true, true]),
            (Scope::All, Some("^sub$"), [true, false]),
        ];
        for (scope, exclude, want) in cases {
            let p = Policy {
                max_xmin_age: Some(10_000),
                scope: *scope,
                exclude: exclude.map(|e| regex::Regex::new(e).unwrap()),
                ..Policy::default()
            };
            let d = decide(&p, &snap(old(), vec![]));
            let got: Vec<bool> = ["standby", "sub"]
                .iter()
                .map(|n| matches!(d.iter().find(|d| d.slot_name == *n).unwrap().action, Action::Drop { breach: Breach::Xmin, .. }))
                .collect();
            assert_eq!(got, want, "{scope:?} {exclude:?}");
            // out of scope, the ages are still shown, and the slot is named, not dropped
            assert!(d.iter().all(|d| d.xmin_age.or(d.catalog_xmin_age) == Some(50_000)));
            for d in d.iter().filter(|d| !d.in_scope) {
                assert_eq!(d.state, "out_of_scope");
                match &d.action {
                    Action::Wait { breach: Breach::Xmin, reason } => {
                        assert!(reason.ends_with(&format!("not dropped: {}", d.scope_reason)), "{reason}")
                    }
                    other => panic!("{scope:?} {}: {other:?}", d.slot_name),
                }
            }
        }
    }

    #[test]
    fn an_active_slot_over_the_xmin_limit_is_terminated_only_with_terminate_active() {
        let mut s = slot("standby", aged(20_000), None);
        s.active_pid = Some(4242);
        let d = one(&xmin_policy(10_000), &snap(vec![s.clone()], vec![]));
        assert_eq!(d.state, "over_xmin");
        match &d.action {
            Action::Wait { breach: Breach::Xmin, reason } => assert!(reason.contains("active for PID 4242, not dropped: terminate_active is off"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let p = Policy { terminate_active: true, ..xmin_policy(10_000) };
        assert!(matches!(one(&p, &snap(vec![s], vec![])).action, Action::Drop { breach: Breach::Xmin, terminate: Some(4242), .. }));
    }

    #[test]
    fn a_lease_xmin_limit_only_tightens_the_global_one_unless_a_superuser_set_it() {
        let s = || vec![slot("nightly", aged(30_000), None)];
        // (global, lease's own, by superuser, limit in force)
        type Case = (Option<i64>, Option<i64>, bool, Option<i64>);
        let cases: &[Case] = &[
            (None, None, false, None),
            (Some(50_000), None, false, Some(50_000)),
            (None, Some(20_000), false, Some(20_000)),
            (Some(50_000), Some(20_000), false, Some(20_000)),
            // a lease taken with a large limit; the DBA's later, smaller global one wins
            (Some(10_000), Some(100_000), false, Some(10_000)),
            // a superuser's lease limit replaces the global one, both ways
            (Some(10_000), Some(100_000), true, Some(100_000)),
            (Some(50_000), Some(20_000), true, Some(20_000)),
        ];
        for &(global, own, su, want) in cases {
            let mut l = lease("nightly");
            l.max_xmin_age = own;
            l.limit_by_superuser = su;
            let p = Policy { max_xmin_age: global, ..Policy::default() };
            assert_eq!(crate::policy::xmin_limit(&p, Some(&l)), want, "{global:?} {own:?} {su}");
            let d = one(&p, &snap(s(), vec![l]));
            let dropped = matches!(d.action, Action::Drop { breach: Breach::Xmin, .. });
            assert_eq!(dropped, want.is_some_and(|w| 30_000 > w), "{global:?} {own:?} {su}: {:?}", d.action);
        }
    }

    #[test]
    fn the_xmin_limit_comes_after_retained_wal_and_before_time_limits() {
        let mut s = slot("a", aged(20_000), None);
        s.restart_lsn = Some(0);
        let mut sn = snap(vec![s], vec![]);
        sn.current_lsn = 100 << 20;
        let mut l = lease("a");
        l.expires_at = NOW - S;
        Rc::make_mut(&mut sn.leases).push(l);
        let p = Policy { max_xmin_age: Some(10_000), ..Policy::default() };
        assert!(matches!(one(&p, &sn).action, Action::Drop { breach: Breach::Xmin, .. }), "before expiry");
        let p = Policy { max_retained_wal: Some(1 << 20), ..p };
        assert!(matches!(one(&p, &sn).action, Action::Drop { breach: Breach::Retained, .. }), "after retained WAL");
    }

    #[test]
    fn near_the_xmin_limit_the_state_says_so_and_one_warning_is_due() {
        let p = Policy { warn_fraction: 0.8, ..xmin_policy(10_000) };
        let s = snap(vec![slot("standby", aged(8_500), None)], vec![]);
        let v = judge(&p, &s);
        assert_eq!(v.decisions[0].state, "near_xmin");
        assert_eq!(v.decisions[0].nearest_limit().as_deref(), Some("xmin age limit reached in 1500 transactions"));
        let w = warnings(&p, &v, 0.8);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].key(), ("standby", "xmin"));
        assert_eq!(w[0].words(), "holds the transaction horizon 8500 transactions back, 85% of its limit of 10000");
        // transactions, not time, move it: no time deadline from this limit
        assert_eq!(next_due(&p, &s, &v.decisions), None);
    }

    #[test]
    fn the_xid_budget_is_the_nearest_crossing_of_a_slot_left_alone() {
        // (ages of the slots' horizons, warn fraction, budget) under a 10 000 limit
        let cases: &[(&[u32], f64, Option<i64>)] = &[
            (&[], 0.0, None),
            (&[4_000], 0.0, Some(6_000)),
            (&[4_000, 9_000], 0.0, Some(1_000)),
            // at the limit: the next transaction crosses it
            (&[10_000], 0.0, Some(0)),
            // over it: dropped this pass, no budget
            (&[12_000], 0.0, None),
            // the warn fraction comes first: 8 000 is warned at, so 3 999 more stay under it
            (&[4_000], 0.8, Some(3_999)),
            // already past the fraction: the limit itself
            (&[9_000], 0.8, Some(1_000)),
        ];
        for &(ages, warn, want) in cases {
            let slots = ages.iter().enumerate().map(|(i, &a)| slot(&format!("s{i}"), aged(a), None)).collect();
            let p = Policy { warn_fraction: warn, ..xmin_policy(10_000) };
            let d = decide(&p, &snap(slots, vec![]));
            assert_eq!(xid_budget(&p, &d), want, "{ages:?} at {warn}");
        }
        // out of scope (named only), active and waiting, or without the limit: nothing to wake for
        let mut active = slot("busy", aged(20_000), None);
        active.active_pid = Some(1);
        let p = Policy { max_xmin_age: Some(10_000), ..Policy::default() };
        let s = snap(vec![slot("unleased", aged(100), None), active], vec![lease("busy")]);
        assert_eq!(xid_budget(&p, &decide(&p, &s)), None);
        assert_eq!(xid_budget(&Policy::default(), &decide(&Policy::default(), &s)), None);
    }

    #[test]
    fn probes_of_the_next_xid_close_in_on_a_crossing_within_a_hundredth_of_the_limit() {
        use crate::policy::timing::{next_probe, Probe, MIN_PROBE_US};
        // A stopped standby's slot under a 100 000 limit, 10 000 transactions a second:
        // the worker probes and passes as the functions say; the pass that sees the
        // breach comes within a short probe's worth of transactions after the crossing.
        let (limit, rate) = (100_000i64, 10_000.0f64);
        let mut age = 0i64;
        let (mut budget, mut burned, mut passes, mut t) = (limit, 0i64, 0, 0i64);
        while age <= limit {
            match next_probe(budget, burned, Some(rate)) {
                Probe::PassNow => {
                    passes += 1;
                    budget = limit - age;
                    burned = 0;
                }
                Probe::In(us) => {
                    t += us;
                    let n = (rate * us as f64 / 1e6) as i64;
                    burned += n;
                    age += n;
                }
            }
        }
        // the pass that sees it over
        while next_probe(budget, burned, Some(rate)) != Probe::PassNow {
            let Probe::In(us) = next_probe(budget, burned, Some(rate)) else { unreachable!() };
            burned += (rate * us as f64 / 1e6) as i64;
            age += (rate * us as f64 / 1e6) as i64;
        }
        let over = age - limit;
        assert!(over <= (rate * MIN_PROBE_US as f64 / 1e6) as i64, "{over} transactions past the limit after {passes} passes");
        assert!(over * 100 <= limit);
        assert!(passes < 25, "{passes} passes over {t} µs");
    }

    #[test]
    fn synchronized_standby_slots_are_read_as_core_reads_them() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            ("sb1", &["sb1"]),
            (" sb1 , SB2,\"sb3\"", &["sb1", "sb2", "sb3"]),
            ("\"Odd\"\"Name\"", &["Odd\"Name"]),
            (",,", &[]),
        ];
        for (value, want) in cases {
            assert_eq!(parse_slot_list(value), want.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "{value:?}");
        }
    }

    #[test]
    fn a_slot_named_in_synchronized_standby_slots_is_warned_about_and_never_dropped() {
        let p = Policy { synchronized_standby_slots: vec!["sb".into()], terminate_active: true, ..xmin_policy(10_000) };
        // over the xmin limit and active: neither terminated nor dropped
        let mut active = slot("sb", aged(20_000), None);
        active.active_pid = Some(77);
        let d = one(&p, &snap(vec![active], vec![]));
        match &d.action {
            Action::Wait { breach: Breach::Xmin, reason } => {
                assert!(reason.contains("not dropped: named in synchronized_standby_slots"), "{reason}");
                assert!(!reason.contains("terminated"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(d.state, "over_xmin");
        // an expired lease, a lost slot: the same
        let mut l = lease("sb");
        l.expires_at = NOW - S;
        let d = one(&p, &snap(vec![slot("sb", None, None)], vec![l]));
        assert!(matches!(d.action, Action::Wait { breach: Breach::Expired, .. }), "{:?}", d.action);
        let mut lost = slot("sb", None, None);
        lost.invalidation = Some("wal_removed");
        assert!(matches!(one(&p, &snap(vec![lost], vec![])).action, Action::Wait { breach: Breach::Lost, .. }));
        // another slot is dropped as usual
        assert!(matches!(one(&p, &snap(vec![slot("other", aged(20_000), None)], vec![])).action, Action::Drop { .. }));
    }

    #[test]
    fn the_floor_never_drops_a_slot_named_in_synchronized_standby_slots() {
        use crate::policy::disk::{Floor, WalDisk};
        const SEG: i64 = 16 << 20;
        let p = Policy {
            min_free_wal: Some(Floor::Bytes(100 << 20)),
            scope: Scope::All,
            synchronized_standby_slots: vec!["sb".into()],
            ..Policy::default()
        };
        let mut s = snap(vec![SlotInfo { restart_lsn: Some((50 * SEG) as u64), ..slot("sb", None, None) }], vec![]);
        s.current_lsn = (100 * SEG) as u64;
        s.disk = Some(WalDisk {
            free: 10 << 20,
            total: 1 << 30,
            pg_wal: 60 * SEG,
            insert_lsn: (100 * SEG) as u64,
            segment_size: SEG,
            wal_keep: 0,
            max_wal: 4 * SEG,
            max_slot_keep: None,
            unarchived: None,
        });
        match &judge(&p, &s).decisions[0].action {
            Action::Wait { breach: Breach::Space, reason } => assert!(reason.contains("not dropped: named in synchronized_standby_slots"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}
