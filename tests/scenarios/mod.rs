//! Issue 11's operator scenarios with default settings (the remote manifest
//! on), shared by `tests/safe_defaults.rs` (the embedded `file://` store)
//! and `tests/s3_suite.rs` (the real servers that honour conditional
//! creates). Each ends with every acknowledged entry readable through the
//! binary's `lookup --remote`, run with `--data-dir` only (no `--store`: the
//! data directory's recorded store is used), compared with a model; and
//! with every object that held the only copy still there, byte for byte.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use object_store::ObjectStoreExt as _;
use tierindex::remote::RemoteStore;
use tierindex::segment::sealed::build_sealed;
use tierindex::{Config, Entry, SegmentId, TierIndex};

/// Entries per segment (small, so a few hundred entries make many objects).
pub const ITEMS: u32 = 50;
/// Keys `k0..k6`.
const KEYS: u64 = 7;

/// Where the scenarios run.
pub struct Target {
    /// `file:///abs` or `s3://bucket/prefix`.
    pub store_url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Variables the binary needs (S3 credentials); nothing else leaks in.
    pub env: Vec<(String, String)>,
}

/// Offsets by key: what was acknowledged (flushed, then drained).
pub type Model = BTreeMap<String, Vec<u64>>;

impl Target {
    /// Default settings but for the store, small segments, no age seal,
    /// short timeouts and `release_after_commit` (the object is then the
    /// only copy).
    pub fn config(&self, data: &Path) -> Config {
        Config {
            data_dir: data.to_path_buf(),
            store: Some(self.store_url.clone()),
            endpoint: self.endpoint.clone(),
            allow_http: self.endpoint.as_ref().map(|_| true),
            region: self.region.clone(),
            segment_items: ITEMS,
            slot_count: 64,
            segment_max_age_ms: None,
            tick_ms: 20,
            max_attempts: 3,
            request_timeout_ms: 5_000,
            release_after_commit: true,
            ..Config::default()
        }
    }

    fn store(&self) -> RemoteStore {
        tierindex::tier::open_store(&self.config(Path::new("/nonexistent"))).unwrap()
    }

    /// Every segment object of `stream-0`: key -> bytes.
    pub async fn objects(&self) -> BTreeMap<String, Vec<u8>> {
        use futures::StreamExt as _;
        let store = self.store();
        let prefix = store.segments_prefix("stream-0").unwrap();
        let os = store.object_store().clone();
        let metas: Vec<_> = os
            .list(Some(&prefix))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .map(|m| m.unwrap())
            .collect();
        let mut out = BTreeMap::new();
        for m in metas {
            let bytes = os.get(&m.location).await.unwrap().bytes().await.unwrap();
            out.insert(m.location.to_string(), bytes.to_vec());
        }
        out
    }

    /// The segment id of every object; panics when two objects share one
    /// (a reused id).
    pub fn ids(&self, objects: &BTreeMap<String, Vec<u8>>) -> Vec<SegmentId> {
        let store = self.store();
        let mut ids: Vec<SegmentId> = objects
            .keys()
            .map(|k| {
                store
                    .parse_segment_key(&object_store::path::Path::from(k.as_str()))
                    .unwrap_or_else(|| panic!("not a segment key: {k}"))
                    .0
            })
            .collect();
        ids.sort();
        let n = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), n, "two objects share a segment id: {objects:?}");
        ids
    }

    /// `lookup KEY --remote --json` with `--data-dir` only.
    fn lookup_remote(&self, data: &Path, key: &str) -> Vec<u64> {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tierindex"));
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("TIERINDEX_LOG", "warn");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let o = c
            .arg("--data-dir")
            .arg(data)
            .args(["--json", "lookup", key, "--remote"])
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(0),
            "lookup {key} --remote in {}: {}{}",
            data.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let mut offs: Vec<u64> = v["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["offset"].as_u64().unwrap())
            .collect();
        offs.sort();
        offs
    }

    /// Every acknowledged entry of `model` is found by `lookup --remote`
    /// from `data`, and nothing else under those keys.
    pub fn assert_readable(&self, data: &Path, model: &Model) {
        for (key, want) in model {
            let got = self.lookup_remote(data, key);
            assert_eq!(&got, want, "key {key} from {}", data.display());
        }
    }
}

/// Opens `cfg`, appends `range` (acknowledged by the flush), drains fully,
/// and records the entries in `model`.
pub async fn fill(cfg: &Config, range: std::ops::Range<u64>, model: &mut Model) {
    let (ti, _) = TierIndex::open(cfg.clone()).await.unwrap();
    for o in range.clone() {
        ti.append(
            format!("k{}", o % KEYS).as_bytes(),
            o,
            100,
            1_700_000_000_000 + o,
        )
        .unwrap();
    }
    ti.flush().unwrap();
    for o in range {
        model.entry(format!("k{}", o % KEYS)).or_default().push(o);
    }
    let r = ti.shutdown(Duration::from_secs(60)).await;
    assert!(r.fully_drained(), "{r:?}");
}

/// Nothing in the data directory's quarantine.
pub fn assert_nothing_quarantined(data: &Path) {
    let q = data.join("quarantine");
    let n = std::fs::read_dir(&q).map(|d| d.count()).unwrap_or(0);
    assert_eq!(n, 0, "{} holds quarantined files", q.display());
}

/// Every object of `before` is still there with the same bytes.
pub fn assert_kept(before: &BTreeMap<String, Vec<u8>>, now: &BTreeMap<String, Vec<u8>>) {
    for (k, bytes) in before {
        assert_eq!(now.get(k), Some(bytes), "{k} was deleted or changed");
    }
}

/// A data directory lost and re-created at the same path on the same
/// stream, with defaults. The old incarnation also left an upload it never
/// committed (an object above the manifest's ids; planted here). The new
/// directory's ids continue above both, nothing collides or is
/// quarantined, the old objects (the only copies) stay, and every old and
/// new entry is readable.
pub async fn lost_data_directory(t: &Target, tmp: &Path) {
    let data = tmp.join("data");
    let cfg = t.config(&data);
    let mut model = Model::new();
    fill(&cfg, 0..ITEMS as u64 * 4, &mut model).await;
    let old = t.objects().await;
    let old_max = *t.ids(&old).last().unwrap();
    // The old incarnation's uncommitted upload, two ids above its last.
    let planted_id = SegmentId(old_max.0 + 2);
    let entries: Vec<Entry> = (0..10u64)
        .map(|i| Entry {
            key_hash: tierindex::key_hash(b"planted"),
            offset: 900_000 + i,
            size: 1,
            timestamp_ms: 1,
        })
        .collect();
    let (bytes, meta) = build_sealed(planted_id, 1, 2, 64, &entries).unwrap();
    let store = t.store();
    let key = store.segment_key("stream-0", &meta);
    store.object_store().put(&key, bytes.into()).await.unwrap();
    let old = t.objects().await;

    std::fs::remove_dir_all(&data).unwrap();
    fill(&cfg, 10_000..10_000 + ITEMS as u64 * 3, &mut model).await;
    let now = t.objects().await;
    assert_kept(&old, &now);
    let new_ids: Vec<SegmentId> = t
        .ids(&now)
        .into_iter()
        .filter(|id| !t.ids(&old).contains(id))
        .collect();
    assert!(new_ids.len() >= 3, "{new_ids:?}");
    assert!(
        new_ids.iter().all(|id| *id > planted_id),
        "new ids {new_ids:?} must continue above the stream's highest, {planted_id}"
    );
    assert_nothing_quarantined(&data);
    t.assert_readable(&data, &model);
}

/// A backup of the data directory, taken early, restored over a directory
/// that went on writing: its ids continue above what the stream holds;
/// every entry (before the backup, after it, after the restore) is
/// readable; nothing is quarantined or lost.
pub async fn restored_backup(t: &Target, tmp: &Path) {
    let data = tmp.join("data");
    let backup = tmp.join("backup");
    let cfg = t.config(&data);
    let mut model = Model::new();
    fill(&cfg, 0..ITEMS as u64 * 2, &mut model).await;
    copy_dir(&data, &backup);
    fill(&cfg, 5_000..5_000 + ITEMS as u64 * 3, &mut model).await;
    let before = t.objects().await;
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::rename(&backup, &data).unwrap();
    fill(&cfg, 20_000..20_000 + ITEMS as u64 * 2, &mut model).await;
    let now = t.objects().await;
    assert_kept(&before, &now);
    assert_eq!(t.ids(&now).len(), now.len());
    assert!(now.len() >= before.len() + 2);
    assert_nothing_quarantined(&data);
    t.assert_readable(&data, &model);
}

/// Two data directories on one stream with default settings: while A
/// holds the stream, B's open is refused, naming A and its lease. Once A
/// shut down (lease released), B takes the stream and continues above A's
/// ids. Every entry of both is readable from either directory.
pub async fn two_directories(t: &Target, tmp: &Path) {
    let a = t.config(&tmp.join("a"));
    let b = t.config(&tmp.join("b"));
    let mut model = Model::new();
    let (ti, _) = TierIndex::open(a.clone()).await.unwrap();
    for o in 0..ITEMS as u64 * 3 {
        ti.append(
            format!("k{}", o % KEYS).as_bytes(),
            o,
            100,
            1_700_000_000_000 + o,
        )
        .unwrap();
        model.entry(format!("k{}", o % KEYS)).or_default().push(o);
    }
    ti.flush().unwrap();
    let msg = match TierIndex::open(b.clone()).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a second writer of a live stream was accepted"),
    };
    let holder = a.effective_owner_id().unwrap();
    assert!(
        msg.contains(&holder) && msg.contains("until"),
        "the refusal must name the holder {holder:?} and its lease: {msg}"
    );
    let r = ti.shutdown(Duration::from_secs(60)).await;
    assert!(r.fully_drained(), "{r:?}");
    let of_a = t.objects().await;
    fill(&b, 50_000..50_000 + ITEMS as u64 * 2, &mut model).await;
    let now = t.objects().await;
    assert_kept(&of_a, &now);
    let a_max = *t.ids(&of_a).last().unwrap();
    assert!(t.ids(&now).into_iter().filter(|id| *id > a_max).count() >= 2);
    assert_nothing_quarantined(&a.data_dir);
    assert_nothing_quarantined(&b.data_dir);
    t.assert_readable(&b.data_dir, &model);
    t.assert_readable(&a.data_dir, &model);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p: PathBuf = e.path();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}
