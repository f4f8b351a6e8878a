//! Leases on logical slots (issue 31), with real consumers: pg_recvlogical streaming
//! through a leased logical slot; a real publication and subscription between two clusters;
//! a connector-style adopt of a slot made by pg_create_logical_replication_slot, lasting
//! while its consumer streams; expiry while streaming (kept) and after the consumer is
//! gone (dropped, naming the change its consumer loses); catalog_xmin age; and on 17+ a
//! failover slot whose synced copy on a standby is never touched, guarded by the new
//! primary's policy after a promotion.

mod common;
use common::*;

/// pg_recvlogical streaming from `slot` in database postgres to a file, until stopped.
fn recvlogical(c: &Cluster, slot: &str, options: &[&str]) -> Proc {
    let out = c.dir.join(format!("{slot}.out"));
    let mut cmd = c.tool("pg_recvlogical");
    cmd.args(["-h", "127.0.0.1", "-p", &c.port_s(), "-U", "postgres", "-d", "postgres", "-S", slot, "-s", "1", "-F", "1", "--no-loop", "--start", "-f"]).arg(&out);
    for o in options {
        cmd.args(["-o", o]);
    }
    Proc(cmd.spawn().unwrap())
}

fn active(c: &Cluster, slot: &str) -> bool {
    c.count(&format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active")) == 1
}

/// The last event recorded about `slot` with `action`, once there is one.
fn event(c: &Cluster, slot: &str, action: &str) -> String {
    c.wait_for(&format!("a {action} event for {slot}"), WAIT, |c| {
        let r = c.text(&format!("SELECT reason FROM pgslotguard.events WHERE slot_name = '{slot}' AND action = '{action}' ORDER BY id DESC LIMIT 1"));
        (!r.is_empty()).then_some(r)
    })
}

#[test]
fn a_logical_lease_makes_its_slot_keeps_it_while_it_streams_and_drops_it_after_naming_what_is_lost() {
    let c = with_extension("logical_recv", &[]);
    let lsn = c.text("SELECT lsn::text FROM backup_slot_lease('cdc', '3 s', holder => 'cdc connector', plugin => 'test_decoding')");
    let row = c.sql("SELECT slot_type, plugin::text, database::text, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'cdc'");
    let got: (String, String, String, String) = (row[0].get(0), row[0].get(1), row[0].get(2), row[0].get(3));
    assert_eq!(got, ("logical".into(), "test_decoding".into(), "postgres".into(), lsn.clone()), "the call returns the consistent point");
    assert_eq!(c.text("SELECT slot_type || ' ' || plugin || ' ' || database FROM pgslotguard.leases WHERE slot_name = 'cdc'"), "logical test_decoding postgres");
    assert!(c.text("SELECT reason FROM pgslotguard.events WHERE slot_name = 'cdc' AND action = 'lease'").contains("logical slot (plugin test_decoding)"));

    let mut recv = recvlogical(&c, "cdc", &[]);
    c.wait_for("pg_recvlogical to stream", WAIT, |c| active(c, "cdc").then_some(()));
    c.exec("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 100)");
    // Expired while streaming: never dropped for expiry.
    c.wait_for("the lease to expire while streaming", WAIT, |c| {
        (c.text("SELECT state FROM pgslotguard.leases WHERE slot_name = 'cdc'") == "expired_active").then_some(())
    });
    c.wait_passes(2);
    assert!(c.slot_exists("cdc"), "{}", c.describe());
    assert!(!c.actions("cdc").contains("drop"));
    // The consumer is gone: the slot goes, and its event says what the consumer lost.
    recv.stop();
    let reason = event(&c, "cdc", "expire_drop");
    assert!(reason.contains("confirmed_flush_lsn at the drop") && reason.contains("new snapshot"), "{reason}");
    assert!(!c.slot_exists("cdc"));
    assert!(c.log().contains("dropped replication slot \"cdc\": lease expired") && c.log().contains("confirmed_flush_lsn at the drop"));
}

#[test]
fn a_connectors_slot_adopted_to_last_while_it_streams_outlives_its_ttl_and_goes_after_the_connector() {
    let c = with_extension("logical_adopt", &[]);
    c.exec("CREATE ROLE backup LOGIN REPLICATION; CREATE TABLE orders (id int PRIMARY KEY); CREATE PUBLICATION dbz FOR TABLE orders");
    // What a connector does: its own slot, by core's function.
    c.exec("SELECT pg_create_logical_replication_slot('debezium', 'pgoutput')");
    let mut recv = recvlogical(&c, "debezium", &["proto_version=1", "publication_names=dbz"]);
    c.wait_for("the connector to stream", WAIT, |c| active(c, "debezium").then_some(()));
    // The DBA adopts it: the lease lasts while the connector streams, and 4 s after it goes.
    c.exec("SELECT * FROM backup_slot_lease('debezium', '4 s', adopt => true, while_active => true, max_retained => '1GB')");
    assert_eq!(c.text("SELECT plugin FROM pgslotguard.leases WHERE slot_name = 'debezium'"), "pgoutput");
    c.exec("INSERT INTO orders SELECT generate_series(1, 50)");
    // Well past its ttl, streaming: the lease is not even expired.
    c.wait_for("the ttl to pass while the connector streams", WAIT, |c| {
        (c.text("SELECT (now() > expires_at + interval '3 s')::text FROM pgslotguard.leases WHERE slot_name = 'debezium'") == "true").then_some(())
    });
    assert_eq!(c.text("SELECT state FROM pgslotguard.leases WHERE slot_name = 'debezium'"), "ok", "{}", c.describe());
    assert!(!c.actions("debezium").contains("warn"), "{}", c.describe());
    // The connector goes: 4 s later, the slot goes.
    recv.stop();
    let reason = event(&c, "debezium", "expire_drop");
    assert!(reason.contains("confirmed_flush_lsn at the drop"), "{reason}");
    assert!(!c.slot_exists("debezium"));
}

#[test]
fn a_subscription_streaming_through_a_leased_slot_is_never_dropped_and_goes_when_disabled() {
    let p = with_extension("logical_pub", &[]);
    let s = Cluster::start("logical_sub", &[]);
    p.exec("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION pub FOR TABLE t; INSERT INTO t VALUES (1, 'before')");
    p.exec("SELECT * FROM backup_slot_lease('sub_slot', '3 s', holder => 'subscriber s', plugin => 'pgoutput')");
    s.exec("CREATE TABLE t (id int PRIMARY KEY, v text)");
    s.exec(&format!(
        "CREATE SUBSCRIPTION sub CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=postgres' PUBLICATION pub WITH (create_slot = false, slot_name = 'sub_slot')",
        p.port()
    ));
    s.wait_for("the initial copy", WAIT, |s| (s.count("SELECT count(*) FROM t") == 1).then_some(()));
    // Past the lease's expiry, the subscription streams on through the kept slot.
    p.wait_for("the lease to expire while the subscription streams", WAIT, |p| {
        (p.text("SELECT state FROM pgslotguard.leases WHERE slot_name = 'sub_slot'") == "expired_active").then_some(())
    });
    p.exec("INSERT INTO t VALUES (2, 'after expiry')");
    s.wait_for("a change made after the expiry to arrive", WAIT, |s| (s.count("SELECT count(*) FROM t") == 2).then_some(()));
    p.wait_passes(2);
    assert!(p.slot_exists("sub_slot") && !p.actions("sub_slot").contains("drop"), "{}", p.describe());
    // The subscription is disabled: its slot is no longer in use, and the guard drops it.
    s.exec("ALTER SUBSCRIPTION sub DISABLE");
    let reason = event(&p, "sub_slot", "expire_drop");
    assert!(reason.contains("subscription is made again"), "{reason}");
    s.exec("ALTER SUBSCRIPTION sub SET (slot_name = NONE); DROP SUBSCRIPTION sub");
}

#[test]
fn a_logical_lease_is_held_to_its_catalog_xmin_age() {
    let c = with_extension("logical_xmin", &[]);
    c.exec("SELECT * FROM backup_slot_lease('old_catalog', '1h', plugin => 'test_decoding', max_xmin_age => 2000)");
    let burn = c.burn_xids(2, None);
    let reason = event(&c, "old_catalog", "xmin_drop");
    drop(burn);
    assert!(reason.contains("transaction horizon") && reason.contains("confirmed_flush_lsn at the drop"), "{reason}");
    assert!(!c.slot_exists("old_catalog"));
}

#[test]
fn the_options_of_a_logical_lease_and_what_core_refuses() {
    let c = with_extension("logical_opts", &[]);
    c.exec("SELECT * FROM backup_slot_lease('tp', '1h', plugin => 'test_decoding', two_phase => true)");
    assert_eq!(c.text("SELECT two_phase::text FROM pg_replication_slots WHERE slot_name = 'tp'"), "true");
    // Options of a logical slot without a plugin, and an unknown plugin.
    assert_eq!(c.sqlstate("SELECT backup_slot_lease('x', '1h', two_phase => true)").as_deref(), Some("22023"));
    // A plugin core does not let be named (output_plugin_libraries, in the minor releases
    // since 2026): core's refusal, through us too; once listed, a library that is not there.
    let listed = c.count("SELECT count(*) FROM pg_settings WHERE name = 'output_plugin_libraries'") == 1;
    if listed {
        assert_eq!(c.sqlstate("SELECT backup_slot_lease('x', '1h', plugin => 'no_such_plugin')").as_deref(), Some("42501"));
        c.exec("ALTER SYSTEM SET output_plugin_libraries = 'pgoutput', 'test_decoding', 'no_such_plugin'");
        c.exec("SELECT pg_reload_conf()");
        c.wait_for("the reload", WAIT, |c| (c.text("SHOW output_plugin_libraries").contains("no_such_plugin")).then_some(()));
    }
    assert_eq!(c.sqlstate("SELECT backup_slot_lease('x', '1h', plugin => 'no_such_plugin')").as_deref(), Some("58P01"));
    // A logical slot cannot be made in a transaction that has written (core's rule).
    assert_eq!(c.sqlstate("BEGIN; CREATE TABLE w (x int); SELECT backup_slot_lease('x', '1h', plugin => 'test_decoding'); COMMIT").as_deref(), Some("25001"));
    assert!(!c.slot_exists("x"), "{}", c.describe());
    if cfg!(feature = "pg15") {
        assert_eq!(c.sqlstate("SELECT backup_slot_lease('x', '1h', plugin => 'pgoutput', failover => true)").as_deref(), Some("0A000"));
    } else {
        c.exec("SELECT * FROM backup_slot_lease('fo', '1h', plugin => 'pgoutput', failover => true)");
        assert_eq!(c.text("SELECT failover::text FROM pg_replication_slots WHERE slot_name = 'fo'"), "true");
    }
    // A rolled-back logical lease leaves no slot either.
    c.exec("BEGIN; SELECT backup_slot_lease('rb', '1h', plugin => 'test_decoding'); ROLLBACK");
    assert!(!c.slot_exists("rb"));
}

#[cfg(not(feature = "pg15"))]
#[test]
fn a_failover_slots_synced_copy_is_never_touched_and_the_new_primary_guards_it_after_promotion() {
    let p = with_extension("failover_p", &[]);
    p.exec("SELECT pg_create_physical_replication_slot('sb')");
    let s = p.standby(
        "failover_s",
        "sb",
        &[
            "sync_replication_slots = on",
            &format!("primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres'", p.port()),
            // The standby's guard, with every slot in scope and tight limits.
            "pgslotguard.scope = 'all'",
            "pgslotguard.max_inactive_time = '2s'",
        ],
    );
    p.exec("SELECT * FROM backup_slot_lease('fo_slot', '1h', plugin => 'pgoutput', failover => true)");
    // The standby syncs the slot once the slot on the primary has moved past what the
    // standby holds (restart_lsn, catalog_xmin): move it, as a consumer would, until then.
    s.wait_for("the synced copy on the standby", WAIT, |s| {
        p.exec("SELECT pg_log_standby_snapshot(); SELECT pg_replication_slot_advance('fo_slot', pg_current_wal_lsn())");
        (s.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'fo_slot' AND synced AND NOT temporary") == 1).then_some(())
    });
    s.wait_passes(4);
    assert_eq!(s.text("SELECT scope_reason FROM pgslotguard.slots WHERE slot_name = 'fo_slot'"), "synchronized from the primary (synced)");
    // (the standby's events view also shows the primary's table, replicated: its lease)
    let mine = s.text("SELECT coalesce(string_agg(action, ','), '') FROM pgslotguard.events WHERE slot_name = 'fo_slot' AND kept_in = 'ring'");
    assert_eq!(mine, "", "the standby's guard touched the synced slot\n{}", s.describe());
    // Promoted, the standby is a primary: the slot is its own now, guarded by its policy
    // (the lease stays on the old primary's store: a lease belongs to its node).
    s.run_tool("pg_ctl", &["-D", &s.data.display().to_string(), "promote", "-w"]);
    let reason = s.wait_for("the new primary to guard the slot by its policy", WAIT, |s| {
        let r = s.text("SELECT reason FROM pgslotguard.events WHERE slot_name = 'fo_slot' AND action = 'inactive_drop'");
        (!r.is_empty()).then_some(r)
    });
    assert!(reason.contains("confirmed_flush_lsn"), "{reason}");
    assert!(p.leased("fo_slot"), "the old primary keeps its lease");
}
