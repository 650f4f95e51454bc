//! dpkg's status database (`/var/lib/dpkg/status`), read directly and streamed.
//!
//! The file is a sequence of RFC 822-style stanzas. Only the fields the agent reports are
//! looked at; continuation lines (descriptions, conffiles) are skipped without being copied, and
//! one line buffer is reused, so memory stays flat whatever the size of the database.

use super::Package;
use std::io::Read;

/// Bytes read from the status file at a time; memory stays at this plus one stanza's fields.
const CHUNK: usize = 64 * 1024;

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
        self.any = false;
        // Strings handed to the Package are taken; the others keep their buffers for the next
        // stanza, so a package costs as few allocations as the fields it owns.
        let mut words = self.status.split_ascii_whitespace();
        let (want, _flag, state) = (words.next(), words.next(), words.next());
        let held = want == Some("hold");
        let state = state.and_then(|s| PRESENT_STATES.iter().copied().find(|p| *p == s));
        let status_ok = self.status.split_ascii_whitespace().count() == 3;
        self.status.clear();
        let (name, version, arch, source) = (
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.version),
            std::mem::take(&mut self.arch),
            std::mem::take(&mut self.source),
        );
        let Some(state) = state else {
            if status_ok {
                stats.not_installed += 1;
            } else {
                stats.malformed += 1;
            }
            return;
        };
        if name.is_empty() || version.is_empty() {
            stats.malformed += 1;
            return;
        }
        let Some((epoch, upstream, revision)) = split_version(&version) else {
            stats.malformed += 1;
            return;
        };
        let (version, release) = (upstream.to_string(), revision.to_string());
        let source = match source.split_ascii_whitespace().next() {
            Some(s) if s.len() == source.len() => source,
            Some(s) => s.to_string(),
            None => name.clone(),
        };
        stats.packages += 1;
        f(Package {
            name,
            epoch,
            version,
            release,
            arch,
            source,
            state,
            held,
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
///
/// Fast path: dpkg writes fields in a fixed order (lib/dpkg/parse.c: ... Architecture,
/// Multi-Arch, Source, Version, Replaces, ..., Conffiles, Description), so once a stanza's
/// Version has been read after its Package, Status and Architecture, nothing later in the stanza
/// is needed and the parser jumps to the blank line that ends it (a SIMD search) instead of
/// walking the dependency lists, conffiles and descriptions line by line. A stanza in any other
/// order is simply read line by line.
pub fn parse_status<R: Read>(mut r: R, f: &mut dyn FnMut(Package)) -> std::io::Result<Stats> {
    let mut stats = Stats::default();
    let mut st = Stanza::default();
    // buf[..end] holds unread bytes; it grows only if one line is longer than the buffer.
    let mut buf: Vec<u8> = vec![0; CHUNK];
    let mut end = 0;
    let mut skipping = false;
    let finder = memchr::memmem::Finder::new(b"\n\n");
    loop {
        if end == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = loop {
            match r.read(&mut buf[end..]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        if n == 0 {
            break;
        }
        end += n;
        let mut pos = 0;
        loop {
            if skipping {
                match finder.find(&buf[pos..end]) {
                    Some(i) => {
                        pos += i + 2;
                        skipping = false;
                        st.finish(&mut stats, f);
                    }
                    None => {
                        // Keep the last byte: it may be the first newline of the separator.
                        pos = pos.max(end.saturating_sub(1));
                        break;
                    }
                }
                continue;
            }
            let Some(nl) = memchr::memchr(b'\n', &buf[pos..end]) else {
                break;
            };
            let version = line(&buf[pos..pos + nl], &mut st, &mut stats, f);
            pos += nl + 1;
            if version && !st.name.is_empty() && !st.status.is_empty() && !st.arch.is_empty() {
                skipping = true;
                // Back onto the newline that ended the Version line, so a blank line right
                // after it is found as the separator.
                pos -= 1;
            }
        }
        buf.copy_within(pos..end, 0);
        end -= pos;
    }
    let buf = &buf[..end];
    if !skipping && !buf.is_empty() {
        line(buf, &mut st, &mut stats, f);
    }
    st.finish(&mut stats, f);
    Ok(stats)
}

/// Handles one line; returns whether it was the Version field.
fn line(raw: &[u8], st: &mut Stanza, stats: &mut Stats, f: &mut dyn FnMut(Package)) -> bool {
    let l = raw.strip_suffix(b"\r").unwrap_or(raw);
    if l.is_empty() {
        st.finish(stats, f);
        return false;
    }
    // Only five fields matter; everything else is rejected on its first byte.
    if !matches!(l[0], b'P' | b'S' | b'V' | b'A') {
        return false;
    }
    let Some(colon) = memchr::memchr(b':', l) else {
        return false;
    };
    let key = &l[..colon];
    let slot = match key {
        b"Package" => &mut st.name,
        b"Status" => &mut st.status,
        b"Version" => &mut st.version,
        b"Architecture" => &mut st.arch,
        b"Source" => &mut st.source,
        _ => return false,
    };
    slot.clear();
    let value = trim_value(&l[colon + 1..]);
    match std::str::from_utf8(value) {
        Ok(v) => slot.push_str(v),
        Err(_) => slot.push_str(&String::from_utf8_lossy(value)),
    }
    st.any = true;
    key == b"Version"
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

/// Reads the status file at `path`, calling `f` per installed package.
pub fn read_status(path: &std::path::Path, f: &mut dyn FnMut(Package)) -> std::io::Result<Stats> {
    parse_status(std::fs::File::open(path)?, f)
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
            (libc.arch.as_str(), libc.source.as_str(), libc.state),
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
            (last.version.as_str(), last.release.as_str(), last.state),
            ("3-1", "2", "half-configured")
        );
    }

    #[test]
    fn same_result_whatever_the_read_size() {
        // A reader that returns a few bytes at a time exercises every chunk boundary.
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = self.1.min(self.0.len()).min(out.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let (whole, stats) = parse(SAMPLE);
        assert_eq!(whole.len(), 3);
        for step in [1, 2, 3, 7, 64] {
            let mut got = Vec::new();
            let s = parse_status(Trickle(SAMPLE.as_bytes(), step), &mut |p| got.push(p))
                .expect("parse");
            assert_eq!((&got, s), (&whole, stats), "step {step}");
        }
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
