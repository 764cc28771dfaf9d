//! S3 checksums that `object_store` 0.14 sends but never reads back.
//!
//! `object_store` (with `with_checksum_algorithm(CRC64NVME)`) sends
//! `x-amz-checksum-crc64nvme` on PutObject and UploadPart and lists the part
//! checksums on CompleteMultipartUpload, so a validating server rejects a
//! body that changed on the way (400 BadDigest). What it cannot do:
//!
//! - ask for the stored value back (`HEAD` with `x-amz-checksum-mode:
//!   ENABLED`), which is how the `Checksum` verification level proves the
//!   body without downloading it, and
//! - send a deliberately *wrong* value, which is how the capability probe
//!   proves the server validates at all (moto accepts any value; s3s-fs 0.14
//!   checks single PUTs only; Ceph 16 ignores the header).
//!
//! Both are signed requests through [`S3Uploads::send_signed`] (the same
//! endpoint, addressing and credentials as `object_store`).

use bytes::Bytes;
use reqwest::Method;

use super::s3_uploads::{PayloadSigning, S3Uploads};
use crate::error::{Error, Result};

/// The checksum header of S3's CRC-64/NVME.
pub const CRC64NVME_HEADER: &str = "x-amz-checksum-crc64nvme";
/// Whole-object (`FULL_OBJECT`) or per-part (`COMPOSITE`) value.
pub const CHECKSUM_TYPE_HEADER: &str = "x-amz-checksum-type";

/// What a HEAD with checksum mode returned about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredChecksum {
    /// `Content-Length`, when the server sent a valid one.
    pub size: Option<u64>,
    /// The stored CRC-64/NVME, when the server returned a whole-object value
    /// (a composite `...-N` value, or one marked `COMPOSITE`, is `None`: it
    /// proves nothing about the whole body).
    pub crc64: Option<u64>,
    /// What the server sent, for messages (bounded, printable).
    pub raw: Option<String>,
}

/// The S3 header value of a CRC-64/NVME: base64 of its 8 big-endian bytes.
pub fn encode_crc64(c: u64) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(c.to_be_bytes())
}

/// Inverse of [`encode_crc64`]; `None` for anything that is not exactly
/// 8 bytes in base64 (a composite `...-N` value among them).
pub fn decode_crc64(v: &str) -> Option<u64> {
    use base64::Engine as _;
    let b = base64::engine::general_purpose::STANDARD
        .decode(v.trim())
        .ok()?;
    let a: [u8; 8] = b.try_into().ok()?;
    Some(u64::from_be_bytes(a))
}

impl S3Uploads {
    /// HEAD `key` with `x-amz-checksum-mode: ENABLED`. `Ok(None)` when
    /// there is no object.
    pub(crate) async fn head_checksum(&self, key: &str) -> Result<Option<StoredChecksum>> {
        let what = format!("HEAD {key} (checksum mode)");
        let a = self
            .send_signed(
                Method::HEAD,
                key,
                &[],
                &[("x-amz-checksum-mode", "ENABLED".to_string())],
                None,
                &what,
                PayloadSigning::Signed,
            )
            .await?;
        // "status code: N" is the form `remote::classify` reads a status
        // from when this error travels inside an object_store error.
        match a.status {
            404 => return Ok(None),
            200..=299 => {}
            408 | 429 | 500..=599 => {
                return Err(Error::RemoteRetryable(format!(
                    "{what}: status code: {}",
                    a.status
                )));
            }
            s => return Err(Error::Remote(format!("{what}: status code: {s}"))),
        }
        let raw = a.header(CRC64NVME_HEADER).map(|v| {
            v.chars()
                .take(64)
                .filter(|c| !c.is_control())
                .collect::<String>()
        });
        let composite = a
            .header(CHECKSUM_TYPE_HEADER)
            .is_some_and(|t| t.eq_ignore_ascii_case("COMPOSITE"));
        let crc64 = match &raw {
            Some(v) if !composite => decode_crc64(v),
            _ => None,
        };
        let size = a
            .header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        Ok(Some(StoredChecksum { size, crc64, raw }))
    }

    /// PUT `body` under `key` with `x-amz-checksum-crc64nvme: crc64` (the
    /// probe sends a wrong one on purpose). Returns the HTTP status.
    pub(crate) async fn put_with_crc64(
        &self,
        key: &str,
        body: Bytes,
        crc64: u64,
        payload: PayloadSigning,
    ) -> Result<u16> {
        let a = self
            .send_signed(
                Method::PUT,
                key,
                &[],
                &[(CRC64NVME_HEADER, encode_crc64(crc64))],
                Some(body),
                &format!("PUT {key} (checksum probe)"),
                payload,
            )
            .await?;
        Ok(a.status)
    }

    /// UploadPart `part` of `upload_id` with the given CRC-64/NVME (the
    /// probe sends a wrong one on purpose). Returns the HTTP status.
    pub(crate) async fn upload_part_with_crc64(
        &self,
        key: &str,
        upload_id: &str,
        part: u32,
        body: Bytes,
        crc64: u64,
        payload: PayloadSigning,
    ) -> Result<u16> {
        let part = part.to_string();
        let a = self
            .send_signed(
                Method::PUT,
                key,
                &[("partNumber", part.as_str()), ("uploadId", upload_id)],
                &[(CRC64NVME_HEADER, encode_crc64(crc64))],
                Some(body),
                &format!("UploadPart {key} (checksum probe)"),
                payload,
            )
            .await?;
        Ok(a.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_roundtrip_and_composites_are_refused() {
        // S3's documented value for an empty body is "AAAAAAAAAAA=".
        assert_eq!(encode_crc64(0), "AAAAAAAAAAA=");
        for c in [0, 1, 0xae8b_1486_0a79_9888, u64::MAX] {
            assert_eq!(decode_crc64(&encode_crc64(c)), Some(c));
        }
        for bad in [
            "",
            "AAAA",
            "AAAAAAAAAAA=-3",
            "not base64!",
            "AAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(decode_crc64(bad), None, "{bad}");
        }
    }
}
