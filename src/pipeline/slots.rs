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

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;

use tokio::sync::oneshot;

/// Slots per process unless [`set_max_uploads_in_flight_per_process`]
/// says otherwise: above any one stream's default (4), so a process with a
/// few streams is not slowed, and a bound on what thousands of streams
/// start at once.
pub const DEFAULT_PROCESS_UPLOADS: usize = 64;

/// Largest accepted process bound.
pub const MAX_PROCESS_UPLOADS: usize = 4096;

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
    seq: u64,
    waiting: BinaryHeap<Reverse<Waiter>>,
}

struct Waiter {
    min_ts: u64,
    seq: u64,
    tx: oneshot::Sender<()>,
}

impl PartialEq for Waiter {
    fn eq(&self, o: &Self) -> bool {
        (self.min_ts, self.seq) == (o.min_ts, o.seq)
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Waiter {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.min_ts, self.seq).cmp(&(o.min_ts, o.seq))
    }
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

/// A drive waiting for a slot. Dropped before it took the slot handed to
/// it: gives that slot back.
struct Waiting<'a> {
    slots: &'a UploadSlots,
    rx: oneshot::Receiver<()>,
    granted: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        // No hand-off can land after this; one that landed before is ours.
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
                seq: 0,
                waiting: BinaryHeap::new(),
            }),
        }
    }

    /// Takes a slot for a segment whose oldest entry is `min_ts`, waiting
    /// (in `min_ts` order) while all are taken.
    pub async fn acquire(&self, min_ts: u64) -> Slot<'_> {
        let rx = {
            let mut s = lock(&self.state);
            if s.taken < s.limit && s.waiting.is_empty() {
                s.taken += 1;
                s.most_taken = s.most_taken.max(s.taken);
                return Slot { slots: self };
            }
            let (tx, rx) = oneshot::channel();
            s.seq += 1;
            let seq = s.seq;
            s.waiting.push(Reverse(Waiter { min_ts, seq, tx }));
            rx
        };
        let mut w = Waiting {
            slots: self,
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
            while let Some(Reverse(w)) = s.waiting.pop() {
                if w.tx.send(()).is_ok() {
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
            let Some(Reverse(w)) = s.waiting.pop() else {
                break;
            };
            if w.tx.send(()).is_ok() {
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
            waiting: s.waiting.iter().filter(|w| !w.0.tx.is_closed()).count(),
            most_taken: s.most_taken,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

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
                let _s = slots.acquire(i % 7).await;
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
        let held = slots.acquire(0).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for ts in [30u64, 10, 20, 10] {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let _s = slots.acquire(ts).await;
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
        assert_eq!(*order.lock().unwrap(), vec![10, 10, 20, 30]);
        assert_eq!(slots.counts().taken, 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_cancelled_waiter_loses_no_slot() {
        let slots = leaked(1);
        // Cancelled while waiting.
        let held = slots.acquire(0).await;
        let t = tokio::spawn(async move {
            let _s = slots.acquire(5).await;
        });
        tokio::task::yield_now().await;
        assert_eq!(slots.counts().waiting, 1);
        t.abort();
        let _ = t.await;
        drop(held);
        assert_eq!(slots.counts().taken, 0, "the slot went to a cancelled waiter");
        // Cancelled just after the slot was handed to it, before it ran.
        let held = slots.acquire(0).await;
        let mut fut = Box::pin(slots.acquire(5));
        assert!(futures::poll!(&mut fut).is_pending());
        drop(held); // hands the slot to `fut`
        assert_eq!(slots.counts().taken, 1);
        drop(fut);
        assert_eq!(slots.counts().taken, 0, "a handed-off slot was lost");
        let _again = slots.acquire(1).await;
        assert_eq!(slots.counts().taken, 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn raising_the_bound_lets_waiters_in_and_lowering_lets_drives_finish() {
        let slots = leaked(1);
        let a = slots.acquire(0).await;
        let mut b = Box::pin(slots.acquire(1));
        let mut c = Box::pin(slots.acquire(2));
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
        let mut d = Box::pin(slots.acquire(3));
        assert!(futures::poll!(&mut d).is_pending());
        drop(a);
        let _d = d.await;
        assert_eq!(slots.counts().taken, 1);
    }

    #[test]
    fn the_bound_is_checked() {
        assert!(set_max_uploads_in_flight_per_process(0).is_err());
        assert!(set_max_uploads_in_flight_per_process(MAX_PROCESS_UPLOADS + 1).is_err());
    }
}
