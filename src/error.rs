//! The one public error type.
//!
//! Variants are coarse and say what the caller should do; the message carries
//! the detail (file, offset, expected vs found). Lower layers build these
//! through the helper constructors so the wording stays uniform.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in tierindex. Match on [`Error::kind`]
/// to decide what to do; the message carries the detail. New variants may
/// be added.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on a local file failed. Retrying may help for
    /// transient conditions (EINTR is already handled); ENOSPC needs space.
    #[error("I/O error on {path}: {source} ({context})")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        context: &'static str,
        /// The operating system's error.
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
    Corrupt {
        /// The file or structure.
        what: String,
        /// What was expected and what was found.
        detail: String,
    },

    /// A file was written by a newer tierindex (a format version this build
    /// does not read). Nothing is quarantined: upgrade, or move the file.
    #[error("unsupported format: {0}; upgrade tierindex to read it")]
    Unsupported(String),

    /// The data directory is locked by another live process.
    #[error("data directory {path} is locked by another process ({holder}); stop it first")]
    Locked {
        /// The data directory.
        path: PathBuf,
        /// Who holds the lock, as its lock file says.
        holder: String,
    },

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

/// What kind of failure an [`Error`] is, one per variant, for a caller
/// that acts on it (retry, restart, page an operator, fix configuration).
/// New kinds may be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Local I/O failed ([`Error::Io`]); ENOSPC needs space.
    Io,
    /// A durability step failed ([`Error::Poisoned`]): restart.
    Poisoned,
    /// Bytes on disk or in the store are invalid ([`Error::Corrupt`]).
    Corrupt,
    /// Written by a newer tierindex ([`Error::Unsupported`]): upgrade.
    Unsupported,
    /// The data directory is in use ([`Error::Locked`]).
    Locked,
    /// The segment is full ([`Error::SegmentFull`]).
    SegmentFull,
    /// Bad argument or configuration ([`Error::InvalidInput`]).
    InvalidInput,
    /// Shut down; no more appends ([`Error::ShutDown`]).
    ShutDown,
    /// The store failed in a way that may pass ([`Error::RemoteRetryable`]).
    RemoteRetryable,
    /// The store failed for good ([`Error::Remote`]).
    Remote,
    /// Another object sits under our key ([`Error::RemoteConflict`]).
    RemoteConflict,
    /// A newer owner fenced this one ([`Error::Fenced`]).
    Fenced,
    /// Another owner's lease is live ([`Error::Claimed`]).
    Claimed,
    /// A deadline passed ([`Error::Deadline`]).
    Deadline,
    /// A background task is gone ([`Error::Internal`]): restart.
    Internal,
}

impl Error {
    /// The kind of failure, to act on without parsing the message.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Poisoned(_) => ErrorKind::Poisoned,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Locked { .. } => ErrorKind::Locked,
            Error::SegmentFull(_) => ErrorKind::SegmentFull,
            Error::InvalidInput(_) => ErrorKind::InvalidInput,
            Error::ShutDown => ErrorKind::ShutDown,
            Error::RemoteRetryable(_) => ErrorKind::RemoteRetryable,
            Error::Remote(_) => ErrorKind::Remote,
            Error::RemoteConflict(_) => ErrorKind::RemoteConflict,
            Error::Fenced(_) => ErrorKind::Fenced,
            Error::Claimed(_) => ErrorKind::Claimed,
            Error::Deadline(_) => ErrorKind::Deadline,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

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
