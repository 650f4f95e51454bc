//! A new ECDSA P-256 key and its PKCS#10 certificate signing request (RFC 2986), built with
//! ring and a few lines of DER: the daemon does not carry a certificate library for one
//! fixed-shape structure. The CSR names the host in its subject CN; the names the certificate
//! will carry travel beside it in the request, and the controller decides them.

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

/// A fresh key pair: PKCS#8 DER (kept only on this host) and the CSR for it.
pub struct NewKey {
    pkcs8: Vec<u8>,
    /// DER SubjectPublicKeyInfo of the new key.
    pub spki: Vec<u8>,
    pub csr_der: Vec<u8>,
}

impl NewKey {
    /// Generates a P-256 key and a CSR with subject `CN=<common_name>`.
    pub fn generate(common_name: &str) -> Result<Self, String> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| "cannot generate an ECDSA P-256 key".to_string())?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| "cannot load the key just generated".to_string())?;
        let spki = p256_spki(pair.public_key().as_ref());
        let info = seq(&[
            &der(INTEGER, &[0]),
            &name(common_name),
            &spki,
            // attributes [0]: none.
            &der(0xa0, &[]),
        ]);
        let sig = pair
            .sign(&rng, &info)
            .map_err(|_| "cannot sign the certificate request".to_string())?;
        let csr_der = seq(&[&info, &seq(&[ECDSA_WITH_SHA256]), &bit_string(sig.as_ref())]);
        Ok(Self {
            pkcs8: pkcs8.as_ref().to_vec(),
            spki,
            csr_der,
        })
    }

    /// The private key as PEM (`-----BEGIN PRIVATE KEY-----`, PKCS#8).
    pub fn key_pem(&self) -> String {
        pem::encode(&pem::Pem::new("PRIVATE KEY", self.pkcs8.clone()))
    }
}

const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const UTF8_STRING: u8 = 0x0c;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
/// OID 1.2.840.10045.2.1 (id-ecPublicKey), 1.2.840.10045.3.1.7 (prime256v1).
const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const PRIME256V1: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// AlgorithmIdentifier content: OID 1.2.840.10045.4.3.2 (ecdsa-with-SHA256), no parameters.
const ECDSA_WITH_SHA256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
/// OID 2.5.4.3 (commonName).
const COMMON_NAME: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x03];

/// One DER tag-length-value.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = n.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[&[u8]]) -> Vec<u8> {
    der(SEQUENCE, &parts.concat())
}

fn bit_string(bits: &[u8]) -> Vec<u8> {
    // No unused bits.
    der(BIT_STRING, &[&[0u8][..], bits].concat())
}

/// A Name with one RDN: CN=`cn`.
fn name(cn: &str) -> Vec<u8> {
    let atv = seq(&[COMMON_NAME, &der(UTF8_STRING, cn.as_bytes())]);
    seq(&[&der(SET, &atv)])
}

/// SubjectPublicKeyInfo of an uncompressed P-256 point.
pub fn p256_spki(point: &[u8]) -> Vec<u8> {
    seq(&[&seq(&[EC_PUBLIC_KEY, PRIME256V1]), &bit_string(point)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_short_and_long() {
        assert_eq!(der(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = der(0x04, &[0; 200]);
        assert_eq!(&long[..3], &[0x04, 0x81, 200]);
        let longer = der(0x04, &[0; 300]);
        assert_eq!(&longer[..4], &[0x04, 0x82, 0x01, 0x2c]);
    }

    /// openssl parses the CSR, checks its signature, and reads back the subject and key.
    #[test]
    fn openssl_verifies_the_request() {
        let key = NewKey::generate("web-01.example").expect("key");
        let dir = tempfile::tempdir().expect("tmp");
        let csr = dir.path().join("req.der");
        std::fs::write(&csr, &key.csr_der).expect("write");
        let out = std::process::Command::new("openssl")
            .args([
                "req", "-inform", "DER", "-verify", "-noout", "-subject", "-in",
            ])
            .arg(&csr)
            .output()
            .expect("openssl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("verify OK"), "{text}");
        assert!(
            text.contains("CN = web-01.example") || text.contains("CN=web-01.example"),
            "{text}"
        );
        // The key openssl reads from the PEM is the one in the CSR.
        let pem_path = dir.path().join("k.pem");
        std::fs::write(&pem_path, key.key_pem()).expect("write");
        let out = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-outform", "DER", "-in"])
            .arg(&pem_path)
            .output()
            .expect("openssl");
        assert!(out.status.success());
        assert_eq!(out.stdout, key.spki);
    }

    #[test]
    fn two_keys_differ() {
        let a = NewKey::generate("h").expect("a");
        let b = NewKey::generate("h").expect("b");
        assert_ne!(a.spki, b.spki);
    }
}
