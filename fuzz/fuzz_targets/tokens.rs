//! Any token string: verification never panics, and nothing but a token minted for this subject
//! (byte for byte) verifies.
#![no_main]
use std::time::{Duration, SystemTime};

use imds_policy::tokens::Tokens;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, u64, u16)| {
    thread_local! {
        static TOKENS: Tokens = Tokens::new();
    }
    let (candidate, subject, ttl) = input;
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    TOKENS.with(|tokens| {
        let minted = tokens.mint(subject, Duration::from_secs(u64::from(ttl).max(1)), now);
        assert!(tokens.verify(&minted, subject, now).is_ok());
        assert!(tokens.verify(&minted, subject ^ 1, now).is_err(), "another subject");
        if candidate != minted {
            assert!(
                tokens.verify(candidate, subject, now).is_err(),
                "a forged token verified: {candidate:?}"
            );
        }
    });
});
