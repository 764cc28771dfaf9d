//! The public API as an embedder sees it: only the crate root's
//! re-exports (no internal module), with a store the embedder built.

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::memory::InMemory;
use object_store::path::Path;
use tierindex::{Config, Store, TierIndex, TimeRange};

fn config(dir: &std::path::Path) -> Config {
    Config {
        data_dir: dir.join("data"),
        segment_items: 100,
        slot_count: 64,
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedder_hands_in_its_own_store() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(InMemory::new());
    let store = Store::new(mem.clone(), Some(mem.clone()), "tier", "memory://tier");
    assert_eq!(store.url(), "memory://tier");
    let (index, _) = TierIndex::open_with(config(dir.path()), store.clone())
        .await
        .unwrap();
    for i in 0..250u64 {
        index
            .append(format!("k{}", i % 7).as_bytes(), i, 10, 1_000 + i)
            .unwrap();
    }
    index.flush().unwrap();
    let report = index.shutdown(Duration::from_secs(30)).await;
    assert!(report.fully_drained(), "{report:?}");

    // The segments are in the embedder's own store, under its prefix.
    let listed: Vec<_> = mem
        .list(Some(&Path::from("tier")))
        .try_collect()
        .await
        .unwrap();
    let segments = listed
        .iter()
        .filter(|m| m.location.as_ref().contains("/segments/"))
        .count();
    assert!(segments >= 3, "{listed:?}");

    // Reopened with the same store: every entry of a key is found.
    let (index, opened) = TierIndex::open_with(config(dir.path()), store)
        .await
        .unwrap();
    assert!(opened.previous_shutdown_clean);
    let found = index.lookup_remote(b"k3", TimeRange::ALL).await.unwrap();
    let offsets: Vec<u64> = found.entries.iter().map(|e| e.offset).collect();
    let want: Vec<u64> = (0..250).filter(|i| i % 7 == 3).collect();
    assert_eq!(offsets, want);
    index.shutdown(Duration::from_secs(30)).await;
}

/// More local sealed segments than `sealed_mapped` (issue 16: they are no
/// longer mapped one each): every entry is still found locally, before and
/// after a reopen, and nothing is reported unreadable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_local_segments_than_maps_are_all_found() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(InMemory::new());
    let store = Store::new(mem.clone(), Some(mem.clone()), "tier", "memory://tier");
    let cfg = Config {
        sealed_mapped: 2,
        segment_items: 20,
        ..config(dir.path())
    };
    let check = |index: &TierIndex| {
        for k in 0..7u64 {
            let l = index.lookup(format!("k{k}").as_bytes(), TimeRange::ALL);
            assert!(
                l.unreadable_segments.is_empty() && l.corrupt_items == 0,
                "{l:?}"
            );
            let offsets: Vec<u64> = l.entries.iter().map(|e| e.offset).collect();
            let want: Vec<u64> = (0..400).filter(|i| i % 7 == k).collect();
            assert_eq!(offsets, want, "k{k}");
        }
    };
    let (index, _) = TierIndex::open_with(cfg.clone(), store.clone())
        .await
        .unwrap();
    for i in 0..400u64 {
        index
            .append(format!("k{}", i % 7).as_bytes(), i, 10, 1_000 + i)
            .unwrap();
    }
    index.flush().unwrap();
    index.roll().unwrap();
    // Wait until every entry is in a sealed file (local copies are kept:
    // release_after_commit is off by default).
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while index.status().unsealed_items > 0 && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(index.status().unsealed_items, 0, "seals did not finish");
    check(&index);
    index.shutdown(Duration::from_secs(30)).await;
    let (index, _) = TierIndex::open_with(cfg.clone(), store.clone())
        .await
        .unwrap();
    check(&index);

    // A local file removed behind the index's back (not mapped: the bound
    // is 2) is reported and counted, not skipped quietly; the remote
    // lookup reads its committed copy, so nothing is missing there.
    let seg_dir = dir.path().join("data").join("segments");
    let mut segs: Vec<_> = std::fs::read_dir(&seg_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    std::fs::remove_file(&segs[0]).unwrap();
    let l = index.lookup(b"k0", TimeRange::ALL);
    assert_eq!(l.unreadable_segments.len(), 1, "{l:?}");
    assert!(l.entries.len() < 58, "{l:?}");
    assert_eq!(index.metrics().local_unreadable_segments.get(), 1);
    let r = index.lookup_remote(b"k0", TimeRange::ALL).await.unwrap();
    let offsets: std::collections::BTreeSet<u64> = r.entries.iter().map(|e| e.offset).collect();
    let want: std::collections::BTreeSet<u64> = (0..400).filter(|i| i % 7 == 0).collect();
    assert_eq!(offsets, want, "{r:?}");
    index.shutdown(Duration::from_secs(30)).await;
}
