//! Sealed segments: writing one from a frozen active segment, and reading one.
//!
//! Write order (each step's crash outcome is in `docs/crash-safety.md`):
//! 1. build the whole file in memory (counting sort of items by slot),
//! 2. write it to `NNN.seg.tmp` and `sync_all` it,
//! 3. rename to `NNN.seg`, then fsync the directory so the rename is durable.
//!
//! Only after step 3 may the caller remove the `.active` file it came from.
//! A sealed file is never written again.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::segment::format::{
    self, FOOTER_LEN, Footer, HEADER_LEN, Header, SEALED_ITEM_LEN, SEALED_MAGIC, SealedLayout,
    slot_of,
};
use crate::segment::{Entry, SealedMeta, SegmentId, TimeRange};

/// File name of a sealed segment.
pub fn sealed_file_name(id: SegmentId) -> String {
    format!("{id}.seg")
}

/// File name of a sealed segment being written.
pub fn sealed_tmp_name(id: SegmentId) -> String {
    format!("{id}.seg.tmp")
}

/// fsync a directory so creates, renames and unlinks in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(|e| Error::io(dir, "open directory for fsync", e))?;
    f.sync_all()
        .map_err(|e| Error::Poisoned(format!("fsync of directory {} failed: {e}", dir.display())))
}

/// Build the bytes of a sealed segment from `entries` given in append order.
/// Entries keep their append order within a slot.
pub fn build_sealed(
    id: SegmentId,
    created_ms: u64,
    sealed_ms: u64,
    slot_count: u32,
    entries: &[Entry],
) -> Result<(Vec<u8>, SealedMeta)> {
    let item_count = u32::try_from(entries.len())
        .ok()
        .filter(|n| *n <= format::MAX_ITEMS)
        .ok_or_else(|| Error::InvalidInput(format!("{} items is too many", entries.len())))?;
    if slot_count == 0 || slot_count > format::MAX_SLOTS {
        return Err(Error::InvalidInput(format!("slot count {slot_count}")));
    }
    let layout = SealedLayout::new(slot_count, item_count);
    let mut buf = vec![0u8; layout.file_len as usize];

    // Counting sort by slot: dir[s] = first index of slot s.
    let mut dir = vec![0u32; slot_count as usize + 1];
    for e in entries {
        dir[slot_of(e.key_hash, slot_count) as usize + 1] += 1;
    }
    for s in 0..slot_count as usize {
        dir[s + 1] += dir[s];
    }
    debug_assert_eq!(dir[slot_count as usize], item_count);
    let mut next = dir.clone();
    let items_at = layout.items_offset as usize;
    let (mut min_ts, mut max_ts, mut min_off, mut max_off) = (u64::MAX, 0, u64::MAX, 0);
    for e in entries {
        let s = slot_of(e.key_hash, slot_count) as usize;
        let at = items_at + next[s] as usize * SEALED_ITEM_LEN;
        next[s] += 1;
        format::encode_sealed_item(&mut buf[at..at + SEALED_ITEM_LEN], id, e);
        min_ts = min_ts.min(e.timestamp_ms);
        max_ts = max_ts.max(e.timestamp_ms);
        min_off = min_off.min(e.offset);
        max_off = max_off.max(e.offset);
    }
    if entries.is_empty() {
        (min_ts, max_ts, min_off, max_off) = (0, 0, 0, 0);
    }
    let header = Header {
        magic: SEALED_MAGIC,
        version: format::FORMAT_VERSION,
        item_len: SEALED_ITEM_LEN as u32,
        segment_id: id,
        created_ms,
        slot_count,
        items: item_count,
    };
    buf[..HEADER_LEN].copy_from_slice(&header.encode());
    let dir_at = layout.dir_offset as usize;
    for (i, v) in dir.iter().enumerate() {
        buf[dir_at + i * 4..dir_at + i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    let dir_crc = crc32fast::hash(&buf[dir_at..items_at]);
    let footer_at = layout.footer_offset as usize;
    let data_crc = crc32fast::hash(&buf[..footer_at]);
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
        data_crc,
    };
    buf[footer_at..].copy_from_slice(&footer.encode());
    let mut h = crc32fast::Hasher::new_with_initial_len(data_crc, footer_at as u64);
    h.update(&buf[footer_at..]);
    let file_crc = h.finalize();
    Ok((buf, footer.meta(file_crc)))
}

/// Write a sealed file durably: tmp, fsync, rename, fsync dir. Returns its path.
///
/// Any failure of a sync step is returned as [`Error::Poisoned`]: the caller
/// must not retry the same file descriptors, and must not acknowledge the seal.
pub fn write_sealed_file(dir: &Path, id: SegmentId, bytes: &[u8]) -> Result<PathBuf> {
    let tmp = dir.join(sealed_tmp_name(id));
    let dst = dir.join(sealed_file_name(id));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, "create sealed tmp", e))?;
        f.write_all(bytes)
            .map_err(|e| Error::io(&tmp, "write sealed tmp", e))?;
        f.sync_all()
            .map_err(|e| Error::Poisoned(format!("fsync of {} failed: {e}", tmp.display())))?;
    }
    fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, "rename sealed tmp into place", e))?;
    // IMPORTANT: the rename is only durable once the directory is synced.
    fsync_dir(dir)?;
    Ok(dst)
}

/// A sealed segment opened for reading (mmap, validated on open).
pub struct SealedSegment {
    path: PathBuf,
    map: Mmap,
    footer: Footer,
    file_crc: u32,
}

impl SealedSegment {
    /// Open and fully check a sealed file (footer, header, data CRC,
    /// directory, item checksums). Any failure is `Error::Corrupt`.
    pub fn open(path: &Path) -> Result<SealedSegment> {
        let file = File::open(path).map_err(|e| Error::io(path, "open sealed segment", e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(path, "stat sealed segment", e))?
            .len();
        if len < (HEADER_LEN + FOOTER_LEN) as u64 {
            return Err(Error::corrupt(
                path.display().to_string(),
                format!("only {len} bytes, too short for a sealed segment"),
            ));
        }
        // SAFETY: sealed files are never modified after the rename, and this
        // process holds the data directory lock, so no one truncates the file
        // under the mapping.
        let map =
            unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "mmap sealed segment", e))?;
        let (footer, file_crc) = format::check_sealed(&map).map_err(|e| match e {
            Error::Corrupt { detail, .. } => Error::corrupt(path.display().to_string(), detail),
            other => other,
        })?;
        Ok(SealedSegment {
            path: path.to_path_buf(),
            map,
            footer,
            file_crc,
        })
    }

    pub fn id(&self) -> SegmentId {
        self.footer.segment_id
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
    pub fn meta(&self) -> SealedMeta {
        self.footer.meta(self.file_crc)
    }

    fn dir_entry(&self, slot: u32) -> u32 {
        let at = self.footer.dir_offset as usize + slot as usize * 4;
        let mut a = [0u8; 4];
        a.copy_from_slice(&self.map[at..at + 4]);
        u32::from_le_bytes(a)
    }

    /// Entries with this key hash and a timestamp in `range`, in append order.
    pub fn lookup(&self, key_hash: u64, range: TimeRange) -> Vec<Entry> {
        let f = &self.footer;
        if f.item_count == 0 || !range.overlaps(f.min_ts, f.max_ts) {
            return Vec::new();
        }
        let slot = slot_of(key_hash, f.slot_count);
        let (start, end) = (self.dir_entry(slot), self.dir_entry(slot + 1));
        let mut out = Vec::new();
        for idx in start..end {
            let at = f.items_offset as usize + idx as usize * SEALED_ITEM_LEN;
            // Checked at open; a failure here would mean the mapping changed.
            if let Ok(e) =
                format::decode_sealed_item(&self.map[at..at + SEALED_ITEM_LEN], f.segment_id)
                && e.key_hash == key_hash
                && range.contains(e.timestamp_ms)
            {
                out.push(e);
            }
        }
        out
    }

    /// All entries, grouped by slot.
    pub fn entries(&self) -> Vec<Entry> {
        let f = &self.footer;
        let items = &self.map[f.items_offset as usize..(f.file_len as usize - FOOTER_LEN)];
        items
            .chunks_exact(SEALED_ITEM_LEN)
            .filter_map(|c| format::decode_sealed_item(c, f.segment_id).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: u64) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                key_hash: crate::key_hash(&(i % 17).to_le_bytes()),
                offset: 100 + i,
                size: i as u32,
                timestamp_ms: 1000 + i,
            })
            .collect()
    }

    #[test]
    fn write_open_lookup() {
        let d = tempfile::tempdir().unwrap();
        let es = entries(200);
        let (bytes, meta) = build_sealed(SegmentId(3), 1, 2, 8, &es).unwrap();
        assert_eq!(meta.file_crc, crc32fast::hash(&bytes));
        assert_eq!(meta.item_count, 200);
        assert_eq!((meta.min_offset, meta.max_offset), (100, 299));
        let p = write_sealed_file(d.path(), SegmentId(3), &bytes).unwrap();
        let s = SealedSegment::open(&p).unwrap();
        assert_eq!(s.meta(), meta);
        let k = crate::key_hash(&5u64.to_le_bytes());
        let got = s.lookup(k, TimeRange::ALL);
        let want: Vec<Entry> = es.iter().filter(|e| e.key_hash == k).copied().collect();
        assert_eq!(got, want);
        let narrow = s.lookup(
            k,
            TimeRange {
                from_ms: 1000,
                to_ms: 1010,
            },
        );
        assert_eq!(narrow.len(), 1);
        assert!(!d.path().join(sealed_tmp_name(SegmentId(3))).exists());
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let (bytes, _) = build_sealed(SegmentId(1), 1, 2, 4, &entries(10)).unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(format::check_sealed(&b).is_err(), "flip at {i} undetected");
        }
        for cut in 0..bytes.len() {
            assert!(format::check_sealed(&bytes[..cut]).is_err());
        }
    }
}
