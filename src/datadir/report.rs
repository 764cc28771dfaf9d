//! What a start-up check found and did: per-file notes (quarantined,
//! repaired active files, entries lost), the report, and what a repairing
//! start-up hands to the index writer.

use super::*;

/// Whether start-up may change files.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Truncate torn tails, quarantine bad files, remove finished leftovers.
    Repair,
    /// Only report what `Repair` would do (`tierindex fsck` without --repair).
    CheckOnly,
}

/// One file moved (or, in check-only mode, to be moved) to quarantine.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct QuarantineNote {
    /// The file, as found.
    pub file: String,
    /// Why it was moved aside.
    pub reason: String,
    /// Where it went (under `quarantine/`).
    pub moved_to: Option<String>,
}

/// The check of one active segment.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ActiveNote {
    /// The segment.
    pub id: u64,
    /// Items that passed their checks.
    pub valid_items: u32,
    /// Bytes of a torn tail zeroed (never acknowledged).
    pub torn_bytes_zeroed: u64,
    /// The file's length before it was extended back to its full size.
    pub extended_from: Option<u64>,
    /// Where a damaged span holding checksum-valid items was copied.
    pub tail_saved_to: Option<String>,
}

/// One damaged segment file whose intact items were salvaged (or that
/// held none that could be), with exactly what could not be kept.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LossNote {
    /// The segment.
    pub segment: u64,
    /// The damaged file, where it was found.
    pub file: String,
    /// "active" or "sealed".
    pub kind: String,
    /// Items whose own CRC verified and that were kept.
    pub salvaged_items: u64,
    /// Items that did not verify, between verified ones (or anywhere in a
    /// sealed file): entries that may have been acknowledged and are gone.
    pub lost_items: u64,
    /// The runs of lost items: first index, count, byte offset, bytes.
    pub lost: Vec<LostSpan>,
    /// Loss that cannot be counted (a truncated file, a file with no
    /// readable layout), in words.
    pub unknown_loss: Option<String>,
    /// The active header did not decode and was rebuilt.
    pub header_rebuilt: bool,
    /// Bytes found after a sealed file's footer and cut off: the length
    /// its header gives passed the whole-file checksum, so every item was
    /// kept as sealed (same bytes, same checksum).
    #[serde(default)]
    pub tail_removed: Option<u64>,
    /// The new sealed file holding the salvaged items.
    pub sealed_as: Option<String>,
    /// Where the damaged original went (None in check-only mode).
    pub original_moved_to: Option<String>,
}

impl LossNote {
    /// True when acknowledged entries may be gone: an operator must look.
    pub fn is_loss(&self) -> bool {
        self.lost_items > 0 || self.unknown_loss.is_some()
    }

    /// One line for reports.
    pub fn line(&self) -> String {
        // A file whose items could not be counted lost an unknown number:
        // "0 LOST" would read as nothing lost.
        let lost = if self.lost_items == 0 && self.unknown_loss.is_some() {
            "an unknown number".to_string()
        } else {
            self.lost_items.to_string()
        };
        if let Some(n) = self.tail_removed {
            let done = if self.original_moved_to.is_some() {
                "were cut off"
            } else {
                "are cut off at the next start"
            };
            return format!(
                "segment {:020} ({} file {}): {n} bytes found after its footer {done}; the \
                 length its header gives passes the whole-file checksum, so all {} items are \
                 kept as sealed, nothing lost",
                self.segment, self.kind, self.file, self.salvaged_items
            );
        }
        // Nothing lost (a sealed copy holds every entry, a header rebuilt
        // with every item intact): said so, not "0 LOST" (helper-94).
        let lost = if self.is_loss() {
            format!("{lost} LOST")
        } else {
            "nothing lost".to_string()
        };
        let mut s = format!(
            "segment {:020} ({} file {}): {} items salvaged, {lost}",
            self.segment, self.kind, self.file, self.salvaged_items
        );
        if !self.lost.is_empty() {
            s.push_str(&format!(": {}", salvage::describe(&self.lost)));
        }
        if let Some(u) = &self.unknown_loss {
            s.push_str(&format!("; {u}"));
        }
        if self.header_rebuilt {
            s.push_str("; header rebuilt from the configured geometry");
        }
        s
    }
}

/// Everything start-up found and did. Serializable for `--json`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Sealed segments that passed their check.
    pub sealed_ok: Vec<u64>,
    /// Active segments checked (and their torn tails).
    pub actives: Vec<ActiveNote>,
    /// Files moved to `quarantine/`.
    pub quarantined: Vec<QuarantineNote>,
    /// Damaged files whose intact items were salvaged; what was lost.
    pub salvaged: Vec<LossNote>,
    /// Sealed files whose every byte was checked: the whole-body CRC-64
    /// for format 2 (items themselves only when it fails, to salvage),
    /// every item's CRC for format 1. The others got the structural check
    /// (footer, header, directory).
    pub sealed_item_checked: Vec<u64>,
    /// Files removed because a durable copy of their content exists.
    pub removed: Vec<String>,
    /// Active segments that must be (or were) sealed again.
    pub to_reseal: Vec<u64>,
    /// Time the checks took.
    pub elapsed_ms: u64,
}

impl RecoveryReport {
    /// Items that may have been acknowledged and could not be salvaged.
    pub fn lost_items(&self) -> u64 {
        self.salvaged.iter().map(|n| n.lost_items).sum()
    }

    /// The salvage notes that report a loss.
    pub fn losses(&self) -> Vec<&LossNote> {
        self.salvaged.iter().filter(|n| n.is_loss()).collect()
    }

    /// True when nothing needed repair.
    pub fn is_clean(&self) -> bool {
        self.quarantined.is_empty()
            && self.salvaged.is_empty()
            && self.removed.is_empty()
            && self.to_reseal.is_empty()
            && self
                .actives
                .iter()
                .all(|a| a.torn_bytes_zeroed == 0 && a.extended_from.is_none())
    }
}

/// What a repairing start-up hands to the index writer.
pub struct Recovered {
    /// Checked sealed files, known by their footers (not mapped: a data
    /// directory may hold more than a process can map).
    pub sealed: BTreeMap<SegmentId, SealedInfo>,
    /// Active segments by id, oldest first. All but the newest must be sealed.
    pub actives: BTreeMap<SegmentId, ActiveSegment>,
    pub report: RecoveryReport,
    /// Highest segment id seen in any file name (including quarantined ones),
    /// so new ids never collide.
    pub max_id_seen: Option<SegmentId>,
}
