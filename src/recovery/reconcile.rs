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

/// What the report says about stale multipart uploads when the backend
/// cannot list them.
pub const MULTIPART_NOT_CHECKED: &str = "not checked (the store API cannot list multipart \
     uploads; journaled ids are aborted on resume)";

/// Default age an orphan must reach before `repair` deletes it.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// What to do besides reporting.
#[derive(Clone, Debug)]
pub struct ReconcileOptions {
    /// Repair what can be repaired (re-upload, commit, rebuild, delete old
    /// orphans). Off: report only, nothing is written.
    pub repair: bool,
    /// Orphans younger than this are kept (an upload may be in flight).
    pub grace: Duration,
    /// Also read every journal-listed object back in full (CRC check).
    pub deep: bool,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            repair: false,
            grace: DEFAULT_GRACE,
            deep: false,
        }
    }
}

/// What kind of disagreement a finding is.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A journal segment at Verified or later has no object under its key.
    ObjectMissing,
    /// Its object's size differs from the recorded `file_len`.
    SizeMismatch,
    /// (`deep`) Its object's bytes fail the full read-back check.
    ContentMismatch,
    /// The manifest lacks a journal Committed/Released segment.
    ManifestLostEntries,
    /// The manifest lists an object the listing lacks.
    ManifestListsMissingObject,
    /// No manifest, though segment objects exist and `manifest = true`.
    ManifestLost,
    /// A listed object left out of a rebuilt manifest (footer unreadable or
    /// disagreeing with its key, its size or the journal).
    UnusableObject,
    /// An object under this stream's segment key layout that neither the
    /// journal (same id and CRC) nor the manifest references: of unknown
    /// origin (another data directory on the stream, a lost or re-created
    /// data directory, a journal that lost records). Never deleted.
    Orphan,
    /// The object of one of our own `Quarantined` segments, under exactly
    /// the key the journal records for its upload attempt, never committed.
    /// The only kind of object the reconciler deletes as such (with proof).
    AbandonedUpload,
    /// An object under the segments prefix that is not one of our keys.
    Foreign,
    /// The manifest carries a damage note for the segment (a reader found
    /// its object damaged); or a lost segment the manifest did not mark.
    ManifestDamaged,
    /// An incomplete multipart upload under the segments prefix, initiated
    /// longer ago than the grace period.
    StaleMultipart,
}

impl FindingKind {
    pub fn describe(self) -> &'static str {
        match self {
            FindingKind::ObjectMissing => "object missing",
            FindingKind::SizeMismatch => "object size differs",
            FindingKind::ContentMismatch => "object content differs",
            FindingKind::ManifestLostEntries => "manifest lost entries",
            FindingKind::ManifestListsMissingObject => "manifest lists a missing object",
            FindingKind::ManifestLost => "manifest lost",
            FindingKind::UnusableObject => "unusable object",
            FindingKind::Orphan => "unreferenced object",
            FindingKind::AbandonedUpload => "abandoned upload of ours",
            FindingKind::Foreign => "foreign",
            FindingKind::ManifestDamaged => "manifest damage note",
            FindingKind::StaleMultipart => "stale multipart upload",
        }
    }
}

/// One disagreement and what was done about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    /// Segment id, when the finding is about one segment.
    pub segment: Option<u64>,
    /// Object key (or the manifest folder for [`FindingKind::ManifestLost`]).
    pub key: String,
    pub detail: String,
    /// The action taken, or "none ..." with the reason.
    pub action: String,
    /// The action fixed it.
    pub repaired: bool,
    /// No copy is left anywhere to repair from.
    pub lost: bool,
    /// Nothing is wrong that an operator must act on (foreign objects,
    /// young orphans, unreferenced ids kept for safety).
    pub informational: bool,
    /// An object was deleted. The action names the proof it relied on (the
    /// journal record and its state, the manifest version, the age). A
    /// deletion is never counted as `repaired` on its own: when it is part of
    /// a repair (a wrong object replaced by the verified local copy) both are
    /// set.
    pub deleted: bool,
}

impl Finding {
    fn new(kind: FindingKind, segment: Option<SegmentId>, key: &str, detail: String) -> Finding {
        Finding {
            kind,
            segment: segment.map(|s| s.0),
            key: key.to_string(),
            detail,
            action: "none".into(),
            repaired: false,
            lost: false,
            informational: false,
            deleted: false,
        }
    }

    /// Left for an operator: not repaired, not deleted with proof and not
    /// merely informational.
    pub fn unresolved(&self) -> bool {
        !self.repaired && !self.deleted && !self.informational
    }
}

/// Everything a reconcile run found and did.
#[derive(Clone, Debug, Serialize)]
pub struct ReconcileReport {
    pub store: String,
    pub stream: String,
    pub repair: bool,
    pub deep: bool,
    pub grace_ms: u64,
    /// Segments in the journal (any state).
    pub journal_segments: usize,
    /// Objects listed under the segments prefix.
    pub listed_objects: usize,
    /// A manifest existed when the run started.
    pub manifest_present: bool,
    /// Entries in that manifest.
    pub manifest_segments: usize,
    /// `findings.len()`.
    pub findings_total: usize,
    pub repaired: usize,
    /// Objects deleted (each with its proof in the finding's action).
    pub deleted: usize,
    /// Findings left for an operator (lost ones included).
    pub unresolved: usize,
    pub lost: usize,
    /// Incomplete multipart uploads: "checked: N in progress, M stale, K
    /// aborted", or "not checked (why)" ([`MULTIPART_NOT_CHECKED`] for a
    /// backend that cannot list).
    pub multipart_uploads: String,
    pub findings: Vec<Finding>,
}

impl ReconcileReport {
    /// Something is lost or left unrepaired.
    pub fn needs_operator(&self) -> bool {
        self.unresolved > 0
    }
}

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

/// What rule 4 needs to judge one listed object.
struct OrphanCtx<'a> {
    store: &'a RemoteStore,
    cfg: &'a Config,
    opts: &'a ReconcileOptions,
    seg_dir: &'a FsPath,
    /// The journal read before and after the LIST.
    views: [&'a JournalView; 2],
    m_entries: &'a BTreeMap<SegmentId, SegmentEntry>,
    /// The manifest's version when one exists now.
    manifest_version: Option<u64>,
    now: u64,
    grace_ms: u64,
}

/// What to tell an operator about an object no view references.
const UNKNOWN_ORIGIN_ADVICE: &str = "never deleted: no journal record of this data directory \
     names this key, so it is of unknown origin and may hold the only copy of acknowledged \
     entries. If another data directory writes this stream to this store, give each its own \
     stream (and turn on manifest = true, which refuses a second live writer); if this data \
     directory was lost or re-created, keep the object: `tierindex lookup --remote` and \
     `inspect` can still read it";

/// Rule 4 for one listed object of this stream's key layout. `None` when a
/// view references it (nothing to say).
///
/// The deletion rule: an object is deleted only when every one of these
/// holds, each of which is named in the finding's action:
/// - the manifest is on (`cfg.manifest`) and exists: single-writer mode
///   never deletes an object;
/// - the journal of this data directory records the segment as
///   `Quarantined` (never committed, never driven again) with exactly this
///   key as its upload attempt and the same CRC: we wrote (or tried to
///   write) it;
/// - the manifest does not list the segment id at all;
/// - it is older than the grace period;
/// - an intact local copy (recorded length and CRC) exists and the object's
///   bytes equal it (full read): the object is not the only copy of anything.
///
/// Everything else is reported and kept: objects of unknown origin, of
/// another seal of an id (another data directory), and every segment the
/// journal or the manifest references (pending ones are the pipeline's).
async fn judge_unreferenced(ctx: &OrphanCtx<'_>, o: &Listed) -> Option<Finding> {
    let k = o.key.to_string();
    let [before, after] = ctx.views;
    let rec = after.get(o.id).or_else(|| before.get(o.id));
    let same_bytes = |r: &SegmentRecord| r.meta.key_sum() == o.sum;
    let in_manifest = ctx.m_entries.get(&o.id);
    if in_manifest.is_some_and(|e| e.key_sum() == o.sum) {
        return None;
    }
    if let Some(r) = rec.filter(|r| same_bytes(r)) {
        let quarantined_attempt =
            r.state == SegmentState::Quarantined && r.key.as_deref() == Some(k.as_str());
        if !quarantined_attempt {
            // Sealed .. Released: the journal references it (a pending one
            // is the pipeline's, which compares before it uploads).
            return None;
        }
        return Some(judge_abandoned(ctx, o, r, in_manifest.is_some()).await);
    }
    // Also referenced when the other journal read knows these bytes.
    if [before, after]
        .iter()
        .any(|v| v.get(o.id).is_some_and(&same_bytes))
    {
        return None;
    }
    let age = ctx.now.saturating_sub(o.modified_ms);
    let mut f = Finding::new(
        FindingKind::Orphan,
        Some(o.id),
        &k,
        format!(
            "in neither the journal nor the manifest; {} bytes, last modified {age} ms ago",
            o.size
        ),
    );
    let max = after.max_segment_id().max(before.max_segment_id());
    if let Some(r) = rec {
        f.detail = format!(
            "{}; this data directory's journal records segment {} with checksum {} ({:?}): \
             this object is another seal of the id, not ours",
            f.detail,
            o.id,
            r.meta.key_sum(),
            r.state
        );
    } else if ctx.manifest_version.is_none() && max.is_some_and(|m| o.id <= m) {
        f.informational = true;
        f.action = "kept: no manifest, and the id is at or below the journal's highest id: \
                    probably one of ours whose Released record compaction dropped (an object of \
                    another data directory on this stream looks the same); never deleted"
            .into();
        return Some(f);
    } else {
        f.detail = format!(
            "{}; this data directory's journal never recorded segment {}",
            f.detail, o.id
        );
    }
    if age < ctx.grace_ms {
        f.informational = true;
        f.action = format!(
            "kept: younger than the grace period ({} ms), may be in flight; {UNKNOWN_ORIGIN_ADVICE}",
            ctx.grace_ms
        );
    } else {
        f.action = format!("kept: {UNKNOWN_ORIGIN_ADVICE}");
    }
    Some(f)
}

/// Rule 4 for the object of one of our own Quarantined segments: deleted
/// only with the full proof (see [`judge_unreferenced`]).
async fn judge_abandoned(
    ctx: &OrphanCtx<'_>,
    o: &Listed,
    r: &SegmentRecord,
    id_in_manifest: bool,
) -> Finding {
    let k = o.key.to_string();
    let age = ctx.now.saturating_sub(o.modified_ms);
    let reason = r.reason.as_deref().unwrap_or("no reason recorded");
    let mut f = Finding::new(
        FindingKind::AbandonedUpload,
        Some(o.id),
        &k,
        format!(
            "journal: segment {} Quarantined ({reason}), upload attempt {} under exactly this \
             key; {} bytes, last modified {age} ms ago",
            o.id, r.attempt, o.size
        ),
    );
    f.informational = true;
    let keep = |f: &mut Finding, why: String| f.action = format!("kept: {why}");
    if !ctx.cfg.manifest {
        keep(
            &mut f,
            "single-writer mode (manifest = false) never deletes objects".into(),
        );
        return f;
    }
    let Some(version) = ctx.manifest_version else {
        keep(
            &mut f,
            "no manifest to prove the segment was never committed".into(),
        );
        return f;
    };
    if id_in_manifest {
        keep(
            &mut f,
            format!(
                "manifest version {version} lists segment {} (another CRC)",
                o.id
            ),
        );
        return f;
    }
    if age < ctx.grace_ms {
        keep(
            &mut f,
            format!("younger than the grace period ({} ms)", ctx.grace_ms),
        );
        return f;
    }
    if !ctx.opts.repair {
        f.informational = false;
        f.action = "none (--repair deletes it once its bytes are proved equal to the intact \
                    local copy)"
            .into();
        return f;
    }
    let local = ctx.seg_dir.join(sealed_file_name(o.id));
    if upload::put::read_checked(&local, &r.meta).await.is_err() {
        f.informational = false;
        keep(
            &mut f,
            format!(
                "no intact local copy at {}: the object may hold the only copy of its entries; \
                 an operator decides",
                local.display()
            ),
        );
        return f;
    }
    match upload::verify_segment(ctx.store, &o.key, &r.meta, VerifyLevel::Full).await {
        Ok(()) => {}
        Err(e) => {
            f.informational = false;
            keep(
                &mut f,
                format!("its bytes could not be proved equal to the local copy ({e})"),
            );
            return f;
        }
    }
    // The pipeline never drives a Quarantined segment again, so this holds
    // in process too.
    match delete(ctx.store, ctx.cfg, &o.key).await {
        Ok(()) => {
            f.informational = false;
            f.deleted = true;
            f.action = format!(
                "deleted. Proof: the journal of this data directory records segment {} as \
                 Quarantined with upload attempt {} under exactly this key and checksum {}; \
                 manifest version {version} does not list the segment; older than the grace \
                 period ({} ms); its bytes equal the intact local copy {}, which is kept",
                o.id,
                r.attempt,
                o.sum,
                ctx.grace_ms,
                local.display()
            );
        }
        Err(e) => {
            f.informational = false;
            f.action = format!("delete failed: {e}");
        }
    }
    f
}

/// Rule 5: a finding per upload initiated longer ago than the grace period,
/// aborted with `repair` when its key is one of ours. Returns the report's
/// `multipart_uploads` line.
async fn stale_uploads(
    store: &RemoteStore,
    cfg: &Config,
    opts: &ReconcileOptions,
    view: &JournalView,
    uploads: &[PendingUpload],
    now: u64,
    findings: &mut Vec<Finding>,
) -> String {
    let grace_ms = u64::try_from(opts.grace.as_millis()).unwrap_or(u64::MAX);
    let (mut stale, mut aborted) = (0usize, 0usize);
    for u in uploads {
        // Unknown initiation time: it may be in flight, like a young one.
        let Some(age) = u.initiated_ms.map(|t| now.saturating_sub(t)) else {
            continue;
        };
        if age < grace_ms {
            continue;
        }
        stale += 1;
        let key = Path::parse(&u.key).ok();
        let ours = key
            .as_ref()
            .and_then(|k| keys::parse_segment_key(store.prefix(), k))
            .filter(|(s, _, _)| *s == cfg.stream);
        let current = ours
            .as_ref()
            .and_then(|(_, id, _)| view.get(*id))
            .filter(|r| {
                r.state == SegmentState::Uploading
                    && r.multipart_id.as_deref() == Some(u.upload_id.as_str())
                    && r.key.as_deref() == Some(u.key.as_str())
            });
        let mut f = Finding::new(
            FindingKind::StaleMultipart,
            ours.as_ref().map(|(_, id, _)| *id),
            &u.key,
            format!(
                "upload {:?} initiated {age} ms ago{}",
                u.upload_id,
                if current.is_some() {
                    "; the journal's current attempt of this segment (Uploading)"
                } else {
                    ""
                }
            ),
        );
        match (key, ours.is_some()) {
            (Some(key), true) if opts.repair => {
                match upload::abort_multipart_cfg(store, &key, &u.upload_id, &cfg.upload_config())
                    .await
                {
                    Ok(()) => {
                        aborted += 1;
                        f.repaired = true;
                        f.action = "aborted".into();
                    }
                    Err(e) => f.action = format!("abort failed: {e}"),
                }
            }
            (_, true) => f.action = "none (--repair aborts it)".into(),
            (_, false) => {
                f.informational = true;
                f.action = "kept: not a segment key of this stream; foreign uploads are \
                            never aborted"
                    .into();
            }
        }
        findings.push(f);
    }
    format!(
        "checked: {} in progress, {stale} stale, {aborted} aborted",
        uploads.len()
    )
}

/// The journal's record of a manifest entry's segment, if it records these
/// very bytes (same CRC and length): its local file may repair the object.
fn journal_copy<'a>(view: &'a JournalView, e: &SegmentEntry) -> Option<&'a SegmentRecord> {
    view.get(e.id)
        .filter(|r| r.meta.key_sum() == e.key_sum() && r.meta.file_len == e.file_len)
}

/// The key a journal record's object lives under.
fn record_key(store: &RemoteStore, stream: &str, r: &SegmentRecord) -> Result<Path> {
    match &r.key {
        Some(k) => Path::parse(k).map_err(|e| {
            Error::corrupt(
                format!("journal record of segment {}", r.meta.id),
                format!("key {k:?}: {e}"),
            )
        }),
        None => store.try_segment_key(stream, &r.meta),
    }
}

/// What is wrong with the object of `meta` under `key`, if anything.
async fn check_object(
    store: &RemoteStore,
    key: &Path,
    meta: &SealedMeta,
    sizes: &BTreeMap<String, u64>,
    deep: bool,
) -> Result<Option<(FindingKind, String)>> {
    Ok(match sizes.get(key.as_ref()) {
        None => Some((
            FindingKind::ObjectMissing,
            format!(
                "the journal records it at {} bytes; no object under the key",
                meta.file_len
            ),
        )),
        Some(&size) if size != meta.file_len => Some((
            FindingKind::SizeMismatch,
            format!(
                "object is {size} bytes, the journal records {}",
                meta.file_len
            ),
        )),
        Some(_) if deep => {
            match upload::verify_segment(store, key, meta, VerifyLevel::Full).await {
                Ok(()) => None,
                Err(Error::Corrupt { detail, .. }) => Some((FindingKind::ContentMismatch, detail)),
                Err(e) => return Err(e),
            }
        }
        Some(_) => None,
    })
}

/// Rule 1: re-upload from the local copy, or report LOST.
#[allow(clippy::too_many_arguments)]
async fn repair_object(
    store: &RemoteStore,
    cfg: &Config,
    opts: &ReconcileOptions,
    seg_dir: &FsPath,
    kind: FindingKind,
    key: &Path,
    meta: &SealedMeta,
    present: bool,
    detail: String,
) -> Finding {
    let mut f = Finding::new(kind, Some(meta.id), key.as_ref(), detail);
    let local = seg_dir.join(sealed_file_name(meta.id));
    // Read (and check) the local copy before anything is deleted: in a
    // running process the pipeline may release the file at any moment, and
    // these bytes must be in hand before the wrong object goes.
    let bytes = match upload::put::read_checked(&local, meta).await {
        Ok(b) => b,
        Err(_) => {
            f.lost = true;
            f.action = format!(
                "LOST: no local copy with the recorded length and CRC at {}; nothing deleted",
                local.display()
            );
            return f;
        }
    };
    if !opts.repair {
        f.action = "none (the local copy matches: --repair re-uploads it)".into();
        return f;
    }
    let mut moved_to = None;
    if present && !cfg.manifest {
        // Single-writer mode never deletes an object: the wrong bytes are
        // copied aside first (and the copy checked), so nothing is lost even
        // if this judgement were wrong.
        match move_aside(store, cfg, key).await {
            Ok(to) => {
                f.deleted = false;
                moved_to = Some(to);
            }
            Err(e) => {
                f.action = format!(
                    "none: could not move the wrong object aside ({e}); single-writer mode \
                     (manifest = false) never deletes objects. The local copy matches; the \
                     object under the key is not the bytes the key names ({}): move it aside \
                     by hand, then run reconcile --repair again to re-upload",
                    f.detail
                );
                return f;
            }
        }
    } else if present {
        // The key names the CRC of the only bytes that belong there: what
        // is under it now is wrong, and a create-only upload cannot replace it.
        if let Err(e) = delete(store, cfg, key).await {
            f.action = format!("repair failed: could not delete the wrong object: {e}");
            return f;
        }
        f.deleted = true;
    }
    match upload::put::put_segment_bytes(
        store,
        key,
        bytes,
        meta,
        &cfg.upload_config(),
        &mut NoHooks,
    )
    .await
    {
        Ok(_) => {
            f.repaired = true;
            f.action = if let Some(to) = &moved_to {
                format!(
                    "moved the wrong object aside to {to} (kept, not deleted) and re-uploaded \
                     from the local copy (verified). Proof: the journal records segment {} with \
                     checksum {} and {} bytes under this key ({}), the local copy matches it",
                    meta.id,
                    meta.key_sum(),
                    meta.file_len,
                    f.detail
                )
            } else if present {
                format!(
                    "deleted the wrong object, re-uploaded from the local copy (verified). \
                     Proof: the journal records segment {} with checksum {} and {} bytes under \
                     this key ({}), the local copy matches it",
                    meta.id,
                    meta.key_sum(),
                    meta.file_len,
                    f.detail
                )
            } else {
                "re-uploaded from the local copy (verified)".into()
            };
        }
        Err(e) if moved_to.is_some() => {
            f.action = format!(
                "moved the wrong object aside to {} (kept), but the re-upload failed: {e}; run \
                 reconcile --repair again",
                moved_to.as_deref().unwrap_or_default()
            )
        }
        Err(e) if f.deleted => {
            f.action = format!(
                "deleted the wrong object (the journal records other bytes under this key; the \
                 local copy matches them and is kept), but the re-upload failed: {e}; run \
                 reconcile --repair again"
            )
        }
        Err(e) => f.action = format!("repair failed: {e}"),
    }
    f
}

/// Folder under a stream where single-writer repairs keep the wrong objects
/// they replace (`{prefix}/{stream}/damaged/{name}.{ms}.{rand}`): outside
/// `segments/`, so no rule of the reconciler ever lists or touches them.
pub const DAMAGED_DIR: &str = "damaged";

/// Copies the object under `key` to `{prefix}/{stream}/damaged/...`, checks
/// the copy's size, then deletes the original. Returns the copy's key.
async fn move_aside(store: &RemoteStore, cfg: &Config, key: &Path) -> Result<String> {
    let os = store.object_store();
    let src = os.head(key).await.map_err(classify)?;
    let name = key.filename().unwrap_or("object");
    let to = store
        .prefix()
        .clone()
        .join(cfg.stream.as_str())
        .join(DAMAGED_DIR)
        .join(format!(
            "{name}.{}.{:08x}",
            crate::segment::now_ms(),
            fastrand::u32(..)
        ));
    os.copy(key, &to).await.map_err(classify)?;
    let copy = os.head(&to).await.map_err(classify)?;
    if copy.size != src.size {
        return Err(Error::Remote(format!(
            "the copy {to} is {} bytes, the object {} bytes; original left in place",
            copy.size, src.size
        )));
    }
    delete(store, cfg, key).await?;
    Ok(to.to_string())
}

/// Is a listed object one the journal knows is NOT committed (so it must
/// stay out of a rebuilt manifest)?
fn excluded_by_journal(r: Option<&SegmentRecord>, sum: KeySum) -> bool {
    match r {
        None => false,
        Some(r) if r.meta.key_sum() != sum => true,
        Some(r) => !matches!(
            r.state,
            SegmentState::Verified | SegmentState::Committed | SegmentState::Released
        ),
    }
}

/// Rule 3: the manifest entry of a listed object, from its footer. The
/// inner `Err` says why the object cannot be used.
async fn read_entry(
    store: &RemoteStore,
    stream: &str,
    o: &Listed,
    journaled: Option<&SegmentRecord>,
    deep: bool,
) -> Result<std::result::Result<SegmentEntry, String>> {
    let flen = FOOTER_LEN as u64;
    if o.size < flen {
        return Ok(Err(format!(
            "{} bytes, shorter than a footer ({flen})",
            o.size
        )));
    }
    let bytes = match store
        .object_store()
        .get_range(&o.key, o.size - flen..o.size)
        .await
    {
        Ok(b) => b,
        Err(object_store::Error::NotFound { .. }) => {
            return Ok(Err("vanished since the LIST".into()));
        }
        Err(e) => return Err(classify(e)),
    };
    let f = match Footer::decode(&bytes) {
        Ok(f) => f,
        Err(e) => return Ok(Err(format!("footer: {e}"))),
    };
    if f.segment_id != o.id {
        return Ok(Err(format!(
            "footer says segment {}, the key says {}",
            f.segment_id, o.id
        )));
    }
    if f.file_len != o.size {
        return Ok(Err(format!(
            "footer says {} bytes, the object is {}",
            f.file_len, o.size
        )));
    }
    if matches!(o.sum, KeySum::Crc64(_)) != (f.version >= format::SEALED_FORMAT_VERSION) {
        return Ok(Err(format!(
            "the key names checksum {} but the footer is format {}",
            o.sum, f.version
        )));
    }
    // A format-2 key names the CRC64; the entry also keeps the CRC32, taken
    // from our journal's record of these very bytes, else from one streamed
    // read that must reproduce the CRC64 the key names.
    let (file_crc, crc64) = match o.sum {
        KeySum::Crc32(c) => (c, None),
        KeySum::Crc64(c) => match journaled.filter(|r| r.meta.key_sum() == o.sum) {
            Some(r) => (r.meta.file_crc, Some(c)),
            None => match upload::verify::object_sums(store, &o.key, o.size).await? {
                None => return Ok(Err("vanished since the LIST".into())),
                Some((len, s)) if len == o.size && s.crc64 == c => (s.crc32, Some(c)),
                Some(_) => {
                    return Ok(Err(format!(
                        "its bytes do not have the CRC64 {c:016x} its key names"
                    )));
                }
            },
        },
    };
    let meta = SealedMeta {
        id: o.id,
        file_len: o.size,
        file_crc,
        crc64,
        item_count: f.item_count,
        min_ts: f.min_ts,
        max_ts: f.max_ts,
        min_offset: f.min_offset,
        max_offset: f.max_offset,
        created_ms: f.created_ms,
        sealed_ms: f.sealed_ms,
    };
    if let Some(r) = journaled {
        let j = &r.meta;
        if (j.item_count, j.min_ts, j.max_ts, j.min_offset, j.max_offset)
            != (f.item_count, f.min_ts, f.max_ts, f.min_offset, f.max_offset)
        {
            return Ok(Err("footer disagrees with the journal's record".into()));
        }
    }
    if deep {
        match upload::verify_segment(store, &o.key, &meta, VerifyLevel::Full).await {
            Ok(()) => {}
            Err(Error::Corrupt { detail, .. }) => return Ok(Err(detail)),
            Err(e) => return Err(e),
        }
    }
    let e = SegmentEntry::new(store, stream, &meta)?;
    if e.key != o.key.as_ref() {
        return Ok(Err(format!("key does not round-trip: {}", e.key)));
    }
    Ok(Ok(e))
}

/// Takes ownership as the config's owner for one repair write. The `Err`
/// is the finding's action text ("`what` ..."): a live lease of another
/// owner is never fenced.
async fn take_for_repair(
    store: &RemoteStore,
    cfg: &Config,
    what: &str,
) -> std::result::Result<(ManifestWriter, String), String> {
    let fail = |e: Error| format!("{what}: {e}");
    let owner = cfg.effective_owner_id().map_err(fail)?;
    let ms = ManifestStore::open(store, &cfg.stream, cfg.manifest_options())
        .await
        .map_err(fail)?;
    match ms.take_ownership(&owner, cfg.lease_ttl()).await {
        Ok(w) => Ok((w, owner)),
        Err(Error::Claimed(m)) => Err(format!(
            "{what} (Claimed): {m}; the reconciler never fences a live owner"
        )),
        Err(e) => Err(fail(e)),
    }
}

/// Gives the lease taken by [`take_for_repair`] back; `done` is the action.
async fn release_after_repair(w: ManifestWriter, done: String) -> String {
    match w.release().await {
        Ok(()) => done,
        Err(e) => format!("{done} (releasing the lease failed: {e})"),
    }
}

/// Commits `entries` as the config's owner, then releases the lease. The
/// `Err` is the action text when nothing was committed.
async fn commit_entries(
    store: &RemoteStore,
    cfg: &Config,
    entries: &[SegmentEntry],
) -> std::result::Result<String, String> {
    let (mut w, owner) = take_for_repair(store, cfg, "not repaired").await?;
    let out = match w.commit(entries).await {
        Ok(out) => out,
        Err(e) => {
            let _ = w.release().await;
            return Err(format!("not repaired: {e}"));
        }
    };
    let done = match out {
        CommitOutcome::Committed { version, added } => {
            format!("committed {added} entr(ies) in manifest version {version} as owner {owner:?}")
        }
        CommitOutcome::AlreadyCommitted { version } => {
            format!("already listed in manifest version {version}")
        }
    };
    Ok(release_after_repair(w, done).await)
}

/// Clears and adds manifest damage notes as the config's owner, then
/// releases the lease. The `Err` is the action text when nothing was
/// written.
async fn write_notes(
    store: &RemoteStore,
    cfg: &Config,
    clears: &[SegmentId],
    marks: &[DamageNote],
) -> std::result::Result<String, String> {
    let what = "manifest not updated";
    let (mut w, owner) = take_for_repair(store, cfg, what).await?;
    if let Err(e) = apply_notes(&mut w, clears, marks).await {
        let _ = w.release().await;
        return Err(format!("{what}: {e}"));
    }
    let done = format!(
        "manifest notes: {} cleared, {} marked lost (version {}, owner {owner:?})",
        clears.len(),
        marks.len(),
        w.manifest().version
    );
    Ok(release_after_repair(w, done).await)
}

/// Clears the damage notes of `clears`, then adds `marks`.
pub(crate) async fn apply_notes(
    w: &mut ManifestWriter,
    clears: &[SegmentId],
    marks: &[DamageNote],
) -> Result<()> {
    for id in clears {
        w.clear_damage(*id).await?;
    }
    for n in marks {
        w.mark_damaged(n.clone()).await?;
    }
    Ok(())
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
