//! Pause points for the crash tests (tests/machine.rs, tests/chaos.rs): built only with the
//! `pg_test` feature, never into a package. With `pgslotguard.test_pause_at` naming a
//! point (`POINT` or `POINT:MS`, several separated by commas), a process that reaches it
//! logs `pgslotguard test: pausing at POINT (pid N)` and sleeps there (MS milliseconds, or a
//! minute; interruptibly where interrupts are allowed), so that a test can kill it at
//! exactly that point with a real SIGKILL, or cancel it.

#[cfg(feature = "pg_test")]
pub fn pause(point: &str) {
    use pgrx::pg_sys;
    let Some(at) = crate::guc::test_pause_at() else { return };
    let Some(ms) = at.split(',').find_map(|p| {
        let (name, ms) = p.trim().split_once(':').map_or((p.trim(), 60_000u64), |(n, m)| (n, m.parse().unwrap_or(60_000)));
        (name == point).then_some(ms)
    }) else {
        return;
    };
    // SAFETY: this process's PID.
    let pid = unsafe { pg_sys::MyProcPid };
    pgrx::log!("pgslotguard test: pausing at {point} (pid {pid})");
    // Naps of 10 ms on the latch: a cancel or a timeout ends the pause with its ERROR
    // where interrupts are not held. If the postmaster is gone, the process exits as core's
    // waits do (WL_EXIT_ON_PM_DEATH), its transaction aborted; but a pause in a commit
    // callback, after the commit record, only ends: exiting there would abort a committed
    // transaction (core PANICs: "cannot abort transaction ..., it was already committed").
    for _ in 0..ms.div_ceil(10) {
        // SAFETY: a wait on this process's own latch; the interrupt check after it.
        let rc = unsafe {
            let rc = pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_POSTMASTER_DEATH) as i32,
                10,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            rc
        };
        if rc & pg_sys::WL_POSTMASTER_DEATH as i32 != 0 {
            // SAFETY: reads this backend's transaction state.
            if unsafe { pg_sys::IsTransactionState() } {
                pgrx::log!("pgslotguard test: the postmaster is gone; exiting at {point}");
                // SAFETY: what core's latch waits do on postmaster death.
                unsafe { pg_sys::proc_exit(1) };
            }
            pgrx::log!("pgslotguard test: the postmaster is gone; pause at {point} (after the commit record) ended");
            return;
        }
        pgrx::check_for_interrupts!();
    }
}

#[cfg(not(feature = "pg_test"))]
#[inline(always)]
pub fn pause(_point: &str) {}
