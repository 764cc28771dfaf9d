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
    let seg_dir = dir.path().join("data").join("segments");
    let seg_files = || {
        let mut segs: Vec<_> = std::fs::read_dir(&seg_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        segs.sort();
        segs
    };
    // The gauges (set by the open): every local segment held, at most the
    // bound mapped.
    let m = index.metrics();
    assert_eq!(m.local_sealed_segments.get(), seg_files().len() as u64);
    assert!(seg_files().len() >= 20);
    check(&index);
    assert!(m.local_sealed_mapped.get() <= 2);
    let text = m.render();
    assert!(text.contains("tierindex_local_sealed_segments "), "{text}");
    assert!(text.contains("tierindex_local_sealed_mapped "), "{text}");

    // A local file removed behind the index's back (not mapped: the bound
    // is 2) is reported and counted, not skipped quietly; the remote
    // lookup reads its committed copy, so nothing is missing there.
    std::fs::remove_file(&seg_files()[0]).unwrap();
    let l = index.lookup(b"k0", TimeRange::ALL);
    assert_eq!(l.unreadable_segments.len(), 1, "{l:?}");
    assert!(l.entries.len() < 58, "{l:?}");
    assert_eq!(index.metrics().local_unreadable_segments.get(), 1);
    let r = index.lookup_remote(b"k0", TimeRange::ALL).await.unwrap();
    // Its local part met the removed file too, and counted it.
    assert_eq!(index.metrics().local_unreadable_segments.get(), 2);
    assert!(r.unreadable.is_empty(), "it has a committed copy: {r:?}");
    let offsets: std::collections::BTreeSet<u64> = r.entries.iter().map(|e| e.offset).collect();
    let want: std::collections::BTreeSet<u64> = (0..400).filter(|i| i % 7 == 0).collect();
    assert_eq!(offsets, want, "{r:?}");
    index.shutdown(Duration::from_secs(30)).await;
}

/// Lookups run off the writer's lock (issue 16) while appends roll, seal,
/// upload and (second round) release local copies underneath them. Every
/// lookup returns what the index held at one point: each entry once, no
/// gaps, at least every entry appended before it began, and no segment
/// reported unreadable because it was sealed or released meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_beside_rolls_seals_and_releases_miss_nothing_and_double_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const ENTRIES: u64 = 6_000;
    // Entry i is the hot key's when i % 3 == 0: the j-th hot entry has
    // offset 3j, so a result is whole when its sorted offsets are 0, 3, 6...
    fn check_prefix(what: &str, mut offsets: Vec<u64>, sorted: bool, at_least: u64) -> usize {
        if !sorted {
            offsets.sort_unstable();
        }
        for (j, o) in offsets.iter().enumerate() {
            assert_eq!(
                *o,
                3 * j as u64,
                "{what}: not each entry once, in order, without gaps: {offsets:?}"
            );
        }
        assert!(
            offsets.len() as u64 >= at_least,
            "{what}: {} entries, {at_least} were appended before it began",
            offsets.len()
        );
        offsets.len()
    }
    // Local copies kept, released, and released without the manifest
    // (lookup_remote then lists the journal's committed segments).
    for (release, manifest) in [(false, true), (true, true), (true, false)] {
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(InMemory::new());
        let store = Store::new(mem.clone(), Some(mem.clone()), "tier", "memory://tier");
        let cfg = Config {
            sealed_mapped: 2,
            segment_items: 20,
            release_after_commit: release,
            manifest,
            tick_ms: 10,
            ..config(dir.path())
        };
        let (index, _) = TierIndex::open_with(cfg, store).await.unwrap();
        let index = Arc::new(index);
        let hot = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        // Lookups finished so far, local and remote.
        let ran = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        /// Ends the lookup loops however the appender ends (a failed
        /// append must fail the test, not hang it).
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let appender = {
            let (index, hot, done, ran) = (index.clone(), hot.clone(), done.clone(), ran.clone());
            std::thread::spawn(move || {
                let _done = SetOnDrop(done);
                let mut waited_out = false;
                for i in 0..ENTRIES {
                    let key = if i % 3 == 0 {
                        "hot".to_string()
                    } else {
                        format!("k{}", i % 5)
                    };
                    index.append(key.as_bytes(), i, 10, 1_000 + i).unwrap();
                    if i % 3 == 0 {
                        hot.store(i / 3 + 1, Ordering::Release);
                    }
                    if i % 50 == 49 {
                        index.flush().unwrap();
                        // Paced, so seals, uploads and releases happen
                        // while the lookups run: at least one lookup of
                        // each kind ends in every pause (however slow the
                        // machine; a loop that stopped is not waited for
                        // again).
                        let (l0, r0) =
                            (ran.0.load(Ordering::Acquire), ran.1.load(Ordering::Acquire));
                        std::thread::sleep(Duration::from_millis(10));
                        let until = std::time::Instant::now() + Duration::from_secs(5);
                        while !waited_out
                            && (ran.0.load(Ordering::Acquire) == l0
                                || ran.1.load(Ordering::Acquire) == r0)
                        {
                            if std::time::Instant::now() > until {
                                waited_out = true;
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                index.flush().unwrap();
            })
        };
        let local = {
            let (index, hot, done, ran) = (index.clone(), hot.clone(), done.clone(), ran.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !done.load(Ordering::Acquire) {
                    let before = hot.load(Ordering::Acquire);
                    let l = index.lookup(b"hot", TimeRange::ALL);
                    assert!(
                        l.unreadable_segments.is_empty() && l.corrupt_items == 0,
                        "{l:?}"
                    );
                    let offsets: Vec<u64> = l.entries.iter().map(|e| e.offset).collect();
                    if release {
                        // Released local copies are not in a local lookup:
                        // still each entry once and in order.
                        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
                    } else {
                        check_prefix("lookup", offsets, true, before);
                    }
                    n += 1;
                    ran.0.fetch_add(1, Ordering::Release);
                }
                n
            })
        };
        let mut remote_lookups = 0;
        while !done.load(Ordering::Acquire) {
            let before = hot.load(Ordering::Acquire);
            let r = index.lookup_remote(b"hot", TimeRange::ALL).await.unwrap();
            assert!(r.unreadable.is_empty(), "{r:?}");
            check_prefix(
                "lookup_remote",
                r.entries.iter().map(|e| e.offset).collect(),
                false,
                before,
            );
            remote_lookups += 1;
            ran.1.fetch_add(1, Ordering::Release);
        }
        appender.join().unwrap();
        let local_lookups = local.join().unwrap();
        assert!(
            local_lookups > 10 && remote_lookups > 10,
            "{local_lookups} local and {remote_lookups} remote lookups ran"
        );
        let r = index.lookup_remote(b"hot", TimeRange::ALL).await.unwrap();
        check_prefix(
            "final",
            r.entries.iter().map(|e| e.offset).collect(),
            false,
            ENTRIES.div_ceil(3),
        );
        let index = Arc::into_inner(index).unwrap();
        let report = index.shutdown(Duration::from_secs(30)).await;
        assert!(report.fully_drained(), "{report:?}");
    }
}

/// An idle stream's worker sleeps (issue 16: a thousand idle streams woke
/// five thousand times a second), and the first append into its empty
/// segment still gets the age roll on time: it wakes the worker, which
/// then sleeps until the deadline (8 s after open, about 4 s after the
/// append: a worker that slept past it to its 30 s safety net fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_sleeps_and_an_append_still_rolls_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(InMemory::new());
    let store = Store::new(mem.clone(), Some(mem), "tier", "memory://tier");
    let cfg = Config {
        segment_max_age_ms: Some(8_000),
        tick_ms: 20,
        ..config(dir.path())
    };
    let (index, _) = TierIndex::open_with(cfg, store).await.unwrap();
    let metrics = index.metrics();
    // Let the open's probe finish (the worker polls every 20 ms until
    // then), then count the wakes of two idle seconds: every 20 ms, as
    // before, would be about 100.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = metrics.worker_wakes.get();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = metrics.worker_wakes.get() - before;
    assert!(idle <= 3, "{idle} worker wakes in 2 idle seconds");

    // One entry: rolled at the deadline, sealed, uploaded and committed
    // long before the idle safety net (30 s) would have woken the worker.
    // (On a machine so slow that the append comes after the deadline, the
    // roll is due at once and this checks less.)
    index.append(b"k", 1, 10, 1_000).unwrap();
    index.flush().unwrap();
    let t = std::time::Instant::now();
    loop {
        let st = index.status();
        if st.by_state.get("Committed").copied().unwrap_or(0) == 1 && st.pending_segments == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "not committed after {:?}: {st:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = index.shutdown(Duration::from_secs(30)).await;
    assert!(report.fully_drained(), "{report:?}");
}

/// A broker that starts child processes (any thread's `Command::spawn`)
/// and closes then reopens its index: between the child's `fork` and its
/// `exec` the child holds a copy of every descriptor, the data directory's
/// lock included. The reopen waits for that copy (briefly) instead of
/// failing with `Locked` (CI failed `reconcile_foreign_writers` this way,
/// a test beside it running the CLI). A second open while this process
/// still holds the index is refused at once, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopen_waits_for_a_forked_childs_copy_of_the_lock() {
    use std::os::unix::process::CommandExt as _;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (index, _) = TierIndex::open(cfg.clone()).await.unwrap();
    index.append(b"k", 1, 10, 1_000).unwrap();
    index.flush().unwrap();

    // A live holder in this process: refused, and said to be this
    // process's (helper-82 F3: "locked by another process (pid = ours);
    // stop it first").
    let second = TierIndex::open(cfg.clone()).await;
    assert!(
        matches!(second, Err(tierindex::Error::Locked { .. })),
        "{:?}",
        second.err()
    );
    let text = second.err().unwrap().to_string();
    assert!(text.contains("held by this very process"), "{text}");
    assert!(!text.contains("stop it first"), "{text}");

    // Another thread starts a child that lingers 700 ms between fork and
    // exec, holding copies of this process's descriptors (`spawn` returns
    // only after the exec: on its own thread, as a broker's would be).
    let spawner = std::thread::spawn(|| {
        let mut cmd = std::process::Command::new("true");
        // SAFETY: the closure only sleeps (nanosleep is async-signal-safe).
        unsafe {
            cmd.pre_exec(|| {
                std::thread::sleep(Duration::from_millis(700));
                Ok(())
            });
        }
        cmd.status().unwrap()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = index.shutdown(Duration::from_secs(30)).await;
    assert!(report.error.is_none(), "{report:?}");
    let reopened = TierIndex::open(cfg.clone()).await;
    spawner.join().unwrap();
    let (index, _) = reopened.expect("reopen after the child's exec released its copy");
    let found = index.lookup_remote(b"k", TimeRange::ALL).await.unwrap();
    assert_eq!(found.entries.len(), 1, "{found:?}");
    let _ = index.shutdown(Duration::from_secs(30)).await;
}
