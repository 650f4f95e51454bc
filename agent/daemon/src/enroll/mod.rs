//! `patch-agent enroll`: the host joins the fleet with a join token.
//!
//! The host makes its own key (it never leaves the host), checks the controller by a pin on
//! its CA before it sends anything ([`pin`]), proves the token, and gets a certificate. Then it
//! writes, all or nothing ([`files`]): its key and certificate, the CA bundle, the operators'
//! published job-signing keys, and `enrolled.toml` beside the configuration (report target,
//! host id, labels), which the agent loads after `agent.toml` (see `config::layers`).
//! [`renew`] keeps the certificate fresh from then on.

pub mod csr;
pub mod files;
pub mod pin;
pub mod renew;

use crate::config::{self, Config};
use files::Planned;
use patch_agent_service::tls::{parse_pin, pin_string, spki_sha256};
use patch_agent_wire::proto::{EnrollmentClient, v1 as pb};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `patch-agent enroll` arguments. Each of controller, token, CA hash and host id may also come
/// from the environment (`PATCH_AGENT_CONTROLLER`, `PATCH_AGENT_TOKEN`, `PATCH_AGENT_CA_HASH`,
/// `PATCH_AGENT_HOST_ID`) or from `env_file` (the same names, `KEY=VALUE` lines; what package
/// installs read from `/etc/patch-agent/enroll.env`). Flags win over the environment, the
/// environment over the file.
#[derive(Debug, Clone, Default)]
pub struct Args {
    pub controller: Option<String>,
    /// Prefer the environment or the file: other users can read a command line in /proc.
    pub token: Option<String>,
    pub ca_hash: Option<String>,
    pub host_id: Option<String>,
    pub sans: Vec<String>,
    pub config: PathBuf,
    pub env_file: Option<PathBuf>,
}

/// The variables enrolment reads from the environment and the env file.
pub const ENV_KEYS: [&str; 4] = [
    "PATCH_AGENT_CONTROLLER",
    "PATCH_AGENT_TOKEN",
    "PATCH_AGENT_CA_HASH",
    "PATCH_AGENT_HOST_ID",
];

/// Parses an env file: `KEY=VALUE` lines, `#` comments, optional `export ` and quotes.
pub fn parse_env_file(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("line {}: expected KEY=VALUE", n + 1));
        };
        let k = k.trim();
        let v = v.trim();
        let v = ['"', '\''].iter().fold(v, |v, q| {
            v.strip_prefix(*q)
                .and_then(|x| x.strip_suffix(*q))
                .unwrap_or(v)
        });
        if k.starts_with("PATCH_AGENT_") && !ENV_KEYS.contains(&k) {
            return Err(format!(
                "line {}: unknown {k}; expected one of {}",
                n + 1,
                ENV_KEYS.join(", ")
            ));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Fills unset arguments from the environment, then from the env file.
fn resolve(mut args: Args) -> Result<Args, Error> {
    let file = match &args.env_file {
        Some(path) if path.exists() => {
            // It holds a secret: it must be the admin's alone.
            patch_agent_service::tls::check_key_mode(path).map_err(Error::Invalid)?;
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::Invalid(format!("cannot read {}: {e}", path.display())))?;
            parse_env_file(&text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?
        }
        _ => BTreeMap::new(),
    };
    let pick = |flag: &mut Option<String>, key: &str| {
        if flag.is_none() {
            *flag = std::env::var(key)
                .ok()
                .filter(|v| !v.is_empty())
                .or_else(|| file.get(key).filter(|v| !v.is_empty()).cloned());
        }
    };
    pick(&mut args.controller, "PATCH_AGENT_CONTROLLER");
    pick(&mut args.token, "PATCH_AGENT_TOKEN");
    pick(&mut args.ca_hash, "PATCH_AGENT_CA_HASH");
    pick(&mut args.host_id, "PATCH_AGENT_HOST_ID");
    Ok(args)
}

/// Why enrolment did not happen. Nothing was written in either case.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The arguments or the configuration are wrong (exit 2).
    #[error("{0}")]
    Invalid(String),
    /// The controller could not be reached, was not the pinned one, or refused (exit 1).
    #[error("{0}")]
    Failed(String),
}

/// What was enrolled, for the summary line.
#[derive(Debug)]
pub struct Enrolled {
    pub host_id: String,
    pub serial: String,
    pub not_after: String,
    pub written: Vec<PathBuf>,
    pub labels: BTreeMap<String, String>,
}

/// The file beside `config` that enrolment writes.
pub fn enrolled_path(config: &Path) -> PathBuf {
    config.with_file_name(config::ENROLLED_FILE)
}

pub async fn enroll(args: Args) -> Result<Enrolled, Error> {
    let invalid = Error::Invalid;
    let args = resolve(args)?;
    let config = config::load(&args.config).map_err(|p| invalid(p.to_string()))?;
    let (controller, pin, token) = required(&args)?;
    let facts = crate::host::Identity::read(
        &crate::host::Sources::default(),
        args.host_id.as_deref().unwrap_or(&config.agent.host_id),
    )
    .map_err(invalid)?;
    let host_id = facts.host_id.clone();
    patch_agent_wire::ids::check_host_id(&host_id)
        .map_err(|e| invalid(format!("host id: {e}; pass --host-id")))?;
    for san in &args.sans {
        patch_agent_wire::ids::check_host_id(san).map_err(|e| invalid(format!("--san: {e}")))?;
    }

    let key = csr::NewKey::generate(&host_id).map_err(Error::Failed)?;
    let request = pb::EnrollRequest {
        token,
        host_id: host_id.clone(),
        extra_sans: args.sans.clone(),
        csr_der: key.csr_der.clone(),
        facts: Some(pb::EnrollFacts {
            hostname: facts.hostname.clone(),
            machine_id: facts.machine_id.clone(),
            os: Some(crate::convert::os_release(&facts.os)),
            kernel_release: facts.kernel_release.clone(),
            architecture: facts.architecture.clone(),
            agent_version: crate::VERSION.to_string(),
        }),
    };
    let response = call(&controller, pin, request).await?;
    let plan = plan_files(
        &args.config,
        &controller,
        &config,
        &host_id,
        &key,
        pin,
        &response,
    )?;
    files::write_all(&plan).map_err(Error::Failed)?;
    let cert = response.certificate.unwrap_or_default();
    Ok(Enrolled {
        host_id,
        serial: cert.serial,
        not_after: cert
            .not_after
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .unwrap_or_default(),
        written: plan.into_iter().map(|p| p.path).collect(),
        labels: response.labels.into_iter().collect(),
    })
}

/// Controller, CA pin and token, each given one way or another; checked.
fn required(args: &Args) -> Result<(String, [u8; 32], String), Error> {
    let missing = |what: &str, key: &str| {
        Error::Invalid(format!(
            "no {what}: pass --{} or set {key}",
            what.replace(' ', "-")
        ))
    };
    let controller = args
        .controller
        .clone()
        .ok_or_else(|| missing("controller", "PATCH_AGENT_CONTROLLER"))?;
    if !patch_agent_wire::ids::is_host_port(&controller) {
        return Err(Error::Invalid(format!(
            "--controller {controller:?} is not HOST:PORT"
        )));
    }
    let pin = parse_pin(
        args.ca_hash
            .as_deref()
            .ok_or_else(|| missing("ca hash", "PATCH_AGENT_CA_HASH"))?,
    )
    .map_err(Error::Invalid)?;
    let token = args
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| missing("token", "PATCH_AGENT_TOKEN"))?
        .to_string();
    Ok((controller, pin, token))
}

/// Connects with only the pinned CA trusted and calls Enroll.
async fn call(
    controller: &str,
    pin: [u8; 32],
    request: pb::EnrollRequest,
) -> Result<pb::EnrollResponse, Error> {
    let verifier = pin::PinnedCa::new(pin);
    let tls = verifier.client_config().map_err(Error::Failed)?;
    let server_name = patch_agent_wire::ids::host_part(controller).unwrap_or_default();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{controller}"))
        .map_err(|e| Error::Invalid(format!("--controller {controller:?}: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30));
    let channel = patch_agent_service::tls::connect(endpoint, controller, server_name, tls)
        .await
        .map_err(|e| {
            let seen = verifier.seen();
            if seen.is_empty() {
                Error::Failed(format!(
                    "cannot reach the controller at {controller}: {}",
                    crate::report::error_chain(&e)
                ))
            } else {
                Error::Failed(format!(
                    "the controller at {controller} is not the one pinned by --ca-hash {}: its certificates hash to {}. \
                     If the controller's CA changed, take the new hash from `patchctl ca-hash CA.pem`; otherwise something \
                     is between this host and the controller. The token was not sent and nothing was written.",
                    pin_string(&pin),
                    seen.join(", ")
                ))
            }
        })?;
    EnrollmentClient::new(channel)
        .enroll(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| {
            Error::Failed(format!(
                "the controller refused the enrolment ({:?}): {}. Nothing was written.",
                s.code(),
                s.message()
            ))
        })
}

/// Checks the answer against what was asked and pinned, and lays out the files to write.
fn plan_files(
    config_path: &Path,
    controller: &str,
    config: &Config,
    host_id: &str,
    key: &csr::NewKey,
    pin: [u8; 32],
    r: &pb::EnrollResponse,
) -> Result<Vec<Planned>, Error> {
    let bad = |why: String| Error::Failed(format!("the controller's answer is unusable: {why}"));
    let cert = r
        .certificate
        .as_ref()
        .ok_or_else(|| bad("no certificate".into()))?;
    check_certificate(&cert.chain_pem, &key.spki, host_id).map_err(bad)?;
    let bundle = patch_agent_service::tls::parse_certs(r.ca_bundle_pem.as_bytes())
        .map_err(|e| bad(format!("CA bundle: {e}")))?;
    if !bundle
        .iter()
        .any(|c| spki_sha256(c).is_ok_and(|h| h == pin))
    {
        return Err(bad(format!(
            "its CA bundle holds no certificate with the pinned hash {}",
            pin_string(&pin)
        )));
    }
    let mut plan = vec![
        Planned::new(&config.tls.key, key.key_pem(), 0o600),
        Planned::new(&config.tls.cert, cert.chain_pem.clone(), 0o644),
        Planned::new(&config.tls.ca, r.ca_bundle_pem.clone(), 0o644),
    ];
    for k in &r.signing_keys {
        let ok_name = k.name.ends_with(".pem")
            && k.name.len() <= 128
            && !k.name.starts_with('.')
            && k.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok_name {
            return Err(bad(format!(
                "signing key name {:?} is not NAME.pem of [A-Za-z0-9._-]",
                k.name
            )));
        }
        let der = <rustls::pki_types::SubjectPublicKeyInfoDer as rustls::pki_types::pem::PemObject>::from_pem_slice(k.pem.as_bytes())
            .map_err(|e| bad(format!("signing key {}: not a PEM public key: {e}", k.name)))?;
        patch_agent_wire::job::trust::raw_from_spki(der.as_ref())
            .map_err(|e| bad(format!("signing key {}: {e}", k.name)))?;
        plan.push(Planned::new(
            &config.jobs.trusted_keys_dir.join(&k.name),
            k.pem.clone(),
            0o644,
        ));
    }
    for (k, v) in &r.labels {
        patch_agent_wire::ids::check_label(k, v).map_err(bad)?;
    }
    plan.push(Planned::new(
        &enrolled_path(config_path),
        enrolled_toml(host_id, controller, &r.labels),
        0o644,
    ));
    Ok(plan)
}

/// The issued certificate is for our key and names the host.
fn check_certificate(chain_pem: &str, spki: &[u8], host_id: &str) -> Result<(), String> {
    let chain = patch_agent_service::tls::parse_certs(chain_pem.as_bytes())?;
    let leaf = chain.first().ok_or("an empty certificate chain")?;
    let info = patch_agent_service::tls::cert_info(leaf)?;
    if info.spki != spki {
        return Err("the certificate is not for the key this host made".into());
    }
    if !info.names.iter().any(|n| n == host_id) {
        return Err(format!(
            "the certificate names {:?}, not the host id {host_id:?}",
            info.names
        ));
    }
    Ok(())
}

/// TOML basic strings are JSON strings (serde_json escapes `"`, `\` and control characters
/// the way TOML reads them).
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn enrolled_toml(
    host_id: &str,
    controller: &str,
    labels: &std::collections::HashMap<String, String>,
) -> String {
    let labels: BTreeMap<_, _> = labels.iter().collect();
    let mut out = format!(
        "# Written by `patch-agent enroll` ({}). Loaded after agent.toml: the keys here win.\n\
         # To leave the fleet, delete this file and the certificate, then restart the agent.\n\
         [agent]\nhost_id = {}\n\n[agent.labels]\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        toml_string(host_id),
    );
    for (k, v) in labels {
        out.push_str(&format!("{} = {}\n", toml_string(k), toml_string(v)));
    }
    out.push_str(&format!(
        "\n[report]\ncontroller = {}\n",
        toml_string(controller)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files_parse_and_typos_are_named() {
        let m = parse_env_file(
            "# image defaults\nexport PATCH_AGENT_CONTROLLER=ctl:7000\nPATCH_AGENT_TOKEN=\"a.b\"\n\nPATCH_AGENT_CA_HASH='sha256:00'\nOTHER=x\n",
        )
        .expect("parse");
        assert_eq!(m["PATCH_AGENT_CONTROLLER"], "ctl:7000");
        assert_eq!(m["PATCH_AGENT_TOKEN"], "a.b");
        assert_eq!(m["PATCH_AGENT_CA_HASH"], "sha256:00");
        let e = parse_env_file("PATCH_AGENT_TOKNE=x\n").expect_err("typo");
        assert!(
            e.contains("line 1") && e.contains("PATCH_AGENT_TOKEN"),
            "{e}"
        );
        assert!(parse_env_file("junk\n").is_err());
    }

    #[test]
    fn enrolled_toml_reads_back() {
        let labels = [
            ("env".to_string(), "prod \"eu\" \\ ü".to_string()),
            ("team.a".to_string(), "x".to_string()),
        ]
        .into_iter()
        .collect();
        let text = enrolled_toml("web-01", "10.0.0.1:7000", &labels);
        let t: toml::Table = text.parse().expect("toml");
        assert_eq!(t["agent"]["host_id"].as_str(), Some("web-01"));
        assert_eq!(
            t["agent"]["labels"]["env"].as_str(),
            Some("prod \"eu\" \\ ü")
        );
        assert_eq!(t["agent"]["labels"]["team.a"].as_str(), Some("x"));
        assert_eq!(t["report"]["controller"].as_str(), Some("10.0.0.1:7000"));
    }
}
