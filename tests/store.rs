//! The per-node store (src/store/): leases survive an immediate stop and a SIGKILL of the
//! postmaster; damaged files are set aside loudly and never cause a drop; a data directory
//! copied by pg_basebackup ends its primary's leases quietly; an open transaction on a
//! lease never holds up the guard, and its renewal fails at commit if the guard dropped
//! the slot meanwhile.

mod common;
use common::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn a_lease_survives_an_immediate_stop_and_a_sigkill_of_the_postmaster() {
    let c = with_extension("crash", &[]);
    c.exec("SELECT * FROM backup_slot_lease('kept', '1h', holder => 'nightly on b2')");
    c.stop("immediate");
    c.pg_ctl_start();
    assert_eq!(c.text("SELECT holder FROM pgslotguard.leases WHERE slot_name = 'kept'"), "nightly on b2", "{}", c.describe());

    // SIGKILL the postmaster right after a lease call returned: no shutdown at all.
    c.exec("SELECT * FROM backup_slot_lease('killed', '1h')");
    c.kill_postmaster_and_start();
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.leases WHERE slot_name IN ('kept', 'killed')"), 2, "{}", c.describe());

    // ... and the guard enforces them.
    c.exec("SELECT pgslotguard.test_set_lease_times('killed', NULL, -1)");
    c.wait_for("the guard to drop the expired lease's slot", WAIT, |c| c.dropped("killed").then_some(()));
    assert!(c.slot_exists("kept"));
}

/// Write `bytes` over the store file of `slot`, as root or postgres (the test's user).
fn damage(c: &Cluster, slot: &str, f: impl FnOnce(&mut Vec<u8>)) {
    let path = c.data.join("pg_slotguard/slots").join(slot);
    let mut b = std::fs::read(&path).unwrap();
    f(&mut b);
    std::fs::write(&path, b).unwrap();
}

#[test]
fn a_damaged_store_file_is_set_aside_with_a_warning_and_its_slot_is_never_dropped() {
    let c = with_extension("damage", &[]);
    for s in ["good", "flipped", "cut", "future"] {
        c.exec(&format!("SELECT * FROM backup_slot_lease('{s}', '1h')"));
    }
    c.stop("fast");
    damage(&c, "flipped", |b| *b.last_mut().unwrap() ^= 0x20);
    damage(&c, "cut", |b| b.truncate(b.len() / 2));
    damage(&c, "future", |b| b[4] = 9);
    c.pg_ctl_start();
    c.wait_passes(2);

    let log = c.log();
    for (slot, why) in [("flipped", "bad-checksum"), ("cut", "truncated"), ("future", "unknown-version")] {
        let moved = c.data.join("pg_slotguard/slots").join(format!("{slot}.{why}"));
        assert!(moved.exists(), "{slot} was not moved aside to {}\n{}", moved.display(), c.log_tail(20));
        assert!(log.contains(&format!("WARNING:  pgslotguard: store file \"pg_slotguard/slots/{slot}\" is damaged")), "{}", c.log_tail(20));
        assert!(c.slot_exists(slot), "the slot of damaged lease {slot} was dropped\n{}", c.describe());
    }
    assert!(log.contains("checksum mismatch") && log.contains("unsupported version 9"), "{}", c.log_tail(20));
    // Not leased, so out of the default scope: untouched, and shown as such.
    assert_eq!(c.text("SELECT string_agg(slot_name::text, ',' ORDER BY slot_name) FROM pgslotguard.leases"), "good");
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.slots WHERE slot_name IN ('flipped', 'cut', 'future') AND NOT leased AND next_action = 'none'"), 3);
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.events WHERE action LIKE '%drop'"), 0, "{}", c.describe());
}

#[test]
fn a_data_directory_copied_by_pg_basebackup_ends_its_primarys_leases_quietly() {
    let c = with_extension("copied", &[]);
    c.exec("SELECT * FROM backup_slot_lease('nightly', '1h'); SELECT * FROM backup_slot_lease('weekly', '1h')");
    let copy = Cluster::from_base_backup(&c, "copy", false, None);
    copy.pg_ctl_start();
    let log = copy.wait_for("the copy's startup to end the leases", WAIT, |cp| {
        let log = cp.log();
        log.contains("ended 2 lease(s) whose replication slot is not on this server: nightly, weekly").then_some(log)
    });
    assert!(log.contains("the data directory was copied from another server"), "{log}");
    copy.wait_passes(2);
    assert_eq!(copy.count("SELECT count(*) FROM pgslotguard.leases"), 0);
    // quietly: no event per lease (the copied table has the primary's 'lease' events only)
    assert_eq!(copy.count("SELECT count(*) FROM pgslotguard.events WHERE action NOT IN ('lease')"), 0, "{}", copy.describe());
    assert!(!log.contains("dropped outside pgslotguard"), "{log}");
    // the primary keeps its leases and slots
    assert_eq!(c.count("SELECT count(*) FROM pgslotguard.leases WHERE state = 'ok'"), 2, "{}", c.describe());
    copy.stop("fast");
}

/// Issue 25 item 2: a lease call held open in a transaction used to hold a lock the guard
/// needed, and the guard skipped the slot while its WAL filled the disk. Now nothing a user
/// holds stalls the guard: the hard limit drops the slot while the renewal is still open,
/// and the renewal then fails at commit, saying why. Names that shared a lock key before
/// (the key was a 32-bit hash: 'zzafbjmh9' collided with 'nightly') no longer meet at all.
#[test]
fn an_open_transaction_on_a_lease_never_holds_up_the_guard() {
    let c = with_extension("opentx", &[]);
    c.exec("CHECKPOINT");
    c.exec(
        "SELECT * FROM backup_slot_lease('held', '1h', max_retained => '24MB');
         SELECT * FROM backup_slot_lease('nightly', '1h'); SELECT * FROM backup_slot_lease('zzafbjmh9', '1h')",
    );
    let mut other = c.client();
    other.batch_execute("BEGIN; SELECT backup_slot_renew('held', '2h'); SELECT backup_slot_renew('zzafbjmh9', '2h');").unwrap();

    // 'nightly' expires while the other session holds its renewal of 'zzafbjmh9' open: a
    // guard held up by it would wait for its commit, past the poll's deadline.
    c.exec("SELECT pgslotguard.test_set_lease_times('nightly', NULL, -1)");
    c.wait_for("the guard to drop the expired slot beside an open transaction", WAIT, |c| c.dropped("nightly").then_some(()));

    // 'held' crosses the hard limit while its renewal is open: dropped all the same.
    c.make_wal(40);
    c.wait_for("the guard to drop the slot over its limit beside an open renewal", WAIT, |c| c.dropped("held").then_some(()));
    assert_eq!(c.text("SELECT action FROM pgslotguard.events WHERE slot_name = 'held' ORDER BY id DESC LIMIT 1"), "retained_drop");

    let err = other.batch_execute("COMMIT").unwrap_err();
    let db = err.as_db_error().expect("a server error at commit");
    assert!(
        db.message().contains("the lease of replication slot \"held\" changed before this transaction committed"),
        "{db:?}"
    );
    assert!(db.hint().is_some());
    // The whole transaction rolled back: the other renewal was not applied either.
    assert_eq!(c.text("SELECT (expires_at < now() + interval '90 min')::text FROM pgslotguard.leases WHERE slot_name = 'zzafbjmh9'"), "true");
    assert!(c.slot_exists("zzafbjmh9"));
}

/// Shared memory keeps its entries packed where they are freed and reused, and readers
/// stop after the last entry in use: whatever the order of leases and releases, every
/// lease is seen, by the views and by the guard, which enforces the last one taken.
#[test]
fn leases_released_out_of_order_leave_every_other_lease_seen_and_enforced() {
    let c = with_extension("entries", &[]);
    let leases = |c: &Cluster| {
        c.text("SELECT coalesce(string_agg(slot_name, ',' ORDER BY slot_name), '') FROM pgslotguard.leases")
    };
    for s in ["a", "b", "c", "d"] {
        c.exec(&format!("SELECT * FROM backup_slot_lease('{s}', '1h')"));
    }
    // The last entry, then one in the middle: the used part shrinks past the first only.
    c.exec("SELECT backup_slot_release('d')");
    c.exec("SELECT backup_slot_release('b')");
    assert_eq!(leases(&c), "a,c");
    // New leases fill the hole, then grow the used part again.
    c.exec("SELECT * FROM backup_slot_lease('e', '1h')");
    c.exec("SELECT * FROM backup_slot_lease('f', '1h')");
    assert_eq!(leases(&c), "a,c,e,f");
    // Free the entries above and below a: a is still the first and only one in use.
    for s in ["c", "e", "f"] {
        c.exec(&format!("SELECT backup_slot_release('{s}')"));
    }
    assert_eq!(leases(&c), "a");
    c.exec("SELECT * FROM backup_slot_lease('g', '1h')");
    assert_eq!(leases(&c), "a,g");
    // The guard reads the same entries: it enforces g, the last one taken, and keeps a.
    c.exec("SELECT pgslotguard.test_set_lease_times('g', NULL, -1)");
    c.wait_for("the guard to drop g's expired slot", WAIT, |c| {
        (!c.slot_exists("g")).then_some(())
    });
    assert_eq!(leases(&c), "a", "{}", c.describe());
    assert!(c.slot_exists("a"));
    for s in ["b", "c", "d", "e", "f"] {
        assert!(!c.slot_exists(s), "{s}");
    }
}
