//! The background tasks of a [`TierIndex`]: the worker (journal new seals,
//! roll aged segments, drive uploads), the lease renewer and the periodic
//! reconciler; and the status they publish.

use super::*;

/// Status from the journal (no writer needed: works for the CLI too).
pub fn status_of(sh: &Shared) -> Status {
    status_from(sh.journal.read().state(), sh.release_after_commit)
}

/// Status from a journal's state: its per-state counts and pending
/// summary, kept as records apply (the cost does not grow with the number
/// of segments ever journaled; the worker refreshes the gauges from this at
/// every wake).
pub fn status_from(state: &crate::journal::JournalState, release_after_commit: bool) -> Status {
    let mut st = Status::default();
    for (s, n) in state.state_counts() {
        st.by_state.insert(format!("{s:?}"), *n);
    }
    let p = state.pending_summary(release_after_commit);
    st.pending_segments = p.segments;
    st.pending_bytes = p.bytes;
    st.oldest_pending_age_ms = p.oldest_sealed_ms.map(|ms| now_ms().saturating_sub(ms));
    st
}

/// How long an idle worker sleeps when nothing wakes it (a safety net:
/// every change it must act on wakes it): drawn anew each time between half
/// of this and all of it, so the streams of a host, opened together, do not
/// all wake together. (With one 30 s for all, 10,000 streams opened within
/// 4 s each sent a tick to tokio's blocking threads within 4 s of each
/// other: 178 blocking threads for the next 10 s, issue 16.)
const IDLE_WAKE: Duration = Duration::from_secs(60);

fn idle_wake(rng: &mut fastrand::Rng) -> Duration {
    IDLE_WAKE / 2 + IDLE_WAKE.mul_f64(rng.f64() / 2.0)
}

/// Refresh the gauges; returns the number of pending segments.
pub(super) fn update_gauges(sh: &Shared) -> u64 {
    // The shared set, not the writer: never waits for an append.
    let (held, mapped) = sh.sealed.counts();
    sh.metrics.local_sealed_segments.set(held as u64);
    sh.metrics.local_sealed_mapped.set(mapped as u64);
    let st = status_of(sh);
    sh.metrics.pending_segments.set(st.pending_segments);
    sh.metrics.pending_bytes.set(st.pending_bytes);
    sh.metrics
        .oldest_pending_age_ms
        .set(st.oldest_pending_age_ms.unwrap_or(0));
    st.pending_segments
}

/// Sleeps `every`; false once told to stop (at once, not after the sleep).
async fn wait_or_stop(every: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = stop.changed() => return false,
        _ = tokio::time::sleep(every) => {}
    }
    !*stop.borrow()
}

/// Renews the manifest lease every `every` until told to stop or fenced.
/// A failed renewal is retried at the next interval (the lease lasts three);
/// a fence is recorded in `Shared` by `renew_lease` and ends the task.
pub(super) async fn lease_renewer(sh: Arc<Shared>, every: Duration, mut stop: watch::Receiver<bool>) {
    let every = every.max(Duration::from_millis(10));
    // Kept across the loop: a lapse while a check runs is not missed.
    let mut lapses: Option<watch::Receiver<u64>> = None;
    // A check that failed (the store just came back, and throttles): tried
    // again every `every` until it answers.
    let mut check_due = false;
    loop {
        if sh.lease_hosted()
            && let Some(ended) = sh.host_lease_ended()
        {
            if lapses.is_none() {
                lapses = sh.host_lease_lapses();
            }
            let lapsed = async {
                match lapses.as_mut() {
                    Some(rx) => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            // The host's lease renews this one: nothing to do but wait
            // (no timer per stream: a host of 10,000 streams would wake
            // 1,000 times a second for nothing), unless the host's renewal
            // task ends (its runtime shut down): then renew on our own; or
            // its renewals land again after a gap in which the lease may
            // have looked expired: then check once whether another owner
            // took the stream meanwhile (one listing), so that a takeover is
            // known now, not at the next commit.
            let retry = async {
                if check_due {
                    tokio::time::sleep(every).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            let check = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = ended => {
                    tracing::warn!("the host lease's renewal task ended (its runtime shut down); this stream renews its own lease");
                    false
                }
                _ = lapsed => true,
                _ = retry => true,
            };
            if check {
                // Raced with shutdown: a check waiting for its turn among
                // many streams must not hold up the release.
                let r = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    r = sh.check_taken() => r,
                };
                check_due = false;
                match r {
                    Ok(()) => {}
                    Err(Error::Fenced(_)) => return,
                    Err(e) => {
                        check_due = true;
                        tracing::warn!(error = %e, "checking for a takeover after the host lease's gap failed; trying again");
                    }
                }
            }
            continue;
        }
        if !wait_or_stop(every, &mut stop).await {
            return;
        }
        match sh.renew_lease().await {
            Ok(()) => {}
            Err(Error::Fenced(_)) => return,
            Err(e) => tracing::warn!(error = %e, "renewing the manifest lease failed; retrying"),
        }
    }
}

/// The reconciler every `every` (`reconcile_interval_ms`): journal (read
/// only) vs manifest vs the bucket listing. With `reconcile_repair` it also
/// repairs from this process (`reconcile_in_process`: re-uploads from local
/// copies, manifest writes as the current owner, stale multipart uploads
/// and proven abandoned uploads of ours older than `reconcile_grace_ms`;
/// objects of unknown origin are reported, never deleted). Findings left for an operator
/// are logged as errors and counted in the `reconcile_unresolved` gauge;
/// repairs in `reconcile_repaired_total`.
pub(super) async fn reconciler(
    sh: Arc<Shared>,
    cfg: Config,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let opts = crate::recovery::reconcile::ReconcileOptions {
        repair: cfg.reconcile_repair,
        deep: false,
        grace: Duration::from_millis(cfg.reconcile_grace_ms),
        ..Default::default()
    };
    let access = crate::pipeline::InProcessManifest(sh.clone());
    while wait_or_stop(every, &mut stop).await {
        if sh.fenced.get().is_some() {
            return;
        }
        let run = crate::recovery::reconcile::reconcile_in_process(&cfg, &sh.store, &opts, &access);
        match run.await {
            Ok(r) => {
                for f in r.findings.iter().filter(|f| !f.informational) {
                    if f.repaired {
                        tracing::warn!(kind = ?f.kind, segment = ?f.segment, key = %f.key, detail = %f.detail, action = %f.action, "reconcile repaired");
                    } else {
                        tracing::error!(kind = ?f.kind, segment = ?f.segment, key = %f.key, detail = %f.detail, action = %f.action, "reconcile finding");
                    }
                }
                sh.metrics.reconcile_repaired.add(r.repaired as u64);
                sh.metrics.reconcile_unresolved.set(r.unresolved as u64);
                sh.metrics.reconcile_runs.inc();
            }
            Err(e) => {
                tracing::warn!(error = %e, "background reconcile failed; retrying at the next interval")
            }
        }
    }
}

/// Whether the broker is appending, from the appended-entries counter seen
/// at each of the worker's wakes: it moved since the last wake, or did so
/// less than [`Appending::PAUSE`] ago (wakes can come microseconds apart).
struct Appending {
    seen: u64,
    moved_at: Option<Instant>,
}

impl Appending {
    const PAUSE: Duration = Duration::from_millis(100);

    fn new(seen: u64) -> Appending {
        Appending {
            seen,
            moved_at: None,
        }
    }

    fn observe(&mut self, count: u64, now: Instant) -> bool {
        if count != self.seen {
            self.seen = count;
            self.moved_at = Some(now);
        }
        self.moved_at
            .is_some_and(|t| now.saturating_duration_since(t) < Self::PAUSE)
    }
}

/// Background worker: journal new seals, roll aged segments, drive uploads.
/// Returns at once when told to stop, with its scheduler (in-flight drives
/// continue in the shutdown drain instead of starting over) and the probe
/// if it still runs: shutdown lets it finish its clean-up only after
/// sealing and draining, within what is left of the deadline. (Waiting for
/// it here once ate a 2 s deadline on a hanging store before the active
/// segment was sealed.)
pub(super) async fn worker(
    sh: Arc<Shared>,
    probe: Option<ProbeTask>,
    notify: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    tick: Duration,
) -> (Scheduler, Option<ProbeTask>) {
    let mut sched = Scheduler::new(sh.clone());
    let mut rng = fastrand::Rng::new();
    // Uploads wait a moment for the capability probe, so a store that
    // honours conditional creates is not read back needlessly. Seals are
    // journaled meanwhile, and appends never wait; a slow probe just keeps
    // the safe path.
    let uploads_from = Instant::now() + Duration::from_secs(2);
    let mut probe = probe;
    let mut appends = Appending::new(sh.metrics.entries_appended.get());
    // The age deadline learnt at the last tick with the writer. A roll
    // since only moves the real one later, so an older one is never late.
    let mut age_due: Option<u64> = None;
    // Wakes still owed to a seal collected without the writer: its frozen
    // segment is retired by the appender's next roll, or, when appends
    // have stopped by then, by one of these (a few, a pause apart; not one
    // a tick for as long as a stream appends).
    let mut owed = 0u8;
    loop {
        if *stop.borrow() {
            return (sched, probe);
        }
        sh.metrics.worker_wakes.inc();
        // While the broker appends, the writer's lock is left to it: the
        // seals' results are collected without it, and the appender takes
        // finished seals at its next roll. The lock is taken once appends
        // pause, or when the age rule may be due.
        let appending = appends.observe(sh.metrics.entries_appended.get(), Instant::now());
        let with_writer =
            !appending || (sh.handoff.age_rule() && age_due.is_none_or(|d| d <= now_ms()));
        let (due, ticked) = sh.tick_writer(with_writer).await;
        if with_writer {
            age_due = due;
            owed = 0;
        } else if matches!(ticked, Ok(n) if n > 0) {
            owed = 3;
        }
        if let Err(e) = ticked {
            tracing::error!(error = %e, "collecting sealed segments failed");
        }
        if probe.as_ref().is_some_and(|p| p.is_finished()) {
            probe = None;
        }
        let may_upload = probe.is_none() || Instant::now() >= uploads_from;
        if may_upload {
            sched.fill();
        }
        let pending = update_gauges(&sh);
        // Nothing pending and nothing to roll: sleep until woken (a seal,
        // the first append into an empty segment, a stop), with a long
        // timeout as a safety net. A thousand idle streams used to wake
        // five thousand times a second for nothing.
        let now = Instant::now();
        let busy = pending > 0 || !sched.is_idle();
        let mut wake = now + if busy { tick } else { idle_wake(&mut rng).max(tick) };
        // Back a pause later, a few times, for a frozen segment left
        // unretired (see `owed`). A wake a tick for every appending stream
        // was 20,000 wakes a second at 1,000 streams (helper-53).
        if !with_writer && owed > 0 {
            owed -= 1;
            wake = wake.min(now + Appending::PAUSE + Duration::from_millis(50));
        }
        if let Some(r) = sched.next_retry() {
            wake = wake.min(r);
        }
        if let Some(due) = age_due {
            // Due already (the roll waits for its prepared file): retry at
            // the tick's pace, as before; else at the deadline.
            let left = due.saturating_sub(now_ms());
            let at = if left == 0 { tick } else { Duration::from_millis(left) };
            wake = wake.min(now + at);
        }
        if !may_upload {
            wake = wake.min(Instant::now() + Duration::from_millis(20));
        }
        tokio::select! {
            _ = notify.notified() => {}
            _ = stop.changed() => {}
            Some(()) = sched.join_one(), if !sched.is_idle() => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}
