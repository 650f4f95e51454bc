//! `patchagent.v1.Operator`: relayed jobs and rollouts, for the certificate identities named by
//! `patchctl serve --operators`. The controller reads a signed job's payload only to route it
//! (job id, targets, selector, expiry); it never verifies, changes or signs one: agents verify.

use crate::channel::Hub;
use crate::rollouts::{self, ADMIT_TIMEOUT, Driver, Serial};
use crate::store::{NewOccurrence, NewRollout, Store};
use patch_agent_wire::proto::v1 as pb;
use pb::RolloutState as State;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Most occurrences one rollout may schedule.
pub const MAX_OCCURRENCES: usize = 1000;

pub struct OperatorService {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    driver: Arc<Driver>,
    operators: Vec<String>,
}

impl OperatorService {
    pub fn new(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        driver: Arc<Driver>,
        operators: Vec<String>,
    ) -> Self {
        Self {
            store,
            hub,
            driver,
            operators,
        }
    }

    /// The caller's operator identity, or why it may not call.
    fn operator<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let names = crate::peer_names(req)?;
        if self.operators.is_empty() {
            return Err(Status::permission_denied(
                "this controller names no operators: start `patchctl serve` with --operators NAME[,NAME] (a certificate identity)",
            ));
        }
        names
            .iter()
            .find(|n| self.operators.contains(n))
            .cloned()
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "a certificate for {names:?} is not an operator here (patchctl serve --operators)"
                ))
            })
    }

    async fn get(&self, id: &str) -> Result<pb::Rollout, Status> {
        check_id(id)?;
        self.store
            .rollout(id.to_string(), true)
            .await
            .map_err(crate::stored)?
            .map(|d| d.rollout)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no rollout {id}; `patchctl rollouts list` shows them"
                ))
            })
    }

    async fn steer(
        &self,
        req: Request<pb::RolloutRef>,
        from: &[State],
        to: State,
        verb: &str,
    ) -> Result<Response<pb::Rollout>, Status> {
        let who = self.operator(&req)?;
        let id = req.into_inner().rollout_id;
        let current = self.get(&id).await?;
        let changed = self
            .store
            .set_rollout_state(id.clone(), from.to_vec(), to, format!("{verb} by {who}"))
            .await
            .map_err(crate::stored)?;
        if !changed {
            return Err(Status::failed_precondition(format!(
                "rollout {id} is {}; it cannot be {verb}",
                state_word(current.state)
            )));
        }
        tracing::info!(rollout = %id, operator = %who, "Rollout {verb}");
        self.hub.wake.bump();
        Ok(Response::new(self.get(&id).await?))
    }
}

pub fn state_word(state: i32) -> &'static str {
    match State::try_from(state) {
        Ok(State::Scheduled) => "scheduled",
        Ok(State::Running) => "running",
        Ok(State::Paused) => "paused",
        Ok(State::Completed) => "completed",
        Ok(State::Stopped) => "stopped",
        Ok(State::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn check_id(id: &str) -> Result<(), Status> {
    if patch_agent_wire::ids::valid_job_id(id) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "rollout id {id:?} must be 1-128 characters of [A-Za-z0-9._-]"
        )))
    }
}

/// What routing needs from a signed job: read, not verified.
fn route(env: &pb::SignedJob) -> Result<pb::Job, Status> {
    let size = env.payload.len() + env.key_id.len() + env.signature.len();
    if size > patch_agent_wire::job::MAX_ENVELOPE {
        return Err(Status::invalid_argument(format!(
            "the envelope is {size} bytes; the limit is {}",
            patch_agent_wire::job::MAX_ENVELOPE
        )));
    }
    if env.key_id.is_empty() || env.signature.is_empty() {
        return Err(Status::invalid_argument(
            "the envelope is not signed: sign it with `patchctl job sign`",
        ));
    }
    let job: pb::Job = prost::Message::decode(env.payload.as_slice())
        .map_err(|e| Status::invalid_argument(format!("the payload is not a Job: {e}")))?;
    if !patch_agent_wire::ids::valid_job_id(&job.job_id) {
        return Err(Status::invalid_argument(format!(
            "job_id {:?} must be 1-128 characters of [A-Za-z0-9._-]",
            job.job_id
        )));
    }
    patch_agent_wire::job::check_selector(&job.targets, &job.target_selector)
        .map_err(Status::invalid_argument)?;
    Ok(job)
}

type RolloutStream = Pin<Box<dyn Stream<Item = Result<pb::Rollout, Status>> + Send>>;

#[tonic::async_trait]
impl patch_agent_wire::proto::Operator for OperatorService {
    async fn submit_job(
        &self,
        req: Request<pb::SignedJob>,
    ) -> Result<Response<pb::SubmitJobResult>, Status> {
        let who = self.operator(&req)?;
        let env = req.into_inner();
        let job = route(&env)?;
        // With replicas, the hosts connected to any of them.
        let connected: BTreeMap<String, BTreeMap<String, String>> = if self.hub.relays() {
            self.store
                .connected()
                .await
                .map_err(crate::stored)?
                .into_iter()
                .collect()
        } else {
            self.hub.connected().into_iter().collect()
        };
        let selected = |labels: &BTreeMap<String, String>| {
            patch_agent_wire::job::selector_matches(&job.target_selector, labels)
        };
        let (hosts, not_connected): (Vec<String>, Vec<String>) = if job.targets.is_empty() {
            let hosts = connected
                .iter()
                .filter(|(_, l)| selected(l))
                .map(|(h, _)| h.clone())
                .collect();
            (hosts, Vec::new())
        } else {
            let mut targets = job.targets.clone();
            targets.sort();
            targets.dedup();
            let (on, off): (Vec<_>, Vec<_>) =
                targets.into_iter().partition(|t| connected.contains_key(t));
            (
                on.into_iter()
                    .filter(|h| connected.get(h).is_some_and(selected))
                    .collect(),
                off,
            )
        };
        tracing::info!(job = %job.job_id, operator = %who, hosts = hosts.len(), not_connected = not_connected.len(), "Relaying a signed job");
        let mut set = tokio::task::JoinSet::new();
        for (i, host) in hosts.into_iter().enumerate() {
            let (hub, env) = (self.hub.clone(), env.clone());
            set.spawn(async move {
                let a = hub.push(&host, env, ADMIT_TIMEOUT).await;
                (i, host, a)
            });
        }
        let mut out = Vec::new();
        while let Some(done) = set.join_next().await {
            let (i, host_id, a) = done.map_err(|e| Status::internal(e.to_string()))?;
            out.push((
                i,
                match a {
                    Ok(a) => pb::HostAdmission {
                        host_id,
                        code: a.code,
                        message: a.message,
                        status: a.status,
                    },
                    Err(e) => pb::HostAdmission {
                        host_id,
                        code: tonic::Code::Unavailable as i32,
                        message: e.to_string(),
                        status: None,
                    },
                },
            ));
        }
        out.sort_by_key(|(i, _)| *i);
        Ok(Response::new(pb::SubmitJobResult {
            job_id: job.job_id,
            hosts: out.into_iter().map(|(_, a)| a).collect(),
            not_connected,
        }))
    }

    async fn create_rollout(
        &self,
        req: Request<pb::CreateRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let who = self.operator(&req)?;
        let r = req.into_inner();
        let new = new_rollout(r, who.clone())?;
        let id = new.id.clone();
        tracing::info!(rollout = %id, operator = %who, occurrences = new.occurrences.len(), serial = %new.serial, max_fail_percent = new.max_fail_percent, "Rollout created");
        self.store
            .create_rollout(new)
            .await
            .map_err(crate::stored)?;
        self.driver.claim(id.clone()).await.map_err(crate::stored)?;
        Ok(Response::new(self.get(&id).await?))
    }

    async fn list_rollouts(
        &self,
        req: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        self.operator(&req)?;
        let rollouts = self.store.rollouts().await.map_err(crate::stored)?;
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }

    async fn get_rollout(
        &self,
        req: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.operator(&req)?;
        Ok(Response::new(self.get(&req.get_ref().rollout_id).await?))
    }

    type WatchRolloutStream = RolloutStream;

    async fn watch_rollout(
        &self,
        req: Request<pb::RolloutRef>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        self.operator(&req)?;
        let id = req.into_inner().rollout_id;
        let first = self.get(&id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (store, mut wake) = (self.store.clone(), self.hub.wake.subscribe());
        tokio::spawn(async move {
            let mut last = prost::Message::encode_to_vec(&first);
            let mut done = !rollouts::is_active(first.state);
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            while !done {
                let _ = tokio::time::timeout(Duration::from_secs(2), wake.changed()).await;
                let now = match store.rollout(id.clone(), true).await {
                    Ok(Some(d)) => d.rollout,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(crate::stored(e))).await;
                        return;
                    }
                };
                let bytes = prost::Message::encode_to_vec(&now);
                if bytes == last {
                    continue;
                }
                last = bytes;
                done = !rollouts::is_active(now.state);
                if tx.send(Ok(now)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn pause_rollout(
        &self,
        req: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.steer(
            req,
            &[State::Scheduled, State::Running],
            State::Paused,
            "paused",
        )
        .await
    }

    async fn resume_rollout(
        &self,
        req: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.steer(req, &[State::Paused], State::Running, "resumed")
            .await
    }

    async fn cancel_rollout(
        &self,
        req: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.steer(
            req,
            &[State::Scheduled, State::Running, State::Paused],
            State::Cancelled,
            "cancelled",
        )
        .await
    }
}

/// Checks a rollout request: every occurrence a signed job for the same hosts, a valid batch
/// size, threshold and timeout.
fn new_rollout(r: pb::CreateRolloutRequest, who: String) -> Result<NewRollout, Status> {
    let bad = Status::invalid_argument;
    if r.occurrences.is_empty() || r.occurrences.len() > MAX_OCCURRENCES {
        return Err(bad(format!(
            "a rollout needs 1-{MAX_OCCURRENCES} occurrences (signed jobs); got {}",
            r.occurrences.len()
        )));
    }
    if !r.starts.is_empty() && r.starts.len() != r.occurrences.len() {
        return Err(bad(format!(
            "{} starts for {} occurrences: give one start per occurrence, or none",
            r.starts.len(),
            r.occurrences.len()
        )));
    }
    r.serial.parse::<Serial>().map_err(bad)?;
    if !(0.0..=100.0).contains(&r.max_fail_percent) {
        return Err(bad("max_fail_percent must be 0-100".to_string()));
    }
    let timeout = r
        .host_timeout
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| *d >= Duration::from_secs(1) && *d <= Duration::from_secs(7 * 86400))
        .ok_or_else(|| bad("host_timeout must be 1s to 7d".to_string()))?;
    let now = crate::now();
    let mut seen = std::collections::HashSet::new();
    let mut occurrences = Vec::with_capacity(r.occurrences.len());
    let mut hosts: Option<(Vec<String>, BTreeMap<String, String>)> = None;
    for (i, env) in r.occurrences.into_iter().enumerate() {
        let job = route(&env).map_err(|s| bad(format!("occurrence {}: {}", i + 1, s.message())))?;
        if !seen.insert(job.job_id.clone()) {
            return Err(bad(format!(
                "job id {} appears in two occurrences; each needs its own",
                job.job_id
            )));
        }
        let these = (
            job.targets.clone(),
            job.target_selector.clone().into_iter().collect(),
        );
        match &hosts {
            None => hosts = Some(these),
            Some(h) if *h != these => {
                return Err(bad(format!(
                    "occurrence {} names other hosts than the first; every occurrence must name the same",
                    i + 1
                )));
            }
            Some(_) => {}
        }
        let expires_at = job
            .expires_at
            .as_ref()
            .map(|t| t.seconds)
            .ok_or_else(|| bad(format!("occurrence {}: the job has no expires_at", i + 1)))?;
        let start_at = r.starts.get(i).map_or(now, |t| t.seconds);
        if expires_at <= now {
            return Err(bad(format!(
                "occurrence {} (job {}) has expired already",
                i + 1,
                job.job_id
            )));
        }
        occurrences.push(NewOccurrence {
            job_id: job.job_id,
            envelope: env,
            start_at,
            expires_at,
        });
    }
    let (targets, selector) = hosts.unwrap_or_default();
    Ok(NewRollout {
        id: patch_agent_wire::ids::fresh_id("rollout"),
        serial: r.serial,
        max_fail_percent: r.max_fail_percent,
        host_timeout_ms: timeout.as_millis() as i64,
        created_at: now,
        created_by: who,
        targets,
        selector,
        occurrences,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(job: pb::Job) -> pb::SignedJob {
        pb::SignedJob {
            payload: prost::Message::encode_to_vec(&job),
            key_id: "k".into(),
            signature: vec![7; 64],
        }
    }

    fn job(id: &str, targets: &[&str]) -> pb::Job {
        pb::Job {
            job_id: id.into(),
            targets: targets.iter().map(|t| t.to_string()).collect(),
            expires_at: Some(prost_types::Timestamp {
                seconds: crate::now() + 3600,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    fn request(occurrences: Vec<pb::SignedJob>) -> pb::CreateRolloutRequest {
        pb::CreateRolloutRequest {
            occurrences,
            starts: Vec::new(),
            serial: "2".into(),
            max_fail_percent: 30.0,
            host_timeout: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        }
    }

    fn refused(r: pb::CreateRolloutRequest) -> String {
        new_rollout(r, "alice".into())
            .expect_err("refused")
            .message()
            .to_string()
    }

    #[test]
    fn a_rollout_request_is_checked_before_anything_is_stored() {
        let ok =
            new_rollout(request(vec![env(job("j1", &["a", "b"]))]), "alice".into()).expect("valid");
        assert_eq!(ok.targets, ["a", "b"]);
        assert_eq!(ok.occurrences[0].job_id, "j1");
        assert!(ok.id.starts_with("rollout-"));

        assert!(refused(request(vec![])).contains("1-1000 occurrences"));
        let mut r = request(vec![env(job("j1", &["a"]))]);
        r.serial = "0".into();
        assert!(refused(r).contains("at least 1"));
        let mut r = request(vec![env(job("j1", &["a"]))]);
        r.max_fail_percent = 101.0;
        assert!(refused(r).contains("0-100"));
        let mut r = request(vec![env(job("j1", &["a"]))]);
        r.host_timeout = None;
        assert!(refused(r).contains("host_timeout"));
        let mut r = request(vec![env(job("j1", &["a"]))]);
        r.starts = vec![prost_types::Timestamp::default(); 2];
        assert!(refused(r).contains("one start per occurrence"));
        assert!(
            refused(request(vec![
                env(job("j1", &["a"])),
                env(job("j1", &["a"]))
            ]))
            .contains("appears in two occurrences")
        );
        assert!(
            refused(request(vec![
                env(job("j1", &["a"])),
                env(job("j2", &["b"]))
            ]))
            .contains("other hosts")
        );
        assert!(refused(request(vec![env(job("j1", &[]))])).contains("names no hosts"));
        let mut unsigned = env(job("j1", &["a"]));
        unsigned.signature.clear();
        assert!(refused(request(vec![unsigned])).contains("not signed"));
        let garbage = pb::SignedJob {
            payload: vec![0xff; 8],
            key_id: "k".into(),
            signature: vec![1],
        };
        assert!(refused(request(vec![garbage])).contains("not a Job"));
        let mut expired = job("j1", &["a"]);
        expired.expires_at = Some(prost_types::Timestamp {
            seconds: 1,
            nanos: 0,
        });
        assert!(refused(request(vec![env(expired)])).contains("expired"));
    }
}
