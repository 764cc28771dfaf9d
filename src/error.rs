//! The one public error type.
//!
//! Variants are coarse and say what the caller should do; the message carries
//! the detail (file, offset, expected vs found). Lower layers build these
//! through the helper constructors so the wording stays uniform.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in tierindex.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a local file failed. Retrying may help for
    /// transient conditions (EINTR is already handled); ENOSPC needs space.
    #[error("I/O error on {path}: {source} ({context})")]
    Io {
        path: PathBuf,
        context: &'static str,
        #[source]
        source: io::Error,
    },

    /// A durability step (msync/fsync) failed, or one failed earlier. The
    /// writer is poisoned: nothing appended since the last successful flush
    /// is acknowledged. Restart the process; recovery keeps what was durable.
    #[error("writer poisoned: {0}; restart to recover what was durable")]
    Poisoned(String),

    /// Bytes read from disk or from the store do not form a valid structure.
    /// The file is quarantined where that applies; never retried blindly.
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: String, detail: String },

    /// A file was written by a newer tierindex (a format version this build
    /// does not read). Nothing is quarantined: upgrade, or move the file.
    #[error("unsupported format: {0}; upgrade tierindex to read it")]
    Unsupported(String),

    /// The data directory is locked by another live process.
    #[error("data directory {path} is locked by another process ({holder}); stop it first")]
    Locked { path: PathBuf, holder: String },

    /// The segment cannot take more items; roll to a new one (the index
    /// writer does this itself).
    #[error("segment {0} is full")]
    SegmentFull(u64),

    /// The caller passed an invalid argument or configuration.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The writer is shutting down or shut down; no more appends.
    #[error("tierindex is shut down; no further appends are accepted")]
    ShutDown,

    /// A remote-store operation failed in a way that may succeed later.
    #[error("object store (retryable): {0}")]
    RemoteRetryable(String),

    /// A remote-store operation failed permanently (auth, bad config, ...).
    #[error("object store: {0}")]
    Remote(String),

    /// The remote object under our key holds other bytes than ours. Never
    /// overwritten: this needs an operator.
    #[error("remote conflict: {0}")]
    RemoteConflict(String),

    /// Another owner holds a newer epoch; this process must stop publishing.
    #[error("fenced: {0}")]
    Fenced(String),

    /// A stream is owned by another writer whose lease is still live; it may
    /// be taken only once the lease expires or is released. The message
    /// names the holder, its epoch and the expiry.
    #[error("ownership refused: {0}")]
    Claimed(String),

    /// An operation did not finish before its deadline.
    #[error("deadline exceeded: {0}")]
    Deadline(String),

    /// A background thread or task this process relies on is gone (it
    /// panicked or was cancelled: a bug, not a disk failure). Nothing more
    /// is acknowledged through it; restart to recover what was durable.
    /// Distinct from [`Error::Poisoned`], which means a durability step
    /// failed.
    #[error("internal failure: {0}; restart to recover what was durable")]
    Internal(String),
}

impl Error {
    /// An I/O error with the path and what we were doing.
    pub fn io(path: impl AsRef<Path>, context: &'static str, source: io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            context,
            source,
        }
    }

    /// A corruption error for `what` (a file name or structure).
    pub fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// True when retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::RemoteRetryable(_) | Error::Deadline(_))
    }
}
