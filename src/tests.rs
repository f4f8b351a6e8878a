//! `#[pg_test]`s: the SQL surface, inside the pgrx test cluster (pgslotguard preloaded,
//! worker running in database pgrx_tests). Each test runs in a transaction that is rolled
//! back, so errors are caught with a PL/pgSQL helper that runs the statement in a
//! subtransaction and returns its SQLSTATE.

use pgrx::prelude::*;

/// Test hooks, built only with the pg_test feature (never into a package): the tests move
/// a lease's times instead of waiting for them.
#[pg_schema]
mod pgslotguard {
    use pgrx::prelude::*;

    /// Make the lease of `slot_name` taken `leased_ago_s` seconds ago (NULL: when it was)
    /// and expiring in `expires_in_s` seconds (negative: in the past), as a renewal of
    /// this transaction would: applied at commit.
    #[pg_extern(volatile)]
    fn test_set_lease_times(slot_name: &str, leased_ago_s: Option<f64>, expires_in_s: f64) {
        let now = crate::state::now_us();
        let mut decide = |lease: Option<&crate::store::LeaseRec>, _: &crate::store::SlotRecord| {
            let lease = lease.ok_or_else(|| crate::error::GuardError::NoLease(slot_name.into()))?;
            let leased_at = leased_ago_s.map_or(lease.leased_at, |s| now - (s * 1e6) as i64);
            Ok(crate::machine::Change::Renew(crate::store::LeaseRec {
                leased_at,
                born_at: Some(leased_at),
                renewed_at: None,
                expires_at: now + (expires_in_s * 1e6) as i64,
                ..lease.clone()
            }))
        };
        crate::error::or_report(crate::state::as_owner(|| {
            crate::machine::change(slot_name, &mut decide, &mut crate::xact::remember).map(|_| ())
        }));
    }
}

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn run(sql: &str) {
        Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn one<T: IntoDatum + FromDatum>(sql: &str) -> Option<T> {
        Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    fn text(sql: &str) -> String {
        one::<String>(sql).unwrap_or_default()
    }

    fn helpers() {
        run(r#"
            CREATE OR REPLACE FUNCTION pg_temp.sqlstate_of(q text) RETURNS text LANGUAGE plpgsql AS $$
            BEGIN
                EXECUTE q;
                RETURN '00000';
            EXCEPTION WHEN OTHERS THEN
                RETURN SQLSTATE;
            END $$;
            CREATE OR REPLACE FUNCTION pg_temp.error_of(q text) RETURNS text LANGUAGE plpgsql AS $$
            DECLARE m text; h text;
            BEGIN
                EXECUTE q;
                RETURN NULL;
            EXCEPTION WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, h = PG_EXCEPTION_HINT;
                RETURN SQLSTATE || ': ' || m || ' HINT: ' || h;
            END $$;
        "#);
    }

    /// Everything a failed call must leave as it was: slots, leases, events.
    fn world(q: &str) -> String {
        // Read as the session user (a test may have switched to a role that cannot read the
        // tables), then switch back.
        let role = text("SELECT current_user::text");
        let session = text("SELECT session_user::text");
        run("RESET ROLE");
        let w = text(&format!(
            "SELECT COALESCE((SELECT string_agg(slot_name || ':' || slot_type, ',' ORDER BY slot_name) FROM pg_replication_slots
                                    WHERE position(slot_name::text in $q$ {q} $q$) > 0), '')
                 || ' | ' || COALESCE((SELECT string_agg(slot_name || '@' || expires_at::text || '#' || owner::text, ',' ORDER BY slot_name) FROM pgslotguard.leases), '')
                 || ' | ' || (SELECT count(*) FROM pgslotguard.event_log)::text",
            q = q.replace("$q$", "")
        ));
        if role != session {
            run(&format!("SET ROLE {}", pgrx::spi::quote_identifier(&role)));
        }
        w
    }

    /// Run `q`, expect SQLSTATE `code`, and that nothing changed.
    fn expect_error(q: &str, code: &str) {
        let before = world(q);
        let got = text(&format!("SELECT pg_temp.error_of({})", pgrx::spi::quote_literal(q)));
        assert!(got.starts_with(code), "{q}: expected SQLSTATE {code}, got {got:?}");
        // 22007 comes from PostgreSQL's interval input, before pgslotguard runs: no HINT there.
        if code != "22007" {
            assert!(got.contains("HINT: ") && !got.ends_with("HINT: "), "{q}: no HINT in {got:?}");
        }
        assert_eq!(world(q), before, "{q} changed slots, leases or events");
    }

    fn slot_exists(name: &str) -> bool {
        one::<bool>(&format!(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {})",
            pgrx::spi::quote_literal(name)
        ))
        .unwrap_or(false)
    }

    #[pg_test]
    fn lease_creates_physical_slot_with_wal_reserved() {
        run("SELECT * FROM backup_slot_lease('nightly', '2h')");
        assert!(slot_exists("nightly"));
        assert_eq!(text("SELECT slot_type FROM pg_replication_slots WHERE slot_name = 'nightly'"), "physical");
        assert!(one::<bool>("SELECT restart_lsn IS NOT NULL FROM pg_replication_slots WHERE slot_name = 'nightly'").unwrap());
        assert_eq!(text("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'nightly'"), "reserved");
        assert!(!one::<bool>("SELECT temporary FROM pg_replication_slots WHERE slot_name = 'nightly'").unwrap());
        let exp = one::<bool>(
            "SELECT abs(extract(epoch FROM expires_at - (now() + interval '2h'))) < 1 FROM pgslotguard.leases WHERE slot_name = 'nightly'",
        );
        assert_eq!(exp, Some(true));
        assert_eq!(text("SELECT state FROM pgslotguard.leases WHERE slot_name = 'nightly'"), "ok");
        assert_eq!(
            text("SELECT action || '/' || actor FROM pgslotguard.events WHERE slot_name = 'nightly'"),
            "lease/postgres"
        );
    }

    #[pg_test]
    fn lease_returns_the_reserved_lsn_and_expiry() {
        run("CREATE TEMP TABLE got AS SELECT * FROM backup_slot_lease('r1', '10 minutes', 'host b2')");
        let ok = one::<bool>(
            "SELECT l.lsn = s.restart_lsn AND l.slot_name = 'r1' AND l.expires_at > now()
               FROM got l JOIN pg_replication_slots s ON s.slot_name = l.slot_name",
        );
        assert_eq!(ok, Some(true));
        assert_eq!(text("SELECT holder FROM pgslotguard.leases WHERE slot_name = 'r1'"), "host b2");
    }

    #[pg_test]
    fn default_ttl_applies_when_ttl_is_null() {
        run("SET pgslotguard.default_ttl = '15min'");
        run("SELECT * FROM backup_slot_lease('d1')");
        let ok = one::<bool>(
            "SELECT abs(extract(epoch FROM expires_at - now()) - 900) < 2 FROM pgslotguard.leases WHERE slot_name = 'd1'",
        );
        assert_eq!(ok, Some(true));
    }

    #[pg_test]
    fn renew_pushes_expiry_and_records_event() {
        run("SELECT * FROM backup_slot_lease('rn', '1min')");
        let t = one::<bool>("SELECT backup_slot_renew('rn', '3h') > now() + interval '2h 59min'");
        assert_eq!(t, Some(true));
        assert_eq!(
            text("SELECT string_agg(action, ',' ORDER BY id) FROM pgslotguard.events WHERE slot_name = 'rn'"),
            "lease,renew"
        );
        assert!(one::<bool>("SELECT renewed_at IS NOT NULL FROM pgslotguard.leases WHERE slot_name = 'rn'").unwrap());
    }

    /// What a release does inside its transaction: the lease ends at once, the slot stays
    /// until the release commits (this test's transaction never does; tests/lease.rs
    /// commits one and sees the slot go).
    #[pg_test]
    fn release_ends_the_lease_and_leaves_the_drop_to_its_commit() {
        run("SELECT * FROM backup_slot_lease('rel', '1h')");
        assert_eq!(one::<bool>("SELECT backup_slot_release('rel')"), Some(true));
        assert!(slot_exists("rel"), "dropped before commit");
        assert_eq!(one::<i64>("SELECT count(*) FROM pgslotguard.leases WHERE slot_name = 'rel'"), Some(0));
        assert_eq!(
            text("SELECT string_agg(action, ',' ORDER BY id) FROM pgslotguard.events WHERE slot_name = 'rel'"),
            "lease,release"
        );
    }

    #[pg_test]
    fn keep_ends_lease_and_keeps_slot() {
        run("SELECT * FROM backup_slot_lease('kp', '1h')");
        assert_eq!(one::<bool>("SELECT backup_slot_keep('kp')"), Some(true));
        assert!(slot_exists("kp"));
        assert_eq!(one::<i64>("SELECT count(*) FROM pgslotguard.leases WHERE slot_name = 'kp'"), Some(0));
        assert_eq!(text("SELECT action FROM pgslotguard.events WHERE slot_name = 'kp' ORDER BY id DESC LIMIT 1"), "keep");
        run("SELECT pg_drop_replication_slot('kp')");
    }

    #[pg_test]
    fn adopt_puts_existing_slot_under_lease() {
        run("SELECT pg_create_physical_replication_slot('made_by_basebackup', true)");
        helpers();
        expect_error("SELECT * FROM backup_slot_lease('made_by_basebackup', '1h')", "42710");
        run("SELECT * FROM backup_slot_lease('made_by_basebackup', '1h', adopt => true)");
        assert!(one::<bool>("SELECT adopted FROM pgslotguard.leases WHERE slot_name = 'made_by_basebackup'").unwrap());
        assert!(text("SELECT reason FROM pgslotguard.events WHERE slot_name = 'made_by_basebackup'").starts_with("adopted"));
    }

    #[pg_test]
    fn lease_rolled_back_in_savepoint_leaves_no_slot() {
        helpers();
        // An error after the slot was made (the holder breaks the table's rules only through a
        // failing statement later in the same subtransaction) rolls the slot back too.
        run(r#"DO $$ BEGIN
                 PERFORM backup_slot_lease('rb1', '1h');
                 RAISE EXCEPTION 'backup script failed';
               EXCEPTION WHEN OTHERS THEN NULL; END $$"#);
        assert!(!slot_exists("rb1"), "slot of a rolled-back lease survived");
        assert_eq!(one::<i64>("SELECT count(*) FROM pgslotguard.leases WHERE slot_name = 'rb1'"), Some(0));
        // nested: made in an inner block that committed into an outer one that rolled back
        run(r#"DO $$ BEGIN
                 BEGIN
                   BEGIN PERFORM backup_slot_lease('rb2', '1h'); END;
                   RAISE EXCEPTION 'outer failure';
                 EXCEPTION WHEN OTHERS THEN NULL; END;
               END $$"#);
        assert!(!slot_exists("rb2"), "slot of a rolled-back outer block survived");
        // and a lease that commits in its block stays
        run(r#"DO $$ BEGIN BEGIN PERFORM backup_slot_lease('rb3', '1h'); END; END $$"#);
        assert!(slot_exists("rb3"));
    }

    #[pg_test]
    fn bad_input_gets_sqlstate_hint_and_changes_nothing() {
        // (adopting a logical slot is in tests/lease.rs: a logical slot cannot be made in
        // the transaction a #[pg_test] runs in)
        helpers();
        run("SELECT * FROM backup_slot_lease('taken', '1h')");
        let long = "x".repeat(64);
        let cases: Vec<(String, &str)> = vec![
            ("SELECT backup_slot_lease(NULL)".into(), "22004"),
            ("SELECT backup_slot_lease('')".into(), "42602"),
            (format!("SELECT backup_slot_lease('{long}')"), "42622"),
            ("SELECT backup_slot_lease('Upper')".into(), "42602"),
            ("SELECT backup_slot_lease('a''b')".into(), "42602"),
            ("SELECT backup_slot_lease('a b')".into(), "42602"),
            ("SELECT backup_slot_lease('; drop table x')".into(), "42602"),
            ("SELECT backup_slot_lease('ünï')".into(), "42602"),
            ("SELECT backup_slot_lease('t0', '0')".into(), "22023"),
            ("SELECT backup_slot_lease('t0', '-1 hour')".into(), "22023"),
            ("SELECT backup_slot_lease('t0', '1000 years')".into(), "22023"),
            ("SELECT backup_slot_lease('t0', 'soon')".into(), "22007"),
            ("SELECT backup_slot_lease('t0', '1h', max_retained => '-1')".into(), "22023"),
            ("SELECT backup_slot_lease('t0', '1h', max_retained => '0')".into(), "22023"),
            ("SELECT backup_slot_lease('t0', '1h', max_retained => '10XB')".into(), "22023"),
            ("SELECT backup_slot_lease('t0', '1h', max_retained => '99999999999PB')".into(), "22023"),
            (format!("SELECT backup_slot_lease('t0', '1h', holder => '{}')", "h".repeat(100_000)), "22001"),
            ("SELECT backup_slot_lease('missing', '1h', adopt => true)".into(), "42704"),
            ("SELECT backup_slot_lease('taken', '1h')".into(), "42710"),
            ("SELECT backup_slot_lease('taken', '1h', adopt => true)".into(), "42710"),
            ("SELECT backup_slot_renew('nolease')".into(), "42704"),
            ("SELECT backup_slot_renew('taken', '0')".into(), "22023"),
            ("SELECT backup_slot_renew('taken', '1000 years')".into(), "22023"),
            ("SELECT backup_slot_renew(NULL)".into(), "22004"),
            // max_ttl (7d) counts the resulting expiry, not months as 30 days
            ("SELECT backup_slot_lease('t8', '1000 months -29993 days')".into(), "22023"),
            ("SELECT backup_slot_renew('taken', '1000 months -29993 days')".into(), "22023"),
            ("SELECT backup_slot_renew('taken', '-1 day 12:00:00')".into(), "22023"),
            ("SELECT backup_slot_lease('t9', '71000000 months -2129999993 days')".into(), "22023"),
            ("SELECT backup_slot_renew('taken', '-2129999993 days 71000000 months')".into(), "22023"),
            ("SELECT backup_slot_release('nolease')".into(), "42704"),
            ("SELECT backup_slot_release('Bad')".into(), "42602"),
            ("SELECT backup_slot_keep('nolease')".into(), "42704"),
            ("SELECT backup_slot_keep(NULL)".into(), "22004"),
        ];
        for (q, code) in &cases {
            expect_error(q, code);
        }
        // a slot dropped behind our back
        run("SELECT pg_drop_replication_slot('taken')");
        for q in ["SELECT backup_slot_renew('taken')", "SELECT backup_slot_release('taken')", "SELECT backup_slot_keep('taken')"] {
            expect_error(q, "42704");
        }
    }

    #[pg_test]
    fn error_messages_name_the_slot_and_the_limit() {
        helpers();
        run("SET pgslotguard.default_ttl = '1h'");
        let e = text("SELECT pg_temp.error_of($$SELECT backup_slot_lease('big', '30 days')$$)");
        assert!(e.contains("\"big\"") && e.contains("pgslotguard.max_ttl (7d 00h)"), "{e}");
        run("SELECT * FROM backup_slot_lease('dup', '1h')");
        let e = text("SELECT pg_temp.error_of($$SELECT backup_slot_lease('dup')$$)");
        assert!(e.contains("\"dup\" is already leased until "), "{e}");
    }

    #[pg_test]
    fn roles_without_replication_cannot_lease() {
        helpers();
        run("CREATE ROLE sg_plain LOGIN");
        run("SET ROLE sg_plain");
        expect_error("SELECT backup_slot_lease('mine', '1h')", "42501");
        run("RESET ROLE");
        assert!(!slot_exists("mine"));
    }

    #[pg_test]
    fn lessee_cannot_touch_anothers_lease_but_superuser_can() {
        helpers();
        run("CREATE ROLE sg_alice LOGIN REPLICATION");
        run("CREATE ROLE sg_bob LOGIN REPLICATION");
        run("SET ROLE sg_alice");
        run("SELECT * FROM backup_slot_lease('alice_slot', '1h')");
        assert_eq!(text("SELECT owner::text FROM pgslotguard.leases WHERE slot_name = 'alice_slot'"), "sg_alice");
        run("SET ROLE sg_bob");
        for q in [
            "SELECT backup_slot_renew('alice_slot', '2h')",
            "SELECT backup_slot_release('alice_slot')",
            "SELECT backup_slot_keep('alice_slot')",
        ] {
            // bob may not see alice's lease: he is answered as if there were none
            let before = world(q);
            let got = text(&format!("SELECT pg_temp.sqlstate_of({})", pgrx::spi::quote_literal(q)));
            assert_eq!(got, "42704", "{q}");
            assert_eq!(world(q), before);
        }
        // bob does not even see alice's lease or its events
        assert_eq!(one::<i64>("SELECT count(*) FROM pgslotguard.leases"), Some(0));
        assert_eq!(one::<i64>("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'alice_slot'"), Some(0));
        // bob may not read the tables directly either
        assert_eq!(text("SELECT pg_temp.sqlstate_of('SELECT * FROM pgslotguard.tracking')"), "42501");
        run("SET ROLE sg_alice");
        assert_eq!(one::<i64>("SELECT count(*) FROM pgslotguard.events WHERE slot_name = 'alice_slot'"), Some(1));
        run("SELECT backup_slot_renew('alice_slot', '2h')");
        run("RESET ROLE");
        assert_eq!(one::<bool>("SELECT backup_slot_release('alice_slot')"), Some(true));
        assert_eq!(
            text("SELECT string_agg(action || '/' || actor, ',' ORDER BY id) FROM pgslotguard.events WHERE slot_name = 'alice_slot'"),
            "lease/sg_alice,renew/sg_alice,release/postgres"
        );
    }

    /// With no global limit set, any per-lease limit is a lowering of "no limit": a role
    /// that is not a superuser may give one. (The refusal of a limit above a global one
    /// needs that global one set, which pgslotguard.max_retained_wal, PGC_SIGHUP, cannot be
    /// inside this test's transaction: tests/hardening.rs and tests/lease.rs test it.)
    #[pg_test]
    fn a_non_superuser_may_give_any_lease_limit_while_no_global_one_is_set() {
        helpers();
        run("CREATE ROLE sg_rep LOGIN REPLICATION");
        assert_eq!(text("SHOW pgslotguard.max_retained_wal"), "-1", "the premise: no global limit");
        run("SET ROLE sg_rep");
        run("SELECT * FROM backup_slot_lease('capped', '1h', max_retained => '50GB')");
        run("RESET ROLE");
        assert_eq!(one::<i64>("SELECT max_retained_bytes FROM pgslotguard.leases WHERE slot_name = 'capped'"), Some(50 << 30));
    }

    #[pg_test]
    fn per_lease_time_limits_must_be_positive_and_show_in_leases() {
        helpers();
        expect_error("SELECT * FROM backup_slot_lease('np1', '1h', max_inactive => '-1 s')", "22023");
        expect_error("SELECT * FROM backup_slot_lease('np2', '1h', max_age => '0')", "22023");
        expect_error("SELECT * FROM backup_slot_lease('np3', '1h', max_age => '1 day -24 hours')", "22023");
        run("SELECT * FROM backup_slot_lease('own', '1h', max_inactive => '90 s', max_age => '1 day')");
        assert_eq!(text("SELECT max_inactive::text || ' ' || max_age::text FROM pgslotguard.leases WHERE slot_name = 'own'"), "00:01:30 24:00:00");
        assert!(text("SELECT reason FROM pgslotguard.events WHERE slot_name = 'own'").contains("max_inactive 1m 30s"));
    }

    #[pg_test]
    fn malicious_search_path_objects_cannot_hijack() {
        helpers();
        run("CREATE ROLE sg_evil LOGIN REPLICATION");
        run("CREATE SCHEMA evil AUTHORIZATION sg_evil");
        run("SET ROLE sg_evil");
        // a shadowing operator and function that would log the caller's identity if called
        run(r#"CREATE TABLE evil.calls (who text, at timestamptz DEFAULT now())"#);
        run(r#"CREATE FUNCTION evil.name_eq(name, name) RETURNS boolean LANGUAGE sql AS
               $$ INSERT INTO evil.calls(who) VALUES (current_user); SELECT $1::text = $2::text $$"#);
        run("CREATE OPERATOR evil.= (LEFTARG = name, RIGHTARG = name, FUNCTION = evil.name_eq)");
        run(r#"CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS
               $$ INSERT INTO evil.calls(who) VALUES (current_user) RETURNING now() $$"#);
        run(r#"CREATE FUNCTION evil.pg_size_pretty(bigint) RETURNS text LANGUAGE sql AS
               $$ INSERT INTO evil.calls(who) VALUES (current_user) RETURNING 'x' $$"#);
        run("SET search_path = evil, pg_catalog, public");
        run("SELECT * FROM public.backup_slot_lease('evil_slot', '1h')");
        run("SELECT public.backup_slot_renew('evil_slot', '2h')");
        run("SELECT count(*) FROM pgslotguard.leases");
        run("SELECT public.backup_slot_release('evil_slot')");
        assert_eq!(one::<i64>("SELECT count(*) FROM evil.calls"), Some(0), "a shadowing object was called");
        run("RESET search_path");
        run("RESET ROLE");
    }

    #[pg_test]
    fn views_show_state_and_pretty_sizes() {
        run("SELECT * FROM backup_slot_lease('v1', '1h', max_retained => '1GB')");
        let row = text(
            "SELECT state || '|' || (retained_bytes >= 0)::text || '|' || max_retained || '|' || (expires_in > '59 min')::text
               FROM pgslotguard.leases WHERE slot_name = 'v1'",
        );
        assert_eq!(row, "ok|true|1024 MB|true");
        let s = text(
            "SELECT in_scope::text || '|' || scope_reason || '|' || next_action FROM pgslotguard.slots WHERE slot_name = 'v1'",
        );
        assert_eq!(s, "true|leased|none");
        run("SELECT pg_create_physical_replication_slot('standby1')");
        let s = text("SELECT in_scope::text || '|' || scope_reason FROM pgslotguard.slots WHERE slot_name = 'standby1'");
        assert_eq!(s, "false|not leased (scope = leased)");
        run("SELECT pg_drop_replication_slot('standby1')");
    }

    #[pg_test]
    fn status_view_shows_the_running_worker() {
        // The worker may be between restarts when the suite starts (it connects to the test
        // database, which the framework creates after the server starts): poll for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let q = "SELECT preloaded::text || '|' || running::text || '|' || COALESCE((pid > 0)::text, 'no pid') FROM pgslotguard.status";
        let mut row = text(q);
        while row != "true|true|true" && std::time::Instant::now() < deadline {
            run("SELECT pg_sleep(0.2)");
            row = text(q);
        }
        assert_eq!(row, "true|true|true", "the guard worker was not seen running within 30 s");
    }

    #[pg_test]
    fn expired_lease_shows_expired_and_enforce_drops_it() {
        helpers();
        run("SELECT * FROM backup_slot_lease('ex', '1 second')");
        // make it expired without sleeping: move the lease back in time
        run("SELECT pgslotguard.test_set_lease_times('ex', 3600, -60)");
        assert_eq!(text("SELECT state FROM pgslotguard.leases WHERE slot_name = 'ex'"), "expired");
        assert_eq!(text("SELECT next_action FROM pgslotguard.slots WHERE slot_name = 'ex'"), "expire_drop");
        // dry run: recorded, nothing touched
        let a = text("SELECT string_agg(action, ',') FROM backup_slot_enforce(true) WHERE slot_name = 'ex'");
        assert_eq!(a, "would_drop");
        assert!(slot_exists("ex"));
        assert_eq!(text("SELECT action FROM pgslotguard.events WHERE slot_name = 'ex' ORDER BY id DESC LIMIT 1"), "would_drop");
        // real pass
        let a = text("SELECT string_agg(action, ',') FROM backup_slot_enforce() WHERE slot_name = 'ex'");
        assert_eq!(a, "expire_drop");
        assert!(!slot_exists("ex"));
        // Its lease and drop intent go once this transaction has committed the event
        // (tests/hardening.rs shows both ends); until then the intent is this
        // transaction's, and lease calls on the name are refused as for any drop under way.
        assert_eq!(text("SELECT pg_temp.sqlstate_of('SELECT backup_slot_renew(''ex'', ''1h'')')"), "55006");
        let ev = text("SELECT actor || ':' || reason FROM pgslotguard.events WHERE slot_name = 'ex' ORDER BY id DESC LIMIT 1");
        assert!(ev.starts_with("postgres:lease expired 1m"), "{ev}");
    }

    #[pg_test]
    fn enforce_ends_lease_whose_slot_vanished() {
        run("SELECT * FROM backup_slot_lease('vanish', '1h')");
        run("SELECT pg_drop_replication_slot('vanish')");
        assert_eq!(text("SELECT state FROM pgslotguard.leases WHERE slot_name = 'vanish'"), "slot_missing");
        let a = text("SELECT string_agg(action, ',') FROM backup_slot_enforce() WHERE slot_name = 'vanish'");
        // the same word the event log records for it
        assert_eq!(a, "warn");
        assert_eq!(text("SELECT action FROM pgslotguard.events WHERE slot_name = 'vanish' ORDER BY id DESC LIMIT 1"), "warn");
        assert_eq!(one::<i64>("SELECT count(*) FROM pgslotguard.leases WHERE slot_name = 'vanish'"), Some(0));
    }

    #[pg_test]
    fn enforce_requires_superuser_unless_dry_run_by_monitor() {
        helpers();
        run("CREATE ROLE sg_mon LOGIN IN ROLE pg_monitor");
        run("SET ROLE sg_mon");
        assert_eq!(text("SELECT pg_temp.sqlstate_of('SELECT * FROM backup_slot_enforce()')"), "42501");
        assert_eq!(text("SELECT pg_temp.sqlstate_of('SELECT * FROM backup_slot_enforce(true)')"), "00000");
        assert_eq!(text("SELECT pg_temp.sqlstate_of('SELECT * FROM pgslotguard.slots')"), "00000");
        assert_eq!(text("SELECT pg_temp.sqlstate_of('SELECT * FROM pgslotguard.status')"), "00000");
        run("RESET ROLE");
        // A monitor's dry run says what a pass would do and records nothing: no event, no
        // notification, however often it runs. A superuser's dry run records would_drop.
        run("SELECT * FROM backup_slot_lease('mon_dry', '1h')");
        run("SELECT pgslotguard.test_set_lease_times('mon_dry', 3600, -60)");
        let events = || one::<i64>("SELECT count(*) FROM pgslotguard.event_log WHERE slot_name = 'mon_dry'").unwrap_or(0);
        let before = events();
        run("SET ROLE sg_mon");
        for _ in 0..3 {
            assert_eq!(text("SELECT string_agg(action, ',') FROM backup_slot_enforce(true) WHERE slot_name = 'mon_dry'"), "would_drop");
        }
        run("RESET ROLE");
        assert_eq!(events(), before, "a monitor's dry run recorded events");
        assert_eq!(text("SELECT string_agg(action, ',') FROM backup_slot_enforce(true) WHERE slot_name = 'mon_dry'"), "would_drop");
        assert_eq!(events(), before + 1);
        assert_eq!(text("SELECT action FROM pgslotguard.event_log WHERE slot_name = 'mon_dry' ORDER BY id DESC LIMIT 1"), "would_drop");
        run("CREATE ROLE sg_nobody LOGIN");
        run("SET ROLE sg_nobody");
        assert_eq!(text("SELECT pg_temp.sqlstate_of('SELECT * FROM backup_slot_enforce(true)')"), "42501");
        assert_eq!(text("SELECT pg_temp.sqlstate_of('SELECT * FROM pgslotguard.slots')"), "42501");
        run("RESET ROLE");
    }

    #[pg_test]
    fn gucs_are_visible_with_units_and_bad_values_are_refused() {
        helpers();
        assert_eq!(text("SELECT unit FROM pg_settings WHERE name = 'pgslotguard.naptime'"), "ms");
        assert_eq!(text("SELECT unit FROM pg_settings WHERE name = 'pgslotguard.max_retained_wal'"), "MB");
        assert_eq!(text("SELECT unit FROM pg_settings WHERE name = 'pgslotguard.max_ttl'"), "s");
        assert_eq!(text("SELECT current_setting('pgslotguard.max_ttl')"), "7d");
        assert_eq!(text("SELECT enumvals::text FROM pg_settings WHERE name = 'pgslotguard.scope'"), "{leased,physical,all}");
        // (test builds also have pgslotguard.test_pause_at, src/testhook.rs)
        assert_eq!(one::<i64>("SELECT count(*) FROM pg_settings WHERE name LIKE 'pgslotguard.%' AND name NOT LIKE 'pgslotguard.test%'"), Some(21));
        assert_eq!(text("SELECT setting || ' ' || context || ' ' || enumvals::text FROM pg_settings WHERE name = 'pgslotguard.notify_payload'"), "minimal superuser {minimal,full}");
        assert_eq!(text("SELECT current_setting('pgslotguard.max_xmin_age')"), "-1");
        assert_eq!(text("SELECT min_val || ' ' || max_val FROM pg_settings WHERE name = 'pgslotguard.max_xmin_age'"), "-1 2000000000");
        assert_eq!(text("SELECT current_setting('pgslotguard.warn_fraction')"), "0.8");
        assert_eq!(text("SELECT unit FROM pg_settings WHERE name = 'pgslotguard.max_stalled_time'"), "s");
        assert_eq!(text("SELECT current_setting('pgslotguard.max_stalled_time')"), "-1");
        assert_eq!(text("SELECT enumvals::text FROM pg_settings WHERE name = 'pgslotguard.checkpoint_after_drop'"), "{off,spread,fast}");
        assert_eq!(text("SELECT current_setting('pgslotguard.min_free_wal_space')"), "-1");
        // default_ttl above max_ttl, a typo'd name under the reserved prefix
        // default_ttl above max_ttl: each setting is valid alone; the lease that would use
        // the pair fails, naming both
        assert_eq!(text("SELECT pg_temp.sqlstate_of($$SET pgslotguard.default_ttl = '8d'$$)"), "00000");
        let e = text("SELECT pg_temp.error_of($$SELECT backup_slot_lease('dflt')$$)");
        assert!(
            e.starts_with("22023: pgslotguard.default_ttl (8d 00h) exceeds pgslotguard.max_ttl (7d 00h)")
                && e.contains("HINT: Lower pgslotguard.default_ttl or raise pgslotguard.max_ttl"),
            "{e}"
        );
        run("RESET pgslotguard.default_ttl");
        assert_eq!(text("SELECT pg_temp.sqlstate_of($$SET pgslotguard.naptme = '1s'$$)"), "42602");
        // SIGHUP settings cannot be SET in a session
        assert_eq!(text("SELECT pg_temp.sqlstate_of($$SET pgslotguard.naptime = '5s'$$)"), "55P02");
    }


    #[pg_test]
    fn every_outcome_word_is_accepted_by_the_event_log_and_no_other() {
        helpers();
        for o in crate::policy::Outcome::ALL {
            run(&format!(
                "INSERT INTO pgslotguard.event_log (action, actor) VALUES ({}, 'test')",
                pgrx::spi::quote_literal(o.as_str())
            ));
        }
        assert_eq!(
            text("SELECT pg_temp.sqlstate_of($$INSERT INTO pgslotguard.event_log (action, actor) VALUES ('end_lease', 'test')$$)"),
            "23514"
        );
    }

    #[pg_test]
    fn status_shows_the_filesystem_of_pg_wal() {
        let total = one::<i64>("SELECT fs_total_bytes FROM pgslotguard.status").unwrap_or(0);
        let free = one::<i64>("SELECT fs_free_bytes FROM pgslotguard.status").unwrap_or(-1);
        assert!(total > 0 && free >= 0 && free <= total, "free {free} of {total}");
        let segs = one::<i64>("SELECT count(*) FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$'").unwrap_or(0);
        let seg = one::<i64>("SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'").unwrap_or(0);
        assert_eq!(one::<i64>("SELECT pg_wal_bytes FROM pgslotguard.status"), Some(segs * seg));
        assert_eq!(one::<i64>("SELECT floor_bytes FROM pgslotguard.status"), None, "no floor by default");
    }

    #[pg_test]
    fn a_month_and_minus_thirty_days_never_yields_an_expiry_in_the_past() {
        helpers();
        run("SELECT * FROM backup_slot_lease('mixed', '1h')");
        // whatever the month's length, either refused or an expiry in the future
        let r = text("SELECT pg_temp.sqlstate_of($$SELECT backup_slot_renew('mixed', '-1 month 30 days 12:00:00')$$)");
        if r == "00000" {
            assert_eq!(one::<bool>("SELECT expires_at > clock_timestamp() FROM pgslotguard.leases WHERE slot_name = 'mixed'"), Some(true));
        } else {
            assert_eq!(r, "22023");
        }
    }

    #[pg_test]
    fn lease_times_count_from_the_call_not_the_transaction_start() {
        // this test runs in one transaction: now() is its start
        run("SELECT pg_sleep(1.2)");
        run("SELECT * FROM backup_slot_lease('late', '2s')");
        let left = one::<f64>("SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 FROM pgslotguard.leases WHERE slot_name = 'late'").unwrap_or(0.0);
        assert!(left > 1.5, "the lease left the call with only {left} s of its 2 s");
        let leased = one::<f64>("SELECT extract(epoch FROM leased_at - now())::float8 FROM pgslotguard.leases WHERE slot_name = 'late'").unwrap_or(0.0);
        assert!(leased >= 1.2, "leased_at is {leased} s after the transaction start");
    }
}
