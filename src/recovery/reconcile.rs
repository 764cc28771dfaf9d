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
//!    segment it set aside: every proof in `orphans::judge_unreferenced` holds
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
//!
//! Each rule is one method of `run::Run` (the run's shared state),
//! in its own file: `rule_objects.rs` (1), `rule_manifest.rs` (2, 3),
//! `rule_damage.rs` (the manifest's damage notes), `orphans.rs` (4),
//! `multipart.rs` (5); `reconcile_with` calls them in that order, then
//! the manifest writes they asked for go out together before rule 4.

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
use crate::retry::with_retries;
use crate::upload::{self, NoHooks, VerifyLevel};

mod manifest_writes;
mod multipart;
mod orphans;
mod repair;
mod report;
mod rule_damage;
mod rule_manifest;
pub use rule_manifest::manifest_lost_released;
mod rule_objects;
mod run;

use manifest_writes::*;
pub(crate) use manifest_writes::apply_notes;
use repair::*;
pub use report::*;
use run::*;

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
    /// Record the operator's acceptance of the loss of each `(id, key)`
    /// (LOST notes; [`ReconcileOptions::accept_loss`]). Only the standalone
    /// tool accepts a loss.
    async fn accept_losses(
        &self,
        losses: &[(SegmentId, String)],
        reason: &str,
    ) -> std::result::Result<String, String> {
        let _ = (losses, reason);
        Err("nothing accepted: only `tierindex reconcile --accept-loss` accepts a loss".into())
    }
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
    async fn accept_losses(
        &self,
        losses: &[(SegmentId, String)],
        reason: &str,
    ) -> std::result::Result<String, String> {
        accept_losses(self.store, self.cfg, losses, reason).await
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
    // On a blocking thread: the lock may wait (briefly) for a forked
    // child's copy of it (`lock::try_lock_dir`).
    let _lock = if opts.repair {
        let dir = cfg.data_dir.clone();
        Some(
            tokio::task::spawn_blocking(move || DataDir::open(&dir))
                .await
                .map_err(|e| Error::Internal(format!("data directory lock task failed: {e}")))??,
        )
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
    let accepting = !opts.accept_loss.is_empty();
    if accepting && (!opts.repair || !opts.deep) {
        return Err(Error::InvalidInput(
            "accepting a loss needs --repair and --deep: the run must read the object in full \
             and find no intact copy to repair from before it records the loss as accepted"
                .into(),
        ));
    }
    if accepting && !cfg.manifest {
        return Err(Error::InvalidInput(
            "accepting a loss is recorded in the stream's manifest: this data directory runs \
             with manifest = false"
                .into(),
        ));
    }
    let mut run = Run::load(cfg, store, opts).await?;
    run.journal_objects().await?; // 1
    if run.manifest.is_some() {
        run.manifest_entries().await?; // 2
    } else {
        run.rebuild_manifest().await?; // 3
    }
    run.damage_notes().await?;
    run.unaccepted();
    let manifest_now = run.write_manifest(access).await;
    // One clock reading for both age rules (the grace period).
    let now = crate::segment::now_ms();
    run.unreferenced(manifest_now, now).await?; // 4
    let multipart = run.multipart(now).await; // 5
    Ok(run.report(multipart))
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
            ..ReconcileOptions::default()
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

    /// A committed segment the manifest lists and the journal no longer
    /// records (released, compacted away): `--deep` reads its body
    /// (helper-78 F2: "0 findings" over a damaged one); without a copy it
    /// is LOST, marked with `--repair`; an operator accepts the loss, after
    /// which it is reported, not asked again; a copy put back repairs it.
    #[tokio::test]
    async fn a_manifest_only_loss_is_found_by_deep_marked_accepted_and_still_repairable() {
        let (_tmp, cfg, store) = rig(true).await;
        with_quarantined_4(&cfg, &store).await;
        let (good, meta5) = sealed(5);
        let key5 = store.segment_key(STREAM, &meta5);
        commit_entries(&store, &cfg, &[SegmentEntry::new(&store, STREAM, &meta5).unwrap()])
            .await
            .unwrap();
        let mut bad = good.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x55;
        put(&store, &key5, &bad).await;
        let deep = |repair: bool, accept: Vec<u64>| ReconcileOptions {
            repair,
            deep: true,
            grace: Duration::from_secs(3600),
            accept_loss: accept.into_iter().map(SegmentId).collect(),
            accept_reason: "gone with the old bucket".into(),
        };
        let five = |r: &ReconcileReport| -> Vec<Finding> {
            r.findings
                .iter()
                .filter(|f| f.segment == Some(5))
                .cloned()
                .collect()
        };
        let r = reconcile(&cfg, &store, &deep(false, vec![])).await.unwrap();
        let f = five(&r);
        assert!(
            f.iter()
                .any(|f| f.kind == FindingKind::ContentMismatch && f.lost && f.unresolved()),
            "{f:#?}"
        );
        // Accepting needs --repair --deep.
        let no_deep = ReconcileOptions {
            deep: false,
            ..deep(true, vec![5])
        };
        assert!(matches!(
            reconcile(&cfg, &store, &no_deep).await,
            Err(Error::InvalidInput(_))
        ));
        // A file under segment 5's name the journal does not record may be
        // its bytes: not LOST, nothing marked or accepted (helper-79 F2).
        let stray = cfg.data_dir.join("segments").join(sealed_file_name(SegmentId(5)));
        std::fs::write(&stray, &good).unwrap();
        let r = reconcile(&cfg, &store, &deep(true, vec![5])).await.unwrap();
        let f = five(&r);
        assert!(
            f.iter().all(|f| !f.lost && !f.accepted_loss) && f.iter().any(|f| f.unresolved()),
            "{f:#?}"
        );
        let ms = ManifestStore::reader(&store, STREAM, cfg.manifest_options()).unwrap();
        assert!(ms.load().await.unwrap().unwrap().damage(SegmentId(5)).is_none());
        std::fs::remove_file(&stray).unwrap();
        // Nor one in quarantine/, where tierindex moves sealed files
        // (helper-80 F2).
        let q = cfg.data_dir.join("quarantine");
        std::fs::create_dir_all(&q).unwrap();
        let stray = q.join(format!("{}.1234", sealed_file_name(SegmentId(5))));
        std::fs::write(&stray, &good).unwrap();
        let r = reconcile(&cfg, &store, &deep(true, vec![5])).await.unwrap();
        let f = five(&r);
        assert!(f.iter().all(|f| !f.lost && !f.accepted_loss), "{f:#?}");
        assert!(ms.load().await.unwrap().unwrap().damage(SegmentId(5)).is_none());
        std::fs::remove_file(&stray).unwrap();
        // Marked LOST, then accepted; segment 2 (whole) is not accepted.
        reconcile(&cfg, &store, &deep(true, vec![])).await.unwrap();
        let r = reconcile(&cfg, &store, &deep(true, vec![5, 2])).await.unwrap();
        let f = five(&r);
        assert!(f.iter().any(|f| f.lost && f.accepted_loss), "{f:#?}");
        assert!(f.iter().all(|f| !f.unresolved()), "{f:#?}");
        assert!(
            r.findings.iter().any(|f| f.segment == Some(2)
                && f.unresolved()
                && f.action == "nothing accepted"),
            "{:#?}",
            r.findings
        );
        let m = ms.load().await.unwrap().unwrap();
        let note = m.damage(SegmentId(5)).unwrap();
        assert!(note.loss_accepted(), "{note:?}");
        assert_eq!(note.accepted.as_ref().unwrap().reason, "gone with the old bucket");
        assert!(m.damage(SegmentId(2)).is_none());
        // A later run reports it, accepted, not lost.
        let r = reconcile(&cfg, &store, &opts(false, Duration::from_secs(3600)))
            .await
            .unwrap();
        let f = five(&r);
        assert!(!f.is_empty() && f.iter().all(|f| !f.unresolved()), "{f:#?}");
        assert!(r.accepted_losses >= 1 && r.lost == 0, "{r:#?}");
        // The intact bytes turn up: the repair clears the note.
        put(&store, &key5, &good).await;
        reconcile(&cfg, &store, &deep(true, vec![])).await.unwrap();
        let m = ms.load().await.unwrap().unwrap();
        assert!(m.damage(SegmentId(5)).is_none(), "{:?}", m.damaged);
    }

    /// A valid sealed object of 20 entries from offset `from`, put under
    /// segment `id`'s key.
    async fn plant(store: &RemoteStore, id: u64, from: u64) {
        let entries: Vec<Entry> = (0..20)
            .map(|i| Entry {
                key_hash: i % 5,
                offset: from + i,
                size: 10,
                timestamp_ms: 1_000 + i,
            })
            .collect();
        let (bytes, meta) = build_sealed(SegmentId(id), 1, 2, 8, &entries).unwrap();
        put(store, &store.segment_key(STREAM, &meta), &bytes).await;
    }

    /// The ids the stream's manifest lists now.
    async fn committed_ids(store: &RemoteStore, cfg: &Config) -> Vec<u64> {
        let ms = ManifestStore::reader(store, STREAM, cfg.manifest_options()).unwrap();
        let m = ms.load().await.unwrap().unwrap();
        ms.all_segments(&m).await.unwrap().iter().map(|e| e.id.0).collect()
    }

    /// Rule 2d does not commit again an unreferenced object whose offsets
    /// overlap a listed entry's (another seal of entries the manifest
    /// holds: a second writer on the stream): kept and reported, as
    /// before.
    #[tokio::test]
    async fn an_unreferenced_object_overlapping_a_listed_entry_is_not_committed() {
        let (_tmp, cfg, store) = rig(true).await;
        with_quarantined_4(&cfg, &store).await;
        // The rig's segment 1 replaced: segment 1's id, segment 2's
        // offsets (200..219).
        store
            .object_store()
            .delete(&store.segment_key(STREAM, &sealed(1).1))
            .await
            .unwrap();
        plant(&store, 1, 200).await;
        let r = reconcile(&cfg, &store, &opts(true, Duration::from_secs(3600)))
            .await
            .unwrap();
        assert!(
            !r.findings
                .iter()
                .any(|f| f.segment == Some(1) && f.kind == FindingKind::ManifestLostEntries),
            "{:#?}",
            r.findings
        );
        let ids = committed_ids(&store, &cfg).await;
        assert!(!ids.contains(&1), "{ids:?}");
    }

    /// Rule 2d never commits an object at id 0 (no data directory gives
    /// it out; helper-80 F1), however valid its bytes.
    #[tokio::test]
    async fn an_object_at_id_0_is_not_committed_again() {
        let (_tmp, cfg, store) = rig(true).await;
        with_quarantined_4(&cfg, &store).await;
        plant(&store, 0, 7_000).await;
        reconcile(&cfg, &store, &opts(true, Duration::ZERO)).await.unwrap();
        let ids = committed_ids(&store, &cfg).await;
        assert!(!ids.contains(&0), "{ids:?}");
        assert!(ids.contains(&1), "the rig's segment 1 is committed again: {ids:?}");
    }

    /// Rule 2d leaves an id with two objects (two seals of it, one maybe
    /// another writer's) to rule 4, and out of the batch the manifest
    /// writer would refuse whole (helper-79 F4): nothing at that id is
    /// committed, both objects stay, and the run's commit goes through.
    #[tokio::test]
    async fn an_id_with_two_objects_is_not_committed_again() {
        let (_tmp, cfg, store) = rig(true).await;
        with_quarantined_4(&cfg, &store).await;
        // A second object at the rig's id 1, offsets no entry has.
        plant(&store, 1, 9_000).await;
        let before = keys_left(&store).await;
        let ones = before
            .iter()
            .filter(|k| k.contains("/00000000000000000001-"))
            .count();
        assert_eq!(ones, 2, "{before:?}");
        let r = reconcile(&cfg, &store, &opts(true, Duration::ZERO))
            .await
            .unwrap();
        assert!(
            !r.findings
                .iter()
                .any(|f| f.segment == Some(1) && f.kind == FindingKind::ManifestLostEntries),
            "{:#?}",
            r.findings
        );
        let ids = committed_ids(&store, &cfg).await;
        assert!(!ids.contains(&1), "{ids:?}");
        assert!(ids.contains(&2) && ids.contains(&3), "{ids:?}");
        let after = keys_left(&store).await;
        assert_eq!(
            after
                .iter()
                .filter(|k| k.contains("/00000000000000000001-"))
                .count(),
            2,
            "{after:?}"
        );
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
        // Nothing else was deleted: the other seal of 3, 9 (never
        // recorded, above the journal's highest id); 1 (at or below it,
        // in neither the journal nor the manifest: released and compacted
        // out of the journal, rule 2d) is committed again, not deleted.
        for id in [3u64, 9] {
            let o = f[&(id, FindingKind::Orphan)];
            assert!(!o.deleted && o.unresolved(), "{o:?}");
        }
        let ms = ManifestStore::reader(&store, STREAM, cfg.manifest_options()).unwrap();
        let m = ms.load().await.unwrap().unwrap();
        assert!(
            ms.all_segments(&m)
                .await
                .unwrap()
                .iter()
                .any(|e| e.id == SegmentId(1)),
            "segment 1 committed again"
        );
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
