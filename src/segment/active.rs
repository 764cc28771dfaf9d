//! The active segment: a preallocated file written through a shared mmap.
//!
//! Ordering and durability:
//! - `create` gives the file its whole length (sparse), allocates its
//!   header, slot table and first stretch of items with `posix_fallocate`
//!   (a full disk fails there with ENOSPC instead of SIGBUS on a later page
//!   fault), writes the header with `pwrite`, `fsync`s the file and then its
//!   directory, and only then maps it. The rest of the items' space is
//!   allocated in stretches ahead of the appends (on the sealer's thread,
//!   with the stretches it populates), so an idle stream holds on disk what
//!   it wrote plus a lead, not its whole preallocated file.
//! - `append` writes the 40-byte item into the mapping, then links it into
//!   the slot table. An item is never written past what is allocated: an
//!   append that finds its place not allocated yet (the sealer's thread is
//!   behind) allocates the next stretch itself, and a full disk refuses the
//!   append (nothing written, the segment unharmed) instead of a SIGBUS.
//!   Nothing is durable yet.
//! - `flush` msyncs the pages holding items appended since the last flush.
//!   That is the durability point. A frozen segment (rolled, waiting for
//!   its seal) is synced through a shared reference by `flush_frozen`: the
//!   roll itself does not msync, the writer's next flush does. The slot table is *not* synced: it is
//!   derived state, rebuilt from the items on every open.
//! - A failed msync poisons the segment: the kernel may have dropped the
//!   dirty pages, so no later append or flush is accepted.
//!
//! Recovery (`open`) walks items from index 0 while their checksums (which
//! bind segment id and index) and chain links verify, zeroes everything after
//! the first bad item (so a stale item can never be resurrected later), and
//! rebuilds the slot table. Start-up calls `open` only for a file whose
//! valid items are exactly such a prefix (`segment::salvage::scan_active`)
//! covering its flush mark (`write_flush_mark`: how many items the last
//! flush made durable); a file with valid items after a damaged span,
//! acknowledged items below its mark that do not verify, a damaged header
//! or a cut length is salvaged by item into a sealed file instead and never
//! appended to again.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use memmap2::MmapMut;

use crate::durable::{fsync_dir, fsync_dir_at, fsync_path};
use crate::error::{Error, Result};
use crate::segment::format::{
    self, ACTIVE_ITEM_LEN, ACTIVE_MAGIC, ActiveItem, ActiveLayout, HEADER_LEN, Header, PAGE,
    slot_of,
};
use crate::segment::salvage::Geometry;
use crate::segment::{Entry, SegmentId, TimeRange};

/// `open` without a configured geometry re-extends a cut file by at most
/// this many bytes (1 GiB). With a geometry ([`ActiveSegment::open_noting`])
/// the bound is the geometry's file length.
pub const MAX_REEXTEND_BYTES: u64 = 1 << 30;

/// The header of a file `file_len` bytes long claims `layout`: refuse the
/// claim before anything is allocated, mapped or fallocated when it asks
/// for more than the file holds plus what a cut file may be given back:
/// with a configured `geometry`, no more than that geometry's file length;
/// without one, no more than [`MAX_REEXTEND_BYTES`] past the end.
fn check_claim(
    path: &Path,
    file_len: u64,
    layout: &ActiveLayout,
    geometry: Option<Geometry>,
) -> Result<()> {
    if layout.file_len <= file_len {
        return Ok(());
    }
    let (limit, by) = match geometry {
        Some(g) => (
            ActiveLayout::new(g.slot_count, g.item_capacity)
                .map(|l| l.file_len)
                .unwrap_or(0)
                .max(file_len),
            "the configured geometry allows",
        ),
        None => (
            file_len.saturating_add(MAX_REEXTEND_BYTES),
            "a cut file may be re-extended to",
        ),
    };
    if layout.file_len > limit {
        return Err(Error::corrupt(
            path.display().to_string(),
            format!(
                "{file_len} bytes; its header implies {}, more than the {limit} {by}",
                layout.file_len
            ),
        ));
    }
    Ok(())
}

/// [`scan_valid_prefix`] of a file's `bytes` (zero-extended as `open`
/// extends it), allocating no more than the file's own length: a file that
/// ends before its first item gets its slot heads in a map (only items that
/// decode add to it), not in a table of the `slot_count` its header claims.
fn scan_bytes(bytes: Sparse<'_>, l: &ActiveLayout, id: SegmentId) -> u32 {
    if bytes.len() as u64 > l.items_offset {
        // The slot table lies before the items: bounded by the file length.
        let mut heads = vec![0u32; l.slot_count as usize];
        return scan_valid_prefix(bytes, l, id, &mut heads);
    }
    let mut heads = std::collections::HashMap::<usize, u32>::new();
    let mut valid = 0u32;
    while valid < l.item_capacity {
        let b = item_padded(bytes, l.item_offset(valid));
        let Some(item) = format::decode_active_item(&b, id, valid) else {
            break;
        };
        let slot = slot_of(item.entry.key_hash, l.slot_count) as usize;
        if heads.get(&slot).copied().unwrap_or(0) != item.prev {
            break;
        }
        heads.insert(slot, valid + 1);
        valid += 1;
    }
    valid
}

/// File name of an active segment.
pub fn active_file_name(id: SegmentId) -> String {
    format!("{id}.active")
}

/// What recovery found in an active segment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActiveRecovery {
    /// Items that verified and were kept.
    pub valid_items: u32,
    /// Length of the span after the last valid item, up to its last non-zero
    /// byte, that was zeroed (a torn or unflushed tail).
    pub torn_bytes_zeroed: u64,
    /// Where the zeroed span was copied first (when `open` was given a
    /// directory to save it to): it is never deleted outright.
    pub tail_saved_to: Option<PathBuf>,
    /// The file was shorter than its header implies and was re-extended.
    pub extended_from: Option<u64>,
    /// What its flush marks said the last flush made durable (before a
    /// recovery rewrote them): items below it that were not kept are
    /// acknowledged entries lost. Start-up never recovers such a file in
    /// place (it salvages it); a direct caller of `open` sees them here.
    pub flush_mark: Option<u32>,
    /// Items below the flush mark whose CRC does not verify ([`check_active`]
    /// only).
    pub unverified_below_mark: u32,
}

/// Result of a bounded lookup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lookup {
    /// Matching entries in append order.
    pub entries: Vec<Entry>,
    /// The chain walk stopped at its bound before the chain's end.
    pub truncated: bool,
    /// Items on the way whose CRC failed (local bit rot): their entries are
    /// missing from `entries`. Logged as errors by the index writer.
    pub corrupt_items: u64,
    /// The segments those items are in.
    pub corrupt_segments: Vec<u64>,
    /// Local sealed segments that could not be read at all (the file gone,
    /// unreadable, or changed since it was checked): whatever they hold for
    /// the key is missing from `entries`. Logged as errors.
    pub unreadable_segments: Vec<u64>,
}

/// An mmap-backed segment being written.
pub struct ActiveSegment {
    path: PathBuf,
    /// No descriptor is kept: the map holds its own reference to the open
    /// file (msync and its writeback errors go through it), so a stream
    /// costs no descriptor for its active segment or a prepared spare.
    map: MmapMut,
    layout: ActiveLayout,
    id: SegmentId,
    created_ms: u64,
    len: u32,
    /// Items known durable. Atomic so that a frozen segment, shared with
    /// the sealer thread, can be synced through `&self` (`flush_frozen`,
    /// on the writer's thread) and marked durable by its seal
    /// (`mark_durable`, on the sealer's); both store the final length, and
    /// only after the step that made it durable.
    flushed: AtomicU32,
    /// An msync of this segment failed: never retried (`flush_frozen`
    /// refuses), and the sealer does not seal it (its pages' writeback
    /// failed; the next start recovers the `.active` file).
    sync_failed: std::sync::atomic::AtomicBool,
    poisoned: Option<String>,
    /// Bytes of the file brought into the page cache so far, from its start
    /// ([`prefault`](Self::prefault) and the stretches
    /// [`prefault_due`](Self::prefault_due) hands out).
    pf_end: usize,
    /// The item count at which the next stretch is due (`u32::MAX`: none:
    /// the whole file is in).
    pf_at: u32,
    /// How far the file is allocated; no item is written past it.
    alloc: std::sync::Arc<Allocation>,
    /// When this segment took its first append since it was created or
    /// opened, and its length then: the stream's write rate, which decides
    /// whether the pages ahead are populated for writing
    /// ([`write_rate`](Self::write_rate)).
    rate_from: Option<(std::time::Instant, u32)>,
    /// The count the last flush mark written says, and the mark slot the
    /// next one goes to ([`write_flush_mark`](Self::write_flush_mark)).
    /// Atomic only so that a frozen segment's last flush, through the
    /// reference it shares with the sealer, writes its mark too: marks are
    /// written on the writer's thread alone (under the writer's lock).
    marked: AtomicU32,
    mark_slot: std::sync::atomic::AtomicUsize,
}

/// The least an active file is brought into the page cache ahead of its
/// appends, past its header and slot table, and the first stretch of a
/// segment whose stream has shown no rate yet: what an idle stream keeps
/// resident of its active file besides the header and slot table. 16 KiB
/// (409 items of 40 bytes): each stretch is as long as all before it (16,
/// 16, 32, 64 KiB ...), and a stream's next segment starts with a lead as
/// long as what it wrote into the last one, so only a new stream's first
/// few hundred appends see the small lead. It was 64 KiB: 10,000 idle
/// streams on ext4 kept 943 MiB resident, now 477 MiB (issue 16,
/// docs/benchmarks.md).
pub const PREFAULT_MIN: usize = 16 << 10;
/// The most: a stretch never exceeds this, nor does the lead of the pages
/// brought in over the appends (8 MiB: about 16 ms of appends at 500,000
/// a second, several times a seal's duration).
pub const PREFAULT_MAX: usize = 8 << 20;

/// Bring the pages of `len` bytes of an active segment's map at `addr`
/// into this process's page tables and the page cache, as a read of each
/// would, or with `write` as a write would (the stretch
/// [`ActiveSegment::prefault_due`] asked for, or a new segment's lead,
/// [`ActiveSegment::lead_for_writing`]), on the sealer's thread. Best
/// effort: kernels without `MADV_POPULATE_READ`/`_WRITE` (before 5.14)
/// refuse it, and the appends then fault those pages in themselves, under
/// the writer's lock (a fault then also waits for any map or unmap in the
/// process: measured as 4-9x more appends waiting over 100 us than with
/// the pages populated, which reading the file into the page cache alone
/// did not avoid).
///
/// Why write: on a file system that tracks the pages written through a
/// shared map (ext4, XFS: `page_mkwrite`), a page populated by a read is
/// mapped read-only, and the first append into it took a second fault to
/// make it writable, 2-5 us on ext4 here: one append in about 100 (a 4 KiB
/// page holds 102 items), which set the append's p99 at about 2 us and its
/// p99.9 at 3.5-4.7 us (session 32, docs/benchmarks.md). Pages populated
/// for writing are dirty (zeros over allocated blocks: a writeback puts on
/// disk what reads the same as before), so only a stream fast enough to
/// overwrite them soon gets them ([`WRITE_HORIZON_SECS`]), and only on
/// ext4 and XFS ([`Allocation::populate_write`]).
pub(crate) fn populate(addr: usize, len: usize, write: bool) {
    if madvise_populate(addr, len, write) {
        POPULATED.fetch_add(len as u64, Ordering::Relaxed);
    }
}

/// `MADV_POPULATE_READ` or `_WRITE` over the pages holding `len` bytes at
/// `addr`; whether it succeeded (a failure is logged at debug level: the
/// appends fault those pages in themselves).
fn madvise_populate(addr: usize, len: usize, write: bool) -> bool {
    // `madvise` takes an address aligned to the kernel's page, which may be
    // larger than the format's 4 KiB (16 or 64 KiB on some arm64 and
    // ppc64le kernels): from the page holding `addr`.
    let page = runtime_page_size();
    let start = addr / page * page;
    let len = len + (addr - start);
    let advice = if write {
        libc::MADV_POPULATE_WRITE
    } else {
        libc::MADV_POPULATE_READ
    };
    // SAFETY: `MADV_POPULATE_READ`/`_WRITE` neither read nor write memory
    // the program sees: they fault the range's pages in as a read or a
    // write would, without the access, so no byte changes. The range is a
    // map of an active file that is still mapped: the writer's own segment
    // (a flush's tail, a benchmark's prefault), or, on the sealer's thread,
    // one whose allocation says it is mapped and holds it so meanwhile
    // (`Allocation::populate_mapped`; a segment's drop clears it before
    // the map goes). Were the range reused all the same, the call
    // fails (ENOMEM; EFAULT or EINVAL for a read-only or special map) or
    // populates what occupies it, changing no byte of it: a file's pages
    // marked dirty (its mtime updated), private pages made resident or
    // copied on write with the same bytes, a range registered with
    // userfaultfd waiting for its handler.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, advice) };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            write,
            "populating a stretch of an active segment failed; its appends fault the pages in"
        );
    }
    rc == 0
}

/// Tells the kernel not to read ahead in an active segment's map
/// (`MADV_RANDOM`): its pages come in by [`populate`] and the appends, in
/// the stretches the writer asks for. With read-ahead on, a file system
/// such as ext4 filled the page cache past each stretch and the faults
/// around it mapped those pages too: an idle stream kept about 25% more of
/// its file resident than on tmpfs (issue 16: 10,000 streams, 1.17 GiB).
/// Best effort: a kernel that refuses it only reads ahead.
fn no_read_ahead(map: &MmapMut) {
    if let Err(e) = map.advise(memmap2::Advice::Random) {
        tracing::debug!(error = %e, "MADV_RANDOM on an active segment failed");
    }
}

/// The kernel's page size (4 KiB where it cannot be read).
fn runtime_page_size() -> usize {
    static PAGE_SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE_SIZE.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the system.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(v).ok().filter(|v| v.is_power_of_two()).unwrap_or(PAGE)
    })
}

static POPULATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes of active segments populated ahead of the appends
/// ([`populate`]) by this process so far, all writers together (for tests
/// and benchmarks).
#[cfg(any(test, feature = "testing"))]
pub fn populated_bytes() -> u64 {
    POPULATED.load(Ordering::Relaxed)
}

fn allocate(file: &File, path: &Path, len: u64) -> Result<()> {
    crate::failpoint::hit("active.create.fallocate")
        .map_err(|e| Error::io(path, "preallocate segment (posix_fallocate)", e))?;
    fallocate(file, path, 0, len)?;
    crate::durable::resized(path);
    Ok(())
}

/// `posix_fallocate` of `len` bytes at `from` (the file grows to cover
/// them if shorter).
fn fallocate(file: &File, path: &Path, from: u64, len: u64) -> Result<()> {
    let too_large = || Error::InvalidInput("segment too large".into());
    let from = i64::try_from(from).map_err(|_| too_large())?;
    let len = i64::try_from(len).map_err(|_| too_large())?;
    // SAFETY: plain syscall on a valid, owned file descriptor.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), from, len) };
    if rc != 0 {
        return Err(Error::io(
            path,
            "preallocate segment (posix_fallocate)",
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    Ok(())
}

/// How far an active file is allocated on disk, shared by the segment (its
/// appends never write past it) and the sealer's thread (which allocates
/// the stretches ahead). No descriptor is kept: a stretch opens the file by
/// its path.
pub struct Allocation {
    path: PathBuf,
    /// Bytes from the file's start that are allocated: always a multiple
    /// of [`ALLOC_ALIGN`] (or the file's length), so that no page an item
    /// is written to holds an unallocated block (a block smaller than a
    /// page, or a page larger than 4 KiB, would otherwise leave one past
    /// an unaligned end, and its first write fault on a full disk would be
    /// a SIGBUS).
    end: std::sync::atomic::AtomicU64,
    file_len: u64,
    /// The file's identity (device, inode): a stretch is allocated only in
    /// the file this segment maps, never in another one put under its name.
    file_id: (u64, u64),
    /// One allocation at a time: `posix_fallocate` emulated by the C
    /// library (file systems without `fallocate`) writes zeros over what
    /// reads as zero, and must not run over items an append just wrote.
    lock: std::sync::Mutex<()>,
    /// The file is on ext4 or XFS: pages a fast stream will write soon are
    /// populated for writing ([`populate`]). Elsewhere only for reading:
    /// on tmpfs a read-populated page is writable already; on btrfs an
    /// msync writes back the whole file, dirty zeros ahead included; other
    /// file systems were not measured.
    pub(crate) populate_write: bool,
    /// Whether the segment's map still exists: cleared (under this lock)
    /// when the segment is dropped, before it is unmapped, and held while a
    /// job on the sealer's thread populates a range of it
    /// ([`populate_mapped`](Self::populate_mapped)), so that a job queued
    /// for a segment dropped meanwhile (a close, an empty segment removed
    /// on the writer's thread) populates nothing.
    mapped: std::sync::Mutex<bool>,
}

/// Whether pages of `file` populated for writing spare the appends their
/// write faults without costing more than they save (see
/// [`Allocation::populate_write`]).
fn populate_write_helps(file: &File) -> bool {
    use std::os::fd::AsRawFd as _;
    // SAFETY: fstatfs into a zeroed struct it fills, on a borrowed fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) }) == 0
        && [libc::EXT4_SUPER_MAGIC, libc::XFS_SUPER_MAGIC].contains(&st.f_type)
}

/// A stretch of pages is populated for writing only if the stream, at
/// the rate it wrote so far in its segment, reaches its end within this
/// many seconds: well within the kernel's default 30 s before a dirty page
/// is written back, so the zeros are usually overwritten before a
/// writeback (a `sync`, memory pressure or a stream that stops after a
/// burst still writes some back), and a slow stream's lead stays clean (a
/// dirty page of zeros written back is a write for nothing, and a dirty
/// page is not reclaimed as cheaply as a clean one). Overlay file systems
/// (containers) report their own type: pages there are populated for
/// reading.
pub const WRITE_HORIZON_SECS: u64 = 10;

/// A stream writing `rate` bytes a second covers `bytes` more within
/// [`WRITE_HORIZON_SECS`].
fn writes_soon(rate: Option<u64>, bytes: usize) -> bool {
    rate.is_some_and(|r| r.saturating_mul(WRITE_HORIZON_SECS) >= bytes as u64)
}

/// What an allocation's end is rounded up to: the largest page size Linux
/// runs with (64 KiB), which is also a multiple of any file system block.
pub const ALLOC_ALIGN: u64 = 64 << 10;

fn align_up(n: u64) -> u64 {
    n.div_ceil(ALLOC_ALIGN).saturating_mul(ALLOC_ALIGN)
}

fn file_id(file: &File, path: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = file
        .metadata()
        .map_err(|e| Error::io(path, "stat active segment", e))?;
    Ok((m.dev(), m.ino()))
}

impl Allocation {
    fn new(file: &File, path: &Path, end: u64, file_len: u64) -> Result<Allocation> {
        Ok(Allocation {
            path: path.to_path_buf(),
            end: std::sync::atomic::AtomicU64::new(end),
            file_len,
            file_id: file_id(file, path)?,
            lock: std::sync::Mutex::new(()),
            populate_write: populate_write_helps(file),
            mapped: std::sync::Mutex::new(true),
        })
    }

    /// [`populate`] `len` bytes at `addr` of this allocation's segment's
    /// map, if the segment is still mapped, holding it mapped meanwhile.
    pub(crate) fn populate_mapped(&self, addr: usize, len: usize, write: bool) {
        let mapped = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        if *mapped {
            populate(addr, len, write);
        }
    }

    /// Bytes from the file's start that are allocated.
    #[inline]
    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Allocate the file up to byte `to` (rounded up to [`ALLOC_ALIGN`], at
    /// most its length). The file is opened by its path and must be the one
    /// mapped: one sealed meanwhile (its `.active` name gone), or another
    /// file under its name, is not allocated for, and that is an error only
    /// its appends would see (a sealed segment takes none).
    pub fn extend_to(&self, to: u64) -> Result<()> {
        let to = align_up(to).min(self.file_len);
        if to <= self.end() {
            return Ok(());
        }
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let from = self.end();
        if to <= from {
            return Ok(());
        }
        let file = crate::durable::open_regular(&self.path, true)
            .map_err(|e| Error::io(&self.path, "open active segment to allocate a stretch", e))?;
        if file_id(&file, &self.path)? != self.file_id {
            return Err(Error::io(
                &self.path,
                "allocate a stretch of an active segment",
                std::io::Error::other(
                    "another file is under its name (moved or replaced while mapped)",
                ),
            ));
        }
        fallocate(&file, &self.path, from, to - from)?;
        self.end.fetch_max(to, Ordering::AcqRel);
        Ok(())
    }
}

/// The least of an active file's items allocated at a time: a stretch
/// allocated ahead of the appends, or the appends' own when they catch up
/// (allocations end on an [`ALLOC_ALIGN`] boundary besides).
pub const ALLOC_MIN: u64 = 64 << 10;

/// Name the file in a corruption error; other errors (an unsupported
/// version, I/O) pass through unchanged so they are never quarantined.
fn at_path(path: &Path, e: Error) -> Error {
    match e {
        Error::Corrupt { detail, .. } => Error::corrupt(path.display().to_string(), detail),
        Error::InvalidInput(detail) => Error::corrupt(path.display().to_string(), detail),
        other => other,
    }
}

/// The item at byte `at`, with whatever lies past the end of `bytes` read as
/// zeros: exactly what `open` sees after it zero-extends a short file, with
/// no allocation sized by an (untrusted) header.
fn item_padded(bytes: Sparse<'_>, at: usize) -> [u8; ACTIVE_ITEM_LEN] {
    let mut b = [0u8; ACTIVE_ITEM_LEN];
    bytes.copy(at, &mut b);
    b
}

/// The byte ranges of `file` within `spans` (sorted, disjoint) that hold
/// data, by `SEEK_DATA` / `SEEK_HOLE`, in order; what lies between them is
/// a hole and reads as zeros. An active file is sparse past the stretches
/// allocated so far, and reading a hole through a map makes tmpfs allocate
/// a page for it: on a full tmpfs that is SIGBUS, which ended `fsck`,
/// `inspect`, `drain` and the broker's open with exit 135 and no word
/// (helper-61). The scans of a mapped active file therefore read only
/// these ranges, and only in the spans they read (the header's page and
/// the items, not the slot table, which appends touch at random and which
/// would split into thousands of ranges).
///
/// Trusted only on the file systems known to report pages dirtied through
/// a map as data (tmpfs, ext4, XFS, btrfs; older OpenZFS did not): on any
/// other, and wherever `lseek` fails, the span is taken as data whole, as
/// before. So is the rest of a span past `MAX_RANGES` ranges.
fn data_ranges(file: &File, spans: &[(u64, u64)]) -> Vec<(usize, usize)> {
    use std::os::fd::AsRawFd as _;
    const MAX_RANGES: usize = 4096;
    let fd = file.as_raw_fd();
    let whole = |spans: &[(u64, u64)]| -> Vec<(usize, usize)> {
        spans
            .iter()
            .filter(|(s, e)| s < e)
            .map(|&(s, e)| (s as usize, e as usize))
            .collect()
    };
    // SAFETY: fstatfs into a zeroed struct it fills, on a borrowed fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let trusted = unsafe { libc::fstatfs(fd, &mut st) } == 0
        && [
            libc::TMPFS_MAGIC,
            libc::EXT4_SUPER_MAGIC,
            libc::XFS_SUPER_MAGIC,
            libc::BTRFS_SUPER_MAGIC,
        ]
        .contains(&st.f_type);
    if !trusted {
        return whole(spans);
    }
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &(from, to) in spans {
        let end = i64::try_from(to).unwrap_or(i64::MAX);
        let mut at = i64::try_from(from).unwrap_or(i64::MAX);
        while at < end {
            if out.len() >= MAX_RANGES {
                out.push((at as usize, end as usize));
                break;
            }
            // SAFETY: lseek on a descriptor this function borrows; it moves
            // only the file offset, which nothing here reads by (every read
            // and write of segment files is positioned).
            let d = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if d < 0 {
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                    out.push((at as usize, end as usize));
                }
                break; // ENXIO: no data at or past `at`
            }
            if d >= end {
                break;
            }
            // SAFETY: as above.
            let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
            if h <= d {
                out.push((d as usize, end as usize));
                break;
            }
            let h = h.min(end);
            out.push((d as usize, h as usize));
            at = h;
        }
    }
    out
}

/// The spans the scans of an active file read: its header's page and its
/// items (the layout from the header, read with `pread`); the whole file
/// when the header does not decode.
fn scanned_spans(file: &File, len: u64) -> Vec<(u64, u64)> {
    use std::os::unix::fs::FileExt as _;
    let mut hb = [0u8; HEADER_LEN];
    let layout = file
        .read_at(&mut hb, 0)
        .ok()
        .and_then(|n| Header::decode(&hb[..n], ACTIVE_MAGIC, ACTIVE_ITEM_LEN).ok())
        .and_then(|h| ActiveLayout::new(h.slot_count, h.items).ok());
    match layout {
        Some(l) => spans_of(&l, len),
        None => vec![(0, len)],
    }
}

/// [`scanned_spans`] for a known layout and file length.
fn spans_of(l: &ActiveLayout, len: u64) -> Vec<(u64, u64)> {
    if l.items_offset >= PAGE as u64 {
        vec![(0, (PAGE as u64).min(len)), (l.items_offset.min(len), len)]
    } else {
        vec![(0, len)]
    }
}

/// A file's bytes through a map, read only where the file holds data
/// (`ranges`, from [`data_ranges`]; `None`: everywhere): a hole, and any
/// byte past the end, reads as zero, as the file system would give it.
#[derive(Clone, Copy)]
struct Sparse<'a> {
    bytes: &'a [u8],
    ranges: Option<&'a [(usize, usize)]>,
}

impl<'a> Sparse<'a> {
    fn len(&self) -> usize {
        self.bytes.len()
    }

    /// `out.len()` bytes from `at`.
    fn copy(&self, at: usize, out: &mut [u8]) {
        out.fill(0);
        let end = at.saturating_add(out.len()).min(self.bytes.len());
        if at >= end {
            return;
        }
        match self.ranges {
            None => out[..end - at].copy_from_slice(&self.bytes[at..end]),
            Some(r) => {
                let first = r.partition_point(|&(_, e)| e <= at);
                for &(s, e) in &r[first..] {
                    if s >= end {
                        break;
                    }
                    let (s, e) = (s.max(at), e.min(end));
                    out[s - at..e - at].copy_from_slice(&self.bytes[s..e]);
                }
            }
        }
    }
}

/// The last non-zero byte at or past `from` in `map`, reading only `ranges`
/// (holes are zeros).
fn last_nonzero(map: &[u8], ranges: &[(usize, usize)], from: usize) -> Option<usize> {
    ranges.iter().rev().find_map(|&(s, e)| {
        let e = e.min(map.len());
        let s = s.max(from);
        (s < e).then(|| map[s..e].iter().rposition(|&b| b != 0).map(|p| s + p))?
    })
}

/// Length of the valid item prefix of an active file mapped as `map`:
/// items whose checksum verifies and whose chain link equals the slot head
/// rebuilt so far. Fills `heads` (index + 1 of each slot's newest item).
fn scan_valid_prefix(map: Sparse<'_>, l: &ActiveLayout, id: SegmentId, heads: &mut [u32]) -> u32 {
    let mut valid = 0u32;
    while valid < l.item_capacity {
        let b = item_padded(map, l.item_offset(valid));
        let Some(item) = format::decode_active_item(&b, id, valid) else {
            break;
        };
        let slot = slot_of(item.entry.key_hash, l.slot_count) as usize;
        if heads.get(slot) != Some(&item.prev) {
            break; // a valid checksum but a broken chain: not ours to trust
        }
        heads[slot] = valid + 1;
        valid += 1;
    }
    valid
}

/// The header at the start of `bytes` (read as [`Sparse`] reads).
fn header_of(bytes: Sparse<'_>, path: &Path) -> Result<Header> {
    let mut hb = [0u8; HEADER_LEN];
    bytes.copy(0, &mut hb);
    let hb = &hb[..bytes.len().min(HEADER_LEN)];
    Header::decode(hb, ACTIVE_MAGIC, ACTIVE_ITEM_LEN).map_err(|e| at_path(path, e))
}

/// A file's bytes through a read-only map, for the read-only checks below:
/// a huge or sparse file (a 6 GiB one took 12.6 GB of memory when read)
/// costs page cache, not heap. Only a regular file is opened (a FIFO would
/// block). `None`: the file is empty.
///
/// The bytes are read while the file may be in use by a running broker,
/// which only ever writes items past what was read and never shortens the
/// file (an interrupted `set_len` of a cut file only extends it); a file
/// truncated under the map by hand would end the process with SIGBUS, as
/// for any mapped file.
/// Returns the map, the file's length and its data ranges
/// ([`data_ranges`]): only those may be read through the map.
#[allow(clippy::type_complexity)]
fn map_read_only(path: &Path) -> Result<(Option<memmap2::Mmap>, u64, Vec<(usize, usize)>)> {
    let file = crate::durable::open_regular(path, false)
        .map_err(|e| Error::io(path, "open active segment", e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(path, "stat active segment", e))?
        .len();
    if len == 0 {
        return Ok((None, 0, Vec::new()));
    }
    let ranges = data_ranges(&file, &scanned_spans(&file, len));
    // SAFETY: read-only map of a regular file; see above for truncation.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| Error::io(path, "map active segment", e))?;
    Ok((Some(map), len, ranges))
}

/// Read-only: the valid entries of an active file, in append order (for
/// `tierindex lookup` on a directory whose broker is down).
pub fn read_entries(path: &Path) -> Result<(SegmentId, Vec<Entry>)> {
    let (map, len, ranges) = map_read_only(path)?;
    let bytes = Sparse {
        bytes: map.as_deref().unwrap_or(&[]),
        ranges: Some(&ranges),
    };
    let header = header_of(bytes, path)?;
    let l = ActiveLayout::new(header.slot_count, header.items).map_err(|e| at_path(path, e))?;
    check_claim(path, len, &l, None)?;
    // A short file is scanned as `open` scans it (zero-extended), item by
    // item, never by allocating what the header claims.
    let valid = scan_bytes(bytes, &l, header.segment_id);
    let entries = (0..valid)
        .filter_map(|i| {
            format::decode_active_item(&item_padded(bytes, l.item_offset(i)), header.segment_id, i)
        })
        .map(|it| it.entry)
        .collect();
    Ok((header.segment_id, entries))
}

/// Read-only check of an active file (for `fsck` without `--repair`): what
/// [`ActiveSegment::open`] would keep and zero, without changing anything.
pub fn check_active(path: &Path) -> Result<(SegmentId, ActiveRecovery)> {
    let (map, len, ranges) = map_read_only(path)?;
    let all: &[u8] = map.as_deref().unwrap_or(&[]);
    let bytes = Sparse {
        bytes: all,
        ranges: Some(&ranges),
    };
    let header = header_of(bytes, path)?;
    let l = ActiveLayout::new(header.slot_count, header.items).map_err(|e| at_path(path, e))?;
    if len > l.file_len {
        return Err(Error::corrupt(
            path.display().to_string(),
            format!("{len} bytes, header implies {}", l.file_len),
        ));
    }
    check_claim(path, len, &l, None)?;
    let mut rec = ActiveRecovery {
        extended_from: (len < l.file_len).then_some(len),
        ..Default::default()
    };
    // Predict `open` exactly (it zero-extends a short file before scanning);
    // `scan_valid_prefix` reads past-the-end bytes as zeros.
    rec.valid_items = scan_bytes(bytes, &l, header.segment_id);
    let mut page = vec![0u8; PAGE];
    bytes.copy(0, &mut page);
    rec.flush_mark = format::decode_flush_marks(&page, header.segment_id, l.item_capacity);
    rec.unverified_below_mark = rec.flush_mark.map_or(0, |m| {
        (0..m)
            .filter(|&i| {
                // Past the end, as in a hole: zeros, which do not verify.
                let b = item_padded(bytes, l.item_offset(i));
                format::decode_active_item(&b, header.segment_id, i).is_none()
            })
            .count() as u32
    });
    let tail_start = l.item_offset(rec.valid_items).min(all.len());
    if let Some(last) = last_nonzero(all, &ranges, tail_start) {
        rec.torn_bytes_zeroed = (last - tail_start) as u64 + 1;
    }
    Ok((header.segment_id, rec))
}

impl Drop for ActiveSegment {
    /// Before the map goes (its field is dropped after this): no job of
    /// the sealer's thread populates it any more, and one doing so now is
    /// waited for ([`Allocation::populate_mapped`]).
    fn drop(&mut self) {
        *self.alloc.mapped.lock().unwrap_or_else(|p| p.into_inner()) = false;
    }
}

impl ActiveSegment {
    /// Create and durably initialise a new active segment in `dir`.
    pub fn create(
        dir: &Path,
        id: SegmentId,
        slot_count: u32,
        item_capacity: u32,
        created_ms: u64,
    ) -> Result<ActiveSegment> {
        let layout = ActiveLayout::new(slot_count, item_capacity)?;
        let path = dir.join(active_file_name(id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, "create active segment", e))?;
        crate::durable::created(&path);
        // Until this segment is durable it holds nothing: on any failure
        // remove it so the id is not left half-created.
        let cleanup = |e: Error| {
            let _ = crate::durable::unlink(&path);
            e
        };
        // The whole length, sparse: the map never reaches past the end of
        // the file (SIGBUS). Allocated: the header, the slot table (every
        // append writes there) and a first stretch of items; the rest in
        // stretches ahead of the appends.
        let first = align_up(layout.items_offset.saturating_add(ALLOC_MIN)).min(layout.file_len);
        file.set_len(layout.file_len)
            .map_err(|e| Error::io(&path, "size active segment", e))
            .map_err(cleanup)?;
        crate::durable::resized(&path);
        allocate(&file, &path, first).map_err(cleanup)?;
        let header = Header {
            magic: ACTIVE_MAGIC,
            version: format::FORMAT_VERSION,
            item_len: ACTIVE_ITEM_LEN as u32,
            segment_id: id,
            created_ms,
            slot_count,
            items: item_capacity,
        };
        crate::durable::write_all_at(&file, &header.encode(), 0, &path)
            .map_err(|e| Error::io(&path, "write active header", e))
            .map_err(cleanup)?;
        crate::durable::at("active.create.fsync")
            .sync_all(&file, &path)
            .map_err(|e| Error::Poisoned(format!("fsync of new {} failed: {e}", path.display())))
            .map_err(cleanup)?;
        // IMPORTANT: make the new file's directory entry durable too.
        fsync_dir_at("active.create.dirsync", dir).map_err(cleanup)?;
        // SAFETY: this process holds the data-directory lock, and the file
        // has its whole length, so the mapping never covers a hole past EOF;
        // nothing is written through it past what `alloc` says is allocated.
        let map = unsafe { MmapMut::map_mut(&file) }
            .map_err(|e| Error::io(&path, "mmap active segment", e))
            .map_err(cleanup)?;
        no_read_ahead(&map);
        let alloc = std::sync::Arc::new(
            Allocation::new(&file, &path, first, layout.file_len).map_err(cleanup)?,
        );
        drop(file);
        let mut seg = ActiveSegment {
            path,
            map,
            layout,
            id,
            created_ms,
            len: 0,
            flushed: AtomicU32::new(0),
            sync_failed: std::sync::atomic::AtomicBool::new(false),
            poisoned: None,
            pf_end: 0,
            pf_at: u32::MAX,
            rate_from: None,
            alloc,
            marked: AtomicU32::new(0),
            mark_slot: std::sync::atomic::AtomicUsize::new(0),
        };
        // Nothing read in yet: the first append asks for the first stretch
        // (unless `prefault` reads it now).
        seg.set_prefaulted(0);
        Ok(seg)
    }

    /// Open an existing active segment after a restart or crash: check the
    /// header, keep the longest valid prefix of items, zero the rest, rebuild
    /// the slot table. A bad header is `Error::Corrupt` (quarantine the file).
    ///
    /// `save_dir` is where a damaged span that still holds checksum-valid
    /// items is copied before it is zeroed (the quarantine directory).
    ///
    /// A cut file is re-extended by at most [`MAX_REEXTEND_BYTES`]; see
    /// [`open_within`](Self::open_within) to bound it by the geometry.
    #[cfg(any(test, feature = "testing"))]
    pub fn open(path: &Path, save_dir: Option<&Path>) -> Result<(ActiveSegment, ActiveRecovery)> {
        Self::open_within(path, save_dir, None)
    }

    /// [`open`](Self::open), refusing (as `Error::Corrupt`, before anything
    /// is fallocated or mapped) a header whose sizes reach past the file
    /// and past what `geometry`, the configured one, would create.
    #[cfg(any(test, feature = "testing"))]
    pub fn open_within(
        path: &Path,
        save_dir: Option<&Path>,
        geometry: Option<Geometry>,
    ) -> Result<(ActiveSegment, ActiveRecovery)> {
        Self::open_noting(path, save_dir, geometry, &mut |_| Ok(()))
    }

    /// Open an existing active segment after a restart or crash, as
    /// `open`, refusing (as `Error::Corrupt`, before anything is allocated
    /// or mapped) a header whose sizes reach past the file and past what
    /// `geometry`, the configured one, would create; and calling `saved`
    /// with the copy of a damaged tail once it is durable and before the
    /// tail is zeroed (the caller's record of the loss must not be lost to
    /// a crash between the zeroing and the record).
    pub fn open_noting(
        path: &Path,
        save_dir: Option<&Path>,
        geometry: Option<Geometry>,
        saved: &mut dyn FnMut(&Path) -> Result<()>,
    ) -> Result<(ActiveSegment, ActiveRecovery)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, "open active segment", e))?;
        let mut hb = [0u8; HEADER_LEN];
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat active segment", e))?
            .len();
        if file_len < HEADER_LEN as u64 {
            return Err(Error::corrupt(
                path.display().to_string(),
                format!("{file_len} bytes, shorter than a header"),
            ));
        }
        file.read_exact_at(&mut hb, 0)
            .map_err(|e| Error::io(path, "read active header", e))?;
        let header =
            Header::decode(&hb, ACTIVE_MAGIC, ACTIVE_ITEM_LEN).map_err(|e| at_path(path, e))?;
        let layout =
            ActiveLayout::new(header.slot_count, header.items).map_err(|e| at_path(path, e))?;
        let mut rec = ActiveRecovery::default();
        if file_len < layout.file_len {
            // Someone cut the file. The mapping must not reach past EOF
            // (SIGBUS), so give it back its zeroed tail before mapping, but
            // only as far as `check_claim` allows: the header is CRC-valid
            // but still untrusted input (it can claim ~11 GB). Start-up
            // never gets here: it salvages a cut file (`segment::salvage`).
            check_claim(path, file_len, &layout, geometry)?;
            file.set_len(layout.file_len)
                .map_err(|e| Error::io(path, "re-extend active segment", e))?;
            crate::durable::resized(path);
            rec.extended_from = Some(file_len);
        } else if file_len > layout.file_len {
            return Err(Error::corrupt(
                path.display().to_string(),
                format!("{file_len} bytes, header implies {}", layout.file_len),
            ));
        }
        // SAFETY: as in `create`; the file now has its full length (sparse
        // where a crash left it allocated in stretches: `recover` allocates
        // what it writes before writing it).
        let map = unsafe { MmapMut::map_mut(&file) }
            .map_err(|e| Error::io(path, "mmap active segment", e))?;
        let alloc = std::sync::Arc::new(Allocation::new(&file, path, 0, layout.file_len)?);
        let mut seg = ActiveSegment {
            path: path.to_path_buf(),
            map,
            layout,
            id: header.segment_id,
            created_ms: header.created_ms,
            len: 0,
            flushed: AtomicU32::new(0),
            sync_failed: std::sync::atomic::AtomicBool::new(false),
            poisoned: None,
            pf_end: 0,
            pf_at: u32::MAX,
            rate_from: None,
            alloc,
            marked: AtomicU32::new(0),
            mark_slot: std::sync::atomic::AtomicUsize::new(0),
        };
        // Recovery reads the whole file in order: read-ahead helps it.
        seg.recover(&file, &mut rec, save_dir, saved)?;
        no_read_ahead(&seg.map);
        drop(file);
        // Recovery read the whole file through the map, so all of it is
        // resident in this process. Keep what a fresh segment with these
        // items would (up to a stretch past them) and let the rest go
        // (issue 16: 10,000 restarted streams kept ~40% more resident than
        // new ones). `MADV_DONTNEED` on a shared file map only drops this
        // process's page-table entries: the bytes stay in the file and the
        // page cache, and a later read or write faults them back in.
        let items = seg.layout.items_offset as usize;
        let used = items.saturating_add(seg.len as usize * ACTIVE_ITEM_LEN);
        // Aligned to the kernel's page (`madvise` takes no other start).
        let page = runtime_page_size();
        let keep = used
            .saturating_add(PREFAULT_MIN)
            .div_ceil(page)
            .saturating_mul(page)
            .min(seg.map.len());
        if keep < seg.map.len() {
            // SAFETY: a `MAP_SHARED` file map (`MmapMut::map_mut`): the
            // advice changes no byte anyone reads, see above. No reference
            // into the range is held (the segment is not shared yet).
            let r = unsafe {
                seg.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    keep,
                    seg.map.len() - keep,
                )
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "MADV_DONTNEED past a recovered active segment's items failed");
            }
        }
        // Stretches resume from there (within what recovery allocated).
        let end = usize::try_from(seg.alloc.end()).unwrap_or(usize::MAX);
        seg.set_prefaulted(end.min(keep));
        Ok((seg, rec))
    }

    fn recover(
        &mut self,
        file: &File,
        rec: &mut ActiveRecovery,
        save_dir: Option<&Path>,
        saved: &mut dyn FnMut(&Path) -> Result<()>,
    ) -> Result<()> {
        let l = self.layout;
        let mut heads = vec![0u32; l.slot_count as usize];
        // Nothing is read through the map before `fallocate` below but the
        // file's data ranges: a hole read on a full tmpfs is SIGBUS.
        let ranges = data_ranges(file, &spans_of(&l, l.file_len));
        let valid = scan_valid_prefix(
            Sparse {
                bytes: &self.map,
                ranges: Some(&ranges),
            },
            &l,
            self.id,
            &mut heads,
        );
        // Zero every non-zero byte after the valid prefix, so that an item
        // written before the crash but never flushed cannot reappear once
        // the gap before it is filled again.
        let tail_start = l.item_offset(valid);
        let last = last_nonzero(&self.map[..l.file_len as usize], &ranges, tail_start)
            .map(|at| at - tail_start);
        // Nothing is written through the map below before it is allocated:
        // the header and slot table, the tail to zero, and a first stretch
        // for the appends. Not the whole file (a crash of 10,000 idle
        // streams must not need their whole preallocation to restart).
        let written_to = last.map_or(tail_start, |x| tail_start + x + 1);
        let to = align_up((written_to as u64).saturating_add(ALLOC_MIN)).min(l.file_len);
        fallocate(file, &self.path, 0, to)?;
        self.alloc.end.fetch_max(to, Ordering::AcqRel);
        let slots = &mut self.map[l.slots_offset as usize..l.items_offset as usize];
        slots.fill(0);
        for (c, h) in slots.chunks_exact_mut(4).zip(&heads) {
            c.copy_from_slice(&h.to_le_bytes());
        }
        if let Some(last) = last {
            let tail_end = tail_start + last + 1;
            // A kill -9 mid-append leaves at most the one item being written
            // torn (appends are sequential and the page cache survives): a
            // tail within that item is the normal end of a crash, zeroed
            // without a copy. Non-zero bytes past it are something else
            // (damage at rest, a torn power-loss writeback): copied first,
            // never deleted outright, since they may hold acknowledged items.
            if let Some(dir) = save_dir
                && tail_end > tail_start + ACTIVE_ITEM_LEN
            {
                let copy = self.save_tail(dir, tail_start, tail_end)?;
                saved(&copy)?;
                rec.tail_saved_to = Some(copy);
            }
            self.map[tail_start..tail_end].fill(0);
            rec.torn_bytes_zeroed = (tail_end - tail_start) as u64;
        }
        // Make the recovered state durable before anything new is appended:
        // after a kill -9 the kept items may still be dirty in the page cache
        // only, and the next flush syncs from `valid` onward. fsync covers
        // every dirty page of the file, including the zeroed tail.
        crate::durable::sync_all(file, &self.path).map_err(|e| {
            Error::Poisoned(format!(
                "fsync of recovered {} failed: {e}",
                self.path.display()
            ))
        })?;
        rec.valid_items = valid;
        self.len = valid;
        *self.flushed.get_mut() = valid;
        // The recovered items are durable now: the flush marks say so, both
        // of them, written only now (before the fsync, a mark could reach
        // the disk ahead of items still in the page cache only). Start-up
        // recovers in place only when no mark claims more than `valid`, so
        // an old mark can only be lower, and the rewrite needs no sync. A
        // direct caller's recovery may have dropped items below an old mark:
        // then the rewrite is synced (a power cut must not bring back a mark
        // claiming items this recovery dropped and later appends reuse).
        // With nothing kept, the marks are cleared, not set to 0: a file
        // with only its header holding bytes is one nothing was written to.
        let marked = format::decode_flush_marks(&self.map, self.id, l.item_capacity);
        rec.flush_mark = marked;
        if let Some(old) = marked {
            let mark = if valid == 0 {
                [0u8; format::FLUSH_MARK_LEN]
            } else {
                format::encode_flush_mark(self.id, valid)
            };
            for at in format::FLUSH_MARK_OFFSETS {
                self.map[at..at + format::FLUSH_MARK_LEN].copy_from_slice(&mark);
            }
            if old > valid {
                // No named failpoint: start-up never gets here (see
                // above); a failure poisons as every failed msync does.
                crate::durable::msync_range(&self.map, 0, PAGE, &self.path)
                    .map_err(|e| {
                        Error::Poisoned(format!(
                            "msync of recovered {}'s flush marks failed: {e}",
                            self.path.display()
                        ))
                    })?;
            }
        }
        self.marked.store(valid, Ordering::Relaxed);
        Ok(())
    }

    /// Copy `[from, to)` of the file to `dir` durably; returns the copy's path.
    fn save_tail(&self, dir: &Path, from: usize, to: usize) -> Result<PathBuf> {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dst = dir.join(format!(
            "{name}.tail-at-{from}.{}",
            crate::segment::now_ms()
        ));
        std::fs::write(&dst, &self.map[from..to])
            .map_err(|e| Error::io(&dst, "save damaged tail", e))?;
        crate::durable::created(&dst);
        crate::durable::written(&dst);
        fsync_path(&dst)?;
        fsync_dir(dir)?;
        tracing::warn!(segment = %self.id, saved = %dst.display(), "damage inside the item log; tail copied before zeroing");
        Ok(dst)
    }

    #[inline]
    fn slot_head(&self, slot: u32) -> u32 {
        let at = self.layout.slots_offset as usize + slot as usize * 4;
        let mut a = [0u8; 4];
        a.copy_from_slice(&self.map[at..at + 4]);
        u32::from_le_bytes(a)
    }

    #[inline]
    fn set_slot_head(&mut self, slot: u32, v: u32) {
        let at = self.layout.slots_offset as usize + slot as usize * 4;
        self.map[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn check_poison(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(Error::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Append an entry for `key`. Not durable until [`flush`](Self::flush).
    #[cfg(any(test, feature = "testing"))]
    pub fn append(&mut self, key: &[u8], offset: u64, size: u32, timestamp_ms: u64) -> Result<()> {
        self.append_entry(Entry {
            key_hash: crate::key_hash(key),
            offset,
            size,
            timestamp_ms,
        })
    }

    /// Append an entry whose key is already hashed.
    #[inline]
    pub fn append_entry(&mut self, entry: Entry) -> Result<()> {
        self.check_poison()?;
        let idx = self.len;
        if idx >= self.layout.item_capacity {
            return Err(Error::SegmentFull(self.id.0));
        }
        if self.rate_from.is_none() {
            self.rate_from = Some((std::time::Instant::now(), idx));
        }
        let slot = slot_of(entry.key_hash, self.layout.slot_count);
        let item = ActiveItem {
            entry,
            prev: self.slot_head(slot),
        };
        let at = self.layout.item_offset(idx);
        if (at + ACTIVE_ITEM_LEN) as u64 > self.alloc.end() {
            self.allocate_for(at + ACTIVE_ITEM_LEN)?;
        }
        format::encode_active_item(&mut self.map[at..at + ACTIVE_ITEM_LEN], self.id, idx, &item);
        self.set_slot_head(slot, idx + 1);
        self.len = idx + 1;
        crate::failpoint::crash("active.append");
        Ok(())
    }

    /// The appends caught up with the allocated stretches: allocate up to
    /// `need` (and the stretch asked to be populated, at least
    /// [`ALLOC_MIN`] more) here. A failure (a full disk) refuses the append
    /// and changes nothing; the next append tries again.
    #[cold]
    fn allocate_for(&mut self, need: usize) -> Result<()> {
        let to = (need as u64)
            .max(self.pf_end as u64)
            .max(self.alloc.end().saturating_add(ALLOC_MIN));
        self.alloc.extend_to(to)?;
        if (need as u64) > self.alloc.end() {
            return Err(Error::Internal(format!(
                "{}: allocated to {} bytes, an item needs {need}",
                self.path.display(),
                self.alloc.end()
            )));
        }
        Ok(())
    }

    /// How far the file is allocated, for the stretch allocated ahead of
    /// the appends on the sealer's thread (with [`prefault_due`](Self::prefault_due)'s).
    pub fn allocation(&self) -> std::sync::Arc<Allocation> {
        self.alloc.clone()
    }

    /// Make every item appended so far durable (msync of their pages).
    /// Returns only when they are on stable storage. A failure poisons.
    pub fn flush(&mut self) -> Result<()> {
        self.check_poison()?;
        let synced = self
            .sync_unflushed()
            .and_then(|synced| self.check_in_place().map(|()| synced))
            .inspect_err(|e| {
                if let Error::Poisoned(why) = e {
                    self.poisoned = Some(why.clone());
                }
            })?;
        self.write_flush_mark();
        if synced {
            self.rearm_tail();
        }
        Ok(())
    }

    /// After a flush's msync made new items durable: its writeback left
    /// the pages it wrote clean and write-protected in every map of them,
    /// so the next append into the last one, partly written, would take a
    /// write fault (`page_mkwrite`: 2-5 us on ext4 here), one append a
    /// flush: at a flush every 1,000 appends, that was the append's p99.9.
    /// Fault the next item's page (or two) in writable here instead, after
    /// the msync the flush's caller already waits for (a few us on top of
    /// hundreds), on ext4 and XFS ([`Allocation::populate_write`]). Best
    /// effort: on failure the append faults it in itself. Not a durability
    /// step and not needed for one: it changes no byte. The page is dirty
    /// again, with bytes already durable: written back once more at most.
    fn rearm_tail(&self) {
        if !self.alloc.populate_write {
            return;
        }
        let at = self.layout.item_offset(self.len);
        // Not past the map, nor past what is allocated (a hole faulted in
        // for writing would be allocated there, outside `extend_to`).
        if at + ACTIVE_ITEM_LEN > self.map.len() || (at + ACTIVE_ITEM_LEN) as u64 > self.alloc.end() {
            return;
        }
        madvise_populate(self.map.as_ptr() as usize + at, ACTIVE_ITEM_LEN, true);
    }

    /// After a flush returned: record in the header page how many items it
    /// made durable (a flush mark, docs/format/segment.md). Not synced, and
    /// not a durability step: a mark that reaches the disk (any writeback;
    /// after a kill -9 the page cache has it) lets start-up tell a zeroed
    /// or damaged acknowledged tail from items never written or torn by a
    /// power cut, and report those entries lost by number. It only ever
    /// claims items already durable, so a mark that is lost, or written
    /// back before a later flush's items, claims nothing false. Two slots in
    /// turn, each in a sector of its own: a torn write of one leaves the
    /// other.
    fn write_flush_mark(&mut self) {
        let n = self.flushed.load(Ordering::Acquire);
        if n == *self.marked.get_mut() {
            return;
        }
        let slot = *self.mark_slot.get_mut();
        let at = format::FLUSH_MARK_OFFSETS[slot];
        self.map[at..at + format::FLUSH_MARK_LEN]
            .copy_from_slice(&format::encode_flush_mark(self.id, n));
        *self.mark_slot.get_mut() = slot ^ 1;
        *self.marked.get_mut() = n;
    }

    /// [`write_flush_mark`](Self::write_flush_mark) for a frozen segment,
    /// whose map is shared with the sealer (`&self`: no write through the
    /// map). The mark goes through the file instead, opened by its path,
    /// which must still be the file this segment maps; a write to a file
    /// shares the page cache with its shared maps, so the map sees it too.
    /// Best effort, as every mark is (not synced, not a durability step): a
    /// mark that cannot be written leaves these items reported as possibly
    /// lost, not as lost, should the file be damaged later (gap 2). Runs on
    /// the writer's thread only, like every other mark write.
    fn write_flush_mark_frozen(&self) {
        use std::os::unix::fs::FileExt as _;
        let n = self.flushed.load(Ordering::Acquire);
        if n == self.marked.load(Ordering::Relaxed) {
            return;
        }
        let slot = self.mark_slot.load(Ordering::Relaxed);
        let at = format::FLUSH_MARK_OFFSETS[slot];
        let file = match crate::durable::open_regular(&self.path, true) {
            // Sealed and removed meanwhile: the sealed file holds the items.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            r => r,
        };
        let written = file
            .map_err(|e| e.to_string())
            .and_then(|f| match file_id(&f, &self.path) {
                Ok(id) if id == self.alloc.file_id => f
                    .write_all_at(&format::encode_flush_mark(self.id, n), at as u64)
                    .map_err(|e| e.to_string()),
                Ok(_) => Err("another file is under its name".into()),
                Err(e) => Err(e.to_string()),
            });
        match written {
            Ok(()) => {
                self.mark_slot.store(slot ^ 1, Ordering::Relaxed);
                self.marked.store(n, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "could not write the flush mark of a rolled segment (not a durability step: \
                 its items are durable; only a later damage report is less precise)"
            ),
        }
    }

    /// After a flush's msync: the file this segment maps is still the one
    /// under its name. An msync into a file that was removed (a data
    /// directory deleted under a running broker, or another process that
    /// sealed this segment and removed its active file) or replaced (a
    /// copy or restore) made nothing durable that a restart would find, so
    /// the flush must not be acknowledged; nothing is written on top of it
    /// either (`Poisoned`). One `stat` of the path a flush, following a
    /// symlink as the open did (recovery takes up a symlinked active file);
    /// a stat that fails for another reason than a missing file is tried
    /// once more before it poisons.
    fn check_in_place(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let found = match std::fs::metadata(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => std::fs::metadata(&self.path),
            r => r,
        };
        let why = match &found {
            Ok(m) if m.file_type().is_file() && (m.dev(), m.ino()) == self.alloc.file_id => {
                return Ok(());
            }
            Ok(_) => "another file is under its name (replaced, or restored from a copy)".to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The data directory itself gone (a stat now, not a guess):
                // nothing is left there for a restart or fsck (helper-81
                // F4/F5: the advice named `tierindex fsck` on it).
                let data_dir = self.path.parent().and_then(std::path::Path::parent);
                if let Some(dd) = data_dir
                    && matches!(std::fs::metadata(dd), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
                {
                    return Err(Error::Poisoned(format!(
                        "{} is not the file this segment wrote: the data directory {} is not \
                         there any more (deleted or moved). The entries since the last flush \
                         are not acknowledged and nothing more is written. Its journal and the \
                         segments it held that were not in the store are gone with it: a \
                         restart at this path starts an empty data directory and recovers none \
                         of them, and `tierindex fsck` has nothing there to check; if the \
                         directory was moved or copied, `tierindex drain --data-dir` on it \
                         uploads what it holds",
                        self.path.display(),
                        dd.display()
                    )));
                }
                "it is not there any more (removed, or the data directory deleted or moved)"
                    .to_string()
            }
            Err(e) => format!("it cannot be checked: {e}"),
        };
        Err(Error::Poisoned(format!(
            "{} is not the file this segment wrote: {why}. The entries since the last flush are \
             not acknowledged and nothing more is written. Stop the broker; if another process \
             opened this data directory, stop it too, then run `tierindex fsck` on the data \
             directory",
            self.path.display()
        )))
    }

    /// [`flush`](Self::flush) for a frozen segment (rolled: no append will
    /// come), through the reference it shares with the sealer thread. The
    /// caller poisons its writer on a failure: this segment cannot record
    /// it, and takes no appends anyway. Writes a flush mark when its msync
    /// made items durable in this file (not when the seal did, through
    /// [`mark_durable`](Self::mark_durable): those items are durable in the
    /// sealed file, not necessarily in this one).
    pub fn flush_frozen(&self) -> Result<()> {
        self.check_poison()?;
        if self.sync_failed() {
            return Err(Error::Poisoned(format!(
                "an earlier msync of {} failed; it is not retried",
                self.path.display()
            )));
        }
        if self.sync_unflushed()? {
            self.write_flush_mark_frozen();
        }
        Ok(())
    }

    /// Whether an msync of this segment failed.
    pub fn sync_failed(&self) -> bool {
        self.sync_failed.load(Ordering::Acquire)
    }

    /// Record that every item is durable elsewhere (the sealer wrote and
    /// fsynced this frozen segment's sealed file), so that
    /// [`flush_frozen`](Self::flush_frozen) has nothing left to sync.
    pub fn mark_durable(&self) {
        self.flushed.store(self.len, Ordering::Release);
    }

    /// msync the items from the last durable one to the end; whether there
    /// were any. An error is already `Poisoned`: a failed msync is never
    /// retried.
    fn sync_unflushed(&self) -> Result<bool> {
        let flushed = self.flushed.load(Ordering::Acquire);
        if flushed >= self.len {
            return Ok(false);
        }
        let start = self.layout.item_offset(flushed);
        let end = self.layout.item_offset(self.len);
        let synced = crate::durable::at("active.msync").msync_range(
            &self.map,
            start,
            end - start,
            &self.path,
        );
        if let Err(e) = synced {
            self.sync_failed.store(true, Ordering::Release);
            return Err(Error::Poisoned(format!(
                "msync of {} failed: {e}",
                self.path.display()
            )));
        }
        crate::failpoint::crash("active.msync.after");
        self.flushed.store(self.len, Ordering::Release);
        Ok(true)
    }

    /// Entries for `key_hash` within `range`, newest-first walk of the slot
    /// chain bounded by `max_steps` items; returned in append order.
    pub fn lookup(&self, key_hash: u64, range: TimeRange, max_steps: u32) -> Lookup {
        let mut out = Lookup::default();
        let mut next = self.slot_head(slot_of(key_hash, self.layout.slot_count));
        let mut steps = 0u32;
        while next != 0 {
            if steps >= max_steps {
                out.truncated = true;
                break;
            }
            steps += 1;
            let idx = next - 1;
            if idx >= self.len {
                break; // cannot happen for a table we built; never trust it
            }
            let at = self.layout.item_offset(idx);
            let Some(item) =
                format::decode_active_item(&self.map[at..at + ACTIVE_ITEM_LEN], self.id, idx)
            else {
                // Verified at open or written by us: damage since.
                out.corrupt_items += 1;
                out.corrupt_segments.push(self.id.0);
                break;
            };
            if item.entry.key_hash == key_hash && range.contains(item.entry.timestamp_ms) {
                out.entries.push(item.entry);
            }
            if item.prev >= next {
                break; // links always point backwards
            }
            next = item.prev;
        }
        out.entries.reverse();
        out
    }

    /// The bytes of the items appended so far, `ACTIVE_ITEM_LEN` apart; each
    /// starts with the packed entry the sealer copies.
    pub fn item_bytes(&self) -> &[u8] {
        &self.map[self.layout.item_offset(0)..self.layout.item_offset(self.len)]
    }

    /// The offset of the first entry (`None`: empty, or its item does not
    /// decode).
    pub fn first_offset(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let at = self.layout.item_offset(0);
        format::decode_active_item(&self.map[at..at + ACTIVE_ITEM_LEN], self.id, 0)
            .map(|it| it.entry.offset)
    }

    /// All entries in append order.
    pub fn entries(&self) -> Vec<Entry> {
        (0..self.len)
            .filter_map(|i| {
                let at = self.layout.item_offset(i);
                format::decode_active_item(&self.map[at..at + ACTIVE_ITEM_LEN], self.id, i)
            })
            .map(|it| it.entry)
            .collect()
    }

    /// Best effort: bring the header, the slot table and the first `ahead`
    /// bytes of items (at least [`PREFAULT_MIN`]; `usize::MAX`: all) into
    /// the page cache now, on the thread that prepares the segment, so that
    /// no append waits for the kernel to zero-fill or read ahead those pages
    /// of the preallocated file: an append's first write to a page is then
    /// a minor fault at most. The rest follows in stretches ahead of the appends
    /// ([`prefault_due`](Self::prefault_due), populated on the sealer's thread),
    /// so a stream keeps resident what it writes plus a lead that grows with
    /// what it has written, not its whole preallocated file (issue 16: an
    /// idle stream kept 0.8 MiB resident with 20,000-item segments, 42 MiB
    /// with the default 1 Mi). For reading: a segment prepared ahead takes
    /// no append for a while, and a page populated for writing is dirty
    /// (the lead of a fast stream is populated for writing once the roll
    /// swaps it in: [`lead_for_writing`](Self::lead_for_writing)). Kernels
    /// without `MADV_POPULATE_READ` (before 5.14) skip it.
    pub fn prefault(&mut self, ahead: usize) {
        let items = self.layout.items_offset as usize;
        let to = items
            .saturating_add(ahead.max(PREFAULT_MIN))
            .min(self.map.len());
        // What is brought in ahead is allocated ahead too (a failure is
        // the appends' to meet: they allocate, or are refused, themselves).
        if let Err(e) = self.alloc.extend_to(to as u64) {
            tracing::warn!(segment = %self.id, error = %e, "allocating ahead of the appends failed");
        }
        let _ = self
            .map
            .advise_range(memmap2::Advice::PopulateRead, 0, to);
        self.set_prefaulted(to);
    }

    /// [`prefault`](Self::prefault), then what it brought in past the first
    /// [`PREFAULT_MIN`] of items populated for writing where that helps
    /// ([`Allocation::populate_write`]), at once and on this thread: for a
    /// segment about to take appends as fast as they come (benchmarks'
    /// floor runs, tests).
    #[cfg(any(test, feature = "testing"))]
    pub fn prefault_writable(&mut self, ahead: usize) {
        self.prefault(ahead);
        if let Some((addr, len)) = self.lead_range() {
            populate(addr, len, true);
        }
    }

    /// The part of what [`prefault`](Self::prefault) brought in past the
    /// first [`PREFAULT_MIN`] of items, allocated, as an address range;
    /// `None` where pages are not populated for writing, or it is empty.
    fn lead_range(&self) -> Option<(usize, usize)> {
        if !self.alloc.populate_write {
            return None;
        }
        let from = (self.layout.items_offset as usize).saturating_add(PREFAULT_MIN);
        let to = self.pf_end.min(usize::try_from(self.alloc.end()).unwrap_or(usize::MAX));
        (to > from).then(|| self.map_range(from as u64, to as u64))
    }

    /// A segment just swapped in for a roll: its lead (populated for
    /// reading when it was prepared, as it would take no append for a
    /// while) to populate for writing on the sealer's thread, when the
    /// stream wrote at `rate` bytes a second into the segment before it and
    /// so reaches the lead's end within [`WRITE_HORIZON_SECS`]. With the
    /// allocation it lies in, for the sealer's job.
    pub fn lead_for_writing(&self, rate: Option<u64>) -> Option<((usize, usize), std::sync::Arc<Allocation>)> {
        let range = self.lead_range()?;
        let ahead = self.pf_end.saturating_sub(self.layout.item_offset(self.len));
        writes_soon(rate, ahead).then(|| (range, self.alloc.clone()))
    }

    /// Bytes a second this segment has taken since its first append after
    /// it was created or opened (`None` before that append).
    pub fn write_rate(&self) -> Option<u64> {
        let (t0, n0) = self.rate_from?;
        let us = t0.elapsed().as_micros().max(1);
        let bytes = u128::from(self.len.saturating_sub(n0)) * ACTIVE_ITEM_LEN as u128;
        Some(u64::try_from(bytes * 1_000_000 / us).unwrap_or(u64::MAX))
    }

    /// Record that the file is in the page cache up to byte `to` (or that
    /// nothing of its items is: `to` at or before them), and when the next
    /// stretch is due.
    fn set_prefaulted(&mut self, to: usize) {
        let items = self.layout.items_offset as usize;
        // Whole pages (`madvise` takes page-aligned ranges).
        let to = to.div_ceil(PAGE).saturating_mul(PAGE).clamp(items, self.map.len());
        self.pf_end = to;
        if to >= self.map.len() {
            self.pf_at = u32::MAX;
            return;
        }
        // Due when the appends come within half of the next stretch of
        // what is in: the stretch is read while they write that half.
        let next = (to - items).clamp(PREFAULT_MIN, PREFAULT_MAX);
        let at = to.saturating_sub(next / 2).max(items);
        self.pf_at = u32::try_from((at - items) / ACTIVE_ITEM_LEN).unwrap_or(u32::MAX);
    }

    /// The next stretch of the file (a byte range) to populate off the
    /// writer's thread ([`populate`] of [`map_range`](Self::map_range)),
    /// once the appends come near the end of what is in; `None` most of
    /// the time (one comparison). Each stretch is as long as everything
    /// before it (from [`PREFAULT_MIN`] up to [`PREFAULT_MAX`]): the lead
    /// grows with what the stream writes.
    /// With whether to populate it for writing: on ext4 and XFS, when the
    /// stream's rate reaches its end within [`WRITE_HORIZON_SECS`].
    #[inline]
    pub fn prefault_due(&mut self) -> Option<(u64, u64, bool)> {
        if self.len < self.pf_at {
            return None;
        }
        let items = self.layout.items_offset as usize;
        let from = self.pf_end;
        let to = (from + (from - items).clamp(PREFAULT_MIN, PREFAULT_MAX)).min(self.map.len());
        self.set_prefaulted(to);
        let ahead = to.saturating_sub(self.layout.item_offset(self.len));
        let write = self.alloc.populate_write && writes_soon(self.write_rate(), ahead);
        Some((from as u64, to as u64, write))
    }

    /// Where bytes `from..to` of the file are in this process's memory
    /// (address and length), for [`populate`]. Only an address: nothing
    /// may read or write through it.
    pub fn map_range(&self, from: u64, to: u64) -> (usize, usize) {
        let to = (to as usize).min(self.map.len());
        let from = (from as usize).min(to);
        (self.map.as_ptr() as usize + from, to - from)
    }

    /// Bytes of the items written so far (for the next segment's first
    /// stretch: a stream that filled half a segment gets that much ahead).
    pub fn items_bytes(&self) -> usize {
        self.len as usize * ACTIVE_ITEM_LEN
    }

    pub fn id(&self) -> SegmentId {
        self.id
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn created_ms(&self) -> u64 {
        self.created_ms
    }
    pub fn slot_count(&self) -> u32 {
        self.layout.slot_count
    }
    pub fn capacity(&self) -> u32 {
        self.layout.item_capacity
    }
    pub fn len(&self) -> u32 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Items a flush (or the seal) made durable.
    pub fn flushed_len(&self) -> u32 {
        self.flushed.load(Ordering::Acquire)
    }
    pub fn is_full(&self) -> bool {
        self.len >= self.layout.item_capacity
    }
    #[cfg(any(test, feature = "testing"))]
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }
    #[cfg(any(test, feature = "testing"))]
    pub fn file_len(&self) -> u64 {
        self.layout.file_len
    }
    /// Bytes of the file allocated on disk so far.
    #[cfg(any(test, feature = "testing"))]
    pub fn allocated_len(&self) -> u64 {
        self.alloc.end()
    }

    /// Poison from outside (e.g. a failed fsync elsewhere in the writer).
    #[cfg(any(test, feature = "testing"))]
    pub fn poison(&mut self, why: String) {
        self.poisoned.get_or_insert(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(k: u64, i: u64) -> Entry {
        Entry {
            key_hash: k,
            offset: i,
            size: 1,
            timestamp_ms: i,
        }
    }

    /// The flush mark of the active file at `p` (capacity 100), read from
    /// the disk's view of it.
    fn marks_in(p: &Path, id: SegmentId) -> Option<u32> {
        format::decode_flush_marks(&std::fs::read(p).unwrap(), id, 100)
    }

    /// A flush leaves a mark of what it made durable (the largest of the
    /// two slots counts); a recovery by a direct `open` that kept fewer
    /// items rewrites both marks to what it kept (none: cleared), so no
    /// mark claims items it dropped.
    #[test]
    fn flush_marks_follow_flushes_and_a_recovery() {
        let d = tempfile::tempdir().unwrap();
        let marks = |p: &Path| marks_in(p, SegmentId(1));
        let mut s = ActiveSegment::create(d.path(), SegmentId(1), 8, 100, 0).unwrap();
        let path = s.path().to_path_buf();
        assert_eq!(marks(&path), None, "never flushed");
        for i in 0..5 {
            s.append_entry(e(i % 3, i)).unwrap();
        }
        s.flush().unwrap();
        assert_eq!(marks(&path), Some(5));
        for i in 5..12 {
            s.append_entry(e(i % 3, i)).unwrap();
        }
        assert_eq!(marks(&path), Some(5), "appends alone write no mark");
        s.flush().unwrap();
        s.flush().unwrap();
        assert_eq!(marks(&path), Some(12));
        drop(s);
        // Item `i` damaged, then a direct open: the marks that follow.
        let l = ActiveLayout::new(8, 100).unwrap();
        let damage_and_open = |i: u32| {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&[0xff; 4], l.item_offset(i) as u64).unwrap();
            drop(f);
            let (_, rec) = ActiveSegment::open(&path, None).unwrap();
            // What the marks said before is reported: a direct caller
            // sees acknowledged items dropped.
            (rec.valid_items, rec.flush_mark, marks(&path))
        };
        // It keeps 0..7 and drops the rest (5 of them acknowledged).
        assert_eq!(damage_and_open(7), (7, Some(12), Some(7)));
        // Nothing kept: the marks cleared.
        assert_eq!(damage_and_open(0), (0, Some(7), None));
    }

    /// A frozen segment's last flush (through the reference it shares with
    /// the sealer) leaves a mark too, written through the file; one the
    /// seal made durable (`mark_durable`) writes none: those items are
    /// durable in the sealed file, not in this one. A replaced file gets no
    /// mark.
    #[test]
    fn the_scans_read_no_hole_of_a_sparse_active_file() {
        // On tmpfs a hole read through a map allocates a page, and on a
        // full tmpfs it is SIGBUS (helper-61: fsck, inspect, drain and the
        // open ended with exit 135). So allocation shows what was read.
        use std::os::unix::fs::MetadataExt as _;
        let shm = c"/dev/shm";
        // SAFETY: statfs into a zeroed struct it fills.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        let tmpfs = unsafe { libc::statfs(shm.as_ptr(), &mut st) } == 0
            && st.f_type == libc::TMPFS_MAGIC;
        if !tmpfs {
            assert!(
                std::env::var_os("CI").is_none(),
                "this test needs /dev/shm on tmpfs under CI"
            );
            eprintln!("skipped: /dev/shm is not tmpfs");
            return;
        }
        let d = tempfile::tempdir_in("/dev/shm").unwrap();
        // 1 Mi items: a 32 MiB file, allocated only at its start.
        let mut s = ActiveSegment::create(d.path(), SegmentId(1), 8, 1 << 20, 0).unwrap();
        let path = s.path().to_path_buf();
        for i in 0..100 {
            s.append_entry(e(i % 3, i)).unwrap();
        }
        s.flush().unwrap();
        drop(s);
        let allocated = || std::fs::metadata(&path).unwrap().blocks() * 512;
        let len = std::fs::metadata(&path).unwrap().len();
        let before = allocated();
        assert!(before < len / 8, "{before} of {len}");
        let (_, rec) = check_active(&path).unwrap();
        assert_eq!(rec.valid_items, 100);
        assert_eq!(rec.torn_bytes_zeroed, 0);
        assert_eq!(allocated(), before, "check_active read a hole");
        let (_, entries) = read_entries(&path).unwrap();
        assert_eq!(entries.len(), 100);
        assert_eq!(allocated(), before, "read_entries read a hole");
        // A torn byte far past the items, in data of its own: found.
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new().write(true).open(&path).unwrap(),
            &[7],
            len / 2,
        )
        .unwrap();
        let (_, rec) = check_active(&path).unwrap();
        assert_eq!(rec.valid_items, 100);
        assert!(rec.torn_bytes_zeroed > len / 4, "{rec:?}");
        let before = allocated();
        let (s, rec) = ActiveSegment::open(&path, Some(d.path())).unwrap();
        assert_eq!(rec.valid_items, 100);
        assert!(rec.torn_bytes_zeroed > 0);
        drop(s);
        // The open allocates up to the zeroed tail and a stretch past it,
        // and reads nothing else.
        assert!(allocated() <= before + len / 2 + (1 << 20), "{} of {len}", allocated());
    }

    #[test]
    fn a_frozen_segments_flush_leaves_a_mark() {
        let d = tempfile::tempdir().unwrap();
        let marks = |p: &Path| marks_in(p, SegmentId(1));
        let mut s = ActiveSegment::create(d.path(), SegmentId(1), 8, 100, 0).unwrap();
        let path = s.path().to_path_buf();
        for i in 0..5 {
            s.append_entry(e(i % 3, i)).unwrap();
        }
        s.flush().unwrap();
        for i in 5..9 {
            s.append_entry(e(i % 3, i)).unwrap();
        }
        let frozen = std::sync::Arc::new(s);
        frozen.flush_frozen().unwrap();
        assert_eq!(marks(&path), Some(9));
        // The map sees what went through the file.
        assert_eq!(format::decode_flush_marks(&frozen.map, SegmentId(1), 100), Some(9));
        frozen.flush_frozen().unwrap();
        assert_eq!(marks(&path), Some(9), "nothing new: no mark");

        let mut s = ActiveSegment::create(d.path(), SegmentId(2), 8, 100, 0).unwrap();
        let path2 = s.path().to_path_buf();
        s.append_entry(e(1, 1)).unwrap();
        s.flush().unwrap();
        s.append_entry(e(1, 2)).unwrap();
        let frozen = std::sync::Arc::new(s);
        frozen.mark_durable();
        frozen.flush_frozen().unwrap();
        assert_eq!(marks_in(&path2, SegmentId(2)), Some(1));

        let mut s = ActiveSegment::create(d.path(), SegmentId(3), 8, 100, 0).unwrap();
        let path3 = s.path().to_path_buf();
        s.append_entry(e(1, 1)).unwrap();
        let frozen = std::sync::Arc::new(s);
        let copy = d.path().join("copy");
        std::fs::copy(&path3, &copy).unwrap();
        std::fs::rename(&copy, &path3).unwrap();
        frozen.flush_frozen().unwrap();
        assert_eq!(marks_in(&path3, SegmentId(3)), None);
    }

    /// A flush whose file was removed or replaced under it is refused and
    /// poisons: what it synced is in no file a restart reads.
    #[test]
    fn a_flush_into_a_file_removed_or_replaced_under_it_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut s = ActiveSegment::create(d.path(), SegmentId(1), 8, 100, 0).unwrap();
        s.append_entry(e(1, 1)).unwrap();
        s.flush().unwrap();
        std::fs::remove_file(s.path()).unwrap();
        s.append_entry(e(1, 2)).unwrap();
        let err = s.flush().unwrap_err();
        assert!(matches!(&err, Error::Poisoned(m) if m.contains("not there any more")), "{err}");
        assert!(s.append_entry(e(1, 3)).is_err());
        assert!(s.flush().is_err());

        let mut s = ActiveSegment::create(d.path(), SegmentId(2), 8, 100, 0).unwrap();
        s.append_entry(e(1, 1)).unwrap();
        s.flush().unwrap();
        // A copy put in its place (a restore into a live data directory).
        let copy = d.path().join("copy");
        std::fs::copy(s.path(), &copy).unwrap();
        std::fs::rename(&copy, s.path()).unwrap();
        let err = s.flush().unwrap_err();
        assert!(matches!(&err, Error::Poisoned(m) if m.contains("another file")), "{err}");
    }

    /// A job queued on the sealer's thread for a segment dropped meanwhile
    /// on the writer's (a close, an empty segment removed) populates
    /// nothing: the segment's drop marks its allocation unmapped first.
    #[test]
    fn a_dropped_segment_is_not_populated_by_a_job_queued_for_it() {
        let d = tempfile::tempdir().unwrap();
        let mut s = ActiveSegment::create(d.path(), SegmentId(1), 1024, 100_000, 0).unwrap();
        s.prefault(0);
        let alloc = s.allocation();
        let items = s.layout.items_offset;
        let (addr, len) = s.map_range(items, items + PREFAULT_MIN as u64);
        assert!(*alloc.mapped.lock().unwrap());
        alloc.populate_mapped(addr, len, true);
        drop(s);
        assert!(!*alloc.mapped.lock().unwrap(), "still marked mapped after its drop");
        // The range is unmapped now: populating it would fail or touch
        // whatever is mapped there next; the job does nothing.
        alloc.populate_mapped(addr, len, true);
    }

    #[test]
    fn writes_soon_compares_the_rate_over_the_horizon_with_what_is_ahead() {
        assert!(!writes_soon(None, 1));
        assert!(writes_soon(Some(1 << 20), 10 << 20));
        assert!(!writes_soon(Some(1 << 20), (10 << 20) + 1));
        assert!(writes_soon(Some(u64::MAX), usize::MAX));
        assert!(!writes_soon(Some(0), 1));
        assert!(writes_soon(Some(0), 0));
    }

    /// Pages ahead are populated for writing (dirty) only on ext4 and XFS
    /// and only for a stream that reaches them within the horizon; a slow
    /// stream's stretches, and a new segment's lead after a slow one, are
    /// populated for reading.
    #[test]
    fn only_a_fast_stream_gets_its_pages_ahead_populated_for_writing() {
        let d = tempfile::tempdir().unwrap();
        let mut s = ActiveSegment::create(d.path(), SegmentId(1), 1024, 1_000_000, 0).unwrap();
        let helps = s.alloc.populate_write;
        s.prefault(0);
        // As fast as this loop appends: millions of bytes a second.
        let mut flags = Vec::new();
        for i in 0..200_000u64 {
            s.append_entry(e(i % 97, i)).unwrap();
            if let Some((_, _, write)) = s.prefault_due() {
                flags.push(write);
            }
        }
        assert!(flags.len() >= 5, "{flags:?}");
        assert!(flags.iter().all(|w| *w == helps), "fast stream: {flags:?}, populate_write {helps}");
        let fast = s.write_rate();
        assert!(fast.is_some_and(|r| r > 1_000_000), "{fast:?}");
        // The same segment as if its first append came 100 s ago: 8 MB in
        // 100 s does not reach an 8 MiB stretch within 10 s.
        let long_ago = std::time::Instant::now()
            .checked_sub(std::time::Duration::from_secs(100))
            .expect("the machine has been up for 100 s");
        s.rate_from = Some((long_ago, 0));
        let mut slow = Vec::new();
        for i in 0..400_000u64 {
            s.append_entry(e(i % 97, i)).unwrap();
            if let Some((_, _, write)) = s.prefault_due() {
                slow.push(write);
            }
        }
        assert!(!slow.is_empty());
        assert!(slow.iter().all(|w| !*w), "slow stream: {slow:?}");
        // A new segment's lead: for writing after a fast stream where that
        // helps, never after a slow one or before any append.
        let mut n = ActiveSegment::create(d.path(), SegmentId(2), 1024, 1_000_000, 0).unwrap();
        n.prefault(4 << 20);
        assert_eq!(n.lead_for_writing(fast).is_some(), helps);
        assert!(n.lead_for_writing(Some(1000)).is_none());
        assert!(n.lead_for_writing(None).is_none());
    }

    #[test]
    fn stretches_populated_ahead_cover_the_file_once_in_order_growing_with_what_was_written() {
        let d = tempfile::tempdir().unwrap();
        // 1,000,000 items of 40 bytes: 40 MB, more than PREFAULT_MAX.
        let mut s = ActiveSegment::create(d.path(), SegmentId(1), 1024, 1_000_000, 0).unwrap();
        let items = s.layout.items_offset as usize;
        let end = s.layout.file_len as usize;
        s.prefault(0);
        assert_eq!(s.pf_end, items + PREFAULT_MIN);
        let mut covered = s.pf_end;
        let mut stretches = Vec::new();
        for i in 0..1_000_000u64 {
            s.append_entry(e(i % 97, i)).unwrap();
            if let Some((from, to, _)) = s.prefault_due() {
                let (from, to) = (from as usize, to as usize);
                assert_eq!(from, covered, "stretches are contiguous");
                assert!(to > from && to <= end);
                assert!(to - from <= PREFAULT_MAX);
                // Asked for before the appends reach it, with a lead.
                let written = s.layout.item_offset(s.len);
                assert!(written < from, "due at item {} past {from}", s.len);
                stretches.push((from, to, written));
                covered = to;
            }
        }
        assert_eq!(covered, end, "the whole file was asked for by the time it filled");
        // Growing: each stretch is as long as everything before it, up to
        // the most.
        for w in stretches.windows(2) {
            let (a, b) = (w[0].1 - w[0].0, w[1].1 - w[1].0);
            assert!(b >= a || w[1].1 == end, "{a} then {b}");
        }
        assert!(stretches.iter().any(|&(f, t, _)| t - f == PREFAULT_MAX));
        assert_eq!(s.prefault_due(), None);

        // A segment created without `prefault` asks for its first stretch
        // at its first append; a recovered one goes on from what recovery
        // allocated, each stretch following the one before.
        let mut s = ActiveSegment::create(d.path(), SegmentId(2), 1024, 100_000, 0).unwrap();
        s.append_entry(e(1, 1)).unwrap();
        assert_eq!(
            s.prefault_due().map(|(from, to, _)| (from, to)),
            Some((
                s.layout.items_offset,
                s.layout.items_offset + PREFAULT_MIN as u64
            ))
        );
        s.flush().unwrap();
        let path = s.path().to_path_buf();
        drop(s);
        let (mut s, _) = ActiveSegment::open(&path, None).unwrap();
        // Resident after recovery: its item and a stretch past it (the
        // rest of what recovery read was let go), within what it allocated.
        let mut at = s.pf_end as u64;
        let used = s.layout.item_offset(1) as u64 + PREFAULT_MIN as u64;
        let page = runtime_page_size() as u64;
        assert_eq!(at, (used.div_ceil(page) * page).min(s.allocated_len()));
        assert!(at <= s.allocated_len());
        for i in 0..50_000 {
            s.append_entry(e(i % 5, i)).unwrap();
            if let Some((from, to, _)) = s.prefault_due() {
                assert_eq!(from, at);
                assert!(to > from);
                at = to;
            }
        }
        assert!(at > s.layout.item_offset(50_000) as u64, "{at}");
        // A whole-file prefault leaves nothing due.
        let mut s = ActiveSegment::create(d.path(), SegmentId(3), 1024, 1_000_000, 0).unwrap();
        s.prefault(usize::MAX);
        for i in 0..10_000 {
            s.append_entry(e(i % 5, i)).unwrap();
            assert_eq!(s.prefault_due(), None);
        }
    }

    #[test]
    fn append_lookup_reopen() {
        let d = tempfile::tempdir().unwrap();
        let mut s = ActiveSegment::create(d.path(), SegmentId(1), 4, 100, 5).unwrap();
        for i in 0..50 {
            s.append_entry(e(i % 7, i)).unwrap();
        }
        s.flush().unwrap();
        let l = s.lookup(3, TimeRange::ALL, 1000);
        assert_eq!(
            l.entries.iter().map(|x| x.offset).collect::<Vec<_>>(),
            vec![3, 10, 17, 24, 31, 38, 45]
        );
        assert!(!l.truncated);
        let l2 = s.lookup(3, TimeRange::ALL, 5);
        assert!(l2.truncated);
        let path = s.path().to_path_buf();
        drop(s);
        let (s, rec) = ActiveSegment::open(&path, None).unwrap();
        assert_eq!(rec.valid_items, 50);
        assert_eq!(rec.torn_bytes_zeroed, 0);
        assert_eq!(s.lookup(3, TimeRange::ALL, 1000), l);
        assert_eq!(s.created_ms(), 5);
    }

    #[test]
    fn full_segment_refuses() {
        let d = tempfile::tempdir().unwrap();
        let mut s = ActiveSegment::create(d.path(), SegmentId(1), 4, 3, 0).unwrap();
        for i in 0..3 {
            s.append_entry(e(i, i)).unwrap();
        }
        assert!(matches!(
            s.append_entry(e(9, 9)),
            Err(Error::SegmentFull(1))
        ));
    }

    #[test]
    fn torn_item_truncates_and_stale_items_do_not_return() {
        let d = tempfile::tempdir().unwrap();
        let mut s = ActiveSegment::create(d.path(), SegmentId(2), 4, 1000, 0).unwrap();
        for i in 0..300 {
            s.append_entry(e(i, i)).unwrap();
        }
        s.flush().unwrap();
        let l = s.layout;
        // tear item 200: items 201.. still carry valid checksums.
        let at = l.item_offset(200) + 3;
        s.map[at] ^= 0xff;
        s.map.flush().unwrap();
        let path = s.path().to_path_buf();
        drop(s);
        let (mut s, rec) = ActiveSegment::open(&path, None).unwrap();
        assert_eq!(rec.valid_items, 200);
        assert!(rec.torn_bytes_zeroed >= 100 * ACTIVE_ITEM_LEN as u64);
        // refill index 200; 201 must not come back.
        s.append_entry(e(1000, 1000)).unwrap();
        s.flush().unwrap();
        drop(s);
        let (s, rec) = ActiveSegment::open(&path, None).unwrap();
        assert_eq!(rec.valid_items, 201);
        assert!(s.lookup(250, TimeRange::ALL, 100).entries.is_empty());
    }

    /// Bytes of `path` allocated on disk.
    fn allocated_on_disk(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    /// A new active file has its whole length but only its header, slot
    /// table and a first stretch allocated; appends past it allocate the
    /// next stretch themselves when nothing did ahead of them, and every
    /// item reads back.
    #[test]
    fn a_new_file_is_allocated_in_stretches_as_the_appends_need() {
        let d = tempfile::tempdir().unwrap();
        let mut s = ActiveSegment::create(d.path(), SegmentId(1), 1024, 1_000_000, 0).unwrap();
        let items = s.layout.items_offset;
        assert_eq!(std::fs::metadata(s.path()).unwrap().len(), s.file_len());
        assert_eq!(s.allocated_len(), align_up(items + ALLOC_MIN));
        assert_eq!(s.allocated_len() % ALLOC_ALIGN, 0);
        let on_disk = allocated_on_disk(s.path());
        assert!(on_disk < s.file_len() / 10, "{on_disk} of {}", s.file_len());
        let n = (3 * ALLOC_MIN / ACTIVE_ITEM_LEN as u64) as u32;
        for i in 0..n {
            s.append_entry(e(u64::from(i % 7), u64::from(i))).unwrap();
        }
        s.flush().unwrap();
        let need = s.layout.item_offset(n) as u64;
        assert!(s.allocated_len() >= need, "{} < {need}", s.allocated_len());
        assert!(s.allocated_len() < s.file_len());
        assert_eq!(s.entries().len(), n as usize);
        drop(s);
        let (r, rec) = ActiveSegment::open(&d.path().join("00000000000000000001.active"), None)
            .unwrap();
        assert_eq!(rec.valid_items, n);
        // Recovery allocates what it writes and a stretch, not the whole
        // file, page-aligned.
        assert!(r.allocated_len() >= need + ALLOC_MIN, "{}", r.allocated_len());
        assert!(r.allocated_len() < r.file_len() / 10, "{}", r.allocated_len());
        assert_eq!(r.allocated_len() % ALLOC_ALIGN, 0);
        assert!(allocated_on_disk(r.path()) < r.file_len() / 10);
    }

    /// However long the stretch asked for (a spare sized by the items the
    /// last segment held, 40 bytes each), what is allocated ends on a
    /// 64 KiB boundary: no page an item lands on holds an unallocated block
    /// (file systems with 1 KiB blocks, kernels with 64 KiB pages), whose
    /// first write on a full disk would be a SIGBUS (helper-41).
    #[test]
    fn allocation_ends_on_a_boundary_no_page_straddles() {
        let d = tempfile::tempdir().unwrap();
        let mut s = ActiveSegment::create(d.path(), SegmentId(1), 64, 100_000, 0).unwrap();
        s.prefault(2000 * ACTIVE_ITEM_LEN);
        assert_eq!(s.allocated_len() % ALLOC_ALIGN, 0, "{}", s.allocated_len());
        let first = s.allocated_len();
        let n = ((first - s.layout.items_offset) / ACTIVE_ITEM_LEN as u64) as u32 + 3;
        for i in 0..n {
            s.append_entry(e(1, u64::from(i))).unwrap();
        }
        assert!(s.allocated_len() > first);
        assert_eq!(s.allocated_len() % ALLOC_ALIGN, 0, "{}", s.allocated_len());
    }

    /// Another file put under the segment's name (moved or replaced while
    /// mapped) is not allocated for: the append is refused.
    #[test]
    fn a_stretch_is_never_allocated_in_another_file_under_the_name() {
        let d = tempfile::tempdir().unwrap();
        let mut s = ActiveSegment::create(d.path(), SegmentId(1), 64, 100_000, 0).unwrap();
        let path = s.path().to_path_buf();
        std::fs::rename(&path, d.path().join("moved")).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        let err = loop {
            if let Err(e) = s.append_entry(e(1, 1)) {
                break e;
            }
        };
        assert!(err.to_string().contains("another file"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    }

    /// The next stretch cannot be allocated (here: the file was moved away
    /// under the writer; a full disk fails the same way): the append is
    /// refused with an error, nothing is written past the allocation, and
    /// the segment goes on once the stretch can be allocated.
    #[test]
    fn an_append_whose_stretch_cannot_be_allocated_is_refused_not_written() {
        let d = tempfile::tempdir().unwrap();
        let mut s = ActiveSegment::create(d.path(), SegmentId(1), 64, 100_000, 0).unwrap();
        let path = s.path().to_path_buf();
        let away = d.path().join("moved");
        std::fs::rename(&path, &away).unwrap();
        let mut i = 0u64;
        let err = loop {
            match s.append_entry(e(i % 5, i)) {
                Ok(()) => i += 1,
                Err(err) => break err,
            }
            assert!(i < 100_000, "every append went through");
        };
        assert!(err.to_string().contains("allocate a stretch"), "{err}");
        let end = s.allocated_len();
        assert!(s.layout.item_offset(s.len()) as u64 + ACTIVE_ITEM_LEN as u64 > end);
        assert_eq!(s.len() as u64, i);
        assert!(!s.is_poisoned(), "a refused allocation does not poison");
        std::fs::rename(&away, &path).unwrap();
        s.append_entry(e(1, i)).unwrap();
        s.flush().unwrap();
        assert!(s.allocated_len() > end);
        let got = s.entries();
        assert_eq!(got.len() as u64, i + 1);
        assert!(got.iter().enumerate().all(|(n, en)| en.offset == n as u64));
    }
}
