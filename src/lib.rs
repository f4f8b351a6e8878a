//! pgslotguard: replication slots for backups as leases, enforced by a background worker.
//!
//! Module map, from the bottom up: `validate` and `policy` (pure logic, unit-tested
//! without PostgreSQL), `error` (SQLSTATE + HINT mapping), `guc` (every setting, the
//! `Policy` snapshot), `txid` (whose change, and where its transaction stands), `store`
//! (the per-node lease store: files under the data directory, shared memory), `slots`
//! (core's slot array; making and dropping slots by identity), `event` and `notify`
//! (events and their payloads), `state` (SPI: events, server facts), `machine` (the lease
//! state machine: every transition of a lease's slot), `xact` (lease changes follow their
//! transaction), `api` (the SQL functions), `enforce` (one pass, shared by the worker and
//! backup_slot_enforce), `views`, `shmem` (the worker's status block), `worker`.

use pgrx::pg_sys;
use pgrx::prelude::*;

pub mod api;
pub mod enforce;
pub mod error;
pub mod event;
pub mod guc;
pub mod machine;
pub mod notify;
pub mod policy;
pub mod shmem;
pub mod slots;
pub mod state;
pub mod testhook;
pub mod store;
pub mod time;
pub mod txid;
pub mod upgrade;
pub mod validate;
pub mod views;
pub mod worker;
pub mod xact;

::pgrx::pg_module_magic!(name, version);

/// The library's own (Rust) allocations come from mimalloc, PostgreSQL's stay with its
/// memory contexts and libc. A pass at a thousand slots makes and frees about a megabyte
/// of small objects; glibc's malloc gave the top of that heap back to the kernel after a
/// pass and took it again at the next, at 80 page faults a pass, in some backends and not
/// others depending on where a longer-lived allocation happened to sit. mimalloc reuses
/// freed pages and returns idle ones to the kernel after a delay.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!("../sql/tables.sql", name = "tables", requires = ["bootstrap"]);
extension_sql_file!("../sql/api.sql", name = "api", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    // Skip the worker and shared memory during pg_upgrade, as pg_cron does.
    if unsafe { pg_sys::IsBinaryUpgrade } {
        return;
    }
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::init();
        store::shmem::init();
        worker::register();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Used by `cargo pgrx test`: the test cluster preloads pgslotguard so the worker runs.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pgslotguard'",
            "pgslotguard.database = 'pgrx_tests'",
            "pgslotguard.naptime = '1s'",
            "max_replication_slots = 64",
            "max_wal_senders = 16",
            "wal_level = logical",
        ]
    }
}
