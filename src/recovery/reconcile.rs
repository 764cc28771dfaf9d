//! The reconciler: three views of one stream compared, every disagreement
//! reported, and (with `repair`) the safe ones repaired.
//!
//! The views:
//! - the local journal, read-only ([`Journal::open_read_only`]);
//! - the remote manifest, when one exists (read without a probe; a repair
//!   write goes through [`ManifestStore::open`], which probes and refuses a
//!   store without conditional creates unless the config allows it);
//! - a LIST of `{prefix}/{stream}/segments/`.
//!
//! ## Rules (also in `docs/format/remote-layout.md`)
//! 1. A journal segment at `Verified`/`Committed`/`Released` whose object is
//!    missing, has another size than the recorded `file_len`, or (`deep`)
//!    fails a full read-back CRC check: re-uploaded from the local sealed
//!    file when that file still has the recorded length and CRC (a wrong
//!    object under the key is deleted first: the key names the CRC of the
//!    only bytes that belong there). Without such a local copy it is LOST;
//!    nothing is deleted to get past it.
//! 2. With a manifest: a journal `Committed`/`Released` segment the manifest
//!    lacks is committed (when `cfg.manifest`, and only when its object is
//!    in place); a manifest entry whose object is not listed is repaired as
//!    in 1 when the journal holds its local copy, else LOST.
//! 3. No manifest, segment objects listed and `cfg.manifest`: the manifest
//!    is rebuilt from the listing, each object's footer (ranged GET of the
//!    last [`FOOTER_LEN`] bytes) checked against its key and size. Objects
//!    the journal knows as not committed (pending, quarantined, or another
//!    CRC for the id) are left out.
//!
//!    Manifest writes (2 and 3) take ownership as the config's owner; a
//!    live lease of another owner stops the repair (`Claimed`): the
//!    reconciler never fences a live broker. A repair run also holds the
//!    data directory's lock, so this data directory's own broker is down.
//! 4. Objects that parse as this stream's segment keys but that neither the
//!    journal nor the manifest references are reported and kept. The one
//!    deletion is an object this data directory provably wrote for a
//!    segment it set aside: every proof in [`judge_unreferenced`] holds
//!    (manifest on and silent about the id, journal `Quarantined` under
//!    exactly that key and checksum, older than the grace period, bytes
//!    equal to the intact local copy). Without a manifest, an unreferenced
//!    id at or below the journal's highest id may be a `Released` segment
//!    whose record compaction dropped: kept. Anything under the prefix that
//!    does not parse is foreign and never deleted.
//! 5. Incomplete multipart uploads under the segments prefix
//!    ([`RemoteStore::list_multipart_uploads`]: S3 ListMultipartUploads, the
//!    `file://` staging directory) initiated longer ago than the grace
//!    period are stale, even when the journal names one as its segment's
//!    current attempt (the grace period is what protects an upload in
//!    flight). Ours by key layout are aborted; a foreign key's upload is
//!    reported, never aborted. A backend that cannot list (`memory://`)
//!    is reported as not checked ([`MULTIPART_NOT_CHECKED`]), a server that
//!    answers NotImplemented as "not supported by this server".

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path as FsPath;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt};
use serde::Serialize;

use crate::config::Config;
use crate::datadir::{self, DataDir};
use crate::error::{Error, Result};
use crate::journal::{self, Journal, JournalView, SegmentRecord, SegmentState};
use crate::remote::fetch::{Fetcher, RemoteSegment};
use crate::remote::manifest::{
    CommitOutcome, DamageNote, ManifestStore, ManifestWriter, SegmentEntry,
};
use crate::remote::{MultipartListing, PendingUpload, RemoteStore, classify, keys};
use crate::segment::format::{self, FOOTER_LEN, Footer};
use crate::segment::sealed::sealed_file_name;
use crate::segment::{KeySum, SealedMeta, SegmentId};
use crate::upload::retry::with_retries;
use crate::upload::{self, NoHooks, VerifyLevel};

mod manifest_writes;
mod multipart;
mod orphans;
mod repair;
mod report;

use manifest_writes::*;
pub(crate) use manifest_writes::apply_notes;
use multipart::*;
use orphans::*;
use repair::*;
pub use report::*;

/// One listed object that parses as this stream's segment key.
#[derive(Clone, Debug)]
struct Listed {
    key: Path,
    id: SegmentId,
    /// The whole-file checksum the key names.
    sum: KeySum,
    size: u64,
    modified_ms: u64,
}

fn require_journal(cfg: &Config) -> Result<()> {
    let log = journal::log_path(&cfg.data_dir);
    if !log.exists() {
        return Err(Error::InvalidInput(format!(
            "no journal at {}: not a data directory",
            log.display()
        )));
    }
    Ok(())
}

/// How a repair writes the manifest. The returned text is the finding's
/// action; `Err` when nothing was written.
#[async_trait::async_trait]
pub trait ManifestAccess: Send + Sync {
    /// Commit `entries` (already listed ones are fine).
    async fn commit(&self, entries: &[SegmentEntry]) -> std::result::Result<String, String>;
    /// Clear the damage notes of `clears`, then add `marks`.
    async fn notes(
        &self,
        clears: &[SegmentId],
        marks: &[DamageNote],
    ) -> std::result::Result<String, String>;
}

/// The standalone tool's access: take ownership as the config's owner for
/// each write (refused while another owner's lease is live: the reconciler
/// never fences a live broker), then release.
struct TakeAndRelease<'a> {
    store: &'a RemoteStore,
    cfg: &'a Config,
}

#[async_trait::async_trait]
impl ManifestAccess for TakeAndRelease<'_> {
    async fn commit(&self, entries: &[SegmentEntry]) -> std::result::Result<String, String> {
        commit_entries(self.store, self.cfg, entries).await
    }
    async fn notes(
        &self,
        clears: &[SegmentId],
        marks: &[DamageNote],
    ) -> std::result::Result<String, String> {
        write_notes(self.store, self.cfg, clears, marks).await
    }
}

/// Runs the reconciler for `cfg.stream` of `cfg.data_dir` against `store`.
/// Errors only when a view cannot be read at all (no journal, the LIST or
/// the manifest read fails); everything else is a finding. A repair run
/// takes the data directory's lock (its broker must be down) and writes the
/// manifest by taking ownership for each write.
pub async fn reconcile(
    cfg: &Config,
    store: &RemoteStore,
    opts: &ReconcileOptions,
) -> Result<ReconcileReport> {
    // A repair re-uploads local files and writes the manifest as this data
    // directory's owner: its broker must be down (Error::Locked otherwise).
    cfg.validate()?;
    require_journal(cfg)?;
    let _lock = if opts.repair {
        Some(DataDir::open(&cfg.data_dir)?)
    } else {
        None
    };
    let access = TakeAndRelease { store, cfg };
    reconcile_with(cfg, store, opts, &access).await
}

/// The reconciler inside a running `TierIndex`: the caller holds the data
/// directory and writes the manifest as the owner it already is (`access`).
/// Safe next to the running pipeline: only segments at `Verified` or later
/// are re-uploaded (their objects are no drive's business any more), a
/// local file released meanwhile only fails that repair, and orphans and
/// multipart uploads younger than the grace period are left alone.
pub async fn reconcile_in_process(
    cfg: &Config,
    store: &RemoteStore,
    opts: &ReconcileOptions,
    access: &dyn ManifestAccess,
) -> Result<ReconcileReport> {
    reconcile_with(cfg, store, opts, access).await
}

async fn reconcile_with(
    cfg: &Config,
    store: &RemoteStore,
    opts: &ReconcileOptions,
    access: &dyn ManifestAccess,
) -> Result<ReconcileReport> {
    cfg.validate()?;
    require_journal(cfg)?;
    let stream = cfg.stream.as_str();
    let (view, _) = Journal::open_read_only(&cfg.data_dir)?;
    let seg_dir = cfg.data_dir.join(datadir::SEGMENTS_DIR);

    // The listing.
    let prefix = store.segments_prefix(stream)?;
    let listed = list(store, cfg, &prefix).await?;
    let listed_objects = listed.len();
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    let mut ours: BTreeMap<String, Listed> = BTreeMap::new();
    let mut foreign: Vec<ObjectMeta> = Vec::new();
    for m in listed {
        sizes.insert(m.location.to_string(), m.size);
        match keys::parse_segment_key(store.prefix(), &m.location) {
            Some((s, id, sum)) if s == stream => {
                let modified_ms = u64::try_from(m.last_modified.timestamp_millis()).unwrap_or(0);
                ours.insert(
                    m.location.to_string(),
                    Listed {
                        key: m.location.clone(),
                        id,
                        sum,
                        size: m.size,
                        modified_ms,
                    },
                );
            }
            _ => foreign.push(m),
        }
    }

    // The manifest, read only (no probe: reads do not depend on it).
    let ms_read = ManifestStore::reader(store, stream, cfg.manifest_options())?;
    let manifest = ms_read.load().await?;
    let mut m_entries: BTreeMap<SegmentId, SegmentEntry> = BTreeMap::new();
    if let Some(m) = &manifest {
        for e in ms_read.all_segments(m).await? {
            m_entries.insert(e.id, e);
        }
    }
    let manifest_present = manifest.is_some();
    let manifest_segments = m_entries.len();

    let mut findings: Vec<Finding> = Vec::new();
    // Keys already checked (rule 1), and keys whose object is known wrong
    // and was not repaired.
    let mut checked: BTreeSet<String> = BTreeSet::new();
    let mut bad: BTreeSet<String> = BTreeSet::new();

    // 1. Journal segments at Verified or later.
    for r in view.segments().values() {
        if !matches!(
            r.state,
            SegmentState::Verified | SegmentState::Committed | SegmentState::Released
        ) {
            continue;
        }
        let key = record_key(store, stream, r)?;
        let k = key.to_string();
        checked.insert(k.clone());
        let Some((kind, detail)) = check_object(store, &key, &r.meta, &sizes, opts.deep).await?
        else {
            continue;
        };
        let present = sizes.contains_key(&k);
        let f = repair_object(
            store, cfg, opts, &seg_dir, kind, &key, &r.meta, present, detail,
        )
        .await;
        if f.repaired {
            sizes.insert(k, r.meta.file_len);
        } else {
            bad.insert(k);
        }
        findings.push(f);
    }

    // 2 and 3. The manifest. Entries to commit, with the indexes of the
    // findings the commit resolves.
    let mut to_commit: Vec<SegmentEntry> = Vec::new();
    let mut commit_findings: Vec<usize> = Vec::new();
    let object_ok = |sizes: &BTreeMap<String, u64>, bad: &BTreeSet<String>, k: &str, len: u64| {
        sizes.get(k) == Some(&len) && !bad.contains(k)
    };
    if manifest_present {
        let version = manifest.as_ref().map_or(0, |m| m.version);
        for r in view.segments().values() {
            if !matches!(r.state, SegmentState::Committed | SegmentState::Released)
                || m_entries.contains_key(&r.meta.id)
            {
                continue;
            }
            let key = record_key(store, stream, r)?;
            let k = key.to_string();
            let mut f = Finding::new(
                FindingKind::ManifestLostEntries,
                Some(r.meta.id),
                &k,
                format!(
                    "the journal says {:?}, manifest version {version} does not list it",
                    r.state
                ),
            );
            if !object_ok(&sizes, &bad, &k, r.meta.file_len) {
                f.action = "none: its object is not in place (see above); not committed".into();
            } else if !cfg.manifest {
                f.action = "none: manifest = false in the config".into();
            } else if !opts.repair {
                f.action = "none (--repair commits it)".into();
            } else {
                to_commit.push(SegmentEntry::new(store, stream, &r.meta)?);
                commit_findings.push(findings.len());
            }
            findings.push(f);
        }
        for e in m_entries.values() {
            if checked.contains(&e.key) {
                continue;
            }
            let listed = sizes.get(&e.key).copied();
            if listed == Some(e.file_len) {
                continue;
            }
            let (kind, detail) = match listed {
                None => (
                    FindingKind::ManifestListsMissingObject,
                    "the manifest lists it; no object under the key".to_string(),
                ),
                Some(size) => (
                    FindingKind::SizeMismatch,
                    format!(
                        "object is {size} bytes, the manifest records {}",
                        e.file_len
                    ),
                ),
            };
            let key = Path::parse(&e.key)
                .map_err(|err| Error::corrupt("manifest entry", format!("{:?}: {err}", e.key)))?;
            let local = journal_copy(&view, e);
            let f = match local {
                Some(r) => {
                    repair_object(
                        store,
                        cfg,
                        opts,
                        &seg_dir,
                        kind,
                        &key,
                        &r.meta,
                        listed.is_some(),
                        detail,
                    )
                    .await
                }
                None => {
                    let mut f = Finding::new(kind, Some(e.id), &e.key, detail);
                    f.lost = true;
                    f.action = "LOST: the journal holds no local copy of these bytes; \
                                nothing deleted"
                        .into();
                    f
                }
            };
            if f.repaired {
                sizes.insert(e.key.clone(), e.file_len);
            }
            findings.push(f);
        }
    } else if cfg.manifest && !ours.is_empty() {
        let dir = ms_read.versions_dir().to_string();
        let mut f = Finding::new(
            FindingKind::ManifestLost,
            None,
            &dir,
            format!(
                "no manifest, but {} segment object(s) are listed and manifest = true",
                ours.len()
            ),
        );
        if opts.repair {
            let mut rejected = Vec::new();
            for o in ours.values() {
                let k = o.key.to_string();
                if bad.contains(&k) || excluded_by_journal(view.get(o.id), o.sum) {
                    continue;
                }
                match read_entry(store, stream, o, view.get(o.id), opts.deep).await? {
                    Ok(e) => to_commit.push(e),
                    Err(why) => {
                        let mut u = Finding::new(FindingKind::UnusableObject, Some(o.id), &k, why);
                        u.action = "none: left out of the rebuilt manifest".into();
                        rejected.push(u);
                    }
                }
            }
            // Objects rule 1 re-uploaded in this run were not in the
            // listing taken before it: list them from their journal record
            // (the bytes just written are exactly the journal's).
            let listed_keys: BTreeSet<String> = ours.values().map(|o| o.key.to_string()).collect();
            for r in view.segments().values() {
                if !matches!(r.state, SegmentState::Committed | SegmentState::Released) {
                    continue;
                }
                let key = record_key(store, stream, r)?;
                let k = key.to_string();
                if listed_keys.contains(&k) || !object_ok(&sizes, &bad, &k, r.meta.file_len) {
                    continue;
                }
                let mut e = SegmentEntry::new(store, stream, &r.meta)?;
                e.key = k;
                to_commit.push(e);
            }
            to_commit.sort_by_key(|e| e.id);
            if to_commit.is_empty() {
                f.action = "none: no usable object to rebuild from".into();
            } else {
                commit_findings.push(findings.len());
            }
            findings.push(f);
            findings.extend(rejected);
        } else {
            f.action = "none (--repair rebuilds it from the listing)".into();
            findings.push(f);
        }
    }
    // 5. Damage notes in the manifest (written by readers that confirmed a
    // damaged object), and lost segments the manifest does not mark yet.
    let mut clears: Vec<SegmentId> = Vec::new();
    let mut marks: Vec<DamageNote> = Vec::new();
    let mut note_findings: Vec<usize> = Vec::new();
    if let Some(m) = &manifest {
        let fetcher = Fetcher::new(
            store.clone(),
            cfg.upload_config().retry_policy(),
            crate::remote::fetch::REMOTE_INDEX_CACHE_BYTES,
        );
        for note in &m.damaged {
            let Some(e) = m_entries.get(&note.id) else {
                let mut f = Finding::new(
                    FindingKind::ManifestDamaged,
                    Some(note.id),
                    &note.key,
                    format!(
                        "note for a segment the manifest does not list: {}",
                        note.reason
                    ),
                );
                f.action = "none: an operator must inspect the manifest".into();
                findings.push(f);
                continue;
            };
            let key = Path::parse(&e.key)
                .map_err(|err| Error::corrupt("manifest entry", format!("{:?}: {err}", e.key)))?;
            let detail = format!(
                "marked {}damaged: {}",
                if note.lost { "LOST and " } else { "" },
                note.reason
            );
            // Rule 1 or 2b already judged this key in this run: do not
            // read, repair or count it twice; the note follows that finding.
            let prior = findings
                .iter()
                .position(|f| f.key == e.key && f.kind != FindingKind::ManifestDamaged);
            // Whole now (restored by someone, or repaired above)? A LOST note
            // whose object has not changed since it was marked is not
            // downloaded again. A store that cannot answer decides nothing.
            let unchanged_lost = note.lost
                && ours
                    .get(&e.key)
                    .is_none_or(|o| o.modified_ms <= note.marked_ms);
            let whole = match prior.and_then(|i| findings.get(i)) {
                Some(p) => Ok(p.repaired),
                None if unchanged_lost || !object_ok(&sizes, &bad, &e.key, e.file_len) => Ok(false),
                None => fetcher
                    .confirm_damage(&RemoteSegment::from_entry(e)?)
                    .await
                    .map(|d| d.is_none()),
            };
            let whole = match whole {
                Ok(w) => w,
                Err(err) => {
                    let mut f =
                        Finding::new(FindingKind::ManifestDamaged, Some(e.id), &e.key, detail);
                    f.action = format!("not checked: the store did not answer ({err})");
                    findings.push(f);
                    continue;
                }
            };
            let mut f = if whole {
                let mut f = Finding::new(FindingKind::ManifestDamaged, Some(e.id), &e.key, detail);
                f.action = if prior.is_some() {
                    "the object was repaired above".into()
                } else {
                    "the object verifies whole now".into()
                };
                f
            } else if let Some(p) = prior.and_then(|i| findings.get(i)) {
                let mut f = Finding::new(FindingKind::ManifestDamaged, Some(e.id), &e.key, detail);
                f.informational = true;
                f.action = format!("see the {} finding above", p.kind.describe());
                f
            } else {
                let local = journal_copy(&view, e);
                let present = sizes.contains_key(&e.key);
                match local {
                    Some(r) => {
                        repair_object(
                            store,
                            cfg,
                            opts,
                            &seg_dir,
                            FindingKind::ManifestDamaged,
                            &key,
                            &r.meta,
                            present,
                            detail,
                        )
                        .await
                    }
                    None => {
                        let mut f =
                            Finding::new(FindingKind::ManifestDamaged, Some(e.id), &e.key, detail);
                        f.lost = true;
                        f.action = "LOST: the journal holds no local copy of these bytes; \
                                    nothing deleted"
                            .into();
                        f
                    }
                }
            };
            let seg_lost = f.lost || prior.and_then(|i| findings.get(i)).is_some_and(|p| p.lost);
            if seg_lost {
                if !note.lost {
                    if opts.repair && cfg.manifest {
                        marks.push(DamageNote::new(
                            e,
                            &note.reason,
                            true,
                            crate::segment::now_ms(),
                        ));
                        note_findings.push(findings.len());
                    } else {
                        f.action
                            .push_str(" (--repair marks it lost in the manifest)");
                    }
                }
            } else if whole || f.repaired {
                sizes.insert(e.key.clone(), e.file_len);
                bad.remove(&e.key);
                if opts.repair && cfg.manifest {
                    clears.push(e.id);
                    f.repaired = false; // until the note is cleared
                    note_findings.push(findings.len());
                } else {
                    f.repaired = false;
                    f.action.push_str(if cfg.manifest {
                        "; none (--repair clears the note)"
                    } else {
                        "; none: manifest = false in the config (the note stays)"
                    });
                }
            }
            findings.push(f);
        }
        // Lost segments (rules 1 and 2) the manifest lists without a note:
        // mark them, so every reader says LOST instead of failing a read.
        if opts.repair && cfg.manifest {
            for i in 0..findings.len() {
                let Some(f) = findings.get(i) else { continue };
                let Some(e) = f.segment.and_then(|id| m_entries.get(&SegmentId(id))) else {
                    continue;
                };
                if !f.lost
                    || f.kind == FindingKind::ManifestDamaged
                    || f.key != e.key
                    || m.damage(e.id).is_some()
                    || marks.iter().any(|n| n.id == e.id)
                {
                    continue;
                }
                marks.push(DamageNote::new(
                    e,
                    &f.detail,
                    true,
                    crate::segment::now_ms(),
                ));
                note_findings.push(i);
            }
        }
    }

    let mut manifest_now = manifest_present;
    if !clears.is_empty() || !marks.is_empty() {
        let (action, ok) = match access.notes(&clears, &marks).await {
            Ok(a) => (a, true),
            Err(why) => (why, false),
        };
        for i in &note_findings {
            if let Some(f) = findings.get_mut(*i) {
                f.action = format!("{}; {action}", f.action);
                if !f.lost {
                    f.repaired = ok;
                }
            }
        }
    }
    if !to_commit.is_empty() {
        let (action, ok) = match access.commit(&to_commit).await {
            Ok(a) => (a, true),
            Err(why) => (why, false),
        };
        for i in &commit_findings {
            if let Some(f) = findings.get_mut(*i) {
                f.action = action.clone();
                f.repaired = ok;
            }
        }
        if ok {
            manifest_now = true;
            for e in to_commit {
                m_entries.insert(e.id, e);
            }
        }
    }

    // 4. Objects no view references, and our own abandoned uploads. The
    // journal is read again now, after the LIST: an object uploaded between
    // the first read and the LIST has its `Uploading` record (journaled
    // before any PUT) in this one, so a live pipeline's fresh upload is
    // never taken for an orphan. Both reads count (compaction may have
    // dropped a Released record in between).
    let (view_after, _) = Journal::open_read_only(&cfg.data_dir)?;
    let now = crate::segment::now_ms();
    let grace_ms = u64::try_from(opts.grace.as_millis()).unwrap_or(u64::MAX);
    let manifest_version = if manifest_now {
        ms_read.load().await.ok().flatten().map(|m| m.version)
    } else {
        None
    };
    let ctx = OrphanCtx {
        store,
        cfg,
        opts,
        seg_dir: &seg_dir,
        views: [&view, &view_after],
        m_entries: &m_entries,
        manifest_version,
        now,
        grace_ms,
    };
    for o in ours.values() {
        if let Some(f) = judge_unreferenced(&ctx, o).await {
            findings.push(f);
        }
    }
    for m in &foreign {
        let mut f = Finding::new(
            FindingKind::Foreign,
            None,
            m.location.as_ref(),
            format!("{} bytes; not a segment key of stream {stream:?}", m.size),
        );
        f.informational = true;
        f.action = "kept: foreign objects are never deleted".into();
        findings.push(f);
    }

    // 5. Incomplete multipart uploads.
    let multipart_uploads = match store.list_multipart_uploads(&prefix).await {
        Ok(MultipartListing::Listed(ups)) => {
            stale_uploads(store, cfg, opts, &view, &ups, now, &mut findings).await
        }
        Ok(MultipartListing::BackendCannotList) => MULTIPART_NOT_CHECKED.to_string(),
        Ok(MultipartListing::NotSupportedByServer(why)) => {
            format!("not checked (not supported by this server: {why})")
        }
        Err(e) => format!("not checked (listing failed: {e})"),
    };

    let repaired = findings.iter().filter(|f| f.repaired).count();
    let deleted = findings.iter().filter(|f| f.deleted).count();
    let unresolved = findings.iter().filter(|f| f.unresolved()).count();
    let lost = findings.iter().filter(|f| f.lost).count();
    Ok(ReconcileReport {
        store: store.display_url().to_string(),
        stream: stream.to_string(),
        repair: opts.repair,
        deep: opts.deep,
        grace_ms,
        journal_segments: view.segments().len(),
        listed_objects,
        manifest_present,
        manifest_segments,
        findings_total: findings.len(),
        repaired,
        deleted,
        unresolved,
        lost,
        multipart_uploads,
        findings,
    })
}

/// LIST of the segments prefix, with the config's retries.
async fn list(store: &RemoteStore, cfg: &Config, prefix: &Path) -> Result<Vec<ObjectMeta>> {
    let os = store.object_store().clone();
    let mut rng = fastrand::Rng::new();
    let policy = cfg.upload_config().retry_policy();
    with_retries(&policy, &mut rng, "segments LIST", |_| {
        let (os, prefix) = (os.clone(), prefix.clone());
        async move { os.list(Some(&prefix)).try_collect::<Vec<_>>().await }
    })
    .await
    .map_err(classify)
}

/// DELETE with the config's retries; already gone is fine.
async fn delete(store: &RemoteStore, cfg: &Config, key: &Path) -> Result<()> {
    let os = store.object_store().clone();
    let mut rng = fastrand::Rng::new();
    let policy = cfg.upload_config().retry_policy();
    match with_retries(&policy, &mut rng, "segment DELETE", |_| {
        let (os, key) = (os.clone(), key.clone());
        async move { os.delete(&key).await }
    })
    .await
    {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(classify(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{JournalOptions, Record};
    use crate::remote::StoreOptions;
    use crate::segment::Entry;
    use crate::segment::sealed::{build_sealed, write_sealed_file};
    use object_store::PutPayload;

    const STREAM: &str = "s";

    fn sealed(id: u64) -> (Vec<u8>, SealedMeta) {
        let entries: Vec<Entry> = (0..20)
            .map(|i| Entry {
                key_hash: i % 5,
                offset: id * 100 + i,
                size: 10,
                timestamp_ms: 1_000 + id * 100 + i,
            })
            .collect();
        build_sealed(SegmentId(id), 1, 2, 8, &entries).unwrap()
    }

    async fn put(store: &RemoteStore, key: &Path, bytes: &[u8]) {
        store
            .object_store()
            .put(key, PutPayload::from(bytes.to_vec()))
            .await
            .unwrap();
    }

    /// Journal: 2 and 3 Committed, 4 only Uploading (all with objects).
    /// Store: also segment 1 (unknown to the journal, below its highest
    /// id), a second object of 3 under another CRC, and garbage under id 9.
    async fn rig(manifest: bool) -> (tempfile::TempDir, Config, RemoteStore) {
        rig_on(manifest, false).await
    }

    /// [`rig`] on a `file://` store (its root is the key prefix) when
    /// `file_store`, else on `memory://p`.
    async fn rig_on(manifest: bool, file_store: bool) -> (tempfile::TempDir, Config, RemoteStore) {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let seg_dir = data.join(datadir::SEGMENTS_DIR);
        std::fs::create_dir_all(&seg_dir).unwrap();
        let url = if file_store {
            url::Url::from_directory_path(tmp.path().join("store"))
                .unwrap()
                .to_string()
        } else {
            "memory://p".to_string()
        };
        let store = RemoteStore::from_url(&url, &StoreOptions::default()).unwrap();
        let (mut j, _) = Journal::open(&data, JournalOptions::default()).unwrap();
        for id in 2..=4u64 {
            let (bytes, meta) = sealed(id);
            write_sealed_file(&seg_dir, SegmentId(id), &bytes).unwrap();
            let key = store.segment_key(STREAM, &meta);
            put(&store, &key, &bytes).await;
            let sid = SegmentId(id);
            let mut recs = vec![
                Record::Sealed { meta },
                Record::Uploading {
                    id: sid,
                    attempt: 1,
                    key: key.to_string(),
                    multipart_id: None,
                },
            ];
            if id < 4 {
                recs.extend([
                    Record::Uploaded {
                        id: sid,
                        etag: None,
                        version: None,
                    },
                    Record::Verified { id: sid },
                    Record::Committed { id: sid },
                ]);
            }
            j.append(&recs).unwrap();
        }
        drop(j);
        let (bytes, meta) = sealed(1);
        put(&store, &store.segment_key(STREAM, &meta), &bytes).await;
        let segs = store.segments_prefix(STREAM).unwrap();
        let stale = segs.clone().join(format!("{:020}-00000001.seg", 3));
        put(&store, &stale, b"an older seal of 3").await;
        let junk = segs.clone().join(format!("{:020}-00000009.seg", 9));
        put(&store, &junk, &[7u8; 300]).await;
        let cfg = Config {
            data_dir: data,
            stream: STREAM.into(),
            manifest,
            owner_id: Some("rec".into()),
            ..Config::default()
        };
        (tmp, cfg, store)
    }

    fn opts(repair: bool, grace: Duration) -> ReconcileOptions {
        ReconcileOptions {
            repair,
            grace,
            deep: false,
        }
    }

    fn by_segment(r: &ReconcileReport) -> BTreeMap<(u64, FindingKind), &Finding> {
        r.findings
            .iter()
            .map(|f| ((f.segment.unwrap_or(0), f.kind), f))
            .collect()
    }

    async fn keys_left(store: &RemoteStore) -> Vec<String> {
        store
            .object_store()
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn single_writer_mode_deletes_nothing_and_says_whose_it_is_not() {
        let (_tmp, cfg, store) = rig(false).await;
        let before = keys_left(&store).await;
        let r = reconcile(&cfg, &store, &opts(true, Duration::ZERO))
            .await
            .unwrap();
        let f = by_segment(&r);
        assert_eq!(r.findings.len(), 3, "{:#?}", r.findings);
        // 1: at or below the journal's highest id, absent from it: kept.
        let one = f[&(1, FindingKind::Orphan)];
        assert!(one.informational && !one.repaired, "{one:?}");
        assert!(one.action.contains("compaction"), "{one:?}");
        // The other seal of 3 (another writer's) and the id the journal
        // never reached: kept, and an operator is told why.
        let three = f[&(3, FindingKind::Orphan)];
        assert!(three.unresolved() && !three.deleted, "{three:?}");
        assert!(three.detail.contains("another seal"), "{three:?}");
        assert!(three.action.contains("never deleted"), "{three:?}");
        let nine = f[&(9, FindingKind::Orphan)];
        assert!(nine.unresolved() && !nine.deleted, "{nine:?}");
        assert!(nine.detail.contains("never recorded"), "{nine:?}");
        assert!(r.needs_operator());
        assert_eq!((r.deleted, r.repaired), (0, 0));
        assert_eq!(keys_left(&store).await, before);
    }

    /// Segment 4 (Uploading in the rig, its object in place) quarantined;
    /// a manifest listing 2 and 3.
    async fn with_quarantined_4(cfg: &Config, store: &RemoteStore) {
        let (mut j, _) = Journal::open(&cfg.data_dir, JournalOptions::default()).unwrap();
        j.append(&[Record::Quarantined {
            id: SegmentId(4),
            reason: "test".into(),
        }])
        .unwrap();
        drop(j);
        let entries: Vec<SegmentEntry> = [2u64, 3]
            .iter()
            .map(|id| SegmentEntry::new(store, STREAM, &sealed(*id).1).unwrap())
            .collect();
        commit_entries(store, cfg, &entries).await.unwrap();
    }

    #[tokio::test]
    async fn our_quarantined_upload_is_deleted_only_with_proof() {
        let (_tmp, cfg, store) = rig(true).await;
        with_quarantined_4(&cfg, &store).await;
        let key4 = store.segment_key(STREAM, &sealed(4).1).to_string();

        // Young: kept.
        let r = reconcile(&cfg, &store, &opts(true, Duration::from_secs(3600)))
            .await
            .unwrap();
        let f4 = by_segment(&r)[&(4, FindingKind::AbandonedUpload)].clone();
        assert!(f4.informational && !f4.deleted, "{f4:?}");
        assert!(keys_left(&store).await.contains(&key4));

        // No intact local copy: the object may be the only one: kept.
        let local = cfg
            .data_dir
            .join("segments")
            .join(sealed_file_name(SegmentId(4)));
        let saved = std::fs::read(&local).unwrap();
        std::fs::remove_file(&local).unwrap();
        let r = reconcile(&cfg, &store, &opts(true, Duration::ZERO))
            .await
            .unwrap();
        let f4 = by_segment(&r)[&(4, FindingKind::AbandonedUpload)].clone();
        assert!(f4.unresolved() && !f4.deleted, "{f4:?}");
        assert!(f4.action.contains("only copy"), "{f4:?}");
        assert!(keys_left(&store).await.contains(&key4));
        std::fs::write(&local, &saved).unwrap();

        // Everything proved: deleted, reported as a deletion with the proof.
        let r = reconcile(&cfg, &store, &opts(true, Duration::ZERO))
            .await
            .unwrap();
        let f = by_segment(&r);
        let f4 = f[&(4, FindingKind::AbandonedUpload)];
        assert!(f4.deleted && !f4.repaired, "{f4:?}");
        assert!(f4.action.starts_with("deleted. Proof:"), "{f4:?}");
        assert!(f4.action.contains("Quarantined"), "{f4:?}");
        assert_eq!(r.deleted, 1);
        assert!(!keys_left(&store).await.contains(&key4));
        assert!(local.exists(), "the local copy stays");
        // Nothing else was deleted: 1 (unknown), the other seal of 3, 9.
        for id in [1u64, 3, 9] {
            let o = f[&(id, FindingKind::Orphan)];
            assert!(!o.deleted && o.unresolved(), "{o:?}");
        }
        assert_eq!(
            keys_left(&store)
                .await
                .iter()
                .filter(|k| k.ends_with(".seg"))
                .count(),
            5
        );
    }

    #[tokio::test]
    async fn our_quarantined_upload_is_kept_in_single_writer_mode() {
        let (_tmp, cfg, store) = rig(true).await;
        with_quarantined_4(&cfg, &store).await;
        let cfg = Config {
            manifest: false,
            ..cfg
        };
        let before = keys_left(&store).await;
        let r = reconcile(&cfg, &store, &opts(true, Duration::ZERO))
            .await
            .unwrap();
        let f4 = by_segment(&r)[&(4, FindingKind::AbandonedUpload)].clone();
        assert!(!f4.deleted && f4.action.contains("single-writer"), "{f4:?}");
        assert_eq!(r.deleted, 0);
        assert_eq!(keys_left(&store).await, before);
    }

    #[tokio::test]
    async fn rebuild_leaves_out_pending_superseded_and_unusable_objects() {
        let (_tmp, cfg, store) = rig(true).await;
        let r = reconcile(&cfg, &store, &opts(true, Duration::from_secs(3600)))
            .await
            .unwrap();
        let f = by_segment(&r);
        assert!(
            f[&(0, FindingKind::ManifestLost)].repaired,
            "{:#?}",
            r.findings
        );
        let bad = f[&(9, FindingKind::UnusableObject)];
        assert!(bad.unresolved() && bad.detail.contains("footer"), "{bad:?}");
        // Young: kept even with repair.
        assert!(f[&(9, FindingKind::Orphan)].informational);
        assert!(f[&(3, FindingKind::Orphan)].informational);
        assert!(r.needs_operator());
        let ms = ManifestStore::reader(&store, STREAM, cfg.manifest_options()).unwrap();
        let m = ms.load().await.unwrap().unwrap();
        let ids: Vec<u64> = ms
            .all_segments(&m)
            .await
            .unwrap()
            .iter()
            .map(|e| e.id.0)
            .collect();
        // 1 (unknown to the journal, footer fine) and the committed 2 and 3;
        // not 4 (only Uploading), not the other seal of 3, not the garbage.
        assert_eq!(ids, vec![1, 2, 3]);
    }

    /// Starts a multipart upload under `key` with one part, on the store's
    /// own multipart API (as a crashed or cancelled upload leaves it).
    async fn start_upload(store: &RemoteStore, key: &Path) -> String {
        let mp = store.multipart().unwrap();
        let id = mp.create_multipart(key).await.unwrap();
        mp.put_part(key, &id, 0, PutPayload::from_static(b"part"))
            .await
            .unwrap();
        id
    }

    async fn pending(store: &RemoteStore) -> Vec<PendingUpload> {
        match store
            .list_multipart_uploads(&store.segments_prefix(STREAM).unwrap())
            .await
            .unwrap()
        {
            MultipartListing::Listed(v) => v,
            other => panic!("{other:?}"),
        }
    }

    fn stale_findings(r: &ReconcileReport) -> Vec<&Finding> {
        r.findings
            .iter()
            .filter(|f| f.kind == FindingKind::StaleMultipart)
            .collect()
    }

    #[tokio::test]
    async fn stale_multipart_upload_is_reported_then_aborted_with_repair() {
        let (_tmp, cfg, store) = rig_on(false, true).await;
        let (_, meta) = sealed(7);
        let key = store.segment_key(STREAM, &meta);
        let id = start_upload(&store, &key).await;

        let r = reconcile(&cfg, &store, &opts(false, Duration::ZERO))
            .await
            .unwrap();
        let st = stale_findings(&r);
        assert_eq!(st.len(), 1, "{:#?}", r.findings);
        assert_eq!(st[0].key, key.as_ref());
        assert_eq!(st[0].segment, Some(7));
        assert!(st[0].detail.contains(&id), "{:?}", st[0]);
        assert!(
            st[0].unresolved() && st[0].action.contains("--repair"),
            "{:?}",
            st[0]
        );
        assert_eq!(
            r.multipart_uploads,
            "checked: 1 in progress, 1 stale, 0 aborted"
        );
        assert_eq!(
            pending(&store).await.len(),
            1,
            "report only: nothing aborted"
        );

        let r = reconcile(&cfg, &store, &opts(true, Duration::ZERO))
            .await
            .unwrap();
        let st = stale_findings(&r);
        assert_eq!(st.len(), 1, "{:#?}", r.findings);
        assert!(st[0].repaired && st[0].action == "aborted", "{:?}", st[0]);
        assert_eq!(
            r.multipart_uploads,
            "checked: 1 in progress, 1 stale, 1 aborted"
        );
        assert_eq!(pending(&store).await, vec![]);

        let r = reconcile(&cfg, &store, &opts(false, Duration::ZERO))
            .await
            .unwrap();
        assert!(stale_findings(&r).is_empty(), "{:#?}", r.findings);
        assert_eq!(
            r.multipart_uploads,
            "checked: 0 in progress, 0 stale, 0 aborted"
        );
    }

    #[tokio::test]
    async fn young_uploads_are_kept_even_the_journals_own() {
        let (_tmp, cfg, store) = rig_on(false, true).await;
        // Segment 4 is Uploading in the rig: journal a multipart attempt.
        let (_, meta) = sealed(4);
        let key = store.segment_key(STREAM, &meta);
        let id = start_upload(&store, &key).await;
        let (mut j, _) = Journal::open(&cfg.data_dir, JournalOptions::default()).unwrap();
        j.append(&[Record::Uploading {
            id: SegmentId(4),
            attempt: 2,
            key: key.to_string(),
            multipart_id: Some(id.clone()),
        }])
        .unwrap();
        drop(j);

        let r = reconcile(&cfg, &store, &opts(true, Duration::from_secs(3600)))
            .await
            .unwrap();
        assert!(stale_findings(&r).is_empty(), "{:#?}", r.findings);
        assert_eq!(
            r.multipart_uploads,
            "checked: 1 in progress, 0 stale, 0 aborted"
        );
        assert_eq!(pending(&store).await.len(), 1);

        // Past the grace period the journal's own attempt is stale too.
        let r = reconcile(&cfg, &store, &opts(false, Duration::ZERO))
            .await
            .unwrap();
        let st = stale_findings(&r);
        assert_eq!(st.len(), 1, "{:#?}", r.findings);
        assert!(st[0].detail.contains("current attempt"), "{:?}", st[0]);
    }

    #[tokio::test]
    async fn a_foreign_keys_upload_is_reported_not_aborted() {
        let (_tmp, cfg, store) = rig_on(false, true).await;
        let segs = store.segments_prefix(STREAM).unwrap();
        let foreign = segs.clone().join("notes.txt");
        let id = start_upload(&store, &foreign).await;
        // Outside the segments prefix: not listed at all.
        start_upload(&store, &Path::from("elsewhere/x.seg")).await;

        let r = reconcile(&cfg, &store, &opts(true, Duration::ZERO))
            .await
            .unwrap();
        let st = stale_findings(&r);
        assert_eq!(st.len(), 1, "{:#?}", r.findings);
        assert_eq!(st[0].key, foreign.as_ref());
        assert_eq!(st[0].segment, None);
        assert!(st[0].informational && !st[0].repaired, "{:?}", st[0]);
        assert_eq!(
            r.multipart_uploads,
            "checked: 1 in progress, 1 stale, 0 aborted"
        );
        let left = pending(&store).await;
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].upload_id, id);
    }

    #[tokio::test]
    async fn a_store_that_cannot_list_says_so() {
        let (_tmp, cfg, store) = rig(false).await;
        let r = reconcile(&cfg, &store, &opts(false, Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(r.multipart_uploads, MULTIPART_NOT_CHECKED);
        assert!(stale_findings(&r).is_empty());
    }
}
