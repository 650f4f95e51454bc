//! The wall clock the engine reads: expiry, maintenance windows, journal times. The daemon
//! passes [`SystemClock`]; tests pass a clock that moves with tokio's paused time, so windows,
//! expiry and max_duration can be exercised in process without waiting.

use std::time::SystemTime;

pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

/// The host's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}
