//! The configuration's two layers: `agent.toml`, written by the admin, and `enrolled.toml`
//! beside it, written by `patch-agent enroll`.
//!
//! Precedence: `enrolled.toml` is merged over `agent.toml` key by key. A key set in both takes
//! the enrolled value; tables merge, so `[agent.labels]` is the union of both files' labels,
//! enrolled values winning for a label both set. Every other key comes from `agent.toml`, then
//! from the built-in default. `enrolled.toml` may set only [`ENROLLED_KEYS`]: enrolment never
//! changes paths, listeners or job policy. `patch-agent check-config` prints each effective
//! value with the layer it came from.

use super::{Config, Problem, Problems};
use std::path::{Path, PathBuf};

/// The file `patch-agent enroll` writes beside the configuration.
pub const ENROLLED_FILE: &str = "enrolled.toml";

/// What `enrolled.toml` may set.
pub const ENROLLED_KEYS: &[&str] = &[
    "agent.host_id",
    "agent.labels",
    "report.controller",
    "report.server_name",
];

/// Both layers, parsed as TOML tables.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    pub agent: toml::Table,
    /// `enrolled.toml` and its table, when the file exists.
    pub enrolled: Option<(PathBuf, toml::Table)>,
}

fn read_table(path: &Path, missing_ok: bool) -> Result<Option<toml::Table>, Problems> {
    let problem = |message: String| {
        Problems(vec![Problem {
            file: path.to_path_buf(),
            key: String::new(),
            message,
        }])
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(problem(format!(
                "cannot read the configuration ({e}); pass --config FILE or create it (packaging/agent.toml documents every key)"
            )));
        }
    };
    text.parse().map(Some).map_err(|e: toml::de::Error| {
        problem(format!(
            "not valid TOML: {}",
            e.to_string().trim_end().replace('\n', " | ")
        ))
    })
}

/// Dotted paths of every leaf of `t` (a table's entries; arrays are leaves).
fn leaves(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in t {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(inner) if !inner.is_empty() => leaves(inner, &path, out),
            _ => out.push(path),
        }
    }
}

fn lookup<'a>(t: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let v = t.get(*first)?;
    if rest.is_empty() {
        return Some(v);
    }
    match v {
        toml::Value::Table(inner) => lookup(inner, rest),
        _ => None,
    }
}

fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

impl Layers {
    /// Reads `path` and the `enrolled.toml` beside it, if any.
    pub fn read(path: &Path) -> Result<Self, Problems> {
        let agent = read_table(path, false)?.unwrap_or_default();
        let enrolled_path = path.with_file_name(ENROLLED_FILE);
        let enrolled = read_table(&enrolled_path, true)?;
        if let Some(t) = &enrolled {
            let mut keys = Vec::new();
            leaves(t, "", &mut keys);
            let stray: Vec<Problem> = keys
                .into_iter()
                .filter(|k| {
                    !ENROLLED_KEYS
                        .iter()
                        .any(|a| k == a || k.starts_with(&format!("{a}.")))
                })
                .map(|k| Problem {
                    file: enrolled_path.clone(),
                    key: k,
                    message: format!(
                        "enrolled.toml may set only {}; move this key to {}",
                        ENROLLED_KEYS.join(", "),
                        path.display()
                    ),
                })
                .collect();
            if !stray.is_empty() {
                return Err(Problems(stray));
            }
        }
        Ok(Self {
            agent,
            enrolled: enrolled.map(|t| (enrolled_path, t)),
        })
    }

    /// `enrolled.toml` over `agent.toml`.
    pub fn merged(&self) -> toml::Table {
        let mut out = self.agent.clone();
        if let Some((_, t)) = &self.enrolled {
            merge(&mut out, t);
        }
        out
    }

    /// The file a dotted key's value came from, or None for a default.
    pub fn file_of<'a>(&'a self, agent_path: &'a Path, key: &str) -> Option<&'a Path> {
        let path: Vec<&str> = key.split('.').collect();
        // A key's own path, or any parent of it (an array element's problem names its index).
        let set_in = |t: &toml::Table| {
            (1..=path.len())
                .rev()
                .any(|n| lookup(t, &path[..n]).is_some())
        };
        match &self.enrolled {
            Some((p, t)) if set_in(t) => Some(p),
            _ if set_in(&self.agent) => Some(agent_path),
            _ => None,
        }
    }
}

/// Every effective key with its value (as TOML/JSON text) and where it came from:
/// `enrolled.toml`, `agent.toml` or `default`.
pub fn origins(config: &Config, layers: &Layers) -> Vec<(String, String, &'static str)> {
    let Ok(toml::Value::Table(effective)) = toml::Value::try_from(config) else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    leaves(&effective, "", &mut keys);
    keys.sort();
    keys.into_iter()
        .map(|k| {
            let path: Vec<&str> = k.split('.').collect();
            let value = lookup(&effective, &path)
                .and_then(|v| serde_json::to_string(v).ok())
                .unwrap_or_default();
            let origin = match &layers.enrolled {
                Some((_, t)) if lookup(t, &path).is_some() => "enrolled.toml",
                _ if lookup(&layers.agent, &path).is_some() => "agent.toml",
                _ => "default",
            };
            (k, value, origin)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn enrolled_wins_labels_merge_and_origins_are_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let agent = write(
            dir.path(),
            "agent.toml",
            "[agent]\nhost_id = \"local\"\nlabels = { team = \"web\", env = \"dev\" }\n[report]\ncontroller = \"old:1\"\n",
        );
        write(
            dir.path(),
            ENROLLED_FILE,
            "[agent]\nhost_id = \"web-01\"\n[agent.labels]\nenv = \"prod\"\n[report]\ncontroller = \"ctl:7000\"\n",
        );
        let (config, layers) = super::super::load_layers(&agent).expect("load");
        assert_eq!(config.agent.host_id, "web-01");
        assert_eq!(config.report.controller, "ctl:7000");
        assert_eq!(config.agent.labels["env"], "prod");
        assert_eq!(config.agent.labels["team"], "web");
        assert!(config.enrolled.is_some());
        let o = origins(&config, &layers);
        let find = |k: &str| {
            o.iter()
                .find(|(key, _, _)| key == k)
                .map(|(_, v, from)| (v.as_str(), *from))
        };
        assert_eq!(find("agent.host_id"), Some(("\"web-01\"", "enrolled.toml")));
        assert_eq!(find("agent.labels.team"), Some(("\"web\"", "agent.toml")));
        assert_eq!(
            find("agent.labels.env"),
            Some(("\"prod\"", "enrolled.toml"))
        );
        assert_eq!(find("server.listen").map(|(_, f)| f), Some("default"));
    }

    #[test]
    fn enrolled_may_not_set_other_keys() {
        let dir = tempfile::tempdir().expect("tmp");
        let agent = write(dir.path(), "agent.toml", "");
        write(dir.path(), ENROLLED_FILE, "[tls]\nkey = \"/tmp/k\"\n");
        let err = super::super::load(&agent).expect_err("refused");
        assert_eq!(err.0[0].key, "tls.key");
        assert!(err.0[0].file.ends_with(ENROLLED_FILE));
    }

    #[test]
    fn a_bad_enrolled_value_names_enrolled_toml() {
        let dir = tempfile::tempdir().expect("tmp");
        let agent = write(dir.path(), "agent.toml", "");
        write(
            dir.path(),
            ENROLLED_FILE,
            "[report]\ncontroller = \"no port\"\n",
        );
        let err = super::super::load(&agent).expect_err("refused");
        assert_eq!(err.0[0].key, "report.controller");
        assert!(err.0[0].file.ends_with(ENROLLED_FILE), "{err}");
    }
}
