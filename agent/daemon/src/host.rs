//! Facts about the host: identity, OS, kernel, boot.
//!
//! Facts that cannot change while the agent runs are read once at start; uptime comes from
//! `CLOCK_BOOTTIME` (a vDSO call, no file I/O), so `GetStatus` stays cheap under load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Where host facts are read from; tests point these at fixtures.
#[derive(Debug, Clone)]
pub struct Sources {
    pub os_release: Vec<PathBuf>,
    pub machine_id: PathBuf,
    pub boot_id: PathBuf,
    pub proc_stat: PathBuf,
    pub hosts: PathBuf,
}

impl Default for Sources {
    fn default() -> Self {
        Self {
            os_release: vec!["/etc/os-release".into(), "/usr/lib/os-release".into()],
            machine_id: "/etc/machine-id".into(),
            boot_id: "/proc/sys/kernel/random/boot_id".into(),
            proc_stat: "/proc/stat".into(),
            hosts: "/etc/hosts".into(),
        }
    }
}

/// The subset of os-release the agent reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsRelease {
    pub id: String,
    pub id_like: Vec<String>,
    pub version_id: String,
    pub pretty_name: String,
    pub version_codename: String,
}

/// Host facts fixed for the life of the agent process.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub host_id: String,
    pub hostname: String,
    pub machine_id: String,
    pub boot_id: String,
    pub os: OsRelease,
    pub kernel_release: String,
    pub architecture: String,
    pub boot_time: SystemTime,
}

/// What identifies the host, read without /proc: enrolment runs in package scriptlets and
/// scratch roots where /proc may not be mounted.
#[derive(Debug, Clone)]
pub struct Identity {
    pub host_id: String,
    pub hostname: String,
    pub machine_id: String,
    pub os: OsRelease,
    pub kernel_release: String,
    pub architecture: String,
}

impl Identity {
    /// Reads the identity; `host_id` overrides the FQDN-derived default when not empty.
    pub fn read(src: &Sources, host_id: &str) -> Result<Self, String> {
        let uts = nix::sys::utsname::uname().map_err(|e| format!("uname failed: {e}"))?;
        let hostname = uts.nodename().to_string_lossy().into_owned();
        let os = src
            .os_release
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
            .map(|t| parse_os_release(&t))
            .unwrap_or_default();
        // Containers and fresh images may lack a machine id; report it empty rather than refuse.
        let machine_id = read_trimmed(&src.machine_id).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "No machine id; jobs must target this host by host_id");
            String::new()
        });
        let host_id = if host_id.is_empty() {
            let hosts = std::fs::read_to_string(&src.hosts).unwrap_or_default();
            patch_agent_service::hostname::fqdn(&hostname, &hosts)
        } else {
            host_id.to_string()
        };
        Ok(Self {
            host_id,
            hostname,
            machine_id,
            os,
            kernel_release: uts.release().to_string_lossy().into_owned(),
            architecture: uts.machine().to_string_lossy().into_owned(),
        })
    }
}

impl HostFacts {
    /// Reads the facts; `host_id` overrides the FQDN-derived default when not empty.
    pub fn read(src: &Sources, host_id: &str) -> Result<Self, String> {
        let id = Identity::read(src, host_id)?;
        let boot_id = read_trimmed(&src.boot_id)?;
        let stat = std::fs::read_to_string(&src.proc_stat)
            .map_err(|e| format!("cannot read {}: {e}", src.proc_stat.display()))?;
        let btime = parse_btime(&stat)
            .ok_or_else(|| format!("{} has no btime line", src.proc_stat.display()))?;
        Ok(Self {
            host_id: id.host_id,
            hostname: id.hostname,
            machine_id: id.machine_id,
            boot_id,
            os: id.os,
            kernel_release: id.kernel_release,
            architecture: id.architecture,
            boot_time: SystemTime::UNIX_EPOCH + Duration::from_secs(btime),
        })
    }
}

/// Time since boot, including time suspended (what /proc/uptime reports).
pub fn uptime() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(Duration::from)
        .unwrap_or_default()
}

fn read_trimmed(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// `btime` (boot time, seconds since the epoch) from /proc/stat.
pub fn parse_btime(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Parses os-release(5): `KEY=value` lines, values optionally in single or double quotes with
/// backslash escapes inside double quotes. Unknown keys and malformed lines are ignored.
pub fn parse_os_release(text: &str) -> OsRelease {
    let mut map: HashMap<&str, String> = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, raw)) = line.split_once('=') else {
            continue;
        };
        map.insert(key.trim(), unquote(raw.trim()));
    }
    let mut get = |k: &str| map.remove(k).unwrap_or_default();
    OsRelease {
        id: get("ID"),
        id_like: get("ID_LIKE")
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        version_id: get("VERSION_ID"),
        pretty_name: get("PRETTY_NAME"),
        version_codename: get("VERSION_CODENAME"),
    }
}

fn unquote(raw: &str) -> String {
    let mut chars = raw.chars();
    match chars.next() {
        Some('"') => {
            let mut out = String::new();
            let mut escaped = false;
            for c in chars {
                match (escaped, c) {
                    (false, '\\') => escaped = true,
                    (false, '"') => break,
                    (_, c) => {
                        out.push(c);
                        escaped = false;
                    }
                }
            }
            out
        }
        Some('\'') => chars.take_while(|&c| c != '\'').collect(),
        _ => raw.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_debian() {
        let os = parse_os_release(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\nID=debian\n",
        );
        assert_eq!(os.id, "debian");
        assert_eq!(os.version_id, "12");
        assert_eq!(os.pretty_name, "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(os.version_codename, "bookworm");
    }

    #[test]
    fn os_release_quoting_and_id_like() {
        let os = parse_os_release(
            "# comment\nID='rocky'\nID_LIKE=\"rhel centos fedora\"\nPRETTY_NAME=\"Say \\\"hi\\\"\"\nbroken line\n=\n",
        );
        assert_eq!(os.id, "rocky");
        assert_eq!(os.id_like, ["rhel", "centos", "fedora"]);
        assert_eq!(os.pretty_name, "Say \"hi\"");
    }

    #[test]
    fn os_release_never_panics() {
        for t in ["\"", "A=\"", "A='", "=\\", "ID=\"\\", "\u{feff}ID=x"] {
            let _ = parse_os_release(t);
        }
    }

    #[test]
    fn btime() {
        assert_eq!(
            parse_btime("cpu 1 2\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_btime("cpu 1"), None);
        assert_eq!(parse_btime("btime x"), None);
    }

    #[test]
    fn reads_this_host() {
        let f = HostFacts::read(&Sources::default(), "").expect("host facts");
        assert!(!f.hostname.is_empty());
        let expected = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
        assert_eq!(
            f.machine_id,
            expected.trim(),
            "an absent machine id is reported empty"
        );
        assert_eq!(f.boot_id.len(), 36, "{}", f.boot_id);
        assert!(f.boot_time < SystemTime::now());
        assert!(uptime() > Duration::ZERO);
        let forced = HostFacts::read(&Sources::default(), "forced-id").expect("facts");
        assert_eq!(forced.host_id, "forced-id");
    }
}
