//! The lease API where it needs a cluster of its own: top-level ROLLBACK, a lease failing
//! half-way (max_replication_slots exhausted), adopting logical and active slots, two
//! sessions racing for one name, and the warning when no guard worker runs.

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
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.lease_data"), 0);
    assert_eq!(c.text("SELECT action FROM pgslotguard.events ORDER BY id DESC LIMIT 1"), "release");

    // lease and release in one transaction: nothing left
    c.exec("BEGIN; SELECT * FROM backup_slot_lease('rb2', '1h'); SELECT backup_slot_release('rb2'); COMMIT;");
    assert!(!c.slot_exists("rb2"));
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.lease_data"), 0);
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
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.lease_data"), 0);
    assert!(c.log().contains("dropped replication slot \"t\": the lease that created it was rolled back"));

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
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.lease_data"), 2);
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.event_log"), events);

    // the insert of the lease fails after the slot was made: the slot must go too
    c.exec("SELECT backup_slot_release('b')");
    c.exec("ALTER TABLE pgslotguard.lease_data ADD CONSTRAINT sabotage CHECK (slot_name <> 'late_fail')");
    let code = c.sqlstate("SELECT * FROM backup_slot_lease('late_fail', '1h')");
    assert_eq!(code.as_deref(), Some("23514"));
    assert!(!c.slot_exists("late_fail"), "a lease that failed after creating its slot left it\n{}", c.describe());
}

#[test]
fn adopt_refuses_logical_and_active_slots() {
    let c = with_extension("adopt", &[]);
    c.exec("SELECT pg_create_logical_replication_slot('logical1', 'test_decoding')");
    assert_eq!(c.sqlstate("SELECT backup_slot_lease('logical1', '1h', adopt => true)").as_deref(), Some("55000"));
    c.exec("SELECT pg_create_physical_replication_slot('busy', true)");
    let (_recv, dir) = c.receivewal("busy");
    c.wait_for("pg_receivewal to attach to the slot", Duration::from_secs(30), |c| {
        (c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'busy' AND active") == 1).then_some(())
    });
    assert_eq!(c.sqlstate("SELECT backup_slot_lease('busy', '1h', adopt => true)").as_deref(), Some("55006"));
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.lease_data"), 0);
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.event_log"), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_sessions_racing_for_one_name_one_wins() {
    let c = with_extension("race", &[]);
    for round in 0..5 {
        let name = format!("race_{round}");
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let conn = c.conninfo("postgres");
                let name = name.clone();
                std::thread::spawn(move || {
                    let mut cl = postgres::Client::connect(&conn, postgres::NoTls).unwrap();
                    cl.batch_execute(&format!("SELECT * FROM backup_slot_lease('{name}', '1h')"))
                        .map_err(|e| e.code().map(|c| c.code().to_string()).unwrap_or_default())
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let wins = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "round {round}: {results:?}");
        let loser = results.iter().find_map(|r| r.clone().err()).unwrap();
        assert_eq!(loser, "42710", "the loser gets 'already leased'");
        assert_eq!(c.count(&format!("SELECT count(*) FROM pgslotguard.lease_data WHERE slot_name = '{name}'")), 1);
    }
}

#[test]
fn lease_warns_when_no_guard_worker_runs() {
    let c = with_extension("nopreload", &["shared_preload_libraries = ''"]);
    // capture the WARNING through the server log (the client library drops notices)
    c.exec("SELECT * FROM backup_slot_lease('unguarded', '1h')");
    assert!(
        c.log().contains("WARNING:  pgslotguard: no guard worker is running; this lease will not be enforced"),
        "{}",
        c.log_tail(10)
    );
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

/// A backend keeps its read of the lease and tracking tables while nothing changes them
/// (src/state.rs). Every committed change, however it is made, must be seen by the next
/// read of a backend that kept one: the worker decides from that read.
#[test]
fn a_kept_read_of_the_leases_follows_every_committed_change() {
    // dry_run: the worker writes nothing (its tracking included), so that no commit but
    // the test's own changes the tables.
    let c = with_extension("kept", &["max_prepared_transactions = 2", "pgslotguard.dry_run = on"]);
    let mut a = c.client();
    let leased = |a: &mut postgres::Client, slot: &str| -> Option<(bool, String)> {
        a.query_opt("SELECT leased, state FROM pgslotguard.slots WHERE slot_name = $1", &[&slot])
            .unwrap()
            .map(|r| (r.get(0), r.get(1)))
    };
    c.exec("SELECT backup_slot_lease('k1', '1h')");
    assert_eq!(leased(&mut a, "k1"), Some((true, "ok".into())), "{}", c.describe());

    // A superuser changes the table directly: an update, with triggers off for replicas.
    c.exec("SET session_replication_role = replica; UPDATE pgslotguard.lease_data SET expires_at = now() - interval '1 min'");
    assert_eq!(leased(&mut a, "k1"), Some((true, "expired".into())), "an UPDATE as a replica went unseen");
    // A delete: the slot is no longer leased.
    c.exec("DELETE FROM pgslotguard.lease_data WHERE slot_name = 'k1'");
    assert_eq!(leased(&mut a, "k1").map(|l| l.0), Some(false), "a DELETE went unseen");

    // A transaction in repeatable read reads as of its snapshot, and what it read is not
    // kept: once it ends, a lease committed meanwhile is seen.
    let mut tx = a.build_transaction().isolation_level(postgres::IsolationLevel::RepeatableRead).start().unwrap();
    tx.query("SELECT * FROM pgslotguard.slots", &[]).unwrap();
    c.exec("SELECT backup_slot_lease('k2', '1h')");
    let in_tx = tx.query_opt("SELECT leased FROM pgslotguard.slots WHERE slot_name = 'k2'", &[]).unwrap();
    assert_eq!(in_tx.map(|r| r.get::<_, bool>(0)), Some(false), "the snapshot predates the lease (the slot is not transactional)");
    tx.commit().unwrap();
    assert_eq!(leased(&mut a, "k2"), Some((true, "ok".into())), "a read made in repeatable read was kept");

    // TRUNCATE, then the extension dropped and created anew (new tables, no trigger ran).
    c.exec("TRUNCATE pgslotguard.lease_data");
    assert_eq!(leased(&mut a, "k2").map(|l| l.0), Some(false), "a TRUNCATE went unseen");
    c.exec("SELECT backup_slot_lease('k3', '1h')");
    assert_eq!(leased(&mut a, "k3").map(|l| l.0), Some(true));
    c.exec("DROP EXTENSION pgslotguard; CREATE EXTENSION pgslotguard");
    assert_eq!(leased(&mut a, "k3").map(|l| l.0), Some(false), "the old tables' leases were kept");

    // A change inside a transaction is seen by that transaction at once, and by no other
    // backend if it rolls back.
    let mut tx = a.transaction().unwrap();
    tx.batch_execute("INSERT INTO pgslotguard.lease_data (slot_name, owner, leased_at, expires_at) VALUES ('k3', 'postgres', now(), now() + interval '1h')").unwrap();
    let own = tx.query_one("SELECT leased FROM pgslotguard.slots WHERE slot_name = 'k3'", &[]).unwrap();
    assert!(own.get::<_, bool>(0), "a transaction did not see its own change");
    tx.rollback().unwrap();
    assert_eq!(leased(&mut a, "k3").map(|l| l.0), Some(false), "a rolled-back change was kept");

    // A prepared transaction would make its change visible where no trigger runs.
    assert_eq!(
        c.sqlstate("BEGIN; DELETE FROM pgslotguard.slot_seen; PREPARE TRANSACTION 'p1'"),
        Some("0A000".into()),
        "PREPARE of a change to the tables must be refused"
    );
    assert_eq!(c.count("SELECT count(*) FROM pg_prepared_xacts"), 0);
}

/// Per-lease limits: a role that is not a superuser may only tighten the global ones; a
/// superuser's replace them.
#[test]
fn only_a_superuser_may_give_a_lease_limits_above_the_global_ones() {
    let c = with_extension("ownlimits", &["pgslotguard.max_inactive_time = '1min'", "pgslotguard.max_slot_age = '1h'"]);
    c.exec("CREATE ROLE backup LOGIN REPLICATION");
    let mut b = postgres::Client::connect(&format!("host=127.0.0.1 port={} user=backup dbname=postgres", c.port), postgres::NoTls).unwrap();
    let code = |b: &mut postgres::Client, q: &str| b.batch_execute(q).err().and_then(|e| e.code().map(|c| c.code().to_string()));
    assert_eq!(code(&mut b, "SELECT backup_slot_lease('b1', '1h', max_inactive => '2 min')").as_deref(), Some("42501"));
    assert_eq!(code(&mut b, "SELECT backup_slot_lease('b1', '1h', max_age => '2 hours')").as_deref(), Some("42501"));
    assert!(!c.slot_exists("b1"), "a refused lease left its slot");
    assert_eq!(code(&mut b, "SELECT backup_slot_lease('b1', '1h', max_inactive => '30 s', max_age => '30 min')"), None);
    // a superuser may loosen them
    c.exec("SELECT backup_slot_lease('s1', '1h', max_inactive => '1 day', max_age => '1 day')");
    let rows = c.sql("SELECT slot_name::text, max_inactive::text, max_age::text FROM pgslotguard.leases ORDER BY 1");
    let got: Vec<(String, String, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(got, [("b1".into(), "00:00:30".into(), "00:30:00".into()), ("s1".into(), "24:00:00".into(), "24:00:00".into())]);
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.lease_data WHERE limit_by_superuser"), 1, "s1's limits replace the global ones");
}
