//! The process's bound on segment uploads in flight, across every stream
//! (issue 16, item 1).
//!
//! Each stream's [`Scheduler`](super::Scheduler) runs at most its own
//! `max_uploads_in_flight` drives; a process with thousands of streams
//! would otherwise run thousands of uploads at once (and hold a connection
//! for each). Every drive first takes one of the process's
//! [`UPLOADS`] slots. While all are taken, drives wait in a queue ordered
//! by the oldest entry their segment holds (its `min_ts`), then by arrival:
//! a freed slot goes to the waiting segment with the oldest data, whatever
//! its stream, so the stream furthest behind catches up first.
//!
//! Bounded, so that no stream waits for ever behind older data: a
//! segment's data counts as at most [`AGEING`] older than the moment it
//! started waiting (a backlog of days, or entries stamped 0 by a producer,
//! rank as one that waited `AGEING` longer, then by arrival), and no newer
//! than that moment (stamps in the future). A drive that failed and waits
//! again ranks by the moment it came back, with no credit for its data's
//! age: a store that keeps failing does not put its streams ahead of every
//! other at each retry.
//!
//! A drive cancelled while it waits (a drain's deadline, a shutdown) leaves
//! the queue; one cancelled just as a slot was handed to it gives the slot
//! back, so no slot is lost to cancellation.
//!
//! What sharing costs: a drive holds its slot through every step of its
//! segment (upload, verification, commit, release), each bounded by the
//! store's request timeout and retries. A store that answers slowly, or not
//! at all, can hold every slot, and streams on other stores in the same
//! process then wait for it; raise the bound
//! ([`set_max_uploads_in_flight_per_process`]) for a process that mixes
//! stores.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::oneshot;

/// Slots per process unless [`set_max_uploads_in_flight_per_process`]
/// says otherwise: above any one stream's default (4), so a process with a
/// few streams is not slowed, and a bound on what thousands of streams
/// start at once.
pub const DEFAULT_PROCESS_UPLOADS: usize = 64;

/// Largest accepted process bound.
pub const MAX_PROCESS_UPLOADS: usize = 4096;

/// How much older than its wait a segment's data may count (see the
/// module docs).
pub const AGEING: std::time::Duration = std::time::Duration::from_secs(30);

/// The process's upload slots.
pub static UPLOADS: UploadSlots = UploadSlots::new(DEFAULT_PROCESS_UPLOADS);

/// Sets how many segment uploads (drives) may run at once in this
/// process, over every stream; 1 to 4,096. Takes effect
/// at once: raising it hands slots to waiting drives; lowering it lets the
/// drives in flight finish and starts no more until fewer are running.
/// Returns the previous bound.
pub fn set_max_uploads_in_flight_per_process(n: usize) -> crate::Result<usize> {
    if !(1..=MAX_PROCESS_UPLOADS).contains(&n) {
        return Err(crate::Error::InvalidInput(format!(
            "process upload bound {n}: must be 1 to {MAX_PROCESS_UPLOADS}"
        )));
    }
    Ok(UPLOADS.set_limit(n))
}

/// The process's upload slots now: the bound, how many are held and how
/// many drives wait for one.
pub fn upload_slot_counts() -> SlotCounts {
    UPLOADS.counts()
}

/// A count of the process's upload slots at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCounts {
    /// The bound.
    pub limit: usize,
    /// Slots held by drives now.
    pub taken: usize,
    /// Drives waiting for one.
    pub waiting: usize,
    /// The most slots held at once since the process started.
    pub most_taken: usize,
    /// The most drives waiting at once since the process started.
    pub most_waiting: usize,
}

/// Process-wide upload slots: a bound, and a queue of waiting drives by
/// the age of their oldest entry.
pub struct UploadSlots {
    state: Mutex<State>,
}

struct State {
    limit: usize,
    taken: usize,
    most_taken: usize,
    most_waiting: usize,
    seq: u64,
    /// By rank (ms), then arrival; a waiter that gives up removes itself.
    waiting: BTreeMap<(u64, u64), oneshot::Sender<()>>,
}

/// What a waiting drive ranks by: when it started waiting (`now_ms`), less
/// its data's age up to [`AGEING`], none for a `retry`.
fn rank(min_ts: u64, now_ms: u64, retry: bool) -> u64 {
    if retry {
        return now_ms;
    }
    let ageing = AGEING.as_millis() as u64;
    min_ts.clamp(now_ms.saturating_sub(ageing), now_ms)
}

/// A held slot; dropping it frees the slot for the next waiter.
pub struct Slot<'a> {
    slots: &'a UploadSlots,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.slots.release();
    }
}

/// A drive waiting for a slot. Dropped before it took one: leaves the
/// queue, or gives back the slot handed to it.
struct Waiting<'a> {
    slots: &'a UploadSlots,
    key: (u64, u64),
    rx: oneshot::Receiver<()>,
    granted: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        // Still queued: nothing was handed to it (hand-offs are sent under
        // the same lock, after removing the entry).
        if lock(&self.slots.state).waiting.remove(&self.key).is_some() {
            return;
        }
        // Taken off the queue: the slot was sent, or is being. No hand-off
        // can land after `close`; one that landed before is ours to return.
        self.rx.close();
        if self.rx.try_recv().is_ok() {
            self.slots.release();
        }
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // Every change below completes under the lock; a panic elsewhere
    // leaves nothing half done.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl UploadSlots {
    pub const fn new(limit: usize) -> UploadSlots {
        UploadSlots {
            state: Mutex::new(State {
                limit,
                taken: 0,
                most_taken: 0,
                most_waiting: 0,
                seq: 0,
                waiting: BTreeMap::new(),
            }),
        }
    }

    /// Takes a slot for a segment whose oldest entry is `min_ts` (a
    /// `retry`: its drive failed before), waiting while all are taken, in
    /// the order of the module docs. `now_ms`: the wall clock.
    pub async fn acquire(&self, min_ts: u64, retry: bool, now_ms: u64) -> Slot<'_> {
        let (key, rx) = {
            let mut s = lock(&self.state);
            if s.taken < s.limit && s.waiting.is_empty() {
                s.taken += 1;
                s.most_taken = s.most_taken.max(s.taken);
                return Slot { slots: self };
            }
            let (tx, rx) = oneshot::channel();
            s.seq += 1;
            let key = (rank(min_ts, now_ms, retry), s.seq);
            s.waiting.insert(key, tx);
            s.most_waiting = s.most_waiting.max(s.waiting.len());
            (key, rx)
        };
        let mut w = Waiting {
            slots: self,
            key,
            rx,
            granted: false,
        };
        // The sender is only dropped after a send (a hand-off) or with
        // `self`, which outlives this borrow: an error cannot happen, and
        // would only mean "go ahead" anyway.
        let _ = (&mut w.rx).await;
        w.granted = true;
        Slot { slots: self }
    }

    /// Frees one slot: handed to the waiter with the oldest data that is
    /// still waiting, else counted free.
    fn release(&self) {
        let mut s = lock(&self.state);
        if s.taken <= s.limit {
            while let Some((_, tx)) = s.waiting.pop_first() {
                if tx.send(()).is_ok() {
                    return;
                }
            }
        }
        s.taken = s.taken.saturating_sub(1);
    }

    /// Sets the bound; returns the previous one. Waiters get the slots a
    /// higher bound frees.
    fn set_limit(&self, n: usize) -> usize {
        let mut s = lock(&self.state);
        let old = std::mem::replace(&mut s.limit, n);
        while s.taken < s.limit {
            let Some((_, tx)) = s.waiting.pop_first() else {
                break;
            };
            if tx.send(()).is_ok() {
                s.taken += 1;
                s.most_taken = s.most_taken.max(s.taken);
            }
        }
        old
    }

    /// The counts now.
    pub fn counts(&self) -> SlotCounts {
        let s = lock(&self.state);
        SlotCounts {
            limit: s.limit,
            taken: s.taken,
            waiting: s.waiting.len(),
            most_taken: s.most_taken,
            most_waiting: s.most_waiting,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    const NOW: u64 = 1_700_000_000_000;

    fn leaked(limit: usize) -> &'static UploadSlots {
        Box::leak(Box::new(UploadSlots::new(limit)))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_more_than_the_bound_at_once() {
        let slots = leaked(3);
        let now = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..40u64 {
            let (now, most) = (now.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                let _s = slots.acquire(i % 7, false, 10).await;
                let n = now.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                most.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 3);
        let c = slots.counts();
        assert_eq!((c.taken, c.waiting, c.most_taken), (0, 0, 3));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_freed_slot_goes_to_the_oldest_data_waiting() {
        let slots = leaked(1);
        let held = slots.acquire(0, false, NOW).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for ts in [NOW - 30, NOW - 100, NOW - 50, NOW - 100] {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let _s = slots.acquire(ts, false, NOW).await;
                order.lock().unwrap().push(ts);
            }));
            // Each registers before the next (arrival breaks the tie).
            tokio::task::yield_now().await;
        }
        assert_eq!(slots.counts().waiting, 4);
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            vec![NOW - 100, NOW - 100, NOW - 50, NOW - 30]
        );
        assert_eq!(slots.counts().taken, 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_cancelled_waiter_loses_no_slot() {
        let slots = leaked(1);
        // Cancelled while waiting.
        let held = slots.acquire(0, false, NOW).await;
        let t = tokio::spawn(async move {
            let _s = slots.acquire(5, false, NOW).await;
        });
        tokio::task::yield_now().await;
        assert_eq!(slots.counts().waiting, 1);
        t.abort();
        let _ = t.await;
        drop(held);
        assert_eq!(slots.counts().taken, 0, "the slot went to a cancelled waiter");
        // Cancelled just after the slot was handed to it, before it ran.
        let held = slots.acquire(0, false, NOW).await;
        let mut fut = Box::pin(slots.acquire(5, false, NOW));
        assert!(futures::poll!(&mut fut).is_pending());
        drop(held); // hands the slot to `fut`
        assert_eq!(slots.counts().taken, 1);
        drop(fut);
        assert_eq!(slots.counts().taken, 0, "a handed-off slot was lost");
        let _again = slots.acquire(1, false, NOW).await;
        assert_eq!(slots.counts().taken, 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn raising_the_bound_lets_waiters_in_and_lowering_lets_drives_finish() {
        let slots = leaked(1);
        let a = slots.acquire(0, false, NOW).await;
        let mut b = Box::pin(slots.acquire(1, false, NOW));
        let mut c = Box::pin(slots.acquire(2, false, NOW));
        assert!(futures::poll!(&mut b).is_pending());
        assert!(futures::poll!(&mut c).is_pending());
        assert_eq!(slots.set_limit(3), 1);
        let b = b.await;
        let c = c.await;
        assert_eq!(slots.counts().taken, 3);
        slots.set_limit(1);
        drop(b);
        drop(c);
        // Two over the new bound were running: none handed on.
        assert_eq!(slots.counts().taken, 1);
        let mut d = Box::pin(slots.acquire(3, false, NOW));
        assert!(futures::poll!(&mut d).is_pending());
        drop(a);
        let _d = d.await;
        assert_eq!(slots.counts().taken, 1);
    }

    /// A segment's data counts as at most `AGEING` older than its wait; a
    /// retry counts none of it; stamps in the future count as now.
    #[test]
    fn rank_bounds_what_data_age_buys() {
        let a = AGEING.as_millis() as u64;
        assert_eq!(rank(NOW - 1_000, NOW, false), NOW - 1_000);
        assert_eq!(rank(0, NOW, false), NOW - a);
        assert_eq!(rank(NOW + 5_000, NOW, false), NOW);
        assert_eq!(rank(0, NOW, true), NOW);
    }

    /// A drive that has waited since before a backlog's drives arrived is
    /// not passed by them for ever: one that came more than `AGEING` later
    /// goes after it, whatever its data's age.
    #[tokio::test(flavor = "current_thread")]
    async fn old_data_arriving_later_does_not_starve_a_waiting_drive() {
        let slots = leaked(1);
        let held = slots.acquire(0, false, NOW).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // (name, its data's oldest entry, when it starts waiting)
        let a = AGEING.as_millis() as u64;
        for (name, min_ts, at) in [
            ("fresh", NOW, NOW),
            ("backlog-later", 0, NOW + a + 1_000),
            ("backlog-soon", 0, NOW + a / 2),
        ] {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let _s = slots.acquire(min_ts, false, at).await;
                order.lock().unwrap().push(name);
            }));
            tokio::task::yield_now().await;
        }
        let retry = {
            let order = order.clone();
            tokio::spawn(async move {
                let _s = slots.acquire(0, true, NOW + 1).await;
                order.lock().unwrap().push("retry");
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(slots.counts().waiting, 4);
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        retry.await.unwrap();
        assert_eq!(
            *order.lock().unwrap(),
            vec!["backlog-soon", "fresh", "retry", "backlog-later"]
        );
        assert_eq!(slots.counts().most_waiting, 4);
    }

    #[test]
    fn the_bound_is_checked() {
        assert!(set_max_uploads_in_flight_per_process(0).is_err());
        assert!(set_max_uploads_in_flight_per_process(MAX_PROCESS_UPLOADS + 1).is_err());
    }
}
