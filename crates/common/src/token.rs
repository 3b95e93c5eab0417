//! Credentials: generation (256-bit random), hashing for storage (SHA-256) and constant-time comparison.
//!
//! The hub stores only hashes; a plain token exists in memory just long enough to be shown once to the
//! one who registered, or to be hashed and compared.

use sha2::{Digest, Sha256};

use crate::secret::Secret;

/// Prefix of worker tokens, so secret scanners and humans recognise them.
pub const WORKER_TOKEN_PREFIX: &str = "clatk_";
/// Prefix of project passkeys.
pub const PASSKEY_PREFIX: &str = "clapk_";
/// Prefix of the hub's admin token.
pub const ADMIN_TOKEN_PREFIX: &str = "claad_";

/// `n` random bytes from the OS, hex encoded.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).expect("the OS random source failed");
    hex::encode(buf)
}

/// A new 256-bit secret with the given prefix.
pub fn generate(prefix: &str) -> Secret {
    Secret::new(format!("{prefix}{}", random_hex(32)))
}

/// SHA-256 of a secret, hex encoded: what the hub stores.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// True when `presented` hashes to `stored_hash`.
pub fn verify(presented: &str, stored_hash: &str) -> bool {
    constant_time_eq(hash(presented).as_bytes(), stored_hash.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_256_bit_and_distinct() {
        let a = generate(WORKER_TOKEN_PREFIX);
        let b = generate(WORKER_TOKEN_PREFIX);
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), WORKER_TOKEN_PREFIX.len() + 64);
        assert!(a.expose().starts_with(WORKER_TOKEN_PREFIX));
    }

    #[test]
    fn verify_matches_only_the_same_secret() {
        let t = generate(WORKER_TOKEN_PREFIX);
        let h = hash(t.expose());
        assert!(verify(t.expose(), &h));
        assert!(!verify("clatk_other", &h));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
