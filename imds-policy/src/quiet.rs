//! Log lines a caller's input causes, bounded ([`Quiet`]), with the clock passed in.
//!
//! A container controls what it sends: malformed requests, roles it may not have, tokens that do
//! not verify. Each is worth one log line, not one per request. Per key (a caller and a reason),
//! at most one line per `interval`; the ones in between are counted, and the next line says how
//! many there were. Over all keys, at most `burst` lines at once and `rate` a second: a thousand
//! containers misbehaving at once are a bounded number of lines, and the rest is counted
//! ([`Quiet::suppressed`]).
use std::{
    collections::HashMap,
    hash::Hash,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::limits::TokenBucket;

/// One key's state: when it last had a line written, and what was kept quiet since.
#[derive(Clone, Copy, Debug)]
struct Entry {
    written: Option<Instant>,
    quiet: u64,
}

struct State<K> {
    keys: HashMap<K, Entry>,
    lines: TokenBucket,
    suppressed: u64,
}

/// The gate every container-caused log line passes.
pub struct Quiet<K> {
    interval: Duration,
    max_keys: usize,
    state: Mutex<State<K>>,
}

impl<K: Eq + Hash> Quiet<K> {
    /// One line per key per `interval`; `rate` lines a second over all keys, `burst` at once;
    /// at most `max_keys` keys remembered.
    pub fn new(interval: Duration, rate: f64, burst: f64, max_keys: usize, now: Instant) -> Self {
        Self {
            interval,
            max_keys,
            state: Mutex::new(State {
                keys: HashMap::new(),
                lines: TokenBucket::new(rate, burst, now),
                suppressed: 0,
            }),
        }
    }

    /// Whether a line for `key` is written now: `Some(repeats)`, the lines for it kept quiet
    /// since the last one written; `None`: kept quiet (and counted).
    pub fn admit(&self, key: K, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().expect("quiet poisoned");
        let state = &mut *state;
        if state.keys.len() >= self.max_keys && !state.keys.contains_key(&key) {
            let interval = self.interval;
            state.keys.retain(|_, entry| {
                entry
                    .written
                    .is_some_and(|at| now.saturating_duration_since(at) < interval)
            });
            if state.keys.len() >= self.max_keys {
                state.keys.clear();
            }
        }
        let entry = state.keys.entry(key).or_insert(Entry {
            written: None,
            quiet: 0,
        });
        let due = entry
            .written
            .is_none_or(|at| now.saturating_duration_since(at) >= self.interval);
        if due && state.lines.take(now) {
            let repeats = entry.quiet;
            *entry = Entry {
                written: Some(now),
                quiet: 0,
            };
            return Some(repeats);
        }
        entry.quiet += 1;
        state.suppressed += 1;
        None
    }

    /// Lines kept quiet so far, over all keys.
    pub fn suppressed(&self) -> u64 {
        self.state.lock().expect("quiet poisoned").suppressed
    }

    /// Keys remembered now.
    pub fn keys(&self) -> usize {
        self.state.lock().expect("quiet poisoned").keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn one_line_per_key_per_interval_and_the_next_says_how_many_were_kept_quiet() {
        let t0 = Instant::now();
        let quiet = Quiet::new(MINUTE, 100.0, 100.0, 1000, t0);
        assert_eq!(quiet.admit("a", t0), Some(0));
        for i in 1..=50 {
            assert_eq!(quiet.admit("a", t0 + Duration::from_millis(i)), None);
        }
        // Another key is not kept quiet by the first.
        assert_eq!(quiet.admit("b", t0), Some(0));
        assert_eq!(quiet.admit("a", t0 + MINUTE), Some(50));
        assert_eq!(quiet.admit("a", t0 + MINUTE), None);
        assert_eq!(quiet.suppressed(), 51);
    }

    #[test]
    fn over_all_keys_the_lines_are_bounded_and_the_rest_counted() {
        let t0 = Instant::now();
        // 10 lines at once, 1 a second after that.
        let quiet = Quiet::new(MINUTE, 1.0, 10.0, 100_000, t0);
        let written = (0..1000).filter(|k| quiet.admit(*k, t0).is_some()).count();
        assert_eq!(written, 10);
        assert_eq!(quiet.suppressed(), 990);
        // A key kept quiet by the global bound gets its line as soon as there is room, with its
        // count.
        assert_eq!(quiet.admit(500, t0 + Duration::from_secs(1)), Some(1));
        // Over a minute of 1000 keys asking every second: about 60 more lines, never 60 000.
        let mut lines = 0;
        for s in 2..62 {
            let now = t0 + Duration::from_secs(s);
            lines += (0..1000).filter(|k| quiet.admit(*k, now).is_some()).count();
        }
        assert!((55..=65).contains(&lines), "{lines}");
    }

    #[test]
    fn keys_are_bounded() {
        let t0 = Instant::now();
        let quiet = Quiet::new(MINUTE, 1e9, 1e9, 100, t0);
        for k in 0..10_000 {
            quiet.admit(k, t0 + Duration::from_millis(k));
        }
        assert!(quiet.keys() <= 100, "{}", quiet.keys());
        // Keys written within the interval are kept while there is room.
        let quiet = Quiet::new(MINUTE, 1e9, 1e9, 100, t0);
        for k in 0..100 {
            quiet.admit(k, t0);
        }
        quiet.admit(1000, t0 + MINUTE);
        assert_eq!(
            quiet.keys(),
            1,
            "only the new key: the others' minute had passed"
        );
    }
}
