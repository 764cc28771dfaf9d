//! Counters and gauges, rendered in the Prometheus text format and served
//! on an optional HTTP address (`GET /metrics`).
//!
//! Hand-rolled on atomics: a dozen values do not need a registry, and the
//! append path never touches them.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default, Debug)]
pub struct Counter(AtomicU64);
impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default, Debug)]
pub struct Gauge(AtomicU64);
impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Sum, count and max of observed values (a summary without quantiles).
#[derive(Default, Debug)]
pub struct Summary {
    sum: AtomicU64,
    count: AtomicU64,
    max: AtomicU64,
}
impl Summary {
    pub fn observe(&self, v: u64) {
        self.sum.fetch_add(v, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(v, Ordering::Relaxed);
    }
}

/// Every metric tierindex exports.
#[derive(Default, Debug)]
pub struct Metrics {
    pub segments_sealed: Counter,
    pub segments_committed: Counter,
    pub upload_bytes: Counter,
    pub upload_latency_ms: Summary,
    pub retries: Counter,
    pub verify_failures: Counter,
    pub quarantined: Counter,
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
    pub uploads_in_flight: Gauge,
    pub pending_segments: Gauge,
    pub pending_bytes: Gauge,
    pub oldest_pending_age_ms: Gauge,
    pub last_drain_ms: Gauge,
}

impl Metrics {
    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                s,
                "# HELP tierindex_{name} {help}\n# TYPE tierindex_{name} {kind}\ntierindex_{name} {v}"
            );
        };
        one(
            "segments_sealed_total",
            "counter",
            "Segments sealed and journaled.",
            self.segments_sealed.get(),
        );
        one(
            "segments_committed_total",
            "counter",
            "Segments verified and committed.",
            self.segments_committed.get(),
        );
        one(
            "upload_bytes_total",
            "counter",
            "Bytes uploaded.",
            self.upload_bytes.get(),
        );
        one(
            "upload_retries_total",
            "counter",
            "Upload steps that failed and were retried.",
            self.retries.get(),
        );
        one(
            "verify_failures_total",
            "counter",
            "Read-back verifications that did not match.",
            self.verify_failures.get(),
        );
        one(
            "quarantined_total",
            "counter",
            "Segments quarantined in the journal.",
            self.quarantined.get(),
        );
        one(
            "remote_unreadable_total",
            "counter",
            "Remote segment reads that failed their checks or found no object under a committed key.",
            self.remote_unreadable.get(),
        );
        one(
            "remote_damage_marked_total",
            "counter",
            "Damaged remote segments confirmed by a full read and marked in the manifest.",
            self.remote_damage_marked.get(),
        );
        one(
            "local_entries_lost_total",
            "counter",
            "Entries of damaged local segment files that could not be salvaged at start-up.",
            self.local_entries_lost.get(),
        );
        one(
            "local_corrupt_items_total",
            "counter",
            "Items whose CRC failed during a local lookup (missing from its result).",
            self.local_corrupt_items.get(),
        );
        one(
            "reconcile_repaired_total",
            "counter",
            "Findings the background reconciler repaired.",
            self.reconcile_repaired.get(),
        );
        one(
            "reconcile_runs_total",
            "counter",
            "Background reconcile runs finished.",
            self.reconcile_runs.get(),
        );
        one(
            "reconcile_unresolved",
            "gauge",
            "Findings of the last background reconcile that need an operator.",
            self.reconcile_unresolved.get(),
        );
        one(
            "uploads_in_flight",
            "gauge",
            "Uploads running now.",
            self.uploads_in_flight.get(),
        );
        one(
            "pending_segments",
            "gauge",
            "Sealed segments not yet committed.",
            self.pending_segments.get(),
        );
        one(
            "pending_bytes",
            "gauge",
            "Bytes of sealed segments not yet committed.",
            self.pending_bytes.get(),
        );
        one(
            "oldest_pending_age_ms",
            "gauge",
            "Age of the oldest pending segment.",
            self.oldest_pending_age_ms.get(),
        );
        one(
            "last_drain_duration_ms",
            "gauge",
            "Duration of the last drain.",
            self.last_drain_ms.get(),
        );
        let l = &self.upload_latency_ms;
        let _ = writeln!(
            s,
            "# HELP tierindex_upload_latency_ms Upload (PUT + read-back) latency.\n# TYPE tierindex_upload_latency_ms summary\ntierindex_upload_latency_ms_sum {}\ntierindex_upload_latency_ms_count {}\ntierindex_upload_latency_ms_max {}",
            l.sum.load(Ordering::Relaxed),
            l.count.load(Ordering::Relaxed),
            l.max.load(Ordering::Relaxed)
        );
        s
    }
}

/// Serve `GET /metrics` on `addr` until the task is dropped. Returns the
/// bound address (useful with port 0).
pub async fn serve(
    addr: &str,
    metrics: Arc<Metrics>,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                // Read (and ignore) the request head; bounded.
                let mut buf = [0u8; 2048];
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(2), sock.read(&mut buf))
                        .await;
                let body = metrics.render();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.upload_bytes.add(42);
        m.upload_latency_ms.observe(7);
        let t = m.render();
        assert!(t.contains("tierindex_upload_bytes_total 42\n"));
        assert!(t.contains("tierindex_upload_latency_ms_count 1\n"));
        assert!(t.contains("# TYPE tierindex_pending_segments gauge"));
    }
}
