//! Reporting to the controller: job reports and inventory, sent at least once from a durable
//! outbox, with exponential backoff and jitter while the controller cannot be reached.
//!
//! The engine commits each job report to the [`outbox::Outbox`] (as its `ReportSink`) before
//! the journal records it as reported; the [`Reporter`] task sends the oldest report, and
//! removes it only when the controller acknowledged it. The controller deduplicates on the
//! report id, so a report sent twice (an acknowledgement lost with the connection) is stored
//! once. On every new connection the agent says hello first (version, labels, capabilities).

pub mod channel;
pub mod link;
pub mod outbox;

use crate::config::{ReportSection, TlsSection};
use crate::host::HostFacts;
use crate::jobs::engine::ReportSink;
use crate::jobs::journal::Record;
use crate::pkg::scanner::Scanner;
use outbox::Outbox;
use patch_agent_wire::proto::{ControllerClient, v1 as pb};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

/// Who this agent is, as every report says.
#[derive(Debug, Clone)]
pub struct Origin {
    pub host_id: String,
    pub labels: BTreeMap<String, String>,
}

/// The engine's sink: job records become outbox items.
pub struct JobSink {
    pub origin: Origin,
    pub outbox: Arc<Outbox>,
}

impl ReportSink for JobSink {
    fn job(&self, record: &Record) -> bool {
        let is_final = record.state.is_terminal();
        let suffix = if is_final {
            "final".to_string()
        } else {
            record.event_count.to_string()
        };
        let report = pb::JobReport {
            report_id: format!("{}:{}:{suffix}", self.origin.host_id, record.job_id),
            host_id: self.origin.host_id.clone(),
            labels: self.origin.labels.clone().into_iter().collect(),
            status: Some(crate::convert::status(record)),
            r#final: is_final,
            reboot_attempted: record.reboot_boot_id.is_some(),
            reboot_succeeded: record.reboot_verified,
            reported_at: Some(crate::convert::ms(crate::jobs::journal::now_ms())),
            outbox: None,
        };
        self.outbox.push(&report)
    }
}

/// Exponential backoff with jitter: each pause is between half and all of the current step,
/// and the step doubles up to the maximum.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            step: initial,
        }
    }

    /// The next pause; `r` is a random number.
    pub fn next(&mut self, r: u64) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        let jitter_ms = half.as_millis() as u64;
        half + Duration::from_millis(if jitter_ms == 0 {
            0
        } else {
            r % (jitter_ms + 1)
        })
    }

    pub fn reset(&mut self) {
        self.step = self.initial;
    }
}

/// Sends the outbox and owed inventory to the controller, forever.
pub struct Reporter {
    /// `[report]` and `[tls]`; a SIGHUP sends new ones, used from the next connection on.
    pub settings: tokio::sync::watch::Receiver<(ReportSection, TlsSection)>,
    pub facts: Arc<HostFacts>,
    pub origin: Origin,
    pub scanner: Option<Arc<Scanner>>,
    pub outbox: Arc<Outbox>,
    /// The connection, shared with the control channel.
    pub link: Arc<link::Link>,
}

enum Failure {
    /// A call on connection `.1` failed: drop it, and retry after a pause.
    Retry(String, u64),
}

/// A client and the generation of the [`link::Link`] connection it said hello on.
type Client = Option<(u64, ControllerClient<Channel>)>;

impl Reporter {
    /// The current `[report]` section.
    fn cfg(&self) -> ReportSection {
        self.settings.borrow().0.clone()
    }

    /// Runs the sender, and marks inventory owed after every scan.
    pub async fn run(self: Arc<Self>) {
        if let Some(scanner) = &self.scanner {
            let mut scans = scanner.subscribe();
            let outbox = self.outbox.clone();
            tokio::spawn(async move {
                while scans.changed().await.is_ok() {
                    outbox.want_inventory();
                }
            });
        }
        let mut settings = self.settings.clone();
        let backoff_of = |r: &ReportSection| Backoff::new(r.retry_initial, r.retry_max);
        let mut backoff = backoff_of(&settings.borrow_and_update().0);
        let mut client: Client = None;
        let mut failures = 0u64;
        loop {
            if settings.has_changed().unwrap_or(false) {
                // Reloaded: reconnect with the new address, names, files and timeouts.
                backoff = backoff_of(&settings.borrow_and_update().0);
                if let Some((generation, _)) = client.take() {
                    self.link.invalidate(generation).await;
                }
            }
            if !self.outbox.has_work() {
                self.outbox.wait().await;
                continue;
            }
            match self.attempt(&mut client).await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(
                            controller = %self.cfg().shown(),
                            failed_attempts = failures,
                            pending = self.outbox.len(),
                            "Reaching the controller again"
                        );
                    }
                    failures = 0;
                    backoff.reset();
                }
                Err(Failure::Retry(why, generation)) => {
                    client = None;
                    self.link.invalidate(generation).await;
                    failures += 1;
                    let pause = backoff.next(crate::pkg::scanner::random_u64());
                    // The first failure and then every tenth, so a long outage stays readable.
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(
                            controller = %self.cfg().shown(),
                            error = %why,
                            pending = self.outbox.len(),
                            retry_in = ?pause,
                            failed_attempts = failures,
                            "Cannot report to the controller; reports wait in the outbox"
                        );
                    }
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// A unary call with `[report] timeout` (the shared connection has no per-call deadline:
    /// the control channel's stream rides on it).
    async fn timed<T>(
        &self,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let timeout = self.cfg().timeout;
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {timeout:?} ([report] timeout)"
            ))),
        }
    }

    async fn attempt(&self, client: &mut Client) -> Result<(), Failure> {
        let link::Conn {
            generation,
            channel,
            ..
        } = self.link.get().await.map_err(|e| Failure::Retry(e, 0))?;
        let retry =
            |call: &str, s: &tonic::Status| Failure::Retry(status_text(call, s), generation);
        let c = match client {
            Some((g, c)) if *g == generation => c,
            _ => {
                // A new connection: say hello first.
                let mut c = ControllerClient::new(channel);
                let hello = self
                    .timed(c.hello(self.hello()))
                    .await
                    .map_err(|s| retry("hello", &s))?;
                if hello.inventory_wanted {
                    self.outbox.want_inventory();
                }
                &mut client.insert((generation, c)).1
            }
        };
        if let Some((seq, report)) = self.outbox.oldest() {
            match self.timed(c.report_job(report.clone())).await {
                Ok(_) => self.outbox.ack(seq),
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    // The controller will never take it: keep the queue moving, say so loudly.
                    tracing::error!(report = %report.report_id, error = %s.message(), "The controller refused a report as invalid; dropping it");
                    self.outbox.ack(seq);
                }
                Err(s) => return Err(retry("ReportJob", &s)),
            }
            return Ok(());
        }
        if self.outbox.inventory_due() {
            self.send_inventory(c)
                .await
                .map_err(|s| retry("ReportInventory", &s))?;
            self.outbox.inventory_sent();
        }
        Ok(())
    }

    async fn send_inventory(&self, c: &mut ControllerClient<Channel>) -> Result<(), tonic::Status> {
        let Some(scanner) = &self.scanner else {
            return Ok(());
        };
        let snap = scanner.snapshot().await;
        let Some(scanned_at) = snap.updates_at.or(snap.inventory_at) else {
            // No scan yet: the scan's end will owe it again.
            return Ok(());
        };
        let inventory = inventory(&self.facts, scanner.manager(), &snap);
        let bytes = prost::Message::encode_to_vec(&inventory);
        let checksum = patch_agent_wire::ids::to_hex(
            ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref(),
        );
        let mut report = pb::InventoryReport {
            report_id: format!("{}:inventory:{}", self.origin.host_id, &checksum[..16]),
            host_id: self.origin.host_id.clone(),
            labels: self.origin.labels.clone().into_iter().collect(),
            checksum,
            inventory: None,
            scanned_at: Some(scanned_at.into()),
            outbox: Some(self.outbox.stats()),
        };
        let ack = self.timed(c.report_inventory(report.clone())).await?;
        if ack.need_full {
            report.inventory = Some(inventory);
            self.timed(c.report_inventory(report)).await?;
            tracing::info!(
                packages = snap.packages.len(),
                updates = snap.updates.updates.len(),
                bytes = bytes.len(),
                "Sent the full inventory"
            );
        }
        Ok(())
    }

    fn hello(&self) -> pb::HelloRequest {
        let f = &self.facts;
        let mut capabilities = vec![
            "jobs.v1".to_string(),
            "dry-run".into(),
            "reboot".into(),
            "maintenance-window".into(),
            "hooks".into(),
            "checks".into(),
        ];
        if let Some(s) = &self.scanner {
            capabilities.insert(0, s.manager().to_string());
        }
        pb::HelloRequest {
            host_id: self.origin.host_id.clone(),
            agent_version: crate::VERSION.to_string(),
            labels: self.origin.labels.clone().into_iter().collect(),
            capabilities,
            hostname: f.hostname.clone(),
            machine_id: f.machine_id.clone(),
            os: Some(os(f)),
            kernel_release: f.kernel_release.clone(),
            architecture: f.architecture.clone(),
            boot_time: Some(f.boot_time.into()),
            outbox: Some(self.outbox.stats()),
        }
    }
}

/// A mutual-TLS channel to the first of `[report] controller` and `controllers` that answers,
/// with the `[tls]` certificate, files read now, and `[report] timeout` on every call
/// (certificate renewal uses it).
pub async fn connect(cfg: &ReportSection, tls: &TlsSection) -> Result<Channel, String> {
    let ca = cfg.ca.as_deref().unwrap_or(&tls.ca);
    let config = patch_agent_service::tls::client_config(ca, &tls.cert, &tls.key)?;
    let mut errors = Vec::new();
    for address in cfg.addresses() {
        match link::dial(cfg, config.clone(), &address, Some(cfg.timeout)).await {
            Ok(c) => return Ok(c),
            Err(e) => errors.push(e),
        }
    }
    Err(if errors.is_empty() {
        "no [report] controller is set".into()
    } else {
        errors.join("; ")
    })
}

/// An error and its sources, joined with ": " (tonic's transport errors hide the cause).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

fn status_text(call: &str, s: &tonic::Status) -> String {
    format!("{call}: {:?}: {}", s.code(), s.message())
}

fn os(f: &HostFacts) -> pb::OsRelease {
    crate::convert::os_release(&f.os)
}

/// The inventory as the controller stores it: everything but what changes at every scan, so
/// its checksum changes only when the host does.
pub fn inventory(
    f: &HostFacts,
    manager: &str,
    snap: &crate::pkg::scanner::Snapshot,
) -> pb::Inventory {
    let mut updates: Vec<pb::Update> = snap
        .updates
        .updates
        .iter()
        .map(patch_agent_wire::convert::update)
        .collect();
    updates.sort_by(|a, b| (&a.name, &a.architecture).cmp(&(&b.name, &b.architecture)));
    let (_, mut reboot) = crate::convert::summary(manager, snap);
    reboot.checked_at = None;
    pb::Inventory {
        hostname: f.hostname.clone(),
        machine_id: f.machine_id.clone(),
        boot_id: f.boot_id.clone(),
        os: Some(os(f)),
        kernel_release: f.kernel_release.clone(),
        architecture: f.architecture.clone(),
        agent_version: crate::VERSION.to_string(),
        boot_time: Some(f.boot_time.into()),
        manager: manager.to_string(),
        packages: snap
            .packages
            .iter()
            .map(patch_agent_wire::convert::package)
            .collect(),
        updates,
        held: patch_agent_wire::convert::held(&snap.updates),
        repo_errors: patch_agent_wire::convert::repo_errors(&snap.updates),
        reboot: Some(reboot),
        scan_errors: snap.errors.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_maximum() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let pauses: Vec<Duration> = (0..6).map(|i| b.next(i * 7919)).collect();
        let steps = [1u64, 2, 4, 8, 8, 8];
        for (p, s) in pauses.iter().zip(steps) {
            let s = Duration::from_secs(s);
            assert!(
                *p >= s / 2 && *p <= s,
                "{p:?} not within [{:?}, {s:?}]",
                s / 2
            );
        }
        b.reset();
        assert!(b.next(0) <= Duration::from_secs(1));
    }
}
