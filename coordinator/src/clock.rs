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

/// The wall-clock time `age` ago, in ms since the epoch (at least 1, so
/// that 0 can mean "no bound"): what "changed within `age`" filters on.
pub fn ms_ago(age: std::time::Duration) -> i64 {
    now_ms()
        .saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
        .max(1)
}

/// How long ago (or ahead) a wall-clock time is, in its two largest
/// units: "3s ago", "1h 2m ago", "in 40s", "now".
pub fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let now = now_ms();
    let secs = (now - ms).unsigned_abs() / 1000;
    let text = match secs {
        0 => return "now".into(),
        1..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m {}s", secs / 60, secs % 60),
        3600..=86399 => format!("{}h {}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {}h", secs / 86400, secs % 86400 / 3600),
    };
    if now >= ms {
        format!("{text} ago")
    } else {
        format!("in {text}")
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
