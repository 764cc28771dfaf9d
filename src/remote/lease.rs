//! The ownership lease of a stream, and the clock it is measured with.
//!
//! A lease is a record inside the stream's manifest (see
//! [`crate::remote::manifest`]): owner id, the owner's epoch, and a
//! wall-clock expiry in milliseconds since the Unix epoch, moved on by
//! small renewal objects (`manifest::LeaseKeeper`) rather than by new
//! manifest versions. It decides only
//! *when another owner may take over*; safety (no stale writes) comes from
//! the epoch carried by every manifest write and the create-only version
//! objects, never from clocks. See `docs/format/remote-layout.md`, section
//! "Manifest, epochs and leases".
//!
//! Time is read through [`Clock`] so tests can model a paused owner (a GC
//! pause, a stopped VM) by moving a [`ManualClock`] instead of sleeping.
//! Its monotonic reading lets a would-be taker age a lease by what it
//! observed, so a writer's wall-clock jump cannot keep it out for long.

use std::fmt;
#[cfg(any(test, feature = "testing"))]
use std::sync::Arc;
#[cfg(any(test, feature = "testing"))]
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Shortest and longest accepted `lease_ttl_ms`.
pub const LEASE_TTL_MS_MIN: u64 = 100;
/// See [`LEASE_TTL_MS_MIN`].
pub const LEASE_TTL_MS_MAX: u64 = 86_400_000;

/// Longest owner id accepted.
pub const OWNER_ID_MAX: usize = 256;
/// Shortest lease TTL accepted (`lease_ttl_ms`, `owner take --ttl-ms`).
pub const LEASE_TTL_MIN: Duration = Duration::from_millis(LEASE_TTL_MS_MIN);
/// Longest lease TTL accepted. Also the most a lease can make others wait:
/// a lease that claims more remaining time than this (its writer's clock
/// was far ahead when it was written) is not live.
pub const LEASE_TTL_MAX: Duration = Duration::from_millis(LEASE_TTL_MS_MAX);

/// Time source: wall-clock milliseconds since the Unix epoch, and a
/// monotonic millisecond count (any origin) that no clock jump moves.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now_ms(&self) -> u64;
    /// Milliseconds since an arbitrary, fixed origin; never goes back and
    /// is not moved by wall-clock jumps. Only differences mean anything.
    fn mono_ms(&self) -> u64;
    /// Whether every instance reads the same monotonic clock (the system
    /// clock): then what one `ManifestStore` observed of a lease holds for
    /// the whole process, across reopens.
    fn process_wide(&self) -> bool {
        false
    }
}

/// The system clock.
#[derive(Copy, Clone, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        crate::segment::now_ms()
    }
    fn process_wide(&self) -> bool {
        true
    }
    fn mono_ms(&self) -> u64 {
        static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let origin = *ORIGIN.get_or_init(std::time::Instant::now);
        u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to (tests). Clones share the time.
/// [`advance`](Self::advance) moves both the wall clock and the monotonic
/// one (time passing); [`set`](Self::set) moves only the wall clock (a
/// jump, or a test that only cares about wall time).
#[derive(Clone, Debug, Default)]
#[cfg(any(test, feature = "testing"))]
pub struct ManualClock {
    wall: Arc<AtomicU64>,
    mono: Arc<AtomicU64>,
}

#[cfg(any(test, feature = "testing"))]
impl ManualClock {
    #[cfg(any(test, feature = "testing"))]
    pub fn new(start_ms: u64) -> ManualClock {
        ManualClock {
            wall: Arc::new(AtomicU64::new(start_ms)),
            mono: Arc::new(AtomicU64::new(0)),
        }
    }
    #[cfg(any(test, feature = "testing"))]
    pub fn set(&self, ms: u64) {
        self.wall.store(ms, Ordering::SeqCst);
    }
    #[cfg(any(test, feature = "testing"))]
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        for a in [&self.wall, &self.mono] {
            let _ = a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(ms))
            });
        }
    }
}

#[cfg(any(test, feature = "testing"))]
impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.wall.load(Ordering::SeqCst)
    }
    fn mono_ms(&self) -> u64 {
        self.mono.load(Ordering::SeqCst)
    }
}

/// Who may publish to a stream, and until when others must wait.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// The owner's id ([`validate_owner`]).
    pub owner: String,
    /// The epoch the owner took; always equal to the manifest's epoch.
    pub epoch: u64,
    /// When the owner took the stream (ms since the Unix epoch, its clock).
    pub acquired_ms: u64,
    /// Until when (exclusive) the lease is live, by the writer's clock.
    pub expires_ms: u64,
}

impl Lease {
    /// Live at `now_ms`: nobody else may take the stream. A lease whose
    /// expiry lies more than [`LEASE_TTL_MAX`] ahead of `now_ms` cannot have
    /// been written by a writer whose clock agreed with ours (no TTL is that
    /// long): it is not live, so a writer's clock jump cannot keep others out
    /// for longer than the longest TTL. Safety never rests on this: a taker
    /// moves the epoch, which fences the previous writer.
    pub fn is_live(&self, now_ms: u64) -> bool {
        let max_ms = u64::try_from(LEASE_TTL_MAX.as_millis()).unwrap_or(u64::MAX);
        now_ms < self.expires_ms && self.expires_ms - now_ms <= max_ms
    }
}

/// Checks an owner id: 1..=256 printable ASCII characters (no spaces, no
/// control characters), so it prints safely in errors and logs.
pub fn validate_owner(owner: &str) -> Result<()> {
    if owner.is_empty()
        || owner.len() > OWNER_ID_MAX
        || !owner.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Error::InvalidInput(format!(
            "owner id must be 1..={OWNER_ID_MAX} printable ASCII characters without spaces, \
             got {} bytes",
            owner.len()
        )));
    }
    Ok(())
}

/// `now + ttl` in ms; a TTL outside [`LEASE_TTL_MIN`]..=[`LEASE_TTL_MAX`]
/// (which also covers `owner take --ttl-ms`) or one that overflows is
/// refused.
pub fn expiry(now_ms: u64, ttl: Duration) -> Result<u64> {
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    if ttl < LEASE_TTL_MIN || ttl > LEASE_TTL_MAX {
        return Err(Error::InvalidInput(format!(
            "lease TTL {ttl_ms} ms is outside {}..={} ms",
            LEASE_TTL_MIN.as_millis(),
            LEASE_TTL_MAX.as_millis()
        )));
    }
    now_ms
        .checked_add(ttl_ms)
        .ok_or_else(|| Error::InvalidInput(format!("lease TTL {ttl:?} overflows the clock")))
}

/// The longest one manifest request can take with its retries:
/// `request_timeout x max_attempts` plus the largest backoffs between them.
pub fn worst_request_time(policy: &crate::retry::RetryPolicy) -> Duration {
    let attempts = policy.max_attempts.max(1);
    policy
        .request_timeout
        .saturating_mul(attempts)
        .saturating_add(policy.backoff_max.saturating_mul(attempts - 1))
}

/// Whether a lease of `ttl` can be renewed in time: a renewal (every
/// TTL / 3) that takes the worst request time must still land before the
/// lease expires. `Err` says what to change.
pub fn check_ttl(ttl: Duration, policy: &crate::retry::RetryPolicy) -> Result<()> {
    let worst = worst_request_time(policy);
    if ttl / 3 + worst >= ttl {
        return Err(Error::InvalidInput(format!(
            "lease TTL {} ms is too short for the request settings: one manifest request may \
             take up to {} ms (request_timeout x max_attempts plus backoff), so a renewal sent \
             at a third of the TTL can land after the lease expired and another owner may take \
             over; raise lease_ttl_ms above {} ms or lower request_timeout_ms / max_attempts",
            ttl.as_millis(),
            worst.as_millis(),
            (worst.as_millis() * 3).div_ceil(2)
        )));
    }
    Ok(())
}

/// The latest time an RFC 3339 stamp can say (the end of year 9999), in
/// ms since the Unix epoch: `humantime` panics past it.
pub const RFC3339_MS_MAX: u64 = 253_402_300_799_999;

/// A wall-clock time for messages: `1970-01-01T00:00:10Z (in 4.2s)`. A
/// time past [`RFC3339_MS_MAX`] (read from a store: untrusted) is shown as
/// its number.
pub fn describe_time(ms: u64, now_ms: u64) -> String {
    if ms > RFC3339_MS_MAX {
        return format!("{ms} ms since the epoch (past year 9999)");
    }
    let at = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    let stamp = humantime::format_rfc3339_millis(at);
    if ms >= now_ms {
        let left = Duration::from_millis(ms - now_ms);
        format!("{stamp} (in {})", humantime::format_duration(left))
    } else {
        let ago = Duration::from_millis(now_ms - ms);
        format!("{stamp} ({} ago)", humantime::format_duration(ago))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A time from a store past year 9999 is shown as a number, not a
    /// panic of the formatter (helper-79 F1).
    #[test]
    fn a_time_past_year_9999_is_described_not_panicked_on() {
        assert!(describe_time(u64::MAX, 5).contains("past year 9999"));
        assert!(describe_time(RFC3339_MS_MAX, 5).starts_with("9999-12-31T23:59:59"));
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(1_000);
        let c2 = c.clone();
        assert_eq!(c.now_ms(), 1_000);
        c.advance(Duration::from_secs(2));
        assert_eq!(c2.now_ms(), 3_000);
        c.set(u64::MAX - 1);
        c.advance(Duration::from_secs(1));
        assert_eq!(c.now_ms(), u64::MAX);
    }

    #[test]
    fn lease_liveness_is_exclusive_at_expiry() {
        let l = Lease {
            owner: "a".into(),
            epoch: 1,
            acquired_ms: 0,
            expires_ms: 10,
        };
        assert!(l.is_live(9));
        assert!(!l.is_live(10));
        // Written by a clock far ahead: not live, however long it claims.
        let max = u64::try_from(LEASE_TTL_MAX.as_millis()).unwrap();
        let jumped = Lease {
            expires_ms: 1_000 + max + 1,
            ..l.clone()
        };
        assert!(!jumped.is_live(1_000));
        assert!(jumped.is_live(2_000));
    }

    #[test]
    fn ttl_must_outlast_a_renewal_with_its_retries() {
        let policy = crate::retry::RetryPolicy {
            max_attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
        };
        assert_eq!(worst_request_time(&policy), Duration::from_secs(320));
        // The old defaults: TTL 30 s against 5 x 60 s requests.
        let e = check_ttl(Duration::from_secs(30), &policy).unwrap_err();
        assert!(e.to_string().contains("480000 ms"), "{e}");
        assert!(check_ttl(Duration::from_secs(481), &policy).is_ok());
        assert!(check_ttl(Duration::from_secs(480), &policy).is_err());
    }

    #[test]
    fn owner_ids_and_ttls_are_checked() {
        for bad in ["", "a b", "ä", "a\nb", &"x".repeat(OWNER_ID_MAX + 1)] {
            assert!(validate_owner(bad).is_err(), "{bad:?}");
        }
        assert!(validate_owner("host-1:pid=42").is_ok());
        assert!(expiry(5, Duration::ZERO).is_err());
        assert!(expiry(5, LEASE_TTL_MIN - Duration::from_millis(1)).is_err());
        assert!(expiry(5, LEASE_TTL_MAX + Duration::from_millis(1)).is_err());
        assert!(expiry(u64::MAX, LEASE_TTL_MIN).is_err());
        assert_eq!(expiry(5, Duration::from_millis(700)).unwrap(), 705);
        assert!(
            describe_time(10_000, 5_000).contains("in 5s"),
            "{}",
            describe_time(10_000, 5_000)
        );
    }
}
