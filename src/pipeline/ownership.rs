//! Ownership of the stream as the pipeline sees it: the shared manifest
//! writer ([`ManifestHandle`]), taking ownership late when the store was
//! unreachable at open ([`PendingTake`]), group commits of manifest
//! entries, the lease's renewal and release, fencing, and the running
//! owner's manifest access for the background reconciler
//! ([`InProcessManifest`]).

use std::sync::Arc;
use std::time::Duration;

use super::{Shared, StoreTrust, group_commit};
use crate::error::{Error, Result};
use crate::remote::manifest::{ManifestWriter, SegmentEntry};
use crate::retry::Backoff;
use crate::segment::SegmentId;

/// A late ownership take that failed retryably waits this schedule (step =
/// its consecutive failures); the jitter keeps brokers that failed together
/// from retrying in step.
const TAKE_BACKOFF: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));

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
/// Called with the data directory's journal, read during the take.
pub type TakeOwnership = Box<
    dyn Fn(
            super::JournalHandle,
        ) -> futures::future::BoxFuture<'static, Result<(ManifestWriter, StoreTrust)>>
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

    /// Releases ownership now, when held (an open refused after its take):
    /// whether there was one to release.
    pub async fn release_now(&self) -> Result<bool> {
        self.set_keeper(None);
        let w = self.writer.lock().await.take();
        match w {
            Some(w) => w.release().await.map(|()| true),
            None => Ok(false),
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
        // Not ours any more: off the host lease's list.
        self.leave_host_lease();
        if self.fenced.set(why.clone()).is_ok() {
            tracing::error!(reason = %why, "fenced: this process may not write the stream (another owner took it, or the take was refused: see reason); uploads stop");
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

    /// Whether a host lease renews this stream's lease (its own renewal
    /// naming the host landed): the lease task has nothing to do.
    pub fn lease_hosted(&self) -> bool {
        self.manifest
            .as_ref()
            .and_then(|m| m.keeper())
            .is_some_and(|k| k.is_hosted())
    }

    /// Resolves when the host lease renewing this stream's stops running;
    /// `None`: not hosted.
    pub fn host_lease_ended(&self) -> Option<impl Future<Output = ()> + Send + use<>> {
        self.manifest
            .as_ref()
            .and_then(|m| m.keeper())
            .and_then(|k| k.host_ended())
    }

    /// Changes each time this stream's host lease was renewed again after
    /// a gap in which it may have looked expired. `None`: not hosted.
    pub fn host_lease_lapses(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.manifest
            .as_ref()
            .and_then(|m| m.keeper())
            .and_then(|k| k.host_lapses())
    }

    /// Whether another owner took the stream (one listing of the store):
    /// then fenced, here and now, not at the next commit. No-op without a
    /// manifest or before the take.
    pub async fn check_taken(&self) -> Result<()> {
        let Some(m) = &self.manifest else {
            return Ok(());
        };
        self.check_fenced()?;
        let Some(keeper) = m.keeper() else {
            return Ok(());
        };
        match keeper.check_taken().await {
            Err(Error::Fenced(why)) => Err(self.note_fenced(why)),
            r => r,
        }
    }

    /// Takes the stream off its host lease's list, if it is on one: the
    /// host renews its lease no more.
    pub fn leave_host_lease(&self) {
        if let Some(k) = self.manifest.as_ref().and_then(|m| m.keeper()) {
            k.leave_host();
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
                Some(p) => (p.take)(self.journal.clone()),
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
            // A newer owner, or the take refused beside a single-writer
            // broker (`tier::open::take_manifest`): not retried.
            Err(Error::Fenced(why)) => {
                *m.pending.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Err(self.note_fenced(why))
            }
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
                    p.retry_at = std::time::Instant::now()
                        + TAKE_BACKOFF.at_least_step(p.failures, &mut fastrand::Rng::new());
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

    /// The journal's segments in `states` that the manifest, as this owner
    /// last saw it, does not list as they are: with the entry it lists
    /// under their id instead (another segment: other bytes), or `None`
    /// (not listed at all). Not owner (ownership still pending), or no
    /// manifest: none checked.
    async fn listed_otherwise(
        &self,
        states: &[crate::journal::SegmentState],
    ) -> Result<Vec<(crate::segment::SealedMeta, Option<SegmentEntry>)>> {
        let Some(m) = &self.manifest else {
            return Ok(Vec::new());
        };
        let ours: Vec<crate::segment::SealedMeta> = self
            .journal
            .read()
            .segments()
            .values()
            .filter(|r| states.contains(&r.state))
            .map(|r| r.meta.clone())
            .collect();
        let mut guard = m.writer.lock().await;
        let Some(w) = guard.as_mut() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for meta in ours {
            let listed = w.listed(meta.id).await?;
            if listed.as_ref().is_none_or(|e| e.key_sum() != meta.key_sum()) {
                out.push((meta, listed));
            }
        }
        Ok(out)
    }

    /// The damage notes of the manifest as this owner last saw it (none
    /// while ownership is not taken).
    pub async fn damage_notes(&self) -> Vec<crate::remote::manifest::DamageNote> {
        let Some(m) = &self.manifest else {
            return Vec::new();
        };
        let guard = m.writer.lock().await;
        guard
            .as_ref()
            .map_or_else(Vec::new, |w| w.manifest().damaged.clone())
    }

    /// Segments the journal records as committed (`Committed`,
    /// `Released`) that the manifest, as this owner last saw it, does not
    /// list: not under their id, or another segment (other bytes: another
    /// data directory's that reused the id) under it. Not owner (ownership
    /// still pending): none checked.
    pub async fn unlisted_committed(&self) -> Result<Vec<u64>> {
        use crate::journal::SegmentState as S;
        Ok(self
            .listed_otherwise(&[S::Committed, S::Released])
            .await?
            .into_iter()
            .map(|(meta, _)| meta.id.0)
            .collect())
    }

    /// Committed segments whose id the manifest lists with other bytes
    /// (another data directory sealed and committed that id: a copy of
    /// this one run beside it in single-writer mode, then switched to the
    /// manifest) and whose intact local copy is held: journaled
    /// `Quarantined` then `Requeued` (back to `Sealed`), so the upload
    /// pipeline takes them up again and, finding the id taken at commit,
    /// reseals their entries under a new id (as for ids chosen before
    /// ownership). Those without a local copy (`Released`) are left to the
    /// drain's check, which reports them. Returns the requeued ids. Not
    /// owner: none.
    pub async fn requeue_id_conflicts(&self) -> Result<Vec<u64>> {
        let conflicts = self
            .listed_otherwise(&[crate::journal::SegmentState::Committed])
            .await?
            .into_iter()
            .filter_map(|(meta, listed)| listed.map(|e| (meta.id, meta, e.key)));
        let mut out = Vec::new();
        for (id, meta, other) in conflicts {
            let held = self.sealed.meta(id).ok().flatten().is_some_and(|l| {
                l.key_sum() == meta.key_sum() && l.file_len == meta.file_len
            });
            if !held {
                continue;
            }
            let reason = format!(
                "the stream's manifest lists another segment under id {id} ({other}): another \
                 data directory sealed and committed this id (a copy of this one, run beside \
                 it in single-writer mode?); this segment's entries are resealed under a new id"
            );
            tracing::error!(segment = id.0, "{reason}");
            super::drive::requeue(self, id, reason).await?;
            out.push(id.0);
        }
        Ok(out)
    }

    /// Whether the local sealed file of `id` is a committed segment's copy
    /// the store holds: listed in the manifest with its checksum, or (no
    /// manifest) its object under its key at its length. Any doubt (no
    /// answer, not owner, no such file): `false`.
    pub async fn committed_elsewhere(&self, id: SegmentId) -> bool {
        let Ok(Some(meta)) = self.sealed.meta(id) else {
            return false;
        };
        if self.manifest.is_some() {
            return matches!(
                self.manifest_entry(id).await,
                Ok(Some(e)) if e.key_sum() == meta.key_sum() && e.file_len == meta.file_len
            );
        }
        let key = self.store.segment_key(&self.stream, &meta);
        matches!(
            object_store::ObjectStoreExt::head(self.store.object_store().as_ref(), &key).await,
            Ok(m) if m.size == meta.file_len
        )
    }

    /// [`committed_elsewhere`](Self::committed_elsewhere) with doubt kept
    /// apart: `Some(true)` the store holds it, `Some(false)` it was asked
    /// and does not (the manifest lists no such entry, or the object under
    /// its key is missing or of another length), `None` no answer (not
    /// owner, fenced, an error). For a repair that acts on "not held".
    pub async fn committed_elsewhere_known(&self, id: SegmentId) -> Option<bool> {
        let meta = self.sealed.meta(id).ok().flatten()?;
        if self.manifest.is_some() {
            return match self.manifest_entry(id).await {
                Ok(Some(e)) => Some(e.key_sum() == meta.key_sum() && e.file_len == meta.file_len),
                Ok(None) => Some(false),
                Err(_) => None,
            };
        }
        let key = self.store.segment_key(&self.stream, &meta);
        match object_store::ObjectStoreExt::head(self.store.object_store().as_ref(), &key).await {
            Ok(m) => Some(m.size == meta.file_len),
            Err(object_store::Error::NotFound { .. }) => Some(false),
            Err(_) => None,
        }
    }

    /// The entry the manifest lists under `id` (as this owner last saw
    /// it), read as the current owner. Not owned or fenced: an error.
    pub async fn manifest_entry(&self, id: SegmentId) -> Result<Option<SegmentEntry>> {
        let mut out = None;
        self.as_owner(async |w: &mut ManifestWriter| {
            out = w.listed(id).await?;
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
