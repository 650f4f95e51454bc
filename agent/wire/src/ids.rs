//! The identifiers that cross the wire, each checked in one place: host ids, job ids, labels,
//! controller addresses, package names (Debian and RPM grammars), and the hex that key ids and
//! digests are written in.

/// A job id: 1–128 characters of `[A-Za-z0-9._-]`.
pub fn valid_job_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The host part of `HOST:PORT` or `[V6]:PORT`.
pub fn host_part(addr: &str) -> Option<&str> {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split_once(']').map(|(h, _)| h);
    }
    addr.rsplit_once(':')
        .map(|(h, _)| h)
        .filter(|h| !h.is_empty())
}

/// `HOST:PORT` or `[V6]:PORT` with a host and a port from 1 to 65535.
pub fn is_host_port(addr: &str) -> bool {
    host_part(addr).is_some()
        && addr
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// Checks one `[agent] labels` entry.
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    let key_ok = !key.is_empty()
        && key.len() <= 63
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if !key_ok {
        return Err(format!(
            "label key {key:?} must be 1-63 characters of [a-z0-9_.-]"
        ));
    }
    if value.chars().count() > 256 || value.chars().any(char::is_control) {
        return Err(format!(
            "label {key:?}: the value must be at most 256 printable characters"
        ));
    }
    Ok(())
}

/// A host id: 1–253 characters of `[A-Za-z0-9._-]`, as hostnames and machine ids are.
pub fn check_host_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 253 {
        return Err(format!("{id:?} must be 1 to 253 characters long"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!(
            "{id:?} contains {c:?}; use only letters, digits, '.', '-' and '_'"
        ));
    }
    Ok(())
}

/// A Debian package name: `[a-z0-9][a-z0-9+.-]+` (Debian Policy 5.6.1).
pub fn valid_debian_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2
        && b.len() <= 255
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'+' | b'.' | b'-')
        })
}

/// An RPM package name: no leading `-`, no whitespace, shell or glob characters.
pub fn valid_rpm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'+'))
}

/// A fresh id: `PREFIX-UNIXSECONDS-8HEX` (random), e.g. `job-1796057654-12d079e9`.
pub fn fresh_id(prefix: &str) -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{prefix}-{secs}-{}", to_hex(&b))
}

/// Lowercase hex of `b`.
pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The bytes of lowercase or uppercase hex; None if `s` is not hex.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        assert_eq!(from_hex(&to_hex(&[0, 255, 16])), Some(vec![0, 255, 16]));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn rpm_names() {
        for ok in [
            "glibc",
            "python3-dnf",
            "libstdc++",
            "perl-Foo_Bar",
            "kernel-core",
        ] {
            assert!(valid_rpm_name(ok), "{ok}");
        }
        for bad in ["-oX", "foo;id", "$(id)", "a b", "", "a*"] {
            assert!(!valid_rpm_name(bad), "{bad}");
        }
    }

    #[test]
    fn debian_names() {
        for ok in ["libc6", "g++", "libstdc++6", "0ad", "a.b-c"] {
            assert!(valid_debian_name(ok), "{ok}");
        }
        for bad in [
            "-oAPT::Update::Pre-Invoke::=touch /tmp/pwned",
            "foo;id",
            "$(id)",
            "a b",
            "A",
            "x",
            "",
        ] {
            assert!(!valid_debian_name(bad), "{bad}");
        }
    }
}
