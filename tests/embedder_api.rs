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
