//! [`Journal`]: opening (create, clean up, replay, cut the torn tail) and the
//! group-committed `append`.
//!
//! Order inside `append`, and why:
//! 1. refuse if poisoned (an earlier write/fsync failed: nothing is trusted);
//! 2. validate every record (size, transition) against the durable state, so
//!    a rejected batch writes nothing;
//! 3. encode the batch as ONE frame and `pwrite` it at the end of the valid
//!    data (one CRC makes the batch atomic on replay);
//! 4. `fdatasync` (covers the new file size too);
//! 5. only now update the in-memory state and length.
//!
//! A failure in 3 or 4 poisons the journal; the bytes may or may not be on
//! disk, and replay after a restart decides (a whole frame is kept, a partial
//! one is cut).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::record::{Frame, JournalState, Record, SegmentRecord};
use super::replay::{encode_frame, replay_bytes};
use super::{JournalOptions, JournalView, LOG_FILE, ReplayReport, TMP_FILE, compact, journal_dir};
use crate::lock::DirLock;
use std::sync::Arc;
use crate::error::{Error, Result};
use crate::segment::SegmentId;
use std::collections::BTreeMap;

/// The read-write journal. One per data directory, whose lock covers it:
/// [`Journal::open_in`] runs under an open `DataDir`'s lock, [`Journal::open`]
/// takes the data directory's lock itself for the life of the value.
///
/// No descriptor is kept between appends (issue 16: a process hosting
/// thousands of streams must not hold one a stream): each batch opens
/// `journal.log`, checks that it is still the file this journal last
/// wrote, replayed or compacted into, not written since as far as its
/// device, inode, length and modification time tell (a rewrite of the same
/// length within one tick of a coarse clock is not seen), writes,
/// `fdatasync`s and closes it. A writeback error of the batch is still seen by that
/// `fdatasync`: the descriptor is opened before the write.
#[derive(Debug)]
pub struct Journal {
    /// `DATA_DIR/journal`.
    pub(super) dir: PathBuf,
    /// `journal.log` as this journal last left it; a different file under
    /// the name, or one changed since, poisons the next append.
    pub(super) stamp: Stamp,
    /// Test hook: this descriptor instead of opening `journal.log`.
    #[cfg(test)]
    pub(super) test_file: Option<File>,
    /// Its path (`dir/journal.log`).
    pub(super) log: PathBuf,
    /// Acknowledged (durable) state, generation and valid length.
    pub(super) view: JournalView,
    pub(super) opts: JournalOptions,
    /// Why the journal refuses all further work, once a write/fsync failed.
    pub(super) poisoned: Option<String>,
    /// File length right after the last compaction (0 until one runs).
    pub(super) compacted_len: u64,
    /// Records and snapshots the file holds (replayed at open, appended
    /// since, or written by the last compaction): a compaction leaves one
    /// per live segment, so it shortens replay only when this is well
    /// above the live segments.
    pub(super) records_in_file: u64,
    /// A size check declined a compaction at a length a quarter below this:
    /// none is considered again until the file reaches it.
    pub(super) declined_below: u64,
    /// The data directory's lock (a share of its `DataDir`'s, or the one
    /// [`Journal::open`] took): held while the journal can still write,
    /// whichever of the journal and the writer is dropped last.
    _lock: Option<Arc<DirLock>>,
}

/// What `journal.log` was when this journal last left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

fn stamp_of(m: &fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        // The data's modification time: a chmod, an atime restore or a
        // hard link (a backup's) change the change time, not this.
        mtime: (m.mtime(), m.mtime_nsec()),
    }
}

impl Journal {
    /// [`Journal::open_in`] for a caller that holds no [`DataDir`]: takes
    /// the data directory's lock ([`DirLock::alone`]) and holds
    /// it for the life of the journal, so that it excludes a broker or a
    /// command holding the directory.
    #[cfg(any(test, feature = "testing"))]
    pub fn open(data_dir: &Path, opts: JournalOptions) -> Result<(Journal, ReplayReport)> {
        opts.validate()?;
        let lock = Arc::new(DirLock::alone(data_dir)?);
        Self::open_locked(data_dir, opts, lock, false)
    }

    /// Opens (creating if needed) the journal of the data directory `lock`
    /// holds (a `DataDir`'s: `dd.lock()`), replays it and cuts any torn
    /// tail. That lock covers the journal: no descriptor of its own is held.
    ///
    /// A bad header is returned as [`Error::Corrupt`] and the file is left
    /// alone: it cannot come from a crash (headers are only installed by
    /// rename), so the operator or the caller's quarantine decides.
    pub fn open_in(lock: &Arc<DirLock>, opts: JournalOptions) -> Result<(Journal, ReplayReport)> {
        opts.validate()?;
        Self::open_locked(lock.root(), opts, lock.clone(), false)
    }

    /// [`Journal::open_in`] for a caller that made the data directory's
    /// names durable in this process, under the same lock, after the
    /// journal directory existed (`DataDir::open_as` did): the data
    /// directory's fsync is not repeated (one fsync fewer a stream's open,
    /// issue 16). A journal directory missing here is created and synced
    /// as always.
    pub(crate) fn open_in_synced_dir(
        lock: &Arc<DirLock>,
        opts: JournalOptions,
    ) -> Result<(Journal, ReplayReport)> {
        opts.validate()?;
        Self::open_locked(lock.root(), opts, lock.clone(), true)
    }

    fn open_locked(
        data_dir: &Path,
        opts: JournalOptions,
        lock: Arc<DirLock>,
        data_dir_synced: bool,
    ) -> Result<(Journal, ReplayReport)> {
        let dir = journal_dir(data_dir);
        let created = match fs::create_dir(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(Error::io(&dir, "create journal directory", e)),
        };
        // Not only after create_dir: a previous process may have created
        // the directory and died before making its name durable (unless
        // this process's caller synced it since).
        if created || !data_dir_synced {
            crate::durable::fsync_dir(data_dir)?;
        }

        // Safe to delete: journal.log is only replaced by renaming a fully
        // written and fsynced tmp over it, so a tmp that still exists was never
        // installed and journal.log (if any) is the complete previous journal.
        let removed_tmp = compact::remove_tmp(&dir)?;
        let log = dir.join(LOG_FILE);
        if !log
            .try_exists()
            .map_err(|e| Error::io(&log, "stat journal", e))?
        {
            let (_file, _len, _) = compact::write_snapshot_file(&dir, 1, &Default::default())?;
            crate::durable::rename(&dir.join(TMP_FILE), &log)
                .map_err(|e| Error::io(&log, "install new journal", e))?;
        }
        // Makes the removal of a tmp and the creation of journal.log durable.
        crate::durable::fsync_dir(&dir)?;

        let file = crate::durable::open_regular(&log, true)
            .map_err(|e| Error::io(&log, "open journal", e))?;
        let (bytes, zero_tail) =
            super::read_trimmed(&file).map_err(|e| Error::io(&log, "read journal", e))?;
        // A header that does not decode (an emptied or overwritten file):
        // say which file, and what to do, as for damage further in.
        let replayed = replay_bytes(&bytes).map_err(|e| match e {
            Error::Corrupt { detail, .. } => Error::corrupt(
                format!("journal {}", log.display()),
                format!(
                    "{detail}. Nothing was changed and the journal was not opened. Keep the \
                     data directory as it is and run `tierindex fsck --repair` on it: it \
                     rebuilds the journal from every intact frame and the segment files, and \
                     keeps the damaged file as journal.log.damaged.<ms>"
                ),
            ),
            e => e,
        })?;
        let mut report = replayed.report;
        report.removed_tmp = removed_tmp;
        // The zeros after the last non-zero byte, not read: part of the
        // torn tail cut below.
        if zero_tail > 0 {
            report.truncated_bytes += zero_tail;
            report.torn_tail_at.get_or_insert(replayed.valid_len);
            if report.tail.is_none() {
                tracing::warn!(
                    file = %log.display(),
                    offset = replayed.valid_len,
                    "cutting {zero_tail} zero bytes after the journal's last frame (a \
                     zero-extended or sparse file)"
                );
            }
        }
        if let Some(damage) = &report.damage {
            // Not a torn tail: cutting would forget acknowledged records
            // (and with them segments the store may hold the only copy of).
            let err = damage.to_error(&log);
            tracing::error!(file = %log.display(), "journal not opened: {err}");
            return Err(err);
        }
        log_tail(&log, &report);
        if report.truncated_bytes > 0 {
            // A torn tail after a crash is the common case, but the same cut
            // also removes damage in the middle (and everything after it).
            // Never delete to get past it: keep a durable copy of the cut
            // bytes next to the journal first.
            let cut = bytes.get(replayed.valid_len as usize..).unwrap_or(&[]);
            if !cut.iter().all(|b| *b == 0) {
                let saved = dir.join(format!(
                    "journal.log.cut-at-{}.{}",
                    replayed.valid_len,
                    crate::segment::now_ms()
                ));
                fs::write(&saved, cut)
                    .map_err(|e| Error::io(&saved, "save cut journal tail", e))?;
                crate::durable::created(&saved);
                crate::durable::written(&saved);
                crate::durable::fsync_path(&saved)?;
                crate::durable::fsync_dir(&dir)?;
                tracing::warn!(saved = %saved.display(), bytes = cut.len(), "journal tail cut; copy kept");
            }
            // Later appends go right after the last good frame; the cut bytes
            // must not survive behind them.
            file.set_len(replayed.valid_len)
                .inspect(|()| crate::durable::resized(&log))
                .and_then(|()| crate::durable::sync_all(&file, &log))
                .map_err(|e| Error::io(&log, "truncate torn journal tail", e))?;
        }
        let stamp = file
            .metadata()
            .map(|m| stamp_of(&m))
            .map_err(|e| Error::io(&log, "stat journal", e))?;
        drop(file);
        // The file's bytes are no longer needed; then the table is packed
        // (replay filled it one key at a time, which leaves its nodes about
        // half full): at 1,000,000 segments 460 MB become about 270.
        drop(bytes);
        let mut state = replayed.state;
        state.pack();
        let mut journal = Journal {
            dir,
            stamp,
            #[cfg(test)]
            test_file: None,
            log: log.clone(),
            view: JournalView {
                state,
                generation: report.generation,
                file_len: replayed.valid_len,
            },
            opts,
            poisoned: None,
            compacted_len: 0,
            records_in_file: report.records_replayed + report.snapshot_segments,
            declined_below: 0,
            _lock: Some(lock),
        };
        if report.format_version < super::FORMAT_VERSION {
            // Appends write versioned frames; an older build must find a
            // header it refuses, not frames it would cut. Compaction writes
            // the current format (Released records are dropped, as by any
            // compaction; the highest id and offset are kept).
            journal.compact()?;
            tracing::info!(
                file = %log.display(),
                from = report.format_version,
                to = super::FORMAT_VERSION,
                "journal format upgraded"
            );
        }
        Ok((journal, report))
    }

    /// Replays `data_dir/journal/journal.log` without creating, locking,
    /// truncating or deleting anything; for `tierindex status` and `inspect`,
    /// also while a broker runs. A torn tail is reported, not cut. A missing
    /// journal is an error (NotFound), not an empty view. Damage that is not a
    /// torn tail is an error, as for `open`: a caller must never act on a
    /// journal that forgot records (the reconciler would take their objects
    /// for someone else's).
    pub fn open_read_only(data_dir: &Path) -> Result<(JournalView, ReplayReport)> {
        let log = journal_dir(data_dir).join(LOG_FILE);
        let (bytes, zero_tail) = crate::durable::open_regular(&log, false)
            .and_then(|f| super::read_trimmed(&f))
            .map_err(|e| Error::io(&log, "read journal", e))?;
        let mut replayed = replay_bytes(&bytes)?;
        if zero_tail > 0 {
            replayed.report.truncated_bytes += zero_tail;
            let at = replayed.valid_len;
            replayed.report.torn_tail_at.get_or_insert(at);
        }
        if let Some(damage) = &replayed.report.damage {
            return Err(damage.to_error(&log));
        }
        let view = JournalView {
            state: replayed.state,
            generation: replayed.report.generation,
            file_len: replayed.valid_len,
        };
        Ok((view, replayed.report))
    }

    /// The highest segment id `data_dir`'s journal records (its `MaxId`
    /// frame, snapshots and `Sealed` records), read frame by frame without
    /// building its state, locking or changing anything: for a report after
    /// a shutdown, when a replay would hold the whole state again. Every id
    /// the journal records is at or below it. Past a frame that does not
    /// decode it answers as [`Journal::open_read_only`] (which replays the
    /// whole file): the highest id before a torn tail, an error for damage
    /// or a bad header.
    pub fn max_segment_id_on_disk(data_dir: &Path) -> Result<Option<SegmentId>> {
        let log = journal_dir(data_dir).join(LOG_FILE);
        let file = crate::durable::open_regular(&log, false)
            .map_err(|e| Error::io(&log, "read journal", e))?;
        let (_, mut frames) =
            super::replay::FrameReader::new(io::BufReader::with_capacity(1 << 20, file), &log)?;
        let mut max: Option<SegmentId> = None;
        loop {
            let frame = match frames.next_frame() {
                Ok(Some((_, frame))) => frame,
                Ok(None) => return Ok(max),
                // A torn last append, zeros after the last frame, damage:
                // the read-only replay says which, and accepts a torn tail.
                Err(_) => {
                    return Self::open_read_only(data_dir).map(|(v, _)| v.max_segment_id());
                }
            };
            let seen = match frame {
                Frame::MaxId(m) => m,
                Frame::Snapshot(rec) => Some(rec.meta.id),
                Frame::Batch(recs) => recs
                    .iter()
                    .filter_map(|r| match r {
                        Record::Sealed { meta } => Some(meta.id),
                        _ => None,
                    })
                    .max(),
                Frame::MaxOffset(_) => None,
            };
            max = max.max(seen);
        }
    }

    /// Validates all `records`, then writes them as one frame with one write
    /// and one `fdatasync`, then applies them in memory. All or nothing: a
    /// rejected batch writes nothing; a failed write or fsync poisons.
    pub fn append(&mut self, records: &[Record]) -> Result<()> {
        self.check_poisoned()?;
        if records.is_empty() {
            return Ok(());
        }
        for (i, rec) in records.iter().enumerate() {
            let n = serde_json::to_vec(rec)
                .map_err(|e| Error::InvalidInput(format!("journal record {i}: {e}")))?
                .len();
            if n > self.opts.max_record_bytes as usize {
                return Err(Error::InvalidInput(format!(
                    "journal record {i} ({}) is {n} bytes, above max_record_bytes {}",
                    rec.kind(),
                    self.opts.max_record_bytes
                )));
            }
        }
        let staged = self.view.state.stage(records)?;
        let mut buf = Vec::new();
        encode_frame(&Frame::Batch(records.to_vec()), &mut buf)?;

        let at = self.view.file_len;
        let file = self.file_for_append()?;
        let written =
            crate::durable::at("journal.append").write_all_at(&file, &buf, at, &self.log);
        if let Err(e) = written {
            return Err(self.poison(format!(
                "journal write of {} bytes at {at} failed: {e}",
                buf.len()
            )));
        }
        let synced = crate::durable::at("journal.fsync").sync_data(&file, &self.log);
        if let Err(e) = synced {
            return Err(self.poison(format!("journal fdatasync failed: {e}")));
        }
        match file.metadata() {
            Ok(m) => self.stamp = stamp_of(&m),
            Err(e) => return Err(self.poison(format!("stat of the journal after a write: {e}"))),
        }
        self.view.file_len = at + buf.len() as u64;
        self.records_in_file = self.records_in_file.saturating_add(records.len() as u64);
        self.view.state.commit(staged);
        Ok(())
    }

    /// `journal.log`, opened for one batch, once it is checked to be the
    /// file this journal last left, untouched since ([`Journal::check_stamp`]).
    /// A failure to open it poisons too: the pipeline takes a batch's
    /// records (a seal's) out of the writer before it journals them, and a
    /// batch that failed must never be followed by later ones.
    fn file_for_append(&mut self) -> Result<File> {
        #[cfg(test)]
        if let Some(f) = &self.test_file {
            return f
                .try_clone()
                .map_err(|e| Error::io(&self.log, "open journal", e));
        }
        // A descriptor limit reached for a moment (a process hosting
        // thousands of streams), an interrupted call: tried again, briefly
        // (this runs on a journal thread others share), before poisoning.
        let file = match crate::durable::open_retrying(&self.log, || {
            crate::durable::open_regular(&self.log, true)
        }) {
            Ok(f) => f,
            Err(e) => {
                return Err(self.poison(format!(
                    "{} could not be opened for a batch: {e}",
                    self.log.display()
                )));
            }
        };
        let m = match file.metadata() {
            Ok(m) => m,
            Err(e) => return Err(self.poison(format!("stat of the journal: {e}"))),
        };
        self.check_stamp(&m)?;
        Ok(file)
    }

    /// Poisons unless `m` is `journal.log` as this journal last left it: a
    /// file replaced (a copy or restore into a live data directory), cut,
    /// extended or written by another: writing on would mix two histories.
    fn check_stamp(&mut self, m: &fs::Metadata) -> Result<()> {
        let now = stamp_of(m);
        if (now.dev, now.ino) != (self.stamp.dev, self.stamp.ino) {
            return Err(self.poison(format!(
                "{} is not the journal this process opened: the file was replaced while \
                 the broker ran (a copy or restore into a live data directory?). Nothing \
                 more is written to it; stop the broker, keep both files, and run \
                 `tierindex fsck` on the data directory",
                self.log.display()
            )));
        }
        if now != self.stamp {
            return Err(self.poison(format!(
                "{} was changed by something other than this journal while the broker ran \
                 ({} bytes, {} when this process last wrote it; or its data rewritten in \
                 place: its modification time moved). \
                 Nothing more is written to it; stop the broker, keep the file, and run \
                 `tierindex fsck` on the data directory",
                self.log.display(),
                now.len,
                self.stamp.len
            )));
        }
        Ok(())
    }

    pub fn get(&self, id: SegmentId) -> Option<&SegmentRecord> {
        self.view.get(id)
    }

    pub fn segments(&self) -> &BTreeMap<SegmentId, SegmentRecord> {
        self.view.segments()
    }

    /// Segments not yet Verified-or-later and not Quarantined, oldest id first.
    #[cfg(any(test, feature = "testing"))]
    pub fn pending(&self) -> Vec<&SegmentRecord> {
        self.view.pending()
    }

    /// The replayed state, with its indexes.
    pub fn state(&self) -> &JournalState {
        &self.view.state
    }

    /// See `JournalState::unfinished_ids`.
    pub fn unfinished_ids(&self, with_committed: bool) -> impl Iterator<Item = SegmentId> + '_ {
        self.view.state.unfinished_ids(with_committed)
    }

    /// Highest id ever journaled, including segments compaction dropped.
    pub fn max_segment_id(&self) -> Option<SegmentId> {
        self.view.max_segment_id()
    }

    /// Highest entry offset ever journaled (kept through compaction).
    pub fn max_offset(&self) -> Option<u64> {
        self.view.max_offset()
    }

    /// Bytes of `journal.log` holding acknowledged data.
    #[cfg(any(test, feature = "testing"))]
    pub fn file_len(&self) -> u64 {
        self.view.file_len()
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn generation(&self) -> u64 {
        self.view.generation()
    }

    /// The acknowledged state.
    pub fn view(&self) -> &JournalView {
        &self.view
    }

    /// `DATA_DIR/journal`.
    #[cfg(any(test, feature = "testing"))]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    pub(super) fn check_poisoned(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(Error::Poisoned(why.clone())),
            None if self._lock.is_none() => Err(Error::ShutDown),
            None => Ok(()),
        }
    }

    /// Ends the journal's writing for good and gives up its share of the
    /// data directory's lock: every later append or compaction fails. For
    /// the shutdown, once nothing can write through it any more (its
    /// committer lane finished), so that the lock is released with the
    /// writer's, not whenever the last handle to the journal goes.
    pub fn retire(&mut self) {
        self._lock = None;
    }

    /// Marks the journal unusable and returns the error for this call.
    pub(super) fn poison(&mut self, why: String) -> Error {
        tracing::error!(dir = %self.dir.display(), "journal poisoned: {why}");
        self.poisoned = Some(why.clone());
        Error::Poisoned(why)
    }
}

fn log_tail(log: &Path, report: &ReplayReport) {
    let Some(tail) = &report.tail else { return };
    // Damage was refused before this point: what is left is a torn tail.
    debug_assert!(report.damage.is_none() && !tail.kind.is_intact());
    tracing::warn!(
        file = %log.display(),
        offset = tail.offset,
        "cutting torn journal tail of {} bytes ({:?}: {})",
        report.truncated_bytes,
        tail.kind,
        tail.detail
    );
}

// Compaction (the file it writes is compact.rs's).
impl Journal {
    /// Rewrites the journal as a snapshot of the live state: every segment
    /// except Released ones (but the newest of those, kept as the evidence
    /// of what was committed), plus the max id and offset ever seen. The
    /// state visible through `get`/`segments` loses only those Released
    /// segments.
    pub fn compact(&mut self) -> Result<()> {
        self.check_poisoned()?;
        let generation = self.view.generation + 1;
        let written = compact::write_snapshot_file(&self.dir, generation, &self.view.state);
        let (file, len, kept) = match written {
            Ok(done) => done,
            Err(e) => {
                // journal.log was not touched.
                if let Err(rm) = compact::remove_tmp(&self.dir) {
                    tracing::warn!("could not remove failed compaction file: {rm}");
                }
                return Err(e);
            }
        };
        let (tmp, log) = (self.dir.join(TMP_FILE), self.dir.join(LOG_FILE));
        // The file to be replaced must be the one this journal left: one
        // an operator put there is not silently renamed over.
        let current = match fs::symlink_metadata(&log) {
            Ok(m) => m,
            Err(e) => {
                let _ = compact::remove_tmp(&self.dir);
                return Err(self.poison(format!(
                    "stat of {} before compaction: {e}",
                    log.display()
                )));
            }
        };
        if let Err(e) = self.check_stamp(&current) {
            let _ = compact::remove_tmp(&self.dir);
            return Err(e);
        }
        let renamed = crate::durable::at("journal.compact.rename").rename(&tmp, &log);
        if let Err(e) = renamed {
            return Err(self.poison(format!("compaction rename {tmp:?} -> {log:?} failed: {e}")));
        }
        // From here the name points at the new file: switch to it.
        tracing::info!(
            dir = %self.dir.display(),
            generation,
            bytes_before = self.view.file_len,
            bytes_after = len,
            segments = kept,
            "journal compacted"
        );
        self.stamp = match file.metadata() {
            Ok(m) => stamp_of(&m),
            Err(e) => return Err(self.poison(format!("stat of the compacted journal: {e}"))),
        };
        drop(file);
        self.view.state.drop_released();
        debug_assert_eq!(self.view.state.segments().len(), kept);
        self.view.generation = generation;
        self.view.file_len = len;
        self.compacted_len = len;
        self.records_in_file = kept as u64;
        self.declined_below = 0;
        // IMPORTANT: fsync the directory, or the rename may not survive a crash
        // while appends already go to the new file.
        let synced = crate::failpoint::hit("journal.compact.dirsync")
            .map_err(|e| Error::io(&self.dir, "fsync directory", e))
            .and_then(|()| crate::durable::fsync_dir(&self.dir));
        if let Err(e) = synced {
            return Err(self.poison(format!("fsync of journal directory after compaction: {e}")));
        }
        Ok(())
    }

    /// Compacts when the file is above `compact_after_bytes`, at least twice
    /// its size right after the previous compaction, holds at least twice
    /// as many records as there are live segments (a compaction leaves one
    /// snapshot per live segment), and the rewrite would make it at least an
    /// eighth shorter (computed, not written; a decline holds until the
    /// file grows by a quarter). A journal whose segments are still early
    /// in their upload (a backlog after an outage) is not rewritten: its
    /// snapshot frames would be larger than its records. Returns whether it
    /// did.
    pub fn maybe_compact(&mut self) -> Result<bool> {
        self.check_poisoned()?;
        let len = self.view.file_len;
        if len <= self.opts.compact_after_bytes
            || len < self.compacted_len.saturating_mul(2)
            || len < self.declined_below
            || self.records_in_file < self.view.state.live_segments().saturating_mul(2)
        {
            return Ok(false);
        }
        // What the rewrite would leave, to the byte (a pass over the live
        // segments, no copy): an eighth shorter at least, or it is not
        // done, and not considered again until the file grew by a quarter.
        // Snapshots are larger than the records they replace for segments
        // still early in their life (a backlog part uploaded: Sealed and
        // Uploading records of about 300 and 170 bytes, a snapshot of 390
        // to 500); Committed segments kept locally shrink to about four
        // fifths.
        let after = compact::snapshot_len(&self.view.state)?;
        if len.saturating_mul(7) < after.saturating_mul(8) {
            self.declined_below = len.saturating_add(len / 4);
            tracing::debug!(
                len,
                after,
                "journal not compacted: the rewrite would not shorten it by an eighth"
            );
            return Ok(false);
        }
        self.compact()?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::SegmentState;
    use crate::journal::record::tests::{happy_path, meta, uploading};
    use crate::journal::{HEADER_LEN, log_path};

    fn open(dir: &Path) -> (Journal, ReplayReport) {
        Journal::open(dir, JournalOptions::default()).unwrap()
    }

    #[test]
    fn creates_directory_and_empty_journal() {
        let tmp = tempfile::tempdir().unwrap();
        let (j, report) = open(tmp.path());
        assert!(log_path(tmp.path()).is_file());
        assert_eq!(report.segments, 0);
        assert_eq!(report.generation, 1);
        assert_eq!(j.max_segment_id(), None);
        assert_eq!(
            j.file_len(),
            std::fs::metadata(log_path(tmp.path())).unwrap().len()
        );
        assert!(j.file_len() > HEADER_LEN as u64, "holds a MaxId frame");
    }

    #[test]
    fn missing_data_dir_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Journal::open(&tmp.path().join("nope"), JournalOptions::default());
        assert!(matches!(r, Err(Error::Io { .. })));
    }

    #[test]
    fn second_writer_is_locked_out() {
        let tmp = tempfile::tempdir().unwrap();
        let (_j, _) = open(tmp.path());
        let r = Journal::open(tmp.path(), JournalOptions::default());
        assert!(matches!(r, Err(Error::Locked { .. })), "{r:?}");
        // Readers are fine.
        Journal::open_read_only(tmp.path()).unwrap();
    }

    #[test]
    fn group_commit_is_one_frame_and_replays_equal() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        let before = j.file_len();
        let mut batch = happy_path(1);
        batch.extend(happy_path(2)[..3].iter().cloned());
        j.append(&batch).unwrap();
        let bytes = std::fs::read(log_path(tmp.path())).unwrap();
        assert_eq!(bytes.len() as u64, j.file_len());
        let d = crate::journal::decode_file(&bytes).unwrap();
        let last = d.frames.last().unwrap();
        assert_eq!(last.offset, before, "the whole batch is the one new frame");
        assert_eq!(last.frame, Frame::Batch(batch.clone()));

        let in_memory = j.view().clone();
        drop(j);
        let (j, report) = open(tmp.path());
        assert_eq!(report.records_replayed, batch.len() as u64);
        assert_eq!(report.torn_tail_at, None);
        assert_eq!(j.view(), &in_memory);
        let (ro, _) = Journal::open_read_only(tmp.path()).unwrap();
        assert_eq!(&ro, &in_memory);
    }

    #[test]
    fn rejected_batch_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        j.append(&[Record::Sealed { meta: meta(1) }]).unwrap();
        let len = j.file_len();
        let state = j.view().clone();
        let bad = [
            uploading(1, 1, None),
            Record::Committed { id: SegmentId(1) },
        ];
        assert!(matches!(j.append(&bad), Err(Error::InvalidInput(_))));
        assert!(matches!(
            j.append(&[Record::Sealed { meta: meta(1) }]),
            Err(Error::InvalidInput(_))
        ));
        assert_eq!(j.file_len(), len);
        assert_eq!(std::fs::metadata(log_path(tmp.path())).unwrap().len(), len);
        assert_eq!(j.view(), &state);
        assert!(
            !j.is_poisoned(),
            "a rejected batch is the caller's bug, not an I/O failure"
        );
        j.append(&[uploading(1, 1, None)]).unwrap();
        assert_eq!(j.get(SegmentId(1)).unwrap().state, SegmentState::Uploading);
    }

    #[test]
    fn oversized_record_is_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = JournalOptions {
            max_record_bytes: 300,
            ..Default::default()
        };
        let (mut j, _) = Journal::open(tmp.path(), opts).unwrap();
        j.append(&[Record::Sealed { meta: meta(1) }]).unwrap();
        let big = Record::Quarantined {
            id: SegmentId(1),
            reason: "x".repeat(400),
        };
        let len = j.file_len();
        assert!(matches!(j.append(&[big]), Err(Error::InvalidInput(_))));
        assert_eq!(j.file_len(), len);
        for max in [0, crate::journal::MAX_RECORD_BYTES_LIMIT + 1] {
            let opts = JournalOptions {
                max_record_bytes: max,
                ..Default::default()
            };
            assert!(matches!(
                Journal::open(tmp.path(), opts),
                Err(Error::InvalidInput(_))
            ));
        }
    }

    /// What another hand can do to `journal.log` under a running journal,
    /// and the bytes the file holds after it.
    fn meddle(how: &str, log: &Path, dir: &Path) -> Vec<u8> {
        let before = fs::read(log).unwrap();
        let open = || std::fs::OpenOptions::new().write(true).open(log).unwrap();
        match how {
            // Cut in place: same file, fewer bytes than acknowledged.
            "cut" => {
                open().set_len(before.len() as u64 - 3).unwrap();
                before[..before.len() - 3].to_vec()
            }
            // Extended in place (another writer's frame, or a restore of a
            // longer copy that kept the inode).
            "extended" => {
                use std::io::Write as _;
                let mut f = std::fs::OpenOptions::new().append(true).open(log).unwrap();
                f.write_all(b"xyz").unwrap();
                [&before[..], b"xyz"].concat()
            }
            // Same length, written in place (another journal's frame over
            // ours). Change times are at least a clock tick apart.
            "written" => {
                std::thread::sleep(std::time::Duration::from_millis(20));
                use std::os::unix::fs::FileExt as _;
                let last = before.len() as u64 - 1;
                open().write_all_at(&[before[last as usize]], last).unwrap();
                before.clone()
            }
            // A copy put in its place (same bytes, another file).
            "replaced" => {
                let copy = dir.join("copy");
                fs::write(&copy, &before).unwrap();
                fs::rename(&copy, log).unwrap();
                before.clone()
            }
            // Removed: the next batch cannot open it.
            "removed" => {
                fs::rename(log, dir.join("aside")).unwrap();
                Vec::new()
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_journal_changed_under_the_process_poisons_and_is_left_alone() {
        for how in ["cut", "extended", "written", "replaced", "removed"] {
            for compact in [false, true] {
                let tmp = tempfile::tempdir().unwrap();
                let (mut j, _) = open(tmp.path());
                j.append(&[Record::Sealed { meta: meta(1) }]).unwrap();
                j.append(&[uploading(1, 1, None)]).unwrap();
                let log = log_path(tmp.path());
                let after = meddle(how, &log, tmp.path());
                let r = if compact {
                    j.compact()
                } else {
                    j.append(&[Record::Sealed { meta: meta(2) }])
                };
                let Err(Error::Poisoned(why)) = r else {
                    panic!("{how} compact={compact}: {r:?}")
                };
                if how != "removed" {
                    assert!(why.contains("tierindex fsck"), "{how}: {why}");
                    assert_eq!(fs::read(&log).unwrap(), after, "{how}: nothing written");
                } else {
                    assert!(!log.exists(), "{how}: nothing created");
                }
                assert!(
                    !tmp.path().join("journal").join(TMP_FILE).exists(),
                    "{how}: no compaction file left"
                );
                assert!(matches!(j.append(&[]), Err(Error::Poisoned(_))));
                assert!(j.get(SegmentId(2)).is_none(), "{how}: not acknowledged");
            }
        }
    }

    /// What backup tools and operators do to a file's metadata alone does
    /// not poison the journal: a chmod, an atime restore, a hard link.
    #[test]
    fn metadata_changes_alone_do_not_poison_the_journal() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        let log = log_path(tmp.path());
        j.append(&[Record::Sealed { meta: meta(1) }]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::set_permissions(&log, fs::Permissions::from_mode(0o600)).unwrap();
        let f = File::open(&log).unwrap();
        f.set_times(fs::FileTimes::new().set_accessed(std::time::SystemTime::UNIX_EPOCH))
            .unwrap();
        fs::hard_link(&log, tmp.path().join("snapshot")).unwrap();
        j.append(&[uploading(1, 1, None)]).unwrap();
        j.compact().unwrap();
        j.append(&[Record::Sealed { meta: meta(2) }]).unwrap();
        drop(j);
        let (j, _) = open(tmp.path());
        assert_eq!(j.segments().len(), 2);
    }

    #[test]
    fn the_journal_keeps_no_descriptor_and_its_own_writes_do_not_poison_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        let log = log_path(tmp.path());
        let real = log.canonicalize().unwrap();
        let held = || {
            fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
                .filter(|p| *p == real)
                .count()
        };
        for i in 1..=50 {
            j.append(&[Record::Sealed { meta: meta(i) }]).unwrap();
            if i % 10 == 0 {
                j.compact().unwrap();
            }
        }
        // Other tests in this binary may hold their own journals' files,
        // never this one.
        assert_eq!(held(), 0, "no descriptor on {}", real.display());
        drop(j);
        let (j, _) = open(tmp.path());
        assert_eq!(j.segments().len(), 50);
    }

    #[test]
    fn failed_write_poisons_forever() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        j.append(&[Record::Sealed { meta: meta(1) }]).unwrap();
        let state = j.view().clone();
        // A read-only descriptor makes the next pwrite fail with EBADF.
        j.test_file = Some(File::open(log_path(tmp.path())).unwrap());
        let r = j.append(&[uploading(1, 1, None)]);
        assert!(matches!(r, Err(Error::Poisoned(_))), "{r:?}");
        assert_eq!(j.view(), &state, "nothing unacknowledged becomes visible");
        // Even with a good descriptor back, nothing is retried or accepted.
        j.test_file = None;
        assert!(matches!(
            j.append(&[uploading(1, 1, None)]),
            Err(Error::Poisoned(_))
        ));
        assert!(matches!(j.append(&[]), Err(Error::Poisoned(_))));
        assert!(matches!(j.compact(), Err(Error::Poisoned(_))));
        assert!(matches!(j.maybe_compact(), Err(Error::Poisoned(_))));
        drop(j);
        let (j, _) = open(tmp.path());
        assert_eq!(j.view(), &state);
    }

    #[test]
    fn torn_tail_is_cut_and_appends_continue() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        j.append(&[Record::Sealed { meta: meta(1) }]).unwrap();
        let good = j.file_len();
        j.append(&[uploading(1, 1, None)]).unwrap();
        drop(j);
        let path = log_path(tmp.path());
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(good + 5).unwrap();
        let (mut j, report) = open(tmp.path());
        assert_eq!(report.torn_tail_at, Some(good));
        assert_eq!(report.truncated_bytes, 5);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
        assert_eq!(j.get(SegmentId(1)).unwrap().state, SegmentState::Sealed);
        j.append(&[uploading(1, 1, None)]).unwrap();
        drop(j);
        let (j, report) = open(tmp.path());
        assert_eq!(report.torn_tail_at, None);
        assert_eq!(j.get(SegmentId(1)).unwrap().state, SegmentState::Uploading);
    }

    /// A zero-extended journal (written zeros, then a sparse terabyte) is
    /// a torn tail: cut by a read-write open, counted by a read-only one,
    /// without reading the zeros into memory (a 2 TB sparse journal made
    /// every command fail with "out of memory").
    #[test]
    fn a_zero_extended_sparse_journal_is_cut_without_being_read_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        j.append(&happy_path(1)[..2]).unwrap();
        let good = j.file_len();
        drop(j);
        let path = log_path(tmp.path());
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        use std::os::unix::fs::FileExt as _;
        f.write_all_at(&vec![0u8; 3 << 20], good).unwrap();
        let big = good + (1u64 << 40);
        f.set_len(big).unwrap();
        drop(f);
        let (view, report) = Journal::open_read_only(tmp.path()).unwrap();
        assert_eq!(report.truncated_bytes, big - good);
        assert_eq!(report.torn_tail_at, Some(good));
        assert_eq!(view.pending().len(), 1);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), big, "read-only");
        let (mut j, report) = open(tmp.path());
        assert_eq!(report.truncated_bytes, big - good);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
        j.append(&happy_path(1)[2..3]).unwrap();
        drop(j);
        let (_, report) = open(tmp.path());
        assert_eq!(report.truncated_bytes, 0);
        assert_eq!(report.torn_tail_at, None);
    }

    /// A sparse journal with one byte written past 3 GiB (helper-52): not
    /// read into memory (3.15 GB of RSS, then an abort under a memory
    /// limit), refused with what to do. A journal never has a hole before
    /// its last data, whatever its size (no bound on a large live state).
    #[test]
    fn a_journal_with_data_past_its_bound_is_refused_unread() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        j.append(&happy_path(1)[..2]).unwrap();
        drop(j);
        let path = log_path(tmp.path());
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        use std::os::unix::fs::FileExt as _;
        f.write_all_at(b"x", 3 << 30).unwrap();
        drop(f);
        for e in [
            Journal::open_read_only(tmp.path()).map(drop).unwrap_err(),
            Journal::open(tmp.path(), JournalOptions::default())
                .map(drop)
                .unwrap_err(),
        ] {
            assert!(e.to_string().contains("has a hole"), "{e}");
            assert!(e.to_string().contains("truncate -s"), "{e}");
        }
    }

    /// The highest id read frame by frame is the replayed journal's,
    /// before and after a compaction (Released segments dropped, their ids
    /// kept), and a frame that does not decode is an error.
    #[test]
    fn max_segment_id_on_disk_is_the_replayed_max() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = open(tmp.path());
        assert_eq!(Journal::max_segment_id_on_disk(tmp.path()).unwrap(), None);
        for id in 1..=5 {
            j.append(&happy_path(id)).unwrap();
        }
        j.append(&[Record::Sealed { meta: meta(9) }]).unwrap();
        assert_eq!(
            Journal::max_segment_id_on_disk(tmp.path()).unwrap(),
            Some(SegmentId(9))
        );
        j.append(&[Record::Sealed { meta: meta(12) }]).unwrap();
        j.append(&happy_path(12)[1..]).unwrap();
        j.compact().unwrap();
        // 9, and 12: the newest Released segment is kept.
        assert_eq!(j.segments().len(), 2);
        assert_eq!(
            Journal::max_segment_id_on_disk(tmp.path()).unwrap(),
            Some(SegmentId(12))
        );
        assert_eq!(j.max_segment_id(), Some(SegmentId(12)));
        drop(j);
        let log = log_path(tmp.path());
        let good = std::fs::read(&log).unwrap();
        // A torn last append: the highest id before it, as the read-only
        // replay gives.
        let mut torn = good.clone();
        torn.extend_from_slice(&[7, 0, 0, 0, 1, 2]);
        std::fs::write(&log, &torn).unwrap();
        assert_eq!(
            Journal::max_segment_id_on_disk(tmp.path()).unwrap(),
            Some(SegmentId(12))
        );
        let mut zeros = good.clone();
        zeros.extend_from_slice(&[0; 64]);
        std::fs::write(&log, &zeros).unwrap();
        assert_eq!(
            Journal::max_segment_id_on_disk(tmp.path()).unwrap(),
            Some(SegmentId(12))
        );
        // Damage in the middle: an error, as for the read-only replay.
        let (mut j, _) = open(tmp.path());
        j.append(&[Record::Sealed { meta: meta(14) }]).unwrap();
        drop(j);
        let mut damaged = std::fs::read(&log).unwrap();
        damaged[30] ^= 0x20;
        std::fs::write(&log, &damaged).unwrap();
        assert!(Journal::open_read_only(tmp.path()).is_err());
        assert!(Journal::max_segment_id_on_disk(tmp.path()).is_err());
    }

    #[test]
    fn read_only_open_never_modifies() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(
            Journal::open_read_only(tmp.path()).is_err(),
            "no journal yet"
        );
        assert!(!journal_dir(tmp.path()).exists(), "and nothing was created");
        let (mut j, _) = open(tmp.path());
        j.append(&happy_path(1)[..2]).unwrap();
        drop(j);
        let path = log_path(tmp.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"torn");
        std::fs::write(&path, &bytes).unwrap();
        std::fs::write(journal_dir(tmp.path()).join(TMP_FILE), b"half").unwrap();
        let (view, report) = Journal::open_read_only(tmp.path()).unwrap();
        assert_eq!(report.truncated_bytes, 4);
        assert_eq!(view.file_len(), bytes.len() as u64 - 4);
        assert_eq!(view.pending().len(), 1);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert!(journal_dir(tmp.path()).join(TMP_FILE).exists());
    }

    #[test]
    fn bad_header_is_an_error_and_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        drop(open(tmp.path()));
        let path = log_path(tmp.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let r = Journal::open(tmp.path(), JournalOptions::default());
        assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    /// Three appended frames; their offsets.
    fn three_frames(dir: &Path) -> Vec<u64> {
        let (mut j, _) = open(dir);
        let mut at = Vec::new();
        for rec in &happy_path(1)[..3] {
            at.push(j.file_len());
            j.append(std::slice::from_ref(rec)).unwrap();
        }
        at
    }

    #[test]
    fn damage_in_the_middle_is_refused_not_cut() {
        let tmp = tempfile::tempdir().unwrap();
        let at = three_frames(tmp.path());
        let path = log_path(tmp.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at[1] as usize + 10] ^= 0x20; // the Uploading frame's payload
        std::fs::write(&path, &bytes).unwrap();
        for r in [
            Journal::open(tmp.path(), JournalOptions::default()).map(|_| ()),
            Journal::open_read_only(tmp.path()).map(|_| ()),
        ] {
            let e = r.unwrap_err();
            assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains("not a torn tail"), "{msg}");
            assert!(msg.contains("fsck --repair"), "{msg}");
        }
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing cut");
        let cuts = std::fs::read_dir(journal_dir(tmp.path()))
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                n.to_string_lossy().contains("cut-at")
            })
            .count();
        assert_eq!(cuts, 0);
    }

    #[test]
    fn damage_in_the_last_frame_is_a_torn_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let at = three_frames(tmp.path());
        let path = log_path(tmp.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at[2] as usize + 10] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let (j, report) = open(tmp.path());
        assert_eq!(report.torn_tail_at, Some(at[2]));
        assert_eq!(report.damage, None);
        assert_eq!(j.get(SegmentId(1)).unwrap().state, SegmentState::Uploading);
    }

    /// A frame with a good CRC around `payload`.
    fn raw_frame(payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_le_bytes();
        let mut h = crc32fast::Hasher::new();
        h.update(&len);
        h.update(payload);
        let mut out = len.to_vec();
        out.extend_from_slice(&h.finalize().to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn intact_frames_that_do_not_decode_or_are_newer_are_refused() {
        type IsWanted = fn(&Error) -> bool;
        let cases: [(&[u8], IsWanted); 3] = [
            (br#"{"v":1,"Bogus":[]}"#, |e| {
                matches!(e, Error::Corrupt { .. })
            }),
            (br#"{"v":9,"Batch":[{"Future":{"id":1}}]}"#, |e| {
                matches!(e, Error::Unsupported(_))
            }),
            // Intact and decodable, but a Verified for an unknown segment.
            (br#"{"v":1,"Batch":[{"Verified":{"id":77}}]}"#, |e| {
                matches!(e, Error::Corrupt { .. })
            }),
        ];
        for (payload, want) in cases {
            let tmp = tempfile::tempdir().unwrap();
            three_frames(tmp.path());
            let path = log_path(tmp.path());
            let mut bytes = std::fs::read(&path).unwrap();
            bytes.extend_from_slice(&raw_frame(payload));
            std::fs::write(&path, &bytes).unwrap();
            let e = Journal::open(tmp.path(), JournalOptions::default()).unwrap_err();
            assert!(want(&e), "{}: {e:?}", String::from_utf8_lossy(payload));
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing cut");
        }
    }

    #[test]
    fn a_format_1_journal_is_read_and_upgraded() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(journal_dir(tmp.path())).unwrap();
        // Format 1: no record version in the payload.
        let mut bytes = crate::journal::encode_header_version(1, 3).to_vec();
        bytes.extend(raw_frame(br#"{"MaxId":null}"#));
        let sealed = serde_json::to_string(&Frame::Batch(happy_path(1)[..2].to_vec())).unwrap();
        bytes.extend(raw_frame(sealed.as_bytes()));
        std::fs::write(log_path(tmp.path()), &bytes).unwrap();
        let (j, report) = open(tmp.path());
        assert_eq!(report.format_version, 1);
        assert_eq!(j.get(SegmentId(1)).unwrap().state, SegmentState::Uploading);
        drop(j);
        let now = std::fs::read(log_path(tmp.path())).unwrap();
        let d = crate::journal::decode_file(&now).unwrap();
        assert_eq!(d.header.version, crate::journal::FORMAT_VERSION);
        assert_eq!(d.header.generation, 4, "rewritten by a compaction");
        let (j, report) = open(tmp.path());
        assert_eq!(report.format_version, crate::journal::FORMAT_VERSION);
        assert_eq!(j.get(SegmentId(1)).unwrap().state, SegmentState::Uploading);
    }
}
