//! `patchctl pki`: a development PKI (a CA, an agent, a controller and a viewer certificate),
//! and issuing further certificates from that CA. Private keys are created 0600 from the start.
//!
//! This is for development and tests; production fleets use their own PKI (docs/OPERATIONS.md).

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Usage {
    /// TLS client only (controllers, viewers).
    Client,
    /// TLS server and client (agents, which also report to a controller).
    Server,
}

/// One certificate to issue.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Subject CN; also the first SAN.
    pub name: String,
    /// Further SANs: DNS names, IP addresses, or URIs (anything with `://`).
    pub sans: Vec<String>,
    pub usage: Usage,
    /// Validity length in days.
    pub days: i64,
    /// Start of validity this many days in the past (tests use it to make expired certificates).
    pub start_days_ago: i64,
}

/// Creates `dir` (0700) with `ca.pem`/`ca.key` and agent, controller and viewer certificates.
/// Refuses to overwrite existing files unless `force`.
pub fn init(dir: &Path, agent_names: &[String], force: bool) -> Result<Vec<PathBuf>> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let names = ["ca", "agent", "controller", "viewer"];
    if !force {
        for n in names {
            for ext in ["pem", "key"] {
                let p = dir.join(format!("{n}.{ext}"));
                if p.exists() {
                    bail!(
                        "{} exists; pass --force to replace the whole PKI",
                        p.display()
                    );
                }
            }
        }
    }
    let (ca, ca_key) = new_ca()?;
    let mut written = vec![
        write_file(
            &dir.join("ca.pem"),
            ca.self_signed(&ca_key)
                .context("cannot sign the CA certificate")?
                .pem()
                .as_bytes(),
            0o644,
            force,
        )?,
        write_file(
            &dir.join("ca.key"),
            ca_key.serialize_pem().as_bytes(),
            0o600,
            force,
        )?,
    ];
    let issuer = Issuer::new(ca, ca_key);

    let mut agent_sans: Vec<String> = agent_names.to_vec();
    if agent_sans.is_empty() {
        agent_sans = default_agent_names();
    }
    let agent_name = agent_sans.remove(0);
    let leaf = |name: String, sans: Vec<String>, usage| Spec {
        name,
        sans,
        usage,
        days: 825,
        start_days_ago: 0,
    };
    let leaves = [
        ("agent", leaf(agent_name, agent_sans, Usage::Server)),
        (
            "controller",
            leaf("controller".into(), vec![], Usage::Client),
        ),
        ("viewer", leaf("viewer".into(), vec![], Usage::Client)),
    ];
    for (file, spec) in leaves {
        let (pem, key) = sign(&spec, &issuer)?;
        written.push(write_file(
            &dir.join(format!("{file}.pem")),
            pem.as_bytes(),
            0o644,
            force,
        )?);
        written.push(write_file(
            &dir.join(format!("{file}.key")),
            key.as_bytes(),
            0o600,
            force,
        )?);
    }
    Ok(written)
}

/// A fresh development CA: ten years, may sign leaf certificates only.
fn new_ca() -> Result<(CertificateParams, KeyPair)> {
    let ca_key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("patch-agent dev CA {}", unique_suffix()),
    );
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    ca.not_before = now - Duration::hours(1);
    ca.not_after = now + Duration::days(3650);
    Ok((ca, ca_key))
}

/// Issues one certificate from the CA in `dir` into `out.pem` and `out.key`.
pub fn issue(dir: &Path, spec: &Spec, out: &Path, force: bool) -> Result<Vec<PathBuf>> {
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).with_context(|| {
        format!(
            "cannot read {}/ca.pem (run `patchctl pki init` first)",
            dir.display()
        )
    })?;
    let ca_key = std::fs::read_to_string(dir.join("ca.key"))
        .with_context(|| format!("cannot read {}/ca.key", dir.display()))?;
    let key = KeyPair::from_pem(&ca_key).context("ca.key is not a usable private key")?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, key).context("ca.pem is not a usable CA certificate")?;
    let (pem, key) = sign(spec, &issuer)?;
    let with_ext = |ext: &str| {
        let mut s = out.as_os_str().to_owned();
        s.push(ext);
        PathBuf::from(s)
    };
    Ok(vec![
        write_file(&with_ext(".pem"), pem.as_bytes(), 0o644, force)?,
        write_file(&with_ext(".key"), key.as_bytes(), 0o600, force)?,
    ])
}

fn sign(spec: &Spec, issuer: &Issuer<'_, KeyPair>) -> Result<(String, String)> {
    let key = KeyPair::generate().context("cannot generate a key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, spec.name.clone());
    params.distinguished_name = dn;
    for name in std::iter::once(&spec.name).chain(&spec.sans) {
        params.subject_alt_names.push(san(name)?);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match spec.usage {
        Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Usage::Server => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    params.use_authority_key_identifier_extension = true;
    let start =
        OffsetDateTime::now_utc() - Duration::days(spec.start_days_ago) - Duration::hours(1);
    params.not_before = start;
    params.not_after = start + Duration::days(spec.days);
    let cert = params
        .signed_by(&key, issuer)
        .with_context(|| format!("cannot sign a certificate for {}", spec.name))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn san(name: &str) -> Result<SanType> {
    if let Ok(ip) = name.parse() {
        return Ok(SanType::IpAddress(ip));
    }
    let ia5 = name
        .to_string()
        .try_into()
        .with_context(|| format!("{name:?} is not a valid certificate name (ASCII only)"))?;
    Ok(if name.contains("://") {
        SanType::URI(ia5)
    } else {
        SanType::DnsName(ia5)
    })
}

/// This host's names for its agent certificate: FQDN, hostname, localhost, loopback addresses.
pub fn default_agent_names() -> Vec<String> {
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into());
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let fqdn = patch_agent_service::hostname::fqdn(&hostname, &hosts);
    let mut names = vec![
        fqdn,
        hostname,
        "localhost".into(),
        "127.0.0.1".into(),
        "::1".into(),
    ];
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}", nanos ^ u128::from(std::process::id()))
}

fn write_file(path: &Path, data: &[u8], mode: u32, force: bool) -> Result<PathBuf> {
    if force {
        let _ = std::fs::remove_file(path);
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {} (pass --force to replace)", path.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path.to_path_buf())
}
