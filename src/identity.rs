//! Who a data directory is: `DATA_DIR/IDENTITY`, written once when the
//! directory is first opened by the library, never rewritten.
//!
//! It records a random incarnation id (a data directory that is lost and
//! created again at the same path gets a new one), the stream, the store URL
//! without credentials (and the S3 endpoint, if any), the journal format
//! version and the creation time. The CLI's inspect and drain commands use
//! the recorded store unless told otherwise, refuse a different one without
//! `--store-override`, and refuse a path that is not a data directory
//! instead of creating one (`resolve_cli` in `cli/identity.rs`). The
//! library's own open refuses another store or stream too, unless
//! `Config::store_override` ([`ensure`]).
//!
//! ## Bytes
//! ```text
//! tierindex-identity 1 len=<N> crc32=<8 hex>\n
//! <N bytes of JSON: {"incarnation","stream","store","endpoint","format_version","created_ms","mode"}>
//! ```
//! The CRC32 (IEEE) covers the JSON bytes. The first line is ASCII so that
//! `cat IDENTITY` is readable. A file that fails any check is
//! `Error::Corrupt`, never rewritten: an operator decides.
//!
//! ## Durability
//! Written as `IDENTITY.tmp`, fsynced, renamed to `IDENTITY`, then the data
//! directory is fsynced. A crash leaves either no `IDENTITY` (written again
//! at the next open, with a new incarnation; object keys do not carry the
//! incarnation) or the whole file. A leftover `IDENTITY.tmp` is
//! overwritten. The default owner id hashes the incarnation
//! (`Config::effective_owner_id`): a data directory whose IDENTITY is lost
//! or moved aside is another owner at its next open, refused while the
//! lease its previous broker left lasts (or until `owner release --owner-id <old id> --fence-live`).
//!
//! ## Mode
//! `mode` (`"manifest"` or `"single-writer"`, absent in files from older
//! builds) is the one field ever rewritten: recorded at the first open, then
//! changed only by an open with `switch_mode`, or while the directory holds
//! nothing ([`settle_mode`]). The same tmp, fsync, rename, fsync steps.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::remote::url::redact;

/// The file name inside the data directory.
pub const IDENTITY_FILE: &str = "IDENTITY";
const TMP_FILE: &str = "IDENTITY.tmp";
const MAGIC_LINE: &str = "tierindex-identity 1";
/// Largest identity file accepted (it is a few hundred bytes).
const MAX_BYTES: usize = 64 << 10;

/// What a data directory records about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// 32 lower-case hex digits, random, chosen at creation.
    pub incarnation: String,
    /// The stream the data directory writes.
    pub stream: String,
    /// The store URL without credentials (`RemoteStore::display_url`).
    pub store: String,
    /// The S3 endpoint, when one was configured.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The journal format version of the build that created it.
    pub format_version: u16,
    pub created_ms: u64,
    /// The mode the data directory runs in (`None`: written by a build
    /// before modes were recorded; the next open records it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
}

/// Whether the data directory's commits go through the remote manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `manifest = true`: the store's manifest is the source of truth for
    /// what is committed; epochs and leases fence a second writer.
    Manifest,
    /// `manifest = false`: the journal alone records what is committed.
    SingleWriter,
}

impl Mode {
    pub fn of(manifest: bool) -> Mode {
        if manifest {
            Mode::Manifest
        } else {
            Mode::SingleWriter
        }
    }
    pub fn is_manifest(self) -> bool {
        self == Mode::Manifest
    }
    fn flag(self) -> &'static str {
        match self {
            Mode::Manifest => "--manifest true",
            Mode::SingleWriter => "--manifest false",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Manifest => "manifest mode (manifest = true)",
            Mode::SingleWriter => "single-writer mode (manifest = false)",
        })
    }
}

/// A new random incarnation id: 16 bytes from the kernel's random source,
/// else (no `/dev/urandom`) from a seeded generator mixed with the time and
/// the pid.
fn new_incarnation() -> String {
    let mut b = [0u8; 16];
    let from_kernel = fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !from_kernel {
        let mut rng = fastrand::Rng::with_seed(
            crate::segment::now_ms() ^ (u64::from(std::process::id()) << 32),
        );
        rng.fill(&mut b);
        let extra = fastrand::u64(..).to_le_bytes();
        for (x, y) in b.iter_mut().zip(extra.iter().cycle()) {
            *x ^= y;
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Identity {
    /// A new identity for a data directory of `stream` on `store`.
    pub fn new(stream: &str, store: &str, endpoint: Option<&str>) -> Identity {
        Identity {
            incarnation: new_incarnation(),
            stream: stream.to_string(),
            store: store.to_string(),
            endpoint: endpoint.map(str::to_string),
            format_version: crate::journal::FORMAT_VERSION,
            created_ms: crate::segment::now_ms(),
            mode: None,
        }
    }

    /// The file's bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let body = serde_json::to_vec(self)
            .map_err(|e| Error::InvalidInput(format!("identity does not serialize: {e}")))?;
        let mut out = format!(
            "{MAGIC_LINE} len={} crc32={:08x}\n",
            body.len(),
            crc32fast::hash(&body)
        )
        .into_bytes();
        out.extend_from_slice(&body);
        debug_assert!(matches!(Identity::decode(&out), Ok(ref back) if back == self));
        Ok(out)
    }

    /// Parses and checks the file's bytes (untrusted).
    pub fn decode(bytes: &[u8]) -> Result<Identity> {
        let bad = |why: String| Error::corrupt(IDENTITY_FILE, why);
        if bytes.len() > MAX_BYTES {
            return Err(bad(format!("{} bytes, more than {MAX_BYTES}", bytes.len())));
        }
        let nl = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| bad("no header line".into()))?;
        let (line, body) = (&bytes[..nl], &bytes[nl + 1..]);
        let line = std::str::from_utf8(line).map_err(|_| bad("header is not UTF-8".into()))?;
        let rest = line
            .strip_prefix(MAGIC_LINE)
            .ok_or_else(|| bad(format!("header {line:?} is not {MAGIC_LINE:?} ...")))?;
        let mut len = None;
        let mut crc = None;
        for part in rest.split_whitespace() {
            if let Some(v) = part.strip_prefix("len=") {
                len = v.parse::<usize>().ok();
            } else if let Some(v) = part.strip_prefix("crc32=") {
                crc = (v.len() == 8)
                    .then(|| u32::from_str_radix(v, 16).ok())
                    .flatten();
            } else {
                return Err(bad(format!("unknown header field {part:?}")));
            }
        }
        let (Some(len), Some(crc)) = (len, crc) else {
            return Err(bad(format!("header {line:?} lacks len= or crc32=")));
        };
        if body.len() != len {
            return Err(bad(format!(
                "body is {} bytes, the header says {len}",
                body.len()
            )));
        }
        let got = crc32fast::hash(body);
        if got != crc {
            return Err(bad(format!("body CRC {got:08x} != recorded {crc:08x}")));
        }
        let id: Identity = serde_json::from_slice(body).map_err(|e| bad(format!("body: {e}")))?;
        if id.incarnation.len() != 32 || !id.incarnation.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!(
                "incarnation {:?} is not 32 hex digits",
                id.incarnation
            )));
        }
        Ok(id)
    }

    /// Reads `data_dir/IDENTITY`; `None` when there is none.
    pub fn load(data_dir: &Path) -> Result<Option<Identity>> {
        let path = data_dir.join(IDENTITY_FILE);
        let damaged = |detail: String| {
            Error::corrupt(
                path.display().to_string(),
                format!(
                    "{detail}. The segments and the journal are not affected. Move the file \
                     aside (keep it: it names the store and stream this data directory was \
                     created for) and open again with the configuration that names that \
                     store and stream: a new {IDENTITY_FILE} is written from it"
                ),
            )
        };
        match crate::durable::read_regular(&path, MAX_BYTES as u64) {
            Ok(b) => Identity::decode(&b).map(Some).map_err(|e| match e {
                Error::Corrupt { detail, .. } => damaged(detail),
                other => other,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            // Too long, or not a regular file: as damaged, with what to do.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Err(damaged(e.to_string())),
            Err(e) => Err(Error::io(&path, "read identity", e)),
        }
    }

    /// Writes `data_dir/IDENTITY`: tmp, fsync, rename, fsync the directory.
    pub fn store_in(&self, data_dir: &Path) -> Result<()> {
        let tmp = data_dir.join(TMP_FILE);
        let path = data_dir.join(IDENTITY_FILE);
        let bytes = self.encode()?;
        let existed = tmp.exists();
        let mut f = crate::durable::no_follow()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, "create identity", e))?;
        if !existed {
            crate::durable::created(&tmp);
        }
        f.write_all(&bytes)
            .inspect(|()| crate::durable::written(&tmp))
            .and_then(|()| crate::durable::sync_all(&f, &tmp))
            .map_err(|e| Error::io(&tmp, "write identity", e))?;
        crate::durable::rename(&tmp, &path).map_err(|e| Error::io(&path, "install identity", e))?;
        // IMPORTANT: the rename is durable only once the directory is synced.
        crate::durable::fsync_dir(data_dir)
    }
}

/// What an open of an existing data directory may differ in from its
/// `IDENTITY`, for [`ensure`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Overrides {
    /// Open although the config names another store or stream than the
    /// data directory records (`Config::store_override`).
    pub store: bool,
}

/// The library's part (`DataDir::open_as`, called by the broker's open with
/// the data directory locked): write the identity if there is none yet (a
/// new data directory, or one from before identity files); else check the
/// config against the recorded one and return it.
///
/// A recorded stream or store other than the config's is refused
/// (`Error::InvalidInput`, saying which and what to do) unless
/// `overrides.store`: a typo in a URL, a data directory copied elsewhere
/// (whose default store moved with it), or two brokers pointed at each
/// other's directories would otherwise upload one stream's segments under
/// another's keys, or commit segments into a store that never held the
/// rest. With the override the open goes on, logged as a warning, and the
/// file keeps what the directory was created for. Another S3 endpoint is
/// logged, not refused (servers move; the store URL names the data).
/// A new identity records `mode` (the mode is checked later, by
/// [`settle_mode`]).
pub fn ensure(
    data_dir: &Path,
    stream: &str,
    // The store's display form (`RemoteStore::display_url`).
    store: &str,
    endpoint: Option<&str>,
    mode: Option<Mode>,
    overrides: Overrides,
) -> Result<Identity> {
    if let Some(id) = Identity::load(data_dir)? {
        check_recorded(data_dir, &id, stream, store, endpoint, overrides, true)?;
        return Ok(id);
    }
    let id = Identity {
        mode,
        ..Identity::new(stream, store, endpoint)
    };
    id.store_in(data_dir)?;
    tracing::info!(data_dir = %data_dir.display(), incarnation = %id.incarnation, "data directory identity written");
    Ok(id)
}

/// An `IDENTITY` an open wrote, removed again (and the directory fsynced)
/// unless [`keep`](Self::keep) is called: an open refused after writing it
/// (a store that has no manifest for the journal's committed segments: a
/// typo in the URL) must not leave the data directory bound to that store.
/// Before, the refusal's own advice (`reconcile --repair`) then rebuilt the
/// stream in the mistyped store, and the right one was refused.
pub struct NewIdentity(Option<PathBuf>);

impl NewIdentity {
    /// `created`: this open wrote `data_dir`'s identity.
    pub fn new(data_dir: &Path, created: bool) -> NewIdentity {
        NewIdentity(created.then(|| data_dir.to_path_buf()))
    }

    /// The open went through: the identity stays.
    pub fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for NewIdentity {
    fn drop(&mut self) {
        let Some(dir) = self.0.take() else {
            return;
        };
        let path = dir.join(IDENTITY_FILE);
        let removed = crate::durable::unlink(&path)
            .map_err(|e| Error::io(&path, "remove", e))
            .and_then(|()| crate::durable::fsync_dir(&dir));
        match removed {
            Ok(()) => tracing::info!(
                file = %path.display(),
                "the open was refused: the identity it wrote is removed again"
            ),
            Err(e) => tracing::warn!(
                file = %path.display(),
                error = %e,
                "the open was refused, and the identity it wrote could not be removed: check \
                 that it names the right store before the next open"
            ),
        }
    }
}

/// [`ensure`]'s check of an existing identity against what an open names.
fn check_recorded(
    data_dir: &Path,
    id: &Identity,
    stream: &str,
    store: &str,
    endpoint: Option<&str>,
    overrides: Overrides,
    log: bool,
) -> Result<()> {
    let stream_differs = id.stream != stream;
    // An override into `memory://` would journal the data directory's
    // segments as committed into a store gone at exit: later runs on the
    // recorded store would take them as done (a hostile review).
    if id.store != store && store.starts_with("memory:") {
        return Err(Error::InvalidInput(format!(
            "{} was created for store {}; memory:// keeps objects only inside this process, \
             so its segments would be journaled as committed into a store that is gone at \
             exit: not even with store_override (--store-override); use the recorded store, \
             or a new data directory for memory://",
            data_dir.display(),
            redact(&id.store)
        )));
    }
    // Both are display forms (`remote::url::display_form`): equal exactly
    // when they name the same store. Not parsed again: a recorded file
    // path may hold `#`, `?` or `%`, which a URL parser would read as
    // something else.
    let store_differs = id.store != store;
    if (stream_differs || store_differs) && !overrides.store {
        // `redact`: an embedder's `Store` URL is its own text, and the
        // recorded one is read from disk; neither is echoed if it could
        // hold credentials.
        let (what, recorded, given) = if stream_differs {
            ("stream", format!("{:?}", id.stream), format!("{stream:?}"))
        } else {
            ("store", redact(&id.store), redact(store))
        };
        return Err(Error::InvalidInput(format!(
            "{} was created for {what} {recorded} ({IDENTITY_FILE}, incarnation {}), but \
             this open names {given}: configure the recorded {what} (a data directory \
             moved or copied elsewhere keeps its store only if the store is set \
             explicitly), or set store_override = true (--store-override) to use the \
             given one anyway; nothing was changed",
            data_dir.display(),
            id.incarnation
        )));
    }
    if store_differs {
        override_target_exists(data_dir, &id.store, store)?;
    }
    if !log {
        return Ok(());
    }
    if stream_differs || store_differs {
        tracing::warn!(
            data_dir = %data_dir.display(),
            recorded_stream = %id.stream,
            recorded_store = %redact(&id.store),
            stream,
            store = %redact(store),
            "data directory was created for another stream or store than this config names; \
             opening anyway (store_override set)"
        );
    } else if id.endpoint.as_deref() != endpoint {
        tracing::warn!(
            data_dir = %data_dir.display(),
            recorded_endpoint = ?id.endpoint,
            endpoint = ?endpoint,
            "data directory was created with another S3 endpoint than this config names"
        );
    }
    Ok(())
}

/// A store override (the data directory records `recorded`, the open names
/// `store`, both in display form) to a `file://` directory that does not
/// exist is refused: most likely a mistyped path, and opening it would
/// create an empty store there and upload the data directory's segments
/// into it (helper-58's F8: `drain --store <typo> --store-override`
/// created the directory). Checked before any store is built.
pub(crate) fn override_target_exists(data_dir: &Path, recorded: &str, store: &str) -> Result<()> {
    if let Some(dir) = store.strip_prefix("file://")
        && !Path::new(dir).is_dir()
    {
        return Err(Error::InvalidInput(format!(
            "{} was created for store {}; the override names {}, whose directory does not \
             exist: a mistyped path would start a new, empty store there. Check the path; \
             if a new store is intended, create its directory first (mkdir -p); nothing \
             was changed",
            data_dir.display(),
            redact(recorded),
            redact(store)
        )));
    }
    Ok(())
}

/// The check [`ensure`] makes, run by `TierIndex::open` before it builds the
/// store the config names (a `file://` store creates its directory), so a
/// refused open leaves nothing behind. Reads `IDENTITY` without the lock:
/// advisory; `ensure`, under the lock, decides.
pub fn precheck(
    data_dir: &Path,
    stream: &str,
    store: &str,
    endpoint: Option<&str>,
    overrides: Overrides,
) -> Result<()> {
    match Identity::load(data_dir)? {
        Some(id) => check_recorded(data_dir, &id, stream, store, endpoint, overrides, false),
        None => Ok(()),
    }
}

/// The library's mode check (`TierIndex::open`, after the journal is
/// replayed, with the data directory locked). The identity records the
/// mode; an open in the other mode is refused unless `switch` (the config's
/// `switch_mode`) or the directory holds nothing yet (`holds_data` false: a
/// first open that was refused, e.g. by a store without conditional
/// creates, then retried in single-writer mode). A missing mode (an
/// identity from an older build) is filled in. Any change rewrites the file
/// (same incarnation), durably.
pub fn settle_mode(
    data_dir: &Path,
    id: Identity,
    manifest: bool,
    switch: bool,
    holds_data: bool,
) -> Result<Identity> {
    let want = Mode::of(manifest);
    match id.mode {
        Some(m) if m == want => return Ok(id),
        Some(m) if holds_data && !switch => {
            return Err(Error::InvalidInput(mode_mismatch(data_dir, &id, m, want)));
        }
        Some(m) if holds_data => tracing::warn!(
            data_dir = %data_dir.display(),
            from = %m,
            to = %want,
            "switching the data directory's mode (switch_mode set)"
        ),
        Some(m) => tracing::info!(
            data_dir = %data_dir.display(),
            from = %m,
            to = %want,
            "data directory holds nothing yet: its recorded mode is changed"
        ),
        None => {
            tracing::info!(data_dir = %data_dir.display(), mode = %want, "recording the data directory's mode")
        }
    }
    let id = Identity {
        mode: Some(want),
        ..id
    };
    id.store_in(data_dir)?;
    Ok(id)
}

fn mode_mismatch(data_dir: &Path, id: &Identity, recorded: Mode, want: Mode) -> String {
    let why = match recorded {
        Mode::Manifest => {
            "in manifest mode its commits are listed in the stream's remote manifest; in \
             single-writer mode new commits would not be, so readers of the manifest would \
             not see them, and nothing would fence a second writer of the stream"
        }
        Mode::SingleWriter => {
            "segments it committed are recorded only in its journal, not in the stream's \
             manifest, so readers of the manifest would not see them until `tierindex \
             reconcile --repair --manifest true` adds them"
        }
    };
    format!(
        "{} was created in {recorded} ({IDENTITY_FILE}, incarnation {}), but this open asks \
         for {want}: {why}. Use {} (or leave the flag out on the command line, which then \
         uses the recorded mode), or switch on purpose with switch_mode = true \
         (--switch-mode), which records the new mode",
        data_dir.display(),
        id.incarnation,
        recorded.flag()
    )
}


/// Some object key the journal records is one of this stream's
/// (`.../{stream}/segments/...`), when it records keys at all: a journal
/// whose every key names another stream belongs to another identity (an
/// `IDENTITY` copied over from another data directory: its stream's name
/// would send this one's segments into that stream, helper-58's F2), or
/// every upload it remembers went to another stream with
/// `--store-override`, which must then be said again. A journal with keys
/// of both (an override run, then back: helper-59) opens as before; so
/// does one with no key, or keys that name no stream (the drive's to
/// judge). Refused before anything is written.
pub(crate) fn journal_keys_name_the_stream(
    data_dir: &Path,
    stream_name: &str,
    segments: &std::collections::BTreeMap<crate::segment::SegmentId, crate::journal::SegmentRecord>,
) -> Result<()> {
    let ours = format!("{stream_name}/{}/", crate::remote::keys::SEGMENTS_DIR);
    let inner = format!("/{ours}");
    let is_ours = |k: &str| k.starts_with(&ours) || k.contains(&inner);
    let seg = format!("/{}/", crate::remote::keys::SEGMENTS_DIR);
    let stream_of = |k: &str| -> Option<String> {
        let head = &k[..k.rfind(&seg)?];
        Some(head.rsplit('/').next().unwrap_or(head).to_string())
    };
    let mut other = None;
    for k in segments.values().filter_map(|r| r.key.as_deref()) {
        if is_ours(k) {
            return Ok(());
        }
        if other.is_none()
            && let Some(s) = stream_of(k)
        {
            other = Some((s, k.to_string()));
        }
    }
    let Some((stream, k)) = other else {
        return Ok(());
    };
    Err(Error::InvalidInput(format!(
        "{}: the journal records segment objects of stream {stream:?} only (key {k}), but its \
         IDENTITY and this open name stream {:?}: the IDENTITY file was replaced or copied from \
         another data directory, or every upload this data directory remembers was moved to \
         {stream:?} with --store-override. Nothing was written. If the IDENTITY is not this \
         data directory's own, put its own back; to write to {:?} on purpose, pass \
         --store-override (Config::store_override)",
        data_dir.display(),
        stream_name,
        stream_name
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_every_flipped_byte_is_caught() {
        let id = Identity::new("orders", "s3://bkt/tier", Some("http://127.0.0.1:9000"));
        assert_eq!(id.incarnation.len(), 32);
        assert_ne!(id.incarnation, Identity::new("o", "s", None).incarnation);
        let bytes = id.encode().unwrap();
        assert_eq!(Identity::decode(&bytes).unwrap(), id);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            // A flip may still parse only if it leaves the same identity
            // (e.g. hex case in the CRC is refused by the CRC itself).
            if let Ok(back) = Identity::decode(&bad) {
                assert_eq!(back, id, "byte {i}");
            }
        }
        for cut in 0..bytes.len() {
            assert!(Identity::decode(&bytes[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn an_identity_without_a_mode_gets_the_mode_of_its_next_open() {
        let tmp = tempfile::tempdir().unwrap();
        // Written by a build before modes: no "mode" field at all.
        let old = ensure(tmp.path(), "s", "file:///x", None, None, Overrides::default()).unwrap();
        assert_eq!(old.mode, None);
        let text = String::from_utf8(old.encode().unwrap()).unwrap();
        assert!(!text.contains("mode"), "{text}");
        let id = settle_mode(tmp.path(), old.clone(), false, false, true).unwrap();
        assert_eq!(id.mode, Some(Mode::SingleWriter));
        let back = Identity::load(tmp.path()).unwrap().unwrap();
        assert_eq!(back, id);
        assert_eq!(back.incarnation, old.incarnation);
        // Now recorded: the other mode is refused while data is held, and
        // nothing is rewritten.
        let e = settle_mode(tmp.path(), back.clone(), true, false, true).unwrap_err();
        assert!(e.to_string().contains("--manifest false"), "{e}");
        assert_eq!(Identity::load(tmp.path()).unwrap().unwrap(), back);
        // Holding nothing, or switched on purpose: changed.
        let id = settle_mode(tmp.path(), back, true, false, false).unwrap();
        assert_eq!(id.mode, Some(Mode::Manifest));
        let id = settle_mode(tmp.path(), id, false, true, true).unwrap();
        assert_eq!(
            Identity::load(tmp.path()).unwrap().unwrap().mode,
            Some(Mode::SingleWriter)
        );
        assert_eq!(id.mode, Some(Mode::SingleWriter));
    }

    #[test]
    fn ensure_writes_once_and_keeps_the_first() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(Identity::load(tmp.path()).unwrap(), None);
        let a = ensure(tmp.path(), "s", "file:///x", None, None, Overrides::default()).unwrap();
        // Another stream or store: refused, saying which and how to go on.
        for (stream, store, what) in [("other", "file:///x", "stream"), ("s", "file:///y", "store")] {
            let e = ensure(tmp.path(), stream, store, None, None, Overrides::default()).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidInput, "{e}");
            let msg = e.to_string();
            assert!(msg.contains(&format!("created for {what}")), "{msg}");
            assert!(msg.contains("store_override"), "{msg}");
        }
        // Overridden to a file:// directory that does not exist: refused (a
        // mistyped path would start an empty store).
        let y = tempfile::tempdir().unwrap();
        let gone = format!("file://{}", y.path().join("nope").display());
        let e = ensure(tmp.path(), "other", &gone, None, None, Overrides { store: true }).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        // Overridden to one that exists: opens, and the file keeps the first.
        let there = format!("file://{}", y.path().display());
        let b = ensure(tmp.path(), "other", &there, None, None, Overrides { store: true }).unwrap();
        assert_eq!(a, b);
        assert_eq!(Identity::load(tmp.path()).unwrap(), Some(a));
        assert!(!tmp.path().join(TMP_FILE).exists());
    }
}
