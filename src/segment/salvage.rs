//! Salvage by item: what can be kept of a damaged active or sealed file.
//!
//! Items are fixed-size and every item carries its own CRC, salted with the
//! segment id (and, for an active item, its index). So a damaged span never
//! hides the items around it: a scan resynchronises on the next item
//! boundary and keeps every item whose own CRC verifies. These functions are
//! pure (bytes in, plan out); `datadir` decides what to do with the plan and
//! does the I/O (seal the kept items into a new sealed file with the normal
//! build path, move the damaged original to quarantine with a record of the
//! lost indices and byte offsets).
//!
//! Sizes: nothing here allocates by what a header claims. Every buffer is
//! bounded by the length of the bytes given (which the caller read from a
//! file of that length), and the slot heads of the chain check are only
//! built when the file is exactly as long as its header implies (so the
//! slot table is really there and bounds the slot count).
//!
//! The rule (also in `docs/format/segment.md`, "Recovery rule"):
//! - An active file whose valid items are exactly `0..n` with consistent
//!   `prev` links, `n` at least its flush mark (the items a flush made
//!   durable), whose header decodes and whose length is what the header
//!   implies, is recovered in place by `ActiveSegment::open` (torn tail
//!   zeroed, appends continue).
//! - Any other active file that holds at least one valid item is
//!   *salvaged*: its valid items (in index order) are sealed under the same
//!   id and the file is never appended to again. An index is therefore
//!   written with surviving content at most once, which is what keeps a
//!   stale item from validating again.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::segment::format::{
    self, ACTIVE_ITEM_LEN, ACTIVE_MAGIC, ActiveLayout, FOOTER_LEN, Footer, HEADER_LEN, Header,
    SEALED_ITEM_LEN, SEALED_MAGIC, SealedLayout, slot_of,
};
use crate::segment::{Entry, SegmentId};

/// The shape the index writer creates active segments with: the bound for
/// a header that cannot be trusted (or read).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub slot_count: u32,
    pub item_capacity: u32,
}

/// A run of consecutive items that did not verify, between verified ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostSpan {
    /// First item index of the run.
    pub first_index: u32,
    /// Items in the run.
    pub items: u32,
    /// Byte offset of the first item of the run in the damaged file.
    pub byte_offset: u64,
    /// Bytes the run covers.
    pub bytes: u64,
}

impl LostSpan {
    /// `items` active items from index `first` of a file laid out as `l`.
    fn active(l: &ActiveLayout, first: u32, items: u32) -> LostSpan {
        LostSpan {
            first_index: first,
            items,
            byte_offset: l.item_offset(first) as u64,
            bytes: u64::from(items) * ACTIVE_ITEM_LEN as u64,
        }
    }
}

/// What a scan of an active file found.
#[derive(Clone, Debug)]
pub struct ActiveScan {
    pub id: SegmentId,
    /// From the header; `None` when the header was rebuilt.
    pub created_ms: Option<u64>,
    pub layout: ActiveLayout,
    /// The header did not decode and was rebuilt from the configured
    /// geometry and the file name, confirmed by the items' CRCs.
    pub header_rebuilt: bool,
    /// The file is shorter than its layout: the real length.
    pub truncated_to: Option<u64>,
    /// Bytes past the end its (CRC-valid) header gives, not read: not part
    /// of the segment (appended by something else). Set by the caller that
    /// read the file (the start-up's `read_bounded_active_noting`); the
    /// items are salvaged into a sealed file, the original kept aside.
    pub appended: u64,
    /// Verified items, index order.
    pub items: Vec<(u32, Entry)>,
    /// Runs of items that did not verify *before* the last verified item,
    /// and those after it below the file's flush mark (acknowledged by a
    /// flush that returned).
    pub lost: Vec<LostSpan>,
    /// Runs of non-zero items that did not verify *after* the last verified
    /// one, at or above the flush mark: a torn tail. Unflushed items torn by a power cut, or flushed
    /// ones damaged since: the file cannot tell, so they are reported as
    /// possibly lost. (All-zero items there were never written.)
    pub torn: Vec<LostSpan>,
    /// The verified items are `0..n` and their `prev` links agree with the
    /// slot heads rebuilt in order.
    pub chains_ok: bool,
    /// What the file's flush marks say a flush made durable.
    pub flush_mark: Option<u32>,
}

impl ActiveScan {
    /// `ActiveSegment::open` may recover this file in place (and appends
    /// may continue): nothing but a torn tail after a clean prefix.
    pub fn in_place(&self) -> bool {
        !self.header_rebuilt
            && self.truncated_to.is_none()
            && self.appended == 0
            && self.lost.is_empty()
            && self.chains_ok
    }

    /// Items that did not verify before the last verified one, or below
    /// the flush mark.
    pub fn lost_items(&self) -> u64 {
        self.lost.iter().map(|s| u64::from(s.items)).sum()
    }

    /// Written (non-zero) items of the torn tail.
    pub fn torn_items(&self) -> u64 {
        self.torn.iter().map(|s| u64::from(s.items)).sum()
    }
}

/// The item at byte `at`, zero-padded past the end of `bytes`.
fn item_at(bytes: &[u8], at: usize) -> [u8; ACTIVE_ITEM_LEN] {
    let mut b = [0u8; ACTIVE_ITEM_LEN];
    if let Some(have) = bytes.get(at..) {
        let n = have.len().min(ACTIVE_ITEM_LEN);
        b[..n].copy_from_slice(&have[..n]);
    }
    b
}

/// Scan an active file's bytes: decode (or rebuild) the header, then check
/// every item up to the last non-zero byte. `name_id` is the id in the file
/// name; the items must validate against it. `geometry` is what the writer
/// is configured with; without it a damaged header cannot be rebuilt.
///
/// Errors: `Unsupported` (a newer format: not damage), `Corrupt` when the
/// header is bad and cannot be rebuilt, names another segment, or the file
/// is longer than its layout.
pub fn scan_active(
    bytes: &[u8],
    name_id: SegmentId,
    geometry: Option<Geometry>,
) -> Result<ActiveScan> {
    let (layout, created_ms, header_rebuilt) =
        match Header::decode(bytes, ACTIVE_MAGIC, ACTIVE_ITEM_LEN) {
            Ok(h) => {
                if h.segment_id != name_id {
                    return Err(Error::corrupt(
                        "active segment",
                        format!(
                            "header id {} differs from the file name's {name_id}",
                            h.segment_id
                        ),
                    ));
                }
                (
                    ActiveLayout::new(h.slot_count, h.items)?,
                    Some(h.created_ms),
                    false,
                )
            }
            Err(e @ Error::Unsupported(_)) => return Err(e),
            Err(e) => {
                let Some(g) = geometry else {
                    return Err(e);
                };
                (
                    ActiveLayout::new(g.slot_count, g.item_capacity)?,
                    None,
                    true,
                )
            }
        };
    let len = bytes.len() as u64;
    if len > layout.file_len {
        return Err(Error::corrupt(
            "active segment",
            format!(
                "{len} bytes, {} implies {}",
                if header_rebuilt {
                    "the configured geometry"
                } else {
                    "its header"
                },
                layout.file_len
            ),
        ));
    }
    let truncated_to = (len < layout.file_len).then_some(len);
    let items_from = layout.items_offset as usize;
    // Items past the last non-zero byte are never-written zeros: not
    // checked (an all-zero item validates with probability 2^-32 per index;
    // over a million indexes that would be a real chance of inventing one).
    let scan_end = bytes
        .get(items_from..)
        .and_then(|t| t.iter().rposition(|&b| b != 0))
        .map_or(items_from, |last| items_from + last + 1);
    let mut items: Vec<(u32, Entry)> = Vec::new();
    let mut lost: Vec<LostSpan> = Vec::new();
    let mut chains_ok = true;
    // Slot heads only when the slot table is really in the file.
    let mut heads: Option<Vec<u32>> =
        (truncated_to.is_none() && !header_rebuilt).then(|| vec![0u32; layout.slot_count as usize]);
    let mut bad_run: Option<u32> = None; // first index of the current bad run
    let mut i = 0u32;
    while i < layout.item_capacity {
        let at = layout.item_offset(i);
        if at >= scan_end {
            break;
        }
        let b = item_at(bytes, at);
        let decoded = if b.iter().all(|&x| x == 0) {
            None
        } else {
            format::decode_active_item(&b, name_id, i)
        };
        match decoded {
            Some(item) => {
                if let Some(first) = bad_run.take() {
                    lost.push(LostSpan::active(&layout, first, i - first));
                }
                if items.len() as u64 != u64::from(i) {
                    chains_ok = false;
                }
                if let Some(h) = heads.as_mut() {
                    let slot = slot_of(item.entry.key_hash, layout.slot_count) as usize;
                    if h.get(slot) == Some(&item.prev) {
                        h[slot] = i + 1;
                    } else {
                        chains_ok = false;
                    }
                }
                items.push((i, item.entry));
            }
            None => {
                bad_run.get_or_insert(i);
            }
        }
        i += 1;
    }
    let mut torn: Vec<LostSpan> = Vec::new();
    if let Some(first) = bad_run {
        for j in first..i {
            let at = layout.item_offset(j);
            if item_at(bytes, at).iter().all(|&x| x == 0) {
                continue;
            }
            match torn.last_mut() {
                Some(s) if s.first_index + s.items == j => {
                    s.items += 1;
                    s.bytes += ACTIVE_ITEM_LEN as u64;
                }
                _ => torn.push(LostSpan::active(&layout, j, 1)),
            }
        }
    }
    // A flush mark (docs/format/segment.md, "Flush marks"): items below it
    // were made durable by a flush that returned, so those that do not
    // verify after the last verified item are lost, not a torn tail (zeros
    // included: a zeroed acknowledged tail looks like items never written).
    // Only the items at or above the mark can be a torn tail.
    let verified_end = items.last().map_or(0, |(i, _)| i + 1);
    let flush_mark = format::decode_flush_marks(bytes, name_id, layout.item_capacity);
    if let Some(mark) = flush_mark
        && mark > verified_end
    {
        lost.push(LostSpan::active(&layout, verified_end, mark - verified_end));
        torn = torn
            .into_iter()
            .filter_map(|s| {
                let end = s.first_index + s.items;
                let first = s.first_index.max(mark);
                (end > mark).then(|| LostSpan::active(&layout, first, end - first))
            })
            .collect();
    }
    if header_rebuilt && items.is_empty() {
        return Err(Error::corrupt(
            "active segment",
            "header does not decode, and no item validates with the configured geometry and the id in the file name",
        ));
    }
    Ok(ActiveScan {
        id: name_id,
        created_ms,
        layout,
        header_rebuilt,
        truncated_to,
        appended: 0,
        items,
        lost,
        torn,
        chains_ok,
        flush_mark,
    })
}

/// What salvage of a sealed file found.
#[derive(Clone, Debug)]
pub struct SealedSalvage {
    /// Read by the tests only.
    #[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))]
    pub id: SegmentId,
    pub created_ms: u64,
    pub slot_count: u32,
    /// Items whose CRC (salted with the id) verified, in file order.
    pub entries: Vec<Entry>,
    /// Runs of items that did not verify.
    pub lost: Vec<LostSpan>,
    /// How the layout was found: "footer" or "header" (read by the tests).
    #[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))]
    pub layout_from: &'static str,
}

impl SealedSalvage {
    pub fn lost_items(&self) -> u64 {
        self.lost.iter().map(|s| u64::from(s.items)).sum()
    }
}

/// Salvage a sealed file that failed its check: find its layout from the
/// footer, or (the footer damaged) from the header, and keep every item
/// whose CRC verifies against `name_id`. `Corrupt` when neither the footer
/// nor the header locates the items within the file.
pub fn salvage_sealed(bytes: &[u8], name_id: SegmentId) -> Result<SealedSalvage> {
    let len = bytes.len() as u64;
    let footer = bytes
        .len()
        .checked_sub(FOOTER_LEN)
        .and_then(|at| Footer::decode(&bytes[at..]).ok())
        .filter(|f| f.segment_id == name_id && f.file_len == len);
    // Where each slot's items start, when the footer and the directory's
    // own CRC are intact: an item whose key is not of the slot it sits in
    // was copied there from elsewhere (a misdirected write), and its own
    // CRC (salted with the id, not the position) still verifies.
    let starts = footer.as_ref().and_then(|f| {
        let l = f.layout();
        let dir = bytes.get(l.dir_offset as usize..l.items_offset as usize)?;
        format::decode_slot_dir(dir, f.slot_count, f.item_count, f.dir_crc).ok()
    });
    let from_footer = footer.map(|f| (f.layout(), f.created_ms, "footer"));
    // The header may describe a file that was cut (the footer gone with
    // it): the items still in the file are kept, the ones past the cut are
    // counted lost (the header says how many there were). Or one with bytes
    // appended after its footer: they are not part of the segment, and the
    // items are read where the header puts them.
    let from_header = || {
        Header::decode(bytes, SEALED_MAGIC, SEALED_ITEM_LEN)
            .ok()
            .filter(|h| h.segment_id == name_id)
            .map(|h| {
                (
                    SealedLayout::new(h.slot_count, h.items),
                    h.created_ms,
                    "header",
                )
            })
            .filter(|(l, _, _)| l.items_offset <= len)
    };
    let Some((layout, created_ms, layout_from)) = from_footer.or_else(from_header) else {
        return Err(Error::corrupt(
            "sealed segment",
            "neither the footer nor the header locates the items in a file of this length",
        ));
    };
    let items_end = layout.footer_offset.min(len) as usize;
    let items = bytes
        .get(layout.items_offset as usize..items_end)
        .ok_or_else(|| Error::corrupt("sealed segment", "items region out of bounds"))?;
    let mut entries = Vec::new();
    let mut lost: Vec<LostSpan> = Vec::new();
    let mut lose = |j: u32| {
        let at = layout.items_offset + u64::from(j) * SEALED_ITEM_LEN as u64;
        match lost.last_mut() {
            Some(s) if s.first_index + s.items == j => {
                s.items += 1;
                s.bytes += SEALED_ITEM_LEN as u64;
            }
            _ => lost.push(LostSpan {
                first_index: j,
                items: 1,
                byte_offset: at,
                bytes: SEALED_ITEM_LEN as u64,
            }),
        }
    };
    let whole = items.len() / SEALED_ITEM_LEN;
    let mut slot = 0usize;
    let mut prev: Option<Entry> = None;
    for (j, it) in items.chunks_exact(SEALED_ITEM_LEN).enumerate() {
        let e = match format::decode_sealed_item(it, name_id) {
            Ok(e) => e,
            Err(_) => {
                lose(j as u32);
                prev = None;
                continue;
            }
        };
        if let Some(starts) = &starts {
            while slot + 1 < starts.len() && j as u64 >= u64::from(starts[slot + 1]) {
                slot += 1;
                prev = None;
            }
            // Not of this slot: a copy of an item from elsewhere, over
            // the one that was here. The same entry twice in a row within
            // a slot: the second is such a copy too (the first is kept).
            if format::slot_of(e.key_hash, layout.slot_count) as usize != slot
                || prev == Some(e)
            {
                lose(j as u32);
                continue;
            }
        }
        prev = Some(e);
        entries.push(e);
    }
    if let Some(j) = ((whole as u32) < layout.item_count).then_some(whole as u32) {
        // Past the cut: one run, without a step per item the header claims.
        lose(j);
        if let Some(last) = lost.last_mut() {
            let extra = layout.item_count - j - 1;
            last.items += extra;
            last.bytes += u64::from(extra) * SEALED_ITEM_LEN as u64;
        }
    }
    debug_assert!(HEADER_LEN as u64 <= layout.items_offset);
    Ok(SealedSalvage {
        id: name_id,
        created_ms,
        slot_count: layout.slot_count,
        entries,
        lost,
        layout_from,
    })
}

/// Entries packed as the sealer reads them (28 bytes each: key_hash,
/// offset, timestamp_ms, size; little-endian).
pub fn pack(entries: impl IntoIterator<Item = Entry>) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(&e.key_hash.to_le_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.timestamp_ms.to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
    }
    out
}

/// Human summary of lost spans: `"items 3..5 (bytes 4216..4296), ..."`.
pub fn describe(lost: &[LostSpan]) -> String {
    const SHOWN: usize = 8;
    let mut s: Vec<String> = lost
        .iter()
        .take(SHOWN)
        .map(|l| {
            format!(
                "items {}..{} (bytes {}..{})",
                l.first_index,
                u64::from(l.first_index) + u64::from(l.items),
                l.byte_offset,
                l.byte_offset + l.bytes
            )
        })
        .collect();
    if lost.len() > SHOWN {
        s.push(format!("and {} more runs", lost.len() - SHOWN));
    }
    s.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::active::ActiveSegment;
    use crate::segment::sealed::build_sealed;

    fn e(i: u64) -> Entry {
        Entry {
            key_hash: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            offset: i,
            size: 1,
            timestamp_ms: i,
        }
    }

    fn active_bytes(n: u64, flush: bool) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let mut s = ActiveSegment::create(d.path(), SegmentId(5), 16, 500, 7).unwrap();
        for i in 0..n {
            s.append_entry(e(i)).unwrap();
        }
        if flush {
            s.flush().unwrap();
        }
        let p = s.path().to_path_buf();
        (d, p)
    }

    #[test]
    fn clean_file_is_in_place() {
        let (_d, p) = active_bytes(100, true);
        let b = std::fs::read(&p).unwrap();
        let s = scan_active(&b, SegmentId(5), None).unwrap();
        assert!(s.in_place());
        assert_eq!(s.items.len(), 100);
        assert_eq!(s.created_ms, Some(7));
    }

    #[test]
    fn a_damaged_span_keeps_the_items_on_both_sides() {
        let (_d, p) = active_bytes(300, true);
        let mut b = std::fs::read(&p).unwrap();
        let l = ActiveLayout::new(16, 500).unwrap();
        // 64 bytes from the middle of item 100: items 100, 101, 102 hit.
        let at = l.item_offset(100) + 20;
        for x in &mut b[at..at + 64] {
            *x ^= 0x5a;
        }
        let s = scan_active(&b, SegmentId(5), None).unwrap();
        assert!(!s.in_place());
        assert_eq!(s.items.len(), 297);
        assert_eq!(s.lost.len(), 1);
        assert_eq!((s.lost[0].first_index, s.lost[0].items), (100, 3));
        assert_eq!(s.lost[0].byte_offset, l.item_offset(100) as u64);
        let kept: Vec<u64> = s.items.iter().map(|(_, e)| e.offset).collect();
        let want: Vec<u64> = (0..300).filter(|i| !(100..103).contains(i)).collect();
        assert_eq!(kept, want);
    }

    #[test]
    fn a_damaged_header_is_rebuilt_only_with_matching_geometry_and_id() {
        let (_d, p) = active_bytes(50, true);
        let mut b = std::fs::read(&p).unwrap();
        for x in &mut b[16..20] {
            *x ^= 0xff;
        }
        let g = Geometry {
            slot_count: 16,
            item_capacity: 500,
        };
        assert!(scan_active(&b, SegmentId(5), None).is_err());
        let s = scan_active(&b, SegmentId(5), Some(g)).unwrap();
        assert!(s.header_rebuilt && !s.in_place());
        assert_eq!(s.items.len(), 50);
        // Another id: no item validates.
        assert!(scan_active(&b, SegmentId(6), Some(g)).is_err());
        // Another geometry moving the items: nothing validates, and a
        // longer file than the geometry implies is refused.
        let other = Geometry {
            slot_count: 4096,
            item_capacity: 500,
        };
        assert!(scan_active(&b, SegmentId(5), Some(other)).is_err());
        let small = Geometry {
            slot_count: 16,
            item_capacity: 10,
        };
        assert!(scan_active(&b, SegmentId(5), Some(small)).is_err());
    }

    #[test]
    fn a_truncated_file_is_salvaged_without_extending() {
        let (_d, p) = active_bytes(200, true);
        let b = std::fs::read(&p).unwrap();
        let l = ActiveLayout::new(16, 500).unwrap();
        let cut = &b[..l.item_offset(150) + 10];
        let s = scan_active(cut, SegmentId(5), None).unwrap();
        assert_eq!(s.truncated_to, Some(cut.len() as u64));
        assert_eq!(s.items.len(), 150);
        assert!(!s.in_place());
    }

    #[test]
    fn sealed_salvage_keeps_intact_items_and_names_the_lost_ones() {
        let es: Vec<Entry> = (0..1000).map(e).collect();
        let (mut b, _) = build_sealed(SegmentId(9), 1, 2, 64, &es).unwrap();
        let l = SealedLayout::new(64, 1000);
        let at = l.items_offset as usize + 32 * 500 + 5;
        for x in &mut b[at..at + 64] {
            *x ^= 0x33;
        }
        assert!(format::check_sealed(&b).is_err());
        let s = salvage_sealed(&b, SegmentId(9)).unwrap();
        assert_eq!(s.entries.len(), 997);
        assert_eq!(s.lost_items(), 3);
        assert_eq!(s.lost[0].first_index, 500);
        // Footer gone too: the header still locates the items.
        let n = b.len();
        for x in &mut b[n - 40..n - 30] {
            *x ^= 1;
        }
        let s = salvage_sealed(&b, SegmentId(9)).unwrap();
        assert_eq!(s.layout_from, "header");
        assert_eq!(s.entries.len(), 997);
        // Items of another segment do not validate.
        assert!(salvage_sealed(&b, SegmentId(8)).is_err());
    }

    /// An item copied over another keeps a CRC that verifies (it is salted
    /// with the id, not the position): it is caught by its slot, or, as
    /// the next item of its own slot, as the same entry twice; the item it
    /// replaced is counted lost, not reported as "0 lost" (helper-52).
    #[test]
    fn sealed_salvage_counts_items_copied_over_others_as_lost() {
        let es: Vec<Entry> = (0..1000).map(e).collect();
        let (good, _) = build_sealed(SegmentId(9), 1, 2, 64, &es).unwrap();
        let l = SealedLayout::new(64, 1000);
        let item = |b: &[u8], j: usize| {
            let at = l.items_offset as usize + 32 * j;
            b[at..at + 32].to_vec()
        };
        let put = |b: &mut Vec<u8>, j: usize, it: &[u8]| {
            let at = l.items_offset as usize + 32 * j;
            b[at..at + 32].copy_from_slice(it);
        };
        let slot = |b: &[u8], j: usize| {
            let e = format::decode_sealed_item(&item(b, j), SegmentId(9)).unwrap();
            format::slot_of(e.key_hash, 64)
        };
        // The next item of the same slot, and one of another slot.
        let j = (0..999).find(|j| slot(&good, *j) == slot(&good, j + 1)).unwrap();
        let k = (0..999).find(|k| slot(&good, *k) != slot(&good, 500)).unwrap();
        for (from, to) in [(j, j + 1), (k, 500)] {
            let mut b = good.clone();
            let it = item(&b, from);
            put(&mut b, to, &it);
            assert!(format::check_sealed(&b).is_err());
            let s = salvage_sealed(&b, SegmentId(9)).unwrap();
            assert_eq!(s.lost_items(), 1, "{from} over {to}");
            assert_eq!(s.lost[0].first_index, to as u32);
            assert_eq!(s.entries.len(), 999);
            let mut offsets: Vec<u64> = s.entries.iter().map(|e| e.offset).collect();
            offsets.sort_unstable();
            offsets.dedup();
            assert_eq!(offsets.len(), 999, "each entry once");
        }
    }
}
