//! Reconcile benchmark (issue 6): how long `recovery::reconcile` (report
//! only, no `--deep`) takes for a stream of `BENCH_SEGMENTS` (10,000)
//! committed segments: journal replay, manifest load (with its chunks), one
//! LIST of the segments prefix, and the comparison.
//!
//! Store: `BENCH_STORE` (default a `file://` directory under the scratch
//! dir) or the server named by `TIERINDEX_S3_*` (what `scripts/s3-server.sh
//! env KIND` prints). Set-up writes the journal records, one small object
//! per segment (a real sealed segment of 4 items) and the manifest (in
//! batches of 500 entries) before timing. Prints `RESULT` lines.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use object_store::ObjectStoreExt as _;
use object_store::PutPayload;
use tierindex::config::Config;
use tierindex::journal::{Journal, JournalOptions, Record};
use tierindex::recovery::reconcile::{ReconcileOptions, reconcile};
use tierindex::remote::lease::SystemClock;
use tierindex::remote::manifest::{ManifestOptions, ManifestStore, SegmentEntry};
use tierindex::remote::probe::Capabilities;
use tierindex::remote::{RemoteStore, StoreOptions};
use tierindex::segment::sealed::build_sealed;
use tierindex::segment::{Entry, SegmentId};

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = env_u64("BENCH_SEGMENTS", 10_000);
    let scratch = tempfile::Builder::new()
        .prefix("tierindex-bench-reconcile-")
        .tempdir()
        .expect("scratch dir");
    let data: PathBuf = scratch.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let get = |k: &str| std::env::var(format!("TIERINDEX_S3_{k}")).ok();
    let (url, opts) = match (std::env::var("BENCH_STORE").ok(), get("BUCKET")) {
        (Some(u), _) => (u, StoreOptions::default()),
        (None, Some(bucket)) => (
            format!("s3://{bucket}/bench-reconcile-{}", std::process::id()),
            StoreOptions {
                endpoint: get("ENDPOINT"),
                allow_http: Some(true),
                region: get("REGION"),
                ..StoreOptions::default()
            },
        ),
        (None, None) => {
            let dir = scratch.path().join("store");
            std::fs::create_dir_all(&dir).unwrap();
            (format!("file://{}", dir.display()), StoreOptions::default())
        }
    };
    let store = RemoteStore::from_url(&url, &opts).expect("store");
    let stream = "bench";
    let cfg = Config {
        data_dir: data.clone(),
        store: Some(url.clone()),
        endpoint: opts.endpoint.clone(),
        allow_http: opts.allow_http,
        region: opts.region.clone(),
        stream: stream.into(),
        manifest: true,
        owner_id: Some("bench".into()),
        ..Config::default()
    };
    eprintln!(
        "bench-reconcile: {n} segments, store {}",
        store.display_url()
    );

    // Set-up (not timed in the result): objects, journal, manifest.
    let t = Instant::now();
    let mut journal = Journal::open(&data, JournalOptions::default())
        .expect("journal")
        .0;
    let caps = Capabilities {
        conditional_create: true,
        ..Capabilities::default()
    };
    let ms = ManifestStore::with_capabilities(
        &store,
        stream,
        ManifestOptions::default(),
        &caps,
        Arc::new(SystemClock),
    )
    .expect("manifest store");
    let mut w = ms
        .take_ownership("bench", std::time::Duration::from_secs(3600))
        .await
        .expect("ownership");
    let mut batch = Vec::new();
    let mut records = Vec::new();
    for i in 1..=n {
        let es: Vec<Entry> = (0..4)
            .map(|k| Entry {
                key_hash: i * 31 + k,
                offset: i * 4 + k,
                size: 1,
                timestamp_ms: i,
            })
            .collect();
        let (bytes, meta) = build_sealed(SegmentId(i), 1, 2, 4, &es).expect("seal");
        let key = store.segment_key(stream, &meta);
        store
            .object_store()
            .put(&key, PutPayload::from(bytes))
            .await
            .expect("put");
        records.extend([
            Record::Sealed { meta: meta.clone() },
            Record::Uploading {
                id: meta.id,
                attempt: 1,
                key: key.to_string(),
                multipart_id: None,
            },
            Record::Uploaded {
                id: meta.id,
                etag: None,
                version: None,
            },
            Record::Verified { id: meta.id },
            Record::Committed { id: meta.id },
        ]);
        batch.push(SegmentEntry::new(&store, stream, &meta).expect("entry"));
        if batch.len() == 500 || i == n {
            journal.append(&records).expect("journal append");
            records.clear();
            w.commit(&batch).await.expect("manifest commit");
            batch.clear();
        }
    }
    w.release().await.expect("release");
    drop(journal);
    eprintln!(
        "bench-reconcile: set-up took {:.1}s",
        t.elapsed().as_secs_f64()
    );

    for run in 0..3 {
        let t = Instant::now();
        let r = reconcile(&cfg, &store, &ReconcileOptions::default())
            .await
            .expect("reconcile");
        let took = t.elapsed();
        println!(
            "RESULT reconcile_{n}_segments_run{run} {:.3} s (findings {}, needs operator {})",
            took.as_secs_f64(),
            r.findings_total,
            r.needs_operator()
        );
    }

    // A reader's view of the same manifest (what `lookup_remote` needs per
    // lookup): the first read GETs every chunk, later ones reuse the
    // decoded chunks (create-only, named by their CRC).
    let reader = ManifestStore::reader(&store, stream, ManifestOptions::default()).expect("reader");
    let m = reader.load().await.expect("load").expect("a manifest");
    for run in 0..3 {
        let t = Instant::now();
        let all = reader.all_segments(&m).await.expect("entries");
        println!(
            "RESULT manifest_entries_{}_chunks_{}_read{run} {:.3} ms",
            all.len(),
            m.chunks.len(),
            t.elapsed().as_secs_f64() * 1e3
        );
    }
}
