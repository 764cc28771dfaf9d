//! Our own retry loop, on top of the one inside `object_store`.
//!
//! Why a second loop: `object_store` retries 5xx/429 and connection errors
//! for a few seconds, but it does not retry a non-idempotent request that
//! timed out, it cannot put a hard deadline on one attempt, and it knows
//! nothing about what a retried create *means*. Here every attempt runs under
//! `tokio::time::timeout(request_timeout)`, failures are classified by
//! `remote::classify`'s rules (its `Retryable` impl for `object_store::Error`
//! is in `remote`, beside the classification), and retryable ones wait a capped,
//! full-jitter exponential backoff: `sleep = rand(0 ..= min(max, base * 2^n))`.
//!
//! What is *not* retried here: AlreadyExists / NotFound / Precondition (they
//! are answers, the caller decides), auth and other 4xx, and every crate
//! error that is not [`Error::is_retryable`] (Corrupt, RemoteConflict,
//! Fenced, InvalidInput, ...). Those pass through untouched.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use crate::error::Error;

/// Attempts, backoff and the per-attempt deadline.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Total attempts including the first (>= 1).
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Deadline of one attempt; an attempt past it is abandoned (its future
    /// dropped) and counts as a retryable failure.
    pub request_timeout: Duration,
}

/// The crate's one backoff schedule: step `n` waits `min(max, base * 2^n)`
/// (saturating), with one of two jitters. Used by the request retries here,
/// a segment's drive and a late ownership take in the pipeline, and the
/// metrics listener's accept loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Step 0.
    pub base: Duration,
    /// No step waits longer (before jitter).
    pub max: Duration,
}

impl Backoff {
    /// A schedule from `base` doubling up to `max`.
    pub const fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max }
    }

    /// Step `n` without jitter: `min(max, base * 2^n)`, saturating.
    pub fn step(&self, n: u32) -> Duration {
        self.base
            .saturating_mul(1u32.checked_shl(n).unwrap_or(u32::MAX))
            .min(self.max)
    }

    /// "Full jitter": uniform in `0 ..= step(n)`. Requests that failed
    /// together spread over the whole window.
    pub fn full_jitter(&self, n: u32, rng: &mut fastrand::Rng) -> Duration {
        let cap_us = u64::try_from(self.step(n).as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rng.u64(0..=cap_us))
    }

    /// `step(n)` plus up to half of it again: never sooner than the
    /// schedule (a segment or an ownership take waits at least that long),
    /// and several processes that failed together do not retry in step.
    pub fn at_least_step(&self, n: u32, rng: &mut fastrand::Rng) -> Duration {
        let step = self.step(n);
        let half_us = u64::try_from(step.as_micros() / 2).unwrap_or(u64::MAX);
        step.saturating_add(Duration::from_micros(rng.u64(0..=half_us)))
    }
}

/// Full-jitter exponential backoff before retry number `retry` (1-based).
pub fn backoff(policy: &RetryPolicy, rng: &mut fastrand::Rng, retry: u32) -> Duration {
    Backoff::new(policy.backoff_base, policy.backoff_max).full_jitter(retry.saturating_sub(1), rng)
}

/// An error the loop can judge and synthesise on timeout.
pub trait Retryable: Sized + Display {
    fn is_transient(&self) -> bool;
    fn timed_out(what: &str, after: Duration) -> Self;
}

impl Retryable for Error {
    fn is_transient(&self) -> bool {
        self.is_retryable()
    }
    fn timed_out(what: &str, after: Duration) -> Self {
        Error::RemoteRetryable(format!("{what} timed out after {after:?}"))
    }
}

/// Runs `op` until it succeeds, fails permanently, or `max_attempts` are
/// used. `op` gets the 1-based attempt number. Returns the last error.
pub async fn with_retries<T, E, F, Fut>(
    policy: &RetryPolicy,
    rng: &mut fastrand::Rng,
    what: &str,
    mut op: F,
) -> Result<T, E>
where
    E: Retryable,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    debug_assert!(policy.max_attempts >= 1);
    let max = policy.max_attempts.max(1);
    let mut attempt = 1u32;
    loop {
        let res = match tokio::time::timeout(policy.request_timeout, op(attempt)).await {
            Ok(r) => r,
            Err(_) => Err(E::timed_out(what, policy.request_timeout)),
        };
        match res {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && attempt < max => {
                let wait = backoff(policy, rng, attempt);
                let error = crate::error::scrub(&e.to_string());
                tracing::debug!(what, attempt, ?wait, %error, "retrying");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(e) => {
                if e.is_transient() {
                    let error = crate::error::scrub(&e.to_string());
                    tracing::warn!(what, attempts = attempt, %error, "giving up");
                }
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(4),
            request_timeout: Duration::from_millis(50),
        }
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let p = RetryPolicy {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            ..policy()
        };
        let mut rng = fastrand::Rng::with_seed(7);
        for retry in 1..100 {
            let cap = Duration::from_millis(100)
                .saturating_mul(1u32.checked_shl(retry - 1).unwrap_or(u32::MAX))
                .min(Duration::from_secs(5));
            for _ in 0..20 {
                assert!(backoff(&p, &mut rng, retry) <= cap);
            }
        }
        let samples: Vec<_> = (0..50).map(|_| backoff(&p, &mut rng, 30)).collect();
        assert!(samples.iter().any(|d| *d < Duration::from_millis(2500)));
        assert!(samples.iter().any(|d| *d > Duration::from_millis(2500)));
    }

    #[test]
    fn the_schedule_doubles_saturates_and_jitters_above_its_step() {
        let b = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        assert_eq!(b.step(0), Duration::from_millis(250));
        assert_eq!(b.step(3), Duration::from_secs(2));
        assert_eq!(b.step(7), Duration::from_secs(30));
        // Shifts past the width and huge bases saturate, never panic.
        assert_eq!(b.step(u32::MAX), Duration::from_secs(30));
        let huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.step(40), Duration::MAX);
        let mut rng = fastrand::Rng::with_seed(3);
        let _ = huge.at_least_step(40, &mut rng);
        let _ = huge.full_jitter(40, &mut rng);
        let waits: Vec<_> = (0..200).map(|_| b.at_least_step(2, &mut rng)).collect();
        assert!(waits.iter().all(|w| *w >= Duration::from_secs(1)));
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(1500)));
        assert!(waits.iter().any(|w| *w > Duration::from_millis(1250)));
        assert!(waits.iter().any(|w| *w < Duration::from_millis(1250)));
    }

    #[tokio::test]
    async fn retries_transient_then_succeeds() {
        let calls = AtomicU32::new(0);
        let mut rng = fastrand::Rng::with_seed(1);
        let r: Result<u32, Error> = with_retries(&policy(), &mut rng, "op", |n| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    Err(Error::RemoteRetryable("503".into()))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried_and_attempts_are_bounded() {
        let calls = AtomicU32::new(0);
        let mut rng = fastrand::Rng::with_seed(1);
        let r: Result<(), Error> = with_retries(&policy(), &mut rng, "op", |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Error::Fenced("epoch 3 > 2".into())) }
        })
        .await;
        assert!(matches!(r, Err(Error::Fenced(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        calls.store(0, Ordering::SeqCst);
        let r: Result<(), Error> = with_retries(&policy(), &mut rng, "op", |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Error::RemoteRetryable("503".into())) }
        })
        .await;
        assert!(matches!(r, Err(Error::RemoteRetryable(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn hung_attempt_times_out_and_is_retried() {
        let mut rng = fastrand::Rng::with_seed(1);
        let r: Result<u32, object_store::Error> =
            with_retries(&policy(), &mut rng, "PUT", |n| async move {
                if n == 1 {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                Ok(n)
            })
            .await;
        assert_eq!(r.unwrap(), 2);
    }
}
