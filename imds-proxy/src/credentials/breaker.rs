//! The circuit breaker in front of STS: after `threshold` calls in a row that failed because STS
//! itself was unusable (a timeout, a connection that failed, a 5xx, throttling), no call is made
//! for a while (5 s, doubling with each failed trial, at most a minute): requests for roles not
//! cached get an answer at once instead of each holding a call that will fail. When the pause
//! is over one call goes through as a trial; its success closes the breaker.
//!
//! A refusal for one role (AccessDenied, a malformed ARN) says nothing about STS's health and
//! does not count; the per-key back-off in [`super::Cache`] handles those.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::limits::Backoff;

pub const THRESHOLD: u32 = 5;
const OPEN_FIRST: Duration = Duration::from_secs(5);
const OPEN_CAP: Duration = Duration::from_secs(60);

#[derive(Default)]
struct State {
    /// Unusable-STS failures in a row.
    failures: u32,
    /// Set while open: when the next trial may be made.
    open: Option<Backoff>,
    /// A trial call is under way (half-open).
    trial: bool,
}

/// Whether the breaker is closed, open (with how long it stays so), or half-open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Closed,
    Open { failures: u32 },
    HalfOpen,
}

#[derive(Default)]
pub struct Breaker {
    state: Mutex<State>,
}

/// A call may not be made now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Open {
    pub failures: u32,
}

impl Breaker {
    /// May a call be made at `now`? While open, no; once the pause is over, one trial.
    pub fn permit(&self, now: Instant) -> Result<(), Open> {
        let mut state = self.state.lock().expect("breaker poisoned");
        let failures = state.failures;
        match &state.open {
            None => Ok(()),
            Some(backoff) if backoff.waiting(now) || state.trial => Err(Open { failures }),
            Some(_) => {
                state.trial = true;
                Ok(())
            }
        }
    }

    /// A call's outcome: `Some(unusable)` for a failure (unusable: STS's own fault), `None` for
    /// a success.
    pub fn record(&self, now: Instant, failure: Option<bool>) {
        let mut state = self.state.lock().expect("breaker poisoned");
        state.trial = false;
        match failure {
            None => *state = State::default(),
            Some(false) => {
                // STS answered: it is usable, whatever it said about this role.
                state.failures = 0;
                state.open = None;
            }
            Some(true) => {
                state.failures = state.failures.saturating_add(1);
                if let Some(backoff) = &mut state.open {
                    let pause = backoff.failed(now, OPEN_FIRST, OPEN_CAP);
                    tracing::warn!(
                        ?pause,
                        failures = state.failures,
                        "STS trial call failed; breaker stays open"
                    );
                } else if state.failures >= THRESHOLD {
                    let mut backoff = Backoff::default();
                    let pause = backoff.failed(now, OPEN_FIRST, OPEN_CAP);
                    state.open = Some(backoff);
                    tracing::error!(
                        ?pause,
                        failures = state.failures,
                        "STS keeps failing; breaker open: roles not cached are answered 503 at once until a trial call succeeds"
                    );
                }
            }
        }
    }

    pub fn status(&self, now: Instant) -> Status {
        let state = self.state.lock().expect("breaker poisoned");
        match &state.open {
            None => Status::Closed,
            Some(backoff) if backoff.waiting(now) || state.trial => Status::Open {
                failures: state.failures,
            },
            Some(_) => Status::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_of_unusable_failures_and_closes_on_a_trial_success() {
        let t0 = Instant::now();
        let b = Breaker::default();
        for _ in 0..THRESHOLD - 1 {
            assert_eq!(b.permit(t0), Ok(()));
            b.record(t0, Some(true));
        }
        assert_eq!(b.status(t0), Status::Closed, "one short of the threshold");
        b.record(t0, Some(true));
        assert_eq!(
            b.status(t0),
            Status::Open {
                failures: THRESHOLD
            }
        );
        assert!(
            b.permit(t0 + Duration::from_secs(4)).is_err(),
            "open for 5 s"
        );
        // The pause is over: exactly one trial.
        let t1 = t0 + OPEN_FIRST;
        assert_eq!(b.status(t1), Status::HalfOpen);
        assert_eq!(b.permit(t1), Ok(()));
        assert!(b.permit(t1).is_err(), "one trial at a time");
        // It fails: open again, twice as long.
        b.record(t1, Some(true));
        assert!(b.permit(t1 + Duration::from_secs(9)).is_err());
        let t2 = t1 + 2 * OPEN_FIRST;
        assert_eq!(b.permit(t2), Ok(()));
        b.record(t2, None);
        assert_eq!(b.status(t2), Status::Closed);
        assert_eq!(b.permit(t2), Ok(()));
    }

    #[test]
    fn refusals_and_successes_between_failures_keep_it_closed() {
        let t0 = Instant::now();
        let b = Breaker::default();
        for i in 0..3 * THRESHOLD {
            // An AccessDenied every few calls: STS is answering.
            let refusal = i % (THRESHOLD - 1) == 0;
            b.record(t0, Some(!refusal));
        }
        assert_eq!(b.status(t0), Status::Closed);
        for _ in 0..THRESHOLD - 1 {
            b.record(t0, Some(true));
        }
        b.record(t0, None);
        b.record(t0, Some(true));
        assert_eq!(
            b.status(t0),
            Status::Closed,
            "a success starts the count over"
        );
    }
}
