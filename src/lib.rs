//! # tierindex
//!
//! The tiered-storage index uploader with crash-safe shutdown, embedded by a
//! message broker: index entries go into an mmap'd segment, full segments are
//! sealed into immutable checksummed files, and a journaled pipeline uploads
//! them to S3-compatible storage and verifies them before anything is marked
//! done or deleted.
//!
//! ## Using it
//!
//! [`TierIndex::open`] recovers whatever a crash left and starts the
//! background work on the caller's tokio runtime. [`TierIndex::append`]
//! indexes one message (key, offset, size, timestamp);
//! [`TierIndex::flush`] is the durability point: what it returned for
//! survives kill -9 and power loss. [`TierIndex::lookup`] reads local
//! segments while they are written, [`TierIndex::lookup_remote`] the
//! uploaded ones too. [`TierIndex::shutdown`] seals the last segment and
//! drains within a deadline; its [`ShutdownReport`] says what is left.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! use std::time::Duration;
//! use tierindex::{Config, TierIndex, TimeRange};
//!
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! rt.block_on(async {
//!     // The store defaults to a `file://` directory beside the data
//!     // directory; `.store("s3://bucket/prefix")` uploads to S3.
//!     let cfg = Config::builder(dir.path().join("data")).stream("orders-7").build()?;
//!     let (index, _opened) = TierIndex::open(cfg).await?;
//!     index.append(b"order-42", 1_000, 512, 1_700_000_000_000)?;
//!     index.flush()?; // acknowledged: survives a crash from here on
//!     let found = index.lookup(b"order-42", TimeRange::ALL);
//!     assert_eq!(found.entries[0].offset, 1_000);
//!     let report = index.shutdown(Duration::from_secs(20)).await;
//!     assert!(report.fully_drained(), "{report:?}");
//!     Ok::<_, tierindex::Error>(())
//! })?;
//! # Ok(())
//! # }
//! ```
//!
//! Errors carry an [`ErrorKind`] to act on ([`Error::kind`]). The library
//! installs no signal handler unless the host calls
//! [`lifecycle::ShutdownSignals::install`]; [`lifecycle`] also has the exit
//! codes the `tierindex` tool uses.
//!
//! ## Features
//! - `cli`: the `tierindex` command-line tool (demo broker and recovery);
//!   off by default, so an embedding broker compiles none of it.
//! - `failpoints`: named crash and I/O-error points at every persist step,
//!   for the crash tests only; never in a release.
//! - `testing`: this crate's own test support; not a supported API.
//!
//! ## Data flow
//! ```text
//! broker --append--> active segment (mmap) --flush(msync)--> durable
//!                         | full / old / shutdown
//!                         v
//!                  sealer --> NNN.seg (tmp, fsync, rename, fsync dir)
//!                         |
//!                         v  journal: Sealed -> Uploading -> Uploaded -> Verified -> Committed -> Released
//!                  scheduler (bounded in-flight) --PUT create-only--> store --verify--> Verified
//! ```
//! Every persist step and its crash outcome is tabled in
//! `docs/crash-safety.md`; byte formats are in `docs/format/`; the module
//! map is in `docs/ARCHITECTURE.md`.

#![cfg_attr(not(feature = "testing"), warn(missing_docs))]
// Without `cli` (the embedder's build) the items only the command-line tool
// uses are unused by design; `scripts/check-embedder.sh` lints the build
// with `cli` and without `testing`, where nothing may be dead.
#![cfg_attr(
    not(any(feature = "cli", feature = "testing")),
    allow(dead_code, unused_imports)
)]

/// Declares the internal modules: private to the crate, except with the
/// `testing` feature (this crate's own tests and examples), where they are
/// public and hidden from the docs. An embedder sees only the re-exports
/// below and [`lifecycle`].
macro_rules! internal_modules {
    ($($name:ident),* $(,)?) => {
        $(
            #[cfg(feature = "testing")]
            #[doc(hidden)]
            pub mod $name;
            #[cfg(not(feature = "testing"))]
            mod $name;
        )*
    };
}

internal_modules!(
    config, datadir, durable, error, failpoint, identity, index, journal, lanes, lock, metrics,
    pipeline, recovery, remote, retry, segment, tier, upload,
);

#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod cli;
pub mod lifecycle;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;

pub use config::{Config, ConfigBuilder};
pub use datadir::{ActiveNote, LossNote, QuarantineNote, RecoveryReport};
pub use error::{Error, ErrorKind, Result};
pub use lanes::schedule_as_background;
pub use metrics::{Counter, DurationHistogram, Gauge, Metrics};
pub use pipeline::slots::{SlotCounts, set_max_uploads_in_flight_per_process, upload_slot_counts};
pub use pipeline::{DrainReport, PendingNote};
pub use segment::active::Lookup;
pub use segment::salvage::LostSpan;
pub use segment::{Entry, SegmentId, TimeRange, key_hash};
pub use tier::{
    Adopted, Host, OpenReport, RemoteLookup, ShutdownReport, Status, Store, StoreDamage, TierIndex,
};
pub use upload::VerifyLevel;
