//! The one public error type.
//!
//! Variants are coarse and say what the caller should do; the message carries
//! the detail (file, offset, expected vs found). Lower layers build these
//! through the helper constructors so the wording stays uniform.

use std::io;
use std::path::{Path, PathBuf};

/// The advice after a poison's reason, unless the reason gives its own.
fn restart_advice(why: &str) -> &'static str {
    if why.contains("restart") {
        ""
    } else {
        "; restart to recover what was durable"
    }
}

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
    /// A reason that says itself what a restart does (it names "restart")
    /// is not followed by that advice: after a deleted data directory a
    /// restart recovers nothing (helper-81 F4).
    #[error("writer poisoned: {0}{advice}", advice = restart_advice(.0))]
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

    /// The data directory is locked by another live process (or by this
    /// one: another instance open on it here).
    #[error("{}", locked_text(.path, .holder))]
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

    /// What to quote of this error inside another's text: a `Poisoned`
    /// error's reason without its own wrapping (quoted whole, it read
    /// "writer poisoned: ... (writer poisoned: ...; restart ...); restart
    /// ...": helper-81 F5, helper-83), any other error's text.
    pub fn reason(&self) -> String {
        match self {
            Error::Poisoned(why) => why.clone(),
            e => e.to_string(),
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

/// Credential values this process was given (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), registered when an S3
/// store is built so that [`scrub`] blanks them wherever a server echoes
/// them. Bounded: a process builds few stores. `true`: an access key id
/// (see [`register_key_id`]).
static SECRETS: std::sync::Mutex<Vec<(String, bool)>> = std::sync::Mutex::new(Vec::new());
const SECRETS_MAX: usize = 64;

/// Registers a secret value (a secret access key, a session token) for
/// [`scrub`], which blanks it wherever it appears. Values under 8
/// characters are not registered (blanking them would mangle ordinary
/// text; no real secret or token is that short).
pub(crate) fn register_secret(value: &str) {
    register(value, false);
}

/// Registers an access key id for [`scrub`]. One that looks like a real
/// key id (a digit in it, as in AWS's `AKIA...`, or no lower-case letter)
/// is blanked wherever it appears, as a secret is. One that is an
/// ordinary word (`tierindex`, `minioadmin`: no digit, lower case) is
/// blanked only where a key id is quoted (see [`blank_key_id`]):
/// blanked everywhere, it mangled the tool's own text (`tierindex
/// reconcile ...` became `<redacted> reconcile ...`, helper-81 F7).
pub(crate) fn register_key_id(value: &str) {
    register(value, true);
}

fn register(value: &str, key_id: bool) {
    if value.len() < 8 {
        return;
    }
    let mut s = SECRETS.lock().unwrap_or_else(|p| p.into_inner());
    let full = s.len() >= SECRETS_MAX;
    match s.iter_mut().find(|(v, _)| v == value) {
        // Registered as a key id and now as a secret (a secret equal to
        // its key id, as MinIO's `minioadmin`/`minioadmin`): a secret is
        // blanked wherever it appears (helper-90 F2: it was left as a
        // key id, blanked only where a key id is quoted).
        Some((_, was_key_id)) => *was_key_id &= key_id,
        None if !full => s.push((value.to_string(), key_id)),
        None => {}
    }
}

/// An access key id that is an ordinary word: no digit, and a lower-case
/// letter (generated ones, AWS's `AKIA` + 16 of `A-Z2-7`, MinIO's, Ceph's,
/// are upper case and digits; one in 28 of AWS's has no digit). Such a key
/// id is blanked only where a key id is quoted.
fn word_like_key_id(key_id: &str) -> bool {
    !key_id.bytes().any(|b| b.is_ascii_digit()) && key_id.bytes().any(|b| b.is_ascii_lowercase())
}

/// Labels after which a word is a key id (compared lower case, without
/// `_`, `-` and spaces): `AWSAccessKeyId=`, `access_key_id: `,
/// `"accessKey": "`, `key id `, `Credential=`.
const KEY_ID_LABELS: [&str; 4] = ["accesskeyid", "accesskey", "keyid", "credential"];

/// `text` with the access key id `key_id` blanked, ASCII case ignored. A
/// key id that looks real (see [`register_key_id`]) goes wherever it
/// appears, and any run of [`PART_RUN`] of its characters. An ordinary
/// word goes only as a whole token (not inside a longer word or name)
/// where a key id is quoted: after a key id's label ([`KEY_ID_LABELS`],
/// then `=`, `:`, quotes, spaces or `[`), before a SigV4 credential scope
/// (`/` and an 8-digit date), or before `:<redacted>` (user info whose
/// secret was blanked). Elsewhere it is left: the trade-off is in
/// docs/cli.md (Credentials).
pub(crate) fn blank_key_id(text: &str, key_id: &str) -> String {
    if key_id.len() < 4 {
        return text.to_string();
    }
    if !word_like_key_id(key_id) {
        let mut out = text.to_string();
        for form in [key_id.to_string(), percent_encoded(key_id)] {
            out = replace_ignoring_case(&out, &form);
        }
        return blank_parts(&out, key_id);
    }
    let (lower, n) = (text.to_ascii_lowercase(), key_id.to_ascii_lowercase());
    let word = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-');
    let mut out = String::with_capacity(text.len());
    let (mut at, mut from) = (0, 0);
    while let Some(i) = lower[from..].find(&n).map(|i| from + i) {
        let end = i + n.len();
        from = end;
        let before = lower[..i].chars().next_back();
        let after = lower[end..].chars().next();
        if before.is_some_and(word) || after.is_some_and(word) {
            continue;
        }
        let rest = &lower[end..];
        let scope = rest.strip_prefix('/').is_some_and(|r| {
            r.len() >= 8 && r.as_bytes()[..8].iter().all(u8::is_ascii_digit)
        });
        let user_info = rest.starts_with(":<redacted>");
        let label: String = lower[..i]
            .trim_end_matches(['=', ':', '"', '\'', ' ', '\\', '['])
            .chars()
            .rev()
            .take(24)
            .filter(|c| !matches!(c, '_' | '-' | ' '))
            .collect::<Vec<char>>()
            .into_iter()
            .rev()
            .collect();
        let labelled = KEY_ID_LABELS.iter().any(|l| label.ends_with(l));
        if scope || user_info || labelled {
            out.push_str(&text[at..i]);
            out.push_str("<redacted>");
            at = end;
        }
    }
    out.push_str(&text[at..]);
    out
}

/// `text` with every ASCII-case-insensitive occurrence of `needle` blanked.
fn replace_ignoring_case(text: &str, needle: &str) -> String {
    if needle.is_empty() {
        return text.to_string();
    }
    let (lower, n) = (text.to_ascii_lowercase(), needle.to_ascii_lowercase());
    if !lower.contains(&n) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while let Some(i) = lower[at..].find(&n).map(|i| at + i) {
        out.push_str(&text[at..i]);
        out.push_str("<redacted>");
        at = i + n.len();
    }
    out.push_str(&text[at..]);
    out
}

/// Every run of [`PART_RUN`] or more characters of `secret` in `text`
/// blanked (ASCII case ignored): a server that echoes part of a token
/// ("token TOKENqq77zzT... expired", helper-49). Each window of
/// `PART_RUN` bytes of the text that is also one of the secret's is cut,
/// so a longer run is cut whole. ASCII secrets of more than `PART_RUN`
/// characters only (shorter ones are matched whole above; random
/// 12-character runs do not occur in ordinary text). Linear in both
/// lengths.
fn blank_parts(text: &str, secret: &str) -> String {
    if secret.len() <= PART_RUN || !secret.is_ascii() || text.len() < PART_RUN {
        return text.to_string();
    }
    let s = secret.to_ascii_lowercase().into_bytes();
    let windows: std::collections::HashSet<&[u8]> = s.windows(PART_RUN).collect();
    // ASCII lowercasing keeps every byte where it was.
    let t = text.to_ascii_lowercase().into_bytes();
    let mut cut = vec![false; t.len()];
    let mut any = false;
    for (i, w) in t.windows(PART_RUN).enumerate() {
        if windows.contains(w) {
            cut[i..i + PART_RUN].iter_mut().for_each(|c| *c = true);
            any = true;
        }
    }
    if !any {
        return text.to_string();
    }
    // A run matched the secret's ASCII bytes, so it starts and ends on
    // character boundaries.
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < t.len() {
        if cut[i] {
            while i < t.len() && cut[i] {
                i += 1;
            }
            out.push_str("<redacted>");
        } else {
            let start = i;
            while i < t.len() && !cut[i] {
                i += 1;
            }
            out.push_str(&text[start..i]);
        }
    }
    out
}

/// See [`blank_parts`].
const PART_RUN: usize = 12;

/// `v` percent-encoded as a URL's query would carry it (RFC 3986's
/// unreserved characters kept).
fn percent_encoded(v: &str) -> String {
    let mut out = String::with_capacity(v.len() * 3);
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Blanks every run of 64 or more hexadecimal digits: a SigV4 signature
/// (64 lowercase hex) in whatever form a server quotes it (`"Signature":`,
/// `<Signature>`, `signature: `, `sig=`). Such runs carry nothing an
/// operator needs (content hashes of the same length go too), except a
/// whole component of a path (`/var/lib/docker/volumes/<64 hex>/_data`:
/// helper-61, the operator could not tell which volume an error named):
/// a run right after a `/` and ending the text or followed by `/`, `:`,
/// white space, a quote, `,` or `)`. A server quotes a signature after `=`,
/// `>`, `:` or a space, never as a path component.
fn blank_signatures(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut at, mut i) = (0, 0);
    while i < b.len() {
        if b[i].is_ascii_hexdigit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_hexdigit() {
                i += 1;
            }
            let component = start > 0
                && b[start - 1] == b'/'
                && b.get(i).is_none_or(|c| {
                    matches!(c, b'/' | b':' | b'"' | b'\'' | b',' | b')') || c.is_ascii_whitespace()
                });
            if i - start >= 64 && !component {
                out.push_str(&text[at..start]);
                out.push_str("<redacted>");
                at = i;
            }
        } else {
            i += 1;
        }
    }
    out.push_str(&text[at..]);
    out
}

/// XML elements and headers in which S3 servers echo request credentials
/// (an expired token's `<Token-0>`, a signature mismatch's string to sign,
/// a server that echoes request headers).
const ECHO_TAGS: [&str; 7] = [
    "Token-0",
    "AWSAccessKeyId",
    "SignatureProvided",
    "StringToSign",
    "StringToSignBytes",
    "CanonicalRequest",
    "CanonicalRequestBytes",
];
/// `signature` covers `Signature=<hex>` in an echoed authorization value
/// quoted out of its header (a per-request credential, replayable while the
/// request is valid) and `X-Amz-Signature=` of a presigned URL.
const ECHO_HEADERS: [&str; 4] = [
    "x-amz-security-token",
    "authorization",
    "x-amz-credential",
    "signature",
];

/// `text` (a store's error, which may quote a server's answer) with every
/// registered credential value, the contents of the XML elements S3
/// servers echo credentials in, and the values of credential headers
/// blanked as `<redacted>`.
pub fn scrub(text: &str) -> String {
    let mut out = text.to_string();
    // Each value as given, JSON-escaped (`\/`) and percent-encoded, in any
    // ASCII case (a server may lowercase a key id).
    // Secrets first: a key id is then told by a `:<redacted>` after it.
    let registered = SECRETS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (v, _) in registered.iter().filter(|(_, key_id)| !key_id) {
        for form in [v.clone(), v.replace('/', "\\/"), percent_encoded(v)] {
            out = replace_ignoring_case(&out, &form);
        }
        out = blank_parts(&out, v);
    }
    for (v, _) in registered.iter().filter(|(_, key_id)| *key_id) {
        out = blank_key_id(&out, v);
    }
    out = blank_signatures(&out);
    for tag in ECHO_TAGS {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        let mut from = 0;
        while let Some(i) = out[from..].find(&open).map(|i| from + i + open.len()) {
            let end = out[i..].find(&close).map_or(out.len(), |j| i + j);
            out.replace_range(i..end, "<redacted>");
            from = i + "<redacted>".len();
        }
    }
    let lower = out.to_ascii_lowercase();
    let mut cuts: Vec<std::ops::Range<usize>> = Vec::new();
    for h in ECHO_HEADERS {
        let mut from = 0;
        while let Some(i) = lower[from..].find(h).map(|i| from + i + h.len()) {
            from = i;
            // `name: value`, `name=value`, `"name": "value"`, `'name': 'value'`,
            // `\"name\": \"value\"`, Go's `Name:[value]`.
            let rest = &lower[i..];
            let skip = if h == "signature" {
                // `signature` only as `Signature=<value>` (or URL-encoded,
                // `%3D`): "invalid signature: check ..." is text, and so is
                // a variable such as `AWS_SKIP_SIGNATURE=true` (our own
                // advice was blanked).
                if lower[..i - h.len()].ends_with('_') {
                    continue;
                }
                if rest.starts_with('=') {
                    1
                } else if rest.starts_with("%3d") {
                    3
                } else {
                    continue;
                }
            } else {
                let skip = rest
                    .char_indices()
                    .find(|(_, c)| !matches!(c, ':' | '=' | ' ' | '"' | '\'' | '\\' | '['))
                    .map_or(rest.len(), |(k, _)| k);
                // A name followed by `:` or `=` only ("authorization failed"
                // is text, not a header).
                if !rest[..skip].contains([':', '=']) {
                    continue;
                }
                skip
            };
            let start = i + skip;
            // An authorization value has spaces and commas in it (scheme,
            // credential, signed headers, signature); a token or
            // credential ends at the first separator.
            let stops: &[char] = if h == "authorization" {
                &['"', '\'', '\\', '\n', '\r', '<', ']', '&']
            } else {
                &['"', '\'', '\\', '\n', '\r', '<', ']', '&', ',', ';', ' ', '\t']
            };
            // A `<redacted>` that a registered secret (the key id) left in
            // the value is part of it, not its end: stopping there left the
            // credential scope and the signature of an echoed
            // `authorization` header in the text.
            let mut end = start;
            loop {
                end = lower[end..].find(stops).map_or(lower.len(), |k| end + k);
                if lower[end..].starts_with("<redacted>") {
                    end += "<redacted>".len();
                } else {
                    break;
                }
            }
            if end > start {
                cuts.push(start..end);
            }
            from = end;
        }
    }
    if cuts.is_empty() {
        return out;
    }
    // Overlapping or touching cuts (two headers on one line) merged, then
    // applied in one forward pass: no range ever points into text already
    // replaced.
    cuts.sort_by_key(|r| r.start);
    let mut merged: Vec<std::ops::Range<usize>> = Vec::new();
    for r in cuts {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    let mut scrubbed = String::with_capacity(out.len());
    let mut at = 0;
    for r in merged {
        scrubbed.push_str(&out[at..r.start]);
        scrubbed.push_str("<redacted>");
        at = r.end;
    }
    scrubbed.push_str(&out[at..]);
    scrubbed
}

/// How a [`Error::Locked`]'s holder starts when it is this very process
/// (see `lock::holder_of`).
pub(crate) const HELD_BY_THIS_PROCESS: &str = "held by this very process";

/// The text of [`Error::Locked`]: "stop it first" only for another
/// process (helper-82 F3: a second open in one process told the
/// embedding broker to stop itself).
fn locked_text(path: &Path, holder: &str) -> String {
    if holder.starts_with(HELD_BY_THIS_PROCESS) {
        format!("data directory {} is {holder}", path.display())
    } else {
        format!(
            "data directory {} is locked by another process ({holder}); stop it first",
            path.display()
        )
    }
}

#[cfg(test)]
mod scrub_tests {
    use super::*;

    /// A word-like key id is blanked where a key id is quoted (after a
    /// label, before a SigV4 scope, before a blanked secret in user info)
    /// and nowhere else: not in the tool's own text, not inside a longer
    /// word or name (helper-81 F7; helper-88: no unit test).
    #[test]
    fn a_word_like_key_id_is_blanked_only_where_quoted() {
        let k = "tierindex";
        for (text, want) in [
            (
                "AWSAccessKeyId=tierindex&x=1",
                "AWSAccessKeyId=<redacted>&x=1",
            ),
            ("access_key_id: TierIndex", "access_key_id: <redacted>"),
            (
                "{\"accessKey\": \"tierindex\"}",
                "{\"accessKey\": \"<redacted>\"}",
            ),
            ("key id tierindex", "key id <redacted>"),
            (
                "Credential=tierindex/20261207/us-east-1/s3/aws4_request",
                "Credential=<redacted>/20261207/us-east-1/s3/aws4_request",
            ),
            (
                "http://tierindex:<redacted>@host:9000/b",
                "http://<redacted>:<redacted>@host:9000/b",
            ),
            ("run `tierindex reconcile`", "run `tierindex reconcile`"),
            ("tierindex-demo/data", "tierindex-demo/data"),
            ("mytierindex key id", "mytierindex key id"),
            ("keyid=tierindexes", "keyid=tierindexes"),
        ] {
            assert_eq!(blank_key_id(text, k), want, "{text}");
        }
    }

    /// A key id that looks real (digits, upper case) goes wherever it
    /// appears, percent-encoded too, and any run of 12 of its characters.
    #[test]
    fn a_real_looking_key_id_is_blanked_everywhere() {
        let k = "AKIAFAKE2KEY3ID45";
        let out = blank_key_id(
            "AKIAFAKE2KEY3ID45 at start, akiafake2key3id45 lower, part FAKE2KEY3ID45 end",
            k,
        );
        assert!(!out.to_ascii_lowercase().contains("fake2key3id"), "{out}");
        assert!(out.contains("at start") && out.contains("lower"), "{out}");
        // Shorter than four: never blanked (it would mangle text).
        assert_eq!(blank_key_id("abc abc", "abc"), "abc abc");
    }

    /// helper-90 F2: a secret equal to its key id (MinIO's default
    /// `minioadmin`/`minioadmin`), registered as a key id first, stayed a
    /// word-like key id, blanked only where a key id is quoted.
    #[test]
    fn a_secret_equal_to_its_key_id_is_blanked_everywhere() {
        let v = "samewordsecret";
        register_key_id(v);
        register_secret(v);
        for text in [
            format!("secret: {v}"),
            format!("{{\"secretKey\":\"{v}\"}}"),
            format!("http://{v}:{v}@host:9000/bkt"),
        ] {
            let s = scrub(&text);
            assert!(!s.contains(v), "{text} -> {s}");
        }
    }

    /// An authorization value quoted outside any header form (a server's
    /// message) still loses its signature.
    /// A server's echo in other forms: a JSON encoder escaping `/`, a
    /// signature under a JSON key or an XML tag, a lowercased key id.
    #[test]
    fn credentials_in_other_forms_are_blanked() {
        let token = "FwoGZXIvYXdzEJr//////////wEaDtokenXYZ+with/slash==";
        let key_id = "AKIAFAKEKEYID1234567";
        register_secret(token);
        register_secret(key_id);
        let sig = "7bafe5723efa32debe5ad667d7b913e9f50ca712e6c90101c2ea12a9f0d4b5e6";
        let body = format!(
            "{{\"Token\": \"{}\", \"Signature\": \"{sig}\"}} <Signature>{sig}</Signature> \
             key {} tok {} sig={sig}",
            token.replace('/', "\\/"),
            key_id.to_ascii_lowercase(),
            percent_encoded(token)
        );
        let s = scrub(&body);
        for leak in [
            token.to_string(),
            token.replace('/', "\\/"),
            percent_encoded(token),
            key_id.to_ascii_lowercase(),
            sig.to_string(),
        ] {
            assert!(!s.contains(&leak), "{leak} in {s}");
        }
        // 16-hex checksums in object keys stay.
        let k = "stream-0/segments/00000000000000000001-6d7bdefcdb8e1658.seg";
        assert_eq!(scrub(k), k);
        // A path component of 64 hex digits stays (a Docker volume id);
        // the same run quoted as a value does not.
        let vol = "ab".repeat(32);
        for p in [
            format!("I/O error on /var/lib/docker/volumes/{vol}/_data/d: denied"),
            format!("I/O error on /v/{vol}: denied"),
            format!("open \"/v/{vol}\""),
        ] {
            assert_eq!(scrub(&p), p);
        }
        for q in [
            format!("Signature={vol}"),
            format!("<Signature>{vol}</Signature>"),
            format!("signature: {vol}"),
            format!("/x?X-Amz-Signature={vol}"),
            format!("/v/{vol}abc="),
        ] {
            assert!(!scrub(&q).contains(&vol), "{q}");
        }
    }

    /// A server that echoes part of a token: a run of 12 characters or
    /// more of it is blanked, wherever it starts; shorter ones and other
    /// text stay.
    #[test]
    fn parts_of_a_credential_are_blanked() {
        let token = "TOKENqq77zzPARTIALxyzEchoTest0123456789abcdef";
        register_secret(token);
        for echo in [
            &token[..12],
            &token[..20],
            &token[5..30],
            &token[token.len() - 14..],
        ] {
            let s = scrub(&format!("403: token was {echo}... (truncated)"));
            assert!(!s.contains(&echo[..12]), "{echo}: {s}");
            assert!(s.starts_with("403: token was <redacted>"), "{s}");
            assert!(s.ends_with("... (truncated)"), "{s}");
        }
        let lower = token[3..19].to_ascii_lowercase();
        assert!(!scrub(&lower).contains(&lower[..12]));
        // 11 characters, or none: unchanged (also UTF-8 around).
        for t in [format!("é {} é", &token[..11]), "naïve text, no token".to_string()] {
            assert_eq!(scrub(&t), t);
        }
    }

    #[test]
    fn a_quoted_signature_is_blanked() {
        let sig = "1c2ea12a9f0d4b5e6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f";
        let body = format!(
            "<Message>auth=\"AWS4-HMAC-SHA256 Credential=X/20261204/us-east-1/s3/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature={sig}\"</Message> and \
             https://h/b/k?X-Amz-Signature={sig}&X-Amz-Date=1"
        );
        let s = scrub(&body);
        assert!(!s.contains(sig), "{s}");
        assert!(s.contains("SignedHeaders"), "{s}");
        let enc = format!("https%3A%2F%2Fh%2Fk%3FX-Amz-Signature%3D{sig}%26X-Amz-Date%3D1");
        assert!(!scrub(&enc).contains(sig), "{}", scrub(&enc));
        // Words are not values, nor a variable's name.
        assert_eq!(
            scrub("set AWS_SKIP_SIGNATURE=true for a public bucket"),
            "set AWS_SKIP_SIGNATURE=true for a public bucket"
        );
        for t in [
            "SignatureDoesNotMatch: The request signature we calculated does not match",
            "invalid signature: check your key",
        ] {
            assert_eq!(scrub(t), t);
        }
    }

    #[test]
    fn echoed_credentials_are_blanked() {
        register_secret("SEKRIT-SESSION-TOKEN-1");
        register_secret("short");
        let body = "HTTP 400 ExpiredToken: <Error><Code>ExpiredToken</Code>\
                    <Token-0>anything-here</Token-0><Message>SEKRIT-SESSION-TOKEN-1 expired</Message>\
                    <AWSAccessKeyId>AKIA1234</AWSAccessKeyId></Error> short";
        let s = scrub(body);
        assert!(!s.contains("anything-here") && !s.contains("SEKRIT") && !s.contains("AKIA1234"), "{s}");
        assert!(s.contains("ExpiredToken") && s.ends_with("short"), "{s}");
        let h = "echo: X-Amz-Security-Token: tok-abc123\nAuthorization: AWS4-HMAC-SHA256 Credential=AK/x, Signature=ff\nhost: h";
        let s = scrub(h);
        assert!(!s.contains("tok-abc123") && !s.contains("Signature=ff"), "{s}");
        assert!(s.contains("host: h"), "{s}");
        // The key id registered as a secret is redacted first: the rest
        // of the header (scope, signed headers, signature) still goes.
        register_secret("AKIDREGISTERED77");
        let h = "authorization: AWS4-HMAC-SHA256 Credential=AKIDREGISTERED77/20261204/us-east-1/s3/\
                 aws4_request, SignedHeaders=host;x-amz-date, Signature=6e4a30efdead\nhost: h";
        let s = scrub(h);
        assert!(
            !s.contains("AKIDREGISTERED77")
                && !s.contains("20261204")
                && !s.contains("SignedHeaders")
                && !s.contains("6e4a30ef"),
            "{s}"
        );
        assert!(s.contains("host: h"), "{s}");
        let t = "Authorization header is malformed";
        assert_eq!(scrub(t), t);
        // Two headers on one line (Go's map print), a query string, Python
        // quoting: nothing echoed survives, nothing panics, and the text
        // after a token is kept.
        let go = "map[Authorization:[AWS4-HMAC-SHA256 Credential=AKX/y, Signature=abc] X-Amz-Security-Token:[FQoGtokentoken]] host: h";
        let s = scrub(go);
        assert!(!s.contains("FQoG") && !s.contains("Signature=abc"), "{s}");
        assert!(s.ends_with("host: h"), "{s}");
        let q = "GET /b?X-Amz-Credential=AKX%2F1&X-Amz-Security-Token=FQoGq&x=1 failed";
        let s = scrub(q);
        assert!(!s.contains("FQoGq") && !s.contains("AKX%2F1") && s.contains("&x=1 failed"), "{s}");
        let py = "{'x-amz-security-token': 'FQoGpy', 'host': 'h'}";
        let s = scrub(py);
        assert!(!s.contains("FQoGpy") && s.contains("'host': 'h'"), "{s}");
        let plain = "403 Forbidden: x-amz-security-token: FQoGp expired, check clock skew";
        let s = scrub(plain);
        assert!(!s.contains("FQoGp") && s.contains("check clock skew"), "{s}");
        // Unclosed elements and odd text never panic.
        for odd in [
            "<Token-0>",
            "<Token-0>x",
            "authorization",
            "authorization:",
            "é<Token-0>é</Token-0>é",
            "authorization: a x-amz-security-token: b x-amz-credential: c",
            "x-amz-security-token:x-amz-security-token:",
            "authorization:é x-amz-credential=é",
        ] {
            let _ = scrub(odd);
        }
        // Every sequence of up to four fragments: no panic, and no echoed
        // token left behind.
        let frags = [
            "authorization:",
            " x-amz-security-token=",
            "'",
            "\"",
            "é",
            "<Token-0>",
            "</Token-0>",
            "FQoGzz",
            "\n",
            "]",
            "&",
            ", ",
        ];
        let n = frags.len();
        for k in 0..n * n * n * n {
            let text: String = [k % n, k / n % n, k / (n * n) % n, k / (n * n * n)]
                .iter()
                .map(|&i| frags[i])
                .collect();
            let _ = scrub(&text);
        }
    }
}

