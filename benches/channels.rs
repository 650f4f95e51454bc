//! Control-channel benchmark (release build) against the real `patchctl serve`:
//!
//! BENCH_CHANNELS (default 10,000) simulated agents in this process, each with its own
//! certificate (signed here by the dev CA), each holding one `Controller/Connect` stream, as an
//! agent with `[report] controller` does. Each answers every delivery with an admission and
//! then sends the job's final result (`ReportJob`, on the same connection). Measured:
//!
//! 1. all channels connected: the time it took, and the controller's RSS;
//! 2. one selector job relayed to all of them (`Operator/SubmitJob`): the time until every
//!    admission is back at the operator, then until every result is stored;
//! 3. the controller SIGKILLed and restarted on the same port: the time until every agent is
//!    connected again (agents reconnect with backoff and jitter, 200 ms to 5 s).
//!
//! Run with `cargo bench --bench channels` (as root: it raises its open-file limit).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use patch_agent_wire::proto::{ControllerClient, OperatorClient, v1 as pb};
use rustls::pki_types::pem::PemObject;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Endpoint;

/// One simulated agent's identity.
struct Identity {
    host: String,
    tls: Arc<rustls::ClientConfig>,
}

/// What every simulated agent counts into.
#[derive(Default)]
struct Counters {
    connected: AtomicUsize,
    admitted: AtomicUsize,
    reported: AtomicUsize,
}

/// `patchctl serve` as an operator's controller with room for every simulated agent (all dial
/// from 127.0.0.1, like a site behind one NAT address).
fn start_controller(dir: &Path, pki: &Pki, listen: &str) -> common::net::Controller {
    let extra = strings(&[
        "--operators",
        "controller",
        "--max-connections",
        "40000",
        "--max-connections-per-ip",
        "40000",
    ]);
    common::net::Controller::start_env(dir, pki, listen, None, &extra, &[("RUST_LOG", "warn")])
}

/// `n` certificates, each for its own host id, signed by the dev CA as enrolment would.
fn identities(pki: &Pki, n: usize) -> Vec<Identity> {
    let signer = patch_agent_controller::enroll::ca::Signer::load(
        &pki.path("ca.pem"),
        &pki.path("ca.key"),
        &pki.path("ca.pem"),
        Duration::from_secs(86400),
    )
    .expect("CA");
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(
        patch_agent_service::tls::load_certs(&pki.path("ca.pem")).expect("ca"),
    );
    let roots = Arc::new(roots);
    (0..n)
        .map(|i| {
            let host = format!("sim{i:05}");
            let key = patch_agent::enroll::csr::NewKey::generate(&host).expect("key");
            let issued = signer
                .issue(std::slice::from_ref(&host), &key.csr_der)
                .expect("issue");
            let chain =
                patch_agent_service::tls::parse_certs(issued.chain_pem.as_bytes()).expect("chain");
            let private =
                rustls::pki_types::PrivateKeyDer::from_pem_slice(key.key_pem().as_bytes())
                    .expect("key pem");
            let mut config =
                rustls::ClientConfig::builder_with_provider(patch_agent_service::tls::provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .expect("tls13")
                    .with_root_certificates(roots.clone())
                    .with_client_auth_cert(chain, private)
                    .expect("client cert");
            config.alpn_protocols = vec![b"h2".to_vec()];
            Identity {
                host,
                tls: Arc::new(config),
            }
        })
        .collect()
}

/// One simulated agent, forever: connect, hello, admit deliveries and report each job's
/// result; reconnect with backoff and jitter when the channel ends.
async fn agent(
    id: Arc<Identity>,
    addr: String,
    counters: Arc<Counters>,
    dialing: Arc<tokio::sync::Semaphore>,
) {
    let mut backoff =
        patch_agent::report::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let opened = {
            let _permit = dialing.acquire().await;
            open(&id, &addr).await
        };
        if let Ok((client, inbound, tx)) = opened {
            backoff.reset();
            counters.connected.fetch_add(1, Ordering::SeqCst);
            serve(&id, client, inbound, tx, &counters).await;
            counters.connected.fetch_sub(1, Ordering::SeqCst);
        }
        tokio::time::sleep(backoff.next(patch_agent::pkg::scanner::random_u64())).await;
    }
}

type Opened = (
    ControllerClient<tonic::transport::Channel>,
    tonic::Streaming<pb::ControllerMessage>,
    tokio::sync::mpsc::Sender<pb::AgentMessage>,
);

async fn open(id: &Identity, addr: &str) -> Result<Opened, String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(20))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let channel =
        patch_agent_service::tls::connect(endpoint, addr, "controller.bench", id.tls.clone())
            .await
            .map_err(|e| e.to_string())?;
    let mut client = ControllerClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(pb::ChannelHello {
            host_id: id.host.clone(),
            labels: [("fleet".to_string(), "bench".to_string())].into(),
            agent_version: "bench".into(),
        })),
    })
    .await
    .map_err(|e| e.to_string())?;
    let inbound = client
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    Ok((client, inbound, tx))
}

async fn serve(
    id: &Identity,
    mut client: ControllerClient<tonic::transport::Channel>,
    mut inbound: tonic::Streaming<pb::ControllerMessage>,
    tx: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    counters: &Counters,
) {
    while let Ok(Some(m)) = inbound.message().await {
        let Some(pb::controller_message::Message::Delivery(d)) = m.message else {
            continue;
        };
        let job: pb::Job = d
            .job
            .as_ref()
            .and_then(|j| prost::Message::decode(j.payload.as_slice()).ok())
            .unwrap_or_default();
        let status = pb::JobStatus {
            job_id: job.job_id.clone(),
            state: pb::JobState::Succeeded as i32,
            ..Default::default()
        };
        let answer = pb::AgentMessage {
            message: Some(pb::agent_message::Message::Admission(pb::Admission {
                delivery_id: d.delivery_id,
                code: 0,
                message: "queued".into(),
                status: Some(pb::JobStatus {
                    state: pb::JobState::Queued as i32,
                    ..status.clone()
                }),
            })),
        };
        if tx.send(answer).await.is_err() {
            return;
        }
        counters.admitted.fetch_add(1, Ordering::SeqCst);
        let report = pb::JobReport {
            report_id: format!("{}:{}:final", id.host, job.job_id),
            host_id: id.host.clone(),
            status: Some(status),
            r#final: true,
            ..Default::default()
        };
        if client.report_job(report).await.is_ok() {
            counters.reported.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn wait_for(what: &str, timeout: Duration, done: impl Fn() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if done() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("channels: {what} NOT reached within {timeout:?}");
    None
}

fn rss_mib(pid: u32) -> (f64, f64) {
    patchctl::bench::memory_kib(pid)
        .map(|(rss, hwm)| (rss as f64 / 1024.0, hwm as f64 / 1024.0))
        .unwrap_or_default()
}

fn main() {
    patch_agent_service::tls::install_default_provider();
    let n: usize = env_num("BENCH_CHANNELS", 10_000);
    // Each side (this generator, the controller) holds one descriptor per channel.
    let files = n as u64 + 4096;
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if soft < files {
        // prlimit (util-linux) on this process: the controller it starts inherits the limit.
        let limit = run(Command::new("prlimit")
            .arg("--pid")
            .arg(std::process::id().to_string())
            .arg(format!("--nofile={files}:{files}")));
        if !limit.status.success() {
            println!(
                "channels: the open-file limit is {soft}, below the {files} needed, and cannot be raised (run as root): {}",
                text(&limit)
            );
        }
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(tmp.path(), "pki");
    pki.issue(
        &tmp.path().join("ctl"),
        &[
            "--name",
            "controller.bench",
            "--san",
            "127.0.0.1",
            "--usage",
            "server",
        ],
    );
    let t0 = Instant::now();
    let ids: Vec<Arc<Identity>> = identities(&pki, n).into_iter().map(Arc::new).collect();
    println!(
        "channels: {n} agent certificates issued in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let mut ctl = start_controller(tmp.path(), &pki, "127.0.0.1:0");
    let addr = ctl.addr.clone();
    let (idle_rss, _) = rss_mib(ctl.child.id());

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let counters = Arc::new(Counters::default());
    // At most this many handshakes in flight from the generator: a fleet's agents do not
    // all dial in the same millisecond, and the generator shares two cores with the
    // controller it measures.
    let dialing = Arc::new(tokio::sync::Semaphore::new(256));
    for id in &ids {
        rt.spawn(agent(
            id.clone(),
            addr.clone(),
            counters.clone(),
            dialing.clone(),
        ));
    }
    let up = wait_for("all connected", Duration::from_secs(300), || {
        counters.connected.load(Ordering::SeqCst) >= n
    });
    if let Some(d) = up {
        println!(
            "channels: {n} channels connected in {:.1} s",
            d.as_secs_f64()
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    let (rss, hwm) = rss_mib(ctl.child.id());
    println!(
        "channels: controller RSS with {} connected: {rss:.1} MiB (peak {hwm:.1} MiB; {idle_rss:.1} MiB idle) = {:.1} KiB per channel",
        counters.connected.load(Ordering::SeqCst),
        (rss - idle_rss) * 1024.0 / n as f64
    );

    // One selector job to all.
    let (signing, _) = signing_key(tmp.path());
    let job = tmp.path().join("all.job");
    let out = run(Command::new(patchctl())
        .args([
            "job",
            "sign",
            "--id",
            "bench-all",
            "--selector",
            "fleet=bench",
            "--scan",
        ])
        .arg("--signing-key")
        .arg(&signing)
        .arg("-o")
        .arg(&job));
    assert!(out.status.success(), "sign: {}", text(&out));
    let env: pb::SignedJob =
        prost::Message::decode(std::fs::read(&job).expect("job").as_slice()).expect("env");
    let operator = rt.block_on(async {
        let config = patch_agent_service::tls::client_config(
            &pki.path("ca.pem"),
            &pki.path("controller.pem"),
            &pki.path("controller.key"),
        )
        .expect("operator tls");
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).expect("uri");
        OperatorClient::new(
            patch_agent_service::tls::connect(endpoint, &addr, "controller.bench", config)
                .await
                .expect("operator"),
        )
    });
    let t0 = Instant::now();
    let result = rt
        .block_on(async { operator.clone().submit_job(env).await })
        .expect("submit")
        .into_inner();
    let admitted = t0.elapsed();
    let ok = result.hosts.iter().filter(|h| h.code == 0).count();
    println!(
        "channels: one job relayed to {} hosts: {ok} admitted, all answers at the operator in {:.2} s",
        result.hosts.len(),
        admitted.as_secs_f64()
    );
    if let Some(d) = wait_for("all results stored", Duration::from_secs(120), || {
        counters.reported.load(Ordering::SeqCst) >= n
    }) {
        println!(
            "channels: every result stored (acknowledged) {:.2} s after the push began",
            (d + admitted).as_secs_f64()
        );
    }
    let (rss, hwm) = rss_mib(ctl.child.id());
    println!("channels: controller RSS after the push: {rss:.1} MiB (peak {hwm:.1} MiB)");

    // Restart on the same port; every agent comes back.
    ctl.kill();
    let down = Instant::now();
    let _ = wait_for("all noticed the restart", Duration::from_secs(60), || {
        counters.connected.load(Ordering::SeqCst) == 0
    });
    let mut ctl = start_controller(tmp.path(), &pki, &addr);
    let started = down.elapsed();
    if let Some(d) = wait_for("all reconnected", Duration::from_secs(300), || {
        counters.connected.load(Ordering::SeqCst) >= n
    }) {
        println!(
            "channels: controller SIGKILLed and restarted ({:.2} s to listen again): all {n} reconnected {:.1} s after the kill",
            started.as_secs_f64(),
            (started + d).as_secs_f64()
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let (rss, hwm) = rss_mib(ctl.child.id());
    println!(
        "channels: controller RSS after the reconnect storm: {rss:.1} MiB (peak {hwm:.1} MiB)"
    );
    ctl.kill();
    drop(rt);
}
