//! The lease API where it needs a cluster of its own: top-level ROLLBACK, a lease failing
//! half-way (max_replication_slots exhausted), adopting logical and active slots, two
//! sessions racing for one name, and the refusal when the library is not preloaded.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn release_rolled_back_keeps_slot_and_lease_and_a_committed_one_drops_the_slot() {
    let c = with_extension("relrollback", &[]);
    c.exec("SELECT * FROM backup_slot_lease('rb1', '1h')");
    let mut cl = c.client();
    let mut tx = cl.transaction().unwrap();
    tx.batch_execute("SELECT backup_slot_release('rb1')").unwrap();
    tx.rollback().unwrap();
    assert!(c.slot_exists("rb1"), "a rolled-back release dropped the slot\n{}", c.describe());
    assert_eq!(c.text("SELECT state FROM pgslotguard.leases WHERE slot_name = 'rb1'"), "ok");
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'release'"), 0);

    // in a savepoint that rolls back, likewise; then a release that commits drops it
    let mut tx = cl.transaction().unwrap();
    tx.batch_execute("SAVEPOINT s; SELECT backup_slot_release('rb1'); ROLLBACK TO SAVEPOINT s;").unwrap();
    tx.commit().unwrap();
    assert!(c.slot_exists("rb1"), "a release rolled back to a savepoint dropped the slot");
    c.exec("SELECT backup_slot_release('rb1')");
    assert!(!c.slot_exists("rb1"));
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.leases"), 0);
    assert_eq!(c.text("SELECT action FROM pgslotguard.events ORDER BY id DESC LIMIT 1"), "release");

    // lease and release in one transaction: nothing left
    c.exec("BEGIN; SELECT * FROM backup_slot_lease('rb2', '1h'); SELECT backup_slot_release('rb2'); COMMIT;");
    assert!(!c.slot_exists("rb2"));
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.leases"), 0);
}

#[test]
fn lease_rolled_back_leaves_no_slot() {
    let c = with_extension("rollback", &[]);
    let mut cl = c.client();
    let mut tx = cl.transaction().unwrap();
    tx.batch_execute("SELECT * FROM backup_slot_lease('t', '1h')").unwrap();
    assert!(c.slot_exists("t"), "the slot exists inside the transaction");
    tx.rollback().unwrap();
    assert!(!c.slot_exists("t"), "ROLLBACK left the slot behind\n{}", c.describe());
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.leases"), 0);
    assert!(c.log().contains("dropped replication slot \"t\": the lease that created it was rolled back"));
    assert!(!c.data.join("pg_slotguard/slots/t").exists(), "a rolled-back lease left a store file");

    // a session that dies mid-transaction rolls back too
    let mut cl2 = c.client();
    cl2.batch_execute("BEGIN; SELECT * FROM backup_slot_lease('t2', '1h');").unwrap();
    assert!(c.slot_exists("t2"));
    drop(cl2);
    c.wait_for("the slot of a disconnected session's lease to go", Duration::from_secs(20), |c| {
        (!c.slot_exists("t2")).then_some(())
    });
}

#[test]
fn lease_failing_half_way_leaves_nothing() {
    let c = with_extension("exhaust", &["max_replication_slots = 2"]);
    c.exec("SELECT * FROM backup_slot_lease('a', '1h'); SELECT * FROM backup_slot_lease('b', '1h')");
    let events = c.count("SELECT count(*) FROM pgslotguard.event_log");
    let code = c.sqlstate("SELECT * FROM backup_slot_lease('c', '1h')");
    assert_eq!(code.as_deref(), Some("53400"), "{}", c.describe());
    assert!(!c.slot_exists("c"));
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.leases"), 2);
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.event_log"), events);

    // the insert of the lease fails after the slot was made: the slot must go too
    c.exec("SELECT backup_slot_release('b')");
    c.exec("ALTER TABLE pgslotguard.event_log ADD CONSTRAINT sabotage CHECK (slot_name <> 'late_fail')");
    // The call pauses with its slot made persistent for longer than a naptime, so that the
    // guard's passes see (and track) the slot before the call fails.
    let passes = c.count("SELECT passes FROM pgslotguard.status");
    let code = c.sqlstate("SET pgslotguard.test_pause_at = 'lease_persisted:2500'; SELECT * FROM backup_slot_lease('late_fail', '1h')");
    assert_eq!(code.as_deref(), Some("23514"));
    assert!(c.count("SELECT passes FROM pgslotguard.status") > passes, "no guard pass ran while the call held its slot");
    assert!(!c.slot_exists("late_fail"), "a lease that failed after creating its slot left it\n{}", c.describe());
    assert!(!c.data.join("pg_slotguard/slots/late_fail").exists(), "a lease that failed left its store file");
}

#[test]
fn adopt_refuses_temporary_slots_and_takes_active_ones() {
    let c = with_extension("adopt", &[]);
    // A temporary slot ends with its session: no lease is taken on it (a logical slot is
    // adopted as one: tests/logical.rs).
    let mut tmp = c.client();
    tmp.batch_execute("SELECT pg_create_physical_replication_slot('tmp1', true, true)").unwrap();
    assert_eq!(c.sqlstate("SELECT backup_slot_lease('tmp1', '1h', adopt => true)").as_deref(), Some("55000"));
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.event_log"), 0);
    drop(tmp);
    // An active slot (Barman's receive-wal streams all the time) may be adopted: the guard
    // never drops an active slot for expiry alone.
    c.exec("SELECT pg_create_physical_replication_slot('busy', true)");
    let (_recv, dir) = c.receivewal("busy");
    c.wait_for("pg_receivewal to attach to the slot", Duration::from_secs(30), |c| {
        (c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'busy' AND active") == 1).then_some(())
    });
    assert_eq!(c.sqlstate("SELECT backup_slot_lease('busy', '1s', adopt => true)"), None);
    assert_eq!(c.text("SELECT reason FROM pgslotguard.events WHERE slot_name = 'busy' AND action = 'lease'"), "adopted existing slot for 00:00:01");
    c.wait_for("the adopted active slot to show expired_active", WAIT, |c| {
        (c.text("SELECT state FROM pgslotguard.leases WHERE slot_name = 'busy'") == "expired_active").then_some(())
    });
    c.wait_passes(2);
    assert!(c.slot_exists("busy"), "an active adopted slot was dropped for expiry\n{}", c.describe());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two sessions lease one name with both calls in flight at once. The barrier is a lock
/// the test holds: the event table, locked against writes, which a lease call writes its
/// event to. The first call waits there inside its call (its slot made, its lease not
/// committed) while the second call runs, and it may also wait; only then the test lets
/// them go. One wins; the other is refused (already exists or leased, or a serialization
/// failure), and one lease is left.
#[test]
fn two_sessions_racing_for_one_name_one_wins() {
    let c = with_extension("race", &[]);
    let mut barrier = c.client();
    barrier.batch_execute("BEGIN; LOCK TABLE pgslotguard.event_log IN SHARE ROW EXCLUSIVE MODE").unwrap();
    // A session's backend PID and its call, run in a thread of its own.
    let call = |name: &'static str| {
        let mut cl = c.client();
        let pid: i32 = cl.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        let thread = std::thread::spawn(move || {
            cl.batch_execute("SELECT * FROM backup_slot_lease('race', '1h')")
                .map_err(|e| e.code().map(|c| c.code().to_string()).unwrap_or_else(|| e.to_string()))
        });
        (name, pid, thread)
    };
    let in_call = |c: &Cluster, pid: i32, waiting: bool| {
        c.count(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND state = 'active'
                AND query LIKE '%backup_slot_lease%' AND ({waiting} IS FALSE OR wait_event_type = 'Lock')"
        )) == 1
    };
    let first = call("first");
    c.wait_for("the first call to wait at the barrier, inside its call", WAIT, |c| in_call(c, first.1, true).then_some(()));
    let second = call("second");
    // The second call is inside its call (running, or waiting too) or done with it.
    c.wait_for("the second call to be inside its call or done", WAIT, |c| {
        (in_call(c, second.1, false) || second.2.is_finished()).then_some(())
    });
    assert!(in_call(&c, first.1, true), "the first call left the barrier before the test let it go\n{}", c.describe());
    barrier.batch_execute("COMMIT").unwrap();

    let results: Vec<(&str, Result<(), String>)> = [first, second].into_iter().map(|(name, _, t)| (name, t.join().unwrap())).collect();
    assert_eq!(results.iter().filter(|(_, r)| r.is_ok()).count(), 1, "{results:?}");
    let loser = results.iter().find_map(|(_, r)| r.clone().err()).unwrap();
    assert!(["42710", "40001"].contains(&loser.as_str()), "the loser got {loser}, not 'already exists' or a serialization failure: {results:?}");
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.leases WHERE slot_name = 'race'"), 1, "{}", c.describe());
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'race' AND action = 'lease'"), 1);
    assert!(c.slot_exists("race"));
}

/// Leases live in shared memory and in the data directory: without the library preloaded
/// there is nowhere to keep one, and the call says so before it makes a slot.
#[test]
fn without_preloading_a_lease_is_refused_and_leaves_no_slot() {
    let c = with_extension("nopreload", &["shared_preload_libraries = ''"]);
    let err = c.try_sql("SELECT * FROM backup_slot_lease('unguarded', '1h')").unwrap_err();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "55000", "{db:?}");
    assert!(db.hint().unwrap_or_default().contains("shared_preload_libraries"), "{db:?}");
    assert!(!c.slot_exists("unguarded"));
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.event_log"), 0);
    assert_eq!(c.text("SELECT running::text FROM pgslotguard.status"), "false");
    assert_eq!(c.text("SELECT preloaded::text FROM pgslotguard.status"), "false");
}

#[test]
fn bytes_that_are_not_utf8_in_a_sql_ascii_database_get_22021_and_a_hint() {
    let c = Cluster::start("sqlascii", &["pgslotguard.database = 'ascii'"]);
    c.exec("CREATE DATABASE ascii ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
    let mut db = c.client_db("ascii");
    db.batch_execute("CREATE EXTENSION pgslotguard").unwrap();
    for q in [
        "SELECT * FROM backup_slot_lease(E'bad\\xff', '1h')",
        "SELECT * FROM backup_slot_lease('ok_name', '1h', holder => E'caf\\xe9')",
        "SELECT * FROM backup_slot_lease('ok_name', '1h', max_retained => E'1\\xffGB')",
        "SELECT backup_slot_renew(E'x\\xfe')",
        "SELECT backup_slot_release(E'x\\xfe')",
    ] {
        let err = db.batch_execute(q).unwrap_err();
        let e = err.as_db_error().unwrap_or_else(|| panic!("{q}: {err}"));
        assert_eq!(e.code().code(), "22021", "{q}: {e:?}");
        assert!(e.hint().is_some_and(|h| h.contains("SQL_ASCII")), "{q}: {e:?}");
    }
    assert!(!c.slot_exists("ok_name"));
    // plain ASCII works as anywhere
    db.batch_execute("SELECT * FROM backup_slot_lease('ok_name', '1h', holder => 'nightly')").unwrap();
    assert!(c.slot_exists("ok_name"));
}

/// Per-lease limits: a role that is not a superuser may only tighten the global ones; a
/// superuser's replace them.
#[test]
fn only_a_superuser_may_give_a_lease_limits_above_the_global_ones() {
    let c = with_extension(
        "ownlimits",
        &["pgslotguard.max_inactive_time = '1min'", "pgslotguard.max_slot_age = '1h'", "pgslotguard.max_xmin_age = 100000"],
    );
    c.exec("CREATE ROLE backup LOGIN REPLICATION");
    let mut b = c.connect_as("backup");
    let code = |b: &mut postgres::Client, q: &str| b.batch_execute(q).err().and_then(|e| e.code().map(|c| c.code().to_string()));
    assert_eq!(code(&mut b, "SELECT backup_slot_lease('b1', '1h', max_inactive => '2 min')").as_deref(), Some("42501"));
    assert_eq!(code(&mut b, "SELECT backup_slot_lease('b1', '1h', max_age => '2 hours')").as_deref(), Some("42501"));
    assert_eq!(code(&mut b, "SELECT backup_slot_lease('b1', '1h', max_xmin_age => 200000)").as_deref(), Some("42501"));
    assert_eq!(code(&mut b, "SELECT backup_slot_lease('b1', '1h', max_xmin_age => 0)").as_deref(), Some("22023"));
    assert!(!c.slot_exists("b1"), "a refused lease left its slot");
    assert_eq!(code(&mut b, "SELECT backup_slot_lease('b1', '1h', max_inactive => '30 s', max_age => '30 min', max_xmin_age => 50000)"), None);
    assert_eq!(c.count("SELECT max_xmin_age FROM pgslotguard.leases WHERE slot_name = 'b1'"), 50000);
    // a superuser may loosen them
    c.exec("SELECT backup_slot_lease('s1', '1h', max_inactive => '1 day', max_age => '1 day')");
    let rows = c.sql("SELECT slot_name::text, max_inactive::text, max_age::text FROM pgslotguard.leases ORDER BY 1");
    let got: Vec<(String, String, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(got, [("b1".into(), "00:00:30".into(), "00:30:00".into()), ("s1".into(), "24:00:00".into(), "24:00:00".into())]);
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.leases WHERE limit_by_superuser"), 1, "s1's limits replace the global ones");
}
