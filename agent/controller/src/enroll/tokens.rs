//! Join tokens: `ID.SECRET`, both lowercase hex. The id (64 random bits) finds the row; the
//! secret (128 random bits) proves the token and is stored only as its SHA-256.

use ring::rand::{SecureRandom, SystemRandom};

/// A token as shown once to the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub secret: String,
}

impl Token {
    pub fn generate() -> Result<Self, String> {
        let rng = SystemRandom::new();
        let mut id = [0u8; 8];
        let mut secret = [0u8; 16];
        rng.fill(&mut id)
            .and_then(|()| rng.fill(&mut secret))
            .map_err(|_| "the system random source failed".to_string())?;
        Ok(Self {
            id: patch_agent_wire::ids::to_hex(&id),
            secret: patch_agent_wire::ids::to_hex(&secret),
        })
    }

    /// Parses `ID.SECRET`; the message never repeats the secret.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            "the token is malformed: expected ID.SECRET (16 and 32 hex digits) as `patchctl tokens create` prints it"
                .to_string()
        };
        let (id, secret) = s.trim().split_once('.').ok_or_else(bad)?;
        let hex = |x: &str, n: usize| x.len() == n && x.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(id, 16) || !hex(secret, 32) {
            return Err(bad());
        }
        Ok(Self {
            id: id.to_ascii_lowercase(),
            secret: secret.to_ascii_lowercase(),
        })
    }

    pub fn secret_sha256(&self) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, self.secret.as_bytes());
        let mut out = [0; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let t = Token::generate().expect("token");
        assert_eq!(t.to_string().len(), 16 + 1 + 32);
        assert_eq!(Token::parse(&t.to_string()).expect("parse"), t);
        assert_ne!(Token::generate().expect("token"), t);
        for bad in [
            "",
            "abc",
            "0123456789abcdef",
            "0123456789abcdeg.0123456789abcdef0123456789abcdef",
            "0123456789abcdef.0123",
        ] {
            let e = Token::parse(bad).expect_err(bad);
            assert!(!e.contains("0123"), "{e}");
        }
    }
}
