//! Configuration: one struct, loadable from a TOML file, every field with a
//! default. The CLI layers flags and `TIERINDEX_*` variables on top.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::index::IndexConfig;
use crate::remote::StoreOptions;
use crate::upload::{UploadConfig, VerifyLevel};

mod builder;
pub use builder::ConfigBuilder;

/// Everything needed to open a [`crate::TierIndex`]. Build it in code with
/// [`Config::builder`] (fields may be added in later releases; the builder
/// keeps such code compiling), or read it from TOML with
/// [`Config::from_file`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The data directory (segments, journal, quarantine, lock).
    pub data_dir: PathBuf,
    /// Store URL: `file:///abs/path` (default: `<data_dir>/../tierindex-store`),
    /// `s3://bucket/prefix`, or `memory://`.
    pub store: Option<String>,
    /// S3 endpoint override (MinIO and friends); `AWS_ENDPOINT_URL` otherwise.
    pub endpoint: Option<String>,
    /// Allow plain HTTP to the endpoint (default: only for loopback).
    pub allow_http: Option<bool>,
    /// Sign every segment body's SHA-256 even over HTTPS or to a loopback
    /// endpoint (default false: there, bodies go as `UNSIGNED-PAYLOAD`
    /// once the probe proved the server validates their signed
    /// `x-amz-checksum-crc64nvme` header; see `StoreOptions::sign_payload`).
    pub sign_payload: bool,
    /// S3 region (`AWS_REGION` otherwise; S3-compatible servers mostly ignore it).
    pub region: Option<String>,
    /// The stream whose index this is; part of every remote key.
    pub stream: String,
    /// Hash slots per segment (1 to 2^26).
    pub slot_count: u32,
    /// Items per segment (1 to 2^28); a full segment rolls at the next append.
    pub segment_items: u32,
    /// A non-empty segment older than this rolls at the next worker tick.
    pub segment_max_age_ms: Option<u64>,
    /// Bound on chain steps per active-segment lookup.
    pub max_chain_steps: u32,
    /// Local sealed segments kept memory-mapped at once (1 to 2^20,
    /// default 16,384); the least recently used map is dropped first and
    /// the others are mapped again on demand (footer, header and slot
    /// directory read and checked each time: 4 bytes a slot). Every map counts against the kernel's
    /// `vm.max_map_count` (65,530 by default) for the whole process: keep
    /// open indexes x this below it.
    pub sealed_mapped: usize,
    /// Create the first active segment file when the index opens (the
    /// default: the first append finds it ready). `false`: the first
    /// append creates it (and waits for its creation and preallocation);
    /// an open that only drains (`tierindex drain`) then needs no free
    /// space for a file it would never write, and can upload and release
    /// the sealed segments that filled the disk.
    pub active_at_open: bool,
    /// Segments of this stream uploading at once; every upload also takes
    /// one of the process's slots, shared by all its streams (64 unless
    /// [`crate::set_max_uploads_in_flight_per_process`] says otherwise), so
    /// a bound above the process's is capped by it.
    pub max_uploads_in_flight: usize,
    /// Sealed files at least this large use multipart (where the store has it).
    pub multipart_threshold_bytes: u64,
    /// Multipart part size (raised to stay within 10,000 parts).
    pub part_size_bytes: u64,
    /// Attempts per remote request, the first included.
    pub max_attempts: u32,
    /// Deadline of one remote request attempt.
    pub request_timeout_ms: u64,
    /// What must be proven of an upload before it counts as verified.
    pub verify: VerifyLevel,
    /// Delete the local copy once a segment is committed remotely.
    pub release_after_commit: bool,
    /// Rewrite the upload journal as a snapshot of live state once it grows
    /// past this many bytes.
    pub journal_compact_after_bytes: u64,
    /// Shutdown drain deadline (well under Kubernetes' 30 s grace period).
    pub shutdown_deadline_ms: u64,
    /// How often the background worker ticks while segments are pending
    /// (an idle one sleeps until woken; an age roll wakes it at its
    /// deadline).
    pub tick_ms: u64,
    /// Serve Prometheus metrics here (e.g. `127.0.0.1:9464`).
    pub metrics_addr: Option<String>,
    /// Probe the store at open (a few small requests under `_probe/`) to
    /// learn whether it honours conditional creates. Off: assume it does not
    /// (every upload is read back in full; always safe, slower).
    pub probe_store: bool,
    /// Publish every committed segment in the stream's remote manifest
    /// (owner epoch + lease; see `remote::manifest`). On by default: the
    /// store is the source of truth for what is committed, a second writer
    /// of the stream is refused at open (naming the holder and its lease)
    /// and a stale one is fenced. Opening refuses a store whose probe finds
    /// conditional creates not honoured (Garage).
    ///
    /// `false` is **single-writer mode**, an explicit, weaker choice: the
    /// journal alone records what is committed, nothing fences a second
    /// writer of the stream (two data directories on one stream overwrite
    /// each other's view of it; the reconciler then only reports, never
    /// deletes). Choose it only where exactly one writer per stream is
    /// guaranteed by other means, or on a store without conditional creates.
    pub manifest: bool,
    /// Who owns the stream's manifest. Default: `{hostname}-{hash of the
    /// absolute data directory and its IDENTITY's incarnation}`, stable
    /// across restarts of the same data directory (so a restart after a
    /// crash re-takes its own stream at once); see
    /// [`Config::effective_owner_id`].
    pub owner_id: Option<String>,
    /// Lease length; renewed every third of it while running.
    pub lease_ttl_ms: u64,
    /// Manage the manifest on a store whose probe found conditional creates
    /// NOT honoured (no fencing then: only with one writer guaranteed).
    pub allow_unconditional_store: bool,
    /// Open a data directory whose `IDENTITY` records the other mode
    /// (`manifest` on or off) than this config's, and record this one.
    /// Without it such an open is refused: segments committed in one mode
    /// are invisible to the other (the manifest does not list what the
    /// journal alone committed). See `docs/crash-safety.md`, "Switching
    /// modes".
    pub switch_mode: bool,
    /// Open a data directory whose `IDENTITY` records another store or
    /// stream than this config's (logged as a warning; the file keeps the
    /// recorded ones). Without it such an open is refused: a typo in a URL,
    /// a data directory copied elsewhere (the default store is next to the
    /// data directory, so it moves with the copy) or two brokers swapped
    /// would otherwise upload under another stream's keys or commit into a
    /// store that never held the rest. Named risk: with it set, the
    /// journal's committed segments may not be in the store now named.
    pub store_override: bool,
    /// Run the reconciler (journal vs manifest vs bucket listing) every this
    /// many ms in the background; 0 = off. Findings are logged and exported
    /// as metrics.
    pub reconcile_interval_ms: u64,
    /// The background reconciler also repairs what it can from this process
    /// (re-uploads from local copies, manifest entries and damage notes as
    /// the current owner, stale multipart uploads and proven abandoned
    /// uploads of ours; objects of unknown origin are never deleted);
    /// off: it only reports.
    pub reconcile_repair: bool,
    /// Age an abandoned upload of ours or a multipart upload must reach before the
    /// background reconciler's repair removes it.
    pub reconcile_grace_ms: u64,
}

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// Largest accepted `slot_count` and `segment_items`: what the segment
/// format can hold.
pub const SLOT_COUNT_MAX: u32 = crate::segment::format::MAX_SLOTS;
pub const SEGMENT_ITEMS_MAX: u32 = crate::segment::format::MAX_ITEMS;
/// Largest accepted `max_uploads_in_flight`.
pub const MAX_UPLOADS_IN_FLIGHT: u64 = 1024;
/// Largest accepted `max_attempts`.
pub const MAX_ATTEMPTS: u64 = 1000;
/// Largest accepted `part_size_bytes` (S3's part limit, 5 GiB).
pub const PART_SIZE_BYTES_MAX: u64 = 5 << 30;
/// Shortest accepted `tick_ms`.
pub const TICK_MS_MIN: u64 = 10;

/// `key` must be in `min..=max`.
fn range(key: &str, v: u64, min: u64, max: u64) -> Result<()> {
    if (min..=max).contains(&v) {
        Ok(())
    } else if max == u64::MAX {
        Err(Error::InvalidInput(format!(
            "{key} must be at least {min}, got {v}"
        )))
    } else {
        Err(Error::InvalidInput(format!(
            "{key} must be {min}..={max}, got {v}"
        )))
    }
}

/// `host:port` or `ip:port` (what `TcpListener::bind` takes).
pub(crate) fn check_listen_addr(key: &str, a: &str) -> Result<()> {
    if a.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    // A host of digits and dots is an IPv4 address or a typo (999.1.1.1),
    // not a name to resolve: refused here as the usage error it is, not
    // at the bind.
    let ok = a.rsplit_once(':').is_some_and(|(h, p)| {
        !h.is_empty()
            && p.parse::<u16>().is_ok()
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
            && (!h.chars().all(|c| c.is_ascii_digit() || c == '.')
                || h.parse::<std::net::Ipv4Addr>().is_ok())
    });
    if ok {
        Ok(())
    } else {
        // The value is not shown: it may be a credential put on the wrong
        // line (helper-49).
        Err(Error::InvalidInput(format!(
            "{key}: expected host:port, e.g. 127.0.0.1:9464 (the value is not shown)"
        )))
    }
}

/// A `file://` store inside the data directory (or the data directory
/// itself) is refused: the start-up check would take the store's folders
/// for stray files of the data directory and move them to quarantine,
/// committed objects and manifest included. So is a data directory inside
/// the store's directory: a stream named like the data directory (or any
/// stream, for `<store>/<stream>` itself) writes its objects into the data
/// directory's `segments/`, where start-up quarantined them as unknown
/// files, out of the store (found by a hostile review: exit 0, "clean").
/// `base` with `comps` appended by name: `..` drops the last component,
/// `.` nothing (no file system lookup).
fn push_by_name<'a>(
    mut base: PathBuf,
    comps: impl IntoIterator<Item = std::path::Component<'a>>,
) -> PathBuf {
    for c in comps {
        match c {
            std::path::Component::ParentDir => {
                base.pop();
            }
            std::path::Component::CurDir => {}
            other => base.push(other),
        }
    }
    base
}

fn store_outside_data_dir(store: &Path, data_dir: &Path) -> Result<()> {
    // Symlinks resolved in the part of each path that exists (the store
    // directory may not exist yet, its parent does).
    let resolve = |p: &Path| -> PathBuf {
        let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        // `..` resolved by name, for when `canonicalize` cannot resolve one
        // (after a folder that does not exist yet: `/srv/nope/../st`).
        let abs = if abs
            .components()
            .any(|c| c == std::path::Component::ParentDir)
            && std::fs::canonicalize(&abs).is_err()
        {
            push_by_name(PathBuf::new(), abs.components())
        } else {
            abs
        };
        let mut missing = Vec::new();
        let mut at = abs.as_path();
        loop {
            if let Ok(real) = std::fs::canonicalize(at) {
                return missing.iter().rev().fold(real, |acc, part| acc.join(part));
            }
            match (at.parent(), at.file_name()) {
                (Some(parent), Some(name)) => {
                    missing.push(name.to_os_string());
                    at = parent;
                }
                _ => return abs,
            }
        }
    };
    let (store, data) = (resolve(store), resolve(data_dir));
    if store.starts_with(&data) {
        return Err(Error::InvalidInput(format!(
            "the file store {} is inside the data directory {}: the data directory's \
             start-up check would quarantine the store's objects; put the store outside it",
            store.display(),
            data.display()
        )));
    }
    if data.starts_with(&store) {
        return Err(Error::InvalidInput(format!(
            "the data directory {} is inside the file store {}: a stream's objects are \
             written under the store's directory, and those of a stream named like a \
             folder on the way would land in the data directory, whose start-up check \
             would move them to quarantine; put the data directory outside the store",
            data.display(),
            store.display()
        )));
    }
    Ok(())
}

/// Largest config file read.
pub const CONFIG_BYTES_MAX: u64 = 1 << 20;

/// Shortest accepted `reconcile_grace_ms`.
pub const RECONCILE_GRACE_MS_MIN: u64 = 1_000;

pub use crate::remote::lease::{LEASE_TTL_MS_MAX, LEASE_TTL_MS_MIN};

/// Shortest per-request timeout [`manifest_retry`] uses; below it the
/// lease check at open warns instead (the TTL is then too short to fit).
pub const MANIFEST_REQUEST_TIMEOUT_MIN: Duration = Duration::from_secs(1);

/// The retry policy of manifest requests: `max_attempts` attempts, each at
/// most `request_timeout`, shortened so that all attempts and the backoffs
/// between them take less than two thirds of the lease TTL (a renewal is
/// sent every third of the TTL and must land before it ends; see
/// `remote::lease::check_ttl`). With the defaults (TTL 30 s, 5 attempts):
/// 3 s per request and at most 1 s between attempts, 19 s in all. Never
/// below [`MANIFEST_REQUEST_TIMEOUT_MIN`] per request.
pub fn manifest_retry(
    ttl: Duration,
    max_attempts: u32,
    request_timeout: Duration,
    base: &crate::retry::RetryPolicy,
) -> crate::retry::RetryPolicy {
    let attempts = max_attempts.max(1);
    let budget = (ttl * 2 / 3).saturating_sub(Duration::from_millis(1));
    let share = budget / attempts;
    let backoff_max = base.backoff_max.min(share / 4);
    let request_timeout = request_timeout
        .min(share.saturating_sub(backoff_max))
        .max(MANIFEST_REQUEST_TIMEOUT_MIN);
    crate::retry::RetryPolicy {
        max_attempts: attempts,
        request_timeout,
        backoff_max,
        backoff_base: base.backoff_base.min(backoff_max),
    }
}

impl Default for Config {
    fn default() -> Self {
        let up = UploadConfig::default();
        let ix = IndexConfig::default();
        Config {
            data_dir: PathBuf::from("tierindex-data"),
            store: None,
            endpoint: None,
            allow_http: None,
            sign_payload: false,
            region: None,
            stream: "stream-0".into(),
            slot_count: ix.slot_count,
            segment_items: ix.segment_items,
            segment_max_age_ms: ix.segment_max_age.map(|d| d.as_millis() as u64),
            max_chain_steps: ix.max_chain_steps,
            sealed_mapped: ix.sealed_mapped,
            active_at_open: ix.active_at_open,
            max_uploads_in_flight: 4,
            multipart_threshold_bytes: up.multipart_threshold_bytes,
            part_size_bytes: up.part_size_bytes,
            max_attempts: up.max_attempts,
            request_timeout_ms: up.request_timeout.as_millis() as u64,
            verify: up.verify,
            release_after_commit: false,
            journal_compact_after_bytes: crate::journal::JournalOptions::default()
                .compact_after_bytes,
            shutdown_deadline_ms: 20_000,
            tick_ms: 200,
            metrics_addr: None,
            probe_store: true,
            manifest: true,
            owner_id: None,
            lease_ttl_ms: 30_000,
            allow_unconditional_store: false,
            switch_mode: false,
            store_override: false,
            reconcile_interval_ms: 0,
            reconcile_repair: true,
            reconcile_grace_ms: 3_600_000,
        }
    }
}

impl Config {
    /// Read a TOML file. Unknown keys are an error (a typo must not be
    /// silently ignored).
    pub fn from_file(path: &Path) -> Result<Config> {
        Self::from_file_keys(path).map(|(c, _)| c)
    }

    /// [`from_file`](Self::from_file), and the top-level keys the file sets
    /// (so a caller can tell `manifest = true` written out from the
    /// default).
    pub fn from_file_keys(path: &Path) -> Result<(Config, Vec<String>)> {
        use std::io::Read as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        // Non-blocking, then only a regular file is read: the open of a
        // FIFO would wait for a writer for ever (helper-61).
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| Error::io(path, "open config file", e))?;
        let ft = f
            .metadata()
            .map_err(|e| Error::io(path, "stat config file", e))?
            .file_type();
        let pipe = {
            use std::os::unix::fs::FileTypeExt as _;
            ft.is_fifo()
        };
        if !ft.is_file() && !pipe {
            return Err(Error::InvalidInput(format!(
                "{}: not a regular file or a pipe (a directory or a device): --config names a \
                 TOML config file",
                path.display()
            )));
        }
        if pipe {
            // `--config <(generate)` or `/dev/stdin`: read as it comes. A
            // FIFO nobody has open for writing reads as empty at once.
            use std::os::fd::AsRawFd as _;
            // SAFETY: fcntl on a descriptor this function owns.
            unsafe {
                let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
                if fl >= 0 {
                    libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
                }
            }
        }
        // Bounded: `--config /dev/zero` must not eat the memory.
        let mut text = String::new();
        f.take(CONFIG_BYTES_MAX + 1)
            .read_to_string(&mut text)
            .map_err(|e| Error::io(path, "read config file", e))?;
        if pipe && text.trim().is_empty() {
            return Err(Error::InvalidInput(format!(
                "{}: a pipe with nothing written to it (no writer?): --config names a TOML \
                 config file",
                path.display()
            )));
        }
        if text.len() as u64 > CONFIG_BYTES_MAX {
            return Err(Error::InvalidInput(format!(
                "{}: a config file is at most {CONFIG_BYTES_MAX} bytes",
                path.display()
            )));
        }
        let c = Self::from_toml(&text)
            .map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))?;
        // It parsed as a Config, so it parses as a table.
        let keys = toml::from_str::<toml::Table>(&text)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        Ok((c, keys))
    }

    /// Parses a TOML configuration (unknown keys are refused) and checks each
    /// field ([`validate`](Self::validate) checks the whole when it is used).
    pub fn from_toml(text: &str) -> Result<Config> {
        /// A type or value error quotes the value (`invalid type: string
        /// "...", expected u64`, ``unknown variant `...`, expected one
        /// of``, ``invalid value: integer `...` ``), which may be a
        /// credential put on the wrong line: what comes before the last
        /// `, expected ` (the schema's words, never the file's) is cut at
        /// its first quote or backtick (an escaped quote inside the value
        /// can no longer flip what is shown, helper-49). An unknown key's
        /// name stays when it is a plain lower-case key name.
        fn without_quoted(m: &str) -> String {
            let (found, expected) = match m.rsplit_once(", expected ") {
                Some((f, e)) => (f, Some(e)),
                None => (m, None),
            };
            let mut out = match found.strip_prefix("unknown field `").and_then(|r| r.split_once('`')) {
                Some((name, ""))
                    if !name.is_empty()
                        && name.len() <= 40
                        && name
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') =>
                {
                    format!("unknown field `{name}`")
                }
                _ => match found.find(['"', '`']) {
                    Some(i) => format!("{}(value not shown)", &found[..i]),
                    None if expected.is_some() => found.to_string(),
                    // No schema part to tell the value from: the words
                    // before a `:` only.
                    None => match found.split_once(':') {
                        Some((w, _)) => format!("{w}: (value not shown)"),
                        None => found.to_string(),
                    },
                },
            };
            if let Some(e) = expected {
                out.push_str(", expected ");
                out.push_str(e);
            }
            out
        }
        let c: Config = toml::from_str(text).map_err(|e| {
            // Not `{e}`: toml's Display quotes the offending source line,
            // which may hold a credential (`endpoint = "http://k:s@h"`).
            let at = e.span().map_or(String::new(), |sp| {
                let before = text.get(..sp.start).unwrap_or("");
                let line = before.matches('\n').count() + 1;
                let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                // The key of that line, when it is a plain key name (its
                // value is never shown).
                let start = before.rfind('\n').map_or(0, |i| i + 1);
                let key = text[start..]
                    .split('\n')
                    .next()
                    .and_then(|l| l.split_once('='))
                    .map(|(k, _)| k.trim())
                    .filter(|k| {
                        !k.is_empty()
                            && k.len() <= 40
                            && k.chars()
                                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    })
                    .map_or(String::new(), |k| format!(" (key `{k}`)"));
                format!(" at line {line}, column {col}{key}")
            });
            Error::InvalidInput(format!(
                "config{at}: {}",
                without_quoted(e.message().trim_end())
            ))
        })?;
        // Fields only: the command line may still set `data_dir` or
        // `store`; the whole config is validated when it is used.
        c.validate_fields()?;
        Ok(c)
    }

    /// Checks every value; the CLI calls it on the config it assembled, and
    /// so does `TierIndex::open` ([`Config::from_toml`] checks each field
    /// alone: flags may still change `data_dir` and `store`). Each error names the key, the accepted
    /// range and the value found (never the value of a URL: see
    /// `remote::url`).
    pub fn validate(&self) -> Result<()> {
        self.validate_fields()?;
        // How fields relate (the command line may have set either).
        // The default store too: `data_dir = /srv/tierindex-store` makes
        // the default store (`<parent>/tierindex-store`) the data directory
        // itself.
        let url = match &self.store {
            Some(s) => Some(s.clone()),
            None => self.store_url().ok(),
        };
        if let Some(s) = &url {
            match crate::remote::url::parse_store("store", s)? {
                crate::remote::url::StoreUrl::File { dir } => {
                    store_outside_data_dir(&dir, &self.data_dir)?
                }
                crate::remote::url::StoreUrl::Memory { .. } if self.release_after_commit => {
                    return Err(Error::InvalidInput(
                        "release_after_commit with a memory:// store: the store lives only \
                         in this process, so deleting the local copies would lose every entry \
                         at exit; use a durable store, or keep the local copies"
                            .into(),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// [`validate`](Self::validate) without the checks that relate fields
    /// to each other's paths: a config file is checked with this when it is
    /// read, before command-line flags (`--data-dir`, `--store`) complete
    /// it; the whole config is checked with `validate` when it is used.
    fn validate_fields(&self) -> Result<()> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(Error::InvalidInput(
                "data_dir is empty: name the data directory".into(),
            ));
        }
        if let Some(s) = &self.store {
            crate::remote::url::parse_store("store", s)?;
        }
        if let Some(e) = &self.endpoint {
            crate::remote::url::parse_endpoint("endpoint", e)?;
        }
        if let Some(r) = &self.region
            && (r.is_empty()
                || r.len() > 64
                || !r.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        {
            return Err(Error::InvalidInput(
                "region: expected a region name such as us-east-1 (letters, digits and `-`, at \
                 most 64; the value is not shown)"
                    .into(),
            ));
        }
        if let Some(a) = &self.metrics_addr {
            check_listen_addr("metrics_addr", a)?;
        }
        range(
            "slot_count",
            self.slot_count.into(),
            1,
            SLOT_COUNT_MAX.into(),
        )?;
        range(
            "segment_items",
            self.segment_items.into(),
            1,
            SEGMENT_ITEMS_MAX.into(),
        )?;
        if let Some(age) = self.segment_max_age_ms {
            range("segment_max_age_ms", age, 1, DAY_MS * 30)?;
        }
        range(
            "max_chain_steps",
            self.max_chain_steps.into(),
            1,
            u32::MAX.into(),
        )?;
        range(
            "sealed_mapped",
            self.sealed_mapped as u64,
            1,
            crate::segment::local::MAX_MAPPED as u64,
        )?;
        range(
            "max_uploads_in_flight",
            self.max_uploads_in_flight as u64,
            1,
            MAX_UPLOADS_IN_FLIGHT,
        )?;
        range(
            "multipart_threshold_bytes",
            self.multipart_threshold_bytes,
            1,
            u64::MAX,
        )?;
        range(
            "part_size_bytes",
            self.part_size_bytes,
            1,
            PART_SIZE_BYTES_MAX,
        )?;
        range("max_attempts", self.max_attempts.into(), 1, MAX_ATTEMPTS)?;
        range("request_timeout_ms", self.request_timeout_ms, 1, HOUR_MS)?;
        range(
            "journal_compact_after_bytes",
            self.journal_compact_after_bytes,
            1024,
            1 << 40,
        )?;
        range("shutdown_deadline_ms", self.shutdown_deadline_ms, 1, DAY_MS)?;
        range("tick_ms", self.tick_ms, TICK_MS_MIN, 60_000)?;
        if let Some(o) = &self.owner_id {
            crate::remote::lease::validate_owner(o)
                .map_err(|e| Error::InvalidInput(format!("owner_id (value not shown): {e}")))?;
        }
        if self.reconcile_grace_ms < RECONCILE_GRACE_MS_MIN {
            return Err(Error::InvalidInput(format!(
                "reconcile_grace_ms must be at least {RECONCILE_GRACE_MS_MIN} (an upload in \
                 flight must not look like an orphan), got {}",
                self.reconcile_grace_ms
            )));
        }
        range(
            "reconcile_grace_ms",
            self.reconcile_grace_ms,
            RECONCILE_GRACE_MS_MIN,
            DAY_MS * 365,
        )?;
        if self.reconcile_interval_ms != 0 && self.reconcile_interval_ms < 100 {
            return Err(Error::InvalidInput(format!(
                "reconcile_interval_ms must be 0 (off) or at least 100, got {}",
                self.reconcile_interval_ms
            )));
        }
        range(
            "reconcile_interval_ms",
            self.reconcile_interval_ms,
            0,
            DAY_MS * 30,
        )?;
        if !(LEASE_TTL_MS_MIN..=LEASE_TTL_MS_MAX).contains(&self.lease_ttl_ms) {
            return Err(Error::InvalidInput(format!(
                "lease_ttl_ms must be {LEASE_TTL_MS_MIN}..={LEASE_TTL_MS_MAX}, got {}",
                self.lease_ttl_ms
            )));
        }
        crate::remote::keys::validate_stream(&self.stream)
    }

    /// The manifest owner id: `owner_id`, or `{hostname}-{hash}` where the
    /// hash is of the absolute data directory and, once the directory has
    /// one, the random incarnation its `IDENTITY` records. Stable across
    /// restarts of one data directory (which only one process can hold at a
    /// time), so a restart after a crash re-takes the stream without
    /// waiting for the lease and fences the previous incarnation. The
    /// incarnation keeps two data directories at the same path on hosts of
    /// the same name (cloned VMs, containers given one fixed hostname) from
    /// sharing an id: without it the second broker re-took the first's
    /// live stream as its own and fenced it, where it must be refused while
    /// the first's lease lasts. A copy of a data directory (a restored
    /// backup) keeps its incarnation: it is the same owner.
    pub fn effective_owner_id(&self) -> Result<String> {
        if let Some(o) = &self.owner_id {
            crate::remote::lease::validate_owner(o)?;
            return Ok(o.clone());
        }
        let abs = std::path::absolute(&self.data_dir)
            .map_err(|e| Error::io(&self.data_dir, "resolve data dir", e))?;
        let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(200)
            .collect();
        let host = if host.is_empty() { "host".into() } else { host };
        let mut hash = crc32fast::Hasher::new();
        hash.update(abs.as_os_str().as_encoded_bytes());
        // A directory not created yet has no incarnation (the open writes
        // its IDENTITY before it takes the manifest). An IDENTITY that
        // cannot be read (damaged, EIO, EMFILE, EACCES) is an error, never
        // the path-only id: that would be another owner.
        if let Some(id) = crate::identity::Identity::load(&self.data_dir)? {
            hash.update(b"\0");
            hash.update(id.incarnation.as_bytes());
        }
        let id = format!("{host}-{:08x}", hash.finalize());
        crate::remote::lease::validate_owner(&id)?;
        Ok(id)
    }

    /// How long an ownership claim on the stream lasts without renewal.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    /// Manifest options from the config. Retries follow the upload's
    /// `max_attempts`, but one manifest request with its retries is bounded
    /// to fit the lease (see `manifest_retry`): manifest objects are small,
    /// and a renewal sent at a third of the TTL must land before the lease
    /// expires. Uploads keep `request_timeout_ms` (a segment is megabytes).
    #[doc(hidden)]
    pub fn manifest_options(&self) -> crate::remote::manifest::ManifestOptions {
        let d = crate::remote::manifest::ManifestOptions::default();
        crate::remote::manifest::ManifestOptions {
            allow_unconditional_store: self.allow_unconditional_store,
            retry: manifest_retry(
                self.lease_ttl(),
                self.max_attempts,
                Duration::from_millis(self.request_timeout_ms),
                &d.retry,
            ),
            ..d
        }
    }

    /// The store URL, defaulting to a directory next to the data directory.
    pub fn store_url(&self) -> Result<String> {
        if let Some(s) = &self.store {
            return Ok(s.clone());
        }
        let abs = std::path::absolute(&self.data_dir)
            .map_err(|e| Error::io(&self.data_dir, "resolve data dir", e))?;
        // `..` resolved by name (`--data-dir ../d`): a store URL holding it
        // is refused (helper-63: `demo` failed on a URL nobody typed).
        // The part before the first `..` is resolved by the file system
        // when it exists (a symlink there is followed, as the kernel does
        // for the data directory itself: helper-64), the rest by name. A
        // path without `..` is kept as it is, as before.
        let has_parent = abs
            .components()
            .any(|c| c == std::path::Component::ParentDir);
        let abs = if has_parent {
            let comps: Vec<_> = abs.components().collect();
            let first = comps
                .iter()
                .position(|c| *c == std::path::Component::ParentDir)
                .unwrap_or(comps.len());
            let head: std::path::PathBuf = comps[..first].iter().collect();
            let head = std::fs::canonicalize(&head).unwrap_or(head);
            push_by_name(head, comps[first..].iter().copied())
        } else {
            abs
        };
        let parent = abs.parent().unwrap_or(Path::new("/"));
        if parent.as_os_str().as_encoded_bytes().contains(&b'\\') {
            return Err(Error::InvalidInput(format!(
                "data_dir {}: the path of the directory it is in holds a `\\`, which a file \
                 store's path may not (see the `store` key), so the default \
                 store beside it cannot be used; set store (--store) to a directory elsewhere",
                self.data_dir.display()
            )));
        }
        let dir = parent.join("tierindex-store");
        if dir.to_str().is_none() {
            return Err(Error::InvalidInput(format!(
                "data_dir {}: its path is not valid UTF-8, so the default file store beside it \
                 cannot be used (file stores need UTF-8 paths); use a UTF-8 path or set store",
                self.data_dir.display()
            )));
        }
        // Percent-encoded, so a space or `%` in the path stays a path.
        ::url::Url::from_file_path(&dir)
            .map(|u| u.to_string())
            .map_err(|()| {
                Error::InvalidInput(format!(
                    "data_dir {}: no store URL can be formed next to it; set store",
                    self.data_dir.display()
                ))
            })
    }

    #[doc(hidden)]
    pub fn index_config(&self) -> IndexConfig {
        IndexConfig {
            slot_count: self.slot_count,
            segment_items: self.segment_items,
            segment_max_age: self.segment_max_age_ms.map(Duration::from_millis),
            max_chain_steps: self.max_chain_steps,
            sealed_mapped: self.sealed_mapped,
            active_at_open: self.active_at_open,
        }
    }

    #[doc(hidden)]
    pub fn upload_config(&self) -> UploadConfig {
        UploadConfig {
            multipart_threshold_bytes: self.multipart_threshold_bytes,
            part_size_bytes: self.part_size_bytes,
            max_attempts: self.max_attempts,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            verify: self.verify,
            ..UploadConfig::default()
        }
    }

    #[doc(hidden)]
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            endpoint: self.endpoint.clone(),
            allow_http: self.allow_http,
            region: self.region.clone(),
            sign_payload: self.sign_payload,
            ..StoreOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two data directories created at one path (on two hosts of one
    /// name: here one after the other) are two owners; one directory, or a
    /// copy of it, is one owner across opens.
    #[test]
    fn the_default_owner_id_tells_two_data_directories_at_one_path_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let cfg = Config {
            data_dir: dir.clone(),
            ..Config::default()
        };
        let bare = cfg.effective_owner_id().unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        crate::identity::Identity::new("stream-0", "file:///s", None)
            .store_in(&dir)
            .unwrap();
        let first = cfg.effective_owner_id().unwrap();
        assert_ne!(first, bare);
        assert_eq!(cfg.effective_owner_id().unwrap(), first, "stable across opens");
        let copy = tmp.path().join("copy");
        std::fs::create_dir_all(&copy).unwrap();
        std::fs::copy(dir.join("IDENTITY"), copy.join("IDENTITY")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::rename(&copy, &dir).unwrap();
        assert_eq!(cfg.effective_owner_id().unwrap(), first, "a copy is the same owner");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        crate::identity::Identity::new("stream-0", "file:///s", None)
            .store_in(&dir)
            .unwrap();
        let second = cfg.effective_owner_id().unwrap();
        assert_ne!(second, first, "another data directory at the same path");
        assert!(second.starts_with(first.split_once('-').unwrap().0));
    }

    #[test]
    fn toml_roundtrip_and_typos_rejected() {
        let c = Config::from_toml("data_dir = \"/tmp/x\"\nsegment_items = 10\n").unwrap();
        assert_eq!(c.segment_items, 10);
        assert_eq!(c.stream, "stream-0");
        assert!(Config::from_toml("segment_itemz = 10").is_err());
        assert!(Config::from_toml("segment_items = 0").is_err());
        assert!(Config::from_toml("stream = \"../etc\"").is_err());
        let text = toml::to_string(&Config::default()).unwrap();
        assert!(Config::from_toml(&text).is_ok());
    }

    #[test]
    fn zero_and_absurd_values_are_refused_by_name() {
        for (text, key) in [
            ("slot_count = 0", "slot_count"),
            ("slot_count = 4294967295", "slot_count"),
            ("segment_items = 4294967295", "segment_items"),
            ("segment_max_age_ms = 0", "segment_max_age_ms"),
            ("max_uploads_in_flight = 0", "max_uploads_in_flight"),
            ("max_uploads_in_flight = 1000000", "max_uploads_in_flight"),
            ("max_attempts = 0", "max_attempts"),
            ("part_size_bytes = 0", "part_size_bytes"),
            ("part_size_bytes = 10000000000", "part_size_bytes"),
            ("multipart_threshold_bytes = 0", "multipart_threshold_bytes"),
            ("request_timeout_ms = 0", "request_timeout_ms"),
            ("shutdown_deadline_ms = 0", "shutdown_deadline_ms"),
            (
                "shutdown_deadline_ms = 18446744073709551615",
                "shutdown_deadline_ms",
            ),
            ("tick_ms = 0", "tick_ms"),
            ("tick_ms = 9", "tick_ms"),
            ("lease_ttl_ms = 0", "lease_ttl_ms"),
            (
                "reconcile_interval_ms = 18446744073709551615",
                "reconcile_interval_ms",
            ),
            ("data_dir = \"\"", "data_dir"),
            ("metrics_addr = \"nope\"", "metrics_addr"),
            ("metrics_addr = \"999.1.1.1:1\"", "metrics_addr"),
            ("metrics_addr = \"10.0.0:9464\"", "metrics_addr"),
            ("region = \"us east\"", "region"),
            ("store = \"file:\"", "store"),
            ("store = \"s3://b/../x\"", "store"),
            ("endpoint = \"127.0.0.1:5077\"", "endpoint"),
            ("endpoint = \"http://k:hunter2@h\"", "endpoint"),
            // A type error must not quote the value.
            ("tick_ms = \"hunter2\"", "line 1"),
            ("manifest = \"hunter2\"", "line 1"),
            // Parse errors must not quote the line (it may hold a secret).
            ("endpoit = \"http://k:hunter2@h\"", "endpoit"),
            ("endpoint = \"http://k:hunter2@h", "line 1"),
            (
                "store = \"s3://b\"\nendpoint = [\"http://k:hunter2@h\"]",
                "line 2",
            ),
        ] {
            let e = Config::from_toml(text).expect_err(text).to_string();
            assert!(e.contains(key), "{text}: {e}");
            assert!(!e.contains("hunter2"), "{text}: {e}");
        }
        for ok in [
            "slot_count = 67108864",
            "tick_ms = 10",
            "metrics_addr = \"localhost:9464\"",
            "metrics_addr = \"[::1]:0\"",
            "store = \"file:///tmp/a%20b\"",
            "endpoint = \"http://127.0.0.1:9000\"",
        ] {
            assert!(Config::from_toml(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn default_store_url_survives_odd_paths() {
        let c = Config {
            data_dir: "/tmp/a dir%/data".into(),
            ..Config::default()
        };
        let u = c.store_url().unwrap();
        assert_eq!(
            crate::remote::url::parse_store("s", &u).unwrap(),
            crate::remote::url::StoreUrl::File {
                dir: "/tmp/a dir%/tierindex-store".into()
            }
        );
    }

    #[test]
    fn manifest_requests_fit_the_lease_by_default() {
        let c = Config::default();
        let r = c.manifest_options().retry;
        assert!(
            crate::remote::lease::check_ttl(c.lease_ttl(), &r).is_ok(),
            "{r:?}"
        );
        assert_eq!(r.max_attempts, 5);
        assert!(
            r.request_timeout > Duration::from_millis(2_900)
                && r.request_timeout < Duration::from_secs(3),
            "{r:?}"
        );
        // A long lease keeps the configured timeout.
        let c = Config {
            lease_ttl_ms: 3_600_000,
            request_timeout_ms: 10_000,
            ..Config::default()
        };
        assert_eq!(
            c.manifest_options().retry.request_timeout,
            Duration::from_secs(10)
        );
        // Too short to fit: the floor, and the check at open says so.
        let c = Config {
            lease_ttl_ms: 300,
            ..Config::default()
        };
        let r = c.manifest_options().retry;
        assert_eq!(r.request_timeout, MANIFEST_REQUEST_TIMEOUT_MIN);
        assert!(crate::remote::lease::check_ttl(c.lease_ttl(), &r).is_err());
    }

    #[test]
    fn manifest_keys_default_on_and_validated() {
        let c = Config::from_toml("").unwrap();
        assert!(c.manifest, "the safe mode is the default");
        assert!(!Config::from_toml("manifest = false").unwrap().manifest);
        assert_eq!(c.lease_ttl_ms, 30_000);
        assert!(!c.allow_unconditional_store);
        assert!(c.owner_id.is_none());
        let c =
            Config::from_toml("manifest = true\nowner_id = \"broker-7\"\nlease_ttl_ms = 5000\n")
                .unwrap();
        assert!(c.manifest);
        assert_eq!(c.effective_owner_id().unwrap(), "broker-7");
        assert!(Config::from_toml("owner_id = \"has space\"").is_err());
        assert!(Config::from_toml("owner_id = \"\"").is_err());
        assert!(Config::from_toml("lease_ttl_ms = 10").is_err());
        assert_eq!(Config::from_toml("").unwrap().reconcile_interval_ms, 0);
        assert_eq!(
            Config::from_toml("reconcile_interval_ms = 60000")
                .unwrap()
                .reconcile_interval_ms,
            60_000
        );
        assert!(Config::from_toml("reconcile_interval_ms = 5").is_err());
        let c = Config::from_toml("").unwrap();
        assert!(c.reconcile_repair);
        assert_eq!(c.reconcile_grace_ms, 3_600_000);
        assert!(Config::from_toml("reconcile_grace_ms = 999").is_err());
        assert!(Config::from_toml("reconcile_grace_ms = 1000").is_ok());
        let a = Config {
            data_dir: "/tmp/a".into(),
            ..Config::default()
        };
        let b = Config {
            data_dir: "/tmp/b".into(),
            ..Config::default()
        };
        let ida = a.effective_owner_id().unwrap();
        assert_eq!(ida, a.effective_owner_id().unwrap());
        assert_ne!(ida, b.effective_owner_id().unwrap());
    }
}

#[cfg(test)]
mod path_tests {
    use super::*;

    /// A file store inside the data directory is refused on the whole
    /// config (after the command line completed it), not when a config file
    /// is read; through a symlinked data directory too, and for a store
    /// directory that does not exist yet.
    #[test]
    fn a_store_inside_the_data_directory_is_refused_on_the_whole_config() {
        let c = Config::from_toml("data_dir = '/srv/a'\nstore = 'file:///srv/a/store'\n")
            .expect("a config file is checked field by field");
        assert!(c.validate().is_err());
        let ok = Config {
            data_dir: "/srv/b".into(),
            ..c
        };
        ok.validate().unwrap();
        // The other way round: the data directory inside the store.
        for data in ["/srv/st/data", "/srv/st"] {
            let c = Config {
                data_dir: data.into(),
                store: Some("file:///srv/st".into()),
                ..Config::default()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("is inside the"), "{data}: {e}");
        }
        // The default store is checked too: it is `<parent>/tierindex-store`.
        let c = Config {
            data_dir: "/srv/tierindex-store".into(),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        // A `..` after a folder that does not exist is resolved by name.
        let c = Config {
            data_dir: "/srv/nope/../st/data".into(),
            store: Some("file:///srv/st".into()),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        // Siblings are fine (the default store is one).
        Config {
            data_dir: "/srv/st-data".into(),
            store: Some("file:///srv/st".into()),
            ..Config::default()
        }
        .validate()
        .unwrap();

        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let c = Config {
            data_dir: link.clone(),
            store: Some(format!("file://{}/not-yet/store", real.display())),
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("inside the data directory"), "{e}");
        let mem = Config {
            data_dir: link,
            store: Some("memory://".into()),
            release_after_commit: true,
            ..Config::default()
        };
        assert!(mem.validate().is_err());
    }
}
