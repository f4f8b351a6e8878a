-- B1, baseline: PostgreSQL's own create (WAL reserved now) + drop, one slot per client.
SELECT slot_name FROM pg_create_physical_replication_slot('bench_c_' || :client_id, true);
SELECT pg_drop_replication_slot('bench_c_' || :client_id);
