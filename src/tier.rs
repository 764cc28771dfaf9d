//! [`TierIndex`]: what a broker embeds.
//!
//! Open order (each step is a prerequisite of the next):
//! 1. lock the data directory; note and remove the clean-shutdown marker,
//! 2. replay the journal (torn tail cut),
//! 3. recover segments (torn tails, quarantine, leftover seals) with ids
//!    continuing above the journal's highest,
//! 4. journal sealed files the journal does not know yet,
//! 5. with `manifest = true`: probe the store (conditional creates decide
//!    whether the manifest may be managed at all) and take ownership of the
//!    stream's manifest (refused while another owner's lease is live),
//! 6. build the store and start the background worker, which journals new
//!    seals, rolls aged segments, and drives uploads; with a manifest, a
//!    second task renews the lease every third of its TTL.
//!
//! Shutdown order: stop the worker (it returns at once); refuse appends; seal the active segment
//! even if not full; drain uploads oldest first until done or the deadline;
//! with a manifest and nothing pending, release the lease (best effort);
//! write the clean-shutdown marker only if nothing is pending; report.
//! A fence (another owner took the stream) stops all store writes at once
//! and is reported in [`ShutdownReport::fenced`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::config::Config;
use crate::datadir::{DataDir, LossNote, RecoveryReport};
use crate::durable::{fsync_dir, fsync_path};
use crate::error::{Error, Result};
use crate::index::IndexWriter;
use crate::journal::{Journal, JournalOptions, ReplayReport, SegmentState};
use crate::metrics::Metrics;
use crate::pipeline::{DrainReport, JournalHandle, ManifestHandle, PendingTake, Scheduler, Shared};
use crate::remote::RemoteStore;
use crate::remote::fetch::{Fetcher, RemoteSegment};
use crate::remote::lease::{Clock, SystemClock};
use crate::remote::manifest::{DamageNote, ManifestStore, ManifestWriter, SegmentEntry};
use crate::segment::active::Lookup;
use crate::segment::{Entry, TimeRange, now_ms};

/// Present in the data directory only after a shutdown that left nothing
/// pending. Removed (durably) at open.
pub const CLEAN_SHUTDOWN_MARKER: &str = "CLEAN_SHUTDOWN";

/// What opening found.
#[derive(Clone, Debug, Serialize)]
pub struct OpenReport {
    /// The last run ended with a clean shutdown (nothing pending).
    pub previous_shutdown_clean: bool,
    /// What the local checks found and did.
    pub segments: RecoveryReport,
    /// Upload-journal records replayed.
    pub journal_records_replayed: u64,
    /// Bytes of a torn journal tail cut off (never acknowledged).
    pub journal_truncated_bytes: u64,
    /// Anything else worth a line in the log.
    pub notes: Vec<String>,
    /// The store, without credentials.
    pub store: String,
}

/// What shutdown did and left. `pending` empty and `quarantined` empty means
/// fully drained.
#[derive(Clone, Debug, Serialize)]
pub struct ShutdownReport {
    /// Segments sealed by the shutdown itself.
    pub sealed_at_shutdown: usize,
    /// What the drain did and left.
    pub drain: DrainReport,
    /// Nothing was left: the next open finds a clean shutdown.
    pub clean_marker_written: bool,
    /// A failure that ended the shutdown early.
    pub error: Option<String>,
    /// Set when another owner took the stream's manifest (a newer epoch):
    /// this process stopped writing to the store; segments not in the
    /// manifest stay `Verified` locally, with their files.
    pub fenced: Option<String>,
    /// Time the shutdown took.
    pub elapsed_ms: u64,
    /// Damaged local files found at open whose entries could not all be
    /// salvaged: segment, indices and byte offsets of what is gone. Not
    /// empty means an operator must look (exit code 4), even when
    /// everything salvaged was drained.
    pub lost: Vec<LossNote>,
}

impl ShutdownReport {
    /// Entries counted as lost (see [`ShutdownReport::lost`]).
    pub fn lost_items(&self) -> u64 {
        self.lost.iter().map(|n| n.lost_items).sum()
    }

    /// Nothing pending, quarantined, fenced or failed.
    pub fn fully_drained(&self) -> bool {
        self.error.is_none()
            && self.fenced.is_none()
            && self.drain.pending.is_empty()
            && self.drain.quarantined.is_empty()
    }
}

/// Per-state counts and totals, for `status` and metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    /// The segment being written.
    pub active_segment: Option<u64>,
    /// Its items.
    pub active_items: u32,
    /// Journaled segments per upload state.
    pub by_state: std::collections::BTreeMap<String, u64>,
    /// Segments not yet done.
    pub pending_segments: u64,
    /// Their bytes.
    pub pending_bytes: u64,
    /// Age of the oldest of them.
    pub oldest_pending_age_ms: Option<u64>,
    /// Why the writer is poisoned (a durability step failed): restart.
    pub poisoned: Option<String>,
    /// Another owner took the stream's manifest; uploads stopped.
    pub fenced: Option<String>,
    /// Ownership of the stream's manifest is not taken yet (the store was
    /// unreachable at open): why. Segments wait at `Verified` until it is.
    pub manifest_pending: Option<String>,
    /// Entries in active (unsealed) segments: acknowledged or about to be,
    /// and not in any sealed file yet. Counted as pending work.
    pub unsealed_items: u64,
    /// Sealed files on disk that the journal does not know (a crash
    /// between seal and journal): pending, counted in `pending_segments`.
    pub unjournaled_sealed: Vec<u64>,
    /// Entries of damaged local files that could not be salvaged.
    pub lost_items: u64,
    /// One line per damaged file with loss (segment, indices, offsets).
    pub losses: Vec<String>,
    /// The store's capability probe has answered (at open with the
    /// manifest, else in the background): until then every upload assumes
    /// the worst (no trusted conditional create, `Full` verification,
    /// signed bodies).
    pub store_probed: bool,
}

impl Status {
    /// Anything an operator must look at: quarantined segments or loss.
    pub fn needs_operator(&self) -> bool {
        self.by_state.get("Quarantined").copied().unwrap_or(0) > 0 || !self.losses.is_empty()
    }
}

/// The embedded index + uploader.
pub struct TierIndex {
    // Always Some until `shutdown` consumes the TierIndex.
    sh: Option<Arc<Shared>>,
    data_dir: PathBuf,
    cfg: Config,
    stop: watch::Sender<bool>,
    worker: Option<tokio::task::JoinHandle<(Scheduler, Option<ProbeTask>)>>,
    notify: Arc<Notify>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    lease_task: Option<tokio::task::JoinHandle<()>>,
    /// Background report-only reconcile (`reconcile_interval_ms`).
    reconcile_task: Option<tokio::task::JoinHandle<()>>,
    /// Remote reads for [`TierIndex::lookup_remote`], made on first use.
    fetcher: std::sync::OnceLock<Fetcher>,
    /// Read-only manifest view for lookups while ownership is pending.
    manifest_reader: std::sync::OnceLock<ManifestStore>,
    /// What open found lost (damaged files, not all salvaged): repeated in
    /// `status` and in the shutdown report.
    losses: Vec<LossNote>,
}

/// What [`TierIndex::lookup_remote`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RemoteLookup {
    /// Entries from remote segments whose local copy was released (oldest
    /// segment first; released segments are older than the local ones),
    /// then the local entries (as [`TierIndex::lookup`]).
    pub entries: Vec<Entry>,
    /// The local chain walk stopped at its bound.
    pub truncated: bool,
    /// Remote segments that were candidates (committed, not held locally).
    pub remote_segments: usize,
    /// Remote segments that could not be read, with why (a corrupt or
    /// missing object under a committed key is reported here, loudly, and
    /// never hides the other segments' entries).
    pub unreadable: Vec<(u64, String)>,
}

/// How a lookup reports a segment the manifest marks as damaged.
pub(crate) fn damage_text(d: &DamageNote) -> String {
    format!(
        "marked damaged in the manifest{}: {}",
        if d.lost {
            " (LOST: no intact copy was held)"
        } else {
            " (awaiting repair from a local copy)"
        },
        d.reason
    )
}

/// Open the store named by the config.
pub fn open_store(cfg: &Config) -> Result<RemoteStore> {
    RemoteStore::from_url(&cfg.store_url()?, &cfg.store_options())
}

impl TierIndex {
    /// Open (recovering whatever a crash left) and start the background
    /// worker on the current tokio runtime.
    pub async fn open(cfg: Config) -> Result<(TierIndex, OpenReport)> {
        let store = open_store(&cfg)?;
        Self::open_with_store(cfg, store).await
    }

    /// As [`open`](Self::open) with a store built by the caller (tests wrap
    /// stores in fault injectors).
    #[doc(hidden)]
    pub async fn open_with_store(
        cfg: Config,
        store: RemoteStore,
    ) -> Result<(TierIndex, OpenReport)> {
        Self::open_with_store_and_clock(cfg, store, Arc::new(SystemClock)).await
    }

    /// As [`open_with_store`](Self::open_with_store) with the clock the
    /// manifest lease is measured with (tests model a paused owner or clock
    /// skew with a `remote::lease::ManualClock`).
    #[doc(hidden)]
    pub async fn open_with_store_and_clock(
        cfg: Config,
        store: RemoteStore,
        clock: Arc<dyn Clock>,
    ) -> Result<(TierIndex, OpenReport)> {
        cfg.validate()?;
        // A bad part size for this store is a configuration error: refuse
        // to start rather than retry every upload until the deadline.
        cfg.upload_config().validate(&store)?;
        let (sh, report) = open_shared_with_clock(&cfg, store, clock).await?;
        let notify = Arc::new(Notify::new());
        // The writer's seal notifications wake the worker.
        {
            let n = notify.clone();
            let mut w = sh.writer.lock().unwrap_or_else(|p| p.into_inner());
            w.set_seal_notify(Arc::new(move || n.notify_one()));
        }
        // Learn whether creates are conditional in the background: start-up
        // must not wait on the store (uploads assume the worst until then).
        // With a manifest the probe already ran at open (it had to).
        let probe = (cfg.probe_store && sh.manifest.is_none()).then(|| {
            let sh = sh.clone();
            tokio::spawn(async move {
                if let Some(note) = sh.probe_store().await {
                    tracing::warn!("{note}");
                }
            })
        });
        let (stop, stop_rx) = watch::channel(false);
        let lease_task = sh
            .manifest
            .as_ref()
            .map(|m| tokio::spawn(lease_renewer(sh.clone(), m.ttl / 3, stop_rx.clone())));
        let reconcile_task = (cfg.reconcile_interval_ms > 0).then(|| {
            tokio::spawn(reconciler(
                sh.clone(),
                cfg.clone(),
                Duration::from_millis(cfg.reconcile_interval_ms),
                stop_rx.clone(),
            ))
        });
        let worker = tokio::spawn(worker(
            sh.clone(),
            probe,
            notify.clone(),
            stop_rx,
            Duration::from_millis(cfg.tick_ms.max(10)),
        ));
        let metrics_task = match &cfg.metrics_addr {
            Some(addr) => {
                let (bound, task) = crate::metrics::serve(addr, sh.metrics.clone())
                    .await
                    .map_err(|e| Error::InvalidInput(format!("metrics address {addr}: {e}")))?;
                tracing::info!(%bound, "serving metrics");
                Some(task)
            }
            None => None,
        };
        Ok((
            TierIndex {
                sh: Some(sh),
                data_dir: cfg.data_dir.clone(),
                cfg,
                stop,
                worker: Some(worker),
                notify,
                metrics_task,
                lease_task,
                reconcile_task,
                fetcher: std::sync::OnceLock::new(),
                manifest_reader: std::sync::OnceLock::new(),
                losses: report.segments.losses().into_iter().cloned().collect(),
            },
            report,
        ))
    }

    fn sh(&self) -> &Arc<Shared> {
        // Invariant: `sh` is only taken by `shutdown`, which consumes self.
        self.sh.as_ref().expect("TierIndex used after shutdown")
    }

    /// The writer, for the broker's calls (`append`, `flush`). A wait for
    /// the lock is counted and timed (`writer_lock_waits*` metrics); the
    /// uncontended path costs one `try_lock`.
    fn writer(&self) -> MutexGuard<'_, IndexWriter> {
        let sh = self.sh();
        match sh.writer.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                let t = std::time::Instant::now();
                let g = sh.writer.lock().unwrap_or_else(|p| p.into_inner());
                let us = t.elapsed().as_micros() as u64;
                sh.metrics.writer_lock_waits.inc();
                if us > 100 {
                    sh.metrics.writer_lock_waits_slow.inc();
                }
                sh.metrics.writer_lock_wait_max_us.raise_to(us);
                g
            }
        }
    }

    /// Append an entry. Durable after the next [`flush`](Self::flush).
    pub fn append(&self, key: &[u8], offset: u64, size: u32, timestamp_ms: u64) -> Result<()> {
        let mut w = self.writer();
        w.append(key, offset, size, timestamp_ms)?;
        // Counted under the writer lock, so a flush never sees more entries
        // flushed than appended.
        self.sh().metrics.entries_appended.inc();
        Ok(())
    }

    /// As [`append`](Self::append), with an entry whose key is already hashed.
    pub fn append_entry(&self, e: Entry) -> Result<()> {
        let mut w = self.writer();
        w.append_entry(e)?;
        self.sh().metrics.entries_appended.inc();
        Ok(())
    }

    /// The durability point: returns once every appended entry survives
    /// kill -9 and power loss.
    pub fn flush(&self) -> Result<()> {
        let mut w = self.writer();
        // Every entry appended so far (under this lock) is in this flush.
        let appended = self.sh().metrics.entries_appended.get();
        w.flush()?;
        self.sh().metrics.entries_flushed.raise_to(appended);
        Ok(())
    }

    /// Seal the active segment now (if it holds anything).
    pub fn roll(&self) -> Result<()> {
        self.writer().roll().map(|_| ())
    }

    /// Local lookup (active, sealing and sealed segments held locally).
    /// Items whose CRC fails are reported in [`Lookup::corrupt_items`] (and
    /// the `local_corrupt_items_total` metric), never silently skipped.
    pub fn lookup(&self, key: &[u8], range: TimeRange) -> Lookup {
        let l = self.writer().lookup(key, range);
        self.sh().metrics.local_corrupt_items.add(l.corrupt_items);
        l
    }

    /// Entries for `key` within `range` in local segments and in the
    /// committed remote segments whose local copy was released.
    ///
    /// The remote candidates are the manifest's list when `manifest = true`
    /// (only committed objects are read: a partial upload is never seen),
    /// else the journal's `Released` records (compaction drops those, so
    /// without the manifest older released segments are not found). Each
    /// candidate whose time range can match costs one range GET once its
    /// index is cached (`remote::fetch`).
    pub async fn lookup_remote(&self, key: &[u8], range: TimeRange) -> Result<RemoteLookup> {
        let h = crate::key_hash(key);
        let (local, held) = {
            let w = self.writer();
            (w.lookup_hash(h, range), w.sealed_ids())
        };
        let held: std::collections::BTreeSet<_> = held.into_iter().collect();
        let sh = self.sh().clone();
        // Candidates, plus (manifest) each one's entry and the segments the
        // manifest marks as damaged: those are reported, never read.
        let mut entries = std::collections::HashMap::new();
        let mut marked: Vec<(u64, String)> = Vec::new();
        let committed: Vec<RemoteSegment> = match &sh.manifest {
            Some(m) => {
                let owned = {
                    let g = m.writer.lock().await;
                    g.as_ref()
                        .map(|w| (w.store().clone(), w.manifest().clone()))
                };
                let (ms, manifest) = match owned {
                    Some(x) => x,
                    // Ownership still pending: read the manifest as any
                    // reader would (no probe needed to read).
                    None if m.pending_reason().is_some() => {
                        let ms = self.manifest_reader(&sh)?;
                        match ms.load().await? {
                            Some(man) => (ms, man),
                            None => (ms, crate::remote::manifest::Manifest::empty(&sh.stream)),
                        }
                    }
                    None => return Err(Error::ShutDown),
                };
                let mut v = Vec::new();
                for e in ms.all_segments(&manifest).await? {
                    if held.contains(&e.id) {
                        continue;
                    }
                    if let Some(d) = manifest.damage(e.id) {
                        marked.push((e.id.0, damage_text(d)));
                        continue;
                    }
                    v.push(RemoteSegment::from_entry(&e)?);
                    entries.insert(e.id, e);
                }
                v
            }
            None => {
                let j = sh.journal.read();
                j.segments()
                    .values()
                    .filter(|r| r.state == SegmentState::Released)
                    .map(|r| RemoteSegment {
                        key: match &r.key {
                            Some(k) => object_store::path::Path::from(k.as_str()),
                            None => sh.store.segment_key(&sh.stream, &r.meta),
                        },
                        meta: r.meta.clone(),
                    })
                    .collect()
            }
        };
        let remote: Vec<RemoteSegment> = committed
            .into_iter()
            .filter(|s| !held.contains(&s.meta.id))
            .collect();
        let fetcher = self.fetcher.get_or_init(|| {
            Fetcher::new(
                sh.store.clone(),
                sh.upload.retry_policy(),
                crate::remote::fetch::REMOTE_INDEX_CACHE_BYTES,
            )
        });
        let mut out = RemoteLookup {
            entries: Vec::new(),
            truncated: local.truncated,
            remote_segments: remote.len() + marked.len(),
            unreadable: Vec::new(),
        };
        for (id, why) in marked {
            sh.metrics.remote_unreadable.inc();
            out.unreadable.push((id, why));
        }
        for seg in &remote {
            let mut res = fetcher.lookup_in(seg, h, range).await;
            if let Err(e @ Error::Corrupt { .. }) = &res {
                // Bad bytes in a ranged read: the object's, or the read's?
                // A full read (CRC of the whole object) decides.
                match fetcher.confirm_damage(seg).await {
                    Ok(None) => {
                        tracing::warn!(segment = seg.meta.id.0, key = %seg.key, error = %e, "ranged read was bad but the object is whole; reading again");
                        res = fetcher.lookup_in(seg, h, range).await;
                    }
                    Ok(Some(why)) => {
                        let entry = entries.get(&seg.meta.id);
                        if let (Some(m), Some(entry)) = (&sh.manifest, entry) {
                            self.mark_damaged(m, entry, &why).await;
                        }
                        res = Err(Error::corrupt(seg.key.to_string(), why));
                    }
                    Err(c) => {
                        tracing::warn!(segment = seg.meta.id.0, error = %c, "could not confirm damage with a full read");
                    }
                }
            }
            match res {
                Ok(es) => out.entries.extend(es),
                Err(e) => {
                    tracing::error!(segment = seg.meta.id.0, key = %seg.key, error = %e, "remote segment unreadable");
                    sh.metrics.remote_unreadable.inc();
                    out.unreadable.push((seg.meta.id.0, e.to_string()));
                }
            }
        }
        out.entries.extend(local.entries);
        Ok(out)
    }

    /// A read-only view of the stream's manifest (cached, so its decoded
    /// chunks are reused across lookups).
    fn manifest_reader(&self, sh: &Shared) -> Result<ManifestStore> {
        if let Some(ms) = self.manifest_reader.get() {
            return Ok(ms.clone());
        }
        let ms = ManifestStore::reader(&sh.store, &sh.stream, self.cfg.manifest_options())?;
        Ok(self.manifest_reader.get_or_init(|| ms).clone())
    }

    /// Records confirmed damage of a committed segment in the manifest, so
    /// every reader skips it (and says why) until a repair re-uploads it.
    /// Lost unless an intact local copy is still on disk here. Failures
    /// (fenced, store down) are logged: the lookup still reports the
    /// segment as unreadable.
    async fn mark_damaged(
        &self,
        m: &crate::pipeline::ManifestHandle,
        entry: &SegmentEntry,
        why: &str,
    ) {
        let sh = self.sh();
        let local = sh
            .seg_dir
            .join(crate::segment::sealed::sealed_file_name(entry.id));
        let lost = !std::fs::read(&local).is_ok_and(|b| entry.matches_bytes(&b));
        let mut g = m.writer.lock().await;
        let Some(w) = g.as_mut() else {
            tracing::error!(
                segment = entry.id.0,
                reason = why,
                "committed segment is damaged; not marked in the manifest (ownership not taken)"
            );
            return;
        };
        let note = DamageNote::new(entry, why, lost, w.store().now_ms());
        if lost {
            tracing::error!(segment = entry.id.0, key = %entry.key, reason = why, "committed segment is damaged and no local copy is held: its entries are LOST unless a copy is found; marked in the manifest");
        } else {
            tracing::error!(segment = entry.id.0, key = %entry.key, reason = why, "committed segment is damaged; a local copy is held (tierindex reconcile --repair re-uploads it); marked in the manifest");
        }
        match w.mark_damaged(note).await {
            Ok(_) => sh.metrics.remote_damage_marked.inc(),
            Err(Error::Fenced(why)) => {
                let _ = sh.note_fenced(why);
            }
            Err(e) => {
                tracing::warn!(segment = entry.id.0, error = %e, "could not mark the damage in the manifest");
            }
        }
    }

    /// Per-state counts, pending work, and anything that needs an operator.
    pub fn status(&self) -> Status {
        let mut st = status_of(self.sh());
        let w = self.writer();
        st.active_segment = w.active_id().map(|i| i.0);
        st.active_items = w.active_len();
        st.unsealed_items = w.unsealed_items();
        st.poisoned = w.poisoned();
        drop(w);
        st.lost_items = self.losses.iter().map(|n| n.lost_items).sum();
        st.losses = self.losses.iter().map(|n| n.line()).collect();
        st.fenced = self.sh().fenced.get().cloned();
        st.manifest_pending = self.sh().manifest.as_ref().and_then(|m| m.pending_reason());
        st.store_probed = self.sh().probed.load(std::sync::atomic::Ordering::Acquire);
        st
    }

    /// Highest offset ever indexed here: local segments and every segment
    /// the journal knows (including released ones). A simulated broker
    /// continues after it.
    pub fn max_offset(&self) -> Option<u64> {
        // The journal's high-water mark covers segments released and
        // compacted away; the writer covers what is not sealed yet.
        let journaled = self.sh().journal.read().max_offset();
        journaled.max(self.writer().max_offset())
    }

    /// The metrics (also served at `metrics_addr` when set).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.sh().metrics.clone()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

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
        let drain = sched.drain(until).await;
        sh.metrics.last_drain_ms.set(drain.elapsed_ms);
        drop(sched);
        // The renewal task stops at the stop signal (a renewal in progress
        // finishes, within what is left of the deadline).
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
        let fenced = sh.fenced.get().cloned();
        if let Some(why) = &fenced {
            error.get_or_insert_with(|| {
                format!("fenced: {why}; this process stopped writing to the store")
            });
        }
        let mut report = ShutdownReport {
            sealed_at_shutdown,
            drain,
            clean_marker_written: false,
            error,
            fenced,
            elapsed_ms: 0,
            lost: std::mem::take(&mut self.losses),
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
                journal.close();
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

    /// The configuration it was opened with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
}

/// Open data directory, journal, writer; reconcile; no background tasks.
/// Shared by [`TierIndex`] and the standalone `drain`.
#[cfg(any(test, feature = "testing"))]
pub async fn open_shared(cfg: &Config, store: RemoteStore) -> Result<(Arc<Shared>, OpenReport)> {
    open_shared_with_clock(cfg, store, Arc::new(SystemClock)).await
}

/// Probe the store and take the stream's manifest for this owner.
/// Returns the writer and whether creates are conditional.
async fn take_manifest(
    cfg: &Config,
    store: &RemoteStore,
    clock: Arc<dyn Clock>,
) -> Result<(ManifestWriter, crate::pipeline::StoreTrust)> {
    let owner = cfg.effective_owner_id()?;
    let caps = if cfg.probe_store {
        let limit = Duration::from_millis(cfg.request_timeout_ms).max(Duration::from_secs(1)) * 2;
        match tokio::time::timeout(limit, crate::remote::probe::probe(store)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(Error::RemoteRetryable(format!(
                    "manifest = true needs the store capability probe, which failed: {e}"
                )));
            }
            Err(_) => {
                return Err(Error::RemoteRetryable(
                    "manifest = true needs the store capability probe, which timed out".into(),
                ));
            }
        }
    } else {
        // Not probed: assume the worst (creates not conditional), which
        // the manifest refuses unless allow_unconditional_store.
        tracing::warn!("probe_store = false: assuming the store ignores conditional creates");
        crate::remote::probe::Capabilities::default()
    };
    let ms =
        ManifestStore::with_capabilities(store, &cfg.stream, cfg.manifest_options(), &caps, clock)?;
    let writer = ms.take_ownership(&owner, cfg.lease_ttl()).await?;
    tracing::info!(
        owner,
        epoch = writer.epoch(),
        stream = cfg.stream,
        "took ownership of the stream's manifest"
    );
    Ok((writer, crate::pipeline::StoreTrust::of(&caps)))
}

/// [`RemoteStore::max_listed_segment_id`] above `known`, bounded like a
/// manifest request; a failure is logged and `known` kept.
pub(crate) async fn listed_max_segment_id(
    cfg: &Config,
    store: &RemoteStore,
    known: Option<crate::segment::SegmentId>,
) -> Option<crate::segment::SegmentId> {
    let limit = cfg
        .manifest_options()
        .retry
        .request_timeout
        .max(Duration::from_secs(1))
        * 3;
    match tokio::time::timeout(limit, store.max_listed_segment_id(&cfg.stream, known)).await {
        Ok(Ok(m)) => {
            if m > known {
                tracing::info!(
                    stream = cfg.stream,
                    listed = m.map_or(0, |m| m.0),
                    known = known.map_or(0, |m| m.0),
                    "the store holds segment objects above every id this data directory \
                     and the manifest know: new segment ids continue above them"
                );
            }
            m
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, stream = cfg.stream, "could not list the stream's segment objects at open: new segment ids continue above the journal's and the manifest's only");
            known
        }
        Err(_) => {
            tracing::warn!(
                stream = cfg.stream,
                "listing the stream's segment objects at open timed out: new segment ids continue above the journal's and the manifest's only"
            );
            known
        }
    }
}

/// Errors at open that mean "the store cannot be reached now" rather than
/// "this configuration or ownership is wrong": with these the index opens
/// without ownership and takes it later.
fn store_unreachable(e: &Error) -> bool {
    matches!(e, Error::RemoteRetryable(_) | Error::Deadline(_))
}

/// As [`open_shared`] with the clock of the manifest lease.
pub async fn open_shared_with_clock(
    cfg: &Config,
    store: RemoteStore,
    clock: Arc<dyn Clock>,
) -> Result<(Arc<Shared>, OpenReport)> {
    // Local recovery reads and checks files: on a blocking thread, never on
    // the caller's runtime thread (issue 16).
    let (dd, previous_shutdown_clean, journal, jrep) = {
        let (cfg, url) = (cfg.clone(), store.display_url().to_string());
        tokio::task::spawn_blocking(move || -> Result<(DataDir, bool, Journal, ReplayReport)> {
            let (dd, identity) = DataDir::open_as(
                &cfg.data_dir,
                &cfg.stream,
                &url,
                cfg.endpoint.as_deref(),
                Some(crate::identity::Mode::of(cfg.manifest)),
            )?;
            let marker = cfg.data_dir.join(CLEAN_SHUTDOWN_MARKER);
            let previous_shutdown_clean = marker.exists();
            if previous_shutdown_clean {
                std::fs::remove_file(&marker)
                    .map_err(|e| Error::io(&marker, "remove clean-shutdown marker", e))?;
                fsync_dir(&cfg.data_dir)?;
            }
            let (journal, jrep) = Journal::open(
                &cfg.data_dir,
                JournalOptions {
                    compact_after_bytes: cfg.journal_compact_after_bytes,
                    ..JournalOptions::default()
                },
            )?;
            // The recorded mode must match (or is recorded now): a data
            // directory that holds segments is not silently moved between
            // manifest and single-writer mode.
            // Whatever it ever held counts: compaction drops Released
            // records but keeps the highest id and offset.
            let holds_data = !journal.segments().is_empty()
                || journal.max_segment_id().is_some()
                || journal.max_offset().is_some()
                || dd.holds_segment_files()?;
            crate::identity::settle_mode(
                &cfg.data_dir,
                identity,
                cfg.manifest,
                cfg.switch_mode,
                holds_data,
            )?;
            Ok((dd, previous_shutdown_clean, journal, jrep))
        })
        .await
        .map_err(|e| Error::Internal(format!("open task failed: {e}")))??
    };
    // Only after the data directory is locked (`dd`): taking the stream
    // bumps the epoch, which fences whoever holds it (with the default owner
    // id, the previous incarnation of this data directory). Before the
    // writer opens: new segment ids continue above every id the manifest
    // lists, so a new owner on another data directory never reuses one.
    //
    // The store unreachable (down, timing out): open anyway, without
    // ownership. Appends, seals and uploads go on; the commit step (and the
    // lease task) take ownership once the store answers, and segments wait
    // at Verified, local files kept, until then. A live lease of another
    // owner (Claimed) or a store that cannot fence (no conditional creates)
    // still refuses the open: those need an operator, not patience.
    let (manifest, trust_create, probed) = if cfg.manifest {
        // Bounded: a store that hangs must not hold the broker's start
        // (with the defaults about 9 s: three manifest requests, each
        // bounded to fit the lease; then the take goes on in the background).
        let limit = cfg
            .manifest_options()
            .retry
            .request_timeout
            .max(Duration::from_secs(1))
            * 3;
        let taken =
            match tokio::time::timeout(limit, take_manifest(cfg, &store, clock.clone())).await {
                Ok(r) => r,
                Err(_) => Err(Error::Deadline(format!(
                    "taking ownership of the stream's manifest took longer than {} ms",
                    limit.as_millis()
                ))),
            };
        match taken {
            Ok((w, trust)) => (Some(ManifestHandle::new(w, cfg.lease_ttl())), trust, true),
            Err(e) if store_unreachable(&e) => {
                tracing::warn!(error = %e, "store unreachable at open: starting without manifest ownership; commits wait until it is taken");
                let (c, st, ck) = (cfg.clone(), store.clone(), clock.clone());
                let take = PendingTake {
                    take: Box::new(move || {
                        let (c, st, ck) = (c.clone(), st.clone(), ck.clone());
                        Box::pin(async move { take_manifest(&c, &st, ck).await })
                    }),
                    retry_at: std::time::Instant::now(),
                    failures: 0,
                    last_error: e.to_string(),
                };
                let owner = cfg.effective_owner_id()?;
                (
                    Some(ManifestHandle::pending(owner, cfg.lease_ttl(), take)),
                    crate::pipeline::StoreTrust::default(),
                    false,
                )
            }
            Err(e) => return Err(e),
        }
    } else {
        (None, crate::pipeline::StoreTrust::default(), false)
    };
    let manifest_max = match &manifest {
        Some(m) => m
            .writer
            .lock()
            .await
            .as_ref()
            .and_then(|w| w.manifest().max_segment_id()),
        None => None,
    };
    let known = journal.max_segment_id().max(manifest_max);
    // Objects above every id the journal and the manifest know: another
    // incarnation of the stream (a lost and re-created data directory, a
    // restored backup, an earlier owner) uploaded them and may not have
    // committed them. New ids continue above those too, so no id (and no
    // key) is ever reused. Skipped while the take is pending (the store did
    // not answer; the take lists when it succeeds, see
    // `Shared::ensure_owner`). Not in single-writer mode: there the
    // reconciler tells another data directory's objects from ours by their
    // ids (another seal of an id the journal knows, or an id it never
    // recorded), and jumping above them would make them look like ours
    // whose records compaction dropped.
    let take_pending = match &manifest {
        Some(m) => m.writer.lock().await.is_none(),
        None => false,
    };
    let listed_max = if take_pending || !cfg.manifest {
        known
    } else {
        listed_max_segment_id(cfg, &store, known).await
    };
    let epoch = match &manifest {
        Some(m) => m.writer.lock().await.as_ref().map(|w| w.epoch()),
        None => None,
    };
    let min_next = known
        .max(listed_max)
        .map(|m| crate::segment::SegmentId(m.0.saturating_add(1)))
        .max(epoch.map(crate::remote::manifest::epoch_id_floor));
    // Sealed files still to be uploaded (unknown to the journal, Sealed or
    // Uploading) get the full item check at start-up: damage is salvaged
    // before their bytes are journaled or uploaded.
    let index_cfg = cfg.index_config();
    let (writer, seg_report, journal, reseal_notes) = tokio::task::spawn_blocking(move || {
        let (mut writer, mut seg_report) = {
            let to_upload = |id: crate::segment::SegmentId| {
                journal.get(id).is_none_or(|r| {
                    matches!(
                        r.state,
                        SegmentState::Sealed | SegmentState::Uploading | SegmentState::Resealing
                    )
                })
            };
            IndexWriter::open_checking(dd, index_cfg, min_next, None, &to_upload)?
        };
        let mut journal = journal;
        readopt_salvaged(&mut writer, &mut journal, &mut seg_report)?;
        // Before anything is journaled or driven: every segment a cut
        // reseal copied into is still local here.
        let notes = crate::pipeline::reseal::finish_at_open(&mut writer, &mut journal)?;
        Ok::<_, Error>((writer, seg_report, journal, notes))
    })
    .await
    .map_err(|e| Error::Internal(format!("open task failed: {e}")))??;
    let metrics = Arc::new(Metrics::default());
    let sh = Arc::new(Shared {
        seg_dir: writer.segments_dir().to_path_buf(),
        writer: Arc::new(Mutex::new(writer)),
        journal: JournalHandle::start(journal)?,
        store,
        stream: cfg.stream.clone(),
        upload: cfg.upload_config(),
        trust_create: std::sync::atomic::AtomicBool::new(trust_create.conditional_create),
        trust_checksum: std::sync::atomic::AtomicBool::new(trust_create.checksums),
        trust_unsigned: std::sync::atomic::AtomicBool::new(trust_create.unsigned_payload),
        probed: std::sync::atomic::AtomicBool::new(probed),
        release_after_commit: cfg.release_after_commit,
        max_in_flight: cfg.max_uploads_in_flight,
        metrics,
        manifest,
        fenced: std::sync::OnceLock::new(),
    });
    // Seals finished during recovery are already among the writer's sealed
    // segments; journal every sealed file the journal lacks in one id-ordered
    // batch (the journal only accepts new ids in increasing order).
    sh.writer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .poll_sealed()?;
    let mut notes = reseal_notes;
    notes.extend(sh.reconcile_local().await?);
    for n in &notes {
        tracing::warn!("{n}");
    }
    sh.metrics.local_entries_lost.add(seg_report.lost_items());
    for n in seg_report.losses() {
        tracing::error!("entries lost to local damage: {}", n.line());
    }
    let report = OpenReport {
        previous_shutdown_clean,
        segments: seg_report,
        journal_records_replayed: jrep.records_replayed,
        journal_truncated_bytes: jrep.truncated_bytes,
        notes,
        store: sh.store.display_url().to_string(),
    };
    update_gauges(&sh);
    Ok((sh, report))
}

/// A sealed file salvaged at start-up whose segment the journal already
/// recorded (with the damaged file's length and CRC) cannot be uploaded
/// under that record, and the journal has no record that replaces a seal.
/// So its intact entries are appended again, to the active segment (they
/// are index entries: offset, size, time, key hash; which segment holds
/// them does not matter to a lookup), flushed, and only then is the old
/// segment journaled `Quarantined` and its salvaged file moved to
/// quarantine. A crash in between leaves the salvaged file in place and
/// the journal at `Sealed`: the drive then finds the mismatch and
/// quarantines it, and the entries are held twice, never zero times.
fn readopt_salvaged(
    writer: &mut IndexWriter,
    journal: &mut Journal,
    report: &mut RecoveryReport,
) -> Result<()> {
    for note in &mut report.salvaged {
        let id = crate::segment::SegmentId(note.segment);
        // A Resealing/Resealed segment's entries are copied (or were) by
        // `reseal::finish_at_open`, which skips the ones already held.
        let resealing = journal
            .get(id)
            .is_some_and(|r| matches!(r.state, SegmentState::Resealing | SegmentState::Resealed));
        if note.kind != "sealed"
            || note.sealed_as.is_none()
            || journal.get(id).is_none()
            || resealing
        {
            continue;
        }
        let Some(seg) = writer.sealed(id) else {
            continue;
        };
        let entries = seg.entries();
        drop(seg);
        for e in &entries {
            writer.append_entry(*e)?;
        }
        writer.flush()?;
        let reason = format!(
            "local sealed file damaged after it was journaled; {} intact entries appended again to the active segment; {}",
            entries.len(),
            note.line()
        );
        journal.append(&[crate::journal::Record::Quarantined {
            id,
            reason: reason.clone(),
        }])?;
        let moved = writer.quarantine_sealed(id, &reason)?;
        note.sealed_as = Some(format!(
            "entries appended again to active segment {} (salvaged file moved to {})",
            writer.active_id().map_or(0, |a| a.0),
            moved.map_or_else(|| "-".into(), |p| p.display().to_string())
        ));
        tracing::warn!(
            segment = id.0,
            entries = entries.len(),
            "salvaged entries of a journaled segment appended again"
        );
    }
    Ok(())
}

fn write_clean_marker(dir: &Path) -> Result<()> {
    let p = dir.join(CLEAN_SHUTDOWN_MARKER);
    std::fs::write(&p, format!("clean shutdown at {}\n", now_ms()))
        .map_err(|e| Error::io(&p, "write clean-shutdown marker", e))?;
    fsync_path(&p)?;
    fsync_dir(dir)
}

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

fn update_gauges(sh: &Shared) {
    let st = status_of(sh);
    sh.metrics.pending_segments.set(st.pending_segments);
    sh.metrics.pending_bytes.set(st.pending_bytes);
    sh.metrics
        .oldest_pending_age_ms
        .set(st.oldest_pending_age_ms.unwrap_or(0));
}

/// Renews the manifest lease every `every` until told to stop or fenced.
/// A failed renewal is retried at the next interval (the lease lasts three);
/// a fence is recorded in `Shared` by `renew_lease` and ends the task.
async fn lease_renewer(sh: Arc<Shared>, every: Duration, mut stop: watch::Receiver<bool>) {
    let every = every.max(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if *stop.borrow() {
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
async fn reconciler(
    sh: Arc<Shared>,
    cfg: Config,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let opts = crate::recovery::reconcile::ReconcileOptions {
        repair: cfg.reconcile_repair,
        deep: false,
        grace: Duration::from_millis(cfg.reconcile_grace_ms),
    };
    let access = crate::pipeline::InProcessManifest(sh.clone());
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if *stop.borrow() {
            return;
        }
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

/// The background capability probe, if still running.
type ProbeTask = tokio::task::JoinHandle<()>;

/// Background worker: journal new seals, roll aged segments, drive uploads.
/// Returns at once when told to stop, with its scheduler (in-flight drives
/// continue in the shutdown drain instead of starting over) and the probe
/// if it still runs: shutdown lets it finish its clean-up only after
/// sealing and draining, within what is left of the deadline. (Waiting for
/// it here once ate a 2 s deadline on a hanging store before the active
/// segment was sealed.)
async fn worker(
    sh: Arc<Shared>,
    probe: Option<ProbeTask>,
    notify: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    tick: Duration,
) -> (Scheduler, Option<ProbeTask>) {
    let mut sched = Scheduler::new(sh.clone());
    // Uploads wait a moment for the capability probe, so a store that
    // honours conditional creates is not read back needlessly. Seals are
    // journaled meanwhile, and appends never wait; a slow probe just keeps
    // the safe path.
    let uploads_from = Instant::now() + Duration::from_secs(2);
    let mut probe = probe;
    loop {
        if *stop.borrow() {
            return (sched, probe);
        }
        if let Err(e) = sh.ingest_sealed(true).await {
            tracing::error!(error = %e, "collecting sealed segments failed");
        }
        if probe.as_ref().is_some_and(|p| p.is_finished()) {
            probe = None;
        }
        let may_upload = probe.is_none() || Instant::now() >= uploads_from;
        if may_upload {
            sched.fill();
        }
        update_gauges(&sh);
        let mut wake = sched
            .next_retry()
            .unwrap_or_else(|| Instant::now() + tick)
            .min(Instant::now() + tick);
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

/// Dropping without [`TierIndex::shutdown`] is the crash path, not a
/// shutdown: the background tasks are aborted and not awaited (a `Drop`
/// cannot await), nothing is sealed or drained, and the data directory's
/// lock is held until the aborted tasks have let go of the writer (the
/// runtime drops an aborted task when it next gets to it; a blocking step
/// already running, such as a seal, finishes first). What `flush` acknowledged is
/// on disk either way; the next `open` recovers the rest. Call `shutdown`
/// to drain and to know the lock is free when it returns.
impl Drop for TierIndex {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(w) = self.worker.take() {
            w.abort();
        }
        if let Some(t) = self.metrics_task.take() {
            t.abort();
        }
        if let Some(t) = self.lease_task.take() {
            t.abort();
        }
        if let Some(t) = self.reconcile_task.take() {
            t.abort();
        }
    }
}
