//! `patchctl serve --retain`: history older than this is deleted in the background, an hour
//! apart, a small batch at a time ([`BATCH`] rows of each kind per write), so a report arriving
//! meanwhile waits behind one small batch at most, never behind the whole purge.

use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;

/// Rows of each kind deleted per write.
pub const BATCH: usize = 1000;

/// How often the purge runs (and once at start).
const EVERY: Duration = Duration::from_secs(3600);

/// Shortest `--retain`: a day.
pub const MIN_RETAIN: Duration = Duration::from_secs(86_400);

/// `--retain`: a duration of at least a day.
pub fn parse_retain(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 400d)"))?;
    if d < MIN_RETAIN {
        return Err(format!("{s:?}: keep at least a day of history"));
    }
    Ok(d)
}

/// Purges forever, every [`EVERY`].
pub async fn run(store: Arc<dyn Store>, retain: Duration) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        let cutoff =
            crate::now().saturating_sub(i64::try_from(retain.as_secs()).unwrap_or(i64::MAX));
        match prune_all(&*store, cutoff).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(rows = n, retain = %humantime::format_duration(retain), "Deleted history older than the retention")
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot delete old history; trying again in an hour")
            }
        }
    }
}

/// How old a host's last scan may be and still count (as `patchctl compliance` defaults).
pub const STALE_AFTER_SECS: i64 = 48 * 3600;

/// Records the day's compliance figures at start and every hour (`compliance --history`);
/// the day's last snapshot is the one kept.
pub async fn record_compliance(store: Arc<dyn Store>) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        let figures = match store.compliance(crate::now(), STALE_AFTER_SECS).await {
            Ok(d) => store.record_compliance(d).await,
            Err(e) => Err(e),
        };
        if let Err(e) = figures {
            tracing::warn!(error = %e, "Cannot record today's compliance figures; trying again in an hour");
        }
    }
}

/// Deletes everything older than `cutoff`, batch by batch; rows deleted.
pub async fn prune_all(store: &dyn Store, cutoff: i64) -> Result<usize, String> {
    let mut total = 0;
    loop {
        let n = store.prune(cutoff, BATCH).await?;
        total += n;
        if n == 0 {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn retain_is_a_day_or_more() {
        assert_eq!(
            super::parse_retain("400d").expect("ok").as_secs(),
            400 * 86_400
        );
        assert!(super::parse_retain("1d").is_ok());
        assert!(
            super::parse_retain("23h")
                .expect_err("short")
                .contains("at least a day")
        );
        assert!(super::parse_retain("soon").is_err());
    }
}
