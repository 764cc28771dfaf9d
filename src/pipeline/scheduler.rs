//! [`Scheduler`]: runs drives with bounded concurrency (the stream's
//! own bound, then a slot of the process's, see [`super::slots`]), oldest
//! segment first, backs off on retryable errors, and stops at a deadline (work
//! left is already durable in the journal), with the [`DrainReport`] it
//! returns.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use super::{Shared, drive};
use crate::error::{Error, Result};
use crate::journal::SegmentState;
use crate::retry::Backoff;
use crate::segment::SegmentId;

/// How long a segment whose failure needs an operator waits before its
/// next drive (a drain ends before that: the failure is reported at once).
const PARKED: Duration = Duration::from_secs(600);

/// A segment whose drive failed retryably waits this schedule (step = its
/// consecutive failures) before its next drive.
const DRIVE_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// One segment's outcome in a drain.
#[derive(Clone, Debug, Serialize)]
pub struct PendingNote {
    /// The segment.
    pub id: u64,
    /// Its journal state.
    pub state: String,
    /// The last failure seen for it.
    pub last_error: Option<String>,
}

/// What a drain did and what it left.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DrainReport {
    /// Segments finished by this drain.
    pub segments_done: u64,
    /// Their bytes.
    pub bytes_done: u64,
    /// Segments left to do (they resume at the next start).
    pub pending: Vec<PendingNote>,
    /// Segments quarantined (an operator must look).
    pub quarantined: Vec<PendingNote>,
    /// Of `pending`, the ids whose last failure needs an operator, not
    /// time (a committed object found missing or short before a release,
    /// a refusal of the store): not retried again in this drain.
    pub parked: Vec<u64>,
    /// The deadline ended the drain.
    pub deadline_hit: bool,
    /// Time the drain took.
    pub elapsed_ms: u64,
}

/// Runs drives with bounded concurrency, oldest first, with backoff.
pub struct Scheduler {
    sh: Arc<Shared>,
    tasks: JoinSet<(SegmentId, Result<SegmentState>)>,
    in_flight: BTreeSet<SegmentId>,
    /// Which segment each task drives, so a panicked or cancelled task
    /// still frees its segment for a retry.
    task_ids: BTreeMap<tokio::task::Id, SegmentId>,
    retry_at: BTreeMap<SegmentId, (Instant, u32)>,
    last_error: BTreeMap<SegmentId, String>,
    /// Segments whose last failure needs an operator ([`PARKED`]).
    parked: BTreeSet<SegmentId>,
    done: u64,
    bytes: u64,
}

impl Scheduler {
    pub fn new(sh: Arc<Shared>) -> Scheduler {
        Scheduler {
            sh,
            tasks: JoinSet::new(),
            in_flight: BTreeSet::new(),
            task_ids: BTreeMap::new(),
            retry_at: BTreeMap::new(),
            last_error: BTreeMap::new(),
            parked: BTreeSet::new(),
            done: 0,
            bytes: 0,
        }
    }

    /// Start drives for pending segments up to the in-flight bound.
    pub fn fill(&mut self) {
        if self.sh.fenced.get().is_some() {
            return;
        }
        let now = Instant::now();
        let free = self
            .sh
            .max_in_flight
            .max(1)
            .saturating_sub(self.in_flight.len());
        let next = self.sh.next_work(free, |id| {
            self.in_flight.contains(&id) || self.retry_at.get(&id).is_some_and(|(t, _)| *t > now)
        });
        for id in next {
            self.in_flight.insert(id);
            let sh = self.sh.clone();
            // Oldest data first across the process's streams (bounded, and
            // a retry ranks as new: see `slots`).
            let min_ts = self.sh.journal.read().get(id).map_or(0, |r| r.meta.min_ts);
            let retry = self.retry_at.contains_key(&id);
            // Remembered so a drive that panics is still accounted for
            // (retried later), not left "in flight" forever.
            let task = self.tasks.spawn(async move {
                let now = crate::segment::now_ms();
                let _slot = super::slots::UPLOADS.acquire(min_ts, retry, now).await;
                (id, drive::drive(&sh, id).await)
            });
            self.task_ids.insert(task.id(), id);
        }
        self.sh
            .metrics
            .uploads_in_flight
            .set(self.in_flight.len() as u64);
    }

    /// Earliest time a backed-off segment may run again.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retry_at
            .iter()
            .filter(|(id, _)| !self.in_flight.contains(id))
            .map(|(_, (t, _))| *t)
            .min()
    }

    pub fn is_idle(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Wait for one drive to finish and account for it. `None` when idle.
    pub async fn join_one(&mut self) -> Option<()> {
        let joined = self.tasks.join_next_with_id().await?;
        match joined {
            Ok((tid, (id, res))) => {
                self.task_ids.remove(&tid);
                self.account(id, res);
            }
            Err(e) => {
                tracing::error!(error = %e, "upload task panicked or was cancelled");
                if let Some(id) = self.task_ids.remove(&e.id()) {
                    self.account(
                        id,
                        Err(Error::RemoteRetryable(format!("upload task ended: {e}"))),
                    );
                }
            }
        }
        Some(())
    }

    fn account(&mut self, id: SegmentId, res: Result<SegmentState>) {
        self.in_flight.remove(&id);
        self.parked.remove(&id);
        self.sh
            .metrics
            .uploads_in_flight
            .set(self.in_flight.len() as u64);
        match res {
            Ok(SegmentState::Quarantined) => {
                self.retry_at.remove(&id);
            }
            Ok(_) => {
                self.retry_at.remove(&id);
                self.last_error.remove(&id);
                self.done += 1;
                if let Some(r) = self.sh.journal.read().get(id) {
                    self.bytes += r.meta.file_len;
                }
            }
            Err(e) => {
                let n = self.retry_at.get(&id).map_or(0, |(_, n)| *n) + 1;
                // A release that found its committed object missing or
                // short, or a store that refuses it: no retry brings it
                // back; reported at once, not retried to the deadline.
                let parked = matches!(e, Error::Remote(_))
                    && self
                        .sh
                        .journal
                        .read()
                        .get(id)
                        .is_some_and(|r| r.state == SegmentState::Committed);
                let wait = if parked {
                    self.parked.insert(id);
                    PARKED
                } else {
                    DRIVE_BACKOFF.at_least_step(n, &mut fastrand::Rng::new())
                };
                if matches!(e, Error::Poisoned(_)) {
                    tracing::error!(segment = id.0, error = %e, "journal poisoned; uploads stop");
                } else if matches!(e, Error::Fenced(_)) {
                    tracing::error!(segment = id.0, error = %e, "fenced; uploads stop");
                } else {
                    tracing::warn!(segment = id.0, error = %e, retry_in_ms = wait.as_millis() as u64, "upload step failed; will retry");
                }
                self.sh.metrics.retries.inc();
                self.retry_at
                    .insert(id, (Instant::now() + wait, n));
                self.last_error.insert(id, e.to_string());
            }
        }
    }

    /// Run until nothing is pending or `deadline` passes; in-flight drives
    /// are cancelled at the deadline (their journal state is the resume
    /// point). Never waits past the deadline.
    pub async fn drain(&mut self, deadline: Instant) -> DrainReport {
        let started = Instant::now();
        let (done0, bytes0) = (self.done, self.bytes);
        let mut deadline_hit = false;
        loop {
            if self.sh.journal.read().is_poisoned() || self.sh.fenced.get().is_some() {
                break;
            }
            self.fill();
            if self.is_idle() {
                // Nothing left but segments waiting for an operator.
                if self
                    .retry_at
                    .keys()
                    .all(|id| self.parked.contains(id))
                {
                    break;
                }
                match self.next_retry() {
                    None => break,
                    Some(t) if t >= deadline => {
                        deadline_hit = true;
                        break;
                    }
                    Some(t) => {
                        tokio::time::sleep_until(t.into()).await;
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = self.join_one() => {}
                _ = tokio::time::sleep_until(deadline.into()) => {
                    deadline_hit = true;
                    break;
                }
            }
        }
        if !self.tasks.is_empty() {
            self.tasks.abort_all();
            while let Some(j) = self.tasks.join_next_with_id().await {
                match j {
                    Ok((tid, (id, res))) => {
                        self.task_ids.remove(&tid);
                        self.account(id, res);
                    }
                    Err(e) => {
                        self.task_ids.remove(&e.id());
                    }
                }
            }
            self.in_flight.clear();
        }
        self.report(started, done0, bytes0, deadline_hit)
    }

    fn report(&self, started: Instant, done0: u64, bytes0: u64, deadline_hit: bool) -> DrainReport {
        let guard = self.sh.journal.read();
        let j = guard.state();
        let note = |id: &SegmentId, state: SegmentState| PendingNote {
            id: id.0,
            state: format!("{state:?}"),
            last_error: self.last_error.get(id).cloned(),
        };
        // From the journal's indexes: the report costs what is pending,
        // not the number of segments ever journaled.
        let pending = j
            .pending_ids(self.sh.release_after_commit)
            .into_iter()
            .filter_map(|id| j.get(id).map(|r| note(&id, r.state)))
            .collect();
        let quarantined = if j.state_counts().contains_key(&SegmentState::Quarantined) {
            j.segments()
                .iter()
                .filter(|(_, r)| r.state == SegmentState::Quarantined)
                .map(|(id, r)| PendingNote {
                    id: id.0,
                    state: "Quarantined".into(),
                    last_error: r.reason.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        DrainReport {
            segments_done: self.done - done0,
            bytes_done: self.bytes - bytes0,
            pending,
            quarantined,
            parked: self.parked.iter().map(|id| id.0).collect(),
            deadline_hit,
            elapsed_ms: started.elapsed().as_millis() as u64,
        }
    }
}
