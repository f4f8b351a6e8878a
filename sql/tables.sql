-- pgslotguard state: WAL-logged tables, read and written only through the extension's
-- functions (which check the caller's rights) and the guard worker.

CREATE TABLE pgslotguard.lease_data (
    slot_name    name PRIMARY KEY,
    holder       text,
    -- role names, not OIDs: they survive pg_dump and restore into another cluster
    owner        name NOT NULL,
    leased_at    timestamptz NOT NULL,
    renewed_at   timestamptz,
    expires_at   timestamptz NOT NULL,
    max_retained bigint CHECK (max_retained > 0),
    -- the lease's own inactivity and age limits (see limit_by_superuser)
    max_inactive interval CHECK (max_inactive > interval '0'),
    max_age      interval CHECK (max_age > interval '0'),
    adopted      boolean NOT NULL DEFAULT false,
    reserved_lsn pg_lsn,
    -- the lease's own limits were set by a superuser: they replace the global ones
    -- (max_retained_wal, max_inactive_time, max_slot_age); otherwise they only ever tighten them
    limit_by_superuser boolean NOT NULL DEFAULT false
);
COMMENT ON TABLE pgslotguard.lease_data IS 'one row per leased replication slot; read it through pgslotguard.leases';

CREATE TABLE pgslotguard.event_log (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    slot_name      name,
    -- The same words as policy::Outcome::as_str() (a test holds the two together).
    action         text NOT NULL CHECK (action IN ('lease', 'renew', 'release', 'keep', 'expire_drop',
                        'retained_drop', 'age_drop', 'inactive_drop', 'space_drop', 'terminate',
                        'lost_drop', 'stalled_drop', 'xmin_drop', 'would_drop', 'checkpoint', 'warn', 'error')),
    reason         text,
    retained_bytes bigint,
    actor          text NOT NULL,
    lease_owner    name,
    freed_bytes    bigint,
    pg_wal_bytes   bigint,
    -- the holder of the slot's lease when the event was recorded
    lease_holder   text
);
COMMENT ON COLUMN pgslotguard.event_log.freed_bytes IS 'drops: WAL the drop lets the next checkpoint remove (projected); checkpoint: bytes pg_wal shrank by (measured)';
COMMENT ON COLUMN pgslotguard.event_log.pg_wal_bytes IS 'checkpoint: size of pg_wal measured after the checkpoint the guard requested';
CREATE INDEX event_log_at_idx ON pgslotguard.event_log (at);
COMMENT ON TABLE pgslotguard.event_log IS 'audit trail of every lease operation and guard action; read it through pgslotguard.events; purged after pgslotguard.event_retention';

CREATE TABLE pgslotguard.slot_seen (
    slot_name      name PRIMARY KEY,
    first_seen     timestamptz NOT NULL,
    inactive_since timestamptz,
    -- set (and committed) by the guard just before it drops the slot, so that a drop whose
    -- event the guard could not commit (it was killed) is recorded at its next pass
    drop_action    text,
    drop_reason    text,
    -- an active slot whose restart_lsn stopped at stalled_lsn while WAL was written, since
    -- stalled_since (pgslotguard.max_stalled_time)
    stalled_lsn    pg_lsn,
    stalled_since  timestamptz
);
COMMENT ON TABLE pgslotguard.slot_seen IS 'when the guard first saw each slot and since when it has had no walsender (PostgreSQL 15 does not track this)';

-- Warnings the guard has given (pgslotguard.warn_fraction), each until its value falls
-- back under the threshold: a restarted worker does not warn again.
CREATE TABLE pgslotguard.warned (
    slot_name  name NOT NULL,  -- '' for the free-space floor
    limit_name text NOT NULL CHECK (limit_name IN ('expiry', 'retained', 'age', 'inactivity', 'floor', 'stalled', 'xmin')),
    at         timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (slot_name, limit_name)
);
COMMENT ON TABLE pgslotguard.warned IS 'warnings given and not re-armed; like the slot tracking, not dumped';

REVOKE ALL ON pgslotguard.lease_data, pgslotguard.event_log, pgslotguard.slot_seen, pgslotguard.warned FROM PUBLIC;

-- Leases and events are the state to keep across pg_dump of this database, with the
-- sequence behind the event ids (or a restored database would reuse them). Slot tracking
-- is not: slots belong to a server, and a restored cluster has none of the old ones.
SELECT pg_catalog.pg_extension_config_dump('pgslotguard.lease_data', '');
SELECT pg_catalog.pg_extension_config_dump('pgslotguard.event_log', '');
SELECT pg_catalog.pg_extension_config_dump('pgslotguard.event_log_id_seq', '');
