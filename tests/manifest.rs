//! The remote manifest: ownership epochs, leases, fencing, lost answers,
//! corruption and chunk spill, on `InMemory` and on `LocalFileSystem`.
//!
//! Time is a `ManualClock`: a "paused" owner is one whose clock reading is
//! left behind while another owner's clock moves past its lease. Every test
//! checks what the store holds afterwards (decoded versions, entries), not
//! just that calls returned `Ok`.

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tierindex::remote::lease::ManualClock;
use tierindex::remote::manifest::{
    CommitOutcome, DAMAGE_REASON_MAX, DamageNote, Manifest, ManifestOptions, ManifestStore,
    ManifestWriter, SegmentEntry, decode_manifest, parse_version_name,
};
use tierindex::remote::probe::probe;
use tierindex::remote::{RemoteStore, StoreOptions};
use tierindex::retry::RetryPolicy;
use tierindex::segment::SealedMeta;
use tierindex::testing::{Fault, FaultyStore, Op};
use tierindex::{Error, SegmentId};

const STREAM: &str = "orders";
const TTL: Duration = Duration::from_secs(30);
const T0: u64 = 1_700_000_000_000;

#[derive(Copy, Clone, Debug)]
enum Backend {
    /// `InMemory` behind `FaultyStore` (supports every fault).
    Memory,
    /// `LocalFileSystem` in a tempdir behind `FaultyStore`.
    Local,
    /// `file://` through `RemoteStore::from_url` (fsync on), no wrapper.
    FileUrl,
}

const BACKENDS: [Backend; 3] = [Backend::Memory, Backend::Local, Backend::FileUrl];

struct Env {
    faulty: Option<Arc<FaultyStore>>,
    remote: RemoteStore,
    clock: ManualClock,
    _dir: Option<tempfile::TempDir>,
}

impl Env {
    fn new(b: Backend) -> Env {
        let clock = ManualClock::new(T0);
        match b {
            Backend::Memory => {
                let f = FaultyStore::memory(7);
                let remote = f.remote("tier");
                Env {
                    faulty: Some(f),
                    remote,
                    clock,
                    _dir: None,
                }
            }
            Backend::Local => {
                let d = tempfile::tempdir().unwrap();
                let f = FaultyStore::local(d.path(), 7);
                let remote = f.remote("tier");
                Env {
                    faulty: Some(f),
                    remote,
                    clock,
                    _dir: Some(d),
                }
            }
            Backend::FileUrl => {
                let d = tempfile::tempdir().unwrap();
                let url = url::Url::from_directory_path(d.path()).unwrap();
                let remote = RemoteStore::from_url(url.as_str(), &StoreOptions::default()).unwrap();
                Env {
                    faulty: None,
                    remote,
                    clock,
                    _dir: Some(d),
                }
            }
        }
    }

    fn faulty(&self) -> &Arc<FaultyStore> {
        self.faulty.as_ref().expect("a FaultyStore backend")
    }

    async fn open(&self, opts: ManifestOptions) -> ManifestStore {
        let caps = probe(&self.remote).await.unwrap();
        ManifestStore::with_capabilities(
            &self.remote,
            STREAM,
            opts,
            &caps,
            Arc::new(self.clock.clone()),
        )
        .unwrap()
    }

    /// Opens with a clock of its own (a second process).
    async fn open_with(&self, opts: ManifestOptions, clock: &ManualClock) -> ManifestStore {
        let caps = probe(&self.remote).await.unwrap();
        ManifestStore::with_capabilities(&self.remote, STREAM, opts, &caps, Arc::new(clock.clone()))
            .unwrap()
    }

    fn entry(&self, id: u64) -> SegmentEntry {
        SegmentEntry::new(&self.remote, STREAM, &meta(id)).unwrap()
    }

    /// Every version object that exists now, decoded (must all decode).
    async fn versions(&self, ms: &ManifestStore) -> Vec<Manifest> {
        let listed: Vec<_> = self
            .remote
            .object_store()
            .list(Some(&ms.versions_dir()))
            .try_collect()
            .await
            .unwrap();
        let mut out = Vec::new();
        for m in listed {
            let Some(v) = m.location.filename().and_then(parse_version_name) else {
                continue;
            };
            let bytes = self
                .remote
                .object_store()
                .get(&m.location)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            out.push(decode_manifest(&bytes, STREAM, v, 64 << 20).unwrap());
        }
        out.sort_by_key(|m| m.version);
        out
    }
}

fn meta(id: u64) -> SealedMeta {
    SealedMeta {
        id: SegmentId(id),
        file_len: 1_000 + id,
        file_crc: crc32fast::hash(&id.to_le_bytes()),
        crc64: None,
        item_count: 10,
        min_ts: T0 + id * 10,
        max_ts: T0 + id * 10 + 9,
        min_offset: id * 100,
        max_offset: id * 100 + 9,
        created_ms: T0,
        sealed_ms: T0,
    }
}

fn opts() -> ManifestOptions {
    ManifestOptions {
        retry: RetryPolicy {
            max_attempts: 5,
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(5),
            request_timeout: Duration::from_secs(20),
        },
        ..ManifestOptions::default()
    }
}

async fn ids(ms: &ManifestStore) -> Vec<u64> {
    let m = ms.load().await.unwrap().expect("a manifest");
    ms.all_segments(&m)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id.0)
        .collect()
}

fn assert_fenced<T: std::fmt::Debug>(r: Result<T, Error>, needles: &[&str]) {
    match r {
        Err(Error::Fenced(msg)) => {
            for n in needles {
                assert!(msg.contains(n), "{n:?} not in {msg:?}");
            }
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
}

fn assert_claimed<T: std::fmt::Debug>(r: Result<T, Error>, needles: &[&str]) {
    match r {
        Err(Error::Claimed(msg)) => {
            for n in needles {
                assert!(msg.contains(n), "{n:?} not in {msg:?}");
            }
        }
        other => panic!("expected Claimed, got {other:?}"),
    }
}

/// No version object was ever written twice (FaultyStore backends).
fn assert_no_overwrites(env: &Env) {
    if let Some(f) = &env.faulty {
        assert!(f.overwrites().is_empty(), "{:?}", f.overwrites());
        assert_eq!(f.stats().create_replaced, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_owners_exactly_one_wins_per_epoch() {
    for b in BACKENDS {
        let env = Env::new(b);
        let ms = env.open(opts()).await;
        for round in 1..=4u64 {
            // Hold every create back a little so that all takers read the
            // same version before any of them writes: a real race, not
            // eight takes in a row.
            let conflicts_before = env.faulty.as_ref().map(|f| f.stats().create_conflicts);
            if let Some(f) = &env.faulty {
                f.fail_next(Op::Put, 8, Fault::Latency(Duration::from_millis(100)));
            }
            let mut tasks = Vec::new();
            for i in 0..8 {
                let ms = ms.clone();
                tasks.push(tokio::spawn(async move {
                    let owner = format!("r{round}-o{i}");
                    (owner.clone(), ms.take_ownership(&owner, TTL).await)
                }));
            }
            let mut winners = Vec::new();
            let mut refused = Vec::new();
            for t in tasks {
                match t.await.unwrap() {
                    (owner, Ok(w)) => winners.push((owner, w)),
                    (_, Err(Error::Claimed(msg))) => refused.push(msg),
                    (owner, Err(e)) => panic!("{b:?} round {round}: {owner}: {e}"),
                }
            }
            assert_eq!(winners.len(), 1, "{b:?} round {round}: {refused:?}");
            assert_eq!(refused.len(), 7, "{b:?} round {round}");
            if let (Some(f), Some(before)) = (&env.faulty, conflicts_before) {
                // All seven losers lost the create of the same version.
                assert_eq!(
                    f.stats().create_conflicts - before,
                    7,
                    "{b:?} round {round}"
                );
            }
            let (owner, w) = winners.pop().unwrap();
            assert_eq!(w.epoch(), round, "{b:?}");
            for msg in &refused {
                assert!(msg.contains(&format!("{owner:?}")), "{msg}");
            }
            let m = ms.load().await.unwrap().unwrap();
            assert_eq!(m.epoch, round);
            assert_eq!(m.lease.as_ref().unwrap().owner, owner);
            // Let the lease lapse so the next round races again.
            env.clock.advance(TTL);
        }
        // One version per take; no version object written twice.
        let vs = env.versions(&ms).await;
        assert_eq!(vs.last().unwrap().version, 4, "{b:?}");
        let epochs: Vec<u64> = vs.iter().map(|m| m.epoch).collect();
        assert_eq!(epochs, vec![1, 2, 3, 4], "{b:?}");
        assert_no_overwrites(&env);
    }
}

#[tokio::test]
async fn paused_owner_is_fenced_after_takeover_and_nothing_it_writes_appears() {
    for b in BACKENDS {
        let env = Env::new(b);
        let ms = env.open(opts()).await;
        let mut a = ms
            .take_ownership("a", Duration::from_secs(10))
            .await
            .unwrap();
        a.commit(&[env.entry(1)]).await.unwrap();

        // A "pauses"; its lease runs out and B takes over.
        env.clock.advance(Duration::from_secs(11));
        let mut bw = ms.take_ownership("b", TTL).await.unwrap();
        assert_eq!(bw.epoch(), 2);

        // A wakes up and carries on as if nothing happened.
        assert_fenced(a.commit(&[env.entry(2)]).await, &["epoch 2", "\"b\""]);
        assert_fenced(a.commit(&[env.entry(3)]).await, &[]);
        assert_fenced(a.renew(TTL).await, &[]);

        bw.commit(&[env.entry(4)]).await.unwrap();
        assert_eq!(ids(&ms).await, vec![1, 4], "{b:?}");
        // No version object anywhere lists A's late entries.
        for v in env.versions(&ms).await {
            assert!(
                v.segments.iter().all(|e| e.id.0 != 2 && e.id.0 != 3),
                "{b:?}: {v:?}"
            );
        }
        assert_no_overwrites(&env);
    }
}

#[tokio::test]
async fn paused_owner_is_fenced_even_when_its_next_slot_was_cleaned_up() {
    for b in BACKENDS {
        let env = Env::new(b);
        let o = ManifestOptions {
            keep_versions: 3,
            ..opts()
        };
        let ms = env.open(o).await;
        let mut a = ms
            .take_ownership("a", Duration::from_secs(10))
            .await
            .unwrap(); // version 1
        env.clock.advance(Duration::from_secs(11));
        let mut bw = ms.take_ownership("b", TTL).await.unwrap(); // version 2
        for id in 10..18 {
            bw.commit(&[env.entry(id)]).await.unwrap(); // versions 3..=10
        }
        let before: Vec<u64> = env.versions(&ms).await.iter().map(|m| m.version).collect();
        assert_eq!(before, vec![8, 9, 10], "{b:?}: old versions trimmed");

        // A's next slot (version 2) is free again: its create succeeds, and
        // must still be withdrawn.
        assert_fenced(a.commit(&[env.entry(1)]).await, &["epoch 2"]);
        let after: Vec<u64> = env.versions(&ms).await.iter().map(|m| m.version).collect();
        assert_eq!(after, before, "{b:?}: the void version is gone");
        assert_eq!(ids(&ms).await, (10..18).collect::<Vec<_>>());
        assert_eq!(ms.load().await.unwrap().unwrap().epoch, 2);
    }
}

#[tokio::test]
async fn lease_expiry_allows_takeover_and_a_live_lease_does_not() {
    for b in BACKENDS {
        let env = Env::new(b);
        let ms = env.open(opts()).await;
        let mut a = ms.take_ownership("a", TTL).await.unwrap();
        assert_eq!(a.lease_expires_ms(), T0 + 30_000);

        env.clock.set(T0 + 29_999);
        assert_claimed(
            ms.take_ownership("b", TTL).await,
            &["\"a\"", "epoch 1", "2023-11-14T22:13:50.000Z", "in 1ms"],
        );

        // Renewal moves the expiry.
        env.clock.set(T0 + 20_000);
        a.renew(TTL).await.unwrap();
        assert_eq!(a.lease_expires_ms(), T0 + 50_000);
        env.clock.set(T0 + 49_000);
        assert_claimed(ms.take_ownership("b", TTL).await, &["\"a\""]);
        assert_eq!(ms.load().await.unwrap().unwrap().epoch, 1);

        // Expired: taken, with the next epoch; A is fenced.
        env.clock.set(T0 + 50_000);
        let bw = ms.take_ownership("b", TTL).await.unwrap();
        assert_eq!(bw.epoch(), 2);
        assert_fenced(a.commit(&[env.entry(1)]).await, &["epoch 2"]);

        // Release: the next owner need not wait.
        bw.release().await.unwrap();
        let m = ms.load().await.unwrap().unwrap();
        assert_eq!((m.epoch, m.lease.is_none()), (2, true));
        let mut c = ms.take_ownership("c", TTL).await.unwrap();
        assert_eq!(c.epoch(), 3);
        c.commit(&[env.entry(5)]).await.unwrap();

        // The same owner id re-taking a live lease (a restart) bumps the
        // epoch and fences the previous incarnation.
        let mut c2 = ms.take_ownership("c", TTL).await.unwrap();
        assert_eq!(c2.epoch(), 4);
        assert_fenced(c.commit(&[env.entry(6)]).await, &["epoch 4"]);
        c2.commit(&[env.entry(7)]).await.unwrap();
        assert_eq!(ids(&ms).await, vec![5, 7]);
        assert_no_overwrites(&env);
    }
}

#[tokio::test]
async fn a_renewed_lease_survives_a_pause_shorter_than_its_ttl() {
    // Two processes with their own clocks: B's clock has moved on, A's lease
    // (renewed) is still live by B's clock, so B is refused.
    let env = Env::new(Backend::Memory);
    let clock_b = ManualClock::new(T0);
    let ms_a = env.open(opts()).await;
    let ms_b = env.open_with(opts(), &clock_b).await;
    let mut a = ms_a.take_ownership("a", TTL).await.unwrap();
    env.clock.advance(Duration::from_secs(25));
    a.renew(TTL).await.unwrap();
    clock_b.set(T0 + 40_000);
    assert_claimed(ms_b.take_ownership("b", TTL).await, &["\"a\""]);
    clock_b.set(T0 + 55_000);
    let mut b = ms_b.take_ownership("b", TTL).await.unwrap();
    b.commit(&[env.entry(1)]).await.unwrap();
    assert_fenced(a.commit(&[env.entry(2)]).await, &["\"b\""]);
    assert_eq!(ids(&ms_a).await, vec![1]);
}

#[tokio::test]
async fn lost_answers_settle_without_duplicate_or_lost_entries() {
    for b in [Backend::Memory, Backend::Local] {
        let env = Env::new(b);
        let f = env.faulty().clone();
        let ms = env.open(opts()).await;

        // Lost answer on the take: still epoch 1, one version.
        f.fail_next(Op::Put, 1, Fault::CommitThenLoseAnswer);
        let mut w = ms.take_ownership("a", TTL).await.unwrap();
        assert_eq!((w.epoch(), w.manifest().version), (1, 1), "{b:?}");

        // Lost answer on a commit, settled inside the call by the retry.
        f.fail_next(Op::Put, 1, Fault::CommitThenLoseAnswer);
        let r = w.commit(&[env.entry(1), env.entry(2)]).await.unwrap();
        assert_eq!(
            r,
            CommitOutcome::Committed {
                version: 2,
                added: 2
            }
        );

        // Lost answer, then the retries fail: the call errs although the
        // version is in. The caller's retry (clock moved: other bytes) must
        // find its entries instead of adding them again.
        f.fail_next(Op::Put, 1, Fault::CommitThenLoseAnswer);
        f.fail_next(Op::Put, 4, Fault::Unavailable);
        let r = w.commit(&[env.entry(3)]).await;
        assert!(matches!(r, Err(Error::RemoteRetryable(_))), "{b:?}: {r:?}");
        env.clock.advance(Duration::from_secs(1));
        let r = w.commit(&[env.entry(3)]).await.unwrap();
        assert_eq!(r, CommitOutcome::AlreadyCommitted { version: 3 });

        // Same with a commit of something else after the unseen success.
        f.fail_next(Op::Put, 1, Fault::CommitThenLoseAnswer);
        f.fail_next(Op::Put, 4, Fault::Unavailable);
        assert!(w.commit(&[env.entry(4)]).await.is_err());
        env.clock.advance(Duration::from_secs(1));
        let r = w.commit(&[env.entry(4), env.entry(5)]).await.unwrap();
        assert_eq!(
            r,
            CommitOutcome::Committed {
                version: 5,
                added: 1
            }
        );

        assert_eq!(ids(&ms).await, vec![1, 2, 3, 4, 5], "{b:?}");
        let vs = env.versions(&ms).await;
        assert_eq!(
            vs.iter().map(|m| m.version).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert!(vs.iter().all(|m| m.epoch == 1));
        assert_no_overwrites(&env);
        assert!(f.stats().injected_on(Op::Put) >= 11);
    }
}

#[tokio::test]
async fn commits_are_idempotent_and_conflicting_entries_refused() {
    let env = Env::new(Backend::Memory);
    let ms = env.open(opts()).await;
    let mut w = ms.take_ownership("a", TTL).await.unwrap();
    w.commit(&[env.entry(1), env.entry(2)]).await.unwrap();
    assert_eq!(
        w.commit(&[env.entry(2), env.entry(1), env.entry(2)])
            .await
            .unwrap(),
        CommitOutcome::AlreadyCommitted { version: 2 }
    );
    let mut other = env.entry(2);
    other.file_len += 1;
    assert!(matches!(
        w.commit(&[other.clone()]).await,
        Err(Error::RemoteConflict(_))
    ));
    assert!(matches!(
        w.commit(&[env.entry(3), {
            let mut e = env.entry(3);
            e.item_count = 0;
            e
        }])
        .await,
        Err(Error::InvalidInput(_))
    ));
    let mut foreign = env.entry(9);
    foreign.key = "elsewhere/segments/x.seg".into();
    assert!(matches!(
        w.commit(&[foreign]).await,
        Err(Error::InvalidInput(_))
    ));
    assert_eq!(ids(&ms).await, vec![1, 2]);
}

/// Rewrites `key` in the store behind the manifest's back.
async fn overwrite(env: &Env, key: &Path, bytes: Vec<u8>) {
    env.remote
        .object_store()
        .put(key, PutPayload::from(bytes))
        .await
        .unwrap();
}

#[tokio::test]
async fn corrupted_manifest_bytes_give_a_clear_error() {
    for b in BACKENDS {
        let env = Env::new(b);
        let o = ManifestOptions {
            max_inline: 4,
            chunk_entries: 2,
            max_object_bytes: 64 * 1024,
            ..opts()
        };
        let ms = env.open(o.clone()).await;
        let mut w = ms.take_ownership("a", TTL).await.unwrap();
        w.commit(&(1..=6).map(|i| env.entry(i)).collect::<Vec<_>>())
            .await
            .unwrap();
        let m = ms.load().await.unwrap().unwrap();
        assert_eq!(m.chunks.len(), 1);
        let key = ms.version_key(m.version);
        let good = env
            .remote
            .object_store()
            .get(&key)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();

        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 0x10;
        let mut huge_len = good.clone();
        huge_len[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("bit flip", flipped, "CRC"),
            ("truncated", good[..good.len() - 7].to_vec(), "truncated"),
            ("header only", good[..10].to_vec(), "truncated"),
            ("empty", Vec::new(), "truncated"),
            (
                "garbage",
                b"this is not a manifest at all".to_vec(),
                "magic",
            ),
            ("huge length", huge_len, "limit"),
            ("oversized object", vec![b'x'; 70 * 1024], "limit"),
        ];
        for (name, bytes, needle) in cases {
            overwrite(&env, &key, bytes).await;
            for r in [
                ms.load().await.map(|_| ()),
                ms.take_ownership("b", TTL).await.map(|_| ()),
            ] {
                match r {
                    Err(e @ Error::Corrupt { .. }) => {
                        let msg = e.to_string();
                        assert!(
                            msg.contains("manifest orders version"),
                            "{b:?} {name}: {msg}"
                        );
                        assert!(msg.contains(needle), "{b:?} {name}: {msg}");
                    }
                    other => panic!("{b:?} {name}: expected Corrupt, got {other:?}"),
                }
            }
        }
        overwrite(&env, &key, good).await;
        assert_eq!(ids(&ms).await, (1..=6).collect::<Vec<_>>());

        // A damaged chunk: the head is fine, reading all entries is not.
        let chunk = Path::parse(&m.chunks[0].key).unwrap();
        let cb = env
            .remote
            .object_store()
            .get(&chunk)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        let mut bad = cb.clone();
        bad[20] ^= 1;
        overwrite(&env, &chunk, bad).await;
        // A reader that decoded the chunk before keeps its checked copy
        // (chunks are immutable, named by their CRC); a new reader reads
        // the damaged bytes and refuses them.
        assert_eq!(ids(&ms).await, (1..=6).collect::<Vec<_>>());
        let fresh = env.open(o.clone()).await;
        let r = fresh.all_segments(&m).await;
        assert!(
            matches!(&r, Err(Error::Corrupt { what, .. }) if what.contains("chunk")),
            "{r:?}"
        );
        env.remote.object_store().delete(&chunk).await.unwrap();
        let r = env.open(o.clone()).await.all_segments(&m).await;
        assert!(
            matches!(&r, Err(Error::Corrupt { detail, .. }) if detail == "missing"),
            "{r:?}"
        );
    }
}

async fn spill_round_trip(b: Backend, total: u64, batch: usize, o: ManifestOptions) {
    let env = Env::new(b);
    let (max_inline, per_chunk) = (o.max_inline, o.chunk_entries);
    let ms = env.open(o.clone()).await;
    let mut w = ms.take_ownership("a", TTL).await.unwrap();
    // Ids arrive out of order within each batch, and batches out of order
    // pairwise, as a bounded-in-flight pipeline would finish them.
    let mut order: Vec<u64> = (1..=total).collect();
    let mut rng = fastrand::Rng::with_seed(3);
    for c in order.chunks_mut(batch * 2) {
        rng.shuffle(c);
    }
    // Version 1 is the take; commits publish 2, 3, ...
    for (expect_version, c) in (2..).zip(order.chunks(batch)) {
        let entries: Vec<_> = c.iter().map(|i| env.entry(*i)).collect();
        let r = w.commit(&entries).await.unwrap();
        assert_eq!(
            r,
            CommitOutcome::Committed {
                version: expect_version,
                added: c.len()
            }
        );
    }
    let m = w.manifest().clone();
    assert!(m.segments.len() <= max_inline, "{}", m.segments.len());
    assert!(!m.chunks.is_empty());
    assert!(m.chunks.iter().all(|c| c.count == per_chunk as u64));
    assert_eq!(m.segment_count, total);

    // A fresh reader sees exactly what was committed, byte-for-byte fields.
    let fresh = env.open(o).await;
    let loaded = fresh.load().await.unwrap().unwrap();
    assert_eq!(loaded, m);
    let all = fresh.all_segments(&loaded).await.unwrap();
    let want: Vec<_> = (1..=total).map(|i| env.entry(i)).collect();
    assert_eq!(all, want);

    // Re-committing spilled entries is a no-op; a changed one is refused.
    assert_eq!(
        w.commit(&[env.entry(1), env.entry(total / 2)])
            .await
            .unwrap(),
        CommitOutcome::AlreadyCommitted { version: m.version }
    );
    let mut changed = env.entry(2);
    changed.max_ts += 1;
    assert!(matches!(
        w.commit(&[changed]).await,
        Err(Error::RemoteConflict(_))
    ));
    // A late low id (below spilled chunks) is accepted and reads back.
    w.commit(&[env.entry(0)]).await.unwrap();
    let again = fresh.load().await.unwrap().unwrap();
    let all = fresh.all_segments(&again).await.unwrap();
    assert_eq!(all.len() as u64, total + 1);
    assert_eq!(all.first().map(|e| e.id.0), Some(0));
    // Old versions are trimmed to the kept window.
    assert!(env.versions(&fresh).await.len() as u64 <= fresh.options().keep_versions);
    assert_no_overwrites(&env);
}

#[tokio::test]
async fn spill_round_trip_small_chunks_memory() {
    let o = ManifestOptions {
        max_inline: 64,
        chunk_entries: 32,
        keep_versions: 4,
        ..opts()
    };
    spill_round_trip(Backend::Memory, 1_200, 10, o).await;
}

#[tokio::test]
async fn spill_round_trip_small_chunks_local() {
    let o = ManifestOptions {
        max_inline: 64,
        chunk_entries: 32,
        keep_versions: 4,
        ..opts()
    };
    spill_round_trip(Backend::Local, 1_100, 25, o).await;
}

#[tokio::test]
async fn spill_round_trip_default_options() {
    spill_round_trip(Backend::FileUrl, 1_600, 400, opts()).await;
}

#[tokio::test]
async fn refused_on_a_store_that_ignores_conditional_writes() {
    let f = FaultyStore::memory(1);
    f.ignore_conditionals(true);
    let remote = f.remote("tier");
    let r = ManifestStore::open(&remote, STREAM, opts()).await;
    match r {
        Err(Error::Remote(msg)) => {
            assert!(msg.contains("does not honour conditional creates"), "{msg}");
            assert!(msg.contains("allow_unconditional_store"), "{msg}");
            assert!(msg.contains("memory://faulty"), "{msg}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Nothing of the manifest was written.
    let left: Vec<_> = f
        .inner()
        .list(Some(&Path::from("tier/orders")))
        .try_collect()
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");

    // The explicit override works (single writer only).
    let o = ManifestOptions {
        allow_unconditional_store: true,
        ..opts()
    };
    let ms = ManifestStore::open(&remote, STREAM, o).await.unwrap();
    let mut w: ManifestWriter = ms.take_ownership("a", TTL).await.unwrap();
    let e = SegmentEntry::new(&remote, STREAM, &meta(1)).unwrap();
    w.commit(std::slice::from_ref(&e)).await.unwrap();
    let m = ms.load().await.unwrap().unwrap();
    assert_eq!(m.segments, vec![e]);
}

/// Damage notes: marked by the owner, persisted in the next version (and
/// every later one, across chunk spills), idempotent, `lost` only
/// escalates, cleared by a repair; a fenced owner cannot mark; a note for a
/// segment the manifest does not list is refused.
#[tokio::test]
async fn damage_notes_are_published_kept_and_cleared() {
    for b in BACKENDS {
        let env = Env::new(b);
        let o = ManifestOptions {
            max_inline: 4,
            chunk_entries: 2,
            ..opts()
        };
        let ms = env.open(o.clone()).await;
        let mut w = ms.take_ownership("a", TTL).await.unwrap();
        w.commit(&(1..=3).map(|i| env.entry(i)).collect::<Vec<_>>())
            .await
            .unwrap();
        let e2 = env.entry(2);
        let long = "x".repeat(DAMAGE_REASON_MAX * 2);
        let v = w
            .mark_damaged(DamageNote::new(&e2, &long, false, 11))
            .await
            .unwrap();
        assert!(v.is_some(), "{b:?}: first mark publishes");
        // Same note again: nothing written.
        let again = w
            .mark_damaged(DamageNote::new(&e2, "other words", false, 12))
            .await
            .unwrap();
        assert_eq!(again, None, "{b:?}");
        // Escalation to lost publishes; back to not-lost does not.
        assert!(
            w.mark_damaged(DamageNote::new(&e2, "gone", true, 13))
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            w.mark_damaged(DamageNote::new(&e2, "found", false, 14))
                .await
                .unwrap(),
            None
        );
        // Not listed: refused.
        let stranger = env.entry(9);
        assert!(matches!(
            w.mark_damaged(DamageNote::new(&stranger, "?", true, 15))
                .await,
            Err(Error::InvalidInput(_))
        ));
        // Kept across later commits that spill entries into chunks.
        w.commit(&(4..=8).map(|i| env.entry(i)).collect::<Vec<_>>())
            .await
            .unwrap();
        let m = ms.load().await.unwrap().unwrap();
        assert!(!m.chunks.is_empty(), "{b:?}: spilled");
        let d = m.damage(SegmentId(2)).expect("note kept");
        assert!(d.lost);
        assert_eq!(d.reason, "gone");
        assert_eq!(m.damaged.len(), 1);
        // The note survives a decode of every version written since.
        for v in env.versions(&ms).await {
            if v.version >= m.version {
                assert!(v.damage(SegmentId(2)).is_some());
            }
        }
        // Cleared by a repair; clearing twice writes nothing.
        assert!(w.clear_damage(SegmentId(2)).await.unwrap().is_some());
        assert_eq!(w.clear_damage(SegmentId(2)).await.unwrap(), None);
        assert!(ms.load().await.unwrap().unwrap().damaged.is_empty());
        // A cut reason is cut at DAMAGE_REASON_MAX bytes.
        assert_eq!(
            DamageNote::new(&e2, &long, false, 0).reason.len(),
            DAMAGE_REASON_MAX
        );

        // Fenced: a newer owner took over; the old one can mark nothing.
        env.clock.advance(TTL * 2);
        let mut w2 = ms.take_ownership("b", TTL).await.unwrap();
        let r = w.mark_damaged(DamageNote::new(&e2, "late", true, 20)).await;
        assert!(matches!(r, Err(Error::Fenced(_))), "{b:?}: {r:?}");
        assert!(ms.load().await.unwrap().unwrap().damaged.is_empty());
        assert!(
            w2.mark_damaged(DamageNote::new(&e2, "b saw it", true, 21))
                .await
                .unwrap()
                .is_some()
        );
    }
}

/// Decoded chunks are cached per `ManifestStore` (they are immutable): a
/// second `all_segments` of the same version sends no chunk GET.
#[tokio::test]
async fn chunks_are_read_once_per_store() {
    let env = Env::new(Backend::Memory);
    let o = ManifestOptions {
        max_inline: 4,
        chunk_entries: 2,
        ..opts()
    };
    let ms = env.open(o.clone()).await;
    let mut w = ms.take_ownership("a", TTL).await.unwrap();
    w.commit(&(1..=9).map(|i| env.entry(i)).collect::<Vec<_>>())
        .await
        .unwrap();
    let m = ms.load().await.unwrap().unwrap();
    assert!(m.chunks.len() >= 2, "{:?}", m.chunks);
    let reader = env.open(o).await;
    let gets = || env.faulty().stats().requests(Op::Get);
    let g0 = gets();
    let first = reader.all_segments(&m).await.unwrap();
    assert_eq!(gets() - g0, m.chunks.len() as u64, "one GET per chunk");
    let g1 = gets();
    assert_eq!(reader.all_segments(&m).await.unwrap(), first);
    assert_eq!(gets(), g1, "cached: no GET the second time");
    assert_eq!(first.len(), 9);
}

/// Renewal objects under `leases/`, as (epoch, seq).
async fn renewals(env: &Env, ms: &ManifestStore) -> Vec<(u64, u64)> {
    let listed: Vec<_> = env
        .remote
        .object_store()
        .list(Some(&ms.leases_dir()))
        .try_collect()
        .await
        .unwrap();
    let mut out: Vec<(u64, u64)> = listed
        .iter()
        .map(|m| {
            let parts: Vec<String> = m
                .location
                .prefix_match(&ms.leases_dir())
                .unwrap()
                .map(|p| p.as_ref().to_string())
                .collect();
            let seq = parts[1].strip_suffix(".lease").unwrap();
            (parts[0].parse().unwrap(), seq.parse().unwrap())
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn renewals_extend_the_lease_without_rewriting_the_manifest() {
    for b in BACKENDS {
        let env = Env::new(b);
        let ms = env.open(opts()).await;
        let mut a = ms.take_ownership("a", TTL).await.unwrap();
        a.commit(&[env.entry(1)]).await.unwrap();
        let version = ms.load().await.unwrap().unwrap().version;
        for i in 1..=10u64 {
            env.clock.advance(Duration::from_secs(10));
            a.renew(TTL).await.unwrap();
            assert_eq!(a.lease_expires_ms(), T0 + i * 10_000 + 30_000, "{b:?}");
        }
        let m = ms.load().await.unwrap().unwrap();
        assert_eq!(m.version, version, "{b:?}: no manifest version per renewal");
        // Readers see the renewed expiry; the head keeps the first one.
        assert_eq!(m.lease.as_ref().unwrap().expires_ms, T0 + 30_000);
        let cur = ms.current_lease(&m).await.unwrap().unwrap();
        assert_eq!(cur.lease.expires_ms, T0 + 130_000, "{b:?}");
        assert_eq!((cur.lease.owner.as_str(), cur.ttl_ms), ("a", 30_000));
        // Old renewals are cleaned up: the newest few of epoch 1 remain.
        let r = renewals(&env, &ms).await;
        assert!(
            r.len() <= 4 && r.iter().all(|(e, _)| *e == 1),
            "{b:?}: {r:?}"
        );
        assert_eq!(r.last(), Some(&(1, 10)), "{b:?}");

        // B, with a clock of its own, must wait for the renewed expiry.
        let clock_b = ManualClock::new(T0 + 129_000);
        let ms_b = env.open_with(opts(), &clock_b).await;
        assert_claimed(ms_b.take_ownership("b", TTL).await, &["\"a\"", "epoch 1"]);
        clock_b.set(T0 + 130_000);
        let mut bw = ms_b.take_ownership("b", TTL).await.unwrap();
        assert_eq!(bw.epoch(), 2);
        // B's take wrote renewal 0 of epoch 2 and swept epoch 1's.
        assert_eq!(renewals(&env, &ms).await, vec![(2, 0)], "{b:?}");
        // A's renewal alone (no commit) finds out it was taken over, and
        // its late renewal extends nothing.
        assert_fenced(a.renew(TTL).await, &["epoch 2"]);
        assert_fenced(a.commit(&[env.entry(2)]).await, &["epoch 2"]);
        let m = ms.load().await.unwrap().unwrap();
        let cur = ms.current_lease(&m).await.unwrap().unwrap();
        assert_eq!((cur.lease.owner.as_str(), cur.lease.epoch), ("b", 2));
        bw.commit(&[env.entry(3)]).await.unwrap();
        assert_eq!(ids(&ms).await, vec![1, 3]);
        assert_no_overwrites(&env);
    }
}

#[tokio::test]
async fn a_renewal_does_not_wait_for_a_slow_commit() {
    let env = Env::new(Backend::Memory);
    let ms = env.open(opts()).await;
    let mut a = ms.take_ownership("a", TTL).await.unwrap();
    let keeper = a.lease_keeper();
    // The commit's manifest PUT hangs for 3 s (a slow store); the renewal,
    // sent meanwhile through the keeper, lands at once.
    env.faulty()
        .fail_next(Op::Put, 1, Fault::Latency(Duration::from_secs(3)));
    let e = env.entry(1);
    let commit = tokio::spawn(async move {
        a.commit(&[e]).await.unwrap();
        a
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    env.clock.advance(Duration::from_secs(10));
    let t = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(2), keeper.renew(TTL))
        .await
        .expect("the renewal waited for the commit")
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(!commit.is_finished(), "the commit was still in flight");
    assert_eq!(keeper.expires_ms(), T0 + 40_000);
    let a = commit.await.unwrap();
    assert_eq!(a.lease_expires_ms(), T0 + 40_000);
    assert_eq!(ids(&ms).await, vec![1]);
}

/// A took the stream with its wall clock an hour ahead of B's; B keeps
/// asking through one store.
async fn holder_an_hour_ahead() -> (Env, ManualClock, ManualClock, ManifestStore, ManifestWriter) {
    let env = Env::new(Backend::Memory);
    let clock_a = ManualClock::new(T0 + 3_600_000);
    let ms_a = env.open_with(opts(), &clock_a).await;
    let clock_b = ManualClock::new(T0);
    let ms_b = env.open_with(opts(), &clock_b).await;
    let a = ms_a.take_ownership("a", TTL).await.unwrap();
    (env, clock_a, clock_b, ms_b, a)
}

#[tokio::test]
async fn a_lease_that_stops_moving_expires_by_the_monotonic_clock() {
    // A's wall clock is an hour ahead (within the longest TTL, so the wall
    // clock check alone would keep B out for an hour). B keeps asking; once
    // A's lease has not moved for a whole TTL by B's monotonic clock, B
    // takes over, and A is fenced.
    let (env, clock_a, clock_b, ms_b, mut a) = holder_an_hour_ahead().await;
    a.renew(TTL).await.unwrap();
    assert_claimed(ms_b.take_ownership("b", TTL).await, &["\"a\""]);
    clock_b.advance(Duration::from_secs(29));
    assert_claimed(ms_b.take_ownership("b", TTL).await, &["\"a\""]);
    // A renews: the lease moved, B starts counting again.
    clock_a.advance(Duration::from_secs(29));
    a.renew(TTL).await.unwrap();
    clock_b.advance(Duration::from_secs(2));
    assert_claimed(ms_b.take_ownership("b", TTL).await, &["\"a\""]);
    clock_b.advance(Duration::from_secs(29));
    assert_claimed(ms_b.take_ownership("b", TTL).await, &["\"a\""]);
    // A stops renewing (paused): a whole TTL later by B's monotonic clock.
    clock_b.advance(Duration::from_secs(1));
    let mut bw = ms_b.take_ownership("b", TTL).await.unwrap();
    assert_eq!(bw.epoch(), 2);
    bw.commit(&[env.entry(5)]).await.unwrap();
    assert_fenced(a.renew(TTL).await, &["epoch 2"]);
    assert_eq!(ids(&ms_b).await, vec![5]);

    // A wall-clock jump alone (no time passing) never ages a lease: C,
    // whose clock jumps, still waits for B's lease.
    let clock_c = ManualClock::new(T0 + 31_000);
    let ms_c = env.open_with(opts(), &clock_c).await;
    assert_claimed(ms_c.take_ownership("c", TTL).await, &["\"b\""]);
    clock_c.set(T0 + 40_000);
    assert_claimed(ms_c.take_ownership("c", TTL).await, &["\"b\""]);
}

#[tokio::test]
async fn an_unreadable_renewal_only_shortens_the_lease() {
    for b in [Backend::Memory, Backend::Local] {
        let env = Env::new(b);
        let ms = env.open(opts()).await;
        let mut a = ms.take_ownership("a", TTL).await.unwrap();
        env.clock.advance(Duration::from_secs(10));
        a.renew(TTL).await.unwrap(); // seq 1: until T0 + 40 s
        env.clock.advance(Duration::from_secs(10));
        a.renew(TTL).await.unwrap(); // seq 2: until T0 + 50 s
        env.faulty()
            .tamper(&ms.renewal_key(1, 2), |b| {
                let n = b.len() - 3;
                b[n] ^= 0x10;
            })
            .await;
        let m = ms.load().await.unwrap().unwrap();
        let cur = ms.current_lease(&m).await.unwrap().unwrap();
        assert_eq!(cur.lease.expires_ms, T0 + 40_000, "{b:?}: seq 1's expiry");
        // A renewal naming another owner in the epoch's folder counts for
        // nothing: garbage cannot extend or hijack the lease.
        let forged =
            tierindex::remote::manifest::encode_renewal(&tierindex::remote::manifest::Renewal {
                format: 1,
                stream: STREAM.into(),
                owner: "mallory".into(),
                epoch: 1,
                seq: 9,
                written_ms: T0 + 20_000,
                expires_ms: T0 + 20_000 + 86_400_000,
                host: None,
            })
            .unwrap();
        env.remote
            .object_store()
            .put(&ms.renewal_key(1, 9), PutPayload::from(forged))
            .await
            .unwrap();
        let cur = ms.current_lease(&m).await.unwrap().unwrap();
        assert_eq!(
            (cur.lease.owner.as_str(), cur.lease.expires_ms),
            ("a", T0 + 40_000),
            "{b:?}"
        );
        // An oversized object in the folder is skipped the same way.
        env.remote
            .object_store()
            .put(&ms.renewal_key(1, 10), PutPayload::from(vec![0u8; 100_000]))
            .await
            .unwrap();
        let cur = ms.current_lease(&m).await.unwrap().unwrap();
        assert_eq!(cur.lease.expires_ms, T0 + 40_000, "{b:?}");
        env.clock.set(T0 + 40_000);
        let w = ms.take_ownership("b", TTL).await.unwrap();
        assert_eq!(w.epoch(), 2, "{b:?}");
    }
}

#[tokio::test]
async fn renewal_folders_left_from_a_lost_manifest_history_fence_nobody() {
    for b in [Backend::Memory, Backend::Local] {
        let env = Env::new(b);
        let ms = env.open(opts()).await;
        ms.take_ownership("a", TTL).await.unwrap();
        env.clock.advance(Duration::from_secs(31));
        ms.take_ownership("b", TTL).await.unwrap(); // epoch 2, leases/2/0
        // The manifest's versions are lost (an operator, a bucket rule);
        // the renewal folders stay.
        for v in env.versions(&ms).await {
            env.remote
                .object_store()
                .delete(&ms.version_key(v.version))
                .await
                .unwrap();
        }
        assert!(ms.load().await.unwrap().is_none());
        // A new owner starts the manifest again at epoch 1: the folder of
        // epoch 2 is not a takeover of it.
        let mut c = ms.take_ownership("c", TTL).await.unwrap();
        assert_eq!(c.epoch(), 1, "{b:?}");
        env.clock.advance(Duration::from_secs(10));
        c.renew(TTL).await.unwrap();
        c.commit(&[env.entry(1)]).await.unwrap();
        assert_eq!(ids(&ms).await, vec![1]);
        // The take's sweep removed the stale folder.
        let r = renewals(&env, &ms).await;
        assert!(r.iter().all(|(e, _)| *e == 1), "{b:?}: {r:?}");
    }
}

#[tokio::test]
async fn a_holder_that_keeps_renewing_is_not_aged_out_whatever_its_expiries() {
    // A took the stream while its clock was an hour ahead; NTP then stepped
    // it back. Its renewals now carry expiries below the head's, so the
    // lease in force shows the head's expiry, unchanged. A taker that keeps
    // asking must still see the renewals land (new seqs) and stay out.
    let (_env, clock_a, clock_b, ms_b, mut a) = holder_an_hour_ahead().await;
    clock_a.set(T0);
    for _ in 0..6 {
        clock_a.advance(Duration::from_secs(10));
        a.renew(TTL).await.unwrap();
        clock_b.advance(Duration::from_secs(10));
        assert_claimed(ms_b.take_ownership("b", TTL).await, &["\"a\""]);
    }
    // A stops: one TTL later by B's monotonic clock, B takes over.
    clock_b.advance(Duration::from_secs(29));
    assert_claimed(ms_b.take_ownership("b", TTL).await, &["\"a\""]);
    clock_b.advance(Duration::from_secs(1));
    assert_eq!(ms_b.take_ownership("b", TTL).await.unwrap().epoch(), 2);
    assert_fenced(a.renew(TTL).await, &["epoch 2"]);
}

/// The manifest store of another stream of the same store and clock.
async fn stream_store(env: &Env, stream: &str, clock: &ManualClock) -> ManifestStore {
    let caps = probe(&env.remote).await.unwrap();
    ManifestStore::with_capabilities(&env.remote, stream, opts(), &caps, Arc::new(clock.clone()))
        .unwrap()
}

/// Keys listed under `dir` (relative names).
async fn listed(env: &Env, dir: &str) -> Vec<String> {
    let prefix = Path::from(format!("tier/{dir}"));
    let mut v: Vec<String> = env
        .remote
        .object_store()
        .list(Some(&prefix))
        .map_ok(|m| m.location.as_ref()[prefix.as_ref().len() + 1..].to_string())
        .try_collect()
        .await
        .unwrap();
    v.sort();
    v
}

/// Host leases (issue 16): a host's streams write one renewal each, at the
/// take, naming the host; the host's own renewal keeps all of them live,
/// and only those it still lists. Time is tokio's paused clock (the host
/// renews a third of the TTL apart) and a manual wall clock.
#[tokio::test(start_paused = true)]
async fn a_host_lease_keeps_its_streams_live_and_only_those_it_lists() {
    use tierindex::remote::manifest::{
        HostLeases, HostRenewal, decode_host_renewal, decode_renewal,
    };
    let env = Env::new(Backend::Memory);
    let leases = HostLeases::default();
    let (s1, s2, s3) = (
        stream_store(&env, "s1", &env.clock).await,
        stream_store(&env, "s2", &env.clock).await,
        stream_store(&env, "s3", &env.clock).await,
    );
    let mut w1 = s1
        .take_ownership_hosted("a", TTL, Some(&leases))
        .await
        .unwrap();
    let w2 = s2
        .take_ownership_hosted("a2", TTL, Some(&leases))
        .await
        .unwrap();
    // A stream of another owner on its own: renews for itself.
    let mut w3 = s3.take_ownership("c", TTL).await.unwrap();
    assert_eq!(leases.live(), 1, "one host lease for the store");
    // Each hosted stream wrote one renewal, naming the host.
    let renewals = listed(&env, "s1/manifest/leases").await;
    assert_eq!(
        renewals,
        vec!["00000000000000000001/00000000000000000000.lease"]
    );
    let key = Path::from("tier/s1/manifest/leases/00000000000000000001/00000000000000000000.lease");
    let bytes = env
        .remote
        .object_store()
        .get(&key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let r = decode_renewal(&bytes, "s1", 1, 0).unwrap();
    let host = r.host.clone().expect("the renewal names the host");
    // The lease task of a hosted stream has nothing to write.
    assert!(w1.lease_keeper().is_hosted());
    let lapses = w1.lease_keeper().host_lapses().expect("hosted");
    w1.renew(TTL).await.unwrap();
    assert_eq!(listed(&env, "s1/manifest/leases").await.len(), 1);

    // The host renews a third of the TTL later, listing both streams.
    env.clock.set(T0 + 9_000);
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    let hosts = listed(&env, "_hosts").await;
    assert_eq!(hosts, vec![format!("{host}/00000000000000000000.lease")]);
    let key = Path::from(format!("tier/_hosts/{}", hosts[0]));
    let bytes = env
        .remote
        .object_store()
        .get(&key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let hr: HostRenewal = decode_host_renewal(&bytes, &host, 0).unwrap();
    assert_eq!(hr.expires_ms, T0 + 39_000);
    assert!(hr.holds("s1", "a", 1) && hr.holds("s2", "a2", 1));
    assert!(!hr.holds("s3", "c", 1));
    assert_eq!(w1.lease_expires_ms(), T0 + 39_000);

    // Past the take's own expiry, the host's keeps the streams: refused.
    env.clock.set(T0 + 35_000);
    assert_claimed(s1.take_ownership("b", TTL).await, &["\"a\"", "in 4s"]);
    assert_claimed(s2.take_ownership("b", TTL).await, &["\"a2\""]);
    // The stream on its own did not renew: taken.
    let _w3b = s3.take_ownership("b", TTL).await.unwrap();
    let e3 = SegmentEntry::new(&env.remote, "s3", &meta(1)).unwrap();
    assert_fenced(w3.commit(&[e3]).await, &["epoch 2"]);

    // Stream 2 leaves the host (its writer dropped, as a stream that stops
    // without shutdown): the host's next renewal lists stream 1 only, and
    // stream 2's lease ends with its take's own expiry.
    drop(w2);
    env.clock.set(T0 + 19_000);
    tokio::time::sleep(Duration::from_millis(10_000)).await;
    let cur2 = s2
        .current_lease(&s2.load().await.unwrap().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((cur2.lease.expires_ms, cur2.host_seq), (T0 + 30_000, None));
    let cur1 = s1
        .current_lease(&s1.load().await.unwrap().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (cur1.lease.expires_ms, cur1.host_seq),
        (T0 + 49_000, Some(1))
    );
    env.clock.set(T0 + 40_000);
    let w2b = s2.take_ownership("b", TTL).await.unwrap();
    assert_eq!(w2b.epoch(), 2);
    assert_claimed(s1.take_ownership("b", TTL).await, &["\"a\""]);
    w1.commit(&[SegmentEntry::new(&env.remote, "s1", &meta(2)).unwrap()])
        .await
        .unwrap();

    // Renewals a third of the TTL apart: no gap, so no member was asked
    // to check for a takeover.
    assert_eq!(*lapses.borrow(), 0);

    // Stream 1 released: off the list, the host holds nothing and deletes
    // its renewals; the next owner takes at once.
    w1.release().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(listed(&env, "_hosts").await, Vec::<String>::new());
    let w1b = s1.take_ownership("b", TTL).await.unwrap();
    assert_eq!(w1b.epoch(), 2);
    drop(w1b);
    assert_eq!(ids(&s1).await, vec![2]);
    assert_no_overwrites(&env);
}

/// A host renewal that does not decode counts for nothing: the lease ends
/// with the take's own expiry. A renewal naming a host that lists nothing,
/// or names no host at all, extends nothing either.
#[tokio::test(start_paused = true)]
async fn a_host_renewal_that_is_garbage_or_does_not_list_the_stream_keeps_nobody_out() {
    use tierindex::remote::manifest::{HostLeases, Renewal, encode_renewal};
    let env = Env::new(Backend::Memory);
    let clock_b = ManualClock::new(T0);
    let leases = HostLeases::default();
    let s1 = stream_store(&env, "s1", &env.clock).await;
    let s1b = stream_store(&env, "s1", &clock_b).await;
    let _w1 = s1
        .take_ownership_hosted("a", TTL, Some(&leases))
        .await
        .unwrap();
    env.clock.set(T0 + 9_000);
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    let host = listed(&env, "_hosts").await;
    assert_eq!(host.len(), 1);
    let cur = |ms: ManifestStore| async move {
        let m = ms.load().await.unwrap().unwrap();
        ms.current_lease(&m).await.unwrap().unwrap()
    };
    // A forged renewal of the epoch naming another host, which has no
    // renewal: the host lease in force is the newest renewal's, so the
    // lease ends with the take's own expiry.
    let forged = Renewal {
        format: 1,
        stream: "s1".into(),
        owner: "a".into(),
        epoch: 1,
        seq: 5,
        written_ms: T0,
        expires_ms: T0 + 1,
        host: Some("ffffffffffffffffffffffffffffffff".into()),
    };
    env.remote
        .object_store()
        .put(
            &s1.renewal_key(1, 5),
            PutPayload::from(encode_renewal(&forged).unwrap()),
        )
        .await
        .unwrap();
    let c = cur(s1b.clone()).await;
    assert_eq!((c.lease.expires_ms, c.host_seq), (T0 + 30_000, None));
    // The host's renewal damaged (before anything in this process read
    // it: decoded renewals are kept, as they are create-only): it counts
    // for nothing.
    for (i, name) in host.iter().enumerate() {
        let key = Path::from(format!("tier/_hosts/{name}"));
        env.remote
            .object_store()
            .put(&key, PutPayload::from(vec![i as u8; 40]))
            .await
            .unwrap();
    }
    env.remote
        .object_store()
        .delete(&s1.renewal_key(1, 5))
        .await
        .unwrap();
    let c = cur(s1b.clone()).await;
    assert_eq!((c.lease.expires_ms, c.host_seq), (T0 + 30_000, None));
    clock_b.set(T0 + 31_000);
    let wb = s1b.take_ownership("b", TTL).await.unwrap();
    assert_eq!(wb.epoch(), 2);
}

/// Two stores that print alike (one bucket name on two clusters) get a host
/// lease each, renewed in each (helper-46: they shared one, renewed in the
/// first store only, and the second's streams lapsed under a live owner).
#[tokio::test(start_paused = true)]
async fn stores_that_print_alike_get_a_host_lease_each() {
    use object_store::memory::InMemory;
    use tierindex::remote::manifest::HostLeases;
    let clock = ManualClock::new(T0);
    let mk = || {
        let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        (
            os.clone(),
            RemoteStore::from_parts(os, None, "tier", "memory://same"),
        )
    };
    let ((osa, a), (osb, b)) = (mk(), mk());
    assert_eq!(a.display_url(), b.display_url());
    let open = |r: &RemoteStore| {
        let r = r.clone();
        let clock = clock.clone();
        async move {
            let caps = probe(&r).await.unwrap();
            ManifestStore::with_capabilities(&r, "s", opts(), &caps, Arc::new(clock)).unwrap()
        }
    };
    let (sa, sb) = (open(&a).await, open(&b).await);
    let leases = HostLeases::default();
    let _wa = sa
        .take_ownership_hosted("o", TTL, Some(&leases))
        .await
        .unwrap();
    let _wb = sb
        .take_ownership_hosted("o", TTL, Some(&leases))
        .await
        .unwrap();
    assert_eq!(leases.live(), 2);
    clock.set(T0 + 9_000);
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    for os in [&osa, &osb] {
        let n: Vec<_> = os
            .list(Some(&Path::from("tier/_hosts")))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(n.len(), 1);
    }
    clock.set(T0 + 35_000);
    assert_claimed(sa.take_ownership("x", TTL).await, &["\"o\""]);
    assert_claimed(sb.take_ownership("x", TTL).await, &["\"o\""]);
}

/// A starting host deletes the renewals of a host not renewed for two days
/// by the store's clock (file modification times), and only those: a host
/// whose own clock is days ahead deletes no live host's (helper-46).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_host_sweeps_only_hosts_stale_by_the_stores_clock() {
    use tierindex::remote::manifest::HostLeases;
    let env = Env::new(Backend::Local);
    let dir = env._dir.as_ref().unwrap().path().to_path_buf();
    let ttl = Duration::from_millis(600);
    // A live host (system time) and a dead one (its objects 3 days old).
    let live = HostLeases::default();
    let now = ManualClock::new(tierindex::segment::now_ms());
    let s1 = stream_store(&env, "s1", &now).await;
    let _w1 = s1
        .take_ownership_hosted("a", ttl, Some(&live))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = listed(&env, "_hosts").await;
    assert!(!before.is_empty(), "{before:?}");
    let dead = "0123456789abcdef0123456789abcdef";
    let dead_dir = dir.join(format!("tier/_hosts/{dead}"));
    std::fs::create_dir_all(&dead_dir).unwrap();
    for n in [
        "00000000000000000004.lease",
        "00000000000000000005.lease",
        "other.txt",
    ] {
        std::fs::write(dead_dir.join(n), b"x").unwrap();
        let st = std::process::Command::new("touch")
            .args(["-m", "-d", "3 days ago"])
            .arg(dead_dir.join(n))
            .status()
            .unwrap();
        assert!(st.success());
    }
    // A second host whose wall clock is 5 days ahead starts in the store.
    let fast = ManualClock::new(tierindex::segment::now_ms() + 5 * 86_400_000);
    let second = HostLeases::default();
    let s2 = stream_store(&env, "s2", &fast).await;
    let _w2 = s2
        .take_ownership_hosted("b", ttl, Some(&second))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let after = listed(&env, "_hosts").await;
    // The dead host's renewals are gone (not its stray file); the live
    // host's are there, and the new host's.
    assert!(
        !after
            .iter()
            .any(|k| k.ends_with(".lease") && k.starts_with(dead)),
        "{after:?}"
    );
    assert!(after.contains(&format!("{dead}/other.txt")), "{after:?}");
    let live_id = before[0].split('/').next().unwrap();
    assert!(after.iter().any(|k| k.starts_with(live_id)), "{after:?}");
    let hosts: std::collections::BTreeSet<&str> = after
        .iter()
        .filter(|k| !k.starts_with(dead))
        .filter_map(|k| k.split('/').next())
        .collect();
    assert_eq!(hosts.len(), 2, "{after:?}");
}

/// A host lease renews on the tokio runtime of its first stream. When that
/// runtime ends, its streams on other runtimes renew on their own again,
/// and the next stream to join starts another host lease (helper-47).
#[test]
fn streams_of_a_host_lease_whose_runtime_ended_renew_on_their_own() {
    use tierindex::remote::manifest::HostLeases;
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let (rt_a, rt_b) = (rt(), rt());
    let env = Env::new(Backend::Memory);
    let leases = HostLeases::default();
    let s0 = rt_a.block_on(stream_store(&env, "s0", &env.clock));
    let s1 = rt_b.block_on(stream_store(&env, "s1", &env.clock));
    let _w0 = rt_a
        .block_on(s0.take_ownership_hosted("a", TTL, Some(&leases)))
        .unwrap();
    let mut w1 = rt_b
        .block_on(s1.take_ownership_hosted("a", TTL, Some(&leases)))
        .unwrap();
    assert_eq!(leases.live(), 1, "one lease, renewed on runtime A");
    let k1 = w1.lease_keeper();
    assert!(k1.is_hosted());
    let ended = k1.host_ended().expect("hosted");
    drop(rt_a);
    assert!(!k1.is_hosted(), "its renewal task ended with runtime A");
    rt_b.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .unwrap();
        // It renews on its own again (a renewal still naming the host).
        env.clock.set(T0 + 10_000);
        w1.renew(TTL).await.unwrap();
    });
    assert_eq!(
        rt_b.block_on(listed(&env, "s1/manifest/leases")).len(),
        2,
        "the take's renewal and its own"
    );
    assert_eq!(w1.lease_expires_ms(), T0 + 40_000);
    // A stream joining now starts another lease, on its own runtime.
    let s2 = rt_b.block_on(stream_store(&env, "s2", &env.clock));
    let _w2 = rt_b
        .block_on(s2.take_ownership_hosted("a", TTL, Some(&leases)))
        .unwrap();
    assert_eq!(leases.live(), 2);
}
