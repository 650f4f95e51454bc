//! The host's fully qualified name, as the agent reports it and as `patchctl pki` names
//! certificates by default.

/// The host's FQDN: the hostname if it has a dot, else the canonical name of an /etc/hosts
/// entry listing the hostname (what `hostname -f` finds with files-only NSS), else the hostname.
pub fn fqdn(hostname: &str, etc_hosts: &str) -> String {
    if hostname.contains('.') {
        return hostname.to_string();
    }
    for line in etc_hosts.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let (Some(_addr), Some(canonical)) = (fields.next(), fields.next()) else {
            continue;
        };
        let listed = canonical == hostname || fields.clone().any(|a| a == hostname);
        if listed && canonical.contains('.') && canonical.split('.').next() == Some(hostname) {
            return canonical.to_string();
        }
        if listed
            && let Some(alias) =
                fields.find(|a| a.split('.').next() == Some(hostname) && a.contains('.'))
        {
            return alias.to_string();
        }
    }
    hostname.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fqdn_from_hosts() {
        let hosts = "127.0.0.1 localhost\n127.0.1.1 web1.example.com web1 # me\n";
        assert_eq!(fqdn("web1", hosts), "web1.example.com");
        assert_eq!(fqdn("db2", hosts), "db2");
        assert_eq!(fqdn("a.b", ""), "a.b");
        assert_eq!(
            fqdn("web1", "10.0.0.1 web1 web1.corp.example\n"),
            "web1.corp.example"
        );
        // A dotted name that is not this host's is not its FQDN.
        assert_eq!(fqdn("web1", "10.0.0.1 other.example web1\n"), "web1");
    }
}
