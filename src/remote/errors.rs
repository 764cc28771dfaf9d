//! Error classification: the one mapping from `object_store::Error` to
//! crate errors (see the parent module's doc).

use super::*;

/// Source error our retry loop puts inside `object_store::Error::Generic`
/// when one request exceeds its deadline; [`classify`] treats it as
/// retryable.
#[derive(Debug)]
pub(crate) struct RequestTimedOut {
    pub what: String,
    pub after: Duration,
}

impl fmt::Display for RequestTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} timed out after {:?}", self.what, self.after)
    }
}

impl std::error::Error for RequestTimedOut {}

/// Finds an HTTP status in an error chain. `object_store` does not export
/// its request error type, so the status is read from its stable message
/// ("... status code: 503 Service Unavailable ...").
fn http_status(err: &(dyn std::error::Error + 'static)) -> Option<u16> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        let s = e.to_string();
        if let Some(i) = s.find("status code: ") {
            let digits = s.get(i + 13..i + 16)?;
            if let Ok(code) = digits.parse::<u16>() {
                return Some(code);
            }
        }
        cur = e.source();
    }
    None
}

/// `Some(true)` retryable, `Some(false)` permanent, `None` unknown.
fn transient(err: &object_store::Error) -> Option<bool> {
    let root: &(dyn std::error::Error + 'static) = err;
    // A server that validates x-amz-checksum-* (or Content-MD5) refuses a
    // body that changed on the way with a 400: the bytes we hold are right,
    // so sending them again is the fix, not giving up.
    let text = err.to_string();
    if ["BadDigest", "XAmzContentChecksumMismatch", "InvalidDigest"]
        .iter()
        .any(|c| text.contains(c))
    {
        return Some(true);
    }
    if let Some(code) = http_status(root) {
        return Some(matches!(code, 408 | 429 | 500..=599));
    }
    let mut cur = Some(root);
    while let Some(e) = cur {
        if e.downcast_ref::<RequestTimedOut>().is_some() {
            return Some(true);
        }
        if let Some(h) = e.downcast_ref::<HttpError>() {
            // Every transport failure kind (connect, request, timeout,
            // interrupted, decode) may succeed on a fresh connection.
            tracing::trace!(kind = ?h.kind(), "transport error");
            return Some(true);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            match io.kind() {
                K::ConnectionReset
                | K::ConnectionAborted
                | K::ConnectionRefused
                | K::BrokenPipe
                | K::TimedOut
                | K::Interrupted
                | K::UnexpectedEof
                | K::WouldBlock
                | K::NotConnected => return Some(true),
                // A name too long stays too long (helper-61: retried, and
                // the run promised an upload at the next start).
                // A directory where an object belongs stays there
                // (helper-78 F5: a repair looped on it).
                K::PermissionDenied
                | K::ReadOnlyFilesystem
                | K::InvalidInput
                | K::InvalidFilename
                | K::IsADirectory
                | K::NotADirectory => {
                    return Some(false);
                }
                _ => {}
            }
        }
        cur = e.source();
    }
    if text.contains("SlowDown") || text.contains("RequestTimeout") {
        return Some(true);
    }
    None
}

impl crate::retry::Retryable for object_store::Error {
    fn is_transient(&self) -> bool {
        is_transient(self)
    }
    fn timed_out(what: &str, after: Duration) -> Self {
        object_store::Error::Generic {
            store: "tierindex",
            source: Box::new(RequestTimedOut {
                what: what.to_string(),
                after,
            }),
        }
    }
}

/// True when `object_store` error `err` may succeed if tried again.
pub fn is_transient(err: &object_store::Error) -> bool {
    matches!(classify_ref(err), Class::Retryable)
}

enum Class {
    Retryable,
    Permanent(&'static str),
}

fn classify_ref(err: &object_store::Error) -> Class {
    use object_store::Error as E;
    match err {
        E::NotFound { .. } => Class::Permanent("object not found"),
        E::AlreadyExists { .. } => Class::Permanent("object already exists"),
        E::Precondition { .. } | E::NotModified { .. } => Class::Permanent("precondition failed"),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            Class::Permanent("access denied: check the credentials and the bucket policy")
        }
        E::NotSupported { .. } | E::NotImplemented { .. } => {
            Class::Permanent("operation not supported by this store")
        }
        E::UnknownConfigurationKey { .. } | E::InvalidPath { .. } => {
            Class::Permanent("invalid configuration or path")
        }
        E::JoinError { .. } => Class::Retryable,
        // The file store's answer to a range past the object's end (its
        // error type is private; S3 answers 416, handled below): the
        // object is shorter than the range read, which no retry changes
        // (helper-72 F6: an emptied object was retried five times).
        _ if err.to_string().contains("Requested range was invalid") => {
            Class::Permanent("range outside the object: it is shorter than recorded")
        }
        // Generic and anything added later: look at the cause. Unknown causes
        // are retried: the loop is bounded, and giving up on a transient
        // fault loses more than retrying a permanent one a few times.
        _ => match transient(err) {
            Some(false) => Class::Permanent("request rejected"),
            Some(true) | None => Class::Retryable,
        },
    }
}

/// The one mapping from `object_store` errors to crate errors. Callers that
/// give `NotFound`, `AlreadyExists` or `Precondition` a meaning match them
/// before calling this; here they become [`Error::Remote`].
pub fn classify(err: object_store::Error) -> Error {
    // The error may quote the server's answer, which may echo a credential,
    // or hold line breaks that would forge log lines (helper-49): control
    // characters become spaces.
    let text: String = crate::error::scrub(&err.to_string())
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match classify_ref(&err) {
        Class::Retryable => Error::RemoteRetryable(text),
        Class::Permanent(why) => Error::Remote(format!("{why}: {text}")),
    }
}
