//! IMDSv2 session tokens minted by the proxy, never by the upstream: an HMAC-SHA256, under a key
//! drawn at process start, over the token's expiry and the identity of the container it was minted
//! for (its cgroup id, which the kernel attests and never reuses while the machine is up). A token
//! is useless in another container, after its expiry, and after the proxy restarts.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac as _};
use rand::RngCore as _;
use sha2::Sha256;

/// Token lifetimes IMDS accepts, in seconds.
pub const TTL_RANGE: std::ops::RangeInclusive<u64> = 1..=21_600;
const VERSION: u8 = 1;
/// version, expiry (unix seconds), cgroup id, MAC.
const LEN: usize = 1 + 8 + 8 + 32;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token was minted for another container")]
    WrongContainer,
}

pub struct Tokens {
    key: [u8; 32],
}

impl Default for Tokens {
    fn default() -> Self {
        Self::new()
    }
}

impl Tokens {
    /// With a fresh random key.
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Self { key }
    }

    fn mac(&self, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(body);
        mac
    }

    /// A token for the container with this cgroup id, valid for `ttl` from `now`.
    pub fn mint(&self, cgroup_id: u64, ttl: Duration, now: SystemTime) -> String {
        let expiry = unix(now) + ttl.as_secs();
        let mut bytes = Vec::with_capacity(LEN);
        bytes.push(VERSION);
        bytes.extend_from_slice(&expiry.to_be_bytes());
        bytes.extend_from_slice(&cgroup_id.to_be_bytes());
        let tag = self.mac(&bytes).finalize().into_bytes();
        bytes.extend_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Check a token presented by the container with this cgroup id.
    pub fn verify(&self, token: &str, cgroup_id: u64, now: SystemTime) -> Result<(), TokenError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| TokenError::Malformed)?;
        if bytes.len() != LEN || bytes[0] != VERSION {
            return Err(TokenError::Malformed);
        }
        let (body, tag) = bytes.split_at(1 + 8 + 8);
        // Constant-time comparison of the tag.
        self.mac(body)
            .verify_slice(tag)
            .map_err(|_| TokenError::BadSignature)?;
        let expiry = u64::from_be_bytes(body[1..9].try_into().expect("8 bytes"));
        let minted_for = u64::from_be_bytes(body[9..17].try_into().expect("8 bytes"));
        if minted_for != cgroup_id {
            return Err(TokenError::WrongContainer);
        }
        if unix(now) >= expiry {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_for_its_container_until_it_expires() {
        let tokens = Tokens::new();
        let now = SystemTime::now();
        let t = tokens.mint(42, Duration::from_secs(60), now);
        assert_eq!(tokens.verify(&t, 42, now), Ok(()));
        assert_eq!(tokens.verify(&t, 42, now + Duration::from_secs(59)), Ok(()));
        assert_eq!(
            tokens.verify(&t, 42, now + Duration::from_secs(60)),
            Err(TokenError::Expired)
        );
        assert_eq!(tokens.verify(&t, 43, now), Err(TokenError::WrongContainer));
    }

    #[test]
    fn tampering_and_foreign_keys_are_rejected() {
        let tokens = Tokens::new();
        let now = SystemTime::now();
        let t = tokens.mint(42, Duration::from_secs(60), now);
        // Re-target the token to cgroup 43 without the key: the MAC no longer verifies.
        let mut bytes = URL_SAFE_NO_PAD.decode(&t).unwrap();
        bytes[16] = 43;
        let forged = URL_SAFE_NO_PAD.encode(&bytes);
        assert_eq!(
            tokens.verify(&forged, 43, now),
            Err(TokenError::BadSignature)
        );
        // Extend the expiry: same.
        let mut bytes = URL_SAFE_NO_PAD.decode(&t).unwrap();
        bytes[1] = 0xff;
        assert_eq!(
            tokens.verify(&URL_SAFE_NO_PAD.encode(&bytes), 42, now),
            Err(TokenError::BadSignature)
        );
        // Another process's key (a restarted proxy).
        assert_eq!(
            Tokens::new().verify(&t, 42, now),
            Err(TokenError::BadSignature)
        );
        for junk in [
            "",
            "not a token",
            "AAAA",
            &t[..t.len() - 2],
            &format!("{t}AA"),
        ] {
            assert!(
                matches!(
                    tokens.verify(junk, 42, now),
                    Err(TokenError::Malformed | TokenError::BadSignature)
                ),
                "{junk:?}"
            );
        }
    }
}
