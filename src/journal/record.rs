//! Journal records, the per-segment state they build, and the transition
//! rules that decide which record may follow which.
//!
//! The same [`JournalState::stage`]/[`JournalState::apply`] code validates a
//! batch before `append` writes it and re-applies records during replay, so a
//! file can only ever contain sequences the writer accepted. A record that is
//! intact by CRC but breaks these rules on replay is therefore corruption, not
//! a torn write, and replay stops there.
//!
//! ```text
//!                 +--------------------- Uploading (new attempt) ---+
//!                 v                                                  |
//! Sealed --> Uploading --> Uploaded --> Verified --> Committed --> Released
//!              |   ^  \_______________/ (re-upload: Uploaded -> Uploading)
//!              +---+  MultipartAborted (Uploading stays Uploading, multipart id cleared)
//!
//! any state except Released (and Quarantined itself) --> Quarantined
//! Quarantined --> Sealed  (Requeued: an operator's `quarantine retry`
//!                          found the cause gone; record version 2)
//! Verified --> Resealing --> Resealed  (the segment's id is taken in the
//!                          manifest by another segment: its entries are
//!                          copied into a new segment; record version 3)
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::segment::{SealedMeta, SegmentId};

/// Where one sealed segment is in its upload life.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SegmentState {
    /// Sealed locally; no upload started.
    Sealed,
    /// An upload attempt is (or was, before a crash) in flight.
    Uploading,
    /// The store acknowledged the object; not yet read back and checked.
    Uploaded,
    /// The remote object was checked (size, checksum) against the local file.
    Verified,
    /// The remote manifest lists the segment.
    Committed,
    /// The local copy may be deleted. Terminal; dropped by compaction.
    Released,
    /// Set aside for an operator; kept by compaction. Left only by
    /// [`Record::Requeued`] (`tierindex quarantine retry`).
    Quarantined,
    /// Its id is taken in the manifest by another segment (sealed by
    /// another data directory while this one numbered its segments without
    /// an epoch), so it can never be committed; its entries are being
    /// copied into [`SegmentRecord::resealed_into`] and the segments after
    /// it. Never committed from here. Finished at the next open when a
    /// crash cut the copy (see `pipeline::reseal`).
    Resealing,
    /// Its entries are durable in the segments from
    /// [`SegmentRecord::resealed_into`] on; the local file is gone. Terminal;
    /// kept by compaction (the object this segment may have uploaded is
    /// ours and unreferenced).
    Resealed,
}

impl SegmentState {
    /// True for the states in which the upload pipeline still has work to do.
    pub fn is_pending(self) -> bool {
        matches!(
            self,
            SegmentState::Sealed | SegmentState::Uploading | SegmentState::Uploaded
        )
    }
}

/// One step of a segment's upload state machine, as appended to the journal.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Record {
    /// A new segment was sealed. Its id must be above every id seen before.
    Sealed {
        meta: SealedMeta,
    },
    /// Upload attempt `attempt` (strictly growing per segment) to `key`
    /// started; `multipart_id` is set once a multipart upload was created.
    Uploading {
        id: SegmentId,
        attempt: u32,
        key: String,
        multipart_id: Option<String>,
    },
    /// The multipart upload `multipart_id` of the current attempt was aborted.
    MultipartAborted {
        id: SegmentId,
        multipart_id: String,
    },
    /// The store acknowledged the object.
    Uploaded {
        id: SegmentId,
        etag: Option<String>,
        version: Option<String>,
    },
    Verified {
        id: SegmentId,
    },
    Committed {
        id: SegmentId,
    },
    Released {
        id: SegmentId,
    },
    Quarantined {
        id: SegmentId,
        reason: String,
    },
    /// An operator's `quarantine retry` re-checked a Quarantined segment
    /// (its local file passes the full check and matches its `Sealed`
    /// record): back to Sealed, uploaded again by the next drain with an
    /// attempt above every earlier one. Written in record version 2 frames
    /// only (an older build refuses such a frame as newer, as for any).
    Requeued {
        id: SegmentId,
        reason: String,
    },
    /// A Verified segment whose id the manifest lists with other content
    /// (`reason`): its entries go into segment `into` (the active one, at or
    /// above the current epoch's id floor) and the segments after it. From
    /// here the segment is never committed. Record version 3.
    Resealing {
        id: SegmentId,
        into: SegmentId,
        reason: String,
    },
    /// Every entry of a Resealing segment is durable in the segments from
    /// its `into` on. Record version 3.
    Resealed {
        id: SegmentId,
    },
}

impl Record {
    /// The segment this record is about.
    pub fn id(&self) -> SegmentId {
        match self {
            Record::Sealed { meta } => meta.id,
            Record::Uploading { id, .. }
            | Record::MultipartAborted { id, .. }
            | Record::Uploaded { id, .. }
            | Record::Verified { id }
            | Record::Committed { id }
            | Record::Released { id }
            | Record::Quarantined { id, .. }
            | Record::Requeued { id, .. }
            | Record::Resealing { id, .. }
            | Record::Resealed { id } => *id,
        }
    }

    /// Short name for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Record::Sealed { .. } => "Sealed",
            Record::Uploading { .. } => "Uploading",
            Record::MultipartAborted { .. } => "MultipartAborted",
            Record::Uploaded { .. } => "Uploaded",
            Record::Verified { .. } => "Verified",
            Record::Committed { .. } => "Committed",
            Record::Released { .. } => "Released",
            Record::Quarantined { .. } => "Quarantined",
            Record::Requeued { .. } => "Requeued",
            Record::Resealing { .. } => "Resealing",
            Record::Resealed { .. } => "Resealed",
        }
    }
}

/// Everything the journal knows about one segment: the fold of its records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmentRecord {
    pub meta: SealedMeta,
    pub state: SegmentState,
    /// Last upload attempt number (0 = never attempted).
    pub attempt: u32,
    /// Object key of the current/last attempt.
    pub key: Option<String>,
    /// In-flight multipart upload that may need aborting. Cleared by
    /// `MultipartAborted`, by `Uploaded` (the upload completed) and replaced by
    /// a new `Uploading` attempt.
    pub multipart_id: Option<String>,
    pub etag: Option<String>,
    pub version: Option<String>,
    /// Why the segment was quarantined or resealed.
    pub reason: Option<String>,
    /// Resealing/Resealed: the first segment its entries were copied into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resealed_into: Option<SegmentId>,
}

impl SegmentRecord {
    fn sealed(meta: SealedMeta) -> Self {
        SegmentRecord {
            meta,
            state: SegmentState::Sealed,
            attempt: 0,
            key: None,
            multipart_id: None,
            etag: None,
            version: None,
            reason: None,
            resealed_into: None,
        }
    }
}

/// What one frame of `journal.log` carries. Normal appends write `Batch`
/// frames; compaction writes one `MaxId` then one `Snapshot` per live segment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Frame {
    /// The records of one `append` call: applied all together or not at all.
    Batch(Vec<Record>),
    /// The folded state of one segment at compaction time.
    /// Boxed: far larger than the other variants (JSON is the same).
    Snapshot(Box<SegmentRecord>),
    /// The highest segment id ever journaled when the file was written; only
    /// valid as the first frame.
    MaxId(Option<SegmentId>),
    /// The highest entry offset of any segment ever journaled (compaction
    /// drops Released segments, not this high-water mark: a restart must
    /// never hand out an offset a released segment holds). Only valid
    /// right after `MaxId`.
    MaxOffset(Option<u64>),
}

/// The in-memory table the records fold into.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JournalState {
    segments: BTreeMap<SegmentId, SegmentRecord>,
    max_segment_id: Option<SegmentId>,
    max_offset: Option<u64>,
    ix: Indexes,
}

/// Indexes kept beside the segment table as records apply, so that the
/// scheduler, `status` and the gauges cost what they look at, not the
/// number of segments ever journaled.
#[derive(Clone, Debug, Default, PartialEq)]
struct Indexes {
    /// Ids in Sealed, Uploading, Uploaded or Verified: the upload
    /// pipeline's work.
    unfinished: BTreeSet<SegmentId>,
    /// Ids in Committed (work only when local copies are released).
    committed: BTreeSet<SegmentId>,
    /// Segments per state (no zero entries).
    by_state: BTreeMap<SegmentState, u64>,
    /// (sealed_ms, id) and bytes of the segments `status` counts as
    /// pending, per [`Indexes::group`]: unfinished, committed, resealing.
    age: [BTreeSet<(u64, SegmentId)>; 3],
    bytes: [u64; 3],
}

impl Indexes {
    fn group(st: SegmentState) -> Option<usize> {
        use SegmentState as S;
        match st {
            S::Sealed | S::Uploading | S::Uploaded | S::Verified => Some(0),
            S::Committed => Some(1),
            S::Resealing => Some(2),
            S::Released | S::Quarantined | S::Resealed => None,
        }
    }

    fn add(&mut self, r: &SegmentRecord) {
        let id = r.meta.id;
        *self.by_state.entry(r.state).or_default() += 1;
        if let Some(g) = Self::group(r.state) {
            match g {
                0 => self.unfinished.insert(id),
                1 => self.committed.insert(id),
                _ => false,
            };
            self.age[g].insert((r.meta.sealed_ms, id));
            self.bytes[g] = self.bytes[g].saturating_add(r.meta.file_len);
        }
    }

    fn remove(&mut self, r: &SegmentRecord) {
        let id = r.meta.id;
        match self.by_state.get_mut(&r.state) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.by_state.remove(&r.state);
                }
            }
            None => debug_assert!(false, "segment {id} was not counted in {:?}", r.state),
        }
        if let Some(g) = Self::group(r.state) {
            self.unfinished.remove(&id);
            self.committed.remove(&id);
            self.age[g].remove(&(r.meta.sealed_ms, id));
            self.bytes[g] = self.bytes[g].saturating_sub(r.meta.file_len);
        }
    }
}

/// What `status` reports as pending: segments in Sealed to Verified or
/// Resealing, and Committed ones when local copies are released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingSummary {
    pub segments: u64,
    pub bytes: u64,
    /// `sealed_ms` of the oldest of them.
    pub oldest_sealed_ms: Option<u64>,
}

/// The result of validating a batch: the new versions of the touched
/// segments. Nothing in the state changes until [`JournalState::commit`].
#[derive(Debug)]
pub struct Staged {
    touched: BTreeMap<SegmentId, SegmentRecord>,
    max_segment_id: Option<SegmentId>,
    max_offset: Option<u64>,
}

impl JournalState {
    pub fn segments(&self) -> &BTreeMap<SegmentId, SegmentRecord> {
        &self.segments
    }

    pub fn get(&self, id: SegmentId) -> Option<&SegmentRecord> {
        self.segments.get(&id)
    }

    pub fn max_segment_id(&self) -> Option<SegmentId> {
        self.max_segment_id
    }

    /// Highest entry offset of any segment ever journaled (kept through
    /// compaction).
    pub fn max_offset(&self) -> Option<u64> {
        self.max_offset
    }

    /// Ids the upload pipeline still drives, oldest first: Sealed to
    /// Verified, and Committed too when `with_committed` (local copies are
    /// released after commit). Kept as records apply: taking the first few
    /// costs what they are, not the number of segments journaled.
    pub fn unfinished_ids(&self, with_committed: bool) -> impl Iterator<Item = SegmentId> + '_ {
        let mut a = self.ix.unfinished.iter().copied().peekable();
        // Not a filter: that would walk every Committed id to say "none".
        let mut b = with_committed
            .then(|| self.ix.committed.iter().copied())
            .into_iter()
            .flatten()
            .peekable();
        std::iter::from_fn(move || match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if y < x => b.next(),
            (Some(_), _) => a.next(),
            (None, _) => b.next(),
        })
    }

    /// Ids `status` and the drain report count as pending, in id order:
    /// those of [`Self::unfinished_ids`] and any left in Resealing (a
    /// reseal that failed after its start; the next open finishes it).
    pub fn pending_ids(&self, with_committed: bool) -> Vec<SegmentId> {
        let mut ids: Vec<SegmentId> = self.unfinished_ids(with_committed).collect();
        ids.extend(self.ix.age[2].iter().map(|(_, id)| *id));
        ids.sort_unstable();
        ids
    }

    /// Segments per state (states with none are absent).
    pub fn state_counts(&self) -> &BTreeMap<SegmentState, u64> {
        &self.ix.by_state
    }

    /// The pending segments `status` reports, from the indexes.
    pub fn pending_summary(&self, with_committed: bool) -> PendingSummary {
        let groups: &[usize] = if with_committed { &[0, 1, 2] } else { &[0, 2] };
        let mut out = PendingSummary::default();
        for &g in groups {
            out.segments += self.ix.age[g].len() as u64;
            out.bytes = out.bytes.saturating_add(self.ix.bytes[g]);
            if let Some((ms, _)) = self.ix.age[g].first() {
                out.oldest_sealed_ms = Some(out.oldest_sealed_ms.map_or(*ms, |o| o.min(*ms)));
            }
        }
        out
    }

    /// Rebuilds the indexes from `segments`.
    fn reindex(&mut self) {
        let mut ix = Indexes::default();
        for r in self.segments.values() {
            ix.add(r);
        }
        self.ix = ix;
    }

    /// Segments not yet Verified-or-later and not Quarantined, oldest first.
    #[cfg(any(test, feature = "testing"))]
    pub fn pending(&self) -> Vec<&SegmentRecord> {
        self.segments
            .values()
            .filter(|r| r.state.is_pending())
            .collect()
    }

    /// Validates `records` in order (later records see earlier ones) without
    /// changing `self`.
    pub fn stage(&self, records: &[Record]) -> Result<Staged> {
        let mut staged = Staged {
            touched: BTreeMap::new(),
            max_segment_id: self.max_segment_id,
            max_offset: self.max_offset,
        };
        for (i, rec) in records.iter().enumerate() {
            let id = rec.id();
            let current = staged.touched.get(&id).or_else(|| self.segments.get(&id));
            let next = transition(current, staged.max_segment_id, rec).map_err(|why| {
                Error::InvalidInput(format!("journal record {i} ({}): {why}", rec.kind()))
            })?;
            staged.max_segment_id = staged.max_segment_id.max(Some(id));
            if next.meta.item_count > 0 {
                staged.max_offset = staged.max_offset.max(Some(next.meta.max_offset));
            }
            staged.touched.insert(id, next);
        }
        Ok(staged)
    }

    /// Installs a batch validated by [`JournalState::stage`] on this state.
    pub fn commit(&mut self, staged: Staged) {
        debug_assert!(staged.max_segment_id >= self.max_segment_id);
        self.max_segment_id = staged.max_segment_id;
        self.max_offset = staged.max_offset;
        for (id, rec) in staged.touched {
            if let Some(old) = self.segments.get(&id) {
                self.ix.remove(old);
            }
            self.ix.add(&rec);
            self.segments.insert(id, rec);
        }
    }

    /// `stage` + `commit`.
    pub fn apply(&mut self, records: &[Record]) -> Result<()> {
        let staged = self.stage(records)?;
        self.commit(staged);
        Ok(())
    }

    /// A state from its parts (the journal rebuild). `max_segment_id` and
    /// `max_offset` are raised to cover `segments`.
    pub(crate) fn from_parts(
        segments: BTreeMap<SegmentId, SegmentRecord>,
        max_segment_id: Option<SegmentId>,
        max_offset: Option<u64>,
    ) -> JournalState {
        let mut st = JournalState {
            segments,
            max_segment_id,
            max_offset,
            ix: Indexes::default(),
        };
        st.reindex();
        for r in st.segments.values() {
            st.max_segment_id = st.max_segment_id.max(Some(r.meta.id));
            if r.meta.item_count > 0 {
                st.max_offset = st.max_offset.max(Some(r.meta.max_offset));
            }
        }
        st
    }

    /// Loads a compaction snapshot of one segment. Only used by replay. A
    /// Released one (record version 4) is the newest released segment a
    /// compaction kept ([`Self::kept_by_compaction`]).
    pub(crate) fn load_snapshot(&mut self, rec: SegmentRecord) -> std::result::Result<(), String> {
        let id = rec.meta.id;
        if self.segments.contains_key(&id) {
            return Err(format!("second snapshot of segment {id}"));
        }
        if self.max_segment_id.is_some_and(|max| id > max) {
            return Err(format!(
                "snapshot of segment {id} is above the recorded max id"
            ));
        }
        self.max_segment_id = self.max_segment_id.max(Some(id));
        if rec.meta.item_count > 0 {
            self.max_offset = self.max_offset.max(Some(rec.meta.max_offset));
        }
        self.ix.add(&rec);
        self.segments.insert(id, rec);
        Ok(())
    }

    /// Sets the max id from a `MaxId` frame (the first frame of a file).
    pub(crate) fn load_max_id(&mut self, max: Option<SegmentId>) {
        debug_assert!(self.segments.is_empty() && self.max_segment_id.is_none());
        self.max_segment_id = max;
    }

    pub(crate) fn load_max_offset(&mut self, max: Option<u64>) {
        debug_assert!(self.segments.is_empty());
        self.max_offset = max;
    }

    /// Rebuilds the segment table and its indexes with full nodes. Inserting
    /// keys in rising order one at a time (a replay) leaves a B-tree's nodes
    /// a little over half full; a table built from sorted keys at once fills
    /// them. Same contents; for after a replay, when the table is largest.
    pub(crate) fn pack(&mut self) {
        fn packed<K: Ord, V>(m: &mut BTreeMap<K, V>) {
            *m = std::mem::take(m).into_iter().collect();
        }
        fn packed_set<K: Ord>(m: &mut BTreeSet<K>) {
            *m = std::mem::take(m).into_iter().collect();
        }
        packed(&mut self.segments);
        packed_set(&mut self.ix.unfinished);
        packed_set(&mut self.ix.committed);
        for a in &mut self.ix.age {
            packed_set(a);
        }
    }

    /// Segments a compaction keeps: all but the Released ones, and the
    /// newest of those ([`Self::kept_by_compaction`]).
    pub fn live_segments(&self) -> u64 {
        let released = self
            .ix
            .by_state
            .get(&SegmentState::Released)
            .copied()
            .unwrap_or(0);
        (self.segments.len() as u64)
            .saturating_sub(released)
            .saturating_add(u64::from(released > 0))
    }

    /// The highest id in state Released, if any: a walk down from the
    /// highest id to the first Released one (compaction's cost, which
    /// walks every segment anyway).
    pub fn newest_released(&self) -> Option<SegmentId> {
        if !self.ix.by_state.contains_key(&SegmentState::Released) {
            return None;
        }
        self.segments
            .values()
            .rev()
            .find(|r| r.state == SegmentState::Released)
            .map(|r| r.meta.id)
    }

    /// Whether a compaction keeps `r`: every segment that is not Released,
    /// and the newest Released one (`newest`, from
    /// [`Self::newest_released`]). That one record is the journal's
    /// evidence of what was committed (helper-88): a store restored from
    /// an older backup that lost it (and the segments released before it,
    /// whose records are gone) is still reported as a loss of committed
    /// entries after any number of compactions, instead of every command
    /// saying clean.
    pub fn kept_by_compaction(r: &SegmentRecord, newest: Option<SegmentId>) -> bool {
        r.state != SegmentState::Released || Some(r.meta.id) == newest
    }

    /// Forgets the Released segments but the newest, in place: what a
    /// compaction that succeeded leaves (the max id and offset are kept).
    /// Released segments are in no index but the per-state count.
    pub(crate) fn drop_released(&mut self) {
        let newest = self.newest_released();
        if newest.is_some() {
            self.ix.by_state.insert(SegmentState::Released, 1);
        }
        self.segments
            .retain(|_, r| Self::kept_by_compaction(r, newest));
    }

    /// The state a compaction keeps: everything but Released segments,
    /// and the newest of those.
    #[cfg(any(test, feature = "testing"))]
    pub fn without_released(&self) -> JournalState {
        let newest = self.newest_released();
        let mut st = JournalState {
            segments: self
                .segments
                .iter()
                .filter(|(_, r)| Self::kept_by_compaction(r, newest))
                .map(|(id, r)| (*id, r.clone()))
                .collect(),
            max_segment_id: self.max_segment_id,
            max_offset: self.max_offset,
            ix: Indexes::default(),
        };
        st.reindex();
        st
    }
}

/// The new record for `rec`'s segment, or why `rec` may not follow `current`.
fn transition(
    current: Option<&SegmentRecord>,
    max_segment_id: Option<SegmentId>,
    rec: &Record,
) -> std::result::Result<SegmentRecord, String> {
    use SegmentState as S;
    let id = rec.id();
    let cur = match (rec, current) {
        (Record::Sealed { meta }, None) => {
            // Ids are never reused, even once compaction forgot a Released one.
            if let Some(max) = max_segment_id.filter(|max| meta.id <= *max) {
                return Err(format!(
                    "segment {id} is not above the highest id ever journaled ({max})"
                ));
            }
            return Ok(SegmentRecord::sealed(meta.clone()));
        }
        (Record::Sealed { .. }, Some(_)) => {
            return Err(format!("segment {id} is already journaled"));
        }
        (_, None) => return Err(format!("unknown segment {id}")),
        (_, Some(cur)) => cur,
    };
    let illegal = || {
        format!(
            "segment {id} is {:?}; {} may not follow",
            cur.state,
            rec.kind()
        )
    };
    let mut next = cur.clone();
    match rec {
        Record::Sealed { .. } => return Err(illegal()),
        Record::Uploading {
            attempt,
            key,
            multipart_id,
            ..
        } => {
            if !matches!(cur.state, S::Sealed | S::Uploading | S::Uploaded) {
                return Err(illegal());
            }
            if *attempt <= cur.attempt {
                return Err(format!(
                    "segment {id}: attempt {attempt} does not grow past {}",
                    cur.attempt
                ));
            }
            if key.is_empty() {
                return Err(format!("segment {id}: empty object key"));
            }
            next.state = S::Uploading;
            next.attempt = *attempt;
            next.key = Some(key.clone());
            next.multipart_id = multipart_id.clone();
            next.etag = None;
            next.version = None;
        }
        Record::MultipartAborted { multipart_id, .. } => {
            if cur.state != S::Uploading {
                return Err(illegal());
            }
            if cur.multipart_id.as_deref() != Some(multipart_id.as_str()) {
                return Err(format!(
                    "segment {id}: multipart upload {multipart_id:?} is not the current one ({:?})",
                    cur.multipart_id
                ));
            }
            next.multipart_id = None;
        }
        Record::Uploaded { etag, version, .. } => {
            if cur.state != S::Uploading {
                return Err(illegal());
            }
            next.state = S::Uploaded;
            next.multipart_id = None;
            next.etag = etag.clone();
            next.version = version.clone();
        }
        Record::Verified { .. } => {
            if cur.state != S::Uploaded {
                return Err(illegal());
            }
            next.state = S::Verified;
        }
        Record::Committed { .. } => {
            if cur.state != S::Verified {
                return Err(illegal());
            }
            next.state = S::Committed;
        }
        Record::Released { .. } => {
            if cur.state != S::Committed {
                return Err(illegal());
            }
            next.state = S::Released;
        }
        Record::Quarantined { reason, .. } => {
            if matches!(cur.state, S::Released | S::Quarantined | S::Resealed) {
                return Err(illegal());
            }
            next.state = S::Quarantined;
            next.reason = Some(reason.clone());
        }
        Record::Requeued { .. } => {
            if cur.state != S::Quarantined {
                return Err(illegal());
            }
            // The attempt counter is kept: the next upload's attempt grows
            // past every earlier one.
            next.state = S::Sealed;
            next.reason = None;
            next.multipart_id = None;
            next.etag = None;
            next.version = None;
        }
        Record::Resealing { into, reason, .. } => {
            if cur.state != S::Verified {
                return Err(illegal());
            }
            if *into <= id {
                return Err(format!(
                    "segment {id}: resealed into segment {into}, which is not above it"
                ));
            }
            next.state = S::Resealing;
            next.resealed_into = Some(*into);
            next.reason = Some(reason.clone());
        }
        Record::Resealed { .. } => {
            if cur.state != S::Resealing {
                return Err(illegal());
            }
            next.state = S::Resealed;
        }
    }
    Ok(next)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn meta(id: u64) -> SealedMeta {
        SealedMeta {
            id: SegmentId(id),
            file_len: 4096 + id,
            file_crc: 0xdead_beef ^ id as u32,
            crc64: None,
            item_count: 10 * id,
            min_ts: 1_000,
            max_ts: 2_000 + id,
            min_offset: 100 * id,
            max_offset: 100 * id + 99,
            created_ms: 1,
            sealed_ms: 2,
        }
    }

    pub(crate) fn uploading(id: u64, attempt: u32, mp: Option<&str>) -> Record {
        Record::Uploading {
            id: SegmentId(id),
            attempt,
            key: format!("stream/{id:020}.seg"),
            multipart_id: mp.map(str::to_owned),
        }
    }

    pub(crate) fn uploaded(id: u64) -> Record {
        Record::Uploaded {
            id: SegmentId(id),
            etag: Some(format!("\"etag-{id}\"")),
            version: None,
        }
    }

    pub(crate) fn snapshot(id: u64) -> SegmentRecord {
        SegmentRecord::sealed(meta(id))
    }

    /// The full happy path for one segment.
    pub(crate) fn happy_path(id: u64) -> Vec<Record> {
        let sid = SegmentId(id);
        vec![
            Record::Sealed { meta: meta(id) },
            uploading(id, 1, None),
            uploaded(id),
            Record::Verified { id: sid },
            Record::Committed { id: sid },
            Record::Released { id: sid },
        ]
    }

    fn rejected(state: &JournalState, recs: &[Record]) -> bool {
        matches!(state.stage(recs), Err(Error::InvalidInput(_)))
    }

    /// A state holding segment 1 in `target`, reached along the happy path.
    fn at(target: SegmentState) -> JournalState {
        let mut st = JournalState::default();
        if target == SegmentState::Quarantined {
            let q = Record::Quarantined {
                id: SegmentId(1),
                reason: "x".into(),
            };
            st.apply(&[Record::Sealed { meta: meta(1) }, q]).unwrap();
            return st;
        }
        for rec in happy_path(1) {
            st.apply(&[rec]).unwrap();
            if st.get(SegmentId(1)).unwrap().state == target {
                return st;
            }
        }
        panic!("{target:?} is not on the happy path");
    }

    #[test]
    fn happy_path_folds_fields() {
        let mut st = JournalState::default();
        st.apply(&happy_path(1)[..3]).unwrap();
        let r = st.get(SegmentId(1)).unwrap();
        assert_eq!(r.state, SegmentState::Uploaded);
        assert_eq!(r.attempt, 1);
        assert_eq!(r.key.as_deref(), Some("stream/00000000000000000001.seg"));
        assert_eq!(r.etag.as_deref(), Some("\"etag-1\""));
        assert_eq!(st.pending().len(), 1);
        st.apply(&happy_path(1)[3..]).unwrap();
        assert_eq!(st.get(SegmentId(1)).unwrap().state, SegmentState::Released);
        assert!(st.pending().is_empty());
        assert_eq!(st.max_segment_id(), Some(SegmentId(1)));
    }

    /// The work index, read through `unfinished_ids`, against a scan of
    /// every segment, after each batch and after every way a state is built.
    #[test]
    fn the_work_index_matches_a_scan_of_the_segments() {
        use SegmentState as S;
        fn scan(st: &JournalState, with_committed: bool) -> Vec<SegmentId> {
            st.segments()
                .iter()
                .filter(|(_, r)| {
                    matches!(
                        r.state,
                        S::Sealed | S::Uploading | S::Uploaded | S::Verified
                    ) || (with_committed && r.state == S::Committed)
                })
                .map(|(id, _)| *id)
                .collect()
        }
        fn summary_scan(st: &JournalState, with_committed: bool) -> PendingSummary {
            let mut out = PendingSummary::default();
            for r in st.segments().values() {
                let pending = matches!(
                    r.state,
                    S::Sealed | S::Uploading | S::Uploaded | S::Verified | S::Resealing
                ) || (with_committed && r.state == S::Committed);
                if pending {
                    out.segments += 1;
                    out.bytes += r.meta.file_len;
                    let ms = r.meta.sealed_ms;
                    out.oldest_sealed_ms = Some(out.oldest_sealed_ms.map_or(ms, |o| o.min(ms)));
                }
            }
            out
        }
        fn check(st: &JournalState) {
            for w in [false, true] {
                assert_eq!(st.unfinished_ids(w).collect::<Vec<_>>(), scan(st, w), "{w}");
                assert_eq!(st.pending_summary(w), summary_scan(st, w), "{w}");
                let pending: Vec<SegmentId> = st
                    .segments()
                    .iter()
                    .filter(|(_, r)| scan(st, w).contains(&r.meta.id) || r.state == S::Resealing)
                    .map(|(id, _)| *id)
                    .collect();
                assert_eq!(st.pending_ids(w), pending, "{w}");
            }
            let mut counts = BTreeMap::new();
            for r in st.segments().values() {
                *counts.entry(r.state).or_insert(0u64) += 1;
            }
            assert_eq!(st.state_counts(), &counts);
        }
        let mut st = JournalState::default();
        // Segment i walks i % 7 steps of the happy path (0 = only sealed);
        // every fifth is quarantined; batches mix segments.
        let ids: Vec<u64> = (1..=60).collect();
        for id in &ids {
            let mut m = meta(*id);
            m.sealed_ms = (*id * 37) % 101;
            st.apply(&[Record::Sealed { meta: m }]).unwrap();
        }
        check(&st);
        for step in 1..6 {
            let batch: Vec<Record> = ids
                .iter()
                .filter(|id| *id % 5 != 0 && (*id % 7) as usize >= step)
                .map(|id| happy_path(*id)[step].clone())
                .collect();
            st.apply(&batch).unwrap();
            check(&st);
        }
        let q: Vec<Record> = ids
            .iter()
            .filter(|id| *id % 5 == 0)
            .map(|id| Record::Quarantined {
                id: SegmentId(*id),
                reason: "x".into(),
            })
            .collect();
        st.apply(&q).unwrap();
        check(&st);
        // Three Verified segments go to Resealing, one on to Resealed.
        let reseal: Vec<Record> = [3u64, 17, 31]
            .iter()
            .map(|id| Record::Resealing {
                id: SegmentId(*id),
                into: SegmentId(1_000),
                reason: "x".into(),
            })
            .collect();
        st.apply(&reseal).unwrap();
        check(&st);
        st.apply(&[Record::Resealed { id: SegmentId(3) }]).unwrap();
        check(&st);
        assert_eq!(st.state_counts().get(&S::Resealing), Some(&2));
        assert!(st.unfinished_ids(true).count() > st.unfinished_ids(false).count());
        let kept = st.without_released();
        check(&kept);
        let rebuilt = JournalState::from_parts(st.segments().clone(), None, None);
        check(&rebuilt);
        assert_eq!(rebuilt, st);
        let mut loaded = JournalState::default();
        loaded.load_max_id(st.max_segment_id());
        for r in kept.segments().values() {
            loaded.load_snapshot(r.clone()).unwrap();
        }
        check(&loaded);
        assert_eq!(
            loaded.unfinished_ids(true).count(),
            kept.unfinished_ids(true).count()
        );
    }

    #[test]
    fn every_skip_and_backward_step_is_rejected() {
        use SegmentState as S;
        let id = SegmentId(1);
        let cases: Vec<(S, Record, bool)> = vec![
            (S::Sealed, uploaded(1), false),
            (S::Sealed, Record::Verified { id }, false),
            (S::Sealed, Record::Committed { id }, false),
            (S::Sealed, Record::Released { id }, false),
            (S::Sealed, uploading(1, 1, None), true),
            (S::Sealed, uploading(1, 0, None), false),
            (S::Uploading, uploading(1, 2, None), true),
            (S::Uploading, uploading(1, 1, None), false),
            (S::Uploading, Record::Verified { id }, false),
            (S::Uploading, uploaded(1), true),
            (S::Uploaded, uploading(1, 2, None), true),
            (S::Uploaded, uploading(1, 1, None), false),
            (S::Uploaded, Record::Committed { id }, false),
            (S::Uploaded, Record::Verified { id }, true),
            (S::Verified, uploading(1, 2, None), false),
            (S::Verified, uploaded(1), false),
            (S::Verified, Record::Released { id }, false),
            (S::Verified, Record::Committed { id }, true),
            (S::Committed, Record::Verified { id }, false),
            (S::Committed, Record::Released { id }, true),
            (S::Released, Record::Committed { id }, false),
            (S::Released, uploading(1, 9, None), false),
            (S::Quarantined, uploading(1, 9, None), false),
            (S::Quarantined, Record::Released { id }, false),
        ];
        for (state, rec, ok) in cases {
            let st = at(state);
            assert_eq!(
                st.stage(std::slice::from_ref(&rec)).is_ok(),
                ok,
                "{state:?} then {rec:?}"
            );
        }
    }

    #[test]
    fn quarantine_from_any_state_before_released() {
        use SegmentState as S;
        let q = Record::Quarantined {
            id: SegmentId(1),
            reason: "bad crc".into(),
        };
        for s in [
            S::Sealed,
            S::Uploading,
            S::Uploaded,
            S::Verified,
            S::Committed,
        ] {
            let mut st = at(s);
            st.apply(std::slice::from_ref(&q)).unwrap();
            let r = st.get(SegmentId(1)).unwrap();
            assert_eq!(r.state, S::Quarantined);
            assert_eq!(r.reason.as_deref(), Some("bad crc"));
            assert!(st.pending().is_empty());
        }
        assert!(rejected(&at(S::Released), std::slice::from_ref(&q)));
        assert!(rejected(&at(S::Quarantined), &[q]));
    }

    #[test]
    fn requeued_leaves_quarantined_only_and_keeps_the_attempt() {
        use SegmentState as S;
        let rq = Record::Requeued {
            id: SegmentId(1),
            reason: "retry".into(),
        };
        for s in [
            S::Sealed,
            S::Uploading,
            S::Uploaded,
            S::Verified,
            S::Committed,
            S::Released,
        ] {
            assert!(rejected(&at(s), std::slice::from_ref(&rq)), "{s:?}");
        }
        let mut st = JournalState::default();
        st.apply(&[
            Record::Sealed { meta: meta(1) },
            uploading(1, 3, Some("mp")),
            Record::Quarantined {
                id: SegmentId(1),
                reason: "remote conflict".into(),
            },
        ])
        .unwrap();
        st.apply(std::slice::from_ref(&rq)).unwrap();
        let r = st.get(SegmentId(1)).unwrap();
        assert_eq!(r.state, S::Sealed);
        assert_eq!(r.reason, None);
        assert_eq!(r.multipart_id, None);
        assert_eq!(r.attempt, 3);
        assert_eq!(st.pending().len(), 1);
        // The next upload must use a new attempt.
        assert!(rejected(&st, &[uploading(1, 3, None)]));
        st.apply(&[uploading(1, 4, None)]).unwrap();
    }

    #[test]
    fn reseal_leaves_verified_only_and_ends_terminal() {
        use SegmentState as S;
        let id = SegmentId(1);
        let start = Record::Resealing {
            id,
            into: SegmentId(9),
            reason: "id taken".into(),
        };
        for s in [
            S::Sealed,
            S::Uploading,
            S::Uploaded,
            S::Committed,
            S::Released,
            S::Quarantined,
        ] {
            assert!(rejected(&at(s), std::slice::from_ref(&start)), "{s:?}");
            assert!(rejected(&at(s), &[Record::Resealed { id }]), "{s:?}");
        }
        let mut st = at(S::Verified);
        assert!(
            rejected(
                &st,
                &[Record::Resealing {
                    id,
                    into: id,
                    reason: "x".into()
                }]
            ),
            "into must be above the segment"
        );
        st.apply(std::slice::from_ref(&start)).unwrap();
        let r = st.get(id).unwrap();
        assert_eq!(
            (r.state, r.resealed_into),
            (S::Resealing, Some(SegmentId(9)))
        );
        assert!(st.pending().is_empty());
        // Never committed from here; a crash-cut copy may still quarantine.
        assert!(rejected(&st, &[Record::Committed { id }]));
        assert!(rejected(&st, std::slice::from_ref(&start)));
        st.apply(&[Record::Resealed { id }]).unwrap();
        assert_eq!(st.get(id).unwrap().state, S::Resealed);
        for rec in [
            Record::Committed { id },
            Record::Resealed { id },
            Record::Quarantined {
                id,
                reason: "x".into(),
            },
            uploading(1, 5, None),
        ] {
            assert!(rejected(&st, std::slice::from_ref(&rec)), "{rec:?}");
        }
        // Kept by compaction.
        assert_eq!(st.without_released().get(id).unwrap().state, S::Resealed);
    }

    #[test]
    fn multipart_abort_clears_only_the_current_id() {
        let mut st = at(SegmentState::Sealed);
        st.apply(&[uploading(1, 1, Some("mp-1"))]).unwrap();
        let abort = |mp: &str| Record::MultipartAborted {
            id: SegmentId(1),
            multipart_id: mp.into(),
        };
        assert!(rejected(&st, &[abort("mp-2")]));
        st.apply(&[abort("mp-1")]).unwrap();
        let r = st.get(SegmentId(1)).unwrap();
        assert_eq!(r.state, SegmentState::Uploading);
        assert_eq!(r.multipart_id, None);
        assert!(rejected(&st, &[abort("mp-1")]), "already cleared");
        assert!(rejected(&at(SegmentState::Uploaded), &[abort("mp-1")]));
    }

    #[test]
    fn unknown_ids_duplicates_and_reused_ids_are_rejected() {
        let mut st = JournalState::default();
        assert!(rejected(&st, &[Record::Verified { id: SegmentId(7) }]));
        st.apply(&[Record::Sealed { meta: meta(5) }]).unwrap();
        assert!(rejected(&st, &[Record::Sealed { meta: meta(5) }]));
        assert!(
            rejected(&st, &[Record::Sealed { meta: meta(3) }]),
            "below max"
        );
        // Forgotten by compaction (but the newest Released segment, kept:
        // helper-88), still never reused.
        st.apply(&happy_path(5)[1..]).unwrap();
        let st = st.without_released();
        assert_eq!(st.segments().keys().copied().collect::<Vec<_>>(), [SegmentId(5)]);
        assert_eq!(st.max_segment_id(), Some(SegmentId(5)));
        assert!(rejected(&st, &[Record::Sealed { meta: meta(5) }]));
        assert!(st.stage(&[Record::Sealed { meta: meta(6) }]).is_ok());
    }

    #[test]
    fn a_batch_is_validated_in_order_and_all_or_nothing() {
        let mut st = JournalState::default();
        // Later records see the earlier ones of the same batch.
        st.apply(&happy_path(1)).unwrap();
        let before = st.clone();
        let bad = vec![
            Record::Sealed { meta: meta(2) },
            uploading(2, 1, None),
            Record::Committed { id: SegmentId(2) },
        ];
        assert!(rejected(&st, &bad));
        assert_eq!(st, before, "a rejected batch leaves no trace");
    }

    #[test]
    fn new_attempt_clears_the_previous_result() {
        let mut st = at(SegmentState::Uploaded);
        st.apply(&[uploading(1, 2, Some("mp-2"))]).unwrap();
        let r = st.get(SegmentId(1)).unwrap();
        assert_eq!((r.attempt, r.etag.as_deref()), (2, None));
        assert_eq!(r.multipart_id.as_deref(), Some("mp-2"));
        st.apply(&[uploaded(1)]).unwrap();
        assert_eq!(st.get(SegmentId(1)).unwrap().multipart_id, None);
    }

    #[test]
    fn empty_key_is_rejected() {
        let st = at(SegmentState::Sealed);
        let rec = Record::Uploading {
            id: SegmentId(1),
            attempt: 1,
            key: String::new(),
            multipart_id: None,
        };
        assert!(rejected(&st, &[rec]));
    }
}
