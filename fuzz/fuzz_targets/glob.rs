//! The linear glob matcher agrees with a plain dynamic-programming one on any pattern and text.
#![no_main]
use imds_policy::roles::wildcard_match;
use libfuzzer_sys::fuzz_target;

/// `*` any run, `?` any one byte: the textbook table, O(pattern × text).
fn reference(pattern: &[u8], text: &[u8]) -> bool {
    let mut row = vec![false; text.len() + 1];
    row[0] = true;
    for &p in pattern {
        let mut next = vec![false; text.len() + 1];
        if p == b'*' {
            next[0] = row[0];
            for t in 1..=text.len() {
                next[t] = row[t] || next[t - 1];
            }
        } else {
            for t in 1..=text.len() {
                next[t] = row[t - 1] && (p == b'?' || p == text[t - 1]);
            }
        }
        row = next;
    }
    row[text.len()]
}

fuzz_target!(|input: (&[u8], &[u8])| {
    let (pattern, text) = input;
    if pattern.len() > 64 || text.len() > 256 {
        return;
    }
    assert_eq!(
        wildcard_match(pattern, text),
        reference(pattern, text),
        "{:?} against {:?}",
        String::from_utf8_lossy(pattern),
        String::from_utf8_lossy(text)
    );
});
