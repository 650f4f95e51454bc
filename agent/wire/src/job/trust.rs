//! The trust store: Ed25519 public keys that may sign jobs, one PEM SubjectPublicKeyInfo file
//! each (as `openssl pkey -pubout` writes) in `[jobs] trusted_keys_dir`.
//!
//! A key is known by its id: lowercase hex of the first 8 bytes of SHA-256 of the raw 32-byte
//! public key. SIGHUP rebuilds the store from the directory, so a removed file stops verifying.

use rustls_pki_types::pem::PemObject;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE, AlgorithmIdentifier
/// { id-Ed25519 }, BIT STRING of 33 bytes (0 unused bits + 32-byte key).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The domain separation prefix of every job signature.
pub const SIGNING_CONTEXT: &[u8] = b"patchagent-job-v1\0";

/// One trusted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub id: String,
    pub raw: [u8; 32],
    pub file: PathBuf,
}

/// Every trusted key, by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustStore {
    keys: BTreeMap<String, TrustedKey>,
}

/// `key_id` of a raw Ed25519 public key.
pub fn key_id(raw: &[u8; 32]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, raw);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The raw 32-byte key inside an Ed25519 SPKI (DER).
pub fn raw_from_spki(der: &[u8]) -> Result<[u8; 32], String> {
    match der.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
        Some(raw) if raw.len() == 32 => {
            let mut out = [0u8; 32];
            out.copy_from_slice(raw);
            Ok(out)
        }
        _ => Err("not an Ed25519 public key (expected the SubjectPublicKeyInfo that `openssl pkey -pubout` writes)".into()),
    }
}

/// Reads one PEM public key file.
pub fn read_public_key(path: &Path) -> Result<[u8; 32], String> {
    let der = rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_file(path)
        .map_err(|e| format!("{}: not a PEM public key: {e}", path.display()))?;
    raw_from_spki(der.as_ref()).map_err(|e| format!("{}: {e}", path.display()))
}

impl TrustStore {
    /// Loads every `*.pem`/`*.pub` file in `dir`. A missing directory is an empty store; a file
    /// that is not an Ed25519 public key is an error naming it (nothing is half-loaded).
    pub fn load(dir: &Path) -> Result<Self, Vec<String>> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(vec![format!("cannot read {}: {e}", dir.display())]),
        };
        let mut keys = BTreeMap::new();
        let mut problems = Vec::new();
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pem" || e == "pub"))
            .collect();
        files.sort();
        for file in files {
            match read_public_key(&file) {
                Ok(raw) => {
                    let id = key_id(&raw);
                    keys.insert(id.clone(), TrustedKey { id, raw, file });
                }
                Err(e) => problems.push(e),
            }
        }
        if problems.is_empty() {
            Ok(Self { keys })
        } else {
            Err(problems)
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Verifies `signature` over the signing context and `payload` with the key `key_id`.
    pub fn verify(&self, key_id: &str, payload: &[u8], signature: &[u8]) -> Result<(), String> {
        let Some(key) = self.keys.get(key_id) else {
            return Err(format!("key id {key_id:?} is not in the trust store"));
        };
        let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + payload.len());
        msg.extend_from_slice(SIGNING_CONTEXT);
        msg.extend_from_slice(payload);
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &key.raw)
            .verify(&msg, signature)
            .map_err(|_| format!("the signature does not verify with key {key_id}"))
    }
}

/// A signing key (PKCS#8 PEM, as `openssl genpkey -algorithm ed25519` writes).
pub struct SigningKey {
    pair: ring::signature::Ed25519KeyPair,
}

impl SigningKey {
    pub fn read(path: &Path) -> Result<Self, String> {
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_file(path)
            .map_err(|e| format!("{}: not a PEM PKCS#8 private key: {e}", path.display()))?;
        let pair =
            ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
                .map_err(|e| format!("{}: not an Ed25519 private key: {e}", path.display()))?;
        Ok(Self { pair })
    }

    /// The raw public key.
    pub fn public(&self) -> [u8; 32] {
        use ring::signature::KeyPair;
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    pub fn key_id(&self) -> String {
        key_id(&self.public())
    }

    /// Signs a job payload.
    pub fn sign(&self, payload: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + payload.len());
        msg.extend_from_slice(SIGNING_CONTEXT);
        msg.extend_from_slice(payload);
        self.pair.sign(&msg).as_ref().to_vec()
    }
}

/// A fresh key pair as PEM: (PKCS#8 v1 private key, SPKI public key), both as openssl writes.
pub fn generate() -> Result<(String, String, String), String> {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| "no randomness available".to_string())?;
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed)
        .map_err(|e| format!("cannot make a key: {e}"))?;
    use ring::signature::KeyPair;
    // PKCS#8 v1 (RFC 8410 §7): what `openssl genpkey -algorithm ed25519` writes.
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(&seed);
    let mut spki = ED25519_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(pair.public_key().as_ref());
    let mut raw = [0u8; 32];
    raw.copy_from_slice(pair.public_key().as_ref());
    Ok((
        pem("PRIVATE KEY", &pkcs8),
        pem("PUBLIC KEY", &spki),
        key_id(&raw),
    ))
}

fn pem(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_pem() {
        let dir = tempfile::tempdir().expect("tmp");
        let (private, public, id) = generate().expect("generate");
        std::fs::write(dir.path().join("k.key"), &private).expect("w");
        std::fs::write(dir.path().join("k.pem"), &public).expect("w");
        let signer = SigningKey::read(&dir.path().join("k.key")).expect("read private");
        assert_eq!(signer.key_id(), id);
        assert_eq!(id.len(), 16);
        let store = TrustStore::load(dir.path()).expect("store");
        assert_eq!(store.ids().collect::<Vec<_>>(), [id.as_str()]);
        let sig = signer.sign(b"payload");
        store.verify(&id, b"payload", &sig).expect("verifies");
        assert!(store.verify(&id, b"payloaD", &sig).is_err());
        assert!(store.verify("0000000000000000", b"payload", &sig).is_err());
        let mut bad = sig.clone();
        bad[0] ^= 1;
        assert!(store.verify(&id, b"payload", &bad).is_err());
    }

    #[test]
    fn openssl_interoperates() {
        let dir = tempfile::tempdir().expect("tmp");
        let key = dir.path().join("o.key");
        let pubkey = dir.path().join("o.pem");
        let ok = |c: &mut std::process::Command| assert!(c.status().expect("openssl").success());
        ok(std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&key));
        ok(std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&pubkey));
        // Our signer reads openssl's key; openssl's signature verifies in our store.
        let signer = SigningKey::read(&key).expect("openssl private key");
        let store = TrustStore::load(dir.path()).expect("store");
        assert_eq!(store.ids().next(), Some(signer.key_id().as_str()));
        let msg = dir.path().join("msg");
        let mut data = SIGNING_CONTEXT.to_vec();
        data.extend_from_slice(b"job bytes");
        std::fs::write(&msg, &data).expect("w");
        let sig = dir.path().join("sig");
        ok(std::process::Command::new("openssl")
            .args(["pkeyutl", "-sign", "-rawin", "-inkey"])
            .arg(&key)
            .arg("-in")
            .arg(&msg)
            .arg("-out")
            .arg(&sig));
        let sig = std::fs::read(&sig).expect("sig");
        store
            .verify(&signer.key_id(), b"job bytes", &sig)
            .expect("openssl signature verifies");
        // And openssl reads our generated PEM files.
        let (private, _, _) = generate().expect("gen");
        std::fs::write(dir.path().join("ours.key"), private).expect("w");
        ok(std::process::Command::new("openssl")
            .args(["pkey", "-noout", "-in"])
            .arg(dir.path().join("ours.key")));
    }

    #[test]
    fn bad_key_files_are_named() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("junk.pem"), "not a key").expect("w");
        let err = TrustStore::load(dir.path()).expect_err("junk");
        assert!(err[0].contains("junk.pem"), "{err:?}");
        assert!(
            TrustStore::load(&dir.path().join("missing"))
                .expect("missing dir")
                .is_empty()
        );
        assert!(raw_from_spki(&[0u8; 44]).is_err());
    }
}
