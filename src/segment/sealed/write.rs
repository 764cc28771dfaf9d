//! Writing a sealed segment: the bytes built from a frozen active
//! segment's mapping (items scattered to their slots in parallel blocks,
//! each item's CRC from position tables), streamed to `NNN.seg.tmp` with
//! writeback started as it goes, then made durable (the write order is in
//! the parent module's doc and `docs/crash-safety.md`).

use super::*;

/// Bytes per entry in the packed form [`build_sealed_packed`] reads:
/// `key_hash u64 | offset u64 | timestamp_ms u64 | size u32`, little-endian:
/// exactly the first 28 bytes of both the active and the sealed item.
pub const PACKED_ENTRY_LEN: usize = 28;

/// Build the bytes of a sealed segment from `entries` given in append order.
/// Entries keep their append order within a slot.
#[cfg(any(test, feature = "testing"))]
pub fn build_sealed(
    id: SegmentId,
    created_ms: u64,
    sealed_ms: u64,
    slot_count: u32,
    entries: &[Entry],
) -> Result<(Vec<u8>, SealedMeta)> {
    let mut packed = vec![0u8; entries.len() * PACKED_ENTRY_LEN];
    for (e, out) in entries
        .iter()
        .zip(packed.chunks_exact_mut(PACKED_ENTRY_LEN))
    {
        out[0..8].copy_from_slice(&e.key_hash.to_le_bytes());
        out[8..16].copy_from_slice(&e.offset.to_le_bytes());
        out[16..24].copy_from_slice(&e.timestamp_ms.to_le_bytes());
        out[24..28].copy_from_slice(&e.size.to_le_bytes());
    }
    build_sealed_packed(
        id,
        created_ms,
        sealed_ms,
        slot_count,
        &packed,
        PACKED_ENTRY_LEN,
    )
}

#[inline]
pub(super) fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Build a sealed segment in memory from items laid out every `stride`
/// bytes in `items`, each starting with the 28-byte packed entry (see
/// [`PACKED_ENTRY_LEN`]). Same bytes as [`write_sealed_streaming`].
#[cfg(any(test, feature = "testing"))]
pub fn build_sealed_packed(
    id: SegmentId,
    created_ms: u64,
    sealed_ms: u64,
    slot_count: u32,
    items: &[u8],
    stride: usize,
) -> Result<(Vec<u8>, SealedMeta)> {
    let out = MemOut(std::sync::Mutex::new(Vec::new()));
    let meta = seal_into(
        &out, 0, id, created_ms, sealed_ms, slot_count, items, stride,
    )
    .map_err(|e| match e {
        SealError::Input(e) => e,
        SealError::Write(e) | SealError::Sync(e) => Error::io("memory", "build sealed segment", e),
    })?;
    let bytes = out.0.into_inner().unwrap_or_else(|p| p.into_inner());
    Ok((bytes, meta))
}

/// Seal straight to disk, without building the file in memory: the same
/// bytes as [`build_sealed_packed`], written as `NNN.seg.tmp`, fsync'd,
/// renamed, directory fsync'd. The active segment's item region is a packed
/// layout with stride 40, so sealing reads the mapping directly, with no
/// decoding.
///
/// Never over an existing `NNN.seg`: a sealed file is immutable, and one
/// already there under this id was sealed by something else (a second
/// process on this data directory); replacing it could delete entries
/// only it holds. Refused (`AlreadyExists`) instead; the caller's source
/// stays. [`write_sealed_at`] with `replace` is for the one step that
/// replaces.
pub fn write_sealed_streaming(
    dir: &Path,
    id: SegmentId,
    created_ms: u64,
    sealed_ms: u64,
    slot_count: u32,
    items: &[u8],
    stride: usize,
) -> Result<(PathBuf, SealedMeta)> {
    write_sealed_at(
        dir,
        id,
        (created_ms, sealed_ms),
        slot_count,
        items,
        stride,
        false,
    )
}

/// [`write_sealed_streaming`], or with `replace` over the existing
/// `NNN.seg`: for a start-up's salvage of a damaged sealed file by item,
/// whose original it already kept in quarantine (until the rename the
/// damaged one stays in place, so a crash redoes the salvage).
pub(crate) fn write_sealed_at(
    dir: &Path,
    id: SegmentId,
    (created_ms, sealed_ms): (u64, u64),
    slot_count: u32,
    items: &[u8],
    stride: usize,
    replace: bool,
) -> Result<(PathBuf, SealedMeta)> {
    let tmp = dir.join(sealed_tmp_name(id));
    let dst = dir.join(sealed_file_name(id));
    let f = crate::durable::open_retrying(&tmp, || {
        crate::durable::no_follow()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
    })
    .map_err(|e| Error::io(&tmp, "create sealed tmp", e))?;
    crate::durable::created(&tmp);
    crate::failpoint::hit("seal.write").map_err(|e| Error::io(&tmp, "write sealed tmp", e))?;
    let meta = seal_into(
        &FileOut(&f, &tmp),
        0,
        id,
        created_ms,
        sealed_ms,
        slot_count,
        items,
        stride,
    )
    .map_err(|e| match e {
        SealError::Input(e) => e,
        SealError::Write(e) => Error::io(&tmp, "write sealed tmp", e),
        // A failed writeback is a failed fsync: never retried.
        SealError::Sync(e) => {
            Error::Poisoned(format!("writeback of {} failed: {e}", tmp.display()))
        }
    })?;
    crate::durable::at("seal.fsync")
        .sync_all(&f, &tmp)
        .map_err(|e| Error::Poisoned(format!("fsync of {} failed: {e}", tmp.display())))?;
    drop(f);
    let at = crate::durable::at("seal.rename");
    let renamed = if replace {
        at.rename(&tmp, &dst)
    } else {
        at.rename_noreplace(&tmp, &dst)
    };
    if let Err(e) = renamed {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            let _ = crate::durable::unlink(&tmp);
            return Err(Error::InvalidInput(format!(
                "{} already exists: segment {id} was sealed by something else (a second \
                 process on this data directory?). Nothing was replaced; its source stays. \
                 Stop every process on the data directory and run `tierindex fsck` on it",
                dst.display()
            )));
        }
        return Err(Error::io(&dst, "rename sealed tmp into place", e));
    }
    // IMPORTANT: the rename is only durable once the directory is synced.
    fsync_dir_at("seal.dirsync", dir)?;
    Ok((dst, meta))
}

enum SealError {
    Input(Error),
    Write(std::io::Error),
    /// Starting writeback failed: reported like a failed fsync.
    Sync(std::io::Error),
}

/// Where [`seal_into`] puts bytes: positioned writes, from two threads at
/// once, each range written exactly once.
trait SealOut: Sync {
    fn put(&self, at: u64, bytes: &[u8]) -> std::result::Result<(), SealError>;
}

/// A file: `pwrite`, then start writing the range back at once, so the final
/// fsync overlaps with building the rest.
struct FileOut<'a>(&'a File, &'a Path);

impl SealOut for FileOut<'_> {
    fn put(&self, at: u64, bytes: &[u8]) -> std::result::Result<(), SealError> {
        crate::durable::write_all_at(self.0, bytes, at, self.1).map_err(SealError::Write)?;
        start_writeback(self.0, at, bytes.len() as u64).map_err(SealError::Sync)
    }
}

/// Memory, for [`build_sealed_packed`]; grows to the highest byte written.
#[cfg(any(test, feature = "testing"))]
struct MemOut(std::sync::Mutex<Vec<u8>>);

#[cfg(any(test, feature = "testing"))]
impl SealOut for MemOut {
    fn put(&self, at: u64, bytes: &[u8]) -> std::result::Result<(), SealError> {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let at = usize::try_from(at)
            .map_err(|_| SealError::Write(std::io::ErrorKind::InvalidInput.into()))?;
        let end = at + bytes.len();
        if v.len() < end {
            v.resize(end, 0);
        }
        v[at..end].copy_from_slice(bytes);
        Ok(())
    }
}

/// Position tables for the CRC32 of a sealed item's 28 entry bytes:
/// `ITEM_CRC[i][b]` is the CRC register (zero start, no final xor) after
/// byte `b` at position `i` followed by `27 - i` zero bytes. CRC32 is linear,
/// so `crc(salt ‖ d) = crc(salt ‖ 0^28) ^ XOR_i ITEM_CRC[i][d[i]]`: 28
/// independent lookups instead of a byte-serial chain (crc32fast's SIMD path
/// only pays off on longer inputs).
static ITEM_CRC: [[u32; 256]; PACKED_ENTRY_LEN] = item_crc_tables();

const fn item_crc_tables() -> [[u32; 256]; PACKED_ENTRY_LEN] {
    const LAST: usize = PACKED_ENTRY_LEN - 1;
    let mut t = [[0u32; 256]; PACKED_ENTRY_LEN];
    let mut b = 0;
    while b < 256 {
        let mut c = b as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
            k += 1;
        }
        t[LAST][b] = c;
        b += 1;
    }
    let mut i = LAST;
    while i > 0 {
        i -= 1;
        let mut b = 0;
        while b < 256 {
            let x = t[i + 1][b];
            t[i][b] = t[LAST][(x & 0xff) as usize] ^ (x >> 8);
            b += 1;
        }
    }
    t
}

/// `crc(salt ‖ entry)` for a sealed item, given `base = crc(salt ‖ 0^28)`
/// and the entry as little-endian words (bytes 0..8, 8..16, 16..24, 24..28).
#[inline(always)]
pub(super) fn item_crc(base: u32, w: [u64; 3], last: u32) -> u32 {
    let t = &ITEM_CRC;
    let mut c = base;
    for (k, &x) in w.iter().enumerate() {
        for j in 0..8 {
            c ^= t[k * 8 + j][((x >> (8 * j)) & 0xff) as usize];
        }
    }
    for j in 0..4 {
        c ^= t[24 + j][((last >> (8 * j)) & 0xff) as usize];
    }
    c
}

/// Records per scatter block (8 KiB of 32-byte items).
pub(super) const BLOCK_RECS: usize = 256;
const BLOCK_BYTES: usize = BLOCK_RECS * SEALED_ITEM_LEN;
/// Inputs below this are sealed on one thread.
pub(super) const PARALLEL_MIN_ITEMS: usize = 1 << 16;
/// At most this many buckets (scatter streams).
const MAX_BUCKETS: usize = 1024;

/// One input part scattered by bucket: finished sealed items (entry + CRC)
/// in blocks of a private pool, in append order within each bucket.
struct Scattered<'a> {
    pool: &'a [u8],
    /// Per bucket: its blocks, in order.
    blocks: Vec<Vec<u32>>,
    /// Per bucket: items in its last block.
    last_fill: Vec<usize>,
    /// (min_ts, max_ts, min_off, max_off) of this part.
    ranges: (u64, u64, u64, u64),
}

impl Scattered<'_> {
    fn bucket_len(&self, b: usize) -> usize {
        match self.blocks[b].len() {
            0 => 0,
            k => (k - 1) * BLOCK_RECS + self.last_fill[b],
        }
    }

    /// The items of bucket `b`, block by block.
    fn bucket_items(&self, b: usize) -> impl Iterator<Item = &[u8]> + '_ {
        let last = self.blocks[b].len().saturating_sub(1);
        self.blocks[b].iter().enumerate().map(move |(k, &blk)| {
            let len = if k == last {
                self.last_fill[b]
            } else {
                BLOCK_RECS
            };
            let at = blk as usize * BLOCK_BYTES;
            &self.pool[at..at + len * SEALED_ITEM_LEN]
        })
    }
}

/// Pass 1 over one input part: compute each item's slot and CRC, append the
/// finished 32-byte item to its bucket's current block, track ranges.
fn scatter<'a>(
    pool: &'a mut [u8],
    items: &[u8],
    stride: usize,
    slot_count: u32,
    shift: u32,
    nb: usize,
    crc_base: u32,
) -> Scattered<'a> {
    let mut blocks: Vec<Vec<u32>> = vec![Vec::new(); nb];
    // Per bucket: (next byte, end of its current block) in `pool`.
    let mut cur = vec![(0usize, 0usize); nb];
    let mut next_block = 0usize;
    let (mut min_ts, mut max_ts, mut min_off, mut max_off) = (u64::MAX, 0, u64::MAX, 0);
    for it in items.chunks_exact(stride) {
        let e = &it[..PACKED_ENTRY_LEN];
        let (key, off, ts) = (le_u64(&e[0..8]), le_u64(&e[8..16]), le_u64(&e[16..24]));
        let mut size = [0u8; 4];
        size.copy_from_slice(&e[24..28]);
        let size = u32::from_le_bytes(size);
        min_ts = min_ts.min(ts);
        max_ts = max_ts.max(ts);
        min_off = min_off.min(off);
        max_off = max_off.max(off);
        let b = (slot_of(key, slot_count) >> shift) as usize;
        let c = &mut cur[b];
        if c.0 == c.1 {
            blocks[b].push(next_block as u32);
            c.0 = next_block * BLOCK_BYTES;
            c.1 = c.0 + BLOCK_BYTES;
            next_block += 1;
        }
        let crc = item_crc(crc_base, [key, off, ts], size);
        let dst = &mut pool[c.0..c.0 + SEALED_ITEM_LEN];
        dst[..PACKED_ENTRY_LEN].copy_from_slice(e);
        dst[PACKED_ENTRY_LEN..].copy_from_slice(&crc.to_le_bytes());
        c.0 += SEALED_ITEM_LEN;
    }
    let last_fill = cur
        .iter()
        .map(|&(pos, end)| BLOCK_RECS - (end - pos) / SEALED_ITEM_LEN)
        .collect();
    Scattered {
        pool,
        blocks,
        last_fill,
        ranges: (min_ts, max_ts, min_off, max_off),
    }
}

/// The scatter pool of the last seal, kept for the next one: a fresh one
/// (32 bytes per item, 320 MB for 10 M items) would be faulted in and zeroed
/// by the kernel at every seal, a sizeable share of the seal's CPU time.
/// Seals run one at a time (the sealer thread); one that finds the pool
/// taken allocates its own.
static SCATTER_POOL: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// A pool of at least `len` bytes (contents unspecified).
fn take_pool(len: usize) -> Vec<u8> {
    let kept = match SCATTER_POOL.try_lock() {
        Ok(mut g) => std::mem::take(&mut *g),
        Err(std::sync::TryLockError::Poisoned(p)) => std::mem::take(&mut *p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => Vec::new(),
    };
    if kept.len() >= len {
        kept
    } else {
        drop(kept);
        vec![0u8; len]
    }
}

/// Keep `pool` for the next seal, if it is the largest seen.
fn keep_pool(pool: Vec<u8>) {
    let mut g = SCATTER_POOL.lock().unwrap_or_else(|p| p.into_inner());
    if pool.len() > g.len() {
        *g = pool;
    }
}

/// What pass 2 produced for one bucket: its place and checksums.
struct BucketDone {
    bucket: usize,
    crc: u32,
    crc64: u64,
    len: u64,
}

/// Pass 2 for the buckets this thread claims from `next`: count the bucket's
/// slots (in cache), fill its part of the directory, place its items in slot
/// order, checksum and write them at their final offset.
#[allow(clippy::too_many_arguments)]
fn place_buckets(
    out: &dyn SealOut,
    base: u64,
    parts: &[Scattered<'_>],
    starts: &[usize],
    dir_pieces: &[std::sync::Mutex<&mut [u32]>],
    slot_count: u32,
    shift: u32,
    next: &std::sync::atomic::AtomicUsize,
) -> std::result::Result<Vec<BucketDone>, SealError> {
    use std::sync::atomic::Ordering;
    let mut done = Vec::new();
    let mut chunk = Vec::new();
    let mut at_slot: Vec<u32> = Vec::new();
    loop {
        let b = next.fetch_add(1, Ordering::Relaxed);
        if b >= dir_pieces.len() {
            return Ok(done);
        }
        let (lo, hi) = (starts[b], starts[b + 1]);
        let s_lo = (b as u32) << shift;
        let mut dir = dir_pieces[b].lock().unwrap_or_else(|p| p.into_inner());
        at_slot.clear();
        at_slot.resize(dir.len(), 0);
        let local = |it: &[u8]| (slot_of(le_u64(it), slot_count) - s_lo) as usize;
        for blk in parts.iter().flat_map(|p| p.bucket_items(b)) {
            for it in blk.chunks_exact(SEALED_ITEM_LEN) {
                at_slot[local(it)] += 1;
            }
        }
        let mut acc = 0u32;
        for (d, c) in dir.iter_mut().zip(at_slot.iter_mut()) {
            *d = lo as u32 + acc;
            let k = *c;
            *c = acc;
            acc += k;
        }
        drop(dir);
        // Every byte of `chunk[..need]` is written below: no clearing.
        let need = (hi - lo) * SEALED_ITEM_LEN;
        if chunk.len() < need {
            chunk.resize(need, 0);
        }
        let chunk = &mut chunk[..need];
        for blk in parts.iter().flat_map(|p| p.bucket_items(b)) {
            for it in blk.chunks_exact(SEALED_ITEM_LEN) {
                let c = &mut at_slot[local(it)];
                let at = *c as usize * SEALED_ITEM_LEN;
                *c += 1;
                chunk[at..at + SEALED_ITEM_LEN].copy_from_slice(it);
            }
        }
        if !chunk.is_empty()
            && let Err(e) = out.put(base + (lo * SEALED_ITEM_LEN) as u64, chunk)
        {
            // Stop the other thread too: the seal has failed.
            next.store(dir_pieces.len(), Ordering::Relaxed);
            return Err(e);
        }
        done.push(BucketDone {
            bucket: b,
            crc: crc32fast::hash(chunk),
            crc64: format::crc64(chunk),
            len: chunk.len() as u64,
        });
    }
}

/// Write a sealed segment to `out` (whose byte 0 is at `base`).
///
/// A plain counting sort scatters items over the whole output, one cache and
/// TLB miss per item. Here buckets are ranges of `2^shift` slots with
/// ~0.5-1 MiB of output each. Pass 1 reads the input once and appends each
/// finished item (entry + CRC) to its bucket's blocks: one sequential read,
/// one sequential write stream per bucket. Pass 2 takes one bucket at a
/// time: counts its slots in cache, places its items, checksums them and
/// writes them at their final offset. Both passes run on two threads for
/// large inputs (pass 1 on the two halves of the input, pass 2 on buckets
/// claimed in order). The header and slot directory, known only once every
/// bucket is counted, are written last, then the footer; the file CRC is
/// the CRC of the header and directory combined with the buckets' CRCs.
#[allow(clippy::too_many_arguments)]
fn seal_into(
    out: &dyn SealOut,
    base: u64,
    id: SegmentId,
    created_ms: u64,
    sealed_ms: u64,
    slot_count: u32,
    items: &[u8],
    stride: usize,
) -> std::result::Result<SealedMeta, SealError> {
    let bad = |m: String| SealError::Input(Error::InvalidInput(m));
    if stride < PACKED_ENTRY_LEN || !items.len().is_multiple_of(stride) {
        return Err(bad(format!(
            "packed items: stride {stride}, {} bytes",
            items.len()
        )));
    }
    let n = items.len() / stride;
    let item_count = u32::try_from(n)
        .ok()
        .filter(|n| *n <= format::MAX_ITEMS)
        .ok_or_else(|| bad(format!("{n} items is too many")))?;
    if slot_count == 0 || slot_count > format::MAX_SLOTS {
        return Err(bad(format!("slot count {slot_count}")));
    }
    let layout = SealedLayout::new(slot_count, item_count);

    // Buckets: 2^shift slots each, about 16-32 Ki items (0.5-1 MiB), at
    // most MAX_BUCKETS of them.
    let slots = u64::from(slot_count);
    let want = ((32u64 << 10) * slots / (n as u64).max(1)).max(1);
    let mut shift = 63 - want.leading_zeros();
    while (slots >> shift) as usize >= MAX_BUCKETS {
        shift += 1;
    }
    let shift = shift.min(32 - slot_count.leading_zeros());
    let nb = slots.div_ceil(1u64 << shift) as usize;

    let threads = if n >= PARALLEL_MIN_ITEMS
        && std::thread::available_parallelism().is_ok_and(|p| p.get() > 1)
    {
        2
    } else {
        1
    };

    // Pass 1: scatter each part of the input into its own pool.
    let salt = id.0.to_le_bytes();
    let crc_base = {
        let mut h = crc32fast::Hasher::new();
        h.update(&salt);
        h.update(&[0u8; PACKED_ENTRY_LEN]);
        h.finalize()
    };
    let per_part = n.div_ceil(threads);
    let pool_len = |k: usize| (k.div_ceil(BLOCK_RECS) + nb) * BLOCK_BYTES;
    let total: usize = (0..threads)
        .map(|t| pool_len(n.saturating_sub(t * per_part).min(per_part)))
        .sum();
    let mut pool = take_pool(total);
    let parts: Vec<Scattered<'_>> = {
        let mut rest: &mut [u8] = &mut pool[..total];
        let mut jobs = Vec::new();
        for t in 0..threads {
            let lo = (t * per_part).min(n);
            let hi = ((t + 1) * per_part).min(n);
            let (mine, tail) = rest.split_at_mut(pool_len(hi - lo));
            rest = tail;
            jobs.push((mine, &items[lo * stride..hi * stride]));
        }
        let mut jobs = jobs.into_iter();
        let first = jobs.next();
        std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .map(|(p, its)| {
                    s.spawn(move || scatter(p, its, stride, slot_count, shift, nb, crc_base))
                })
                .collect();
            let mut parts = Vec::with_capacity(threads);
            if let Some((p, its)) = first {
                parts.push(scatter(p, its, stride, slot_count, shift, nb, crc_base));
            }
            for h in handles {
                match h.join() {
                    Ok(p) => parts.push(p),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            parts
        })
    };
    let (mut min_ts, mut max_ts, mut min_off, mut max_off) = (u64::MAX, 0, u64::MAX, 0);
    for p in &parts {
        let (a, b, c, d) = p.ranges;
        (min_ts, max_ts, min_off, max_off) =
            (min_ts.min(a), max_ts.max(b), min_off.min(c), max_off.max(d));
    }
    if n == 0 {
        (min_ts, max_ts, min_off, max_off) = (0, 0, 0, 0);
    }

    // Pass 2: per bucket, on both threads.
    let mut starts = Vec::with_capacity(nb + 1);
    starts.push(0usize);
    for b in 0..nb {
        let len: usize = parts.iter().map(|p| p.bucket_len(b)).sum();
        starts.push(starts[b] + len);
    }
    debug_assert_eq!(starts[nb], n);
    let mut dir_v = vec![0u32; slot_count as usize + 1];
    dir_v[slot_count as usize] = item_count;
    let items_base = base + layout.items_offset;
    let mut done = {
        let dir_pieces: Vec<std::sync::Mutex<&mut [u32]>> = dir_v[..slot_count as usize]
            .chunks_mut(1 << shift)
            .map(std::sync::Mutex::new)
            .collect();
        debug_assert_eq!(dir_pieces.len(), nb);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let work = || {
            place_buckets(
                out,
                items_base,
                &parts,
                &starts,
                &dir_pieces,
                slot_count,
                shift,
                &next,
            )
        };
        std::thread::scope(|s| {
            let helpers: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
            let mut done = work()?;
            for h in helpers {
                match h.join() {
                    Ok(d) => done.extend(d?),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            Ok::<_, SealError>(done)
        })?
    };
    drop(parts);
    keep_pool(pool);
    done.sort_unstable_by_key(|d| d.bucket);

    // Header and directory, then the footer.
    let header = Header {
        magic: SEALED_MAGIC,
        version: format::SEALED_FORMAT_VERSION,
        item_len: SEALED_ITEM_LEN as u32,
        segment_id: id,
        created_ms,
        slot_count,
        items: item_count,
    };
    let mut head = Vec::with_capacity(layout.items_offset as usize);
    head.extend_from_slice(&header.encode());
    for v in &dir_v {
        head.extend_from_slice(&v.to_le_bytes());
    }
    let dir_crc = crc32fast::hash(&head[HEADER_LEN..]);
    out.put(base, &head)?;
    let mut data = crc32fast::Hasher::new();
    data.update(&head);
    let mut data64 = format::crc64(&head);
    for d in &done {
        data.combine(&crc32fast::Hasher::new_with_initial_len(d.crc, d.len));
        data64 = format::crc64_combine(data64, d.crc64, d.len);
    }
    let footer = Footer {
        segment_id: id,
        slot_count,
        item_count: u64::from(item_count),
        min_ts,
        max_ts,
        min_offset: min_off,
        max_offset: max_off,
        created_ms,
        sealed_ms,
        file_len: layout.file_len,
        dir_offset: layout.dir_offset,
        items_offset: layout.items_offset,
        dir_crc,
        data_crc: data64,
        version: format::SEALED_FORMAT_VERSION,
    };
    let fb = footer.encode();
    data.update(&fb);
    out.put(base + layout.footer_offset, &fb)?;
    Ok(footer.meta(format::FileSums {
        crc32: data.finalize(),
        crc64: format::crc64_combine(data64, format::crc64(&fb), FOOTER_LEN as u64),
    }))
}

/// Ask the kernel to start writing back `[from, from+len)` now, so the final
/// fsync overlaps with building the rest. An error here is a write error the
/// fsync would report too; it is returned, never ignored.
fn start_writeback(f: &File, from: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let (Ok(from), Ok(len)) = (i64::try_from(from), i64::try_from(len)) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: plain syscall on a valid, owned descriptor; no memory passed.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), from, len, libc::SYNC_FILE_RANGE_WRITE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Write a sealed file durably: tmp, fsync, rename, fsync dir. Returns its path.
///
/// Any failure of a sync step is returned as [`Error::Poisoned`]: the caller
/// must not retry the same file descriptors, and must not acknowledge the seal.
#[cfg(any(test, feature = "testing"))]
pub fn write_sealed_file(dir: &Path, id: SegmentId, bytes: &[u8]) -> Result<PathBuf> {
    let tmp = dir.join(sealed_tmp_name(id));
    let dst = dir.join(sealed_file_name(id));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, "create sealed tmp", e))?;
        crate::durable::created(&tmp);
        f.write_all(bytes)
            .map_err(|e| Error::io(&tmp, "write sealed tmp", e))?;
        crate::durable::written(&tmp);
        fsync_file(&f, &tmp)?;
    }
    crate::durable::rename(&tmp, &dst).map_err(|e| Error::io(&dst, "rename sealed tmp into place", e))?;
    // IMPORTANT: the rename is only durable once the directory is synced.
    fsync_dir(dir)?;
    Ok(dst)
}
