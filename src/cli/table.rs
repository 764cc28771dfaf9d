//! The `status` table, shared by `status` and `status --remote` (which
//! appends a column).

use crate::journal::SegmentRecord;
use crate::tier::Status;

/// Column names of [`segment_line`].
pub(crate) const SEGMENT_HEADER: &str =
    "segment               state        items      bytes          checksum  key";

/// One line per journal segment (shared with `status --remote`, which
/// appends a column).
pub(crate) fn segment_line(r: &SegmentRecord) -> String {
    format!(
        "{:020}  {:<11} {:>6} {:>10}  {:>16}  {}{}",
        r.meta.id.0,
        format!("{:?}", r.state),
        r.meta.item_count,
        r.meta.file_len,
        r.meta.key_sum().to_string(),
        r.key.as_deref().unwrap_or("-"),
        r.reason
            .as_deref()
            .map(|x| format!("  ({x})"))
            .unwrap_or_default()
    )
}

/// The totals line of `status`.
pub(crate) fn totals_line(t: &Status) -> String {
    format!(
        "totals: {:?}; pending {} segments / {} bytes; oldest pending {}",
        t.by_state,
        t.pending_segments,
        t.pending_bytes,
        t.oldest_pending_age_ms
            .map(|a| format!("{} ms", a))
            .unwrap_or_else(|| "-".into())
    )
}
