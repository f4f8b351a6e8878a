//! Patroni 3.0.2 with etcd 3.4 (Debian 12's `patroni` and `etcd-server`) beside
//! pgslotguard, with the real programs: two members on loopback, the README's
//! `ignore_slots` for lease names and `pgslotguard.*` in the DCS's `postgresql.parameters`.
//! - a lease lives its term through a member restart and a pause/resume, and is dropped at
//!   expiry;
//! - the guard never drops a member's slot, under the default scope nor under
//!   `scope = physical` with the README's exclude (while it drops an orphan);
//! - a switchover: the old leader's lease stays on the old leader (now a standby), the new
//!   leader has none, and the old leader's guard enforces it there.
//!
//! etcd runs as root, each Patroni as `postgres`; every daemon listens on 127.0.0.1 on a
//! free port (on another when that one was taken before it bound it), keeps its files in a
//! temp dir of its own and is stopped by its PID.
//! PostgreSQL 15 only: the roots where 17 and 18 are tested have no Patroni.
#![cfg(feature = "pg15")]

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The README's exclude pattern for Patroni's member slots (member names m1, m2, ...).
const MEMBER_SLOTS: &str = "^m[0-9]+$";

struct Etcd {
    proc: Proc,
    dir: PathBuf,
    port: u16,
}

impl Etcd {
    /// etcd on fresh client and peer ports, started again on others when one was taken
    /// before it bound it; returns once /health says it is healthy.
    fn start() -> Etcd {
        let dir = temp_dir("etcd");
        let log = dir.join("etcd.log");
        start_on_free_ports("etcd", free_ports(), |[port, peer]| {
            let from = std::fs::metadata(&log).map(|m| m.len() as usize).unwrap_or(0);
            let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
            // etcd binds its ports before it makes its data directory; each try starts empty anyway.
            let _ = std::fs::remove_dir_all(dir.join("data"));
            let child = Command::new("etcd")
                .args(["--name", "e1", "--data-dir"])
                .arg(dir.join("data"))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{port}")])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{port}")])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-cluster", &format!("e1=http://127.0.0.1:{peer}")])
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap();
            // Dropped on Err: stopped by its PID.
            let mut proc = Proc(child);
            Etcd::wait_healthy(&mut proc, port, &log, from)?;
            Ok(Etcd { proc, dir: dir.clone(), port })
        })
    }

    /// Wait until this etcd serves: it logged that it serves clients on its port (so the
    /// answer is its own) and GET /health says healthy. Err(its log since `from`) when a port
    /// was taken; a panic when it exits for another reason or is not healthy after 30 s.
    fn wait_healthy(proc: &mut Proc, port: u16, log: &Path, from: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let serving = format!("serving insecure client requests on 127.0.0.1:{port},");
        loop {
            let exited = proc.0.try_wait().expect("wait for etcd");
            let said = std::fs::read_to_string(log).unwrap_or_default().get(from..).unwrap_or("").to_string();
            if address_in_use(&said) {
                return Err(said);
            }
            if let Some(status) = exited {
                panic!("etcd exited ({status}) before it served on {port}:\n{said}");
            }
            if said.contains(&serving) {
                let out = Command::new("curl").args(["-s", "-m", "2", &format!("http://127.0.0.1:{port}/health")]).output().unwrap();
                if String::from_utf8_lossy(&out.stdout).contains(r#""health":"true""#) {
                    return Ok(());
                }
            }
            assert!(Instant::now() < deadline, "etcd was not healthy on {port} within 30 s:\n{said}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.proc.stop();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One Patroni member: its process, and its PostgreSQL as a `Cluster` (for SQL, the log,
/// and a last stop by data directory).
struct Member {
    name: String,
    scope: String,
    /// etcd's client port.
    etcd: u16,
    conf: PathBuf,
    rest: u16,
    proc: Option<Proc>,
    pg: Cluster,
}

impl Member {
    fn new(name: &str, etcd: &Etcd, scope: &str) -> Member {
        let dir = temp_dir(&format!("patroni-{name}"));
        let [port, rest] = free_ports();
        let data = dir.join("data");
        let conf = dir.join("patroni.yml");
        let pg = Cluster::started_by_others(dir, data, port);
        let mut m = Member { name: name.into(), scope: scope.into(), etcd: etcd.port, conf, rest, proc: None, pg };
        m.start();
        m
    }

    /// patroni.yml for PostgreSQL on `port` and the REST API on `rest`.
    fn write_conf(&self, port: u16, rest: u16) {
        let yml = format!(
            r#"scope: {scope}
name: {name}
log:
  level: INFO
  dir: {dir}
restapi:
  listen: 127.0.0.1:{rest}
  connect_address: 127.0.0.1:{rest}
etcd3:
  hosts: 127.0.0.1:{etcd}
bootstrap:
  dcs:
    # A stopped member's key lives this long; Patroni 3 drops the slot of a member whose key
    # has gone. 30 s (Patroni's default) leaves the member-slot test time on a loaded machine.
    ttl: 30
    loop_wait: 1
    retry_timeout: 4
    maximum_lag_on_failover: 104857600
    ignore_slots:
      - name: nightly
        type: physical
    postgresql:
      use_slots: true
      use_pg_rewind: false
      parameters:
        wal_level: replica
        hot_standby: 'on'
        max_wal_senders: 10
        max_replication_slots: 10
        wal_keep_size: 0
        fsync: 'off'
        shared_preload_libraries: pgslotguard
        pgslotguard.database: postgres
        pgslotguard.naptime: 1s
        pgslotguard.warn_fraction: 0
  initdb:
    - encoding: UTF8
postgresql:
  listen: 127.0.0.1:{port}
  connect_address: 127.0.0.1:{port}
  data_dir: {data}
  bin_dir: {bin}
  pgpass: {dir}/pgpass
  basebackup:
    - checkpoint: 'fast'
  authentication:
    superuser:
      username: postgres
    replication:
      username: postgres
  parameters:
    unix_socket_directories: '{dir}'
    log_line_prefix: '%m [%p] %b '
    logging_collector: 'on'
    log_directory: '{dir}'
    log_filename: 'server-data.log'
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 trust
    - host replication all 127.0.0.1/32 trust
"#,
            name = self.name,
            scope = self.scope,
            dir = self.pg.dir.display(),
            etcd = self.etcd,
            data = self.pg.data.display(),
            bin = BIN,
        );
        std::fs::write(&self.conf, yml).unwrap();
    }

    /// Start Patroni on the member's ports, or on new ones when one was taken before Patroni
    /// or its PostgreSQL bound it (`start_on_free_ports`); returns once both serve.
    fn start(&mut self) {
        let what = format!("Patroni member {}", self.name);
        start_on_free_ports(&what, [self.pg.port(), self.rest], |[port, rest]| self.start_on(port, rest));
    }

    /// Write patroni.yml with `port` and `rest`, start Patroni (as postgres) and wait until
    /// its REST API answers for this cluster and its PostgreSQL accepts connections on `port`
    /// (from this member's data directory, not from whatever took the port). When its logs
    /// say a port was taken, stop it (by its PID) and return Err(what they said); a panic
    /// when it exits for another reason or does not serve within 90 s. Its stdout and
    /// stderr go to patroni.out in the member's dir (so does its PostgreSQL's stderr before
    /// the logging collector starts), its log to patroni.log there (`log: dir:`),
    /// PostgreSQL's own log to the file `Cluster::log` reads.
    fn start_on(&mut self, port: u16, rest: u16) -> Result<(), String> {
        if port != self.pg.port() {
            // The same directories on a new port. The old value is forgotten, not dropped:
            // its drop would stop this member's PostgreSQL and remove the directory.
            let moved = Cluster::started_by_others(self.pg.dir.clone(), self.pg.data.clone(), port);
            std::mem::forget(std::mem::replace(&mut self.pg, moved));
        }
        self.rest = rest;
        self.write_conf(port, rest);
        let logs = ["patroni.out", "patroni.log", "server-data.log"].map(|f| self.pg.dir.join(f));
        let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let from = logs.clone().map(|p| read(&p).len());
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&logs[0]).unwrap();
        let child = pg_cmd("patroni").arg(&self.conf).stdout(out.try_clone().unwrap()).stderr(out).spawn().unwrap();
        self.proc = Some(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let exited = self.proc.as_mut().unwrap().0.try_wait().expect("wait for Patroni");
            let said: String = logs.iter().zip(from).map(|(p, n)| read(p).get(n..).unwrap_or("").to_string()).collect();
            if address_in_use(&said) {
                self.stop();
                return Err(said);
            }
            if let Some(status) = exited {
                panic!("Patroni {} exited ({status}) before it served:\n{said}", self.name);
            }
            if self.serves() {
                return Ok(());
            }
            assert!(Instant::now() < deadline, "Patroni {} did not serve on {port} (REST {rest}) within 90 s:\n{said}", self.name);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Its REST API answers for this cluster (scope), and its PostgreSQL accepts a
    /// connection and runs from this member's data directory (one try each, 2 s at most:
    /// libpq's connect_timeout bounds the whole connection, also the wait for an answer from
    /// a port whatever took it never answers on).
    fn serves(&self) -> bool {
        let rest_ok = self.rest_status().is_some_and(|v| v["patroni"]["scope"].as_str() == Some(self.scope.as_str()));
        rest_ok && {
            let conninfo = format!("{} connect_timeout=2", self.pg.conninfo("postgres"));
            let out = Command::new(bin("psql"))
                .args(["-X", "-Atq", "-d", &conninfo, "-c", "SELECT current_setting('data_directory')"])
                .stderr(Stdio::null())
                .output()
                .unwrap();
            out.status.success() && Path::new(String::from_utf8_lossy(&out.stdout).trim()) == self.pg.data
        }
    }

    /// SIGTERM to Patroni (it stops its PostgreSQL, fast), by PID; wait for it to exit.
    fn stop(&mut self) {
        let Some(mut p) = self.proc.take() else { return };
        // Already exited (and reaped): its PID may be another process's by now.
        if let Ok(Some(_)) = p.0.try_wait() {
            return;
        }
        // sudo relays the signal to Patroni.
        let _ = Command::new("kill").arg("-TERM").arg(p.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = p.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        p.stop();
    }

    /// Patroni's log. With `log: dir:` in its configuration Patroni 3 writes it to
    /// {dir}/patroni.log alone (patroni.out gets nothing of it); every HA loop (a second
    /// here) logs what it did, which tells that this is the file.
    fn patroni_log(&self) -> String {
        let path = self.pg.dir.join("patroni.log");
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(log.contains("no action. I am ("), "{} holds no HA loop of Patroni's:\n{log}", path.display());
        log
    }

    /// Patroni left `slot` alone through `what`: it logged no drop of it (it drops, and
    /// logs, a slot it does not manage unless ignore_slots matches it), and the slot is there.
    fn assert_patroni_kept(&self, slot: &str, what: &str) {
        let dropped = format!("Dropped unknown replication slot '{slot}'");
        let log = self.patroni_log();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("replication slot")).collect();
        assert!(!log.contains(&dropped), "through {what}, Patroni dropped the lease's slot:\n{}", lines.join("\n"));
        assert!(self.pg.slot_exists(slot), "the lease's slot did not survive {what}\n{}", self.pg.describe());
    }

    fn ctl(&self, args: &[&str]) -> String {
        let out = pg_cmd("patronictl").arg("-c").arg(&self.conf).args(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "patronictl {args:?} failed:\n{text}");
        text
    }

    /// The member's role as its REST API says (`GET /patroni`): "master"/"primary",
    /// "replica", or "" while it does not answer.
    fn role(&self) -> String {
        self.rest_status()
            .map(|v| format!("{}/{}", v["role"].as_str().unwrap_or(""), v["state"].as_str().unwrap_or("")))
            .unwrap_or_default()
    }

    /// `GET /patroni`, when it answers with JSON.
    fn rest_status(&self) -> Option<serde_json::Value> {
        let out = Command::new("curl").args(["-s", "-m", "2", &format!("http://127.0.0.1:{}/patroni", self.rest)]).output().unwrap();
        serde_json::from_slice(&out.stdout).ok()
    }

    fn is_leader(&self) -> bool {
        let r = self.role();
        r == "master/running" || r == "primary/running"
    }

    fn is_streaming_replica(&self) -> bool {
        self.role() == "replica/running"
            && self.pg.try_sql("SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'").map(|r| r.len() == 1).unwrap_or(false)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait(what: &str, timeout: Duration, mut probe: impl FnMut() -> bool) {
    poll(timeout, Duration::from_millis(200), || probe().then_some(())).unwrap_or_else(|| panic!("gave up after {timeout:?} waiting for {what}"));
}

/// etcd and two members: m1 bootstraps and leads, m2 streams from it through slot m2.
/// The extension is created on the leader (and reaches m2 by replication).
fn two_members(scope: &str) -> (Etcd, Member, Member) {
    let t = Instant::now();
    let etcd = Etcd::start();
    let m1 = Member::new("m1", &etcd, scope);
    wait("m1 to lead", Duration::from_secs(60), || m1.is_leader());
    let led = t.elapsed();
    m1.pg.exec("CREATE EXTENSION pgslotguard");
    let m2 = Member::new("m2", &etcd, scope);
    wait("m2 to stream from m1", Duration::from_secs(90), || m2.is_streaming_replica());
    let streamed = t.elapsed();
    m1.pg.wait_for("slot m2 on the leader, active", Duration::from_secs(30), |c| {
        (c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'm2' AND active") == 1).then_some(())
    });
    eprintln!("{scope}: m1 leads at {led:?}, m2 streams at {streamed:?}, slot m2 active at {:?}", t.elapsed());
    (etcd, m1, m2)
}

fn actions(c: &Cluster, slot: &str) -> Vec<String> {
    c.sql(&format!("SELECT action FROM pgslotguard.events WHERE slot_name = '{slot}' ORDER BY at, id"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

#[test]
fn a_lease_in_ignore_slots_lives_through_a_restart_and_a_pause_and_ends_at_expiry() {
    let started = Instant::now();
    let (_etcd, m1, _m2) = two_members("pgsg-life");
    m1.pg.exec("SELECT * FROM backup_slot_lease('nightly', '5 min', 'test')");
    let leased = Instant::now();

    // A restart of the member: Patroni reads the slot list when PostgreSQL starts, and
    // drops a slot it does not manage unless ignore_slots matches it.
    m1.ctl(&["restart", "pgsg-life", "m1", "--force"]);
    wait("m1 to lead again after its restart", Duration::from_secs(60), || m1.is_leader());
    m1.pg.wait_passes(2);
    m1.assert_patroni_kept("nightly", "a restart");

    // Pause and resume: at resume Patroni reads the slot list again.
    m1.ctl(&["pause", "pgsg-life", "--wait"]);
    m1.ctl(&["resume", "pgsg-life", "--wait"]);
    m1.pg.wait_passes(3);
    m1.assert_patroni_kept("nightly", "pause/resume");
    assert_eq!(m1.pg.text("SELECT state FROM pgslotguard.leases WHERE slot_name = 'nightly'"), "ok");
    eprintln!("restart and pause/resume done {:?} into the lease", leased.elapsed());

    // The backup is done early: its term is cut to 3 s, and at expiry the guard drops it.
    m1.pg.exec("SELECT backup_slot_renew('nightly', '3s')");
    let renewed = Instant::now();
    m1.pg.wait_for("the guard to drop the slot at expiry", Duration::from_secs(60), |c| c.dropped("nightly").then_some(()));
    assert!(renewed.elapsed() >= Duration::from_secs(3), "dropped before expiry: {:?}", renewed.elapsed());
    assert_eq!(actions(&m1.pg, "nightly"), ["lease", "renew", "expire_drop"]);
    eprintln!("a_lease_in_ignore_slots_lives_through_a_restart_and_a_pause_and_ends_at_expiry: {:?}", started.elapsed());
}

#[test]
fn the_guard_never_drops_a_member_slot() {
    let started = Instant::now();
    let (_etcd, m1, mut m2) = two_members("pgsg-members");
    // Every limit that could hit a member's slot: inactivity of 2 s.
    m1.ctl(&["edit-config", "pgsg-members", "--force", "-p", "pgslotguard.max_inactive_time=2s"]);
    m1.pg.wait_for("the new limit on m1", Duration::from_secs(30), |c| (c.text("SHOW pgslotguard.max_inactive_time") == "2s").then_some(()));

    // Default scope (leased): a member away for longer than the limit keeps its slot.
    m2.stop();
    m1.pg.wait_for("slot m2 to go inactive", Duration::from_secs(30), |c| {
        (c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'm2' AND NOT active") == 1).then_some(())
    });
    m1.pg.wait_for("the guard to see slot m2 inactive past the limit", Duration::from_secs(30), |c| {
        (c.text("SELECT (inactive_for > interval '3s')::text FROM pgslotguard.slots WHERE slot_name = 'm2'") == "true").then_some(())
    });
    m1.pg.wait_passes(2);
    assert!(m1.pg.slot_exists("m2"), "scope = leased: the guard dropped a member's slot\n{}", m1.pg.describe());
    assert_eq!(m1.pg.text("SELECT scope_reason FROM pgslotguard.slots WHERE slot_name = 'm2'"), "not leased (scope = leased)");

    // scope = physical with the README's exclude, through the DCS: the member's slot is
    // excluded, and an orphan physical slot is dropped (the rule is on).
    m1.ctl(&["edit-config", "pgsg-members", "--force", "-p", "pgslotguard.scope=physical", "-p", &format!("pgslotguard.exclude={MEMBER_SLOTS}")]);
    m1.pg.wait_for("scope = physical on m1", Duration::from_secs(30), |c| (c.text("SHOW pgslotguard.scope") == "physical").then_some(()));
    assert_eq!(m1.pg.text("SHOW pgslotguard.exclude"), MEMBER_SLOTS);
    m1.pg.exec("SELECT pg_create_physical_replication_slot('orphan', true)");
    m1.pg.wait_for("the guard to drop the orphan", Duration::from_secs(30), |c| c.dropped("orphan").then_some(()));
    m1.pg.wait_passes(2);
    assert!(m1.pg.slot_exists("m2"), "scope = physical with the exclude: the guard dropped a member's slot\n{}", m1.pg.describe());
    assert_eq!(m1.pg.text("SELECT scope_reason FROM pgslotguard.slots WHERE slot_name = 'm2'"), "excluded by pgslotguard.exclude");
    assert_eq!(actions(&m1.pg, "m2"), Vec::<String>::new());

    // m2 comes back and streams through its slot.
    m2.start();
    wait("m2 to stream again", Duration::from_secs(60), || m2.is_streaming_replica());
    assert_eq!(m1.pg.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'm2' AND active"), 1);
    eprintln!("the_guard_never_drops_a_member_slot: {:?}", started.elapsed());
}

#[test]
fn after_a_switchover_the_old_leaders_lease_stays_and_is_enforced_there() {
    let started = Instant::now();
    let (_etcd, m1, m2) = two_members("pgsg-switch");
    m1.pg.exec("SELECT * FROM backup_slot_lease('nightly', '5 min', 'test')");
    let leased = Instant::now();
    m1.ctl(&["switchover", "pgsg-switch", "--leader", "m1", "--candidate", "m2", "--force"]);
    wait("m2 to lead", Duration::from_secs(60), || m2.is_leader());
    wait("m1 to stream from m2", Duration::from_secs(60), || m1.is_streaming_replica());
    eprintln!("switchover done {:?} after the lease", leased.elapsed());

    // The lease and its slot stayed on the old leader, now a standby; the new leader has
    // neither, and no "dropped outside pgslotguard" anywhere.
    assert!(m1.pg.slot_exists("nightly"), "{}", m1.pg.describe());
    assert_eq!(m1.pg.text("SELECT pg_is_in_recovery()::text"), "true");
    assert_eq!(m1.pg.count("SELECT count(*) FROM pgslotguard.leases WHERE slot_name = 'nightly'"), 1);
    assert!(!m2.pg.slot_exists("nightly"));
    assert_eq!(m2.pg.count("SELECT count(*) FROM pgslotguard.leases"), 0);
    m2.pg.wait_passes(2);
    assert_eq!(m2.pg.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'nightly' AND action <> 'lease'"), 0);

    // The old leader's guard enforces the lease there: its term cut to 3 s (a renewal on
    // the standby, where the lease lives), it is dropped at expiry (the event goes to the
    // standby's ring: no table can be written in recovery).
    m1.pg.exec("SELECT backup_slot_renew('nightly', '3s')");
    let renewed = Instant::now();
    m1.pg.wait_for("the standby's guard to drop the slot at expiry", Duration::from_secs(60), |c| {
        (!c.slot_exists("nightly")).then_some(())
    });
    assert!(renewed.elapsed() >= Duration::from_secs(3));
    m1.pg.wait_for("the expire_drop event on m1", Duration::from_secs(10), |c| {
        (c.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'nightly' AND action = 'expire_drop' AND kept_in = 'ring'") == 1).then_some(())
    });
    assert!(!m1.pg.log().contains("dropped outside pgslotguard"));
    assert!(!m2.pg.log().contains("dropped outside pgslotguard"));
    eprintln!("after_a_switchover_the_old_leaders_lease_stays_and_is_enforced_there: {:?}", started.elapsed());
}
