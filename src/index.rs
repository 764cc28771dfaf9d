//! The index writer: owns the active segment, rolls it, seals in background.
//!
//! Rolling (capacity reached, age exceeded, or asked): the old active segment
//! is flushed and handed to the sealer thread, and the next one, prepared
//! ahead by the sealer thread (fallocate + fsync + dir fsync + its pages
//! brought into the page cache; asked for, at the front of its queue, once
//! the active segment is half full), is swapped in. The roll waits for that
//! spare only while it is still being prepared (at most behind the one seal
//! in progress), creates one itself when none was asked for (an age roll
//! before half full) or its preparation failed, and never waits for a
//! seal. Until its sealed file is durable a frozen segment stays readable
//! through its mapping. A spare is an empty `NNN.active` with the next id:
//! after a crash the next start takes it up as the active segment, or
//! removes it (an empty active file that is not the newest).
//!
//! The sealer thread writes `NNN.seg` (tmp, fsync, rename, dir fsync), then
//! removes `NNN.active` and fsyncs the directory. A failure there poisons the
//! writer: the active file is still on disk and the next start seals it.
//! The sealer thread then reads the sealed file back with every check (the
//! pair check), so the writer's lock is never held for a whole-file read.
//! Sealed results are collected by [`IndexWriter::poll_sealed`], which hands
//! their metadata to the caller (the upload pipeline journals them).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::datadir::{self, DataDir, Mode, RecoveryReport};
use crate::durable::fsync_dir_at;
use crate::error::{Error, Result};
use crate::segment::active::{ActiveSegment, Lookup};
use crate::segment::format::ACTIVE_ITEM_LEN;
use crate::segment::local::{LocalSealed, SealedInfo};
use crate::segment::sealed::{SealedSegment, sealed_file_name, write_sealed_streaming};
use crate::segment::{Entry, SealedMeta, SegmentId, TimeRange, now_ms};

/// How segments are shaped and when they roll.
#[derive(Clone, Debug)]
pub struct IndexConfig {
    /// Hash slots per segment.
    pub slot_count: u32,
    /// Items per segment; reaching it rolls the segment.
    pub segment_items: u32,
    /// A segment older than this is rolled at the next append or tick.
    pub segment_max_age: Option<Duration>,
    /// Bound on chain steps per active-segment lookup.
    pub max_chain_steps: u32,
    /// Local sealed segments kept mapped at once (least recently used
    /// first out); the others are known by their footers and mapped on
    /// demand ([`crate::segment::local`]).
    pub sealed_mapped: usize,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            slot_count: 1 << 16,
            segment_items: 1 << 20,
            segment_max_age: Some(Duration::from_secs(600)),
            max_chain_steps: 1 << 16,
            sealed_mapped: crate::segment::local::DEFAULT_MAPPED,
        }
    }
}

/// Frozen segments waiting for the sealer beyond which a roll waits for
/// its seals (see `next_active`).
const MAX_FROZEN: usize = 16;
/// How long a roll waits for the sealer at [`MAX_FROZEN`] before the
/// append returns [`Error::Deadline`].
const SEALER_WAIT: Duration = Duration::from_secs(30);

/// Called from the sealer thread after each seal finished (or failed); the
/// pipeline uses it to wake up and call [`IndexWriter::poll_sealed`].
pub type SealNotify = Arc<dyn Fn() + Send + Sync>;

/// Work for the sealer thread.
enum Job {
    /// Seal a frozen segment.
    Seal(Arc<ActiveSegment>),
    /// Create (allocate, fsync, map, prefault) the next active segment
    /// ahead of the roll that needs it, so that the append which rolls
    /// only swaps it in.
    Prepare(SegmentId),
    /// Drop a sealed segment's frozen mapping here, not under the writer
    /// lock: its file is already unlinked, so the last reference frees the
    /// whole preallocated file (measured at 10-15 ms for 8 MB on ext4,
    /// which every append waited for).
    Retire(Arc<ActiveSegment>),
}

/// The sealer thread's queue: a spare's preparation goes to the front (the
/// next roll waits for it), seals to the back. Closing lets the thread
/// finish what is queued and end.
#[derive(Default)]
struct Jobs {
    state: Mutex<(std::collections::VecDeque<Job>, bool)>,
    ready: std::sync::Condvar,
}

impl Jobs {
    fn push(&self, job: Job) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match job {
            Job::Prepare(_) => g.0.push_front(job),
            Job::Seal(_) | Job::Retire(_) => g.0.push_back(job),
        }
        self.ready.notify_one();
    }
    fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.ready.notify_one();
    }
    /// The next job; `None` once closed and empty.
    fn pop(&self) -> Option<Job> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(j) = g.0.pop_front() {
                return Some(j);
            }
            if g.1 {
                return None;
            }
            g = self.ready.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What the sealer thread sends back.
enum Done {
    Sealed(SealDone),
    Prepared(SegmentId, Result<ActiveSegment>),
}

struct SealDone {
    id: SegmentId,
    /// The sealed file's metadata and the file opened with every check.
    result: Result<(SealedMeta, SealedSegment)>,
}

/// Pair check, on the sealer thread (never under the writer's lock: it
/// reads and checksums the whole file): open what was just written with
/// every check and compare it with what was meant to be written.
fn read_back(
    seg_dir: &Path,
    id: SegmentId,
    meta: SealedMeta,
) -> Result<(SealedMeta, SealedSegment)> {
    let path = seg_dir.join(sealed_file_name(id));
    let sealed = SealedSegment::open(&path).map_err(|e| {
        Error::corrupt(
            path.display().to_string(),
            format!("sealed segment {id} does not read back: {e}"),
        )
    })?;
    if sealed.meta() != meta {
        return Err(Error::corrupt(
            path.display().to_string(),
            format!("sealed segment {id} reads back different from what was written"),
        ));
    }
    Ok((meta, sealed))
}

#[derive(Default)]
struct Poison {
    set: AtomicBool,
    why: Mutex<Option<String>>,
}

impl Poison {
    fn set(&self, why: String) {
        if let Ok(mut w) = self.why.lock() {
            w.get_or_insert(why);
        }
        self.set.store(true, Ordering::Release);
    }
    fn check(&self) -> Result<()> {
        if !self.set.load(Ordering::Acquire) {
            return Ok(());
        }
        let why = self
            .why
            .lock()
            .ok()
            .and_then(|w| w.clone())
            .unwrap_or_else(|| "earlier failure".into());
        Err(Error::Poisoned(why))
    }
}

/// Write the sealed file of a frozen active segment durably (tmp, fsync,
/// rename, dir fsync), reading its items straight from the mapping.
pub fn seal_to_file(seg_dir: &Path, seg: &ActiveSegment) -> Result<SealedMeta> {
    let (_path, meta) = write_sealed_streaming(
        seg_dir,
        seg.id(),
        seg.created_ms(),
        now_ms(),
        seg.slot_count(),
        seg.item_bytes(),
        ACTIVE_ITEM_LEN,
    )?;
    debug_assert_eq!(meta.item_count, u64::from(seg.len()));
    Ok(meta)
}

/// Seal one frozen active segment durably and remove its source.
pub fn seal_segment(seg_dir: &Path, seg: &ActiveSegment) -> Result<SealedMeta> {
    let meta = seal_to_file(seg_dir, seg)?;
    crate::durable::at("seal.remove_active")
        .unlink(seg.path())
        .map_err(|e| Error::io(seg.path(), "remove sealed source", e))?;
    fsync_dir_at("seal.remove_active.dirsync", seg_dir)?;
    Ok(meta)
}

/// A lookup whose open-segment part is done (under the writer's lock, by
/// [`IndexWriter::lookup_open`]) and whose sealed part is not.
pub struct OpenLookup {
    open: Lookup,
    /// The open segments read, oldest first.
    open_ids: Vec<SegmentId>,
    sealed: Arc<LocalSealed>,
    /// [`LocalSealed::reseals`] when the open part was read.
    reseals: u64,
    /// [`LocalSealed::removals`] when the open part was read.
    removals: u64,
}

impl OpenLookup {
    /// Read the local sealed segments (no writer lock needed) and merge:
    /// sealed entries first (they are older), then the open segments'.
    /// Also returns what the result covers, for a remote lookup (see
    /// [`Covered`]).
    ///
    /// `raced` (the third value) is true when a reseal copied entries
    /// between segments while the sealed part was read (`copy_in`): the
    /// open part may predate the copies and the sealed part may have lost
    /// their source, so the caller must redo the lookup holding the
    /// writer's lock (which a reseal holds throughout).
    pub fn finish(self, key_hash: u64, range: TimeRange) -> (Lookup, Covered, bool) {
        // The sealed part leaves out the segments the open part read (one
        // that sealed since is read once, as open) and any newer than them
        // (created since: they hold only entries appended after this
        // lookup began). Neither assumes segments seal in id order.
        let newer = self
            .open_ids
            .last()
            .map_or(SegmentId(u64::MAX), |l| SegmentId(l.0.saturating_add(1)));
        let sealed = self
            .sealed
            .lookup_below(key_hash, range, newer, &self.open_ids);
        let raced = self.sealed.reseals() != self.reseals;
        // A raced lookup is redone under the lock, which logs what it finds:
        // logged here too, each damaged segment would be logged twice.
        let log = !raced;
        let mut out = Lookup {
            entries: sealed.entries,
            ..Lookup::default()
        };
        for (id, bad) in sealed.corrupt {
            if log {
                tracing::error!(segment = id.0, items = bad, path = %self.sealed.path_of(id).display(), "local sealed segment has items whose CRC fails: they are missing from this lookup (run tierindex fsck --repair to salvage the rest)");
            }
            out.corrupt_items += u64::from(bad);
            out.corrupt_segments.push(id.0);
        }
        let mut not_read: std::collections::BTreeSet<SegmentId> =
            sealed.vanished.into_iter().collect();
        for (id, why) in sealed.unreadable {
            if log {
                tracing::error!(segment = id.0, error = %why, "local sealed segment cannot be read: whatever it holds for this key is missing from this lookup (run tierindex fsck)");
            }
            out.unreadable_segments.push(id.0);
            not_read.insert(id);
        }
        let open = self.open;
        out.truncated = open.truncated;
        out.entries.extend(open.entries);
        out.corrupt_items += open.corrupt_items;
        out.corrupt_segments.extend(open.corrupt_segments);
        let covered = Covered {
            open: self.open_ids,
            read: sealed.read.into_iter().map(|i| (i.id(), i)).collect(),
            unreadable: sealed
                .unreadable_info
                .into_iter()
                .map(|i| (i.id(), i))
                .collect(),
            not_read,
            sealed: self.sealed,
            removals: self.removals,
        };
        (out, covered, raced)
    }
}

/// What a local lookup covered, asked per committed remote segment by a
/// remote lookup (which reads the ones not covered from the store).
pub struct Covered {
    /// The open segments read, oldest first.
    open: Vec<SegmentId>,
    /// Sealed segments read, as they were when picked.
    read: BTreeMap<SegmentId, Arc<crate::segment::local::SealedInfo>>,
    /// Sealed segments that could not be read, as they were when picked.
    unreadable: BTreeMap<SegmentId, Arc<crate::segment::local::SealedInfo>>,
    /// Sealed segments picked but not read: unreadable, or gone (released
    /// or quarantined) while the lookup ran.
    not_read: std::collections::BTreeSet<SegmentId>,
    sealed: Arc<LocalSealed>,
    /// [`LocalSealed::removals`] when the open part was read.
    removals: u64,
}

impl Covered {
    /// Whether `meta` (a committed segment) is the committed copy of the
    /// local segment that could not be read (the same segment, not just
    /// its id: another data directory may have committed that id).
    pub fn is_copy_of_unreadable(&self, meta: &SealedMeta) -> bool {
        self.unreadable.get(&meta.id).is_some_and(|i| i.matches(meta))
    }

    /// Whether the local lookup covered the committed segment `meta`
    /// describes, which is then not read from the store. Always the same
    /// segment, not merely the same id (another data directory may have
    /// committed that id, see `pipeline::reseal`; its segment is read):
    /// - an open segment the lookup read (it may have sealed, been
    ///   committed and even released since: the set's log of removed
    ///   segments names it then, or, once the log no longer reaches back,
    ///   `ours(id)`, the journal's record of this data directory's segment
    ///   `id`);
    /// - a sealed segment it read;
    /// - not one it could not read, nor one that went while it ran;
    /// - a segment created after the lookup began (newer than every open
    ///   one it read) and this data directory's: its entries were appended
    ///   since, and are left out rather than read from the store (which
    ///   would leave a gap: the open segment's later entries are not read
    ///   either);
    /// - a sealed segment held now that the lookup ruled out by time range
    ///   or slot bits.
    pub fn covers(&self, meta: &SealedMeta, ours: impl Fn(SegmentId) -> Option<SealedMeta>) -> bool {
        let ours_now = || {
            self.sealed.same_segment(meta)
                || match self.sealed.removed_since(self.removals, meta) {
                    Some(removed) => removed,
                    None => ours(meta.id).is_some_and(|m| {
                        m.key_sum() == meta.key_sum()
                            && m.file_len == meta.file_len
                            && m.item_count == meta.item_count
                    }),
                }
        };
        if self.open.contains(&meta.id) {
            return ours_now();
        }
        if let Some(info) = self.read.get(&meta.id) {
            return info.matches(meta);
        }
        if self.not_read.contains(&meta.id) {
            return false;
        }
        if self.open.last().is_some_and(|last| meta.id > *last) {
            return ours_now();
        }
        self.sealed.same_segment(meta)
    }
}

/// The writer a broker appends to.
pub struct IndexWriter {
    // Held so the directory lock lives as long as the writer, and as long
    // as the sealer thread (which holds a clone) may still write files.
    dd: Arc<DataDir>,
    seg_dir: PathBuf,
    cfg: IndexConfig,
    active: Option<ActiveSegment>,
    next_id: u64,
    frozen: BTreeMap<SegmentId, Arc<ActiveSegment>>,
    /// Local sealed segments, a bounded number of them mapped; shared with
    /// lookups, which read them off this writer's lock.
    sealed: Arc<LocalSealed>,
    /// Sealed and not yet taken by `poll_sealed`.
    ready: Vec<SealedMeta>,
    /// The sealer thread's queue; `None` once closed.
    sealer_tx: Option<Arc<Jobs>>,
    done_rx: mpsc::Receiver<Done>,
    /// The next active segment, created ahead by the sealer thread (its id
    /// reserved: below `next_id`).
    spare: Option<ActiveSegment>,
    /// The id of a spare asked for and not arrived yet; one that arrives
    /// under another id (or none) is stale and removed.
    spare_asked: Option<SegmentId>,
    /// Preparing this roll's spare failed (a full disk): not asked again
    /// until the roll, which creates its segment itself and reports.
    spare_failed: bool,
    /// When the active segment became active (the age rule counts from
    /// here, not from when a spare's file was created).
    active_since_ms: u64,
    sealer: Option<JoinHandle<()>>,
    poison: Arc<Poison>,
    notify: Arc<Mutex<Option<SealNotify>>>,
    closed: bool,
}

impl IndexWriter {
    /// Recover the data directory's segments and open for appends.
    ///
    /// `min_next_id` lets the caller (who knows the journal's highest id)
    /// keep ids from ever being reused. Older active segments left by a crash
    /// are sealed here, synchronously; their metadata is returned by the
    /// first [`poll_sealed`](Self::poll_sealed).
    #[cfg(any(test, feature = "testing"))]
    pub fn open(
        dd: DataDir,
        cfg: IndexConfig,
        min_next_id: Option<SegmentId>,
        notify: Option<SealNotify>,
    ) -> Result<(IndexWriter, RecoveryReport)> {
        Self::open_checking(dd, cfg, min_next_id, notify, &|_| false)
    }

    /// [`open`](Self::open), giving the sealed files for which
    /// `full_check(id)` holds the full item check at start-up (the ones
    /// still to be uploaded: a damaged one is salvaged by item before its
    /// bytes are journaled or uploaded). The others get the structural
    /// check, so start-up cost grows with the work left, not the history.
    pub fn open_checking(
        dd: DataDir,
        cfg: IndexConfig,
        min_next_id: Option<SegmentId>,
        notify: Option<SealNotify>,
        full_check: &dyn Fn(SegmentId) -> bool,
    ) -> Result<(IndexWriter, RecoveryReport)> {
        if cfg.slot_count == 0 || cfg.segment_items == 0 || cfg.max_chain_steps == 0 {
            return Err(Error::InvalidInput(
                "slot count, segment items and chain steps must be > 0".into(),
            ));
        }
        let seg_dir = dd.segments_dir();
        let dd = Arc::new(dd);
        let geometry = crate::segment::salvage::Geometry {
            slot_count: cfg.slot_count,
            item_capacity: cfg.segment_items,
        };
        let mut rec = datadir::recover_checking(&dd, Mode::Repair, full_check, Some(geometry))?;
        let mut ready = Vec::new();
        // Which active segment takes appends: the newest one holding
        // entries, unless it is full or must be sealed; else an empty one
        // (a spare prepared ahead of a roll, or a fresh segment) above it,
        // only while its id is still the highest seen and not below
        // `min_next_id`. Every other empty one is removed (a spare above a
        // kept segment is just not needed), every other one sealed.
        let holding = rec
            .actives
            .iter()
            .rev()
            .find(|(_, s)| !s.is_empty())
            .map(|(id, s)| (*id, s.is_full()));
        let keep = match holding {
            Some((id, false)) if !rec.report.to_reseal.contains(&id.0) => Some(id),
            _ => rec
                .actives
                .iter()
                .next_back()
                .filter(|(id, s)| {
                    s.is_empty()
                        && holding.is_none_or(|(h, _)| **id > h)
                        && Some(**id) == rec.max_id_seen
                        && min_next_id.is_none_or(|m| **id >= m)
                        && !rec.report.to_reseal.contains(&id.0)
                })
                .map(|(id, _)| *id),
        };
        let mut active = None;
        for (id, seg) in std::mem::take(&mut rec.actives) {
            if Some(id) == keep {
                active = Some(seg);
                continue;
            }
            if seg.is_empty() {
                remove_empty(&seg_dir, seg)?;
                continue;
            }
            let meta = seal_segment(&seg_dir, &seg)?;
            let path = seg_dir.join(sealed_file_name(id));
            drop(seg);
            rec.sealed
                .insert(id, SealedInfo::of(&SealedSegment::open(&path)?));
            ready.push(meta);
        }
        let mut next_id = rec.max_id_seen.map_or(1, |m| m.0 + 1);
        if let Some(m) = min_next_id {
            next_id = next_id.max(m.0);
        }
        let sealer_tx = Arc::new(Jobs::default());
        let sealer_rx = sealer_tx.clone();
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let poison = Arc::new(Poison::default());
        let notify = Arc::new(Mutex::new(notify));
        let sealer = {
            let notify = notify.clone();
            let thread_dir = seg_dir.clone();
            let poison = poison.clone();
            let lock = dd.clone();
            let (slots, items) = (cfg.slot_count, cfg.segment_items);
            std::thread::Builder::new()
                .name("tierindex-sealer".into())
                .spawn(move || {
                    while let Some(job) = sealer_rx.pop() {
                        let seg = match job {
                            Job::Seal(seg) => seg,
                            Job::Retire(seg) => {
                                drop(seg);
                                continue;
                            }
                            Job::Prepare(id) => {
                                let r =
                                    ActiveSegment::create(&thread_dir, id, slots, items, now_ms());
                                if let Ok(seg) = &r {
                                    seg.prefault();
                                }
                                let _ = done_tx.send(Done::Prepared(id, r));
                                continue;
                            }
                        };
                        let span = tracing::info_span!("seal", segment = seg.id().0);
                        let _g = span.enter();
                        let started = Instant::now();
                        let result = seal_segment(&thread_dir, &seg)
                            .and_then(|meta| read_back(&thread_dir, seg.id(), meta));
                        match &result {
                            Ok((m, _)) => tracing::info!(
                                items = m.item_count,
                                bytes = m.file_len,
                                ms = started.elapsed().as_millis() as u64,
                                "sealed"
                            ),
                            Err(e) => {
                                tracing::error!(error = %e, "seal failed; writer poisoned");
                                poison.set(format!("sealing segment {} failed: {e}", seg.id()));
                            }
                        }
                        let _ = done_tx.send(Done::Sealed(SealDone {
                            id: seg.id(),
                            result,
                        }));
                        let n = notify.lock().ok().and_then(|n| n.clone());
                        if let Some(n) = n {
                            n();
                        }
                    }
                    drop(lock);
                })
                .map_err(|e| Error::io(&seg_dir, "spawn sealer thread", e))?
        };
        let sealed = Arc::new(LocalSealed::new(&seg_dir, cfg.sealed_mapped));
        for info in std::mem::take(&mut rec.sealed).into_values() {
            sealed.insert_info(info);
        }
        let mut w = IndexWriter {
            dd,
            seg_dir,
            cfg,
            active,
            next_id,
            frozen: BTreeMap::new(),
            sealed,
            ready,
            sealer_tx: Some(sealer_tx),
            done_rx,
            sealer: Some(sealer),
            poison,
            notify,
            closed: false,
            spare: None,
            spare_asked: None,
            spare_failed: false,
            active_since_ms: now_ms(),
        };
        match &w.active {
            Some(a) => w.active_since_ms = a.created_ms(),
            None => {
                let a = w.create_active()?;
                a.prefault();
                w.active = Some(a);
            }
        }
        Ok((w, rec.report))
    }

    /// Set (or replace) the callback run after each seal.
    pub fn set_seal_notify(&mut self, n: SealNotify) {
        if let Ok(mut g) = self.notify.lock() {
            *g = Some(n);
        }
    }

    fn create_active(&mut self) -> Result<ActiveSegment> {
        let id = SegmentId(self.next_id);
        let seg = ActiveSegment::create(
            &self.seg_dir,
            id,
            self.cfg.slot_count,
            self.cfg.segment_items,
            now_ms(),
        )
        .inspect_err(|e| {
            if matches!(e, Error::Poisoned(_)) {
                self.poison.set(e.to_string());
            }
        })?;
        self.next_id += 1;
        Ok(seg)
    }

    /// Ask the sealer thread for the next active segment, unless one is
    /// there or on its way. Its id is reserved now.
    fn ask_spare(&mut self) {
        if self.closed || self.spare.is_some() || self.spare_asked.is_some() || self.spare_failed {
            return;
        }
        let id = SegmentId(self.next_id);
        if let Some(tx) = &self.sealer_tx
            && self.sealer.as_ref().is_some_and(|h| !h.is_finished())
        {
            tx.push(Job::Prepare(id));
            self.next_id += 1;
            self.spare_asked = Some(id);
        }
    }

    /// Take what the sealer thread sent back.
    fn take_done(&mut self, done: Done) -> Result<()> {
        match done {
            Done::Sealed(d) => self.finish_seal(d),
            Done::Prepared(id, r) => {
                let wanted = self.spare_asked == Some(id) && !self.closed;
                if self.spare_asked == Some(id) {
                    self.spare_asked = None;
                }
                match r {
                    Ok(seg) if wanted => {
                        self.spare = Some(seg);
                        Ok(())
                    }
                    // Stale (a segment was created inline meanwhile, ids
                    // moved above it, or closing): remove the empty file.
                    Ok(seg) => {
                        remove_empty(&self.seg_dir, seg).inspect_err(|e| self.poison_on_sync(e))
                    }
                    Err(e) => {
                        // The roll creates its segment itself, and reports
                        // a failure there; a failed fsync poisons now.
                        self.poison_on_sync(&e);
                        if wanted {
                            self.spare_failed = true;
                        }
                        tracing::warn!(segment = id.0, error = %e, "preparing the next active segment failed; the roll will create it");
                        Ok(())
                    }
                }
            }
        }
    }

    /// The next active segment: the prepared spare. One still on its way
    /// is waited for (it is at the front of the sealer's queue: at most the
    /// seal in progress is ahead of it), so ids stay consecutive; created
    /// here only when none was asked for or its preparation failed.
    fn next_active(&mut self) -> Result<ActiveSegment> {
        while let Ok(done) = self.done_rx.try_recv() {
            self.take_done(done)?;
        }
        // Backpressure: appends that outrun the sealer wait here for its
        // seals rather than pile up frozen segments, each holding a file
        // descriptor, a map and a preallocated file (with small segments an
        // unbounded pile ran the process out of descriptors).
        while self.frozen.len() >= MAX_FROZEN {
            match self.done_rx.recv_timeout(SEALER_WAIT) {
                Ok(done) => self.take_done(done)?,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Not poisoned: nothing was lost. The active segment is
                    // frozen; the next append retries the roll.
                    return Err(Error::Deadline(format!(
                        "{} segments wait for the sealer, which finished none in {} s (a \
                         stalled disk?); this append was not made: retry it",
                        self.frozen.len(),
                        SEALER_WAIT.as_secs()
                    )));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let why = "sealer thread is gone".to_string();
                    self.poison.set(why.clone());
                    return Err(Error::Poisoned(why));
                }
            }
        }
        while self.spare.is_none() && self.spare_asked.is_some() {
            match self.done_rx.recv() {
                Ok(done) => self.take_done(done)?,
                Err(_) => {
                    // The sealer thread is gone.
                    self.spare_asked = None;
                }
            }
        }
        // The next roll may ask for a spare again, whatever happens here.
        self.spare_failed = false;
        let seg = match self.spare.take() {
            Some(s) => s,
            None => {
                self.spare_asked = None;
                self.create_active()?
            }
        };
        self.active_since_ms = now_ms();
        Ok(seg)
    }

    fn check_open(&self) -> Result<()> {
        if self.closed {
            return Err(Error::ShutDown);
        }
        self.poison.check()
    }

    /// Append an entry for `key`. Durable after the next [`flush`](Self::flush).
    pub fn append(&mut self, key: &[u8], offset: u64, size: u32, timestamp_ms: u64) -> Result<()> {
        self.append_entry(Entry {
            key_hash: crate::key_hash(key),
            offset,
            size,
            timestamp_ms,
        })
    }

    /// Append an already-hashed entry, rolling the segment first when full.
    pub fn append_entry(&mut self, entry: Entry) -> Result<()> {
        self.check_open()?;
        let needs_roll = match &self.active {
            Some(a) => a.is_full(),
            None => true,
        };
        if needs_roll {
            self.roll()?;
        }
        let half = match self.active.as_mut() {
            Some(a) => {
                a.append_entry(entry)?;
                a.len() >= a.capacity() / 2
            }
            None => return Err(Error::ShutDown),
        };
        // Half full: have the next segment prepared by the time this one
        // rolls (not earlier: an idle stream keeps one preallocated file).
        if half {
            self.ask_spare();
        }
        Ok(())
    }

    /// Make every appended entry durable. Frozen segments are flushed when
    /// they roll, so only the active one needs an msync here.
    pub fn flush(&mut self) -> Result<()> {
        self.check_open()?;
        match self.active.as_mut() {
            Some(a) => a.flush().inspect_err(|e| self.poison.set(e.to_string())),
            None => Ok(()),
        }
    }

    /// Freeze the active segment and hand it to the sealer; start a new one.
    /// Returns the id being sealed, or `None` when the active one was empty.
    pub fn roll(&mut self) -> Result<Option<SegmentId>> {
        self.check_open()?;
        if self.active.as_ref().is_some_and(|a| a.is_empty()) {
            return Ok(None);
        }
        let frozen = self.freeze_active()?;
        self.active = Some(self.next_active()?);
        Ok(frozen)
    }

    fn freeze_active(&mut self) -> Result<Option<SegmentId>> {
        let Some(mut old) = self.active.take() else {
            return Ok(None);
        };
        if old.is_empty() {
            remove_empty(&self.seg_dir, old).inspect_err(|e| self.poison_on_sync(e))?;
            return Ok(None);
        }
        if let Err(e) = old.flush() {
            self.poison.set(e.to_string());
            self.active = Some(old);
            return Err(e);
        }
        let id = old.id();
        let old = Arc::new(old);
        self.frozen.insert(id, old.clone());
        let alive = self.sealer.as_ref().is_some_and(|h| !h.is_finished());
        let sent = match &self.sealer_tx {
            Some(tx) if alive => {
                tx.push(Job::Seal(old));
                true
            }
            _ => false,
        };
        if !sent {
            let why = "sealer thread is gone".to_string();
            self.poison.set(why.clone());
            return Err(Error::Poisoned(why));
        }
        Ok(Some(id))
    }

    /// Roll when the active segment is older than the configured age, and
    /// collect finished seals. Call periodically (the pipeline does).
    pub fn tick(&mut self) -> Result<Vec<SealedMeta>> {
        if !self.closed
            && let (Some(a), Some(age)) = (&self.active, self.cfg.segment_max_age)
            && !a.is_empty()
            && now_ms().saturating_sub(self.active_since_ms) >= age.as_millis() as u64
        {
            self.roll()?;
        }
        self.poll_sealed()
    }

    /// Collect seals that finished since the last call.
    pub fn poll_sealed(&mut self) -> Result<Vec<SealedMeta>> {
        while let Ok(done) = self.done_rx.try_recv() {
            self.take_done(done)?;
        }
        Ok(std::mem::take(&mut self.ready))
    }

    /// Take a finished seal: the sealer thread already read the file back
    /// and checked it (a failure there poisoned the writer), so this only
    /// installs it.
    fn finish_seal(&mut self, done: SealDone) -> Result<()> {
        let (meta, sealed) = done
            .result
            .inspect_err(|e| self.poison.set(e.to_string()))?;
        debug_assert_eq!(sealed.id(), done.id);
        self.sealed.insert(sealed);
        if let Some(old) = self.frozen.remove(&done.id) {
            // Freed on the sealer thread (after a close, here: nothing
            // waits on this writer any more).
            match &self.sealer_tx {
                Some(tx) => tx.push(Job::Retire(old)),
                None => drop(old),
            }
        }
        self.ready.push(meta);
        Ok(())
    }

    /// Stop accepting appends, flush, seal the active segment even if it is
    /// not full, and wait for every seal up to `deadline`. Returns the
    /// metadata of segments sealed since the last poll.
    pub fn close(&mut self, deadline: Instant) -> Result<Vec<SealedMeta>> {
        if !self.closed {
            self.closed = true;
            let frozen = self.poison.check().and_then(|_| self.freeze_active());
            // Whatever happened, the sealer must see its queue end, or a
            // later close would wait on it forever.
            if let Some(tx) = self.sealer_tx.take() {
                tx.close();
            }
            frozen?;
        }
        while !self.frozen.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.done_rx.recv_timeout(left) {
                Ok(done) => self.take_done(done)?,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(Error::Deadline(format!(
                        "{} segment(s) still sealing; their active files stay on disk and are sealed at the next start",
                        self.frozen.len()
                    )));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let why = format!(
                        "sealer thread ended with {} segment(s) unsealed; they are sealed at the next start",
                        self.frozen.len()
                    );
                    self.poison.set(why.clone());
                    return Err(Error::Poisoned(why));
                }
            }
        }
        if let Some(h) = self.sealer.take()
            && h.join().is_err()
        {
            self.poison.set("sealer thread panicked".into());
        }
        // A spare prepared or on its way is not needed any more.
        while let Ok(done) = self.done_rx.try_recv() {
            self.take_done(done)?;
        }
        if let Some(s) = self.spare.take() {
            remove_empty(&self.seg_dir, s).inspect_err(|e| self.poison_on_sync(e))?;
        }
        self.poison.check()?;
        Ok(std::mem::take(&mut self.ready))
    }

    /// Entries for `key` within `range` across every local segment, oldest
    /// segment first, append order within a segment.
    #[cfg(any(test, feature = "testing"))]
    pub fn lookup(&self, key: &[u8], range: TimeRange) -> Lookup {
        self.lookup_hash(crate::key_hash(key), range)
    }

    /// As [`lookup`](Self::lookup). An item whose CRC fails on the way is
    /// not silently skipped: it is counted in [`Lookup::corrupt_items`]
    /// (with the segments in [`Lookup::corrupt_segments`]) and logged.
    #[cfg(any(test, feature = "testing"))]
    pub fn lookup_hash(&self, key_hash: u64, range: TimeRange) -> Lookup {
        // `&self` held throughout: no reseal can run between the parts.
        self.lookup_open(key_hash, range).finish(key_hash, range).0
    }

    /// The part of a lookup that needs this writer: the segments not yet
    /// sealed (frozen and active), read now. The sealed part is read by
    /// [`OpenLookup::finish`], which needs no lock on the writer: a lookup
    /// over many local segments no longer holds the writer while it maps
    /// and reads them (a seal's insert into the shared set can still wait
    /// for a lookup's walk of the footers in memory).
    pub fn lookup_open(&self, key_hash: u64, range: TimeRange) -> OpenLookup {
        let mut out = Lookup::default();
        let open: Vec<&ActiveSegment> = self
            .frozen
            .values()
            .map(|f| f.as_ref())
            .chain(self.active.as_ref())
            .collect();
        for a in &open {
            let l = a.lookup(key_hash, range, self.cfg.max_chain_steps);
            out.truncated |= l.truncated;
            out.entries.extend(l.entries);
            if l.corrupt_items > 0 {
                tracing::error!(
                    segment = a.id().0,
                    "active segment item fails its CRC in the mapping: the chain walk stopped there"
                );
                out.corrupt_items += l.corrupt_items;
                out.corrupt_segments.extend(l.corrupt_segments);
            }
        }
        OpenLookup {
            open: out,
            open_ids: open.iter().map(|a| a.id()).collect(),
            sealed: self.sealed.clone(),
            reseals: self.sealed.reseals(),
            removals: self.sealed.removals(),
        }
    }
    /// A sealed segment held locally, mapped (on demand: see
    /// [`crate::segment::local`]). `Ok(None)`: not held locally; an error:
    /// held, but its file is gone, unreadable or not the one checked.
    pub fn sealed(&self, id: SegmentId) -> Result<Option<Arc<SealedSegment>>> {
        self.sealed.get(id)
    }

    /// Whether a sealed segment is held locally (without mapping it).
    pub fn holds_sealed(&self, id: SegmentId) -> bool {
        self.sealed.contains(id)
    }

    /// A local sealed segment's metadata (from its recorded footer and
    /// sums; the file is read only if its sums were never computed).
    pub fn sealed_meta(&self, id: SegmentId) -> Result<Option<SealedMeta>> {
        self.sealed.meta(id)
    }

    /// Ids of every sealed segment held locally.
    pub fn sealed_ids(&self) -> Vec<SegmentId> {
        self.sealed.ids()
    }

    /// The local sealed segments, shared (lookups read them off this
    /// writer's lock).
    pub fn sealed_set(&self) -> Arc<LocalSealed> {
        self.sealed.clone()
    }

    /// Local sealed segments mapped now, and mapped on demand so far.
    #[cfg(any(test, feature = "testing"))]
    pub fn sealed_maps(&self) -> (usize, u64) {
        (self.sealed.mapped(), self.sealed.opened())
    }

    /// Delete the local copy of a sealed segment (after it is verified
    /// remotely: the caller's responsibility, checked by the pipeline).
    ///
    /// A failed unlink or directory fsync poisons the writer like every
    /// other failed persist step: a retry would find the file gone and
    /// succeed without ever making the unlink durable, and the writer no
    /// longer knows what the directory holds. An already missing file still
    /// gets the directory fsync (an earlier unlink may not be durable yet).
    pub fn release(&mut self, id: SegmentId) -> Result<()> {
        self.poison.check()?;
        self.sealed.remove(id);
        let path = self.seg_dir.join(sealed_file_name(id));
        match crate::durable::at("release.unlink").unlink(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                let why = format!("release of local segment {} failed: {e}", path.display());
                self.poison.set(why.clone());
                return Err(Error::Poisoned(why));
            }
        }
        fsync_dir_at("release.dirsync", &self.seg_dir).inspect_err(|e| self.poison_on_sync(e))
    }

    /// Move a local sealed file that must not be uploaded (it does not
    /// match its journal record) to quarantine, with a record saying why,
    /// and stop serving lookups from it. Returns where it went; `None`
    /// when there was no file.
    pub fn quarantine_sealed(&mut self, id: SegmentId, reason: &str) -> Result<Option<PathBuf>> {
        self.sealed.remove(id);
        let path = self.seg_dir.join(sealed_file_name(id));
        if !path.exists() {
            return Ok(None);
        }
        self.dd
            .quarantine_because(&path, reason, None)
            .map(Some)
            .inspect_err(|e| self.poison_on_sync(e))
    }

    /// A failed sync anywhere poisons the writer.
    fn poison_on_sync(&self, e: &Error) {
        if matches!(e, Error::Poisoned(_)) {
            self.poison.set(e.to_string());
        }
    }

    /// Highest offset held in any local segment (scans the active ones).
    pub fn max_offset(&self) -> Option<u64> {
        let sealed = self.sealed.max_offset();
        let open = self
            .frozen
            .values()
            .map(|f| f.as_ref())
            .chain(self.active.as_ref())
            .flat_map(|a| a.entries().into_iter().map(|e| e.offset));
        sealed.into_iter().chain(open).max()
    }

    /// Segments created from now on get ids of at least `min` (ids taken
    /// by another owner, learnt after open). An empty active segment below
    /// `min` is replaced by one at `min`; one holding entries keeps its id
    /// (its entries are durable; renaming a flushed file is not worth it).
    /// A closed writer takes it too: a shutdown drain that takes ownership
    /// may still reseal, into segments created from then on.
    pub fn raise_next_id(&mut self, min: SegmentId) -> Result<()> {
        self.poison.check()?;
        self.next_id = self.next_id.max(min.0);
        // A spare below `min` (ready or on its way) is stale.
        if self.spare.as_ref().is_some_and(|s| s.id() < min)
            && let Some(s) = self.spare.take()
        {
            remove_empty(&self.seg_dir, s).inspect_err(|e| self.poison_on_sync(e))?;
        }
        if self.spare_asked.is_some_and(|id| id < min) {
            self.spare_asked = None;
        }
        if self
            .active
            .as_ref()
            .is_some_and(|a| a.is_empty() && a.id() < min)
            && let Some(old) = self.active.take()
        {
            remove_empty(&self.seg_dir, old).inspect_err(|e| self.poison_on_sync(e))?;
            self.active = Some(self.next_active()?);
        }
        Ok(())
    }

    /// Copy `entries` (those of a segment being resealed, see
    /// `pipeline::reseal`) into the active segment and, when it fills, the
    /// ones after it; then flush. Entries already held by a local segment
    /// at or above `since` are skipped: the copy a crash cut short is
    /// finished, never doubled. `before_copy(into)` runs first, with the id
    /// of the segment the copy starts in (the caller journals it, so that
    /// it is durable before any copied entry is). The active segment is
    /// rolled first when it is below `min_id` (the current epoch's id
    /// floor), and new ids continue at `min_id` or above.
    ///
    /// A closed writer (a shutdown drain, `tierindex drain`) accepts no
    /// appends, but its drain must still be able to reseal: the copies go
    /// into fresh segments (from `min_id` or the next id on), each sealed
    /// here, on the caller's thread, when it fills and at the end. Their
    /// metadata waits in [`poll_sealed`](Self::poll_sealed) for the caller
    /// to journal, so the same drain uploads them.
    ///
    /// The caller holds the writer for the whole call, so no segment the
    /// copy goes into can roll, seal or be journaled before it returns.
    /// Returns `(into, copied)`.
    pub fn copy_in(
        &mut self,
        entries: &[Entry],
        since: Option<SegmentId>,
        min_id: SegmentId,
        before_copy: impl FnOnce(SegmentId) -> Result<()>,
    ) -> Result<(SegmentId, u64)> {
        // Lookups reading the sealed segments off this writer's lock learn
        // that entries moved, and redo their lookup under the lock.
        self.sealed.note_reseal();
        if self.closed {
            return self.copy_in_closed(entries, since, min_id, before_copy);
        }
        self.raise_next_id(min_id)?;
        let below = self.active.as_ref().is_none_or(|a| a.id() < min_id);
        if below {
            self.roll()?;
            if self.active.as_ref().is_some_and(|a| a.id() < min_id) {
                // It was empty (roll kept it): replace it.
                self.raise_next_id(min_id)?;
            }
        }
        let into = self.active_id().ok_or(Error::ShutDown)?;
        let mut held = self.held_from(since)?;
        before_copy(into)?;
        let mut copied = 0u64;
        let mut copy = || -> Result<()> {
            for e in entries {
                if take_held(&mut held, e) {
                    continue;
                }
                self.append_entry(*e)?;
                copied += 1;
            }
            // Rolled-over segments were flushed when they froze.
            self.flush()
        };
        // Cut short after the caller journaled the start: the rest is
        // finished at the next open, which must find every segment from
        // `into` on as this process leaves it. So nothing more is appended
        // here (the pipeline also keeps those segments' local copies, see
        // `pipeline::reseal::blocks_release`).
        if let Err(e) = copy() {
            self.poison
                .set(format!("copying a resealed segment's entries failed: {e}"));
            return Err(e);
        }
        Ok((into, copied))
    }

    /// How many copies of each entry the local segments from `since` on
    /// hold (a count, not a set: a segment may hold one entry twice).
    fn held_from(&self, since: Option<SegmentId>) -> Result<HashMap<EntryKey, u32>> {
        let Some(since) = since else {
            return Ok(HashMap::new());
        };
        let mut sealed = Vec::new();
        for id in self.sealed.ids_from(since) {
            let seg = self
                .sealed
                .get(id)?
                .ok_or_else(|| Error::Internal(format!("local sealed segment {id} vanished")))?;
            sealed.extend(seg.entries());
        }
        let open = self
            .frozen
            .range(since..)
            .map(|(_, f)| f.as_ref())
            .chain(self.active.as_ref())
            .filter(|a| a.id() >= since)
            .flat_map(|a| a.entries().into_iter());
        let mut m = HashMap::new();
        for e in sealed.into_iter().chain(open) {
            *m.entry(entry_key(&e)).or_insert(0u32) += 1;
        }
        Ok(m)
    }

    /// [`copy_in`](Self::copy_in) on a closed writer: into fresh segments,
    /// sealed here (the sealer thread has ended).
    fn copy_in_closed(
        &mut self,
        entries: &[Entry],
        since: Option<SegmentId>,
        min_id: SegmentId,
        before_copy: impl FnOnce(SegmentId) -> Result<()>,
    ) -> Result<(SegmentId, u64)> {
        self.poison.check()?;
        // Every seal of the close must be in `poll_sealed` first: one that
        // landed after this copy's fresh (higher) ids were journaled could
        // never be journaled (ids are journaled in increasing order). Not
        // an error that loses anything: the reseal is retried, or left for
        // the next start.
        while let Ok(done) = self.done_rx.try_recv() {
            self.take_done(done)?;
        }
        if !self.frozen.is_empty() {
            return Err(Error::Deadline(format!(
                "{} segment(s) of the close are still sealing; the reseal waits for them",
                self.frozen.len()
            )));
        }
        self.raise_next_id(min_id)?;
        let mut held = self.held_from(since)?;
        let first = self.create_active()?;
        let into = first.id();
        if let Err(e) = before_copy(into) {
            // Nothing journaled, nothing copied: the empty file goes.
            remove_empty(&self.seg_dir, first).inspect_err(|e| self.poison_on_sync(e))?;
            return Err(e);
        }
        let mut copied = 0u64;
        let mut seg = Some(first);
        let mut copy = || -> Result<()> {
            for e in entries {
                if take_held(&mut held, e) {
                    continue;
                }
                let full = seg.as_ref().is_none_or(|s| s.is_full());
                if full {
                    if let Some(s) = seg.take() {
                        self.seal_here(s)?;
                    }
                    seg = Some(self.create_active()?);
                }
                if let Some(s) = seg.as_mut() {
                    s.append_entry(*e)?;
                    copied += 1;
                }
            }
            match seg.take() {
                Some(s) if s.is_empty() => remove_empty(&self.seg_dir, s),
                Some(s) => self.seal_here(s),
                None => Ok(()),
            }
        };
        // As in `copy_in`: cut short after the start was journaled, the
        // rest is finished at the next open (an active file left here is
        // sealed then, and counted as holding what it holds).
        if let Err(e) = copy() {
            self.poison
                .set(format!("copying a resealed segment's entries failed: {e}"));
            return Err(e);
        }
        Ok((into, copied))
    }

    /// Flush and seal `seg` on this thread, as the sealer thread would
    /// (durable write, removal of the source, read-back check), and make
    /// it a local sealed segment whose metadata waits in `poll_sealed`.
    /// Any failure poisons the writer.
    fn seal_here(&mut self, mut seg: ActiveSegment) -> Result<()> {
        let r = seg.flush().and_then(|_| {
            seal_segment(&self.seg_dir, &seg).and_then(|meta| read_back(&self.seg_dir, seg.id(), meta))
        });
        let id = seg.id();
        drop(seg);
        let (meta, sealed) = r.inspect_err(|e| {
            self.poison
                .set(format!("sealing segment {id} failed: {e}"))
        })?;
        tracing::info!(
            segment = id.0,
            items = meta.item_count,
            bytes = meta.file_len,
            "sealed (resealed entries, after close)"
        );
        self.sealed.insert(sealed);
        self.ready.push(meta);
        Ok(())
    }

    pub fn active_id(&self) -> Option<SegmentId> {
        self.active.as_ref().map(|a| a.id())
    }
    /// Entries in active and frozen (sealing) segments: not in any sealed
    /// file yet.
    pub fn unsealed_items(&self) -> u64 {
        self.frozen
            .values()
            .map(|f| f.as_ref())
            .chain(self.active.as_ref())
            .map(|a| u64::from(a.len()))
            .sum()
    }
    pub fn active_len(&self) -> u32 {
        self.active.as_ref().map_or(0, |a| a.len())
    }
    pub fn segments_dir(&self) -> &Path {
        &self.seg_dir
    }
    #[cfg(any(test, feature = "testing"))]
    pub fn data_dir(&self) -> &DataDir {
        &self.dd
    }
    /// Closed: no appends (a shutdown began); a reseal still copies.
    pub fn is_closed(&self) -> bool {
        self.closed
    }
    pub fn poisoned(&self) -> Option<String> {
        self.poison.check().err().map(|e| e.to_string())
    }

    /// Poison this writer: a step its caller owns (journaling what it
    /// sealed) failed, and nothing more may be built on it.
    pub fn poison_with(&self, why: String) {
        self.poison.set(why);
    }
}

impl Drop for IndexWriter {
    fn drop(&mut self) {
        // Close the sealer's queue but do not wait for it: a hung disk must
        // not hang the drop. A seal cut short is redone at the next start;
        // a spare left on disk is an empty active file, taken up (or
        // removed) by the next start.
        if let Some(tx) = self.sealer_tx.take() {
            tx.close();
        }
    }
}

/// Remove an empty active segment durably. Any failure is
/// [`Error::Poisoned`] (the callers poison the writer): after a failed
/// unlink the writer no longer knows what the directory holds, and a failed
/// directory fsync is never retried.
/// An entry's identity for counting copies in a reseal.
type EntryKey = (u64, u64, u32, u64);

fn entry_key(e: &Entry) -> EntryKey {
    (e.key_hash, e.offset, e.size, e.timestamp_ms)
}

/// Whether `e` is one of the copies `held` still counts (and count it off).
fn take_held(held: &mut HashMap<EntryKey, u32>, e: &Entry) -> bool {
    match held.get_mut(&entry_key(e)).filter(|n| **n > 0) {
        Some(n) => {
            *n -= 1;
            true
        }
        None => false,
    }
}

fn remove_empty(seg_dir: &Path, seg: ActiveSegment) -> Result<()> {
    debug_assert!(seg.is_empty());
    let path = seg.path().to_path_buf();
    drop(seg);
    crate::durable::at("active.remove_empty")
        .unlink(&path)
        .map_err(|e| {
            Error::Poisoned(format!(
                "removing empty active segment {} failed: {e}",
                path.display()
            ))
        })?;
    fsync_dir_at("active.remove_empty.dirsync", seg_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(items: u32) -> IndexConfig {
        IndexConfig {
            slot_count: 64,
            segment_items: items,
            segment_max_age: None,
            max_chain_steps: 1 << 20,
            ..IndexConfig::default()
        }
    }

    /// A remote lookup reads every committed segment the local part did
    /// not cover, telling this data directory's segments from another's
    /// under the same id (issue 16 review: skipping by id alone hid another
    /// owner's segments).
    #[test]
    fn covered_is_the_same_segment_not_the_same_id() {
        use crate::segment::sealed::{build_sealed, write_sealed_file};
        let tmp = tempfile::tempdir().unwrap();
        let seg = |id: u64, base: u64| -> (SealedMeta, SealedInfo) {
            let es: Vec<Entry> = (0..4)
                .map(|i| Entry {
                    key_hash: i,
                    offset: base + i,
                    size: 1,
                    timestamp_ms: 10,
                })
                .collect();
            let (bytes, meta) = build_sealed(SegmentId(id), 1, 2, 8, &es).unwrap();
            let path = write_sealed_file(tmp.path(), SegmentId(id), &bytes).unwrap();
            (meta, SealedInfo::of(&SealedSegment::open(&path).unwrap()))
        };
        let set = Arc::new(LocalSealed::new(tmp.path(), 4));
        let (m1, i1) = seg(1, 0);
        let (m2, i2) = seg(2, 100);
        let i1 = Arc::new(i1);
        set.insert_info(SealedInfo::of(
            &SealedSegment::open(&tmp.path().join(sealed_file_name(SegmentId(1)))).unwrap(),
        ));
        set.insert_info(i2);
        // Another data directory's segments: 1 and 7 (same ids as ours,
        // other entries), and 9 (above every open segment).
        let other = tempfile::tempdir().unwrap();
        let foreign = |id: u64| {
            let es = [Entry {
                key_hash: 5,
                offset: 5000 + id,
                size: 1,
                timestamp_ms: 10,
            }];
            let (bytes, meta) = build_sealed(SegmentId(id), 3, 4, 8, &es).unwrap();
            write_sealed_file(other.path(), SegmentId(id), &bytes).unwrap();
            meta
        };
        let mut m7 = foreign(7);
        let c = Covered {
            open: vec![SegmentId(7), SegmentId(8)],
            read: [(SegmentId(1), i1)].into_iter().collect(),
            unreadable: Default::default(),
            not_read: Default::default(),
            sealed: set.clone(),
            removals: set.removals(),
        };
        let none = |_| None;
        assert!(c.covers(&m1, none), "ours, read");
        assert!(c.covers(&m2, none), "ours, held (pruned)");
        assert!(!c.covers(&foreign(1), none), "another's, same id as one read");
        assert!(!c.covers(&foreign(2), none), "another's, same id as one held");
        assert!(!c.covers(&m7, none), "another's, same id as an open one");
        assert!(!c.covers(&foreign(9), none), "another's, newer than every open one");
        // Ours: open 7 since sealed, committed and released (the set's log
        // of removed segments knows it), and 9 created after the lookup
        // began and still held.
        let (o7, i7) = seg(7, 700);
        set.insert_info(i7);
        assert!(c.covers(&o7, none));
        assert!(set.remove(SegmentId(7)));
        assert!(c.covers(&o7, none), "read as open, released since");
        let (o9, i9) = seg(9, 900);
        set.insert_info(i9);
        assert!(c.covers(&o9, none));
        // Once the log no longer reaches back, the journal's record decides.
        for _ in 0..5000 {
            set.insert_info(SealedInfo::of(
                &SealedSegment::open(&tmp.path().join(sealed_file_name(SegmentId(9)))).unwrap(),
            ));
            set.remove(SegmentId(9));
        }
        assert!(!c.covers(&o7, none));
        let ours7 = o7.clone();
        assert!(c.covers(&o7, |id| (id == SegmentId(7)).then(|| ours7.clone())));
        m7.id = SegmentId(7);
        assert!(!c.covers(&m7, |id| (id == SegmentId(7)).then(|| ours7.clone())));
        // A segment read that went since is still covered; one the lookup
        // could not read is not.
        assert!(set.remove(SegmentId(1)));
        assert!(c.covers(&m1, none));
        let c = Covered {
            not_read: [SegmentId(2)].into_iter().collect(),
            ..c
        };
        assert!(!c.covers(&m2, none));
    }

    /// A reseal (`copy_in`, then the source's release) between a lookup's
    /// two parts is seen (`raced`), and the lookup done again under the
    /// writer finds every entry once.
    #[test]
    fn a_reseal_between_the_lookup_parts_is_seen() {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::open(d.path()).unwrap();
        let (mut w, _) = IndexWriter::open(dd, cfg(10), None, None).unwrap();
        for i in 0..10u64 {
            w.append_entry(Entry {
                key_hash: 7,
                offset: i,
                size: 1,
                timestamp_ms: 1,
            })
            .unwrap();
        }
        w.roll().unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        while w.sealed_ids().is_empty() && Instant::now() < until {
            w.tick().unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!w.sealed_ids().is_empty(), "the segment did not seal in 30 s");
        let src = w.sealed_ids()[0];
        let entries = w.sealed(src).unwrap().unwrap().entries();
        let open = w.lookup_open(7, TimeRange::ALL);
        let floor = SegmentId(100);
        w.copy_in(&entries, None, floor, |_| Ok(())).unwrap();
        w.release(src).unwrap();
        let (l, _, raced) = open.finish(7, TimeRange::ALL);
        assert!(raced);
        assert!(l.entries.len() < 10, "the stale lookup lost the moved entries: {l:?}");
        let again = w.lookup_hash(7, TimeRange::ALL);
        let offsets: Vec<u64> = again.entries.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, (0..10).collect::<Vec<_>>());
        // Without a reseal, nothing is raced.
        let (_, _, raced) = w.lookup_open(7, TimeRange::ALL).finish(7, TimeRange::ALL);
        assert!(!raced);
    }

    /// `copy_in` skips what the segments from `since` on already hold by
    /// count: an entry held once and given twice is copied once more.
    #[test]
    fn copy_in_counts_entries_already_held() {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::open(d.path()).unwrap();
        let (mut w, _) = IndexWriter::open(dd, cfg(100), None, None).unwrap();
        let e = Entry {
            key_hash: 7,
            offset: 42,
            size: 1,
            timestamp_ms: 1,
        };
        w.append_entry(e).unwrap();
        let since = w.active_id();
        let (_, copied) = w.copy_in(&[e, e], since, SegmentId(0), |_| Ok(())).unwrap();
        assert_eq!(copied, 1);
        assert_eq!(w.lookup_hash(7, TimeRange::ALL).entries.len(), 2);
        let (_, copied) = w.copy_in(&[e, e], since, SegmentId(0), |_| Ok(())).unwrap();
        assert_eq!(copied, 0);
    }

    #[test]
    fn rolls_seals_and_finds_across_segments() {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::open(d.path()).unwrap();
        let (mut w, _) = IndexWriter::open(dd, cfg(100), None, None).unwrap();
        for i in 0..1050u64 {
            w.append(&(i % 10).to_le_bytes(), i, 1, i).unwrap();
        }
        w.flush().unwrap();
        let l = w.lookup(&3u64.to_le_bytes(), TimeRange::ALL);
        assert_eq!(l.entries.len(), 105);
        assert!(l.entries.windows(2).all(|p| p[0].offset < p[1].offset));
        let metas = w.close(Instant::now() + Duration::from_secs(30)).unwrap();
        assert_eq!(metas.len(), 11);
        assert_eq!(metas.iter().map(|m| m.item_count).sum::<u64>(), 1050);
        assert_eq!(
            w.lookup(&3u64.to_le_bytes(), TimeRange::ALL).entries.len(),
            105
        );
        assert!(matches!(w.append(b"k", 1, 1, 1), Err(Error::ShutDown)));
        drop(w);
        // Reopen: everything sealed, nothing active left behind, ids continue.
        let dd = DataDir::open(d.path()).unwrap();
        let (w, rep) = IndexWriter::open(dd, cfg(100), None, None).unwrap();
        assert_eq!(rep.sealed_ok.len(), 11);
        assert!(rep.is_clean());
        assert_eq!(w.active_id(), Some(SegmentId(12)));
        assert_eq!(
            w.lookup(&3u64.to_le_bytes(), TimeRange::ALL).entries.len(),
            105
        );
    }

    #[test]
    fn leftover_actives_are_sealed_at_open() {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::open(d.path()).unwrap();
        // Simulate a crash after a roll, before the seal: two actives.
        let mut a = ActiveSegment::create(&dd.segments_dir(), SegmentId(1), 8, 10, 0).unwrap();
        let mut b = ActiveSegment::create(&dd.segments_dir(), SegmentId(2), 8, 10, 0).unwrap();
        for i in 0..10 {
            a.append(b"x", i, 1, i).unwrap();
        }
        b.append(b"x", 10, 1, 10).unwrap();
        a.flush().unwrap();
        b.flush().unwrap();
        drop((a, b));
        let (mut w, rep) = IndexWriter::open(dd, cfg(10), None, None).unwrap();
        assert_eq!(rep.to_reseal, vec![1]);
        let sealed = w.poll_sealed().unwrap();
        assert_eq!(sealed.len(), 1);
        assert_eq!(sealed[0].id, SegmentId(1));
        assert_eq!(w.active_id(), Some(SegmentId(2)));
        assert_eq!(w.lookup(b"x", TimeRange::ALL).entries.len(), 11);
    }
}
