//! Wall-clock time, read only by the leader when it stamps a command (and by
//! the driver's timers). `apply` never calls this.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time as the driver reads it: behind a trait so that a
/// simulation can move it (jumps included).
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The machine's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
