//! Counters, gauges and one histogram, rendered in the Prometheus text
//! format (0.0.4) and served on an optional HTTP address.
//!
//! Hand-rolled on atomics: a couple of dozen values do not need a registry,
//! and the append path only touches two relaxed atomics.
//!
//! ## Conventions
//! Prometheus' naming rules, checked by `promtool check metrics` in
//! `tests/cli_metrics.rs`: base units in the name (`_seconds`, `_bytes`),
//! counters end in `_total`, one `# HELP` and `# TYPE` per family, and a
//! histogram exposes only `_bucket{le=...}` (cumulative, ending in `+Inf`),
//! `_sum` and `_count`. Durations are kept in milliseconds internally (the
//! field names say so) and rendered in seconds.
//!
//! ## Serving
//! [`serve`] answers `GET`/`HEAD` of `/metrics` (and `/`) on a plain tokio
//! listener. No HTTP crate: the one in the dependency tree (hyper, via
//! reqwest and object_store) is built without its `server` feature, and
//! enabling it rebuilds the whole HTTP client stack for four lines of
//! protocol. What a hand-written loop must get right is done here and
//! commented: it backs off on accept errors instead of spinning (EMFILE
//! persists until a descriptor is closed), bounds the request head, the
//! time per connection and the number of connections.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default, Debug)]
/// A monotonic counter.
pub struct Counter(AtomicU64);
impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Release);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Release);
    }
    /// Raises the counter to `v` if it is below (never lowers it: a counter
    /// only goes up).
    pub fn raise_to(&self, v: u64) {
        self.0.fetch_max(v, Ordering::Release);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Default, Debug)]
/// A value that goes up and down.
pub struct Gauge(AtomicU64);
impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (ms) of the duration histogram's buckets; `+Inf` follows.
const DURATION_BUCKETS_MS: [u64; 12] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 60_000,
];

/// A histogram of durations observed in milliseconds, rendered in seconds.
#[derive(Default, Debug)]
pub struct DurationHistogram {
    /// Per bucket (not cumulative), then one for `+Inf`.
    buckets: [AtomicU64; DURATION_BUCKETS_MS.len() + 1],
    sum_ms: AtomicU64,
    count: AtomicU64,
}

impl DurationHistogram {
    /// Records one duration of `ms` milliseconds.
    pub fn observe(&self, ms: u64) {
        let i = DURATION_BUCKETS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(DURATION_BUCKETS_MS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Durations observed so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, s: &mut String, name: &str, help: &str) {
        let _ = writeln!(
            s,
            "# HELP tierindex_{name} {help}\n# TYPE tierindex_{name} histogram"
        );
        // Read the buckets first and derive the count from them, so a
        // scrape racing an observation still shows `+Inf == _count`.
        let mut cumulative = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = match DURATION_BUCKETS_MS.get(i) {
                Some(ms) => seconds(*ms),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(s, "tierindex_{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(
            s,
            "tierindex_{name}_sum {}\ntierindex_{name}_count {cumulative}",
            seconds(self.sum_ms.load(Ordering::Relaxed))
        );
    }
}

/// `ms` as a decimal number of seconds, exact (`1500` is `1.5`).
fn seconds(ms: u64) -> String {
    let (s, frac) = (ms / 1000, ms % 1000);
    if frac == 0 {
        format!("{s}")
    } else {
        let f = format!("{frac:03}");
        format!("{s}.{}", f.trim_end_matches('0'))
    }
}

/// Every metric tierindex exports.
#[derive(Default, Debug)]
pub struct Metrics {
    /// Entries appended through `TierIndex::append` in this process.
    pub entries_appended: Counter,
    /// Entries made durable by `TierIndex::flush` (acknowledged).
    pub entries_flushed: Counter,
    /// Entries in segments whose upload (PUT and read-back) succeeded.
    pub entries_uploaded: Counter,
    /// Segments sealed into immutable files.
    pub segments_sealed: Counter,
    /// Segments whose upload (PUT and read-back) succeeded.
    pub segments_uploaded: Counter,
    /// Segments committed (recorded in the manifest, or final without one).
    pub segments_committed: Counter,
    /// Bytes of segments uploaded.
    pub upload_bytes: Counter,
    /// PUT plus read-back time of each upload, observed in ms.
    pub upload_latency_ms: DurationHistogram,
    /// Remote requests retried.
    pub retries: Counter,
    /// Read-back checks that failed.
    pub verify_failures: Counter,
    /// Segments quarantined (an operator must look).
    pub quarantined: Counter,
    /// Segments whose id the manifest held with another segment's content:
    /// their entries were copied into a new segment (`pipeline::reseal`).
    pub segments_resealed: Counter,
    /// `append`/`flush` calls that found the writer lock held (by another
    /// caller or by background work: a roll, a seal's collection, a
    /// lookup, a release) and had to wait.
    pub writer_lock_waits: Counter,
    /// Of those, the waits longer than 100 us.
    pub writer_lock_waits_slow: Counter,
    /// The longest such wait so far, in microseconds.
    pub writer_lock_wait_max_us: Counter,
    /// Times the background worker woke (a seal, an append into an empty
    /// segment, an upload's end, a retry, an age deadline, a busy tick or
    /// the idle safety net). An idle stream should add almost none.
    pub worker_wakes: Counter,
    /// Remote segments a lookup could not read (corrupt or missing object
    /// under a committed key).
    pub remote_unreadable: Counter,
    /// Damage a lookup confirmed with a full read and recorded in the
    /// manifest (the segment is skipped by readers until repaired).
    pub remote_damage_marked: Counter,
    /// Background reconcile runs finished (`reconcile_interval_ms`).
    pub reconcile_runs: Counter,
    /// Findings the background reconciler repaired (`reconcile_repair`).
    pub reconcile_repaired: Counter,
    /// Findings of the last background reconcile that need an operator.
    pub reconcile_unresolved: Gauge,
    /// Entries found damaged at start-up that could not be salvaged
    /// (possibly acknowledged; see the recovery report's `salvaged`).
    pub local_entries_lost: Counter,
    /// Items whose CRC failed in a local lookup (missing from its result).
    pub local_corrupt_items: Counter,
    /// Local sealed segments a lookup could not read at all (missing from
    /// its result).
    pub local_unreadable_segments: Counter,
    /// Local sealed segments held (known by footer; mapped on demand).
    pub local_sealed_segments: Gauge,
    /// Of those, mapped now (at most `sealed_mapped`; a map a lookup still
    /// holds after its eviction is not counted).
    pub local_sealed_mapped: Gauge,
    /// Segments uploading now, or waiting for one of the process's upload
    /// slots ([`crate::upload_slot_counts`]).
    pub uploads_in_flight: Gauge,
    /// Segments not yet done (as `Status::pending_segments`).
    pub pending_segments: Gauge,
    /// Their bytes.
    pub pending_bytes: Gauge,
    /// Age of the oldest of them.
    pub oldest_pending_age_ms: Gauge,
    /// Duration of the last shutdown drain.
    pub last_drain_ms: Gauge,
}

impl Metrics {
    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: &str| {
            let _ = writeln!(
                s,
                "# HELP tierindex_{name} {help}\n# TYPE tierindex_{name} {kind}\ntierindex_{name} {v}"
            );
        };
        let counters: [(&str, &str, &Counter); COUNTERS] = [
            (
                "entries_appended_total",
                "Entries appended.",
                &self.entries_appended,
            ),
            (
                "entries_flushed_total",
                "Entries made durable by a flush (acknowledged).",
                &self.entries_flushed,
            ),
            (
                "entries_uploaded_total",
                "Entries in segments uploaded and read back.",
                &self.entries_uploaded,
            ),
            (
                "segments_sealed_total",
                "Segments sealed and journaled.",
                &self.segments_sealed,
            ),
            (
                "segments_uploaded_total",
                "Segments uploaded and read back.",
                &self.segments_uploaded,
            ),
            (
                "segments_committed_total",
                "Segments verified and committed.",
                &self.segments_committed,
            ),
            (
                "upload_bytes_total",
                "Bytes of segments uploaded.",
                &self.upload_bytes,
            ),
            (
                "upload_retries_total",
                "Upload steps that failed and were retried.",
                &self.retries,
            ),
            (
                "verify_failures_total",
                "Read-back verifications that did not match.",
                &self.verify_failures,
            ),
            (
                "quarantined_total",
                "Segments quarantined in the journal.",
                &self.quarantined,
            ),
            (
                "writer_lock_waits_total",
                "Appends and flushes that waited for the writer lock.",
                &self.writer_lock_waits,
            ),
            (
                "writer_lock_waits_over_100us_total",
                "Appends and flushes that waited more than 100 us for the writer lock.",
                &self.writer_lock_waits_slow,
            ),
            (
                "worker_wakes_total",
                "Times the background worker woke to tick the writer and schedule uploads.",
                &self.worker_wakes,
            ),
            (
                "segments_resealed_total",
                "Segments whose id the manifest held with other content, copied into a new segment.",
                &self.segments_resealed,
            ),
            (
                "remote_unreadable_total",
                "Remote segment reads that failed their checks or found no object under a committed key.",
                &self.remote_unreadable,
            ),
            (
                "remote_damage_marked_total",
                "Damaged remote segments confirmed by a full read and marked in the manifest.",
                &self.remote_damage_marked,
            ),
            (
                "local_entries_lost_total",
                "Entries of damaged local segment files that could not be salvaged at start-up.",
                &self.local_entries_lost,
            ),
            (
                "local_corrupt_items_total",
                "Items whose CRC failed during a local lookup (missing from its result).",
                &self.local_corrupt_items,
            ),
            (
                "local_unreadable_segments_total",
                "Local sealed segments a lookup could not read at all (gone, or changed since checked; missing from its result).",
                &self.local_unreadable_segments,
            ),
            (
                "reconcile_repaired_total",
                "Findings the background reconciler repaired.",
                &self.reconcile_repaired,
            ),
            (
                "reconcile_runs_total",
                "Background reconcile runs finished.",
                &self.reconcile_runs,
            ),
        ];
        // Read downstream counters first (the list runs upstream first:
        // appended, flushed, uploaded, committed), so counters that move
        // while a scrape reads them never show more flushed than appended,
        // or more committed than uploaded in this process (increments are
        // Release, reads Acquire, so a later read sees at least what an
        // earlier one implied).
        let mut values = [0u64; COUNTERS];
        for (v, (_, _, c)) in values.iter_mut().zip(&counters).rev() {
            *v = c.get();
        }
        for ((name, help, _), v) in counters.iter().zip(values) {
            one(name, "counter", help, &v.to_string());
        }
        let gauges: [(&str, &str, String); 9] = [
            (
                "local_sealed_segments",
                "Local sealed segments held (updated on each background wake).",
                self.local_sealed_segments.get().to_string(),
            ),
            (
                "local_sealed_mapped",
                "Local sealed segments mapped now, at most sealed_mapped (updated on each background wake).",
                self.local_sealed_mapped.get().to_string(),
            ),
            (
                "writer_lock_wait_longest_seconds",
                "The longest wait of an append or flush for the writer lock so far.",
                format!("{:.6}", self.writer_lock_wait_max_us.get() as f64 / 1e6),
            ),
            (
                "reconcile_unresolved",
                "Findings of the last background reconcile that need an operator.",
                self.reconcile_unresolved.get().to_string(),
            ),
            (
                "uploads_in_flight",
                "Uploads started now, including those waiting for one of the process's upload slots.",
                self.uploads_in_flight.get().to_string(),
            ),
            (
                "pending_segments",
                "Sealed segments not yet committed.",
                self.pending_segments.get().to_string(),
            ),
            (
                "pending_bytes",
                "Bytes of sealed segments not yet committed.",
                self.pending_bytes.get().to_string(),
            ),
            (
                "oldest_pending_age_seconds",
                "Age of the oldest pending segment since it was sealed.",
                seconds(self.oldest_pending_age_ms.get()),
            ),
            (
                "last_drain_duration_seconds",
                "Duration of the last shutdown drain.",
                seconds(self.last_drain_ms.get()),
            ),
        ];
        for (name, help, v) in &gauges {
            one(name, "gauge", help, v);
        }
        self.upload_latency_ms.render(
            &mut s,
            "upload_duration_seconds",
            "Upload (PUT plus read-back) duration.",
        );
        s
    }
}

/// Connections served at once; more are closed at accept.
/// Counters in a scrape (the list in `render`).
const COUNTERS: usize = 21;

const MAX_CONNECTIONS: usize = 64;
/// Longest request head read.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Time one connection may take, reading and writing.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve the metrics on `addr` (`GET /metrics`) until the task is dropped
/// or aborted. Returns the bound address (useful with port 0).
pub async fn serve(
    addr: &str,
    metrics: Arc<Metrics>,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let schedule = crate::retry::Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
        let mut failures = 0u32;
        loop {
            let sock = match listener.accept().await {
                Ok((sock, _)) => {
                    failures = 0;
                    sock
                }
                Err(e) => {
                    // Accept errors such as EMFILE/ENFILE last until some
                    // descriptor is closed: retrying at once would spin a
                    // core. Wait, doubling up to 1 s, and say why.
                    let wait = schedule.step(failures);
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, retry_in = ?wait, "metrics: accept failed");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            // Over the limit: close at once rather than queue without bound.
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                drop(sock);
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, respond(sock, &metrics)).await;
            });
        }
    });
    Ok((local, task))
}

/// Reads one request head and answers it; the connection is then closed.
async fn respond(mut sock: tokio::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD_BYTES {
            return reply(&mut sock, "431 Request Header Fields Too Large", "", false).await;
        }
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    match (method, path) {
        ("GET" | "HEAD", "/metrics" | "/") => {
            reply(&mut sock, "200 OK", &metrics.render(), head_only).await
        }
        ("GET" | "HEAD", _) => {
            reply(
                &mut sock,
                "404 Not Found",
                "not found: the metrics are at /metrics\n",
                head_only,
            )
            .await
        }
        _ => reply(&mut sock, "405 Method Not Allowed", "", false).await,
    }
}

async fn reply(
    sock: &mut tokio::net::TcpStream,
    status: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n\
         content-length: {}\r\nallow: GET, HEAD\r\nconnection: close\r\n\r\n{}",
        body.len(),
        if head_only { "" } else { body }
    );
    sock.write_all(resp.as_bytes()).await?;
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.upload_bytes.add(42);
        m.upload_latency_ms.observe(7);
        m.upload_latency_ms.observe(70_000);
        m.oldest_pending_age_ms.set(1500);
        let t = m.render();
        assert!(t.contains("tierindex_upload_bytes_total 42\n"), "{t}");
        assert!(
            t.contains("tierindex_upload_duration_seconds_bucket{le=\"0.01\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("tierindex_upload_duration_seconds_bucket{le=\"+Inf\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("tierindex_upload_duration_seconds_count 2\n"),
            "{t}"
        );
        assert!(
            t.contains("tierindex_upload_duration_seconds_sum 70.007\n"),
            "{t}"
        );
        assert!(
            t.contains("tierindex_oldest_pending_age_seconds 1.5\n"),
            "{t}"
        );
        assert!(t.contains("# TYPE tierindex_pending_segments gauge"), "{t}");
        assert!(!t.contains("_ms"), "milliseconds leaked into a name: {t}");
        assert!(!t.contains("_max"), "{t}");
        // Every counter family ends in _total.
        for l in t.lines().filter(|l| l.ends_with(" counter")) {
            assert!(l.ends_with("_total counter"), "{l}");
        }
    }

    #[test]
    fn raise_to_never_lowers() {
        let c = Counter::default();
        c.raise_to(5);
        c.raise_to(3);
        assert_eq!(c.get(), 5);
    }
}
