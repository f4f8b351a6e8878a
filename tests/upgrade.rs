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
    // The server reads the 0.1.0 library from the cluster's own directory, not from the
    // checkout: a checkout under a mode-700 directory (root's home) is closed to postgres,
    // and dynamic_library_path would then fall back to $libdir, the library under test.
    let c = Cluster::init("upgrade", &[]);
    let lib = c.dir.join("lib-0.1.0");
    std::fs::create_dir(&lib).unwrap();
    std::fs::copy(std::path::Path::new(&old_lib).join("pgslotguard.so"), lib.join("pgslotguard.so"))
        .unwrap_or_else(|e| panic!("copy the 0.1.0 library from {old_lib}: {e}"));
    std::fs::set_permissions(lib.join("pgslotguard.so"), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    c.append_conf(&format!("dynamic_library_path = '{}:$libdir'", lib.display()));
    c.pg_ctl_start();
    assert!(postmaster_maps(&c).contains(&format!("{}/pgslotguard.so", lib.display())), "the postmaster did not preload the 0.1.0 library");
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
    assert!(!postmaster_maps(&c).contains(&lib.display().to_string()), "the postmaster still has the 0.1.0 library");
    let warned = |c: &Cluster| {
        c.log()
            .lines()
            .filter(|l| l.contains("is at version 0.1.0, the library at 0.3.0: its 2 lease(s) are kept in tables that this library does not read, and are not enforced; run ALTER EXTENSION pgslotguard UPDATE"))
            .count()
    };
    c.wait_for("two passes that say the leases wait for the update", WAIT, |c| (warned(c) >= 2).then_some(()));
    assert!(c.log().contains("WARNING:  pgslotguard: enforcement pass failed: extension \"pgslotguard\" in database \"postgres\""), "{}", c.log_tail(10));

    // An attacker with CREATE on public (the default before 15, kept by pg_upgrade) plants
    // operators for the type pairs our SQL uses before the superuser updates: neither the
    // update scripts, the function they run (import_0_1_0_tables, through SPI) nor the views
    // they make may bind or run one (issue 33 items 1 and 2).
    plant_hostile_operators(&c);
    c.exec("ALTER EXTENSION pgslotguard UPDATE");
    assert_eq!(c.text("SELECT extversion FROM pg_extension WHERE extname = 'pgslotguard'"), "0.3.0");
    assert!(c.log().contains("moved 2 lease(s)"), "{}", c.log_tail(10));
    assert_eq!(c.text("SELECT (to_regclass('pgslotguard.lease_data') IS NULL)::text"), "true");
    let rows = c.sql("SELECT slot_name::text, COALESCE(holder, ''), max_retained_bytes, state FROM pgslotguard.leases ORDER BY 1");
    let got: Vec<(String, String, Option<i64>, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    assert_eq!(got[0], ("nightly".into(), "host b2".into(), Some(1 << 30), "ok".into()), "{got:?}");
    assert_eq!(got[1].0, "short");
    // the old events stay, and the guard goes on from them
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'lease'"), 2);
    // the guard enforces the moved leases: the short one is dropped at its expiry
    c.wait_for("the moved short lease to be dropped at expiry", WAIT, |c| c.dropped("short").then_some(()));
    assert_eq!(c.text("SELECT action FROM pgslotguard.events WHERE slot_name = 'short' ORDER BY id DESC LIMIT 1"), "expire_drop");
    assert!(c.slot_exists("nightly") && c.slot_exists("unleased"), "{}", c.describe());
    // and the lease API works on the updated extension
    c.exec("SELECT backup_slot_renew('nightly', '2h')");
    c.exec("SELECT backup_slot_release('nightly')");
    assert!(!c.slot_exists("nightly"));

    // Every view read and every function called by the superuser on the updated extension:
    // no planted operator ran.
    use_everything(&c);
    assert_not_pwned(&c);
    // The planted operators go before the comparison below, whose own queries (plain SQL,
    // not ours) would pick them up.
    c.exec("DROP OWNED BY attacker CASCADE");

    // The updated extension is the same as a fresh install of 0.3.0: the same members,
    // function signatures and results, view and table columns, and constraints.
    let fresh = with_extension("upgrade-fresh", &[]);
    for (what, q) in SHAPE {
        assert_eq!(c.text(q), fresh.text(q), "{what} differ between an updated and a fresh 0.3.0");
    }
}

/// The postmaster's memory map: which pgslotguard.so it preloaded.
fn postmaster_maps(c: &Cluster) -> String {
    let pidfile = std::fs::read_to_string(c.data.join("postmaster.pid")).unwrap();
    let pid = pidfile.lines().next().unwrap().trim();
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap()
}

/// What makes up the extension, as text to compare (the test build's own hooks left out).
const SHAPE: [(&str, &str); 4] = [
    (
        "extension members",
        "SELECT string_agg(m, E'\\n' ORDER BY m) FROM (SELECT pg_describe_object(classid, objid, 0) AS m FROM pg_depend
          WHERE refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pgslotguard') AND deptype = 'e') s
          WHERE m !~ 'test'",
    ),
    (
        "function signatures",
        "SELECT string_agg(f, E'\\n' ORDER BY f) FROM (
            SELECT p.oid::regprocedure::text || ' -> ' || pg_get_function_result(p.oid) || ' ' || p.provolatile::text || p.proisstrict::text
                   || ' ' || COALESCE(array_to_string(p.proconfig, ','), '') || ' ' || COALESCE(array_to_string(p.proacl, ','), '') AS f
              FROM pg_proc p WHERE p.pronamespace IN ('pgslotguard'::regnamespace, 'public'::regnamespace) AND p.proname !~ 'test') s",
    ),
    (
        "columns",
        "SELECT string_agg(table_name || '.' || column_name || ':' || data_type, E'\\n' ORDER BY table_name, ordinal_position)
           FROM information_schema.columns WHERE table_schema = 'pgslotguard'",
    ),
    (
        "constraints and view rights",
        "SELECT string_agg(x, E'\\n' ORDER BY x) FROM (
            SELECT conname || ' ' || pg_get_constraintdef(oid) AS x FROM pg_constraint WHERE connamespace = 'pgslotguard'::regnamespace
            UNION ALL SELECT relname || ' ' || COALESCE(array_to_string(relacl, ','), '') || ' ' || COALESCE(array_to_string(reloptions, ','), '')
              FROM pg_class WHERE relnamespace = 'pgslotguard'::regnamespace AND relkind = 'v') s",
    ),
];
