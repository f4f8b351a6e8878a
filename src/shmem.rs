//! The status block the guard worker publishes in shared memory, read by
//! `pgslotguard.status`. Exists only when the library is in shared_preload_libraries.

use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::*;
use pgrx::{pg_shmem_init, pg_sys};
use std::sync::atomic::{AtomicBool, Ordering};

const ERR_LEN: usize = 512;

#[derive(Copy, Clone)]
pub struct WorkerStatus {
    pub pid: i32,
    pub started_at: i64,
    pub passes: i64,
    pub drops: i64,
    pub errors: i64,
    pub last_pass_start: i64,
    pub last_pass_us: i64,
    pub next_pass: i64,
    pub last_error_at: i64,
    /// Set before the worker connects to pgslotguard.database, cleared once connected: if
    /// the connection dies (the database does not exist), the next start waits for the
    /// database quietly instead of failing every few seconds.
    pub database_missing: bool,
    last_error_len: usize,
    last_error: [u8; ERR_LEN],
}

impl Default for WorkerStatus {
    fn default() -> Self {
        WorkerStatus {
            pid: 0,
            started_at: 0,
            passes: 0,
            drops: 0,
            errors: 0,
            last_pass_start: 0,
            last_pass_us: 0,
            next_pass: 0,
            last_error_at: 0,
            database_missing: false,
            last_error_len: 0,
            last_error: [0; ERR_LEN],
        }
    }
}

impl WorkerStatus {
    pub fn last_error(&self) -> Option<String> {
        (self.last_error_len > 0)
            .then(|| String::from_utf8_lossy(&self.last_error[..self.last_error_len]).into_owned())
    }
    pub fn set_last_error(&mut self, msg: &str, at: i64) {
        let mut n = msg.len().min(ERR_LEN);
        while !msg.is_char_boundary(n) {
            n -= 1;
        }
        self.last_error[..n].copy_from_slice(&msg.as_bytes()[..n]);
        self.last_error_len = n;
        self.last_error_at = at;
    }
}

unsafe impl PGRXSharedMemory for WorkerStatus {}

pub static STATUS: PgLwLock<WorkerStatus> = unsafe { PgLwLock::new(c"pgslotguard_status") };

/// Set in _PG_init when loaded from shared_preload_libraries (so STATUS exists).
static ATTACHED: AtomicBool = AtomicBool::new(false);

pub fn init() {
    pg_shmem_init!(STATUS);
    ATTACHED.store(true, Ordering::Relaxed);
}

/// The worker's status, or None when the library was not preloaded.
pub fn read() -> Option<WorkerStatus> {
    ATTACHED.load(Ordering::Relaxed).then(|| *STATUS.share())
}

pub fn update(f: impl FnOnce(&mut WorkerStatus)) {
    if ATTACHED.load(Ordering::Relaxed) {
        f(&mut STATUS.exclusive());
    }
}

/// Is a guard worker process alive right now? (Its pid is published and the process exists.)
pub fn worker_running() -> Option<i32> {
    let st = read()?;
    if st.pid == 0 {
        return None;
    }
    // kill(pid, 0) tells whether the process exists without signalling it.
    let alive = unsafe { libc_kill(st.pid, 0) } == 0;
    alive.then_some(st.pid)
}

unsafe fn libc_kill(pid: i32, sig: i32) -> i32 {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    unsafe { kill(pid, sig) }
}

