//! Rate limits and failure back-off, with the clock passed in (unit-tested without waiting).
//!
//! - [`TokenBucket`]: `rate` requests a second on average, `burst` at once.
//! - [`PerKey`]: one bucket per caller, so one container's burst never spends another's budget.
//! - [`Backoff`]: after a failure, the same call is not made again until a delay (doubling with
//!   each failure in a row, up to a cap) has passed; callers meanwhile get the failure remembered.
use std::{
    collections::HashMap,
    hash::Hash,
    sync::Mutex,
    time::{Duration, Instant},
};

#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Full at `now`.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Take one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// A token bucket per key. Keys whose bucket is full again are forgotten when the map grows past
/// `max_keys` (a full bucket is what a new key would get anyway).
pub struct PerKey<K> {
    rate: f64,
    burst: f64,
    max_keys: usize,
    buckets: Mutex<HashMap<K, TokenBucket>>,
}

impl<K: Eq + Hash + Clone> PerKey<K> {
    pub fn new(rate: f64, burst: f64, max_keys: usize) -> Self {
        Self {
            rate,
            burst,
            max_keys,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn allow(&self, key: &K, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().expect("limiter poisoned");
        if buckets.len() >= self.max_keys && !buckets.contains_key(key) {
            buckets.retain(|_, bucket| !bucket.full(now));
        }
        buckets
            .entry(key.clone())
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst, now))
            .take(now)
    }

    pub fn keys(&self) -> usize {
        self.buckets.lock().expect("limiter poisoned").len()
    }
}

/// Failures in a row, and when the next attempt may be made.
#[derive(Clone, Debug, Default)]
pub struct Backoff {
    failures: u32,
    until: Option<Instant>,
}

impl Backoff {
    /// `first` after one failure, doubling with each further one, never more than `cap`.
    pub fn failed(&mut self, now: Instant, first: Duration, cap: Duration) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = first
            .saturating_mul(1u32 << (self.failures - 1).min(16))
            .min(cap);
        self.until = Some(now + delay);
        delay
    }

    pub fn succeeded(&mut self) {
        *self = Self::default();
    }

    /// Whether an attempt now would come too soon after the last failure.
    pub fn waiting(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// How long until an attempt may be made (zero if it may be made now).
    pub fn remaining(&self, now: Instant) -> Duration {
        self.until
            .map(|until| until.saturating_duration_since(now))
            .unwrap_or_default()
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 5.0, t0);
        assert_eq!((0..8).filter(|_| bucket.take(t0)).count(), 5, "the burst");
        assert!(!bucket.take(t0 + Duration::from_millis(50)), "half a token");
        assert!(
            bucket.take(t0 + Duration::from_millis(100)),
            "one token in 100 ms"
        );
        // Idle for long: back to the burst, not more.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| bucket.take(later)).count(), 5);
    }

    #[test]
    fn each_key_has_its_own_bucket() {
        let t0 = Instant::now();
        let limiter = PerKey::new(1.0, 3.0, 100);
        assert_eq!((0..10).filter(|_| limiter.allow(&"a", t0)).count(), 3);
        assert!(limiter.allow(&"b", t0), "b is not throttled by a");
        assert!(limiter.allow(&"a", t0 + Duration::from_secs(1)));
    }

    #[test]
    fn idle_keys_are_forgotten_when_the_map_is_full() {
        let t0 = Instant::now();
        let limiter = PerKey::new(1.0, 2.0, 3);
        for key in 0..3 {
            assert!(limiter.allow(&key, t0));
        }
        // At t0 none is full again: a fourth key is still admitted (it gets a bucket).
        assert!(limiter.allow(&3, t0));
        assert_eq!(limiter.keys(), 4);
        // Later every bucket is full; a new key makes room.
        assert!(limiter.allow(&4, t0 + Duration::from_secs(10)));
        assert_eq!(limiter.keys(), 1);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_on_success() {
        let t0 = Instant::now();
        let (first, cap) = (Duration::from_secs(1), Duration::from_secs(60));
        let mut b = Backoff::default();
        assert!(!b.waiting(t0));
        assert_eq!(b.failed(t0, first, cap), Duration::from_secs(1));
        assert!(b.waiting(t0 + Duration::from_millis(999)));
        assert!(!b.waiting(t0 + Duration::from_secs(1)));
        assert_eq!(b.failed(t0, first, cap), Duration::from_secs(2));
        assert_eq!(b.failed(t0, first, cap), Duration::from_secs(4));
        for _ in 0..40 {
            b.failed(t0, first, cap);
        }
        assert_eq!(b.failed(t0, first, cap), cap);
        b.succeeded();
        assert!(!b.waiting(t0));
        assert_eq!(b.failures(), 0);
    }
}
