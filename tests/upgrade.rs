//! `ALTER EXTENSION pgslotguard UPDATE` from 0.1.0, for real: a cluster runs the 0.1.0
//! library built from the git history (scripts/old-version, which scripts/suite runs for
//! PostgreSQL 15 and names in PGSG_OLD_LIB), leases are taken in its tables, then the
//! server restarts on the library under test. Until the update, every pass says that the
//! old leases are not enforced and what to run; after it, the leases are in the store and
//! enforced.
#![cfg(feature = "pg15")]

mod common;
use common::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn an_update_from_0_1_0_moves_every_lease_into_the_store_and_the_guard_enforces_them() {
    let old_lib = std::env::var("PGSG_OLD_LIB")
        .expect("PGSG_OLD_LIB names the directory of the 0.1.0 library (scripts/suite runs scripts/old-version)");
    let c = Cluster::init("upgrade", &[&format!("dynamic_library_path = '{old_lib}:$libdir'")]);
    c.pg_ctl_start();
    c.exec("CREATE EXTENSION pgslotguard VERSION '0.1.0'");
    assert_eq!(c.text("SELECT extversion FROM pg_extension WHERE extname = 'pgslotguard'"), "0.1.0");
    c.exec("CREATE ROLE backup LOGIN REPLICATION");
    c.exec("SELECT * FROM backup_slot_lease('nightly', '1h', holder => 'host b2', max_retained => '1GB')");
    c.exec("SELECT * FROM backup_slot_lease('short', '25 s')");
    c.exec("SELECT pg_create_physical_replication_slot('unleased', true)");
    c.wait_passes(1);
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.lease_data"), 2);

    // The library under test, with the extension still at 0.1.0.
    c.stop("fast");
    c.append_conf("dynamic_library_path = '$libdir'");
    c.pg_ctl_start();
    let warned = |c: &Cluster| {
        c.log()
            .lines()
            .filter(|l| l.contains("is at version 0.1.0, the library at 0.2.0: its 2 lease(s) are kept in tables that this library does not read, and are not enforced; run ALTER EXTENSION pgslotguard UPDATE"))
            .count()
    };
    c.wait_for("two passes that say the leases wait for the update", WAIT, |c| (warned(c) >= 2).then_some(()));
    assert!(c.log().contains("WARNING:  pgslotguard: enforcement pass failed: extension \"pgslotguard\" in database \"postgres\""), "{}", c.log_tail(10));

    c.exec("ALTER EXTENSION pgslotguard UPDATE");
    assert_eq!(c.text("SELECT extversion FROM pg_extension WHERE extname = 'pgslotguard'"), "0.2.0");
    assert!(c.log().contains("moved 2 lease(s)"), "{}", c.log_tail(10));
    assert_eq!(c.text("SELECT (to_regclass('pgslotguard.lease_data') IS NULL)::text"), "true");
    let rows = c.sql("SELECT slot_name::text, COALESCE(holder, ''), max_retained_bytes, state FROM pgslotguard.leases ORDER BY 1");
    let got: Vec<(String, String, Option<i64>, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    assert_eq!(got[0], ("nightly".into(), "host b2".into(), Some(1 << 30), "ok".into()), "{got:?}");
    assert_eq!(got[1].0, "short");
    // the old events stay, and the guard goes on from them
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'lease'"), 2);
    // the guard enforces the moved leases: the short one is dropped at its expiry
    c.wait_for("the moved short lease to be dropped at expiry", WAIT, |c| (!c.slot_exists("short")).then_some(()));
    assert_eq!(c.text("SELECT action FROM pgslotguard.events WHERE slot_name = 'short' ORDER BY id DESC LIMIT 1"), "expire_drop");
    assert!(c.slot_exists("nightly") && c.slot_exists("unleased"), "{}", c.describe());
    // and the lease API works on the updated extension
    c.exec("SELECT backup_slot_renew('nightly', '2h')");
    c.exec("SELECT backup_slot_release('nightly')");
    assert!(!c.slot_exists("nightly"));
}
