//! End to end, the way a DBA lives it: real pg_basebackup through leased slots, standbys
//! built from those backups, backups that die, long backups with a heartbeat, a retained
//! WAL breach under pgbench, restarts and crashes, promotion, and the shipped backup script.

mod common;
use common::*;
use std::path::PathBuf;
use std::time::Duration;

fn basebackup(c: &Cluster, slot: &str, dir: &PathBuf, extra: &[&str]) -> std::process::Output {
    let mut cmd = c.tool("pg_basebackup");
    // -c fast: a spread checkpoint would keep pg_basebackup off the slot for minutes
    cmd.args(["-h", "127.0.0.1", "-p", &c.port_s(), "-U", "postgres", "-c", "fast", "-S", slot, "--wal-method=stream", "-D"])
        .arg(dir)
        .args(extra);
    cmd.output().unwrap()
}

/// Make a standby cluster out of a backup taken with -R, on its own port and socket dir.
fn standby_from(backup: PathBuf, keep_slot_setting: bool) -> Cluster {
    let dir = backup.parent().unwrap().to_path_buf();
    let auto = backup.join("postgresql.auto.conf");
    if !keep_slot_setting {
        let text = std::fs::read_to_string(&auto).unwrap();
        let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("primary_slot_name")).collect();
        std::fs::write(&auto, kept.join("\n") + "\n").unwrap();
    }
    let s = Cluster::at(dir, backup, "hot_standby = on");
    s.pg_ctl_start();
    s
}

/// Lease `slot` and take a backup through it with -R (standby settings written); returns
/// the backup's data dir, in a temp dir of its own.
fn leased_backup(c: &Cluster, slot: &str) -> PathBuf {
    c.exec(&format!("SELECT * FROM backup_slot_lease('{slot}', '10 min', 'test')"));
    let dir = temp_dir(slot).join("data");
    let out = basebackup(c, slot, &dir, &["-R"]);
    assert!(out.status.success(), "pg_basebackup: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

fn wait_streaming(primary: &Cluster) {
    primary.wait_for("a standby streaming from the primary", WAIT, |c| {
        (c.count("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") >= 1).then_some(())
    });
}

#[test]
fn backup_through_lease_then_release_gives_a_valid_standby() {
    let c = with_extension("bb-release", &[]);
    let dir = leased_backup(&c, "nightly");
    assert_eq!(c.text("SELECT backup_slot_release('nightly')::text"), "true");
    assert!(!c.slot_exists("nightly"));
    assert_eq!(
        c.text("SELECT string_agg(action, ',' ORDER BY id) FROM pgslotguard.events WHERE slot_name = 'nightly'"),
        "lease,release"
    );
    let standby = standby_from(dir, false);
    wait_streaming(&c);
    assert_eq!(standby.text("SELECT pg_is_in_recovery()::text"), "true");
}

/// A backup kept as a standby's slot is out of the guard's scope for good: with its
/// standby away (the slot inactive, so that nothing but the end of its lease protects it)
/// and limits it breaks at once, it stays, while a lease left as it was, in the same state,
/// is dropped; the standby then streams through it again.
#[test]
fn backup_kept_as_standby_slot_is_never_dropped() {
    let c = with_extension("bb-keep", &[]);
    let dir = leased_backup(&c, "standby1");
    c.exec("SELECT backup_slot_keep('standby1')");
    c.exec("SELECT * FROM backup_slot_lease('not_kept', '10 min', 'test')");
    let standby = standby_from(dir, true);
    wait_streaming(&c);
    assert_eq!(c.text("SELECT active::text FROM pg_replication_slots WHERE slot_name = 'standby1'"), "true");

    let inactive = |c: &Cluster| {
        (c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'standby1' AND NOT active") == 1).then_some(())
    };
    standby.stop("fast");
    c.wait_for("the kept slot to go inactive", WAIT, inactive);
    // limits that both slots break at once, were they in scope
    c.set_policy(&[("pgslotguard.max_retained_wal", "1MB"), ("pgslotguard.max_slot_age", "2s")]);
    c.make_wal(4);
    c.wait_for("the guard to drop the lease that was not kept", WAIT, |c| c.dropped("not_kept").then_some(()));
    c.wait_passes(2);
    assert!(c.slot_exists("standby1"), "the guard dropped a kept slot\n{}", c.describe());
    assert!(inactive(&c).is_some(), "the premise: the kept slot stayed inactive\n{}", c.describe());
    assert_eq!(c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'standby1' AND restart_lsn IS NOT NULL"), 1);
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.leases"), 0);
    assert_eq!(c.text("SELECT scope_reason FROM pgslotguard.slots WHERE slot_name = 'standby1'"), "not leased (scope = leased)");
    assert_eq!(c.text("SELECT string_agg(action, ',' ORDER BY id) FROM pgslotguard.events WHERE slot_name = 'standby1'"), "lease,keep");

    standby.pg_ctl_start();
    c.wait_for("the standby to stream through its kept slot again", WAIT, |c| {
        (c.text("SELECT active::text FROM pg_replication_slots WHERE slot_name = 'standby1'") == "true").then_some(())
    });
}

#[test]
fn backup_that_dies_is_cleaned_up_after_expiry() {
    let c = with_extension("bb-dies", &[]);
    c.make_wal(20); // something to copy, slowly
    c.exec("SELECT * FROM backup_slot_lease('dying', '4 s')");
    let first_seg = c.text("SELECT pg_walfile_name(restart_lsn) FROM pg_replication_slots WHERE slot_name = 'dying'");
    let dir = c.dir.join("backup3");
    let mut bb = Proc(
        c.tool("pg_basebackup")
            .args(["-h", "127.0.0.1", "-p", &c.port_s(), "-U", "postgres", "-S", "dying", "--wal-method=stream"])
            .args(["-c", "fast", "--max-rate=2M", "-D"])
            .arg(&dir)
            .spawn()
            .unwrap(),
    );
    c.wait_for("pg_basebackup to stream from the slot", WAIT, |c| {
        (c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'dying' AND active") == 1).then_some(())
    });
    std::thread::sleep(Duration::from_secs(5)); // past the TTL while streaming
    assert!(c.slot_exists("dying"), "an active slot was dropped for expiry alone\n{}", c.describe());
    assert_eq!(c.text("SELECT state FROM pgslotguard.leases WHERE slot_name = 'dying'"), "expired_active");
    bb.stop(); // the backup dies half-way
    c.make_wal(48);
    c.wait_for("the guard to drop the dead backup's slot", WAIT, |c| c.dropped("dying").then_some(()));
    assert_eq!(
        c.text("SELECT action || ' by ' || actor FROM pgslotguard.events WHERE slot_name = 'dying' ORDER BY id DESC LIMIT 1"),
        "expire_drop by worker"
    );
    c.exec("CHECKPOINT");
    c.exec("CHECKPOINT");
    let still = c.count(&format!("SELECT count(*) FROM pg_ls_waldir() WHERE name = '{first_seg}'"));
    assert_eq!(still, 0, "segment {first_seg} pinned by the slot is still in pg_wal after the drop and a checkpoint");
}

#[test]
fn long_backup_survives_with_heartbeat_and_without_one_until_it_stops() {
    let c = with_extension("bb-long", &[]);
    c.make_wal(16);
    // with the shipped script: ttl 2 s, heartbeat 1 s, a backup that takes several seconds
    let dir = c.dir.join("backup4");
    let conn = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", c.port());
    let script = std::fs::canonicalize("scripts/pgslotguard-backup").unwrap();
    // The script is a client: it runs as the invoking user (root here), which also means
    // the checkout need not be readable by the postgres user.
    let out = std::process::Command::new("bash")
        .arg(&script)
        .args(["-d", &conn, "-s", "heartbeat", "-t", "2 s", "-i", "1", "-D"])
        .arg(&dir)
        .args(["--", "-c", "fast", "--max-rate=8M"])
        .env("PSQL", bin("psql"))
        .env("PG_BASEBACKUP", bin("pg_basebackup"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "script failed: {stderr}\n{}", c.describe());
    assert!(stderr.contains("released"), "{stderr}");
    // Renewals within a minute of the last one recorded are not recorded again (a renewal
    // loop must not flood the event log): the first one is; the backup outlived its 2 s
    // lease several times over, so the later ones happened too.
    let renewals = c.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'heartbeat' AND action = 'renew'");
    let dropped = c.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'heartbeat' AND action LIKE '%drop'");
    let lasted = c.text(
        "SELECT (max(at) FILTER (WHERE action = 'release') - min(at) FILTER (WHERE action = 'lease') > interval '4 s')::text
           FROM pgslotguard.events WHERE slot_name = 'heartbeat'",
    );
    assert!(renewals == 1 && lasted == "true", "the backup outlived its TTL without renewing?\n{}", c.describe());
    assert_eq!(dropped, 0, "the guard dropped a renewed lease\n{}", c.describe());
    assert!(std::path::Path::new(&dir).join("backup_manifest").exists());

    // without heartbeat: expires while streaming, survives, dropped once it stops
    c.exec("SELECT * FROM backup_slot_lease('no_heartbeat', '3 s')");
    let dir2 = c.dir.join("backup5");
    let out = basebackup(&c, "no_heartbeat", &dir2, &["--max-rate=8M"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Expired while streaming: reported (warn), not dropped (pg_basebackup succeeded, and
    // nothing terminated it). The guard's next pass (every second here) may already have
    // dropped it since pg_basebackup let go of it.
    let ev = c.text("SELECT string_agg(action, ',' ORDER BY id) FROM pgslotguard.events WHERE slot_name = 'no_heartbeat'");
    assert!(ev == "lease,warn" || ev == "lease,warn,expire_drop", "dropped while streaming? {ev}\n{}", c.describe());
    c.wait_for("the slot to be dropped once the backup stopped", WAIT, |c| c.dropped("no_heartbeat").then_some(()));
}

#[test]
fn retained_wal_breach_drops_idle_slot_and_terminates_active_consumer() {
    let c = with_extension("bb-retained", &["pgslotguard.max_retained_wal = '16MB'", "max_wal_size = '1GB'"]);
    c.exec("SELECT * FROM backup_slot_lease('idle_slot', '1h')");
    c.run_tool("pgbench", &["-h", "127.0.0.1", "-p", &c.port_s(), "-U", "postgres", "-i", "-s", "2", "-q", "postgres"]);
    let load = |secs: &str| {
        c.run_tool("pgbench", &["-h", "127.0.0.1", "-p", &c.port_s(), "-U", "postgres", "-c", "2", "-T", secs, "-n", "postgres"]);
    };
    load("3");
    c.make_wal(20);
    c.wait_for("the idle slot to be dropped for retained WAL", WAIT, |c| c.dropped("idle_slot").then_some(()));
    assert_eq!(c.text("SELECT action FROM pgslotguard.events WHERE slot_name = 'idle_slot' ORDER BY id DESC LIMIT 1"), "retained_drop");
    let retained = c.count("SELECT retained_bytes FROM pgslotguard.events WHERE slot_name = 'idle_slot' ORDER BY id DESC LIMIT 1");
    assert!(retained > 16 << 20, "recorded retained {retained}");

    // active consumer: pg_receivewal attached, then frozen (SIGSTOP) so WAL piles up
    c.set_policy(&[("pgslotguard.terminate_active", "on")]);
    // A new slot reserves WAL from the last checkpoint's redo point: checkpoint first, or
    // it starts out over the 16 MB limit (and the guard, woken by the lease's commit,
    // drops it before pg_receivewal attaches).
    c.exec("CHECKPOINT");
    c.exec("SELECT * FROM backup_slot_lease('receiver', '1h')");
    let (recv, waldir) = c.receivewal("receiver");
    let pid = c.wait_for("pg_receivewal on the slot", WAIT, |c| {
        c.sql("SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'receiver' AND active")
            .first()
            .map(|r| r.get::<_, i32>(0))
    });
    let child = recv.program_pid();
    stop_process(child);
    c.make_wal(24);
    c.wait_for("the active slot to be terminated and dropped", WAIT, |c| c.dropped("receiver").then_some(()));
    signal(child, "CONT");
    let ev = c.text("SELECT string_agg(action, ',' ORDER BY id) FROM pgslotguard.events WHERE slot_name = 'receiver'");
    // a walsender stuck on a stalled client may need a second terminate before it exits
    assert!(
        ev.starts_with("lease,terminate") && ev.ends_with(",retained_drop") && !ev.contains("error"),
        "{ev}\n{}",
        c.describe()
    );
    assert!(c.log().contains(&format!("terminated walsender PID {pid}")), "{}", c.log_tail(20));
    let _ = std::fs::remove_dir_all(&waldir);
}

#[test]
fn leases_events_and_tracking_survive_restarts_and_nothing_is_done_twice() {
    let c = with_extension("bb-restart", &[]);
    c.exec("SELECT * FROM backup_slot_lease('keeps', '1h', 'restart test')");
    c.exec("SELECT * FROM backup_slot_lease('short', '2 s')");
    c.wait_for("the short lease to be enforced", WAIT, |c| c.dropped("short").then_some(()));
    c.wait_passes(1);
    let seen = c.text("SELECT first_seen::text FROM pgslotguard.tracking WHERE slot_name = 'keeps'");
    let events = c.count("SELECT count(*) FROM pgslotguard.events");
    for mode in ["fast", "immediate"] {
        c.restart(mode);
        c.wait_for(&format!("the worker after a {mode} restart"), WAIT, |c| c.worker_pid());
        c.wait_passes(2);
        assert!(c.slot_exists("keeps"), "{mode}: {}", c.describe());
        assert_eq!(c.text("SELECT holder FROM pgslotguard.leases WHERE slot_name = 'keeps'"), "restart test");
        assert_eq!(c.text("SELECT first_seen::text FROM pgslotguard.tracking WHERE slot_name = 'keeps'"), seen);
        assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events"), events, "{mode}: an action was taken again\n{}", c.describe());
    }
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'expire_drop'"), 1);
}

#[test]
fn a_standby_from_a_leased_backup_starts_without_its_primarys_leases_and_guards_through_promotion() {
    let c = with_extension("bb-standby", &[]);
    c.exec("SELECT * FROM backup_slot_lease('expires_later', '20 s')");
    let dir = leased_backup(&c, "to_standby");
    let s = standby_from(dir, false);
    wait_streaming(&c);
    s.wait_for("the standby to accept queries", WAIT, |s| s.try_sql("SELECT 1").ok().map(|_| ()));
    // the guard runs on the standby, for the standby's own slots (tests/standby.rs)
    s.wait_for("the guard on the standby", WAIT, |s| s.worker_pid());
    assert_eq!(s.text("SELECT in_recovery::text FROM pgslotguard.status"), "true");
    // every view works on the standby: its reads are read-only, and a hot standby cannot
    // assign a transaction ID
    for v in ["leases", "slots", "events", "status", "tracking"] {
        s.try_sql(&format!("SELECT * FROM pgslotguard.{v}")).unwrap_or_else(|e| panic!("pgslotguard.{v} on a standby: {e}"));
    }
    // Leases are per server, as slots are: the standby's data directory was copied with the
    // primary's store but without its slots, so those leases ended at its start, quietly.
    assert_eq!(s.count("SELECT count(*) FROM pgslotguard.leases"), 0);
    assert!(s.log().contains("lease(s) whose replication slot is not on this server"), "{}", s.log_tail(20));
    assert!(!s.log().contains("ERROR:  pgslotguard") && !s.log().contains("FATAL"), "{}", s.log_tail(20));

    c.stop("fast");
    s.exec("SELECT pg_promote()");
    s.wait_for("the promotion to end", WAIT, |s| (s.text("SELECT pg_is_in_recovery()::text") == "false").then_some(()));
    s.exec("SELECT * FROM backup_slot_lease('after_promote', '1 s')");
    s.wait_for("the promoted server's guard to enforce", WAIT, |s| s.dropped("after_promote").then_some(()));
}
