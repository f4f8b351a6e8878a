//! The status block the guard worker publishes in shared memory, read by
//! `pgslotguard.status`. Exists only when the library is in shared_preload_libraries.

use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::*;
use pgrx::{pg_shmem_init, pg_sys};
use std::sync::atomic::{AtomicBool, Ordering};

const ERR_LEN: usize = 512;
/// NAMEDATALEN: a slot name fits.
const NAME_LEN: usize = 64;

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
    /// Slots skipped because another transaction held their lock: none since 0.2.0 (lease
    /// changes apply at commit, and the guard never waits for a user's transaction); kept
    /// so that the status view keeps its columns.
    pub busy_skips: i64,
    pub last_busy_at: i64,
    last_busy_len: usize,
    last_busy: [u8; NAME_LEN],
    /// A checkpoint the guard requested and whose end it has not recorded yet.
    pub ckpt_pending: bool,
    pub ckpt_fast: bool,
    /// pg_control's checkpoint LSN when it was requested: it changes when one completes.
    pub ckpt_lsn_before: u64,
    pub ckpt_pg_wal_before: i64,
    pub ckpt_projected: i64,
    pub ckpt_drops: i64,
    pub ckpt_requested_at: i64,
    /// A checkpoint requested for the floor alone freed nothing: the next such request
    /// waits until then (`enforce::CHECKPOINT_BACKOFF_US`).
    pub ckpt_quiet_until: i64,
    /// A lease call committed and woke the worker (`wake_worker`); the worker clears it.
    pub wake_requested: bool,
    /// Probes of the WAL position between passes (policy::timing).
    pub probes: i64,
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
            busy_skips: 0,
            last_busy_at: 0,
            last_busy_len: 0,
            last_busy: [0; NAME_LEN],
            ckpt_pending: false,
            ckpt_fast: false,
            ckpt_lsn_before: 0,
            ckpt_pg_wal_before: 0,
            ckpt_projected: 0,
            ckpt_drops: 0,
            ckpt_requested_at: 0,
            ckpt_quiet_until: 0,
            wake_requested: false,
            probes: 0,
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
        self.last_error_len = copy_truncated(&mut self.last_error, msg);
        self.last_error_at = at;
    }
    pub fn last_busy(&self) -> Option<String> {
        (self.last_busy_len > 0).then(|| String::from_utf8_lossy(&self.last_busy[..self.last_busy_len]).into_owned())
    }
    pub fn set_last_busy(&mut self, slot: &str, at: i64) {
        self.last_busy_len = copy_truncated(&mut self.last_busy, slot);
        self.last_busy_at = at;
    }
}

/// Copy as much of `text` as fits into `buf`, cut at a character boundary; returns the length.
fn copy_truncated(buf: &mut [u8], text: &str) -> usize {
    let mut n = text.len().min(buf.len());
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    buf[..n].copy_from_slice(&text.as_bytes()[..n]);
    n
}

// SAFETY: WorkerStatus is plain old data (integers, bools and byte arrays, no pointers),
// so a copy in shared memory means the same in every process; all access goes through
// the PgLwLock below.
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

/// Is a guard worker process alive right now? The worker publishes its PID when it
/// starts and clears it on every exit (`clear_pid_at_exit`, which runs on FATAL too); a
/// crash reinitialises shared memory. So a published PID is the worker's, and the check
/// that it is still in the server's process array (not merely some process with a reused
/// PID, as `kill(pid, 0)` would say) is a second guard.
pub fn worker_running() -> Option<i32> {
    let st = read()?;
    if st.pid == 0 {
        return None;
    }
    // SAFETY: BackendPidGetProc takes ProcArrayLock and returns NULL when no backend or
    // background worker of this server has that PID; the pointer is not dereferenced.
    let alive = !unsafe { pg_sys::BackendPidGetProc(st.pid) }.is_null();
    alive.then_some(st.pid)
}

/// Wake the guard worker now (set its latch), if it runs: a lease call that committed
/// has changed what the next pass must do or when.
pub fn wake_worker() {
    let Some(pid) = worker_running() else { return };
    update(|s| s.wake_requested = true);
    // SAFETY: BackendPidGetProc returns the worker's PGPROC in shared memory (or NULL if
    // it is gone); its procLatch is the latch the worker waits on, and SetLatch may be
    // called on another process's latch (that is what it is for).
    unsafe {
        let proc = pg_sys::BackendPidGetProc(pid);
        if !proc.is_null() {
            pg_sys::SetLatch(&mut (*proc).procLatch);
        }
    }
}

/// Was the worker woken by a lease call since it last asked? Clears the request.
pub fn take_wake() -> bool {
    let mut woken = false;
    update(|s| woken = std::mem::take(&mut s.wake_requested));
    woken
}

/// Called by the worker once it has published its PID: clear it when the process exits,
/// however it exits (proc_exit after SIGTERM, FATAL, ERROR escalated to FATAL).
pub fn clear_pid_at_exit() {
    // SAFETY: registers a plain function; it runs before the process detaches from shared
    // memory, when LWLocks can still be taken.
    unsafe { pg_sys::before_shmem_exit(Some(clear_pid), pg_sys::Datum::from(0)) };
}

#[pg_guard]
unsafe extern "C-unwind" fn clear_pid(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    // SAFETY: MyProcPid is this process's PID, set at start.
    let me = unsafe { pg_sys::MyProcPid };
    update(|s| {
        if s.pid == me {
            s.pid = 0;
        }
    });
}

