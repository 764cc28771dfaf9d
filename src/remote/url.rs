//! Store URLs and S3 endpoints: parsed and validated here, and only here.
//!
//! Every string that names a store (`--store`, `TIERINDEX_STORE`, the config
//! key `store`, `store-check URL`) or an endpoint (`--endpoint`,
//! `TIERINDEX_ENDPOINT`, the config key `endpoint`, `AWS_ENDPOINT_URL`,
//! `AWS_ENDPOINT`) goes through [`parse_store`] or [`parse_endpoint`] before
//! anything is built from it, so `object_store` and `reqwest` only ever see a
//! value whose shape is known.
//!
//! The checks work on the raw text, not on what `url::Url` makes of it: the
//! WHATWG parser silently resolves `..`, drops tabs and newlines, and turns
//! `file:relative/x` into `/relative/x`, which is exactly what must be
//! refused. Refused:
//! - no scheme (`127.0.0.1:5077`), an unknown scheme;
//! - user info (`KEY:SECRET@host`): a secret in a URL ends up in shell
//!   history, process listings and, through the HTTP stack's logs, in log
//!   files. The error never echoes any of it;
//! - a query or a fragment: nothing here reads them, so they would be
//!   dropped silently (an endpoint with `?token=x` made a server's
//!   ListBuckets answer look like an existing object);
//! - `.` and `..` path segments, empty inner segments, whitespace and
//!   control characters;
//! - a `file:` URL that is not `file:///absolute/dir`, or is the root `/`.
//!
//! Errors name the field, show the accepted forms and quote at most
//! `scheme://host/path` of the input (never user info, query or fragment).

use std::path::PathBuf;

use crate::error::{Error, Result};

/// The store URL forms, as error messages show them.
pub const STORE_FORMS: &str =
    "file:///absolute/dir, s3://bucket[/prefix] (also s3a://), or memory://[prefix]";

/// The endpoint forms, as error messages show them.
pub const ENDPOINT_FORMS: &str = "http://host[:port] or https://host[:port]";

/// A validated store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// `file:///absolute/dir`: an absolute directory, not `/`.
    File { dir: PathBuf },
    /// `s3://bucket/prefix` (or `s3a://`); `prefix` has no leading or
    /// trailing `/` and may be empty.
    S3 { bucket: String, prefix: String },
    /// `memory://[prefix]`.
    Memory { prefix: String },
}

/// A validated S3 endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The endpoint as given, without a trailing `/`.
    pub url: String,
    /// `http://` to a loopback address (a local test server).
    pub loopback_http: bool,
}

/// The parts of a `scheme://authority/path` string, split on the raw text.
struct Raw<'a> {
    scheme: String,
    authority: &'a str,
    path: &'a str,
}

/// `text` in single quotes for a POSIX shell, its own quotes escaped: a
/// command printed for an operator to paste runs nothing it holds
/// (helper-84 F2: a data directory or store URL with `;` or `$(..)`).
pub(crate) fn shell_quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// What an error may show of `raw`: `scheme://host/path`, or nothing when
/// `raw` holds an `@` anywhere (user info, perhaps with a `/` in the
/// password), or a `:` that is not a port's (`user:secret` with the
/// `@host` left out: after the scheme, or with no scheme at all). Query
/// and fragment are cut off (a token may live there). A secret of at most
/// 5 digits, at most 65,535, cannot be told from a port and is shown.
pub fn redact(raw: &str) -> String {
    if holds_user_info(raw) {
        return "<URL with credentials, not shown>".to_string();
    }
    match raw.split_once("://") {
        Some((_, rest)) => {
            let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
            if !plain_authority(authority) {
                return "<URL with something other than a host and port after its scheme, not shown>"
                    .to_string();
            }
        }
        // `AKID:secret`, `s3:AKID:secret`, `http:/AKID:secret`: a scheme
        // mistyped, or none. Only a plain `host:port` is shown.
        None if (raw.contains(':') || raw.to_ascii_lowercase().contains("%3a"))
            && !plain_authority(raw) =>
        {
            return "<text with a `:` and no `://`, not shown>".to_string();
        }
        None => {}
    }
    let cut = raw.find(['?', '#']).map_or(raw, |i| &raw[..i]);
    // An HTTP endpoint's path with a `:` (also encoded) may be
    // `KEY:SECRET` put where a path goes (helper-63's #9): the scheme and
    // host only. A store's path (`file:///a/10:00`) is shown.
    if let Some((scheme, rest)) = cut.split_once("://")
        && (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https"))
        && let Some(slash) = rest.find('/')
        && (rest[slash..].contains(':') || rest[slash..].to_ascii_lowercase().contains("%3a"))
    {
        let head: String = format!("{scheme}://{}", &rest[..slash])
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        return format!("{head:?} (its path, which holds a `:`, not shown)");
    }
    let shown: String = cut.chars().filter(|c| !c.is_control()).take(200).collect();
    format!("{shown:?}")
}

/// Whether `a` is a host with at most a port after it: no `:` but the
/// one before a port (up to 5 digits, at most 65,535), an IPv6 literal
/// closed (`[..]`), no encoded `:` (`%3A`). Anything else may hold
/// `user:secret` with the `@host` left out.
fn plain_authority(a: &str) -> bool {
    if a.to_ascii_lowercase().contains("%3a") {
        return false;
    }
    let (host, tail) = match a.strip_prefix('[') {
        Some(v6) => match v6.find(']') {
            Some(i) => (&a[..i + 2], &a[i + 2..]),
            None => return false,
        },
        None => match a.find(':') {
            Some(i) => (&a[..i], &a[i..]),
            None => (a, ""),
        },
    };
    if host.contains(['[', ']']) && !host.starts_with('[') {
        return false;
    }
    match tail.strip_prefix(':') {
        None => tail.is_empty(),
        Some(p) => is_port(p),
    }
}

/// Up to 5 digits, at most 65,535 (empty: a `host:` with no port yet).
fn is_port(p: &str) -> bool {
    p.len() <= 5
        && p.chars().all(|c| c.is_ascii_digit())
        && p.parse::<u32>().map_or(p.is_empty(), |n| n <= 65_535)
}

/// An `@` anywhere, also percent-encoded (`%40`): user info, perhaps with
/// a `/` or an encoded `@` in the password.
pub(crate) fn holds_user_info(raw: &str) -> bool {
    raw.contains('@') || raw.to_ascii_lowercase().contains("%40")
}

fn invalid(field: &str, raw: &str, why: impl std::fmt::Display, forms: &str) -> Error {
    Error::InvalidInput(format!("{field} {}: {why}; expected {forms}", redact(raw)))
}

/// Checks shared by store URLs and endpoints; returns the raw parts.
fn split<'a>(field: &str, raw: &'a str, forms: &str) -> Result<Raw<'a>> {
    if raw.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{field} is empty; expected {forms}"
        )));
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            field,
            raw,
            "contains whitespace or a control character (percent-encode it)",
            forms,
        ));
    }
    // Any `@` counts as user info, wherever it is: a password holding `/`
    // ends the authority early, so the `@` lands in what looks like the
    // path (`s3://KEY:a/b@bucket`), and the text must still not be echoed.
    if holds_user_info(raw) {
        return Err(credentials(field));
    }
    let Some((scheme, rest)) = raw.split_once("://") else {
        let why = if raw.starts_with("file:") {
            "a file URL needs an absolute path after file:// (file:///absolute/dir)".to_string()
        } else {
            "missing scheme".to_string()
        };
        return Err(invalid(field, raw, why, forms));
    };
    let valid_scheme = scheme
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !valid_scheme {
        return Err(invalid(field, raw, "missing or malformed scheme", forms));
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    if rest.contains('?') || rest.contains('#') {
        return Err(invalid(
            field,
            raw,
            "a query (?...) or fragment (#...) is not allowed: nothing would read it",
            forms,
        ));
    }
    let path = &rest[authority_end..];
    check_segments(field, raw, path, forms)?;
    Ok(Raw {
        scheme: scheme.to_ascii_lowercase(),
        authority,
        path,
    })
}

fn credentials(field: &str) -> Error {
    Error::InvalidInput(format!(
        "{field} must not carry credentials (user:password@), and it is not shown here; \
         remove them and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and \
         AWS_SESSION_TOKEN if needed) in the environment"
    ))
}

/// No `.`/`..` segments (also percent-encoded), no empty inner segments.
fn check_segments(field: &str, raw: &str, path: &str, forms: &str) -> Result<()> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    if trimmed.is_empty() {
        return Ok(());
    }
    for seg in trimmed.split('/') {
        let decoded = percent_decode(seg)
            .ok_or_else(|| invalid(field, raw, "malformed percent-encoding", forms))?;
        if seg.is_empty() {
            return Err(invalid(field, raw, "empty path segment (//)", forms));
        }
        if decoded == b"." || decoded == b".." {
            return Err(invalid(
                field,
                raw,
                "`.` and `..` path segments are not allowed",
                forms,
            ));
        }
        if decoded.contains(&0) || decoded.contains(&b'/') || decoded.contains(&b'\\') {
            return Err(invalid(
                field,
                raw,
                "a path segment encodes NUL, `/` or `\\`",
                forms,
            ));
        }
    }
    Ok(())
}

/// `%XX` decoding; `None` on a malformed escape.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The credential-free form a store URL is shown and recorded in
/// (`RemoteStore::display_url`, `IDENTITY`): `file://<dir as a plain
/// path>`, `s3://bucket[/prefix]`, `memory://prefix`. Two URLs name the same
/// store exactly when their forms are equal. Errors are
/// [`parse_store`]'s (which never echo credentials).
pub fn display_form(field: &str, raw: &str) -> Result<String> {
    Ok(match parse_store(field, raw)? {
        StoreUrl::File { dir } => format!("file://{}", dir.display()),
        StoreUrl::Memory { prefix } => format!("memory://{prefix}"),
        StoreUrl::S3 { bucket, prefix } => s3_display(&bucket, &s3_prefix(&prefix)?),
    })
}

/// The URL a recorded display form ([`display_form`], as `IDENTITY` keeps
/// it) names. A `file://` display form holds the raw path, which may hold
/// a space, a newline or a `%`: read as a URL it was refused, or decoded
/// to another directory (helper-61: `x%41y` became `xAy`, where
/// `reconcile --repair` then created a store). It is percent-encoded
/// again; the other forms are URLs as they are.
pub fn url_from_display(display: &str) -> String {
    if let Some(path) = display.strip_prefix("file://")
        && let Ok(u) = ::url::Url::from_file_path(path)
    {
        return u.to_string();
    }
    display.to_string()
}

/// The object-store path of an `s3://` prefix.
pub(crate) fn s3_prefix(prefix: &str) -> Result<object_store::path::Path> {
    object_store::path::Path::from_url_path(prefix)
        .map_err(|e| Error::InvalidInput(format!("store URL prefix: {e}")))
}

/// `s3://bucket[/prefix]`.
pub(crate) fn s3_display(bucket: &str, prefix: &object_store::path::Path) -> String {
    if prefix.is_root() {
        format!("s3://{bucket}")
    } else {
        format!("s3://{bucket}/{prefix}")
    }
}

/// Parses and validates a store URL. `field` names where it came from
/// (`--store`, `TIERINDEX_STORE`, `config key store`, ...).
pub fn parse_store(field: &str, raw: &str) -> Result<StoreUrl> {
    let r = split(field, raw, STORE_FORMS)?;
    match r.scheme.as_str() {
        "file" => {
            if !(r.authority.is_empty() || r.authority.eq_ignore_ascii_case("localhost")) {
                return Err(invalid(
                    field,
                    raw,
                    "a file URL names a local absolute path: file:///absolute/dir (three slashes)",
                    STORE_FORMS,
                ));
            }
            if !r.path.starts_with('/') {
                return Err(invalid(
                    field,
                    raw,
                    "a file URL needs an absolute path",
                    STORE_FORMS,
                ));
            }
            let bytes = percent_decode(r.path)
                .ok_or_else(|| invalid(field, raw, "malformed percent-encoding", STORE_FORMS))?;
            // object_store's file store names objects by UTF-8 paths (it
            // panics on others).
            if std::str::from_utf8(&bytes).is_err() {
                return Err(invalid(
                    field,
                    raw,
                    "the path is not valid UTF-8 once decoded (the file store needs UTF-8 paths)",
                    STORE_FORMS,
                ));
            }
            // Normalized (`file:///a/b/` and `file:///a/b` name one store,
            // and the data directory records the display form).
            let dir: PathBuf = bytes_to_path(bytes).components().collect();
            if dir.parent().is_none() {
                return Err(invalid(
                    field,
                    raw,
                    "the store directory must not be the filesystem root",
                    STORE_FORMS,
                ));
            }
            Ok(StoreUrl::File { dir })
        }
        "s3" | "s3a" => {
            let bucket = r.authority;
            if bucket.is_empty() {
                return Err(invalid(
                    field,
                    raw,
                    "an s3 URL needs a bucket (s3://bucket/prefix)",
                    STORE_FORMS,
                ));
            }
            let ok = bucket.len() <= 255
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
            if !ok {
                return Err(invalid(
                    field,
                    raw,
                    "the bucket name may hold only letters, digits, `.`, `-` and `_` \
                     (no port: the endpoint goes in --endpoint)",
                    STORE_FORMS,
                ));
            }
            let prefix = r.path.trim_matches('/');
            // The key layer's own parser, so the prefix is exactly what the
            // keys will start with.
            object_store::path::Path::from_url_path(prefix)
                .map_err(|e| invalid(field, raw, format!("prefix: {e}"), STORE_FORMS))?;
            Ok(StoreUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            })
        }
        "memory" => {
            if r.authority.contains(':') {
                return Err(invalid(
                    field,
                    raw,
                    "a `:` in a memory:// prefix is not allowed (user:password?)",
                    STORE_FORMS,
                ));
            }
            let mut prefix = r.authority.to_string();
            let p = r.path.trim_matches('/');
            if !p.is_empty() {
                prefix = if prefix.is_empty() {
                    p.to_string()
                } else {
                    format!("{prefix}/{p}")
                };
            }
            object_store::path::Path::from_url_path(&prefix)
                .map_err(|e| invalid(field, raw, format!("prefix: {e}"), STORE_FORMS))?;
            Ok(StoreUrl::Memory { prefix })
        }
        other => Err(invalid(
            field,
            raw,
            format!("unsupported scheme {other:?}"),
            STORE_FORMS,
        )),
    }
}

#[cfg(unix)]
fn bytes_to_path(b: Vec<u8>) -> PathBuf {
    use std::os::unix::ffi::OsStringExt as _;
    PathBuf::from(std::ffi::OsString::from_vec(b))
}

#[cfg(not(unix))]
fn bytes_to_path(b: Vec<u8>) -> PathBuf {
    PathBuf::from(String::from_utf8_lossy(&b).into_owned())
}

/// Parses and validates an S3 endpoint. `field` names where it came from
/// (`--endpoint`, `AWS_ENDPOINT_URL`, `config key endpoint`, ...).
pub fn parse_endpoint(field: &str, raw: &str) -> Result<Endpoint> {
    let r = split(field, raw, ENDPOINT_FORMS).map_err(|e| match e {
        // A bare host:port is the common slip: say what to write.
        Error::InvalidInput(m) if !raw.contains("://") && looks_like_host_port(raw) => {
            Error::InvalidInput(format!("{m} (for a local server: http://{raw})"))
        }
        e => e,
    })?;
    if r.scheme != "http" && r.scheme != "https" {
        return Err(invalid(
            field,
            raw,
            format!("unsupported scheme {:?}", r.scheme),
            ENDPOINT_FORMS,
        ));
    }
    if r.authority.is_empty() {
        return Err(invalid(field, raw, "no host", ENDPOINT_FORMS));
    }
    // The host and port, by the parser the HTTP stack will use.
    let u = ::url::Url::parse(raw).map_err(|e| invalid(field, raw, e, ENDPOINT_FORMS))?;
    let loopback_http = r.scheme == "http"
        && match u.host() {
            Some(::url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            Some(::url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(::url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => return Err(invalid(field, raw, "no host", ENDPOINT_FORMS)),
        };
    Ok(Endpoint {
        url: raw.strip_suffix('/').unwrap_or(raw).to_string(),
        loopback_http,
    })
}

/// `host:port` or `a.b.c.d:port` (so the error can suggest `http://...`).
fn looks_like_host_port(raw: &str) -> bool {
    plain_authority(raw)
        && raw.rsplit_once(':').is_some_and(|(h, p)| {
            !h.is_empty()
                && !p.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded display form names the same store again, whatever its
    /// path holds (helper-61).
    #[test]
    fn a_display_form_round_trips_to_its_store() {
        for dir in [
            "/a/b/tierindex-store",
            "/a/sp ace/tierindex-store",
            "/a/x%41y/tierindex-store",
            "/a/100%/tierindex-store",
            "/a/p%2Fq/s",
            "/a/new\nline/s",
            "/a/h#q?r/s",
        ] {
            let display = format!("file://{dir}");
            let url = url_from_display(&display);
            match parse_store("store", &url) {
                Ok(StoreUrl::File { dir: d }) => assert_eq!(d, std::path::Path::new(dir), "{url}"),
                other => panic!("{display:?} -> {url:?} gave {other:?}"),
            }
            assert_eq!(display_form("store", &url).unwrap(), display);
        }
        for other in ["s3://bkt/p/q", "memory://x"] {
            assert_eq!(url_from_display(other), other);
        }
    }

    fn store_err(raw: &str) -> String {
        match parse_store("--store", raw) {
            Err(Error::InvalidInput(m)) => m,
            other => panic!("{raw:?} gave {other:?}"),
        }
    }

    fn endpoint_err(raw: &str) -> String {
        match parse_endpoint("--endpoint", raw) {
            Err(Error::InvalidInput(m)) => m,
            other => panic!("{raw:?} gave {other:?}"),
        }
    }

    #[test]
    fn a_trailing_slash_names_the_same_file_store() {
        for raw in ["file:///srv/store/", "file:///srv/store", "file://localhost/srv/store/"] {
            assert_eq!(display_form("store", raw).unwrap(), "file:///srv/store", "{raw}");
        }
        assert!(display_form("store", "file:///srv/%FF").is_err());
    }

    #[test]
    fn accepted_store_forms() {
        assert_eq!(
            parse_store("s", "file:///tmp/x%20y/store/").unwrap(),
            StoreUrl::File {
                dir: PathBuf::from("/tmp/x y/store/")
            }
        );
        assert_eq!(
            parse_store("s", "file://localhost/tmp/a").unwrap(),
            StoreUrl::File {
                dir: PathBuf::from("/tmp/a")
            }
        );
        assert_eq!(
            parse_store("s", "s3://bkt/a/b/").unwrap(),
            StoreUrl::S3 {
                bucket: "bkt".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            parse_store("s", "S3A://bkt").unwrap(),
            StoreUrl::S3 {
                bucket: "bkt".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            parse_store("s", "memory://a/b").unwrap(),
            StoreUrl::Memory {
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            parse_store("s", "memory://").unwrap(),
            StoreUrl::Memory {
                prefix: String::new()
            }
        );
    }

    #[test]
    fn refused_store_forms_name_the_field_and_the_forms() {
        for raw in [
            "",
            "file:",
            "file:relative/x",
            "file:/abs/but/one/slash",
            "file://relative",
            "file:///",
            "file://host/x",
            "127.0.0.1:5077",
            "bucket/prefix",
            "s3://bkt/../x",
            "s3://bkt/a/./x",
            "s3://bkt/%2e%2E/x",
            "s3://bkt/a//b",
            "s3://bkt/p?versionId=1",
            "s3://bkt/p#frag",
            "s3://bkt:9000/p",
            "s3:///p",
            "gs://b/p",
            "http://x/y",
            "s3://bkt/p\n",
            " s3://bkt/p",
            "s3://bkt/a%zz",
            "file:///tmp/%00x",
        ] {
            let m = store_err(raw);
            assert!(m.starts_with("--store"), "{raw:?}: {m}");
            assert!(m.contains("file:///absolute/dir"), "{raw:?}: {m}");
        }
        assert!(store_err("s3://bkt/../x").contains("`..`"));
        assert!(store_err("127.0.0.1:5077").contains("missing scheme"));
    }

    #[test]
    fn credentials_are_refused_and_never_echoed() {
        for raw in [
            "s3://AKIA:hunter2secret@bkt/p",
            "s3://hunter2secret@bkt/p",
            "file://u:hunter2secret@/tmp/x",
            "AKIA:hunter2secret@bkt",
            "memory://u:hunter2secret@p",
            "s3://bkt/p?X-Amz-Signature=hunter2secret",
            "s3://bkt/p#hunter2secret",
            "s3://AKID:hunter2secret/x+y=z@bucket/p",
            "s3://AKID:a/hunter2secret@bucket",
            "file:///tmp/u:hunter2secret@x",
        ] {
            let m = store_err(raw);
            assert!(!m.contains("hunter2secret"), "{raw:?}: {m}");
        }
        for raw in [
            "http://KEY:hunter2secret@127.0.0.1:9000",
            "https://hunter2secret@host",
            "KEY:hunter2secret@127.0.0.1:9000",
            "http://host/?token=hunter2secret",
            "http://host/#hunter2secret",
            "http://KEY:a/hunter2secret@127.0.0.1:9000",
            "http://KEY:hunter2secret/@host",
        ] {
            let m = endpoint_err(raw);
            assert!(!m.contains("hunter2secret"), "{raw:?}: {m}");
            assert!(m.starts_with("--endpoint"), "{raw:?}: {m}");
        }
        assert!(store_err("s3://AKIA:hunter2secret@bkt/p").contains("AWS_ACCESS_KEY_ID"));
    }

    #[test]
    fn endpoints() {
        let e = parse_endpoint("e", "http://127.0.0.1:9000/").unwrap();
        assert_eq!(e.url, "http://127.0.0.1:9000");
        assert!(e.loopback_http);
        assert!(
            parse_endpoint("e", "http://localhost:9000")
                .unwrap()
                .loopback_http
        );
        assert!(
            parse_endpoint("e", "http://[::1]:9000")
                .unwrap()
                .loopback_http
        );
        assert!(
            !parse_endpoint("e", "https://127.0.0.1:9000")
                .unwrap()
                .loopback_http
        );
        assert!(
            !parse_endpoint("e", "http://10.0.0.1:9000")
                .unwrap()
                .loopback_http
        );
        assert!(
            !parse_endpoint("e", "HTTP://example.com")
                .unwrap()
                .loopback_http
        );
        let m = endpoint_err("127.0.0.1:5077");
        assert!(m.contains("missing scheme"), "{m}");
        assert!(m.contains("http://127.0.0.1:5077"), "{m}");
        for raw in [
            "",
            "localhost:9000",
            "ftp://host",
            "s3://bkt",
            "http://",
            "http:///x",
            "http://host/../x",
            "http://host:99999",
            "http://host/?x",
        ] {
            let m = endpoint_err(raw);
            assert!(m.contains("http://host[:port]"), "{raw:?}: {m}");
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(redact("s3://b/p?token=x"), "\"s3://b/p\"");
        assert!(!redact("http://a:b@h/").contains("a:b"));
        assert!(!redact("a:secret@h").contains("secret"));
        // helper-39, F2: an encoded `@`, or the secret where a port goes.
        assert!(!redact("s3://AKIAX:SeCrEt1234%40bucket/p").contains("SeCrEt"));
        assert!(!redact("http://AKIAX:SeCrEt1234%40127.0.0.1:9/").contains("SeCrEt"));
        assert!(!redact("http://AKIAX:SeCrEt1234/").contains("SeCrEt"));
        // helper-63's #9: a `:` in an endpoint's path.
        for raw in [
            "http://127.0.0.1:9000/AKIAX:SeCrEt1234",
            "https://h/p/AKIAX%3aSeCrEt1234/",
            "HTTP://h:1/AKIAX%3ASeCrEt1234",
        ] {
            let shown = redact(raw);
            assert!(!shown.contains("SeCrEt"), "{raw} -> {shown}");
            assert!(shown.contains("not shown"), "{raw} -> {shown}");
        }
        assert_eq!(redact("http://h:9/p"), "\"http://h:9/p\"");
        assert_eq!(redact("file:///a/10:00"), "\"file:///a/10:00\"");
        // helper-49: `user:secret` with the `@host` left out, with no
        // scheme, a mistyped one, a port after it, an encoded `:`, an
        // unclosed `[`.
        for raw in [
            "AKID:SeCrEtZQ93",
            "s3:AKID:SeCrEtZQ93",
            "http:/AKID:SeCrEtZQ93",
            "http:AKID:SeCrEtZQ93",
            "admin:98765432109876",
            "http://AKID:SeCrEtZQ93:9000",
            "s3://AKID:SeCrEtZQ93:9000/p",
            "http://AKID%3ASeCrEtZQ93",
            "http://[AKID:SeCrEtZQ93",
            "http://[::1]SeCrEtZQ93:1/",
            "memory://AKID:SeCrEtZQ93",
        ] {
            let m = redact(raw);
            assert!(!m.contains("SeCrEtZQ93") && !m.contains("98765"), "{raw:?}: {m}");
        }
        assert_eq!(redact("localhost:9000"), "\"localhost:9000\"");
        assert_eq!(redact("s3/bucket"), "\"s3/bucket\"");
        // A numeric secret where a port goes: hidden unless it could be a
        // port (5 digits at most, up to 65,535).
        assert!(!redact("http://AKIAX:12345678901234567890/").contains("1234567890"));
        assert!(!redact("http://AKIAX:065536/b").contains("65536"));
        assert!(!redact("s3://AKIAX:99999/b").contains("99999"));
        assert_eq!(redact("http://h:65535/"), "\"http://h:65535/\"");
        assert_eq!(redact("http://h:/"), "\"http://h:/\"");
        assert_eq!(redact("http://127.0.0.1:9000/x"), "\"http://127.0.0.1:9000/x\"");
        assert_eq!(redact("http://[::1]:9000/"), "\"http://[::1]:9000/\"");
        assert_eq!(redact("http://[::1]/"), "\"http://[::1]/\"");
    }
}
