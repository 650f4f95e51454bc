//! dpkg's status database (`/var/lib/dpkg/status`), read directly and streamed.
//!
//! The file is a sequence of RFC 822-style stanzas. Only the fields the agent reports are
//! looked at; continuation lines (descriptions, conffiles) are skipped without being copied, and
//! one line buffer is reused, so memory stays flat whatever the size of the database.

use super::Package;
use std::io::BufRead;

/// dpkg package states whose files are (at least partly) on disk.
const PRESENT_STATES: &[&str] = &[
    "installed",
    "triggers-pending",
    "triggers-awaited",
    "half-configured",
    "unpacked",
    "half-installed",
];

/// Counts from one pass over a status file.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Stanzas reported as installed packages.
    pub packages: usize,
    /// Stanzas skipped because the package is not installed (config-files, not-installed).
    pub not_installed: usize,
    /// Stanzas skipped because a required field was missing or malformed.
    pub malformed: usize,
}

#[derive(Default)]
struct Stanza {
    name: String,
    status: String,
    version: String,
    arch: String,
    source: String,
    any: bool,
}

impl Stanza {
    fn finish(&mut self, stats: &mut Stats, f: &mut dyn FnMut(Package)) {
        if !self.any {
            return;
        }
        let stanza = std::mem::take(self);
        let mut words = stanza.status.split_ascii_whitespace();
        let (want, _flag, state) = (words.next(), words.next(), words.next());
        let Some(state) = state else {
            stats.malformed += 1;
            return;
        };
        if !PRESENT_STATES.contains(&state) {
            stats.not_installed += 1;
            return;
        }
        if stanza.name.is_empty() || stanza.version.is_empty() {
            stats.malformed += 1;
            return;
        }
        let Some((epoch, version, release)) = split_version(&stanza.version) else {
            stats.malformed += 1;
            return;
        };
        let source = match stanza.source.split_ascii_whitespace().next() {
            Some(s) => s.to_string(),
            None => stanza.name.clone(),
        };
        stats.packages += 1;
        f(Package {
            name: stanza.name,
            epoch,
            version: version.to_string(),
            release: release.to_string(),
            arch: stanza.arch,
            source,
            state: state.to_string(),
            held: want == Some("hold"),
        });
    }
}

/// Splits a Debian version `[epoch:]upstream[-revision]`.
pub fn split_version(v: &str) -> Option<(u32, &str, &str)> {
    let (epoch, rest) = match v.split_once(':') {
        Some((e, rest)) => (e.parse().ok()?, rest),
        None => (0, v),
    };
    let (upstream, revision) = match rest.rsplit_once('-') {
        Some((u, r)) => (u, r),
        None => (rest, ""),
    };
    if upstream.is_empty() {
        return None;
    }
    Some((epoch, upstream, revision))
}

/// Streams installed packages from a status file's contents.
pub fn parse_status<R: BufRead>(mut r: R, f: &mut dyn FnMut(Package)) -> std::io::Result<Stats> {
    let mut stats = Stats::default();
    let mut line = Vec::with_capacity(256);
    let mut st = Stanza::default();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let l = trim_eol(&line);
        if l.is_empty() {
            st.finish(&mut stats, f);
            continue;
        }
        // Continuation lines and fields we do not report: skip without decoding.
        let Some(colon) = memchr_colon(l) else {
            continue;
        };
        let (key, value) = (&l[..colon], trim_value(&l[colon + 1..]));
        let slot = match key {
            b"Package" => &mut st.name,
            b"Status" => &mut st.status,
            b"Version" => &mut st.version,
            b"Architecture" => &mut st.arch,
            b"Source" => &mut st.source,
            _ => continue,
        };
        *slot = String::from_utf8_lossy(value).into_owned();
        st.any = true;
    }
    st.finish(&mut stats, f);
    Ok(stats)
}

fn trim_eol(l: &[u8]) -> &[u8] {
    let l = l.strip_suffix(b"\n").unwrap_or(l);
    l.strip_suffix(b"\r").unwrap_or(l)
}

fn trim_value(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

fn memchr_colon(l: &[u8]) -> Option<usize> {
    if l.first().is_some_and(|b| b.is_ascii_whitespace()) {
        return None;
    }
    l.iter().position(|&b| b == b':')
}

/// Reads the status file at `path`, calling `f` per installed package.
pub fn read_status(path: &std::path::Path, f: &mut dyn FnMut(Package)) -> std::io::Result<Stats> {
    let file = std::fs::File::open(path)?;
    parse_status(std::io::BufReader::with_capacity(64 * 1024, file), f)
}

/// Names of packages whose dpkg selection is "hold".
pub fn held_names(path: &std::path::Path) -> std::io::Result<Vec<String>> {
    let mut held = Vec::new();
    read_status(path, &mut |p| {
        if p.held {
            held.push(p.name);
        }
    })?;
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Package: libc6\nStatus: install ok installed\nPriority: required\nArchitecture: amd64\nMulti-Arch: same\nSource: glibc (2.36-9+deb12u4)\nVersion: 2.36-9+deb12u4\nDescription: GNU C Library\n a long\n description: with colons\n\nPackage: old-conf\nStatus: deinstall ok config-files\nVersion: 1.0\nArchitecture: all\n\nPackage: held\r\nStatus: hold ok installed\r\nVersion: 1:2.0\r\nArchitecture: all\r\n\nPackage: broken\nStatus: install ok installed\nArchitecture: all\n\n\n\nPackage: last\nStatus: install ok half-configured\nVersion: 3-1-2\nArchitecture: arm64";

    fn parse(s: &str) -> (Vec<Package>, Stats) {
        let mut v = Vec::new();
        let stats = parse_status(s.as_bytes(), &mut |p| v.push(p)).expect("parse");
        (v, stats)
    }

    #[test]
    fn parses_installed_packages_only() {
        let (pkgs, stats) = parse(SAMPLE);
        assert_eq!(
            stats,
            Stats {
                packages: 3,
                not_installed: 1,
                malformed: 1
            }
        );
        let libc = &pkgs[0];
        assert_eq!(
            (
                libc.name.as_str(),
                libc.version.as_str(),
                libc.release.as_str()
            ),
            ("libc6", "2.36", "9+deb12u4")
        );
        assert_eq!(
            (
                libc.arch.as_str(),
                libc.source.as_str(),
                libc.state.as_str()
            ),
            ("amd64", "glibc", "installed")
        );
        assert!(!libc.held);
        let held = &pkgs[1];
        assert!(held.held);
        assert_eq!(
            (held.epoch, held.version.as_str(), held.release.as_str()),
            (1, "2.0", "")
        );
        assert_eq!(held.source, "held");
        let last = &pkgs[2];
        assert_eq!(
            (
                last.version.as_str(),
                last.release.as_str(),
                last.state.as_str()
            ),
            ("3-1", "2", "half-configured")
        );
    }

    #[test]
    fn versions() {
        assert_eq!(split_version("1:2.3-4"), Some((1, "2.3", "4")));
        assert_eq!(split_version("2.3"), Some((0, "2.3", "")));
        assert_eq!(split_version("x:1"), None);
        assert_eq!(split_version("-1"), None);
    }

    #[test]
    fn agrees_with_this_hosts_dpkg_query() {
        let mut ours = Vec::new();
        read_status(std::path::Path::new("/var/lib/dpkg/status"), &mut |p| {
            ours.push(format!("{} {} {}", p.name, p.full_version(), p.arch))
        })
        .expect("status");
        let out = std::process::Command::new("dpkg-query")
            .args([
                "-W",
                "-f",
                "${db:Status-Status} ${Package} ${Version} ${Architecture}\\n",
            ])
            .output()
            .expect("dpkg-query");
        let mut theirs: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(state, _)| PRESENT_STATES.contains(state))
            .map(|(_, rest)| rest.to_string())
            .collect();
        ours.sort();
        theirs.sort();
        assert!(!ours.is_empty());
        assert_eq!(ours, theirs);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn never_panics(s in "(?s).{0,2000}") {
                let _ = parse(&s);
            }

            #[test]
            fn never_panics_on_field_soup(lines in proptest::collection::vec(
                prop_oneof![
                    Just("".to_string()),
                    "(Package|Status|Version|Architecture|Source): [ -~]{0,30}",
                    " [ -~]{0,20}",
                    "[A-Za-z-]{1,12}:[ -~]{0,20}",
                ], 0..60)) {
                let _ = parse(&lines.join("\n"));
            }

            #[test]
            fn round_trips_generated_packages(pkgs in proptest::collection::vec(
                ("[a-z0-9][a-z0-9+.-]{1,20}", 0u32..3, "[0-9][0-9a-z.+~]{0,8}", "[0-9a-z.+~]{0,6}"), 1..30)) {
                let mut text = String::new();
                for (name, epoch, up, rev) in &pkgs {
                    let mut v = String::new();
                    if *epoch > 0 { v.push_str(&format!("{epoch}:")); }
                    v.push_str(up);
                    if !rev.is_empty() { v.push('-'); v.push_str(rev); }
                    text.push_str(&format!("Package: {name}\nStatus: install ok installed\nVersion: {v}\nArchitecture: all\nDescription: x\n more\n\n"));
                }
                let (got, stats) = parse(&text);
                prop_assert_eq!(stats.packages, pkgs.len());
                for (p, (name, epoch, up, rev)) in got.iter().zip(&pkgs) {
                    prop_assert_eq!(&p.name, name);
                    prop_assert_eq!(p.epoch, *epoch);
                    prop_assert_eq!(&p.version, up);
                    prop_assert_eq!(&p.release, rev);
                }
            }
        }
    }
}
