//! Open and look up in a data directory with many local sealed segments
//! (issue 16, item 2: local segments are no longer mapped one each for the
//! life of the process, so their number is bounded by disk, not by
//! `vm.max_map_count`).
//!
//! ```text
//! cargo run --release --example make_backlog -- DIR SEGMENTS ITEMS SLOTS
//! cargo run --release --example local_segments -- DIR [LOOKUPS] [SEALED_MAPPED]
//! ```
//! Opens the index writer on `DIR` (the start-up check of files already
//! uploaded: structure only), then times `LOOKUPS` (default 200) key
//! lookups of two kinds: over every timestamp (every segment must be
//! whose slot bits admit the key must be mapped and read), and over a
//! window of 1% of the directory's time span (segments also pruned by
//! their footers' time ranges). Prints open time, the process's
//! maps and RSS after open and after the lookups, the writer's mapped
//! count and the files it mapped on demand. `SEALED_MAPPED` is the
//! writer's map bound (default: the library's, `Config::sealed_mapped`).

use std::path::PathBuf;
use std::time::Instant;

use tierindex::TimeRange;
use tierindex::datadir::DataDir;
use tierindex::index::{IndexConfig, IndexWriter};

fn maps() -> usize {
    std::fs::read_to_string("/proc/self/maps").map_or(0, |s| s.lines().count())
}

fn status(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .map(|l| l[key.len()..].trim().to_string())
        })
        .unwrap_or_default()
}

/// Bytes the C allocator has handed out and not had back, mmapped blocks
/// included (the heap in use;
/// RSS also counts what was freed but not returned to the kernel).
fn heap() -> String {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let m = unsafe { libc::mallinfo2() };
    format!("{} MiB", (m.uordblks + m.hblkhd) >> 20)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first().map(PathBuf::from) else {
        eprintln!("usage: local_segments DIR [LOOKUPS] [SEALED_MAPPED]");
        std::process::exit(2);
    };
    let lookups: usize = args.get(1).map_or(Ok(200), |s| s.parse())?;
    let mut cfg = IndexConfig {
        slot_count: 16,
        segment_items: 1000,
        segment_max_age: None,
        ..IndexConfig::default()
    };
    if let Some(m) = args.get(2) {
        cfg.sealed_mapped = m.parse()?;
    }
    let started = Instant::now();
    let dd = DataDir::open(&dir)?;
    let (w, _) = IndexWriter::open(dd, cfg.clone(), None, None)?;
    let open_ms = started.elapsed().as_secs_f64() * 1000.0;
    let n = w.sealed_ids().len();
    println!(
        "open: segments={n} ms={open_ms:.0} maps={} rss={} heap={} sealed_mapped={}",
        maps(),
        status("VmRSS:"),
        heap(),
        cfg.sealed_mapped
    );
    // Keys as make_backlog writes them: offsets cycle over KEYS keys
    // (environment, default 100,000, as make_backlog's).
    let keys: usize = std::env::var("KEYS").map_or(Ok(100_000), |s| s.parse())?;
    let key = |i: usize| ((i * 7919) % keys.max(1)) as u64;
    let (ts_min, ts_max) = {
        let first = w.sealed(w.sealed_ids()[0])?.expect("held");
        let last = w
            .sealed(*w.sealed_ids().last().expect("some"))?
            .expect("held");
        (first.footer().min_ts, last.footer().max_ts)
    };
    for (name, window) in [("all-time", None), ("1%-window", Some(()))] {
        let mut lat = Vec::with_capacity(lookups);
        let mut found = 0usize;
        let (_, opened_before) = w.sealed_maps();
        for i in 0..lookups {
            let range = match window {
                None => TimeRange::ALL,
                Some(()) => {
                    let span = (ts_max - ts_min).max(1);
                    let from = ts_min + (i as u64 * 104_729) % span;
                    TimeRange {
                        from_ms: from,
                        to_ms: from + span / 100,
                    }
                }
            };
            let t = Instant::now();
            let l = w.lookup(&key(i).to_le_bytes(), range);
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            found += l.entries.len();
            assert!(l.corrupt_segments.is_empty() && l.unreadable_segments.is_empty());
        }
        let (mapped, opened) = w.sealed_maps();
        println!(
            "lookup {name:9} n={lookups} found={found} p50={:.0}us p99={:.0}us max={:.0}us \
             mapped_now={mapped} mapped_on_demand={} maps={} rss={} heap={}",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            pct(&mut lat, 1.0),
            opened - opened_before,
            maps(),
            status("VmRSS:"),
            heap()
        );
    }
    println!("peak rss={}", status("VmHWM:"));
    Ok(())
}
