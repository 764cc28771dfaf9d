//! The upload journal: an append-only, checksummed, fsynced log of where each
//! sealed segment is in its upload life, so that a crash at any point resumes
//! exactly where it stopped.
//!
//! ## Layout
//! - [`record`]: the records, the per-segment state they fold into, and the
//!   transition rules (shared by `append` and replay).
//! - `replay`: the bytes of `journal.log` (header, frames) and the pure
//!   replay function from bytes to state ([`decode_file`], [`replay_bytes`]).
//! - `writer`: [`Journal`]: open (create, clean up, replay, truncate the torn
//!   tail), group-committed `append`, poisoning.
//! - `compact`: rewriting the live state into a fresh file.
//!
//! Files, under the data directory: `journal/journal.log` and, only while a
//! compaction runs (or after one was interrupted), `journal/journal.log.tmp`.
//! The byte format is in `docs/format/journal.md`.
//!
//! ## Consistency
//! `append` validates the whole batch against the current state before it
//! writes anything; an invalid record rejects the batch with
//! [`Error::InvalidInput`] and leaves no trace. The
//! in-memory state changes only after the batch is durable, so what `get` and
//! `segments` show is always a prefix of what replay will rebuild.
//!
//! ## Durability and poisoning
//! One batch is one frame, written with one `pwrite` and made durable with one
//! `fdatasync` before `append` returns (group commit). A batch is replayed
//! whole or not at all: its single CRC covers every record in it. If a write or
//! an fsync fails, the kernel may already have dropped the dirty pages, so
//! retrying could report success for data that is gone; the journal is
//! poisoned instead and every later call returns
//! [`Error::Poisoned`]. Restart, and replay keeps what
//! was durable.
//!
//! ## Crash consistency
//! Replay stops at the first frame that is short, has a bad length or CRC, does
//! not decode, or is an illegal transition. Only a torn tail (a bad frame with
//! no intact frame after it: the last append, interrupted) is truncated by
//! `open`. An intact frame that does not decode, is newer or breaks the state
//! machine, or a bad frame followed by intact ones, stops `open` with an error
//! and cuts nothing; `rebuild` (`tierindex fsck --repair`) rebuilds the
//! journal from every intact frame and the segment files. Compaction writes the live state to `journal.log.tmp`, fsyncs it,
//! renames it over `journal.log` and fsyncs the directory; a `.tmp` seen at open
//! is an interrupted compaction and is removed (the old `journal.log` was never
//! modified). Every step and what a crash right after it leaves is tabled in
//! `docs/format/journal.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::segment::SegmentId;

mod compact;
pub mod rebuild;
pub mod record;
mod replay;
mod writer;

#[cfg(any(test, feature = "testing"))]
pub use rebuild::rebuild;
pub use rebuild::{RebuildReport, committed_in_intact_frames, rebuild_in};
// Re-exported for the tests (feature `testing`); the crate uses a part.
#[cfg_attr(not(any(test, feature = "testing")), allow(unused_imports))]
pub use record::{Frame, JournalState, PendingSummary, Record, SegmentRecord, SegmentState};
// Re-exported for the tests (feature `testing`); the crate uses a part.
#[cfg_attr(not(any(test, feature = "testing")), allow(unused_imports))]
pub use replay::{
    DecodedFile, DecodedFrame, FORMAT_VERSION, FORMAT_VERSION_MIN, FRAME_HEADER_LEN, FRAME_LEN_MAX,
    HEADER_LEN, Header, MAGIC, RECORD_VERSION, Replayed, TailError, TailKind, decode_file,
    decode_header, encode_frame, encode_header, encode_header_version, replay_bytes,
};
pub use writer::Journal;

/// Name of the journal's directory inside the data directory.
pub const JOURNAL_DIR: &str = "journal";
/// The journal file inside [`JOURNAL_DIR`].
pub const LOG_FILE: &str = "journal.log";
/// Where compaction builds the next journal file before renaming it.
pub const TMP_FILE: &str = "journal.log.tmp";
/// Upper bound for [`JournalOptions::max_record_bytes`].
pub const MAX_RECORD_BYTES_LIMIT: u32 = 1 << 20;

/// Reads a journal file whole except a tail of zero bytes: returns the
/// bytes up to its last non-zero byte and the length of the zeros after
/// them. A zero-extended or sparse journal (`truncate -s 4G`: its replay
/// would cut the zeros as a torn tail anyway) was read into memory whole:
/// 4 GiB of RSS for 3 minutes, and a 2 TB one failed every command,
/// `fsck --repair` included, with "out of memory". Holes are skipped
/// without being read (`SEEK_DATA`/`SEEK_HOLE`, where the filesystem has
/// them); written zeros are read backwards 1 MiB at a time, never held.
pub(crate) fn read_trimmed(file: &std::fs::File) -> std::io::Result<(Vec<u8>, u64)> {
    use std::os::unix::fs::FileExt as _;
    let len = file.metadata()?.len();
    let data_end = data_end(file, len);
    // The journal is written in order and cut back after a torn tail: it
    // never has a hole before its last data. One that has (`truncate -s
    // 3G` and a byte written past it) was extended by something else; its
    // bytes up to the hole would be read into memory, gigabytes of zeros.
    let hole = first_hole(file, len);
    if hole < data_end {
        return Err(std::io::Error::other(format!(
            "it has a hole from byte {hole} and data after it (up to byte {data_end}): not \
             written by tierindex, which never leaves one (a sparse extension by something \
             else?). Not read. Its records end before the hole: `truncate -s {hole}` on it \
             keeps every one of them (copy the file aside first)"
        )));
    }
    let mut end = 0;
    let mut chunk = vec![0u8; (data_end.min(1 << 20)) as usize];
    let mut pos = data_end;
    while pos > 0 {
        let start = pos.saturating_sub(chunk.len() as u64);
        let buf = &mut chunk[..(pos - start) as usize];
        file.read_exact_at(buf, start)?;
        if let Some(i) = buf.iter().rposition(|b| *b != 0) {
            end = start + i as u64 + 1;
            break;
        }
        pos = start;
    }
    drop(chunk);
    let n = usize::try_from(end).map_err(std::io::Error::other)?;
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(n).map_err(std::io::Error::other)?;
    bytes.resize(n, 0);
    file.read_exact_at(&mut bytes, 0)?;
    Ok((bytes, len - end))
}

/// Where the file's first hole starts: `len` when it has none, or where
/// the filesystem does not say.
fn first_hole(file: &std::fs::File, len: u64) -> u64 {
    use std::os::fd::AsRawFd as _;
    // SAFETY: lseek on a descriptor this function borrows; it moves only
    // the file offset, which nothing here relies on (reads are positional).
    let hole = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_HOLE) };
    if hole < 0 { len } else { (hole as u64).min(len) }
}

/// The end of the file's last data region (past it only a hole), or `len`
/// where the filesystem does not say.
fn data_end(file: &std::fs::File, len: u64) -> u64 {
    use std::os::fd::AsRawFd as _;
    let fd = file.as_raw_fd();
    let mut end = 0u64;
    let mut off = 0u64;
    while off < len {
        let Ok(o) = libc::off_t::try_from(off) else {
            return len;
        };
        // SAFETY: lseek on a descriptor this function borrows; it moves
        // only the file offset, which nothing here relies on (reads are
        // positional).
        let data = unsafe { libc::lseek(fd, o, libc::SEEK_DATA) };
        if data < 0 {
            return match std::io::Error::last_os_error().raw_os_error() {
                // No data at or after `off`: the rest is a hole.
                Some(libc::ENXIO) => end,
                _ => len,
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 || hole <= data {
            return len;
        }
        end = (hole as u64).min(len);
        off = hole as u64;
    }
    end.min(len)
}

/// `DATA_DIR/journal`.
pub fn journal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(JOURNAL_DIR)
}

/// `DATA_DIR/journal/journal.log`.
pub fn log_path(data_dir: &Path) -> PathBuf {
    journal_dir(data_dir).join(LOG_FILE)
}

/// Tuning for a read-write [`Journal`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalOptions {
    /// `maybe_compact` rewrites the file once it is larger than this, at
    /// least twice as large as right after the previous compaction (so a
    /// live state bigger than the threshold does not compact on every call),
    /// and when the rewrite would shorten it: see [`Journal::maybe_compact`].
    pub compact_after_bytes: u64,
    /// Largest JSON encoding of one record `append` accepts. At most
    /// [`MAX_RECORD_BYTES_LIMIT`]. Replay does not use it (it uses the format's
    /// own [`FRAME_LEN_MAX`]), so lowering it never hides written records.
    pub max_record_bytes: u32,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            compact_after_bytes: 4 << 20,
            max_record_bytes: 64 << 10,
        }
    }
}

impl JournalOptions {
    fn validate(&self) -> Result<()> {
        if self.max_record_bytes == 0 || self.max_record_bytes > MAX_RECORD_BYTES_LIMIT {
            return Err(Error::InvalidInput(format!(
                "journal max_record_bytes is {}; use 1..={MAX_RECORD_BYTES_LIMIT}",
                self.max_record_bytes
            )));
        }
        Ok(())
    }
}

/// What opening a journal found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayReport {
    /// Records applied from batch frames (snapshot frames not counted).
    pub records_replayed: u64,
    /// Bytes after the last good frame: removed by a read-write open, only
    /// counted by a read-only one.
    pub truncated_bytes: u64,
    /// Offset of the first rejected byte, when there was a tail to cut.
    pub torn_tail_at: Option<u64>,
    /// Segments in the rebuilt table.
    pub segments: usize,
    /// Segments loaded from compaction snapshot frames.
    pub snapshot_segments: u64,
    /// Generation from the file header.
    pub generation: u64,
    /// Why replay stopped early, if it did.
    pub tail: Option<TailError>,
    /// A `journal.log.tmp` from an interrupted compaction was removed.
    pub removed_tmp: bool,
    /// Set when what replay stopped at is not a torn tail: an intact frame
    /// that does not decode, is newer or breaks the state machine, or a bad
    /// frame followed by intact ones. `Journal::open` then refuses and cuts
    /// nothing.
    #[serde(default)]
    pub damage: Option<JournalDamage>,
    /// Format version from the file header.
    #[serde(default)]
    pub format_version: u16,
}

/// Damage in a journal file that is not a torn tail (see
/// [`ReplayReport::damage`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalDamage {
    /// Offset of the first frame replay could not accept.
    pub offset: u64,
    pub kind: TailKind,
    pub detail: String,
    /// Offset of the first decodable frame after it, if any.
    pub resync_at: Option<u64>,
    /// Intact frames that follow each other from `resync_at`.
    pub frames_after: u64,
}

impl JournalDamage {
    /// The error `Journal::open` returns for it: what was found and what to
    /// do. Nothing was cut.
    pub fn to_error(&self, log: &Path) -> Error {
        let after = match self.resync_at {
            Some(at) => format!(
                "; {} intact frame(s) follow from byte {at}, so this is not a torn tail",
                self.frames_after
            ),
            None => String::new(),
        };
        let what = match self.kind {
            TailKind::Newer => {
                return Error::Unsupported(format!(
                    "journal {}: the frame at byte {} is of a newer record version ({}); \
                     nothing was cut. Use the tierindex version that wrote it",
                    log.display(),
                    self.offset,
                    self.detail
                ));
            }
            TailKind::Undecodable => "holds an intact frame this build cannot decode",
            TailKind::Inconsistent => "holds an intact frame that breaks the upload state machine",
            _ => "is damaged",
        };
        Error::corrupt(
            format!("journal {}", log.display()),
            format!(
                "{what} at byte {} ({:?}: {}){after}. Nothing was cut and the journal was not \
                 opened. Keep the data directory as it is (no segment file or object is lost) \
                 and run `tierindex fsck --repair` on it: it rebuilds the journal from every \
                 intact frame and the segment files, and keeps the damaged file as \
                 journal.log.damaged.<ms>",
                self.offset, self.kind, self.detail
            ),
        )
    }
}

/// A replayed journal that cannot be written: what `tierindex status` and
/// `inspect` use. Also the read side of a [`Journal`].
#[derive(Clone, Debug, PartialEq)]
pub struct JournalView {
    pub(crate) state: JournalState,
    pub(crate) generation: u64,
    /// Length of the valid prefix of the file (all of it for a writer).
    pub(crate) file_len: u64,
}

impl JournalView {
    pub fn get(&self, id: SegmentId) -> Option<&SegmentRecord> {
        self.state.get(id)
    }

    pub fn segments(&self) -> &BTreeMap<SegmentId, SegmentRecord> {
        self.state.segments()
    }

    /// Segments not yet Verified-or-later and not Quarantined, oldest id first.
    #[cfg(any(test, feature = "testing"))]
    pub fn pending(&self) -> Vec<&SegmentRecord> {
        self.state.pending()
    }

    /// Highest id ever journaled, including segments compaction dropped.
    pub fn max_segment_id(&self) -> Option<SegmentId> {
        self.state.max_segment_id()
    }

    /// Highest entry offset ever journaled (kept through compaction).
    pub fn max_offset(&self) -> Option<u64> {
        self.state.max_offset()
    }

    /// Bytes of the journal file that hold valid data.
    #[cfg(any(test, feature = "testing"))]
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Header generation: 1 for a new journal, +1 per compaction.
    #[cfg(any(test, feature = "testing"))]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn state(&self) -> &JournalState {
        &self.state
    }
}
