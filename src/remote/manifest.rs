//! The remote manifest of a stream: the list of committed segments, the
//! owner's epoch and lease, published by compare-and-swap.
//!
//! ## Layout
//! ```text
//! {prefix}/{stream}/manifest/versions/{version:020}.manifest            one per version, create-only
//! {prefix}/{stream}/manifest/chunks/{first:020}-{last:020}-{crc:08x}.chunk   spilled entries, create-only
//! {prefix}/{stream}/manifest/leases/{epoch:020}/{seq:020}.lease         lease renewals, create-only
//! ```
//!
//! ## Compare-and-swap: one create-only object per version
//! Every manifest version is its own object, written once with
//! `PutMode::Create` (`If-None-Match: *`); the current manifest is the
//! highest version listed. A writer that read version `v` publishes `v + 1`;
//! if that create answers `AlreadyExists`, somebody else published first (or
//! our own earlier attempt did, its answer lost): the writer re-reads and
//! either settles (same epoch: rebase and retry) or stops (`Error::Fenced`).
//!
//! Why not `PutMode::Update` on one fixed key: `LocalFileSystem` (file://)
//! implements `Create` (an atomic hard link) but not `Update`, and a second
//! compare-and-swap (flock'ed lock file) would be a second code path to test
//! and one that breaks on network file systems. Create-only versions work
//! the same on S3, s3s-fs, moto, `InMemory` and file://, every version is an
//! immutable object (a lost answer is settled by comparing bytes, as for
//! segments), and old versions double as an audit trail.
//!
//! Old versions are deleted (best effort) so that the newest
//! `keep_versions` remain: publishing version `w` deletes `w - keep`. So a
//! slot is only ever empty again when a version at least `keep` higher
//! exists. A writer paused for that long may re-create an old, deleted
//! slot; right after every create it lists the versions above its own and,
//! if one is `>= own + keep`, its object is void: it deletes it and re-reads
//! (and is fenced). Readers take the highest version, which a stale slot
//! never is.
//!
//! ## Bytes
//! A 16-byte envelope (magic `TIMF`, envelope version, kind, body length,
//! CRC32 of the body) around a JSON body. Decoding treats bytes as
//! untrusted: size limit before reading, exact length, CRC, versions,
//! strict field set, and the structure's invariants; any failure is
//! `Error::Corrupt` (or `Error::Unsupported` for a newer version), never a
//! panic. The full contract is in `docs/format/remote-layout.md`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{
    GetOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::remote::keys;
use crate::remote::lease::{self, Clock, Lease, SystemClock};
use crate::remote::probe::{self, Capabilities};
use crate::remote::{RemoteStore, classify};
use crate::segment::{KeySum, SealedMeta, SegmentId};
use crate::retry::{RetryPolicy, with_retries};

mod codec;
mod hosted;
mod renewal;
mod store;
mod writer;

pub use codec::*;
pub use hosted::HostLeases;
// Re-exported for the tests (feature `testing`).
#[cfg_attr(not(any(test, feature = "testing")), allow(unused_imports))]
pub use hosted::{
    HOST_MEMBERS_MAX, HOSTS_DIR, HostMember, HostRenewal, decode_host_renewal,
    encode_host_renewal,
};
pub use store::*;
pub use writer::*;
// Re-exported for the tests (feature `testing`); the crate uses a part.
#[cfg_attr(not(any(test, feature = "testing")), allow(unused_imports))]
pub use renewal::{
    CurrentLease, KEEP_RENEWALS, LEASE_SUFFIX, LEASES_DIR, LeaseKeeper, Renewal, decode_renewal,
    encode_renewal,
};

/// The lowest segment id an owner of `epoch` may give a new segment:
/// `(epoch - 1) << 32` (0 for the first epoch). Each epoch numbers its
/// segments in its own range, so an owner that was fenced with sealed,
/// uncommitted segments never finds their ids taken by the owner that
/// fenced it (the next owner starts above the manifest *and* above every
/// id an earlier epoch could have handed out locally); when it takes the
/// stream again it commits them under their own ids. 2^32 ids per epoch
/// is more than any owner seals.
pub fn epoch_id_floor(epoch: u64) -> SegmentId {
    SegmentId(epoch.saturating_sub(1).min(u64::from(u32::MAX)) << 32)
}

/// Folder under a stream that holds the manifest objects.
pub const MANIFEST_DIR: &str = "manifest";
/// Folder under `manifest/` with one object per manifest version.
pub const VERSIONS_DIR: &str = "versions";
/// Folder under `manifest/` with the spilled entry chunks.
pub const CHUNKS_DIR: &str = "chunks";
pub const VERSION_SUFFIX: &str = ".manifest";
pub const CHUNK_SUFFIX: &str = ".chunk";
/// Version of the JSON body (`format` field).
pub const FORMAT_VERSION: u32 = 1;
/// Version of the binary envelope.
pub const ENVELOPE_VERSION: u16 = 1;
/// Envelope header length in bytes.
pub const HEADER_LEN: usize = 16;
const MAGIC: [u8; 4] = *b"TIMF";
const KIND_HEAD: u8 = 1;
const KIND_CHUNK: u8 = 2;
/// Attempts of "list, then GET the highest" when versions keep vanishing
/// (deleted by a newer writer's clean-up) in between.
const LOAD_ATTEMPTS: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64) -> SegmentEntry {
        SegmentEntry {
            id: SegmentId(id),
            key: format!(
                "p/s/segments/{}",
                keys::segment_object_name(SegmentId(id), KeySum::Crc32(id as u32))
            ),
            file_len: 100 + id,
            file_crc: id as u32,
            crc64: None,
            item_count: 3,
            min_offset: id * 10,
            max_offset: id * 10 + 2,
            min_ts: 1_000 + id,
            max_ts: 2_000 + id,
        }
    }

    fn manifest(n: u64) -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            stream: "s".into(),
            version: 7,
            epoch: 2,
            lease: Some(Lease {
                owner: "a".into(),
                epoch: 2,
                acquired_ms: 5,
                expires_ms: 10,
            }),
            written_ms: 6,
            segment_count: n,
            chunks: Vec::new(),
            segments: (1..=n).map(entry).collect(),
            damaged: Vec::new(),
        }
    }

    const MAX: usize = 1 << 20;

    #[test]
    fn manifest_round_trip() {
        let m = manifest(5);
        let b = encode_manifest(&m).unwrap();
        assert_eq!(&b[..4], b"TIMF");
        assert_eq!(decode_manifest(&b, "s", 7, MAX).unwrap(), m);
        // Another stream or version than the key says: corrupt.
        assert!(matches!(
            decode_manifest(&b, "t", 7, MAX),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            decode_manifest(&b, "s", 8, MAX),
            Err(Error::Corrupt { .. })
        ));
    }

    /// An accepted loss round-trips; a note without one encodes as before
    /// (older builds, whose notes have no such field, read it); an
    /// acceptance of a note that is not LOST, or with an over-long reason,
    /// is refused as damage.
    #[test]
    fn an_accepted_loss_round_trips_and_only_on_a_lost_note() {
        let mut m = manifest(3);
        m.damaged = vec![DamageNote::new(&entry(2), "missing", true, 9)];
        let plain = encode_manifest(&m).unwrap();
        assert!(!String::from_utf8_lossy(&plain).contains("accepted"));
        assert_eq!(decode_manifest(&plain, "s", 7, MAX).unwrap(), m);
        m.damaged[0].accepted = Some(LossAcceptance {
            at_ms: 11,
            reason: "gone".into(),
        });
        let b = encode_manifest(&m).unwrap();
        let back = decode_manifest(&b, "s", 7, MAX).unwrap();
        assert!(back.damaged[0].loss_accepted());
        assert_eq!(back, m);
        let mut not_lost = m.clone();
        not_lost.damaged[0].lost = false;
        assert!(encode_manifest(&not_lost).is_err() || decode_manifest(&encode_manifest(&not_lost).unwrap(), "s", 7, MAX).is_err());
        assert!(acceptance_text(u64::MAX, "r").contains("ms since the epoch"));
        let mut late = m.clone();
        late.damaged[0].accepted.as_mut().unwrap().at_ms = ACCEPTED_MS_MAX + 1;
        assert!(
            encode_manifest(&late).is_err()
                || decode_manifest(&encode_manifest(&late).unwrap(), "s", 7, MAX).is_err()
        );
        let mut long = m.clone();
        long.damaged[0].accepted.as_mut().unwrap().reason = "x".repeat(DAMAGE_REASON_MAX + 1);
        assert!(encode_manifest(&long).is_err() || decode_manifest(&encode_manifest(&long).unwrap(), "s", 7, MAX).is_err());
    }

    #[test]
    fn every_single_bit_flip_and_truncation_is_caught() {
        let b = encode_manifest(&manifest(3)).unwrap();
        for i in 0..b.len() * 8 {
            let mut x = b.clone();
            x[i / 8] ^= 1 << (i % 8);
            let r = decode_manifest(&x, "s", 7, MAX);
            assert!(
                matches!(r, Err(Error::Corrupt { .. } | Error::Unsupported(_))),
                "bit {i}: {r:?}"
            );
        }
        for len in 0..b.len() {
            let r = decode_manifest(&b[..len], "s", 7, MAX);
            assert!(matches!(r, Err(Error::Corrupt { .. })), "len {len}: {r:?}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(decode_manifest(&long, "s", 7, MAX).is_err());
    }

    #[test]
    fn garbage_and_huge_lengths_are_errors_not_panics() {
        let mut rng = fastrand::Rng::with_seed(42);
        for _ in 0..20_000 {
            let len = rng.usize(0..200);
            let mut v: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if rng.bool() && v.len() >= 8 {
                v[..4].copy_from_slice(b"TIMF");
                v[4] = 1;
                v[5] = 0;
                v[6] = KIND_HEAD;
                v[7] = 0;
            }
            assert!(decode_manifest(&v, "s", 7, MAX).is_err());
        }
        // A header claiming 4 GiB of body: refused before anything else.
        let mut h = encode_envelope(KIND_HEAD, b"{}").unwrap();
        h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = decode_manifest(&h, "s", 7, MAX).unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
        // Valid envelope, JSON that is not a manifest, or one with an extra field.
        for body in [
            &b"[1,2,3]"[..],
            b"{\"format\":1}",
            b"{\"format\":1,\"x\":1}",
            &[b'['; 100_000][..],
        ] {
            let b = encode_envelope(KIND_HEAD, body).unwrap();
            let r = decode_manifest(&b, "s", 7, MAX);
            assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
        }
    }

    #[test]
    fn newer_versions_are_unsupported_not_corrupt() {
        let mut b = encode_manifest(&manifest(1)).unwrap();
        b[4] = 2;
        assert!(matches!(
            decode_manifest(&b, "s", 7, MAX),
            Err(Error::Unsupported(_))
        ));
        let body = serde_json::to_vec(&serde_json::json!({"format": 2, "new": true})).unwrap();
        let b = encode_envelope(KIND_HEAD, &body).unwrap();
        assert!(matches!(
            decode_manifest(&b, "s", 7, MAX),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn invariants_are_checked() {
        let mut m = manifest(3);
        m.segments.swap(0, 1);
        let b = encode_manifest(&m).unwrap();
        assert!(decode_manifest(&b, "s", 7, MAX).is_err());

        let mut m = manifest(3);
        m.segment_count = 4;
        assert!(decode_manifest(&encode_manifest(&m).unwrap(), "s", 7, MAX).is_err());

        let mut m = manifest(3);
        m.segments[1].file_crc ^= 1; // key names another CRC
        assert!(decode_manifest(&encode_manifest(&m).unwrap(), "s", 7, MAX).is_err());

        let mut m = manifest(1);
        if let Some(l) = m.lease.as_mut() {
            l.epoch = 1;
        }
        assert!(decode_manifest(&encode_manifest(&m).unwrap(), "s", 7, MAX).is_err());
    }

    #[test]
    fn chunk_round_trip_and_reference_checks() {
        let entries: Vec<_> = (10..20).map(entry).collect();
        let (bytes, r) = encode_chunk("s", &entries).unwrap();
        assert_eq!(
            parse_chunk_name(&r.key),
            Some((SegmentId(10), SegmentId(19), r.crc))
        );
        assert_eq!(decode_chunk(&bytes, "s", &r, MAX).unwrap(), entries);
        assert!(decode_chunk(&bytes, "t", &r, MAX).is_err());
        let mut bad = bytes.clone();
        let last = bad.len() - 2;
        bad[last] ^= 4;
        assert!(matches!(
            decode_chunk(&bad, "s", &r, MAX),
            Err(Error::Corrupt { .. })
        ));
        let wrong = ChunkRef {
            count: 9,
            ..r.clone()
        };
        assert!(decode_chunk(&bytes, "s", &wrong, MAX).is_err());
        // A head envelope is not a chunk.
        let head = encode_manifest(&manifest(1)).unwrap();
        let r2 = ChunkRef {
            len: head.len() as u64,
            crc: crc32fast::hash(&head),
            ..r
        };
        assert!(decode_chunk(&head, "s", &r2, MAX).is_err());
    }

    #[test]
    fn names_parse_strictly() {
        assert_eq!(parse_version_name(&version_name(42)), Some(42));
        assert_eq!(parse_version_name(&version_name(u64::MAX)), Some(u64::MAX));
        for bad in [
            "0042.manifest",
            "00000000000000000042.manifest.tmp",
            "0000000000000000004x.manifest",
            "99999999999999999999.manifest",
        ] {
            assert_eq!(parse_version_name(bad), None, "{bad}");
        }
        let n = chunk_name(SegmentId(1), SegmentId(2), 0xabc);
        assert_eq!(
            parse_chunk_name(&n),
            Some((SegmentId(1), SegmentId(2), 0xabc))
        );
        assert_eq!(
            parse_chunk_name(&chunk_name(SegmentId(3), SegmentId(2), 1)),
            None
        );
        assert_eq!(parse_chunk_name("x-y-z.chunk"), None);
    }
}
