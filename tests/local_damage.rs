//! Local damage: a damaged active segment, sealed file or header never
//! hides an acknowledged entry. After recovery and a drain to a `file://`
//! store, every acknowledged entry is either found by `lookup` or counted
//! as lost (by segment, index and offset) in a report whose exit code is 4
//! ("an operator must look"). Nothing is invented, nothing is held twice
//! by a lookup, and a local mismatch is never retried as a store error.
//!
//! `TIERINDEX_DAMAGE_SEEDS` sets the seeds of the randomized test (default
//! 16, a few seconds); `TIERINDEX_DAMAGE_SEED` the first one.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tierindex::datadir::DataDir;
use tierindex::index::IndexWriter;
use tierindex::journal::{Journal, JournalOptions, Record};
use tierindex::segment::format::{ActiveLayout, SealedLayout};
use tierindex::segment::sealed::{SealedSegment, build_sealed, sealed_file_name};
use tierindex::tier::{OpenReport, ShutdownReport};
use tierindex::{Config, Entry, SegmentId, TierIndex, TimeRange};

const BIN: &str = env!("CARGO_BIN_EXE_tierindex");
const ITEMS: u32 = 300;
const SLOTS: u32 = 16;
const KEYS: u64 = 11;

fn key(o: u64) -> Vec<u8> {
    format!("k{}", o % KEYS).into_bytes()
}

fn entry(o: u64) -> Entry {
    Entry {
        key_hash: tierindex::key_hash(&key(o)),
        offset: o,
        size: 1 + (o % 97) as u32,
        timestamp_ms: 1_000 + o,
    }
}

struct World {
    _tmp: TempDir,
    data: PathBuf,
    store: PathBuf,
}

impl World {
    fn new() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let store = tmp.path().join("store");
        std::fs::create_dir_all(&store).unwrap();
        World {
            _tmp: tmp,
            data,
            store,
        }
    }

    fn config(&self) -> Config {
        Config {
            data_dir: self.data.clone(),
            store: Some(format!("file://{}", self.store.display())),
            stream: "damage".into(),
            segment_items: ITEMS,
            slot_count: SLOTS,
            segment_max_age_ms: None,
            tick_ms: 20,
            manifest: false,
            probe_store: false,
            release_after_commit: false,
            ..Config::default()
        }
    }

    fn seg(&self, name: &str) -> PathBuf {
        self.data.join("segments").join(name)
    }

    fn quarantine_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.data.join("quarantine"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// The data directory's lock, once a dropped writer's sealer thread let go.
fn open_dd(root: &Path) -> DataDir {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match DataDir::open(root) {
            Ok(d) => return d,
            Err(tierindex::Error::Locked { .. }) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("open data dir: {e}"),
        }
    }
}

/// `sealed` entries into sealed files (one per `ITEMS`), then `active`
/// more (fewer than `ITEMS`) flushed into an active file left unsealed, as
/// a kill -9 leaves it. Every entry is acknowledged (flushed). With
/// `journal`, the sealed files are recorded `Sealed` in the journal, as the
/// running broker records them.
fn build(w: &World, sealed: u64, active: u64, journal: bool) -> u64 {
    assert!(active < u64::from(ITEMS));
    let cfg = w.config().index_config();
    {
        let (mut iw, _) = IndexWriter::open(open_dd(&w.data), cfg.clone(), None, None).unwrap();
        for o in 0..sealed {
            iw.append_entry(entry(o)).unwrap();
        }
        iw.flush().unwrap();
        iw.close(Instant::now() + Duration::from_secs(30)).unwrap();
    }
    // The journal takes the data directory's lock too: wait, as `open_dd`
    // does, for the closed writer's sealer thread to let go.
    let until = Instant::now() + Duration::from_secs(10);
    let (mut j, _) = loop {
        match Journal::open(&w.data, JournalOptions::default()) {
            Err(tierindex::Error::Locked { .. }) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(5))
            }
            r => break r.unwrap(),
        }
    };
    if journal {
        let mut ids: Vec<SegmentId> = Vec::new();
        for e in std::fs::read_dir(w.data.join("segments")).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".seg") {
                ids.push(SegmentId(stem.parse().unwrap()));
            }
        }
        ids.sort();
        let recs: Vec<Record> = ids
            .iter()
            .map(|id| Record::Sealed {
                meta: SealedSegment::open(&w.seg(&sealed_file_name(*id)))
                    .unwrap()
                    .meta(),
            })
            .collect();
        j.append(&recs).unwrap();
    }
    drop(j);
    {
        let (mut iw, _) = IndexWriter::open(open_dd(&w.data), cfg, None, None).unwrap();
        for o in sealed..sealed + active {
            iw.append_entry(entry(o)).unwrap();
        }
        iw.flush().unwrap();
        // Dropped without close: the active file stays, as after kill -9.
    }
    // The dropped writer's sealer thread lets go of the lock a moment later.
    drop(open_dd(&w.data));
    sealed + active
}

/// The segment id a sealed file's name gives.
fn id_of(sealed: &Path) -> u64 {
    let name = sealed.file_name().unwrap().to_string_lossy();
    name.trim_end_matches(".seg").parse().unwrap()
}

/// The single active file and the sealed files, by name.
/// The active file holding entries (the lowest-numbered one: a spare the
/// writer prepared ahead of its next roll is empty and numbered above it)
/// and the sealed files.
fn files(w: &World) -> (Option<PathBuf>, Vec<PathBuf>) {
    let mut actives = Vec::new();
    let mut sealed = Vec::new();
    for e in std::fs::read_dir(w.data.join("segments")).unwrap() {
        let p = e.unwrap().path();
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        if n.ends_with(".active") {
            actives.push(p);
        } else if n.ends_with(".seg") {
            sealed.push(p);
        }
    }
    actives.sort();
    sealed.sort();
    (actives.into_iter().next(), sealed)
}

/// The oldest active file and its segment id (from its name).
fn first_active(w: &World) -> (PathBuf, u64) {
    let active = files(w).0.expect("an active file");
    let id = active
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("an active file named by its id");
    (active, id)
}

/// [`first_active`], with every other active file (the spare prepared
/// ahead of a roll) removed: the newest file of the directory.
fn only_active(w: &World) -> (PathBuf, u64) {
    let (active, id) = first_active(w);
    for e in std::fs::read_dir(w.data.join("segments")).unwrap() {
        let p = e.unwrap().path();
        if p != active && p.to_string_lossy().ends_with(".active") {
            std::fs::remove_file(&p).unwrap();
        }
    }
    (active, id)
}

fn xor(path: &Path, at: u64, len: usize, x: u8) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .unwrap();
    let mut b = vec![0u8; len];
    let n = f.read_at(&mut b, at).unwrap();
    for v in &mut b[..n] {
        *v ^= x;
    }
    f.write_all_at(&b[..n], at).unwrap();
    f.sync_all().unwrap();
}

struct Outcome {
    open: OpenReport,
    report: ShutdownReport,
    found: BTreeSet<u64>,
}

impl Outcome {
    /// The exit code `tierindex drain` gives this report (its rule).
    fn needs_operator(&self) -> bool {
        !self.report.lost.is_empty() || !self.report.drain.quarantined.is_empty()
    }
    fn lost_reported(&self) -> u64 {
        self.report.lost_items()
    }
    fn unknown_loss(&self) -> bool {
        self.report.lost.iter().any(|n| n.unknown_loss.is_some())
    }
}

/// `TierIndex::open`, waiting (at most 10 s) while the previous instance's
/// sealer thread still holds the data-directory lock after its shutdown.
async fn open_ti(w: &World) -> (TierIndex, tierindex::tier::OpenReport) {
    try_open_ti(w).await.unwrap_or_else(|e| panic!("open: {e}"))
}

/// [`open_ti`], returning every error but `Locked`.
async fn try_open_ti(
    w: &World,
) -> Result<(TierIndex, tierindex::tier::OpenReport), tierindex::Error> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match TierIndex::open(w.config()).await {
            Ok(x) => return Ok(x),
            Err(tierindex::Error::Locked { .. }) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => return Err(e),
        }
    }
}

/// Open (recovery), drain to the file store, open again and look every
/// key up.
async fn recover(w: &World) -> Outcome {
    let (ti, open) = open_ti(w).await;
    finish_recover(w, ti, open).await
}

async fn finish_recover(w: &World, ti: TierIndex, open: OpenReport) -> Outcome {
    let report = ti.shutdown(Duration::from_secs(30)).await;
    let (ti, _) = open_ti(w).await;
    let mut found = BTreeSet::new();
    for k in 0..KEYS {
        for e in ti.lookup(&key(k), TimeRange::ALL).entries {
            assert_eq!(e, entry(e.offset), "an entry that was never appended");
            assert!(found.insert(e.offset), "offset {} found twice", e.offset);
        }
    }
    let _ = ti.shutdown(Duration::from_secs(30)).await;
    Outcome {
        open,
        report,
        found,
    }
}

/// [`recover`], except that a journal the open refuses as corrupt is
/// rebuilt first, as `fsck --repair` does (returns whether it was).
async fn recover_rebuilding(w: &World, what: &str) -> (Outcome, bool) {
    match try_open_ti(w).await {
        Ok((ti, open)) => (finish_recover(w, ti, open).await, false),
        Err(e @ tierindex::Error::Corrupt { .. }) => {
            assert!(e.to_string().contains("journal"), "{what}: {e}");
            tierindex::journal::rebuild(&w.data)
                .unwrap_or_else(|e| panic!("{what}: journal rebuild: {e}"));
            (recover(w).await, true)
        }
        Err(e) => panic!("{what}: open: {e}"),
    }
}

/// The property: found, or lost by number with exit 4; never silently missing.
fn check(acked: u64, o: &Outcome, what: &str) {
    assert!(
        o.found.iter().all(|x| *x < acked),
        "{what}: entries beyond the acknowledged ones"
    );
    assert!(
        o.report.drain.pending.is_empty() && o.report.error.is_none(),
        "{what}: drain did not finish: {:#?}",
        o.report
    );
    let missing = acked - o.found.len() as u64;
    if missing > 0 {
        assert!(
            o.needs_operator(),
            "{what}: {missing} acknowledged entries silently missing: {:#?}",
            o.report
        );
        assert!(
            o.unknown_loss() || missing <= o.lost_reported(),
            "{what}: {missing} missing, only {} reported lost: {:#?}",
            o.lost_reported(),
            o.report.lost
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_inside_the_active_items_keeps_the_items_on_both_sides() {
    let w = World::new();
    let acked = build(&w, 600, 250, false);
    let (active, _) = files(&w);
    let active = active.unwrap();
    let l = ActiveLayout::new(SLOTS, ITEMS).unwrap();
    // 64 bytes from inside item 100: items 100..=101 (maybe 102) hit.
    xor(&active, l.item_offset(100) as u64 + 7, 64, 0x5a);
    let o = recover(&w).await;
    let notes = &o.open.segments.salvaged;
    assert_eq!(notes.len(), 1, "{notes:#?}");
    let n = &notes[0];
    assert_eq!(n.kind, "active");
    assert!((2..=3).contains(&n.lost_items), "{n:#?}");
    assert_eq!(n.lost[0].first_index, 100);
    assert_eq!(n.lost[0].byte_offset, l.item_offset(100) as u64);
    assert_eq!(n.salvaged_items, 250 - n.lost_items);
    // Exactly the damaged items are missing, and they are named.
    let missing: Vec<u64> = (0..acked).filter(|x| !o.found.contains(x)).collect();
    let want: Vec<u64> = (0..n.lost_items).map(|i| 600 + 100 + i).collect();
    assert_eq!(missing, want);
    assert!(o.needs_operator());
    check(acked, &o, "mid-span");
    // The damaged original is kept, with its record.
    let q = w.quarantine_files();
    assert!(
        q.iter()
            .any(|f| f.contains(".active.") && !f.ends_with(".why.json")),
        "{q:?}"
    );
    assert!(q.iter().any(|f| f.ends_with(".why.json")), "{q:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_bytes_of_the_active_header_do_not_drop_the_segment() {
    let w = World::new();
    let acked = build(&w, 300, 200, false);
    let (active, _) = files(&w);
    xor(&active.unwrap(), 16, 4, 0xff);
    let o = recover(&w).await;
    let n = &o.open.segments.salvaged[0];
    assert!(n.header_rebuilt, "{n:#?}");
    assert_eq!((n.salvaged_items, n.lost_items), (200, 0));
    assert_eq!(o.found.len() as u64, acked);
    assert!(!o.needs_operator(), "{:#?}", o.report);
    check(acked, &o, "header");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_active_file_is_salvaged_not_re_extended() {
    let w = World::new();
    let acked = build(&w, 0, 250, false);
    let (active, _) = files(&w);
    let active = active.unwrap();
    let l = ActiveLayout::new(SLOTS, ITEMS).unwrap();
    let cut = l.item_offset(200) as u64 + 13;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&active)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let o = recover(&w).await;
    let n = &o.open.segments.salvaged[0];
    assert_eq!(n.salvaged_items, 200);
    assert!(n.unknown_loss.is_some(), "{n:#?}");
    assert!(o.needs_operator());
    check(acked, &o, "cut");
    // The cut file was moved aside as it was, not grown back to the
    // header's length.
    assert!(!active.exists());
    let q = w.quarantine_files();
    let moved = q
        .iter()
        .find(|f| f.contains(".active.") && !f.ends_with(".why.json"))
        .unwrap();
    let len = std::fs::metadata(w.data.join("quarantine").join(moved))
        .unwrap()
        .len();
    assert_eq!(len, cut);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_a_sealed_file_salvages_the_intact_items() {
    for journal in [false, true] {
        let w = World::new();
        let acked = build(&w, 900, 10, journal);
        let (_, sealed) = files(&w);
        let target = &sealed[1];
        let l = SealedLayout::new(SLOTS, ITEMS);
        xor(target, l.items_offset + 32 * 150 + 5, 64, 0x33);
        let o = recover(&w).await;
        let notes: Vec<_> = o
            .open
            .segments
            .salvaged
            .iter()
            .filter(|n| n.kind == "sealed")
            .collect();
        assert_eq!(notes.len(), 1, "journal={journal}: {:#?}", o.open.segments);
        assert!((2..=3).contains(&notes[0].lost_items), "{:#?}", notes[0]);
        assert_eq!(
            o.found.len() as u64,
            acked - notes[0].lost_items,
            "journal={journal}"
        );
        assert!(o.needs_operator());
        check(acked, &o, &format!("sealed journal={journal}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_sealed_file_is_quarantined_at_once_not_retried() {
    let w = World::new();
    let acked = build(&w, 600, 0, true);
    let (_, sealed) = files(&w);
    let victim = sealed[0].clone();
    let id = id_of(&victim);
    // Valid footer, same id, other content.
    let other: Vec<Entry> = (0..300).map(|o| entry(10_000 + o)).collect();
    let (bytes, _) = build_sealed(SegmentId(id), 1, 2, SLOTS, &other).unwrap();
    std::fs::write(&victim, &bytes).unwrap();
    let started = Instant::now();
    let (ti, _) = TierIndex::open(w.config()).await.unwrap();
    let r = ti.shutdown(Duration::from_secs(60)).await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}: retried?",
        started.elapsed()
    );
    let q: Vec<_> = r.drain.quarantined.iter().filter(|p| p.id == id).collect();
    assert_eq!(q.len(), 1, "{r:#?}");
    let why = q[0].last_error.clone().unwrap_or_default();
    assert!(why.contains("does not match its journal record"), "{why}");
    assert!(!why.contains("read-back"), "{why}");
    assert!(r.drain.pending.is_empty(), "{r:#?}");
    assert!(!victim.exists(), "the foreign file must leave segments/");
    // The other segment drained; the foreign entries are served nowhere.
    let (ti, _) = TierIndex::open(w.config()).await.unwrap();
    let hits = ti.lookup(&key(10_000), TimeRange::ALL).entries;
    assert!(hits.iter().all(|e| e.offset < acked), "{hits:?}");
    let _ = ti.shutdown(Duration::from_secs(10)).await;
}

/// `quarantine retry` takes a journal-Quarantined segment out once the
/// cause is gone: the foreign file that got it quarantined is refused, the
/// segment id is refused while its file is missing, and once the right file
/// is back the retry journals `Requeued` and the next drain uploads it.
#[test]
fn quarantine_retry_requeues_a_segment_once_its_file_is_right_again() {
    let w = World::new();
    build(&w, 600, 0, true);
    let (_, sealed) = files(&w);
    let victim = sealed[0].clone();
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    let id: u64 = name.trim_end_matches(".seg").parse().unwrap();
    let original = std::fs::read(&victim).unwrap();
    let other: Vec<Entry> = (0..300).map(|o| entry(10_000 + o)).collect();
    let (bytes, _) = build_sealed(SegmentId(id), 1, 2, SLOTS, &other).unwrap();
    std::fs::write(&victim, &bytes).unwrap();
    let (code, text) = cli(&w, &["drain", "--deadline", "30s"]);
    assert_eq!(code, 4, "{text}");
    let journal_state = || {
        let (view, _) = Journal::open_read_only(&w.data).unwrap();
        view.get(SegmentId(id)).unwrap().state
    };
    assert_eq!(
        journal_state(),
        tierindex::journal::SegmentState::Quarantined
    );
    // The foreign file is not the segment's: refused.
    let foreign = w
        .quarantine_files()
        .into_iter()
        .find(|f| f.starts_with(&name) && !f.ends_with(".why.json"))
        .expect("the foreign file is in quarantine");
    let (code, text) = cli(&w, &["quarantine", "retry", &foreign]);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("other content"), "{text}");
    // By segment id, with no file in place: refused.
    let (code, text) = cli(&w, &["quarantine", "retry", &id.to_string()]);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("is not there"), "{text}");
    assert_eq!(
        journal_state(),
        tierindex::journal::SegmentState::Quarantined
    );
    // The operator puts the right file back: requeued, then uploaded.
    std::fs::write(&victim, &original).unwrap();
    let (code, text) = cli(&w, &["quarantine", "retry", &id.to_string()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("requeued"), "{text}");
    assert_eq!(journal_state(), tierindex::journal::SegmentState::Sealed);
    let (code, text) = cli(&w, &["drain", "--deadline", "30s"]);
    assert_eq!(code, 0, "{text}");
    let st = journal_state();
    assert!(
        matches!(
            st,
            tierindex::journal::SegmentState::Committed
                | tierindex::journal::SegmentState::Released
        ),
        "{st:?}"
    );
    let (code, text) = cli(&w, &["status"]);
    assert_eq!(code, 0, "{text}");
}

fn cli(w: &World, args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TIERINDEX_LOG", "error")
        .arg("--data-dir")
        .arg(&w.data)
        .arg("--store")
        .arg(format!("file://{}", w.store.display()))
        .args(["--stream", "damage"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_cli_tells_the_truth_about_pending_and_lost_entries() {
    let w = World::new();
    build(&w, 300, 120, true);
    // Entries in the active file and a journaled sealed file: pending.
    let (code, text) = cli(&w, &["status"]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("120 entries in active segments"), "{text}");
    // A sealed file the journal does not know is pending too.
    let (_, sealed) = files(&w);
    let (mut iw, _) =
        IndexWriter::open(open_dd(&w.data), w.config().index_config(), None, None).unwrap();
    iw.roll().unwrap();
    iw.close(Instant::now() + Duration::from_secs(30)).unwrap();
    drop(iw);
    drop(open_dd(&w.data));
    let (code, text) = cli(&w, &["status"]);
    assert_eq!(code, 3, "{text}");
    assert!(
        text.contains("sealed files unknown to the journal"),
        "{text}"
    );
    // fsck: a pending segment's file missing is exit 4.
    let gone = w.data.join("gone.seg");
    std::fs::rename(&sealed[0], &gone).unwrap();
    let (code, text) = cli(&w, &["fsck"]);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("MISSING"), "{text}");
    std::fs::rename(&gone, &sealed[0]).unwrap();
    // Damage in the newest sealed file (unknown to the journal): drain
    // salvages it, uploads the rest, and exits 4 naming the loss.
    let (_, sealed) = files(&w);
    let newest = sealed.last().unwrap();
    let l = SealedLayout::new(SLOTS, 120);
    xor(newest, l.items_offset + 32 * 10, 64, 0x77);
    let (code, text) = cli(&w, &["drain", "--deadline", "30s"]);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("LOST"), "{text}");
    let (code, text) = cli(&w, &["status"]);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("LOST"), "{text}");
    let (code, text) = cli(&w, &["quarantine", "list"]);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains(".seg."), "{text}");
    // A damaged file does not come back by retry.
    let damaged = w
        .quarantine_files()
        .into_iter()
        .find(|f| f.contains(".seg.") && !f.ends_with(".why.json"))
        .unwrap();
    let (code, text) = cli(&w, &["quarantine", "retry", &damaged]);
    assert_eq!(code, 4, "{text}");
    assert!(text.contains("still fails the full check"), "{text}");
}

/// The offline `lookup` (no broker running) reads an active file as
/// `drain` would salvage it: an item after a damaged span is found, and the
/// damage is named. It exits 4 and says the answer may be incomplete: a
/// damaged item's key cannot be read either (it exited 0, helper-52).
#[test]
fn an_offline_lookup_finds_items_after_a_damaged_span() {
    let w = World::new();
    build(&w, 0, 250, false);
    let (active, _) = files(&w);
    let active = active.unwrap();
    let l = ActiveLayout::new(SLOTS, ITEMS).unwrap();
    // Items 100..=101 (maybe 102) damaged: none of them has key residue 7.
    xor(&active, l.item_offset(100) as u64 + 7, 64, 0x5a);
    let (code, text) = cli(&w, &["lookup", "k7"]);
    assert_eq!(code, 4, "{text}");
    assert!(
        text.contains("incomplete: 1 damaged local file(s)"),
        "{text}"
    );
    let want = (0..250u64).filter(|o| o % KEYS == 7).count();
    assert_eq!(want, 23);
    assert!(text.contains(&format!("{want} hit(s)")), "{text}");
    assert!(text.contains("offset 249 "), "{text}");
    assert!(text.contains("salvaged by item"), "{text}");
    // Undamaged files: complete, exit 0.
    let w2 = World::new();
    build(&w2, 0, 250, false);
    let (code, text) = cli(&w2, &["lookup", "k7"]);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("incomplete"), "{text}");
}

/// Random damage at random offsets of the active, sealed and journal files,
/// across seeds, against the model of acknowledged entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_damage_never_hides_an_acknowledged_entry() {
    let seeds: u64 = std::env::var("TIERINDEX_DAMAGE_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let first: u64 = std::env::var("TIERINDEX_DAMAGE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let (mut total_acked, mut total_found, mut total_lost_reported) = (0u64, 0u64, 0u64);
    let mut exit4 = 0;
    let (mut journal_runs, mut journal_refused) = (0usize, 0usize);
    for seed in first..first + seeds {
        let mut r = fastrand::Rng::with_seed(seed);
        let w = World::new();
        let sealed_n = r.u64(0..=3) * u64::from(ITEMS) + r.u64(0..3) * 7;
        let active_n = r.u64(1..u64::from(ITEMS));
        let acked = build(&w, sealed_n, active_n, r.bool());
        let (active, sealed) = files(&w);
        let mut targets: Vec<PathBuf> = sealed.clone();
        targets.extend(active);
        // The journal too, about one damage in four (it exists in every
        // run: `build` opens it, with Sealed records or without).
        let journal = tierindex::journal::log_path(&w.data);
        let journal_weight = targets.len().div_ceil(3).max(1);
        for _ in 0..journal_weight {
            targets.push(journal.clone());
        }
        let hits = r.usize(1..=3);
        let mut desc = Vec::new();
        for _ in 0..hits {
            let t = &targets[r.usize(0..targets.len())];
            let len = std::fs::metadata(t).unwrap().len();
            // Active files are mostly zeros past the items: aim at the
            // written part (header, slots, items) most of the time.
            let written_end = if t.to_string_lossy().ends_with(".active") {
                let l = ActiveLayout::new(SLOTS, ITEMS).unwrap();
                (l.item_offset(active_n as u32) as u64 + 64).min(len)
            } else {
                len
            };
            let at = if r.u8(..) < 230 {
                r.u64(0..written_end)
            } else {
                r.u64(0..len)
            };
            let n = r.usize(1..=96);
            xor(t, at, n, r.u8(1..=255));
            desc.push(format!(
                "{} @{at}+{n}",
                t.file_name().unwrap().to_string_lossy()
            ));
        }
        let journal_hit = desc.iter().any(|d| d.starts_with("journal"));
        journal_runs += usize::from(journal_hit);
        // A journal damaged beyond a torn tail is refused at open (the CLI
        // names it and exits non-zero); the operator's way on is
        // `fsck --repair`, which rebuilds it from its intact frames and the
        // sealed files. Nothing is acknowledged-and-missing meanwhile: the
        // check below runs after it.
        let what = format!("seed {seed} ({sealed_n} sealed + {active_n} active; {desc:?})");
        let (o, rebuilt) = recover_rebuilding(&w, &what).await;
        if rebuilt {
            assert!(journal_hit, "{what}: open refused without journal damage");
            journal_refused += 1;
        }
        check(acked, &o, &what);
        total_acked += acked;
        total_found += o.found.len() as u64;
        total_lost_reported += o.lost_reported();
        exit4 += usize::from(o.needs_operator());
    }
    eprintln!(
        "random damage: {seeds} seeds, {total_acked} acknowledged entries, {total_found} found, {} missing, {total_lost_reported} reported lost, {exit4} runs with exit 4; {journal_runs} runs with journal damage, {journal_refused} refused at open and rebuilt",
        total_acked - total_found
    );
}

/// The property check itself can fail: an entry missing with no loss
/// reported is caught (the checker is not vacuous).
#[test]
#[should_panic(expected = "silently missing")]
fn the_check_catches_a_silently_missing_entry() {
    let report = ShutdownReport {
        sealed_at_shutdown: 0,
        drain: Default::default(),
        clean_marker_written: true,
        error: None,
        fenced: None,
        elapsed_ms: 0,
        lost: Vec::new(),
        unlisted: Vec::new(),
        unjournaled: Vec::new(),
        damaged_in_store: Vec::new(),
    };
    let open = OpenReport {
        previous_shutdown_clean: true,
        segments: Default::default(),
        journal_records_replayed: 0,
        journal_truncated_bytes: 0,
        notes: Vec::new(),
        store: String::new(),
    };
    let o = Outcome {
        open,
        report,
        found: (0..9).collect(),
    };
    check(10, &o, "planted");
}

/// Bit rot in a sealed file after it was opened: a local lookup says so
/// (`Lookup::corrupt_items`), it does not silently return less.
#[test]
fn a_local_lookup_reports_items_whose_crc_fails() {
    let w = World::new();
    let (mut iw, _) =
        IndexWriter::open(open_dd(&w.data), w.config().index_config(), None, None).unwrap();
    for o in 0..200 {
        iw.append_entry(entry(o)).unwrap();
    }
    iw.flush().unwrap();
    let id = iw.roll().unwrap().unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while !iw.holds_sealed(id) && Instant::now() < until {
        iw.poll_sealed().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let clean = iw.lookup(&key(0), TimeRange::ALL);
    assert_eq!(clean.entries.len(), 19);
    assert_eq!(clean.corrupt_items, 0);
    let l = SealedLayout::new(SLOTS, 200);
    xor(
        &w.seg(&sealed_file_name(id)),
        l.items_offset,
        32 * 200,
        0x01,
    );
    let rotten = iw.lookup(&key(0), TimeRange::ALL);
    assert!(rotten.entries.is_empty(), "{rotten:?}");
    // Every item of the key's slot failed its CRC (other keys share it).
    let slot = tierindex::segment::format::slot_of(entry(0).key_hash, SLOTS);
    let in_slot = (0..200)
        .filter(|o| tierindex::segment::format::slot_of(entry(*o).key_hash, SLOTS) == slot)
        .count() as u64;
    assert!(in_slot >= 19);
    assert_eq!(rotten.corrupt_items, in_slot);
    assert_eq!(rotten.corrupt_segments, vec![id.0]);
}

/// The data directory deleted, or its active file sealed and removed by a
/// second process, under a running broker (helper-51, session 27): the
/// appends go on into a file no restart will find, so the next flush must
/// fail and poison, not acknowledge them; so must every later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_after_the_data_directory_was_deleted_is_refused() {
    let w = World::new();
    let (ti, _) = open_ti(&w).await;
    for o in 0..10 {
        ti.append(&key(o), o, 1, 1_000 + o).unwrap();
    }
    ti.flush().unwrap();
    std::fs::remove_dir_all(&w.data).unwrap();
    // An append may still go into the map; the flush is the durability
    // point, and refuses.
    let _ = ti.append(&key(10), 10, 1, 1_010);
    let err = ti.flush().unwrap_err();
    assert!(matches!(err, tierindex::Error::Poisoned(_)), "{err}");
    assert!(err.to_string().contains("not there any more"), "{err}");
    assert!(ti.flush().is_err());
    assert!(ti.append(&key(11), 11, 1, 1_011).is_err());
    assert!(ti.status().poisoned.is_some());
    let report = ti.shutdown(Duration::from_secs(5)).await;
    assert!(!report.fully_drained(), "{report:?}");
    assert!(report.error.is_some(), "{report:?}");
}

/// 600 entries in two segments, uploaded and committed, their local copies
/// kept (`release_after_commit` off); returns the sealed files.
async fn committed_world() -> (World, Vec<PathBuf>) {
    let w = World::new();
    build(&w, 600, 0, true);
    let (ti, _) = open_ti(&w).await;
    let r = ti.shutdown(Duration::from_secs(60)).await;
    assert!(r.fully_drained(), "{r:#?}");
    let (_, sealed) = files(&w);
    (w, sealed)
}

/// A committed segment whose local file is not the one committed (a second
/// process sealed more entries under its id from the same active file, as
/// when a running host's stream was opened beside it): the release must
/// not delete it. It goes to quarantine, with the reason, and the segment
/// is released only then (helper-51, session 27).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_segments_local_file_that_differs_is_kept_not_released() {
    let (w, sealed) = committed_world().await;
    let victim = sealed[0].clone();
    let id = id_of(&victim);
    // Same id, the committed entries and 20 more.
    let more: Vec<Entry> = (0..320).map(entry).collect();
    let (bytes, _) = build_sealed(SegmentId(id), 1, 2, SLOTS, &more).unwrap();
    std::fs::write(&victim, &bytes).unwrap();
    // `fsck` says so (exit 4) and changes nothing without `--repair`.
    let (code, out) = cli(&w, &["fsck"]);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("NOT THE JOURNALED FILE"), "{out}");
    assert!(victim.exists());

    let mut cfg = w.config();
    cfg.release_after_commit = true;
    let (ti, _) = TierIndex::open(cfg).await.unwrap();
    let r = ti.shutdown(Duration::from_secs(60)).await;
    assert!(!victim.exists(), "moved out of segments/");
    let kept: Vec<String> = w
        .quarantine_files()
        .into_iter()
        .filter(|f| f.contains(&format!("{id:020}")))
        .collect();
    assert!(
        !kept.is_empty(),
        "kept in quarantine: {:?}",
        w.quarantine_files()
    );
    let record = kept
        .iter()
        .find(|f| f.ends_with(".why.json"))
        .expect("a record");
    let why = std::fs::read_to_string(w.data.join("quarantine").join(record)).unwrap();
    assert!(why.contains("not the one committed"), "{why}");
    assert!(why.contains("items 320 (journal: 300)"), "{why}");
    let q = kept.iter().find(|f| !f.ends_with(".why.json")).unwrap();
    assert_eq!(
        std::fs::read(w.data.join("quarantine").join(q)).unwrap(),
        bytes
    );
    // The other segment was released as usual.
    assert!(!sealed[1].exists(), "{r:#?}");
}

/// A committed object damaged in place at rest (same size), released in a
/// later run than the one that verified it: the release reads the body
/// back whole and keeps the local copy, the last good one (helper-52,
/// session 27: a size check let it delete it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_in_a_later_run_proves_the_body_before_deleting_the_local_copy() {
    let (w, sealed) = committed_world().await;
    let stem = format!("{:020}", id_of(&sealed[0]));
    let mut objects = Vec::new();
    let mut dirs = vec![w.store.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name().unwrap().to_string_lossy().starts_with(&stem) {
                objects.push(p);
            }
        }
    }
    assert_eq!(objects.len(), 1, "{objects:?}");
    // One bit of one item, in the store's copy only.
    xor(&objects[0], 400, 1, 0x10);

    let mut cfg = w.config();
    cfg.release_after_commit = true;
    let (ti, _) = TierIndex::open(cfg).await.unwrap();
    let r = ti.shutdown(Duration::from_secs(30)).await;
    assert!(sealed[0].exists(), "the last good copy was deleted: {r:#?}");
    assert!(!r.fully_drained(), "{r:#?}");
    let said = format!("{r:?}");
    assert!(said.contains("does not hold the committed bytes"), "{said}");
    // The other segment's object is whole: released.
    assert!(!sealed[1].exists(), "{r:#?}");
}

/// Bytes appended to an active file (`printf x >> NNN.active`, a tool
/// writing to the wrong file) are not part of the segment: every intact
/// entry is recovered, nothing is reported lost, and the original with
/// its extra bytes is kept aside (helper-52, session 27: the whole file
/// was quarantined as "an unknown number LOST").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_appended_to_an_active_file_lose_none_of_its_entries() {
    for extra in [1usize, 4096] {
        let w = World::new();
        let acked = build(&w, 300, 250, false);
        let (active, _) = files(&w);
        let active = active.unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&active)
            .unwrap();
        std::io::Write::write_all(&mut f, &vec![b'x'; extra]).unwrap();
        drop(f);
        let o = recover(&w).await;
        let what = format!("{extra} byte(s) appended");
        check(acked, &o, &what);
        assert_eq!(
            o.found.len() as u64,
            acked,
            "{what}: {:#?}",
            o.open.segments
        );
        assert_eq!(o.lost_reported(), 0, "{what}: {:#?}", o.report.lost);
        assert!(!o.unknown_loss(), "{what}: {:#?}", o.open.segments);
        let kept: u64 = w
            .quarantine_files()
            .iter()
            .filter(|f| f.contains(".active") && !f.ends_with(".json"))
            .map(|f| {
                std::fs::metadata(w.data.join("quarantine").join(f))
                    .unwrap()
                    .len()
            })
            .sum();
        let l = ActiveLayout::new(SLOTS, ITEMS).unwrap();
        assert_eq!(
            kept,
            l.file_len + extra as u64,
            "{what}: the original, kept whole"
        );
    }
}

/// Acknowledged items at the end of an active file, zeroed later (not torn:
/// a tool or a filesystem repair writing zeros) looked like items never
/// written: neither recovered nor reported (known gap 16). The file's flush
/// mark says how many items a flush made durable: those items are lost,
/// by number, and the verified ones are salvaged. Garbage there (not
/// zeros) is counted the same way, as lost rather than "possibly" lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zeroed_acknowledged_tail_is_reported_lost_by_number() {
    for (what, byte) in [("zeroed", None), ("overwritten", Some(0x5au8))] {
        let w = World::new();
        let acked = build(&w, 300, 200, false);
        let (active, _) = files(&w);
        let active = active.unwrap();
        let l = ActiveLayout::new(SLOTS, ITEMS).unwrap();
        // Items 150..200 of the active file (entries 450..500).
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&active)
            .unwrap();
        let span = vec![byte.unwrap_or(0); 50 * 40];
        f.write_all_at(&span, l.item_offset(150) as u64).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let o = recover(&w).await;
        let notes = &o.open.segments.salvaged;
        assert_eq!(notes.len(), 1, "{what}: {notes:#?}");
        let n = &notes[0];
        assert_eq!(n.kind, "active", "{what}");
        assert_eq!(n.lost_items, 50, "{what}: {n:#?}");
        assert_eq!(n.lost[0].first_index, 150, "{what}: {n:#?}");
        assert_eq!(n.salvaged_items, 150, "{what}: {n:#?}");
        let missing: Vec<u64> = (0..acked).filter(|x| !o.found.contains(x)).collect();
        assert_eq!(missing, (450..500).collect::<Vec<u64>>(), "{what}");
        assert!(o.needs_operator(), "{what}");
        check(acked, &o, what);
    }
}

/// helper-58's F6: an active file zeroed whole (1000 acknowledged entries)
/// below the spare prepared for the next roll was removed as "creation
/// interrupted", and the drain exited 0: the entries were lost without a
/// word. A later segment's file proves its creation had finished: the
/// zeros are damage, and the file is reported (every entry unaccounted
/// for, exit 4) and kept in quarantine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zeroed_active_file_below_a_later_one_is_reported_not_removed() {
    let w = World::new();
    let acked = build(&w, 300, 200, false);
    let (active, id) = first_active(&w);
    // The spare prepared ahead of the next roll (the writer made one).
    let spare = w.data.join(format!("segments/{:020}.active", id + 1));
    if !spare.exists() {
        drop(
            tierindex::segment::active::ActiveSegment::create(
                &w.data.join("segments"),
                SegmentId(id + 1),
                SLOTS,
                ITEMS,
                0,
            )
            .unwrap(),
        );
    }
    let len = std::fs::metadata(&active).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&active)
        .unwrap();
    f.write_all_at(&vec![0u8; len as usize], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let o = recover(&w).await;
    assert!(o.unknown_loss(), "{:#?}", o.open.segments);
    assert!(o.needs_operator());
    let name = format!("{id:020}.active");
    assert!(
        w.quarantine_files().iter().any(|f| f.starts_with(&name)),
        "{:?}",
        w.quarantine_files()
    );
    // The sealed segments' entries are all there; the active file's 200
    // are the ones unaccounted for.
    let missing: Vec<u64> = (0..acked).filter(|x| !o.found.contains(x)).collect();
    assert_eq!(missing, (300..500).collect::<Vec<u64>>());
}

/// helper-82 F1: the newest active file (no later file shows its creation
/// had finished) removed, emptied, zeroed, or its items zeroed, after a
/// flush acknowledged its entries. Start-up used to take it for a file that
/// never held an entry: every report said clean while 200 acknowledged
/// entries were gone. The acknowledged-segment mark (`ACKED_ACTIVE`) says
/// they were acknowledged: each is reported lost by number, recorded in
/// quarantine/ (exit 4 until an operator moves the record away), the next
/// start does not record it twice, and its id is not given out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_active_file_gone_or_zeroed_is_reported_lost_by_number() {
    for damage in ["removed", "emptied", "zeroed", "items zeroed"] {
        let w = World::new();
        let acked = build(&w, 300, 200, false);
        // No spare above it: the newest file of the directory.
        let (active, id) = only_active(&w);
        let len = std::fs::metadata(&active).unwrap().len();
        match damage {
            "removed" => std::fs::remove_file(&active).unwrap(),
            "emptied" => std::fs::File::create(&active).map(drop).unwrap(),
            "zeroed" => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&active)
                    .unwrap();
                f.write_all_at(&vec![0u8; len as usize], 0).unwrap();
            }
            _ => {
                let layout = ActiveLayout::new(SLOTS, ITEMS).unwrap();
                let from = layout.item_offset(0) as u64;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&active)
                    .unwrap();
                f.write_all_at(&vec![0u8; (len - from) as usize], from)
                    .unwrap();
            }
        }
        // Before any start recorded it: `status` and `fsck` say it.
        for cmd in ["status", "fsck"] {
            let (code, out) = cli(&w, &[cmd]);
            assert_eq!(code, 4, "{damage}: {cmd}: {out}");
            assert!(out.contains("LOST"), "{damage}: {cmd}: {out}");
        }
        let o = recover(&w).await;
        check(acked, &o, damage);
        let missing: Vec<u64> = (0..acked).filter(|x| !o.found.contains(x)).collect();
        assert_eq!(missing, (300..500).collect::<Vec<u64>>(), "{damage}");
        assert!(o.needs_operator(), "{damage}: {:#?}", o.report);
        assert!(
            o.lost_reported() >= 200 || o.unknown_loss(),
            "{damage}: {:#?}",
            o.report.lost
        );
        let name = format!("{id:020}.active");
        let records: Vec<String> = w
            .quarantine_files()
            .into_iter()
            .filter(|f| f.starts_with(&name) && f.ends_with(".why.json"))
            .collect();
        assert_eq!(records.len(), 1, "{damage}: {:?}", w.quarantine_files());
        // The CLI says so, with the number, and exits 4.
        let (code, out) = cli(&w, &["status"]);
        assert_eq!(code, 4, "{damage}: {out}");
        assert!(
            out.contains("200") && out.contains("LOST"),
            "{damage}: {out}"
        );
        // A third start records nothing new; no file reuses the id.
        let o = recover(&w).await;
        assert_eq!(
            w.quarantine_files()
                .iter()
                .filter(|f| f.starts_with(&name) && f.ends_with(".why.json"))
                .count(),
            1,
            "{damage}: {:?}",
            w.quarantine_files()
        );
        assert!(
            !w.seg(&format!("{id:020}.seg")).exists()
                && !w.seg(&format!("{id:020}.active")).exists()
                || damage == "items zeroed",
            "{damage}: the id was given out again"
        );
        drop(o);
    }
}

/// The newest active file damaged three ways after its 200 entries were
/// acknowledged: its header page (four header bytes, so the header is
/// rebuilt, and both of the file's own flush marks), one item zeroed between intact ones (a
/// hole) and its last 50 items zeroed (a cut that, without the file's
/// flush mark, reads as never written). The hole is counted by the
/// salvage, the cut by the acknowledged-segment mark, in a note of its
/// own. Before, any note for the marked segment, even the rebuilt
/// header's, skipped the mark's check: "1 LOST", the 50 uncounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newest_active_file_holed_and_cut_reports_both_losses() {
    let w = World::new();
    let acked = build(&w, 300, 200, false);
    let (active, _) = only_active(&w);
    xor(&active, 16, 4, 0xff);
    let layout = ActiveLayout::new(SLOTS, ITEMS).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&active)
        .unwrap();
    let (a, b) = (layout.item_offset(50), layout.item_offset(51));
    f.write_all_at(&vec![0u8; b - a], a as u64).unwrap();
    let (a, b) = (layout.item_offset(150), layout.item_offset(200));
    f.write_all_at(&vec![0u8; b - a], a as u64).unwrap();
    // Both flush marks (docs/format/segment.md, "Flush marks").
    f.write_all_at(&[0u8; 1040], 2048).unwrap();
    drop(f);
    // Without the geometry the CLI cannot locate an item: all 200 LOST.
    for cmd in ["status", "fsck"] {
        let (code, out) = cli(&w, &[cmd]);
        assert_eq!(code, 4, "{cmd}: {out}");
        assert!(out.contains("LOST"), "{cmd}: {out}");
    }
    let o = recover(&w).await;
    check(acked, &o, "holed and cut");
    let missing: Vec<u64> = (0..acked).filter(|x| !o.found.contains(x)).collect();
    let want: Vec<u64> = std::iter::once(350).chain(450..500).collect();
    assert_eq!(missing, want);
    assert!(o.needs_operator(), "{:#?}", o.report);
    assert_eq!(o.lost_reported(), 51, "{:#?}", o.report.lost);
    let records = || {
        w.quarantine_files()
            .into_iter()
            .filter(|f| f.ends_with(".why.json"))
            .count()
    };
    let after_first = records();
    // A later start records nothing new.
    drop(o);
    let o = recover(&w).await;
    assert_eq!(records(), after_first, "{:?}", w.quarantine_files());
    assert_eq!(o.lost_reported(), 0, "{:#?}", o.report.lost);
    let (code, out) = cli(&w, &["status"]);
    assert_eq!(code, 4, "{out}");
}

/// The mark's other side: an active file that never had an entry
/// acknowledged (appended, not flushed) and is then removed is no loss,
/// and a clean restart after a flush reports nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_or_intact_newest_active_file_is_not_a_loss() {
    let w = World::new();
    let acked = build(&w, 300, 200, false);
    let o = recover(&w).await;
    check(acked, &o, "intact");
    assert!(!o.needs_operator(), "{:#?}", o.report);
    assert_eq!(o.found.len() as u64, acked);
    // Appended, never flushed, then its file removed.
    let cfg = w.config().index_config();
    {
        let (mut iw, _) = IndexWriter::open(open_dd(&w.data), cfg, None, None).unwrap();
        iw.roll().unwrap();
        for o in 10_000..10_050 {
            iw.append_entry(entry(o)).unwrap();
        }
    }
    drop(open_dd(&w.data));
    let (active, _) = files(&w);
    if let Some(a) = active {
        std::fs::remove_file(a).unwrap();
    }
    let o = recover(&w).await;
    assert!(!o.needs_operator(), "{:#?}", o.report);
    assert_eq!(o.found.len() as u64, acked);
}

/// helper-92 F4: an active file of the marked id that is not the marked
/// segment's (a wrong restore, a copy from another data directory) holding
/// as many verified items hid the loss of every acknowledged entry, and
/// its entries were uploaded as this stream's. The mark's header time and
/// first offset tell it apart: it is kept aside whole and the mark's count
/// reported LOST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_file_of_the_marked_id_from_elsewhere_is_not_taken_for_ours() {
    // (a) Same entries (offsets 300..550, a replica's), created later:
    // told by the header's creation time.
    // (b) Other entries (offsets 20,000..), the mark written by a build
    // that kept no creation time: told by the first offset.
    // (c) As (a), beside our own finished seal of the segment (a kill -9
    // before the seal removed its source): kept aside, nothing lost.
    // (d) As (b), the segment drained (the journal records it committed):
    // kept aside, nothing lost (helper-95 F2).
    for (case, from, sealed) in [
        ("same offsets", 0u64, false),
        ("other offsets", 20_000, false),
        ("beside our seal", 0, true),
        ("after a drain", 20_000, true),
    ] {
        let w = World::new();
        let acked = build(&w, 300, 200, false);
        let (active, id) = only_active(&w);
        let m = read_mark(&w);
        assert_eq!((m.segment.0, m.first_offset, m.items), (id, 300, 200));
        assert_ne!(m.created_ms, 0, "the mark keeps the header's creation time");
        if from != 0 {
            // As a build before the field wrote it.
            let mut old = tierindex::datadir::acked::AckedMark { created_ms: 0, ..m };
            old.seq = 0;
            std::fs::remove_file(tierindex::datadir::acked::path(&w.data)).unwrap();
            tierindex::datadir::acked::MarkWriter::new(None)
                .write(&w.data, old)
                .unwrap();
        }
        if case == "after a drain" {
            let o = recover(&w).await;
            assert_eq!(o.found.len() as u64, acked, "{case}");
        } else if sealed {
            let (mut iw, _) =
                IndexWriter::open(open_dd(&w.data), w.config().index_config(), None, None).unwrap();
            iw.close(Instant::now() + Duration::from_secs(30)).unwrap();
            drop(iw);
            drop(open_dd(&w.data));
            assert!(!active.exists() && w.seg(&sealed_file_name(SegmentId(id))).exists());
        }
        std::thread::sleep(Duration::from_millis(5));
        let b = World::new();
        let cfg = b.config().index_config();
        {
            let (mut iw, _) = IndexWriter::open(open_dd(&b.data), cfg.clone(), None, None).unwrap();
            for o in from..from + 300 {
                iw.append_entry(entry(o)).unwrap();
            }
            iw.flush().unwrap();
            iw.close(Instant::now() + Duration::from_secs(30)).unwrap();
        }
        drop(open_dd(&b.data));
        {
            let (mut iw, _) = IndexWriter::open(open_dd(&b.data), cfg, None, None).unwrap();
            for o in from + 300..from + 550 {
                iw.append_entry(entry(o)).unwrap();
            }
            iw.flush().unwrap();
        }
        drop(open_dd(&b.data));
        let (theirs, _) = first_active(&b);
        assert_eq!(theirs.file_name(), active.file_name());
        std::fs::copy(&theirs, &active).unwrap();

        let (sc, sout) = cli(&w, &["status"]);
        let (c, out) = cli(&w, &["fsck"]);
        if sealed {
            // fsck exits 4 for the file it would quarantine (an operator
            // looks at it), and says nothing is lost.
            assert_ne!(sc, 4, "{case}: status\n{sout}");
            assert!(
                out.contains("nothing is lost") && !out.contains(" LOST"),
                "{case}: {out}"
            );
        } else {
            assert_eq!(sc, 4, "{case}: status\n{sout}");
            assert_eq!(c, 4, "{case}: fsck\n{out}");
            for text in [&sout, &out] {
                assert!(
                    text.contains(
                        "a file of the same id from another data directory or an earlier incarnation"
                    ),
                    "{case}: {text}"
                );
            }
        }
        let o = recover(&w).await;
        let foreign: Vec<u64> = o.found.iter().copied().filter(|x| *x >= acked).collect();
        assert!(foreign.is_empty(), "{case}: taken as ours: {foreign:?}");
        if sealed {
            assert_eq!(o.lost_reported(), 0, "{case}: {:#?}", o.report);
            assert!(o.report.lost.is_empty(), "{case}: {:#?}", o.report);
            assert_eq!(o.found.len() as u64, acked, "{case}: every entry found");
        } else {
            assert!(o.lost_reported() >= 200, "{case}: {:#?}", o.report);
            assert_eq!(o.found.len(), 300, "{case}: the sealed entries stay");
        }
        let kept = w
            .quarantine_files()
            .into_iter()
            .filter(|f| f.starts_with(&format!("{id:020}.active")) && !f.ends_with(".why.json"))
            .count();
        assert_eq!(
            kept,
            1,
            "{case}: the file kept aside: {:?}",
            w.quarantine_files()
        );
        let (c, out, lost) = status_lost(&w);
        if sealed {
            assert_eq!(lost, 0, "{case}: status after the start\n{out}");
        } else {
            assert_eq!((c, lost), (4, 200), "{case}: status after the start\n{out}");
        }
        // helper-95 F1: put back by a retry, it was sealed and uploaded as
        // ours and its record, the loss's only trace, was gone.
        let name = w
            .quarantine_files()
            .into_iter()
            .find(|f| f.starts_with(&format!("{id:020}.active")) && !f.ends_with(".why.json"))
            .unwrap();
        let (c, out) = cli(&w, &["quarantine", "retry", &name]);
        assert_ne!(c, 0, "{case}: retry\n{out}");
        assert!(out.contains("not this segment's file"), "{case}: {out}");
        assert!(!active.exists(), "{case}: put back");
        let (_, out, after) = status_lost(&w);
        assert_eq!(after, lost, "{case}: after the retry\n{out}");
    }
}

// Helpers of helper-92's attacks (session 40), kept with them.

/// The mark's bytes and its file's mtime (a start judges loss records
/// by it: those written since the mark was).
fn mark_bytes(w: &World) -> (Vec<u8>, std::time::SystemTime) {
    let p = w.data.join("ACKED_ACTIVE");
    let t = std::fs::metadata(&p).unwrap().modified().unwrap();
    (std::fs::read(&p).unwrap(), t)
}

/// What a kill -9 before the start's flag write leaves: the mark as it
/// was, bytes and mtime.
fn put_mark_back(w: &World, (bytes, t): &(Vec<u8>, std::time::SystemTime)) {
    let p = w.data.join("ACKED_ACTIVE");
    std::fs::write(&p, bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(*t)
        .unwrap();
}

fn read_mark(w: &World) -> tierindex::datadir::acked::AckedMark {
    match tierindex::datadir::acked::read(&w.data).unwrap() {
        tierindex::datadir::acked::Read::Mark(m) => m,
        other => panic!("no mark: {other:?}"),
    }
}

fn records(w: &World) -> Vec<String> {
    w.quarantine_files()
        .into_iter()
        .filter(|f| f.ends_with(".why.json"))
        .collect()
}

fn zero(path: &Path, at: u64, len: usize) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0u8; len], at).unwrap();
    f.sync_all().unwrap();
}

/// Both in-file flush marks gone (never written back before a power cut:
/// "Nothing syncs a mark").
fn drop_flush_marks(path: &Path) {
    zero(path, 2048, 16);
    zero(path, 3072, 16);
}

fn lost_line_count(out: &str) -> usize {
    out.lines().filter(|l| l.contains("LOST")).count()
}

/// helper-92 F1 (a regression of a06c30e): the mark names the last segment, which a drain sealed, uploaded and
/// committed (its local copy kept: release_after_commit off). Bit rot in
/// that local copy's footer: the start quarantines it as "the store holds
/// every entry", no loss. Nothing acknowledged is lost (the store has it
/// all): no LOST. The journal records the segment and no active file is
/// left: the journal and the sealed file's checks account for it, not the
/// mark (a06c30e counted the quarantined copy as 0 items: "300 LOST").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_segment_the_mark_names_damaged_locally_is_not_lost() {
    let w = World::new();
    build(&w, 600, 0, true);
    let (ti, _) = open_ti(&w).await;
    let r = ti.shutdown(Duration::from_secs(60)).await;
    assert!(r.fully_drained(), "{r:#?}");
    let (_, sealed) = files(&w);
    let m = read_mark(&w);
    eprintln!("mark: {m:?}; sealed: {sealed:?}");
    let victim = sealed
        .iter()
        .find(|p| id_of(p) == m.segment.0)
        .expect("the marked segment's sealed file is local")
        .clone();
    let (code, out) = cli(&w, &["status"]);
    eprintln!("status before damage: {code}\n{out}");
    // Damage the footer (the structural check reads it).
    let len = std::fs::metadata(&victim).unwrap().len();
    xor(&victim, len - 20, 4, 0xff);
    let (fc, fo) = cli(&w, &["fsck"]);
    eprintln!("fsck (read-only) after damage: {fc}\n{fo}");
    let o = recover(&w).await;
    eprintln!("open salvaged: {:#?}", o.open.segments.salvaged);
    eprintln!("quarantine: {:?}", w.quarantine_files());
    let (code, out) = cli(&w, &["status"]);
    eprintln!("status after start: {code}\n{out}");
    assert_eq!(o.lost_reported(), 0, "false LOST: {:#?}", o.report.lost);
    assert_ne!(code, 4, "false LOST in status: {out}");
}

/// helper-92 F2: a crash between the start's durable loss record and its
/// flag on the mark (emulated: the mark's previous bytes put back, as a
/// kill -9 before the mark's pwrite leaves them). The next start recorded
/// the same loss again (status reported it twice); it now counts the
/// records already in quarantine/ for the segment.
#[test]
fn a_crash_between_a_loss_record_and_the_marks_flag_records_it_once() {
    let w = World::new();
    build(&w, 300, 200, false);
    let (active, _) = files(&w);
    let active = active.unwrap();
    only_active(&w);
    let l = ActiveLayout::new(SLOTS, ITEMS).unwrap();
    // The acknowledged tail zeroed (items 150..200) and the in-file flush
    // marks absent: in place, 150 items, the mark says 200.
    zero(
        &active,
        l.item_offset(150) as u64,
        l.item_offset(200) - l.item_offset(150),
    );
    drop_flush_marks(&active);
    let before = mark_bytes(&w);
    // A start comes after the mark's last write (a restart between).
    std::thread::sleep(Duration::from_millis(5));
    let g = Some(tierindex::segment::salvage::Geometry {
        slot_count: SLOTS,
        item_capacity: ITEMS,
    });
    {
        let dd = open_dd(&w.data);
        let rec = tierindex::datadir::recover_with_geometry(
            &dd,
            tierindex::datadir::Mode::Repair,
            true,
            g,
        )
        .unwrap();
        eprintln!("first: {:#?}", rec.report.salvaged);
    }
    assert_eq!(records(&w).len(), 1, "{:?}", w.quarantine_files());
    // kill -9 before the flag reached the mark.
    put_mark_back(&w, &before);
    {
        let dd = open_dd(&w.data);
        let rec = tierindex::datadir::recover_with_geometry(
            &dd,
            tierindex::datadir::Mode::Repair,
            true,
            g,
        )
        .unwrap();
        eprintln!("second: {:#?}", rec.report.salvaged);
    }
    let (code, out) = cli(&w, &["status"]);
    eprintln!("status: {code}\n{out}");
    assert_eq!(
        records(&w).len(),
        1,
        "recorded twice: {:?}",
        w.quarantine_files()
    );
}

/// helper-92 F2: the same window after a salvage (a hole below the in-file flush
/// mark: salvaged into NNN.seg with a record). Crash before the mark's
/// flag: the next start sees NNN.seg with 199 items, a mark of 200, and
/// recorded a shortfall of 1 on top of the salvage's record of 1; the
/// salvage's record now counts.
#[test]
fn a_crash_after_a_salvage_before_the_marks_flag_counts_the_hole_once() {
    let w = World::new();
    build(&w, 300, 200, false);
    let (active, _) = files(&w);
    let active = active.unwrap();
    only_active(&w);
    let l = ActiveLayout::new(SLOTS, ITEMS).unwrap();
    xor(&active, l.item_offset(100) as u64 + 3, 4, 0x5a);
    let before = mark_bytes(&w);
    // A start comes after the mark's last write (a restart between).
    std::thread::sleep(Duration::from_millis(5));
    let g = Some(tierindex::segment::salvage::Geometry {
        slot_count: SLOTS,
        item_capacity: ITEMS,
    });
    {
        let dd = open_dd(&w.data);
        let rec = tierindex::datadir::recover_with_geometry(
            &dd,
            tierindex::datadir::Mode::Repair,
            true,
            g,
        )
        .unwrap();
        eprintln!("first: {:#?}", rec.report.salvaged);
    }
    let (_, out1) = cli(&w, &["status"]);
    put_mark_back(&w, &before);
    {
        let dd = open_dd(&w.data);
        let rec = tierindex::datadir::recover_with_geometry(
            &dd,
            tierindex::datadir::Mode::Repair,
            true,
            g,
        )
        .unwrap();
        eprintln!("second: {:#?}", rec.report.salvaged);
    }
    let (code, out) = cli(&w, &["status"]);
    eprintln!("status after first: {out1}\nstatus: {code}\n{out}");
    assert_eq!(
        lost_line_count(&out),
        lost_line_count(&out1),
        "loss counted twice"
    );
}

/// helper-92 F3: power cut: the in-file flush marks never reached the disk (not
/// synced by design), the ACKED_ACTIVE mark did (200). Then bit rot in
/// item 199, an acknowledged item (below the mark's count). Start-up takes
/// it for the one item a kill -9 can tear: reported by that start only,
/// no record, mark not flagged; the writer went on in the same segment and
/// every later report was clean although acknowledged entry 499 is gone.
/// A torn span below the mark's count is damage: now recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_acknowledged_item_damaged_after_a_power_cut_stays_reported() {
    let w = World::new();
    build(&w, 300, 200, false);
    let (active, _) = files(&w);
    let active = active.unwrap();
    only_active(&w);
    assert_eq!(read_mark(&w).items, 200);
    let l = ActiveLayout::new(SLOTS, ITEMS).unwrap();
    drop_flush_marks(&active);
    xor(&active, l.item_offset(199) as u64 + 5, 3, 0x77);
    // The broker's start, then more entries appended and flushed into the
    // same (in place) segment, then a kill -9.
    let cfg = w.config().index_config();
    {
        let (mut iw, rep) = IndexWriter::open(open_dd(&w.data), cfg, None, None).unwrap();
        eprintln!("start report: {:#?}", rep);
        for o in 500..520 {
            iw.append_entry(entry(o)).unwrap();
        }
        iw.flush().unwrap();
    }
    drop(open_dd(&w.data));
    eprintln!("quarantine: {:?}", w.quarantine_files());
    for cmd in ["status", "fsck"] {
        let (code, out) = cli(&w, &[cmd]);
        eprintln!("{cmd}: {code}\n{out}");
    }
    let o = recover(&w).await;
    let missing: Vec<u64> = (0..520).filter(|x| !o.found.contains(x)).collect();
    eprintln!("missing: {missing:?}; report lost: {:#?}", o.report.lost);
    let (code, out) = cli(&w, &["status"]);
    assert_eq!(missing, vec![499]);
    assert_eq!(code, 4, "acknowledged entry 499 lost, status says: {out}");
}

/// helper-92 F7: a kill -9 right after a roll, before the frozen segment's seal
/// finished: 2.active (300 acknowledged entries, full) and 3.active (10,
/// the mark names 3). Then 2.active alone is removed (not together with
/// the newest, which gap 18 lists). The loss was not reported; the
/// mark's other slot, the segment's own earlier mark, now judges it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_frozen_active_file_removed_alone_is_reported_lost() {
    let w = World::new();
    let (active, _) = frozen_segment_after_a_roll(&w);
    // Damage: the older active file removed.
    std::fs::remove_file(&active).unwrap();
    let (c, out) = cli(&w, &["status"]);
    let (fc, fout) = cli(&w, &["fsck"]);
    eprintln!("status {c}\n{out}\nfsck {fc}\n{fout}");
    let o = recover(&w).await;
    let missing: Vec<u64> = (0..610).filter(|x| !o.found.contains(x)).collect();
    eprintln!(
        "missing {} (first {:?}), lost reported {}, unknown {}",
        missing.len(),
        missing.first(),
        o.lost_reported(),
        o.unknown_loss()
    );
    let (c2, out2) = cli(&w, &["status"]);
    eprintln!("status after {c2}\n{out2}");
    assert!(
        o.needs_operator() && c == 4 && c2 == 4,
        "300 acknowledged entries gone without a LOST"
    );
    assert_eq!(missing, (300..600).collect::<Vec<u64>>());
    assert!(o.lost_reported() >= 300, "{:#?}", o.report.lost);
}

/// helper-92 F7: the same state, with 2.active swapped for its own older
/// copy (200 items; the segment's first mark said 200, its later flushes
/// 100 more). The first flush of segment 3 now brings the other slot up to
/// all of segment 2's items (300), so the copy is 100 short: reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_frozen_active_file_swapped_for_an_older_copy_is_reported() {
    let w = World::new();
    let (active, older) = frozen_segment_after_a_roll(&w);
    // Damage: the older active file replaced by its own older copy (200
    // items, its own flush marks say 200), as a restore from a backup.
    std::fs::copy(&older, &active).unwrap();
    let (c, out) = cli(&w, &["status"]);
    let (fc, fout) = cli(&w, &["fsck"]);
    eprintln!("status {c}\n{out}\nfsck {fc}\n{fout}");
    let o = recover(&w).await;
    let missing: Vec<u64> = (0..610).filter(|x| !o.found.contains(x)).collect();
    eprintln!(
        "missing {} (first {:?}), lost reported {}, unknown {}",
        missing.len(),
        missing.first(),
        o.lost_reported(),
        o.unknown_loss()
    );
    let (c2, out2) = cli(&w, &["status"]);
    eprintln!("status after {c2}\n{out2}");
    assert!(
        o.needs_operator() && c == 4 && c2 == 4,
        "100 acknowledged entries (500..600) gone without a LOST"
    );
    assert_eq!(missing, (500..600).collect::<Vec<u64>>());
    assert!(o.lost_reported() >= 100, "{:#?}", o.report.lost);
}

fn status_lost(w: &World) -> (i32, String, u64) {
    let (code, out) = cli(w, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(
        out.lines()
            .skip_while(|l| !l.starts_with('{'))
            .collect::<Vec<_>>()
            .join("\n")
            .as_str(),
    )
    .unwrap_or(serde_json::Value::Null);
    let lost = v["totals"]["lost_items"].as_u64().unwrap_or(u64::MAX);
    (code, out, lost)
}

/// A start of the index writer, `more` appended and flushed, then a
/// kill -9 (dropped).
fn start(w: &World, more: std::ops::Range<u64>) {
    let cfg = w.config().index_config();
    {
        let (mut iw, _) = IndexWriter::open(open_dd(&w.data), cfg, None, None).unwrap();
        if !more.is_empty() {
            for o in more {
                iw.append_entry(entry(o)).unwrap();
            }
            iw.flush().unwrap();
        }
    }
    drop(open_dd(&w.data));
}

/// helper-93 F1: the same segment damaged twice. First: the acknowledged tail cut
/// (200 acknowledged, 100 left): recorded, 100 LOST. The writer goes on in
/// the segment (100 + 150 = 250 items, the mark rewritten: 250). Then the
/// file cut again to 50 valid items: 200 more acknowledged entries gone.
/// The prior record (kept 100 + lost 100 = 200) was credited against the
/// new mark's 250 as if it were about the same items; only records written
/// since the mark was (its file's mtime) count now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_loss_in_a_segment_marked_again_is_counted_in_full() {
    let w = World::new();
    build(&w, 300, 200, false);
    let (active, _) = files(&w);
    let active = active.unwrap();
    only_active(&w);
    let l = ActiveLayout::new(SLOTS, ITEMS).unwrap();
    zero(
        &active,
        l.item_offset(100) as u64,
        l.item_offset(200) - l.item_offset(100),
    );
    drop_flush_marks(&active);
    start(&w, 500..650);
    let m = read_mark(&w);
    eprintln!("mark after first start+flush: {m:?}");
    let (c1, o1, lost1) = status_lost(&w);
    eprintln!(
        "status 1: {c1} lost={lost1}\n{o1}\nrecords {:?}",
        records(&w)
    );
    let (now_active, _) = files(&w);
    eprintln!("active now: {now_active:?}");
    let now_active = now_active.unwrap();
    // Second damage: cut to 50 valid items.
    let len = std::fs::metadata(&now_active).unwrap().len();
    zero(
        &now_active,
        l.item_offset(50) as u64,
        (l.item_offset(260).min(len as usize)) - l.item_offset(50),
    );
    drop_flush_marks(&now_active);
    start(&w, 0..0);
    let (c2, o2, lost2) = status_lost(&w);
    eprintln!(
        "status 2: {c2} lost={lost2}\n{o2}\nrecords {:?}",
        records(&w)
    );
    let o = recover(&w).await;
    let acked: Vec<u64> = (0..500).chain(500..650).collect();
    let missing = acked.iter().filter(|x| !o.found.contains(x)).count() as u64;
    let (c3, o3, lost3) = status_lost(&w);
    eprintln!(
        "missing {missing}; drain report lost {}; status 3: {c3} lost={lost3}\n{o3}",
        o.lost_reported()
    );
    assert!(
        lost3 >= missing,
        "{missing} acknowledged entries missing, status counts {lost3} LOST"
    );
}

/// helper-93 F2: the F7 kill -9 state (2.active frozen with 300 acknowledged, the
/// mark's other slot says 300; 3.active newest with 10), then BOTH files
/// removed. `status` (read-only, before any start) reported one of the two
/// losses, `fsck` and the start both; now all three report both.
#[test]
fn status_counts_both_marked_segments_gone() {
    let w = World::new();
    frozen_segment_after_a_roll(&w);
    // Damage: both active files removed.
    let mut names = Vec::new();
    for e in std::fs::read_dir(w.data.join("segments")).unwrap() {
        let p = e.unwrap().path();
        if p.to_string_lossy().ends_with(".active") {
            names.push(p.clone());
            std::fs::remove_file(&p).unwrap();
        }
    }
    eprintln!("removed {names:?}");
    let (c, out, lost) = status_lost(&w);
    let (fc, fout) = cli(&w, &["fsck"]);
    eprintln!("status {c} lost={lost}\n{out}\nfsck {fc}\n{fout}");
    assert_eq!(
        lost, 310,
        "status: 310 acknowledged entries gone, {lost} reported"
    );
}

/// The kill -9 state right after a roll, before the frozen segment's seal
/// finished: `2.active` full (300 acknowledged entries; its first flush
/// marked 200, the mark's other slot now says 300) and `3.active` newest
/// (10, the mark names 3). Returns `2.active` and a copy of it from when
/// it held its first 200 entries. This state alone is an ordinary crash:
/// checked to say nothing lost.
fn frozen_segment_after_a_roll(w: &World) -> (PathBuf, PathBuf) {
    build(w, 300, 200, false);
    let (active, _) = only_active(w);
    let saved = w.data.parent().unwrap().join("2.active.copy");
    let older = w.data.parent().unwrap().join("2.active.older");
    std::fs::copy(&active, &older).unwrap();
    {
        let (mut iw, _) =
            IndexWriter::open(open_dd(&w.data), w.config().index_config(), None, None).unwrap();
        for o in 500..600 {
            iw.append_entry(entry(o)).unwrap();
        }
        iw.flush().unwrap();
        std::fs::copy(&active, &saved).unwrap();
        for o in 600..610 {
            iw.append_entry(entry(o)).unwrap();
        }
        iw.flush().unwrap();
    }
    drop(open_dd(&w.data));
    assert_eq!(read_mark(w).segment, SegmentId(3));
    let _ = std::fs::remove_file(w.seg(&format!("{:020}.seg", 2)));
    std::fs::copy(&saved, &active).unwrap();
    let (c, out, lost) = status_lost(w);
    assert!(c != 4 && lost == 0, "an ordinary crash state: {out}");
    (active, older)
}

/// helper-92 F6 (a6): the marked segment's seal finished (`NNN.seg` holds
/// all 200 acknowledged entries) and a damaged leftover `NNN.active` sits
/// beside it (a kill -9 between the seal's rename and the removal of its
/// source, then damage): zeroed whole, or its last 100 items zeroed. The
/// start keeps the sealed copy and loses nothing; `status` said "LOST ...
/// its file holds 0 valid entries", exit 4. A sealed file of the id that
/// passes its check and holds more than the leftover accounts for the
/// mark and for the leftover's holes, as at the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_takes_a_complete_seal_beside_a_damaged_leftover_as_no_loss() {
    for damage in ["zeroed", "tail zeroed"] {
        let w = World::new();
        build(&w, 300, 200, false);
        let (active, id) = only_active(&w);
        assert_eq!(read_mark(&w).items, 200, "{damage}");
        let leftover = std::fs::read(&active).unwrap();
        // The writer's close seals it.
        {
            let (mut iw, _) =
                IndexWriter::open(open_dd(&w.data), w.config().index_config(), None, None).unwrap();
            iw.close(Instant::now() + Duration::from_secs(30)).unwrap();
        }
        drop(open_dd(&w.data));
        assert!(w.seg(&format!("{id:020}.seg")).exists() && !active.exists());
        std::fs::write(&active, &leftover).unwrap();
        let l = ActiveLayout::new(SLOTS, ITEMS).unwrap();
        match damage {
            "zeroed" => zero(&active, 0, leftover.len()),
            _ => zero(
                &active,
                l.item_offset(100) as u64,
                l.item_offset(200) - l.item_offset(100),
            ),
        }
        let (code, out, lost) = status_lost(&w);
        let (fcode, fout) = cli(&w, &["fsck"]);
        eprintln!("{damage}: status {code} lost={lost}\n{out}\nfsck {fcode}\n{fout}");
        assert_eq!((code, lost), (3, 0), "{damage}: a false LOST: {out}");
        assert!(!out.contains("LOST"), "{damage}: {out}");
        if damage == "zeroed" {
            // Routine: the leftover is removed.
            assert_eq!(fcode, 3, "{damage}: {fout}");
        }
        // Kept aside, said to lose nothing (it said "0 LOST").
        assert!(!fout.contains("LOST"), "{damage}: {fout}");
        let o = recover(&w).await;
        assert_eq!(o.found.len(), 500, "{damage}");
        assert_eq!(o.lost_reported(), 0, "{damage}: {:#?}", o.report.lost);
        let (code, out, lost) = status_lost(&w);
        assert!(code != 4 && lost == 0, "{damage}: after the start: {out}");
    }
}

/// helper-92 F6 (a9): two flushes of the newest segment, so the mark
/// counts the first (10) and the file's own flush marks both (200); then
/// damage. An acknowledged tail zeroed (items 150..200) or one item zeroed
/// between intact ones: the start and `fsck` report them LOST by number
/// (exit 4), `status` said pending (exit 3). It counts what the file's
/// flush marks prove now, as they do. A torn item above the flush marks
/// (what a kill -9 mid-append leaves) is still no LOST in `status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_what_the_files_flush_marks_prove_lost() {
    for damage in ["torn item above the marks", "tail zeroed", "hole"] {
        let w = World::new();
        build(&w, 300, 0, false);
        {
            let (mut iw, _) =
                IndexWriter::open(open_dd(&w.data), w.config().index_config(), None, None).unwrap();
            for o in 300..310 {
                iw.append_entry(entry(o)).unwrap();
            }
            iw.flush().unwrap();
            for o in 310..500 {
                iw.append_entry(entry(o)).unwrap();
            }
            iw.flush().unwrap();
            // Dropped without close: a kill -9.
        }
        drop(open_dd(&w.data));
        let (active, _) = only_active(&w);
        assert_eq!(read_mark(&w).items, 10, "{damage}");
        let l = ActiveLayout::new(SLOTS, ITEMS).unwrap();
        let item = |i: u32| l.item_offset(i) as u64;
        let want: Vec<u64> = match damage {
            "tail zeroed" => {
                zero(&active, item(150), (item(200) - item(150)) as usize);
                (450..500).collect()
            }
            "hole" => {
                zero(&active, item(50), (item(51) - item(50)) as usize);
                vec![350]
            }
            _ => {
                xor(&active, item(200), (item(201) - item(200)) as usize, 0x5a);
                Vec::new()
            }
        };
        let (code, out, lost) = status_lost(&w);
        let (fcode, fout) = cli(&w, &["fsck"]);
        eprintln!("{damage}: status {code} lost={lost}\n{out}\nfsck {fcode}\n{fout}");
        if want.is_empty() {
            assert!(code == 3 && lost == 0, "{damage}: {out}");
            assert!(!out.contains("LOST"), "{damage}: {out}");
            continue;
        }
        assert_eq!(fcode, 4, "{damage}: {fout}");
        assert_eq!(
            (code, lost),
            (4, want.len() as u64),
            "{damage}: status and fsck disagree: {out}"
        );
        assert_eq!(lost_line_count(&out), 1, "{damage}: {out}");
        let o = recover(&w).await;
        let missing: Vec<u64> = (0..500).filter(|x| !o.found.contains(x)).collect();
        assert_eq!(missing, want, "{damage}");
        assert_eq!(o.lost_reported(), want.len() as u64, "{damage}");
        // Recorded by the start: said once, by the record.
        let (code, out, lost) = status_lost(&w);
        assert_eq!((code, lost), (4, want.len() as u64), "{damage}: {out}");
        assert_eq!(lost_line_count(&out), 1, "{damage}: {out}");
    }
}

/// helper-96 H96-3: a hostile (CRC-valid) ACKED_ACTIVE whose slots count
/// u64::MAX items: `status` panicked adding them up (a build with overflow
/// checks) and `fsck` printed an 18-quintillion LOST. Such a slot is not
/// one this build wrote: read as damaged.
#[test]
fn a_hostile_mark_count_is_damage_not_a_panic() {
    use tierindex::datadir::acked::{AckedMark, MarkWriter};
    let w = World::new();
    build(&w, 300, 200, false);
    let (_active, id) = only_active(&w);
    let m = read_mark(&w);
    std::fs::remove_file(tierindex::datadir::acked::path(&w.data)).unwrap();
    let mut mw = MarkWriter::new(None);
    mw.write(
        &w.data,
        AckedMark {
            seq: 0,
            items: u64::MAX,
            ..m
        },
    )
    .unwrap();
    mw.write_with_older(
        &w.data,
        AckedMark::of(SegmentId(id + 5), 1_000_000, 0, u64::MAX, 0),
        Some(AckedMark {
            items: u64::MAX,
            ..m
        }),
    )
    .unwrap();
    assert!(matches!(
        tierindex::datadir::acked::read(&w.data).unwrap(),
        tierindex::datadir::acked::Read::Damaged(_)
    ));
    for args in [&["status"][..], &["fsck"]] {
        let (code, out) = cli(&w, args);
        assert!(code != 101 && !out.contains("panicked"), "{args:?}: {out}");
        assert!(!out.contains("18446744073709551"), "{args:?}: {out}");
    }
}

/// helper-96 H96-5: the marked active file's header damaged, every item
/// intact, the geometry configured: `fsck` rebuilds the header and the
/// start finds every entry, but `status` (never given the geometry) said
/// all 200 LOST, "cut, emptied or zeroed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_a_damaged_header_with_the_configured_geometry() {
    let w = World::new();
    let acked = build(&w, 300, 200, false);
    let (active, _) = only_active(&w);
    xor(&active, 16, 4, 0xff);
    let cfg = w.data.parent().unwrap().join("cfg.toml");
    std::fs::write(
        &cfg,
        format!("slot_count = {SLOTS}\nsegment_items = {ITEMS}\nmanifest = false\n"),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let (sc, sout) = cli(&w, &["status", "--config", c]);
    assert!(sc != 4 && !sout.contains("LOST"), "status: {sout}");
    let (_, fout) = cli(&w, &["fsck", "--config", c]);
    assert!(!fout.contains(" LOST"), "fsck: {fout}");
    let o = recover(&w).await;
    assert_eq!((o.found.len() as u64, o.lost_reported()), (acked, 0));
}
