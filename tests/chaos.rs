//! A randomized stress run of the lease state machine (src/machine.rs), seeded and
//! repeatable in what it does: several sessions issue random lease, renew, keep and release
//! calls — committed, rolled back, in savepoints, cut by a statement_timeout, held open,
//! paused at the machine's windows — while the guard runs with a short naptime and short
//! leases; the run is interrupted by random SIGKILLs of backends, of the guard worker and
//! of the postmaster, and by immediate stops. After every restart, once the guard has
//! settled, the invariants are checked:
//! - every slot a lease call made is leased, kept, or gone;
//! - every drop has exactly one event, and every drop event a drop;
//! - no committed lease is lost, and no committed renewal undone;
//! - no drop intent is left.
//!
//! PGSG_CHAOS_SEED, PGSG_CHAOS_OPS (operations, at least) and PGSG_CHAOS_KILLS (kills, at
//! least) set the run; CI runs a short one, BENCHMARKS.md has a long one's figures. It
//! prints what it did: operations, kills survived, violations found.

mod common;
use common::*;
use postgres::{Client, NoTls};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Lease,
    Renew,
    Release,
    Keep,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Committed,
    /// The call succeeded and its transaction (or savepoint) was rolled back on purpose.
    RolledBack,
    /// The call or its commit failed with this SQLSTATE: nothing of it committed.
    Failed(String),
    /// The connection went during the call or the commit (a kill): either.
    Unknown,
}

#[derive(Debug, Clone)]
struct Op {
    name: String,
    kind: Kind,
    outcome: Outcome,
    /// The expiry the call returned (microseconds since the Unix epoch), lease and renew.
    expires_us: Option<i64>,
    started: Instant,
    ended: Instant,
    /// How it was wrapped (for the report of a violation).
    wrap: Wrap,
}

/// How a call is wrapped.
#[derive(Debug, Clone, Copy)]
enum Wrap {
    Plain,
    RolledBack,
    SavepointKept,
    SavepointRolledBack,
    HeldOpen,
    Timeout(u32),
    Paused(&'static str),
}

struct Shared {
    ops: Mutex<Vec<Op>>,
    /// Names whose lease committed (as the clients know), to renew, release or keep.
    live: Mutex<Vec<String>>,
    /// Errors no call may end with whatever happens around it: an internal error (class
    /// XX) or a data or system error (58), with their messages.
    broken: Mutex<Vec<String>>,
    stop: AtomicBool,
}

fn sqlstate(e: &postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

/// The expiry in microseconds since the Unix epoch, read exactly.
const EXPIRY_US: &str = "(pg_catalog.extract('epoch', x) * 1000000)::int8";

fn run_client(conninfo: String, seed: u64, epoch: u64, id: usize, shared: Arc<Shared>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (epoch << 16) ^ id as u64);
    let Ok(mut c) = Client::connect(&conninfo, NoTls) else { return };
    if c.batch_execute("SET application_name = 'chaos'").is_err() {
        return;
    }
    let mut n = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        n += 1;
        let pick = rng.random_range(0..100);
        let (kind, name) = if pick < 20 {
            // A name from a small pool that every session uses: names are taken again once
            // their lease ends, and several sessions race for one.
            (Kind::Lease, format!("cr_{}", rng.random_range(0..3)))
        } else if pick < 35 {
            (Kind::Lease, format!("cx_{epoch}_{id}_{n}"))
        } else {
            let live = shared.live.lock().unwrap();
            if live.is_empty() {
                (Kind::Lease, format!("cx_{epoch}_{id}_{n}"))
            } else {
                // Half the time a name of the shared pool, when one is live.
                let pool: Vec<&String> = live.iter().filter(|n| n.starts_with("cr_")).collect();
                let name = if !pool.is_empty() && rng.random_bool(0.5) {
                    pool[rng.random_range(0..pool.len())].clone()
                } else {
                    live[rng.random_range(0..live.len())].clone()
                };
                let kind = match pick {
                    35..=69 => Kind::Renew,
                    70..=89 => Kind::Release,
                    _ => Kind::Keep,
                };
                (kind, name)
            }
        };
        let ttl = rng.random_range(1..=8);
        let call = match kind {
            Kind::Lease => format!("SELECT {} FROM (SELECT expires_at AS x FROM backup_slot_lease('{name}', '{ttl} s')) l", EXPIRY_US),
            Kind::Renew => format!("SELECT {} FROM (SELECT backup_slot_renew('{name}', '{ttl} s') AS x) l", EXPIRY_US),
            Kind::Release => format!("SELECT backup_slot_release('{name}')"),
            Kind::Keep => format!("SELECT backup_slot_keep('{name}')"),
        };
        let wrap = match rng.random_range(0..100) {
            0..=41 => Wrap::Plain,
            42..=55 => Wrap::RolledBack,
            56..=63 => Wrap::SavepointKept,
            64..=71 => Wrap::SavepointRolledBack,
            72..=79 => Wrap::HeldOpen,
            80..=87 => Wrap::Timeout(rng.random_range(1..=25)),
            // Paused in one of the windows this kind of call goes through, so that kills and
            // other sessions find it there.
            _ => Wrap::Paused(match kind {
                Kind::Lease => ["lease_ephemeral:150", "lease_pending:150", "lease_persisted:150", "precommit:150"][rng.random_range(0..4)],
                Kind::Release => ["change_pending:150", "precommit:150", "commit_release:300", "commit_released:600"][rng.random_range(0..4)],
                Kind::Renew | Kind::Keep => ["change_pending:150", "precommit:150"][rng.random_range(0..2)],
            }),
        };
        let started = Instant::now();
        let (outcome, expires_us) = match one_call(&mut c, &call, wrap) {
            Ok((expires, kept)) => (if kept { Outcome::Committed } else { Outcome::RolledBack }, expires),
            Err(e) => match sqlstate(&e) {
                // The server ended the session (a kill of another process restarts them
                // all; an immediate stop): a COMMIT it ends may have committed or not, as
                // for a connection cut (seen: a renewal's event committed, its client told
                // 57P01 just after its commit record).
                Some(code) if code.starts_with("57P") || code.starts_with("08") => (Outcome::Unknown, None),
                Some(code) => {
                    if code.starts_with("XX") || code.starts_with("58") {
                        let msg = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
                        shared.broken.lock().unwrap().push(format!("{kind:?} {name} ({wrap:?}): {code}: {msg}"));
                    }
                    let _ = c.batch_execute("ROLLBACK; RESET statement_timeout; RESET pgslotguard.test_pause_at");
                    (Outcome::Failed(code), None)
                }
                None => (Outcome::Unknown, None),
            },
        };
        let op = Op { name: name.clone(), kind, outcome: outcome.clone(), expires_us, started, ended: Instant::now(), wrap };
        if outcome == Outcome::Committed {
            let mut live = shared.live.lock().unwrap();
            match kind {
                Kind::Lease => live.push(name),
                Kind::Release | Kind::Keep => live.retain(|l| *l != name),
                Kind::Renew => {}
            }
        }
        shared.ops.lock().unwrap().push(op);
        if outcome == Outcome::Unknown || c.is_closed() {
            return;
        }
    }
}

/// One call as `wrap` says: the expiry it returned, and whether it was meant to commit.
fn one_call(c: &mut Client, call: &str, wrap: Wrap) -> Result<(Option<i64>, bool), postgres::Error> {
    let expires = |rows: Vec<postgres::Row>| rows.first().and_then(|r| r.try_get::<_, Option<i64>>(0).ok().flatten());
    match wrap {
        Wrap::Plain => Ok((expires(c.query(call, &[])?), true)),
        Wrap::RolledBack => {
            c.batch_execute("BEGIN")?;
            let e = expires(c.query(call, &[])?);
            c.batch_execute("ROLLBACK")?;
            Ok((e, false))
        }
        Wrap::SavepointKept | Wrap::SavepointRolledBack => {
            c.batch_execute("BEGIN; SAVEPOINT s")?;
            let e = expires(c.query(call, &[])?);
            let kept = matches!(wrap, Wrap::SavepointKept);
            c.batch_execute(if kept { "RELEASE s; COMMIT" } else { "ROLLBACK TO s; COMMIT" })?;
            Ok((e, kept))
        }
        Wrap::HeldOpen => {
            c.batch_execute("BEGIN")?;
            let e = expires(c.query(call, &[])?);
            c.batch_execute("SELECT pg_sleep(0.05); COMMIT")?;
            Ok((e, true))
        }
        Wrap::Timeout(ms) => {
            c.batch_execute(&format!("SET statement_timeout = '{ms}ms'"))?;
            let r = c.query(call, &[]);
            c.batch_execute("RESET statement_timeout")?;
            Ok((expires(r?), true))
        }
        Wrap::Paused(at) => {
            c.batch_execute(&format!("BEGIN; SET LOCAL pgslotguard.test_pause_at = '{at}'"))?;
            let e = expires(c.query(call, &[])?);
            c.batch_execute("COMMIT")?;
            Ok((e, true))
        }
    }
}

/// What the server says about one name, after the guard has settled.
struct Seen {
    slots: HashSet<String>,
    leases: BTreeMap<String, i64>,
    events: BTreeMap<String, Vec<String>>,
    intents: Vec<String>,
}

fn look(c: &Cluster) -> Seen {
    let slots = c.sql("SELECT slot_name::text FROM pg_replication_slots WHERE slot_name ~ '^c[xr]_'").iter().map(|r| r.get(0)).collect();
    let leases = c
        .sql(&format!("SELECT slot_name::text, {} FROM (SELECT slot_name, expires_at AS x FROM pgslotguard.leases WHERE slot_name ~ '^c[xr]_') l", EXPIRY_US))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut events: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in c.sql("SELECT slot_name::text, action FROM pgslotguard.events WHERE slot_name ~ '^c[xr]_' ORDER BY id") {
        events.entry(r.get(0)).or_default().push(r.get(1));
    }
    let intents = c.sql("SELECT slot_name::text FROM pgslotguard.tracking WHERE drop_action IS NOT NULL").iter().map(|r| r.get(0)).collect();
    Seen { slots, leases, events, intents }
}

const DROPS: [&str; 10] =
    ["release", "expire_drop", "retained_drop", "age_drop", "inactive_drop", "space_drop", "lost_drop", "stalled_drop", "xmin_drop", "rollback_drop"];

/// Every invariant, over every name the run used; returns the violations.
fn check(seen: &Seen, ops: &[Op]) -> Vec<String> {
    let mut v = vec![];
    let mut names: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        names.entry(op.name.as_str()).or_default().push(op);
    }
    for name in seen.slots.iter().chain(seen.leases.keys()).chain(seen.events.keys()) {
        names.entry(name.as_str()).or_default();
    }
    for (name, ops) in &names {
        let none = vec![];
        let ev = seen.events.get(*name).unwrap_or(&none);
        if name.starts_with("cr_") {
            v.extend(check_reused(name, ev, seen.slots.contains(*name), seen.leases.contains_key(*name)));
            continue;
        }
        let leased_ev = ev.iter().any(|a| a == "lease");
        let kept = ev.iter().any(|a| a == "keep");
        let drops: Vec<&String> = ev.iter().filter(|a| DROPS.contains(&a.as_str())).collect();
        let slot = seen.slots.contains(*name);
        let leased = seen.leases.contains_key(*name);
        if slot && !leased && !kept {
            v.push(format!("{name}: a slot with no lease (events {ev:?})"));
        }
        if drops.len() > 1 {
            v.push(format!("{name}: {} drop events: {ev:?}", drops.len()));
        }
        if !drops.is_empty() && slot {
            v.push(format!("{name}: a drop event for a slot that exists: {ev:?}"));
        }
        if leased && !slot {
            // A lease whose slot is gone ends at the next pass; after settling, none is left.
            v.push(format!("{name}: a lease without its slot: {ev:?}"));
        }
        if leased_ev && !slot && !kept && drops.iter().all(|d| *d == "rollback_drop") {
            v.push(format!("{name}: a committed lease's slot is gone with no record of why: {ev:?}"));
        }
        if !leased_ev {
            if leased {
                v.push(format!("{name}: leased, but no lease call committed: {ev:?}"));
            }
            if ev.iter().any(|a| a != "rollback_drop") {
                v.push(format!("{name}: events without a committed lease: {ev:?}"));
            }
        }
        if leased_ev && !kept && drops.is_empty() && !leased {
            v.push(format!("{name}: a committed lease was lost: {ev:?}"));
        }
        // No committed renewal undone: the lease's expiry is the last committed change's,
        // unless a change cut short by a kill came after it. Changes to one lease commit one
        // after the other, but two whose calls overlap may return in either order: the
        // second wakes when the first's commit releases its transaction lock, and can answer
        // its client before the first does (seen on a loaded machine: 4 ms apart). So the
        // last is any committed change that no other committed change started after.
        if let Some(&now) = seen.leases.get(*name) {
            let committed: Vec<&&Op> =
                ops.iter().filter(|o| matches!(o.kind, Kind::Lease | Kind::Renew) && o.outcome == Outcome::Committed).collect();
            let lasts: Vec<&&Op> = committed.iter().filter(|c| !committed.iter().any(|d| d.started > c.ended)).copied().collect();
            if let Some(from) = lasts.iter().map(|o| o.started).min() {
                let unknown_after = ops.iter().any(|o| o.outcome == Outcome::Unknown && o.ended >= from);
                if !unknown_after && !lasts.iter().any(|o| o.expires_us == Some(now)) {
                    let said: Vec<Option<i64>> = lasts.iter().map(|o| o.expires_us).collect();
                    let t0 = ops.first().map(|o| o.started).unwrap_or(from);
                    let calls: Vec<String> = ops
                        .iter()
                        .map(|o| {
                            let ms = |t: Instant| t.duration_since(t0).as_millis();
                            format!("{:?} {:?} {:?} -> {:?} [{}..{} ms]", o.kind, o.wrap, o.outcome, o.expires_us, ms(o.started), ms(o.ended))
                        })
                        .collect();
                    v.push(format!("{name}: expires at {now}, the committed changes that may be the last said {said:?}; its calls: {calls:#?}"));
                }
            }
        }
        // A change a client saw committed is not undone by a kill: a release or keep the
        // client saw commit left no lease.
        let ended = ops.iter().filter(|o| matches!(o.kind, Kind::Release | Kind::Keep) && o.outcome == Outcome::Committed).count();
        if ended > 0 && leased {
            v.push(format!("{name}: released or kept, and still leased: {ev:?}"));
        }
    }
    for i in &seen.intents {
        v.push(format!("{i}: a drop intent left after settling"));
    }
    v
}

/// A name taken again and again: its events must read as a sequence of whole leases — a
/// lease, renewals, then exactly one end (a release, a guard drop, or a keep) before the
/// next lease; a rolled-back lease's slot dropped by the guard may come between two. After
/// the last end nothing is left; after a last lease with no end, it is leased and there.
fn check_reused(name: &str, ev: &[String], slot: bool, leased: bool) -> Vec<String> {
    let mut v = vec![];
    let mut open = false;
    let mut kept_last = false;
    for a in ev {
        match a.as_str() {
            "lease" if open => v.push(format!("{name}: a lease taken while another was not ended: {ev:?}")),
            "lease" => (open, kept_last) = (true, false),
            "renew" | "warn" | "terminate" | "would_drop" if open => {}
            "rollback_drop" if !open => {}
            "keep" if open => (open, kept_last) = (false, true),
            a if DROPS.contains(&a) && open => (open, kept_last) = (false, false),
            _ => v.push(format!("{name}: {a} out of order: {ev:?}")),
        }
    }
    if open && !(leased && slot) {
        v.push(format!("{name}: its last lease never ended and is lost (leased {leased}, slot {slot}): {ev:?}"));
    }
    if !open && leased {
        v.push(format!("{name}: leased after its last lease ended: {ev:?}"));
    }
    if !open && slot && !kept_last {
        v.push(format!("{name}: a slot with no lease after its last lease ended: {ev:?}"));
    }
    v
}

#[test]
fn a_seeded_random_run_with_kills_keeps_every_invariant() {
    let seed = env_u64("PGSG_CHAOS_SEED", 20_261_203);
    let want_ops = env_u64("PGSG_CHAOS_OPS", 400) as usize;
    let want_kills = env_u64("PGSG_CHAOS_KILLS", 8);
    let clients = env_u64("PGSG_CHAOS_CLIENTS", 4) as usize;
    let c = with_extension("chaos", &["pgslotguard.naptime = '200ms'", "max_replication_slots = 64", "max_wal_senders = 8"]);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let shared = Arc::new(Shared { ops: Mutex::new(vec![]), live: Mutex::new(vec![]), broken: Mutex::new(vec![]), stop: AtomicBool::new(false) });
    let mut kills = [0u64; 4];
    let mut violations: Vec<String> = vec![];
    let t0 = Instant::now();
    let mut epoch = 0u64;
    while (shared.ops.lock().unwrap().len() < want_ops || kills.iter().sum::<u64>() < want_kills) && violations.is_empty() {
        epoch += 1;
        // Now and then the guard pauses in the middle of its own drop, so that kills find it there.
        let guard_pause = rng.random_bool(0.3);
        if guard_pause {
            c.set_policy(&[("pgslotguard.test_pause_at", ["guard_intent:100", "guard_recorded:100", "guard_dropped:100"][rng.random_range(0..3)])]);
        }
        shared.stop.store(false, Ordering::Relaxed);
        let threads: Vec<_> = (0..clients)
            .map(|id| {
                let (conninfo, shared) = (c.conninfo("postgres"), shared.clone());
                std::thread::spawn(move || run_client(conninfo, seed, epoch, id, shared))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
        let kind = rng.random_range(0..10);
        let before = c.log_len();
        match kind {
            0..=3 => {
                let pids: Vec<i32> = c.sql("SELECT pid FROM pg_stat_activity WHERE application_name = 'chaos'").iter().map(|r| r.get(0)).collect();
                match pids.get(rng.random_range(0..pids.len().max(1))) {
                    Some(&pid) => kill9(pid),
                    None => kill9(c.worker_pid().unwrap_or(0)),
                }
                kills[0] += 1;
                c.wait_crash_restart(before);
            }
            4..=5 => {
                kill9(c.worker_pid().expect("the guard worker runs"));
                kills[1] += 1;
                c.wait_crash_restart(before);
            }
            6..=7 => {
                c.kill_postmaster_and_start();
                kills[2] += 1;
            }
            _ => {
                c.restart("immediate");
                kills[3] += 1;
            }
        }
        shared.stop.store(true, Ordering::Relaxed);
        for t in threads {
            let _ = t.join();
        }
        if guard_pause {
            c.exec("ALTER SYSTEM RESET pgslotguard.test_pause_at");
            c.reload();
        }
        // Settle: the guard passes a few times with no session running.
        c.wait_for("the guard after the restart", WAIT, |c| {
            c.try_sql("SELECT passes FROM pgslotguard.status").ok().and_then(|r| r.first().map(|r| r.get::<_, i64>(0))).filter(|p| *p >= 1)
        });
        c.wait_passes(3);
        // The guard settled what the kill left; now it rests while the run looks (a drop it
        // makes meanwhile would be seen half done): its pass in progress ends first.
        // The worker reads the reload between passes and says so: a pass that was still
        // dropping (paused at each drop) has ended by then.
        let from = c.log_len();
        c.set_policy(&[("pgslotguard.enabled", "off")]);
        c.wait_for("the guard to rest", WAIT, |c| {
            c.log().get(from..).unwrap_or("").contains("pgslotguard.enabled is off; the guard worker idles").then_some(())
        });
        let seen = look(&c);
        violations = check(&seen, &shared.ops.lock().unwrap());
        violations.extend(shared.broken.lock().unwrap().iter().map(|b| format!("a call failed as no call may: {b}")));
        // Kept slots are unleased and out of the guard's scope: dropped here, so that the
        // run never runs out of slots.
        for name in seen.slots.iter().filter(|n| !seen.leases.contains_key(*n)) {
            let _ = c.try_sql(&format!("SELECT pg_drop_replication_slot('{name}')"));
        }
        c.set_policy(&[("pgslotguard.enabled", "on")]);
    }
    let ops = shared.ops.lock().unwrap();
    let count = |f: &dyn Fn(&Outcome) -> bool| ops.iter().filter(|o| f(&o.outcome)).count();
    let mut codes: BTreeMap<&str, usize> = BTreeMap::new();
    for o in ops.iter() {
        if let Outcome::Failed(code) = &o.outcome {
            *codes.entry(code.as_str()).or_default() += 1;
        }
    }
    println!("chaos: failures by SQLSTATE: {codes:?}");
    println!(
        "chaos: seed {seed}: {} operations ({} committed, {} rolled back, {} failed, {} cut short by a kill) in {} epochs, {} kills survived (backend {}, worker {}, postmaster {}, immediate stop {}), {} violations, {:.0} s",
        ops.len(),
        count(&|o| *o == Outcome::Committed),
        count(&|o| *o == Outcome::RolledBack),
        count(&|o| matches!(o, Outcome::Failed(_))),
        count(&|o| *o == Outcome::Unknown),
        epoch,
        kills.iter().sum::<u64>(),
        kills[0],
        kills[1],
        kills[2],
        kills[3],
        violations.len(),
        t0.elapsed().as_secs_f64()
    );
    if !violations.is_empty() {
        // For each name in a violation: its events with their times and lease ids, and
        // its store record as the file holds it.
        let mut detail = String::new();
        let names: BTreeSet<&str> = violations.iter().filter_map(|v| v.split_once(':').map(|(n, _)| n)).filter(|n| n.starts_with('c')).collect();
        for name in names {
            detail.push_str(&format!("\n{name}:\n"));
            for r in c.sql(&format!(
                "SELECT e.id::text, e.at::text, e.action, coalesce(e.lease_id::text, '-'), e.reason FROM pgslotguard.event_log e WHERE e.slot_name = '{name}' ORDER BY e.id"
            )) {
                let cols: Vec<String> = (0..5).map(|i| r.get::<_, String>(i)).collect();
                detail.push_str(&format!("  {}\n", cols.join(" | ")));
            }
            let file = c.data.join("pg_slotguard/slots").join(name);
            let bytes = std::fs::read(&file).unwrap_or_default();
            detail.push_str(&format!("  store file: {}\n", String::from_utf8_lossy(bytes.get(16..).unwrap_or(&[]))));
        }
        panic!("violations:\n{}\n{}\n{detail}", violations.join("\n"), c.describe());
    }
}
