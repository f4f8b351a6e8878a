//! The transaction-horizon limit (pgslotguard.max_xmin_age) against real clusters: a
//! stopped hot_standby_feedback standby's slot, an idle logical slot, a slot out of scope,
//! a dry run, an active slot, and (17+) a slot named in synchronized_standby_slots.
//! Transaction IDs are burned with pgbench running `SELECT txid_current()`.

mod common;
use common::*;

/// (removed, dead but not yet removable) from the report of `VACUUM (VERBOSE)`:
/// "tuples: R removed, M remain, D are dead but not yet removable".
fn tuples(report: &str) -> (i64, i64) {
    let line = report
        .lines()
        .find(|l| l.trim_start().starts_with("tuples: "))
        .unwrap_or_else(|| panic!("no tuples line in the VACUUM report:\n{report}"));
    let n: Vec<i64> = line.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    (n[0], n[2])
}

/// The age a drop's reason gives: "... N transactions back ...".
fn age_in(reason: &str) -> i64 {
    let before = reason.split(" transactions back").next().unwrap_or_default();
    before.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no age in {reason:?}"))
}

fn event(c: &Cluster, slot: &str, action: &str) -> Option<String> {
    c.sql(&format!("SELECT reason FROM pgslotguard.events WHERE slot_name = '{slot}' AND action = '{action}' ORDER BY id LIMIT 1"))
        .first()
        .map(|r| r.get::<_, String>(0))
}

fn horizon_age(c: &Cluster, slot: &str) -> i64 {
    c.count(&format!(
        "SELECT COALESCE(greatest(xmin_age, catalog_xmin_age), -1) FROM pgslotguard.slots WHERE slot_name = '{slot}'"
    ))
}

#[test]
fn a_stopped_hot_standbys_slot_is_dropped_at_the_xmin_limit_and_vacuum_then_removes_the_dead_rows() {
    let p = with_extension("xmin_phys", &["pgslotguard.scope = 'physical'"]);
    p.exec("SELECT pg_create_physical_replication_slot('standby1', true)");
    let s = p.standby("xmin_sb", "standby1", &[]);
    p.wait_for("the standby's feedback xmin on its slot", WAIT, |c| {
        (c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'standby1' AND active AND xmin IS NOT NULL") == 1)
            .then_some(())
    });
    // The standby goes away; its slot keeps the xmin it last sent.
    s.stop("immediate");
    p.wait_for("the standby's slot to go inactive", WAIT, |c| {
        (c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'standby1' AND NOT active AND xmin IS NOT NULL") == 1)
            .then_some(())
    });
    // Rows inserted and deleted after that xmin: dead, and not removable while it is held.
    p.exec("CREATE TABLE dead (x int) WITH (autovacuum_enabled = off); INSERT INTO dead SELECT generate_series(1, 1000)");
    p.exec("DELETE FROM dead");
    let before = p.vacuum_verbose("dead");
    assert_eq!(tuples(&before), (0, 1000), "VACUUM before the drop:\n{before}");
    // The views name the slot and its age.
    assert!(horizon_age(&p, "standby1") > 0, "{}", p.describe());
    assert_eq!(p.count("SELECT count(*) FROM pgslotguard.slots WHERE slot_name = 'standby1' AND catalog_xmin_age IS NULL"), 1);
    assert_eq!(p.text("SELECT oldest_xmin_slot FROM pgslotguard.status"), "standby1");
    assert_eq!(p.count("SELECT oldest_xmin_age FROM pgslotguard.status"), horizon_age(&p, "standby1"));

    // The limit, then transactions: the guard drops the slot once its xmin is older.
    // At naptime 1 h, only the worker's probes of the next transaction ID can find the
    // crossing: 5000 transactions a second, so a probe every 200 ms at most is 1000.
    let limit = 5_000;
    p.set_policy(&[("pgslotguard.max_xmin_age", &limit.to_string()), ("pgslotguard.naptime", "1h")]);
    let _burn = p.burn_xids(2, Some(5_000));
    p.wait_for("the guard to drop the standby's slot at the xmin limit", WAIT, |c| c.dropped("standby1").then_some(()));
    let reason = p.wait_for("the xmin_drop event", WAIT, |c| event(c, "standby1", "xmin_drop"));
    assert!(reason.contains(&format!("above pgslotguard.max_xmin_age ({limit})")), "{reason}");
    let age = age_in(&reason);
    println!("dropped at age {age}: {} transactions past a limit of {limit}", age - limit);
    assert!(age > limit && age <= limit + 1_000, "{reason}");
    assert!(p.log().contains("pgslotguard: dropped replication slot \"standby1\": holds the transaction horizon"), "{}", p.log_tail(20));

    // Now VACUUM removes them.
    let after = p.vacuum_verbose("dead");
    assert_eq!(tuples(&after), (1000, 0), "VACUUM after the drop:\n{after}");
}

#[test]
fn an_idle_logical_slot_holding_catalog_xmin_is_dropped_at_the_limit_under_scope_all() {
    let c = with_extension("xmin_logical", &["pgslotguard.scope = 'all'", "pgslotguard.max_xmin_age = 3000"]);
    c.exec("SELECT pg_create_logical_replication_slot('idle_sub', 'test_decoding')");
    c.wait_passes(1);
    assert_eq!(
        c.count("SELECT count(*) FROM pgslotguard.slots WHERE slot_name = 'idle_sub' AND xmin_age IS NULL AND catalog_xmin_age >= 0 AND max_xmin_age = 3000"),
        1,
        "{}",
        c.describe()
    );
    let _burn = c.burn_xids(2, None);
    c.wait_for("the guard to drop the logical slot at the xmin limit", WAIT, |c| c.dropped("idle_sub").then_some(()));
    let reason = c.wait_for("the xmin_drop event", WAIT, |c| event(c, "idle_sub", "xmin_drop"));
    assert!(age_in(&reason) > 3000, "{reason}");
}

#[test]
fn an_out_of_scope_slot_over_the_xmin_limit_is_named_and_left_alone() {
    let c = with_extension("xmin_scope", &["pgslotguard.max_xmin_age = 2000"]);
    // bounds: -1 or 1000 .. 2 000 000 000
    for bad in ["500", "0", "-2", "2000000001"] {
        assert!(c.sqlstate(&format!("ALTER SYSTEM SET pgslotguard.max_xmin_age = {bad}")).is_some(), "{bad} was accepted");
    }
    c.exec("SELECT pg_create_logical_replication_slot('other_tool', 'test_decoding')");
    let burn = c.burn_xids(2, None);
    c.wait_for("the slot's horizon to pass the limit", WAIT, |c| (horizon_age(c, "other_tool") > 2000).then_some(()));
    drop(burn);
    c.wait_passes(3);
    assert!(c.slot_exists("other_tool"), "{}", c.describe());
    assert_eq!(c.text("SELECT state FROM pgslotguard.slots WHERE slot_name = 'other_tool'"), "out_of_scope");
    assert_eq!(c.text("SELECT oldest_xmin_slot FROM pgslotguard.status"), "other_tool");
    assert!(c.count("SELECT oldest_xmin_age FROM pgslotguard.status") > 2000);
    assert_eq!(c.text("SELECT next_action FROM pgslotguard.slots WHERE slot_name = 'other_tool'"), "wait");
    // named once, loudly: a warning, and nothing else
    let reason = c.wait_for("the warning that names the slot", WAIT, |c| event(c, "other_tool", "warn"));
    assert!(reason.ends_with("not dropped: not leased (scope = leased)"), "{reason}");
    assert!(c.log().contains("WARNING:  pgslotguard: replication slot \"other_tool\": holds the transaction horizon"), "{}", c.log_tail(10));
    assert_eq!(c.text("SELECT string_agg(action, ',') FROM pgslotguard.events"), "warn", "{}", c.describe());
}

#[test]
fn a_dry_run_records_would_drop_for_the_xmin_limit_and_drops_nothing() {
    let c = with_extension("xmin_dry", &["pgslotguard.scope = 'all'", "pgslotguard.max_xmin_age = 2000", "pgslotguard.dry_run = on"]);
    c.exec("SELECT pg_create_logical_replication_slot('dry_sub', 'test_decoding')");
    let burn = c.burn_xids(2, None);
    let reason = c.wait_for("a would_drop event", WAIT, |c| event(c, "dry_sub", "would_drop"));
    drop(burn);
    assert!(reason.starts_with("xmin_drop: holds the transaction horizon"), "{reason}");
    c.wait_passes(2);
    assert!(c.slot_exists("dry_sub"));
    assert_eq!(c.text("SELECT next_action FROM pgslotguard.slots WHERE slot_name = 'dry_sub'"), "would_drop");
    assert_eq!(c.text("SELECT state FROM pgslotguard.slots WHERE slot_name = 'dry_sub'"), "over_xmin");
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'would_drop'"), 1, "once per crossing\n{}", c.describe());
}

#[test]
fn an_active_slot_over_the_xmin_limit_is_terminated_only_with_terminate_active() {
    // wal_sender_timeout off: the walsender of a stopped client stays, however long the
    // machine takes to get through the test.
    let c = with_extension("xmin_active", &["pgslotguard.scope = 'all'", "pgslotguard.max_xmin_age = 2000", "wal_sender_timeout = 0"]);
    c.exec("SELECT pg_create_logical_replication_slot('busy', 'test_decoding')");
    let mut recv = Proc(
        c.tool("pg_recvlogical")
            .args(["-h", "127.0.0.1", "-p", &c.port_s(), "-U", "postgres", "-d", "postgres", "-S", "busy", "-s", "1", "--start", "-f", "/dev/null"])
            .spawn()
            .unwrap(),
    );
    c.wait_for("pg_recvlogical to stream from the slot", WAIT, |c| {
        (c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'busy' AND active") == 1).then_some(())
    });
    // A consumer that stops confirming: pg_recvlogical itself (not the sudo that started
    // it) stopped, and seen stopped; its walsender stays, the slot's catalog_xmin stops.
    let pid = recv.program_pid();
    stop_process(pid);
    let burn = c.burn_xids(2, None);
    let reason = c.wait_for("a warning about the active slot", WAIT, |c| event(c, "busy", "warn"));
    drop(burn);
    assert!(reason.contains("not dropped: terminate_active is off"), "{reason}");
    c.wait_passes(2);
    assert!(c.slot_exists("busy"));
    assert_eq!(c.text("SELECT active::text FROM pg_replication_slots WHERE slot_name = 'busy'"), "true", "{}", c.describe());
    assert_eq!(c.text("SELECT next_action FROM pgslotguard.slots WHERE slot_name = 'busy'"), "wait");
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'busy' AND action = 'terminate'"), 0);
    assert_eq!(process_state(pid), Some('T'), "pg_recvlogical (PID {pid}) is no longer stopped");

    c.set_policy(&[("pgslotguard.terminate_active", "on")]);
    c.wait_for("the guard to terminate the walsender and drop the slot", WAIT, |c| c.dropped("busy").then_some(()));
    let actions = c.text("SELECT string_agg(action, ',' ORDER BY id) FROM pgslotguard.events WHERE slot_name = 'busy'");
    assert!(actions.ends_with("terminate,xmin_drop"), "{actions}\n{}", c.describe());
    signal(pid, "CONT");
    recv.stop();
}

#[cfg(any(feature = "pg17", feature = "pg18", feature = "pg19"))]
#[test]
fn a_slot_named_in_synchronized_standby_slots_is_warned_about_and_never_dropped() {
    let c = with_extension("xmin_syncsb", &[]);
    c.exec("SELECT * FROM backup_slot_lease('sb_slot', '3 seconds')");
    c.set_policy(&[("synchronized_standby_slots", "sb_slot")]);
    let reason = c.wait_for("a warning naming synchronized_standby_slots", WAIT, |c| event(c, "sb_slot", "warn"));
    assert!(reason.starts_with("lease expired") && reason.contains("not dropped: named in synchronized_standby_slots"), "{reason}");
    c.wait_passes(3);
    assert!(c.slot_exists("sb_slot"), "{}", c.describe());
    assert_eq!(c.text("SELECT next_action FROM pgslotguard.slots WHERE slot_name = 'sb_slot'"), "wait");
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'sb_slot' AND action = 'warn'"), 1, "once\n{}", c.describe());
    // What the README tells the DBA: take it out of the list, and the guard drops it.
    c.exec("ALTER SYSTEM RESET synchronized_standby_slots");
    c.reload();
    c.wait_for("the slot to be dropped once no longer named", WAIT, |c| c.dropped("sb_slot").then_some(()));
    assert!(event(&c, "sb_slot", "expire_drop").is_some(), "{}", c.describe());
}
