//! The upload pipeline: from sealed segment to verified remote object.
//!
//! Pieces:
//! - [`committer`]: the journal with group commit (one fsync per batch).
//! - [`drive`]: one segment's journaled state machine (fresh or resumed).
//! - `ownership`: the manifest writer the drives share, late ownership,
//!   lease renewal and release, fencing.
//! - `scheduler`: [`Scheduler`], which runs drives with bounded
//!   concurrency, oldest segment first, backs off on retryable errors, and
//!   stops at a deadline (work left is already durable in the journal).
//! - [`slots`]: the process's bound on uploads in flight over every
//!   stream, oldest data first.
//! - this module: what they share ([`Shared`]), the upload settings the
//!   probe raises, and start-up reconciliation of segment files with the
//!   journal.
//!
//! Consistency: a segment's state only moves forward, and each move is
//! durable in the journal before the next action. Cancellation: a drive can
//! be dropped at any await; the journal then says exactly where it stopped
//! and the next drive resumes from there (see `drive` for each state).

pub mod committer;
pub mod drive;
mod group_commit;
mod ownership;
pub mod reseal;
mod scheduler;
pub mod slots;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::index::IndexWriter;
use crate::journal::Record;
use crate::metrics::Metrics;
use crate::remote::RemoteStore;
use crate::segment::{SealedMeta, SegmentId};
use crate::upload::UploadConfig;

/// `Sealed` records per journal append (each is a few hundred bytes; the
/// journal refuses a frame above 16 MiB).
const SEALED_RECORDS_PER_BATCH: usize = 10_000;

pub use committer::JournalHandle;
pub use ownership::{InProcessManifest, ManifestHandle, PendingTake};
pub use scheduler::{DrainReport, PendingNote, Scheduler};

/// What the capability probe let the pipeline trust about its store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreTrust {
    /// `PutMode::Create` really refuses to overwrite.
    pub conditional_create: bool,
    /// The server validates and returns CRC-64/NVME checksums.
    pub checksums: bool,
    /// ... also when the body is left out of the signature, so segment
    /// bodies may go as `UNSIGNED-PAYLOAD` (see
    /// [`crate::remote::StoreOptions::sign_payload`]).
    pub unsigned_payload: bool,
}

impl StoreTrust {
    pub fn of(c: &crate::remote::probe::Capabilities) -> StoreTrust {
        StoreTrust {
            conditional_create: c.conditional_create,
            checksums: c.checksum_validated,
            unsigned_payload: c.checksum_validated && c.checksum.unsigned_payload_validated,
        }
    }
}

/// Everything a drive needs.
pub struct Shared {
    pub writer: Arc<Mutex<IndexWriter>>,
    /// The writer's local sealed segments (internally synchronized): read
    /// by lookups and the gauges without the writer's lock.
    pub sealed: Arc<crate::segment::local::LocalSealed>,
    /// The writer's seals, collected without its lock ([`Shared::tick_writer`]).
    pub(crate) handoff: Arc<crate::index::Handoff>,
    /// The writer's poison, set when the journal cannot record its seals.
    pub(crate) writer_poison: crate::index::PoisonHandle,
    pub journal: JournalHandle,
    pub store: RemoteStore,
    pub stream: String,
    pub upload: UploadConfig,
    /// Set once the capability probe proved that creates are conditional
    /// on this store; until then (and on stores like Garage) every upload is
    /// checked before and read back after, which is always safe.
    pub trust_create: std::sync::atomic::AtomicBool,
    /// Set once the probe proved the server validates and returns
    /// CRC-64/NVME checksums: only then is `VerifyLevel::Checksum` used.
    pub trust_checksum: std::sync::atomic::AtomicBool,
    /// Set once the probe proved the same with unsigned-payload bodies.
    pub trust_unsigned: std::sync::atomic::AtomicBool,
    /// Set once the probe answered (whatever it proved).
    pub probed: std::sync::atomic::AtomicBool,
    pub seg_dir: PathBuf,
    pub release_after_commit: bool,
    pub max_in_flight: usize,
    pub metrics: Arc<Metrics>,
    /// The stream's manifest writer when `manifest = true` (see
    /// [`ManifestHandle`]); `None`: the journal alone records commits.
    pub manifest: Option<ManifestHandle>,
    /// Set once the manifest said another owner took the stream: from then
    /// on this process writes nothing more to the store (no uploads, no
    /// manifest versions) and releases no local copies.
    pub fenced: OnceLock<String>,
    /// Segments this process journaled `Verified` (or proved again in this
    /// store). A `Verified` record found at start-up may have been proven
    /// in another store (the store was changed with `--store-override`, to
    /// another bucket, endpoint or directory where the keys look the same),
    /// so it is proven here before it is committed.
    pub verified_here: Mutex<std::collections::HashSet<SegmentId>>,
}

impl Shared {
    /// The upload settings in force now (the probe may have answered).
    pub fn upload_config(&self) -> UploadConfig {
        use std::sync::atomic::Ordering::Acquire;
        UploadConfig {
            trust_conditional_create: self.trust_create.load(Acquire),
            checksum_proven: self.trust_checksum.load(Acquire),
            unsigned_payload: self.trust_unsigned.load(Acquire),
            ..self.upload.clone()
        }
    }

    /// Records what the probe proved (only ever raises trust).
    pub fn trust(&self, t: StoreTrust) {
        use std::sync::atomic::Ordering::Release;
        if t.conditional_create {
            self.trust_create.store(true, Release);
        }
        if t.checksums {
            self.trust_checksum.store(true, Release);
        }
        if t.unsigned_payload {
            self.trust_unsigned.store(true, Release);
        }
        self.probed.store(true, Release);
    }

    /// Probe the store and record whether creates are conditional; returns
    /// a note for the operator when they are not (or the probe failed).
    pub async fn probe_store(&self) -> Option<String> {
        let limit = self
            .upload
            .request_timeout
            .max(std::time::Duration::from_secs(1))
            * 2;
        match tokio::time::timeout(limit, crate::remote::probe::probe_shared(&self.store)).await {
            Ok(Ok(c)) => {
                self.trust(StoreTrust::of(&c));
                tracing::info!(
                    conditional_create = c.conditional_create,
                    checksums = c.checksum_validated,
                    unsigned_payload = c.checksum.unsigned_payload_validated,
                    "store capability probe: uploads are verified by {}",
                    if c.checksum_validated {
                        "the server's CRC-64/NVME (HEAD, checksum mode)"
                    } else {
                        "reading them back in full"
                    }
                );
                (!c.conditional_create).then(|| {
                    "store ignores conditional creates (If-None-Match): every upload's body is proven before it counts".to_string()
                })
            }
            Ok(Err(e)) => Some(format!(
                "store capability probe failed ({e}); assuming no conditional writes"
            )),
            Err(_) => {
                Some("store capability probe timed out; assuming no conditional writes".into())
            }
        }
    }

    /// Up to `max` segments that still need work and are not `skip`ped,
    /// oldest first. Walks the journal's index of unfinished segments, so
    /// the cost is the segments looked at, not the segments journaled.
    pub fn next_work(&self, max: usize, skip: impl Fn(SegmentId) -> bool) -> Vec<SegmentId> {
        if max == 0 {
            return Vec::new();
        }
        self.journal
            .read()
            .unfinished_ids(self.release_after_commit)
            .filter(|id| !skip(*id))
            .take(max)
            .collect()
    }

    /// Journal newly sealed segments (those the journal does not hold
    /// yet), in id order, in group commits of at most
    /// [`SEALED_RECORDS_PER_BATCH`]; returns how many were new.
    pub async fn record_sealed(&self, metas: Vec<SealedMeta>) -> Result<usize> {
        let known: BTreeSet<SegmentId> = {
            let j = self.journal.read();
            metas
                .iter()
                .filter(|m| j.get(m.id).is_some())
                .map(|m| m.id)
                .collect()
        };
        let mut recs: Vec<Record> = metas
            .into_iter()
            .filter(|m| !known.contains(&m.id))
            .map(|meta| Record::Sealed { meta })
            .collect();
        recs.sort_by_key(|r| r.id());
        let n = recs.len();
        // Each `Sealed` record stands alone, so a large set (a restart that
        // finds tens of thousands of unjournaled files) goes in batches that
        // stay well inside the journal's frame limit.
        while !recs.is_empty() {
            let rest = recs.split_off(recs.len().min(SEALED_RECORDS_PER_BATCH));
            let batch = std::mem::replace(&mut recs, rest);
            let k = batch.len();
            if let Err(e) = self.journal.append(batch).await {
                // Nothing the writer seals from now on could be journaled or
                // uploaded: it stops acknowledging appends, as after its own
                // failed sync.
                self.writer_poison.set(format!(
                    "the journal cannot record sealed segments ({}); appends stop here: \
                     restart once the cause is fixed (the sealed files are journaled at the \
                     next start; if the journal itself is gone, `tierindex fsck` says what to \
                     do)",
                    e.reason()
                ));
                return Err(e);
            }
            self.metrics.segments_sealed.add(k as u64);
        }
        Ok(n)
    }

    /// The worker's turn with the writer: `tick` it (age roll, collect
    /// finished seals) off the runtime's threads, journal what sealed, and
    /// say when the age rule next needs a tick: the active segment's
    /// deadline in ms since the epoch, `None` while it is empty (the first
    /// append wakes the worker) or no age is set. The deadline is returned
    /// whatever the journaling did.
    ///
    /// Without `with_writer`, the writer's lock is not taken: only what the
    /// seals handed over is collected and journaled (their metadata, and
    /// the frozen segments the writer retired, dropped on the sealer
    /// thread), and the deadline is not known (`None`). For the worker
    /// while appends go on: the appender takes finished seals itself at
    /// its next roll.
    /// The count: segments newly journaled.
    pub async fn tick_writer(&self, with_writer: bool) -> (Option<u64>, Result<usize>) {
        if !with_writer {
            self.handoff.take_retired().run();
            let metas = self.handoff.take_metas();
            return (None, self.record_sealed(metas).await);
        }
        let writer = self.writer.clone();
        let ticked = tokio::task::spawn_blocking(move || {
            let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
            let metas = w.tick();
            let due = w.age_deadline_ms();
            // The finished seals' frozen segments go to the sealer thread
            // after the lock is let go: queuing them under it made appends
            // wait (see `IndexWriter::take_retired`).
            let retired = w.take_retired();
            drop(w);
            retired.run();
            (metas, due)
        })
        .await;
        match ticked {
            Ok((Ok(metas), due)) => (due, self.record_sealed(metas).await),
            Ok((Err(e), due)) => (due, Err(e)),
            Err(e) => (
                None,
                Err(Error::Internal(format!("seal collection task failed: {e}"))),
            ),
        }
    }

    /// Start-up: every local sealed file of a `Committed` segment against
    /// the journal's record of it (its footer as start-up read it: no I/O).
    /// One that differs is not the committed segment: a second process
    /// sealed other entries under the id (a copy of the data directory, a
    /// host's stream opened beside its host). It may hold entries the store
    /// does not, so it is moved to quarantine with the reason, never served
    /// as the segment, released or deleted. Returns a note for each.
    pub async fn check_committed_local(&self) -> Result<Vec<String>> {
        let differ: Vec<(SegmentId, String)> = {
            let j = self.journal.read();
            j.segments()
                .iter()
                .filter(|(_, r)| r.state == crate::journal::SegmentState::Committed)
                .filter_map(|(id, r)| {
                    self.sealed
                        .differs_from(*id, &r.meta, false)
                        .map(|d| (*id, d))
                })
                .collect()
        };
        let mut notes = Vec::new();
        for (id, diff) in differ {
            notes.push(self.set_aside_not_committed(id, &diff).await?);
        }
        Ok(notes)
    }

    /// Move the local sealed file of committed segment `id`, which differs
    /// from the journal's record (`diff`), to quarantine with the reason,
    /// logged as an error; returns the reason and where it went.
    pub(crate) async fn set_aside_not_committed(&self, id: SegmentId, diff: &str) -> Result<String> {
        let reason = format!(
            "local sealed file of committed segment {id} is not the one committed ({diff}): \
             it may hold entries the store does not. Kept in quarantine for an operator: \
             look them up with `tierindex inspect` and append what is missing again"
        );
        tracing::error!(segment = id.0, "{reason}");
        let writer = self.writer.clone();
        let why = reason.clone();
        let moved = tokio::task::spawn_blocking(move || {
            writer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .quarantine_sealed(id, &why)
        })
        .await
        .map_err(|e| Error::Internal(format!("quarantine task failed: {e}")))??;
        Ok(match moved {
            Some(to) => format!("{reason}; moved to {}", to.display()),
            None => reason,
        })
    }

    /// Local sealed files the journal has no record of, at or below its
    /// highest id: it can never record them (`NOT JOURNALED`).
    pub fn unjournaled_below_max(&self) -> Vec<SegmentId> {
        let j = self.journal.read();
        let max = j.max_segment_id();
        self.sealed
            .ids()
            .into_iter()
            .filter(|id| max.is_some_and(|m| *id <= m) && j.get(*id).is_none())
            .collect()
    }

    /// Start-up: journal every local sealed file the journal does not know
    /// (a crash between seal and journal append). Returns notes for files
    /// that cannot be recorded.
    pub async fn reconcile_local(&self) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        let (local, max_id) = {
            let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let j = self.journal.read();
            let mut ids: Vec<(SegmentId, SealedMeta)> = Vec::new();
            // Every sealed file in the set, a frozen one's included: its
            // seal finished (the sealer put it in the set and its metadata
            // in the handoff, which the open's `poll_sealed` may already
            // have emptied) though the writer has not retired it yet. The
            // sealer seals in id order, so no lower id is still on its way.
            for id in self.sealed.ids() {
                if j.get(id).is_none()
                    && let Some(meta) = w.sealed_meta(id)?
                {
                    ids.push((id, meta));
                }
            }
            (ids, j.max_segment_id())
        };
        let mut metas = Vec::new();
        for (id, meta) in local {
            if max_id.is_some_and(|m| id <= m) {
                notes.push(format!(
                    "segment {id} has a sealed file but no journal record, and the journal already moved past it; left in place for an operator"
                ));
            } else {
                metas.push(meta);
            }
        }
        self.record_sealed(metas).await?;
        // Journal records whose local file is gone are handled by `drive`
        // (proved from the store, or quarantined with the reason); say so.
        // A file in the local set was listed and checked by this start-up
        // moments ago: only the others are looked up (a stat per pending
        // segment was a tenth of the open of a 1,000,000-segment backlog).
        for (id, r) in self.journal.read().segments() {
            if r.state.is_pending()
                && !self.sealed.contains(*id)
                && !self
                    .seg_dir
                    .join(crate::segment::sealed::sealed_file_name(*id))
                    .exists()
            {
                notes.push(format!(
                    "segment {id} is {:?} in the journal but its local file is missing",
                    r.state
                ));
            }
        }
        Ok(notes)
    }
}

