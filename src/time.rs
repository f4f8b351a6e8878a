//! Clocks: PostgreSQL's timestamps (microseconds since 2000-01-01) and the monotonic
//! clock the worker sleeps on.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;

/// Microseconds since 2000-01-01 (PostgreSQL's `TimestampTz`) → SQL argument.
pub fn ts(us: i64) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(us as pg_sys::TimestampTz).unwrap_or_else(|_| TimestampWithTimeZone::negative_infinity())
}

pub fn us(t: TimestampWithTimeZone) -> i64 {
    pg_sys::TimestampTz::from(t)
}

/// The clock time now, as PostgreSQL reads it.
pub fn now_us() -> i64 {
    // SAFETY: reads the system clock; no state of the server is touched.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Microseconds on the monotonic clock (which no one sets), from the first call in this
/// process: what sleeps and the wall-clock jump rule (policy::timing) are timed on.
pub fn mono_us() -> i64 {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(std::time::Instant::now).elapsed().as_micros() as i64
}

