-- B2, pgslotguard: one full enforcement pass (dry run: decide and record, touch nothing).
SELECT count(*) FROM backup_slot_enforce(true);
