//! The unlink and directory-fsync steps outside the core append/seal path
//! poison the writer like the core steps do (issue 12): releasing a local
//! sealed copy (`release.unlink`, `release.dirsync`) and removing an empty
//! active segment (`active.remove_empty`, `active.remove_empty.dirsync`).
//!
//! After each injected failure the writer refuses every later append, flush
//! and release with [`Error::Poisoned`]: nothing is acknowledged after it,
//! and the failed step is never retried into a success.
//!
//! Also a rolled segment's msync that fails at the next flush
//! (`active.msync` on a frozen segment): poisoned, not retried, not sealed.
//!
//! One test in this binary: the failpoint table is armed once per process
//! (from `TIERINDEX_FAILPOINTS`, read at the first hit), and every point
//! fails one hit only, so the five scenarios run in order, each on its own
//! data directory.

#![cfg(feature = "failpoints")]

use std::time::{Duration, Instant};

use tierindex::datadir::DataDir;
use tierindex::error::Error;
use tierindex::index::{IndexConfig, IndexWriter};

fn cfg() -> IndexConfig {
    IndexConfig {
        slot_count: 64,
        segment_items: 100,
        segment_max_age: None,
        max_chain_steps: 1 << 20,
        ..IndexConfig::default()
    }
}

/// A writer with one sealed segment (30 flushed entries) and an empty
/// active one.
fn writer_with_sealed(dir: &std::path::Path) -> (IndexWriter, tierindex::SegmentId) {
    let dd = DataDir::open(dir).unwrap();
    let (mut w, _) = IndexWriter::open(dd, cfg(), None, None).unwrap();
    for i in 0..30u64 {
        w.append(&(i % 7).to_le_bytes(), i, 1, i).unwrap();
    }
    w.flush().unwrap();
    let id = w.roll().unwrap().expect("a non-empty segment rolls");
    let until = Instant::now() + Duration::from_secs(30);
    let mut sealed = Vec::new();
    while sealed.is_empty() {
        assert!(Instant::now() < until, "the seal did not finish");
        sealed = w.poll_sealed().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(sealed[0].id, id);
    (w, id)
}

/// Every later write is refused with the poison error; nothing more is
/// acknowledged.
fn assert_refuses_everything(w: &mut IndexWriter, what: &str, id: tierindex::SegmentId) {
    let why = w
        .poisoned()
        .unwrap_or_else(|| panic!("{what}: writer not poisoned"));
    assert!(why.contains("poisoned"), "{what}: {why}");
    let a = w.append(b"after", 1_000, 1, 1);
    assert!(matches!(a, Err(Error::Poisoned(_))), "{what}: append {a:?}");
    let f = w.flush();
    assert!(matches!(f, Err(Error::Poisoned(_))), "{what}: flush {f:?}");
    let r = w.release(id);
    assert!(
        matches!(r, Err(Error::Poisoned(_))),
        "{what}: release {r:?}"
    );
    let r = w.roll();
    assert!(r.is_err(), "{what}: roll {r:?}");
}

#[test]
fn release_and_remove_empty_failures_poison_and_are_never_retried() {
    // SAFETY: the only test in this binary, before any other thread exists.
    unsafe {
        std::env::set_var(
            "TIERINDEX_FAILPOINTS",
            "release.unlink=eio@1;release.dirsync=eio@1;\
             active.remove_empty=eio@1;active.remove_empty.dirsync=eio@1;\
             active.msync=eio@6",
        );
    }
    let root = tempfile::tempdir().unwrap();

    // 1. The unlink of a released copy fails: poisoned, the file stays.
    let d = root.path().join("unlink");
    let (mut w, id) = writer_with_sealed(&d);
    let seg = w.segments_dir().join(format!("{id}.seg"));
    let r = w.release(id);
    assert!(
        matches!(&r, Err(Error::Poisoned(m)) if m.contains("Input/output error")),
        "release with a failing unlink: {r:?}"
    );
    assert!(seg.exists(), "the failed unlink removed the file");
    assert_refuses_everything(&mut w, "release.unlink", id);
    drop(w);

    // 2. The unlink succeeds, the directory fsync fails: poisoned, and a
    //    second release (the file already gone) does not turn it into Ok.
    let d = root.path().join("dirsync");
    let (mut w, id) = writer_with_sealed(&d);
    let r = w.release(id);
    assert!(
        matches!(&r, Err(Error::Poisoned(m)) if m.contains("fsync of directory")),
        "release with a failing directory fsync: {r:?}"
    );
    assert_refuses_everything(&mut w, "release.dirsync", id);
    drop(w);

    // 3. Removing an empty active segment fails (ids raised above it, as
    //    when the manifest shows ids taken by another owner).
    let d = root.path().join("remove-empty");
    let (mut w, id) = writer_with_sealed(&d);
    let r = w.raise_next_id(tierindex::SegmentId(1_000));
    assert!(
        matches!(&r, Err(Error::Poisoned(m)) if m.contains("removing empty active segment")),
        "removal of an empty active with a failing unlink: {r:?}"
    );
    assert_refuses_everything(&mut w, "active.remove_empty", id);
    drop(w);

    // 4. The same unlink succeeds, its directory fsync fails.
    let d = root.path().join("remove-empty-dirsync");
    let (mut w, id) = writer_with_sealed(&d);
    let r = w.raise_next_id(tierindex::SegmentId(1_000));
    assert!(
        matches!(&r, Err(Error::Poisoned(m)) if m.contains("fsync of directory")),
        "removal of an empty active with a failing directory fsync: {r:?}"
    );
    assert_refuses_everything(&mut w, "active.remove_empty.dirsync", id);
    drop(w);

    // 5. A rolled (frozen) segment's msync fails at the flush after the
    //    roll (a roll no longer msyncs): poisoned, never retried into a
    //    success, and the sealer does not seal that segment; its `.active`
    //    stays for the next start. Segment A (100,000 entries, flushed)
    //    seals first, so B's seal is still queued when the flush runs.
    let d = root.path().join("frozen-msync");
    let dd = DataDir::open(&d).unwrap();
    let big = IndexConfig {
        segment_items: 200_000,
        slot_count: 4096,
        ..cfg()
    };
    let (mut w, _) = IndexWriter::open(dd, big.clone(), None, None).unwrap();
    for i in 0..100_000u64 {
        w.append(&(i % 7).to_le_bytes(), i, 1, i).unwrap();
    }
    w.flush().unwrap();
    w.roll().unwrap().expect("segment A rolls");
    for i in 100_000..100_010u64 {
        w.append(&(i % 7).to_le_bytes(), i, 1, i).unwrap();
    }
    let b = w.roll().unwrap().expect("segment B rolls");
    let msyncs = tierindex::failpoint::hit_counts()
        .into_iter()
        .find(|(p, _)| *p == "active.msync")
        .map_or(0, |(_, n)| n);
    assert_eq!(msyncs, 5, "the armed hit (6) must be the flush below");
    let f = w.flush();
    assert!(
        matches!(&f, Err(Error::Poisoned(m)) if m.contains("Input/output error")),
        "flush with a failing msync of the frozen segment: {f:?}"
    );
    let again = w.flush();
    assert!(
        matches!(&again, Err(Error::Poisoned(_))),
        "a second flush: {again:?}"
    );
    let closed = w.close(Instant::now() + Duration::from_secs(60));
    assert!(closed.is_err(), "close after a failed msync: {closed:?}");
    drop(w);
    // The sealer thread holds the directory's lock until it has ended
    // (the failed close did not wait for it): it has sealed A and, had it
    // not refused, would have sealed B by then.
    let until = Instant::now() + Duration::from_secs(30);
    let dd = loop {
        match DataDir::open(&d) {
            Err(Error::Locked { .. }) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(10))
            }
            r => break r.unwrap(),
        }
    };
    // The sealer has ended (it released the lock): what it left is final.
    let segs = d.join("segments");
    assert!(
        !segs.join(format!("{b}.seg")).exists(),
        "segment {b} was sealed after its msync failed"
    );
    assert!(
        segs.join(tierindex::segment::active::active_file_name(b))
            .exists(),
        "segment {b}'s active file is gone"
    );
    let (w, _) = IndexWriter::open(dd, big, None, None).unwrap();
    let n: usize = (0..7u64)
        .map(|k| {
            w.lookup(&k.to_le_bytes(), tierindex::TimeRange::ALL)
                .entries
                .len()
        })
        .sum();
    assert_eq!(n, 100_010, "frozen-msync: entries found after restart");
    drop(w);

    // Every point fired exactly where expected (a second hit passes).
    let hits: std::collections::BTreeMap<_, _> =
        tierindex::failpoint::hit_counts().into_iter().collect();
    for p in [
        "release.unlink",
        "release.dirsync",
        "active.remove_empty",
        "active.remove_empty.dirsync",
        "active.msync",
    ] {
        assert!(hits[p] >= 1, "{p} never reached: {hits:?}");
    }

    // A restart recovers every acknowledged entry of the poisoned writers.
    for name in ["unlink", "dirsync", "remove-empty", "remove-empty-dirsync"] {
        let dd = DataDir::open(&root.path().join(name)).unwrap();
        let (w, _) = IndexWriter::open(dd, cfg(), None, None).unwrap();
        let n: usize = (0..7u64)
            .map(|k| {
                w.lookup(&k.to_le_bytes(), tierindex::TimeRange::ALL)
                    .entries
                    .len()
            })
            .sum();
        // Case 2 released (unlinked) its only sealed copy before the fsync
        // failed: what is left is the pipeline's to know (the journal says
        // Committed, the store holds it). The others keep all 30 locally.
        let want = if name == "dirsync" { 0 } else { 30 };
        assert_eq!(n, want, "{name}: entries found after restart");
    }
}
