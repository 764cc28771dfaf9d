//! Process-wide worker threads for each stream's serial background work
//! (issue 16, item 1).
//!
//! Every writer used to own a sealer thread and every journal a committer
//! thread, so a process with 1,000 streams ran 2,000 threads. Now a
//! stream's work is a [`Lane`]: a queue whose jobs run in order, never two
//! at once, on one of a few threads shared by every lane of its [`Pool`]
//! (one pool for sealing, one for journal commits). A lane that has work is
//! queued on its pool once; a thread takes it, runs one turn (one job, or
//! with `batch` everything queued, as a group commit), and puts it back at
//! the end of the pool's queue if more is waiting, so a busy stream cannot
//! starve the others.
//!
//! A lane keeps the state its jobs need (its handler) until it is closed
//! and its queue is empty; then the handler is dropped (on a pool thread,
//! with whatever it held: a data directory's lock, a journal) and the lane
//! is finished: [`Lane::join`] returns. A handler that panics finishes its
//! lane at once (queued jobs are dropped, the handler too) and `join`
//! reports it, as a thread's join did.
//!
//! The pools' threads are background work, scheduled as such
//! ([`schedule_as_background`]: `SCHED_BATCH`, their nice value kept): when an
//! append wakes one (a seal, a spare to prepare, a stretch to populate), it
//! runs on a free core or at the next scheduling point, and does not take
//! the appending thread's core from it on the spot.
//!
//! What sharing costs: a disk that hangs a job holds one of the pool's
//! threads, and the other lanes share the rest; with every thread held,
//! every stream's seals (or commits) wait, where before only the streams
//! on that disk did.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::error::{Error, Result};

/// Every writer's seals, spare preparations and retirements (a seal is
/// mostly fsync and checksum: more threads than cores let one stream's
/// fsync overlap another's checksum).
pub(crate) static SEALERS: Pool = Pool::new("sealer", 4);

/// Every journal's group commits (an fsync each: threads wait on the disk,
/// not the CPU).
pub(crate) static JOURNALS: Pool = Pool::new("journal", 8);

/// A set of threads that run lanes' turns. Threads start as work needs
/// them, up to `max`, and stay for the life of the process.
pub(crate) struct Pool {
    name: &'static str,
    max: usize,
    state: Mutex<PoolState>,
    ready: Condvar,
}

#[derive(Default)]
struct PoolState {
    queue: VecDeque<Arc<dyn Turn>>,
    threads: usize,
    idle: usize,
}

/// One lane, as its pool sees it.
trait Turn: Send + Sync {
    /// Run one turn; `true`: more is waiting, queue the lane again.
    fn run_turn(&self) -> bool;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here leaves state half changed across a panic (handlers run
    // outside these locks), so a poisoned lock is still sound to use.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    pub(crate) const fn new(name: &'static str, max: usize) -> Pool {
        Pool {
            name,
            max,
            state: Mutex::new(PoolState {
                queue: VecDeque::new(),
                threads: 0,
                idle: 0,
            }),
            ready: Condvar::new(),
        }
    }

    /// Make sure at least one thread runs, so that a lane created now is
    /// served; the error (no thread could be started) is the caller's.
    fn ensure_one(&'static self) -> Result<()> {
        let mut s = lock(&self.state);
        if s.threads == 0 {
            self.spawn(&mut s)?;
        }
        Ok(())
    }

    fn spawn(&'static self, s: &mut PoolState) -> Result<()> {
        std::thread::Builder::new()
            .name(format!("tierindex-{}", self.name))
            .spawn(move || self.work())
            .map_err(|e| Error::io(self.name, "spawn a worker thread", e))?;
        s.threads += 1;
        Ok(())
    }

    fn schedule(&'static self, lane: Arc<dyn Turn>) {
        let mut s = lock(&self.state);
        s.queue.push_back(lane);
        // More lanes waiting than threads waiting for them (a thread just
        // notified still counts as waiting until it takes one): start
        // another, so a lane is not left behind one whose job hangs while
        // the pool has room.
        if s.queue.len() > s.idle
            && s.threads < self.max
            && let Err(e) = self.spawn(&mut s)
        {
            // At least one thread runs (`ensure_one` at the lane's
            // creation): the work waits for it instead.
            tracing::warn!(pool = self.name, threads = s.threads, error = %e, "could not add a worker thread");
        }
        self.ready.notify_one();
    }

    fn work(&'static self) {
        schedule_as_background();
        loop {
            let lane = {
                let mut s = lock(&self.state);
                loop {
                    if let Some(l) = s.queue.pop_front() {
                        break l;
                    }
                    s.idle += 1;
                    s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
                    s.idle -= 1;
                }
            };
            // `run_turn` catches its handler's panics; this guards the
            // rest (a drop that panics), so the thread stays in the pool.
            match catch_unwind(AssertUnwindSafe(|| lane.run_turn())) {
                Ok(true) => self.schedule(lane),
                Ok(false) => {}
                Err(_) => tracing::error!(pool = self.name, "a lane's turn panicked"),
            }
        }
    }
}

type Handler<J> = Box<dyn FnMut(Vec<J>) + Send>;

struct LaneState<J> {
    queue: VecDeque<J>,
    closed: bool,
    /// On the pool's queue or in a turn: only that turn takes jobs.
    scheduled: bool,
    finished: bool,
    panicked: bool,
}

struct Inner<J> {
    pool: &'static Pool,
    batch: bool,
    state: Mutex<LaneState<J>>,
    handler: Mutex<Option<Handler<J>>>,
    finished: Condvar,
}

/// One stream's queue of serial work on a shared [`Pool`] (see the module
/// docs). Clones share the lane.
pub(crate) struct Lane<J: Send + 'static>(Arc<Inner<J>>);

impl<J: Send + 'static> Clone for Lane<J> {
    fn clone(&self) -> Self {
        Lane(self.0.clone())
    }
}

impl<J: Send + 'static> Lane<J> {
    /// A lane whose jobs `handler` runs on `pool`: one per turn, or with
    /// `batch` everything queued when the turn starts.
    pub(crate) fn new(
        pool: &'static Pool,
        batch: bool,
        handler: impl FnMut(Vec<J>) + Send + 'static,
    ) -> Result<Lane<J>> {
        pool.ensure_one()?;
        Ok(Lane(Arc::new(Inner {
            pool,
            batch,
            state: Mutex::new(LaneState {
                queue: VecDeque::new(),
                closed: false,
                scheduled: false,
                finished: false,
                panicked: false,
            }),
            handler: Mutex::new(Some(Box::new(handler))),
            finished: Condvar::new(),
        })))
    }

    /// Queue `job` at the back. `Err(job)`: the lane is closed or finished.
    pub(crate) fn push(&self, job: J) -> std::result::Result<(), J> {
        self.put(job, false)
    }

    /// Queue `job` ahead of everything waiting.
    pub(crate) fn push_front(&self, job: J) -> std::result::Result<(), J> {
        self.put(job, true)
    }

    fn put(&self, job: J, front: bool) -> std::result::Result<(), J> {
        let mut s = lock(&self.0.state);
        if s.closed || s.finished {
            return Err(job);
        }
        if front {
            s.queue.push_front(job);
        } else {
            s.queue.push_back(job);
        }
        self.wake(s);
        Ok(())
    }

    /// Take no more jobs; those queued still run, then the lane finishes.
    pub(crate) fn close(&self) {
        let mut s = lock(&self.0.state);
        if s.closed {
            return;
        }
        s.closed = true;
        self.wake(s);
    }

    fn wake(&self, mut s: MutexGuard<'_, LaneState<J>>) {
        if s.scheduled || s.finished {
            return;
        }
        s.scheduled = true;
        drop(s);
        self.0.pool.schedule(self.0.clone());
    }

    /// Finished: closed and every job run, or its handler panicked.
    pub(crate) fn is_finished(&self) -> bool {
        lock(&self.0.state).finished
    }

    /// Wait until finished (the handler, and what it held, dropped).
    /// `Err(())`: its handler panicked.
    pub(crate) fn join(&self) -> std::result::Result<(), ()> {
        let mut s = lock(&self.0.state);
        while !s.finished {
            s = self.0.finished.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.panicked { Err(()) } else { Ok(()) }
    }

    /// As [`join`](Self::join), for at most `limit`: `None` if not
    /// finished by then (its last turn waits for a busy pool, or a job
    /// hangs).
    pub(crate) fn join_timeout(
        &self,
        limit: std::time::Duration,
    ) -> Option<std::result::Result<(), ()>> {
        let until = std::time::Instant::now() + limit;
        let mut s = lock(&self.0.state);
        while !s.finished {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            s = self
                .0
                .finished
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Some(if s.panicked { Err(()) } else { Ok(()) })
    }
}

impl<J: Send + 'static> Inner<J> {
    /// Drop the handler (and what it holds) first, so that `join`
    /// returning means it is gone; then wake the joiners.
    fn finish(&self, panicked: bool) {
        let handler = lock(&self.handler).take();
        // A drop that panics must still finish the lane, or `join` would
        // wait for ever.
        let dropped = catch_unwind(AssertUnwindSafe(|| drop(handler))).is_ok();
        let panicked = panicked || !dropped;
        let queued = {
            let mut s = lock(&self.state);
            s.finished = true;
            s.panicked |= panicked;
            s.scheduled = false;
            std::mem::take(&mut s.queue)
        };
        self.finished.notify_all();
        let _ = catch_unwind(AssertUnwindSafe(|| drop(queued)));
    }
}

impl<J: Send + 'static> Turn for Inner<J> {
    fn run_turn(&self) -> bool {
        let jobs: Vec<J> = {
            let mut s = lock(&self.state);
            if s.finished {
                return false;
            }
            if s.queue.is_empty() {
                if s.closed {
                    drop(s);
                    self.finish(false);
                } else {
                    s.scheduled = false;
                }
                return false;
            }
            if self.batch {
                s.queue.drain(..).collect()
            } else {
                s.queue.pop_front().into_iter().collect()
            }
        };
        let ran = {
            let mut h = lock(&self.handler);
            match h.as_mut() {
                Some(h) => catch_unwind(AssertUnwindSafe(|| h(jobs))).is_ok(),
                None => true,
            }
        };
        if !ran {
            self.finish(true);
            return false;
        }
        let mut s = lock(&self.state);
        if s.queue.is_empty() && !s.closed {
            s.scheduled = false;
            false
        } else {
            // More work, or a close to finish: back of the pool's queue.
            true
        }
    }
}

/// Schedule the calling thread as background work (`SCHED_BATCH`: it
/// never preempts another thread on waking up, and otherwise keeps its
/// share of the CPU and its nice value; only from the default policy; no
/// privilege needed; best effort, a no-op where the kernel refuses it or
/// off Linux). tierindex's own threads (sealing, journal commits) do this
/// themselves. Its other background work (uploads, verification, commits,
/// lease renewals) runs as tasks on the embedder's tokio runtime: call this
/// from that runtime's `on_thread_start` (its blocking threads, started by
/// its workers, inherit it) when the threads that append and flush are not
/// that runtime's workers, so that a task woken on the appending thread's
/// core does not preempt it. Measured (docs/benchmarks.md, session 32): at
/// 500,000 appends a second on 2 cores, appends over 100 us went from 20
/// to 2 in 20 M, and the append's maximum was within 1.5x of the run
/// without background work in 3 runs of 4 (not in the fourth: 1.75 ms).
/// Do not call it on a thread that appends. Measured for tierindex's own
/// threads: an append that woke a sealer thread (the next stretch of
/// pages, the spare, a seal) lost its core to it on the spot, two
/// involuntary context switches and 0.2-3 ms. Raw system calls: the C
/// library's wrappers are stubs on musl. A thread a pool thread starts
/// inherits the policy (no job starts one today; a tokio blocking thread
/// started from a job would stay batch).
pub fn schedule_as_background() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: pid 0 is the calling thread.
        let now = unsafe { libc::syscall(libc::SYS_sched_getscheduler, 0) };
        // The policy may come with SCHED_RESET_ON_FORK set.
        let now = now & !libc::c_long::from(libc::SCHED_RESET_ON_FORK);
        if now != libc::c_long::from(libc::SCHED_OTHER) {
            return;
        }
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is a valid struct
        // that outlives the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_sched_setscheduler,
                0,
                libc::SCHED_BATCH,
                &param as *const libc::sched_param,
            )
        };
        if rc != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "could not schedule a background thread as SCHED_BATCH"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// The public helper changes the calling thread only, and only from
    /// the default policy.
    #[cfg(target_os = "linux")]
    #[test]
    fn schedule_as_background_changes_the_calling_thread_only() {
        let policy = || {
            // SAFETY: pid 0 is the calling thread.
            let p = unsafe { libc::syscall(libc::SYS_sched_getscheduler, 0) };
            p & !libc::c_long::from(libc::SCHED_RESET_ON_FORK)
        };
        let mine = policy();
        let got = std::thread::spawn(move || {
            schedule_as_background();
            policy()
        })
        .join()
        .unwrap();
        let want = if mine == libc::c_long::from(libc::SCHED_OTHER) {
            libc::c_long::from(libc::SCHED_BATCH)
        } else {
            mine
        };
        assert_eq!(got, want);
        assert_eq!(policy(), mine, "the caller's thread is not changed");
    }

    /// The pools' threads run as background work (`SCHED_BATCH`) when the
    /// process runs with the default policy, keep any other, and the
    /// thread that queued the job is not changed.
    #[cfg(target_os = "linux")]
    #[test]
    fn pool_threads_are_scheduled_as_background_work() {
        static POLICY_POOL: Pool = Pool::new("policy-test", 1);
        // SAFETY: pid 0 is the calling thread.
        let mine = unsafe { libc::syscall(libc::SYS_sched_getscheduler, 0) }
            & !libc::c_long::from(libc::SCHED_RESET_ON_FORK);
        let (tx, rx) = mpsc::channel();
        let lane = Lane::new(&POLICY_POOL, false, move |_: Vec<()>| {
            // SAFETY: as above.
            tx.send(
                unsafe { libc::syscall(libc::SYS_sched_getscheduler, 0) }
                    & !libc::c_long::from(libc::SCHED_RESET_ON_FORK),
            )
            .unwrap();
        })
        .unwrap();
        lane.push(()).unwrap();
        let policy = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap();
        let want = if mine == libc::c_long::from(libc::SCHED_OTHER) {
            libc::SCHED_BATCH
        } else {
            mine as libc::c_int
        };
        assert_eq!(policy, libc::c_long::from(want), "a pool thread's scheduling policy");
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::syscall(libc::SYS_sched_getscheduler, 0) }
                & !libc::c_long::from(libc::SCHED_RESET_ON_FORK),
            mine
        );
        lane.close();
        joined(&lane).unwrap();
    }

    static TEST_POOL: Pool = Pool::new("lanes-test", 3);

    #[test]
    fn jobs_of_each_lane_run_in_order_on_a_bounded_pool() {
        let (tx, rx) = mpsc::channel();
        let lanes: Vec<Lane<u32>> = (0..8)
            .map(|l| {
                let tx = tx.clone();
                let mut seen = Vec::new();
                Lane::new(&TEST_POOL, l % 2 == 0, move |jobs: Vec<u32>| {
                    seen.extend(jobs);
                    std::thread::yield_now();
                    if seen.len() == 1000 {
                        tx.send((l, seen.clone())).unwrap();
                    }
                })
                .unwrap()
            })
            .collect();
        for i in 0..1000u32 {
            for lane in &lanes {
                lane.push(i).unwrap();
            }
        }
        for lane in &lanes {
            lane.close();
            assert!(lane.push(7).is_err(), "a closed lane takes no job");
        }
        for lane in &lanes {
            joined(lane).unwrap();
        }
        drop(tx);
        let got: Vec<_> = rx.iter().collect();
        assert_eq!(got.len(), 8);
        for (_, seen) in got {
            assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        }
    }

    /// Joined within 30 s, or the test fails (a lost wake-up would hang).
    fn joined<J: Send + 'static>(lane: &Lane<J>) -> std::result::Result<(), ()> {
        lane.join_timeout(std::time::Duration::from_secs(30))
            .expect("the lane did not finish within 30 s")
    }

    /// A job that hangs holds its thread only: another lane queued behind
    /// it gets a thread of its own while the pool has room (the pool once
    /// started one only when no thread was idle, counting the one just
    /// woken for the hanging job).
    #[test]
    fn a_hanging_job_does_not_hold_up_another_lane() {
        static POOL: Pool = Pool::new("lanes-hang", 3);
        let (ran_tx, ran_rx) = mpsc::channel::<()>();
        let (free_tx, free_rx) = mpsc::channel::<()>();
        let free_rx = Mutex::new(free_rx);
        let a = Lane::new(&POOL, false, move |_: Vec<u8>| {
            // Hangs until B has run (or 10 s, so a failure cannot hang).
            let _ = lock(&free_rx).recv_timeout(std::time::Duration::from_secs(10));
        })
        .unwrap();
        let b = Lane::new(&POOL, false, move |_: Vec<u8>| {
            let _ = ran_tx.send(());
        })
        .unwrap();
        // The pool's one thread waits idle; both are queued before it
        // wakes.
        std::thread::sleep(std::time::Duration::from_millis(100));
        a.push(1).unwrap();
        b.push(1).unwrap();
        let ran = ran_rx.recv_timeout(std::time::Duration::from_secs(5));
        let _ = free_tx.send(());
        assert!(ran.is_ok(), "B waited behind A's hanging job");
        for l in [&a, &b] {
            l.close();
            joined(l).unwrap();
        }
    }

    #[test]
    fn busy_lanes_take_turns() {
        static POOL: Pool = Pool::new("lanes-turns", 1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = Mutex::new(go_rx);
        // A gate lane holds the only thread while both lanes fill up.
        let gate = Lane::new(&POOL, false, move |_: Vec<u8>| {
            let _ = lock(&go_rx).recv_timeout(std::time::Duration::from_secs(10));
        })
        .unwrap();
        gate.push(0).unwrap();
        let lanes: Vec<Lane<u8>> = (0..2u8)
            .map(|l| {
                let order = order.clone();
                Lane::new(&POOL, false, move |_: Vec<u8>| lock(&order).push(l)).unwrap()
            })
            .collect();
        for _ in 0..3 {
            for lane in &lanes {
                lane.push(1).unwrap();
            }
        }
        go_tx.send(()).unwrap();
        for l in lanes.iter().chain([&gate]) {
            l.close();
            joined(l).unwrap();
        }
        // One job per turn, the busy lane back at the end of the queue.
        assert_eq!(*lock(&order), vec![0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn a_finished_lane_has_dropped_its_handler_and_a_panic_is_reported() {
        let held = Arc::new(());
        let h2 = held.clone();
        let lane = Lane::new(&TEST_POOL, false, move |_: Vec<u8>| {
            let _ = &h2;
        })
        .unwrap();
        lane.push(1).unwrap();
        lane.close();
        joined(&lane).unwrap();
        assert!(lane.is_finished());
        assert_eq!(Arc::strong_count(&held), 1, "the handler was dropped");

        let lane = Lane::new(&TEST_POOL, false, |j: Vec<u8>| {
            if j[0] == 2 {
                panic!("boom");
            }
        })
        .unwrap();
        lane.push(1).unwrap();
        lane.push(2).unwrap();
        lane.push(3).unwrap();
        assert!(joined(&lane).is_err(), "the panic is reported");
        assert!(lane.push(4).is_err());
        // The pool still serves other lanes.
        let (tx, rx) = mpsc::channel();
        let ok = Lane::new(&TEST_POOL, true, move |j: Vec<u8>| tx.send(j).unwrap()).unwrap();
        ok.push(9).unwrap();
        assert_eq!(rx.recv().unwrap(), vec![9]);
    }
}
