//! Warnings before a limit and every event as a notification: a real LISTEN client gets
//! the JSON of a lease, its warning and its drop, in order; a warning is given once per
//! crossing, even across a restart of the worker.

mod common;
use common::*;
use fallible_iterator::FallibleIterator;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Notifications on channel pgslotguard until `last` arrives (or the wait runs out).
fn listen_until(l: &mut postgres::Client, last: &str, within: Duration) -> Vec<(String, Value)> {
    let deadline = Instant::now() + within;
    let mut got = vec![];
    while Instant::now() < deadline {
        let mut n = l.notifications();
        let mut it = n.timeout_iter(Duration::from_millis(200));
        while let Some(note) = it.next().unwrap() {
            assert_eq!(note.channel(), "pgslotguard");
            let v: Value = serde_json::from_str(note.payload()).unwrap_or_else(|e| panic!("{e}: {}", note.payload()));
            let action = v["action"].as_str().unwrap_or_default().to_string();
            got.push((note.payload().to_string(), v));
            if action == last {
                return got;
            }
        }
    }
    panic!("no {last} notification within {within:?}; got {:?}", got.iter().map(|g| &g.1["action"]).collect::<Vec<_>>());
}

#[test]
fn a_listener_gets_the_lease_its_warning_and_its_drop_as_json_in_order() {
    let c = with_extension("notify", &["pgslotguard.warn_fraction = 0.5", "pgslotguard.notify_payload = full"]);
    let mut l = c.client();
    l.batch_execute("LISTEN pgslotguard").unwrap();

    // A lease rolled back notifies nothing.
    let mut b = c.client();
    let mut tx = b.transaction().unwrap();
    tx.batch_execute("SELECT backup_slot_lease('rolled_back', '1h')").unwrap();
    tx.rollback().unwrap();

    // The longest holder there may be: the payload still fits.
    let holder = "h".repeat(1024);
    b.execute("SELECT backup_slot_lease('n1', '4s', holder => $1)", &[&holder]).unwrap();
    let got = listen_until(&mut l, "expire_drop", Duration::from_secs(30));
    let actions: Vec<&str> = got.iter().map(|(_, v)| v["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["lease", "warn", "expire_drop"], "{got:#?}");

    let ids: Vec<i64> = got.iter().map(|(_, v)| v["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    for (payload, v) in &got {
        assert!(payload.len() < 8000, "{} bytes", payload.len());
        assert_eq!(v["schema"], 1);
        assert_eq!(v["slot"], "n1");
        assert_eq!(v["holder"].as_str(), Some(holder.as_str()), "{payload}");
        assert_eq!(v["owner"], "postgres");
        assert!(v["at"].as_str().unwrap().ends_with('Z'));
        // the same event as pgslotguard.events shows
        let row = c.sql(&format!("SELECT action, reason, actor FROM pgslotguard.events WHERE id = {}", v["id"]));
        assert_eq!(row[0].get::<_, String>(0), v["action"].as_str().unwrap());
        assert_eq!(row[0].get::<_, String>(1), v["reason"].as_str().unwrap());
        assert_eq!(row[0].get::<_, String>(2), v["actor"].as_str().unwrap());
    }
    let warn = &got[1].1;
    assert!(warn["reason"].as_str().unwrap().contains("unless renewed"), "{warn}");
    assert_eq!(got[2].1["actor"], "worker");
    assert!(got[2].1["retained_bytes"].is_i64());
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'rolled_back'"), 0);
}

/// The query the documentation gives a listener to check a notification with ("Check every
/// notification before acting on it", doc/monitoring.md), as it stands there, without its
/// semicolon.
fn readme_check() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/doc/monitoring.md")).unwrap();
    let from = readme.find("**Check every notification").expect("doc/monitoring.md's notification check");
    let block = &readme[from..];
    let sql = &block[block.find("```sql").expect("its SQL block") + 6..];
    let sql = sql[..sql.find("```").unwrap()].trim();
    sql.trim_end_matches(';').to_string()
}

/// By default a notification names the event and nothing it says: a role that may not
/// read another's events learns nothing from LISTEN that pg_replication_slots would not
/// tell it. Anyone may NOTIFY on the channel, so the README tells a listener to check each
/// notification with a query, as a role that sees the events: every notification
/// pgslotguard sends passes that check, run as a pg_monitor role. (That a forged one fails
/// it is a property of the query, not of pgslotguard's code: the forged half this test
/// had exercised nothing of ours, and went.)
#[test]
fn by_default_a_notification_leaks_nothing_and_each_passes_the_readme_check() {
    let c = with_extension("notifymin", &[]);
    c.exec("CREATE ROLE nosy LOGIN; CREATE ROLE pager LOGIN IN ROLE pg_monitor;");
    let mut nosy = c.connect_as("nosy");
    nosy.batch_execute("LISTEN pgslotguard").unwrap();

    c.exec("SELECT backup_slot_lease('payroll', '2s', holder => 'payroll host 10.1.2.3 ticket SEC-42')");
    let got = listen_until(&mut nosy, "expire_drop", Duration::from_secs(30));
    let actions: Vec<&str> = got.iter().map(|(_, v)| v["action"].as_str().unwrap_or_default()).collect();
    assert_eq!(actions, ["lease", "expire_drop"], "{got:?}");
    for (payload, v) in &got {
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["action", "at", "id", "schema", "slot"], "{payload}");
        assert_eq!(v["schema"], 2);
        assert!(!payload.contains("10.1.2.3") && !payload.contains("postgres"), "{payload}");
    }
    assert_eq!(
        nosy.query_one("SELECT count(*) FROM pgslotguard.events", &[]).unwrap().get::<_, i64>(0),
        0,
        "the events view hides other roles' events from nosy"
    );

    // The README's check, as a role that sees the events: each notification is the event
    // of its id, with its action and slot.
    let check = readme_check();
    let mut pager = c.connect_as("pager");
    for (payload, v) in &got {
        let (id, action, slot) = (v["id"].as_i64().unwrap(), v["action"].as_str().unwrap(), v["slot"].as_str());
        let rows = pager.query(check.as_str(), &[&id, &action, &slot]).unwrap_or_else(|e| panic!("{check}: {e}"));
        assert_eq!(rows.len(), 1, "the README's check refused pgslotguard's own notification {payload}\n{}", c.describe());
        assert_eq!(rows[0].get::<_, String>("holder"), "payroll host 10.1.2.3 ticket SEC-42", "{payload}");
    }
}

#[test]
fn a_warning_is_given_once_per_crossing_even_across_a_worker_restart() {
    let c = with_extension("warnonce", &["pgslotguard.warn_fraction = 0.2"]);
    c.exec("SELECT backup_slot_lease('w1', '20s')");
    let warns = |c: &Cluster| c.count("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'w1' AND action = 'warn'");
    c.wait_for("the warning at a fifth of the term", WAIT, |c| (warns(c) == 1).then_some(()));
    assert_eq!(c.text("SELECT state FROM pgslotguard.leases WHERE slot_name = 'w1'"), "expiring");
    assert!(c.log().contains("replication slot \"w1\": lease expires in"), "{}", c.log_tail(20));

    // The worker restarts (a stray SIGTERM; the postmaster starts it again): no second warning.
    let old = c.worker_pid().expect("worker");
    c.exec(&format!("SELECT pg_terminate_backend({old})"));
    let passes = c.wait_for("the worker to come back", WAIT, |c| {
        c.worker_pid().filter(|&p| p != old).map(|_| c.count("SELECT passes FROM pgslotguard.status"))
    });
    c.wait_for("two passes of the new worker", WAIT, |c| (c.count("SELECT passes FROM pgslotguard.status") >= passes + 2).then_some(()));
    assert_eq!(warns(&c), 1, "a restarted worker warned again");

    // Renewed: the term starts again, the warning re-arms, and comes again at a fifth.
    c.exec("SELECT backup_slot_renew('w1', '20s')");
    c.wait_for("the warning to re-arm", WAIT, |c| (c.count("SELECT count(*) FROM pgslotguard.tracking WHERE cardinality(warned) > 0") == 0).then_some(()));
    c.wait_for("the second warning", WAIT, |c| (warns(c) == 2).then_some(()));
    c.exec("SELECT backup_slot_release('w1')");
}
