//! `ACKED_ACTIVE`: which segment last had entries acknowledged by a flush,
//! kept durably outside that segment's own file.
//!
//! An active segment's file is its only record until it is sealed and
//! journaled: the newest one removed, emptied or zeroed (an operator's
//! `rm`, a restore that missed it, damage) used to leave nothing that said
//! it had existed, and start-up, `fsck` and `drain` all said clean while
//! every entry it held was gone (helper-82 F1). Older ones are caught by a
//! later file (files are created in id order); the newest has none.
//!
//! So the first flush that acknowledges entries of a segment (the newest
//! one holding any) writes this mark before it returns: the segment's id,
//! the offset of its first entry and how many of its items that flush made
//! durable. One `pwrite` and one `fdatasync` per segment, not per flush.
//! Start-up (`datadir::recover_checking`) then knows that segment held at
//! least that many acknowledged entries: its file gone, emptied, zeroed or
//! holding fewer valid items is a loss, reported by number and recorded in
//! `quarantine/`, never taken for a file that never held an entry.
//!
//! Layout (docs/format/data-dir.md): two 64-byte slots, written in turn; a
//! torn write leaves the other slot valid (the previous mark: the flush
//! that wrote the torn one had not returned).
//!
//! ```text
//! 0   8  magic "TIXACKD1"
//! 8   8  seq (u64 LE; the slot is seq % 2; the valid slot with the higher seq wins)
//! 16  8  segment id
//! 24  8  offset of the segment's first entry
//! 32  8  items acknowledged when the mark was written
//! 40  8  flags (bit 0: a loss of this segment was recorded in quarantine/)
//! 48  8  created_ms of the segment's file header (u64 LE; 0: not known, a
//!        mark written by a build before this field)
//! 56  4  zero
//! 60  4  CRC-32 (crc32fast) of bytes 0..60
//! ```
//!
//! The first offset and the header's creation time tell the marked
//! segment's own file from another file of the same id (copied in from
//! another data directory, or from an earlier incarnation of this one:
//! helper-92 F4): such a file holding as many items hid the loss of every
//! acknowledged entry. An older copy of the segment's own file has the
//! same time and first item: only the count tells it.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::segment::SegmentId;

/// The mark's file name, in the data directory's root.
pub const ACKED_FILE: &str = "ACKED_ACTIVE";
const MAGIC: &[u8; 8] = b"TIXACKD1";
const SLOT: usize = 64;
/// Flag: a loss of the marked segment was recorded (in `quarantine/`) by
/// a start-up; later ones do not report it again.
pub const FLAG_LOSS_RECORDED: u64 = 1;
/// Flag: the journal was rebuilt (`fsck --repair`) after it was lost or
/// damaged: whether the marked segment was sealed, committed and released
/// is the store's to say, not the local files' (helper-89 F1: a released
/// segment was called LOST by `fsck` and `status`). Not judged.
pub const FLAG_NOT_JUDGED: u64 = 2;

/// One decoded mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckedMark {
    pub seq: u64,
    pub segment: SegmentId,
    pub first_offset: u64,
    /// The segment file's header `created_ms` (0: not known).
    pub created_ms: u64,
    pub items: u64,
    pub flags: u64,
}

impl AckedMark {
    /// A mark to write (its sequence is set by the writer).
    pub fn of(segment: SegmentId, first_offset: u64, created_ms: u64, items: u64, flags: u64) -> AckedMark {
        AckedMark {
            seq: 0,
            segment,
            first_offset,
            created_ms,
            items,
            flags,
        }
    }

    /// Whether a start-up, `fsck` or `status` judges the marked segment's
    /// file by this mark (not once its loss was recorded, nor after a
    /// journal rebuild).
    pub fn judged(&self) -> bool {
        self.flags & (FLAG_LOSS_RECORDED | FLAG_NOT_JUDGED) == 0
    }

    fn encode(&self) -> [u8; SLOT] {
        let mut b = [0u8; SLOT];
        b[0..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.segment.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.items.to_le_bytes());
        b[40..48].copy_from_slice(&self.flags.to_le_bytes());
        b[48..56].copy_from_slice(&self.created_ms.to_le_bytes());
        let crc = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<AckedMark> {
        if b.len() != SLOT || &b[0..8] != MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[60..64].try_into().ok()?);
        if crc32fast::hash(&b[..60]) != crc || b[56..60].iter().any(|x| *x != 0) {
            return None;
        }
        let u = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
        // More items than any segment holds: not a mark this build wrote
        // (helper-96 H96-3: a CRC-valid count of u64::MAX overflowed the
        // totals).
        if u(32) > u64::from(crate::segment::format::MAX_ITEMS) {
            return None;
        }
        Some(AckedMark {
            seq: u(8),
            segment: SegmentId(u(16)),
            first_offset: u(24),
            created_ms: u(48),
            items: u(32),
            flags: u(40),
        })
    }
}

/// What reading the mark found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Read {
    /// No file: no flush has acknowledged an entry here (or a data
    /// directory from before the mark).
    None,
    Mark(AckedMark),
    /// A file that holds no valid slot: said, not trusted.
    Damaged(String),
}

pub fn path(root: &Path) -> PathBuf {
    root.join(ACKED_FILE)
}

/// Read the mark (at most two slots: a longer file is damage).
pub fn read(root: &Path) -> Result<Read> {
    read_both(root).map(|(r, _)| r)
}

/// [`read`], and the mark before it when it names an older segment and
/// both are judged: the other slot, one sequence below. A flush of the
/// newest segment writes its mark while the segment before it (frozen at
/// the roll) may still wait for its seal: that file removed alone, or
/// swapped for an older copy, is seen only by this older mark (helper-92
/// F7). Once that segment is sealed and journaled the journal accounts for
/// it; any later write of the mark (a newer segment's, a flag) overwrites
/// the slot.
pub fn read_both(root: &Path) -> Result<(Read, Option<AckedMark>)> {
    let p = path(root);
    // A directory, FIFO, socket, device or symbolic link in its place (an
    // operator's or a script's mistake): refused here, before anything is
    // appended, rather than poisoning the writer at its first flush
    // (helper-89 F2).
    match std::fs::symlink_metadata(&p) {
        Ok(m) if !m.file_type().is_file() => {
            return Err(Error::InvalidInput(format!(
                "{}: a {}, not a regular file; tierindex keeps its acknowledged-segment mark \
                 there and never creates anything else: move it out of the data directory and \
                 start again",
                p.display(),
                if m.file_type().is_symlink() {
                    "symbolic link"
                } else {
                    crate::durable::file_kind(&m.file_type())
                }
            )));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Read::None, None)),
        Err(e) => return Err(Error::io(&p, "stat the acknowledged-segment mark", e)),
    }
    let bytes = match crate::durable::read_regular(&p, (2 * SLOT) as u64) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Read::None, None)),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            return Ok((Read::Damaged(format!("{}: {e}", p.display())), None));
        }
        Err(e) => return Err(Error::io(&p, "read the acknowledged-segment mark", e)),
    };
    let slots: Vec<AckedMark> = bytes.chunks(SLOT).filter_map(AckedMark::decode).collect();
    let best = slots.iter().copied().max_by_key(|m| m.seq);
    let older = best.and_then(|b| {
        slots.iter().copied().find(|o| {
            o.seq.wrapping_add(1) == b.seq && o.segment < b.segment && o.judged() && b.judged()
        })
    });
    Ok(match best {
        Some(m) => (Read::Mark(m), older),
        None => (
            Read::Damaged(format!(
                "{}: {} bytes, no valid slot (damaged, or not written by tierindex)",
                p.display(),
                bytes.len()
            )),
            None,
        ),
    })
}

/// Writes the mark, keeping the sequence. One per writer.
#[derive(Debug, Default)]
pub struct MarkWriter {
    last: Option<AckedMark>,
    /// The file's name made durable in the root by this process.
    named: bool,
}

impl MarkWriter {
    /// Starts from what is on disk (a damaged file is overwritten slot by
    /// slot, the sequence starting again above nothing).
    pub fn new(current: Option<AckedMark>) -> MarkWriter {
        MarkWriter {
            last: current,
            named: false,
        }
    }

    /// Whether a flush that acknowledged entries of `segment` must write
    /// the mark first.
    pub fn needed(&self, segment: SegmentId) -> bool {
        match self.last {
            None => true,
            Some(m) => segment > m.segment || (segment == m.segment && !m.judged()),
        }
    }

    /// Write `mark` (its `seq` is set here) durably: one `pwrite` of its
    /// slot and an `fdatasync` (the first time in this process, the root
    /// directory too, for the file's name). A failure is `Poisoned`: a
    /// failed sync is never retried.
    pub fn write(&mut self, root: &Path, mark: AckedMark) -> Result<()> {
        self.write_with_older(root, mark, None)
    }

    /// The last segment marked, if any.
    pub fn last_segment(&self) -> Option<SegmentId> {
        self.last.map(|m| m.segment)
    }

    /// [`write`](Self::write), and in the same `pwrite` the other slot
    /// rewritten as the mark one sequence below for `older` (not flagged):
    /// the segment frozen at the last roll, with the count this flush made
    /// durable of it. Its first mark counted only its first flush; a seal
    /// that had not finished left it judged by that count alone (helper-92
    /// F7: the file swapped for an older copy lost the entries of its later
    /// flushes without a word). The two slots keep their own CRCs: a torn
    /// write leaves the previous content of either.
    pub fn write_with_older(&mut self, root: &Path, mark: AckedMark, older: Option<AckedMark>) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let seq = self.last.map_or(0, |m| m.seq.wrapping_add(1));
        let mark = AckedMark { seq, ..mark };
        let older = older
            .filter(|o| o.segment < mark.segment && seq > 0)
            .map(|o| AckedMark {
                seq: seq - 1,
                flags: 0,
                ..o
            });
        let p = path(root);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&p)
            .map_err(|e| Error::io(&p, "open the acknowledged-segment mark", e))?;
        let meta = f
            .metadata()
            .map_err(|e| Error::io(&p, "stat the acknowledged-segment mark", e))?;
        if !meta.is_file() {
            return Err(Error::InvalidInput(format!(
                "{}: not a regular file (tierindex never creates anything else there: move it \
                 out of the data directory)",
                p.display()
            )));
        }
        // Longer than its two slots (damage): cut back, or it would stay
        // unreadable for ever (helper-89 F3). The fdatasync below covers
        // the new length.
        if meta.len() > (2 * SLOT) as u64 {
            f.set_len((2 * SLOT) as u64).map_err(|e| {
                Error::Poisoned(format!(
                    "cutting the acknowledged-segment mark {} back failed: {e}",
                    p.display()
                ))
            })?;
        }
        let (buf, at) = match older {
            Some(o) => {
                let mut b = [0u8; 2 * SLOT];
                let (i, j) = ((seq % 2) as usize * SLOT, (o.seq % 2) as usize * SLOT);
                b[i..i + SLOT].copy_from_slice(&mark.encode());
                b[j..j + SLOT].copy_from_slice(&o.encode());
                (b.to_vec(), 0)
            }
            None => (mark.encode().to_vec(), (seq % 2) * SLOT as u64),
        };
        crate::durable::at("active.mark.write")
            .write_all_at(&f, &buf, at, &p)
            .map_err(|e| {
                Error::Poisoned(format!("writing the acknowledged-segment mark {} failed: {e}", p.display()))
            })?;
        crate::durable::at("active.mark.fsync")
            .sync_data(&f, &p)
            .map_err(|e| {
                Error::Poisoned(format!("fdatasync of the acknowledged-segment mark {} failed: {e}", p.display()))
            })?;
        if !self.named {
            crate::durable::fsync_dir(root)?;
            self.named = true;
        }
        self.last = Some(mark);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_one_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()).unwrap(), Read::None);
        let mut w = MarkWriter::new(None);
        w.write(d.path(), AckedMark::of(SegmentId(3), 100, 0, 5, 0)).unwrap();
        w.write(d.path(), AckedMark::of(SegmentId(4), 200, 77, 7, 0)).unwrap();
        let Read::Mark(m) = read(d.path()).unwrap() else { panic!() };
        assert_eq!((m.segment, m.first_offset, m.items, m.seq), (SegmentId(4), 200, 7, 1));
        assert_eq!(m.created_ms, 77);
        // Tear slot 1 (the newer): slot 0's mark stands.
        let p = path(d.path());
        let mut b = std::fs::read(&p).unwrap();
        b[SLOT + 20] ^= 0xff;
        std::fs::write(&p, &b).unwrap();
        let Read::Mark(m) = read(d.path()).unwrap() else { panic!() };
        assert_eq!(m.segment, SegmentId(3));
        // Both torn: damaged, said so.
        b[20] ^= 0xff;
        std::fs::write(&p, &b).unwrap();
        assert!(matches!(read(d.path()).unwrap(), Read::Damaged(_)));
        // Longer than two slots: damaged, not read past.
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        assert!(matches!(read(d.path()).unwrap(), Read::Damaged(_)));
    }

    /// The older mark: the other slot, one sequence below, an older
    /// segment, neither flagged; rewritten with a full count in the same
    /// write as a newer segment's mark, and gone after any later write.
    #[test]
    fn the_older_slot_is_read_and_rewritten_with_the_frozen_count() {
        let d = tempfile::tempdir().unwrap();
        let mut w = MarkWriter::new(None);
        w.write(d.path(), AckedMark::of(SegmentId(2), 100, 0, 200, 0)).unwrap();
        assert_eq!(read_both(d.path()).unwrap().1, None);
        w.write_with_older(
            d.path(),
            AckedMark::of(SegmentId(3), 400, 0, 10, 0),
            Some(AckedMark::of(SegmentId(2), 100, 0, 300, 0)),
        )
            .unwrap();
        let (Read::Mark(m), Some(o)) = read_both(d.path()).unwrap() else { panic!() };
        assert_eq!((m.segment, m.items, m.seq), (SegmentId(3), 10, 1));
        assert_eq!((o.segment, o.first_offset, o.items, o.seq), (SegmentId(2), 100, 300, 0));
        // Not an older segment: not handed back.
        w.write_with_older(
            d.path(),
            AckedMark::of(SegmentId(4), 500, 0, 1, 0),
            Some(AckedMark::of(SegmentId(4), 0, 0, 9, 0)),
        )
            .unwrap();
        let (Read::Mark(m), o) = read_both(d.path()).unwrap() else { panic!() };
        assert_eq!((m.segment, o.map(|o| o.segment)), (SegmentId(4), Some(SegmentId(3))));
        // The newest flagged: nothing older is judged.
        w.write(d.path(), AckedMark::of(SegmentId(4), 500, 0, 1, FLAG_LOSS_RECORDED)).unwrap();
        assert_eq!(read_both(d.path()).unwrap().1, None);
    }

    /// helper-89 F3: a file longer than its two slots stayed unreadable
    /// for ever (the writer rewrote a slot, never the length).
    #[test]
    fn a_long_file_is_cut_back_by_the_next_write() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(path(d.path()), vec![7u8; 4096]).unwrap();
        assert!(matches!(read(d.path()).unwrap(), Read::Damaged(_)));
        MarkWriter::new(None)
            .write(d.path(), AckedMark::of(SegmentId(2), 5, 0, 1, 0))
            .unwrap();
        let Read::Mark(m) = read(d.path()).unwrap() else {
            panic!("still damaged")
        };
        assert_eq!(m.segment, SegmentId(2));
        assert_eq!(std::fs::metadata(path(d.path())).unwrap().len(), 128);
    }

    /// helper-89 F2: anything but a regular file in its place is refused
    /// when read (start-up, fsck), not found at the first flush.
    #[test]
    fn a_directory_or_symlink_in_its_place_is_refused_when_read() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(path(d.path())).unwrap();
        let e = read(d.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_dir(path(d.path())).unwrap();
        std::fs::write(d.path().join("elsewhere"), [0u8; 128]).unwrap();
        std::os::unix::fs::symlink(d.path().join("elsewhere"), path(d.path())).unwrap();
        let e = read(d.path()).unwrap_err().to_string();
        assert!(e.contains("symbolic link") || e.contains("symlink"), "{e}");
    }

    #[test]
    fn a_recorded_loss_is_marked_again_by_the_next_flush_of_that_segment() {
        let mut w = MarkWriter::new(Some(AckedMark {
            seq: 9,
            segment: SegmentId(5),
            first_offset: 0,
            created_ms: 0,
            items: 3,
            flags: FLAG_LOSS_RECORDED,
        }));
        assert!(w.needed(SegmentId(5)));
        assert!(!w.needed(SegmentId(4)));
        let d = tempfile::tempdir().unwrap();
        w.write(d.path(), AckedMark::of(SegmentId(5), 0, 0, 1, 0)).unwrap();
        assert!(!w.needed(SegmentId(5)));
        assert!(w.needed(SegmentId(6)));
        let Read::Mark(m) = read(d.path()).unwrap() else { panic!() };
        assert_eq!(m.seq, 10);
    }
}
