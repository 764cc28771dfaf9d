//! The upload pipeline: from sealed segment to verified remote object.
//!
//! Pieces:
//! - [`committer`]: the journal with group commit (one fsync per batch).
//! - [`drive`]: one segment's journaled state machine (fresh or resumed).
//! - this module: what they share, start-up reconciliation of segment files
//!   with the journal, and [`Scheduler`], which runs drives with bounded
//!   concurrency, oldest segment first, backs off on retryable errors, and
//!   stops at a deadline (work left is already durable in the journal).
//!
//! Consistency: a segment's state only moves forward, and each move is
//! durable in the journal before the next action. Cancellation: a drive can
//! be dropped at any await; the journal then says exactly where it stopped
//! and the next drive resumes from there (see `drive` for each state).

pub mod committer;
pub mod drive;
mod group_commit;
pub mod reseal;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::index::IndexWriter;
use crate::journal::{Record, SegmentState};
use crate::metrics::Metrics;
use crate::remote::RemoteStore;
use crate::remote::manifest::{ManifestWriter, SegmentEntry};
use crate::segment::{SealedMeta, SegmentId};
use crate::upload::UploadConfig;

/// `Sealed` records per journal append (each is a few hundred bytes; the
/// journal refuses a frame above 16 MiB).
const SEALED_RECORDS_PER_BATCH: usize = 10_000;

pub use committer::JournalHandle;

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
}

/// The manifest writer shared by the drives and the lease renewal.
pub struct ManifestHandle {
    /// `None` while ownership is not taken yet (see `pending`) and once
    /// released at shutdown.
    pub writer: tokio::sync::Mutex<Option<ManifestWriter>>,
    /// Renews the writer's lease without its lock (renewals never wait
    /// behind a commit); set with the writer, cleared at release.
    keeper: std::sync::Mutex<Option<crate::remote::manifest::LeaseKeeper>>,
    pub ttl: Duration,
    pub owner: String,
    /// Set while ownership could not be taken yet: the store was unreachable
    /// when the index opened. The commit step and the lease task retry it;
    /// until then segments wait at `Verified` with their local files.
    pending: std::sync::Mutex<Option<PendingTake>>,
    /// Entries waiting for the writer's lock: whoever gets it commits every
    /// entry queued by then in one manifest version.
    group: group_commit::GroupCommit<SegmentEntry>,
}

/// A deferred `take_ownership`: the writer and whether creates are
/// conditional.
pub type TakeOwnership = Box<
    dyn Fn() -> futures::future::BoxFuture<'static, Result<(ManifestWriter, StoreTrust)>>
        + Send
        + Sync,
>;

/// How to take ownership later, and when to try next.
pub struct PendingTake {
    pub take: TakeOwnership,
    pub retry_at: std::time::Instant,
    pub failures: u32,
    pub last_error: String,
}

impl ManifestHandle {
    pub fn new(writer: ManifestWriter, ttl: Duration) -> ManifestHandle {
        ManifestHandle {
            owner: writer.owner().to_string(),
            keeper: std::sync::Mutex::new(Some(writer.lease_keeper())),
            writer: tokio::sync::Mutex::new(Some(writer)),
            ttl,
            pending: std::sync::Mutex::new(None),
            group: group_commit::GroupCommit::default(),
        }
    }

    /// Ownership not taken yet; `take` is tried again on demand.
    pub fn pending(owner: String, ttl: Duration, take: PendingTake) -> ManifestHandle {
        ManifestHandle {
            owner,
            writer: tokio::sync::Mutex::new(None),
            keeper: std::sync::Mutex::new(None),
            ttl,
            pending: std::sync::Mutex::new(Some(take)),
            group: group_commit::GroupCommit::default(),
        }
    }

    fn keeper(&self) -> Option<crate::remote::manifest::LeaseKeeper> {
        self.keeper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_keeper(&self, k: Option<crate::remote::manifest::LeaseKeeper>) {
        *self.keeper.lock().unwrap_or_else(|p| p.into_inner()) = k;
    }

    /// Why ownership is not taken yet, if it is not.
    pub fn pending_reason(&self) -> Option<String> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|p| p.last_error.clone())
    }
}

/// A manifest commit under the writer's lock, for [`group_commit`].
struct ManifestCommit<'s> {
    sh: &'s Shared,
    m: &'s ManifestHandle,
}

impl group_commit::Committer<Option<ManifestWriter>, SegmentEntry> for ManifestCommit<'_> {
    fn commit<'a>(
        &'a self,
        writer: &'a mut Option<ManifestWriter>,
        batch: &'a [SegmentEntry],
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        self.sh.commit_locked(self.m, writer, batch)
    }
}

impl Shared {
    /// `Error::Fenced` once this process lost the stream.
    pub fn check_fenced(&self) -> Result<()> {
        match self.fenced.get() {
            Some(why) => Err(Error::Fenced(why.clone())),
            None => Ok(()),
        }
    }

    /// Record a fence (the first reason wins) and return the error to pass on.
    pub fn note_fenced(&self, why: String) -> Error {
        if self.fenced.set(why.clone()).is_ok() {
            tracing::error!(reason = %why, "fenced: another owner took the stream; uploads stop");
        }
        Error::Fenced(self.fenced.get().cloned().unwrap_or(why))
    }

    /// Publish `entry` in the manifest (no-op without one). Already listed
    /// is success: a resume after a crash between this and the journal's
    /// `Committed` commits again and moves on. Entries of drives that reach
    /// this step while a commit is in progress go into the next version
    /// together (`group_commit`).
    pub async fn commit_to_manifest(&self, entry: SegmentEntry) -> Result<()> {
        let Some(m) = &self.manifest else {
            return Ok(());
        };
        self.check_fenced()?;
        m.group
            .commit(&m.writer, entry, &ManifestCommit { sh: self, m })
            .await
    }

    /// One manifest commit of `entries` under the writer's lock.
    async fn commit_locked(
        &self,
        m: &ManifestHandle,
        guard: &mut Option<ManifestWriter>,
        entries: &[SegmentEntry],
    ) -> Result<()> {
        self.check_fenced()?;
        self.ensure_owner(m, guard).await?;
        let Some(w) = guard.as_mut() else {
            return Err(Error::ShutDown);
        };
        match w.commit(entries).await {
            Ok(out) => {
                tracing::debug!(
                    first = entries.first().map(|e| e.id.0),
                    last = entries.last().map(|e| e.id.0),
                    n = entries.len(),
                    ?out,
                    "manifest commit"
                );
                Ok(())
            }
            Err(Error::Fenced(why)) => Err(self.note_fenced(why)),
            Err(e) => Err(e),
        }
    }

    /// Extend the lease (no-op without a manifest or once fenced). Once
    /// ownership is taken this never takes the manifest writer's lock: a
    /// renewal is its own small object (`LeaseKeeper`), so a slow commit
    /// cannot make the lease run out.
    pub async fn renew_lease(&self) -> Result<()> {
        let Some(m) = &self.manifest else {
            return Ok(());
        };
        self.check_fenced()?;
        let keeper = match m.keeper() {
            Some(k) => k,
            None => {
                // Not taken yet: try now (the lease task's tick), or nothing
                // to renew (released at shutdown).
                let mut guard = m.writer.lock().await;
                return self.ensure_owner(m, &mut guard).await;
            }
        };
        match keeper.renew(m.ttl).await {
            Ok(()) | Err(Error::ShutDown) => Ok(()),
            Err(Error::Fenced(why)) => Err(self.note_fenced(why)),
            Err(e) => Err(e),
        }
    }

    /// Give the stream up (shutdown with nothing pending). Best effort: a
    /// lease left behind only delays another owner until it expires.
    pub async fn release_lease(&self) -> Result<()> {
        let Some(m) = &self.manifest else {
            return Ok(());
        };
        self.check_fenced()?;
        m.set_keeper(None);
        let w = m.writer.lock().await.take();
        match w {
            Some(w) => w.release().await,
            None => Ok(()),
        }
    }

    /// Takes ownership now if it is still pending and its retry time has
    /// come. `Ok` with `guard` still `None` means released at shutdown.
    async fn ensure_owner(
        &self,
        m: &ManifestHandle,
        guard: &mut Option<ManifestWriter>,
    ) -> Result<()> {
        if guard.is_some() {
            return Ok(());
        }
        let attempt = {
            let p = m.pending.lock().unwrap_or_else(|p| p.into_inner());
            match p.as_ref() {
                None => return Ok(()),
                Some(p) if std::time::Instant::now() < p.retry_at => {
                    return Err(Error::RemoteRetryable(format!(
                        "manifest ownership not taken yet (next try in {} ms): {}",
                        p.retry_at
                            .saturating_duration_since(std::time::Instant::now())
                            .as_millis(),
                        p.last_error
                    )));
                }
                Some(p) => (p.take)(),
            }
        };
        // Bounded like the attempt at open: the manifest lock is held
        // meanwhile, and lookups and the lease task wait on it.
        let limit = self.upload.request_timeout.max(Duration::from_secs(1)) * 3;
        let attempt = match tokio::time::timeout(limit, attempt).await {
            Ok(r) => r,
            Err(_) => Err(Error::Deadline(format!(
                "taking ownership of the stream's manifest took longer than {} ms",
                limit.as_millis()
            ))),
        };
        match attempt {
            Ok((w, trust)) => {
                tracing::info!(
                    owner = m.owner,
                    epoch = w.epoch(),
                    "took ownership of the stream's manifest (it was pending since open)"
                );
                // Above the manifest's ids and any object listed above
                // them (another incarnation's uncommitted upload), as at
                // open (`tier::listed_max_segment_id`). A failed listing
                // keeps the manifest's (logged).
                let known = w.manifest().max_segment_id();
                let listed = match tokio::time::timeout(
                    limit,
                    self.store.max_listed_segment_id(&self.stream, known),
                )
                .await
                {
                    Ok(Ok(m)) => m,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "could not list the stream's segment objects: new ids continue above the manifest's only");
                        known
                    }
                    Err(_) => {
                        tracing::warn!(
                            "listing the stream's segment objects timed out: new ids continue above the manifest's only"
                        );
                        known
                    }
                };
                let next = known
                    .max(listed)
                    .map(|max| crate::segment::SegmentId(max.0.saturating_add(1)))
                    .max(Some(crate::remote::manifest::epoch_id_floor(w.epoch())));
                if let Some(next) = next {
                    let writer = self.writer.clone();
                    let raised = tokio::task::spawn_blocking(move || {
                        writer
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .raise_next_id(next)
                    })
                    .await
                    .map_err(|e| Error::Internal(format!("raise_next_id task failed: {e}")));
                    if let Err(e) = raised.and_then(|r| r) {
                        tracing::warn!(error = %e, "could not move segment ids above the manifest's");
                    }
                }
                self.trust(trust);
                m.set_keeper(Some(w.lease_keeper()));
                *guard = Some(w);
                *m.pending.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(())
            }
            Err(Error::Fenced(why)) => Err(self.note_fenced(why)),
            // Waiting cannot fix these (the store cannot fence writers, the
            // owner id or options are invalid): stop like a fenced owner,
            // loudly; nothing more goes to the store, local copies stay.
            Err(e @ (Error::Remote(_) | Error::InvalidInput(_) | Error::Unsupported(_))) => {
                *m.pending.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Err(self.note_fenced(format!(
                    "the stream's manifest cannot be taken by this process: {e}"
                )))
            }
            Err(e) => {
                let mut p = m.pending.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(p) = p.as_mut() {
                    p.failures = p.failures.saturating_add(1);
                    let backoff = crate::retry::exponential(
                        Duration::from_millis(250),
                        p.failures,
                        Duration::from_secs(30),
                    );
                    p.retry_at = std::time::Instant::now() + backoff;
                    p.last_error = e.to_string();
                }
                tracing::warn!(error = %e, "taking ownership of the stream's manifest failed; segments wait at Verified");
                Err(Error::RemoteRetryable(format!(
                    "manifest ownership not taken yet: {e}"
                )))
            }
        }
    }

    /// Runs `f` with the manifest writer as the current owner (taking a
    /// pending ownership first); a fence it meets is recorded. Returns the
    /// manifest version after `f`.
    async fn as_owner(
        &self,
        f: impl AsyncFnOnce(&mut ManifestWriter) -> Result<()>,
    ) -> Result<u64> {
        let Some(m) = &self.manifest else {
            return Err(Error::InvalidInput("manifest = false".into()));
        };
        self.check_fenced()?;
        let mut guard = m.writer.lock().await;
        self.ensure_owner(m, &mut guard).await?;
        let Some(w) = guard.as_mut() else {
            return Err(Error::ShutDown);
        };
        match f(w).await {
            Ok(()) => Ok(w.manifest().version),
            Err(Error::Fenced(why)) => Err(self.note_fenced(why)),
            Err(e) => Err(e),
        }
    }

    /// Clears and adds damage notes as the current owner (the background
    /// reconciler's repairs). Fenced or not owned: nothing written.
    pub async fn write_damage_notes(
        &self,
        clears: &[SegmentId],
        marks: &[crate::remote::manifest::DamageNote],
    ) -> Result<u64> {
        self.as_owner(async |w: &mut ManifestWriter| {
            crate::recovery::reconcile::apply_notes(w, clears, marks).await
        })
        .await
    }

    /// When the manifest lists `entry`'s id with other content: that entry
    /// and the current epoch's id floor (where the segment's entries go
    /// instead, see [`reseal`]). `None` when the id is free or holds
    /// exactly `entry`.
    pub async fn id_taken(
        &self,
        entry: &SegmentEntry,
    ) -> Result<Option<(SegmentEntry, SegmentId)>> {
        let mut out = None;
        self.as_owner(async |w: &mut ManifestWriter| {
            if let Some(other) = w.listed(entry.id).await?
                && other != *entry
            {
                out = Some((other, crate::remote::manifest::epoch_id_floor(w.epoch())));
            }
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Commits several entries in one manifest version as the current
    /// owner (the background reconciler's repairs).
    pub async fn commit_entries_to_manifest(&self, entries: &[SegmentEntry]) -> Result<u64> {
        self.as_owner(async |w: &mut ManifestWriter| w.commit(entries).await.map(|_| ()))
            .await
    }

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
        match tokio::time::timeout(limit, crate::remote::probe::probe(&self.store)).await {
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
            self.journal.append(batch).await?;
            self.metrics.segments_sealed.add(k as u64);
        }
        Ok(n)
    }

    /// Collect finished seals from the writer and journal them.
    pub async fn ingest_sealed(&self, tick: bool) -> Result<usize> {
        let writer = self.writer.clone();
        let metas = tokio::task::spawn_blocking(move || {
            let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
            if tick { w.tick() } else { w.poll_sealed() }
        })
        .await
        .map_err(|e| Error::Internal(format!("seal collection task failed: {e}")))??;
        self.record_sealed(metas).await
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
            for id in w.sealed_ids() {
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
        for (id, r) in self.journal.read().segments() {
            if r.state.is_pending()
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
            // Remembered so a drive that panics is still accounted for
            // (retried later), not left "in flight" forever.
            let task = self
                .tasks
                .spawn(async move { (id, drive::drive(&sh, id).await) });
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
                let backoff = crate::retry::exponential(
                    Duration::from_millis(100),
                    n,
                    Duration::from_secs(10),
                );
                let jitter =
                    Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
                if matches!(e, Error::Poisoned(_)) {
                    tracing::error!(segment = id.0, error = %e, "journal poisoned; uploads stop");
                } else if matches!(e, Error::Fenced(_)) {
                    tracing::error!(segment = id.0, error = %e, "fenced; uploads stop");
                } else {
                    tracing::warn!(segment = id.0, error = %e, retry_in_ms = (backoff + jitter).as_millis() as u64, "upload step failed; will retry");
                }
                self.sh.metrics.retries.inc();
                self.retry_at
                    .insert(id, (Instant::now() + backoff + jitter, n));
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
            deadline_hit,
            elapsed_ms: started.elapsed().as_millis() as u64,
        }
    }
}

/// The running process's manifest access for the background reconciler:
/// writes as the owner it already is (never takes ownership anew, which
/// would fence itself).
pub struct InProcessManifest(pub Arc<Shared>);

#[async_trait::async_trait]
impl crate::recovery::reconcile::ManifestAccess for InProcessManifest {
    async fn commit(&self, entries: &[SegmentEntry]) -> std::result::Result<String, String> {
        self.0
            .commit_entries_to_manifest(entries)
            .await
            .map(|v| {
                format!(
                    "committed {} entr(ies) as the running owner (manifest version {v})",
                    entries.len()
                )
            })
            .map_err(|e| format!("not repaired: {e}"))
    }
    async fn notes(
        &self,
        clears: &[SegmentId],
        marks: &[crate::remote::manifest::DamageNote],
    ) -> std::result::Result<String, String> {
        self.0
            .write_damage_notes(clears, marks)
            .await
            .map(|v| {
                format!(
                    "manifest notes: {} cleared, {} marked lost as the running owner (version {v})",
                    clears.len(),
                    marks.len()
                )
            })
            .map_err(|e| format!("manifest not updated: {e}"))
    }
}
