//! Test support: a fault-injecting [`ObjectStore`] wrapper.
//!
//! [`FaultyStore`] sits in front of a real store (usually `InMemory` or
//! `LocalFileSystem`) and, per request, may inject one [`Fault`]: a
//! 503/429 answer, a hang past the caller's deadline, a connection reset, a
//! request that is performed and then "loses" its answer, extra latency, a
//! body that trickles in slowly, a damaged GET body, or a multipart part
//! that is acknowledged but not stored as sent. Faults come from a script
//! (`fail_next`) and/or a random plan (`set_random`) drawn from a seeded RNG,
//! so a failing run replays exactly from its seed (as long as requests are
//! issued in the same order).
//!
//! It also records what matters for safety: creates that hit an existing
//! key, and per key every write the inner store accepted (with the CRC of
//! what it wrote and of what it replaced) and every delete, so tests can
//! assert "never overwritten" ([`FaultyStore::overwrites`]) and "a
//! conditional create never replaced an object" (`FaultStats::create_replaced`).
//! [`FaultyStore::ignore_conditionals`] makes it behave like Garage
//! (If-None-Match / If-Match silently ignored).
//!
//! `object_store`'s traits are `#[async_trait]`; the impls below spell out
//! the boxed-future signatures that macro generates (no extra dependency).

#![doc(hidden)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::client::{HttpError, HttpErrorKind};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartId, MultipartUpload,
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload,
    PutResult, Result,
};

use crate::remote::RemoteStore;

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The kinds of request a fault can target.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Put,
    Get,
    Head,
    CreateMultipart,
    PutPart,
    CompleteMultipart,
    AbortMultipart,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::Put,
        Op::Get,
        Op::Head,
        Op::CreateMultipart,
        Op::PutPart,
        Op::CompleteMultipart,
        Op::AbortMultipart,
    ];
}

/// One injected misbehaviour.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// 503 Service Unavailable; nothing done.
    Unavailable,
    /// 503 with S3's `SlowDown` code (throttling); nothing done.
    SlowDown,
    /// 429 Too Many Requests; nothing done.
    TooManyRequests,
    /// Hang this long (past the caller's deadline), then fail with a
    /// timeout; nothing done.
    Timeout(Duration),
    /// Connection reset before the request reached the store; nothing done.
    ConnectionReset,
    /// The request is performed on the inner store, then the answer is lost
    /// (connection reset). The "committed but the client never heard" case.
    CommitThenLoseAnswer,
    /// 403 Forbidden (bad credentials, bucket policy); nothing done. Must
    /// not be retried.
    Forbidden,
    /// Wait this long, then behave normally.
    Latency(Duration),
    /// GET only: the body arrives cut short (random length).
    TruncateBody,
    /// GET only: one random bit of the body is flipped.
    FlipBit,
    /// The body moves slowly: a GET body arrives in `chunk_bytes` pieces,
    /// each after `chunk_delay`; a PUT or part payload takes `chunk_delay`
    /// per `chunk_bytes` to "send" before the store sees it (dropping the
    /// request meanwhile writes nothing). Exercises per-request deadlines
    /// on bodies that do make progress. PUT, part and GET only.
    SlowBody {
        chunk_bytes: usize,
        chunk_delay: Duration,
    },
    /// `PutPart` only: the part is acknowledged as usual, but the store
    /// keeps none of its bytes (a zero-length part), so a completion
    /// succeeds with a shorter, wrong object. Only a read-back catches it.
    LosePart,
    /// `PutPart` only: acknowledged as usual, but the store keeps other
    /// bytes of the same length (every byte XOR 0x5A): the completed object
    /// has the right size and the wrong content.
    ReplacePart,
}

impl Fault {
    fn applies_to(&self, op: Op) -> bool {
        match self {
            Fault::TruncateBody | Fault::FlipBit => op == Op::Get,
            Fault::SlowBody { .. } => matches!(op, Op::Put | Op::PutPart | Op::Get),
            Fault::LosePart | Fault::ReplacePart => op == Op::PutPart,
            _ => true,
        }
    }

    /// How long "sending" `len` bytes takes under [`Fault::SlowBody`].
    fn slow_body_time(&self, len: usize) -> Duration {
        match self {
            Fault::SlowBody {
                chunk_bytes,
                chunk_delay,
            } => {
                let chunks = len.div_ceil((*chunk_bytes).max(1)).max(1);
                chunk_delay.saturating_mul(u32::try_from(chunks).unwrap_or(u32::MAX))
            }
            _ => Duration::ZERO,
        }
    }
}

/// What an object held: the CRC32 and length of its bytes.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Content {
    pub crc: u32,
    pub len: u64,
}

impl Content {
    pub fn of(bytes: &[u8]) -> Content {
        Content {
            crc: crc32fast::hash(bytes),
            len: bytes.len() as u64,
        }
    }

    fn of_payload(p: &PutPayload) -> Content {
        let mut h = crc32fast::Hasher::new();
        for b in p {
            h.update(b);
        }
        Content {
            crc: h.finalize(),
            len: p.content_length() as u64,
        }
    }
}

/// How a write reached the store (the mode the *caller* asked for, even
/// when [`FaultyStore::ignore_conditionals`] downgraded it).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum WriteVia {
    /// `PutMode::Create` (If-None-Match: *).
    Create,
    /// `PutMode::Overwrite` (a plain PUT).
    Overwrite,
    /// `PutMode::Update` (If-Match).
    Update,
    /// A completed multipart upload (no conditional mode exists).
    Multipart,
}

/// One entry of a key's history, in the order the inner store saw them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyEvent {
    /// The inner store accepted a write (whether or not its answer reached
    /// the caller). `replaced`: what the key held just before, if anything.
    Written {
        seq: u64,
        via: WriteVia,
        content: Content,
        replaced: Option<Content>,
    },
    /// A delete through this wrapper succeeded.
    Deleted { seq: u64 },
}

/// A key written again with other content than its previous write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overwrite {
    pub key: Path,
    pub via: WriteVia,
    pub before: Content,
    pub after: Content,
    /// The earlier object was still there and was replaced by this write.
    /// False: it had been deleted first (a re-creation with new content).
    pub in_place: bool,
}

/// Counters since construction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Requests seen per op (faulted or not).
    pub requests: HashMap<Op, u64>,
    /// Faults injected.
    pub injected: u64,
    /// Faults injected per op.
    pub injected_on: HashMap<Op, u64>,
    /// `PutMode::Create` requests that found the key taken (AlreadyExists).
    pub create_conflicts: u64,
    /// Writes that replaced an existing object (a PUT that was not refused
    /// on an existing key, or a multipart completion over one), whatever
    /// the content. [`FaultyStore::overwrites`] tells same from different.
    pub overwrites: u64,
    /// `PutMode::Create` requests that replaced an existing object. Never
    /// allowed on a store that honours conditional creates.
    pub create_replaced: u64,
    /// Objects deleted through this wrapper.
    pub deletes: u64,
    /// Parts accepted by the inner store.
    pub parts_put: u64,
}

impl FaultStats {
    pub fn requests(&self, op: Op) -> u64 {
        self.requests.get(&op).copied().unwrap_or(0)
    }

    pub fn injected_on(&self, op: Op) -> u64 {
        self.injected_on.get(&op).copied().unwrap_or(0)
    }
}

struct RandomPlan {
    probability: f64,
    faults: Vec<Fault>,
    ops: Vec<Op>,
}

#[derive(Default)]
struct Counters {
    requests: Mutex<HashMap<Op, u64>>,
    injected_on: Mutex<HashMap<Op, u64>>,
    injected: AtomicU64,
    create_conflicts: AtomicU64,
    overwrites: AtomicU64,
    create_replaced: AtomicU64,
    deletes: AtomicU64,
    parts_put: AtomicU64,
    /// Per key, every accepted write and delete, in order.
    history: Mutex<BTreeMap<Path, Vec<KeyEvent>>>,
    seq: AtomicU64,
}

impl Counters {
    fn written(&self, key: &Path, via: WriteVia, content: Content, replaced: Option<Content>) {
        if replaced.is_some() && !probe_scratch(key) {
            self.overwrites.fetch_add(1, Ordering::SeqCst);
            if via == WriteVia::Create {
                self.create_replaced.fetch_add(1, Ordering::SeqCst);
            }
        }
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        lock(&self.history)
            .entry(key.clone())
            .or_default()
            .push(KeyEvent::Written {
                seq,
                via,
                content,
                replaced,
            });
    }

    fn deleted(&self, key: &Path) {
        self.deletes.fetch_add(1, Ordering::SeqCst);
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        lock(&self.history)
            .entry(key.clone())
            .or_default()
            .push(KeyEvent::Deleted { seq });
    }
}

/// The capability probe's scratch objects (`{prefix}/_probe/...`): its
/// conditional-update step replaces one on purpose (If-Match with the
/// current e-tag), which is not an overwrite of anybody's data, so neither
/// the `overwrites` counter nor [`FaultyStore::overwrites`] counts them.
fn probe_scratch(key: &Path) -> bool {
    key.parts().any(|p| p.as_ref() == "_probe")
}

/// A fault-injecting wrapper around an object store (and its multipart API).
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    inner_mp: Option<Arc<dyn MultipartStore>>,
    display: String,
    rng: Mutex<fastrand::Rng>,
    script: Mutex<HashMap<Op, VecDeque<Fault>>>,
    random: Mutex<Option<RandomPlan>>,
    ignore_conditionals: AtomicBool,
    refuse_if_match: AtomicBool,
    counters: Arc<Counters>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not hide the counters from the others.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug)]
struct Injected(String);

impl fmt::Display for Injected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Injected {}

fn status_error(status: &str, code: &str) -> object_store::Error {
    // Same wording as object_store's own HTTP status errors, so the crate's
    // classifier sees what it would see from a real S3 server.
    object_store::Error::Generic {
        store: "FaultyStore",
        source: Box::new(Injected(format!(
            "Server returned non-2xx status code: {status}: <Error><Code>{code}</Code>\
             <Message>injected fault</Message></Error>"
        ))),
    }
}

fn transport_error(kind: HttpErrorKind, io: std::io::ErrorKind) -> object_store::Error {
    object_store::Error::Generic {
        store: "FaultyStore",
        source: Box::new(HttpError::new(
            kind,
            std::io::Error::new(io, "injected fault"),
        )),
    }
}

impl FaultyStore {
    /// Wraps `inner` (and its multipart API, when it has one). `display` is
    /// the URL [`FaultyStore::remote`] gives the [`RemoteStore`]; its scheme
    /// selects the backend rules (`memory://` allows small parts).
    pub fn new(
        inner: Arc<dyn ObjectStore>,
        inner_mp: Option<Arc<dyn MultipartStore>>,
        display: &str,
        seed: u64,
    ) -> Arc<FaultyStore> {
        Arc::new(FaultyStore {
            inner,
            inner_mp,
            display: display.to_string(),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            script: Mutex::new(HashMap::new()),
            random: Mutex::new(None),
            ignore_conditionals: AtomicBool::new(false),
            refuse_if_match: AtomicBool::new(false),
            counters: Arc::new(Counters::default()),
        })
    }

    /// A fresh `InMemory` store, with multipart.
    pub fn memory(seed: u64) -> Arc<FaultyStore> {
        let mem = Arc::new(InMemory::new());
        Self::new(
            mem.clone(),
            Some(mem as Arc<dyn MultipartStore>),
            &Self::memory_name(),
            seed,
        )
    }

    /// `memory://faulty-N`, a name no other store in this process has: the
    /// lease sightings kept per store name and stream
    /// (`remote::manifest::renewal`) are process-wide, and two tests'
    /// stores under one name would share them.
    pub fn memory_name() -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        format!("memory://faulty-{}", N.fetch_add(1, Ordering::Relaxed))
    }

    /// A `LocalFileSystem` store rooted at `dir` (no multipart API).
    pub fn local(dir: &std::path::Path, seed: u64) -> Arc<FaultyStore> {
        let fs = LocalFileSystem::new_with_prefix(dir)
            .unwrap_or_else(|e| panic!("local store at {}: {e}", dir.display()));
        Self::new(
            Arc::new(fs),
            None,
            &format!("file://{}", dir.display()),
            seed,
        )
    }

    /// A [`RemoteStore`] that sends everything through this wrapper.
    pub fn remote(self: &Arc<Self>, prefix: &str) -> RemoteStore {
        let mp = self
            .inner_mp
            .as_ref()
            .map(|_| self.clone() as Arc<dyn MultipartStore>);
        RemoteStore::from_parts(self.clone(), mp, prefix, &self.display)
    }

    /// The wrapped store, for tests that inspect or damage objects directly.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Inject `fault` into the next `n` requests of kind `op` (after any
    /// already scripted ones).
    pub fn fail_next(&self, op: Op, n: usize, fault: Fault) {
        let mut s = lock(&self.script);
        let q = s.entry(op).or_default();
        for _ in 0..n {
            q.push_back(fault.clone());
        }
    }

    /// With `probability`, inject one of `faults` (chosen by the seeded RNG)
    /// into any request of the kinds in `ops` that has no scripted fault.
    pub fn set_random(&self, probability: f64, faults: Vec<Fault>, ops: &[Op]) {
        *lock(&self.random) = Some(RandomPlan {
            probability,
            faults,
            ops: ops.to_vec(),
        });
    }

    /// Stop injecting (scripted and random).
    pub fn heal(&self) {
        lock(&self.script).clear();
        *lock(&self.random) = None;
    }

    /// Behave like a store that ignores If-None-Match / If-Match (Garage):
    /// `Create` and `Update` puts overwrite.
    pub fn ignore_conditionals(&self, on: bool) {
        self.ignore_conditionals.store(on, Ordering::SeqCst);
    }

    /// Behave like Ceph RGW 16.2 with a quoted e-tag: every `Update` put
    /// answers 412 Precondition Failed, the current e-tag too; nothing is
    /// written.
    pub fn refuse_if_match(&self, on: bool) {
        self.refuse_if_match.store(on, Ordering::SeqCst);
    }

    pub fn stats(&self) -> FaultStats {
        let c = &self.counters;
        FaultStats {
            requests: lock(&c.requests).clone(),
            injected: c.injected.load(Ordering::SeqCst),
            injected_on: lock(&c.injected_on).clone(),
            create_conflicts: c.create_conflicts.load(Ordering::SeqCst),
            overwrites: c.overwrites.load(Ordering::SeqCst),
            create_replaced: c.create_replaced.load(Ordering::SeqCst),
            deletes: c.deletes.load(Ordering::SeqCst),
            parts_put: c.parts_put.load(Ordering::SeqCst),
        }
    }

    /// Every key's history of accepted writes and deletes.
    pub fn history(&self) -> BTreeMap<Path, Vec<KeyEvent>> {
        lock(&self.counters.history).clone()
    }

    /// The final content of every key whose last event is a write.
    pub fn last_written(&self) -> BTreeMap<Path, Content> {
        lock(&self.counters.history)
            .iter()
            .filter_map(|(k, evs)| match evs.last()? {
                KeyEvent::Written { content, .. } => Some((k.clone(), *content)),
                KeyEvent::Deleted { .. } => None,
            })
            .collect()
    }

    /// Every write to a key that already had been written with *other*
    /// content: in place (the old object was still there) or after a delete.
    pub fn overwrites(&self) -> Vec<Overwrite> {
        self.rewrites().0
    }

    /// Writes that put the same content a key already held (in place or
    /// after a delete): harmless, but counted apart from overwrites.
    pub fn same_content_rewrites(&self) -> Vec<(Path, Content, WriteVia)> {
        self.rewrites().1
    }

    #[allow(clippy::type_complexity)]
    fn rewrites(&self) -> (Vec<Overwrite>, Vec<(Path, Content, WriteVia)>) {
        let mut differ = Vec::new();
        let mut same = Vec::new();
        for (key, evs) in lock(&self.counters.history).iter() {
            if probe_scratch(key) {
                continue;
            }
            let mut last: Option<Content> = None;
            for e in evs {
                let KeyEvent::Written {
                    via,
                    content,
                    replaced,
                    ..
                } = e
                else {
                    continue;
                };
                // What the key held before: observed at write time when the
                // object was still there, else our own previous write.
                let (before, in_place) = match (replaced, last) {
                    (Some(r), _) => (Some(*r), true),
                    (None, l) => (l, false),
                };
                match before {
                    Some(b) if b != *content => differ.push(Overwrite {
                        key: key.clone(),
                        via: *via,
                        before: b,
                        after: *content,
                        in_place,
                    }),
                    Some(_) => same.push((key.clone(), *content, *via)),
                    None => {}
                }
                last = Some(*content);
            }
        }
        (differ, same)
    }

    /// Rewrites an object in the inner store through `f` (keeping its
    /// metadata), bypassing faults and counters: simulated bit rot,
    /// truncation, or a foreign writer.
    pub async fn tamper(&self, location: &Path, f: impl FnOnce(&mut Vec<u8>)) {
        let got = self
            .inner
            .get(location)
            .await
            .expect("tamper: object exists");
        let attributes = got.attributes.clone();
        let mut body = got.bytes().await.expect("tamper: read body").to_vec();
        f(&mut body);
        let opts = PutOptions {
            attributes,
            ..Default::default()
        };
        self.inner
            .put_opts(location, PutPayload::from(body), opts)
            .await
            .expect("tamper: write back");
    }

    fn next_fault(&self, op: Op) -> Option<Fault> {
        *lock(&self.counters.requests).entry(op).or_default() += 1;
        let scripted = lock(&self.script).get_mut(&op).and_then(|q| q.pop_front());
        let fault = scripted.or_else(|| {
            let plan = lock(&self.random);
            let plan = plan.as_ref()?;
            if plan.faults.is_empty() || !plan.ops.contains(&op) {
                return None;
            }
            let mut rng = lock(&self.rng);
            if rng.f64() >= plan.probability {
                return None;
            }
            Some(plan.faults[rng.usize(..plan.faults.len())].clone())
        })?;
        if !fault.applies_to(op) {
            return None;
        }
        self.counters.injected.fetch_add(1, Ordering::SeqCst);
        *lock(&self.counters.injected_on).entry(op).or_default() += 1;
        Some(fault)
    }

    /// Applies the "before the request" part of a fault: an error to return
    /// instead of doing anything, or a delay.
    async fn before(&self, fault: &Option<Fault>) -> Result<()> {
        match fault {
            Some(Fault::Unavailable) => Err(status_error(
                "503 Service Unavailable",
                "ServiceUnavailable",
            )),
            Some(Fault::SlowDown) => Err(status_error("503 Service Unavailable", "SlowDown")),
            Some(Fault::TooManyRequests) => {
                Err(status_error("429 Too Many Requests", "TooManyRequests"))
            }
            Some(Fault::Forbidden) => Err(status_error("403 Forbidden", "AccessDenied")),
            Some(Fault::Timeout(d)) => {
                tokio::time::sleep(*d).await;
                Err(transport_error(
                    HttpErrorKind::Timeout,
                    std::io::ErrorKind::TimedOut,
                ))
            }
            Some(Fault::ConnectionReset) => Err(transport_error(
                HttpErrorKind::Request,
                std::io::ErrorKind::ConnectionReset,
            )),
            Some(Fault::Latency(d)) => {
                tokio::time::sleep(*d).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Applies the "after the request" part: a lost answer.
    fn after<T>(&self, fault: &Option<Fault>, res: Result<T>) -> Result<T> {
        match fault {
            Some(Fault::CommitThenLoseAnswer) => {
                drop(res);
                Err(transport_error(
                    HttpErrorKind::Request,
                    std::io::ErrorKind::ConnectionReset,
                ))
            }
            _ => res,
        }
    }

    /// What `location` holds in the inner store now (bypassing faults).
    async fn current(&self, location: &Path) -> Option<Content> {
        let got = self.inner.get(location).await.ok()?;
        let body = got.bytes().await.ok()?;
        Some(Content::of(&body))
    }

    fn mangle(&self, fault: &Option<Fault>, body: Bytes) -> Bytes {
        let mut rng = lock(&self.rng);
        match fault {
            Some(Fault::TruncateBody) if !body.is_empty() => body.slice(..rng.usize(..body.len())),
            Some(Fault::FlipBit) if !body.is_empty() => {
                let mut v = body.to_vec();
                let i = rng.usize(..v.len());
                v[i] ^= 1 << rng.u8(..8);
                Bytes::from(v)
            }
            _ => body,
        }
    }

    /// The time a [`Fault::SlowBody`] request spends moving `len` bytes.
    async fn slow_send(&self, fault: &Option<Fault>, len: usize) {
        if let Some(f @ Fault::SlowBody { .. }) = fault {
            tokio::time::sleep(f.slow_body_time(len)).await;
        }
    }

    fn mp(&self) -> Result<&Arc<dyn MultipartStore>> {
        self.inner_mp
            .as_ref()
            .ok_or_else(|| object_store::Error::NotImplemented {
                operation: "multipart".into(),
                implementer: self.to_string(),
            })
    }
}

/// `body` in `chunk_bytes` pieces, each yielded after `delay`.
fn slow_stream(
    body: Bytes,
    chunk_bytes: usize,
    delay: Duration,
) -> BoxStream<'static, Result<Bytes>> {
    let step = chunk_bytes.max(1);
    futures::stream::unfold(body, move |mut rest| async move {
        if rest.is_empty() {
            return None;
        }
        tokio::time::sleep(delay).await;
        let chunk = rest.split_to(step.min(rest.len()));
        Some((Ok(chunk), rest))
    })
    .boxed()
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyStore")
            .field("inner", &self.inner.to_string())
            .field("multipart", &self.inner_mp.is_some())
            .finish()
    }
}

impl ObjectStore for FaultyStore {
    fn put_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> BoxFut<'async_trait, Result<PutResult>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let fault = self.next_fault(Op::Put);
            self.before(&fault).await?;
            self.slow_send(&fault, payload.content_length()).await;
            let via = match opts.mode {
                PutMode::Create => WriteVia::Create,
                PutMode::Overwrite => WriteVia::Overwrite,
                PutMode::Update(_) => WriteVia::Update,
            };
            if self.ignore_conditionals.load(Ordering::SeqCst) {
                opts.mode = PutMode::Overwrite;
            }
            if matches!(opts.mode, PutMode::Update(_))
                && self.refuse_if_match.load(Ordering::SeqCst)
            {
                let res = Err(object_store::Error::Precondition {
                    path: location.to_string(),
                    source: Box::new(Injected("412 Precondition Failed (If-Match)".into())),
                });
                return self.after(&fault, res);
            }
            let content = Content::of_payload(&payload);
            let replaced = self.current(location).await;
            let res = self.inner.put_opts(location, payload, opts).await;
            match &res {
                Err(object_store::Error::AlreadyExists { .. }) => {
                    self.counters
                        .create_conflicts
                        .fetch_add(1, Ordering::SeqCst);
                }
                Ok(_) => self.counters.written(location, via, content, replaced),
                _ => {}
            }
            self.after(&fault, res)
        })
    }

    fn put_multipart_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        opts: PutMultipartOptions,
    ) -> BoxFut<'async_trait, Result<Box<dyn MultipartUpload>>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        // Not used by tierindex (it drives MultipartStore directly); passed
        // through without faults.
        Box::pin(async move { self.inner.put_multipart_opts(location, opts).await })
    }

    fn get_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        options: GetOptions,
    ) -> BoxFut<'async_trait, Result<GetResult>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let op = if options.head { Op::Head } else { Op::Get };
            let fault = self.next_fault(op);
            self.before(&fault).await?;
            let res = self.after(&fault, self.inner.get_opts(location, options).await)?;
            if !matches!(
                fault,
                Some(Fault::TruncateBody | Fault::FlipBit | Fault::SlowBody { .. })
            ) {
                return Ok(res);
            }
            let GetResult {
                meta,
                range,
                attributes,
                extensions,
                payload,
            } = res;
            let body = GetResult {
                payload,
                meta: meta.clone(),
                range: range.clone(),
                attributes: attributes.clone(),
                extensions: extensions.clone(),
            }
            .bytes()
            .await?;
            let body = self.mangle(&fault, body);
            let stream = match fault {
                Some(Fault::SlowBody {
                    chunk_bytes,
                    chunk_delay,
                }) => slow_stream(body, chunk_bytes, chunk_delay),
                _ => futures::stream::once(async { Ok(body) }).boxed(),
            };
            Ok(GetResult {
                payload: GetResultPayload::Stream(stream),
                meta,
                range,
                attributes,
                extensions,
            })
        })
    }

    fn get_ranges<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        ranges: &'life2 [Range<u64>],
    ) -> BoxFut<'async_trait, Result<Vec<Bytes>>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let fault = self.next_fault(Op::Get);
            self.before(&fault).await?;
            let res = self.after(&fault, self.inner.get_ranges(location, ranges).await)?;
            let len = res.iter().map(Bytes::len).sum();
            self.slow_send(&fault, len).await;
            Ok(res)
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let counters = self.counters.clone();
        self.inner
            .delete_stream(locations)
            .inspect(move |r| {
                if let Ok(p) = r {
                    counters.deleted(p);
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    fn list_with_delimiter<'life0, 'life1, 'async_trait>(
        &'life0 self,
        prefix: Option<&'life1 Path>,
    ) -> BoxFut<'async_trait, Result<ListResult>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move { self.inner.list_with_delimiter(prefix).await })
    }

    fn copy_opts<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        from: &'life1 Path,
        to: &'life2 Path,
        options: CopyOptions,
    ) -> BoxFut<'async_trait, Result<()>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move { self.inner.copy_opts(from, to, options).await })
    }
}

impl MultipartStore for FaultyStore {
    fn create_multipart<'life0, 'life1, 'async_trait>(
        &'life0 self,
        path: &'life1 Path,
    ) -> BoxFut<'async_trait, Result<MultipartId>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        self.create_multipart_opts(path, PutMultipartOptions::default())
    }

    fn create_multipart_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        path: &'life1 Path,
        opts: PutMultipartOptions,
    ) -> BoxFut<'async_trait, Result<MultipartId>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let mp = self.mp()?;
            let fault = self.next_fault(Op::CreateMultipart);
            self.before(&fault).await?;
            let res = mp.create_multipart_opts(path, opts).await;
            self.after(&fault, res)
        })
    }

    fn put_part<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        path: &'life1 Path,
        id: &'life2 MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> BoxFut<'async_trait, Result<PartId>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let mp = self.mp()?;
            let fault = self.next_fault(Op::PutPart);
            self.before(&fault).await?;
            self.slow_send(&fault, data.content_length()).await;
            let data = match fault {
                // Acknowledged below like any part; the store keeps other
                // bytes than were sent.
                Some(Fault::LosePart) => PutPayload::new(),
                Some(Fault::ReplacePart) => {
                    let mut v = Vec::with_capacity(data.content_length());
                    for b in &data {
                        v.extend(b.iter().map(|x| x ^ 0x5A));
                    }
                    PutPayload::from(v)
                }
                _ => data,
            };
            let res = mp.put_part(path, id, part_idx, data).await;
            if res.is_ok() {
                self.counters.parts_put.fetch_add(1, Ordering::SeqCst);
            }
            self.after(&fault, res)
        })
    }

    fn complete_multipart<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        path: &'life1 Path,
        id: &'life2 MultipartId,
        parts: Vec<PartId>,
    ) -> BoxFut<'async_trait, Result<PutResult>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let mp = self.mp()?;
            let fault = self.next_fault(Op::CompleteMultipart);
            self.before(&fault).await?;
            let replaced = self.current(path).await;
            let res = mp.complete_multipart(path, id, parts).await;
            if res.is_ok() {
                // What the completion produced (the parts as stored).
                let content = self
                    .current(path)
                    .await
                    .unwrap_or(Content { crc: 0, len: 0 });
                self.counters
                    .written(path, WriteVia::Multipart, content, replaced);
            }
            self.after(&fault, res)
        })
    }

    fn abort_multipart<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        path: &'life1 Path,
        id: &'life2 MultipartId,
    ) -> BoxFut<'async_trait, Result<()>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let mp = self.mp()?;
            let fault = self.next_fault(Op::AbortMultipart);
            self.before(&fault).await?;
            let res = mp.abort_multipart(path, id).await;
            self.after(&fault, res)
        })
    }
}

/// One request as a [`canned_http`] server received it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The request target (path and query).
    pub target: String,
    /// Header names lower-cased, values trimmed.
    pub headers: Vec<(String, String)>,
}

/// A local HTTP server started by [`canned_http`].
pub struct CannedHttp {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// Every request received so far, in order.
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

/// A local HTTP server on a tokio task that answers the n-th request with
/// `answers[n]` (status, extra header lines, body) and closes the
/// connection; 500 once they run out. For tests of what tierindex sends
/// and how it takes hostile answers.
pub async fn canned_http(answers: Vec<(u16, &'static str, String)>) -> CannedHttp {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        let mut n = 0usize;
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
            let head = String::from_utf8_lossy(&buf).to_string();
            let mut lines = head.split("\r\n");
            let target = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .unwrap_or("")
                .to_string();
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            log.lock().unwrap().push(Seen { target, headers });
            let (status, extra, body) = answers.get(n).cloned().unwrap_or((500, "", String::new()));
            n += 1;
            let resp = format!(
                "HTTP/1.1 {status} X\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
    CannedHttp { endpoint, seen }
}

/// `*.active` files in `data_dir/segments` now.
pub fn active_files(data_dir: &std::path::Path) -> usize {
    std::fs::read_dir(data_dir.join("segments"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".active")
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scripted_faults_then_healthy() {
        let f = FaultyStore::memory(1);
        let p = Path::from("a");
        f.fail_next(Op::Put, 2, Fault::Unavailable);
        assert!(f.put(&p, PutPayload::from_static(b"x")).await.is_err());
        assert!(f.put(&p, PutPayload::from_static(b"x")).await.is_err());
        assert!(f.put(&p, PutPayload::from_static(b"x")).await.is_ok());
        let s = f.stats();
        assert_eq!(s.injected, 2);
        assert_eq!(s.requests(Op::Put), 3);
        assert_eq!(s.overwrites, 0);
        // Second plain PUT on the same key is an overwrite.
        f.put(&p, PutPayload::from_static(b"y")).await.unwrap();
        assert_eq!(f.stats().overwrites, 1);
    }

    #[tokio::test]
    async fn commit_then_lose_answer_commits() {
        let f = FaultyStore::memory(1);
        let p = Path::from("a");
        f.fail_next(Op::Put, 1, Fault::CommitThenLoseAnswer);
        assert!(f.put(&p, PutPayload::from_static(b"x")).await.is_err());
        let body = f.inner().get(&p).await.unwrap().bytes().await.unwrap();
        assert_eq!(&body[..], b"x");
        let create = PutOptions::from(PutMode::Create);
        let r = f.put_opts(&p, PutPayload::from_static(b"x"), create).await;
        assert!(matches!(r, Err(object_store::Error::AlreadyExists { .. })));
        assert_eq!(f.stats().create_conflicts, 1);
    }

    #[tokio::test]
    async fn get_body_damage_is_deterministic_per_seed() {
        let body: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        let run = |seed| {
            let body = body.clone();
            async move {
                let f = FaultyStore::memory(seed);
                let p = Path::from("a");
                f.put(&p, PutPayload::from(body)).await.unwrap();
                f.fail_next(Op::Get, 1, Fault::FlipBit);
                f.fail_next(Op::Get, 1, Fault::TruncateBody);
                let a = f.get(&p).await.unwrap().bytes().await.unwrap();
                let b = f.get(&p).await.unwrap().bytes().await.unwrap();
                let c = f.get(&p).await.unwrap().bytes().await.unwrap();
                (a, b, c)
            }
        };
        let (a, b, c) = run(9).await;
        assert_eq!(a.len(), body.len());
        assert_eq!(
            a.iter()
                .zip(&body)
                .map(|(x, y)| (x ^ y).count_ones())
                .sum::<u32>(),
            1
        );
        assert!(b.len() < body.len());
        assert_eq!(c, body);
        assert_eq!(run(9).await, (a, b, c));
    }

    // On tokio's paused clock: the timings below are exact, not a race with
    // the machine's load.
    #[tokio::test(start_paused = true)]
    async fn slow_body_trickles_and_can_be_cut_by_a_deadline() {
        let f = FaultyStore::memory(1);
        let p = Path::from("a");
        let body: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        f.put(&p, PutPayload::from(body.clone())).await.unwrap();
        let slow = Fault::SlowBody {
            chunk_bytes: 100,
            chunk_delay: Duration::from_millis(20),
        };
        // Answer at once, body in ten pieces over ~200 ms.
        f.fail_next(Op::Get, 1, slow.clone());
        let t = tokio::time::Instant::now();
        let got = f.get(&p).await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(100));
        let mut chunks = 0;
        let mut all = Vec::new();
        let mut s = got.into_stream();
        while let Some(c) = s.next().await {
            chunks += 1;
            all.extend_from_slice(&c.unwrap());
        }
        assert_eq!((chunks, all), (10, body.clone()));
        assert!(t.elapsed() >= Duration::from_millis(200));
        // A deadline shorter than the body time cuts the read.
        f.fail_next(Op::Get, 1, slow.clone());
        let cut = tokio::time::timeout(Duration::from_millis(50), async {
            f.get(&p).await.unwrap().bytes().await
        })
        .await;
        assert!(cut.is_err());
        // A slow PUT dropped before it is "sent" writes nothing.
        let q = Path::from("b");
        f.fail_next(Op::Put, 1, slow);
        let put = f.put(&q, PutPayload::from(body));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), put)
                .await
                .is_err()
        );
        assert!(f.inner().head(&q).await.is_err());
        assert_eq!(f.stats().injected_on(Op::Get), 2);
        assert_eq!(f.stats().injected_on(Op::Put), 1);
        // Not a HEAD fault (no body).
        f.fail_next(
            Op::Head,
            1,
            Fault::SlowBody {
                chunk_bytes: 1,
                chunk_delay: Duration::from_secs(60),
            },
        );
        f.head(&p).await.unwrap();
    }

    #[tokio::test]
    async fn lost_and_replaced_parts_complete_into_a_wrong_object() {
        let f = FaultyStore::memory(1);
        let mp = f.clone() as Arc<dyn MultipartStore>;
        let part = |i: u8| PutPayload::from(vec![i; 100]);
        for (fault, want_len) in [(Fault::LosePart, 200u64), (Fault::ReplacePart, 300)] {
            let p = Path::from(format!("{fault:?}"));
            let id = mp.create_multipart(&p).await.unwrap();
            let mut parts = Vec::new();
            f.fail_next(Op::PutPart, 1, fault.clone());
            for i in 0..3u8 {
                parts.push(mp.put_part(&p, &id, i as usize, part(i)).await.unwrap());
            }
            mp.complete_multipart(&p, &id, parts).await.unwrap();
            let got = f.inner().get(&p).await.unwrap().bytes().await.unwrap();
            assert_eq!(got.len() as u64, want_len, "{fault:?}");
            assert_ne!(&got[..100], &[0u8; 100][..], "{fault:?}: part 0 damaged");
            assert_eq!(&got[got.len() - 100..], &[2u8; 100][..]);
            // The write log records what the completion really produced.
            assert_eq!(f.last_written()[&p], Content::of(&got));
        }
    }

    #[tokio::test]
    async fn write_log_tells_overwrites_from_rewrites() {
        let f = FaultyStore::memory(1);
        let (a, b) = (Path::from("a"), Path::from("b"));
        let create = || PutOptions::from(PutMode::Create);
        f.put_opts(&a, PutPayload::from_static(b"1"), create())
            .await
            .unwrap();
        assert!(
            f.put_opts(&a, PutPayload::from_static(b"2"), create())
                .await
                .is_err()
        );
        assert!(f.overwrites().is_empty());
        // Same bytes in place, then other bytes in place.
        f.put(&a, PutPayload::from_static(b"1")).await.unwrap();
        f.put(&a, PutPayload::from_static(b"3")).await.unwrap();
        // Delete, then re-create with other bytes.
        f.put(&b, PutPayload::from_static(b"x")).await.unwrap();
        f.delete(&b).await.unwrap();
        f.put_opts(&b, PutPayload::from_static(b"y"), create())
            .await
            .unwrap();
        let ow = f.overwrites();
        assert_eq!(ow.len(), 2, "{ow:?}");
        assert_eq!(
            (ow[0].key.as_ref(), ow[0].in_place, ow[0].via),
            ("a", true, WriteVia::Overwrite)
        );
        assert_eq!(ow[0].before, Content::of(b"1"));
        assert_eq!(ow[0].after, Content::of(b"3"));
        assert_eq!(
            (ow[1].key.as_ref(), ow[1].in_place, ow[1].via),
            ("b", false, WriteVia::Create)
        );
        let same = f.same_content_rewrites();
        assert_eq!(same.len(), 1, "{same:?}");
        let st = f.stats();
        assert_eq!((st.overwrites, st.create_replaced, st.deletes), (2, 0, 1));
        assert!(matches!(
            f.history()[&b][..],
            [
                KeyEvent::Written { .. },
                KeyEvent::Deleted { .. },
                KeyEvent::Written { .. }
            ]
        ));
    }

    #[tokio::test]
    async fn ignore_conditionals_overwrites_like_garage() {
        let f = FaultyStore::memory(1);
        f.ignore_conditionals(true);
        let p = Path::from("a");
        let create = || PutOptions::from(PutMode::Create);
        f.put_opts(&p, PutPayload::from_static(b"1"), create())
            .await
            .unwrap();
        f.put_opts(&p, PutPayload::from_static(b"2"), create())
            .await
            .unwrap();
        assert_eq!(f.stats().overwrites, 1);
        assert_eq!(f.stats().create_conflicts, 0);
        // The caller asked for a create: it replaced an object.
        assert_eq!(f.stats().create_replaced, 1);
        assert_eq!(f.overwrites()[0].via, WriteVia::Create);
    }
}
