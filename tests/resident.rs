//! What a stream keeps in memory of its preallocated active file (issue 16:
//! an idle stream kept its whole active file resident, 0.8 MiB with
//! 20,000-item segments and 42 MiB with the default 1 Mi items, so 10,000
//! streams could not fit in memory), and that the pages ahead of the
//! appends are still read in before they are written (a first touch of a
//! page not in the page cache stalled an append 13-21 ms on ext4).
#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tierindex::{Config, TierIndex};

const ITEMS: u32 = 1 << 20;
const SLOTS: u32 = 4096;
const ITEM_LEN: u64 = 40;
const PAGE: u64 = 4096;
/// Header page plus the slot table (4 bytes a slot), page aligned.
const ITEMS_OFFSET: u64 = PAGE + (SLOTS as u64 * 4).div_ceil(PAGE) * PAGE;

fn config(dir: &Path) -> Config {
    Config::builder(dir.join("data"))
        .stream("s")
        .store(format!("file://{}", dir.join("store").display()))
        .segment_items(ITEMS)
        .slot_count(SLOTS)
        .single_writer_mode()
        .build()
        .unwrap()
}

/// The active segment's file (the lowest `.active`: no spare is prepared
/// before the segment is half full).
fn active_file(data_dir: &Path) -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data_dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "active"))
        .collect();
    v.sort();
    v.into_iter().next().expect("an active segment")
}

/// Resident bytes of this process's mappings of `path` (`/proc/self/smaps`).
fn resident_of(path: &Path) -> u64 {
    let want = path.canonicalize().unwrap().display().to_string();
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = line.ends_with(&want);
        } else if inside && let Some(v) = line.strip_prefix("Rss:") {
            kib += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap();
        }
    }
    kib * 1024
}

/// Which pages of `path[from..to]` are in the page cache (`mincore` of a
/// fresh read-only map: it reports the page cache, whoever read it in).
fn cached_pages(path: &Path, from: u64, to: u64) -> (usize, usize) {
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: a read-only map of a file this test's writer only appends to
    // (never truncated while the map lives); only `mincore` looks at it.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let len = map.len() as u64;
    let (from, to) = (from.min(len) / PAGE * PAGE, to.min(len));
    let pages = (to - from).div_ceil(PAGE) as usize;
    let mut v = vec![0u8; pages];
    // SAFETY: the range lies inside the live map; `v` has one byte a page.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr().add(from as usize) as *mut libc::c_void,
            (to - from) as usize,
            v.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    (v.iter().filter(|b| **b & 1 == 1).count(), pages)
}

fn on_tmpfs(path: &Path) -> bool {
    let c = std::ffi::CString::new(path.display().to_string()).unwrap();
    // SAFETY: a valid C string and a zeroed statfs buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0);
    st.f_type == libc::TMPFS_MAGIC
}

/// An open, idle stream keeps resident of its 42 MB active file the header,
/// the slot table and the first stretch of items (16 KiB): not the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_keeps_little_of_its_active_file_resident() {
    let dir = tempfile::tempdir().unwrap();
    let (ti, _) = TierIndex::open(config(dir.path())).await.unwrap();
    let file = active_file(&dir.path().join("data"));
    let len = std::fs::metadata(&file).unwrap().len();
    assert!(len > 40 << 20, "a 1 Mi-item active file is {len} bytes");
    // The kernel maps up to 16 pages around a fault: slack of 64 KiB.
    let bound = ITEMS_OFFSET + (16 << 10) + (64 << 10);
    let rss = resident_of(&file);
    assert!(
        rss <= bound,
        "an idle stream keeps {rss} bytes of its {len}-byte active file resident; at most \
         {bound} expected"
    );
    // A few appends and a flush keep it so.
    for n in 0..100 {
        ti.append(b"k", n, 1, n).unwrap();
    }
    ti.flush().unwrap();
    let rss = resident_of(&file);
    assert!(rss <= bound, "{rss} bytes resident after 100 appends");
    let r = ti.shutdown(Duration::from_secs(10)).await;
    assert!(r.error.is_none(), "shutdown: {:?}", r.error);
}

/// A stream that writes gets the pages ahead of its appends read in off
/// its thread: the next stretch is in the page cache before the appends
/// reach it. On a disk filesystem the rest of the preallocated file is not
/// read (on tmpfs every allocated page is in memory: only the first part
/// holds there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_ahead_of_the_appends_are_read_in_before_they_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let (ti, _) = TierIndex::open(config(dir.path())).await.unwrap();
    let file = active_file(&dir.path().join("data"));
    let read_before = tierindex::segment::active::populated_bytes();
    const WRITTEN: u64 = 300_000;
    for n in 0..WRITTEN {
        ti.append(b"k", n, 1, n).unwrap();
    }
    ti.flush().unwrap();
    let written_end = ITEMS_OFFSET + WRITTEN * ITEM_LEN;
    // Populated off the writer's thread: past what was written by at
    // least 4 MiB (the stretches double up to 8 MiB and are asked for
    // halfway through the one before; the first 16 KiB were populated at
    // open). The kernel's own read-around of a faulting page may bring the
    // next pages in as well, so the page cache alone would not show it.
    let want = written_end - ITEMS_OFFSET - (16 << 10) + (4 << 20);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let read = tierindex::segment::active::populated_bytes() - read_before;
        if read >= want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{read} bytes populated ahead of {written_end} bytes written after 30 s; at least \
             {want} expected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the next MiB past the appends is in the page cache and this
    // process's map of it.
    let (cached, pages) = cached_pages(&file, written_end, written_end + (1 << 20));
    assert_eq!(cached, pages, "pages past the appends in the page cache");
    assert!(
        resident_of(&file) >= written_end + (1 << 20) - ITEMS_OFFSET,
        "the map of the active file holds {} bytes, less than what was written and the MiB \
         after it",
        resident_of(&file)
    );
    if !on_tmpfs(&file) {
        // Nothing reads the last 8 MiB of the 42 MB file yet (the lead is
        // at most 8 MiB past 12 MB written, plus the kernel's read-ahead).
        let len = std::fs::metadata(&file).unwrap().len();
        let (cached, pages) = cached_pages(&file, len - (8 << 20), len);
        assert!(
            cached < pages / 4,
            "{cached} of the last {pages} pages of the active file in the page cache: the \
             whole preallocated file was read in"
        );
    }
    let rss = resident_of(&file);
    assert!(
        rss < written_end + (9 << 20),
        "{rss} bytes of the active file resident after {written_end} bytes written"
    );
    let r = ti.shutdown(Duration::from_secs(10)).await;
    assert!(r.error.is_none(), "shutdown: {:?}", r.error);
}

/// Page faults taken by this thread so far (minor and major).
fn thread_faults() -> i64 {
    // SAFETY: a zeroed rusage buffer for getrusage to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    ru.ru_minflt + ru.ru_majflt
}

/// No append takes a page fault: neither in the pages populated ahead of
/// it for writing (past a segment's first 16 KiB of items, on ext4 and
/// XFS: `prefault_writable`, as the sealer's thread does for a fast
/// stream) nor in the page a flush just wrote back. On a file system that
/// tracks writes through a shared map (ext4, XFS, btrfs), a page populated
/// for reading was mapped read-only and the first append into it took a
/// write fault (2-5 us on ext4), and a flush's writeback write-protected
/// the last page it wrote, so the first append after every flush did too:
/// the append's p99.9 (issue 16). It runs in the build's own directory
/// (on a disk), and under CI refuses to run anywhere but ext4 or XFS.
#[test]
fn appends_take_no_page_fault_after_a_prefault_or_a_flush() {
    use tierindex::segment::active::ActiveSegment;
    use tierindex::segment::{Entry, SegmentId};
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // Only ext4 and XFS get pages populated for writing (elsewhere an
    // append may take these faults by design); CI runs on ext4.
    let c = std::ffi::CString::new(dir.path().display().to_string()).unwrap();
    // SAFETY: a valid C string and a zeroed statfs buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
    if ![libc::EXT4_SUPER_MAGIC, libc::XFS_SUPER_MAGIC].contains(&st.f_type) {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is on neither ext4 nor XFS (f_type {:#x}): this test proves nothing there",
            dir.path().display(),
            st.f_type
        );
        eprintln!("neither ext4 nor XFS: skipped");
        return;
    }
    let mut seg = ActiveSegment::create(dir.path(), SegmentId(1), 1024, 100_000, 0).unwrap();
    seg.prefault_writable(1 << 20);
    // Hashed before anything is counted: nothing in the counted spans
    // allocates.
    let keys: Vec<u64> = (0..7)
        .map(|k| tierindex::key_hash(format!("key-{k}").as_bytes()))
        .collect();
    let entry = |i: u64| Entry {
        key_hash: keys[(i % 7) as usize],
        offset: i,
        size: 1,
        timestamp_ms: i,
    };
    let mut n = 0u64;
    // The header, slot table and first 16 KiB of items are populated for
    // reading (an idle stream's pages are not dirtied): past them.
    for _ in 0..500 {
        seg.append_entry(entry(n)).unwrap();
        n += 1;
    }
    // Into the pages populated for writing: 5,000 items are 200 KB, about
    // 49 pages.
    let before = thread_faults();
    for _ in 0..5_000 {
        seg.append_entry(entry(n)).unwrap();
        n += 1;
    }
    let into_populated = thread_faults() - before;
    // After each flush, one append into the page it just wrote back (30
    // items a round: the last page is partly written in most rounds).
    let mut after_flush = 0;
    for _ in 0..100 {
        for _ in 0..30 {
            seg.append_entry(entry(n)).unwrap();
            n += 1;
        }
        seg.flush().unwrap();
        let before = thread_faults();
        seg.append_entry(entry(n)).unwrap();
        n += 1;
        after_flush += thread_faults() - before;
    }
    assert_eq!(
        (into_populated, after_flush),
        (0, 0),
        "page faults taken by 5,000 appends into populated pages, and by the first append \
         after each of 100 flushes"
    );
}
