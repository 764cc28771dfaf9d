//! What an open stream costs in file descriptors (issue 16: descriptors
//! bounded by configuration, not by the stream count). Alone in its binary:
//! it counts the whole process's descriptors.
#![cfg(target_os = "linux")]

use std::path::Path;
use std::time::{Duration, Instant};

use tierindex::{Config, TierIndex};

/// What each open descriptor points at (the listing's own is one of them,
/// every time: it cancels out of a difference).
fn descriptor_targets() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    v.sort();
    v
}

use tierindex::testing::active_files;

/// Descriptors a stream keeps: its data directory's lock.
const PER_STREAM: usize = 1;

/// What exceeds `PER_STREAM` descriptors per stream (each of
/// `data-1..=streams`), or `PER_STREAM` a stream plus `slack` in all since
/// `before`; `None` when nothing does.
fn excess(dir: &Path, streams: usize, before: usize, slack: usize) -> Option<String> {
    let targets = descriptor_targets();
    let after = targets.len();
    for i in 1..=streams {
        let d = dir.join(format!("data-{i}")).display().to_string();
        let held: Vec<&String> = targets
            .iter()
            .filter(|t| **t == d || t.starts_with(&format!("{d}/")))
            .collect();
        if held.len() > PER_STREAM {
            return Some(format!(
                "stream {i} holds {} descriptors, at most {PER_STREAM} expected: {held:#?}",
                held.len()
            ));
        }
    }
    // In all, the process's own one-time set-up (a lazily started runtime
    // or store piece) may add a few; the streams not one more each.
    (after > before + PER_STREAM * streams + slack).then(|| {
        format!(
            "{streams} streams with their spares took {} descriptors ({before} before, \
             {after} after); at most {PER_STREAM} each (+{slack}) expected: {targets:#?}",
            after - before
        )
    })
}

/// Each stream holds its data directory's lock: one descriptor, whatever its
/// active segment and the spare prepared for its next roll (both mapped,
/// neither keeping one) and its journal (opened for each batch, under the
/// data directory's lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_costs_one_descriptor_with_its_spare_prepared() {
    const STREAMS: usize = 12;
    const ITEMS: u32 = 1_000;
    const SLACK: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("store").display());
    let open = |i: usize| {
        Config::builder(dir.path().join(format!("data-{i}")))
            .stream(format!("s{i}"))
            .store(store.clone())
            .segment_items(ITEMS)
            .slot_count(64)
            .single_writer_mode()
            .build()
            .unwrap()
    };
    // One stream first, so that what the process sets up once (the
    // runtime's, the shared sealer's and journal's threads) is not counted.
    let (first, _) = TierIndex::open(open(0)).await.unwrap();
    first.append(b"k", 0, 1, 1).unwrap();
    first.flush().unwrap();
    let before = descriptor_targets().len();

    let mut streams = Vec::new();
    for i in 1..=STREAMS {
        let (ti, _) = TierIndex::open(open(i)).await.unwrap();
        // Past half the segment: the next roll's spare is prepared.
        for n in 0..(ITEMS as u64 * 6 / 10) {
            ti.append(b"k", n, 1, n).unwrap();
        }
        ti.flush().unwrap();
        streams.push(ti);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 1..=STREAMS {
        let d = dir.path().join(format!("data-{i}"));
        while active_files(&d) < 2 {
            assert!(
                Instant::now() < deadline,
                "stream {i}: no spare prepared within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A spare's creation or a directory fsync still in flight holds a
    // descriptor for a moment: wait for the count to settle (a descriptor a
    // stream keeps never does).
    let settle = Instant::now() + Duration::from_secs(30);
    // `/proc/self/fd` shows resolved paths: compare with the resolved one
    // (a TMPDIR behind a symlink would otherwise match nothing).
    let real = dir.path().canonicalize().unwrap();
    loop {
        match excess(&real, STREAMS, before, SLACK) {
            None => break,
            Some(why) if Instant::now() >= settle => panic!("{why}"),
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    for s in streams.into_iter().chain([first]) {
        let r = s.shutdown(Duration::from_secs(10)).await;
        assert!(r.error.is_none(), "shutdown: {:?}", r.error);
    }

    // The same streams as one host's: none keeps a descriptor; the host
    // keeps one (its directory's lock) for all of them.
    let hosted = dir.path().join("hosted");
    let host = tierindex::Host::open(&hosted).unwrap();
    let before = descriptor_targets().len();
    let mut streams = Vec::new();
    for i in 1..=STREAMS {
        let mut cfg = open(i);
        cfg.data_dir = hosted.join(format!("data-{i}"));
        let (ti, _) = host.open_stream(cfg).await.unwrap();
        for n in 0..(ITEMS as u64 * 6 / 10) {
            ti.append(b"k", n, 1, n).unwrap();
        }
        ti.flush().unwrap();
        streams.push(ti);
    }
    for i in 1..=STREAMS {
        let d = hosted.join(format!("data-{i}"));
        while active_files(&d) < 2 {
            assert!(
                Instant::now() < deadline + Duration::from_secs(30),
                "hosted stream {i}: no spare prepared"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let real = hosted.canonicalize().unwrap();
    let settle = Instant::now() + Duration::from_secs(30);
    loop {
        let targets = descriptor_targets();
        let under: Vec<&String> = targets
            .iter()
            .filter(|t| t.starts_with(&format!("{}/", real.display())))
            .collect();
        let excess = targets.len() > before + SLACK;
        if under.is_empty() && !excess {
            break;
        }
        assert!(
            Instant::now() < settle,
            "a host's streams keep descriptors: {under:#?}; {} in all, {before} before",
            targets.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in tierindex::Host::shutdown_all(streams, Duration::from_secs(10)).await {
        assert!(r.error.is_none(), "shutdown: {:?}", r.error);
    }
}
