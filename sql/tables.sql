-- pgslotguard's one table: the audit trail, written by the extension's functions and the
-- guard worker on a primary. Leases, the guard's tracking of slots and the warnings it
-- has given are per server, in its data directory (src/store/), not in tables.

CREATE TABLE pgslotguard.event_log (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    slot_name      name,
    -- The same words as policy::Outcome::as_str() (a test holds the two together).
    action         text NOT NULL CHECK (action OPERATOR(pg_catalog.=) ANY (ARRAY['lease', 'renew', 'release', 'keep',
                        'expire_drop', 'retained_drop', 'age_drop', 'inactive_drop', 'space_drop', 'terminate',
                        'lost_drop', 'stalled_drop', 'xmin_drop', 'rollback_drop', 'would_drop', 'checkpoint', 'warn',
                        'error']::pg_catalog.text[])),
    reason         text,
    retained_bytes bigint,
    actor          text NOT NULL,
    lease_owner    name,
    freed_bytes    bigint,
    pg_wal_bytes   bigint,
    -- the holder of the slot's lease when the event was recorded
    lease_holder   text,
    -- the lease owner's OID: a role sees the events of its own leases by it, never by a
    -- name that a new role could take
    lease_owner_oid oid,
    -- the lease the event is about (the store's lease id): after a crash, the guard finds a
    -- release or keep that committed by it
    lease_id       bigint
);
COMMENT ON COLUMN pgslotguard.event_log.freed_bytes IS 'drops: WAL the drop lets the next checkpoint remove (projected); checkpoint: bytes pg_wal shrank by (measured)';
COMMENT ON COLUMN pgslotguard.event_log.pg_wal_bytes IS 'checkpoint: size of pg_wal measured after the checkpoint the guard requested';
CREATE INDEX event_log_at_idx ON pgslotguard.event_log (at);
CREATE INDEX event_log_lease_id_idx ON pgslotguard.event_log (lease_id) WHERE lease_id IS NOT NULL;
COMMENT ON TABLE pgslotguard.event_log IS 'audit trail of every lease operation and guard action; read it through pgslotguard.events; purged after pgslotguard.event_retention';

REVOKE ALL ON pgslotguard.event_log FROM PUBLIC;

-- Events are SQL history: kept across pg_dump of this database, with the sequence behind
-- their ids (or a restored database would reuse them). Leases are not here: like slots,
-- they belong to a server and live in its data directory (pg_slotguard/), not in a dump.
SELECT pg_catalog.pg_extension_config_dump('pgslotguard.event_log', '');
SELECT pg_catalog.pg_extension_config_dump('pgslotguard.event_log_id_seq', '');
