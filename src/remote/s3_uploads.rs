//! S3 `ListMultipartUploads`, which `object_store` 0.14 has no call for.
//!
//! The reconciler needs the incomplete uploads under a stream's segments
//! folder (rule 5 in `recovery::reconcile`). This module sends
//! `GET /{bucket}?uploads&prefix=..` (path-style) or `GET /?uploads&..` on
//! the bucket's host (virtual-hosted), pages through `key-marker` /
//! `upload-id-marker`, and signs each request with AWS Signature Version 4
//! by hand. Endpoint, region, addressing style and credentials are the ones
//! [`super::build_s3`] gives `object_store`: the same builder values, and
//! the very credential provider of the built `AmazonS3` (static keys with
//! an optional session token, web identity, container or instance roles).
//!
//! ## Untrusted answers
//! Every response byte is untrusted: bodies are read up to a bound, the
//! XML must be a `ListMultipartUploadsResult` (anything else, like a server
//! that ignores `?uploads` and answers a `ListBucketResult`, is "not
//! supported by this server", never an empty listing), pagination must
//! advance, and the number of pages and uploads is bounded. Nothing here
//! panics on input.
//!
//! ## Secrets
//! Credentials only ever enter the signing functions. No type here prints
//! them (`Debug` is hand-written), errors carry the HTTP status and the
//! server's error code and message only (scrubbed of the key id, secret and
//! token should a server echo them), and transport errors are printed
//! without their URL.

use std::fmt;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::aws::{AwsCredential, AwsCredentialProvider};

use super::s3_xml::{MAX_MESSAGE, Page, clean, parse_error, parse_list};
use super::sigv4::{
    EMPTY_SHA256, SigningRequest, amz_date, authorization, canonical_path, sha256_hex, wire_query,
};
use super::{MultipartListing, PendingUpload, classify};
use crate::error::{Error, Result};
use crate::retry::{RetryPolicy, with_retries};

/// SigV4's marker for a body left out of the signature.
const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// Whether a hand-signed request's signature covers its body's SHA-256.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PayloadSigning {
    Signed,
    Unsigned,
}
/// Largest response body read for one page (S3 pages hold at most 1000
/// uploads, well under 1 MiB).
const MAX_BODY: usize = 8 * 1024 * 1024;
/// Largest error body read (only its code and message are used).
const MAX_ERROR_BODY: usize = 64 * 1024;
/// At most this many pages (of up to 1000 uploads) per listing.
const MAX_PAGES: usize = 1000;

/// How to reach the bucket, from `build_s3`'s builder.
pub(crate) struct S3UploadsConfig {
    pub bucket: String,
    /// `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` / the store options.
    pub endpoint: Option<String>,
    pub region: String,
    /// `endpoint` already names the bucket (virtual-hosted style).
    pub virtual_hosted: bool,
    /// S3 Express One Zone: needs session auth, not implemented here.
    pub s3_express: bool,
    pub skip_signature: bool,
    pub request_payer: bool,
    pub allow_http: bool,
    pub allow_invalid_certificates: bool,
    /// object_store's `proxy_url` / `proxy_excludes` (the proxy URL may
    /// hold credentials: never printed).
    pub proxy_url: Option<String>,
    pub proxy_excludes: Option<String>,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// The built `AmazonS3`'s provider, so both sign with the same keys.
    pub credentials: AwsCredentialProvider,
}

/// Lists the incomplete multipart uploads of one S3 bucket.
pub(crate) struct S3Uploads {
    cfg: S3UploadsConfig,
    /// The bucket's URL (`endpoint/bucket` or the virtual host), or why not.
    base: std::result::Result<url::Url, String>,
    client: OnceLock<std::result::Result<reqwest::Client, String>>,
}

impl fmt::Debug for S3Uploads {
    // Hand-written: the config holds the credential provider.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Uploads")
            .field("bucket", &self.cfg.bucket)
            .field("endpoint", &self.base.as_ref().map(redact_url).ok())
            .field("region", &self.cfg.region)
            .finish()
    }
}

fn redact_url(u: &url::Url) -> String {
    format!(
        "{}://{}{}",
        u.scheme(),
        authority(u).unwrap_or_default(),
        u.path()
    )
}

impl S3Uploads {
    pub(crate) fn new(cfg: S3UploadsConfig) -> S3Uploads {
        let base = bucket_url(&cfg);
        S3Uploads {
            cfg,
            base,
            client: OnceLock::new(),
        }
    }

    fn client(&self) -> Result<&reqwest::Client> {
        let c = self.client.get_or_init(|| {
            let mut b = reqwest::Client::builder()
                .timeout(self.cfg.request_timeout)
                .connect_timeout(self.cfg.connect_timeout)
                .https_only(!self.cfg.allow_http)
                .danger_accept_invalid_certs(self.cfg.allow_invalid_certificates)
                // A redirect would carry the session token to another host;
                // S3's own redirects (wrong region) become clear errors.
                .redirect(reqwest::redirect::Policy::none());
            if let Some(p) = &self.cfg.proxy_url {
                let mut proxy = reqwest::Proxy::all(p.as_str())
                    .map_err(|_| "the configured proxy_url does not parse".to_string())?;
                if let Some(ex) = &self.cfg.proxy_excludes {
                    proxy = proxy.no_proxy(reqwest::NoProxy::from_string(ex));
                }
                b = b.proxy(proxy);
            }
            b.build()
                .map_err(|e| format!("HTTP client: {}", e.without_url()))
        });
        c.as_ref().map_err(|e| Error::Remote(e.clone()))
    }

    /// Every incomplete upload whose key starts with `prefix` (a plain
    /// string prefix, as S3 applies it).
    pub(crate) async fn list(&self, prefix: &str) -> Result<MultipartListing> {
        if self.cfg.s3_express {
            return Ok(MultipartListing::NotSupportedByServer(
                "S3 Express One Zone buckets need session authentication, which the \
                 upload lister does not implement"
                    .into(),
            ));
        }
        let policy = RetryPolicy {
            max_attempts: 4,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            request_timeout: self.cfg.request_timeout.saturating_mul(2),
        };
        let mut rng = fastrand::Rng::new();
        let mut out: Vec<PendingUpload> = Vec::new();
        let mut marker: Option<(String, String)> = None;
        for _ in 0..MAX_PAGES {
            let page = with_retries(&policy, &mut rng, "ListMultipartUploads", |_| {
                self.page(prefix, marker.as_ref())
            })
            .await?;
            let page = match page {
                Page::Listed(p) => p,
                Page::NotSupported(why) => return Ok(MultipartListing::NotSupportedByServer(why)),
            };
            for u in page.uploads {
                out.push(PendingUpload {
                    initiated_ms: u.initiated.as_deref().and_then(parse_time_ms),
                    key: u.key,
                    upload_id: u.upload_id,
                });
            }
            if !page.is_truncated.as_deref().is_some_and(is_true) {
                return Ok(MultipartListing::Listed(out));
            }
            let next = (
                page.next_key_marker.unwrap_or_default(),
                page.next_upload_id_marker.unwrap_or_default(),
            );
            if next.0.is_empty() || marker.as_ref() == Some(&next) {
                return Err(Error::Remote(format!(
                    "ListMultipartUploads on s3://{}: the server says the listing is \
                     truncated but its next markers do not advance",
                    self.cfg.bucket
                )));
            }
            marker = Some(next);
        }
        Err(Error::Remote(format!(
            "ListMultipartUploads on s3://{}: more than {MAX_PAGES} pages under {prefix:?}",
            self.cfg.bucket
        )))
    }

    /// One signed `GET ?uploads` request.
    async fn page(&self, prefix: &str, marker: Option<&(String, String)>) -> Result<Page> {
        let mut url = self.base.clone().map_err(Error::InvalidInput)?;
        let mut query: Vec<(&str, &str)> = vec![("uploads", ""), ("prefix", prefix)];
        if let Some((key, id)) = marker {
            query.push(("key-marker", key));
            if !id.is_empty() {
                query.push(("upload-id-marker", id));
            }
        }
        url.set_query(Some(&wire_query(&query)));
        let path = url.path().to_string();
        let (req, cred) = self
            .signed(&reqwest::Method::GET, url, &path, &query, &[], EMPTY_SHA256)
            .await?;
        let what = format!("ListMultipartUploads on s3://{}", self.cfg.bucket);
        let resp = req.send().await.map_err(|e| transport(&what, e))?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            let body = read_bounded(resp, MAX_BODY, &what).await?;
            return parse_list(&body).map_err(|e| Error::Remote(format!("{what}: {e}")));
        }
        let body = read_bounded(resp, MAX_ERROR_BODY, &what)
            .await
            .unwrap_or_default();
        let err = parse_error(&body);
        let code = err
            .code
            .as_deref()
            .map(|c| clean(c, 64))
            .unwrap_or_default();
        if status == 501 || code == "NotImplemented" {
            return Ok(Page::NotSupported(format!(
                "ListMultipartUploads answered {status}{}",
                if code.is_empty() {
                    String::new()
                } else {
                    format!(" {code}")
                }
            )));
        }
        let message = err
            .message
            .as_deref()
            .map(|m| scrub(&clean(m, MAX_MESSAGE), cred.as_deref()))
            .unwrap_or_default();
        let text = format!("{what}: HTTP {status} {code}: {message}");
        if matches!(status, 408 | 429 | 500..=599)
            || matches!(
                code.as_str(),
                "SlowDown" | "RequestTimeout" | "InternalError"
            )
        {
            Err(Error::RemoteRetryable(text))
        } else {
            Err(Error::Remote(text))
        }
    }
}

/// The answer to a [`S3Uploads::send_signed`] request: status, headers and
/// a body read up to a bound.
pub(crate) struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    /// A header's value as text, when present and printable.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl S3Uploads {
    /// The one SigV4 signer of both hand-made requests (listing multipart
    /// uploads, checksum-mode HEAD, the probe's): `url` already carries the
    /// path `canonical_uri` (in SigV4's encoding) and `query`; `extra`
    /// headers are signed too. Returns the request, ready but for its body,
    /// and the credential (to scrub the server's words of it).
    async fn signed(
        &self,
        method: &reqwest::Method,
        url: url::Url,
        canonical_uri: &str,
        query: &[(&str, &str)],
        extra: &[(&str, String)],
        payload_sha256: &str,
    ) -> Result<(
        reqwest::RequestBuilder,
        Option<std::sync::Arc<AwsCredential>>,
    )> {
        let host = authority(&url).ok_or_else(|| {
            Error::InvalidInput(format!("S3 endpoint {} has no host", redact_url(&url)))
        })?;
        let amz_date = amz_date(SystemTime::now());
        let mut headers: Vec<(&str, String)> = vec![
            ("host", host),
            ("x-amz-content-sha256", payload_sha256.to_string()),
            ("x-amz-date", amz_date.clone()),
        ];
        headers.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        if self.cfg.request_payer {
            headers.push(("x-amz-request-payer", "requester".into()));
        }
        let cred = if self.cfg.skip_signature {
            None
        } else {
            Some(
                self.cfg
                    .credentials
                    .get_credential()
                    .await
                    .map_err(classify)?,
            )
        };
        if let Some(token) = cred.as_ref().and_then(|c| c.token.clone()) {
            headers.push(("x-amz-security-token", token));
        }
        let mut req = self.client()?.request(method.clone(), url);
        if let Some(c) = &cred {
            let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let auth = authorization(
                c,
                &self.cfg.region,
                "s3",
                &amz_date,
                &SigningRequest {
                    method: method.as_str(),
                    canonical_uri,
                    query,
                    headers: &hdrs,
                    payload_sha256,
                },
            );
            req = req.header("authorization", sensitive(&auth)?);
        }
        for (k, v) in &headers {
            req = req.header(*k, sensitive(v)?);
        }
        Ok((req, cred))
    }

    /// One signed request to `key` in the bucket, with `extra` headers
    /// (signed too) and an optional body. Transport errors are errors; any
    /// HTTP status is an [`Answer`] for the caller to judge (its body read
    /// up to 64 KiB). The server's words are untrusted and scrubbed of our
    /// credentials before they reach a message. `payload` says whether the
    /// signature covers the body's SHA-256 (`UNSIGNED-PAYLOAD` otherwise:
    /// the probe asks whether the server still validates a checksum header
    /// then, as segment uploads through the unsigned-payload client rely
    /// on).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send_signed(
        &self,
        method: reqwest::Method,
        key: &str,
        query: &[(&str, &str)],
        extra: &[(&str, String)],
        body: Option<bytes::Bytes>,
        what: &str,
        payload: PayloadSigning,
    ) -> Result<Answer> {
        let mut url = self.base.clone().map_err(Error::InvalidInput)?;
        {
            let mut segs = url
                .path_segments_mut()
                .map_err(|()| Error::InvalidInput("S3 endpoint cannot hold a path".to_string()))?;
            segs.pop_if_empty();
            for part in key.split('/') {
                segs.push(part);
            }
        }
        // Sent exactly as signed: each segment in SigV4's encoding.
        let path = canonical_path(url.path());
        url.set_path(&path);
        if !query.is_empty() {
            url.set_query(Some(&wire_query(query)));
        }
        let payload_sha = match (&body, payload) {
            (_, PayloadSigning::Unsigned) => UNSIGNED_PAYLOAD.to_string(),
            (Some(b), PayloadSigning::Signed) => sha256_hex(b),
            (None, PayloadSigning::Signed) => EMPTY_SHA256.to_string(),
        };
        let (mut req, cred) = self
            .signed(&method, url, &path, query, extra, &payload_sha)
            .await?;
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.map_err(|e| transport(what, e))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = if method == reqwest::Method::HEAD {
            Vec::new()
        } else {
            read_bounded(resp, MAX_ERROR_BODY, what)
                .await
                .unwrap_or_default()
        };
        let mut a = Answer {
            status,
            headers,
            body,
        };
        if let Some(c) = cred.as_deref() {
            // A server that echoes the key id or token in its error text.
            let scrubbed = scrub(&String::from_utf8_lossy(&a.body), Some(c));
            a.body = scrubbed.into_bytes();
        }
        Ok(a)
    }
}

/// `endpoint/bucket` (path-style), the endpoint itself (virtual-hosted:
/// it names the bucket), or AWS's default host, as object_store builds it.
fn bucket_url(cfg: &S3UploadsConfig) -> std::result::Result<url::Url, String> {
    let (bucket, region) = (&cfg.bucket, &cfg.region);
    let s = match (&cfg.endpoint, cfg.virtual_hosted) {
        (Some(ep), true) => ep.clone(),
        (Some(ep), false) => format!("{}/{bucket}", ep.trim_end_matches('/')),
        (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
        (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
    };
    let mut u = url::Url::parse(&s).map_err(|e| format!("S3 endpoint does not parse: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(format!("S3 endpoint {} is not http(s)", redact_url(&u)));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("S3 endpoint must not carry credentials".into());
    }
    // The path on the wire is the canonical one: each segment decoded and
    // encoded again by the SigV4 rules, so what is signed is what is sent.
    let path = canonical_path(u.path());
    u.set_path(&path);
    u.set_fragment(None);
    u.set_query(None);
    Ok(u)
}

/// A header value marked sensitive: HTTP/2 never indexes it and its
/// `Debug` does not print it. A value that is not a valid header (only
/// possible from a credential or a server-given marker) is refused without
/// being echoed.
fn sensitive(v: &str) -> Result<reqwest::header::HeaderValue> {
    let mut h = reqwest::header::HeaderValue::from_str(v).map_err(|_| {
        Error::InvalidInput("a ListMultipartUploads header value is not valid in HTTP".into())
    })?;
    h.set_sensitive(true);
    Ok(h)
}

/// `host[:port]` exactly as the request's Host header carries it.
fn authority(u: &url::Url) -> Option<String> {
    u.host_str()?;
    Some(u[url::Position::BeforeHost..url::Position::AfterPort].to_string())
}

fn is_true(s: &str) -> bool {
    s.trim().eq_ignore_ascii_case("true")
}

/// Milliseconds since the epoch of an RFC 3339 time (`Initiated`).
fn parse_time_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    let t = humantime::parse_rfc3339(s)
        .or_else(|_| humantime::parse_rfc3339_weak(s))
        .ok()?;
    u64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()
}

fn transport(what: &str, e: reqwest::Error) -> Error {
    // Without the URL: it is ours and harmless, but nothing from the
    // request beyond the status belongs in an error.
    let retry = e.is_timeout() || e.is_connect() || e.is_request() || e.is_body();
    let text = format!("{what}: {}", e.without_url());
    if retry {
        Error::RemoteRetryable(text)
    } else {
        Error::Remote(text)
    }
}

async fn read_bounded(mut resp: reqwest::Response, limit: usize, what: &str) -> Result<Vec<u8>> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(Error::Remote(format!(
            "{what}: response body larger than {limit} bytes"
        )));
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport(what, e))? {
        if buf.len().saturating_add(chunk.len()) > limit {
            return Err(Error::Remote(format!(
                "{what}: response body larger than {limit} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}


/// `text` with the credential's parts blanked, should a server echo them.
fn scrub(text: &str, cred: Option<&AwsCredential>) -> String {
    let mut out = text.to_string();
    if let Some(c) = cred {
        for p in [Some(&c.secret_key), c.token.as_ref()].into_iter().flatten() {
            if p.len() >= 4 {
                out = out.replace(p.as_str(), "<redacted>");
            }
        }
        // After the secret: a key id is told by a `:<redacted>` after it.
        // An ordinary word as key id only where a key id is quoted
        // (`error::blank_key_id`, helper-81 F7).
        out = crate::error::blank_key_id(&out, &c.key_id);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::sigv4::percent_decode;
    use crate::remote::{RemoteStore, StoreOptions};
    use object_store::path::Path;

    #[test]
    fn parses_listing_times() {
        assert_eq!(
            parse_time_ms("2010-11-10T20:48:33.000Z"),
            Some(1_289_422_113_000)
        );
        assert_eq!(
            parse_time_ms("2010-11-10T20:48:33Z"),
            Some(1_289_422_113_000)
        );
        assert_eq!(parse_time_ms("yesterday"), None);
    }

    // A local HTTP server answering canned responses.
    use crate::testing::{CannedHttp as Mock, Seen, canned_http as mock};

    const KEY_ID: &str = "AKIDMOCKKEYID0001";
    const SECRET: &str = "mock-secret-DO-NOT-PRINT-0123456789";
    const TOKEN: &str = "mock-session-token-DO-NOT-PRINT";

    fn store(m: &Mock, token: bool) -> RemoteStore {
        let mut env = vec![
            ("AWS_ACCESS_KEY_ID".to_string(), KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), SECRET.to_string()),
            ("AWS_ENDPOINT_URL".to_string(), m.endpoint.clone()),
            ("AWS_REGION".to_string(), "eu-mock-1".to_string()),
        ];
        if token {
            env.push(("AWS_SESSION_TOKEN".to_string(), TOKEN.to_string()));
        }
        let opts = StoreOptions {
            request_timeout: Duration::from_secs(5),
            ..StoreOptions::default()
        };
        RemoteStore::from_url_with_env("s3://bkt/pre", &opts, &env).unwrap()
    }

    fn page(uploads: &[(&str, &str)], next: Option<(&str, &str)>) -> String {
        let mut s = String::from("<ListMultipartUploadsResult>");
        if let Some((k, u)) = next {
            s.push_str(&format!(
                "<IsTruncated>true</IsTruncated><NextKeyMarker>{k}</NextKeyMarker>\
                 <NextUploadIdMarker>{u}</NextUploadIdMarker>"
            ));
        } else {
            s.push_str("<IsTruncated>false</IsTruncated>");
        }
        for (k, u) in uploads {
            s.push_str(&format!(
                "<Upload><Key>{k}</Key><UploadId>{u}</UploadId>\
                 <Initiated>2020-01-02T03:04:05.000Z</Initiated></Upload>"
            ));
        }
        s + "</ListMultipartUploadsResult>"
    }

    /// Recomputes the request's signature from what arrived on the wire.
    fn verify_signature(s: &Seen) {
        let h = |name: &str| {
            s.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("no {name} header in {s:?}"))
        };
        let auth = h("authorization");
        let signed = auth
            .split("SignedHeaders=")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .unwrap();
        let headers: Vec<(String, String)> =
            signed.split(';').map(|n| (n.to_string(), h(n))).collect();
        let hdrs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (path, query) = s.target.split_once('?').unwrap_or((&s.target, ""));
        let pairs: Vec<(String, String)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                let d = |x: &str| String::from_utf8(percent_decode(x)).unwrap();
                (d(k), d(v))
            })
            .collect();
        let q: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let cred = AwsCredential {
            key_id: KEY_ID.into(),
            secret_key: SECRET.into(),
            token: None,
        };
        let want = authorization(
            &cred,
            "eu-mock-1",
            "s3",
            &h("x-amz-date"),
            &SigningRequest {
                method: "GET",
                canonical_uri: path,
                query: &q,
                headers: &hdrs,
                payload_sha256: &h("x-amz-content-sha256"),
            },
        );
        assert_eq!(auth, want, "{s:?}");
    }

    #[tokio::test]
    async fn pages_through_markers_with_signed_path_style_requests() {
        let m = mock(vec![
            (
                200,
                "",
                page(
                    &[("pre/s/segments/a", "u1"), ("pre/s/segmentsX/b", "u9")],
                    Some(("pre/s/segments/a", "u1")),
                ),
            ),
            (503, "", "<Error><Code>SlowDown</Code></Error>".into()),
            (200, "", page(&[("pre/s/segments/c d", "u2")], None)),
        ])
        .await;
        let s = store(&m, true);
        let got = s
            .list_multipart_uploads(&Path::from("pre/s/segments"))
            .await
            .unwrap();
        let MultipartListing::Listed(v) = got else {
            panic!("{got:?}")
        };
        // The server's key outside the folder is dropped.
        let keys: Vec<&str> = v.iter().map(|u| u.key.as_str()).collect();
        assert_eq!(keys, vec!["pre/s/segments/a", "pre/s/segments/c d"]);
        assert_eq!(v[0].initiated_ms, Some(1_577_934_245_000));
        let seen = m.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen[0].target, "/bkt?prefix=pre%2Fs%2Fsegments%2F&uploads");
        assert_eq!(
            seen[2].target,
            "/bkt?key-marker=pre%2Fs%2Fsegments%2Fa&prefix=pre%2Fs%2Fsegments%2F&upload-id-marker=u1&uploads"
        );
        for r in &seen {
            verify_signature(r);
            assert!(
                r.headers
                    .iter()
                    .any(|(k, v)| k == "x-amz-security-token" && v == TOKEN)
            );
            let auth = &r
                .headers
                .iter()
                .find(|(k, _)| k == "authorization")
                .unwrap()
                .1;
            assert!(
                auth.contains("x-amz-security-token"),
                "token is signed: {auth}"
            );
            assert!(!auth.contains(SECRET));
        }
    }

    #[tokio::test]
    async fn not_implemented_is_reported_as_such() {
        for (status, body) in [
            (501, "<Error><Code>NotImplemented</Code><Message>A header you provided implies functionality that is not implemented</Message></Error>".to_string()),
            (400, "<Error><Code>NotImplemented</Code></Error>".to_string()),
            (501, String::new()),
            (200, "<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>".to_string()),
        ] {
            let m = mock(vec![(status, "", body)]).await;
            let got = store(&m, false)
                .list_multipart_uploads(&Path::from("pre/s/segments"))
                .await
                .unwrap();
            assert!(
                matches!(&got, MultipartListing::NotSupportedByServer(w) if w.starts_with("ListMultipartUploads answered")),
                "{status}: {got:?}"
            );
        }
    }

    #[tokio::test]
    async fn errors_name_status_and_code_but_never_credentials() {
        let echo = format!(
            "<Error><Code>InvalidAccessKeyId</Code><Message>key {KEY_ID} secret {SECRET} token {TOKEN}</Message>\
             <AWSAccessKeyId>{KEY_ID}</AWSAccessKeyId></Error>"
        );
        let m = mock(vec![(403, "", echo)]).await;
        let s = store(&m, true);
        let e = s
            .list_multipart_uploads(&Path::from("pre/s/segments"))
            .await
            .unwrap_err();
        let text = format!("{e} {e:?} {s:?}");
        assert!(matches!(e, Error::Remote(_)), "{e:?}");
        assert!(
            text.contains("403") && text.contains("InvalidAccessKeyId"),
            "{text}"
        );
        for secret in [KEY_ID, SECRET, TOKEN] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }

    #[tokio::test]
    async fn hostile_answers_fail_cleanly() {
        // Truncated, but the markers do not move.
        let stuck = page(
            &[("pre/s/segments/a", "u1")],
            Some(("pre/s/segments/a", "u1")),
        );
        let m = mock(vec![(200, "", stuck.clone()), (200, "", stuck)]).await;
        let e = store(&m, false)
            .list_multipart_uploads(&Path::from("pre/s/segments"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("do not advance"), "{e}");
        // Truncated without markers.
        let m = mock(vec![(200, "", "<ListMultipartUploadsResult><IsTruncated>true</IsTruncated></ListMultipartUploadsResult>".into())]).await;
        assert!(
            store(&m, false)
                .list_multipart_uploads(&Path::from("pre/s/segments"))
                .await
                .is_err()
        );
        // Not XML at all.
        let m = mock(vec![(200, "", "x".repeat(10))]).await;
        let e = store(&m, false)
            .list_multipart_uploads(&Path::from("pre/s/segments"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not an XML document"), "{e}");
        // A body larger than the bound is not read.
        let big = "<ListMultipartUploadsResult>".to_string() + &" ".repeat(MAX_BODY + 1);
        let m = mock(vec![(200, "", big)]).await;
        let e = store(&m, false)
            .list_multipart_uploads(&Path::from("pre/s/segments"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }
}
