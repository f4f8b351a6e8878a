-- pgslotguard: the user-facing SQL API and the inspection views. Runs last in
-- CREATE EXTENSION, after the internal functions in schema pgslotguard exist.
--
-- The backup_slot_* functions are thin SQL wrappers with the documented signatures; they
-- pass text arguments as raw bytes (convert_to($n, 'SQL_ASCII') does no conversion), checked for UTF-8 in Rust. They
-- are SECURITY INVOKER: the functions they call check the caller's rights (REPLICATION or
-- superuser to lease, lease owner or superuser to renew/release/keep) and only then act
-- with the extension owner's rights. search_path is pinned on every function.

CREATE FUNCTION @extschema@.backup_slot_lease(
    slot_name    text,
    ttl          interval DEFAULT NULL,
    holder       text     DEFAULT NULL,
    max_retained text     DEFAULT NULL,
    adopt        boolean  DEFAULT false,
    max_inactive interval DEFAULT NULL,
    max_age      interval DEFAULT NULL,
    max_xmin_age bigint   DEFAULT NULL,
    plugin       text     DEFAULT NULL,
    two_phase    boolean  DEFAULT false,
    failover     boolean  DEFAULT false,
    while_active boolean  DEFAULT false)
RETURNS TABLE (slot_name text, lsn pg_lsn, expires_at timestamptz)
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT l.slot_name, l.lsn::pg_catalog.pg_lsn, l.expires_at
      FROM pgslotguard.lease_slot(pg_catalog.convert_to($1, 'SQL_ASCII'), $2, pg_catalog.convert_to($3, 'SQL_ASCII'), pg_catalog.convert_to($4, 'SQL_ASCII'), $5, $6, $7, $8,
                                  pg_catalog.convert_to($9, 'SQL_ASCII'), $10, $11, $12) AS l
$$;
COMMENT ON FUNCTION @extschema@.backup_slot_lease(text, interval, text, text, boolean, interval, interval, bigint, text, boolean, boolean, boolean) IS
'create a physical replication slot with WAL reserved now, or with plugin a logical one in this database (two_phase, failover on 17+), or adopt an existing slot of either kind, and lease it for ttl (default pgslotguard.default_ttl), with its own limits if given (max_retained, max_inactive, max_age, max_xmin_age in transactions: a superuser''s replace the global ones, anyone else''s only tighten them); while_active: the lease lasts while a consumer streams from the slot, and expires ttl after the consumer went; returns the slot, the reserved LSN (a logical slot''s consistent point) and the expiry';

CREATE FUNCTION @extschema@.backup_slot_renew(slot_name text, ttl interval DEFAULT NULL)
RETURNS timestamptz
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgslotguard.renew_slot(pg_catalog.convert_to($1, 'SQL_ASCII'), $2) $$;
COMMENT ON FUNCTION @extschema@.backup_slot_renew(text, interval) IS
'push the lease''s expiry to now() + ttl (default pgslotguard.default_ttl): the heartbeat of a long backup; returns the new expiry';

CREATE FUNCTION @extschema@.backup_slot_release(slot_name text)
RETURNS boolean
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgslotguard.release_slot(pg_catalog.convert_to($1, 'SQL_ASCII')) $$;
COMMENT ON FUNCTION @extschema@.backup_slot_release(text) IS
'the backup is done: drop the slot and end its lease';

CREATE FUNCTION @extschema@.backup_slot_keep(slot_name text)
RETURNS boolean
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgslotguard.keep_slot(pg_catalog.convert_to($1, 'SQL_ASCII')) $$;
COMMENT ON FUNCTION @extschema@.backup_slot_keep(text) IS
'end the lease but keep the slot (the backup became a standby that now uses it)';

CREATE FUNCTION @extschema@.backup_slot_enforce(dry_run boolean DEFAULT false)
RETURNS TABLE (slot_name text, action text, reason text, retained_bytes bigint)
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM pgslotguard.enforce_now($1) $$;
COMMENT ON FUNCTION @extschema@.backup_slot_enforce(boolean) IS
'run one enforcement pass now, in this session, with the current policy (the worker runs the same code); dry_run records would_drop and touches nothing';

CREATE VIEW pgslotguard.leases WITH (security_barrier) AS
SELECT l.slot_name::pg_catalog.name AS slot_name,
       l.holder,
       l.owner::pg_catalog.name AS owner,
       l.leased_at,
       l.renewed_at,
       l.expires_at,
       pg_catalog.date_trunc('second', l.expires_at OPERATOR(pg_catalog.-) pg_catalog.now()) AS expires_in,
       s.active,
       s.active_pid,
       s.wal_status,
       s.restart_lsn,
       d.retained_bytes,
       pg_catalog.pg_size_pretty(d.retained_bytes) AS retained,
       d.max_retained_bytes,
       pg_catalog.pg_size_pretty(d.max_retained_bytes) AS max_retained,
       l.max_inactive,
       l.max_age,
       COALESCE(d.state, 'ok') AS state,
       d.nearest_limit,
       l.adopted,
       l.reserved_lsn::pg_catalog.pg_lsn AS reserved_lsn,
       l.limit_by_superuser,
       l.max_xmin_age,
       s.slot_type,
       s.plugin,
       s.database,
       s.confirmed_flush_lsn,
       l.while_active
  FROM pgslotguard.lease_rows() l
  LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name OPERATOR(pg_catalog.=) l.slot_name
  LEFT JOIN pgslotguard.slot_decisions() d ON d.slot_name OPERATOR(pg_catalog.=) l.slot_name::text;
COMMENT ON VIEW pgslotguard.leases IS
'one row per lease, joined to its slot, with its own limits (max_inactive, max_age; NULL: the global one), read from this server''s lease store; state: ok, expiring, near_retained, near_xmin, near_age, near_stalled, near_inactive (within pgslotguard.warn_fraction of that limit), expired, expired_active, over_retained, over_xmin, over_age, over_inactive, stalled, lost, below_floor, slot_missing. pg_monitor sees all leases, other roles their own';

CREATE VIEW pgslotguard.slots AS
SELECT d.slot_name,
       s.slot_type,
       s.plugin,
       s.database,
       s.confirmed_flush_lsn,
       s.temporary,
       s.active,
       s.active_pid,
       s.wal_status,
       d.invalidation_reason,
       s.restart_lsn,
       d.leased,
       d.in_scope,
       d.scope_reason,
       d.retained_bytes,
       pg_catalog.pg_size_pretty(d.retained_bytes) AS retained,
       pg_catalog.date_trunc('second', pg_catalog.make_interval(secs => d.age_us::pg_catalog.float8 OPERATOR(pg_catalog./) 1e6::pg_catalog.float8)) AS age,
       pg_catalog.date_trunc('second', pg_catalog.make_interval(secs => d.inactive_us::pg_catalog.float8 OPERATOR(pg_catalog./) 1e6::pg_catalog.float8)) AS inactive_for,
       d.nearest_limit,
       d.state,
       d.next_action,
       d.action_reason,
       d.frees_bytes,
       pg_catalog.pg_size_pretty(d.frees_bytes) AS frees,
       d.xmin_age,
       d.catalog_xmin_age,
       d.max_xmin_age
  FROM pgslotguard.slot_decisions() d
  JOIN pg_catalog.pg_replication_slots s ON s.slot_name::text OPERATOR(pg_catalog.=) d.slot_name
 ORDER BY d.slot_name;
COMMENT ON VIEW pgslotguard.slots IS
'every replication slot with the guard''s view of it: why core invalidated it, if it did (invalidation_reason, as core''s own on 17+; wal_removed for a lost slot on 15), in scope or not and why, retained WAL, age, inactivity, nearest limit, what the next pass would do, and the pg_wal bytes a checkpoint would free if it were dropped with every older slot in scope (frees); xmin_age and catalog_xmin_age: how many transactions old the horizon the slot holds back is, as age() counts, and max_xmin_age the limit in force for it (pgslotguard.max_xmin_age or its lease''s; NULL when the slot holds no horizon or no limit applies)';

CREATE VIEW pgslotguard.events WITH (security_barrier) AS
SELECT e.id,
       e.at,
       e.slot_name,
       e.action,
       e.reason,
       e.retained_bytes,
       pg_catalog.pg_size_pretty(e.retained_bytes) AS retained,
       e.freed_bytes,
       pg_catalog.pg_size_pretty(e.freed_bytes) AS freed,
       e.pg_wal_bytes,
       pg_catalog.pg_size_pretty(e.pg_wal_bytes) AS pg_wal_after,
       e.actor,
       e.holder,
       e.kept_in
  FROM (SELECT t.id, t.at, t.slot_name, t.action, t.reason, t.retained_bytes, t.freed_bytes, t.pg_wal_bytes,
               t.actor, t.lease_holder AS holder, 'table'::text AS kept_in
          FROM pgslotguard.event_log t
         WHERE pg_catalog.pg_has_role('pg_monitor', 'USAGE')
            OR t.lease_owner_oid OPERATOR(pg_catalog.=) (SELECT u.oid FROM pg_catalog.pg_roles u WHERE u.rolname OPERATOR(pg_catalog.=) CURRENT_USER)
        UNION ALL
        SELECT r.id, r.at, r.slot_name::pg_catalog.name, r.action, r.reason, r.retained_bytes, r.freed_bytes, r.pg_wal_bytes,
               r.actor, r.lease_holder, 'ring'::text
          FROM pgslotguard.ring_events() r) e
 ORDER BY e.at, e.kept_in DESC, e.id;
COMMENT ON VIEW pgslotguard.events IS
'audit trail (kept_in: table, the event_log table of a primary; ring, the per-node ring of pg_slotguard/events where a standby keeps its events, also in its server log): lease, renew, release, keep, expire_drop, retained_drop, xmin_drop, age_drop, inactive_drop, space_drop, terminate, would_drop, checkpoint, warn, error; actor is a role or "worker". freed: for a drop the WAL it lets the next checkpoint remove, for a checkpoint what pg_wal shrank by';

CREATE VIEW pgslotguard.status AS
SELECT w.preloaded,
       w.running,
       w.pid,
       pg_catalog.current_setting('pgslotguard.enabled', true) AS enabled,
       pg_catalog.current_setting('pgslotguard.naptime', true) AS naptime,
       w.started_at,
       w.last_pass_at,
       pg_catalog.round(w.last_pass_ms::pg_catalog.numeric, 3) AS last_pass_ms,
       w.next_pass_at,
       w.passes,
       w.wal_probes,
       w.drops,
       w.errors,
       w.last_error,
       w.last_error_at,
       w.busy_skips,
       w.last_busy_slot,
       w.last_busy_at,
       w.checkpoint_pending,
       pg_catalog.current_setting('pgslotguard.checkpoint_after_drop', true) AS checkpoint_after_drop,
       s.pg_wal_bytes,
       pg_catalog.pg_size_pretty(s.pg_wal_bytes) AS pg_wal,
       s.fs_free_bytes,
       pg_catalog.pg_size_pretty(s.fs_free_bytes) AS fs_free,
       s.fs_total_bytes,
       pg_catalog.pg_size_pretty(s.fs_total_bytes) AS fs_total,
       s.floor_bytes,
       pg_catalog.pg_size_pretty(s.floor_bytes) AS floor,
       s.headroom_bytes,
       pg_catalog.pg_size_pretty(s.headroom_bytes) AS headroom,
       w.in_recovery,
       h.slot_name AS oldest_xmin_slot,
       h.age AS oldest_xmin_age
  FROM pgslotguard.worker_status() w, pgslotguard.wal_space() s
  -- the slot that holds the oldest transaction horizon (xmin or catalog_xmin), in scope or not
  LEFT JOIN LATERAL (
        SELECT r.slot_name::text AS slot_name,
               GREATEST(pg_catalog.age(r.xmin), pg_catalog.age(r.catalog_xmin))::pg_catalog.int8 AS age
          FROM pg_catalog.pg_replication_slots r
         WHERE r.xmin IS NOT NULL OR r.catalog_xmin IS NOT NULL
         ORDER BY 2 DESC, 1
         LIMIT 1) h ON true;
COMMENT ON VIEW pgslotguard.status IS
'the guard worker: running or not (pid), last pass time and duration, next pass, passes, probes of the WAL position between passes (wal_probes: while a retained-WAL limit or the floor applies), drops, errors, last error, slots skipped because their lease was being changed (busy_skips); and the filesystem of pg_wal: pg_wal size, free and total space, the free-space floor (pgslotguard.min_free_wal_space) and the headroom the guard restores above it; the slot that holds the oldest transaction horizon of all slots (oldest_xmin_slot, in scope or not) and by how many transactions (oldest_xmin_age, as age() counts): where to look when VACUUM reports dead rows it cannot remove yet; in_recovery: this server is a hot standby (its guard guards its own slots, events go to its log and ring, and a drop frees WAL at the next restartpoint)';

-- Rights. The functions check the caller themselves, so EXECUTE to PUBLIC widens nothing:
-- leasing needs REPLICATION or superuser, changing a lease needs its owner or a superuser.
CREATE VIEW pgslotguard.tracking AS
SELECT t.slot_name::pg_catalog.name AS slot_name,
       t.leased,
       t.first_seen,
       t.inactive_since,
       t.stalled_lsn::pg_catalog.pg_lsn AS stalled_lsn,
       t.stalled_since,
       t.drop_action,
       t.drop_reason,
       t.warned
  FROM pgslotguard.tracking_rows() t
 ORDER BY t.slot_name;
COMMENT ON VIEW pgslotguard.tracking IS
'what this server''s guard remembers of each slot, from its store (pg_slotguard/ in the data directory): when it first saw it, since when it has had no walsender, a stall, a drop it has decided and not yet recorded, and the limits it has warned of (warned, until they re-arm; the row with an empty slot_name is the server''s own, for the free-space floor)';

GRANT USAGE ON SCHEMA pgslotguard TO PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgslotguard FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgslotguard.lease_slot(bytea, interval, bytea, bytea, boolean, interval, interval, bigint, bytea, boolean, boolean, boolean),
                          pgslotguard.renew_slot(bytea, interval),
                          pgslotguard.release_slot(bytea),
                          pgslotguard.keep_slot(bytea),
                          pgslotguard.enforce_now(boolean),
                          pgslotguard.slot_decisions(),
                          pgslotguard.lease_rows(),
                          pgslotguard.ring_events() TO PUBLIC;
GRANT EXECUTE ON FUNCTION pgslotguard.worker_status(), pgslotguard.wal_space(), pgslotguard.tracking_rows() TO pg_monitor;
REVOKE ALL ON pgslotguard.leases, pgslotguard.events, pgslotguard.slots, pgslotguard.status, pgslotguard.tracking FROM PUBLIC;
GRANT SELECT ON pgslotguard.leases, pgslotguard.events TO PUBLIC;
GRANT SELECT ON pgslotguard.slots, pgslotguard.status, pgslotguard.tracking TO pg_monitor;
