//! Offline recovery tools that compare what the data directory, the
//! remote manifest and the bucket each believe, and repair what can be
//! repaired without guessing.
//!
//! - [`reconcile`]: journal vs manifest vs a LIST of the segment objects.

pub mod reconcile;

// Re-exported for the tests (feature `testing`); the crate uses a part.
#[cfg_attr(not(any(test, feature = "testing")), allow(unused_imports))]
pub use reconcile::{
    Finding, FindingKind, MULTIPART_NOT_CHECKED, ReconcileOptions, ReconcileReport,
    reconcile as run_reconcile,
};
