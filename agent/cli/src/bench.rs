//! `patchctl bench status`: drives `GetStatus` with N concurrent callers for T seconds and
//! reports throughput and latency, plus the agent's memory if its pid is known.

use patch_agent_wire::proto::{AgentClient, v1 as pb};
use serde::Serialize;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// What one load run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub concurrency: usize,
    pub connections: usize,
    pub seconds: f64,
    pub requests: u64,
    pub errors: u64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub first_error: Option<String>,
}

/// Runs `concurrency` callers spread over `channels` until `duration` passes.
pub async fn run_status_load(
    channels: &[Channel],
    concurrency: usize,
    duration: Duration,
) -> Report {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..concurrency {
        let mut client = AgentClient::new(channels[i % channels.len()].clone());
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut first_error = None;
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.get_status(pb::GetStatusRequest {}).await {
                    Ok(_) => lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32),
                    Err(s) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{}: {}", s.code(), s.message()));
                    }
                }
            }
            (lat, errors, first_error)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    while let Some(Ok((lat, e, fe))) = tasks.join_next().await {
        all.extend(lat);
        errors += e;
        if first_error.is_none() {
            first_error = fe;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let idx = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        f64::from(all[idx]) / 1000.0
    };
    Report {
        concurrency,
        connections: channels.len(),
        seconds,
        requests: all.len() as u64,
        errors,
        requests_per_second: all.len() as f64 / seconds,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: all.last().map_or(0.0, |&m| f64::from(m) / 1000.0),
        first_error,
    }
}

/// A process's resident set size and its peak, in KiB, from /proc/PID/status.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GetStatus x {} callers over {} connection(s), {:.1}s: {} ok, {} errors, {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            self.concurrency,
            self.connections,
            self.seconds,
            self.requests,
            self.errors,
            self.requests_per_second,
            self.p50_ms,
            self.p99_ms,
            self.max_ms
        )?;
        if let Some(e) = &self.first_error {
            write!(f, " (first error: {e})")?;
        }
        Ok(())
    }
}
