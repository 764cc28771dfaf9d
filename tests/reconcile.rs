//! The reconciler (`recovery::reconcile`, `tierindex reconcile`) on a
//! `file://` store filled by a real drain: each case damages one view
//! behind the code's back and checks the report's findings and what the
//! store holds afterwards.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use tempfile::TempDir;

use tierindex::journal::{SegmentRecord, SegmentState};
use tierindex::lifecycle::{EXIT_DRAINED, EXIT_NEEDS_OPERATOR};
use tierindex::recovery::reconcile::{FindingKind, ReconcileOptions, ReconcileReport, reconcile};
use tierindex::remote::RemoteStore;
use tierindex::remote::manifest::{ManifestOptions, ManifestStore, SegmentEntry};
use tierindex::{Config, SegmentId, TierIndex};

const STREAM: &str = "orders";
const ITEMS: u32 = 50;
const TS0: u64 = 1_700_000_000_000;
const OWNER: &str = "recon-owner";

struct Rig {
    _tmp: TempDir,
    data: PathBuf,
    store_dir: PathBuf,
    cfg: Config,
}

impl Rig {
    /// A data directory drained to a `file://` store with the manifest on:
    /// every segment Committed, local copies kept.
    async fn drained() -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let store_dir = tmp.path().join("store");
        let cfg = Config {
            data_dir: data.clone(),
            store: Some(format!("file://{}", store_dir.display())),
            stream: STREAM.into(),
            segment_items: ITEMS,
            slot_count: 64,
            segment_max_age_ms: None,
            tick_ms: 20,
            max_attempts: 3,
            request_timeout_ms: 5000,
            release_after_commit: false,
            manifest: true,
            owner_id: Some(OWNER.into()),
            lease_ttl_ms: 60_000,
            ..Config::default()
        };
        let (ti, _) = TierIndex::open(cfg.clone()).await.unwrap();
        for o in 0..(ITEMS as u64 * 4 + 10) {
            ti.append(format!("k{}", o % 7).as_bytes(), o, 100, TS0 + o)
                .unwrap();
        }
        ti.flush().unwrap();
        let r = ti.shutdown(Duration::from_secs(30)).await;
        assert!(r.fully_drained(), "{r:?}");
        let rig = Rig {
            _tmp: tmp,
            data,
            store_dir,
            cfg,
        };
        let committed = rig.committed();
        assert!(committed.len() >= 4, "{committed:?}");
        rig
    }

    fn store(&self) -> RemoteStore {
        tierindex::tier::open_store(&self.cfg).unwrap()
    }

    async fn run(&self, repair: bool, deep: bool, grace: Duration) -> ReconcileReport {
        let opts = ReconcileOptions {
            repair,
            grace,
            deep,
            ..Default::default()
        };
        reconcile(&self.cfg, &self.store(), &opts).await.unwrap()
    }

    fn committed(&self) -> BTreeMap<SegmentId, SegmentRecord> {
        common::journal_view(&self.data)
            .segments()
            .iter()
            .filter(|(_, r)| r.state == SegmentState::Committed)
            .map(|(id, r)| (*id, r.clone()))
            .collect()
    }

    /// Path in the store directory of the object of `r`.
    fn object_path(&self, r: &SegmentRecord) -> PathBuf {
        let key = self.store().segment_key(STREAM, &r.meta);
        self.store_dir.join(key.as_ref())
    }

    fn segments_dir(&self) -> PathBuf {
        self.store_dir.join(STREAM).join("segments")
    }

    fn manifest_store(&self) -> ManifestStore {
        ManifestStore::reader(&self.store(), STREAM, ManifestOptions::default()).unwrap()
    }

    fn cli(&self, args: &[&str]) -> (i32, String) {
        let o = Command::new(env!("CARGO_BIN_EXE_tierindex"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("TIERINDEX_LOG", "warn")
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--store")
            .arg(self.cfg.store.as_deref().unwrap())
            .arg("--stream")
            .arg(STREAM)
            .args(args)
            .output()
            .expect("run tierindex");
        let stderr = String::from_utf8_lossy(&o.stderr);
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        (
            o.status
                .code()
                .unwrap_or_else(|| panic!("killed: {stderr}")),
            format!("{stdout}{stderr}"),
        )
    }
}

/// Every file under `dir` (relative path), with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    common::files_under(dir)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(dir.join(&p)).unwrap();
            (p, b)
        })
        .collect()
}

fn kinds(r: &ReconcileReport) -> Vec<(FindingKind, Option<u64>)> {
    r.findings.iter().map(|f| (f.kind, f.segment)).collect()
}

fn assert_clean(r: &ReconcileReport) {
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
    assert_eq!((r.unresolved, r.lost, r.repaired), (0, 0, 0));
    assert!(!r.needs_operator());
    // file:// lists its staging directory: a drained store has no upload left.
    assert_eq!(
        r.multipart_uploads,
        "checked: 0 in progress, 0 stale, 0 aborted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_state_has_no_findings() {
    let rig = Rig::drained().await;
    let r = rig.run(false, true, Duration::from_secs(3600)).await;
    assert_clean(&r);
    assert!(r.manifest_present);
    assert_eq!(r.manifest_segments, rig.committed().len());
    assert_eq!(r.listed_objects, rig.committed().len());

    let (code, out) = rig.cli(&["--json", "reconcile", "--deep"]);
    assert_eq!(code, EXIT_DRAINED, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(v["findings_total"], 0, "{v}");
    assert_eq!(v["findings"].as_array().map(Vec::len), Some(0));
    assert_eq!(
        v["multipart_uploads"], "checked: 0 in progress, 0 stale, 0 aborted",
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_object_is_reuploaded_or_reported_lost() {
    let rig = Rig::drained().await;
    let committed = rig.committed();
    let (id, rec) = committed.iter().nth(1).unwrap();
    let obj = rig.object_path(rec);
    let original = std::fs::read(&obj).unwrap();
    std::fs::remove_file(&obj).unwrap();

    // Report only: found, nothing written.
    let r = rig.run(false, false, Duration::from_secs(3600)).await;
    assert_eq!(kinds(&r), vec![(FindingKind::ObjectMissing, Some(id.0))]);
    let f = &r.findings[0];
    assert!(!f.repaired && !f.lost, "{f:?}");
    assert!(f.action.starts_with("none"), "{f:?}");
    assert!(r.needs_operator());
    assert!(!obj.exists());

    // Repair: re-uploaded from the local copy, byte for byte.
    let r = rig.run(true, false, Duration::from_secs(3600)).await;
    assert_eq!(kinds(&r), vec![(FindingKind::ObjectMissing, Some(id.0))]);
    assert!(r.findings[0].repaired, "{:?}", r.findings[0]);
    assert!(!r.needs_operator());
    assert_eq!(std::fs::read(&obj).unwrap(), original);
    assert_clean(&rig.run(false, true, Duration::from_secs(3600)).await);

    // Object and local copy both gone: LOST, exit 4, nothing deleted.
    std::fs::remove_file(&obj).unwrap();
    std::fs::remove_file(common::sealed_path(&rig.data, *id)).unwrap();
    let before = snapshot(&rig.store_dir);
    // Single-writer mode, explicitly (the CLI's default is the manifest).
    let (code, out) = rig.cli(&[
        "--manifest",
        "false",
        "reconcile",
        "--repair",
        "--grace-ms",
        "0",
    ]);
    assert_eq!(code, EXIT_NEEDS_OPERATOR, "{out}");
    assert!(out.contains("LOST object missing"), "{out}");
    assert!(out.contains(&format!("{:020}", id.0)), "{out}");
    assert!(out.contains("1 unresolved, 1 lost"), "{out}");
    assert!(!out.contains("AWS_"), "{out}");
    let after = snapshot(&rig.store_dir);
    // Nothing under segments/ or manifest/ changed (the manifest's probe
    // objects aside): the CLI ran with `--manifest false`, so it may not
    // write the manifest.
    let strip = |m: &BTreeMap<PathBuf, Vec<u8>>| -> BTreeMap<PathBuf, Vec<u8>> {
        m.iter()
            .filter(|(p, _)| p.starts_with(STREAM))
            .map(|(p, b)| (p.clone(), b.clone()))
            .collect()
    };
    assert_eq!(strip(&before), strip(&after));
    // With `manifest = true`, a repair run marks the segment LOST in the
    // manifest (every reader then says so instead of failing a read), and
    // changes nothing under segments/.
    let r = rig.run(true, false, Duration::from_secs(3600)).await;
    assert_eq!(r.lost, 1, "{:#?}", r.findings);
    assert!(
        r.findings[0].action.contains("1 marked lost"),
        "{:?}",
        r.findings[0]
    );
    let seg_only = |m: &BTreeMap<PathBuf, Vec<u8>>| -> BTreeMap<PathBuf, Vec<u8>> {
        m.iter()
            .filter(|(p, _)| p.starts_with(Path::new(STREAM).join("segments")))
            .map(|(p, b)| (p.clone(), b.clone()))
            .collect()
    };
    assert_eq!(seg_only(&before), seg_only(&snapshot(&rig.store_dir)));
    let ms = rig.manifest_store();
    let m = ms.load().await.unwrap().unwrap();
    let note = m.damage(*id).expect("lost segment marked in the manifest");
    assert!(note.lost, "{note:?}");
    assert_eq!(m.damaged.len(), 1);
    assert_eq!(m.lease, None, "the reconciler released the lease it took");
    let r = rig.run(false, false, Duration::from_secs(3600)).await;
    assert_eq!(
        kinds(&r),
        vec![
            (FindingKind::ObjectMissing, Some(id.0)),
            (FindingKind::ManifestDamaged, Some(id.0))
        ]
    );
    assert!(r.findings[0].lost && r.findings[0].action.starts_with("LOST"));
    // The note follows the finding above: one lost segment counts once.
    let note_f = &r.findings[1];
    assert!(note_f.informational && !note_f.lost, "{note_f:?}");
    assert!(
        note_f
            .action
            .contains("see the object missing finding above"),
        "{note_f:?}"
    );
    assert_eq!((r.lost, r.unresolved), (1, 1));
    // A second repair run marks nothing new.
    let r = rig.run(true, false, Duration::from_secs(3600)).await;
    assert_eq!(r.lost, 1);
    assert_eq!(ms.load().await.unwrap().unwrap().version, m.version);
    // The object restored from a backup with its old modification time
    // (`cp -p`): a repair run does not download a LOST object that has not
    // changed since it was marked, but `--deep` reads it, finds it whole
    // and clears the note (helper-72 F1: it stayed LOST).
    std::fs::write(&obj, &original).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&obj)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000))
        .unwrap();
    let r = rig.run(true, false, Duration::from_secs(3600)).await;
    assert_eq!(r.lost, 1, "{:#?}", r.findings);
    let r = rig.run(true, true, Duration::from_secs(3600)).await;
    assert_eq!((r.lost, r.unresolved), (0, 0), "{:#?}", r.findings);
    assert!(
        ms.load().await.unwrap().unwrap().damaged.is_empty(),
        "the note is cleared"
    );
    assert_eq!(std::fs::read(&obj).unwrap(), original, "left as restored");
    assert_clean(&rig.run(false, true, Duration::from_secs(3600)).await);
}

/// A damage note a reader left in the manifest (an object whose bytes went
/// bad), with the local copy still held: report-only says so; `--repair`
/// deletes the wrong object, re-uploads the local copy and clears the note.
/// A note whose object verifies whole again is cleared without an upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_note_is_repaired_from_the_local_copy_and_cleared() {
    use tierindex::remote::manifest::DamageNote;
    let rig = Rig::drained().await;
    let committed = rig.committed();
    let mut it = committed.iter();
    let (id, rec) = it.next().unwrap();
    let (id2, _) = it.next().unwrap();
    let obj = rig.object_path(rec);
    let original = std::fs::read(&obj).unwrap();
    let mut flipped = original.clone();
    flipped[original.len() / 3] ^= 0x01;
    std::fs::write(&obj, &flipped).unwrap();
    // A reader's note on the flipped one; a stale note on a whole one.
    let ms = rig.manifest_store();
    let mut w = ms
        .take_ownership("a-reader", Duration::from_secs(30))
        .await
        .unwrap();
    let entries = ms.all_segments(w.manifest()).await.unwrap();
    let e = entries.iter().find(|e| e.id == *id).unwrap();
    let e2 = entries.iter().find(|e| e.id == *id2).unwrap();
    w.mark_damaged(DamageNote::new(e, "object CRC32 differs", false, 1))
        .await
        .unwrap();
    w.mark_damaged(DamageNote::new(e2, "a read went bad", false, 2))
        .await
        .unwrap();
    w.release().await.unwrap();

    let r = rig.run(false, false, Duration::from_secs(3600)).await;
    assert_eq!(
        kinds(&r),
        vec![
            (FindingKind::ManifestDamaged, Some(id.0)),
            (FindingKind::ManifestDamaged, Some(id2.0))
        ],
        "{:#?}",
        r.findings
    );
    assert!(r.findings.iter().all(|f| !f.repaired && !f.lost));
    assert!(r.needs_operator());
    assert_eq!(std::fs::read(&obj).unwrap(), flipped, "report-only wrote");

    let r = rig.run(true, false, Duration::from_secs(3600)).await;
    assert!(r.findings.iter().all(|f| f.repaired), "{:#?}", r.findings);
    assert!(
        r.findings[0].action.contains("re-uploaded"),
        "{:?}",
        r.findings[0]
    );
    assert!(
        r.findings[1].action.contains("verifies whole"),
        "{:?}",
        r.findings[1]
    );
    assert!(!r.needs_operator());
    assert_eq!(std::fs::read(&obj).unwrap(), original);
    assert!(ms.load().await.unwrap().unwrap().damaged.is_empty());
    assert_clean(&rig.run(false, true, Duration::from_secs(3600)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_flip_is_found_only_deep_and_repaired() {
    let rig = Rig::drained().await;
    let committed = rig.committed();
    let (id, rec) = committed.iter().next().unwrap();
    let obj = rig.object_path(rec);
    let original = std::fs::read(&obj).unwrap();
    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x10;
    std::fs::write(&obj, &flipped).unwrap();

    assert_clean(&rig.run(false, false, Duration::from_secs(3600)).await);
    let r = rig.run(false, true, Duration::from_secs(3600)).await;
    assert_eq!(kinds(&r), vec![(FindingKind::ContentMismatch, Some(id.0))]);
    assert!(r.needs_operator());
    assert_eq!(std::fs::read(&obj).unwrap(), flipped, "report-only wrote");

    let r = rig.run(true, true, Duration::from_secs(3600)).await;
    assert_eq!(kinds(&r), vec![(FindingKind::ContentMismatch, Some(id.0))]);
    assert!(r.findings[0].repaired, "{:?}", r.findings[0]);
    assert_eq!(std::fs::read(&obj).unwrap(), original);
    assert_clean(&rig.run(false, true, Duration::from_secs(3600)).await);
}

fn expected_entries(rig: &Rig) -> Vec<SegmentEntry> {
    let store = rig.store();
    rig.committed()
        .values()
        .map(|r| SegmentEntry::new(&store, STREAM, &r.meta).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_manifest_is_rebuilt_from_the_listing() {
    let rig = Rig::drained().await;
    let ms = rig.manifest_store();
    let m = ms.load().await.unwrap().unwrap();
    assert_eq!(ms.all_segments(&m).await.unwrap(), expected_entries(&rig));
    std::fs::remove_dir_all(rig.store_dir.join(STREAM).join("manifest")).unwrap();
    assert!(ms.load().await.unwrap().is_none());

    let r = rig.run(false, false, Duration::from_secs(3600)).await;
    assert_eq!(kinds(&r), vec![(FindingKind::ManifestLost, None)]);
    assert!(r.needs_operator());
    assert!(ms.load().await.unwrap().is_none(), "report-only wrote");

    let r = rig.run(true, true, Duration::from_secs(3600)).await;
    assert_eq!(kinds(&r), vec![(FindingKind::ManifestLost, None)]);
    assert!(r.findings[0].repaired, "{:?}", r.findings[0]);
    let m = ms.load().await.unwrap().expect("rebuilt");
    let rebuilt = ms.all_segments(&m).await.unwrap();
    // Exactly the journal's committed segments: ids, keys, lengths, CRCs
    // and the footer fields.
    assert_eq!(rebuilt, expected_entries(&rig));
    assert_eq!(m.segment_count, rig.committed().len() as u64);
    // Written as the config's owner, lease given back.
    assert!(m.lease.is_none(), "{m:?}");
    assert_clean(&rig.run(false, false, Duration::from_secs(3600)).await);
}

/// helper-72 F4: a rebuild of a lost manifest committed a listed object no
/// journal record names, above the journal's highest id, although it was
/// seconds old (another stream's segment planted under this stream's
/// prefix, or another writer's upload in flight). The rebuild now waits
/// until such an object is older than the grace period, says so (exit 4),
/// writes no manifest and keeps the object; once it is older, the rebuild
/// includes it (leaving it out would be for good: helper-73).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_waits_for_a_young_object_of_unknown_origin() {
    let rig = Rig::drained().await;
    let ms = rig.manifest_store();
    std::fs::remove_dir_all(rig.store_dir.join(STREAM).join("manifest")).unwrap();
    let id = rig.committed().keys().next_back().unwrap().0 + 1;
    let entries = [tierindex::Entry {
        key_hash: 1,
        offset: 9_000_000,
        size: 1,
        timestamp_ms: 1,
    }];
    let (bytes, meta) =
        tierindex::segment::sealed::build_sealed(SegmentId(id), 1, 2, 64, &entries).unwrap();
    let p = rig
        .segments_dir()
        .join(format!("{id:020}-{:016x}.seg", meta.crc64.unwrap()));
    std::fs::write(&p, &bytes).unwrap();

    let r = rig.run(true, false, Duration::from_secs(3600)).await;
    let lost = r
        .findings
        .iter()
        .find(|f| f.kind == FindingKind::ManifestLost)
        .expect("manifest lost");
    assert!(
        lost.unresolved() && lost.action.contains("waits") && lost.action.contains(&id.to_string()),
        "{lost:?}"
    );
    assert!(r.needs_operator());
    assert!(
        ms.load().await.unwrap().is_none(),
        "no manifest written yet"
    );
    assert_eq!(std::fs::read(&p).unwrap(), bytes, "kept");

    // Older than the grace period (here: no grace): rebuilt with it.
    let r = rig.run(true, false, Duration::ZERO).await;
    assert!(
        r.findings
            .iter()
            .any(|f| f.kind == FindingKind::ManifestLost && f.repaired),
        "{:#?}",
        r.findings
    );
    let m = ms.load().await.unwrap().expect("rebuilt");
    let ids: Vec<u64> = ms
        .all_segments(&m)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id.0)
        .collect();
    let mut want: Vec<u64> = expected_entries(&rig).iter().map(|e| e.id.0).collect();
    want.push(id);
    assert_eq!(ids, want);
}

/// An object under a fresh id that parses as ours, modified `age` ago.
fn plant_orphan(rig: &Rig, id: u64, crc: u32, bytes: &[u8], age: Duration) -> PathBuf {
    let p = rig.segments_dir().join(format!("{id:020}-{crc:08x}.seg"));
    std::fs::write(&p, bytes).unwrap();
    let f = std::fs::File::options().write(true).open(&p).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
    p
}

/// Objects no view references are of unknown origin (another data
/// directory, a lost one): reported, never deleted, whatever their age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreferenced_objects_are_reported_never_deleted() {
    let rig = Rig::drained().await;
    let max = rig.committed().keys().next_back().unwrap().0;
    let old = plant_orphan(
        &rig,
        max + 10,
        0xdead_beef,
        b"old",
        Duration::from_secs(7200),
    );
    let young = plant_orphan(&rig, max + 11, 0x0bad_f00d, b"young", Duration::ZERO);
    let foreign = rig.segments_dir().join("README.txt");
    std::fs::write(&foreign, b"not ours").unwrap();
    let upper = rig
        .segments_dir()
        .join(format!("{:020}-DEADBEEF.seg", max + 12));
    std::fs::write(&upper, b"not ours either").unwrap();
    let old_key = format!("{STREAM}/segments/{:020}-deadbeef.seg", max + 10);
    let young_key = format!("{STREAM}/segments/{:020}-0badf00d.seg", max + 11);
    let before = snapshot(&rig.segments_dir());

    // Report only, default grace (1 h).
    let r = rig.run(false, false, Duration::from_secs(3600)).await;
    let by_key: BTreeMap<&str, _> = r.findings.iter().map(|f| (f.key.as_str(), f)).collect();
    assert_eq!(r.findings.len(), 4, "{:#?}", r.findings);
    assert_eq!(by_key[old_key.as_str()].kind, FindingKind::Orphan);
    assert!(by_key[old_key.as_str()].unresolved());
    assert_eq!(by_key[young_key.as_str()].kind, FindingKind::Orphan);
    assert!(by_key[young_key.as_str()].informational);
    assert_eq!(
        r.findings
            .iter()
            .filter(|f| f.kind == FindingKind::Foreign)
            .count(),
        2
    );
    assert!(r.needs_operator());

    // Repair, default grace and grace 0 (CLI): nothing is deleted, the
    // old one stays an operator's matter and the report says what to do.
    let r = rig.run(true, false, Duration::from_secs(3600)).await;
    assert!(r.needs_operator(), "{:#?}", r.findings);
    assert_eq!((r.repaired, r.deleted), (0, 0));
    let (code, out) = rig.cli(&["--json", "reconcile", "--repair", "--grace-ms", "0"]);
    assert_eq!(code, EXIT_NEEDS_OPERATOR, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(v["deleted"], 0, "{v}");
    assert_eq!(v["repaired"], 0, "{v}");
    let (code, out) = rig.cli(&["reconcile", "--repair", "--grace-ms", "0"]);
    assert_eq!(code, EXIT_NEEDS_OPERATOR, "{out}");
    assert!(out.contains("unknown origin"), "{out}");
    assert!(out.contains("give each its own"), "{out}");
    assert!(!out.contains("fixed"), "{out}");
    assert!(old.exists() && young.exists() && foreign.exists() && upper.exists());
    assert_eq!(snapshot(&rig.segments_dir()), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_lease_of_another_owner_blocks_manifest_repair() {
    let rig = Rig::drained().await;
    std::fs::remove_dir_all(rig.store_dir.join(STREAM).join("manifest")).unwrap();
    // Another broker took the stream since: a fresh, empty manifest with
    // its live lease.
    let ms = rig.manifest_store();
    let w = ms
        .take_ownership("intruder", Duration::from_secs(600))
        .await
        .unwrap();
    let before = ms.load().await.unwrap().unwrap();
    assert_eq!(before.segment_count, 0);
    drop(w);

    let r = rig.run(true, false, Duration::from_secs(3600)).await;
    let n = rig.committed().len();
    assert_eq!(r.findings.len(), n, "{:#?}", r.findings);
    for f in &r.findings {
        assert_eq!(f.kind, FindingKind::ManifestLostEntries);
        assert!(!f.repaired, "{f:?}");
        assert!(f.action.contains("Claimed"), "{f:?}");
        assert!(f.action.contains("intruder"), "{f:?}");
    }
    assert!(r.needs_operator());
    assert_eq!(r.unresolved, n);
    // Nothing written: the intruder's version is still the newest.
    let after = ms.load().await.unwrap().unwrap();
    assert_eq!(after, before);
}

/// `tierindex status --remote`: the journal's table with the manifest and
/// the listing next to it; exit 4 once a committed object is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_remote_shows_the_manifest_and_the_objects() {
    let rig = Rig::drained().await;
    let committed = rig.committed();
    let n = committed.len();
    let (code, out) = rig.cli(&["status", "--remote"]);
    assert_eq!(code, EXIT_DRAINED, "{out}");
    assert_eq!(out.matches("| listed | present").count(), n, "{out}");
    assert!(
        out.contains(&format!("{n} committed segment(s), 0 damage note(s)")),
        "{out}"
    );
    assert!(out.contains("epoch 1, no owner (released)"), "{out}");
    assert!(
        out.contains("0 verified-or-later segment(s) without their object"),
        "{out}"
    );

    let (id, rec) = committed.iter().next().unwrap();
    std::fs::remove_file(rig.object_path(rec)).unwrap();
    let (code, out) = rig.cli(&["--json", "status", "--remote"]);
    assert_eq!(code, EXIT_NEEDS_OPERATOR, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(v["remote"]["objects_missing"], 1, "{v}");
    assert_eq!(v["remote"]["manifest_present"], true, "{v}");
    assert_eq!(v["remote"]["committed_segments"], n as u64, "{v}");
    assert_eq!(v["remote"]["listed_objects"], (n - 1) as u64, "{v}");
    let seg = v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["meta"]["id"] == id.0)
        .unwrap();
    assert_eq!(seg["object"], "absent", "{seg}");
    assert_eq!(seg["manifest"], "listed", "{seg}");
    assert!(!out.contains("AWS_"), "{out}");
}

/// Segments committed under another stream's keys (a typo'd `--stream`
/// with `--store-override`, then the right stream again): reconcile on the
/// right stream re-uploaded them under the typo'd keys, listed those keys
/// in the right stream's manifest, and reported them missing at every run.
/// Now the journaled key of another stream means this stream's own key:
/// one repair, then clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_committed_under_another_streams_keys_are_repaired_under_this_ones_once() {
    let rig = Rig::drained().await;
    let cfg = Config {
        stream: "orders-right".into(),
        store_override: true,
        ..rig.cfg.clone()
    };
    let store = rig.store();
    let opts = |repair| ReconcileOptions {
        repair,
        grace: Duration::from_secs(3600),
        deep: false,
        ..Default::default()
    };
    let r = reconcile(&cfg, &store, &opts(true)).await.unwrap();
    assert!(r.repaired > 0, "{r:#?}");
    assert_eq!((r.lost, r.unresolved), (0, 0), "{r:#?}");
    let again = reconcile(&cfg, &store, &opts(false)).await.unwrap();
    assert!(again.findings.is_empty(), "{:#?}", again.findings);
    // Every object the right stream's manifest lists is its own.
    let ms = ManifestStore::reader(&store, "orders-right", ManifestOptions::default()).unwrap();
    let m = ms.load().await.unwrap().expect("a manifest");
    let entries = ms.all_segments(&m).await.unwrap();
    assert_eq!(entries.len(), rig.committed().len());
    for e in entries {
        assert!(e.key.starts_with("orders-right/segments/"), "{}", e.key);
        assert!(rig.store_dir.join(&e.key).exists(), "{}", e.key);
    }
}
