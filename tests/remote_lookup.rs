//! `TierIndex::lookup_remote`: lookups across 100+ released segments read
//! back from the store (manifest = true, local copies released), checked
//! against a model of what was written; a partial upload (object present,
//! not committed) is never read; a damaged object is reported without
//! hiding the other segments' entries.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::{ObjectStoreExt, PutPayload};

use tierindex::remote::manifest::ManifestStore;
use tierindex::segment::sealed::build_sealed;
use tierindex::segment::{Entry, SegmentId};
use tierindex::testing::FaultyStore;
use tierindex::{Config, TierIndex, TimeRange};

const PREFIX: &str = "tier";
const STREAM: &str = "orders";
const TS0: u64 = 1_700_000_000_000;
const ITEMS: u32 = 50;
const SEGMENTS: u64 = 110;
const KEYS: u64 = 7;

fn config(data: PathBuf) -> Config {
    Config {
        data_dir: data,
        stream: STREAM.into(),
        segment_items: ITEMS,
        slot_count: 16,
        segment_max_age_ms: None,
        tick_ms: 20,
        max_attempts: 4,
        request_timeout_ms: 5000,
        manifest: true,
        owner_id: Some("broker-1".into()),
        release_after_commit: true,
        ..Config::default()
    }
}

fn key(o: u64) -> String {
    format!("k{}", o % KEYS)
}

/// Appends offsets `0..n` (key `key(o)`, timestamp `TS0 + o`), flushes and
/// shuts down with everything drained.
async fn fill_and_drain(cfg: &Config, fs: &Arc<FaultyStore>, n: u64) {
    let (ti, _) = TierIndex::open_with_store(cfg.clone(), fs.remote(PREFIX))
        .await
        .unwrap();
    for o in 0..n {
        ti.append(key(o).as_bytes(), o, 100, TS0 + o).unwrap();
    }
    ti.flush().unwrap();
    let r = ti.shutdown(Duration::from_secs(60)).await;
    assert!(r.fully_drained(), "{r:#?}");
}

/// A reader of the stream's manifest that shares nothing with the code
/// under test.
fn manifest_reader(remote: &tierindex::remote::RemoteStore) -> ManifestStore {
    ManifestStore::reader(remote, STREAM, Default::default()).unwrap()
}

/// The key of the lowest-named segment object of the stream.
async fn first_segment_object(fs: &Arc<FaultyStore>) -> object_store::path::Path {
    use futures::TryStreamExt;
    let prefix = fs.remote(PREFIX).segments_prefix(STREAM).unwrap();
    let mut v: Vec<_> = fs
        .inner()
        .list(Some(&prefix))
        .map_ok(|o| o.location)
        .try_collect()
        .await
        .unwrap();
    v.sort();
    v.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_across_released_segments_match_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let fs: Arc<FaultyStore> = FaultyStore::memory(77);
    let cfg = config(tmp.path().join("data"));
    let n = SEGMENTS * u64::from(ITEMS);
    fill_and_drain(&cfg, &fs, n).await;
    let (ti, _) = TierIndex::open_with_store(cfg.clone(), fs.remote(PREFIX))
        .await
        .unwrap();
    // A partial upload: a valid segment object with entries for k0 under our
    // segments prefix, never committed. It must never be read.
    let stray: Vec<Entry> = (0..10)
        .map(|i| Entry {
            key_hash: tierindex::key_hash(b"k0"),
            offset: 1_000_000 + i,
            size: 1,
            timestamp_ms: TS0,
        })
        .collect();
    let (bytes, meta) = build_sealed(SegmentId(9_999), 1, 2, 16, &stray).unwrap();
    let remote = fs.remote(PREFIX);
    remote
        .object_store()
        .put(&remote.segment_key(STREAM, &meta), PutPayload::from(bytes))
        .await
        .unwrap();

    for k in 0..KEYS {
        let want: Vec<u64> = (0..n).filter(|o| o % KEYS == k).collect();
        let got = ti
            .lookup_remote(key(k).as_bytes(), TimeRange::ALL)
            .await
            .unwrap();
        assert!(got.unreadable.is_empty(), "{:?}", got.unreadable);
        assert!(
            got.remote_segments >= SEGMENTS as usize - 1,
            "only {} remote segments",
            got.remote_segments
        );
        let offs: Vec<u64> = got.entries.iter().map(|e| e.offset).collect();
        assert_eq!(offs, want, "key {k}");
        for e in &got.entries {
            assert_eq!(e.timestamp_ms, TS0 + e.offset);
            assert_eq!(e.key_hash, tierindex::key_hash(key(e.offset).as_bytes()));
        }
    }
    // A time range: only what lies inside.
    let r = TimeRange {
        from_ms: TS0 + 1000,
        to_ms: TS0 + 1999,
    };
    let got = ti.lookup_remote(b"k3", r).await.unwrap();
    let want: Vec<u64> = (1000..2000).filter(|o| o % KEYS == 3).collect();
    assert_eq!(
        got.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        want
    );

    // Damage one committed object (same length, a flipped byte in its slot
    // directory): reported as unreadable, the others still answer.
    let m = manifest_reader(&remote);
    let manifest = m.load().await.unwrap().unwrap();
    let all = m.all_segments(&manifest).await.unwrap();
    let victim = &all[5];
    let vkey = object_store::path::Path::from(victim.key.as_str());
    let mut body = fs
        .inner()
        .get(&vkey)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    body[70] ^= 0x04;
    fs.inner().put(&vkey, PutPayload::from(body)).await.unwrap();
    // A fresh TierIndex (no cached index) sees the damage.
    let _ = ti.shutdown(Duration::from_secs(10)).await;
    let (ti, _) = TierIndex::open_with_store(cfg, fs.remote(PREFIX))
        .await
        .unwrap();
    let got = ti.lookup_remote(b"k1", TimeRange::ALL).await.unwrap();
    assert_eq!(got.unreadable.len(), 1, "{:?}", got.unreadable);
    assert_eq!(ti.metrics().remote_unreadable.get(), 1);
    assert!(ti.metrics().render().contains("remote_unreadable_total 1"));
    assert_eq!(got.unreadable[0].0, victim.id.0);
    let want: Vec<u64> = (0..n)
        .filter(|o| o % KEYS == 1 && !(victim.min_offset..=victim.max_offset).contains(o))
        .collect();
    assert_eq!(
        got.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        want
    );
    // Confirmed by a full read and recorded in the manifest: lost (no local
    // copy is held; the segment was released).
    assert_eq!(ti.metrics().remote_damage_marked.get(), 1);
    let manifest = m.load().await.unwrap().unwrap();
    let note = manifest
        .damage(victim.id)
        .expect("damage note in the manifest");
    assert!(note.lost, "{note:?}");
    assert_eq!(note.key, victim.key);
    assert!(note.reason.contains("CRC64"), "{note:?}");
    assert_eq!(manifest.damaged.len(), 1);
    // The next lookup skips it without reading it, and says why.
    let gets = fs.stats().requests(tierindex::testing::Op::Get);
    let again = ti.lookup_remote(b"k1", TimeRange::ALL).await.unwrap();
    assert_eq!(again.unreadable.len(), 1, "{:?}", again.unreadable);
    assert!(
        again.unreadable[0]
            .1
            .contains("marked damaged in the manifest")
            && again.unreadable[0].1.contains("LOST"),
        "{:?}",
        again.unreadable
    );
    assert_eq!(
        again.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        want
    );
    // Every other candidate's index is cached: one GET per segment with
    // items of k1 at most, none for the victim.
    let sent = fs.stats().requests(tierindex::testing::Op::Get) - gets;
    assert!(sent < SEGMENTS, "{sent} GETs");
    assert_eq!(ti.metrics().remote_damage_marked.get(), 1, "marked once");
    let _ = ti.shutdown(Duration::from_secs(10)).await;
}

/// A bit flipped in transit (the object itself is whole) must not mark the
/// segment damaged, even when the first confirming full read is flipped
/// too: only two full reads with the same wrong bytes count, so the lookup
/// reads again and answers in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flip_in_transit_is_not_marked_as_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let fs: Arc<FaultyStore> = FaultyStore::memory(79);
    let cfg = config(tmp.path().join("data"));
    let n = 20 * u64::from(ITEMS);
    fill_and_drain(&cfg, &fs, n).await;
    let (ti, _) = TierIndex::open_with_store(cfg.clone(), fs.remote(PREFIX))
        .await
        .unwrap();
    // The ranged read and the first confirming full read both arrive with
    // a flipped bit; the second full read is clean: nothing is marked.
    fs.fail_next(
        tierindex::testing::Op::Get,
        2,
        tierindex::testing::Fault::FlipBit,
    );
    let got = ti.lookup_remote(b"k2", TimeRange::ALL).await.unwrap();
    assert_eq!(fs.stats().injected_on(tierindex::testing::Op::Get), 2);
    assert!(got.unreadable.is_empty(), "{:?}", got.unreadable);
    let want: Vec<u64> = (0..n).filter(|o| o % KEYS == 2).collect();
    assert_eq!(
        got.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        want
    );
    assert_eq!(ti.metrics().remote_damage_marked.get(), 0);
    let _ = ti.shutdown(Duration::from_secs(10)).await;
    let m = manifest_reader(&fs.remote(PREFIX));
    assert!(m.load().await.unwrap().unwrap().damaged.is_empty());
}

/// A manifest rolled back to its first version (an operator restored an
/// older copy of the store's manifest objects) lists none of the segments
/// this data directory committed, and their local copies were released:
/// `lookup_remote` still finds every entry through the journal's records,
/// and names the segments in `unlisted` (it answered nothing before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_manifest_hides_no_entry_from_lookup_remote() {
    use futures::TryStreamExt;
    let tmp = tempfile::tempdir().unwrap();
    let fs: Arc<FaultyStore> = FaultyStore::memory(81);
    let cfg = config(tmp.path().join("data"));
    let n = 12 * u64::from(ITEMS);
    fill_and_drain(&cfg, &fs, n).await;
    let seg_dir = tmp.path().join("data/segments");
    let local = std::fs::read_dir(&seg_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "seg")
        })
        .count();
    assert_eq!(local, 0, "local copies released");
    // Every manifest version but the first removed.
    let remote = fs.remote(PREFIX);
    let prefix = object_store::path::Path::from(format!("{PREFIX}/{STREAM}/manifest/versions"));
    let mut vs: Vec<_> = fs
        .inner()
        .list(Some(&prefix))
        .map_ok(|o| o.location)
        .try_collect()
        .await
        .unwrap();
    vs.sort();
    assert!(vs.len() > 2, "{vs:?}");
    for v in &vs[1..] {
        fs.inner().delete(v).await.unwrap();
    }
    let first = manifest_reader(&remote).load().await.unwrap().unwrap();
    assert!(
        manifest_reader(&remote)
            .all_segments(&first)
            .await
            .unwrap()
            .is_empty()
    );
    let (ti, _) = TierIndex::open_with_store(cfg.clone(), fs.remote(PREFIX))
        .await
        .unwrap();
    for k in 0..KEYS {
        let want: Vec<u64> = (0..n).filter(|o| o % KEYS == k).collect();
        let got = ti
            .lookup_remote(key(k).as_bytes(), TimeRange::ALL)
            .await
            .unwrap();
        assert!(got.unreadable.is_empty(), "{:?}", got.unreadable);
        let mut offs: Vec<u64> = got.entries.iter().map(|e| e.offset).collect();
        offs.sort_unstable();
        assert_eq!(offs, want, "key {k}");
        assert_eq!(got.unlisted.len(), 12, "{:?}", got.unlisted);
    }
    let _ = ti.shutdown(Duration::from_secs(10)).await;
}

/// `reconcile_interval_ms`: a background, report-only reconcile sees an
/// object deleted behind the process's back and says so in its metrics,
/// writing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_reconcile_reports_a_deleted_object() {
    let tmp = tempfile::tempdir().unwrap();
    let fs: Arc<FaultyStore> = FaultyStore::memory(78);
    let cfg = Config {
        manifest: false,
        release_after_commit: false,
        ..config(tmp.path().join("data"))
    };
    fill_and_drain(&cfg, &fs, 500).await;
    let cfg = Config {
        reconcile_interval_ms: 100,
        reconcile_repair: false,
        ..cfg
    };
    let (ti, _) = TierIndex::open_with_store(cfg, fs.remote(PREFIX))
        .await
        .unwrap();
    let m = ti.metrics();
    let wait_runs = |n: u64| {
        let m = m.clone();
        async move {
            let until = std::time::Instant::now() + Duration::from_secs(20);
            while m.reconcile_runs.get() < n {
                assert!(std::time::Instant::now() < until, "no reconcile run {n}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_runs(1).await;
    assert_eq!(m.reconcile_unresolved.get(), 0, "clean state");
    let victim = first_segment_object(&fs).await;
    fs.inner().delete(&victim).await.unwrap();
    let runs = m.reconcile_runs.get();
    wait_runs(runs + 2).await;
    assert_eq!(m.reconcile_unresolved.get(), 1, "the deleted object");
    // Report only: nothing was re-uploaded.
    assert!(fs.inner().head(&victim).await.is_err());
    let _ = ti.shutdown(Duration::from_secs(10)).await;
}

/// `reconcile_repair` (the default): the background reconciler of a running
/// process re-uploads a committed object deleted behind its back from the
/// local copy, writing as the owner it already is (no new epoch: it does
/// not fence itself), and never deletes an object no journal record of
/// this data directory names, however old (issue 11: deletion needs proof).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_reconcile_repairs_from_the_running_process() {
    let tmp = tempfile::tempdir().unwrap();
    let fs: Arc<FaultyStore> = FaultyStore::memory(80);
    let cfg = Config {
        release_after_commit: false,
        ..config(tmp.path().join("data"))
    };
    fill_and_drain(&cfg, &fs, 500).await;
    let cfg = Config {
        reconcile_interval_ms: 100,
        reconcile_grace_ms: 1_000,
        ..cfg
    };
    let (ti, _) = TierIndex::open_with_store(cfg, fs.remote(PREFIX))
        .await
        .unwrap();
    let ms = manifest_reader(&fs.remote(PREFIX));
    let epoch = ms.load().await.unwrap().unwrap().epoch;
    let m = ti.metrics();
    let victim = first_segment_object(&fs).await;
    let original = fs
        .inner()
        .get(&victim)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    fs.inner().delete(&victim).await.unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while fs.inner().head(&victim).await.is_err() {
        assert!(std::time::Instant::now() < until, "never re-uploaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = fs
        .inner()
        .get(&victim)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(back, original, "re-uploaded byte for byte");
    // The run that re-uploaded counts its repair when it finishes, a moment
    // after the object is back.
    while m.reconcile_repaired.get() < 1 {
        assert!(
            std::time::Instant::now() < until,
            "re-uploaded, but no repair counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // An object under our key layout that nobody references (of unknown
    // origin: another data directory, a lost one): past the grace period
    // (1 s here, the shortest allowed) it is reported, never deleted.
    let one = [Entry {
        key_hash: 1,
        offset: 9_999_999,
        size: 1,
        timestamp_ms: TS0,
    }];
    let (bytes, meta) = build_sealed(SegmentId(9_999), 1, 2, 16, &one).unwrap();
    let orphan = fs.remote(PREFIX).segment_key(STREAM, &meta);
    fs.inner()
        .put(&orphan, PutPayload::from(bytes))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let runs = m.reconcile_runs.get();
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while m.reconcile_runs.get() < runs + 3 {
        assert!(std::time::Instant::now() < until, "the reconciler stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        fs.inner().head(&orphan).await.is_ok(),
        "an object of unknown origin was deleted"
    );
    assert!(m.reconcile_unresolved.get() >= 1, "and it is reported");
    let now = ms.load().await.unwrap().unwrap();
    assert_eq!(now.epoch, epoch, "repairs wrote as the owner: no new epoch");
    assert!(ti.status().fenced.is_none());
    let _ = ti.shutdown(Duration::from_secs(10)).await;
}

/// A committed segment whose object vanished (e.g. deleted by someone's
/// reconciler as an orphan) is never released: the local copy is the last
/// one. Once the object is back, the release goes ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_keeps_the_local_copy_when_the_object_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let fs: Arc<FaultyStore> = FaultyStore::memory(79);
    let keep = Config {
        manifest: false,
        release_after_commit: false,
        ..config(tmp.path().join("data"))
    };
    fill_and_drain(&keep, &fs, 120).await;
    let data = tmp.path().join("data");
    let local_segs = || common::local_sealed_ids(&data);
    let before = local_segs();
    assert!(before.len() >= 2, "{before:?}");
    // Remove the first segment's object behind the pipeline's back.
    let (victim, body) = {
        let k = first_segment_object(&fs).await;
        let b = fs.inner().get(&k).await.unwrap().bytes().await.unwrap();
        (k, b)
    };
    fs.inner().delete(&victim).await.unwrap();
    let release = Config {
        release_after_commit: true,
        ..keep
    };
    {
        let (ti, _) = TierIndex::open_with_store(release.clone(), fs.remote(PREFIX))
            .await
            .unwrap();
        let r = ti.shutdown(Duration::from_secs(2)).await;
        assert!(
            !r.fully_drained(),
            "released although the object is gone: {r:#?}"
        );
    }
    let after = local_segs();
    assert_eq!(
        after,
        before[..1].to_vec(),
        "only the segment without its object is kept"
    );
    // The object comes back (as `reconcile --repair` would put it): released.
    fs.inner()
        .put(&victim, PutPayload::from(body))
        .await
        .unwrap();
    let (ti, _) = TierIndex::open_with_store(release, fs.remote(PREFIX))
        .await
        .unwrap();
    let r = ti.shutdown(Duration::from_secs(30)).await;
    assert!(r.fully_drained(), "{r:#?}");
    assert!(local_segs().is_empty());
}

/// A local sealed segment that cannot be read and was never committed (the
/// store refuses every upload): `lookup_remote` names it in `unreadable`,
/// so the caller learns its entries are missing, instead of a quiet gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_local_segment_with_no_committed_copy_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let f = FaultyStore::memory(11);
    f.fail_next(
        tierindex::testing::Op::Put,
        1_000_000,
        tierindex::testing::Fault::Forbidden,
    );
    let cfg = Config {
        manifest: false,
        segment_items: 10,
        // One map: the removed file's is not cached.
        sealed_mapped: 1,
        ..config(dir.path().join("data"))
    };
    let (ti, _) = TierIndex::open_with_store(cfg, f.remote(PREFIX))
        .await
        .unwrap();
    for i in 0..30u64 {
        ti.append(b"k", i, 1, TS0 + i).unwrap();
    }
    ti.flush().unwrap();
    ti.roll().unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while ti.status().unsealed_items > 0 && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ti.status().unsealed_items, 0);
    let data = dir.path().join("data");
    let segs = common::local_sealed_ids(&data);
    assert_eq!(segs.len(), 3, "{segs:?}");
    std::fs::remove_file(common::sealed_path(&data, segs[1])).unwrap();
    // A frozen segment whose seal finished is read from its mapping (the
    // same entries) until the writer retires it, moments after the
    // appends stopped; then the removed file's entries are missing.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = ti.lookup_remote(b"k", TimeRange::ALL).await.unwrap();
        if r.entries.len() == 20 || std::time::Instant::now() > until {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(r.entries.len(), 20, "{r:?}");
    assert_eq!(r.unreadable.len(), 1, "{r:?}");
    assert!(r.unreadable[0].1.contains("no committed copy"), "{r:?}");
    drop(ti);
}
