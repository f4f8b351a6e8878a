-- pgslotguard 0.1.0 → 0.2.0: leases, the guard's tracking of slots and the warnings it has
-- given move from tables of this database into the per-node store (pg_slotguard/ in the
-- data directory, kept the way core keeps replication slots). The event log stays.
\echo Use "ALTER EXTENSION pgslotguard UPDATE" to load this file. \quit

-- 1. Move the rows into the store (written durably; running it again writes the same).
CREATE FUNCTION pgslotguard.import_0_1_0_tables() RETURNS bigint
    VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'import_0_1_0_tables_wrapper';
SELECT pgslotguard.import_0_1_0_tables();
DROP FUNCTION pgslotguard.import_0_1_0_tables();

-- 2. The tables, their triggers and the kept-read machinery go.
DROP VIEW pgslotguard.leases;
DROP TABLE pgslotguard.lease_data, pgslotguard.slot_seen, pgslotguard.warned;
DROP FUNCTION pgslotguard.tables_changed();

-- 3. The store's readers, and the views over them.
CREATE FUNCTION pgslotguard."lease_rows"() RETURNS TABLE (
	"slot_name" TEXT,
	"holder" TEXT,
	"owner" TEXT,
	"leased_at" timestamp with time zone,
	"renewed_at" timestamp with time zone,
	"expires_at" timestamp with time zone,
	"max_retained" bigint,
	"max_inactive" interval,
	"max_age" interval,
	"adopted" bool,
	"reserved_lsn" TEXT,
	"limit_by_superuser" bool
)
STRICT STABLE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'lease_rows_wrapper';

CREATE FUNCTION pgslotguard."tracking_rows"() RETURNS TABLE (
	"slot_name" TEXT,
	"leased" bool,
	"first_seen" timestamp with time zone,
	"inactive_since" timestamp with time zone,
	"stalled_lsn" TEXT,
	"stalled_since" timestamp with time zone,
	"drop_action" TEXT,
	"drop_reason" TEXT,
	"warned" TEXT[]
)
STRICT STABLE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'tracking_rows_wrapper';

CREATE VIEW pgslotguard.leases WITH (security_barrier) AS
SELECT l.slot_name::pg_catalog.name AS slot_name,
       l.holder,
       l.owner::pg_catalog.name AS owner,
       l.leased_at,
       l.renewed_at,
       l.expires_at,
       pg_catalog.date_trunc('second', l.expires_at - pg_catalog.now()) AS expires_in,
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
       l.limit_by_superuser
  FROM pgslotguard.lease_rows() l
  LEFT JOIN pg_catalog.pg_replication_slots s ON s.slot_name OPERATOR(pg_catalog.=) l.slot_name
  LEFT JOIN pgslotguard.slot_decisions() d ON d.slot_name OPERATOR(pg_catalog.=) l.slot_name::text;
COMMENT ON VIEW pgslotguard.leases IS
'one row per lease, joined to its slot, with its own limits (max_inactive, max_age; NULL: the global one), read from this server''s lease store; state: ok, expiring, near_retained, near_age, near_stalled, near_inactive (within pgslotguard.warn_fraction of that limit), expired, expired_active, over_retained, over_age, over_inactive, stalled, lost, below_floor, slot_missing. pg_monitor sees all leases, other roles their own';

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

REVOKE ALL ON FUNCTION pgslotguard.lease_rows(), pgslotguard.tracking_rows() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgslotguard.lease_rows() TO PUBLIC;
GRANT EXECUTE ON FUNCTION pgslotguard.tracking_rows() TO pg_monitor;
REVOKE ALL ON pgslotguard.leases, pgslotguard.tracking FROM PUBLIC;
GRANT SELECT ON pgslotguard.leases TO PUBLIC;
GRANT SELECT ON pgslotguard.tracking TO pg_monitor;
