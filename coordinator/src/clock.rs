//! Wall-clock time, read only by the leader when it stamps a command (and by
//! the driver's timers). `apply` never calls this.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
