-- B1, pgslotguard: one lease + release round trip per transaction, one slot per client.
SELECT slot_name FROM backup_slot_lease('bench_l_' || :client_id, '1 hour');
SELECT backup_slot_release('bench_l_' || :client_id);
