//! Signed-jobs benchmark against the real agent (release build) on an apt sandbox:
//!
//! 1. hostile flood: 10,000 envelopes with bad signatures sent as fast as 32 callers over 4
//!    mTLS connections can: rejections/s, the agent's RSS growth, and GetStatus p99 from a
//!    separate caller during the flood against its p99 at idle;
//! 2. soak: consecutive dry-run jobs (BENCH_JOBS, default 1,000): RSS after the 100th and after
//!    the last, and the journal's disk use with a short history retention.
//!
//! Run with `cargo bench --bench jobs`, or `BENCH_JOBS=200 cargo bench --bench jobs`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use patch_agent_wire::job::trust::SigningKey;
use patch_agent_wire::proto::{AgentClient, v1 as pb};
use prost::Message;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

const FLOOD: usize = 10_000;

fn main() {
    let jobs: usize = std::env::var("BENCH_JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = tmp.path().join("apt");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/apt-sandbox.sh");
    assert!(
        run(Command::new("bash").arg(&fixture).arg(&s))
            .status
            .success()
    );
    let keys = tmp.path().join("keys");
    assert!(
        run(Command::new(patchctl()).args(["keys", "new"]).arg(&keys))
            .status
            .success()
    );
    let trusted = tmp.path().join("trusted");
    std::fs::create_dir_all(&trusted).expect("trusted");
    std::fs::copy(keys.join("signing.pem"), trusted.join("signing.pem")).expect("copy");
    let pki = Pki::new(tmp.path(), "pki");
    let dir = tmp.path().join("agent");
    let sd = s.display();
    let extra = format!(
        "[packages]\nmanager = \"apt\"\nscan_on_start = false\napt_config = \"{sd}/apt.conf\"\ndpkg_status = \"{sd}/root/var/lib/dpkg/status\"\nreboot_required_file = \"{sd}/root/run/reboot-required\"\n[jobs]\ntrusted_keys_dir = \"{}\"\nmin_free_mib = 1\nhistory_retention = \"1s\"\nqueue_size = 64\n",
        trusted.display()
    );
    let agent = Agent::start(&dir, &config_text(&dir, &pki, &extra));
    let pid = agent.child.id();
    let signer = SigningKey::read(&keys.join("signing.key")).expect("key");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("rt");
    patch_agent_service::tls::install_default_provider();
    let channels: Vec<_> = (0..4)
        .map(|_| agent_channel(&rt, &pki, &agent.addr))
        .collect();
    let probe = agent_channel(&rt, &pki, &agent.addr);

    // Idle GetStatus latency.
    let idle = rt.block_on(status_latencies(
        probe.clone(),
        Duration::from_secs(3),
        None,
    ));
    let rss_before = patchctl::bench::memory_kib(pid).expect("rss").0;

    // 1. Flood of bad signatures.
    let job = pb::Job {
        job_id: "flood".into(),
        targets: vec!["test-host".into()],
        expires_at: Some((SystemTime::now() + Duration::from_secs(3600)).into()),
        action: Some(pb::job::Action::Scan(pb::ScanAction {})),
        ..Default::default()
    };
    let payload = job.encode_to_vec();
    let mut signature = signer.sign(&payload);
    signature[0] ^= 0xff;
    let env = pb::SignedJob {
        payload,
        key_id: signer.key_id(),
        signature,
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The probe runs on its own thread and runtime, so its latency is the agent's, not the time
    // it waits behind the flood's tasks in this process.
    let probe_thread = {
        let (probe, stop) = (probe.clone(), stop.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("rt");
            rt.block_on(status_latencies(
                probe,
                Duration::from_secs(600),
                Some(stop),
            ))
        })
    };
    let (rejected, elapsed) = rt.block_on(async {
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..32 {
            let mut client = AgentClient::new(channels[i % channels.len()].clone());
            let env = env.clone();
            tasks.spawn(async move {
                let mut n = 0usize;
                for _ in 0..FLOOD / 32 + usize::from(i < FLOOD % 32) {
                    match client.submit_job(env.clone()).await {
                        Err(s) if s.code() == tonic::Code::Unauthenticated => n += 1,
                        other => panic!("unexpected answer to a bad signature: {other:?}"),
                    }
                }
                n
            });
        }
        let mut rejected = 0;
        while let Some(r) = tasks.join_next().await {
            rejected += r.expect("task");
        }
        (rejected, started.elapsed())
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let during = probe_thread.join().expect("probe");
    let rss_after = patchctl::bench::memory_kib(pid).expect("rss").0;
    println!("| metric | value | target |");
    println!("|---|---|---|");
    println!(
        "| hostile flood: {rejected} bad-signature envelopes, 32 callers / 4 mTLS connections | {:.0} rejections/s ({:.2} s) | >= 10,000/s |",
        rejected as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "| agent RSS across the flood | {:.1} -> {:.1} MiB ({:+} KiB) | growth <= 1 MiB |",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        rss_after as i64 - rss_before as i64
    );
    println!(
        "| GetStatus p99, one sequential caller: idle vs during the flood | {:.2} ms vs {:.2} ms ({:.2}x; {} and {} calls) | <= 2x |",
        p99(&idle),
        p99(&during),
        p99(&during) / p99(&idle).max(0.001),
        idle.len(),
        during.len()
    );

    // 2. Soak: consecutive dry-run jobs.
    let mut client = AgentClient::new(channels[0].clone());
    let mut rss_100 = 0;
    let started = Instant::now();
    for i in 1..=jobs {
        let job = pb::Job {
            job_id: format!("soak-{i}"),
            targets: vec!["test-host".into()],
            expires_at: Some((SystemTime::now() + Duration::from_secs(2)).into()),
            action: Some(pb::job::Action::Upgrade(pb::UpgradeAction {
                scope: pb::UpgradeScope::All as i32,
                ..Default::default()
            })),
            dry_run: true,
            ..Default::default()
        };
        let payload = job.encode_to_vec();
        let env = pb::SignedJob {
            signature: signer.sign(&payload),
            key_id: signer.key_id(),
            payload,
        };
        rt.block_on(client.submit_job(env)).expect("submit");
        loop {
            let st = rt
                .block_on(client.get_job(pb::GetJobRequest {
                    job_id: format!("soak-{i}"),
                }))
                .expect("get")
                .into_inner();
            if matches!(
                pb::JobState::try_from(st.state),
                Ok(pb::JobState::Succeeded | pb::JobState::SucceededRebootRequired)
            ) {
                break;
            }
            assert!(
                !matches!(
                    pb::JobState::try_from(st.state),
                    Ok(pb::JobState::Failed | pb::JobState::TimedOut)
                ),
                "soak job failed: {st:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        if i == 100.min(jobs) {
            rss_100 = patchctl::bench::memory_kib(pid).expect("rss").0;
        }
    }
    let rss_last = patchctl::bench::memory_kib(pid).expect("rss").0;
    let journal_dir = dir.join("state/jobs");
    let files = std::fs::read_dir(&journal_dir)
        .map(|d| d.count())
        .unwrap_or(0);
    let bytes: u64 = std::fs::read_dir(&journal_dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    println!(
        "| soak: {jobs} consecutive dry-run upgrade jobs ({:.1} s, {:.0} ms/job) | RSS after 100th {:.1} MiB, after last {:.1} MiB ({:+} KiB) | last <= 100th + 2 MiB |",
        started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64() * 1000.0 / jobs as f64,
        rss_100 as f64 / 1024.0,
        rss_last as f64 / 1024.0,
        rss_last as i64 - rss_100 as i64
    );
    println!(
        "| journal after the soak (expiry 2 s, history_retention 1 s) | {files} files, {:.1} KiB | bounded by retention |",
        bytes as f64 / 1024.0
    );
}

/// Sequential GetStatus calls until `limit` passes or `stop` is set; latencies in ms.
async fn status_latencies(
    channel: tonic::transport::Channel,
    limit: Duration,
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) -> Vec<f64> {
    let mut client = AgentClient::new(channel);
    let end = Instant::now() + limit;
    let mut out = Vec::new();
    while Instant::now() < end
        && !stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst))
    {
        let t = Instant::now();
        client
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("status");
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    out
}

fn p99(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}
