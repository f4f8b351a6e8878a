//! `ALTER EXTENSION pgslotguard UPDATE` from 0.1.0: version 0.1.0 kept leases, the
//! guard's tracking of slots and the warnings it had given in tables of the extension's
//! database; 0.2.0 keeps them in the per-node store. The update script
//! (sql/pgslotguard--0.1.0--0.2.0.sql) calls this function once, before it drops the
//! tables; it is not part of a fresh install (`sql = false`).
//!
//! Each table row becomes (part of) a store record, written durably. Running it twice
//! writes the same records again, so an update that failed after it can simply be run
//! again. A lease whose slot is not on this server is moved all the same; the guard's next
//! pass ends it as it ends any lease whose slot was dropped.

use crate::store::{self, IntentRec, LeaseRec, SeenRec, SlotRecord};
use pgrx::prelude::*;
use std::collections::BTreeMap;

/// Interval → microseconds (a day is 24 h, a month 30 days, as PostgreSQL compares them).
/// Every operator qualified (the function's search_path is pinned too): an operator a
/// role made in a writable schema must never be picked up by an update a superuser runs.
const US: &str = "(pg_catalog.extract('epoch', $1) OPERATOR(pg_catalog.*) 1000000::pg_catalog.numeric)::pg_catalog.int8";

fn us_of(col: &str) -> String {
    US.replace("$1", col)
}

/// Created by the update script with `SET search_path = pg_catalog, pg_temp` (its SQL is
/// there, `sql = false`), and its queries qualify every operator besides.
#[pg_extern(sql = false, name = "import_0_1_0_tables")]
fn import_0_1_0_tables() -> i64 {
    crate::error::or_report(import())
}

fn ts(v: Option<pgrx::datum::TimestampWithTimeZone>) -> Option<i64> {
    v.map(crate::state::us)
}

fn import() -> Result<i64, crate::error::GuardError> {
    let mut records: BTreeMap<String, SlotRecord> = BTreeMap::new();
    let mut leases = 0i64;
    Spi::connect(|c| -> Result<(), pgrx::spi::Error> {
        let q = format!(
            "SELECT slot_name::pg_catalog.text, holder, owner::pg_catalog.text, leased_at, renewed_at, expires_at, max_retained,
                    {}, {}, adopted, reserved_lsn::pg_catalog.text, limit_by_superuser
               FROM pgslotguard.lease_data",
            us_of("max_inactive"),
            us_of("max_age")
        );
        for row in c.select(&q, None, &[])? {
            let name: String = row.get(1)?.unwrap_or_default();
            let lease = LeaseRec {
                holder: row.get(2)?,
                owner: row.get(3)?.unwrap_or_default(),
                leased_at: ts(row.get(4)?).unwrap_or(0),
                renewed_at: ts(row.get(5)?),
                expires_at: ts(row.get(6)?).unwrap_or(0),
                max_retained: row.get(7)?,
                max_inactive: row.get(8)?,
                max_age: row.get(9)?,
                max_xmin_age: None,
                adopted: row.get(10)?.unwrap_or(false),
                reserved_lsn: row.get::<String>(11)?.as_deref().and_then(crate::validate::parse_lsn),
                limit_by_superuser: row.get(12)?.unwrap_or(false),
                slot: store::file::slot_identity(&name),
                lease_id: 0,
                ..Default::default()
            };
            records.entry(name.clone()).or_insert_with(|| SlotRecord::new(&name)).lease = Some(lease);
            leases += 1;
        }
        let q = "SELECT slot_name::pg_catalog.text, first_seen, inactive_since, drop_action, drop_reason, stalled_lsn::pg_catalog.text, stalled_since
                   FROM pgslotguard.slot_seen";
        for row in c.select(q, None, &[])? {
            let name: String = row.get(1)?.unwrap_or_default();
            let action: Option<String> = row.get(4)?;
            let reason: Option<String> = row.get(5)?;
            let stalled_lsn = row.get::<String>(6)?.as_deref().and_then(crate::validate::parse_lsn);
            let seen = SeenRec {
                first_seen: ts(row.get(2)?).unwrap_or(0),
                inactive_since: ts(row.get(3)?),
                stalled: stalled_lsn.zip(ts(row.get(7)?)),
                dropping: action.map(|action| IntentRec { action, reason: reason.unwrap_or_default(), at: 0, xid: None, slot: None }),
                slot: None,
            };
            records.entry(name.clone()).or_insert_with(|| SlotRecord::new(&name)).seen = Some(seen);
        }
        for row in c.select("SELECT slot_name::pg_catalog.text, limit_name FROM pgslotguard.warned", None, &[])? {
            let name: String = row.get(1)?.unwrap_or_default();
            let limit: String = row.get(2)?.unwrap_or_default();
            records.entry(name.clone()).or_insert_with(|| SlotRecord::new(&name)).warned.push(limit);
        }
        Ok(())
    })?;
    store::change(|w| {
        for rec in records.values() {
            w.put(rec)?;
        }
        Ok(())
    })?;
    log!("pgslotguard: moved {leases} lease(s) and the guard's tracking of {} slot name(s) from version 0.1.0's tables into the store", records.len());
    Ok(leases)
}
