//! Remote lookup benchmark (issue 6): requests per lookup and latency of
//! `remote::fetch::Fetcher` against a real S3-compatible server, cold (no
//! cached index) and warm.
//!
//! Store: the server named by `TIERINDEX_S3_*` (what `scripts/s3-server.sh
//! env KIND` prints), or `BENCH_STORE=file:///abs/dir`. Normally run through
//! `scripts/bench-fetch.sh [KIND]`.
//!
//! Knobs: `BENCH_SEGMENTS` (120), `BENCH_ITEMS` per segment (20000),
//! `BENCH_SLOTS` (1024), `BENCH_LOOKUPS` (200 per measurement).
//!
//! Prints `RESULT name value unit` lines.

use std::time::{Duration, Instant};

use object_store::ObjectStoreExt as _;
use object_store::PutPayload;
use tierindex::remote::fetch::{Fetcher, RemoteSegment};
use tierindex::remote::{RemoteStore, StoreOptions};
use tierindex::retry::RetryPolicy;
use tierindex::segment::sealed::build_sealed;
use tierindex::segment::{Entry, SegmentId};
use tierindex::{TimeRange, key_hash};

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn store() -> RemoteStore {
    if let Ok(url) = std::env::var("BENCH_STORE") {
        return RemoteStore::from_url(&url, &StoreOptions::default()).expect("BENCH_STORE");
    }
    let get = |k: &str| std::env::var(format!("TIERINDEX_S3_{k}")).ok();
    let bucket = get("BUCKET").expect("TIERINDEX_S3_BUCKET or BENCH_STORE");
    let opts = StoreOptions {
        endpoint: get("ENDPOINT"),
        allow_http: Some(true),
        region: get("REGION"),
        ..StoreOptions::default()
    };
    let prefix = format!("bench-fetch-{}", std::process::id());
    RemoteStore::from_url(&format!("s3://{bucket}/{prefix}"), &opts).expect("store")
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

const KEYS: u64 = 5000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let segments = env_u64("BENCH_SEGMENTS", 120);
    let items = env_u64("BENCH_ITEMS", 20_000);
    let slots = env_u64("BENCH_SLOTS", 1024) as u32;
    let lookups = env_u64("BENCH_LOOKUPS", 200) as usize;
    let store = store();
    eprintln!(
        "bench-fetch: {} segments x {items} items, {slots} slots, store {}",
        segments,
        store.display_url()
    );

    // Upload: segment s holds offsets s*items.., keys over KEYS, times
    // s*1000.. so a time range can pick one segment.
    let mut segs = Vec::new();
    let t = Instant::now();
    let mut bytes_total = 0u64;
    for s in 0..segments {
        let es: Vec<Entry> = (0..items)
            .map(|i| {
                let k = (s * 7919 + i) % KEYS;
                Entry {
                    key_hash: key_hash(format!("key-{k}").as_bytes()),
                    offset: s * items + i,
                    size: 100,
                    timestamp_ms: s * 1000 + i * 1000 / items,
                }
            })
            .collect();
        let (bytes, meta) = build_sealed(SegmentId(s + 1), 1, 2, slots, &es).expect("seal");
        bytes_total += bytes.len() as u64;
        let key = store.segment_key("bench", &meta);
        store
            .object_store()
            .put(&key, PutPayload::from(bytes))
            .await
            .expect("put");
        segs.push(RemoteSegment { key, meta });
    }
    eprintln!(
        "bench-fetch: uploaded {:.1} MB in {:.1}s",
        bytes_total as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let policy = RetryPolicy {
        max_attempts: 3,
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(500),
        request_timeout: Duration::from_secs(30),
    };
    let mut rng = fastrand::Rng::with_seed(7);
    let key = |rng: &mut fastrand::Rng| key_hash(format!("key-{}", rng.u64(0..KEYS)).as_bytes());

    // 1. Cold: one lookup in one segment with an empty cache.
    let mut lat = Vec::new();
    let mut reqs = 0u64;
    let mut found = 0usize;
    for _ in 0..lookups {
        let f = Fetcher::new(store.clone(), policy.clone(), 256 << 20);
        let seg = &segs[rng.usize(0..segs.len())];
        let k = key(&mut rng);
        let t = Instant::now();
        found += f
            .lookup_in(seg, k, TimeRange::ALL)
            .await
            .expect("cold")
            .len();
        lat.push(t.elapsed());
        reqs += f.stats().requests;
    }
    println!(
        "RESULT cold_requests_per_segment_lookup {:.2} req",
        reqs as f64 / lookups as f64
    );
    println!("RESULT cold_lookup_p50 {:.2} ms", pct(&mut lat, 0.5));
    println!("RESULT cold_lookup_p99 {:.2} ms", pct(&mut lat, 0.99));
    eprintln!("bench-fetch: cold found {found} entries");

    // 2. Warm: every index cached, one lookup in one segment.
    let f = Fetcher::new(store.clone(), policy.clone(), 256 << 20);
    for seg in &segs {
        f.lookup_in(seg, 0, TimeRange::ALL).await.expect("warm-up");
    }
    let before = f.stats();
    let mut lat = Vec::new();
    for _ in 0..lookups {
        let seg = &segs[rng.usize(0..segs.len())];
        let k = key(&mut rng);
        let t = Instant::now();
        f.lookup_in(seg, k, TimeRange::ALL).await.expect("warm");
        lat.push(t.elapsed());
    }
    let after = f.stats();
    println!(
        "RESULT warm_requests_per_segment_lookup {:.2} req",
        (after.requests - before.requests) as f64 / lookups as f64
    );
    println!("RESULT warm_lookup_p50 {:.2} ms", pct(&mut lat, 0.5));
    println!("RESULT warm_lookup_p99 {:.2} ms", pct(&mut lat, 0.99));

    // 3. Warm, one key across every segment (oldest first, sequential).
    let n = (lookups / 10).max(5);
    let before = f.stats();
    let mut lat = Vec::new();
    let mut hits = 0usize;
    for _ in 0..n {
        let k = key(&mut rng);
        let t = Instant::now();
        hits += f.lookup(&segs, k, TimeRange::ALL).await.expect("all").len();
        lat.push(t.elapsed());
    }
    let after = f.stats();
    println!(
        "RESULT warm_all_segments_requests_per_lookup {:.1} req ({} segments)",
        (after.requests - before.requests) as f64 / n as f64,
        segs.len()
    );
    println!(
        "RESULT warm_all_segments_lookup_p50 {:.1} ms",
        pct(&mut lat, 0.5)
    );
    eprintln!("bench-fetch: {hits} entries over {n} all-segment lookups");

    // 4. A time range covering one segment: the others are skipped from
    // metadata, without a request.
    let before = f.stats();
    let s = rng.u64(0..segments);
    let r = TimeRange {
        from_ms: s * 1000,
        to_ms: s * 1000 + 999,
    };
    f.lookup(&segs, key(&mut rng), r).await.expect("range");
    let after = f.stats();
    println!(
        "RESULT time_range_one_segment_requests {} req (skipped {})",
        after.requests - before.requests,
        after.skipped - before.skipped
    );
    println!(
        "RESULT index_cache_bytes {} B ({} segments)",
        f.cached_bytes(),
        segs.len()
    );

    // Clean up the bench prefix.
    for seg in &segs {
        let _ = store.object_store().delete(&seg.key).await;
    }
}
