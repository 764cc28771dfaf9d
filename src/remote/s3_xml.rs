//! The XML of `ListMultipartUploads`: its result and S3's error document.
//! Untrusted: anything but a `ListMultipartUploadsResult` is "not supported
//! by this server", never an empty listing.

use serde::Deserialize;

/// Longest server error message carried into an error text.
pub(super) const MAX_MESSAGE: usize = 200;

/// At most `max` characters, control characters replaced.
pub(super) fn clean(s: &str, max: usize) -> String {
    s.trim()
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// One page's outcome.
pub(super) enum Page {
    Listed(ListResult),
    NotSupported(String),
}

// ---------------------------------------------------------------------------
// XML
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ListResult {
    #[serde(default)]
    pub(super) is_truncated: Option<String>,
    #[serde(default)]
    pub(super) next_key_marker: Option<String>,
    #[serde(default)]
    pub(super) next_upload_id_marker: Option<String>,
    #[serde(default, rename = "Upload")]
    pub(super) uploads: Vec<UploadXml>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct UploadXml {
    pub(super) key: String,
    pub(super) upload_id: String,
    #[serde(default)]
    pub(super) initiated: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ErrorXml {
    #[serde(default)]
    pub(super) code: Option<String>,
    #[serde(default)]
    pub(super) message: Option<String>,
}

/// The name of the document's root element.
fn root_name(xml: &str) -> Option<String> {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_str(xml);
    loop {
        match r.read_event() {
            Ok(Event::Start(e)) | Ok(Event::Empty(e)) => {
                let n = e.local_name();
                return Some(String::from_utf8_lossy(n.as_ref()).into_owned());
            }
            Ok(Event::Eof) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

pub(super) fn parse_list(body: &[u8]) -> std::result::Result<Page, String> {
    let xml = std::str::from_utf8(body).map_err(|_| "response is not UTF-8".to_string())?;
    match root_name(xml).as_deref() {
        Some("ListMultipartUploadsResult") => {}
        Some(other) => {
            return Ok(Page::NotSupported(format!(
                "ListMultipartUploads answered with <{}>, not a ListMultipartUploadsResult",
                clean(other, 64)
            )));
        }
        None => return Err("response is not an XML document".into()),
    }
    let r: ListResult = quick_xml::de::from_str(xml).map_err(|e| {
        format!(
            "malformed ListMultipartUploadsResult: {}",
            clean(&e.to_string(), MAX_MESSAGE)
        )
    })?;
    Ok(Page::Listed(r))
}

pub(super) fn parse_error(body: &[u8]) -> ErrorXml {
    std::str::from_utf8(body)
        .ok()
        .filter(|x| root_name(x).as_deref() == Some("Error"))
        .and_then(|x| quick_xml::de::from_str(x).ok())
        .unwrap_or_default()
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listings_and_refuses_other_documents() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>b</Bucket><KeyMarker></KeyMarker><UploadIdMarker/>
  <NextKeyMarker>k&amp;2</NextKeyMarker><NextUploadIdMarker>u2</NextUploadIdMarker>
  <Prefix>p/</Prefix><MaxUploads>2</MaxUploads><IsTruncated>true</IsTruncated>
  <Upload><Key>p/a</Key><UploadId>u1</UploadId>
    <Initiator><ID>x</ID><DisplayName>y</DisplayName></Initiator>
    <Owner><ID>x</ID></Owner><StorageClass>STANDARD</StorageClass>
    <Initiated>2010-11-10T20:48:33.000Z</Initiated></Upload>
  <Upload><Key>k&amp;2</Key><UploadId>u2</UploadId></Upload>
</ListMultipartUploadsResult>"#;
        let Ok(Page::Listed(r)) = parse_list(xml) else {
            panic!("not listed")
        };
        assert_eq!(r.is_truncated.as_deref(), Some("true"));
        assert_eq!(r.next_key_marker.as_deref(), Some("k&2"));
        assert_eq!(r.uploads.len(), 2);
        assert_eq!(r.uploads[1].key, "k&2");
        assert_eq!(r.uploads[1].initiated, None);

        let empty = br#"<ListMultipartUploadsResult><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>"#;
        assert!(matches!(parse_list(empty), Ok(Page::Listed(r)) if r.uploads.is_empty()));
        let objects = br#"<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>"#;
        assert!(
            matches!(parse_list(objects), Ok(Page::NotSupported(w)) if w.contains("ListBucketResult"))
        );
        for bad in [
            &b"not xml"[..],
            b"",
            b"\xff\xfe",
            b"<ListMultipartUploadsResult><Upload><Key>k</Key></Upload></ListMultipartUploadsResult>",
            b"<ListMultipartUploadsResult><Upload>",
        ] {
            assert!(parse_list(bad).is_err(), "{bad:?}");
        }
        let e = parse_error(b"<Error><Code>NotImplemented</Code><Message>no</Message></Error>");
        assert_eq!(e.code.as_deref(), Some("NotImplemented"));
        assert_eq!(parse_error(b"garbage").code, None);
    }
}
