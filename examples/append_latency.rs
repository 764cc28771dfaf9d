//! Append and flush latency of the embedded index while segments roll, seal
//! and upload in the background, against the same paced run with no
//! background work (issue 16, item 8).
//!
//! ```text
//! cargo run --release --example append_latency -- [RATE] [SECONDS] [SEGMENT_ITEMS]
//! ```
//! Defaults: 500000 appends/s for 10 s, segments of 200000 entries (so a
//! segment rolls, seals and uploads every 0.4 s), a flush every 1000
//! appends (every 2 ms at the default rate). Each run opens a fresh data
//! directory with a `file://` store beside it (the manifest on, as by
//! default). The quiet run uses one segment large enough for the whole
//! run (no roll, no seal, no upload while it is timed). Every append and
//! flush is timed with `Instant`; the figures are printed per run.

use std::time::{Duration, Instant};

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
    let over_1ms = v.iter().filter(|n| **n > 1_000_000).count();
    let over_10ms = v.iter().filter(|n| **n > 10_000_000).count();
    format!(
        "{kind:7} n={:>9} p50={:>8.2}us p99={:>8.2}us p99.9={:>9.2}us max={:>10.2}us >1ms={over_1ms} >10ms={over_10ms}",
        v.len(),
        pct(v, 0.50),
        pct(v, 0.99),
        pct(v, 0.999),
        pct(v, 1.0),
    )
}

async fn run(
    name: &'static str,
    rate: u64,
    seconds: u64,
    segment_items: u32,
) -> Result<Stats, Box<dyn std::error::Error>> {
    let tmp =
        tempfile::tempdir_in(std::env::var("TIERINDEX_BENCH_DIR").unwrap_or_else(|_| ".".into()))?;
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store)?;
    let cfg = Config {
        data_dir: tmp.path().join("data"),
        store: Some(format!("file://{}", store.display())),
        segment_items,
        slot_count: (segment_items / 4).next_power_of_two().max(1024),
        segment_max_age_ms: None,
        ..Config::default()
    };
    let (index, _) = TierIndex::open(cfg).await?;
    let total = rate * seconds;
    let per_flush = 1_000u64;
    let mut appends = Vec::with_capacity(total as usize);
    let mut flushes = Vec::with_capacity((total / per_flush) as usize + 1);
    let keys: Vec<String> = (0..4096).map(|k| format!("key-{k:08}")).collect();
    let started = Instant::now();
    let step = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let mut behind = Duration::ZERO;
    for i in 0..total {
        // Pace: append i is due at started + i * step.
        let due = started + step * (i as u32);
        let now = Instant::now();
        if now < due {
            while Instant::now() < due {
                std::hint::spin_loop();
            }
        } else {
            behind = behind.max(now - due);
        }
        let key = &keys[(i % keys.len() as u64) as usize];
        let t = Instant::now();
        index.append(key.as_bytes(), i, 256, 1_700_000_000_000 + i / 1000)?;
        appends.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
        if (i + 1) % per_flush == 0 {
            let t = Instant::now();
            index.flush()?;
            flushes.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
        }
    }
    let st = index.status();
    eprintln!(
        "{name}: appended {total} in {:.2} s; segments by state at the end: {:?}",
        started.elapsed().as_secs_f64(),
        st.by_state
    );
    let _ = index.shutdown(Duration::from_secs(60)).await;
    Ok(Stats {
        name,
        appends,
        flushes,
        behind_ms: behind.as_millis() as u64,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, d: u64| -> u64 {
        std::env::args()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rate = arg(1, 500_000).max(1);
    let seconds = arg(2, 10).max(1);
    let segment_items = arg(3, 200_000).clamp(1_000, u64::from(u32::MAX)) as u32;
    let quiet_items = u32::try_from(rate * seconds + 1).unwrap_or(u32::MAX);
    let mut all = vec![
        run("background", rate, seconds, segment_items).await?,
        run("quiet", rate, seconds, quiet_items).await?,
    ];
    println!(
        "append_latency: rate={rate}/s seconds={seconds} segment_items={segment_items} flush every 1000 appends"
    );
    for s in &mut all {
        println!("[{}] most behind the pace: {} ms", s.name, s.behind_ms);
        println!("[{}] {}", s.name, line("append", &mut s.appends));
        println!("[{}] {}", s.name, line("flush", &mut s.flushes));
    }
    let (bg, quiet) = all.split_at_mut(1);
    let (bg, quiet) = (&mut bg[0], &mut quiet[0]);
    println!(
        "ratios background/quiet: append max {:.2}x, flush p99 {:.2}x, append p99.9 {:.2}x",
        pct(&mut bg.appends, 1.0) / pct(&mut quiet.appends, 1.0).max(0.001),
        pct(&mut bg.flushes, 0.99) / pct(&mut quiet.flushes, 0.99).max(0.001),
        pct(&mut bg.appends, 0.999) / pct(&mut quiet.appends, 0.999).max(0.001),
    );
    Ok(())
}
