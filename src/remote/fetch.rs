//! Reading index segments back from the store: key lookups by range GETs.
//!
//! The caller names the segments it trusts as committed ([`RemoteSegment`]:
//! key plus the [`SealedMeta`] recorded when the segment was verified, from
//! the journal or, later, the remote manifest). An object that is in the
//! bucket but not in that list (a partial or abandoned upload) is never
//! read: the fetcher does not list the bucket.
//!
//! Per segment, the first lookup reads (and caches) its *index*: the footer
//! (one ranged GET of the last [`FOOTER_LEN`] bytes) and the header plus
//! slot directory (one ranged GET). Every later lookup of any key in that
//! segment costs one ranged GET: the items of the key's slot, which sealing
//! laid out contiguously. Segments whose time range cannot match are
//! skipped from the caller's metadata, without a request.
//!
//! Everything read is untrusted and checked before use:
//! - the object size reported by the store equals the recorded `file_len`
//!   (a short object is a partial upload, a longer one someone else's);
//! - the footer: magic, its own CRC, version, layout, and every field the
//!   journal recorded (id, counts, time and offset ranges);
//! - the header agrees with the footer; the slot directory has its CRC
//!   (`dir_crc`), starts at 0, is monotone and ends at the item count;
//! - each item read has its own CRC (salted with the segment id), sits in
//!   the slot its key hash names, and lies inside the recorded time and
//!   offset ranges;
//! - every range GET must return exactly the bytes asked for.
//!
//! Any mismatch is [`Error::Corrupt`] naming the key: the caller reports
//! it and repairs from a local copy where one is held. Transient store
//! errors are retried ([`RetryPolicy`]); nothing here panics on hostile
//! bytes.
//!
//! The index cache is bounded in bytes (the directory is 4 bytes per slot)
//! and evicts the least recently used segment.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStoreExt};

use crate::error::{Error, Result};
use crate::remote::manifest::SegmentEntry;
use crate::remote::{RemoteStore, classify};
use crate::segment::format::{
    self, FOOTER_LEN, FileSums, Footer, HEADER_LEN, Header, SEALED_ITEM_LEN, SEALED_MAGIC,
    SumsHasher,
};
use crate::segment::{Entry, SealedMeta, TimeRange};
use crate::retry::{RetryPolicy, with_retries};

/// Index bytes (footers and slot directories) a `TierIndex`, `tierindex
/// lookup --remote` and the reconciler cache for remote reads.
pub const REMOTE_INDEX_CACHE_BYTES: usize = 64 << 20;

/// Segments read at once by [`Fetcher::lookup`].
#[cfg(any(test, feature = "testing"))]
pub const LOOKUP_PARALLELISM: usize = 8;

/// A segment the caller trusts as committed: where it is and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSegment {
    pub key: Path,
    pub meta: SealedMeta,
}

impl RemoteSegment {
    /// The segment a manifest entry lists (creation and seal times are not
    /// in the manifest; the fetcher does not compare them).
    pub fn from_entry(e: &SegmentEntry) -> Result<RemoteSegment> {
        let key = Path::parse(&e.key)
            .map_err(|err| Error::corrupt("manifest entry", format!("key {:?}: {err}", e.key)))?;
        Ok(RemoteSegment {
            key,
            meta: Self::meta_of(e),
        })
    }

    /// What a manifest entry says of its segment (no creation or seal
    /// time: the manifest does not keep them).
    pub fn meta_of(e: &SegmentEntry) -> SealedMeta {
        SealedMeta {
                id: e.id,
                file_len: e.file_len,
                file_crc: e.file_crc,
                crc64: e.crc64,
                item_count: e.item_count,
                min_ts: e.min_ts,
                max_ts: e.max_ts,
                min_offset: e.min_offset,
                max_offset: e.max_offset,
                created_ms: 0,
                sealed_ms: 0,
        }
    }
}

/// The checked, cached part of a remote segment needed for lookups.
#[derive(Debug)]
struct SegmentIndex {
    footer: Footer,
    /// `slot_count + 1` item start indexes.
    dir: Vec<u32>,
}

impl SegmentIndex {
    fn bytes(&self) -> usize {
        self.dir.len() * 4 + FOOTER_LEN
    }
}

struct Cached {
    index: Arc<SegmentIndex>,
    last_use: u64,
}

/// Segment indexes, least recently used evicted first: `order` maps each
/// entry's last use (a counter, unique) to its key, so a hit and an
/// eviction are O(log n) (a scan for the oldest was O(n) per eviction).
/// Hand-written rather than the `lru` crate: the bound is in bytes, not
/// entries, and the just-loaded index must never be the victim.
#[derive(Default)]
struct Cache {
    map: HashMap<String, Cached>,
    order: std::collections::BTreeMap<u64, String>,
    bytes: usize,
    clock: u64,
}

impl Cache {
    fn remove(&mut self, key: &str) {
        if let Some(old) = self.map.remove(key) {
            self.bytes -= old.index.bytes();
            self.order.remove(&old.last_use);
        }
    }
}

/// Request counters of a [`Fetcher`] (cumulative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg(any(test, feature = "testing"))]
pub struct FetchStats {
    /// Ranged GETs sent (each retry counts).
    pub requests: u64,
    /// Bytes received in ranged GET bodies.
    pub bytes: u64,
    /// Lookups answered from a cached index.
    pub index_hits: u64,
    /// Indexes read from the store.
    pub index_loads: u64,
    /// Segments skipped from metadata alone (time range).
    pub skipped: u64,
}

/// Key lookups across remote segments, with a bounded index cache.
pub struct Fetcher {
    store: RemoteStore,
    policy: RetryPolicy,
    cache_limit: usize,
    cache: Mutex<Cache>,
    requests: AtomicU64,
    bytes: AtomicU64,
    index_hits: AtomicU64,
    index_loads: AtomicU64,
    skipped: AtomicU64,
}

impl Fetcher {
    /// `cache_bytes`: the most index bytes kept (at least one index is kept
    /// while it is used, whatever its size).
    pub fn new(store: RemoteStore, policy: RetryPolicy, cache_bytes: usize) -> Fetcher {
        Fetcher {
            store,
            policy,
            cache_limit: cache_bytes,
            cache: Mutex::new(Cache::default()),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            index_hits: AtomicU64::new(0),
            index_loads: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn stats(&self) -> FetchStats {
        FetchStats {
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            index_hits: self.index_hits.load(Ordering::Relaxed),
            index_loads: self.index_loads.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
        }
    }

    /// Index bytes held in the cache now.
    #[cfg(any(test, feature = "testing"))]
    pub fn cached_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Forget a segment's cached index (after a repair, say).
    pub fn invalidate(&self, key: &Path) {
        self.lock().remove(key.as_ref());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries for `key_hash` within `range` in each segment, in the order
    /// given (oldest first by convention), append order within a segment.
    /// Up to [`LOOKUP_PARALLELISM`] segments are read at once; the first
    /// failure is returned, naming its key.
    #[cfg(any(test, feature = "testing"))]
    pub async fn lookup(
        &self,
        segments: &[RemoteSegment],
        key_hash: u64,
        range: TimeRange,
    ) -> Result<Vec<Entry>> {
        use futures::StreamExt as _;
        let mut results = futures::stream::iter(segments)
            .map(|seg| self.lookup_in(seg, key_hash, range))
            .buffered(LOOKUP_PARALLELISM);
        let mut out = Vec::new();
        while let Some(r) = results.next().await {
            out.extend(r?);
        }
        Ok(out)
    }

    /// Entries for `key_hash` within `range` in one segment.
    pub async fn lookup_in(
        &self,
        seg: &RemoteSegment,
        key_hash: u64,
        range: TimeRange,
    ) -> Result<Vec<Entry>> {
        let m = &seg.meta;
        if m.item_count == 0 || !range.overlaps(m.min_ts, m.max_ts) {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(Vec::new());
        }
        let index = self.index(seg).await?;
        let f = &index.footer;
        let slot = format::slot_of(key_hash, f.slot_count) as usize;
        let (start, end) = match (index.dir.get(slot), index.dir.get(slot + 1)) {
            (Some(&s), Some(&e)) => (u64::from(s), u64::from(e)),
            _ => {
                return Err(corrupt(
                    &seg.key,
                    format!("slot {slot} outside the directory"),
                ));
            }
        };
        if start == end {
            return Ok(Vec::new());
        }
        let item = SEALED_ITEM_LEN as u64;
        let from = f.items_offset + start * item;
        let bytes = self
            .get_range(&seg.key, m.file_len, from..f.items_offset + end * item)
            .await?;
        let mut out = Vec::new();
        for (i, b) in bytes.chunks_exact(SEALED_ITEM_LEN).enumerate() {
            let e = format::decode_sealed_item(b, f.segment_id)
                .map_err(|e| corrupt(&seg.key, format!("item {}: {e}", start + i as u64)))?;
            if format::slot_of(e.key_hash, f.slot_count) as usize != slot
                || e.timestamp_ms < m.min_ts
                || e.timestamp_ms > m.max_ts
                || e.offset < m.min_offset
                || e.offset > m.max_offset
            {
                return Err(corrupt(
                    &seg.key,
                    format!(
                        "item {} does not belong in slot {slot} of this segment",
                        start + i as u64
                    ),
                ));
            }
            if e.key_hash == key_hash && range.contains(e.timestamp_ms) {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// The segment's checked index, from the cache or the store.
    async fn index(&self, seg: &RemoteSegment) -> Result<Arc<SegmentIndex>> {
        {
            let mut c = self.lock();
            c.clock += 1;
            let now = c.clock;
            if let Some(hit) = c.map.get_mut(seg.key.as_ref()) {
                let before = std::mem::replace(&mut hit.last_use, now);
                let index = hit.index.clone();
                c.order.remove(&before);
                c.order.insert(now, seg.key.to_string());
                self.index_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(index);
            }
        }
        let index = Arc::new(self.load_index(seg).await?);
        self.index_loads.fetch_add(1, Ordering::Relaxed);
        let mut c = self.lock();
        c.clock += 1;
        let now = c.clock;
        // Loaded twice at once (two lookups missed together): keep one.
        c.remove(seg.key.as_ref());
        c.bytes += index.bytes();
        c.map.insert(
            seg.key.to_string(),
            Cached {
                index: index.clone(),
                last_use: now,
            },
        );
        c.order.insert(now, seg.key.to_string());
        // Evict least recently used indexes, never the one just loaded (the
        // newest in `order`).
        while c.bytes > self.cache_limit && c.map.len() > 1 {
            let Some((_, victim)) = c.order.pop_first() else {
                break;
            };
            if let Some(v) = c.map.remove(&victim) {
                c.bytes -= v.index.bytes();
            }
        }
        debug_assert_eq!(c.map.len(), c.order.len());
        Ok(index)
    }

    async fn load_index(&self, seg: &RemoteSegment) -> Result<SegmentIndex> {
        let m = &seg.meta;
        let min_len = (HEADER_LEN + FOOTER_LEN) as u64;
        if m.file_len < min_len {
            return Err(Error::InvalidInput(format!(
                "segment {} is recorded with {} bytes, less than a header and footer",
                m.id, m.file_len
            )));
        }
        let tail = self
            .get_range(
                &seg.key,
                m.file_len,
                m.file_len - FOOTER_LEN as u64..m.file_len,
            )
            .await?;
        let footer = Footer::decode(&tail).map_err(|e| corrupt(&seg.key, e.to_string()))?;
        let recorded = (
            m.id,
            m.file_len,
            m.item_count,
            m.min_ts,
            m.max_ts,
            m.min_offset,
            m.max_offset,
        );
        let found = (
            footer.segment_id,
            footer.file_len,
            footer.item_count,
            footer.min_ts,
            footer.max_ts,
            footer.min_offset,
            footer.max_offset,
        );
        if recorded != found {
            return Err(corrupt(
                &seg.key,
                format!(
                    "footer (id, len, items, ts, offsets) {found:?} is not the recorded {recorded:?}"
                ),
            ));
        }
        let head = self
            .get_range(&seg.key, m.file_len, 0..footer.items_offset)
            .await?;
        let header = Header::decode(&head, SEALED_MAGIC, SEALED_ITEM_LEN)
            .map_err(|e| corrupt(&seg.key, e.to_string()))?;
        if header.segment_id != footer.segment_id
            || header.created_ms != footer.created_ms
            || header.slot_count != footer.slot_count
            || u64::from(header.items) != footer.item_count
        {
            return Err(corrupt(&seg.key, "header and footer disagree"));
        }
        let dir_bytes = head
            .get(footer.dir_offset as usize..)
            .ok_or_else(|| corrupt(&seg.key, "slot directory outside the object"))?;
        let dir = format::decode_slot_dir(
            dir_bytes,
            footer.slot_count,
            footer.item_count,
            footer.dir_crc,
        )
        .map_err(|e| corrupt(&seg.key, e.to_string()))?;
        Ok(SegmentIndex { footer, dir })
    }

    /// One ranged GET (with retries) that must return exactly `r` of an
    /// object whose size is exactly `object_len`, the recorded length.
    async fn get_range(&self, key: &Path, object_len: u64, r: Range<u64>) -> Result<Vec<u8>> {
        let want = r.end - r.start;
        let os = self.store.object_store().clone();
        let mut rng = fastrand::Rng::new();
        let got = with_retries(&self.policy, &mut rng, "ranged GET", |_| {
            let os = os.clone();
            let r = r.clone();
            self.requests.fetch_add(1, Ordering::Relaxed);
            async move {
                let res = os
                    .get_opts(
                        key,
                        GetOptions::new().with_range(Some(GetRange::Bounded(r))),
                    )
                    .await?;
                let size = res.meta.size;
                let body = res.bytes().await?;
                Ok::<_, object_store::Error>((size, body))
            }
        })
        .await;
        let (size, body) = match got {
            Ok(v) => v,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(corrupt(key, "missing: no object under a committed key"));
            }
            Err(e) => return Err(classify(e)),
        };
        self.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
        if size != object_len {
            return Err(corrupt(
                key,
                format!(
                    "object is {size} bytes, recorded {object_len} (partial or foreign upload)"
                ),
            ));
        }
        if body.len() as u64 != want {
            return Err(corrupt(
                key,
                format!(
                    "range {}..{} returned {} bytes (object is {size} bytes)",
                    r.start,
                    r.end,
                    body.len()
                ),
            ));
        }
        Ok(body.to_vec())
    }

    /// The store this fetcher reads.
    #[cfg(any(test, feature = "testing"))]
    pub fn store(&self) -> &RemoteStore {
        &self.store
    }

    /// Confirms damage a ranged read reported, by reading the whole object
    /// (a HEAD first: a missing or wrongly sized object is not downloaded).
    /// `Ok(None)`: the object has the recorded length and CRC, so the bad
    /// bytes were a read's, not the object's; the cached index is dropped
    /// and the caller may read again. `Ok(Some(why))`: the object itself is
    /// missing, has another size (HEAD), or two full reads returned the
    /// same wrong bytes. `Err`: the store could not answer, or two reads
    /// disagreed (transient: nothing is judged).
    pub async fn confirm_damage(&self, seg: &RemoteSegment) -> Result<Option<String>> {
        self.invalidate(&seg.key);
        self.requests.fetch_add(1, Ordering::Relaxed); // the HEAD
        let os = self.store.object_store().clone();
        let mut rng = fastrand::Rng::new();
        let key = &seg.key;
        let head = with_retries(&self.policy, &mut rng, "HEAD segment", |_| {
            let os = os.clone();
            async move { os.head(key).await }
        })
        .await;
        let size = match head {
            Ok(m) => m.size,
            Err(object_store::Error::NotFound { .. }) => {
                return Ok(Some("missing: no object under a committed key".into()));
            }
            Err(e) => return Err(classify(e)),
        };
        if size != seg.meta.file_len {
            return Ok(Some(format!(
                "object is {size} bytes, {} recorded",
                seg.meta.file_len
            )));
        }
        // Streamed and hashed as it arrives: a segment may be large. Wrong
        // bytes count only when a second full read returns the very same
        // wrong bytes (a flip or a short body on the wire does not repeat);
        // two reads that disagree decide nothing (a transient error).
        let mut first: Option<(u64, FileSums)> = None;
        for _ in 0..2 {
            let got = with_retries(&self.policy, &mut rng, "GET segment", |_| {
                let os = os.clone();
                async move {
                    use futures::TryStreamExt as _;
                    let mut stream = os.get(key).await?.into_stream();
                    let mut h = SumsHasher::default();
                    while let Some(chunk) = stream.try_next().await? {
                        h.update(&chunk);
                    }
                    Ok(h.finish())
                }
            })
            .await;
            let (len, sums) = match got {
                Ok(x) => x,
                Err(object_store::Error::NotFound { .. }) => {
                    return Ok(Some("missing: no object under a committed key".into()));
                }
                Err(e) => return Err(classify(e)),
            };
            self.requests.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(len, Ordering::Relaxed);
            if seg.meta.matches_sums(len, &sums) {
                return Ok(None);
            }
            match first {
                None => first = Some((len, sums)),
                Some(f) if f == (len, sums) => {
                    return Ok(Some(if len != seg.meta.file_len {
                        format!(
                            "object read back as {len} bytes twice, {} recorded",
                            seg.meta.file_len
                        )
                    } else {
                        format!(
                            "object {} in two reads, {} recorded",
                            seg.meta.describe_sums(&sums),
                            seg.meta.key_sum()
                        )
                    }));
                }
                Some(_) => {
                    return Err(Error::RemoteRetryable(format!(
                        "{key}: two full reads returned different wrong bytes; not judged"
                    )));
                }
            }
        }
        Ok(None)
    }
}

fn corrupt(key: &Path, detail: impl Into<String>) -> Error {
    Error::corrupt(key.to_string(), detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::SegmentId;
    use crate::segment::sealed::build_sealed;
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, PutPayload};

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 2,
            backoff_base: std::time::Duration::from_millis(1),
            backoff_max: std::time::Duration::from_millis(2),
            request_timeout: std::time::Duration::from_secs(5),
        }
    }

    fn entries(id: u64, n: u64) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                key_hash: i % 7 + id * 1000,
                offset: id * 10_000 + i,
                size: 10,
                timestamp_ms: 1_000 + id * 100 + i,
            })
            .collect()
    }

    async fn setup(n_segs: u64) -> (Fetcher, Vec<RemoteSegment>, Vec<Vec<u8>>) {
        let mem = Arc::new(InMemory::new());
        let store = RemoteStore::from_parts(mem, None, "p", "memory://t");
        let mut segs = Vec::new();
        let mut bodies = Vec::new();
        for id in 1..=n_segs {
            let (bytes, meta) = build_sealed(SegmentId(id), 1, 2, 4, &entries(id, 50)).unwrap();
            let key = store.segment_key("s", &meta);
            store
                .object_store()
                .put(&key, PutPayload::from(bytes.clone()))
                .await
                .unwrap();
            segs.push(RemoteSegment { key, meta });
            bodies.push(bytes);
        }
        (Fetcher::new(store, policy(), 1 << 20), segs, bodies)
    }

    #[tokio::test]
    async fn lookups_find_exactly_what_was_written_with_one_get_when_warm() {
        let (f, segs, _) = setup(3).await;
        for (i, seg) in segs.iter().enumerate() {
            let id = i as u64 + 1;
            let want: Vec<Entry> = entries(id, 50)
                .into_iter()
                .filter(|e| e.key_hash == id * 1000 + 3)
                .collect();
            let got = f
                .lookup_in(seg, id * 1000 + 3, TimeRange::ALL)
                .await
                .unwrap();
            assert_eq!(got, want);
        }
        let cold = f.stats();
        assert_eq!(cold.index_loads, 3);
        assert_eq!(cold.requests, 9, "footer + head + items per segment");
        let got = f.lookup(&segs, 2003, TimeRange::ALL).await.unwrap();
        let want: Vec<Entry> = (1..=3)
            .flat_map(|id| entries(id, 50))
            .filter(|e| e.key_hash == 2003)
            .collect();
        assert_eq!(want.len(), 7); // segment 2, i = 3, 10, ..., 45
        assert_eq!(got, want);
        let warm = f.stats();
        // Key 2003 hashes to one slot per segment; segments 1 and 3 may
        // have items in that slot too (one GET each) or none (no GET).
        assert!(warm.requests - cold.requests <= 3, "{warm:?}");
        assert_eq!(warm.index_loads, 3);
    }

    #[tokio::test]
    async fn time_range_skips_segments_without_a_request() {
        let (f, segs, _) = setup(3).await;
        let r = TimeRange {
            from_ms: 1_000 + 300,
            to_ms: u64::MAX,
        };
        let got = f.lookup(&segs, 3003, r).await.unwrap();
        assert!(got.iter().all(|e| e.timestamp_ms >= 1_300));
        let s = f.stats();
        assert_eq!(s.skipped, 2);
        assert_eq!(s.index_loads, 1);
    }

    #[tokio::test]
    async fn flipped_truncated_missing_and_foreign_objects_are_corrupt() {
        let (f, segs, bodies) = setup(1).await;
        let seg = &segs[0];
        let os = f.store().object_store().clone();
        // Every single-byte flip in the footer or the head is caught at load.
        let head_len = (bodies[0].len() - FOOTER_LEN).min(200);
        for at in (0..head_len).chain(bodies[0].len() - FOOTER_LEN..bodies[0].len()) {
            let mut b = bodies[0].clone();
            b[at] ^= 0x10;
            os.put(&seg.key, PutPayload::from(b)).await.unwrap();
            f.invalidate(&seg.key);
            let mut any = false;
            for k in 0..7 {
                match f.lookup_in(seg, 1000 + k, TimeRange::ALL).await {
                    Err(Error::Corrupt { .. }) => any = true,
                    Err(e) => panic!("flip at {at}: {e}"),
                    Ok(_) => {}
                }
            }
            // A flip in an item is caught by the lookup that reads it; in
            // the header, directory or footer by every lookup.
            assert!(any, "flip at byte {at} not detected");
        }
        // Truncated: a partial upload under the key.
        os.put(
            &seg.key,
            PutPayload::from(bodies[0][..bodies[0].len() - 1].to_vec()),
        )
        .await
        .unwrap();
        f.invalidate(&seg.key);
        assert!(matches!(
            f.lookup_in(seg, 1003, TimeRange::ALL).await,
            Err(Error::Corrupt { .. })
        ));
        // Longer than recorded (bytes appended after a valid segment).
        let mut longer = bodies[0].clone();
        longer.extend_from_slice(&bodies[0][bodies[0].len() - FOOTER_LEN..]);
        os.put(&seg.key, PutPayload::from(longer)).await.unwrap();
        f.invalidate(&seg.key);
        assert!(matches!(
            f.lookup_in(seg, 1003, TimeRange::ALL).await,
            Err(Error::Corrupt { .. })
        ));
        // Garbage of the right length.
        os.put(&seg.key, PutPayload::from(vec![0xA5; bodies[0].len()]))
            .await
            .unwrap();
        f.invalidate(&seg.key);
        assert!(matches!(
            f.lookup_in(seg, 1003, TimeRange::ALL).await,
            Err(Error::Corrupt { .. })
        ));
        // Missing.
        os.delete(&seg.key).await.unwrap();
        f.invalidate(&seg.key);
        assert!(matches!(
            f.lookup_in(seg, 1003, TimeRange::ALL).await,
            Err(Error::Corrupt { .. })
        ));
        // Another segment's (valid) bytes under this key.
        let (other, _) = build_sealed(SegmentId(9), 1, 2, 4, &entries(9, 50)).unwrap();
        os.put(&seg.key, PutPayload::from(other)).await.unwrap();
        f.invalidate(&seg.key);
        assert!(matches!(
            f.lookup_in(seg, 1003, TimeRange::ALL).await,
            Err(Error::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn cache_stays_within_its_bound() {
        let (f, segs, _) = setup(6).await;
        let one = {
            f.lookup_in(&segs[0], 1001, TimeRange::ALL).await.unwrap();
            f.cached_bytes()
        };
        let f = Fetcher::new(f.store().clone(), policy(), one * 2);
        for seg in &segs {
            f.lookup_in(seg, 1, TimeRange::ALL).await.unwrap();
            assert!(f.cached_bytes() <= one * 2);
        }
        assert_eq!(f.stats().index_loads, 6);
        // The two most recent are still cached, the first is not.
        f.lookup_in(&segs[5], 1, TimeRange::ALL).await.unwrap();
        f.lookup_in(&segs[0], 1, TimeRange::ALL).await.unwrap();
        assert_eq!(f.stats().index_loads, 7);
        // Cached now: 5 (used before 0) and 0. A hit on 5 makes 0 the
        // least recently used: loading 4 evicts 0, keeps 5.
        f.lookup_in(&segs[5], 1, TimeRange::ALL).await.unwrap();
        assert_eq!(f.stats().index_loads, 7);
        f.lookup_in(&segs[4], 1, TimeRange::ALL).await.unwrap();
        assert_eq!(f.stats().index_loads, 8);
        f.lookup_in(&segs[5], 1, TimeRange::ALL).await.unwrap();
        assert_eq!(f.stats().index_loads, 8, "5 was used last before 4: kept");
        f.lookup_in(&segs[0], 1, TimeRange::ALL).await.unwrap();
        assert_eq!(f.stats().index_loads, 9, "0 was the least recently used");
        f.invalidate(&segs[0].key);
        assert!(f.cached_bytes() <= one);
    }
}
