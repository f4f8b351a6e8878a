//! What a hostile role can and cannot do through pgslotguard (doc/security.md): a plain
//! login role, a backup role with only LOGIN REPLICATION, and a role that made operators in
//! a writable `public`. Each test runs the attack and checks that the attacker gained
//! nothing that core would not give it.

mod common;
use common::*;
use postgres::{Client, NoTls};

/// A client logged in as `role` (trust authentication on loopback).
fn as_role(c: &Cluster, role: &str) -> Client {
    Client::connect(&format!("host=127.0.0.1 port={} user={role} dbname=postgres", c.port()), NoTls).unwrap()
}

/// The SQLSTATE and message `q` fails with as `client`.
fn refusal(client: &mut Client, q: &str) -> (String, String, Option<String>) {
    let e = client.batch_execute(q).expect_err(q);
    let db = e.as_db_error().unwrap_or_else(|| panic!("{q}: {e}"));
    (db.code().code().to_string(), db.message().to_string(), db.hint().map(str::to_string))
}

#[test]
fn hostile_operators_in_a_writable_public_are_never_bound_or_run_by_our_sql() {
    let c = Cluster::start("sec_ops", &[]);
    plant_hostile_operators(&c);
    c.exec("CREATE EXTENSION pgslotguard");
    use_everything(&c);
    c.wait_passes(2);
    assert_not_pwned(&c);
    // The control: such an operator does run when SQL picks it up (so the check can fail).
    c.exec("SELECT 1::bigint / 1e6");
    assert!(c.count("SELECT count(*) FROM public.pwned") > 0, "the planted operators work");
}

#[test]
fn a_backup_role_may_not_adopt_or_terminate_another_roles_stream() {
    let c = with_extension("sec_adopt", &[]);
    c.exec("CREATE ROLE backup LOGIN REPLICATION; CREATE ROLE other LOGIN REPLICATION");
    // The superuser streams through a slot; backup may not adopt it (core would not let it
    // terminate that walsender).
    c.exec("SELECT pg_create_physical_replication_slot('su_stream', true)");
    let (mut recv, _d) = c.receivewal("su_stream");
    c.wait_for("the superuser's stream", WAIT, |c| {
        (c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'su_stream' AND active") == 1).then_some(())
    });
    let mut b = as_role(&c, "backup");
    let (code, msg, hint) = refusal(&mut b, "SELECT * FROM backup_slot_lease('su_stream', '7 days', adopt => true, max_retained => '1kB')");
    assert_eq!(code, "42501", "{msg}");
    assert!(msg.contains("may not terminate") && hint.is_some(), "{msg}");
    assert!(!c.leased("su_stream"));
    // Adopted while inactive, the guard still never terminates the superuser's walsender
    // for backup's lease: it warns and waits.
    recv.stop();
    c.wait_for("the stream to end", WAIT, |c| {
        (c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'su_stream' AND active") == 0).then_some(())
    });
    b.batch_execute("SELECT * FROM backup_slot_lease('su_stream', '7 days', adopt => true, max_age => '1s')").unwrap();
    let (mut recv, _d) = c.receivewal("su_stream");
    c.wait_for("the superuser's stream again", WAIT, |c| {
        (c.count("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'su_stream' AND active") == 1).then_some(())
    });
    // Over its age limit (a hard limit): with terminate_active the guard would terminate a
    // walsender the lease's owner may terminate, and drop the slot.
    c.set_policy(&[("pgslotguard.terminate_active", "on")]);
    let reason = c.wait_for("a warning instead of a termination", WAIT, |c| {
        c.sql("SELECT reason FROM pgslotguard.events WHERE slot_name = 'su_stream' AND action = 'warn'").first().map(|r| r.get::<_, String>(0))
    });
    assert!(reason.contains("not one the lease's owner may terminate"), "{reason}");
    assert!(c.slot_exists("su_stream"));
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'su_stream' AND action IN ('terminate', 'age_drop')"), 0);
    recv.stop();
}

#[test]
fn a_lease_belongs_to_a_role_oid_and_its_rights_are_checked_at_every_call() {
    let c = with_extension("sec_owner", &[]);
    c.exec("CREATE ROLE v2 LOGIN REPLICATION; CREATE ROLE backup LOGIN REPLICATION");
    as_role(&c, "v2").batch_execute("SELECT * FROM backup_slot_lease('v2_slot', '1h', holder => 'secret host')").unwrap();
    // v2 is dropped, a new v2 made: it is another role, and the lease is not its.
    c.exec("DROP ROLE v2; CREATE ROLE v2 LOGIN REPLICATION");
    let mut v2 = as_role(&c, "v2");
    assert_eq!(v2.query_one("SELECT count(*) FROM pgslotguard.leases", &[]).unwrap().get::<_, i64>(0), 0);
    assert_eq!(v2.query_one("SELECT count(*) FROM pgslotguard.events", &[]).unwrap().get::<_, i64>(0), 0);
    for q in ["SELECT backup_slot_renew('v2_slot', '7 days')", "SELECT backup_slot_release('v2_slot')", "SELECT backup_slot_keep('v2_slot')"] {
        assert_eq!(refusal(&mut v2, q).0, "42704", "{q}");
    }
    assert!(c.slot_exists("v2_slot") && c.leased("v2_slot"));
    c.wait_for("the guard to say the owner is gone", WAIT, |c| {
        c.log().contains("the role that took this lease (\"v2\", OID").then_some(())
    });
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'v2_slot' AND action = 'warn'"), 1);
    c.wait_passes(2);
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'v2_slot' AND action = 'warn'"), 1, "said once");
    // A role that lost REPLICATION may no longer change its lease (core would not let it
    // drop the slot either).
    let mut b = as_role(&c, "backup");
    b.batch_execute("SELECT * FROM backup_slot_lease('b_slot', '1h')").unwrap();
    c.exec("ALTER ROLE backup NOREPLICATION");
    for q in ["SELECT backup_slot_renew('b_slot', '2h')", "SELECT backup_slot_release('b_slot')"] {
        assert_eq!(refusal(&mut b, q).0, "42501", "{q}");
    }
    assert!(c.slot_exists("b_slot") && c.leased("b_slot"));
}

#[test]
fn a_caller_that_may_not_see_a_lease_learns_nothing_of_it() {
    let c = with_extension("sec_leak", &[]);
    c.exec("CREATE ROLE victim LOGIN REPLICATION; CREATE ROLE snoop LOGIN REPLICATION; CREATE ROLE plain LOGIN");
    as_role(&c, "victim").batch_execute("SELECT * FROM backup_slot_lease('vict', '1h')").unwrap();
    let mut s = as_role(&c, "snoop");
    let there = refusal(&mut s, "SELECT backup_slot_renew('vict', '1h')");
    let not_there = refusal(&mut s, "SELECT backup_slot_renew('nosuch', '1h')");
    assert_eq!((there.0.as_str(), there.2.as_deref()), (not_there.0.as_str(), not_there.2.as_deref()));
    assert_eq!(there.1.replace("vict", "X"), not_there.1.replace("nosuch", "X"));
    assert!(!there.1.contains("victim"), "{}", there.1);
    let (code, msg, _) = refusal(&mut s, "SELECT * FROM backup_slot_lease('vict', '1h', adopt => true)");
    assert_eq!(code, "42710");
    assert!(!msg.contains("until") && !msg.contains("victim"), "{msg}");
    // A role without REPLICATION is refused before anything is read, whatever it names.
    let mut p = as_role(&c, "plain");
    assert_eq!(refusal(&mut p, "SELECT backup_slot_renew('vict', '1h')").0, "42501");
    assert_eq!(refusal(&mut p, "SELECT backup_slot_renew('nosuch', '1h')").0, "42501");
}

/// The SQLSTATE and message of `q` with one text parameter, as `client` (a parameter, not
/// a literal: core logs the statement's text, never a parameter's value, by default).
fn refusal_with(client: &mut Client, q: &str, param: &str) -> (String, String) {
    let e = client.query(q, &[&param]).expect_err(q);
    let db = e.as_db_error().unwrap_or_else(|| panic!("{q}: {e}"));
    (db.code().code().to_string(), db.message().to_string())
}

#[test]
fn bad_input_is_refused_short_and_before_it_is_read_when_the_caller_may_not_lease() {
    let c = with_extension("sec_input", &[]);
    c.exec("CREATE ROLE plain LOGIN; CREATE ROLE backup LOGIN REPLICATION");
    let before = c.log_len();
    let huge = format!("{}x", "9".repeat(10 << 20));
    let q = "SELECT * FROM backup_slot_lease('x', '1h', max_retained => $1::text)";
    let mut p = as_role(&c, "plain");
    let (code, msg) = refusal_with(&mut p, q, &huge);
    assert_eq!(code, "42501", "privileges first: {}", &msg[..msg.len().min(200)]);
    let mut b = as_role(&c, "backup");
    let (code, msg) = refusal_with(&mut b, q, &huge);
    assert_eq!(code, "22023");
    assert!(msg.len() < 300, "{} bytes", msg.len());
    let grown = c.log_len() - before;
    assert!(grown < 10_000, "the log grew by {grown} bytes");
    // Control characters in a holder, and a lease's max_xmin_age outside the GUC's range.
    assert_eq!(refusal(&mut b, "SELECT * FROM backup_slot_lease('x', '1h', holder => E'line\\nforged: LOG')").0, "22023");
    let (code, msg, _) = refusal(&mut b, "SELECT * FROM backup_slot_lease('x', '1h', max_xmin_age => 1)");
    assert_eq!(code, "22023", "{msg}");
    assert!(!c.slot_exists("x"));
}

#[test]
fn a_backup_role_cannot_take_every_slot_or_flood_the_event_log() {
    let c = with_extension("sec_dos", &["max_replication_slots = 10", "pgslotguard.max_leases_per_role = 4", "pgslotguard.reserved_slots = 2"]);
    c.exec("CREATE ROLE backup LOGIN REPLICATION");
    let mut b = as_role(&c, "backup");
    for i in 0..4 {
        b.batch_execute(&format!("SELECT * FROM backup_slot_lease('dos_{i}', '7 days')")).unwrap();
    }
    let (code, msg, hint) = refusal(&mut b, "SELECT * FROM backup_slot_lease('dos_4', '7 days')");
    assert_eq!(code, "53400", "{msg}");
    assert!(msg.contains("max_leases_per_role") && hint.is_some(), "{msg}");
    // Four slots in use; the superuser makes five more, and backup releases one: two are
    // left, kept in reserve.
    for i in 0..5 {
        c.exec(&format!("SELECT pg_create_physical_replication_slot('su_{i}')"));
    }
    b.batch_execute("SELECT backup_slot_release('dos_0')").unwrap();
    let (code, msg, _) = refusal(&mut b, "SELECT * FROM backup_slot_lease('dos_5', '7 days')");
    assert_eq!(code, "53400", "{msg}");
    assert!(msg.contains("reserved_slots"), "{msg}");
    c.exec("SELECT * FROM backup_slot_lease('su_lease', '1h')");
    // A renewal loop: the lease always shows the last renewal; the log, one a minute.
    let events = c.count("SELECT count(*) FROM pgslotguard.event_log");
    for _ in 0..300 {
        b.batch_execute("SELECT backup_slot_renew('dos_1', '2h')").unwrap();
    }
    assert!(c.count("SELECT count(*) FROM pgslotguard.event_log") - events <= 1, "{}", c.describe());
    assert_eq!(
        c.text("SELECT (renewed_at > now() - interval '10 seconds')::text FROM pgslotguard.leases WHERE slot_name = 'dos_1'"),
        "true"
    );
}

#[test]
fn database_and_role_settings_never_stop_the_guard() {
    let c = with_extension("sec_settings", &[]);
    c.exec(
        "ALTER DATABASE postgres SET default_transaction_read_only = on;
         ALTER ROLE postgres SET statement_timeout = '1ms';
         ALTER ROLE postgres SET lock_timeout = '1ms';
         ALTER ROLE postgres SET search_path = public;",
    );
    c.restart("fast");
    // The test's own session sets itself back; the guard must do the same for itself.
    let mut s = c.client();
    s.batch_execute("SET default_transaction_read_only = off; SET statement_timeout = 0; SET lock_timeout = 0").unwrap();
    s.batch_execute("SELECT * FROM backup_slot_lease('ro', '1h'); SELECT pgslotguard.test_set_lease_times('ro', NULL, -1)").unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let actions = loop {
        let a: Option<String> = s.query_one("SELECT string_agg(action, ',' ORDER BY id) FROM pgslotguard.events WHERE slot_name = 'ro'", &[]).unwrap().get(0);
        if a.as_deref() == Some("lease,expire_drop") || std::time::Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(actions.as_deref(), Some("lease,expire_drop"), "{}", c.log_tail(20));
    let gone: i64 = s.query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'ro'", &[]).unwrap().get(0);
    assert_eq!(gone, 0);
    assert!(!c.log().contains("cannot execute INSERT in a read-only transaction"), "{}", c.log_tail(20));
    s.batch_execute("ALTER DATABASE postgres RESET ALL; ALTER ROLE postgres RESET ALL").unwrap();
}

#[test]
fn keeping_and_adopting_a_slot_again_never_makes_it_younger() {
    let c = with_extension("sec_age", &["pgslotguard.scope = 'physical'"]);
    c.exec("CREATE ROLE backup LOGIN REPLICATION");
    c.exec("SELECT pg_create_physical_replication_slot('old_one', true)");
    // The guard has seen it for a while (scope = physical: it tracks every physical slot).
    let age = |c: &Cluster| c.text("SELECT extract(epoch FROM age)::int::text FROM pgslotguard.slots WHERE slot_name = 'old_one'").parse::<i64>().unwrap_or(0);
    c.wait_for("the slot to be 3 s old in the guard's eyes", WAIT, |c| (age(c) >= 3).then_some(()));
    let mut b = as_role(&c, "backup");
    b.batch_execute("SELECT * FROM backup_slot_lease('old_one', '1h', adopt => true)").unwrap();
    b.batch_execute("BEGIN; SELECT backup_slot_keep('old_one'); SELECT * FROM backup_slot_lease('old_one', '1h', adopt => true); COMMIT").unwrap();
    assert!(c.leased("old_one"));
    assert!(age(&c) >= 3, "adopting again made the slot younger: {} s", age(&c));
}
