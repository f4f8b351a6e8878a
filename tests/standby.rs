//! The guard on hot standbys: leases on a standby's own slots, a base backup taken from
//! the standby through one, the guard dropping at expiry and for the floor there, all with
//! the primary down too; promotion with a live lease; slots synchronized from the primary
//! (17+) never touched. Every standby is made with pg_basebackup -R from its primary.

mod common;
use common::*;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

/// A primary with the extension, and a hot standby of it (streaming, queries accepted).
fn primary_and_standby(tag: &str, extra: &[&str], standby_extra: &[&str]) -> (Cluster, Cluster) {
    let p = with_extension(tag, extra);
    let s = Cluster::from_base_backup(&p, &format!("{tag}-sb"), true, None);
    s.append_conf(&standby_extra.join("\n"));
    start_streaming(&p, &s);
    (p, s)
}

/// Start a standby made by `from_base_backup` and wait until it streams from `p`.
fn start_streaming(p: &Cluster, s: &Cluster) {
    s.pg_ctl_start();
    s.wait_for("the standby to accept queries", WAIT, |s| {
        s.try_sql("SELECT pg_is_in_recovery()").ok().filter(|r| r[0].get::<_, bool>(0)).map(|_| ())
    });
    p.wait_for("the standby to stream", WAIT, |p| {
        (p.count("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") >= 1).then_some(())
    });
}

/// A primary, and a standby of it whose pg_wal lies on `fs` and that streams through a
/// slot on the primary (so the primary keeps what the standby has not received).
fn standby_on(fs: &Tmpfs, tag: &str, standby_conf: &str) -> (Cluster, Cluster) {
    let p = with_extension(tag, &["max_wal_size = '32MB'", "min_wal_size = '32MB'"]);
    p.exec("SELECT pg_create_physical_replication_slot('standby_1', true)");
    let s = Cluster::from_base_backup(&p, &format!("{tag}-sb"), true, Some(&fs.dir.join("wal")));
    s.append_conf(&format!("primary_slot_name = 'standby_1'\n{standby_conf}"));
    start_streaming(&p, &s);
    (p, s)
}

#[test]
fn a_lease_on_a_standby_serves_a_base_backup_taken_from_it_and_is_released() {
    let (p, s) = primary_and_standby("sb-backup", &[], &[]);
    s.wait_for("the guard on the standby", WAIT, |s| s.worker_pid());
    assert_eq!(s.text("SELECT in_recovery::text FROM pgslotguard.status"), "true");
    let lsn = s.text("SELECT lsn::text FROM backup_slot_lease('from_standby', '10 min', 'backup of the standby')");
    assert!(lsn.contains('/'), "the slot reserved no WAL: {lsn}");
    // keep WAL flowing on the primary while the standby is backed up
    let writer = std::thread::spawn({
        let conn = p.conninfo("postgres");
        move || {
            let mut cl = postgres::Client::connect(&conn, postgres::NoTls).unwrap();
            for _ in 0..40 {
                let _ = cl.batch_execute("CREATE TABLE IF NOT EXISTS tick (t timestamptz); INSERT INTO tick VALUES (now()); SELECT pg_switch_wal();");
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    });
    let dir = temp_dir("sb-backup-copy").join("data");
    let out = s
        .tool("pg_basebackup")
        .args(["-h", "127.0.0.1", "-p", &s.port_s(), "-U", "postgres", "-c", "fast", "-S", "from_standby", "--wal-method=stream", "-D"])
        .arg(&dir)
        .output()
        .unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "pg_basebackup from the standby: {}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.join("PG_VERSION").exists());
    s.exec("SELECT backup_slot_renew('from_standby', '20 min')");
    assert_eq!(s.text("SELECT backup_slot_release('from_standby')::text"), "true");
    assert!(!s.slot_exists("from_standby"));
    // events on a standby: the server log and the per-node ring, shown by the view
    assert_eq!(
        s.text("SELECT string_agg(action, ',' ORDER BY at, id) FROM pgslotguard.events WHERE slot_name = 'from_standby'"),
        "lease,renew,release"
    );
    assert!(s.log().contains("pgslotguard: event lease on replication slot \"from_standby\""), "{}", s.log_tail(10));
    assert!(s.data.join("pg_slotguard/events").exists());
    // nothing of it reached the primary
    assert_eq!(p.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'from_standby'"), 0);
    assert_eq!(p.count("SELECT count(*) FROM pgslotguard.leases"), 0);
}

#[test]
fn a_dead_backup_on_a_standby_is_dropped_at_expiry_even_with_the_primary_down() {
    let (p, s) = primary_and_standby("sb-expire", &[], &[]);
    s.wait_for("the guard on the standby", WAIT, |s| s.worker_pid());
    // A backup that died: its slot is leased, nothing streams from it. It is dropped at
    // expiry, not before (how soon after is a figure for the bench, B3).
    let expires = s.text("SELECT expires_at::text FROM backup_slot_lease('dies', '2 s')");
    s.wait_for("the standby's guard to drop the expired slot", WAIT, |s| s.dropped("dies").then_some(()));
    let r = s.sql(&format!(
        "SELECT action, extract(epoch FROM at - '{expires}'::timestamptz)::float8 FROM pgslotguard.events
          WHERE slot_name = 'dies' ORDER BY at DESC, id DESC LIMIT 1"
    ));
    let (action, after) = (r[0].get::<_, String>(0), r[0].get::<_, f64>(1));
    eprintln!("dropped on the standby {after:.3} s after its expiry");
    assert_eq!(action, "expire_drop");
    assert!(after >= 0.0, "dropped {:.3} s before its expiry", -after);

    // The primary goes away: the standby leases, renews, releases and guards on its own.
    p.stop("fast");
    s.exec("SELECT * FROM backup_slot_lease('alone', '1h')");
    s.exec("SELECT backup_slot_renew('alone', '2h')");
    s.exec("SELECT backup_slot_release('alone')");
    assert!(!s.slot_exists("alone"));
    s.exec("SELECT * FROM backup_slot_lease('alone_short', '1 s')");
    s.wait_for("the guard to drop with the primary down", WAIT, |s| s.dropped("alone_short").then_some(()));
    assert_eq!(s.text("SELECT in_recovery::text FROM pgslotguard.status"), "true");
    assert!(!s.log().contains("ERROR:  pgslotguard") && !s.log().contains("enforcement pass failed"), "{}", s.log_tail(20));
}

#[test]
fn a_promoted_standby_keeps_its_leases_and_records_events_in_the_table_from_then_on() {
    let (p, s) = primary_and_standby("sb-promote", &[], &[]);
    s.wait_for("the guard on the standby", WAIT, |s| s.worker_pid());
    s.exec("SELECT * FROM backup_slot_lease('live', '1h', 'lives through promotion')");
    let before = s.count("SELECT count(*) FROM pgslotguard.event_log");
    p.stop("fast");
    let pid = s.worker_pid();
    s.exec("SELECT pg_promote()");
    s.wait_for("the promotion to end", WAIT, |s| (s.text("SELECT pg_is_in_recovery()::text") == "false").then_some(()));
    assert_eq!(s.worker_pid(), pid, "the guard carries on through promotion, without a restart");
    assert_eq!(s.text("SELECT holder FROM pgslotguard.leases WHERE slot_name = 'live'"), "lives through promotion");
    assert_eq!(s.text("SELECT in_recovery::text FROM pgslotguard.status"), "false");
    // the lease is enforced, and its drop is recorded in the table now
    s.exec("SELECT pgslotguard.test_set_lease_times('live', NULL, -1)");
    s.wait_for("the promoted server's guard to drop the expired lease", WAIT, |s| s.dropped("live").then_some(()));
    s.wait_for("the drop's event in the table", WAIT, |s| {
        (s.count("SELECT count(*) FROM pgslotguard.event_log WHERE slot_name = 'live' AND action = 'expire_drop'") == 1).then_some(())
    });
    assert!(s.count("SELECT count(*) FROM pgslotguard.event_log") > before);
    // the standby-time events are still shown, from the ring
    assert_eq!(s.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'live' AND action = 'lease'"), 1);
}

/// Write `mb` MB of WAL on `p` in 8 MB steps, a steady stream (about 40 MB/s here) rather
/// than one burst.
fn write_steadily(p: &Cluster, mb: i64) {
    for _ in 0..mb / 8 {
        p.exec("CREATE TABLE IF NOT EXISTS filler (x text); INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 8800)");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// On a standby the free-space floor has the standby's own pg_wal to protect. Measured
/// first without the guard, then with it, under the same steady stream from the primary.
#[test]
fn the_floor_keeps_a_standby_replaying_past_an_orphaned_lease() {
    let fs = Tmpfs::mount("sb-walfs", 160);
    let (p, s) = standby_on(&fs, "sb-floor", "pgslotguard.min_free_wal_space = '40%'\npgslotguard.enabled = off");
    s.exec("SELECT * FROM backup_slot_lease('orphan', '1h')");

    // Without the guard: the orphan pins the standby's pg_wal until its filesystem is full.
    write_steadily(&p, 200);
    let t0 = Instant::now();
    let outcome = loop {
        let log = s.log();
        if log.contains("No space left on device") {
            break "the standby ran out of space in pg_wal";
        }
        if t0.elapsed() > Duration::from_secs(60) {
            break "nothing happened in 60 s";
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (free, total) = fs.space();
    eprintln!("standby without the guard: {outcome}; {} of {} MB free", free >> 20, total >> 20);
    assert_eq!(outcome, "the standby ran out of space in pg_wal", "{}", s.log_tail(20));
    let down = s.try_sql("SELECT 1").is_err();
    eprintln!("standby server {}", if down { "down (PANIC)" } else { "up, replay stalled" });
    s.stop("immediate");
    drop(s);
    drop(p);
    drop(fs);

    // With the floor: the same load, the orphan dropped, replay goes on.
    let fs = Tmpfs::mount("sb-walfs2", 160);
    let (p, s) = standby_on(&fs, "sb-floor2", "pgslotguard.min_free_wal_space = '40%'");
    s.wait_for("the guard on the standby", WAIT, |s| s.worker_pid());
    s.exec("SELECT * FROM backup_slot_lease('orphan', '1h')");
    write_steadily(&p, 200);
    s.wait_for("the floor to drop the orphan on the standby", Duration::from_secs(60), |s| s.dropped("orphan").then_some(()));
    let ev = s.text("SELECT reason FROM pgslotguard.events WHERE slot_name = 'orphan' AND action = 'space_drop'");
    assert!(ev.contains("next restartpoint"), "{ev}");
    let target = p.text("SELECT pg_current_wal_lsn()::text");
    s.wait_for("the standby to replay everything the primary wrote", Duration::from_secs(60), |s| {
        (s.count(&format!("SELECT (pg_last_wal_replay_lsn() >= '{target}')::int::int8")) == 1).then_some(())
    });
    assert!(!s.log().contains("No space left on device"), "{}", s.log_tail(20));
    let (free, total) = fs.space();
    eprintln!("standby with the floor: replayed all, {} of {} MB free", free >> 20, total >> 20);
}

/// A standby removes WAL only at a restartpoint, and makes one only at a checkpoint record
/// replayed from the primary: the restartpoint the guard requests right after a drop is
/// skipped when none has come since the last. The guard asks again while it waits, so the
/// WAL goes as soon as the primary's next checkpoint is replayed, not at the standby's own
/// checkpoint_timeout (an hour here).
#[test]
fn on_a_standby_a_drop_frees_its_wal_at_the_primarys_next_checkpoint() {
    // The primary keeps what the standby has not received yet (the standby streams through
    // no slot); the standby, whose copy of the settings says the same, keeps nothing extra.
    let quiet = ["checkpoint_timeout = '1h'", "max_wal_size = '32MB'", "min_wal_size = '32MB'"];
    let primary: Vec<&str> = quiet.iter().copied().chain(["wal_keep_size = '512MB'"]).collect();
    let standby: Vec<&str> = quiet.iter().copied().chain(["wal_keep_size = 0"]).collect();
    let (p, s) = primary_and_standby("sb-restart", &primary, &standby);
    s.wait_for("the guard on the standby", WAIT, |s| s.worker_pid());
    s.exec("SELECT * FROM backup_slot_lease('pinning', '1h')");
    p.make_wal(160);
    p.exec("CHECKPOINT");
    let target = p.text("SELECT pg_current_wal_lsn()::text");
    s.wait_for("the standby to replay it all", Duration::from_secs(60), |s| {
        (s.count(&format!("SELECT (pg_last_wal_replay_lsn() >= '{target}')::int::int8")) == 1).then_some(())
    });
    s.exec("CHECKPOINT"); // the restartpoint at the checkpoint just replayed
    let before = s.pg_wal_bytes();
    assert!(before > 128 << 20, "the lease pins {before} bytes of the standby's pg_wal");

    // The lease ends: the guard drops the slot and requests a restartpoint, which is
    // skipped: no checkpoint record has come since the last restartpoint.
    s.exec("SELECT pgslotguard.test_set_lease_times('pinning', NULL, 0)");
    s.wait_for("the standby's guard to drop the slot", WAIT, |s| s.dropped("pinning").then_some(()));
    s.wait_passes(3);
    assert!(s.pg_wal_bytes() > before - (16 << 20), "pg_wal shrank with no checkpoint record from the primary");

    // The primary's next checkpoint, replayed: the restartpoint follows within a pass.
    let t0 = Instant::now();
    p.exec("CHECKPOINT");
    s.wait_for("the standby's pg_wal to shrink after the primary's checkpoint", WAIT, |s| {
        (s.pg_wal_bytes() < before / 2).then_some(())
    });
    // (WAIT, the poll's deadline, is far below the standby's checkpoint_timeout of an hour)
    eprintln!("standby pg_wal {before} → {} bytes {:?} after the primary's CHECKPOINT", s.pg_wal_bytes(), t0.elapsed());
    s.wait_for("the checkpoint event of the restartpoint", WAIT, |s| {
        (s.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'checkpoint'") == 1).then_some(())
    });
}

/// 17+: a slot synchronized from the primary (sync_replication_slots) is the primary's,
/// whatever the scope: never dropped on the standby.
#[cfg(any(feature = "pg17", feature = "pg18", feature = "pg19"))]
#[test]
fn a_slot_synchronized_from_the_primary_is_never_dropped_even_with_scope_all() {
    let p = with_extension("sb-sync", &[]);
    p.exec("SELECT pg_create_physical_replication_slot('sb_phys', true)");
    p.exec("SELECT pg_create_logical_replication_slot('lsub', 'test_decoding', false, false, true)");
    // Not -R: its primary_conninfo (in postgresql.auto.conf, which wins) has no dbname,
    // which slot synchronisation needs. standby.signal by hand, and a conninfo with one.
    let s = Cluster::from_base_backup(&p, "sb-sync-sb", false, None);
    std::fs::write(s.data.join("standby.signal"), "").unwrap();
    s.append_conf(&format!(
        "primary_slot_name = 'sb_phys'\nhot_standby_feedback = on\nsync_replication_slots = on\nprimary_conninfo = '{} application_name=sb'\npgslotguard.scope = 'all'\npgslotguard.max_slot_age = '1s'\npgslotguard.max_inactive_time = '1s'",
        p.conninfo("postgres")
    ));
    s.pg_ctl_start();
    s.wait_for("the slot to be synchronized to the standby", Duration::from_secs(60), |s| {
        s.try_sql("SELECT synced FROM pg_replication_slots WHERE slot_name = 'lsub'").ok().filter(|r| !r.is_empty() && r[0].get::<_, bool>(0)).map(|_| ())
    });
    s.wait_for("the guard on the standby", WAIT, |s| s.worker_pid());
    s.wait_passes(4);
    assert!(s.slot_exists("lsub"), "the guard dropped a synchronized slot\n{}", s.describe());
    assert_eq!(s.text("SELECT in_scope::text || ' ' || scope_reason FROM pgslotguard.slots WHERE slot_name = 'lsub'"), "false synchronized from the primary (synced)");
}
