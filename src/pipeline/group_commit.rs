//! Group commit behind an async lock: callers queue their entry, and
//! whoever gets the lock commits everything queued by then in one call,
//! then answers each caller. Used for manifest commits, where one version
//! (one encode of the head, one create-only PUT, one trim) then carries
//! every segment whose drive reached `Verified` meanwhile, instead of one
//! version per segment.
//!
//! A batch that fails on one entry's account (a conflict on its id, an
//! invalid entry) is retried one entry at a time under the same lock, so
//! each caller gets the error that is its own: a conflict on one segment id
//! must not read as a conflict on the others, which would reseal them. An
//! error of the store or the owner (retryable, fenced, ...) goes to every
//! entry of the batch at once.

use std::sync::Mutex;

use tokio::sync::oneshot;
use tokio::sync::oneshot::error::TryRecvError;

use crate::error::{Error, Result};

type Waiter<E> = (E, oneshot::Sender<Result<()>>);

/// Commits a batch of entries with the value behind the lock. Must be
/// idempotent per entry: a batch that fails is tried again entry by entry.
pub trait Committer<G, E> {
    fn commit<'a>(
        &'a self,
        guarded: &'a mut G,
        batch: &'a [E],
    ) -> impl Future<Output = Result<()>> + Send + 'a;
}

/// The queue of entries waiting for the lock.
pub struct GroupCommit<E> {
    queue: Mutex<Vec<Waiter<E>>>,
}

impl<E> Default for GroupCommit<E> {
    fn default() -> Self {
        GroupCommit {
            queue: Mutex::new(Vec::new()),
        }
    }
}

impl<E: Clone> GroupCommit<E> {
    /// Commits `entry` through `c`, possibly in one batch with other
    /// callers' entries. Returns this entry's outcome.
    pub async fn commit<G>(
        &self,
        lock: &tokio::sync::Mutex<G>,
        entry: E,
        c: &impl Committer<G, E>,
    ) -> Result<()> {
        let (tx, mut rx) = oneshot::channel();
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((entry, tx));
        let mut guard = lock.lock().await;
        match rx.try_recv() {
            // An earlier holder of the lock committed it with its batch.
            Ok(answer) => return answer,
            // That holder was cancelled with the entry taken: nothing is
            // known of it; the caller retries (commits are idempotent).
            Err(TryRecvError::Closed) => {
                return Err(Error::RemoteRetryable(
                    "the commit carrying this entry was interrupted".into(),
                ));
            }
            Err(TryRecvError::Empty) => {}
        }
        // Ours is still queued: every holder answers all it takes before it
        // lets go of the lock. Entries whose caller is gone (cancelled while
        // waiting) are dropped: nobody waits for them, and a later drive of
        // the same segment queues its own.
        let mut batch = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()));
        batch.retain(|(_, tx)| !tx.is_closed());
        let together = match batch.len() {
            0 | 1 => None,
            _ => {
                let entries: Vec<E> = batch.iter().map(|(e, _)| e.clone()).collect();
                Some(c.commit(&mut guard, &entries).await)
            }
        };
        match together {
            Some(Ok(())) => {
                for (_, tx) in batch {
                    let _ = tx.send(Ok(()));
                }
            }
            // An error of the store or of the owner, not of one entry: every
            // entry gets it (retrying each would only repeat it, holding the
            // lock all the while).
            Some(Err(e)) if same_for_all(&e).is_some() => {
                for (_, tx) in batch {
                    let _ = tx.send(Err(same_for_all(&e).unwrap_or(Error::ShutDown)));
                }
            }
            // One entry's error (a conflict on its id, a bad entry), or a
            // batch of one: each entry on its own, each with its own answer.
            _ => {
                for (e, tx) in batch {
                    let answer = c.commit(&mut guard, std::slice::from_ref(&e)).await;
                    let _ = tx.send(answer);
                }
            }
        }
        drop(guard);
        rx.await.unwrap_or_else(|_| {
            Err(Error::RemoteRetryable(
                "the commit carrying this entry was interrupted".into(),
            ))
        })
    }
}

/// A copy of `e` when it says nothing about any one entry (the store, the
/// owner, the process), else `None`: such errors are retried entry by entry.
fn same_for_all(e: &Error) -> Option<Error> {
    Some(match e {
        Error::RemoteRetryable(s) => Error::RemoteRetryable(s.clone()),
        Error::Remote(s) => Error::Remote(s.clone()),
        Error::Fenced(s) => Error::Fenced(s.clone()),
        Error::Claimed(s) => Error::Claimed(s.clone()),
        Error::Deadline(s) => Error::Deadline(s.clone()),
        Error::Poisoned(s) => Error::Poisoned(s.clone()),
        Error::Internal(s) => Error::Internal(s.clone()),
        Error::ShutDown => Error::ShutDown,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;

    /// The store: the batches committed, in order.
    type Log = tokio::sync::Mutex<Vec<Vec<u32>>>;

    /// Commits after `ms` unless the batch holds `bad` (a conflict) or
    /// `down` is set (the store fails every call); hangs on `hang`.
    #[derive(Default)]
    struct Slow {
        ms: u64,
        bad: Option<u32>,
        hang: Option<u32>,
        down: bool,
        calls: Arc<AtomicU32>,
    }

    impl Committer<Vec<Vec<u32>>, u32> for Slow {
        async fn commit(&self, log: &mut Vec<Vec<u32>>, batch: &[u32]) -> Result<()> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(self.ms)).await;
            if self.hang.is_some_and(|h| batch.contains(&h)) {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            if self.down {
                return Err(Error::RemoteRetryable("store down".into()));
            }
            if let Some(bad) = self.bad.filter(|b| batch.contains(b)) {
                return Err(Error::RemoteConflict(format!("{bad} is taken")));
            }
            log.push(batch.to_vec());
            Ok(())
        }
    }

    fn spawn(
        gc: &Arc<GroupCommit<u32>>,
        log: &Arc<Log>,
        entry: u32,
        delay_ms: u64,
        c: Slow,
    ) -> tokio::task::JoinHandle<Result<()>> {
        let (gc, log) = (gc.clone(), log.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            gc.commit(&log, entry, &c).await
        })
    }

    // The clock is paused (and advanced only when every task waits), so
    // the interleavings below are the same on a loaded machine.

    #[tokio::test(start_paused = true)]
    async fn queued_entries_commit_together_and_an_error_stays_with_its_entry() {
        let gc = Arc::new(GroupCommit::<u32>::default());
        let log = Arc::new(Log::default());
        // Staggered, so later ones queue behind a commit in progress.
        let tasks: Vec<_> = (0..20u32)
            .map(|i| {
                let c = Slow {
                    ms: 20,
                    bad: Some(7),
                    ..Slow::default()
                };
                (i, spawn(&gc, &log, i, u64::from(i) * 3, c))
            })
            .collect();
        for (i, t) in tasks {
            let r = t.await.unwrap();
            match i {
                7 => assert!(matches!(r, Err(Error::RemoteConflict(ref w)) if w.contains('7'))),
                _ => assert!(r.is_ok(), "{i}: {r:?}"),
            }
        }
        let log = log.lock().await;
        let mut all: Vec<u32> = log.iter().flatten().copied().collect();
        all.sort_unstable();
        let expected: Vec<u32> = (0..20).filter(|i| *i != 7).collect();
        assert_eq!(all, expected, "each committed exactly once: {log:?}");
        assert!(log.iter().any(|b| b.len() > 1), "nothing batched: {log:?}");
        assert!(log.len() < 19, "one commit per entry: {log:?}");
    }

    /// A store error reaches every entry of the batch from one call: no
    /// per-entry retries while the lock is held.
    #[tokio::test(start_paused = true)]
    async fn a_store_error_goes_to_the_whole_batch_at_once() {
        let gc = Arc::new(GroupCommit::<u32>::default());
        let log = Arc::new(Log::default());
        let calls = Arc::new(AtomicU32::new(0));
        let slow = |down| Slow {
            ms: 100,
            down,
            calls: calls.clone(),
            ..Slow::default()
        };
        // 0 holds the lock; 1..=4 queue; 1 commits [1, 2, 3, 4] once.
        let first = spawn(&gc, &log, 0, 0, slow(false));
        let rest: Vec<_> = (1..=4)
            .map(|i| spawn(&gc, &log, i, 10, slow(true)))
            .collect();
        assert!(first.await.unwrap().is_ok());
        for t in rest {
            let r = t.await.unwrap();
            assert!(matches!(r, Err(Error::RemoteRetryable(_))), "{r:?}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// A holder cancelled mid-commit: the entries it took from others get
    /// a retryable error (nothing hangs, nothing reads as done).
    #[tokio::test(start_paused = true)]
    async fn a_cancelled_holder_leaves_its_batch_a_retryable_error() {
        let gc = Arc::new(GroupCommit::<u32>::default());
        let log = Arc::new(Log::default());
        let slow = |hang| Slow {
            ms: 200,
            hang,
            ..Slow::default()
        };
        // 0 holds the lock for 200 ms; 1 and 2 queue meanwhile. 1 gets the
        // lock next, takes [1, 2] and hangs in its commit; it is cancelled.
        let first = spawn(&gc, &log, 0, 0, slow(None));
        let holder = spawn(&gc, &log, 1, 50, slow(Some(1)));
        let waiter = spawn(&gc, &log, 2, 100, slow(None));
        assert!(first.await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_millis(100)).await;
        holder.abort();
        let r = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter hangs")
            .unwrap();
        assert!(matches!(r, Err(Error::RemoteRetryable(_))), "{r:?}");
        assert_eq!(*log.lock().await, vec![vec![0]]);
    }

    /// A caller cancelled while it waits for the lock: its entry is not
    /// carried into the next batch (nobody waits for it).
    #[tokio::test(start_paused = true)]
    async fn a_caller_cancelled_while_waiting_leaves_nothing_behind() {
        let gc = Arc::new(GroupCommit::<u32>::default());
        let log = Arc::new(Log::default());
        let slow = || Slow {
            ms: 200,
            ..Slow::default()
        };
        let first = spawn(&gc, &log, 0, 0, slow());
        let next = spawn(&gc, &log, 1, 50, slow());
        let gone = spawn(&gc, &log, 3, 100, slow());
        tokio::time::sleep(Duration::from_millis(150)).await;
        gone.abort();
        assert!(first.await.unwrap().is_ok());
        assert!(next.await.unwrap().is_ok());
        assert_eq!(*log.lock().await, vec![vec![0], vec![1]]);
    }
}
