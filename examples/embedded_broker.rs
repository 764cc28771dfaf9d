//! A broker loop embedding tierindex end to end, on the host's own tokio
//! runtime: open (recovering whatever a crash left), append index entries
//! as messages "arrive", flush at the broker's commit points, look entries
//! up, watch status, and shut down on SIGTERM/Ctrl-C with a deadline.
//!
//! ```text
//! cargo run --example embedded_broker -- /tmp/broker-data
//! ```
//! The store defaults to a `file://` directory next to the data directory;
//! set `TIERINDEX_STORE=s3://bucket/prefix` (plus the usual `AWS_*`
//! variables) to upload to S3, MinIO or Garage instead.

use std::time::Duration;

use tierindex::lifecycle::ShutdownSignals;
use tierindex::{Config, TierIndex, TimeRange};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let data_dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "broker-data".into());
    let cfg = Config {
        data_dir: data_dir.into(),
        store: std::env::var("TIERINDEX_STORE").ok(),
        segment_items: 50_000,
        slot_count: 8192,
        segment_max_age_ms: Some(5_000),
        ..Config::default()
    };

    // The library installs no signal handlers by itself; the host opts in.
    let mut signals = ShutdownSignals::install()?;
    let (index, report) = TierIndex::open(cfg).await?;
    println!(
        "opened: previous shutdown clean = {}, {} segment(s) quarantined, store {}",
        report.previous_shutdown_clean,
        report.segments.quarantined.len(),
        report.store
    );

    let mut offset = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut produced = 0u64;
    loop {
        tokio::select! {
            _ = signals.first() => break,
            _ = ticker.tick() => {}
        }
        // A batch of "messages": index key -> (offset, size, timestamp).
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        for _ in 0..1_000 {
            let key = format!("order-{}", offset % 5_000);
            index.append(key.as_bytes(), offset, 256, now_ms)?;
            offset += 1;
        }
        // The broker's commit point: everything appended so far is durable.
        index.flush()?;
        produced += 1_000;
        if produced.is_multiple_of(100_000) {
            let hits = index.lookup(b"order-42", TimeRange::ALL).entries.len();
            let st = index.status();
            println!(
                "{produced} entries; order-42 has {hits} entries; {} segment(s) pending upload",
                st.pending_segments
            );
        }
    }

    // Seal the active segment, drain uploads within 20 s, report.
    let report = index.shutdown(Duration::from_secs(20)).await;
    println!(
        "shutdown: drained = {}, {} pending, {} ms",
        report.fully_drained(),
        report.drain.pending.len(),
        report.elapsed_ms
    );
    std::process::exit(if report.fully_drained() { 0 } else { 3 });
}
