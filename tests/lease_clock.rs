//! Issue 11, lease timing: a TTL outside the accepted bounds is refused
//! where a lease is taken (which is what `owner take --ttl-ms` calls), and a
//! writer whose wall clock jumped far ahead cannot keep another owner out
//! for longer than the longest TTL.

use std::sync::Arc;
use std::time::Duration;

use tierindex::Error;
use tierindex::remote::lease::{LEASE_TTL_MAX, LEASE_TTL_MIN, ManualClock};
use tierindex::remote::manifest::{ManifestOptions, ManifestStore};
use tierindex::remote::probe::probe;
use tierindex::testing::FaultyStore;

const T0: u64 = 1_700_000_000_000;

async fn store_with(remote: &tierindex::remote::RemoteStore, clock: &ManualClock) -> ManifestStore {
    let caps = probe(remote).await.unwrap();
    ManifestStore::with_capabilities(
        remote,
        "orders",
        ManifestOptions::default(),
        &caps,
        Arc::new(clock.clone()),
    )
    .unwrap()
}

#[tokio::test]
async fn ttls_outside_the_bounds_are_refused() {
    let f = FaultyStore::memory(3);
    let remote = f.remote("tier");
    let ms = store_with(&remote, &ManualClock::new(T0)).await;
    for ttl in [
        Duration::ZERO,
        LEASE_TTL_MIN - Duration::from_millis(1),
        LEASE_TTL_MAX + Duration::from_millis(1),
    ] {
        let r = ms.take_ownership("a", ttl).await;
        assert!(matches!(r, Err(Error::InvalidInput(_))), "{ttl:?}: {r:?}");
    }
    assert!(ms.load().await.unwrap().is_none(), "nothing was published");
    ms.take_ownership("a", LEASE_TTL_MIN).await.unwrap();
}

#[tokio::test]
async fn a_lease_from_a_clock_far_ahead_does_not_keep_others_out() {
    let f = FaultyStore::memory(4);
    let remote = f.remote("tier");
    // A's clock jumped a year ahead; B's is right.
    let clock_a = ManualClock::new(T0 + 365 * 86_400_000);
    let clock_b = ManualClock::new(T0);
    let ms_a = store_with(&remote, &clock_a).await;
    let ms_b = store_with(&remote, &clock_b).await;
    let mut a = ms_a
        .take_ownership("a", Duration::from_secs(30))
        .await
        .unwrap();
    a.renew(Duration::from_secs(30)).await.unwrap();
    // Before: B waited a year. Now the lease claims more than the longest
    // TTL ahead of B's clock, so it is not live; B takes over and A is
    // fenced at its next write.
    let mut b = ms_b
        .take_ownership("b", Duration::from_secs(30))
        .await
        .unwrap();
    b.renew(Duration::from_secs(30)).await.unwrap();
    assert!(matches!(
        a.renew(Duration::from_secs(30)).await,
        Err(Error::Fenced(_))
    ));

    // A clock only slightly ahead (within the longest TTL) is still
    // honoured: C, with B's clock, must wait for B's lease.
    let clock_c = ManualClock::new(T0 + 1_000);
    let ms_c = store_with(&remote, &clock_c).await;
    assert!(matches!(
        ms_c.take_ownership("c", Duration::from_secs(30)).await,
        Err(Error::Claimed(_))
    ));
}

/// A lease from a clock an hour ahead keeps another owner out for the hour
/// (within the longest TTL, so it is live); the refusal says the holder's
/// clock runs ahead and how to free the stream if that broker is down
/// (helper-61: it named neither).
/// The refusal B gets while A (clock `a`) holds the stream, B's clock `b`.
async fn refusal(seed: u64, a: &ManualClock, b: &ManualClock) -> String {
    let f = FaultyStore::memory(seed);
    let remote = f.remote("tier");
    let ms_a = store_with(&remote, a).await;
    let ms_b = store_with(&remote, b).await;
    let _a = ms_a
        .take_ownership("a", Duration::from_secs(30))
        .await
        .unwrap();
    match ms_b.take_ownership("b", Duration::from_secs(30)).await {
        Err(Error::Claimed(m)) => m,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_refusal_by_a_lease_from_a_clock_ahead_says_so() {
    let right = ManualClock::new(T0);
    let msg = refusal(5, &ManualClock::new(T0 + 3_600_000), &right).await;
    assert!(msg.contains("clock runs ahead"), "{msg}");
    assert!(
        msg.contains("owner release --owner-id 'a' --fence-live"),
        "{msg}"
    );
    // A lease of a clock that agrees says nothing of clocks.
    let msg = refusal(6, &right, &right).await;
    assert!(!msg.contains("clock"), "{msg}");
}
