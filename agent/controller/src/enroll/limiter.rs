//! Failed enrolments, counted per source address: past the limit in a window, an address
//! is told to wait, so a token cannot be guessed from one place (it has 128 random bits; this
//! also keeps a misconfigured image fleet from hammering the controller).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Limiter {
    max_failures: u32,
    window: Duration,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Addresses remembered at most; past it, expired windows are dropped first.
const MAX_TRACKED: usize = 100_000;

impl Limiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            max_failures,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Err(wait) when `ip` failed too often in the current window.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let Ok(seen) = self.seen.lock() else {
            return Ok(());
        };
        match seen.get(&ip) {
            Some((start, n)) if *n >= self.max_failures && now < *start + self.window => {
                Err(*start + self.window - now)
            }
            _ => Ok(()),
        }
    }

    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        if seen.len() >= MAX_TRACKED {
            let window = self.window;
            seen.retain(|_, (start, _)| now < *start + window);
        }
        let entry = seen.entry(ip).or_insert((now, 0));
        if now >= entry.0 + self.window {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_address_and_forgets_after_the_window() {
        let l = Limiter::new(3, Duration::from_secs(60));
        let (a, b): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check(a, t0).is_ok());
            l.failed(a, t0);
        }
        let wait = l
            .check(a, t0 + Duration::from_secs(10))
            .expect_err("limited");
        assert_eq!(wait, Duration::from_secs(50));
        assert!(l.check(b, t0).is_ok(), "another address is not affected");
        assert!(l.check(a, t0 + Duration::from_secs(61)).is_ok());
    }
}
