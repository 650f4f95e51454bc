//! Keeping the certificate fresh: an enrolled agent renews at half its certificate's lifetime
//! (plus up to a tenth of it as jitter, so a fleet enrolled at once does not renew at once),
//! from a new key, over mutual TLS with the current certificate. The new files are swapped in
//! and the daemon reloads them as on SIGHUP: the listener serves new handshakes with the new
//! certificate while calls already open go on.
//!
//! Every agent, enrolled or not, publishes its certificate's state in GetStatus; an expired
//! one comes with what to do about it.

use super::{check_certificate, csr::NewKey, files};
use crate::config::{ReportSection, TlsSection};
use patch_agent_service::tls::CertInfo;
use patch_agent_wire::proto::{EnrollmentClient, v1 as pb};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, watch};

/// The certificate's state, read by GetStatus.
///
/// An agent that is not enrolled renews nothing, so nothing reads its certificate at start:
/// the first GetStatus after a start or a reload does, once (parsing X.509 touches code that
/// would otherwise stay out of the agent's resident memory).
#[derive(Debug, Clone, Default)]
pub struct CertState(Arc<RwLock<Slot>>);

#[derive(Debug, Default)]
struct Slot {
    status: pb::CertificateStatus,
    /// Read this certificate on the next `get` (not enrolled).
    pending: Option<PathBuf>,
}

impl CertState {
    pub fn get(&self) -> pb::CertificateStatus {
        let (mut status, pending) = self
            .0
            .read()
            .map(|s| (s.status.clone(), s.pending.clone()))
            .unwrap_or_default();
        if let Some(path) = pending {
            status = describe(&path, false);
            if let Ok(mut s) = self.0.write() {
                s.status = status.clone();
                s.pending = None;
            }
        }
        // Nothing renews it: it may have expired since it was read.
        if !status.enrolled
            && status.state == "valid"
            && let Some(t) = &status.not_after
            && t.seconds <= now()
        {
            status.state = "expired".into();
            status.action = expired_action(false, t.seconds, "", "");
        }
        status
    }

    fn update(&self, f: impl FnOnce(&mut pb::CertificateStatus)) {
        if let Ok(mut s) = self.0.write() {
            f(&mut s.status);
        }
    }

    fn read_later(&self, cert: &Path) {
        if let Ok(mut s) = self.0.write() {
            s.pending = Some(cert.to_path_buf());
        }
    }
}

/// The certificate at `path`, as GetStatus shows it (without renewal times).
fn describe(path: &Path, enrolled: bool) -> pb::CertificateStatus {
    match patch_agent_service::tls::load_certs(path)
        .and_then(|c| patch_agent_service::tls::cert_info(&c[0]))
    {
        Ok(info) => pb::CertificateStatus {
            serial: info.serial,
            not_before: ts(info.not_before),
            not_after: ts(info.not_after),
            state: "valid".into(),
            enrolled,
            ..Default::default()
        },
        Err(e) => pb::CertificateStatus {
            state: "unreadable".into(),
            last_error: e,
            enrolled,
            ..Default::default()
        },
    }
}

/// What to do about a certificate that expired at `not_after`.
fn expired_action(enrolled: bool, not_after: i64, controller: &str, host_id: &str) -> String {
    if enrolled {
        format!(
            "the certificate expired at {}, so it cannot be renewed: make a token with \
             `patchctl tokens create --reenroll`, run `PATCH_AGENT_TOKEN=<token> patch-agent enroll \
             --controller {controller} --ca-hash sha256:... --host-id {host_id}` and restart the agent",
            fmt(not_after),
        )
    } else {
        format!(
            "the certificate expired at {}: install a new one at tls.cert and tls.key and send SIGHUP",
            fmt(not_after)
        )
    }
}

/// The renewal task and what it needs.
pub struct Renewer {
    pub settings: watch::Receiver<(ReportSection, TlsSection)>,
    pub host_id: String,
    /// The host has enrolled.toml: renew; otherwise only watch.
    pub enrolled: bool,
    pub state: CertState,
    /// Asks the daemon to reload (as SIGHUP does) once new files are in place.
    pub reload: Arc<Notify>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn ts(secs: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

/// When to renew a certificate valid from `not_before` to `not_after`: half-way, plus
/// `jitter` (0..1) of a tenth of the lifetime.
pub fn renew_at(not_before: i64, not_after: i64, jitter: f64) -> i64 {
    let life = (not_after - not_before).max(0);
    not_before + life / 2 + ((life as f64 / 10.0) * jitter.clamp(0.0, 1.0)) as i64
}

impl Renewer {
    /// A renewer for `host_id`; it renews only when `enrolled`, and watches otherwise.
    pub fn new(
        settings: watch::Receiver<(ReportSection, TlsSection)>,
        host_id: &str,
        enrolled: bool,
    ) -> Self {
        Self {
            settings,
            host_id: host_id.to_string(),
            enrolled,
            state: CertState::default(),
            reload: Arc::new(Notify::new()),
        }
    }

    pub async fn run(mut self) {
        if !self.enrolled || !self.settings.borrow().0.is_set() {
            // Nothing to renew: GetStatus reads the certificate when asked, again after a reload.
            loop {
                let cert = self.settings.borrow_and_update().1.cert.clone();
                self.state.read_later(&cert);
                if self.settings.changed().await.is_err() {
                    return;
                }
            }
        }
        let mut failures = 0u32;
        let mut planned: Option<(String, i64)> = None;
        loop {
            let (report, tls) = self.settings.borrow_and_update().clone();
            let wait = self.step(&report, &tls, &mut planned, &mut failures).await;
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = self.settings.changed() => {}
            }
        }
    }

    /// One look at the certificate, renewing it when due; returns how long to wait.
    async fn step(
        &self,
        report: &ReportSection,
        tls: &TlsSection,
        planned: &mut Option<(String, i64)>,
        failures: &mut u32,
    ) -> Duration {
        let info = match patch_agent_service::tls::load_certs(&tls.cert)
            .and_then(|c| patch_agent_service::tls::cert_info(&c[0]))
        {
            Ok(info) => info,
            Err(e) => {
                self.state.update(|s| *s = describe(&tls.cert, true));
                tracing::warn!(error = %e, "Cannot read the certificate to renew it");
                return Duration::from_secs(60);
            }
        };
        let now = now();
        self.state.update(|s| {
            s.serial.clone_from(&info.serial);
            s.not_before = ts(info.not_before);
            s.not_after = ts(info.not_after);
            s.enrolled = self.enrolled;
        });
        if now >= info.not_after {
            return self.expired(&info, report);
        }
        let at = match planned {
            Some((serial, at)) if *serial == info.serial => *at,
            _ => {
                let jitter = crate::pkg::scanner::random_u64() as f64 / u64::MAX as f64;
                let mut at = renew_at(info.not_before, info.not_after, jitter);
                if planned.is_some() {
                    // Just renewed: never again within a quarter of the new lifetime, whatever
                    // the controller back-dated, so a short TTL cannot make a renewal loop.
                    at = at.max(now + (info.not_after - now) / 4);
                }
                *planned = Some((info.serial.clone(), at));
                *failures = 0;
                at
            }
        };
        self.state.update(|s| {
            s.renew_at = ts(at);
            if s.state.is_empty() || s.state == "expired" || s.state == "unreadable" {
                s.state = "valid".into();
            }
        });
        if now < at {
            return Duration::from_secs((at - now) as u64);
        }
        self.attempt(&info, report, tls, failures).await
    }

    /// An expired certificate cannot renew itself: say what to do, look again later.
    fn expired(&self, info: &CertInfo, report: &ReportSection) -> Duration {
        let action = expired_action(
            self.enrolled,
            info.not_after,
            &report.shown(),
            &self.host_id,
        );
        tracing::error!(serial = %info.serial, action = %action, "Certificate expired");
        self.state.update(|s| {
            s.state = "expired".into();
            s.action = action;
            s.renew_at = None;
        });
        Duration::from_secs(300)
    }

    /// Renews now; on failure records why and returns the pause before the next try.
    async fn attempt(
        &self,
        info: &CertInfo,
        report: &ReportSection,
        tls: &TlsSection,
        failures: &mut u32,
    ) -> Duration {
        let now = now();
        match self.renew(report, tls).await {
            Ok(serial) => {
                tracing::info!(old = %info.serial, new = %serial, "Certificate renewed");
                self.state.update(|s| {
                    s.state = "valid".into();
                    s.last_error.clear();
                    s.action.clear();
                });
                self.reload.notify_one();
                // The reload re-reads the files; look at the new certificate shortly.
                Duration::from_millis(200)
            }
            Err(e) => {
                *failures += 1;
                let pause = Duration::from_secs(5u64 << (*failures).min(7))
                    .min(Duration::from_secs((info.not_after - now).max(1) as u64));
                tracing::warn!(error = %e, retry_in = ?pause, expires = %fmt(info.not_after), "Certificate renewal failed");
                self.state.update(|s| {
                    s.state = "renewal-failing".into();
                    s.last_error = e;
                    s.action = format!(
                        "renewal keeps failing; the certificate expires at {}. Check that the controller {} is reachable and has not revoked this host (`patchctl hosts list`)",
                        fmt(info.not_after),
                        report.shown()
                    );
                });
                pause
            }
        }
    }

    /// Renews from a new key and writes key and certificate; returns the new serial.
    async fn renew(&self, report: &ReportSection, tls: &TlsSection) -> Result<String, String> {
        let key = NewKey::generate(&self.host_id)?;
        let channel = crate::report::connect(report, tls).await?;
        let answer = EnrollmentClient::new(channel)
            .renew(pb::RenewRequest {
                host_id: self.host_id.clone(),
                csr_der: key.csr_der.clone(),
            })
            .await
            .map_err(|s| {
                format!(
                    "the controller refused renewal ({:?}): {}",
                    s.code(),
                    s.message()
                )
            })?
            .into_inner();
        let cert = answer
            .certificate
            .ok_or("the controller sent no certificate")?;
        check_certificate(&cert.chain_pem, &key.spki, &self.host_id)?;
        files::write_all(&[
            files::Planned::new(&tls.key, key.key_pem(), 0o600),
            files::Planned::new(&tls.cert, cert.chain_pem, 0o644),
        ])?;
        Ok(cert.serial)
    }
}

fn fmt(secs: i64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_life_within_a_tenth() {
        assert_eq!(renew_at(1000, 1060, 0.0), 1030);
        assert_eq!(renew_at(1000, 1060, 1.0), 1036);
        assert_eq!(renew_at(0, 7 * 86400, 0.5), 7 * 86400 / 2 + 7 * 8640 / 2);
        // Nonsense validity does not go backwards.
        assert_eq!(renew_at(100, 50, 0.5), 100);
    }
}
