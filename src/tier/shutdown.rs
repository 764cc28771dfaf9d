//! [`TierIndex::shutdown`]: seal, drain within a deadline, release, report.

use super::*;

impl TierIndex {
    /// Seal, drain within `deadline`, write the clean marker if nothing is
    /// left. Never waits past the deadline (plus the time to cancel).
    pub async fn shutdown(mut self, deadline: Duration) -> ShutdownReport {
        let started = Instant::now();
        let until = started + deadline;
        let sh = self.sh().clone();
        let _ = self.stop.send(true);
        self.notify.notify_one();
        let (mut sched, probe) = match self.worker.take() {
            Some(mut w) => match tokio::time::timeout_at(until.into(), &mut w).await {
                Ok(Ok(s)) => s,
                _ => {
                    // Never leave a detached worker uploading next to the
                    // drain's own scheduler.
                    w.abort();
                    let _ = w.await;
                    (Scheduler::new(sh.clone()), None)
                }
            },
            None => (Scheduler::new(sh.clone()), None),
        };
        // Aborted tasks are awaited: an aborted task is dropped only when
        // the runtime gets to it, and until then it may hold the shared
        // state, and with it the data-directory lock past `shutdown()`.
        if let Some(t) = self.metrics_task.take() {
            t.abort();
            let _ = t.await;
        }
        // Cut mid-repair at worst: a wrong object deleted and its re-upload
        // not finished. The local copy was read before the delete and is
        // still on disk (a release first checks that the object is there),
        // so the next run, or the next start's drive, repairs it.
        if let Some(t) = self.reconcile_task.take() {
            t.abort();
            let _ = t.await;
        }
        let mut error = None;
        // Seal the active segment (the last file is the one most often lost).
        let writer = sh.writer.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            writer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .close(until)
        });
        let sealed = match tokio::time::timeout_at(until.into(), sealed).await {
            Ok(Ok(Ok(metas))) => metas,
            Ok(Ok(Err(e))) => {
                error = Some(e.to_string());
                Vec::new()
            }
            Ok(Err(e)) => {
                error = Some(format!("seal task failed: {e}"));
                Vec::new()
            }
            Err(_) => {
                error = Some("sealing did not finish before the deadline; the active file stays and is sealed at the next start".into());
                Vec::new()
            }
        };
        let sealed_at_shutdown = sealed.len();
        if let Err(e) = sh.record_sealed(sealed).await {
            error.get_or_insert(e.to_string());
        }
        // Committed segments whose id the manifest lists with another data
        // directory's bytes: requeued to be resealed by this drain (at most
        // a quarter of what is left of the deadline; the check after the
        // drain reports what is left).
        if sh.manifest.is_some() && sh.fenced.get().is_none() {
            let left = until.saturating_duration_since(Instant::now()) / 4;
            match tokio::time::timeout(left, sh.requeue_id_conflicts()).await {
                Ok(Ok(ids)) if !ids.is_empty() => tracing::warn!(
                    segments = ?ids,
                    "committed segments whose id the manifest gives to another segment are \
                     resealed under new ids"
                ),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not check the manifest for committed segments under another segment's id"),
                Err(_) => tracing::warn!("checking the manifest for committed segments under another segment's id did not finish in time"),
            }
        }
        let drain = sched.drain(until).await;
        sh.metrics.last_drain_ms.set(drain.elapsed_ms);
        drop(sched);
        // The lease was renewed through the drain; the renewal task stops
        // now (a renewal in progress finishes, within what is left of the
        // deadline).
        let _ = self.lease_stop.send(true);
        if let Some(mut t) = self.lease_task.take()
            && tokio::time::timeout_at(until.into(), &mut t).await.is_err()
        {
            t.abort();
            let _ = t.await;
        }
        if let Some(mut p) = probe {
            // Let a running probe finish its clean-up of `_probe/` with what
            // is left of the deadline (at most 2 s), rather than leave its
            // objects behind; then stop it.
            let limit = until.min(Instant::now() + Duration::from_secs(2));
            if tokio::time::timeout_at(limit.into(), &mut p).await.is_err() {
                p.abort();
                let _ = p.await;
            }
        }
        // Every segment the journal calls committed is in the manifest,
        // or the report says which are not (a rolled-back manifest would
        // otherwise end in "clean").
        // Within the deadline only; a check that cannot finish (a store
        // down, a long history read chunk by chunk) is logged, not taken
        // for a finding: `status --remote` and `reconcile` make it in full.
        let unlisted = if sh.manifest.is_some() && sh.fenced.get().is_none() {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, sh.unlisted_committed()).await {
                Ok(Ok(ids)) => ids,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not check that the manifest lists every committed segment (`tierindex status --remote` does)");
                    Vec::new()
                }
                Err(_) => {
                    tracing::warn!("checking that the manifest lists every committed segment did not finish before the deadline (`tierindex status --remote` does it in full)");
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        if !unlisted.is_empty() {
            tracing::error!(
                segments = ?unlisted,
                "segments committed in the journal are not listed in the stream's manifest; \
                 `tierindex reconcile --repair` commits them (one whose object and local copy \
                 are both gone is listed marked LOST, for an operator to accept)"
            );
        }
        // Segments the manifest marks damaged in the store: a drain that
        // ended "clean" over a LOST segment told an operator nothing
        // (helper-72 F2).
        let left = until.saturating_duration_since(Instant::now());
        let damaged_in_store: Vec<StoreDamage> = if sh.fenced.get().is_none() {
            tokio::time::timeout(left.max(Duration::from_millis(100)), sh.damage_notes())
                .await
                .unwrap_or_else(|_| {
                    tracing::warn!(
                        "reading the manifest's damage notes did not finish before the deadline \
                         (`tierindex status --remote` reads them)"
                    );
                    Vec::new()
                })
                .into_iter()
                .map(|d| StoreDamage {
                    segment: d.id.0,
                    lost: d.lost,
                    loss_accepted: d.accepted.map(|a| (a.at_ms, a.reason)),
                    reason: d.reason,
                })
                .collect()
        } else {
            Vec::new()
        };
        if damaged_in_store.iter().any(StoreDamage::needs_operator) {
            tracing::error!(
                segments = ?damaged_in_store.iter().map(|d| d.segment).collect::<Vec<_>>(),
                "the stream's manifest marks segments damaged in the store; readers skip them: \
                 `tierindex reconcile --deep --repair` repairs those with an intact local copy"
            );
        }
        let fenced = sh.fenced.get().cloned();
        if let Some(why) = &fenced {
            error.get_or_insert_with(|| {
                format!("fenced: {why}; this process stopped writing to the store")
            });
        }
        // Sealed files the journal never recorded and cannot any more
        // (below its highest id): nothing uploads their entries, unless the
        // store already holds them as committed (a released segment's copy
        // put back from a backup after compaction dropped its record).
        let candidates = sh.unjournaled_below_max();
        let mut unjournaled = Vec::new();
        if !candidates.is_empty() {
            let limit = until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(10));
            let check = async {
                for id in candidates {
                    if !sh.committed_elsewhere(id).await {
                        unjournaled.push(id.0);
                    }
                }
            };
            if tokio::time::timeout(limit, check).await.is_err() {
                tracing::warn!("checking local sealed files without a journal record against the store did not finish in time");
            }
        }
        if !unjournaled.is_empty() {
            tracing::error!(
                segments = ?unjournaled,
                "local sealed files without a journal record, below the journal's highest id: \
                 their entries are not uploaded; an operator must look (`tierindex inspect`)"
            );
        }
        let mut report = ShutdownReport {
            sealed_at_shutdown,
            drain,
            clean_marker_written: false,
            error,
            fenced,
            elapsed_ms: 0,
            lost: std::mem::take(&mut self.losses),
            unlisted,
            unjournaled,
            damaged_in_store,
        };
        if sh.manifest.is_some() && report.fully_drained() {
            // Hand the stream over without making the next owner wait for
            // the lease. Best effort: a lease left behind just expires.
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left.max(Duration::from_millis(100)), sh.release_lease())
                .await
            {
                Ok(Ok(())) => tracing::info!("manifest lease released"),
                Ok(Err(e)) => tracing::warn!(error = %e, "releasing the manifest lease failed"),
                Err(_) => tracing::warn!("releasing the manifest lease timed out"),
            }
        }
        // A host lease holds the stream no more (a release already took it
        // off; otherwise its lease now runs out as an unrenewed one does).
        sh.leave_host_lease();
        if report.fully_drained() {
            match write_clean_marker(&self.data_dir) {
                Ok(()) => report.clean_marker_written = true,
                Err(e) => report.error = Some(e.to_string()),
            }
        }
        // Release the journal and the data-directory lock before returning,
        // so the same process (or a test) can open the directory again.
        self.sh = None;
        match Arc::try_unwrap(sh) {
            Ok(shared) => {
                let Shared {
                    journal, writer, ..
                } = shared;
                drop(writer);
                // The committer lane ends on a thread of the shared journal
                // pool; waited for off the runtime's threads, and only as
                // long as the deadline allows (at least 1 s): with every
                // pool thread busy elsewhere the journal's lock is released
                // when the lane ends.
                let left = until
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_secs(1));
                let closing = tokio::task::spawn_blocking(move || journal.close());
                if tokio::time::timeout(left, closing).await.is_err() {
                    tracing::warn!(
                        "the journal's committer has not ended by the deadline (the shared \
                         journal threads are busy); its lock is released when it does"
                    );
                }
            }
            Err(_) => tracing::warn!(
                "background tasks still hold the index; its lock is released when they end"
            ),
        }
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            drained = report.fully_drained(),
            pending = report.drain.pending.len(),
            ms = report.elapsed_ms,
            "shutdown finished"
        );
        report
    }
}
