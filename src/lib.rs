//! # tierindex
//!
//! The tiered-storage index uploader with crash-safe shutdown, embedded by a
//! message broker.
//!
//! ## Layout
//! - [`segment`]: the mmap-backed active segment (`append`, `flush`, `lookup`
//!   while writing) and the immutable, checksummed sealed file.
//! - [`datadir`]: the data directory: lock file, start-up sanity checks,
//!   torn-tail truncation, quarantine.
//! - [`index`]: the writer that owns the active segment, rolls it when full or
//!   old, and seals in the background.
//!
//! ## Data flow
//! ```text
//! broker --append--> ActiveSegment (mmap) --flush(msync)--> durable
//!                         | full / old / shutdown
//!                         v
//!                  sealer thread --> NNN.seg (tmp, fsync, rename, fsync dir)
//! ```
//! Crash behaviour of every persist step is tabled in `docs/crash-safety.md`.

pub mod datadir;
pub mod error;
pub mod index;
pub mod journal;

pub mod remote;
pub mod segment;
pub mod testing;
pub mod upload;

pub use error::{Error, Result};
pub use segment::{Entry, SealedMeta, SegmentId, TimeRange, key_hash};
