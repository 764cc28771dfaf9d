//! Uploading sealed segments: one object per sealed file, created once,
//! never overwritten, never deleted by this module, verified after writing.
//!
//! ## Order of one upload ([`put_segment`])
//! 1. Read the local file and check it against the journal's [`SealedMeta`]
//!    (length, whole-file CRC, footer): never send bytes that are not the
//!    sealed file the journal describes (pair assertion).
//! 2. Below `multipart_threshold_bytes` (or when the store has no multipart
//!    API): one `PUT` with `PutMode::Create` (`If-None-Match: *`) carrying
//!    the CRC and length as object metadata.
//!    Above it: HEAD the key (multipart has no conditional mode), create the
//!    upload, call [`UploadHooks::multipart_started`] so the caller journals
//!    the upload id *before* any part is sent, send the parts, complete.
//! 3. Verify (see [`VerifyLevel`]); after multipart or on a store whose
//!    conditional create is not trusted, at [`VerifyLevel::Checksum`] where
//!    the probe proved the server validates checksums, else
//!    [`VerifyLevel::Full`]: either way the body itself is proven.
//!
//! ## Consistency
//! The key holds the file's CRC (`remote::keys`), so an object already under
//! our key is our bytes unless something went wrong. `AlreadyExists` is
//! therefore resolved by comparing content ([`remote_matches`]): equal →
//! [`PutOutcome::AlreadyPresent`], different → [`Error::RemoteConflict`],
//! object left untouched for an operator.
//!
//! ## Retries
//! [`crate::retry`] wraps every request in a deadline and a capped full-jitter
//! backoff. A create retried after a lost answer comes back `AlreadyExists`
//! and is settled by the same content comparison. A verification read that
//! disagrees with the local CRC is re-read: only two consecutive reads that
//! see the *same* wrong content make it `Corrupt` (a flipped bit on the wire
//! is not a corrupt object).
//!
//! ## Cancellation
//! Dropping the future of [`put_segment`] is safe: at worst it leaves a
//! complete object (found by the next attempt as AlreadyPresent) or an
//! incomplete multipart upload whose id the caller journaled through the hook
//! (abort it with [`abort_multipart`]). An upload whose `create_multipart`
//! answer was lost is not in the journal: the reconciler lists incomplete
//! uploads and aborts ours past the grace period (`tierindex reconcile
//! --repair`), or a bucket lifecycle rule (AbortIncompleteMultipartUpload)
//! cleans them up where the server cannot list them.
//!
//! ## Crash consistency
//! Nothing here is durable locally; the caller journals "uploading", the
//! multipart id (through the hook) and "uploaded" around these calls. A crash
//! anywhere leaves either nothing, a complete object equal to the file, or
//! an incomplete multipart upload: resuming calls `put_segment` again.

pub mod put;
pub mod verify;

// The retry loop is at the crate root (`remote` uses it too, and `upload`
// uses `remote`); its old path stays for this crate's tests.
#[cfg(feature = "testing")]
pub use crate::retry;
#[cfg(not(feature = "testing"))]
use crate::retry;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::remote::RemoteStore;
use crate::segment::SealedMeta;

pub use put::{CheckedBytes, NotChecked, abort_multipart_cfg, put_segment_checked};
#[cfg(any(test, feature = "testing"))]
pub use put::{abort_multipart, put_segment};
#[cfg(any(test, feature = "testing"))]
pub use verify::remote_matches;
pub use verify::{remote_matches_cfg, verify_segment, verify_segment_cfg};

/// How an uploaded object is checked before it counts as `Verified`.
///
/// What each level proves:
/// - `Full` reads the stored body back and proves it is byte for byte the
///   sealed file (a format-2 file: its CRC-64/NVME, which sees every byte
///   and its position).
/// - `Checksum` proves the server received and recorded exactly the sealed
///   file's bytes (the stored value is computed from the body it received,
///   and the probe proved it refuses a mismatch). It cannot see damage at
///   rest after that, nor a multipart assembly gone wrong after the parts
///   were validated; a periodic `tierindex verify` (a `Full` read) does.
/// - `Footer` and `Head` prove only what we sent about the object (its
///   size, our own metadata, its last 128 bytes): weaker, explicit choices.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VerifyLevel {
    /// The default. A HEAD with `x-amz-checksum-mode: ENABLED`: the size
    /// and the server's stored whole-object CRC-64/NVME must equal the
    /// sealed file's. Proves the body without downloading it, and is used
    /// only where the capability probe proved the server validates the
    /// checksum on PutObject and UploadPart and returns whole-object values
    /// (`Capabilities::checksum_validated`). Everywhere else (stores that
    /// are not S3, servers that do not validate, format-1 files) it is
    /// [`VerifyLevel::Full`].
    #[default]
    Checksum,
    /// GET the whole object, streamed: size, metadata (when the store keeps
    /// it), the CRC-64/NVME of the body (CRC32 for a format-1 file, which
    /// must then also pass every reader check), and the footer. Catches any
    /// corruption. Costs one full download.
    Full,
    /// HEAD (size, metadata) plus a ranged GET of the last 128 bytes: the
    /// footer decodes and matches. Does NOT prove the body: corruption in
    /// the middle of the object (same size, footer intact) passes.
    Footer,
    /// HEAD only: size and metadata. Does NOT prove the body; on a store
    /// without object metadata (file://) it checks only the size.
    Head,
}

impl VerifyLevel {
    /// The level actually used for `meta` on a store where the checksum
    /// probe answered `checksum_proven`: `Checksum` falls back to `Full`
    /// unless both the server and the file (format 2) support it.
    pub fn effective(self, meta: &SealedMeta, checksum_proven: bool) -> VerifyLevel {
        match self {
            VerifyLevel::Checksum if !checksum_proven || meta.crc64.is_none() => VerifyLevel::Full,
            l => l,
        }
    }
}

/// Tuning of [`put_segment`].
#[derive(Clone, Debug)]
pub struct UploadConfig {
    /// Files at least this large go through multipart upload (default 16 MiB).
    pub multipart_threshold_bytes: u64,
    /// Size of every part but the last (default 8 MiB; at least 5 MiB except
    /// on `memory://`). Raised automatically to stay within 10 000 parts.
    pub part_size_bytes: u64,
    /// Attempts per request, the first included (default 5).
    pub max_attempts: u32,
    /// First backoff step (default 100 ms); doubles per retry.
    pub backoff_base: Duration,
    /// Backoff cap (default 5 s).
    pub backoff_max: Duration,
    /// Deadline of one request (default 60 s).
    pub request_timeout: Duration,
    /// Verification after a successful create (default
    /// [`VerifyLevel::Checksum`], which is `Full` unless the probe proved
    /// server-side checksums).
    pub verify: VerifyLevel,
    /// From the probe: does `PutMode::Create` really refuse to overwrite?
    /// When false (Garage), the key is checked before the PUT and the body
    /// is proven afterwards (`Checksum` or `Full`) to be ours.
    pub trust_conditional_create: bool,
    /// From the probe: does the server validate and return CRC-64/NVME
    /// checksums (`Capabilities::checksum_validated`)? Only then is
    /// [`VerifyLevel::Checksum`] used.
    pub checksum_proven: bool,
    /// From the probe: the server also validates the checksum header of a
    /// request whose body is left out of the signature
    /// (`ChecksumProbe::unsigned_payload_validated`). Then segment bodies
    /// go through the store's unsigned-payload client, where it has one
    /// ([`RemoteStore::has_unsigned_body_client`]), saving a SHA-256 pass
    /// over every byte.
    pub unsigned_payload: bool,
}

impl Default for UploadConfig {
    fn default() -> Self {
        UploadConfig {
            multipart_threshold_bytes: 16 * 1024 * 1024,
            part_size_bytes: 8 * 1024 * 1024,
            max_attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            verify: VerifyLevel::Checksum,
            trust_conditional_create: false,
            checksum_proven: false,
            unsigned_payload: false,
        }
    }
}

/// S3's hard limits on multipart uploads.
pub const MAX_PARTS: u64 = 10_000;
pub const MAX_PART_BYTES: u64 = 5 * 1024 * 1024 * 1024;

impl UploadConfig {
    /// True when a write of `meta` to `store` could have replaced someone
    /// else's bytes: a multipart upload (no conditional mode exists) or a
    /// create on a store whose `If-None-Match` is not trusted.
    pub fn write_may_replace(&self, store: &RemoteStore, meta: &SealedMeta) -> bool {
        let multipart =
            meta.file_len >= self.multipart_threshold_bytes && store.multipart().is_some();
        multipart || !self.trust_conditional_create
    }

    /// The level an object just written (or found `Uploaded` after a
    /// crash) is verified at. Where the write could have replaced someone
    /// else's bytes the body must be proven: an explicit `Full` stays
    /// `Full`, anything weaker becomes `Checksum`. `Checksum` is `Full`
    /// where the store's checksums are not proven (see
    /// [`VerifyLevel::effective`]).
    pub fn level_after_write(&self, store: &RemoteStore, meta: &SealedMeta) -> VerifyLevel {
        if self.write_may_replace(store, meta) && self.verify != VerifyLevel::Full {
            VerifyLevel::Checksum
        } else {
            self.verify
        }
        .effective(meta, self.checksum_proven)
    }

    /// True when segment bodies may skip payload signing: the probe proved
    /// the server validates their checksum header both signed and unsigned.
    pub fn unsigned_body(&self) -> bool {
        self.unsigned_payload && self.checksum_proven
    }

    /// Rejects settings the store cannot honour (the part size only matters
    /// where the store has a multipart API).
    pub fn validate(&self, store: &RemoteStore) -> Result<()> {
        if self.max_attempts == 0 {
            return Err(Error::InvalidInput(
                "max_attempts must be at least 1".into(),
            ));
        }
        let min = store.min_part_bytes();
        let parts_used = store.multipart().is_some();
        if parts_used && (self.part_size_bytes < min || self.part_size_bytes > MAX_PART_BYTES) {
            return Err(Error::InvalidInput(format!(
                "part_size_bytes {} must be in {min}..={MAX_PART_BYTES} for {}",
                self.part_size_bytes,
                store.display_url()
            )));
        }
        if self.request_timeout.is_zero() || self.backoff_base > self.backoff_max {
            return Err(Error::InvalidInput(
                "request_timeout must be > 0 and backoff_base <= backoff_max".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn retry_policy(&self) -> retry::RetryPolicy {
        retry::RetryPolicy {
            max_attempts: self.max_attempts,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
            request_timeout: self.request_timeout,
        }
    }
}

/// Callbacks into the caller's journal.
pub trait UploadHooks: Send {
    /// A multipart upload was created under `upload_id`; called before the
    /// first part is sent. The caller makes the id durable before returning
    /// so a crash can abort the upload later. An error aborts the upload
    /// (best effort) and is returned from [`put_segment`].
    fn multipart_started(&mut self, upload_id: &str) -> Result<()>;
}

/// Hooks that record nothing (tests, one-off CLI uploads).
#[derive(Debug, Default)]
pub struct NoHooks;

impl UploadHooks for NoHooks {
    fn multipart_started(&mut self, _upload_id: &str) -> Result<()> {
        Ok(())
    }
}

/// How [`put_segment`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// We wrote the object (and verified it).
    Created {
        etag: Option<String>,
        version: Option<String>,
    },
    /// The key already held an object and its bytes equal ours (an earlier
    /// attempt whose answer was lost, or another uploader of the same file).
    AlreadyPresent,
}

/// The remote object compared to a local [`crate::SealedMeta`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteMatch {
    Missing,
    Matches,
    /// Present with other content; the string says what differs.
    Differs(String),
}
