//! TLS material: loading and checking PEM files, and building the rustls server configuration.
//!
//! The server speaks TLS 1.3 only (every client we support has it; 1.2 would add cipher-suite and
//! renegotiation surface for no user) and requires a client certificate chaining to `[tls] ca`;
//! webpki checks the chain, key usage and validity period, so an expired client certificate or
//! one from another CA fails the handshake. Reloads publish a fresh configuration through a
//! `tokio::sync::watch` channel; see `daemon`.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `[tls]`: the agent's certificate and the CA its clients must chain to. PEM files.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// CA certificate(s) that client certificates must chain to.
    /// Default: `/etc/patch-agent/tls/ca.pem`.
    pub ca: PathBuf,
    /// The agent's certificate chain. Default: `/etc/patch-agent/tls/agent.pem`.
    pub cert: PathBuf,
    /// The agent's private key; must not be readable by group or others.
    /// Default: `/etc/patch-agent/tls/agent.key`.
    pub key: PathBuf,
}

impl Default for TlsSection {
    fn default() -> Self {
        Self {
            ca: PathBuf::from("/etc/patch-agent/tls/ca.pem"),
            cert: PathBuf::from("/etc/patch-agent/tls/agent.pem"),
            key: PathBuf::from("/etc/patch-agent/tls/agent.key"),
        }
    }
}

/// The crypto provider used everywhere (ring: small, no C toolchain beyond cc).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs the process-wide default provider once; later calls are harmless.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A problem with one TLS file: the config key, and what is wrong.
pub type Problem = (String, String);

/// How a server treats its clients beyond `[tls]`.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Let a client without a certificate finish the handshake (it becomes
    /// [`crate::auth::Peer::Anonymous`]); a certificate it does present must still chain to the
    /// CA. The controller allows this for enrolment only, and refuses every other RPC to such
    /// a peer.
    pub allow_anonymous: bool,
    /// Send the CA certificates after our own chain, so that a client that pins the CA by hash
    /// (`patch-agent enroll --ca-hash`) finds it in the handshake.
    pub send_ca: bool,
}

/// Loads `[tls]` and builds the server configuration, or returns every problem found.
pub fn server_config(tls: &TlsSection) -> Result<Arc<rustls::ServerConfig>, Vec<Problem>> {
    server_config_with(tls, &ServerOptions::default())
}

/// [`server_config`] with [`ServerOptions`].
pub fn server_config_with(
    tls: &TlsSection,
    options: &ServerOptions,
) -> Result<Arc<rustls::ServerConfig>, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut ca_certs = Vec::new();
    let roots = match load_certs(&tls.ca) {
        Ok(certs) => {
            let mut roots = rustls::RootCertStore::empty();
            ca_certs.clone_from(&certs);
            let (added, ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                problems.push((
                    "tls.ca".to_string(),
                    format!(
                        "{} holds no usable CA certificate ({ignored} could not be parsed)",
                        tls.ca.display()
                    ),
                ));
            }
            Some(roots)
        }
        Err(e) => {
            problems.push(("tls.ca".to_string(), e));
            None
        }
    };
    let certs = load_certs(&tls.cert)
        .map_err(|e| problems.push(("tls.cert".to_string(), e)))
        .ok();
    let key = check_key_mode(&tls.key)
        .and_then(|()| load_key(&tls.key))
        .map_err(|e| problems.push(("tls.key".to_string(), e)))
        .ok();
    let (Some(roots), Some(mut certs), Some(key)) = (roots, certs, key) else {
        return Err(problems);
    };
    if options.send_ca {
        for ca in ca_certs {
            if !certs.contains(&ca) {
                certs.push(ca);
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let provider = provider();
    let certified = match certified_key(certs, key, &provider) {
        Ok(ck) => ck,
        Err(msg) => {
            return Err(vec![(
                "tls.key".to_string(),
                format!(
                    "{msg} (cert {}, key {})",
                    tls.cert.display(),
                    tls.key.display()
                ),
            )]);
        }
    };
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = if options.allow_anonymous {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    let verifier = builder
        .build()
        .map_err(|e| vec![("tls.ca".to_string(), format!("{}: {e}", tls.ca.display()))])?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| vec![(String::new(), format!("TLS setup failed: {e}"))])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn certified_key(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, String> {
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("the private key is not usable: {e}"))?;
    let ck = CertifiedKey::new(certs, signing);
    match ck.keys_match() {
        Ok(()) => Ok(ck),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Err(
            "the certificate and the private key do not match; point tls.cert and tls.key at a matching pair".into(),
        ),
        Err(e) => Err(format!("cannot check that certificate and key match: {e}")),
    }
}

/// Refuses a private key that anyone but its owner can read or write, or that another user
/// than the one running us owns.
pub fn check_key_mode(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if let Some(why) =
        crate::trusted_files::owner_problem(path, meta.uid(), nix::unistd::geteuid().as_raw())
    {
        return Err(why);
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is accessible by group or others (mode {mode:04o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// All certificates in a PEM file, in order.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_certs(&data).map_err(|e| format!("{}: {e}", path.display()))
}

/// All certificates in PEM text, in order; at least one.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate (expected -----BEGIN CERTIFICATE-----)".into());
    }
    Ok(certs)
}

/// What the agent and the controller need to know about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// See [`crate::auth::certificate_names`].
    pub names: Vec<String>,
    /// Lowercase hex.
    pub serial: String,
    /// Seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
}

/// Reads [`CertInfo`] from a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    Ok(CertInfo {
        spki: cert.public_key().raw.to_vec(),
        names: crate::auth::certificate_names(der)?,
        serial: patch_agent_wire::ids::to_hex(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| {
        format!(
            "{} holds no usable PEM private key ({e}); expected PKCS#8, PKCS#1 or SEC1",
            path.display()
        )
    })
}

/// A client configuration for the agent's reporter and every `patchctl` client: TLS 1.3 only
/// (as the servers are), trusting `ca`, presenting `cert` and `key`, speaking HTTP/2.
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(load_certs(ca)?);
    if added == 0 {
        return Err(format!(
            "{} holds no usable CA certificate ({ignored} could not be parsed)",
            ca.display()
        ));
    }
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| format!("the client certificate and key are not usable: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Connects a configured `endpoint` to `addr` (HOST:PORT) over TLS with `config`, verifying the
/// server's certificate for `server_name`. The endpoint's URI should be `http://HOST:PORT`: the
/// TLS is done here, with our configuration, not by tonic's.
pub async fn connect(
    endpoint: tonic::transport::Endpoint,
    addr: &str,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let addr = addr.to_string();
    let server_name = server_name.to_string();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let (addr, server_name, config) = (addr.clone(), server_name.clone(), config.clone());
            async move {
                let name =
                    rustls::pki_types::ServerName::try_from(server_name.clone()).map_err(|e| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            format!("{server_name:?} is not a valid server name: {e}"),
                        )
                    })?;
                let tcp = tokio::net::TcpStream::connect(addr.as_str()).await?;
                let _ = tcp.set_nodelay(true);
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
}

/// SHA-256 over a certificate's DER SubjectPublicKeyInfo: the CA pin of `patch-agent enroll
/// --ca-hash`, the same as `openssl x509 -pubkey -noout -in ca.pem | openssl pkey -pubin
/// -outform DER | sha256sum`.
pub fn spki_sha256(cert_der: &[u8]) -> Result<[u8; 32], String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    Ok(out)
}

/// A pin as written on the command line: `sha256:` and 64 lowercase hex digits.
pub fn pin_string(hash: &[u8; 32]) -> String {
    format!("sha256:{}", patch_agent_wire::ids::to_hex(hash))
}

/// Parses `sha256:HEX` (64 hex digits, either case).
pub fn parse_pin(s: &str) -> Result<[u8; 32], String> {
    let hex = s.strip_prefix("sha256:").ok_or_else(|| {
        format!("{s:?} is not a CA hash; expected sha256: and 64 hex digits, as `patchctl ca-hash ca.pem` prints")
    })?;
    match patch_agent_wire::ids::from_hex(hex) {
        Some(b) if b.len() == 32 => {
            let mut out = [0; 32];
            out.copy_from_slice(&b);
            Ok(out)
        }
        _ => Err(format!(
            "{s:?} is not a CA hash; expected sha256: and 64 hex digits, as `patchctl ca-hash ca.pem` prints"
        )),
    }
}
