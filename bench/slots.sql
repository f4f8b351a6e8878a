-- B2, baseline: read every slot.
SELECT count(*) FROM (SELECT * FROM pg_replication_slots) s;
