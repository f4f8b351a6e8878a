//! Reliability: 8 clients leasing, renewing and releasing overlapping names for 60 s under
//! a worker at naptime 100 ms; the worker killed (SIGKILL) mid-run; the extension dropped and
//! re-created under a running worker; a slot dropped behind the worker's back.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn eight_clients_for_60s_under_a_fast_worker_lose_nothing() {
    let c = with_extension("stress", &["pgslotguard.naptime = '100ms'", "max_replication_slots = 40", "max_connections = 40"]);
    c.exec(
        r#"CREATE TABLE stress_log (op int, code text);
           CREATE FUNCTION stress_op(op int, n int) RETURNS void LANGUAGE plpgsql AS $$
           BEGIN
             IF op = 1 THEN PERFORM backup_slot_lease('s_' || n, '300 ms', 'stress');
             ELSIF op = 2 THEN PERFORM backup_slot_renew('s_' || n, '300 ms');
             ELSE PERFORM backup_slot_release('s_' || n);
             END IF;
             INSERT INTO stress_log VALUES (op, 'ok');
           EXCEPTION WHEN OTHERS THEN
             INSERT INTO stress_log VALUES (op, SQLSTATE);
           END $$;"#,
    );
    let script = c.dir.join("stress.sql");
    std::fs::write(&script, "\\set n random(1, 12)\n\\set op random(1, 3)\nSELECT stress_op(:op, :n);\n").unwrap();
    let secs = std::env::var("PGSG_STRESS_SECONDS").unwrap_or_else(|_| "60".into());
    let out = c
        .tool("pgbench")
        .args(["-h", "127.0.0.1", "-p", &c.port_s(), "-U", "postgres", "-n", "-c", "8", "-j", "2", "-T", &secs, "-f"])
        .arg(&script)
        .arg("postgres")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench: {}\n{}", stdout, String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("number of failed transactions: 0"), "{stdout}");

    // every outcome is ok or an expected refusal
    let unexpected = c.text(
        "SELECT string_agg(op || ':' || code || ' x' || n, ', ') FROM
           (SELECT op, code, count(*) n FROM stress_log WHERE code NOT IN ('ok', '42710', '42704') GROUP BY 1, 2) x",
    );
    let ops = c.count("SELECT count(*) FROM stress_log");
    let ok = c.count("SELECT count(*) FROM stress_log WHERE code = 'ok'");
    eprintln!("stress: {ops} operations, {ok} succeeded, unexpected: [{unexpected}]");
    assert!(unexpected.is_empty(), "unexpected errors: {unexpected}\n{}", c.describe());
    assert!(ops > 1000 && ok > 100, "too little load: {ops} ops, {ok} ok");

    // let every 300 ms lease expire and be enforced, then: nothing leaked either way
    c.wait_for("every stress lease to end", WAIT, |c| {
        (c.count("SELECT count(*) FROM pgslotguard.lease_data") == 0
            && c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 's\\_%'") == 0)
            .then_some(())
    });
    // every lease taken ended exactly once: by release, by the guard, never twice
    let leased = c.count("SELECT count(*) FROM pgslotguard.event_log WHERE action = 'lease'");
    let ended = c.count("SELECT count(*) FROM pgslotguard.event_log WHERE action IN ('release', 'expire_drop')");
    assert_eq!(leased, ended, "leases taken vs ended\n{}", c.describe());
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.event_log WHERE action = 'error'"), 0, "{}", c.describe());
    let log = c.log();
    for bad in ["PANIC", "FATAL", "could not act on", "enforcement pass failed", "server process"] {
        let hits: Vec<&str> = log.lines().filter(|l| l.contains(bad)).take(5).collect();
        assert!(hits.is_empty(), "server log has {bad}:\n{}", hits.join("\n"));
    }
    eprintln!("stress: {leased} leases taken, {ended} ended (release or expire_drop), 0 errors");
}

#[test]
fn worker_killed_with_sigkill_comes_back_and_nothing_is_lost() {
    let c = with_extension("sigkill", &[]);
    c.exec("SELECT * FROM backup_slot_lease('survivor', '1h')");
    c.exec("SELECT * FROM backup_slot_lease('doomed', '3 s')");
    let pid = c.wait_for("the guard worker", WAIT, |c| c.worker_pid());
    let st = std::process::Command::new("kill").arg("-KILL").arg(pid.to_string()).status().unwrap();
    assert!(st.success());
    // the postmaster resets the cluster (crash recovery) and starts the guard again
    let new_pid = c.wait_for("a new guard worker after SIGKILL", WAIT, |c| c.worker_pid().filter(|p| *p != pid));
    // status names the new worker, not the PID of the one that is gone
    assert_eq!(c.sql("SELECT pid FROM pgslotguard.status")[0].get::<_, Option<i32>>(0), Some(new_pid));
    assert_eq!(c.text("SELECT running::text FROM pgslotguard.status"), "true");
    assert!(c.slot_exists("survivor"));
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.leases WHERE slot_name = 'survivor'"), 1);
    c.wait_for("the expired lease to be enforced after the crash", WAIT, |c| (!c.slot_exists("doomed")).then_some(()));
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'expire_drop'"), 1);
}

#[test]
fn extension_dropped_and_recreated_under_a_running_worker() {
    let c = with_extension("recreate", &[]);
    let pid = c.wait_for("the guard worker", WAIT, |c| c.worker_pid());
    c.wait_passes(1);
    c.exec("DROP EXTENSION pgslotguard");
    c.wait_for("the worker to notice the extension is gone", WAIT, |c| {
        c.log().contains("is not installed in database \"postgres\"").then_some(())
    });
    c.exec("CREATE EXTENSION pgslotguard");
    c.exec("SELECT * FROM backup_slot_lease('again', '1 s')");
    c.wait_for("enforcement by the same worker after re-creation", WAIT, |c| (!c.slot_exists("again")).then_some(()));
    assert_eq!(c.worker_pid(), Some(pid), "the worker restarted");
    assert!(!c.log().contains("enforcement pass failed"), "{}", c.log_tail(20));
}

#[test]
fn slot_dropped_behind_the_workers_back_ends_its_lease() {
    let c = with_extension("behindback", &[]);
    c.exec("SELECT * FROM backup_slot_lease('vanishing', '1h')");
    c.exec("SELECT pg_drop_replication_slot('vanishing')");
    c.wait_for("the guard to end the lease of a vanished slot", WAIT, |c| {
        (c.count("SELECT count(*) FROM pgslotguard.leases") == 0).then_some(())
    });
    let ev = c.text("SELECT action || ': ' || reason FROM pgslotguard.events WHERE slot_name = 'vanishing' ORDER BY id DESC LIMIT 1");
    assert!(ev.starts_with("warn: slot no longer exists"), "{ev}");
}

#[test]
fn missing_guard_database_keeps_the_server_up_and_the_worker_comes_back() {
    let c = Cluster::start("nodb", &["pgslotguard.database = 'guard_db'"]);
    c.wait_for("the worker to report the missing database", WAIT, |c| {
        c.log().contains("database \"guard_db\" named by pgslotguard.database does not exist").then_some(())
    });
    // the server stays up and the worker waits quietly: no FATAL every restart
    std::thread::sleep(Duration::from_secs(6)); // longer than bgw_restart_time (5 s)
    assert_eq!(c.text("SELECT 'up'"), "up");
    let fatals = c.log().matches("FATAL:  database \"guard_db\" does not exist").count();
    assert!(fatals <= 1, "the worker is crash-looping ({fatals} FATALs):\n{}", c.log_tail(20));
    c.exec("CREATE DATABASE guard_db");
    let mut g = c.client_db("guard_db");
    g.batch_execute("CREATE EXTENSION pgslotguard; SELECT * FROM backup_slot_lease('late_db', '1 s')").unwrap();
    c.wait_for("the guard to enforce in the database once it exists", WAIT, |c| (!c.slot_exists("late_db")).then_some(()));
}

#[test]
fn a_guard_killed_mid_pass_loses_no_record_of_a_drop() {
    let c = with_extension("killmid", &["pgslotguard.naptime = '1h'", "max_replication_slots = 400"]);
    let n = 300;
    c.exec(&format!("SELECT count(*) FROM generate_series(1, {n}) i, backup_slot_lease('k_' || i, '2s')"));
    // The guard wakes at the leases' common expiry; watch for its first drop.
    let pid = c.wait_for("the guard worker", WAIT, |c| c.worker_pid());
    let mut watch = c.client();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left: i64 = watch.query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'k\\_%'", &[]).unwrap().get(0);
        if left < n {
            let st = std::process::Command::new("kill").arg("-KILL").arg(pid.to_string()).status().unwrap();
            assert!(st.success());
            eprintln!("killed the guard mid-pass with {left} of {n} slots left");
            assert!(left > 0, "the pass ended before the kill: the test proves nothing");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the pass never started");
    }
    drop(watch);
    // crash recovery (connections fail meanwhile), a new guard, and its first pass
    // finishes the job
    c.wait_for("every expired slot to be dropped after the crash", WAIT, |c| {
        let left = c.try_sql(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'k\\_%')
                  + (SELECT count(*) FROM pgslotguard.lease_data)",
        );
        left.ok().and_then(|r| r.first().map(|r| r.get::<_, i64>(0))).filter(|n| *n == 0).map(|_| ())
    });
    let outside = c.count("SELECT count(*) FROM pgslotguard.events WHERE reason LIKE '%dropped outside pgslotguard%'");
    let drops = c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'expire_drop' AND slot_name LIKE 'k\\_%'");
    assert_eq!(outside, 0, "drops the killed guard made lost their record\n{}", c.describe());
    assert_eq!(drops, n, "{}", c.describe());
}
