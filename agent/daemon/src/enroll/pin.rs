//! Verifying the controller by a pin on its CA, never by the system trust store.
//!
//! The controller sends its CA after its own certificate (`patchctl serve` does when enrolment
//! is on). The verifier looks for a certificate in the presented chain whose SubjectPublicKeyInfo
//! hashes to the pin, then verifies the controller's certificate under that CA alone, name
//! and validity included, as webpki would under any root. Nothing else is trusted; the token is
//! sent only over a connection that passed.

use patch_agent_service::tls::{pin_string, spki_sha256};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The hashes the controller presented when none matched, for the error message.
    pub seen: Mutex<Vec<String>>,
}

impl PinnedCa {
    pub fn new(pin: [u8; 32]) -> Arc<Self> {
        Arc::new(Self {
            pin,
            provider: patch_agent_service::tls::provider(),
            seen: Mutex::new(Vec::new()),
        })
    }

    /// A TLS 1.3 client configuration, without a client certificate, that trusts only the
    /// pinned CA.
    pub fn client_config(self: &Arc<Self>) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS setup failed: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// What the controller presented, when the pin matched nothing.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut seen = Vec::new();
        let mut ca = None;
        for cert in std::iter::once(end_entity).chain(intermediates) {
            match spki_sha256(cert) {
                Ok(h) if h == self.pin => {
                    ca = Some(cert.clone().into_owned());
                    break;
                }
                Ok(h) => seen.push(pin_string(&h)),
                Err(e) => seen.push(e),
            }
        }
        let Some(ca) = ca else {
            if let Ok(mut s) = self.seen.lock() {
                *s = seen;
            }
            return Err(rustls::Error::General(
                "no certificate the controller presented matches --ca-hash".into(),
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca)?;
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
