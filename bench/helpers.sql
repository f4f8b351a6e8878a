-- Helpers the benchmark creates in its own throwaway cluster.

-- Poll (every 5 ms, inside one statement: pg_replication_slots is not transactional)
-- until every slot named bench_r_* is gone; return each slot's reaction time: the time
-- it vanished minus its lease's expiry.
CREATE FUNCTION bench_wait_gone(timeout_s float8)
RETURNS TABLE (slot text, reaction_s float8) LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz := clock_timestamp();
    r record;
BEGIN
    CREATE TEMP TABLE IF NOT EXISTS pending AS
        SELECT slot_name::text AS slot, expires_at, NULL::timestamptz AS gone_at
          FROM pgslotguard.leases WHERE slot_name LIKE 'bench_r_%';
    LOOP
        UPDATE pending p SET gone_at = clock_timestamp()
         WHERE p.gone_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.slot_name = p.slot);
        EXIT WHEN NOT EXISTS (SELECT 1 FROM pending WHERE gone_at IS NULL);
        EXIT WHEN clock_timestamp() - t0 > make_interval(secs => timeout_s);
        PERFORM pg_sleep(0.005);
    END LOOP;
    RETURN QUERY SELECT p.slot, extract(epoch FROM p.gone_at - p.expires_at)::float8 FROM pending p;
    DROP TABLE pending;
END $$;

-- Sample the WAL a slot retains every 50 ms until it is dropped or lost; return the peak
-- and when the slot went (NULL if it did not within the timeout).
CREATE FUNCTION bench_peak_retained(slot text, timeout_s float8, OUT peak bigint, OUT gone_after_s float8, OUT how text)
LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz := clock_timestamp();
    cur bigint;
    st text;
BEGIN
    peak := 0;
    LOOP
        SELECT (pg_current_wal_insert_lsn() - restart_lsn)::bigint, wal_status INTO cur, st
          FROM pg_replication_slots WHERE slot_name = slot;
        IF NOT FOUND THEN how := 'dropped'; EXIT; END IF;
        IF st = 'lost' OR cur IS NULL THEN how := 'invalidated (wal_status lost)'; EXIT; END IF;
        peak := greatest(peak, cur);
        IF clock_timestamp() - t0 > make_interval(secs => timeout_s) THEN how := 'timeout'; RETURN; END IF;
        PERFORM pg_sleep(0.05);
    END LOOP;
    gone_after_s := extract(epoch FROM clock_timestamp() - t0);
END $$;

-- B6: watch a slot and pg_wal every 50 ms. When the slot first retains more than
-- limit_bytes (the breach), note the time and pg_wal's size; return how long after the
-- breach pg_wal had shrunk by half the limit (the WAL given back on disk), or 'timeout'.
CREATE FUNCTION bench_wal_freed(slot text, limit_bytes bigint, timeout_s float8,
    OUT breach_to_freed_s float8, OUT pg_wal_at_breach bigint, OUT pg_wal_after bigint, OUT how text)
LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz := clock_timestamp();
    tb timestamptz;
    cur bigint;
    w bigint;
    prev_t timestamptz;
    prev_w bigint;
BEGIN
    LOOP
        SELECT COALESCE(sum(size), 0) INTO w FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$';
        IF tb IS NULL THEN
            SELECT (pg_current_wal_insert_lsn() - restart_lsn)::bigint INTO cur
              FROM pg_replication_slots WHERE slot_name = slot;
            IF cur > limit_bytes THEN tb := clock_timestamp(); pg_wal_at_breach := w;
            ELSIF NOT FOUND AND prev_t IS NOT NULL THEN
                -- Dropped between two samples, before one saw it over the limit (the guard
                -- probes the WAL position): the breach came after the last sample that saw
                -- the slot under it; count from there (over-counting by up to 50 ms).
                tb := prev_t; pg_wal_at_breach := GREATEST(w, prev_w);
            ELSE
                prev_t := clock_timestamp(); prev_w := w;
            END IF;
        ELSIF w <= pg_wal_at_breach - limit_bytes / 2 THEN
            breach_to_freed_s := extract(epoch FROM clock_timestamp() - tb);
            pg_wal_after := w; how := 'freed'; RETURN;
        END IF;
        IF clock_timestamp() - t0 > make_interval(secs => timeout_s) THEN
            pg_wal_after := w; how := 'timeout'; RETURN;
        END IF;
        PERFORM pg_sleep(0.05);
    END LOOP;
END $$;

-- B6: write WAL (1 MB inserts into table filler, truncated as it goes) until the slot
-- retains at least target bytes.
CREATE FUNCTION bench_fill_to(slot text, target bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    cur bigint;
BEGIN
    LOOP
        SELECT (pg_current_wal_insert_lsn() - restart_lsn)::bigint INTO cur FROM pg_replication_slots WHERE slot_name = slot;
        EXIT WHEN cur IS NULL OR cur >= target;
        INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 1000);
        TRUNCATE filler;
    END LOOP;
    RETURN cur;
END $$;

-- B8: from the moment a slot's inactivity limit is reached (its inactive_since, as core
-- or the guard tracks it, plus the limit) until core invalidates it or the guard drops it,
-- and until pg_wal has shrunk by half of what the slot pinned. `tracker`: 'core' or 'guard'.
-- Both are timed from outside, the same way: pg_replication_slots polled every 5 ms from
-- the moment inactive_since is known (a drop before the limit shows as a negative time),
-- never from the guard's own record of what it did.
CREATE FUNCTION bench_idle_limit(slot text, tracker text, limit_s float8, pinned bigint, timeout_s float8,
    OUT acted_s float8, OUT freed_s float8, OUT pg_wal_at_limit bigint, OUT pg_wal_after bigint, OUT how text)
LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz := clock_timestamp();
    since timestamptz;
    at_limit timestamptz;
    now_ timestamptz;
    wal bigint;
    reason text;
BEGIN
    LOOP
        IF tracker = 'core' THEN
            SELECT inactive_since INTO since FROM pg_replication_slots WHERE slot_name = slot;
        ELSE
            SELECT inactive_since INTO since FROM pgslotguard.tracking WHERE slot_name = slot;
        END IF;
        EXIT WHEN since IS NOT NULL OR clock_timestamp() > t0 + make_interval(secs => timeout_s);
        PERFORM pg_sleep(0.02);
    END LOOP;
    at_limit := since + make_interval(secs => limit_s);
    LOOP
        now_ := clock_timestamp();
        -- pg_wal as the limit comes: sampled half a second before it, since a guard that
        -- acts within milliseconds has dropped the slot and checkpointed by the time a
        -- sample taken after the limit reads the directory.
        IF pg_wal_at_limit IS NULL AND now_ >= at_limit - interval '0.5 s' THEN
            SELECT sum(size) INTO pg_wal_at_limit FROM pg_ls_waldir();
        END IF;
        IF acted_s IS NULL THEN
            SELECT invalidation_reason INTO reason FROM pg_replication_slots WHERE slot_name = slot;
            IF NOT FOUND OR reason IS NOT NULL THEN
                acted_s := extract(epoch FROM clock_timestamp() - at_limit);
                how := COALESCE('invalidated: ' || reason, 'dropped');
            END IF;
        END IF;
        IF now_ >= at_limit AND pg_wal_at_limit IS NOT NULL THEN
            SELECT sum(size) INTO wal FROM pg_ls_waldir();
            IF wal <= pg_wal_at_limit - pinned / 2 THEN
                freed_s := extract(epoch FROM clock_timestamp() - at_limit);
                pg_wal_after := wal;
                RETURN;
            END IF;
        END IF;
        IF now_ > at_limit + make_interval(secs => timeout_s) THEN
            SELECT sum(size) INTO pg_wal_after FROM pg_ls_waldir();
            how := COALESCE(how, 'nothing happened') || ' (timed out)';
            RETURN;
        END IF;
        PERFORM pg_sleep(0.005);
    END LOOP;
END $$;

-- B1's second reference: the events table alone. The shape of pgslotguard.event_log (an
-- identity key, the time with its index, the action checked against a list), so that
-- "create + drop + an event row per call" costs what issue 20's item 7 adds to a round
-- trip, without the store or the extension's code.
CREATE TABLE bench_events (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    slot_name name,
    action    text NOT NULL CHECK (action IN ('lease', 'renew', 'release', 'keep', 'expire_drop',
                   'retained_drop', 'age_drop', 'inactive_drop', 'space_drop', 'terminate',
                   'lost_drop', 'stalled_drop', 'xmin_drop', 'would_drop', 'checkpoint', 'warn', 'error')),
    reason    text,
    actor     text NOT NULL,
    lease_owner name
);
CREATE INDEX ON bench_events (at);
