//! PostgreSQL 19's own slots: the conflict detection slot a subscriber's
//! `retain_dead_tuples` keeps (it holds back xmin on purpose), and the slots of
//! REPACK (CONCURRENTLY), from a pool of their own. The guard never drops, terminates or
//! warns about either, whatever its scope and limits; a lease or adopt of one is refused;
//! the views say why. Each test also shows that the same limits drop an ordinary slot
//! (a control: the limits are tight enough to act on core's slot if it were in scope).
//! On 19, logical decoding needs only `wal_level = replica` (`effective_wal_level`): a
//! logical lease turns it on there as core's own function does.
#![cfg(feature = "pg19")]

mod common;
use common::*;

/// Every limit as tight as the guard allows, every slot in scope, active ones terminated.
const TIGHT: &[&str] = &[
    "pgslotguard.scope = 'all'",
    "pgslotguard.terminate_active = on",
    "pgslotguard.max_xmin_age = 1000",
    "pgslotguard.max_retained_wal = '1MB'",
    "pgslotguard.max_inactive_time = '1s'",
    "pgslotguard.max_slot_age = '1s'",
    "pgslotguard.warn_fraction = 0.5",
];

/// A physical slot that reserves WAL, made outside the guard: under TIGHT it is dropped.
fn control_slot_is_dropped(c: &Cluster, name: &str) {
    c.exec(&format!("SELECT pg_create_physical_replication_slot('{name}', true)"));
    c.make_wal(2);
    c.wait_for(&format!("the guard to drop the control slot {name}"), WAIT, |c| c.dropped(name).then_some(()));
}

/// Nothing the guard recorded names `slot`: no drop, no termination, no warning.
fn untouched(c: &Cluster, slot: &str) {
    assert_eq!(c.actions(slot), "", "the guard acted on {slot}\n{}", c.describe());
}

#[test]
fn the_conflict_detection_slot_of_retain_dead_tuples_is_never_touched() {
    let publisher = Cluster::start("pg19_pub", &["pgslotguard.scope = 'leased'"]);
    publisher.exec("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION p FOR TABLE t");
    // The subscriber: wal_level replica (retain_dead_tuples needs no more), the guard at its
    // tightest, and its xmin limit crossed as soon as the slot holds anything back.
    let mut extra = vec!["wal_level = replica", "track_commit_timestamp = on"];
    extra.extend_from_slice(TIGHT);
    let s = with_extension("pg19_sub", &extra);
    s.exec("CREATE TABLE t (id int PRIMARY KEY, v text)");
    s.exec(&format!(
        "CREATE SUBSCRIPTION sub CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=postgres' PUBLICATION p WITH (retain_dead_tuples = true)",
        publisher.port()
    ));
    s.wait_for("the conflict detection slot", WAIT, |s| s.slot_exists("pg_conflict_detection").then_some(()));
    for i in 0..10 {
        publisher.exec(&format!("INSERT INTO t VALUES ({i}, 'x')"));
    }
    s.wait_for("the first rows on the subscriber", WAIT, |s| (s.count("SELECT count(*) FROM t") == 10).then_some(()));
    // With the publisher down, the slot's xmin cannot advance (the apply worker cannot
    // learn that the publisher's transactions are applied): transactions pass on the
    // subscriber, and the slot's xmin falls more than the xmin limit (1000) behind while
    // the guard passes.
    publisher.stop("fast");
    let burn = s.burn_xids(1, None);
    s.wait_for("the slot's xmin 1000+ transactions back", WAIT, |s| {
        (s.count("SELECT coalesce(age(xmin), 0)::bigint FROM pg_replication_slots WHERE slot_name = 'pg_conflict_detection'") > 1500).then_some(())
    });
    s.wait_passes(3);
    drop(burn);
    assert!(s.slot_exists("pg_conflict_detection"), "{}", s.describe());
    untouched(&s, "pg_conflict_detection");
    assert_eq!(
        s.text("SELECT scope_reason FROM pgslotguard.slots WHERE slot_name = 'pg_conflict_detection'"),
        "conflict detection slot of retain_dead_tuples (core's)"
    );
    assert_eq!(s.text("SELECT in_scope::text FROM pgslotguard.slots WHERE slot_name = 'pg_conflict_detection'"), "false");
    // Neither leased nor adopted: core's reserved name, with our HINT.
    for call in [
        "SELECT backup_slot_lease('pg_conflict_detection', '1h', adopt => true)",
        "SELECT backup_slot_lease('pg_conflict_detection', '1h')",
    ] {
        let e = s.client().query(call, &[]).unwrap_err();
        let db = e.as_db_error().expect("an ERROR");
        assert_eq!(db.code().code(), "42939", "{call}: {}", db.message());
        assert!(db.message().contains("PostgreSQL's own"), "{}", db.message());
        assert!(db.hint().unwrap_or("").contains("retain_dead_tuples"), "{:?}", db.hint());
    }
    assert!(!s.leased("pg_conflict_detection"));
    // The same limits drop an ordinary slot, and the conflict detection slot is still there.
    control_slot_is_dropped(&s, "control_cd");
    assert!(s.slot_exists("pg_conflict_detection"));
    untouched(&s, "pg_conflict_detection");
    // Replication goes on once the publisher is back.
    publisher.pg_ctl_start();
    for i in 10..20 {
        publisher.exec(&format!("INSERT INTO t VALUES ({i}, 'x')"));
    }
    s.wait_for("the rows on the subscriber", WAIT, |s| (s.count("SELECT count(*) FROM t") == 20).then_some(()));
    untouched(&s, "pg_conflict_detection");
}

#[test]
fn a_running_repack_concurrently_keeps_its_slot_and_finishes() {
    let mut extra = vec!["wal_level = replica", "max_repack_replication_slots = 2"];
    extra.extend_from_slice(TIGHT);
    let c = with_extension("pg19_repack", &extra);
    c.exec("CREATE TABLE big (id int PRIMARY KEY, pad text); INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g; DELETE FROM big WHERE id % 2 = 0");
    // A reader holds the table: REPACK copies it and then waits for its lock to swap the
    // files in, holding its slot (and its catalog_xmin) all the while.
    let mut reader = c.client();
    reader.batch_execute("BEGIN; SELECT count(*) FROM big").unwrap();
    // (One statement: REPACK (CONCURRENTLY) runs in no transaction block. A session of
    // `session` has no lock_timeout.)
    let repack = c.session("REPACK (CONCURRENTLY) big");
    let name = c.wait_for("REPACK's slot", WAIT, |c| {
        assert!(!repack.is_finished(), "REPACK ended before its slot was seen\n{}", c.log_tail(20));
        let n = c.text("SELECT coalesce(min(slot_name), '') FROM pg_replication_slots WHERE slot_name LIKE 'pg\\_repack\\_%'");
        (!n.is_empty()).then_some(n)
    });
    // The guard passes at its tightest while REPACK holds the slot. (Its slot is also
    // temporary, which alone keeps it out of scope: the view must name REPACK, and the
    // refusal below must be REPACK's, or the guard does not know the slot for what it is.)
    c.wait_passes(3);
    assert!(c.slot_exists(&name), "{}", c.describe());
    untouched(&c, &name);
    assert_eq!(c.text(&format!("SELECT scope_reason FROM pgslotguard.slots WHERE slot_name = '{name}'")), "REPACK (CONCURRENTLY)'s own slot (core's)");
    let e = c.client().query("SELECT backup_slot_lease($1, '1h', adopt => true)", &[&name]).unwrap_err();
    let db = e.as_db_error().expect("an ERROR");
    assert_eq!(db.code().code(), "55000", "{}", db.message());
    assert!(db.hint().unwrap_or("").contains("REPACK"), "{:?}", db.hint());
    // The same limits drop an ordinary slot meanwhile.
    control_slot_is_dropped(&c, "control_rp");
    assert!(c.slot_exists(&name));
    // The reader ends: REPACK swaps the files in and finishes, its slot gone with it.
    reader.batch_execute("COMMIT").unwrap();
    repack.join().unwrap().expect("REPACK (CONCURRENTLY) finished without error");
    assert_eq!(c.count("SELECT count(*) FROM big"), 10000);
    c.wait_for("REPACK's slot to go", WAIT, |c| (!c.slot_exists(&name)).then_some(()));
    untouched(&c, &name);
}

#[test]
fn a_logical_lease_needs_only_wal_level_replica_on_19() {
    let c = with_extension("pg19_ewl", &["wal_level = replica"]);
    assert_eq!(c.text("SHOW effective_wal_level"), "replica");
    c.exec("SELECT * FROM backup_slot_lease('cdc', '1h', plugin => 'test_decoding')");
    assert_eq!(c.text("SHOW effective_wal_level"), "logical");
    c.exec("CREATE TABLE ewl (id int); INSERT INTO ewl VALUES (1)");
    assert!(c.count("SELECT count(*) FROM pg_logical_slot_peek_changes('cdc', NULL, NULL) WHERE data LIKE 'table public.ewl: INSERT%'") == 1);
    // Released, the last logical slot goes, and logical decoding is turned off again (the
    // checkpointer does it, a moment later).
    c.exec("SELECT backup_slot_release('cdc')");
    c.wait_for("the slot to go", WAIT, |c| c.dropped("cdc").then_some(()));
    c.wait_for("effective_wal_level back to replica", WAIT, |c| (c.text("SHOW effective_wal_level") == "replica").then_some(()));
}
