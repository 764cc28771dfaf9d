//! What opening, shutting down, `status` and a remote lookup report.

use super::*;

/// What opening found.
#[derive(Clone, Debug, Serialize)]
pub struct OpenReport {
    /// The last run ended with a clean shutdown (nothing pending).
    pub previous_shutdown_clean: bool,
    /// What the local checks found and did.
    pub segments: RecoveryReport,
    /// Upload-journal records replayed.
    pub journal_records_replayed: u64,
    /// Bytes of a torn journal tail cut off (never acknowledged).
    pub journal_truncated_bytes: u64,
    /// Anything else worth a line in the log.
    pub notes: Vec<String>,
    /// The store, without credentials.
    pub store: String,
}

/// What shutdown did and left. `pending` empty and `quarantined` empty means
/// fully drained.
#[derive(Clone, Debug, Serialize)]
pub struct ShutdownReport {
    /// Segments sealed by the shutdown itself.
    pub sealed_at_shutdown: usize,
    /// What the drain did and left.
    pub drain: DrainReport,
    /// Nothing was left: the next open finds a clean shutdown.
    pub clean_marker_written: bool,
    /// A failure that ended the shutdown early.
    pub error: Option<String>,
    /// Set when another owner took the stream's manifest (a newer epoch),
    /// or this process's take of it was refused (a single-writer broker):
    /// this process stopped writing to the store; segments not in the
    /// manifest stay in the journal (in whatever state they reached:
    /// `Sealed` to `Verified`) with their local files.
    pub fenced: Option<String>,
    /// Time the shutdown took.
    pub elapsed_ms: u64,
    /// Damaged local files found at open whose entries could not all be
    /// salvaged: segment, indices and byte offsets of what is gone. Not
    /// empty means an operator must look (exit code 4), even when
    /// everything salvaged was drained.
    pub lost: Vec<LossNote>,
    /// With the manifest: segments the journal records as committed that
    /// the stream's manifest does not list (checked at the end of the
    /// drain; a manifest rolled back or restored in the store, or another
    /// store). Readers through the manifest miss them: not empty means an
    /// operator must look (exit code 4); `tierindex reconcile --repair`
    /// commits those whose objects are in place.
    pub unlisted: Vec<u64>,
    /// Local sealed files the journal has no record of, below its highest
    /// id (it accepts only new ids above that one, so they were left in
    /// place: a second writer's seal, a record lost to journal damage).
    /// Their entries are uploaded by nothing: not empty means an operator
    /// must look (exit code 4). `tierindex status` lists them too.
    #[serde(default)]
    pub unjournaled: Vec<u64>,
    /// With the manifest: segments the stream's manifest, as this owner
    /// last saw it, marks damaged in the store (a reader or `reconcile`
    /// found the object wrong or missing): readers through the manifest
    /// skip them. Not empty means an operator must look (exit code 4);
    /// `tierindex reconcile --deep --repair` repairs those of which an
    /// intact local copy is held. Not part of
    /// [`fully_drained`](Self::fully_drained): nothing this process can
    /// drain is left.
    pub damaged_in_store: Vec<StoreDamage>,
}

/// A segment the stream's manifest marks damaged in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoreDamage {
    /// The segment's id.
    pub segment: u64,
    /// No intact copy was known when it was marked: its entries are lost
    /// unless a copy turns up.
    pub lost: bool,
    /// What the reader found.
    pub reason: String,
    /// An operator accepted the loss (`tierindex reconcile --accept-loss`):
    /// when (ms since the Unix epoch) and why. Reported, but nothing more
    /// is asked of an operator.
    pub loss_accepted: Option<(u64, String)>,
}

impl StoreDamage {
    /// Asks something of an operator: not a loss an operator accepted.
    pub fn needs_operator(&self) -> bool {
        !(self.lost && self.loss_accepted.is_some())
    }
}

impl ShutdownReport {
    /// Entries counted as lost (see [`ShutdownReport::lost`]).
    pub fn lost_items(&self) -> u64 {
        self.lost.iter().map(|n| n.lost_items).sum()
    }

    /// Nothing pending, quarantined, fenced or failed.
    pub fn fully_drained(&self) -> bool {
        self.error.is_none()
            && self.fenced.is_none()
            && self.drain.pending.is_empty()
            && self.drain.quarantined.is_empty()
            && self.unlisted.is_empty()
            && self.unjournaled.is_empty()
    }
}

/// Per-state counts and totals, for `status` and metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    /// The segment being written.
    pub active_segment: Option<u64>,
    /// Its items.
    pub active_items: u32,
    /// Journaled segments per upload state.
    pub by_state: std::collections::BTreeMap<String, u64>,
    /// Segments not yet done.
    pub pending_segments: u64,
    /// Their bytes.
    pub pending_bytes: u64,
    /// Age of the oldest of them.
    pub oldest_pending_age_ms: Option<u64>,
    /// Why the writer is poisoned (a durability step failed): restart.
    pub poisoned: Option<String>,
    /// Another owner took the stream's manifest; uploads stopped.
    pub fenced: Option<String>,
    /// Ownership of the stream's manifest is not taken yet (the store was
    /// unreachable at open): why. Segments wait at `Verified` until it is.
    pub manifest_pending: Option<String>,
    /// Entries in active (unsealed) segments: acknowledged or about to be,
    /// and not in any sealed file yet. Counted as pending work.
    pub unsealed_items: u64,
    /// Sealed files on disk that the journal does not know: above its
    /// highest id (a crash between seal and journal) they are pending,
    /// counted in `pending_segments`; below it they are also listed in
    /// `not_journaled` and not counted as pending.
    pub unjournaled_sealed: Vec<u64>,
    /// Of those, the ones below the journal's highest id: it can never
    /// record them, so nothing uploads their entries (`tierindex status`
    /// only; an operator must look). Not counted as pending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_journaled: Vec<u64>,
    /// Entries of damaged local files that could not be salvaged.
    pub lost_items: u64,
    /// One line per damaged file with loss (segment, indices, offsets).
    pub losses: Vec<String>,
    /// Local files (or `segments/` itself) that could not be read when
    /// counting, with why: `unsealed_items` and the pending counts leave
    /// them out (`tierindex status` only; an operator must look).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreadable_local: Vec<String>,
    /// The store's capability probe has answered (at open with the
    /// manifest, else in the background): until then every upload assumes
    /// the worst (no trusted conditional create, `Full` verification,
    /// signed bodies).
    pub store_probed: bool,
}

impl Status {
    /// Anything an operator must look at: quarantined segments or loss.
    pub fn needs_operator(&self) -> bool {
        self.by_state.get("Quarantined").copied().unwrap_or(0) > 0
            || !self.losses.is_empty()
            || !self.not_journaled.is_empty()
            || !self.unreadable_local.is_empty()
    }
}

/// What [`TierIndex::lookup_remote`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RemoteLookup {
    /// Entries from the remote segments read (in the list's order), then
    /// the local entries (as [`TierIndex::lookup`]). Not sorted: a remote
    /// segment another data directory committed may be newer than local
    /// ones.
    pub entries: Vec<Entry>,
    /// The local chain walk stopped at its bound.
    pub truncated: bool,
    /// Remote segments that were candidates (committed, not covered by the
    /// local lookup).
    pub remote_segments: usize,
    /// Segments that could not be read, with why: a corrupt or missing
    /// object under a committed key, and a local segment that cannot be
    /// read and has no committed copy. Reported here, loudly; they never
    /// hide the other segments' entries.
    pub unreadable: Vec<(u64, String)>,
    /// Segments this data directory's journal records committed that the
    /// stream's manifest does not list (manifest mode only): a manifest
    /// restored from an older version, or commits made to another store.
    /// They were searched all the same (their entries are in `entries`:
    /// read from the local copy, or else from the object the journal
    /// names), and logged as a warning; the manifest's other readers do not
    /// see them: `tierindex reconcile --repair` commits them again. No
    /// commit is ever taken out of a manifest, so this is empty in normal
    /// running.
    pub unlisted: Vec<u64>,
}

/// How a lookup reports a segment the manifest marks as damaged.
pub(crate) fn damage_text(d: &DamageNote) -> String {
    format!(
        "marked damaged in the manifest{}: {}",
        if d.lost {
            " (LOST: no intact copy was held)"
        } else {
            " (awaiting repair from a local copy)"
        },
        match &d.accepted {
            Some(a) => format!("{}; {}", d.reason, a.describe()),
            None => d.reason.clone(),
        }
    )
}
