-- B1, reference: PostgreSQL's own create + drop, each committed with one event row, as a
-- lease and a release commit theirs (what issue 20 item 7 alone adds to a round trip).
BEGIN;
SELECT slot_name FROM pg_create_physical_replication_slot('bench_e_' || :client_id, true);
INSERT INTO bench_events (slot_name, action, reason, actor, lease_owner) VALUES ('bench_e_' || :client_id, 'lease', 'created slot for 01:00:00', 'postgres', 'postgres');
COMMIT;
BEGIN;
SELECT pg_drop_replication_slot('bench_e_' || :client_id);
INSERT INTO bench_events (slot_name, action, reason, actor, lease_owner) VALUES ('bench_e_' || :client_id, 'release', 'slot dropped', 'postgres', 'postgres');
COMMIT;
