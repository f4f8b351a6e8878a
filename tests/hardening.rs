//! Findings of the adversarial test run, each reproduced against a real cluster: no role
//! can stall the guard through a lock it may take, and a lease held open in a transaction costs only
//! its own slot one pass at a time.

mod common;
use common::*;
use postgres::Client;
use std::time::{Duration, Instant};

/// A session as `role`, with lock_timeout and statement_timeout (`SESSION_OPTIONS`): a lock
/// wait that regresses fails the test instead of hanging the suite.
fn connect_as(c: &Cluster, role: &str) -> Client {
    c.connect_as(role)
}

/// What a role could hold that the guard needs: a lock on the table it records events in
/// (a mode that blocks its INSERT), a row lock through the events view, or an open
/// transaction with a lease change in it. None stalls the guard: the locks are refused
/// (42501), and the open change is not waited for (`busy_skips` counts only a change in
/// the moment of its commit, and stays 0).
#[test]
fn no_role_can_stall_the_guard_through_a_lock_it_may_take() {
    let c = with_extension("stall", &[]);
    c.exec("CREATE ROLE nobody LOGIN; CREATE ROLE backup LOGIN REPLICATION;");
    let mut backup = connect_as(&c, "backup");
    backup.batch_execute("SELECT backup_slot_lease('a_victim', '2s')").unwrap();

    for role in ["nobody", "backup"] {
        let mut s = connect_as(&c, role);
        for q in [
            "LOCK TABLE pgslotguard.event_log IN SHARE MODE",
            "LOCK TABLE pgslotguard.event_log IN SHARE ROW EXCLUSIVE MODE",
            "LOCK TABLE pgslotguard.event_log IN EXCLUSIVE MODE",
            "LOCK TABLE pgslotguard.event_log IN ACCESS EXCLUSIVE MODE",
            "SELECT 1 FROM pgslotguard.event_log FOR KEY SHARE",
            "SELECT 1 FROM pgslotguard.events FOR UPDATE",
            "SELECT 1 FROM pgslotguard.leases FOR SHARE",
        ] {
            let err = s.batch_execute(&format!("BEGIN; {q}")).unwrap_err();
            assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("42501"), "{role}: {q}: {err:?}");
            s.batch_execute("ROLLBACK").unwrap();
        }
    }

    // The backup role keeps a lease call open in a transaction, and the rogue an idle one.
    let mut rogue = connect_as(&c, "nobody");
    rogue.batch_execute("BEGIN; SELECT 1").unwrap();
    let mut open = connect_as(&c, "backup");
    open.batch_execute("BEGIN; SELECT backup_slot_lease('z_other', '1s')").unwrap();

    // A drop commits its event just after its slot goes: wait for both.
    c.wait_for("both expired slots to be dropped and recorded while the sessions stay open", Duration::from_secs(15), |c| {
        (!c.slot_exists("a_victim")
            && !c.slot_exists("z_other")
            && c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'expire_drop'") == 2)
            .then_some(())
    });
    assert_eq!(c.count("SELECT busy_skips FROM pgslotguard.status"), 0);
    // The open lease call's commit comes too late: refused, nothing of it kept.
    let err = open.batch_execute("COMMIT").unwrap_err();
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("40001"), "{err:?}");
    assert!(!c.leased("z_other"), "{}", c.describe());
    drop(rogue);
}

/// A renewal left open in a transaction counts only once it commits: the guard, which never
/// waits for it, drops the expired slot meanwhile, another session is never made to wait
/// for it, and the late commit fails saying why (issue 25 item 2).
#[test]
fn a_renewal_held_open_in_a_transaction_neither_stalls_the_guard_nor_survives_the_drop() {
    let c = with_extension("held", &[]);
    c.exec("SELECT * FROM backup_slot_lease('held', '2s'); SELECT * FROM backup_slot_lease('other', '2s');");
    let mut owner = c.client();
    let mut tx = owner.transaction().unwrap();
    tx.batch_execute("SELECT backup_slot_renew('held', '1 hour')").unwrap();

    // A drop commits its event just after its slot goes: wait for both.
    c.wait_for("both expired slots to be dropped and recorded", WAIT, |c| {
        (!c.slot_exists("other")
            && !c.slot_exists("held")
            && c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'expire_drop'") == 2)
            .then_some(())
    });
    assert_eq!(c.count("SELECT busy_skips FROM pgslotguard.status"), 0);

    // Another session's call on the same name waits for nothing: the lease is gone.
    let t0 = Instant::now();
    let err = c.client().batch_execute("SELECT backup_slot_renew('held', '1 hour')").unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2), "waited {:?}", t0.elapsed());
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("42704"), "{err:?}");

    // The open renewal commits too late: refused as a serialization failure, with the
    // reason and a hint to retry.
    let err = tx.commit().unwrap_err();
    let db = err.as_db_error().expect("a server error at commit");
    assert_eq!(db.code().code(), "40001", "{db:?}");
    assert!(db.message().contains("the guard ended the lease or dropped its slot meanwhile"), "{db:?}");
    assert!(db.hint().is_some_and(|h| h.contains("retry")), "{db:?}");
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'held' AND action = 'renew'"), 0);
}

#[test]
fn a_non_superuser_lease_limit_only_tightens_the_global_one_even_later() {
    let c = with_extension("tighten", &[]);
    c.exec("CREATE ROLE backup LOGIN REPLICATION");
    let mut backup = connect_as(&c, "backup");
    // taken while no global limit is set: 1PB is a lowering of "no limit"
    backup.batch_execute("SELECT * FROM backup_slot_lease('exempt_try', '1h', max_retained => '1PB')").unwrap();
    // a superuser's own lease limit may exceed the global one
    c.exec("SELECT * FROM backup_slot_lease('dba_slot', '1h', max_retained => '1PB')");
    c.make_wal(4);
    // the DBA sets a global limit later: it binds the non-superuser's lease
    c.set_policy(&[("pgslotguard.max_retained_wal", "1MB")]);
    // (the event, not the slot's absence: a drop is visible before its record commits)
    c.wait_for("the non-superuser's slot to be dropped under the later global limit", WAIT, |c| {
        (c.text("SELECT action FROM pgslotguard.events WHERE slot_name = 'exempt_try' ORDER BY id DESC LIMIT 1") == "retained_drop")
            .then_some(())
    });
    assert!(!c.slot_exists("exempt_try"));
    c.wait_passes(2);
    assert!(c.slot_exists("dba_slot"), "a superuser's lease limit was overridden\n{}", c.describe());
    assert_eq!(c.text("SELECT max_retained FROM pgslotguard.leases WHERE slot_name = 'dba_slot'"), "1024 TB");

    // and now a non-superuser cannot ask for more than the global limit at all
    let err = backup.batch_execute("SELECT * FROM backup_slot_lease('raise', '1h', max_retained => '50GB')").unwrap_err();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "42501", "{db:?}");
    assert!(db.message().contains("above pgslotguard.max_retained_wal (1024 kB)"), "{db:?}");
    assert!(db.hint().is_some_and(|h| h.contains("Only a superuser")), "{db:?}");
    assert!(!c.slot_exists("raise"));
}

#[test]
fn a_logical_slot_that_took_a_leased_name_is_never_dropped_by_the_lease() {
    let c = with_extension("relog", &[]);
    c.exec("SELECT * FROM backup_slot_lease('relog', '3s')");
    c.wait_passes(1); // the pass the lease's commit woke has run
    // drop and re-create in one statement: no pass sees the name without a slot
    c.exec("SELECT pg_drop_replication_slot('relog'), pg_create_logical_replication_slot('relog', 'test_decoding')");
    c.wait_for("the lease to end", WAIT, |c| {
        (c.count("SELECT count(*) FROM pgslotguard.leases WHERE slot_name = 'relog'") == 0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(4)); // past the lease's expiry
    c.wait_passes(2);
    assert!(c.slot_exists("relog"), "the guard dropped a logical slot under a leased name\n{}", c.describe());
    let ev = c.text("SELECT action || ': ' || reason FROM pgslotguard.events WHERE slot_name = 'relog' ORDER BY id DESC LIMIT 1");
    // (while a logical slot is being created it is still temporary: either word may show)
    assert!(
        ev.starts_with("warn: the slot of this name is not the one the lease created")
            && (ev.contains("logical") || ev.contains("temporary")),
        "{ev}"
    );
}

#[test]
fn an_idle_guard_writes_no_wal_and_assigns_no_transaction_ids() {
    let c = with_extension(
        "idle",
        &["pgslotguard.naptime = '100ms'", "pgslotguard.max_retained_wal = '1GB'", "pgslotguard.min_free_wal_space = '1%'", "autovacuum = off"],
    );
    c.exec("CREATE EXTENSION pg_walinspect");
    c.exec("SELECT * FROM backup_slot_lease('idle_a', '1 hour'); SELECT pg_create_physical_replication_slot('other', true);");
    c.wait_passes(3);
    // Dead tuples the setup left (catalogs, the tracking's first rows) may be pruned by
    // whichever backend reads their page next (17+ logs that as Heap2/PRUNE_ON_ACCESS),
    // the test's own connections included: vacuum them first, so that only what the
    // passes write is measured.
    c.exec("VACUUM");
    c.wait_passes(2);
    let lsn0 = c.text("SELECT pg_current_wal_insert_lsn()::text");
    let xid0 = c.text("SELECT pg_snapshot_xmax(pg_current_snapshot())::text");
    let passes0 = c.count("SELECT passes FROM pgslotguard.status");
    c.wait_passes(30);
    let xid1 = c.text("SELECT pg_snapshot_xmax(pg_current_snapshot())::text");
    let lsn1 = c.text("SELECT pg_current_wal_insert_lsn()::text");
    let passes = c.count("SELECT passes FROM pgslotguard.status") - passes0;
    assert_eq!(xid1, xid0, "{passes} idle passes assigned transaction IDs");
    // Only the server's own background records (running-xacts snapshots) may appear.
    let written = if lsn1 == lsn0 {
        String::new()
    } else {
        c.text(&format!(
            "SELECT string_agg(resource_manager || '/' || record_type, ', ')
               FROM pg_get_wal_records_info('{lsn0}', '{lsn1}') WHERE resource_manager <> 'Standby'"
        ))
    };
    assert!(written.is_empty(), "{passes} idle passes wrote WAL: {written}");
}

#[test]
fn dry_run_reports_a_would_be_drop_once_per_crossing() {
    let c = with_extension("dryonce", &["pgslotguard.naptime = '100ms'", "pgslotguard.dry_run = on"]);
    c.exec("SELECT count(*) FROM generate_series(1, 5) i, backup_slot_lease('d' || i, '1 second')");
    c.wait_for("five would_drop events", WAIT, |c| {
        (c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'would_drop'") >= 5).then_some(())
    });
    c.wait_passes(20);
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'would_drop'"), 5, "{}", c.describe());
    let lines = c.log().matches("pgslotguard: would drop replication slot").count();
    assert_eq!(lines, 5, "{}", c.log_tail(20));
}

#[test]
fn dump_and_restore_keeps_events_but_no_leases_and_no_role_sees_another_clusters_events() {
    let a = with_extension("dumpsrc", &[]);
    a.exec("CREATE ROLE alice LOGIN REPLICATION; CREATE ROLE bob LOGIN REPLICATION;");
    connect_as(&a, "alice").batch_execute("SELECT * FROM backup_slot_lease('alice_slot', '1h')").unwrap();
    connect_as(&a, "bob").batch_execute("SELECT * FROM backup_slot_lease('bob_slot', '1h')").unwrap();
    connect_as(&a, "alice").batch_execute("SELECT backup_slot_renew('alice_slot', '2h')").unwrap();
    let dump = a.dir.join("postgres.dump");
    let dump_s = dump.to_string_lossy().to_string();
    a.run_tool("pg_dump", &["-h", "127.0.0.1", "-p", &a.port_s(), "-U", "postgres", "-Fc", "-f", &dump_s, "postgres"]);

    // Another cluster, whose roles get other OIDs than on the first.
    let b = Cluster::start("dumpdst", &[]);
    b.exec("CREATE ROLE filler; CREATE ROLE bob LOGIN REPLICATION; CREATE ROLE alice LOGIN REPLICATION;");
    let out = b.tool("pg_restore").args(["-h", "127.0.0.1", "-p", &b.port_s(), "-U", "postgres", "-d", "postgres", &dump_s]).output().unwrap();
    assert!(out.status.success(), "pg_restore failed: {}", String::from_utf8_lossy(&out.stderr));

    // leasing works at once: the event ids go on from the dumped sequence
    b.exec("SELECT * FROM backup_slot_lease('fresh', '1h')");
    assert_eq!(b.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name IN ('alice_slot', 'bob_slot') AND action IN ('lease', 'renew')"), 3);
    assert!(
        b.count("SELECT id FROM pgslotguard.events WHERE slot_name = 'fresh'")
            > b.count("SELECT max(id) FROM pgslotguard.events WHERE slot_name IN ('alice_slot', 'bob_slot') AND action IN ('lease', 'renew')")
    );
    // A role sees the events of its own leases by role OID, never by name: the restored
    // cluster's alice and bob are other roles than the source's (other OIDs), and see none
    // of them; a member of pg_monitor sees them all, with their owners' names.
    let seen = |role: &str| -> String {
        connect_as(&b, role)
            .query_one("SELECT string_agg(DISTINCT slot_name, ',') FROM pgslotguard.events", &[])
            .unwrap()
            .get::<_, Option<String>>(0)
            .unwrap_or_default()
    };
    assert_eq!(seen("alice"), "");
    assert_eq!(seen("bob"), "");
    b.exec("CREATE ROLE watcher LOGIN; GRANT pg_monitor TO watcher");
    assert_eq!(seen("watcher"), "alice_slot,bob_slot,fresh");
    // Leases are not in a dump, as slots are not: they belong to the server that has the
    // slots. The restored cluster has only its own, and no lease to end.
    b.wait_passes(2);
    assert_eq!(b.text("SELECT string_agg(slot_name::text, ',') FROM pgslotguard.leases"), "fresh");
    assert_eq!(b.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'warn'"), 0, "{}", b.describe());
    assert!(b.slot_exists("fresh"));
    assert_eq!(a.count("SELECT count(*) FROM pgslotguard.leases"), 2, "the source keeps its leases");
}

/// Issue 25, item 7: pgslotguard.exclude names slots the guard never touches, so a lease
/// on such a name would be a promise it does not keep: refused with a hint, nothing left.
#[test]
fn a_lease_on_an_excluded_name_is_refused_with_a_hint() {
    let c = with_extension("exclname", &["pgslotguard.exclude = '^standby'"]);
    let err = c.client().batch_execute("SELECT backup_slot_lease('standby_backup', '1h')").unwrap_err();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "22023", "{db:?}");
    assert!(db.message().contains("matches pgslotguard.exclude ('^standby')"), "{db:?}");
    assert!(db.hint().is_some_and(|h| h.contains("pgslotguard.exclude")), "{db:?}");
    assert!(!c.slot_exists("standby_backup"), "a refused lease left its slot behind");
    // adopting an existing slot under an excluded name: the same
    c.exec("SELECT pg_create_physical_replication_slot('standby_1', true)");
    assert_eq!(c.sqlstate("SELECT backup_slot_lease('standby_1', '1h', adopt => true)").as_deref(), Some("22023"));
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.leases"), 0);
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events"), 0);
    // a name it does not match is leased as ever
    c.exec("SELECT backup_slot_lease('nightly', '1h')");
    assert_eq!(c.text("SELECT state FROM pgslotguard.leases WHERE slot_name = 'nightly'"), "ok");
}

/// Issue 25, item 10: drops are not transactional, so backup_slot_enforce() in a
/// transaction that rolls back must not lose the record of the drops it made. The drop
/// intent notes the transaction that writes the event; rolled back (whole, or to a
/// savepoint), the guard's next pass records the drop; committed, it is recorded once.
#[test]
fn a_rolled_back_manual_enforcement_keeps_the_record_of_its_drops() {
    let c = with_extension("manualrb", &["pgslotguard.enabled = off"]);
    for slot in ["rb_whole", "rb_savepoint", "committed"] {
        c.exec(&format!("SELECT backup_slot_lease('{slot}', '1h')"));
        c.exec(&format!("SELECT pgslotguard.test_set_lease_times('{slot}', NULL, 0)"));
    }
    let drops = |c: &Cluster, slot: &str| c.count(&format!("SELECT count(*) FROM pgslotguard.events WHERE slot_name = '{slot}' AND action = 'expire_drop'"));
    let mut s = c.client();
    s.batch_execute("BEGIN").unwrap();
    let rows = s.query("SELECT slot_name, action FROM backup_slot_enforce() ORDER BY slot_name", &[]).unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    // While the transaction is open, the drops are its own: the guard leaves them be.
    c.set_policy(&[("pgslotguard.enabled", "on")]);
    c.wait_passes(2);
    assert_eq!(drops(&c, "rb_whole"), 0, "{}", c.describe());
    assert!(!c.log().contains("dropped outside pgslotguard"), "{}", c.log_tail(20));
    s.batch_execute("ROLLBACK").unwrap();
    assert!(!c.slot_exists("rb_whole"), "a drop is not undone by a rollback");

    c.wait_for("the guard to record the rolled-back drops", WAIT, |c| (drops(c, "rb_whole") == 1).then_some(()));
    let reason = c.text("SELECT reason FROM pgslotguard.events WHERE slot_name = 'rb_whole' AND action = 'expire_drop'");
    assert!(reason.contains("backup_slot_enforce() call that dropped the slot rolled back"), "{reason}");
    assert_eq!(c.text("SELECT actor FROM pgslotguard.events WHERE slot_name = 'rb_whole' AND action = 'expire_drop'"), "worker");
    for slot in ["rb_savepoint", "committed"] {
        assert_eq!(drops(&c, slot), 1, "{slot}");
    }
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.leases"), 0, "{}", c.describe());

    // Rolled back to a savepoint, in a transaction that commits: recorded by the guard.
    let idle = |c: &Cluster, times: usize| {
        c.set_policy(&[("pgslotguard.enabled", "off")]);
        c.wait_for("the guard to idle", WAIT, |c| (c.log().matches("pgslotguard.enabled is off").count() >= times).then_some(()));
    };
    idle(&c, 2);
    c.exec("SELECT backup_slot_lease('sp', '1h')");
    c.exec("SELECT pgslotguard.test_set_lease_times('sp', NULL, 0)");
    s.batch_execute("BEGIN; SAVEPOINT a; SELECT * FROM backup_slot_enforce(); ROLLBACK TO SAVEPOINT a; COMMIT;").unwrap();
    assert!(!c.slot_exists("sp"));
    assert_eq!(drops(&c, "sp"), 0, "rolled back to the savepoint");
    c.set_policy(&[("pgslotguard.enabled", "on")]);
    c.wait_for("the guard to record the drop rolled back to a savepoint", WAIT, |c| (drops(c, "sp") == 1).then_some(()));

    // A drop in a transaction that commits: recorded once, by the caller.
    idle(&c, 3);
    c.exec("SELECT backup_slot_lease('once', '1h')");
    c.exec("SELECT pgslotguard.test_set_lease_times('once', NULL, 0)");
    s.batch_execute("BEGIN; SELECT * FROM backup_slot_enforce(); COMMIT;").unwrap();
    assert_eq!(drops(&c, "once"), 1);
    let actor = c.text("SELECT actor FROM pgslotguard.events WHERE slot_name = 'once' AND action = 'expire_drop'");
    assert_eq!(actor, "postgres");
    c.set_policy(&[("pgslotguard.enabled", "on")]);
    c.wait_passes(3);
    assert_eq!(drops(&c, "once"), 1, "recorded twice\n{}", c.describe());
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.tracking WHERE slot_name = 'once'"), 0);
}

/// Issue 25, item 8: 300 leases taken in one statement make the guard's first pass long
/// (300 tracking records written); the wall clock and the monotonic one must be read
/// together, or the pass after looks like the clock was set forward.
#[test]
fn many_leases_at_once_make_no_false_clock_jump() {
    let c = with_extension("manyleases", &["pgslotguard.naptime = '10s'", "max_replication_slots = 320"]);
    c.exec("SELECT count(*) FROM generate_series(1, 300) i, backup_slot_lease('many_' || i, '3s')");
    c.wait_for("the 300 expired leases to be dropped", WAIT, |c| {
        (c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'many_%'") == 0).then_some(())
    });
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'expire_drop'"), 300);
    let log = c.log();
    assert!(!log.contains("system clock was set forward") && !log.contains("the system clock moved"), "{}", c.log_tail(30));
}

/// Issue 25, item 6: a floor the filesystem of pg_wal cannot meet (larger than it) is
/// said once, loudly, and acted on never: no fresh lease is dropped for it.
#[test]
fn a_floor_larger_than_the_filesystem_is_reported_once_and_drops_nothing() {
    let c = with_extension("hugefloor", &["pgslotguard.naptime = '200ms'"]);
    c.exec("SELECT backup_slot_lease('fresh', '1h')");
    c.set_policy(&[("pgslotguard.min_free_wal_space", "1000000TB")]);
    c.wait_for("the warning that the floor cannot be met", WAIT, |c| {
        (c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'warn' AND reason LIKE '%can never be met%'") == 1).then_some(())
    });
    c.wait_passes(10);
    assert!(c.slot_exists("fresh"), "a fresh lease was dropped for a floor no filesystem here can meet\n{}", c.describe());
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'warn'"), 1, "said more than once\n{}", c.describe());
    let reason = c.text("SELECT reason FROM pgslotguard.events WHERE action = 'warn'");
    assert!(reason.starts_with("pgslotguard.min_free_wal_space (") && !reason.contains('%'), "{reason}");
    assert_eq!(c.log().matches("the floor can never be met").count(), 1, "{}", c.log_tail(20));
    assert_eq!(c.text("SELECT state FROM pgslotguard.leases WHERE slot_name = 'fresh'"), "ok");
}
