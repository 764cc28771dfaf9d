//! The whole upload pipeline through the embedding API ([`TierIndex`]) in
//! front of a fault-injecting store.
//!
//! Every scenario appends `N` entries with small segments, shuts down with a
//! deadline (reopening and shutting down again while work is left, with the
//! faults still on, until drained), then checks the end state from outside
//! the code under test:
//! - every sealed segment is `Committed` (or `Released`) in the journal, with
//!   exactly one `Committed` record;
//! - the object under its key holds exactly the local file's bytes, whose
//!   CRC is `SealedMeta::file_crc`, and nothing else is in the store;
//! - the fault injector saw zero overwrites;
//! - segments cover offsets `0..N` without gaps and every flushed entry is
//!   found by `lookup`, exactly once.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::memory::InMemory;
use object_store::multipart::MultipartStore;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tempfile::TempDir;

use tierindex::journal::{Journal, JournalOptions, Record, SegmentState};
use tierindex::remote::RemoteStore;
use tierindex::testing::{Fault, FaultyStore, Op};
use tierindex::tier::{CLEAN_SHUTDOWN_MARKER, OpenReport};
use tierindex::{Config, Error, SegmentId, ShutdownReport, TierIndex, TimeRange};

const PREFIX: &str = "tier";
/// Distinct keys: entry `i` has key `k{i % KEYS}`.
const KEYS: u64 = 23;
/// Five full segments of 200 and 100 entries left in the active one.
const N: u64 = 1100;
const TS0: u64 = 1_700_000_000_000;
/// What shutdown may take beyond its deadline (cancelling in-flight work,
/// sealing the active segment, journal fsyncs) on a loaded 2-core machine
/// in debug, with other tests of this binary running beside it. The tests
/// prove the wait is bounded, not that it is fast: a store that hangs
/// (60 s latency) would exceed it many times over. 1.5 s was too tight for
/// a slow fsync under load.
const SLACK: Duration = Duration::from_secs(6);

#[derive(Copy, Clone, Debug)]
enum Kind {
    /// `InMemory` with its multipart API (segments go multipart).
    Memory,
    /// `LocalFileSystem` (single create-only PUTs).
    Local,
}

struct Rig {
    name: String,
    _tmp: TempDir,
    data: PathBuf,
    fs: Arc<FaultyStore>,
    /// The store behind `fs` when it is `InMemory` (to inspect multipart
    /// uploads directly, bypassing faults and counters).
    mem: Option<Arc<InMemory>>,
    cfg: Config,
}

fn config(data: PathBuf) -> Config {
    Config {
        data_dir: data,
        segment_items: 200,
        slot_count: 64,
        segment_max_age_ms: None,
        tick_ms: 20,
        // A 200-item segment is a few KiB: several 1 KiB parts on memory://.
        multipart_threshold_bytes: 2048,
        part_size_bytes: 1024,
        max_attempts: 4,
        request_timeout_ms: 250,
        // Single-writer mode, explicitly: these scripts count and fault
        // the pipeline's own requests; the manifest's are tested in
        // tests/manifest*.rs.
        manifest: false,
        ..Config::default()
    }
}

impl Rig {
    fn new(kind: Kind, seed: u64, name: &str) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let (fs, mem) = match kind {
            Kind::Memory => {
                let mem = Arc::new(InMemory::new());
                let fs = FaultyStore::new(
                    mem.clone(),
                    Some(mem.clone() as Arc<dyn MultipartStore>),
                    &FaultyStore::memory_name(),
                    seed,
                );
                (fs, Some(mem))
            }
            Kind::Local => {
                let dir = tmp.path().join("store");
                std::fs::create_dir_all(&dir).unwrap();
                (FaultyStore::local(&dir, seed), None)
            }
        };
        Rig {
            name: format!("{name}/{kind:?}/seed {seed}"),
            _tmp: tmp,
            cfg: config(data.clone()),
            data,
            fs,
            mem,
        }
    }

    fn remote(&self) -> RemoteStore {
        self.fs.remote(PREFIX)
    }

    /// Opens, waiting (bounded) for a dropped predecessor to release the
    /// data directory and journal locks.
    async fn open(&self) -> (TierIndex, OpenReport) {
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            match TierIndex::open_with_store(self.cfg.clone(), self.remote()).await {
                Ok(x) => return x,
                Err(Error::Locked { .. }) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{}: open: {e}", self.name),
            }
        }
    }

    /// Opens the journal for writing (the test plays the crashed process).
    async fn open_journal(&self) -> Journal {
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            match Journal::open(&self.data, JournalOptions::default()) {
                Ok((j, _)) => return j,
                Err(Error::Locked { .. }) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{}: open journal: {e}", self.name),
            }
        }
    }
}

fn key_of(i: u64) -> String {
    format!("k{}", i % KEYS)
}

/// Appends entries `range` (offset = i), flushing every 50 and at the end.
fn write_entries(ti: &TierIndex, range: std::ops::Range<u64>) {
    for i in range {
        ti.append(key_of(i).as_bytes(), i, 100 + (i % 50) as u32, TS0 + i)
            .unwrap();
        if (i + 1) % 50 == 0 {
            ti.flush().unwrap();
        }
    }
    ti.flush().unwrap();
}

/// Shuts down with `deadline`; while work is left, reopens (faults still on)
/// and shuts down again, at most `rounds` times. Every shutdown must return
/// within its deadline plus [`SLACK`].
async fn drain_rounds(
    rig: &Rig,
    first: Option<TierIndex>,
    deadline: Duration,
    rounds: usize,
) -> Vec<ShutdownReport> {
    let mut reports = Vec::new();
    let mut next = first;
    for round in 0..rounds {
        let ti = match next.take() {
            Some(t) => t,
            None => rig.open().await.0,
        };
        let started = Instant::now();
        let r = ti.shutdown(deadline).await;
        let took = started.elapsed();
        assert!(
            took <= deadline + SLACK,
            "{}: round {round}: shutdown took {took:?} with a {deadline:?} deadline",
            rig.name
        );
        let done = r.fully_drained();
        assert_eq!(
            r.clean_marker_written, done,
            "{}: clean marker must be written exactly when drained: {r:?}",
            rig.name
        );
        assert!(
            r.drain.quarantined.is_empty(),
            "{}: round {round}: quarantined: {r:#?}",
            rig.name
        );
        reports.push(r);
        if done {
            return reports;
        }
    }
    panic!(
        "{}: not drained after {rounds} rounds of {deadline:?}: {reports:#?}",
        rig.name
    );
}

async fn remote_bytes(rig: &Rig, key: &ObjPath) -> Vec<u8> {
    rig.fs
        .inner()
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("{}: remote object {key}: {e}", rig.name))
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

/// The end-state checks listed in the module docs. `released`: the policy
/// released local copies (all `Released`, no local files) instead of keeping
/// them (all `Committed`, local bytes == remote bytes).
async fn verify_end_state(rig: &Rig, n: u64, released: bool) {
    let name = &rig.name;
    let view = common::journal_view(&rig.data);
    let segs = view.segments();
    assert!(!segs.is_empty(), "{name}: no segments journaled");
    let remote = rig.remote();
    let want = if released {
        SegmentState::Released
    } else {
        SegmentState::Committed
    };
    let mut next_offset = 0u64;
    let mut items = 0u64;
    let mut keys = BTreeSet::new();
    for (id, r) in segs {
        assert_eq!(r.state, want, "{name}: segment {id}: {r:?}");
        assert_eq!(r.meta.min_offset, next_offset, "{name}: gap before {id}");
        next_offset = r.meta.max_offset + 1;
        items += r.meta.item_count;
        let key = remote.segment_key(&rig.cfg.stream, &r.meta);
        assert_eq!(r.key.as_deref(), Some(key.as_ref()), "{name}: segment {id}");
        let body = remote_bytes(rig, &key).await;
        assert_eq!(body.len() as u64, r.meta.file_len, "{name}: {key} length");
        assert_eq!(crc32fast::hash(&body), r.meta.file_crc, "{name}: {key} CRC");
        let local = common::sealed_path(&rig.data, *id);
        if released {
            assert!(!local.exists(), "{name}: {} not released", local.display());
        } else {
            let lb = std::fs::read(&local)
                .unwrap_or_else(|e| panic!("{name}: {}: {e}", local.display()));
            assert!(lb == body, "{name}: {key} differs from the local file");
        }
        keys.insert(key.to_string());
    }
    assert_eq!(next_offset, n, "{name}: offsets covered");
    assert_eq!(items, n, "{name}: items sealed");
    let committed = common::record_counts(&rig.data, "Committed");
    for id in segs.keys() {
        assert_eq!(
            committed.get(id).copied(),
            Some(1),
            "{name}: Committed records of segment {id}"
        );
    }
    // (Only the segments folder: the capability probe at open works under
    // `{prefix}/_probe/`.)
    let seg_prefix = remote.segments_prefix(&rig.cfg.stream).unwrap();
    let listed: BTreeSet<String> = rig
        .fs
        .inner()
        .list(Some(&seg_prefix))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(listed, keys, "{name}: store holds exactly our segments");
    let st = rig.fs.stats();
    assert_eq!(st.overwrites, 0, "{name}: overwrites: {st:?}");
    assert!(
        rig.data.join(CLEAN_SHUTDOWN_MARKER).exists(),
        "{name}: no clean-shutdown marker after a full drain"
    );
}

/// Reopens and looks every key up: each offset `0..n` exactly once.
async fn check_lookups(rig: &Rig, n: u64) {
    let (ti, open) = rig.open().await;
    assert!(open.previous_shutdown_clean, "{}: {open:?}", rig.name);
    let mut found = Vec::new();
    for k in 0..KEYS {
        let l = ti.lookup(format!("k{k}").as_bytes(), TimeRange::ALL);
        assert!(!l.truncated, "{}: lookup of k{k} truncated", rig.name);
        for e in l.entries {
            assert_eq!(e.offset % KEYS, k, "{}: entry under wrong key", rig.name);
            assert_eq!(e.timestamp_ms, TS0 + e.offset);
            found.push(e.offset);
        }
    }
    found.sort_unstable();
    let want: Vec<u64> = (0..n).collect();
    if found != want {
        let have: BTreeSet<u64> = found.iter().copied().collect();
        let missing: Vec<u64> = (0..n).filter(|o| !have.contains(o)).take(20).collect();
        panic!(
            "{}: lookup found {} entries for {n} flushed; first missing {missing:?}",
            rig.name,
            found.len()
        );
    }
    let r = ti.shutdown(Duration::from_secs(10)).await;
    assert!(r.fully_drained(), "{}: {r:?}", rig.name);
}

/// One store kind through one fault plan, end to end.
async fn scenario(
    kind: Kind,
    seed: u64,
    name: &str,
    setup: impl FnOnce(&mut Rig),
    deadline: Duration,
    rounds: usize,
) -> Rig {
    let mut rig = Rig::new(kind, seed, name);
    setup(&mut rig);
    let (ti, _) = rig.open().await;
    write_entries(&ti, 0..N);
    let reports = drain_rounds(&rig, Some(ti), deadline, rounds).await;
    let st = rig.fs.stats();
    eprintln!(
        "{}: drained in {} round(s); {} faults injected, {} create conflicts, {} parts",
        rig.name,
        reports.len(),
        st.injected,
        st.create_conflicts,
        st.parts_put
    );
    rig.fs.heal();
    verify_end_state(&rig, N, false).await;
    check_lookups(&rig, N).await;
    rig
}

/// `faults` (one class) with probability `p` on every request kind, on both
/// stores at once.
async fn fault_class(name: &str, faults: Vec<Fault>, p: f64, seed: u64) {
    let plan = |r: &mut Rig| {
        r.fs.set_random(p, faults.clone(), &Op::ALL);
        // At least one fault of the class, whatever the random draws and the
        // scheduling do: the first PUT and the first part fail with it.
        r.fs.fail_next(Op::Put, 1, faults[0].clone());
        r.fs.fail_next(Op::PutPart, 1, faults[0].clone());
    };
    let (m, l) = tokio::join!(
        scenario(Kind::Memory, seed, name, plan, Duration::from_secs(6), 6),
        scenario(Kind::Local, seed, name, plan, Duration::from_secs(6), 6),
    );
    for rig in [&m, &l] {
        assert!(
            rig.fs.stats().injected > 0,
            "{}: no fault was injected",
            rig.name
        );
    }
    assert!(
        m.fs.stats().parts_put > 0,
        "{}: multipart path not exercised",
        m.name
    );
}

// ---------------------------------------------------------------------------
// One fault class at a time
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_unavailable() {
    fault_class("unavailable", vec![Fault::Unavailable], 0.3, 101).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_slow_down() {
    fault_class("slow-down", vec![Fault::SlowDown], 0.3, 102).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_too_many_requests() {
    fault_class("429", vec![Fault::TooManyRequests], 0.3, 103).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_timeout() {
    // Hangs past the 250 ms request timeout.
    let f = Fault::Timeout(Duration::from_millis(900));
    fault_class("timeout", vec![f], 0.1, 104).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_connection_reset() {
    fault_class("reset", vec![Fault::ConnectionReset], 0.3, 105).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_commit_then_lose_answer() {
    fault_class("lost-answer", vec![Fault::CommitThenLoseAnswer], 0.3, 106).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_forbidden() {
    // Permanent for one drive (not retried inside it); the scheduler backs
    // off and tries again, so keep it rare enough to converge.
    fault_class("forbidden", vec![Fault::Forbidden], 0.05, 107).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_latency() {
    let f = Fault::Latency(Duration::from_millis(40));
    fault_class("latency", vec![f], 0.5, 108).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_truncated_body() {
    fault_class("truncate", vec![Fault::TruncateBody], 0.4, 109).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_flipped_bit() {
    fault_class("flip", vec![Fault::FlipBit], 0.4, 110).await;
}

fn all_faults() -> Vec<Fault> {
    vec![
        Fault::Unavailable,
        Fault::SlowDown,
        Fault::TooManyRequests,
        Fault::Timeout(Duration::from_millis(600)),
        Fault::ConnectionReset,
        Fault::CommitThenLoseAnswer,
        Fault::Forbidden,
        Fault::Latency(Duration::from_millis(20)),
        Fault::TruncateBody,
        Fault::FlipBit,
    ]
}

/// Every class mixed, from seeds; short deadlines so that resuming across
/// reopen (faults still on) is part of the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_random_mix_converges_across_restarts() {
    // Seed 8 without the capability probe at open: uploads then never
    // trust a conditional create (existence check first, full read-back).
    for seed in [7u64, 8] {
        let plan = |r: &mut Rig| {
            r.fs.set_random(0.3, all_faults(), &Op::ALL);
            r.cfg.probe_store = seed != 8;
        };
        let d = Duration::from_millis(1500);
        let (m, l) = tokio::join!(
            scenario(Kind::Memory, seed, "mix", plan, d, 15),
            scenario(Kind::Local, seed, "mix", plan, d, 15),
        );
        assert!(m.fs.stats().injected > 0 && l.fs.stats().injected > 0);
    }
}

// ---------------------------------------------------------------------------
// Release policy: a local copy goes only after verification
// ---------------------------------------------------------------------------

/// Watches the data directory while the pipeline runs: a segment the journal
/// knew (first read) and still shows below `Verified` (second read, after
/// listing) must have had its local file at listing time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_never_deletes_before_verified_under_faults() {
    let mut rig = Rig::new(Kind::Memory, 31, "release-watch");
    rig.cfg.release_after_commit = true;
    let mut mix = all_faults();
    mix.retain(|f| !matches!(f, Fault::Forbidden));
    rig.fs.set_random(0.2, mix, &Op::ALL);

    let stop = Arc::new(AtomicBool::new(false));
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let polls = Arc::new(AtomicU64::new(0));
    let released_seen = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (stop, violations, polls, released_seen) = (
            stop.clone(),
            violations.clone(),
            polls.clone(),
            released_seen.clone(),
        );
        let data = rig.data.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(2));
                let Ok((before, _)) = Journal::open_read_only(&data) else {
                    continue;
                };
                let local: BTreeSet<_> = common::local_sealed_ids(&data).into_iter().collect();
                let Ok((after, _)) = Journal::open_read_only(&data) else {
                    continue;
                };
                polls.fetch_add(1, Ordering::Relaxed);
                for (id, r) in after.segments() {
                    if r.state == SegmentState::Released {
                        released_seen.fetch_add(1, Ordering::Relaxed);
                    }
                    let below_verified = matches!(
                        r.state,
                        SegmentState::Sealed | SegmentState::Uploading | SegmentState::Uploaded
                    );
                    if below_verified && before.get(*id).is_some() && !local.contains(id) {
                        violations.lock().unwrap().push(format!(
                            "segment {id} is {:?} but its file is gone",
                            r.state
                        ));
                    }
                }
            }
        })
    };

    let (ti, _) = rig.open().await;
    write_entries(&ti, 0..N);
    let reports = drain_rounds(&rig, Some(ti), Duration::from_secs(3), 10).await;
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let v = violations.lock().unwrap().clone();
    assert!(v.is_empty(), "local copies deleted too early: {v:?}");
    assert!(polls.load(Ordering::Relaxed) > 10, "watcher barely ran");
    assert!(
        released_seen.load(Ordering::Relaxed) > 0,
        "watcher never saw a release"
    );
    eprintln!(
        "{}: {} rounds, {} polls",
        rig.name,
        reports.len(),
        polls.load(Ordering::Relaxed)
    );
    rig.fs.heal();
    verify_end_state(&rig, N, true).await;
}

/// A store whose every read-back is damaged: uploads happen, verification
/// never succeeds, so nothing may be released and every local copy stays.
/// Healed, the same directory drains and releases everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_keeps_every_unverified_local_copy() {
    let mut rig = Rig::new(Kind::Memory, 32, "release-unverifiable");
    rig.cfg.release_after_commit = true;
    rig.fs.set_random(1.0, vec![Fault::FlipBit], &[Op::Get]);
    let (ti, _) = rig.open().await;
    write_entries(&ti, 0..N);
    let r = ti.shutdown(Duration::from_secs(3)).await;
    assert!(!r.fully_drained(), "verification cannot succeed: {r:?}");
    assert!(!r.clean_marker_written);
    assert!(!rig.data.join(CLEAN_SHUTDOWN_MARKER).exists());

    let view = common::journal_view(&rig.data);
    assert_eq!(view.segments().len(), 6, "{:?}", view.segments());
    let mut uploaded_somewhere = 0;
    for (id, r) in view.segments() {
        assert!(
            r.state < SegmentState::Verified,
            "segment {id} got to {:?} through reads that are all damaged",
            r.state
        );
        let local = std::fs::read(common::sealed_path(&rig.data, *id))
            .unwrap_or_else(|e| panic!("segment {id} ({:?}): local copy gone: {e}", r.state));
        assert_eq!(crc32fast::hash(&local), r.meta.file_crc);
        let key = rig.remote().segment_key(&rig.cfg.stream, &r.meta);
        if rig.fs.inner().head(&key).await.is_ok() {
            uploaded_somewhere += 1;
        }
    }
    assert!(uploaded_somewhere > 0, "no upload happened at all");
    assert_eq!(
        r.drain.pending.len(),
        6,
        "every segment is reported pending: {r:?}"
    );

    rig.fs.heal();
    drain_rounds(&rig, None, Duration::from_secs(10), 2).await;
    verify_end_state(&rig, N, true).await;
}

// ---------------------------------------------------------------------------
// Dead stores
// ---------------------------------------------------------------------------

async fn dead_store_then_healthy(fault: Fault, seed: u64, name: &str) {
    let rig = Rig::new(Kind::Memory, seed, name);
    rig.fs.set_random(1.0, vec![fault], &Op::ALL);
    let t = Instant::now();
    let (ti, open) = rig.open().await;
    eprintln!(
        "{name}: open took {:?}; notes {:?}",
        t.elapsed(),
        open.notes
    );
    write_entries(&ti, 0..N);
    let deadline = Duration::from_secs(2);
    let started = Instant::now();
    let r = ti.shutdown(deadline).await;
    let took = started.elapsed();
    assert!(
        took <= deadline + SLACK,
        "{name}: shutdown took {took:?} with a {deadline:?} deadline"
    );
    assert!(!r.fully_drained(), "{name}: {r:?}");
    // The active segment, and any full one still sealing when shutdown began.
    assert!(
        r.sealed_at_shutdown >= 1,
        "{name}: active segment sealed: {r:?}"
    );
    assert_eq!(r.drain.pending.len(), 6, "{name}: all pending: {r:#?}");
    assert!(r.drain.quarantined.is_empty(), "{name}: {r:#?}");
    assert!(!r.clean_marker_written);
    assert!(!rig.data.join(CLEAN_SHUTDOWN_MARKER).exists());
    // What is pending is durable: the journal (read from disk) says so.
    let view = common::journal_view(&rig.data);
    let pending: Vec<u64> = view
        .segments()
        .iter()
        .filter(|(_, r)| r.state < SegmentState::Verified)
        .map(|(id, _)| id.0)
        .collect();
    let reported: Vec<u64> = r.drain.pending.iter().map(|p| p.id).collect();
    assert_eq!(pending, reported, "{name}");

    rig.fs.heal();
    let (ti, open) = rig.open().await;
    assert!(!open.previous_shutdown_clean);
    let reports = drain_rounds(&rig, Some(ti), Duration::from_secs(10), 1).await;
    assert_eq!(reports[0].sealed_at_shutdown, 0);
    verify_end_state(&rig, N, false).await;
    check_lookups(&rig, N).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_store_failing_fast_leaves_pending_then_drains() {
    dead_store_then_healthy(Fault::Unavailable, 41, "dead-503").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_store_hanging_leaves_pending_then_drains() {
    dead_store_then_healthy(Fault::Timeout(Duration::from_secs(3600)), 42, "dead-hang").await;
}

// ---------------------------------------------------------------------------
// Resume after a crash
// ---------------------------------------------------------------------------

/// Crash (drop without shutdown) while multipart uploads are in flight:
/// reopening aborts every journaled upload id and uploads each segment once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_multipart_resumes_and_aborts_the_upload() {
    let rig = Rig::new(Kind::Memory, 51, "crash-mid-multipart");
    let mem = rig.mem.clone().unwrap();
    // Every part hangs for a while: uploads are caught between create and
    // complete.
    rig.fs.set_random(
        1.0,
        vec![Fault::Latency(Duration::from_secs(5))],
        &[Op::PutPart],
    );
    let (ti, _) = rig.open().await;
    write_entries(&ti, 0..N);
    let open_uploads = common::wait_for(Duration::from_secs(20), Duration::from_millis(10), || {
        let v = Journal::open_read_only(&rig.data).ok()?.0;
        let ups: Vec<_> = v
            .segments()
            .values()
            .filter(|r| r.state == SegmentState::Uploading)
            .filter_map(|r| Some((r.meta.id, r.key.clone()?, r.multipart_id.clone()?)))
            .collect();
        (!ups.is_empty()).then_some(ups)
    })
    .expect("a multipart upload id gets journaled");
    drop(ti); // the crash: no shutdown, no seal of the active segment

    // The incomplete uploads exist in the store (a part can still be added).
    for (id, key, mp) in &open_uploads {
        let key = ObjPath::from(key.as_str());
        mem.put_part(&key, mp, 77, PutPayload::from_static(b"junk"))
            .await
            .unwrap_or_else(|e| panic!("segment {id}: upload {mp} not open: {e}"));
    }

    rig.fs.heal();
    let (ti, open) = rig.open().await;
    assert!(!open.previous_shutdown_clean);
    drain_rounds(&rig, Some(ti), Duration::from_secs(10), 2).await;

    let aborted: Vec<(u64, String)> = common::journal_records(&rig.data)
        .into_iter()
        .filter_map(|r| match r {
            Record::MultipartAborted { id, multipart_id } => Some((id.0, multipart_id)),
            _ => None,
        })
        .collect();
    for (id, key, mp) in &open_uploads {
        let key = ObjPath::from(key.as_str());
        assert!(
            mem.put_part(&key, mp, 78, PutPayload::from_static(b"x"))
                .await
                .is_err(),
            "segment {id}: multipart upload {mp} still open after resume"
        );
        assert!(
            aborted.contains(&(id.0, mp.clone())),
            "segment {id}: no MultipartAborted for {mp}: {aborted:?}"
        );
    }
    assert!(rig.fs.stats().requests(Op::AbortMultipart) >= open_uploads.len() as u64);
    verify_end_state(&rig, N, false).await;
    check_lookups(&rig, N).await;
}

/// Leaves `n` entries sealed and not uploaded (dead store, short shutdown),
/// then heals the store; returns the rig ready for the test to edit the
/// journal as a crashed process would have left it.
async fn sealed_but_not_uploaded(seed: u64, name: &str, n: u64) -> Rig {
    let rig = Rig::new(Kind::Memory, seed, name);
    rig.fs.set_random(1.0, vec![Fault::Unavailable], &Op::ALL);
    let (ti, _) = rig.open().await;
    write_entries(&ti, 0..n);
    let r = ti.shutdown(Duration::from_millis(500)).await;
    assert!(!r.fully_drained());
    rig.fs.heal();
    rig
}

/// The journal says `Uploading` with a multipart id and the store holds that
/// incomplete upload with one part (a crash between parts): resume aborts it
/// and uploads the segment again, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journaled_incomplete_multipart_is_aborted_on_resume() {
    let rig = sealed_but_not_uploaded(52, "journaled-multipart", N).await;
    let mem = rig.mem.clone().unwrap();
    let (id, key, mp) = {
        let mut j = rig.open_journal().await;
        let rec = j.segments().values().next().unwrap().clone();
        let key = rig.remote().segment_key(&rig.cfg.stream, &rec.meta);
        let local = std::fs::read(common::sealed_path(&rig.data, rec.meta.id)).unwrap();
        let mp = mem.create_multipart(&key).await.unwrap();
        mem.put_part(&key, &mp, 0, PutPayload::from(local[..1024].to_vec()))
            .await
            .unwrap();
        j.append(&[Record::Uploading {
            id: rec.meta.id,
            attempt: rec.attempt + 1,
            key: key.to_string(),
            multipart_id: Some(mp.clone()),
        }])
        .unwrap();
        (rec.meta.id, key, mp)
    };
    drain_rounds(&rig, None, Duration::from_secs(10), 2).await;
    assert!(
        mem.put_part(&key, &mp, 1, PutPayload::from_static(b"x"))
            .await
            .is_err(),
        "multipart upload {mp} still open after resume"
    );
    let aborted = common::journal_records(&rig.data).into_iter().any(|r| {
        matches!(r, Record::MultipartAborted { id: i, multipart_id } if i == id && multipart_id == mp)
    });
    assert!(aborted, "no MultipartAborted record for {mp}");
    verify_end_state(&rig, N, false).await;
    check_lookups(&rig, N).await;
}

/// What a crash right after a multipart completion leaves: the journal
/// says `Uploading` with the multipart id, the store holds the completed
/// object (with one byte of the second part flipped when `mangle`: a part
/// the store acknowledged but mangled). The rig holds one sealed segment.
async fn complete_behind_the_journal(
    rig: &Rig,
    mem: &Arc<InMemory>,
    mangle: bool,
) -> (SegmentId, ObjPath) {
    let mut j = rig.open_journal().await;
    assert_eq!(j.segments().len(), 1);
    let rec = j.segments().values().next().unwrap().clone();
    let key = rig.remote().segment_key(&rig.cfg.stream, &rec.meta);
    let local = std::fs::read(common::sealed_path(&rig.data, rec.meta.id)).unwrap();
    let mp = mem.create_multipart(&key).await.unwrap();
    let half = local.len() / 2;
    let mut second = local[half..].to_vec();
    if mangle {
        second[7] ^= 0x40;
    }
    let p0 = mem
        .put_part(&key, &mp, 0, PutPayload::from(local[..half].to_vec()))
        .await
        .unwrap();
    let p1 = mem
        .put_part(&key, &mp, 1, PutPayload::from(second))
        .await
        .unwrap();
    j.append(&[Record::Uploading {
        id: rec.meta.id,
        attempt: rec.attempt + 1,
        key: key.to_string(),
        multipart_id: Some(mp.clone()),
    }])
    .unwrap();
    mem.complete_multipart(&key, &mp, vec![p0, p1])
        .await
        .unwrap();
    (rec.meta.id, key)
}

/// The crash came after the multipart completion but before `Uploaded` was
/// journaled: resume proves the object is ours and commits it without
/// writing anything again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_but_unjournaled_upload_is_adopted_not_rewritten() {
    let n = 150; // one segment, sealed at shutdown
    let mut rig = sealed_but_not_uploaded(53, "completed-unjournaled", n).await;
    rig.cfg.probe_store = false; // only the pipeline's own requests are counted
    let mem = rig.mem.clone().unwrap();
    complete_behind_the_journal(&rig, &mem, false).await;
    let before = rig.fs.stats();
    drain_rounds(&rig, None, Duration::from_secs(10), 2).await;
    let after = rig.fs.stats();
    for op in [
        Op::Put,
        Op::CreateMultipart,
        Op::PutPart,
        Op::CompleteMultipart,
    ] {
        assert_eq!(
            after.requests(op),
            before.requests(op),
            "{op:?} sent although the object was already complete"
        );
    }
    assert_eq!(after.deletes, before.deletes);
    verify_end_state(&rig, n, false).await;
    check_lookups(&rig, n).await;
}

/// The crash came after a multipart completion that assembled other bytes
/// (a part the store acknowledged but mangled) and before the read-back
/// could delete it: the journal says `Uploading`, the key holds the wrong
/// object. Resume must delete that never-verified object of ours and upload
/// again (never quarantine while the local copy is intact), ending with our
/// bytes under the key.
/// (Found by `fault_matrix_lost_parts`: resume quarantined the segment.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_object_left_by_an_interrupted_upload_is_replaced_on_resume() {
    let n = 150; // one segment, sealed at shutdown
    let rig = sealed_but_not_uploaded(54, "wrong-object-resume", n).await;
    let mem = rig.mem.clone().unwrap();
    let (id, key) = complete_behind_the_journal(&rig, &mem, true).await;
    assert_ne!(
        remote_bytes(&rig, &key).await,
        std::fs::read(common::sealed_path(&rig.data, id)).unwrap()
    );
    drain_rounds(&rig, None, Duration::from_secs(10), 3).await;
    let quarantined = common::journal_records(&rig.data)
        .into_iter()
        .any(|r| matches!(r, Record::Quarantined { .. }));
    assert!(
        !quarantined,
        "segment {id} quarantined for our own bad object"
    );
    verify_end_state(&rig, n, false).await;
    check_lookups(&rig, n).await;
}

// ---------------------------------------------------------------------------
// Configured request timeout
// ---------------------------------------------------------------------------

/// A read-back that hangs must be cut off after the configured
/// `request_timeout_ms` (250 ms here) and retried, like every other request.
///
/// (The pipeline's own verification, resume check and multipart abort once
/// ran under the default 60 s policy whatever the configuration said.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn hung_verification_read_is_cut_at_the_configured_timeout() {
    let mut rig = Rig::new(Kind::Memory, 61, "verify-timeout");
    rig.cfg.multipart_threshold_bytes = 1 << 30; // one PUT
    rig.cfg.probe_store = false; // its GETs would take the scripted faults
    // GETs in order: existence check before the PUT, read-back inside the
    // upload, then the pipeline's own verification of the Uploaded object.
    rig.fs.fail_next(Op::Get, 2, Fault::Latency(Duration::ZERO));
    rig.fs
        .fail_next(Op::Get, 1, Fault::Timeout(Duration::from_secs(30)));
    let (ti, _) = rig.open().await;
    write_entries(&ti, 0..150);
    let r = ti.shutdown(Duration::from_secs(5)).await;
    assert!(
        r.fully_drained(),
        "a GET hung past request_timeout_ms=250 held the segment for the whole 5 s deadline: {r:#?}"
    );
    verify_end_state(&rig, 150, false).await;
}

/// A part the store acknowledged but lost, then a completion that committed
/// and lost its answer: the retry finds the upload gone and a wrong object
/// under our key. That object is our own, never verified: it must be
/// deleted and the segment uploaded again, not quarantined.
///
/// (Seen in CI's fault matrix, `fault_matrix_lost_parts` mix 0: the
/// completion-failed path answered "already holds other bytes" and the
/// drive quarantined a segment whose local copy was intact.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_part_then_lost_completion_answer_uploads_again() {
    let mut rig = Rig::new(Kind::Memory, 62, "lost-part-lost-answer");
    rig.cfg.probe_store = false;
    rig.fs.fail_next(Op::PutPart, 1, Fault::LosePart);
    rig.fs
        .fail_next(Op::CompleteMultipart, 1, Fault::CommitThenLoseAnswer);
    let (ti, _) = rig.open().await;
    write_entries(&ti, 0..150);
    drain_rounds(&rig, Some(ti), Duration::from_secs(10), 3).await;
    let st = rig.fs.stats();
    assert!(
        st.injected_on(Op::PutPart) >= 1 && st.injected_on(Op::CompleteMultipart) >= 1,
        "the faults never fired: {st:?}"
    );
    verify_end_state(&rig, 150, false).await;
    check_lookups(&rig, 150).await;
}

/// `shutdown` returns with the data directory free: drives hanging on the
/// store at the deadline are cancelled and awaited (so are the lease task
/// and the probe), so the same process opens the directory again at once,
/// without retrying on `Locked`, in both modes. Then the reopened index
/// drains what was left.
///
/// What this catches: drives (or other tasks) left running past
/// `shutdown`. What it cannot catch reliably: tasks aborted but not
/// awaited, since the runtime usually drops an aborted task within
/// microseconds, before the reopen gets to the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_frees_the_data_directory_before_it_returns() {
    for manifest in [false, true] {
        let mut rig = Rig::new(Kind::Local, 7, "lock-release");
        rig.cfg.manifest = manifest;
        // Requests hang until cancelled (not cut off by a per-request
        // timeout and parked in backoff), so drives are in flight at the
        // deadline.
        rig.cfg.request_timeout_ms = 120_000;
        let (ti, _) = rig.open().await;
        // From here every store request hangs far past the deadline.
        rig.fs
            .set_random(1.0, vec![Fault::Latency(Duration::from_secs(60))], &Op::ALL);
        write_entries(&ti, 0..N);
        ti.roll().unwrap();
        let started = Instant::now();
        let r = ti.shutdown(Duration::from_millis(800)).await;
        assert!(
            started.elapsed() <= Duration::from_millis(800) + SLACK,
            "manifest={manifest}: {:?}",
            started.elapsed()
        );
        assert!(!r.fully_drained(), "manifest={manifest}: {r:#?}");
        assert!(
            r.drain.deadline_hit,
            "manifest={manifest}: drives were not in flight at the deadline: {r:#?}"
        );
        rig.fs.heal();
        let (ti, _) = match TierIndex::open_with_store(rig.cfg.clone(), rig.remote()).await {
            Ok(x) => x,
            Err(e) => panic!("manifest={manifest}: open right after shutdown: {e}"),
        };
        let r = ti.shutdown(Duration::from_secs(20)).await;
        assert!(r.fully_drained(), "manifest={manifest}: {r:#?}");
    }
}
