//! Uploading sealed segments through a fault-injecting store.
//!
//! Every test builds real sealed files with `build_sealed`, uploads them to
//! `InMemory` or `LocalFileSystem` behind `FaultyStore`, and checks the
//! end state against the local bytes: the object exists, its CRC equals
//! `file_crc`, and nothing was ever overwritten or deleted.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path;
use object_store::{
    Attribute, GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};
use tierindex::remote::probe::probe;
use tierindex::remote::{RemoteStore, StoreOptions};
use tierindex::segment::SealedMeta;
use tierindex::segment::sealed::build_sealed;
use tierindex::testing::{Fault, FaultyStore, Op};
use tierindex::upload::verify::{META_CRC, META_LEN};
use tierindex::upload::{
    NoHooks, PutOutcome, RemoteMatch, UploadConfig, UploadHooks, VerifyLevel, abort_multipart,
    put_segment, remote_matches, verify_segment,
};
use tierindex::{Entry, Error, SegmentId};

const STREAM: &str = "orders";

struct Seg {
    path: PathBuf,
    meta: SealedMeta,
    bytes: Vec<u8>,
}

/// A real sealed file of `items` entries, written to `dir`.
fn segment(dir: &FsPath, id: u64, items: u64) -> Seg {
    let entries: Vec<Entry> = (0..items)
        .map(|i| Entry {
            key_hash: tierindex::key_hash(&(i % 97).to_le_bytes()),
            offset: id * 1_000_000 + i,
            size: (i % 500) as u32 + 1,
            timestamp_ms: 1_700_000_000_000 + i,
        })
        .collect();
    let (bytes, meta) = build_sealed(SegmentId(id), 1, 2, 64, &entries).unwrap();
    let path = dir.join(format!("{id:020}.seg"));
    std::fs::write(&path, &bytes).unwrap();
    Seg { path, meta, bytes }
}

/// Fast retries so fault tests run in milliseconds.
fn cfg() -> UploadConfig {
    UploadConfig {
        max_attempts: 6,
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(10),
        request_timeout: Duration::from_millis(300),
        trust_conditional_create: true,
        ..UploadConfig::default()
    }
}

/// Multipart above 2 KiB, 1 KiB parts (InMemory takes parts of any size).
fn mp_cfg() -> UploadConfig {
    UploadConfig {
        multipart_threshold_bytes: 2048,
        part_size_bytes: 1024,
        ..cfg()
    }
}

async fn remote_body(f: &FaultyStore, key: &Path) -> Vec<u8> {
    f.inner()
        .get(key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

async fn put(store: &RemoteStore, seg: &Seg, cfg: &UploadConfig) -> tierindex::Result<PutOutcome> {
    let key = store.segment_key(STREAM, &seg.meta);
    put_segment(store, &key, &seg.path, &seg.meta, cfg, &mut NoHooks).await
}

/// The caller's view: an upload that ended retryable is tried again later.
async fn put_until_done(store: &RemoteStore, seg: &Seg, cfg: &UploadConfig) -> PutOutcome {
    for _ in 0..20 {
        match put(store, seg, cfg).await {
            Ok(o) => return o,
            Err(e) if e.is_retryable() => continue,
            Err(e) => panic!("segment {}: {e}", seg.meta.id),
        }
    }
    panic!("segment {} never uploaded", seg.meta.id)
}

fn assert_never_overwritten(f: &FaultyStore) {
    let s = f.stats();
    assert_eq!(s.overwrites, 0, "an object was overwritten: {s:?}");
    assert_eq!(s.deletes, 0, "an object was deleted: {s:?}");
}

/// A fresh memory store and a fresh local store (under `dir/store-{seed}`).
fn stores(dir: &FsPath, seed: u64) -> Vec<(Arc<FaultyStore>, RemoteStore)> {
    let mem = FaultyStore::memory(seed);
    let local_dir = dir.join(format!("store-{seed}"));
    std::fs::create_dir_all(&local_dir).unwrap();
    let local = FaultyStore::local(&local_dir, seed);
    vec![
        (mem.clone(), mem.remote("tier")),
        (local.clone(), local.remote("tier")),
    ]
}

// ---------------------------------------------------------------------------
// Happy path
// ---------------------------------------------------------------------------

#[tokio::test]
async fn upload_then_verify_at_every_level() {
    let d = tempfile::tempdir().unwrap();
    for (f, store) in stores(d.path(), 1) {
        let seg = segment(d.path(), 7, 300);
        let key = store.segment_key(STREAM, &seg.meta);
        assert_eq!(
            key.as_ref(),
            format!(
                "tier/orders/segments/00000000000000000007-{:016x}.seg",
                seg.meta.crc64.expect("format 2")
            )
        );
        assert_eq!(
            store.parse_segment_key(&key),
            Some((SegmentId(7), seg.meta.key_sum()))
        );
        let out = put(&store, &seg, &cfg()).await.unwrap();
        assert!(matches!(out, PutOutcome::Created { .. }), "{out:?}");
        assert_eq!(remote_body(&f, &key).await, seg.bytes);
        for level in [VerifyLevel::Full, VerifyLevel::Footer, VerifyLevel::Head] {
            verify_segment(&store, &key, &seg.meta, level)
                .await
                .unwrap();
        }
        assert_eq!(
            remote_matches(&store, &key, &seg.meta).await.unwrap(),
            RemoteMatch::Matches
        );
        assert_never_overwritten(&f);
    }
}

#[tokio::test]
async fn metadata_is_stored_where_the_store_keeps_it() {
    let d = tempfile::tempdir().unwrap();
    let seg = segment(d.path(), 1, 10);
    let stores = stores(d.path(), 1);
    for (f, store) in &stores {
        let key = store.segment_key(STREAM, &seg.meta);
        put(store, &seg, &cfg()).await.unwrap();
        let head = f
            .inner()
            .get_opts(&key, GetOptions::new().with_head(true))
            .await
            .unwrap();
        let crc = head
            .attributes
            .get(&Attribute::Metadata(META_CRC.into()))
            .map(|v| v.to_string());
        let len = head
            .attributes
            .get(&Attribute::Metadata(META_LEN.into()))
            .map(|v| v.to_string());
        if store.display_url().starts_with("memory://") {
            assert_eq!(crc, Some(format!("{:08x}", seg.meta.file_crc)));
            assert_eq!(len, Some(seg.meta.file_len.to_string()));
        } else {
            // LocalFileSystem refuses attributes: uploaded without them.
            assert!(!store.metadata_supported());
            assert_eq!((crc, len), (None, None));
        }
    }
}

#[tokio::test]
async fn local_file_that_does_not_match_meta_is_never_sent() {
    let d = tempfile::tempdir().unwrap();
    let f = FaultyStore::memory(1);
    let store = f.remote("");
    let seg = segment(d.path(), 3, 50);
    let mut bytes = seg.bytes.clone();
    bytes[200] ^= 0x20;
    std::fs::write(&seg.path, &bytes).unwrap();
    let err = put(&store, &seg, &cfg()).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert_eq!(f.stats().requests(Op::Put), 0);

    // A key of our layout that names another segment is refused too.
    let other = segment(d.path(), 4, 50);
    let wrong_key = store.segment_key(STREAM, &other.meta);
    let err = put_segment(
        &store,
        &wrong_key,
        &other.path,
        &seg.meta,
        &cfg(),
        &mut NoHooks,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert_eq!(f.stats().requests(Op::Put), 0);
}

// ---------------------------------------------------------------------------
// Fault classes, one at a time
// ---------------------------------------------------------------------------

#[tokio::test]
async fn each_put_fault_alone_is_survived() {
    let d = tempfile::tempdir().unwrap();
    let faults = [
        Fault::Unavailable,
        Fault::SlowDown,
        Fault::TooManyRequests,
        Fault::Timeout(Duration::from_secs(2)),
        Fault::ConnectionReset,
        Fault::CommitThenLoseAnswer,
        Fault::Latency(Duration::from_millis(20)),
    ];
    for (f, store) in stores(d.path(), 2) {
        for (i, fault) in faults.iter().enumerate() {
            let seg = segment(d.path(), 100 + i as u64, 40 + i as u64);
            let key = store.segment_key(STREAM, &seg.meta);
            f.fail_next(Op::Put, 2, fault.clone());
            let conflicts_before = f.stats().create_conflicts;
            let out = put(&store, &seg, &cfg())
                .await
                .unwrap_or_else(|e| panic!("{fault:?} on {store}: {e}"));
            if *fault == Fault::CommitThenLoseAnswer {
                // The first create committed; its retry met the object and
                // the content comparison made it a success.
                assert_eq!(out, PutOutcome::AlreadyPresent, "{store}");
                assert!(f.stats().create_conflicts > conflicts_before);
            } else {
                assert!(
                    matches!(out, PutOutcome::Created { .. }),
                    "{fault:?}: {out:?}"
                );
            }
            assert_eq!(
                remote_body(&f, &key).await,
                seg.bytes,
                "{fault:?} on {store}"
            );
        }
        assert_never_overwritten(&f);
    }
}

#[tokio::test]
async fn damaged_get_bodies_are_re_read_not_reported_corrupt() {
    let d = tempfile::tempdir().unwrap();
    for (f, store) in stores(d.path(), 3) {
        for (i, fault) in [Fault::TruncateBody, Fault::FlipBit]
            .into_iter()
            .enumerate()
        {
            let seg = segment(d.path(), 200 + i as u64, 500);
            let key = store.segment_key(STREAM, &seg.meta);
            put(&store, &seg, &cfg()).await.unwrap();
            // Every other read is damaged: no two consecutive reads agree on
            // a wrong content, so it is transport, not the object.
            f.fail_next(Op::Get, 1, fault.clone());
            verify_segment(&store, &key, &seg.meta, VerifyLevel::Full)
                .await
                .unwrap_or_else(|e| panic!("{fault:?} on {store}: {e}"));
            f.fail_next(Op::Get, 1, fault.clone());
            assert_eq!(
                remote_matches(&store, &key, &seg.meta).await.unwrap(),
                RemoteMatch::Matches
            );
        }
        assert_never_overwritten(&f);
    }
}

#[tokio::test]
async fn persistent_faults_end_retryable_after_max_attempts() {
    let d = tempfile::tempdir().unwrap();
    let f = FaultyStore::memory(4);
    let store = f.remote("");
    let seg = segment(d.path(), 1, 10);
    f.fail_next(Op::Put, 100, Fault::Unavailable);
    let err = put(&store, &seg, &cfg()).await.unwrap_err();
    assert!(matches!(err, Error::RemoteRetryable(_)), "{err}");
    assert_eq!(f.stats().requests(Op::Put), 6);
    let key = store.segment_key(STREAM, &seg.meta);
    assert!(f.inner().head(&key).await.is_err());

    // A hang is cut by the per-request deadline and counted as an attempt.
    f.heal();
    f.fail_next(Op::Put, 100, Fault::Timeout(Duration::from_secs(30)));
    let t0 = std::time::Instant::now();
    let err = put(&store, &seg, &cfg()).await.unwrap_err();
    assert!(matches!(err, Error::RemoteRetryable(_)), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn auth_errors_are_not_retried() {
    let d = tempfile::tempdir().unwrap();
    let f = FaultyStore::memory(5);
    let store = f.remote("");
    let seg = segment(d.path(), 1, 10);
    f.fail_next(Op::Put, 1, Fault::Forbidden);
    let err = put(&store, &seg, &cfg()).await.unwrap_err();
    assert!(matches!(err, Error::Remote(_)), "{err}");
    assert_eq!(f.stats().requests(Op::Put), 1);
}

// ---------------------------------------------------------------------------
// AlreadyExists: same content, different content
// ---------------------------------------------------------------------------

#[tokio::test]
async fn existing_identical_object_is_already_present() {
    let d = tempfile::tempdir().unwrap();
    for trust in [true, false] {
        for (f, store) in stores(d.path(), 60 + u64::from(trust)) {
            let c = UploadConfig {
                trust_conditional_create: trust,
                ..cfg()
            };
            let seg = segment(d.path(), 9, 30);
            let first = put(&store, &seg, &c).await.unwrap();
            assert!(matches!(first, PutOutcome::Created { .. }));
            assert_eq!(
                put(&store, &seg, &c).await.unwrap(),
                PutOutcome::AlreadyPresent
            );
            // Trusted: the create itself met the object. Untrusted: the HEAD
            // before it did, and no create was sent.
            assert_eq!(f.stats().create_conflicts, u64::from(trust), "{store}");
            assert_never_overwritten(&f);
        }
    }
}

#[tokio::test]
async fn existing_different_object_is_a_conflict_and_left_untouched() {
    let d = tempfile::tempdir().unwrap();
    for (i, (trust, c)) in [(true, cfg()), (false, cfg()), (true, mp_cfg())]
        .into_iter()
        .enumerate()
    {
        for (f, store) in stores(d.path(), 70 + i as u64) {
            let c = UploadConfig {
                trust_conditional_create: trust,
                ..c.clone()
            };
            let seg = segment(d.path(), 11, 200);
            let key = store.segment_key(STREAM, &seg.meta);
            let foreign = b"someone else's bytes".to_vec();
            f.inner()
                .put(&key, PutPayload::from(foreign.clone()))
                .await
                .unwrap();
            let err = put(&store, &seg, &c).await.unwrap_err();
            assert!(matches!(err, Error::RemoteConflict(_)), "{store}: {err}");
            assert_eq!(remote_body(&f, &key).await, foreign, "{store}");
            assert_eq!(f.stats().requests(Op::CreateMultipart), 0);
            assert_never_overwritten(&f);
        }
    }
}

// ---------------------------------------------------------------------------
// A store that ignores conditional writes (Garage)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn probe_reports_ignored_conditionals() {
    let f = FaultyStore::memory(8);
    f.ignore_conditionals(true);
    let caps = probe(&f.remote("p")).await.unwrap();
    assert!(!caps.conditional_create, "{caps:?}");
    assert!(!caps.conditional_update, "{caps:?}");
    assert!(
        caps.multipart && caps.range_get && caps.metadata,
        "{caps:?}"
    );
    assert!(
        caps.notes.iter().any(|n| n.contains("overwrite")),
        "{caps:?}"
    );

    let f = FaultyStore::memory(8);
    let caps = probe(&f.remote("p")).await.unwrap();
    assert!(
        caps.conditional_create && caps.conditional_update,
        "{caps:?}"
    );

    // Ceph RGW 16.2: creates honoured, every quoted If-Match refused (the
    // current e-tag too). Refusing the stale e-tag alone is not enough.
    let f = FaultyStore::memory(8);
    f.refuse_if_match(true);
    let caps = probe(&f.remote("p")).await.unwrap();
    assert!(caps.conditional_create, "{caps:?}");
    assert!(!caps.conditional_update, "{caps:?}");
    assert!(
        caps.notes
            .iter()
            .any(|n| n.contains("CURRENT e-tag was refused")),
        "{caps:?}"
    );
}

#[tokio::test]
async fn untrusted_create_never_overwrites_even_after_a_lost_answer() {
    let d = tempfile::tempdir().unwrap();
    let f = FaultyStore::memory(9);
    f.ignore_conditionals(true);
    let store = f.remote("");
    let untrusted = UploadConfig {
        trust_conditional_create: false,
        ..cfg()
    };
    let seg = segment(d.path(), 1, 30);
    f.fail_next(Op::Put, 1, Fault::CommitThenLoseAnswer);
    assert_eq!(
        put(&store, &seg, &untrusted).await.unwrap(),
        PutOutcome::AlreadyPresent
    );
    assert_eq!(
        f.stats().requests(Op::Put),
        1,
        "re-sent a create over our object"
    );

    let seg2 = segment(d.path(), 2, 30);
    let key2 = store.segment_key(STREAM, &seg2.meta);
    f.inner()
        .put(&key2, PutPayload::from_static(b"foreign"))
        .await
        .unwrap();
    let err = put(&store, &seg2, &untrusted).await.unwrap_err();
    assert!(matches!(err, Error::RemoteConflict(_)), "{err}");
    assert_never_overwritten(&f);
}

#[tokio::test]
async fn trusting_a_store_that_ignores_conditionals_overwrites() {
    // Why the probe matters: with trust set wrongly, a foreign object is
    // replaced. The FaultyStore counter makes that visible.
    let d = tempfile::tempdir().unwrap();
    let f = FaultyStore::memory(10);
    f.ignore_conditionals(true);
    let store = f.remote("");
    let seg = segment(d.path(), 1, 30);
    let key = store.segment_key(STREAM, &seg.meta);
    f.inner()
        .put(&key, PutPayload::from_static(b"foreign"))
        .await
        .unwrap();
    let out = put(&store, &seg, &cfg()).await.unwrap();
    assert!(matches!(out, PutOutcome::Created { .. }));
    assert_eq!(f.stats().overwrites, 1);
}

// ---------------------------------------------------------------------------
// Multipart
// ---------------------------------------------------------------------------

#[derive(Default)]
struct RecordingHooks {
    f: Option<Arc<FaultyStore>>,
    started: Vec<(String, u64)>,
    fail: bool,
}

impl UploadHooks for RecordingHooks {
    fn multipart_started(&mut self, upload_id: &str) -> tierindex::Result<()> {
        let parts = self.f.as_ref().map_or(0, |f| f.stats().parts_put);
        self.started.push((upload_id.to_string(), parts));
        if self.fail {
            return Err(Error::Fenced("journal says another owner".into()));
        }
        Ok(())
    }
}

#[tokio::test]
async fn in_memory_multipart_takes_small_parts() {
    // Checked, not assumed: InMemory has no 5 MiB part minimum, which is why
    // memory:// may use small parts and every other store may not.
    use object_store::multipart::MultipartStore;
    let mem = object_store::memory::InMemory::new();
    let p = Path::from("k");
    let id = mem.create_multipart(&p).await.unwrap();
    let a = mem
        .put_part(&p, &id, 0, PutPayload::from_static(b"ab"))
        .await
        .unwrap();
    let b = mem
        .put_part(&p, &id, 1, PutPayload::from_static(b"cd"))
        .await
        .unwrap();
    mem.complete_multipart(&p, &id, vec![a, b]).await.unwrap();
    assert_eq!(
        &mem.get(&p).await.unwrap().bytes().await.unwrap()[..],
        b"abcd"
    );

    let inner = Arc::new(object_store::memory::InMemory::new());
    let s3_like = FaultyStore::new(
        inner.clone(),
        Some(inner as Arc<dyn MultipartStore>),
        "s3://bucket",
        1,
    )
    .remote("");
    let err = mp_cfg().validate(&s3_like).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    mp_cfg()
        .validate(&FaultyStore::memory(1).remote(""))
        .unwrap();
}

#[tokio::test]
async fn multipart_upload_calls_hook_before_first_part() {
    let d = tempfile::tempdir().unwrap();
    let f = FaultyStore::memory(11);
    let store = f.remote("");
    let seg = segment(d.path(), 1, 400); // ~13 KiB -> 13 parts of 1 KiB
    let key = store.segment_key(STREAM, &seg.meta);
    let mut hooks = RecordingHooks {
        f: Some(f.clone()),
        ..Default::default()
    };
    let out = put_segment(&store, &key, &seg.path, &seg.meta, &mp_cfg(), &mut hooks)
        .await
        .unwrap();
    assert!(matches!(out, PutOutcome::Created { .. }));
    assert_eq!(hooks.started.len(), 1);
    assert_eq!(hooks.started[0].1, 0, "a part was sent before the hook");
    let parts = seg.meta.file_len.div_ceil(1024);
    assert_eq!(f.stats().parts_put, parts);
    assert_eq!(f.stats().requests(Op::Put), 0);
    assert_eq!(remote_body(&f, &key).await, seg.bytes);
    // Metadata travels with multipart objects too.
    verify_segment(&store, &key, &seg.meta, VerifyLevel::Head)
        .await
        .unwrap();
    assert_never_overwritten(&f);
}

#[tokio::test]
async fn multipart_survives_part_and_complete_faults() {
    let d = tempfile::tempdir().unwrap();
    let f = FaultyStore::memory(12);
    let store = f.remote("");
    let cases = [
        (Op::CreateMultipart, Fault::Unavailable),
        (Op::PutPart, Fault::Unavailable),
        (Op::PutPart, Fault::ConnectionReset),
        (Op::PutPart, Fault::CommitThenLoseAnswer),
        (Op::PutPart, Fault::Timeout(Duration::from_secs(2))),
        (Op::CompleteMultipart, Fault::SlowDown),
        (Op::CompleteMultipart, Fault::CommitThenLoseAnswer),
    ];
    for (i, (op, fault)) in cases.iter().enumerate() {
        let seg = segment(d.path(), 50 + i as u64, 150);
        let key = store.segment_key(STREAM, &seg.meta);
        f.fail_next(*op, 2, fault.clone());
        let out = put(&store, &seg, &mp_cfg())
            .await
            .unwrap_or_else(|e| panic!("{op:?} {fault:?}: {e}"));
        assert!(matches!(out, PutOutcome::Created { .. }), "{out:?}");
        assert_eq!(remote_body(&f, &key).await, seg.bytes, "{op:?} {fault:?}");
    }
    assert_never_overwritten(&f);
}

#[tokio::test]
async fn multipart_existing_object_is_settled_without_a_new_upload() {
    let d = tempfile::tempdir().unwrap();
    let f = FaultyStore::memory(13);
    let store = f.remote("");
    let seg = segment(d.path(), 1, 150);
    put(&store, &seg, &mp_cfg()).await.unwrap();
    let created = f.stats().requests(Op::CreateMultipart);
    assert_eq!(
        put(&store, &seg, &mp_cfg()).await.unwrap(),
        PutOutcome::AlreadyPresent
    );
    assert_eq!(f.stats().requests(Op::CreateMultipart), created);
    assert_never_overwritten(&f);
}

#[tokio::test]
async fn failing_hook_aborts_the_upload() {
    let d = tempfile::tempdir().unwrap();
    let f = FaultyStore::memory(14);
    let store = f.remote("");
    let seg = segment(d.path(), 1, 150);
    let key = store.segment_key(STREAM, &seg.meta);
    let mut hooks = RecordingHooks {
        fail: true,
        ..Default::default()
    };
    let err = put_segment(&store, &key, &seg.path, &seg.meta, &mp_cfg(), &mut hooks)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Fenced(_)), "{err}");
    let s = f.stats();
    assert_eq!(s.parts_put, 0);
    assert_eq!(s.requests(Op::AbortMultipart), 1);
    assert!(f.inner().head(&key).await.is_err());
    // The journal would hold the id; aborting it again is harmless.
    abort_multipart(&store, &key, &hooks.started[0].0)
        .await
        .unwrap();
}

#[tokio::test]
async fn abort_multipart_is_idempotent() {
    let f = FaultyStore::memory(15);
    let store = f.remote("");
    let key = Path::from("k");
    let mp = store.multipart().unwrap().clone();
    let id = mp.create_multipart(&key).await.unwrap();
    mp.put_part(&key, &id, 0, PutPayload::from_static(b"x"))
        .await
        .unwrap();
    f.fail_next(Op::AbortMultipart, 1, Fault::Unavailable);
    abort_multipart(&store, &key, &id).await.unwrap();
    abort_multipart(&store, &key, &id).await.unwrap();
    abort_multipart(&store, &key, "no-such-upload")
        .await
        .unwrap();
    // After an abort the id cannot be completed.
    assert!(mp.complete_multipart(&key, &id, vec![]).await.is_err());
    // No multipart API (file://): nothing to abort.
    let d = tempfile::tempdir().unwrap();
    let local = FaultyStore::local(d.path(), 1).remote("");
    abort_multipart(&local, &key, "whatever").await.unwrap();
}

#[tokio::test]
async fn without_multipart_api_large_files_go_as_one_put() {
    let d = tempfile::tempdir().unwrap();
    let sd = d.path().join("store");
    std::fs::create_dir_all(&sd).unwrap();
    let f = FaultyStore::local(&sd, 16);
    let store = f.remote("");
    let seg = segment(d.path(), 1, 150);
    // part size must be >= 5 MiB for file://; threshold tiny.
    let c = UploadConfig {
        multipart_threshold_bytes: 1024,
        ..cfg()
    };
    put(&store, &seg, &c).await.unwrap();
    assert_eq!(f.stats().requests(Op::Put), 1);
    assert_eq!(f.stats().requests(Op::CreateMultipart), 0);
}

// ---------------------------------------------------------------------------
// Verification catches damage (and what each level misses)
// ---------------------------------------------------------------------------

fn is_corrupt(r: tierindex::Result<()>) -> bool {
    matches!(r, Err(Error::Corrupt { .. }))
}

#[tokio::test]
async fn verify_catches_deleted_truncated_and_flipped_objects() {
    let d = tempfile::tempdir().unwrap();
    for (f, store) in stores(d.path(), 17) {
        let levels = [VerifyLevel::Full, VerifyLevel::Footer, VerifyLevel::Head];

        // Deleted.
        let seg = segment(d.path(), 1, 200);
        let key = store.segment_key(STREAM, &seg.meta);
        put(&store, &seg, &cfg()).await.unwrap();
        f.inner().delete(&key).await.unwrap();
        for l in levels {
            let r = verify_segment(&store, &key, &seg.meta, l).await;
            assert!(is_corrupt(r), "{store} {l:?}");
        }
        let err = verify_segment(&store, &key, &seg.meta, VerifyLevel::Full)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert_eq!(
            remote_matches(&store, &key, &seg.meta).await.unwrap(),
            RemoteMatch::Missing
        );

        // Truncated (by a foreign writer or a broken server): every level.
        let seg = segment(d.path(), 2, 200);
        let key = store.segment_key(STREAM, &seg.meta);
        put(&store, &seg, &cfg()).await.unwrap();
        f.tamper(&key, |b| b.truncate(b.len() - 10)).await;
        for l in levels {
            let r = verify_segment(&store, &key, &seg.meta, l).await;
            assert!(is_corrupt(r), "{store} {l:?}");
        }
        assert!(matches!(
            remote_matches(&store, &key, &seg.meta).await.unwrap(),
            RemoteMatch::Differs(_)
        ));

        // One bit flipped in the middle, same size, metadata kept: only
        // Full sees it. Footer and Head pass, as documented.
        let seg = segment(d.path(), 3, 200);
        let key = store.segment_key(STREAM, &seg.meta);
        put(&store, &seg, &cfg()).await.unwrap();
        let mid = seg.bytes.len() / 2;
        f.tamper(&key, |b| b[mid] ^= 0x01).await;
        assert!(is_corrupt(
            verify_segment(&store, &key, &seg.meta, VerifyLevel::Full).await
        ));
        verify_segment(&store, &key, &seg.meta, VerifyLevel::Footer)
            .await
            .expect("Footer level does not read the middle");
        verify_segment(&store, &key, &seg.meta, VerifyLevel::Head)
            .await
            .expect("Head level misses a same-size bit flip");
        assert!(matches!(
            remote_matches(&store, &key, &seg.meta).await.unwrap(),
            RemoteMatch::Differs(_)
        ));

        // A flip inside the footer: Footer level catches it, Head does not.
        let seg = segment(d.path(), 4, 200);
        let key = store.segment_key(STREAM, &seg.meta);
        put(&store, &seg, &cfg()).await.unwrap();
        let at = seg.bytes.len() - 40;
        f.tamper(&key, |b| b[at] ^= 0x80).await;
        assert!(is_corrupt(
            verify_segment(&store, &key, &seg.meta, VerifyLevel::Footer).await
        ));
        verify_segment(&store, &key, &seg.meta, VerifyLevel::Head)
            .await
            .expect("Head level misses a same-size bit flip");
        assert_never_overwritten(&f);
    }
}

#[tokio::test]
async fn head_level_needs_our_metadata_where_the_store_keeps_it() {
    let d = tempfile::tempdir().unwrap();
    let f = FaultyStore::memory(18);
    let store = f.remote("");
    let seg = segment(d.path(), 1, 50);
    let key = store.segment_key(STREAM, &seg.meta);
    // Same bytes, written without our metadata (another tool): Head level
    // has no evidence and says so; Full checks the body and passes.
    f.inner()
        .put_opts(
            &key,
            PutPayload::from(seg.bytes.clone()),
            PutOptions::from(PutMode::Create),
        )
        .await
        .unwrap();
    assert!(is_corrupt(
        verify_segment(&store, &key, &seg.meta, VerifyLevel::Head).await
    ));
    verify_segment(&store, &key, &seg.meta, VerifyLevel::Full)
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------
// Random mix over many segments
// ---------------------------------------------------------------------------

async fn random_mix(seed: u64) {
    let d = tempfile::tempdir().unwrap();
    let all_faults = vec![
        Fault::Unavailable,
        Fault::SlowDown,
        Fault::TooManyRequests,
        Fault::Timeout(Duration::from_millis(400)),
        Fault::ConnectionReset,
        Fault::CommitThenLoseAnswer,
        Fault::Latency(Duration::from_millis(3)),
        Fault::TruncateBody,
        Fault::FlipBit,
    ];
    for (f, store) in stores(d.path(), seed) {
        f.set_random(0.3, all_faults.clone(), &Op::ALL);
        let segs: Vec<Seg> = (0..40)
            .map(|i| segment(d.path(), 1000 + i, 20 + (i * 37) % 200))
            .collect();
        let mut already = 0;
        for (i, seg) in segs.iter().enumerate() {
            // Alternate single-PUT and multipart-sized configurations.
            let c = if i % 2 == 0 { cfg() } else { mp_cfg() };
            if put_until_done(&store, seg, &c).await == PutOutcome::AlreadyPresent {
                already += 1;
            }
        }
        let injected = f.stats().injected;
        assert!(injected > 20, "too few faults to mean anything: {injected}");
        f.heal();
        for seg in &segs {
            let key = store.segment_key(STREAM, &seg.meta);
            let body = remote_body(&f, &key).await;
            assert_eq!(crc32fast::hash(&body), seg.meta.file_crc, "{store} {key}");
            assert_eq!(body, seg.bytes);
            verify_segment(&store, &key, &seg.meta, VerifyLevel::Full)
                .await
                .unwrap();
        }
        assert_never_overwritten(&f);
        eprintln!(
            "seed {seed} {store}: {injected} faults, {already} AlreadyPresent, {:?}",
            f.stats()
        );
    }
}

#[tokio::test]
async fn random_fault_mix_seed_1() {
    random_mix(1).await;
}

#[tokio::test]
async fn random_fault_mix_seed_2() {
    random_mix(0x5eed).await;
}

// ---------------------------------------------------------------------------
// Store construction and secrets
// ---------------------------------------------------------------------------

#[tokio::test]
async fn from_url_memory_and_file_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let seg = segment(d.path(), 1, 50);
    let url = url::Url::from_directory_path(d.path().join("objs")).unwrap();
    for u in ["memory://pre/fix", url.as_str()] {
        let store = RemoteStore::from_url(u, &StoreOptions::default()).unwrap();
        let out = put(&store, &seg, &cfg()).await.unwrap();
        assert!(matches!(out, PutOutcome::Created { .. }));
        assert_eq!(
            put(&store, &seg, &cfg()).await.unwrap(),
            PutOutcome::AlreadyPresent
        );
        let key = store.segment_key(STREAM, &seg.meta);
        verify_segment(&store, &key, &seg.meta, VerifyLevel::Full)
            .await
            .unwrap();
    }
    assert!(
        d.path()
            .join("objs/orders/segments")
            .join(format!("{:020}-{}.seg", 1, seg.meta.key_sum()))
            .is_file()
    );
}

const SECRET: &str = "tierindexTEST/secret+KEY=do-not-log-0123456789";
const CHILD_ENV: &str = "TIERINDEX_SECRET_LEAK_CHILD";

/// Runs in a child process (see `credentials_never_leak`) with real `AWS_*`
/// variables set, against a closed loopback port, with tracing at TRACE to
/// stdout. Everything it can print goes to stdout for the parent to scan.
#[tokio::test]
async fn secret_leak_child() {
    if std::env::var(CHILD_ENV).is_err() {
        return; // only meaningful inside the child process
    }
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(std::io::stdout)
        .try_init();
    let opts = StoreOptions {
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        ..StoreOptions::default()
    };
    let store = RemoteStore::from_url("s3://leak-bucket/pre", &opts).unwrap();
    println!("DEBUG {store:?}");
    println!("DISPLAY {store}");
    println!("URL {}", store.display_url());
    let d = tempfile::tempdir().unwrap();
    let seg = segment(d.path(), 1, 10);
    let c = UploadConfig {
        max_attempts: 2,
        request_timeout: Duration::from_secs(10),
        ..cfg()
    };
    let err = put(&store, &seg, &c).await.unwrap_err();
    println!("PUT-ERROR {err}");
    println!("PUT-ERROR-DEBUG {err:?}");
    let err = probe(&store).await.unwrap_err();
    println!("PROBE-ERROR {err} {err:?}");
    let key = store.segment_key(STREAM, &seg.meta);
    let err = verify_segment(&store, &key, &seg.meta, VerifyLevel::Head)
        .await
        .unwrap_err();
    println!("VERIFY-ERROR {err} {err:?}");
    let err = RemoteStore::from_url(&format!("s3://AKID:{SECRET}@bucket/p"), &opts).unwrap_err();
    println!("URL-ERROR {err} {err:?}");
    println!("CHILD-DONE");
}

#[test]
fn credentials_never_leak() {
    // Nobody listens on port 1 (privileged, unused): connections are
    // refused. A port freed by a dropped listener could be taken meanwhile.
    let port = 1;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "secret_leak_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .env("AWS_ACCESS_KEY_ID", "AKIDTIERINDEXTEST")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_SESSION_TOKEN", format!("{SECRET}-session"))
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("AWS_REGION", "us-east-1")
        .env_remove("AWS_ENDPOINT")
        .env_remove("AWS_ALLOW_HTTP")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("CHILD-DONE"),
        "child did not run:\n{stdout}"
    );
    assert!(stdout.contains("s3://leak-bucket/pre"), "{stdout}");
    assert!(stdout.contains("PUT-ERROR"), "{stdout}");
    for text in [&stdout, &stderr] {
        assert!(!text.contains(SECRET), "secret leaked:\n{text}");
        // The URL-encoded form must not appear either.
        assert!(!text.contains("secret%2BKEY"), "secret leaked:\n{text}");
    }
}

// ---------------------------------------------------------------------------
// A real S3-compatible server, when one is configured
// ---------------------------------------------------------------------------

/// Needs `TIERINDEX_TEST_S3_URL` (e.g. `s3://tierindex-test/ci`) naming an
/// existing bucket; credentials and endpoint come from the usual `AWS_*`
/// variables. `#[ignore]`d, so a plain `cargo test` reports it as ignored
/// instead of passing it without a server; run with `--ignored`, where a
/// missing URL fails. For example, with moto:
///
/// ```text
/// moto_server -H 127.0.0.1 -p 5077 &
/// curl -X PUT http://127.0.0.1:5077/tierindex-test
/// AWS_ENDPOINT_URL=http://127.0.0.1:5077 AWS_ACCESS_KEY_ID=k AWS_SECRET_ACCESS_KEY=s \
///   TIERINDEX_TEST_S3_URL=s3://tierindex-test/ci cargo test --test upload_faults real_s3 -- --ignored
/// ```
#[tokio::test]
#[ignore = "needs a real S3 server: set TIERINDEX_TEST_S3_URL and run with --ignored"]
async fn real_s3_round_trip_when_configured() {
    let Ok(url) = std::env::var("TIERINDEX_TEST_S3_URL") else {
        panic!(
            "TIERINDEX_TEST_S3_URL is not set: this test needs a real S3 server (see its doc comment)"
        );
    };
    let base = RemoteStore::from_url(&url, &StoreOptions::default()).unwrap();
    let caps = probe(&base).await.unwrap();
    eprintln!(
        "{} capabilities: {}",
        base,
        serde_json::to_string(&caps).unwrap()
    );
    assert!(
        caps.range_get && caps.metadata && caps.multipart,
        "{caps:?}"
    );
    // A fresh sub-prefix per run keeps runs independent.
    let run = format!("{url}/run-{:016x}", fastrand::u64(..));
    let store = RemoteStore::from_url(&run, &StoreOptions::default()).unwrap();
    let c = UploadConfig {
        multipart_threshold_bytes: 5 * 1024 * 1024,
        part_size_bytes: 5 * 1024 * 1024,
        trust_conditional_create: caps.conditional_create,
        ..UploadConfig::default()
    };
    let d = tempfile::tempdir().unwrap();
    // ~50 KiB single PUT, ~6.4 MiB multipart (two parts).
    for seg in [segment(d.path(), 1, 1_500), segment(d.path(), 2, 200_000)] {
        let key = store.segment_key(STREAM, &seg.meta);
        let out = put(&store, &seg, &c).await.unwrap();
        assert!(matches!(out, PutOutcome::Created { .. }), "{out:?}");
        assert_eq!(
            put(&store, &seg, &c).await.unwrap(),
            PutOutcome::AlreadyPresent
        );
        for level in [VerifyLevel::Full, VerifyLevel::Footer, VerifyLevel::Head] {
            verify_segment(&store, &key, &seg.meta, level)
                .await
                .unwrap();
        }
        // The metadata really went over the wire as x-amz-meta-* and comes
        // back on a HEAD.
        let head = store
            .object_store()
            .get_opts(&key, GetOptions::new().with_head(true))
            .await
            .unwrap();
        assert_eq!(
            head.attributes
                .get(&Attribute::Metadata(META_CRC.into()))
                .map(|v| v.to_string()),
            Some(format!("{:08x}", seg.meta.file_crc))
        );
    }
    let seg = segment(d.path(), 3, 100);
    let key = store.segment_key(STREAM, &seg.meta);
    store
        .object_store()
        .put(&key, PutPayload::from_static(b"foreign"))
        .await
        .unwrap();
    let err = put(&store, &seg, &c).await.unwrap_err();
    assert!(matches!(err, Error::RemoteConflict(_)), "{err}");
}
