//! Append and flush latency of the embedded index while segments roll, seal
//! and upload in the background, against the same paced run with no
//! background work (issue 16, item 8).
//!
//! ```text
//! cargo run --release --example append_latency -- [RATE] [SECONDS] [SEGMENT_ITEMS] [LOOKUPS_PER_SEC]
//! ```
//! Defaults: 500000 appends/s for 10 s, segments of 200000 entries (so a
//! segment rolls, seals and uploads every 0.4 s), a flush every 1000
//! appends (every 2 ms at the default rate).
//!
//! Two runs, paced the same way, on the same keys:
//! * `background`: a `TierIndex` on a fresh data directory with a `file://`
//!   store beside it (manifest on, as by default): segments roll, seal,
//!   upload and commit while appends go on;
//! * `raw`: the floor for the same work with no background at all: the
//!   same appends and msyncs straight into `ActiveSegment`s of the same
//!   size, all created (and prefaulted) before the clock starts; no lock,
//!   no roll, no seal, no upload.
//!
//! Every append and flush is timed with `Instant`; the background run also
//! reports the writer-lock waits (`writer_lock_waits*` metrics). Set
//! `APPEND_LATENCY_TRACE=1` to print every append over 5 ms
//! (`APPEND_LATENCY_TRACE=US`, a number over 1: over that many
//! microseconds, with the context switches the appending thread took
//! meanwhile, voluntary and not: a `getrusage` around every append, so
//! the figures of such a run are not the benchmark's), and
//! `APPEND_LATENCY_RELEASE=1` to release each local copy once committed
//! (`APPEND_LATENCY_STORE_DIR=DIR`: the store's directory under `DIR`).
//!
//! With `LOOKUPS_PER_SEC` > 0, a second thread runs that many lookups a
//! second during the background run (a key of the run's 4,096 over every
//! timestamp, so each walks every local segment that may hold it), as a
//! broker serving reads would; their latency is reported too.

use std::time::{Duration, Instant};

use tierindex::segment::active::ActiveSegment;
use tierindex::segment::{Entry, SegmentId};
use tierindex::{Config, TierIndex};

struct Stats {
    name: &'static str,
    appends: Vec<u32>,
    flushes: Vec<u32>,
    behind_ms: u64,
}

fn pct(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    f64::from(v[i.min(v.len() - 1)]) / 1000.0
}

fn line(kind: &str, v: &mut [u32]) -> String {
    let over_100us = v.iter().filter(|n| **n > 100_000).count();
    let over_1ms = v.iter().filter(|n| **n > 1_000_000).count();
    let over_10ms = v.iter().filter(|n| **n > 10_000_000).count();
    format!(
        "{kind:7} n={:>9} p50={:>8.2}us p99={:>8.2}us p99.9={:>9.2}us max={:>10.2}us >100us={over_100us} >1ms={over_1ms} >10ms={over_10ms}",
        v.len(),
        pct(v, 0.50),
        pct(v, 0.99),
        pct(v, 0.999),
        pct(v, 1.0),
    )
}

/// Spin until append `i` is due (`started + i * step`); record how far
/// behind the pace a late one is.
fn pace(started: Instant, step: Duration, i: u64, behind: &mut Duration) {
    let due = started + step * (i as u32);
    let now = Instant::now();
    if now < due {
        while Instant::now() < due {
            std::hint::spin_loop();
        }
    } else {
        *behind = (*behind).max(now - due);
    }
}

/// A scratch directory under `TIERINDEX_BENCH_DIR` (default: here).
fn bench_dir() -> std::io::Result<tempfile::TempDir> {
    tempfile::tempdir_in(std::env::var("TIERINDEX_BENCH_DIR").unwrap_or_else(|_| ".".into()))
}

async fn run(
    name: &'static str,
    rate: u64,
    seconds: u64,
    segment_items: u32,
    lookups_per_sec: u64,
) -> Result<Stats, Box<dyn std::error::Error>> {
    let tmp = bench_dir()?;
    // APPEND_LATENCY_STORE_DIR: the `file://` store elsewhere (e.g. on
    // tmpfs, to tell its writes' share of the flushes' waits from the
    // seals').
    let store_tmp = match std::env::var_os("APPEND_LATENCY_STORE_DIR") {
        Some(d) => Some(tempfile::tempdir_in(d)?),
        None => None,
    };
    let store = store_tmp
        .as_ref()
        .map_or_else(|| tmp.path().join("store"), |t| t.path().join("store"));
    std::fs::create_dir_all(&store)?;
    let cfg = Config {
        data_dir: tmp.path().join("data"),
        store: Some(format!("file://{}", store.display())),
        segment_items,
        slot_count: (segment_items / 4).next_power_of_two().max(1024),
        segment_max_age_ms: None,
        // APPEND_LATENCY_RELEASE=1: delete each local copy once committed
        // (an unlink and a directory fsync per segment), as a broker that
        // keeps only the remote copy would.
        release_after_commit: std::env::var_os("APPEND_LATENCY_RELEASE").is_some_and(|v| v == "1"),
        ..Config::default()
    };
    let (index, _) = TierIndex::open(cfg).await?;
    let index = std::sync::Arc::new(index);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = (lookups_per_sec > 0).then(|| {
        let (index, stop) = (index.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut took = Vec::new();
            let mut found = 0usize;
            let step = Duration::from_nanos(1_000_000_000 / lookups_per_sec);
            let started = Instant::now();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let due = started + step * (i as u32);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let key = format!("key-{:08}", (i * 2_654_435_761) % 4096);
                let t = Instant::now();
                let l = index.lookup(key.as_bytes(), tierindex::TimeRange::ALL);
                took.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
                found += l.entries.len();
                i += 1;
            }
            (took, found)
        })
    });
    let total = rate * seconds;
    let per_flush = 1_000u64;
    let mut appends = Vec::with_capacity(total as usize);
    let mut flushes = Vec::with_capacity((total / per_flush) as usize + 1);
    let keys: Vec<String> = (0..4096).map(|k| format!("key-{k:08}")).collect();
    let started = Instant::now();
    let step = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let mut behind = Duration::ZERO;
    let trace_us: Option<u64> = std::env::var("APPEND_LATENCY_TRACE")
        .ok()
        .map(|v| v.parse::<u64>().ok().filter(|n| *n > 1).unwrap_or(5_000));
    let switches = |on: bool| -> (i64, i64) {
        if !on {
            return (0, 0);
        }
        // SAFETY: a zeroed rusage buffer for getrusage to fill.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
        (ru.ru_nvcsw, ru.ru_nivcsw)
    };
    let fine = trace_us.is_some_and(|us| us < 5_000);
    for i in 0..total {
        pace(started, step, i, &mut behind);
        let key = &keys[(i % keys.len() as u64) as usize];
        let sw = switches(fine);
        let t = Instant::now();
        index.append(key.as_bytes(), i, 256, 1_700_000_000_000 + i / 1000)?;
        let d = t.elapsed();
        appends.push(d.as_nanos().min(u128::from(u32::MAX)) as u32);
        if trace_us.is_some_and(|us| d > Duration::from_micros(us)) {
            let sw2 = switches(fine);
            eprintln!(
                "{name}: append {i} (item {} of its segment) took {:.3} ms; context switches \
                 meanwhile: {} voluntary, {} involuntary",
                i % u64::from(segment_items),
                d.as_secs_f64() * 1e3,
                sw2.0 - sw.0,
                sw2.1 - sw.1
            );
        }
        if (i + 1) % per_flush == 0 {
            let t = Instant::now();
            index.flush()?;
            flushes.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
        }
    }
    let st = index.status();
    let m = index.metrics();
    eprintln!(
        "{name}: appended {total} in {:.2} s; segments by state at the end: {:?}; \
         writer lock waits: {} (over 100 us: {}, longest {} us)",
        started.elapsed().as_secs_f64(),
        st.by_state,
        m.writer_lock_waits.get(),
        m.writer_lock_waits_slow.get(),
        m.writer_lock_wait_max_us.get()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(r) = reader {
        let (mut took, found) = r.join().map_err(|_| "lookup thread panicked")?;
        println!(
            "[{name}] {} (entries found: {found})",
            line("lookup", &mut took)
        );
    }
    let index = std::sync::Arc::into_inner(index).ok_or("index still shared")?;
    let _ = index.shutdown(Duration::from_secs(60)).await;
    Ok(Stats {
        name,
        appends,
        flushes,
        behind_ms: behind.as_millis() as u64,
    })
}

/// The same paced appends and flushes straight into pre-created segments.
fn run_raw(
    rate: u64,
    seconds: u64,
    segment_items: u32,
) -> Result<Stats, Box<dyn std::error::Error>> {
    let tmp = bench_dir()?;
    let total = rate * seconds;
    let slots = (segment_items / 4).next_power_of_two().max(1024);
    let count = total.div_ceil(u64::from(segment_items));
    let mut segs = Vec::new();
    for n in 0..count {
        let mut s = ActiveSegment::create(tmp.path(), SegmentId(n + 1), slots, segment_items, 0)?;
        s.prefault_writable(usize::MAX);
        segs.push(s);
    }
    let keys: Vec<u64> = (0..4096)
        .map(|k| tierindex::key_hash(format!("key-{k:08}").as_bytes()))
        .collect();
    let per_flush = 1_000u64;
    let mut appends = Vec::with_capacity(total as usize);
    let mut flushes = Vec::with_capacity((total / per_flush) as usize + 1);
    let step = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let mut behind = Duration::ZERO;
    let started = Instant::now();
    for i in 0..total {
        pace(started, step, i, &mut behind);
        let seg = &mut segs[(i / u64::from(segment_items)) as usize];
        let e = Entry {
            key_hash: keys[(i % keys.len() as u64) as usize],
            offset: i,
            size: 256,
            timestamp_ms: 1_700_000_000_000 + i / 1000,
        };
        let t = Instant::now();
        seg.append_entry(e)?;
        appends.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
        if (i + 1) % per_flush == 0 {
            let t = Instant::now();
            seg.flush()?;
            flushes.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
        }
    }
    eprintln!(
        "raw: appended {total} in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(Stats {
        name: "raw",
        appends,
        flushes,
        behind_ms: behind.as_millis() as u64,
    })
}

/// The broker's runtime: 2 workers, whose threads (and the blocking
/// threads they start) run as background work
/// ([`tierindex::schedule_as_background`], the recommended setup when the
/// appending thread is not one of them, as here: it is the thread that
/// blocks on `main`); `APPEND_LATENCY_RUNTIME=default` leaves them as they
/// are.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.worker_threads(2).enable_all();
    let background = std::env::var("APPEND_LATENCY_RUNTIME").map_or(true, |v| v != "default");
    if background {
        rt.on_thread_start(tierindex::schedule_as_background);
    }
    eprintln!(
        "runtime threads: {}",
        if background {
            "background (SCHED_BATCH)"
        } else {
            "default policy"
        }
    );
    rt.build()?.block_on(bench())
}

async fn bench() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, d: u64| -> u64 {
        std::env::args()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rate = arg(1, 500_000).max(1);
    let seconds = arg(2, 10).max(1);
    let segment_items = arg(3, 200_000).clamp(1_000, u64::from(u32::MAX)) as u32;
    let lookups = arg(4, 0).min(1_000_000);
    let mut all = vec![
        run("background", rate, seconds, segment_items, lookups).await?,
        run_raw(rate, seconds, segment_items)?,
    ];
    println!(
        "append_latency: rate={rate}/s seconds={seconds} segment_items={segment_items} lookups={lookups}/s flush every 1000 appends"
    );
    for s in &mut all {
        println!("[{}] most behind the pace: {} ms", s.name, s.behind_ms);
        println!("[{}] {}", s.name, line("append", &mut s.appends));
        println!("[{}] {}", s.name, line("flush", &mut s.flushes));
    }
    let (bg, raw) = all.split_at_mut(1);
    let (bg, raw) = (&mut bg[0], &mut raw[0]);
    println!(
        "ratios background/raw: append max {:.2}x, flush p99 {:.2}x, append p99.9 {:.2}x",
        pct(&mut bg.appends, 1.0) / pct(&mut raw.appends, 1.0).max(0.001),
        pct(&mut bg.flushes, 0.99) / pct(&mut raw.flushes, 0.99).max(0.001),
        pct(&mut bg.appends, 0.999) / pct(&mut raw.appends, 0.999).max(0.001),
    );
    Ok(())
}
