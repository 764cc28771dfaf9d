//! Segment benchmarks: append throughput, flush cost, seal time, and in the
//! same run the machine's raw ceilings (memcpy of the same bytes, and a plain
//! write + fsync of a file the size of the sealed segment).
//!
//! `cargo bench --bench segment` (env `TIERINDEX_BENCH_ITEMS`, default 10M,
//! `TIERINDEX_BENCH_SLOTS`, default 1M). Prints a summary with ratios at the
//! end; `docs/benchmarks.md` records the figures.

use std::fs::OpenOptions;
use std::hint::black_box;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tierindex::index::seal_to_file;
use tierindex::segment::active::ActiveSegment;
use tierindex::segment::format::ACTIVE_ITEM_LEN;
use tierindex::segment::sealed::sealed_file_name;
use tierindex::segment::{Entry, SegmentId};

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `cargo test --all-targets` runs this file once as a smoke test (no
/// `--bench` argument): keep that run small; `cargo bench` gets full size.
fn full_size() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn items() -> u32 {
    env_u32(
        "TIERINDEX_BENCH_ITEMS",
        if full_size() { 10_000_000 } else { 20_000 },
    )
}
fn slots() -> u32 {
    env_u32(
        "TIERINDEX_BENCH_SLOTS",
        if full_size() { 1 << 20 } else { 1 << 10 },
    )
}

static RESULTS: Mutex<Vec<(&'static str, Duration)>> = Mutex::new(Vec::new());

fn record(name: &'static str, d: Duration) {
    RESULTS.lock().unwrap().push((name, d));
}

fn median(name: &str) -> Option<Duration> {
    let mut v: Vec<Duration> = RESULTS
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| *n == name)
        .map(|(_, d)| *d)
        .collect();
    v.sort();
    v.get(v.len() / 2).copied()
}

fn entries(n: u32) -> Vec<Entry> {
    // 32-byte keys: a broker message key; hashed up front for the raw path.
    (0..n as u64)
        .map(|i| {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes());
            Entry {
                key_hash: tierindex::key_hash(&key),
                offset: i,
                size: 100 + (i % 900) as u32,
                timestamp_ms: 1_700_000_000_000 + i / 10,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let n = items();
    let slots = slots();
    let dir =
        tempfile::tempdir_in(std::env::var("TIERINDEX_BENCH_DIR").unwrap_or_else(|_| ".".into()))
            .expect("bench temp dir");
    let es = entries(n);
    let mut next_id = 1u64;
    let mut fresh = |dir: &std::path::Path| {
        next_id += 1;
        ActiveSegment::create(dir, SegmentId(next_id), slots, n, 0).expect("create segment")
    };

    let mut g = c.benchmark_group("segment");
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(100));
    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(u64::from(n)));

    g.bench_function("append_entry (prehashed)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut seg = fresh(dir.path());
                let t = Instant::now();
                for e in &es {
                    seg.append_entry(*e).expect("append");
                }
                let d = t.elapsed();
                record("append", d);
                total += d;
                let p = seg.path().to_path_buf();
                drop(seg);
                std::fs::remove_file(p).ok();
            }
            total
        })
    });

    g.bench_function("append (hash 32-byte key)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut seg = fresh(dir.path());
                let mut key = [0u8; 32];
                let t = Instant::now();
                for (i, e) in es.iter().enumerate() {
                    key[..8].copy_from_slice(&(i as u64).to_le_bytes());
                    seg.append(&key, e.offset, e.size, e.timestamp_ms)
                        .expect("append");
                }
                total += t.elapsed();
                let p = seg.path().to_path_buf();
                drop(seg);
                std::fs::remove_file(p).ok();
            }
            total
        })
    });

    // Raw ceiling for the append path: copying the same item bytes.
    let src = vec![7u8; n as usize * ACTIVE_ITEM_LEN];
    let mut dst = vec![0u8; src.len()];
    g.bench_function("memcpy (same bytes as the items)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                dst.copy_from_slice(black_box(&src));
                black_box(&dst);
                let d = t.elapsed();
                record("memcpy", d);
                total += d;
            }
            total
        })
    });
    drop((src, dst));
    g.finish();

    // Flush cost: msync after a batch of appends. Every timed iteration
    // appends exactly `batch` entries and flushes: a segment without room
    // for the next batch is replaced by a fresh one outside the timing (an
    // earlier version timed an empty closure once its segment filled).
    let mut g = c.benchmark_group("flush");
    g.sample_size(20);
    g.warm_up_time(Duration::from_millis(100));
    for batch in [1usize, 100, 10_000] {
        let mut seg = fresh(dir.path());
        let mut i = 0usize;
        g.bench_function(format!("append {batch} + flush"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if (seg.capacity() - seg.len()) < batch as u32 {
                        let old = std::mem::replace(&mut seg, fresh(dir.path()));
                        let p = old.path().to_path_buf();
                        drop(old);
                        std::fs::remove_file(p).ok();
                    }
                    let t = Instant::now();
                    for _ in 0..batch {
                        seg.append_entry(es[i % es.len()]).expect("append");
                        i += 1;
                    }
                    seg.flush().expect("flush");
                    total += t.elapsed();
                }
                total
            })
        });
        let p = seg.path().to_path_buf();
        drop(seg);
        std::fs::remove_file(p).ok();
    }
    g.finish();

    // Seal of a full segment vs plain write + fsync of the same bytes.
    let mut g = c.benchmark_group("seal");
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(100));
    g.measurement_time(Duration::from_secs(10));
    let mut full = fresh(dir.path());
    for e in &es {
        full.append_entry(*e).expect("append");
    }
    full.flush().expect("flush");
    let sealed_len = tierindex::segment::format::SealedLayout::new(slots, n).file_len;
    g.throughput(Throughput::Bytes(sealed_len));
    let seal_dir = dir.path().join("sealed");
    std::fs::create_dir_all(&seal_dir).expect("mkdir");
    g.bench_function(
        "seal full segment (bucket, checksum, write, fsync, rename, dir fsync)",
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let meta = seal_to_file(&seal_dir, &full).expect("seal");
                    let d = t.elapsed();
                    let p = seal_dir.join(sealed_file_name(full.id()));
                    record("seal", d);
                    total += d;
                    assert_eq!(meta.file_len, sealed_len);
                    std::fs::remove_file(p).ok();
                }
                total
            })
        },
    );
    let raw = vec![1u8; sealed_len as usize];
    g.bench_function("raw write + fsync of the same size", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let p = seal_dir.join("raw.bin");
                let t = Instant::now();
                let mut f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&p)
                    .expect("open");
                f.write_all(&raw).expect("write");
                f.sync_all().expect("fsync");
                let d = t.elapsed();
                record("raw_write_fsync", d);
                total += d;
                drop(f);
                std::fs::remove_file(p).ok();
            }
            total
        })
    });
    g.finish();
    let p = full.path().to_path_buf();
    drop(full);
    std::fs::remove_file(p).ok();

    let (Some(app), Some(mc), Some(seal), Some(raw)) = (
        median("append"),
        median("memcpy"),
        median("seal"),
        median("raw_write_fsync"),
    ) else {
        return;
    };
    let rate = f64::from(n) / app.as_secs_f64();
    if !full_size() {
        // `cargo test --all-targets` runs this file at toy size to prove it
        // works; its timings say nothing about the targets.
        println!(
            "\nsmoke run ({n} items, {slots} slots): not a measurement; `cargo bench --bench segment` gives the figures"
        );
        return;
    }
    println!("\nSUMMARY items={n} slots={slots} sealed_bytes={sealed_len}");
    println!(
        "SUMMARY append: {:.1} M entries/s ({:.1} ns/entry); memcpy of the same {} MB: {:.1} ms; append/memcpy time ratio {:.1}x",
        rate / 1e6,
        app.as_nanos() as f64 / f64::from(n),
        n as u64 * ACTIVE_ITEM_LEN as u64 / 1_000_000,
        mc.as_secs_f64() * 1e3,
        app.as_secs_f64() / mc.as_secs_f64()
    );
    println!(
        "SUMMARY seal: {:.1} ms; raw write+fsync: {:.1} ms; seal/raw ratio {:.2}x (target <= 1.5x)",
        seal.as_secs_f64() * 1e3,
        raw.as_secs_f64() * 1e3,
        seal.as_secs_f64() / raw.as_secs_f64()
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
