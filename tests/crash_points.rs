//! Crash-point harness (issue 5): for every named persist step in
//! `tierindex::failpoint::POINTS`, run the real binary with that point armed
//! to end the process (`_exit`, like `kill -9`) at its N-th hit, N spread
//! over the hits an unarmed run makes; then restart on the same data
//! directory and store (first a `drain` armed to crash again at the same
//! point, so recovery itself is crashed, then a plain `drain`) and check the
//! invariants in `tests/crash_model/mod.rs` after every process.
//!
//! Needs the `failpoints` feature (`cargo test --features failpoints --test
//! crash_points`); without it this file is empty.
//!
//! * `TIERINDEX_CRASH_ITERS=K`: crashes per point (default 20).
//! * `TIERINDEX_CRASH_MANIFEST_ITERS=K`: the same for the `manifest = true`
//!   campaign (default 20).
//! * `TIERINDEX_CRASH_POINTS=a,b`: only these points.
//! * `TIERINDEX_CRASH_SEED=S`: the seed (default: random, printed).
//!
//! A violation fails the test and leaves the data directory and store
//! (their path is printed) for inspection.

#![cfg(feature = "failpoints")]

mod crash_model;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crash_model::{Rig, Run, only_torn_tails};
use tierindex::failpoint::{CRASH_EXIT_CODE, ERROR_ONLY_POINTS, MANIFEST_POINTS, POINTS};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Hits of every point in one unarmed demo run of the harness workload.
fn calibrate(root: &Path, manifest: bool) -> BTreeMap<String, u64> {
    let rig = Rig::with_manifest(root, "calibrate", manifest);
    let run = rig.demo(&[("TIERINDEX_FAILPOINTS_COUNTS", "1")]);
    assert_eq!(run.code, Some(0), "unarmed demo failed:\n{}", run.stderr);
    let mut hits = BTreeMap::new();
    for line in run.stderr.lines() {
        if let Some(rest) = line.strip_prefix("failpoint-hits ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(n)) = (it.next(), it.next()) {
                hits.insert(name.to_string(), n.parse().unwrap_or(0));
            }
        }
    }
    hits
}

#[derive(Default)]
struct Tally {
    crashes: u64,
    not_reached: u64,
    recovery_crashes: u64,
    runs: u64,
    torn_tails: u64,
}

#[test]
fn every_crash_point_recovers_without_losing_acknowledged_entries() {
    let points: Vec<&'static str> = POINTS
        .iter()
        .copied()
        .filter(|p| !MANIFEST_POINTS.contains(p) && !ERROR_ONLY_POINTS.contains(p))
        .collect();
    let iters = env_u64("TIERINDEX_CRASH_ITERS").unwrap_or(20);
    campaign(false, points, iters);
}

/// The same with `manifest = true`: the manifest's own persist steps
/// (publishing a version, trimming old ones) and the steps around the
/// commit, crashed; after every process the manifest must decode, list
/// every segment the journal calls `Committed` or `Released`, and list only
/// objects that are in the store with their recorded CRC.
#[test]
fn every_crash_point_with_the_manifest_keeps_journal_and_manifest_consistent() {
    let mut points: Vec<&'static str> = vec![
        "upload.put.after",
        "verify.after",
        "commit",
        "release",
        "release.after",
        "journal.fsync",
    ];
    points.extend(MANIFEST_POINTS.iter().copied());
    let iters = env_u64("TIERINDEX_CRASH_MANIFEST_ITERS").unwrap_or(20);
    campaign(true, points, iters);
}

/// Campaigns running in this test process: the last one to end removes
/// the copied binary (the two tests may run at once).
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

fn campaign(manifest: bool, points: Vec<&'static str>, iters: u64) {
    ACTIVE.fetch_add(1, Ordering::SeqCst);
    let seed = env_u64("TIERINDEX_CRASH_SEED").unwrap_or_else(|| fastrand::u64(..));
    let only: Option<Vec<String>> = std::env::var("TIERINDEX_CRASH_POINTS")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let keep = tempfile::Builder::new()
        .prefix("tierindex-crash-points-")
        .tempdir()
        .unwrap();
    let root = keep.path().to_path_buf();
    let started = Instant::now();
    let hits = calibrate(&root, manifest);
    let points: Vec<&'static str> = points
        .into_iter()
        .filter(|p| only.as_ref().is_none_or(|o| o.iter().any(|x| x == p)))
        .collect();
    for p in &points {
        let h = hits.get(*p).copied().unwrap_or(0);
        assert!(
            h > 0,
            "the harness workload never reaches point {p}: {hits:?}"
        );
    }
    eprintln!(
        "crash-points: manifest={manifest} seed={seed} iters={iters} points={}",
        points.len()
    );

    // Work items: (point, iteration); two workers (the machine has 2 cores).
    let work: Vec<(&'static str, u64)> = points
        .iter()
        .flat_map(|p| (0..iters).map(move |i| (*p, i)))
        .collect();
    let next = AtomicUsize::new(0);
    let tallies: Mutex<BTreeMap<&'static str, Tally>> = Mutex::new(BTreeMap::new());
    let violations: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for w in 0..2u64 {
            let (work, next, tallies, violations, hits, root) =
                (&work, &next, &tallies, &violations, &hits, &root);
            s.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(seed ^ (w + 1).wrapping_mul(0x9e37));
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&(point, it)) = work.get(i) else {
                        break;
                    };
                    if !violations.lock().unwrap().is_empty() {
                        break;
                    }
                    let h = hits[point];
                    let res = one_case(root, point, it, iters, h, &mut rng, manifest);
                    let mut t = tallies.lock().unwrap();
                    let e = t.entry(point).or_default();
                    match res {
                        Ok(c) => {
                            e.crashes += 1;
                            e.not_reached += c.not_reached;
                            e.recovery_crashes += c.recovery_crashes;
                            e.runs += c.runs;
                            e.torn_tails += c.torn_tails;
                        }
                        Err(v) => violations.lock().unwrap().push(v),
                    }
                }
            });
        }
    });

    let t = tallies.into_inner().unwrap();
    let v = violations.into_inner().unwrap();
    let crashes: u64 = t.values().map(|x| x.crashes).sum();
    let rec: u64 = t.values().map(|x| x.recovery_crashes).sum();
    let runs: u64 = t.values().map(|x| x.runs).sum();
    let missed: u64 = t.values().map(|x| x.not_reached).sum();
    let torn: u64 = t.values().map(|x| x.torn_tails).sum();
    for (p, x) in &t {
        eprintln!(
            "  {p:<28} crashes={:<4} recovery-crashes={:<4} not-reached-retries={}",
            x.crashes, x.recovery_crashes, x.not_reached
        );
    }
    eprintln!(
        "crash-points: manifest={manifest} points={} crashes={crashes} recovery-crashes={rec} \
         processes={runs} not-reached-retries={missed} torn-tails-reported={torn} violations={} \
         seed={seed} elapsed={:.1}s",
        t.len(),
        v.len(),
        started.elapsed().as_secs_f64()
    );
    if ACTIVE.fetch_sub(1, Ordering::SeqCst) == 1 {
        crash_model::remove_bin_copy();
    }
    if !v.is_empty() {
        let kept = keep.keep();
        panic!(
            "{} violation(s); directories kept under {}:\n{}",
            v.len(),
            kept.display(),
            v.join("\n")
        );
    }
    for p in &points {
        let n = t.get(p).map_or(0, |x| x.crashes);
        assert!(n >= iters, "point {p}: only {n} crashes of {iters}");
    }
}

struct CaseCounts {
    not_reached: u64,
    recovery_crashes: u64,
    runs: u64,
    /// Armed recovery drains that reported a torn tail (exit 4).
    torn_tails: u64,
}

/// One crash at `point`: returns Err(description) on a violation (the
/// case's directory is then left in place).
fn one_case(
    root: &Path,
    point: &'static str,
    it: u64,
    iters: u64,
    h: u64,
    rng: &mut fastrand::Rng,
    manifest: bool,
) -> Result<CaseCounts, String> {
    let name = format!(
        "{}{}-{it}",
        if manifest { "m-" } else { "" },
        point.replace('.', "_")
    );
    let rig = Rig::with_manifest(root, &name, manifest);
    let ctx = |what: &str, run: &Run| {
        format!(
            "[{point} #{it} in {}] {what}; exit {:?}; stderr:\n{}",
            rig.dir.display(),
            run.code,
            run.tail()
        )
    };
    // Spread N over 1..=h; after a run that never got there, try lower.
    let band = (h / iters.max(1)).max(1);
    let mut n = (1 + it * h / iters.max(1) + rng.u64(0..band)).clamp(1, h.max(1));
    let mut counts = CaseCounts {
        not_reached: 0,
        recovery_crashes: 0,
        runs: 0,
        torn_tails: 0,
    };
    let mut model = crash_model::Model::default();
    let crashed = loop {
        let arm = format!("{point}=crash@{n}");
        let run = rig.demo(&[("TIERINDEX_FAILPOINTS", arm.as_str())]);
        counts.runs += 1;
        model.observe_demo(&run).map_err(|e| ctx(&e, &run))?;
        rig.check(&mut model).map_err(|e| ctx(&e, &run))?;
        match run.code {
            Some(CRASH_EXIT_CODE) => break run,
            Some(0) if counts.not_reached < 8 => {
                // Timing moved the hit count below n: the data directory
                // now holds a finished run; crash the next run lower.
                counts.not_reached += 1;
                n = rng.u64(1..=n.div_ceil(2));
            }
            _ => return Err(ctx("demo ended without crashing", &run)),
        }
    };
    if !crashed
        .stderr
        .contains(&format!("failpoint {point}: crash"))
    {
        return Err(ctx(
            "exit code of a crash without the failpoint line",
            &crashed,
        ));
    }
    // Recovery crashed at the same point, early.
    let arm = format!("{point}=crash@{}", rng.u64(1..=3));
    let run = rig.drain(&[("TIERINDEX_FAILPOINTS", arm.as_str())]);
    counts.runs += 1;
    match run.code {
        Some(CRASH_EXIT_CODE) => counts.recovery_crashes += 1,
        Some(0) => {}
        // The crash can land while the appender is writing an item into the
        // map (the failpoint ends the process from another thread: the
        // sealer preparing the next segment). That item is torn, and
        // recovery reports a torn tail as "possibly acknowledged" (exit 4):
        // it cannot tell an append cut mid-write from damage. The model
        // check below decides: every acknowledged entry must be there.
        Some(4) if only_torn_tails(&run.stderr) => counts.torn_tails += 1,
        _ => return Err(ctx("armed recovery drain failed", &run)),
    }
    rig.check(&mut model).map_err(|e| ctx(&e, &run))?;
    // Then a clean recovery must finish everything.
    let run = rig.drain(&[]);
    counts.runs += 1;
    if run.code != Some(0) {
        return Err(ctx("recovery drain did not exit 0", &run));
    }
    rig.check(&mut model).map_err(|e| ctx(&e, &run))?;
    rig.check_final(&model).map_err(|e| ctx(&e, &run))?;
    rig.remove();
    Ok(counts)
}

/// The armed recovery drain of CI run 2 in session 15 (a crash at
/// `active.create.dirsync` while the appender wrote item 204, past the
/// last flush at 200): its stderr is a torn tail only; any other loss is not.
#[test]
fn only_a_torn_tail_passes_as_a_reported_torn_tail() {
    let torn = "ERROR tierindex::datadir::recover: torn tail, possibly acknowledged: segment 00000000000000000005 (active file x/00000000000000000005.active): 204 items salvaged, 1 LOST: items 204..205 (bytes 16352..16392) segment=5\n\
                ERROR tierindex::tier::open: entries lost to local damage: segment 00000000000000000005 (active file x/00000000000000000005.active): 204 items salvaged, 1 LOST: items 204..205 (bytes 16352..16392)\n";
    assert!(only_torn_tails(torn));
    assert!(!only_torn_tails(""));
    let more = format!(
        "{torn}ERROR tierindex::tier::open: entries lost to local damage: segment 7 (sealed file y): 3 items salvaged, 2 LOST\n"
    );
    assert!(!only_torn_tails(&more));
    let whole = format!("{torn}no item could be located\n");
    assert!(!only_torn_tails(&whole));
}
