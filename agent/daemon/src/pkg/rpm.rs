//! rpm database queries: `rpm -qa` with a tab-separated query format. No rpm tag the agent
//! reads (name, epoch, version, release, arch, source rpm, install time) can contain a tab or a
//! newline, so the format is delimiter-safe; a line with the wrong number of fields is skipped
//! and counted, never guessed at.

use super::Package;
use crate::exec::Cmd;
use std::path::Path;
use std::time::Duration;

/// The query format: one line per package.
pub const QUERY_FORMAT: &str =
    "%{NAME}\\t%{EPOCHNUM}\\t%{VERSION}\\t%{RELEASE}\\t%{ARCH}\\t%{SOURCERPM}\\t%{INSTALLTIME}\\n";

/// One installed rpm: the package, and when it was installed (for reboot detection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpmRecord {
    pub package: Package,
    /// Seconds since the epoch.
    pub install_time: u64,
}

/// `rpm [--root ROOT] -qa --qf FORMAT`.
pub fn query_all_command(rpm: &Path, root: Option<&Path>, timeout: Duration) -> Cmd {
    let mut cmd = Cmd::new(rpm, timeout);
    if let Some(r) = root {
        cmd = cmd.arg("--root").arg(r.display().to_string());
    }
    cmd.args(["-qa", "--qf", QUERY_FORMAT])
}

/// Every installed package (dnf, yum and zypper alike): the query `cmd` (from
/// [`query_all_command`]) run and parsed; malformed lines are skipped, counted and logged.
pub async fn installed(cmd: &Cmd) -> Result<Vec<RpmRecord>, super::PkgError> {
    let out = super::run_checked(cmd, None).await?;
    let (records, skipped) = parse_all(&out.stdout);
    if skipped > 0 {
        tracing::warn!(skipped, "Skipped unparsable rpm query lines");
    }
    Ok(records)
}

/// Parses one line of [`QUERY_FORMAT`] output.
pub fn parse_line(line: &str) -> Option<RpmRecord> {
    let mut f = line.split('\t');
    let name = f.next()?;
    let epoch = f.next()?;
    let version = f.next()?;
    let release = f.next()?;
    let arch = f.next()?;
    let srpm = f.next()?;
    let time = f.next()?;
    if f.next().is_some() || name.is_empty() || version.is_empty() {
        return None;
    }
    let none = |s: &str| {
        if s == "(none)" {
            String::new()
        } else {
            s.to_string()
        }
    };
    Some(RpmRecord {
        install_time: time.trim().parse().ok()?,
        package: Package {
            name: name.to_string(),
            epoch: epoch.parse().unwrap_or(0),
            version: version.to_string(),
            release: none(release),
            arch: none(arch),
            source: source_name(srpm),
            state: "installed",
            held: false,
        },
    })
}

/// `openssl-3.0.7-2.el9.src.rpm` → `openssl`.
pub fn source_name(srpm: &str) -> String {
    if srpm == "(none)" || srpm.is_empty() {
        return String::new();
    }
    let base = srpm.strip_suffix(".rpm").unwrap_or(srpm);
    let base = base.rsplit_once('.').map_or(base, |(b, _arch)| b);
    // NAME-VERSION-RELEASE: drop the last two dash-separated parts.
    let mut parts = base.rsplitn(3, '-');
    let _release = parts.next();
    let _version = parts.next();
    parts.next().unwrap_or(base).to_string()
}

/// Parses the whole output, returning records and the number of lines skipped.
pub fn parse_all(text: &str) -> (Vec<RpmRecord>, usize) {
    let mut skipped = 0;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match parse_line(line) {
            Some(r) => out.push(r),
            None => skipped += 1,
        }
    }
    (out, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let r = parse_line(
            "openssl-libs\t1\t3.0.7\t2.el9\tx86_64\topenssl-3.0.7-2.el9.src.rpm\t1700000000",
        )
        .expect("line");
        assert_eq!(
            (
                r.package.name.as_str(),
                r.package.epoch,
                r.package.version.as_str(),
                r.package.release.as_str()
            ),
            ("openssl-libs", 1, "3.0.7", "2.el9")
        );
        assert_eq!(
            (
                r.package.arch.as_str(),
                r.package.source.as_str(),
                r.install_time
            ),
            ("x86_64", "openssl", 1_700_000_000)
        );
        let k = parse_line("gpg-pubkey\t0\tabc\tdef\t(none)\t(none)\t1").expect("pubkey");
        assert_eq!(
            (k.package.arch.as_str(), k.package.source.as_str()),
            ("", "")
        );
        assert!(parse_line("a\tb").is_none());
        assert!(parse_line("a\t0\t1\t1\tx\ts\t1\textra").is_none());
        assert!(parse_line("a\t0\t1\t1\tx\ts\tnot-a-time").is_none());
        let (recs, skipped) = parse_all("x\t0\t1\t1\tnoarch\tx-1-1.src.rpm\t5\ngarbage\n\n");
        assert_eq!((recs.len(), skipped), (1, 1));
    }

    #[test]
    fn source_names() {
        assert_eq!(source_name("glibc-2.34-60.el9.src.rpm"), "glibc");
        assert_eq!(
            source_name("python3-dnf-plugins-core-4.3.0-5.el9.src.rpm"),
            "python3-dnf-plugins-core"
        );
        assert_eq!(source_name("(none)"), "");
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;
        proptest! {
            #[test]
            fn never_panics(s in "(?s).{0,500}") {
                let _ = parse_all(&s);
                let _ = source_name(&s);
            }
            #[test]
            fn tab_soup(fields in proptest::collection::vec("[ -~]{0,12}", 0..10)) {
                let _ = parse_line(&fields.join("\t"));
            }
        }
    }
}
