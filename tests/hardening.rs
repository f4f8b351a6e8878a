//! Findings of the adversarial test run, each reproduced against a real cluster: no role
//! can stall the guard through a lock, and a lease held open in a transaction costs only
//! its own slot one pass at a time.

mod common;
use common::*;
use postgres::{Client, NoTls};
use std::time::{Duration, Instant};

fn connect_as(c: &Cluster, role: &str) -> Client {
    Client::connect(&format!("host=127.0.0.1 port={} user={role} dbname=postgres", c.port), NoTls)
        .unwrap_or_else(|e| panic!("connect as {role}: {e}"))
}

#[test]
fn no_role_can_stall_the_guard_with_an_advisory_lock() {
    let c = with_extension("stall", &[]);
    c.exec("CREATE ROLE nobody LOGIN; CREATE ROLE backup LOGIN REPLICATION;");
    let mut backup = connect_as(&c, "backup");
    backup.batch_execute("SELECT backup_slot_lease('a_victim', '2s')").unwrap();

    // A role with no rights at all holds the advisory lock pgslotguard used to take
    // for this name, and keeps its session open.
    let mut rogue = connect_as(&c, "nobody");
    rogue.batch_execute("SELECT pg_advisory_lock(hashtext('pgslotguard'), hashtext('a_victim'))").unwrap();
    rogue.batch_execute("SELECT pg_advisory_lock(hashtext('pgslotguard'), hashtext('z_other'))").unwrap();

    let t0 = Instant::now();
    backup.batch_execute("SELECT backup_slot_lease('z_other', '1s')").unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "leasing waited {:?} behind the rogue's lock", t0.elapsed());

    c.wait_for("both expired slots to be dropped while the rogue holds its locks", Duration::from_secs(15), |c| {
        (!c.slot_exists("a_victim") && !c.slot_exists("z_other")).then_some(())
    });
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'expire_drop'"), 2, "{}", c.describe());
    assert_eq!(c.count("SELECT busy_skips FROM pgslotguard.status"), 0);
    drop(rogue);
}

#[test]
fn a_lease_held_open_in_a_transaction_makes_the_guard_skip_only_that_slot() {
    let c = with_extension("held", &[]);
    c.exec("SELECT * FROM backup_slot_lease('held', '1s'); SELECT * FROM backup_slot_lease('other', '1s');");
    std::thread::sleep(Duration::from_millis(1100)); // both leases expire

    // The lease owner renews inside a transaction it leaves open: it holds the slot's lock.
    let mut owner = c.client();
    let mut tx = owner.transaction().unwrap();
    tx.batch_execute("SELECT backup_slot_renew('held', '1 hour')").unwrap();

    c.wait_for("the other expired slot to be dropped", WAIT, |c| (!c.slot_exists("other")).then_some(()));
    c.wait_for("the guard to report the busy slot", WAIT, |c| {
        (c.count("SELECT busy_skips FROM pgslotguard.status") > 0).then_some(())
    });
    assert_eq!(c.text("SELECT last_busy_slot FROM pgslotguard.status"), "held");
    c.wait_passes(2); // the guard goes on passing
    assert!(c.slot_exists("held"), "a slot whose lease is being changed was dropped\n{}", c.describe());

    // A second session's lease call on the same name waits a bounded time, then says why.
    let t0 = Instant::now();
    let err = c.client().batch_execute("SELECT backup_slot_renew('held', '1 hour')").unwrap_err();
    let waited = t0.elapsed();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "55P03", "{db:?}");
    assert!(db.message().contains("replication slot \"held\" is busy"), "{db:?}");
    assert!(db.hint().is_some_and(|h| h.contains("retry once it commits")), "{db:?}");
    assert!(waited >= Duration::from_secs(4) && waited < Duration::from_secs(15), "waited {waited:?}");

    // Once the owner's transaction ends (rolled back: the renewal never happened), the
    // guard drops the expired slot.
    tx.rollback().unwrap();
    c.wait_for("the expired slot to be dropped once its lock is free", WAIT, |c| (!c.slot_exists("held")).then_some(()));
}
