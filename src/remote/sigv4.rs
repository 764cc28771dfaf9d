//! AWS Signature Version 4, by hand, for the one S3 request `object_store`
//! has no call for (`ListMultipartUploads`, [`super::s3_uploads`]) and the
//! checksum-carrying PUTs of [`super::s3_checksum`]. Checked against the
//! worked examples of the AWS documentation (tests below).
//!
//! Why not a crate: `object_store` signs its own requests but does not
//! export its signer, and `aws-sigv4` would pull in the AWS SDK's runtime
//! crates for four functions; HMAC-SHA256 and SHA-256 come from
//! `aws-lc-rs`, which `object_store` already builds.

use std::time::SystemTime;

use aws_lc_rs::{digest, hmac};
use object_store::aws::AwsCredential;

/// SHA-256 of the empty payload (every request here has no body).
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// `YYYYMMDDTHHMMSSZ`.
pub(crate) fn amz_date(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect()
}

/// Each key and value encoded, sorted by key then value: the order both
/// the canonical query and the query as sent use.
fn encoded_pairs(query: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, true), uri_encode(v, true)))
        .collect();
    pairs.sort();
    pairs
}

/// The query as sent: sorted like the canonical one, a value-less
/// parameter bare (`uploads`, as the SDKs send it).
pub(crate) fn wire_query(query: &[(&str, &str)]) -> String {
    encoded_pairs(query)
        .iter()
        .map(|(k, v)| {
            if v.is_empty() {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

// ---------------------------------------------------------------------------
// Signature Version 4
// ---------------------------------------------------------------------------

/// What is signed of a request.
pub(crate) struct SigningRequest<'a> {
    pub method: &'a str,
    /// The path as sent, already encoded by [`canonical_path`].
    pub canonical_uri: &'a str,
    /// Query parameters, not encoded (a value-less one has `""`).
    pub query: &'a [(&'a str, &'a str)],
    /// Every header to sign, `host` and `x-amz-date` included.
    pub headers: &'a [(&'a str, &'a str)],
    pub payload_sha256: &'a str,
}

/// SigV4 `UriEncode`: every byte but `A-Za-z0-9-_.~` as `%XX` (upper-case
/// hex); `/` too unless `encode_slash` is false.
pub(crate) fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (b == b'/' && !encode_slash)
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` sequences (invalid ones are kept as they are).
pub(super) fn percent_decode(s: &str) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&c, tail)) = rest.split_first() {
        if let (b'%', [h, l, after @ ..]) = (c, tail)
            && let (Some(h), Some(l)) = (hex(*h), hex(*l))
        {
            out.push((h * 16 + l) as u8);
            rest = after;
            continue;
        }
        out.push(c);
        rest = tail;
    }
    out
}

/// A URL path, each segment decoded and encoded again by [`uri_encode`]
/// (S3 encodes the path once).
pub(crate) fn canonical_path(path: &str) -> String {
    if path.is_empty() {
        return "/".into();
    }
    path.split('/')
        .map(|seg| uri_encode(&String::from_utf8_lossy(&percent_decode(seg)), true))
        .collect::<Vec<_>>()
        .join("/")
}

/// `k=v&..`, each part encoded, sorted by key then value.
pub(crate) fn canonical_query(query: &[(&str, &str)]) -> String {
    encoded_pairs(query)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The canonical request and its signed-headers list.
pub(crate) fn canonical_request(req: &SigningRequest<'_>) -> (String, String) {
    let mut hdrs: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| {
            let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
            (k.trim().to_ascii_lowercase(), v)
        })
        .collect();
    hdrs.sort();
    let canonical_headers: String = hdrs.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed: String = hdrs
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let creq = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        req.canonical_uri,
        canonical_query(req.query),
        canonical_headers,
        signed,
        req.payload_sha256
    );
    (creq, signed)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

/// `kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request")`.
pub(crate) fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> Vec<u8> {
    let k_date = hmac_sha256(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, service.as_bytes());
    hmac_sha256(&k_service, b"aws4_request")
}

/// The `Authorization` header value of `req` at `amz_date`
/// (`YYYYMMDDTHHMMSSZ`).
pub(crate) fn authorization(
    cred: &AwsCredential,
    region: &str,
    service: &str,
    amz_date: &str,
    req: &SigningRequest<'_>,
) -> String {
    let date = amz_date.get(..8).unwrap_or(amz_date);
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let (creq, signed) = canonical_request(req);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        sha256_hex(creq.as_bytes())
    );
    let key = signing_key(&cred.secret_key, date, region, service);
    let sig = hex(&hmac_sha256(&key, to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={sig}",
        cred.key_id
    )
}


#[cfg(test)]
mod tests {
    use super::*;

    // The example credentials of the AWS Signature Version 4 documentation
    // ("Signature calculations for the Authorization header", S3 API).
    const AK: &str = "AKIAIOSFODNN7EXAMPLE";
    const SK: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    const HOST: &str = "examplebucket.s3.amazonaws.com";
    const DATE: &str = "20130524T000000Z";

    fn doc_cred() -> AwsCredential {
        AwsCredential {
            key_id: AK.into(),
            secret_key: SK.into(),
            token: None,
        }
    }

    fn signature_of(auth: &str) -> &str {
        auth.rsplit_once("Signature=").map_or("", |(_, s)| s)
    }

    /// AWS's "GET Object" example: a Range header, no query.
    #[test]
    fn signs_the_aws_get_object_example() {
        let headers = [
            ("Host", HOST),
            ("Range", "bytes=0-9"),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", DATE),
        ];
        let req = SigningRequest {
            method: "GET",
            canonical_uri: &canonical_path("/test.txt"),
            query: &[],
            headers: &headers,
            payload_sha256: EMPTY_SHA256,
        };
        let (creq, signed) = canonical_request(&req);
        assert_eq!(signed, "host;range;x-amz-content-sha256;x-amz-date");
        assert_eq!(
            sha256_hex(creq.as_bytes()),
            "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"
        );
        assert_eq!(
            hex(&signing_key(SK, "20130524", "us-east-1", "s3")),
            "dbb893acc010964918f1fd433add87c70e8b0db6be30c1fbeafefa5ec6ba8378"
        );
        assert_eq!(
            authorization(&doc_cred(), "us-east-1", "s3", DATE, &req),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    /// AWS's "GET Bucket Lifecycle" (a value-less sub-resource, like
    /// `?uploads`) and "Get Bucket (List Objects)" (a sorted query).
    #[test]
    fn signs_the_aws_query_examples() {
        let headers = [
            ("host", HOST),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", DATE),
        ];
        for (query, creq_hash, sig) in [
            (
                &[("lifecycle", "")][..],
                "9766c798316ff2757b517bc739a67f6213b4ab36dd5da2f94eaebf79c77395ca",
                "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
            ),
            (
                &[("prefix", "J"), ("max-keys", "2")][..],
                "df57d21db20da04d7fa30298dd4488ba3a2b47ca3a489c74750e0f1e7df1b9b7",
                "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
            ),
        ] {
            let req = SigningRequest {
                method: "GET",
                canonical_uri: "/",
                query,
                headers: &headers,
                payload_sha256: EMPTY_SHA256,
            };
            let (creq, _) = canonical_request(&req);
            assert_eq!(sha256_hex(creq.as_bytes()), creq_hash, "{query:?}");
            let auth = authorization(&doc_cred(), "us-east-1", "s3", DATE, &req);
            assert_eq!(signature_of(&auth), sig, "{query:?}");
        }
    }

    /// AWS's "PUT Object": a path byte that must be encoded (`$`), a
    /// payload hash, extra signed headers.
    #[test]
    fn signs_the_aws_put_object_example() {
        let payload = sha256_hex(b"Welcome to Amazon S3.");
        assert_eq!(
            payload,
            "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
        );
        let headers = [
            ("date", "Fri, 24 May 2013 00:00:00 GMT"),
            ("host", HOST),
            ("x-amz-content-sha256", payload.as_str()),
            ("x-amz-date", DATE),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
        ];
        let path = canonical_path("/test$file.text");
        assert_eq!(path, "/test%24file.text");
        let req = SigningRequest {
            method: "PUT",
            canonical_uri: &path,
            query: &[],
            headers: &headers,
            payload_sha256: &payload,
        };
        assert_eq!(
            signature_of(&authorization(&doc_cred(), "us-east-1", "s3", DATE, &req)),
            "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"
        );
    }


    #[test]
    fn encodings_and_dates() {
        assert_eq!(uri_encode("a-b_c.d~e", true), "a-b_c.d~e");
        assert_eq!(uri_encode("a b/c+d=é*", true), "a%20b%2Fc%2Bd%3D%C3%A9%2A");
        assert_eq!(uri_encode("a/b c", false), "a/b%20c");
        assert_eq!(canonical_path("/my%20bucket/a+b"), "/my%20bucket/a%2Bb");
        assert_eq!(canonical_path(""), "/");
        assert_eq!(canonical_path("/bad%zz"), "/bad%25zz");
        assert_eq!(
            canonical_query(&[("uploads", ""), ("prefix", "p/s/segments/")]),
            "prefix=p%2Fs%2Fsegments%2F&uploads="
        );
        assert_eq!(
            wire_query(&[("uploads", ""), ("prefix", "a b")]),
            "prefix=a%20b&uploads"
        );
        assert_eq!(
            amz_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_369_353_600)),
            DATE
        );
    }
}
