//! The store against a power loss (issue 35). Every other suite runs its clusters with
//! fsync = off, where a SIGKILL shows nothing about durability: the page cache survives it.
//! Here a cluster runs with fsync = on, its whole data directory (pg_wal, pg_replslot,
//! pg_slotguard, global/pg_control) on a FUSE layer (tests/lazyfs/) that keeps what was not
//! made durable in a state a simulated power cut discards: data written since a file's last
//! fsync, and directory changes not made durable by an fsync of the directory (the model is
//! described at the top of tests/lazyfs/mod.rs). Power is cut at several points: right after
//! a lease call returned, right after a release returned, and in the middle of bursts of
//! lease calls; the server restarts on exactly the durable state, and then: every lease
//! either survives whole or never existed, every lease call that returned before the cut
//! survives, a release that returned stays done, no slot is left without its lease, and the
//! server log names no damaged store file. A control in the same test shows the layer does
//! discard: a file the test writes without an fsync is gone after the cut.
//!
//! Only the SQL surface is used, so the test holds across changes of the store's insides.

mod common;
mod lazyfs;

use common::*;
use lazyfs::{LazyFs, Report};
use postgres::Client;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HOLDER: &str = "powerloss";
/// Lease calls in one burst at most (the cut comes well before the last).
const BURST: usize = 30;
/// How long the guard may take after a restart to settle what a call in flight left (it
/// does so at start or at its first pass, naptime 1 s).
const SETTLE: Duration = Duration::from_secs(30);

/// What a lease call returned.
#[derive(Clone, Debug, PartialEq)]
struct Lease {
    lsn: String,
    expires_us: i64,
}

fn lease(client: &mut Client, name: &str) -> Result<Lease, postgres::Error> {
    let row = client.query_one(
        "SELECT lsn::text, (extract(epoch FROM expires_at) * 1000000)::int8 FROM backup_slot_lease($1, '1h', holder => $2)",
        &[&name, &HOLDER],
    )?;
    Ok(Lease { lsn: row.get(0), expires_us: row.get(1) })
}

/// Gone, or a zombie (it holds no file any more).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')).unwrap_or(false),
        Err(_) => true,
    }
}

/// The processes whose working directory is `dir` or below it: every server process runs in
/// its data directory.
fn working_in(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if std::fs::read_link(e.path().join("cwd")).map(|cwd| cwd.starts_with(dir)).unwrap_or(false) {
            out.push(pid);
        }
    }
    out
}

fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
}

/// A cluster whose data directory is a lazyfs mount over `disk`, with fsync = on.
struct Powered {
    c: Cluster,
    disk: PathBuf,
    fs: Option<LazyFs>,
    postmaster: Option<u32>,
}

impl Powered {
    /// initdb, CREATE EXTENSION and a clean stop on the plain disk (all of it durable when
    /// the layer is mounted), then the data directory moves under the layer and starts.
    fn start(tag: &str) -> Powered {
        // Orphans of this process's children are its own to reap: a postmaster killed at a
        // cut is reaped at once (by its PID), not whenever the machine's init gets to it.
        let _ = nix::sys::prctl::set_child_subreaper(true);
        let c = Cluster::init(tag, &["fsync = on", "max_replication_slots = 64"]);
        c.pg_ctl_start();
        c.exec("CREATE EXTENSION pgslotguard");
        c.stop("fast");
        let disk = c.dir.join("disk");
        std::fs::rename(&c.data, &disk).unwrap();
        std::fs::create_dir(&c.data).unwrap();
        let owner = std::fs::metadata(&disk).unwrap();
        use std::os::unix::fs::MetadataExt;
        std::os::unix::fs::chown(&c.data, Some(owner.uid()), Some(owner.gid())).unwrap();
        let mut p = Powered { c, disk, fs: None, postmaster: None };
        p.power_on();
        p
    }

    /// Mount the layer over the durable state and start the server (crash recovery after a cut).
    fn power_on(&mut self) {
        self.fs = Some(LazyFs::mount(&self.disk, &self.c.data));
        self.c.pg_ctl_start();
        let pid = std::fs::read_to_string(self.c.data.join("postmaster.pid")).unwrap();
        self.postmaster = Some(pid.lines().next().unwrap().trim().parse().unwrap());
    }

    /// The instant of the power cut: nothing more becomes durable.
    fn cut(&self) {
        self.fs.as_ref().expect("the layer is mounted").cut();
    }

    /// After `cut`: every server process dies, as it would with the power, and the layer
    /// leaves the disk holding exactly what was durable at the cut.
    fn power_off(&mut self) -> Report {
        self.cut();
        let pm = self.kill_server().unwrap_or_else(|e| panic!("{e}"));
        let report = self.fs.take().unwrap().unmount_to_durable();
        // postmaster.pid is durable (PostgreSQL fsyncs it) and names the killed postmaster,
        // which the next start must see as not running: after a real power cut no process has
        // its PID. It was reaped above; were it some other process's zombie that nobody reaps,
        // it would read as running, and then the file goes instead.
        let deadline = Instant::now() + Duration::from_secs(5);
        while pm.is_some_and(|pm| Path::new(&format!("/proc/{pm}")).exists()) {
            if Instant::now() > deadline {
                eprintln!("powerloss: the killed postmaster {pm:?} is still an unreaped zombie; removing its postmaster.pid");
                std::fs::remove_file(self.disk.join("postmaster.pid")).unwrap();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        report
    }

    /// SIGKILL the postmaster and every process it started (by their PIDs), and any process
    /// still working in the data directory; wait until all are gone. The postmaster's PID, if
    /// one was running.
    fn kill_server(&mut self) -> Result<Option<u32>, String> {
        let Some(pm) = self.postmaster.take() else { return Ok(None) };
        let mut pids = vec![pm];
        pids.extend(descendants(pm));
        for &pid in &pids {
            sigkill(pid);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let stragglers: Vec<u32> = working_in(&self.c.data).into_iter().filter(|&p| !gone(p)).collect();
            for &pid in &stragglers {
                sigkill(pid);
            }
            for &pid in &stragglers {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
            // Reap those that are this process's children now (the subreaper).
            for &pid in &pids {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            }
            if stragglers.is_empty() && pids.iter().all(|&p| gone(p)) {
                return Ok(Some(pm));
            }
            if Instant::now() > deadline {
                return Err(format!("server processes {pids:?} still alive {WAIT:?} after SIGKILL"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Powered {
    fn drop(&mut self) {
        // The server first: the mount cannot go while it has files open there (an error
        // here leaves the mount detached rather than panic again while unwinding).
        let _ = self.kill_server();
        drop(self.fs.take());
    }
}

/// The leases there are: name -> (what the lease call would have returned, holder, state,
/// expires_at - leased_at in seconds).
fn leases(c: &Cluster) -> BTreeMap<String, (Lease, Option<String>, String, f64)> {
    c.sql(
        "SELECT slot_name::text, (extract(epoch FROM expires_at) * 1000000)::int8, restart_lsn::text, holder, state,
                extract(epoch FROM expires_at - leased_at)::float8
           FROM pgslotguard.leases",
    )
    .iter()
    .map(|r| (r.get(0), (Lease { expires_us: r.get(1), lsn: r.get::<_, Option<String>>(2).unwrap_or_default() }, r.get(3), r.get(4), r.get(5))))
    .collect()
}

/// After a restart: check every lease. `must`: calls that returned before the cut (and
/// leases seen since), with what they returned; `maybe`: calls in flight at the cut;
/// `released`: releases that returned. Returns the leases there are.
fn check(p: &Powered, must: &BTreeMap<String, Lease>, maybe: &BTreeSet<String>, released: &BTreeSet<String>) -> BTreeMap<String, Lease> {
    let c = &p.c;
    c.wait_for("a guard pass after the restart", WAIT, |c| {
        c.try_sql("SELECT passes FROM pgslotguard.status").ok()?.first().map(|r| r.get::<_, i64>(0)).filter(|&n| n >= 1)
    });
    // A lease whose call returned committed before the cut: it is there from the start.
    let first = leases(c);
    for (name, l) in must {
        let got = first.get(name).map(|g| &g.0);
        assert_eq!(got, Some(l), "lease {name} returned before the cut and is not there whole after it\n{}", c.describe());
    }
    for name in released {
        assert!(!first.contains_key(name), "{name} was released before the cut and its lease is back\n{}", c.describe());
    }
    // What a call in flight left is settled by the guard (at start or at its first passes).
    let deadline = Instant::now() + SETTLE;
    loop {
        let names = |q: &str| -> Vec<String> { c.sql(q).iter().map(|r| r.get(0)).collect() };
        let orphans = names(
            "SELECT s.slot_name::text || ' (restart_lsn ' || coalesce(s.restart_lsn::text, 'none') || ')' FROM pg_replication_slots s
              WHERE NOT EXISTS (SELECT FROM pgslotguard.leases l WHERE l.slot_name = s.slot_name) ORDER BY 1",
        );
        let missing = names("SELECT slot_name::text FROM pgslotguard.leases WHERE restart_lsn IS NULL ORDER BY 1");
        if orphans.is_empty() && missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{SETTLE:?} after the restart, slots without a lease: {orphans:?}, leases without a slot: {missing:?} (calls in flight at the cut: {maybe:?})\n{}",
            c.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut now = BTreeMap::new();
    for (name, (got, holder, state, ttl)) in leases(c) {
        let what = format!("lease {name} after the cut (holder {holder:?}, state {state}, ttl {ttl} s, {got:?})\n{}", c.describe());
        assert_eq!(holder.as_deref(), Some(HOLDER), "{what}");
        assert_eq!(state, "ok", "{what}");
        assert!((ttl - 3600.0).abs() < 1.0, "{what}");
        match must.get(&name) {
            Some(l) => assert_eq!(&got, l, "a lease changed across the cut: {what}"),
            None => assert!(maybe.contains(&name), "a lease no call made: {what}"),
        }
        now.insert(name, got);
    }
    for name in must.keys() {
        assert!(now.contains_key(name), "lease {name} returned before the cut and went after the restart\n{}", c.describe());
    }
    for name in released {
        assert!(!now.contains_key(name) && !c.slot_exists(name), "{name} was released before the cut and is back\n{}", c.describe());
    }
    let log = c.log();
    assert!(!log.contains("is damaged"), "a store file was damaged by the cut:\n{}", c.log_tail(40));
    now
}

/// Lease calls one after another from a thread, as fast as they return, with the power cut
/// `at` (a fraction) of the way through the call after the `after`-th (a call's length taken
/// as the mean of the calls before it). Returns the calls that returned before the cut and
/// those that did not.
fn burst_and_cut(p: &mut Powered, prefix: &str, after: usize, at: f64) -> (BTreeMap<String, Lease>, BTreeSet<String>) {
    assert!((2..BURST).contains(&after));
    let returned: Arc<Mutex<Vec<(String, Lease, Instant)>>> = Arc::default();
    let attempted: Arc<Mutex<Vec<String>>> = Arc::default();
    let (r, a, conninfo, prefix) = (returned.clone(), attempted.clone(), p.c.conninfo("postgres"), prefix.to_string());
    let thread = std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&conninfo, postgres::NoTls).unwrap();
        for i in 0..BURST {
            let name = format!("{prefix}_{i}");
            a.lock().unwrap().push(name.clone());
            match lease(&mut client, &name) {
                Ok(l) => r.lock().unwrap().push((name, l, Instant::now())),
                Err(_) => return,
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    let (first, last) = loop {
        {
            let r = returned.lock().unwrap();
            if r.len() >= after {
                break (r[0].2, r[after - 1].2);
            }
        }
        assert!(Instant::now() < deadline, "the burst made fewer than {after} leases in {WAIT:?}\n{}", p.c.describe());
        std::thread::sleep(Duration::from_micros(100));
    };
    let call = (last - first) / (after as u32 - 1);
    if let Some(wait) = (last + call.mul_f64(at)).checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
    let before_cut: BTreeMap<String, Lease> = {
        // Held across the cut: a call recorded here returned before it.
        let r = returned.lock().unwrap();
        p.cut();
        r.iter().map(|(n, l, _)| (n.clone(), l.clone())).collect()
    };
    let report = p.power_off();
    thread.join().unwrap();
    let in_flight: BTreeSet<String> = attempted.lock().unwrap().iter().filter(|n| !before_cut.contains_key(*n)).cloned().collect();
    assert!(before_cut.len() < BURST, "the burst ended before the cut");
    eprintln!(
        "powerloss: cut {:.0} % into a lease call ({:.1} ms a call) after {} returned: {report}",
        at * 100.0,
        call.as_secs_f64() * 1000.0,
        before_cut.len()
    );
    (before_cut, in_flight)
}

#[test]
fn a_lease_survives_a_power_cut_whole_or_never_existed() {
    let t0 = Instant::now();
    let mut p = Powered::start("powerloss");
    let mut must = BTreeMap::new();
    let mut released = BTreeSet::new();
    let none = BTreeSet::new();

    // 1. Right after a lease call returned. With it, the control: files the test writes
    //    through the layer itself, one fsynced (then appended to without an fsync), one never.
    must.insert("kept".to_string(), lease(&mut p.c.client(), "kept").unwrap());
    let (synced, unsynced) = (p.c.data.join("lazyfs_control_synced"), p.c.data.join("lazyfs_control_unsynced"));
    let mut f = std::fs::File::create(&synced).unwrap();
    f.write_all(b"synced").unwrap();
    f.sync_all().unwrap();
    f.write_all(b", then not").unwrap();
    drop(f);
    std::fs::write(&unsynced, "never synced").unwrap();
    let report = p.power_off();
    eprintln!("powerloss: cut after a lease: {report}");
    assert_eq!(std::fs::read_to_string(p.disk.join("lazyfs_control_synced")).unwrap(), "synced", "the layer kept data written after the fsync");
    assert!(!p.disk.join("lazyfs_control_unsynced").exists(), "the layer kept a file never fsynced: it discards nothing");
    p.power_on();
    check(&p, &must, &none, &released);

    // 2. Right after a release returned (its store file's removal need not be durable: core's
    //    drop of the slot is, and a file that comes back names a gone slot).
    lease(&mut p.c.client(), "released").unwrap();
    assert!(p.c.sql("SELECT backup_slot_release('released')")[0].get::<_, bool>(0));
    released.insert("released".to_string());
    let report = p.power_off();
    eprintln!("powerloss: cut after a release: {report}");
    p.power_on();
    check(&p, &must, &none, &released);

    // 3. In the middle of bursts of lease calls, at a different point of a call each time
    //    (10 to 95 % of the way through, more of them late in the call, where what the
    //    call made durable waits for its commit); after each, the round's leases are
    //    released (before the next cut).
    let points = [0.1, 0.25, 0.4, 0.55, 0.7, 0.8, 0.9, 0.95];
    for (round, at) in points.into_iter().enumerate() {
        let after = 3 + round % 4;
        let prefix = format!("burst{}", round + 1);
        let (returned, in_flight) = burst_and_cut(&mut p, &prefix, after, at);
        must.extend(returned);
        p.power_on();
        let now = check(&p, &must, &in_flight, &released);
        // A call in flight at the cut whose lease is there did commit: it stays from now on.
        for name in &in_flight {
            eprintln!("powerloss: {name}, in flight at the cut, {}", if now.contains_key(name) { "is there" } else { "never existed" });
            if let Some(l) = now.get(name) {
                must.insert(name.clone(), l.clone());
            }
        }
        let mut client = p.c.client();
        for name in now.keys().filter(|n| n.starts_with(&prefix)) {
            let done: bool = client.query_one("SELECT backup_slot_release($1)", &[name]).unwrap().get(0);
            assert!(done, "release {name}");
            must.remove(name);
            released.insert(name.clone());
        }
    }
    eprintln!("powerloss: {} power cuts in {:.1} s", 2 + points.len(), t0.elapsed().as_secs_f64());
}
