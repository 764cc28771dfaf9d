//! # tierindex
//!
//! The tiered-storage index uploader with crash-safe shutdown, embedded by a
//! message broker: index entries go into an mmap'd segment, full segments are
//! sealed into immutable checksummed files, and a journaled pipeline uploads
//! them to S3-compatible storage and verifies them before anything is marked
//! done or deleted.
//!
//! ## Layout
//! - [`segment`]: formats; the mmap active segment (`append`, `flush`,
//!   `lookup` while writing); the sealed file (write, check, read).
//! - [`datadir`]: the data directory: lock, start-up checks, torn-tail
//!   truncation, quarantine.
//! - [`index`]: the writer that rolls segments and seals in the background.
//! - [`journal`]: the durable, CRC-framed upload state machine per segment.
//! - [`remote`]: stores from URLs, key layout, capability probe.
//! - [`upload`]: create-only PUT / multipart, retries, read-back verification.
//! - [`pipeline`]: group-committed journal, per-segment drive, scheduler.
//! - [`tier`]: [`TierIndex`], the embedding API (open, append, flush,
//!   lookup, status, shutdown).
//! - [`lifecycle`]: exit codes and the opt-in signal helper.
//! - [`recovery`]: the reconciler (journal vs manifest vs bucket listing).
//! - [`config`], [`metrics`], [`error`].
//!
//! ## Data flow
//! ```text
//! broker --append--> ActiveSegment (mmap) --flush(msync)--> durable
//!                         | full / old / shutdown
//!                         v
//!                  sealer thread --> NNN.seg (tmp, fsync, rename, fsync dir)
//!                         |
//!                         v  journal: Sealed -> Uploading -> Uploaded -> Verified -> Committed -> Released
//!                  scheduler (bounded in-flight) --PUT create-only--> store --read back--> verified
//! ```
//! Every persist step and its crash outcome is tabled in
//! `docs/crash-safety.md`; byte formats are in `docs/format/`.

#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod datadir;
pub mod durable;
pub mod error;
pub mod failpoint;
pub mod identity;
pub mod index;
pub mod journal;
pub mod lifecycle;
pub mod metrics;
pub mod pipeline;
pub mod recovery;
pub mod remote;
pub mod segment;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;
pub mod tier;
pub mod upload;

pub use config::Config;
pub use error::{Error, Result};
pub use segment::{Entry, SealedMeta, SegmentId, TimeRange, key_hash};
pub use tier::{ShutdownReport, TierIndex};
