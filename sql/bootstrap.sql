-- pgslotguard: runs first in CREATE EXTENSION.
--
-- The guard worker only sees leases in the database named by pgslotguard.database.
-- A lease taken anywhere else would never be enforced, so refuse to install there
-- (as pg_cron does with cron.database_name).
DO $pgslotguard$
DECLARE
    guard_db text := COALESCE(pg_catalog.current_setting('pgslotguard.database', true), 'postgres');
BEGIN
    IF pg_catalog.current_database() OPERATOR(pg_catalog.<>) guard_db THEN
        RAISE EXCEPTION 'can only create extension "pgslotguard" in database "%"', guard_db
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'The pgslotguard guard worker reads leases from the database named by pgslotguard.database; leases taken in any other database would never be enforced.',
                  HINT = pg_catalog.format('Add pgslotguard.database = ''%s'' to postgresql.conf and restart to use the current database.', pg_catalog.current_database());
    END IF;
END
$pgslotguard$;

CREATE SCHEMA IF NOT EXISTS pgslotguard;
COMMENT ON SCHEMA pgslotguard IS 'pgslotguard: leases on backup replication slots, their events and views';
