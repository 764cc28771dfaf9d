//! What a reconcile run reports: options, findings and their kinds, the
//! report.

use super::*;

/// What the report says about stale multipart uploads when the backend
/// cannot list them.
pub const MULTIPART_NOT_CHECKED: &str = "not checked (the store API cannot list multipart \
     uploads; journaled ids are aborted on resume)";

/// Default age an orphan must reach before `repair` deletes it.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// What to do besides reporting.
#[derive(Clone, Debug)]
pub struct ReconcileOptions {
    /// Repair what can be repaired (re-upload, commit, rebuild, delete old
    /// orphans). Off: report only, nothing is written.
    pub repair: bool,
    /// Orphans younger than this are kept (an upload may be in flight).
    pub grace: Duration,
    /// Also read every journal-listed object back in full (CRC check).
    pub deep: bool,
    /// Segments whose loss the operator accepts (`tierindex reconcile
    /// --repair --deep --accept-loss ID`): each one this run finds LOST
    /// (its object missing or damaged, read in full, and no intact local
    /// copy) gets its manifest note marked accepted; any other is a
    /// finding, and nothing is accepted for it. Only with `repair` and
    /// `deep`.
    pub accept_loss: Vec<SegmentId>,
    /// The operator's reason, kept with each acceptance.
    pub accept_reason: String,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            repair: false,
            grace: DEFAULT_GRACE,
            deep: false,
            accept_loss: Vec::new(),
            accept_reason: String::new(),
        }
    }
}

/// What kind of disagreement a finding is.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A journal segment at Verified or later has no object under its key.
    ObjectMissing,
    /// Its object's size differs from the recorded `file_len`.
    SizeMismatch,
    /// (`deep`) Its object's bytes fail the full read-back check.
    ContentMismatch,
    /// The manifest lacks a journal Committed/Released segment.
    ManifestLostEntries,
    /// The manifest lists an object the listing lacks.
    ManifestListsMissingObject,
    /// No manifest, though segment objects exist and `manifest = true`.
    ManifestLost,
    /// A listed object left out of a rebuilt manifest (footer unreadable or
    /// disagreeing with its key, its size or the journal).
    UnusableObject,
    /// An object under this stream's segment key layout that neither the
    /// journal (same id and CRC) nor the manifest references: of unknown
    /// origin (another data directory on the stream, a lost or re-created
    /// data directory, a journal that lost records). Never deleted.
    Orphan,
    /// The object of one of our own `Quarantined` segments, under exactly
    /// the key the journal records for its upload attempt, never committed.
    /// The only kind of object the reconciler deletes as such (with proof).
    AbandonedUpload,
    /// An object under the segments prefix that is not one of our keys.
    Foreign,
    /// The manifest carries a damage note for the segment (a reader found
    /// its object damaged); or a lost segment the manifest did not mark.
    ManifestDamaged,
    /// An incomplete multipart upload under the segments prefix, initiated
    /// longer ago than the grace period.
    StaleMultipart,
}

impl FindingKind {
    pub fn describe(self) -> &'static str {
        match self {
            FindingKind::ObjectMissing => "object missing",
            FindingKind::SizeMismatch => "object size differs",
            FindingKind::ContentMismatch => "object content differs",
            FindingKind::ManifestLostEntries => "manifest lost entries",
            FindingKind::ManifestListsMissingObject => "manifest lists a missing object",
            FindingKind::ManifestLost => "manifest lost",
            FindingKind::UnusableObject => "unusable object",
            FindingKind::Orphan => "unreferenced object",
            FindingKind::AbandonedUpload => "abandoned upload of ours",
            FindingKind::Foreign => "foreign",
            FindingKind::ManifestDamaged => "manifest damage note",
            FindingKind::StaleMultipart => "stale multipart upload",
        }
    }
}

/// One disagreement and what was done about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    /// Segment id, when the finding is about one segment.
    pub segment: Option<u64>,
    /// Object key (or the manifest folder for [`FindingKind::ManifestLost`]).
    pub key: String,
    pub detail: String,
    /// The action taken, or "none ..." with the reason.
    pub action: String,
    /// The action fixed it.
    pub repaired: bool,
    /// No copy is left anywhere to repair from.
    pub lost: bool,
    /// Nothing is wrong that an operator must act on (foreign objects,
    /// young orphans, unreferenced ids kept for safety).
    pub informational: bool,
    /// Lost, and the manifest records that an operator accepted the loss
    /// (this run, or an earlier one): nothing more to act on.
    pub accepted_loss: bool,
    /// An object was deleted. The action names the proof it relied on (the
    /// journal record and its state, the manifest version, the age). A
    /// deletion is never counted as `repaired` on its own: when it is part of
    /// a repair (a wrong object replaced by the verified local copy) both are
    /// set.
    pub deleted: bool,
}

impl Finding {
    pub(super) fn new(kind: FindingKind, segment: Option<SegmentId>, key: &str, detail: String) -> Finding {
        Finding {
            kind,
            segment: segment.map(|s| s.0),
            key: key.to_string(),
            detail,
            action: "none".into(),
            repaired: false,
            lost: false,
            accepted_loss: false,
            informational: false,
            deleted: false,
        }
    }

    /// Left for an operator: not repaired, not deleted with proof and not
    /// merely informational.
    pub fn unresolved(&self) -> bool {
        !self.repaired && !self.deleted && !self.informational && !self.accepted_loss
    }
}

/// Everything a reconcile run found and did.
#[derive(Clone, Debug, Serialize)]
pub struct ReconcileReport {
    pub store: String,
    pub stream: String,
    pub repair: bool,
    pub deep: bool,
    pub grace_ms: u64,
    /// Segments in the journal (any state).
    pub journal_segments: usize,
    /// Objects listed under the segments prefix.
    pub listed_objects: usize,
    /// A manifest existed when the run started.
    pub manifest_present: bool,
    /// Entries in that manifest.
    pub manifest_segments: usize,
    /// `findings.len()`.
    pub findings_total: usize,
    pub repaired: usize,
    /// Objects deleted (each with its proof in the finding's action).
    pub deleted: usize,
    /// Findings left for an operator (lost ones included, accepted losses
    /// not).
    pub unresolved: usize,
    /// Lost findings whose loss is not accepted.
    pub lost: usize,
    /// Lost findings whose loss an operator accepted.
    pub accepted_losses: usize,
    /// Incomplete multipart uploads: "checked: N in progress, M stale, K
    /// aborted", or "not checked (why)" ([`MULTIPART_NOT_CHECKED`] for a
    /// backend that cannot list).
    pub multipart_uploads: String,
    pub findings: Vec<Finding>,
}

impl ReconcileReport {
    /// Something is lost or left unrepaired.
    pub fn needs_operator(&self) -> bool {
        self.unresolved > 0
    }
}

