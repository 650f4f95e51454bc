//! The enrolment CA: turns a host's CSR into its certificate.
//!
//! The controller decides everything in the certificate: the names (the host id first, then
//! the extra names it allowed), the usages (serverAuth and clientAuth: the agent serves and
//! reports with it), the lifetime (`--agent-cert-ttl`) and a random serial. From the CSR it
//! takes only the public key, after checking that it is ECDSA P-256 and that the CSR is signed
//! by it (proof that the host holds the key).

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::CertificateDer;
use std::path::Path;
use std::time::Duration;

/// A signed certificate, ready to send.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The host's certificate, then the enrolment CA when it is an intermediate.
    pub chain_pem: String,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
}

pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// The enrolment CA's PEM when it is not one of the trusted roots (an intermediate).
    intermediate_pem: Option<String>,
    /// `--ca`, sent to agents as their CA bundle.
    pub ca_bundle_pem: String,
    pub ttl: Duration,
}

/// Most names one certificate may carry (the host id and its extra names).
pub const MAX_NAMES: usize = 17;

impl Signer {
    /// Loads the enrolment CA and checks that what it signs chains to `trusted` (the `--ca`
    /// that agents' certificates are verified by), by signing and verifying a throwaway one.
    pub fn load(cert: &Path, key: &Path, trusted: &Path, ttl: Duration) -> Result<Self, String> {
        patch_agent_service::tls::check_key_mode(key)
            .map_err(|e| format!("--enroll-ca-key: {e}"))?;
        let cert_pem = std::fs::read_to_string(cert)
            .map_err(|e| format!("--enroll-ca-cert: cannot read {}: {e}", cert.display()))?;
        let key_pem = std::fs::read_to_string(key)
            .map_err(|e| format!("--enroll-ca-key: cannot read {}: {e}", key.display()))?;
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| {
            format!(
                "--enroll-ca-key {}: not a usable private key: {e}",
                key.display()
            )
        })?;
        let ca_der = patch_agent_service::tls::parse_certs(cert_pem.as_bytes())
            .map_err(|e| format!("--enroll-ca-cert {}: {e}", cert.display()))?
            .remove(0);
        let ca_info = patch_agent_service::tls::cert_info(&ca_der)?;
        if ca_info.spki != key_pair.subject_public_key_info() {
            return Err(format!(
                "--enroll-ca-key {} is not the key of --enroll-ca-cert {}",
                key.display(),
                cert.display()
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&ca_der, key_pair)
            .map_err(|e| format!("--enroll-ca-cert {}: not a usable CA: {e}", cert.display()))?;
        let ca_bundle_pem = std::fs::read_to_string(trusted)
            .map_err(|e| format!("--ca: cannot read {}: {e}", trusted.display()))?;
        let roots = patch_agent_service::tls::parse_certs(ca_bundle_pem.as_bytes())
            .map_err(|e| format!("--ca {}: {e}", trusted.display()))?;
        let intermediate_pem = (!roots.contains(&ca_der))
            .then(|| pem::encode(&pem::Pem::new("CERTIFICATE", ca_der.to_vec())));
        let signer = Self {
            issuer,
            intermediate_pem,
            ca_bundle_pem,
            ttl,
        };
        signer.self_test(&roots)?;
        Ok(signer)
    }

    /// Signs a throwaway certificate and verifies it as the listener will verify agents.
    fn self_test(&self, roots: &[CertificateDer<'static>]) -> Result<(), String> {
        let probe = KeyPair::generate().map_err(|e| e.to_string())?;
        let issued = self.sign(&["enrolment-self-test".into()], &probe)?;
        let chain = patch_agent_service::tls::parse_certs(issued.chain_pem.as_bytes())?;
        let mut store = rustls::RootCertStore::empty();
        store.add_parsable_certificates(roots.iter().cloned());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(store),
            patch_agent_service::tls::provider(),
        )
        .build()
        .map_err(|e| format!("--ca: {e}"))?;
        verifier
            .verify_client_cert(&chain[0], &chain[1..], rustls::pki_types::UnixTime::now())
            .map_err(|e| {
                format!(
                    "certificates signed by --enroll-ca-cert do not verify under --ca ({e}); \
                     use the --ca itself or an intermediate CA under it"
                )
            })?;
        Ok(())
    }

    /// Checks the CSR and signs a certificate for its key with `names` (the host id first).
    pub fn issue(&self, names: &[String], csr_der: &[u8]) -> Result<Issued, String> {
        check_csr_key(csr_der)?;
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| format!("the CSR is not valid or not signed by its key: {e}"))?;
        self.sign(names, &csr.public_key)
    }

    fn sign(&self, names: &[String], key: &impl PublicKeyData) -> Result<Issued, String> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names[0].clone());
        params.distinguished_name = dn;
        for name in names {
            params.subject_alt_names.push(san(name)?);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let mut serial = [0u8; 16];
        SystemRandom::new()
            .fill(&mut serial)
            .map_err(|_| "the system random source failed".to_string())?;
        // Positive and without a leading zero byte.
        serial[0] = (serial[0] & 0x7f) | 0x40;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = time::OffsetDateTime::now_utc();
        // Back-dated for hosts whose clock runs a little behind: by a tenth of the lifetime,
        // at most five minutes, so the agent's half-life renewal stays near half the TTL.
        let backdate = (self.ttl / 10).min(Duration::from_secs(300));
        params.not_before = now
            - time::Duration::try_from(backdate).map_err(|e| format!("--agent-cert-ttl: {e}"))?;
        params.not_after = now
            + time::Duration::try_from(self.ttl).map_err(|e| format!("--agent-cert-ttl: {e}"))?;
        let cert = params
            .signed_by(key, &self.issuer)
            .map_err(|e| format!("cannot sign the certificate: {e}"))?;
        let mut chain_pem = cert.pem();
        if let Some(i) = &self.intermediate_pem {
            chain_pem.push_str(i);
        }
        Ok(Issued {
            chain_pem,
            serial: patch_agent_wire::ids::to_hex(&serial),
            not_before: params.not_before.unix_timestamp(),
            not_after: params.not_after.unix_timestamp(),
        })
    }
}

fn san(name: &str) -> Result<SanType, String> {
    if let Ok(ip) = name.parse() {
        return Ok(SanType::IpAddress(ip));
    }
    name.to_string()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|e| format!("{name:?} is not a valid certificate name: {e}"))
}

/// The CSR's key must be ECDSA P-256 (the one key type agents make; rcgen would also mislabel
/// a P-384 key signed with SHA-256).
fn check_csr_key(der: &[u8]) -> Result<(), String> {
    use x509_parser::prelude::FromDer;
    if der.len() > 8192 {
        return Err("the CSR is over 8 KiB".into());
    }
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| format!("the CSR is not a DER PKCS#10 request: {e}"))?;
    let spki = &csr.certification_request_info.subject_pki;
    let alg = &spki.algorithm;
    let curve = alg
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    let is_ec = alg.algorithm.to_id_string() == "1.2.840.10045.2.1";
    if !is_ec || curve.as_deref() != Some("1.2.840.10045.3.1.7") {
        return Err(format!(
            "the CSR's key is {} (curve {}); the controller accepts ECDSA P-256 keys only",
            alg.algorithm.to_id_string(),
            curve.unwrap_or_else(|| "none".into())
        ));
    }
    if spki.subject_public_key.data.len() != 65 || spki.subject_public_key.data[0] != 4 {
        return Err("the CSR's P-256 key is not a 65-byte uncompressed point".into());
    }
    if csr.signature_algorithm.algorithm.to_id_string() != "1.2.840.10045.4.3.2" {
        return Err("the CSR must be signed with ecdsa-with-SHA256".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_keys_other_than_p256() {
        for alg in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P384_SHA384] {
            let key = KeyPair::generate_for(alg).expect("key");
            let csr = CertificateParams::new(vec!["h".to_string()])
                .expect("params")
                .serialize_request(&key)
                .expect("csr");
            let e = check_csr_key(csr.der()).expect_err("refused");
            assert!(e.contains("P-256"), "{e}");
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let csr = CertificateParams::new(vec!["h".to_string()])
            .expect("params")
            .serialize_request(&key)
            .expect("csr");
        check_csr_key(csr.der()).expect("P-256 accepted");
        assert!(check_csr_key(b"junk").is_err());
    }
}
