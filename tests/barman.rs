//! Barman 3.4 (Debian 12's `barman`) beside pgslotguard, with the real program: streaming
//! backups (`backup_method = postgres`, `streaming_archiver = on`, `slot_name = barman`,
//! `create_slot = auto`), Barman's slot adopted under a lease the way the README says,
//! Barman's host going down (its receive-wal killed by PID) and the guard dropping the slot
//! at the limit, the README's runbook bringing `barman check` back to OK with a new backup,
//! and no drop/recreate loop. Every Barman process runs as `postgres` (barman_user), in temp
//! dirs of its own, and is stopped by its PID. PostgreSQL 15 only: the roots where 17 and
//! 18 are tested have no Barman.
#![cfg(feature = "pg15")]

mod common;
use common::*;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One Barman server (`pg`) for one cluster, in a temp dir of its own.
struct Barman {
    dir: PathBuf,
    conf: PathBuf,
}

impl Barman {
    fn new(c: &Cluster) -> Barman {
        let dir = temp_dir("barman");
        let conf = dir.join("barman.conf");
        let text = format!(
            "[barman]
barman_home = {home}
barman_user = postgres
barman_lock_directory = {home}
log_file = {dir}/barman.log
log_level = INFO

[pg]
description = pgslotguard test
conninfo = host=127.0.0.1 port={port} user=postgres dbname=postgres
streaming_conninfo = host=127.0.0.1 port={port} user=postgres
backup_method = postgres
streaming_archiver = on
slot_name = barman
create_slot = auto
path_prefix = {bin}
minimum_redundancy = 0
immediate_checkpoint = true
",
            home = dir.join("home").display(),
            dir = dir.display(),
            port = c.port(),
            bin = BIN,
        );
        std::fs::write(&conf, text).unwrap();
        std::fs::create_dir_all(dir.join("home")).unwrap();
        Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status().unwrap();
        Barman { dir, conf }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        // Run as root: barman drops to barman_user (postgres) itself.
        let mut c = Command::new("barman");
        c.arg("-c").arg(&self.conf).args(args).current_dir(&self.dir);
        c
    }

    /// Run a barman command; its output (stdout + stderr) and whether it succeeded.
    fn run(&self, args: &[&str]) -> (bool, String) {
        let out: Output = self.cmd(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.run(args);
        assert!(ok, "barman {args:?} failed:\n{text}\nbarman log:\n{}", self.log_tail());
        text
    }

    /// `barman receive-wal pg` in the foreground, as `barman cron` would start it: it
    /// creates the slot when missing (create_slot = auto) and runs pg_receivewal. Stopped
    /// by its PID (and pg_receivewal's) when dropped.
    fn receive_wal(&self) -> Proc {
        Proc(self.cmd(&["receive-wal", "pg"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("barman.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `barman check pg` until every line is OK (receive-wal needs a moment to show as
    /// running); returns its output.
    fn check_ok(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let (ok, text) = self.run(&["check", "pg"]);
            if ok && !text.contains("FAILED") {
                return text;
            }
            if Instant::now() > deadline {
                panic!("barman check never passed:\n{text}\nbarman log:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// A WAL switch that Barman has streamed and archived (the first one makes `check`'s
    /// "WAL archive" pass). Barman archives a streamed segment only once the next one has
    /// begun (it leaves the newest file for pg_receivewal), so a little WAL is written
    /// while it waits, as any live server would (an idle one writes some every 15 s).
    fn switch_wal(&self, c: &Cluster) {
        let mut child = self.cmd(&["switch-wal", "--force", "--archive", "--archive-timeout", "60", "pg"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        c.exec("CREATE TABLE IF NOT EXISTS barman_tick (at timestamptz)");
        while child.try_wait().unwrap().is_none() {
            c.exec("INSERT INTO barman_tick VALUES (now())");
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "barman switch-wal failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Barman {
    fn drop(&mut self) {
        if std::env::var_os("PGSG_KEEP").is_none() && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The README's recommendation: Barman's slot, made by receive-wal, adopted under a lease
/// with a retained-WAL limit, while receive-wal streams from it.
fn adopt(c: &Cluster, max_retained: &str) {
    c.exec(&format!(
        "SELECT * FROM backup_slot_lease('barman', ttl => '7 days', holder => 'barman', max_retained => '{max_retained}', adopt => true)"
    ));
}

fn wait_active(c: &Cluster, slot: &str) {
    c.wait_for(&format!("a walsender on slot {slot}"), Duration::from_secs(60), |c| {
        (c.count(&format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active")) == 1).then_some(())
    });
}

/// A primary with pgslotguard, Barman streaming from it through its adopted slot, one
/// backup taken and `barman check` OK.
fn primary_with_barman(tag: &str, extra: &[&str], max_retained: &str) -> (Cluster, Barman, Proc) {
    let t = Instant::now();
    let c = with_extension(tag, extra);
    let b = Barman::new(&c);
    let recv = b.receive_wal();
    wait_active(&c, "barman");
    adopt(&c, max_retained);
    let adopted = t.elapsed();
    b.switch_wal(&c);
    let switched = t.elapsed();
    b.check_ok(Duration::from_secs(60));
    let checked = t.elapsed();
    b.ok(&["backup", "--wait", "pg"]);
    eprintln!("{tag}: adopted at {adopted:?}, WAL switched and archived at {switched:?}, check OK at {checked:?}, backup at {:?}", t.elapsed());
    (c, b, recv)
}

fn events(c: &Cluster, slot: &str) -> Vec<(String, String)> {
    c.sql(&format!("SELECT action, reason FROM pgslotguard.events WHERE slot_name = '{slot}' ORDER BY id"))
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect()
}

#[test]
fn barman_backs_up_and_checks_through_its_adopted_slot() {
    let started = Instant::now();
    let (c, b, _recv) = primary_with_barman("barman-ok", &[], "1GB");
    // The lease took the slot while receive-wal streamed from it.
    assert_eq!(c.text("SELECT state FROM pgslotguard.leases WHERE slot_name = 'barman'"), "ok");
    assert_eq!(c.text("SELECT adopted::text FROM pgslotguard.leases WHERE slot_name = 'barman'"), "true");
    let list = b.ok(&["list-backups", "pg"]);
    assert!(list.contains("pg "), "no backup listed:\n{list}");
    // Streaming on through the lease: the guard leaves a healthy Barman alone. (Its
    // pg_receivewal reports its position at each segment end and every 10 s, so its slot
    // retains a few segments at times: the test's 64MB would be crossed by these forced
    // switches, hence 1GB here.)
    for _ in 0..3 {
        b.switch_wal(&c);
    }
    c.wait_passes(2);
    b.check_ok(Duration::from_secs(30));
    assert!(c.slot_exists("barman"));
    assert_eq!(events(&c, "barman").iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["lease"]);
    eprintln!("barman_backs_up_and_checks_through_its_adopted_slot: {:?}", started.elapsed());
}

#[test]
fn barman_down_the_guard_drops_at_the_limit_and_the_runbook_brings_it_back() {
    let started = Instant::now();
    let (c, b, mut recv) = primary_with_barman("barman-down", &["max_wal_size = '64MB'", "min_wal_size = '32MB'"], "64MB");
    // Barman's host goes down.
    recv.stop();
    c.wait_for("the slot to go inactive", Duration::from_secs(30), |c| {
        (c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'barman' AND NOT active") == 1).then_some(())
    });
    let restart_lsn = c.text("SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'barman'");
    // A burst past the lease's 64MB: the guard drops the slot within a pass.
    let t0 = Instant::now();
    c.make_wal(100);
    c.wait_for("the guard to drop Barman's slot", WAIT, |c| c.dropped("barman").then_some(()));
    eprintln!("dropped {:?} after the burst", t0.elapsed());
    let ev = events(&c, "barman");
    let (action, reason) = ev.last().unwrap();
    assert_eq!(action, "retained_drop", "{ev:?}");
    eprintln!("drop event: {reason}");
    assert!(reason.contains(&format!("restart_lsn at the drop {restart_lsn}: the first WAL its consumer will never get")), "{reason}");
    assert!(reason.contains("its consumer must start from a new base backup"), "{reason}");
    assert!(c.log().contains("its consumer must start from a new base backup"), "the log line lacks the cost");
    assert!(
        c.log().contains("dropped replication slot \"barman\": retains") && c.log().contains(&format!("restart_lsn at the drop {restart_lsn}")),
        "the log line lacks restart_lsn"
    );
    // The primary keeps its disk: the checkpoint the guard asks for brings pg_wal back
    // under the limit plus what recycling keeps (max_wal_size).
    c.wait_for("pg_wal to shrink after the drop", WAIT, |c| (c.pg_wal_bytes() <= (64 + 64 + 16) << 20).then_some(()));

    // Barman comes back: receive-wal makes the slot again (create_slot = auto), asks for
    // WAL that is gone, and fails. The new slot is not leased: under the recommended
    // scope (leased) the guard leaves it alone, however much it says it retains: no loop.
    let mut again = b.receive_wal();
    c.wait_for("receive-wal to recreate the slot", WAIT, |c| c.slot_exists("barman").then_some(()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while again.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    again.stop();
    let (_, check) = b.run(&["check", "pg"]);
    eprintln!("barman check after the drop (receive-wal failing):\n{check}");
    c.wait_passes(3);
    assert!(c.slot_exists("barman"), "the guard dropped an unleased recreated slot\n{}", c.describe());
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'barman' AND action ~ '_drop$'"), 1);
    assert_eq!(c.text("SELECT state FROM pgslotguard.slots WHERE slot_name = 'barman'"), "out_of_scope");

    // The README's runbook.
    b.ok(&["receive-wal", "--drop-slot", "pg"]);
    b.ok(&["receive-wal", "--reset", "pg"]);
    b.ok(&["receive-wal", "--create-slot", "pg"]);
    let _recv = b.receive_wal();
    wait_active(&c, "barman");
    adopt(&c, "64MB");
    b.switch_wal(&c);
    let check = b.check_ok(Duration::from_secs(60));
    eprintln!("barman check after the runbook:\n{check}");
    b.ok(&["backup", "--wait", "pg"]);
    let list = b.ok(&["list-backups", "pg"]);
    assert_eq!(list.lines().filter(|l| l.starts_with("pg ")).count(), 2, "{list}");
    eprintln!("barman_down_the_guard_drops_at_the_limit_and_the_runbook_brings_it_back: {:?}", started.elapsed());
}

#[test]
fn a_recreated_slot_dropped_again_for_the_same_limit_is_a_loop_said_once() {
    // Not the recommended settings: every physical slot under an inactivity limit. The
    // slot Barman makes again is never initialised (receive-wal asks for WAL that is gone
    // and exits, so restart_lsn stays NULL), stays inactive, and is dropped again after
    // the limit each time receive-wal runs (`barman cron` starts one a minute): the guard
    // says so once, in a `warn` event that names the loop, and goes on dropping.
    let started = Instant::now();
    let (c, b, mut recv) = primary_with_barman("barman-loop", &[], "1GB");
    recv.stop();
    c.set_policy(&[("pgslotguard.scope", "physical"), ("pgslotguard.max_inactive_time", "2s")]);
    c.wait_for("the guard to drop Barman's inactive slot", WAIT, |c| c.dropped("barman").then_some(()));
    let drops = |c: &Cluster| c.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'barman' AND action = 'inactive_drop'");
    assert_eq!(drops(&c), 1);
    // WAL moves on and the checkpoint removes what Barman had not received.
    c.make_wal(40);
    c.exec("CHECKPOINT");
    for round in 1..=3 {
        let mut again = b.receive_wal();
        c.wait_for(&format!("round {round}: the guard to drop the recreated slot"), WAIT, |c| (drops(c) == round + 1).then_some(()));
        again.stop();
    }
    let ev = events(&c, "barman");
    let loops: Vec<&(String, String)> = ev.iter().filter(|(a, r)| a == "warn" && r.starts_with("drop/recreate loop")).collect();
    assert_eq!(loops.len(), 1, "the loop is said once\n{ev:#?}");
    assert!(loops[0].1.contains("inactive_drop"), "{}", loops[0].1);
    assert_eq!(c.log().matches("drop/recreate loop").count(), 1, "one WARNING in the log");
    // Each drop of the loop still says what it costs.
    assert!(ev.iter().filter(|(a, _)| a == "inactive_drop").all(|(_, r)| r.contains("its consumer must start from a new base backup")), "{ev:#?}");
    eprintln!("a_recreated_slot_dropped_again_for_the_same_limit_is_a_loop_said_once: {:?}", started.elapsed());
}
