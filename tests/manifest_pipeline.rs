//! The remote manifest in the upload pipeline (`manifest = true`), on
//! `memory://` behind the fault-injecting wrapper.
//!
//! Checks are made from outside the code under test: the journal is read
//! from its file, the manifest through a separate `ManifestStore`, the
//! objects from the wrapped store.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::{ObjectStoreExt, PutPayload};
use tempfile::TempDir;

use tierindex::journal::{Journal, JournalOptions, Record, SegmentRecord, SegmentState};
use tierindex::remote::RemoteStore;
use tierindex::remote::lease::ManualClock;
use tierindex::remote::manifest::{Manifest, ManifestOptions, ManifestStore, SegmentEntry};
use tierindex::testing::{Fault, FaultyStore, Op};
use tierindex::{Config, Error, SegmentId, TierIndex};

const PREFIX: &str = "tier";
const STREAM: &str = "orders";
const TS0: u64 = 1_700_000_000_000;
const ITEMS: u32 = 50;

fn config(data: PathBuf, owner: &str) -> Config {
    Config {
        data_dir: data,
        stream: STREAM.into(),
        segment_items: ITEMS,
        slot_count: 64,
        segment_max_age_ms: None,
        tick_ms: 20,
        max_attempts: 4,
        request_timeout_ms: 2000,
        manifest: true,
        owner_id: Some(owner.into()),
        // Long: no renewal happens during a test unless it wants one.
        lease_ttl_ms: 60_000,
        ..Config::default()
    }
}

struct Rig {
    tmp: TempDir,
    fs: Arc<FaultyStore>,
}

impl Rig {
    fn new(seed: u64) -> Rig {
        Rig {
            tmp: tempfile::tempdir().unwrap(),
            fs: FaultyStore::memory(seed),
        }
    }
    fn data(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
    fn remote(&self) -> RemoteStore {
        self.fs.remote(PREFIX)
    }
    /// A reader of the manifest that shares nothing with the code under test.
    fn manifest_store(&self) -> ManifestStore {
        ManifestStore::reader(&self.remote(), STREAM, ManifestOptions::default()).unwrap()
    }
    async fn manifest(&self) -> (Manifest, BTreeMap<SegmentId, SegmentEntry>) {
        let ms = self.manifest_store();
        let m = ms.load().await.unwrap().expect("a manifest exists");
        let all = ms.all_segments(&m).await.unwrap();
        let n = all.len();
        let map: BTreeMap<_, _> = all.into_iter().map(|e| (e.id, e)).collect();
        assert_eq!(map.len(), n, "an id listed twice");
        assert_eq!(m.segment_count, n as u64, "segment_count vs entries");
        (m, map)
    }
}

/// `reconcile --repair` of `cfg`'s stream on the rig's store (as the CLI
/// runs it: no grace for what the journal names, no deep reads).
async fn reconcile_repair(
    rig: &Rig,
    cfg: &Config,
) -> tierindex::recovery::reconcile::ReconcileReport {
    let opts = tierindex::recovery::reconcile::ReconcileOptions {
        repair: true,
        grace: Duration::from_secs(3600),
        deep: false,
        ..Default::default()
    };
    tierindex::recovery::reconcile::reconcile(cfg, &rig.remote(), &opts)
        .await
        .unwrap()
}

/// Opens, waiting (bounded) for a dropped predecessor's locks.
async fn open(
    cfg: &Config,
    store: RemoteStore,
    clock: Option<ManualClock>,
) -> tierindex::Result<TierIndex> {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let r = match &clock {
            Some(c) => {
                TierIndex::open_with_store_and_clock(
                    cfg.clone(),
                    store.clone(),
                    Arc::new(c.clone()),
                )
                .await
            }
            None => TierIndex::open_with_store(cfg.clone(), store.clone()).await,
        };
        match r {
            Err(Error::Locked { .. }) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => return r.map(|(ti, _)| ti),
        }
    }
}

fn write(ti: &TierIndex, offsets: std::ops::Range<u64>) {
    for o in offsets {
        ti.append(format!("k{}", o % 7).as_bytes(), o, 100, TS0 + o)
            .unwrap();
    }
    ti.flush().unwrap();
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn journal(data: &std::path::Path) -> BTreeMap<SegmentId, SegmentRecord> {
    common::journal_view(data).segments().clone()
}

fn ids_in(j: &BTreeMap<SegmentId, SegmentRecord>, state: SegmentState) -> Vec<SegmentId> {
    j.iter()
        .filter(|(_, r)| r.state == state)
        .map(|(id, _)| *id)
        .collect()
}

/// Every journaled `Committed` segment is in the manifest with its key, length
/// and CRC (which are those of the local file and of the stored object), and
/// the manifest lists nothing else.
async fn check_committed_match_manifest(rig: &Rig, data: &std::path::Path) -> Manifest {
    let j = journal(data);
    let committed: BTreeMap<SegmentId, &SegmentRecord> = j
        .iter()
        .filter(|(_, r)| r.state == SegmentState::Committed)
        .map(|(id, r)| (*id, r))
        .collect();
    let (m, listed) = rig.manifest().await;
    assert_eq!(
        committed.keys().collect::<Vec<_>>(),
        listed.keys().collect::<Vec<_>>(),
        "journaled Committed vs manifest"
    );
    let remote = rig.remote();
    for (id, r) in &committed {
        let e = &listed[id];
        let key = remote.segment_key(STREAM, &r.meta);
        assert_eq!(e.key, key.to_string(), "segment {id} key");
        assert_eq!(
            r.key.as_deref(),
            Some(e.key.as_str()),
            "segment {id} journal key"
        );
        assert_eq!(e.file_len, r.meta.file_len, "segment {id} len");
        assert_eq!(e.file_crc, r.meta.file_crc, "segment {id} crc");
        assert_eq!(e.item_count, r.meta.item_count, "segment {id} items");
        assert_eq!(
            (e.min_offset, e.max_offset),
            (r.meta.min_offset, r.meta.max_offset),
            "segment {id} offsets"
        );
        let local = std::fs::read(common::sealed_path(data, *id)).unwrap();
        assert_eq!(local.len() as u64, e.file_len);
        assert_eq!(crc32fast::hash(&local), e.file_crc);
        let stored = rig
            .fs
            .inner()
            .get(&key)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(
            stored.as_ref(),
            local.as_slice(),
            "segment {id} object bytes"
        );
    }
    m
}

/// (a) A full drain with the manifest on: journal and manifest agree
/// exactly, each segment is committed once, and the lease is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_drain_lists_every_committed_segment_in_the_manifest() {
    let rig = Rig::new(1);
    let data = rig.data("a");
    let ti = open(&config(data.clone(), "owner-a"), rig.remote(), None)
        .await
        .unwrap();
    write(&ti, 0..(ITEMS as u64 * 6 + 20));
    let r = ti.shutdown(Duration::from_secs(20)).await;
    assert!(r.fully_drained(), "{r:?}");
    assert!(r.fenced.is_none());

    let j = journal(&data);
    assert_eq!(
        j.len(),
        7,
        "six full segments and the one sealed at shutdown"
    );
    assert_eq!(ids_in(&j, SegmentState::Committed).len(), 7);
    let counts = common::record_counts(&data, "Committed");
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    let m = check_committed_match_manifest(&rig, &data).await;
    assert_eq!(m.epoch, 1);
    assert!(m.lease.is_none(), "lease not released: {:?}", m.lease);
}

/// A manifest rolled back in the store (its newest versions deleted, as a
/// restore of the bucket would): the next drain took the stream on top of
/// the old list and ended "fully drained", exit 0, while readers through
/// the manifest missed the segments it no longer lists (helper-39, F1).
/// The shutdown now names them (`unlisted`, not fully drained, exit 4), and
/// after `reconcile --repair` commits them it is clean again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_rolled_back_in_the_store_is_not_reported_clean() {
    let rig = Rig::new(14);
    let data = rig.data("a");
    let cfg = config(data.clone(), "owner-a");
    let ti = open(&cfg, rig.remote(), None).await.unwrap();
    write(&ti, 0..(ITEMS as u64 * 3 + 20));
    let r = ti.shutdown(Duration::from_secs(20)).await;
    assert!(r.fully_drained(), "{r:?}");
    let (m, listed) = rig.manifest().await;
    assert_eq!(listed.len(), 4);
    // Back to the version that listed only the first segment(s): delete
    // every version above the first that lists something.
    let ms = rig.manifest_store();
    let mut keep = None;
    for v in 1..=m.version {
        let k = ms.version_key(v);
        if keep.is_some() {
            rig.fs.inner().delete(&k).await.unwrap();
        } else if let Ok(g) = rig.fs.inner().get(&k).await {
            let body = g.bytes().await.unwrap();
            if String::from_utf8_lossy(&body).contains("\"segments\"") && v > 1 {
                keep = Some(v);
            }
        }
    }
    let (_, after) = rig.manifest().await;
    assert!(after.len() < 4, "nothing rolled back: {after:?}");

    let ti = open(&cfg, rig.remote(), None).await.unwrap();
    let r = ti.shutdown(Duration::from_secs(20)).await;
    assert!(
        !r.fully_drained(),
        "a rolled-back manifest reported clean: {r:?}"
    );
    assert_eq!(r.unlisted.len(), 4 - after.len(), "{r:?}");
    assert!(!r.clean_marker_written);

    reconcile_repair(&rig, &cfg).await;
    let ti = open(&cfg, rig.remote(), None).await.unwrap();
    let r = ti.shutdown(Duration::from_secs(20)).await;
    assert!(r.fully_drained(), "{r:?}");
    check_committed_match_manifest(&rig, &data).await;
}

/// A release that finds its committed object gone from the store keeps
/// the local copy and says so at once: the drain used to retry it until its
/// deadline (5 minutes from the CLI) and end "pending" (helper-39, F6).
/// Now the segment is parked for an operator (`DrainReport::parked`, exit
/// 4 from the CLI) and the drain ends without waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_object_is_gone_is_reported_at_once_not_retried_to_the_deadline() {
    let rig = Rig::new(15);
    let data = rig.data("a");
    let cfg = config(data.clone(), "owner-a");
    let ti = open(&cfg, rig.remote(), None).await.unwrap();
    write(&ti, 0..(ITEMS as u64 * 2 + 20));
    assert!(ti.shutdown(Duration::from_secs(20)).await.fully_drained());
    let (_, listed) = rig.manifest().await;
    let (id, entry) = listed.iter().next().map(|(i, e)| (*i, e.clone())).unwrap();
    rig.fs
        .inner()
        .delete(&object_store::path::Path::from(entry.key.clone()))
        .await
        .unwrap();
    let releasing = Config {
        release_after_commit: true,
        ..cfg.clone()
    };
    let t = Instant::now();
    let ti = open(&releasing, rig.remote(), None).await.unwrap();
    let r = ti.shutdown(Duration::from_secs(60)).await;
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "retried to the deadline: {r:?}"
    );
    assert_eq!(r.drain.parked, vec![id.0], "{r:?}");
    assert!(!r.fully_drained() && !r.drain.deadline_hit, "{r:?}");
    let why = r.drain.pending.iter().find(|p| p.id == id.0).unwrap();
    let why = why.last_error.as_deref().unwrap_or_default();
    assert!(
        why.contains("missing") && why.contains("reconcile --repair"),
        "{why}"
    );
    assert!(
        common::sealed_path(&data, id).exists(),
        "the local copy went"
    );
    // The others were released.
    let j = journal(&data);
    assert_eq!(ids_in(&j, SegmentState::Committed), vec![id], "{j:?}");
}

/// (b) A second owner is refused while the first one's lease is live; once
/// it is expired (by the second owner's clock) the second takes over, and
/// the first owner's next commit is fenced: that segment stays `Verified`
/// with its local file, is not in the manifest, and nothing is uploaded
/// afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_refused_while_leased_then_fences_the_first_owner() {
    let rig = Rig::new(2);
    let (data_a, data_b) = (rig.data("a"), rig.data("b"));
    let t0 = tierindex::segment::now_ms();
    let clock_a = ManualClock::new(t0);
    let cfg_a = config(data_a.clone(), "owner-a");
    let cfg_b = config(data_b.clone(), "owner-b");
    let a = open(&cfg_a, rig.remote(), Some(clock_a.clone()))
        .await
        .unwrap();

    // Two segments committed while A owns the stream.
    write(&a, 0..(ITEMS as u64 * 2 - 10));
    a.roll().unwrap();
    wait_until(
        "A's first segments committed",
        Duration::from_secs(20),
        || ids_in(&journal(&data_a), SegmentState::Committed).len() == 2,
    )
    .await;

    // B is refused while A's lease is live (B's clock 1 s later).
    let clock_b = ManualClock::new(t0 + 1_000);
    match open(&cfg_b, rig.remote(), Some(clock_b.clone())).await {
        Err(Error::Claimed(msg)) => assert!(msg.contains("owner-a"), "{msg}"),
        Err(e) => panic!("expected Claimed, got {e}"),
        Ok(_) => panic!("B opened while A's lease is live"),
    }
    // A paused owner: by B's clock A's lease has expired. B takes over.
    clock_b.set(t0 + 61_000);
    let b = open(&cfg_b, rig.remote(), Some(clock_b.clone()))
        .await
        .unwrap();
    let (m, _) = rig.manifest().await;
    assert_eq!(m.epoch, 2);
    assert_eq!(m.lease.as_ref().map(|l| l.owner.as_str()), Some("owner-b"));

    // A's next segment: uploaded and verified, but the commit is fenced.
    write(&a, (ITEMS as u64 * 2 - 10)..(ITEMS as u64 * 2 + 20));
    a.roll().unwrap();
    wait_until("A fenced", Duration::from_secs(20), || {
        a.status().fenced.is_some()
    })
    .await;
    let j = journal(&data_a);
    let verified = ids_in(&j, SegmentState::Verified);
    assert_eq!(verified.len(), 1, "{j:?}");
    let fenced_id = verified[0];
    let fenced_key = rig.remote().segment_key(STREAM, &j[&fenced_id].meta);

    // After the fence, nothing more goes to the store: a new segment stays
    // Sealed and is not uploaded.
    write(&a, (ITEMS as u64 * 2 + 20)..(ITEMS as u64 * 2 + 40));
    a.roll().unwrap();
    wait_until(
        "the post-fence segment journaled",
        Duration::from_secs(10),
        || journal(&data_a).len() == 4,
    )
    .await;
    let r = a.shutdown(Duration::from_secs(5)).await;
    assert!(!r.fully_drained());
    assert!(!r.clean_marker_written);
    let why = r.fenced.clone().expect("shutdown reports the fence");
    assert!(why.contains("owner-b"), "{why}");
    assert!(
        r.error.as_deref().is_some_and(|e| e.contains("fenced")),
        "{r:?}"
    );

    let j = journal(&data_a);
    assert_eq!(ids_in(&j, SegmentState::Committed).len(), 2, "{j:?}");
    assert_eq!(ids_in(&j, SegmentState::Verified), vec![fenced_id]);
    let after: Vec<SegmentId> = j.keys().copied().filter(|id| *id > fenced_id).collect();
    assert_eq!(after.len(), 1);
    assert_eq!(
        j[&after[0]].state,
        SegmentState::Sealed,
        "uploaded after the fence"
    );
    assert_eq!(
        common::record_counts(&data_a, "Committed").get(&fenced_id),
        None
    );
    for id in j.keys() {
        assert!(
            common::sealed_path(&data_a, *id).exists(),
            "local copy of {id} removed"
        );
    }
    let post_key = rig.remote().segment_key(STREAM, &j[&after[0]].meta);
    assert!(
        rig.fs.inner().head(&post_key).await.is_err(),
        "segment written after the fence"
    );
    assert!(rig.fs.inner().head(&fenced_key).await.is_ok());

    // The manifest: A's two committed segments, not the fenced one; B
    // still owns it (A released nothing).
    let m = check_committed_match_manifest(&rig, &data_a).await;
    assert_eq!(m.epoch, 2);
    assert_eq!(m.lease.as_ref().map(|l| l.owner.as_str()), Some("owner-b"));

    let rb = b.shutdown(Duration::from_secs(10)).await;
    assert!(rb.fully_drained(), "{rb:?}");
    let (m, _) = rig.manifest().await;
    assert!(m.lease.is_none(), "B released its lease");
}

/// (c) A crash after the manifest commit but before the journal's
/// `Committed`: the journal says `Verified`, the manifest already lists the
/// segment. The resume commits again (already listed), journals
/// `Committed`, and no entry is duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_manifest_commit_and_journal_resumes_without_duplicates() {
    let rig = Rig::new(3);
    let data = rig.data("a");
    let cfg = config(data.clone(), "owner-a");
    // Three sealed segments, none uploaded (the store refuses everything).
    {
        rig.fs.set_random(1.0, vec![Fault::Unavailable], &Op::ALL);
        let sealing = Config {
            manifest: false,
            probe_store: false,
            ..cfg.clone()
        };
        let ti = open(&sealing, rig.remote(), None).await.unwrap();
        write(&ti, 0..(ITEMS as u64 * 2 + 20));
        let r = ti.shutdown(Duration::from_millis(500)).await;
        assert!(!r.fully_drained());
        rig.fs.heal();
    }
    // Play the crashed process for the first two: upload, journal up to
    // Verified, commit to the manifest as the same owner, crash.
    let crashed: Vec<SegmentId> = {
        let until = Instant::now() + Duration::from_secs(15);
        let mut j = loop {
            match Journal::open(&data, JournalOptions::default()) {
                Ok((j, _)) => break j,
                Err(Error::Locked { .. }) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("journal: {e}"),
            }
        };
        let recs: Vec<SegmentRecord> = j.segments().values().cloned().collect();
        assert_eq!(recs.len(), 3);
        assert!(
            recs.iter()
                .all(|r| matches!(r.state, SegmentState::Sealed | SegmentState::Uploading)),
            "{recs:?}"
        );
        let ms = rig.manifest_store();
        let mut w = ms
            .take_ownership("owner-a", Duration::from_secs(60))
            .await
            .unwrap();
        let mut entries = Vec::new();
        for r in &recs[..2] {
            let key = rig.remote().segment_key(STREAM, &r.meta);
            let bytes = std::fs::read(common::sealed_path(&data, r.meta.id)).unwrap();
            rig.fs
                .inner()
                .put(&key, PutPayload::from(bytes))
                .await
                .unwrap();
            j.append(&[
                Record::Uploading {
                    id: r.meta.id,
                    attempt: r.attempt + 1,
                    key: key.to_string(),
                    multipart_id: None,
                },
                Record::Uploaded {
                    id: r.meta.id,
                    etag: None,
                    version: None,
                },
                Record::Verified { id: r.meta.id },
            ])
            .unwrap();
            entries.push(SegmentEntry::new(&rig.remote(), STREAM, &r.meta).unwrap());
        }
        w.commit(&entries).await.unwrap();
        // Crash: neither the journal's Committed nor a lease release.
        drop(w);
        drop(j);
        recs[..2].iter().map(|r| r.meta.id).collect()
    };
    let before = rig.manifest().await.0;
    assert_eq!(before.segment_count, 2);
    let uploading_before = common::record_counts(&data, "Uploading");

    // Restart with the manifest on: the same owner re-takes at once. (The
    // sealing run above was single-writer, which IDENTITY recorded: the
    // switch is on purpose.)
    let cfg = Config {
        switch_mode: true,
        ..cfg
    };
    let ti = open(&cfg, rig.remote(), None).await.unwrap();
    let r = ti.shutdown(Duration::from_secs(20)).await;
    assert!(r.fully_drained(), "{r:?}");

    let j = journal(&data);
    assert_eq!(ids_in(&j, SegmentState::Committed).len(), 3, "{j:?}");
    let counts = common::record_counts(&data, "Committed");
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    for id in &crashed {
        assert_eq!(
            common::record_counts(&data, "Uploading").get(id),
            uploading_before.get(id),
            "segment {id} uploaded again"
        );
    }
    let m = check_committed_match_manifest(&rig, &data).await;
    assert_eq!(m.segment_count, 3);
    assert_eq!(m.epoch, 2, "the restart took a new epoch");
    assert!(m.lease.is_none());
}

/// Leaves three sealed segments of `data` journaled as sent to `old`
/// (their objects put there): the first `Verified`, the second `Uploaded`,
/// the third `Uploading`. Returns their keys in `old`.
async fn journal_sent_elsewhere(
    rig: &Rig,
    data: &std::path::Path,
    old_fs: &FaultyStore,
    old: &RemoteStore,
) -> Vec<object_store::path::Path> {
    let cfg = config(data.to_path_buf(), "owner-a");
    {
        rig.fs.set_random(1.0, vec![Fault::Unavailable], &Op::ALL);
        let ti = open(&cfg, rig.remote(), None).await.unwrap();
        write(&ti, 0..(ITEMS as u64 * 3 + 20));
        let r = ti.shutdown(Duration::from_millis(500)).await;
        assert!(!r.fully_drained());
        rig.fs.heal();
    }
    let mut old_keys = Vec::new();
    let (mut j, _) = Journal::open(data, JournalOptions::default()).unwrap();
    let recs: Vec<SegmentRecord> = j.segments().values().cloned().collect();
    assert!(recs.len() >= 3, "{recs:?}");
    for (n, r) in recs[..3].iter().enumerate() {
        let key = old.segment_key(STREAM, &r.meta);
        let bytes = std::fs::read(common::sealed_path(data, r.meta.id)).unwrap();
        old_fs
            .inner()
            .put(&key, PutPayload::from(bytes))
            .await
            .unwrap();
        let mut recs = vec![Record::Uploading {
            id: r.meta.id,
            attempt: r.attempt + 1,
            key: key.to_string(),
            multipart_id: None,
        }];
        if n < 2 {
            recs.push(Record::Uploaded {
                id: r.meta.id,
                etag: None,
                version: None,
            });
        }
        if n < 1 {
            recs.push(Record::Verified { id: r.meta.id });
        }
        j.append(&recs).unwrap();
        old_keys.push(key);
    }
    old_keys
}

/// Opens `data` on the rig's store, drains, and checks every segment is
/// committed under this store's keys with its object here, and that the
/// objects left in the old store were not touched.
async fn drains_into_this_store(
    rig: &Rig,
    data: &std::path::Path,
    old_fs: &FaultyStore,
    old_keys: &[object_store::path::Path],
) {
    let cfg = config(data.to_path_buf(), "owner-a");
    let ti = open(&cfg, rig.remote(), None).await.unwrap();
    let r = ti.shutdown(Duration::from_secs(20)).await;
    assert!(r.fully_drained(), "{r:?}");
    let j = journal(data);
    assert_eq!(ids_in(&j, SegmentState::Committed).len(), j.len(), "{j:?}");
    for rec in j.values() {
        let key = rec.key.as_deref().unwrap_or_default();
        assert!(key.starts_with(&format!("{PREFIX}/{STREAM}/")), "{key}");
    }
    // Every committed segment's object is here, byte for byte.
    let m = check_committed_match_manifest(rig, data).await;
    assert_eq!(m.segment_count, j.len() as u64);
    for k in old_keys {
        old_fs
            .inner()
            .head(k)
            .await
            .expect("the old object is left as it is");
    }
}

/// Segments journaled against another store's prefix (the broker was run
/// with `--store-override` pointing elsewhere): one `Verified` there, one
/// `Uploaded`, one `Uploading`. Their keys are not this stream's under
/// this store, so the manifest refused them and every drain stopped at
/// "segment key ... is not under ...", exit 3. Now each is uploaded again
/// under this store's key and committed; the old objects are left as they
/// are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_journaled_for_another_prefix_are_uploaded_again_here() {
    let rig = Rig::new(7);
    let data = rig.data("a");
    let old = rig.fs.remote("elsewhere/old");
    let keys = journal_sent_elsewhere(&rig, &data, &rig.fs, &old).await;
    drains_into_this_store(&rig, &data, &rig.fs, &keys).await;
}

/// The same with another store whose keys look the same (another bucket,
/// endpoint or directory, same prefix and stream): the `Verified` segment
/// was committed to this store's manifest with no object behind it, and the
/// drain reported everything uploaded. A `Verified` record this process
/// did not write is now proven in this store before it is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_verified_in_another_store_with_the_same_keys_are_uploaded_here() {
    let rig = Rig::new(8);
    let data = rig.data("a");
    let other = FaultyStore::memory(9);
    let old = other.remote(PREFIX);
    let keys = journal_sent_elsewhere(&rig, &data, &other, &old).await;
    drains_into_this_store(&rig, &data, &other, &keys).await;
}

/// A `Verified` segment journaled under another prefix whose local copy is
/// gone cannot be uploaded again: it is quarantined naming the old key,
/// where the proven copy is, not requeued into "the store has no copy".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_without_a_local_copy_is_quarantined_naming_the_old_key() {
    let rig = Rig::new(10);
    let data = rig.data("a");
    let old = rig.fs.remote("elsewhere/old");
    let keys = journal_sent_elsewhere(&rig, &data, &rig.fs, &old).await;
    let first = journal(&data).keys().next().copied().unwrap();
    std::fs::remove_file(common::sealed_path(&data, first)).unwrap();
    let cfg = config(data.clone(), "owner-a");
    let ti = open(&cfg, rig.remote(), None).await.unwrap();
    let _ = ti.shutdown(Duration::from_secs(20)).await;
    let j = journal(&data);
    let r = &j[&first];
    assert_eq!(r.state, SegmentState::Quarantined, "{r:?}");
    let reason = r.reason.as_deref().unwrap_or_default();
    assert!(reason.contains(keys[0].as_ref()), "{reason}");
    assert!(!reason.contains("has no copy"), "{reason}");
}

/// The same with a local copy that is there but damaged: quarantined as
/// a local mismatch, so the file is also moved out of `segments/` (out of
/// lookups' way), the old key still named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rekey_with_a_damaged_local_copy_takes_the_file_out_of_service() {
    let rig = Rig::new(11);
    let data = rig.data("a");
    let old = rig.fs.remote("elsewhere/old");
    let keys = journal_sent_elsewhere(&rig, &data, &rig.fs, &old).await;
    let first = journal(&data).keys().next().copied().unwrap();
    let path = common::sealed_path(&data, first);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let cfg = config(data.clone(), "owner-a");
    let ti = open(&cfg, rig.remote(), None).await.unwrap();
    let _ = ti.shutdown(Duration::from_secs(20)).await;
    let j = journal(&data);
    let r = &j[&first];
    assert_eq!(r.state, SegmentState::Quarantined, "{r:?}");
    let reason = r.reason.as_deref().unwrap_or_default();
    assert!(reason.contains(keys[0].as_ref()), "{reason}");
    assert!(!path.exists(), "the damaged file is out of segments/");
}

/// Leaves the first sealed segment of `data` journaled `Committed` under
/// `under`'s key for it (its bytes put there and, when `here` differs, under
/// this store's key too), with no manifest entry written for it. Returns
/// its record and this store's key for it.
async fn journal_committed_unlisted(
    rig: &Rig,
    cfg: &Config,
    under: &RemoteStore,
) -> (SegmentRecord, object_store::path::Path) {
    {
        rig.fs.set_random(1.0, vec![Fault::Unavailable], &Op::ALL);
        let ti = open(cfg, rig.remote(), None).await.unwrap();
        write(&ti, 0..(ITEMS as u64 + 20));
        let r = ti.shutdown(Duration::from_millis(500)).await;
        assert!(!r.fully_drained());
        rig.fs.heal();
    }
    let (mut j, _) = Journal::open(&cfg.data_dir, JournalOptions::default()).unwrap();
    let r = j.segments().values().next().cloned().unwrap();
    let id = r.meta.id;
    let bytes = std::fs::read(common::sealed_path(&cfg.data_dir, id)).unwrap();
    let old_key = under.segment_key(STREAM, &r.meta);
    let own_key = rig.remote().segment_key(STREAM, &r.meta);
    for k in [&old_key, &own_key] {
        rig.fs
            .inner()
            .put(k, PutPayload::from(bytes.clone()))
            .await
            .unwrap();
    }
    j.append(&[
        Record::Uploading {
            id,
            attempt: r.attempt + 1,
            key: old_key.to_string(),
            multipart_id: None,
        },
        Record::Uploaded {
            id,
            etag: None,
            version: None,
        },
        Record::Verified { id },
        Record::Committed { id },
    ])
    .unwrap();
    (r, own_key)
}

/// A segment committed under another prefix (a `--store-override` run),
/// whose object is in place under this store's key but which this
/// stream's manifest does not list (put there by hand, or by an upload
/// whose commit never happened): its local copy is not released, since a
/// reader goes through the manifest and would not find it. Release used to
/// check only that the object was there. `reconcile --repair` commits it,
/// and the next drain releases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_committed_segment_is_released_only_once_the_manifest_lists_it() {
    let rig = Rig::new(12);
    let data = rig.data("a");
    let old = rig.fs.remote("elsewhere/old");
    let mut cfg = config(data.clone(), "owner-a");
    cfg.release_after_commit = true;
    let (r, own_key) = journal_committed_unlisted(&rig, &cfg, &old).await;
    let id = r.meta.id;

    let local = common::sealed_path(&data, id);
    let ti = open(&cfg, rig.remote(), None).await.unwrap();
    let _ = ti.shutdown(Duration::from_secs(3)).await;
    assert!(local.exists(), "released with no manifest entry behind it");
    assert_eq!(journal(&data)[&id].state, SegmentState::Committed);
    let (_, listed) = rig.manifest().await;
    assert!(!listed.contains_key(&id), "{listed:?}");

    let rep = reconcile_repair(&rig, &cfg).await;
    assert_eq!((rep.lost, rep.unresolved), (0, 0), "{rep:#?}");
    let (_, listed) = rig.manifest().await;
    assert_eq!(listed[&id].key, own_key.to_string());

    let ti = open(&cfg, rig.remote(), None).await.unwrap();
    let r = ti.shutdown(Duration::from_secs(20)).await;
    assert!(r.fully_drained(), "{r:?}");
    assert!(!local.exists(), "released once the manifest lists it");
    assert_eq!(journal(&data)[&id].state, SegmentState::Released);
}

/// The same segment, committed in the journal under this store's own key
/// (another bucket or directory with the same prefix and stream), while
/// this stream's manifest lists its id with other content: the local copy
/// holds the only copy of its entries a reader could find, so it is not
/// released: it is requeued (the reason naming both objects), uploaded
/// again and resealed under a new id, and its entries are committed there.
/// (It was quarantined for an operator's `quarantine retry` before session
/// 30, and not seen at all with `release_after_commit = false`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_segment_whose_id_the_manifest_gives_other_content_is_resealed() {
    let rig = Rig::new(13);
    let data = rig.data("a");
    let mut cfg = config(data.clone(), "owner-a");
    cfg.release_after_commit = true;
    let (r, _own_key) = journal_committed_unlisted(&rig, &cfg, &rig.remote()).await;
    let id = r.meta.id;
    // Another owner listed the id with other bytes.
    {
        let ms = ManifestStore::open(&rig.remote(), STREAM, ManifestOptions::default())
            .await
            .unwrap();
        let mut w = ms
            .take_ownership("owner-b", Duration::from_secs(1))
            .await
            .unwrap();
        let mut meta = r.meta.clone();
        meta.file_crc ^= 1;
        meta.crc64 = meta.crc64.map(|c| c ^ 1);
        let other = SegmentEntry::new(&rig.remote(), STREAM, &meta).unwrap();
        w.commit(&[other]).await.unwrap();
        w.release().await.unwrap();
    }
    let ti = open(&cfg, rig.remote(), None).await.unwrap();
    let rep = ti.shutdown(Duration::from_secs(10)).await;
    assert!(rep.fully_drained(), "{rep:#?}");
    let j = journal(&data);
    assert_eq!(j[&id].state, SegmentState::Resealed, "{rep:?}");
    let into = j[&id].resealed_into.expect("resealed into");
    assert!(into > id);
    // Every entry is in the segments committed from `into` on, which the
    // manifest lists with the journal's content.
    let ms = ManifestStore::open(&rig.remote(), STREAM, ManifestOptions::default())
        .await
        .unwrap();
    let m = ms.load().await.unwrap().unwrap();
    let listed = ms.all_segments(&m).await.unwrap();
    let mut found = Vec::new();
    for (sid, r) in j.range(into..) {
        if !matches!(r.state, SegmentState::Committed | SegmentState::Released) {
            continue;
        }
        let e = listed.iter().find(|e| e.id == *sid).expect("listed");
        assert_eq!(e.key_sum(), r.meta.key_sum());
        found.push(*sid);
    }
    assert!(!found.is_empty(), "{j:#?}");
}

/// A broker that drains at shutdown keeps renewing its lease until the
/// drain ends. The renewal task used to stop with the worker, before the
/// drain: a drain longer than the lease let it lapse, and another owner
/// (or `owner take`'s renewal watch, which then saw no renewal) took the
/// stream from the live, draining broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_renewed_through_a_shutdown_drain() {
    let rig = Rig::new(12);
    let data = rig.data("a");
    let cfg = Config {
        lease_ttl_ms: 1500,
        request_timeout_ms: 200,
        max_attempts: 2,
        // Segments go up in parts, which the store refuses; the lease's
        // renewals are single PUTs, which it takes.
        multipart_threshold_bytes: 1,
        ..config(data, "owner-a")
    };
    let ti = open(&cfg, rig.remote(), None).await.unwrap();
    rig.fs
        .set_random(1.0, vec![Fault::Unavailable], &[Op::CreateMultipart]);
    write(&ti, 0..(ITEMS as u64 * 3));
    let renewals = || {
        rig.fs
            .history()
            .keys()
            .filter(|k| k.as_ref().contains("/leases/"))
            .count()
    };
    let before = renewals();
    let r = ti.shutdown(Duration::from_secs(3)).await;
    assert!(!r.fully_drained(), "{r:?}");
    assert!(r.fenced.is_none(), "{r:?}");
    let during = renewals() - before;
    assert!(
        during >= 3,
        "renewals during a 3 s drain of a 1.5 s lease: {during}"
    );
}

/// A store that ignores conditional creates is refused (with the reason)
/// unless `allow_unconditional_store`; nothing changes with the manifest off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconditional_store_refused_unless_allowed() {
    let rig = Rig::new(4);
    rig.fs.ignore_conditionals(true);
    let cfg = config(rig.data("a"), "owner-a");
    match open(&cfg, rig.remote(), None).await {
        Err(e) => assert!(e.to_string().contains("conditional creates"), "{e}"),
        Ok(_) => panic!("opened on a store without conditional creates"),
    }
    assert!(rig.manifest_store().load().await.unwrap().is_none());
    let allowed = Config {
        allow_unconditional_store: true,
        ..cfg.clone()
    };
    let ti = open(&allowed, rig.remote(), None).await.unwrap();
    write(&ti, 0..30);
    let r = ti.shutdown(Duration::from_secs(20)).await;
    assert!(r.fully_drained(), "{r:?}");
    assert_eq!(rig.manifest().await.1.len(), 1);

    // Manifest off: no manifest objects at all.
    let rig = Rig::new(5);
    let off = Config {
        manifest: false,
        ..config(rig.data("a"), "owner-a")
    };
    let ti = open(&off, rig.remote(), None).await.unwrap();
    write(&ti, 0..30);
    assert!(ti.shutdown(Duration::from_secs(20)).await.fully_drained());
    assert!(rig.manifest_store().load().await.unwrap().is_none());
}

/// The store is down when the index opens: the open still succeeds (a
/// broker must start without its store), appends go on, and nothing is
/// committed while ownership is pending (segments wait, local files kept).
/// Once the store answers, ownership is taken by the commit step, every
/// segment is committed, and new ids continue above the manifest's highest
/// id, which another owner's earlier segments occupy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_at_open_takes_ownership_once_it_answers() {
    let rig = Rig::new(11);
    // Another owner's earlier segments: ids 1..=3 in the manifest, lease
    // released (a clean hand-over).
    {
        let data_b = rig.data("b");
        let b = open(&config(data_b, "owner-b"), rig.remote(), None)
            .await
            .unwrap();
        write(&b, 0..(ITEMS as u64 * 6 - 5));
        let r = b.shutdown(Duration::from_secs(20)).await;
        assert!(r.fully_drained(), "{r:?}");
    }
    let (m0, listed0) = rig.manifest().await;
    let max0 = *listed0.keys().last().unwrap();
    assert_eq!(max0, SegmentId(6));

    // Every request fails fast now.
    rig.fs.set_random(1.0, vec![Fault::Unavailable], &Op::ALL);
    let data = rig.data("a");
    let mut cfg = config(data.clone(), "owner-a");
    cfg.request_timeout_ms = 300;
    cfg.max_attempts = 2;
    let started = Instant::now();
    let a = open(&cfg, rig.remote(), None)
        .await
        .expect("opens with the store down");
    // The open-time attempt is bounded at 3 x request_timeout (1 s at
    // least); failing requests answer at once here.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "open waited {:?} for a dead store",
        started.elapsed()
    );
    write(&a, 1_000..(1_000 + ITEMS as u64 * 2 + 10));
    a.roll().unwrap();
    wait_until("three segments journaled", Duration::from_secs(10), || {
        journal(&data).len() == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        ids_in(&journal(&data), SegmentState::Committed).is_empty(),
        "committed without ownership"
    );
    // Ids were given without the manifest: the local ones start at 1.
    let local_ids: Vec<SegmentId> = journal(&data).keys().copied().collect();
    assert_eq!(local_ids, vec![SegmentId(1), SegmentId(2), SegmentId(3)]);

    assert!(a.status().manifest_pending.is_some());
    // The store comes back: ownership is taken (by the commit step of the
    // waiting segments), then new ids continue above the manifest's.
    rig.fs.heal();
    wait_until("ownership taken", Duration::from_secs(30), || {
        a.status().manifest_pending.is_none()
    })
    .await;
    write(&a, 2_000..(2_000 + ITEMS as u64 + 5));
    a.roll().unwrap();
    wait_until("a segment with a new id", Duration::from_secs(30), || {
        journal(&data).keys().any(|id| *id > max0)
    })
    .await;
    wait_until(
        "the new segments committed",
        Duration::from_secs(30),
        || {
            let j = journal(&data);
            let new: Vec<_> = j.iter().filter(|(id, _)| **id > max0).collect();
            !new.is_empty() && new.iter().all(|(_, r)| r.state == SegmentState::Committed)
        },
    )
    .await;
    // The three segments sealed while the store was down share ids 1..=3
    // with owner-b's committed ones: the manifest refuses them (other
    // content under those ids), so each is resealed: its entries are copied
    // into a new segment above the epoch's id floor, which is committed in
    // its place. Nothing of owner-b's is replaced, nothing is left pending.
    wait_until(
        "the colliding segments resealed",
        Duration::from_secs(30),
        || {
            let j = journal(&data);
            [1, 2, 3]
                .iter()
                .all(|i| j[&SegmentId(*i)].state == SegmentState::Resealed)
        },
    )
    .await;
    let r = a.shutdown(Duration::from_secs(20)).await;
    assert!(r.fully_drained(), "{r:#?}");
    let j = journal(&data);
    let (m, listed) = rig.manifest().await;
    assert!(m.epoch > m0.epoch, "owner-a took the stream");
    for (id, e) in &listed0 {
        assert_eq!(&listed[id], e, "owner-b's entry {id} unchanged");
    }
    let floor = tierindex::remote::manifest::epoch_id_floor(m.epoch);
    for id in [SegmentId(1), SegmentId(2), SegmentId(3)] {
        let rec = &j[&id];
        assert_eq!(rec.state, SegmentState::Resealed, "{id}: {rec:?}");
        assert!(rec.resealed_into.is_some_and(|i| i >= floor), "{rec:?}");
        assert!(
            !common::sealed_path(&data, id).exists(),
            "local file of resealed segment {id} deleted"
        );
    }
    for (id, r) in j.iter().filter(|(id, _)| **id > max0) {
        assert!(*id >= floor, "{id} below the epoch's id floor {floor}");
        assert_eq!(r.state, SegmentState::Committed, "{id}: {r:?}");
        assert!(listed.contains_key(id), "{id} not in the manifest");
    }
    // Every offset owner-a acknowledged is committed exactly once, and
    // owner-b's exactly once too.
    let counts = committed_offsets(&rig, &listed).await;
    let expected: Vec<u64> = (0..(ITEMS as u64 * 6 - 5))
        .chain(1_000..(1_000 + ITEMS as u64 * 2 + 10))
        .chain(2_000..(2_000 + ITEMS as u64 + 5))
        .collect();
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        expected,
        "committed offsets"
    );
    assert!(
        counts.values().all(|c| *c == 1),
        "an offset committed twice"
    );
    let resealed = common::record_counts(&data, "Resealed");
    assert_eq!(
        resealed.keys().map(|i| i.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
}

/// How many times each offset is held by the segments the manifest lists,
/// read from the stored objects.
async fn committed_offsets(
    rig: &Rig,
    listed: &BTreeMap<SegmentId, SegmentEntry>,
) -> BTreeMap<u64, u32> {
    let mut counts: BTreeMap<u64, u32> = BTreeMap::new();
    let tmp = tempfile::tempdir().unwrap();
    for e in listed.values() {
        let key = object_store::path::Path::from(e.key.as_str());
        let bytes = rig
            .fs
            .inner()
            .get(&key)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let path = tmp.path().join(format!("{}.seg", e.id.0));
        std::fs::write(&path, &bytes).unwrap();
        let seg = tierindex::segment::sealed::SealedSegment::open(&path).unwrap();
        for en in seg.entries() {
            *counts.entry(en.offset).or_default() += 1;
        }
    }
    counts
}

/// The reseal happens inside a shutdown drain (as in `tierindex drain`):
/// owner-a sealed segments 1..=3 while the store was down, owner-b then
/// committed its own 1..=6, and owner-a's next run opens with the store
/// down again and shuts down at once. The writer is closed before the
/// store answers, so the drain must reseal through a closed writer: the
/// copies go into fresh segments, sealed and uploaded by the same drain.
/// (A closed writer used to refuse the copy, so such a directory could
/// never finish draining: every drain exited with segments pending.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_drain_reseals_and_uploads_the_copies() {
    let rig = Rig::new(13);
    let data = rig.data("a");
    let mut cfg = config(data.clone(), "owner-a");
    cfg.request_timeout_ms = 300;
    cfg.max_attempts = 2;
    let a_offsets = 1_000..(1_000 + ITEMS as u64 * 2 + 10);
    rig.fs.set_random(1.0, vec![Fault::Unavailable], &Op::ALL);
    {
        let a = open(&cfg, rig.remote(), None).await.unwrap();
        write(&a, a_offsets.clone());
        let r = a.shutdown(Duration::from_secs(2)).await;
        assert!(!r.fully_drained(), "drained with the store down: {r:?}");
    }
    let sealed_ids: Vec<SegmentId> = journal(&data).keys().copied().collect();
    assert_eq!(sealed_ids, vec![SegmentId(1), SegmentId(2), SegmentId(3)]);
    rig.fs.heal();
    let b_offsets = 0..(ITEMS as u64 * 6 - 5);
    {
        let b = open(&config(rig.data("b"), "owner-b"), rig.remote(), None)
            .await
            .unwrap();
        write(&b, b_offsets.clone());
        let r = b.shutdown(Duration::from_secs(20)).await;
        assert!(r.fully_drained(), "{r:?}");
    }
    let (m0, listed0) = rig.manifest().await;

    // owner-a's next run: the store is down while it opens and closes its
    // writer, and answers a moment later, within the drain.
    rig.fs.set_random(1.0, vec![Fault::Unavailable], &Op::ALL);
    let a = open(&cfg, rig.remote(), None).await.unwrap();
    let fs = rig.fs.clone();
    let heal = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        fs.heal();
    });
    let r = a.shutdown(Duration::from_secs(30)).await;
    heal.await.unwrap();
    assert!(r.fully_drained(), "{r:#?}");
    assert!(r.clean_marker_written, "{r:#?}");

    let j = journal(&data);
    let (m, listed) = rig.manifest().await;
    assert!(m.epoch > m0.epoch, "owner-a took the stream");
    for (id, e) in &listed0 {
        assert_eq!(&listed[id], e, "owner-b's entry {id} unchanged");
    }
    let floor = tierindex::remote::manifest::epoch_id_floor(m.epoch);
    for id in &sealed_ids {
        let rec = &j[id];
        assert_eq!(rec.state, SegmentState::Resealed, "{id}: {rec:?}");
        let into = rec.resealed_into.expect("resealed into a segment");
        assert!(into >= floor, "{rec:?}");
        let copy = &j[&into];
        assert_eq!(copy.state, SegmentState::Committed, "{into}: {copy:?}");
        assert!(listed.contains_key(&into), "{into} not in the manifest");
        assert!(
            !common::sealed_path(&data, *id).exists(),
            "local file of resealed segment {id} deleted"
        );
    }
    let counts = committed_offsets(&rig, &listed).await;
    let expected: Vec<u64> = b_offsets.chain(a_offsets).collect();
    assert_eq!(counts.keys().copied().collect::<Vec<_>>(), expected);
    assert!(
        counts.values().all(|c| *c == 1),
        "an offset committed twice"
    );
}

/// Ownership pending since open (the store was down), then the store comes
/// back unable to fence (it ignores conditional creates): waiting cannot
/// fix that, so the process stops its uploads like a fenced owner, says
/// why, commits nothing and keeps every local copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_ownership_on_a_store_that_cannot_fence_stops_loudly() {
    let rig = Rig::new(12);
    rig.fs.set_random(1.0, vec![Fault::Unavailable], &Op::ALL);
    let data = rig.data("a");
    let mut cfg = config(data.clone(), "owner-a");
    cfg.request_timeout_ms = 300;
    cfg.max_attempts = 2;
    let a = open(&cfg, rig.remote(), None)
        .await
        .expect("opens with the store down");
    write(&a, 0..(ITEMS as u64 + 10));
    a.roll().unwrap();
    assert!(a.status().manifest_pending.is_some());
    rig.fs.heal();
    rig.fs.ignore_conditionals(true);
    wait_until(
        "stopped like a fenced owner",
        Duration::from_secs(30),
        || a.status().fenced.is_some(),
    )
    .await;
    let why = a.status().fenced.unwrap();
    eprintln!("fenced: {why}");
    assert!(
        why.contains("cannot be taken") && why.contains("conditional"),
        "{why}"
    );
    let r = a.shutdown(Duration::from_secs(3)).await;
    assert!(!r.fully_drained());
    let j = journal(&data);
    assert_eq!(j.len(), 2, "both segments journaled: {j:?}");
    assert!(ids_in(&j, SegmentState::Committed).is_empty(), "{j:?}");
    for id in j.keys() {
        assert!(
            common::sealed_path(&data, *id).exists(),
            "local copy of {id} kept"
        );
    }
    assert!(
        rig.manifest_store().load().await.unwrap().is_none(),
        "no manifest written"
    );
}

/// The data directory records its mode: a first open refused by a store
/// without conditional creates may be retried in single-writer mode (the
/// directory holds nothing yet); from then on an open in the other mode is
/// refused with what to do, unless `switch_mode`, which records the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recorded_mode_is_kept_unless_switched_on_purpose() {
    use tierindex::identity::{Identity, Mode};
    let rig = Rig::new(11);
    let data = rig.data("a");
    let safe = config(data.clone(), "owner-a");
    let single = Config {
        manifest: false,
        ..safe.clone()
    };
    rig.fs.ignore_conditionals(true);
    let e = open(&safe, rig.remote(), None)
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("conditional creates"), "{e}");
    // A refused first open leaves no identity behind (it bound nothing).
    assert!(Identity::load(&data).unwrap().is_none());

    // Nothing held yet: single-writer mode may be chosen now.
    let ti = open(&single, rig.remote(), None).await.unwrap();
    write(&ti, 0..(ITEMS as u64 + 5));
    assert!(ti.shutdown(Duration::from_secs(20)).await.fully_drained());
    assert_eq!(
        Identity::load(&data).unwrap().unwrap().mode,
        Some(Mode::SingleWriter)
    );

    // Its committed segments are in the journal only: the safe mode is
    // refused without the switch, and says why and what to do.
    rig.fs.ignore_conditionals(false);
    let e = open(&safe, rig.remote(), None)
        .await
        .err()
        .expect("refused");
    let msg = e.to_string();
    for needle in ["single-writer mode", "--manifest false", "--switch-mode"] {
        assert!(msg.contains(needle), "{needle:?} not in {msg}");
    }
    assert!(matches!(e, tierindex::Error::InvalidInput(_)), "{e:?}");

    // Switched on purpose: opens, records the new mode.
    let switched = Config {
        switch_mode: true,
        ..safe.clone()
    };
    let incarnation = Identity::load(&data).unwrap().unwrap().incarnation;
    let ti = open(&switched, rig.remote(), None).await.unwrap();
    write(&ti, 100..110);
    // What single-writer mode committed is not in the manifest yet: named
    // until `reconcile --repair` adds it (crash-safety.md, "Switching
    // modes").
    let r = ti.shutdown(Duration::from_secs(20)).await;
    assert!(!r.fully_drained() && !r.unlisted.is_empty(), "{r:?}");
    reconcile_repair(&rig, &switched).await;
    let ti = open(&switched, rig.remote(), None).await.unwrap();
    assert!(ti.shutdown(Duration::from_secs(20)).await.fully_drained());
    let id = Identity::load(&data).unwrap().unwrap();
    assert_eq!(
        (id.mode, id.incarnation),
        (Some(Mode::Manifest), incarnation)
    );

    // And back: refused the same way, naming the manifest mode.
    let e = open(&single, rig.remote(), None)
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("manifest mode"), "{e}");
    assert_eq!(
        Identity::load(&data).unwrap().unwrap().mode,
        Some(Mode::Manifest)
    );
}

/// `adopt_unjournaled` acts only on a definite answer from the store. A
/// sealed file the journal cannot record (below its highest id: planted
/// here, as a second writer's seal would leave it) while the store is down
/// and the stream not yet owned: refused, nothing appended, the file kept.
/// Once the store answers: its entries appended again, once, and the file
/// moved to `quarantine/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_unjournaled_adopts_nothing_while_the_store_cannot_say() {
    let rig = Rig::new(37);
    let data = rig.data("a");
    let mut cfg = config(data.clone(), "owner-a");
    // Two runs: the second takes the stream at epoch 2, its ids above the
    // epoch's floor, far above 5.
    for (i, range) in [(0u64, 0..55u64), (1, 55..110)] {
        let ti = open(&cfg, rig.remote(), None).await.unwrap();
        write(&ti, range);
        let r = ti.shutdown(Duration::from_secs(20)).await;
        assert!(r.fully_drained(), "run {i}: {r:?}");
    }
    let key = b"adopt-me";
    let entries: Vec<tierindex::Entry> = (0..5)
        .map(|i| tierindex::Entry {
            key_hash: tierindex::key_hash(key),
            offset: 9_000_000 + i,
            size: 1,
            timestamp_ms: TS0,
        })
        .collect();
    let (bytes, _) =
        tierindex::segment::sealed::build_sealed(SegmentId(5), 1, 2, 64, &entries).unwrap();
    let seg = data.join("segments").join(format!("{:020}.seg", 5));
    std::fs::write(&seg, bytes).unwrap();
    assert!(!journal(&data).contains_key(&SegmentId(5)));

    rig.fs.set_random(1.0, vec![Fault::Unavailable], &Op::ALL);
    cfg.request_timeout_ms = 300;
    cfg.max_attempts = 2;
    let ti = open(&cfg, rig.remote(), None)
        .await
        .expect("opens with the store down");
    let hits = |ti: &TierIndex| {
        ti.lookup(key, tierindex::TimeRange::ALL)
            .entries
            .iter()
            .filter(|e| e.offset >= 9_000_000)
            .count()
    };
    assert_eq!(hits(&ti), 5, "held by the planted file");
    match ti.adopt_unjournaled(Duration::from_secs(5)).await {
        Err(Error::Remote(m)) => assert!(m.contains("nothing was adopted"), "{m}"),
        other => panic!("adopted while the store cannot say: {other:?}"),
    }
    assert!(seg.exists(), "kept");
    assert_eq!(hits(&ti), 5, "nothing appended");

    rig.fs.heal();
    // Ownership is taken again on the next attempt after a backoff: until
    // then each call is refused the same way, changing nothing ("run again
    // once it answers").
    let until = Instant::now() + Duration::from_secs(30);
    let adopted = loop {
        match ti.adopt_unjournaled(Duration::from_secs(5)).await {
            Ok(a) => break a,
            Err(Error::Remote(m)) if Instant::now() < until => {
                assert!(m.contains("nothing was adopted"), "{m}");
                assert!(seg.exists(), "kept");
                assert_eq!(hits(&ti), 5, "nothing appended");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("not adopted once the store answers: {e}"),
        }
    };
    assert_eq!(adopted.len(), 1, "{adopted:?}");
    assert_eq!((adopted[0].segment, adopted[0].entries), (5, 5));
    assert!(!seg.exists(), "moved to quarantine/");
    assert_eq!(hits(&ti), 5, "held once, by the active segment");
    let r = ti.shutdown(Duration::from_secs(20)).await;
    assert!(r.fully_drained(), "{r:?}");
}

/// helper-81 F1: a default-mode broker started beside a running
/// single-writer (`manifest = false`) broker of the same stream was not
/// refused; both exited 0, and the manifest it started hid every entry of
/// the other from the stream's readers. Its first take now refuses while
/// segment objects it did not write are younger than `reconcile_grace_ms`,
/// writes nothing to the store, and names the way out; older ones only
/// warn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_manifest_beside_a_recent_single_writer_is_refused() {
    let rig = Rig::new(81);
    let single = Config {
        manifest: false,
        ..config(rig.data("a"), "owner-a")
    };
    let ti = open(&single, rig.remote(), None).await.unwrap();
    write(&ti, 0..(ITEMS as u64 * 3));
    let r = ti.shutdown(Duration::from_secs(20)).await;
    assert!(r.fully_drained(), "{r:?}");
    let before: Vec<String> = {
        use futures::TryStreamExt as _;
        let mut v: Vec<String> = rig
            .remote()
            .object_store()
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        v.sort();
        v
    };
    assert!(before.len() >= 3, "{before:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let b = config(rig.data("b"), "owner-b");
    let e = match open(&b, rig.remote(), Some(ManualClock::new(now))).await {
        Ok(_) => panic!("a first manifest beside a recent single-writer broker was taken"),
        Err(e) => e,
    };
    assert!(matches!(e, Error::Claimed(_)), "{e}");
    let m = e.to_string();
    assert!(m.contains("single-writer mode"), "{m}");
    assert!(m.contains("owner release"), "{m}");
    assert!(rig.manifest_store().load().await.unwrap().is_none());
    // The single-writer broker's objects past the grace: taken, with a
    // warning (its objects wait for `reconcile --repair`).
    let later = ManualClock::new(now + b.reconcile_grace_ms + 60_000);
    let ti = open(&b, rig.remote(), Some(later)).await.unwrap();
    drop(ti);
    assert!(rig.manifest_store().load().await.unwrap().is_some());
}

/// helper-86 F1: a first take deferred because the store did not answer
/// at open checked only the objects above the journal's highest id when it
/// ran. This data directory's own ids, given out meanwhile (1..=4), had
/// passed the single-writer broker's (1, 2), so none of that broker's
/// objects was seen and a manifest was started beside it. Now each listed
/// object is judged by the journal's record of its id and key (read after
/// the listing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_first_take_beside_a_recent_single_writer_is_refused() {
    deferred_take_beside_a_single_writer(87, 4, 2, false).await;
}

/// helper-86 F2: a deferred take that did see the single-writer broker's
/// objects (ids 2, 3 above its own 1) retried the refusal as a store
/// error: segments pending, the run ending with exit 3. It now stops the
/// run like a fence, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_refusal_beside_a_single_writer_stops_the_run() {
    deferred_take_beside_a_single_writer(86, 1, 3, false).await;
}

/// A default-mode broker's first take, deferred from open, beside a
/// single-writer broker that uploaded since: refused, and the run stops
/// like a fenced one: nothing committed, no manifest, local copies kept.
/// `own` segments sealed by the first, `other` uploaded by the second;
/// with `keep_a` the single-writer broker keeps running (its segments in
/// the store before the store answers again) and is handed back, with the
/// rig and the refused broker's config, for a restart.
async fn deferred_take_beside_a_single_writer(
    seed: u64,
    own: u64,
    other: u64,
    keep_a: bool,
) -> (Rig, Config, Option<TierIndex>) {
    let rig = Rig::new(seed);
    // The default-mode broker opens while the store does not answer (its
    // listing does: no object yet): its take is deferred, and it seals
    // ids 1..=own.
    rig.fs.set_random(1.0, vec![Fault::Unavailable], &Op::ALL);
    let data = rig.data("b");
    let mut b = config(data.clone(), "owner-b");
    b.request_timeout_ms = 300;
    b.max_attempts = 2;
    let ti = open(&b, rig.remote(), None)
        .await
        .expect("opens with the store down");
    assert!(ti.status().manifest_pending.is_some());
    write(&ti, 10_000..(10_000 + ITEMS as u64 * own - 5));
    ti.roll().unwrap();
    wait_until("its segments sealed", Duration::from_secs(10), || {
        journal(&data).len() as u64 == own
    })
    .await;
    // Meanwhile a single-writer broker of the stream, which reaches the
    // store, uploads ids 1..=other.
    let direct = RemoteStore::from_parts(rig.fs.inner().clone(), None, PREFIX, "memory://direct");
    let single = Config {
        manifest: false,
        ..config(rig.data("a"), "owner-a")
    };
    let a = open(&single, direct, None).await.unwrap();
    write(&a, 0..(ITEMS as u64 * other));
    let a = if keep_a {
        // Its segments are in the store before the store answers `b`
        // again (a CI run healed first: nothing to refuse).
        a.roll().unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            use futures::TryStreamExt as _;
            let listed: Vec<String> = rig
                .fs
                .inner()
                .list(None)
                .map_ok(|m| m.location.to_string())
                .try_collect()
                .await
                .unwrap_or_default();
            if listed.iter().filter(|k| k.ends_with(".seg")).count() as u64 >= other {
                break;
            }
            assert!(
                Instant::now() < until,
                "a's segments not uploaded: {listed:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(a)
    } else {
        let r = a.shutdown(Duration::from_secs(20)).await;
        assert!(r.fully_drained(), "{r:?}");
        None
    };
    rig.fs.heal();
    wait_until("the deferred take settled", Duration::from_secs(40), || {
        let s = ti.status();
        s.fenced.is_some() || s.manifest_pending.is_none()
    })
    .await;
    let why = ti
        .status()
        .fenced
        .expect("the deferred take was refused and stopped the run");
    assert!(why.contains("single-writer mode"), "{why}");
    assert!(why.contains("owner release"), "{why}");
    let r = ti.shutdown(Duration::from_secs(3)).await;
    assert!(r.fenced.is_some(), "{r:#?}");
    assert!(!r.fully_drained());
    assert!(
        rig.manifest_store().load().await.unwrap().is_none(),
        "no manifest written"
    );
    let j = journal(&data);
    assert!(ids_in(&j, SegmentState::Committed).is_empty(), "{j:?}");
    for id in j.keys() {
        assert!(
            common::sealed_path(&data, *id).exists(),
            "local copy of {id} kept"
        );
    }
    (rig, b, a)
}

/// The other side of the check above: a deferred first take of a new
/// stream lists the objects this data directory uploaded since open (young,
/// under ids above its journal's at open) and counts them as its own, by
/// the journal's record of their id and key: taken, everything committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_first_take_knows_its_own_uploads() {
    let rig = Rig::new(88);
    rig.fs.set_random(1.0, vec![Fault::Unavailable], &Op::ALL);
    let data = rig.data("a");
    let mut cfg = config(data.clone(), "owner-a");
    cfg.request_timeout_ms = 300;
    cfg.max_attempts = 2;
    let ti = open(&cfg, rig.remote(), None)
        .await
        .expect("opens with the store down");
    write(&ti, 0..(ITEMS as u64 * 3));
    ti.roll().unwrap();
    wait_until("three segments sealed", Duration::from_secs(10), || {
        journal(&data).len() >= 3
    })
    .await;
    rig.fs.heal();
    wait_until("the deferred take settled", Duration::from_secs(40), || {
        let s = ti.status();
        s.fenced.is_some() || s.manifest_pending.is_none()
    })
    .await;
    assert_eq!(ti.status().fenced, None);
    let r = ti.shutdown(Duration::from_secs(20)).await;
    assert!(r.fully_drained(), "{r:#?}");
    let (m, _) = rig.manifest().await;
    assert_eq!(m.segment_count, journal(&data).len() as u64);
}

/// helper-82 F2: a pending segment whose sealed file went missing (and
/// whose object the store never got) was quarantined with a reason only;
/// its entries are given by number now, from the journal's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_segment_whose_file_is_gone_is_reported_by_number() {
    let rig = Rig::new(82);
    let data = rig.data("a");
    let cfg = Config {
        manifest: false,
        probe_store: false,
        ..config(data.clone(), "owner-a")
    };
    {
        rig.fs.set_random(1.0, vec![Fault::Unavailable], &Op::ALL);
        let ti = open(&cfg, rig.remote(), None).await.unwrap();
        write(&ti, 0..(ITEMS as u64 * 2 + 20));
        let r = ti.shutdown(Duration::from_millis(500)).await;
        assert!(!r.fully_drained());
        rig.fs.heal();
    }
    let first = ids_in(&journal(&data), SegmentState::Sealed)
        .into_iter()
        .chain(ids_in(&journal(&data), SegmentState::Uploading))
        .min()
        .expect("a pending segment");
    let rec = journal(&data)[&first].clone();
    std::fs::remove_file(
        data.join("segments")
            .join(tierindex::segment::sealed::sealed_file_name(first)),
    )
    .unwrap();
    let ti = open(&cfg, rig.remote(), None).await.unwrap();
    let r = ti.shutdown(Duration::from_secs(10)).await;
    let q = r
        .drain
        .quarantined
        .iter()
        .find(|q| q.id == first.0)
        .unwrap_or_else(|| panic!("segment {first:?} not quarantined: {r:?}"));
    let why = q.last_error.as_deref().unwrap_or_default();
    let want = format!(
        "its {} entries (offsets {}..={}) are LOST",
        rec.meta.item_count, rec.meta.min_offset, rec.meta.max_offset
    );
    assert!(why.contains(&want), "{why}");
}

/// helper-90 F1: a deferred refusal beside a live single-writer broker
/// stopped that run only; a restart (a supervisor's, after exit 6) listed
/// only above the journal's highest id (4), which the other broker's
/// objects (1, 2) are below, and took the manifest beside it. The refusal
/// is kept in the data directory (`FIRST_TAKE_REFUSED`): the restart's
/// check lists from where the refusing one did, and refuses too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_a_deferred_refusal_is_refused_too() {
    let (rig, b, a) = deferred_take_beside_a_single_writer(87, 4, 2, true).await;
    let a = a.expect("the single-writer broker kept running");
    // The single-writer broker `a` still runs. `b` restarts.
    let again = open(&b, rig.remote(), None).await;
    let manifest = rig.manifest_store().load().await.unwrap();
    assert!(
        manifest.is_none(),
        "the restart took the manifest beside a live single-writer broker"
    );
    match again {
        Err(tierindex::Error::Claimed(m)) => assert!(m.contains("single-writer"), "{m}"),
        Err(e) => panic!("refused, but not as Claimed: {e}"),
        Ok(_) => panic!("the restart opened beside a live single-writer broker"),
    }
    let _ = a.shutdown(Duration::from_secs(5)).await;
}
