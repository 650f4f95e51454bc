//! Random `Job` payloads for property tests of admission: every field over its whole range
//! (extreme timestamps, durations and enum values, hostile names and versions, random bytes),
//! decoded and validated exactly as the agent does after a signature checks out.

use patch_agent_wire::job::{self as jobs, AdmissionPolicy, schema::Schema};
use patch_agent_wire::proto::v1 as pb;
use patch_agent_wire::time::MAX_TIMESTAMP_SECS;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::time::{Duration, SystemTime};

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9][a-z0-9+.-]{0,12}[-+]?",
        "[A-Za-z0-9._@/*?\\[\\]^$|()=:~-]{0,16}",
        "\\PC{0,40}",
        Just("test-host".to_string()),
        Just(String::new()),
    ]
}

fn seconds() -> impl Strategy<Value = i64> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    prop_oneof![
        any::<i64>(),
        Just(i64::MAX),
        Just(i64::MIN),
        Just(MAX_TIMESTAMP_SECS),
        Just(MAX_TIMESTAMP_SECS + 1),
        (now - 86_400..now + 7 * 86_400),
    ]
}

fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    proptest::option::of(
        (seconds(), prop_oneof![any::<i32>(), 0..1_000_000_000i32])
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    )
}

fn action() -> impl Strategy<Value = Option<pb::job::Action>> {
    let spec = (text(), text()).prop_map(|(name, version)| pb::PackageSpec { name, version });
    proptest::option::of(prop_oneof![
        Just(pb::job::Action::Scan(pb::ScanAction {})),
        Just(pb::job::Action::Reboot(pb::RebootAction {})),
        (
            prop_oneof![any::<i32>(), 0..3i32],
            prop_oneof![any::<i32>(), 0..5i32],
            proptest::collection::vec(text(), 0..4),
            any::<u32>()
        )
            .prop_map(|(scope, min_severity, exclude, approve_after_days)| {
                pb::job::Action::Upgrade(pb::UpgradeAction {
                    scope,
                    min_severity,
                    exclude,
                    approve_after_days,
                })
            }),
        proptest::collection::vec(spec, 0..4)
            .prop_map(|packages| pb::job::Action::Install(pb::InstallAction { packages })),
    ])
}

/// A job that admission accepts, so every field can be made hostile one at a time.
fn valid_action() -> impl Strategy<Value = Option<pb::job::Action>> {
    prop_oneof![
        Just(Some(pb::job::Action::Scan(pb::ScanAction {}))),
        proptest::collection::vec("[a-z][a-z0-9]{1,8}|[a-z]{2,6}-\\*", 0..3).prop_map(|exclude| {
            Some(pb::job::Action::Upgrade(pb::UpgradeAction {
                scope: pb::UpgradeScope::All as i32,
                exclude,
                ..Default::default()
            }))
        }),
        (
            "[a-z][a-z0-9]{1,8}",
            prop_oneof![Just(String::new()), "[1-9]\\.[0-9]{1,2}"]
        )
            .prop_map(|(name, version)| {
                Some(pb::job::Action::Install(pb::InstallAction {
                    packages: vec![pb::PackageSpec { name, version }],
                }))
            }),
    ]
}

/// Any `Job`: each field valid three times in four, anything at all otherwise, so that both
/// admitted jobs and every refusal path are exercised.
pub fn job() -> impl Strategy<Value = pb::Job> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let soon = (now + 60..now + 20 * 3600)
        .prop_map(|seconds| Some(prost_types::Timestamp { seconds, nanos: 0 }));
    let head = (
        prop_oneof![3 => "[A-Za-z0-9._-]{1,32}", 1 => text()],
        prop_oneof![3 => Just(vec!["test-host".to_string()]), 1 => proptest::collection::vec(text(), 0..3)],
        prop_oneof![3 => Just(None), 1 => timestamp()],
        prop_oneof![3 => soon, 1 => timestamp()],
        prop_oneof![3 => valid_action(), 1 => action()],
        prop_oneof![3 => 0..4i32, 1 => any::<i32>()],
        any::<bool>(),
        any::<bool>(),
    );
    let tail = (
        prop_oneof![3 => Just(None), 1 => proptest::option::of(
            (seconds(), any::<i32>())
                .prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
        )],
        prop_oneof![3 => Just(None), 1 => proptest::option::of((timestamp(), timestamp(), any::<bool>()).prop_map(
            |(start, end, allow_partial)| pb::MaintenanceWindow {
                start,
                end,
                allow_partial,
            },
        ))],
        prop_oneof![3 => Just(vec![]), 1 => proptest::collection::vec(text(), 0..2)],
        prop_oneof![3 => Just(None), 1 => proptest::option::of(
            (
                proptest::collection::vec(text(), 0..2),
                proptest::collection::vec(any::<u32>(), 0..2),
                proptest::collection::vec(text(), 0..2),
            )
                .prop_map(|(units, tcp_ports, http_urls)| pb::PostChecks {
                    units,
                    tcp_ports,
                    http_urls,
                }),
        )],
        prop_oneof![3 => Just(std::collections::HashMap::new()), 1 => proptest::collection::hash_map(text(), text(), 0..3)],
    );
    (head, tail).prop_map(
        |(
            (job_id, targets, not_before, expires_at, action, reboot_policy, dry_run, allow),
            (max_duration, window, hooks, checks, target_selector),
        )| pb::Job {
            job_id,
            targets,
            target_selector,
            not_before,
            expires_at,
            action,
            reboot_policy,
            dry_run,
            allow_repo_errors: allow,
            accept_licenses: allow,
            max_duration,
            window,
            pre_hooks: hooks.clone(),
            post_hooks: hooks,
            checks,
        },
    )
}

fn policy() -> AdmissionPolicy {
    AdmissionPolicy {
        host_id: "test-host".into(),
        machine_id: "m".into(),
        labels: Default::default(),
        max_lifetime: Duration::from_secs(24 * 3600),
        clock_skew: Duration::from_secs(300),
        max_duration: Duration::from_secs(7200),
        hooks: None,
    }
}

/// Runs `cases` random jobs (and as many random byte strings) through the strict schema check,
/// decoding and validation for apt and for dnf. Returns (cases run, jobs admitted). A panic
/// anywhere fails the run.
pub fn admission_never_panics(cases: u32) -> (u32, u32) {
    let schema = Schema::new(patch_agent_wire::proto::FILE_DESCRIPTOR_SET).expect("schema");
    let policy = policy();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let admitted = std::cell::Cell::new(0u32);
    let strategy = (
        job(),
        proptest::collection::vec(any::<u8>(), 0..256),
        any::<bool>(),
    );
    runner
        .run(&strategy, |(job, noise, apt)| {
            let manager = Some(if apt { "apt" } else { "dnf" });
            let now = SystemTime::now();
            let bytes = prost::Message::encode_to_vec(&job);
            if schema.check(".patchagent.v1.Job", &bytes).is_ok()
                && jobs::validate(job, "k", &policy, manager, now).is_ok()
            {
                admitted.set(admitted.get() + 1);
            }
            if schema.check(".patchagent.v1.Job", &noise).is_ok()
                && let Ok(j) = <pb::Job as prost::Message>::decode(noise.as_slice())
            {
                let _ = jobs::validate(j, "k", &policy, manager, now);
            }
            Ok(())
        })
        .expect("admission panicked or failed");
    (cases, admitted.get())
}
