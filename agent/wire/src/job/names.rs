//! Package arguments a job may hand to a package manager: names, versions and exclude patterns.
//!
//! A package argument must never change meaning on its way to the package manager. apt-get
//! reads a trailing `-` on an argument as "remove" and a trailing `+` as "install", even after
//! `--` and even inside `name=version` (`hello-` removes hello; `pt-plain=2.1-` removed
//! pt-plain). dnf reads a leading `@` as a group, a `/` as a file path and glob characters as
//! patterns. So the grammar checks below refuse those forms outright, and each refusal says
//! which rule was broken. The engine also compares the host with the plan after applying, as a
//! net for whatever this misses.

/// Characters that make a name a glob or a regex for some package manager.
const PATTERN_CHARS: &[char] = &['*', '?', '[', ']', '^', '$', '|', '(', ')'];

/// Which grammar a name or version must follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grammar {
    /// Debian policy (apt/dpkg).
    Debian,
    /// RPM (dnf/yum).
    Rpm,
}

impl Grammar {
    /// The grammar for a backend name ("apt", "dnf", "yum", "zypper"); None when unknown (patchctl
    /// signing offline accepts what either grammar accepts).
    pub fn of(manager: Option<&str>) -> Option<Self> {
        match manager {
            Some("apt") => Some(Grammar::Debian),
            Some(_) => Some(Grammar::Rpm),
            None => None,
        }
    }
}

/// Why `name` may not be used as a package name, if it may not.
pub fn name_problem(grammar: Option<Grammar>, name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("is empty".into());
    }
    if name.len() > 255 {
        return Some("is longer than 255 characters".into());
    }
    if name.starts_with('-') {
        return Some("starts with '-' (it would be read as an option)".into());
    }
    if name.starts_with('@') {
        return Some("starts with '@' (dnf reads it as a group)".into());
    }
    if name.contains('/') {
        return Some("contains '/' (package managers read it as a file path)".into());
    }
    if let Some(c) = name.chars().find(|c| PATTERN_CHARS.contains(c)) {
        return Some(format!(
            "contains {c:?}, a glob or regex character; name one package exactly"
        ));
    }
    in_grammar(grammar, name, debian_name_problem, rpm_name_problem)
}

/// Checks `arg` with the grammar's check; without a grammar it passes if either accepts it.
fn in_grammar(
    grammar: Option<Grammar>,
    arg: &str,
    debian: fn(&str) -> Option<String>,
    rpm: fn(&str) -> Option<String>,
) -> Option<String> {
    match grammar {
        Some(Grammar::Debian) => debian(arg),
        Some(Grammar::Rpm) => rpm(arg),
        None => debian(arg).filter(|_| rpm(arg).is_some()),
    }
}

/// apt-get's modifiers: a trailing `-` removes, a trailing `+` installs, whatever precedes it.
fn apt_modifier(arg: &str) -> Option<String> {
    let last = arg.chars().last().filter(|c| matches!(c, '-' | '+'))?;
    Some(format!(
        "ends in '{last}': apt-get reads a trailing '-' as remove and '+' as install"
    ))
}

fn debian_name_problem(name: &str) -> Option<String> {
    apt_modifier(name).or_else(|| {
        (!crate::ids::valid_debian_name(name)).then(|| {
            "is not a Debian package name (2 or more of [a-z0-9+.-], starting with a letter or digit)"
                .to_string()
        })
    })
}

fn rpm_name_problem(name: &str) -> Option<String> {
    (!crate::ids::valid_rpm_name(name))
        .then(|| "is not an RPM package name ([A-Za-z0-9._+-])".to_string())
}

/// Why `version` may not be used as an exact package version, if it may not.
pub fn version_problem(grammar: Option<Grammar>, version: &str) -> Option<String> {
    if version.is_empty() {
        return Some("is empty".into());
    }
    if version.len() > 256 {
        return Some("is longer than 256 characters".into());
    }
    if version.starts_with('-') {
        return Some("starts with '-' (it would be read as an option)".into());
    }
    in_grammar(
        grammar,
        version,
        debian_version_problem,
        rpm_version_problem,
    )
}

/// Debian policy 5.6.12: `[epoch:]upstream_version[-debian_revision]`.
fn debian_version_problem(v: &str) -> Option<String> {
    if let Some(why) = apt_modifier(v) {
        return Some(why);
    }
    let (epoch, rest) = match v.split_once(':') {
        Some((e, r)) => (Some(e), r),
        None => (None, v),
    };
    if let Some(e) = epoch
        && (e.is_empty() || !e.bytes().all(|b| b.is_ascii_digit()))
    {
        return Some("has an epoch that is not a number".into());
    }
    let (upstream, revision) = match rest.rsplit_once('-') {
        Some((u, r)) => (u, Some(r)),
        None => (rest, None),
    };
    if !upstream.as_bytes().first().is_some_and(u8::is_ascii_digit) {
        return Some("has an upstream version that does not start with a digit".into());
    }
    let upstream_ok = upstream.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(b, b'.' | b'+' | b'~')
            || (b == b'-' && revision.is_some())
    });
    if !upstream_ok {
        return Some(
            "is not a Debian version ([epoch:]upstream[-revision] of [A-Za-z0-9.+~-])".into(),
        );
    }
    if let Some(r) = revision
        && (r.is_empty()
            || !r
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'~')))
    {
        return Some("has a Debian revision that is empty or not of [A-Za-z0-9.+~]".into());
    }
    None
}

/// `[epoch:]version[-release]`, each of `[A-Za-z0-9._+~^]`.
fn rpm_version_problem(v: &str) -> Option<String> {
    let (epoch, rest) = match v.split_once(':') {
        Some((e, r)) => (Some(e), r),
        None => (None, v),
    };
    if let Some(e) = epoch
        && (e.is_empty() || !e.bytes().all(|b| b.is_ascii_digit()))
    {
        return Some("has an epoch that is not a number".into());
    }
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.as_bytes()[0].is_ascii_alphanumeric()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'~' | b'^'))
    };
    let ok = match rest.split_once('-') {
        Some((ver, rel)) => part_ok(ver) && part_ok(rel),
        None => part_ok(rest),
    };
    (!ok).then(|| "is not an RPM version ([epoch:]version[-release] of [A-Za-z0-9._+~^])".into())
}

/// Compiles an exclude glob (`*`, `?`, `[a-z]`, `[!a]`) into an anchored regex. Outside the glob
/// characters only package-name characters are allowed.
pub fn glob_regex(glob: &str) -> Result<regex::Regex, String> {
    if glob.is_empty() || glob.len() > 255 {
        return Err("must be 1-255 characters".into());
    }
    if glob.starts_with('-') {
        return Err("starts with '-'".into());
    }
    let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+');
    let mut re = String::from("^(?:");
    let mut chars = glob.chars();
    while let Some(c) = chars.next() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            '[' => {
                re.push('[');
                let mut first = true;
                let mut closed = false;
                for c in chars.by_ref() {
                    match c {
                        ']' if !first => {
                            closed = true;
                            break;
                        }
                        '!' if first => re.push('^'),
                        '-' => re.push('-'),
                        c if name_char(c) => re.push_str(&regex::escape(&c.to_string())),
                        c => return Err(format!("{c:?} is not allowed in a [class]")),
                    }
                    first = false;
                }
                if !closed {
                    return Err("has a '[' without its ']'".into());
                }
                re.push(']');
            }
            c if name_char(c) => re.push_str(&regex::escape(&c.to_string())),
            c => {
                return Err(format!(
                    "{c:?} is neither a package-name character nor a glob character (* ? [ ])"
                ));
            }
        }
    }
    re.push_str(")$");
    regex::RegexBuilder::new(&re)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("is not a valid glob: {e}"))
}

/// Whether `found` (the installed full version) is the `planned` one. An RPM version planned
/// without a release matches any release of it; an explicit epoch 0 matches none written.
pub fn version_matches(planned: &str, found: &str) -> bool {
    let strip = |v: &str| v.strip_prefix("0:").unwrap_or(v).to_string();
    let (planned, found) = (strip(planned), strip(found));
    planned == found
        || (!planned.contains('-')
            && found
                .strip_prefix(planned.as_str())
                .is_some_and(|rest| rest.starts_with('-')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_names_that_change_meaning_are_refused() {
        let d = Some(Grammar::Debian);
        for bad in [
            "hello-", "hello+", "-oFoo", "a*", "a?", "[ab]c", "^a", "a$", "a|b", "a(b)", "@grp",
            "a/b", "A", "a",
        ] {
            assert!(name_problem(d, bad).is_some(), "{bad}");
        }
        assert!(
            name_problem(d, "hello-")
                .expect("refused")
                .contains("remove")
        );
        for good in ["hello", "libc6", "libstdc++6", "python3.11", "pt-plain"] {
            assert_eq!(name_problem(d, good), None, "{good}");
        }
    }

    #[test]
    fn rpm_names() {
        let r = Some(Grammar::Rpm);
        for bad in ["-x", "@core", "/usr/bin/sh", "kernel*", "a?", "a b", "a;b"] {
            assert!(name_problem(r, bad).is_some(), "{bad}");
        }
        for good in [
            "libstdc++",
            "glibc",
            "python3.11",
            "NetworkManager",
            "perl-Foo_bar",
        ] {
            assert_eq!(name_problem(r, good), None, "{good}");
        }
        // zypper reads `!name` and `~name` as "remove", and `kind:name` (patch:, pattern:) as
        // another kind of thing: none is an RPM name.
        let z = Grammar::of(Some("zypper"));
        assert_eq!(z, Some(Grammar::Rpm));
        for bad in [
            "!glibc",
            "~glibc",
            "patch:SUSE-2026-1",
            "pattern:base",
            "a=1",
            "a<2",
        ] {
            assert!(name_problem(z, bad).is_some(), "{bad}");
        }
        // Unknown manager: either grammar; the hazards are refused regardless.
        assert_eq!(name_problem(None, "NetworkManager"), None);
        assert!(name_problem(None, "a*").is_some());
    }

    #[test]
    fn versions() {
        let d = Some(Grammar::Debian);
        for good in ["1.0", "1:2.3-4+deb12u1~bpo", "2.1-1", "1.2-3-4"] {
            assert_eq!(version_problem(d, good), None, "{good}");
        }
        for bad in [
            "2.1-", "2.1+", "-1", "a1.0", "x:1", "1.0_1", "1 2", "1;id", "1.0-",
        ] {
            assert!(version_problem(d, bad).is_some(), "{bad}");
        }
        let r = Some(Grammar::Rpm);
        for good in ["1.1", "1.1-1", "2:2.34-60.el9_2.7", "1.0^git1"] {
            assert_eq!(version_problem(r, good), None, "{good}");
        }
        for bad in ["1.1-", "1-2-3", "1.*", "-1", "1.1-1;x"] {
            assert!(version_problem(r, bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn globs() {
        let re = glob_regex("linux-image-*").expect("glob");
        assert!(re.is_match("linux-image-amd64") && !re.is_match("xlinux-image-amd64"));
        let re = glob_regex("lib?[!x]c").expect("glob");
        assert!(re.is_match("liblac") && !re.is_match("libxxc"));
        for bad in ["", "-x*", "a b*", "a[bc", "a[;]", "a(b)*", "a|b", "$x"] {
            assert!(glob_regex(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn planned_versions() {
        assert!(version_matches("1.1", "1.1"));
        assert!(version_matches("1.1", "1.1-1"));
        assert!(version_matches("0:1.1-1", "1.1-1"));
        assert!(!version_matches("1.1-1", "1.1-2"));
        assert!(!version_matches("1.1", "1.10"));
        assert!(!version_matches("2.1", "2.0"));
    }
}
