//! Start-up on a damaged data directory: garbage, a truncated sealed file, a
//! torn active segment, an interrupted seal. Each gives a clear report, the
//! rest opens, and no byte is deleted that has no durable copy.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use tierindex::datadir::{self, DataDir, Mode};
use tierindex::index::{IndexConfig, IndexWriter};
use tierindex::segment::active::ActiveSegment;
use tierindex::segment::format::ActiveLayout;
use tierindex::segment::{SegmentId, TimeRange};

fn cfg() -> IndexConfig {
    IndexConfig {
        slot_count: 32,
        segment_items: 100,
        segment_max_age: None,
        max_chain_steps: 1 << 20,
        ..IndexConfig::default()
    }
}

/// Total bytes of every file under `dir`, recursively.
fn bytes_under(dir: &Path) -> u64 {
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        n += if m.is_dir() {
            bytes_under(&e.path())
        } else {
            m.len()
        };
    }
    n
}

#[test]
fn damaged_directory_reports_and_opens_the_rest() {
    let d = tempfile::tempdir().unwrap();
    // 250 entries: segments 1 and 2 sealed, 3 active with 50.
    {
        let (mut w, _) =
            IndexWriter::open(DataDir::open(d.path()).unwrap(), cfg(), None, None).unwrap();
        for i in 0..250u64 {
            w.append(&(i % 5).to_le_bytes(), i, 1, i).unwrap();
        }
        w.flush().unwrap();
        // wait for the two seals; keep segment 3 active (simulated crash: no close)
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut sealed = 0;
        while sealed < 2 && Instant::now() < deadline {
            sealed += w.poll_sealed().unwrap().len();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sealed, 2);
        std::mem::forget(w); // a crash: no destructor, no close
    }
    // The forgotten writer still holds the lock in this process; a crash
    // would have released it. Release it the way the kernel would.
    release_lock_of_forgotten_writer(d.path());

    let segs = d.path().join("segments");
    // 1) garbage file with a segment name and a stray file
    fs::write(
        segs.join("00000000000000000009.seg"),
        b"not a segment at all",
    )
    .unwrap();
    fs::write(segs.join("README.txt"), b"operator notes").unwrap();
    // 2) truncate sealed segment 2
    let s2 = segs.join("00000000000000000002.seg");
    let len = fs::metadata(&s2).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&s2)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    // 3) tear the active segment 3 in the middle of its items (items after it keep valid CRCs)
    let a3 = segs.join("00000000000000000003.active");
    let layout = ActiveLayout::new(32, 100).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&a3)
        .unwrap()
        .write_all_at(&[0xAB; 40], layout.item_offset(30) as u64)
        .unwrap();
    let before = bytes_under(d.path());

    // Check-only changes nothing.
    let dd = DataDir::open(d.path()).unwrap();
    let check = datadir::recover(&dd, Mode::CheckOnly).unwrap();
    assert_eq!(check.report.quarantined.len(), 4, "{:#?}", check.report);
    assert_eq!(bytes_under(d.path()), before);
    assert!(segs.join("README.txt").exists());

    let (w, report) = IndexWriter::open(dd, cfg(), None, None).unwrap();
    let q: Vec<&str> = report.quarantined.iter().map(|q| q.file.as_str()).collect();
    assert_eq!(report.quarantined.len(), 4, "{q:?}");
    assert!(q.iter().any(|f| f.ends_with("00000000000000000002.seg")));
    assert!(q.iter().any(|f| f.ends_with("00000000000000000009.seg")));
    assert!(q.iter().any(|f| f.ends_with("00000000000000000003.active")));
    assert!(q.iter().any(|f| f.ends_with("README.txt")));
    assert!(
        report
            .quarantined
            .iter()
            .all(|q| !q.reason.is_empty() && q.moved_to.is_some())
    );
    // Salvage by item: the cut sealed file keeps its 100 items (only its
    // footer was cut), and the torn active segment keeps the 49 items on
    // both sides of item 30, sealed under its own id.
    assert_eq!(report.sealed_ok, vec![1, 2, 3]);
    // The only active file left is the spare the writer prepared ahead of
    // its next roll (empty): taken up as the active segment.
    assert!(
        report
            .actives
            .iter()
            .all(|a| a.valid_items == 0 && a.torn_bytes_zeroed == 0),
        "{:#?}",
        report.actives
    );
    let s2 = report.salvaged.iter().find(|n| n.segment == 2).unwrap();
    assert_eq!((s2.salvaged_items, s2.lost_items), (100, 0));
    let s3 = report.salvaged.iter().find(|n| n.segment == 3).unwrap();
    assert_eq!((s3.salvaged_items, s3.lost_items), (49, 1), "{s3:#?}");
    assert_eq!(s3.lost[0].first_index, 30);
    assert_eq!(s3.lost[0].byte_offset, layout.item_offset(30) as u64);
    let s9 = report.salvaged.iter().find(|n| n.segment == 9).unwrap();
    assert!(s9.unknown_loss.is_some());
    // Nothing deleted: quarantine holds the four originals (moved or, for
    // the salvaged sealed file, copied), each with its record.
    let names: Vec<String> = fs::read_dir(d.path().join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 8, "{names:?}");
    assert_eq!(names.iter().filter(|n| n.ends_with(".why.json")).count(), 4);
    // The rest opens: key 0 is every fifth offset: 20 in segment 1, 20 in
    // the salvaged segment 2, 9 of 10 in segment 3 (offset 230 was item 30).
    let found = w.lookup(&0u64.to_le_bytes(), TimeRange::ALL).entries.len();
    assert_eq!(found, 20 + 20 + 9);
    // Ids never reuse a quarantined id; the salvaged active is sealed.
    assert_eq!(w.active_id(), Some(SegmentId(10)));
}

#[test]
fn interrupted_seal_is_redone_and_finished_seal_leftover_is_removed() {
    let d = tempfile::tempdir().unwrap();
    let dd = DataDir::open(d.path()).unwrap();
    let segs = dd.segments_dir();
    let mut a = ActiveSegment::create(&segs, SegmentId(4), 8, 10, 0).unwrap();
    for i in 0..10 {
        a.append(b"k", i, 1, i).unwrap();
    }
    a.flush().unwrap();
    drop(a);
    fs::write(segs.join("00000000000000000004.seg.tmp"), b"half a seal").unwrap();
    let (mut w, report) = IndexWriter::open(dd, cfg(), None, None).unwrap();
    assert_eq!(report.to_reseal, vec![4], "{report:#?}");
    assert!(report.quarantined.is_empty());
    let sealed = w.poll_sealed().unwrap();
    assert_eq!(sealed.len(), 1);
    assert_eq!(sealed[0].item_count, 10);
    assert!(!segs.join("00000000000000000004.seg.tmp").exists());
    assert!(!segs.join("00000000000000000004.active").exists());
    assert_eq!(w.lookup(b"k", TimeRange::ALL).entries.len(), 10);
}

/// `mem::forget` keeps the flock'd descriptor open; find and close it the
/// way process exit would. Linux-only, test-only.
fn release_lock_of_forgotten_writer(root: &Path) {
    // The lock is a flock of the data directory itself.
    let lock = root.canonicalize().unwrap();
    for e in fs::read_dir("/proc/self/fd").unwrap() {
        let e = e.unwrap();
        if fs::read_link(e.path()).ok().as_deref() == Some(lock.as_path()) {
            let fd: i32 = e.file_name().to_string_lossy().parse().unwrap();
            // SAFETY: the descriptor belongs to the leaked writer, which is
            // never used again.
            unsafe { libc::close(fd) };
        }
    }
}

/// A crash between creating an active segment and the fsync of its header
/// leaves an empty or all-zero file: removed (it never held an entry), not
/// quarantined. Only the newest file can be one: files are created in id
/// order, each header durable before the next file is made, so an
/// all-zero file below a later one was zeroed after it was written
/// (helper-58's F6): quarantined with its entries unaccounted for. One
/// non-zero byte makes it a damaged file: quarantined.
#[test]
fn unborn_active_files_are_removed_but_a_non_zero_one_is_quarantined() {
    let d = tempfile::tempdir().unwrap();
    {
        let dd = DataDir::open(d.path()).unwrap();
        drop(dd);
    }
    let segs = d.path().join(datadir::SEGMENTS_DIR);
    let mut one = vec![0u8; 4096];
    one[100] = 1;
    fs::write(segs.join("00000000000000000004.active"), &one).unwrap();
    fs::write(segs.join("00000000000000000005.active"), vec![0u8; 1 << 20]).unwrap();
    fs::write(segs.join("00000000000000000006.active"), b"").unwrap();

    let dd = DataDir::open(d.path()).unwrap();
    let check = datadir::recover(&dd, Mode::CheckOnly).unwrap();
    assert_eq!(check.report.removed.len(), 1, "{:#?}", check.report);
    assert!(check.report.removed[0].contains("00000000000000000006.active"));
    assert!(
        segs.join("00000000000000000006.active").exists(),
        "check-only"
    );

    let (w, report) = IndexWriter::open(dd, cfg(), None, None).unwrap();
    assert_eq!(report.quarantined.len(), 2, "{report:#?}");
    assert!(
        report.quarantined[0]
            .file
            .ends_with("00000000000000000004.active")
    );
    assert!(
        report.quarantined[1]
            .file
            .ends_with("00000000000000000005.active")
    );
    assert!(
        report.quarantined[1]
            .reason
            .contains("a later segment's file exists"),
        "{report:#?}"
    );
    assert!(!segs.join("00000000000000000006.active").exists());
    // Ids are never reused, removed files included.
    assert!(w.active_id().unwrap() > SegmentId(6), "{:?}", w.active_id());
}
