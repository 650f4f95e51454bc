//! What a SIGHUP changes while the agent runs, and what waits for a restart.
//!
//! Every key of `agent.toml` is one of two kinds:
//! - live: `[tls]` files, `[auth]`, `[jobs]`, `[packages]` (the backend is rebuilt from the new
//!   section), `[report]`, `log.level`. A SIGHUP applies them.
//! - restart: `[server]` and `[metrics]` (listeners), `[agent]` (identity, state directory, labels),
//!   `log.format`, `packages.manager`, `report.outbox_size`, and `report.controller` or
//!   `report.controllers` when it goes between unset and set. They keep their running values
//!   until the agent restarts; the reload log and `patch-agent check-config` both say
//!   "restart needed for: KEY".
//!
//! `check-config` knows what runs from `running-config.json` in the state directory, which the
//! agent writes at start and after every reload: the effective value of every key.

use crate::config::Config;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The configuration as dotted keys (`jobs.queue_size`, `agent.labels.team`) and values.
pub type Keys = BTreeMap<String, Value>;

pub fn keys(c: &Config) -> Keys {
    let mut out = Keys::new();
    // Config serializes to a JSON object by construction; Null would only mean no keys.
    flatten("", serde_json::to_value(c).unwrap_or(Value::Null), &mut out);
    out
}

fn flatten(prefix: &str, v: Value, out: &mut Keys) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        leaf => {
            out.insert(prefix.to_string(), leaf);
        }
    }
}

/// Whether a change of `key` from `old` to `new` waits for a restart.
fn needs_restart(key: &str, old: Option<&Value>, new: Option<&Value>, live_packages: bool) -> bool {
    let empty = |v: Option<&Value>| {
        v.is_none_or(|v| v.as_str() == Some("") || v.as_array().is_some_and(Vec::is_empty))
    };
    key.starts_with("server.")
        || key.starts_with("metrics.")
        || key.starts_with("agent.")
        || key == "log.format"
        || key == "packages.manager"
        || (key.starts_with("packages.") && !live_packages)
        || key == "report.outbox_size"
        || ((key == "report.controller" || key == "report.controllers") && empty(old) != empty(new))
}

/// The keys that differ between what runs and a newly read configuration.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Applied by the reload.
    pub live: Vec<String>,
    /// Kept at their running values until a restart.
    pub restart: Vec<String>,
}

/// `live_packages` is false when the agent runs without a package backend: then `[packages]`
/// changes need a restart too.
pub fn changes(running: &Keys, new: &Keys, live_packages: bool) -> Changes {
    let mut c = Changes::default();
    let all: std::collections::BTreeSet<&String> = running.keys().chain(new.keys()).collect();
    for key in all {
        let (old, now) = (running.get(key), new.get(key));
        if old == now {
            continue;
        }
        if needs_restart(key, old, now, live_packages) {
            c.restart.push(key.clone());
        } else {
            c.live.push(key.clone());
        }
    }
    c
}

/// `new` with every restart key set back to its running value: what runs after a reload.
pub fn effective(running: &Config, mut new: Config, live_packages: bool) -> Config {
    new.server = running.server.clone();
    new.metrics = running.metrics.clone();
    new.agent = running.agent.clone();
    new.log.format = running.log.format;
    new.packages.manager = running.packages.manager;
    if !live_packages {
        new.packages = running.packages.clone();
    }
    new.report.outbox_size = running.report.outbox_size;
    if running.report.controller.is_empty() != new.report.controller.is_empty() {
        new.report.controller = running.report.controller.clone();
    }
    if running.report.controllers.is_empty() != new.report.controllers.is_empty() {
        new.report.controllers = running.report.controllers.clone();
    }
    new
}

fn running_file(state_dir: &Path) -> PathBuf {
    state_dir.join("running-config.json")
}

/// Records what runs, for `check-config`. Failing to is logged, never fatal.
pub fn record_running(config: &Config) {
    let path = running_file(&config.agent.state_dir);
    let write = serde_json::to_vec_pretty(&keys(config))
        .map_err(std::io::Error::other)
        .and_then(|data| std::fs::write(&path, data));
    if let Err(e) = write {
        tracing::warn!(path = %path.display(), error = %e, "Cannot record the running configuration; check-config will not see what needs a restart");
    }
}

/// For `check-config`: the keys of `config` that differ from the running agent's and need a
/// restart. None when no agent has recorded what it runs in `config`'s state directory.
pub fn restart_needed(config: &Config) -> Option<Vec<String>> {
    let data = std::fs::read(running_file(&config.agent.state_dir)).ok()?;
    let running: Keys = serde_json::from_slice(&data).ok()?;
    Some(changes(&running, &keys(config), true).restart)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_live_or_restart() {
        let base = Config::default();
        let mut new = base.clone();
        new.jobs.queue_size += 1;
        new.packages.scan_interval *= 2;
        new.report.timeout *= 2;
        new.log.level = "debug".into();
        new.server.listen = "127.0.0.1:1".into();
        new.agent.labels.insert("team".into(), "web".into());
        new.report.controller = "c:7000".into();
        let c = changes(&keys(&base), &keys(&new), true);
        assert_eq!(
            c.live,
            [
                "jobs.queue_size",
                "log.level",
                "packages.scan_interval",
                "report.timeout"
            ]
        );
        assert_eq!(
            c.restart,
            ["agent.labels.team", "report.controller", "server.listen"]
        );
        let eff = effective(&base, new.clone(), true);
        assert_eq!(eff.jobs.queue_size, new.jobs.queue_size);
        assert_eq!(eff.server, base.server);
        assert_eq!(eff.agent, base.agent);
        assert_eq!(eff.report.controller, "");
        // After the reload, only the restart keys still differ from the file.
        let left = changes(&keys(&eff), &keys(&new), true);
        assert!(left.live.is_empty(), "{left:?}");
        assert_eq!(left.restart, c.restart);
    }

    #[test]
    fn a_controller_change_is_live_and_packages_need_a_backend() {
        let mut base = Config::default();
        base.report.controller = "a:7000".into();
        let mut new = base.clone();
        new.report.controller = "b:7000".into();
        new.packages.apt_options.push("Debug::NoLocking=1".into());
        let c = changes(&keys(&base), &keys(&new), false);
        assert_eq!(c.live, ["report.controller"]);
        assert_eq!(c.restart, ["packages.apt_options"]);
        assert_eq!(effective(&base, new, false).packages, base.packages);
    }
}
