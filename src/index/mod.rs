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
use std::time::{Duration, Instant};

use crate::datadir::{self, DataDir, Mode, RecoveryReport};
use crate::durable::fsync_dir_at;
use crate::error::{Error, Result};
use crate::segment::active::{ActiveSegment, Lookup};
use crate::segment::format::ACTIVE_ITEM_LEN;
use crate::segment::local::{LocalSealed, SealedInfo};
use crate::segment::sealed::{SealedSegment, sealed_file_name, write_sealed_streaming};
use crate::segment::{Entry, SealedMeta, SegmentId, TimeRange, now_ms};

mod copy;
mod lookup;
mod sealer;

pub use lookup::Covered;
#[cfg(feature = "testing")]
pub use lookup::OpenLookup;
pub use sealer::seal_segment;
#[cfg(feature = "testing")]
pub use sealer::seal_to_file;
use sealer::{Done, Job, Jobs, SealDone, read_back};

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
    /// Create an active segment at open when none is kept (else the first
    /// append does): [`crate::Config::active_at_open`].
    pub active_at_open: bool,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            slot_count: 1 << 16,
            segment_items: 1 << 20,
            segment_max_age: Some(Duration::from_secs(600)),
            max_chain_steps: 1 << 16,
            sealed_mapped: crate::segment::local::DEFAULT_MAPPED,
            active_at_open: true,
        }
    }
}

/// Frozen segments waiting for the sealer beyond which a roll waits for
/// its seals (see `next_active`).
const MAX_FROZEN: usize = 16;
/// How long a roll waits for the sealer at [`MAX_FROZEN`] before the
/// append returns [`Error::Deadline`].
const SEALER_WAIT: Duration = Duration::from_secs(30);

/// How long a roll waits for its prepared next segment before creating
/// it itself.
const SPARE_WAIT: Duration = Duration::from_secs(2);

/// Called from the sealer after each seal finished (or failed), and from
/// `append_entry` (under the writer's lock: it must not take that lock)
/// when the first entry goes into an empty segment with an age set; the
/// pipeline uses it to wake its worker, which calls `tick`.
pub type SealNotify = Arc<dyn Fn() + Send + Sync>;

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
    /// Poison with the error that failed: a `Poisoned` one gives its
    /// reason, not its text, which [`check`](Self::check) wraps again
    /// (helper-81 F5: "writer poisoned: writer poisoned: ...; restart to
    /// recover what was durable; restart to recover what was durable").
    fn set_err(&self, e: &Error) {
        self.set(e.reason());
    }
    /// A failed sync (`Poisoned`) poisons; other errors do not.
    fn on_sync(&self, e: &Error) {
        if matches!(e, Error::Poisoned(_)) {
            self.set_err(e);
        }
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
    /// Sealed metadata and retired frozen segments, for whoever collects
    /// them, with or without this writer's lock (see [`Handoff`]).
    handoff: Arc<Handoff>,
    /// The sealer thread's queue; `None` once closed.
    sealer_tx: Option<Jobs>,
    done_rx: mpsc::Receiver<Done>,
    /// The next active segment, created ahead by the sealer thread (its id
    /// reserved: below `next_id`).
    spare: Option<ActiveSegment>,
    /// The id of a spare asked for and not arrived yet; one that arrives
    /// under another id (or none) is stale and removed.
    spare_asked: Option<SegmentId>,
    /// The id the sealer may create a spare under, held by the sealer
    /// while it creates one: the writer clears it (taking the lock, so
    /// after a creation in progress has finished) before it gives up on a
    /// spare and creates a later segment itself, and the sealer creates
    /// nothing under an id no longer claimed. So a file is never created
    /// below one that exists: an all-zero active file below a later one is
    /// damage, not an interrupted creation (start-up relies on it,
    /// `datadir::recover`).
    spare_claim: Arc<std::sync::Mutex<Option<SegmentId>>>,
    /// Preparing this roll's spare failed (a full disk): not asked again
    /// until the roll, which creates its segment itself and reports.
    spare_failed: bool,
    /// When the active segment became active (the age rule counts from
    /// here, not from when a spare's file was created).
    active_since_ms: u64,
    /// The acknowledged-segment mark (`datadir::acked`): written by the
    /// first flush that acknowledges entries of a newer segment.
    acked: crate::datadir::acked::MarkWriter,
    sealer: Option<Jobs>,
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
        // Ids below `min_next_id` are the caller's to know (a journal's).
        Self::open_checking(dd, cfg, min_next_id, notify, &|_| false, &|_| false, &|id| {
            min_next_id.is_some_and(|m| id < m)
        })
    }

    /// [`open`](Self::open), giving the sealed files for which
    /// `full_check(id)` holds the full item check at start-up (the ones
    /// still to be uploaded: a damaged one is salvaged by item before its
    /// bytes are journaled or uploaded). The others get the structural
    /// check, so start-up cost grows with the work left, not the history.
    /// `store_holds(id)`: segment `id` is committed (see
    /// [`datadir::recover_checking`]).
    pub fn open_checking(
        dd: DataDir,
        cfg: IndexConfig,
        min_next_id: Option<SegmentId>,
        notify: Option<SealNotify>,
        full_check: &dyn Fn(SegmentId) -> bool,
        store_holds: &dyn Fn(SegmentId) -> bool,
        journal_knows: &dyn Fn(SegmentId) -> bool,
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
        let mut rec = datadir::recover_checking(
            &dd,
            Mode::Repair,
            full_check,
            store_holds,
            &|_| false,
            journal_knows,
            Some(geometry),
        )?;
        // Read after the check, which may have flagged a recorded loss.
        let acked = match crate::datadir::acked::read(dd.root())? {
            crate::datadir::acked::Read::Mark(m) => Some(m),
            _ => None,
        };
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
        let mut next_id = match rec.max_id_seen {
            None => 1,
            Some(m) => m.0.checked_add(1).ok_or_else(|| ids_exhausted(m.0))?,
        };
        if let Some(m) = min_next_id {
            next_id = next_id.max(m.0);
        }
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let handoff = Arc::new(Handoff::default());
        handoff.lock().metas = ready;
        handoff
            .age_rule
            .store(cfg.segment_max_age.is_some(), Ordering::Relaxed);
        let poison = Arc::new(Poison::default());
        let notify = Arc::new(Mutex::new(notify));
        let sealed = Arc::new(LocalSealed::new(&seg_dir, cfg.sealed_mapped));
        sealed.insert_infos(std::mem::take(&mut rec.sealed).into_values().collect());
        let sealer = sealer::spawn(
            done_tx,
            handoff.clone(),
            seg_dir.clone(),
            (cfg.slot_count, cfg.segment_items),
            poison.clone(),
            notify.clone(),
            dd.clone(),
            sealed.clone(),
        )?;
        handoff.set_lane(Some(sealer.clone()));
        let mut w = IndexWriter {
            dd,
            seg_dir,
            cfg,
            active,
            next_id,
            frozen: BTreeMap::new(),
            sealed,
            handoff,
            sealer_tx: Some(sealer.clone()),
            done_rx,
            sealer: Some(sealer),
            poison,
            notify,
            closed: false,
            spare: None,
            spare_asked: None,
            spare_claim: Arc::new(std::sync::Mutex::new(None)),
            spare_failed: false,
            active_since_ms: now_ms(),
            acked: crate::datadir::acked::MarkWriter::new(acked),
        };
        match &w.active {
            // A segment created under a clock that was ahead (or stepped
            // back since) would not roll by age for as long as the skew,
            // its entries kept local (helper-61): its age counts from now.
            Some(a) => w.active_since_ms = a.created_ms().min(now_ms()),
            None if w.cfg.active_at_open => {
                let mut a = w.create_active()?;
                a.prefault(0);
                w.active = Some(a);
            }
            // The first append creates it (`append_entry` rolls into a
            // new segment when there is none).
            None => {}
        }
        Ok((w, rec.report))
    }

    /// Set (or replace) the callback run after each seal.
    pub fn set_seal_notify(&mut self, n: SealNotify) {
        if let Ok(mut g) = self.notify.lock() {
            *g = Some(n);
        }
    }

    /// Run the seal callback (the pipeline's worker wakes on it).
    fn wake_worker(&self) {
        let n = self.notify.lock().ok().and_then(|n| n.clone());
        if let Some(n) = n {
            n();
        }
    }

    /// When the age rule next rolls the active segment (ms since the
    /// epoch): `None` while it is empty, when no age is set, or once
    /// closed. A background ticker sleeps until then (or until woken: the
    /// first append into an empty segment runs the seal callback).
    pub fn age_deadline_ms(&self) -> Option<u64> {
        let age = self.cfg.segment_max_age?;
        let a = self.active.as_ref()?;
        if self.closed || a.is_empty() {
            return None;
        }
        Some(
            self.active_since_ms
                .saturating_add(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    fn create_active(&mut self) -> Result<ActiveSegment> {
        let id = SegmentId(self.next_id);
        let after = self.next_id.checked_add(1).ok_or_else(|| ids_exhausted(id.0))?;
        let seg = ActiveSegment::create(
            &self.seg_dir,
            id,
            self.cfg.slot_count,
            self.cfg.segment_items,
            now_ms(),
        )
        .inspect_err(|e| self.poison.on_sync(e))?;
        self.next_id = after;
        Ok(seg)
    }

    /// Ask the sealer thread for the next active segment, unless one is
    /// there or on its way. Its id is reserved now.
    fn ask_spare(&mut self) {
        if self.closed || self.spare.is_some() || self.spare_asked.is_some() || self.spare_failed {
            return;
        }
        let id = SegmentId(self.next_id);
        let Some(after) = self.next_id.checked_add(1) else {
            // No id after it: the roll reports that (`create_active`).
            return;
        };
        if let Some(tx) = &self.sealer_tx
            && self.sealer.as_ref().is_some_and(|h| !h.is_finished())
        {
            // Its first stretch in the page cache: what this stream wrote
            // into the active segment so far (half of it when asked at half
            // full), so a fast stream rolls into pages already read in and
            // an idle one keeps little resident.
            let ahead = self
                .active
                .as_ref()
                .map_or(0, |a| a.items_bytes().min(crate::segment::active::PREFAULT_MAX));
            *self.spare_claim.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
            if !tx.push(Job::Prepare(id, ahead, self.spare_claim.clone())) {
                *self.spare_claim.lock().unwrap_or_else(|p| p.into_inner()) = None;
                return;
            }
            self.next_id = after;
            self.spare_asked = Some(id);
        }
    }

    /// Give up the spare asked for (it arrived, or the writer creates its
    /// segment itself): no longer claimed, once a creation in progress
    /// has finished (see `spare_claim`).
    fn drop_spare_claim(&mut self) {
        *self.spare_claim.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.spare_asked = None;
    }

    /// Take what the sealer thread sent back.
    fn take_done(&mut self, done: Done) -> Result<()> {
        match done {
            Done::Sealed(d) => self.finish_seal(d),
            Done::Prepared(id, r) => {
                let wanted = self.spare_asked == Some(id) && !self.closed;
                if self.spare_asked == Some(id) {
                    self.drop_spare_claim();
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
        // seals rather than pile up frozen segments, each holding a map
        // and a preallocated file (with small segments an unbounded pile
        // ran the process out of descriptors, when each kept one).
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
        // The spare is at the front of the sealer's lane, but the lane
        // waits for a thread of the shared pool: if it does not come in
        // SPARE_WAIT (every thread busy with other streams' seals, or
        // hung), the roll creates the file itself (the late spare arrives
        // stale and is removed).
        let waited = Instant::now();
        while self.spare.is_none() && self.spare_asked.is_some() {
            let left = SPARE_WAIT.saturating_sub(waited.elapsed());
            match self.done_rx.recv_timeout(left) {
                Ok(done) => self.take_done(done)?,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    tracing::warn!(
                        segment = self.spare_asked.map(|s| s.0),
                        "the next active segment was not prepared in time; creating it here"
                    );
                    self.drop_spare_claim();
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // The sealer is gone.
                    self.drop_spare_claim();
                }
            }
        }
        // The next roll may ask for a spare again, whatever happens here.
        self.spare_failed = false;
        let seg = match self.spare.take() {
            Some(s) => s,
            None => {
                self.drop_spare_claim();
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
        let (half, first, stretch) = match self.active.as_mut() {
            Some(a) => {
                let first = a.is_empty();
                a.append_entry(entry)?;
                let stretch = a
                    .prefault_due()
                    .map(|(from, to, write)| (a.map_range(from, to), a.allocation(), to, write));
                (a.len() >= a.capacity() / 2, first, stretch)
            }
            None => return Err(Error::ShutDown),
        };
        // The next stretch of the active segment populated on the sealer's
        // thread, ahead of the appends (a closed lane: the appends fault
        // the pages in themselves).
        if let (Some(((addr, len), alloc, to, write)), Some(tx)) = (stretch, &self.sealer_tx) {
            tx.push(Job::Prefault(addr, len, alloc, to, write));
        }
        // The first entry starts the age rule's clock for the worker, which
        // sleeps while there is nothing to roll (see `age_deadline_ms`).
        if first && self.cfg.segment_max_age.is_some() {
            self.wake_worker();
        }
        // Half full: have the next segment prepared by the time this one
        // rolls (not earlier: an idle stream keeps one preallocated file).
        if half {
            self.ask_spare();
        }
        Ok(())
    }

    /// Make every appended entry durable: the active segment's new items,
    /// and those of frozen segments (a roll does not msync: its append
    /// would wait for the disk) whose seal has not made them durable yet.
    /// Normally there is one frozen segment at most, synced once.
    pub fn flush(&mut self) -> Result<()> {
        self.check_open()?;
        self.flush_frozen_all()?;
        if let Some(a) = self.active.as_mut() {
            a.flush().inspect_err(|e| self.poison.set_err(e))?;
        }
        // The newest segment this flush acknowledged entries of: the
        // active one, or (it is empty) the newest frozen one.
        // Decoded only when a mark is due (once per segment).
        let newest = match self.active.as_ref().filter(|a| !a.is_empty()) {
            Some(a) if self.acked.needed(a.id()) => {
                Some((a.id(), a.first_offset(), a.created_ms(), a.flushed_len()))
            }
            Some(_) => None,
            None => self
                .frozen
                .values()
                .next_back()
                .filter(|f| self.acked.needed(f.id()))
                .map(|f| (f.id(), f.first_offset(), f.created_ms(), f.len())),
        };
        match newest {
            Some((id, first, created, items)) => self.mark_acked(id, first, created, items),
            None => Ok(()),
        }
    }

    /// Before a flush returns: the acknowledged-segment mark names the
    /// newest segment holding acknowledged entries (once per segment; see
    /// `datadir::acked`). A failure poisons the writer.
    fn mark_acked(&mut self, id: SegmentId, first: Option<u64>, created_ms: u64, items: u32) -> Result<()> {
        if !self.acked.needed(id) {
            return Ok(());
        }
        let root = self.dd.root().to_path_buf();
        // The segment marked before, frozen at a roll and not sealed yet:
        // its count brought up to all its items (every one made durable
        // by this flush's `flush_frozen_all`), in the mark's other slot.
        use crate::datadir::acked::AckedMark;
        let older = self
            .acked
            .last_segment()
            .filter(|o| *o < id)
            .and_then(|o| self.frozen.get(&o))
            .map(|f| {
                let first = f.first_offset().unwrap_or(u64::MAX);
                AckedMark::of(f.id(), first, f.created_ms(), u64::from(f.len()), 0)
            });
        let mark = AckedMark::of(id, first.unwrap_or(u64::MAX), created_ms, u64::from(items), 0);
        self.acked
            .write_with_older(&root, mark, older)
            .inspect_err(|e| self.poison.set_err(e))
    }

    /// Freeze the active segment and hand it to the sealer; start a new one.
    /// Returns the id being sealed, or `None` when the active one was empty.
    pub fn roll(&mut self) -> Result<Option<SegmentId>> {
        self.check_open()?;
        if self.active.as_ref().is_some_and(|a| a.is_empty()) {
            return Ok(None);
        }
        // The rate this stream wrote at, for the next segment's lead.
        let rate = self.active.as_ref().and_then(|a| a.write_rate());
        let frozen = self.freeze_active(false)?;
        let next = self.next_active()?;
        // A fast stream's lead (populated for reading when the segment was
        // prepared) populated for writing off this thread, so that its
        // appends take no write fault (`ActiveSegment::lead_for_writing`).
        if let (Some(((addr, len), alloc)), Some(tx)) = (next.lead_for_writing(rate), &self.sealer_tx) {
            let to = alloc.end();
            tx.push(Job::Prefault(addr, len, alloc, to, true));
        }
        self.active = Some(next);
        Ok(frozen)
    }

    /// msync every frozen segment its seal has not made durable yet; a
    /// failure poisons the writer.
    fn flush_frozen_all(&self) -> Result<()> {
        for f in self.frozen.values() {
            f.flush_frozen()
                .inspect_err(|e| self.poison.set_err(e))?;
        }
        Ok(())
    }

    /// Hand the active segment to the sealer. `sync`: msync it first (the
    /// close, whose seals may not finish before the deadline). A roll does
    /// not: the next [`flush`](Self::flush) syncs a frozen segment its seal
    /// has not made durable yet, so the append that rolls never waits for
    /// the disk.
    fn freeze_active(&mut self, sync: bool) -> Result<Option<SegmentId>> {
        let Some(mut old) = self.active.take() else {
            return Ok(None);
        };
        if old.is_empty() {
            remove_empty(&self.seg_dir, old).inspect_err(|e| self.poison_on_sync(e))?;
            return Ok(None);
        }
        if sync && let Err(e) = old.flush() {
            self.poison.set_err(&e);
            self.active = Some(old);
            return Err(e);
        }
        if sync
            && self.acked.needed(old.id())
            && let Err(e) = self.mark_acked(old.id(), old.first_offset(), old.created_ms(), old.flushed_len())
        {
            self.active = Some(old);
            return Err(e);
        }
        let id = old.id();
        let old = Arc::new(old);
        self.frozen.insert(id, old.clone());
        let alive = self.sealer.as_ref().is_some_and(|h| !h.is_finished());
        let sent = match &self.sealer_tx {
            Some(tx) if alive => tx.push(Job::Seal(old)),
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
    /// collect finished seals. Call periodically (the pipeline does, from
    /// the background, holding the writer's lock: so an age roll waits for
    /// its next active segment to be prepared by the sealer thread, off the
    /// lock, and happens at a later tick, rather than create the file here
    /// while appends wait).
    pub fn tick(&mut self) -> Result<Vec<SealedMeta>> {
        // The wall clock stepped back past the segment's start: its age
        // counts from now, not from a time that has not come.
        let now = now_ms();
        if now < self.active_since_ms {
            self.active_since_ms = now;
        }
        if !self.closed
            && let (Some(a), Some(age)) = (&self.active, self.cfg.segment_max_age)
            && !a.is_empty()
            && now_ms().saturating_sub(self.active_since_ms) >= age.as_millis() as u64
        {
            while let Ok(done) = self.done_rx.try_recv() {
                self.take_done(done)?;
            }
            // A sealer thread that ended cannot send the spare asked for:
            // roll now, which reports it (poison).
            if self.spare_asked.is_some() && self.sealer.as_ref().is_none_or(|h| h.is_finished()) {
                self.drop_spare_claim();
            }
            if self.spare.is_none() {
                self.ask_spare();
            }
            // Prepared, or cannot be (preparation failed, the sealer is
            // gone): the roll creates the file itself and reports.
            if self.spare.is_some() || self.spare_asked.is_none() {
                self.roll()?;
            }
        }
        self.collect_sealed()
    }

    /// Collect seals that finished since the last call.
    pub fn poll_sealed(&mut self) -> Result<Vec<SealedMeta>> {
        let sealed = self.collect_sealed();
        self.take_retired().run();
        sealed
    }

    /// As [`poll_sealed`](Self::poll_sealed), leaving the retired frozen
    /// segments for [`take_retired`](Self::take_retired).
    fn collect_sealed(&mut self) -> Result<Vec<SealedMeta>> {
        while let Ok(done) = self.done_rx.try_recv() {
            self.take_done(done)?;
        }
        Ok(self.handoff.take_metas())
    }

    /// The frozen segments whose seal finished, for the caller to hand to
    /// the sealer thread once it let go of this writer's lock.
    pub(crate) fn take_retired(&mut self) -> Retired {
        self.handoff.take_retired()
    }

    /// What the sealer thread and this writer hand over to a collector
    /// that does not take this writer's lock (the pipeline's worker, while
    /// appends go on).
    pub(crate) fn handoff(&self) -> Arc<Handoff> {
        self.handoff.clone()
    }

    /// Take a finished seal: the sealer thread already read the file back,
    /// checked it (a failure there poisoned the writer), added it to the
    /// shared sealed set and queued its metadata in the [`Handoff`], so
    /// this only retires the frozen segment (a lookup that sees both reads
    /// it once, as open).
    fn finish_seal(&mut self, done: SealDone) -> Result<()> {
        let meta = done
            .result
            .inspect_err(|e| self.poison.set_err(e))?;
        debug_assert_eq!(meta.id, done.id);
        if let Some(old) = self.frozen.remove(&done.id) {
            let waiting = {
                let mut h = self.handoff.lock();
                h.retired.push(old);
                h.retired.len()
            };
            if waiting > RETIRED_MAX {
                self.take_retired().run();
            }
        }
        Ok(())
    }

    /// Stop accepting appends, flush, seal the active segment even if it is
    /// not full, and wait for every seal up to `deadline`. Returns the
    /// metadata of segments sealed since the last poll.
    pub fn close(&mut self, deadline: Instant) -> Result<Vec<SealedMeta>> {
        let r = self.close_inner(deadline);
        // Whatever happened: the lane is closed, so the retired frozen
        // segments are dropped here, not kept mapped until the writer is.
        self.take_retired().run();
        r
    }

    fn close_inner(&mut self, deadline: Instant) -> Result<Vec<SealedMeta>> {
        if !self.closed {
            self.closed = true;
            // A spare still queued is not created any more: a shutdown
            // drain's reseal may create later segments from here on.
            self.drop_spare_claim();
            // Everything appended is durable before the wait: a seal that
            // misses the deadline leaves `.active` files holding it.
            let frozen = self
                .poison
                .check()
                .and_then(|_| self.flush_frozen_all())
                .and_then(|_| self.freeze_active(true));
            // Whatever happened, the sealer must see its queue end, or a
            // later close would wait on it forever.
            self.handoff.set_lane(None);
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
        // Every seal is in; the lane still needs a turn of the shared pool
        // to end (and drop the directory's lock). Bounded: with every pool
        // thread busy or hung elsewhere, the lock is released when it ends.
        let left = deadline.saturating_duration_since(Instant::now());
        if let Some(h) = self.sealer.take() {
            match h.join_timeout(left.max(Duration::from_millis(100))) {
                Some(Ok(())) => {}
                Some(Err(())) => self.poison.set("sealer panicked".into()),
                None => tracing::warn!(
                    "the sealer lane has not ended by the deadline (the shared sealer threads \
                     are busy); the data directory's lock is released when it does"
                ),
            }
        }
        // A spare prepared or on its way is not needed any more.
        while let Ok(done) = self.done_rx.try_recv() {
            self.take_done(done)?;
        }
        if let Some(s) = self.spare.take() {
            remove_empty(&self.seg_dir, s).inspect_err(|e| self.poison_on_sync(e))?;
        }
        self.poison.check()?;
        Ok(self.handoff.take_metas())
    }

    /// A sealed segment held locally, mapped (on demand: see
    /// [`crate::segment::local`]). `Ok(None)`: not held locally; an error:
    /// held, but its file is gone, unreadable or not the one checked.
    pub fn sealed(&self, id: SegmentId) -> Result<Option<Arc<SealedSegment>>> {
        self.sealed.get(id)
    }

    /// Whether a sealed segment is held locally (without mapping it) and
    /// taken by this writer: one the sealer thread finished but the writer
    /// has not collected yet (still frozen, not yet returned by
    /// [`poll_sealed`](Self::poll_sealed)) is not counted.
    pub fn holds_sealed(&self, id: SegmentId) -> bool {
        !self.frozen.contains_key(&id) && self.sealed.contains(id)
    }

    /// A local sealed segment's metadata (from its recorded footer and
    /// sums; the file is read only if its sums were never computed).
    pub fn sealed_meta(&self, id: SegmentId) -> Result<Option<SealedMeta>> {
        self.sealed.meta(id)
    }

    /// Ids of every sealed segment held locally and taken by this writer
    /// (as [`holds_sealed`](Self::holds_sealed)).
    #[cfg(any(test, feature = "testing"))]
    pub fn sealed_ids(&self) -> Vec<SegmentId> {
        let mut ids = self.sealed.ids();
        if !self.frozen.is_empty() {
            ids.retain(|id| !self.frozen.contains_key(id));
        }
        ids
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
        self.releaser().release(id)
    }

    /// What [`release`](Self::release) needs, to run without this
    /// writer's lock: an unlink and a directory fsync (milliseconds on a
    /// busy disk) must not hold up appends (issue 16).
    pub fn releaser(&self) -> Releaser {
        Releaser {
            _dd: self.dd.clone(),
            seg_dir: self.seg_dir.clone(),
            sealed: self.sealed.clone(),
            poison: self.poison.clone(),
        }
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
        self.poison.on_sync(e);
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
            self.drop_spare_claim();
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

    pub fn active_id(&self) -> Option<SegmentId> {
        self.active.as_ref().map(|a| a.id())
    }
    /// Entries in active and frozen (sealing) segments: not in any sealed
    /// file yet.
    pub fn unsealed_items(&self) -> u64 {
        // A frozen segment whose seal finished (in the sealed set) is not
        // counted: the writer retires it at its next roll or tick.
        self.frozen
            .values()
            .map(|f| f.as_ref())
            .filter(|f| !self.sealed.contains(f.id()))
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

    /// This writer's poison, to be set without its lock
    /// ([`PoisonHandle::set`]).
    pub(crate) fn poison_handle(&self) -> PoisonHandle {
        PoisonHandle(self.poison.clone())
    }
}

/// A writer's poison, settable from where its lock is not held: the
/// journal's failure to record what the writer sealed poisons the writer,
/// so appends stop being acknowledged (helper-61: after the journal failed
/// with ENOSPC, the broker went on acknowledging and sealing for seconds,
/// hundreds of segments no journal knew, and no FATAL line).
#[derive(Clone)]
pub(crate) struct PoisonHandle(Arc<Poison>);

impl PoisonHandle {
    pub(crate) fn set(&self, why: String) {
        self.0.set(why);
    }
}

/// What a writer's seals leave for a collector, behind a lock of its own
/// that appends never take: the sealer thread queues each sealed segment's
/// metadata here (after the file is durable, checked and in the shared
/// sealed set), and the writer the frozen segments it retired. The worker
/// takes both without the writer's lock while appends go on: the writer's
/// lock taken for that, even for a few microseconds, made an append wait
/// for the worker's thread to be scheduled again (100 us - 2.8 ms waits on
/// 2 cores). One collector at a time: metadata must reach the journal in
/// id order.
#[derive(Default)]
pub(crate) struct Handoff {
    inner: Mutex<HandoffInner>,
    /// The sealer's lane, to drop retired segments on; `None` before the
    /// lane starts and once the writer closed it.
    tx: Mutex<Option<Jobs>>,
    /// The writer rolls segments by age ([`IndexConfig::segment_max_age`]).
    age_rule: AtomicBool,
}

#[derive(Default)]
pub(crate) struct HandoffInner {
    metas: Vec<SealedMeta>,
    /// Frozen segments whose seal finished, for the sealer thread to drop
    /// (their last reference frees the unlinked, preallocated file).
    /// Handed to its lane by whoever takes them ([`Handoff::take_retired`]),
    /// off the writer's lock, or by the seal that finds more than
    /// [`RETIRED_MAX`] waiting. Queuing a job under the writer's lock once
    /// cost appends 0.6-4.6 ms waits (the queue's lock, a thread's wake-up
    /// and allocation all contend with the sealer threads on 2 cores).
    retired: Vec<Arc<ActiveSegment>>,
}

impl Handoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, HandoffInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn push_meta(&self, meta: SealedMeta) {
        self.lock().metas.push(meta);
    }

    /// Sealed metadata not yet taken, in seal (id) order.
    pub(crate) fn take_metas(&self) -> Vec<SealedMeta> {
        std::mem::take(&mut self.lock().metas)
    }

    /// The retired frozen segments, to be queued on the sealer's lane by
    /// [`Retired::run`] (off the writer's lock).
    pub(crate) fn take_retired(&self) -> Retired {
        let segs = std::mem::take(&mut self.lock().retired);
        Retired {
            segs,
            tx: self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// Whether the writer rolls segments by age: its worker must then take
    /// the writer's lock when the deadline comes, appends or not.
    pub(crate) fn age_rule(&self) -> bool {
        self.age_rule.load(Ordering::Relaxed)
    }

    fn set_lane(&self, tx: Option<Jobs>) {
        *self.tx.lock().unwrap_or_else(|p| p.into_inner()) = tx;
    }
}

/// Frozen segments to be dropped on the sealer thread
/// ([`IndexWriter::take_retired`]).
pub(crate) struct Retired {
    segs: Vec<Arc<ActiveSegment>>,
    tx: Option<Jobs>,
}

/// How many retired frozen segments wait for a caller to take them before
/// a seal queues them itself (a writer used without the worker's tick,
/// as tools and tests do, does not keep them mapped).
const RETIRED_MAX: usize = 4;

impl Retired {
    /// Queue each on the sealer's lane; with the lane closed (or none),
    /// drop it here.
    pub(crate) fn run(self) {
        for seg in self.segs {
            match &self.tx {
                // A closed lane hands the job back, dropped here.
                Some(tx) => {
                    tx.push(Job::Retire(seg));
                }
                None => drop(seg),
            }
        }
    }
}

impl Drop for IndexWriter {
    fn drop(&mut self) {
        // Close the sealer's queue but do not wait for it: a hung disk must
        // not hang the drop. A seal cut short is redone at the next start;
        // a spare left on disk is an empty active file, taken up (or
        // removed) by the next start.
        if let Some(tx) = self.sealer_tx.take() {
            // The active segment's map goes behind whatever its lane still
            // holds (a stretch to populate names an address in it): it is
            // unmapped after them, not while they run.
            self.handoff.set_lane(None);
            for s in std::mem::take(&mut self.handoff.lock().retired) {
                tx.push(Job::Retire(s));
            }
            if let Some(a) = self.active.take() {
                tx.push(Job::Retire(Arc::new(a)));
            }
            tx.close();
        }
    }
}

/// Deletes local copies of committed segments for an [`IndexWriter`],
/// without its lock ([`IndexWriter::releaser`]). It shares the writer's
/// poison (a failed unlink or directory fsync poisons the writer) and keeps
/// the data directory's lock alive while it runs.
///
/// Only for segments the writer no longer changes: committed ones, which
/// no seal, roll or reseal writes again (ids only grow; a reseal into a
/// segment keeps that segment's copy, see `pipeline::reseal::blocks_release`).
pub struct Releaser {
    _dd: Arc<DataDir>,
    seg_dir: PathBuf,
    sealed: Arc<LocalSealed>,
    poison: Arc<Poison>,
}

impl Releaser {
    /// [`IndexWriter::release`], off the writer's lock.
    pub fn release(&self, id: SegmentId) -> Result<()> {
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
        fsync_dir_at("release.dirsync", &self.seg_dir).inspect_err(|e| self.poison.on_sync(e))
    }
}

/// No segment id is left above `id` (u64::MAX): a file, journal record or
/// manifest recorded an id no tierindex gives out (each epoch numbers from
/// `(epoch - 1) << 32`), so it is damage or another program's file.
fn ids_exhausted(id: u64) -> Error {
    Error::corrupt(
        "segment ids",
        format!(
            "no segment id is left after {id}: a local file, the journal or the manifest \
             records an id no tierindex gives out. Find it (`tierindex status`, \
             `tierindex inspect`, `tierindex reconcile`) and move it away; no segment was \
             created under it"
        ),
    )
}

/// Remove an empty active segment durably. Any failure is
/// [`Error::Poisoned`] (the callers poison the writer): after a failed
/// unlink the writer no longer knows what the directory holds, and a failed
/// directory fsync is never retried.
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

    /// `active_at_open = false` (a drain's open): no active file until the
    /// first append, which creates it; a close with none leaves none.
    #[test]
    fn without_an_active_at_open_the_first_append_creates_it() {
        let actives = crate::testing::active_files;
        let d = tempfile::tempdir().unwrap();
        let lazy = IndexConfig {
            active_at_open: false,
            ..cfg(100)
        };
        let (mut w, _) = IndexWriter::open(DataDir::open(d.path()).unwrap(), lazy.clone(), None, None).unwrap();
        assert_eq!(actives(d.path()), 0);
        assert_eq!(w.active_id(), None);
        w.flush().unwrap();
        w.append(b"k", 1, 1, 1).unwrap();
        assert_eq!(actives(d.path()), 1);
        assert_eq!(w.lookup(b"k", TimeRange::ALL).entries.len(), 1);
        w.close(Instant::now() + Duration::from_secs(10)).unwrap();
        drop(w);
        let (w, _) = IndexWriter::open(DataDir::open(d.path()).unwrap(), lazy, None, None).unwrap();
        assert_eq!(
            w.lookup(b"k", TimeRange::ALL).entries.len(),
            1,
            "the entry's segment sealed"
        );
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

    /// An active segment created under a clock a day ahead (a reopen after
    /// the clock was set right) rolls by age from the reopen, not a day
    /// later (helper-61: it kept its entries local for the skew).
    #[test]
    fn a_segment_from_a_clock_ahead_still_rolls_by_age() {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::open(d.path()).unwrap();
        let ahead = now_ms() + 86_400_000;
        let mut a = ActiveSegment::create(&dd.segments_dir(), SegmentId(1), 64, 100, ahead).unwrap();
        a.append_entry(Entry {
            key_hash: 7,
            offset: 0,
            size: 1,
            timestamp_ms: 1,
        })
        .unwrap();
        a.flush().unwrap();
        drop(a);
        let age = Duration::from_secs(10);
        let (w, _) = IndexWriter::open(
            dd,
            IndexConfig {
                segment_max_age: Some(age),
                ..cfg(100)
            },
            None,
            None,
        )
        .unwrap();
        let due = w.age_deadline_ms().unwrap();
        assert!(due <= now_ms() + 10_000, "due {} ms from now", due - now_ms());
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
        // Sealed and taken by the writer (no longer frozen).
        let until = Instant::now() + Duration::from_secs(30);
        let mut taken = Vec::new();
        while taken.is_empty() && Instant::now() < until {
            taken = w.tick().unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!taken.is_empty(), "the segment did not seal in 30 s");
        let src = taken[0].id;
        assert_eq!(w.sealed_ids(), vec![src]);
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

    /// A roll does not msync (the append that rolls never waits for the
    /// disk); the next flush makes the frozen segment's unflushed items
    /// durable while its seal has not.
    #[test]
    fn a_roll_does_not_sync_and_the_next_flush_covers_the_frozen_segment() {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::open(d.path()).unwrap();
        let (mut w, _) = IndexWriter::open(dd, cfg(100), None, None).unwrap();
        let e = |i: u64| Entry {
            key_hash: i,
            offset: i,
            size: 1,
            timestamp_ms: 1,
        };
        for i in 0..5 {
            w.append_entry(e(i)).unwrap();
        }
        w.flush().unwrap();
        for i in 5..8 {
            w.append_entry(e(i)).unwrap();
        }
        // The sealer waits until told, so the frozen segment is not sealed
        // before the flush below.
        let (hold, held) = mpsc::channel();
        assert!(w.sealer_tx.as_ref().unwrap().push(Job::Hold(held)));
        let frozen = w.active_id().unwrap();
        let (rolled, steps) = crate::durable::seam::steps_of(|| w.roll());
        assert_eq!(rolled.unwrap(), Some(frozen));
        assert!(
            !steps.iter().any(|s| matches!(s, crate::durable::seam::Step::SyncRange { .. })),
            "the roll synced: {steps:?}"
        );
        w.append_entry(e(8)).unwrap();
        let (flushed, steps) = crate::durable::seam::steps_of(|| w.flush());
        flushed.unwrap();
        let frozen_path = d.path().join("segments").join(crate::segment::active::active_file_name(frozen));
        let synced_frozen = steps.iter().any(|s| {
            matches!(s, crate::durable::seam::Step::SyncRange { path, .. } if *path == frozen_path)
        });
        assert!(
            !d.path().join("segments").join(sealed_file_name(frozen)).exists(),
            "sealed while the sealer was held"
        );
        assert!(
            synced_frozen,
            "the flush after a roll left the frozen segment's items unsynced: {steps:?}"
        );
        drop(hold);
        // Synced once: a second flush has nothing of it left to sync.
        let (flushed, steps) = crate::durable::seam::steps_of(|| w.flush());
        flushed.unwrap();
        assert!(steps.is_empty(), "nothing was appended since: {steps:?}");
        w.close(Instant::now() + Duration::from_secs(30)).unwrap();
    }

    /// The poison's text says "writer poisoned" and its advice once: a
    /// flush that found its file gone stored the whole `Poisoned` text as
    /// the reason, and every later call wrapped it again (helper-81 F5).
    #[test]
    fn a_poison_is_said_once() {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::open(d.path()).unwrap();
        let (mut w, _) = IndexWriter::open(dd, cfg(100), None, None).unwrap();
        let entry = |i: u64| Entry {
            key_hash: i,
            offset: i,
            size: 1,
            timestamp_ms: 1,
        };
        w.append_entry(entry(0)).unwrap();
        w.flush().unwrap();
        // The data directory's files deleted under the writer.
        let seg = d.path().join("segments");
        for f in std::fs::read_dir(&seg).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        w.append_entry(entry(1)).unwrap();
        let first = w.flush().unwrap_err().to_string();
        let later = [
            w.flush().unwrap_err().to_string(),
            w.append_entry(entry(2)).unwrap_err().to_string(),
            w.poisoned().unwrap(),
        ];
        for msg in std::iter::once(&first).chain(&later) {
            assert_eq!(msg.matches("writer poisoned").count(), 1, "{msg}");
            assert_eq!(
                msg.matches("restart to recover what was durable").count(),
                1,
                "{msg}"
            );
            assert!(msg.contains("not there any more"), "{msg}");
        }
        let _ = w.close(Instant::now() + Duration::from_secs(30));
    }

    /// Once the writer is poisoned (a seal failed on a full disk), the
    /// segments queued behind are not sealed: sealed and journaled above
    /// the failed one, they would leave its id below the journal's highest,
    /// never to be journaled or uploaded (helper-63).
    #[test]
    fn no_seal_after_the_writer_is_poisoned() {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::open(d.path()).unwrap();
        let (mut w, _) = IndexWriter::open(dd, cfg(10), None, None).unwrap();
        let (hold, held) = mpsc::channel();
        assert!(w.sealer_tx.as_ref().unwrap().push(Job::Hold(held)));
        let mut frozen = Vec::new();
        for i in 0..30u64 {
            w.append_entry(Entry {
                key_hash: i,
                offset: i,
                size: 1,
                timestamp_ms: 1,
            })
            .unwrap();
            if i % 10 == 9 {
                frozen.extend(w.roll().unwrap());
            }
        }
        assert_eq!(frozen.len(), 3);
        // As a failed seal of the first would: poisoned while all three wait.
        w.poison_with("a seal failed".into());
        drop(hold);
        let _ = w.close(Instant::now() + Duration::from_secs(30));
        drop(w);
        // The sealer lane holds the directory's lock until it has run its
        // queue: once the lock is free, every seal it would make is made.
        let until = Instant::now() + Duration::from_secs(30);
        while DataDir::open(d.path()).is_err() {
            assert!(Instant::now() < until, "the sealer did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
        for id in frozen {
            let seg = d.path().join("segments");
            assert!(!seg.join(sealed_file_name(id)).exists(), "{id} sealed");
            assert!(
                seg.join(crate::segment::active::active_file_name(id)).exists(),
                "{id} left for the next start"
            );
        }
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

    /// Finished seals' frozen segments are left by `tick` for its caller
    /// to queue off the writer's lock (`take_retired`), and are never
    /// kept beyond `RETIRED_MAX` by a writer that nobody ticks;
    /// `poll_sealed` queues them itself. The seals' metadata waits in the
    /// handoff, where a collector without the writer's lock finds it.
    #[test]
    fn retired_frozen_segments_wait_for_the_caller_up_to_a_bound() {
        let d = tempfile::tempdir().unwrap();
        let dd = DataDir::open(d.path()).unwrap();
        let (mut w, _) = IndexWriter::open(dd, cfg(10), None, None).unwrap();
        let waiting = |w: &IndexWriter| w.handoff.lock().retired.len();
        let mut sealed = 0;
        let mut seen_waiting = 0;
        for i in 0..200u64 {
            w.append(&i.to_le_bytes(), i, 1, i).unwrap();
            sealed += w.tick().unwrap().len();
            assert!(waiting(&w) <= RETIRED_MAX, "{}", waiting(&w));
            seen_waiting = seen_waiting.max(waiting(&w));
        }
        let until = Instant::now() + Duration::from_secs(30);
        while sealed < 19 {
            assert!(Instant::now() < until, "seals did not finish");
            std::thread::sleep(Duration::from_millis(5));
            sealed += w.tick().unwrap().len();
        }
        assert_eq!(sealed, 19);
        assert!(seen_waiting > 0, "tick queued them itself");
        let left = waiting(&w);
        let r = w.take_retired();
        assert_eq!(r.segs.len(), left);
        assert_eq!(waiting(&w), 0);
        r.run();
        // Without a caller taking them: bounded, and `poll_sealed` empties.
        for i in 200..400u64 {
            w.append(&i.to_le_bytes(), i, 1, i).unwrap();
            w.poll_sealed().unwrap();
            assert_eq!(waiting(&w), 0);
        }
        assert!(w.frozen.len() <= 20);
        // Collected without the writer (as the worker does while appends
        // go on): every seal's metadata once, in id order, whether or not
        // the writer took the seal yet.
        let h = w.handoff();
        let mut ids: Vec<u64> = Vec::new();
        for i in 400..600u64 {
            w.append(&i.to_le_bytes(), i, 1, i).unwrap();
            ids.extend(h.take_metas().iter().map(|m| m.id.0));
            h.take_retired().run();
        }
        let metas = w.close(Instant::now() + Duration::from_secs(30)).unwrap();
        ids.extend(metas.iter().map(|m| m.id.0));
        ids.extend(h.take_metas().iter().map(|m| m.id.0));
        let first = ids[0];
        assert!(first <= 41, "{ids:?}");
        assert_eq!(ids, (first..first + ids.len() as u64).collect::<Vec<_>>());
        assert_eq!(*ids.last().unwrap(), 60, "{ids:?}");
        assert_eq!(waiting(&w), 0);
    }
}
